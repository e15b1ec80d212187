//! Area arithmetic (merging, splitting into requests) and zero detection in read data.

use super::ChangedArea;

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

/// Widens sorted, apart areas to multiples of `align` (a power of two), never past `limit`
/// (the disk's end), and merges the ones that then touch.
pub fn widen(areas: Vec<ChangedArea>, align: u64, limit: u64) -> Vec<ChangedArea> {
    if align <= 1 {
        return areas;
    }
    let mut out: Vec<ChangedArea> = Vec::with_capacity(areas.len());
    for a in areas {
        let start = a.start & !(align - 1);
        let end = a
            .end()
            .checked_next_multiple_of(align)
            .unwrap_or(u64::MAX)
            .min(limit)
            .max(a.end());
        match out.last_mut() {
            Some(last) if start <= last.end() => last.length = end.max(last.end()) - last.start,
            _ => out.push(ChangedArea {
                start,
                length: end - start,
            }),
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
    fn widen_aligns_areas_within_the_disk_and_merges_what_then_touches() {
        let areas = vec![a(100, 50), a(4000, 200), a(8192, 4096), a(20_000, 100)];
        assert_eq!(widen(areas.clone(), 1, 1 << 20), areas);
        assert_eq!(
            widen(areas.clone(), 4096, 1 << 20),
            vec![a(0, 12288), a(16384, 4096)]
        );
        // The disk's last, unaligned block is read up to the disk's end, not past it.
        assert_eq!(
            widen(vec![a(20_000, 100)], 4096, 20_300),
            vec![a(16384, 3916)]
        );
        assert_eq!(
            widen(vec![a(20_000, 100)], 4096, 20_200),
            vec![a(16384, 3816)]
        );
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
