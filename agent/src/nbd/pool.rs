//! Buffers for READ replies, reused: a copy reads gigabytes through a few dozen buffers
//! instead of allocating (and zero-filling) a fresh one per request. A buffer goes back to the
//! pool when the last `Bytes` made from it is dropped (after the write that sent it).
//!
//! A reused buffer holds old data, so a reply must cover every byte of its request; the
//! reader checks that (`Coverage`) before the data reaches the caller.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// Buffers come in power-of-two sizes from 4 KiB up; a request takes the class that fits it.
const MIN_CLASS: u32 = 12;
const CLASSES: usize = 14; // 4 KiB .. 32 MiB
/// Bytes kept idle at most, all classes together; more are freed when they come back.
const KEEP_BYTES: usize = 64 << 20;

pub struct Pool {
    free: [Mutex<Vec<Vec<u8>>>; CLASSES],
    idle: AtomicUsize,
}

/// The process's pool of read buffers (shared by every connection).
pub fn pool() -> &'static Arc<Pool> {
    static POOL: std::sync::OnceLock<Arc<Pool>> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        Arc::new(Pool {
            free: std::array::from_fn(|_| Mutex::new(Vec::new())),
            idle: AtomicUsize::new(0),
        })
    })
}

fn class_of(len: usize) -> Option<usize> {
    let bits = len
        .max(1)
        .next_power_of_two()
        .trailing_zeros()
        .max(MIN_CLASS);
    let c = (bits - MIN_CLASS) as usize;
    (c < CLASSES).then_some(c)
}

impl Pool {
    /// A buffer of `len` bytes, whose contents are whatever its last user left.
    pub fn take(self: &Arc<Self>, len: usize) -> PoolBuf {
        let class = class_of(len);
        let reused =
            class.and_then(|c| self.free[c].lock().unwrap_or_else(|e| e.into_inner()).pop());
        if let Some(b) = &reused {
            self.idle.fetch_sub(b.len(), Ordering::Relaxed);
        }
        let buf = reused.unwrap_or_else(|| match class {
            // calloc'd: fresh pages are mapped lazily, no fill
            Some(c) => vec![0u8; 1 << (c as u32 + MIN_CLASS)],
            None => vec![0u8; len],
        });
        PoolBuf {
            buf,
            len,
            pool: self.clone(),
        }
    }

    fn give_back(&self, buf: Vec<u8>) {
        let Some(c) = class_of(buf.len()).filter(|c| buf.len() == 1 << (*c as u32 + MIN_CLASS))
        else {
            return;
        };
        let mut free = self.free[c].lock().unwrap_or_else(|e| e.into_inner());
        // Counted under the class's lock, so `take` cannot see the buffer before its bytes.
        let idle = self.idle.fetch_add(buf.len(), Ordering::Relaxed);
        if idle + buf.len() <= KEEP_BYTES {
            free.push(buf);
        } else {
            self.idle.fetch_sub(buf.len(), Ordering::Relaxed);
        }
    }

    /// Idle buffers per class (for tests).
    #[cfg(test)]
    pub fn idle(&self, len: usize) -> usize {
        class_of(len).map_or(0, |c| self.free[c].lock().unwrap().len())
    }
}

/// A buffer on loan from the pool; back when dropped.
pub struct PoolBuf {
    buf: Vec<u8>,
    len: usize,
    pool: Arc<Pool>,
}

impl PoolBuf {
    /// Shares the buffer without a copy; it returns to the pool when the last clone is gone.
    pub fn freeze(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for PoolBuf {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl AsMut<[u8]> for PoolBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.buf[..self.len]
    }
}

impl Drop for PoolBuf {
    fn drop(&mut self) {
        self.pool.give_back(std::mem::take(&mut self.buf));
    }
}

/// Which bytes of a READ the reply chunks covered (as sorted, merged ranges), so that a reply
/// leaving a gap (old data from a reused buffer) or covering a byte twice is refused.
#[derive(Debug, Default)]
pub struct Coverage {
    ranges: Vec<(u64, u64)>,
    overlap: bool,
}

impl Coverage {
    /// Notes `start..end` (relative to the request) as covered.
    pub fn add(&mut self, start: u64, end: u64) {
        if start == end {
            return;
        }
        // Replies come in order almost always: extend the last range (the one that starts
        // last, as the ranges are sorted).
        if let Some(last) = self.ranges.last_mut()
            && last.1 == start
        {
            last.1 = end;
            return;
        }
        let at = self.ranges.partition_point(|r| r.0 < start);
        if self.ranges.get(at).is_some_and(|r| r.0 < end) || at > 0 && self.ranges[at - 1].1 > start
        {
            self.overlap = true;
        }
        self.ranges.insert(at, (start, end));
    }

    /// Whether exactly `0..length` was covered, each byte once.
    pub fn is_exactly(&self, length: u64) -> bool {
        if self.overlap {
            return false;
        }
        let mut at = 0;
        for &(s, e) in &self.ranges {
            if s != at {
                return false;
            }
            at = e;
        }
        at == length
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_when_the_last_bytes_are_dropped() {
        let pool = Arc::new(Pool {
            free: std::array::from_fn(|_| Mutex::new(Vec::new())),
            idle: AtomicUsize::new(0),
        });
        let mut b = pool.take(3000);
        b.as_mut().fill(7);
        let bytes = b.freeze();
        let part = bytes.slice(10..20);
        drop(bytes);
        assert_eq!(pool.idle(4096), 0, "a slice still holds it");
        assert_eq!(&part[..], &[7u8; 10]);
        drop(part);
        assert_eq!(pool.idle(4096), 1);
        let again = pool.take(4096);
        assert_eq!(again.as_ref().len(), 4096);
        assert_eq!(pool.idle(4096), 0, "reused");
        let big = pool.take(40 << 20);
        assert_eq!(
            big.as_ref().len(),
            40 << 20,
            "beyond the classes: allocated as asked"
        );
        drop(big);
        assert_eq!(pool.idle(40 << 20), 0, "and not kept");
        let many: Vec<_> = (0..40).map(|_| pool.take(2 << 20)).collect();
        drop(many);
        assert_eq!(
            pool.idle(2 << 20),
            KEEP_BYTES / (2 << 20),
            "idle bytes are capped"
        );
    }

    #[test]
    fn coverage_accepts_exact_tilings_in_any_order_only() {
        let mut c = Coverage::default();
        c.add(0, 10);
        c.add(10, 30);
        assert!(c.is_exactly(30));
        assert!(!c.is_exactly(31), "a gap at the end");
        let mut c = Coverage::default();
        c.add(20, 30);
        c.add(0, 10);
        assert!(!c.is_exactly(30), "a gap in the middle");
        c.add(10, 20);
        assert!(c.is_exactly(30), "out of order");
        let mut c = Coverage::default();
        c.add(0, 20);
        c.add(10, 30);
        c.add(20, 30);
        assert!(!c.is_exactly(30), "overlap");
        let mut c = Coverage::default();
        c.add(10, 20);
        c.add(0, 15);
        assert!(!c.is_exactly(20), "overlap before");
    }
}
