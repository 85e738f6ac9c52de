//! [`VmBuilder`]: what one VM run is (memory, CPUs, disks, binaries, files, script,
//! timeouts), and `run`, which prepares, takes the VM lock and supervises.

use super::*;
use std::fs;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

#[derive(Debug, Clone)]
pub(super) enum DiskSpec {
    /// A new sparse file of this many MiB in the run directory (deleted with the run).
    New(u64),
    /// A host file the caller owns (used as is, never deleted).
    Existing(PathBuf),
}

/// Describes one VM run; [`VmBuilder::run`] boots it.
#[derive(Debug, Clone)]
pub struct VmBuilder {
    pub(super) name: Option<String>,
    pub(super) memory_mib: u32,
    pub(super) cpus: u32,
    pub(super) disks: Vec<DiskSpec>,
    pub(super) binaries: Vec<PathBuf>,
    pub(super) host_tools: Vec<String>,
    pub(super) files: Vec<(String, Source, u32)>,
    pub(super) modules: Vec<String>,
    pub(super) kernel_args: Vec<String>,
    pub(super) stall_timeout: Duration,
    pub(super) timeout: Duration,
    pub(super) keep: bool,
    pub(super) echo: bool,
    pub(super) debuginfo: bool,
    pub(super) root_disk: Option<usize>,
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

    pub(super) fn run_name(&self) -> String {
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
}
