//! What a run brings back ([`VmOutput`]) and how it fails ([`VmError`]).

use super::*;
use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Lines of console shown in an error message.
pub(super) const TAIL_LINES: usize = 200;
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
    pub(super) log: PathBuf,
    pub(super) run: RunDir,
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

    /// The last blocked-task dump on the console (sysrq `w`, which vm-watchdog triggers when the
    /// guest stalls), condensed to one line per task: its name, state, pid and the innermost
    /// frames of its stack without offsets or `?` guesses. Empty when there was none. Why: a
    /// freeze in CI leaves only the test's message, and who waits on what is the diagnosis.
    pub fn blocked_tasks(&self) -> String {
        blocked_tasks(&self.console)
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
            // Last, where a CI log's tail shows it: who waited on what.
            let blocked = o.blocked_tasks();
            if !blocked.is_empty() {
                write!(f, "\n----- blocked tasks (last sysrq w) -----\n{blocked}")?;
            }
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

/// A console line without the kernel's `[  12.345678] ` prefix.
fn strip_kernel_time(line: &str) -> &str {
    match line.strip_prefix('[').and_then(|r| r.split_once("] ")) {
        Some((t, rest)) if t.trim().parse::<f64>().is_ok() => rest,
        _ => line,
    }
}

/// [`VmOutput::blocked_tasks`] of a console's text.
fn blocked_tasks(console: &str) -> String {
    let lines: Vec<&str> = console.lines().map(strip_kernel_time).collect();
    let Some(start) = lines
        .iter()
        .rposition(|l| l.starts_with("sysrq: Show Blocked State"))
    else {
        return String::new();
    };
    let mut out = String::new();
    let mut task: Option<(String, Vec<&str>)> = None;
    let flush = |out: &mut String, task: &mut Option<(String, Vec<&str>)>| {
        if let Some((t, frames)) = task.take() {
            out.push_str(&format!("{t}: {}\n", frames.join(" < ")));
        }
    };
    for l in &lines[start + 1..] {
        if l.starts_with("sysrq:") {
            break;
        }
        if let Some(rest) = l.strip_prefix("task:") {
            flush(&mut out, &mut task);
            // "task:NAME state:D stack:0 pid:45 tgid:45 ppid:2 flags:0x00004000"
            let name = rest.split(" state:").next().unwrap_or("").trim();
            let field = |k: &str| {
                rest.split_whitespace()
                    .find_map(|w| w.strip_prefix(k))
                    .unwrap_or("?")
                    .to_string()
            };
            let head = format!("{name} (pid {}, {})", field("pid:"), field("state:"));
            task = Some((head, vec![]));
        } else if let Some((_, frames)) = task.as_mut() {
            // A frame: " __schedule+0x3a1/0xb50 [module]"; "? name+..." is a guess, skipped.
            let f = l.trim();
            if !f.starts_with('?') && f.contains("+0x") && frames.len() < 12 {
                frames.push(f.split('+').next().unwrap_or(f));
            }
        }
    }
    flush(&mut out, &mut task);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_blocked_task_dump_is_condensed_one_line_per_task() {
        let console = "\
[   10.0] sysrq: Show Blocked State
[   10.1] task:old             state:D stack:0     pid:1     tgid:1     ppid:0      flags:0x0
[   10.2]  schedule+0x27/0xf0
[   20.0] sysrq: Show Blocked State
[   20.1] task:ublk-crypt      state:D stack:0     pid:218   tgid:218   ppid:1      flags:0x00004002
[   20.2] Call Trace:
[   20.3]  <TASK>
[   20.4]  __schedule+0x3a1/0xb50
[   20.5]  ? srso_return_thunk+0x5/0x5f
[   20.6]  io_uring_cancel_generic+0x1f0/0x2a0
[   20.7]  do_exit+0x15a/0xa80 [some_module]
[   20.8]  </TASK>
[   20.9] task:kworker/u8:1    state:D stack:0     pid:45    tgid:45    ppid:2      flags:0x00004000
[   21.0] Workqueue: writeback wb_workfn (flush-252:0)
[   21.1]  schedule+0x27/0xf0
[   21.2] sysrq: Show Memory
[   21.3] task:not-a-dump      state:D
";
        assert_eq!(
            blocked_tasks(console),
            "ublk-crypt (pid 218, D): __schedule < io_uring_cancel_generic < do_exit\n\
             kworker/u8:1 (pid 45, D): schedule\n"
        );
        assert_eq!(blocked_tasks("no dump here\n"), "");
    }
}
