//! The qemu command line, the one-VM-at-a-time lock, and the timeout scale.

use super::*;
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};

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
/// * `sysrq_always_enabled`: a serial break and a key reach the kernel's sysrq whatever
///   `kernel.sysrq` says (Debian's default mask and systemd's leave out task dumps): on a stall
///   the host asks for blocked tasks and memory that way (`supervisor.rs`).
pub(super) const KERNEL_ARGS: &str = "console=ttyS0 panic=-1 oops=panic hung_task_panic=1 \
     softlockup_panic=1 loglevel=5 edd=off sysrq_always_enabled";

/// The guest userspace's glibc is told not to use AVX (passed to `/init`, and from it to every
/// guest program, as an environment variable on the kernel command line). The guest CPU stays
/// `-cpu max`, so the guest kernel, and dm-crypt with it, keeps its AVX code
/// (`xts-aes-aesni-avx`).
///
/// Why: with AVX, glibc copies and compares with 256-bit instructions, TCG runs those as
/// 256-bit host code, and on an AVX-512 Intel host that leaves qemu's AES helpers (legacy SSE,
/// one call per guest AESDEC) stalling on their operand loads, by an amount that depends on
/// where the guest's code happens to lie: the daemon's same decrypt took 4.4x as long in one
/// build as in another (91 % of the helper's samples on one load), and the demo's swap hog
/// 36–38 s instead of 26–27 s. With this line every build runs alike (bench/results/history.md,
/// session 17). `UBLK_CRYPT_VM_GUEST_AVX=1` leaves it out.
pub(super) const GUEST_NO_AVX: &str =
    "GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX2,-AVX,-AVX_Fast_Unaligned_Load,-AVX512F,-AVX512VL";

/// One VM at a time, across every test thread and process on this host (a 2-core machine:
/// two TCG guests at once would each run at half speed and trip each other's timeouts).
pub(super) fn vm_lock() -> Result<fs::File, VmError> {
    let env = VmEnv::get().map_err(VmError::Unavailable)?;
    env::lock_file(&env.cache.join("vm.lock")).map_err(VmError::Setup)
}

pub(super) fn drive_path(p: &Path) -> String {
    // qemu's option syntax: a comma in a value is written as two.
    p.to_string_lossy().replace(',', ",,")
}

pub(super) fn qemu_command(b: &VmBuilder, prep: &Prepared, interactive: bool) -> Command {
    let mut cmd = Command::new(&prep.env.qemu);
    let mut append = KERNEL_ARGS.to_string();
    if std::env::var("UBLK_CRYPT_VM_GUEST_AVX").as_deref() != Ok("1") {
        append.push(' ');
        append.push_str(GUEST_NO_AVX);
    }
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
    // The monitor multiplexed in: its Ctrl-A escapes include `b` (a serial break), which the
    // supervisor sends on a stall. Nothing else is ever written to it.
    .args(["-serial", "mon:stdio"])
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
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
    }
    cmd
}

pub(super) fn time_scale() -> f64 {
    std::env::var("UBLK_CRYPT_VM_TIME_SCALE")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .unwrap_or(1.0)
}
