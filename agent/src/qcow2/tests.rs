//! The reader against small images built here byte by byte (the real qemu-img chains are in
//! agent/tests/restore_qcow2.rs): every kind of L2 entry, backing files, refusals, and
//! malformed files (flipped and truncated bytes) that must give errors, never panics.

use std::path::{Path, PathBuf};

use super::*;

/// One guest cluster's L2 entry.
#[derive(Clone, Copy)]
enum E {
    /// Allocated, every byte `fill`.
    Data(u8),
    /// The zero flag, no host cluster.
    Zero,
    /// The zero flag over an allocated cluster of `fill` (reads as zeros all the same).
    ZeroAlloc(u8),
    /// Extended L2: a host cluster of `fill`, and the subcluster bitmap.
    Sub { alloc: u32, zero: u32, fill: u8 },
    /// Compressed, every byte `fill`.
    Compressed(u8),
}

struct Img {
    version: u32,
    cluster_bits: u32,
    size: u64,
    extended_l2: bool,
    incompatible: u64,
    backing: Option<(String, &'static str)>,
    clusters: Vec<(u64, E)>,
}

impl Img {
    fn new(cluster_bits: u32, size: u64) -> Self {
        Self {
            version: 3,
            cluster_bits,
            size,
            extended_l2: false,
            incompatible: 0,
            backing: None,
            clusters: Vec::new(),
        }
    }

    fn build(&self) -> Vec<u8> {
        let cs = 1usize << self.cluster_bits;
        let l2_bits = self.cluster_bits - 3 - u32::from(self.extended_l2);
        let span = 1u64 << (self.cluster_bits + l2_bits);
        let l1_entries = self.size.div_ceil(span) as usize;
        let mut f = vec![0u8; cs];
        let alloc = |f: &mut Vec<u8>, n: usize| -> usize {
            let at = f.len().next_multiple_of(cs);
            f.resize(at + n.next_multiple_of(cs), 0);
            at
        };
        let l1_at = alloc(&mut f, (l1_entries * 8).max(1));
        let mut l2_at = vec![0usize; l1_entries];
        let entry_size = if self.extended_l2 { 16 } else { 8 };
        for &(guest, e) in &self.clusters {
            let l1_index = (guest >> l2_bits) as usize;
            let l2_index = (guest & ((1 << l2_bits) - 1)) as usize;
            if l2_at[l1_index] == 0 {
                l2_at[l1_index] = alloc(&mut f, cs);
                let at = l1_at + 8 * l1_index;
                f[at..at + 8].copy_from_slice(&(l2_at[l1_index] as u64 | 1 << 63).to_be_bytes());
            }
            let (entry, bitmap) = match e {
                E::Data(fill) | E::ZeroAlloc(fill) | E::Sub { fill, .. } => {
                    let at = alloc(&mut f, cs);
                    f[at..at + cs].fill(fill);
                    let flag = u64::from(matches!(e, E::ZeroAlloc(_)));
                    let bitmap = match e {
                        E::Sub { alloc, zero, .. } => u64::from(alloc) | u64::from(zero) << 32,
                        _ => 0,
                    };
                    (at as u64 | flag, bitmap)
                }
                E::Zero => (ZERO_FLAG, 0),
                E::Compressed(fill) => {
                    let mut z = flate2::Compress::new(flate2::Compression::default(), false);
                    let mut out = vec![0u8; 2 * cs + 64];
                    z.compress(&vec![fill; cs], &mut out, flate2::FlushCompress::Finish)
                        .expect("deflate");
                    out.truncate(z.total_out() as usize);
                    // Unaligned, as qemu packs them.
                    let at = f.len().next_multiple_of(cs) + 100;
                    f.resize(at, 0);
                    f.extend_from_slice(&out);
                    let shift = 62 - (self.cluster_bits - 8);
                    let sectors = ((at % 512) + out.len()).div_ceil(512) as u64;
                    (COMPRESSED | at as u64 | (sectors - 1) << shift, 0)
                }
            };
            let at = l2_at[l1_index] + entry_size * l2_index;
            f[at..at + 8].copy_from_slice(&entry.to_be_bytes());
            if self.extended_l2 {
                f[at + 8..at + 16].copy_from_slice(&bitmap.to_be_bytes());
            }
        }
        // The header.
        let h = &mut f[..cs];
        h[..4].copy_from_slice(b"QFI\xfb");
        h[4..8].copy_from_slice(&self.version.to_be_bytes());
        h[20..24].copy_from_slice(&self.cluster_bits.to_be_bytes());
        h[24..32].copy_from_slice(&self.size.to_be_bytes());
        h[36..40].copy_from_slice(&(l1_entries as u32).to_be_bytes());
        h[40..48].copy_from_slice(&(l1_at as u64).to_be_bytes());
        let mut end = 72;
        if self.version == 3 {
            let incompatible = self.incompatible
                | if self.extended_l2 {
                    header::EXTENDED_L2
                } else {
                    0
                };
            h[72..80].copy_from_slice(&incompatible.to_be_bytes());
            h[96..100].copy_from_slice(&4u32.to_be_bytes());
            h[100..104].copy_from_slice(&104u32.to_be_bytes());
            end = 104;
        }
        if let Some((name, format)) = &self.backing {
            h[end..end + 4].copy_from_slice(&0xe279_2acau32.to_be_bytes());
            h[end + 4..end + 8].copy_from_slice(&(format.len() as u32).to_be_bytes());
            h[end + 8..end + 8 + format.len()].copy_from_slice(format.as_bytes());
            let name_at = 256;
            h[8..16].copy_from_slice(&(name_at as u64).to_be_bytes());
            h[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
            h[name_at..name_at + name.len()].copy_from_slice(name.as_bytes());
        }
        f
    }
}

struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let d = std::env::temp_dir().join(format!(
            "sendense-qcow2-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&d).expect("temp dir");
        Self(d)
    }

    fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, bytes).expect("write");
        p
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The whole disk of the chain at `top`, and how many of its bytes came from data.
fn read_all(top: &Path) -> Result<(Vec<u8>, usize), Qcow2Error> {
    let chain = Chain::open(top)?;
    let mut buf = vec![0xAAu8; chain.size() as usize];
    let mut data = Vec::new();
    // In uneven pieces, so runs start and end inside clusters.
    let mut at = 0;
    for piece in [1000usize, 70_000, 3].into_iter().cycle() {
        if at == buf.len() {
            break;
        }
        let n = piece.min(buf.len() - at);
        chain.read(at as u64, &mut buf[at..at + n], &mut data)?;
        at += n;
    }
    Ok((buf, data.iter().map(|r| r.len()).sum()))
}

const C64K: u32 = 16;

#[test]
fn clusters_zero_flags_and_backing_files() {
    let d = Dir::new("chain");
    let cs = 1usize << C64K;
    let mut base = Img::new(C64K, 8 * cs as u64);
    base.clusters = vec![
        (0, E::Data(1)),
        (1, E::Data(2)),
        (2, E::Data(3)),
        (7, E::Data(4)),
    ];
    d.write("base.qcow2", &base.build());
    let mut top = Img::new(C64K, 10 * cs as u64);
    top.backing = Some(("base.qcow2".into(), "qcow2"));
    top.clusters = vec![
        (1, E::Zero),
        (2, E::ZeroAlloc(9)),
        (3, E::Data(5)),
        (8, E::Data(6)),
    ];
    let top_path = d.write("top.qcow2", &top.build());
    let (disk, _) = read_all(&top_path).expect("read");
    let mut want = vec![0u8; 10 * cs];
    want[..cs].fill(1); // from the base
    want[3 * cs..4 * cs].fill(5);
    want[7 * cs..8 * cs].fill(4);
    want[8 * cs..9 * cs].fill(6); // past the base's end: the top's own cluster
    assert!(disk == want, "disk differs");
}

#[test]
fn small_and_large_clusters_v2_and_a_short_raw_backing_file() {
    let d = Dir::new("raw");
    let raw: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8 + 1).collect();
    d.write("base.raw", &raw);
    for (bits, version) in [(9, 2), (12, 3), (21, 3)] {
        let cs = 1usize << bits;
        let size = (8 * cs).max(16384) as u64;
        let mut top = Img::new(bits, size);
        top.version = version;
        top.backing = Some(("base.raw".into(), "raw"));
        top.clusters = vec![(1, E::Data(7))];
        let p = d.write(&format!("top{bits}.qcow2"), &top.build());
        let (disk, _) = read_all(&p).expect("read");
        let mut want = vec![0u8; size as usize];
        want[..raw.len()].copy_from_slice(&raw);
        want[cs..2 * cs].fill(7);
        assert!(disk == want, "{bits}-bit clusters differ");
    }
}

#[test]
fn extended_l2_subclusters() {
    let d = Dir::new("ext");
    let cs = 1usize << C64K;
    let sub = cs / 32;
    let mut base = Img::new(C64K, 2 * cs as u64);
    base.clusters = vec![(0, E::Data(1)), (1, E::Data(2))];
    d.write("base.qcow2", &base.build());
    let mut top = Img::new(C64K, 2 * cs as u64);
    top.extended_l2 = true;
    top.backing = Some(("base.qcow2".into(), "qcow2"));
    // Cluster 0: subclusters 0-1 data, 2 zero, the rest from the base.
    // Cluster 1: no host cluster, subcluster 31 zero.
    top.clusters = vec![
        (
            0,
            E::Sub {
                alloc: 0b011,
                zero: 0b100,
                fill: 8,
            },
        ),
        (
            1,
            E::Sub {
                alloc: 0,
                zero: 1 << 31,
                fill: 0,
            },
        ),
    ];
    let mut img = top.build();
    // Cluster 1's entry must have no host offset: clear what the builder allocated.
    let l1 = u64::from_be_bytes(img[(1 << C64K)..(1 << C64K) + 8].try_into().expect("8"));
    let l2 = (l1 & OFFSET_MASK) as usize;
    img[l2 + 16..l2 + 24].fill(0);
    let p = d.write("top.qcow2", &img);
    let (disk, _) = read_all(&p).expect("read");
    let mut want = vec![1u8; cs];
    want.extend(vec![2u8; cs]);
    want[..2 * sub].fill(8);
    want[2 * sub..3 * sub].fill(0);
    want[2 * cs - sub..].fill(0);
    assert!(disk == want, "disk differs");
}

#[test]
fn compressed_clusters_inflate() {
    let d = Dir::new("compressed");
    let mut img = Img::new(C64K, 4 << C64K);
    img.clusters = vec![(1, E::Compressed(0x5a)), (2, E::Data(3))];
    let p = d.write("c.qcow2", &img.build());
    let (disk, _) = read_all(&p).expect("read");
    let cs = 1 << C64K;
    let mut want = vec![0u8; 4 * cs];
    want[cs..2 * cs].fill(0x5a);
    want[2 * cs..3 * cs].fill(3);
    assert!(disk == want);
}

#[test]
fn unsupported_features_are_refused() {
    let d = Dir::new("refused");
    for (bit, what) in [
        (1u64, "dirty"),
        (2, "corrupt"),
        (4, "external"),
        (1 << 9, "unknown"),
    ] {
        let mut img = Img::new(C64K, 1 << 20);
        img.incompatible = bit;
        let p = d.write("x.qcow2", &img.build());
        match Chain::open(&p) {
            Err(Qcow2Error::Unsupported { what: w, .. }) => assert!(w.contains(what), "{w}"),
            other => panic!("{what}: {:?}", other.err()),
        }
    }
    let mut img = Img::new(C64K, 1 << 20);
    img.backing = Some(("nbd://host/x".into(), "qcow2"));
    let p = d.write("x.qcow2", &img.build());
    assert!(matches!(
        Chain::open(&p),
        Err(Qcow2Error::Unsupported { .. })
    ));
    img.backing = Some(("b.vmdk".into(), "vmdk"));
    let p = d.write("x.qcow2", &img.build());
    assert!(matches!(
        Chain::open(&p),
        Err(Qcow2Error::Unsupported { .. })
    ));
    // A loop: an image that is its own backing file.
    img.backing = Some(("x.qcow2".into(), "qcow2"));
    let p = d.write("x.qcow2", &img.build());
    assert!(matches!(Chain::open(&p), Err(Qcow2Error::Malformed { .. })));
    // A size qemu would round down to whole sectors.
    let p = d.write("odd.qcow2", &Img::new(C64K, 1000).build());
    assert!(matches!(
        Chain::open(&p),
        Err(Qcow2Error::Unsupported { .. })
    ));
    // A chain longer than MAX_CHAIN.
    let mut img = Img::new(C64K, 1 << 20);
    d.write("l0.qcow2", &img.build());
    for i in 1..=MAX_CHAIN {
        img.backing = Some((format!("l{}.qcow2", i - 1), "qcow2"));
        d.write(&format!("l{i}.qcow2"), &img.build());
    }
    assert!(Chain::open(&d.0.join(format!("l{}.qcow2", MAX_CHAIN - 1))).is_ok());
    assert!(matches!(
        Chain::open(&d.0.join(format!("l{MAX_CHAIN}.qcow2"))),
        Err(Qcow2Error::Unsupported { .. })
    ));
}

#[test]
fn huge_tables_are_errors_not_allocations() {
    let d = Dir::new("huge");
    let mut bytes = Img::new(C64K, 1 << 20).build();
    // A 2^60-byte disk with a matching L1 size: far larger than the file.
    bytes[24..32].copy_from_slice(&(1u64 << 60).to_be_bytes());
    bytes[36..40].copy_from_slice(&u32::MAX.to_be_bytes());
    let p = d.write("x.qcow2", &bytes);
    assert!(matches!(Chain::open(&p), Err(Qcow2Error::Malformed { .. })));
}

/// Flipped bytes in the header, the L1 and the L2 tables, and truncated files: errors or
/// (harmless flips) a disk, never a panic.
#[test]
fn damaged_files_never_panic() {
    let d = Dir::new("fuzz");
    let mut base = Img::new(12, 64 << 10);
    base.clusters = vec![(0, E::Data(1)), (3, E::Compressed(2))];
    d.write("base.qcow2", &base.build());
    let mut top = Img::new(14, 64 << 10);
    top.extended_l2 = true;
    top.backing = Some(("base.qcow2".into(), "qcow2"));
    top.clusters = vec![(
        1,
        E::Sub {
            alloc: 0xf0,
            zero: 0x0f,
            fill: 3,
        },
    )];
    let good = top.build();
    let good_base = base.build();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    // The header, the L1 table (cluster 1) and the L2 table (cluster 2).
    let hot = 3usize << 14;
    for round in 0..3000 {
        // Every third round damages the base (4 KiB clusters, a compressed one) instead.
        let (name, good) = if round % 3 == 2 {
            ("base.qcow2", &good_base)
        } else {
            ("top.qcow2", &good)
        };
        let mut bytes = good.clone();
        for _ in 0..1 + next() % 4 {
            let at = if round % 2 == 0 {
                (next() % 112) as usize
            } else {
                (next() % hot.min(good.len()) as u64) as usize
            };
            bytes[at] ^= 1 << (next() % 8);
        }
        if round % 7 == 0 {
            bytes.truncate((next() % good.len() as u64) as usize);
        }
        d.write(name, &bytes);
        if let Ok(chain) = Chain::open(&d.0.join("top.qcow2")) {
            // A flipped size may be huge: read a bounded part.
            let n = chain.size().min(256 << 10) as usize;
            let mut buf = vec![0u8; n];
            let _ = chain.read(0, &mut buf, &mut Vec::new());
        }
        d.write(name, good);
    }
}

/// A data cluster cut short by the file's end reads as zeros past it, as qemu reads it; a
/// truncated L2 table is an error.
#[test]
fn data_past_the_end_of_the_file_reads_as_zeros() {
    let d = Dir::new("short");
    let cs = 1usize << C64K;
    let mut img = Img::new(C64K, 4 * cs as u64);
    img.clusters = vec![(2, E::Data(6))];
    let mut bytes = img.build();
    bytes.truncate(bytes.len() - cs / 2);
    let p = d.write("x.qcow2", &bytes);
    let (disk, _) = read_all(&p).expect("read");
    let mut want = vec![0u8; 4 * cs];
    want[2 * cs..2 * cs + cs / 2].fill(6);
    assert!(disk == want);
    // Cut into the L2 table (cluster 2): an error when opened.
    bytes.truncate(2 * cs + 100);
    let p = d.write("x.qcow2", &bytes);
    assert!(matches!(Chain::open(&p), Err(Qcow2Error::Malformed { .. })));
}
