//! One request to a served device's control socket (`control.rs`) and its one-line answer:
//! what the commands in `client.rs` and a standby (`standby.rs`) send.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::records::DeviceRecord;

/// Sends one request to a daemon's control socket and returns its one-line answer.
pub fn request(rec: &DeviceRecord, what: &str) -> Result<String> {
    request_with(rec, what, Duration::from_secs(10))
}

pub fn request_with(rec: &DeviceRecord, what: &str, timeout: Duration) -> Result<String> {
    let path = rec.socket_path();
    let mut s = UnixStream::connect(&path).with_context(|| {
        format!(
            "cannot reach the daemon of {} at {}",
            rec.name,
            path.display()
        )
    })?;
    s.set_read_timeout(Some(timeout))?;
    writeln!(s, "{what}")?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    Ok(line)
}

/// The daemon's `{"error": ...}` reply, if it is one.
pub fn reply_error(reply: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(reply.trim()).ok()?;
    v.get("error")?.as_str().map(str::to_string)
}
