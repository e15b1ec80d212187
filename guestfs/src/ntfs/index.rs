//! A directory's names, from its `$I30` index B-tree.

use ::ntfs::structured_values::NtfsFileNamespace;
use ::ntfs::{NtfsError, NtfsFile};

use super::reader::{READS_PER_STEP, VolumeReader};
use super::{corrupt, from_ntfs, record_name};
use crate::Result;

/// More names than any real directory holds.
const MAX_DIR_ENTRIES: usize = 1 << 22;

/// One name of a directory's index.
pub(super) struct Listed {
    pub(super) name: String,
    pub(super) namespace: NtfsFileNamespace,
    pub(super) record: u64,
    pub(super) sequence: u16,
}

/// The names of a directory's index (`allocation_len` bytes of `record_size`-byte index
/// records beside the root). The crate walks the
/// B-tree without noticing a subnode that refers back up, and keeps yielding the same names
/// while it descends: the walk may read each record a few times (a record can straddle data
/// runs) and yield as many names as fit in them, no more.
pub(super) fn index_names(
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
