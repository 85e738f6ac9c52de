//! ublk-crypt as an admin runs it: a Debian 12 guest booted with systemd as PID 1, the Debian
//! package installed and encrypted swap configured by the README's quick start (its lines are
//! read from README.md), then rebooted.
//!
//! Three boots of one root image (a copy of [`rootfs::debian_root_image`]), each with its own
//! guest script from `tests/tests/systemd_boot/`, run by `vm-test.service` after
//! `multi-user.target`, each ending in a clean `systemctl poweroff`:
//! 1. `install.sh`: the quick start (`dpkg -i`, one ublk-crypttab line, `systemctl start
//!    swap.target`: swap on at once, the generator's units); a ublk-crypttab line the generator
//!    must refuse (journal line, no units); (e) a persistent-key config is refused by the swap
//!    unit; pages in swap at poweroff.
//! 2. `checks.sh`: (a) swap at boot before `swap.target`, both units active, `status` works;
//!    (c) the previous shutdown from the journal: swap off before the daemon stopped, no stop
//!    timeout; (b) `kill -9` of the daemon under global memory pressure (a 1.5× RAM hog deep in
//!    swap): its standby takes over as the same service (no restart, MainPID the standby's,
//!    not failed), no task blocked (PID 1 included), 0 bad pages, the swap unit never left
//!    active; (f) no key material in the journal. Then the config of (d), through
//!    `systemd/install-swap` (the from-source route).
//! 3. `late-backing.sh`: (d) the daemon fails at boot (backing missing) and keeps being
//!    restarted; once the backing exists, swap comes up without a manual step.
//!
//! (g) of issue 15, `kill -9` under global memory pressure with PID 1 not blocked, is (b) since
//! the standby (issue 17).

use std::path::{Path, PathBuf};
use std::time::Duration;

use ublk_crypt_tests::vm::{rootfs, vm_or_skip, Vm, VmEnv, VmOutput};
use ublk_crypt_tests::{release_binary, target_dir, workspace_root};

const LIB: &str = include_str!("systemd_boot/lib.sh");

/// The README's quick start: the lines of the code block after the `quick-start` marker.
fn quick_start() -> String {
    let readme = std::fs::read_to_string(workspace_root().join("README.md")).unwrap();
    let after = readme
        .split_once("<!-- quick-start:")
        .expect("README.md has the quick-start marker")
        .1;
    let block = after.split_once("```\n").expect("a code block").1;
    let body = block.split_once("```").expect("the block ends").0;
    assert!(
        body.contains("dpkg -i") && body.contains("/etc/ublk-crypttab"),
        "{body}"
    );
    body.to_string()
}

/// The package `scripts/build-deb` made (scripts/test runs it before the tests).
fn package() -> PathBuf {
    let dir = target_dir().join("debian");
    std::fs::read_dir(&dir)
        .ok()
        .and_then(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .find(|p| p.extension().is_some_and(|x| x == "deb"))
        })
        .unwrap_or_else(|| panic!("no .deb in {}: run scripts/build-deb", dir.display()))
}

/// The repository's systemd/ folder, as a checkout would have it, under /root/ublk-crypt.
fn systemd_files(dir: &Path, rel: &str, out: &mut Vec<(String, PathBuf)>) {
    for e in std::fs::read_dir(dir).unwrap().map(Result::unwrap) {
        let p = e.path();
        let name = format!("{rel}/{}", e.file_name().to_string_lossy());
        if p.is_dir() {
            systemd_files(&p, &name, out);
        } else {
            out.push((name, p));
        }
    }
}

struct Machine {
    dir: PathBuf,
}

impl Machine {
    fn boot(&self, name: &str, script: &str) -> VmOutput {
        let mut b = Vm::builder()
            .name(name)
            .memory_mib(512)
            .cpus(2)
            .disk_image(self.dir.join("root.img"))
            .disk_image(self.dir.join("swap-backing.img"))
            .disk_image(self.dir.join("data-backing.img"))
            .switch_root(0)
            .binary(release_binary("page-hog"))
            .file("/root/quick-start.sh", quick_start())
            .stall_timeout(Duration::from_secs(150))
            .timeout(Duration::from_secs(900));
        let mut files = vec![];
        systemd_files(&workspace_root().join("systemd"), "systemd", &mut files);
        for (rel, host) in files {
            b = b.host_file(&format!("/root/ublk-crypt/{rel}"), host);
        }
        let deb = package();
        let deb_name = deb.file_name().unwrap().to_string_lossy().into_owned();
        b = b.host_file(&format!("/root/{deb_name}"), deb);
        b.run(&format!("{LIB}\n{script}"))
            .unwrap_or_else(|e| panic!("boot {name}: {e}"))
    }
}

/// A section without systemd's status lines, which share the console with the script
/// (`[  OK  ] Started ...`, `         Starting ...`, `See 'systemctl status ...'`).
fn section(out: &VmOutput, name: &str) -> String {
    let text = out
        .section(name)
        .unwrap_or_else(|| panic!("no section {name} in the guest's output"));
    text.lines()
        .filter(|l| {
            let t = l.trim_start();
            !(l.starts_with("[  OK  ]")
                || l.starts_with("[FAILED]")
                || l.starts_with("[DEPEND]")
                || l.starts_with("[ INFO ]")
                || (l.starts_with("         ") && t.ends_with("..."))
                || t.starts_with("See 'systemctl status"))
        })
        .map(|l| format!("{l}\n"))
        .collect()
}

/// `key value` lines of a section.
fn field(text: &str, key: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key} ")))
        .unwrap_or_else(|| panic!("no {key} in {text}"))
        .trim()
        .to_string()
}

#[test]
fn encrypted_swap_under_real_systemd() {
    if !vm_or_skip("encrypted_swap_under_real_systemd") {
        return;
    }
    let env = VmEnv::get().unwrap();
    let base = rootfs::debian_root_image(env).unwrap_or_else(|e| panic!("root image: {e}"));
    let dir = target_dir()
        .join("vm-runs")
        .join(format!("systemd-boot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let status = std::process::Command::new("cp")
        .arg("--sparse=always")
        .arg(&base)
        .arg(dir.join("root.img"))
        .status()
        .unwrap();
    assert!(status.success(), "copying the root image");
    for (f, mib) in [("swap-backing.img", 512u64), ("data-backing.img", 16)] {
        let file = std::fs::File::create(dir.join(f)).unwrap();
        file.set_len(mib << 20).unwrap();
    }
    // The README's line names /dev/disk/by-partlabel/cryptswap: a GPT partition of that name.
    let mut sfdisk = std::process::Command::new("sfdisk")
        .arg("--quiet")
        .arg(dir.join("swap-backing.img"))
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("sfdisk (scripts/install-deps installs fdisk)");
    use std::io::Write as _;
    sfdisk
        .stdin
        .take()
        .unwrap()
        .write_all(b"label: gpt\nsize=500MiB, type=L, name=cryptswap\n")
        .unwrap();
    assert!(sfdisk.wait().unwrap().success(), "sfdisk");
    let m = Machine { dir: dir.clone() };

    // Boot 1: the quick start, a refused line, (e), pages in swap at poweroff.
    let one = m.boot(
        "systemd-boot-1-install",
        include_str!("systemd_boot/install.sh"),
    );
    assert!(
        section(&one, "swaps").contains("/dev/ublkb0"),
        "swap right after the quick start"
    );
    let generated = section(&one, "generated");
    for f in [
        "./ublk-crypt@swap.service.d/50-ublk-crypttab.conf",
        "./ublk-crypt-swap@swap.service.d/50-ublk-crypttab.conf",
        "./swap.target.wants/ublk-crypt@swap.service",
        "./swap.target.wants/ublk-crypt-swap@swap.service",
        "./ublk-crypt@swap.service.wants/ublk-crypt-swap@swap.service",
    ] {
        assert!(
            generated.contains(f),
            "generator output lacks {f}:\n{generated}"
        );
    }
    let log = section(&one, "generator-log");
    assert!(
        log.contains("/etc/ublk-crypttab:")
            && log.contains(": swap with the persistent key file /root/data.key")
            && log.contains("no units for this line"),
        "the refused line's journal message: {log}"
    );
    assert_eq!(
        section(&one, "generated-bad").trim(),
        "0",
        "units for a refused line"
    );
    // (e)
    let state = section(&one, "data-swap-state");
    assert!(
        state.contains("failed"),
        "(e) swap unit on a persistent key: {state}"
    );
    let journal = section(&one, "data-swap-journal");
    assert!(
        journal.contains("refusing to mkswap a device with a persistent key"),
        "(e) a clear journal line: {journal}"
    );
    assert_eq!(section(&one, "data-daemon-state").trim(), "active");
    assert_eq!(
        section(&one, "data-signature").trim(),
        "0",
        "(e) the data device was formatted as swap"
    );
    let stopped = section(&one, "data-after-stop");
    assert_eq!(
        (
            field(&stopped, "device"),
            field(&stopped, "record"),
            field(&stopped, "key")
        ),
        ("no".into(), "0".into(), "no".into()),
        "systemctl stop leaves nothing behind: {stopped}"
    );

    // Boot 2: (a), (c), (b), (f).
    let two = m.boot(
        "systemd-boot-2-checks",
        include_str!("systemd_boot/checks.sh"),
    );
    // (a)
    let units = section(&two, "units");
    assert_eq!(
        units.lines().collect::<Vec<_>>(),
        ["active", "active"],
        "(a) both units active at boot"
    );
    let order = section(&two, "order");
    let ts = |u: &str| -> u64 { field(&order, u).parse().unwrap() };
    assert!(ts("ublk-crypt-swap@swap.service") > 0, "(a) {order}");
    assert!(
        ts("ublk-crypt@swap.service") <= ts("ublk-crypt-swap@swap.service")
            && ts("ublk-crypt-swap@swap.service") <= ts("swap.target"),
        "(a) daemon, then swap, then swap.target: {order}"
    );
    assert!(
        section(&two, "status").contains("swap is active: /dev/ublkb0"),
        "(a) status"
    );
    // (c)
    let prev = section(&two, "prev-shutdown");
    let pos = |what: &[&str]| {
        prev.lines()
            .position(|l| what.iter().all(|w| l.contains(w)))
            .unwrap_or_else(|| {
                panic!("(c) no line with {what:?} in the previous shutdown:\n{prev}")
            })
    };
    let swap_stopped = pos(&["Stopped", "Encrypted swap on ublk-crypt device swap"]);
    let daemon_stopping = pos(&["Stopping", "ublk-crypt encrypted block device swap"]);
    let daemon_stopped = pos(&["Stopped", "ublk-crypt encrypted block device swap"]);
    assert!(
        swap_stopped < daemon_stopping && daemon_stopping < daemon_stopped,
        "(c) swap off before the daemon stops:\n{prev}"
    );
    for bad in ["timed out", "SIGKILL", "Killing", "Failed with result"] {
        assert!(!prev.contains(bad), "(c) '{bad}' at shutdown:\n{prev}");
    }
    // (b)
    let r = section(&two, "restart");
    assert_ne!(field(&r, "old-pid"), field(&r, "new-pid"), "(b) {r}");
    assert_eq!(
        field(&r, "standby-pid"),
        field(&r, "new-pid"),
        "(b) the standby took over and is the service's main pid: {r}"
    );
    let before: u32 = field(&r, "restarts-before").parse().unwrap();
    let after: u32 = field(&r, "restarts-after").parse().unwrap();
    assert_eq!(after, before, "(b) the takeover is no restart: {r}");
    assert!(
        r.contains("service active success"),
        "(b) the service stayed active, not failed: {r}"
    );
    assert_eq!(
        section(&two, "hung-tasks").trim(),
        "0",
        "(b) no task (PID 1 included) blocked"
    );
    assert_eq!(
        field(&r, "hog-exit"),
        "0",
        "(b) the hog found bad pages or died"
    );
    let hog = section(&two, "hog-b");
    assert!(
        hog.contains("done") && !hog.contains("BAD") && !hog.contains("FAILED"),
        "(b) hog: {hog}"
    );
    let states = section(&two, "swap-states");
    assert!(
        states
            .lines()
            .all(|l| l.split_whitespace().nth(1) == Some("active")),
        "(b) the swap unit left active: {states}"
    );
    let daemon = section(&two, "daemon-journal");
    assert!(
        daemon.contains("took device 0 over"),
        "(b) the standby took the device over: {daemon}"
    );
    // The unit grants CAP_SYS_NICE and leaves RestrictRealtime= unset for exactly this.
    assert!(
        daemon.contains("at real-time priority") && !daemon.contains("cannot run at real-time"),
        "(b) the takeover ran at real-time priority under the unit: {daemon}"
    );
    // (h)
    let u = section(&two, "upgrade");
    let journal = section(&two, "reload-journal");
    assert_eq!(
        field(&u, "dpkg-exit"),
        "0",
        "(h) {u}\n{}",
        section(&two, "dpkg-h")
    );
    assert_ne!(
        field(&u, "before-pid"),
        field(&u, "after-pid"),
        "(h) the reload handed the device to a new daemon: {u}\n{journal}"
    );
    assert_eq!(
        field(&u, "after-exe"),
        "/usr/sbin/ublk-crypt",
        "(h) the new daemon runs the installed binary: {u}"
    );
    assert!(u.contains("service active success"), "(h) {u}");
    assert_eq!(
        field(&u, "restarts-before"),
        field(&u, "restarts-after"),
        "(h) the upgrade is no restart: {u}"
    );
    assert_eq!(field(&u, "swap-on"), "1", "(h) swap stayed on: {u}");
    assert!(
        u.contains(r#""kind":"upgrade""#),
        "(h) the last takeover was the upgrade: {u}"
    );
    assert!(
        journal.contains("longest IO pause"),
        "(h) the reload printed the IO pause: {journal}"
    );
    // (f)
    let k = section(&two, "key-search");
    assert_eq!(field(&k, "key-bytes"), "64", "(f) {k}");
    assert_eq!(field(&k, "data-key-bytes"), "64", "(f) {k}");
    assert_eq!(
        field(&k, "key-chunks-found"),
        "0",
        "(f) the swap key is in the journal"
    );
    assert_eq!(
        field(&k, "data-key-chunks-found"),
        "0",
        "(f) the data key is in the journal"
    );
    assert_ne!(
        field(&k, "control-text"),
        "0",
        "(f) control string not found: {k}"
    );
    assert_ne!(
        field(&k, "control-raw"),
        "0",
        "(f) control bytes not found: {k}"
    );

    // Boot 3: (d).
    let three = m.boot(
        "systemd-boot-3-late-backing",
        include_str!("systemd_boot/late-backing.sh"),
    );
    let before = section(&three, "before");
    assert_eq!(
        field(&before, "swaps"),
        "0",
        "(d) swap without a daemon? {before}"
    );
    assert_ne!(field(&before, "swap-unit"), "active", "(d) {before}");
    assert_eq!(
        section(&three, "after").lines().collect::<Vec<_>>(),
        ["active", "active"],
        "(d) both units active once the backing exists"
    );
    let j = section(&three, "swap-journal");
    assert!(
        !j.contains("cannot open"),
        "(d) mkswap ran without a daemon: {j}"
    );

    let _ = std::fs::remove_dir_all(&dir);
}
