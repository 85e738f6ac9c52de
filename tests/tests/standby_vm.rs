//! The standby (daemon/src/standby.rs) on real ublk, as swap under a 2× RAM page-stamping hog:
//! five `kill -9` of the daemon in a row, each time the standby taking over and a new standby
//! following; the standby itself killed; `upgrade` twice; and the hog verifying every page.
//! Kills at chosen points of a hog's fill and random re-stamp, with nothing else running, are
//! the OOM torture's crash phases (oom_torture.rs).

use std::time::Duration;
use ublk_crypt_tests::vm::{vm_or_skip, Vm};

/// Shell helpers for device `sb` (id 0): the daemon's pid (from its record), the ready
/// standby's pid, and a wait for a ready standby.
const HELPERS: &str = r#"
primary() { grep -o '"pid": *[0-9]*' /run/ublk-crypt/0.json | grep -o '[0-9]*$'; }
ready_standby() {
    ublk-crypt status sb --json 2>/dev/null | grep -o '"standby":{"pid":[0-9]*,"ready":true' |
        grep -o '[0-9][0-9]*'
}
wait_ready_standby() {
    for i in $(seq 600); do
        s=$(ready_standby || true)
        if [ -n "$s" ] && [ "$s" != "$1" ]; then echo $s; return 0; fi
        sleep 0.1
    done
    echo "no ready standby after 60 s" >&2; ublk-crypt status sb >&2; return 1
}
wait_new_primary() {
    for i in $(seq 600); do
        q=$(primary || true)
        if [ -n "$q" ] && [ "$q" != "$1" ] && ublk-crypt status sb --json 2>/dev/null |
            grep -q '"last_takeover":{'; then return 0; fi
        sleep 0.05
    done
    echo "no new daemon after 30 s" >&2; return 1
}
takeover() { ublk-crypt status sb --json | grep -o '"last_takeover":{[^}]*}'; }
"#;

#[test]
fn standby_takes_over_after_kills_and_upgrades_under_a_hog_losing_nothing() {
    if !vm_or_skip("standby_takes_over_after_kills_and_upgrades_under_a_hog_losing_nothing") {
        return;
    }
    let script = format!(
        r#"{HELPERS}
        dev=$(ublk-crypt open /dev/vda --key-file /dev/urandom --name sb)
        mkswap $dev > /dev/null
        swapon $dev
        s=$(wait_ready_standby 0)
        vm_section first ublk-crypt status sb
        # Its heartbeats on the console: a silent console is how the harness detects a hang.
        # If they stop for 30 s, the mlocked watchdog dumps blocked tasks and memory every 10 s,
        # and crashes the guest after 90 s: a freeze fails with its stacks in the log.
        touch /tmp/heartbeat
        vm-watchdog 10 wm --heartbeat /tmp/heartbeat 30 90 &
        page-hog --name h --mib 512 --passes 3 --order seq,rev,seq --mark 1:5:/tmp/deep \
            --heartbeat 5 --heartbeat-file /tmp/heartbeat &
        hog=$!
        # In its first re-stamp: every page has been in swap, swap-ins and swap-outs go on.
        while [ ! -e /tmp/deep ]; do
            kill -0 $hog 2>/dev/null || {{ set +e; wait $hog; echo "hog ended early: $?"; exit 1; }}
            sleep 0.5
        done
        echo "hog deep in swap: $(grep -E '^pswp(in|out) ' /proc/vmstat | tr '\n' ' ')"
        for k in 1 2 3 4 5; do
            p=$(primary)
            kill -9 $p
            wait_new_primary $p
            echo "kill $k: daemon $p -> $(primary) (was standby $s) $(takeover)"
            [ "$(primary)" = "$s" ] || {{ echo "the standby did not take over"; exit 1; }}
            s=$(wait_ready_standby $s)
            echo "kill $k: new standby $s"
        done
        # The standby killed: the daemon serves on and starts another.
        kill -9 $s
        s2=$(wait_ready_standby $s)
        echo "standby $s killed, replaced by $s2"
        # Upgrade twice, from another path the second time (a new binary).
        cp /vm/bin/ublk-crypt /tmp/ublk-crypt-new
        for bin in ublk-crypt /tmp/ublk-crypt-new; do
            p=$(primary)
            $bin upgrade sb > /tmp/upgrade.log 2>&1 || {{ cat /tmp/upgrade.log; exit 1; }}
            echo "upgrade: $(cat /tmp/upgrade.log)"
            [ "$(primary)" != "$p" ] || {{ echo "upgrade left the daemon in place"; exit 1; }}
            takeover
            wait_ready_standby 0 > /dev/null
        done
        readlink /proc/$(primary)/exe
        kill -0 $hog && echo "all done while the hog ran"
        set +e; wait $hog; rc=$?; set -e
        echo "hog-exit $rc"
        rm /tmp/heartbeat
        vm_section last ublk-crypt status sb
        swapoff $dev
        ublk-crypt close sb
        sleep 1
        if pidof ublk-crypt; then echo "LEFTOVER process after close"; exit 1; fi
        grep -c ublk-crypt /proc/keys && {{ echo "key left in the keyring"; exit 1; }} || true
        echo standby ok
        "#
    );
    let out = Vm::builder()
        .binary(ublk_crypt_tests::release_binary("ublk-crypt"))
        .binary(ublk_crypt_tests::release_binary("page-hog"))
        .binary(ublk_crypt_tests::release_binary("vm-watchdog"))
        .host_tool("mkswap")
        .host_tool("swapon")
        .host_tool("swapoff")
        .memory_mib(256)
        .disk_mib(768)
        .timeout(Duration::from_secs(900))
        .run(&script)
        .unwrap_or_else(|e| panic!("{e}"));
    let c = &out.console;
    for k in 1..=5 {
        assert!(c.contains(&format!("kill {k}: new standby")), "kill {k}");
    }
    assert!(c.contains("killed, replaced by"));
    assert_eq!(
        c.matches("\"kind\":\"crash\"").count(),
        5,
        "five crash takeovers"
    );
    assert_eq!(c.matches("\"kind\":\"upgrade\"").count(), 2, "two upgrades");
    assert_eq!(c.matches("longest IO pause").count(), 2);
    assert!(
        c.contains("/tmp/ublk-crypt-new"),
        "the upgraded daemon runs the new binary"
    );
    assert!(
        c.contains("all done while the hog ran"),
        "kills and upgrades under the hog"
    );
    assert!(c.contains("hog-exit 0"), "the hog verified every page");
    let hog: Vec<&str> = c.lines().filter(|l| l.contains("page-hog[h]")).collect();
    assert!(
        hog.iter().any(|l| l.contains(" done ")),
        "the hog finished: {hog:?}"
    );
    assert!(
        hog.iter()
            .all(|l| !l.contains("bad=") || l.contains("bad=0 ")),
        "bad pages: {hog:?}"
    );
    assert!(out.section("first").unwrap().contains("standby:     pid"));
    assert!(c.contains("standby ok"));
}

/// A queue that ends on its own while the kernel still holds the device is a crash, not a stop:
/// the device, its kept key and every page stay, the daemon exits with status 75, and the
/// device is served again, by `ublk-crypt recover` without a standby and by the standby with
/// one. (Before: the daemon took the clean-stop path, deleted the device and forgot the key.)
/// The queue's end is injected (`test-queue-exited 0`, served only with
/// `UBLK_CRYPT_TEST_HOOKS=1`); the main thread's response is what is under test.
#[test]
fn a_queue_ending_on_its_own_leaves_the_device_for_recovery() {
    if !vm_or_skip("a_queue_ending_on_its_own_leaves_the_device_for_recovery") {
        return;
    }
    let script = format!(
        r#"{HELPERS}
        head -c 8388608 /dev/urandom > /tmp/data
        intact() {{ dd if=/dev/ublkb0 bs=1M count=8 iflag=direct 2>/dev/null | cmp - /tmp/data; }}
        # No standby, in the foreground: its exit status is part of the point.
        UBLK_CRYPT_TEST_HOOKS=1 ublk-crypt open /dev/vda --key-file /dev/urandom --name sb \
            --no-standby --foreground > /tmp/fg.log 2>&1 &
        fg=$!
        for i in $(seq 300); do ublk-crypt status sb > /dev/null 2>&1 && break; sleep 0.1; done
        dd if=/tmp/data of=/dev/ublkb0 bs=1M oflag=direct status=none
        ctl-raw /run/ublk-crypt/0.sock "test-queue-exited 0" || true
        set +e; wait $fg; rc=$?; set -e
        vm_begin no-standby
        echo "rc=$rc"
        test -e /sys/block/ublkb0 && echo device-kept
        echo "keys=$(grep -c ublk-crypt /proc/keys || true)"
        grep -o 'queue 0 ended on its own.*' /tmp/fg.log || true
        vm_end no-standby
        until ublk-crypt list | grep -q 'no daemon'; do sleep 0.1; done
        ublk-crypt recover sb
        intact && echo intact-after-recover
        ublk-crypt close sb
        # With a standby (the default): it takes the device over by itself.
        UBLK_CRYPT_TEST_HOOKS=1 ublk-crypt open /dev/vda --key-file /dev/urandom --name sb > /dev/null
        dd if=/tmp/data of=/dev/ublkb0 bs=1M oflag=direct status=none
        s=$(wait_ready_standby 0)
        p=$(primary)
        ctl-raw /run/ublk-crypt/0.sock "test-queue-exited 0" || true
        wait_new_primary $p
        vm_begin with-standby
        echo "old=$p standby=$s new=$(primary)"
        takeover
        intact && echo intact-after-takeover
        vm_end with-standby
        ublk-crypt close sb
        sleep 1
        echo "keys-at-end=$(grep -c ublk-crypt /proc/keys || true)"
        "#
    );
    let out = Vm::builder()
        .binary(ublk_crypt_tests::release_binary("ublk-crypt"))
        .binary(ublk_crypt_tests::release_binary("ctl-raw"))
        .memory_mib(512)
        .disk_mib(64)
        .timeout(Duration::from_secs(300))
        .run(&script)
        .unwrap_or_else(|e| panic!("{e}"));
    let s = |n: &str| out.section(n).unwrap_or_else(|| panic!("no section {n}"));
    let a = s("no-standby");
    assert!(
        a.contains("rc=75") && a.contains("device-kept") && a.contains("keys=1"),
        "without a standby: {a}"
    );
    assert!(a.contains("queue 0 ended on its own"), "its log line: {a}");
    assert!(
        out.console.contains("intact-after-recover"),
        "data lost across recover"
    );
    let b = s("with-standby");
    let field = |k: &str| {
        b.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(
        field("standby="),
        field("new="),
        "the standby took over: {b}"
    );
    assert!(b.contains("\"kind\":\"crash\""), "{b}");
    assert!(b.contains("intact-after-takeover"), "data lost: {b}");
    assert!(out.console.contains("keys-at-end=0"));
}
