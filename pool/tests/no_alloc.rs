//! After construction the pool never allocates: acquiring, waiting, waking, cancelling and
//! releasing are all checked here against a counting global allocator.
//!
//! This file is its own test binary so the counting allocator affects nothing else, and it has
//! a single `#[test]` so no other test allocates concurrently while counting.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Barrier;
use std::task::Waker;
use std::thread;

use common::{block_on, poll_once, pool, yield_now};
use ublk_crypt_pool::Pool;

struct Counting;

static ALLOCS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, SeqCst);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, SeqCst);
        // SAFETY: same contract as ours.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, SeqCst);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocs() -> usize {
    ALLOCS.load(SeqCst)
}

/// One IO step as the daemon does it: get a chunk (maybe waiting), touch it, let the "device"
/// take a moment, release.
async fn step(p: &Pool, q: usize, i: usize) {
    let mut c = p.acquire(q).await;
    c[i % 4096] = i as u8;
    if i.is_multiple_of(3) {
        yield_now().await;
    }
    // Give other threads the CPU while holding the chunk, so that they find the pool empty
    // and wait (the machine may have only two cores).
    thread::yield_now();
    drop(c);
    if let Some(mut c) = p.try_acquire(q) {
        c[0] = 1;
    }
}

fn uncontended(p: &Pool) {
    let noop = Waker::noop().clone();
    for i in 0..20_000 {
        block_on(step(p, 0, i));
        // Start a wait, then cancel it, both before and after it is granted.
        let held: Vec<_> = std::iter::from_fn(|| p.try_acquire(0))
            .take(64)
            .collect::<Vec<_>>();
        drop(held);
        if i.is_multiple_of(100) {
            let mut f = pin!(p.acquire(0));
            let _ = poll_once(f.as_mut(), &noop);
        }
    }
}

fn contended(p: &Pool, threads_per_queue: usize, rounds: usize, start: &Barrier, end: &Barrier) {
    thread::scope(|s| {
        for q in 0..p.queues() {
            for t in 0..threads_per_queue {
                s.spawn(move || {
                    // Warm-up: thread-local waker, thread handle, first waits.
                    for i in 0..200 {
                        block_on(step(p, q, i + t));
                    }
                    start.wait();
                    for i in 0..rounds {
                        block_on(step(p, q, i + t));
                    }
                    end.wait();
                });
            }
        }
    });
}

#[test]
fn no_heap_allocation_after_construction() {
    // --- Uncontended: one thread, plenty of chunks. `Vec`s above are collected only in the
    // warm-up; the measured loop below uses the same code minus those collections.
    let p = common::pool(64, 4096, 1, 1);
    uncontended(&p);
    let before = allocs();
    let noop = Waker::noop().clone();
    for i in 0..50_000 {
        block_on(step(&p, 0, i));
        let a = p.try_acquire(0);
        let b = p.try_acquire(0);
        drop((a, b));
        if i.is_multiple_of(100) {
            let mut f = pin!(p.acquire(0));
            let _ = poll_once(f.as_mut(), &noop);
        }
    }
    let after = allocs();
    assert_eq!(after - before, 0, "uncontended acquire/release allocated");
    assert_eq!(p.stats().in_use, 0);
    drop(p);

    // --- Contended: 3 queues, 3 threads each, 1 reserved + 1 shared chunk: many acquisitions
    // wait and are woken by releases on other threads.
    let p = pool(4, 4096, 3, 1);
    let threads_per_queue = 3;
    let n = p.queues() * threads_per_queue + 1;
    let (start, end) = (Barrier::new(n), Barrier::new(n));
    let rounds = 5_000;
    let mut measured = None;
    thread::scope(|s| {
        s.spawn(|| contended(&p, threads_per_queue, rounds, &start, &end));
        start.wait();
        let before = (allocs(), p.stats());
        end.wait();
        measured = Some((before, (allocs(), p.stats())));
    });
    let ((a0, s0), (a1, s1)) = measured.unwrap();
    assert!(
        s1.waits - s0.waits > 100,
        "the contended phase must really wait: {s0:?} -> {s1:?}"
    );
    assert!(s1.reserve_hits > s0.reserve_hits, "{s1:?}");
    assert_eq!(a1 - a0, 0, "contended acquire/wait/wake/release allocated");
    let s = p.stats();
    assert_eq!((s.in_use, s.waiting), (0, 0));
}
