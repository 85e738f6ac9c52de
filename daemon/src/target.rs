//! The ublk device: validating an `open`, creating (or recovering) the device, its parameters,
//! and the queue threads that run the IO path.
//!
//! Order of `open`, chosen so bad input leaves nothing behind: everything that can be checked
//! without creating a device is checked first (spec, key size, backing, geometry, key, cipher,
//! pool), then the device is added; any failure after that deletes it again.

use std::cell::Cell;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc;
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use io_uring::{opcode, types};
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::{UblkDev, UblkIOCtx, UblkQueue};
use libublk::{sys, BufDesc, UblkError, UblkFlags};
use ublk_crypt_crypto::{CipherSpec, Key, SectorCipher, SectorLayout};
use ublk_crypt_pool::{PoolConfig, ReservePool};

use crate::backing::{Backing, Geometry};
use crate::cli::OpenArgs;
use crate::control::{self, Event};
use crate::executor::{block_on, TagExecutor};
use crate::hardening::{self, Protections};
use crate::io::{BackingIo, InlineCrypto, IoDesc, IoPath, RateLimit, RequestData, SectorCrypto};
use crate::key_source::KeySpec;
use crate::offload::{
    worth_offloading, CryptoWorkers, PieceBatch, BATCH_MIN_IN_FLIGHT, MIN_OFFLOAD_BYTES,
};
use crate::recovery;
use crate::state::{self, DeviceRecord};
use crate::stats::QueueCounters;

const UBLK_CONTROL: &str = "/dev/ublk-control";

/// Everything the queue threads and the control plane share, alive for the process lifetime.
pub struct DeviceContext {
    pub record: Mutex<DeviceRecord>,
    pub cipher: &'static SectorCipher,
    /// Crypto workers for large pieces; `None` with `--crypto-threads 0`.
    pub workers: Option<&'static CryptoWorkers>,
    pub pool: &'static ReservePool,
    pub backing: Backing,
    pub geometry: Geometry,
    pub counters: Vec<QueueCounters>,
    pub error_log: RateLimit,
    pub protections: Protections,
    pub events: Mutex<mpsc::Sender<Event>>,
    /// Each queue thread's tid, stored when it starts (0 before).
    pub queue_tids: Vec<AtomicI32>,
}

/// Whether we create a device or re-attach to one whose daemon died.
enum Mode {
    Create { id: Option<u32> },
    Recover { id: u32 },
}

/// `ublk-crypt open`.
pub fn open(args: OpenArgs) -> Result<ExitCode> {
    init_logging();
    let spec: CipherSpec = args.cipher.parse()?;
    if !args.key_size.is_multiple_of(8) {
        bail!(
            "--key-size {} is not a whole number of bytes",
            args.key_size
        );
    }
    spec.check_key_len(args.key_size / 8)?;
    if args.queues == 0 || args.queues > 64 {
        bail!("--queues {} is out of range (1..=64)", args.queues);
    }
    if args.depth == 0 || args.depth > 4096 {
        bail!("--depth {} is out of range (1..=4096)", args.depth);
    }
    if !(4..=32 * 1024).contains(&args.max_io_kib) || !args.max_io_kib.is_multiple_of(4) {
        bail!(
            "--max-io-kib {} must be a multiple of 4 between 4 and 32768",
            args.max_io_kib
        );
    }
    if let Some(name) = &args.name {
        if name.is_empty() || name.contains('/') || name.parse::<u32>().is_ok() {
            bail!("--name '{name}' must be non-empty, without '/', and not a number");
        }
    }
    SectorLayout {
        sector_size: args.sector_size,
        iv_large_sectors: args.iv_large_sectors,
        iv_offset: args.skip,
    }
    .validate()?;
    check_driver()?;

    if let Some(id) = args.id {
        if let Ok(st) = device_state(id) {
            // systemd restarted us after a crash: re-attach instead of failing.
            if st.quiesced && !st.daemon_alive {
                hardening::io_flusher_for_recovery();
                let rec = state::load(id).with_context(|| {
                    format!("ublk device {id} waits for recovery but has no ublk-crypt record")
                })?;
                tracing::info!("device {id} is waiting for recovery: re-attaching");
                return serve_recovered(rec, args.foreground);
            }
            bail!(
                "ublk device id {id} is already taken{}",
                if st.daemon_alive {
                    format!(" (served by pid {})", st.pid)
                } else {
                    String::new()
                }
            );
        }
    }
    if let Some(name) = &args.name {
        if let Ok(rec) = state::resolve(name) {
            if device_state(rec.id).is_ok() {
                bail!(
                    "a device named '{name}' already exists ({})",
                    rec.bdev_path()
                );
            }
        }
    }

    let backing = Backing::open(&args.backing, args.readonly)?;
    let geometry = Geometry::new(
        backing.size,
        args.offset,
        args.size,
        args.sector_size,
        if backing.direct {
            backing.logical_block_size
        } else {
            512
        },
        &args.backing,
    )?;
    let key_bytes = args.key_size / 8;
    let key_spec = KeySpec::from_args(&args, key_bytes)?;
    let key = key_spec.read(key_bytes, &args.backing.display().to_string())?;
    let layout = SectorLayout {
        sector_size: args.sector_size,
        iv_large_sectors: args.iv_large_sectors,
        iv_offset: args.skip,
    };
    let cipher = SectorCipher::new(spec, &key, layout)?;
    let record = DeviceRecord {
        id: 0,
        name: args.name.clone().unwrap_or_default(),
        backing: std::fs::canonicalize(&args.backing).unwrap_or(args.backing.clone()),
        cipher: spec.to_string(),
        key_bits: args.key_size,
        sector_size: args.sector_size,
        iv_large_sectors: args.iv_large_sectors,
        offset: args.offset,
        skip: args.skip,
        size: geometry.size,
        readonly: args.readonly,
        allow_discards: args.allow_discards,
        queues: args.queues,
        depth: args.depth,
        pool_mib: args.pool_mib,
        max_io_kib: args.max_io_kib,
        crypto_threads: args
            .crypto_threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get().min(8))),
        pin_queues: args.pin_queues,
        protections: !args.test_disable_protections,
        pid: 0,
    };
    serve(
        Mode::Create { id: args.id },
        record,
        key,
        cipher,
        backing,
        geometry,
        args.foreground,
    )
}

/// Serves a device whose daemon died, from its record and the key kept in the keyring.
pub fn serve_recovered(rec: DeviceRecord, foreground: bool) -> Result<ExitCode> {
    init_logging();
    check_driver()?;
    let spec: CipherSpec = rec.cipher.parse()?;
    let key = recovery::kept_key(rec.id, rec.key_bits / 8)?;
    let backing = Backing::open(&rec.backing, rec.readonly)?;
    let geometry = Geometry::new(
        backing.size,
        rec.offset,
        Some(rec.size / 512),
        rec.sector_size,
        if backing.direct {
            backing.logical_block_size
        } else {
            512
        },
        &rec.backing,
    )?;
    let layout = SectorLayout {
        sector_size: rec.sector_size,
        iv_large_sectors: rec.iv_large_sectors,
        iv_offset: rec.skip,
    };
    let cipher = SectorCipher::new(spec, &key, layout)?;
    serve(
        Mode::Recover { id: rec.id },
        rec,
        key,
        cipher,
        backing,
        geometry,
        foreground,
    )
}

fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("UBLK_CRYPT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .try_init();
}

fn check_driver() -> Result<()> {
    if !Path::new(UBLK_CONTROL).exists() {
        bail!("the ublk driver is not loaded: {UBLK_CONTROL} is missing (modprobe ublk_drv)");
    }
    Ok(())
}

/// What the kernel says about an existing ublk device.
pub struct DeviceState {
    pub quiesced: bool,
    pub daemon_alive: bool,
    pub pid: i32,
    pub state_name: &'static str,
}

/// Whether ublk device `id` exists (without asking the driver, which libublk would report on
/// stderr for a device being deleted).
pub fn device_exists(id: u32) -> bool {
    Path::new(&format!("/sys/class/ublk-char/ublkc{id}")).exists()
}

/// The state of ublk device `id`, or an error if it does not exist.
pub fn device_state(id: u32) -> Result<DeviceState> {
    if !device_exists(id) {
        bail!("ublk device {id} does not exist");
    }
    let ctrl =
        UblkCtrl::new_simple(id as i32).map_err(|e| anyhow::anyhow!("ublk device {id}: {e}"))?;
    let info = ctrl.dev_info();
    let state_name = match u32::from(info.state) {
        sys::UBLK_S_DEV_DEAD => "dead",
        sys::UBLK_S_DEV_LIVE => "live",
        sys::UBLK_S_DEV_QUIESCED => "quiesced",
        _ => "failing IO",
    };
    let pid = info.ublksrv_pid;
    Ok(DeviceState {
        quiesced: u32::from(info.state) == sys::UBLK_S_DEV_QUIESCED,
        daemon_alive: pid > 0 && state::pid_alive(pid as u32),
        pid,
        state_name,
    })
}

/// How `open` reports the outcome: to the parent through a pipe (daemon mode), or directly.
enum Readiness {
    Pipe(File),
    Foreground,
}

impl Readiness {
    fn ready(&mut self, path: &str) {
        match self {
            Readiness::Pipe(p) => {
                let _ = writeln!(p, "OK {path}");
            }
            Readiness::Foreground => {
                println!("{path}");
                let _ = std::io::stdout().flush();
            }
        }
        sd_notify(&format!(
            "READY=1\nSTATUS=serving {path}\nMAINPID={}",
            std::process::id()
        ));
    }

    fn fail(&mut self, e: &anyhow::Error) {
        if let Readiness::Pipe(p) = self {
            let _ = writeln!(p, "ERR {e:#}");
        }
    }
}

/// Tells systemd (Type=notify) about state changes; a no-op outside systemd.
pub fn sd_notify(msg: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = UnixDatagram::unbound() else {
        return;
    };
    let path = path.to_string_lossy().into_owned();
    let _ = if let Some(abstract_name) = path.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abstract_name.as_bytes())
            .and_then(|addr| sock.send_to_addr(msg.as_bytes(), &addr))
    } else {
        sock.send_to(msg.as_bytes(), &path)
    };
}

/// Forks into the background. The parent waits for the child's verdict, prints the device path
/// (or the error) and exits; the child returns its end of the pipe.
fn daemonize() -> Result<Option<File>> {
    let (rd, wr) = nix::unistd::pipe().context("pipe")?;
    // SAFETY: no other thread exists yet (nothing has spawned one before this point), so the
    // child inherits a consistent single-threaded state.
    match unsafe { nix::unistd::fork() }.context("fork")? {
        nix::unistd::ForkResult::Parent { .. } => {
            drop(wr);
            let mut msg = String::new();
            let _ = File::from(rd).read_to_string(&mut msg);
            let line = msg.lines().next().unwrap_or("");
            if let Some(path) = line.strip_prefix("OK ") {
                println!("{path}");
                return Ok(None);
            }
            if let Some(err) = line.strip_prefix("ERR ") {
                bail!("{err}");
            }
            bail!("the daemon exited during start-up (see {})", state::RUN_DIR)
        }
        nix::unistd::ForkResult::Child => {
            drop(rd);
            nix::unistd::setsid().context("setsid")?;
            let devnull = File::options().read(true).write(true).open("/dev/null")?;
            nix::unistd::dup2_stdin(&devnull)?;
            nix::unistd::dup2_stdout(&devnull)?;
            let dir = state::ensure_run_dir()?;
            let log = File::options()
                .create(true)
                .append(true)
                .open(state::log_path(std::process::id()))
                .with_context(|| format!("cannot open a log file in {}", dir.display()))?;
            nix::unistd::dup2_stderr(&log)?;
            Ok(Some(File::from(wr)))
        }
    }
}

type SharedReadiness = std::sync::Arc<Mutex<Option<Readiness>>>;

fn serve(
    mode: Mode,
    mut record: DeviceRecord,
    key: Key,
    cipher: SectorCipher,
    backing: Backing,
    geometry: Geometry,
    foreground: bool,
) -> Result<ExitCode> {
    let readiness = if foreground {
        Readiness::Foreground
    } else {
        match daemonize()? {
            None => return Ok(ExitCode::SUCCESS), // the parent, done
            Some(pipe) => Readiness::Pipe(pipe),
        }
    };
    let readiness: SharedReadiness = std::sync::Arc::new(Mutex::new(Some(readiness)));
    match serve_inner(
        mode,
        &mut record,
        key,
        cipher,
        backing,
        geometry,
        readiness.clone(),
    ) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            if let Some(mut r) = readiness.lock().unwrap().take() {
                r.fail(&e);
            }
            Err(e)
        }
    }
}

fn serve_inner(
    mode: Mode,
    record: &mut DeviceRecord,
    key: Key,
    cipher: SectorCipher,
    backing: Backing,
    geometry: Geometry,
    readiness: SharedReadiness,
) -> Result<()> {
    let protections = Protections {
        enabled: record.protections,
    };
    crate::kernel_log::open();
    hardening::protect_process(protections)?;
    let budget_bytes = record.pool_mib << 20;
    let pool = ReservePool::new(PoolConfig {
        budget_bytes,
        chunk_bytes: ublk_crypt_pool::chunk_bytes_for(
            budget_bytes,
            usize::from(record.queues) * usize::from(record.depth),
        ),
        lock: protections.enabled,
        ..PoolConfig::with_queues(usize::from(record.queues))
    })
    .context("IO buffer pool")?;

    let flags = u64::from(sys::UBLK_F_USER_COPY)
        | u64::from(sys::UBLK_F_USER_RECOVERY)
        | u64::from(sys::UBLK_F_USER_RECOVERY_REISSUE);
    let creating = matches!(mode, Mode::Create { .. });
    let ctrl = match mode {
        Mode::Create { id } => UblkCtrlBuilder::default()
            .name("ublk-crypt")
            .id(id.map_or(-1, |i| i as i32))
            .nr_queues(record.queues)
            .depth(record.depth)
            .io_buf_bytes(record.max_io_kib << 10)
            .ctrl_flags(flags)
            .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV)
            .build()
            .map_err(|e| ublk_error("cannot create the ublk device", id, e))?,
        Mode::Recover { id } => {
            let old = UblkCtrl::new_simple(id as i32)
                .map_err(|e| ublk_error("cannot open the ublk device", Some(id), e))?;
            let r = old
                .start_user_recover()
                .map_err(|e| ublk_error("cannot start recovery", Some(id), e))?;
            if r < 0 {
                bail!("cannot start recovery of device {id}: {}", errno_str(r));
            }
            let queues = old.dev_info().nr_hw_queues;
            drop(old);
            UblkCtrlBuilder::default()
                .name("ublk-crypt")
                .id(id as i32)
                .nr_queues(queues)
                .depth(record.depth)
                .io_buf_bytes(record.max_io_kib << 10)
                .ctrl_flags(flags)
                .dev_flags(UblkFlags::UBLK_DEV_F_RECOVER_DEV)
                .build()
                .map_err(|e| ublk_error("cannot re-attach to the ublk device", Some(id), e))?
        }
    };
    let id = ctrl.dev_info().dev_id;
    record.id = id;
    record.pid = std::process::id();
    if record.name.is_empty() {
        record.name = format!("ublk-crypt{id}");
    }
    // From here on a failure must forget what a new device left (the ctrl's Drop deletes an
    // ADD_DEV device); a recovered device is left waiting for the next attempt, key and all.
    let cleanup = |e: anyhow::Error| {
        if creating {
            recovery::forget_key(id);
            state::remove(id);
        }
        e
    };
    if creating {
        recovery::keep_key(id, &key).map_err(cleanup)?;
    }
    drop(key);
    state::save(record).map_err(cleanup)?;

    let (tx, rx) = mpsc::channel();
    let cipher: &'static SectorCipher = Box::leak(Box::new(cipher));
    let pool: &'static ReservePool = Box::leak(Box::new(pool));
    let workers = match record.crypto_threads {
        0 => None,
        n => Some(
            CryptoWorkers::start(
                cipher,
                usize::from(record.queues) * usize::from(record.depth),
                n,
                protections,
                || {},
            )
            .map_err(cleanup)?,
        ),
    };
    let ctx: &'static DeviceContext = Box::leak(Box::new(DeviceContext {
        counters: (0..record.queues)
            .map(|_| QueueCounters::default())
            .collect(),
        record: Mutex::new(record.clone()),
        cipher,
        workers,
        pool,
        backing,
        geometry,
        error_log: RateLimit::new(1000),
        protections,
        events: Mutex::new(tx),
        queue_tids: (0..record.queues).map(|_| AtomicI32::new(0)).collect(),
    }));
    control::spawn(ctx).map_err(cleanup)?;

    let depth = record.depth;
    let pin_queues = record.pin_queues;
    let path = record.bdev_path();
    let tgt_init = move |dev: &mut UblkDev| set_params(dev, ctx, depth);
    let queue_fn = move |qid: u16, dev: &UblkDev| serve_queue(qid, dev, ctx);
    let became_ready = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let device_fn = {
        let (readiness, became_ready, path) =
            (readiness.clone(), became_ready.clone(), path.clone());
        let rx = Mutex::new(rx);
        // Runs on this thread once every queue has fetched and the device is live.
        move |c: &UblkCtrl| {
            c.disown(); // from now on only an explicit stop deletes the device, never a Drop
            became_ready.store(true, std::sync::atomic::Ordering::Release);
            // Before READY=1 and `open` returning: whoever sees the device sees final affinities.
            if !pin_queues {
                unpin_queue_threads(ctx);
            }
            if let Some(mut r) = readiness.lock().unwrap().take() {
                r.ready(&path);
            }
            tracing::info!(
                "serving {path} (AES: {}, XTS tier: {})",
                ublk_crypt_crypto::aes_backend(),
                ublk_crypt_crypto::xts_tier()
            );
            if let Some(e) = ublk_crypt_crypto::xts_tier_env_error() {
                tracing::warn!("{e}; using the detected tier");
            }
            // What recovery reads must not be in the swap it recovers (state::keep_in_memory).
            for file in [state::record_path(id), c.run_path().into()] {
                if let Err(e) = state::keep_in_memory(&file) {
                    tracing::warn!("{e:#}: recovery may block if it is swapped out");
                }
            }
            if !ctx.backing.direct {
                tracing::warn!(
                    "{} does not support O_DIRECT: using buffered IO, which needs page cache \
                     under memory pressure (not safe for swap)",
                    ctx.backing.path.display()
                );
            }
            wait_for_stop(c, &rx);
        }
    };
    let run = ctrl.run_target(tgt_init, queue_fn, device_fn);
    let ready = became_ready.load(std::sync::atomic::Ordering::Acquire);
    match run {
        Ok(_) if ready => {
            // Clean stop (close or SIGTERM): delete the device and forget its key.
            let _ = ctrl.del_dev();
            recovery::forget_key(id);
            state::remove(id);
            sd_notify("STOPPING=1");
            tracing::info!("{path} closed");
            Ok(())
        }
        Ok(_) => Err(cleanup(anyhow::anyhow!(
            "the device stopped before it became live"
        ))),
        Err(e) => {
            if creating {
                let _ = ctrl.del_dev_async();
            }
            Err(cleanup(ublk_error(
                "cannot start the ublk device",
                Some(id),
                e,
            )))
        }
    }
}

/// Blocks the device's main thread until a stop is asked for (close, SIGTERM) or a queue ended
/// on its own (the device was deleted under us), then stops the device.
fn wait_for_stop(c: &UblkCtrl, rx: &Mutex<mpsc::Receiver<Event>>) {
    match rx.lock().unwrap().recv() {
        Ok(Event::Stop) => tracing::info!("stopping"),
        Ok(Event::QueueExited(q)) => tracing::warn!("queue {q} ended; stopping the device"),
        Err(_) => {}
    }
    let _ = c.kill_dev();
}

fn errno_str(r: i32) -> String {
    std::io::Error::from_raw_os_error(-r).to_string()
}

fn ublk_error(what: &str, id: Option<u32>, e: UblkError) -> anyhow::Error {
    let dev = id.map(|i| format!(" {i}")).unwrap_or_default();
    match e {
        UblkError::UringIOError(r) if r == -libc::EEXIST => {
            anyhow::anyhow!("{what}: ublk device id{dev} is already taken")
        }
        UblkError::UringIOError(r) | UblkError::OtherError(r) if r < 0 => {
            anyhow::anyhow!("{what}{dev}: {}", errno_str(r))
        }
        e => anyhow::anyhow!("{what}{dev}: {e}"),
    }
}

/// Device parameters, as dm-crypt would present the same volume: logical block = encryption
/// sector, a volatile cache (so FLUSH reaches us and we fdatasync the backing), discard only
/// when allowed.
fn set_params(dev: &mut UblkDev, ctx: &DeviceContext, depth: u16) -> Result<(), UblkError> {
    let rec = ctx.record.lock().unwrap().clone();
    let shift = rec.sector_size.trailing_zeros() as u8;
    let tgt = &mut dev.tgt;
    tgt.fds[tgt.nr_fds as usize] = ctx.backing.file().as_raw_fd();
    tgt.nr_fds += 1;
    tgt.sq_depth = depth.saturating_mul(OPS_PER_TAG);
    tgt.cq_depth = depth.saturating_mul(CQ_ENTRIES_PER_TAG);
    tgt.dev_size = ctx.geometry.size;
    let mut attrs = sys::UBLK_ATTR_VOLATILE_CACHE;
    if rec.readonly {
        attrs |= sys::UBLK_ATTR_READ_ONLY;
    }
    let mut types = sys::UBLK_PARAM_TYPE_BASIC;
    if rec.allow_discards && !rec.readonly {
        types |= sys::UBLK_PARAM_TYPE_DISCARD;
    }
    tgt.params = sys::ublk_params {
        types,
        basic: sys::ublk_param_basic {
            attrs,
            logical_bs_shift: shift,
            physical_bs_shift: shift.max(12),
            io_opt_shift: shift.max(12),
            io_min_shift: shift,
            max_sectors: dev.dev_info.max_io_buf_bytes >> 9,
            dev_sectors: ctx.geometry.size >> 9,
            ..Default::default()
        },
        discard: sys::ublk_param_discard {
            discard_granularity: rec.sector_size,
            max_discard_sectors: 1 << 22,
            max_write_zeroes_sectors: 0,
            max_discard_segments: 1,
            ..Default::default()
        },
        ..Default::default()
    };
    dev.set_target_json(serde_json::json!({
        "ublk-crypt": { "backing": rec.backing, "cipher": rec.cipher, "sector_size": rec.sector_size }
    }));
    Ok(())
}

/// Most io_uring operations one tag has in flight at once: its ublk command, or while it serves
/// a request, a backing read (or write) plus the wait for a crypto worker (`IoPath::read`
/// overlaps the two). Sizes the ring's submission queue and [`warm_queue_ring`].
const OPS_PER_TAG: u16 = 2;

/// Completion-queue entries per tag: twice [`OPS_PER_TAG`], so the CQ can never overflow.
/// Why it matters: on overflow the kernel keeps the completion in a `GFP_ATOMIC` allocation, and
/// when that fails — exactly when swap-out has used up memory — it *drops* the completion, and
/// the tag waiting for it (with the swap bio it serves) would wait for ever.
const CQ_ENTRIES_PER_TAG: u16 = 2 * OPS_PER_TAG;

/// Makes the queue ring's kernel side allocate, now, what its busiest moment will need: one
/// request and its read/write state for each of `ops` operations in flight at once. io_uring
/// keeps these in per-ring caches when they complete (request structs without a limit,
/// read/write state up to 128), so the first burst of swap-out — the moment memory runs
/// out — takes them from the caches instead of asking the allocator, which for an IO flusher in
/// a machine without free memory may not answer. The warm-up: `ops` reads of one semaphore
/// eventfd, each of which blocks (arming a poll), then one write that completes them all.
/// Runs on the queue thread once its `UblkQueue` (and so its ring) exists, before any tag task.
fn warm_queue_ring(ops: usize) -> std::io::Result<()> {
    use io_uring::IoUring;
    use nix::sys::eventfd::{EfdFlags, EventFd};
    const WARM: u64 = 0x5741_524d_0000_0000; // "WARM": no libublk user_data has these bits
    let efd = EventFd::from_value_and_flags(0, EfdFlags::EFD_SEMAPHORE | EfdFlags::EFD_CLOEXEC)?;
    let mut bufs = vec![[0u8; 8]; ops];
    libublk::io::with_task_io_ring_mut(|ring: &mut IoUring| -> std::io::Result<()> {
        if !ring.completion().is_empty() {
            // Someone else's completions: not ours to consume. Skip the warm-up.
            return Ok(());
        }
        let mut pushed = 0;
        while pushed < ops {
            {
                let mut sq = ring.submission();
                while pushed < ops && !sq.is_full() {
                    let sqe =
                        opcode::Read::new(types::Fd(efd.as_raw_fd()), bufs[pushed].as_mut_ptr(), 8)
                            .build()
                            .user_data(WARM | pushed as u64);
                    // SAFETY: the 8-byte buffer and the eventfd outlive the read: both are
                    // dropped only after every one of these reads has completed (below).
                    unsafe { sq.push(&sqe) }.expect("checked not full");
                    pushed += 1;
                }
            }
            ring.submit()?;
        }
        efd.write(ops as u64)?;
        let mut reaped = 0;
        while reaped < ops {
            ring.submit_and_wait(1)?;
            for cqe in ring.completion() {
                debug_assert_eq!(cqe.user_data() & !0xffff_ffff, WARM);
                if cqe.result() < 0 {
                    tracing::debug!("ring warm-up read: errno {}", -cqe.result());
                }
                reaped += 1;
            }
        }
        Ok(())
    })
}

/// Lets every queue thread run on any CPU this daemon may use (its own affinity, which systemd's
/// `CPUAffinity=` or `taskset` may have narrowed), undoing libublk's pinning of each queue to the
/// CPUs the kernel maps to it. Called once the device is live, when libublk has set that
/// affinity and every queue thread has stored its tid.
///
/// Why: pinned, a queue's thread runs on the very CPU whose tasks submit to it, so every request
/// switches from the submitter to the daemon and back on one CPU while the other CPUs may idle;
/// dm-crypt's kcryptd is unbound for the same reason. In the test VM (2 vCPUs, 2 queues) 4 KiB
/// reads at queue depth 1 and 32 went from 0.6–0.8× to 0.85–1.05× dm-crypt unpinned, the same
/// as one queue. `--pin-queues` keeps libublk's pinning.
fn unpin_queue_threads(ctx: &DeviceContext) {
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

/// One queue thread: protections, then one task per tag on the allocation-free executor.
fn serve_queue(qid: u16, dev: &UblkDev, ctx: &'static DeviceContext) {
    ctx.queue_tids[usize::from(qid)].store(nix::unistd::gettid().as_raw(), Ordering::Release);
    // libublk's threads are unnamed; name it like the other threads, for `top -H` and the tests.
    if let Ok(name) = std::ffi::CString::new(format!("ublk-crypt-q{qid}")) {
        let _ = nix::sys::prctl::set_name(&name);
    }
    if let Err(e) = hardening::protect_io_thread(ctx.protections) {
        // Checked on the main thread already; a failure here would be a kernel surprise.
        tracing::error!("queue {qid}: {e:#}");
    }
    let q = match UblkQueue::new(qid, dev) {
        Ok(q) => q,
        Err(e) => {
            tracing::error!("queue {qid}: cannot set up: {e}");
            let _ = ctx.events.lock().unwrap().send(Event::QueueExited(qid));
            return;
        }
    };
    // One lock, released at once: the record is read-only from here on.
    let (readonly, allow_discards) = {
        let rec = ctx.record.lock().unwrap();
        (rec.readonly, rec.allow_discards)
    };
    let io = IoPath {
        pool: ctx.pool,
        queue: usize::from(qid),
        data_offset: ctx.geometry.data_offset,
        readonly,
        allow_discards,
        counters: &ctx.counters[usize::from(qid)],
        error_log: &ctx.error_log,
    };
    let backing = UringBacking {
        q: &q,
        fd: ctx.backing.file().as_raw_fd(),
        block_device: ctx.backing.block_device,
    };
    let depth = usize::from(q.dev.dev_info.queue_depth);
    let in_flight = Cell::new(0u16);
    if let Err(e) = warm_queue_ring(depth * usize::from(OPS_PER_TAG)) {
        tracing::warn!("queue {qid}: io_uring warm-up failed: {e}");
    }
    let batch = PieceBatch::new(depth, usize::from(qid) * depth);
    let exe = TagExecutor::new(q.tags().map(|tag| {
        let crypto = QueueCrypto {
            q: &q,
            cipher: ctx.cipher,
            workers: ctx.workers,
            slot: usize::from(qid) * depth + usize::from(tag),
            tag,
            in_flight: &in_flight,
            batch: &batch,
        };
        serve_tag(&q, tag, &io, &backing, crypto)
    }));
    // A round: poll the woken tasks; then the small pieces they parked are shared out
    // (`PieceBatch::flush`), which wakes them again, until nothing is parked.
    let round = || {
        exe.run_ready();
        if let Some(workers) = ctx.workers {
            while batch.flush(workers) {
                exe.run_ready();
            }
        }
    };
    let r = block_on(libublk::wait_and_handle_io_events(
        &q,
        Some(20),
        round,
        || exe.all_done(),
    ));
    if let Err(e) = r {
        tracing::error!("queue {qid}: {e}");
    }
    let _ = ctx.events.lock().unwrap().send(Event::QueueExited(qid));
}

/// One tag's life: fetch a request, serve it, commit the result (which fetches the next).
async fn serve_tag(
    q: &UblkQueue<'_>,
    tag: u16,
    io: &IoPath<'_>,
    backing: &UringBacking<'_>,
    crypto: QueueCrypto<'_>,
) {
    let req = UserCopy {
        fd: q.dev.tgt.fds[0],
        qid: q.get_qid(),
        tag,
    };
    // The command in flight: `None` the first fetch, `Some(res)` a commit of `res` (and fetch).
    let mut command: Option<i32> = None;
    loop {
        let fetched = match command {
            None => {
                q.submit_io_prep_cmd(tag, BufDesc::Slice(&[]), -1, None)
                    .await
            }
            Some(res) => q.submit_io_commit_cmd(tag, BufDesc::Slice(&[]), res).await,
        };
        match fetched {
            Ok(r) if r >= 0 => {}
            // The command itself failed, so nothing was fetched and a commit did not land: its
            // request is still ours. ENOMEM/EAGAIN are io_uring short of memory for a moment;
            // giving up would leave that request (a swap bio, maybe) pending for ever.
            Ok(r) if r == -libc::ENOMEM || r == -libc::EAGAIN || r == -libc::EINTR => {
                QueueCounters::add(&io.counters.command_retries, 1);
                continue;
            }
            Ok(r) => {
                tracing::error!("tag {tag}: ublk command failed: errno {}", -r);
                return;
            }
            Err(UblkError::QueueIsDown) => return,
            Err(e) => {
                tracing::error!("tag {tag}: {e}");
                return;
            }
        }
        let iod = q.get_iod(tag);
        let desc = IoDesc {
            op: iod.op_flags & 0xff,
            start_sector: iod.start_sector,
            nr_sectors: iod.nr_sectors,
        };
        crypto.in_flight.set(crypto.in_flight.get() + 1);
        command = Some(io.handle(&desc, &req, backing, &crypto).await);
        crypto.in_flight.set(crypto.in_flight.get() - 1);
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

impl RequestData for UserCopy {
    fn copy_out(&self, offset: u32, buf: &mut [u8]) -> Result<(), i32> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = UblkIOCtx::ublk_user_copy_pos(self.qid, self.tag, offset + done as u32);
            let rest = &mut buf[done..];
            // SAFETY: pread writes at most rest.len() bytes into `rest`, a live mutable slice.
            let n =
                unsafe { libc::pread(self.fd, rest.as_mut_ptr().cast(), rest.len(), pos as i64) };
            match n {
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

    fn copy_in(&self, offset: u32, buf: &[u8]) -> Result<(), i32> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = UblkIOCtx::ublk_user_copy_pos(self.qid, self.tag, offset + done as u32);
            let rest = &buf[done..];
            // SAFETY: pwrite reads at most rest.len() bytes from `rest`, a live slice.
            let n = unsafe { libc::pwrite(self.fd, rest.as_ptr().cast(), rest.len(), pos as i64) };
            match n {
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

/// The backing through the queue's own io_uring (registered as fixed file 1), so backing IO of
/// all the queue's tags overlaps while the thread encrypts.
struct UringBacking<'a> {
    q: &'a UblkQueue<'a>,
    fd: i32,
    block_device: bool,
}

/// Registered file index of the backing on every queue ring (0 is /dev/ublkcN).
const BACKING_FIXED: types::Fixed = types::Fixed(1);

impl BackingIo for UringBacking<'_> {
    async fn read_at(&self, buf: &mut [u8], offset: u64) -> i32 {
        let sqe = opcode::Read::new(BACKING_FIXED, buf.as_mut_ptr(), buf.len() as u32)
            .offset(offset)
            .build();
        // The buffer outlives the operation: this future is never dropped before completion
        // (tasks run until the queue stops, and the ring is drained before that).
        self.q.ublk_submit_sqe(sqe).await
    }

    async fn write_at(&self, buf: &[u8], offset: u64) -> i32 {
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
        if self.block_device {
            // BLKDISCARD = _IO(0x12, 119); a synchronous ioctl, as the kernel's loop driver does.
            let range = [offset, len];
            // SAFETY: BLKDISCARD reads a [u64; 2] (start, length) from a valid pointer.
            let r = unsafe { libc::ioctl(self.fd, 0x1277, range.as_ptr()) };
            if r < 0 {
                -std::io::Error::last_os_error()
                    .raw_os_error()
                    .unwrap_or(libc::EIO)
            } else {
                0
            }
        } else {
            let sqe = opcode::Fallocate::new(BACKING_FIXED, len)
                .offset(offset)
                .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                .build();
            self.q.ublk_submit_sqe(sqe).await
        }
    }
}

/// A tag's AES: a piece goes to the crypto workers when [`worth_offloading`] says so — large,
/// and something could use the queue thread meanwhile: another request of this queue in
/// flight, or (`crypt_overlapped`) the next piece's backing read — and the task awaits the
/// worker as a poll of its slot's eventfd on the queue's io_uring. Everything else runs
/// inline: with nothing else to do, a hand-off only adds two thread wake-ups to the request's
/// latency, which is what a swap-in — one faulting task, reads of 8–32 KiB — waits for
/// (measured in the VM: a 32 KiB read at queue depth 1 took 1.3–1.5× as long as on dm-crypt when
/// handed off).
struct QueueCrypto<'a> {
    q: &'a UblkQueue<'a>,
    cipher: &'static SectorCipher,
    workers: Option<&'static CryptoWorkers>,
    slot: usize,
    tag: u16,
    /// Requests of this queue being served right now (the queue thread's tasks share it).
    in_flight: &'a Cell<u16>,
    /// Small pieces shared with a worker at high queue depth.
    batch: &'a PieceBatch,
}

impl SectorCrypto for QueueCrypto<'_> {
    async fn crypt(
        &self,
        chunk: ublk_crypt_pool::Chunk<'static>,
        len: usize,
        sector: u64,
        encrypt: bool,
    ) -> (ublk_crypt_pool::Chunk<'static>, bool) {
        self.offload_or_inline(false, chunk, len, sector, encrypt)
            .await
    }

    async fn crypt_overlapped(
        &self,
        chunk: ublk_crypt_pool::Chunk<'static>,
        len: usize,
        sector: u64,
        encrypt: bool,
    ) -> (ublk_crypt_pool::Chunk<'static>, bool) {
        self.offload_or_inline(true, chunk, len, sector, encrypt)
            .await
    }
}

impl QueueCrypto<'_> {
    async fn offload_or_inline(
        &self,
        overlapped: bool,
        chunk: ublk_crypt_pool::Chunk<'static>,
        len: usize,
        sector: u64,
        encrypt: bool,
    ) -> (ublk_crypt_pool::Chunk<'static>, bool) {
        if let Some(workers) = self.workers {
            if len < MIN_OFFLOAD_BYTES && self.in_flight.get() >= BATCH_MIN_IN_FLIGHT {
                return self.batched(workers, chunk, len, sector, encrypt).await;
            }
        }
        let Some(workers) = self
            .workers
            .filter(|w| worth_offloading(len, self.in_flight.get(), overlapped, w.worker_idle()))
        else {
            return InlineCrypto(self.cipher)
                .crypt(chunk, len, sector, encrypt)
                .await;
        };
        workers.submit(self.slot, chunk, len, sector, encrypt);
        self.wait_worker(workers).await;
        workers.finish(self.slot)
    }

    /// Waits, as a poll on the queue's io_uring, for the worker to write this slot's eventfd.
    async fn wait_worker(&self, workers: &CryptoWorkers) {
        loop {
            let sqe =
                opcode::PollAdd::new(types::Fd(workers.done_fd(self.slot)), libc::POLLIN as u32)
                    .build();
            // The worker holds the chunk until it writes the eventfd: keep waiting through any
            // transient error rather than take the chunk back early.
            let r = self.q.ublk_submit_sqe(sqe).await;
            if r > 0 && workers.take_done(self.slot) {
                break;
            }
        }
    }

    /// A small piece at high queue depth: parked until the end of the round, then done by the
    /// queue thread or in a worker's batch ([`PieceBatch`]).
    async fn batched(
        &self,
        workers: &CryptoWorkers,
        chunk: ublk_crypt_pool::Chunk<'static>,
        len: usize,
        sector: u64,
        encrypt: bool,
    ) -> (ublk_crypt_pool::Chunk<'static>, bool) {
        self.batch
            .crypt(workers, self.tag, chunk, len, sector, encrypt, || {
                self.wait_worker(workers)
            })
            .await
    }
}
