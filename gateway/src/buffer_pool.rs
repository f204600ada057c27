//! Per-thread reuse of the relays' large buffers, for both wings: the node's io_uring
//! threads and the proxy's single-threaded runtimes each keep their own list, so it needs no
//! lock. Ground floor: imports nothing of ours.
//!
//! Two ways to take a buffer: [`take`] gives an empty one with room (the node appends what
//! rustls or a read produced), [`take_filled`] one of initialized bytes to read into (the
//! proxy hands it to `poll_read`); such a buffer is zeroed once when it is made, never per
//! use, and only the bytes a read just wrote are ever looked at.
//!
//! A connection holds a large buffer only while it moves bulk data; an idle connection
//! keeps a small read posted (see `node::relay`), so 10 000 idle connections cost kilobytes
//! each, not the 64 KiB their budgets allow.

use std::cell::RefCell;

/// Buffers a thread keeps for reuse (more are freed): enough for the reads in flight on a
/// busy thread (4 MiB of the proxy's 64 KiB chunks), small next to the sessions it serves.
const KEEP: usize = 64;

thread_local! {
    static POOL: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// An empty buffer with at least `capacity` bytes of room, reused when one is free.
pub fn take(capacity: usize) -> Vec<u8> {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        match p.iter().rposition(|b| b.capacity() >= capacity) {
            Some(i) => {
                let mut b = p.swap_remove(i);
                b.clear();
                b
            }
            None => Vec::with_capacity(capacity),
        }
    })
}

/// A buffer of `len` initialized bytes to read into. Its contents are stale (a previous
/// read's): the caller uses only what its own read writes.
pub fn take_filled(len: usize) -> Vec<u8> {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        match p.iter().rposition(|b| b.len() >= len) {
            Some(i) => {
                let mut b = p.swap_remove(i);
                b.truncate(len);
                b
            }
            None => vec![0u8; len],
        }
    })
}

/// Returns a buffer for reuse. Its bytes stay initialized for [`take_filled`]; [`take`]
/// empties it before handing it out.
pub fn give(b: Vec<u8>) {
    if b.capacity() == 0 {
        return;
    }
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

    #[test]
    fn filled_buffers_are_reused_without_zeroing_and_plain_takes_come_empty() {
        let mut b = take_filled(4096);
        assert_eq!(b.len(), 4096);
        assert!(b.iter().all(|&x| x == 0), "made zeroed");
        b[..5].copy_from_slice(b"hello");
        let ptr = b.as_ptr();
        give(b);
        // The same buffer comes back with its bytes (only what a read writes is used).
        let b = take_filled(1024);
        assert_eq!((b.as_ptr(), b.len()), (ptr, 1024));
        assert_eq!(&b[..5], b"hello");
        give(b);
        // A buffer too short for the request is not taken; a new zeroed one is made.
        let big = take_filled(8192);
        assert_ne!(big.as_ptr(), ptr);
        assert!(big.iter().all(|&x| x == 0));
        // A plain take empties what it reuses.
        let b = take(512);
        assert_eq!((b.as_ptr(), b.len()), (ptr, 0));
        give(big);
    }
}
