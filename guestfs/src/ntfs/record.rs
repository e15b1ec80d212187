//! One MFT record as a [`Node`]: its kind, size, times, mode and names, read in one pass over
//! its attributes (through the attribute list, if it has one).

use ::ntfs::structured_values::{
    NtfsFileAttributeFlags, NtfsFileName, NtfsFileNamespace, NtfsIndexRoot, NtfsStandardInformation,
};
use ::ntfs::{
    NtfsAttribute, NtfsAttributeFlags, NtfsAttributeType, NtfsError, NtfsFile, NtfsFileFlags,
    NtfsReadSeek,
};

use super::reader::VolumeReader;
use super::reparse::{self, Interix};
use super::{corrupt, from_ntfs, record_name};
use crate::{Error, Node, NodeKind, Result, Timestamp};

/// More attributes than a record (with its attribute list) holds in practice.
const MAX_ATTRIBUTES: usize = 4096;

/// Loads a file record that is in use.
pub(super) fn load<'n>(
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
pub(super) struct Described {
    is_directory: bool,
    attributes: Option<NtfsFileAttributeFlags>,
    mtime: Timestamp,
    atime: Timestamp,
    /// `$FILE_NAME`s other than 8.3 short names: the node's hard links.
    names: u32,
    hard_link_count: u16,
    data_len: u64,
    pub(super) index_allocation_len: u64,
    pub(super) index_record_size: Option<u32>,
    /// The `$REPARSE_POINT` value, at most [`reparse::MAX_VALUE_LEN`] bytes.
    pub(super) reparse: Option<Vec<u8>>,
    /// A link or device as ntfs-3g writes them by default (in a SYSTEM file's data).
    interix: Option<Interix>,
}

pub(super) fn describe(file: &NtfsFile<'_>, reader: &mut VolumeReader) -> Result<Described> {
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
    pub(super) fn link_target(&self) -> Option<Result<Vec<u8>>> {
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

    pub(super) fn node(&self, record: u64) -> Node {
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
}
