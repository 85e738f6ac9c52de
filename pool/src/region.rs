//! The one memory region behind the pool: mapped, advised, locked and faulted in once.
//!
//! Everything the IO path needs later must already be resident when [`Region::new`] returns:
//! a page fault on the IO path is an allocation, and an allocation under memory pressure may
//! wait on reclaim, which may wait on the very swap device this region serves.

use std::ptr::NonNull;

use crate::PoolError;

/// An anonymous private mapping that never grows, never shrinks, and is unmapped on drop.
pub(crate) struct Region {
    ptr: NonNull<u8>,
    len: usize,
    locked: bool,
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
    /// locks them if `lock`, and writes to every page so that each is backed by its own frame.
    pub(crate) fn new(len: usize, lock: bool) -> Result<Region, PoolError> {
        debug_assert!(len > 0);
        // SAFETY: a fresh anonymous mapping with no address hint cannot alias any existing
        // Rust object; the result is checked against MAP_FAILED before use.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
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
        let page = page_size();
        let mut off = 0;
        while off < len {
            // SAFETY: off < len, so the byte is inside the mapping, which is writable and not
            // yet shared with anyone.
            unsafe { region.ptr.as_ptr().add(off).write_volatile(0) };
            off += page;
        }
        Ok(region)
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

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: we own the mapping and the pool outlives every guard (guards borrow it), so
        // nothing can reference these bytes any more. munmap also drops the lock.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}
