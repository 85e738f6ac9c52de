//! The OOM torture (issue 7): encrypted swap through ublk-crypt in a 256 MiB VM, under 2× and
//! 3× RAM of page-stamping hogs, a true OOM, and a `kill -9` of the daemon mid-swap; nothing
//! may be lost, nothing may freeze, the daemon must never be the OOM killer's victim, and no
//! page stamp may reach the backing in plaintext. See `ublk_crypt_tests::torture` for the
//! script and the verdict, and tests/README.md ("OOM torture") for figures and profiles.
//!
//! `UBLK_CRYPT_TORTURE=long` runs the long profile (more and bigger passes); the side-by-side
//! comparison with dm-crypt and the protections-off run are `scripts/torture`.

use ublk_crypt_tests::torture::{Backend, Profile, Torture};
use ublk_crypt_tests::vm::vm_or_skip;

fn run(t: Torture) {
    let report = t.run().unwrap_or_else(|e| panic!("{e}"));
    let summary = report.summary();
    // Straight to stderr, so the figures show even when libtest captures a passing test's
    // output (`--nocapture` shows the console as well).
    eprintln!("{summary}");
    let failures = report.failures();
    assert!(
        failures.is_empty(),
        "OOM torture failed:\n  {}\n{summary}\nblocked tasks (last dump):\n{}\nlast console lines:\n{}",
        failures.join("\n  "),
        report.blocked_tasks,
        report.console_tail
    );
}

/// 2× RAM of hogs with a true OOM in the middle (a second hog asks for more than RAM + swap:
/// the OOM killer takes it, never the daemon; the first hog's pages verify afterwards), then
/// 3× RAM.
#[test]
fn swap_on_ublk_crypt_survives_overcommit_and_oom() {
    if !vm_or_skip("swap_on_ublk_crypt_survives_overcommit_and_oom") {
        return;
    }
    run(Torture::new(
        Backend::UblkCrypt,
        Profile::from_env().oom_phases(),
    ));
}

/// `kill -9` of the daemon during a 2× RAM hog's fill and again in the middle of a random
/// re-stamp pass, with nothing held for the restart: the standby (daemon/src/standby.rs) takes
/// the device over, and every page of the hogs verifies.
///
/// /run stays a tmpfs, as on a real system: the daemon and its standby keep the record and
/// libublk's JSON locked in memory (`records::keep_in_memory`). The 32 MiB reserve the helper
/// used to hold for a restarted daemon is gone (`recover_reserve_mib` 0): the standby already
/// holds everything it needs (tests/README.md, "Crash and recovery").
///
/// The takeover runs at real-time priority (`hardening::SchedPolicy::TAKEOVER`); the test
/// asserts it did (CI once saw a standby never live, with free memory under the min watermark).
#[test]
fn swap_on_ublk_crypt_survives_a_daemon_crash() {
    if !vm_or_skip("swap_on_ublk_crypt_survives_a_daemon_crash") {
        return;
    }
    let mut t = Torture::new(Backend::UblkCrypt, Profile::from_env().crash_phases());
    // Knobs for the A/B of the real-time takeover, by hand (tests/README.md, "Crash and
    // recovery"); CI runs none of them.
    let env_num = |k: &str| std::env::var(k).ok().and_then(|v| v.parse().ok());
    t.takeover_delay_ms = env_num("UBLK_CRYPT_TORTURE_TAKEOVER_DELAY_MS").unwrap_or(0);
    t.takeover_normal_priority =
        std::env::var("UBLK_CRYPT_TORTURE_TAKEOVER_PRIORITY").is_ok_and(|v| v == "normal");
    t.takeover_alloc_kib = env_num("UBLK_CRYPT_TORTURE_TAKEOVER_ALLOC_KIB").unwrap_or(0);
    run(t);
}
