//! `/etc/ublk-crypttab` → systemd units, as `systemd-cryptsetup-generator` does for
//! `/etc/crypttab`: an admin writes one familiar line per encrypted volume and the units follow
//! at every boot (and every `systemctl daemon-reload`).
//!
//! The file has crypttab(5)'s syntax (`name device keyfile options`) and its option names where
//! they apply ([`crypttab`]); each valid line becomes drop-ins for the shipped templates
//! `ublk-crypt@.service` (the device) and, with `swap`, `ublk-crypt-swap@.service` (the checked
//! mkswap + swapon), plus the links that start them at boot ([`units`]). A bad line is reported
//! and produces nothing: never a unit that could format the wrong device.

pub mod crypttab;
pub mod units;

pub use crypttab::{parse, Entry, LineError};
pub use units::{render, Output};

/// The file the generator reads unless `$UBLK_CRYPTTAB` names another.
pub const DEFAULT_CRYPTTAB: &str = "/etc/ublk-crypttab";

/// Everything one run of the generator produces: the files, and one message per refused line.
pub fn generate(text: &str, source: &str) -> (Vec<Output>, Vec<String>) {
    let (entries, errors) = parse(text);
    let mut out = vec![];
    for e in &entries {
        out.extend(render(e, source));
    }
    let messages = errors
        .iter()
        .map(|e| format!("{source}:{}: {}; no units for this line", e.line, e.message))
        .collect();
    (out, messages)
}
