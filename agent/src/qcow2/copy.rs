//! A whole chain into a fresh sparse file: chunks read from the chain and written to the file
//! on a few blocking threads, each chunk within a deadline. Like the copy engine's full copy,
//! every 4 KiB block that reads as zeros is skipped (the new file reads as zeros there), so
//! the file is as sparse as `qemu-img convert -S 4k` makes it.

use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use futures::{StreamExt, TryStreamExt};

use super::Chain;
use crate::copy::{CopyError, CopyStats, FileSink, Progress, is_zero, within};

/// Bytes per chunk: a chunk is read, scanned and written by one thread.
pub const CHUNK: usize = 2 << 20;
/// Chunks in flight: memory is bounded by this many chunk buffers.
pub const IN_FLIGHT: usize = 4;
/// Zero blocks of this size (aligned to it) are not written.
const BLOCK: usize = 4096;

/// Copies the whole disk of `chain` into `sink` (a new file that reads as zeros), then syncs
/// it. `progress` advances chunk by chunk.
pub async fn copy_to_file(
    chain: Arc<Chain>,
    sink: &FileSink,
    progress: &Progress,
) -> Result<CopyStats, CopyError> {
    let size = chain.size();
    if size > sink.size() {
        return Err(CopyError::OutOfRange {
            start: 0,
            length: size,
            size: sink.size(),
            side: "target",
        });
    }
    progress.total.store(size, Ordering::Relaxed);
    let buffers: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let chunks = (0..size.div_ceil(CHUNK as u64)).map(|i| {
        let start = i * CHUNK as u64;
        (start, (size - start).min(CHUNK as u64) as usize)
    });
    futures::stream::iter(chunks)
        .map(|(start, len)| {
            let (chain, file, buffers) = (chain.clone(), sink.file().clone(), buffers.clone());
            async move {
                within(sink.deadline(), move || {
                    copy_chunk(&chain, &file, &buffers, start, len)
                })
                .await
                .map_err(|source| CopyError::Chunk {
                    offset: start,
                    source,
                })?
                .map(|written| (len as u64, written))
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .try_for_each(|(len, written)| {
            progress.data.fetch_add(written, Ordering::Relaxed);
            progress.skipped.fetch_add(len - written, Ordering::Relaxed);
            progress.done.fetch_add(len, Ordering::Relaxed);
            futures::future::ready(Ok(()))
        })
        .await?;
    let file = sink.file().clone();
    within(sink.deadline(), move || file.sync_all())
        .await
        .and_then(|r| r)
        .map_err(|source| CopyError::TargetFile { offset: 0, source })?;
    Ok(CopyStats {
        total: size,
        data: progress.data.load(Ordering::Relaxed),
        zeroed: 0,
        skipped: progress.skipped.load(Ordering::Relaxed),
        chunks: Vec::new(),
    })
}

/// One chunk: read, then its non-zero blocks written. The bytes written.
fn copy_chunk(
    chain: &Chain,
    target: &std::fs::File,
    buffers: &Mutex<Vec<Vec<u8>>>,
    start: u64,
    len: usize,
) -> Result<u64, CopyError> {
    let pool = || buffers.lock().unwrap_or_else(|p| p.into_inner());
    let mut buf = pool().pop().unwrap_or_default();
    buf.resize(len, 0);
    let mut data = Vec::new();
    // Most of a disk reads as zeros: they are not written into the buffer, only the parts of
    // blocks that hold data too are zeroed (the rest of the buffer is never looked at).
    chain
        .read_sparse(start, &mut buf, &mut data)
        .map_err(|source| CopyError::Chain {
            offset: start,
            source,
        })?;
    data.sort_by_key(|r| r.start);
    zero_around(&mut buf, &data);
    let mut written = 0;
    for run in nonzero_blocks(&buf, &data) {
        let offset = start + run.start as u64;
        target
            .write_all_at(&buf[run.clone()], offset)
            .map_err(|source| CopyError::TargetFile { offset, source })?;
        written += run.len() as u64;
    }
    if written > 0 {
        // Start writing the chunk back to the volume now, while the copy goes on: the sync
        // at the end then waits for little (best effort: an error here changes nothing,
        // the sync reports what matters).
        use std::os::fd::AsRawFd;
        // SAFETY: a valid open descriptor; no memory is passed.
        unsafe {
            libc::sync_file_range(
                target.as_raw_fd(),
                start as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            )
        };
    }
    pool().push(buf);
    Ok(written)
}

/// Zeros the bytes outside the (sorted, disjoint) `data` ranges that share a `BLOCK`-byte
/// block with a data byte: after it, every block that `data` touches is as the disk reads.
fn zero_around(buf: &mut [u8], data: &[Range<usize>]) {
    let end = buf.len()..buf.len();
    let mut gap_start = 0;
    for r in data.iter().chain(std::iter::once(&end)) {
        let (a, b) = (gap_start, r.start.max(gap_start));
        if a < b {
            // The end of the block holding the data byte before the gap, and the start of
            // the block holding the data byte after it.
            buf[a..b.min(a.next_multiple_of(BLOCK))].fill(0);
            buf[a.max(b / BLOCK * BLOCK)..b].fill(0);
        }
        gap_start = gap_start.max(r.end);
    }
}

/// The runs of `BLOCK`-byte blocks of `buf` that hold a non-zero byte. Only blocks that
/// `data` touches are scanned: the rest is zeros the chain knows of.
fn nonzero_blocks(buf: &[u8], data: &[Range<usize>]) -> Vec<Range<usize>> {
    let blocks = buf.len().div_ceil(BLOCK);
    let mut touched = vec![false; blocks];
    for r in data.iter().filter(|r| !r.is_empty()) {
        touched[r.start / BLOCK..=(r.end - 1) / BLOCK].fill(true);
    }
    let mut runs: Vec<Range<usize>> = Vec::new();
    for (b, t) in touched.into_iter().enumerate() {
        let block = b * BLOCK..((b + 1) * BLOCK).min(buf.len());
        if !t || is_zero(&buf[block.clone()]) {
            continue;
        }
        match runs.last_mut() {
            Some(r) if r.end == block.start => r.end = block.end,
            _ => runs.push(block),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_around_data_in_its_blocks_are_zeroed() {
        let mut buf = vec![0xEEu8; 4 * BLOCK + 10];
        let data = vec![
            10..20,
            2 * BLOCK + 5..3 * BLOCK,
            4 * BLOCK + 1..4 * BLOCK + 2,
        ];
        for r in &data {
            buf[r.clone()].fill(1);
        }
        zero_around(&mut buf, &data);
        let mut want = vec![0u8; 4 * BLOCK + 10];
        want[BLOCK..2 * BLOCK].fill(0xEE); // untouched: never looked at
        want[3 * BLOCK..4 * BLOCK].fill(0xEE);
        for r in &data {
            want[r.clone()].fill(1);
        }
        assert!(buf == want);
    }

    #[test]
    fn only_touched_nonzero_blocks_are_written() {
        let mut buf = vec![0u8; 5 * BLOCK + 100];
        buf[10] = 1; // block 0
        buf[BLOCK + 5] = 1; // block 1
        buf[3 * BLOCK] = 1; // block 3, untouched: cannot happen, proves no scan there
        buf[5 * BLOCK + 50] = 1; // the short tail
        let data = vec![0..2 * BLOCK + 10, 4 * BLOCK..5 * BLOCK + 100];
        assert_eq!(
            nonzero_blocks(&buf, &data),
            vec![0..2 * BLOCK, 5 * BLOCK..5 * BLOCK + 100]
        );
        assert!(nonzero_blocks(&buf, &[]).is_empty());
    }
}
