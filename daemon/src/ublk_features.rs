//! The ublk features the running kernel offers (`UBLK_U_CMD_GET_FEATURES`) and the ones this
//! device uses (its `ublksrv_ctrl_dev_info.flags`), by name, for `status` and the start-up log.
//!
//! Why: the same binary runs on Debian 12's 6.12 and on the newest kernels, which add the
//! features the IO path may use when present (batched IO commands, per-IO daemons, the swap
//! flag on requests). An admin comparing two machines, or a bug report, needs to see which
//! kernel-side path a device is on without reading the kernel's version tables.

use serde::{Deserialize, Serialize};

/// `UBLK_F_*` bit → name, from the newest `linux/ublk_cmd.h` (Debian unstable's
/// `linux-libc-dev`, 7.2). Bits the kernel reports that this table lacks print as `bit<N>`.
const NAMES: &[(u32, &str)] = &[
    (0, "SUPPORT_ZERO_COPY"),
    (1, "URING_CMD_COMP_IN_TASK"),
    (2, "NEED_GET_DATA"),
    (3, "USER_RECOVERY"),
    (4, "USER_RECOVERY_REISSUE"),
    (5, "UNPRIVILEGED_DEV"),
    (6, "CMD_IOCTL_ENCODE"),
    (7, "USER_COPY"),
    (8, "ZONED"),
    (9, "USER_RECOVERY_FAIL_IO"),
    (10, "UPDATE_SIZE"),
    (11, "AUTO_BUF_REG"),
    (12, "QUIESCE"),
    (13, "PER_IO_DAEMON"),
    (14, "BUF_REG_OFF_DAEMON"),
    (15, "BATCH_IO"),
    (16, "INTEGRITY"),
    (17, "SAFE_STOP_DEV"),
    (18, "NO_AUTO_PART_SCAN"),
    (19, "SHMEM_ZC"),
];

/// One device's view of ublk's features.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct UblkFeatures {
    /// What the kernel's driver offers (`UBLK_U_CMD_GET_FEATURES`; empty if it cannot say).
    pub offered: Vec<String>,
    /// What this device was created with (its flags as the kernel keeps them).
    pub in_use: Vec<String>,
    pub offered_bits: u64,
    pub in_use_bits: u64,
}

impl UblkFeatures {
    pub fn new(offered_bits: u64, in_use_bits: u64) -> UblkFeatures {
        UblkFeatures {
            offered: names(offered_bits),
            in_use: names(in_use_bits),
            offered_bits,
            in_use_bits,
        }
    }

    /// Whether the kernel offers `bit` (a `UBLK_F_*` value).
    pub fn offers(&self, bit: u64) -> bool {
        self.offered_bits & bit != 0
    }
}

/// The names of the set bits, in bit order (`UBLK_F_` left off).
pub fn names(bits: u64) -> Vec<String> {
    (0..64)
        .filter(|b| bits & (1u64 << b) != 0)
        .map(|b| match NAMES.iter().find(|(n, _)| *n == b) {
            Some((_, name)) => name.to_string(),
            None => format!("bit{b}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_header() {
        assert_eq!(names(0), Vec::<String>::new());
        assert_eq!(
            names(libublk::sys::UBLK_F_USER_COPY as u64 | 1 << 15 | 1 << 40),
            ["USER_COPY", "BATCH_IO", "bit40"]
        );
        // The table agrees with libublk's bindings wherever those have the bit.
        for (bit, name) in [
            (libublk::sys::UBLK_F_USER_RECOVERY, "USER_RECOVERY"),
            (
                libublk::sys::UBLK_F_USER_RECOVERY_REISSUE,
                "USER_RECOVERY_REISSUE",
            ),
            (libublk::sys::UBLK_F_CMD_IOCTL_ENCODE, "CMD_IOCTL_ENCODE"),
        ] {
            assert_eq!(names(bit as u64), [name]);
        }
        let f = UblkFeatures::new(0b1000_1000, 0b1000_0000);
        assert!(f.offers(1 << 3) && !f.offers(1 << 4));
        assert_eq!(f.in_use, ["USER_COPY"]);
    }
}
