//! The VAES + AVX2 tier: 256-bit registers (two blocks per instruction), eight vectors
//! (sixteen blocks) in flight. For Zen 3, Alder Lake and qemu's `-cpu max`, which have VAES
//! and AVX2 but not AVX-512 — and the last not VPCLMULQDQ either, so the tweak arithmetic here
//! uses shifts only.

use core::arch::x86_64::*;

use super::aesni::crypt_block;
use super::{load128, round_keys, RoundKeys, TWEAK_BATCH};

/// Vectors in flight: 16 blocks, so a 512-byte sector is two iterations.
const VECS: usize = 8;

/// Loads 32 bytes. A `#[target_feature]` function, so only code that has AVX enabled can
/// call it without `unsafe`.
#[target_feature(enable = "avx")]
#[inline]
pub(super) fn load256(b: &[u8; 32]) -> __m256i {
    // SAFETY: `b` points to 32 readable bytes (by type); the unaligned load assumes no
    // alignment; AVX is enabled by this function's own attribute.
    unsafe { _mm256_loadu_si256(b.as_ptr().cast()) }
}

#[target_feature(enable = "avx")]
#[inline]
pub(super) fn store256(b: &mut [u8; 32], v: __m256i) {
    // SAFETY: `b` points to 32 writable bytes (by type); unaligned store; AVX enabled above.
    unsafe { _mm256_storeu_si256(b.as_mut_ptr().cast(), v) }
}

/// Finishes `v · x^k` per 128-bit lane from `shifted` (each 64-bit half shifted left by k)
/// and `carry` (each half's top k bits, shifted down), for k ≤ 16: the low half's carry moves
/// into the high half; the high half's carry c folds into the low half as c·0x87 =
/// c ⊕ c≪1 ⊕ c≪2 ⊕ c≪7 (carry-less, without VPCLMULQDQ).
#[target_feature(enable = "avx2")]
#[inline]
fn fold(shifted: __m256i, carry: __m256i) -> __m256i {
    let swapped = _mm256_shuffle_epi32::<0x4e>(carry);
    let high_carry = _mm256_and_si256(swapped, _mm256_set_epi64x(0, -1, 0, -1));
    let times_87 = _mm256_xor_si256(
        _mm256_xor_si256(
            _mm256_slli_epi64::<1>(high_carry),
            _mm256_slli_epi64::<2>(high_carry),
        ),
        _mm256_slli_epi64::<7>(high_carry),
    );
    _mm256_xor_si256(_mm256_xor_si256(shifted, swapped), times_87)
}

/// Lane-wise `v · x^k`, k given per 64-bit element (both halves of a lane equal), k ≤ 16.
#[target_feature(enable = "avx2")]
#[inline]
fn mul_x_var(v: __m256i, k: __m256i) -> __m256i {
    let r = _mm256_sub_epi64(_mm256_set1_epi64x(64), k);
    fold(_mm256_sllv_epi64(v, k), _mm256_srlv_epi64(v, r))
}

/// `v · x^16`, the step from one group of sixteen blocks to the next: each 128-bit lane
/// shifted left by two whole bytes, and the 16 bits shifted out, c, folded back as c·0x87 =
/// c ⊕ c≪1 ⊕ c≪2 ⊕ c≪7 (c sits alone in the low half after the byte shift right, so 64-bit
/// shifts do not spill into the high half).
#[target_feature(enable = "avx2")]
#[inline]
fn mul_x16(v: __m256i) -> __m256i {
    let c = _mm256_bsrli_epi128::<14>(v);
    let times_87 = _mm256_xor_si256(
        _mm256_xor_si256(c, _mm256_slli_epi64::<1>(c)),
        _mm256_xor_si256(_mm256_slli_epi64::<2>(c), _mm256_slli_epi64::<7>(c)),
    );
    _mm256_xor_si256(_mm256_bslli_epi128::<2>(v), times_87)
}

/// Encrypts (`ENC`) or decrypts a batch of units; unit k's first tweak is `tweaks[k]`.
///
/// Calling it requires AES-NI, VAES and AVX2.
#[target_feature(enable = "aes,vaes,avx2")]
pub(super) fn crypt<const NR: usize, const ENC: bool>(
    keys: &RoundKeys,
    batch: &mut [u8],
    unit_len: usize,
    tweaks: &[[u8; 16]; TWEAK_BATCH],
) {
    let rk = round_keys::<NR>(if ENC { &keys.data_enc } else { &keys.data_dec });
    let mut rk2 = [_mm256_setzero_si256(); 15];
    for i in 0..=NR {
        rk2[i] = _mm256_broadcastsi128_si256(rk[i]);
    }
    for (unit, t0) in batch.chunks_exact_mut(unit_len).zip(tweaks) {
        crypt_unit::<NR, ENC>(&rk2, &rk, load128(t0), unit);
    }
}

#[target_feature(enable = "aes,vaes,avx2")]
#[inline]
pub(super) fn round<const ENC: bool>(x: __m256i, k: __m256i) -> __m256i {
    if ENC {
        _mm256_aesenc_epi128(x, k)
    } else {
        _mm256_aesdec_epi128(x, k)
    }
}

#[target_feature(enable = "aes,vaes,avx2")]
#[inline]
pub(super) fn last<const ENC: bool>(x: __m256i, k: __m256i) -> __m256i {
    if ENC {
        _mm256_aesenclast_epi128(x, k)
    } else {
        _mm256_aesdeclast_epi128(x, k)
    }
}

#[target_feature(enable = "aes,vaes,avx2")]
#[inline]
fn crypt_unit<const NR: usize, const ENC: bool>(
    rk: &[__m256i; 15],
    rk1: &[__m128i; 15],
    t0: __m128i,
    unit: &mut [u8],
) {
    // Lane l of vector v holds the tweak of block 2v + l: T0 · x^(2v+l).
    let t0b = _mm256_broadcastsi128_si256(t0);
    let mut t = [_mm256_setzero_si256(); VECS];
    for (v, tv) in t.iter_mut().enumerate() {
        let k = 2 * v as i64;
        *tv = mul_x_var(t0b, _mm256_set_epi64x(k + 1, k + 1, k, k));
    }
    let (vecs, rest) = unit.as_chunks_mut::<32>();
    let mut groups = vecs.chunks_exact_mut(VECS);
    for g in &mut groups {
        let mut x = [_mm256_setzero_si256(); VECS];
        for i in 0..VECS {
            x[i] = _mm256_xor_si256(load256(&g[i]), _mm256_xor_si256(t[i], rk[0]));
        }
        for k in &rk[1..NR] {
            for xi in &mut x {
                *xi = round::<ENC>(*xi, *k);
            }
        }
        for i in 0..VECS {
            store256(&mut g[i], last::<ENC>(x[i], _mm256_xor_si256(rk[NR], t[i])));
            t[i] = mul_x16(t[i]);
        }
    }
    // The tail (units that are not a multiple of 256 bytes): whole vectors, then one block.
    let tail = groups.into_remainder();
    let used = tail.len();
    for (b, &ti) in tail.iter_mut().zip(&t) {
        let x = _mm256_xor_si256(load256(b), _mm256_xor_si256(ti, rk[0]));
        let mut x = x;
        for k in &rk[1..NR] {
            x = round::<ENC>(x, *k);
        }
        store256(b, last::<ENC>(x, _mm256_xor_si256(rk[NR], ti)));
    }
    if let Ok(b) = <&mut [u8; 16]>::try_from(rest) {
        crypt_block::<NR, ENC>(rk1, _mm256_castsi256_si128(t[used]), b);
    }
}
