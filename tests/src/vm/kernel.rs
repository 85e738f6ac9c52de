//! Which kernel a VM boots, and fetching it from Debian into the cache.
//!
//! Two kernels (`UBLK_CRYPT_VM_KERNEL`):
//! * `6.12` (the default): Debian 12's cloud kernel from the host's own apt sources, pinned in
//!   the cache the first time it is resolved, so runs never drift;
//! * `newest`: the cloud kernel of Debian's unstable suite (7.2 when this was written),
//!   resolved at run time through the host's Debian mirror with a private sources list and
//!   apt state under the cache (`-o Dir::State::Lists=... -o Dir::Cache=...`), so the host's
//!   apt setup is untouched. Its package layout differs: the image package is empty and
//!   depends on `linux-binary-<ver>` (the kernel, `usr/lib/modules/<ver>/vmlinuz`) and
//!   `linux-modules-<ver>`; both are fetched.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use super::env::{lock_file, run_checked};

/// A kernel the harness can boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelChoice {
    /// Debian 12's `linux-image-6.12-cloud-amd64`.
    Debian12,
    /// Debian unstable's `linux-image-cloud-amd64`.
    Newest,
}

impl KernelChoice {
    /// Every kernel the harness knows, in the order CI runs them.
    pub const ALL: [KernelChoice; 2] = [KernelChoice::Debian12, KernelChoice::Newest];

    /// From `UBLK_CRYPT_VM_KERNEL` (`6.12`, the default, or `newest`).
    pub fn from_env() -> Result<KernelChoice, String> {
        match std::env::var("UBLK_CRYPT_VM_KERNEL") {
            Err(_) => Ok(KernelChoice::Debian12),
            Ok(v) => KernelChoice::parse(&v),
        }
    }

    pub fn parse(s: &str) -> Result<KernelChoice, String> {
        match s {
            "" | "6.12" | "debian12" => Ok(KernelChoice::Debian12),
            "newest" | "unstable" => Ok(KernelChoice::Newest),
            other => Err(format!(
                "UBLK_CRYPT_VM_KERNEL={other}: expected 6.12 or newest"
            )),
        }
    }

    /// The name used in the cache and in messages.
    pub fn name(self) -> &'static str {
        match self {
            KernelChoice::Debian12 => "6.12",
            KernelChoice::Newest => "newest",
        }
    }

    /// The meta package that names the versioned image package.
    pub fn meta_package(self) -> &'static str {
        match self {
            KernelChoice::Debian12 => "linux-image-6.12-cloud-amd64",
            KernelChoice::Newest => "linux-image-cloud-amd64",
        }
    }
}

/// How long the private unstable package lists are trusted before `apt-get update` again.
const LISTS_MAX_AGE: Duration = Duration::from_secs(6 * 3600);

/// Returns the unpacked kernel directory for `choice`, fetching it if needed.
///
/// 6.12 is resolved once and pinned in `<cache>/kernel/current` (delete `target/vm-cache/kernel`
/// to move on). The newest is resolved at run time (package lists refreshed when older than
/// six hours); if Debian cannot be reached, the last one fetched is used, said loudly.
/// Serialized across processes by a lock file; idempotent (a `.complete` stamp is written last).
pub fn fetch(cache: &Path, choice: KernelChoice) -> Result<PathBuf, String> {
    let kdir = cache.join("kernel");
    fs::create_dir_all(&kdir).map_err(|e| format!("creating {}: {e}", kdir.display()))?;
    let _lock = lock_file(&cache.join("fetch.lock"))?;
    let current = kdir.join(match choice {
        KernelChoice::Debian12 => "current".to_string(),
        KernelChoice::Newest => "current-newest".to_string(),
    });
    let cached = fs::read_to_string(&current)
        .ok()
        .map(|p| kdir.join(p.trim()))
        .filter(|d| d.join(".complete").exists());
    let apt = match choice {
        KernelChoice::Debian12 => {
            if let Some(dir) = cached {
                return Ok(dir);
            }
            Apt::Host
        }
        KernelChoice::Newest => match Apt::unstable(cache) {
            Ok(apt) => apt,
            Err(e) => {
                return cached.ok_or(e.clone()).inspect(|d| {
                    loud(&format!(
                        "vm: cannot refresh Debian unstable ({e}); using the last newest kernel \
                         fetched, {}",
                        d.display()
                    ))
                })
            }
        },
    };
    let pkg = apt.resolve(choice.meta_package())?;
    let dir = kdir.join(&pkg);
    if !dir.join(".complete").exists() {
        // The new layout splits the kernel and its modules out of the image package.
        let mut pkgs = vec![pkg.clone()];
        pkgs.extend(
            apt.depends(&pkg)?
                .into_iter()
                .filter(|d| d.starts_with("linux-binary-") || d.starts_with("linux-modules-")),
        );
        eprintln!(
            "vm: fetching kernel {} into {}",
            pkgs.join(" "),
            dir.display()
        );
        let dl = kdir.join("download.tmp");
        let _ = fs::remove_dir_all(&dl);
        fs::create_dir_all(&dl).map_err(|e| format!("creating {}: {e}", dl.display()))?;
        run_checked(apt.get().arg("download").args(&pkgs).current_dir(&dl))?;
        let tmp = kdir.join(format!("{pkg}.tmp"));
        let _ = fs::remove_dir_all(&tmp);
        for deb in fs::read_dir(&dl)
            .map_err(|e| e.to_string())?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        {
            run_checked(Command::new("dpkg").arg("-x").arg(&deb).arg(&tmp))?;
        }
        let _ = fs::remove_dir_all(&dir);
        fs::rename(&tmp, &dir).map_err(|e| format!("renaming {}: {e}", tmp.display()))?;
        locate(&dir)?; // check before declaring it complete
        fs::write(dir.join(".complete"), b"").map_err(|e| e.to_string())?;
        let _ = fs::remove_dir_all(&dl);
    }
    fs::write(&current, &pkg).map_err(|e| format!("writing {}: {e}", current.display()))?;
    Ok(dir)
}

/// Finds the kernel image and `modules/<release>` under an unpacked kernel package, in either
/// layout: `boot/vmlinuz-<release>` + `lib/modules/<release>` (6.12), or
/// `usr/lib/modules/<release>/vmlinuz` (the split packages of newer kernels).
pub fn locate(root: &Path) -> Result<(PathBuf, PathBuf, String), String> {
    if let Ok(entries) = fs::read_dir(root.join("boot")) {
        for e in entries.filter_map(Result::ok) {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(release) = name.strip_prefix("vmlinuz-") {
                for base in ["lib/modules", "usr/lib/modules"] {
                    let modules = root.join(base).join(release);
                    if modules.is_dir() {
                        return Ok((e.path(), modules, release.to_string()));
                    }
                }
                return Err(format!(
                    "kernel {release} has no modules under {}",
                    root.display()
                ));
            }
        }
    }
    for base in ["usr/lib/modules", "lib/modules"] {
        if let Ok(entries) = fs::read_dir(root.join(base)) {
            for e in entries.filter_map(Result::ok) {
                let image = e.path().join("vmlinuz");
                if image.is_file() {
                    let release = e.file_name().to_string_lossy().into_owned();
                    return Ok((image, e.path(), release));
                }
            }
        }
    }
    Err(format!(
        "no kernel in {} (neither boot/vmlinuz-* nor usr/lib/modules/*/vmlinuz)",
        root.display()
    ))
}

/// Straight to fd 2: libtest captures `eprintln!` of passing tests, and these must be seen.
pub(crate) fn loud(msg: &str) {
    use std::io::Write;
    let _ = std::io::stderr().write_all(format!("{msg}\n").as_bytes());
}

/// The apt the kernel comes from.
enum Apt {
    /// The host's own sources and state (Debian 12).
    Host,
    /// Debian unstable through the host's mirror, with private lists, cache and sources.
    Unstable { dir: PathBuf },
}

impl Apt {
    /// Sets up (and refreshes when stale) the private unstable apt state in `<cache>/apt-unstable`.
    fn unstable(cache: &Path) -> Result<Apt, String> {
        let dir = cache.join("apt-unstable");
        for d in ["lists/partial", "cache/archives/partial"] {
            fs::create_dir_all(dir.join(d)).map_err(|e| format!("creating {d}: {e}"))?;
        }
        let sources = format!(
            "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {} unstable main\n",
            host_debian_mirror()
        );
        let list = dir.join("sources.list");
        let changed = fs::read_to_string(&list).ok().as_deref() != Some(sources.as_str());
        fs::write(&list, &sources).map_err(|e| format!("writing {}: {e}", list.display()))?;
        let apt = Apt::Unstable { dir: dir.clone() };
        let stamp = dir.join("updated");
        let fresh = fs::metadata(&stamp)
            .and_then(|m| m.modified())
            .is_ok_and(|t| SystemTime::now().duration_since(t).unwrap_or_default() < LISTS_MAX_AGE);
        if changed || !fresh {
            run_checked(apt.get().args(["update", "-q"]))?;
            fs::write(&stamp, b"").map_err(|e| e.to_string())?;
        }
        Ok(apt)
    }

    fn options(&self, cmd: &mut Command) {
        if let Apt::Unstable { dir } = self {
            let o = |k: &str, v: &Path| format!("{k}={}", v.display());
            cmd.arg("-o")
                .arg(o("Dir::Etc::SourceList", &dir.join("sources.list")))
                .args(["-o", "Dir::Etc::SourceParts=/dev/null"])
                .arg("-o")
                .arg(o("Dir::State::Lists", &dir.join("lists")))
                .arg("-o")
                .arg(o("Dir::Cache", &dir.join("cache")))
                .args(["-o", "APT::Get::List-Cleanup=0"]);
            if super::env::is_root() {
                // The private directories belong to root; apt's `_apt` sandbox cannot write them.
                cmd.args(["-o", "APT::Sandbox::User=root"]);
            }
        }
    }

    fn get(&self) -> Command {
        let mut cmd = Command::new("apt-get");
        self.options(&mut cmd);
        cmd
    }

    /// The packages `pkg` depends on (first alternatives only).
    fn depends(&self, pkg: &str) -> Result<Vec<String>, String> {
        let mut cmd = Command::new("apt-cache");
        self.options(&mut cmd);
        let out = cmd
            .args(["depends", pkg])
            .output()
            .map_err(|e| format!("running apt-cache (is this a Debian host?): {e}"))?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let dep = l.trim().trim_start_matches('|').strip_prefix("Depends:")?;
                Some(dep.trim().to_string())
            })
            .filter(|d| !d.starts_with('<'))
            .collect())
    }

    /// `meta` → the versioned `linux-image-<ver>` package it depends on. With empty host
    /// package lists (a fresh container) runs `apt-get update` once when root.
    fn resolve(&self, meta: &str) -> Result<String, String> {
        let query = || -> Result<Option<String>, String> {
            Ok(self
                .depends(meta)?
                .into_iter()
                .find(|d| d.starts_with("linux-image-")))
        };
        if let Some(p) = query()? {
            return Ok(p);
        }
        if matches!(self, Apt::Host) && super::env::is_root() {
            eprintln!("vm: {meta} unknown to apt; running apt-get update");
            run_checked(Command::new("apt-get").args(["update", "-q"]))?;
            if let Some(p) = query()? {
                return Ok(p);
            }
        }
        Err(format!(
            "apt-cache does not know {meta}; run `apt-get update` (as root), or set \
             UBLK_CRYPT_VM_KERNEL_DIR to an unpacked kernel package"
        ))
    }
}

/// The host's apt sources files: `/etc/apt/sources.list` and `sources.list.d/*.{list,sources}`.
pub(crate) fn host_apt_source_files() -> Vec<PathBuf> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(rd) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "list" || x == "sources"))
            .collect();
        more.sort();
        files.extend(more);
    }
    files
}

/// The Debian archive the host's apt uses (`URIs:` of a deb822 `.sources` file or the URL of
/// a one-line `deb` entry, whichever names the main archive first); deb.debian.org otherwise.
fn host_debian_mirror() -> String {
    let files = host_apt_source_files();
    for f in files {
        let Ok(text) = fs::read_to_string(&f) else {
            continue;
        };
        for line in text.lines().map(str::trim) {
            if line.starts_with('#') {
                continue;
            }
            let urls: Vec<&str> = if let Some(u) = line.strip_prefix("URIs:") {
                u.split_whitespace().collect()
            } else if line.starts_with("deb ") {
                line.split_whitespace()
                    .filter(|w| w.contains("://"))
                    .take(1)
                    .collect()
            } else {
                vec![]
            };
            if let Some(u) = urls
                .into_iter()
                .find(|u| u.trim_end_matches('/').ends_with("/debian"))
            {
                return u.trim_end_matches('/').to_string();
            }
        }
    }
    "http://deb.debian.org/debian".to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_choices_parse() {
        assert_eq!(KernelChoice::parse("6.12"), Ok(KernelChoice::Debian12));
        assert_eq!(KernelChoice::parse("newest"), Ok(KernelChoice::Newest));
        assert!(KernelChoice::parse("7.1")
            .unwrap_err()
            .contains("6.12 or newest"));
    }

    #[test]
    fn both_package_layouts_are_found() {
        let base = std::env::temp_dir().join(format!("kernel-layout-{}", std::process::id()));
        let old = base.join("old");
        fs::create_dir_all(old.join("boot")).unwrap();
        fs::create_dir_all(old.join("lib/modules/6.12.1-cloud")).unwrap();
        fs::write(old.join("boot/vmlinuz-6.12.1-cloud"), b"k").unwrap();
        let (k, m, r) = locate(&old).unwrap();
        assert_eq!(r, "6.12.1-cloud");
        assert!(
            k.ends_with("boot/vmlinuz-6.12.1-cloud") && m.ends_with("lib/modules/6.12.1-cloud")
        );
        let new = base.join("new");
        fs::create_dir_all(new.join("usr/lib/modules/7.2.1-cloud/kernel")).unwrap();
        fs::write(new.join("usr/lib/modules/7.2.1-cloud/vmlinuz"), b"k").unwrap();
        let (k, m, r) = locate(&new).unwrap();
        assert_eq!(r, "7.2.1-cloud");
        assert!(k.ends_with("usr/lib/modules/7.2.1-cloud/vmlinuz"));
        assert!(m.ends_with("usr/lib/modules/7.2.1-cloud"));
        assert!(locate(&base).is_err());
        fs::remove_dir_all(&base).unwrap();
    }
}
