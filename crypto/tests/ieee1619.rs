//! XTS-AES known-answer vectors from IEEE 1619-2007 Annex B, through the public sector API.
//!
//! dm-crypt's `aes-xts-plain64` with 512-byte sectors is exactly IEEE 1619 with the data unit
//! sequence number = sector number (little endian), so the standard's 512-byte vectors apply
//! directly. The 32-byte vectors are checked as the first 32 bytes of a 512-byte data unit: XTS
//! blocks depend only on their own tweak, not on the rest of the unit.

use ublk_crypt_crypto::{CipherSpec, CryptoError, Key, SectorCipher, SectorLayout};

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn pt512() -> Vec<u8> {
    (0..512).map(|i| i as u8).collect()
}

fn check(key: &str, seq: u64, pt: &[u8], ct: &[u8]) {
    let spec: CipherSpec = "aes-xts-plain64".parse().unwrap();
    let cipher = SectorCipher::new(spec, &Key::from_bytes(&hex(key)), SectorLayout::default())
        .expect("valid key");
    let mut buf = vec![0u8; 512];
    buf[..pt.len()].copy_from_slice(pt);
    cipher.encrypt(seq, &mut buf).unwrap();
    assert_eq!(
        hex_of(&buf[..ct.len()]),
        hex_of(ct),
        "encrypt, seq {seq:#x}"
    );
    cipher.decrypt(seq, &mut buf).unwrap();
    assert_eq!(&buf[..pt.len()], pt, "decrypt, seq {seq:#x}");
}

fn hex_of(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn vector_1_equal_key_halves_are_rejected() {
    // Vector 1 uses an all-zero key: K1 == K2, which this implementation refuses on purpose.
    let spec: CipherSpec = "aes-xts-plain64".parse().unwrap();
    let err = SectorCipher::new(spec, &Key::zeroed(32), SectorLayout::default()).unwrap_err();
    assert_eq!(err, CryptoError::XtsEqualHalves);
}

#[test]
fn vector_2_aes128_32_bytes() {
    check(
        "11111111111111111111111111111111 22222222222222222222222222222222",
        0x33_3333_3333,
        &[0x44; 32],
        &hex("c454185e6a16936e39334038acef838bfb186fff7480adc4289382ecd6d394f0"),
    );
}

#[test]
fn vector_4_aes128_512_bytes() {
    check(
        "27182818284590452353602874713526 31415926535897932384626433832795",
        0,
        &pt512(),
        &hex(include_str!("data/ieee1619-v4.ct.hex")),
    );
}

#[test]
fn vector_10_aes256_512_bytes() {
    check(
        "2718281828459045235360287471352662497757247093699959574966967627\
         3141592653589793238462643383279502884197169399375105820974944592",
        0xff,
        &pt512(),
        &hex(include_str!("data/ieee1619-v10.ct.hex")),
    );
}

#[test]
fn vector_aes128_512_bytes_large_sequence_number() {
    check(
        "e0e1e2e3e4e5e6e7e8e9eaebecedeeef c0c1c2c3c4c5c6c7c8c9cacbcccdcecf",
        0xa9_8765_4321,
        &pt512(),
        &hex(include_str!("data/ieee1619-seq-a987654321.ct.hex")),
    );
}

/// IV-mode known answers (plain, plain64, plain64be, essiv:sha256), generated independently by
/// `data/make-iv-vectors.py` (Python `cryptography`, i.e. OpenSSL).
#[test]
fn iv_mode_vectors() {
    let mut n = 0;
    for line in include_str!("data/iv-vectors.txt").lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (spec, bits, sector, ct) = (f[0], f[1].parse::<usize>().unwrap(), f[2], hex(f[3]));
        let key: Vec<u8> = (0..(bits / 8) as u8).collect();
        let spec: CipherSpec = spec.parse().unwrap();
        let c = SectorCipher::new(spec, &Key::from_bytes(&key), SectorLayout::default()).unwrap();
        let sector: u64 = sector.parse().unwrap();
        let mut buf = pt512();
        c.encrypt(sector, &mut buf).unwrap();
        assert_eq!(hex_of(&buf), hex_of(&ct), "{line:.40}");
        c.decrypt(sector, &mut buf).unwrap();
        assert_eq!(buf, pt512());
        n += 1;
    }
    assert_eq!(n, 8);
}
