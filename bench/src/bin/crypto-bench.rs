//! Crypto micro-benchmark: AES-XTS GB/s and cycles per byte on one core, for every tier of
//! ublk-crypt's XTS (portable, aesni, vaes-avx2, vaes-avx512, those the CPU has) next to the
//! distribution's OpenSSL (linked here) and the newest OpenSSL built from source (the
//! `crypto-bench-openssl` binary of bench/openssl-newest, run as a child process on the same
//! core, same minute) — all in one run, one table.
//!
//! `cargo run --release -p ublk-crypt-bench --bin crypto-bench [-- --seconds S] [--markdown]
//! [--openssl-newest PATH] [--tiers vaes-avx512,aesni] [--rounds R]` — S seconds per
//! measurement (default 0.3), R rounds (default 3; each cell keeps its best round). Pin it to one core
//! (`taskset -c 1`): the child inherits the affinity.
//!
//! Units of 512 B, 4 KiB and 64 KiB, both directions, AES-128-XTS and AES-256-XTS. ublk-crypt
//! runs `XtsCipher` on a 64 KiB buffer of such units per call (IV = plain64 of the unit's
//! 512-byte sector), the way the daemon hands it a request; OpenSSL is driven both ways
//! described in `xts_anchor.rs` (`ready`: one EVP call per unit, as `openssl speed -evp`;
//! `iv-reset`: a new IV per unit, as sector-by-sector use needs).
//!
//! Cycles per byte are GB/s converted at the clock `/proc/cpuinfo` reports (`cpu MHz`: the
//! nominal/TSC frequency; in a VM the host's). With turbo the true core clock is higher, so
//! these understate cycles by the same factor for every column: the ratios are exact.

#[path = "../xts_anchor.rs"]
mod xts_anchor;

use std::collections::HashMap;
use std::process::Command;

use ublk_crypt_crypto::{XtsCipher, XtsTier};
use xts_anchor::{bench_key, measure, openssl_xts, Way, BUF, UNITS};

/// One configuration: key bits (XTS, 256 or 512), unit bytes, direction.
type Config = (usize, usize, bool);

struct Anchor {
    version: String,
    /// (config, way) → GB/s.
    gbps: HashMap<(Config, Way), f64>,
}

fn ours(key: &[u8], tier: XtsTier, unit: usize, encrypt: bool, secs: f64) -> f64 {
    let c = XtsCipher::with_tier(key, tier).unwrap();
    let iv_of = |k: usize| {
        let mut iv = [0u8; 16];
        iv[..8].copy_from_slice(&((k * unit / 512) as u64).to_le_bytes());
        iv
    };
    measure(secs, |b| {
        if encrypt {
            c.encrypt(b, unit, iv_of).unwrap()
        } else {
            c.decrypt(b, unit, iv_of).unwrap()
        }
    })
}

/// The newest OpenSSL's figures, from `crypto-bench-openssl` (None if it is not built).
fn newest_openssl(path: &str, secs: f64) -> Option<Anchor> {
    let out = Command::new(path)
        .args(["--seconds", &secs.to_string()])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut a = Anchor {
        version: String::new(),
        gbps: HashMap::new(),
    };
    for line in text.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        match f.as_slice() {
            ["version", v] => a.version = v.to_string(),
            ["row", bits, unit, dir, way, gbps] => {
                let way = if *way == Way::Ready.name() {
                    Way::Ready
                } else {
                    Way::IvReset
                };
                a.gbps.insert(
                    ((bits.parse().ok()?, unit.parse().ok()?, *dir == "enc"), way),
                    gbps.parse().ok()?,
                );
            }
            _ => {}
        }
    }
    Some(a)
}

/// Records `v` for `k` unless an earlier round measured more.
fn keep_best<K: std::hash::Hash + Eq>(map: &mut HashMap<K, f64>, k: K, v: f64) {
    let e = map.entry(k).or_insert(0.0);
    *e = e.max(v);
}

use ublk_crypt_tests::cpuinfo_field as cpu_field;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let secs: f64 = arg("--seconds").and_then(|s| s.parse().ok()).unwrap_or(0.3);
    let rounds: usize = arg("--rounds").and_then(|s| s.parse().ok()).unwrap_or(3);
    let markdown = args.iter().any(|a| a == "--markdown");
    let newest_path = arg("--openssl-newest").unwrap_or_else(|| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/openssl-newest/target/release/crypto-bench-openssl"
        )
        .to_string()
    });

    // `--tiers a,b`: only these tiers (default: every tier the CPU has).
    let only: Option<Vec<XtsTier>> = arg("--tiers").map(|s| {
        s.split(',')
            .map(|t| t.parse().unwrap_or_else(|e| panic!("--tiers: {e}")))
            .collect()
    });
    let tiers: Vec<XtsTier> = XtsTier::ALL
        .into_iter()
        .filter(|t| t.is_supported() && only.as_ref().is_none_or(|o| o.contains(t)))
        .collect();
    let configs: Vec<Config> = [512usize, 256]
        .into_iter()
        .flat_map(|bits| {
            UNITS
                .into_iter()
                .flat_map(move |u| [true, false].map(move |e| (bits, u, e)))
        })
        .collect();

    let mut results: HashMap<(Config, XtsTier), f64> = HashMap::new();
    let mut distro = Anchor {
        version: openssl::version::version().to_string(),
        gbps: HashMap::new(),
    };
    let mut newest: Option<Anchor> = None;
    // Rounds alternate between this process and the newest OpenSSL's, each cell keeping its
    // best round: a disturbance (the other core's load, an SMT sibling) then costs a round,
    // not one column, and the ratios stay fair.
    for _ in 0..rounds {
        for &cfg in &configs {
            let (bits, unit, encrypt) = cfg;
            let key = bench_key(bits / 8);
            for &t in &tiers {
                keep_best(&mut results, (cfg, t), ours(&key, t, unit, encrypt, secs));
            }
            for way in [Way::Ready, Way::IvReset] {
                let g = openssl_xts(&key, unit, encrypt, way, secs);
                keep_best(&mut distro.gbps, (cfg, way), g);
            }
        }
        if let Some(round) = newest_openssl(&newest_path, secs) {
            match &mut newest {
                None => newest = Some(round),
                Some(n) => {
                    for (k, v) in round.gbps {
                        keep_best(&mut n.gbps, k, v);
                    }
                }
            }
        }
    }

    let mhz: Option<f64> = cpu_field("cpu MHz").and_then(|s| s.parse().ok());
    let cpb = |gbps: f64| mhz.map(|m| m / 1000.0 / gbps);
    let cpu = cpu_field("model name").unwrap_or_default();
    let newest_version = newest
        .as_ref()
        .map(|a| a.version.clone())
        .unwrap_or_else(|| format!("not built ({newest_path})"));
    let tier_names: Vec<&str> = tiers.iter().map(|t| t.name()).collect();
    let best = *tiers.last().unwrap();

    println!(
        "CPU: {cpu}; clock for cycles/byte: {} MHz (/proc/cpuinfo); one core, {} KiB buffer per call; \
         best of {rounds} rounds; in use: tier {} (`{}` caps it); distribution: {}; newest: {newest_version}; \
         GB/s (cycles/byte)",
        mhz.map_or("?".into(), |m| format!("{m:.0}")),
        BUF >> 10,
        ublk_crypt_crypto::xts_tier(),
        ublk_crypt_crypto::XTS_TIER_ENV,
        distro.version,
    );
    println!();
    let fmt = |g: Option<f64>| match g {
        Some(g) => match cpb(g) {
            Some(c) => format!("{g:.2} ({c:.2})"),
            None => format!("{g:.2}"),
        },
        None => "–".into(),
    };
    let mut header = vec!["cipher, unit, direction".to_string()];
    header.extend(tier_names.iter().map(|n| n.to_string()));
    header.extend([
        "distro ready".into(),
        "distro iv-reset".into(),
        "newest ready".into(),
        "newest iv-reset".into(),
        format!("{} / newest ready", best.name()),
    ]);
    let rows: Vec<Vec<String>> = configs
        .iter()
        .map(|&cfg| {
            let (bits, unit, encrypt) = cfg;
            let unit_name = if unit >= 1024 {
                format!("{} KiB", unit >> 10)
            } else {
                format!("{unit} B")
            };
            let mut row = vec![format!(
                "AES-{}-XTS {unit_name} {}",
                bits / 2,
                if encrypt { "enc" } else { "dec" }
            )];
            row.extend(tiers.iter().map(|&t| fmt(results.get(&(cfg, t)).copied())));
            let n = |way| {
                newest
                    .as_ref()
                    .and_then(|a| a.gbps.get(&(cfg, way)).copied())
            };
            row.push(fmt(distro.gbps.get(&(cfg, Way::Ready)).copied()));
            row.push(fmt(distro.gbps.get(&(cfg, Way::IvReset)).copied()));
            row.push(fmt(n(Way::Ready)));
            row.push(fmt(n(Way::IvReset)));
            row.push(match n(Way::Ready) {
                Some(o) => format!("{:.2}×", results[&(cfg, best)] / o),
                None => "–".into(),
            });
            row
        })
        .collect();
    if markdown {
        println!("| {} |", header.join(" | "));
        println!("|---|{}", "---:|".repeat(header.len() - 1));
        for r in &rows {
            println!("| {} |", r.join(" | "));
        }
    } else {
        let widths: Vec<usize> = (0..header.len())
            .map(|i| {
                rows.iter()
                    .map(|r| r[i].chars().count())
                    .chain([header[i].chars().count()])
                    .max()
                    .unwrap()
            })
            .collect();
        let line = |cells: &[String]| {
            cells
                .iter()
                .zip(&widths)
                .enumerate()
                .map(|(i, (c, w))| {
                    let pad = w - c.chars().count();
                    if i == 0 {
                        format!("{c}{}", " ".repeat(pad))
                    } else {
                        format!("{}{c}", " ".repeat(pad))
                    }
                })
                .collect::<Vec<_>>()
                .join("  ")
        };
        println!("{}", line(&header));
        for r in &rows {
            println!("{}", line(r));
        }
    }
    println!();
    println!(
        "ublk-crypt: one XtsCipher call per {} KiB buffer of units (tweak encrypted once per unit); \
         OpenSSL ready = one EVP update per unit on a ready context (`openssl speed -evp`); \
         iv-reset = a new IV per unit (sector by sector). CBC-ESSIV is not shown (`ublk-crypt benchmark` \
         has it): its encryption is serial within a sector by nature.",
        BUF >> 10
    );
}
