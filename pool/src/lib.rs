//! Reserve-backed, `mlock`ed, preallocated IO buffer pool for ublk-crypt.
//!
//! # Why
//!
//! ublk-crypt backs encrypted swap. The kernel swaps out when memory is short, and every swapped
//! page passes through this daemon, which needs a buffer for the ciphertext. If that buffer came
//! from the allocator, the allocator could enter reclaim, reclaim could wait for swap-out, and
//! swap-out waits for us: a deadlock, exactly when the machine can least afford one. The kernel's
//! own dm-crypt avoids it with a *mempool*: a guaranteed reserve, where a caller that finds it
//! empty waits for an element to be **returned**, never for fresh memory. This crate is that
//! mempool for userspace.
//!
//! # Model
//!
//! * One region, `mmap`ed once at start-up from a byte budget ([`PoolConfig::budget_bytes`],
//!   default [`DEFAULT_BUDGET_BYTES`]), `mlock`ed, pre-faulted (every page written),
//!   `MADV_DONTDUMP` (no plaintext or ciphertext in core dumps) and `MADV_DONTFORK` (a child's
//!   copy-on-write would make our writes allocate). It never grows or shrinks and is unmapped
//!   when the [`ReservePool`] is dropped. A failed `mlock` is an error ([`PoolError::Mlock`]), never a
//!   silent downgrade.
//! * The region is cut into equal [`Chunk`]s ([`PoolConfig::chunk_bytes`], default 256 KiB, a
//!   power of two ≥ 4096, so every chunk is aligned for `O_DIRECT`). A chunk is an RAII guard:
//!   it dereferences to `[u8]` and returns itself to the pool when dropped. Its
//!   [`index`](Chunk::index) and [`offset`](Chunk::offset) in the region are stable.
//! * Each of the [`PoolConfig::queues`] queues has a **reserve** of
//!   [`PoolConfig::reserve_per_queue`] (≥ 1) chunks that no other queue can take; the rest (≥ 1
//!   chunk) is **shared**. A queue's first `reserve_per_queue` held chunks count against its
//!   reserve, further ones against the shared part. So however greedy the other queues are,
//!   every queue can always get its reserve. An acquisition that succeeds only thanks to the
//!   reserve (the shared part being exhausted) is counted as a *reserve hit*.
//! * [`ReservePool::try_acquire`] never waits. [`ReservePool::acquire`] returns a future that waits until a
//!   chunk is returned — no polling, no allocation, cancel-safe.
//! * Statistics ([`ReservePool::stats`], [`ReservePool::queue_stats`]) are relaxed atomics, cheap to read.
//!
//! After [`ReservePool::new`] returns, acquiring, waiting, waking and releasing never allocate (the
//! `no_alloc` integration test checks this with a counting global allocator).
//!
//! # Forward progress: the rule for callers
//!
//! **Hold at most one chunk per IO while waiting; never wait for a chunk while holding one.**
//! An IO larger than a chunk is processed chunk by chunk: acquire a chunk, encrypt or decrypt
//! up to `chunk_bytes` of the IO through it, submit/complete that part, drop the chunk, acquire
//! the next. Extra chunks to overlap work may be taken only with [`ReservePool::try_acquire`], which
//! never waits.
//!
//! ```
//! use ublk_crypt_pool::{ReservePool, PoolConfig};
//!
//! /// Encrypts `data` to the backing device through the pool, one chunk at a time.
//! async fn write_io(pool: &ReservePool, queue: usize, data: &[u8]) {
//!     for part in data.chunks(pool.chunk_bytes()) {
//!         // Waits for a chunk another IO returns; never for the allocator.
//!         let mut chunk = pool.acquire(queue).await;
//!         chunk[..part.len()].copy_from_slice(part); // encrypt in place here
//!         // ... submit `chunk` to the backing device and await completion ...
//!         drop(chunk); // before acquiring the next one
//!     }
//! }
//!
//! let pool = ReservePool::new(PoolConfig {
//!     budget_bytes: 4 << 20,
//!     queues: 4,
//!     ..PoolConfig::default()
//! })?;
//! // Each queue thread runs such futures on its own executor, e.g. for a 4 MiB IO on queue 2:
//! let io = write_io(&pool, 2, &[0u8; 4 << 20]);
//! # drop(io);
//! assert_eq!(pool.stats().chunks_total, 16);
//! # Ok::<(), ublk_crypt_pool::PoolError>(())
//! ```
//!
//! Why this suffices: every chunk is held by an IO that does not wait for the pool, so it is
//! eventually released (the backing device completes); a released chunk is handed directly to
//! a waiter that may use it. And each queue's reserve means one queue holding many chunks (say,
//! its backing device is slow) cannot keep another queue from running. Hence queue depth ×
//! maximum IO size may exceed the budget by any factor: e.g. 4 queues × 32 tags × 1 MiB IOs
//! complete against a 1 MiB pool (tested in `tests/progress.rs`). What does deadlock is
//! breaking the rule: N IOs each holding one chunk and waiting for a second, with N chunks in
//! the pool.
//!
//! # Waiting design
//!
//! All state sits behind one `std::sync::Mutex` (futex-based: uncontended it is one atomic, and
//! it never allocates). A waiting [`Acquire`] future links an intrusive node that lives *inside
//! the future* into its queue's FIFO wait list; the future is `!Unpin`, so the node stays put
//! until the future's `Drop` unlinks it. Nothing is preallocated per waiter, so there is no
//! waiter limit.
//!
//! Releasing does not just wake someone to retry (which would let a `try_acquire` steal the
//! chunk and wake waiters for nothing): under the lock it **hands the chunk off** — unlinks the
//! chosen waiter, records the chunk in its node, counts it as that queue's — and after unlocking
//! calls the waiter's `Waker`. Who is chosen:
//!
//! * a chunk freeing a slot of its queue's **reserve** goes to that queue's oldest waiter (no
//!   other queue may use it);
//! * a chunk freeing a **shared** slot goes to the oldest waiter of any queue (global FIFO by
//!   ticket; within a queue, wake order is always FIFO).
//!
//! This keeps the invariant "a queue has waiters only while it can take nothing", so
//! `try_acquire` and fresh `acquire`s never overtake a queue's waiters. The waiting future
//! stores its caller's `Waker` once and on later polls clones a new one only if
//! [`Waker::will_wake`](std::task::Waker::will_wake) says it changed. Dropping a waiting future unlinks it; dropping one that
//! was already granted a chunk releases that chunk on (to the next waiter or the free list), so
//! cancellation never leaks.
//!
//! # Threads and executors
//!
//! [`ReservePool`] is `Sync`; [`Chunk`] and [`Acquire`] are `Send`. The intended use is one pool shared
//! (by `Arc` or reference) by libublk's per-queue threads, each running its own single-threaded
//! executor, each passing its own queue id. The futures only need a `Waker`, so any executor
//! works.
//!
//! # Unsafe code
//!
//! This crate is ublk-crypt's one home of unsafe memory tricks: the raw mapping, the intrusive
//! wait list, and a chunk split in two for two threads (`split.rs`). Every `unsafe` block
//! carries a `// SAFETY:` argument.

#![warn(missing_docs)]

mod config;
mod pool;
mod region;
mod split;

pub use config::{
    chunk_bytes_for, PoolConfig, PoolError, CHUNK_ALIGN, DEFAULT_BUDGET_BYTES, DEFAULT_CHUNK_BYTES,
    DEFAULT_RESERVE_PER_QUEUE,
};
pub use pool::{Acquire, Chunk, PoolStats, QueueStats, ReservePool};
pub use split::{ChunkHead, ChunkTail};
