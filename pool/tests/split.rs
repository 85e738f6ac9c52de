//! A chunk split in two for two threads (`Chunk::split_at`, `ChunkHead::join`).

mod common;

use std::thread;

use common::pool;
use ublk_crypt_pool::{ChunkHead, ChunkTail};

const K: usize = 1024;

fn assert_send_sync<T: Send + Sync>() {}

#[test]
fn halves_are_disjoint_worked_on_by_two_threads_and_joined_back() {
    assert_send_sync::<ChunkHead<'static>>();
    assert_send_sync::<ChunkTail<'static>>();
    let p = pool(4, 64 * K, 1, 1);
    let mut chunk = p.try_acquire(0).unwrap();
    let index = chunk.index();
    chunk.fill(0);
    let (mut head, mut tail) = chunk.split_at(24 * K);
    assert_eq!((head.len(), tail.len()), (24 * K, 40 * K));
    assert_eq!(p.stats().in_use, 1, "one chunk, in two parts");
    let tail = thread::scope(|s| {
        let worker = s.spawn(move || {
            tail.fill(0xbb);
            tail
        });
        head.fill(0xaa);
        worker.join().unwrap()
    });
    let chunk = head.join(tail);
    assert_eq!(chunk.index(), index);
    assert!(chunk[..24 * K].iter().all(|&b| b == 0xaa));
    assert!(chunk[24 * K..].iter().all(|&b| b == 0xbb));
    drop(chunk);
    assert_eq!(p.stats().in_use, 0, "joined, then returned");
}

#[test]
#[should_panic(expected = "another chunk's tail")]
fn joining_another_chunks_tail_panics() {
    let p = pool(4, 64 * K, 1, 1);
    let (a, b) = (p.try_acquire(0).unwrap(), p.try_acquire(0).unwrap());
    let (head_a, _tail_a) = a.split_at(32 * K);
    let (_head_b, tail_b) = b.split_at(32 * K);
    let _ = head_a.join(tail_b);
}

#[test]
fn a_head_dropped_without_its_tail_never_returns_the_chunk() {
    // Its tail may still be written by another thread: the chunk is leaked, not reused.
    let p = pool(4, 64 * K, 1, 1);
    let (head, tail) = p.try_acquire(0).unwrap().split_at(4 * K);
    drop(head);
    assert_eq!(p.stats().in_use, 1);
    let _ = tail;
    assert_eq!(p.stats().in_use, 1, "still out of the pool");
    let held: Vec<_> = std::iter::from_fn(|| p.try_acquire(0)).collect();
    assert_eq!(held.len(), 3);
}

#[test]
#[should_panic(expected = "split of a chunk")]
fn a_split_at_the_end_panics() {
    let p = pool(4, 64 * K, 1, 1);
    let _ = p.try_acquire(0).unwrap().split_at(64 * K);
}
