//! What the systemd units do, played in the VM (which has no systemd): the daemon unit's
//! `ExecStart=` and the swap unit's `ExecStartPre=`/`ExecStart=`/`ExecStop=` lines, taken from
//! `systemd/*.service` and expanded with `systemd/examples/swap.conf` the way systemd expands
//! them, then `Restart=always` after a `kill -9` under swap load, and the clean stop.
//!
//! It checks the claims the units rest on: the swap unit's lines make working swap and take it
//! down again; running the daemon's *same* command again after it died re-attaches to the
//! device (`open --id`) with the key kept in the keyring — not a new one from `/dev/urandom`,
//! which would turn every page into garbage — so the data survives; and SIGTERM (systemctl
//! stop) leaves no device, record or key behind.
//!
//! The crash happens with the swap off. With swap on and pages in it, whatever restarts the
//! daemon must not itself wait for a swapped-out page: here the supervising shell, its state on
//! /tmp (tmpfs) and the daemon binary (initramfs) are all swappable, and the guest deadlocks —
//! under systemd, PID 1 and the binary's file system are the equivalent (see systemd/README.md).

use std::collections::HashMap;
use std::time::Duration;

use ublk_crypt_tests::vm::{vm_or_skip, Vm};
use ublk_crypt_tests::workspace_root;

fn read(rel: &str) -> String {
    std::fs::read_to_string(workspace_root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// `KEY=value` lines of an environment file.
fn env_file(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().trim_matches('"').to_string()))
        .collect()
}

/// The values of `key=` in a unit, in order.
fn unit_lines(unit: &str, key: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(str::to_string)
        .collect()
}

/// systemd's expansion of a command line: `%i`, `${VAR}`, `$VAR` as a word of its own (split
/// at whitespace), `$$` → `$`. The program's absolute path is kept unless it is ublk-crypt
/// (in the guest it is /vm/bin/ublk-crypt, on $PATH).
fn expand(line: &str, instance: &str, env: &HashMap<String, String>) -> String {
    const DOLLAR: &str = "\u{1}";
    let mut s = line.replace("$$", DOLLAR).replace("%i", instance);
    for (k, v) in env {
        s = s.replace(&format!("${{{k}}}"), v);
    }
    let words: Vec<String> = s
        .split(' ')
        .map(|w| match w.strip_prefix('$') {
            Some(var) if env.contains_key(var) => env[var].clone(),
            _ => w.to_string(),
        })
        .collect();
    let s = words.join(" ");
    assert!(!s.contains("${"), "unexpanded variable in {s}");
    let s = s.replace(DOLLAR, "$");
    s.replace("/usr/local/sbin/ublk-crypt", "ublk-crypt")
}

#[test]
fn unit_commands_recover_after_kill_9_and_stop_cleanly() {
    if !vm_or_skip("unit_commands_recover_after_kill_9_and_stop_cleanly") {
        return;
    }
    let daemon_unit = read("systemd/ublk-crypt@.service");
    let swap_unit = read("systemd/ublk-crypt-swap@.service");
    let mut conf: Vec<(String, String)> = env_file(&read("systemd/examples/swap.conf"));
    for (k, v) in conf.iter_mut() {
        if k == "BACKING" {
            *v = "/dev/vda".into();
        }
    }
    // Environment= defaults of the swap unit first, the config file overrides them.
    let mut env: HashMap<String, String> = HashMap::new();
    for line in unit_lines(&swap_unit, "Environment") {
        for kv in line.split_whitespace() {
            let (k, v) = kv.split_once('=').unwrap();
            env.insert(k.into(), v.into());
        }
    }
    env.extend(conf.iter().cloned());
    let id = env["ID"].clone();

    let exec_start = unit_lines(&daemon_unit, "ExecStart");
    assert_eq!(exec_start.len(), 1);
    let daemon_cmd = expand(&exec_start[0], "swap", &env);
    let swap_start: Vec<String> = unit_lines(&swap_unit, "ExecStartPre")
        .iter()
        .chain(&unit_lines(&swap_unit, "ExecStart"))
        .map(|l| expand(l, "swap", &env))
        .collect();
    let swap_stop: Vec<String> = unit_lines(&swap_unit, "ExecStop")
        .iter()
        .map(|l| expand(l, "swap", &env))
        .collect();
    let exports: String = env
        .iter()
        .map(|(k, v)| format!("export {k}='{v}'\n"))
        .collect();

    let script = format!(
        r#"{exports}
swap_used_mib() {{ awk '/^SwapTotal/{{t=$2}} /^SwapFree/{{f=$2}} END{{print int((t-f)/1024)}}' /proc/meminfo; }}
# ExecStart= of ublk-crypt@swap.service, in the background as systemd runs it.
start_daemon() {{ {daemon_cmd} > /tmp/daemon.$1.log 2>&1 & echo $! > /tmp/daemon.pid; }}
serving() {{ kill -0 $(cat /tmp/daemon.pid) 2>/dev/null && ublk-crypt list | grep -q ' serving'; }}

echo "unit: {daemon_cmd}"
start_daemon 1
n=0; until serving; do n=$((n + 1)); [ $n -lt 30 ] || {{ cat /tmp/daemon.1.log; exit 1; }}; sleep 1; done
cat /tmp/daemon.1.log

# ublk-crypt-swap@swap.service start
{swap_start}
grep ublkb{id} /proc/swaps

# Swap in use: 16 MiB random files on a tmpfs bigger than RAM, each with its sha256.
mkdir -p /mnt/big && mount -t tmpfs -o size=400m tmpfs /mnt/big
for i in $(seq 1 16); do
    dd if=/dev/urandom of=/mnt/big/f$i bs=1M count=16 2>/dev/null
    sha256sum /mnt/big/f$i >> /tmp/sums
    echo "wrote $i, swap used $(swap_used_mib) MiB"
done
vm_section verified sh -c "sha256sum -c /tmp/sums | grep -c ': OK$'"
vm_section swapped sh -c "grep -E '^pswp(in|out) ' /proc/vmstat"
rm /mnt/big/f*

# systemctl stop ublk-crypt-swap@swap: its ExecStop.
{swap_stop}
grep -q ublkb{id} /proc/swaps && {{ echo "still swapping"; exit 1; }}

# Crash and Restart=always, with data on the device (not swap: see the module doc).
dd if=/dev/urandom of=/tmp/data bs=1M count=32 2>/dev/null
dd if=/tmp/data of=/dev/ublkb{id} bs=1M oflag=direct 2>/dev/null
old=$(cat /tmp/daemon.pid)
echo "kill -9 $old"
kill -9 $old
wait $old || true   # reap it: a zombie would still look alive in /proc
n=1
until serving; do
    sleep 1   # RestartSec=1s
    n=$((n + 1)); [ $n -le 20 ] || {{ echo "no recovery"; exit 1; }}
    echo "restart $n"
    start_daemon $n
    sleep 2
done
echo "restart $n serving (was $old, now $(cat /tmp/daemon.pid))"
vm_section restart-log cat /tmp/daemon.$n.log
dd if=/dev/ublkb{id} of=/tmp/back bs=1M count=32 iflag=direct 2>/dev/null
cmp /tmp/data /tmp/back && echo "data intact after the restart"

# systemctl stop ublk-crypt@swap: SIGTERM.
pid=$(cat /tmp/daemon.pid)
kill -TERM $pid
rc=0; wait $pid || rc=$?
echo "daemon exit status $rc"
[ $rc = 0 ]
[ ! -e /sys/class/ublk-char/ublkc{id} ] || {{ echo "device left behind"; exit 1; }}
[ -z "$(ls /run/ublk-crypt/*.json 2>/dev/null)" ] || {{ echo "record left behind"; exit 1; }}
grep -q ublk-crypt /proc/keys && {{ echo "key left in the keyring"; exit 1; }}
echo "units ok"
"#,
        swap_start = swap_start.join("\n"),
        swap_stop = swap_stop.join("\n"),
    );

    let out = Vm::builder()
        .memory_mib(192)
        .disk_mib(512)
        .binary(ublk_crypt_tests::release_binary("ublk-crypt"))
        .host_tool("mkswap")
        .host_tool("swapon")
        .kernel_arg("zswap.enabled=0")
        .timeout(Duration::from_secs(600))
        .run(&script)
        .unwrap_or_else(|e| panic!("{e}"));
    // The restarted daemon re-attached (recovery), it did not make a new device.
    let log = out.section("restart-log").unwrap();
    assert!(log.contains("re-attaching"), "{log}");
    assert_eq!(
        out.section("verified").unwrap().trim(),
        "16",
        "every file intact"
    );
    let swapped = out.section("swapped").unwrap();
    let pswpout: u64 = swapped
        .lines()
        .find_map(|l| l.strip_prefix("pswpout "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    let pswpin: u64 = swapped
        .lines()
        .find_map(|l| l.strip_prefix("pswpin "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    assert!(pswpout > 10_000, "swap was really used: {swapped}");
    assert!(pswpin > 1_000, "swapped pages were read back: {swapped}");
    assert!(out.console.contains("units ok"));
}
