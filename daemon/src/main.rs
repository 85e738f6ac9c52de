//! The `ublk-crypt` binary; everything lives in the library (`lib.rs`).
//!
//! `ublk-crypt`: an encrypted block device served through the Linux ublk driver, on-disk
//! compatible with dm-crypt plain mode, built to back encrypted swap under memory pressure.
//!
//! One file per job, in the order a device's life meets them:
//! - [`cli`]: the command line (cryptsetup's names where they exist), turned into a
//!   [`config`]: the validated description of a device ([`config::DeviceConfig`]), all the
//!   device layer ever takes;
//! - [`key_source`]: key files and passphrases, exactly as `cryptsetup open --type plain`;
//! - [`backing`]: opening and validating the backing file or block device;
//! - [`device`]: `open` and `recover`: one shared preparation (backing, geometry, key,
//!   cipher), then the device served until it is stopped;
//! - [`hardening`]: what keeps the daemon alive and out of reclaim under OOM;
//! - [`readiness`]: logging, forking into the background, telling systemd it is ready;
//! - [`ublk`]: the kernel side through libublk: driver, device state, attaching, parameters;
//! - [`ublk_batch`]: batched ublk IO commands (`--batch-io`, 7.0+): one fetch, one commit a round;
//! - [`ublk_features`]: the ublk features the kernel offers and the device uses, by name;
//! - [`keyring`]: the key kept in root's keyring for a restarted daemon;
//! - [`records`]: the run-dir records under `/run/ublk-crypt` that `list`/`close`/`recover` read;
//! - [`context`]: what the threads of a served device share, and the stop [`context::Event`];
//! - [`queue_threads`]: the queue threads, made (stacks, rings) before the device exists;
//! - [`queue`]: a queue thread: fetch → [`io`] → commit, user copy, io_uring backing;
//! - [`io`]: the IO path, fetch → (decrypt|encrypt) → backing IO → commit;
//! - [`queue_crypto`]: where a piece's AES runs (inline, a crypto worker, a batch);
//! - [`offload`]: crypto worker threads, so one queue's AES can use every CPU;
//! - [`batch`]: small pieces shared between a queue thread and a worker, a batch at a time;
//! - [`executor`]: the allocation-free per-tag executor each queue thread runs;
//! - [`kernel_log`]: the IO path's messages, to `/dev/kmsg` (never a file that can be in swap);
//! - [`stats`]: per-queue counters;
//! - [`standby`]: the standby process that takes a device over when its daemon dies;
//! - [`keeper`]: the daemon's side of it: starting standbys, and `upgrade`;
//! - [`control`]: the control plane of a served device (signals, status socket);
//! - [`client`]: `close`, `list`, `status`, `upgrade`, run against a served device;
//! - [`control_request`]: one request to a device's control socket;
//! - [`benchmark`]: `ublk-crypt benchmark`, per-cipher throughput like `cryptsetup benchmark`;
//! - [`docs`]: shell completions and man pages generated from the CLI definition.
//!
//! Only `cli` (and this file) know the command line, and no two modules import each other
//! (`tests/module_graph.rs`).

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
