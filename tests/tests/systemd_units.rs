//! The systemd units in `systemd/`: `systemd-analyze verify` on each of them (templates and the
//! `swap` instances with the example drop-in), plus checks of the decisions their comments
//! explain, so that an edit that undoes one fails here.
//!
//! Verification runs offline against a throw-away root (`--root`), because this machine has no
//! systemd as PID 1 and no `/usr/local/sbin/ublk-crypt`: the units and the drop-in are installed
//! into `ROOT/etc/systemd/system`, and every program an `Exec*=` line names is put at its path
//! in ROOT (the release `ublk-crypt` when it is built, else a stub; the host's `/bin/sh`,
//! `/sbin/mkswap`, ...). `systemd-analyze verify` exits 0 on many mistakes (an unknown key, a bad
//! value: "ignoring"), so *any* output counts as a failure too.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use ublk_crypt_tests::{release_binary, target_dir, workspace_root};

const UNITS: [&str; 2] = ["ublk-crypt@.service", "ublk-crypt-swap@.service"];

fn systemd_dir() -> PathBuf {
    workspace_root().join("systemd")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `systemd-analyze`, or None after a loud banner (a failure under CI, like the VM tests).
fn systemd_analyze_or_skip(test: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("systemd-analyze"))
            .find(|f| f.is_file())
    });
    if found.is_none() {
        let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
        if ci {
            panic!("{test}: systemd-analyze is missing (scripts/install-deps installs systemd)");
        }
        eprintln!(
            "\n################ SKIPPED {test}: systemd-analyze not found \
             (apt-get install systemd) ################\n"
        );
    }
    found
}

/// The unit's `Key=value` lines (comments and section headers dropped), in order.
fn directives(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn values<'a>(d: &'a [(String, String)], key: &str) -> Vec<&'a str> {
    d.iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .collect()
}

/// Absolute program paths of every `Exec*=` line (after systemd's `-@:+!` prefixes).
fn exec_programs(text: &str) -> Vec<String> {
    directives(text)
        .into_iter()
        .filter(|(k, _)| k.starts_with("Exec"))
        .filter_map(|(_, v)| {
            let prog = v.trim_start_matches(['-', '@', ':', '+', '!']);
            prog.split_whitespace().next().map(str::to_string)
        })
        .collect()
}

/// A verify root with the units, the example drop-in for `ublk-crypt@swap.service`, and every
/// program the units run.
struct VerifyRoot {
    dir: PathBuf,
}

impl VerifyRoot {
    fn new(name: &str) -> VerifyRoot {
        let dir = target_dir().join(format!("systemd-verify-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let units = dir.join("etc/systemd/system");
        std::fs::create_dir_all(units.join("ublk-crypt@swap.service.d")).unwrap();
        for u in UNITS {
            std::fs::copy(systemd_dir().join(u), units.join(u)).unwrap();
        }
        std::fs::copy(
            systemd_dir().join("examples/backing.conf"),
            units.join("ublk-crypt@swap.service.d/backing.conf"),
        )
        .unwrap();
        let root = VerifyRoot { dir };
        for u in UNITS {
            for prog in exec_programs(&read(&systemd_dir().join(u))) {
                root.install_program(&prog);
            }
        }
        root
    }

    fn unit_path(&self, unit: &str) -> PathBuf {
        self.dir.join("etc/systemd/system").join(unit)
    }

    fn install_program(&self, prog: &str) {
        assert!(prog.starts_with('/'), "Exec program {prog} is not absolute");
        let dest = self.dir.join(prog.trim_start_matches('/'));
        if dest.exists() {
            return;
        }
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        if prog.ends_with("/ublk-crypt") {
            let built = release_binary("ublk-crypt");
            if built.is_file() {
                if std::fs::hard_link(&built, &dest).is_err() {
                    std::fs::copy(&built, &dest).unwrap();
                }
            } else {
                std::fs::write(&dest, "#!/bin/sh\nexit 0\n").unwrap();
                std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o755)).unwrap();
            }
        } else {
            // The units are written for Debian-like systems (merged /usr: /bin/sh, /sbin/mkswap),
            // and so is this host: a path missing here is a path likely wrong there.
            assert!(
                Path::new(prog).is_file(),
                "{prog}, run by a unit, does not exist on this (Debian) host"
            );
            std::fs::copy(prog, &dest).unwrap();
        }
    }

    /// Runs `systemd-analyze verify`; Ok(()) only if it exits 0 and says nothing.
    fn verify(&self, analyze: &Path, units: &[&str]) -> Result<(), String> {
        let out = Command::new(analyze)
            .arg("verify")
            .arg("--man=no")
            .arg(format!("--root={}", self.dir.display()))
            .args(units)
            .env("SYSTEMD_LOG_COLOR", "0")
            .output()
            .expect("run systemd-analyze");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() && text.trim().is_empty() {
            Ok(())
        } else {
            Err(format!(
                "systemd-analyze verify {units:?}: {}\n{text}",
                out.status
            ))
        }
    }

    /// Everything verify is asked to check: both templates and both `swap` instances.
    fn all_units(&self) -> Vec<String> {
        let mut v: Vec<String> = UNITS
            .iter()
            .map(|u| self.unit_path(u).display().to_string())
            .collect();
        v.push("ublk-crypt@swap.service".into());
        v.push("ublk-crypt-swap@swap.service".into());
        v
    }
}

impl Drop for VerifyRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn systemd_analyze_verify_passes_on_every_unit() {
    let Some(analyze) = systemd_analyze_or_skip("systemd_analyze_verify_passes_on_every_unit")
    else {
        return;
    };
    let root = VerifyRoot::new("ok");
    let units = root.all_units();
    let units: Vec<&str> = units.iter().map(String::as_str).collect();
    root.verify(&analyze, &units).unwrap();
}

/// The check above can fail: each of these breakages must be reported.
#[test]
fn systemd_analyze_verify_catches_broken_units() {
    let Some(analyze) = systemd_analyze_or_skip("systemd_analyze_verify_catches_broken_units")
    else {
        return;
    };
    let breakages: [(&str, &str, &str); 5] = [
        ("ublk-crypt@.service", "Type=notify", "Type=notifyy"),
        (
            "ublk-crypt@.service",
            "Restart=always",
            "Restart=always\nRestartSteps=3x",
        ),
        (
            "ublk-crypt@.service",
            "KeyringMode=private",
            "KeyringMode=secret",
        ),
        (
            "ublk-crypt-swap@.service",
            "After=ublk-crypt@%i.service",
            "After=ublk-crypt@",
        ),
        (
            "ublk-crypt-swap@.service",
            "ExecStart=/usr/local/sbin/ublk-crypt mkswap",
            "ExecStart=/usr/local/sbin/ublk-cryptt mkswap",
        ),
    ];
    for (unit, from, to) in breakages {
        let root = VerifyRoot::new("broken");
        let path = root.unit_path(unit);
        let text = read(&path);
        assert!(text.contains(from), "{unit} no longer has {from}");
        std::fs::write(&path, text.replacen(from, to, 1)).unwrap();
        let units = root.all_units();
        let units: Vec<&str> = units.iter().map(String::as_str).collect();
        assert!(
            root.verify(&analyze, &units).is_err(),
            "verify missed {unit}: {from} -> {to}"
        );
    }
    // A missing program is an error too (the reason for installing them into the root).
    let root = VerifyRoot::new("noprog");
    std::fs::remove_file(root.dir.join("usr/local/sbin/ublk-crypt")).unwrap();
    assert!(root
        .verify(&analyze, &["ublk-crypt@swap.service"])
        .unwrap_err()
        .contains("ublk-crypt"));
}

#[test]
fn daemon_unit_has_what_oom_survival_and_recovery_need() {
    let d = directives(&read(&systemd_dir().join("ublk-crypt@.service")));
    let one = |k: &str| -> &str {
        let v = values(&d, k);
        assert_eq!(v.len(), 1, "{k}: {v:?}");
        v[0]
    };
    assert_eq!(one("Type"), "notify");
    // The standby that takes over reports its pid; the service lives while the cgroup does;
    // the dead daemon's signal is not the service's failure (the unit's comments).
    assert_eq!(one("NotifyAccess"), "all");
    assert_eq!(one("ExitType"), "cgroup");
    // 75: a daemon that left its device for recovery (daemon/src/device.rs).
    for sig in ["75", "SIGKILL", "SIGABRT", "SIGSEGV"] {
        assert!(
            one("SuccessExitStatus")
                .split_whitespace()
                .any(|w| w == sig),
            "SuccessExitStatus lacks {sig}"
        );
    }
    assert!(
        one("ExecReload").contains(" upgrade %i"),
        "reload is the upgrade"
    );
    assert_eq!(one("OOMScoreAdjust"), "-1000");
    assert_eq!(one("LimitMEMLOCK"), "infinity");
    assert_eq!(one("Restart"), "always");
    assert_eq!(one("DefaultDependencies"), "no");
    assert_eq!(one("StartLimitIntervalSec"), "0", "recovery never gives up");
    assert_eq!(one("KeyringMode"), "private");
    assert_eq!(
        one("RuntimeDirectoryPreserve"),
        "yes",
        "records survive restarts"
    );
    let mut caps: Vec<&str> = one("CapabilityBoundingSet").split_whitespace().collect();
    caps.sort();
    assert_eq!(
        caps,
        [
            "CAP_IPC_LOCK",
            "CAP_SYS_ADMIN",
            "CAP_SYS_NICE",
            "CAP_SYS_RESOURCE"
        ]
    );
    let rt: Vec<&str> = one("RuntimeDirectory").split_whitespace().collect();
    assert_eq!(rt, ["ublk-crypt", "ublksrvd"]);
    assert!(values(&d, "Before")
        .iter()
        .any(|v| v.contains("swap.target")));
    assert!(values(&d, "After")
        .iter()
        .any(|v| v.contains("systemd-modules-load.service")));
    let start = one("ExecStart");
    for part in [
        " open ${BACKING} ",
        "--foreground",
        "--id ${ID}",
        "$OPTIONS",
    ] {
        assert!(start.contains(part), "ExecStart lacks {part}: {start}");
    }
    // Things that would break recovery or the device (see the unit's comments).
    for absent in [
        "ExecStop",
        "ExecStopPost",
        "PrivateUsers",
        "PrivateDevices",
        "DevicePolicy",
        "DeviceAllow",
        "ProtectClock",
        "ProtectKernelLogs",
        "ProtectProc",
        "SystemCallFilter",
        "RestrictRealtime",
    ] {
        assert!(values(&d, absent).is_empty(), "{absent}= is set");
    }
    let modules = read(&systemd_dir().join("modules-load.d/ublk-crypt.conf"));
    assert!(modules.lines().any(|l| l.trim() == "ublk_drv"), "{modules}");
}

#[test]
fn swap_unit_survives_a_daemon_restart_and_stops_first() {
    let d = directives(&read(&systemd_dir().join("ublk-crypt-swap@.service")));
    assert!(values(&d, "After").contains(&"ublk-crypt@%i.service"));
    // These would turn the daemon's crash-restart into a swapoff that waits for the dead daemon
    // (Requires= and the like), or a failing daemon's restarts into a boot that never ends (Wants=).
    for key in [
        "Wants",
        "Requires",
        "BindsTo",
        "PartOf",
        "Requisite",
        "StopPropagatedFrom",
    ] {
        for v in values(&d, key) {
            assert!(!v.contains("ublk-crypt@"), "{key}={v}");
        }
    }
    let stop = values(&d, "ExecStop").join("\n");
    assert!(
        stop.contains("swapoff") && stop.contains("/proc/swaps"),
        "{stop}"
    );
    let start = values(&d, "ExecStart").join("\n");
    assert!(
        start.contains("mkswap") && start.contains("swapon --priority"),
        "{start}"
    );
    // Comes up with every start of the daemon (a daemon that failed at boot and starts later
    // brings the swap with it), never refused for starting often, never formats a device that
    // the daemon of this instance does not serve.
    let wanted_by: Vec<&str> = values(&d, "WantedBy")
        .iter()
        .flat_map(|v| v.split_whitespace())
        .collect();
    assert!(
        wanted_by.contains(&"swap.target") && wanted_by.contains(&"ublk-crypt@%i.service"),
        "{wanted_by:?}"
    );
    assert_eq!(values(&d, "Also"), ["ublk-crypt@%i.service"]);
    assert_eq!(values(&d, "StartLimitIntervalSec"), ["0"]);
    let cond = values(&d, "ExecCondition").join("\n");
    assert!(
        cond.contains("ublk-crypt status %i") && cond.contains("/dev/ublkb$${ID}"),
        "{cond}"
    );
}

/// The swap unit formats through `ublk-crypt mkswap`, which refuses a persistent key, a device
/// not served by this instance's daemon and a backing with a signature (daemon/src/mkswap.rs;
/// tested in the VM), never through a bare `mkswap` on `/dev/ublkbN` or a shell guard.
#[test]
fn swap_unit_formats_only_through_ublk_crypt_mkswap() {
    let d = directives(&read(&systemd_dir().join("ublk-crypt-swap@.service")));
    let start = values(&d, "ExecStart");
    assert_eq!(
        start.first().copied(),
        Some("/usr/local/sbin/ublk-crypt mkswap %i --label ublk-crypt-%i")
    );
    assert!(
        start.iter().all(|l| !l.starts_with("/sbin/mkswap")),
        "{start:?}"
    );
    assert!(values(&d, "ExecStartPre").is_empty());
}
