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
//! Small pieces (a 4 KiB request) are not worth a hand-off each, but at high queue depth they
//! keep one queue thread busy while the other CPUs idle: [`PieceBatch`] shares them out a
//! batch at a time, half to a worker in one job chained through the slots (`Job::next`).
//!
//! Workers run with the IO-thread protections (PR_SET_IO_FLUSHER, pre-faulted small stacks,
//! covered by mlockall), and hold no chunk of their own: the forward-progress rule of the pool
//! is untouched (each IO still holds one chunk, which is either with it or being worked on).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::task::{Poll, Waker};

use anyhow::{Context, Result};
use nix::sys::eventfd::{EfdFlags, EventFd};
use ublk_crypt_crypto::SectorCipher;
use ublk_crypt_pool::Chunk;

use crate::hardening::{self, Protections};

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

struct Job {
    chunk: Chunk<'static>,
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
            let buf = &mut j.chunk[..j.len];
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

    /// Puts a job in `slot` without handing it to anyone yet: [`PieceBatch`] decides at the end
    /// of the queue thread's round whether a worker or the queue thread does it.
    pub fn park(&self, slot: usize, chunk: Chunk<'static>, len: usize, sector: u64, encrypt: bool) {
        *self.slots[slot].job.lock().unwrap() = Some(Job {
            chunk,
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
        let job = self.slots[slot]
            .job
            .lock()
            .unwrap()
            .take()
            .expect("finish() after the worker signalled completion");
        (job.chunk, job.ok)
    }
}

/// Queue depth from which a small piece (under [`MIN_OFFLOAD_BYTES`]) waits for the end of the
/// queue thread's round to be shared with a worker (see [`PieceBatch`]). Below it the queue
/// thread is not the bottleneck and the AES runs inline at once.
pub const BATCH_MIN_IN_FLIGHT: u16 = 8;

/// Where a parked piece stands ([`PieceBatch`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PieceState {
    /// Not parked.
    Idle,
    /// Waiting for the end of the round.
    Parked,
    /// Done (by the queue thread, or by a worker in a batch the leader has collected).
    Done,
    /// First of a worker's batch: waits for the slot's eventfd, then releases the followers.
    Leader,
    /// In a worker's batch behind a leader: done when the leader says so.
    Follower,
}

/// Small pieces of one queue shared between its thread and a worker, a batch at a time.
///
/// Why: at queue depth 32, 4 KiB requests keep one queue thread busy — 70 % of it AES — while
/// the other CPUs idle, where dm-crypt's kcryptd runs the AES on every CPU. Handing a 4 KiB
/// piece to a worker alone costs about what its AES does (a wake-up, an eventfd round trip).
/// So a small piece, when enough requests are in flight ([`BATCH_MIN_IN_FLIGHT`]), is parked in
/// its slot; when the round of completions has been served, [`PieceBatch::flush`] gives half of
/// the parked pieces to an idle worker as one batch (one wake-up, one completion) and does the
/// other half on the queue thread meanwhile. One thread only (the queue's): plain cells,
/// preallocated for the queue depth, nothing allocated.
pub struct PieceBatch {
    /// Tags parked this round, in order; capacity = depth, each tag at most once.
    parked: RefCell<Vec<u16>>,
    state: Box<[Cell<PieceState>]>,
    /// The next tag of a worker batch, for the leader to release.
    next: Box<[Cell<Option<u16>>]>,
    wakers: Box<[RefCell<Option<Waker>>]>,
    /// Slot of tag 0 of this queue in [`CryptoWorkers`].
    slot_base: usize,
}

impl PieceBatch {
    pub fn new(depth: usize, slot_base: usize) -> Self {
        PieceBatch {
            parked: RefCell::new(Vec::with_capacity(depth)),
            state: (0..depth).map(|_| Cell::new(PieceState::Idle)).collect(),
            next: (0..depth).map(|_| Cell::new(None)).collect(),
            wakers: (0..depth).map(|_| RefCell::new(None)).collect(),
            slot_base,
        }
    }

    /// A small piece's whole trip: parked in `tag`'s slot, then done by the queue thread at the
    /// end of the round or in a worker's batch. `wait_worker` waits for the slot's eventfd (the
    /// daemon polls it on the queue's io_uring); only a batch's leader calls it.
    #[allow(clippy::too_many_arguments)]
    pub async fn crypt<W: std::future::Future<Output = ()>>(
        &self,
        workers: &CryptoWorkers,
        tag: u16,
        chunk: Chunk<'static>,
        len: usize,
        sector: u64,
        encrypt: bool,
        wait_worker: impl FnOnce() -> W,
    ) -> (Chunk<'static>, bool) {
        let slot = self.slot_base + usize::from(tag);
        workers.park(slot, chunk, len, sector, encrypt);
        self.park(tag);
        match self.role(tag).await {
            PieceState::Leader => {
                wait_worker().await;
                self.release_followers(tag);
            }
            PieceState::Follower => self.released(tag).await,
            _ => {}
        }
        self.reset(tag);
        workers.finish(slot)
    }

    /// Parks `tag`'s piece, already put in its slot with [`CryptoWorkers::park`].
    fn park(&self, tag: u16) {
        self.state[usize::from(tag)].set(PieceState::Parked);
        self.parked.borrow_mut().push(tag);
    }

    /// Waits until the end of the round decides; then the role: `Done`, `Leader` or `Follower`.
    async fn role(&self, tag: u16) -> PieceState {
        self.wait_while(tag, PieceState::Parked).await
    }

    /// A follower waits for its leader's release.
    async fn released(&self, tag: u16) {
        self.wait_while(tag, PieceState::Follower).await;
    }

    async fn wait_while(&self, tag: u16, state: PieceState) -> PieceState {
        let t = usize::from(tag);
        std::future::poll_fn(|cx| {
            let s = self.state[t].get();
            if s == state {
                let mut w = self.wakers[t].borrow_mut();
                if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    *w = Some(cx.waker().clone());
                }
                Poll::Pending
            } else {
                Poll::Ready(s)
            }
        })
        .await
    }

    /// The leader, its batch done: marks the followers done and wakes them.
    fn release_followers(&self, leader: u16) {
        let mut next = self.next[usize::from(leader)].take();
        while let Some(tag) = next {
            next = self.next[usize::from(tag)].take();
            self.set(tag, PieceState::Done);
        }
    }

    /// Back to idle, once the piece's chunk has been collected.
    fn reset(&self, tag: u16) {
        self.state[usize::from(tag)].set(PieceState::Idle);
    }

    fn set(&self, tag: u16, state: PieceState) {
        self.state[usize::from(tag)].set(state);
        if let Some(w) = self.wakers[usize::from(tag)].borrow().as_ref() {
            w.wake_by_ref();
        }
    }

    /// End of a round: the later half of the parked pieces goes to an idle worker as one batch
    /// (first, so it runs meanwhile), the rest is done here. Returns whether anything was
    /// parked (woken tasks then need polling).
    pub fn flush(&self, workers: &CryptoWorkers) -> bool {
        let mut parked = self.parked.borrow_mut();
        let n = parked.len();
        if n == 0 {
            return false;
        }
        let shared = if n >= 2 && workers.worker_idle() {
            n / 2
        } else {
            0
        };
        let (here, there) = parked.split_at(n - shared);
        if let Some(&leader) = there.first() {
            for pair in there.windows(2) {
                self.next[usize::from(pair[0])].set(Some(pair[1]));
                self.state[usize::from(pair[1])].set(PieceState::Follower);
            }
            workers.submit_batch(there.iter().map(|&t| self.slot_base + usize::from(t)));
            self.set(leader, PieceState::Leader);
        }
        for &tag in here {
            workers.run_parked(self.slot_base + usize::from(tag));
            self.set(tag, PieceState::Done);
        }
        parked.clear();
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn setup(
        threads: usize,
    ) -> (
        &'static SectorCipher,
        &'static CryptoWorkers,
        &'static ublk_crypt_pool::ReservePool,
    ) {
        use ublk_crypt_crypto::{CipherSpec, Key, SectorLayout};
        let key: Vec<u8> = (1..=64u8).collect();
        let spec: CipherSpec = "aes-xts-plain64".parse().unwrap();
        let cipher: &'static SectorCipher = Box::leak(Box::new(
            SectorCipher::new(spec, &Key::from_bytes(&key), SectorLayout::default()).unwrap(),
        ));
        let workers = CryptoWorkers::start(
            cipher,
            8,
            threads,
            hardening::Protections { enabled: false },
            || {},
        )
        .unwrap();
        let pool = Box::leak(Box::new(
            ublk_crypt_pool::ReservePool::new(ublk_crypt_pool::PoolConfig {
                budget_bytes: 8 * 8192,
                chunk_bytes: 8192,
                queues: 1,
                reserve_per_queue: 1,
                lock: false,
            })
            .unwrap(),
        ));
        (cipher, workers, pool)
    }

    /// Parks `n` 4 KiB pieces (tag t holds bytes t, sector 8t); what each should become.
    fn park_pieces(
        n: u16,
        cipher: &SectorCipher,
        workers: &CryptoWorkers,
        pool: &'static ublk_crypt_pool::ReservePool,
        batch: &PieceBatch,
    ) -> Vec<Vec<u8>> {
        (0..n)
            .map(|t| {
                let mut chunk = pool.try_acquire(0).unwrap();
                chunk[..4096].fill(t as u8);
                let mut want = vec![t as u8; 4096];
                cipher.encrypt(u64::from(t) * 8, &mut want).unwrap();
                workers.park(usize::from(t), chunk, 4096, u64::from(t) * 8, true);
                batch.park(t);
                want
            })
            .collect()
    }

    /// The later half of a round's parked pieces goes to the idle worker as one batch, with one
    /// completion (the leader's eventfd); the rest is done on the calling thread; every piece
    /// comes back encrypted with its own sector number.
    #[test]
    fn a_round_of_small_pieces_is_shared_with_a_worker() {
        let (cipher, workers, pool) = setup(1);
        let batch = PieceBatch::new(8, 0);
        let want = park_pieces(6, cipher, workers, pool, &batch);
        assert!(batch.flush(workers));
        assert!(!batch.flush(workers), "nothing parked any more");
        let states: Vec<_> = (0..6).map(|t| batch.state[t].get()).collect();
        use PieceState::*;
        assert_eq!(states, [Done, Done, Done, Leader, Follower, Follower]);
        // One completion, on the leader's slot only.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !workers.take_done(3) {
            assert!(
                std::time::Instant::now() < deadline,
                "worker never finished"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(!workers.take_done(4) && !workers.take_done(5));
        batch.release_followers(3);
        assert_eq!(batch.state[4].get(), Done);
        assert_eq!(batch.state[5].get(), Done);
        for (t, want) in want.iter().enumerate() {
            let (chunk, ok) = workers.finish(t);
            assert!(ok);
            assert_eq!(&chunk[..4096], &want[..], "piece {t}");
            batch.reset(t as u16);
        }
    }

    /// With no idle worker everything runs on the calling thread at once.
    #[test]
    fn without_an_idle_worker_the_round_runs_inline() {
        let (cipher, workers, pool) = setup(0);
        let batch = PieceBatch::new(8, 0);
        let want = park_pieces(4, cipher, workers, pool, &batch);
        assert!(batch.flush(workers));
        for (t, want) in want.iter().enumerate() {
            assert_eq!(batch.state[t].get(), PieceState::Done);
            let (chunk, ok) = workers.finish(t);
            assert!(ok);
            assert_eq!(&chunk[..4096], &want[..]);
        }
    }

    /// `role` waits while parked and wakes when the round decides.
    #[test]
    fn role_waits_for_the_round() {
        use std::future::Future;
        use std::task::Context;
        let (_, workers, pool) = setup(0);
        let batch = PieceBatch::new(8, 0);
        workers.park(2, pool.try_acquire(0).unwrap(), 512, 0, false);
        batch.park(2);
        let mut fut = std::pin::pin!(batch.role(2));
        let mut cx = Context::from_waker(Waker::noop());
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        batch.flush(workers);
        assert_eq!(fut.as_mut().poll(&mut cx), Poll::Ready(PieceState::Done));
    }
}
