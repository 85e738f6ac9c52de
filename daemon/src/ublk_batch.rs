//! Batched ublk IO commands for one queue (`UBLK_F_BATCH_IO`, Linux 7.0; `--batch-io`): one
//! standing multishot fetch delivers the tags of new requests, several at a time, into
//! buffers the queue provides; the results of a round of requests go back in one commit
//! command. The per-request path (`queue.rs`) keeps one ublk command in flight per tag and
//! spends one command, one completion and one wake-up per request.
//!
//! Why a transport of its own: libublk 0.4.8's `UblkBatchQueue` refuses `UBLK_F_USER_COPY`,
//! on which this daemon's IO path stands, and it allocates as it goes. Here everything is made
//! when the queue starts: the element arrays (one per commit in flight, each for the whole
//! queue depth) and the fetch buffers, which live in a provided-buffer *ring* (shared memory
//! the queue thread refills by moving its tail) rather than being handed back one io_uring
//! operation each, which would allocate in the kernel every time, under memory pressure too.
//!
//! Completions of these commands carry their own `user_data` (below) and are taken out of the
//! reaping loop by [`BatchCommands::handle_cqe`] before libublk's wake-up by slab key; what
//! they cause (a commit to resubmit, the fetch to re-arm) waits for [`BatchCommands::flush`] at
//! the end of the round, when the ring is not borrowed.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::task::{Poll, Waker};

use io_uring::{cqueue, opcode, squeue, types};
use libublk::io::{with_task_io_ring_mut, RawSqe};
use libublk::sys;

use crate::stats::QueueCounters;

/// `struct ublk_elem_header` (`linux/ublk_cmd.h`): one request in a prep or commit command.
/// With user copy the element is this header alone (no buffer address).
#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
struct Elem {
    tag: u16,
    buf_index: u16,
    result: i32,
}

/// Commit commands in flight at once. A commit is done when its command is issued (inline,
/// at the next submit), so more than one is in flight only when io_uring defers one.
const COMMIT_SLOTS: usize = 4;
/// Fetch buffers in the provided-buffer ring (a power of two). Each holds every tag of the
/// queue, so one is enough for any dispatch; the rest cover the dispatches that land before
/// the queue thread has refilled the ring.
const FETCH_BUFFERS: u16 = 8;
/// The provided-buffer group of the fetch buffers (the queue's ring has no other).
const FETCH_GROUP: u16 = 0x7562;
/// `IORING_URING_CMD_MULTISHOT`: the fetch stays armed, one completion per dispatch.
const URING_CMD_MULTISHOT: u32 = 1 << 1;

/// `user_data` of this module's commands: libublk's target bit (so its bookkeeping does not
/// count them as per-request commands), a marker no slab key reaches, the operation and its
/// slot.
const TARGET: u64 = libublk::UblkUringData::Target as u64;
const MARKER: u64 = 0x7562_6174 << 24;
const MARKER_MASK: u64 = 0xffff_ffff << 24;
const OP_PREP: u64 = 1 << 16;
const OP_FETCH: u64 = 2 << 16;
const OP_COMMIT: u64 = 3 << 16;
const OP_MASK: u64 = 0xff << 16;

fn user_data(op: u64, slot: usize) -> u64 {
    TARGET | MARKER | op | slot as u64
}

/// One queue's batched commands: who has a request waiting, the results waiting for the
/// round's commit, the commits in flight, the fetch and its buffers.
pub struct BatchCommands {
    qid: u16,
    /// Per tag: the kernel delivered a request its task has not taken yet.
    fetched: Box<[Cell<bool>]>,
    wakers: Box<[RefCell<Option<Waker>>]>,
    /// The fetch ended for good (the queue stops): waiting tasks return.
    stopped: Cell<bool>,
    /// Results of this round, committed together by [`BatchCommands::flush`]; capacity = depth.
    pending: RefCell<Vec<Elem>>,
    /// Commit commands: each slot's elements stay put until its completion (the kernel may
    /// read them from an io_uring worker); capacity = depth each, empty = free.
    commits: [RefCell<Vec<Elem>>; COMMIT_SLOTS],
    /// Slots whose command must be (re)submitted at the next flush.
    commit_due: [Cell<bool>; COMMIT_SLOTS],
    /// The fetch needs arming (at start, and after it ended short of buffers).
    fetch_due: Cell<bool>,
    /// Fetch completions that brought requests, since the last flush (for the counters).
    fetches: Cell<u64>,
    ring: FetchRing,
}

impl BatchCommands {
    /// Everything queue `qid`'s batched commands will use, allocated and the fetch buffers
    /// registered with the thread's ring: on the queue's thread as soon as its ring exists,
    /// before the device does, so that a standby's takeover (which may come when there is no
    /// free memory) maps nothing new.
    pub fn new(qid: u16, depth: u16) -> std::io::Result<BatchCommands> {
        let ring = FetchRing::new(depth)?;
        Ok(BatchCommands {
            qid,
            fetched: (0..depth).map(|_| Cell::new(false)).collect(),
            wakers: (0..depth).map(|_| RefCell::new(None)).collect(),
            stopped: Cell::new(false),
            pending: RefCell::new(Vec::with_capacity(usize::from(depth))),
            commits: std::array::from_fn(|_| RefCell::new(Vec::with_capacity(usize::from(depth)))),
            commit_due: std::array::from_fn(|_| Cell::new(false)),
            fetch_due: Cell::new(true),
            fetches: Cell::new(0),
            ring,
        })
    }

    /// Prepares every tag of the queue with the kernel (`UBLK_U_IO_PREP_IO_CMDS`, which also
    /// makes the queue ready for START_DEV or the end of a recovery) and leaves the fetch to be
    /// armed by the first [`flush`](Self::flush). On the queue's thread, before any task runs.
    pub fn prepare(&self) -> std::io::Result<()> {
        let depth = self.fetched.len() as u16;
        // The first commit slot (free until the tasks run) holds the elements.
        let mut elems = self.commits[0].borrow_mut();
        elems.clear();
        elems.extend((0..depth).map(|tag| Elem {
            tag,
            ..Elem::default()
        }));
        let sqe = self.command(sys::UBLK_U_IO_PREP_IO_CMDS, &elems, user_data(OP_PREP, 0));
        let r = self.run_sync(sqe);
        elems.clear();
        match r? {
            r if r < 0 => Err(std::io::Error::from_raw_os_error(-r)),
            _ => Ok(()),
        }
    }

    /// Waits until the kernel delivers a request to `tag`; `false`: the queue stops.
    pub async fn next_request(&self, tag: u16) -> bool {
        let t = usize::from(tag);
        poll_fn(|cx| {
            if self.fetched[t].replace(false) {
                return Poll::Ready(true);
            }
            if self.stopped.get() {
                return Poll::Ready(false);
            }
            let mut w = self.wakers[t].borrow_mut();
            if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *w = Some(cx.waker().clone());
            }
            Poll::Pending
        })
        .await
    }

    /// `tag`'s request is served with `result`: committed at the end of the round.
    pub fn complete(&self, tag: u16, result: i32) {
        self.pending.borrow_mut().push(Elem {
            tag,
            buf_index: 0,
            result,
        });
    }

    /// Whether the fetch ended for good.
    pub fn stopped(&self) -> bool {
        self.stopped.get()
    }

    /// End of a round, the ring not borrowed: re-arms the fetch if it ended, resubmits what a
    /// completion left to resubmit, and commits this round's results in one command (if a slot
    /// is free; else at a later round, when one is).
    pub fn flush(&self, counters: &QueueCounters) {
        QueueCounters::add(&counters.batch_fetches, self.fetches.replace(0));
        if self.fetch_due.replace(false) && !self.stopped.get() {
            push(self.fetch_command());
        }
        for (slot, due) in self.commit_due.iter().enumerate() {
            if due.replace(false) {
                QueueCounters::add(&counters.command_retries, 1);
                self.submit_commit(slot);
            }
        }
        let mut pending = self.pending.borrow_mut();
        if pending.is_empty() {
            return;
        }
        let Some(slot) = self.commits.iter().position(|c| c.borrow().is_empty()) else {
            return;
        };
        std::mem::swap(&mut *pending, &mut *self.commits[slot].borrow_mut());
        drop(pending);
        QueueCounters::add(&counters.batch_commits, 1);
        self.submit_commit(slot);
    }

    /// Takes a completion of this module's commands (`true`), or leaves it to the caller.
    /// Runs inside the reaping loop: nothing here touches the ring.
    pub fn handle_cqe(&self, cqe: &cqueue::Entry) -> bool {
        let ud = cqe.user_data();
        if ud & (TARGET | MARKER_MASK) != TARGET | MARKER {
            return false;
        }
        match ud & OP_MASK {
            OP_FETCH => self.fetch_done(cqe.result(), cqe.flags()),
            OP_COMMIT => self.commit_done((ud & 0xffff) as usize, cqe.result()),
            _ => {}
        }
        true
    }

    fn fetch_done(&self, res: i32, flags: u32) {
        if let Some(bid) = cqueue::buffer_select(flags) {
            if res > 0 {
                self.fetches.set(self.fetches.get() + 1);
                for &tag in self.ring.tags(bid, res as usize / 2) {
                    let t = usize::from(tag);
                    if t < self.fetched.len() {
                        self.fetched[t].set(true);
                        // Woken by reference: the waker stays for the tag's next wait (the
                        // same task), so `next_request` need not clone it per request.
                        if let Some(w) = &*self.wakers[t].borrow() {
                            w.wake_by_ref();
                        }
                    }
                }
            }
            self.ring.recycle(bid);
        }
        if cqueue::more(flags) {
            return;
        }
        // The fetch ended. Short of buffers (or of memory, for a moment) it is armed again;
        // aborted (the device stops, or its daemon is replaced), the queue ends.
        if res >= 0 || [libc::ENOBUFS, libc::ENOMEM, libc::EAGAIN, libc::EINTR].contains(&-res) {
            self.fetch_due.set(true);
            return;
        }
        if res != sys::UBLK_IO_RES_ABORT {
            tracing::error!("queue {}: batched fetch failed: errno {}", self.qid, -res);
        }
        self.stopped.set(true);
        for w in self.wakers.iter() {
            if let Some(w) = &*w.borrow() {
                w.wake_by_ref();
            }
        }
    }

    /// A commit's completion: the bytes of elements the kernel took, or an error for the
    /// first element. What is left is resubmitted at the next flush; an element the kernel
    /// refuses is dropped (logged), so one bad element cannot stall the others.
    fn commit_done(&self, slot: usize, res: i32) {
        let Some(cell) = self.commits.get(slot) else {
            return;
        };
        let mut elems = cell.borrow_mut();
        let taken = if res >= 0 {
            (res as usize / std::mem::size_of::<Elem>()).min(elems.len())
        } else if [libc::ENOMEM, libc::EAGAIN, libc::EINTR].contains(&-res) {
            0
        } else {
            if res != sys::UBLK_IO_RES_ABORT {
                tracing::error!(
                    "queue {}: commit of tag {} failed: errno {}",
                    self.qid,
                    elems.first().map_or(0, |e| e.tag),
                    -res
                );
            }
            1.min(elems.len())
        };
        elems.drain(..taken);
        if !elems.is_empty() {
            self.commit_due[slot].set(true);
        }
    }

    fn submit_commit(&self, slot: usize) {
        let elems = self.commits[slot].borrow();
        push(self.command(
            sys::UBLK_U_IO_COMMIT_IO_CMDS,
            &elems,
            user_data(OP_COMMIT, slot),
        ));
    }

    /// A prep or commit command for `elems` (which must stay put until its completion).
    fn command(&self, op: u32, elems: &[Elem], user_data: u64) -> squeue::Entry {
        let header = sys::ublk_batch_io {
            q_id: self.qid,
            flags: 0,
            nr_elem: elems.len() as u16,
            elem_bytes: std::mem::size_of::<Elem>() as u8,
            reserved: 0,
            reserved2: 0,
        };
        opcode::UringCmd16::new(types::Fixed(0), op)
            .cmd(header_bytes(header))
            .addr(Some(elems.as_ptr() as u64))
            .build()
            .user_data(user_data)
    }

    /// The multishot fetch: each completion names a buffer of [`FETCH_GROUP`] holding the
    /// tags of newly dispatched requests, two bytes each.
    fn fetch_command(&self) -> squeue::Entry {
        let header = sys::ublk_batch_io {
            q_id: self.qid,
            flags: 0,
            nr_elem: 0,
            elem_bytes: std::mem::size_of::<u16>() as u8,
            reserved: 0,
            reserved2: 0,
        };
        let mut sqe = opcode::UringCmd16::new(types::Fixed(0), sys::UBLK_U_IO_FETCH_IO_CMDS)
            .cmd(header_bytes(header))
            .build()
            .flags(squeue::Flags::BUFFER_SELECT)
            .user_data(user_data(OP_FETCH, 0));
        // SAFETY: `RawSqe` is libublk's `repr(C)` image of the 64-byte `io_uring_sqe` that an
        // `squeue::Entry` wraps (libublk's own batch transport sets these two fields the same
        // way); the io-uring builder has no setter for a buffer group on a uring_cmd.
        unsafe {
            let raw: &mut RawSqe = &mut *(&mut sqe as *mut squeue::Entry).cast::<RawSqe>();
            raw.rw_flags |= URING_CMD_MULTISHOT;
            raw.buf_index = FETCH_GROUP;
        }
        sqe
    }

    /// Submits `sqe` and waits for its completion, before the queue's tasks exist.
    fn run_sync(&self, sqe: squeue::Entry) -> std::io::Result<i32> {
        let want = sqe.get_user_data();
        push(sqe);
        loop {
            let found = with_task_io_ring_mut(|ring| -> std::io::Result<Option<i32>> {
                ring.submit_and_wait(1)?;
                let mut found = None;
                for cqe in ring.completion() {
                    if cqe.user_data() == want {
                        found = Some(cqe.result());
                    } else {
                        libublk::uring_async::ublk_wake_task(cqe.user_data(), &cqe);
                    }
                }
                Ok(found)
            })?;
            if let Some(r) = found {
                return Ok(r);
            }
        }
    }
}

impl Drop for BatchCommands {
    fn drop(&mut self) {
        // The kernel may write into the buffers until the group is gone.
        let _ = with_task_io_ring_mut(|ring| ring.submitter().unregister_buf_ring(FETCH_GROUP));
    }
}

fn header_bytes(header: sys::ublk_batch_io) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..2].copy_from_slice(&header.q_id.to_ne_bytes());
    b[2..4].copy_from_slice(&header.flags.to_ne_bytes());
    b[4..6].copy_from_slice(&header.nr_elem.to_ne_bytes());
    b[6] = header.elem_bytes;
    b[7] = header.reserved;
    b[8..16].copy_from_slice(&header.reserved2.to_ne_bytes());
    b
}

/// Queues `sqe` on the thread's ring, submitting first if the submission queue is full.
fn push(sqe: squeue::Entry) {
    with_task_io_ring_mut(|ring| loop {
        // SAFETY: every buffer an SQE of this module points at (element arrays, the fetch
        // ring) lives in the `BatchCommands`, which outlasts the queue's ring traffic.
        if unsafe { ring.submission().push(&sqe) }.is_ok() {
            break;
        }
        let _ = ring.submit();
    })
}

/// The fetch buffers and the provided-buffer ring that hands them to the kernel: one mapping,
/// the ring's page first, then [`FETCH_BUFFERS`] buffers of `depth` tags.
struct FetchRing {
    base: *mut u8,
    len: usize,
    buf_bytes: usize,
    /// The ring's tail as this thread last published it.
    tail: Cell<u16>,
}

const PAGE: usize = 4096;

impl FetchRing {
    fn new(depth: u16) -> std::io::Result<FetchRing> {
        let buf_bytes = usize::from(depth) * 2;
        let len = PAGE + usize::from(FETCH_BUFFERS) * buf_bytes;
        // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ring = FetchRing {
            base: base.cast(),
            len,
            buf_bytes,
            tail: Cell::new(0),
        };
        // SAFETY: the ring's page is page-aligned and holds FETCH_BUFFERS entries (16 bytes
        // each); it stays mapped until `drop`, after the group is unregistered.
        with_task_io_ring_mut(|r| unsafe {
            r.submitter()
                .register_buf_ring_with_flags(base as u64, FETCH_BUFFERS, FETCH_GROUP, 0)
        })?;
        for bid in 0..FETCH_BUFFERS {
            ring.recycle(bid);
        }
        Ok(ring)
    }

    /// The first `n` tags in buffer `bid` (as the kernel wrote them).
    fn tags(&self, bid: u16, n: usize) -> &[u16] {
        let n = n.min(self.buf_bytes / 2);
        if bid >= FETCH_BUFFERS {
            return &[];
        }
        // SAFETY: buffer `bid` lies inside the mapping, 2-byte aligned, `buf_bytes` long; the
        // kernel wrote it before posting the completion and does not touch it again until it
        // is back in the ring (`recycle`, after the caller is done with the slice).
        unsafe {
            std::slice::from_raw_parts(
                self.base
                    .add(PAGE + usize::from(bid) * self.buf_bytes)
                    .cast::<u16>(),
                n,
            )
        }
    }

    /// Hands buffer `bid` (back) to the kernel: its entry at the tail, then the tail moved.
    fn recycle(&self, bid: u16) {
        let tail = self.tail.get();
        let mask = FETCH_BUFFERS - 1;
        // SAFETY: entry `tail & mask` lies in the ring's page (16-byte `io_uring_buf` each);
        // the kernel reads entries only below the tail published next, with release order.
        unsafe {
            let entry = &mut *self
                .base
                .cast::<types::BufRingEntry>()
                .add(usize::from(tail & mask));
            entry.set_addr(self.base.add(PAGE + usize::from(bid) * self.buf_bytes) as u64);
            entry.set_len(self.buf_bytes as u32);
            entry.set_bid(bid);
            let tail_ptr = types::BufRingEntry::tail(self.base.cast::<types::BufRingEntry>())
                .cast_mut()
                .cast::<std::sync::atomic::AtomicU16>();
            (*tail_ptr).store(tail.wrapping_add(1), std::sync::atomic::Ordering::Release);
        }
        self.tail.set(tail.wrapping_add(1));
    }
}

impl Drop for FetchRing {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`; the group was unregistered first
        // (`BatchCommands::drop` runs before its fields are dropped).
        unsafe {
            libc::munmap(self.base.cast(), self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elements_and_header_match_the_kernel() {
        assert_eq!(std::mem::size_of::<Elem>(), 8);
        assert_eq!(std::mem::size_of::<sys::ublk_batch_io>(), 16);
        let b = header_bytes(sys::ublk_batch_io {
            q_id: 3,
            flags: 0,
            nr_elem: 5,
            elem_bytes: 8,
            reserved: 0,
            reserved2: 0,
        });
        assert_eq!(&b[..8], &[3, 0, 0, 0, 5, 0, 8, 0]);
    }

    #[test]
    fn own_user_data_is_recognised_and_libublks_is_not() {
        let ud = user_data(OP_COMMIT, 2);
        assert_eq!(ud & (TARGET | MARKER_MASK), TARGET | MARKER);
        assert_eq!(ud & OP_MASK, OP_COMMIT);
        assert_eq!(ud & 0xffff, 2);
        // libublk's futures: target bit, slab key << 16; per-request commands: no target bit.
        for theirs in [TARGET | 7 << 16, 5 << 16 | 3, TARGET] {
            assert_ne!(theirs & (TARGET | MARKER_MASK), TARGET | MARKER);
        }
    }
}
