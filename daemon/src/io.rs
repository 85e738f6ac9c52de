//! The IO path, top to bottom: fetch → (decrypt | encrypt) → backing IO → commit.
//!
//! [`IoPath::handle`] serves one ublk request. The fetch and the commit are libublk's (see
//! `queue.rs`); between them, data moves in pool-sized pieces:
//!
//! ```text
//! WRITE: for each piece: chunk ← pool;  request → chunk (user copy);  encrypt(chunk);  chunk → backing
//! READ:  for each piece: chunk ← pool;  backing → chunk;  decrypt(chunk);  chunk → request (user copy)
//! ```
//!
//! A request of several pieces overlaps them two at a time when a second chunk is free at once
//! (never waited for): a read decrypts piece k while piece k+1 is read, a write writes piece k
//! while piece k+1 is encrypted.
//!
//! The AES itself goes through [`SectorCrypto`]: inline on the queue thread, or (in the daemon,
//! for pieces of at least 32 KiB while the queue has other work) on the crypto workers of
//! `offload.rs`, so one queue can use every CPU the way dm-crypt's kcryptd does.
//!
//! Plaintext never touches the backing and ciphertext never reaches the request; encryption
//! happens in the locked pool chunk, never in the caller's pages. Each IO holds at most one
//! chunk and never waits for the pool while holding one, which is the pool's forward-progress
//! rule: an IO larger than what is free is processed chunk by chunk with only the queue's
//! reserve. Nothing here allocates: the request data and the backing are reached through the
//! two traits below, whose production implementations (user copy on `/dev/ublkcN`, io_uring on
//! the queue's ring) are syscalls and preallocated ring entries.
//!
//! A backing error never reaches the kernel as itself: a transient one (EAGAIN, EINTR, ENOMEM,
//! ECANCELED: io_uring or the backing short of something for a moment, which is exactly what
//! memory pressure looks like) is retried, up to [`TRANSIENT_RETRIES`] times; anything else,
//! or a transient error that persists, is EIO. A failed swap-in kills the process that owns
//! the page, so an error that the next attempt would not have is never worth returning; and
//! the block layer and swap make sense of EIO, not of the backing's own errno.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use ublk_crypt_crypto::SectorCipher;
use ublk_crypt_pool::{Chunk, ReservePool};

use crate::stats::QueueCounters;

/// ublk operation codes (`UBLK_IO_OP_*`).
pub mod op {
    pub const READ: u32 = 0;
    pub const WRITE: u32 = 1;
    pub const FLUSH: u32 = 2;
    pub const DISCARD: u32 = 3;
    pub const WRITE_SAME: u32 = 4;
    pub const WRITE_ZEROES: u32 = 5;
}

/// One request as ublk describes it (a copy of `ublksrv_io_desc`'s fields).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoDesc {
    pub op: u32,
    /// Start, in 512-byte sectors.
    pub start_sector: u64,
    /// Length, in 512-byte sectors.
    pub nr_sectors: u32,
}

/// The request's data pages, which live in the kernel; with `UBLK_F_USER_COPY` the daemon
/// copies them in and out (pread/pwrite on `/dev/ublkcN`).
pub trait RequestData {
    /// Copies `buf.len()` bytes of the (write) request, from `offset` in it, into `buf`.
    fn copy_out(&self, offset: u32, buf: &mut [u8]) -> Result<(), i32>;
    /// Copies `buf` into the (read) request at `offset`.
    fn copy_in(&self, offset: u32, buf: &[u8]) -> Result<(), i32>;
}

/// The backing store. Results are byte counts or negative errno, like io_uring's.
#[allow(async_fn_in_trait)] // used only with static dispatch, on one thread
pub trait BackingIo {
    async fn read_at(&self, buf: &mut [u8], offset: u64) -> i32;
    async fn write_at(&self, buf: &[u8], offset: u64) -> i32;
    /// Makes every completed write durable (fdatasync).
    async fn flush(&self) -> i32;
    /// Discards a range (punch hole / BLKDISCARD).
    async fn discard(&self, offset: u64, len: u64) -> i32;
}

/// Encrypts or decrypts `chunk[..len]` in place, sector numbers starting at `sector`, and
/// gives the chunk back with the cipher's verdict. The chunk moves in and out so that the work
/// may happen on another thread without sharing memory.
#[allow(async_fn_in_trait)] // used only with static dispatch, on one thread
pub trait SectorCrypto {
    async fn crypt(
        &self,
        chunk: Chunk<'static>,
        len: usize,
        sector: u64,
        encrypt: bool,
    ) -> (Chunk<'static>, bool);

    /// Like `crypt`, for a piece whose request has other work in flight meanwhile (the next
    /// piece's backing read): worth another thread even when the queue has nothing else to do.
    async fn crypt_overlapped(
        &self,
        chunk: Chunk<'static>,
        len: usize,
        sector: u64,
        encrypt: bool,
    ) -> (Chunk<'static>, bool) {
        self.crypt(chunk, len, sector, encrypt).await
    }
}

/// The AES on the calling thread.
pub struct InlineCrypto<'a>(pub &'a SectorCipher);

impl InlineCrypto<'_> {
    pub fn run(cipher: &SectorCipher, chunk: &mut [u8], sector: u64, encrypt: bool) -> bool {
        if encrypt {
            cipher.encrypt(sector, chunk).is_ok()
        } else {
            cipher.decrypt(sector, chunk).is_ok()
        }
    }
}

impl SectorCrypto for InlineCrypto<'_> {
    async fn crypt(
        &self,
        mut chunk: Chunk<'static>,
        len: usize,
        sector: u64,
        encrypt: bool,
    ) -> (Chunk<'static>, bool) {
        let ok = Self::run(self.0, &mut chunk[..len], sector, encrypt);
        (chunk, ok)
    }
}

/// How often one backing operation is resubmitted after a transient error before the IO fails
/// with EIO. Each try is a round trip through the queue's ring, so this bounds a burst of
/// failures to well under a millisecond of retrying, not a wait for memory that may never come.
pub const TRANSIENT_RETRIES: u32 = 64;

/// Errors that the next attempt may not have: io_uring or the backing short of memory or
/// interrupted, an operation cancelled under it.
fn is_transient(res: i32) -> bool {
    matches!(
        -res,
        libc::EAGAIN | libc::EINTR | libc::ENOMEM | libc::ECANCELED
    )
}

/// Everything one queue needs to serve requests; one per queue thread.
pub struct IoPath<'a> {
    /// The daemon's pool lives as long as the process; chunks may move to crypto workers.
    pub pool: &'static ReservePool,
    pub queue: usize,
    /// Byte offset of device sector 0 on the backing (`--offset`).
    pub data_offset: u64,
    pub readonly: bool,
    pub allow_discards: bool,
    pub counters: &'a QueueCounters,
    pub error_log: &'a RateLimit,
}

impl IoPath<'_> {
    /// Serves one request; returns what to commit: bytes done, or a negative errno.
    pub async fn handle(
        &self,
        io: &IoDesc,
        req: &impl RequestData,
        backing: &impl BackingIo,
        crypto: &impl SectorCrypto,
    ) -> i32 {
        let res = match io.op {
            op::READ => self.read(io, req, backing, crypto).await,
            op::WRITE if self.readonly => -libc::EROFS,
            op::WRITE => self.write(io, req, backing, crypto).await,
            op::FLUSH => {
                QueueCounters::add(&self.counters.flushes, 1);
                self.retrying(|| backing.flush()).await
            }
            op::DISCARD if self.allow_discards && !self.readonly => {
                QueueCounters::add(&self.counters.discards, 1);
                let (off, len) = self.backing_range(io);
                self.retrying(|| backing.discard(off, len)).await
            }
            // Not advertised; a zeroed plaintext is not zeroed ciphertext, so these could only
            // be served by encrypting zeros, which the kernel already does for us when the
            // device does not claim support.
            op::DISCARD | op::WRITE_ZEROES | op::WRITE_SAME => -libc::EOPNOTSUPP,
            _ => -libc::EINVAL,
        };
        if res < 0 {
            QueueCounters::add(&self.counters.errors, 1);
            if self.error_log.allow() {
                // To the kernel log, not stderr: see kernel_log.rs for why.
                crate::kernel_log::error(format_args!(
                    "queue {} op {} sector {} sectors {}: IO failed, errno {}",
                    self.queue, io.op, io.start_sector, io.nr_sectors, -res
                ));
            }
        }
        res
    }

    /// Runs one backing operation, resubmitting it after a transient error (see the module
    /// doc); a failure that remains is [`Self::backing_failed`]'s EIO.
    async fn retrying<F: std::future::Future<Output = i32>>(&self, op: impl Fn() -> F) -> i32 {
        let mut tries = 0;
        loop {
            let r = op().await;
            if r >= 0 {
                return r;
            }
            if !is_transient(r) || tries == TRANSIENT_RETRIES {
                return self.backing_failed(r);
            }
            tries += 1;
            QueueCounters::add(&self.counters.backing_retries, 1);
        }
    }

    /// A backing error that stays: EIO for the kernel. Another errno is the cause worth
    /// knowing, so it goes to the kernel log first, under the same once-a-second limit as the
    /// IO's own line (which then names EIO): one line per burst, the cause's.
    fn backing_failed(&self, res: i32) -> i32 {
        if res == -libc::EOPNOTSUPP {
            // A backing that cannot discard: an answer about the request, not a failure.
            return res;
        }
        if res != -libc::EIO && self.error_log.allow() {
            crate::kernel_log::error(format_args!(
                "queue {}: backing IO failed, errno {} (the IO fails with EIO)",
                self.queue, -res
            ));
        }
        -libc::EIO
    }

    fn backing_range(&self, io: &IoDesc) -> (u64, u64) {
        (
            self.data_offset + (io.start_sector << 9),
            u64::from(io.nr_sectors) << 9,
        )
    }

    /// A chunk for the next piece: at once if one is free to this queue, else the first one
    /// returned (the pool's `acquire` tries before it waits). Never called while this IO
    /// holds another chunk.
    async fn chunk(&self) -> Chunk<'static> {
        self.pool.acquire(self.queue).await
    }

    /// Writes are pipelined like reads: while piece k is written to the backing, piece k+1 is
    /// copied in and encrypted (on a crypto worker when one is idle: `crypt_overlapped`) — in a
    /// second chunk taken with `try_acquire`, which never waits, so the pool's rule holds.
    /// Without a spare chunk it falls back to one piece at a time. A lone 1 MiB write at queue
    /// depth 1 thus keeps the disk and a second CPU busy at once (issue 21 item 4), where it
    /// used to alternate: copy, AES, write, wait, four times over.
    async fn write(
        &self,
        io: &IoDesc,
        req: &impl RequestData,
        backing: &impl BackingIo,
        crypto: &impl SectorCrypto,
    ) -> i32 {
        let total = (io.nr_sectors as usize) << 9;
        let (base, _) = self.backing_range(io);
        let mut done = 0usize;
        // The piece at `done`, already copied in and encrypted.
        let mut cur: Option<Chunk<'static>> = None;
        while done < total {
            let chunk = match cur.take() {
                Some(c) => c,
                None => {
                    let mut c = self.chunk().await;
                    let n = (total - done).min(c.len());
                    if let Err(e) = req.copy_out(done as u32, &mut c[..n]) {
                        return e;
                    }
                    let sector = io.start_sector + (done >> 9) as u64;
                    let (c, ok) = crypto.crypt(c, n, sector, true).await;
                    if !ok {
                        return -libc::EINVAL;
                    }
                    c
                }
            };
            let n = (total - done).min(chunk.len());
            let next_at = done + n;
            let spare = if next_at < total {
                self.pool.try_acquire(self.queue)
            } else {
                None
            };
            let r = match spare {
                Some(mut next) => {
                    let m = (total - next_at).min(next.len());
                    if let Err(e) = req.copy_out(next_at as u32, &mut next[..m]) {
                        return e;
                    }
                    let sector = io.start_sector + (next_at >> 9) as u64;
                    let (r, (next, ok)) = join2(
                        self.write_all(backing, &chunk[..n], base + done as u64),
                        crypto.crypt_overlapped(next, m, sector, true),
                    )
                    .await;
                    if !ok {
                        return -libc::EINVAL;
                    }
                    cur = Some(next);
                    r
                }
                None => {
                    self.write_all(backing, &chunk[..n], base + done as u64)
                        .await
                }
            };
            drop(chunk);
            if r < 0 {
                return r;
            }
            done = next_at;
        }
        self.count(&self.counters.writes, &self.counters.bytes_written, total);
        total as i32
    }

    /// Reads are pipelined: while piece k is decrypted (on a crypto worker) and copied out,
    /// piece k+1 is already being read from the backing — into a second chunk taken with
    /// `try_acquire`, which never waits, so the pool's rule (never wait while holding a chunk)
    /// holds. Without a spare chunk it falls back to one piece at a time.
    async fn read(
        &self,
        io: &IoDesc,
        req: &impl RequestData,
        backing: &impl BackingIo,
        crypto: &impl SectorCrypto,
    ) -> i32 {
        let total = (io.nr_sectors as usize) << 9;
        let (base, _) = self.backing_range(io);
        let mut done = 0usize;
        // The piece at `done`, already read from the backing.
        let mut cur: Option<Chunk<'static>> = None;
        while done < total {
            let mut chunk = match cur.take() {
                Some(c) => c,
                None => {
                    let mut c = self.chunk().await;
                    let n = (total - done).min(c.len());
                    let r = self
                        .read_all(backing, &mut c[..n], base + done as u64)
                        .await;
                    if r < 0 {
                        return r;
                    }
                    c
                }
            };
            let n = (total - done).min(chunk.len());
            let sector = io.start_sector + (done >> 9) as u64;
            let next_at = done + n;
            let spare = if next_at < total {
                self.pool.try_acquire(self.queue)
            } else {
                None
            };
            let ok = match spare {
                Some(mut next) => {
                    let m = (total - next_at).min(next.len());
                    let ((c, ok), r) = join2(
                        crypto.crypt_overlapped(chunk, n, sector, false),
                        self.read_all(backing, &mut next[..m], base + next_at as u64),
                    )
                    .await;
                    chunk = c;
                    if r < 0 {
                        return r;
                    }
                    cur = Some(next);
                    ok
                }
                None => {
                    let (c, ok) = crypto.crypt(chunk, n, sector, false).await;
                    chunk = c;
                    ok
                }
            };
            if !ok {
                return -libc::EINVAL;
            }
            if let Err(e) = req.copy_in(done as u32, &chunk[..n]) {
                return e;
            }
            done = next_at;
        }
        self.count(&self.counters.reads, &self.counters.bytes_read, total);
        total as i32
    }

    /// Short transfers are continued for the rest, transient errors retried (a bounded number
    /// of times in a row); end of device or no progress is -EIO.
    async fn write_all(&self, backing: &impl BackingIo, buf: &[u8], offset: u64) -> i32 {
        let (mut done, mut tries) = (0, 0);
        while done < buf.len() {
            match backing.write_at(&buf[done..], offset + done as u64).await {
                r if is_transient(r) && tries < TRANSIENT_RETRIES => {
                    tries += 1;
                    QueueCounters::add(&self.counters.backing_retries, 1);
                }
                r if r < 0 => return self.backing_failed(r),
                0 => return -libc::EIO,
                r => {
                    done += r as usize;
                    tries = 0;
                }
            }
        }
        0
    }

    async fn read_all(&self, backing: &impl BackingIo, buf: &mut [u8], offset: u64) -> i32 {
        let (mut done, mut tries) = (0, 0);
        while done < buf.len() {
            let started = Instant::now();
            let r = backing
                .read_at(&mut buf[done..], offset + done as u64)
                .await;
            QueueCounters::add(
                &self.counters.backing_read_ns,
                started.elapsed().as_nanos() as u64,
            );
            match r {
                r if is_transient(r) && tries < TRANSIENT_RETRIES => {
                    tries += 1;
                    QueueCounters::add(&self.counters.backing_retries, 1);
                }
                r if r < 0 => return self.backing_failed(r),
                0 => return -libc::EIO,
                r => {
                    done += r as usize;
                    tries = 0;
                }
            }
        }
        0
    }

    fn count(&self, ops: &AtomicU64, bytes: &AtomicU64, total: usize) {
        QueueCounters::add(ops, 1);
        QueueCounters::add(bytes, total as u64);
        if total > self.pool.chunk_bytes() {
            QueueCounters::add(&self.counters.split_ios, 1);
        }
    }
}

/// Runs two futures of one task concurrently and returns both results; no allocation (both
/// live in this future's state).
async fn join2<A: std::future::Future, B: std::future::Future>(
    a: A,
    b: B,
) -> (A::Output, B::Output) {
    let mut a = std::pin::pin!(a);
    let mut b = std::pin::pin!(b);
    let (mut ra, mut rb) = (None, None);
    std::future::poll_fn(|cx| {
        if ra.is_none() {
            if let std::task::Poll::Ready(v) = a.as_mut().poll(cx) {
                ra = Some(v);
            }
        }
        if rb.is_none() {
            if let std::task::Poll::Ready(v) = b.as_mut().poll(cx) {
                rb = Some(v);
            }
        }
        if ra.is_some() && rb.is_some() {
            std::task::Poll::Ready((ra.take().unwrap(), rb.take().unwrap()))
        } else {
            std::task::Poll::Pending
        }
    })
    .await
}

/// At most one log line per interval: a failing disk must not turn the IO path into a logger
/// that allocates and writes on every request.
pub struct RateLimit {
    start: Instant,
    next_ms: AtomicU64,
    interval_ms: u64,
}

impl RateLimit {
    pub fn new(interval_ms: u64) -> Self {
        RateLimit {
            start: Instant::now(),
            next_ms: AtomicU64::new(0),
            interval_ms,
        }
    }

    pub fn allow(&self) -> bool {
        let now = self.start.elapsed().as_millis() as u64;
        let next = self.next_ms.load(Ordering::Relaxed);
        now >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now + self.interval_ms,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
    }
}
