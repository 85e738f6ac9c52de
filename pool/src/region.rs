//! The one memory region behind the pool: mapped, advised, locked and faulted in once.
//!
//! Everything the IO path needs later must already be resident when [`Region::new`] returns:
//! a page fault on the IO path is an allocation, and an allocation under memory pressure may
//! wait on reclaim, which may wait on the very swap device this region serves.
//!
//! The region is anonymous memory, or (for a daemon and its standby) a sealed memfd that
//! both processes map and lock: its physical pages are counted once, and the standby needs
//! no fresh memory for buffers when it takes over.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

use crate::PoolError;

/// Where the region's pages come from.
pub(crate) enum Memory {
    /// Anonymous and private to this process.
    Private,
    /// A new memfd, to be shared with a standby process.
    NewShared,
    /// A memfd made by another process (the daemon this one stands by for): mapped as it is,
    /// never written while mapping (the other process may be using its buffers).
    Attach(OwnedFd),
}

/// A mapping that never grows, never shrinks, and is unmapped on drop.
pub(crate) struct Region {
    ptr: NonNull<u8>,
    len: usize,
    locked: bool,
    /// The memfd behind a shared region.
    memfd: Option<OwnedFd>,
}

// SAFETY: `Region` owns its mapping exclusively; the raw pointer is only an address. Who may
// touch which bytes of it is decided by the pool (one `Chunk` guard per chunk), not here.
unsafe impl Send for Region {}
// SAFETY: as above; `&Region` only exposes the address and length, never the bytes.
unsafe impl Sync for Region {}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 {
        size as usize
    } else {
        4096
    }
}

impl Region {
    /// Maps `len` bytes (non-zero), excludes them from core dumps and from forked children,
    /// locks them if `lock`, and faults in every page so that each is backed by its own frame
    /// (writing to it, unless attaching to another process's memory).
    pub(crate) fn new(len: usize, lock: bool, memory: Memory) -> Result<Region, PoolError> {
        debug_assert!(len > 0);
        let (memfd, attach) = match memory {
            Memory::Private => (None, false),
            Memory::NewShared => (Some(new_memfd(len)?), false),
            Memory::Attach(fd) => {
                check_memfd_size(&fd, len)?;
                (Some(fd), true)
            }
        };
        let (flags, fd) = match &memfd {
            Some(fd) => (libc::MAP_SHARED, fd.as_raw_fd()),
            None => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1),
        };
        // SAFETY: a fresh mapping with no address hint cannot alias any existing Rust object
        // (a shared one aliases only the other process's copy, which Rust does not see); the
        // result is checked against MAP_FAILED before use.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(PoolError::Map {
                bytes: len,
                errno: errno(),
            });
        }
        let ptr = NonNull::new(addr.cast::<u8>()).ok_or(PoolError::Map {
            bytes: len,
            errno: libc::EINVAL,
        })?;
        // From here on `region`'s Drop unmaps on every error path.
        let mut region = Region {
            ptr,
            len,
            locked: false,
            memfd,
        };

        // No plaintext or ciphertext in core dumps.
        region.advise(libc::MADV_DONTDUMP, "MADV_DONTDUMP")?;
        // A forked child (a helper process, a crash handler) must neither see these bytes nor
        // turn them copy-on-write: after a fork every write by the daemon to a shared page
        // would fault and allocate a fresh page, on the IO path, possibly under OOM.
        region.advise(libc::MADV_DONTFORK, "MADV_DONTFORK")?;

        if lock {
            // SAFETY: [ptr, ptr+len) is exactly the mapping created above.
            if unsafe { libc::mlock(region.ptr.as_ptr().cast(), len) } != 0 {
                return Err(PoolError::Mlock {
                    bytes: len,
                    errno: errno(),
                });
            }
            region.locked = true;
        }

        // Pre-fault: write every page. `mlock` already populates a private writable mapping,
        // but an unlocked (torture) pool needs this, and writing — not reading, which would map
        // the shared zero page — guarantees every page owns a frame now, not on first IO.
        // Attached memory already has its frames (its creator wrote every page): reading maps
        // them, and writing could clobber a buffer the other process is using.
        let page = page_size();
        let mut off = 0;
        while off < len {
            if attach {
                // SAFETY: off < len, so the byte is inside the mapping, which is readable; a
                // volatile read of a byte another process may write is a plain load here.
                unsafe { region.ptr.as_ptr().add(off).read_volatile() };
            } else {
                // SAFETY: off < len, so the byte is inside the mapping, which is writable and
                // not yet shared with anyone.
                unsafe { region.ptr.as_ptr().add(off).write_volatile(0) };
            }
            off += page;
        }
        Ok(region)
    }

    /// The memfd behind a shared region (`None` for a private one).
    pub(crate) fn memfd(&self) -> Option<&OwnedFd> {
        self.memfd.as_ref()
    }

    fn advise(&mut self, advice: libc::c_int, name: &'static str) -> Result<(), PoolError> {
        // SAFETY: the range is exactly our own mapping; these advices do not change its
        // contents or validity.
        if unsafe { libc::madvise(self.ptr.as_ptr().cast(), self.len, advice) } != 0 {
            return Err(PoolError::Madvise {
                advice: name,
                errno: errno(),
            });
        }
        Ok(())
    }

    pub(crate) fn ptr(&self) -> NonNull<u8> {
        self.ptr
    }

    pub(crate) fn locked(&self) -> bool {
        self.locked
    }
}

/// A memfd of `len` bytes whose size is sealed. Not close-on-exec: the standby process the
/// daemon starts inherits it (the daemon execs nothing else).
fn new_memfd(len: usize) -> Result<OwnedFd, PoolError> {
    let fail = |what| PoolError::Shared {
        what,
        errno: errno(),
    };
    // SAFETY: the name is a NUL-terminated literal; the result is checked before use.
    let raw = unsafe { libc::memfd_create(c"ublk-crypt-pool".as_ptr(), libc::MFD_ALLOW_SEALING) };
    if raw < 0 {
        return Err(fail("memfd_create"));
    }
    // SAFETY: `raw` is a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: ftruncate and fcntl on our own descriptor have no memory-safety preconditions.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
        return Err(fail("ftruncate"));
    }
    // Sealed size: neither process can shrink it under the other's mapping (SIGBUS).
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(fail("F_ADD_SEALS"));
    }
    Ok(fd)
}

/// An attached memfd must be exactly the region this pool's configuration needs.
fn check_memfd_size(fd: &OwnedFd, len: usize) -> Result<(), PoolError> {
    // SAFETY: fstat writes into the zeroed struct we pass; the descriptor is ours.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(PoolError::Shared {
            what: "fstat",
            errno: errno(),
        });
    }
    if st.st_size as u64 != len as u64 {
        return Err(PoolError::SharedSize {
            expected: len,
            found: st.st_size as u64,
        });
    }
    Ok(())
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: we own the mapping and the pool outlives every guard (guards borrow it), so
        // nothing can reference these bytes any more. munmap also drops the lock.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}
