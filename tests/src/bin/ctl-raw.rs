//! A raw client of a daemon's control socket, for the VM tests: what `ublk-crypt close` and
//! `status` never do (skip the client-side checks, say nothing, send too much).
//!
//! `ctl-raw SOCKET LINE` sends LINE and prints the reply; `ctl-raw --silent SECS SOCKET`
//! connects and sends nothing for SECS seconds; `ctl-raw --flood BYTES SOCKET` sends BYTES
//! bytes without a newline and prints the reply.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::Duration;

fn reply(s: UnixStream) -> ExitCode {
    let mut line = String::new();
    match BufReader::new(s).read_line(&mut line) {
        Ok(_) => {
            print!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ctl-raw: no reply: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let connect = |p: &str| {
        let s = UnixStream::connect(p).unwrap_or_else(|e| panic!("connect {p}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s
    };
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["--silent", secs, path] => {
            let _s = connect(path);
            std::thread::sleep(Duration::from_secs(secs.parse().unwrap_or(10)));
            ExitCode::SUCCESS
        }
        ["--flood", bytes, path] => {
            let mut s = connect(path);
            let n: usize = bytes.parse().unwrap_or(1 << 20);
            // The daemon stops reading at its limit; a write error after that is expected.
            let _ = s.write_all(&vec![b'a'; n]);
            reply(s)
        }
        [path, line] => {
            let mut s = connect(path);
            writeln!(s, "{line}").unwrap();
            reply(s)
        }
        _ => {
            eprintln!("usage: ctl-raw SOCKET LINE | --silent SECS SOCKET | --flood BYTES SOCKET");
            ExitCode::from(2)
        }
    }
}
