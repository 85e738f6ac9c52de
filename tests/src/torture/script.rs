//! The torture's guest script: shell variables from the [`Torture`], the fixed functions of
//! `guest-lib.sh`, the backend's device, the phases, the end (plaintext-scan control).

use std::fmt::Write as _;

use super::*;

/// The fixed functions of the guest script.
const GUEST_LIB: &str = include_str!("guest-lib.sh");

impl Torture {
    /// The guest script.
    pub fn script(&self) -> String {
        let mut s = String::new();
        let sectors = self.swap_mib * 2048;
        let _ = write!(
            s,
            "U=/usr/local/sbin/ublk-crypt\nT=/run/torture\nSYSRQ='{sysrq}'\nSAMPLE_SECS={sample}\n{GUEST_LIB}\nstart_watchdog\n",
            sysrq = std::env::var("UBLK_CRYPT_TORTURE_SYSRQ").unwrap_or_else(|_| "10 wm".into()),
            sample = self.sample_secs
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
                if self.takeover_delay_ms > 0
                    || self.takeover_normal_priority
                    || self.takeover_alloc_kib > 0
                {
                    // Inherited by the daemon and every standby after it.
                    let _ = writeln!(
                        s,
                        "export UBLK_CRYPT_TEST_HOOKS=1 UBLK_CRYPT_TEST_TAKEOVER_DELAY_MS={}",
                        self.takeover_delay_ms
                    );
                    if self.takeover_alloc_kib > 0 {
                        let _ = writeln!(
                            s,
                            "export UBLK_CRYPT_TEST_TAKEOVER_ALLOC_KIB={}",
                            self.takeover_alloc_kib
                        );
                    }
                    if self.takeover_normal_priority {
                        s += "export UBLK_CRYPT_TEST_TAKEOVER_PRIORITY=normal\n";
                    }
                }
                if self.xts_tier != "detected" {
                    // Inherited by the daemon, its standbys and recovered daemons.
                    let _ = writeln!(s, "export UBLK_CRYPT_XTS_TIER={}", self.xts_tier);
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
                for kv in self.queue_sysfs.split_whitespace() {
                    if let Some((k, v)) = kv.split_once('=') {
                        let _ = writeln!(
                            s,
                            "echo {v} > /sys/block/$(basename $dev)/queue/{k}; ev \"queue {k}=$(cat /sys/block/$(basename $dev)/queue/{k})\""
                        );
                    }
                }
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
        s += "\nswap_on_and_sample\n";
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
                    // With a standby (the default) nothing is run after the kill: the standby
                    // takes over; without one, `recover` is.
                    let (standby, recover) = if self.open_args.contains("--no-standby") {
                        ("", "$U recover tswap".to_string())
                    } else {
                        (" --standby /run/ublk-crypt/0.json", String::new())
                    };
                    let _ = write!(
                        s,
                        r#"
ev "phase {hog} start: {mib} MiB hog, {passes} passes ({order}), daemon killed at {kpct}% of pass {kp}"
# Kill (and recover) from a locked process: the shell's own code may be in swap (see
# kill-and-recover.rs), and the daemon's binary is on the /usr disk.
kill-and-recover --reserve-mib {reserve}{standby} $T/{hog}.kill $(cat $T/daemon-pid) 30 -- {recover} &
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
}
