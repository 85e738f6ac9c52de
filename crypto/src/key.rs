//! Key material and cryptsetup's plain-mode passphrase hashing.

use std::fmt;
use std::str::FromStr;

use ripemd::Ripemd160;
use sha2::{Digest, Sha256, Sha512};
use zeroize::Zeroize;

use crate::CryptoError;

/// Key bytes, zeroed when dropped and never shown by `Debug` or `Display`.
///
/// The buffer is allocated once at its final size and never grows, so no stray copy of the key
/// is left behind by a reallocation. Where it lives in memory (locked, excluded from core dumps)
/// is the daemon's business: it calls `mlockall` and `MADV_DONTDUMP`; this crate stays pure.
pub struct Key {
    bytes: Box<[u8]>,
}

impl Key {
    /// Takes ownership of key bytes. The caller's copy, if any, is theirs to zeroize.
    pub fn from_bytes(bytes: &[u8]) -> Key {
        Key {
            bytes: bytes.to_vec().into_boxed_slice(),
        }
    }

    /// A zero-filled key of `len` bytes, to be filled in place (e.g. by `read_exact` from a key
    /// file) so the key never passes through an unzeroized temporary.
    pub fn zeroed(len: usize) -> Key {
        Key {
            bytes: vec![0u8; len].into_boxed_slice(),
        }
    }

    /// cryptsetup plain mode's passphrase processing (`crypt_plain_hash`), byte for byte:
    /// the key is `H(pass) ‖ H("A"‖pass) ‖ H("AA"‖pass) ‖ …` truncated to `key_len`; with
    /// `hash:N` only N bytes are hashed and the rest is zero; `plain` copies the passphrase,
    /// truncated or zero-padded.
    pub fn from_passphrase(
        hash: PassphraseHash,
        passphrase: &[u8],
        key_len: usize,
    ) -> Result<Key, CryptoError> {
        let hashed_len = match hash.len {
            Some(n) if n > key_len => {
                return Err(CryptoError::Passphrase(format!(
                    "hash length {n} is larger than the key ({key_len} bytes)"
                )))
            }
            Some(n) => n,
            None => key_len,
        };
        let mut key = Key::zeroed(key_len);
        let out = &mut key.bytes[..hashed_len];
        match hash.alg {
            // `--hash plain` is no hash at all (cryptsetup's process_key): the passphrase is
            // truncated or zero-padded to the key size. `plain:N` goes through
            // crypt_plain_hash, which insists on N bytes.
            HashAlg::Plain if hash.len.is_none() => {
                let n = passphrase.len().min(hashed_len);
                out[..n].copy_from_slice(&passphrase[..n]);
            }
            HashAlg::Plain => {
                if passphrase.len() < hashed_len {
                    return Err(CryptoError::Passphrase(format!(
                        "with --hash plain:{hashed_len} the passphrase must be at least {hashed_len} bytes"
                    )));
                }
                out.copy_from_slice(&passphrase[..hashed_len]);
            }
            HashAlg::Sha256 => fill_rounds::<Sha256>(out, passphrase),
            HashAlg::Sha512 => fill_rounds::<Sha512>(out, passphrase),
            HashAlg::Ripemd160 => fill_rounds::<Ripemd160>(out, passphrase),
        }
        Ok(key)
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Mutable access, for filling a [`Key::zeroed`] key in place.
    pub fn as_mut_bytes(&mut self) -> &mut [u8] {
        &mut self.bytes
    }
}

/// Round r hashes r letters 'A' followed by the passphrase (hashalot's trick, kept by
/// cryptsetup); each round's digest fills the next piece of the key.
fn fill_rounds<D: Digest>(out: &mut [u8], passphrase: &[u8]) {
    let mut round = 0usize;
    let mut pos = 0usize;
    while pos < out.len() {
        let mut h = D::new();
        for _ in 0..round {
            h.update(b"A");
        }
        h.update(passphrase);
        let mut digest = h.finalize();
        let n = digest.len().min(out.len() - pos);
        out[pos..pos + n].copy_from_slice(&digest[..n]);
        digest.as_mut_slice().zeroize();
        pos += n;
        round += 1;
    }
}

impl Drop for Key {
    fn drop(&mut self) {
        self.bytes.zeroize();
    }
}

impl Clone for Key {
    fn clone(&self) -> Key {
        Key::from_bytes(&self.bytes)
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key(<redacted {} bits>)", self.bytes.len() * 8)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HashAlg {
    Plain,
    Sha256,
    Sha512,
    Ripemd160,
}

/// A cryptsetup `--hash` value for plain mode: `sha256`, `sha512`, `ripemd160` or `plain`,
/// optionally with `:N` to hash only N bytes of the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassphraseHash {
    alg: HashAlg,
    len: Option<usize>,
}

impl PassphraseHash {
    /// cryptsetup's default for `--type plain` when no `--hash` is given.
    pub const CRYPTSETUP_PLAIN_DEFAULT: &'static str = "ripemd160";
}

impl FromStr for PassphraseHash {
    type Err = CryptoError;

    fn from_str(s: &str) -> Result<Self, CryptoError> {
        let (name, len) = match s.split_once(':') {
            Some((name, n)) => match n.parse::<usize>() {
                Ok(n) => (name, Some(n)),
                Err(_) => return Err(CryptoError::UnsupportedHash(s.to_string())),
            },
            None => (s, None),
        };
        let alg = match name {
            "plain" => HashAlg::Plain,
            "sha256" => HashAlg::Sha256,
            "sha512" => HashAlg::Sha512,
            "ripemd160" => HashAlg::Ripemd160,
            _ => return Err(CryptoError::UnsupportedHash(s.to_string())),
        };
        Ok(PassphraseHash { alg, len })
    }
}

impl fmt::Display for PassphraseHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.alg {
            HashAlg::Plain => "plain",
            HashAlg::Sha256 => "sha256",
            HashAlg::Sha512 => "sha512",
            HashAlg::Ripemd160 => "ripemd160",
        };
        match self.len {
            Some(n) => write!(f, "{name}:{n}"),
            None => write!(f, "{name}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_key_bytes() {
        let k = Key::from_bytes(&[0xAB; 32]);
        let s = format!("{k:?}");
        assert_eq!(s, "Key(<redacted 256 bits>)");
        assert!(!s.to_lowercase().contains("ab"));
    }

    #[test]
    fn hash_names() {
        for s in ["plain", "sha256", "sha512", "ripemd160", "sha256:16"] {
            assert_eq!(s.parse::<PassphraseHash>().unwrap().to_string(), s);
        }
        let e = "whirlpool"
            .parse::<PassphraseHash>()
            .unwrap_err()
            .to_string();
        assert!(e.contains("whirlpool"), "{e}");
    }

    #[test]
    fn plain_hash_copies_pads_and_plain_n_rejects_short() {
        let h: PassphraseHash = "plain".parse().unwrap();
        let k = Key::from_passphrase(h, b"0123456789abcdef-extra", 16).unwrap();
        assert_eq!(k.as_bytes(), b"0123456789abcdef");
        let k = Key::from_passphrase(h, b"short", 8).unwrap();
        assert_eq!(k.as_bytes(), b"short\0\0\0");
        let h16: PassphraseHash = "plain:16".parse().unwrap();
        assert!(Key::from_passphrase(h16, b"short", 16).is_err());
    }

    #[test]
    fn partial_hash_pads_with_zeros() {
        let h: PassphraseHash = "sha256:16".parse().unwrap();
        let k = Key::from_passphrase(h, b"pw", 32).unwrap();
        assert_eq!(&k.as_bytes()[..16], &Sha256::digest(b"pw")[..16]);
        assert_eq!(&k.as_bytes()[16..], &[0u8; 16]);
        assert!(Key::from_passphrase(h, b"pw", 8).is_err());
    }

    #[test]
    fn multi_round_hash_prefixes_a() {
        // ripemd160 gives 20 bytes a round: a 64-byte key takes 4 rounds.
        let h: PassphraseHash = "ripemd160".parse().unwrap();
        let k = Key::from_passphrase(h, b"secret", 64).unwrap();
        let mut expect = Vec::new();
        for prefix in ["", "A", "AA", "AAA"] {
            let mut d = Ripemd160::new();
            d.update(prefix.as_bytes());
            d.update(b"secret");
            expect.extend_from_slice(&d.finalize());
        }
        assert_eq!(k.as_bytes(), &expect[..64]);
    }
}
