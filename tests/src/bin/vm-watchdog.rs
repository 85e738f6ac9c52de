//! Guest-side stall diagnostics: an mlocked process that, every PERIOD seconds, writes the
//! given sysrq commands to /proc/sysrq-trigger, so a guest that freezes under memory pressure
//! still prints its blocked tasks (`w`) and memory state (`m`) on the console. Being locked and
//! allocation-free after start, it keeps running when nothing else in userspace can.
//!
//! `vm-watchdog PERIOD_SECS COMMANDS` (e.g. `vm-watchdog 30 wm &`).

use std::io::Write;
use std::time::Duration;

fn main() {
    let mut args = std::env::args().skip(1);
    let period: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(30);
    let cmds: Vec<u8> = args.next().unwrap_or_else(|| "w".into()).into_bytes();
    // SAFETY: mlockall only changes this process's memory locking.
    unsafe {
        libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE);
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open("/proc/sysrq-trigger")
        .expect("open /proc/sysrq-trigger");
    loop {
        std::thread::sleep(Duration::from_secs(period));
        for c in &cmds {
            let _ = f.write_all(&[*c]);
        }
    }
}
