//! A chunk cut in two, so that two threads can work on its halves at once.
//!
//! Why: a lone large request (one `dd` or fio job at queue depth 1) has its AES on one thread,
//! while dm-crypt's kcryptd spreads the pieces of one bio over every CPU. The daemon's queue
//! thread keeps the [`ChunkHead`] and encrypts it, a crypto worker gets the [`ChunkTail`] (it
//! is `Send`), and the two are joined back into the [`Chunk`] once the worker is done. No copy
//! and no second chunk: the forward-progress rule (one chunk per IO) is untouched.
//!
//! The head owns the chunk and shows only its first `at` bytes; the tail shows the rest. A head
//! dropped without its tail (a future cancelled while the worker still holds the tail) leaks
//! the chunk instead of returning it: the pool must never hand out bytes another thread may
//! still be writing. The region lives as long as the pool, and the tail borrows the pool, so
//! the tail can never point into unmapped memory.

use std::fmt;
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

use crate::pool::{Chunk, ReservePool};

/// The first part of a split chunk: owns the chunk, shows bytes `..at`.
pub struct ChunkHead<'a> {
    chunk: Option<Chunk<'a>>,
    ptr: NonNull<u8>,
    at: usize,
}

/// The rest of a split chunk, bytes `at..`: give it to another thread, then
/// [`ChunkHead::join`] it back.
pub struct ChunkTail<'a> {
    ptr: NonNull<u8>,
    len: usize,
    _pool: PhantomData<&'a ReservePool>,
}

// SAFETY: the head and the tail cover disjoint bytes of one chunk, and each is the only handle
// to its bytes (the head never derefs the whole chunk while split), so either may move to or be
// read from any thread, like `&mut [u8]` / `&[u8]`.
unsafe impl Send for ChunkHead<'_> {}
// SAFETY: as above: `&ChunkHead` only reads its own bytes.
unsafe impl Sync for ChunkHead<'_> {}
// SAFETY: as above, for the tail's bytes.
unsafe impl Send for ChunkTail<'_> {}
// SAFETY: as above: `&ChunkTail` only reads its own bytes.
unsafe impl Sync for ChunkTail<'_> {}

impl<'a> Chunk<'a> {
    /// Cuts the chunk at byte `at` (`0 < at < len()`): the head keeps `..at`, the tail `at..`.
    pub fn split_at(mut self, at: usize) -> (ChunkHead<'a>, ChunkTail<'a>) {
        assert!(at > 0 && at < self.len(), "split of a chunk at {at}");
        let len = self.len() - at;
        let ptr = NonNull::new(self.as_mut_ptr()).expect("chunks are never null");
        // SAFETY: `at < len()`, so the result stays inside the chunk.
        let tail = unsafe { ptr.add(at) };
        (
            ChunkHead {
                chunk: Some(self),
                ptr,
                at,
            },
            ChunkTail {
                ptr: tail,
                len,
                _pool: PhantomData,
            },
        )
    }
}

impl<'a> ChunkHead<'a> {
    /// Puts the chunk back together. Panics if `tail` is not this head's own tail (a bug: the
    /// halves of two chunks mixed up).
    pub fn join(mut self, tail: ChunkTail<'a>) -> Chunk<'a> {
        // SAFETY: `at` is inside the chunk (checked at the split).
        let own_tail = unsafe { self.ptr.add(self.at) };
        assert!(
            tail.ptr == own_tail
                && self.at + tail.len == self.chunk.as_ref().map_or(0, |c| c.len()),
            "join of a chunk with another chunk's tail"
        );
        self.chunk
            .take()
            .expect("a head holds its chunk until joined")
    }
}

impl Drop for ChunkHead<'_> {
    fn drop(&mut self) {
        if let Some(chunk) = self.chunk.take() {
            // Never joined: the tail may still be in use on another thread, so the chunk must
            // not go back to the pool. Leaked (see the module doc).
            std::mem::forget(chunk);
        }
    }
}

impl Deref for ChunkHead<'_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: bytes `..at` of a chunk this head owns; the tail never covers them.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.at) }
    }
}

impl DerefMut for ChunkHead<'_> {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` makes this the only access through the head.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.at) }
    }
}

impl Deref for ChunkTail<'_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: bytes `at..` of a held chunk; the head never covers them and the chunk
        // cannot return to the pool before the tail is joined back (or it is leaked).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for ChunkTail<'_> {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` makes this the only access through the tail.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl fmt::Debug for ChunkHead<'_> {
    // Never prints the contents: they are plaintext or ciphertext.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChunkHead").field("len", &self.at).finish()
    }
}

impl fmt::Debug for ChunkTail<'_> {
    // Never prints the contents: they are plaintext or ciphertext.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChunkTail").field("len", &self.len).finish()
    }
}
