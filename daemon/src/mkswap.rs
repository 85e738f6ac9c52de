//! `ublk-crypt mkswap NAME`: formats a device as swap only where that destroys nothing.
//!
//! The swap unit used to run `mkswap /dev/ublkb${ID}` on trust: a daemon that failed to start
//! (a duplicate `ID=` in two configs, say) let it format whatever `/dev/ublkbN` was, possibly a
//! data volume. The checks live here, in one place the unit and an admin both use:
//!
//! 1. NAME is a device that a live ublk-crypt daemon serves now: its record, the kernel's
//!    device in state live, served by the pid the record names.
//! 2. Its key is ephemeral (`--key-file /dev/urandom`): nothing written with it can be read after
//!    the device is closed, so there is nothing to destroy.
//! 3. Neither the device nor its backing (at the data offset) holds a file system, LUKS or other
//!    signature, as systemd-cryptsetup checks before it formats a crypttab `swap` volume: with a
//!    fresh key the device reads as noise, and so does ciphertext; a signature means the config
//!    names the wrong disk. An old swap signature is not refused (that is the volume's own).
//!
//! Then the system's `mkswap` does the formatting.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::process::{Command, ExitCode};

use anyhow::{bail, Context, Result};

use crate::{records, ublk};

/// What the probe reads: enough for every signature below (btrfs's is at 64 KiB + 64).
const PROBE_BYTES: usize = 68 << 10;

pub fn mkswap(device: &str, label: Option<&str>) -> Result<ExitCode> {
    let rec = records::resolve(device)?;
    let name = &rec.name;
    let dev = rec.bdev_path();
    let st = ublk::device_state(rec.id)
        .with_context(|| format!("{name}: refusing to mkswap: its device is gone"))?;
    if st.state_name != "live" || !st.daemon_alive || st.pid != rec.pid as i32 {
        bail!(
            "{name}: refusing to mkswap {dev}: it is not served by {name}'s daemon (device {}, pid {})",
            st.state_name,
            st.pid
        );
    }
    if !rec.ephemeral {
        bail!(
            "{name}: refusing to mkswap a device with a persistent key (only one opened with \
             --key-file /dev/urandom, whose data nobody can read after it is closed)"
        );
    }
    if rec.readonly {
        bail!("{name}: refusing to mkswap a read-only device");
    }
    let backing = rec.backing.display().to_string();
    let start = read_start(&backing, rec.offset * 512)?;
    if let Some(sig) = signature(&start) {
        bail!(
            "{name}: refusing to mkswap: backing {backing} holds a signature: {sig} (is the configured backing the right disk?)"
        );
    }
    let start = read_start(&dev, 0)?;
    if let Some(sig) = signature(&start) {
        bail!("{name}: refusing to mkswap: {dev} holds a signature: {sig}");
    }
    let label = label.map_or_else(|| format!("ublk-crypt-{name}"), str::to_string);
    let program = ["/usr/sbin/mkswap", "/sbin/mkswap"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or("mkswap");
    let status = Command::new(program)
        .arg("--label")
        .arg(&label)
        .arg(&dev)
        .status()
        .with_context(|| format!("cannot run {program}"))?;
    Ok(match status.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(c) => ExitCode::from(c.clamp(1, 255) as u8),
        None => ExitCode::FAILURE,
    })
}

/// The first [`PROBE_BYTES`] from `offset` of `path` (fewer if it is shorter).
fn read_start(path: &str, offset: u64) -> Result<Vec<u8>> {
    let f = File::open(path).with_context(|| format!("cannot open {path} to probe it"))?;
    let mut buf = vec![0u8; PROBE_BYTES];
    let mut got = 0;
    while got < buf.len() {
        match f.read_at(&mut buf[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).with_context(|| format!("cannot read {path} to probe it")),
        }
    }
    buf.truncate(got);
    Ok(buf)
}

fn at(buf: &[u8], off: usize, magic: &[u8]) -> bool {
    buf.get(off..off + magic.len()) == Some(magic)
}

fn le32(buf: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(buf.get(off..off + 4)?.try_into().ok()?))
}

fn be32(buf: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_be_bytes(buf.get(off..off + 4)?.try_into().ok()?))
}

/// The file system, volume or partition table whose signature starts `buf`, if any. Every
/// check is at least six bytes of magic, or fewer with fields that must make sense: a fresh
/// random key reads as noise, and one boot in 65 536 must not refuse its swap because two bytes
/// happened to match.
pub fn signature(buf: &[u8]) -> Option<&'static str> {
    let ext_rev = le32(buf, 1024 + 76);
    let ext_log_block = le32(buf, 1024 + 24);
    let xfs_block = be32(buf, 4);
    let found = [
        (at(buf, 0, b"LUKS\xba\xbe"), "LUKS"),
        (
            at(buf, 1024 + 56, &[0x53, 0xef])
                && ext_rev.is_some_and(|r| r <= 1)
                && ext_log_block.is_some_and(|b| b <= 6),
            "ext2/ext3/ext4",
        ),
        (
            at(buf, 0, b"XFSB")
                && xfs_block.is_some_and(|b| b.is_power_of_two() && (512..=65536).contains(&b)),
            "XFS",
        ),
        (at(buf, 65536 + 64, b"_BHRfS_M"), "btrfs"),
        (le32(buf, 1024) == Some(0xF2F5_2010), "F2FS"),
        (at(buf, 3, b"NTFS    "), "NTFS"),
        (at(buf, 3, b"EXFAT   "), "exFAT"),
        (
            at(buf, 82, b"FAT32   ") || at(buf, 54, b"FAT16   ") || at(buf, 54, b"FAT12   "),
            "FAT",
        ),
        (
            at(buf, 32769, b"CD001") && buf.get(32768) == Some(&1),
            "ISO 9660",
        ),
        (
            (0..4).any(|s| at(buf, s * 512, b"LABELONE") && at(buf, s * 512 + 24, b"LVM2 001")),
            "LVM2 physical volume",
        ),
        (
            le32(buf, 0) == Some(0xa92b_4efc) || le32(buf, 4096) == Some(0xa92b_4efc),
            "Linux MD RAID",
        ),
        (at(buf, 512, b"EFI PART"), "GPT partition table"),
    ];
    found
        .into_iter()
        .find(|(hit, _)| *hit)
        .map(|(_, what)| what)
}

/// Whether `buf` starts with a swap area (which mkswap may replace).
pub fn is_swap(buf: &[u8]) -> bool {
    at(buf, 4086, b"SWAPSPACE2") || at(buf, 4086, b"SWAP-SPACE")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(at_: usize, bytes: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; PROBE_BYTES];
        b[at_..at_ + bytes.len()].copy_from_slice(bytes);
        b
    }

    #[test]
    fn signatures_are_found() {
        assert_eq!(signature(&with(0, b"LUKS\xba\xbe\0\x02")), Some("LUKS"));
        let mut ext = with(1080, &[0x53, 0xef]);
        ext[1100] = 1; // s_rev_level: dynamic
        ext[1048] = 2; // 4 KiB blocks
        assert_eq!(signature(&ext), Some("ext2/ext3/ext4"));
        let mut xfs = with(0, b"XFSB");
        xfs[4..8].copy_from_slice(&4096u32.to_be_bytes());
        assert_eq!(signature(&xfs), Some("XFS"));
        assert_eq!(signature(&with(65600, b"_BHRfS_M")), Some("btrfs"));
        assert_eq!(signature(&with(3, b"NTFS    ")), Some("NTFS"));
        assert_eq!(signature(&with(82, b"FAT32   ")), Some("FAT"));
        let mut lvm = with(512, b"LABELONE");
        lvm[536..544].copy_from_slice(b"LVM2 001");
        assert_eq!(signature(&lvm), Some("LVM2 physical volume"));
        assert_eq!(
            signature(&with(512, b"EFI PART")),
            Some("GPT partition table")
        );
        assert_eq!(
            signature(&with(4096, &0xa92b_4efcu32.to_le_bytes())),
            Some("Linux MD RAID")
        );
    }

    #[test]
    fn noise_zeros_and_swap_are_not_refused() {
        assert_eq!(signature(&vec![0u8; PROBE_BYTES]), None);
        assert_eq!(signature(&[]), None, "a short read");
        let swap = with(4086, b"SWAPSPACE2");
        assert!(is_swap(&swap) && signature(&swap).is_none());
        // Two bytes of ext magic in noise: not enough.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut noise: Vec<u8> = (0..PROBE_BYTES)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        noise[1080] = 0x53;
        noise[1081] = 0xef;
        noise[1100..1104].copy_from_slice(&0xdead_beefu32.to_le_bytes());
        assert_eq!(signature(&noise), None);
    }
}
