//! The qemu VM harness: boot Debian's kernel under TCG with a busybox initramfs, run a
//! shell script as the test, and bring back its exit status, console and disk images.
//!
//! ```no_run
//! use std::time::Duration;
//! use ublk_crypt_tests::vm::{vm_or_skip, Vm};
//!
//! if !vm_or_skip("example") {
//!     return;
//! }
//! let out = Vm::builder()
//!     .memory_mib(256)
//!     .disk_mib(64)
//!     .host_tool("cryptsetup")
//!     .stall_timeout(Duration::from_secs(30))
//!     .run("test -c /dev/ublk-control\nvm_section hello echo hi")
//!     .unwrap();
//! assert_eq!(out.section("hello").unwrap(), "hi");
//! ```
//!
//! How a run works (see `tests/README.md` for the long version):
//! 1. [`VmEnv::get`] finds qemu, busybox-static, mke2fs and the kernel (fetched once into
//!    `target/vm-cache/`).
//! 2. Host tools and all shared libraries go into a cached read-only ext2 image mounted at
//!    `/usr`; busybox, `/init`, the decompressed modules, project binaries (`/vm/bin`) and
//!    test files go into an uncompressed initramfs written per run.
//! 3. qemu boots; `/init` mounts the API filesystems, loads the modules, mounts `/usr`, prints
//!    `@@VM-READY@@`, runs the script under `sh` with `set -e`, prints `@@VM-EXIT <code>@@`
//!    and powers off.
//! 4. The host streams the serial console into the test's output and a log file, watching
//!    for the markers, for kernel panics (oops, hung tasks and soft lockups are made to
//!    panic), for console silence (the stall detector) and for the overall deadline.

pub mod cpio;
mod env;
pub mod kmod;
pub mod rootfs;
mod sysroot;

pub use env::{cache_dir, in_ci, vm_or_skip, VmEnv, KERNEL_META_PACKAGE};

use std::fmt;
use std::fs;
use std::io::{self, BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use cpio::{Archive, Node, Source};
use sysroot::UsrFile;

/// Lines of console shown in an error message.
const TAIL_LINES: usize = 200;
/// After the exit marker (or a panic), how long qemu gets to exit on its own before it is
/// killed. `poweroff -f` normally ends it within a second.
const EXIT_GRACE: Duration = Duration::from_secs(15);
/// The same for a [`VmBuilder::switch_root`] guest, which runs `systemctl poweroff`: every
/// unit stops, swap included, under TCG.
const SYSTEMD_EXIT_GRACE: Duration = Duration::from_secs(90);

/// Kernel command line. Why each piece:
/// * `console=ttyS0`: the serial port is the console qemu gives us on stdio.
/// * `panic=-1` with qemu's `-no-reboot`: a panic ends qemu at once instead of hanging.
/// * `oops=panic hung_task_panic=1 softlockup_panic=1`: an oops, a task stuck in D state
///   (120 s) or a soft lockup — exactly how a swap deadlock shows — becomes a panic, which
///   the host reports as a failure instead of a test that "passed" on a broken kernel.
/// * `loglevel=5`: warnings and worse still reach the console (a WARN splat is worth
///   seeing), the ~300 info lines of a boot do not, so they don't drown the test's output
///   or interleave with its sections. `dmesg` in the guest still has everything.
/// * `edd=off`: skips a BIOS probe that costs time under TCG.
const KERNEL_ARGS: &str =
    "console=ttyS0 panic=-1 oops=panic hung_task_panic=1 softlockup_panic=1 loglevel=5 edd=off";

/// Entry point: `Vm::builder()`.
pub struct Vm;

impl Vm {
    /// A builder with defaults: 256 MiB, 1 CPU, no disks, the default modules
    /// ([`kmod::DEFAULT_MODULES`]), 60 s stall timeout, 300 s overall timeout.
    pub fn builder() -> VmBuilder {
        VmBuilder {
            name: None,
            memory_mib: 256,
            cpus: 1,
            disks: vec![],
            binaries: vec![],
            host_tools: vec![],
            files: vec![],
            modules: kmod::DEFAULT_MODULES
                .iter()
                .map(|m| m.to_string())
                .collect(),
            kernel_args: vec![],
            stall_timeout: Duration::from_secs(60),
            timeout: Duration::from_secs(300),
            keep: false,
            echo: true,
            debuginfo: false,
            root_disk: None,
        }
    }
}

#[derive(Debug, Clone)]
enum DiskSpec {
    /// A new sparse file of this many MiB in the run directory (deleted with the run).
    New(u64),
    /// A host file the caller owns (used as is, never deleted).
    Existing(PathBuf),
}

/// Describes one VM run; [`VmBuilder::run`] boots it.
#[derive(Debug, Clone)]
pub struct VmBuilder {
    name: Option<String>,
    memory_mib: u32,
    cpus: u32,
    disks: Vec<DiskSpec>,
    binaries: Vec<PathBuf>,
    host_tools: Vec<String>,
    files: Vec<(String, Source, u32)>,
    modules: Vec<String>,
    kernel_args: Vec<String>,
    stall_timeout: Duration,
    timeout: Duration,
    keep: bool,
    echo: bool,
    debuginfo: bool,
    root_disk: Option<usize>,
}

impl VmBuilder {
    /// Names the run (log file and run directory). Defaults to the current thread's name,
    /// which under `cargo test` is the test's name.
    pub fn name(mut self, name: &str) -> Self {
        self.name = Some(name.to_string());
        self
    }

    /// Guest RAM. Everything in the initramfs (busybox, modules, `/vm/bin`, files) lives in
    /// it; host tools do not (they are on the `/usr` disk).
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    /// Guest CPUs (1 or 2 on this 2-core host: TCG runs one host thread per vCPU).
    pub fn cpus(mut self, n: u32) -> Self {
        self.cpus = n;
        self
    }

    /// Adds a new sparse disk of `mib` MiB. Disks appear as `/dev/vda`, `/dev/vdb`, ... in
    /// the order added (and with serials `vm-disk0`, `vm-disk1`, ...).
    pub fn disk_mib(mut self, mib: u64) -> Self {
        self.disks.push(DiskSpec::New(mib));
        self
    }

    /// Attaches an existing raw image file (read-write). The caller owns it: it survives the
    /// run, so a test can prepare it before and inspect it after.
    pub fn disk_image(mut self, path: impl Into<PathBuf>) -> Self {
        self.disks.push(DiskSpec::Existing(path.into()));
        self
    }

    /// Puts a project binary at `/vm/bin/<file name>` (first on `$PATH`); its shared
    /// libraries go onto the `/usr` disk.
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.binaries.push(path.into());
        self
    }

    /// Makes a host program available in the guest at its host path (e.g. `cryptsetup` at
    /// `/usr/sbin/cryptsetup`), with its libraries. Shadows busybox's applet of that name.
    pub fn host_tool(mut self, name: &str) -> Self {
        self.host_tools.push(name.to_string());
        self
    }

    /// Puts `contents` at `guest_path` (mode 0644). Paths under `/usr` go onto the `/usr`
    /// disk; paths hidden by mounts (`/proc`, `/sys`, `/dev`, `/run`, `/tmp`) are refused.
    pub fn file(mut self, guest_path: &str, contents: impl Into<Vec<u8>>) -> Self {
        self.files.push((
            guest_path.to_string(),
            Source::Bytes(contents.into()),
            0o644,
        ));
        self
    }

    /// Copies the host file `host` to `guest_path`, keeping its permission bits.
    pub fn host_file(mut self, guest_path: &str, host: impl Into<PathBuf>) -> Self {
        let host = host.into();
        let mode = {
            use std::os::unix::fs::PermissionsExt;
            fs::metadata(&host).map_or(0o644, |m| m.permissions().mode() & 0o7777)
        };
        self.files
            .push((guest_path.to_string(), Source::Host(host), mode));
        self
    }

    /// Loads another kernel module (with its dependencies) at boot, after the defaults.
    pub fn module(mut self, name: &str) -> Self {
        self.modules.push(name.to_string());
        self
    }

    /// Appends to the kernel command line (later arguments override earlier ones, e.g.
    /// `loglevel=8` for the full boot log).
    pub fn kernel_arg(mut self, arg: &str) -> Self {
        self.kernel_args.push(arg.to_string());
        self
    }

    /// Console silence longer than this fails the run as a stall. A script doing long silent
    /// work must print progress or raise this. Scaled by `UBLK_CRYPT_VM_TIME_SCALE`.
    pub fn stall_timeout(mut self, d: Duration) -> Self {
        self.stall_timeout = d;
        self
    }

    /// Overall limit from qemu's start (waiting for the VM lock does not count). Scaled by
    /// `UBLK_CRYPT_VM_TIME_SCALE`.
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = d;
        self
    }

    /// Keeps the run directory (disks, initramfs, log) after the run, as does
    /// `UBLK_CRYPT_VM_KEEP=1`. The path is printed and in [`VmOutput::run_dir`].
    pub fn keep_run_dir(mut self, keep: bool) -> Self {
        self.keep = keep;
        self
    }

    /// Keep debug info in [`binary`](Self::binary)s. By default it is stripped
    /// (`objcopy --strip-debug`; symbols stay, so backtraces name functions) because the
    /// initramfs is guest RAM: the release `ublk-crypt` is 24 MB with its debug info, 3 MB
    /// without, and RAM is what the OOM tests measure.
    pub fn debuginfo(mut self, keep: bool) -> Self {
        self.debuginfo = keep;
        self
    }

    /// Boots the ext4 root filesystem on disk `disk` (an index into the disks added, e.g. a
    /// copy of [`rootfs::debian_root_image`]) with its own init, systemd, instead of running
    /// the script from the initramfs. The initramfs then only loads `virtio_blk`, mounts that
    /// disk, copies the run's files onto it (binaries to `/vm/bin`, [`file`](Self::file)s to
    /// their paths, the script to `/vm/script.sh`) and `switch_root`s into it. The script runs
    /// as the oneshot `vm-test.service` once `multi-user.target` is reached (`/bin/sh`, `set
    /// -e`, the [`GUEST_LIB`] helpers, stdout on the console), and `systemctl poweroff` follows
    /// it: a clean shutdown, which the host waits for (up to 90 s after the exit marker).
    /// [`host_tool`](Self::host_tool) is not available (the root has its own `/usr`), nor are
    /// extra modules at boot (the root's `modprobe` loads them).
    pub fn switch_root(mut self, disk: usize) -> Self {
        self.root_disk = Some(disk);
        self
    }

    /// Do not echo the console to the test's stdout (it is still kept and logged).
    pub fn quiet(mut self) -> Self {
        self.echo = false;
        self
    }

    /// Boots the VM, runs `script` (busybox `sh`, `set -e`, helpers from [`GUEST_LIB`]) and
    /// waits for it. `Ok` only when the script exited 0 and the kernel did not panic.
    pub fn run(&self, script: &str) -> Result<VmOutput, VmError> {
        let prep = self.prepare(script)?;
        let _lock = vm_lock()?;
        supervise(self, prep)
    }

    /// Boots the VM with the console on this terminal (qemu's `-serial mon:stdio`: Ctrl-A X
    /// quits, Ctrl-A C is the qemu monitor) and returns qemu's exit status. For
    /// `scripts/vm-shell`; no stall detection, no timeout.
    pub fn run_interactive(&self, script: &str) -> Result<ExitStatus, VmError> {
        let prep = self.prepare(script)?;
        let _lock = vm_lock()?;
        let mut cmd = qemu_command(self, &prep, true);
        eprintln!("vm: run directory {}", prep.run.path.display());
        let status = cmd
            .status()
            .map_err(|e| VmError::Setup(format!("starting qemu: {e}")))?;
        Ok(status)
    }

    fn run_name(&self) -> String {
        let raw = self.name.clone().unwrap_or_else(|| {
            std::thread::current()
                .name()
                .filter(|n| *n != "main")
                .unwrap_or("vm")
                .to_string()
        });
        let mut s: String = raw
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        s.truncate(60);
        s
    }

    /// Builds everything a boot needs (before taking the VM lock: a run waiting for the lock
    /// has its initramfs ready by the time it gets it).
    fn prepare(&self, script: &str) -> Result<Prepared, VmError> {
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

/// Shell helpers sourced before every guest script (`/vm/lib.sh`).
pub const GUEST_LIB: &str = r#"# Helpers for VM test scripts (ublk-crypt VM harness). Sourced before the script.

# vm_section NAME CMD...: runs CMD with its output between markers, which the host's
# VmOutput::section("NAME") extracts. Returns CMD's status (so `set -e` still applies).
vm_section() {
    _vm_n=$1; shift
    echo "@@BEGIN $_vm_n@@"
    _vm_rc=0; "$@" || _vm_rc=$?
    echo "@@END $_vm_n@@"
    return $_vm_rc
}
vm_begin() { echo "@@BEGIN $1@@"; }
vm_end() { echo "@@END $1@@"; }
"#;

/// `/init`, PID 1 of the guest, for busybox `sh`.
fn init_script(modules: &[kmod::Module], has_usr: bool) -> String {
    let names: Vec<&str> = modules.iter().map(|m| m.name.as_str()).collect();
    let usr = if has_usr {
        r#"usrdev=
for _ in 1 2 3 4 5 6 7 8 9 10; do
    for b in /sys/block/vd*; do
        [ "$(cat "$b/serial" 2>/dev/null)" = vm-usr ] && usrdev=/dev/${b##*/}
    done
    [ -n "$usrdev" ] && [ -b "$usrdev" ] && break
    sleep 0.5
done
[ -n "$usrdev" ] || vm_init_fail "no disk with serial vm-usr"
mount -t ext4 -o ro "$usrdev" /usr || vm_init_fail "mount /usr from $usrdev"
"#
    } else {
        ""
    };
    format!(
        r#"#!/bin/busybox sh
# PID 1 of a ublk-crypt VM test guest; generated by tests/src/vm/mod.rs.
/bin/busybox --install -s /bin
export PATH=/vm/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# DM_DISABLE_UDEV: no udev here; libdevmapper must create /dev/mapper nodes itself and not
# wait for udev cookies.
export HOME=/root TERM=vt100 DM_DISABLE_UDEV=1
vm_init_fail() {{ echo "@@VM-INIT-FAIL $*@@"; sync; poweroff -f; sleep 60; }}
mount -t proc proc /proc || vm_init_fail "mount /proc"
mount -t sysfs sysfs /sys || vm_init_fail "mount /sys"
mount -t devtmpfs devtmpfs /dev || vm_init_fail "mount /dev"
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /run/cryptsetup /run/lock
mount -t tmpfs -o mode=1777 tmpfs /tmp
for m in {modules}; do
    insmod /vm/modules/$m.ko || vm_init_fail "insmod $m"
done
{usr}echo "@@VM-READY $(cut -d' ' -f1 /proc/uptime)@@"
cd /root
sh /vm/script.sh
code=$?
sync
echo "@@VM-EXIT $code@@"
poweroff -f
sleep 60
"#,
        modules = names.join(" "),
    )
}

/// `/init` for [`VmBuilder::switch_root`]: load `virtio_blk`, mount the root disk, copy the
/// run's files onto it, hand PID 1 to its systemd.
fn switch_root_init(modules: &[kmod::Module], disk: usize) -> String {
    let names: Vec<&str> = modules.iter().map(|m| m.name.as_str()).collect();
    format!(
        r#"#!/bin/busybox sh
# PID 1 until systemd takes over; generated by tests/src/vm/mod.rs (switch_root).
/bin/busybox --install -s /bin
export PATH=/bin
vm_init_fail() {{ echo "@@VM-INIT-FAIL $*@@"; sync; poweroff -f; sleep 60; }}
mount -t proc proc /proc || vm_init_fail "mount /proc"
mount -t sysfs sysfs /sys || vm_init_fail "mount /sys"
mount -t devtmpfs devtmpfs /dev || vm_init_fail "mount /dev"
for m in {modules}; do
    insmod /vm/modules/$m.ko || vm_init_fail "insmod $m"
done
rootdev=
for _ in 1 2 3 4 5 6 7 8 9 10; do
    for b in /sys/block/vd*; do
        [ "$(cat "$b/serial" 2>/dev/null)" = vm-disk{disk} ] && rootdev=/dev/${{b##*/}}
    done
    [ -n "$rootdev" ] && [ -b "$rootdev" ] && break
    sleep 0.5
done
[ -n "$rootdev" ] || vm_init_fail "no disk with serial vm-disk{disk}"
mkdir -p /newroot
mount -t ext4 "$rootdev" /newroot || vm_init_fail "mount / from $rootdev"
# A later boot of the same disk finds the previous run's files; the harness's own link included.
rm -f /newroot/etc/systemd/system/multi-user.target.wants/vm-test.service
cp -a /vm/overlay/. /newroot/ || vm_init_fail "copying the run's files onto the root"
umount /proc /sys /dev
exec switch_root /newroot /sbin/init
"#,
        modules = names.join(" "),
    )
}

/// `/vm/run.sh` on a [`VmBuilder::switch_root`] guest: the test script between the markers,
/// the journal's tail on failure, then a clean poweroff.
const SYSTEMD_RUNNER: &str = r#"#!/bin/sh
echo "@@VM-READY $(cut -d' ' -f1 /proc/uptime)@@"
code=0
sh /vm/script.sh || code=$?
if [ "$code" != 0 ]; then
    echo "== vm: the script failed ($code); the journal's last lines:"
    journalctl -b --no-pager -o short-monotonic | tail -n 150
fi
sync
echo "@@VM-EXIT $code@@"
systemctl --no-block --job-mode=replace-irreversibly start poweroff.target
"#;

/// `vm-test.service`: runs [`SYSTEMD_RUNNER`] once the system is up, on the serial console.
const SYSTEMD_TEST_UNIT: &str = "[Unit]
Description=ublk-crypt VM test script
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/vm/run.sh
Environment=PATH=/vm/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
WorkingDirectory=/root
StandardInput=null
StandardOutput=tty
StandardError=inherit
TTYPath=/dev/ttyS0
TTYReset=no
TTYVHangup=no
TimeoutStartSec=infinity
";

/// Everything prepared for one boot.
struct Prepared {
    env: &'static VmEnv,
    run: RunDir,
    initramfs: PathBuf,
    usr_image: Option<PathBuf>,
}

#[derive(Debug)]
struct Disk {
    path: PathBuf,
    direct: bool,
}

/// Whether the file can be opened with `O_DIRECT` (qemu's `cache=none` needs it; tmpfs and
/// some overlay setups refuse it).
fn supports_o_direct(path: &Path) -> bool {
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

/// One VM at a time, across every test thread and process on this host (a 2-core machine:
/// two TCG guests at once would each run at half speed and trip each other's timeouts).
fn vm_lock() -> Result<fs::File, VmError> {
    let env = VmEnv::get().map_err(VmError::Unavailable)?;
    env::lock_file(&env.cache.join("vm.lock")).map_err(VmError::Setup)
}

fn drive_path(p: &Path) -> String {
    // qemu's option syntax: a comma in a value is written as two.
    p.to_string_lossy().replace(',', ",,")
}

fn qemu_command(b: &VmBuilder, prep: &Prepared, interactive: bool) -> Command {
    let mut cmd = Command::new(&prep.env.qemu);
    let mut append = KERNEL_ARGS.to_string();
    for a in &b.kernel_args {
        append.push(' ');
        append.push_str(a);
    }
    // TCG unless asked otherwise: this project's hosts expose a /dev/kvm that makes qemu
    // abort ("failed to set MSR"), so KVM is never picked up automatically.
    let accel = std::env::var("UBLK_CRYPT_VM_ACCEL").unwrap_or_else(|_| "tcg".into());
    cmd.args(["-accel", &accel]);
    cmd.args([
        "-nodefaults",
        "-no-user-config",
        "-machine",
        "q35",
        "-cpu",
        "max",
    ])
    .args(["-smp", &b.cpus.to_string(), "-m", &b.memory_mib.to_string()])
    .args(["-no-reboot", "-display", "none"])
    .args(["-serial", if interactive { "mon:stdio" } else { "stdio" }])
    .arg("-kernel")
    .arg(&prep.env.kernel)
    .arg("-initrd")
    .arg(&prep.initramfs)
    .args(["-append", &append]);
    for (i, d) in prep.run.disks.iter().enumerate() {
        let cache = if d.direct { "none" } else { "writeback" };
        cmd.args([
            "-drive",
            &format!(
                "if=none,id=disk{i},format=raw,cache={cache},file={}",
                drive_path(&d.path)
            ),
            "-device",
            &format!("virtio-blk-pci,drive=disk{i},serial=vm-disk{i}"),
        ]);
    }
    if let Some(img) = &prep.usr_image {
        cmd.args([
            "-drive",
            &format!(
                "if=none,id=usr,format=raw,readonly=on,file={}",
                drive_path(img)
            ),
            "-device",
            "virtio-blk-pci,drive=usr,serial=vm-usr",
        ]);
    }
    if !interactive {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
    }
    cmd
}

fn time_scale() -> f64 {
    std::env::var("UBLK_CRYPT_VM_TIME_SCALE")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .unwrap_or(1.0)
}

enum Msg {
    Out(Vec<u8>),
    OutEof,
    Err(String),
}

/// What the console told us so far.
#[derive(Default)]
struct Seen {
    ready: Option<(Duration, Option<Duration>)>,
    exit: Option<i32>,
    panic: Option<String>,
    init_fail: Option<String>,
}

fn supervise(b: &VmBuilder, prep: Prepared) -> Result<VmOutput, VmError> {
    let scale = time_scale();
    let stall = b.stall_timeout.mul_f64(scale);
    let timeout = b.timeout.mul_f64(scale);
    let log_path = prep.run.path.join("console.log");
    let mut log = fs::File::create(&log_path)
        .map_err(|e| VmError::Setup(format!("creating {}: {e}", log_path.display())))?;
    let mut cmd = qemu_command(b, &prep, false);
    let _ = writeln!(log, "# {cmd:?}");
    for d in prep.run.disks.iter().filter(|d| !d.direct) {
        let msg = format!(
            "vm: {} does not support O_DIRECT; using cache=writeback for it",
            d.path.display()
        );
        eprintln!("{msg}");
        let _ = writeln!(log, "# {msg}");
    }
    let start = Instant::now();
    let mut child: Child = cmd
        .spawn()
        .map_err(|e| VmError::Setup(format!("starting {}: {e}", prep.env.qemu.display())))?;

    let (tx, rx) = mpsc::channel();
    let mut out = child.stdout.take().unwrap();
    let txo = tx.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            match out.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if txo.send(Msg::Out(buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = txo.send(Msg::OutEof);
    });
    let err = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in io::BufReader::new(err).lines() {
            let Ok(line) = line else { break };
            if tx.send(Msg::Err(line)).is_err() {
                break;
            }
        }
    });

    let mut console = String::new();
    let mut partial: Vec<u8> = vec![];
    let mut seen = Seen::default();
    let mut last_output = Instant::now();
    let mut end_by: Option<Instant> = None; // grace deadline after exit marker / panic
    enum Stop {
        Eof,
        Stall,
        Timeout,
        Grace,
    }
    let mut emit = |line: &str, console: &mut String, seen: &mut Seen| {
        let t = start.elapsed();
        if b.echo {
            println!("[vm {:7.2}s] {line}", t.as_secs_f64());
        }
        let _ = writeln!(log, "{line}");
        console.push_str(line);
        console.push('\n');
        if let Some(rest) = marker(line, "@@VM-READY") {
            let guest = rest.parse::<f64>().ok().map(Duration::from_secs_f64);
            seen.ready = Some((t, guest));
        } else if let Some(rest) = marker(line, "@@VM-EXIT") {
            seen.exit = rest.parse().ok().or(Some(-1));
        } else if let Some(rest) = marker(line, "@@VM-INIT-FAIL") {
            seen.init_fail = Some(rest.to_string());
        } else if let Some(i) = line.find("Kernel panic - not syncing") {
            if seen.panic.is_none() {
                seen.panic = Some(line[i..].to_string());
            }
        }
    };
    let stop = loop {
        let now = Instant::now();
        let mut deadline = (last_output + stall).min(start + timeout);
        if let Some(g) = end_by {
            deadline = deadline.min(g);
        }
        let msg = rx.recv_timeout(deadline.saturating_duration_since(now));
        match msg {
            Ok(Msg::Out(bytes)) => {
                last_output = Instant::now();
                for &c in &bytes {
                    if c == b'\n' {
                        let line = clean(&partial);
                        partial.clear();
                        emit(&line, &mut console, &mut seen);
                    } else {
                        partial.push(c);
                    }
                }
                if end_by.is_none() && (seen.exit.is_some() || seen.panic.is_some()) {
                    // A systemd guest shuts down cleanly after the marker; give it the time.
                    let grace = match (b.root_disk, &seen.panic) {
                        (Some(_), None) => SYSTEMD_EXIT_GRACE,
                        _ => EXIT_GRACE,
                    };
                    end_by = Some(Instant::now() + grace);
                }
            }
            Ok(Msg::Err(line)) => {
                last_output = Instant::now();
                emit(&format!("[qemu stderr] {line}"), &mut console, &mut seen);
            }
            Ok(Msg::OutEof) | Err(mpsc::RecvTimeoutError::Disconnected) => break Stop::Eof,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let now = Instant::now();
                if end_by.is_some_and(|g| now >= g) {
                    break Stop::Grace;
                } else if now >= start + timeout {
                    break Stop::Timeout;
                } else if now >= last_output + stall {
                    break Stop::Stall;
                }
            }
        }
    };
    if !partial.is_empty() {
        let line = clean(&partial);
        emit(&line, &mut console, &mut seen);
    }
    let silent_for = last_output.elapsed();
    let status = match stop {
        Stop::Eof => child.wait().ok(),
        _ => {
            let _ = child.kill();
            let _ = child.wait();
            None
        }
    };
    // Late stderr lines (qemu's reason for exiting, if any).
    while let Ok(m) = rx.try_recv() {
        if let Msg::Err(line) = m {
            emit(&format!("[qemu stderr] {line}"), &mut console, &mut seen);
        }
    }
    let duration = start.elapsed();
    let output = VmOutput {
        exit_code: seen.exit,
        console,
        boot_time: seen.ready.map(|r| r.0),
        guest_boot_time: seen.ready.and_then(|r| r.1),
        duration,
        log: log_path,
        run: prep.run,
    };
    if output.run.keep {
        eprintln!("vm: kept run directory {}", output.run.path.display());
    }
    let output = Box::new(output);
    if let Some(reason) = seen.panic {
        return Err(VmError::KernelPanic { reason, output });
    }
    if let Some(reason) = seen.init_fail {
        return Err(VmError::InitFailed { reason, output });
    }
    match (seen.exit, stop) {
        (Some(0), _) => Ok(*output),
        (Some(code), _) => Err(VmError::ScriptFailed { code, output }),
        (None, Stop::Stall) => Err(VmError::Stall { silent_for, output }),
        (None, Stop::Timeout) => Err(VmError::Timeout {
            after: duration,
            output,
        }),
        (None, _) => Err(VmError::QemuExited {
            status: status.map_or("killed".into(), |s| s.to_string()),
            output,
        }),
    }
}

/// `Some(rest)` if `line` contains `@@NAME rest@@` (the marker may be preceded by kernel
/// output that interleaved on the same console line).
fn marker<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let i = line.find(name)?;
    let rest = &line[i + name.len()..];
    let end = rest.find("@@")?;
    Some(rest[..end].trim())
}

/// Console bytes → text: drops `\r`, terminal escape sequences (SeaBIOS clears the screen)
/// and other control characters.
fn clean(bytes: &[u8]) -> String {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            0x1b => {
                i += 1;
                if bytes.get(i) == Some(&b'[') {
                    i += 1;
                    while i < bytes.len() && !(0x40..=0x7e).contains(&bytes[i]) {
                        i += 1;
                    }
                }
                i += 1;
            }
            b'\t' => {
                out.push(b'\t');
                i += 1;
            }
            c if c < 0x20 || c == 0x7f => i += 1,
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A kernel log line on the console: `[    1.234567] ...` (printk's `%5lu.%06lu`; strict
/// enough that a script's `[1] done` is not mistaken for one). Only the line start is
/// checked: printk output always begins a console line.
fn is_kernel_line(line: &str) -> bool {
    let Some(rest) = line.strip_prefix('[') else {
        return false;
    };
    rest.split_once(']').is_some_and(|(ts, _)| {
        ts.trim_start()
            .split_once('.')
            .is_some_and(|(secs, micros)| {
                !secs.is_empty()
                    && secs.bytes().all(|b| b.is_ascii_digit())
                    && micros.len() == 6
                    && micros.bytes().all(|b| b.is_ascii_digit())
            })
    })
}

/// The run directory: `<target>/vm-runs/<name>-<pid>-<n>/`, holding the initramfs, the
/// created disks, stripped binaries and `console.log`. Unless kept, dropping it deletes
/// everything but the log.
#[derive(Debug)]
struct RunDir {
    path: PathBuf,
    disks: Vec<Disk>,
    keep: bool,
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
fn prune_runs(base: &Path) {
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

/// What a finished run left: the exit status, the console, timings, and the disks.
#[derive(Debug)]
pub struct VmOutput {
    /// The script's exit status from the `@@VM-EXIT@@` marker; `None` if it never came.
    pub exit_code: Option<i32>,
    /// The whole serial console, one `\n` per line, control characters removed.
    pub console: String,
    /// Host time from starting qemu to the guest's `@@VM-READY@@` (modules loaded, `/usr`
    /// mounted, script about to start).
    pub boot_time: Option<Duration>,
    /// The guest's uptime at `@@VM-READY@@` (excludes firmware and kernel loading).
    pub guest_boot_time: Option<Duration>,
    /// Host time from starting qemu to its end.
    pub duration: Duration,
    log: PathBuf,
    run: RunDir,
}

impl VmOutput {
    /// The text between the first `@@BEGIN name@@` and the following `@@END name@@` lines
    /// (as printed by the guest's `vm_section`), without kernel log lines that interleaved,
    /// lines joined by `\n` and no trailing newline.
    pub fn section(&self, name: &str) -> Option<String> {
        self.sections(name).into_iter().next()
    }

    /// Every `name` section, in order.
    pub fn sections(&self, name: &str) -> Vec<String> {
        let begin = format!("@@BEGIN {name}@@");
        let end = format!("@@END {name}@@");
        let mut out = vec![];
        let mut cur: Option<Vec<&str>> = None;
        for line in self.console.lines() {
            if line.contains(&begin) {
                cur = Some(vec![]);
            } else if line.contains(&end) {
                if let Some(c) = cur.take() {
                    out.push(c.join("\n"));
                }
            } else if let Some(c) = cur.as_mut() {
                if !is_kernel_line(line) {
                    c.push(line);
                }
            }
        }
        out
    }

    /// The last `n` console lines.
    pub fn console_tail(&self, n: usize) -> String {
        let lines: Vec<&str> = self.console.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Kernel warnings and bugs that reached the console (`WARNING:`, `BUG:`, lockdep,
    /// `Call Trace:`), for tests that want a clean kernel log, not only a passing script.
    pub fn kernel_complaints(&self) -> Vec<&str> {
        self.console
            .lines()
            .filter(|l| {
                is_kernel_line(l)
                    && [
                        "WARNING:",
                        "BUG:",
                        "Call Trace:",
                        "possible circular locking",
                    ]
                    .iter()
                    .any(|k| l.contains(k))
            })
            .collect()
    }

    /// Host path of disk `i` (in the order added to the builder; `/dev/vda` is 0).
    pub fn disk_path(&self, i: usize) -> &Path {
        &self.run.disks[i].path
    }

    /// Reads all of disk `i`.
    pub fn read_disk(&self, i: usize) -> io::Result<Vec<u8>> {
        fs::read(self.disk_path(i))
    }

    /// The run directory (initramfs, disks, `console.log`).
    pub fn run_dir(&self) -> &Path {
        &self.run.path
    }

    /// The console log file (kept after the run).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Keeps the run directory and its disks after this value is dropped; returns its path.
    pub fn keep(&mut self) -> PathBuf {
        self.run.keep = true;
        self.run.path.clone()
    }
}

/// Why a VM run did not succeed. `Display` (and `Debug`, so `unwrap()` is readable) shows
/// the reason and the last 200 console lines.
pub enum VmError {
    /// qemu, busybox or the kernel could not be found or fetched (see [`vm_or_skip`]).
    Unavailable(String),
    /// Building the initramfs, images or disks failed, or the request was invalid.
    Setup(String),
    /// The guest's `/init` failed before the script (module load, `/usr` mount).
    InitFailed {
        reason: String,
        output: Box<VmOutput>,
    },
    /// The script exited non-zero.
    ScriptFailed { code: i32, output: Box<VmOutput> },
    /// The kernel panicked (including oops, hung task, soft lockup).
    KernelPanic {
        reason: String,
        output: Box<VmOutput>,
    },
    /// No console output for longer than the stall timeout; qemu was killed.
    Stall {
        silent_for: Duration,
        output: Box<VmOutput>,
    },
    /// The overall timeout passed; qemu was killed.
    Timeout {
        after: Duration,
        output: Box<VmOutput>,
    },
    /// qemu ended without the guest reporting an exit status.
    QemuExited {
        status: String,
        output: Box<VmOutput>,
    },
}

impl VmError {
    /// The run's output, when the VM got as far as booting.
    pub fn output(&self) -> Option<&VmOutput> {
        match self {
            VmError::Unavailable(_) | VmError::Setup(_) => None,
            VmError::InitFailed { output, .. }
            | VmError::ScriptFailed { output, .. }
            | VmError::KernelPanic { output, .. }
            | VmError::Stall { output, .. }
            | VmError::Timeout { output, .. }
            | VmError::QemuExited { output, .. } => Some(output),
        }
    }

    fn headline(&self) -> String {
        match self {
            VmError::Unavailable(s) => format!("VM unavailable: {s}"),
            VmError::Setup(s) => format!("VM setup failed: {s}"),
            VmError::InitFailed { reason, .. } => format!("guest init failed: {reason}"),
            VmError::ScriptFailed { code, .. } => {
                format!("guest script failed with exit code {code}")
            }
            VmError::KernelPanic { reason, .. } => format!("guest kernel panic: {reason}"),
            VmError::Stall { silent_for, .. } => format!(
                "guest stalled: no console output for {:.1}s (stall timeout)",
                silent_for.as_secs_f64()
            ),
            VmError::Timeout { after, .. } => {
                format!("VM timed out after {:.1}s", after.as_secs_f64())
            }
            VmError::QemuExited { status, .. } => {
                format!("qemu ended ({status}) without the guest reporting an exit status")
            }
        }
    }
}

impl fmt::Display for VmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.headline())?;
        if let Some(o) = self.output() {
            write!(
                f,
                "\n----- last {TAIL_LINES} console lines (full log: {}) -----\n{}\n----- end of console -----",
                o.log.display(),
                o.console_tail(TAIL_LINES)
            )?;
        }
        Ok(())
    }
}

impl fmt::Debug for VmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for VmError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_and_cleaning() {
        assert_eq!(marker("@@VM-EXIT 3@@", "@@VM-EXIT"), Some("3"));
        assert_eq!(marker("[ 1.0] foo@@VM-EXIT 0@@", "@@VM-EXIT"), Some("0"));
        assert_eq!(marker("@@VM-EXIT 3", "@@VM-EXIT"), None);
        assert_eq!(clean(b"\x1bc\x1b[?7l\x1b[2Jhello\r"), "hello");
        assert!(is_kernel_line("[    2.350930] device-mapper: ready"));
        assert!(is_kernel_line("[12345.000001] x"));
        assert!(!is_kernel_line("[vm] x"));
        assert!(!is_kernel_line("[1] done"));
        assert!(!is_kernel_line("[1.5] done"));
        assert!(!is_kernel_line("plain"));
    }
}
