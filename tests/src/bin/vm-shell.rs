//! `vm-shell`: an interactive shell in the same VM the tests use (run via `scripts/vm-shell`).
//!
//! For poking at ublk and dm-crypt by hand with exactly the kernel, modules and tools of the
//! VM tests. Quit with `exit` (or Ctrl-A X: the console is qemu's `mon:stdio`).

use std::path::PathBuf;
use std::process::ExitCode;

use ublk_crypt_tests::vm::{vm_or_skip, Vm};

const USAGE: &str = "usage: vm-shell [--mem MIB] [--cpus N] [--disk MIB]... [--tool NAME]... \
[--binary PATH]... [--file GUEST=HOST]... [--kernel-arg ARG]... [--debuginfo] [--keep] [--run SCRIPT]

Boots the VM-test kernel under qemu with a shell on this terminal.
Defaults: --mem 512 --cpus 1, disks of 1024 and 256 MiB (/dev/vda, /dev/vdb), tools
cryptsetup and fio, and target/release/ublk-crypt when it has been built.
--disk replaces the default disks; --kernel-arg loglevel=8 shows the whole boot log;
--debuginfo keeps debug info in the binaries (stripped by default: it is guest RAM);
--keep keeps the disk images (path printed at start); --run runs SCRIPT instead of the
shell (non-interactive: prints the console, exits with the script's status).";

fn main() -> ExitCode {
    let mut mem = 512;
    let mut cpus = 1;
    let mut disks: Vec<u64> = vec![];
    let mut tools = vec!["cryptsetup".to_string(), "fio".to_string()];
    let mut binaries: Vec<PathBuf> = vec![];
    let mut files: Vec<(String, PathBuf)> = vec![];
    let mut kernel_args: Vec<String> = vec![];
    let mut keep = false;
    let mut debuginfo = false;
    let mut script: Option<String> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = |what: &str| {
            args.next().unwrap_or_else(|| {
                eprintln!("vm-shell: {a} needs {what}\n\n{USAGE}");
                std::process::exit(2)
            })
        };
        let num = |s: String| -> u64 {
            s.parse().unwrap_or_else(|_| {
                eprintln!("vm-shell: not a number: {s}");
                std::process::exit(2)
            })
        };
        match a.as_str() {
            "--mem" => mem = num(val("MiB")) as u32,
            "--cpus" => cpus = num(val("a count")) as u32,
            "--disk" => disks.push(num(val("MiB"))),
            "--tool" => tools.push(val("a program name")),
            "--binary" => binaries.push(PathBuf::from(val("a path"))),
            "--file" => {
                let v = val("GUEST=HOST");
                let Some((g, h)) = v.split_once('=') else {
                    eprintln!("vm-shell: --file wants GUEST=HOST");
                    return ExitCode::from(2);
                };
                files.push((g.to_string(), PathBuf::from(h)));
            }
            "--kernel-arg" => kernel_args.push(val("an argument")),
            "--keep" => keep = true,
            "--debuginfo" => debuginfo = true,
            "--run" => script = Some(val("a script")),
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            _ => {
                eprintln!("vm-shell: unknown argument {a}\n\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    if disks.is_empty() {
        disks = vec![1024, 256];
    }
    let daemon = ublk_crypt_tests::release_binary("ublk-crypt");
    if daemon.is_file() {
        binaries.push(daemon);
    } else {
        eprintln!(
            "vm-shell: {} not built; the guest will not have it (cargo build --release)",
            daemon.display()
        );
    }
    if !vm_or_skip("vm-shell") {
        return ExitCode::FAILURE;
    }
    let mut b = Vm::builder()
        .name("vm-shell")
        .memory_mib(mem)
        .cpus(cpus)
        .keep_run_dir(keep)
        .debuginfo(debuginfo);
    for d in disks {
        b = b.disk_mib(d);
    }
    for t in &tools {
        b = b.host_tool(t);
    }
    for bin in binaries {
        b = b.binary(bin);
    }
    for a in &kernel_args {
        b = b.kernel_arg(a);
    }
    for (g, h) in files {
        b = b.host_file(&g, h);
    }
    if let Some(s) = script {
        return match b.timeout(std::time::Duration::from_secs(3600)).run(&s) {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!(
                    "vm-shell: {}",
                    e.output().map_or(e.to_string(), |_| {
                        // The console was already printed live; only the reason is news.
                        e.to_string().lines().next().unwrap_or("").to_string()
                    })
                );
                ExitCode::FAILURE
            }
        };
    }
    eprintln!("vm-shell: booting; `exit` or Ctrl-A X leaves, Ctrl-A C is the qemu monitor");
    // cttyhack makes the serial console the shell's controlling tty, so Ctrl-C and job
    // control work (a plain `sh` on /dev/console has neither).
    match b.run_interactive("exec setsid cttyhack sh -l") {
        Ok(s) if s.success() => ExitCode::SUCCESS,
        Ok(s) => {
            eprintln!("vm-shell: qemu exited with {s}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("vm-shell: {e}");
            ExitCode::FAILURE
        }
    }
}
