//! dm-crypt cipher specs: `cipher-chainmode-ivmode[:ivopts]`.

use std::fmt;
use std::str::FromStr;

use crate::CryptoError;

/// The block chaining mode of a spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainMode {
    /// XTS (IEEE 1619): the key is K1‖K2, K1 encrypts data, K2 encrypts the IV into the tweak.
    Xts,
    /// CBC, restarted at every sector with the sector's IV.
    Cbc,
}

/// How the per-sector IV is derived from the sector number (dm-crypt's `ivmode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IvMode {
    /// `plain`: the low 32 bits of the sector number, little endian, zero padded.
    /// Wraps above 2 TiB; kept for compatibility with old volumes.
    Plain,
    /// `plain64`: the 64-bit sector number, little endian, zero padded.
    Plain64,
    /// `plain64be`: the 64-bit sector number, big endian, in the *last* 8 bytes of the IV.
    Plain64Be,
    /// `essiv:sha256`: the plain64 IV encrypted with AES keyed by SHA-256 of the whole key.
    EssivSha256,
}

/// A parsed and validated dm-crypt cipher spec.
///
/// Only AES is implemented; the supported specs are those cryptsetup users meet in practice:
/// `aes-xts-plain64` (the modern default), `aes-xts-plain`, `aes-xts-plain64be` and
/// `aes-cbc-essiv:sha256` (the default of older cryptsetup plain mode and of crypttab).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CipherSpec {
    chain: ChainMode,
    iv: IvMode,
}

impl CipherSpec {
    /// The spec dm-crypt and LUKS2 use by default today.
    pub const DEFAULT: &'static str = "aes-xts-plain64";
    /// Every spec string this crate accepts.
    pub const SUPPORTED: [&'static str; 4] = [
        "aes-xts-plain64",
        "aes-xts-plain",
        "aes-xts-plain64be",
        "aes-cbc-essiv:sha256",
    ];

    pub fn chain(&self) -> ChainMode {
        self.chain
    }

    pub fn iv(&self) -> IvMode {
        self.iv
    }

    /// Key sizes in bits that this spec accepts, as shown in errors and `--help`.
    pub fn allowed_key_bits(&self) -> &'static [usize] {
        match self.chain {
            // AES-128-XTS and AES-256-XTS (K1‖K2).
            ChainMode::Xts => &[256, 512],
            ChainMode::Cbc => &[128, 192, 256],
        }
    }

    /// Checks a key length (in bytes) against the spec.
    pub fn check_key_len(&self, len: usize) -> Result<(), CryptoError> {
        if self.allowed_key_bits().contains(&(len * 8)) {
            Ok(())
        } else {
            Err(CryptoError::KeySize {
                spec: self.to_string(),
                bits: len * 8,
                allowed: match self.chain {
                    ChainMode::Xts => "256 or 512",
                    ChainMode::Cbc => "128, 192 or 256",
                },
            })
        }
    }
}

impl fmt::Display for CipherSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let chain = match self.chain {
            ChainMode::Xts => "xts",
            ChainMode::Cbc => "cbc",
        };
        let iv = match self.iv {
            IvMode::Plain => "plain",
            IvMode::Plain64 => "plain64",
            IvMode::Plain64Be => "plain64be",
            IvMode::EssivSha256 => "essiv:sha256",
        };
        write!(f, "aes-{chain}-{iv}")
    }
}

impl FromStr for CipherSpec {
    type Err = CryptoError;

    fn from_str(spec: &str) -> Result<Self, CryptoError> {
        let unsupported = |reason: String| CryptoError::UnsupportedSpec {
            spec: spec.to_string(),
            reason,
        };
        if spec.starts_with("capi:") {
            return Err(unsupported(
                "kernel crypto API (capi:) notation is not supported".into(),
            ));
        }
        let mut parts = spec.splitn(3, '-');
        let (cipher, chain, iv) = match (parts.next(), parts.next(), parts.next()) {
            (Some(c), Some(m), Some(i)) if !c.is_empty() && !m.is_empty() && !i.is_empty() => {
                (c, m, i)
            }
            _ => {
                return Err(unsupported(
                    "expected cipher-chainmode-ivmode, e.g. aes-xts-plain64".into(),
                ))
            }
        };
        if cipher != "aes" {
            return Err(unsupported(format!(
                "cipher '{cipher}' is not supported (only aes)"
            )));
        }
        let chain = match chain {
            "xts" => ChainMode::Xts,
            "cbc" => ChainMode::Cbc,
            other => {
                return Err(unsupported(format!(
                    "chain mode '{other}' is not supported (xts or cbc)"
                )))
            }
        };
        let iv = match (chain, iv) {
            (ChainMode::Xts, "plain") => IvMode::Plain,
            (ChainMode::Xts, "plain64") => IvMode::Plain64,
            (ChainMode::Xts, "plain64be") => IvMode::Plain64Be,
            (ChainMode::Cbc, "essiv:sha256") => IvMode::EssivSha256,
            (ChainMode::Cbc, "essiv") => {
                return Err(unsupported("essiv needs a hash: essiv:sha256".into()))
            }
            (ChainMode::Cbc, other) if other.starts_with("essiv:") => {
                return Err(unsupported(format!(
                    "ESSIV hash '{}' is not supported (only sha256)",
                    &other[6..]
                )))
            }
            (_, other) => {
                return Err(unsupported(format!(
                    "IV mode '{other}' is not supported with {} (supported specs: {})",
                    match chain {
                        ChainMode::Xts => "xts",
                        ChainMode::Cbc => "cbc",
                    },
                    Self::SUPPORTED.join(", ")
                )))
            }
        };
        Ok(CipherSpec { chain, iv })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn supported_specs_round_trip() {
        for s in CipherSpec::SUPPORTED {
            let spec: CipherSpec = s.parse().unwrap();
            assert_eq!(spec.to_string(), s);
        }
    }

    #[test]
    fn rejects_with_a_reason_naming_the_part() {
        let cases = [
            ("twofish-xts-plain64", "twofish"),
            ("aes-ecb-plain64", "ecb"),
            ("aes-xts-benbi", "benbi"),
            ("aes-cbc-essiv:sha1", "sha1"),
            ("aes-cbc-plain64", "plain64"),
            ("aes-xts", "cipher-chainmode-ivmode"),
            ("capi:xts(aes)-plain64", "capi"),
            ("", "cipher-chainmode-ivmode"),
        ];
        for (spec, needle) in cases {
            let err = spec.parse::<CipherSpec>().unwrap_err().to_string();
            assert!(err.contains(needle), "{spec}: {err}");
            assert!(!err.contains('\n'));
        }
    }

    #[test]
    fn key_sizes() {
        let xts: CipherSpec = "aes-xts-plain64".parse().unwrap();
        assert!(xts.check_key_len(32).is_ok());
        assert!(xts.check_key_len(64).is_ok());
        assert!(xts.check_key_len(48).is_err());
        let cbc: CipherSpec = "aes-cbc-essiv:sha256".parse().unwrap();
        assert!(cbc.check_key_len(16).is_ok());
        assert!(cbc.check_key_len(32).is_ok());
        let e = cbc.check_key_len(64).unwrap_err().to_string();
        assert!(
            e.contains("512 bits") && e.contains("128, 192 or 256"),
            "{e}"
        );
    }
}
