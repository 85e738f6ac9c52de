//! Minimal executors and wakers for the pool's tests. No runtime dependency: the pool must work
//! with any executor, and the allocation test needs executors that do not allocate per poll.

// Each test binary uses a different subset.
#![allow(dead_code)]

use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::task::{Context, Poll, RawWaker, RawWakerVTable, Wake, Waker};
use std::thread::{self, Thread};

use ublk_crypt_pool::{Chunk, PoolConfig, ReservePool};

/// Takes every chunk `queue` can get right now.
pub fn drain(p: &ReservePool, queue: usize) -> Vec<Chunk<'_>> {
    // Collect, never `count()`: a dropped chunk is immediately available again.
    std::iter::from_fn(|| p.try_acquire(queue)).collect()
}

/// A pool of `chunks` chunks of `chunk_bytes` for `queues` queues with `reserve` each.
pub fn pool(chunks: usize, chunk_bytes: usize, queues: usize, reserve: usize) -> ReservePool {
    ReservePool::new(PoolConfig {
        budget_bytes: chunks * chunk_bytes,
        chunk_bytes,
        queues,
        reserve_per_queue: reserve,
        lock: true,
    })
    .expect("pool construction")
}

struct ThreadWaker(Thread);

impl Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

thread_local! {
    /// One waker per thread, created on first use (warm-up) and reused by every `block_on`, so
    /// polling allocates nothing; clones are reference-count increments.
    static THREAD_WAKER: Waker = Waker::from(Arc::new(ThreadWaker(thread::current())));
}

/// Runs `fut` to completion on this thread, parking between polls.
pub fn block_on<F: Future>(fut: F) -> F::Output {
    let mut fut = pin!(fut);
    THREAD_WAKER.with(|waker| {
        let mut cx = Context::from_waker(waker);
        loop {
            if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
                return v;
            }
            // An unpark that came before this park makes it return at once: no lost wake-up.
            thread::park();
        }
    })
}

/// Returns `Pending` once (waking itself), like a task waiting for a fast device.
pub fn yield_now() -> impl Future<Output = ()> {
    let mut yielded = false;
    std::future::poll_fn(move |cx| {
        if yielded {
            Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    })
}

struct TaskWaker {
    ready: AtomicBool,
    thread: Thread,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.ready.store(true, SeqCst);
        self.thread.unpark();
    }
}

/// Runs many futures concurrently on the current thread, like one libublk queue thread with
/// its single-threaded executor: a task is polled only after its waker fired.
pub fn run_local<'a>(tasks: Vec<Pin<Box<dyn Future<Output = ()> + 'a>>>) {
    let mut tasks: Vec<_> = tasks
        .into_iter()
        .map(|t| {
            let w = Arc::new(TaskWaker {
                ready: AtomicBool::new(true),
                thread: thread::current(),
            });
            (Some(t), Waker::from(w.clone()), w)
        })
        .collect();
    let mut live = tasks.len();
    while live > 0 {
        let mut progressed = false;
        for (task, waker, flag) in tasks.iter_mut() {
            let Some(fut) = task else { continue };
            if !flag.ready.swap(false, SeqCst) {
                continue;
            }
            progressed = true;
            if fut
                .as_mut()
                .poll(&mut Context::from_waker(waker))
                .is_ready()
            {
                *task = None;
                live -= 1;
            }
        }
        if !progressed {
            thread::park();
        }
    }
}

/// A waker that counts how often it is cloned, woken and dropped.
pub struct CountingWaker {
    pub clones: AtomicUsize,
    pub wakes: AtomicUsize,
    pub drops: AtomicUsize,
}

impl CountingWaker {
    pub fn new() -> Arc<CountingWaker> {
        Arc::new(CountingWaker {
            clones: AtomicUsize::new(0),
            wakes: AtomicUsize::new(0),
            drops: AtomicUsize::new(0),
        })
    }

    /// A waker whose clones are counted. Each `Waker` holds one `Arc` reference.
    pub fn waker(self: &Arc<Self>) -> Waker {
        let raw = RawWaker::new(Arc::into_raw(self.clone()).cast(), &VTABLE);
        // SAFETY: the vtable below upholds the RawWaker contract for an `Arc<CountingWaker>`.
        unsafe { Waker::from_raw(raw) }
    }

    pub fn wakes(&self) -> usize {
        self.wakes.load(SeqCst)
    }

    pub fn clones(&self) -> usize {
        self.clones.load(SeqCst)
    }
}

static VTABLE: RawWakerVTable = RawWakerVTable::new(cw_clone, cw_wake, cw_wake_by_ref, cw_drop);

unsafe fn cw_clone(p: *const ()) -> RawWaker {
    let p = p.cast::<CountingWaker>();
    // SAFETY: `p` came from `Arc::into_raw` and its reference is still held by the caller.
    unsafe {
        (*p).clones.fetch_add(1, SeqCst);
        Arc::increment_strong_count(p);
    }
    RawWaker::new(p.cast(), &VTABLE)
}

unsafe fn cw_wake(p: *const ()) {
    // SAFETY: as in `cw_clone`; waking by value consumes this reference.
    unsafe {
        cw_wake_by_ref(p);
        cw_drop(p);
    }
}

unsafe fn cw_wake_by_ref(p: *const ()) {
    // SAFETY: as in `cw_clone`.
    unsafe { (*p.cast::<CountingWaker>()).wakes.fetch_add(1, SeqCst) };
}

unsafe fn cw_drop(p: *const ()) {
    let p = p.cast::<CountingWaker>();
    // SAFETY: releases the reference this waker held.
    unsafe {
        (*p).drops.fetch_add(1, SeqCst);
        Arc::decrement_strong_count(p);
    }
}

/// Polls `fut` once with `waker`.
pub fn poll_once<F: Future + ?Sized>(fut: Pin<&mut F>, waker: &Waker) -> Poll<F::Output> {
    fut.poll(&mut Context::from_waker(waker))
}
