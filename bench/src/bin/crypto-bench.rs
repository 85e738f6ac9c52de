//! Crypto micro-benchmark: GB/s per core of ublk-crypt's sector cipher against OpenSSL (EVP
//! context reused, IV reset per sector exactly as a block device must) and, as a reference
//! point, the one-block-at-a-time `xts-mode` crate — all in one run, on one core.
//!
//! `cargo run --release -p ublk-crypt-bench --bin crypto-bench [-- --seconds S] [--markdown]`
//!
//! The working set is one 64 KiB buffer, in L2 like the daemon's pool chunks (256 KiB), so the
//! figures are the cipher's, not the memory's.

use std::hint::black_box;
use std::time::{Duration, Instant};

use aes::cipher::KeyInit;
use openssl::cipher::Cipher;
use openssl::cipher_ctx::CipherCtx;
use ublk_crypt_crypto::{CipherSpec, Key, SectorCipher, SectorLayout};

const BUF: usize = 64 * 1024;

struct Row {
    name: String,
    ours: f64,
    openssl: f64,
    xts_mode: f64,
}

/// Runs `f` over the buffer repeatedly for about `secs`, best of three, returns GB/s.
fn measure(secs: f64, mut f: impl FnMut(&mut [u8])) -> f64 {
    let mut buf = vec![0x5au8; BUF];
    for _ in 0..64 {
        f(&mut buf); // warm up: caches, CPU frequency
    }
    let mut best = 0f64;
    for _ in 0..3 {
        let start = Instant::now();
        let mut bytes = 0usize;
        while start.elapsed() < Duration::from_secs_f64(secs / 3.0) {
            for _ in 0..16 {
                f(&mut buf);
                bytes += BUF;
            }
        }
        black_box(&buf);
        best = best.max(bytes as f64 / start.elapsed().as_secs_f64() / 1e9);
    }
    best
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let secs = args
        .iter()
        .position(|a| a == "--seconds")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.5f64);
    let markdown = args.iter().any(|a| a == "--markdown");

    let mut rows = Vec::new();
    for key_bits in [512usize, 256] {
        let key: Vec<u8> = (0..key_bits / 8).map(|i| (i * 37 + 11) as u8).collect();
        for sector in [512usize, 4096] {
            let spec: CipherSpec = "aes-xts-plain64".parse().unwrap();
            let layout = SectorLayout {
                sector_size: sector as u32,
                ..Default::default()
            };
            let ours = SectorCipher::new(spec, &Key::from_bytes(&key), layout).unwrap();
            let ours = measure(secs, |b| ours.encrypt(0, b).unwrap());

            let cipher = if key_bits == 512 {
                Cipher::aes_256_xts()
            } else {
                Cipher::aes_128_xts()
            };
            let mut ctx = CipherCtx::new().unwrap();
            ctx.encrypt_init(Some(cipher), Some(&key), None).unwrap();
            let openssl = measure(secs, |b| {
                for (k, s) in b.chunks_mut(sector).enumerate() {
                    let mut iv = [0u8; 16];
                    iv[..8].copy_from_slice(&((k * sector / 512) as u64).to_le_bytes());
                    ctx.encrypt_init(None, None, Some(&iv)).unwrap();
                    ctx.cipher_update_inplace(s, s.len()).unwrap();
                }
            });

            let xts_mode = if key_bits == 512 {
                let x = xts_mode::Xts128::new(
                    aes::Aes256::new_from_slice(&key[..32]).unwrap(),
                    aes::Aes256::new_from_slice(&key[32..]).unwrap(),
                );
                measure(secs / 2.0, |b| {
                    x.encrypt_area(b, sector, 0, xts_mode::get_tweak_default)
                })
            } else {
                let x = xts_mode::Xts128::new(
                    aes::Aes128::new_from_slice(&key[..16]).unwrap(),
                    aes::Aes128::new_from_slice(&key[16..]).unwrap(),
                );
                measure(secs / 2.0, |b| {
                    x.encrypt_area(b, sector, 0, xts_mode::get_tweak_default)
                })
            };
            rows.push(Row {
                name: format!("AES-{}-XTS {} B sectors", key_bits / 2, sector),
                ours,
                openssl,
                xts_mode,
            });
        }
    }

    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let ossl = openssl::version::version();
    let backend = ublk_crypt_crypto::aes_backend();
    if markdown {
        println!(
            "CPU: {cpu}; ublk-crypt's AES backend: {backend}; {ossl}; one core, 64 KiB buffer, encrypt, GB/s\n"
        );
        println!("| cipher | ublk-crypt | OpenSSL | ratio | xts-mode crate |");
        println!("|---|---:|---:|---:|---:|");
        for r in &rows {
            println!(
                "| {} | {:.2} | {:.2} | {:.2}× | {:.2} |",
                r.name,
                r.ours,
                r.openssl,
                r.ours / r.openssl,
                r.xts_mode
            );
        }
    } else {
        println!("CPU: {cpu}; ublk-crypt's AES backend: {backend}; {ossl}; one core, 64 KiB buffer, encrypt");
        println!(
            "{:<28} {:>12} {:>12} {:>8} {:>14}",
            "cipher", "ours GB/s", "OpenSSL GB/s", "ratio", "xts-mode GB/s"
        );
        for r in &rows {
            println!(
                "{:<28} {:>12.2} {:>12.2} {:>7.2}x {:>14.2}",
                r.name,
                r.ours,
                r.openssl,
                r.ours / r.openssl,
                r.xts_mode
            );
        }
    }
}
