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

use aes::cipher::consts::U16;
use aes::cipher::{Array, BlockCipherDecrypt, BlockCipherEncrypt, BlockSizeUser, KeyInit};
use aes::Block;

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
/// The most sectors a batch can hold (512-byte sectors).
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
        let batch_bytes = BATCH_BYTES.max(sector_size);
        let sectors_per_batch = batch_bytes / sector_size;
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
