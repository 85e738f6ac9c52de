//! A device's life in this process: `open` (create) and recovery (re-attach) share one
//! `prepare` — backing, geometry, key, cipher — and one `serve`: protections, pool, the
//! ublk device, the kept key and the record, the control thread, the queue threads, and the
//! stop.
//!
//! Order of `open`, chosen so bad input leaves nothing behind: everything that can be checked
//! without creating a device is checked first (the [`DeviceConfig`], the backing, the
//! geometry, the key, the cipher, the pool), then the device is added; any failure after that
//! deletes it again.

use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use libublk::ctrl::UblkCtrl;
use libublk::io::UblkDev;
use ublk_crypt_crypto::{Key, SectorCipher};
use ublk_crypt_pool::{PoolConfig, ReservePool};

use crate::backing::{Backing, Geometry};
use crate::config::{DeviceConfig, KeySource};
use crate::context::{DeviceContext, Event, StandbyState, Takeover};
use crate::hardening::{self, Protections};
use crate::io::RateLimit;
use crate::offload::CryptoWorkers;
use crate::queue_threads::QueueThreads;
use crate::readiness::{init_logging, sd_notify, Readiness};
use crate::records;
use crate::standby::{self, Standby};
use crate::stats::QueueCounters;
use crate::{control, keeper, keyring, queue, ublk};

/// `ublk-crypt open`: creates the device, or re-attaches to device `--id N` if it waits for
/// recovery (systemd restarting the daemon after a crash).
pub fn open(config: DeviceConfig) -> Result<ExitCode> {
    init_logging();
    ublk::check_driver()?;
    if let Some(id) = config.id {
        if let Ok(st) = ublk::device_state(id) {
            if st.waits_for_recovery() {
                hardening::io_flusher_for_recovery();
                let rec = records::load(id).with_context(|| {
                    format!("ublk device {id} waits for recovery but has no ublk-crypt record")
                })?;
                tracing::info!("device {id} is waiting for recovery: re-attaching");
                return serve(DeviceConfig::from_record(&rec, config.foreground)?);
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
    if let Some(name) = &config.name {
        if let Ok(rec) = records::resolve(name) {
            if ublk::device_state(rec.id).is_ok() {
                bail!(
                    "a device named '{name}' already exists ({})",
                    rec.bdev_path()
                );
            }
        }
    }
    serve(config)
}

/// `ublk-crypt recover NAME|ID`: re-attach a new daemon to a device whose daemon died.
pub fn recover(device: &str, foreground: bool) -> Result<ExitCode> {
    hardening::io_flusher_for_recovery();
    let rec = records::resolve(device)?;
    let dev_state = ublk::device_state(rec.id)
        .with_context(|| format!("ublk device {} does not exist any more", rec.id))?;
    if dev_state.daemon_alive {
        bail!(
            "device {} ({}) is served by pid {}: nothing to recover",
            rec.name,
            rec.bdev_path(),
            dev_state.pid
        );
    }
    if !dev_state.quiesced {
        bail!(
            "device {} is in state {} (not waiting for recovery)",
            rec.name,
            dev_state.state_name
        );
    }
    init_logging();
    ublk::check_driver()?;
    serve(DeviceConfig::from_record(&rec, foreground)?)
}

/// What a device needs before it exists: checked, opened and read, nothing created yet.
struct Prepared {
    config: DeviceConfig,
    backing: Backing,
    geometry: Geometry,
    /// Dropped once kept in the keyring (a new device) or straight away (a recovered one).
    key: Key,
    cipher: SectorCipher,
}

/// Opens the backing, checks the geometry, reads the key (from its source, or the keyring's
/// copy when recovering) and makes the cipher.
fn prepare(config: DeviceConfig, standby: bool) -> Result<Prepared> {
    // Recovery reads the kept key first: without it nothing else matters.
    let kept = match (&config.key, config.id) {
        (KeySource::Kept, Some(id)) => Some(keyring::kept_key(id, config.key_bytes())?),
        (KeySource::Kept, None) => bail!("recovery needs the device id"),
        (KeySource::Read(_), _) => None,
    };
    let backing = if standby {
        Backing::open_for_standby(&config.backing, config.readonly)?
    } else {
        Backing::open(&config.backing, config.readonly)?
    };
    let geometry = Geometry::new(
        backing.size,
        config.offset,
        config.size,
        config.layout.sector_size,
        if backing.direct {
            backing.logical_block_size
        } else {
            512
        },
        &config.backing,
    )?;
    let key = match (&config.key, kept) {
        (KeySource::Read(spec), _) => {
            spec.read(config.key_bytes(), &config.backing.display().to_string())?
        }
        (KeySource::Kept, kept) => kept.expect("read above"),
    };
    let cipher = SectorCipher::new(config.spec, &key, config.layout)?;
    Ok(Prepared {
        config,
        backing,
        geometry,
        key,
        cipher,
    })
}

/// Serves the device `config` describes until it is stopped: forks (unless in the
/// foreground), then [`run`]; a start-up failure reaches the waiting parent too.
fn serve(config: DeviceConfig) -> Result<ExitCode> {
    let role = if config.recovering() {
        Role::Recover
    } else {
        Role::Create
    };
    ublk::check_kernel_offers(config.batch_io, config.threads_per_queue)?;
    let prepared = prepare(config, false)?;
    let Some(readiness) = Readiness::start(prepared.config.foreground)? else {
        return Ok(ExitCode::SUCCESS); // the parent, done
    };
    serve_as(prepared, readiness, role)
}

/// `ublk-crypt standby ID --pool-fd N`, started by the daemon of device ID (`keeper.rs`):
/// everything a daemon does before its device, then the wait, then the takeover.
pub fn standby(id: u32, pool_fd: i32) -> Result<ExitCode> {
    hardening::io_flusher_for_recovery();
    init_logging();
    let sb = Standby::new(pool_fd)?;
    let rec = records::load(id).with_context(|| format!("standby: no record of device {id}"))?;
    let config = DeviceConfig::from_record(&rec, true)?;
    let prepared = prepare(config, true)?;
    serve_as(
        prepared,
        Readiness::Foreground,
        Role::Standby {
            standby: sb,
            previous_pid: rec.pid,
        },
    )
}

/// How this process comes to serve the device.
enum Role {
    /// A new device.
    Create,
    /// A device whose daemon died, re-attached now (`recover`, `open --id`).
    Recover,
    /// A device served by another daemon, taken over when that one is gone.
    Standby { standby: Standby, previous_pid: u32 },
}

fn serve_as(prepared: Prepared, readiness: Readiness, role: Role) -> Result<ExitCode> {
    let readiness = Arc::new(Mutex::new(Some(readiness)));
    match run(prepared, readiness.clone(), role) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            if let Some(mut r) = readiness.lock().unwrap().take() {
                r.fail(&e);
            }
            Err(e)
        }
    }
}

/// The pool of IO buffers, sized by `--pool-mib` and shared out by the queues' depth: shareable
/// when the device has standbys, the daemon's own when this is one.
fn make_pool(config: &DeviceConfig, role: &Role) -> Result<ReservePool> {
    let budget_bytes = config.pool_mib << 20;
    let pool_config = PoolConfig {
        budget_bytes,
        chunk_bytes: ublk_crypt_pool::chunk_bytes_for(
            budget_bytes,
            usize::from(config.queues) * usize::from(config.depth),
        ),
        lock: config.protections,
        ..PoolConfig::with_queues(usize::from(config.queues))
    };
    match role {
        Role::Standby { standby, .. } => ReservePool::attach(pool_config, standby.pool_memfd()?),
        _ if config.standby => ReservePool::new_shareable(pool_config),
        _ => ReservePool::new(pool_config),
    }
    .context("IO buffer pool")
}

/// A new device's key and record are undone by any failure before it is live (the ctrl's Drop
/// deletes an ADD_DEV device); a recovered device is left waiting for the next attempt, key
/// and all.
struct Cleanup {
    id: u32,
    creating: bool,
}

impl Cleanup {
    fn undo(&self, e: anyhow::Error) -> anyhow::Error {
        if self.creating {
            keyring::forget_key(self.id);
            records::remove(self.id);
        }
        e
    }
}

/// Everything after `prepare`, in the serving process: what allocates first (protections, pool,
/// crypto workers, queue threads), then the device (created, re-attached, or — a standby —
/// waited for and taken over), served until it is stopped.
fn run(prepared: Prepared, readiness: Arc<Mutex<Option<Readiness>>>, role: Role) -> Result<()> {
    let Prepared {
        config,
        backing,
        geometry,
        key,
        cipher,
    } = prepared;
    let protections = Protections {
        enabled: config.protections,
    };
    crate::kernel_log::open();
    hardening::protect_process(protections)?;
    let pool: &'static ReservePool = Box::leak(Box::new(make_pool(&config, &role)?));
    let cipher: &'static SectorCipher = Box::leak(Box::new(cipher));
    let workers = match config.crypto_threads {
        0 => None,
        n => Some(CryptoWorkers::start(
            cipher,
            usize::from(config.queues) * usize::from(config.depth),
            n,
            protections,
            || {},
        )?),
    };
    let threads = QueueThreads::spawn(&config, protections)?;

    let shape = ublk::Shape {
        queues: config.queues,
        depth: config.depth,
        max_io_kib: config.max_io_kib,
        batch_io: config.batch_io,
        threads_per_queue: config.threads_per_queue,
    };
    let creating = matches!(role, Role::Create);
    let ctrl = match (&role, config.id) {
        (Role::Create, id) => ublk::create(id, &shape)?,
        (Role::Recover, Some(id)) => ublk::recover(id, &shape)?,
        (Role::Standby { .. }, Some(id)) => ublk::attach_for_recovery(id, &shape)?,
        (_, None) => bail!("recovery needs the device id"),
    };
    let id = ctrl.dev_info().dev_id;
    let record = config.record(id, geometry.size);
    let cleanup = Cleanup { id, creating };
    if creating {
        keyring::keep_key(id, &key).map_err(|e| cleanup.undo(e))?;
    }
    drop(key);
    if !matches!(role, Role::Standby { .. }) {
        records::save(&record).map_err(|e| cleanup.undo(e))?;
    }

    let (tx, rx) = mpsc::channel();
    let pool_fd = match &role {
        Role::Standby { standby, .. } => standby.pool_fd(),
        _ => pool.shared_fd().map_or(-1, |fd| fd.as_raw_fd()),
    };
    let ctx: &'static DeviceContext = Box::leak(Box::new(DeviceContext {
        counters: (0..config.queues)
            .map(|_| QueueCounters::default())
            .collect(),
        record,
        cipher,
        workers,
        pool,
        backing,
        geometry,
        error_log: RateLimit::new(1000),
        protections,
        events: tx,
        queue_tids: (0..config.queues * config.threads_per_queue)
            .map(|_| AtomicI32::new(0))
            .collect(),
        standby: StandbyState {
            enabled: config.standby,
            pool_fd,
            ..StandbyState::default()
        },
        ublk_features: OnceLock::new(),
    }));

    if let Role::Standby {
        standby,
        previous_pid,
    } = &role
    {
        // What recovery reads must be in RAM now: the daemon's lock on it ends with it.
        for file in [records::record_path(id), ctrl.run_path().into()] {
            if let Err(e) = records::keep_in_memory(&file) {
                tracing::warn!("{e:#}: the takeover may block if it is swapped out");
            }
        }
        STANDBY_HEAP.store(
            hardening::reserve_heap(hardening::TAKEOVER_HEAP_BYTES),
            Ordering::Relaxed,
        );
        let (mut priority, allowed) = standby::TakeoverPriority::check(threads.tids());
        if let Err(e) = allowed {
            tracing::warn!(
                "standby: the takeover cannot run at real-time priority ({e}: it needs \
                 CAP_SYS_NICE): with memory exhausted it may wait for memory that never comes"
            );
        }
        if let Err(e) = standby.announce_ready(&ctx.record) {
            tracing::warn!("standby: {e:#}");
        }
        let gone = standby.wait_for_primary();
        if control::takeover_test_hook() {
            priority.raise();
        }
        control::takeover_test_alloc();
        if !standby::begin_recovery(&ctrl, id)? {
            priority.lower();
            tracing::info!("device {id} was closed: the standby is not needed");
            return Ok(());
        }
        let _ = TAKEOVER_STARTED.set((gone.at, gone.upgrade, *previous_pid, priority));
    } else {
        control::spawn(ctx).map_err(|e| cleanup.undo(e))?;
    }
    if matches!(role, Role::Recover) {
        // Last: every step that can fail is behind us (record, workers, queue threads and
        // their rings, the control socket), so a failed attempt leaves the device waiting for
        // the next one, key and all.
        control::recovery_test_hook("before-start")?;
        ublk::start_recovery(&ctrl, id)?;
        control::recovery_test_hook("after-start")?;
    }

    let path = ctx.record.bdev_path();
    let became_ready = AtomicBool::new(false);
    let pin_queues = config.pin_queues;
    let run = serve_device(&ctrl, threads, ctx, |c| {
        c.disown(); // from now on only an explicit stop deletes the device, never a Drop
        became_ready.store(true, Ordering::Release);
        went_live(c, ctx, pin_queues, &readiness);
        wait_for_stop(c, ctx, &rx);
    });
    let ready = became_ready.load(Ordering::Acquire);
    match run {
        Ok(()) if ready => {
            // Clean stop (close or SIGTERM): delete the device and forget its key.
            let _ = ctrl.del_dev();
            keyring::forget_key(id);
            records::remove(id);
            sd_notify("STOPPING=1");
            tracing::info!("{path} closed");
            Ok(())
        }
        Ok(()) => Err(cleanup.undo(anyhow::anyhow!("the device stopped before it became live"))),
        Err(e) => {
            if creating {
                let _ = ctrl.del_dev_async();
            }
            Err(cleanup.undo(ublk::ublk_error(
                "cannot start the ublk device",
                Some(id),
                e,
            )))
        }
    }
}

/// A standby's takeover under way: when it saw its daemon gone (the start of the device's time
/// without a server), whether that one handed over, its pid, and the takeover's threads at
/// real-time priority (lowered once the device is served).
static TAKEOVER_STARTED: OnceLock<(Instant, bool, u32, standby::TakeoverPriority)> =
    OnceLock::new();

/// The standby's heap size when it said it was ready (`hardening::reserve_heap`): the takeover's
/// log says whether the heap had to grow since.
static STANDBY_HEAP: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// libublk's `run_target`, with queue threads made beforehand ([`QueueThreads`]): the device's
/// parameters, the queues handed their threads, the device started (or its recovery ended),
/// then `live` on this thread until the device stops, then the queue threads joined.
fn serve_device(
    ctrl: &UblkCtrl,
    threads: QueueThreads,
    ctx: &'static DeviceContext,
    live: impl FnOnce(&UblkCtrl),
) -> Result<(), libublk::UblkError> {
    let dev = Arc::new(UblkDev::new(
        ctrl.get_name(),
        |dev: &mut UblkDev| ublk::set_params(dev, ctx),
        ctrl,
    )?);
    let handles = threads.start(ctrl, &dev, ctx);
    ctrl.start_dev(&dev)?;
    live(ctrl);
    for h in handles {
        let _ = h.join();
    }
    // The device may have been deleted from elsewhere: an error here is normal.
    let _ = ctrl.stop_dev();
    Ok(())
}

/// The device is live: a standby's takeover finished (its time, the backing claimed, the record
/// and control socket made its own, a standby of its own), final CPU affinities, readiness, and
/// what recovery will need kept in RAM.
fn went_live(
    c: &UblkCtrl,
    ctx: &'static DeviceContext,
    pin_queues: bool,
    readiness: &Mutex<Option<Readiness>>,
) {
    let path = ctx.record.bdev_path();
    if let Some((t0, upgrade, previous_pid, priority)) = TAKEOVER_STARTED.get() {
        priority.lower();
        finish_takeover(ctx, *t0, *upgrade, *previous_pid, priority.raised());
    }
    // Before READY=1 and `open` returning: whoever sees the device sees final affinities.
    if !pin_queues {
        queue::unpin_queue_threads(ctx);
    }
    if let Some(mut r) = readiness.lock().unwrap().take() {
        r.ready(&path);
    }
    tracing::info!(
        "serving {path} (AES: {}, XTS tier: {})",
        ublk_crypt_crypto::aes_backend(),
        ublk_crypt_crypto::xts_tier()
    );
    let features = ublk::features(c);
    tracing::info!(
        "ublk features: the kernel offers {}; this device uses {}",
        features.offered.join(" "),
        features.in_use.join(" ")
    );
    let _ = ctx.ublk_features.set(features);
    if let Some(e) = ublk_crypt_crypto::xts_tier_env_error() {
        tracing::warn!("{e}; using the detected tier");
    }
    // What recovery reads must not be in the swap it recovers (records::keep_in_memory).
    for file in [records::record_path(ctx.record.id), c.run_path().into()] {
        if let Err(e) = records::keep_in_memory(&file) {
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
    if let Err(e) = keeper::spawn(ctx) {
        tracing::warn!("{e:#}: serving without a standby");
    }
}

/// The rest of a takeover, once the device is served again (allocating is safe now: reclaim
/// can write to swap again).
fn finish_takeover(
    ctx: &'static DeviceContext,
    t0: Instant,
    upgrade: bool,
    previous_pid: u32,
    realtime: bool,
) {
    let gap = t0.elapsed();
    let done = Takeover {
        at_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        gap_us: gap.as_micros() as u64,
        upgrade,
        previous_pid,
        realtime,
    };
    let _ = ctx.standby.takeover.set(done);
    let heap_before = STANDBY_HEAP.load(Ordering::Relaxed);
    tracing::info!(
        "took device {} over from pid {previous_pid} ({}): {:.1} ms without a server, {}, heap \
         {} KiB (grew by {} KiB past the kept reserve)",
        ctx.record.id,
        if upgrade { "upgrade" } else { "crash" },
        gap.as_secs_f64() * 1000.0,
        if realtime {
            "at real-time priority"
        } else {
            "at normal priority"
        },
        hardening::heap_size() >> 10,
        hardening::heap_size().saturating_sub(heap_before) >> 10
    );
    match ctx.backing.claim() {
        Ok(claim) => std::mem::forget(claim), // exclusive for the rest of the process
        Err(e) => tracing::warn!("{e:#}"),
    }
    if let Err(e) = records::save(&ctx.record) {
        tracing::warn!("cannot update the device record: {e:#}");
    }
    if let Err(e) = control::spawn(ctx) {
        tracing::error!("{e:#}: `status`, `close` and `upgrade` cannot reach this daemon");
    }
}

/// Blocks the device's main thread until a stop is asked for (close, SIGTERM), then ends the
/// standby and stops the device. A queue that ended on its own is a stop only when the device is
/// known to be gone (deleted or stopped from outside); while the kernel still holds the device,
/// it is a crash: see [`leave_for_recovery`].
fn wait_for_stop(c: &UblkCtrl, ctx: &DeviceContext, rx: &mpsc::Receiver<Event>) {
    let hold = match rx.recv() {
        Ok(Event::Stop(hold)) => {
            tracing::info!("stopping");
            hold
        }
        Ok(Event::QueueExited(q)) => match ublk::device_state(ctx.record.id) {
            Ok(state) if state.state_name == "dead" => {
                tracing::warn!("queue {q} ended: the device was stopped from outside");
                None
            }
            Ok(state) => leave_for_recovery(ctx, q, state.state_name),
            Err(_) if !ublk::device_exists(ctx.record.id) => {
                tracing::warn!("queue {q} ended: the device was deleted from outside");
                None
            }
            Err(e) => leave_for_recovery(ctx, q, &format!("unknown ({e:#})")),
        },
        Err(_) => None,
    };
    keeper::stop(ctx);
    let _ = c.kill_dev();
    // Stopped: nothing can swapon or mount it now. Deleting it waits for every opener.
    drop(hold);
}

/// The exit status of a daemon that left its device for recovery (a queue ended on its own):
/// `EX_TEMPFAIL`. The unit counts it as a clean exit (`SuccessExitStatus=`) so that a standby's
/// takeover is the service going on, and `Restart=always` still starts a daemon if none is left.
pub const EXIT_LEFT_FOR_RECOVERY: i32 = 75;

/// A queue ended on its own while the kernel still holds the device: a crash, not a stop. The
/// device, its kept key and the record stay, and the process exits at once: its standby takes
/// the device over (the kernel quiesces the device when this process's files are released), or
/// `ublk-crypt recover` / systemd's restart does. Stopping the device here would throw away
/// every page swapped out to it.
fn leave_for_recovery(ctx: &DeviceContext, q: u16, state: &str) -> ! {
    let id = ctx.record.id;
    tracing::error!(
        "queue {q} ended on its own with device {id} still {state}: leaving the device and its \
         key for recovery (the standby, or `ublk-crypt recover {}`) and exiting",
        ctx.record.name
    );
    std::process::exit(EXIT_LEFT_FOR_RECOVERY)
}
