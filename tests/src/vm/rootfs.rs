//! A Debian 12 root filesystem with systemd as PID 1, for the tests that must run where the
//! users run: under a real systemd ([`super::VmBuilder::switch_root`]).
//!
//! Built once per kernel from Debian's packages with `mmdebstrap --variant=minbase` (plus
//! systemd, udev, kmod, util-linux, procps, keyutils), the harness's kernel modules copied in
//! and indexed with `depmod` (so `modprobe` and `systemd-modules-load` work as on an installed
//! system), a few settings for a headless test guest, then turned into an ext4 image with
//! `mke2fs -d` (no loop device, no mount). Cached in `<cache>/rootfs/<key>.img`; a test copies
//! it (sparse) before booting, since a boot writes to it.
//!
//! The packages come from the same mirror as the host's own apt sources (the host's Debian
//! sources files are handed to mmdebstrap), with mmdebstrap's own apt state: the host's apt
//! setup is not touched.

use std::fs;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;

use super::env::{find_program, is_root, lock_file, run_checked, VmEnv};

/// Debian 12, the release the harness's kernel comes from.
pub const SUITE: &str = "bookworm";

/// What the image holds beyond `minbase`: systemd as init, udev (the `.device` units the
/// units bind to), kmod (`modprobe`), util-linux (`mkswap`, `swapon`), procps, keyutils
/// (`keyctl`, for the test's look at the kept key).
pub const PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "udev",
    "kmod",
    "util-linux",
    "procps",
    "keyutils",
];

/// Size of the (sparse) image.
const IMAGE_MIB: u64 = 1536;

/// Bump when the image's contents change in a way the key does not see.
const LAYOUT_VERSION: u32 = 1;

/// Returns the cached root image for this kernel, building it if needed (about 30 s).
pub fn debian_root_image(env: &VmEnv) -> Result<PathBuf, String> {
    let dir = env.cache.join("rootfs");
    fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (SUITE, PACKAGES, &env.release, LAYOUT_VERSION).hash(&mut h);
    let img = dir.join(format!("{SUITE}-{:016x}.img", h.finish()));
    let _lock = lock_file(&env.cache.join("rootfs.lock"))?;
    if img.exists() {
        return Ok(img);
    }
    let mmdebstrap = find_program("mmdebstrap")
        .ok_or("mmdebstrap not found (scripts/install-deps installs it)")?;
    let depmod =
        find_program("depmod").ok_or("depmod not found (scripts/install-deps installs kmod)")?;
    if !is_root() {
        return Err("building the Debian root image needs root (mmdebstrap --mode=root)".into());
    }
    let work = dir.join("build.tmp");
    let _ = fs::remove_dir_all(&work);
    let root = work.join("root");
    fs::create_dir_all(&root).map_err(|e| format!("creating {}: {e}", root.display()))?;
    eprintln!(
        "vm: building a Debian {SUITE} root filesystem with systemd in {}",
        root.display()
    );
    let mut cmd = Command::new(mmdebstrap);
    cmd.args(["--variant=minbase", "--mode=root", "--quiet"])
        .arg(format!("--include={}", PACKAGES.join(",")))
        .args([
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
        ])
        .arg(SUITE)
        .arg(&root);
    for s in host_debian_sources()? {
        cmd.arg(s);
    }
    run_checked(&mut cmd)?;

    // The kernel's modules, indexed, where kmod looks for them.
    let modules = root.join("usr/lib/modules").join(&env.release);
    fs::create_dir_all(modules.parent().unwrap()).map_err(|e| e.to_string())?;
    run_checked(
        Command::new("cp")
            .arg("-a")
            .arg(&env.modules_dir)
            .arg(&modules),
    )?;
    run_checked(Command::new(depmod).arg("-b").arg(&root).arg(&env.release))?;
    configure(&root)?;

    let tmp = dir.join("image.tmp");
    let _ = fs::remove_file(&tmp);
    run_checked(
        Command::new(&env.mke2fs)
            .args(["-q", "-F", "-t", "ext4", "-L", "vm-root", "-d"])
            .arg(&root)
            .arg(&tmp)
            .arg(format!("{IMAGE_MIB}M")),
    )?;
    fs::rename(&tmp, &img).map_err(|e| format!("renaming {}: {e}", tmp.display()))?;
    let _ = fs::remove_dir_all(&work);
    Ok(img)
}

/// A headless test guest: the root from `/dev/vda`, a persistent journal (a later boot reads
/// the previous boot's shutdown), no login prompts on the console the test reads, no password.
fn configure(root: &Path) -> Result<(), String> {
    let write = |p: &str, c: &str| -> Result<(), String> {
        let path = root.join(p.trim_start_matches('/'));
        fs::create_dir_all(path.parent().unwrap()).map_err(|e| e.to_string())?;
        fs::write(&path, c).map_err(|e| format!("writing {}: {e}", path.display()))
    };
    write(
        "/etc/fstab",
        "/dev/vda / ext4 defaults,errors=remount-ro 0 1\n",
    )?;
    write("/etc/hostname", "ublk-crypt-vm\n")?;
    write("/etc/hosts", "127.0.0.1 localhost ublk-crypt-vm\n")?;
    fs::create_dir_all(root.join("var/log/journal")).map_err(|e| e.to_string())?;
    // The console belongs to the test: no getty on it.
    for unit in ["serial-getty@ttyS0.service", "getty@tty1.service"] {
        let link = root.join("etc/systemd/system").join(unit);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink("/dev/null", &link)
            .map_err(|e| format!("masking {unit}: {e}"))?;
    }
    // root without a password (the guest has no network and is thrown away).
    let shadow = root.join("etc/shadow");
    let s = fs::read_to_string(&shadow).map_err(|e| e.to_string())?;
    let s: String = s
        .lines()
        .map(|l| match l.strip_prefix("root:") {
            Some(rest) => format!("root::{}\n", rest.split_once(':').map_or("", |(_, r)| r)),
            None => format!("{l}\n"),
        })
        .collect();
    fs::write(&shadow, s).map_err(|e| e.to_string())?;
    Ok(())
}

/// The host's apt sources files that name Debian 12, handed to mmdebstrap as they are (it
/// reads one-line `.list` and deb822 `.sources` files): the same mirror the host installs from.
fn host_debian_sources() -> Result<Vec<PathBuf>, String> {
    let files = super::kernel::host_apt_source_files();
    let found: Vec<PathBuf> = files
        .into_iter()
        .filter(|p| {
            fs::read_to_string(p).is_ok_and(|s| {
                s.lines()
                    .any(|l| !l.trim_start().starts_with('#') && l.contains(SUITE))
            })
        })
        .collect();
    if found.is_empty() {
        return Err(format!(
            "no apt sources for Debian {SUITE} on this host (/etc/apt/sources.list[.d]): \
             the root image is built from the host's Debian mirror"
        ));
    }
    Ok(found)
}
