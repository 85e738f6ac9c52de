//! fio side by side, in one VM boot: the raw virtio disk, kernel dm-crypt and ublk-crypt (same
//! cipher and key size, identical disks), plus ublk-crypt with batched IO commands (`--batch-io`,
//! on kernels that have them: the A/B against its default per-request commands), with
//! 4096-byte sectors, with two queues, and with two threads on its one queue (per-IO daemons,
//! where the kernel has them); the daemon's memory at idle and under load (default and
//! --depth 128); and the crypto micro-benchmark. Prints a table and writes Markdown and JSON to bench/results/.
//!
//! `scripts/bench [--kernel 6.12|newest] [--runtime SECS] [--xts-tier TIER|detected]` (builds
//! the release binaries, then runs this once per kernel: the kernel is the harness's
//! `UBLK_CRYPT_VM_KERNEL`; the daemon's XTS tier in the VM is `portable` unless told otherwise).
//! Each kernel's table goes to `bench/results/latest-<kernel>.{md,json}`; `latest.md` holds
//! them all. dm-crypt runs twice per sector size: as `cryptsetup` sets it up, and with both
//! no-workqueue flags (what users pick for NVMe), the two anchors of every ratio.
//!
//! Under TCG every absolute figure is slow and host-dependent; only ratios inside one run mean
//! anything, which is why every device runs in the same boot, one after the other.

use std::fmt::Write as _;
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use ublk_crypt_tests::vm::{KernelChoice, Vm, VmEnv};
use ublk_crypt_tests::{release_binary, workspace_root};

struct Job {
    name: &'static str,
    args: &'static str,
}

const JOBS: [Job; 8] = [
    Job {
        name: "seq-write-1M-qd1",
        args: "--rw=write --bs=1M --iodepth=1",
    },
    Job {
        name: "seq-read-1M-qd1",
        args: "--rw=read --bs=1M --iodepth=1",
    },
    Job {
        name: "seq-write-1M-qd8",
        args: "--rw=write --bs=1M --iodepth=8",
    },
    Job {
        name: "seq-read-1M-qd8",
        args: "--rw=read --bs=1M --iodepth=8",
    },
    Job {
        name: "randwrite-4k-qd1",
        args: "--rw=randwrite --bs=4k --iodepth=1",
    },
    Job {
        name: "randwrite-4k-qd32",
        args: "--rw=randwrite --bs=4k --iodepth=32",
    },
    Job {
        name: "randread-4k-qd1",
        args: "--rw=randread --bs=4k --iodepth=1",
    },
    Job {
        name: "randread-4k-qd32",
        args: "--rw=randread --bs=4k --iodepth=32",
    },
];

/// dm-crypt as users tune it for fast disks: no kcryptd queueing of reads or writes (the AES
/// runs in the submitter's or the completion's context).
const NO_WORKQUEUE: &str = "--perf-no_read_workqueue --perf-no_write_workqueue";

/// ublk-crypt with `--batch-io` (batched ublk IO commands, 7.0+): the A/B against the default
/// per-request commands, on kernels that have them (elsewhere the open is refused and the
/// device left out).
const BATCHED: &str = "ublk-crypt-batch";
/// ublk-crypt with two threads serving its one queue (`--threads-per-queue 2`, the kernel's
/// per-IO daemons, 6.16+): the A/B against one thread, where the kernel has them.
const TWO_THREADS: &str = "ublk-crypt-2t";
/// The rows of devices that only some kernels have: left out where the open was refused.
const OPTIONAL: [&str; 2] = [BATCHED, TWO_THREADS];

/// (label, guest commands that open it and set $dev, commands that close it)
const DEVICES: [(&str, &str, &str); 10] = [
    ("raw", "dev=/dev/vda", ":"),
    (
        "dm-crypt",
        "cryptsetup open --type plain -c aes-xts-plain64 -s 512 --key-file /root/key /dev/vdb dm; dev=/dev/mapper/dm",
        "cryptsetup close dm",
    ),
    (
        "dm-crypt-nowq",
        "cryptsetup open --type plain -c aes-xts-plain64 -s 512 $NOWQ --key-file /root/key /dev/vdb dm; dev=/dev/mapper/dm",
        "cryptsetup close dm",
    ),
    (
        "ublk-crypt",
        "dev=$(ublk-crypt open /dev/vdc -c aes-xts-plain64 -s 512 --key-file /root/key --name b)",
        "ublk-crypt close b",
    ),
    (
        BATCHED,
        "dev=$(ublk-crypt open /dev/vdc -c aes-xts-plain64 -s 512 --key-file /root/key --name b --batch-io 2>/dev/null) || dev=",
        "ublk-crypt close b",
    ),
    (
        "dm-crypt-4k",
        "cryptsetup open --type plain -c aes-xts-plain64 -s 512 --sector-size 4096 --key-file /root/key /dev/vdb dm; dev=/dev/mapper/dm",
        "cryptsetup close dm",
    ),
    (
        "dm-crypt-4k-nowq",
        "cryptsetup open --type plain -c aes-xts-plain64 -s 512 --sector-size 4096 $NOWQ --key-file /root/key /dev/vdb dm; dev=/dev/mapper/dm",
        "cryptsetup close dm",
    ),
    (
        "ublk-crypt-4k",
        "dev=$(ublk-crypt open /dev/vdc -s 512 --sector-size 4096 --key-file /root/key --name b)",
        "ublk-crypt close b",
    ),
    (
        "ublk-crypt-2q",
        "dev=$(ublk-crypt open /dev/vdc -s 512 --queues 2 --key-file /root/key --name b)",
        "ublk-crypt close b",
    ),
    (
        TWO_THREADS,
        "dev=$(ublk-crypt open /dev/vdc -s 512 --threads-per-queue 2 --key-file /root/key --name b 2>/dev/null) || dev=",
        "ublk-crypt close b",
    ),
];

/// The dm-crypt rows a device's ratios are taken against: default and no-workqueue, with the
/// same sector size.
fn anchors(label: &str) -> (&'static str, &'static str) {
    if label.contains("-4k") {
        ("dm-crypt-4k", "dm-crypt-4k-nowq")
    } else {
        ("dm-crypt", "dm-crypt-nowq")
    }
}

fn guest_script(runtime: u64, xts_tier: &str) -> String {
    let mut s = match xts_tier {
        "detected" => String::new(),
        t => format!("export UBLK_CRYPT_XTS_TIER={t}\n"),
    };
    let _ = writeln!(s, "NOWQ='{NO_WORKQUEUE}'");
    s += r#"
mem() {  # LABEL: VmRSS and VmLck of the daemon (its record's pid: the standby is one too), KiB
    p=$(grep -o '"pid": *[0-9]*' /run/ublk-crypt/*.json | grep -o '[0-9]*$')
    echo "$1 $(grep -F VmRSS /proc/$p/status | tr -s ' ' | cut -d' ' -f2) $(grep -F VmLck /proc/$p/status | tr -s ' ' | cut -d' ' -f2)"
}
vm_section env sh -c 'uname -r; grep -m1 "model name" /proc/cpuinfo; nproc; fio --version'
# Which AES each side runs: the kernel's highest-priority xts(aes) driver, the guest CPU's AES
# flags (the kernel's VAES path also needs VPCLMULQDQ), ublk-crypt's backend (from its status).
vm_section aes-kernel awk '/^name/ {n=$3} /^driver/ {d=$3} /^priority/ {if (n == "xts(aes)" && $3 > b) {b=$3; bd=d}} END {print bd}' /proc/crypto
vm_section cpu-flags sh -c 'grep -m1 "^flags" /proc/cpuinfo | tr " " "\n" | grep -xE "aes|pclmulqdq|avx2|avx512f|vaes|vpclmulqdq" | tr "\n" " "; echo'
"#;
    for (label, open, close) in DEVICES {
        let _ = writeln!(
            s,
            "{open}\nif [ -n \"$dev\" ]; then\necho \"device {label}: $dev\""
        );
        if label == "ublk-crypt" {
            s += "vm_section mem-default-idle mem idle\n";
            s += "vm_section status-ublk ublk-crypt status b --json\n";
        }
        for job in &JOBS {
            let _ = writeln!(
                s,
                "fio --name=j --filename=$dev --direct=1 --ioengine=io_uring --size=256M \
                 --time_based --runtime={runtime} --ramp_time=1 {} --output-format=json > /tmp/f.json",
                job.args
            );
            let _ = writeln!(s, "vm_section 'fio {label} {}' cat /tmp/f.json", job.name);
        }
        if label == "ublk-crypt" {
            // Memory under load: sampled in the middle of a QD32 random-write run.
            let _ = writeln!(
                s,
                "fio --name=j --filename=$dev --direct=1 --ioengine=io_uring --size=256M --time_based \
                 --runtime=6 --rw=randwrite --bs=64k --iodepth=64 --output-format=terse > /dev/null &\n\
                 sleep 4; vm_section mem-default-load mem load; wait"
            );
        }
        if label == BATCHED {
            s += "vm_section status-batch ublk-crypt status b\n";
        }
        let _ = writeln!(s, "{close}\nfi");
    }
    // Memory of a deep queue: --depth 128 under 128-deep load.
    s += r#"
dev=$(ublk-crypt open /dev/vdc -s 512 --depth 128 --key-file /root/key --name b)
vm_section mem-depth128-idle mem idle
fio --name=j --filename=$dev --direct=1 --ioengine=io_uring --size=256M --time_based --runtime=6 --rw=randwrite --bs=64k --iodepth=128 --output-format=terse > /dev/null &
sleep 4; vm_section mem-depth128-load mem load; wait
ublk-crypt close b
echo bench done
"#;
    s
}

#[derive(Default, Clone)]
struct Result1 {
    iops: f64,
    mbps: f64,
    mean_us: f64,
    p99_us: f64,
}

fn parse_fio(text: &str) -> Result1 {
    let start = text.find('{').expect("fio JSON");
    let v: Value = serde_json::from_str(&text[start..]).expect("fio JSON");
    let job = &v["jobs"][0];
    let side = if job["write"]["io_bytes"].as_u64().unwrap_or(0) > 0 {
        &job["write"]
    } else {
        &job["read"]
    };
    Result1 {
        iops: side["iops"].as_f64().unwrap_or(0.0),
        mbps: side["bw_bytes"].as_f64().unwrap_or(0.0) / 1e6,
        mean_us: side["clat_ns"]["mean"].as_f64().unwrap_or(0.0) / 1e3,
        p99_us: side["clat_ns"]["percentile"]["99.000000"]
            .as_f64()
            .unwrap_or(0.0)
            / 1e3,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let runtime: u64 = args
        .iter()
        .position(|a| a == "--runtime")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(6);
    // The daemon's XTS tier in the VM. TCG emulates every AES instruction, and the wide fused
    // tiers most slowly (bench/results/history.md, run H): with the detected `vaes-avx2` the
    // report measured the emulator, not the IO path. `portable` is what this VM runs fastest;
    // `--xts-tier detected` leaves the daemon's own choice.
    let xts_tier = args
        .iter()
        .position(|a| a == "--xts-tier")
        .and_then(|i| args.get(i + 1))
        .map_or("portable", String::as_str)
        .to_string();
    let key: Vec<u8> = (0..64u32).map(|i| (i * 53 + 9) as u8).collect();
    eprintln!(
        "fio-bench: {} devices x {} jobs x {runtime} s in one VM boot",
        DEVICES.len(),
        JOBS.len()
    );
    let out = Vm::builder()
        .name("fio-bench")
        .memory_mib(1024)
        .cpus(2)
        .disk_mib(1024)
        .disk_mib(1024)
        .disk_mib(1024)
        .binary(release_binary("ublk-crypt"))
        .host_tool("cryptsetup")
        .host_tool("fio")
        .file("/root/key", key)
        .stall_timeout(Duration::from_secs(120))
        .timeout(Duration::from_secs(3000))
        .run(&guest_script(runtime, &xts_tier))
        .unwrap_or_else(|e| panic!("{e}"));

    let env = out.section("env").unwrap_or_default();
    let qemu = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_default();
    let host_cpu = ublk_crypt_tests::host_cpu_model();

    let kernel = VmEnv::get()
        .map(|e| e.choice)
        .unwrap_or(KernelChoice::Debian12);
    let mut results = serde_json::Map::new();
    let get = |label: &str, job: &str| {
        parse_fio(
            &out.section(&format!("fio {label} {job}"))
                .unwrap_or_default(),
        )
    };
    // ublk-crypt's AES backend and the ublk features in use, from its status.
    let status = out
        .section("status-ublk")
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .unwrap_or_default();
    let aes_ublk = format!(
        "{}, XTS tier {}",
        status["aes_backend"].as_str().unwrap_or("?"),
        status["xts_tier"].as_str().unwrap_or("?")
    );
    let features = |k: &str| -> String {
        status["ublk_features"][k]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_else(|| "?".into())
    };
    let (in_use, offered) = (features("in_use"), features("offered"));
    let aes_kernel = out
        .section("aes-kernel")
        .unwrap_or_default()
        .trim()
        .to_string();
    let cpu_flags = out
        .section("cpu-flags")
        .unwrap_or_default()
        .trim()
        .to_string();
    let release = env.lines().next().unwrap_or("?").to_string();

    let mut md = String::new();
    let _ = writeln!(
        md,
        "## Kernel {release} (`UBLK_CRYPT_VM_KERNEL={}`)\n",
        kernel.name()
    );
    let _ = writeln!(md, "Host CPU: {host_cpu} · {qemu} · 2 vCPUs, 1 GiB, virtio disks `cache=none`, `direct=1`, `ioengine=io_uring`, {runtime} s per job.\n");
    let _ = writeln!(
        md,
        "AES: ublk-crypt `{aes_ublk}`, dm-crypt `{aes_kernel}` · guest CPU AES flags: {cpu_flags}\n"
    );
    let _ = writeln!(
        md,
        "ublk features in use: {in_use} (the kernel offers: {offered})\n"
    );
    let _ = writeln!(
        md,
        "| job | device | IOPS | MB/s | mean µs | p99 µs | vs dm-crypt | vs no-wq |"
    );
    let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|");
    let mut table = format!("kernel {release}\n");
    let _ = writeln!(
        table,
        "{:<20} {:<17} {:>9} {:>8} {:>10} {:>10} {:>8} {:>8}",
        "job", "device", "IOPS", "MB/s", "mean us", "p99 us", "vs dm", "vs nowq"
    );
    for job in &JOBS {
        for (label, _, _) in DEVICES {
            if OPTIONAL.contains(&label)
                && out.section(&format!("fio {label} {}", job.name)).is_none()
            {
                continue;
            }
            let r = get(label, job.name);
            let (dm, nowq) = anchors(label);
            let ratio = |anchor: &str| {
                let a = get(anchor, job.name);
                if a.iops > 0.0 {
                    r.iops / a.iops
                } else {
                    0.0
                }
            };
            let (vs_dm, vs_nowq) = (ratio(dm), ratio(nowq));
            let _ = writeln!(
                md,
                "| {} | {label} | {:.0} | {:.1} | {:.0} | {:.0} | {:.2}× | {:.2}× |",
                job.name, r.iops, r.mbps, r.mean_us, r.p99_us, vs_dm, vs_nowq
            );
            let _ = writeln!(
                table,
                "{:<20} {:<17} {:>9.0} {:>8.1} {:>10.0} {:>10.0} {:>7.2}x {:>7.2}x",
                job.name, label, r.iops, r.mbps, r.mean_us, r.p99_us, vs_dm, vs_nowq
            );
            results.insert(format!("{label}/{}", job.name), json!({"iops": r.iops, "mb_s": r.mbps, "mean_us": r.mean_us, "p99_us": r.p99_us, "ratio_vs_dm_crypt": vs_dm, "ratio_vs_dm_crypt_nowq": vs_nowq}));
        }
    }
    let _ = writeln!(md, "\nRatios: against dm-crypt with the same sector size (512, or 4096 for `-4k` rows), in its default configuration and with `{NO_WORKQUEUE}` (`-nowq`).\n");
    // The A/Bs of the features only newer kernels have, where this one has them: each row
    // against `ublk-crypt` (per-request commands, one thread per queue) in the same boot.
    for (label, what, short) in [
        (
            BATCHED,
            "Batched ublk IO commands (`ublk-crypt --batch-io`, `UBLK_F_BATCH_IO`)",
            "batched",
        ),
        (
            TWO_THREADS,
            "Two threads serving the one queue (`ublk-crypt --threads-per-queue 2`, per-IO daemons)",
            "two threads",
        ),
    ] {
        let ran = JOBS
            .iter()
            .any(|j| out.section(&format!("fio {label} {}", j.name)).is_some());
        if !ran {
            continue;
        }
        let _ = writeln!(
            md,
            "{what} against the default (`ublk-crypt`), same boot:\n\n| job | default MB/s | {short} MB/s | {short} / default |\n|---|---:|---:|---:|"
        );
        let _ = writeln!(table, "{label} / ublk-crypt:");
        for job in &JOBS {
            let (a, b) = (get("ublk-crypt", job.name), get(label, job.name));
            let ratio = if a.iops > 0.0 { b.iops / a.iops } else { 0.0 };
            let _ = writeln!(
                md,
                "| {} | {:.1} | {:.1} | {ratio:.2}× |",
                job.name, a.mbps, b.mbps
            );
            let _ = writeln!(table, "  {:<20} {ratio:>6.2}x", job.name);
            results.insert(format!("{label}-vs-ublk-crypt/{}", job.name), json!(ratio));
        }
        let _ = writeln!(md);
    }
    if let Some(line) = out
        .section("status-batch")
        .unwrap_or_default()
        .lines()
        .find(|l| l.contains("batched IO:"))
    {
        let _ = writeln!(
            md,
            "Requests per batched command over the whole batched run (its `status`): `{}`\n",
            line.trim()
        );
    }
    let _ = writeln!(
        md,
        "ublk-crypt daemon memory (KiB):\n\n| configuration | RSS | VmLck |\n|---|---:|---:|"
    );
    let mut mem = serde_json::Map::new();
    for key in [
        "mem-default-idle",
        "mem-default-load",
        "mem-depth128-idle",
        "mem-depth128-load",
    ] {
        let line = out.section(key).unwrap_or_default();
        let f: Vec<&str> = line.split_whitespace().collect();
        let (rss, lck) = (
            f.get(1).copied().unwrap_or("?"),
            f.get(2).copied().unwrap_or("?"),
        );
        let _ = writeln!(md, "| {} | {rss} | {lck} |", key.trim_start_matches("mem-"));
        mem.insert(
            key.to_string(),
            json!({"rss_kib": rss.parse::<u64>().ok(), "vmlck_kib": lck.parse::<u64>().ok()}),
        );
        let _ = writeln!(
            table,
            "memory {:<22} RSS {rss:>6} KiB  VmLck {lck:>6} KiB",
            key.trim_start_matches("mem-")
        );
    }
    let crypto = Command::new(release_binary("crypto-bench"))
        .arg("--markdown")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_else(|| "(crypto-bench not built)".into());
    print!("{table}\n{crypto}");

    // One file per kernel; latest.md puts every kernel's table (6.12 first) over the crypto one.
    let dir = workspace_root().join("bench/results");
    std::fs::create_dir_all(&dir).unwrap();
    let name = kernel.name();
    std::fs::write(dir.join(format!("latest-{name}.md")), &md).unwrap();
    let report = json!({"kernel": name, "env": env, "aes_ublk": aes_ublk, "aes_kernel": aes_kernel, "cpu_flags": cpu_flags, "ublk_features_in_use": in_use, "ublk_features_offered": offered, "qemu": qemu, "host_cpu": host_cpu, "runtime_s": runtime, "fio": results, "memory": mem, "crypto_markdown": crypto});
    std::fs::write(
        dir.join(format!("latest-{name}.json")),
        serde_json::to_string_pretty(&report).unwrap(),
    )
    .unwrap();
    let mut all = String::from(
        "# fio side by side (one TCG VM boot per kernel)\n\n\
         **Under TCG every figure is emulated and slow; only ratios inside one boot mean anything.** \
         Made by `scripts/bench` (both kernels) or `scripts/bench --kernel 6.12|newest`.\n\n",
    );
    for k in KernelChoice::ALL {
        if let Ok(part) = std::fs::read_to_string(dir.join(format!("latest-{}.md", k.name()))) {
            all += &part;
            all += "\n";
        }
    }
    let _ = writeln!(
        all,
        "## Crypto micro-benchmark (host, one core)\n\n{crypto}"
    );
    std::fs::write(dir.join("latest.md"), &all).unwrap();
    eprintln!("wrote {}", dir.join("latest.md").display());
}
