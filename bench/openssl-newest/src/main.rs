//! `crypto-bench-openssl`: the OpenSSL anchor of `crypto-bench`, linked to the newest OpenSSL
//! built from source. Prints one tab-separated line per measurement for `crypto-bench` to put
//! in its table: `row <key bits> <unit> <enc|dec> <ready|iv-reset> <GB/s>`, after a
//! `version <OpenSSL version>` line.
//!
//! `crypto-bench-openssl [--seconds S]`: S per measurement.

#[path = "../../src/xts_anchor.rs"]
#[allow(dead_code)]
mod xts_anchor;

use xts_anchor::{bench_key, openssl_xts, Way, UNITS};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let secs = args
        .iter()
        .position(|a| a == "--seconds")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.6f64);
    println!("version\t{}", openssl::version::version());
    for key_bits in [512usize, 256] {
        let key = bench_key(key_bits / 8);
        for unit in UNITS {
            for encrypt in [true, false] {
                for way in [Way::Ready, Way::IvReset] {
                    let gbps = openssl_xts(&key, unit, encrypt, way, secs);
                    println!(
                        "row\t{key_bits}\t{unit}\t{}\t{}\t{gbps:.4}",
                        if encrypt { "enc" } else { "dec" },
                        way.name()
                    );
                }
            }
        }
    }
}
