//! Everything a boot needs, built before the VM lock is taken: the modules, the `/usr` image,
//! the initramfs, the disks, and the run directory that holds them.

use super::*;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime};

impl VmBuilder {
    /// Builds everything a boot needs (before taking the VM lock: a run waiting for the lock
    /// has its initramfs ready by the time it gets it).
    pub(super) fn prepare(&self, script: &str) -> Result<Prepared, VmError> {
        let env = VmEnv::get().map_err(VmError::Unavailable)?;
        if !(1..=64).contains(&self.cpus) || self.memory_mib < 64 {
            return Err(VmError::Setup(format!(
                "unreasonable VM: {} CPUs, {} MiB",
                self.cpus, self.memory_mib
            )));
        }
        let run = RunDir::create(&self.run_name(), self.keep)?;
        let setup = |e: String| VmError::Setup(e);

        // Modules.
        let wanted = match self.root_disk {
            Some(_) => vec!["virtio_blk".to_string()],
            None => self.modules.clone(),
        };
        let modules = kmod::resolve(env, &wanted).map_err(setup)?;
        if let Some(i) = self.root_disk {
            if i >= self.disks.len() || !self.host_tools.is_empty() {
                return Err(setup(format!(
                    "switch_root({i}): needs that disk ({} added) and no host tools",
                    self.disks.len()
                )));
            }
        }
        // With a root disk, everything for the guest is copied onto it from /vm/overlay.
        let overlay = if self.root_disk.is_some() {
            "/vm/overlay"
        } else {
            ""
        };

        // What goes where.
        let mut usr: Vec<UsrFile> = vec![];
        let mut ar = Archive::new();
        let add_libs = |elf: &Path, usr: &mut Vec<UsrFile>| -> Result<(), String> {
            for lib in sysroot::libraries(elf)? {
                usr.push(UsrFile {
                    guest: sysroot::guest_path(&lib)?,
                    source: Source::Host(lib),
                    mode: 0o755,
                });
            }
            Ok(())
        };
        for tool in &self.host_tools {
            let host = env::find_program(tool)
                .ok_or_else(|| setup(format!("host tool {tool} not found on this host")))?;
            add_libs(&host, &mut usr).map_err(setup)?;
            usr.push(UsrFile {
                guest: sysroot::guest_path(&host).map_err(setup)?,
                source: Source::Host(host),
                mode: 0o755,
            });
        }
        for bin in &self.binaries {
            if !bin.is_file() {
                return Err(setup(format!(
                    "binary {} does not exist (scripts/test builds release binaries first; \
                     or run `cargo build --release --bins`)",
                    bin.display()
                )));
            }
            add_libs(bin, &mut usr).map_err(setup)?;
            let name = bin.file_name().unwrap().to_string_lossy();
            let src = match env::find_program("objcopy") {
                Some(objcopy) if !self.debuginfo => {
                    let stripped = run.path.join(format!("stripped-{name}"));
                    env::run_checked(
                        Command::new(objcopy)
                            .arg("--strip-debug")
                            .arg(bin)
                            .arg(&stripped),
                    )
                    .map_err(setup)?;
                    stripped
                }
                _ => bin.clone(),
            };
            ar.file(
                &format!("{overlay}/vm/bin/{name}"),
                Source::Host(src),
                0o755,
            )
            .map_err(setup)?;
        }
        for (guest, source, mode) in &self.files {
            const HIDDEN: &[&str] = &["/proc", "/sys", "/dev", "/run", "/tmp", "/vm"];
            if guest == "/init" || HIDDEN.iter().any(|h| guest.starts_with(&format!("{h}/"))) {
                return Err(setup(format!(
                    "guest file {guest}: that path is hidden by a mount or reserved by the harness"
                )));
            }
            if self.root_disk.is_some() {
                ar.file(&format!("{overlay}{guest}"), source.clone(), *mode)
                    .map_err(setup)?;
            } else if guest.starts_with("/usr/") {
                usr.push(UsrFile {
                    guest: guest.clone(),
                    source: source.clone(),
                    mode: *mode,
                });
            } else {
                ar.file(guest, source.clone(), *mode).map_err(setup)?;
            }
        }
        let usr_image = if usr.is_empty() {
            None
        } else {
            Some(sysroot::image(env, &usr).map_err(setup)?)
        };

        // The initramfs proper.
        let init = match self.root_disk {
            Some(i) => switch_root_init(&modules, i),
            None => init_script(&modules, usr_image.is_some()),
        };
        let full_script = format!(". /vm/lib.sh\nset -e\n{script}\n");
        if self.root_disk.is_some() {
            (|| -> Result<(), String> {
                ar.file(
                    "/vm/overlay/vm/run.sh",
                    Source::Bytes(SYSTEMD_RUNNER.as_bytes().to_vec()),
                    0o755,
                )?;
                ar.file(
                    "/vm/overlay/etc/systemd/system/vm-test.service",
                    Source::Bytes(SYSTEMD_TEST_UNIT.as_bytes().to_vec()),
                    0o644,
                )?;
                ar.symlink(
                    "/vm/overlay/etc/systemd/system/multi-user.target.wants/vm-test.service",
                    "../vm-test.service",
                )
            })()
            .map_err(setup)?;
        }
        (|| -> Result<(), String> {
            ar.add(
                "/dev/console",
                Node::CharDev {
                    major: 5,
                    minor: 1,
                    mode: 0o600,
                },
            )?;
            ar.file("/bin/busybox", Source::Host(env.busybox.clone()), 0o755)?;
            ar.file("/init", Source::Bytes(init.into_bytes()), 0o755)?;
            ar.file(
                &format!("{overlay}/vm/lib.sh"),
                Source::Bytes(GUEST_LIB.as_bytes().to_vec()),
                0o644,
            )?;
            ar.file(
                &format!("{overlay}/vm/script.sh"),
                Source::Bytes(full_script.into_bytes()),
                0o755,
            )?;
            for m in &modules {
                ar.file(
                    &format!("/vm/modules/{}.ko", m.name),
                    Source::Host(m.ko.clone()),
                    0o644,
                )?;
            }
            // Merged /usr, as on the host, so the paths ldd reports resolve on the /usr disk.
            ar.symlink("/lib", "usr/lib")?;
            ar.symlink("/lib64", "usr/lib64")?;
            ar.symlink("/sbin", "usr/sbin")?;
            ar.symlink("/etc/mtab", "/proc/self/mounts")?;
            let etc = [
                ("/etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
                ("/etc/group", "root:x:0:\ndisk:x:6:\n"),
            ];
            for (p, c) in etc {
                ar.file(p, Source::Bytes(c.as_bytes().to_vec()), 0o644)?;
            }
            for d in [
                "/proc", "/sys", "/run", "/tmp", "/usr", "/root", "/mnt", "/dev",
            ] {
                ar.dir(d)?;
            }
            Ok(())
        })()
        .map_err(setup)?;
        let initramfs = run.path.join("initramfs.cpio");
        ar.write_to(&initramfs)
            .map_err(|e| setup(format!("writing {}: {e}", initramfs.display())))?;

        // Disks.
        let mut disks = vec![];
        for (i, d) in self.disks.iter().enumerate() {
            let path = match d {
                DiskSpec::New(mib) => {
                    let p = run.path.join(format!("disk{i}.img"));
                    let f = fs::File::create(&p)
                        .map_err(|e| setup(format!("creating {}: {e}", p.display())))?;
                    f.set_len(mib << 20)
                        .map_err(|e| setup(format!("sizing {}: {e}", p.display())))?;
                    p
                }
                DiskSpec::Existing(p) => fs::canonicalize(p)
                    .map_err(|e| setup(format!("disk image {}: {e}", p.display())))?,
            };
            disks.push(Disk {
                direct: supports_o_direct(&path),
                path,
            });
        }
        let mut run = run;
        run.disks = disks;
        Ok(Prepared {
            env,
            run,
            initramfs,
            usr_image,
        })
    }
}

/// Everything prepared for one boot.
pub(super) struct Prepared {
    pub(super) env: &'static VmEnv,
    pub(super) run: RunDir,
    pub(super) initramfs: PathBuf,
    pub(super) usr_image: Option<PathBuf>,
}

#[derive(Debug)]
pub(super) struct Disk {
    pub(super) path: PathBuf,
    pub(super) direct: bool,
}

/// Whether the file can be opened with `O_DIRECT` (qemu's `cache=none` needs it; tmpfs and
/// some overlay setups refuse it).
pub(super) fn supports_o_direct(path: &Path) -> bool {
    #[cfg(target_arch = "x86_64")]
    const O_DIRECT: i32 = 0o40000;
    #[cfg(target_arch = "aarch64")]
    const O_DIRECT: i32 = 0o200000;
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    return false;
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    {
        use std::os::unix::fs::OpenOptionsExt;
        fs::OpenOptions::new()
            .read(true)
            .custom_flags(O_DIRECT)
            .open(path)
            .is_ok()
    }
}

/// The run directory: `<target>/vm-runs/<name>-<pid>-<n>/`, holding the initramfs, the
/// created disks, stripped binaries and `console.log`. Unless kept, dropping it deletes
/// everything but the log.
#[derive(Debug)]
pub(super) struct RunDir {
    pub(super) path: PathBuf,
    pub(super) disks: Vec<Disk>,
    pub(super) keep: bool,
}

impl RunDir {
    fn create(name: &str, keep: bool) -> Result<RunDir, VmError> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let base = crate::target_dir().join("vm-runs");
        prune_runs(&base);
        let path = base.join(format!(
            "{name}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path)
            .map_err(|e| VmError::Setup(format!("creating {}: {e}", path.display())))?;
        let keep = keep || std::env::var("UBLK_CRYPT_VM_KEEP").is_ok_and(|v| v == "1");
        Ok(RunDir {
            path,
            disks: vec![],
            keep,
        })
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        // Everything in the run directory but the log: created disks, initramfs, stripped
        // binaries. Caller-owned disk images live elsewhere and are never touched.
        if let Ok(rd) = fs::read_dir(&self.path) {
            for e in rd.filter_map(Result::ok) {
                if e.file_name() != "console.log" {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
    }
}

/// Deletes run directories (logs, kept disks) older than two days.
pub(super) fn prune_runs(base: &Path) {
    let Ok(rd) = fs::read_dir(base) else { return };
    let old = SystemTime::now() - Duration::from_secs(2 * 86400);
    for e in rd.filter_map(Result::ok) {
        if e.metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t < old)
        {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}
