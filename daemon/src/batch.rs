//! Small pieces of one queue shared between its thread and a crypto worker, a batch at a time
//! ([`PieceBatch`]): the queue thread parks them during a round of completions and, at the end
//! of the round, hands half of them to an idle worker as one job (`offload.rs`) and does the
//! rest itself.

use std::cell::{Cell, RefCell};
use std::task::{Poll, Waker};

use ublk_crypt_pool::Chunk;

use crate::offload::CryptoWorkers;

/// Where a parked piece stands ([`PieceBatch`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PieceState {
    /// Not parked.
    Idle,
    /// Waiting for the end of the round.
    Parked,
    /// Done (by the queue thread, or by a worker in a batch the leader has collected).
    Done,
    /// First of a worker's batch: waits for the slot's eventfd, then releases the followers.
    Leader,
    /// In a worker's batch behind a leader: done when the leader says so.
    Follower,
}

/// Small pieces of one queue shared between its thread and a worker, a batch at a time.
///
/// Why: at queue depth 32, 4 KiB requests keep one queue thread busy — 70 % of it AES — while
/// the other CPUs idle, where dm-crypt's kcryptd runs the AES on every CPU. Handing a 4 KiB
/// piece to a worker alone costs about what its AES does (a wake-up, an eventfd round trip).
/// So a small piece, when enough requests are in flight ([`BATCH_MIN_IN_FLIGHT`](crate::queue_crypto::BATCH_MIN_IN_FLIGHT)), is parked in
/// its slot; when the round of completions has been served, [`PieceBatch::flush`] gives half of
/// the parked pieces to an idle worker as one batch (one wake-up, one completion) and does the
/// other half on the queue thread meanwhile. One thread only (the queue's): plain cells,
/// preallocated for the queue depth, nothing allocated.
pub struct PieceBatch {
    /// Tags parked this round, in order; capacity = depth, each tag at most once.
    parked: RefCell<Vec<u16>>,
    state: Box<[Cell<PieceState>]>,
    /// The next tag of a worker batch, for the leader to release.
    next: Box<[Cell<Option<u16>>]>,
    wakers: Box<[RefCell<Option<Waker>>]>,
    /// Slot of tag 0 of this queue in [`CryptoWorkers`].
    slot_base: usize,
}

impl PieceBatch {
    pub fn new(depth: usize, slot_base: usize) -> Self {
        PieceBatch {
            parked: RefCell::new(Vec::with_capacity(depth)),
            state: (0..depth).map(|_| Cell::new(PieceState::Idle)).collect(),
            next: (0..depth).map(|_| Cell::new(None)).collect(),
            wakers: (0..depth).map(|_| RefCell::new(None)).collect(),
            slot_base,
        }
    }

    /// A small piece's whole trip: parked in `tag`'s slot, then done by the queue thread at the
    /// end of the round or in a worker's batch. `wait_worker` waits for the slot's eventfd (the
    /// daemon polls it on the queue's io_uring); only a batch's leader calls it.
    #[allow(clippy::too_many_arguments)]
    pub async fn crypt<W: std::future::Future<Output = ()>>(
        &self,
        workers: &CryptoWorkers,
        tag: u16,
        chunk: Chunk<'static>,
        len: usize,
        sector: u64,
        encrypt: bool,
        wait_worker: impl FnOnce() -> W,
    ) -> (Chunk<'static>, bool) {
        let slot = self.slot_base + usize::from(tag);
        workers.park(slot, chunk, len, sector, encrypt);
        self.park(tag);
        match self.role(tag).await {
            PieceState::Leader => {
                wait_worker().await;
                self.release_followers(tag);
            }
            PieceState::Follower => self.released(tag).await,
            _ => {}
        }
        self.reset(tag);
        workers.finish(slot)
    }

    /// Parks `tag`'s piece, already put in its slot with [`CryptoWorkers::park`].
    fn park(&self, tag: u16) {
        self.state[usize::from(tag)].set(PieceState::Parked);
        self.parked.borrow_mut().push(tag);
    }

    /// Waits until the end of the round decides; then the role: `Done`, `Leader` or `Follower`.
    async fn role(&self, tag: u16) -> PieceState {
        self.wait_while(tag, PieceState::Parked).await
    }

    /// A follower waits for its leader's release.
    async fn released(&self, tag: u16) {
        self.wait_while(tag, PieceState::Follower).await;
    }

    async fn wait_while(&self, tag: u16, state: PieceState) -> PieceState {
        let t = usize::from(tag);
        std::future::poll_fn(|cx| {
            let s = self.state[t].get();
            if s == state {
                let mut w = self.wakers[t].borrow_mut();
                if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    *w = Some(cx.waker().clone());
                }
                Poll::Pending
            } else {
                Poll::Ready(s)
            }
        })
        .await
    }

    /// The leader, its batch done: marks the followers done and wakes them.
    fn release_followers(&self, leader: u16) {
        let mut next = self.next[usize::from(leader)].take();
        while let Some(tag) = next {
            next = self.next[usize::from(tag)].take();
            self.set(tag, PieceState::Done);
        }
    }

    /// Back to idle, once the piece's chunk has been collected.
    fn reset(&self, tag: u16) {
        self.state[usize::from(tag)].set(PieceState::Idle);
    }

    fn set(&self, tag: u16, state: PieceState) {
        self.state[usize::from(tag)].set(state);
        if let Some(w) = self.wakers[usize::from(tag)].borrow().as_ref() {
            w.wake_by_ref();
        }
    }

    /// End of a round: the later half of the parked pieces goes to an idle worker as one batch
    /// (first, so it runs meanwhile), the rest is done here. Returns whether anything was
    /// parked (woken tasks then need polling).
    pub fn flush(&self, workers: &CryptoWorkers) -> bool {
        let mut parked = self.parked.borrow_mut();
        let n = parked.len();
        if n == 0 {
            return false;
        }
        let shared = if n >= 2 && workers.worker_idle() {
            n / 2
        } else {
            0
        };
        let (here, there) = parked.split_at(n - shared);
        if let Some(&leader) = there.first() {
            for pair in there.windows(2) {
                self.next[usize::from(pair[0])].set(Some(pair[1]));
                self.state[usize::from(pair[1])].set(PieceState::Follower);
            }
            workers.submit_batch(there.iter().map(|&t| self.slot_base + usize::from(t)));
            self.set(leader, PieceState::Leader);
        }
        for &tag in here {
            workers.run_parked(self.slot_base + usize::from(tag));
            self.set(tag, PieceState::Done);
        }
        parked.clear();
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hardening;
    use ublk_crypt_crypto::SectorCipher;

    fn setup(
        threads: usize,
    ) -> (
        &'static SectorCipher,
        &'static CryptoWorkers,
        &'static ublk_crypt_pool::ReservePool,
    ) {
        use ublk_crypt_crypto::{CipherSpec, Key, SectorLayout};
        let key: Vec<u8> = (1..=64u8).collect();
        let spec: CipherSpec = "aes-xts-plain64".parse().unwrap();
        let cipher: &'static SectorCipher = Box::leak(Box::new(
            SectorCipher::new(spec, &Key::from_bytes(&key), SectorLayout::default()).unwrap(),
        ));
        let workers = CryptoWorkers::start(
            cipher,
            8,
            threads,
            hardening::Protections { enabled: false },
            || {},
        )
        .unwrap();
        let pool = Box::leak(Box::new(
            ublk_crypt_pool::ReservePool::new(ublk_crypt_pool::PoolConfig {
                budget_bytes: 8 * 8192,
                chunk_bytes: 8192,
                queues: 1,
                reserve_per_queue: 1,
                lock: false,
            })
            .unwrap(),
        ));
        (cipher, workers, pool)
    }

    /// Parks `n` 4 KiB pieces (tag t holds bytes t, sector 8t); what each should become.
    fn park_pieces(
        n: u16,
        cipher: &SectorCipher,
        workers: &CryptoWorkers,
        pool: &'static ublk_crypt_pool::ReservePool,
        batch: &PieceBatch,
    ) -> Vec<Vec<u8>> {
        (0..n)
            .map(|t| {
                let mut chunk = pool.try_acquire(0).unwrap();
                chunk[..4096].fill(t as u8);
                let mut want = vec![t as u8; 4096];
                cipher.encrypt(u64::from(t) * 8, &mut want).unwrap();
                workers.park(usize::from(t), chunk, 4096, u64::from(t) * 8, true);
                batch.park(t);
                want
            })
            .collect()
    }

    /// The later half of a round's parked pieces goes to the idle worker as one batch, with one
    /// completion (the leader's eventfd); the rest is done on the calling thread; every piece
    /// comes back encrypted with its own sector number.
    #[test]
    fn a_round_of_small_pieces_is_shared_with_a_worker() {
        let (cipher, workers, pool) = setup(1);
        let batch = PieceBatch::new(8, 0);
        let want = park_pieces(6, cipher, workers, pool, &batch);
        assert!(batch.flush(workers));
        assert!(!batch.flush(workers), "nothing parked any more");
        let states: Vec<_> = (0..6).map(|t| batch.state[t].get()).collect();
        use PieceState::*;
        assert_eq!(states, [Done, Done, Done, Leader, Follower, Follower]);
        // One completion, on the leader's slot only.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !workers.take_done(3) {
            assert!(
                std::time::Instant::now() < deadline,
                "worker never finished"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(!workers.take_done(4) && !workers.take_done(5));
        batch.release_followers(3);
        assert_eq!(batch.state[4].get(), Done);
        assert_eq!(batch.state[5].get(), Done);
        for (t, want) in want.iter().enumerate() {
            let (chunk, ok) = workers.finish(t);
            assert!(ok);
            assert_eq!(&chunk[..4096], &want[..], "piece {t}");
            batch.reset(t as u16);
        }
    }

    /// With no idle worker everything runs on the calling thread at once.
    #[test]
    fn without_an_idle_worker_the_round_runs_inline() {
        let (cipher, workers, pool) = setup(0);
        let batch = PieceBatch::new(8, 0);
        let want = park_pieces(4, cipher, workers, pool, &batch);
        assert!(batch.flush(workers));
        for (t, want) in want.iter().enumerate() {
            assert_eq!(batch.state[t].get(), PieceState::Done);
            let (chunk, ok) = workers.finish(t);
            assert!(ok);
            assert_eq!(&chunk[..4096], &want[..]);
        }
    }

    /// `role` waits while parked and wakes when the round decides.
    #[test]
    fn role_waits_for_the_round() {
        use std::future::Future;
        use std::task::Context;
        let (_, workers, pool) = setup(0);
        let batch = PieceBatch::new(8, 0);
        workers.park(2, pool.try_acquire(0).unwrap(), 512, 0, false);
        batch.park(2);
        let mut fut = std::pin::pin!(batch.role(2));
        let mut cx = Context::from_waker(Waker::noop());
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        batch.flush(workers);
        assert_eq!(fut.as_mut().poll(&mut cx), Poll::Ready(PieceState::Done));
    }
}
