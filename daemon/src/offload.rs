//! Crypto workers: encryption of large IO pieces on every CPU, not just the queue's thread.
//!
//! Why: blk-mq feeds a ublk queue from the CPUs mapped to it, and a single submitter (one fio
//! job, the swap-out path of one task) lands on one queue, whose one thread would then do all
//! the AES for it. dm-crypt spreads that work over an unbound workqueue (kcryptd); this is the
//! same idea in userspace: the queue thread moves data and drives IO, `threads` workers
//! encrypt.
//!
//! How, without allocating: every (queue, tag) owns one [`JobSlot`] made at start-up, with its
//! own eventfd. The tag's task moves its pool chunk into the slot and pushes the slot's index
//! onto a work list whose capacity covers every slot (so the push never reallocates); a worker
//! takes it, encrypts or decrypts in place, puts the chunk back and writes the eventfd. The
//! task waits with a poll of that eventfd on the queue's io_uring, so the queue thread keeps
//! serving other tags meanwhile and wakes exactly when the job is done. A poll, not a read: a
//! read that has to wait makes io_uring allocate (its async poll entry, `GFP_ATOMIC`) and, if
//! that fails, hand the read to an io-wq thread it may have to create — allocations at the very
//! moment swap-out has used up memory. A poll waits in the request itself. Chunks cross threads by
//! move (they are `Send`), so no memory is shared unsafely.
//!
//! A job may also be the tail of a split chunk (`submit_tail`): the queue thread encrypts the
//! head meanwhile, so a lone large request gets two CPUs without copying.
//!
//! Small pieces (a 4 KiB request) are not worth a hand-off each, but at high queue depth they
//! keep one queue thread busy while the other CPUs idle: `batch.rs` shares them out a batch at
//! a time, half to a worker in one job chained through the slots (`Job::next`). Which pieces
//! go where is the queue's policy (`queue_crypto.rs`).
//!
//! Workers run with the IO-thread protections (PR_SET_IO_FLUSHER, pre-faulted small stacks,
//! covered by mlockall), and hold no chunk of their own: the forward-progress rule of the pool
//! is untouched (each IO still holds one chunk, which is either with it or being worked on).

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};

use anyhow::{Context, Result};
use nix::sys::eventfd::{EfdFlags, EventFd};
use ublk_crypt_crypto::SectorCipher;
use ublk_crypt_pool::{Chunk, ChunkTail};

use crate::hardening::{self, Protections};

/// What a job works on: a whole chunk, or the tail of one whose head the queue thread does
/// meanwhile ([`CryptoWorkers::submit_tail`]).
enum JobBuf {
    Whole(Chunk<'static>),
    Tail(ChunkTail<'static>),
}

impl JobBuf {
    fn bytes(&mut self) -> &mut [u8] {
        match self {
            JobBuf::Whole(c) => c,
            JobBuf::Tail(t) => t,
        }
    }
}

struct Job {
    buf: JobBuf,
    len: usize,
    sector: u64,
    encrypt: bool,
    ok: bool,
    /// The next slot of the same batch ([`CryptoWorkers::submit_batch`]): the worker does it
    /// before signalling, so a batch costs one wake-up and one completion, not one per piece.
    next: Option<usize>,
}

/// Slots whose job (or batch) waits for a worker, and how many workers sleep waiting for one.
struct WorkList {
    queue: VecDeque<usize>,
    sleeping: usize,
}

struct JobSlot {
    job: Mutex<Option<Job>>,
    done: EventFd,
}

pub struct CryptoWorkers {
    cipher: &'static SectorCipher,
    slots: Box<[JobSlot]>,
    work: Mutex<WorkList>,
    ready: Condvar,
    /// Jobs submitted and not yet finished by a worker.
    outstanding: AtomicUsize,
    threads: usize,
}

impl CryptoWorkers {
    /// `slots` = queues × depth; starts `threads` workers that live as long as the process.
    /// `on_thread_start` runs first on each worker (tests use it to watch their allocations).
    pub fn start(
        cipher: &'static SectorCipher,
        slots: usize,
        threads: usize,
        protections: Protections,
        on_thread_start: fn(),
    ) -> Result<&'static CryptoWorkers> {
        let slots = (0..slots)
            .map(|_| {
                Ok(JobSlot {
                    job: Mutex::new(None),
                    done: EventFd::from_value_and_flags(
                        0,
                        EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK,
                    )
                    .context("eventfd")?,
                })
            })
            .collect::<Result<Box<[_]>>>()?;
        let n = slots.len();
        let workers: &'static CryptoWorkers = Box::leak(Box::new(CryptoWorkers {
            cipher,
            slots,
            work: Mutex::new(WorkList {
                queue: VecDeque::with_capacity(n),
                sleeping: 0,
            }),
            ready: Condvar::new(),
            outstanding: AtomicUsize::new(0),
            threads,
        }));
        for i in 0..threads {
            std::thread::Builder::new()
                .name(format!("ublk-crypt-aes{i}"))
                .stack_size(hardening::THREAD_STACK_BYTES)
                .spawn(move || {
                    on_thread_start();
                    if let Err(e) = hardening::protect_io_thread(protections) {
                        tracing::error!("crypto worker {i}: {e:#}");
                    }
                    workers.serve();
                })
                .context("cannot spawn a crypto worker")?;
        }
        Ok(workers)
    }

    fn serve(&self) {
        loop {
            let slot = {
                let mut work = self.work.lock().unwrap();
                loop {
                    if let Some(s) = work.queue.pop_front() {
                        break s;
                    }
                    work.sleeping += 1;
                    work = self.ready.wait(work).unwrap();
                    work.sleeping -= 1;
                }
            };
            let mut next = Some(slot);
            while let Some(i) = next {
                next = self.run_slot(i);
            }
            self.outstanding.fetch_sub(1, Ordering::Relaxed);
            // The counter cannot overflow (one job per slot at a time), so this cannot fail.
            let _ = self.slots[slot].done.write(1);
        }
    }

    /// Encrypts or decrypts the job in `slot` in place; returns the next slot of its batch.
    fn run_slot(&self, slot: usize) -> Option<usize> {
        let s = &self.slots[slot];
        let mut job = s.job.lock().unwrap().take();
        let next = job.as_ref().and_then(|j| j.next);
        if let Some(j) = job.as_mut() {
            let buf = &mut j.buf.bytes()[..j.len];
            j.ok = if j.encrypt {
                self.cipher.encrypt(j.sector, buf).is_ok()
            } else {
                self.cipher.decrypt(j.sector, buf).is_ok()
            };
        }
        *s.job.lock().unwrap() = job;
        next
    }

    /// Hands a job to the workers; the caller then waits for `done_fd(slot)` to be readable,
    /// consumes the signal with [`CryptoWorkers::take_done`] and collects the chunk with
    /// [`CryptoWorkers::finish`].
    pub fn submit(
        &self,
        slot: usize,
        chunk: Chunk<'static>,
        len: usize,
        sector: u64,
        encrypt: bool,
    ) {
        self.park(slot, chunk, len, sector, encrypt);
        self.submit_batch([slot]);
    }

    /// Like [`CryptoWorkers::submit`], for the tail of a split chunk (its first `len` bytes,
    /// sector numbers from `sector`); collect it with [`CryptoWorkers::finish_tail`].
    pub fn submit_tail(
        &self,
        slot: usize,
        tail: ChunkTail<'static>,
        len: usize,
        sector: u64,
        encrypt: bool,
    ) {
        self.park_buf(slot, JobBuf::Tail(tail), len, sector, encrypt);
        self.submit_batch([slot]);
    }

    /// Puts a job in `slot` without handing it to anyone yet: [`PieceBatch`](crate::batch::PieceBatch) decides at the end
    /// of the queue thread's round whether a worker or the queue thread does it.
    pub fn park(&self, slot: usize, chunk: Chunk<'static>, len: usize, sector: u64, encrypt: bool) {
        self.park_buf(slot, JobBuf::Whole(chunk), len, sector, encrypt);
    }

    fn park_buf(&self, slot: usize, buf: JobBuf, len: usize, sector: u64, encrypt: bool) {
        *self.slots[slot].job.lock().unwrap() = Some(Job {
            buf,
            len,
            sector,
            encrypt,
            ok: false,
            next: None,
        });
    }

    /// Hands parked jobs to one worker as one batch, done in order; the first slot's eventfd
    /// is written when all are done (the others' are not touched).
    pub fn submit_batch(&self, slots: impl IntoIterator<Item = usize>) {
        let mut slots = slots.into_iter();
        let Some(first) = slots.next() else {
            return;
        };
        let mut last = first;
        for slot in slots {
            if let Some(j) = self.slots[last].job.lock().unwrap().as_mut() {
                j.next = Some(slot);
            }
            last = slot;
        }
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        let wake = {
            let mut work = self.work.lock().unwrap();
            work.queue.push_back(first);
            work.sleeping > 0
        };
        // std's notify_one makes a futex syscall even with no waiter; a busy worker finds the
        // job when it looks at the list next.
        if wake {
            self.ready.notify_one();
        }
    }

    /// Does a parked job on the calling thread (collect it with [`CryptoWorkers::finish`]).
    pub fn run_parked(&self, slot: usize) {
        self.run_slot(slot);
    }

    /// Whether some worker has nothing to do right now.
    pub fn worker_idle(&self) -> bool {
        self.outstanding.load(Ordering::Relaxed) < self.threads
    }

    /// Whether any worker has a job (of any queue): the AES, not a wake-up, is then what the
    /// queue threads wait for, and a queue thread that polls takes a CPU from it.
    pub fn busy(&self) -> bool {
        self.outstanding.load(Ordering::Relaxed) > 0
    }

    /// The eventfd a worker writes when `slot`'s job is done.
    pub fn done_fd(&self, slot: usize) -> RawFd {
        self.slots[slot].done.as_raw_fd()
    }

    /// Consumes `slot`'s completion signal: true if the worker has written it (the eventfd is
    /// non-blocking, so a spurious wake-up returns false at once instead of blocking the queue).
    pub fn take_done(&self, slot: usize) -> bool {
        self.slots[slot].done.read().is_ok()
    }

    /// Takes the chunk back after the eventfd fired; `ok` is the cipher's verdict.
    pub fn finish(&self, slot: usize) -> (Chunk<'static>, bool) {
        match self.take_job(slot) {
            (JobBuf::Whole(c), ok) => (c, ok),
            (JobBuf::Tail(_), _) => panic!("finish() of a split chunk's tail"),
        }
    }

    /// Takes the tail back after the eventfd fired ([`CryptoWorkers::submit_tail`]).
    pub fn finish_tail(&self, slot: usize) -> (ChunkTail<'static>, bool) {
        match self.take_job(slot) {
            (JobBuf::Tail(t), ok) => (t, ok),
            (JobBuf::Whole(_), _) => panic!("finish_tail() of a whole chunk"),
        }
    }

    fn take_job(&self, slot: usize) -> (JobBuf, bool) {
        let job = self.slots[slot]
            .job
            .lock()
            .unwrap()
            .take()
            .expect("finish() after the worker signalled completion");
        (job.buf, job.ok)
    }
}
