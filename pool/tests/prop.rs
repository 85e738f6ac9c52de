//! Model-based property test: random interleavings of try_acquire, acquire (waiting), release,
//! polling and cancellation across queues. Checks against a reference model that
//!
//! * no chunk is ever handed out twice (distinct indices, and a tag written into every held
//!   chunk is intact when it is released — overlapping chunks would clobber it);
//! * availability is exactly "below own reserve, or shared part not exhausted";
//! * every release hands its chunk to exactly the waiter the policy says (own queue's oldest for
//!   a reserve slot, oldest of all for a shared slot), waking it once and no one else;
//! * cancellation, granted or not, never leaks a chunk;
//! * the statistics match.

mod common;

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;

use common::{poll_once, CountingWaker};
use proptest::prelude::*;
use ublk_crypt_pool::{Acquire, Chunk, PoolConfig, ReservePool};

const CHUNK: usize = 4096;

#[derive(Debug, Clone)]
enum Op {
    Try(usize),
    Wait(usize),
    Release(usize),
    Cancel(usize),
    PollAll,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => any::<usize>().prop_map(Op::Try),
        3 => any::<usize>().prop_map(Op::Wait),
        4 => any::<usize>().prop_map(Op::Release),
        1 => any::<usize>().prop_map(Op::Cancel),
        2 => Just(Op::PollAll),
    ]
}

struct Held<'a> {
    chunk: Chunk<'a>,
    tag: u64,
}

struct Waiter<'a> {
    queue: usize,
    fut: Pin<Box<Acquire<'a>>>,
    waker: Arc<CountingWaker>,
    granted: bool,
}

struct Model<'a> {
    pool: &'a ReservePool,
    reserve: usize,
    shared: usize,
    held_per_queue: Vec<usize>, // including granted, unpolled
    held: Vec<Held<'a>>,
    waiters: Vec<Waiter<'a>>, // in creation (= ticket) order
    next_tag: u64,
}

impl<'a> Model<'a> {
    fn shared_used(&self) -> usize {
        self.held_per_queue
            .iter()
            .map(|&h| h.saturating_sub(self.reserve))
            .sum()
    }

    fn can_take(&self, q: usize) -> bool {
        self.held_per_queue[q] < self.reserve || self.shared_used() < self.shared
    }

    fn receive(&mut self, mut chunk: Chunk<'a>, q: usize) {
        assert_eq!(chunk.queue(), q);
        assert!(chunk.index() < self.pool.chunks());
        assert!(
            self.held.iter().all(|h| h.chunk.index() != chunk.index()),
            "chunk {} handed out twice",
            chunk.index()
        );
        let tag = self.next_tag;
        self.next_tag += 1;
        let n = chunk.len();
        chunk[..8].copy_from_slice(&tag.to_le_bytes());
        chunk[n - 8..].copy_from_slice(&tag.to_le_bytes());
        self.held.push(Held { chunk, tag });
    }

    /// The model's half of returning a chunk held by `q`: which waiter gets it.
    fn release_model(&mut self, q: usize) -> Option<usize> {
        let into_reserve = self.held_per_queue[q] <= self.reserve;
        self.held_per_queue[q] -= 1;
        let target = self
            .waiters
            .iter()
            .position(|w| !w.granted && (!into_reserve || w.queue == q));
        if let Some(i) = target {
            self.waiters[i].granted = true;
            self.held_per_queue[self.waiters[i].queue] += 1;
        }
        target
    }

    fn check_wakes(&self, expected_target: Option<usize>, wakes_before: &[usize]) {
        for (i, w) in self.waiters.iter().enumerate() {
            let woken = w.waker.wakes() - wakes_before[i];
            assert_eq!(
                woken,
                usize::from(Some(i) == expected_target),
                "waiter {i} (queue {}) woken {woken} times; expected target {expected_target:?}",
                w.queue
            );
        }
    }

    fn wakes(&self) -> Vec<usize> {
        self.waiters.iter().map(|w| w.waker.wakes()).collect()
    }

    fn apply(&mut self, op: Op) {
        let queues = self.held_per_queue.len();
        match op {
            Op::Try(q) => {
                let q = q % queues;
                let expect = self.can_take(q);
                match self.pool.try_acquire(q) {
                    Some(c) => {
                        assert!(expect, "try_acquire({q}) succeeded against the model");
                        self.held_per_queue[q] += 1;
                        self.receive(c, q);
                    }
                    None => assert!(!expect, "try_acquire({q}) failed against the model"),
                }
            }
            Op::Wait(q) => {
                let q = q % queues;
                let expect = self.can_take(q);
                if expect {
                    assert!(
                        self.waiters.iter().all(|w| w.granted || w.queue != q),
                        "queue {q} has waiters although it could take"
                    );
                }
                let waker = CountingWaker::new();
                let mut fut = Box::pin(self.pool.acquire(q));
                match poll_once(fut.as_mut(), &waker.waker()) {
                    Poll::Ready(c) => {
                        assert!(expect, "acquire({q}) completed at once against the model");
                        self.held_per_queue[q] += 1;
                        self.receive(c, q);
                    }
                    Poll::Pending => {
                        assert!(!expect, "acquire({q}) waited against the model");
                        self.waiters.push(Waiter {
                            queue: q,
                            fut,
                            waker,
                            granted: false,
                        });
                    }
                }
            }
            Op::Release(k) => {
                if self.held.is_empty() {
                    return;
                }
                let h = self.held.swap_remove(k % self.held.len());
                let n = h.chunk.len();
                assert_eq!(h.chunk[..8], h.tag.to_le_bytes(), "chunk clobbered");
                assert_eq!(h.chunk[n - 8..], h.tag.to_le_bytes(), "chunk clobbered");
                let q = h.chunk.queue();
                let before = self.wakes();
                drop(h);
                let target = self.release_model(q);
                self.check_wakes(target, &before);
            }
            Op::Cancel(k) => {
                if self.waiters.is_empty() {
                    return;
                }
                let w = self.waiters.remove(k % self.waiters.len());
                let before = self.wakes();
                let (q, granted) = (w.queue, w.granted);
                drop(w);
                let target = if granted { self.release_model(q) } else { None };
                self.check_wakes(target, &before);
            }
            Op::PollAll => {
                let mut still = Vec::new();
                for mut w in std::mem::take(&mut self.waiters) {
                    match poll_once(w.fut.as_mut(), &w.waker.waker()) {
                        Poll::Ready(c) => {
                            assert!(w.granted, "waiter completed without a grant");
                            self.receive(c, w.queue);
                        }
                        Poll::Pending => {
                            assert!(!w.granted, "granted waiter still pending");
                            still.push(w);
                        }
                    }
                }
                self.waiters = still;
            }
        }
        self.check_stats();
    }

    fn check_stats(&self) {
        let s = self.pool.stats();
        let total: usize = self.held_per_queue.iter().sum();
        assert!(total <= self.pool.chunks());
        assert_eq!(s.in_use, total);
        let queued = self.waiters.iter().filter(|w| !w.granted).count();
        assert_eq!(s.waiting, queued);
        for q in 0..self.held_per_queue.len() {
            let qs = self.pool.queue_stats(q);
            assert_eq!(qs.in_use, self.held_per_queue[q], "queue {q}");
            let queued_q = self
                .waiters
                .iter()
                .filter(|w| !w.granted && w.queue == q)
                .count();
            assert_eq!(qs.waiting, queued_q, "queue {q}");
            if queued_q > 0 {
                assert!(!self.can_take(q), "queue {q} waits although it could take");
            }
        }
        let indices: HashSet<usize> = self.held.iter().map(|h| h.chunk.index()).collect();
        assert_eq!(indices.len(), self.held.len());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn never_hands_out_a_chunk_twice(
        queues in 1usize..=3,
        reserve in 1usize..=2,
        shared in 1usize..=3,
        ops in prop::collection::vec(op(), 1..300),
    ) {
        let chunks = queues * reserve + shared;
        let pool = ReservePool::new(PoolConfig {
            budget_bytes: chunks * CHUNK,
            chunk_bytes: CHUNK,
            queues,
            reserve_per_queue: reserve,
            lock: true,
        })
        .unwrap();
        let mut m = Model {
            pool: &pool,
            reserve,
            shared,
            held_per_queue: vec![0; queues],
            held: Vec::new(),
            waiters: Vec::new(),
            next_tag: 1,
        };
        for op in ops {
            m.apply(op);
        }
        // Tear down in an arbitrary but complete way: nothing may leak.
        m.waiters.clear();
        m.held.clear();
        let s = pool.stats();
        prop_assert_eq!((s.in_use, s.waiting), (0, 0));
        prop_assert_eq!(common::drain(&pool, 0).len(), shared + reserve);
    }
}
