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
use ublk_crypt_pool::{Chunk, ReservePool};

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
async fn step(p: &ReservePool, q: usize, i: usize) {
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

/// Everything one thread can do alone: acquire and release both ways, exhaust the pool, wait,
/// be granted a chunk, cancel a queued wait and cancel a granted one. `hold` is a fixed array,
/// so the test itself does not allocate either.
fn uncontended_round<'p>(p: &'p ReservePool, i: usize, hold: &mut [Option<Chunk<'p>>; 64]) {
    let noop = Waker::noop();
    block_on(step(p, 0, i));
    for slot in hold.iter_mut() {
        *slot = p.try_acquire(0);
    }
    assert!(p.try_acquire(0).is_none());
    {
        let mut granted = pin!(p.acquire(0));
        assert!(poll_once(granted.as_mut(), noop).is_pending());
        {
            let mut queued = pin!(p.acquire(0));
            assert!(poll_once(queued.as_mut(), noop).is_pending());
            hold[i % 64] = None; // handed to `granted`
        } // `queued` cancelled while queued
        if i.is_multiple_of(2) {
            hold[i % 64] = match poll_once(granted.as_mut(), noop) {
                std::task::Poll::Ready(c) => Some(c),
                std::task::Poll::Pending => panic!("granted waiter not ready"),
            };
        }
    } // `granted` cancelled after its grant (odd i): the chunk goes back
    for slot in hold.iter_mut() {
        *slot = None;
    }
}

fn contended(
    p: &ReservePool,
    threads_per_queue: usize,
    rounds: usize,
    start: &Barrier,
    end: &Barrier,
) {
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
    // --- Uncontended: one thread, 64 chunks. Warm up with exactly the code measured.
    let p = common::pool(64, 4096, 1, 1);
    let mut hold: [Option<Chunk>; 64] = [const { None }; 64];
    for i in 0..1_000 {
        uncontended_round(&p, i, &mut hold);
    }
    let before = allocs();
    let waits = p.stats().waits;
    for i in 0..20_000 {
        uncontended_round(&p, i, &mut hold);
    }
    let after = allocs();
    assert_eq!(
        after - before,
        0,
        "uncontended acquire/wait/cancel/release allocated"
    );
    assert_eq!(p.stats().waits - waits, 2 * 20_000);
    assert_eq!(p.stats().in_use, 0);
    drop(hold);
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
