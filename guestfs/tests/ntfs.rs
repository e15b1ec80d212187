//! NTFS read in user space, checked against volumes the real tools build without mounting:
//! `mkntfs` formats, libntfs-3g (the library under ntfs-3g's tools, loaded at run time since
//! no tool makes directories, links, short names or old times) shapes the tree, `ntfscp`
//! writes file data and `ntfstruncate` makes a sparse tail.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use sendense_guestfs::{
    DirEntry, Error, FileSystem, FsKind, Node, NodeKind, ReadAt, Timestamp, ntfs, open_filesystem,
};

/// Unix time 1969-07-20T20:17:40Z: a time before 1970, set through libntfs-3g.
const OLD_MTIME: i64 = -14_182_940;

struct Fixture {
    image: PathBuf,
    /// The run interval of the `ntfscp` copies, which stamp the current time.
    copied_from: i64,
    copied_until: i64,
    small: Vec<u8>,
    big: Vec<u8>,
    zeros: Vec<u8>,
    sparse: Vec<u8>,
    nested: Vec<u8>,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| build(Path::new(env!("CARGO_TARGET_TMPDIR")).join("ntfs-fixture")))
}

fn build(dir: PathBuf) -> Fixture {
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let image = dir.join("volume.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    run(Command::new("mkntfs")
        .args(["-F", "-Q", "-s", "512", "-L", "Restore Test"])
        .arg(&image));

    let lib = libntfs::Library::load();
    let volume = lib.mount(&image);
    for path in ["/docs", "/docs/reports", "/docs/reports/2024", "/junction"] {
        volume.mkdir(path);
    }
    for i in 0..150 {
        volume.create(&format!("/docs/file-{i:03}.txt"));
    }
    volume.create("/link");
    volume.set_reparse(
        "/link",
        &link_value(0xA000_000C, r"docs\file-001.txt", r"docs\file-001.txt", 1),
    );
    volume.set_reparse(
        "/junction",
        &link_value(0xA000_0003, r"\??\C:\Users\Public", r"C:\Users\Public", 0),
    );
    volume.symlink("/docs/latest", "reports/2024/q1.txt");
    volume.create("/Long File Name.txt");
    volume.set_dos_name("/Long File Name.txt", "/", "LONGFI~1.TXT");
    volume.create("/old.txt");
    let nt = |unix: i64| (116_444_736_000_000_000i64 + unix * 10_000_000) as u64;
    volume.set_times("/old.txt", nt(OLD_MTIME), nt(OLD_MTIME + 1));
    volume.create("/readonly.txt");
    volume.set_attributes("/readonly.txt", 0x21); // READONLY | ARCHIVE
    volume.unmount();

    let small = b"hello, ntfs\n".to_vec();
    let big = noise(3 << 20, 1);
    let zeros = [noise(1 << 20, 2), vec![0; 2 << 20], noise(1 << 20, 3)].concat();
    let nested = noise(10_000, 4);
    let grow = noise(64 << 10, 5);
    let copied_from = now() - 1;
    for (name, content) in [
        ("empty.txt", &b""[..]),
        ("hello.txt", &small),
        ("big.bin", &big),
        ("zeros.bin", &zeros),
        ("docs/reports/2024/q1.txt", &nested),
        ("grow.bin", &grow),
    ] {
        let source = dir.join(name.replace('/', "_"));
        std::fs::write(&source, content).unwrap();
        run(Command::new("ntfscp")
            .arg("-q")
            .arg(&image)
            .arg(&source)
            .arg(format!("/{name}")));
    }
    let copied_until = now() + 1;
    // Growing a file past its data leaves a sparse run (no clusters) for the rest.
    let sparse = [grow, vec![0; (5 << 20) - (64 << 10)]].concat();
    let record = record_number(&image, "grow.bin");
    run(Command::new("ntfstruncate")
        .arg(&image)
        .arg(record.to_string())
        .arg("0x80")
        .arg(sparse.len().to_string()));

    let volume = lib.mount(&image);
    volume.link("/docs/reports/2024/q1.txt", "/", "q1-link.txt");
    volume.unmount();

    Fixture {
        image,
        copied_from,
        copied_until,
        small,
        big,
        zeros,
        sparse,
        nested,
    }
}

fn open(image: &Path) -> Box<dyn FileSystem> {
    let file: Arc<dyn ReadAt> = Arc::new(std::fs::File::open(image).unwrap());
    open_filesystem(file, &image.display().to_string()).unwrap()
}

fn find(fs: &dyn FileSystem, path: &str) -> Node {
    let mut node = fs.root().unwrap();
    for part in path.split('/').filter(|p| !p.is_empty()) {
        node = fs
            .read_dir(&node)
            .unwrap()
            .into_iter()
            .find(|e| e.name == part)
            .unwrap_or_else(|| panic!("{part} of {path} not listed"))
            .node;
    }
    node
}

fn names(entries: &[DirEntry]) -> Vec<&str> {
    entries.iter().map(|e| e.name.as_str()).collect()
}

/// The whole content, read in `chunk`-byte pieces.
fn read_all(fs: &dyn FileSystem, node: &Node, chunk: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = vec![0; chunk];
    loop {
        let n = fs.read(node, out.len() as u64, &mut buf).unwrap();
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&buf[..n]);
    }
}

#[test]
fn the_volume_is_recognised_by_its_boot_sector_and_its_label_read() {
    let f = fixture();
    let file = std::fs::File::open(&f.image).unwrap();
    assert!(ntfs::probe(&file).unwrap());
    let fs = open(&f.image);
    assert_eq!(fs.kind(), FsKind::Ntfs);
    assert_eq!(fs.label().as_deref(), Some("Restore Test"));
    let root = fs.root().unwrap();
    assert_eq!(
        (root.id, root.kind, root.mode),
        (5, NodeKind::Directory, 0o755)
    );
}

#[test]
fn the_root_lists_user_files_without_metafiles_dot_or_short_names() {
    let fs = open(&fixture().image);
    let root = fs.read_dir(&fs.root().unwrap()).unwrap();
    let mut listed = names(&root);
    listed.sort_unstable();
    assert_eq!(
        listed,
        [
            "Long File Name.txt",
            "big.bin",
            "docs",
            "empty.txt",
            "grow.bin",
            "hello.txt",
            "junction",
            "link",
            "old.txt",
            "q1-link.txt",
            "readonly.txt",
            "zeros.bin",
        ]
    );
}

#[test]
fn file_contents_read_back_byte_equal_whatever_the_chunk_size() {
    let f = fixture();
    let fs = open(&f.image);
    let empty = find(&*fs, "empty.txt");
    assert_eq!((empty.kind, empty.size), (NodeKind::File, 0));
    assert_eq!(fs.read(&empty, 0, &mut [0; 16]).unwrap(), 0);
    for (path, content) in [
        ("hello.txt", &f.small),
        ("big.bin", &f.big),
        ("zeros.bin", &f.zeros),
        ("grow.bin", &f.sparse),
        ("docs/reports/2024/q1.txt", &f.nested),
    ] {
        let node = find(&*fs, path);
        assert_eq!(node.kind, NodeKind::File, "{path}");
        assert_eq!(node.size, content.len() as u64, "{path}");
        for chunk in [4096, 100_003, 1 << 20] {
            assert!(
                read_all(&*fs, &node, chunk) == **content,
                "{path} in {chunk}-byte reads"
            );
        }
    }
    // A read from the middle of a run, across the sparse tail's start, and past the end.
    let grow = find(&*fs, "grow.bin");
    let mut buf = vec![0xAA; 1000];
    assert_eq!(fs.read(&grow, (64 << 10) - 500, &mut buf).unwrap(), 1000);
    assert_eq!(buf[..], f.sparse[(64 << 10) - 500..(64 << 10) + 500]);
    assert_eq!(fs.read(&grow, grow.size - 10, &mut buf).unwrap(), 10);
    assert_eq!(fs.read(&grow, grow.size, &mut buf).unwrap(), 0);
}

#[test]
fn a_directory_of_150_names_lists_every_one_in_index_order() {
    let fs = open(&fixture().image);
    let docs = fs.read_dir(&find(&*fs, "docs")).unwrap();
    let mut expected: Vec<String> = (0..150).map(|i| format!("file-{i:03}.txt")).collect();
    expected.extend(["latest".into(), "reports".into()]);
    assert_eq!(names(&docs), expected);
    assert!(docs[..150].iter().all(|e| e.node.kind == NodeKind::File));
    assert_eq!(docs[151].node.kind, NodeKind::Directory);
    // 150 names do not fit the index root: the directory has an index allocation.
    assert!(find(&*fs, "docs").size > 0);
}

#[test]
fn times_modes_and_links_come_from_the_mft_record() {
    let f = fixture();
    let fs = open(&f.image);
    let hello = find(&*fs, "hello.txt");
    assert!(
        (f.copied_from..=f.copied_until).contains(&hello.mtime.secs),
        "mtime {:?} outside the copy's {}..={}",
        hello.mtime,
        f.copied_from,
        f.copied_until
    );
    assert_eq!(
        (hello.mode, hello.uid, hello.gid, hello.links),
        (0o644, 0, 0, 1)
    );
    let old = find(&*fs, "old.txt");
    assert_eq!(
        old.mtime,
        Timestamp {
            secs: OLD_MTIME,
            nanos: 0
        }
    );
    assert_eq!(
        old.atime,
        Timestamp {
            secs: OLD_MTIME + 1,
            nanos: 0
        }
    );
    assert_eq!(find(&*fs, "readonly.txt").mode, 0o444);
    assert_eq!(find(&*fs, "docs").mode, 0o755);
    // A long name with its 8.3 name beside it is one name.
    assert_eq!(find(&*fs, "Long File Name.txt").links, 1);
    let linked = find(&*fs, "q1-link.txt");
    let nested = find(&*fs, "docs/reports/2024/q1.txt");
    assert_eq!(linked, nested);
    assert_eq!(linked.links, 2);
    assert_eq!(read_all(&*fs, &linked, 4096), f.nested);
}

#[test]
fn symlinks_and_junctions_read_as_their_targets_with_slashes() {
    let fs = open(&fixture().image);
    let link = find(&*fs, "link");
    assert_eq!(link.kind, NodeKind::Symlink);
    assert_eq!(fs.read_link(&link).unwrap(), b"docs/file-001.txt");
    assert_eq!(link.size, "docs/file-001.txt".len() as u64);
    let junction = find(&*fs, "junction");
    assert_eq!(junction.kind, NodeKind::Symlink);
    assert_eq!(fs.read_link(&junction).unwrap(), b"C:/Users/Public");
    assert!(matches!(
        fs.read(&link, 0, &mut [0; 8]),
        Err(Error::Unsupported { .. })
    ));
    let hello = find(&*fs, "hello.txt");
    assert!(matches!(
        fs.read_link(&hello),
        Err(Error::Unsupported { .. })
    ));
    assert!(matches!(fs.read_dir(&hello), Err(Error::NotADirectory(_))));
}

#[test]
fn a_compressed_stream_is_refused_naming_the_file() {
    let f = fixture();
    let fs = open(&f.image);
    let big = find(&*fs, "big.bin");
    drop(fs);
    // ntfs-3g compresses only when mounted with `compression`: flag the stream by hand.
    let copy = f.image.with_file_name("compressed.img");
    std::fs::copy(&f.image, &copy).unwrap();
    patch_data_attribute_flags(&copy, big.id, 0x0001);
    let fs = open(&copy);
    let err = fs.read(&big, 0, &mut [0; 512]).unwrap_err();
    assert!(
        matches!(&err, Error::Unsupported { what, .. } if what.contains("big.bin") && what.contains("compressed")),
        "{err}"
    );
    assert_eq!(read_all(&*fs, &find(&*fs, "hello.txt"), 64), f.small);
    std::fs::remove_file(copy).unwrap();
}

#[test]
fn a_damaged_volume_gives_errors_never_a_panic_or_a_hang() {
    let f = fixture();
    let mut bytes = std::fs::read(&f.image).unwrap();
    let mft = mft_offset(&bytes);
    let docs_index = index_record_of_docs(&bytes);
    let mut seed = 0x2545_F491_4F6C_DD1Du64;
    let mut random = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut walked = 0;
    for _ in 0..60 {
        // A few bytes of the MFT's first 300 records (every file of the fixture is there) and
        // of the big directory's index, changed, walked, and put back.
        let mut changed = Vec::new();
        for _ in 0..1 + random() % 8 {
            let r = random();
            let at = if r % 4 == 0 {
                docs_index + (r >> 8) as usize % 4096
            } else {
                mft + (r >> 8) as usize % (300 * 1024)
            };
            changed.push((at, bytes[at]));
            bytes[at] = (r >> 40) as u8;
        }
        let volume = Arc::new(Memory(bytes));
        if let Ok(fs) = open_filesystem(volume.clone(), "damaged") {
            let mut budget = 1000;
            walk(&*fs, fs.root().ok(), &mut budget);
            walked += 1000 - budget;
        }
        bytes = Arc::try_unwrap(volume).ok().unwrap().0;
        for (at, old) in changed.into_iter().rev() {
            bytes[at] = old;
        }
    }
    // Most damage leaves most of the tree readable.
    assert!(walked > 60 * 100, "walked {walked} nodes in 60 rounds");
    // A volume cut short: the boot sector is whole, the MFT is not there.
    bytes.truncate(mft);
    assert!(open_filesystem(Arc::new(Memory(bytes)), "truncated").is_err());
}

#[test]
fn an_index_subnode_that_refers_back_to_itself_is_corrupt_not_endless() {
    let f = fixture();
    let mut bytes = std::fs::read(&f.image).unwrap();
    let at = index_record_of_docs(&bytes);
    loop_index_record(&mut bytes[at..at + 4096]);
    let fs = open_filesystem(Arc::new(Memory(bytes)), "looped").unwrap();
    let err = fs.read_dir(&find(&*fs, "docs")).unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err}");
    assert_eq!(read_all(&*fs, &find(&*fs, "hello.txt"), 64), f.small);
}

#[test]
fn threads_share_one_volume() {
    let f = fixture();
    let fs: Arc<dyn FileSystem> = Arc::from(open(&f.image));
    let readers: Vec<_> = (0..4)
        .map(|i| {
            let fs = fs.clone();
            std::thread::spawn(move || {
                let path = ["big.bin", "zeros.bin"][i % 2];
                read_all(&*fs, &find(&*fs, path), 65_536 + i)
            })
        })
        .collect();
    for (i, reader) in readers.into_iter().enumerate() {
        let content = reader.join().unwrap();
        assert!(content == [&f.big, &f.zeros][i % 2][..], "reader {i}");
    }
}

/// An image in memory, for damaging without writing files.
struct Memory(Vec<u8>);

impl ReadAt for Memory {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> sendense_guestfs::Result<()> {
        let range = usize::try_from(offset)
            .ok()
            .and_then(|start| Some(start..start.checked_add(buf.len())?))
            .filter(|r| r.end <= self.0.len());
        let Some(range) = range else {
            return Err(Error::Io {
                offset,
                source: std::io::ErrorKind::UnexpectedEof.into(),
            });
        };
        buf.copy_from_slice(&self.0[range]);
        Ok(())
    }
}

/// The offset of the first index record (`INDX`, 4 KiB, cluster-aligned) of `/docs`.
fn index_record_of_docs(image: &[u8]) -> usize {
    let needle: Vec<u8> = "file-0".encode_utf16().flat_map(u16::to_le_bytes).collect();
    (0..image.len() - 4096)
        .step_by(4096)
        .find(|&at| {
            &image[at..at + 4] == b"INDX"
                && image[at..at + 4096]
                    .windows(needle.len())
                    .any(|w| w == needle)
        })
        .expect("an index record of /docs")
}

/// Gives the closing entry of a leaf index record a subnode: the record itself.
fn loop_index_record(rec: &mut [u8]) {
    let u16_at = |rec: &[u8], at: usize| u16::from_le_bytes([rec[at], rec[at + 1]]) as usize;
    let u32_at = |rec: &[u8], at: usize| u32::from_le_bytes(rec[at..at + 4].try_into().unwrap());
    let (usa, count) = (u16_at(rec, 4), u16_at(rec, 6));
    let usn = [rec[usa], rec[usa + 1]];
    // The last two bytes of each 512-byte block are on disk in the update sequence array.
    for i in 1..count {
        let end = i * 512 - 2;
        rec.copy_within(usa + 2 * i..usa + 2 * i + 2, end);
    }
    let vcn = rec[0x10..0x18].to_vec();
    let node = 0x18;
    let (in_use, allocated) = (u32_at(rec, node + 4), u32_at(rec, node + 8));
    assert!(
        in_use + 8 <= allocated && rec[node + 12] & 1 == 0,
        "a leaf with room"
    );
    let mut entry = node + u32_at(rec, node) as usize;
    while u16_at(rec, entry + 12) & 2 == 0 {
        entry += u16_at(rec, entry + 8);
    }
    let len = u16_at(rec, entry + 8);
    rec[entry + 8..entry + 10].copy_from_slice(&(len as u16 + 8).to_le_bytes());
    rec[entry + 12] |= 1;
    rec[entry + len..entry + len + 8].copy_from_slice(&vcn);
    rec[node + 4..node + 8].copy_from_slice(&(in_use + 8).to_le_bytes());
    rec[node + 12] |= 1;
    for i in 1..count {
        let end = i * 512 - 2;
        rec.copy_within(end..end + 2, usa + 2 * i);
        rec[end..end + 2].copy_from_slice(&usn);
    }
}

/// Lists and reads everything reachable, ignoring errors (a damaged volume has them).
fn walk(fs: &dyn FileSystem, node: Option<Node>, budget: &mut u32) {
    let Some(node) = node else { return };
    if *budget == 0 {
        return;
    }
    *budget -= 1;
    match node.kind {
        NodeKind::Directory => {
            for entry in fs.read_dir(&node).unwrap_or_default() {
                walk(fs, Some(entry.node), budget);
            }
        }
        NodeKind::Symlink => drop(fs.read_link(&node)),
        _ => drop(fs.read(&node, 0, &mut vec![0; 1 << 16])),
    }
}

fn mft_offset(image: &[u8]) -> usize {
    let bytes_per_sector = u16::from_le_bytes([image[11], image[12]]) as usize;
    let cluster = bytes_per_sector * image[13] as usize;
    u64::from_le_bytes(image[48..56].try_into().unwrap()) as usize * cluster
}

/// Sets flags on the unnamed $DATA attribute of an MFT record (1 KiB records, a contiguous
/// MFT: what mkntfs makes on a small volume).
fn patch_data_attribute_flags(image: &Path, record: u64, flags: u16) {
    let mut bytes = std::fs::read(image).unwrap();
    let start = mft_offset(&bytes) + record as usize * 1024;
    let rec = &mut bytes[start..start + 1024];
    assert_eq!(&rec[..4], b"FILE");
    let mut at = u16::from_le_bytes([rec[0x14], rec[0x15]]) as usize;
    loop {
        let ty = u32::from_le_bytes(rec[at..at + 4].try_into().unwrap());
        assert_ne!(ty, 0xFFFF_FFFF, "no $DATA in MFT record {record}");
        let len = u32::from_le_bytes(rec[at + 4..at + 8].try_into().unwrap()) as usize;
        if ty == 0x80 && rec[at + 9] == 0 {
            let old = u16::from_le_bytes([rec[at + 12], rec[at + 13]]);
            rec[at + 12..at + 14].copy_from_slice(&(old | flags).to_le_bytes());
            break;
        }
        at += len;
    }
    std::fs::write(image, bytes).unwrap();
}

/// The MFT record of a root file, as `ntfsls -i` lists it.
fn record_number(image: &Path, name: &str) -> u64 {
    let out = Command::new("ntfsls")
        .args(["-a", "-i"])
        .arg(image)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|line| {
            let (number, listed) = line.trim().split_once(' ')?;
            (listed.trim() == name).then(|| number.parse().ok())?
        })
        .unwrap_or_else(|| panic!("{name} not in ntfsls output"))
}

/// A `REPARSE_DATA_BUFFER` for a symlink (with its flags) or a junction.
fn link_value(tag: u32, substitute: &str, print: &str, flags: u32) -> Vec<u8> {
    let utf16 = |s: &str| -> Vec<u8> { s.encode_utf16().flat_map(u16::to_le_bytes).collect() };
    let (sub, prn) = (utf16(substitute), utf16(print));
    let mut data = Vec::new();
    for field in [0, sub.len(), sub.len(), prn.len()] {
        data.extend_from_slice(&(field as u16).to_le_bytes());
    }
    if tag == 0xA000_000C {
        data.extend_from_slice(&flags.to_le_bytes());
    }
    data.extend_from_slice(&sub);
    data.extend_from_slice(&prn);
    let mut value = tag.to_le_bytes().to_vec();
    value.extend_from_slice(&(data.len() as u16).to_le_bytes());
    value.extend_from_slice(&[0, 0]);
    value.extend_from_slice(&data);
    value
}

fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (e2e/install-deps.sh installs ntfs-3g)"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// libntfs-3g, opened with `dlopen` (only the versioned library is installed, without
/// headers): the calls ntfs-3g's own tools make, on an image file, with no mount.
mod libntfs {
    use std::ffi::{CString, c_char, c_int, c_ulong, c_void};
    use std::path::Path;

    unsafe extern "C" {
        fn dlopen(file: *const c_char, mode: c_int) -> *mut c_void;
        fn dlsym(handle: *mut c_void, name: *const c_char) -> *mut c_void;
    }
    const RTLD_NOW: c_int = 2;
    const S_IFDIR: u32 = 0o040000;
    const S_IFREG: u32 = 0o100000;

    type Ptr = *mut c_void;

    pub struct Library {
        mount: unsafe extern "C" fn(*const c_char, c_ulong) -> Ptr,
        umount: unsafe extern "C" fn(Ptr, c_int) -> c_int,
        pathname_to_inode: unsafe extern "C" fn(Ptr, Ptr, *const c_char) -> Ptr,
        create: unsafe extern "C" fn(Ptr, u32, *const u16, u8, u32) -> Ptr,
        create_symlink: unsafe extern "C" fn(Ptr, u32, *const u16, u8, *const u16, c_int) -> Ptr,
        inode_close: unsafe extern "C" fn(Ptr) -> c_int,
        link: unsafe extern "C" fn(Ptr, Ptr, *const u16, u8) -> c_int,
        set_reparse: unsafe extern "C" fn(Ptr, *const u8, usize, c_int) -> c_int,
        set_times: unsafe extern "C" fn(Ptr, *const u8, usize, c_int) -> c_int,
        set_attrib: unsafe extern "C" fn(Ptr, *const u8, usize, c_int) -> c_int,
        set_dos_name: unsafe extern "C" fn(Ptr, Ptr, *const u8, usize, c_int) -> c_int,
    }

    /// A function of the library, as the pointer type `F` its declaration has.
    ///
    /// SAFETY: `F` must be the `unsafe extern "C" fn` type of the symbol `name`.
    unsafe fn sym<F: Copy>(handle: *mut c_void, name: &str) -> F {
        let c = CString::new(name).unwrap();
        let f = unsafe { dlsym(handle, c.as_ptr()) };
        assert!(!f.is_null(), "{name} not in libntfs-3g");
        assert_eq!(std::mem::size_of::<F>(), std::mem::size_of::<*mut c_void>());
        unsafe { std::mem::transmute_copy::<*mut c_void, F>(&f) }
    }

    impl Library {
        pub fn load() -> Self {
            let name = CString::new("libntfs-3g.so.89").unwrap();
            // SAFETY: dlopen/dlsym with NUL-terminated names; each symbol is cast to the
            // signature of its declaration in ntfs-3g 2022.10.3's headers.
            unsafe {
                let handle = dlopen(name.as_ptr(), RTLD_NOW);
                assert!(
                    !handle.is_null(),
                    "libntfs-3g.so.89 not found (e2e/install-deps.sh installs ntfs-3g)"
                );
                Self {
                    mount: sym(handle, "ntfs_mount"),
                    umount: sym(handle, "ntfs_umount"),
                    pathname_to_inode: sym(handle, "ntfs_pathname_to_inode"),
                    create: sym(handle, "ntfs_create"),
                    create_symlink: sym(handle, "ntfs_create_symlink"),
                    inode_close: sym(handle, "ntfs_inode_close"),
                    link: sym(handle, "ntfs_link"),
                    set_reparse: sym(handle, "ntfs_set_ntfs_reparse_data"),
                    set_times: sym(handle, "ntfs_inode_set_times"),
                    set_attrib: sym(handle, "ntfs_set_ntfs_attrib"),
                    set_dos_name: sym(handle, "ntfs_set_ntfs_dos_name"),
                }
            }
        }

        pub fn mount(&self, image: &Path) -> Volume<'_> {
            let path = CString::new(image.to_str().unwrap()).unwrap();
            // SAFETY: a valid path; flags 0 is a read-write mount of the image file.
            let vol = unsafe { (self.mount)(path.as_ptr(), 0) };
            assert!(!vol.is_null(), "ntfs_mount {}", image.display());
            Volume { lib: self, vol }
        }
    }

    pub struct Volume<'l> {
        lib: &'l Library,
        vol: Ptr,
    }

    fn utf16(name: &str) -> Vec<u16> {
        name.encode_utf16().collect()
    }

    fn split(path: &str) -> (&str, &str) {
        let (dir, name) = path.rsplit_once('/').unwrap();
        (if dir.is_empty() { "/" } else { dir }, name)
    }

    // SAFETY (all methods): inodes come from ntfs_pathname_to_inode or ntfs_create on this
    // volume and are closed once, except where the callee closes them (ntfs_set_ntfs_dos_name).
    impl Volume<'_> {
        fn inode(&self, path: &str) -> Ptr {
            let c = CString::new(path).unwrap();
            let ni =
                unsafe { (self.lib.pathname_to_inode)(self.vol, std::ptr::null_mut(), c.as_ptr()) };
            assert!(!ni.is_null(), "no {path} on the volume");
            ni
        }

        fn close(&self, ni: Ptr) {
            assert_eq!(unsafe { (self.lib.inode_close)(ni) }, 0);
        }

        fn make(&self, path: &str, mode: u32) {
            let (dir, name) = split(path);
            let dir_ni = self.inode(dir);
            let name = utf16(name);
            let ni = unsafe { (self.lib.create)(dir_ni, 0, name.as_ptr(), name.len() as u8, mode) };
            assert!(!ni.is_null(), "ntfs_create {path}");
            self.close(ni);
            self.close(dir_ni);
        }

        pub fn mkdir(&self, path: &str) {
            self.make(path, S_IFDIR);
        }

        pub fn create(&self, path: &str) {
            self.make(path, S_IFREG);
        }

        /// A symlink as ntfs-3g makes one (Interix form: a SYSTEM file's data).
        pub fn symlink(&self, path: &str, target: &str) {
            let (dir, name) = split(path);
            let dir_ni = self.inode(dir);
            let (name, target) = (utf16(name), utf16(target));
            let ni = unsafe {
                (self.lib.create_symlink)(
                    dir_ni,
                    0,
                    name.as_ptr(),
                    name.len() as u8,
                    target.as_ptr(),
                    target.len() as c_int,
                )
            };
            assert!(!ni.is_null(), "ntfs_create_symlink {path}");
            self.close(ni);
            self.close(dir_ni);
        }

        pub fn link(&self, target: &str, dir: &str, name: &str) {
            let (ni, dir_ni, name) = (self.inode(target), self.inode(dir), utf16(name));
            let rc = unsafe { (self.lib.link)(ni, dir_ni, name.as_ptr(), name.len() as u8) };
            assert_eq!(rc, 0, "ntfs_link {target}");
            self.close(ni);
            self.close(dir_ni);
        }

        fn set(&self, path: &str, what: &str, value: &[u8]) {
            let ni = self.inode(path);
            let f = match what {
                "reparse" => self.lib.set_reparse,
                "times" => self.lib.set_times,
                _ => self.lib.set_attrib,
            };
            assert_eq!(
                unsafe { f(ni, value.as_ptr(), value.len(), 0) },
                0,
                "{what} of {path}"
            );
            self.close(ni);
        }

        pub fn set_reparse(&self, path: &str, value: &[u8]) {
            self.set(path, "reparse", value);
        }

        /// Creation and modification time `mtime`, access time `atime` (NT time).
        pub fn set_times(&self, path: &str, mtime: u64, atime: u64) {
            let value: Vec<u8> = [mtime, mtime, atime]
                .iter()
                .flat_map(|t| t.to_le_bytes())
                .collect();
            self.set(path, "times", &value);
        }

        pub fn set_attributes(&self, path: &str, attributes: u32) {
            self.set(path, "attributes", &attributes.to_le_bytes());
        }

        pub fn set_dos_name(&self, path: &str, dir: &str, dos: &str) {
            let (ni, dir_ni) = (self.inode(path), self.inode(dir));
            // Closes both inodes itself.
            let rc = unsafe { (self.lib.set_dos_name)(ni, dir_ni, dos.as_ptr(), dos.len(), 0) };
            assert_eq!(rc, 0, "ntfs_set_ntfs_dos_name {path}");
        }

        pub fn unmount(self) {
            assert_eq!(unsafe { (self.lib.umount)(self.vol, 0) }, 0);
        }
    }
}
