//! Kernel module resolution for the guest: which `.ko` files to load, in which order.
//!
//! Debian's package ships no `modules.dep` (depmod runs at install time) and the guest has
//! no `modprobe` database, so the harness reads each module's own `depends=` and
//! `softdep=pre:` from its `.modinfo` strings and orders the load list itself. The guest
//! then only needs busybox `insmod`, which cannot read `.ko.xz`: modules are decompressed on
//! the host, once, into the cache.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use super::env::{run_checked, VmEnv};

/// The modules every guest gets: the block and crypto stack ublk-crypt is tested against.
/// `virtio_blk` for the disks (it is a module in Debian's kernel); `ublk_drv` for
/// `/dev/ublk-control`; `dm-crypt` (pulls `dm-mod`) as the reference implementation;
/// `xts` and `aesni-intel` so `aes-xts-plain64` uses the same accelerated code as on real
/// hardware (TCG's `-cpu max` emulates AES-NI).
pub const DEFAULT_MODULES: &[&str] = &["virtio_blk", "ublk_drv", "dm-crypt", "xts", "aesni-intel"];

/// A module ready for `insmod`: its name and the decompressed file on the host.
#[derive(Debug, Clone)]
pub struct Module {
    pub name: String,
    pub ko: PathBuf,
}

/// `dm-crypt` and `dm_crypt` name the same module.
fn norm(name: &str) -> String {
    name.replace('-', "_")
}

/// Resolves `wanted` and their dependencies into load order (dependencies first), skipping
/// modules built into the kernel. Unknown names are an error.
pub fn resolve(env: &VmEnv, wanted: &[String]) -> Result<Vec<Module>, String> {
    let index = index(&env.modules_dir)?;
    let builtin = builtin(&env.modules_dir);
    let kodir = env.cache.join("ko").join(&env.release);
    fs::create_dir_all(&kodir).map_err(|e| format!("creating {}: {e}", kodir.display()))?;
    let mut order = vec![];
    let mut seen = HashSet::new();
    for w in wanted {
        if !index.contains_key(&norm(w)) && !builtin.is_builtin(&norm(w)) {
            return Err(format!(
                "kernel {} has no module {w} (neither a .ko nor built in)",
                env.release
            ));
        }
        visit(w, &index, &builtin, &kodir, &mut seen, &mut order, 0)?;
    }
    Ok(order)
}

fn visit(
    name: &str,
    index: &BTreeMap<String, PathBuf>,
    builtin: &Builtin,
    kodir: &Path,
    seen: &mut HashSet<String>,
    order: &mut Vec<Module>,
    depth: usize,
) -> Result<(), String> {
    let key = norm(name);
    if depth > 64 {
        return Err(format!("module dependency loop at {name}"));
    }
    if !seen.insert(key.clone()) {
        return Ok(());
    }
    let Some(src) = index.get(&key) else {
        // Built in, or a soft dependency this kernel does not have as a module: nothing to load.
        return Ok(());
    };
    let ko = decompress(src, kodir)?;
    let data = fs::read(&ko).map_err(|e| format!("reading {}: {e}", ko.display()))?;
    let (deps, pre) = modinfo_deps(&data);
    for d in deps.iter() {
        if !index.contains_key(&norm(d)) && !builtin.is_builtin(&norm(d)) {
            return Err(format!(
                "module {name} depends on {d}, which this kernel lacks"
            ));
        }
    }
    for d in pre.iter().chain(deps.iter()) {
        visit(d, index, builtin, kodir, seen, order, depth + 1)?;
    }
    let stem = file_stem(src);
    order.push(Module { name: stem, ko });
    Ok(())
}

fn file_stem(p: &Path) -> String {
    let n = p.file_name().unwrap().to_string_lossy();
    n.split(".ko").next().unwrap().to_string()
}

/// Normalized module name → `.ko[.xz]` file, for every module of the kernel.
fn index(modules_dir: &Path) -> Result<BTreeMap<String, PathBuf>, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![modules_dir.join("kernel")];
    while let Some(d) = stack.pop() {
        let rd = fs::read_dir(&d).map_err(|e| format!("reading {}: {e}", d.display()))?;
        for e in rd.filter_map(Result::ok) {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(p);
            } else {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.ends_with(".ko") || n.ends_with(".ko.xz") {
                    out.insert(norm(&file_stem(&p)), p);
                }
            }
        }
    }
    if out.is_empty() {
        return Err(format!("no modules under {}", modules_dir.display()));
    }
    Ok(out)
}

/// The kernel's built-in modules, from `modules.builtin`.
struct Builtin(Option<HashSet<String>>);

impl Builtin {
    /// Without `modules.builtin` (the split packages of newer Debian kernels ship none: depmod
    /// writes it at install), a module that is not a `.ko` is taken as built in: `xts` is, since
    /// 7.x. The 6.12 run, which has the list, still catches a misspelt name.
    fn is_builtin(&self, name: &str) -> bool {
        self.0.as_ref().is_none_or(|set| set.contains(name))
    }
}

fn builtin(modules_dir: &Path) -> Builtin {
    Builtin(
        fs::read_to_string(modules_dir.join("modules.builtin"))
            .ok()
            .map(|text| {
                text.lines()
                    .filter_map(|l| l.rsplit('/').next())
                    .map(|n| norm(n.trim_end_matches(".ko")))
                    .collect()
            }),
    )
}

/// `.ko.xz` → `<kodir>/<name>.ko` (once; written to a temporary name and renamed, so a
/// concurrent or interrupted run never sees a half-written module).
fn decompress(src: &Path, kodir: &Path) -> Result<PathBuf, String> {
    let dst = kodir.join(format!("{}.ko", file_stem(src)));
    if dst.exists() {
        return Ok(dst);
    }
    let data = if src.extension().is_some_and(|e| e == "xz") {
        run_checked(Command::new("xz").arg("-dc").arg(src))?.stdout
    } else {
        fs::read(src).map_err(|e| format!("reading {}: {e}", src.display()))?
    };
    // Unique per process and per call: the tests of one binary set up their VMs on parallel
    // threads, and two threads sharing one temporary name lost the race of the rename (CI, stop 27:
    // "renaming to …/dm-mod.ko: No such file or directory").
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let tmp = kodir.join(format!(
        ".{}.{}.{}.tmp",
        file_stem(src),
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    fs::write(&tmp, &data).map_err(|e| format!("writing {}: {e}", tmp.display()))?;
    fs::rename(&tmp, &dst).map_err(|e| format!("renaming to {}: {e}", dst.display()))?;
    Ok(dst)
}

/// `(depends, softdep pre)` from the NUL-separated `key=value` strings of `.modinfo`.
fn modinfo_deps(ko: &[u8]) -> (Vec<String>, Vec<String>) {
    let mut deps = vec![];
    let mut pre = vec![];
    for s in ko.split(|&b| b == 0) {
        let s = String::from_utf8_lossy(s);
        if let Some(v) = s.strip_prefix("depends=") {
            deps.extend(v.split(',').filter(|x| !x.is_empty()).map(String::from));
        } else if let Some(v) = s.strip_prefix("softdep=") {
            // "pre: a b post: c"
            let mut in_pre = false;
            for tok in v.split_whitespace() {
                match tok {
                    "pre:" => in_pre = true,
                    "post:" => in_pre = false,
                    t if in_pre => pre.push(t.to_string()),
                    _ => {}
                }
            }
        }
    }
    (deps, pre)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_modinfo_strings() {
        let blob = b"junk\0license=GPL\0softdep=pre: ecb cbc post: x\0depends=crypto_simd,gf128mul\0name=aesni_intel\0";
        let (d, p) = modinfo_deps(blob);
        assert_eq!(d, ["crypto_simd", "gf128mul"]);
        assert_eq!(p, ["ecb", "cbc"]);
        let (d, p) = modinfo_deps(b"\0depends=\0");
        assert!(d.is_empty() && p.is_empty());
    }

    /// The tests of one binary prepare their VMs on parallel threads of one process: each must
    /// get the module, none a failed rename (CI, stop 27).
    #[test]
    fn threads_of_one_process_decompress_the_same_module() {
        let base = std::env::temp_dir().join(format!("kmod-race-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        let kodir = base.join("ko");
        fs::create_dir_all(&kodir).unwrap();
        let src = base.join("dm-mod.ko");
        let body = vec![0x5a_u8; 1 << 20];
        fs::write(&src, &body).unwrap();
        for _ in 0..20 {
            let _ = fs::remove_file(kodir.join("dm-mod.ko"));
            let results: Vec<Result<PathBuf, String>> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..8)
                    .map(|_| s.spawn(|| decompress(&src, &kodir)))
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            for r in results {
                let ko = r.expect("decompress on a parallel thread");
                assert_eq!(fs::read(&ko).unwrap(), body);
            }
        }
        let leftovers = fs::read_dir(&kodir).unwrap().count();
        fs::remove_dir_all(&base).unwrap();
        assert_eq!(leftovers, 1, "only dm-mod.ko, no temporary file left");
    }
}
