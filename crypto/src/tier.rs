//! Which AES-XTS implementation runs: the tier, chosen once per process.
//!
//! The fused cores (src/xts_x86/) come in three widths, and the widest one the CPU supports is
//! the fastest. The choice is made once, at first use, from run-time CPU detection
//! (`is_x86_feature_detected!`, which also checks that the OS saves the vector registers), so
//! one portable binary runs the best code on every machine without `target-cpu=native`.
//!
//! `UBLK_CRYPT_XTS_TIER=portable|aesni|vaes-avx2|vaes-avx512` caps the choice (never raises
//! it beyond what the CPU has), so every tier can be tested and benchmarked on one machine and a
//! suspected fault in a fused core can be ruled out in the field by falling back to the
//! portable path (the `aes` crate), which stays the reference.

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use crate::CryptoError;

/// The environment variable that caps the XTS tier.
pub const XTS_TIER_ENV: &str = "UBLK_CRYPT_XTS_TIER";

/// An AES-XTS implementation, from the slowest to the fastest (the order is used: a cap keeps
/// every tier at or below it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum XtsTier {
    /// The `aes` crate's block functions with tweak passes in Rust: any CPU.
    Portable,
    /// Fused core on AES-NI and PCLMULQDQ, 128-bit registers, eight blocks in flight.
    AesNi,
    /// Fused core on VAES with AVX2, 256-bit registers (two blocks per instruction): Zen 3,
    /// Alder Lake and later, and qemu's `-cpu max`.
    VaesAvx2,
    /// Fused core on VAES, VPCLMULQDQ and AVX-512, 512-bit registers (four blocks per
    /// instruction): Ice Lake and later, Zen 4 and later.
    VaesAvx512,
}

impl XtsTier {
    /// Every tier, slowest first.
    pub const ALL: [XtsTier; 4] = [
        XtsTier::Portable,
        XtsTier::AesNi,
        XtsTier::VaesAvx2,
        XtsTier::VaesAvx512,
    ];

    /// The name used in reports and in [`XTS_TIER_ENV`]: `portable`, `aesni`, `vaes-avx2`,
    /// `vaes-avx512`.
    pub fn name(self) -> &'static str {
        match self {
            XtsTier::Portable => "portable",
            XtsTier::AesNi => "aesni",
            XtsTier::VaesAvx2 => "vaes-avx2",
            XtsTier::VaesAvx512 => "vaes-avx512",
        }
    }

    /// Whether this CPU (and OS) can run the tier.
    pub fn is_supported(self) -> bool {
        match self {
            XtsTier::Portable => true,
            #[cfg(target_arch = "x86_64")]
            _ => crate::xts_x86::X86Tier::from_tier(self).is_some_and(|t| t.is_supported()),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The fastest tier this CPU supports, ignoring [`XTS_TIER_ENV`].
    pub fn detected() -> XtsTier {
        *XtsTier::ALL
            .iter()
            .rev()
            .find(|t| t.is_supported())
            .unwrap_or(&XtsTier::Portable)
    }
}

impl fmt::Display for XtsTier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for XtsTier {
    type Err = CryptoError;

    fn from_str(s: &str) -> Result<Self, CryptoError> {
        XtsTier::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| CryptoError::XtsTier(s.to_string()))
    }
}

/// The tier this process uses: the detected one, capped by [`XTS_TIER_ENV`] when set.
/// Decided at the first call and fixed afterwards. An unknown value in the variable is
/// reported by [`xts_tier_env_error`] and otherwise ignored: a typo must not stop a swap
/// device from starting, and it can only make things slower, never wrong.
pub fn xts_tier() -> XtsTier {
    chosen().0
}

/// The error in [`XTS_TIER_ENV`], if its value is not a tier name (for the daemon to log).
pub fn xts_tier_env_error() -> Option<CryptoError> {
    chosen().1.clone()
}

fn chosen() -> &'static (XtsTier, Option<CryptoError>) {
    static CHOSEN: OnceLock<(XtsTier, Option<CryptoError>)> = OnceLock::new();
    CHOSEN.get_or_init(|| {
        let detected = XtsTier::detected();
        match std::env::var(XTS_TIER_ENV) {
            Ok(v) if !v.is_empty() => match v.parse::<XtsTier>() {
                Ok(cap) => (detected.min(cap), None),
                Err(e) => (detected, Some(e)),
            },
            _ => (detected, None),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_order() {
        for t in XtsTier::ALL {
            assert_eq!(t.name().parse::<XtsTier>().unwrap(), t);
        }
        assert!(XtsTier::Portable < XtsTier::AesNi && XtsTier::VaesAvx2 < XtsTier::VaesAvx512);
        let e = "avx9".parse::<XtsTier>().unwrap_err().to_string();
        assert!(e.contains("avx9") && e.contains("vaes-avx512"), "{e}");
    }

    #[test]
    fn detected_tier_is_supported_and_in_use_is_at_most_detected() {
        assert!(XtsTier::detected().is_supported());
        assert!(xts_tier() <= XtsTier::detected());
        assert!(XtsTier::Portable.is_supported());
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn detection_matches_cpu_flags() {
        let f = |n: &str| match n {
            "aes" => is_x86_feature_detected!("aes"),
            "pclmulqdq" => is_x86_feature_detected!("pclmulqdq"),
            "vaes" => is_x86_feature_detected!("vaes"),
            "avx2" => is_x86_feature_detected!("avx2"),
            "avx512f" => is_x86_feature_detected!("avx512f"),
            _ => unreachable!(),
        };
        assert_eq!(XtsTier::AesNi.is_supported(), f("aes") && f("pclmulqdq"));
        if XtsTier::VaesAvx2.is_supported() {
            assert!(f("vaes") && f("avx2"));
        }
        if XtsTier::VaesAvx512.is_supported() {
            assert!(f("vaes") && f("avx512f"));
        }
    }
}
