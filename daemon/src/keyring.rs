//! The key kept for a restarted daemon: crash recovery without losing swapped pages, even
//! with an ephemeral key.
//!
//! Devices are created with ublk user recovery (`UBLK_F_USER_RECOVERY` +
//! `UBLK_F_USER_RECOVERY_REISSUE`): when the daemon dies, the kernel keeps `/dev/ublkbN`, holds
//! new IO and requeues in-flight IO instead of failing it, and a new daemon can re-attach.
//! Swap pages written before the crash must still decrypt afterwards, so the new daemon needs
//! the very same key — which, for `--key-file /dev/urandom`, exists nowhere else.
//!
//! **Where the key is kept.** A `user` key named `ublk-crypt:dev<N>` in root's user keyring
//! (`@u`), added when the device is created and invalidated by `close`.
//! - It lives in kernel memory: never swapped, never written to any disk, gone at reboot
//!   (when the device is gone too).
//! - Permissions: possessor all, owner (uid 0) view/read/search/write/setattr, nothing for
//!   group or others: no other uid can read it, and every process running as uid 0 can (not
//!   only the daemon: recovery by a new process needs exactly that).
//! - It survives the daemon's death (SIGKILL, abort on panic, OOM kill), because the user
//!   keyring belongs to uid 0, not to the process; a daemon restarted by systemd (in another
//!   session keyring) finds it by searching `@u`.
//!
//! Threat model: root can read it — but root can read the daemon's memory and the decrypted
//! device anyway; the keyring adds no exposure beyond what a running dm-crypt has (its key is
//! in kernel memory too, and `dmsetup table --showkeys` prints it to root). What it protects
//! against: the key reaching a disk (swap, core dump, state file, journal) or another user.
//! The alternative considered, systemd's file-descriptor store, only works under systemd and
//! not for `ublk-crypt recover` run by hand.

use std::ffi::CString;

use anyhow::{bail, Result};
use ublk_crypt_crypto::Key;

const KEY_SPEC_PROCESS_KEYRING: libc::c_long = -2;
const KEY_SPEC_USER_KEYRING: libc::c_long = -4;
const KEYCTL_SETPERM: libc::c_long = 5;
const KEYCTL_LINK: libc::c_long = 8;
const KEYCTL_UNLINK: libc::c_long = 9;
const KEYCTL_SEARCH: libc::c_long = 10;
const KEYCTL_READ: libc::c_long = 11;
const KEYCTL_INVALIDATE: libc::c_long = 21;
/// Possessor: all; user (owner, uid 0): view, read, write, search, setattr; group/other: none.
const KEY_PERM: libc::c_long = 0x3f00_0000 | 0x002f_0000;

fn description(id: u32) -> CString {
    CString::new(format!("ublk-crypt:dev{id}")).expect("no NUL in a formatted id")
}

/// Keeps the key of device `id` in root's user keyring for a restarted daemon.
///
/// **Why the detour through the process keyring.** Changing a key's permissions
/// (`KEYCTL_SETPERM`) needs the setattr permission, which a new key grants only to a process
/// that *possesses* it: one that reaches it from its own thread, process or session keyring.
/// A key added straight into `@u` is possessed only where `@u` is linked into the session
/// keyring (a login shell, `KeyringMode=shared`); a systemd service with the default
/// `KeyringMode=private` gets a fresh session keyring without that link, and the daemon failed
/// there with EACCES at every start. So the key is born in this process's own keyring (always
/// possessed), restricted there, then linked into `@u` and unlinked from the process keyring:
/// the same result in every kind of session.
pub fn keep_key(id: u32, key: &Key) -> Result<()> {
    let ty = c"user";
    let desc = description(id);
    // SAFETY: add_key(2) reads the type and description strings and `plen` payload bytes from
    // valid buffers that outlive the call; it does not retain the pointers.
    let serial = unsafe {
        libc::syscall(
            libc::SYS_add_key,
            ty.as_ptr(),
            desc.as_ptr(),
            key.as_bytes().as_ptr(),
            key.len(),
            KEY_SPEC_PROCESS_KEYRING,
        )
    };
    if serial < 0 {
        bail!(
            "cannot keep the key in root's keyring for recovery: {}",
            std::io::Error::last_os_error()
        );
    }
    let keyctl = |op: libc::c_long, arg: libc::c_long| -> std::io::Result<()> {
        // SAFETY: keyctl(SETPERM | LINK | UNLINK, serial, integer) takes integers only.
        let r = unsafe { libc::syscall(libc::SYS_keyctl, op, serial, arg) };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    let unlink_from_process = || {
        let _ = keyctl(KEYCTL_UNLINK, KEY_SPEC_PROCESS_KEYRING);
    };
    if let Err(e) = keyctl(KEYCTL_SETPERM, KEY_PERM) {
        unlink_from_process();
        bail!("cannot restrict the permissions of the kept key: {e}");
    }
    if let Err(e) = keyctl(KEYCTL_LINK, KEY_SPEC_USER_KEYRING) {
        unlink_from_process();
        bail!("cannot keep the key in root's keyring for recovery: {e}");
    }
    unlink_from_process();
    Ok(())
}

fn find_key(id: u32) -> Option<libc::c_long> {
    let ty = c"user";
    let desc = description(id);
    // SAFETY: keyctl(KEYCTL_SEARCH, keyring, type, description, 0) reads two valid C strings.
    let serial = unsafe {
        libc::syscall(
            libc::SYS_keyctl,
            KEYCTL_SEARCH,
            KEY_SPEC_USER_KEYRING,
            ty.as_ptr(),
            desc.as_ptr(),
            0 as libc::c_long,
        )
    };
    (serial >= 0).then_some(serial)
}

/// Fetches the kept key of device `id` (`len` bytes).
pub fn kept_key(id: u32, len: usize) -> Result<Key> {
    let Some(serial) = find_key(id) else {
        bail!(
            "the key of device {id} is not in root's keyring (the device was closed, or created before a reboot): cannot recover"
        );
    };
    let mut key = Key::zeroed(len);
    // SAFETY: keyctl(KEYCTL_READ, serial, buf, buflen) writes at most `buflen` bytes into `buf`,
    // a live mutable buffer of exactly that length.
    let n = unsafe {
        libc::syscall(
            libc::SYS_keyctl,
            KEYCTL_READ,
            serial,
            key.as_mut_bytes().as_mut_ptr(),
            len,
        )
    };
    if n < 0 {
        bail!(
            "cannot read the kept key of device {id}: {}",
            std::io::Error::last_os_error()
        );
    }
    if n as usize != len {
        bail!("the kept key of device {id} has {n} bytes, the device needs {len}");
    }
    Ok(key)
}

/// Removes the kept key of device `id` (on close). Missing keys are fine.
pub fn forget_key(id: u32) {
    if let Some(serial) = find_key(id) {
        // SAFETY: keyctl(KEYCTL_INVALIDATE, serial) takes integers only.
        unsafe {
            libc::syscall(libc::SYS_keyctl, KEYCTL_INVALIDATE, serial);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_round_trips_through_the_keyring_and_is_forgotten() {
        // Uses an id no real device has.
        let id = 900_000 + std::process::id() % 1000;
        let key = Key::from_bytes(&[0x42; 64]);
        keep_key(id, &key).unwrap();
        assert_eq!(kept_key(id, 64).unwrap().as_bytes(), key.as_bytes());
        assert!(kept_key(id, 32).is_err(), "length mismatch is an error");
        forget_key(id);
        assert!(kept_key(id, 64).is_err());
    }

    /// What systemd's `KeyringMode=private` gives a service: a new session keyring that does
    /// not link root's user keyring, so nothing in `@u` is possessed. Keeping and finding the
    /// key must work there too (it failed with EACCES before keys were born in the process
    /// keyring). Session keyrings are per thread credentials: only this test's thread moves.
    #[test]
    fn key_round_trips_in_a_private_session_keyring() {
        const KEYCTL_JOIN_SESSION_KEYRING: libc::c_long = 1;
        let id = 901_000 + std::process::id() % 1000;
        std::thread::spawn(move || {
            // SAFETY: keyctl(JOIN_SESSION_KEYRING, NULL) joins a new anonymous session keyring.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_keyctl,
                    KEYCTL_JOIN_SESSION_KEYRING,
                    std::ptr::null::<libc::c_char>(),
                )
            };
            assert!(r >= 0, "join: {}", std::io::Error::last_os_error());
            let key = Key::from_bytes(&[0x5a; 64]);
            keep_key(id, &key).unwrap();
            assert_eq!(kept_key(id, 64).unwrap().as_bytes(), key.as_bytes());
            forget_key(id);
            assert!(kept_key(id, 64).is_err());
        })
        .join()
        .unwrap();
    }
}
