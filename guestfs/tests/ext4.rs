//! ext2/ext4 images written by mke2fs from a populated directory read back equal to it; the
//! same through a GPT and an MBR logical partition; extraction to a directory and to a tar
//! archive gives back the content, modes, owners and times.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use common::{Scratch, have, open_image, running_as_root, sh};
use sendense_guestfs::walk::{self, DEFAULT_MAX_DEPTH, Pattern};
use sendense_guestfs::{FileSystem, Node, NodeKind, Slice, Timestamp, open_filesystem, partition};

const MIB: u64 = 1 << 20;
/// Nanoseconds set by debugfs on /docs/report.txt (mke2fs -d keeps whole seconds only).
const NANOS: u32 = 123_456_789;

/// A pattern of bytes that differs at every position of a large file.
fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// The source tree every image is made from.
fn populate(src: &Path) {
    let w = |p: &str, data: &[u8]| std::fs::write(src.join(p), data).unwrap();
    for d in ["docs", "a/b/c", "private", "many"] {
        std::fs::create_dir_all(src.join(d)).unwrap();
    }
    w("docs/report.txt", b"quarterly numbers\n");
    w("docs/empty", b"");
    w("docs/medium.bin", &pattern(70_000, 1));
    w("big.bin", &pattern(3 * MIB as usize + 123, 2));
    w("a/b/c/deep.txt", b"deep down\n");
    w("private/secret", b"s3cr3t\n");
    w("private/run.sh", b"#!/bin/sh\necho hi\n");
    for i in 0..300 {
        w(&format!("many/file-{i:03}"), format!("{i}\n").as_bytes());
    }
    // Sparse: 20 MiB with data islands every 1 MiB (11 extents: an extent tree of depth 1).
    sh(&format!(
        "truncate -s 20M {}",
        src.join("sparse.img").display()
    ));
    for i in 0..11u64 {
        sh(&format!(
            "printf 'island %d' {i} | dd of={} bs=1 seek={} conv=notrunc status=none",
            src.join("sparse.img").display(),
            i * MIB + 4096 * i
        ));
    }
    std::os::unix::fs::symlink("a/b/c/deep.txt", src.join("link")).unwrap();
    std::os::unix::fs::symlink("a/b", src.join("dirlink")).unwrap();
    let long = format!("/{}/target", "long-directory-name".repeat(5));
    std::os::unix::fs::symlink(&long, src.join("longlink")).unwrap();
    let mode = |p: &str, m: u32| {
        std::fs::set_permissions(src.join(p), std::fs::Permissions::from_mode(m)).unwrap()
    };
    mode("private/secret", 0o640);
    mode("private/run.sh", 0o700);
    mode("private", 0o750);
    mode("docs/medium.bin", 0o4755);
    if running_as_root() {
        sh(&format!(
            "chown 1234:5678 {}",
            src.join("private/secret").display()
        ));
        sh(&format!("chown -h 42:43 {}", src.join("link").display()));
    }
    sh(&format!(
        "cd {} && touch -d '2021-03-04 05:06:07 UTC' docs/report.txt && \
         touch -d '1999-12-31 23:59:59 UTC' big.bin private/secret && \
         touch -h -d '2010-10-10 10:10:10 UTC' link && touch -d '2005-05-05 05:05:05 UTC' a/b/c a",
        src.display()
    ));
}

/// Builds a file system image from the populated `src`.
fn mkfs(dir: &Scratch, src: &Path, name: &str, options: &str) -> std::path::PathBuf {
    let img = dir.join(name);
    sh(&format!(
        "truncate -s 64M {img} && mke2fs -q -F {options} -d {src} {img} && \
         debugfs -w -R 'sif /docs/report.txt mtime_extra {extra}' {img} 2>/dev/null",
        img = img.display(),
        src = src.display(),
        extra = NANOS << 2
    ));
    img
}

/// Every path below the root as the host has it (except lost+found, which mke2fs adds).
fn host_tree(root: &Path) -> BTreeMap<String, std::fs::Metadata> {
    fn go(root: &Path, rel: &str, out: &mut BTreeMap<String, std::fs::Metadata>) {
        for e in std::fs::read_dir(root.join(rel.trim_start_matches('/'))).unwrap() {
            let e = e.unwrap();
            let path = format!("{rel}/{}", e.file_name().to_string_lossy());
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            if m.is_dir() {
                go(root, &path, out);
            }
            out.insert(path, m);
        }
    }
    let mut out = BTreeMap::new();
    go(root, "", &mut out);
    out.remove("/lost+found");
    out
}

fn mtime(m: &std::fs::Metadata) -> Timestamp {
    Timestamp {
        secs: m.mtime(),
        nanos: m.mtime_nsec() as u32,
    }
}

fn read_all(fs: &dyn FileSystem, node: &Node) -> Vec<u8> {
    let mut out = vec![0u8; node.size as usize];
    let mut done = 0;
    while done < out.len() {
        // Odd-sized reads at odd offsets, across block and extent boundaries.
        let end = (done + 777_777).min(out.len());
        let n = fs.read(node, done as u64, &mut out[done..end]).unwrap();
        assert!(n > 0, "short read at {done}");
        done += n;
    }
    out
}

/// What the source says a path's mtime is: mke2fs -d keeps whole seconds; debugfs added
/// nanoseconds to one file.
fn expected_mtime(path: &str, m: &std::fs::Metadata) -> Timestamp {
    let mut t = mtime(m);
    t.nanos = if path == "/docs/report.txt" { NANOS } else { 0 };
    t
}

/// The file system holds exactly the source tree: names, kinds, sizes, modes, owners,
/// mtimes, contents and link targets.
fn assert_same_as_source(fs: &dyn FileSystem, src: &Path) {
    let expected = host_tree(src);
    let listed: BTreeMap<String, Node> = walk::list(fs, "/", DEFAULT_MAX_DEPTH)
        .unwrap()
        .into_iter()
        .filter(|(p, _)| p != "/lost+found")
        .collect();
    assert_eq!(
        listed.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>()
    );
    for (path, m) in &expected {
        let node = &listed[path];
        let kind = if m.is_dir() {
            NodeKind::Directory
        } else if m.file_type().is_symlink() {
            NodeKind::Symlink
        } else {
            NodeKind::File
        };
        assert_eq!(node.kind, kind, "{path}");
        assert_eq!(node.mode, m.mode() & 0o7777, "{path}: mode");
        assert_eq!((node.uid, node.gid), (m.uid(), m.gid()), "{path}: owner");
        assert_eq!(node.mtime, expected_mtime(path, m), "{path}: mtime");
        assert_eq!(walk::resolve(fs, path).unwrap(), *node, "{path}: resolve");
        match kind {
            NodeKind::File => {
                assert_eq!(node.size, m.len(), "{path}: size");
                let want = std::fs::read(src.join(&path[1..])).unwrap();
                assert!(read_all(fs, node) == want, "{path}: content differs");
            }
            NodeKind::Symlink => {
                let want = std::fs::read_link(src.join(&path[1..])).unwrap();
                assert_eq!(
                    fs.read_link(node).unwrap(),
                    want.as_os_str().as_encoded_bytes(),
                    "{path}: target"
                );
            }
            _ => {}
        }
    }
}

fn fixture(dir: &Scratch) -> std::path::PathBuf {
    let src = dir.join("src");
    std::fs::create_dir(&src).unwrap();
    populate(&src);
    src
}

#[test]
fn ext4_reads_back_the_tree_it_was_made_from() {
    if !have("mke2fs") {
        return;
    }
    let dir = Scratch::new("ext4");
    let src = fixture(&dir);
    let img = mkfs(&dir, &src, "ext4.img", "-t ext4 -L restore-me");
    // e2fsck -D rebuilds directories as hashed trees (htree), as a long-lived one would be.
    sh(&format!(
        "e2fsck -fyD {} >/dev/null 2>&1 || [ $? -le 1 ]",
        img.display()
    ));
    let fs = open_filesystem(open_image(&img), "ext4.img").unwrap();
    assert_eq!(fs.label().as_deref(), Some("restore-me"));
    assert_same_as_source(&*fs, &src);
    // Reads past the end give nothing; a hole reads as zeros.
    let sparse = walk::resolve(&*fs, "/sparse.img").unwrap();
    let mut buf = vec![0xFFu8; 100];
    assert_eq!(fs.read(&sparse, 20 * MIB, &mut buf).unwrap(), 0);
    assert_eq!(fs.read(&sparse, 2 * MIB - 1000, &mut buf).unwrap(), 100);
    assert!(buf.iter().all(|&b| b == 0));
}

#[test]
fn ext2_block_maps_with_double_indirect_blocks() {
    if !have("mke2fs") {
        return;
    }
    let dir = Scratch::new("ext2");
    let src = fixture(&dir);
    // 1 KiB blocks: the 3 MiB file needs double indirect blocks.
    let img = mkfs(&dir, &src, "ext2.img", "-t ext2 -b 1024 -I 256");
    let fs = open_filesystem(open_image(&img), "ext2.img").unwrap();
    assert_same_as_source(&*fs, &src);
}

#[test]
fn inline_data_files_and_directories() {
    if !have("mke2fs") {
        return;
    }
    let dir = Scratch::new("inline");
    let src = fixture(&dir);
    // mke2fs 1.47.0 with inline_data stores a sparse file's size as the end of its last data
    // block, not the source's size (debugfs shows the same): not this reader's concern.
    std::fs::remove_file(src.join("sparse.img")).unwrap();
    let img = mkfs(&dir, &src, "inline.img", "-t ext4 -O inline_data -I 512");
    let out = sh(&format!(
        "debugfs -R 'stat /docs/report.txt' {} 2>/dev/null",
        img.display()
    ));
    assert!(
        out.contains("InlineDataFl") || out.contains("Size of inline data"),
        "{out}"
    );
    let fs = open_filesystem(open_image(&img), "inline.img").unwrap();
    assert_same_as_source(&*fs, &src);
}

/// Copies a file system image into a partition of a disk image.
fn place(fs_img: &Path, disk: &Path, offset: u64) {
    sh(&format!(
        "dd if={} of={} bs=1M seek={} conv=notrunc,sparse status=none",
        fs_img.display(),
        disk.display(),
        offset / MIB
    ));
}

fn open_volume(disk: &Path, number: u32) -> Box<dyn FileSystem> {
    let disk = open_image(disk);
    let v = partition::volumes(&disk)
        .unwrap()
        .into_iter()
        .find(|v| v.number == number)
        .expect("partition");
    open_filesystem(Arc::new(Slice::new(disk, v.start, v.size)), "partition").unwrap()
}

#[test]
fn ext4_inside_a_gpt_partition() {
    if !have("mke2fs") || !have("sgdisk") {
        return;
    }
    let dir = Scratch::new("ext4-gpt");
    let src = fixture(&dir);
    let img = mkfs(&dir, &src, "ext4.img", "-t ext4");
    let disk = dir.join("disk.img");
    sh(&format!(
        "truncate -s 100M {d} && sgdisk -n 1:2048:+16M -n 2:0:+64M -t 2:8300 {d} >/dev/null",
        d = disk.display()
    ));
    place(&img, &disk, 17 * MIB);
    assert_same_as_source(&*open_volume(&disk, 2), &src);
}

#[test]
fn ext4_inside_an_mbr_logical_partition() {
    if !have("mke2fs") || !have("sfdisk") {
        return;
    }
    let dir = Scratch::new("ext4-mbr");
    let src = fixture(&dir);
    let img = mkfs(&dir, &src, "ext4.img", "-t ext4");
    let disk = dir.join("disk.img");
    sh(&format!(
        "truncate -s 100M {d}; printf '%s\\n' 'label: dos' 'start=2048, size=8192, type=83' \
         'start=12288, size=180000, type=5' 'start=16384, size=8192, type=83' \
         'start=26624, size=131072, type=83' | sfdisk -q {d}",
        d = disk.display()
    ));
    place(&img, &disk, 26624 * 512);
    assert_same_as_source(&*open_volume(&disk, 6), &src);
}

#[test]
fn a_committed_journal_transaction_is_read_and_a_revoked_one_is_not() {
    if !have("mke2fs") || !have("debugfs") {
        return;
    }
    let dir = Scratch::new("journal");
    let src = fixture(&dir);
    let img = mkfs(&dir, &src, "ext4.img", "-t ext4 -b 4096");
    let block: u64 = sh(&format!(
        "debugfs -R 'bmap /docs/report.txt 0' {} 2>/dev/null",
        img.display()
    ))
    .trim()
    .parse()
    .unwrap();
    let newer = dir.join("newer");
    let mut data = b"journalled numbers\n".to_vec();
    data.resize(4096, 0);
    std::fs::write(&newer, &data).unwrap();
    let journal = |script: &str| {
        sh(&format!(
            "printf '{script}' | debugfs -w -f - {} >/dev/null 2>&1",
            img.display()
        ))
    };
    journal(&format!("jo\\njw -b {block} {}\\njc\\n", newer.display()));
    let fs = open_filesystem(open_image(&img), "ext4.img").unwrap();
    let node = walk::resolve(&*fs, "/docs/report.txt").unwrap();
    // The size is the old one (the inode was not journalled), the content the newer block.
    assert_eq!(
        read_all(&*fs, &node),
        b"journalled numbers"[..node.size as usize]
    );
    // A later transaction revoking the block: the home copy counts again.
    journal(&format!("jo\\njw -r {block}\\njc\\n"));
    let fs = open_filesystem(open_image(&img), "ext4.img").unwrap();
    assert_eq!(read_all(&*fs, &node), b"quarterly numbers\n");
}

/// The extracted tree equals the file system's nodes: content, mode, owner (as root), times.
fn assert_extracted(fs: &dyn FileSystem, out: &Path, src: &Path, with_atime: bool) {
    let extracted = host_tree(out);
    let expected = host_tree(src);
    assert_eq!(
        extracted.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>()
    );
    for (path, m) in &extracted {
        let node = walk::resolve(fs, path).unwrap();
        assert_eq!(m.mode() & 0o7777, node.mode, "{path}: mode");
        assert_eq!(mtime(m), node.mtime, "{path}: mtime");
        if with_atime {
            let atime = Timestamp {
                secs: m.atime(),
                nanos: m.atime_nsec() as u32,
            };
            assert_eq!(atime, node.atime, "{path}: atime");
        }
        if running_as_root() {
            assert_eq!((m.uid(), m.gid()), (node.uid, node.gid), "{path}: owner");
        }
        if m.is_file() {
            let got = std::fs::read(out.join(&path[1..])).unwrap();
            let want = std::fs::read(src.join(&path[1..])).unwrap();
            assert!(got == want, "{path}: content differs");
        } else if m.file_type().is_symlink() {
            assert_eq!(
                std::fs::read_link(out.join(&path[1..])).unwrap(),
                std::fs::read_link(src.join(&path[1..])).unwrap()
            );
        }
    }
}

#[test]
fn extraction_to_a_directory_keeps_content_modes_owners_times_and_holes() {
    if !have("mke2fs") {
        return;
    }
    let dir = Scratch::new("extract");
    let src = fixture(&dir);
    let img = mkfs(&dir, &src, "ext4.img", "-t ext4");
    let fs = open_filesystem(open_image(&img), "ext4.img").unwrap();
    let patterns = [
        Pattern::new("/*").unwrap(),
        Pattern::new("/nothing/*.here").unwrap(),
    ];
    let selection = walk::select(&*fs, &patterns, DEFAULT_MAX_DEPTH).unwrap();
    assert_eq!(selection.unmatched, vec!["/nothing/*.here".to_owned()]);
    let selection: Vec<_> = selection
        .matches
        .into_iter()
        .filter(|(p, _)| p != "/lost+found")
        .collect();
    let out = dir.join("out");
    let report = walk::extract::to_dir(&*fs, &selection, &out, DEFAULT_MAX_DEPTH);
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert_eq!(report.files, 308);
    assert_eq!(report.symlinks, 3);
    assert_eq!(report.directories, 6);
    assert_extracted(&*fs, &out, &src, true);
    // The sparse file's holes stayed holes.
    let sparse = std::fs::metadata(out.join("sparse.img")).unwrap();
    assert!(sparse.blocks() * 512 < MIB, "{} blocks", sparse.blocks());
}

#[test]
fn extraction_to_tar_keeps_content_modes_owners_and_nanosecond_times() {
    if !have("mke2fs") || !have("tar") {
        return;
    }
    let dir = Scratch::new("tar");
    let src = fixture(&dir);
    let img = mkfs(&dir, &src, "ext4.img", "-t ext4");
    let fs = open_filesystem(open_image(&img), "ext4.img").unwrap();
    let all: Vec<_> = walk::list(&*fs, "/", 1)
        .unwrap()
        .into_iter()
        .filter(|(p, _)| p != "/lost+found")
        .collect();
    let archive = dir.join("out.tar");
    let mut file = std::fs::File::create(&archive).unwrap();
    let report = walk::archive::to_tar(&*fs, &all, &mut file, DEFAULT_MAX_DEPTH).unwrap();
    drop(file);
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert_eq!(report.files, 308);
    let out = dir.join("out");
    std::fs::create_dir(&out).unwrap();
    // GNU tar as the independent reader; it restores times from the PAX header.
    sh(&format!(
        "tar --numeric-owner -xpf {} -C {}",
        archive.display(),
        out.display()
    ));
    assert_extracted(&*fs, &out, &src, false);
}

#[test]
fn resolution_follows_directory_links_but_not_the_last_name() {
    if !have("mke2fs") {
        return;
    }
    let dir = Scratch::new("resolve");
    let src = fixture(&dir);
    let img = mkfs(&dir, &src, "ext4.img", "-t ext4");
    let fs = open_filesystem(open_image(&img), "ext4.img").unwrap();
    let deep = walk::resolve(&*fs, "/a/b/c/deep.txt").unwrap();
    assert_eq!(walk::resolve(&*fs, "/dirlink/c/deep.txt").unwrap(), deep);
    assert_eq!(
        walk::resolve(&*fs, "/a/b/../b/./c//deep.txt").unwrap(),
        deep
    );
    assert_eq!(
        walk::resolve(&*fs, "/link").unwrap().kind,
        NodeKind::Symlink
    );
    assert!(matches!(
        walk::resolve(&*fs, "/a/missing"),
        Err(sendense_guestfs::Error::NotFound(_))
    ));
    let sel = walk::select(
        &*fs,
        &[Pattern::new("/dirlink/**/*.txt").unwrap()],
        DEFAULT_MAX_DEPTH,
    )
    .unwrap();
    assert_eq!(
        sel.matches
            .iter()
            .map(|(p, _)| p.as_str())
            .collect::<Vec<_>>(),
        vec!["/dirlink/c/deep.txt"]
    );
}

/// An image in memory, for damaged copies.
struct Mem(Vec<u8>);

impl sendense_guestfs::ReadAt for Mem {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> sendense_guestfs::Result<()> {
        let src = usize::try_from(offset)
            .ok()
            .and_then(|o| self.0.get(o..o.checked_add(buf.len())?))
            .ok_or_else(|| sendense_guestfs::Error::Io {
                offset,
                source: std::io::ErrorKind::UnexpectedEof.into(),
            })?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

/// Damaged metadata gives errors, never a panic or a hang: the first 1 MiB (superblock,
/// descriptors, bitmaps, inode tables, directories, extent blocks) has 64 bytes overwritten
/// in each 1 KiB block in turn, and the whole tree is listed and read after each.
#[test]
fn damaged_metadata_never_panics() {
    if !have("mke2fs") {
        return;
    }
    let dir = Scratch::new("damaged");
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("d/e")).unwrap();
    std::fs::write(src.join("d/e/f"), pattern(50_000, 3)).unwrap();
    std::os::unix::fs::symlink("d/e", src.join("l")).unwrap();
    let img = dir.join("small.img");
    sh(&format!(
        "truncate -s 4M {img} && mke2fs -q -F -t ext4 -b 1024 -d {src} {img}",
        img = img.display(),
        src = src.display()
    ));
    let clean = std::fs::read(&img).unwrap();
    let noise = pattern(64, 9);
    for block in 1..1024usize {
        let mut damaged = clean.clone();
        let at = block * 1024 + (block * 37) % 960;
        damaged[at..at + 64].copy_from_slice(&noise);
        let Ok(fs) = open_filesystem(Arc::new(Mem(damaged)), "damaged") else {
            continue;
        };
        if let Ok(all) = walk::list(&*fs, "/", 16) {
            for (_, node) in all {
                let mut buf = vec![0u8; 65536];
                let _ = fs.read(&node, 0, &mut buf);
                let _ = fs.read_link(&node);
            }
        }
    }
}
