//! Regenerates `crypto/tests/data/dm-crypt-golden/`: ciphertext written by the real kernel
//! dm-crypt (`cryptsetup open --type plain`, kernel 6.12 in the test VM) for every supported
//! cipher spec and key size, 512- and 4096-byte sectors, offsets/skips, key files and hashed
//! passphrases. The crypto crate's `dm_crypt_golden` test checks `SectorCipher` against it.
//!
//! `cargo run --release -p ublk-crypt-tests --bin make-dm-crypt-golden`

use std::fmt::Write as _;
use std::time::Duration;

use ublk_crypt_tests::vm::Vm;
use ublk_crypt_tests::workspace_root;

/// Bytes of plaintext written per case (and of ciphertext kept).
const LEN: usize = 8192;

struct Case {
    name: String,
    spec: &'static str,
    bits: usize,
    sector_size: u32,
    offset: u64,
    skip: u64,
    iv_large: bool,
    /// "keyfile" (key bytes i*89+17) or a passphrase hash name.
    key: &'static str,
}

fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    for (spec, bits) in ublk_crypt_tests::cipher_matrix() {
        for ss in [512, 4096] {
            v.push(Case {
                name: format!("{}-{bits}-{ss}", spec.replace(':', "_")),
                spec,
                bits,
                sector_size: ss,
                offset: 8,
                skip: 40,
                iv_large: false,
                key: "keyfile",
            });
        }
    }
    for hash in ["sha256", "sha512", "ripemd160", "plain"] {
        v.push(Case {
            name: format!("pass-{hash}"),
            spec: "aes-xts-plain64",
            bits: 512,
            sector_size: 512,
            offset: 0,
            skip: 0,
            iv_large: false,
            key: hash,
        });
    }
    v.push(Case {
        name: "large-sectors".into(),
        spec: "aes-xts-plain64",
        bits: 512,
        sector_size: 4096,
        offset: 16,
        skip: 64,
        iv_large: true,
        key: "keyfile",
    });
    v
}

fn main() {
    let cases = cases();
    let mut script = String::from(
        "i=0; while [ $i -lt 32 ]; do cat /root/pattern256; i=$((i+1)); done > /tmp/pattern8k\n",
    );
    for (i, c) in cases.iter().enumerate() {
        let key = if c.key == "keyfile" {
            "--key-file /root/key".to_string()
        } else {
            format!("--hash {}", c.key)
        };
        let _ = writeln!(
            script,
            "dd if=/dev/zero of=/dev/vda bs=64k count=4 2>/dev/null\n\
             printf 'golden passphrase\\n' | cryptsetup open --type plain -c {} -s {} --sector-size {} -o {} -p {} {} {} /dev/vda g\n\
             dd if=/tmp/pattern8k of=/dev/mapper/g bs=8192 count=1 oflag=direct 2>/dev/null\n\
             cryptsetup close g\n\
             dd if=/dev/vda bs=512 skip={} count={} 2>/dev/null | od -An -v -tx1 > /tmp/c{i}\n\
             vm_section case{i} cat /tmp/c{i}",
            c.spec,
            c.bits,
            c.sector_size,
            c.offset,
            c.skip,
            if c.iv_large { "--iv-large-sectors" } else { "" },
            key,
            c.offset,
            LEN / 512,
        );
    }
    let key: Vec<u8> = (0..64u32).map(|i| (i * 89 + 17) as u8).collect();
    let pattern: Vec<u8> = (0..256u32).map(|i| (i * 31 + 7) as u8).collect();
    let out = Vm::builder()
        .memory_mib(256)
        .disk_mib(1)
        .host_tool("cryptsetup")
        .host_tool("od")
        .module("essiv")
        .file("/root/key", key)
        .file("/root/pattern256", pattern)
        .timeout(Duration::from_secs(600))
        .run(&script)
        .unwrap_or_else(|e| panic!("{e}"));

    let dir = workspace_root().join("crypto/tests/data/dm-crypt-golden");
    std::fs::create_dir_all(&dir).unwrap();
    let mut manifest = String::from(
        "# name spec key_bits sector_size offset skip iv_large_sectors key (keyfile | passphrase hash)\n",
    );
    for (i, c) in cases.iter().enumerate() {
        let hex = out.section(&format!("case{i}")).expect("case output");
        let hex: String = hex.chars().filter(|c| c.is_ascii_hexdigit()).collect();
        assert_eq!(
            hex.len(),
            LEN * 2,
            "case {}: {} hex digits",
            c.name,
            hex.len()
        );
        std::fs::write(dir.join(format!("{}.hex", c.name)), format!("{hex}\n")).unwrap();
        let _ = writeln!(
            manifest,
            "{} {} {} {} {} {} {} {}",
            c.name, c.spec, c.bits, c.sector_size, c.offset, c.skip, c.iv_large, c.key
        );
    }
    std::fs::write(dir.join("MANIFEST"), manifest).unwrap();
    println!("wrote {} cases to {}", cases.len(), dir.display());
}
