//! Which parts of the areas hold data: block status asked once per large window, ahead of
//! the copy, and the answer cut into request-size chunks that carry their segments.

use super::{ChangedArea, CopyError, chunks};
use crate::nbd::{NbdClient, proto};

/// One piece of a chunk: data to read, or a range the source says reads as zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Segment {
    Data(ChangedArea),
    Zero(ChangedArea),
}

/// Areas at most this long are read without asking block status first: for a small CBT area
/// the question costs as much as the read, and zeros in it are found by scanning the data.
pub const MAP_BELOW: u64 = 64 << 10;
/// Block status is asked for windows of about this size, ahead of the copy.
const MAP_WINDOW: u64 = 1 << 30;
/// Windows mapped ahead of the chunks being copied.
pub(super) const MAP_AHEAD: usize = 4;

/// The window length: a multiple of `request_size`, so windows split areas at chunk edges.
pub(super) fn map_window(request_size: u32) -> u64 {
    let r = u64::from(request_size.max(1));
    MAP_WINDOW.div_ceil(r) * r
}

/// Splits areas into windows of at most `window` bytes.
pub(super) fn windows(
    areas: &[ChangedArea],
    window: u64,
) -> impl Iterator<Item = ChangedArea> + '_ {
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
pub(super) struct Job {
    pub(super) chunk: ChangedArea,
    pub(super) segments: Vec<Segment>,
}

/// The chunks of `window`, each with its segments, from block status over the whole window (or
/// all data when the source has no block status or the window is small).
pub(super) async fn map(
    source: &NbdClient,
    w: ChangedArea,
    request_size: u32,
    align: u64,
) -> Result<Vec<Job>, CopyError> {
    let segments = if source.can_block_status() && w.length > MAP_BELOW {
        widen_data(segments(source, w).await?, w, align)
    } else {
        vec![Segment::Data(w)]
    };
    Ok(cut(&segments, w, request_size))
}

/// Widens the data segments of a window (segments in order, covering it) to multiples of
/// `align` within the window, the zeros between them shrinking: data is written in whole
/// blocks of the target (the widening bytes read as zeros from the source).
fn widen_data(segments: Vec<Segment>, w: ChangedArea, align: u64) -> Vec<Segment> {
    if align <= 1 {
        return segments;
    }
    let data = segments.iter().filter_map(|s| match s {
        Segment::Data(a) => Some(*a),
        Segment::Zero(_) => None,
    });
    let data = super::widen(data.collect(), align, w.end());
    let mut out = Vec::with_capacity(data.len() * 2 + 1);
    let mut at = w.start;
    for d in data {
        let d = ChangedArea {
            start: d.start.max(w.start),
            length: d.end() - d.start.max(w.start),
        };
        if d.start > at {
            out.push(Segment::Zero(ChangedArea {
                start: at,
                length: d.start - at,
            }));
        }
        at = d.end();
        out.push(Segment::Data(d));
    }
    if at < w.end() {
        out.push(Segment::Zero(ChangedArea {
            start: at,
            length: w.end() - at,
        }));
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    fn a(start: u64, length: u64) -> ChangedArea {
        ChangedArea { start, length }
    }

    #[test]
    fn data_is_widened_to_whole_blocks_inside_the_window() {
        let w = a(4096, 32768);
        let segs = vec![
            Segment::Zero(a(4096, 1000)),
            Segment::Data(a(5096, 512)),
            Segment::Zero(a(5608, 10_000)),
            Segment::Data(a(15_608, 3000)),
            Segment::Zero(a(18_608, 18_256)),
        ];
        assert_eq!(widen_data(segs.clone(), w, 1), segs);
        assert_eq!(
            widen_data(segs, w, 4096),
            vec![
                Segment::Data(a(4096, 4096)),
                Segment::Zero(a(8192, 4096)),
                Segment::Data(a(12_288, 8192)),
                Segment::Zero(a(20_480, 16_384)),
            ]
        );
        // A window that ends off the block grid (the disk's end) is not left.
        let w = a(0, 5000);
        let segs = vec![Segment::Zero(a(0, 4500)), Segment::Data(a(4500, 500))];
        assert_eq!(
            widen_data(segs, w, 4096),
            vec![Segment::Zero(a(0, 4096)), Segment::Data(a(4096, 904))]
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
}
