//! Fakes for driving the IO path without a kernel: an in-memory request and backing.
#![allow(dead_code)] // each test file uses its own subset

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use ublk_crypt::io::{BackingIo, RequestData};

/// The request's pages.
pub struct MemRequest(pub RefCell<Vec<u8>>);

impl RequestData for MemRequest {
    fn copy_out(&self, offset: u32, buf: &mut [u8]) -> Result<(), i32> {
        let o = offset as usize;
        buf.copy_from_slice(&self.0.borrow()[o..o + buf.len()]);
        Ok(())
    }
    fn copy_in(&self, offset: u32, buf: &[u8]) -> Result<(), i32> {
        let o = offset as usize;
        self.0.borrow_mut()[o..o + buf.len()].copy_from_slice(buf);
        Ok(())
    }
}

/// Where suspended backing operations park their wakers until the test "reaps completions",
/// like libublk waking futures when io_uring CQEs arrive. Capacity is reserved up front so
/// parking never allocates.
pub struct Completions(pub RefCell<Vec<Waker>>);

impl Default for Completions {
    fn default() -> Self {
        Completions(RefCell::new(Vec::with_capacity(1024)))
    }
}

impl Completions {
    /// Wakes every parked operation; returns how many.
    pub fn reap(&self) -> usize {
        let mut v = self.0.borrow_mut();
        let n = v.len();
        for w in v.drain(..) {
            w.wake();
        }
        n
    }
}

/// Pending once, then ready: like an io_uring operation whose completion arrives later.
pub struct Suspend<'a> {
    pub done: bool,
    pub completions: &'a Completions,
}
impl Future for Suspend<'_> {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.done {
            Poll::Ready(())
        } else {
            self.done = true;
            self.completions.0.borrow_mut().push(cx.waker().clone());
            Poll::Pending
        }
    }
}

/// A backing disk in memory. `max_transfer` forces short transfers; `fail` injects an errno
/// into every operation, or into the next `fail_left` ones.
pub struct MemBacking {
    pub data: RefCell<Vec<u8>>,
    pub max_transfer: usize,
    pub fail: Option<i32>,
    pub fail_left: std::cell::Cell<u32>,
    pub flushes: RefCell<u32>,
    pub discards: RefCell<Vec<(u64, u64)>>,
    /// If set, every read/write suspends until the completions are reaped.
    pub completions: Option<&'static Completions>,
}

impl MemBacking {
    pub fn new(len: usize) -> Self {
        MemBacking {
            data: RefCell::new(vec![0; len]),
            max_transfer: usize::MAX,
            fail: None,
            fail_left: std::cell::Cell::new(u32::MAX),
            flushes: RefCell::new(0),
            discards: RefCell::new(Vec::new()),
            completions: None,
        }
    }
    /// The injected error, if this operation is to fail.
    fn failure(&self) -> Option<i32> {
        let e = self.fail?;
        let left = self.fail_left.get();
        if left == 0 {
            return None;
        }
        self.fail_left.set(left - 1);
        Some(-e)
    }
    async fn op_delay(&self) {
        if let Some(c) = self.completions {
            Suspend {
                done: false,
                completions: c,
            }
            .await;
        }
    }
}

impl BackingIo for MemBacking {
    async fn read_at(&self, buf: &mut [u8], offset: u64) -> i32 {
        self.op_delay().await;
        if let Some(e) = self.failure() {
            return e;
        }
        let n = buf.len().min(self.max_transfer);
        let o = offset as usize;
        buf[..n].copy_from_slice(&self.data.borrow()[o..o + n]);
        n as i32
    }
    async fn write_at(&self, buf: &[u8], offset: u64) -> i32 {
        self.op_delay().await;
        if let Some(e) = self.failure() {
            return e;
        }
        let n = buf.len().min(self.max_transfer);
        let o = offset as usize;
        self.data.borrow_mut()[o..o + n].copy_from_slice(&buf[..n]);
        n as i32
    }
    async fn flush(&self) -> i32 {
        if let Some(e) = self.failure() {
            return e;
        }
        *self.flushes.borrow_mut() += 1;
        0
    }
    async fn discard(&self, offset: u64, len: u64) -> i32 {
        if let Some(e) = self.failure() {
            return e;
        }
        self.discards.borrow_mut().push((offset, len));
        0
    }
}

/// Yields once: pending, but wakes itself at once (for busy-waiting on something that has no
/// waker, such as a polled eventfd).
#[derive(Default)]
pub struct YieldNow(bool);

impl Future for YieldNow {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            Poll::Ready(())
        } else {
            self.0 = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }
}
