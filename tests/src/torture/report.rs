//! Judging a torture run: the console's hog, sampler and status lines into a [`Report`], its
//! verdict ([`Report::failures`]) and figures ([`Report::summary`]).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use super::*;

impl Torture {
    /// Reads the run back: the hogs', sampler's and status lines of the console, the kernel's
    /// complaints, and the plaintext scan of the backing.
    pub(super) fn report(&self, out: &VmOutput, vm: Result<(), String>) -> Report {
        let mut r = Report {
            backend: self.backend,
            vm,
            log_path: out.log_path().to_path_buf(),
            duration: out.duration,
            console_tail: out.console_tail(60),
            blocked_tasks: out.blocked_tasks(),
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
        r.takeovers = out
            .section("daemon-log")
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("took device"))
            .map(|l| l.split(" INFO ").last().unwrap_or(l).to_string())
            .collect();
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
        r.takeover_normal_priority = self.takeover_normal_priority;
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
    /// The daemons' "took device N over" log lines (standby takeovers), in order.
    pub takeovers: Vec<String>,
    /// The last blocked-task dump (vm-watchdog's sysrq `w`), one line per task.
    pub blocked_tasks: String,
    pub log_path: PathBuf,
    pub duration: Duration,
    phases: Vec<Phase>,
    takeover_normal_priority: bool,
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
            blocked_tasks: String::new(),
            takeovers: vec![],
            log_path: PathBuf::new(),
            duration: Duration::ZERO,
            phases: vec![],
            takeover_normal_priority: false,
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
            let kills = self
                .phases
                .iter()
                .filter(|p| matches!(p, Phase::Crash { .. }))
                .count();
            let recovered = self
                .events
                .iter()
                .filter(|e| e.starts_with("kill-and-recover: recovered"))
                .count();
            if recovered < kills {
                f.push(format!(
                    "the daemon was recovered after {recovered} of {kills} kills"
                ));
            }
            // Each standby takeover at real-time priority (hardening::SchedPolicy::TAKEOVER),
            // unless the run asked for the normal-priority A/B.
            let want = if self.takeover_normal_priority {
                "at normal priority"
            } else {
                "at real-time priority"
            };
            for t in self.takeovers.iter().filter(|t| !t.contains(want)) {
                f.push(format!("takeover not {want}: {t}"));
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
}
