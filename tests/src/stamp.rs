//! The page stamp's marker, in one place: `page-hog` writes it at the start of every stamped
//! page, and the plaintext scans of the OOM torture and the demo look for it on the swap
//! backing, where encryption must have hidden every copy.
//!
//! Only the XOR-masked form is a constant: unmasked at run time (through `black_box`, so the
//! optimizer cannot fold the plaintext back into a binary), the only plaintext copies in a
//! guest are the stamped pages themselves, and the scan's positive control (pages written raw
//! behind the swap area) must be the only stamps found on the backing.

/// The XOR mask of [`MAGIC_MASKED`].
pub const MASK: u8 = 0xa5;

/// The 16-byte marker, masked. `masked` runs at compile time: the plaintext literal is not in
/// any binary.
pub const MAGIC_MASKED: [u8; 16] = masked(*b"PAGE-HOG-STAMP:v");

const fn masked(m: [u8; 16]) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        out[i] = m[i] ^ MASK;
        i += 1;
    }
    out
}

/// The marker in plaintext, made at run time.
pub fn magic() -> [u8; 16] {
    let mask = std::hint::black_box(MASK);
    MAGIC_MASKED.map(|b| b ^ mask)
}

/// Count of [`magic`] occurrences in `data`, at any byte offset.
pub fn count_stamps(data: &[u8]) -> usize {
    let m = magic();
    let head = u64::from_le_bytes(m[..8].try_into().unwrap());
    let mut n = 0;
    let mut i = 0;
    while i + 16 <= data.len() {
        match data[i..data.len() - 15].iter().position(|&b| b == m[0]) {
            None => break,
            Some(p) => {
                let j = i + p;
                if u64::from_le_bytes(data[j..j + 8].try_into().unwrap()) == head
                    && data[j + 8..j + 16] == m[8..]
                {
                    n += 1;
                }
                i = j + 1;
            }
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_finds_every_marker_at_any_offset() {
        let m = magic();
        assert_eq!(&m, b"PAGE-HOG-STAMP:v");
        assert_ne!(&MAGIC_MASKED, b"PAGE-HOG-STAMP:v");
        let mut d = vec![0u8; 10_000];
        for off in [0, 17, 4096, 9984] {
            d[off..off + 16].copy_from_slice(&m);
        }
        assert_eq!(count_stamps(&d), 4);
        // A cut marker is not one.
        assert_eq!(count_stamps(&d[..4111]), 2);
        assert_eq!(count_stamps(&d[..4112]), 3);
        assert_eq!(count_stamps(&d[1..]), 3);
        d[4100] ^= 1;
        assert_eq!(count_stamps(&d), 3);
    }
}
