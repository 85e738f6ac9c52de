//! Watching a running VM: the console streamed into the test's output and a log, the
//! markers, panics, console silence (a stall) and the deadline.

use super::*;
use std::fs;
use std::io::{self, BufRead, Read, Write};
use std::process::Child;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// After the exit marker (or a panic), how long qemu gets to exit on its own before it is
/// killed. `poweroff -f` normally ends it within a second.
pub(super) const EXIT_GRACE: Duration = Duration::from_secs(15);
/// The same for a [`VmBuilder::switch_root`] guest, which runs `systemctl poweroff`: every
/// unit stops, swap included, under TCG.
pub(super) const SYSTEMD_EXIT_GRACE: Duration = Duration::from_secs(90);
/// On a stall, how long the guest gets to print the state the host asked for (sysrq over the
/// serial port) before qemu is killed: until it has been quiet this long since the ask and its
/// last line, at most [`STALL_DUMP_WAIT`].
const STALL_DUMP_QUIET: Duration = Duration::from_secs(3);
const STALL_DUMP_WAIT: Duration = Duration::from_secs(15);
/// What the host asks for on a stall, each key after a serial break: console loglevel 8 (the
/// dumps print at KERN_INFO, which `loglevel=5` hides), blocked tasks, memory.
const STALL_SYSRQ: &[u8] = b"8wm";

pub(super) enum Msg {
    Out(Vec<u8>),
    OutEof,
    Err(String),
}

/// What the console told us so far.
#[derive(Default)]
pub(super) struct Seen {
    pub(super) ready: Option<(Duration, Option<Duration>)>,
    pub(super) exit: Option<i32>,
    pub(super) panic: Option<String>,
    pub(super) init_fail: Option<String>,
}

pub(super) fn supervise(b: &VmBuilder, prep: Prepared) -> Result<VmOutput, VmError> {
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
    let mut stdin = child.stdin.take();
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
                                            // Once the guest was silent past the stall timeout: that silence, and when the host asked
                                            // it for its state (the run then ends as a stall, whatever else happens).
    let mut stalled: Option<(Duration, Instant)> = None;
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
        let mut deadline = (start + timeout).min(match stalled {
            None => last_output + stall,
            Some((_, asked)) => dump_done(asked, last_output),
        });
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
                if stalled.is_some_and(|(_, asked)| now >= dump_done(asked, last_output)) {
                    break Stop::Stall;
                } else if end_by.is_some_and(|g| now >= g) {
                    break Stop::Grace;
                } else if now >= start + timeout {
                    break Stop::Timeout;
                } else if stalled.is_none() && now >= last_output + stall {
                    // A hung guest usually still takes interrupts: its blocked tasks are the
                    // diagnosis, so ask for them before killing it.
                    let silence = now - last_output;
                    let asked = stdin.as_mut().map(ask_for_state);
                    stalled = Some((silence, Instant::now()));
                    if !matches!(asked, Some(Ok(()))) {
                        break Stop::Stall;
                    }
                }
            }
        }
    };
    if !partial.is_empty() {
        let line = clean(&partial);
        emit(&line, &mut console, &mut seen);
    }
    let silent_for = stalled.map_or_else(|| last_output.elapsed(), |(silence, _)| silence);
    // qemu ending while the guest was printing its state is still the stall.
    let stop = if stalled.is_some() { Stop::Stall } else { stop };
    drop(stdin);
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

/// When a stalled guest asked at `asked` is done printing: quiet [`STALL_DUMP_QUIET`] since the
/// ask and its last line, or [`STALL_DUMP_WAIT`] after the ask.
fn dump_done(asked: Instant, last_output: Instant) -> Instant {
    (asked.max(last_output) + STALL_DUMP_QUIET).min(asked + STALL_DUMP_WAIT)
}

/// Asks a stalled guest for its state: for each of [`STALL_SYSRQ`], a serial break (qemu's
/// Ctrl-A b) and then the key, which the guest kernel takes as sysrq. The pauses let the guest
/// take the break before the key arrives (a key in the same receive as the break is dropped).
fn ask_for_state(stdin: &mut std::process::ChildStdin) -> io::Result<()> {
    for &key in STALL_SYSRQ {
        stdin.write_all(b"\x01b")?;
        stdin.flush()?;
        std::thread::sleep(Duration::from_millis(500));
        stdin.write_all(&[key])?;
        stdin.flush()?;
        std::thread::sleep(Duration::from_millis(500));
    }
    Ok(())
}

/// `Some(rest)` if `line` contains `@@NAME rest@@` (the marker may be preceded by kernel
/// output that interleaved on the same console line).
pub(super) fn marker<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let i = line.find(name)?;
    let rest = &line[i + name.len()..];
    let end = rest.find("@@")?;
    Some(rest[..end].trim())
}

/// Console bytes → text: drops `\r`, terminal escape sequences (SeaBIOS clears the screen)
/// and other control characters.
pub(super) fn clean(bytes: &[u8]) -> String {
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
pub(super) fn is_kernel_line(line: &str) -> bool {
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
