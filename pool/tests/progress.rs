//! Forward progress: IOs larger than the pool, and queue depth x IO size far beyond the budget,
//! complete when callers follow the rule "never wait for a chunk while holding one".

mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use common::{block_on, pool, run_local, yield_now};
use ublk_crypt_pool::{Chunk, ReservePool};

const K: usize = 1024;
const CHUNK: usize = 64 * K;
const IO: usize = 1024 * K;

/// Stand-in for sector encryption: something position-dependent the test can check.
fn key_byte(io: u64, pos: usize) -> u8 {
    (io as u8).wrapping_mul(31) ^ (pos as u8).wrapping_mul(7) ^ (pos >> 12) as u8
}

/// Processes `src` into `dst` chunk by chunk, holding one pool chunk at a time, the way the
/// daemon must: acquire, encrypt into the chunk, "submit" it (await the device), release.
async fn process_io(pool: &ReservePool, queue: usize, io: u64, src: &[u8], dst: &mut [u8]) {
    for (seg, (s, d)) in src.chunks(CHUNK).zip(dst.chunks_mut(CHUNK)).enumerate() {
        let mut chunk: Chunk = pool.acquire(queue).await;
        for (i, (c, &b)) in chunk.iter_mut().zip(s).enumerate() {
            *c = b ^ key_byte(io, seg * CHUNK + i);
        }
        // The backing device completes the write some time later; the chunk is held meanwhile.
        yield_now().await;
        d.copy_from_slice(&chunk[..d.len()]);
        drop(chunk);
    }
}

fn check_io(io: u64, src: &[u8], dst: &[u8]) {
    for (pos, (&s, &d)) in src.iter().zip(dst).enumerate() {
        assert_eq!(d, s ^ key_byte(io, pos), "io {io} byte {pos}");
    }
}

/// Runs `f` on a thread and fails instead of hanging if it deadlocks.
fn within<F: FnOnce() + Send>(limit: Duration, f: F) {
    thread::scope(|s| {
        let (tx, rx) = mpsc::channel();
        s.spawn(move || {
            f();
            let _ = tx.send(());
        });
        match rx.recv_timeout(limit) {
            Ok(()) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {} // it panicked; scope re-raises
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!("no forward progress within {limit:?}: deadlock")
            }
        }
    });
}

#[test]
fn one_mib_io_through_two_free_chunks() {
    // 1 MiB pool: 16 chunks, 1 queue with 1 reserved. Another holder keeps 14 of them.
    let p = pool(IO / CHUNK, CHUNK, 1, 1);
    let hog: Vec<Chunk> = (0..14).map(|_| p.try_acquire(0).unwrap()).collect();
    assert_eq!(p.chunks() - p.stats().in_use, 2);
    let src: Vec<u8> = (0..IO).map(|i| (i * 131 + 7) as u8).collect();
    let mut dst = vec![0u8; IO];
    within(Duration::from_secs(60), || {
        block_on(process_io(&p, 0, 1, &src, &mut dst));
    });
    check_io(1, &src, &dst);
    // Two concurrent 1 MiB IOs through the same two chunks.
    let mut dst2 = vec![0u8; IO];
    within(Duration::from_secs(60), || {
        let tasks: Vec<Pin<Box<dyn Future<Output = ()> + '_>>> = vec![
            Box::pin(process_io(&p, 0, 2, &src, &mut dst)),
            Box::pin(process_io(&p, 0, 3, &src, &mut dst2)),
        ];
        run_local(tasks);
    });
    check_io(2, &src, &dst);
    check_io(3, &src, &dst2);
    assert!(p.stats().high_water <= 16);
    drop(hog);
    assert_eq!(p.stats().in_use, 0);
}

#[test]
fn depth_times_io_size_far_beyond_budget() {
    // 4 queues x 32 tags x 1 MiB = 128 MiB of IO in flight against a 1 MiB pool.
    const QUEUES: usize = 4;
    const TAGS: usize = 32;
    const ROUNDS: u64 = 2;
    let p = pool(IO / CHUNK, CHUNK, QUEUES, 2);
    let done = AtomicU64::new(0);
    within(Duration::from_secs(120), || {
        thread::scope(|s| {
            for q in 0..QUEUES {
                let (p, done) = (&p, &done);
                s.spawn(move || {
                    // One thread per queue with a single-threaded executor, like libublk.
                    let bufs: Vec<(Vec<u8>, Vec<u8>)> = (0..TAGS)
                        .map(|t| {
                            let src = (0..IO).map(|i| (i ^ t ^ q) as u8).collect();
                            (src, vec![0u8; IO])
                        })
                        .collect();
                    let tasks: Vec<Pin<Box<dyn Future<Output = ()> + '_>>> = bufs
                        .into_iter()
                        .enumerate()
                        .map(|(t, (src, mut dst))| {
                            Box::pin(async move {
                                for round in 0..ROUNDS {
                                    let io = ((q * TAGS + t) as u64) << 8 | round;
                                    process_io(p, q, io, &src, &mut dst).await;
                                    check_io(io, &src, &dst);
                                    done.fetch_add(1, Relaxed);
                                }
                            }) as Pin<Box<dyn Future<Output = ()>>>
                        })
                        .collect();
                    run_local(tasks);
                });
            }
        });
    });
    assert_eq!(done.load(Relaxed), (QUEUES * TAGS) as u64 * ROUNDS);
    let s = p.stats();
    assert_eq!((s.in_use, s.waiting), (0, 0));
    assert!(s.high_water <= 16);
    assert!(s.waits > 0, "the workload must actually have waited: {s:?}");
    for q in 0..QUEUES {
        assert!(p.queue_stats(q).high_water >= 1);
    }
}

#[test]
fn opportunistic_extra_chunks_via_try_acquire_keep_progress() {
    // IOs may grab a second chunk with try_acquire to overlap work, as long as they never wait
    // while holding one.
    const QUEUES: usize = 2;
    const TAGS: usize = 16;
    let p = pool(6, CHUNK, QUEUES, 1);
    let done = AtomicU64::new(0);
    within(Duration::from_secs(60), || {
        thread::scope(|s| {
            for q in 0..QUEUES {
                let (p, done) = (&p, &done);
                s.spawn(move || {
                    let tasks: Vec<Pin<Box<dyn Future<Output = ()> + '_>>> = (0..TAGS)
                        .map(|_| {
                            Box::pin(async move {
                                let mut left = IO;
                                while left > 0 {
                                    let first = p.acquire(q).await;
                                    let second = p.try_acquire(q);
                                    let n = if second.is_some() { 2 } else { 1 };
                                    yield_now().await;
                                    left = left.saturating_sub(n * first.len());
                                    drop((first, second));
                                }
                                done.fetch_add(1, Relaxed);
                            }) as Pin<Box<dyn Future<Output = ()>>>
                        })
                        .collect();
                    run_local(tasks);
                });
            }
        });
    });
    assert_eq!(done.load(Relaxed), (QUEUES * TAGS) as u64);
    assert_eq!(p.stats().in_use, 0);
}
