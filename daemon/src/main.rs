//! The `ublk-crypt` binary; everything lives in the library (`lib.rs`).
//!
//! `ublk-crypt`: an encrypted block device served through the Linux ublk driver, on-disk
//! compatible with dm-crypt plain mode, built to back encrypted swap under memory pressure.
//!
//! One file per concern:
//! - [`cli`]: the command line (cryptsetup's names where they exist);
//! - [`key_source`]: key files and passphrases, exactly as `cryptsetup open --type plain`;
//! - [`backing`]: opening and validating the backing file or block device;
//! - [`hardening`]: what keeps the daemon alive and out of reclaim under OOM;
//! - [`io`]: the IO path, fetch → (decrypt|encrypt) → backing IO → commit;
//! - [`kernel_log`]: the IO path's messages, to `/dev/kmsg` (never a file that can be in swap);
//! - [`executor`]: the allocation-free per-tag executor each queue thread runs;
//! - [`offload`]: crypto worker threads, so one queue's AES can use every CPU;
//! - [`target`]: the ublk device: creation, parameters, queue threads;
//! - [`control`]: the control plane (signals, status socket, readiness), and its clients;
//! - [`recovery`]: keeping the key for a restarted daemon, and re-attaching to a device;
//! - [`state`]: the runtime records under `/run/ublk-crypt` that `list`/`close`/`recover` read;
//! - [`benchmark`]: `ublk-crypt benchmark`, per-cipher throughput like `cryptsetup benchmark`;
//! - [`docs`]: shell completions and man pages generated from the CLI definition.

use std::process::ExitCode;

fn main() -> ExitCode {
    match ublk_crypt::cli::run() {
        Ok(code) => code,
        Err(e) => {
            // One line, no backtrace: the caller is an admin or a unit file.
            eprintln!("ublk-crypt: {e:#}");
            ExitCode::from(1)
        }
    }
}
