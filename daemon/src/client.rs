//! The client commands, run by an admin or a unit file against devices served by other
//! processes: `close`, `list` and `status`. They find a device by its record
//! (`records.rs`) and talk to its daemon over the control socket (`control.rs`).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::control::{hold_unless_in_use, refuse_if_in_use, Status};
use crate::control_request::{reply_error, request, request_with};
use crate::records;
use crate::{keyring, ublk};

/// `ublk-crypt close NAME|ID`.
pub fn close(device: &str) -> Result<ExitCode> {
    let rec = records::resolve(device)?;
    let st = ublk::device_state(rec.id);
    match st {
        Ok(st) if st.daemon_alive => {
            refuse_if_in_use(&rec)?;
            // The daemon checks again, holding the device until it is stopped; a refusal (a
            // swapon or mount in between) comes back as an error.
            let reply = request(&rec, "close")?;
            if let Some(e) = reply_error(&reply) {
                bail!("{e}");
            }
            let deadline = Instant::now() + Duration::from_secs(60);
            while ublk::device_exists(rec.id) {
                if Instant::now() > deadline {
                    bail!(
                        "{} did not close within 60 s (is it still mounted or swapped on?)",
                        rec.bdev_path()
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            // And until the daemon has exited (its standby is gone before it): the backing is
            // free for `mount`, `cryptsetup open` or `dmsetup remove` when `close` returns.
            let deadline = Instant::now() + Duration::from_secs(10);
            while records::pid_alive(st.pid as u32) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(_) => {
            // The daemon is gone (crashed) and the device waits for recovery with every page
            // it holds. Deleting it under a swap area or a mount would throw those away (the
            // processes owning swapped pages die): only an unused orphan is deleted, held
            // exclusively from the check to the stop.
            let hold = hold_unless_in_use(&rec).map_err(|_| {
                anyhow::anyhow!(
                    "{} ({}) is in use (swapped on, mounted or held) and its daemon is gone: \
                     `ublk-crypt recover {}` re-attaches it (its IO waits until then); close it \
                     after swapoff or umount",
                    rec.name,
                    rec.bdev_path(),
                    rec.name
                )
            })?;
            ublk::delete_orphan(rec.id, hold)?;
        }
        // Forget the key only when the device is known to be gone: a failed query of a device
        // that still exists (a transient error) must leave everything for a later recovery.
        Err(e) if ublk::device_exists(rec.id) => {
            bail!(
                "cannot query ublk device {} ({e:#}); nothing was changed, its key and record are kept",
                rec.id
            )
        }
        Err(_) => {} // the device is already gone: just forget the record and key
    }
    keyring::forget_key(rec.id);
    records::remove(rec.id);
    Ok(ExitCode::SUCCESS)
}

/// `ublk-crypt list`.
pub fn list(json: bool) -> Result<ExitCode> {
    let mut rows = Vec::new();
    for rec in records::all() {
        let state = match ublk::device_state(rec.id) {
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

/// `ublk-crypt upgrade NAME|ID`: the device's daemon starts a standby from this binary and
/// hands over to it; this waits until the new daemon serves the device and prints how long the
/// device had no server.
pub fn upgrade(device: &str) -> Result<ExitCode> {
    let rec = records::resolve(device)?;
    let exe = std::env::current_exe().context("cannot find this binary's path")?;
    let reply = request_with(&rec, &format!("upgrade {}", exe.display()), UPGRADE_WAIT)?;
    if let Some(e) = reply_error(&reply) {
        bail!("upgrade of {} refused: {e}", rec.name);
    }
    let v: serde_json::Value = serde_json::from_str(reply.trim())
        .with_context(|| format!("malformed reply from the daemon: {}", reply.trim()))?;
    let new_pid = v["handing_over_to"]
        .as_u64()
        .with_context(|| format!("malformed reply from the daemon: {}", reply.trim()))?;
    let deadline = Instant::now() + UPGRADE_WAIT;
    loop {
        let served = records::load(rec.id)
            .ok()
            .filter(|r| u64::from(r.pid) == new_pid)
            .and_then(|r| request(&r, "status").ok())
            .and_then(|l| serde_json::from_str::<Status>(&l).ok());
        if let Some(t) = served.and_then(|s| s.last_takeover) {
            println!(
                "{} ({}) upgraded: pid {} -> {new_pid}, {}; longest IO pause {:.1} ms",
                rec.name,
                rec.bdev_path(),
                rec.pid,
                exe.display(),
                t.gap_ms
            );
            return Ok(ExitCode::SUCCESS);
        }
        if Instant::now() > deadline {
            bail!(
                "{} was handed over to pid {new_pid}, which does not serve it after {UPGRADE_WAIT:?}",
                rec.name
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How long `upgrade` waits for the new standby, then for the new daemon.
const UPGRADE_WAIT: Duration = Duration::from_secs(90);

/// `ublk-crypt status NAME|ID`.
pub fn status(device: &str, json: bool) -> Result<ExitCode> {
    let rec = records::resolve(device)?;
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
    if let Some(f) = &s.ublk_features {
        println!("  ublk:        uses {}", f.in_use.join(" "));
        println!("               kernel offers {}", f.offered.join(" "));
    }
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
    match (&s.standby, d.standby) {
        (Some(sb), _) => println!(
            "  standby:     pid {}, {}, locked {} KiB (of which {} KiB is the shared pool); \
             both processes lock {} KiB",
            sb.pid,
            if sb.ready { "ready" } else { "starting" },
            sb.vm_lck_kib,
            sb.shared_pool_kib,
            s.locked_share_kib + sb.locked_share_kib
        ),
        (None, true) => println!("  standby:     none running (being restarted)"),
        (None, false) => println!("  standby:     off (--no-standby)"),
    }
    if let Some(t) = &s.last_takeover {
        println!(
            "  takeover:    from pid {} ({}), {:.1} ms without a server{}",
            t.previous_pid,
            t.kind,
            t.gap_ms,
            if t.realtime {
                ", at real-time priority"
            } else {
                ""
            }
        );
    }
    for q in &s.queues {
        println!(
            "  queue {}:     reads {} ({} B), writes {} ({} B), flushes {}, discards {}, errors {}, split {}, swap {}, pool waits {}",
            q.queue, q.io.reads, q.io.bytes_read, q.io.writes, q.io.bytes_written, q.io.flushes,
            q.io.discards, q.io.errors, q.io.split_ios, q.io.swap_ios, q.pool_waits
        );
        let per = |ns: u64, n: u64| {
            if n == 0 {
                0.0
            } else {
                ns as f64 / n as f64 / 1000.0
            }
        };
        let all = q.io.reads + q.io.writes + q.io.flushes + q.io.discards + q.io.errors;
        println!(
            "  queue {}:     in the daemon: {:.0} us per read, {:.0} us per write; depth seen {:.1}; {} pieces split across two CPUs",
            q.queue,
            per(q.io.read_service_ns, q.io.reads),
            per(q.io.write_service_ns, q.io.writes),
            if all == 0 { 0.0 } else { q.io.depth_sum as f64 / all as f64 },
            q.io.split_pieces
        );
        println!(
            "  queue {}:     polled {:.1} s instead of sleeping, {} of {} polls ended by a completion",
            q.queue,
            q.io.poll_ns as f64 / 1e9,
            q.io.poll_hits,
            q.io.polls
        );
        if q.io.batch_commits > 0 {
            let per = |n: u64| {
                if n == 0 {
                    0.0
                } else {
                    all as f64 / n as f64
                }
            };
            println!(
                "  queue {}:     batched IO: {} fetch completions, {} commits ({:.1} / {:.1} requests each)",
                q.queue,
                q.io.batch_fetches,
                q.io.batch_commits,
                per(q.io.batch_fetches),
                per(q.io.batch_commits)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
