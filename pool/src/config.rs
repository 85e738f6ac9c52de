//! Start-up configuration and its validation.

use std::fmt;

/// Default memory budget of a pool: 16 MiB, i.e. 64 chunks of 256 KiB.
///
/// Enough for a few queues to keep a useful number of IOs in flight; the daemon makes it
/// configurable because `mlock`ed memory is a real cost on small machines.
pub const DEFAULT_BUDGET_BYTES: usize = 16 << 20;

/// Default chunk size: 256 KiB, the largest unit the IO path processes at once.
///
/// Why 256 KiB: every piece costs a user copy syscall, a hand-off to a crypto worker and its
/// wake-ups, and a backing IO; with 64 KiB pieces the queue thread alone took 15 % of the CPU
/// in a sequential read and the device reached 0.8× dm-crypt; 128 KiB gave ~0.9×, 256 KiB
/// ~1.0× (bench/README.md). 64 chunks still give each of the default 64 tags its own.
pub const DEFAULT_CHUNK_BYTES: usize = 256 << 10;

/// The chunk size for `tags` IOs in flight (queues × depth) in `budget_bytes`: the default
/// (256 KiB: few pieces per large IO) while the budget still gives every tag a chunk of its
/// own; halved (not below 64 KiB) until it does, so that a full queue of small IOs does not wait
/// for chunks that large-chunk copies of 4 KiB requests are holding.
pub fn chunk_bytes_for(budget_bytes: usize, tags: usize) -> usize {
    let mut chunk = DEFAULT_CHUNK_BYTES;
    while chunk > (64 << 10) && budget_bytes / chunk < tags {
        chunk /= 2;
    }
    chunk
}

/// Smallest chunk size and the alignment every chunk has at least: what `O_DIRECT` needs
/// (logical block size up to 4096) and the unit in which the region is mapped.
pub const CHUNK_ALIGN: usize = 4096;

/// Default number of chunks each queue keeps for itself.
///
/// One chunk is what a queue needs to make progress at all (see the crate docs on forward
/// progress); the second lets it overlap one chunk's encryption with another's device IO even
/// when every shared chunk is taken.
pub const DEFAULT_RESERVE_PER_QUEUE: usize = 2;

/// How a [`ReservePool`](crate::ReservePool) is sized. Fixed at construction: the pool never grows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolConfig {
    /// Upper bound on the memory the pool maps and locks. The pool holds
    /// `budget_bytes / chunk_bytes` chunks (rounded down; the remainder is simply not mapped).
    pub budget_bytes: usize,
    /// Size of every chunk: a power of two, at least [`CHUNK_ALIGN`].
    pub chunk_bytes: usize,
    /// Number of queues that will acquire chunks, identified as `0..queues`. At least 1.
    pub queues: usize,
    /// Chunks each queue can always get no matter what other queues hold. At least 1.
    ///
    /// The rest of the pool — the *shared* part, which must hold at least one chunk — goes to
    /// whichever queue asks first; a queue dips into its reserve only when the shared part is
    /// exhausted (counted in [`QueueStats::reserve_hits`](crate::QueueStats::reserve_hits)).
    pub reserve_per_queue: usize,
    /// Lock the region into RAM with `mlock` (default `true`).
    ///
    /// **Testing/torture switch only.** An unlocked pool can be swapped out, and swapping it
    /// back in on the IO path of a swap device is exactly the deadlock this crate exists to
    /// prevent. The daemon uses `false` only to run without `CAP_IPC_LOCK` in tests or to
    /// deliberately provoke that failure mode.
    pub lock: bool,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            budget_bytes: DEFAULT_BUDGET_BYTES,
            chunk_bytes: DEFAULT_CHUNK_BYTES,
            queues: 1,
            reserve_per_queue: DEFAULT_RESERVE_PER_QUEUE,
            lock: true,
        }
    }
}

/// The numbers a valid [`PoolConfig`] implies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Layout {
    pub(crate) chunks: usize,
    pub(crate) shared: usize,
    pub(crate) region_bytes: usize,
}

impl PoolConfig {
    /// The default configuration for `queues` queues.
    pub fn with_queues(queues: usize) -> Self {
        PoolConfig {
            queues,
            ..PoolConfig::default()
        }
    }

    /// Number of chunks a pool built from this configuration holds (before validation).
    pub fn chunks(&self) -> usize {
        self.budget_bytes.checked_div(self.chunk_bytes).unwrap_or(0)
    }

    /// Checks the configuration without mapping anything.
    pub fn validate(&self) -> Result<(), PoolError> {
        self.layout().map(|_| ())
    }

    pub(crate) fn layout(&self) -> Result<Layout, PoolError> {
        if !self.chunk_bytes.is_power_of_two() || self.chunk_bytes < CHUNK_ALIGN {
            return Err(PoolError::ChunkSize {
                chunk_bytes: self.chunk_bytes,
            });
        }
        if self.queues == 0 {
            return Err(PoolError::NoQueues);
        }
        if self.reserve_per_queue == 0 {
            return Err(PoolError::NoReserve);
        }
        let chunks = self.chunks();
        // All reserves plus one shared chunk; saturating so absurd inputs still get the
        // "too small" error instead of an overflow.
        let required_chunks = self
            .queues
            .saturating_mul(self.reserve_per_queue)
            .saturating_add(1);
        if chunks < required_chunks {
            return Err(PoolError::BudgetTooSmall {
                budget_bytes: self.budget_bytes,
                chunk_bytes: self.chunk_bytes,
                required_chunks,
            });
        }
        if chunks > u32::MAX as usize || self.queues > u32::MAX as usize {
            return Err(PoolError::TooManyChunks { chunks });
        }
        Ok(Layout {
            chunks,
            shared: chunks - required_chunks + 1,
            region_bytes: chunks * self.chunk_bytes,
        })
    }
}

/// Why a [`ReservePool`](crate::ReservePool) could not be built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolError {
    /// `chunk_bytes` is not a power of two of at least [`CHUNK_ALIGN`].
    ChunkSize {
        /// The rejected chunk size.
        chunk_bytes: usize,
    },
    /// `queues` is zero.
    NoQueues,
    /// `reserve_per_queue` is zero: a queue without a reserve has no progress guarantee.
    NoReserve,
    /// The budget does not hold every queue's reserve plus one shared chunk.
    BudgetTooSmall {
        /// The configured budget.
        budget_bytes: usize,
        /// The configured chunk size.
        chunk_bytes: usize,
        /// `queues * reserve_per_queue + 1`.
        required_chunks: usize,
    },
    /// More chunks (or queues) than fit the pool's 32-bit indices.
    TooManyChunks {
        /// `budget_bytes / chunk_bytes`.
        chunks: usize,
    },
    /// `mmap` of the region failed.
    Map {
        /// Size of the attempted mapping.
        bytes: usize,
        /// The `errno` it failed with.
        errno: i32,
    },
    /// `madvise` on the region failed.
    Madvise {
        /// Which advice (`MADV_DONTDUMP`, `MADV_DONTFORK`).
        advice: &'static str,
        /// The `errno` it failed with.
        errno: i32,
    },
    /// Making or inspecting the shared region's memfd failed.
    Shared {
        /// The call that failed (`memfd_create`, `ftruncate`, `F_ADD_SEALS`, `fstat`).
        what: &'static str,
        /// The `errno` it failed with.
        errno: i32,
    },
    /// The memfd to attach to is not the size this configuration's region needs (the other
    /// process was started with another pool size).
    SharedSize {
        /// The region size this configuration needs.
        expected: usize,
        /// The memfd's size.
        found: u64,
    },
    /// `mlock` of the region failed. Never downgraded to an unlocked pool silently: an unlocked
    /// pool can be swapped out, which defeats the point of serving swap from it.
    Mlock {
        /// Size of the region that could not be locked.
        bytes: usize,
        /// The `errno` it failed with (`ENOMEM`: over `RLIMIT_MEMLOCK`; `EPERM`: no
        /// `CAP_IPC_LOCK` and a zero limit).
        errno: i32,
    },
}

/// "Cannot allocate memory (os error 12)": the message and the errno number.
fn strerror(errno: i32) -> std::io::Error {
    std::io::Error::from_raw_os_error(errno)
}

impl fmt::Display for PoolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            PoolError::ChunkSize { chunk_bytes } => write!(
                f,
                "invalid pool chunk size {chunk_bytes} bytes: must be a power of two of at least {CHUNK_ALIGN}"
            ),
            PoolError::NoQueues => write!(f, "invalid pool configuration: zero queues"),
            PoolError::NoReserve => write!(
                f,
                "invalid pool configuration: reserve_per_queue is 0, but every queue needs at least one reserved chunk to guarantee progress"
            ),
            PoolError::BudgetTooSmall {
                budget_bytes,
                chunk_bytes,
                required_chunks,
            } => write!(
                f,
                "pool budget of {budget_bytes} bytes holds {} chunks of {chunk_bytes} bytes, but the queues' reserves plus one shared chunk need {required_chunks} (at least {} bytes)",
                budget_bytes.checked_div(chunk_bytes).unwrap_or(0),
                required_chunks.saturating_mul(chunk_bytes)
            ),
            PoolError::TooManyChunks { chunks } => write!(
                f,
                "pool would hold {chunks} chunks (or as many queues), more than its 32-bit indices allow"
            ),
            PoolError::Map { bytes, errno } => write!(
                f,
                "mmap of {bytes}-byte buffer pool failed: {}",
                strerror(errno)
            ),
            PoolError::Madvise { advice, errno } => write!(
                f,
                "madvise({advice}) on the buffer pool failed: {}",
                strerror(errno)
            ),
            PoolError::Shared { what, errno } => write!(
                f,
                "{what} for the shared buffer pool failed: {}",
                strerror(errno)
            ),
            PoolError::SharedSize { expected, found } => write!(
                f,
                "the shared buffer pool is {found} bytes, this pool needs {expected}"
            ),
            PoolError::Mlock { bytes, errno } => write!(
                f,
                "mlock of {bytes}-byte buffer pool failed: {}; the IO buffers must stay in RAM \
                 to serve swap under memory pressure: raise the locked-memory limit (systemd LimitMEMLOCK=, \
                 ulimit -l) to at least {} KiB or grant CAP_IPC_LOCK",
                strerror(errno),
                bytes.div_ceil(1024)
            ),
        }
    }
}

impl std::error::Error for PoolError {}

#[cfg(test)]
mod tests {
    #[test]
    fn chunks_shrink_until_every_tag_has_one() {
        use super::chunk_bytes_for;
        let mib = |m: usize| m << 20;
        // (budget, queues × depth)
        assert_eq!(chunk_bytes_for(mib(16), 64), 256 << 10); // the default: 64 chunks
        assert_eq!(chunk_bytes_for(mib(16), 128), 128 << 10);
        assert_eq!(chunk_bytes_for(mib(16), 2 * 64), 128 << 10);
        assert_eq!(chunk_bytes_for(mib(16), 4 * 128), 64 << 10); // floor
        assert_eq!(chunk_bytes_for(mib(64), 2 * 128), 256 << 10);
    }

    use super::*;

    fn cfg(budget: usize, chunk: usize, queues: usize, reserve: usize) -> PoolConfig {
        PoolConfig {
            budget_bytes: budget,
            chunk_bytes: chunk,
            queues,
            reserve_per_queue: reserve,
            lock: true,
        }
    }

    #[test]
    fn default_is_valid() {
        let c = PoolConfig::default();
        assert_eq!(c.budget_bytes, 16 << 20);
        assert_eq!(c.chunk_bytes, 256 << 10);
        assert!(c.lock);
        let l = c.layout().unwrap();
        assert_eq!(l.chunks, 64);
        assert_eq!(l.shared, 64 - DEFAULT_RESERVE_PER_QUEUE);
        assert_eq!(l.region_bytes, 16 << 20);
    }

    #[test]
    fn chunk_size_rules() {
        for bad in [0, 1, 2048, 4095, 4097, 12288, 65535, 65536 + 4096] {
            assert_eq!(
                cfg(1 << 30, bad, 1, 1).validate(),
                Err(PoolError::ChunkSize { chunk_bytes: bad }),
                "{bad}"
            );
        }
        for good in [4096, 8192, 65536, 1 << 20] {
            assert!(cfg(1 << 30, good, 1, 1).validate().is_ok(), "{good}");
        }
    }

    #[test]
    fn queue_and_reserve_rules() {
        assert_eq!(
            cfg(1 << 20, 4096, 0, 1).validate(),
            Err(PoolError::NoQueues)
        );
        assert_eq!(
            cfg(1 << 20, 4096, 1, 0).validate(),
            Err(PoolError::NoReserve)
        );
    }

    #[test]
    fn budget_must_hold_reserves_plus_one_shared() {
        // 4 queues x 2 reserve + 1 shared = 9 chunks.
        let exact = cfg(9 * 4096, 4096, 4, 2);
        let l = exact.layout().unwrap();
        assert_eq!((l.chunks, l.shared), (9, 1));
        let short = cfg(9 * 4096 - 1, 4096, 4, 2);
        assert_eq!(
            short.validate(),
            Err(PoolError::BudgetTooSmall {
                budget_bytes: 9 * 4096 - 1,
                chunk_bytes: 4096,
                required_chunks: 9
            })
        );
        // A remainder below one chunk is not mapped.
        let l = cfg(10 * 4096 + 100, 4096, 4, 2).layout().unwrap();
        assert_eq!((l.chunks, l.shared, l.region_bytes), (10, 2, 10 * 4096));
        // Overflowing reserve arithmetic is an ordinary "too small".
        assert!(matches!(
            cfg(1 << 20, 4096, usize::MAX, 2).validate(),
            Err(PoolError::BudgetTooSmall {
                required_chunks: usize::MAX,
                ..
            })
        ));
    }

    #[test]
    fn too_many_chunks() {
        if usize::BITS > 32 {
            let c = cfg(1 << 45, 4096, 1, 1);
            assert_eq!(
                c.validate(),
                Err(PoolError::TooManyChunks { chunks: 1 << 33 })
            );
        }
    }

    #[test]
    fn mlock_error_names_budget_errno_and_remedies() {
        let e = PoolError::Mlock {
            bytes: 16 << 20,
            errno: libc::ENOMEM,
        };
        let s = e.to_string();
        assert!(s.contains("16777216-byte"), "{s}");
        assert!(s.contains("os error 12"), "{s}");
        assert!(s.contains("LimitMEMLOCK"), "{s}");
        assert!(s.contains("CAP_IPC_LOCK"), "{s}");
        assert!(s.contains("16384 KiB"), "{s}");
        let s = PoolError::Mlock {
            bytes: 4096,
            errno: libc::EPERM,
        }
        .to_string();
        assert!(s.contains("os error 1)"), "{s}");
        // It is a std error, usable with `?` into Box<dyn Error> / anyhow.
        let _: Box<dyn std::error::Error + Send + Sync> = Box::new(e);
    }

    #[test]
    fn other_errors_display() {
        let s = cfg(4096, 4096, 4, 2).validate().unwrap_err().to_string();
        assert!(s.contains("need 9"), "{s}");
        assert!(PoolError::ChunkSize { chunk_bytes: 100 }
            .to_string()
            .contains("power of two"));
        assert!(PoolError::Map {
            bytes: 1,
            errno: libc::ENOMEM
        }
        .to_string()
        .contains("mmap"));
        assert!(PoolError::Madvise {
            advice: "MADV_DONTDUMP",
            errno: libc::EINVAL
        }
        .to_string()
        .contains("MADV_DONTDUMP"));
    }
}
