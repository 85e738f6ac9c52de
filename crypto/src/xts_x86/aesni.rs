//! The AES-NI tier (128-bit registers, eight blocks in flight), and the pieces every tier
//! shares: key expansion, tweak encryption and the one-block path for unit tails.

use core::arch::x86_64::*;

use zeroize::Zeroize;

use super::{load128, round_keys, store128, RoundKeys, TWEAK_BATCH};

/// Blocks in flight. AESENC has a latency of about four cycles and issues once or twice a
/// cycle, so eight independent blocks keep the AES unit busy.
const LANES: usize = 8;

/// One step of the AES key schedule: the word-wise prefix XOR of `a`, XORed with `b` (the
/// `AESKEYGENASSIST` output, already broadcast to all four words).
#[target_feature(enable = "sse2")]
#[inline]
fn expand_step(mut a: __m128i, b: __m128i) -> __m128i {
    a = _mm_xor_si128(a, _mm_slli_si128::<4>(a));
    a = _mm_xor_si128(a, _mm_slli_si128::<4>(a));
    a = _mm_xor_si128(a, _mm_slli_si128::<4>(a));
    _mm_xor_si128(a, b)
}

/// One step of the AES-192 schedule (Intel's AES-NI white paper, `KEY_192_ASSIST`): `t1`
/// takes the word-wise prefix XOR and the `AESKEYGENASSIST` word, `t3`'s low two words follow.
#[target_feature(enable = "sse2")]
#[inline]
fn expand192_step(t1: &mut __m128i, assist: __m128i, t3: &mut __m128i) {
    *t1 = expand_step(*t1, _mm_shuffle_epi32::<0x55>(assist));
    let top = _mm_shuffle_epi32::<0xff>(*t1);
    *t3 = _mm_xor_si128(_mm_xor_si128(*t3, _mm_slli_si128::<4>(*t3)), top);
}

/// The 64-bit halves (low of `a`, low of `b`) as one round key: `SHUFPD` with 0.
#[target_feature(enable = "sse2")]
#[inline]
fn low_low(a: __m128i, b: __m128i) -> __m128i {
    _mm_castpd_si128(_mm_shuffle_pd::<0>(
        _mm_castsi128_pd(a),
        _mm_castsi128_pd(b),
    ))
}

/// (high of `a`, low of `b`): `SHUFPD` with 1.
#[target_feature(enable = "sse2")]
#[inline]
fn high_low(a: __m128i, b: __m128i) -> __m128i {
    _mm_castpd_si128(_mm_shuffle_pd::<1>(
        _mm_castsi128_pd(a),
        _mm_castsi128_pd(b),
    ))
}

/// Expands an AES-128, AES-192 or AES-256 key (16, 24 or 32 bytes) into `enc` (round keys
/// 0..=10, 12 or 14) and, if asked, the equivalent-inverse-cipher schedule into `dec`. Uses
/// `AESKEYGENASSIST` (constant time, unlike a table-based schedule). Returns the rounds.
///
/// Calling it requires AES-NI (the caller's `// SAFETY:` names the detection).
#[target_feature(enable = "aes")]
pub(super) fn expand(
    key: &[u8],
    enc: &mut [[u8; 16]; 15],
    dec: Option<&mut [[u8; 16]; 15]>,
) -> usize {
    let mut rk = [_mm_setzero_si128(); 15];
    let nr = if key.len() == 24 {
        let mut t1 = load128(key[..16].try_into().expect("24-byte key"));
        let mut tail = [0u8; 16];
        tail[..8].copy_from_slice(&key[16..24]);
        let mut t3 = load128(&tail);
        tail.zeroize();
        rk[0] = t1;
        // Six words per step, so round keys straddle steps: SHUFPD stitches the halves.
        macro_rules! step {
            ($rcon:literal) => {
                expand192_step(&mut t1, _mm_aeskeygenassist_si128::<$rcon>(t3), &mut t3)
            };
        }
        let k1 = t3;
        step!(0x01);
        rk[1] = low_low(k1, t1);
        rk[2] = high_low(t1, t3);
        step!(0x02);
        rk[3] = t1;
        let k4 = t3;
        step!(0x04);
        rk[4] = low_low(k4, t1);
        rk[5] = high_low(t1, t3);
        step!(0x08);
        rk[6] = t1;
        let k7 = t3;
        step!(0x10);
        rk[7] = low_low(k7, t1);
        rk[8] = high_low(t1, t3);
        step!(0x20);
        rk[9] = t1;
        let k10 = t3;
        step!(0x40);
        rk[10] = low_low(k10, t1);
        rk[11] = high_low(t1, t3);
        step!(0x80);
        rk[12] = t1;
        12
    } else if key.len() == 16 {
        rk[0] = load128(key.try_into().expect("16-byte key"));
        macro_rules! step {
            ($i:literal, $rcon:literal) => {
                rk[$i] = expand_step(
                    rk[$i - 1],
                    _mm_shuffle_epi32::<0xff>(_mm_aeskeygenassist_si128::<$rcon>(rk[$i - 1])),
                );
            };
        }
        step!(1, 0x01);
        step!(2, 0x02);
        step!(3, 0x04);
        step!(4, 0x08);
        step!(5, 0x10);
        step!(6, 0x20);
        step!(7, 0x40);
        step!(8, 0x80);
        step!(9, 0x1b);
        step!(10, 0x36);
        10
    } else {
        rk[0] = load128(key[..16].try_into().expect("32-byte key"));
        rk[1] = load128(key[16..32].try_into().expect("32-byte key"));
        // Even round keys take RotWord+SubWord+Rcon of the previous one, odd ones SubWord only.
        macro_rules! even {
            ($i:literal, $rcon:literal) => {
                rk[$i] = expand_step(
                    rk[$i - 2],
                    _mm_shuffle_epi32::<0xff>(_mm_aeskeygenassist_si128::<$rcon>(rk[$i - 1])),
                );
            };
        }
        macro_rules! odd {
            ($i:literal) => {
                rk[$i] = expand_step(
                    rk[$i - 2],
                    _mm_shuffle_epi32::<0xaa>(_mm_aeskeygenassist_si128::<0>(rk[$i - 1])),
                );
            };
        }
        even!(2, 0x01);
        odd!(3);
        even!(4, 0x02);
        odd!(5);
        even!(6, 0x04);
        odd!(7);
        even!(8, 0x08);
        odd!(9);
        even!(10, 0x10);
        odd!(11);
        even!(12, 0x20);
        odd!(13);
        even!(14, 0x40);
        14
    };
    for i in 0..=nr {
        store128(&mut enc[i], rk[i]);
    }
    if let Some(dec) = dec {
        store128(&mut dec[0], rk[nr]);
        for i in 1..nr {
            store128(&mut dec[i], _mm_aesimc_si128(rk[nr - i]));
        }
        store128(&mut dec[nr], rk[0]);
    }
    // Best effort: overwrite the local copy (it may have been spilled to the stack).
    rk = [_mm_setzero_si128(); 15];
    core::hint::black_box(&rk);
    nr
}

/// Encrypts the first `n` IVs of `t` in place with the tweak key schedule (`E_K2(IV)`, the
/// first tweak of each unit), four at a time so their rounds overlap.
///
/// Calling it requires AES-NI.
#[target_feature(enable = "aes")]
pub(super) fn encrypt_tweaks(
    sched: &[[u8; 16]; 15],
    rounds: usize,
    t: &mut [[u8; 16]; TWEAK_BATCH],
    n: usize,
) {
    let used = &mut t[..n.div_ceil(4) * 4];
    match rounds {
        10 => encrypt_blocks::<10>(sched, used),
        12 => encrypt_blocks::<12>(sched, used),
        _ => encrypt_blocks::<14>(sched, used),
    }
}

#[target_feature(enable = "aes")]
#[inline]
fn encrypt_blocks<const NR: usize>(sched: &[[u8; 16]; 15], blocks: &mut [[u8; 16]]) {
    let rk = round_keys::<NR>(sched);
    for group in blocks.chunks_exact_mut(4) {
        let mut x = [_mm_setzero_si128(); 4];
        for i in 0..4 {
            x[i] = _mm_xor_si128(load128(&group[i]), rk[0]);
        }
        for k in &rk[1..NR] {
            for xi in &mut x {
                *xi = _mm_aesenc_si128(*xi, *k);
            }
        }
        for i in 0..4 {
            store128(&mut group[i], _mm_aesenclast_si128(x[i], rk[NR]));
        }
    }
}

/// One middle round: `AESENC` or, decrypting, `AESDEC` (equivalent inverse cipher).
#[target_feature(enable = "aes")]
#[inline]
pub(super) fn round<const ENC: bool>(x: __m128i, k: __m128i) -> __m128i {
    if ENC {
        _mm_aesenc_si128(x, k)
    } else {
        _mm_aesdec_si128(x, k)
    }
}

#[target_feature(enable = "aes")]
#[inline]
pub(super) fn last<const ENC: bool>(x: __m128i, k: __m128i) -> __m128i {
    if ENC {
        _mm_aesenclast_si128(x, k)
    } else {
        _mm_aesdeclast_si128(x, k)
    }
}

/// One XTS block with tweak `t`: the path for the blocks of a unit that do not fill a vector
/// group (only units whose length is not a multiple of the group; never 512–4096-byte
/// sectors).
#[target_feature(enable = "aes")]
#[inline]
pub(super) fn crypt_block<const NR: usize, const ENC: bool>(
    rk: &[__m128i; 15],
    t: __m128i,
    b: &mut [u8; 16],
) {
    let mut x = _mm_xor_si128(load128(b), _mm_xor_si128(t, rk[0]));
    for k in &rk[1..NR] {
        x = round::<ENC>(x, *k);
    }
    store128(b, last::<ENC>(x, _mm_xor_si128(rk[NR], t)));
}

/// `v · x^K` in GF(2¹²⁸) (XTS's little-endian convention), for K ≤ 56 and R = 64 − K: shift
/// both 64-bit halves left by K, carry the low half's top K bits into the high half, and fold
/// the high half's top K bits back as their carry-less product with 0x87 (x¹²⁸ = x⁷+x²+x+1).
#[target_feature(enable = "pclmulqdq")]
#[inline]
fn mul_x<const K: i32, const R: i32>(v: __m128i, poly: __m128i) -> __m128i {
    const { assert!(K + R == 64 && K >= 1 && K <= 56) };
    let carry = _mm_srli_epi64::<R>(v);
    let folded = _mm_clmulepi64_si128::<0x01>(carry, poly);
    let up = _mm_slli_si128::<8>(carry);
    _mm_xor_si128(_mm_xor_si128(_mm_slli_epi64::<K>(v), up), folded)
}

/// `v · x^8`, the step from one group of eight blocks to the next, as OpenSSL steps its
/// tweaks: shift the whole 128 bits left by a byte (`PSLLDQ`, no carry between halves to
/// track) and fold the byte shifted out back as its carry-less product with 0x87.
#[target_feature(enable = "pclmulqdq")]
#[inline]
fn mul_x8(v: __m128i, poly: __m128i) -> __m128i {
    let out = _mm_srli_si128::<15>(v);
    _mm_xor_si128(
        _mm_slli_si128::<1>(v),
        _mm_clmulepi64_si128::<0x00>(out, poly),
    )
}

/// Encrypts (`ENC`) or decrypts a batch of units; unit k's first tweak is `tweaks[k]`
/// (already encrypted).
///
/// Calling it requires AES-NI and PCLMULQDQ.
#[target_feature(enable = "aes,pclmulqdq")]
pub(super) fn crypt<const NR: usize, const ENC: bool>(
    keys: &RoundKeys,
    batch: &mut [u8],
    unit_len: usize,
    tweaks: &[[u8; 16]; TWEAK_BATCH],
) {
    crypt_body::<NR, ENC, false>(keys, batch, unit_len, tweaks);
}

/// [`crypt`] compiled with AVX as well, for AES-NI CPUs that have it (Sandy Bridge to
/// Skylake, Zen 1/2; and any CPU capped to this tier): the VEX three-operand forms spare the
/// register copies that sixteen xmm registers and two-operand SSE need (measured +8–10 %).
///
/// Calling it requires AES-NI, PCLMULQDQ and AVX.
#[target_feature(enable = "aes,pclmulqdq,avx")]
pub(super) fn crypt_avx<const NR: usize, const ENC: bool>(
    keys: &RoundKeys,
    batch: &mut [u8],
    unit_len: usize,
    tweaks: &[[u8; 16]; TWEAK_BATCH],
) {
    crypt_body::<NR, ENC, true>(keys, batch, unit_len, tweaks);
}

/// The body of [`crypt`] and [`crypt_avx`]: inlined into each, it is compiled with the
/// caller's features. `BUILD` only makes the two instances distinct functions with one caller
/// each, which LLVM inlines; one function with two callers it left out of line, compiled
/// without AVX (measured: the AVX build was no faster until then).
#[target_feature(enable = "aes,pclmulqdq")]
#[inline]
fn crypt_body<const NR: usize, const ENC: bool, const BUILD: bool>(
    keys: &RoundKeys,
    batch: &mut [u8],
    unit_len: usize,
    tweaks: &[[u8; 16]; TWEAK_BATCH],
) {
    let rk = round_keys::<NR>(if ENC { &keys.data_enc } else { &keys.data_dec });
    for (unit, t0) in batch.chunks_exact_mut(unit_len).zip(tweaks) {
        crypt_unit::<NR, ENC, BUILD>(&rk, load128(t0), unit);
    }
}

#[target_feature(enable = "aes,pclmulqdq")]
#[inline]
fn crypt_unit<const NR: usize, const ENC: bool, const BUILD: bool>(
    rk: &[__m128i; 15],
    t0: __m128i,
    unit: &mut [u8],
) {
    let poly = _mm_set_epi64x(0, 0x87);
    // Tweaks of the next eight blocks, each computed from T0 directly (no serial chain).
    let mut t = [
        t0,
        mul_x::<1, 63>(t0, poly),
        mul_x::<2, 62>(t0, poly),
        mul_x::<3, 61>(t0, poly),
        mul_x::<4, 60>(t0, poly),
        mul_x::<5, 59>(t0, poly),
        mul_x::<6, 58>(t0, poly),
        mul_x::<7, 57>(t0, poly),
    ];
    let (blocks, _) = unit.as_chunks_mut::<16>();
    let mut groups = blocks.chunks_exact_mut(LANES);
    for g in &mut groups {
        let mut x = [_mm_setzero_si128(); LANES];
        for i in 0..LANES {
            x[i] = _mm_xor_si128(load128(&g[i]), _mm_xor_si128(t[i], rk[0]));
        }
        for k in &rk[1..NR] {
            for xi in &mut x {
                *xi = round::<ENC>(*xi, *k);
            }
        }
        for i in 0..LANES {
            store128(&mut g[i], last::<ENC>(x[i], _mm_xor_si128(rk[NR], t[i])));
            t[i] = mul_x8(t[i], poly);
        }
    }
    // Fewer than eight blocks left: t[0..] are exactly their tweaks.
    for (b, ti) in groups.into_remainder().iter_mut().zip(t) {
        crypt_block::<NR, ENC>(rk, ti, b);
    }
}
