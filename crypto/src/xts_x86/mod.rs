//! Fused AES-XTS on x86-64: AES-NI (xmm), VAES + AVX2 (ymm) and VAES + AVX-512 (zmm); and
//! CBC-ESSIV on the same tiers (cbc.rs).
//!
//! This module tree is the only place in the crate with `unsafe` (the crate root denies it
//! elsewhere). Why it exists: XTS done as separate passes (tweak XOR, batched AES, tweak XOR)
//! moves every block through memory three times; the `aes` crate's block API cannot do better.
//! Here each block is loaded once, XORed with its tweak and the first round key in one step,
//! run through the rounds with several vectors in flight to hide AESENC latency, and finished by
//! `AESENCLAST` with the last round key XORed with the tweak (`AESENCLAST` ends with an XOR of
//! its key operand, so that is the output tweak XOR for free), then stored. Tweaks stay in
//! registers: the tweaks of the next group of blocks are the current ones times x^k in
//! GF(2¹²⁸), a shift and a reduction (carry-less multiply by 0x87, or shifts without
//! VPCLMULQDQ), as the kernel's `aes-xts-avx10` and OpenSSL's `aesni-xts-avx512` do.
//!
//! Where the `unsafe` is, and what makes it sound:
//! - The tier entry points (`aesni::crypt`, `vaes256::crypt`, `vaes512::crypt`) and the key
//!   expansion are `#[target_feature]` functions: calling them is `unsafe` because the CPU must
//!   have the features. A [`FusedXts`] holds an [`X86Tier`] that [`FusedXts::new`] has checked
//!   with [`X86Tier::is_supported`] (run-time detection), and only calls that tier's functions.
//! - Vector loads and stores (`load128`/`store128` … `load512`/`store512`) take `&[u8; N]` /
//!   `&mut [u8; N]`, so the N bytes they touch are in bounds by type; they use the unaligned
//!   forms, so no alignment is assumed. The 256- and 512-bit ones are `#[target_feature]`
//!   functions themselves, so the compiler checks that their callers have the features.
//!   Everything else in the cores is safe Rust: intrinsics are safe to call inside functions
//!   that enable their features.

use core::arch::x86_64::*;

use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::XtsTier;

mod aesni;
mod cbc;
mod vaes256;
mod vaes512;

pub(crate) use cbc::FusedCbc;

/// Units whose tweaks are encrypted together before their data: eight AES-NI blocks in flight
/// twice, so short units (512-byte sectors) do not wait on one tweak encryption at a time.
const TWEAK_BATCH: usize = 16;

/// A fused tier: the three that [`XtsTier`] has beyond the portable one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum X86Tier {
    AesNi,
    VaesAvx2,
    VaesAvx512,
}

impl X86Tier {
    pub(crate) fn from_tier(t: XtsTier) -> Option<X86Tier> {
        match t {
            XtsTier::Portable => None,
            XtsTier::AesNi => Some(X86Tier::AesNi),
            XtsTier::VaesAvx2 => Some(X86Tier::VaesAvx2),
            XtsTier::VaesAvx512 => Some(X86Tier::VaesAvx512),
        }
    }

    pub(crate) fn tier(self) -> XtsTier {
        match self {
            X86Tier::AesNi => XtsTier::AesNi,
            X86Tier::VaesAvx2 => XtsTier::VaesAvx2,
            X86Tier::VaesAvx512 => XtsTier::VaesAvx512,
        }
    }

    /// Run-time detection of exactly the features each tier's functions enable (every tier
    /// also expands keys and encrypts tweaks with AES-NI). `is_x86_feature_detected!` checks
    /// the OS's XSAVE state for AVX and AVX-512 registers too, and caches its answer.
    pub(crate) fn is_supported(self) -> bool {
        let aesni = is_x86_feature_detected!("aes") && is_x86_feature_detected!("pclmulqdq");
        match self {
            X86Tier::AesNi => aesni,
            X86Tier::VaesAvx2 => {
                aesni && is_x86_feature_detected!("vaes") && is_x86_feature_detected!("avx2")
            }
            X86Tier::VaesAvx512 => {
                aesni
                    && is_x86_feature_detected!("vaes")
                    && is_x86_feature_detected!("vpclmulqdq")
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
            }
        }
    }
}

/// Expanded round keys of an XTS key pair, zeroized on drop. Kept as bytes (not vector types)
/// so that `Zeroize` applies; each core loads them into registers once per call.
#[derive(Zeroize, ZeroizeOnDrop)]
#[repr(C, align(64))]
pub(crate) struct RoundKeys {
    /// K1's encryption schedule: round keys 0..=rounds.
    pub(crate) data_enc: [[u8; 16]; 15],
    /// K1's decryption schedule for the equivalent inverse cipher (`AESDEC`): `data_enc`
    /// reversed, with `AESIMC` applied to the inner round keys.
    pub(crate) data_dec: [[u8; 16]; 15],
    /// K2's encryption schedule, for the tweaks.
    pub(crate) tweak_enc: [[u8; 16]; 15],
}

/// AES-XTS with a fused core of one tier. Holds round keys only, not the key.
pub(crate) struct FusedXts {
    keys: Box<RoundKeys>,
    /// 10 (AES-128) or 14 (AES-256).
    rounds: usize,
    /// Checked by [`FusedXts::new`] against the CPU: the invariant every `unsafe` call of the
    /// tier functions below relies on.
    tier: X86Tier,
    /// The `aesni` tier on a CPU with AVX (detected in `new`): `aesni::crypt_avx`.
    aesni_avx: bool,
}

impl FusedXts {
    /// `key` is K1‖K2, 32 or 64 bytes. Returns `None` when the CPU lacks `tier`'s features.
    pub(crate) fn new(key: &[u8], tier: X86Tier) -> Option<FusedXts> {
        if !tier.is_supported() || !(key.len() == 32 || key.len() == 64) {
            return None;
        }
        let mut keys = Box::new(RoundKeys {
            data_enc: [[0; 16]; 15],
            data_dec: [[0; 16]; 15],
            tweak_enc: [[0; 16]; 15],
        });
        let (k1, k2) = key.split_at(key.len() / 2);
        // SAFETY: `tier.is_supported()` was checked above, and every tier includes AES-NI
        // ("aes"), which is all `aesni::expand` enables. It writes only into `keys`.
        unsafe {
            aesni::expand(k1, &mut keys.data_enc, Some(&mut keys.data_dec));
            aesni::expand(k2, &mut keys.tweak_enc, None);
        }
        Some(FusedXts {
            keys,
            rounds: if key.len() == 32 { 10 } else { 14 },
            tier,
            aesni_avx: tier == X86Tier::AesNi && is_x86_feature_detected!("avx"),
        })
    }

    pub(crate) fn tier(&self) -> X86Tier {
        self.tier
    }

    /// Encrypts (or decrypts) `data` in place: consecutive `unit_len`-byte XTS data units,
    /// unit k with IV `iv_of(k)`. The caller has checked that `unit_len` is a non-zero
    /// multiple of 16 and that `data` is a whole number of units.
    #[inline]
    pub(crate) fn crypt(
        &self,
        data: &mut [u8],
        unit_len: usize,
        iv_of: impl Fn(usize) -> [u8; 16],
        encrypt: bool,
    ) {
        debug_assert!(unit_len > 0 && unit_len.is_multiple_of(16));
        debug_assert!(data.len().is_multiple_of(unit_len));
        let k = &*self.keys;
        let mut first = 0usize;
        let mut tweaks = [[0u8; 16]; TWEAK_BATCH];
        for batch in data.chunks_mut(unit_len * TWEAK_BATCH) {
            let n = batch.len() / unit_len;
            for (i, t) in tweaks[..n].iter_mut().enumerate() {
                *t = iv_of(first + i);
            }
            // SAFETY (every call below): `self.tier` passed `is_supported()` in `new`, which
            // detects every feature the called function enables (and `aesni::crypt_avx` is
            // called only when `new` also detected AVX); slices are passed whole and the cores
            // index them only through `as_chunks` / `chunks_exact`.
            unsafe {
                aesni::encrypt_tweaks(&k.tweak_enc, self.rounds, &mut tweaks, n);
                match (self.tier, self.rounds, encrypt) {
                    (X86Tier::AesNi, 10, true) if self.aesni_avx => {
                        aesni::crypt_avx::<10, true>(k, batch, unit_len, &tweaks)
                    }
                    (X86Tier::AesNi, 10, true) => {
                        aesni::crypt::<10, true>(k, batch, unit_len, &tweaks)
                    }
                    (X86Tier::AesNi, 10, false) if self.aesni_avx => {
                        aesni::crypt_avx::<10, false>(k, batch, unit_len, &tweaks)
                    }
                    (X86Tier::AesNi, 10, false) => {
                        aesni::crypt::<10, false>(k, batch, unit_len, &tweaks)
                    }
                    (X86Tier::AesNi, _, true) if self.aesni_avx => {
                        aesni::crypt_avx::<14, true>(k, batch, unit_len, &tweaks)
                    }
                    (X86Tier::AesNi, _, true) => {
                        aesni::crypt::<14, true>(k, batch, unit_len, &tweaks)
                    }
                    (X86Tier::AesNi, _, false) if self.aesni_avx => {
                        aesni::crypt_avx::<14, false>(k, batch, unit_len, &tweaks)
                    }
                    (X86Tier::AesNi, _, false) => {
                        aesni::crypt::<14, false>(k, batch, unit_len, &tweaks)
                    }
                    (X86Tier::VaesAvx2, 10, true) => {
                        vaes256::crypt::<10, true>(k, batch, unit_len, &tweaks)
                    }
                    (X86Tier::VaesAvx2, 10, false) => {
                        vaes256::crypt::<10, false>(k, batch, unit_len, &tweaks)
                    }
                    (X86Tier::VaesAvx2, _, true) => {
                        vaes256::crypt::<14, true>(k, batch, unit_len, &tweaks)
                    }
                    (X86Tier::VaesAvx2, _, false) => {
                        vaes256::crypt::<14, false>(k, batch, unit_len, &tweaks)
                    }
                    (X86Tier::VaesAvx512, 10, true) => {
                        vaes512::crypt::<10, true>(k, batch, unit_len, &tweaks)
                    }
                    (X86Tier::VaesAvx512, 10, false) => {
                        vaes512::crypt::<10, false>(k, batch, unit_len, &tweaks)
                    }
                    (X86Tier::VaesAvx512, _, true) => {
                        vaes512::crypt::<14, true>(k, batch, unit_len, &tweaks)
                    }
                    (X86Tier::VaesAvx512, _, false) => {
                        vaes512::crypt::<14, false>(k, batch, unit_len, &tweaks)
                    }
                }
            }
            first += n;
        }
        // Encrypted tweaks are what XTS keeps from the attacker (with them, a block's
        // plaintext and ciphertext give E_K1 pairs): do not leave them on the stack.
        tweaks.zeroize();
    }
}

/// Loads 16 bytes. Safe wrapper: the reference guarantees 16 readable bytes; `loadu` allows
/// any alignment; SSE2 is part of every x86-64 CPU, so no feature check is needed.
#[inline(always)]
fn load128(b: &[u8; 16]) -> __m128i {
    // SAFETY: `b` points to 16 readable bytes (by type); SSE2 is part of x86-64; unaligned load.
    unsafe { _mm_loadu_si128(b.as_ptr().cast()) }
}

#[inline(always)]
fn store128(b: &mut [u8; 16], v: __m128i) {
    // SAFETY: `b` points to 16 writable bytes (by type); SSE2 is part of x86-64; unaligned.
    unsafe { _mm_storeu_si128(b.as_mut_ptr().cast(), v) }
}

/// Loads an expanded schedule into registers (round keys 0..=NR).
#[target_feature(enable = "sse2")]
#[inline]
fn round_keys<const NR: usize>(s: &[[u8; 16]; 15]) -> [__m128i; 15] {
    let mut rk = [_mm_setzero_si128(); 15];
    for i in 0..=NR {
        rk[i] = load128(&s[i]);
    }
    rk
}

#[cfg(test)]
mod tests {
    use super::*;
    use aes::cipher::{Array, BlockCipherDecrypt, BlockCipherEncrypt, KeyInit};

    /// The `aesni` tier's two builds (SSE only, and with AVX) give the portable tier's bytes;
    /// the integration tests reach only the build the CPU picks.
    #[test]
    fn aesni_with_and_without_avx_match_portable() {
        if !X86Tier::AesNi.is_supported() {
            return;
        }
        let mut seed = 0x1234_5678_9abc_def0u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for key_len in [32usize, 64] {
            for unit_len in [16usize, 48, 128, 144, 512, 4096] {
                let key: Vec<u8> = (0..key_len).map(|_| next() as u8).collect();
                let data: Vec<u8> = (0..unit_len * 5).map(|_| next() as u8).collect();
                let iv_of = |k: usize| {
                    let mut iv = [0u8; 16];
                    iv[..8].copy_from_slice(&(k as u64 * 977).to_le_bytes());
                    iv
                };
                let mut want = data.clone();
                crate::XtsCipher::with_tier(&key, XtsTier::Portable)
                    .unwrap()
                    .encrypt(&mut want, unit_len, iv_of)
                    .unwrap();
                for avx in [false, true] {
                    if avx && !is_x86_feature_detected!("avx") {
                        continue;
                    }
                    let mut x = FusedXts::new(&key, X86Tier::AesNi).unwrap();
                    x.aesni_avx = avx;
                    let mut got = data.clone();
                    x.crypt(&mut got, unit_len, iv_of, true);
                    assert!(got == want, "avx {avx} key {key_len} unit {unit_len}");
                    x.crypt(&mut got, unit_len, iv_of, false);
                    assert!(got == data, "avx {avx} key {key_len} unit {unit_len}");
                }
            }
        }
    }

    /// The AES-NI key schedule encrypts and decrypts single blocks exactly as the `aes` crate.
    #[test]
    fn key_expansion_matches_aes_crate() {
        if !X86Tier::AesNi.is_supported() {
            return;
        }
        for len in [32usize, 64] {
            let key: Vec<u8> = (0..len).map(|i| (i * 29 + 5) as u8).collect();
            let x = FusedXts::new(&key, X86Tier::AesNi).unwrap();
            let block: [u8; 16] = core::array::from_fn(|i| (i * 13 + 1) as u8);
            let mut got = [[0u8; 16]; TWEAK_BATCH];
            got[0] = block;
            // SAFETY: AES-NI support was checked above.
            unsafe { aesni::encrypt_tweaks(&x.keys.tweak_enc, x.rounds, &mut got, 1) };
            let mut want: Array<u8, aes::cipher::consts::U16> = Array(block);
            let k2 = &key[len / 2..];
            if len == 32 {
                aes::Aes128::new_from_slice(k2)
                    .unwrap()
                    .encrypt_block(&mut want);
            } else {
                aes::Aes256::new_from_slice(k2)
                    .unwrap()
                    .encrypt_block(&mut want);
            }
            assert_eq!(got[0], want.0, "{len}");
            // The decryption schedule: one XTS block decrypted with tweak E(0) against `aes`.
            let mut unit = [0x5au8; 16];
            let mut reference: Array<u8, aes::cipher::consts::U16> = Array(unit);
            let k1 = &key[..len / 2];
            let mut t: Array<u8, aes::cipher::consts::U16> = Array([0u8; 16]);
            if len == 32 {
                aes::Aes128::new_from_slice(k2)
                    .unwrap()
                    .encrypt_block(&mut t);
            } else {
                aes::Aes256::new_from_slice(k2)
                    .unwrap()
                    .encrypt_block(&mut t);
            }
            for (r, tb) in reference.0.iter_mut().zip(t.0) {
                *r ^= tb;
            }
            if len == 32 {
                aes::Aes128::new_from_slice(k1)
                    .unwrap()
                    .decrypt_block(&mut reference);
            } else {
                aes::Aes256::new_from_slice(k1)
                    .unwrap()
                    .decrypt_block(&mut reference);
            }
            for (r, tb) in reference.0.iter_mut().zip(t.0) {
                *r ^= tb;
            }
            x.crypt(&mut unit, 16, |_| [0u8; 16], false);
            assert_eq!(unit, reference.0, "{len}");
        }
    }
}
