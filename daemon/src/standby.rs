//! The standby: a second `ublk-crypt` process per device that takes the device over the moment
//! its daemon dies, or hands over to it (`upgrade`).
//!
//! Why: a daemon that dies while memory is exhausted leaves its swap device without a server,
//! and a new daemon needs ~23 MiB (pool, stacks, binary) at the one moment there is none; its
//! allocations wait on reclaim, reclaim waits on the dead device, and the machine freezes
//! (tests/README.md, "Crash and recovery"). So the standby does beforehand everything that
//! allocates or may block (`device.rs` runs the same start-up as a daemon's, up to the device):
//! it locks itself in memory, reads the kept key, opens the backing, maps the daemon's buffer
//! pool (one memfd, its pages counted once), makes its crypto workers and its queue threads
//! with their rings, and builds its libublk control handle. Then it waits here. When the daemon
//! is gone, what is left is the kernel's user recovery: a few control commands, opening the
//! queues, fetching.
//!
//! How it learns of the daemon's end: its standard input is a pipe whose other end only the
//! daemon holds, so a read returns end-of-file when the daemon's files are released — by any
//! death, `kill -9` included. A daemon that hands over writes `upgrade` first.

use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use libublk::ctrl::UblkCtrl;
use libublk::sys;

use crate::control_request;
use crate::hardening::SchedPolicy;
use crate::records::DeviceRecord;

/// What the daemon writes into the pipe before it exits to hand over.
pub const HANDOVER: &[u8] = b"upgrade\n";

/// The longest a standby waits for the kernel to see the daemon gone (the device quiesced).
const QUIESCE_WAIT: Duration = Duration::from_secs(30);

/// A standby process, from its command line: the pipe from its daemon (standard input) and
/// the daemon's pool memfd.
pub struct Standby {
    primary: OwnedFd,
    pool_fd: i32,
}

/// The daemon is gone: when it was seen gone, and whether it handed over.
pub struct PrimaryGone {
    pub at: Instant,
    pub upgrade: bool,
}

impl Standby {
    /// `pool_fd`: the daemon's pool memfd, inherited under this number.
    pub fn new(pool_fd: i32) -> Result<Standby> {
        let primary = std::io::stdin()
            .as_fd()
            .try_clone_to_owned()
            .context("standby: no pipe from the daemon on standard input")?;
        Ok(Standby { primary, pool_fd })
    }

    /// The pool memfd, opened anew (`/proc/self/fd`, so no raw descriptor is adopted). The
    /// inherited one stays open under its number, which this process, once the daemon, passes
    /// on to its own standby.
    pub fn pool_memfd(&self) -> Result<OwnedFd> {
        let path = format!("/proc/self/fd/{}", self.pool_fd);
        let file = std::fs::File::options()
            .read(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("standby: cannot open the daemon's pool ({path})"))?;
        Ok(file.into())
    }

    pub fn pool_fd(&self) -> i32 {
        self.pool_fd
    }

    /// Tells the daemon (over its control socket) that this standby is ready to take over.
    pub fn announce_ready(&self, rec: &DeviceRecord) -> Result<()> {
        let reply = control_request::request(
            rec,
            &format!(
                "standby-ready {} {}",
                std::process::id(),
                crate::hardening::locked_share_of("self")
            ),
        )?;
        if let Some(e) = control_request::reply_error(&reply) {
            bail!("the daemon refused this standby: {e}");
        }
        Ok(())
    }

    /// Blocks until the daemon is gone.
    pub fn wait_for_primary(&self) -> PrimaryGone {
        let mut buf = [0u8; 16];
        let mut said = Vec::with_capacity(HANDOVER.len());
        loop {
            match nix::unistd::read(self.primary.as_fd(), &mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let room = HANDOVER.len().saturating_sub(said.len());
                    said.extend_from_slice(&buf[..n.min(room)]);
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => break,
            }
        }
        PrimaryGone {
            at: Instant::now(),
            upgrade: said == HANDOVER,
        }
    }
}

/// The threads that take the device over (the main thread and the queue threads), raised to
/// the takeover's real-time priority while it lasts (`SchedPolicy::TAKEOVER`), then given back
/// the policy each had before.
pub struct TakeoverPriority {
    /// Each thread and its policy before the takeover.
    threads: Vec<(i32, SchedPolicy)>,
    raised: bool,
}

impl TakeoverPriority {
    /// Made before the wait (the only allocation), with a check that raising is allowed:
    /// `Err` says why not (no `CAP_SYS_NICE`, `RestrictRealtime=`), and the takeover goes on
    /// at normal priority.
    pub fn check(queue_tids: impl Iterator<Item = i32>) -> (TakeoverPriority, std::io::Result<()>) {
        let main = nix::unistd::gettid().as_raw();
        let threads: Vec<(i32, SchedPolicy)> = std::iter::once(main)
            .chain(queue_tids)
            .map(|t| (t, SchedPolicy::of(t).unwrap_or(SchedPolicy::NORMAL)))
            .collect();
        let allowed = SchedPolicy::TAKEOVER
            .set(main)
            .and_then(|()| threads[0].1.set(main));
        (
            TakeoverPriority {
                threads,
                raised: false,
            },
            allowed,
        )
    }

    /// The daemon is gone: every takeover thread to real-time priority.
    pub fn raise(&mut self) {
        self.raised = self
            .threads
            .iter()
            .all(|&(t, _)| SchedPolicy::TAKEOVER.set(t).is_ok());
    }

    /// Whether the takeover runs at real-time priority.
    pub fn raised(&self) -> bool {
        self.raised
    }

    /// The device is served (or not to be taken over): each thread's policy back.
    pub fn lower(&self) {
        for &(t, before) in &self.threads {
            let _ = before.set(t);
        }
    }
}

/// The daemon is gone: waits until the kernel holds the device's IO for a new server (state
/// quiesced), then starts the user recovery on `ctrl` (made with `UBLK_DEV_F_RECOVER_DEV`
/// before the wait). `Ok(false)`: the device was stopped or deleted instead (a clean close),
/// nothing to take over.
pub fn begin_recovery(ctrl: &UblkCtrl, id: u32) -> Result<bool> {
    let deadline = Instant::now() + QUIESCE_WAIT;
    loop {
        if ctrl.read_dev_info().is_err() {
            return Ok(false); // deleted
        }
        match u32::from(ctrl.dev_info().state) {
            sys::UBLK_S_DEV_QUIESCED => break,
            sys::UBLK_S_DEV_DEAD => return Ok(false),
            _ if Instant::now() > deadline => {
                bail!("device {id} was not quiesced within {QUIESCE_WAIT:?} of its daemon's end")
            }
            // The daemon's rings and files are being torn down: a millisecond at a time, so
            // the device is served again as soon as the kernel allows.
            _ => std::thread::sleep(Duration::from_millis(1)),
        }
    }
    crate::ublk::start_recovery(ctrl, id)?;
    Ok(true)
}

/// The daemon side of a handover: tells the standby it is an upgrade, then exits without
/// touching the device (the kernel quiesces it, the standby recovers it; IO in flight is
/// reissued to the standby, `UBLK_F_USER_RECOVERY_REISSUE`).
pub fn hand_over(mut pipe: std::process::ChildStdin) -> ! {
    let _ = pipe.write_all(HANDOVER);
    tracing::info!("handing the device over to the new standby; exiting");
    std::process::exit(0)
}
