//! Per-thread reuse of the relays' large buffers. Each data-plane thread runs its own
//! io_uring runtime, so a thread-local list needs no lock. Ground floor: imports nothing of
//! ours.
//!
//! A connection holds a large buffer only while it moves bulk data; an idle connection
//! keeps a small read posted (see `node::relay`), so 10 000 idle connections cost kilobytes
//! each, not the 64 KiB their budgets allow.

use std::cell::RefCell;

/// Buffers a thread keeps for reuse; more are freed.
const KEEP: usize = 64;

thread_local! {
    static POOL: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// An empty buffer with at least `capacity` bytes of room, reused when one is free.
pub fn take(capacity: usize) -> Vec<u8> {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        match p.iter().rposition(|b| b.capacity() >= capacity) {
            Some(i) => p.swap_remove(i),
            None => Vec::with_capacity(capacity),
        }
    })
}

/// Returns a buffer for reuse (emptied; its contents are never read again).
pub fn give(mut b: Vec<u8>) {
    if b.capacity() == 0 {
        return;
    }
    b.clear();
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < KEEP {
            p.push(b);
        }
    });
}

/// A read buffer that is small while reads are small and large while they fill it, so an
/// idle connection's posted read pins little memory and a bulk transfer still moves a
/// record (or a budget) per system call without allocating per message.
pub struct AdaptiveBuf {
    buf: Vec<u8>,
    small: usize,
    large: usize,
}

impl AdaptiveBuf {
    pub fn new(small: usize, large: usize) -> Self {
        Self {
            buf: Vec::with_capacity(small),
            small,
            large: large.max(small),
        }
    }

    /// The buffer for the next read (empty, with the room the last read suggested).
    pub fn take(&mut self) -> Vec<u8> {
        let mut b = std::mem::take(&mut self.buf);
        b.clear();
        b
    }

    /// Takes the buffer back after a read of `n` bytes and sizes the next read: a full
    /// read means more is waiting (go large), a short one means the burst is over.
    pub fn put_back(&mut self, b: Vec<u8>, n: usize) {
        let full = n >= b.capacity();
        self.buf = if full && b.capacity() < self.large {
            give(b);
            take(self.large)
        } else if !full && b.capacity() > self.small {
            give(b);
            Vec::with_capacity(self.small)
        } else {
            b
        };
    }
}

impl Drop for AdaptiveBuf {
    fn drop(&mut self) {
        if self.buf.capacity() > self.small {
            give(std::mem::take(&mut self.buf));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adaptive_buffer_grows_on_full_reads_and_shrinks_on_short_ones() {
        let mut a = AdaptiveBuf::new(2048, 32 * 1024);
        let b = a.take();
        assert_eq!(b.capacity(), 2048);
        // A full read: the next one gets the large size.
        a.put_back(b, 2048);
        let b = a.take();
        assert!(b.capacity() >= 32 * 1024);
        // Still full: stays large (the same buffer, no allocation).
        let ptr = b.as_ptr();
        a.put_back(b, 32 * 1024);
        let b = a.take();
        assert_eq!(b.as_ptr(), ptr);
        // A short read ends the burst: back to small, the large one to the pool.
        a.put_back(b, 10);
        let b = a.take();
        assert_eq!(b.capacity(), 2048);
        let reused = take(32 * 1024);
        assert_eq!(
            reused.as_ptr(),
            ptr,
            "the large buffer is reused from the pool"
        );
    }
}
