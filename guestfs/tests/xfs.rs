//! XFS images built by the real tools (`mkfs.xfs -p protofile`, then `xfs_db -x` for what a
//! protofile cannot say: timestamps, holes, unwritten extents, a btree block map) and read back
//! through `sendense_guestfs`. Each image is built once per test run and shared.
//!
//! Without xfsprogs installed the tests say so and pass without checking anything.

mod xfs_image;

use std::collections::BTreeMap;

use sendense_guestfs::{FileSystem, FsKind, Node, NodeKind, Timestamp};
use xfs_image::{Image, Variant};

fn lookup(fs: &dyn FileSystem, path: &str) -> Node {
    let mut node = fs.root().unwrap();
    for part in path.split('/').filter(|p| !p.is_empty()) {
        node = fs
            .read_dir(&node)
            .unwrap()
            .into_iter()
            .find(|e| e.name == part)
            .unwrap_or_else(|| panic!("{path}: no {part}"))
            .node;
    }
    node
}

/// The whole file, read in pieces of an odd size so reads start and end inside blocks.
fn read_all(fs: &dyn FileSystem, node: &Node) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = vec![0xaau8; 99_991];
    loop {
        let n = fs.read(node, out.len() as u64, &mut buf).unwrap();
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&buf[..n]);
    }
}

fn names(fs: &dyn FileSystem, path: &str) -> Vec<String> {
    let mut names: Vec<_> = fs
        .read_dir(&lookup(fs, path))
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    names.sort();
    names
}

fn each_variant(check: impl Fn(&Image)) {
    for variant in [Variant::V5, Variant::V5Nrext64, Variant::V4] {
        if let Some(image) = xfs_image::get(variant) {
            check(image);
        }
    }
}

#[test]
fn an_xfs_volume_is_recognised_with_its_label() {
    each_variant(|image| {
        let fs = &*image.fs;
        assert_eq!(fs.kind(), FsKind::Xfs);
        assert_eq!(fs.label().as_deref(), Some(image.variant.label()));
        let root = fs.root().unwrap();
        assert_eq!(root.kind, NodeKind::Directory);
        assert_eq!(root.mode, 0o755);
        assert_eq!(root.id, image.inode("/"));
        // The root and its five subdirectories' "..".
        assert_eq!(root.links, 7);
    });
}

#[test]
fn the_root_lists_every_name_with_its_kind() {
    each_variant(|image| {
        let fs = &*image.fs;
        let kinds: BTreeMap<String, NodeKind> = fs
            .read_dir(&fs.root().unwrap())
            .unwrap()
            .into_iter()
            .map(|e| (e.name, e.node.kind))
            .collect();
        let expected: BTreeMap<String, NodeKind> = [
            ("big.bin", NodeKind::File),
            ("btree.bin", NodeKind::File),
            ("sparse.bin", NodeKind::File),
            ("small.txt", NodeKind::File),
            ("setuid", NodeKind::File),
            ("empty", NodeKind::File),
            ("link-short", NodeKind::Symlink),
            ("link-long", NodeKind::Symlink),
            ("fifo", NodeKind::Other),
            ("null", NodeKind::Other),
            ("small", NodeKind::Directory),
            ("block", NodeKind::Directory),
            ("leaf", NodeKind::Directory),
            ("node", NodeKind::Directory),
            ("many", NodeKind::Directory),
        ]
        .into_iter()
        .map(|(n, k)| (n.to_owned(), k))
        .collect();
        assert_eq!(kinds, expected, "{:?}", image.variant);
    });
}

#[test]
fn modes_owners_and_times_are_the_inodes() {
    each_variant(|image| {
        let fs = &*image.fs;
        let small = lookup(fs, "small.txt");
        assert_eq!((small.mode, small.uid, small.gid), (0o640, 1000, 100));
        assert_eq!(small.id, image.inode("/small.txt"));
        assert_eq!(small.links, 1);
        assert_eq!(
            small.mtime,
            Timestamp {
                secs: 1_234_567_890,
                nanos: 987_654_321
            }
        );
        assert_eq!(
            small.atime,
            Timestamp {
                secs: 1_000_000_000,
                nanos: 500_000_000
            }
        );
        assert_eq!(lookup(fs, "setuid").mode, 0o4755);
        let sgid = lookup(fs, "small/sgid");
        assert_eq!(
            (sgid.kind, sgid.mode, sgid.uid, sgid.gid),
            (NodeKind::Directory, 0o2775, 7, 8)
        );
        assert_eq!(lookup(fs, "small").links, 3);
        assert_eq!(lookup(fs, "null").mode, 0o600);
    });
}

#[test]
fn small_and_large_files_read_byte_for_byte() {
    each_variant(|image| {
        let fs = &*image.fs;
        assert_eq!(read_all(fs, &lookup(fs, "small.txt")), xfs_image::SMALL);
        assert_eq!(read_all(fs, &lookup(fs, "empty")), b"");
        let big = lookup(fs, "big.bin");
        assert_eq!(big.size, xfs_image::big().len() as u64);
        assert!(read_all(fs, &big) == xfs_image::big(), "big.bin differs");
        // A read in the middle, and one past the end.
        let mut buf = [0u8; 10];
        assert_eq!(fs.read(&big, 1_000_003, &mut buf).unwrap(), 10);
        assert_eq!(buf, xfs_image::big()[1_000_003..1_000_013]);
        assert_eq!(fs.read(&big, big.size, &mut buf).unwrap(), 0);
        assert_eq!(fs.read(&big, big.size - 3, &mut buf).unwrap(), 3);
    });
}

#[test]
fn holes_and_unwritten_extents_read_as_zeros() {
    each_variant(|image| {
        let fs = &*image.fs;
        let sparse = lookup(fs, "sparse.bin");
        let expected = image.sparse_expected();
        assert_eq!(sparse.size, expected.len() as u64);
        assert!(read_all(fs, &sparse) == expected, "sparse.bin differs");
    });
}

#[test]
fn a_file_mapped_by_a_two_level_btree_reads_in_file_order() {
    each_variant(|image| {
        let fs = &*image.fs;
        let file = lookup(fs, "btree.bin");
        let expected = image.btree_expected();
        assert_eq!(file.size, expected.len() as u64);
        assert!(read_all(fs, &file) == expected, "btree.bin differs");
        // Single blocks from both leaves and from the hole between.
        let bs = image.block_size as usize;
        for block in [0usize, 31, 32, 41, 63] {
            let mut buf = vec![0u8; bs];
            let n = fs.read(&file, (block * bs) as u64, &mut buf).unwrap();
            assert_eq!(n, bs);
            assert!(
                buf == expected[block * bs..(block + 1) * bs],
                "block {block}"
            );
        }
    });
}

#[test]
fn directories_of_every_form_list_all_their_names() {
    each_variant(|image| {
        let fs = &*image.fs;
        for (dir, count) in xfs_image::DIRECTORIES {
            let expected: Vec<String> =
                (0..*count).map(|i| xfs_image::entry_name(dir, i)).collect();
            let mut expected = expected;
            if *dir == "small" {
                expected.push("sgid".into());
            }
            expected.sort();
            assert_eq!(names(fs, dir), expected, "{:?} {dir}", image.variant);
        }
    });
}

#[test]
fn files_in_a_btree_directory_read_their_own_content() {
    each_variant(|image| {
        let fs = &*image.fs;
        let entries = fs.read_dir(&lookup(fs, "many")).unwrap();
        assert_eq!(entries.len(), 2000);
        for entry in entries {
            let content = read_all(fs, &entry.node);
            assert_eq!(
                content,
                xfs_image::entry_content(&entry.name),
                "{}",
                entry.name
            );
            assert_eq!((entry.node.mode, entry.node.links), (0o644, 1));
        }
    });
}

#[test]
fn symbolic_links_inline_and_in_blocks_give_their_targets() {
    each_variant(|image| {
        let fs = &*image.fs;
        assert_eq!(
            fs.read_link(&lookup(fs, "link-short")).unwrap(),
            b"small.txt"
        );
        let long = lookup(fs, "link-long");
        assert_eq!(long.size, 1000);
        assert_eq!(
            fs.read_link(&long).unwrap(),
            xfs_image::long_target().as_bytes()
        );
    });
}

#[test]
fn a_file_is_not_a_directory_and_a_directory_is_not_a_link() {
    each_variant(|image| {
        let fs = &*image.fs;
        assert!(matches!(
            fs.read_dir(&lookup(fs, "small.txt")),
            Err(sendense_guestfs::Error::NotADirectory(_))
        ));
        assert!(fs.read_link(&lookup(fs, "small")).is_err());
    });
}

/// The image with one range of bytes replaced.
struct Damaged {
    inner: std::sync::Arc<dyn sendense_guestfs::ReadAt>,
    at: u64,
    bytes: Vec<u8>,
}

impl sendense_guestfs::ReadAt for Damaged {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> sendense_guestfs::Result<()> {
        self.inner.read_exact_at(offset, buf)?;
        let end = offset + buf.len() as u64;
        let damage_end = self.at + self.bytes.len() as u64;
        for pos in offset.max(self.at)..end.min(damage_end) {
            buf[(pos - offset) as usize] = self.bytes[(pos - self.at) as usize];
        }
        Ok(())
    }
}

/// A node and what it leads to, within limits: damage makes directory cycles and huge sizes.
fn walk(fs: &dyn FileSystem, node: &Node, depth: usize) {
    match node.kind {
        NodeKind::Directory if depth == 0 => {
            if let Ok(entries) = fs.read_dir(node) {
                for e in entries.iter().take(20) {
                    walk(fs, &e.node, depth + 1);
                }
            }
        }
        NodeKind::Directory => {}
        NodeKind::Symlink => {
            let _ = fs.read_link(node);
        }
        _ => {
            let mut buf = vec![0u8; 1 << 16];
            for offset in (0..node.size.min(2 << 20)).step_by(buf.len()) {
                if fs.read(node, offset, &mut buf).is_err() {
                    break;
                }
            }
            let _ = fs.read(node, node.size.saturating_sub(10), &mut buf);
        }
    }
}

/// The path's node, if the damage leaves a way to it.
fn try_lookup(fs: &dyn FileSystem, path: &str) -> Option<Node> {
    let mut node = fs.root().ok()?;
    for part in path.split('/').filter(|p| !p.is_empty()) {
        node = fs
            .read_dir(&node)
            .ok()?
            .into_iter()
            .find(|e| e.name == part)?
            .node;
    }
    Some(node)
}

#[test]
fn damaged_structures_give_errors_not_panics() {
    each_variant(|image| {
        let mut seed = 0x5eed_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for region in &image.metadata {
            let mut original = vec![0u8; region.len];
            image
                .volume
                .read_exact_at(region.at, &mut original)
                .unwrap();
            for round in 0..32 {
                let mut bytes = original.clone();
                if round == 0 {
                    bytes.iter_mut().for_each(|b| *b = next() as u8);
                } else {
                    // A few bytes, often near the start where headers and counts are.
                    for _ in 0..=(next() % 4) {
                        let span = if next() % 2 == 0 {
                            128.min(region.len)
                        } else {
                            region.len
                        };
                        bytes[(next() % span as u64) as usize] = next() as u8;
                    }
                }
                let volume = Damaged {
                    inner: image.volume.clone(),
                    at: region.at,
                    bytes,
                };
                if let Ok(fs) =
                    sendense_guestfs::open_filesystem(std::sync::Arc::new(volume), &region.what)
                    && let Some(node) = try_lookup(&*fs, region.path)
                {
                    walk(&*fs, &node, 0);
                }
            }
        }
    });
}
