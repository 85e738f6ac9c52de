//! A device's life in this process: `open` (create) and recovery (re-attach) share one
//! `prepare` — backing, geometry, key, cipher — and one `serve`: protections, pool, the
//! ublk device, the kept key and the record, the control thread, the queue threads, and the
//! stop.
//!
//! Order of `open`, chosen so bad input leaves nothing behind: everything that can be checked
//! without creating a device is checked first (the [`DeviceConfig`], the backing, the
//! geometry, the key, the cipher, the pool), then the device is added; any failure after that
//! deletes it again.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use anyhow::{bail, Context, Result};
use libublk::ctrl::UblkCtrl;
use libublk::io::UblkDev;
use ublk_crypt_crypto::{Key, SectorCipher};
use ublk_crypt_pool::{PoolConfig, ReservePool};

use crate::backing::{Backing, Geometry};
use crate::config::{DeviceConfig, KeySource};
use crate::context::{DeviceContext, Event};
use crate::hardening::{self, Protections};
use crate::io::RateLimit;
use crate::offload::CryptoWorkers;
use crate::readiness::{init_logging, sd_notify, Readiness};
use crate::records;
use crate::stats::QueueCounters;
use crate::{control, keyring, queue, ublk};

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
fn prepare(config: DeviceConfig) -> Result<Prepared> {
    // Recovery reads the kept key first: without it nothing else matters.
    let kept = match (&config.key, config.id) {
        (KeySource::Kept, Some(id)) => Some(keyring::kept_key(id, config.key_bytes())?),
        (KeySource::Kept, None) => bail!("recovery needs the device id"),
        (KeySource::Read(_), _) => None,
    };
    let backing = Backing::open(&config.backing, config.readonly)?;
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
    let prepared = prepare(config)?;
    let Some(readiness) = Readiness::start(prepared.config.foreground)? else {
        return Ok(ExitCode::SUCCESS); // the parent, done
    };
    let readiness = Arc::new(Mutex::new(Some(readiness)));
    match run(prepared, readiness.clone()) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            if let Some(mut r) = readiness.lock().unwrap().take() {
                r.fail(&e);
            }
            Err(e)
        }
    }
}

/// The pool of IO buffers, sized by `--pool-mib` and shared out by the queues' depth.
fn make_pool(config: &DeviceConfig) -> Result<ReservePool> {
    let budget_bytes = config.pool_mib << 20;
    ReservePool::new(PoolConfig {
        budget_bytes,
        chunk_bytes: ublk_crypt_pool::chunk_bytes_for(
            budget_bytes,
            usize::from(config.queues) * usize::from(config.depth),
        ),
        lock: config.protections,
        ..PoolConfig::with_queues(usize::from(config.queues))
    })
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

/// Everything after `prepare`, in the serving process.
fn run(prepared: Prepared, readiness: Arc<Mutex<Option<Readiness>>>) -> Result<()> {
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
    let pool = make_pool(&config)?;

    let shape = ublk::Shape {
        queues: config.queues,
        depth: config.depth,
        max_io_kib: config.max_io_kib,
    };
    let creating = !config.recovering();
    let ctrl = match config.id {
        Some(id) if !creating => ublk::recover(id, &shape)?,
        id => ublk::create(id, &shape)?,
    };
    let id = ctrl.dev_info().dev_id;
    let record = config.record(id, geometry.size);
    let cleanup = Cleanup { id, creating };
    if creating {
        keyring::keep_key(id, &key).map_err(|e| cleanup.undo(e))?;
    }
    drop(key);
    records::save(&record).map_err(|e| cleanup.undo(e))?;

    let (tx, rx) = mpsc::channel();
    let cipher: &'static SectorCipher = Box::leak(Box::new(cipher));
    let pool: &'static ReservePool = Box::leak(Box::new(pool));
    let workers = match config.crypto_threads {
        0 => None,
        n => Some(
            CryptoWorkers::start(
                cipher,
                usize::from(config.queues) * usize::from(config.depth),
                n,
                protections,
                || {},
            )
            .map_err(|e| cleanup.undo(e))?,
        ),
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
        queue_tids: (0..config.queues).map(|_| AtomicI32::new(0)).collect(),
    }));
    control::spawn(ctx).map_err(|e| cleanup.undo(e))?;

    let path = ctx.record.bdev_path();
    let became_ready = Arc::new(AtomicBool::new(false));
    let device_fn = {
        let (readiness, became_ready) = (readiness.clone(), became_ready.clone());
        let rx = Mutex::new(rx);
        let pin_queues = config.pin_queues;
        // Runs on this thread once every queue has fetched and the device is live.
        move |c: &UblkCtrl| {
            c.disown(); // from now on only an explicit stop deletes the device, never a Drop
            became_ready.store(true, Ordering::Release);
            went_live(c, ctx, pin_queues, &readiness);
            wait_for_stop(c, &rx);
        }
    };
    let run = ctrl.run_target(
        move |dev: &mut UblkDev| ublk::set_params(dev, ctx),
        move |qid: u16, dev: &UblkDev| queue::serve_queue(qid, dev, ctx),
        device_fn,
    );
    let ready = became_ready.load(Ordering::Acquire);
    match run {
        Ok(_) if ready => {
            // Clean stop (close or SIGTERM): delete the device and forget its key.
            let _ = ctrl.del_dev();
            keyring::forget_key(id);
            records::remove(id);
            sd_notify("STOPPING=1");
            tracing::info!("{path} closed");
            Ok(())
        }
        Ok(_) => Err(cleanup.undo(anyhow::anyhow!("the device stopped before it became live"))),
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

/// The device is live: final CPU affinities, readiness, and what recovery will need kept in
/// RAM.
fn went_live(
    c: &UblkCtrl,
    ctx: &DeviceContext,
    pin_queues: bool,
    readiness: &Mutex<Option<Readiness>>,
) {
    let path = ctx.record.bdev_path();
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
}

/// Blocks the device's main thread until a stop is asked for (close, SIGTERM) or a queue ended
/// on its own (the device was deleted under us), then stops the device.
fn wait_for_stop(c: &UblkCtrl, rx: &Mutex<mpsc::Receiver<Event>>) {
    let hold = match rx.lock().unwrap().recv() {
        Ok(Event::Stop(hold)) => {
            tracing::info!("stopping");
            hold
        }
        Ok(Event::QueueExited(q)) => {
            tracing::warn!("queue {q} ended; stopping the device");
            None
        }
        Err(_) => None,
    };
    let _ = c.kill_dev();
    // Stopped: nothing can swapon or mount it now. Deleting it waits for every opener.
    drop(hold);
}
