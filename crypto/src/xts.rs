//! XTS (IEEE 1619) over whole sectors, built for batched AES.
//!
//! Per block j of a sector, XTS computes `C_j = E_K1(P_j ⊕ T_j) ⊕ T_j` with
//! `T_0 = E_K2(IV)` and `T_{j+1} = T_j · α` in GF(2¹²⁸). The only sequential part is the tweak
//! chain, which is a shift and a conditional XOR; the block encryptions are independent. So
//! instead of encrypting one block at a time (what the `xts-mode` crate does), a batch of sectors
//! is processed in three passes over data that stays in L1: XOR the tweaks in, encrypt the whole
//! batch with one `encrypt_blocks` call (which the `aes` crate runs 64 blocks at a time with
//! VAES/AVX-512, or 8 with AES-NI), XOR the tweaks out. The tweaks are recomputed in the third
//! pass rather than stored: that is cheaper than writing and reading them back.
//!
//! A batch is at least [`BATCH_BYTES`] so 512-byte sectors (32 blocks) still fill the wide
//! AES pipelines: a call with fewer blocks than the backend's parallel width falls back to one
//! block at a time.
//!
//! That three-pass form is the *portable* tier and the reference. [`XtsCipher`] picks, per
//! [`crate::xts_tier`], either it or a fused core (src/xts_x86/: the tweak XORs inside the AES
//! rounds, tweaks in vector registers), which is several times faster.

use aes::cipher::consts::U16;
use aes::cipher::{Array, BlockCipherDecrypt, BlockCipherEncrypt, BlockSizeUser, KeyInit};
use aes::{Aes128, Aes256, Block};

#[cfg(target_arch = "x86_64")]
use crate::xts_x86::{FusedXts, X86Tier};
use crate::{xts_tier, CryptoError, XtsTier};

/// What the modes need of a block cipher: AES-128/192/256 from the `aes` crate.
pub(crate) trait AesCipher:
    KeyInit + BlockCipherEncrypt + BlockCipherDecrypt + BlockSizeUser<BlockSize = U16>
{
}
impl<T> AesCipher for T where
    T: KeyInit + BlockCipherEncrypt + BlockCipherDecrypt + BlockSizeUser<BlockSize = U16>
{
}

/// Bytes processed per `encrypt_blocks` call: four 64-block VAES rounds.
pub(crate) const BATCH_BYTES: usize = 4096;
/// The most units a batch holds: 512-byte sectors fill a batch; smaller units (only through
/// [`XtsCipher`] with a unit below 512 bytes) make smaller batches.
const MAX_BATCH_SECTORS: usize = BATCH_BYTES / 512;

/// Multiplication by α (x) in GF(2¹²⁸) with XTS's little-endian convention.
#[inline(always)]
fn mul_alpha(t: u128) -> u128 {
    let carry = ((t as i128) >> 127) as u128; // all ones if the top bit is set
    (t << 1) ^ (carry & 0x87)
}

#[inline(always)]
fn xor_tweaks(blocks: &mut [Block], mut t: u128) {
    for b in blocks {
        let v = u128::from_le_bytes(b.0) ^ t;
        b.0 = v.to_le_bytes();
        t = mul_alpha(t);
    }
}

/// A pair of AES keys for XTS: `data` (K1) and `tweak` (K2).
pub(crate) struct Xts<C> {
    data: C,
    tweak: C,
}

impl<C: AesCipher> Xts<C> {
    /// `key` is K1‖K2; the caller has checked the length and that the halves differ.
    pub(crate) fn new(key: &[u8]) -> Self {
        let (k1, k2) = key.split_at(key.len() / 2);
        Xts {
            data: C::new_from_slice(k1).expect("key length checked by SectorCipher"),
            tweak: C::new_from_slice(k2).expect("key length checked by SectorCipher"),
        }
    }

    /// Encrypts (or decrypts) `data`, a whole number of `sector_size` sectors; `iv_of(k)` gives
    /// the IV of the k-th sector of `data`.
    #[inline]
    pub(crate) fn crypt(
        &self,
        data: &mut [u8],
        sector_size: usize,
        iv_of: impl Fn(usize) -> [u8; 16],
        encrypt: bool,
    ) {
        let sectors_per_batch = (BATCH_BYTES / sector_size).clamp(1, MAX_BATCH_SECTORS);
        let batch_bytes = sectors_per_batch * sector_size;
        let blocks_per_sector = sector_size / 16;
        let mut first_sector = 0usize;
        for batch in data.chunks_mut(batch_bytes) {
            let n = batch.len() / sector_size;
            debug_assert!(n <= MAX_BATCH_SECTORS && n <= sectors_per_batch);
            // T_0 of every sector in the batch, encrypted together.
            let mut t0 = [Block::default(); MAX_BATCH_SECTORS];
            for (k, t) in t0[..n].iter_mut().enumerate() {
                *t = Array(iv_of(first_sector + k));
            }
            self.tweak.encrypt_blocks(&mut t0[..n]);

            let (blocks, rest) = Block::slice_as_chunks_mut(batch);
            debug_assert!(rest.is_empty());
            for (k, sector) in blocks.chunks_mut(blocks_per_sector).enumerate() {
                xor_tweaks(sector, u128::from_le_bytes(t0[k].0));
            }
            if encrypt {
                self.data.encrypt_blocks(blocks);
            } else {
                self.data.decrypt_blocks(blocks);
            }
            for (k, sector) in blocks.chunks_mut(blocks_per_sector).enumerate() {
                xor_tweaks(sector, u128::from_le_bytes(t0[k].0));
            }
            first_sector += n;
        }
    }
}

/// AES-XTS (IEEE 1619) over runs of equal data units, on the fastest tier allowed: one call
/// takes a whole request (many sectors), encrypts the tweak of each unit once and derives the
/// rest of the unit's tweaks in registers.
///
/// AES-128-XTS or AES-256-XTS by key length (32 or 64 bytes, K1‖K2). `Send + Sync`, no
/// allocation after construction; round keys are zeroized on drop.
pub struct XtsCipher {
    engine: XtsEngine,
}

enum XtsEngine {
    Portable128(Box<Xts<Aes128>>),
    Portable256(Box<Xts<Aes256>>),
    #[cfg(target_arch = "x86_64")]
    Fused(FusedXts),
}

impl std::fmt::Debug for XtsCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XtsCipher")
            .field("tier", &self.tier())
            .finish_non_exhaustive()
    }
}

impl XtsCipher {
    /// A cipher on this process's tier ([`crate::xts_tier`]).
    pub fn new(key: &[u8]) -> Result<XtsCipher, CryptoError> {
        XtsCipher::with_tier(key, xts_tier())
    }

    /// A cipher on exactly `tier` (for tests and benchmarks of each tier); an error if the
    /// CPU cannot run it.
    pub fn with_tier(key: &[u8], tier: XtsTier) -> Result<XtsCipher, CryptoError> {
        if key.len() != 32 && key.len() != 64 {
            return Err(CryptoError::KeySize {
                spec: "aes-xts".into(),
                bits: key.len() * 8,
                allowed: "256 or 512",
            });
        }
        let (k1, k2) = key.split_at(key.len() / 2);
        if k1 == k2 {
            return Err(CryptoError::XtsEqualHalves);
        }
        if !tier.is_supported() {
            return Err(CryptoError::XtsTierUnsupported(tier));
        }
        let engine = match tier {
            XtsTier::Portable if key.len() == 32 => XtsEngine::Portable128(Box::new(Xts::new(key))),
            XtsTier::Portable => XtsEngine::Portable256(Box::new(Xts::new(key))),
            #[cfg(target_arch = "x86_64")]
            fused => XtsEngine::Fused(
                X86Tier::from_tier(fused)
                    .and_then(|t| FusedXts::new(key, t))
                    .ok_or(CryptoError::XtsTierUnsupported(tier))?,
            ),
            #[cfg(not(target_arch = "x86_64"))]
            _ => return Err(CryptoError::XtsTierUnsupported(tier)),
        };
        Ok(XtsCipher { engine })
    }

    /// The tier this cipher runs on.
    pub fn tier(&self) -> XtsTier {
        match &self.engine {
            XtsEngine::Portable128(_) | XtsEngine::Portable256(_) => XtsTier::Portable,
            #[cfg(target_arch = "x86_64")]
            XtsEngine::Fused(f) => f.tier().tier(),
        }
    }

    /// Encrypts `data` in place: `data.len() / unit_len` consecutive data units, unit k with
    /// the 16-byte IV (data unit sequence number, before encryption with K2) `iv_of(k)`.
    /// `unit_len` must be a non-zero multiple of 16 and `data` a whole number of units.
    pub fn encrypt(
        &self,
        data: &mut [u8],
        unit_len: usize,
        iv_of: impl Fn(usize) -> [u8; 16],
    ) -> Result<(), CryptoError> {
        self.crypt(data, unit_len, iv_of, true)
    }

    /// Decrypts `data` in place; same conventions as [`XtsCipher::encrypt`].
    pub fn decrypt(
        &self,
        data: &mut [u8],
        unit_len: usize,
        iv_of: impl Fn(usize) -> [u8; 16],
    ) -> Result<(), CryptoError> {
        self.crypt(data, unit_len, iv_of, false)
    }

    #[inline]
    pub(crate) fn crypt(
        &self,
        data: &mut [u8],
        unit_len: usize,
        iv_of: impl Fn(usize) -> [u8; 16],
        encrypt: bool,
    ) -> Result<(), CryptoError> {
        if unit_len == 0 || !unit_len.is_multiple_of(16) || !data.len().is_multiple_of(unit_len) {
            return Err(CryptoError::XtsLength {
                len: data.len(),
                unit_len,
            });
        }
        match &self.engine {
            XtsEngine::Portable128(x) => x.crypt(data, unit_len, iv_of, encrypt),
            XtsEngine::Portable256(x) => x.crypt(data, unit_len, iv_of, encrypt),
            #[cfg(target_arch = "x86_64")]
            XtsEngine::Fused(f) => f.crypt(data, unit_len, iv_of, encrypt),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mul_alpha_carries_into_0x87() {
        assert_eq!(mul_alpha(1), 2);
        assert_eq!(mul_alpha(1u128 << 127), 0x87);
        assert_eq!(mul_alpha((1u128 << 127) | 1), 0x87 ^ 2);
    }
}
