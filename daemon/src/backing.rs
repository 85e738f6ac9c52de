//! The backing store: a block device or a regular file holding the ciphertext.
//!
//! It is opened with `O_DIRECT` so that writes under memory pressure never need page-cache
//! pages (the whole point of a swap device is that there are none to spare), and exclusively:
//! `O_EXCL` on a block device (fails if it is mounted or held by dm-crypt or another
//! ublk-crypt), a non-blocking `flock` on a file.
//!
//! A standby (`standby.rs`) cannot open it exclusively while the daemon it stands by for holds
//! it: it opens it shared ([`Backing::open_for_standby`]) and claims it ([`Backing::claim`])
//! the moment it has taken the device over.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use nix::fcntl::{Flock, FlockArg};

pub struct Backing {
    /// Held open for the device's lifetime; for a file, the `Flock` keeps it exclusive.
    handle: Handle,
    pub path: PathBuf,
    /// Size in bytes.
    pub size: u64,
    pub block_device: bool,
    /// The backing's logical block size: O_DIRECT IO must be aligned to it.
    pub logical_block_size: u32,
    /// Whether `O_DIRECT` is in effect (tmpfs and some file systems refuse it).
    pub direct: bool,
}

enum Handle {
    Device(File),
    File(Flock<File>),
    /// Opened by a standby: not exclusive until [`Backing::claim`].
    Shared(File),
}

/// What keeps a claimed backing exclusive: held for the rest of the process.
pub struct Claim {
    _hold: Handle,
}

impl Backing {
    /// Opens the backing exclusively: the daemon that serves it.
    pub fn open(path: &Path, readonly: bool) -> Result<Backing> {
        Self::open_with(path, readonly, true)
    }

    /// Opens the backing without claiming it: a standby, while the daemon holds it.
    pub fn open_for_standby(path: &Path, readonly: bool) -> Result<Backing> {
        Self::open_with(path, readonly, false)
    }

    /// Makes a standby's backing exclusive once it serves the device (the daemon that held it
    /// is gone): an `O_EXCL` open of the block device, or the `flock` on the file.
    pub fn claim(&self) -> Result<Claim> {
        let Handle::Shared(file) = &self.handle else {
            bail!("the backing is claimed already");
        };
        let path = self.path.display();
        let hold = if self.block_device {
            Handle::Device(
                OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_EXCL | libc::O_CLOEXEC)
                    .open(&self.path)
                    .with_context(|| format!("cannot claim backing {path}"))?,
            )
        } else {
            // A duplicate shares the open file description, so this locks the one in use.
            Handle::File(
                Flock::lock(file.try_clone()?, FlockArg::LockExclusiveNonblock)
                    .map_err(|(_, e)| anyhow::anyhow!("cannot lock backing {path}: {e}"))?,
            )
        };
        Ok(Claim { _hold: hold })
    }

    fn open_with(path: &Path, readonly: bool, exclusive: bool) -> Result<Backing> {
        let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                anyhow::anyhow!("backing {} does not exist", path.display())
            }
            _ => anyhow::anyhow!("cannot stat backing {}: {e}", path.display()),
        })?;
        let block_device = meta.file_type().is_block_device();
        if !block_device && !meta.file_type().is_file() {
            bail!(
                "backing {} is neither a block device nor a regular file",
                path.display()
            );
        }
        let open = |direct: bool| {
            let mut flags = 0;
            if direct {
                flags |= libc::O_DIRECT;
            }
            if block_device && exclusive {
                flags |= libc::O_EXCL;
            }
            OpenOptions::new()
                .read(true)
                .write(!readonly)
                .custom_flags(flags | libc::O_CLOEXEC)
                .open(path)
        };
        let (mut file, direct) = match open(true) {
            Ok(f) => (f, true),
            // Warned about once the device is live (see device.rs), not here: a failed open
            // must print exactly one line.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && !block_device => {
                (open(false)?, false)
            }
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => bail!(
                "backing {} is in use (mounted, or held by dm-crypt or another ublk-crypt)",
                path.display()
            ),
            Err(e) => {
                return Err(e).with_context(|| format!("cannot open backing {}", path.display()))
            }
        };
        let size = file
            .seek(SeekFrom::End(0))
            .with_context(|| format!("cannot size backing {}", path.display()))?;
        let logical_block_size = if block_device {
            logical_block_size(meta.rdev()).unwrap_or(512)
        } else if direct {
            direct_io_alignment(&file)
        } else {
            512
        };
        let handle = if !exclusive {
            Handle::Shared(file)
        } else if block_device {
            Handle::Device(file)
        } else {
            Handle::File(
                Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
                    if e == nix::errno::Errno::EWOULDBLOCK {
                        anyhow::anyhow!(
                            "backing {} is in use by another ublk-crypt (it holds its lock)",
                            path.display()
                        )
                    } else {
                        anyhow::anyhow!("cannot lock backing {}: {e}", path.display())
                    }
                })?,
            )
        };
        Ok(Backing {
            handle,
            path: path.to_path_buf(),
            size,
            block_device,
            logical_block_size,
            direct,
        })
    }

    pub fn file(&self) -> &File {
        match &self.handle {
            Handle::Device(f) | Handle::Shared(f) => f,
            Handle::File(f) => f,
        }
    }
}

/// The smallest O_DIRECT transfer a file accepts: the logical block size of the device under
/// its file system (4096 on a 4Kn disk or a `losetup -b 4096` loop), found by trying aligned
/// reads of 512, 1024, ... bytes at offset 0: the kernel checks alignment before anything else
/// (and before end of file), so the first size that is not refused with EINVAL is the one.
/// Asking the file system instead (`statx` `STATX_DIOALIGN`) is not answered by every file
/// system of 6.12, and the device under it is not known for some (btrfs, overlayfs).
fn direct_io_alignment(file: &File) -> u32 {
    use std::os::unix::fs::FileExt;
    const MAX: usize = 64 << 10;
    // A buffer aligned for any of the sizes tried (O_DIRECT also wants aligned memory).
    let mut buf = vec![0u8; 2 * MAX];
    let at = buf.as_ptr().align_offset(MAX);
    let mut size = 512;
    while size < MAX {
        match file.read_at(&mut buf[at..at + size], 0) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => size *= 2,
            _ => break,
        }
    }
    size as u32
}

/// `/sys/dev/block/MAJ:MIN/queue/logical_block_size`, or the parent's for a partition.
fn logical_block_size(rdev: u64) -> Option<u32> {
    let (maj, min) = (libc::major(rdev), libc::minor(rdev));
    let base = PathBuf::from(format!("/sys/dev/block/{maj}:{min}"));
    for p in [
        base.join("queue/logical_block_size"),
        base.join("../queue/logical_block_size"),
    ] {
        if let Ok(s) = std::fs::read_to_string(&p) {
            if let Ok(v) = s.trim().parse() {
                return Some(v);
            }
        }
    }
    None
}

/// Where the encrypted data lives on the backing and how big the device is, validated the way
/// dm-crypt validates its table line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Byte offset of device sector 0 on the backing (`--offset` × 512).
    pub data_offset: u64,
    /// Device size in bytes.
    pub size: u64,
    /// The device's logical block size: the encryption sector, or the backing's logical block
    /// size where that is larger. dm-crypt stacks the limits the same way: `--sector-size 512`
    /// on a 4096-byte-sector disk is a device of 4096-byte blocks whose data is still
    /// encrypted in 512-byte sectors (the same bytes on disk), and every request the kernel
    /// sends is then aligned for the backing's O_DIRECT.
    pub block_size: u32,
}

impl Geometry {
    pub fn new(
        backing_size: u64,
        offset_sectors: u64,
        size_sectors: Option<u64>,
        sector_size: u32,
        backing_block_size: u32,
        path: &Path,
    ) -> Result<Geometry> {
        let block_size = sector_size.max(backing_block_size);
        let bs = u64::from(block_size);
        // Name the constraint that bites: the sector size, or the backing's block size.
        let unit = if block_size == sector_size {
            format!("{sector_size}-byte sector size")
        } else {
            format!("{block_size}-byte logical block size of {}", path.display())
        };
        let data_offset = offset_sectors
            .checked_mul(512)
            .context("--offset is too large")?;
        if data_offset >= backing_size {
            bail!(
                "--offset {offset_sectors} sectors is past the end of {} ({} sectors)",
                path.display(),
                backing_size / 512
            );
        }
        if data_offset % bs != 0 {
            bail!("--offset {offset_sectors} sectors is not a multiple of the {unit}");
        }
        let available = backing_size - data_offset;
        let size = match size_sectors {
            Some(s) => {
                let bytes = s.checked_mul(512).context("--size is too large")?;
                if bytes > available {
                    bail!(
                        "--size {s} sectors exceeds what {} holds after the offset ({} sectors)",
                        path.display(),
                        available / 512
                    );
                }
                bytes
            }
            None => available,
        };
        if size < bs {
            bail!(
                "backing {} is too small: {size} bytes after the offset, less than one {block_size}-byte block",
                path.display()
            );
        }
        if size % bs != 0 {
            if size_sectors.is_some() {
                bail!(
                    "--size {} sectors is not a multiple of the {unit}",
                    size >> 9
                );
            }
            bail!(
                "backing {} data area ({size} bytes) is not a multiple of the {unit}",
                path.display()
            );
        }
        Ok(Geometry {
            data_offset,
            size,
            block_size,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo(size: u64, off: u64, sz: Option<u64>, ss: u32) -> Result<Geometry> {
        Geometry::new(size, off, sz, ss, 512, Path::new("/b"))
    }

    #[test]
    fn geometry_like_dm_crypt() {
        assert_eq!(geo(1 << 20, 0, None, 512).unwrap().size, 1 << 20);
        let g = geo(1 << 20, 8, None, 4096).unwrap();
        assert_eq!((g.data_offset, g.size), (4096, (1 << 20) - 4096));
        assert_eq!(geo(1 << 20, 0, Some(100), 512).unwrap().size, 51200);
    }

    #[test]
    fn geometry_errors_name_the_problem() {
        let e = |r: Result<Geometry>| r.unwrap_err().to_string();
        assert!(e(geo(1 << 20, 4096, None, 512)).contains("past the end"));
        assert!(e(geo(1 << 20, 1, None, 4096)).contains("not a multiple"));
        assert!(e(geo((1 << 20) + 512, 0, None, 4096)).contains("not a multiple of the 4096"));
        assert!(e(geo(1 << 20, 0, Some(1 << 20), 512)).contains("exceeds"));
        assert!(e(geo(1024, 0, None, 4096)).contains("too small"));
        let on_4k = |off, sz| Geometry::new(1 << 20, off, sz, 512, 4096, Path::new("/b"));
        assert!(e(on_4k(1, None)).contains("4096-byte logical block size of /b"));
        assert!(e(on_4k(0, Some(9))).contains("--size 9 sectors is not a multiple"));
    }

    #[test]
    fn a_backing_with_larger_blocks_raises_the_device_block_size() {
        // dm-crypt's stacking: 512-byte encryption sectors on a 4096-byte-block disk.
        let g = Geometry::new(1 << 20, 8, None, 512, 4096, Path::new("/b")).unwrap();
        assert_eq!(
            (g.data_offset, g.size, g.block_size),
            (4096, (1 << 20) - 4096, 4096)
        );
        assert_eq!(geo(1 << 20, 0, None, 4096).unwrap().block_size, 4096);
        assert_eq!(geo(1 << 20, 0, None, 512).unwrap().block_size, 512);
    }

    #[test]
    fn a_file_on_this_machine_takes_512_byte_direct_io() {
        // The probe on a real file: tmpfs refuses O_DIRECT (then nothing is probed), a disk
        // file system with 512-byte logical blocks answers 512. The 4096 case is the VM's.
        let p = std::env::temp_dir().join(format!("ublk-crypt-dio-{}", std::process::id()));
        std::fs::write(&p, vec![0u8; 8192]).unwrap();
        let b = Backing::open(&p, false).unwrap();
        assert!([512, 1024, 2048, 4096].contains(&b.logical_block_size));
        drop(b);
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn missing_backing_is_a_clear_error() {
        let e = Backing::open(Path::new("/nonexistent/backing"), false)
            .err()
            .unwrap();
        assert_eq!(e.to_string(), "backing /nonexistent/backing does not exist");
    }

    #[test]
    fn a_file_backing_is_exclusive() {
        let p = std::env::temp_dir().join(format!("ublk-crypt-backing-{}", std::process::id()));
        std::fs::write(&p, vec![0u8; 8192]).unwrap();
        let first = Backing::open(&p, false).unwrap();
        assert_eq!(first.size, 8192);
        let e = Backing::open(&p, false).err().unwrap().to_string();
        assert!(e.contains("in use"), "{e}");
        drop(first);
        assert!(Backing::open(&p, false).is_ok());
        std::fs::remove_file(&p).unwrap();
    }
}
