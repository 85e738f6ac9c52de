//! `demo`: ublk-crypt carrying swap for a memory hog far bigger than RAM, in the test VM
//! (run via `scripts/demo`, which builds the release binaries first).
//!
//! In a small qemu guest (Debian's 6.12 kernel, real ublk and dm-crypt): `ublk-crypt open`
//! with a fresh random key, `mkswap` + `swapon` on the device, then a hog that fills several
//! times the guest's RAM and verifies every page it wrote. The hog is `page-hog` (the OOM
//! torture's page-stamping hog) when it is built, else random files on a tmpfs checked by
//! sha256. Then the same disk through ublk-crypt and through dm-crypt, for a throughput
//! comparison, and a summary. The host finally scans the swap backing for the hog's plaintext
//! page marker, which encryption must have hidden.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use ublk_crypt_tests::release_binary;
use ublk_crypt_tests::vm::{vm_or_skip, Vm};

const USAGE: &str = "usage: demo [--mem MIB] [--hog-mib MIB] [--hog page-hog|tmpfs] [--cpus N]

Boots the test VM and shows ublk-crypt as encrypted swap under a memory hog.
Defaults: --mem 160 --hog-mib 400 --cpus 2; --hog page-hog when target/release/page-hog is
built, else tmpfs (random files + sha256).";

/// What the page-hog writes at the start of every page it stamps (see tests/src/bin/page-hog.rs).

#[derive(Debug, Clone, Copy, PartialEq)]
enum Hog {
    PageHog,
    Tmpfs,
}

struct Opts {
    mem: u32,
    hog_mib: u32,
    cpus: u32,
    hog: Hog,
}

fn parse() -> Result<Opts, String> {
    let mut o = Opts {
        mem: 160,
        hog_mib: 400,
        cpus: 2,
        hog: if release_binary("page-hog").is_file() {
            Hog::PageHog
        } else {
            Hog::Tmpfs
        },
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or(format!("{a} needs a value"));
        let num = |s: String| s.parse::<u32>().map_err(|_| format!("not a number: {s}"));
        match a.as_str() {
            "--mem" => o.mem = num(val()?)?,
            "--hog-mib" => o.hog_mib = num(val()?)?,
            "--cpus" => o.cpus = num(val()?)?,
            "--hog" => {
                o.hog = match val()?.as_str() {
                    "page-hog" => Hog::PageHog,
                    "tmpfs" => Hog::Tmpfs,
                    other => return Err(format!("--hog {other}: page-hog or tmpfs")),
                }
            }
            "-h" | "--help" => return Err(String::new()),
            _ => return Err(format!("unknown argument {a}")),
        }
    }
    if o.mem < 128
        || o.hog_mib < o.mem
        || !o.hog_mib.is_multiple_of(16)
        || !(1..=4).contains(&o.cpus)
    {
        return Err(
            "need --mem >= 128, --hog-mib >= --mem and a multiple of 16, --cpus 1..4".into(),
        );
    }
    if o.hog == Hog::PageHog && !release_binary("page-hog").is_file() {
        return Err(format!(
            "{} is not built",
            release_binary("page-hog").display()
        ));
    }
    Ok(o)
}

/// The guest script. util-linux and coreutils tools by full path: busybox's `sh` runs its own
/// applets before anything on `$PATH`, and its `swapon` has no `-p`. Sections (`vm_section`) carry the numbers back to the host.
fn script(o: &Opts) -> String {
    let hog = match o.hog {
        Hog::PageHog => format!(
            "page-hog --name demo --mib {mib} --passes 1 --order seq --heartbeat 5\n\
             echo {pages} > /tmp/pages_verified\n",
            mib = o.hog_mib,
            pages = o.hog_mib * 256,
        ),
        Hog::Tmpfs => format!(
            r#"mkdir -p /mnt/hog && mount -t tmpfs -o size={mib}m tmpfs /mnt/hog
for i in $(seq 1 {n}); do
    dd if=/dev/urandom of=/mnt/hog/f$i bs=1M count=16 2>/dev/null
    sha256sum /mnt/hog/f$i >> /tmp/sums
    echo "hog: wrote $((i * 16)) of {mib} MiB, swap in use $(swap_used_mib) MiB"
done
echo "hog: reading everything back and checking sha256 ..."
ok=$(sha256sum -c /tmp/sums | grep -c ': OK$' || true)
echo "hog: $ok of {n} files intact"
[ "$ok" = {n} ]
echo $((ok * 4096)) > /tmp/pages_verified
rm /mnt/hog/f*
"#,
            mib = o.hog_mib,
            n = o.hog_mib / 16,
        ),
    };
    format!(
        r#"step() {{ echo; echo "==== $*"; }}
swap_used_mib() {{ awk '/^SwapTotal/{{t=$2}} /^SwapFree/{{f=$2}} END{{print int((t-f)/1024)}}' /proc/meminfo; }}
vmstat() {{ awk -v k="$1" '$1==k{{print $2}}' /proc/vmstat; }}
uptime_s() {{ cut -d' ' -f1 /proc/uptime; }}

# The daemon's `portable` XTS tier, as the fio report and the torture run it: qemu's TCG
# offers VAES to the guest but emulates the wide fused tiers lane by lane, so the tier the
# daemon would detect here runs at a fifth of dm-crypt (measured: 35.7 vs 194.9 MB/s writes), a
# figure of the emulator, not of the IO path (bench/README.md, "Why portable in the VM").
export UBLK_CRYPT_XTS_TIER=portable

step "1/4  ublk-crypt serves an encrypted block device over /dev/vda, key from /dev/urandom"
dev=$(ublk-crypt open /dev/vda --key-file /dev/urandom --name swap --sector-size 4096)
echo "$dev: aes-xts-plain64, 512-bit key that exists only in memory (and root's keyring)"
ublk-crypt list

step "2/4  it becomes the swap device of this {mem} MiB machine"
/usr/sbin/mkswap -L demo "$dev" >/dev/null
/usr/sbin/swapon -p 10 "$dev"
cat /proc/swaps
grep -E '^(MemTotal|SwapTotal)' /proc/meminfo

# Peak swap use, sampled every second while the hog runs.
( peak=0; while :; do u=$(swap_used_mib); [ "$u" -gt "$peak" ] && peak=$u && echo $peak > /tmp/peak; sleep 1; done ) &
sampler=$!
out0=$(vmstat pswpout); in0=$(vmstat pswpin); t0=$(uptime_s)

step "3/4  a memory hog of {hog_mib} MiB, every page written and then verified"
{hog}
t1=$(uptime_s); out1=$(vmstat pswpout); in1=$(vmstat pswpin)
kill $sampler
vm_begin hog
echo "pages_verified=$(cat /tmp/pages_verified)"
echo "peak_swap_mib=$(cat /tmp/peak 2>/dev/null || echo 0)"
echo "pswpout=$((out1 - out0))"
echo "pswpin=$((in1 - in0))"
echo "secs=$(awk -v a=$t0 -v b=$t1 'BEGIN{{print b-a}}')"
echo "mem_total_kib=$(awk '/^MemTotal/{{print $2}}' /proc/meminfo)"
vm_end hog
vm_section status ublk-crypt status swap --json

step "4/4  the same disk, 64 MiB in 1 MiB direct IO: ublk-crypt, then dm-crypt"
/usr/sbin/swapoff "$dev"
ublk-crypt close swap
dev=$(ublk-crypt open /dev/vda --key-file /dev/urandom --name cmp --sector-size 4096)
vm_section ublk_write /usr/bin/dd if=/dev/zero of="$dev" bs=1M count=64 oflag=direct
vm_section ublk_read /usr/bin/dd if="$dev" of=/dev/null bs=1M count=64 iflag=direct
ublk-crypt close cmp
cryptsetup open --type plain -c aes-xts-plain64 -s 512 --sector-size 4096 -d /dev/urandom /dev/vda cmp
vm_section dm_write /usr/bin/dd if=/dev/zero of=/dev/mapper/cmp bs=1M count=64 oflag=direct
vm_section dm_read /usr/bin/dd if=/dev/mapper/cmp of=/dev/null bs=1M count=64 iflag=direct
cryptsetup close cmp
echo "demo done"
"#,
        mem = o.mem,
        hog_mib = o.hog_mib,
    )
}

/// `key=value` from a section.
fn field(section: &str, key: &str) -> Option<f64> {
    section
        .lines()
        .find_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.trim().parse().ok())
}

/// MB/s from coreutils dd's last line: `67108864 bytes (67 MB, 64 MiB) copied, 1.2 s, 55.9 MB/s`.
fn dd_mbps(out: &str) -> Option<f64> {
    let line = out.lines().rev().find(|l| l.contains(" copied, "))?;
    let bytes: f64 = line.split_once(" bytes")?.0.trim().parse().ok()?;
    let (_, timing) = line.split_once(" copied, ")?;
    let secs: f64 = timing.split_once(" s")?.0.trim().parse().ok()?;
    (secs > 0.0).then(|| bytes / secs / 1e6)
}

fn mbps(v: Option<f64>) -> String {
    v.map_or("?".into(), |v| format!("{v:.1} MB/s"))
}

fn main() -> ExitCode {
    let o = match parse() {
        Ok(o) => o,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("demo: {e}\n");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let daemon = release_binary("ublk-crypt");
    if !daemon.is_file() {
        eprintln!(
            "demo: {} is not built (scripts/demo builds it)",
            daemon.display()
        );
        return ExitCode::FAILURE;
    }
    if !vm_or_skip("demo") {
        return ExitCode::FAILURE;
    }
    let disk_mib = u64::from(o.hog_mib) + 256;
    println!(
        "ublk-crypt demo: a {} MiB VM (qemu, emulated CPU) swaps a {} MiB memory hog \
         ({:.1}x its memory) onto ublk-crypt.\nHog: {}. Console lines follow, prefixed with \
         [vm seconds]; about two minutes.\n",
        o.mem,
        o.hog_mib,
        f64::from(o.hog_mib) / f64::from(o.mem),
        match o.hog {
            Hog::PageHog => "page-hog (stamps every page, verifies each one)",
            Hog::Tmpfs => "random files on a tmpfs, checked by sha256",
        }
    );
    let mut b = Vm::builder()
        .name("demo")
        .memory_mib(o.mem)
        .cpus(o.cpus)
        .disk_mib(disk_mib)
        .binary(&daemon)
        .host_tool("mkswap")
        .host_tool("swapon")
        .host_tool("swapoff")
        .host_tool("cryptsetup")
        .host_tool("dd")
        .kernel_arg("zswap.enabled=0")
        .stall_timeout(Duration::from_secs(90))
        .timeout(Duration::from_secs(900));
    if o.hog == Hog::PageHog {
        b = b.binary(release_binary("page-hog"));
    }
    let started = Instant::now();
    let out = match b.run(&script(&o)) {
        Ok(out) => out,
        Err(e) => {
            eprintln!("\ndemo: the VM run failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    let wall = started.elapsed();

    let hog = out.section("hog").unwrap_or_default();
    let status = out.section("status").unwrap_or_default();
    let pages = field(&hog, "pages_verified").unwrap_or(0.0);
    let out_mib = field(&hog, "pswpout").unwrap_or(0.0) / 256.0;
    let in_mib = field(&hog, "pswpin").unwrap_or(0.0) / 256.0;
    let secs = field(&hog, "secs").unwrap_or(0.0);
    let mem_mib = field(&hog, "mem_total_kib").unwrap_or(0.0) / 1024.0;
    let stamps = if o.hog == Hog::PageHog {
        // The backing has held every swapped page; none may show the hog's plaintext marker.
        out.read_disk(0)
            .ok()
            .map(|d| ublk_crypt_tests::stamp::count_stamps(&d))
    } else {
        None
    };
    let row = |name: &str, w: &str, r: &str| {
        println!(
            "  {name:<12} {:>12} {:>12}",
            mbps(out.section(w).and_then(|s| dd_mbps(&s))),
            mbps(out.section(r).and_then(|s| dd_mbps(&s)))
        )
    };

    println!("\n================ ublk-crypt demo: summary ================");
    println!(
        "memory hog       {} MiB in a {} MiB VM ({mem_mib:.0} MiB usable RAM): {:.1}x RAM",
        o.hog_mib,
        o.mem,
        f64::from(o.hog_mib) / mem_mib.max(1.0)
    );
    println!(
        "pages verified   {pages:.0} of {} written, every one intact",
        o.hog_mib * 256
    );
    println!(
        "swap used        peak {} MiB on /dev/ublkb0 (ublk-crypt, aes-xts-plain64, fresh key)",
        field(&hog, "peak_swap_mib").unwrap_or(0.0)
    );
    println!(
        "swap traffic     {out_mib:.0} MiB out, {in_mib:.0} MiB in, hog ran {secs:.0} s \
         ({:.1} MB/s of swap IO)",
        (out_mib + in_mib) * 1.048576 / secs.max(0.001)
    );
    if let Some(st) = ublk_crypt_tests::status::StatusSummary::parse(&status) {
        let mib = |chunks: u64| (chunks * st.chunk_bytes) as f64 / 1048576.0;
        println!(
            "daemon memory    {:.1} MiB locked (VmLck), IO pool high water {:.2} of {:.0} MiB",
            st.vm_lck_kib as f64 / 1024.0,
            mib(st.high_water),
            mib(st.chunks_total)
        );
    }
    if let Some(n) = stamps {
        println!("on the backing   {n} plaintext page stamps in the {disk_mib} MiB image (want 0)");
    }
    println!("same disk, 64 MiB, 1 MiB O_DIRECT:");
    println!("  {:<12} {:>12} {:>12}", "", "write", "read");
    row("ublk-crypt", "ublk_write", "ublk_read");
    row("dm-crypt", "dm_write", "dm_read");
    println!(
        "(qemu TCG emulates the CPU: absolute numbers are far below real hardware, where \
         bench/README.md has them; the daemon runs its portable XTS tier here, as the fio \
         report does)\nVM run: {:.0} s ({:.0} s in all); console log: {}",
        out.duration.as_secs_f64(),
        wall.as_secs_f64(),
        out.log_path().display()
    );
    let ok = pages >= f64::from(o.hog_mib * 256) && out_mib > 0.0 && stamps.unwrap_or(0) == 0;
    if !ok {
        eprintln!("demo: something is off: see the summary and the console log above");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_dd_and_sections() {
        let dd = "64+0 records in\n64+0 records out\n\
                  67108864 bytes (67 MB, 64 MiB) copied, 1.16347 s, 57.7 MB/s\n";
        assert!(
            (dd_mbps(dd).unwrap() - 57.679).abs() < 0.01,
            "{:?}",
            dd_mbps(dd)
        );
        assert_eq!(dd_mbps("dd: error writing"), None);
        let hog = "pages_verified=102400\npeak_swap_mib=301\nsecs=74.5";
        assert_eq!(field(hog, "pages_verified"), Some(102400.0));
        assert_eq!(field(hog, "secs"), Some(74.5));
        assert_eq!(field(hog, "pages"), None);
    }

    #[test]
    fn script_uses_the_chosen_hog() {
        let mut o = Opts {
            mem: 160,
            hog_mib: 400,
            cpus: 2,
            hog: Hog::Tmpfs,
        };
        let s = script(&o);
        assert!(s.contains("sha256sum -c") && !s.contains("page-hog"));
        assert!(s.contains("for i in $(seq 1 25)"));
        o.hog = Hog::PageHog;
        let s = script(&o);
        assert!(s.contains("page-hog --name demo --mib 400"));
        assert!(s.contains("echo 102400 > /tmp/pages_verified"));
    }
}
