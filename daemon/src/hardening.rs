//! What keeps the daemon serving swap when the machine has no memory left.
//!
//! The failure it prevents: reclaim writes a page to swap, the daemon needs memory to encrypt
//! it (a page fault on its own swapped-out code, a malloc that enters reclaim, a thread stack
//! growing), reclaim waits for the swap write, and the machine freezes. So, before serving:
//! - `mlockall(MCL_CURRENT | MCL_FUTURE)`: none of the daemon's pages can be swapped out;
//! - `PR_SET_IO_FLUSHER` on every IO thread: the kernel treats its allocations like a block
//!   driver's (no IO-recursing reclaim, no throttling of its dirty writes);
//! - `oom_score_adj = -1000`: the OOM killer never picks it;
//! - stacks pre-faulted to a fixed depth, and threads made with small stacks, so the locked
//!   footprint stays bounded (each thread's whole stack is locked under `MCL_FUTURE`);
//! - not dumpable: no core dump or ptrace by non-root ever shows the key or plaintext.
//!
//! A missing privilege is a start-up error, never a silent downgrade: a daemon that starts
//! without these would work until the first OOM, then freeze the machine.

use anyhow::{bail, Context, Result};
use nix::sys::mman::{mlockall, MlockAllFlags};

/// `PR_SET_IO_FLUSHER` (linux/prctl.h, Linux 5.6); not in the libc crate.
const PR_SET_IO_FLUSHER: libc::c_int = 57;

/// Stack size of every thread the daemon creates (queue, crypto, control, keeper threads, and
/// the control plane's blocking thread). Small because `MCL_FUTURE` locks whole stacks; the IO
/// path is shallow (no recursion, no large frames). Measured in the VM without `mlockall`
/// (pages a stack really touched, 6.12, after fio writes and reads, `status`, `upgrade`): queue
/// thread 16–20 KiB, crypto workers and control thread 12 KiB, keeper 8 KiB; 128 KiB is six
/// times the deepest. It was 256 KiB: five threads' extra 128 KiB were 640 KiB of locked memory.
pub const THREAD_STACK_BYTES: usize = 128 << 10;
/// How much of its stack each IO thread touches up front, so no page fault happens on the IO
/// path even if `MCL_FUTURE` were not populating.
const PREFAULT_STACK_BYTES: usize = 64 << 10;

/// Which protections are on. All of them in production; the torture test switches them off to
/// show which ones it exercises.
#[derive(Debug, Clone, Copy)]
pub struct Protections {
    pub enabled: bool,
}

/// Process-wide protections, applied before any IO thread exists.
pub fn protect_process(p: Protections) -> Result<()> {
    // Threads inherit nothing of these, but std reads RUST_MIN_STACK once, at the first spawn:
    // libublk's queue threads (std::thread::spawn) get small stacks too.
    // SAFETY: called from main before any thread is spawned, so no concurrent env access.
    std::env::set_var("RUST_MIN_STACK", THREAD_STACK_BYTES.to_string());
    // One malloc arena: per-thread arenas reserve 64 MiB each, and what they touch gets locked.
    // SAFETY: mallopt only changes glibc's allocator tuning; called before threads exist.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
    set_not_dumpable()?;
    if !p.enabled {
        tracing::warn!("OOM protections DISABLED (--test-disable-protections): test use only");
        return Ok(());
    }
    std::fs::write("/proc/self/oom_score_adj", "-1000").map_err(|e| {
        anyhow::anyhow!("cannot set oom_score_adj to -1000: {e} (needs CAP_SYS_RESOURCE)")
    })?;
    mlockall(MlockAllFlags::MCL_CURRENT | MlockAllFlags::MCL_FUTURE).map_err(|e| {
        anyhow::anyhow!(
            "mlockall failed: {e} (needs CAP_IPC_LOCK or a sufficient RLIMIT_MEMLOCK, e.g. LimitMEMLOCK=infinity)"
        )
    })?;
    set_io_flusher().context("on the main thread")?;
    Ok(())
}

/// Free heap a standby keeps for its takeover. Why: the takeover allocates (libublk's queue
/// structures, the control plane's), with one malloc arena that is the `brk` heap, and under
/// `MCL_FUTURE` a `brk` that grows the heap must populate the new pages at once — an allocation
/// made while the device it would reclaim to has no server, by an IO flusher (`GFP_NOIO`, so no
/// OOM kill either): on 7.2 the OOM torture's kill at 75 % of a fill left the standby's queue
/// thread in `brk` for ever. Grown and kept free beforehand, the heap serves the takeover.
pub const TAKEOVER_HEAP_BYTES: usize = 1 << 20;

/// Grows the heap by about `bytes` now (locked like everything under `MCL_FUTURE`) and keeps
/// it: glibc never trims the heap from here on, and allocations below `bytes` come from the
/// heap, not from an mmap that would need fresh pages. Returns the heap's size (`arena`).
pub fn reserve_heap(bytes: usize) -> usize {
    // SAFETY: mallopt only tunes glibc's allocator; malloc/free of a block that is written
    // and released here, never used after.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_MMAP_THRESHOLD, bytes as i32);
        let p = libc::malloc(bytes - 4096) as *mut u8;
        if !p.is_null() {
            std::ptr::write_volatile(p, 1);
            libc::free(std::hint::black_box(p) as *mut libc::c_void);
        }
    }
    heap_size()
}

/// The size of the malloc heap, bytes (`mallinfo2().arena`).
pub fn heap_size() -> usize {
    // SAFETY: mallinfo2 only reads the allocator's statistics.
    unsafe { libc::mallinfo2().arena }
}

/// A thread's scheduling policy and priority (`sched_getscheduler`, `sched_getparam`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedPolicy {
    policy: libc::c_int,
    priority: libc::c_int,
}

impl SchedPolicy {
    /// The default: `SCHED_OTHER`.
    pub const NORMAL: SchedPolicy = SchedPolicy {
        policy: libc::SCHED_OTHER,
        priority: 0,
    };

    /// The real-time priority of a standby's takeover (`SCHED_FIFO`, lowest priority), held
    /// from the moment its daemon is gone until the device is served again, a few tens of
    /// milliseconds. Why: the takeover still makes the kernel allocate (opening `/dev/ublkcN`,
    /// mapping its commands, the queue's first fetches), as an IO flusher, in a machine whose
    /// memory may be exhausted: the dead daemon's freed pages go to whoever asks first, and a
    /// swapping process asks all the time. No ordinary allocation may go below the zone's min
    /// watermark, so the takeover would wait for reclaim that waits for the takeover (CI saw
    /// it: free memory under min, the standby never live). A real-time task's allocations may
    /// use half of that min reserve (the kernel's `ALLOC_MIN_RESERVE` for RT tasks, Linux
    /// 6.3+), which ordinary tasks leave alone: the takeover finds memory where nothing else
    /// can. `SCHED_RESET_ON_FORK`: nothing this process starts inherits it.
    pub const TAKEOVER: SchedPolicy = SchedPolicy {
        policy: libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK,
        priority: 1,
    };

    /// Thread `tid`'s (0: the calling thread's).
    pub fn of(tid: i32) -> std::io::Result<SchedPolicy> {
        // SAFETY: sched_getscheduler only reads one thread's policy.
        let policy = unsafe { libc::sched_getscheduler(tid) };
        if policy < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut param = libc::sched_param { sched_priority: 0 };
        // SAFETY: sched_getparam writes one sched_param, which we own, for one thread.
        if unsafe { libc::sched_getparam(tid, &mut param) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(SchedPolicy {
            policy,
            priority: param.sched_priority,
        })
    }

    /// Gives thread `tid` (0: the calling thread) this policy.
    pub fn set(self, tid: i32) -> std::io::Result<()> {
        let param = libc::sched_param {
            sched_priority: self.priority,
        };
        // SAFETY: sched_setscheduler reads the sched_param we own and changes one thread's
        // scheduling policy; nothing else is touched.
        if unsafe { libc::sched_setscheduler(tid, self.policy, &param) } == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}

/// Per-thread protections for every thread that touches IO.
pub fn protect_io_thread(p: Protections) -> Result<()> {
    if !p.enabled {
        return Ok(());
    }
    set_io_flusher()?;
    prefault_stack();
    Ok(())
}

/// First thing a recovering process does (`recover`, `open --id` finding a device to
/// re-attach): its swap device has no server until it is done, so reclaim on its behalf must
/// never try to write to swap — it would wait on that device for ever (seen in the OOM
/// torture, inside `execve` of a recover whose parent was not an IO flusher). Best effort: the
/// full protections follow in `protect_process`, which reports a failure properly.
pub fn io_flusher_for_recovery() {
    let _ = set_io_flusher();
}

/// VmRSS and VmLck of process `pid` (`self` for this one), KiB.
pub fn memory_of(pid: &str) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    (field_kib(&text, "VmRSS:"), field_kib(&text, "VmLck:"))
}

/// Process `pid`'s share of locked memory, KiB: each locked page divided by the number of
/// processes mapping it (`Locked:` of smaps_rollup), so the daemon's and its standby's add up
/// to the physical memory both lock, the shared pool and binary counted once.
pub fn locked_share_of(pid: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    field_kib(&text, "Locked:")
}

fn field_kib(text: &str, name: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn set_io_flusher() -> Result<()> {
    // SAFETY: prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) only sets a flag on the calling thread.
    let r = unsafe { libc::prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) };
    if r != 0 {
        bail!(
            "prctl(PR_SET_IO_FLUSHER) failed: {} (needs CAP_SYS_RESOURCE)",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

fn set_not_dumpable() -> Result<()> {
    // SAFETY: prctl(PR_SET_DUMPABLE, 0) only changes this process's dumpable flag.
    let r = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    if r != 0 {
        bail!(
            "prctl(PR_SET_DUMPABLE, 0) failed: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

#[inline(never)]
fn prefault_stack() {
    let mut probe = [0u8; PREFAULT_STACK_BYTES];
    // Touch one byte per page, through black_box so the writes are not optimized away.
    for i in (0..PREFAULT_STACK_BYTES).step_by(4096) {
        probe[i] = 1;
    }
    std::hint::black_box(&mut probe);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `PR_GET_IO_FLUSHER` (linux/prctl.h, Linux 5.6); not in the libc crate.
    const PR_GET_IO_FLUSHER: libc::c_int = 58;

    /// What the takeover saves and gives back: a thread's policy read, set again unchanged,
    /// read back the same (no privilege needed to keep one's own policy).
    #[test]
    fn a_threads_policy_is_read_and_given_back() {
        let before = SchedPolicy::of(0).unwrap();
        std::thread::spawn(move || {
            before.set(0).unwrap();
            assert_eq!(SchedPolicy::of(0).unwrap(), before);
        })
        .join()
        .unwrap();
        assert_ne!(SchedPolicy::TAKEOVER, SchedPolicy::NORMAL);
    }

    /// The calling thread's io-flusher flag.
    fn is_io_flusher() -> bool {
        // SAFETY: prctl(PR_GET_IO_FLUSHER) reads a flag of the calling thread.
        unsafe { libc::prctl(PR_GET_IO_FLUSHER, 0, 0, 0, 0) == 1 }
    }

    #[test]
    fn io_thread_protection_sets_the_flag() {
        // Runs as root in CI; a process without CAP_SYS_RESOURCE must get a clear error.
        let r = std::thread::spawn(|| {
            let r = protect_io_thread(Protections { enabled: true });
            (r.map_err(|e| e.to_string()), is_io_flusher())
        })
        .join()
        .unwrap();
        match r {
            (Ok(()), flag) => assert!(flag),
            (Err(e), _) => assert!(e.contains("CAP_SYS_RESOURCE"), "{e}"),
        }
    }
}
