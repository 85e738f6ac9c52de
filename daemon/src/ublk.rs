//! The kernel's side of a device, through libublk: is the driver there, what state is device N
//! in, attaching to a device (new, or one waiting for recovery), its parameters, and libublk's
//! errors as one readable line.

use std::os::fd::AsRawFd;
use std::path::Path;

use anyhow::{bail, Result};
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::UblkDev;
use libublk::{sys, UblkError, UblkFlags};

use crate::context::DeviceContext;
use crate::records;

const UBLK_CONTROL: &str = "/dev/ublk-control";

/// Every device: the daemon copies request data itself (`pread`/`pwrite` on `/dev/ublkcN`),
/// and a dead daemon leaves the device waiting, its IO held and requeued, for a new one.
const CTRL_FLAGS: u32 =
    sys::UBLK_F_USER_COPY | sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE;

/// Most io_uring operations one tag has in flight at once: its ublk command, or while it serves
/// a request, a backing read (or write) plus the wait for a crypto worker (`IoPath::read`
/// overlaps the two). Sizes the ring's submission queue and the ring warm-up (`queue.rs`).
pub const OPS_PER_TAG: u16 = 2;

/// Completion-queue entries per tag: twice [`OPS_PER_TAG`], so the CQ can never overflow.
/// Why it matters: on overflow the kernel keeps the completion in a `GFP_ATOMIC` allocation, and
/// when that fails — exactly when swap-out has used up memory — it *drops* the completion, and
/// the tag waiting for it (with the swap bio it serves) would wait for ever.
pub const CQ_ENTRIES_PER_TAG: u16 = 2 * OPS_PER_TAG;

pub fn check_driver() -> Result<()> {
    if !Path::new(UBLK_CONTROL).exists() {
        bail!("the ublk driver is not loaded: {UBLK_CONTROL} is missing (modprobe ublk_drv)");
    }
    Ok(())
}

/// `UBLK_F_BATCH_IO` (7.0): the queues fetch and commit requests in batches (`ublk_batch.rs`).
pub const BATCH_IO: u64 = sys::UBLK_F_BATCH_IO as u64;

/// `UBLK_F_PER_IO_DAEMON` (6.16): any thread may serve any tag, so a queue can have several.
pub const PER_IO_DAEMON: u64 = sys::UBLK_F_PER_IO_DAEMON as u64;

/// What the kernel must offer for `--batch-io` and `--threads-per-queue` above 1, checked
/// before anything exists: a 6.12 driver would drop the unknown batch flag and then reject the
/// batch commands, and libublk checks per-IO daemons only once the device is made.
pub fn check_kernel_offers(batch_io: bool, threads_per_queue: u16) -> Result<()> {
    if !batch_io && threads_per_queue <= 1 {
        return Ok(());
    }
    let offered = UblkCtrl::get_features().unwrap_or(0);
    if batch_io && offered & BATCH_IO == 0 {
        bail!(
            "--batch-io: this kernel's ublk driver has no batched IO commands \
             (UBLK_F_BATCH_IO, Linux 7.0 or newer)"
        );
    }
    if threads_per_queue > 1 && offered & PER_IO_DAEMON == 0 {
        bail!(
            "--threads-per-queue {threads_per_queue}: this kernel's ublk driver serves each \
             queue from one thread only (UBLK_F_PER_IO_DAEMON, Linux 6.16 or newer)"
        );
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

impl DeviceState {
    /// Its daemon died and the kernel holds its IO for a new one.
    pub fn waits_for_recovery(&self) -> bool {
        self.quiesced && !self.daemon_alive
    }
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
        daemon_alive: pid > 0 && records::pid_alive(pid as u32),
        pid,
        state_name,
    })
}

/// Deletes device `id`, whose daemon is gone (`close` of a crashed device).
pub fn delete_orphan(id: u32, hold: Option<std::fs::File>) -> Result<()> {
    let ctrl = UblkCtrl::new_simple(id as i32)
        .map_err(|e| anyhow::anyhow!("cannot open ublk device {id}: {e}"))?;
    // Stopped while `hold` keeps others from claiming it; deleting waits for every opener.
    let _ = ctrl.kill_dev();
    drop(hold);
    ctrl.del_dev()
        .map_err(|e| anyhow::anyhow!("cannot delete ublk device {id}: {e}"))?;
    Ok(())
}

/// The shape of the device a daemon attaches to.
pub struct Shape {
    pub queues: u16,
    pub depth: u16,
    pub max_io_kib: u32,
    /// Batched IO commands (`UBLK_F_BATCH_IO`, `ublk_batch.rs`).
    pub batch_io: bool,
    /// Threads per queue (above 1: the kernel's per-IO daemons).
    pub threads_per_queue: u16,
}

/// Adds a new device (`id`: the one asked for, or `None` for the kernel's pick).
pub fn create(id: Option<u32>, shape: &Shape) -> Result<UblkCtrl> {
    ctrl(
        id.map_or(-1, |i| i as i32),
        shape.queues,
        shape,
        UblkFlags::UBLK_DEV_F_ADD_DEV,
    )
    .map_err(|e| ublk_error("cannot create the ublk device", id, e))
}

/// A handle on device `id`, whose daemon died, to recover it with, with the queues the device
/// has. Nothing changes in the kernel yet: [`start_recovery`] comes once everything else that
/// can fail has been done, so that a recovery that fails leaves the device as it found it.
pub fn recover(id: u32, shape: &Shape) -> Result<UblkCtrl> {
    let old = UblkCtrl::new_simple(id as i32)
        .map_err(|e| ublk_error("cannot open the ublk device", Some(id), e))?;
    let queues = old.dev_info().nr_hw_queues;
    drop(old);
    ctrl(id as i32, queues, shape, UblkFlags::UBLK_DEV_F_RECOVER_DEV)
        .map_err(|e| ublk_error("cannot re-attach to the ublk device", Some(id), e))
}

/// START_USER_RECOVERY: from here the kernel waits for this process's queues (and ends the
/// recovery when all have fetched their tags).
///
/// A recovery started by a process that died or failed before it opened the device's char
/// device is taken up where it stopped: the kernel (6.12) refuses a second START with EINVAL
/// while no queue is ready, and it needs none: the queues' fetches and END_USER_RECOVERY work
/// as after a START of our own. (On a device that supports recovery, as every ublk-crypt device
/// does, EINVAL has no other cause.) A recoverer that died after mapping a queue and before
/// every queue fetched leaves the kernel holding its mm for the device; 6.12 cannot recover
/// that (see tests/README.md, "Crash and recovery").
pub fn start_recovery(ctrl: &UblkCtrl, id: u32) -> Result<()> {
    let r = match ctrl.start_user_recover() {
        Ok(r) => r,
        Err(UblkError::UringIOError(r)) => r,
        Err(e) => return Err(ublk_error("cannot start recovery", Some(id), e)),
    };
    match r {
        r if r >= 0 => Ok(()),
        r if r == -libc::EINVAL => {
            tracing::warn!(
                "device {id}: a recovery was started before and not finished: taking it up"
            );
            Ok(())
        }
        r => bail!("cannot start recovery of device {id}: {}", errno_str(r)),
    }
}

/// A handle on device `id`, served by another daemon, made now for a standby to recover it
/// with later ([`crate::standby::begin_recovery`]): building it reads the device's info and
/// libublk's JSON and makes this thread's control ring, none of which must happen during the
/// takeover.
pub fn attach_for_recovery(id: u32, shape: &Shape) -> Result<UblkCtrl> {
    ctrl(
        id as i32,
        shape.queues,
        shape,
        UblkFlags::UBLK_DEV_F_RECOVER_DEV,
    )
    .map_err(|e| ublk_error("cannot open the ublk device", Some(id), e))
}

fn ctrl(id: i32, queues: u16, shape: &Shape, how: UblkFlags) -> Result<UblkCtrl, UblkError> {
    UblkCtrlBuilder::default()
        .name("ublk-crypt")
        .id(id)
        .nr_queues(queues)
        .depth(shape.depth)
        .io_buf_bytes(shape.max_io_kib << 10)
        .ctrl_flags(u64::from(CTRL_FLAGS) | if shape.batch_io { BATCH_IO } else { 0 })
        .dev_flags(how)
        .io_threads_per_queue(shape.threads_per_queue)
        .build()
}

/// What the kernel offers and what this device was made with ([`UblkFeatures`]).
pub fn features(c: &UblkCtrl) -> crate::ublk_features::UblkFeatures {
    crate::ublk_features::UblkFeatures::new(
        c.get_driver_features().unwrap_or(0),
        c.dev_info().flags,
    )
}

fn errno_str(r: i32) -> String {
    std::io::Error::from_raw_os_error(-r).to_string()
}

/// libublk's error as one line: what failed, on which device, and the errno's words.
pub fn ublk_error(what: &str, id: Option<u32>, e: UblkError) -> anyhow::Error {
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
/// sector, or the backing's logical block where that is larger (`Geometry::block_size`), a volatile cache (so FLUSH reaches us and we fdatasync the backing), discard only
/// when allowed. Also registers the backing as the queue rings' fixed file 1 and sizes the
/// rings ([`OPS_PER_TAG`], `CQ_ENTRIES_PER_TAG`).
pub fn set_params(dev: &mut UblkDev, ctx: &DeviceContext) -> Result<(), UblkError> {
    let rec = &ctx.record;
    let shift = ctx.geometry.block_size.trailing_zeros() as u8;
    let tgt = &mut dev.tgt;
    tgt.fds[tgt.nr_fds as usize] = ctx.backing.file().as_raw_fd();
    tgt.nr_fds += 1;
    tgt.sq_depth = rec.depth.saturating_mul(OPS_PER_TAG);
    tgt.cq_depth = rec.depth.saturating_mul(CQ_ENTRIES_PER_TAG);
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
            discard_granularity: ctx.geometry.block_size,
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
