//! `ublk-crypt benchmark`: how fast this machine encrypts and decrypts with every supported
//! cipher spec and key size, in the spirit of `cryptsetup benchmark`.
//!
//! It measures [`SectorCipher`] alone — the code the IO path runs on every sector — on one
//! core, in memory, over a 64 KiB buffer (in cache, as the daemon's pool
//! chunks are). No ublk, no storage, no privileges. Like cryptsetup's, the numbers
//! are an upper bound for the device: a real device adds the user copy, the backing IO and the
//! ublk round trips (see `bench/README.md` for device-level numbers next to dm-crypt).

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Args;
use ublk_crypt_crypto::{CipherSpec, Key, SectorCipher, SectorLayout, SECTOR_SHIFT};

/// Bytes encrypted per call: one pool chunk.
const BUFFER_BYTES: usize = 64 << 10;

/// `ublk-crypt benchmark`.
#[derive(Args, Debug, Clone)]
pub struct BenchmarkArgs {
    /// Only this cipher spec (default: every supported one).
    #[arg(long, short = 'c')]
    pub cipher: Option<String>,

    /// Only this key size in bits (default: every size the spec allows).
    #[arg(long, short = 's')]
    pub key_size: Option<usize>,

    /// Encryption sector size in bytes: 512, 1024, 2048 or 4096.
    #[arg(long, default_value_t = 512)]
    pub sector_size: u32,

    /// Total measuring time in seconds, shared by all ciphers and both directions.
    #[arg(long, default_value_t = 1.5)]
    pub seconds: f64,
}

/// One line of the result.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub spec: String,
    pub key_bits: usize,
    /// What ran, in brackets: the tier (`[vaes-avx512]`, `[aesni]`, … see
    /// `UBLK_CRYPT_XTS_TIER`); for CBC with a reminder that its encryption is serial within a
    /// sector (each block needs the previous ciphertext: a few sectors' chains run side by
    /// side, never the wide path), so it stays several times slower than its decryption.
    pub implementation: String,
    /// MiB/s.
    pub encrypt: f64,
    /// MiB/s.
    pub decrypt: f64,
}

/// The (spec, key size) pairs that `args` selects, validated.
pub fn selection(args: &BenchmarkArgs) -> Result<Vec<(CipherSpec, usize)>> {
    let specs: Vec<CipherSpec> = match &args.cipher {
        Some(s) => vec![s.parse()?],
        None => CipherSpec::SUPPORTED
            .iter()
            .map(|s| s.parse().expect("SUPPORTED specs parse"))
            .collect(),
    };
    let mut out = vec![];
    for spec in specs {
        match args.key_size {
            Some(bits) => {
                if !bits.is_multiple_of(8) {
                    bail!("--key-size {bits} is not a whole number of bytes");
                }
                spec.check_key_len(bits / 8)?;
                out.push((spec, bits));
            }
            None => out.extend(spec.allowed_key_bits().iter().map(|&b| (spec, b))),
        }
    }
    Ok(out)
}

/// A fixed, non-secret benchmark key whose XTS halves differ.
fn bench_key(bytes: usize) -> Key {
    let k: Vec<u8> = (0..bytes)
        .map(|i| (i as u8).wrapping_mul(37).wrapping_add(11))
        .collect();
    Key::from_bytes(&k)
}

/// MiB/s of `op` over `buf` for about `time`, walking the sector number forward like a
/// sequential IO stream.
fn measure(cipher: &SectorCipher, buf: &mut [u8], time: Duration, encrypt: bool) -> Result<f64> {
    let step = (buf.len() >> SECTOR_SHIFT) as u64;
    let mut sector = 0u64;
    let mut bytes = 0u64;
    let start = Instant::now();
    loop {
        // Several calls per clock read, so reading the clock costs nothing measurable.
        for _ in 0..4 {
            if encrypt {
                cipher.encrypt(sector, buf)?;
            } else {
                cipher.decrypt(sector, buf)?;
            }
            std::hint::black_box(&mut *buf);
            sector = sector.wrapping_add(step);
            bytes += buf.len() as u64;
        }
        let elapsed = start.elapsed();
        if elapsed >= time {
            return Ok(bytes as f64 / elapsed.as_secs_f64() / f64::from(1u32 << 20));
        }
    }
}

/// Measures every selected pair, calling `each` with each row as soon as it is known.
pub fn run_rows(args: &BenchmarkArgs, mut each: impl FnMut(&Row)) -> Result<Vec<Row>> {
    if !(args.seconds.is_finite() && args.seconds > 0.0 && args.seconds <= 3600.0) {
        bail!("--seconds {} must be between 0 and 3600", args.seconds);
    }
    let layout = SectorLayout {
        sector_size: args.sector_size,
        ..SectorLayout::default()
    };
    layout.validate()?;
    let pairs = selection(args)?;
    let slice = Duration::from_secs_f64(args.seconds / (2 * pairs.len()) as f64);
    // Not zeros: nothing here depends on the data, but nobody has to wonder.
    let mut buf: Vec<u8> = (0..BUFFER_BYTES).map(|i| (i * 7 + 3) as u8).collect();
    let mut rows = vec![];
    for (spec, bits) in pairs {
        let cipher = SectorCipher::new(spec, &bench_key(bits / 8), layout)?;
        // One untimed pass: page faults, frequency ramp-up, cache warm-up.
        cipher.encrypt(0, &mut buf)?;
        let implementation = match cipher.xts_tier() {
            Some(tier) => format!("[{tier}]"),
            None => format!("[{}, enc serial]", cipher.tier()),
        };
        let row = Row {
            spec: spec.to_string(),
            key_bits: bits,
            implementation,
            encrypt: measure(&cipher, &mut buf, slice, true)?,
            decrypt: measure(&cipher, &mut buf, slice, false)?,
        };
        each(&row);
        rows.push(row);
    }
    Ok(rows)
}

/// `ublk-crypt benchmark`: prints a table like `cryptsetup benchmark`'s cipher section.
pub fn benchmark(args: BenchmarkArgs) -> Result<ExitCode> {
    // Validate before printing anything, so bad input is one line on stderr.
    selection(&args)?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "# In memory, one core, {} KiB buffers, {}-byte sectors: an upper bound for a device.",
        BUFFER_BYTES >> 10,
        args.sector_size
    )?;
    writeln!(
        out,
        "#{:>21} {:>6} {:<22} {:>16} {:>16}",
        "Cipher", "Key", " Implementation", "Encryption", "Decryption"
    )?;
    run_rows(&args, |r| {
        let _ = writeln!(
            out,
            "{:>22} {:>5}b {:<22} {:>11.1} MiB/s {:>11.1} MiB/s",
            r.spec, r.key_bits, r.implementation, r.encrypt, r.decrypt
        );
        let _ = out.flush();
    })?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(cipher: Option<&str>, key_size: Option<usize>) -> BenchmarkArgs {
        BenchmarkArgs {
            cipher: cipher.map(str::to_string),
            key_size,
            sector_size: 512,
            seconds: 0.01,
        }
    }

    #[test]
    fn measures_every_spec_and_key_size() {
        let rows = run_rows(&args(None, None), |_| {}).unwrap();
        let got: Vec<(String, usize)> = rows.iter().map(|r| (r.spec.clone(), r.key_bits)).collect();
        let want: Vec<(String, usize)> = [
            ("aes-xts-plain64", 256),
            ("aes-xts-plain64", 512),
            ("aes-xts-plain", 256),
            ("aes-xts-plain", 512),
            ("aes-xts-plain64be", 256),
            ("aes-xts-plain64be", 512),
            ("aes-cbc-essiv:sha256", 128),
            ("aes-cbc-essiv:sha256", 192),
            ("aes-cbc-essiv:sha256", 256),
        ]
        .iter()
        .map(|&(s, b)| (s.to_string(), b))
        .collect();
        assert_eq!(got, want);
        for r in &rows {
            let tier = ublk_crypt_crypto::xts_tier();
            let want = if r.spec.contains("xts") {
                format!("[{tier}]")
            } else {
                format!("[{tier}, enc serial]")
            };
            assert!(r.implementation.contains(&want), "{r:?}");
            // Even an unoptimized build on a slow machine does more than 1 MiB/s.
            assert!(r.encrypt > 1.0 && r.decrypt > 1.0, "{r:?}");
            assert!(r.encrypt.is_finite() && r.decrypt.is_finite(), "{r:?}");
        }
    }

    #[test]
    fn filters_and_sector_sizes() {
        let mut seen = 0;
        let rows = run_rows(
            &BenchmarkArgs {
                sector_size: 4096,
                ..args(Some("aes-xts-plain64"), Some(512))
            },
            |_| seen += 1,
        )
        .unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(seen, 1, "rows are reported as they are measured");
        assert_eq!(
            (rows[0].spec.as_str(), rows[0].key_bits),
            ("aes-xts-plain64", 512)
        );
    }

    #[test]
    fn bad_input_is_a_one_line_error() {
        let cases = [
            (args(Some("twofish-xts-plain64"), None), "twofish"),
            (args(Some("aes-xts-plain64"), Some(384)), "384"),
            (args(None, Some(13)), "13"),
            (
                BenchmarkArgs {
                    sector_size: 3000,
                    ..args(None, None)
                },
                "3000",
            ),
            (
                BenchmarkArgs {
                    seconds: 0.0,
                    ..args(None, None)
                },
                "--seconds",
            ),
        ];
        for (a, needle) in cases {
            let e = format!("{:#}", run_rows(&a, |_| {}).unwrap_err());
            assert!(e.contains(needle), "{e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn benchmark_key_is_valid_for_xts() {
        // XTS refuses keys whose halves are equal; the benchmark key must not be one.
        for bytes in [16, 24, 32, 64] {
            let k = bench_key(bytes);
            let (a, b) = k.as_bytes().split_at(bytes / 2);
            assert_ne!(a, b);
        }
    }
}
