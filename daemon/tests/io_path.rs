//! The IO path against in-memory fakes: what reaches the backing is exactly dm-crypt's
//! ciphertext, reads decrypt it back, large IOs go through a two-chunk pool piece by piece, and
//! every refusal has the right errno.

mod common;

use std::cell::RefCell;

use common::{MemBacking, MemRequest};
use ublk_crypt::executor::block_on;
use ublk_crypt::io::{op, InlineCrypto, IoDesc, IoPath, RateLimit, TRANSIENT_RETRIES};
use ublk_crypt::stats::QueueCounters;
use ublk_crypt_crypto::{CipherSpec, Key, SectorCipher, SectorLayout};
use ublk_crypt_pool::{PoolConfig, ReservePool};

fn cipher(sector_size: u32) -> SectorCipher {
    let key: Vec<u8> = (0..64u8)
        .map(|i| i.wrapping_mul(13).wrapping_add(1))
        .collect();
    let spec: CipherSpec = "aes-xts-plain64".parse().unwrap();
    let layout = SectorLayout {
        sector_size,
        iv_large_sectors: false,
        iv_offset: 0,
    };
    SectorCipher::new(spec, &Key::from_bytes(&key), layout).unwrap()
}

/// The smallest legal pool: one reserve chunk for the single queue plus one shared. Leaked,
/// like the daemon's: chunks are `Chunk<'static>` so they can move to crypto workers.
fn tiny_pool(chunk_bytes: usize) -> &'static ReservePool {
    Box::leak(Box::new(
        ReservePool::new(PoolConfig {
            budget_bytes: 2 * chunk_bytes,
            chunk_bytes,
            queues: 1,
            reserve_per_queue: 1,
            lock: false,
        })
        .unwrap(),
    ))
}

struct Rig {
    cipher: SectorCipher,
    pool: &'static ReservePool,
    counters: QueueCounters,
    log: RateLimit,
}

impl Rig {
    fn new(sector_size: u32) -> Rig {
        Rig::with_chunks(sector_size, 65536)
    }
    fn with_chunks(sector_size: u32, chunk_bytes: usize) -> Rig {
        Rig {
            cipher: cipher(sector_size),
            pool: tiny_pool(chunk_bytes),
            counters: QueueCounters::default(),
            log: RateLimit::new(1000),
        }
    }
    fn path(&self, data_offset: u64, readonly: bool, allow_discards: bool) -> IoPath<'_> {
        IoPath {
            pool: self.pool,
            queue: 0,
            data_offset,
            readonly,
            allow_discards,
            counters: &self.counters,
            error_log: &self.log,
        }
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn one_mib_write_then_read_through_a_two_chunk_pool() {
    for sector_size in [512u32, 4096] {
        let rig = Rig::new(sector_size);
        let io = rig.path(8192, false, false);
        let backing = MemBacking::new(4 << 20);
        let plain = pattern(1 << 20, 7);
        let req = MemRequest(RefCell::new(plain.clone()));
        let desc = IoDesc {
            op: op::WRITE,
            start_sector: 2048,
            nr_sectors: (1 << 20) >> 9,
        };
        assert_eq!(
            block_on(io.handle(&desc, &req, &backing, &InlineCrypto(&rig.cipher))),
            1 << 20
        );

        // The write overlapped its pieces: piece k+1 encrypted in the spare chunk (taken with
        // try_acquire, never waited for) while piece k was written.
        assert_eq!(
            rig.pool.stats().high_water,
            2,
            "the write used the spare chunk"
        );
        assert_eq!(
            rig.pool.stats().in_use,
            0,
            "every chunk returned after the write"
        );

        // What landed on the backing, after the 8 KiB offset, is dm-crypt's ciphertext.
        let mut expect = plain.clone();
        rig.cipher.encrypt(2048, &mut expect).unwrap();
        let start = 8192 + (2048 << 9);
        assert!(
            backing.data.borrow()[start..start + (1 << 20)] == expect[..],
            "ciphertext on disk"
        );
        assert!(
            backing.data.borrow()[..8192].iter().all(|&b| b == 0),
            "offset area untouched"
        );

        let out = MemRequest(RefCell::new(vec![0; 1 << 20]));
        let desc = IoDesc {
            op: op::READ,
            ..desc
        };
        assert_eq!(
            block_on(io.handle(&desc, &out, &backing, &InlineCrypto(&rig.cipher))),
            1 << 20
        );
        assert!(*out.0.borrow() == plain, "read back plaintext");

        let s = rig.counters.snapshot();
        assert_eq!((s.reads, s.writes, s.split_ios, s.errors), (1, 1, 2, 0));
        assert_eq!(s.bytes_written, 1 << 20);
        assert_eq!(rig.pool.stats().in_use, 0, "every chunk returned");
        // Reads read ahead into a second chunk when try_acquire finds it free (never by
        // waiting), so the pool's two chunks both serve.
        assert_eq!(
            rig.pool.stats().high_water,
            2,
            "read-ahead used the spare chunk"
        );
    }
}

#[test]
fn short_backing_transfers_are_completed() {
    let rig = Rig::new(512);
    let io = rig.path(0, false, false);
    let mut backing = MemBacking::new(1 << 20);
    backing.max_transfer = 1000; // not even sector-aligned
    let plain = pattern(128 << 10, 3);
    let req = MemRequest(RefCell::new(plain.clone()));
    let desc = IoDesc {
        op: op::WRITE,
        start_sector: 0,
        nr_sectors: 256,
    };
    assert_eq!(
        block_on(io.handle(&desc, &req, &backing, &InlineCrypto(&rig.cipher))),
        128 << 10
    );
    let out = MemRequest(RefCell::new(vec![0; 128 << 10]));
    assert_eq!(
        block_on(io.handle(
            &IoDesc {
                op: op::READ,
                ..desc
            },
            &out,
            &backing,
            &InlineCrypto(&rig.cipher)
        )),
        128 << 10
    );
    assert!(*out.0.borrow() == plain);
}

#[test]
fn refusals_and_errors_have_the_right_errno() {
    let rig = Rig::new(512);
    let backing = MemBacking::new(1 << 20);
    let req = MemRequest(RefCell::new(vec![1; 4096]));
    let w = IoDesc {
        op: op::WRITE,
        start_sector: 0,
        nr_sectors: 8,
    };
    assert_eq!(
        block_on(
            rig.path(0, true, false)
                .handle(&w, &req, &backing, &InlineCrypto(&rig.cipher))
        ),
        -libc::EROFS
    );
    let d = IoDesc {
        op: op::DISCARD,
        start_sector: 8,
        nr_sectors: 8,
    };
    assert_eq!(
        block_on(
            rig.path(0, false, false)
                .handle(&d, &req, &backing, &InlineCrypto(&rig.cipher))
        ),
        -libc::EOPNOTSUPP
    );
    assert_eq!(
        block_on(
            rig.path(512, false, true)
                .handle(&d, &req, &backing, &InlineCrypto(&rig.cipher))
        ),
        0
    );
    assert_eq!(*backing.discards.borrow(), vec![(512 + 4096, 4096)]);
    let z = IoDesc {
        op: op::WRITE_ZEROES,
        ..d
    };
    assert_eq!(
        block_on(
            rig.path(0, false, true)
                .handle(&z, &req, &backing, &InlineCrypto(&rig.cipher))
        ),
        -libc::EOPNOTSUPP
    );
    let f = IoDesc {
        op: op::FLUSH,
        start_sector: 0,
        nr_sectors: 0,
    };
    assert_eq!(
        block_on(
            rig.path(0, false, false)
                .handle(&f, &req, &backing, &InlineCrypto(&rig.cipher))
        ),
        0
    );
    assert_eq!(*backing.flushes.borrow(), 1);
    let bad = IoDesc { op: 77, ..f };
    assert_eq!(
        block_on(rig.path(0, false, false).handle(
            &bad,
            &req,
            &backing,
            &InlineCrypto(&rig.cipher)
        )),
        -libc::EINVAL
    );

    let mut failing = MemBacking::new(1 << 20);
    failing.fail = Some(libc::EIO);
    assert_eq!(
        block_on(
            rig.path(0, false, false)
                .handle(&w, &req, &failing, &InlineCrypto(&rig.cipher))
        ),
        -libc::EIO
    );
    assert_eq!(rig.pool.stats().in_use, 0, "a failed IO returns its chunk");
    // A write of four pieces whose backing fails while the next piece is being encrypted in
    // the spare chunk: EIO, and both chunks come back.
    let big = MemRequest(RefCell::new(vec![2; 256 << 10]));
    let w4 = IoDesc {
        nr_sectors: (256 << 10) >> 9,
        ..w
    };
    assert_eq!(
        block_on(
            rig.path(0, false, false)
                .handle(&w4, &big, &failing, &InlineCrypto(&rig.cipher))
        ),
        -libc::EIO
    );
    assert_eq!(
        rig.pool.stats().in_use,
        0,
        "a failed pipelined write returns both chunks"
    );
    assert!(rig.counters.snapshot().errors >= 6);
}

/// Issue 18 item 7: a transient backing error (io_uring or the backing short of memory for a
/// moment) is retried, never the IO's result; one that persists past the bound, or any other
/// error, reaches the kernel as EIO.
#[test]
fn transient_backing_errors_are_retried_and_others_become_eio() {
    let rig = Rig::new(512);
    let io = rig.path(0, false, true);
    let crypto = InlineCrypto(&rig.cipher);
    let plain = pattern(128 << 10, 5);
    let w = IoDesc {
        op: op::WRITE,
        start_sector: 16,
        nr_sectors: 256,
    };
    let r = IoDesc { op: op::READ, ..w };
    let f = IoDesc {
        op: op::FLUSH,
        start_sector: 0,
        nr_sectors: 0,
    };
    let d = IoDesc {
        op: op::DISCARD,
        ..w
    };
    let retries = || rig.counters.snapshot().backing_retries;
    for errno in [libc::EAGAIN, libc::EINTR, libc::ENOMEM, libc::ECANCELED] {
        let mut backing = MemBacking::new(1 << 20);
        backing.fail = Some(errno);
        let before = retries();
        backing.fail_left.set(3);
        let req = MemRequest(RefCell::new(plain.clone()));
        assert_eq!(block_on(io.handle(&w, &req, &backing, &crypto)), 128 << 10);
        backing.fail_left.set(3);
        let out = MemRequest(RefCell::new(vec![0; 128 << 10]));
        assert_eq!(block_on(io.handle(&r, &out, &backing, &crypto)), 128 << 10);
        assert!(*out.0.borrow() == plain, "errno {errno}: data intact");
        backing.fail_left.set(2);
        assert_eq!(block_on(io.handle(&f, &req, &backing, &crypto)), 0);
        backing.fail_left.set(2);
        assert_eq!(block_on(io.handle(&d, &req, &backing, &crypto)), 0);
        assert_eq!(
            retries() - before,
            10,
            "errno {errno}: every failure retried"
        );
    }
    let errors = rig.counters.snapshot().errors;
    assert_eq!(errors, 0, "no transient error became the IO's result");

    // A transient error that persists: EIO after the bound, not a wait for ever.
    let mut stuck = MemBacking::new(1 << 20);
    stuck.fail = Some(libc::ENOMEM);
    let before = retries();
    let req = MemRequest(RefCell::new(plain.clone()));
    assert_eq!(block_on(io.handle(&w, &req, &stuck, &crypto)), -libc::EIO);
    assert_eq!(retries() - before, u64::from(TRANSIENT_RETRIES));
    // Anything else is EIO at once, whatever the backing said.
    for errno in [libc::ENOSPC, libc::EINVAL, libc::EBADF, libc::EIO] {
        let mut failing = MemBacking::new(1 << 20);
        failing.fail = Some(errno);
        let before = retries();
        assert_eq!(block_on(io.handle(&w, &req, &failing, &crypto)), -libc::EIO);
        assert_eq!(block_on(io.handle(&f, &req, &failing, &crypto)), -libc::EIO);
        assert_eq!(retries(), before, "errno {errno} is not retried");
    }
    assert_eq!(rig.pool.stats().in_use, 0, "failed IOs return their chunks");
}

#[test]
fn misaligned_io_for_4k_sectors_is_rejected_not_corrupted() {
    let rig = Rig::new(4096);
    let backing = MemBacking::new(1 << 20);
    let req = MemRequest(RefCell::new(vec![9; 4096]));
    let w = IoDesc {
        op: op::WRITE,
        start_sector: 1,
        nr_sectors: 8,
    };
    assert_eq!(
        block_on(
            rig.path(0, false, false)
                .handle(&w, &req, &backing, &InlineCrypto(&rig.cipher))
        ),
        -libc::EINVAL
    );
    assert!(backing.data.borrow().iter().all(|&b| b == 0));
}

/// The wait for a crypto worker as a blocking poll of the slot's eventfd (the daemon polls it
/// on its ring).
struct BlockingWait;

impl ublk_crypt::queue_crypto::WorkerWait for BlockingWait {
    async fn wait(&self, workers: &ublk_crypt::offload::CryptoWorkers, slot: usize) {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::BorrowedFd;
        // SAFETY: the eventfd lives as long as the leaked workers.
        let fd = unsafe { BorrowedFd::borrow_raw(workers.done_fd(slot)) };
        let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
        assert_eq!(poll(&mut fds, PollTimeout::NONE).unwrap(), 1);
        assert!(workers.take_done(slot));
    }
}

/// A lone request's large pieces are cut in two, the upper half on a crypto worker, the lower
/// on the queue thread (`queue_crypto::worth_splitting`): what lands on the backing is still
/// exactly dm-crypt's ciphertext, reads give back the plaintext, for sizes around the split
/// threshold and a 1 MiB request of four pieces, with 512- and 4096-byte sectors; and every
/// chunk goes back to the pool joined.
#[test]
fn a_lone_requests_pieces_split_between_two_threads_keep_the_on_disk_format() {
    use ublk_crypt::batch::PieceBatch;
    use ublk_crypt::offload::CryptoWorkers;
    use ublk_crypt::queue_crypto::{InFlight, QueueCrypto, MIN_SPLIT_BYTES};
    for sector_size in [512u32, 4096] {
        let rig = Rig::with_chunks(sector_size, 256 << 10);
        let io = rig.path(4096, false, false);
        // The workers need a cipher that lives for ever; the rig's is the reference.
        let cipher: &'static SectorCipher = Box::leak(Box::new(cipher(sector_size)));
        let protections = ublk_crypt::hardening::Protections { enabled: false };
        let workers = CryptoWorkers::start(cipher, 1, 1, protections, || {}).unwrap();
        let in_flight = InFlight::default();
        let batch = PieceBatch::new(1, 0);
        let crypto = QueueCrypto {
            cipher,
            workers: Some(workers),
            slot: 0,
            tag: 0,
            in_flight: &in_flight,
            batch: &batch,
            counters: &rig.counters,
            wait: BlockingWait,
        };
        let backing = MemBacking::new(4 << 20);
        let min = MIN_SPLIT_BYTES;
        let mut split = 0;
        for (i, len) in [
            min - 4096,
            min,
            min + 4096,
            200 << 10,
            1 << 20,
            (1 << 20) + 8192,
        ]
        .into_iter()
        .enumerate()
        {
            let plain = pattern(len, i as u8);
            let desc = IoDesc {
                op: op::WRITE,
                start_sector: 8 * (i as u64 + 1),
                nr_sectors: (len >> 9) as u32,
            };
            let req = MemRequest(RefCell::new(plain.clone()));
            let w = block_on(in_flight.serving(false, io.handle(&desc, &req, &backing, &crypto)));
            assert_eq!(w, len as i32);
            let mut expect = plain.clone();
            rig.cipher.encrypt(desc.start_sector, &mut expect).unwrap();
            let start = 4096 + ((desc.start_sector as usize) << 9);
            assert!(
                backing.data.borrow()[start..start + len] == expect[..],
                "dm-crypt's ciphertext, {len} bytes, sector size {sector_size}"
            );
            let out = MemRequest(RefCell::new(vec![0; len]));
            let read = IoDesc {
                op: op::READ,
                ..desc
            };
            let r = block_on(in_flight.serving(true, io.handle(&read, &out, &backing, &crypto)));
            assert_eq!(r, len as i32);
            assert!(
                *out.0.borrow() == plain,
                "{len} bytes, sector size {sector_size}"
            );
            assert_eq!(rig.pool.stats().in_use, 0, "every chunk returned");
            let now = rig.counters.snapshot().split_pieces;
            assert_eq!(now > split, len >= min, "{len} bytes: split or not");
            split = now;
        }
    }
}
