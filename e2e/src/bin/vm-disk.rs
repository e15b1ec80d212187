//! vm-disk: benchmark sources shaped like VM disks, generated from a seed, and the changed
//! areas of an incremental.
//!
//! `vm-disk make --path disk.raw --size 16G --data-percent 40 --seed 1` writes a sparse raw
//! file: holes and data extents from 4 KiB to 8 MiB long (log-uniform), at 512-byte (not 4 KiB
//! or chunk) alignment; data extents hold random bytes with zero runs inside (written zeros,
//! which block status reports as data: only a scan finds them). The same seed gives the same
//! file.
//!
//! `vm-disk change --path disk.raw --areas-out areas.txt --count 100000 --length 4096 --seed 2`
//! writes new contents over `count` scattered, non-overlapping, 512-byte-aligned areas (one in
//! ten all zeros: an area that now reads as zeros must still reach the overlay) and lists them,
//! one `start+length` a line. `--contiguous` writes one area of `count x length` bytes instead.
//!
//! Prints what it wrote as one JSON line.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    Make {
        #[arg(long)]
        path: std::path::PathBuf,
        /// Bytes, or with a K/M/G/T suffix (powers of 1024).
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// Share of the disk that is data (holes are the rest), approximately.
        #[arg(long, default_value_t = 40.0)]
        data_percent: f64,
        /// Cap on the data written (for a sparse disk with a fixed amount of data).
        #[arg(long, value_parser = parse_size)]
        max_data: Option<u64>,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    Change {
        #[arg(long)]
        path: std::path::PathBuf,
        #[arg(long)]
        areas_out: std::path::PathBuf,
        #[arg(long, default_value_t = 100_000)]
        count: u64,
        #[arg(long, default_value_t = 4096)]
        length: u64,
        #[arg(long)]
        contiguous: bool,
        #[arg(long, default_value_t = 2)]
        seed: u64,
    },
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, shift) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 30),
        Some('T' | 't') => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    num.parse::<u64>()
        .map(|n| n << shift)
        .map_err(|e| format!("{s:?}: {e}"))
}

/// xoshiro256** seeded through splitmix64: fast, and the same everywhere for a seed.
struct Rng([u64; 4]);

impl Rng {
    fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        Rng([next(), next(), next(), next()])
    }
    fn next(&mut self) -> u64 {
        let s = &mut self.0;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Log-uniform between `lo` and `hi`, rounded down to 512 bytes (at least 512).
    fn log_uniform(&mut self, lo: u64, hi: u64) -> u64 {
        let (l, h) = ((lo as f64).ln(), (hi as f64).ln());
        let v = (l + (h - l) * self.unit()).exp() as u64;
        (v & !511).max(512)
    }
    fn fill(&mut self, buf: &mut [u8]) {
        let mut words = buf.chunks_exact_mut(8);
        for w in &mut words {
            w.copy_from_slice(&self.next().to_le_bytes());
        }
        let tail = words.into_remainder();
        let last = self.next().to_le_bytes();
        tail.copy_from_slice(&last[..tail.len()]);
    }
}

const MIN_EXTENT: u64 = 4 << 10;
const MAX_EXTENT: u64 = 8 << 20;

fn make(
    path: &std::path::Path,
    size: u64,
    data_percent: f64,
    max_data: Option<u64>,
    seed: u64,
) -> Result<()> {
    if !(0.0..=100.0).contains(&data_percent) || size == 0 {
        bail!("size must be > 0 and data-percent within 0..100");
    }
    let f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.set_len(size)?;
    let mut rng = Rng::new(seed);
    let share = (data_percent / 100.0).clamp(0.001, 1.0);
    // Hole lengths scaled so holes and data come out near the asked share.
    let hole_scale = (1.0 - share) / share;
    let max_data = max_data.unwrap_or(u64::MAX);
    let mut buf = vec![0u8; MAX_EXTENT as usize];
    let (mut at, mut data, mut zeros_inside, mut extents) = (0u64, 0u64, 0u64, 0u64);
    // Start with a hole half the time, so offset 0 is not always data.
    if rng.below(2) == 0 {
        at += (rng.log_uniform(MIN_EXTENT, MAX_EXTENT) as f64 * hole_scale) as u64 & !511;
    }
    while at < size && data < max_data {
        let len = rng
            .log_uniform(MIN_EXTENT, MAX_EXTENT)
            .min(size - at)
            .min(max_data - data);
        let b = &mut buf[..len as usize];
        rng.fill(b);
        // Zero runs inside data (free space a guest wrote zeros over, zeroed pages): up to
        // three per extent, 4 KiB to 1 MiB long, unaligned.
        for _ in 0..rng.below(4) {
            let zl = rng.log_uniform(MIN_EXTENT, 1 << 20).min(len);
            let zs = (rng.below(len - zl + 1)) & !511;
            let end = (zs + zl).min(len);
            b[zs as usize..end as usize].fill(0);
            zeros_inside += end - zs;
        }
        f.write_all_at(b, at)?;
        data += len;
        extents += 1;
        at += len;
        let hole = (rng.log_uniform(MIN_EXTENT, MAX_EXTENT) as f64 * hole_scale) as u64 & !511;
        at += hole;
    }
    f.sync_all().ok();
    println!(
        "{}",
        serde_json::json!({"path": path, "size": size, "data_extents": extents,
            "data_written": data, "zeros_inside_data": zeros_inside, "seed": seed})
    );
    Ok(())
}

fn change(
    path: &std::path::Path,
    areas_out: &std::path::Path,
    count: u64,
    length: u64,
    contiguous: bool,
    seed: u64,
) -> Result<()> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let size = f.metadata()?.len();
    let mut rng = Rng::new(seed);
    let mut areas: Vec<(u64, u64)> = Vec::new();
    if contiguous {
        let total = count * length;
        if total > size {
            bail!("{total} bytes of changes do not fit a {size}-byte disk");
        }
        let start = rng.below((size - total) / 512 + 1) * 512;
        areas.push((start, total));
    } else {
        // 512-byte-aligned starts, no two areas overlapping or touching (touching areas would
        // merge into one longer area): a slot grid of 2 x length spacing would align them, so
        // draw freely and reject collisions.
        if count * length * 4 > size {
            bail!("{count} areas of {length} bytes are too dense for a {size}-byte disk");
        }
        let mut taken = std::collections::BTreeSet::new();
        while (areas.len() as u64) < count {
            let start = rng.below((size - length) / 512 + 1) * 512;
            let clash = taken
                .range(start.saturating_sub(length)..=start + length)
                .next()
                .is_some();
            if !clash {
                taken.insert(start);
                areas.push((start, length));
            }
        }
        areas.sort();
    }
    let mut buf = vec![0u8; (length as usize).max(1 << 20)];
    let mut zero_areas = 0u64;
    for &(start, len) in &areas {
        let mut done = 0;
        let zero = !contiguous && rng.below(10) == 0;
        zero_areas += zero as u64;
        while done < len {
            let n = (len - done).min(buf.len() as u64) as usize;
            if zero {
                buf[..n].fill(0);
            } else {
                rng.fill(&mut buf[..n]);
            }
            f.write_all_at(&buf[..n], start + done)?;
            done += n as u64;
        }
    }
    let mut text = String::with_capacity(areas.len() * 24);
    for (s, l) in &areas {
        text.push_str(&format!("{s}+{l}\n"));
    }
    std::fs::write(areas_out, text)?;
    println!(
        "{}",
        serde_json::json!({"areas": areas.len(), "bytes": areas.iter().map(|a| a.1).sum::<u64>(),
            "zero_areas": zero_areas, "seed": seed})
    );
    Ok(())
}

fn main() -> Result<()> {
    match Args::parse().command {
        Cmd::Make {
            path,
            size,
            data_percent,
            max_data,
            seed,
        } => make(&path, size, data_percent, max_data, seed),
        Cmd::Change {
            path,
            areas_out,
            count,
            length,
            contiguous,
            seed,
        } => change(&path, &areas_out, count, length, contiguous, seed),
    }
}
