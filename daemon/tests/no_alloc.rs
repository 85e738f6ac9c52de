//! No heap allocation on the IO path in steady state, with the AES inline, on the crypto
//! worker threads, and placed by the queue threads' own policy (`QueueCrypto`): a counting
//! global allocator watches many requests — reads, writes larger than a pool chunk, flushes —
//! served by the same allocation-free executor the queue threads run, with backing operations
//! that suspend (like io_uring completions) so tasks really wait, wake and resume.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};

use common::{Completions, MemBacking, MemRequest};
use ublk_crypt::batch::PieceBatch;
use ublk_crypt::executor::TagExecutor;
use ublk_crypt::io::{op, InlineCrypto, IoDesc, IoPath, RateLimit, SectorCrypto};
use ublk_crypt::offload::CryptoWorkers;
use ublk_crypt::queue_crypto::{InFlight, QueueCrypto, WorkerWait};
use ublk_crypt::stats::QueueCounters;
use ublk_crypt_crypto::{CipherSpec, Key, SectorCipher, SectorLayout};
use ublk_crypt_pool::Chunk;
use ublk_crypt_pool::{PoolConfig, ReservePool};

struct Counting;
static ALLOCS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// Only the test's own thread is counted: libtest's other threads allocate when they like.
    static TRACKED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn count() {
    if TRACKED.with(|t| t.get()) {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: forwards to the system allocator unchanged; only counts calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        count();
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        count();
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const TAGS: u16 = 8;
const ROUNDS: usize = 200;

fn cipher() -> &'static SectorCipher {
    let key: Vec<u8> = (1..=64u8).collect();
    let spec: CipherSpec = "aes-xts-plain64".parse().unwrap();
    Box::leak(Box::new(
        SectorCipher::new(spec, &Key::from_bytes(&key), SectorLayout::default()).unwrap(),
    ))
}

/// Drives TAGS tasks of reads, 256 KiB writes and flushes through `IoPath::handle`, each with
/// the crypto `make_crypto(tag)` gives, and asserts nothing allocates after warm-up.
fn drive<C: SectorCrypto>(make_crypto: impl Fn(u16) -> C) {
    // 256 KiB (4 chunks) or 4 KiB.
    let sizes = [512, 512, 512, 512, 8, 8];
    drive_sized(
        TAGS,
        65536,
        &sizes,
        make_crypto,
        &InFlight::default(),
        || false,
    )
}

/// `drive` with `tags` tasks, pool chunks of `chunk_bytes` and requests of `sizes` (sectors, in turn), counting the requests being served in
/// `in_flight` (as a queue thread's tag loop does), with `end_of_round` run after each executor
/// pass until it returns false (the queue thread's `PieceBatch::flush`).
fn drive_sized<C: SectorCrypto>(
    tags: u16,
    chunk_bytes: usize,
    sizes: &[u32],
    make_crypto: impl Fn(u16) -> C,
    in_flight: &InFlight,
    end_of_round: impl Fn() -> bool,
) {
    // Fewer chunks than tags: tasks must wait for each other's chunks.
    let pool: &'static ReservePool = Box::leak(Box::new(
        ReservePool::new(PoolConfig {
            budget_bytes: 3 * chunk_bytes,
            chunk_bytes,
            queues: 1,
            reserve_per_queue: 2,
            lock: false,
        })
        .unwrap(),
    ));
    let counters = QueueCounters::default();
    let log = RateLimit::new(1000);
    let io = IoPath {
        pool,
        queue: 0,
        data_offset: 4096,
        readonly: false,
        allow_discards: false,
        counters: &counters,
        error_log: &log,
    };
    let completions: &'static Completions = Box::leak(Box::new(Completions::default()));
    let mut backing = MemBacking::new(8 << 20);
    backing.completions = Some(completions);
    let requests: Vec<MemRequest> = (0..tags)
        .map(|t| MemRequest(RefCell::new(vec![t as u8; 1 << 20])))
        .collect();

    // Each tag runs like serve_tag: a loop over requests, here a fixed mix per round.
    let task = |tag: u16| {
        let (io, backing, req, crypto) = (&io, &backing, &requests[tag as usize], make_crypto(tag));
        async move {
            for round in 0..ROUNDS {
                let start = u64::from(tag) * 512 + (round as u64 % 4) * 8;
                let nr = sizes[round % sizes.len()];
                let o = [op::WRITE, op::READ, op::FLUSH][round % 3];
                let desc = IoDesc {
                    op: o,
                    start_sector: start,
                    nr_sectors: nr,
                };
                let r = in_flight
                    .serving(desc.op == op::READ, io.handle(&desc, req, backing, &crypto))
                    .await;
                assert!(r >= 0, "IO failed: {r}");
            }
        }
    };
    let exe = TagExecutor::new((0..tags).map(task));
    // The event loop of a queue thread: poll what is ready, then "reap completions".
    // The first pass is warm-up; everything after it is counted.
    exe.run_ready();
    completions.reap();
    TRACKED.with(|t| t.set(true));
    let before = ALLOCS.load(Ordering::Relaxed);
    let mut loops = 0;
    while !exe.all_done() {
        exe.run_ready();
        while end_of_round() {
            exe.run_ready();
        }
        completions.reap();
        loops += 1;
        assert!(loops < 10_000_000, "executor made no progress");
    }
    let after = ALLOCS.load(Ordering::Relaxed);
    TRACKED.with(|t| t.set(false));
    assert!(
        loops > 100,
        "tasks really suspended and resumed ({loops} event-loop passes)"
    );
    assert_eq!(after - before, 0, "allocations on the IO path");
    let s = counters.snapshot();
    assert_eq!(s.errors, 0);
    let per_op = (ROUNDS / 4 * tags as usize) as u64;
    assert!(s.writes > per_op && s.reads > per_op, "{s:?}");
    assert!(
        tags <= 3 || pool.stats().waits > 0,
        "tasks really waited for chunks: {:?}",
        pool.stats()
    );
}

#[test]
fn io_path_allocates_nothing_in_steady_state() {
    let c = cipher();
    drive(|_| InlineCrypto(c));
}

/// The wait for a worker minus io_uring: the slot's eventfd polled without blocking (the daemon
/// polls it on its ring). Counts the waits, so a test can tell that work went to a worker.
#[derive(Clone, Copy)]
struct PolledWait(&'static AtomicU64);

impl WorkerWait for PolledWait {
    async fn wait(&self, workers: &CryptoWorkers, slot: usize) {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::BorrowedFd;
        self.0.fetch_add(1, Ordering::Relaxed);
        let fd = workers.done_fd(slot);
        loop {
            // SAFETY: the eventfd lives as long as the leaked workers.
            let bfd = unsafe { BorrowedFd::borrow_raw(fd) };
            let mut fds = [PollFd::new(bfd, PollFlags::POLLIN)];
            if poll(&mut fds, PollTimeout::ZERO).unwrap() == 1 {
                assert!(workers.take_done(slot));
                break;
            }
            common::YieldNow::default().await;
        }
    }
}

/// Every piece handed to a worker alone, whatever the queue's policy would say.
struct PolledWorkers {
    workers: &'static CryptoWorkers,
    slot: usize,
    wait: PolledWait,
}

impl SectorCrypto for PolledWorkers {
    async fn crypt(
        &self,
        chunk: Chunk<'static>,
        len: usize,
        sector: u64,
        encrypt: bool,
    ) -> (Chunk<'static>, bool) {
        self.workers.submit(self.slot, chunk, len, sector, encrypt);
        self.wait.wait(self.workers, self.slot).await;
        self.workers.finish(self.slot)
    }
}

/// `threads` crypto workers, one slot per tag. Worker threads are counted too: they mark
/// themselves tracked when they start.
fn tracked_workers(threads: usize) -> &'static CryptoWorkers {
    let protections = ublk_crypt::hardening::Protections { enabled: false };
    CryptoWorkers::start(cipher(), TAGS as usize, threads, protections, || {
        TRACKED.with(|t| t.set(true))
    })
    .unwrap()
}

#[test]
fn crypto_workers_allocate_nothing_in_steady_state() {
    let workers = tracked_workers(2);
    let waits: &'static AtomicU64 = Box::leak(Box::new(AtomicU64::new(0)));
    drive(|tag| PolledWorkers {
        workers,
        slot: tag as usize,
        wait: PolledWait(waits),
    });
    assert!(waits.load(Ordering::Relaxed) > 0);
}

/// Requests of `sizes` (sectors) through the queue threads' own policy (`QueueCrypto`) with
/// one crypto worker; returns how often a task waited for the worker.
fn drive_queue_policy(sizes: &[u32]) -> u64 {
    drive_queue_policy_with(TAGS, 65536, sizes).0
}

/// `drive_queue_policy` with `tags` tasks and pool chunks of `chunk_bytes`; returns the waits
/// for the worker and the pieces split between the queue thread and the worker.
fn drive_queue_policy_with(tags: u16, chunk_bytes: usize, sizes: &[u32]) -> (u64, u64) {
    let workers = tracked_workers(1);
    let cipher = cipher();
    let batch: &'static PieceBatch = Box::leak(Box::new(PieceBatch::new(TAGS as usize, 0)));
    let in_flight: &'static InFlight = Box::leak(Box::default());
    let waits: &'static AtomicU64 = Box::leak(Box::new(AtomicU64::new(0)));
    let counters: &'static QueueCounters = Box::leak(Box::default());
    drive_sized(
        tags,
        chunk_bytes,
        sizes,
        |tag| QueueCrypto {
            cipher,
            workers: Some(workers),
            slot: usize::from(tag),
            tag,
            in_flight,
            batch,
            counters,
            wait: PolledWait(waits),
        },
        in_flight,
        || batch.flush(workers),
    );
    (
        waits.load(Ordering::Relaxed),
        counters.snapshot().split_pieces,
    )
}

/// The queue's policy with large and small pieces: inline, alone on a worker, or batched.
#[test]
fn the_queue_policy_allocates_nothing_in_steady_state() {
    assert!(drive_queue_policy(&[512, 512, 512, 512, 8, 8]) > 0);
}

/// A lone request's 256 KiB pieces cut in two, the upper half on the worker (the policy at
/// queue depth 1): the split and the join allocate nothing either.
#[test]
fn split_pieces_of_a_lone_request_allocate_nothing_in_steady_state() {
    let (waits, split) = drive_queue_policy_with(1, 256 << 10, &[2048, 512, 8]);
    assert!(
        split > 0 && waits >= split,
        "pieces were split: {split}, waits {waits}"
    );
}

/// With every tag busy, small pieces are parked and shared out at the end of the round. Only
/// 4 KiB requests here, so every wait for the worker is a batch of small pieces.
#[test]
fn batched_small_pieces_allocate_nothing_in_steady_state() {
    assert!(
        drive_queue_policy(&[8]) > 0,
        "some small pieces really went to the worker"
    );
}

/// The IO path's error messages (kernel_log.rs) are formatted on the stack and written with one
/// syscall: logging an IO error under memory pressure must not allocate either. (Where
/// `/dev/kmsg` cannot be opened the write is skipped, and the formatting is checked alone.)
#[test]
fn io_error_messages_allocate_nothing() {
    ublk_crypt::kernel_log::open();
    let mut buf = [0u8; 256];
    TRACKED.with(|t| t.set(true));
    let before = ALLOCS.load(Ordering::Relaxed);
    for i in 0..10u64 {
        ublk_crypt::kernel_log::error(format_args!(
            "test of the IO path's error line {i} (not an error): queue {} sector {} errno {}",
            0,
            i * 8,
            5
        ));
        let line = ublk_crypt::kernel_log::format_line(&mut buf, 3, 1, format_args!("{i}"));
        assert!(!line.is_empty());
    }
    let after = ALLOCS.load(Ordering::Relaxed);
    TRACKED.with(|t| t.set(false));
    assert_eq!(after - before, 0, "allocations while logging an IO error");
}
