//! The command line. Option names follow `cryptsetup open --type plain` wherever one exists, so
//! the same arguments give the same volume under dm-crypt and under ublk-crypt.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, CommandFactory, Parser, Subcommand};
use ublk_crypt_crypto::SectorLayout;

use crate::benchmark::BenchmarkArgs;
use crate::config::{DeviceConfig, KeySource};
use crate::key_source::KeySpec;
use crate::{benchmark, client, device, docs, mkswap, readiness};

#[derive(Parser, Debug)]
#[command(
    name = "ublk-crypt",
    version,
    about = "Encrypted block device over ublk, dm-crypt (plain mode) compatible, safe to swap on",
    long_about = "Serves /dev/ublkbN, encrypting every write and decrypting every read, storing \
                  exactly what `cryptsetup open --type plain` with the same options would store. \
                  Its IO path runs from a preallocated, locked buffer pool and survives OOM \
                  pressure, so it can back encrypted swap.",
    after_long_help = "Examples:
  Encrypted swap with a fresh key (as root):
    dev=$(ublk-crypt open /dev/sdb2 --key-file /dev/urandom --name swap)
    mkswap \"$dev\" && swapon \"$dev\"
  Open a volume made by `cryptsetup open --type plain -c aes-xts-plain64 -s 512 -d KEY`:
    ublk-crypt open /dev/sdc --key-file KEY --name data
  Under systemd: ublk-crypt@NAME.service and ublk-crypt-swap@NAME.service.
  Per-cipher speed of this machine: ublk-crypt benchmark"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Open an encrypted device over BACKING and print its path (/dev/ublkbN).
    Open(Box<OpenArgs>),
    /// Stop serving a device and delete it (its key is forgotten).
    Close {
        /// Device name, id, or /dev/ublkbN path.
        device: String,
    },
    /// List the devices served by ublk-crypt.
    List {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Per-queue IO counts, bytes, pool use, waits and errors of a device.
    Status {
        /// Device name, id, or /dev/ublkbN path.
        device: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Re-attach a new daemon to a device whose daemon died (its IO waits meanwhile).
    Recover {
        /// Device name, id, or /dev/ublkbN path.
        device: String,
        /// Stay in the foreground (for systemd, Type=notify).
        #[arg(long)]
        foreground: bool,
    },
    /// Replace the daemon of a device by the binary this command runs from (after a package
    /// upgrade), with no IO error and no swapoff: a standby from the new binary is started and
    /// takes over when the old daemon hands the device over. Prints the longest IO pause.
    Upgrade {
        /// Device name, id, or /dev/ublkbN path.
        device: String,
    },
    /// Format a device as swap (mkswap), only if it is safe: served by a live daemon, with an
    /// ephemeral key (--key-file /dev/urandom), neither it nor its backing holding a file
    /// system, LUKS or other signature. What ublk-crypt-swap@.service runs.
    Mkswap {
        /// Device name, id, or /dev/ublkbN path.
        device: String,
        /// The swap area's label (mkswap --label).
        #[arg(long, short = 'L')]
        label: Option<String>,
    },
    /// The standby process of device ID, started by its daemon (internal).
    #[command(hide = true)]
    Standby {
        /// The device id.
        id: u32,
        /// The daemon's pool memfd, inherited under this descriptor number.
        #[arg(long)]
        pool_fd: i32,
    },
    /// Throughput of every supported cipher and key size on this machine, in memory, like
    /// `cryptsetup benchmark` (needs no ublk and no privileges).
    Benchmark(BenchmarkArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    #[command(hide = true)]
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), or write every page (one per subcommand) into --dir.
    #[command(hide = true)]
    Manpage {
        /// Write ublk-crypt.8 and ublk-crypt-SUBCOMMAND.8 into this directory.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

/// `ublk-crypt open`.
#[derive(Args, Debug, Clone)]
pub struct OpenArgs {
    /// Backing block device or file that holds the ciphertext.
    pub backing: PathBuf,

    /// Name used by `close`, `status` and `list` (default: ublk-crypt<ID>).
    #[arg(long)]
    pub name: Option<String>,

    /// ublk device id (N in /dev/ublkbN); default: the kernel picks one. If device N exists
    /// and its daemon died, this re-attaches to it (systemd restart) instead of failing.
    #[arg(long)]
    pub id: Option<u32>,

    /// dm-crypt cipher spec: aes-xts-plain64, aes-xts-plain, aes-xts-plain64be,
    /// aes-cbc-essiv:sha256.
    #[arg(long, short = 'c', default_value = "aes-xts-plain64")]
    pub cipher: String,

    /// Key size in bits (256 or 512 for XTS; 128, 192 or 256 for CBC).
    #[arg(long, short = 's', default_value_t = 512)]
    pub key_size: usize,

    /// Read the key from this file (raw, not hashed, as cryptsetup plain does);
    /// `-` reads standard input and hashes it; /dev/urandom gives a fresh random key.
    /// Without it, a passphrase is read from standard input (up to a newline) and hashed.
    #[arg(long, short = 'd')]
    pub key_file: Option<PathBuf>,

    /// Bytes to skip at the start of the key file.
    #[arg(long, default_value_t = 0)]
    pub keyfile_offset: u64,

    /// With --key-file -: the most bytes read from standard input. With a key file it is
    /// ignored, as by cryptsetup plain (the key size is read).
    #[arg(long, short = 'l')]
    pub keyfile_size: Option<usize>,

    /// Passphrase hash: sha256, sha512, ripemd160 (cryptsetup's plain default) or plain;
    /// ignored with a key file, as in cryptsetup.
    #[arg(long)]
    pub hash: Option<String>,

    /// Start of the encrypted data on the backing, in 512-byte sectors.
    #[arg(long, short = 'o', default_value_t = 0)]
    pub offset: u64,

    /// IV offset in 512-byte sectors (dm-crypt iv_offset).
    #[arg(long, short = 'p', default_value_t = 0)]
    pub skip: u64,

    /// Device size in 512-byte sectors (default: the backing from --offset to its end).
    #[arg(long, short = 'b')]
    pub size: Option<u64>,

    /// Encryption sector size in bytes: 512, 1024, 2048 or 4096.
    #[arg(long, default_value_t = 512)]
    pub sector_size: u32,

    /// IV counts sector-size units instead of 512-byte units (dm-crypt iv_large_sectors).
    #[arg(long)]
    pub iv_large_sectors: bool,

    /// Pass discards through to the backing (punch hole / BLKDISCARD). Off by default:
    /// discards reveal which blocks are unused.
    #[arg(long)]
    pub allow_discards: bool,

    /// Read-only device.
    #[arg(long, short = 'r')]
    pub readonly: bool,

    /// Number of ublk queues (one IO thread each).
    #[arg(long, default_value_t = 1)]
    pub queues: u16,

    /// Queue depth (in-flight IOs per queue).
    #[arg(long, default_value_t = 64)]
    pub depth: u16,

    /// Budget of the locked IO buffer pool, MiB; the daemon never uses more for IO buffers.
    #[arg(long, default_value_t = 16)]
    pub pool_mib: usize,

    /// Largest IO the device accepts, KiB (the kernel splits larger ones).
    #[arg(long, default_value_t = 512)]
    pub max_io_kib: u32,

    /// Crypto worker threads for large IOs (default: one per CPU, at most 8; 0 = encrypt on
    /// the queue threads only).
    #[arg(long)]
    pub crypto_threads: Option<usize>,

    /// Pin each queue thread to the CPUs the kernel maps to its queue (libublk's default).
    /// Without it, queue threads run on any CPU the daemon may use, like dm-crypt's unbound
    /// kcryptd: pinned, a queue thread shares one CPU with the task that submits to it (measured
    /// in bench/results/history.md, "Fifth cost").
    #[arg(long)]
    pub pin_queues: bool,

    /// Longest wait, in microseconds, that a queue thread polls its ring through instead of
    /// sleeping; the window adapts to the waits it sees, like the kernel's haltpoll, and an
    /// idle device is not polled. Each swap-in wakes the daemon twice, and on scattered swap-in
    /// those wake-ups were most of the distance to dm-crypt. It costs CPU while IO is in
    /// flight; 0: never poll.
    #[arg(long, default_value_t = 500, value_name = "USEC")]
    pub poll_usec: u32,

    /// Exchange requests with the kernel in batches (`UBLK_F_BATCH_IO`, Linux 7.0 or newer):
    /// one standing fetch brings each queue's new requests, one command per round commits
    /// their results, instead of one command per request. Off by default: in the test VM it
    /// does not beat the per-request commands (bench/README.md, "Batched IO commands").
    #[arg(long)]
    pub batch_io: bool,

    /// Threads serving each queue, each its own share of the queue's tags (the kernel's
    /// per-IO daemons, Linux 6.16 or newer): one queue's requests on several CPUs, where one
    /// queue thread is the limit (4 KiB writes at queue depth 32). Not with --batch-io.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub threads_per_queue: u16,

    /// Serve without a standby process. By default a second, pre-locked process stands by and
    /// takes the device over within milliseconds if the daemon dies (even with no free memory),
    /// and makes `upgrade` possible; it adds a few MiB of locked memory (the pool is shared).
    #[arg(long)]
    pub no_standby: bool,

    /// Stay in the foreground; under systemd (Type=notify) signal readiness.
    #[arg(long)]
    pub foreground: bool,

    /// TEST ONLY: disable the OOM protections (PR_SET_IO_FLUSHER, mlockall, oom_score_adj,
    /// locked reserve pool) to show what the torture test exercises. Never use in production.
    #[arg(long, hide = true)]
    pub test_disable_protections: bool,
}

impl OpenArgs {
    /// The device these flags describe, validated ([`DeviceConfig::validate`]).
    pub fn into_config(self) -> Result<DeviceConfig> {
        let spec = self.cipher.parse()?;
        let config = DeviceConfig {
            id: self.id,
            name: self.name,
            spec,
            key_bits: self.key_size,
            // Replaced below, once the key size is known to be whole bytes.
            key: KeySource::Kept,
            ephemeral: false,
            layout: SectorLayout {
                sector_size: self.sector_size,
                iv_large_sectors: self.iv_large_sectors,
                iv_offset: self.skip,
            },
            offset: self.offset,
            size: self.size,
            readonly: self.readonly,
            allow_discards: self.allow_discards,
            queues: self.queues,
            depth: self.depth,
            pool_mib: self.pool_mib,
            max_io_kib: self.max_io_kib,
            crypto_threads: self
                .crypto_threads
                .unwrap_or_else(DeviceConfig::default_crypto_threads),
            pin_queues: self.pin_queues,
            poll_usec: self.poll_usec,
            batch_io: self.batch_io,
            threads_per_queue: self.threads_per_queue,
            standby: !self.no_standby,
            protections: !self.test_disable_protections,
            foreground: self.foreground,
            backing: self.backing,
        };
        config.validate()?;
        let key = KeySpec::new(
            self.key_file.as_deref(),
            self.keyfile_offset,
            self.keyfile_size,
            self.hash.as_deref(),
            config.key_bytes(),
        )?;
        Ok(DeviceConfig {
            ephemeral: key.is_ephemeral(),
            key: KeySource::Read(key),
            ..config
        })
    }
}

pub fn run() -> Result<ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Command::Open(args) => {
            // Before the flags are checked: a warning about them is logged.
            readiness::init_logging();
            device::open(args.into_config()?)
        }
        Command::Close { device } => client::close(&device),
        Command::List { json } => client::list(json),
        Command::Status { device, json } => client::status(&device, json),
        Command::Recover { device, foreground } => device::recover(&device, foreground),
        Command::Upgrade { device } => client::upgrade(&device),
        Command::Mkswap { device, label } => mkswap::mkswap(&device, label.as_deref()),
        Command::Standby { id, pool_fd } => device::standby(id, pool_fd),
        Command::Benchmark(args) => benchmark::benchmark(args),
        Command::Completions { shell } => docs::completions(&Cli::command(), shell),
        Command::Manpage { dir } => docs::manpage(&Cli::command(), dir.as_deref()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults_match_modern_dm_crypt() {
        let cli = Cli::try_parse_from(["ublk-crypt", "open", "/dev/vdb"]).unwrap();
        let Command::Open(a) = cli.command else {
            panic!("not open")
        };
        assert_eq!(a.cipher, "aes-xts-plain64");
        assert_eq!(a.key_size, 512);
        assert_eq!(a.sector_size, 512);
        assert!(!a.allow_discards && !a.readonly && !a.foreground);
    }

    #[test]
    fn cryptsetup_short_options() {
        let cli = Cli::try_parse_from([
            "ublk-crypt",
            "open",
            "/dev/vdb",
            "-c",
            "aes-cbc-essiv:sha256",
            "-s",
            "256",
            "-d",
            "/k",
            "-o",
            "8",
            "-p",
            "16",
            "-r",
        ])
        .unwrap();
        let Command::Open(a) = cli.command else {
            panic!("not open")
        };
        assert_eq!(a.cipher, "aes-cbc-essiv:sha256");
        assert_eq!((a.key_size, a.offset, a.skip), (256, 8, 16));
        assert!(a.readonly);
        assert_eq!(a.key_file.as_deref(), Some(std::path::Path::new("/k")));
    }

    fn open_config(extra: &[&str]) -> Result<DeviceConfig> {
        let mut argv = vec!["ublk-crypt", "open", "/dev/vdb"];
        argv.extend_from_slice(extra);
        let Command::Open(a) = Cli::try_parse_from(argv).unwrap().command else {
            panic!("not open")
        };
        a.into_config()
    }

    #[test]
    fn open_flags_become_a_validated_device_config() {
        let c =
            open_config(&["-d", "/k", "-s", "256", "--sector-size", "4096", "-p", "8"]).unwrap();
        assert_eq!(c.key_bits, 256);
        assert_eq!(
            (c.layout.sector_size, c.layout.iv_offset),
            (4096, 8),
            "{c:?}"
        );
        assert!(matches!(
            c.key,
            KeySource::Read(KeySpec::File { size: 32, .. })
        ));
        assert!(!c.recovering() && c.protections && c.crypto_threads >= 1);
        let e = |extra: &[&str]| open_config(extra).unwrap_err().to_string();
        assert_eq!(e(&["--queues", "0"]), "--queues 0 is out of range (1..=64)");
        assert_eq!(
            e(&["--keyfile-offset", "4"]),
            "--keyfile-offset needs --key-file"
        );
        assert!(e(&["-c", "aes-xts-plain64", "-s", "384"]).contains("384"));
        assert!(e(&["--hash", "md4"]).contains("md4"));
    }
}
