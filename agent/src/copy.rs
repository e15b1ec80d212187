//! The copy engine: moves exactly the changed areas of one disk from a source export to a
//! target export. Many requests in flight, requests at most `request_size` (2 MiB by default:
//! VMware misbehaves above that), memory bounded by `max_in_flight x request_size`; smaller
//! chunks (small CBT areas) run more at once within that bound (`InFlight`).
//!
//! Block status is asked once per window of about 1 GiB, a few windows ahead of the copy (not
//! once per chunk: over VDDK each question costs milliseconds), and not at all for areas of at
//! most 64 KiB (a small CBT area costs one round trip less; zeros in it are found by scanning).
//!
//! Alignment: areas and the data the source reports are widened to the target's preferred
//! block size (4 KiB from qemu-nbd), so every write covers whole blocks and the hub's QCOW2
//! never copies part of a subcluster on write; the widening bytes come from the same snapshot.
//!
//! Zeros: in a full copy into a fresh image, areas that read as zeros are skipped (the image
//! already reads as zeros). In an incremental into an overlay they are written as WRITE_ZEROES,
//! never skipped: a skipped area would let the parent's old bytes show through.
//!
//! Verification (`CopyOptions::verify`): each chunk's content as the source gave it is hashed
//! while it is copied; after the flush, `verify_written` reads every chunk back from the target
//! and compares.

use std::sync::atomic::{AtomicU64, Ordering};

use futures::{StreamExt, TryStreamExt};
use sha2::{Digest, Sha256};

use crate::nbd::{NbdClient, NbdError};

mod areas;
mod bounded;
mod map;
mod sink;

pub use areas::{MERGE_GAP, chunks, coalesce, is_zero, normalize, widen, zero_runs};
use bounded::{InFlight, run_bounded};
pub use map::MAP_BELOW;
use map::{Job, MAP_AHEAD, Segment, map, map_window, windows};
use sink::write_alignment;
pub use sink::{FileSink, Sink, within};

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
    /// Widen writes to whole blocks of the target's preferred size (`write_alignment`), with
    /// the neighbouring bytes read from the source. Off where the target's bytes outside the
    /// areas must stay as they are (a rollback writes exactly the areas it is given).
    pub widen: bool,
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
            widen: true,
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
    #[error("writing the target file at offset {offset}: {source}")]
    TargetFile {
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("reading the chain at offset {offset}: {source}")]
    Chain {
        offset: u64,
        #[source]
        source: crate::qcow2::Qcow2Error,
    },
    #[error("copying the chunk at offset {offset}: {source}")]
    Chunk {
        offset: u64,
        #[source]
        source: std::io::Error,
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
    copy_areas_to(source, Sink::Nbd(target), areas, kind, opts, progress).await
}

/// `copy_areas` into any sink.
pub async fn copy_areas_to(
    source: &NbdClient,
    target: Sink<'_>,
    areas: Vec<ChangedArea>,
    kind: CopyKind,
    opts: &CopyOptions,
    progress: &Progress,
) -> Result<CopyStats, CopyError> {
    let max_request = source.block_size().maximum.min(target.max_request());
    if opts.request_size == 0 || opts.request_size > max_request || opts.max_in_flight == 0 {
        return Err(CopyError::Options(format!(
            "request size {} must be between 1 and {max_request}, max in flight at least 1",
            opts.request_size
        )));
    }
    let areas = normalize(areas);
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
    // Every write starts and ends on the target's preferred block size where the disk allows
    // it: the unchanged bytes that widen an area are read from the same snapshot, so they are
    // what the target's chain already holds there.
    let align = if opts.widen {
        write_alignment(&target, opts.request_size)
    } else {
        1
    };
    let limit = source.size().min(target.size());
    let areas = coalesce(widen(areas, align, limit), opts.merge_gap);
    let total: u64 = areas.iter().map(|a| a.length).sum();
    progress.total.store(total, Ordering::Relaxed);

    let digests = std::sync::Mutex::new(Vec::new());
    // Block status is asked once per window (ahead of the copy), not once per chunk; each
    // window comes back cut into chunks that carry their segments.
    let window = map_window(opts.request_size);
    let jobs = futures::stream::iter(windows(&areas, window))
        .map(|w| map(source, w, opts.request_size, align))
        .buffered(MAP_AHEAD)
        .map_ok(|jobs| futures::stream::iter(jobs.into_iter().map(Ok)))
        .try_flatten();
    let budget = InFlight::of(opts);
    run_bounded(jobs, budget, |job| {
        copy_chunk(target, source, job, kind, opts, progress, &digests)
    })
    .await?;
    let mut chunks = digests.into_inner().unwrap_or_else(|p| p.into_inner());
    chunks.sort_by_key(|c: &ChunkDigest| c.start);
    target.flush().await?;
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

async fn copy_chunk(
    target: Sink<'_>,
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
                        target.write(area.start, data.slice(run)).await?;
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
    target: Sink<'_>,
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
            target.write_zeroes(a.start, a.length).await?;
            progress.zeroed.fetch_add(a.length, Ordering::Relaxed);
            Ok(())
        }
    }
}
