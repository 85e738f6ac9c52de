//! The VAES + VPCLMULQDQ + AVX-512 tier: 512-bit registers (four blocks per instruction),
//! several vectors in flight, round keys held in registers (AVX-512 has 32 of them).

use core::arch::x86_64::*;

use zeroize::Zeroize;

use super::aesni::crypt_block;
use super::{load128, round_keys, RoundKeys, TWEAK_BATCH};

/// Vectors in flight: with four blocks each, 16 blocks (a 512-byte sector is two iterations).
const VECS: usize = 4;
/// The tweak step from one group to the next: x^(4·VECS).
const STEP: u32 = 4 * VECS as u32;
/// The same in bytes, for whole-lane byte shifts.
const STEP_BYTES: i32 = (STEP / 8) as i32;

/// Loads 64 bytes. A `#[target_feature]` function, so only code that has AVX-512F enabled
/// can call it without `unsafe`.
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) fn load512(b: &[u8; 64]) -> __m512i {
    // SAFETY: `b` points to 64 readable bytes (by type); the unaligned load assumes no
    // alignment; AVX-512F is enabled by this function's own attribute.
    unsafe { _mm512_loadu_si512(b.as_ptr().cast()) }
}

#[target_feature(enable = "avx512f")]
#[inline]
pub(super) fn store512(b: &mut [u8; 64], v: __m512i) {
    // SAFETY: `b` points to 64 writable bytes (by type); unaligned store; AVX-512F enabled
    // above.
    unsafe { _mm512_storeu_si512(b.as_mut_ptr().cast(), v) }
}

/// Finishes `v · x^k` per 128-bit lane from `shifted` (each 64-bit half shifted left by k)
/// and `carry` (each half's top k bits, shifted down), k ≤ 56: the low half's carry moves
/// into the high half, the high half's carry folds into the low half as its carry-less
/// product with 0x87.
#[target_feature(enable = "avx512f,avx512bw,vpclmulqdq")]
#[inline]
fn fold(shifted: __m512i, carry: __m512i) -> __m512i {
    let poly = _mm512_broadcast_i32x4(_mm_set_epi64x(0, 0x87));
    let folded = _mm512_clmulepi64_epi128::<0x01>(carry, poly);
    let up = _mm512_bslli_epi128::<8>(carry);
    _mm512_ternarylogic_epi64::<0x96>(shifted, up, folded)
}

/// Lane-wise `v · x^k`, k given per 64-bit element (both halves of a lane equal), k ≤ 56.
#[target_feature(enable = "avx512f,avx512bw,vpclmulqdq")]
#[inline]
fn mul_x_var(v: __m512i, k: __m512i) -> __m512i {
    let r = _mm512_sub_epi64(_mm512_set1_epi64(64), k);
    fold(_mm512_sllv_epi64(v, k), _mm512_srlv_epi64(v, r))
}

/// `v · x^STEP` per 128-bit lane, as OpenSSL's `aesni-xts-avx512` steps its tweaks: shift
/// each whole lane left by STEP/8 bytes (`VPSLLDQ`, no carries to track between halves) and
/// fold the STEP bits shifted out (`VPSRLDQ`) back as their carry-less product with 0x87.
/// Four instructions, three of them on the shuffle port, away from the AES port.
#[target_feature(enable = "avx512f,avx512bw,vpclmulqdq")]
#[inline]
fn mul_x_step(v: __m512i) -> __m512i {
    const { assert!(STEP.is_multiple_of(8) && STEP <= 56) };
    let poly = _mm512_broadcast_i32x4(_mm_set_epi64x(0, 0x87));
    let out = _mm512_bsrli_epi128::<{ 16 - STEP_BYTES }>(v);
    let folded = _mm512_clmulepi64_epi128::<0x00>(out, poly);
    _mm512_xor_si512(_mm512_bslli_epi128::<STEP_BYTES>(v), folded)
}

#[target_feature(enable = "avx512f,vaes")]
#[inline]
pub(super) fn round<const ENC: bool>(x: __m512i, k: __m512i) -> __m512i {
    if ENC {
        _mm512_aesenc_epi128(x, k)
    } else {
        _mm512_aesdec_epi128(x, k)
    }
}

#[target_feature(enable = "avx512f,vaes")]
#[inline]
pub(super) fn last<const ENC: bool>(x: __m512i, k: __m512i) -> __m512i {
    if ENC {
        _mm512_aesenclast_epi128(x, k)
    } else {
        _mm512_aesdeclast_epi128(x, k)
    }
}

/// Encrypts (`ENC`) or decrypts a batch of units; unit k's first tweak is `tweaks[k]`.
///
/// Calling it requires AES-NI, VAES, VPCLMULQDQ, AVX-512F and AVX-512BW.
#[target_feature(enable = "aes,vaes,vpclmulqdq,avx512f,avx512bw")]
pub(super) fn crypt<const NR: usize, const ENC: bool>(
    keys: &RoundKeys,
    batch: &mut [u8],
    unit_len: usize,
    tweaks: &[[u8; 16]; TWEAK_BATCH],
) {
    let rk = round_keys::<NR>(if ENC { &keys.data_enc } else { &keys.data_dec });
    let mut rk4 = [_mm512_setzero_si512(); 15];
    for i in 0..=NR {
        rk4[i] = _mm512_broadcast_i32x4(rk[i]);
    }
    for (unit, t0) in batch.chunks_exact_mut(unit_len).zip(tweaks) {
        crypt_unit::<NR, ENC>(&rk4, &rk, load128(t0), unit);
    }
}

#[target_feature(enable = "aes,vaes,vpclmulqdq,avx512f,avx512bw")]
#[inline]
fn crypt_unit<const NR: usize, const ENC: bool>(
    rk: &[__m512i; 15],
    rk1: &[__m128i; 15],
    t0: __m128i,
    unit: &mut [u8],
) {
    // Lane l of vector v holds the tweak of block 4v + l: T0 · x^(4v+l), each straight from T0.
    let t0b = _mm512_broadcast_i32x4(t0);
    let mut t = [_mm512_setzero_si512(); VECS];
    for (v, tv) in t.iter_mut().enumerate() {
        let k = 4 * v as i64;
        let counts = _mm512_set_epi64(k + 3, k + 3, k + 2, k + 2, k + 1, k + 1, k, k);
        *tv = mul_x_var(t0b, counts);
    }
    let (vecs, rest) = unit.as_chunks_mut::<64>();
    let mut groups = vecs.chunks_exact_mut(VECS);
    for g in &mut groups {
        let mut x = [_mm512_setzero_si512(); VECS];
        for i in 0..VECS {
            // data ⊕ tweak ⊕ round key 0 in one instruction.
            x[i] = _mm512_ternarylogic_epi64::<0x96>(load512(&g[i]), t[i], rk[0]);
        }
        for k in &rk[1..NR] {
            for xi in &mut x {
                *xi = round::<ENC>(*xi, *k);
            }
        }
        for i in 0..VECS {
            store512(&mut g[i], last::<ENC>(x[i], _mm512_xor_si512(rk[NR], t[i])));
            t[i] = mul_x_step(t[i]);
        }
    }
    // The tail (units that are not a multiple of the group): whole vectors, then blocks.
    let tail = groups.into_remainder();
    let used = tail.len();
    for (b, &ti) in tail.iter_mut().zip(&t) {
        let mut x = _mm512_ternarylogic_epi64::<0x96>(load512(b), ti, rk[0]);
        for k in &rk[1..NR] {
            x = round::<ENC>(x, *k);
        }
        store512(b, last::<ENC>(x, _mm512_xor_si512(rk[NR], ti)));
    }
    let (blocks, _) = rest.as_chunks_mut::<16>();
    if !blocks.is_empty() {
        let mut lanes = [0u8; 64];
        store512(&mut lanes, t[used]);
        let (lane_tweaks, _) = lanes.as_chunks::<16>();
        for (b, lt) in blocks.iter_mut().zip(lane_tweaks) {
            crypt_block::<NR, ENC>(rk1, load128(lt), b);
        }
        lanes.zeroize(); // tweaks, like those `FusedXts::crypt` clears
    }
}
