//! The sector cipher: dm-crypt's per-sector encryption with its IV arithmetic.

use aes::{Aes128, Aes192, Aes256};

use crate::cbc::CbcEssiv;
use crate::xts::AesCipher;
use crate::{xts_tier, ChainMode, CipherSpec, CryptoError, IvMode, Key, XtsCipher, XtsTier};

/// dm-crypt counts sectors in 512-byte units whatever the encryption sector size.
pub const SECTOR_SHIFT: u32 = 9;

/// How sectors are laid out and numbered for the IV, as in dm-crypt's table line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SectorLayout {
    /// Encryption sector size in bytes: 512, 1024, 2048 or 4096 (`--sector-size`).
    pub sector_size: u32,
    /// dm-crypt's `iv_large_sectors`: the IV counts `sector_size` units instead of 512-byte
    /// units. Off in cryptsetup plain mode unless `--iv-large-sectors` is given.
    pub iv_large_sectors: bool,
    /// Added to every IV, in 512-byte sectors (cryptsetup plain `--skip`, dm-crypt `iv_offset`).
    pub iv_offset: u64,
}

impl Default for SectorLayout {
    fn default() -> Self {
        SectorLayout {
            sector_size: 512,
            iv_large_sectors: false,
            iv_offset: 0,
        }
    }
}

impl SectorLayout {
    /// Checks the sector size and, with `iv_large_sectors`, the IV offset's alignment.
    pub fn validate(&self) -> Result<(), CryptoError> {
        if !matches!(self.sector_size, 512 | 1024 | 2048 | 4096) {
            return Err(CryptoError::SectorSize(self.sector_size));
        }
        let units = u64::from(self.sector_size >> SECTOR_SHIFT);
        if self.iv_large_sectors && !self.iv_offset.is_multiple_of(units) {
            return Err(CryptoError::IvOffsetAlignment {
                iv_offset: self.iv_offset,
                sector_size: self.sector_size,
            });
        }
        Ok(())
    }
}

enum Engine {
    Xts(Box<XtsCipher>),
    /// CBC-ESSIV on a fused tier (AES-128/192/256).
    #[cfg(target_arch = "x86_64")]
    CbcFused(Box<crate::xts_x86::FusedCbc>),
    Cbc128(Box<CbcEssiv<Aes128>>),
    Cbc192(Box<CbcEssiv<Aes192>>),
    Cbc256(Box<CbcEssiv<Aes256>>),
}

/// Encrypts and decrypts whole sectors in place exactly as dm-crypt does for the same cipher
/// spec, key and layout.
///
/// It holds expanded AES round keys (zeroized on drop by the `aes` crate) but not the key
/// itself. It is `Send + Sync` and never allocates after construction, so one instance serves
/// every queue thread of the daemon.
pub struct SectorCipher {
    engine: Engine,
    spec: CipherSpec,
    layout: SectorLayout,
}

impl std::fmt::Debug for SectorCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SectorCipher")
            .field("spec", &self.spec.to_string())
            .field("layout", &self.layout)
            .finish_non_exhaustive()
    }
}

impl SectorCipher {
    /// A sector cipher on this process's tier ([`crate::xts_tier`]).
    pub fn new(spec: CipherSpec, key: &Key, layout: SectorLayout) -> Result<Self, CryptoError> {
        SectorCipher::with_xts_tier(spec, key, layout, xts_tier())
    }

    /// A sector cipher on exactly `tier` (tests and benchmarks of each tier; an error if the
    /// CPU cannot run it). The tier applies to CBC-ESSIV too.
    pub fn with_xts_tier(
        spec: CipherSpec,
        key: &Key,
        layout: SectorLayout,
        tier: XtsTier,
    ) -> Result<Self, CryptoError> {
        layout.validate()?;
        let k = key.as_bytes();
        spec.check_key_len(k.len())?;
        let engine = match spec.chain() {
            ChainMode::Xts => Engine::Xts(Box::new(XtsCipher::with_tier(k, tier)?)),
            ChainMode::Cbc if tier == XtsTier::Portable => match k.len() {
                16 => Engine::Cbc128(Box::new(CbcEssiv::new(k))),
                24 => Engine::Cbc192(Box::new(CbcEssiv::new(k))),
                _ => Engine::Cbc256(Box::new(CbcEssiv::new(k))),
            },
            ChainMode::Cbc => Self::fused_cbc(k, tier)?,
        };
        Ok(SectorCipher {
            engine,
            spec,
            layout,
        })
    }

    #[cfg(target_arch = "x86_64")]
    fn fused_cbc(k: &[u8], tier: XtsTier) -> Result<Engine, CryptoError> {
        use sha2::{Digest, Sha256};
        use zeroize::Zeroize;
        let mut salt: [u8; 32] = Sha256::digest(k).into();
        let fused = crate::xts_x86::X86Tier::from_tier(tier)
            .and_then(|t| crate::xts_x86::FusedCbc::new(k, &salt, t));
        salt.zeroize();
        fused
            .map(|f| Engine::CbcFused(Box::new(f)))
            .ok_or(CryptoError::XtsTierUnsupported(tier))
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn fused_cbc(_k: &[u8], tier: XtsTier) -> Result<Engine, CryptoError> {
        Err(CryptoError::XtsTierUnsupported(tier))
    }

    /// The XTS tier this cipher runs on; `None` for CBC.
    pub fn xts_tier(&self) -> Option<XtsTier> {
        match &self.engine {
            Engine::Xts(x) => Some(x.tier()),
            _ => None,
        }
    }

    /// The tier this cipher runs on, XTS or CBC (CBC's fused tiers decrypt wide and encrypt
    /// eight sector chains at a time with AES-NI; its `portable` tier is the `aes` crate).
    pub fn tier(&self) -> XtsTier {
        match &self.engine {
            Engine::Xts(x) => x.tier(),
            #[cfg(target_arch = "x86_64")]
            Engine::CbcFused(c) => c.tier().tier(),
            _ => XtsTier::Portable,
        }
    }

    pub fn spec(&self) -> CipherSpec {
        self.spec
    }

    pub fn layout(&self) -> SectorLayout {
        self.layout
    }

    pub fn sector_size(&self) -> usize {
        self.layout.sector_size as usize
    }

    /// Encrypts `data` in place. `sector` is the position of `data` on the device in 512-byte
    /// units (what ublk and the block layer give), aligned to the sector size; `data` is a whole
    /// number of sectors.
    pub fn encrypt(&self, sector: u64, data: &mut [u8]) -> Result<(), CryptoError> {
        self.crypt(sector, data, true)
    }

    /// Decrypts `data` in place; same conventions as [`SectorCipher::encrypt`].
    pub fn decrypt(&self, sector: u64, data: &mut [u8]) -> Result<(), CryptoError> {
        self.crypt(sector, data, false)
    }

    /// dm-crypt's IV sector for the k-th sector of an IO starting at 512-byte sector `sector`:
    /// `(sector + k·units + iv_offset)`, shifted down to sector-size units with
    /// `iv_large_sectors`.
    #[inline(always)]
    fn iv_sector(&self, sector: u64, k: usize) -> u64 {
        let units_shift = self.layout.sector_size.trailing_zeros() - SECTOR_SHIFT;
        let s = sector
            .wrapping_add((k as u64) << units_shift)
            .wrapping_add(self.layout.iv_offset);
        if self.layout.iv_large_sectors {
            s >> units_shift
        } else {
            s
        }
    }

    #[inline(always)]
    fn iv_bytes(&self, iv_sector: u64) -> [u8; 16] {
        let mut iv = [0u8; 16];
        match self.spec.iv() {
            IvMode::Plain => iv[..4].copy_from_slice(&(iv_sector as u32).to_le_bytes()),
            IvMode::Plain64 | IvMode::EssivSha256 => {
                iv[..8].copy_from_slice(&iv_sector.to_le_bytes())
            }
            IvMode::Plain64Be => iv[8..].copy_from_slice(&iv_sector.to_be_bytes()),
        }
        iv
    }

    fn crypt(&self, sector: u64, data: &mut [u8], encrypt: bool) -> Result<(), CryptoError> {
        let ss = self.sector_size();
        let units = (ss >> SECTOR_SHIFT) as u64;
        if !data.len().is_multiple_of(ss) || !sector.is_multiple_of(units) {
            return Err(CryptoError::Misaligned {
                sector,
                len: data.len(),
                sector_size: self.layout.sector_size,
            });
        }
        let iv_of = |k: usize| self.iv_bytes(self.iv_sector(sector, k));
        match &self.engine {
            Engine::Xts(x) => x.crypt(data, ss, iv_of, encrypt)?,
            #[cfg(target_arch = "x86_64")]
            Engine::CbcFused(c) => c.crypt(data, ss, iv_of, encrypt),
            Engine::Cbc128(c) => cbc(c, data, ss, iv_of, encrypt),
            Engine::Cbc192(c) => cbc(c, data, ss, iv_of, encrypt),
            Engine::Cbc256(c) => cbc(c, data, ss, iv_of, encrypt),
        }
        Ok(())
    }
}

#[inline(always)]
fn cbc<C>(
    c: &CbcEssiv<C>,
    data: &mut [u8],
    ss: usize,
    iv_of: impl Fn(usize) -> [u8; 16],
    encrypt: bool,
) where
    C: AesCipher,
{
    if encrypt {
        c.encrypt(data, ss, iv_of)
    } else {
        c.decrypt(data, ss, iv_of)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cipher(spec: &str, layout: SectorLayout) -> SectorCipher {
        let key: Vec<u8> = (0..64u8).collect();
        let spec: CipherSpec = spec.parse().unwrap();
        let len = *spec.allowed_key_bits().last().unwrap() / 8;
        SectorCipher::new(spec, &Key::from_bytes(&key[..len]), layout).unwrap()
    }

    #[test]
    fn iv_arithmetic_matches_dm_crypt() {
        let small = cipher(
            "aes-xts-plain64",
            SectorLayout {
                iv_offset: 5,
                ..Default::default()
            },
        );
        assert_eq!(small.iv_sector(100, 0), 105);
        assert_eq!(small.iv_sector(100, 3), 108);
        // 4 KiB sectors without iv_large_sectors still count 512-byte units (LUKS2, cryptsetup).
        let big = SectorLayout {
            sector_size: 4096,
            iv_large_sectors: false,
            iv_offset: 16,
        };
        let big = cipher("aes-xts-plain64", big);
        assert_eq!(big.iv_sector(8, 0), 24);
        assert_eq!(big.iv_sector(8, 1), 32);
        let large = SectorLayout {
            sector_size: 4096,
            iv_large_sectors: true,
            iv_offset: 16,
        };
        let large = cipher("aes-xts-plain64", large);
        assert_eq!(large.iv_sector(8, 0), 3);
        assert_eq!(large.iv_sector(8, 1), 4);
    }

    #[test]
    fn iv_encodings() {
        let c = cipher("aes-xts-plain", SectorLayout::default());
        let mut e = [0u8; 16];
        e[..4].copy_from_slice(&[0x04, 0x03, 0x02, 0x01]);
        assert_eq!(
            c.iv_bytes(0x0506_0708_0102_0304),
            e,
            "plain truncates to 32 bits"
        );
        let c = cipher("aes-xts-plain64", SectorLayout::default());
        let mut e = [0u8; 16];
        e[..8].copy_from_slice(&0x0506_0708_0102_0304u64.to_le_bytes());
        assert_eq!(c.iv_bytes(0x0506_0708_0102_0304), e);
        let c = cipher("aes-xts-plain64be", SectorLayout::default());
        let mut e = [0u8; 16];
        e[8..].copy_from_slice(&[5, 6, 7, 8, 1, 2, 3, 4]);
        assert_eq!(c.iv_bytes(0x0506_0708_0102_0304), e);
    }

    #[test]
    fn rejects_bad_layouts_and_keys() {
        let spec: CipherSpec = "aes-xts-plain64".parse().unwrap();
        let key = Key::from_bytes(&[7u8; 64]);
        assert_eq!(
            SectorCipher::new(spec, &key, SectorLayout::default()).unwrap_err(),
            CryptoError::XtsEqualHalves
        );
        let key: Vec<u8> = (0..64u8).collect();
        let key = Key::from_bytes(&key);
        let bad = SectorLayout {
            sector_size: 8192,
            ..Default::default()
        };
        assert!(SectorCipher::new(spec, &key, bad).is_err());
        let bad = SectorLayout {
            sector_size: 4096,
            iv_large_sectors: true,
            iv_offset: 3,
        };
        assert!(SectorCipher::new(spec, &key, bad).is_err());
        let short = Key::from_bytes(&key.as_bytes()[..20]);
        assert!(SectorCipher::new(spec, &short, SectorLayout::default()).is_err());
    }

    #[test]
    fn rejects_misaligned_io() {
        let c = cipher(
            "aes-xts-plain64",
            SectorLayout {
                sector_size: 4096,
                ..Default::default()
            },
        );
        let mut buf = vec![0u8; 4096];
        assert!(c.encrypt(1, &mut buf).is_err());
        assert!(c.encrypt(0, &mut buf[..512]).is_err());
        assert!(c.encrypt(8, &mut buf).is_ok());
    }

    #[test]
    fn round_trips_every_spec_and_size() {
        for spec in CipherSpec::SUPPORTED {
            for ss in [512u32, 1024, 2048, 4096] {
                let c = cipher(
                    spec,
                    SectorLayout {
                        sector_size: ss,
                        ..Default::default()
                    },
                );
                let orig: Vec<u8> = (0..65536u32).map(|i| (i * 7 + 3) as u8).collect();
                let mut buf = orig.clone();
                c.encrypt(64, &mut buf).unwrap();
                assert_ne!(buf, orig);
                c.decrypt(64, &mut buf).unwrap();
                assert_eq!(buf, orig, "{spec} {ss}");
            }
        }
    }
}
