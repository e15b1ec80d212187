//! NTFS, read in user space through the `ntfs` crate (Colin Finck's), which parses the MFT,
//! attributes, data runs and directory B-trees; this module maps its files to [`Node`]s.
//!
//! What a listing shows: the names of a directory's `$I30` index, in index order, without `.`,
//! without the 8.3 short names Windows adds beside long ones, and, in the root, without the
//! metafiles (`$MFT`, `$Bitmap`, ..., `$Extend`: records below 16 whose names start with `$`).
//! User files named `$...` (`$Recycle.Bin`) are listed. Names with unpaired UTF-16 surrogates
//! are shown with U+FFFD in their place.
//!
//! What is read: the unnamed `$DATA` stream, resident or not, holes as zeros. Compressed and
//! encrypted streams, and files whose data a reparse point keeps elsewhere (deduplication,
//! WOF, cloud placeholders), are refused with [`Error::Unsupported`] naming the file; alternate
//! data streams are not offered. Symbolic links and junctions are [`NodeKind::Symlink`], their
//! target the reparse point's print name with `/` separators; so are the Interix symlinks
//! ntfs-3g writes by default (Interix devices are [`NodeKind::Other`]).
//!
//! The crate follows on-disk references without loop detection and allocates index records of
//! the size the index root states: every step runs on a read budget ([`reader`]), index
//! records are size-checked before the crate sees them, and a panic in the crate on a damaged
//! structure becomes [`Error::Corrupt`].

mod reader;
mod reparse;

use std::any::Any;
use std::collections::HashSet;
use std::io::{self, SeekFrom};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex};

use ::ntfs::structured_values::{
    NtfsFileAttributeFlags, NtfsFileName, NtfsFileNamespace, NtfsIndexRoot, NtfsStandardInformation,
};
use ::ntfs::{
    NtfsAttribute, NtfsAttributeFlags, NtfsAttributeType, NtfsError, NtfsFile, NtfsFileFlags,
    NtfsReadSeek,
};

use self::reader::{READS_PER_STEP, ReadBudgetExhausted, VolumeReader};
use self::reparse::Interix;
use crate::{DirEntry, Error, FileSystem, FsKind, Node, NodeKind, ReadAt, Result, Timestamp};

const FS: &str = "ntfs";
const ROOT_RECORD: u64 = 5;
/// Records 0 to 15 are the metafiles; the first user file is record 16 (24 on Windows).
const FIRST_USER_RECORD: u64 = 16;
/// More names than any real directory holds; beyond it the index is taken to be looping.
const MAX_DIR_ENTRIES: usize = 1 << 22;
/// More attributes than a record (with its attribute list) holds in practice.
const MAX_ATTRIBUTES: usize = 4096;
/// Index records are 4 KiB on every NTFS seen; the crate allocates whatever the root states.
const INDEX_RECORD_SIZES: std::ops::RangeInclusive<u32> = 512..=64 * 1024;

/// Whether the volume holds NTFS: the OEM id of its boot sector.
pub fn probe(volume: &dyn ReadAt) -> Result<bool> {
    if volume.size() < 512 {
        return Ok(false);
    }
    let mut oem = [0u8; 8];
    volume.read_exact_at(3, &mut oem)?;
    Ok(&oem == b"NTFS    ")
}

/// An NTFS volume. The `ntfs` crate reads through `&mut` a reader, so the reader (a position
/// and a read budget) sits behind a mutex: calls from several threads take turns.
pub struct Ntfs {
    layout: ::ntfs::Ntfs,
    reader: Mutex<VolumeReader>,
    label: Option<String>,
}

impl Ntfs {
    pub fn open(volume: Arc<dyn ReadAt>) -> Result<Self> {
        let mut reader = VolumeReader::new(volume);
        let layout = ::ntfs::Ntfs::new(&mut reader).map_err(|e| from_ntfs("boot sector", e))?;
        let mut fs = Self {
            layout,
            reader: Mutex::new(reader),
            label: None,
        };
        let root = fs.root()?;
        if root.kind != NodeKind::Directory {
            return Err(corrupt(format!(
                "the root (MFT record {ROOT_RECORD}) is not a directory"
            )));
        }
        // A damaged $Volume costs the label, not the files.
        fs.label = fs
            .run(|layout, reader| match layout.volume_name(reader) {
                Some(Ok(name)) => Ok(Some(name.name().to_string_lossy())),
                Some(Err(_)) | None => Ok(None),
            })?
            .filter(|label| !label.is_empty());
        Ok(fs)
    }

    /// Runs one operation with the reader, a fresh read budget, and a panic in the crate
    /// turned into an error (the guard is dropped normally, so the mutex is not poisoned).
    fn run<R>(&self, op: impl FnOnce(&::ntfs::Ntfs, &mut VolumeReader) -> Result<R>) -> Result<R> {
        let mut reader = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        reader.refill();
        catch_unwind(AssertUnwindSafe(|| op(&self.layout, &mut reader))).unwrap_or_else(|panic| {
            Err(corrupt(format!(
                "the ntfs reader gave up on a damaged structure: {}",
                panic_message(&*panic)
            )))
        })
    }
}

impl FileSystem for Ntfs {
    fn kind(&self) -> FsKind {
        FsKind::Ntfs
    }

    fn label(&self) -> Option<String> {
        self.label.clone()
    }

    fn root(&self) -> Result<Node> {
        self.run(|layout, reader| {
            let file = load(layout, reader, ROOT_RECORD)?;
            Ok(describe(&file, reader)?.node(ROOT_RECORD))
        })
    }

    fn read_dir(&self, dir: &Node) -> Result<Vec<DirEntry>> {
        self.run(|layout, reader| {
            let file = load(layout, reader, dir.id)?;
            if !file.is_directory() {
                return Err(Error::NotADirectory(format!("MFT record {}", dir.id)));
            }
            let described = describe(&file, reader)?;
            let record_size = described.index_record_size;
            if record_size
                .is_some_and(|size| !size.is_power_of_two() || !INDEX_RECORD_SIZES.contains(&size))
            {
                return Err(corrupt(format!(
                    "MFT record {}: index record size {record_size:?} is not a power of two \
                     in {INDEX_RECORD_SIZES:?}",
                    dir.id
                )));
            }
            let listed = index_names(
                &file,
                reader,
                dir.id,
                described.index_allocation_len,
                record_size.unwrap_or(4096),
            )?;
            let long_named: HashSet<u64> = listed
                .iter()
                .filter(|l| l.namespace != NtfsFileNamespace::Dos)
                .map(|l| l.record)
                .collect();
            let mut entries = Vec::with_capacity(listed.len());
            for l in listed {
                let short_beside_long =
                    l.namespace == NtfsFileNamespace::Dos && long_named.contains(&l.record);
                let metafile = dir.id == ROOT_RECORD
                    && l.record < FIRST_USER_RECORD
                    && l.name.starts_with('$');
                if l.name == "." || short_beside_long || metafile {
                    continue;
                }
                reader.refill();
                let file = load(layout, reader, l.record)?;
                if l.sequence != 0 && l.sequence != file.sequence_number() {
                    return Err(corrupt(format!(
                        "{:?} in MFT record {} refers to MFT record {} sequence {}, \
                         which is at sequence {} (a stale entry)",
                        l.name,
                        dir.id,
                        l.record,
                        l.sequence,
                        file.sequence_number()
                    )));
                }
                let node = describe(&file, reader)?.node(l.record);
                entries.push(DirEntry { name: l.name, node });
            }
            Ok(entries)
        })
    }

    fn read(&self, node: &Node, offset: u64, buf: &mut [u8]) -> Result<usize> {
        self.run(|layout, reader| {
            let file = load(layout, reader, node.id)?;
            let described = describe(&file, reader)?;
            let why = match described.node(node.id).kind {
                NodeKind::File => None,
                NodeKind::Directory => Some("a directory has no file data".to_owned()),
                NodeKind::Symlink => Some("a symbolic link has no file data".to_owned()),
                NodeKind::Other => {
                    Some(match described.reparse.as_deref().and_then(reparse::tag) {
                        Some(tag) => format!(
                            "a reparse point (tag {tag:#010x}): its data is not in the file's $DATA"
                        ),
                        None => "a device (Interix form) has no file data".to_owned(),
                    })
                }
            };
            if let Some(why) = why {
                return Err(unsupported(&file, reader, &why));
            }
            let Some(item) = file.data(reader, "") else {
                return Ok(0);
            };
            let item = item.map_err(|e| from_ntfs(&record_name(node.id), e))?;
            let attribute = item
                .to_attribute()
                .map_err(|e| from_ntfs(&record_name(node.id), e))?;
            if attribute.flags().contains(NtfsAttributeFlags::COMPRESSED) {
                return Err(unsupported(&file, reader, "NTFS-compressed data"));
            }
            if attribute.flags().contains(NtfsAttributeFlags::ENCRYPTED) {
                return Err(unsupported(&file, reader, "EFS-encrypted data"));
            }
            let context = || format!("{} $DATA", record_name(node.id));
            let mut value = attribute
                .value(reader)
                .map_err(|e| from_ntfs(&context(), e))?;
            let len = value.len();
            if offset >= len || buf.is_empty() {
                return Ok(0);
            }
            let want = usize::try_from(len - offset).map_or(buf.len(), |left| left.min(buf.len()));
            value
                .seek(reader, SeekFrom::Start(offset))
                .map_err(|e| from_ntfs(&context(), e))?;
            let mut done = 0;
            while done < want {
                reader.refill();
                let n = value
                    .read(reader, &mut buf[done..want])
                    .map_err(|e| from_ntfs(&context(), e))?;
                if n == 0 {
                    return Err(corrupt(format!(
                        "{}: data runs end at {} bytes of {len}",
                        context(),
                        offset + done as u64
                    )));
                }
                done += n;
            }
            Ok(done)
        })
    }

    fn read_link(&self, link: &Node) -> Result<Vec<u8>> {
        self.run(|layout, reader| {
            let file = load(layout, reader, link.id)?;
            match describe(&file, reader)?.link_target() {
                Some(target) => target,
                None => Err(Error::Unsupported {
                    fs: FS,
                    what: format!(
                        "{} is not a symbolic link or junction",
                        display_name(&file, reader)
                    ),
                }),
            }
        })
    }
}

/// Loads a file record that is in use.
fn load<'n>(
    layout: &'n ::ntfs::Ntfs,
    reader: &mut VolumeReader,
    record: u64,
) -> Result<NtfsFile<'n>> {
    let file = layout
        .file(reader, record)
        .map_err(|e| from_ntfs(&record_name(record), e))?;
    if !file.flags().contains(NtfsFileFlags::IN_USE) {
        return Err(corrupt(format!(
            "{} is not in use (a deleted file)",
            record_name(record)
        )));
    }
    Ok(file)
}

/// What a file record says about a node, gathered in one pass over its attributes.
#[derive(Default)]
struct Described {
    is_directory: bool,
    attributes: Option<NtfsFileAttributeFlags>,
    mtime: Timestamp,
    atime: Timestamp,
    /// `$FILE_NAME`s other than 8.3 short names: the node's hard links.
    names: u32,
    hard_link_count: u16,
    data_len: u64,
    index_allocation_len: u64,
    index_record_size: Option<u32>,
    /// The `$REPARSE_POINT` value, at most [`reparse::MAX_VALUE_LEN`] bytes.
    reparse: Option<Vec<u8>>,
    /// A link or device as ntfs-3g writes them by default (in a SYSTEM file's data).
    interix: Option<Interix>,
}

fn describe(file: &NtfsFile<'_>, reader: &mut VolumeReader) -> Result<Described> {
    let record = file.file_record_number();
    let context = |e: NtfsError| from_ntfs(&record_name(record), e);
    let mut d = Described {
        is_directory: file.is_directory(),
        hard_link_count: file.hard_link_count(),
        ..Described::default()
    };
    let mut seen_data = false;
    let mut attributes = file.attributes();
    let mut count = 0;
    while let Some(item) = attributes.next(reader) {
        reader.refill();
        count += 1;
        if count > MAX_ATTRIBUTES {
            return Err(corrupt(format!(
                "{} has more than {MAX_ATTRIBUTES} attributes",
                record_name(record)
            )));
        }
        let item = item.map_err(context)?;
        let attribute = item.to_attribute().map_err(context)?;
        // Types the crate does not know ($EA, $LOGGED_UTILITY_STREAM, ...) say nothing we use.
        let Ok(ty) = attribute.ty() else { continue };
        let name = attribute.name().map_err(context)?;
        match ty {
            NtfsAttributeType::StandardInformation if d.attributes.is_none() => {
                let info = attribute
                    .resident_structured_value::<NtfsStandardInformation>()
                    .map_err(context)?;
                d.attributes = Some(info.file_attributes());
                d.mtime = unix_time(info.modification_time().nt_timestamp());
                d.atime = unix_time(info.access_time().nt_timestamp());
            }
            NtfsAttributeType::FileName => {
                let file_name = attribute
                    .structured_value::<_, NtfsFileName>(reader)
                    .map_err(context)?;
                if file_name.namespace() != NtfsFileNamespace::Dos {
                    d.names += 1;
                }
            }
            NtfsAttributeType::Data if name.is_empty() && !seen_data => {
                seen_data = true;
                d.data_len = attribute.value_length();
                let system = d
                    .attributes
                    .is_some_and(|a| a.contains(NtfsFileAttributeFlags::SYSTEM));
                let plain = !attribute
                    .flags()
                    .intersects(NtfsAttributeFlags::COMPRESSED | NtfsAttributeFlags::ENCRYPTED);
                if system && plain && !d.is_directory && d.data_len <= reparse::INTERIX_MAX_LEN {
                    let data = read_whole(&attribute, reader, context)?;
                    d.interix = reparse::interix(&data);
                }
            }
            NtfsAttributeType::IndexRoot if name == "$I30" => {
                let root = attribute
                    .resident_structured_value::<NtfsIndexRoot>()
                    .map_err(context)?;
                d.index_record_size = Some(root.index_record_size());
            }
            NtfsAttributeType::IndexAllocation if name == "$I30" => {
                d.index_allocation_len = attribute.value_length();
            }
            NtfsAttributeType::ReparsePoint if d.reparse.is_none() => {
                let len = attribute.value_length();
                if len > reparse::MAX_VALUE_LEN {
                    return Err(corrupt(format!(
                        "{}: reparse point of {len} bytes (at most {} exist)",
                        record_name(record),
                        reparse::MAX_VALUE_LEN
                    )));
                }
                let bytes = read_whole(&attribute, reader, context)?;
                d.reparse = Some(bytes);
            }
            _ => {}
        }
    }
    Ok(d)
}

/// A small attribute value, whole (its length was checked by the caller).
fn read_whole(
    attribute: &NtfsAttribute<'_, '_>,
    reader: &mut VolumeReader,
    context: impl Fn(NtfsError) -> Error,
) -> Result<Vec<u8>> {
    let mut value = attribute.value(reader).map_err(&context)?;
    let mut bytes = vec![0; attribute.value_length() as usize];
    let mut done = 0;
    while done < bytes.len() {
        reader.refill();
        match value.read(reader, &mut bytes[done..]).map_err(&context)? {
            0 => break,
            n => done += n,
        }
    }
    bytes.truncate(done);
    Ok(bytes)
}

impl Described {
    /// The target, if the node is a link: a symlink or junction reparse point (an error if
    /// it cannot be decoded), or an Interix symlink.
    fn link_target(&self) -> Option<Result<Vec<u8>>> {
        if let Some(value) = &self.reparse {
            return reparse::tag(value)
                .filter(|&tag| reparse::is_link(tag))
                .map(|_| reparse::link_target(value));
        }
        match &self.interix {
            Some(Interix::Symlink(target)) => Some(Ok(target.clone())),
            _ => None,
        }
    }

    fn node(&self, record: u64) -> Node {
        let read_only = self
            .attributes
            .is_some_and(|a| a.contains(NtfsFileAttributeFlags::READ_ONLY));
        // An undecodable link, a device, or a file whose data a reparse point keeps elsewhere
        // is listed but never extracted; a directory with another reparse tag keeps its index.
        let (kind, size, mode) = match self.link_target() {
            Some(Ok(target)) => (NodeKind::Symlink, target.len() as u64, 0o777),
            Some(Err(_)) => (NodeKind::Other, 0, 0o644),
            None if self.is_directory => (NodeKind::Directory, self.index_allocation_len, 0o755),
            None if self.reparse.is_some() || self.interix.is_some() => {
                (NodeKind::Other, self.data_len, 0o644)
            }
            None => (NodeKind::File, self.data_len, 0o644),
        };
        let mode = if read_only && kind != NodeKind::Directory && kind != NodeKind::Symlink {
            0o444
        } else {
            mode
        };
        Node {
            id: record,
            kind,
            size,
            mode,
            uid: 0,
            gid: 0,
            mtime: self.mtime,
            atime: self.atime,
            links: if self.names > 0 {
                self.names
            } else {
                u32::from(self.hard_link_count.max(1))
            },
        }
    }
}

/// One name of a directory's index.
struct Listed {
    name: String,
    namespace: NtfsFileNamespace,
    record: u64,
    sequence: u16,
}

/// The names of a directory's index (`allocation_len` bytes of `record_size`-byte index
/// records beside the root). The crate walks the
/// B-tree without noticing a subnode that refers back up, and keeps yielding the same names
/// while it descends: the walk may read each record a few times (a record can straddle data
/// runs) and yield as many names as fit in them, no more.
fn index_names(
    dir: &NtfsFile<'_>,
    reader: &mut VolumeReader,
    record: u64,
    allocation_len: u64,
    record_size: u32,
) -> Result<Vec<Listed>> {
    let context = |e: NtfsError| from_ntfs(&format!("{} index", record_name(record)), e);
    let index = dir.directory_index(reader).map_err(context)?;
    let mut entries = index.entries();
    let mut listed = Vec::new();
    let records = allocation_len / u64::from(record_size);
    let reads = records
        .saturating_mul(4)
        .saturating_add(READS_PER_STEP.into());
    reader.allow(u32::try_from(reads).unwrap_or(u32::MAX));
    // A name takes at least 82 bytes of an index record; the root holds a few dozen.
    let most = usize::try_from(allocation_len / 82 + 1024)
        .unwrap_or(usize::MAX)
        .min(MAX_DIR_ENTRIES);
    while let Some(entry) = entries.next(reader) {
        let entry = entry.map_err(context)?;
        let Some(key) = entry.key() else { continue };
        let key = key.map_err(context)?;
        let reference = entry.file_reference();
        listed.push(Listed {
            name: key.name().to_string_lossy(),
            namespace: key.namespace(),
            record: reference.file_record_number(),
            sequence: reference.sequence_number(),
        });
        if listed.len() > most {
            return Err(corrupt(format!(
                "{} index yields more than the {most} names its {allocation_len} bytes can hold \
                 (a subnode loop)",
                record_name(record)
            )));
        }
    }
    Ok(listed)
}

/// The node's first long name, for messages (restore tools show paths; this names the file).
fn display_name(file: &NtfsFile<'_>, reader: &mut VolumeReader) -> String {
    let record = file.file_record_number();
    let long = [
        NtfsFileNamespace::Win32,
        NtfsFileNamespace::Win32AndDos,
        NtfsFileNamespace::Posix,
    ]
    .into_iter()
    .find_map(|namespace| file.name(reader, Some(namespace), None)?.ok());
    match long {
        Some(name) => format!(
            "{:?} ({})",
            name.name().to_string_lossy(),
            record_name(record)
        ),
        None => record_name(record),
    }
}

fn unsupported(file: &NtfsFile<'_>, reader: &mut VolumeReader, why: &str) -> Error {
    Error::Unsupported {
        fs: FS,
        what: format!("{}: {why}", display_name(file, reader)),
    }
}

fn record_name(record: u64) -> String {
    format!("MFT record {record}")
}

fn corrupt(what: String) -> Error {
    Error::Corrupt { fs: FS, what }
}

/// The crate's error, with what was being read. I/O errors of the image pass through as they
/// are; a structure reaching past the volume, or the read budget running out, is corruption.
fn from_ntfs(what: &str, error: NtfsError) -> Error {
    let NtfsError::Io(io) = error else {
        return corrupt(format!("{what}: {error}"));
    };
    if io.kind() == io::ErrorKind::UnexpectedEof {
        return corrupt(format!("{what}: reaches past the end of the volume"));
    }
    let message = io.to_string();
    match io.into_inner().map(|inner| inner.downcast::<Error>()) {
        Some(Ok(ours)) => *ours,
        Some(Err(inner)) if inner.is::<ReadBudgetExhausted>() => {
            corrupt(format!("{what}: {inner}"))
        }
        _ => corrupt(format!("{what}: {message}")),
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// NT time (100 ns ticks since 1601-01-01 UTC) as Unix time; times before 1970 are negative
/// seconds with nanoseconds counting forward, as [`Timestamp`] has them.
fn unix_time(nt: u64) -> Timestamp {
    const TICKS_PER_SEC: i128 = 10_000_000;
    const SECS_1601_TO_1970: i128 = 11_644_473_600;
    let ticks = i128::from(nt) - SECS_1601_TO_1970 * TICKS_PER_SEC;
    Timestamp {
        // u64 ticks are at most 1.8e12 seconds: no truncation.
        secs: ticks.div_euclid(TICKS_PER_SEC) as i64,
        nanos: (ticks.rem_euclid(TICKS_PER_SEC) * 100) as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nt_time_converts_to_unix_seconds_and_nanoseconds_on_both_sides_of_1970() {
        let epoch = 116_444_736_000_000_000u64;
        assert_eq!(unix_time(epoch), Timestamp { secs: 0, nanos: 0 });
        assert_eq!(
            unix_time(epoch + 15_000_001),
            Timestamp {
                secs: 1,
                nanos: 500_000_100
            }
        );
        assert_eq!(
            unix_time(epoch - 5_000_000),
            Timestamp {
                secs: -1,
                nanos: 500_000_000
            }
        );
        assert_eq!(
            unix_time(0),
            Timestamp {
                secs: -11_644_473_600,
                nanos: 0
            }
        );
        assert_eq!(unix_time(u64::MAX).secs, 1_833_029_933_770);
    }

    #[test]
    fn probe_wants_the_oem_id_and_refuses_small_volumes() {
        struct Bytes(Vec<u8>);
        impl ReadAt for Bytes {
            fn size(&self) -> u64 {
                self.0.len() as u64
            }
            fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
                let start = offset as usize;
                buf.copy_from_slice(&self.0[start..start + buf.len()]);
                Ok(())
            }
        }
        let mut sector = vec![0u8; 512];
        sector[3..11].copy_from_slice(b"NTFS    ");
        assert!(probe(&Bytes(sector.clone())).unwrap());
        assert!(!probe(&Bytes(sector[..100].to_vec())).unwrap());
        sector[3..11].copy_from_slice(b"MSDOS5.0");
        assert!(!probe(&Bytes(sector)).unwrap());
    }

    #[test]
    fn garbage_after_a_valid_oem_id_is_an_error_not_a_panic() {
        struct Noise;
        impl ReadAt for Noise {
            fn size(&self) -> u64 {
                1 << 20
            }
            fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
                for (i, b) in buf.iter_mut().enumerate() {
                    let x = (offset + i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                    *b = (x >> 56) as u8;
                }
                if offset <= 3 && offset + buf.len() as u64 >= 11 {
                    buf[(3 - offset) as usize..(11 - offset) as usize].copy_from_slice(b"NTFS    ");
                }
                Ok(())
            }
        }
        assert!(Ntfs::open(Arc::new(Noise)).is_err());
    }
}
