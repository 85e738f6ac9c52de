//! The page-stamping memory hog of the OOM torture (`tests/tests/oom_torture.rs`).
//!
//! Fills N pages of anonymous memory, each stamped with a magic marker, its index, its
//! address, a generation number, the hog's seed and a checksum over the whole page; the rest of
//! each page is pseudo-random (per page and per generation), so pages are incompressible,
//! distinct, and never the zero pages Linux 6.12 keeps out of swap. Then, pass after pass, it
//! re-reads every page in an order that defeats LRU (sequential over more than RAM, a random
//! permutation, a stride, scattered 1 MiB apart, reversed), checks its stamp and re-stamps it with the next
//! generation, so every pass forces swap-in and swap-out of most pages. The last pass only
//! verifies. A stale page (lost write), a misplaced page (wrong index or address), a zeroed
//! page or a flipped bit are all "bad"; any bad page makes the exit status 1.
//!
//! It is not mlocked and raises its own `oom_score_adj` (+500 by default), so the OOM killer
//! takes hogs before anything else. `--oom` asks for more than RAM + swap, in small mappings
//! that each pass the kernel's overcommit heuristic, and fills until it is killed.
//!
//! Output, one line each, `key=value` after the `page-hog[NAME]` tag (parsed by the test):
//! * `start`: size, seed, pid;
//! * `mark`: a `--mark PASS:PERCENT:PATH` file was created (PASS 0 is the fill; a script
//!   waits for these to act at a known point of a pass);
//! * `hb`: heartbeat every `--heartbeat` seconds within a pass (`wait` while waiting for
//!   `--wait-file` before the last pass);
//! * `pass-end`: after every pass, with its duration;
//! * `BAD`: a bad page (the first 20 of each pass);
//! * `done` / `FAILED`: the summary.
//!
//! Every line has `t=` (the guest's CLOCK_MONOTONIC), `pswpin=`/`pswpout=` (/proc/vmstat).
//! `--heartbeat-file` has its mtime touched at every heartbeat (vm-watchdog watches it).
//!
//! The magic marker is kept XOR-masked in the binary and unmasked at run time, so the only
//! plaintext copies of it in the guest are the stamped pages themselves (the host scans the
//! swap backing for it).

use std::ffi::CString;
use std::io::Write;
use std::process::ExitCode;
use std::time::Instant;

const PAGE: usize = 4096;
const WORDS: usize = PAGE / 8;
const OFF_INDEX: usize = 2; // words
const OFF_ADDR: usize = 3;
const OFF_GEN: usize = 4;
const OFF_SEED: usize = 5;
const OFF_SUM: usize = 6;
const OFF_FILL: usize = 8;

/// The stamp's marker as two words (`ublk_crypt_tests::stamp`: kept masked in the binary).
fn magic() -> [u64; 2] {
    let m = ublk_crypt_tests::stamp::magic();
    [
        u64::from_le_bytes(m[..8].try_into().unwrap()),
        u64::from_le_bytes(m[8..].try_into().unwrap()),
    ]
}

/// splitmix64: seeds the per-page fill.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Checksum over all 512 words of a page with the checksum word taken as 0; four independent
/// lanes so it is cheap even under TCG.
fn checksum(p: &[u64; WORDS]) -> u64 {
    const K: [u64; 4] = [
        0x9e37_79b9_7f4a_7c15,
        0xc2b2_ae3d_27d4_eb4f,
        0x1656_67b1_9e37_79f9,
        0x85eb_ca77_c2b2_ae63,
    ];
    let mut h = [1u64, 2, 3, 4];
    for (i, c) in p.chunks_exact(4).enumerate() {
        for l in 0..4 {
            let w = if i * 4 + l == OFF_SUM { 0 } else { c[l] };
            h[l] = (h[l] ^ w).wrapping_mul(K[l]).rotate_left(29);
        }
    }
    mix(h[0] ^ h[1].rotate_left(16) ^ h[2].rotate_left(32) ^ h[3].rotate_left(48))
}

fn stamp(p: &mut [u64; WORDS], index: u64, addr: u64, gen: u64, seed: u64) {
    let m = magic();
    p[0] = m[0];
    p[1] = m[1];
    p[OFF_INDEX] = index;
    p[OFF_ADDR] = addr;
    p[OFF_GEN] = gen;
    p[OFF_SEED] = seed;
    p[OFF_SUM] = 0;
    p[7] = 0;
    // xorshift64*, seeded per page and generation: every generation rewrites every byte.
    let mut x = mix(seed ^ mix(index ^ mix(gen))) | 1;
    for w in &mut p[OFF_FILL..] {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        *w = x.wrapping_mul(0x2545_f491_4f6c_dd1d);
    }
    p[OFF_SUM] = checksum(p);
}

/// Why a page is bad, or `None` when it verifies.
fn check(p: &[u64; WORDS], index: u64, addr: u64, gen: u64, seed: u64) -> Option<String> {
    let m = magic();
    if p.iter().all(|&w| w == 0) {
        return Some("zero-filled page".into());
    }
    if p[0] != m[0] || p[1] != m[1] {
        return Some(format!("no magic (first words {:#x} {:#x})", p[0], p[1]));
    }
    let mut why = vec![];
    if p[OFF_SEED] != seed {
        why.push(format!("seed {:#x} (another hog's page)", p[OFF_SEED]));
    }
    if p[OFF_INDEX] != index {
        why.push(format!("index {}", p[OFF_INDEX]));
    }
    if p[OFF_ADDR] != addr {
        why.push(format!("addr {:#x}", p[OFF_ADDR]));
    }
    if p[OFF_GEN] != gen {
        why.push(format!("generation {} (expected {gen})", p[OFF_GEN]));
    }
    if checksum(p) != p[OFF_SUM] {
        why.push("checksum mismatch".into());
    }
    (!why.is_empty()).then(|| why.join(", "))
}

struct Opts {
    name: String,
    mib: Option<u64>,
    passes: u32,
    oom: bool,
    oom_extra_mib: u64,
    seed: u64,
    oom_score_adj: i32,
    heartbeat_secs: f64,
    heartbeat_file: Option<String>,
    marks: Vec<(u64, usize, String)>,
    wait_file: Option<String>,
    orders: Vec<Order>,
    emit: Option<u64>,
    thp: bool,
}

#[derive(Clone, Copy, Debug)]
enum Order {
    Seq,
    Rev,
    Stride,
    /// Page `k * 257 mod N`: neighbours 1 MiB + 4 KiB apart, so the pages that swap readahead
    /// reads around each fault (VMA readahead: the faulting address's neighbours) sit in swap
    /// slots written at other times: many small scattered reads per fault (issue 19).
    Scatter,
    Random,
}

impl Order {
    fn name(self) -> &'static str {
        match self {
            Order::Seq => "seq",
            Order::Rev => "rev",
            Order::Stride => "stride",
            Order::Scatter => "scatter",
            Order::Random => "random",
        }
    }
}

/// Page `i * s mod n` for i in 0..n, with `s` the first odd number from `start` coprime with n:
/// every page once.
fn coprime_stride(n: usize, start: usize) -> Vec<u32> {
    let gcd = |mut a: usize, mut b: usize| {
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    };
    let mut s = start;
    while gcd(s, n) != 1 {
        s += 2;
    }
    (0..n).map(|i| ((i * s) % n) as u32).collect()
}

const USAGE: &str =
    "usage: page-hog [--name NAME] [--mib N | --oom [--oom-extra-mib N]] [--passes N]
                [--order seq,random,stride,scatter,rev] [--seed N] [--oom-score-adj N]
                [--heartbeat SECS] [--heartbeat-file PATH] [--mark PASS:PERCENT:PATH]...
                [--wait-file PATH] [--thp]
       page-hog --emit N [--seed N]    (N stamped pages to stdout: a scanner's positive control)";

fn parse() -> Result<Opts, String> {
    let mut o = Opts {
        name: "hog".into(),
        mib: None,
        passes: 2,
        oom: false,
        oom_extra_mib: 64,
        seed: mix(std::process::id() as u64 ^ now_ns()),
        oom_score_adj: 500,
        heartbeat_secs: 5.0,
        heartbeat_file: None,
        marks: vec![],
        wait_file: None,
        orders: vec![Order::Seq, Order::Random, Order::Stride, Order::Rev],
        emit: None,
        thp: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or(format!("{a} needs a value"));
        let num = |s: String| s.parse::<u64>().map_err(|e| format!("{s}: {e}"));
        match a.as_str() {
            "--name" => o.name = val()?,
            "--mib" => o.mib = Some(num(val()?)?),
            "--passes" => o.passes = num(val()?)? as u32,
            "--oom" => o.oom = true,
            "--oom-extra-mib" => o.oom_extra_mib = num(val()?)?,
            "--seed" => o.seed = num(val()?)?,
            "--oom-score-adj" => {
                o.oom_score_adj = val()?.parse().map_err(|e| format!("{e}"))?;
            }
            "--heartbeat" => o.heartbeat_secs = val()?.parse().map_err(|e| format!("{e}"))?,
            "--heartbeat-file" => o.heartbeat_file = Some(val()?),
            "--mark" => {
                let v = val()?;
                let mut it = v.splitn(3, ':');
                let (Some(p), Some(pct), Some(path)) = (it.next(), it.next(), it.next()) else {
                    return Err(format!("--mark {v}: PASS:PERCENT:PATH expected"));
                };
                o.marks.push((
                    num(p.to_string())?,
                    num(pct.to_string())?.min(100) as usize,
                    path.to_string(),
                ));
            }
            "--wait-file" => o.wait_file = Some(val()?),
            "--thp" => o.thp = true,
            "--emit" => o.emit = Some(num(val()?)?),
            "--order" => {
                o.orders = val()?
                    .split(',')
                    .map(|s| match s {
                        "seq" => Ok(Order::Seq),
                        "rev" => Ok(Order::Rev),
                        "stride" => Ok(Order::Stride),
                        "scatter" => Ok(Order::Scatter),
                        "random" => Ok(Order::Random),
                        _ => Err(format!("unknown order {s}")),
                    })
                    .collect::<Result<_, _>>()?;
                if o.orders.is_empty() {
                    return Err("--order: empty".into());
                }
            }
            "-h" | "--help" => return Err(String::new()),
            _ => return Err(format!("unknown argument {a}")),
        }
    }
    if o.mib.is_none() && !o.oom && o.emit.is_none() {
        return Err("--mib or --oom is required".into());
    }
    Ok(o)
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// The guest's CLOCK_MONOTONIC, seconds (what the host compares heartbeat gaps with).
fn mono() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// `(pswpin, pswpout)` from /proc/vmstat.
fn swap_counters() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/vmstat").unwrap_or_default();
    let get = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or(0)
    };
    (get("pswpin"), get("pswpout"))
}

fn meminfo_kib(key: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    text.lines()
        .find_map(|l| {
            l.strip_prefix(key)?
                .strip_prefix(':')?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// Anonymous memory: one or more private mappings, not locked.
struct Region {
    maps: Vec<(*mut [u64; WORDS], usize)>, // (first page, pages)
    pages: usize,
}

impl Region {
    fn map(pages: usize, piece_pages: usize, thp: bool) -> Result<Region, String> {
        let mut maps = vec![];
        let mut left = pages;
        while left > 0 {
            let n = left.min(piece_pages);
            // SAFETY: a fresh anonymous private mapping; nothing else refers to it.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    n * PAGE,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(format!(
                    "mmap of {} MiB failed: {}",
                    (n * PAGE) >> 20,
                    std::io::Error::last_os_error()
                ));
            }
            if !thp {
                // 4 KiB pages: swap works page by page, as for most of a real system's memory.
                // SAFETY: advice on the mapping just created.
                unsafe { libc::madvise(p, n * PAGE, libc::MADV_NOHUGEPAGE) };
            }
            maps.push((p as *mut [u64; WORDS], n));
            left -= n;
        }
        Ok(Region { maps, pages })
    }

    /// Page `i` (a pointer into the mapping, valid as long as `self`) and its address.
    fn page(&self, mut i: usize) -> (*mut [u64; WORDS], u64) {
        for &(p, n) in &self.maps {
            if i < n {
                // SAFETY: i < n: within this mapping.
                let pg = unsafe { p.add(i) };
                return (pg, pg as u64);
            }
            i -= n;
        }
        unreachable!("page index out of range")
    }
}

struct Hog {
    o: Opts,
    region: Region,
    hb_fd: Option<libc::c_int>,
    start: Instant,
}

impl Hog {
    fn line(&self, what: &str, rest: std::fmt::Arguments) {
        let (si, so) = swap_counters();
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "page-hog[{}] {what} t={:.1} {rest} pswpin={si} pswpout={so}",
            self.o.name,
            mono()
        );
        let _ = out.flush();
        if let Some(fd) = self.hb_fd {
            // SAFETY: futimens with NULL sets the open file's times to now.
            unsafe { libc::futimens(fd, std::ptr::null()) };
        }
    }

    fn order(&self, pass: u32) -> (Order, Vec<u32>) {
        let n = self.region.pages;
        let ord = self.o.orders[(pass as usize) % self.o.orders.len()];
        let v: Vec<u32> = match ord {
            Order::Seq => (0..n as u32).collect(),
            Order::Rev => (0..n as u32).rev().collect(),
            // A stride about n/7 and coprime with n visits every page once.
            Order::Stride => coprime_stride(n, (n / 7).max(1) | 1),
            // 257 is prime: coprime with n unless n is a multiple of it.
            Order::Scatter => coprime_stride(n, 257),
            Order::Random => {
                let mut v: Vec<u32> = (0..n as u32).collect();
                let mut x = mix(self.o.seed ^ pass as u64) | 1;
                for i in (1..n).rev() {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    v.swap(i, (x % (i as u64 + 1)) as usize);
                }
                v
            }
        };
        (ord, v)
    }

    /// One pass: `gen` 0 fills (writes generation 1); otherwise verifies generation `gen` and,
    /// unless `last`, re-stamps with `gen + 1`. Returns the number of bad pages.
    fn pass(&self, gen: u64, last: bool, total_passes: u32) -> u64 {
        let n = self.region.pages;
        let (ord, order) = if gen == 0 {
            (Order::Seq, (0..n as u32).collect())
        } else {
            self.order(gen as u32 - 1)
        };
        let kind = if gen == 0 {
            "fill"
        } else if last {
            "verify"
        } else {
            "verify+restamp"
        };
        let t0 = Instant::now();
        let mut last_hb = t0;
        let mut last_done = 0usize;
        let mut bad = 0u64;
        let mut reported = 0;
        // --mark: files to create when this pass reaches a share of its pages.
        let marks: Vec<(usize, &str)> = self
            .o
            .marks
            .iter()
            .filter(|m| m.0 == gen)
            .map(|m| (n * m.1 / 100, m.2.as_str()))
            .collect();
        for (done, &i) in order.iter().enumerate() {
            for &(at, path) in &marks {
                if done == at {
                    self.mark(path, gen);
                }
            }
            let (p, addr) = self.region.page(i as usize);
            // SAFETY: a page of our mapping, alive as long as `self`; this single-threaded loop
            // holds the only reference to it.
            let p = unsafe { &mut *p };
            if gen > 0 {
                if let Some(why) = check(p, i as u64, addr, gen, self.o.seed) {
                    bad += 1;
                    if reported < 20 {
                        reported += 1;
                        self.line(
                            "BAD",
                            format_args!("pass={gen} page={i} addr={addr:#x} why=\"{why}\""),
                        );
                    }
                }
            }
            if gen == 0 || !last {
                stamp(p, i as u64, addr, gen + 1, self.o.seed);
            }
            if done % 256 == 255 {
                let now = Instant::now();
                let dt = now.duration_since(last_hb).as_secs_f64();
                if dt >= self.o.heartbeat_secs {
                    let mbps = ((done + 1 - last_done) * PAGE) as f64 / dt / 1e6;
                    self.line(
                        "hb",
                        format_args!(
                            "pass={gen}/{total_passes} kind={kind} order={} pages={}/{n} bad={bad} mbps={mbps:.1}",
                            ord.name(),
                            done + 1
                        ),
                    );
                    last_hb = now;
                    last_done = done + 1;
                }
            }
        }
        for &(at, path) in &marks {
            if at >= n {
                self.mark(path, gen);
            }
        }
        let secs = t0.elapsed().as_secs_f64();
        self.line(
            "pass-end",
            format_args!(
                "pass={gen}/{total_passes} kind={kind} order={} pages={n} bad={bad} secs={secs:.1} mbps={:.1}",
                ord.name(),
                (n * PAGE) as f64 / secs.max(1e-9) / 1e6
            ),
        );
        bad
    }
}

impl Hog {
    fn mark(&self, path: &str, gen: u64) {
        let _ = std::fs::write(path, b"mark\n");
        self.line("mark", format_args!("pass={gen} file={path}"));
    }

    /// Before the last (verify-only) pass: waits until `--wait-file` exists, heartbeating,
    /// so that pass sees what another phase (an OOM kill) left.
    fn wait_for_file(&self) {
        let Some(f) = &self.o.wait_file else { return };
        let t0 = Instant::now();
        let mut last_hb = t0;
        while !std::path::Path::new(f).exists() {
            std::thread::sleep(std::time::Duration::from_millis(250));
            if last_hb.elapsed().as_secs_f64() >= self.o.heartbeat_secs {
                last_hb = Instant::now();
                self.line(
                    "wait",
                    format_args!("for={f} secs={:.1}", t0.elapsed().as_secs_f64()),
                );
            }
        }
    }
}

fn set_oom_score_adj(v: i32) -> Result<(), String> {
    std::fs::write("/proc/self/oom_score_adj", v.to_string())
        .map_err(|e| format!("cannot set oom_score_adj to {v}: {e}"))
}

fn emit(o: &Opts, pages: u64) -> ExitCode {
    let mut p = Box::new([0u64; WORDS]);
    let mut out = std::io::stdout().lock();
    for i in 0..pages {
        stamp(&mut p, i, 0, 1, o.seed);
        let bytes: Vec<u8> = p.iter().flat_map(|w| w.to_le_bytes()).collect();
        if out.write_all(&bytes).is_err() {
            return ExitCode::from(2);
        }
    }
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let o = match parse() {
        Ok(o) => o,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("page-hog: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    if let Some(n) = o.emit {
        return emit(&o, n);
    }
    if let Err(e) = set_oom_score_adj(o.oom_score_adj) {
        eprintln!("page-hog: {e}");
        return ExitCode::from(2);
    }
    let mib = match (o.mib, o.oom) {
        (Some(m), _) => m,
        (None, _) => {
            // More than everything there is: RAM + swap + a margin.
            (meminfo_kib("MemTotal") + meminfo_kib("SwapTotal")) / 1024 + o.oom_extra_mib
        }
    };
    let pages = (mib as usize) << 20 >> 12;
    // --oom: 16 MiB mappings, each far below what the overcommit heuristic refuses at once.
    let piece = if o.oom { 4096 } else { pages.max(1) };
    let region = match Region::map(pages, piece, o.thp) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("page-hog: {e}");
            return ExitCode::from(2);
        }
    };
    let hb_fd = o.heartbeat_file.as_ref().map(|path| {
        let c = CString::new(path.as_str()).expect("path without NUL");
        // SAFETY: open with a valid C string.
        unsafe { libc::open(c.as_ptr(), libc::O_WRONLY | libc::O_CREAT, 0o644) }
    });
    let hog = Hog {
        o,
        region,
        hb_fd: hb_fd.filter(|&fd| fd >= 0),
        start: Instant::now(),
    };
    let passes = if hog.o.oom { 0 } else { hog.o.passes };
    hog.line(
        "start",
        format_args!(
            "pid={} mib={mib} pages={pages} passes={passes} oom={} seed={:#x} oom_score_adj={} mem_total_kib={} swap_total_kib={}",
            std::process::id(),
            hog.o.oom,
            hog.o.seed,
            hog.o.oom_score_adj,
            meminfo_kib("MemTotal"),
            meminfo_kib("SwapTotal")
        ),
    );
    let mut bad = hog.pass(0, passes == 0, passes);
    if hog.o.oom {
        // Everything there is was filled and nobody was killed: the OOM phase did not happen.
        hog.line(
            "oom-not-reached",
            format_args!("secs={:.1}", hog.start.elapsed().as_secs_f64()),
        );
        return ExitCode::from(3);
    }
    for gen in 1..=passes as u64 {
        if gen == passes as u64 {
            hog.wait_for_file();
        }
        bad += hog.pass(gen, gen == passes as u64, passes);
    }
    let secs = hog.start.elapsed().as_secs_f64();
    if bad == 0 {
        hog.line("done", format_args!("passes={passes} bad=0 secs={secs:.1}"));
        ExitCode::SUCCESS
    } else {
        hog.line(
            "FAILED",
            format_args!("passes={passes} bad={bad} secs={secs:.1}"),
        );
        ExitCode::from(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_verifies_and_detects_damage() {
        let mut p = Box::new([0u64; WORDS]);
        stamp(&mut p, 7, 0x1000, 3, 42);
        assert_eq!(check(&p, 7, 0x1000, 3, 42), None);
        assert!(check(&p, 7, 0x1000, 4, 42)
            .unwrap()
            .contains("generation 3"));
        assert!(check(&p, 8, 0x1000, 3, 42).unwrap().contains("index 7"));
        assert!(check(&p, 7, 0x1000, 3, 43).unwrap().contains("another hog"));
        for word in [0, 6, 100, 511] {
            let mut q = p.clone();
            q[word] ^= 1 << 17;
            assert!(check(&q, 7, 0x1000, 3, 42).is_some(), "flip in word {word}");
        }
        assert_eq!(
            check(&[0u64; WORDS], 7, 0x1000, 3, 42).unwrap(),
            "zero-filled page"
        );
    }

    #[test]
    fn generations_rewrite_the_whole_page() {
        let mut a = Box::new([0u64; WORDS]);
        let mut b = Box::new([0u64; WORDS]);
        stamp(&mut a, 1, 0, 1, 9);
        stamp(&mut b, 1, 0, 2, 9);
        let same = a[OFF_FILL..]
            .iter()
            .zip(&b[OFF_FILL..])
            .filter(|(x, y)| x == y)
            .count();
        assert_eq!(same, 0);
    }

    #[test]
    fn the_stamp_starts_with_the_shared_marker() {
        let m = magic();
        let bytes: Vec<u8> = m.iter().flat_map(|w| w.to_le_bytes()).collect();
        assert_eq!(&bytes, b"PAGE-HOG-STAMP:v");
    }
}
