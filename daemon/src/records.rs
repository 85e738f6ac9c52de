//! The run-dir records under `/run/ublk-crypt`: one JSON file per device (never any key material),
//! written atomically by the serving daemon. They are how `list`, `close`, `status` and
//! `recover` find a device by name, and how a restarted daemon rebuilds the same device.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

pub const RUN_DIR: &str = "/run/ublk-crypt";

fn yes() -> bool {
    true
}

fn one() -> u16 {
    1
}

fn run_dir() -> PathBuf {
    // Tests point this elsewhere; production always uses RUN_DIR.
    std::env::var_os("UBLK_CRYPT_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(RUN_DIR))
}

/// What a device is, enough to serve it again after a crash (with the key from the keyring).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeviceRecord {
    pub id: u32,
    pub name: String,
    pub backing: PathBuf,
    pub cipher: String,
    pub key_bits: usize,
    pub sector_size: u32,
    pub iv_large_sectors: bool,
    /// `--offset`, 512-byte sectors.
    pub offset: u64,
    /// `--skip`, 512-byte sectors.
    pub skip: u64,
    /// Device size in bytes.
    pub size: u64,
    pub readonly: bool,
    pub allow_discards: bool,
    pub queues: u16,
    pub depth: u16,
    pub pool_mib: usize,
    pub max_io_kib: u32,
    /// Crypto worker threads (0: encrypt on the queue threads only).
    #[serde(default)]
    pub crypto_threads: usize,
    /// `--pin-queues`: queue threads stay on their queue's CPUs (libublk's affinity).
    #[serde(default)]
    pub pin_queues: bool,
    /// `--poll-usec`: the longest wait a queue thread polls its ring through before sleeping
    /// (`poll_window.rs`); 0 (and a record from before it existed): never polls.
    #[serde(default)]
    pub poll_usec: u32,
    /// `--batch-io`: batched ublk IO commands (`ublk_batch.rs`); false in a record from before.
    #[serde(default)]
    pub batch_io: bool,
    /// `--threads-per-queue`; 1 in a record from before it existed.
    #[serde(default = "one")]
    pub threads_per_queue: u16,
    /// Whether the daemon keeps a standby (`--no-standby`: not).
    #[serde(default = "yes")]
    pub standby: bool,
    /// Whether the OOM protections are on (off only in tests).
    pub protections: bool,
    /// Whether the key is a fresh random one (`--key-file /dev/urandom`), which nobody can use
    /// after the device is closed: the only kind `ublk-crypt mkswap` formats.
    /// (Named without "key": a record never names key material, and a test checks it.)
    #[serde(default)]
    pub ephemeral: bool,
    /// Pid of the serving daemon.
    pub pid: u32,
}

impl DeviceRecord {
    pub fn bdev_path(&self) -> String {
        format!("/dev/ublkb{}", self.id)
    }

    pub fn socket_path(&self) -> PathBuf {
        socket_path(self.id)
    }
}

pub fn record_path(id: u32) -> PathBuf {
    run_dir().join(format!("{id}.json"))
}

pub fn socket_path(id: u32) -> PathBuf {
    run_dir().join(format!("{id}.sock"))
}

pub fn log_path(pid: u32) -> PathBuf {
    run_dir().join(format!("daemon-{pid}.log"))
}

pub fn ensure_run_dir() -> Result<PathBuf> {
    let dir = run_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot restrict {}", dir.display()))?;
    Ok(dir)
}

pub fn save(rec: &DeviceRecord) -> Result<()> {
    ensure_run_dir()?;
    let path = record_path(rec.id);
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(rec)?)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

pub fn load(id: u32) -> Result<DeviceRecord> {
    let path = record_path(id);
    let data = std::fs::read(&path)
        .with_context(|| format!("no ublk-crypt record for device {id} ({})", path.display()))?;
    serde_json::from_slice(&data).with_context(|| format!("corrupt record {}", path.display()))
}

/// Keeps a run file's pages in memory for the rest of this process: maps it and locks the
/// mapping (the mapping is never undone).
///
/// Why: `/run` is a tmpfs, and these files are written once at start and then never touched,
/// so under sustained memory pressure their pages go to swap — on a swap device served by this
/// daemon, to the very device they describe. After a crash, `ublk-crypt recover` (and libublk,
/// re-attaching) must read them while that device has no server: the read waits for ever
/// (seen in the OOM torture, 3 runs out of 3). Locked, they stay in RAM while the daemon lives;
/// after its death they become evictable again, but recovery reads them within moments.
pub fn keep_in_memory(path: &Path) -> Result<()> {
    use nix::sys::mman::{mlock, mmap, MapFlags, ProtFlags};
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let len = file.metadata()?.len() as usize;
    let Some(len) = std::num::NonZeroUsize::new(len) else {
        return Ok(());
    };
    // SAFETY: a fresh read-only shared mapping of a file we opened; nothing in this process
    // ever reads or writes through it (it exists only to hold the pages), so no aliasing or
    // truncation hazard can reach Rust code.
    let addr = unsafe {
        mmap(
            None,
            len,
            ProtFlags::PROT_READ,
            MapFlags::MAP_SHARED,
            &file,
            0,
        )
    }
    .with_context(|| format!("cannot map {}", path.display()))?;
    // SAFETY: `addr..addr+len` is the mapping just made, never unmapped.
    unsafe { mlock(addr, len.get()) }.with_context(|| format!("cannot lock {}", path.display()))?;
    Ok(())
}

pub fn remove(id: u32) {
    let _ = std::fs::remove_file(record_path(id));
    let _ = std::fs::remove_file(socket_path(id));
}

pub fn all() -> Vec<DeviceRecord> {
    let mut out = Vec::new();
    if let Ok(dir) = std::fs::read_dir(run_dir()) {
        for e in dir.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "json") {
                if let Ok(data) = std::fs::read(&p) {
                    if let Ok(rec) = serde_json::from_slice::<DeviceRecord>(&data) {
                        out.push(rec);
                    }
                }
            }
        }
    }
    out.sort_by_key(|r| r.id);
    out
}

/// Resolves what the user typed — a name, an id, or `/dev/ublkbN` — to a record.
pub fn resolve(device: &str) -> Result<DeviceRecord> {
    let id = device
        .strip_prefix("/dev/ublkb")
        .unwrap_or(device)
        .parse::<u32>()
        .ok();
    for rec in all() {
        if rec.name == device || Some(rec.id) == id {
            return Ok(rec);
        }
    }
    bail!("no ublk-crypt device named '{device}' (see `ublk-crypt list`)")
}

/// Whether a process with this pid exists.
pub fn pid_alive(pid: u32) -> bool {
    pid != 0 && Path::new(&format!("/proc/{pid}")).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_resolve_remove() {
        let dir = std::env::temp_dir().join(format!("ublk-crypt-run-{}", std::process::id()));
        std::env::set_var("UBLK_CRYPT_RUN_DIR", &dir);
        let rec = DeviceRecord {
            id: 7,
            name: "swap0".into(),
            backing: "/dev/vdb".into(),
            cipher: "aes-xts-plain64".into(),
            key_bits: 512,
            sector_size: 4096,
            iv_large_sectors: false,
            offset: 0,
            skip: 0,
            size: 1 << 30,
            readonly: false,
            allow_discards: false,
            queues: 1,
            depth: 64,
            pool_mib: 16,
            max_io_kib: 512,
            crypto_threads: 2,
            pin_queues: false,
            poll_usec: 200,
            batch_io: false,
            threads_per_queue: 1,
            standby: true,
            protections: true,
            ephemeral: true,
            pid: 1,
        };
        save(&rec).unwrap();
        assert_eq!(resolve("swap0").unwrap(), rec);
        assert_eq!(resolve("7").unwrap(), rec);
        assert_eq!(resolve("/dev/ublkb7").unwrap(), rec);
        let e = resolve("nope").unwrap_err().to_string();
        assert!(e.contains("no ublk-crypt device named 'nope'"), "{e}");
        let text = std::fs::read_to_string(record_path(7)).unwrap();
        assert!(
            !text.to_lowercase().contains("key\""),
            "records hold no key: {text}"
        );
        remove(7);
        assert!(resolve("swap0").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
