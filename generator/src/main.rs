//! `ublk-crypt-generator`: the systemd generator for `/etc/ublk-crypttab` (installed in
//! `/usr/lib/systemd/system-generators/`). systemd runs it at boot and at every daemon-reload
//! with its output directories (`normal [early late]`); it writes into the first. See the
//! library docs and `ublk-crypttab(5)`.
//!
//! It never fails the boot: a line it refuses is logged (to the kernel log, which the journal
//! reads, since a generator runs before journald) and skipped, and an unreadable file means no
//! units. `$UBLK_CRYPTTAB` names another file (tests).

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use ublk_crypt_generator::{generate, Output, DEFAULT_CRYPTTAB};

fn log(msg: &str) {
    // <3>: error. /dev/kmsg when systemd runs us; stderr otherwise (a shell, a test).
    let line = format!("ublk-crypt-generator: {msg}");
    let kmsg = std::env::var_os("UBLK_CRYPT_GENERATOR_STDERR").is_none()
        && fs::OpenOptions::new()
            .write(true)
            .open("/dev/kmsg")
            .and_then(|mut f| f.write_all(format!("<3>{line}\n").as_bytes()))
            .is_ok();
    if !kmsg {
        eprintln!("{line}");
    }
}

fn write(dir: &Path, o: &Output) -> std::io::Result<()> {
    let rel = match o {
        Output::File { path, .. } | Output::Symlink { path, .. } => path,
    };
    let p = dir.join(rel);
    if let Some(parent) = p.parent() {
        fs::create_dir_all(parent)?;
    }
    match o {
        Output::File { contents, .. } => fs::write(&p, contents),
        Output::Symlink { target, .. } => {
            let _ = fs::remove_file(&p);
            std::os::unix::fs::symlink(target, &p)
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !(args.len() == 1 || args.len() == 3) {
        eprintln!("usage: ublk-crypt-generator NORMAL-DIR [EARLY-DIR LATE-DIR] (run by systemd)");
        return ExitCode::from(2);
    }
    let dir = Path::new(&args[0]);
    let source = std::env::var("UBLK_CRYPTTAB").unwrap_or_else(|_| DEFAULT_CRYPTTAB.into());
    let text = match fs::read_to_string(&source) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return ExitCode::SUCCESS,
        Err(e) => {
            log(&format!("cannot read {source}: {e}; no units"));
            return ExitCode::SUCCESS;
        }
    };
    let (outputs, messages) = generate(&text, &source);
    for m in &messages {
        log(m);
    }
    for o in &outputs {
        if let Err(e) = write(dir, o) {
            log(&format!("cannot write into {}: {e}", dir.display()));
        }
    }
    ExitCode::SUCCESS
}
