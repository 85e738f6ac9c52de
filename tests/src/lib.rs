//! Integration test support for ublk-crypt, above all the qemu VM harness ([`vm`]).
//!
//! The host this project is developed and tested on has no ublk, no device-mapper and no
//! KVM, so every test that needs a real kernel boots Debian's kernel under qemu (TCG) with a
//! tiny busybox initramfs. See `tests/README.md` for how it works and how to use it.

pub mod stamp;
pub mod status;
pub mod torture;
pub mod vm;

use std::path::{Path, PathBuf};

/// The workspace root (the directory holding the root `Cargo.toml`).
///
/// Derived from this crate's manifest directory at compile time, which is stable no matter
/// which directory `cargo test` (and therefore the test process) runs in.
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent directory")
}

/// Cargo's target directory: `$CARGO_TARGET_DIR` when set (relative to the workspace root if
/// relative), else `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if !d.is_empty() => workspace_root().join(d),
        _ => workspace_root().join("target"),
    }
}

/// Path of a binary built by `cargo build --release` (e.g. `release_binary("ublk-crypt")`).
///
/// Does not build it: `scripts/test` builds every release binary before running the tests,
/// and building from inside a test would fight the running cargo for its lock.
pub fn release_binary(name: &str) -> PathBuf {
    target_dir().join("release").join(name)
}

/// Every cipher spec with every key size ublk-crypt accepts for it
/// (`CipherSpec::SUPPORTED` × `allowed_key_bits`): the matrix the dm-crypt compatibility test
/// and the golden vectors cover, so a new spec or key size is tested without a list to edit.
pub fn cipher_matrix() -> Vec<(&'static str, usize)> {
    ublk_crypt_crypto::CipherSpec::SUPPORTED
        .iter()
        .flat_map(|s| {
            let spec: ublk_crypt_crypto::CipherSpec = s.parse().expect("SUPPORTED specs parse");
            spec.allowed_key_bits()
                .iter()
                .map(move |&bits| (*s, bits))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The first `name : value` field of the host's `/proc/cpuinfo` (`model name`, `cpu MHz`), for
/// the benchmark reports.
pub fn cpuinfo_field(name: &str) -> Option<String> {
    std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with(name))
            .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
    })
}

/// The host CPU's model name, empty if unknown.
pub fn host_cpu_model() -> String {
    cpuinfo_field("model name").unwrap_or_default()
}
