//! Crypto workers: encryption of large IO pieces on every CPU, not just the queue's thread.
//!
//! Why: blk-mq feeds a ublk queue from the CPUs mapped to it, and a single submitter (one fio
//! job, the swap-out path of one task) lands on one queue, whose one thread would then do all
//! the AES for it. dm-crypt spreads that work over an unbound workqueue (kcryptd); this is the
//! same idea in userspace: the queue thread moves data and drives IO, `threads` workers
//! encrypt.
//!
//! How, without allocating: every (queue, tag) owns one [`JobSlot`] made at start-up, with its
//! own eventfd. The tag's task moves its pool chunk into the slot and pushes the slot's index
//! onto a work list whose capacity covers every slot (so the push never reallocates); a worker
//! takes it, encrypts or decrypts in place, puts the chunk back and writes the eventfd. The
//! task waits with a poll of that eventfd on the queue's io_uring, so the queue thread keeps
//! serving other tags meanwhile and wakes exactly when the job is done. A poll, not a read: a
//! read that has to wait makes io_uring allocate (its async poll entry, `GFP_ATOMIC`) and, if
//! that fails, hand the read to an io-wq thread it may have to create — allocations at the very
//! moment swap-out has used up memory. A poll waits in the request itself. Chunks cross threads by
//! move (they are `Send`), so no memory is shared unsafely.
//!
//! Workers run with the IO-thread protections (PR_SET_IO_FLUSHER, pre-faulted small stacks,
//! covered by mlockall), and hold no chunk of their own: the forward-progress rule of the pool
//! is untouched (each IO still holds one chunk, which is either with it or being worked on).

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};

use anyhow::{Context, Result};
use nix::sys::eventfd::{EfdFlags, EventFd};
use ublk_crypt_crypto::SectorCipher;
use ublk_crypt_pool::Chunk;

use crate::hardening::{self, Protections};

/// Pieces smaller than this are encrypted inline: for a 4 KiB IO the hand-off would cost more
/// than the AES.
pub const MIN_OFFLOAD_BYTES: usize = 32 << 10;

/// Whether a piece of `len` bytes goes to a worker. Only when the queue thread has something
/// else to do meanwhile: other requests of its queue in flight (`in_flight` counts the one
/// this piece belongs to), or the same request's next backing read (`overlapped`). A request
/// alone on its queue — a swap-in, one faulting task — is faster inline: the hand-off adds two
/// thread wake-ups and saves nothing. And when every worker is busy (`worker_idle` false), a
/// piece of at most [`MAX_INLINE_WHEN_BUSY`] runs inline too: queued behind the workers it
/// would wait, while the queue thread can be one more AES lane.
pub fn worth_offloading(len: usize, in_flight: u16, overlapped: bool, worker_idle: bool) -> bool {
    len >= MIN_OFFLOAD_BYTES
        && (overlapped || (in_flight > 1 && (worker_idle || len > MAX_INLINE_WHEN_BUSY)))
}

/// Largest piece the queue thread encrypts itself when every worker is busy. Larger ones would
/// hold it (and every other tag's completions) too long: 64 KiB is ~0.7 ms of AES under TCG.
pub const MAX_INLINE_WHEN_BUSY: usize = 64 << 10;

struct Job {
    chunk: Chunk<'static>,
    len: usize,
    sector: u64,
    encrypt: bool,
    ok: bool,
}

struct JobSlot {
    job: Mutex<Option<Job>>,
    done: EventFd,
}

pub struct CryptoWorkers {
    cipher: &'static SectorCipher,
    slots: Box<[JobSlot]>,
    work: Mutex<VecDeque<usize>>,
    ready: Condvar,
    /// Jobs submitted and not yet finished by a worker.
    outstanding: AtomicUsize,
    threads: usize,
}

impl CryptoWorkers {
    /// `slots` = queues × depth; starts `threads` workers that live as long as the process.
    /// `on_thread_start` runs first on each worker (tests use it to watch their allocations).
    pub fn start(
        cipher: &'static SectorCipher,
        slots: usize,
        threads: usize,
        protections: Protections,
        on_thread_start: fn(),
    ) -> Result<&'static CryptoWorkers> {
        let slots = (0..slots)
            .map(|_| {
                Ok(JobSlot {
                    job: Mutex::new(None),
                    done: EventFd::from_value_and_flags(
                        0,
                        EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK,
                    )
                    .context("eventfd")?,
                })
            })
            .collect::<Result<Box<[_]>>>()?;
        let n = slots.len();
        let workers: &'static CryptoWorkers = Box::leak(Box::new(CryptoWorkers {
            cipher,
            slots,
            work: Mutex::new(VecDeque::with_capacity(n)),
            ready: Condvar::new(),
            outstanding: AtomicUsize::new(0),
            threads,
        }));
        for i in 0..threads {
            std::thread::Builder::new()
                .name(format!("ublk-crypt-aes{i}"))
                .stack_size(hardening::THREAD_STACK_BYTES)
                .spawn(move || {
                    on_thread_start();
                    if let Err(e) = hardening::protect_io_thread(protections) {
                        tracing::error!("crypto worker {i}: {e:#}");
                    }
                    workers.serve();
                })
                .context("cannot spawn a crypto worker")?;
        }
        Ok(workers)
    }

    fn serve(&self) {
        loop {
            let slot = {
                let mut work = self.work.lock().unwrap();
                loop {
                    if let Some(s) = work.pop_front() {
                        break s;
                    }
                    work = self.ready.wait(work).unwrap();
                }
            };
            let s = &self.slots[slot];
            let mut job = s.job.lock().unwrap().take();
            if let Some(j) = job.as_mut() {
                let buf = &mut j.chunk[..j.len];
                j.ok = if j.encrypt {
                    self.cipher.encrypt(j.sector, buf).is_ok()
                } else {
                    self.cipher.decrypt(j.sector, buf).is_ok()
                };
            }
            *s.job.lock().unwrap() = job;
            self.outstanding.fetch_sub(1, Ordering::Relaxed);
            // The counter cannot overflow (one job per slot at a time), so this cannot fail.
            let _ = s.done.write(1);
        }
    }

    /// Hands a job to the workers; the caller then waits for `done_fd(slot)` to be readable,
    /// consumes the signal with [`CryptoWorkers::take_done`] and collects the chunk with
    /// [`CryptoWorkers::finish`].
    pub fn submit(
        &self,
        slot: usize,
        chunk: Chunk<'static>,
        len: usize,
        sector: u64,
        encrypt: bool,
    ) {
        *self.slots[slot].job.lock().unwrap() = Some(Job {
            chunk,
            len,
            sector,
            encrypt,
            ok: false,
        });
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        self.work.lock().unwrap().push_back(slot);
        self.ready.notify_one();
    }

    /// Whether some worker has nothing to do right now.
    pub fn worker_idle(&self) -> bool {
        self.outstanding.load(Ordering::Relaxed) < self.threads
    }

    /// The eventfd a worker writes when `slot`'s job is done.
    pub fn done_fd(&self, slot: usize) -> RawFd {
        self.slots[slot].done.as_raw_fd()
    }

    /// Consumes `slot`'s completion signal: true if the worker has written it (the eventfd is
    /// non-blocking, so a spurious wake-up returns false at once instead of blocking the queue).
    pub fn take_done(&self, slot: usize) -> bool {
        self.slots[slot].done.read().is_ok()
    }

    /// Takes the chunk back after the eventfd fired; `ok` is the cipher's verdict.
    pub fn finish(&self, slot: usize) -> (Chunk<'static>, bool) {
        let job = self.slots[slot]
            .job
            .lock()
            .unwrap()
            .take()
            .expect("finish() after the worker signalled completion");
        (job.chunk, job.ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_large_pieces_with_other_work_meanwhile_are_offloaded() {
        let (big, huge) = (MIN_OFFLOAD_BYTES, MAX_INLINE_WHEN_BUSY + 4096);
        assert!(
            !worth_offloading(4096, 64, true, true),
            "small: always inline"
        );
        assert!(!worth_offloading(big - 512, 2, true, true));
        assert!(!worth_offloading(big, 1, false, true), "alone: inline");
        assert!(
            !worth_offloading(256 << 10, 1, false, true),
            "alone: inline"
        );
        assert!(worth_offloading(big, 2, false, true), "others in flight");
        assert!(
            worth_offloading(256 << 10, 1, true, false),
            "next piece being read"
        );
        assert!(
            !worth_offloading(big, 8, false, false),
            "workers busy: inline"
        );
        assert!(!worth_offloading(MAX_INLINE_WHEN_BUSY, 8, false, false));
        assert!(
            worth_offloading(huge, 8, false, false),
            "too big to hold the queue"
        );
    }
}
