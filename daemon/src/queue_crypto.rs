//! Where a tag's AES runs: inline on the queue thread, on a crypto worker, or parked for the
//! end of the round and shared out in a batch ([`PieceBatch`]). The policy the queue threads
//! run, and the one `tests/no_alloc.rs` drives: only the wait for a worker differs (an io_uring
//! poll in the daemon, [`WorkerWait`]).
//!
//! A large piece of a request alone on its queue (a lone 1 MiB write at queue depth 1) is cut
//! in two ([`worth_splitting`]): a worker does the upper half while the queue thread does the
//! lower, in place (`ChunkHead`/`ChunkTail` of the pool), so one request uses two CPUs.
//!
//! Otherwise a piece goes to the crypto workers when [`worth_offloading`] says so — large, and something
//! could use the queue thread meanwhile: another request of this queue in flight, or
//! (`crypt_overlapped`) the next piece's backing read. Everything else runs inline: with
//! nothing else to do, a hand-off only adds two thread wake-ups to the request's latency, which
//! is what a swap-in — one faulting task, reads of 8–32 KiB — waits for. Small pieces of
//! writes at queue depth ≥ [`BATCH_MIN_IN_FLIGHT`] are batched (`batch.rs`); small reads only
//! when that many reads are in flight ([`worth_batching`]): parked until the end of a round of
//! writes, a swap-in's 4 KiB read waited for their encryption too (issue 19: a scattered
//! swap-in pass's verify 44.0 s -> 33 s), while never batching them halved fio's QD32 random
//! reads (1.01x -> 0.48x dm-crypt, the queue thread doing all the AES).

use std::cell::Cell;
use std::future::Future;

use ublk_crypt_crypto::SectorCipher;
use ublk_crypt_pool::Chunk;

use crate::batch::PieceBatch;
use crate::io::{InlineCrypto, SectorCrypto};
use crate::offload::CryptoWorkers;
use crate::stats::QueueCounters;

/// Pieces smaller than this are encrypted inline: for a 4 KiB IO the hand-off would cost more
/// than the AES.
pub const MIN_OFFLOAD_BYTES: usize = 32 << 10;

/// Whether a piece of `len` bytes goes to a worker. Only when the queue thread has something
/// else to do meanwhile: other requests of its queue in flight (`in_flight` counts the one
/// this piece belongs to), or the same request's next backing read (`overlapped`). A request
/// alone on its queue — a swap-in, one faulting task — is faster inline: the hand-off adds two
/// thread wake-ups and saves nothing. And when every worker is busy (`worker_idle` false), a
/// piece of at most [`MAX_INLINE_WHEN_BUSY`] runs inline too: queued behind the workers it
/// would wait, while the queue thread can be one more AES lane.
pub fn worth_offloading(len: usize, in_flight: u16, overlapped: bool, worker_idle: bool) -> bool {
    len >= MIN_OFFLOAD_BYTES
        && (overlapped || (in_flight > 1 && (worker_idle || len > MAX_INLINE_WHEN_BUSY)))
}

/// Largest piece the queue thread encrypts itself when every worker is busy. Larger ones would
/// hold it (and every other tag's completions) too long: 64 KiB is ~0.7 ms of AES under TCG.
pub const MAX_INLINE_WHEN_BUSY: usize = 64 << 10;

/// Pieces of at least this many bytes of a request alone on its queue are cut in two: a crypto
/// worker does the upper half while the queue thread does the lower ([`worth_splitting`]).
/// Why: a lone large request (`dd bs=1M oflag=direct`, fio at queue depth 1) had its AES on one
/// CPU at a time — inline, or whole on a worker while the queue thread only waited for the next
/// piece's backing IO — where dm-crypt's kcryptd decrypts the pieces of one bio on every CPU
/// (issue 21 item 4). Smaller pieces stay whole: the hand-off's two wake-ups cost about what
/// the second CPU saves: with pieces of >= 16 KiB split, the torture's sequential and reversed
/// verify passes (swap-in reads of ~28 KiB) took 30 / 23-24 s against 23-25 / 18-19 s
/// (session 17, tests/README.md, "Scattered swap-in").
pub const MIN_SPLIT_BYTES: usize = 128 << 10;

/// Where a split piece is cut: a multiple of every sector size, so the upper half starts on a
/// sector of its own (its IVs are those of a piece starting there).
const SPLIT_ALIGN: usize = 4096;

/// Whether a piece of `len` bytes is cut in two between the queue thread and a worker: large,
/// its request alone on the queue (with others in flight, a worker takes it whole and the queue
/// thread serves them), and a worker idle.
pub fn worth_splitting(len: usize, in_flight: u16, worker_idle: bool) -> bool {
    len >= MIN_SPLIT_BYTES && in_flight <= 1 && worker_idle
}

/// Queue depth from which a small piece of a write (under [`MIN_OFFLOAD_BYTES`]) waits for the
/// end of the queue thread's round to be shared with a worker (see [`PieceBatch`]). Below it the queue
/// thread is not the bottleneck and the AES runs inline at once.
pub const BATCH_MIN_IN_FLIGHT: u16 = 8;

/// How a task waits for a crypto worker to finish its slot's job.
#[allow(async_fn_in_trait)] // used only with static dispatch, on one thread
pub trait WorkerWait {
    /// Returns once the worker has written `slot`'s eventfd and the signal is consumed
    /// ([`CryptoWorkers::take_done`]): the chunk may then be taken back.
    async fn wait(&self, workers: &CryptoWorkers, slot: usize);
}

/// Requests of one queue being served right now, and how many of them are reads; its thread's
/// tasks share it.
#[derive(Default)]
pub struct InFlight {
    all: Cell<u16>,
    reads: Cell<u16>,
}

impl InFlight {
    /// Serves one request (`f`) counted as in flight (and as a read, if `read`).
    pub async fn serving<T>(&self, read: bool, f: impl Future<Output = T>) -> T {
        let bump = |c: &Cell<u16>, up: bool| c.set(if up { c.get() + 1 } else { c.get() - 1 });
        bump(&self.all, true);
        if read {
            bump(&self.reads, true);
        }
        let r = f.await;
        bump(&self.all, false);
        if read {
            bump(&self.reads, false);
        }
        r
    }

    pub fn get(&self) -> u16 {
        self.all.get()
    }

    pub fn reads(&self) -> u16 {
        self.reads.get()
    }
}

/// Whether a small piece waits for the end of the round to be shared out in a batch. Writes:
/// at queue depth >= [`BATCH_MIN_IN_FLIGHT`]. Reads: only when that many *reads* are in
/// flight — a deep queue of reads (fio's QD32 random reads) needs the second CPU as much as
/// writes do, but one swap-in among a round of swap-out writes (issue 19) must not wait for
/// their encryption.
pub fn worth_batching(len: usize, encrypt: bool, in_flight: &InFlight) -> bool {
    len < MIN_OFFLOAD_BYTES
        && if encrypt {
            in_flight.get() >= BATCH_MIN_IN_FLIGHT
        } else {
            in_flight.reads() >= BATCH_MIN_IN_FLIGHT
        }
}

/// One tag's AES.
pub struct QueueCrypto<'a, W: WorkerWait> {
    pub cipher: &'static SectorCipher,
    /// `None` with `--crypto-threads 0`: always inline.
    pub workers: Option<&'static CryptoWorkers>,
    /// This tag's job slot in `workers` (queue × depth + tag).
    pub slot: usize,
    pub tag: u16,
    pub in_flight: &'a InFlight,
    /// Small pieces shared with a worker at high queue depth.
    pub batch: &'a PieceBatch,
    /// The queue's counters (`split_pieces`).
    pub counters: &'a QueueCounters,
    pub wait: W,
}

impl<W: WorkerWait> SectorCrypto for QueueCrypto<'_, W> {
    async fn crypt(
        &self,
        chunk: Chunk<'static>,
        len: usize,
        sector: u64,
        encrypt: bool,
    ) -> (Chunk<'static>, bool) {
        self.offload_or_inline(false, chunk, len, sector, encrypt)
            .await
    }

    async fn crypt_overlapped(
        &self,
        chunk: Chunk<'static>,
        len: usize,
        sector: u64,
        encrypt: bool,
    ) -> (Chunk<'static>, bool) {
        self.offload_or_inline(true, chunk, len, sector, encrypt)
            .await
    }
}

impl<W: WorkerWait> QueueCrypto<'_, W> {
    async fn offload_or_inline(
        &self,
        overlapped: bool,
        chunk: Chunk<'static>,
        len: usize,
        sector: u64,
        encrypt: bool,
    ) -> (Chunk<'static>, bool) {
        if let Some(workers) = self.workers {
            if worth_batching(len, encrypt, self.in_flight) {
                // Parked until the end of the round, then done by the queue thread or in a
                // worker's batch.
                return self
                    .batch
                    .crypt(workers, self.tag, chunk, len, sector, encrypt, || {
                        self.wait.wait(workers, self.slot)
                    })
                    .await;
            }
        }
        if let Some(workers) = self
            .workers
            .filter(|w| worth_splitting(len, self.in_flight.get(), w.worker_idle()))
        {
            return self.split(workers, chunk, len, sector, encrypt).await;
        }
        let Some(workers) = self
            .workers
            .filter(|w| worth_offloading(len, self.in_flight.get(), overlapped, w.worker_idle()))
        else {
            return InlineCrypto(self.cipher)
                .crypt(chunk, len, sector, encrypt)
                .await;
        };
        workers.submit(self.slot, chunk, len, sector, encrypt);
        self.wait.wait(workers, self.slot).await;
        workers.finish(self.slot)
    }

    /// The upper half of `chunk[..len]` on a worker, the lower half here meanwhile, in place
    /// (the chunk is split, not copied: `ChunkHead`/`ChunkTail`).
    async fn split(
        &self,
        workers: &CryptoWorkers,
        chunk: Chunk<'static>,
        len: usize,
        sector: u64,
        encrypt: bool,
    ) -> (Chunk<'static>, bool) {
        QueueCounters::add(&self.counters.split_pieces, 1);
        let at = (len / 2) & !(SPLIT_ALIGN - 1);
        let (mut head, tail) = chunk.split_at(at);
        workers.submit_tail(
            self.slot,
            tail,
            len - at,
            sector + (at >> 9) as u64,
            encrypt,
        );
        let head_ok = InlineCrypto::run(self.cipher, &mut head, sector, encrypt);
        self.wait.wait(workers, self.slot).await;
        let (tail, tail_ok) = workers.finish_tail(self.slot);
        (head.join(tail), head_ok && tail_ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_batched_only_among_many_reads() {
        let f = InFlight::default();
        let mut parked = vec![];
        // One read and seven writes in flight: the read is not batched, the writes are.
        for i in 0..8 {
            let read = i == 0;
            parked.push(Box::pin(f.serving(read, std::future::pending::<()>())));
        }
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        for p in parked.iter_mut() {
            let _ = p.as_mut().poll(&mut cx);
        }
        assert_eq!((f.get(), f.reads()), (8, 1));
        assert!(worth_batching(4096, true, &f), "writes at depth 8");
        assert!(
            !worth_batching(4096, false, &f),
            "a read among writes: inline"
        );
        assert!(
            !worth_batching(MIN_OFFLOAD_BYTES, true, &f),
            "large: not a batch"
        );
        // Eight reads in flight: reads are batched too.
        let mut reads = vec![];
        for _ in 0..7 {
            reads.push(Box::pin(f.serving(true, std::future::pending::<()>())));
        }
        for p in reads.iter_mut() {
            let _ = p.as_mut().poll(&mut cx);
        }
        assert_eq!(f.reads(), 8);
        assert!(worth_batching(4096, false, &f), "a deep queue of reads");
        drop(reads);
        drop(parked);
    }

    #[test]
    fn only_large_pieces_of_a_lone_request_are_split() {
        assert!(worth_splitting(MIN_SPLIT_BYTES, 1, true));
        assert!(worth_splitting(256 << 10, 0, true));
        assert!(!worth_splitting(MIN_SPLIT_BYTES - 4096, 1, true), "small");
        assert!(!worth_splitting(256 << 10, 2, true), "others in flight");
        assert!(!worth_splitting(256 << 10, 1, false), "no worker idle");
    }

    #[test]
    fn only_large_pieces_with_other_work_meanwhile_are_offloaded() {
        let (big, huge) = (MIN_OFFLOAD_BYTES, MAX_INLINE_WHEN_BUSY + 4096);
        assert!(
            !worth_offloading(4096, 64, true, true),
            "small: always inline"
        );
        assert!(!worth_offloading(big - 512, 2, true, true));
        assert!(!worth_offloading(big, 1, false, true), "alone: inline");
        assert!(
            !worth_offloading(256 << 10, 1, false, true),
            "alone: inline"
        );
        assert!(worth_offloading(big, 2, false, true), "others in flight");
        assert!(
            worth_offloading(256 << 10, 1, true, false),
            "next piece being read"
        );
        assert!(
            !worth_offloading(big, 8, false, false),
            "workers busy: inline"
        );
        assert!(!worth_offloading(MAX_INLINE_WHEN_BUSY, 8, false, false));
        assert!(
            worth_offloading(huge, 8, false, false),
            "too big to hold the queue"
        );
    }
}
