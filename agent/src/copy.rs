//! The copy engine: moves exactly the changed areas of one disk from a source export to a
//! target export. Many requests in flight, requests at most `request_size` (2 MiB by default:
//! VMware misbehaves above that), memory bounded by `max_in_flight x request_size`.
//!
//! Block status is asked once per window of about 1 GiB, a few windows ahead of the copy (not
//! once per chunk: over VDDK each question costs milliseconds), and not at all for areas of at
//! most 64 KiB (a small CBT area costs one round trip less; zeros in it are found by scanning).
//!
//! Zeros: in a full copy into a fresh image, areas that read as zeros are skipped (the image
//! already reads as zeros). In an incremental into an overlay they are written as WRITE_ZEROES,
//! never skipped: a skipped area would let the parent's old bytes show through.
//!
//! Verification (`CopyOptions::verify`): each chunk's content as the source gave it is hashed
//! while it is copied; after the flush, `verify_written` reads every chunk back from the target
//! and compares.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use sha2::{Digest, Sha256};

use crate::nbd::{NbdClient, NbdError, proto};

pub use sendense_vsphere::ChangedArea;

pub use sendense_contract::result::CopyKind;

#[derive(Debug, Clone)]
pub struct CopyOptions {
    /// Largest READ/WRITE sent.
    pub request_size: u32,
    /// Requests (chunks) in flight for this disk.
    pub max_in_flight: usize,
    /// Zero runs at least this long inside read data are sent as WRITE_ZEROES.
    pub zero_run: usize,
    /// The bandwidth cap every read from the source waits for (shared by all disks).
    pub rate: Option<std::sync::Arc<crate::rate::RateLimiter>>,
    /// Keep a SHA-256 of each chunk as the source gave it, for `verify_written`.
    pub verify: bool,
    /// Areas at most this far apart are copied as one, gap included (`coalesce`).
    pub merge_gap: u64,
}

impl Default for CopyOptions {
    fn default() -> Self {
        Self {
            request_size: 2 << 20,
            max_in_flight: 32,
            zero_run: 64 << 10,
            rate: None,
            verify: false,
            merge_gap: MERGE_GAP,
        }
    }
}

/// Live counters of one disk's copy (read by progress reporting while it runs).
#[derive(Debug, Default)]
pub struct Progress {
    /// Bytes of changed areas to cover.
    pub total: AtomicU64,
    /// Bytes of changed areas covered so far (data written, zeros written or skipped).
    pub done: AtomicU64,
    /// Bytes sent as data.
    pub data: AtomicU64,
    /// Bytes written as WRITE_ZEROES.
    pub zeroed: AtomicU64,
    /// Bytes skipped (zeros in a full copy).
    pub skipped: AtomicU64,
    /// Bytes read back from the target and found as the source gave them.
    pub verified: AtomicU64,
}

/// What a finished copy did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CopyStats {
    pub total: u64,
    pub data: u64,
    pub zeroed: u64,
    pub skipped: u64,
    /// With `CopyOptions::verify`: each chunk's digest as read from the source, in offset
    /// order.
    pub chunks: Vec<ChunkDigest>,
}

/// One chunk of a copy and the SHA-256 of its content as the source gave it (zeros where the
/// source reads as zeros): what the target must read back there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkDigest {
    pub start: u64,
    pub length: u32,
    pub sha256: [u8; 32],
}

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("changed area {start}+{length} is past the end of the {size}-byte {side}")]
    OutOfRange {
        start: u64,
        length: u64,
        size: u64,
        side: &'static str,
    },
    #[error("reading the source at offset {offset}: {source}")]
    Source {
        offset: u64,
        #[source]
        source: NbdError,
    },
    #[error("writing the target at offset {offset}: {source}")]
    Target {
        offset: u64,
        #[source]
        source: NbdError,
    },
    #[error("invalid copy options: {0}")]
    Options(String),
    #[error(
        "read back after the flush, the target's {length} bytes at offset {start} differ from what the source gave"
    )]
    Mismatch { start: u64, length: u32 },
    #[error("reading the target back at offset {offset}: {source}")]
    ReadBack {
        offset: u64,
        #[source]
        source: NbdError,
    },
}

/// Sorts and merges overlapping or touching areas, dropping empty ones.
pub fn normalize(mut areas: Vec<ChangedArea>) -> Vec<ChangedArea> {
    areas.retain(|a| a.length > 0);
    areas.sort();
    let mut out: Vec<ChangedArea> = Vec::with_capacity(areas.len());
    for a in areas {
        match out.last_mut() {
            Some(last) if a.start <= last.end() => {
                let end = last.end().max(a.end());
                last.length = end - last.start;
            }
            _ => out.push(a),
        }
    }
    out
}

/// Areas closer than this are copied as one by default: fewer, larger requests for scattered
/// small changes, at the cost of sending the unchanged bytes between them.
pub const MERGE_GAP: u64 = 0;

/// Joins areas (sorted, apart) whose gap is at most `gap` bytes into one area covering both and
/// the gap. Copying the gap is harmless: its bytes did not change, so the target's chain
/// already holds them.
pub fn coalesce(areas: Vec<ChangedArea>, gap: u64) -> Vec<ChangedArea> {
    if gap == 0 {
        return areas;
    }
    let mut out: Vec<ChangedArea> = Vec::with_capacity(areas.len());
    for a in areas {
        match out.last_mut() {
            Some(last) if a.start - last.end() <= gap => last.length = a.end() - last.start,
            _ => out.push(a),
        }
    }
    out
}

/// Splits areas into requests of at most `size` bytes.
pub fn chunks(areas: &[ChangedArea], size: u32) -> impl Iterator<Item = ChangedArea> + '_ {
    areas.iter().flat_map(move |a| {
        let size = size as u64;
        (0..a.length.div_ceil(size)).map(move |i| {
            let start = a.start + i * size;
            ChangedArea {
                start,
                length: size.min(a.end() - start),
            }
        })
    })
}

/// Copies `areas` from `source` to `target` and flushes the target. The caller decides `kind`
/// from how the target was prepared.
pub async fn copy_areas(
    source: &NbdClient,
    target: &NbdClient,
    areas: Vec<ChangedArea>,
    kind: CopyKind,
    opts: &CopyOptions,
    progress: &Progress,
) -> Result<CopyStats, CopyError> {
    let max_request = source.block_size().maximum.min(target.block_size().maximum);
    if opts.request_size == 0 || opts.request_size > max_request || opts.max_in_flight == 0 {
        return Err(CopyError::Options(format!(
            "request size {} must be between 1 and {max_request}, max in flight at least 1",
            opts.request_size
        )));
    }
    let areas = coalesce(normalize(areas), opts.merge_gap);
    for a in &areas {
        for (size, side) in [(source.size(), "source"), (target.size(), "target")] {
            if a.end() > size {
                return Err(CopyError::OutOfRange {
                    start: a.start,
                    length: a.length,
                    size,
                    side,
                });
            }
        }
    }
    let total: u64 = areas.iter().map(|a| a.length).sum();
    progress.total.store(total, Ordering::Relaxed);

    let digests = std::sync::Mutex::new(Vec::new());
    // Block status is asked once per window (ahead of the copy), not once per chunk; each
    // window comes back cut into chunks that carry their segments.
    let window = map_window(opts.request_size);
    futures::stream::iter(windows(&areas, window))
        .map(|w| map(source, w, opts.request_size))
        .buffered(MAP_AHEAD)
        .map_ok(|jobs| futures::stream::iter(jobs.into_iter().map(Ok)))
        .try_flatten()
        .try_for_each_concurrent(opts.max_in_flight, |job| {
            copy_chunk(target, source, job, kind, opts, progress, &digests)
        })
        .await?;
    let mut chunks = digests.into_inner().unwrap_or_else(|p| p.into_inner());
    chunks.sort_by_key(|c: &ChunkDigest| c.start);
    target
        .flush()
        .await
        .map_err(|source| CopyError::Target { offset: 0, source })?;
    Ok(CopyStats {
        total,
        data: progress.data.load(Ordering::Relaxed),
        zeroed: progress.zeroed.load(Ordering::Relaxed),
        skipped: progress.skipped.load(Ordering::Relaxed),
        chunks,
    })
}

/// Reads every chunk of a flushed copy back from `target` and compares it with the digest the
/// source gave; the bytes verified. The first difference is the error.
pub async fn verify_written(
    target: &NbdClient,
    chunks: &[ChunkDigest],
    max_in_flight: usize,
    progress: &Progress,
) -> Result<u64, CopyError> {
    futures::stream::iter(chunks.iter().map(Ok))
        .try_for_each_concurrent(max_in_flight.max(1), |c| async move {
            let data =
                target
                    .read(c.start, c.length)
                    .await
                    .map_err(|source| CopyError::ReadBack {
                        offset: c.start,
                        source,
                    })?;
            let got: [u8; 32] = Sha256::digest(&data).into();
            if got != c.sha256 {
                return Err(CopyError::Mismatch {
                    start: c.start,
                    length: c.length,
                });
            }
            progress
                .verified
                .fetch_add(u64::from(c.length), Ordering::Relaxed);
            Ok(())
        })
        .await?;
    Ok(chunks.iter().map(|c| u64::from(c.length)).sum())
}

/// Feeds `length` zero bytes to `h`.
fn hash_zeros(h: &mut Sha256, mut length: u64) {
    static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
    while length > 0 {
        let n = length.min(ZEROS.len() as u64) as usize;
        h.update(&ZEROS[..n]);
        length -= n as u64;
    }
}

/// One piece of a chunk: data to read, or a range the source says reads as zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Segment {
    Data(ChangedArea),
    Zero(ChangedArea),
}

/// Areas at most this long are read without asking block status first: for a small CBT area
/// the question costs as much as the read, and zeros in it are found by scanning the data.
pub const MAP_BELOW: u64 = 64 << 10;
/// Block status is asked for windows of about this size, ahead of the copy.
const MAP_WINDOW: u64 = 1 << 30;
/// Windows mapped ahead of the chunks being copied.
const MAP_AHEAD: usize = 4;

/// The window length: a multiple of `request_size`, so windows split areas at chunk edges.
fn map_window(request_size: u32) -> u64 {
    let r = u64::from(request_size.max(1));
    MAP_WINDOW.div_ceil(r) * r
}

/// Splits areas into windows of at most `window` bytes.
fn windows(areas: &[ChangedArea], window: u64) -> impl Iterator<Item = ChangedArea> + '_ {
    areas.iter().flat_map(move |a| {
        (0..a.length.div_ceil(window)).map(move |i| {
            let start = a.start + i * window;
            ChangedArea {
                start,
                length: window.min(a.end() - start),
            }
        })
    })
}

/// One chunk (a request-size piece of an area, the unit of work and of verification) and what
/// the source holds there.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Job {
    chunk: ChangedArea,
    segments: Vec<Segment>,
}

/// The chunks of `window`, each with its segments, from block status over the whole window (or
/// all data when the source has no block status or the window is small).
async fn map(source: &NbdClient, w: ChangedArea, request_size: u32) -> Result<Vec<Job>, CopyError> {
    let segments = if source.can_block_status() && w.length > MAP_BELOW {
        segments(source, w).await?
    } else {
        vec![Segment::Data(w)]
    };
    Ok(cut(&segments, w, request_size))
}

/// Cuts a window's segments (in order, covering it) at chunk edges.
fn cut(segments: &[Segment], w: ChangedArea, request_size: u32) -> Vec<Job> {
    let mut jobs = Vec::new();
    let mut i = 0;
    for chunk in chunks(std::slice::from_ref(&w), request_size) {
        let mut parts = Vec::new();
        while i < segments.len() {
            let (Segment::Data(a) | Segment::Zero(a)) = segments[i];
            let start = a.start.max(chunk.start);
            let end = a.end().min(chunk.end());
            if start < end {
                let piece = ChangedArea {
                    start,
                    length: end - start,
                };
                parts.push(match segments[i] {
                    Segment::Data(_) => Segment::Data(piece),
                    Segment::Zero(_) => Segment::Zero(piece),
                });
            }
            if a.end() > chunk.end() {
                break;
            }
            i += 1;
        }
        jobs.push(Job {
            chunk,
            segments: parts,
        });
    }
    jobs
}

async fn segments(source: &NbdClient, chunk: ChangedArea) -> Result<Vec<Segment>, CopyError> {
    let mut out = Vec::new();
    let mut at = chunk.start;
    while at < chunk.end() {
        let len = (chunk.end() - at).min(u64::from(u32::MAX) & !0xfff) as u32;
        let extents = source
            .block_status(at, len)
            .await
            .map_err(|source| CopyError::Source { offset: at, source })?;
        for e in extents {
            if at >= chunk.end() {
                break;
            }
            let length = (e.length as u64).min(chunk.end() - at);
            let area = ChangedArea { start: at, length };
            let seg = if e.flags & proto::STATE_ZERO != 0 {
                Segment::Zero(area)
            } else {
                Segment::Data(area)
            };
            match (out.last_mut(), seg) {
                (Some(Segment::Data(a)), Segment::Data(b))
                | (Some(Segment::Zero(a)), Segment::Zero(b)) => a.length += b.length,
                _ => out.push(seg),
            }
            at += length;
        }
    }
    Ok(out)
}

async fn copy_chunk(
    target: &NbdClient,
    source: &NbdClient,
    job: Job,
    kind: CopyKind,
    opts: &CopyOptions,
    progress: &Progress,
    digests: &std::sync::Mutex<Vec<ChunkDigest>>,
) -> Result<(), CopyError> {
    let Job { chunk, segments } = job;
    let mut hash = opts.verify.then(Sha256::new);
    for seg in segments {
        match seg {
            Segment::Zero(a) => {
                if let Some(h) = hash.as_mut() {
                    hash_zeros(h, a.length);
                }
                zero(target, a, kind, progress).await?
            }
            Segment::Data(a) => {
                if let Some(rate) = &opts.rate {
                    rate.acquire(a.length).await;
                }
                let data = source
                    .read(a.start, a.length as u32)
                    .await
                    .map_err(|source| CopyError::Source {
                        offset: a.start,
                        source,
                    })?;
                if let Some(h) = hash.as_mut() {
                    h.update(&data);
                }
                for (run, is_zero) in zero_runs(&data, opts.zero_run) {
                    let area = ChangedArea {
                        start: a.start + run.start as u64,
                        length: run.len() as u64,
                    };
                    if is_zero {
                        zero(target, area, kind, progress).await?;
                    } else {
                        target
                            .write(area.start, data.slice(run))
                            .await
                            .map_err(|source| CopyError::Target {
                                offset: area.start,
                                source,
                            })?;
                        progress.data.fetch_add(area.length, Ordering::Relaxed);
                    }
                }
            }
        }
    }
    if let Some(h) = hash {
        digests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(ChunkDigest {
                start: chunk.start,
                length: chunk.length as u32,
                sha256: h.finalize().into(),
            });
    }
    progress.done.fetch_add(chunk.length, Ordering::Relaxed);
    Ok(())
}

async fn zero(
    target: &NbdClient,
    a: ChangedArea,
    kind: CopyKind,
    progress: &Progress,
) -> Result<(), CopyError> {
    match kind {
        CopyKind::Full => {
            progress.skipped.fetch_add(a.length, Ordering::Relaxed);
            Ok(())
        }
        CopyKind::Incremental => {
            let result = if target.can_write_zeroes() {
                target.write_zeroes(a.start, a.length as u32, false).await
            } else {
                target
                    .write(a.start, Bytes::from(vec![0u8; a.length as usize]))
                    .await
            };
            result.map_err(|source| CopyError::Target {
                offset: a.start,
                source,
            })?;
            progress.zeroed.fetch_add(a.length, Ordering::Relaxed);
            Ok(())
        }
    }
}

/// Splits `data` into alternating runs: zero runs of at least `min_zero` bytes (aligned to
/// `min_zero` inside the buffer) and the data between them. Returns (range, is_zero).
pub fn zero_runs(data: &[u8], min_zero: usize) -> Vec<(std::ops::Range<usize>, bool)> {
    if data.is_empty() {
        return Vec::new();
    }
    let all = is_zero(data);
    if min_zero == 0 || all {
        return vec![(0..data.len(), all)];
    }
    let mut runs: Vec<(std::ops::Range<usize>, bool)> = Vec::new();
    for (i, block) in data.chunks(min_zero).enumerate() {
        let start = i * min_zero;
        // A short tail block counts as data: too small to be worth a separate request.
        let zero = block.len() == min_zero && is_zero(block);
        match runs.last_mut() {
            Some((r, z)) if *z == zero => r.end = start + block.len(),
            _ => runs.push((start..start + block.len(), zero)),
        }
    }
    runs
}

/// Whether every byte is zero: 64 bytes at a time (the compiler vectorises the OR), stopping
/// at the first block with a set bit.
pub fn is_zero(data: &[u8]) -> bool {
    let mut blocks = data.chunks_exact(64);
    for b in &mut blocks {
        if b.iter().fold(0u8, |acc, x| acc | x) != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|b| *b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(start: u64, length: u64) -> ChangedArea {
        ChangedArea { start, length }
    }

    #[test]
    fn normalize_merges_overlaps_and_neighbours() {
        assert_eq!(
            normalize(vec![a(100, 50), a(0, 10), a(10, 5), a(120, 100), a(500, 0)]),
            vec![a(0, 15), a(100, 120)]
        );
        assert_eq!(normalize(vec![]), vec![]);
    }

    #[test]
    fn coalesce_joins_areas_with_small_gaps_only() {
        let areas = vec![a(0, 10), a(15, 5), a(40, 10), a(51, 1)];
        assert_eq!(coalesce(areas.clone(), 0), areas);
        assert_eq!(coalesce(areas.clone(), 5), vec![a(0, 20), a(40, 12)]);
        assert_eq!(coalesce(areas, 20), vec![a(0, 52)]);
    }

    #[test]
    fn chunks_split_at_request_size() {
        let areas = [a(0, 5), a(100, 12)];
        let c: Vec<_> = chunks(&areas, 4).collect();
        assert_eq!(c, vec![a(0, 4), a(4, 1), a(100, 4), a(104, 4), a(108, 4)]);
    }

    #[test]
    fn zero_runs_find_aligned_zero_blocks() {
        let mut d = vec![1u8; 16];
        d[4..12].fill(0);
        assert_eq!(
            zero_runs(&d, 4),
            vec![(0..4, false), (4..12, true), (12..16, false)]
        );
        assert_eq!(zero_runs(&[0u8; 10], 4), vec![(0..10, true)]);
        let mut short_tail = vec![1u8; 6];
        short_tail[4..].fill(0);
        assert_eq!(
            zero_runs(&short_tail, 4),
            vec![(0..6, false)],
            "a 2-byte zero tail is data"
        );
        let mut unaligned = vec![1u8; 12];
        unaligned[2..10].fill(0);
        assert_eq!(
            zero_runs(&unaligned, 4),
            vec![(0..4, false), (4..8, true), (8..12, false)]
        );
    }

    #[test]
    fn windows_cut_into_chunks_at_the_same_edges_as_chunks() {
        let w = a(10, 10);
        let segs = [
            Segment::Data(a(10, 3)),
            Segment::Zero(a(13, 5)),
            Segment::Data(a(18, 2)),
        ];
        let jobs = cut(&segs, w, 4);
        let got: Vec<_> = jobs.iter().map(|j| j.chunk).collect();
        assert_eq!(got, chunks(&[w], 4).collect::<Vec<_>>());
        assert_eq!(
            jobs[0].segments,
            vec![Segment::Data(a(10, 3)), Segment::Zero(a(13, 1))]
        );
        assert_eq!(jobs[1].segments, vec![Segment::Zero(a(14, 4))]);
        assert_eq!(jobs[2].segments, vec![Segment::Data(a(18, 2))]);
        let big = [a(0, 5 << 20)];
        let win: Vec<_> = windows(&big, map_window(3 << 20)).collect();
        assert_eq!(win, vec![a(0, 5 << 20)]);
        let win: Vec<_> = windows(&big, 3 << 20).collect();
        assert_eq!(win, vec![a(0, 3 << 20), a(3 << 20, 2 << 20)]);
    }

    #[test]
    fn is_zero_sees_a_single_set_bit_anywhere() {
        let mut d = vec![0u8; 1000];
        assert!(is_zero(&d));
        assert!(is_zero(&[]));
        for at in [0, 63, 64, 500, 959, 960, 999] {
            d[at] = 0x10;
            assert!(!is_zero(&d), "bit at {at}");
            d[at] = 0;
        }
    }
}
