//! Golden vectors of real dm-crypt: ciphertext the Linux 6.12 kernel wrote through
//! `cryptsetup open --type plain` (regenerate with
//! `cargo run --release -p ublk-crypt-tests --bin make-dm-crypt-golden`, which boots the test
//! VM). Every supported spec and key size, 512- and 4096-byte sectors, --offset/--skip,
//! iv_large_sectors, key files and passphrases through every plain-mode hash.

use ublk_crypt_crypto::{CipherSpec, Key, PassphraseHash, SectorCipher, SectorLayout};

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/dm-crypt-golden");

fn hex(s: &str) -> Vec<u8> {
    let s: Vec<u8> = s.bytes().filter(u8::is_ascii_hexdigit).collect();
    s.chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap())
        .collect()
}

#[test]
fn sector_cipher_writes_what_dm_crypt_writes() {
    let manifest = std::fs::read_to_string(format!("{DIR}/MANIFEST")).unwrap();
    let plaintext: Vec<u8> = (0..8192u32).map(|i| ((i % 256) * 31 + 7) as u8).collect();
    let mut n = 0;
    for line in manifest.lines().filter(|l| !l.starts_with('#')) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (name, spec, bits) = (f[0], f[1], f[2].parse::<usize>().unwrap());
        let layout = SectorLayout {
            sector_size: f[3].parse().unwrap(),
            iv_large_sectors: f[6] == "true",
            iv_offset: f[5].parse().unwrap(),
        };
        let key = match f[7] {
            "keyfile" => {
                let k: Vec<u8> = (0..64u32).map(|i| (i * 89 + 17) as u8).collect();
                Key::from_bytes(&k[..bits / 8])
            }
            hash => {
                let h: PassphraseHash = hash.parse().unwrap();
                Key::from_passphrase(h, b"golden passphrase", bits / 8).unwrap()
            }
        };
        let spec: CipherSpec = spec.parse().unwrap();
        let cipher = SectorCipher::new(spec, &key, layout).unwrap();
        let golden = hex(&std::fs::read_to_string(format!("{DIR}/{name}.hex")).unwrap());
        let mut buf = plaintext.clone();
        cipher.encrypt(0, &mut buf).unwrap();
        assert!(buf == golden, "{name}: ciphertext differs from dm-crypt's");
        cipher.decrypt(0, &mut buf).unwrap();
        assert!(buf == plaintext, "{name}: does not decrypt back");
        n += 1;
    }
    assert_eq!(n, 21);
}
