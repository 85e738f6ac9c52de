//! A pool that cannot be locked is a construction error, not a silent downgrade.
//!
//! The test re-runs itself in a child process (capabilities and rlimits are process state),
//! where it drops CAP_IPC_LOCK and lowers RLIMIT_MEMLOCK below the budget — what an unprivileged
//! daemon without `LimitMEMLOCK=` experiences — and then builds a pool.

use std::process::Command;

use ublk_crypt_pool::{PoolConfig, PoolError, ReservePool};

const CHILD_ENV: &str = "UBLK_CRYPT_POOL_MLOCK_CHILD";
const TEST_NAME: &str = "mlock_failure_is_a_clear_error";
const CAP_IPC_LOCK: u32 = 14;
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Removes CAP_IPC_LOCK from this thread's effective and permitted sets.
fn drop_cap_ipc_lock() {
    let mut hdr = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: header and a two-element data array, as capget(2) requires for version 3.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut hdr, data.as_mut_ptr()) };
    assert_eq!(rc, 0, "capget: {}", std::io::Error::last_os_error());
    let mask = !(1u32 << CAP_IPC_LOCK);
    data[0].effective &= mask;
    data[0].permitted &= mask;
    data[0].inheritable &= mask;
    // SAFETY: as above; dropping capabilities is always permitted.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) };
    assert_eq!(rc, 0, "capset: {}", std::io::Error::last_os_error());
}

fn lower_memlock_limit(bytes: u64) {
    let lim = libc::rlimit {
        rlim_cur: bytes,
        rlim_max: bytes,
    };
    // SAFETY: plain syscall on a valid struct; lowering a limit is always permitted.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) };
    assert_eq!(rc, 0, "setrlimit: {}", std::io::Error::last_os_error());
}

fn child() {
    drop_cap_ipc_lock();
    lower_memlock_limit(64 << 10);
    let budget = 2 << 20;
    let cfg = PoolConfig {
        budget_bytes: budget,
        ..PoolConfig::with_queues(2)
    };
    let err = ReservePool::new(cfg).expect_err("mlock beyond RLIMIT_MEMLOCK without CAP_IPC_LOCK");
    match err {
        PoolError::Mlock { bytes, errno } => {
            assert_eq!(bytes, budget);
            assert!(errno == libc::ENOMEM || errno == libc::EPERM, "{err}");
        }
        other => panic!("expected PoolError::Mlock, got {other:?}: {other}"),
    }
    // The torture switch still works without the privilege.
    let unlocked = ReservePool::new(PoolConfig { lock: false, ..cfg }).expect("unlocked pool");
    assert!(!unlocked.is_locked());
    println!("CHILD-OK: {err}");
}

#[test]
fn mlock_failure_is_a_clear_error() {
    if std::env::var_os(CHILD_ENV).is_some() {
        child();
        return;
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args([TEST_NAME, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "child failed: {}\n{stdout}\n{stderr}",
        out.status
    );
    let line = stdout
        .lines()
        .find_map(|l| Some(l.split_once("CHILD-OK: ")?.1))
        .unwrap_or_else(|| panic!("child did not run the check:\n{stdout}\n{stderr}"));
    assert!(line.contains("2097152-byte"), "{line}");
    assert!(line.contains("LimitMEMLOCK"), "{line}");
    assert!(line.contains("CAP_IPC_LOCK"), "{line}");
}
