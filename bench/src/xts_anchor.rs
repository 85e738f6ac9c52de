//! The measuring loop and the OpenSSL AES-XTS anchor, shared (by `#[path]`) between
//! `crypto-bench` (linked to the distribution's OpenSSL) and `crypto-bench-openssl`
//! (bench/openssl-newest: the newest OpenSSL, built from source): one binary cannot link two
//! OpenSSLs through the same crate, so the same code is compiled twice.
//!
//! OpenSSL is measured two ways, because they answer different questions:
//! - `ready`: one EVP update per unit on a context initialised once with key and IV, as
//!   `openssl speed -evp aes-256-xts -bytes N` does. OpenSSL still encrypts the tweak on every
//!   call; this is its best case and the figure the targets are set against.
//! - `iv-reset`: a fresh IV per unit (`EVP_CipherInit_ex` with only the IV, then the update),
//!   what sector-by-sector use needs: each sector has its own IV.

use std::hint::black_box;
use std::time::{Duration, Instant};

use openssl::cipher::Cipher;
use openssl::cipher_ctx::CipherCtx;

/// Bytes per pass: 64 KiB, in L1/L2 like the daemon's pool chunks, so the figures are the
/// cipher's, not the memory's.
pub const BUF: usize = 64 * 1024;
/// The unit sizes measured: a 512-byte sector, a 4 KiB sector or page, a 64 KiB request.
pub const UNITS: [usize; 3] = [512, 4096, 65536];

/// Passes over the buffer per timed slice: 512 KiB, some tens of microseconds.
const SLICE_PASSES: usize = 8;

/// Runs `f` over a `BUF`-byte buffer repeatedly for about `secs` and returns the GB/s
/// (10⁹ bytes per second) of the fastest slice of `SLICE_PASSES` passes.
///
/// Why the fastest short slice and not the average: the development machine is shared (VM
/// tests run on the other core, and its threads preempt this one), and a preemption inside a
/// slice only makes that slice slower. A slice of tens of microseconds usually runs
/// undisturbed, so the best slice is the cipher's own speed; every column of the table is
/// measured the same way, so the ratios stay fair.
pub fn measure(secs: f64, mut f: impl FnMut(&mut [u8])) -> f64 {
    let mut buf: Vec<u8> = (0..BUF).map(|i| (i * 7 + 3) as u8).collect();
    for _ in 0..64 {
        f(&mut buf); // warm up: page faults, caches, CPU frequency
    }
    let mut best = f64::MAX;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs_f64(secs) {
        let t = Instant::now();
        for _ in 0..SLICE_PASSES {
            f(&mut buf);
        }
        black_box(&buf);
        best = best.min(t.elapsed().as_secs_f64());
    }
    (SLICE_PASSES * BUF) as f64 / best / 1e9
}

/// How OpenSSL is driven: see the module comment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Way {
    Ready,
    IvReset,
}

impl Way {
    pub fn name(self) -> &'static str {
        match self {
            Way::Ready => "ready",
            Way::IvReset => "iv-reset",
        }
    }
}

/// GB/s of OpenSSL's AES-XTS with `key` (32 or 64 bytes) over `unit`-byte units.
pub fn openssl_xts(key: &[u8], unit: usize, encrypt: bool, way: Way, secs: f64) -> f64 {
    let cipher = if key.len() == 64 {
        Cipher::aes_256_xts()
    } else {
        Cipher::aes_128_xts()
    };
    let mut ctx = CipherCtx::new().unwrap();
    let iv0 = [0u8; 16];
    if encrypt {
        ctx.encrypt_init(Some(cipher), Some(key), Some(&iv0))
            .unwrap();
    } else {
        ctx.decrypt_init(Some(cipher), Some(key), Some(&iv0))
            .unwrap();
    }
    measure(secs, |b| {
        for (k, u) in b.chunks_mut(unit).enumerate() {
            if way == Way::IvReset {
                let mut iv = [0u8; 16];
                iv[..8].copy_from_slice(&((k * unit / 512) as u64).to_le_bytes());
                if encrypt {
                    ctx.encrypt_init(None, None, Some(&iv)).unwrap();
                } else {
                    ctx.decrypt_init(None, None, Some(&iv)).unwrap();
                }
            }
            ctx.cipher_update_inplace(u, u.len()).unwrap();
        }
    })
}

/// The benchmark key: fixed, not secret, halves differ (XTS refuses equal halves).
pub fn bench_key(bytes: usize) -> Vec<u8> {
    (0..bytes).map(|i| (i * 37 + 11) as u8).collect()
}
