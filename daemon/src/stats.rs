//! Per-queue counters, written by the queue's own thread (its threads, with
//! `--threads-per-queue`) with relaxed atomics and read by the control plane for `status`.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::Serialize;

#[derive(Default)]
pub struct QueueCounters {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
    pub discards: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub errors: AtomicU64,
    /// IOs split into more than one pool chunk.
    pub split_ios: AtomicU64,
    /// ublk commands resubmitted because io_uring was short of memory (ENOMEM/EAGAIN). Counted,
    /// not logged: it happens exactly when memory is short.
    pub command_retries: AtomicU64,
    /// Backing operations resubmitted after a transient error (EAGAIN, EINTR, ENOMEM,
    /// ECANCELED): such an error never becomes the IO's result unless it persists
    /// (`io::TRANSIENT_RETRIES`).
    pub backing_retries: AtomicU64,
    /// Time the daemon held reads / writes, from the fetch's completion to the commit's
    /// submission (ns): next to the device's own read/write ticks in `/sys/block/ublkbN/stat`,
    /// the split between the daemon and the kernel (issue 19).
    pub read_service_ns: AtomicU64,
    pub write_service_ns: AtomicU64,
    /// Requests in flight in this queue when a request was fetched (itself included), summed:
    /// divided by reads + writes + ..., the queue depth the daemon saw.
    pub depth_sum: AtomicU64,
    /// Time reads spent waiting for the backing (submission to completion, ns): the part of
    /// `read_service_ns` that is the disk's.
    pub backing_read_ns: AtomicU64,
    /// Requests the kernel marked as swap IO (`UBLK_IO_F_SWAP`: reclaim's writes and swap-ins):
    /// how much of a device's traffic is swap, and that a swap device is seen as one.
    pub swap_ios: AtomicU64,
    /// Time the queue thread polled its ring instead of sleeping (`--poll-usec`), ns, and how
    /// many of those polls a completion ended (the rest ended in a sleep): what the polling
    /// costs in CPU, and how often it pays.
    pub poll_ns: AtomicU64,
    pub poll_hits: AtomicU64,
    pub polls: AtomicU64,
    /// Pieces of a request alone on its queue cut in two, one half on a crypto worker and the
    /// other on the queue thread (`queue_crypto.rs`, `worth_splitting`): a lone large IO on
    /// two CPUs.
    pub split_pieces: AtomicU64,
    /// `--batch-io`: completions of the standing fetch that brought requests, and commit
    /// commands submitted: next to reads + writes + ..., how many requests each command served.
    pub batch_fetches: AtomicU64,
    pub batch_commits: AtomicU64,
}

#[derive(Debug, Clone, Copy, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct QueueSnapshot {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub discards: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub errors: u64,
    pub split_ios: u64,
    #[serde(default)]
    pub command_retries: u64,
    #[serde(default)]
    pub backing_retries: u64,
    #[serde(default)]
    pub read_service_ns: u64,
    #[serde(default)]
    pub write_service_ns: u64,
    #[serde(default)]
    pub depth_sum: u64,
    #[serde(default)]
    pub backing_read_ns: u64,
    #[serde(default)]
    pub swap_ios: u64,
    #[serde(default)]
    pub poll_ns: u64,
    #[serde(default)]
    pub poll_hits: u64,
    #[serde(default)]
    pub polls: u64,
    #[serde(default)]
    pub split_pieces: u64,
    #[serde(default)]
    pub batch_fetches: u64,
    #[serde(default)]
    pub batch_commits: u64,
}

impl QueueCounters {
    #[inline]
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Relaxed);
    }

    pub fn snapshot(&self) -> QueueSnapshot {
        QueueSnapshot {
            reads: self.reads.load(Relaxed),
            writes: self.writes.load(Relaxed),
            flushes: self.flushes.load(Relaxed),
            discards: self.discards.load(Relaxed),
            bytes_read: self.bytes_read.load(Relaxed),
            bytes_written: self.bytes_written.load(Relaxed),
            errors: self.errors.load(Relaxed),
            split_ios: self.split_ios.load(Relaxed),
            command_retries: self.command_retries.load(Relaxed),
            backing_retries: self.backing_retries.load(Relaxed),
            read_service_ns: self.read_service_ns.load(Relaxed),
            write_service_ns: self.write_service_ns.load(Relaxed),
            depth_sum: self.depth_sum.load(Relaxed),
            backing_read_ns: self.backing_read_ns.load(Relaxed),
            swap_ios: self.swap_ios.load(Relaxed),
            poll_ns: self.poll_ns.load(Relaxed),
            poll_hits: self.poll_hits.load(Relaxed),
            polls: self.polls.load(Relaxed),
            split_pieces: self.split_pieces.load(Relaxed),
            batch_fetches: self.batch_fetches.load(Relaxed),
            batch_commits: self.batch_commits.load(Relaxed),
        }
    }
}
