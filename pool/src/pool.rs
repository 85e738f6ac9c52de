//! The pool proper: accounting, the free list, guards, and the waiting future.
//!
//! All mutable state lives in one [`State`] behind one `std::sync::Mutex` (a futex: no
//! allocation, no syscall when uncontended). Critical sections are a few dozen instructions and
//! never run caller code except `Waker::clone`; wake-ups happen after the lock is released.

use std::cell::UnsafeCell;
use std::fmt;
use std::future::Future;
use std::marker::PhantomPinned;
use std::ops::{Deref, DerefMut};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use crate::config::PoolConfig;
use crate::region::{Memory, Region};
use crate::PoolError;

/// A fixed set of equally sized, locked, pre-faulted IO buffers with a per-queue reserve.
///
/// See the [crate documentation](crate) for the model and the rules callers must follow.
/// `ReservePool` is `Sync`: share it between queue threads by reference or in an `Arc`.
pub struct ReservePool {
    region: Region,
    config: PoolConfig,
    chunk_shift: u32,
    chunks: usize,
    shared: usize,
    state: Mutex<State>,
    totals: Counters,
    per_queue: Box<[Counters]>,
}

/// Statistics of a whole pool, as returned by [`ReservePool::stats`].
///
/// Each field is read with one relaxed atomic load, so reading is cheap and never blocks the IO
/// path; different fields may therefore come from slightly different instants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolStats {
    /// Size of every chunk in bytes.
    pub chunk_bytes: usize,
    /// Chunks in the pool (constant).
    pub chunks_total: usize,
    /// Chunks any queue may take (`chunks_total - reserved_chunks`; constant).
    pub shared_chunks: usize,
    /// Chunks set aside as the queues' reserves (`queues * reserve_per_queue`; constant).
    pub reserved_chunks: usize,
    /// Chunks currently handed out (including ones granted to a waiter not yet polled).
    pub in_use: usize,
    /// Highest `in_use` ever seen.
    pub high_water: usize,
    /// Futures currently waiting for a chunk.
    pub waiting: usize,
    /// Acquisitions that could not be served at once and had to wait.
    pub waits: u64,
    /// Acquisitions served from a queue's reserve because the shared chunks were exhausted.
    pub reserve_hits: u64,
}

/// Statistics of one queue, as returned by [`ReservePool::queue_stats`]. Same caveats as
/// [`PoolStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueStats {
    /// Chunks reserved for this queue (constant).
    pub reserve: usize,
    /// Chunks this queue holds now.
    pub in_use: usize,
    /// Highest `in_use` of this queue ever seen.
    pub high_water: usize,
    /// This queue's futures currently waiting.
    pub waiting: usize,
    /// This queue's acquisitions that had to wait.
    pub waits: u64,
    /// This queue's acquisitions that dipped into its reserve.
    pub reserve_hits: u64,
}

/// Lock-free readable mirrors of the accounting, written only under the state lock.
#[derive(Default)]
struct Counters {
    in_use: AtomicUsize,
    high_water: AtomicUsize,
    waiting: AtomicUsize,
    waits: AtomicU64,
    reserve_hits: AtomicU64,
}

impl Counters {
    fn set_in_use(&self, n: usize) {
        if n > self.high_water.load(Relaxed) {
            self.high_water.store(n, Relaxed);
        }
        self.in_use.store(n, Relaxed);
    }

    fn bump(counter: &AtomicU64) {
        // Only ever written under the state lock, so load+store cannot lose an update and
        // avoids a locked read-modify-write.
        counter.store(counter.load(Relaxed) + 1, Relaxed);
    }
}

/// Everything that changes on acquire and release. Guarded by `ReservePool::state`.
struct State {
    /// Indices of free chunks, used as a stack: the most recently returned chunk, still warm
    /// in cache, is handed out next. Allocated with capacity for every chunk up front, so
    /// pushing never reallocates.
    free: Vec<u32>,
    /// Chunks counted against the shared part: sum over queues of `max(0, in_use - reserve)`.
    shared_used: usize,
    /// Source of FIFO tickets: lower ticket = waiting longer, across all queues.
    next_ticket: u64,
    queues: Box<[QueueState]>,
}

// SAFETY: the raw pointers in `State` point to `Waiter`s inside pinned `Acquire` futures. They
// are only dereferenced while holding the mutex around `State`, and every future unlinks itself
// (under that mutex) before its memory goes away, so it does not matter which thread does it.
unsafe impl Send for State {}

struct QueueState {
    /// Chunks this queue holds. The first `reserve_per_queue` of them count against its
    /// reserve, the rest against the shared part.
    in_use: usize,
    waiters: WaitList,
}

/// Intrusive FIFO of the `Waiter`s of one queue; the nodes live in the waiting futures.
struct WaitList {
    head: *mut Waiter,
    tail: *mut Waiter,
}

impl WaitList {
    /// # Safety
    /// Caller holds the state lock; `w` is valid, pinned and not linked anywhere.
    unsafe fn push_back(&mut self, w: *mut Waiter) {
        // SAFETY: per the contract `w` is valid and exclusively ours under the lock; `tail`,
        // if non-null, is a linked and therefore live waiter.
        unsafe {
            (*w).next = ptr::null_mut();
            (*w).prev = self.tail;
            if self.tail.is_null() {
                self.head = w;
            } else {
                (*self.tail).next = w;
            }
        }
        self.tail = w;
    }

    /// # Safety
    /// Caller holds the state lock; `w` is linked in this list.
    unsafe fn unlink(&mut self, w: *mut Waiter) {
        // SAFETY: `w` and its neighbours are linked, hence live, and only touched under the
        // lock the caller holds.
        unsafe {
            let (prev, next) = ((*w).prev, (*w).next);
            if prev.is_null() {
                self.head = next;
            } else {
                (*prev).next = next;
            }
            if next.is_null() {
                self.tail = prev;
            } else {
                (*next).prev = prev;
            }
            (*w).prev = ptr::null_mut();
            (*w).next = ptr::null_mut();
        }
    }
}

/// One waiting acquisition, embedded in its (pinned) [`Acquire`] future.
///
/// While linked, every field is accessed only under the state lock, by the owner (poll, drop)
/// or by a releaser handing it a chunk.
struct Waiter {
    prev: *mut Waiter,
    next: *mut Waiter,
    ticket: u64,
    waker: Option<Waker>,
    /// Set by the releaser, together with unlinking: the chunk now belongs to this waiter.
    granted: Option<u32>,
}

impl ReservePool {
    /// Maps, locks and pre-faults the region and builds the free list.
    ///
    /// This is the only place the pool allocates heap memory (the free list and per-queue
    /// tables), so it belongs at daemon start-up, before any IO is served.
    pub fn new(config: PoolConfig) -> Result<ReservePool, PoolError> {
        Self::build(config, Memory::Private)
    }

    /// Like [`new`](Self::new), with the region in a memfd ([`shared_fd`](Self::shared_fd))
    /// that a standby process maps with [`attach`](Self::attach): the physical pages are
    /// counted (and locked) once for both.
    pub fn new_shareable(config: PoolConfig) -> Result<ReservePool, PoolError> {
        Self::build(config, Memory::NewShared)
    }

    /// A pool over the region of another process's [`new_shareable`](Self::new_shareable)
    /// pool, built from the same configuration. Its buffers are that process's buffers: use
    /// them only once that process no longer does (a standby, after the daemon died). Mapping
    /// writes nothing.
    pub fn attach(config: PoolConfig, memfd: OwnedFd) -> Result<ReservePool, PoolError> {
        Self::build(config, Memory::Attach(memfd))
    }

    /// The memfd behind a shareable or attached pool.
    pub fn shared_fd(&self) -> Option<BorrowedFd<'_>> {
        self.region.memfd().map(|fd| fd.as_fd())
    }

    fn build(config: PoolConfig, memory: Memory) -> Result<ReservePool, PoolError> {
        let layout = config.layout()?;
        let region = Region::new(layout.region_bytes, config.lock, memory)?;
        let free: Vec<u32> = (0..layout.chunks as u32).rev().collect();
        let queues = (0..config.queues)
            .map(|_| QueueState {
                in_use: 0,
                waiters: WaitList {
                    head: ptr::null_mut(),
                    tail: ptr::null_mut(),
                },
            })
            .collect();
        Ok(ReservePool {
            region,
            config,
            chunk_shift: config.chunk_bytes.trailing_zeros(),
            chunks: layout.chunks,
            shared: layout.shared,
            state: Mutex::new(State {
                free,
                shared_used: 0,
                next_ticket: 0,
                queues,
            }),
            totals: Counters::default(),
            per_queue: (0..config.queues).map(|_| Counters::default()).collect(),
        })
    }

    /// The configuration the pool was built from.
    pub fn config(&self) -> &PoolConfig {
        &self.config
    }

    /// Size of every chunk in bytes.
    pub fn chunk_bytes(&self) -> usize {
        self.config.chunk_bytes
    }

    /// Number of chunks in the pool.
    pub fn chunks(&self) -> usize {
        self.chunks
    }

    /// Number of queues (valid queue ids are `0..queues()`).
    pub fn queues(&self) -> usize {
        self.config.queues
    }

    /// Whether the region is `mlock`ed (false only when built with `lock: false`).
    pub fn is_locked(&self) -> bool {
        self.region.locked()
    }

    /// Takes a chunk for `queue` if one is available to it now; never blocks or waits.
    ///
    /// Returns `None` when the shared chunks and `queue`'s reserve are all in use — which is
    /// also the case whenever futures of `queue` are already waiting, so `try_acquire` never
    /// overtakes them.
    ///
    /// # Panics
    /// If `queue >= self.queues()`.
    pub fn try_acquire(&self, queue: usize) -> Option<Chunk<'_>> {
        self.check_queue(queue);
        let mut st = self.lock();
        let index = self.take_locked(&mut st, queue)?;
        drop(st);
        Some(self.chunk(index, queue))
    }

    /// Returns a future that resolves to a chunk for `queue`, waiting (without polling and
    /// without allocating) until one is released if none is available now.
    ///
    /// Waiters of a queue are served in FIFO order; a chunk released into the shared part goes
    /// to the longest-waiting future of any queue, a chunk released into a queue's reserve to
    /// that queue's longest-waiting future. Dropping the future cancels the wait; if a chunk
    /// had already been granted to it, the chunk is passed on as if released.
    ///
    /// # Panics
    /// If `queue >= self.queues()` (immediately, not at the first poll).
    pub fn acquire(&self, queue: usize) -> Acquire<'_> {
        self.check_queue(queue);
        Acquire {
            pool: self,
            queue,
            phase: Phase::Init,
            waiter: UnsafeCell::new(Waiter {
                prev: ptr::null_mut(),
                next: ptr::null_mut(),
                ticket: 0,
                waker: None,
                granted: None,
            }),
            _pinned: PhantomPinned,
        }
    }

    /// Statistics of the whole pool (lock-free, relaxed reads).
    pub fn stats(&self) -> PoolStats {
        let c = &self.totals;
        PoolStats {
            chunk_bytes: self.config.chunk_bytes,
            chunks_total: self.chunks,
            shared_chunks: self.shared,
            reserved_chunks: self.chunks - self.shared,
            in_use: c.in_use.load(Relaxed),
            high_water: c.high_water.load(Relaxed),
            waiting: c.waiting.load(Relaxed),
            waits: c.waits.load(Relaxed),
            reserve_hits: c.reserve_hits.load(Relaxed),
        }
    }

    /// Statistics of one queue (lock-free, relaxed reads).
    ///
    /// # Panics
    /// If `queue >= self.queues()`.
    pub fn queue_stats(&self, queue: usize) -> QueueStats {
        self.check_queue(queue);
        let c = &self.per_queue[queue];
        QueueStats {
            reserve: self.config.reserve_per_queue,
            in_use: c.in_use.load(Relaxed),
            high_water: c.high_water.load(Relaxed),
            waiting: c.waiting.load(Relaxed),
            waits: c.waits.load(Relaxed),
            reserve_hits: c.reserve_hits.load(Relaxed),
        }
    }

    fn check_queue(&self, queue: usize) {
        assert!(
            queue < self.config.queues,
            "queue {queue} out of range: pool has {} queues",
            self.config.queues
        );
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing under the lock panics while the state is inconsistent (the only caller code
        // run there, `Waker::clone`, runs before any change), so a poisoned lock still guards
        // valid state; refusing it would only turn one panic into a stalled device.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn chunk(&self, index: u32, queue: usize) -> Chunk<'_> {
        // SAFETY: index < chunks (it came off the free list), so the offset stays inside the
        // region and cannot overflow.
        let ptr = unsafe { self.region.ptr().add((index as usize) << self.chunk_shift) };
        Chunk {
            pool: self,
            ptr,
            index,
            queue: queue as u32,
        }
    }

    fn may_take(&self, st: &State, queue: usize) -> bool {
        st.queues[queue].in_use < self.config.reserve_per_queue || st.shared_used < self.shared
    }

    /// Counts one acquisition by `queue`, which `may_take` must allow.
    fn account_acquire(&self, st: &mut State, queue: usize) {
        let q = &mut st.queues[queue];
        if q.in_use < self.config.reserve_per_queue {
            if st.shared_used == self.shared {
                Counters::bump(&self.totals.reserve_hits);
                Counters::bump(&self.per_queue[queue].reserve_hits);
            }
        } else {
            debug_assert!(st.shared_used < self.shared);
            st.shared_used += 1;
        }
        q.in_use += 1;
        self.per_queue[queue].set_in_use(q.in_use);
        let total = self.chunks - st.free.len();
        self.totals.set_in_use(total);
    }

    fn take_locked(&self, st: &mut State, queue: usize) -> Option<u32> {
        if !self.may_take(st, queue) {
            return None;
        }
        // Cannot fail: in_use = sum(min(in_use_q, reserve)) + shared_used, and may_take means
        // one of the two terms is below its bound, so in_use < chunks and the list is not empty.
        let index = st
            .free
            .pop()
            .expect("pool accounting out of sync with free list");
        self.account_acquire(st, queue);
        Some(index)
    }

    /// Returns chunk `index`, held by `queue`: hands it straight to the waiter that is owed it,
    /// or puts it on the free list. Returns the waker to call once the lock is released.
    fn release_locked(&self, st: &mut State, queue: usize, index: u32) -> Option<Waker> {
        let reserve = self.config.reserve_per_queue;
        let q = &mut st.queues[queue];
        let into_reserve = q.in_use <= reserve;
        q.in_use -= 1;
        self.per_queue[queue].set_in_use(q.in_use);
        if !into_reserve {
            st.shared_used -= 1;
        }
        // Who may use the freed slot? A reserve slot only its own queue; a shared slot anyone,
        // longest waiting first. Invariant (kept by handing off here): a queue has waiters only
        // while it may not take, so these are exactly the waiters that can now proceed.
        let target = if into_reserve {
            (!st.queues[queue].waiters.head.is_null()).then_some(queue)
        } else {
            Self::longest_waiting(st)
        };
        let Some(target) = target else {
            st.free.push(index);
            self.totals.set_in_use(self.chunks - st.free.len());
            return None;
        };
        let w = st.queues[target].waiters.head;
        // SAFETY: `w` is the head of a wait list, hence a live linked waiter, and we hold the
        // lock.
        unsafe { st.queues[target].waiters.unlink(w) };
        self.count_waiting(target, -1);
        // The chunk changes hands without touching the free list (total in_use is unchanged);
        // `target` may take it: it was waiting, so it lacked exactly the slot just freed.
        self.account_acquire(st, target);
        // SAFETY: `w` was live and linked until just now; under the lock it is still ours to
        // write. The owner sees `granted` at its next poll (or drop), under the same lock.
        unsafe {
            (*w).granted = Some(index);
            (*w).waker.take()
        }
    }

    /// The queue whose first waiter has waited longest, if any queue has waiters.
    fn longest_waiting(st: &State) -> Option<usize> {
        let mut best: Option<(u64, usize)> = None;
        for (i, q) in st.queues.iter().enumerate() {
            if q.waiters.head.is_null() {
                continue;
            }
            // SAFETY: a non-null head is a live linked waiter; we hold the lock.
            let ticket = unsafe { (*q.waiters.head).ticket };
            if best.is_none_or(|(t, _)| ticket < t) {
                best = Some((ticket, i));
            }
        }
        best.map(|(_, i)| i)
    }

    fn count_waiting(&self, queue: usize, delta: isize) {
        for c in [&self.totals, &self.per_queue[queue]] {
            let n = c.waiting.load(Relaxed).wrapping_add_signed(delta);
            c.waiting.store(n, Relaxed);
        }
    }

    fn release(&self, queue: usize, index: u32) {
        let waker = {
            let mut st = self.lock();
            self.release_locked(&mut st, queue, index)
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl fmt::Debug for ReservePool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReservePool")
            .field("config", &self.config)
            .field("locked", &self.is_locked())
            .field("stats", &self.stats())
            .finish()
    }
}

/// One chunk of the pool, exclusively held; returns itself to the pool when dropped.
///
/// Dereferences to the chunk's bytes. The contents are whatever the previous holder left there:
/// chunks are not cleared on release (that would cost a memset per IO), which is acceptable
/// because the region never leaves RAM, is excluded from core dumps and is not inherited by
/// forked children.
pub struct Chunk<'a> {
    pool: &'a ReservePool,
    ptr: NonNull<u8>,
    index: u32,
    queue: u32,
}

// SAFETY: a `Chunk` is the unique handle to its bytes (the pool hands each index out once until
// it is returned), and returning it goes through the pool's mutex, so it may be used and dropped
// on any thread.
unsafe impl Send for Chunk<'_> {}
// SAFETY: `&Chunk` only allows reading the bytes, like `&[u8]`.
unsafe impl Sync for Chunk<'_> {}

impl Chunk<'_> {
    /// Stable index of the chunk in the region (`0..pool.chunks()`); its bytes start
    /// `index * pool.chunk_bytes()` bytes into the region.
    pub fn index(&self) -> usize {
        self.index as usize
    }

    /// Byte offset of the chunk in the region.
    pub fn offset(&self) -> usize {
        (self.index as usize) << self.pool.chunk_shift
    }

    /// The queue that acquired the chunk (and whose accounting it is returned to).
    pub fn queue(&self) -> usize {
        self.queue as usize
    }

    /// Length in bytes: the pool's chunk size.
    pub fn len(&self) -> usize {
        self.pool.config.chunk_bytes
    }

    /// Always false: chunks are at least [`CHUNK_ALIGN`](crate::CHUNK_ALIGN) bytes.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Start of the chunk, aligned to at least [`CHUNK_ALIGN`](crate::CHUNK_ALIGN).
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// Start of the chunk, for writing (e.g. as an `O_DIRECT` read target).
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Deref for Chunk<'_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: the chunk lies inside the mapped region, is initialised (pre-faulted, and
        // anonymous memory is zero-filled), and no one else holds it while this guard lives.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len()) }
    }
}

impl DerefMut for Chunk<'_> {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` makes this the only access through the guard.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len()) }
    }
}

impl AsRef<[u8]> for Chunk<'_> {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl AsMut<[u8]> for Chunk<'_> {
    fn as_mut(&mut self) -> &mut [u8] {
        self
    }
}

impl fmt::Debug for Chunk<'_> {
    // Never prints the contents: they are plaintext or ciphertext.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Chunk")
            .field("index", &self.index)
            .field("queue", &self.queue)
            .field("len", &self.len())
            .finish()
    }
}

impl Drop for Chunk<'_> {
    fn drop(&mut self) {
        self.pool.release(self.queue as usize, self.index);
    }
}

/// Where an [`Acquire`] stands, as known to its owner (written only by poll and drop).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Not yet polled: not linked, nothing to undo.
    Init,
    /// Linked in its queue's wait list, or unlinked by a releaser with a chunk granted.
    Waiting,
    /// Returned its chunk: nothing to undo.
    Done,
}

/// Future returned by [`ReservePool::acquire`].
///
/// While waiting, it is linked into its queue's wait list by an intrusive node stored inside
/// the future itself, which is why it is `!Unpin` and why waiting needs no allocation. Dropping
/// it unlinks it; a chunk already granted to it is released on.
#[must_use = "futures do nothing unless polled"]
pub struct Acquire<'a> {
    pool: &'a ReservePool,
    queue: usize,
    phase: Phase,
    waiter: UnsafeCell<Waiter>,
    _pinned: PhantomPinned,
}

// SAFETY: once linked, the waiter node is only accessed under the pool's mutex, from whichever
// thread; before that it is plain owned data. The `Waker` inside is `Send + Sync`.
unsafe impl Send for Acquire<'_> {}
// SAFETY: `&Acquire` gives access to nothing.
unsafe impl Sync for Acquire<'_> {}

impl<'a> Future for Acquire<'a> {
    type Output = Chunk<'a>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Chunk<'a>> {
        // SAFETY: nothing is moved out of `this`; the waiter node stays where it is until
        // `drop`, which is what linking it relies on (and `Pin` guarantees).
        let this = unsafe { self.get_unchecked_mut() };
        let pool = this.pool;
        let queue = this.queue;
        let w = this.waiter.get();
        match this.phase {
            Phase::Init => {
                let mut st = pool.lock();
                if let Some(index) = pool.take_locked(&mut st, queue) {
                    drop(st);
                    this.phase = Phase::Done;
                    return Poll::Ready(pool.chunk(index, queue));
                }
                let waker = cx.waker().clone();
                let ticket = st.next_ticket;
                st.next_ticket += 1;
                // SAFETY: `w` is not linked yet, so only we can see it; after `push_back` it is
                // reachable by releasers, but only under the lock we hold. `this` is pinned.
                unsafe {
                    (*w).waker = Some(waker);
                    (*w).ticket = ticket;
                    st.queues[queue].waiters.push_back(w);
                }
                pool.count_waiting(queue, 1);
                Counters::bump(&pool.totals.waits);
                Counters::bump(&pool.per_queue[queue].waits);
                drop(st);
                this.phase = Phase::Waiting;
                Poll::Pending
            }
            Phase::Waiting => {
                let st = pool.lock();
                // SAFETY: in phase Waiting the node is shared with releasers, and we hold the
                // lock that serialises every access to it.
                let slot = unsafe { &mut *w };
                if let Some(index) = slot.granted.take() {
                    let stale = slot.waker.take();
                    drop(st);
                    drop(stale);
                    this.phase = Phase::Done;
                    return Poll::Ready(pool.chunk(index, queue));
                }
                // Spurious or repeated poll: make sure the waker we will call is the current
                // one, cloning only if it changed.
                let stale = match &mut slot.waker {
                    Some(old) if old.will_wake(cx.waker()) => None,
                    other => other.replace(cx.waker().clone()),
                };
                drop(st);
                drop(stale);
                Poll::Pending
            }
            Phase::Done => panic!("`Acquire` polled after completion"),
        }
    }
}

impl Drop for Acquire<'_> {
    fn drop(&mut self) {
        if self.phase != Phase::Waiting {
            return;
        }
        let pool = self.pool;
        let w = self.waiter.get();
        let (stale, wake) = {
            let mut st = pool.lock();
            // SAFETY: as in `poll`, we hold the lock; the node is still in place (pinned).
            let slot = unsafe { &mut *w };
            let stale = slot.waker.take();
            let wake = match slot.granted.take() {
                // A releaser already unlinked us and counted the chunk as ours: pass it on.
                Some(index) => pool.release_locked(&mut st, self.queue, index),
                None => {
                    // SAFETY: not granted means still linked in our queue's list.
                    unsafe { st.queues[self.queue].waiters.unlink(w) };
                    pool.count_waiting(self.queue, -1);
                    None
                }
            };
            (stale, wake)
        };
        drop(stale);
        if let Some(waker) = wake {
            waker.wake();
        }
    }
}

impl fmt::Debug for Acquire<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Acquire")
            .field("queue", &self.queue)
            .field("phase", &self.phase)
            .finish()
    }
}
