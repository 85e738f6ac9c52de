//! Guest-side stall diagnostics: an mlocked process that, every PERIOD seconds, writes the
//! given sysrq commands to /proc/sysrq-trigger, so a guest that freezes under memory pressure
//! still prints its blocked tasks (`w`) and memory state (`m`) on the console. Being locked and
//! allocation-free after start, it keeps running when nothing else in userspace can.
//!
//! `vm-watchdog PERIOD_SECS COMMANDS` (e.g. `vm-watchdog 30 wm &`): unconditionally.
//!
//! `vm-watchdog PERIOD_SECS COMMANDS --heartbeat FILE STALE_SECS CRASH_SECS`: only while FILE
//! exists and its mtime is more than STALE_SECS old (page-hog `--heartbeat-file` touches it),
//! the commands are written every PERIOD and a `vm-watchdog: heartbeat stale` line is printed;
//! once it is CRASH_SECS old, blocked tasks and memory are dumped one last time and the kernel
//! is crashed (sysrq `c`), which ends the VM run at once as a kernel panic instead of waiting
//! for the overall timeout. The console stays quiet while heartbeats are fresh.
//!
//! The kernel prints the blocked tasks' stacks at KERN_INFO, which the VM's `loglevel=5` hides
//! (sysrq raises the level only for its own header line), so each dump is wrapped in sysrq `8`
//! (console loglevel 8) and a sysrq digit restoring the level found at start.

use std::ffi::CString;
use std::io::Write;
use std::time::Duration;

fn main() {
    let mut args = std::env::args().skip(1);
    let period: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(30);
    let cmds: Vec<u8> = args.next().unwrap_or_else(|| "w".into()).into_bytes();
    let heartbeat = match args.next().as_deref() {
        Some("--heartbeat") => {
            let file = CString::new(args.next().expect("--heartbeat FILE")).unwrap();
            let stale: i64 = args
                .next()
                .and_then(|s| s.parse().ok())
                .expect("STALE_SECS");
            let crash: i64 = args
                .next()
                .and_then(|s| s.parse().ok())
                .expect("CRASH_SECS");
            Some((file, stale, crash))
        }
        Some(other) => panic!("unknown argument {other}"),
        None => None,
    };
    // SAFETY: mlockall only changes this process's memory locking.
    unsafe {
        libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE);
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open("/proc/sysrq-trigger")
        .expect("open /proc/sysrq-trigger");
    // The console loglevel to restore after a dump (first field of /proc/sys/kernel/printk).
    let restore: u8 = std::fs::read_to_string("/proc/sys/kernel/printk")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u8>().ok())
        .filter(|l| *l <= 9)
        .map_or(b'5', |l| b'0' + l);
    let dump = |f: &mut std::fs::File, cmds: &[u8]| {
        let _ = f.write_all(b"8");
        for c in cmds {
            let _ = f.write_all(&[*c]);
        }
        let _ = f.write_all(&[restore]);
    };
    // Everything the loop uses exists before it: stdout's buffer, the line.
    let mut out = std::io::stdout();
    let _ = out.flush();
    let mut line = [0u8; 96];
    loop {
        std::thread::sleep(Duration::from_secs(period));
        let Some((file, stale, crash)) = &heartbeat else {
            dump(&mut f, &cmds);
            continue;
        };
        // SAFETY: stat into a zeroed struct we own, path is a valid C string; no allocation.
        let (age, exists) = unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            if libc::stat(file.as_ptr(), &mut st) != 0 {
                (0, false)
            } else {
                let mut now = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                libc::clock_gettime(libc::CLOCK_REALTIME, &mut now);
                (now.tv_sec - st.st_mtime, true)
            }
        };
        if !exists || age <= *stale {
            continue;
        }
        let n = {
            let mut w = &mut line[..];
            let _ = writeln!(w, "vm-watchdog: heartbeat stale for {age} s");
            96 - w.len()
        };
        let _ = out.write_all(&line[..n]);
        let _ = out.flush();
        dump(&mut f, &cmds);
        if age > *crash {
            let n = {
                let mut w = &mut line[..];
                let _ = writeln!(
                    w,
                    "vm-watchdog: no heartbeat for {age} s: crashing the guest"
                );
                96 - w.len()
            };
            let _ = out.write_all(&line[..n]);
            let _ = out.flush();
            dump(&mut f, b"wm");
            let _ = f.write_all(b"c");
        }
    }
}
