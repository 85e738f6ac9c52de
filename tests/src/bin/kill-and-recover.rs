//! The OOM torture's crash step, run from a process that swap cannot stall.
//!
//! `kill-and-recover [--reserve-mib N] TRIGGER_FILE PID TRIES -- RECOVER_COMMAND...`: mlocks
//! itself (and, with `--reserve-mib`, N MiB of memory it frees right after the kill), waits until
//! TRIGGER_FILE exists (page-hog `--mark` creates it at a known point of a pass), sends SIGKILL
//! to PID (the daemon), then runs RECOVER_COMMAND (e.g. `/usr/local/sbin/ublk-crypt recover
//! tswap`) until it succeeds, at most TRIES times one second apart. Exit status 0 once it
//! succeeded, 1 otherwise.
//!
//! Why not the test's shell: the VM's root file system is the initramfs, a tmpfs, so busybox's
//! own code pages are swappable; once the daemon is dead, anything that touches a swapped-out
//! page waits for a daemon that the shell, blocked on its own text, would never start. (Seen in
//! the torture: the `sh` about to exec `recover` blocked in `shmem_swapin_folio`.) On a real
//! system the restarting agent and the binary live on a disk file system, whose pages are never
//! swapped; this process stands in for that agent: locked before the pressure starts, and the
//! command it runs must live on the VM's `/usr` disk.
//!
//! It also sets `PR_SET_IO_FLUSHER` on itself, which its children inherit across fork and
//! execve: memory reclaim done on behalf of the recovering process (from the `execve` on,
//! before the daemon's own `main` can set the flag) then never writes to swap. Without it,
//! the spawned `recover` blocked in its execve: direct reclaim → `swap_writepage` →
//! `wbt_wait` on the dead device's write throttle, forever (seen in the torture), while the
//! dead daemon's 22 MiB lay free.
//!
//! `--standby RECORD`: the device has a standby (daemon/src/standby.rs) and nothing is run:
//! after the kill, RECORD (`/run/ublk-crypt/ID.json`) is read until it names another daemon
//! (the standby, which rewrites it once it serves the device), at most TRIES seconds.
//!
//! `--reserve-mib`: when the daemon dies while every page is taken and only swap could free
//! one, the recovering daemon finds no memory for its locked pool and the machine deadlocks
//! (tests/README.md, "OOM torture"). Holding memory for the restart and handing it back at the
//! kill is what a supervisor (or a standby daemon) has to do about that.

use std::ffi::CString;
use std::io::Write;
use std::time::{Duration, Instant};

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: kill-and-recover [--reserve-mib N] [--standby RECORD] TRIGGER_FILE PID \
                 TRIES -- [RECOVER_COMMAND...]";
    let mut reserve_mib = 0usize;
    let mut standby_record: Option<String> = None;
    loop {
        match args.first().map(String::as_str) {
            Some("--reserve-mib") => {
                reserve_mib = args.get(1).and_then(|v| v.parse().ok()).unwrap_or(0);
            }
            Some("--standby") => standby_record = args.get(1).cloned(),
            _ => break,
        }
        args.drain(..2.min(args.len()));
    }
    let (Some(trigger), Some(pid), Some(tries), Some("--")) = (
        args.first(),
        args.get(1).and_then(|p| p.parse::<i32>().ok()),
        args.get(2).and_then(|p| p.parse::<u32>().ok()),
        args.get(3).map(String::as_str),
    ) else {
        eprintln!("{usage}");
        std::process::exit(2);
    };
    if args.len() < 5 && standby_record.is_none() {
        eprintln!("{usage}");
        std::process::exit(2);
    }
    // Everything the critical part needs is made now, before the pressure.
    let trigger = CString::new(trigger.as_str()).unwrap();
    let argv_c: Vec<CString> = args[4..]
        .iter()
        .map(|a| CString::new(a.as_str()).unwrap())
        .collect();
    let mut argv: Vec<*const libc::c_char> = argv_c.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut out = std::io::stdout();
    let mut line = [0u8; 160];
    let mut say = |out: &mut std::io::Stdout, args: std::fmt::Arguments| {
        let n = {
            let mut w = &mut line[..];
            let _ = w.write_fmt(args);
            let _ = w.write_all(b"\n");
            160 - w.len()
        };
        let _ = out.write_all(&line[..n]);
        let _ = out.flush();
    };
    // SAFETY: mlockall only changes this process's memory locking.
    if unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE) } != 0 {
        say(&mut out, format_args!("kill-and-recover: mlockall failed"));
        std::process::exit(2);
    }
    // The reserve: touched now, locked by MCL_FUTURE, freed at the kill.
    let reserve_len = reserve_mib << 20;
    let reserve = if reserve_len > 0 {
        // SAFETY: a fresh private anonymous mapping, populated; nothing else refers to it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                reserve_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        (p != libc::MAP_FAILED).then_some(p)
    } else {
        None
    };
    // PR_SET_IO_FLUSHER (57): see the module doc.
    // SAFETY: prctl only sets a flag of this task.
    let flusher = unsafe { libc::prctl(57, 1, 0, 0, 0) } == 0;
    say(
        &mut out,
        format_args!(
            "kill-and-recover: armed, pid {pid}, locked, io_flusher={flusher}, reserve {} MiB",
            if reserve.is_some() { reserve_mib } else { 0 }
        ),
    );
    loop {
        // SAFETY: stat into a zeroed struct we own; the path is a valid C string.
        let exists = unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            libc::stat(trigger.as_ptr(), &mut st) == 0
        };
        if exists {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let t0 = Instant::now();
    // SAFETY: sending a signal.
    let r = unsafe { libc::kill(pid, libc::SIGKILL) };
    if let Some(p) = reserve {
        // SAFETY: unmapping our own reserve, which nothing refers to.
        unsafe { libc::munmap(p, reserve_len) };
    }
    say(
        &mut out,
        format_args!("kill-and-recover: SIGKILL to the daemon {pid}: {r}"),
    );
    if let Some(record) = standby_record {
        let mut buf = Vec::with_capacity(8192);
        while t0.elapsed() < Duration::from_secs(u64::from(tries)) {
            buf.clear();
            if let Some(new) = record_pid(&record, &mut buf).filter(|&p| p != pid) {
                let secs = t0.elapsed().as_secs_f64();
                say(
                    &mut out,
                    format_args!(
                        "kill-and-recover: recovered secs={secs:.3} attempts=1 by standby {new}"
                    ),
                );
                std::process::exit(0);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        say(
            &mut out,
            format_args!("kill-and-recover: no takeover in {tries} s"),
        );
        diagnose(u64::from(tries));
        std::process::exit(1);
    }
    for attempt in 1..=tries {
        // vfork semantics (posix_spawn): no copy of this process's memory is made.
        let mut child: libc::pid_t = 0;
        // SAFETY: argv is a NULL-terminated array of valid C strings that outlives the call;
        // the environment is inherited.
        let rc = unsafe {
            libc::posix_spawn(
                &mut child,
                argv[0],
                std::ptr::null(),
                std::ptr::null(),
                argv.as_ptr() as *const *mut libc::c_char,
                std::ptr::null(),
            )
        };
        let status = if rc != 0 {
            -rc
        } else {
            let mut st = 0;
            let spawned = Instant::now();
            let mut next_diag = 20;
            loop {
                // SAFETY: polling our own child.
                if unsafe { libc::waitpid(child, &mut st, libc::WNOHANG) } == child {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
                if spawned.elapsed().as_secs() >= next_diag {
                    next_diag += 20;
                    diagnose(spawned.elapsed().as_secs());
                }
            }
            if libc::WIFEXITED(st) {
                libc::WEXITSTATUS(st)
            } else {
                128 + libc::WTERMSIG(st)
            }
        };
        let secs = t0.elapsed().as_secs_f64();
        say(
            &mut out,
            format_args!(
                "kill-and-recover: attempt {attempt} exit {status} at {secs:.1} s after the kill"
            ),
        );
        if status == 0 {
            say(
                &mut out,
                format_args!("kill-and-recover: recovered secs={secs:.1} attempts={attempt}"),
            );
            std::process::exit(0);
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    say(&mut out, format_args!("kill-and-recover: gave up"));
    std::process::exit(1);
}

/// The `"pid": N` of a device record, read into `buf` (its capacity made beforehand).
fn record_pid(path: &str, buf: &mut Vec<u8>) -> Option<i32> {
    use std::io::Read;
    std::fs::File::open(path).ok()?.read_to_end(buf).ok()?;
    let text = std::str::from_utf8(buf).ok()?;
    let rest = &text[text.find("\"pid\":")? + 6..];
    rest.trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// When `recover` takes long: what every ublk-crypt process is doing (/proc: state, locked
/// memory, current syscall, kernel wait channel) and the tail of the daemons' logs. Allocates,
/// which is fine here: this process is locked and an IO flusher.
fn diagnose(secs: u64) {
    let mut out = format!("kill-and-recover: recover still running after {secs} s\n");
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in dir.flatten() {
        let p = e.path();
        if std::fs::read_to_string(p.join("comm")).map_or(true, |c| c.trim() != "ublk-crypt") {
            continue;
        }
        let status = std::fs::read_to_string(p.join("status")).unwrap_or_default();
        let pick: Vec<&str> = status
            .lines()
            .filter(|l| {
                ["State:", "VmRSS:", "VmLck:", "Threads:"]
                    .iter()
                    .any(|k| l.starts_with(k))
            })
            .collect();
        let syscall = std::fs::read_to_string(p.join("syscall")).unwrap_or_default();
        let wchan = std::fs::read_to_string(p.join("wchan")).unwrap_or_default();
        out += &format!(
            "kill-and-recover:   pid {} {} syscall {} wchan {}\n",
            e.file_name().to_string_lossy(),
            pick.join(" ")
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" "),
            syscall.split_whitespace().next().unwrap_or("?"),
            wchan
        );
        if let Ok(tasks) = std::fs::read_dir(p.join("task")) {
            for t in tasks.flatten() {
                let tp = t.path();
                let comm = std::fs::read_to_string(tp.join("comm")).unwrap_or_default();
                let st = std::fs::read_to_string(tp.join("stat")).unwrap_or_default();
                let state = st
                    .rsplit(')')
                    .next()
                    .and_then(|r| r.split_whitespace().next());
                let sc = std::fs::read_to_string(tp.join("syscall")).unwrap_or_default();
                out += &format!(
                    "kill-and-recover:     task {} {} state {} syscall {}\n",
                    t.file_name().to_string_lossy(),
                    comm.trim(),
                    state.unwrap_or("?"),
                    sc.split_whitespace().next().unwrap_or("?")
                );
            }
        }
    }
    // The logs only from a ramfs: a tmpfs page of them may be in the stalled swap.
    // SAFETY: statfs into a zeroed struct we own, with a valid C string.
    let ramfs = unsafe {
        let mut sf: libc::statfs = std::mem::zeroed();
        libc::statfs(c"/run/ublk-crypt".as_ptr(), &mut sf) == 0 && sf.f_type == 0x8584_58f6
        // RAMFS_MAGIC
    };
    if let Ok(dir) = std::fs::read_dir("/run/ublk-crypt")
        .map_err(|_| ())
        .and_then(|d| if ramfs { Ok(d) } else { Err(()) })
    {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("daemon-") {
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                for l in &lines[lines.len().saturating_sub(8)..] {
                    out += &format!("kill-and-recover:   {name}: {l}\n");
                }
            }
        }
    }
    let _ = std::io::stdout().write_all(out.as_bytes());
    let _ = std::io::stdout().flush();
}
