//! `scripts/torture`: the OOM torture as a benchmark: the same torture on swap over ublk-crypt,
//! kernel dm-crypt and ublk-crypt with its protections off, one VM each, run back to back,
//! with pass times side by side and the daemon's memory and pool figures.
//!
//! ```text
//! torture [--long] [--backends ublk-crypt,dm-crypt,ublk-crypt-unprotected] [--rounds N]
//!         [--crash] [--cpus N] [--ramfs-run-dir] [--reserve-mib N] [--open-args "FLAGS"]
//!         [--orders ORDERS] [--xts-tier portable|aesni|vaes-avx2|detected]
//! ```
//!
//! `--orders scatter,seq` replaces the phases by one 2× RAM hog (no OOM hog) whose passes take
//! those page orders (page-hog `--order`; the last pass verifies): a quick look at one kind
//! of pass, e.g. the scattered swap-in of issue 19.
//!
//! Exit status 1 when a run on ublk-crypt or dm-crypt failed the torture's verdict; the
//! unprotected run is reported, never judged (it is expected to be able to freeze).

use std::process::ExitCode;

use ublk_crypt_tests::torture::{Backend, HogSpec, Phase, Profile, Report, Torture};

fn main() -> ExitCode {
    let mut profile = Profile::Short;
    let mut backends = vec![Backend::DmCrypt, Backend::UblkCrypt];
    let mut rounds = 1;
    let mut crash = false;
    let mut cpus = 2;
    let mut ramfs = false;
    let mut reserve = 0;
    let mut open_args = String::new();
    let mut orders: Option<String> = None;
    let mut xts_tier = "portable".to_string();
    let mut queue_sysfs = String::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--long" => profile = Profile::Long,
            "--crash" => crash = true,
            "--ramfs-run-dir" => ramfs = true,
            "--reserve-mib" => reserve = args.next().and_then(|v| v.parse().ok()).unwrap_or(0),
            "--rounds" => rounds = args.next().and_then(|v| v.parse().ok()).unwrap_or(1),
            "--open-args" => open_args = args.next().unwrap_or_default(),
            "--orders" => orders = args.next(),
            "--xts-tier" => xts_tier = args.next().unwrap_or_default(),
            "--queue-sysfs" => queue_sysfs = args.next().unwrap_or_default(),
            "--cpus" => cpus = args.next().and_then(|v| v.parse().ok()).unwrap_or(2),
            "--backends" => {
                let v = args.next().unwrap_or_default();
                backends = match v
                    .split(',')
                    .map(|b| Backend::parse(b).ok_or(b.to_string()))
                    .collect::<Result<Vec<_>, _>>()
                {
                    Ok(b) => b,
                    Err(b) => {
                        eprintln!("torture: unknown backend {b}");
                        return ExitCode::from(2);
                    }
                };
            }
            _ => {
                eprintln!(
                    "usage: torture [--long] [--backends ublk-crypt,dm-crypt,ublk-crypt-unprotected] [--rounds N] [--crash] [--cpus N] [--ramfs-run-dir] [--reserve-mib N] [--open-args \"FLAGS\"] [--orders ORDERS] [--xts-tier T] [--queue-sysfs \"KEY=VALUE ...\"]"
                );
                return ExitCode::from(2);
            }
        }
    }
    let mut reports: Vec<(String, Report)> = vec![];
    let mut failed = false;
    for round in 1..=rounds {
        for &b in &backends {
            let phases = if let Some(o) = &orders {
                let passes = o.split(',').count() as u32;
                vec![Phase::Overcommit {
                    hog: HogSpec::new("x2", 2, passes, o),
                    oom: false,
                }]
            } else if crash && b.is_ublk() {
                profile.crash_phases()
            } else {
                profile.oom_phases()
            };
            let mut t = Torture::new(b, phases);
            t.cpus = cpus;
            t.ramfs_run_dir = ramfs;
            t.recover_reserve_mib = reserve;
            t.open_args = open_args.clone();
            t.xts_tier = xts_tier.clone();
            t.queue_sysfs = queue_sysfs.clone();
            let label = format!("{}#{round}", b.name());
            t.name = Some(format!("torture-{}-{round}", b.name()));
            eprintln!("torture: running {label} ({profile:?} profile, {cpus} vCPUs)");
            let r = match t.run() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("torture: {label}: VM unavailable: {e}");
                    return ExitCode::from(2);
                }
            };
            let f = r.failures();
            println!("{}", r.summary());
            if f.is_empty() {
                println!("  verdict: PASS");
            } else {
                println!("  verdict: FAIL\n    {}", f.join("\n    "));
                if b != Backend::UblkCryptUnprotected {
                    failed = true;
                }
                if !r.blocked_tasks.is_empty() {
                    println!("  blocked tasks (last dump):\n{}", r.blocked_tasks);
                }
                println!("  last console lines:\n{}", r.console_tail);
            }
            reports.push((label, r));
        }
    }
    print_table(&reports);
    if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// Pass times side by side: one row per (hog, pass), one column per run.
fn print_table(reports: &[(String, Report)]) {
    let mut rows: Vec<(String, u32, String)> = vec![];
    for (_, r) in reports {
        for (name, h) in &r.hogs {
            for p in &h.passes {
                let key = (name.clone(), p.pass, format!("{} {}", p.kind, p.order));
                if !rows.contains(&key) {
                    rows.push(key);
                }
            }
        }
    }
    println!("\n== pass times (s), side by side");
    print!("{:<34}", "hog / pass");
    for (label, _) in reports {
        print!("{label:>26}");
    }
    println!();
    for (hog, pass, what) in &rows {
        print!("{:<34}", format!("{hog} {pass} {what}"));
        for (_, r) in reports {
            let cell = r
                .hogs
                .get(hog)
                .and_then(|h| h.passes.iter().find(|p| p.pass == *pass))
                .map_or("-".to_string(), |p| format!("{:.1}", p.secs));
            print!("{cell:>26}");
        }
        println!();
    }
    print!("{:<34}", "VM run (s)");
    for (_, r) in reports {
        print!("{:>26}", format!("{:.0}", r.duration.as_secs_f64()));
    }
    println!();
    print!("{:<34}", "daemon VmLck max (KiB)");
    for (_, r) in reports {
        let (lck, _) = r.daemon_peak();
        print!(
            "{:>26}",
            if r.daemon.is_empty() {
                "-".into()
            } else {
                lck.to_string()
            }
        );
    }
    println!();
    print!("{:<34}", "pool high water / waits");
    for (_, r) in reports {
        let cell = match r.pool.last() {
            Some(p) => format!(
                "{} / {}",
                r.pool.iter().map(|p| p.high_water).max().unwrap_or(0),
                p.waits
            ),
            None => "-".into(),
        };
        print!("{cell:>26}");
    }
    println!();
    print!("{:<34}", "verdict");
    for (_, r) in reports {
        print!(
            "{:>26}",
            if r.failures().is_empty() {
                "pass"
            } else {
                "FAIL"
            }
        );
    }
    println!();
}
