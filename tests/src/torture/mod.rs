//! The OOM torture: encrypted swap under memory pressure, in a VM (see `tests/README.md`,
//! "OOM torture").
//!
//! A [`Torture`] describes one VM run: a backend for a swap device over `/dev/vda`
//! (ublk-crypt, ublk-crypt with its protections off, or kernel dm-crypt), and phases run one
//! after the other with `page-hog` (`src/bin/page-hog.rs`):
//!
//! * [`Phase::Overcommit`]: a hog of `ram_x` × RAM stamps its pages and verifies them pass
//!   after pass; with `oom`, once it has filled, a second hog asks for more than RAM + swap
//!   (the OOM killer must take that one), and the first hog's last pass runs only after that.
//! * [`Phase::Crash`]: while a hog swaps, the daemon is `kill -9`ed and `ublk-crypt recover`
//!   re-attaches; the hog must finish with every page intact.
//!
//! Alongside, a sampler prints the daemon's VmRSS/VmLck/VmSwap/oom_score_adj (read with shell
//! builtins from /proc, no fork) and, every few samples, `ublk-crypt status --json` (pool
//! high water, waits). `vm-watchdog` dumps blocked tasks and memory when no hog has beaten for
//! 30 s and crashes the guest after 180 s, so a freeze ends as a kernel panic with stacks.
//! After the run the host scans the backing for page stamps in plaintext, with a positive
//! control (stamped pages written raw behind the swap area must be found).
//!
//! [`Torture::run`] returns a [`Report`] even when the VM failed; [`Report::failures`] is
//! the pass/fail verdict, [`Report::summary`] the figures.

use std::time::Duration;

use crate::vm::{Vm, VmError, VmOutput};

mod report;
mod script;

pub use crate::stamp::{count_stamps, magic as stamp_magic};
pub use crate::status::StatusSummary as PoolSample;
pub use report::{DaemonSample, HogRun, PassTime, Report};

/// What the swap device is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// `ublk-crypt open --key-file /dev/urandom`, all protections on.
    UblkCrypt,
    /// The same with `--test-disable-protections` (no IO_FLUSHER, mlockall, oom_score_adj).
    UblkCryptUnprotected,
    /// `cryptsetup open --type plain -c aes-xts-plain64 -s 512 --key-file /dev/urandom`.
    DmCrypt,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::UblkCrypt => "ublk-crypt",
            Backend::UblkCryptUnprotected => "ublk-crypt-unprotected",
            Backend::DmCrypt => "dm-crypt",
        }
    }

    pub fn parse(s: &str) -> Option<Backend> {
        [
            Backend::UblkCrypt,
            Backend::UblkCryptUnprotected,
            Backend::DmCrypt,
        ]
        .into_iter()
        .find(|b| b.name() == s)
    }

    pub fn is_ublk(self) -> bool {
        self != Backend::DmCrypt
    }
}

/// One page-hog run: `ram_x` × RAM, a fill then `passes` passes (the last one verify-only), in
/// the page orders `order` (page-hog `--order`, cycled; the fill is always sequential).
#[derive(Clone, Debug)]
pub struct HogSpec {
    pub name: String,
    pub ram_x: u32,
    pub passes: u32,
    pub order: String,
}

impl HogSpec {
    pub fn new(name: &str, ram_x: u32, passes: u32, order: &str) -> HogSpec {
        HogSpec {
            name: name.into(),
            ram_x,
            passes,
            order: order.into(),
        }
    }
}

/// One step of the torture (run in order, in the same VM, on the same swap device).
#[derive(Clone, Debug)]
pub enum Phase {
    /// The hog alone; with `oom`, hog `<name>-oom` asks for more than RAM + swap once the hog
    /// has filled; the OOM killer must kill it (and nothing else), and the hog's last pass
    /// runs only after that.
    Overcommit { hog: HogSpec, oom: bool },
    /// `kill -9` of the daemon when the hog's pass `kill_at.0` (0: the fill) is `kill_at.1`
    /// percent done, then `ublk-crypt recover`. ublk backends only.
    Crash { hog: HogSpec, kill_at: (u32, u32) },
}

impl Phase {
    pub fn hog(&self) -> &HogSpec {
        match self {
            Phase::Overcommit { hog, .. } | Phase::Crash { hog, .. } => hog,
        }
    }
}

/// Short (CI) or long (`UBLK_CRYPT_TORTURE=long`, `scripts/torture --long`) profile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    Short,
    Long,
}

impl Profile {
    /// `UBLK_CRYPT_TORTURE=long` selects the long profile; anything else the short one.
    pub fn from_env() -> Profile {
        match std::env::var("UBLK_CRYPT_TORTURE").as_deref() {
            Ok("long") => Profile::Long,
            _ => Profile::Short,
        }
    }

    /// The OOM phases: a 2× RAM hog with the true-OOM second hog, then a 3× RAM hog.
    pub fn oom_phases(self) -> Vec<Phase> {
        match self {
            // Short: 2×: fill, a scattered re-stamp during the OOM (pages 1 MiB + 4 KiB apart:
            // swap readahead reads scattered slots, issue 19), a random re-stamp, a reversed
            // verify after it; 3×: fill, sequential verify.
            Profile::Short => vec![
                Phase::Overcommit {
                    hog: HogSpec::new("x2", 2, 3, "scatter,random,rev"),
                    oom: true,
                },
                Phase::Overcommit {
                    hog: HogSpec::new("x3", 3, 1, "seq"),
                    oom: false,
                },
            ],
            // Long: random and strided passes too (a swap-in per page, no readahead).
            Profile::Long => vec![
                Phase::Overcommit {
                    hog: HogSpec::new("x2", 2, 4, "seq,random,stride,rev"),
                    oom: true,
                },
                Phase::Overcommit {
                    hog: HogSpec::new("x3", 3, 3, "seq,random,rev"),
                    oom: false,
                },
            ],
        }
    }

    /// The crash phases: a 2× RAM hog each; the daemon is killed during the fill (75 %: the
    /// hog only allocates, and takes any memory the dead daemon leaves) and in the middle of a
    /// random re-stamp pass (swap-ins and swap-outs in flight). Its standby takes over with no
    /// help; the last pass verifies every page. (Without a standby, the fill kill deadlocked
    /// the machine: tests/README.md, "Crash and recovery".)
    pub fn crash_phases(self) -> Vec<Phase> {
        let restamp = match self {
            Profile::Short => Phase::Crash {
                hog: HogSpec::new("crash", 2, 2, "random,rev"),
                kill_at: (1, 50),
            },
            Profile::Long => Phase::Crash {
                hog: HogSpec::new("crash", 2, 3, "seq,random,rev"),
                kill_at: (2, 50),
            },
        };
        let fill = Phase::Crash {
            hog: HogSpec::new("crashfill", 2, 1, "rev"),
            kill_at: (0, 75),
        };
        vec![fill, restamp]
    }
}

/// One VM run of the torture.
#[derive(Clone, Debug)]
pub struct Torture {
    pub backend: Backend,
    pub memory_mib: u32,
    pub cpus: u32,
    pub swap_mib: u64,
    pub phases: Vec<Phase>,
    /// Seconds between daemon samples (`ublk-crypt status` every 4th).
    pub sample_secs: u32,
    /// Longest allowed gap between two heartbeats of a hog (and the harness's console stall
    /// timeout).
    pub max_gap: Duration,
    pub timeout: Duration,
    /// VM run name (log directory); default: the test thread's name.
    pub name: Option<String>,
    /// (`UBLK_CRYPT_TORTURE_SYSRQ="PERIOD COMMANDS"`, default "10 wm", sets what vm-watchdog
    /// dumps while the heartbeat is stale, e.g. "60 wmt" to see every task.)
    ///
    /// Mount ramfs (never swapped) on /run/ublk-crypt (ublk-crypt's device records) and
    /// /run/ublksrvd (libublk's device JSON) before opening the device. Off by default: on a
    /// real system /run is a tmpfs, whose pages can go to the very swap device, and `recover`
    /// reads both files; the daemon keeps both locked in memory since the fix of that (see
    /// tests/README.md, "OOM torture"), so this is only for comparison.
    pub ramfs_run_dir: bool,
    /// Crash phase: MiB the kill-and-recover helper holds locked and frees at the kill, so the
    /// recovering daemon finds memory (0: none; see kill-and-recover.rs).
    pub recover_reserve_mib: usize,
    /// More `ublk-crypt open` flags for the ublk backends (e.g. `--queues 2 --pin-queues`);
    /// split on spaces, no quoting.
    pub open_args: String,
    /// The daemon's XTS tier (`UBLK_CRYPT_XTS_TIER`; "detected": the daemon's own choice).
    /// `portable` by default, as in the fio report: TCG emulates the fused tiers' wide AES
    /// instructions lane by lane, and the guest's `-cpu max` offers VAES, so the detected tier
    /// (`vaes-avx2`) measures the emulator (bench/results/history.md, run H): with it the fill
    /// took 12.7 s against dm-crypt's 8.2 s, and every write 4.9 ms in the daemon.
    pub xts_tier: String,
    /// Crash phases: how long a standby waits after its daemon is gone before it takes over
    /// (the daemon's `UBLK_CRYPT_TEST_TAKEOVER_DELAY_MS` hook; 0: at once). With a delay the
    /// swapping hog takes every page the dead daemon freed first, as on a busy machine, so the
    /// takeover must find memory where only a real-time task may take it.
    pub takeover_delay_ms: u32,
    /// Crash phases: take over at normal priority (the A/B of the real-time takeover;
    /// `UBLK_CRYPT_TEST_TAKEOVER_PRIORITY=normal`).
    pub takeover_normal_priority: bool,
    /// Crash phases: KiB of fresh memory each takeover must get first
    /// (`UBLK_CRYPT_TEST_TAKEOVER_ALLOC_KIB`; 0: none).
    pub takeover_alloc_kib: u32,
    /// ublk backends: `KEY=VALUE` pairs written to the device's `queue/KEY` in sysfs once it
    /// is open (e.g. `nomerges=2`), for experiments; split on spaces.
    pub queue_sysfs: String,
}

/// Bytes of the raw area behind the swap area, where the positive control's stamps go.
const CONTROL_MIB: u64 = 4;
const CONTROL_PAGES: usize = 16;

impl Torture {
    /// 256 MiB RAM, 2 vCPUs, 1 GiB of swap.
    pub fn new(backend: Backend, phases: Vec<Phase>) -> Torture {
        Torture {
            backend,
            memory_mib: 256,
            cpus: 2,
            swap_mib: 1024,
            phases,
            sample_secs: 5,
            max_gap: Duration::from_secs(60),
            timeout: Duration::from_secs(1800),
            name: None,
            ramfs_run_dir: false,
            recover_reserve_mib: 0,
            open_args: String::new(),
            xts_tier: "portable".into(),
            takeover_delay_ms: 0,
            takeover_normal_priority: false,
            takeover_alloc_kib: 0,
            queue_sysfs: String::new(),
        }
    }

    fn hog_mib(&self, ram_x: u32) -> u64 {
        u64::from(self.memory_mib) * u64::from(ram_x)
    }

    /// The VM: the backend's binaries and tools, the hogs, the watchdog, the timeouts.
    fn vm(&self) -> crate::vm::VmBuilder {
        let mut b = Vm::builder()
            .memory_mib(self.memory_mib)
            .cpus(self.cpus)
            .disk_mib(self.swap_mib + CONTROL_MIB)
            .binary(crate::release_binary("page-hog"))
            .binary(crate::release_binary("vm-watchdog"))
            .binary(crate::release_binary("kill-and-recover"))
            .host_tool("mkswap")
            .host_tool("swapon")
            .host_tool("swapoff")
            .kernel_arg("sysrq_always_enabled=1")
            // Unprotected, a freeze is the expected outcome: let vm-watchdog dump the stacks and
            // crash the guest (180 s) rather than the host's silence detector cut it short.
            .stall_timeout(if self.backend == Backend::UblkCryptUnprotected {
                Duration::from_secs(240)
            } else {
                self.max_gap
            })
            .timeout(self.timeout);
        if let Some(n) = &self.name {
            b = b.name(n);
        }
        if self.backend.is_ublk() {
            // On the /usr disk, not in the initramfs (guest RAM, swappable tmpfs): `recover`
            // must be able to start while the swap device waits for a daemon, as a unit file's
            // binary on a real disk can.
            b = b.host_file(
                "/usr/local/sbin/ublk-crypt",
                crate::release_binary("ublk-crypt"),
            );
        } else {
            b = b.host_tool("cryptsetup");
        }
        b
    }

    /// Boots the VM, runs the torture, scans the backing. `Err` only when the VM could not
    /// be set up; a failed run is a [`Report`] whose [`Report::failures`] say why.
    pub fn run(&self) -> Result<Report, VmError> {
        match self.vm().run(&self.script()) {
            Ok(out) => Ok(self.report(&out, Ok(()))),
            Err(e) => match e.output() {
                Some(out) => {
                    let why = format!("{}", e)
                        .lines()
                        .next()
                        .unwrap_or_default()
                        .to_string();
                    Ok(self.report(out, Err(why)))
                }
                None => Err(e),
            },
        }
    }
}
