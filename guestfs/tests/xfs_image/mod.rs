//! Builds the XFS test images: `mkfs.xfs -p` populates them from a protofile, `xfs_db -x`
//! then edits what a protofile cannot express. Every edit is checked back through `xfs_db`, so
//! the tests read shapes the real tools agree exist.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};

use sendense_guestfs::{FileSystem, ReadAt};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// What mkfs.xfs makes today: CRCs, file types in entries, big timestamps, 4 KiB blocks.
    V5,
    /// V5 with 64-bit extent counters (`nrext64`), which moves the inode's extent count.
    V5Nrext64,
    /// No CRCs, no file types in entries, 1 KiB blocks and 4 KiB directory blocks.
    V4,
}

impl Variant {
    pub fn label(self) -> &'static str {
        match self {
            Variant::V5 => "guest-v5",
            Variant::V5Nrext64 => "guest-nrx64",
            Variant::V4 => "guest-v4",
        }
    }

    fn block_size(self) -> u32 {
        match self {
            Variant::V5 | Variant::V5Nrext64 => 4096,
            Variant::V4 => 1024,
        }
    }

    fn mkfs_args(self) -> &'static [&'static str] {
        match self {
            Variant::V5 => &[],
            Variant::V5Nrext64 => &["-i", "nrext64=1"],
            Variant::V4 => &["-m", "crc=0", "-b", "size=1024", "-n", "size=4096,ftype=0"],
        }
    }

    fn crc(self) -> bool {
        self != Variant::V4
    }

    /// The data fork's name in xfs_db (`u3` for v3 inodes).
    fn fork(self) -> &'static str {
        match self {
            Variant::V5 | Variant::V5Nrext64 => "u3",
            Variant::V4 => "u",
        }
    }
}

pub struct Image {
    pub variant: Variant,
    pub volume: Arc<dyn ReadAt>,
    pub fs: Box<dyn FileSystem>,
    /// Where the structures the reader walks are.
    pub metadata: Vec<Region>,
    pub block_size: u32,
    inodes: BTreeMap<&'static str, u64>,
}

impl Image {
    pub fn inode(&self, path: &str) -> u64 {
        self.inodes[path]
    }

    /// sparse.bin: blocks 0-1 written, 2-4 a hole, 5-7 unwritten, 8-11 written, then a hole
    /// to 20 blocks and 100 bytes.
    pub fn sparse_expected(&self) -> Vec<u8> {
        let bs = self.block_size as usize;
        let source = pattern(2, SPARSE_BLOCKS * bs);
        let mut out = vec![0u8; 20 * bs + 100];
        out[..2 * bs].copy_from_slice(&source[..2 * bs]);
        out[8 * bs..12 * bs].copy_from_slice(&source[8 * bs..12 * bs]);
        out
    }

    /// btree.bin: file block `b` is source block `63 - b`, except blocks 40-43 (a hole).
    pub fn btree_expected(&self) -> Vec<u8> {
        let bs = self.block_size as usize;
        let source = pattern(3, BTREE_SOURCE_BLOCKS * bs);
        let mut out = vec![0u8; 64 * bs];
        for b in btree_file_blocks() {
            let from = (63 - b) as usize * bs;
            out[b as usize * bs..][..bs].copy_from_slice(&source[from..from + bs]);
        }
        out
    }
}

pub const SMALL: &[u8] = b"hello from an XFS guest\n";
const SPARSE_BLOCKS: usize = 16;
/// 64 blocks of data and three for the btree blocks themselves.
const BTREE_SOURCE_BLOCKS: usize = 67;

/// Directories and how many files each holds, sized for short-form, block, leaf, node and (with
/// every file taking a block between the directory's own) btree-mapped node directories.
pub const DIRECTORIES: &[(&str, usize)] = &[
    ("small", 3),
    ("block", 40),
    ("leaf", 200),
    ("node", 1200),
    ("many", 2000),
];

pub fn entry_name(dir: &str, i: usize) -> String {
    format!("{dir}-{i:05}-entry")
}

pub fn entry_content(name: &str) -> Vec<u8> {
    format!("content of {name}\n").into_bytes()
}

pub fn big() -> &'static [u8] {
    static BIG: OnceLock<Vec<u8>> = OnceLock::new();
    BIG.get_or_init(|| pattern(1, 1_500_000 + 123))
}

pub fn long_target() -> String {
    let mut target = String::new();
    for i in 0.. {
        let _ = write!(target, "dir{i:03}/");
        if target.len() > 1000 {
            break;
        }
    }
    target.truncate(996);
    target.push_str("/end");
    target
}

/// Deterministic bytes (xorshift), distinct per seed.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn btree_file_blocks() -> impl Iterator<Item = u64> {
    (0..64).filter(|b| !(40..44).contains(b))
}

pub fn get(variant: Variant) -> Option<&'static Image> {
    static V5: OnceLock<Option<Image>> = OnceLock::new();
    static V5_NREXT64: OnceLock<Option<Image>> = OnceLock::new();
    static V4: OnceLock<Option<Image>> = OnceLock::new();
    let cell = match variant {
        Variant::V5 => &V5,
        Variant::V5Nrext64 => &V5_NREXT64,
        Variant::V4 => &V4,
    };
    cell.get_or_init(|| build(variant)).as_ref()
}

fn tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

fn build(variant: Variant) -> Option<Image> {
    let (Some(mkfs), Some(db)) = (tool("mkfs.xfs"), tool("xfs_db")) else {
        eprintln!("mkfs.xfs or xfs_db not installed: XFS image tests skipped");
        return None;
    };
    let work = std::env::temp_dir().join(format!(
        "sendense-guestfs-xfs-{}-{variant:?}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(work.join("src")).unwrap();
    let proto = write_sources(variant, &work);
    let img = work.join("xfs.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(300 << 20)
        .unwrap();
    let status = Command::new(mkfs)
        .args(["-q", "-f", "-L", variant.label(), "-d", "size=300m", "-p"])
        .arg(&proto)
        .args(variant.mkfs_args())
        .arg(&img)
        .status()
        .unwrap();
    assert!(status.success(), "mkfs.xfs failed for {variant:?}");

    let db = Db {
        tool: db,
        img: img.clone(),
        variant,
    };
    db.check_directory_forms();
    db.set_times();
    db.fix_remote_symlink();
    db.make_sparse();
    db.make_btree();

    let mut inodes = BTreeMap::new();
    for path in ["/", "/small.txt"] {
        inodes.insert(path, db.inode(path));
    }
    let metadata = db.metadata();
    let file = std::fs::File::open(&img).unwrap();
    let volume: Arc<dyn ReadAt> = Arc::new(file);
    let fs = sendense_guestfs::open_filesystem(volume.clone(), "test image").unwrap();
    // The open file keeps the image; nothing is left behind in the temporary directory.
    std::fs::remove_dir_all(&work).unwrap();
    Some(Image {
        variant,
        volume,
        fs,
        metadata,
        block_size: variant.block_size(),
        inodes,
    })
}

/// Source files and the protofile naming them.
fn write_sources(variant: Variant, work: &Path) -> PathBuf {
    let src = work.join("src");
    let bs = variant.block_size() as usize;
    let source = |name: &str, content: &[u8]| {
        let path = src.join(name);
        std::fs::write(&path, content).unwrap();
        path.display().to_string()
    };
    let small = source("small.txt", SMALL);
    let mut p = String::from("sendense-test-image\n0 0\nd--755 0 0\n");
    let _ = writeln!(p, "small.txt ---640 1000 100 {small}");
    let _ = writeln!(p, "setuid -u-755 0 0 {small}");
    let _ = writeln!(p, "empty ---644 0 0 {}", source("empty", b""));
    let _ = writeln!(p, "big.bin ---644 0 0 {}", source("big.bin", big()));
    let sparse = source("sparse.bin", &pattern(2, SPARSE_BLOCKS * bs));
    let _ = writeln!(p, "sparse.bin ---644 0 0 {sparse}");
    let btree = source("btree.bin", &pattern(3, BTREE_SOURCE_BLOCKS * bs));
    let _ = writeln!(p, "btree.bin ---600 0 0 {btree}");
    let _ = writeln!(p, "link-short l--777 0 0 small.txt");
    let _ = writeln!(p, "link-long l--777 0 0 {}", long_target());
    let _ = writeln!(p, "fifo p--644 0 0");
    let _ = writeln!(p, "null c--600 0 0 1 3");
    for (dir, count) in DIRECTORIES {
        let _ = writeln!(p, "{dir} d--755 0 0");
        if *dir == "small" {
            let _ = writeln!(p, "sgid d-g775 7 8\n$");
        }
        for i in 0..*count {
            let name = entry_name(dir, i);
            let path = source(&name, &entry_content(&name));
            let _ = writeln!(p, "{name} ---644 0 0 {path}");
        }
        p.push_str("$\n");
    }
    p.push_str("$\n");
    let proto = work.join("proto");
    std::fs::write(&proto, p).unwrap();
    proto
}

/// Bytes of one on-disk structure, and the path whose reading goes through it.
pub struct Region {
    pub what: String,
    pub path: &'static str,
    pub at: u64,
    pub len: usize,
}

/// One extent as `xfs_db bmap` prints it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mapping {
    file_block: u64,
    disk_block: u64,
    blocks: u64,
    unwritten: bool,
}

struct Db {
    tool: PathBuf,
    img: PathBuf,
    variant: Variant,
}

impl Db {
    fn run(&self, commands: &[String]) -> String {
        let mut cmd = Command::new(&self.tool);
        cmd.arg("-x").env("TZ", "UTC");
        for c in commands {
            cmd.args(["-c", c]);
        }
        let out = cmd.arg(&self.img).output().unwrap();
        assert!(out.status.success(), "xfs_db {commands:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    }

    /// `field = value` lines of a print, value without xfs_db's gloss.
    fn field(&self, commands: &[String], field: &str) -> String {
        let out = self.run(commands);
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{field} = ")))
            .unwrap_or_else(|| panic!("{field} not in {out}"))
            .split(' ')
            .next()
            .unwrap()
            .to_owned()
    }

    fn inode(&self, path: &str) -> u64 {
        let out = self.run(&[format!("path {path}"), "inode".into()]);
        out.trim()
            .strip_prefix("current inode number is ")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("inode of {path}: {out}"))
    }

    fn format(&self, path: &str) -> String {
        self.field(
            &[format!("path {path}"), "print core.format".into()],
            "core.format",
        )
    }

    fn bmap(&self, path: &str) -> Vec<Mapping> {
        let out = self.run(&[format!("path {path}"), "bmap".into()]);
        out.lines()
            .map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                assert_eq!(
                    (w[0], w[1], w[3], w[6], w[8]),
                    ("data", "offset", "startblock", "count", "flag"),
                    "{l}"
                );
                Mapping {
                    file_block: w[2].parse().unwrap(),
                    disk_block: w[4].parse().unwrap(),
                    blocks: w[7].parse().unwrap(),
                    unwritten: w[9] == "1",
                }
            })
            .collect()
    }

    fn uuid(&self) -> String {
        self.field(&["sb 0".into(), "print uuid".into()], "uuid")
    }

    fn daddr(&self, fsb: u64) -> u64 {
        let out = self.run(&[format!("convert fsb {fsb} daddr")]);
        let hex = out
            .split_whitespace()
            .next()
            .unwrap()
            .trim_start_matches("0x");
        u64::from_str_radix(hex, 16).unwrap()
    }

    fn byte(&self, unit: &str, n: u64) -> u64 {
        let out = self.run(&[format!("convert {unit} {n} byte")]);
        let hex = out
            .split_whitespace()
            .next()
            .unwrap()
            .trim_start_matches("0x");
        u64::from_str_radix(hex, 16).unwrap()
    }

    /// The superblock, the inodes of the tree's directories, links and edited files, and the
    /// first block of each of their block maps (directory data, link target, btree blocks).
    fn metadata(&self) -> Vec<Region> {
        let inode_size: usize = self
            .field(&["sb 0".into(), "print inodesize".into()], "inodesize")
            .parse()
            .unwrap();
        let bs = self.variant.block_size() as usize;
        let mut regions = vec![Region {
            what: "superblock".into(),
            path: "/",
            at: 0,
            len: 512,
        }];
        let paths = [
            "/",
            "/small",
            "/block",
            "/leaf",
            "/node",
            "/many",
            "/small.txt",
            "/sparse.bin",
            "/btree.bin",
            "/link-short",
            "/link-long",
        ];
        for path in paths {
            let ino = self.inode(path);
            regions.push(Region {
                what: format!("inode of {path}"),
                path,
                at: self.byte("ino", ino),
                len: inode_size,
            });
            for (i, m) in self.bmap(path).iter().take(3).enumerate() {
                regions.push(Region {
                    what: format!("block {i} of {path}"),
                    path,
                    at: self.byte("fsb", m.disk_block),
                    len: bs,
                });
            }
        }
        // The node and the two leaves `make_btree` wrote after the 64 data blocks.
        let btree = self
            .bmap("/btree.bin")
            .iter()
            .map(|m| m.disk_block)
            .max()
            .unwrap()
            + 1;
        for (i, block) in (btree..btree + 3).enumerate() {
            regions.push(Region {
                what: format!("btree block {i} of /btree.bin"),
                path: "/btree.bin",
                at: self.byte("fsb", block),
                len: bs,
            });
        }
        regions
    }

    /// The images must hold each directory form the tests mean to read.
    fn check_directory_forms(&self) {
        let bs = u64::from(self.variant.block_size());
        let leaf = (32u64 << 30) / bs;
        let free = (64u64 << 30) / bs;
        assert_eq!(self.format("/small"), "1", "small is short form");
        let block = self.bmap("/block");
        assert!(
            block.iter().all(|m| m.file_block < leaf),
            "block form: {block:?}"
        );
        assert_eq!(
            block.iter().map(|m| m.blocks).sum::<u64>() * bs,
            4096,
            "one directory block"
        );
        let leaf_form = self.bmap("/leaf");
        assert!(
            leaf_form.iter().any(|m| m.file_block >= leaf),
            "leaf form: {leaf_form:?}"
        );
        assert!(
            leaf_form.iter().all(|m| m.file_block < free),
            "leaf form: {leaf_form:?}"
        );
        let node = self.bmap("/node");
        assert!(
            node.iter().any(|m| m.file_block >= free),
            "node form: {node:?}"
        );
        assert!(self.bmap("/many").iter().any(|m| m.file_block >= free));
        assert_eq!(self.format("/many"), "3", "many is btree-mapped");
        assert_eq!(self.format("/link-short"), "1");
        assert_eq!(self.format("/link-long"), "2");
    }

    /// small.txt: mtime 1234567890.987654321, atime 1000000000.5.
    ///
    /// xfs_db (6.1) writes a timestamp's `sec` field as the raw 64-bit timestamp: seconds and
    /// nanoseconds in two 32-bit halves, or with big timestamps one count of nanoseconds since
    /// 1901-12-13. What it then prints back (in UTC) is checked, so a tool that parses the
    /// field differently fails here rather than in the reader's tests.
    fn set_times(&self) {
        let times = [
            (
                "mtime",
                1_234_567_890u64,
                987_654_321u64,
                "Fri Feb 13 23:31:30 2009",
            ),
            (
                "atime",
                1_000_000_000,
                500_000_000,
                "Sun Sep  9 01:46:40 2001",
            ),
        ];
        let mut commands = vec!["path /small.txt".to_owned()];
        for (field, secs, nanos, _) in times {
            let raw = if self.variant.crc() {
                (secs + (1 << 31)) * 1_000_000_000 + nanos
            } else {
                (secs << 32) | nanos
            };
            commands.push(format!("write core.{field}.sec {raw}"));
        }
        self.run(&commands);
        for (field, _, nanos, date) in times {
            let print = vec!["path /small.txt".to_owned(), format!("print core.{field}")];
            let out = self.run(&print);
            assert!(
                out.contains(&format!("core.{field}.sec = {date}\n"))
                    && out.contains(&format!("core.{field}.nsec = {nanos}\n")),
                "{out}"
            );
        }
    }

    /// mkfs.xfs 6.1 copies a remote symlink target into its block without the v5 header the
    /// kernel (and this reader) expect; write it as the kernel would. Idempotent.
    fn fix_remote_symlink(&self) {
        if !self.variant.crc() {
            return;
        }
        let target = long_target();
        let ino = self.inode("/link-long");
        let map = self.bmap("/link-long");
        assert_eq!(map.len(), 1);
        let daddr = self.daddr(map[0].disk_block);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.img)
            .unwrap();
        file.write_all_at(target.as_bytes(), daddr * 512 + 56)
            .unwrap();
        drop(file);
        self.run(&[
            "path /link-long".into(),
            "dblock 0".into(),
            "type symlink".into(),
            "write -d magic 0x58534c4d".into(),
            "write -d offset 0".into(),
            format!("write -d bytes {}", target.len()),
            format!("write -d owner {ino}"),
            format!("write -d bno {daddr}"),
            format!("write -d uuid {}", self.uuid()),
            "write -d lsn 0".into(),
        ]);
    }

    /// Rewrites sparse.bin's one extent as three with holes between and after, the middle one
    /// unwritten (see `Image::sparse_expected`).
    fn make_sparse(&self) {
        let map = self.bmap("/sparse.bin");
        assert_eq!(map.len(), 1, "sparse.bin in one extent: {map:?}");
        let start = map[0].disk_block;
        let bs = u64::from(self.variant.block_size());
        let fork = self.variant.fork();
        let mut commands = vec![
            "path /sparse.bin".to_owned(),
            "write -d core.nextents 3".into(),
            format!("write -d core.size {}", 20 * bs + 100),
        ];
        let extents = [(0u64, 2u64, 0u8), (5, 3, 1), (8, 4, 0)];
        for (i, (file_block, blocks, unwritten)) in extents.into_iter().enumerate() {
            commands.extend([
                format!("write -d {fork}.bmx[{i}].startoff {file_block}"),
                format!("write -d {fork}.bmx[{i}].startblock {}", start + file_block),
                format!("write -d {fork}.bmx[{i}].blockcount {blocks}"),
                format!("write -d {fork}.bmx[{i}].extentflag {unwritten}"),
            ]);
        }
        self.run(&commands);
        let expected: Vec<Mapping> = extents
            .into_iter()
            .map(|(file_block, blocks, unwritten)| Mapping {
                file_block,
                disk_block: start + file_block,
                blocks,
                unwritten: unwritten == 1,
            })
            .collect();
        assert_eq!(self.bmap("/sparse.bin"), expected);
    }

    /// Turns btree.bin's single extent into a two-level block map btree: a root in the inode
    /// pointing at one node block, pointing at two leaves of one-block extents in reverse disk
    /// order (so none merge), with a hole in the second leaf.
    fn make_btree(&self) {
        let map = self.bmap("/btree.bin");
        assert_eq!(map.len(), 1, "btree.bin in one extent: {map:?}");
        let start = map[0].disk_block;
        let ino = self.inode("/btree.bin");
        let (node, leaf1, leaf2) = (start + 64, start + 65, start + 66);
        let extent = |file_block: u64| (file_block, start + 63 - file_block);
        let first: Vec<_> = btree_file_blocks()
            .filter(|&b| b < 32)
            .map(extent)
            .collect();
        let second: Vec<_> = btree_file_blocks()
            .filter(|&b| b >= 32)
            .map(extent)
            .collect();
        self.write_btree_block(leaf1, ino, 0, None, Some(leaf2), |c| {
            records(c, &first);
        });
        self.write_btree_block(leaf2, ino, 0, Some(leaf1), None, |c| {
            records(c, &second);
        });
        self.write_btree_block(node, ino, 1, None, None, |c| {
            c.push("write -d numrecs 2".into());
            c.push("write -d keys[1].startoff 0".into());
            c.push("write -d keys[2].startoff 32".into());
            c.push(format!("write -d ptrs[1] {leaf1}"));
            c.push(format!("write -d ptrs[2] {leaf2}"));
        });
        let fork = self.variant.fork();
        let bs = u64::from(self.variant.block_size());
        self.run(&[
            format!("inode {ino}"),
            "write -d core.format 3".into(),
            format!("write -d core.nextents {}", first.len() + second.len()),
            format!("write -d core.size {}", 64 * bs),
            format!("write -d {fork}.bmbt.level 2"),
            format!("write -d {fork}.bmbt.numrecs 1"),
            format!("write -d {fork}.bmbt.keys[1].startoff 0"),
            format!("write -d {fork}.bmbt.ptrs[1] {node}"),
        ]);
        assert_eq!(self.format("/btree.bin"), "3");
        if self.variant == Variant::V5Nrext64 {
            let flag = ["path /btree.bin".to_owned(), "print v3.nrext64".into()];
            assert_eq!(self.field(&flag, "v3.nrext64"), "1");
        }
        let expected: Vec<Mapping> = first
            .iter()
            .chain(&second)
            .map(|&(file_block, disk_block)| Mapping {
                file_block,
                disk_block,
                blocks: 1,
                unwritten: false,
            })
            .collect();
        assert_eq!(self.bmap("/btree.bin"), expected);
    }

    fn write_btree_block(
        &self,
        block: u64,
        ino: u64,
        level: u16,
        left: Option<u64>,
        right: Option<u64>,
        body: impl FnOnce(&mut Vec<String>),
    ) {
        let sibling = |s: Option<u64>| s.map_or("-- -1".to_owned(), |s| s.to_string());
        let magic = if self.variant.crc() {
            "0x424d4133"
        } else {
            "0x424d4150"
        };
        let mut c = vec![
            format!("fsblock {block}"),
            "type bmapbtd".into(),
            format!("write -d magic {magic}"),
            format!("write -d level {level}"),
            format!("write -d leftsib {}", sibling(left)),
            format!("write -d rightsib {}", sibling(right)),
        ];
        if self.variant.crc() {
            c.push(format!("write -d bno {}", self.daddr(block)));
            c.push(format!("write -d owner {ino}"));
            c.push(format!("write -d uuid {}", self.uuid()));
            c.push("write -d lsn 0".into());
        }
        body(&mut c);
        self.run(&c);
    }
}

fn records(c: &mut Vec<String>, extents: &[(u64, u64)]) {
    c.push(format!("write -d numrecs {}", extents.len()));
    for (i, (file_block, disk_block)) in extents.iter().enumerate() {
        let i = i + 1;
        c.push(format!("write -d recs[{i}].startoff {file_block}"));
        c.push(format!("write -d recs[{i}].startblock {disk_block}"));
        c.push(format!("write -d recs[{i}].blockcount 1"));
        c.push(format!("write -d recs[{i}].extentflag 0"));
    }
}
