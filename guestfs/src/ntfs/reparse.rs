//! Links stored outside plain file data: Windows symbolic links and junctions (mount points),
//! decoded from the `$REPARSE_POINT` value (`REPARSE_DATA_BUFFER`) to a target with `/`
//! separators; and ntfs-3g's default (Interix) symlinks and devices, in a SYSTEM file's data.

use crate::{Error, Result};

/// A symbolic link (`mklink`, `mklink /D`).
pub(super) const TAG_SYMLINK: u32 = 0xA000_000C;
/// A junction or volume mount point (`mklink /J`).
pub(super) const TAG_MOUNT_POINT: u32 = 0xA000_0003;
/// The largest reparse value Windows accepts (`MAXIMUM_REPARSE_DATA_BUFFER_SIZE`).
pub(super) const MAX_VALUE_LEN: u64 = 16 * 1024;

/// The reparse tag, the first field of every reparse value.
pub(super) fn tag(value: &[u8]) -> Option<u32> {
    Some(u32::from_le_bytes(value.get(..4)?.try_into().ok()?))
}

/// Whether a tag is one [`link_target`] decodes.
pub(super) fn is_link(tag: u32) -> bool {
    tag == TAG_SYMLINK || tag == TAG_MOUNT_POINT
}

/// The target of a symlink or junction: its print name (what `dir` shows), or the substitute
/// name without the NT `\??\` prefix when the print name is empty, as UTF-8 with `/` separators.
/// Relative targets stay relative; absolute ones keep their drive (`C:/Users`): they name a
/// place in the guest, not on the restoring host.
pub(super) fn link_target(value: &[u8]) -> Result<Vec<u8>> {
    let corrupt = |what: String| Error::Corrupt { fs: "ntfs", what };
    let tag = tag(value).ok_or_else(|| corrupt("reparse point shorter than its tag".into()))?;
    let data_len = usize::from(u16_at(value, 4).unwrap_or(0));
    let data = value.get(8..8 + data_len).ok_or_else(|| {
        corrupt(format!(
            "reparse point (tag {tag:#010x}) claims {data_len} bytes of data, has {}",
            value.len().saturating_sub(8)
        ))
    })?;
    // Both layouts start with the two names' offsets and lengths, relative to the path buffer,
    // which follows a 32-bit flags field in symlinks only.
    let buffer_start = match tag {
        TAG_SYMLINK => 12,
        TAG_MOUNT_POINT => 8,
        _ => {
            return Err(Error::Unsupported {
                fs: "ntfs",
                what: format!("reparse point with tag {tag:#010x} is not a link"),
            });
        }
    };
    let field = |at| u16_at(data, at).map(usize::from);
    let (Some(sub_off), Some(sub_len), Some(print_off), Some(print_len)) =
        (field(0), field(2), field(4), field(6))
    else {
        return Err(corrupt(format!(
            "link reparse point (tag {tag:#010x}) truncated"
        )));
    };
    let buffer = data.get(buffer_start..).unwrap_or_default();
    let name = |off: usize, len: usize| {
        buffer.get(off..off + len).ok_or_else(|| {
            corrupt(format!(
                "link reparse point name at {off}+{len} outside its {}-byte path buffer",
                buffer.len()
            ))
        })
    };
    let print = utf16le(name(print_off, print_len)?)?;
    let target = if print.is_empty() {
        let substitute = utf16le(name(sub_off, sub_len)?)?;
        match substitute.strip_prefix(r"\??\") {
            Some(rest) => rest.to_owned(),
            None => substitute,
        }
    } else {
        print
    };
    if target.is_empty() {
        return Err(corrupt(format!(
            "link reparse point (tag {tag:#010x}) has an empty target"
        )));
    }
    Ok(target.replace('\\', "/").into_bytes())
}

/// The largest Interix file read to recognise it: the magic and a 4096-unit target.
pub(super) const INTERIX_MAX_LEN: u64 = 8 + 2 * 4096;

/// What an Interix (Services for Unix) file stands for.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Interix {
    /// The target, UTF-16LE in the file, here UTF-8 (it has `/` separators already).
    Symlink(Vec<u8>),
    /// A character or block device (major and minor follow the magic).
    Device,
}

/// Recognises the data of a SYSTEM file as an Interix symlink or device.
pub(super) fn interix(data: &[u8]) -> Option<Interix> {
    match data.get(..8)? {
        b"IntxLNK\x01" => {
            let target = utf16le(&data[8..]).ok().filter(|t| !t.is_empty())?;
            Some(Interix::Symlink(target.into_bytes()))
        }
        b"IntxCHR\0" | b"IntxBLK\0" => Some(Interix::Device),
        _ => None,
    }
}

fn u16_at(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
}

fn utf16le(bytes: &[u8]) -> Result<String> {
    let units = bytes
        .chunks_exact(2)
        .map(|pair| u16::from_le_bytes([pair[0], pair[1]]));
    char::decode_utf16(units)
        .collect::<Result<String, _>>()
        .map_err(|e| Error::Corrupt {
            fs: "ntfs",
            what: format!("link target is not valid UTF-16: {e}"),
        })
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A `REPARSE_DATA_BUFFER` for a link, as Windows writes it (substitute name first).
    pub(crate) fn link_value(tag: u32, substitute: &str, print: &str, flags: u32) -> Vec<u8> {
        let sub: Vec<u8> = substitute
            .encode_utf16()
            .flat_map(u16::to_le_bytes)
            .collect();
        let prn: Vec<u8> = print.encode_utf16().flat_map(u16::to_le_bytes).collect();
        let mut data = Vec::new();
        for field in [0, sub.len(), sub.len(), prn.len()] {
            data.extend_from_slice(&(field as u16).to_le_bytes());
        }
        if tag == TAG_SYMLINK {
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

    #[test]
    fn a_relative_symlink_reads_as_its_print_name_with_slashes() {
        let value = link_value(TAG_SYMLINK, r"..\docs\a.txt", r"..\docs\a.txt", 1);
        assert_eq!(link_target(&value).unwrap(), b"../docs/a.txt");
    }

    #[test]
    fn a_junction_reads_as_its_print_name() {
        let value = link_value(
            TAG_MOUNT_POINT,
            r"\??\C:\Users\Public",
            r"C:\Users\Public",
            0,
        );
        assert_eq!(link_target(&value).unwrap(), b"C:/Users/Public");
    }

    #[test]
    fn an_empty_print_name_falls_back_to_the_substitute_name_without_the_nt_prefix() {
        let value = link_value(TAG_MOUNT_POINT, r"\??\D:\data", "", 0);
        assert_eq!(link_target(&value).unwrap(), b"D:/data");
    }

    #[test]
    fn interix_symlinks_and_devices_are_recognised_by_their_magic() {
        let mut link = b"IntxLNK\x01".to_vec();
        link.extend("../a b".encode_utf16().flat_map(u16::to_le_bytes));
        assert_eq!(interix(&link), Some(Interix::Symlink(b"../a b".to_vec())));
        assert_eq!(interix(b"IntxCHR\0\x01\0\0\0"), Some(Interix::Device));
        assert_eq!(interix(b"IntxLNK\x01"), None);
        assert_eq!(interix(b"MZ\x90\0 an ordinary system file"), None);
    }

    #[test]
    fn other_tags_are_unsupported_and_damaged_values_corrupt_never_a_panic() {
        let mut dedup = link_value(TAG_SYMLINK, "a", "a", 0);
        dedup[..4].copy_from_slice(&0x8000_0013u32.to_le_bytes());
        assert!(matches!(
            link_target(&dedup),
            Err(Error::Unsupported { .. })
        ));
        let whole = link_value(TAG_SYMLINK, r"x\y", r"x\y", 1);
        for len in 0..whole.len() {
            assert!(link_target(&whole[..len]).is_err(), "{len} bytes");
        }
        let mut wild = whole.clone();
        wild[8..16].fill(0xff);
        assert!(matches!(link_target(&wild), Err(Error::Corrupt { .. })));
    }
}
