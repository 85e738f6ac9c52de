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
        "OOM torture failed:\n  {}\n{summary}\nlast console lines:\n{}",
        failures.join("\n  "),
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

/// `kill -9` of the daemon in the middle of a 2× RAM hog's re-stamp pass; `ublk-crypt
/// recover` from a locked IO-flusher helper; every page of the hog verifies.
///
/// /run stays a tmpfs, as on a real system: the daemon keeps its record and libublk's JSON
/// locked in memory (`records::keep_in_memory`), so `recover` can read them although the rest of
/// /run may be in the swap it recovers. One workaround stands in for a daemon design change
/// (tests/README.md, "OOM torture", "Crash and recovery"): 32 MiB held by the helper and freed
/// at the kill, else the hog can take the dead daemon's memory and the recovering one finds
/// none for its locked pool. `scripts/torture --crash` without `--reserve-mib` shows it.
#[test]
fn swap_on_ublk_crypt_survives_a_daemon_crash() {
    if !vm_or_skip("swap_on_ublk_crypt_survives_a_daemon_crash") {
        return;
    }
    let mut t = Torture::new(Backend::UblkCrypt, Profile::from_env().crash_phases());
    t.recover_reserve_mib = 32;
    run(t);
}
