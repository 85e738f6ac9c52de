//! CBC with ESSIV, restarted at every sector: dm-crypt's `aes-cbc-essiv:sha256`.
//!
//! ESSIV (encrypted salt-sector IV) makes CBC's IVs unpredictable: the IV of a sector is its
//! little-endian 64-bit number encrypted with AES keyed by SHA-256 of the volume key.
//! Encryption is inherently sequential (each block depends on the previous ciphertext);
//! decryption is not, so it decrypts a whole batch with one `decrypt_blocks` call and XORs the
//! previous ciphertext blocks afterwards from a copy.

use aes::cipher::{Array, BlockCipherEncrypt, KeyInit};
use aes::{Aes256, Block};
use sha2::{Digest, Sha256};
use zeroize::Zeroize;

use crate::xts::{AesCipher, BATCH_BYTES};

pub(crate) struct CbcEssiv<C> {
    data: C,
    essiv: Aes256,
}

impl<C: AesCipher> CbcEssiv<C> {
    pub(crate) fn new(key: &[u8]) -> Self {
        let mut salt = Sha256::digest(key);
        let essiv = Aes256::new(&salt);
        salt.as_mut_slice().zeroize();
        CbcEssiv {
            data: C::new_from_slice(key).expect("key length checked by SectorCipher"),
            essiv,
        }
    }

    /// The ESSIV IV: `E_salt(le64(sector) ‖ 0⁸)`.
    #[inline]
    pub(crate) fn iv(&self, plain64: [u8; 16]) -> [u8; 16] {
        let mut b = Array(plain64);
        self.essiv.encrypt_block(&mut b);
        b.0
    }

    pub(crate) fn encrypt(
        &self,
        data: &mut [u8],
        sector_size: usize,
        iv_of: impl Fn(usize) -> [u8; 16],
    ) {
        for (k, sector) in data.chunks_mut(sector_size).enumerate() {
            let mut prev = u128::from_le_bytes(self.iv(iv_of(k)));
            let (blocks, _) = Block::slice_as_chunks_mut(sector);
            for b in blocks {
                b.0 = (u128::from_le_bytes(b.0) ^ prev).to_le_bytes();
                self.data.encrypt_block(b);
                prev = u128::from_le_bytes(b.0);
            }
        }
    }

    pub(crate) fn decrypt(
        &self,
        data: &mut [u8],
        sector_size: usize,
        iv_of: impl Fn(usize) -> [u8; 16],
    ) {
        let batch_bytes = BATCH_BYTES.max(sector_size);
        let mut saved = [0u8; BATCH_BYTES];
        let mut first_sector = 0usize;
        for batch in data.chunks_mut(batch_bytes) {
            // Sectors above BATCH_BYTES cannot occur: sector sizes are at most 4096.
            let len = batch.len();
            saved[..len].copy_from_slice(batch);
            let (blocks, _) = Block::slice_as_chunks_mut(batch);
            self.data.decrypt_blocks(blocks);
            let (cipher_blocks, _) = Block::slice_as_chunks(&saved[..len]);
            let per_sector = sector_size / 16;
            for (k, (sector, cts)) in blocks
                .chunks_mut(per_sector)
                .zip(cipher_blocks.chunks(per_sector))
                .enumerate()
            {
                let mut prev = u128::from_le_bytes(self.iv(iv_of(first_sector + k)));
                for (b, c) in sector.iter_mut().zip(cts) {
                    b.0 = (u128::from_le_bytes(b.0) ^ prev).to_le_bytes();
                    prev = u128::from_le_bytes(c.0);
                }
            }
            first_sector += len / sector_size;
        }
    }
}
