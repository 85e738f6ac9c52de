//! The control plane of a served device: signals and the status socket. (Its clients, the
//! `close`, `list` and `status` commands, are in `client.rs`.)
//!
//! It runs on its own thread with a single-threaded tokio runtime, far from the IO path: the
//! queue threads never wait on it, and it may allocate freely. Requests on the socket
//! (`/run/ublk-crypt/<id>.sock`, mode 0600) are one line: `status` answers one JSON line,
//! `close` stops the device, `upgrade EXE` hands it over to a standby from the binary EXE
//! (`keeper.rs`), and `standby-ready PID` is a standby saying it can take over. SIGTERM and
//! SIGINT stop the device too (systemd's stop). With `UBLK_CRYPT_TEST_HOOKS=1` in its
//! environment (the VM tests), `test-queue-exited Q` acts as if queue Q had ended on its own.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use std::sync::atomic::Ordering;

use crate::context::{DeviceContext, Event};
use crate::hardening;
use crate::keeper;
use crate::records::{self, DeviceRecord};
use crate::standby;
use crate::stats::QueueSnapshot;

#[derive(Debug, Serialize, Deserialize)]
pub struct PoolStatus {
    pub chunk_bytes: usize,
    pub chunks_total: usize,
    pub in_use: usize,
    pub high_water: usize,
    pub waits: u64,
    pub reserve_hits: u64,
    pub locked: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct QueueStatus {
    pub queue: usize,
    #[serde(flatten)]
    pub io: QueueSnapshot,
    pub pool_in_use: usize,
    pub pool_high_water: usize,
    pub pool_waits: u64,
    pub pool_reserve_hits: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    pub device: DeviceRecord,
    pub path: String,
    pub pool: PoolStatus,
    pub queues: Vec<QueueStatus>,
    /// From /proc/self/status: resident and locked memory of the daemon, KiB.
    pub vm_rss_kib: u64,
    pub vm_lck_kib: u64,
    /// The daemon's share of locked memory, KiB: pages it shares with its standby (the pool,
    /// the binary) count half. With the standby's share, the physical memory both lock.
    #[serde(default)]
    pub locked_share_kib: u64,
    /// The `aes` crate's implementation on this CPU (`vaes512`, `vaes256`, `aes-ni`, `soft`):
    /// what the cipher's speed depends on most.
    #[serde(default)]
    pub aes_backend: String,
    /// The AES-XTS implementation in use (`vaes-avx512`, `vaes-avx2`, `aesni`, `portable`;
    /// capped by `UBLK_CRYPT_XTS_TIER`).
    #[serde(default)]
    pub xts_tier: String,
    /// The standby process (`None`: none running, or `--no-standby`).
    #[serde(default)]
    pub standby: Option<StandbyStatus>,
    /// How this daemon took the device over from the previous one, if it did.
    #[serde(default)]
    pub last_takeover: Option<TakeoverStatus>,
    /// The ublk features the kernel offers and this device uses (`None` before it is live).
    #[serde(default)]
    pub ublk_features: Option<crate::ublk_features::UblkFeatures>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct StandbyStatus {
    pub pid: u32,
    /// It said it is ready to take over (everything it needs is made and locked).
    pub ready: bool,
    /// Its locked memory, KiB (the shared pool included, counted in both processes).
    pub vm_lck_kib: u64,
    /// Its share of locked memory, KiB (see [`Status::locked_share_kib`]).
    pub locked_share_kib: u64,
    /// The part of each process's locked memory that is the one shared pool, KiB.
    pub shared_pool_kib: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct TakeoverStatus {
    /// Milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    /// How long the device had no server, in milliseconds.
    pub gap_ms: f64,
    /// `crash` (the previous daemon died) or `upgrade` (it handed over).
    pub kind: String,
    pub previous_pid: u32,
    /// Whether the takeover ran at real-time priority (absent from older daemons: false).
    #[serde(default)]
    pub realtime: bool,
}

fn status_of(ctx: &DeviceContext) -> Status {
    let p = ctx.pool.stats();
    let queues = (0..ctx.counters.len())
        .map(|q| {
            let qs = ctx.pool.queue_stats(q);
            QueueStatus {
                queue: q,
                io: ctx.counters[q].snapshot(),
                pool_in_use: qs.in_use,
                pool_high_water: qs.high_water,
                pool_waits: qs.waits,
                pool_reserve_hits: qs.reserve_hits,
            }
        })
        .collect();
    let (rss, lck) = hardening::memory_of("self");
    let device = ctx.record.clone();
    let sb = &ctx.standby;
    let standby = match sb.pid.load(Ordering::Acquire) {
        0 => None,
        pid => Some(StandbyStatus {
            pid,
            ready: sb.ready_pid.load(Ordering::Acquire) == pid,
            vm_lck_kib: hardening::memory_of(&pid.to_string()).1,
            locked_share_kib: sb.ready_share_kib.load(Ordering::Acquire),
            shared_pool_kib: if sb.pool_fd >= 0 {
                (p.chunks_total * p.chunk_bytes) as u64 >> 10
            } else {
                0
            },
        }),
    };
    let last_takeover = sb.takeover.get().map(|t| TakeoverStatus {
        at_unix_ms: t.at_unix_ms,
        gap_ms: t.gap_us as f64 / 1000.0,
        kind: if t.upgrade { "upgrade" } else { "crash" }.to_string(),
        previous_pid: t.previous_pid,
        realtime: t.realtime,
    });
    Status {
        path: device.bdev_path(),
        device,
        pool: PoolStatus {
            chunk_bytes: p.chunk_bytes,
            chunks_total: p.chunks_total,
            in_use: p.in_use,
            high_water: p.high_water,
            waits: p.waits,
            reserve_hits: p.reserve_hits,
            locked: ctx.pool.is_locked(),
        },
        queues,
        vm_rss_kib: rss,
        vm_lck_kib: lck,
        locked_share_kib: hardening::locked_share_of("self"),
        aes_backend: ublk_crypt_crypto::aes_backend().to_string(),
        xts_tier: ublk_crypt_crypto::xts_tier().to_string(),
        standby,
        last_takeover,
        ublk_features: ctx.ublk_features.get().cloned(),
    }
}

/// Starts the control thread for a device being served.
pub fn spawn(ctx: &'static DeviceContext) -> Result<()> {
    let sock_path = records::socket_path(ctx.record.id);
    let _ = std::fs::remove_file(&sock_path);
    let listener = std::os::unix::net::UnixListener::bind(&sock_path)
        .with_context(|| format!("cannot create the control socket {}", sock_path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&sock_path, std::fs::Permissions::from_mode(0o600))?;
    listener.set_nonblocking(true)?;
    std::thread::Builder::new()
        .name("ublk-crypt-ctl".into())
        .stack_size(hardening::THREAD_STACK_BYTES)
        .spawn(move || {
            // `upgrade` runs on tokio's blocking thread: a small stack for it too (tokio's
            // default is 2 MiB, which `MCL_FUTURE` would lock and populate mid-upgrade).
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .thread_stack_size(hardening::THREAD_STACK_BYTES)
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!("control plane: {e}");
                    return;
                }
            };
            rt.block_on(control_loop(ctx, listener));
        })
        .context("cannot spawn the control thread")?;
    Ok(())
}

/// A signal stops the device only if nothing holds it: deleting a device under an active swap
/// area would fail every swapped page's read (the processes owning them would die). If it is
/// in use, the daemon keeps serving and says why; if it is then killed (systemd's stop timeout),
/// the device stays, waiting for recovery, and no page is lost.
fn stop_unless_in_use(ctx: &DeviceContext, why: &str) -> Result<()> {
    match hold_unless_in_use(&ctx.record) {
        Ok(hold) => {
            tracing::info!("{why}: stopping");
            ctx.send(Event::Stop(hold));
            Ok(())
        }
        Err(e) => {
            tracing::error!("{why} refused: {e:#}");
            Err(e)
        }
    }
}

/// The longest a client may take to send its request; the largest request read.
const CLIENT_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);
const MAX_REQUEST: u64 = 256;

/// One control client: one request line (at most [`MAX_REQUEST`] bytes, within
/// [`CLIENT_DEADLINE`]), one reply line.
async fn serve_client(ctx: &'static DeviceContext, stream: tokio::net::UnixStream) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let (rd, mut wr) = stream.into_split();
    let mut line = String::new();
    let mut rd = tokio::io::BufReader::new(rd.take(MAX_REQUEST));
    match tokio::time::timeout(CLIENT_DEADLINE, rd.read_line(&mut line)).await {
        Ok(Ok(_)) => {}
        _ => return,
    }
    let json_error =
        |e: &dyn std::fmt::Display| serde_json::json!({ "error": e.to_string() }).to_string();
    let mut handover = None;
    let reply = match line.trim() {
        "status" => serde_json::to_string(&status_of(ctx)).unwrap_or_default(),
        // The daemon checks too, holding the device from the check to the stop: a client that
        // skipped the check (or raced a swapon) cannot delete a device in use.
        "close" => match stop_unless_in_use(ctx, "close") {
            Ok(()) => "{\"closing\":true}".to_string(),
            Err(e) => json_error(&format_args!("{e:#}")),
        },
        other if !line.ends_with('\n') => json_error(&format_args!(
            "request '{}…' too long or cut",
            other.escape_default()
        )),
        other => match other.split_once(' ') {
            Some(("standby-ready", args)) => match standby_ready(ctx, args) {
                Ok(()) => "{\"ok\":true}".to_string(),
                Err(e) => json_error(&format_args!("{e:#}")),
            },
            Some(("upgrade", exe)) => {
                let exe = std::path::PathBuf::from(exe);
                // Blocking (it waits for the new standby), and far from the IO path.
                match tokio::task::spawn_blocking(move || keeper::upgrade(ctx, &exe)).await {
                    Ok(Ok(up)) => {
                        let reply = serde_json::json!({ "handing_over_to": up.pid }).to_string();
                        handover = Some(up.pipe);
                        reply
                    }
                    Ok(Err(e)) => json_error(&format_args!("{e:#}")),
                    Err(e) => json_error(&e),
                }
            }
            // Fault injection for the VM tests only: as if queue Q had ended on its own.
            Some(("test-queue-exited", q)) if test_hooks() => match q.parse::<u16>() {
                Ok(q) => {
                    ctx.send(Event::QueueExited(q));
                    "{\"ok\":true}".to_string()
                }
                Err(e) => json_error(&e),
            },
            _ => json_error(&format_args!(
                "unknown request '{}'",
                other.escape_default()
            )),
        },
    };
    let _ = wr.write_all(reply.as_bytes()).await;
    let _ = wr.write_all(b"\n").await;
    let _ = wr.flush().await;
    if let Some(pipe) = handover {
        standby::hand_over(pipe);
    }
}

/// Whether the VM tests' fault-injection requests are served: only in a daemon started with
/// `UBLK_CRYPT_TEST_HOOKS=1` in its environment.
fn test_hooks() -> bool {
    std::env::var_os("UBLK_CRYPT_TEST_HOOKS").is_some_and(|v| v == "1")
}

/// The VM tests' failure of a recovery at `point` (`before-start`, `after-start`: around
/// START_USER_RECOVERY), with `UBLK_CRYPT_TEST_HOOKS=1 UBLK_CRYPT_TEST_RECOVERY_FAIL=POINT`;
/// `hang-POINT` waits there for ever instead (for a `kill -9`).
pub fn recovery_test_hook(point: &str) -> Result<()> {
    if !test_hooks() {
        return Ok(());
    }
    match std::env::var("UBLK_CRYPT_TEST_RECOVERY_FAIL") {
        Ok(v) if v == point => bail!("test hook: the recovery fails {point} START_USER_RECOVERY"),
        Ok(v) if v.strip_prefix("hang-") == Some(point) => loop {
            tracing::warn!("test hook: the recovery hangs {point} START_USER_RECOVERY");
            std::thread::sleep(std::time::Duration::from_secs(3600));
        },
        _ => Ok(()),
    }
}

/// The OOM torture's slow takeover, with `UBLK_CRYPT_TEST_HOOKS=1`: a standby that sees its
/// daemon gone first sleeps `UBLK_CRYPT_TEST_TAKEOVER_DELAY_MS` (so a swapping hog takes every
/// page the dead daemon freed, as on a busy machine), and with
/// `UBLK_CRYPT_TEST_TAKEOVER_PRIORITY=normal` takes over without real-time priority (the A/B
/// of `hardening::SchedPolicy::TAKEOVER`). Returns whether real-time priority is allowed.
pub fn takeover_test_hook() -> bool {
    if !test_hooks() {
        return true;
    }
    let delay_ms = std::env::var("UBLK_CRYPT_TEST_TAKEOVER_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if delay_ms > 0 {
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
    }
    std::env::var_os("UBLK_CRYPT_TEST_TAKEOVER_PRIORITY").is_none_or(|v| v != "normal")
}

/// With `UBLK_CRYPT_TEST_HOOKS=1 UBLK_CRYPT_TEST_TAKEOVER_ALLOC_KIB=N`, a takeover first
/// needs N KiB of fresh memory (an anonymous mapping, populated and locked): the A/B of what
/// a takeover can still get when the machine has none.
pub fn takeover_test_alloc() {
    let kib: usize = match std::env::var("UBLK_CRYPT_TEST_TAKEOVER_ALLOC_KIB") {
        Ok(v) if test_hooks() => v.parse().unwrap_or(0),
        _ => 0,
    };
    if kib == 0 {
        return;
    }
    let mut v = vec![0u8; kib << 10];
    for page in v.chunks_mut(4096) {
        page[0] = 1;
    }
    std::mem::forget(std::hint::black_box(v));
}

/// `standby-ready PID LOCKED_SHARE_KIB`: only a standby this daemon started counts. It says
/// its own share of locked memory: this daemon may not read a non-dumpable process's smaps
/// (no `CAP_SYS_PTRACE` under the unit).
fn standby_ready(ctx: &DeviceContext, args: &str) -> Result<()> {
    let (pid, share) = args.split_once(' ').unwrap_or((args, "0"));
    let pid: u32 = pid.parse().context("standby-ready: not a pid")?;
    let share: u64 = share.parse().context("standby-ready: not a size")?;
    let sb = &ctx.standby;
    if pid == 0
        || (pid != sb.pid.load(Ordering::Acquire) && pid != sb.upgrade_pid.load(Ordering::Acquire))
    {
        bail!("pid {pid} is not a standby of this daemon");
    }
    sb.ready_share_kib.store(share, Ordering::Release);
    sb.ready_pid.store(pid, Ordering::Release);
    tracing::info!("standby {pid} is ready to take over");
    Ok(())
}

async fn control_loop(ctx: &'static DeviceContext, listener: std::os::unix::net::UnixListener) {
    use tokio::signal::unix::{signal, SignalKind};
    let listener = match tokio::net::UnixListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("control socket: {e}");
            return;
        }
    };
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => { let _ = stop_unless_in_use(ctx, "SIGTERM"); }
            _ = int.recv() => { let _ = stop_unless_in_use(ctx, "SIGINT"); }
            conn = listener.accept() => {
                let Ok((stream, _)) = conn else { continue };
                // Each client on its own, with a deadline: one that connects and says nothing
                // must not hold up `status`, `close` or the signals.
                tokio::spawn(serve_client(ctx, stream));
            }
        }
    }
}

/// Like `cryptsetup close`, refuse to pull a device out from under a mount or a swap area:
/// both hold the block device exclusively, so an exclusive open fails with EBUSY.
pub fn refuse_if_in_use(rec: &DeviceRecord) -> Result<()> {
    hold_unless_in_use(rec).map(drop)
}

/// The in-use check that also closes the race behind it: the block device opened exclusively
/// (`O_EXCL`), which fails with EBUSY while a swap area or a mount holds it, and, while this
/// file stays open, makes every later `swapon` or `mount` of it fail. Whoever stops the device
/// keeps it until the device is stopped (not deleted: deleting waits for every opener).
/// `None` when the device node cannot be opened at all (nothing can hold it either).
pub fn hold_unless_in_use(rec: &DeviceRecord) -> Result<Option<std::fs::File>> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::File::options()
        .read(true)
        .custom_flags(libc::O_EXCL | libc::O_CLOEXEC)
        .open(rec.bdev_path())
    {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => bail!(
            "{} ({}) is in use (mounted, swapped on, or held open exclusively): unmount or swapoff it first",
            rec.name,
            rec.bdev_path()
        ),
        Err(_) => Ok(None),
    }
}
