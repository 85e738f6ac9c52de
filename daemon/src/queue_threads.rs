//! The queue threads, made before the device exists and handed it once it does.
//!
//! Everything a queue thread needs that allocates or may block in reclaim happens here, up
//! front: the thread and its stack (pre-faulted, locked under `MCL_FUTURE`), its io_uring (made
//! and warmed), `PR_SET_IO_FLUSHER`. What is left for the moment the device exists is opening
//! the queue on that ring and fetching. For a new device this is just order; for a standby
//! taking over a device whose daemon died (`standby.rs`), it is the difference between
//! recovering with the memory it already holds and needing fresh memory when there is none.
//! This replaces libublk's `run_target`, which spawns the queue threads on the spot.

use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{bail, Context, Result};
use io_uring::{opcode, squeue, types, IoUring};
use libublk::ctrl::UblkCtrl;
use libublk::io::UblkDev;
use std::os::fd::AsRawFd;

use crate::config::DeviceConfig;
use crate::context::DeviceContext;
use crate::hardening::{self, Protections};
use crate::queue;
use crate::ublk::{CQ_ENTRIES_PER_TAG, OPS_PER_TAG};
use crate::ublk_batch::BatchCommands;

/// What a waiting queue thread is handed: the device, and what the queue threads share.
struct Start {
    dev: Arc<UblkDev>,
    ctx: &'static DeviceContext,
}

/// One waiting queue thread.
struct Waiting {
    qid: u16,
    tid: i32,
    start: mpsc::SyncSender<Start>,
    handle: JoinHandle<()>,
}

/// The queue threads of one device, waiting for it to exist.
pub struct QueueThreads {
    threads: Vec<Waiting>,
}

impl QueueThreads {
    /// `--threads-per-queue` threads per queue (thread `t` serves its share of the queue's
    /// tags: libublk's partition), each with its ring made and warmed for `--depth` tags,
    /// waiting. With `--batch-io`, each also makes its batched commands' buffers.
    pub fn spawn(config: &DeviceConfig, protections: Protections) -> Result<QueueThreads> {
        let (queues, per_queue) = (config.queues, config.threads_per_queue);
        let (depth, batch_io) = (config.depth, config.batch_io);
        let mut threads = Vec::with_capacity(usize::from(queues) * usize::from(per_queue));
        for (qid, t) in (0..queues).flat_map(|q| (0..per_queue).map(move |t| (q, t))) {
            let (start, started) = mpsc::sync_channel::<Start>(1);
            let (ready_tx, ready) = mpsc::sync_channel::<Result<i32, String>>(1);
            let handle = std::thread::Builder::new()
                .name(match t {
                    0 => format!("ublk-crypt-q{qid}"),
                    t => format!("ublk-crypt-q{qid}.{t}"),
                })
                .stack_size(hardening::THREAD_STACK_BYTES)
                .spawn(move || {
                    let made = hardening::protect_io_thread(protections)
                        .map_err(|e| format!("{e:#}"))
                        .and_then(|()| make_ring(depth).map_err(|e| format!("io_uring: {e}")))
                        .and_then(|()| match batch_io {
                            true => BatchCommands::new(qid, depth)
                                .map(Some)
                                .map_err(|e| format!("batched IO commands: {e}")),
                            false => Ok(None),
                        });
                    let tid = nix::unistd::gettid().as_raw();
                    let premade = match made {
                        Ok(premade) => premade,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(tid));
                    // Dropped without a start: the device never came (or this process is a
                    // standby that was not needed); the thread just ends.
                    if let Ok(s) = started.recv() {
                        // Read by `UblkQueue::new` to pick this thread's tags.
                        libublk::io::set_io_thread_idx(t);
                        queue::serve_queue(qid, &s.dev, s.ctx, premade);
                    }
                })
                .context("cannot spawn a queue thread")?;
            let tid = match ready.recv() {
                Ok(Ok(tid)) => tid,
                Ok(Err(e)) => bail!("queue {qid}: {e}"),
                Err(_) => bail!("queue {qid}: the thread ended during set-up"),
            };
            threads.push(Waiting {
                qid,
                tid,
                start,
                handle,
            });
        }
        Ok(QueueThreads { threads })
    }

    /// The threads' tids, in queue order (a queue's threads in a row).
    pub fn tids(&self) -> impl Iterator<Item = i32> + '_ {
        self.threads.iter().map(|t| t.tid)
    }

    /// The device exists: tells libublk each thread's tid (its affinity and JSON), hands every
    /// thread the device, and returns the threads to join once they end.
    pub fn start(
        self,
        ctrl: &UblkCtrl,
        dev: &Arc<UblkDev>,
        ctx: &'static DeviceContext,
    ) -> Vec<JoinHandle<()>> {
        let mut handles = Vec::with_capacity(self.threads.len());
        for t in self.threads {
            let qid = t.qid;
            ctrl.set_thread_affinity(qid, t.tid);
            if let Err(e) = ctrl.configure_queue(dev, qid, t.tid) {
                tracing::warn!("queue {qid}: libublk configure_queue: {e}");
            }
            let _ = t.start.send(Start {
                dev: dev.clone(),
                ctx,
            });
            handles.push(t.handle);
        }
        handles
    }
}

/// The calling thread's queue ring, as libublk would make it on `UblkQueue::new` (which finds
/// it made and uses it), then warmed.
fn make_ring(depth: u16) -> std::io::Result<()> {
    let sq = u32::from(depth.saturating_mul(OPS_PER_TAG));
    let cq = u32::from(depth.saturating_mul(CQ_ENTRIES_PER_TAG));
    libublk::io::ublk_init_task_ring(|cell| {
        let ring = IoUring::<squeue::Entry>::builder()
            .setup_cqsize(cq)
            .setup_coop_taskrun()
            .build(sq)
            .map_err(libublk::UblkError::IOError)?;
        cell.set(std::cell::RefCell::new(ring))
            .map_err(|_| libublk::UblkError::OtherError(-libc::EEXIST))
    })
    .map_err(|e| std::io::Error::other(e.to_string()))?;
    warm_queue_ring(usize::from(depth) * usize::from(OPS_PER_TAG))
}

/// Makes the queue ring's kernel side allocate, now, what its busiest moment will need: one
/// request and its read/write state for each of `ops` operations in flight at once. io_uring
/// keeps these in per-ring caches when they complete (request structs without a limit,
/// read/write state up to 128), so the first burst of swap-out — the moment memory runs
/// out — takes them from the caches instead of asking the allocator, which for an IO flusher in
/// a machine without free memory may not answer. The warm-up: `ops` reads of one semaphore
/// eventfd, each of which blocks (arming a poll), then one write that completes them all.
/// Runs on the queue thread as soon as its ring exists, long before the device does.
fn warm_queue_ring(ops: usize) -> std::io::Result<()> {
    use nix::sys::eventfd::{EfdFlags, EventFd};
    const WARM: u64 = 0x5741_524d_0000_0000; // "WARM": no libublk user_data has these bits
    let efd = EventFd::from_value_and_flags(0, EfdFlags::EFD_SEMAPHORE | EfdFlags::EFD_CLOEXEC)?;
    let mut reads = WarmReads::new(efd, ops);
    libublk::io::with_task_io_ring_mut(|ring: &mut IoUring| -> std::io::Result<()> {
        if !ring.completion().is_empty() {
            // Someone else's completions: not ours to consume. Skip the warm-up.
            reads.all_reaped();
            return Ok(());
        }
        let fd = types::Fd(reads.efd().as_raw_fd());
        let mut pushed = 0;
        while pushed < ops {
            {
                let mut sq = ring.submission();
                while pushed < ops && !sq.is_full() {
                    let sqe = opcode::Read::new(fd, reads.buf(pushed), 8)
                        .build()
                        .user_data(WARM | pushed as u64);
                    // SAFETY: the 8-byte buffer and the eventfd outlive the read: `WarmReads`
                    // frees them only once every read has completed, and leaks them otherwise.
                    unsafe { sq.push(&sqe) }.expect("checked not full");
                    pushed += 1;
                }
            }
            ring.submit()?;
        }
        reads.efd().write(ops as u64)?;
        let mut reaped = 0;
        while reaped < ops {
            ring.submit_and_wait(1)?;
            for cqe in ring.completion() {
                debug_assert_eq!(cqe.user_data() & !0xffff_ffff, WARM);
                if cqe.result() < 0 {
                    tracing::debug!("ring warm-up read: errno {}", -cqe.result());
                }
                reaped += 1;
            }
        }
        reads.all_reaped();
        Ok(())
    })
}

/// The warm-up reads' buffers and eventfd. Reads submitted to the ring may complete, and write
/// to their buffer, at any time until they are reaped; so these are freed only after
/// [`all_reaped`](Self::all_reaped), and leaked on any early return (an error half way through
/// the warm-up), never freed under a read the kernel still holds.
struct WarmReads {
    efd: Option<nix::sys::eventfd::EventFd>,
    bufs: Vec<[u8; 8]>,
    reaped: bool,
}

impl WarmReads {
    fn new(efd: nix::sys::eventfd::EventFd, ops: usize) -> Self {
        Self {
            efd: Some(efd),
            bufs: vec![[0u8; 8]; ops],
            reaped: false,
        }
    }

    fn efd(&self) -> &nix::sys::eventfd::EventFd {
        self.efd.as_ref().expect("present until dropped")
    }

    fn buf(&mut self, i: usize) -> *mut u8 {
        self.bufs[i].as_mut_ptr()
    }

    fn all_reaped(&mut self) {
        self.reaped = true;
    }
}

impl Drop for WarmReads {
    fn drop(&mut self) {
        if !self.reaped {
            // Reads may still be in flight: their targets must stay valid for ever.
            std::mem::forget(std::mem::take(&mut self.bufs));
            std::mem::forget(self.efd.take());
        }
    }
}
