//! dm-crypt compatible sector ciphers for ublk-crypt.
//!
//! This crate answers one question: given a dm-crypt cipher spec (`aes-xts-plain64`, …), a key and
//! a sector layout, what bytes does dm-crypt put on the disk for a given plaintext sector, and
//! back? It does no IO and holds no global state (but the XTS tier, fixed at first use), so
//! every property can be tested in isolation: known-answer vectors (IEEE 1619), comparison with
//! OpenSSL, and golden output of real dm-crypt.
//!
//! The pieces:
//! - [`CipherSpec`] parses and validates the spec string exactly as far as dm-crypt's syntax goes,
//!   and rejects anything unsupported with an error that names it.
//! - [`Key`] keeps key bytes in memory that is zeroed on drop and never shown by `Debug`;
//!   [`Key::from_passphrase`] is cryptsetup's plain-mode passphrase hashing, byte for byte.
//! - [`SectorCipher`] encrypts or decrypts whole sectors in place. Its XTS path is
//!   [`XtsCipher`]: a whole request per call, on the fastest [`XtsTier`] the CPU has (fused
//!   AES-NI / VAES cores that keep tweaks in registers and XOR them inside the AES rounds, several
//!   times the `aes` crate's block API), or the portable path, which stays as the reference.
//!
//! The XTS cores that use `core::arch` intrinsics live in one module, `xts_x86`, the only place
//! `unsafe` is allowed (see crypto/README.md); they are chosen at run time ([`xts_tier`]).
//!
//! Nothing here allocates after construction, so the daemon may call [`SectorCipher::encrypt`] and
//! [`SectorCipher::decrypt`] on its IO path.

#![deny(unsafe_code)]

mod backend;
mod cbc;
mod error;
mod key;
mod sector;
mod spec;
mod tier;
mod xts;
// The one module with `unsafe`: fused AES-XTS on AES-NI / VAES, behind run-time detection.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod xts_x86;

pub use backend::{aes_backend, AesBackend};
pub use error::CryptoError;
pub use key::{Key, PassphraseHash};
pub use sector::{SectorCipher, SectorLayout, SECTOR_SHIFT};
pub use spec::{ChainMode, CipherSpec, IvMode};
pub use tier::{xts_tier, xts_tier_env_error, XtsTier, XTS_TIER_ENV};
pub use xts::XtsCipher;
