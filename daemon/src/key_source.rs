//! Where the key comes from, with `cryptsetup open --type plain` semantics, byte for byte:
//!
//! | source | read | hashed |
//! |---|---|---|
//! | `--key-file PATH` | exactly the key size after `--keyfile-offset` (`--keyfile-size` ignored, with a warning) | no (`--hash` ignored, with a warning) |
//! | `--key-file -` | all of standard input (up to `--keyfile-size`) | yes, with `--hash` |
//! | none | standard input up to the first newline (prompt if a terminal) | yes, with `--hash` |
//!
//! A key file that cannot supply the key's bytes after the offset is an error. That a key
//! file's `--keyfile-size` changes nothing is cryptsetup 2.6's behaviour, measured against it in
//! the VM over a matrix of options (tests/tests/daemon_dmcrypt_compat.rs,
//! `key_files_give_cryptsetups_key`): a shorter `-l` neither shortens nor zero-pads the key, a
//! longer one does not make a short file acceptable, and one past the end of the file is no
//! error. With `--key-file -` it does limit what is read (and hashed). The default hash is cryptsetup's
//! plain-mode default, ripemd160. Every buffer that holds key material is zeroized.

use std::fs::File;
use std::io::{self, BufRead, Read};
use std::os::fd::AsFd;
use std::path::Path;

use anyhow::{bail, Context, Result};
use ublk_crypt_crypto::{Key, PassphraseHash};

/// The most a passphrase or stdin key may be (cryptsetup's default key file size limit).
const MAX_INPUT: usize = 8 << 20;

/// How to obtain the key, decided from the arguments before anything is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySpec {
    /// A raw key file: not hashed.
    File {
        path: std::path::PathBuf,
        offset: u64,
        size: usize,
    },
    /// `--key-file -`: all of standard input, hashed.
    StdinAll {
        offset: u64,
        max: usize,
        hash: PassphraseHash,
    },
    /// A passphrase: standard input up to a newline, or the terminal, hashed.
    Passphrase { hash: PassphraseHash },
}

impl KeySpec {
    /// The key source that `--key-file`, `--keyfile-offset`, `--keyfile-size` and `--hash`
    /// describe, for a key of `key_bytes`; checks the combination and the hash name.
    pub fn new(
        key_file: Option<&Path>,
        keyfile_offset: u64,
        keyfile_size: Option<usize>,
        hash: Option<&str>,
        key_bytes: usize,
    ) -> Result<KeySpec> {
        let parse_hash = || -> Result<PassphraseHash> {
            Ok(hash
                .unwrap_or(PassphraseHash::CRYPTSETUP_PLAIN_DEFAULT)
                .parse()?)
        };
        Ok(match key_file {
            Some(p) if p.as_os_str() == "-" && keyfile_size.is_some_and(|s| s > MAX_INPUT) => {
                bail!("--keyfile-size is at most {MAX_INPUT} bytes")
            }
            Some(p) if p.as_os_str() == "-" => KeySpec::StdinAll {
                offset: keyfile_offset,
                max: keyfile_size.unwrap_or(MAX_INPUT),
                hash: parse_hash()?,
            },
            Some(p) => {
                if p.as_os_str() == "/dev/urandom"
                    && (keyfile_offset != 0 || keyfile_size.is_some())
                {
                    bail!("--keyfile-offset and --keyfile-size mean nothing with /dev/urandom (a fresh random key)");
                }
                if keyfile_size.is_some_and(|s| s > MAX_INPUT) {
                    bail!("--keyfile-size is at most {MAX_INPUT} bytes");
                }
                if hash.is_some() {
                    tracing::warn!(
                        "--hash is ignored with a key file, as in cryptsetup plain mode"
                    );
                }
                if keyfile_size.is_some_and(|s| s != key_bytes) {
                    tracing::warn!(
                        "--keyfile-size is ignored with a key file, as in cryptsetup plain mode:                          the key's {key_bytes} bytes are read"
                    );
                }
                KeySpec::File {
                    path: p.to_path_buf(),
                    offset: keyfile_offset,
                    size: key_bytes,
                }
            }
            None => {
                if keyfile_offset != 0 {
                    bail!("--keyfile-offset needs --key-file");
                }
                KeySpec::Passphrase {
                    hash: parse_hash()?,
                }
            }
        })
    }

    /// A fresh random key (`--key-file /dev/urandom` or `/dev/random`): what is written with it
    /// cannot be read after the device is closed, so formatting it (mkswap) destroys nothing.
    pub fn is_ephemeral(&self) -> bool {
        matches!(self, KeySpec::File { path, .. }
            if path.as_os_str() == "/dev/urandom" || path.as_os_str() == "/dev/random")
    }

    /// Reads the key. `prompt_for` names the device in the terminal prompt.
    pub fn read(&self, key_bytes: usize, prompt_for: &str) -> Result<Key> {
        match self {
            KeySpec::File { path, offset, size } => {
                let mut f = File::open(path)
                    .with_context(|| format!("cannot open key file {}", path.display()))?;
                skip(&mut f, *offset).with_context(|| {
                    format!("key file {}: cannot skip {offset} bytes", path.display())
                })?;
                let mut raw = Key::zeroed(*size);
                let got = read_full(&mut f, raw.as_mut_bytes())
                    .with_context(|| format!("cannot read key file {}", path.display()))?;
                if got < *size {
                    bail!(
                        "key file {} is too short: need {size} bytes after offset {offset}, it has {got}",
                        path.display()
                    );
                }
                Ok(raw)
            }
            KeySpec::StdinAll { offset, max, hash } => {
                let stdin = io::stdin();
                let mut lock = stdin.lock();
                skip(&mut lock, *offset)
                    .context("cannot skip --keyfile-offset bytes of standard input")?;
                let input = read_limited(&mut lock, *max, false)?;
                derive(*hash, &input, key_bytes)
            }
            KeySpec::Passphrase { hash } => {
                let pass = read_passphrase(prompt_for)?;
                derive(*hash, &pass, key_bytes)
            }
        }
    }
}

fn derive(hash: PassphraseHash, input: &Key, key_bytes: usize) -> Result<Key> {
    if input.is_empty() {
        bail!("no passphrase or key given on standard input");
    }
    Ok(Key::from_passphrase(hash, input.as_bytes(), key_bytes)?)
}

fn skip(r: &mut impl Read, n: u64) -> io::Result<()> {
    let copied = io::copy(&mut r.take(n), &mut io::sink())?;
    if copied < n {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "input ends before the offset",
        ));
    }
    Ok(())
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Reads up to `max` bytes (or up to a newline, which is dropped, with `stop_at_newline`) into
/// a Key buffer sized once, so no reallocation leaves a copy behind.
fn read_limited(r: &mut impl BufRead, max: usize, stop_at_newline: bool) -> Result<Key> {
    let mut buf = Key::zeroed(max.min(MAX_INPUT));
    let mut len = 0;
    loop {
        let chunk = match r.fill_buf() {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("cannot read standard input"),
        };
        if chunk.is_empty() || len == buf.len() {
            break;
        }
        let mut take = chunk.len().min(buf.len() - len);
        let mut done = false;
        if stop_at_newline {
            if let Some(i) = chunk[..take].iter().position(|&b| b == b'\n') {
                take = i;
                done = true;
            }
        }
        buf.as_mut_bytes()[len..len + take].copy_from_slice(&chunk[..take]);
        len += take;
        r.consume(take + usize::from(done));
        if done {
            break;
        }
    }
    Ok(Key::from_bytes(&buf.as_bytes()[..len]))
}

/// A passphrase from the terminal (echo off, prompt on stderr) or from a pipe (up to newline).
fn read_passphrase(prompt_for: &str) -> Result<Key> {
    let stdin = io::stdin();
    let is_tty = nix::unistd::isatty(stdin.as_fd()).unwrap_or(false);
    if !is_tty {
        return read_limited(&mut stdin.lock(), MAX_INPUT, true);
    }
    use nix::sys::termios::{tcgetattr, tcsetattr, LocalFlags, SetArg};
    eprint!("Enter passphrase for {prompt_for}: ");
    let saved = tcgetattr(stdin.as_fd()).context("cannot read terminal settings")?;
    let mut quiet = saved.clone();
    quiet.local_flags.remove(LocalFlags::ECHO);
    tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &quiet).context("cannot turn off echo")?;
    let pass = read_limited(&mut stdin.lock(), MAX_INPUT, true);
    let _ = tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &saved);
    eprintln!();
    pass
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file(
        p: &str,
        offset: u64,
        size: Option<usize>,
        hash: Option<&str>,
        bytes: usize,
    ) -> KeySpec {
        KeySpec::new(Some(Path::new(p)), offset, size, hash, bytes).unwrap()
    }

    #[test]
    fn key_file_is_raw_and_short_file_fails() {
        let dir = std::env::temp_dir().join(format!("ublk-crypt-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("k");
        let mut f = File::create(&path).unwrap();
        f.write_all(&(0..100u8).collect::<Vec<_>>()).unwrap();
        drop(f);
        let p = path.to_str().unwrap();
        let spec = file(p, 0, None, Some("sha256"), 64);
        let key = spec.read(64, "x").unwrap();
        assert_eq!(
            key.as_bytes(),
            &(0..64u8).collect::<Vec<_>>()[..],
            "hash must be ignored"
        );
        let spec = file(p, 10, None, None, 64);
        assert_eq!(spec.read(64, "x").unwrap().as_bytes()[0], 10);
        let spec = file(p, 50, None, None, 64);
        let err = spec.read(64, "x").unwrap_err().to_string();
        assert!(
            err.contains("too short") && err.contains("need 64"),
            "{err}"
        );
        // --keyfile-size changes nothing with a key file (cryptsetup 2.6, measured in the VM).
        for l in [16, 32, 80, 300] {
            let spec = file(p, 0, Some(l), None, 32);
            let k = spec.read(32, "x").unwrap();
            assert_eq!(k.as_bytes(), &(0..32u8).collect::<Vec<_>>()[..], "-l {l}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn passphrase_stops_at_newline_and_stdin_key_does_not() {
        let mut r = io::Cursor::new(b"secret\nmore".to_vec());
        assert_eq!(
            read_limited(&mut r, MAX_INPUT, true).unwrap().as_bytes(),
            b"secret"
        );
        let mut r = io::Cursor::new(b"secret\nmore".to_vec());
        assert_eq!(
            read_limited(&mut r, MAX_INPUT, false).unwrap().as_bytes(),
            b"secret\nmore"
        );
        let mut r = io::Cursor::new(b"secret\nmore".to_vec());
        assert_eq!(read_limited(&mut r, 4, false).unwrap().as_bytes(), b"secr");
    }

    #[test]
    fn default_hash_is_cryptsetups() {
        let spec = KeySpec::new(None, 0, None, None, 64).unwrap();
        assert_eq!(
            spec,
            KeySpec::Passphrase {
                hash: "ripemd160".parse().unwrap()
            }
        );
        let spec = KeySpec::new(Some(Path::new("-")), 0, None, Some("sha512"), 64).unwrap();
        assert!(matches!(spec, KeySpec::StdinAll { .. }));
        assert!(KeySpec::new(None, 0, None, Some("md4"), 64).is_err());
        let e = KeySpec::new(None, 1, None, None, 64)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "--keyfile-offset needs --key-file");
    }

    #[test]
    fn empty_passphrase_is_an_error() {
        let h: PassphraseHash = "sha256".parse().unwrap();
        assert!(derive(h, &Key::zeroed(0), 32).is_err());
    }

    #[test]
    fn keyfile_options_that_mean_nothing_or_too_much_are_refused() {
        let urandom = Path::new("/dev/urandom");
        let e = KeySpec::new(Some(urandom), 16, None, None, 64).unwrap_err();
        assert!(
            e.to_string().contains("mean nothing with /dev/urandom"),
            "{e}"
        );
        let e = KeySpec::new(Some(urandom), 0, Some(32), None, 64).unwrap_err();
        assert!(
            e.to_string().contains("mean nothing with /dev/urandom"),
            "{e}"
        );
        KeySpec::new(Some(urandom), 0, None, None, 64).unwrap();
        for f in ["/etc/key", "-"] {
            let e = KeySpec::new(Some(Path::new(f)), 0, Some(usize::MAX), None, 64).unwrap_err();
            assert!(
                e.to_string().contains("--keyfile-size is at most"),
                "{f}: {e}"
            );
        }
    }
}
