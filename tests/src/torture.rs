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

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use crate::vm::{Vm, VmError, VmOutput};

/// The 16-byte marker page-hog puts at the start of every stamped page (kept masked here as in
/// page-hog, so no binary holds it in plaintext).
pub fn stamp_magic() -> [u8; 16] {
    const MASKED: [u8; 16] = [
        0xf5, 0xe4, 0xe2, 0xe0, 0x88, 0xed, 0xea, 0xe2, 0x88, 0xf6, 0xf1, 0xe4, 0xe8, 0xf5, 0x9f,
        0xd3,
    ];
    MASKED.map(|b| b ^ 0xa5)
}

/// Count of [`stamp_magic`] occurrences in `data`, at any byte offset.
pub fn count_stamps(data: &[u8]) -> usize {
    let m = stamp_magic();
    let head = u64::from_le_bytes(m[..8].try_into().unwrap());
    let mut n = 0;
    let mut i = 0;
    while i + 16 <= data.len() {
        match data[i..data.len() - 15].iter().position(|&b| b == m[0]) {
            None => break,
            Some(p) => {
                let j = i + p;
                if u64::from_le_bytes(data[j..j + 8].try_into().unwrap()) == head
                    && data[j + 8..j + 16] == m[8..]
                {
                    n += 1;
                }
                i = j + 1;
            }
        }
    }
    n
}

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
            // Short: sequential and reversed passes (swap readahead helps both), one of each
            // kind: fill, re-stamp during the OOM, verify after it; 3×: fill, verify.
            Profile::Short => vec![
                Phase::Overcommit {
                    hog: HogSpec::new("x2", 2, 2, "seq,rev"),
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

    /// The crash phase: a 2× RAM hog; the daemon is killed in the middle of a re-stamp pass
    /// (swap-ins and swap-outs in flight), then the last pass verifies every page.
    ///
    /// Not during the fill: there the hog only allocates, takes the dead daemon's memory at
    /// once and leaves none for the recovering one, and the machine deadlocks (see
    /// tests/README.md, "OOM torture"; `kill_at: (0, 75)` shows it).
    pub fn crash_phases(self) -> Vec<Phase> {
        match self {
            Profile::Short => vec![Phase::Crash {
                hog: HogSpec::new("crash", 2, 2, "seq,rev"),
                kill_at: (1, 50),
            }],
            Profile::Long => vec![Phase::Crash {
                hog: HogSpec::new("crash", 2, 3, "seq,random,rev"),
                kill_at: (2, 50),
            }],
        }
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
        }
    }

    fn hog_mib(&self, ram_x: u32) -> u64 {
        u64::from(self.memory_mib) * u64::from(ram_x)
    }

    /// The guest script.
    pub fn script(&self) -> String {
        let mut s = String::new();
        let sectors = self.swap_mib * 2048;
        let _ = write!(
            s,
            r#"
U=/usr/local/sbin/ublk-crypt
T=/run/torture
mkdir -p $T
ev() {{ echo "torture: $*"; }}
daemon_pid() {{ sed -n 's/.*"pid": *\([0-9]*\).*/\1/p' /run/ublk-crypt/*.json 2>/dev/null | head -n 1; }}
daemon_check() {{  # WHEN
    p=$(cat $T/daemon-pid 2>/dev/null || true)
    [ -n "$p" ] || return 0
    if [ -d /proc/$p ]; then
        ev "daemon-check when=$1 pid=$p record_pid=$(daemon_pid) alive=1 oom_score_adj=$(cat /proc/$p/oom_score_adj)"
    else
        ev "daemon-check when=$1 pid=$p record_pid=$(daemon_pid) alive=0"
    fi
}}
hog_exit() {{  # NAME PID
    set +e; wait $2; rc=$?; set -e
    ev "hog-exit name=$1 rc=$rc"
}}
wait_for() {{ while [ ! -e "$1" ]; do sleep 1; done; }}
# Dumps blocked tasks and memory while no hog has beaten for 30 s; crashes the guest at 180 s.
vm-watchdog {sysrq} --heartbeat $T/hb 30 180 &
"#,
            sysrq = std::env::var("UBLK_CRYPT_TORTURE_SYSRQ").unwrap_or_else(|_| "10 wm".into())
        );
        match self.backend {
            Backend::UblkCrypt | Backend::UblkCryptUnprotected => {
                let mut extra = String::new();
                if self.backend == Backend::UblkCryptUnprotected {
                    extra += " --test-disable-protections";
                }
                for a in self.open_args.split_whitespace() {
                    extra += " ";
                    extra += a;
                }
                if self.ramfs_run_dir {
                    s += "for d in /run/ublk-crypt /run/ublksrvd; do mkdir -p $d && mount -t ramfs -o mode=0700 ramfs $d; done\n";
                }
                let _ = write!(
                    s,
                    r#"
dev=$($U open /dev/vda --key-file /dev/urandom --name tswap --size {sectors}{extra})
daemon_pid > $T/daemon-pid
ev "device $dev daemon $(cat $T/daemon-pid)"
daemon_check open
"#
                );
            }
            Backend::DmCrypt => {
                let _ = write!(
                    s,
                    r#"
cryptsetup open --type plain -c aes-xts-plain64 -s 512 --key-file /dev/urandom --size {sectors} /dev/vda tswap
dev=/dev/mapper/tswap
ev "device $dev"
"#
                );
            }
        }
        let _ = write!(
            s,
            r#"
mkswap $dev > /dev/null
swapon $dev
ev "swap on $dev: $(grep -F "$(basename $(readlink -f $dev))" /proc/swaps | tr -s ' \t' ' ')"
touch $T/sampling
sampler() {{
    set +e
    n=0
    while [ -e $T/sampling ]; do
        read up _ < /proc/uptime
        while read k v _; do
            case $k in MemFree:) mf=$v;; MemAvailable:) ma=$v;; SwapFree:) sf=$v;; esac
        done < /proc/meminfo
        line="sample t=$up mem_free_kib=$mf mem_avail_kib=$ma swap_free_kib=$sf"
        pid=
        [ -e $T/daemon-pid ] && read pid < $T/daemon-pid
        if [ -n "$pid" ] && [ -r /proc/$pid/status ]; then
            r=; l=; w=; a=
            while read k v _; do
                case $k in VmRSS:) r=$v;; VmLck:) l=$v;; VmSwap:) w=$v;; esac
            done < /proc/$pid/status
            read a < /proc/$pid/oom_score_adj
            line="$line pid=$pid rss_kib=$r lck_kib=$l swap_kib=$w oom_adj=$a"
        fi
        echo "$line"
        n=$((n + 1))
        if [ -n "$pid" ] && [ $((n % 4)) = 0 ]; then
            st=$($U status tswap --json 2>&1)
            echo "daemon-status t=$up $st"
        fi
        sleep {sample}
    done
}}
sampler &
"#,
            sample = self.sample_secs
        );
        for ph in &self.phases {
            let h = ph.hog();
            let (hog, passes, order) = (&h.name, h.passes, &h.order);
            let mib = self.hog_mib(h.ram_x);
            let run_hog = format!(
                "page-hog --name {hog} --mib {mib} --passes {passes} --order {order} --heartbeat-file $T/hb"
            );
            match ph {
                Phase::Overcommit { oom, .. } => {
                    let _ = write!(
                        s,
                        r#"
ev "phase {hog} start: {mib} MiB hog, {passes} passes ({order}), oom={oom}"
"#
                    );
                    if *oom {
                        let _ = write!(
                            s,
                            r#"
{run_hog} --mark 0:100:$T/{hog}.filled --wait-file $T/{hog}.go &
hp=$!
wait_for $T/{hog}.filled
ev "oom hog {hog}-oom start"
set +e
page-hog --name {hog}-oom --oom --oom-score-adj 1000 --heartbeat-file $T/hb
rc=$?
set -e
ev "hog-exit name={hog}-oom rc=$rc"
daemon_check after-oom
touch $T/{hog}.go
"#
                        );
                    } else {
                        let _ = write!(s, "{run_hog} &\nhp=$!\n");
                    }
                    let _ = write!(
                        s,
                        r#"
hog_exit {hog} $hp
rm -f $T/hb
daemon_check after-{hog}
"#
                    );
                }
                Phase::Crash {
                    kill_at: (kp, kpct),
                    ..
                } => {
                    assert!(self.backend.is_ublk(), "the crash phase needs a daemon");
                    let reserve = self.recover_reserve_mib;
                    let _ = write!(
                        s,
                        r#"
ev "phase {hog} start: {mib} MiB hog, {passes} passes ({order}), daemon killed at {kpct}% of pass {kp}"
# Kill and recover from a locked process: the shell's own code may be in swap (see
# kill-and-recover.rs), and the daemon's binary is on the /usr disk.
kill-and-recover --reserve-mib {reserve} $T/{hog}.kill $(cat $T/daemon-pid) 30 -- $U recover tswap &
kr=$!
sleep 1
{run_hog} --mark {kp}:{kpct}:$T/{hog}.kill &
hp=$!
set +e; wait $kr; krc=$?; set -e
daemon_pid > $T/daemon-pid
ev "kill-and-recover rc=$krc, daemon now $(cat $T/daemon-pid)"
daemon_check recovered
hog_exit {hog} $hp
rm -f $T/hb
daemon_check after-{hog}
"#
                    );
                }
            }
        }
        let _ = write!(s, "\nrm -f $T/sampling\n");
        if self.backend.is_ublk() {
            let _ = write!(
                s,
                r#"
daemon_check end
vm_section final-status $U status tswap --json
vm_begin daemon-log
tail -n 40 /run/ublk-crypt/daemon-*.log || true
vm_end daemon-log
"#
            );
        }
        let close = if self.backend.is_ublk() {
            "$U close tswap"
        } else {
            "cryptsetup close tswap"
        };
        let _ = write!(
            s,
            r#"
vm_section vmstat grep -F pswp /proc/vmstat
swapoff $dev
{close}
# Positive control for the host's plaintext scan: stamped pages written raw behind the swap.
page-hog --emit {CONTROL_PAGES} --seed 1 > /tmp/stamps
dd if=/tmp/stamps of=/dev/vda bs=4096 seek={seek} oflag=direct 2> /dev/null
sync
ev end
"#,
            seek = self.swap_mib * 256
        );
        s
    }

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

    fn report(&self, out: &VmOutput, vm: Result<(), String>) -> Report {
        let mut r = Report {
            backend: self.backend,
            vm,
            log_path: out.log_path().to_path_buf(),
            duration: out.duration,
            console_tail: out.console_tail(60),
            ..Report::default()
        };
        for line in out.console.lines() {
            if let Some(i) = line.find("page-hog[") {
                r.hog_line(&line[i..]);
            } else if let Some(rest) = line.strip_prefix("torture: ") {
                r.events.push(rest.to_string());
            } else if line.starts_with("kill-and-recover: ") {
                r.events.push(line.to_string());
            } else if let Some(rest) = line.strip_prefix("sample ") {
                let kv = fields(rest);
                if let Some(lck) = kv.get("lck_kib").and_then(|v| v.parse().ok()) {
                    r.daemon.push(DaemonSample {
                        t: num(&kv, "t"),
                        pid: num(&kv, "pid") as u32,
                        rss_kib: num(&kv, "rss_kib") as u64,
                        lck_kib: lck,
                        swap_kib: num(&kv, "swap_kib") as u64,
                        oom_adj: kv.get("oom_adj").and_then(|v| v.parse().ok()).unwrap_or(0),
                    });
                }
                if let Some(a) = kv.get("mem_avail_kib").and_then(|v| v.parse().ok()) {
                    r.min_mem_avail_kib = r.min_mem_avail_kib.min(a);
                }
            } else if let Some(rest) = line.strip_prefix("daemon-status ") {
                if let Some(p) = PoolSample::parse(rest) {
                    r.pool.push(p);
                }
            } else if line.contains("vm-watchdog:") {
                r.watchdog.push(line.to_string());
            }
        }
        if let Some(final_status) = out.section("final-status") {
            if let Some(p) = PoolSample::parse(&final_status) {
                r.pool.push(p);
            }
        }
        // The kernel prints these at KERN_ERR, so they are on the console (loglevel=5).
        r.oom_kills = out
            .console
            .lines()
            .filter(|l| l.contains("invoked oom-killer") || l.contains("Killed process"))
            .map(str::to_string)
            .collect();
        // Kernel lines only ("[  12.345678] ..."): a tool's own "WARNING:" is not the kernel's.
        let kernel_line = |l: &str| {
            l.strip_prefix('[')
                .and_then(|r| r.split_once(']'))
                .is_some_and(|(ts, _)| ts.trim().parse::<f64>().is_ok())
        };
        r.complaints = out
            .console
            .lines()
            .filter(|l| kernel_line(l))
            .filter(|l| {
                [
                    "BUG:",
                    "WARNING:",
                    "blocked for more than",
                    "soft lockup",
                    "hung_task",
                    "Kernel panic",
                ]
                .iter()
                .any(|k| l.contains(k))
            })
            .map(str::to_string)
            .collect();
        r.vmstat = out.section("vmstat").unwrap_or_default();
        match out.read_disk(0) {
            Ok(disk) => {
                let split = (self.swap_mib << 20) as usize;
                r.stamps_on_backing = Some(count_stamps(&disk[..split.min(disk.len())]));
                r.stamps_in_control = Some(count_stamps(&disk[split.min(disk.len())..]));
            }
            Err(e) => r.scan_error = Some(e.to_string()),
        }
        r.phases = self.phases.clone();
        r.memory_mib = self.memory_mib;
        r.max_gap = self.max_gap.as_secs_f64();
        r.fill_in_exits();
        r
    }
}

fn fields(s: &str) -> BTreeMap<String, String> {
    s.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn num(kv: &BTreeMap<String, String>, k: &str) -> f64 {
    kv.get(k).and_then(|v| v.parse().ok()).unwrap_or(0.0)
}

/// One pass of a hog, from its `pass-end` line.
#[derive(Clone, Debug, Default)]
pub struct PassTime {
    pub pass: u32,
    pub kind: String,
    pub order: String,
    pub secs: f64,
    pub bad: u64,
    pub mbps: f64,
}

/// What one hog printed.
#[derive(Clone, Debug, Default)]
pub struct HogRun {
    pub pid: u32,
    pub mib: u64,
    pub passes: Vec<PassTime>,
    /// `BAD` lines, verbatim.
    pub bad_lines: Vec<String>,
    pub first_t: f64,
    pub last_t: f64,
    /// Longest time between two consecutive lines of this hog, and when it ended.
    pub max_gap: f64,
    pub max_gap_at: f64,
    pub pswpin: (u64, u64),
    pub pswpout: (u64, u64),
    /// `done` (all passes, no bad page), `FAILED` or `oom-not-reached`, if printed.
    pub end: Option<String>,
    /// Exit status, from the script.
    pub rc: Option<i32>,
}

/// One sample of the daemon's /proc/PID/status.
#[derive(Clone, Debug, Default)]
pub struct DaemonSample {
    pub t: f64,
    pub pid: u32,
    pub rss_kib: u64,
    pub lck_kib: u64,
    pub swap_kib: u64,
    pub oom_adj: i32,
}

/// The pool's figures from one `ublk-crypt status --json`.
#[derive(Clone, Debug, Default)]
pub struct PoolSample {
    pub chunks_total: u64,
    pub chunk_bytes: u64,
    pub high_water: u64,
    pub waits: u64,
    pub reserve_hits: u64,
    pub locked: bool,
    pub vm_lck_kib: u64,
    pub vm_rss_kib: u64,
    pub errors: u64,
}

impl PoolSample {
    fn parse(s: &str) -> Option<PoolSample> {
        let get = |k: &str| -> Option<u64> {
            let i = s.find(&format!("\"{k}\":"))? + k.len() + 3;
            let digits: String = s[i..]
                .trim_start()
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse().ok()
        };
        // Per-queue errors: sum every "errors": field.
        let errors = s
            .match_indices("\"errors\":")
            .filter_map(|(i, m)| {
                s[i + m.len()..]
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect::<String>()
                    .parse::<u64>()
                    .ok()
            })
            .sum();
        Some(PoolSample {
            chunks_total: get("chunks_total")?,
            chunk_bytes: get("chunk_bytes")?,
            high_water: get("high_water")?,
            waits: get("waits")?,
            reserve_hits: get("reserve_hits")?,
            locked: s.contains("\"locked\":true"),
            vm_lck_kib: get("vm_lck_kib")?,
            vm_rss_kib: get("vm_rss_kib")?,
            errors,
        })
    }
}

/// Everything a torture run showed.
#[derive(Debug)]
pub struct Report {
    pub backend: Backend,
    /// The VM run's outcome: `Err` with the harness's headline (stall, panic, script failed).
    pub vm: Result<(), String>,
    pub hogs: BTreeMap<String, HogRun>,
    /// `torture: ...` lines of the script (phases, exits, daemon checks, kill, recover).
    pub events: Vec<String>,
    pub daemon: Vec<DaemonSample>,
    pub pool: Vec<PoolSample>,
    pub min_mem_avail_kib: u64,
    /// `invoked oom-killer` / `Killed process` lines from dmesg.
    pub oom_kills: Vec<String>,
    /// Hung tasks, soft lockups, BUG/WARNING, panics.
    pub complaints: Vec<String>,
    /// `vm-watchdog:` lines (heartbeat stale).
    pub watchdog: Vec<String>,
    pub vmstat: String,
    pub stamps_on_backing: Option<usize>,
    pub stamps_in_control: Option<usize>,
    pub scan_error: Option<String>,
    pub console_tail: String,
    pub log_path: PathBuf,
    pub duration: Duration,
    phases: Vec<Phase>,
    memory_mib: u32,
    max_gap: f64,
}

impl Default for Report {
    fn default() -> Report {
        Report {
            backend: Backend::UblkCrypt,
            vm: Ok(()),
            hogs: BTreeMap::new(),
            events: vec![],
            daemon: vec![],
            pool: vec![],
            min_mem_avail_kib: u64::MAX,
            oom_kills: vec![],
            complaints: vec![],
            watchdog: vec![],
            vmstat: String::new(),
            stamps_on_backing: None,
            stamps_in_control: None,
            scan_error: None,
            console_tail: String::new(),
            log_path: PathBuf::new(),
            duration: Duration::ZERO,
            phases: vec![],
            memory_mib: 0,
            max_gap: 60.0,
        }
    }
}

impl Report {
    fn hog_line(&mut self, line: &str) {
        // page-hog[NAME] KIND t=... k=v ...
        let Some(close) = line.find(']') else { return };
        let name = line["page-hog[".len()..close].to_string();
        let rest = line[close + 1..].trim_start();
        let (kind, rest) = rest.split_once(' ').unwrap_or((rest, ""));
        let kv = fields(rest);
        let h = self.hogs.entry(name).or_default();
        let t = num(&kv, "t");
        if t > 0.0 {
            if h.first_t == 0.0 {
                h.first_t = t;
            } else if t - h.last_t > h.max_gap {
                h.max_gap = t - h.last_t;
                h.max_gap_at = t;
            }
            h.last_t = t;
        }
        let (si, so) = (num(&kv, "pswpin") as u64, num(&kv, "pswpout") as u64);
        match kind {
            "start" => {
                h.pid = num(&kv, "pid") as u32;
                h.mib = num(&kv, "mib") as u64;
                h.pswpin = (si, si);
                h.pswpout = (so, so);
            }
            "pass-end" => h.passes.push(PassTime {
                pass: kv
                    .get("pass")
                    .and_then(|p| p.split('/').next()?.parse().ok())
                    .unwrap_or(0),
                kind: kv.get("kind").cloned().unwrap_or_default(),
                order: kv.get("order").cloned().unwrap_or_default(),
                secs: num(&kv, "secs"),
                bad: num(&kv, "bad") as u64,
                mbps: num(&kv, "mbps"),
            }),
            "BAD" => h.bad_lines.push(line.to_string()),
            "done" | "FAILED" | "oom-not-reached" => h.end = Some(kind.to_string()),
            _ => {}
        }
        if kind != "start" && (si, so) != (0, 0) {
            h.pswpin.1 = si;
            h.pswpout.1 = so;
        }
    }

    fn event_field(&self, prefix: &str, key: &str) -> Option<String> {
        self.events
            .iter()
            .filter(|e| e.starts_with(prefix))
            .filter_map(|e| fields(e).get(key).cloned())
            .next_back()
    }

    fn fill_in_exits(&mut self) {
        for e in self.events.clone() {
            if let Some(rest) = e.strip_prefix("hog-exit ") {
                let kv = fields(rest);
                if let (Some(n), Some(rc)) = (kv.get("name"), kv.get("rc")) {
                    self.hogs.entry(n.clone()).or_default().rc = rc.parse().ok();
                }
            }
        }
    }

    /// Every way the run failed the torture; empty means it passed.
    pub fn failures(&self) -> Vec<String> {
        let mut f = vec![];
        if let Err(e) = &self.vm {
            f.push(format!("VM run failed: {e}"));
        }
        for c in &self.complaints {
            f.push(format!("kernel: {c}"));
        }
        let protected = self.backend == Backend::UblkCrypt;
        let crashed = self.phases.iter().any(|p| matches!(p, Phase::Crash { .. }));
        for ph in &self.phases {
            let spec = ph.hog();
            let (hog, ram_x, passes) = (&spec.name, spec.ram_x, spec.passes);
            let oom = matches!(ph, Phase::Overcommit { oom: true, .. });
            let Some(h) = self.hogs.get(hog) else {
                f.push(format!("hog {hog} never started"));
                continue;
            };
            if h.rc != Some(0) {
                f.push(format!("hog {hog} exited with {:?} (0 expected)", h.rc));
            }
            if h.end.as_deref() != Some("done") {
                f.push(format!("hog {hog} did not report done: {:?}", h.end));
            }
            if h.passes.len() != passes as usize + 1 {
                f.push(format!(
                    "hog {hog}: {} of {} passes (fill included)",
                    h.passes.len(),
                    passes + 1
                ));
            }
            let bad: u64 = h.passes.iter().map(|p| p.bad).sum();
            if bad > 0 || !h.bad_lines.is_empty() {
                f.push(format!(
                    "hog {hog}: {bad} bad pages; first: {:?}",
                    h.bad_lines.first()
                ));
            }
            if h.max_gap > self.max_gap {
                f.push(format!(
                    "hog {hog}: no heartbeat for {:.1} s (until t={:.1})",
                    h.max_gap, h.max_gap_at
                ));
            }
            // Swap really used: every writing pass (the fill and each re-stamp) must push out
            // at least what does not fit in RAM.
            let over_pages = u64::from(ram_x.saturating_sub(1)) * u64::from(self.memory_mib) * 256;
            let writing = u64::from(passes); // fill + (passes - 1) re-stamps
            let out = h.pswpout.1.saturating_sub(h.pswpout.0);
            if out < over_pages * writing {
                f.push(format!(
                    "hog {hog}: only {out} pages swapped out, expected at least {} ({writing} writing passes x {over_pages} pages overcommitted)",
                    over_pages * writing
                ));
            }
            if oom {
                let victim = format!("{hog}-oom");
                let v = self.hogs.get(&victim);
                if v.and_then(|v| v.rc) != Some(137) {
                    f.push(format!(
                        "OOM hog {victim} was not SIGKILLed: exit {:?}, end {:?}",
                        v.and_then(|v| v.rc),
                        v.and_then(|v| v.end.clone())
                    ));
                }
                let vpid = v.map_or(0, |v| v.pid);
                let killed: Vec<&String> = self
                    .oom_kills
                    .iter()
                    .filter(|l| l.contains("Killed process"))
                    .collect();
                if !killed
                    .iter()
                    .any(|l| l.contains(&format!("Killed process {vpid} ")))
                {
                    f.push(format!(
                        "the OOM killer did not kill {victim} (pid {vpid}): {killed:?}"
                    ));
                }
                for l in &killed {
                    if !l.contains("(page-hog)") {
                        f.push(format!("the OOM killer killed something else: {l}"));
                    }
                }
            }
        }
        if self.backend.is_ublk() {
            let first = self.event_field("daemon-check when=open", "pid");
            let last = self.event_field("daemon-check when=end", "pid");
            let alive = self.event_field("daemon-check when=end", "alive");
            if alive.as_deref() != Some("1") {
                f.push(format!("daemon not alive at the end: {:?}", self.events));
            }
            if !crashed && first != last {
                f.push(format!("daemon pid changed: {first:?} -> {last:?}"));
            }
            if crashed && first == last {
                f.push("the crash phase did not replace the daemon".into());
            }
            if crashed
                && !self
                    .events
                    .iter()
                    .any(|e| e.starts_with("kill-and-recover: recovered"))
            {
                f.push("the daemon was not recovered after the kill".into());
            }
            if protected {
                for e in self.events.iter().filter(|e| e.starts_with("daemon-check")) {
                    if e.contains("alive=1") && !e.contains("oom_score_adj=-1000") {
                        f.push(format!("daemon not protected from the OOM killer: {e}"));
                    }
                }
                for s in &self.daemon {
                    if s.oom_adj != -1000 {
                        f.push(format!("sample with oom_score_adj {}: {s:?}", s.oom_adj));
                        break;
                    }
                }
            }
            if let Some(p) = self.pool.iter().find(|p| p.errors > 0) {
                f.push(format!("the daemon counted IO errors: {p:?}"));
            }
            if self.pool.is_empty() {
                f.push("no `ublk-crypt status` sample".into());
            }
        }
        for k in &self.oom_kills {
            if k.contains("Killed process") && k.contains("(ublk-crypt)") {
                f.push(format!("the OOM killer killed the daemon: {k}"));
            }
        }
        match (self.stamps_on_backing, self.stamps_in_control) {
            (Some(0), Some(n)) if n == CONTROL_PAGES => {}
            (Some(0), c) => f.push(format!(
                "positive control: {c:?} stamps found behind the swap area, {CONTROL_PAGES} written"
            )),
            (Some(n), _) => f.push(format!("{n} page stamps in PLAINTEXT on the backing")),
            (None, _) => f.push(format!("backing not scanned: {:?}", self.scan_error)),
        }
        f
    }

    /// Max over samples: (VmLck KiB, VmRSS KiB).
    pub fn daemon_peak(&self) -> (u64, u64) {
        (
            self.daemon.iter().map(|s| s.lck_kib).max().unwrap_or(0),
            self.daemon.iter().map(|s| s.rss_kib).max().unwrap_or(0),
        )
    }

    /// The figures, for people: pass times, daemon memory, pool, OOM kills, scan.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "== torture on {} ({:.0} s, VM {}):",
            self.backend.name(),
            self.duration.as_secs_f64(),
            match &self.vm {
                Ok(()) => "ok".to_string(),
                Err(e) => e.clone(),
            }
        );
        for (name, h) in &self.hogs {
            let _ = writeln!(
                s,
                "  hog {name}: {} MiB, exit {:?}, end {:?}, max heartbeat gap {:.1} s, pswpin +{}, pswpout +{}",
                h.mib,
                h.rc,
                h.end,
                h.max_gap,
                h.pswpin.1.saturating_sub(h.pswpin.0),
                h.pswpout.1.saturating_sub(h.pswpout.0)
            );
            for p in &h.passes {
                let _ = writeln!(
                    s,
                    "    pass {} {:<14} {:<6} {:>7.1} s {:>6.1} MB/s bad {}",
                    p.pass, p.kind, p.order, p.secs, p.mbps, p.bad
                );
            }
        }
        if !self.daemon.is_empty() {
            let (lck, rss) = self.daemon_peak();
            let min_lck = self.daemon.iter().map(|s| s.lck_kib).min().unwrap_or(0);
            let swap = self.daemon.iter().map(|s| s.swap_kib).max().unwrap_or(0);
            let _ = writeln!(
                s,
                "  daemon: VmLck {min_lck}..{lck} KiB, VmRSS max {rss} KiB, VmSwap max {swap} KiB, {} samples",
                self.daemon.len()
            );
        }
        if let Some(p) = self.pool.last() {
            let _ = writeln!(
                s,
                "  pool: {} x {} KiB{}, high water {}, waits {}, reserve hits {}, errors {}",
                p.chunks_total,
                p.chunk_bytes >> 10,
                if p.locked { " locked" } else { "" },
                self.pool.iter().map(|p| p.high_water).max().unwrap_or(0),
                p.waits,
                p.reserve_hits,
                p.errors
            );
        }
        if self.min_mem_avail_kib != u64::MAX {
            let _ = writeln!(s, "  MemAvailable min {} KiB", self.min_mem_avail_kib);
        }
        for k in &self.oom_kills {
            let _ = writeln!(s, "  oom: {}", k.trim());
        }
        for e in &self.events {
            let _ = writeln!(s, "  event: {e}");
        }
        for w in self.watchdog.iter().take(10) {
            let _ = writeln!(s, "  {w}");
        }
        for c in self.complaints.iter().take(10) {
            let _ = writeln!(s, "  kernel: {c}");
        }
        let _ = writeln!(
            s,
            "  stamps: {:?} on the backing, {:?} in the control area; log {}",
            self.stamps_on_backing,
            self.stamps_in_control,
            self.log_path.display()
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_scan_finds_every_marker_at_any_offset() {
        let m = stamp_magic();
        assert_eq!(&m, b"PAGE-HOG-STAMP:v");
        let mut d = vec![0u8; 10_000];
        for off in [0, 17, 4096, 9984] {
            d[off..off + 16].copy_from_slice(&m);
        }
        assert_eq!(count_stamps(&d), 4);
        // A cut marker is not one.
        assert_eq!(count_stamps(&d[..4111]), 2);
        assert_eq!(count_stamps(&d[..4112]), 3);
        assert_eq!(count_stamps(&d[1..]), 3);
        d[4100] ^= 1;
        assert_eq!(count_stamps(&d), 3);
    }

    #[test]
    fn hog_lines_are_parsed() {
        let mut r = Report::default();
        r.hog_line(
            "page-hog[a] start t=10.0 pid=7 mib=512 pages=131072 passes=2 pswpin=5 pswpout=9",
        );
        r.hog_line("page-hog[a] hb t=15.0 pass=0/2 kind=fill pages=256/131072 bad=0 mbps=1.0 pswpin=6 pswpout=10");
        r.hog_line("page-hog[a] pass-end t=80.5 pass=0/2 kind=fill order=seq pages=131072 bad=0 secs=70.5 mbps=7.6 pswpin=7 pswpout=70000");
        r.hog_line("page-hog[a] BAD t=81.0 pass=1 page=3 addr=0x1 why=\"checksum mismatch\" pswpin=7 pswpout=70000");
        let h = &r.hogs["a"];
        assert_eq!((h.pid, h.mib), (7, 512));
        assert_eq!(h.passes[0].secs, 70.5);
        assert_eq!(h.pswpout, (9, 70000));
        assert!((h.max_gap - 65.5).abs() < 1e-9);
        assert_eq!(h.bad_lines.len(), 1);
    }

    #[test]
    fn status_json_is_parsed() {
        let s = r#"{"device":{"id":0,"pid":5},"path":"/dev/ublkb0","pool":{"chunk_bytes":65536,"chunks_total":256,"in_use":0,"high_water":17,"waits":3,"reserve_hits":1,"locked":true},"queues":[{"queue":0,"reads":1,"errors":0,"pool_high_water":9,"pool_waits":3}],"vm_rss_kib":22000,"vm_lck_kib":21900}"#;
        let p = PoolSample::parse(s).unwrap();
        assert_eq!((p.high_water, p.waits, p.reserve_hits), (17, 3, 1));
        assert_eq!((p.vm_lck_kib, p.chunks_total, p.errors), (21900, 256, 0));
        assert!(p.locked);
    }
}
