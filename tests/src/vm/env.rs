//! Provisioning what a VM needs from the host: qemu, a static busybox, `mke2fs`, and
//! Debian's kernel with its modules (`kernel.rs`: downloaded on first use into `target/vm-cache/`).
//!
//! Also the one place that decides what a test does when that cannot be provisioned
//! ([`vm_or_skip`]): fail in CI, skip loudly elsewhere.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use super::kernel::{self, KernelChoice};

/// Everything on the host a VM boot needs, found or fetched once per process.
#[derive(Debug, Clone)]
pub struct VmEnv {
    /// `qemu-system-x86_64`.
    pub qemu: PathBuf,
    /// A statically linked busybox: the initramfs has no libraries before `/usr` is mounted.
    pub busybox: PathBuf,
    /// `mke2fs` (builds the read-only `/usr` image holding host tools and libraries).
    pub mke2fs: PathBuf,
    /// The kernel image (`vmlinuz-*`).
    pub kernel: PathBuf,
    /// `lib/modules/<release>` of that kernel.
    pub modules_dir: PathBuf,
    /// The kernel release string (`6.12.117+deb12-cloud-amd64`).
    pub release: String,
    /// Which kernel that is (`UBLK_CRYPT_VM_KERNEL`).
    pub choice: KernelChoice,
    /// `target/vm-cache`: downloads, decompressed modules, `/usr` images, lock files.
    pub cache: PathBuf,
}

static ENV: OnceLock<Result<VmEnv, String>> = OnceLock::new();

impl VmEnv {
    /// Finds or fetches everything, once per process; later calls return the same answer.
    pub fn get() -> Result<&'static VmEnv, String> {
        ENV.get_or_init(provision).as_ref().map_err(Clone::clone)
    }
}

/// The VM skip policy, in one place. Call it first in every VM test:
///
/// ```no_run
/// # fn main() {
/// if !ublk_crypt_tests::vm::vm_or_skip("my_test") {
///     return;
/// }
/// # }
/// ```
///
/// Returns `true` when VMs can run. When qemu or the kernel cannot be obtained:
/// * in CI (`CI` set and not `false`/`0`) it **panics**, failing the test: CI must never
///   report green for tests it did not run;
/// * elsewhere it prints a big banner to stderr and returns `false`, so a developer on a
///   machine without qemu can still run the rest of the suite.
pub fn vm_or_skip(test: &str) -> bool {
    match VmEnv::get() {
        Ok(_) => true,
        Err(why) if in_ci() => panic!("VM test {test} cannot run in CI: {why}"),
        Err(why) => {
            // Straight to fd 2, not eprintln!: libtest captures eprintln! of passing tests,
            // and a skip must be seen.
            use std::io::Write;
            let bar = "#".repeat(78);
            let msg = format!(
                "\n{bar}\n#  SKIPPED VM TEST: {test}\n#  {}\n#  (in CI, with CI set, this is a failure)\n{bar}\n",
                why.replace('\n', "\n#  ")
            );
            let _ = std::io::stderr().write_all(msg.as_bytes());
            false
        }
    }
}

/// Whether we run under CI, where skipping a VM test is not allowed.
pub fn in_ci() -> bool {
    matches!(std::env::var("CI"), Ok(v) if !v.is_empty() && v != "false" && v != "0")
}

/// The cache directory: `$UBLK_CRYPT_VM_CACHE`, else `<target>/vm-cache`.
pub fn cache_dir() -> PathBuf {
    match std::env::var_os("UBLK_CRYPT_VM_CACHE") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => crate::target_dir().join("vm-cache"),
    }
}

fn provision() -> Result<VmEnv, String> {
    let cache = cache_dir();
    fs::create_dir_all(&cache).map_err(|e| format!("creating {}: {e}", cache.display()))?;
    let qemu = match std::env::var_os("UBLK_CRYPT_QEMU") {
        Some(q) => find_program(&q.to_string_lossy())
            .ok_or_else(|| format!("UBLK_CRYPT_QEMU={} is not a program", q.to_string_lossy()))?,
        None => find_program("qemu-system-x86_64").ok_or(
            "qemu-system-x86_64 not found (scripts/install-deps installs qemu-system-x86)",
        )?,
    };
    let busybox = find_program("busybox")
        .ok_or("busybox not found (scripts/install-deps installs busybox-static)")?;
    if !is_static(&busybox) {
        return Err(format!(
            "{} is dynamically linked; the initramfs needs busybox-static",
            busybox.display()
        ));
    }
    let mke2fs = find_program("mke2fs")
        .ok_or("mke2fs not found (scripts/install-deps installs e2fsprogs)")?;
    let choice = KernelChoice::from_env()?;
    let kernel_root = match std::env::var_os("UBLK_CRYPT_VM_KERNEL_DIR") {
        Some(d) => PathBuf::from(d),
        None => kernel::fetch(&cache, choice)?,
    };
    let (kernel, modules_dir, release) = kernel::locate(&kernel_root)?;
    kernel::loud(&format!(
        "vm: kernel {release} ({}: UBLK_CRYPT_VM_KERNEL={})",
        choice.meta_package(),
        choice.name()
    ));
    Ok(VmEnv {
        qemu,
        busybox,
        mke2fs,
        kernel,
        modules_dir,
        release,
        choice,
        cache,
    })
}

/// Looks a program up on `$PATH` and in the sbin directories (which a non-root `$PATH` may
/// lack). Absolute or relative paths with a slash are taken as they are.
pub fn find_program(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        let p = PathBuf::from(name);
        return p.is_file().then_some(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(
            [
                "/usr/local/sbin",
                "/usr/local/bin",
                "/usr/sbin",
                "/usr/bin",
                "/sbin",
                "/bin",
            ]
            .map(PathBuf::from),
        )
        .map(|d| d.join(name))
        .find(|p| {
            use std::os::unix::fs::PermissionsExt;
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// An ELF without a program interpreter (`PT_INTERP`) is statically linked.
fn is_static(path: &Path) -> bool {
    let Ok(b) = fs::read(path) else { return false };
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 || b[5] != 1 {
        return false; // not a little-endian ELF64: not something we can use either way
    }
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(b[32..40].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(54), u16_at(56));
    (0..phnum).all(|i| {
        let o = phoff + i * phentsize;
        o + 4 > b.len() || u32::from_le_bytes(b[o..o + 4].try_into().unwrap()) != 3
    })
}

pub(crate) fn is_root() -> bool {
    // Without libc: the owner of /proc/self is the process's effective uid.
    use std::os::unix::fs::MetadataExt;
    fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

pub(crate) fn run_checked(cmd: &mut Command) -> Result<std::process::Output, String> {
    let out = cmd.output().map_err(|e| format!("running {cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(out)
}

/// Takes an exclusive lock on `path` (created if missing), held until the file is dropped.
pub(crate) fn lock_file(path: &Path) -> Result<fs::File, String> {
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| format!("opening lock {}: {e}", path.display()))?;
    match f.try_lock() {
        Ok(()) => return Ok(f),
        Err(fs::TryLockError::WouldBlock) => {
            eprintln!(
                "vm: waiting for lock {} (another test or process holds it)",
                path.display()
            );
        }
        Err(fs::TryLockError::Error(e)) => return Err(format!("locking {}: {e}", path.display())),
    }
    f.lock()
        .map_err(|e| format!("locking {}: {e}", path.display()))?;
    Ok(f)
}
