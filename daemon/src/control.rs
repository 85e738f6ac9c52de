//! The control plane: signals, the status socket and readiness on the daemon side; `close`,
//! `list` and `status` on the client side.
//!
//! It runs on its own thread with a single-threaded tokio runtime, far from the IO path: the
//! queue threads never wait on it, and it may allocate freely. Requests on the socket
//! (`/run/ublk-crypt/<id>.sock`, mode 0600) are one line: `status` answers one JSON line,
//! `close` stops the device. SIGTERM and SIGINT stop the device too (systemd's stop).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::hardening;
use crate::state::{self, DeviceRecord};
use crate::stats::QueueSnapshot;
use crate::target::{self, DeviceContext};

/// What the control plane tells the device's main thread.
pub enum Event {
    Stop,
    QueueExited(u16),
}

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
    /// The `aes` crate's implementation on this CPU (`vaes512`, `vaes256`, `aes-ni`, `soft`):
    /// what the cipher's speed depends on most.
    #[serde(default)]
    pub aes_backend: String,
    /// The AES-XTS implementation in use (`vaes-avx512`, `vaes-avx2`, `aesni`, `portable`;
    /// capped by `UBLK_CRYPT_XTS_TIER`).
    #[serde(default)]
    pub xts_tier: String,
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
    let (rss, lck) = self_memory();
    let device = ctx.record.lock().unwrap().clone();
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
        aes_backend: ublk_crypt_crypto::aes_backend().to_string(),
        xts_tier: ublk_crypt_crypto::xts_tier().to_string(),
    }
}

fn self_memory() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmLck:"))
}

/// Starts the control thread for a device being served.
pub fn spawn(ctx: &'static DeviceContext) -> Result<()> {
    let id = ctx.record.lock().unwrap().id;
    let sock_path = state::socket_path(id);
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
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
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

fn stop(ctx: &DeviceContext) {
    let _ = ctx.events.lock().unwrap().send(Event::Stop);
}

/// A signal stops the device only if nothing holds it: deleting a device under an active swap
/// area would fail every swapped page's read (the processes owning them would die). If it is
/// in use, the daemon keeps serving and says why; if it is then killed (systemd's stop timeout),
/// the device stays, waiting for recovery, and no page is lost.
fn stop_unless_in_use(ctx: &DeviceContext, signal: &str) {
    let rec = ctx.record.lock().unwrap().clone();
    match refuse_if_in_use(&rec) {
        Ok(()) => {
            tracing::info!("{signal}: stopping");
            stop(ctx);
        }
        Err(e) => tracing::error!("{signal} ignored: {e:#}"),
    }
}

async fn control_loop(ctx: &'static DeviceContext, listener: std::os::unix::net::UnixListener) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
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
            _ = term.recv() => stop_unless_in_use(ctx, "SIGTERM"),
            _ = int.recv() => stop_unless_in_use(ctx, "SIGINT"),
            conn = listener.accept() => {
                let Ok((stream, _)) = conn else { continue };
                // One request at a time: the control plane needs no concurrency.
                async {
                    let (rd, mut wr) = stream.into_split();
                    let mut line = String::new();
                    let mut rd = tokio::io::BufReader::new(rd);
                    if rd.read_line(&mut line).await.is_err() {
                        return;
                    }
                    let reply = match line.trim() {
                        "status" => serde_json::to_string(&status_of(ctx)).unwrap_or_default(),
                        "close" => { stop(ctx); "{\"closing\":true}".to_string() }
                        other => format!("{{\"error\":\"unknown request '{}'\"}}", other.escape_default()),
                    };
                    let _ = wr.write_all(reply.as_bytes()).await;
                    let _ = wr.write_all(b"\n").await;
                }.await;
            }
        }
    }
}

/// Sends one request to a daemon's control socket and returns its one-line answer.
fn request(rec: &DeviceRecord, what: &str) -> Result<String> {
    let path = rec.socket_path();
    let mut s = UnixStream::connect(&path).with_context(|| {
        format!(
            "cannot reach the daemon of {} at {}",
            rec.name,
            path.display()
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    writeln!(s, "{what}")?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    Ok(line)
}

/// `ublk-crypt close NAME|ID`.
pub fn close(device: &str) -> Result<ExitCode> {
    let rec = state::resolve(device)?;
    let st = target::device_state(rec.id);
    match st {
        Ok(st) if st.daemon_alive => {
            refuse_if_in_use(&rec)?;
            request(&rec, "close")?;
            let deadline = Instant::now() + Duration::from_secs(60);
            while target::device_exists(rec.id) {
                if Instant::now() > deadline {
                    bail!(
                        "{} did not close within 60 s (is it still mounted or swapped on?)",
                        rec.bdev_path()
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(_) => {
            // The daemon is gone (crashed): delete the orphaned device ourselves.
            let ctrl = libublk::ctrl::UblkCtrl::new_simple(rec.id as i32)
                .map_err(|e| anyhow::anyhow!("cannot open ublk device {}: {e}", rec.id))?;
            ctrl.del_dev()
                .map_err(|e| anyhow::anyhow!("cannot delete ublk device {}: {e}", rec.id))?;
        }
        Err(_) => {} // the device is already gone: just forget the record and key
    }
    crate::recovery::forget_key(rec.id);
    state::remove(rec.id);
    Ok(ExitCode::SUCCESS)
}

/// Like `cryptsetup close`, refuse to pull a device out from under a mount or a swap area:
/// both hold the block device exclusively, so an exclusive open fails with EBUSY.
fn refuse_if_in_use(rec: &DeviceRecord) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::File::options()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(rec.bdev_path())
    {
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => bail!(
            "{} ({}) is in use (mounted, swapped on, or held open exclusively): unmount or swapoff it first",
            rec.name,
            rec.bdev_path()
        ),
        _ => Ok(()),
    }
}

/// `ublk-crypt list`.
pub fn list(json: bool) -> Result<ExitCode> {
    let mut rows = Vec::new();
    for rec in state::all() {
        let state = match target::device_state(rec.id) {
            Ok(s) if s.daemon_alive => "serving".to_string(),
            Ok(s) => format!("{} (no daemon)", s.state_name),
            Err(_) => "gone".to_string(),
        };
        rows.push((rec, state));
    }
    if json {
        let v: Vec<_> = rows
            .iter()
            .map(|(r, s)| {
                serde_json::json!({ "name": r.name, "id": r.id, "device": r.bdev_path(),
                "backing": r.backing, "cipher": r.cipher, "key_bits": r.key_bits,
                "sector_size": r.sector_size, "pid": r.pid, "state": s })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "{:<16} {:<12} {:<24} {:<22} {:>7} STATE",
            "NAME", "DEVICE", "BACKING", "CIPHER", "PID"
        );
        for (r, s) in rows {
            println!(
                "{:<16} {:<12} {:<24} {:<22} {:>7} {s}",
                r.name,
                r.bdev_path(),
                r.backing.display(),
                format!("{}/{}", r.cipher, r.key_bits),
                r.pid
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `ublk-crypt status NAME|ID`.
pub fn status(device: &str, json: bool) -> Result<ExitCode> {
    let rec = state::resolve(device)?;
    let line = request(&rec, "status")?;
    if json {
        print!("{line}");
        return Ok(ExitCode::SUCCESS);
    }
    let s: Status = serde_json::from_str(&line).context("malformed status from the daemon")?;
    let d = &s.device;
    println!(
        "{} is active: {} on {}",
        d.name,
        s.path,
        d.backing.display()
    );
    println!(
        "  cipher:      {} {} bits, {}-byte sectors, offset {}, skip {}, AES {}, XTS tier {}",
        d.cipher, d.key_bits, d.sector_size, d.offset, d.skip, s.aes_backend, s.xts_tier
    );
    println!("  size:        {} sectors", d.size / 512);
    println!(
        "  daemon:      pid {}, RSS {} KiB, locked {} KiB, protections {}",
        d.pid,
        s.vm_rss_kib,
        s.vm_lck_kib,
        if d.protections { "on" } else { "OFF" }
    );
    println!(
        "  pool:        {} x {} KiB{}, in use {}, high water {}, waits {}, reserve hits {}",
        s.pool.chunks_total,
        s.pool.chunk_bytes >> 10,
        if s.pool.locked { " locked" } else { "" },
        s.pool.in_use,
        s.pool.high_water,
        s.pool.waits,
        s.pool.reserve_hits
    );
    for q in &s.queues {
        println!(
            "  queue {}:     reads {} ({} B), writes {} ({} B), flushes {}, discards {}, errors {}, split {}, pool waits {}",
            q.queue, q.io.reads, q.io.bytes_read, q.io.writes, q.io.bytes_written, q.io.flushes,
            q.io.discards, q.io.errors, q.io.split_ios, q.pool_waits
        );
    }
    Ok(ExitCode::SUCCESS)
}
