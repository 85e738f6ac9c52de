//! What a device is, validated: the one value the device layer takes.
//!
//! The command line (`cli.rs`) turns its parsed flags into a [`DeviceConfig`], and recovery
//! turns a run-dir record into one; below this point nothing knows about clap. Every check that
//! needs no device, no backing and no key lives in [`DeviceConfig::validate`], so bad input is
//! refused before anything exists (ripgrep's `LowArgs` → `HiArgs` model).

use std::path::PathBuf;

use anyhow::{bail, Result};
use ublk_crypt_crypto::{CipherSpec, SectorLayout};

use crate::key_source::KeySpec;
use crate::records::DeviceRecord;

/// Where the key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// Read now, with cryptsetup's plain-mode rules: a new device.
    Read(KeySpec),
    /// The copy kept in root's keyring (`keyring.rs`): the device exists and waits for a new
    /// daemon to re-attach.
    Kept,
}

/// The complete description of a device to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConfig {
    /// ublk device id: the one asked for (`None`: the kernel picks), or the device recovered.
    pub id: Option<u32>,
    /// Name for `close`, `status`, `list` (`None`: `ublk-crypt` and the id).
    pub name: Option<String>,
    /// The backing as given (error messages name it so); the record holds its canonical path.
    pub backing: PathBuf,
    pub spec: CipherSpec,
    pub key_bits: usize,
    pub key: KeySource,
    /// The key is a fresh random one (`--key-file /dev/urandom`; kept across a recovery).
    pub ephemeral: bool,
    pub layout: SectorLayout,
    /// Start of the data on the backing, 512-byte sectors.
    pub offset: u64,
    /// Device size, 512-byte sectors (`None`: the backing from `offset` to its end).
    pub size: Option<u64>,
    pub readonly: bool,
    pub allow_discards: bool,
    pub queues: u16,
    pub depth: u16,
    pub pool_mib: usize,
    pub max_io_kib: u32,
    /// Crypto worker threads (0: the AES runs on the queue threads only).
    pub crypto_threads: usize,
    pub pin_queues: bool,
    /// Longest wait a queue thread polls through before it sleeps, us (0: never polls).
    pub poll_usec: u32,
    /// Batched ublk IO commands (`--batch-io`, `ublk_batch.rs`).
    pub batch_io: bool,
    /// Threads per queue (`--threads-per-queue`; above 1 the kernel's per-IO daemons).
    pub threads_per_queue: u16,
    /// A standby process that takes the device over if this daemon dies (`standby.rs`).
    pub standby: bool,
    /// The OOM protections; off only in the torture test.
    pub protections: bool,
    /// Stay in the foreground (systemd's Type=notify) instead of daemonizing.
    pub foreground: bool,
}

impl DeviceConfig {
    /// The key size in bytes.
    pub fn key_bytes(&self) -> usize {
        self.key_bits / 8
    }

    /// Whether this re-attaches to a device whose daemon died (else it creates one).
    pub fn recovering(&self) -> bool {
        self.key == KeySource::Kept
    }

    /// Crypto workers when `--crypto-threads` is not given: one per CPU, at most 8.
    pub fn default_crypto_threads() -> usize {
        std::thread::available_parallelism().map_or(1, |n| n.get().min(8))
    }

    /// The device a record describes, to serve it again with the kept key.
    pub fn from_record(rec: &DeviceRecord, foreground: bool) -> Result<DeviceConfig> {
        let config = DeviceConfig {
            id: Some(rec.id),
            name: Some(rec.name.clone()),
            backing: rec.backing.clone(),
            spec: rec.cipher.parse()?,
            key_bits: rec.key_bits,
            key: KeySource::Kept,
            ephemeral: rec.ephemeral,
            layout: SectorLayout {
                sector_size: rec.sector_size,
                iv_large_sectors: rec.iv_large_sectors,
                iv_offset: rec.skip,
            },
            offset: rec.offset,
            size: Some(rec.size / 512),
            readonly: rec.readonly,
            allow_discards: rec.allow_discards,
            queues: rec.queues,
            depth: rec.depth,
            pool_mib: rec.pool_mib,
            max_io_kib: rec.max_io_kib,
            crypto_threads: rec.crypto_threads,
            pin_queues: rec.pin_queues,
            poll_usec: rec.poll_usec,
            batch_io: rec.batch_io,
            threads_per_queue: rec.threads_per_queue,
            standby: rec.standby,
            protections: rec.protections,
            foreground,
        };
        config.validate()?;
        Ok(config)
    }

    /// Every check that needs nothing but the values; the first failure is the error, in the
    /// order the flags were always checked.
    pub fn validate(&self) -> Result<()> {
        if !self.key_bits.is_multiple_of(8) {
            bail!(
                "--key-size {} is not a whole number of bytes",
                self.key_bits
            );
        }
        self.spec.check_key_len(self.key_bytes())?;
        if self.queues == 0 || self.queues > 64 {
            bail!("--queues {} is out of range (1..=64)", self.queues);
        }
        if self.depth == 0 || self.depth > 4096 {
            bail!("--depth {} is out of range (1..=4096)", self.depth);
        }
        if !(4..=32 * 1024).contains(&self.max_io_kib) || !self.max_io_kib.is_multiple_of(4) {
            bail!(
                "--max-io-kib {} must be a multiple of 4 between 4 and 32768",
                self.max_io_kib
            );
        }
        if let Some(name) = &self.name {
            if name.is_empty() || name.contains('/') || name.parse::<u32>().is_ok() {
                bail!("--name '{name}' must be non-empty, without '/', and not a number");
            }
        }
        if let Some(id) = self.id {
            if id > MAX_ID {
                bail!("--id {id} is out of range (0..={MAX_ID}, ublk's device numbers)");
            }
        }
        // Everything below is memory the daemon locks and the OOM killer may not take back: a
        // typo must not be able to stop the machine (a 512 MiB VM deadlocked on memory with
        // --crypto-threads 100000).
        if self.pool_mib == 0 || self.pool_mib > MAX_POOL_MIB {
            bail!(
                "--pool-mib {} is out of range (1..={MAX_POOL_MIB}): the daemon locks all of it",
                self.pool_mib
            );
        }
        if let Some(total) = mem_total_mib() {
            if self.pool_mib > total / 4 {
                bail!(
                    "--pool-mib {} is more than a quarter of this machine's memory ({total} MiB): \
                     the daemon locks all of it",
                    self.pool_mib
                );
            }
        }
        if self.crypto_threads > MAX_CRYPTO_THREADS {
            bail!(
                "--crypto-threads {} is out of range (0..={MAX_CRYPTO_THREADS})",
                self.crypto_threads
            );
        }
        if self.poll_usec > MAX_POLL_USEC {
            bail!(
                "--poll-usec {} is out of range (0..={MAX_POLL_USEC}): a queue thread would spin \
                 through waits that long",
                self.poll_usec
            );
        }
        if self.threads_per_queue == 0
            || self.threads_per_queue > MAX_THREADS_PER_QUEUE
            || self.threads_per_queue > self.depth
        {
            bail!(
                "--threads-per-queue {} is out of range (1..={MAX_THREADS_PER_QUEUE}, at most \
                 --depth)",
                self.threads_per_queue
            );
        }
        if self.threads_per_queue > 1 && self.batch_io {
            bail!("--threads-per-queue above 1 and --batch-io do not go together (the kernel's per-IO daemons are not for batched commands)");
        }
        self.layout.validate()?;
        Ok(())
    }

    /// The record of this device once it is served as `id` with `size` bytes by this process.
    pub fn record(&self, id: u32, size: u64) -> DeviceRecord {
        DeviceRecord {
            id,
            name: match &self.name {
                Some(n) if !n.is_empty() => n.clone(),
                _ => format!("ublk-crypt{id}"),
            },
            backing: std::fs::canonicalize(&self.backing).unwrap_or(self.backing.clone()),
            cipher: self.spec.to_string(),
            key_bits: self.key_bits,
            sector_size: self.layout.sector_size,
            iv_large_sectors: self.layout.iv_large_sectors,
            offset: self.offset,
            skip: self.layout.iv_offset,
            size,
            readonly: self.readonly,
            allow_discards: self.allow_discards,
            queues: self.queues,
            depth: self.depth,
            pool_mib: self.pool_mib,
            max_io_kib: self.max_io_kib,
            crypto_threads: self.crypto_threads,
            pin_queues: self.pin_queues,
            poll_usec: self.poll_usec,
            batch_io: self.batch_io,
            threads_per_queue: self.threads_per_queue,
            standby: self.standby,
            protections: self.protections,
            ephemeral: self.ephemeral,
            pid: std::process::id(),
        }
    }
}

/// ublk's largest device number (`UBLK_MAX_UBLKS` is `1 << MINORBITS`).
pub const MAX_ID: u32 = (1 << 20) - 1;
/// The largest IO pool: far beyond what any queue layout needs (the pool splits large IOs).
pub const MAX_POOL_MIB: usize = 4096;
/// `--poll-usec`: 10 ms, far beyond any wait worth a spinning CPU (an SSD read is ~0.1 ms).
pub const MAX_POLL_USEC: u32 = 10_000;
/// `--threads-per-queue`: each thread has a locked stack and a ring; past the CPUs a daemon
/// would use, more threads only take turns.
pub const MAX_THREADS_PER_QUEUE: u16 = 8;
/// Crypto workers: each has a locked stack; more than there are CPUs only adds switches.
pub const MAX_CRYPTO_THREADS: usize = 64;

/// `MemTotal` of `/proc/meminfo`, in MiB.
fn mem_total_mib() -> Option<usize> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: usize = s
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> DeviceConfig {
        DeviceConfig {
            id: None,
            name: Some("swap".into()),
            backing: "/dev/vdb".into(),
            spec: "aes-xts-plain64".parse().unwrap(),
            key_bits: 512,
            key: KeySource::Read(KeySpec::Passphrase {
                hash: "sha256".parse().unwrap(),
            }),
            ephemeral: false,
            layout: SectorLayout::default(),
            offset: 0,
            size: None,
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
            foreground: false,
        }
    }

    #[test]
    fn each_bad_value_is_named() {
        assert!(config().validate().is_ok());
        let e = |f: fn(&mut DeviceConfig)| {
            let mut c = config();
            f(&mut c);
            c.validate().unwrap_err().to_string()
        };
        assert!(e(|c| c.key_bits = 500).contains("--key-size 500"));
        assert!(e(|c| c.key_bits = 384).contains("384"));
        assert!(e(|c| c.queues = 0).contains("--queues 0"));
        assert!(e(|c| c.queues = 65).contains("--queues 65"));
        assert!(e(|c| c.depth = 0).contains("--depth 0"));
        assert!(e(|c| c.max_io_kib = 6).contains("--max-io-kib 6"));
        assert!(e(|c| c.name = Some("7".into())).contains("--name '7'"));
        assert!(e(|c| c.name = Some("a/b".into())).contains("--name"));
        assert!(e(|c| c.layout.sector_size = 1000).contains("1000"));
        assert!(e(|c| c.poll_usec = MAX_POLL_USEC + 1).contains("--poll-usec 10001"));
        assert!(e(|c| c.threads_per_queue = 0).contains("--threads-per-queue 0"));
        assert!(e(|c| c.threads_per_queue = 9).contains("--threads-per-queue 9"));
        assert!(e(|c| {
            c.depth = 2;
            c.threads_per_queue = 3
        })
        .contains("at most --depth"));
        assert!(e(|c| {
            c.threads_per_queue = 2;
            c.batch_io = true
        })
        .contains("--batch-io"));
    }

    #[test]
    fn a_record_round_trips_to_the_same_device() {
        let c = config();
        let rec = c.record(3, 1 << 30);
        assert_eq!(rec.name, "swap");
        let back = DeviceConfig::from_record(&rec, true).unwrap();
        assert_eq!(back.id, Some(3));
        assert!(back.recovering() && back.foreground);
        assert_eq!(
            (back.spec, back.key_bits, back.layout),
            (c.spec, 512, c.layout)
        );
        assert_eq!(back.size, Some((1 << 30) / 512));
        assert_eq!(back.record(3, 1 << 30), rec);
        let unnamed = DeviceConfig { name: None, ..c };
        assert_eq!(unnamed.record(5, 4096).name, "ublk-crypt5");
    }

    #[test]
    fn numbers_that_would_lock_the_machine_are_refused() {
        let mut c = config();
        c.id = Some(4_294_967_295);
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--id 4294967295 is out of range"));
        c.id = Some(MAX_ID);
        c.validate().unwrap();
        c.pool_mib = usize::MAX / 1024;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("--pool-mib"));
        c.pool_mib = 0;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("--pool-mib 0"));
        c.pool_mib = 16;
        c.crypto_threads = 100_000;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--crypto-threads 100000 is out of range"));
        c.crypto_threads = 0;
        c.validate().unwrap();
    }
}
