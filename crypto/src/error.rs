use std::fmt;

/// Everything that can go wrong when building or using a [`crate::SectorCipher`].
///
/// Messages are one line, meant to be shown to an administrator as they are, and never contain
/// key material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CryptoError {
    /// The cipher spec is not of dm-crypt's `cipher-chainmode-ivmode[:ivopts]` form, or names
    /// something this crate does not implement.
    UnsupportedSpec { spec: String, reason: String },
    /// The key length does not fit the cipher (given in bits, as cryptsetup's `--key-size`).
    KeySize {
        spec: String,
        bits: usize,
        allowed: &'static str,
    },
    /// XTS with both halves of the key equal: the tweak would be computed with the data key,
    /// which voids XTS's security argument (IEEE 1619, FIPS 140 IG A.9).
    XtsEqualHalves,
    /// Sector size other than 512, 1024, 2048 or 4096.
    SectorSize(u32),
    /// `iv_large_sectors` with an IV offset that is not a whole number of sectors.
    IvOffsetAlignment { iv_offset: u64, sector_size: u32 },
    /// A buffer or start sector not aligned to the cipher's sector size.
    Misaligned {
        sector: u64,
        len: usize,
        sector_size: u32,
    },
    /// Unknown passphrase hash for plain-mode key derivation.
    UnsupportedHash(String),
    /// Plain-mode key derivation could not produce a key (e.g. `--hash plain` with a passphrase
    /// shorter than the key).
    Passphrase(String),
    /// XTS data that is not a whole number of data units, or a unit length that is not a
    /// non-zero multiple of 16 bytes (no ciphertext stealing: sectors never need it).
    XtsLength { len: usize, unit_len: usize },
    /// An XTS tier name that does not exist (`UBLK_CRYPT_XTS_TIER`).
    XtsTier(String),
    /// An XTS tier this CPU cannot run.
    XtsTierUnsupported(crate::XtsTier),
}

impl fmt::Display for CryptoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CryptoError::UnsupportedSpec { spec, reason } => {
                write!(f, "unsupported cipher spec '{spec}': {reason}")
            }
            CryptoError::KeySize { spec, bits, allowed } => {
                write!(f, "key size {bits} bits does not fit cipher '{spec}' (allowed: {allowed})")
            }
            CryptoError::XtsEqualHalves => write!(
                f,
                "XTS key rejected: its two halves (data key and tweak key) are identical"
            ),
            CryptoError::SectorSize(s) => {
                write!(f, "sector size {s} is not supported (use 512, 1024, 2048 or 4096)")
            }
            CryptoError::IvOffsetAlignment { iv_offset, sector_size } => write!(
                f,
                "IV offset {iv_offset} (512-byte sectors) is not a multiple of the {sector_size}-byte sector size, as iv_large_sectors requires"
            ),
            CryptoError::Misaligned { sector, len, sector_size } => write!(
                f,
                "IO at sector {sector} of {len} bytes is not aligned to the {sector_size}-byte sector size"
            ),
            CryptoError::UnsupportedHash(h) => write!(
                f,
                "unsupported passphrase hash '{h}' (supported: sha256, sha512, ripemd160, plain)"
            ),
            CryptoError::Passphrase(why) => write!(f, "cannot derive key from passphrase: {why}"),
            CryptoError::XtsLength { len, unit_len } => write!(
                f,
                "XTS data of {len} bytes is not a whole number of {unit_len}-byte units, or the unit is not a non-zero multiple of 16 bytes (ciphertext stealing is not supported)"
            ),
            CryptoError::XtsTier(name) => write!(
                f,
                "unknown XTS tier '{name}' (known: portable, aesni, vaes-avx2, vaes-avx512)"
            ),
            CryptoError::XtsTierUnsupported(t) => {
                write!(f, "XTS tier '{t}' needs CPU features this machine lacks")
            }
        }
    }
}

impl std::error::Error for CryptoError {}
