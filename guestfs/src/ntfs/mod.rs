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
//! the size the index root states: every step runs on a read budget (`reader`), a directory
//! walk may yield no more names than its index can hold (`index`), index records are
//! size-checked before the crate sees them, and a panic in the crate on a damaged structure
//! becomes [`Error::Corrupt`].

mod index;
mod reader;
mod record;
mod reparse;

use std::any::Any;
use std::collections::HashSet;
use std::io::{self, SeekFrom};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex};

use ::ntfs::structured_values::NtfsFileNamespace;
use ::ntfs::{NtfsAttributeFlags, NtfsError, NtfsFile, NtfsReadSeek};

use self::index::index_names;
use self::reader::{ReadBudgetExhausted, VolumeReader};
use self::record::{describe, load};
use crate::{DirEntry, Error, FileSystem, FsKind, Node, NodeKind, ReadAt, Result};

const FS: &str = "ntfs";
const ROOT_RECORD: u64 = 5;
/// Records 0 to 15 are the metafiles; the first user file is record 16 (24 on Windows).
const FIRST_USER_RECORD: u64 = 16;
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

#[cfg(test)]
mod tests {
    use super::*;

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
