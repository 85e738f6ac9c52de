//! CBC-ESSIV (dm-crypt's `aes-cbc-essiv:sha256`) on the same tiers as XTS.
//!
//! Decryption is parallel by nature (`P_j = D(C_j) ⊕ C_{j−1}`), so it gets the wide path: each
//! group of blocks is loaded once, decrypted with several vectors in flight, and the XOR with
//! the previous ciphertext block is folded into `AESDECLAST`'s key operand; the previous blocks
//! come from the loaded registers by a lane shift (`VALIGNQ` / `VPERM2I128`), so in-place
//! decryption never reads a block it has already overwritten. Encryption is serial within a
//! sector (each block needs the previous ciphertext); it runs on AES-NI with the round keys in
//! registers and eight sectors interleaved, so eight chains are in flight.
//!
//! The ESSIV IVs (`E_salt(le64(sector))`, salt = SHA-256 of the key) are encrypted sixteen
//! sectors at a time with AES-NI.

use core::arch::x86_64::*;

use zeroize::{Zeroize, ZeroizeOnDrop};

use super::vaes256::{load256, store256};
use super::vaes512::{load512, store512};
use super::{aesni, load128, round_keys, store128, vaes256, vaes512, X86Tier, TWEAK_BATCH};

/// Sector chains encrypted side by side: AESENC's latency is several cycles and two can
/// issue per cycle, so eight independent chains keep the unit busy.
const CHAINS: usize = 8;

#[derive(Zeroize, ZeroizeOnDrop)]
#[repr(C, align(64))]
struct CbcKeys {
    enc: [[u8; 16]; 15],
    /// Equivalent-inverse-cipher schedule for `AESDEC`.
    dec: [[u8; 16]; 15],
    /// The ESSIV key (AES-256), for the IVs.
    essiv: [[u8; 16]; 15],
}

/// AES-CBC with ESSIV IVs, restarted at every sector, on one fused tier.
pub(crate) struct FusedCbc {
    keys: Box<CbcKeys>,
    /// 10, 12 or 14.
    rounds: usize,
    /// Checked against the CPU by [`FusedCbc::new`]: what every `unsafe` call below relies on.
    tier: X86Tier,
    /// AVX detected in `new` (every VAES tier has it): the xmm cores' AVX builds run.
    avx: bool,
}

impl FusedCbc {
    /// `key`: 16, 24 or 32 bytes; `salt`: the ESSIV key. `None` if the CPU lacks `tier`.
    pub(crate) fn new(key: &[u8], salt: &[u8; 32], tier: X86Tier) -> Option<FusedCbc> {
        if !tier.is_supported() || ![16, 24, 32].contains(&key.len()) {
            return None;
        }
        let mut keys = Box::new(CbcKeys {
            enc: [[0; 16]; 15],
            dec: [[0; 16]; 15],
            essiv: [[0; 16]; 15],
        });
        // SAFETY: `tier.is_supported()` was checked above and every tier includes AES-NI,
        // all that `aesni::expand` enables; it writes only into `keys`.
        let rounds = unsafe {
            aesni::expand(salt, &mut keys.essiv, None);
            aesni::expand(key, &mut keys.enc, Some(&mut keys.dec))
        };
        let avx = is_x86_feature_detected!("avx");
        Some(FusedCbc {
            keys,
            rounds,
            tier,
            avx,
        })
    }

    pub(crate) fn tier(&self) -> X86Tier {
        self.tier
    }

    /// Encrypts (or decrypts) whole `sector_size`-byte sectors (a multiple of 256 bytes: the
    /// widest group; dm-crypt sectors are 512–4096); sector k's IV before ESSIV is `iv_of(k)`.
    pub(crate) fn crypt(
        &self,
        data: &mut [u8],
        sector_size: usize,
        iv_of: impl Fn(usize) -> [u8; 16],
        encrypt: bool,
    ) {
        // Not a safety condition (the cores stay in bounds by construction), but a remainder
        // would be left unprocessed: refuse instead.
        assert!(sector_size > 0 && sector_size.is_multiple_of(256));
        assert!(data.len().is_multiple_of(sector_size));
        let k = &*self.keys;
        let mut ivs = [[0u8; 16]; TWEAK_BATCH];
        let mut first = 0usize;
        for batch in data.chunks_mut(sector_size * TWEAK_BATCH) {
            let n = batch.len() / sector_size;
            for (i, iv) in ivs[..n].iter_mut().enumerate() {
                *iv = iv_of(first + i);
            }
            // SAFETY (every call below): `self.tier` passed `is_supported()` in `new`, which
            // detects every feature the called function enables (AES-NI is in every tier; the
            // `_avx` builds run only when `new` detected AVX);
            // buffers are walked with `chunks_exact_mut` / `as_chunks_mut` only.
            unsafe {
                aesni::encrypt_tweaks(&k.essiv, 14, &mut ivs, n);
                match (encrypt, self.tier, self.rounds, self.avx) {
                    (true, _, 10, true) => encrypt_avx::<10>(&k.enc, batch, sector_size, &ivs),
                    (true, _, 12, true) => encrypt_avx::<12>(&k.enc, batch, sector_size, &ivs),
                    (true, _, _, true) => encrypt_avx::<14>(&k.enc, batch, sector_size, &ivs),
                    (true, _, 10, false) => encrypt_sse::<10>(&k.enc, batch, sector_size, &ivs),
                    (true, _, 12, false) => encrypt_sse::<12>(&k.enc, batch, sector_size, &ivs),
                    (true, _, _, false) => encrypt_sse::<14>(&k.enc, batch, sector_size, &ivs),
                    (false, X86Tier::AesNi, 10, true) => {
                        decrypt_xmm_avx::<10>(&k.dec, batch, sector_size, &ivs)
                    }
                    (false, X86Tier::AesNi, 12, true) => {
                        decrypt_xmm_avx::<12>(&k.dec, batch, sector_size, &ivs)
                    }
                    (false, X86Tier::AesNi, _, true) => {
                        decrypt_xmm_avx::<14>(&k.dec, batch, sector_size, &ivs)
                    }
                    (false, X86Tier::AesNi, 10, false) => {
                        decrypt_xmm_sse::<10>(&k.dec, batch, sector_size, &ivs)
                    }
                    (false, X86Tier::AesNi, 12, false) => {
                        decrypt_xmm_sse::<12>(&k.dec, batch, sector_size, &ivs)
                    }
                    (false, X86Tier::AesNi, _, false) => {
                        decrypt_xmm_sse::<14>(&k.dec, batch, sector_size, &ivs)
                    }
                    (false, X86Tier::VaesAvx2, 10, _) => {
                        decrypt_ymm::<10>(&k.dec, batch, sector_size, &ivs)
                    }
                    (false, X86Tier::VaesAvx2, 12, _) => {
                        decrypt_ymm::<12>(&k.dec, batch, sector_size, &ivs)
                    }
                    (false, X86Tier::VaesAvx2, _, _) => {
                        decrypt_ymm::<14>(&k.dec, batch, sector_size, &ivs)
                    }
                    (false, X86Tier::VaesAvx512, 10, _) => {
                        decrypt_zmm::<10>(&k.dec, batch, sector_size, &ivs)
                    }
                    (false, X86Tier::VaesAvx512, 12, _) => {
                        decrypt_zmm::<12>(&k.dec, batch, sector_size, &ivs)
                    }
                    (false, X86Tier::VaesAvx512, _, _) => {
                        decrypt_zmm::<14>(&k.dec, batch, sector_size, &ivs)
                    }
                }
            }
            first += n;
        }
        ivs.zeroize();
    }
}

/// [`encrypt_sectors`] built for SSE only. Requires AES-NI.
#[target_feature(enable = "aes")]
fn encrypt_sse<const NR: usize>(
    sched: &[[u8; 16]; 15],
    batch: &mut [u8],
    sector_size: usize,
    ivs: &[[u8; 16]; TWEAK_BATCH],
) {
    encrypt_sectors::<NR, false>(sched, batch, sector_size, ivs);
}

/// [`encrypt_sectors`] built with AVX (VEX three-operand forms). Requires AES-NI and AVX.
#[target_feature(enable = "aes,avx")]
fn encrypt_avx<const NR: usize>(
    sched: &[[u8; 16]; 15],
    batch: &mut [u8],
    sector_size: usize,
    ivs: &[[u8; 16]; TWEAK_BATCH],
) {
    encrypt_sectors::<NR, true>(sched, batch, sector_size, ivs);
}

/// CBC encryption of a batch of sectors, `CHAINS` sector chains interleaved (then one at a
/// time for the rest); inlined into its SSE and AVX builds (`BUILD` makes them two functions
/// with one caller each, which LLVM inlines: see `aesni::crypt_body`).
#[target_feature(enable = "aes")]
#[inline]
fn encrypt_sectors<const NR: usize, const BUILD: bool>(
    sched: &[[u8; 16]; 15],
    batch: &mut [u8],
    sector_size: usize,
    ivs: &[[u8; 16]; TWEAK_BATCH],
) {
    let rk = round_keys::<NR>(sched);
    let mut ivs = ivs.iter();
    let mut groups = batch.chunks_exact_mut(CHAINS * sector_size);
    for group in &mut groups {
        let mut sectors = group.chunks_exact_mut(sector_size);
        let mut chains: [&mut [[u8; 16]]; CHAINS] = core::array::from_fn(|_| {
            let s = sectors.next().expect("CHAINS sectors per group");
            s.as_chunks_mut::<16>().0
        });
        let mut prev = [_mm_setzero_si128(); CHAINS];
        for p in &mut prev {
            *p = load128(ivs.next().expect("one IV per sector"));
        }
        encrypt_chains::<NR, CHAINS>(&rk, &mut chains, prev);
    }
    for sector in groups.into_remainder().chunks_exact_mut(sector_size) {
        let iv = load128(ivs.next().expect("one IV per sector"));
        encrypt_chains::<NR, 1>(&rk, &mut [sector.as_chunks_mut::<16>().0], [iv]);
    }
}

/// `S` CBC chains of equal length, block j of every chain in flight together.
#[target_feature(enable = "aes")]
#[inline]
fn encrypt_chains<const NR: usize, const S: usize>(
    rk: &[__m128i; 15],
    chains: &mut [&mut [[u8; 16]]; S],
    mut prev: [__m128i; S],
) {
    let blocks = chains[0].len();
    // `j` walks all S chains in lockstep: an index is the plain way to say so.
    #[allow(clippy::needless_range_loop)]
    for j in 0..blocks {
        let mut x = [_mm_setzero_si128(); S];
        for s in 0..S {
            x[s] = _mm_xor_si128(load128(&chains[s][j]), _mm_xor_si128(prev[s], rk[0]));
        }
        for k in &rk[1..NR] {
            for xs in &mut x {
                *xs = _mm_aesenc_si128(*xs, *k);
            }
        }
        for s in 0..S {
            prev[s] = _mm_aesenclast_si128(x[s], rk[NR]);
            store128(&mut chains[s][j], prev[s]);
        }
    }
}

/// [`decrypt_xmm`] built for SSE only. Requires AES-NI.
#[target_feature(enable = "aes")]
fn decrypt_xmm_sse<const NR: usize>(
    sched: &[[u8; 16]; 15],
    batch: &mut [u8],
    sector_size: usize,
    ivs: &[[u8; 16]; TWEAK_BATCH],
) {
    decrypt_xmm::<NR, false>(sched, batch, sector_size, ivs);
}

/// [`decrypt_xmm`] built with AVX. Requires AES-NI and AVX.
#[target_feature(enable = "aes,avx")]
fn decrypt_xmm_avx<const NR: usize>(
    sched: &[[u8; 16]; 15],
    batch: &mut [u8],
    sector_size: usize,
    ivs: &[[u8; 16]; TWEAK_BATCH],
) {
    decrypt_xmm::<NR, true>(sched, batch, sector_size, ivs);
}

/// Wide CBC decryption, AES-NI: eight blocks in flight; inlined into its SSE and AVX builds
/// (one instance per `BUILD`).
#[target_feature(enable = "aes")]
#[inline]
fn decrypt_xmm<const NR: usize, const BUILD: bool>(
    sched: &[[u8; 16]; 15],
    batch: &mut [u8],
    sector_size: usize,
    ivs: &[[u8; 16]; TWEAK_BATCH],
) {
    let rk = round_keys::<NR>(sched);
    for (sector, iv) in batch.chunks_exact_mut(sector_size).zip(ivs) {
        let mut prev = load128(iv);
        let (blocks, _) = sector.as_chunks_mut::<16>();
        for g in blocks.chunks_exact_mut(8) {
            let mut c = [_mm_setzero_si128(); 8];
            let mut x = [_mm_setzero_si128(); 8];
            for i in 0..8 {
                c[i] = load128(&g[i]);
                x[i] = _mm_xor_si128(c[i], rk[0]);
            }
            for k in &rk[1..NR] {
                for xi in &mut x {
                    *xi = aesni::round::<false>(*xi, *k);
                }
            }
            for i in 0..8 {
                let p = if i == 0 { prev } else { c[i - 1] };
                store128(
                    &mut g[i],
                    aesni::last::<false>(x[i], _mm_xor_si128(rk[NR], p)),
                );
            }
            prev = c[7];
        }
    }
}

/// Wide CBC decryption, VAES + AVX2: eight ymm vectors (16 blocks) in flight.
#[target_feature(enable = "aes,vaes,avx2")]
fn decrypt_ymm<const NR: usize>(
    sched: &[[u8; 16]; 15],
    batch: &mut [u8],
    sector_size: usize,
    ivs: &[[u8; 16]; TWEAK_BATCH],
) {
    let rk1 = round_keys::<NR>(sched);
    let mut rk = [_mm256_setzero_si256(); 15];
    for i in 0..=NR {
        rk[i] = _mm256_broadcastsi128_si256(rk1[i]);
    }
    for (sector, iv) in batch.chunks_exact_mut(sector_size).zip(ivs) {
        // The block before the first: the IV, in the high lane (both lanes: broadcast).
        let mut prev = _mm256_broadcastsi128_si256(load128(iv));
        let (vecs, _) = sector.as_chunks_mut::<32>();
        for g in vecs.chunks_exact_mut(8) {
            let mut c = [_mm256_setzero_si256(); 8];
            let mut x = [_mm256_setzero_si256(); 8];
            for i in 0..8 {
                c[i] = load256(&g[i]);
                x[i] = _mm256_xor_si256(c[i], rk[0]);
            }
            for k in &rk[1..NR] {
                for xi in &mut x {
                    *xi = vaes256::round::<false>(*xi, *k);
                }
            }
            for i in 0..8 {
                let before = if i == 0 { prev } else { c[i - 1] };
                // (high lane of `before`, low lane of c[i]): the blocks preceding c[i]'s.
                let p = _mm256_permute2x128_si256::<0x21>(before, c[i]);
                store256(
                    &mut g[i],
                    vaes256::last::<false>(x[i], _mm256_xor_si256(rk[NR], p)),
                );
            }
            prev = c[7];
        }
    }
}

/// Wide CBC decryption, VAES + AVX-512: four zmm vectors (16 blocks) in flight.
#[target_feature(enable = "aes,vaes,avx512f")]
fn decrypt_zmm<const NR: usize>(
    sched: &[[u8; 16]; 15],
    batch: &mut [u8],
    sector_size: usize,
    ivs: &[[u8; 16]; TWEAK_BATCH],
) {
    let rk1 = round_keys::<NR>(sched);
    let mut rk = [_mm512_setzero_si512(); 15];
    for i in 0..=NR {
        rk[i] = _mm512_broadcast_i32x4(rk1[i]);
    }
    for (sector, iv) in batch.chunks_exact_mut(sector_size).zip(ivs) {
        // The block before the first: the IV, in the top lane (every lane: broadcast).
        let mut prev = _mm512_broadcast_i32x4(load128(iv));
        let (vecs, _) = sector.as_chunks_mut::<64>();
        for g in vecs.chunks_exact_mut(4) {
            let mut c = [_mm512_setzero_si512(); 4];
            let mut x = [_mm512_setzero_si512(); 4];
            for i in 0..4 {
                c[i] = load512(&g[i]);
                x[i] = _mm512_xor_si512(c[i], rk[0]);
            }
            for k in &rk[1..NR] {
                for xi in &mut x {
                    *xi = vaes512::round::<false>(*xi, *k);
                }
            }
            for i in 0..4 {
                let before = if i == 0 { prev } else { c[i - 1] };
                // (top lane of `before`, lanes 0–2 of c[i]): the blocks preceding c[i]'s.
                let p = _mm512_alignr_epi64::<6>(c[i], before);
                store512(
                    &mut g[i],
                    vaes512::last::<false>(x[i], _mm512_xor_si512(rk[NR], p)),
                );
            }
            prev = c[3];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CipherSpec, Key, SectorCipher, SectorLayout, XtsTier};

    /// The xmm cores' two builds (SSE only, and with AVX) give the portable tier's bytes; the
    /// integration tests reach only the build the CPU picks.
    #[test]
    fn sse_and_avx_builds_match_portable() {
        if !X86Tier::AesNi.is_supported() {
            return;
        }
        let spec: CipherSpec = "aes-cbc-essiv:sha256".parse().unwrap();
        for key_len in [16usize, 24, 32] {
            let key: Vec<u8> = (0..key_len).map(|i| (i * 53 + 9) as u8).collect();
            let salt: [u8; 32] = {
                use sha2::{Digest, Sha256};
                Sha256::digest(&key).into()
            };
            let iv_of = |k: usize| {
                let mut iv = [0u8; 16];
                iv[..8].copy_from_slice(&(k as u64 + 40).to_le_bytes());
                iv
            };
            for sectors in [1usize, 3, 7, 8, 9, 17] {
                let data: Vec<u8> = (0..512 * sectors).map(|i| (i * 7 + 1) as u8).collect();
                let mut want = data.clone();
                SectorCipher::with_xts_tier(
                    spec,
                    &Key::from_bytes(&key),
                    SectorLayout::default(),
                    XtsTier::Portable,
                )
                .unwrap()
                .encrypt(40, &mut want)
                .unwrap();
                for avx in [false, true] {
                    if avx && !is_x86_feature_detected!("avx") {
                        continue;
                    }
                    let mut c = FusedCbc::new(&key, &salt, X86Tier::AesNi).unwrap();
                    c.avx = avx;
                    let mut got = data.clone();
                    c.crypt(&mut got, 512, iv_of, true);
                    assert!(got == want, "avx {avx} key {key_len} sectors {sectors}");
                    c.crypt(&mut got, 512, iv_of, false);
                    assert!(got == data, "avx {avx} key {key_len} sectors {sectors}");
                }
            }
        }
    }
}
