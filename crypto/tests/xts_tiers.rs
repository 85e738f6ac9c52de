//! Every XTS tier this CPU can run (portable, aesni, vaes-avx2, vaes-avx512), each on its own:
//! IEEE 1619 known answers, and randomized differential tests against the portable path and
//! against OpenSSL over random keys, IVs, unit sizes (sector sizes 512–4096 and odd multiples
//! of 16 that exercise the cores' tail paths), runs of 1–256 units and unaligned buffers.
//!
//! Tiers the CPU lacks are skipped with a note on stderr; `tier_coverage` says which ran. The
//! existing suites (ieee1619, openssl_compare, dm_crypt_golden) run on the process's tier;
//! `UBLK_CRYPT_XTS_TIER=<tier> cargo test` runs them on a lower one.

use openssl::symm::{Cipher, Crypter, Mode};
use ublk_crypt_crypto::{
    CipherSpec, CryptoError, Key, SectorCipher, SectorLayout, XtsCipher, XtsTier,
};

mod common;
use common::Rng;

fn hex(s: &str) -> Vec<u8> {
    let s: Vec<u8> = s.bytes().filter(u8::is_ascii_hexdigit).collect();
    s.chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap())
        .collect()
}

fn supported_tiers() -> Vec<XtsTier> {
    XtsTier::ALL
        .into_iter()
        .filter(|t| {
            let ok = t.is_supported();
            if !ok {
                eprintln!("note: XTS tier {t} not supported by this CPU: skipped");
            }
            ok
        })
        .collect()
}

fn seq_iv(seq: u64) -> impl Fn(usize) -> [u8; 16] {
    move |k| {
        let mut iv = [0u8; 16];
        iv[..8].copy_from_slice(&(seq + k as u64).to_le_bytes());
        iv
    }
}

/// (key, data unit sequence number, plaintext, ciphertext), IEEE 1619-2007 Annex B.
type Vector = (Vec<u8>, u64, Vec<u8>, Vec<u8>);

fn ieee_vectors() -> Vec<Vector> {
    let pt512: Vec<u8> = (0..512).map(|i| i as u8).collect();
    vec![
        // Vector 2: AES-128, one 32-byte unit (exercises every core's tail path).
        (
            hex("11111111111111111111111111111111 22222222222222222222222222222222"),
            0x33_3333_3333,
            vec![0x44; 32],
            hex("c454185e6a16936e39334038acef838bfb186fff7480adc4289382ecd6d394f0"),
        ),
        // Vector 4: AES-128, 512-byte unit.
        (
            hex("27182818284590452353602874713526 31415926535897932384626433832795"),
            0,
            pt512.clone(),
            hex(include_str!("data/ieee1619-v4.ct.hex")),
        ),
        // Vector 10: AES-256, 512-byte unit, sequence number 0xff.
        (
            hex(
                "2718281828459045235360287471352662497757247093699959574966967627\
                 3141592653589793238462643383279502884197169399375105820974944592",
            ),
            0xff,
            pt512.clone(),
            hex(include_str!("data/ieee1619-v10.ct.hex")),
        ),
        // AES-128, 512-byte unit, sequence number 0xa987654321.
        (
            hex("e0e1e2e3e4e5e6e7e8e9eaebecedeeef c0c1c2c3c4c5c6c7c8c9cacbcccdcecf"),
            0xa9_8765_4321,
            pt512,
            hex(include_str!("data/ieee1619-seq-a987654321.ct.hex")),
        ),
    ]
}

#[test]
fn ieee1619_vectors_on_every_tier() {
    for tier in supported_tiers() {
        for (key, seq, pt, ct) in ieee_vectors() {
            let c = XtsCipher::with_tier(&key, tier).unwrap();
            assert_eq!(c.tier(), tier);
            let mut buf = pt.clone();
            c.encrypt(&mut buf, pt.len(), seq_iv(seq)).unwrap();
            assert!(
                buf == ct,
                "{tier}: encrypt, seq {seq:#x}, {} bytes",
                pt.len()
            );
            c.decrypt(&mut buf, pt.len(), seq_iv(seq)).unwrap();
            assert!(buf == pt, "{tier}: decrypt, seq {seq:#x}");
            // The same unit as the second of a run of three: position in a run changes nothing.
            let mut run = vec![0u8; 3 * pt.len()];
            run[pt.len()..2 * pt.len()].copy_from_slice(&pt);
            c.encrypt(&mut run, pt.len(), seq_iv(seq.wrapping_sub(1)))
                .unwrap();
            assert!(run[pt.len()..2 * pt.len()] == ct[..], "{tier}: in a run");
        }
    }
}

#[test]
fn sector_cipher_on_every_tier_matches_ieee1619() {
    // Through the sector API: aes-xts-plain64 with 512-byte sectors is IEEE 1619.
    let spec: CipherSpec = "aes-xts-plain64".parse().unwrap();
    for tier in supported_tiers() {
        for (key, seq, pt, ct) in ieee_vectors().into_iter().filter(|v| v.2.len() == 512) {
            let c = SectorCipher::with_xts_tier(
                spec,
                &Key::from_bytes(&key),
                SectorLayout::default(),
                tier,
            )
            .unwrap();
            assert_eq!(c.xts_tier(), Some(tier));
            let mut buf = pt.clone();
            c.encrypt(seq, &mut buf).unwrap();
            assert!(buf == ct, "{tier}: seq {seq:#x}");
            c.decrypt(seq, &mut buf).unwrap();
            assert!(buf == pt, "{tier}");
        }
    }
}

fn openssl_unit(key: &[u8], iv: &[u8; 16], data: &[u8], mode: Mode) -> Vec<u8> {
    let cipher = if key.len() == 64 {
        Cipher::aes_256_xts()
    } else {
        Cipher::aes_128_xts()
    };
    let mut c = Crypter::new(cipher, mode, key, Some(iv)).unwrap();
    c.pad(false);
    let mut out = vec![0u8; data.len() + 16];
    let mut n = c.update(data, &mut out).unwrap();
    n += c.finalize(&mut out[n..]).unwrap();
    out.truncate(n);
    out
}

/// One randomized case: `units` units of `unit_len` bytes at byte offset `misalign` in the
/// buffer, random IVs, every supported tier against the portable tier and OpenSSL, both
/// directions.
fn differential_case(
    rng: &mut Rng,
    tiers: &[XtsTier],
    key_len: usize,
    unit_len: usize,
    units: usize,
) {
    let mut key = vec![0u8; key_len];
    rng.fill(&mut key);
    let ivs: Vec<[u8; 16]> = (0..units)
        .map(|_| {
            let mut iv = [0u8; 16];
            rng.fill(&mut iv);
            if rng.below(2) == 0 {
                iv[8..].fill(0); // plain64-like
            }
            iv
        })
        .collect();
    let iv_of = |k: usize| ivs[k];
    let len = unit_len * units;
    let misalign = rng.below(64) as usize;
    let mut storage = vec![0u8; len + 64];
    rng.fill(&mut storage);
    let plain = storage[misalign..misalign + len].to_vec();

    let reference = XtsCipher::with_tier(&key, XtsTier::Portable).unwrap();
    let mut want = plain.clone();
    reference.encrypt(&mut want, unit_len, iv_of).unwrap();
    for (k, (p, c)) in plain
        .chunks(unit_len)
        .zip(want.chunks(unit_len))
        .enumerate()
    {
        assert!(
            openssl_unit(&key, &ivs[k], p, Mode::Encrypt) == c,
            "portable vs OpenSSL: key {key_len} unit {unit_len} #{k}"
        );
    }
    // Decryption of random data (not just a round trip) against OpenSSL too.
    let mut want_dec = plain.clone();
    reference.decrypt(&mut want_dec, unit_len, iv_of).unwrap();
    let k = rng.below(units as u64) as usize;
    let r = k * unit_len..(k + 1) * unit_len;
    assert!(openssl_unit(&key, &ivs[k], &plain[r.clone()], Mode::Decrypt) == want_dec[r]);

    for &tier in tiers {
        let c = XtsCipher::with_tier(&key, tier).unwrap();
        let buf = &mut storage[misalign..misalign + len];
        buf.copy_from_slice(&plain);
        c.encrypt(buf, unit_len, iv_of).unwrap();
        assert!(
            *buf == want[..],
            "{tier} encrypt: key {key_len} unit {unit_len} units {units} misalign {misalign}"
        );
        c.decrypt(buf, unit_len, iv_of).unwrap();
        assert!(
            *buf == plain[..],
            "{tier} round trip: unit {unit_len} units {units}"
        );
        c.decrypt(buf, unit_len, iv_of).unwrap();
        assert!(
            *buf == want_dec[..],
            "{tier} decrypt: key {key_len} unit {unit_len} units {units} misalign {misalign}"
        );
    }
}

#[test]
fn every_tier_matches_portable_and_openssl_on_sector_runs() {
    let tiers = supported_tiers();
    let mut rng = Rng(0x7153_0001);
    let mut cases = 0;
    for key_len in [32, 64] {
        for unit_len in [512usize, 1024, 2048, 4096] {
            for _ in 0..10 {
                // Runs of 1–256 sectors, most short, some long (a whole request).
                let units = match rng.below(4) {
                    0 => 1,
                    1 => 1 + rng.below(16) as usize,
                    2 => 1 + rng.below(256) as usize,
                    _ => 256,
                };
                let units = units.min((1 << 20) / unit_len * 2);
                differential_case(&mut rng, &tiers, key_len, unit_len, units);
                cases += 1;
            }
        }
    }
    assert_eq!(cases, 80);
}

#[test]
fn every_tier_matches_portable_and_openssl_on_odd_units() {
    // Units that are not whole vector groups: every tail path of every core (one block, an
    // odd number of blocks, whole vectors plus blocks), and units above 4096 bytes.
    let tiers = supported_tiers();
    let mut rng = Rng(0x7153_0002);
    let mut lens: Vec<usize> = (1..=40).map(|b| 16 * b).collect();
    lens.extend([16 * 63, 16 * 65, 16 * 257, 8192, 65536]);
    for key_len in [32, 64] {
        for &unit_len in &lens {
            let units = 1 + rng.below(if unit_len > 4096 { 3 } else { 40 }) as usize;
            differential_case(&mut rng, &tiers, key_len, unit_len, units);
        }
    }
}

#[test]
fn lengths_that_are_not_whole_units_are_rejected_on_every_tier() {
    let key: Vec<u8> = (0..64u8).collect();
    for tier in supported_tiers() {
        let c = XtsCipher::with_tier(&key, tier).unwrap();
        let mut buf = vec![0u8; 1024];
        for (len, unit) in [
            (1024, 0),
            (1024, 8),
            (1024, 24),
            (1000, 16),
            (1024, 48),
            (17, 17),
        ] {
            let e = c.encrypt(&mut buf[..len], unit, |_| [0; 16]).unwrap_err();
            assert_eq!(
                e,
                CryptoError::XtsLength {
                    len,
                    unit_len: unit
                },
                "{tier}"
            );
            assert!(e.to_string().contains("multiple of 16"), "{e}");
            assert!(c.decrypt(&mut buf[..len], unit, |_| [0; 16]).is_err());
        }
        assert_eq!(buf, vec![0u8; 1024], "{tier}: nothing written on error");
        // An empty run is a whole number of units.
        c.encrypt(&mut [], 512, |_| [0; 16]).unwrap();
    }
}

#[test]
fn bad_keys_and_unsupported_tiers_are_errors() {
    assert_eq!(
        XtsCipher::with_tier(&[7u8; 64], XtsTier::Portable).unwrap_err(),
        CryptoError::XtsEqualHalves
    );
    assert!(XtsCipher::new(&[1u8; 48]).is_err());
    for t in XtsTier::ALL {
        if !t.is_supported() {
            let key: Vec<u8> = (0..64u8).collect();
            assert_eq!(
                XtsCipher::with_tier(&key, t).unwrap_err(),
                CryptoError::XtsTierUnsupported(t)
            );
        }
    }
}

#[test]
fn every_iv_mode_and_layout_agrees_across_tiers() {
    // The sector API (plain, plain64, plain64be, large-sector IVs, offsets) gives the same
    // bytes on every tier as on the portable one.
    let tiers = supported_tiers();
    let mut rng = Rng(0x7153_0003);
    for spec in ["aes-xts-plain64", "aes-xts-plain", "aes-xts-plain64be"] {
        let spec: CipherSpec = spec.parse().unwrap();
        for bits in [256usize, 512] {
            for ss in [512u32, 4096] {
                for large in [false, true] {
                    let layout = SectorLayout {
                        sector_size: ss,
                        iv_large_sectors: large,
                        iv_offset: 8 * (rng.next() >> 40),
                    };
                    let mut key = vec![0u8; bits / 8];
                    rng.fill(&mut key);
                    let key = Key::from_bytes(&key);
                    let start = ((1u64 << 32) - 64) / 8 * 8;
                    let mut data = vec![0u8; 64 << 10];
                    rng.fill(&mut data);
                    let mut want = data.clone();
                    SectorCipher::with_xts_tier(spec, &key, layout, XtsTier::Portable)
                        .unwrap()
                        .encrypt(start, &mut want)
                        .unwrap();
                    for &t in &tiers {
                        let c = SectorCipher::with_xts_tier(spec, &key, layout, t).unwrap();
                        let mut got = data.clone();
                        c.encrypt(start, &mut got).unwrap();
                        assert!(got == want, "{spec} {bits} {layout:?} {t}");
                        c.decrypt(start, &mut got).unwrap();
                        assert!(got == data, "{spec} {bits} {layout:?} {t}");
                    }
                }
            }
        }
    }
}

#[test]
fn tier_coverage() {
    let tiers = supported_tiers();
    eprintln!("XTS tiers tested on this CPU: {tiers:?}");
    assert!(tiers.contains(&XtsTier::Portable));
}

/// dm-crypt's ESSIV IV for a sector, computed with OpenSSL: `AES-256_{SHA-256(key)}(le64)`.
fn openssl_essiv(key: &[u8], iv_sector: u64) -> [u8; 16] {
    let salt = openssl::hash::hash(openssl::hash::MessageDigest::sha256(), key).unwrap();
    let mut iv = [0u8; 16];
    iv[..8].copy_from_slice(&iv_sector.to_le_bytes());
    let mut c = Crypter::new(Cipher::aes_256_ecb(), Mode::Encrypt, &salt, None).unwrap();
    c.pad(false);
    let mut out = [0u8; 32];
    let n = c.update(&iv, &mut out).unwrap();
    assert_eq!(n, 16);
    out[..16].try_into().unwrap()
}

#[test]
fn cbc_essiv_on_every_tier_matches_portable_and_openssl() {
    // CBC's fused tiers: wide decryption, four-chain encryption (sector counts that are not
    // multiples of four exercise the single-chain rest), AES-128/192/256, unaligned buffers.
    let tiers = supported_tiers();
    let spec: CipherSpec = "aes-cbc-essiv:sha256".parse().unwrap();
    let mut rng = Rng(0x7153_0004);
    for key_len in [16usize, 24, 32] {
        for ss in [512u32, 1024, 2048, 4096] {
            for _ in 0..3 {
                let mut key = vec![0u8; key_len];
                rng.fill(&mut key);
                let layout = SectorLayout {
                    sector_size: ss,
                    ..Default::default()
                };
                let units = u64::from(ss / 512);
                let start = (rng.next() >> 24) / units * units;
                let sectors = 1 + rng.below(if ss == 512 { 40 } else { 12 }) as usize;
                let len = sectors * ss as usize;
                let misalign = rng.below(64) as usize;
                let mut storage = vec![0u8; len + 64];
                rng.fill(&mut storage);
                let plain = storage[misalign..misalign + len].to_vec();

                let cipher = match key_len {
                    16 => Cipher::aes_128_cbc(),
                    24 => Cipher::aes_192_cbc(),
                    _ => Cipher::aes_256_cbc(),
                };
                let mut want = Vec::with_capacity(len);
                for (k, p) in plain.chunks(ss as usize).enumerate() {
                    let iv = openssl_essiv(&key, start + k as u64 * units);
                    let mut c = Crypter::new(cipher, Mode::Encrypt, &key, Some(&iv)).unwrap();
                    c.pad(false);
                    let mut out = vec![0u8; p.len() + 16];
                    let n = c.update(p, &mut out).unwrap();
                    want.extend_from_slice(&out[..n]);
                }
                for &t in &tiers {
                    let c = SectorCipher::with_xts_tier(spec, &Key::from_bytes(&key), layout, t)
                        .unwrap();
                    assert_eq!(c.tier(), t);
                    let buf = &mut storage[misalign..misalign + len];
                    buf.copy_from_slice(&plain);
                    c.encrypt(start, buf).unwrap();
                    assert!(
                        *buf == want[..],
                        "{t} CBC encrypt: key {key_len} ss {ss} n {sectors}"
                    );
                    c.decrypt(start, buf).unwrap();
                    assert!(
                        *buf == plain[..],
                        "{t} CBC decrypt: key {key_len} ss {ss} n {sectors}"
                    );
                }
            }
        }
    }
}
