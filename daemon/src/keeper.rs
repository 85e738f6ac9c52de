//! The serving daemon's side of its standby (`standby.rs`): the keeper thread that starts one,
//! waits for it, and starts another when it ends; and `upgrade`, which starts a standby from a
//! new binary and hands the device over to it.
//!
//! A standby that cannot start (no memory for it just now, say) is logged and retried with a
//! growing pause; it never holds up the IO path, which does not know it exists.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::context::DeviceContext;
use crate::hardening;

/// Pause before restarting a standby that ended: doubles from the first to the last while
/// standbys keep ending quickly.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_LAST: Duration = Duration::from_secs(30);
/// A standby that lived this long was not failing: the next pause starts again from the first.
const LIVED_WELL: Duration = Duration::from_secs(60);
/// How long an upgrade waits for the new standby to be ready.
const UPGRADE_READY: Duration = Duration::from_secs(60);

/// Starts the keeper thread of a served device that has standbys.
pub fn spawn(ctx: &'static DeviceContext) -> Result<()> {
    if !ctx.standby.enabled {
        return Ok(());
    }
    std::thread::Builder::new()
        .name("ublk-crypt-sb".into())
        .stack_size(hardening::THREAD_STACK_BYTES)
        .spawn(move || {
            // Inherited by the standby across fork and exec: its reclaim never writes to swap
            // (this device's, maybe) while it sets itself up.
            let _ = hardening::protect_io_thread(ctx.protections);
            keep(ctx)
        })
        .context("cannot spawn the standby keeper thread")?;
    Ok(())
}

fn keep(ctx: &'static DeviceContext) {
    let mut pause = RETRY_FIRST;
    loop {
        if ctx.standby.quiet.load(Ordering::Acquire) {
            std::thread::sleep(RETRY_FIRST);
            continue;
        }
        let started = Instant::now();
        match start(ctx, Path::new("/proc/self/exe")) {
            Ok(mut child) => {
                let pid = child.id();
                // Held until the standby ends: while it is open, the standby stands by.
                let pipe = child.stdin.take();
                ctx.standby.pid.store(pid, Ordering::Release);
                tracing::info!("standby started: pid {pid}");
                let status = child.wait();
                drop(pipe);
                let _ =
                    ctx.standby
                        .pid
                        .compare_exchange(pid, 0, Ordering::AcqRel, Ordering::Relaxed);
                if ctx.standby.quiet.load(Ordering::Acquire) {
                    continue;
                }
                let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
                tracing::warn!("standby {pid} ended ({status}); another in {pause:?}");
            }
            Err(e) => tracing::warn!("cannot start a standby: {e:#}; retrying in {pause:?}"),
        }
        pause = if started.elapsed() > LIVED_WELL {
            RETRY_FIRST
        } else {
            (pause * 2).min(RETRY_LAST)
        };
        std::thread::sleep(pause);
    }
}

/// A standby for `ctx`'s device, from the binary `exe`: the pool memfd under its inherited
/// number, standard input a pipe only this process holds, no standard output (it would be a
/// closed pipe once this process is gone), standard error shared (the journal).
fn start(ctx: &DeviceContext, exe: &Path) -> Result<Child> {
    Command::new(exe)
        .arg0("ublk-crypt")
        .arg("standby")
        .arg(ctx.record.id.to_string())
        .arg("--pool-fd")
        .arg(ctx.standby.pool_fd.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot run {}", exe.display()))
}

/// Stops keeping a standby and ends the current one: the device is stopping.
pub fn stop(ctx: &DeviceContext) {
    ctx.standby.quiet.store(true, Ordering::Release);
    let pids = [
        ctx.standby.pid.load(Ordering::Acquire),
        ctx.standby.upgrade_pid.swap(0, Ordering::AcqRel),
    ];
    pids.into_iter().for_each(kill);
    // Until they have let go of the backing: `close` returning means the backing is free for
    // `cryptsetup open` or `dmsetup remove` at once, not after a standby's exit a moment later.
    pids.into_iter().for_each(wait_exited);
}

fn kill(pid: u32) {
    if pid != 0 {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Waits (at most 5 s) until `pid` is gone or a zombie, whose files are closed.
fn wait_exited(pid: u32) {
    if pid == 0 {
        return;
    }
    for _ in 0..500 {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return,
            // The state follows the command name's closing parenthesis.
            Ok(stat)
                if stat
                    .rsplit(')')
                    .next()
                    .is_some_and(|r| r.trim_start().starts_with('Z')) =>
            {
                return
            }
            Ok(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
        }
    }
}

/// A new standby, ready, and the only one: what is left of an upgrade is handing over to it
/// (`standby::hand_over` with `pipe`).
pub struct Upgrade {
    pub pid: u32,
    pub pipe: ChildStdin,
}

/// `upgrade`: starts a standby from `exe` (the new binary), waits until it is ready, then ends
/// the current standby (which would otherwise race it to the device). On failure the new one
/// is ended and the keeper goes on as before.
pub fn upgrade(ctx: &DeviceContext, exe: &Path) -> Result<Upgrade> {
    if !ctx.standby.enabled {
        bail!("this device has no standby (--no-standby): stop and open it again to upgrade");
    }
    if !exe.is_absolute() || !exe.is_file() {
        bail!("{}: not an absolute path to a binary", exe.display());
    }
    if ctx.standby.upgrade_pid.load(Ordering::Acquire) != 0 {
        bail!("an upgrade is already under way");
    }
    let mut child = start(ctx, exe)?;
    let pid = child.id();
    ctx.standby.upgrade_pid.store(pid, Ordering::Release);
    let fail = |child: &mut Child, e: anyhow::Error| {
        let _ = child.kill();
        let _ = child.wait();
        ctx.standby.upgrade_pid.store(0, Ordering::Release);
        e
    };
    let deadline = Instant::now() + UPGRADE_READY;
    while ctx.standby.ready_pid.load(Ordering::Acquire) != pid {
        if let Ok(Some(status)) = child.try_wait() {
            ctx.standby.upgrade_pid.store(0, Ordering::Release);
            bail!("the new standby (pid {pid}) ended before it was ready: {status}");
        }
        if Instant::now() > deadline {
            return Err(fail(
                &mut child,
                anyhow::anyhow!("the new standby (pid {pid}) was not ready in {UPGRADE_READY:?}"),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // From here on only the new standby may take the device over.
    ctx.standby.quiet.store(true, Ordering::Release);
    let old = ctx.standby.pid.load(Ordering::Acquire);
    kill(old);
    let deadline = Instant::now() + Duration::from_secs(5);
    while old != 0 && ctx.standby.pid.load(Ordering::Acquire) == old {
        if Instant::now() > deadline {
            ctx.standby.quiet.store(false, Ordering::Release);
            return Err(fail(
                &mut child,
                anyhow::anyhow!("the old standby (pid {old}) did not end"),
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let pipe = child.stdin.take().expect("spawned with a piped stdin");
    ctx.standby.pid.store(pid, Ordering::Release);
    Ok(Upgrade { pid, pipe })
}
