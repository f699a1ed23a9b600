//! Reused buffers for the large copies a big write makes at a high rate:
//! each FUSE write's bytes (up to 1 MiB, copied off the session thread's
//! buffer) and each write-behind part (8 MiB, read back from the spill file
//! for its UploadPart).
//!
//! Allocated fresh, every such buffer is memory glibc takes from the kernel
//! and gives back on free; the kernel zeroes each page again on its first
//! touch. In a 1 GiB write that zeroing was a fifth of the daemon's CPU, on
//! a machine whose other core runs the S3 server. A pool keeps up to `keep`
//! buffers of `size` bytes (as mountpoint-s3 and JuiceFS keep theirs): a
//! mount that has run a large write holds them while idle.
//!
//! The buffers that are not ours (the HTTP client's receive buffers, the
//! SDK's collected bodies) churn the same way; `keep_freed_memory` tunes
//! glibc's allocator to reuse them instead.

use bytes::Bytes;
use std::sync::{Arc, Mutex};

#[derive(Debug)]
pub struct BufferPool {
    size: usize,
    keep: usize,
    free: Mutex<Vec<Vec<u8>>>,
}

/// A buffer from a pool, back in it when dropped. Its bytes are the first
/// `len` of a buffer of the pool's size (or, for more than that, a buffer of
/// its own that is not kept).
#[derive(Debug)]
pub struct PooledBuffer {
    buf: Vec<u8>,
    len: usize,
    pool: Arc<BufferPool>,
}

impl BufferPool {
    pub fn new(size: usize, keep: usize) -> Arc<BufferPool> {
        Arc::new(BufferPool {
            size,
            keep,
            free: Mutex::new(Vec::new()),
        })
    }

    /// A buffer of `len` bytes, whose contents are left over from its last
    /// use: the caller overwrites all of them.
    pub fn take(self: &Arc<Self>, len: usize) -> PooledBuffer {
        let reused = if len <= self.size {
            self.free.lock().unwrap_or_else(|p| p.into_inner()).pop()
        } else {
            None
        };
        let buf = reused.unwrap_or_else(|| vec![0; len.max(self.size)]);
        PooledBuffer {
            buf,
            len,
            pool: self.clone(),
        }
    }

    /// A buffer holding a copy of `data`.
    pub fn copy_of(self: &Arc<Self>, data: &[u8]) -> PooledBuffer {
        let mut buf = self.take(data.len());
        buf.copy_from_slice(data);
        buf
    }

    /// How many buffers wait for reuse.
    pub fn idle(&self) -> usize {
        self.free.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl PooledBuffer {
    /// The bytes as `Bytes` (for a request body), still returned to the pool
    /// once the last clone is dropped.
    pub fn into_bytes(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl std::ops::Deref for PooledBuffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl std::ops::DerefMut for PooledBuffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.buf[..self.len]
    }
}

impl AsRef<[u8]> for PooledBuffer {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        if self.buf.len() != self.pool.size {
            return; // larger than the pool's buffers: not kept
        }
        let mut free = self.pool.free.lock().unwrap_or_else(|p| p.into_inner());
        if free.len() < self.pool.keep {
            free.push(std::mem::take(&mut self.buf));
        }
    }
}

/// Makes glibc keep freed memory for reuse rather than return it to the
/// kernel at once: allocations up to 32 MiB (a part, a receive buffer) come
/// from its heaps instead of an `mmap` each, and a heap is trimmed only past
/// 128 MiB of free space at its top. A 1 GiB cold read through a 20 ms
/// proxy then took 3.3 s and 2.6 s of the daemon's CPU, against 3.6-4.0 s
/// and 3.3-3.7 s with glibc's defaults; the same write + publish, 1.9-2.4 s
/// of CPU against 2.6 s. Called first thing by both programs; a no-op where
/// the C library is not glibc.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets the allocator's parameters; it is called
    // before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 20);
        libc::mallopt(libc::M_TOP_PAD, 16 << 20);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_up_to_keep_and_oversized_ones_are_not_kept() {
        let pool = BufferPool::new(8, 2);
        let a = pool.copy_of(b"abc");
        let b = pool.copy_of(b"12345678");
        let c = pool.take(4);
        assert_eq!(
            (&a[..], &b[..], c.len()),
            (&b"abc"[..], &b"12345678"[..], 4)
        );
        drop((a, b, c));
        assert_eq!(pool.idle(), 2, "a third buffer is freed, not kept");

        let reused = pool.copy_of(b"xy");
        assert_eq!((&reused[..], pool.idle()), (&b"xy"[..], 1));
        let big = pool.copy_of(&[7; 20]);
        assert_eq!(big.len(), 20);
        drop(big);
        assert_eq!(
            pool.idle(),
            1,
            "a buffer larger than the pool's is not kept"
        );

        let bytes = reused.into_bytes();
        let clone = bytes.clone();
        drop(bytes);
        assert_eq!(
            (&clone[..], pool.idle()),
            (&b"xy"[..], 1),
            "held by a clone"
        );
        drop(clone);
        assert_eq!(pool.idle(), 2);
    }
}
