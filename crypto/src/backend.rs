//! Which of the `aes` crate's implementations runs on this CPU: what the portable tier runs on
//! (XTS and CBC normally run on a fused core: [`crate::xts_tier`]).
//!
//! The `aes` crate picks its backend at run time through `cpufeatures`: VAES with AVX-512
//! (four blocks per instruction), VAES-256 (two), AES-NI (one), or portable software. The choice
//! decides the speed of every sector cipher here, and it is invisible from outside, so it is
//! reported: the daemon logs it at start-up, the benchmarks print it beside their numbers, and
//! the VM tests check it against the guest CPU's flags. The same `cpufeatures` checks as the
//! `aes` crate's are used, so the answer is the crate's own.
//!
//! One quirk it makes visible: `cpufeatures` 0.3.1 asks for the AVX-512 register state before it
//! reports VAES, so a CPU with VAES and AVX2 but no AVX-512 (Zen 3, Alder Lake, the QEMU TCG CPU
//! of the VM tests) runs AES-NI (RustCrypto/utils#1510). Patching that was measured and dropped:
//! with run-time detection, `aes` 0.9.4's VAES-256 path was 25 % *slower* than AES-NI in the VM
//! (its intrinsics are not inlined into code compiled without the feature), while the same code
//! built with `-C target-feature=+vaes,+avx2` was 15 % faster. Getting the latter at run time
//! needs an `unsafe` call into a `#[target_feature]` function — which the fused XTS cores
//! (src/xts_x86/) now make, with their own cores rather than the `aes` crate's.

/// The AES implementation the `aes` crate uses on this CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AesBackend {
    /// VAES on 512-bit registers (AVX-512).
    Vaes512,
    /// VAES on 256-bit registers (AVX2).
    Vaes256,
    /// AES-NI, one block per instruction.
    AesNi,
    /// Portable constant-time software (no AES instructions).
    Soft,
}

impl AesBackend {
    /// A short name for logs and reports: `vaes512`, `vaes256`, `aes-ni`, `soft`.
    pub fn name(self) -> &'static str {
        match self {
            AesBackend::Vaes512 => "vaes512",
            AesBackend::Vaes256 => "vaes256",
            AesBackend::AesNi => "aes-ni",
            AesBackend::Soft => "soft",
        }
    }
}

impl std::fmt::Display for AesBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(any(target_arch = "x86_64", target_arch = "x86"))]
mod detect {
    // The same feature sets as `aes` 0.9's `Token` (its lib.rs).
    cpufeatures::new!(vaes512, "avx512f", "vaes");
    cpufeatures::new!(vaes256, "vaes");
    cpufeatures::new!(aesni, "aes");

    pub(super) fn backend() -> super::AesBackend {
        use super::AesBackend;
        if vaes512::get() {
            AesBackend::Vaes512
        } else if vaes256::get() {
            AesBackend::Vaes256
        } else if aesni::get() {
            AesBackend::AesNi
        } else {
            AesBackend::Soft
        }
    }
}

/// The AES implementation every [`crate::SectorCipher`] on this CPU runs with.
pub fn aes_backend() -> AesBackend {
    #[cfg(any(target_arch = "x86_64", target_arch = "x86"))]
    {
        detect::backend()
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "x86")))]
    {
        AesBackend::Soft
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The backend is one the CPU has, and the fastest one when AVX-512 and VAES are there;
    /// a CPU with AES-NI never gets the software fallback.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn backend_fits_the_cpu() {
        let has_vaes512 = is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("vaes");
        let b = aes_backend();
        match b {
            AesBackend::Vaes512 => assert!(has_vaes512),
            AesBackend::Vaes256 => {
                assert!(is_x86_feature_detected!("vaes") && is_x86_feature_detected!("avx2"))
            }
            AesBackend::AesNi => assert!(is_x86_feature_detected!("aes") && !has_vaes512),
            AesBackend::Soft => assert!(!is_x86_feature_detected!("aes")),
        }
    }

    #[test]
    fn names() {
        assert_eq!(AesBackend::Vaes256.to_string(), "vaes256");
        assert_eq!(AesBackend::AesNi.name(), "aes-ni");
    }
}
