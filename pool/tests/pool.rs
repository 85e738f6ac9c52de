//! Behaviour of the pool: layout, exhaustion, reserves, waiting, wake order, cancellation.

mod common;

use std::collections::HashSet;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::thread;
use std::time::Duration;

use common::{block_on, poll_once, pool, CountingWaker};
use ublk_crypt_pool::{Acquire, Chunk, PoolConfig, PoolError, ReservePool, CHUNK_ALIGN};

const K: usize = 1024;

fn assert_send_sync<T: Send + Sync>() {}

#[test]
fn types_are_send_and_sync() {
    assert_send_sync::<ReservePool>();
    assert_send_sync::<Chunk<'static>>();
    assert_send_sync::<Acquire<'static>>();
    assert_send_sync::<PoolError>();
}

#[test]
fn chunks_are_aligned_distinct_and_cover_the_region() {
    for chunk_bytes in [4 * K, 64 * K, 1024 * K] {
        let p = pool(8, chunk_bytes, 2, 1);
        assert_eq!(p.chunks() * p.chunk_bytes(), 8 * chunk_bytes);
        let chunks: Vec<Chunk> = (0..8).map_while(|i| p.try_acquire(i % 2)).collect();
        assert_eq!(chunks.len(), 8);
        let mut seen = HashSet::new();
        for c in &chunks {
            assert_eq!(c.len(), chunk_bytes);
            assert!(!c.is_empty());
            assert_eq!(c.as_ptr() as usize % CHUNK_ALIGN, 0, "{c:?}");
            assert_eq!(c.offset(), c.index() * chunk_bytes);
            // One region: every chunk sits at its offset from the same base.
            let base = chunks[0].as_ptr() as usize - chunks[0].offset();
            assert_eq!(c.as_ptr() as usize - c.offset(), base);
            assert!(seen.insert(c.index()));
        }
        assert_eq!(seen, (0..8).collect());
    }
}

#[test]
fn chunks_do_not_overlap_and_are_writable() {
    let p = pool(16, 4 * K, 1, 1);
    let mut chunks: Vec<Chunk> = common::drain(&p, 0);
    assert_eq!(chunks.len(), 16);
    for c in chunks.iter_mut() {
        let tag = c.index() as u8 + 1;
        c.fill(tag);
        c.as_mut()[0] = tag;
        // SAFETY: the chunk is ours and as long as `len`.
        unsafe { c.as_mut_ptr().add(c.len() - 1).write(tag) };
    }
    for c in &chunks {
        let tag = c.index() as u8 + 1;
        assert!(c.iter().all(|&b| b == tag));
        assert_eq!(c.as_ref().len(), 4 * K);
    }
}

#[test]
fn exhaustion_and_drop_return_chunks() {
    let p = pool(8, 4 * K, 1, 2);
    let s = p.stats();
    assert_eq!(
        (
            s.chunks_total,
            s.shared_chunks,
            s.reserved_chunks,
            s.chunk_bytes
        ),
        (8, 6, 2, 4 * K)
    );
    let mut held: Vec<Chunk> = common::drain(&p, 0);
    assert_eq!(held.len(), 8);
    assert!(p.try_acquire(0).is_none());
    let s = p.stats();
    assert_eq!((s.in_use, s.high_water, s.waits), (8, 8, 0));
    // The first two were counted against the reserve while shared chunks were still free:
    // not hits. Taking the shared ones did not need the reserve either.
    assert_eq!(s.reserve_hits, 0);
    held.pop();
    assert_eq!(p.stats().in_use, 7);
    let again = p.try_acquire(0).expect("a dropped chunk comes back");
    drop(again);
    drop(held);
    let s = p.stats();
    assert_eq!((s.in_use, s.high_water), (0, 8));
    let q = p.queue_stats(0);
    assert_eq!((q.in_use, q.high_water, q.reserve), (0, 8, 2));
    // Everything is available again.
    assert_eq!(common::drain(&p, 0).len(), 8);
}

#[test]
fn chunks_are_returned_from_other_threads() {
    let p = pool(4, 4 * K, 2, 1);
    let held: Vec<Chunk> = common::drain(&p, 1);
    assert_eq!(held.len(), 3); // shared 2 + queue 1's reserve
    thread::scope(|s| {
        s.spawn(move || drop(held));
    });
    assert_eq!(p.stats().in_use, 0);
    assert_eq!(p.queue_stats(1).in_use, 0);
}

#[test]
fn reserve_isolation_between_queues() {
    // 4 queues x 2 reserved + 8 shared.
    let p = pool(16, 4 * K, 4, 2);
    let greedy: Vec<Chunk> = common::drain(&p, 0);
    assert_eq!(
        greedy.len(),
        8 + 2,
        "queue 0 gets the shared part and its own reserve"
    );
    assert_eq!(p.queue_stats(0).reserve_hits, 0);
    for q in 1..4 {
        // Queue q still gets exactly its reserve, both ways, without waiting.
        let a = p.try_acquire(q).expect("reserve");
        let b = block_on(p.acquire(q));
        assert!(p.try_acquire(q).is_none());
        let qs = p.queue_stats(q);
        assert_eq!((qs.in_use, qs.reserve_hits, qs.waits), (2, 2, 0));
        drop((a, b));
    }
    assert_eq!(p.stats().reserve_hits, 6);
    assert_eq!(p.stats().waits, 0);
    drop(greedy);
}

#[test]
fn waiting_future_is_woken_by_a_release_on_another_thread() {
    let p = pool(3, 4 * K, 1, 1);
    let held: Vec<Chunk> = common::drain(&p, 0);
    thread::scope(|s| {
        s.spawn(move || {
            thread::sleep(Duration::from_millis(50));
            drop(held);
        });
        let c = block_on(p.acquire(0));
        assert_eq!(c.queue(), 0);
    });
    let s = p.stats();
    assert_eq!((s.waits, s.waiting, s.in_use), (1, 0, 0));
}

#[test]
fn fifo_wake_order_within_a_queue() {
    let p = pool(3, 4 * K, 1, 1);
    let mut held: Vec<Chunk> = common::drain(&p, 0);
    let wakers: Vec<_> = (0..3).map(|_| CountingWaker::new()).collect();
    let mut futs: Vec<_> = (0..3).map(|_| Box::pin(p.acquire(0))).collect();
    for (f, w) in futs.iter_mut().zip(&wakers) {
        assert!(poll_once(f.as_mut(), &w.waker()).is_pending());
    }
    assert_eq!(p.stats().waiting, 3);
    assert_eq!(p.queue_stats(0).waits, 3);
    for i in 0..3 {
        drop(held.pop());
        // Handed off, not put back: nobody can overtake the waiters.
        assert!(p.try_acquire(0).is_none());
        for (j, w) in wakers.iter().enumerate() {
            assert_eq!(
                w.wakes(),
                usize::from(j <= i),
                "after release {i}, waker {j}"
            );
        }
        let Poll::Ready(c) = poll_once(futs[i].as_mut(), &wakers[i].waker()) else {
            panic!("waiter {i} should have its chunk");
        };
        held.insert(0, c);
        for (f, w) in futs.iter_mut().zip(&wakers).skip(i + 1) {
            assert!(poll_once(f.as_mut(), &w.waker()).is_pending());
        }
    }
    assert_eq!(p.stats().waiting, 0);
}

#[test]
fn reserve_chunk_goes_to_its_own_queue_first() {
    // 2 queues x 1 reserved + 1 shared.
    let p = pool(3, 4 * K, 2, 1);
    let a = p.try_acquire(0).unwrap(); // queue 0's reserve
    let b1 = p.try_acquire(1).unwrap(); // queue 1's reserve
    let b2 = p.try_acquire(1).unwrap(); // the shared chunk
    assert!(p.try_acquire(0).is_none() && p.try_acquire(1).is_none());

    let (wb, wa) = (CountingWaker::new(), CountingWaker::new());
    let mut fb = pin!(p.acquire(1)); // waits longer
    let mut fa = pin!(p.acquire(0));
    assert!(poll_once(fb.as_mut(), &wb.waker()).is_pending());
    assert!(poll_once(fa.as_mut(), &wa.waker()).is_pending());

    // Queue 0 returns a reserve chunk: it goes to queue 0's waiter although queue 1's waited
    // longer, because queue 1 may not use queue 0's reserve.
    drop(a);
    assert_eq!((wa.wakes(), wb.wakes()), (1, 0));
    let Poll::Ready(a2) = poll_once(fa.as_mut(), &wa.waker()) else {
        panic!("queue 0's waiter gets its reserve chunk")
    };
    assert_eq!(p.queue_stats(0).reserve_hits, 1);
    // Queue 1 returns its shared chunk: its own waiter is the only one left.
    drop(b2);
    assert_eq!(wb.wakes(), 1);
    assert!(poll_once(fb.as_mut(), &wb.waker()).is_ready());
    drop((a2, b1));
}

#[test]
fn shared_chunk_goes_to_the_longest_waiter_of_any_queue() {
    // 3 queues x 1 reserved + 1 shared.
    let p = pool(4, 4 * K, 3, 1);
    let r: Vec<Chunk> = (0..3).map(|q| p.try_acquire(q).unwrap()).collect();
    let shared = p.try_acquire(0).unwrap();
    let (w1, w2) = (CountingWaker::new(), CountingWaker::new());
    let mut f2 = pin!(p.acquire(2));
    let mut f1 = pin!(p.acquire(1));
    assert!(poll_once(f2.as_mut(), &w2.waker()).is_pending()); // oldest
    assert!(poll_once(f1.as_mut(), &w1.waker()).is_pending());
    drop(shared);
    assert_eq!((w2.wakes(), w1.wakes()), (1, 0));
    let Poll::Ready(c2) = poll_once(f2.as_mut(), &w2.waker()) else {
        panic!("oldest waiter first")
    };
    assert_eq!(c2.queue(), 2);
    drop(c2);
    assert_eq!(w1.wakes(), 1);
    assert!(poll_once(f1.as_mut(), &w1.waker()).is_ready());
    drop(r);
}

#[test]
fn dropping_a_queued_waiter_unregisters_it() {
    let p = pool(2, 4 * K, 1, 1);
    let held: Vec<Chunk> = common::drain(&p, 0);
    let (w1, w2) = (CountingWaker::new(), CountingWaker::new());
    let mut f1 = Box::pin(p.acquire(0));
    let mut f2 = Box::pin(p.acquire(0));
    assert!(poll_once(f1.as_mut(), &w1.waker()).is_pending());
    assert!(poll_once(f2.as_mut(), &w2.waker()).is_pending());
    drop(f1);
    assert_eq!(p.stats().waiting, 1);
    // The dropped future's stored waker was released.
    assert_eq!(Arc::strong_count(&w1), 1);
    drop(held);
    assert_eq!((w1.wakes(), w2.wakes()), (0, 1));
    assert!(poll_once(f2.as_mut(), &w2.waker()).is_ready());
    // Dropping a future that never waited or that completed is a no-op.
    drop(p.acquire(0));
    assert_eq!(p.stats().in_use, 0);
}

#[test]
fn dropping_a_granted_waiter_passes_its_chunk_on() {
    let p = pool(2, 4 * K, 1, 1);
    let mut held: Vec<Chunk> = common::drain(&p, 0);
    let (w1, w2) = (CountingWaker::new(), CountingWaker::new());
    let mut f1 = Box::pin(p.acquire(0));
    let mut f2 = Box::pin(p.acquire(0));
    assert!(poll_once(f1.as_mut(), &w1.waker()).is_pending());
    assert!(poll_once(f2.as_mut(), &w2.waker()).is_pending());
    drop(held.pop()); // granted to f1
    assert_eq!(w1.wakes(), 1);
    assert_eq!(p.stats().in_use, 2);
    drop(f1); // cancelled after the grant: the chunk must go to f2, not leak
    assert_eq!(w2.wakes(), 1);
    let Poll::Ready(c2) = poll_once(f2.as_mut(), &w2.waker()) else {
        panic!("f2 inherits the chunk granted to f1")
    };
    // And a granted-then-dropped future with nobody behind it returns the chunk to the pool.
    let mut f3 = Box::pin(p.acquire(0));
    assert!(poll_once(f3.as_mut(), &w1.waker()).is_pending());
    drop(held.pop());
    assert_eq!(p.stats().in_use, 2);
    drop(f3);
    assert_eq!(p.stats().in_use, 1);
    drop(c2);
    let s = p.stats();
    assert_eq!((s.in_use, s.waiting), (0, 0));
    assert_eq!(common::drain(&p, 0).len(), 2);
}

#[test]
fn repeated_polls_clone_the_waker_only_when_it_changes() {
    let p = pool(2, 4 * K, 1, 1);
    let held: Vec<Chunk> = common::drain(&p, 0);
    let (w1, w2) = (CountingWaker::new(), CountingWaker::new());
    let (k1, k2) = (w1.waker(), w2.waker());
    let mut f = pin!(p.acquire(0));
    for _ in 0..5 {
        assert!(poll_once(f.as_mut(), &k1).is_pending());
    }
    assert_eq!(
        w1.clones(),
        1,
        "stored once, then will_wake says it is current"
    );
    assert!(poll_once(f.as_mut(), &k2).is_pending());
    assert_eq!(w2.clones(), 1);
    assert_eq!(Arc::strong_count(&w1), 2, "the stale clone was dropped");
    drop(held);
    assert_eq!(
        (w1.wakes(), w2.wakes()),
        (0, 1),
        "only the current waker is woken"
    );
    assert!(poll_once(f.as_mut(), &k2).is_ready());
}

#[test]
fn try_acquire_does_not_overtake_waiters() {
    // 1 queue, 1 reserved + 2 shared.
    let p = pool(3, 4 * K, 1, 1);
    let mut held: Vec<Chunk> = common::drain(&p, 0);
    let mut f = pin!(p.acquire(0));
    assert!(poll_once(f.as_mut(), &Waker::noop().clone()).is_pending());
    drop(held.pop());
    assert!(
        p.try_acquire(0).is_none(),
        "the released chunk belongs to the waiter"
    );
    assert!(poll_once(f.as_mut(), &Waker::noop().clone()).is_ready());
}

#[test]
#[should_panic(expected = "queue 2 out of range")]
fn out_of_range_queue_panics() {
    let p = pool(4, 4 * K, 2, 1);
    let _ = p.try_acquire(2);
}

#[test]
#[should_panic(expected = "polled after completion")]
fn polling_after_completion_panics() {
    let p = pool(2, 4 * K, 1, 1);
    let mut f = pin!(p.acquire(0));
    let _c = poll_once(f.as_mut(), &Waker::noop().clone());
    let _ = poll_once(f.as_mut(), &Waker::noop().clone());
}

#[test]
fn unlocked_pool_for_torture_tests() {
    let p = ReservePool::new(PoolConfig {
        lock: false,
        ..PoolConfig::with_queues(2)
    })
    .unwrap();
    assert!(!p.is_locked());
    assert_eq!(p.chunks(), 64);
    assert_eq!(p.queues(), 2);
    assert_eq!(p.chunk_bytes(), 256 * K);
    let mut c = p.try_acquire(1).unwrap();
    c[0] = 7;
    assert_eq!(c[0], 7);
    assert!(format!("{p:?}").contains("in_use: 1"));
}

#[test]
fn default_pool_is_locked_and_sixteen_mib() {
    let p = ReservePool::new(PoolConfig::default()).unwrap();
    assert!(p.is_locked());
    assert_eq!(p.chunks() * p.chunk_bytes(), 16 << 20);
    assert_eq!(*p.config(), PoolConfig::default());
}

#[test]
fn invalid_config_is_rejected_before_mapping() {
    let e = ReservePool::new(PoolConfig {
        budget_bytes: 64 * K,
        ..PoolConfig::with_queues(4)
    })
    .unwrap_err();
    assert!(matches!(e, PoolError::BudgetTooSmall { .. }), "{e}");
}

#[test]
fn stats_track_waits_and_high_water_per_queue() {
    let p = pool(4, 4 * K, 2, 1);
    let a: Vec<Chunk> = common::drain(&p, 0);
    assert_eq!(a.len(), 3);
    let b = p.try_acquire(1).unwrap();
    thread::scope(|s| {
        s.spawn(|| {
            let c = block_on(p.acquire(1));
            assert_eq!(c.queue(), 1);
        });
        while p.queue_stats(1).waiting == 0 {
            thread::yield_now();
        }
        assert_eq!(p.stats().waiting, 1);
        drop(a);
    });
    drop(b);
    let q0 = p.queue_stats(0);
    let q1 = p.queue_stats(1);
    assert_eq!((q0.high_water, q0.waits, q0.in_use), (3, 0, 0));
    assert_eq!((q1.high_water, q1.waits, q1.in_use), (2, 1, 0));
    // Queue 1's first chunk came from its reserve while the shared part was exhausted.
    assert_eq!(q1.reserve_hits, 1);
    let s = p.stats();
    assert_eq!(
        (s.high_water, s.waits, s.reserve_hits, s.in_use),
        (4, 1, 1, 0)
    );
}
