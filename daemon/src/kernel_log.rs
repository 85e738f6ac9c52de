//! Messages from the IO path go to the kernel log (`/dev/kmsg`), never to stderr.
//!
//! Why: the daemon's stderr is a file in `/run/ublk-crypt` (a tmpfs) when it daemonizes, or a
//! pipe to journald under systemd. A tmpfs page left alone for a while can be in swap — on the
//! very device this daemon serves — and a pipe blocks once its reader (journald, itself
//! perhaps swapped out) stops reading. Either way a queue thread logging an IO error would
//! wait on the IO it is supposed to serve: the same deadlock as a daemon page in swap. A write
//! to `/dev/kmsg` lands in the kernel's ring buffer, which never waits for a reader and never
//! touches swap; that is where dm-crypt's messages go too, and journald collects it.
//!
//! No allocation: the line is formatted into a buffer on the stack and written with one
//! `write(2)` on a descriptor opened at start-up ([`open`]). Lines longer than the buffer are
//! cut. Without `/dev/kmsg` (or before [`open`]) messages are dropped; the IO path counts its
//! errors in the queue counters anyway (`ublk-crypt status`).

use std::fmt::{self, Write as _};
use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::sync::OnceLock;

static KMSG: OnceLock<Option<File>> = OnceLock::new();

/// Longest line written; the kernel takes up to 1 KiB per record.
const LINE_BYTES: usize = 512;

/// Syslog priority of an error (`<3>`).
const LEVEL_ERR: u8 = 3;

/// Opens `/dev/kmsg` for the IO path. Call once at start-up, before the queues run.
pub fn open() {
    KMSG.get_or_init(|| {
        File::options()
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/kmsg")
            .ok()
    });
}

/// Writes one error line to the kernel log: `ublk-crypt[PID]: <args>`.
pub fn error(args: fmt::Arguments<'_>) {
    if let Some(Some(kmsg)) = KMSG.get() {
        let mut kmsg: &File = kmsg;
        let mut buf = [0u8; LINE_BYTES];
        let line = format_line(&mut buf, LEVEL_ERR, std::process::id(), args);
        // Nothing to do if the kernel refuses it (rate limit): the error is counted anyway.
        let _ = kmsg.write(line);
    }
}

/// `<LEVEL>ublk-crypt[PID]: message`, cut to `buf`'s length.
pub fn format_line<'b>(
    buf: &'b mut [u8],
    level: u8,
    pid: u32,
    args: fmt::Arguments<'_>,
) -> &'b [u8] {
    let mut w = StackLine { buf, len: 0 };
    // A full buffer ends the formatting with an error: the line is cut there, on purpose.
    let _ = write!(w, "<{level}>ublk-crypt[{pid}]: ");
    let _ = w.write_fmt(args);
    let StackLine { buf, len } = w;
    &buf[..len]
}

/// `fmt::Write` into a fixed buffer.
struct StackLine<'b> {
    buf: &'b mut [u8],
    len: usize,
}

impl fmt::Write for StackLine<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = self.buf.len() - self.len;
        let n = s.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        if n < s.len() {
            Err(fmt::Error)
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_has_level_name_pid_and_message() {
        let mut buf = [0u8; 128];
        let line = format_line(&mut buf, 3, 42, format_args!("queue {} failed", 0));
        assert_eq!(line, b"<3>ublk-crypt[42]: queue 0 failed");
    }

    #[test]
    fn a_long_line_is_cut_to_the_buffer() {
        let mut buf = [0u8; 24];
        let line = format_line(&mut buf, 3, 7, format_args!("{}", "x".repeat(100)));
        assert_eq!(line.len(), 24);
        assert!(line.starts_with(b"<3>ublk-crypt[7]: xxxxx"));
    }
}
