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
        page-hog --name h --mib 512 --passes 3 --order seq,rev,seq --mark 1:5:/tmp/deep \
            --heartbeat 5 &
        hog=$!
        # In its first re-stamp: every page has been in swap, swap-ins and swap-outs go on.
        while [ ! -e /tmp/deep ]; do sleep 0.5; done
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
