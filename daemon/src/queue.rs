//! A queue thread, top to bottom: set-up (name, protections, ring warm-up), one task per tag on
//! the allocation-free executor, and each tag's loop — fetch a request, serve it
//! ([`IoPath::handle`]: decrypt or encrypt, backing IO), commit the result (which fetches the
//! next). Below it, what the IO path reaches through its traits in the daemon: the request's
//! data by user copy, the backing through the queue's own io_uring, and the wait for a crypto
//! worker as a poll on that ring. And the queue threads' CPU affinity.

use std::cell::Cell;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use io_uring::{opcode, types};
use libublk::io::{UblkDev, UblkIOCtx, UblkQueue};
use libublk::{BufDesc, UblkError};

use crate::batch::PieceBatch;
use crate::context::{DeviceContext, Event};
use crate::executor::{block_on, TagExecutor};
use crate::io::{BackingIo, IoDesc, IoPath, RequestData};
use crate::offload::CryptoWorkers;
use crate::poll_window::PollWindow;
use crate::queue_crypto::{InFlight, QueueCrypto, WorkerWait};
use crate::stats::QueueCounters;
use crate::ublk_batch::BatchCommands;

/// One queue thread, once the device exists: its queue (on the ring `queue_threads` made and
/// warmed), then one task per tag on the allocation-free executor.
/// `premade`: the batched commands' buffers, made with the ring when the device is to use them
/// (`--batch-io`); made here if the device turns out to and they were not.
pub fn serve_queue(
    qid: u16,
    dev: &UblkDev,
    ctx: &'static DeviceContext,
    premade: Option<BatchCommands>,
) {
    let thread = usize::from(qid) * usize::from(ctx.record.threads_per_queue)
        + usize::from(libublk::io::io_thread_idx());
    ctx.queue_tids[thread].store(nix::unistd::gettid().as_raw(), Ordering::Release);
    let q = match UblkQueue::new(qid, dev) {
        Ok(q) => q,
        Err(e) => {
            tracing::error!("queue {qid}: cannot set up: {e}");
            ctx.send(Event::QueueExited(qid));
            return;
        }
    };
    let io = IoPath {
        pool: ctx.pool,
        queue: usize::from(qid),
        data_offset: ctx.geometry.data_offset,
        readonly: ctx.record.readonly,
        allow_discards: ctx.record.allow_discards,
        counters: &ctx.counters[usize::from(qid)],
        error_log: &ctx.error_log,
    };
    let backing = UringBacking {
        q: &q,
        fd: ctx.backing.file().as_raw_fd(),
        block_device: ctx.backing.block_device,
        fault: BackingFault::from_env(),
        sync_discard: std::cell::Cell::new(false),
    };
    let depth = usize::from(q.dev.dev_info.queue_depth);
    // The device's flags, as the kernel keeps them, say how it exchanges requests (a daemon
    // recovering a device follows the one that made it).
    let batched = if q.dev.dev_info.flags & crate::ublk::BATCH_IO != 0 {
        let made = match premade {
            Some(b) => Ok(b),
            None => BatchCommands::new(qid, depth as u16),
        };
        match made.and_then(|b| b.prepare().map(|()| b)) {
            Ok(b) => Some(b),
            Err(e) => {
                tracing::error!("queue {qid}: cannot prepare batched IO commands: {e}");
                ctx.send(Event::QueueExited(qid));
                return;
            }
        }
    } else {
        None
    };
    let commands = match &batched {
        Some(b) => UblkCommands::Batched(b),
        None => UblkCommands::PerRequest(&q),
    };
    let in_flight = InFlight::default();
    let batch = PieceBatch::new(depth, usize::from(qid) * depth);
    let exe = TagExecutor::new(q.tags().map(|tag| {
        let crypto = QueueCrypto {
            cipher: ctx.cipher,
            workers: ctx.workers,
            slot: usize::from(qid) * depth + usize::from(tag),
            tag,
            in_flight: &in_flight,
            batch: &batch,
            counters: io.counters,
            wait: RingPoll { q: &q },
        };
        serve_tag(&q, &commands, tag, &io, &backing, crypto)
    }));
    let poll = PollWindow::new(Duration::from_micros(u64::from(ctx.record.poll_usec)));
    let work_ended: Cell<Option<Instant>> = Cell::new(None);
    // A round: poll the woken tasks; then the small pieces they parked are shared out
    // (`PieceBatch::flush`), which wakes them again, until nothing is parked. Then, before
    // libublk sleeps in the ring, poll it for the window (`poll_window.rs`), which learns from
    // how long each wait turned out to be.
    let round = || {
        if let Some(ended) = work_ended.take() {
            poll.record(ended.elapsed());
        }
        exe.run_ready();
        if let Some(workers) = ctx.workers {
            while batch.flush(workers) {
                exe.run_ready();
            }
        }
        if let Some(b) = &batched {
            b.flush(io.counters);
        }
        work_ended.set(Some(Instant::now()));
        // Not while crypto workers have jobs: that wait is their AES, long against a wake-up,
        // and a polling queue thread takes a CPU it needs (the 1 MiB jobs, a swap-out's fill).
        if ctx.workers.is_none_or(|w| !w.busy()) {
            poll_ring(poll.window(), io.counters);
        }
    };
    let r = match &batched {
        None => block_on(libublk::wait_and_handle_io_events(
            &q,
            Some(20),
            round,
            || exe.all_done(),
        )),
        Some(b) => block_on(batched_io_events(&q, b, round, || exe.all_done())),
    };
    if let Err(e) = r {
        tracing::error!("queue {qid}: {e}");
    }
    ctx.send(Event::QueueExited(qid));
}

/// Polls the queue's ring for up to `window` for a completion, so that the next request or a
/// backing read's completion does not have to wake a sleeping thread. What the round queued is
/// submitted first. Each turn is a syscall, not a look at the ring alone: with
/// `IORING_SETUP_COOP_TASKRUN` completions (ublk's fetches among them) arrive as task work,
/// which runs only when the thread enters the kernel.
fn poll_ring(window: Duration, counters: &QueueCounters) {
    if window.is_zero() {
        return;
    }
    let start = Instant::now();
    let hit = libublk::io::with_task_io_ring_mut(|ring| {
        let _ = ring.submit();
        loop {
            if !ring.completion().is_empty() {
                return true;
            }
            if start.elapsed() >= window {
                return false;
            }
            let _ = ring.submit();
        }
    });
    QueueCounters::add(&counters.polls, 1);
    QueueCounters::add(&counters.poll_hits, u64::from(hit));
    QueueCounters::add(&counters.poll_ns, start.elapsed().as_nanos() as u64);
}

/// libublk's `wait_and_handle_io_events` for a queue on batched commands: the same loop, with
/// the batch's completions taken out before libublk wakes futures by slab key, and the queue's
/// end told by the batch (its fetch aborted) rather than by per-request commands.
async fn batched_io_events(
    q: &UblkQueue<'_>,
    b: &BatchCommands,
    round: impl Fn(),
    all_done: impl Fn() -> bool,
) -> Result<(), UblkError> {
    let poll_uring = || async {
        let wait = if b.stopped() && all_done() { 0 } else { 1 };
        let ts = types::Timespec::new().sec(20);
        let args = types::SubmitArgs::new().timespec(&ts);
        match libublk::io::with_task_io_ring_mut(|r| r.submitter().submit_with_args(wait, &args)) {
            Err(e) if e.raw_os_error() == Some(libc::ETIME) => Ok(true),
            Err(e) => Err(UblkError::IOError(e)),
            Ok(_) if b.stopped() => Err(UblkError::QueueIsDown),
            Ok(_) => Ok(false),
        }
    };
    let reap = |timed_out| {
        libublk::uring_async::ublk_reap_io_events_with_update_queue(q, timed_out, None, |cqe| {
            if !b.handle_cqe(cqe) {
                libublk::uring_async::ublk_wake_task(cqe.user_data(), cqe);
            }
        })
        .map(|aborted| aborted || b.stopped())
    };
    libublk::run_uring_tasks(poll_uring, reap, round, &all_done).await
}

/// How a queue exchanges requests with the kernel.
enum UblkCommands<'a> {
    /// One ublk command per tag: FETCH, then COMMIT_AND_FETCH for each request.
    PerRequest(&'a UblkQueue<'a>),
    /// `UBLK_F_BATCH_IO`: one fetch for all tags, one commit per round (`ublk_batch.rs`).
    Batched(&'a BatchCommands),
}

impl UblkCommands<'_> {
    /// Commits `result` for `tag`'s request (`None`: it has none yet) and waits for its next
    /// request; `false`: the queue stops.
    async fn next_request(&self, tag: u16, result: Option<i32>, counters: &QueueCounters) -> bool {
        let q = match self {
            UblkCommands::Batched(b) => {
                if let Some(r) = result {
                    b.complete(tag, r);
                }
                return b.next_request(tag).await;
            }
            UblkCommands::PerRequest(q) => q,
        };
        loop {
            let fetched = match result {
                None => {
                    q.submit_io_prep_cmd(tag, BufDesc::Slice(&[]), -1, None)
                        .await
                }
                Some(res) => q.submit_io_commit_cmd(tag, BufDesc::Slice(&[]), res).await,
            };
            match fetched {
                Ok(r) if r >= 0 => return true,
                // The command itself failed, so nothing was fetched and a commit did not land:
                // its request is still ours. ENOMEM/EAGAIN are io_uring short of memory for a
                // moment; giving up would leave that request (a swap bio, maybe) pending for ever.
                Ok(r) if r == -libc::ENOMEM || r == -libc::EAGAIN || r == -libc::EINTR => {
                    QueueCounters::add(&counters.command_retries, 1);
                }
                Ok(r) => {
                    tracing::error!("tag {tag}: ublk command failed: errno {}", -r);
                    return false;
                }
                Err(UblkError::QueueIsDown) => return false,
                Err(e) => {
                    tracing::error!("tag {tag}: {e}");
                    return false;
                }
            }
        }
    }
}

/// One tag's life: fetch a request, serve it, commit the result (which fetches the next).
async fn serve_tag(
    q: &UblkQueue<'_>,
    commands: &UblkCommands<'_>,
    tag: u16,
    io: &IoPath<'_>,
    backing: &UringBacking<'_>,
    crypto: QueueCrypto<'_, RingPoll<'_>>,
) {
    let req = UserCopy {
        fd: q.dev.tgt.fds[0],
        qid: q.get_qid(),
        tag,
    };
    // The command in flight: `None` the first fetch, `Some(res)` a commit of `res` (and fetch).
    let mut command: Option<i32> = None;
    loop {
        if !commands.next_request(tag, command, io.counters).await {
            return;
        }
        let iod = q.get_iod(tag);
        let desc = IoDesc {
            op: iod.op_flags & 0xff,
            start_sector: iod.start_sector,
            nr_sectors: iod.nr_sectors,
        };
        if iod.op_flags & libublk::sys::UBLK_IO_F_SWAP != 0 {
            QueueCounters::add(&io.counters.swap_ios, 1);
        }
        let fetched_at = std::time::Instant::now();
        QueueCounters::add(
            &io.counters.depth_sum,
            u64::from(crypto.in_flight.get()) + 1,
        );
        command = Some(
            crypto
                .in_flight
                .serving(
                    desc.op == crate::io::op::READ,
                    io.handle(&desc, &req, backing, &crypto),
                )
                .await,
        );
        let held = fetched_at.elapsed().as_nanos() as u64;
        match desc.op {
            crate::io::op::READ => QueueCounters::add(&io.counters.read_service_ns, held),
            crate::io::op::WRITE => QueueCounters::add(&io.counters.write_service_ns, held),
            _ => {}
        }
    }
}

/// The request's data through `UBLK_F_USER_COPY`: pread/pwrite on `/dev/ublkcN` at the offset
/// that encodes (queue, tag, byte offset). A plain syscall on the queue thread: the copy is a
/// memcpy in the kernel, and going through io_uring would only punt it to a worker thread.
struct UserCopy {
    fd: i32,
    qid: u16,
    tag: u16,
}

impl UserCopy {
    /// Copies `len` bytes from `offset` of the request, `syscall(done, pos)` moving what is
    /// left after `done` bytes at file position `pos`; short copies continue, EINTR retries.
    fn copy(
        &self,
        offset: u32,
        len: usize,
        mut syscall: impl FnMut(usize, i64) -> isize,
    ) -> Result<(), i32> {
        let mut done = 0usize;
        while done < len {
            let pos = UblkIOCtx::ublk_user_copy_pos(self.qid, self.tag, offset + done as u32);
            match syscall(done, pos as i64) {
                n if n > 0 => done += n as usize,
                0 => return Err(-libc::EIO),
                _ => {
                    let e = std::io::Error::last_os_error()
                        .raw_os_error()
                        .unwrap_or(libc::EIO);
                    if e != libc::EINTR {
                        return Err(-e);
                    }
                }
            }
        }
        Ok(())
    }
}

impl RequestData for UserCopy {
    fn copy_out(&self, offset: u32, buf: &mut [u8]) -> Result<(), i32> {
        let len = buf.len();
        self.copy(offset, len, |done, pos| {
            let rest = &mut buf[done..];
            // SAFETY: pread writes at most rest.len() bytes into `rest`, a live mutable slice.
            unsafe { libc::pread(self.fd, rest.as_mut_ptr().cast(), rest.len(), pos) }
        })
    }

    fn copy_in(&self, offset: u32, buf: &[u8]) -> Result<(), i32> {
        self.copy(offset, buf.len(), |done, pos| {
            let rest = &buf[done..];
            // SAFETY: pwrite reads at most rest.len() bytes from `rest`, a live slice.
            unsafe { libc::pwrite(self.fd, rest.as_ptr().cast(), rest.len(), pos) }
        })
    }
}

/// The backing through the queue's own io_uring (registered as fixed file 1), so backing IO of
/// all the queue's tags overlaps while the thread encrypts.
struct UringBacking<'a> {
    q: &'a UblkQueue<'a>,
    fd: i32,
    block_device: bool,
    fault: Option<BackingFault>,
    /// The kernel has no io_uring discard command: BLKDISCARD it is.
    sync_discard: std::cell::Cell<bool>,
}

/// A VM tests' hook (never set in production): with `UBLK_CRYPT_TEST_HOOKS=1` and
/// `UBLK_CRYPT_TEST_BACKING_FAULT=ERRNO/EVERY` in the daemon's environment, every EVERY-th
/// backing read or write of a queue fails with ERRNO without reaching the ring: a backing short
/// of memory now and then (EAGAIN, ENOMEM), or one that fails (ENOSPC). Read once, when the
/// queue starts.
struct BackingFault {
    errno: i32,
    every: u32,
    count: std::cell::Cell<u32>,
}

impl BackingFault {
    fn from_env() -> Option<BackingFault> {
        if std::env::var_os("UBLK_CRYPT_TEST_HOOKS").is_none_or(|v| v != "1") {
            return None;
        }
        let v = std::env::var("UBLK_CRYPT_TEST_BACKING_FAULT").ok()?;
        let (errno, every) = v.split_once('/')?;
        let fault = BackingFault {
            errno: errno.parse().ok()?,
            every: every.parse().ok().filter(|&n| n > 0)?,
            count: std::cell::Cell::new(0),
        };
        tracing::warn!(
            "test hook: every {}th backing IO fails with errno {}",
            fault.every,
            fault.errno
        );
        Some(fault)
    }

    /// The injected result for this operation, if it is one to fail.
    fn hit(fault: &Option<BackingFault>) -> Option<i32> {
        let f = fault.as_ref()?;
        let n = f.count.get() + 1;
        f.count.set(n % f.every);
        (n == f.every).then_some(-f.errno)
    }
}

/// Registered file index of the backing on every queue ring (0 is /dev/ublkcN).
const BACKING_FIXED: types::Fixed = types::Fixed(1);

impl BackingIo for UringBacking<'_> {
    async fn read_at(&self, buf: &mut [u8], offset: u64) -> i32 {
        if let Some(r) = BackingFault::hit(&self.fault) {
            return r;
        }
        let sqe = opcode::Read::new(BACKING_FIXED, buf.as_mut_ptr(), buf.len() as u32)
            .offset(offset)
            .build();
        // The buffer outlives the operation: this future is never dropped before completion
        // (tasks run until the queue stops, and the ring is drained before that).
        self.q.ublk_submit_sqe(sqe).await
    }

    async fn write_at(&self, buf: &[u8], offset: u64) -> i32 {
        if let Some(r) = BackingFault::hit(&self.fault) {
            return r;
        }
        let sqe = opcode::Write::new(BACKING_FIXED, buf.as_ptr(), buf.len() as u32)
            .offset(offset)
            .build();
        self.q.ublk_submit_sqe(sqe).await
    }

    async fn flush(&self) -> i32 {
        let sqe = opcode::Fsync::new(BACKING_FIXED)
            .flags(types::FsyncFlags::DATASYNC)
            .build();
        self.q.ublk_submit_sqe(sqe).await
    }

    async fn discard(&self, offset: u64, len: u64) -> i32 {
        if !self.block_device {
            let sqe = opcode::Fallocate::new(BACKING_FIXED, len)
                .offset(offset)
                .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                .build();
            return self.q.ublk_submit_sqe(sqe).await;
        }
        if !self.sync_discard.get() {
            // BLOCK_URING_CMD_DISCARD (6.12): the discard in flight on the ring like any other
            // backing IO, so the queue's reads and writes go on meanwhile. A discard may take
            // seconds on some disks; the BLKDISCARD ioctl would stall every tag of the queue.
            // Issued from io_uring's worker (IOSQE_ASYNC), not inline: inline it is a REQ_NOWAIT
            // bio, which a device without nowait support (device-mapper's delay, linear over
            // some disks, ...) fails with EOPNOTSUPP instead of queueing.
            let sqe = opcode::UringCmd16::new(BACKING_FIXED, BLOCK_URING_CMD_DISCARD)
                .addr(Some(offset))
                .cmd(u128::from(len).to_le_bytes())
                .build()
                .flags(io_uring::squeue::Flags::ASYNC);
            let r = self.q.ublk_submit_sqe(sqe).await;
            if r != -libc::EOPNOTSUPP {
                return r;
            }
        }
        // No such command (a kernel before 6.12 says EOPNOTSUPP; so does a disk without
        // discard, and then the ioctl says it too): the synchronous ioctl, as the kernel's loop
        // driver does, from then on if it works.
        let range = [offset, len];
        // SAFETY: BLKDISCARD reads a [u64; 2] (start, length) from a valid pointer.
        let r = unsafe { libc::ioctl(self.fd, BLKDISCARD, range.as_ptr()) };
        if r < 0 {
            -std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO)
        } else {
            self.sync_discard.set(true);
            0
        }
    }
}

/// `BLOCK_URING_CMD_DISCARD` = `_IO(0x12, 0)` (`linux/blkdev.h`, 6.12): start in the SQE's
/// `addr`, length in `addr3` (the first 8 bytes of a 16-byte command).
const BLOCK_URING_CMD_DISCARD: u32 = 0x1200;
/// `BLKDISCARD` = `_IO(0x12, 119)`.
const BLKDISCARD: libc::c_ulong = 0x1277;

/// The wait for a crypto worker as a poll of the slot's eventfd on the queue's io_uring: the
/// queue thread serves other tags meanwhile. A poll, not a read: a read that waits makes
/// io_uring allocate (see `offload.rs`).
struct RingPoll<'a> {
    q: &'a UblkQueue<'a>,
}

impl WorkerWait for RingPoll<'_> {
    async fn wait(&self, workers: &CryptoWorkers, slot: usize) {
        loop {
            let sqe =
                opcode::PollAdd::new(types::Fd(workers.done_fd(slot)), libc::POLLIN as u32).build();
            // The worker holds the chunk until it writes the eventfd: keep waiting through any
            // transient error rather than take the chunk back early.
            let r = self.q.ublk_submit_sqe(sqe).await;
            if r > 0 && workers.take_done(slot) {
                break;
            }
        }
    }
}
/// Lets every queue thread run on any CPU this daemon may use (its own affinity, which systemd's
/// `CPUAffinity=` or `taskset` may have narrowed), undoing libublk's pinning of each queue to the
/// CPUs the kernel maps to it. Called once the device is live, when libublk has set that
/// affinity and every queue thread has stored its tid.
///
/// Why: pinned, a queue's thread runs on the very CPU whose tasks submit to it, so every request
/// switches from the submitter to the daemon and back on one CPU while the other CPUs may idle;
/// dm-crypt's kcryptd is unbound for the same reason (what it cost two queues in the test VM:
/// bench/results/history.md, "Fifth cost"). `--pin-queues` keeps libublk's pinning.
pub fn unpin_queue_threads(ctx: &DeviceContext) {
    use nix::sched::{sched_getaffinity, sched_setaffinity};
    use nix::unistd::Pid;
    let allowed = match sched_getaffinity(Pid::from_raw(0)) {
        Ok(set) => set,
        Err(e) => {
            tracing::warn!(
                "cannot read the daemon's CPU affinity ({e}): queue threads stay pinned"
            );
            return;
        }
    };
    for (qid, tid) in ctx.queue_tids.iter().enumerate() {
        let tid = tid.load(Ordering::Acquire);
        if tid <= 0 {
            continue;
        }
        if let Err(e) = sched_setaffinity(Pid::from_raw(tid), &allowed) {
            tracing::warn!("queue {qid}: cannot widen its CPU affinity ({e}): it stays pinned");
        }
    }
}
