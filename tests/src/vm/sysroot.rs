//! The guest's `/usr`: host tools and every shared library the guest's dynamic binaries
//! need, packed into a read-only ext2 image attached as an extra virtio disk.
//!
//! Why not the initramfs, as one would first try: the initramfs lives in guest RAM, twice
//! during unpacking. `fio` alone drags in 85 MB of libraries (ceph, gluster, ICU data), and
//! a 256 MiB guest then fails with "Initramfs unpacking failed: write error". Worse, for the
//! OOM tests RAM-resident binaries would distort exactly what is measured. On a disk, the
//! tools are page cache the guest can evict, as on a real system.
//!
//! The host is merged-/usr (Debian 12): `/lib`, `/lib64`, `/sbin` are symlinks into `/usr`,
//! and the initramfs recreates those symlinks, so every library path `ldd` reports resolves
//! inside the mounted image. Images are cached by content key in `target/vm-cache/usr/`.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

use super::cpio::Source;
use super::env::{lock_file, run_checked, VmEnv};

/// Cached images kept; older ones are deleted when a new image is built.
const KEEP_IMAGES: usize = 6;

/// A file destined for the image, at `guest` (an absolute path under `/usr`).
#[derive(Debug, Clone)]
pub struct UsrFile {
    pub guest: String,
    pub source: Source,
    pub mode: u32,
}

/// The guest path at which the dynamic loader will look for `host` (e.g.
/// `/lib/x86_64-linux-gnu/libc.so.6` → `/usr/lib/x86_64-linux-gnu/libc.so.6`): the parent
/// directory is canonicalized (resolving the merged-/usr symlinks), the file name is kept,
/// because the name is what the loader asks for, even when the host file is a symlink.
pub fn guest_path(host: &Path) -> Result<String, String> {
    let parent = host
        .parent()
        .ok_or_else(|| format!("{} has no parent", host.display()))?;
    let parent =
        fs::canonicalize(parent).map_err(|e| format!("resolving {}: {e}", parent.display()))?;
    let p = parent.join(host.file_name().unwrap());
    let s = p.to_string_lossy().into_owned();
    if !s.starts_with("/usr/") {
        return Err(format!(
            "{s} is outside /usr: the VM harness expects a merged-/usr host (Debian 12 or later)"
        ));
    }
    Ok(s)
}

/// The shared libraries (and the dynamic loader) `ldd` says `elf` needs, as host paths.
/// Static binaries and scripts need none.
pub fn libraries(elf: &Path) -> Result<Vec<PathBuf>, String> {
    let out = Command::new("ldd")
        .arg(elf)
        .output()
        .map_err(|e| format!("running ldd: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // "not a dynamic executable" (static binary or script) is fine; anything else is not.
        let err = String::from_utf8_lossy(&out.stderr);
        if text.contains("not a dynamic executable") || err.contains("not a dynamic executable") {
            return Ok(vec![]);
        }
        return Err(format!("ldd {} failed: {text}{err}", elf.display()));
    }
    let mut libs = vec![];
    for line in text.lines() {
        let line = line.trim();
        if line.contains("not found") {
            return Err(format!("{}: library {line}", elf.display()));
        }
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = match line.split_once("=>") {
            Some((_, rhs)) => rhs.trim(),
            None => line,
        };
        let path = path.split(" (").next().unwrap_or("").trim();
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

/// Returns the path of a cached image holding `files`, building it if needed.
pub fn image(env: &VmEnv, files: &[UsrFile]) -> Result<PathBuf, String> {
    let mut files = files.to_vec();
    files.sort_by(|a, b| a.guest.cmp(&b.guest));
    files.dedup_by(|a, b| a.guest == b.guest);
    let dir = env.cache.join("usr");
    fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let img = dir.join(format!("{:016x}.img", key(&files)?));
    let _lock = lock_file(&env.cache.join("usr.lock"))?;
    if img.exists() {
        // Mark as recently used, for pruning.
        let _ = fs::File::options()
            .write(true)
            .open(&img)
            .and_then(|f| f.set_modified(SystemTime::now()));
        return Ok(img);
    }
    let stage = dir.join("stage.tmp");
    let _ = fs::remove_dir_all(&stage);
    let mut bytes = 0u64;
    for f in &files {
        let rel = f
            .guest
            .strip_prefix("/usr/")
            .expect("guest paths are under /usr");
        let dst = stage.join(rel);
        fs::create_dir_all(dst.parent().unwrap()).map_err(|e| e.to_string())?;
        match &f.source {
            Source::Host(h) => fs::copy(h, &dst)
                .map_err(|e| format!("copying {} into the /usr image: {e}", h.display()))?,
            Source::Bytes(b) => {
                fs::write(&dst, b).map_err(|e| e.to_string())?;
                b.len() as u64
            }
        };
        fs::set_permissions(&dst, fs::Permissions::from_mode(f.mode)).map_err(|e| e.to_string())?;
        bytes += fs::metadata(&dst)
            .map_err(|e| e.to_string())?
            .len()
            .div_ceil(4096)
            * 4096;
    }
    // Room for ext2 metadata (inode tables, block bitmaps, indirect blocks).
    let mib = (bytes + bytes / 8).div_ceil(1 << 20) + 8;
    let tmp = dir.join("image.tmp");
    let _ = fs::remove_file(&tmp);
    run_checked(
        Command::new(&env.mke2fs)
            .args([
                "-q",
                "-F",
                "-t",
                "ext2",
                "-m",
                "0",
                "-L",
                "vm-usr",
                "-E",
                "root_owner=0:0",
            ])
            .arg("-d")
            .arg(&stage)
            .arg(&tmp)
            .arg(format!("{mib}M")),
    )?;
    fs::rename(&tmp, &img).map_err(|e| format!("renaming to {}: {e}", img.display()))?;
    let _ = fs::remove_dir_all(&stage);
    prune(&dir);
    Ok(img)
}

/// Content key: guest paths, modes, and for host files their path, size and mtime (the
/// libraries change only with package upgrades); bytes are hashed. FNV-1a, because it is
/// stable across Rust versions, unlike `DefaultHasher`.
fn key(files: &[UsrFile]) -> Result<u64, String> {
    let mut h = Fnv(0xcbf29ce484222325);
    h.write(b"v1");
    for f in files {
        h.write(f.guest.as_bytes());
        h.write(&f.mode.to_le_bytes());
        match &f.source {
            Source::Host(p) => {
                let m = fs::metadata(p).map_err(|e| format!("{}: {e}", p.display()))?;
                h.write(p.to_string_lossy().as_bytes());
                h.write(&m.len().to_le_bytes());
                let t = m
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                    .unwrap_or_default();
                h.write(&t.as_nanos().to_le_bytes());
            }
            Source::Bytes(b) => h.write(b),
        }
    }
    Ok(h.0)
}

struct Fnv(u64);
impl Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes.iter().chain(&[0xffu8]) {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x100000001b3);
        }
    }
}

fn prune(dir: &Path) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    let mut imgs: Vec<(SystemTime, PathBuf)> = rd
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "img"))
        .filter_map(|p| Some((fs::metadata(&p).ok()?.modified().ok()?, p)))
        .collect();
    imgs.sort();
    while imgs.len() > KEEP_IMAGES {
        let (_, p) = imgs.remove(0);
        let _ = fs::remove_file(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loader_paths_land_in_usr() {
        // Debian 12 is merged-/usr; these are the paths ldd prints for every binary.
        if Path::new("/lib64/ld-linux-x86-64.so.2").exists() {
            assert_eq!(
                guest_path(Path::new("/lib64/ld-linux-x86-64.so.2")).unwrap(),
                "/usr/lib64/ld-linux-x86-64.so.2"
            );
        }
        let sh = libraries(Path::new("/bin/sh")).unwrap();
        assert!(sh.iter().any(|p| p.to_string_lossy().contains("libc.so")));
    }
}
