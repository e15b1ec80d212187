//! A QCOW2 image's header (versions 2 and 3, big-endian), its header extensions, its backing
//! file name and its active L1 table: everything read once, when the chain is opened. Every
//! size and offset is checked against the file before it is used, so a malformed or truncated
//! image is an error, never a panic or a huge allocation.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::{Format, Qcow2Error};

const MAGIC: &[u8; 4] = b"QFI\xfb";
/// The largest L1 table qemu accepts (32 MiB): a bound on what is allocated for it.
const MAX_L1_BYTES: u64 = 32 << 20;
/// Bits 9-55 of an L1 or standard L2 entry: the host offset.
pub(super) const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// Incompatible feature bits.
const DIRTY: u64 = 1 << 0;
const CORRUPT: u64 = 1 << 1;
const EXTERNAL_DATA_FILE: u64 = 1 << 2;
const COMPRESSION_TYPE: u64 = 1 << 3;
pub(super) const EXTENDED_L2: u64 = 1 << 4;

/// Header extension types.
const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FULL_DISK_ENCRYPTION: u32 = 0x0537_be77;
const EXT_EXTERNAL_DATA_FILE: u32 = 0x4441_5441;

/// What the chain reader needs of one QCOW2 image.
#[derive(Debug)]
pub(super) struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub extended_l2: bool,
    /// The active L1 table, as many entries as the virtual size needs.
    pub l1: Vec<u64>,
    /// The backing file's name as recorded and its format.
    pub backing: Option<(String, Format)>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

pub(super) fn read_exact(
    path: &Path,
    file: &File,
    buf: &mut [u8],
    offset: u64,
) -> Result<(), Qcow2Error> {
    file.read_exact_at(buf, offset)
        .map_err(|source| Qcow2Error::Io {
            file: path.to_owned(),
            offset,
            source,
        })
}

/// Parses the header of `file` (`file_size` bytes long).
pub(super) fn parse(path: &Path, file: &File, file_size: u64) -> Result<Header, Qcow2Error> {
    let malformed = |offset: u64, what: String| Qcow2Error::Malformed {
        file: path.to_owned(),
        offset,
        what,
    };
    let unsupported = |what: String| Qcow2Error::Unsupported {
        file: path.to_owned(),
        what,
    };
    if file_size < 72 {
        return Err(malformed(
            0,
            format!("{file_size} bytes is too short for a QCOW2 header"),
        ));
    }
    let mut head = [0u8; 104];
    let n = file_size.min(104) as usize;
    read_exact(path, file, &mut head[..n], 0)?;
    if &head[..4] != MAGIC {
        return Err(malformed(0, "not a QCOW2 image (bad magic)".into()));
    }
    let version = be32(&head, 4);
    if version != 2 && version != 3 {
        return Err(unsupported(format!("QCOW2 version {version}")));
    }
    let backing_offset = be64(&head, 8);
    let backing_len = be32(&head, 16);
    let cluster_bits = be32(&head, 20);
    let size = be64(&head, 24);
    let crypt = be32(&head, 32);
    let l1_size = be32(&head, 36);
    let l1_offset = be64(&head, 40);
    if !(9..=21).contains(&cluster_bits) {
        return Err(malformed(20, format!("cluster bits {cluster_bits}")));
    }
    if !size.is_multiple_of(512) {
        // qemu counts whole sectors and drops the rest: not worth matching.
        return Err(unsupported(format!(
            "a virtual size of {size} bytes (not whole sectors)"
        )));
    }
    let cluster = 1u64 << cluster_bits;
    let (incompatible, header_len) = if version == 3 {
        if n < 104 {
            return Err(malformed(0, "truncated version 3 header".into()));
        }
        (be64(&head, 72), be32(&head, 100))
    } else {
        (0, 72)
    };
    if version == 3 && (header_len < 104 || u64::from(header_len) > cluster) {
        return Err(malformed(100, format!("header length {header_len}")));
    }
    if crypt != 0 {
        return Err(unsupported(format!("encryption (method {crypt})")));
    }
    for (bit, what) in [
        (
            DIRTY,
            "the dirty bit is set (qemu would check the refcounts first)",
        ),
        (CORRUPT, "the corrupt bit is set"),
        (EXTERNAL_DATA_FILE, "an external data file"),
        (COMPRESSION_TYPE, "a compression type other than deflate"),
    ] {
        if incompatible & bit != 0 {
            return Err(unsupported(what.into()));
        }
    }
    let unknown =
        incompatible & !(DIRTY | CORRUPT | EXTERNAL_DATA_FILE | COMPRESSION_TYPE | EXTENDED_L2);
    if unknown != 0 {
        return Err(unsupported(format!(
            "unknown incompatible features {unknown:#x}"
        )));
    }
    let extended_l2 = incompatible & EXTENDED_L2 != 0;
    if extended_l2 && cluster_bits < 14 {
        return Err(malformed(
            72,
            format!("extended L2 entries with {cluster}-byte clusters"),
        ));
    }

    // Header extensions and the backing file name lie within the first cluster.
    let mut first = vec![0u8; cluster.min(file_size) as usize];
    read_exact(path, file, &mut first, 0)?;
    if header_len > 104 && first.get(104).is_some_and(|t| *t != 0) {
        return Err(unsupported(format!(
            "compression type {}",
            first.get(104).copied().unwrap_or_default()
        )));
    }
    let ext_end = if backing_offset != 0 {
        backing_offset.min(cluster)
    } else {
        cluster
    }
    .min(first.len() as u64) as usize;
    let mut backing_format = None;
    let mut at = header_len as usize;
    while at + 8 <= ext_end {
        let kind = be32(&first, at);
        let len = be32(&first, at + 4) as usize;
        if kind == EXT_END {
            break;
        }
        let end = at + 8 + len;
        if end > ext_end {
            return Err(malformed(
                at as u64,
                format!("header extension {kind:#x} of {len} bytes overflows"),
            ));
        }
        let data = &first[at + 8..end];
        match kind {
            EXT_BACKING_FORMAT => {
                backing_format = Some(String::from_utf8_lossy(data).into_owned());
            }
            EXT_FULL_DISK_ENCRYPTION => return Err(unsupported("encryption".into())),
            EXT_EXTERNAL_DATA_FILE => return Err(unsupported("an external data file".into())),
            _ => {}
        }
        at = end.next_multiple_of(8);
    }

    let backing = if backing_offset == 0 || backing_len == 0 {
        None
    } else {
        let end = backing_offset.checked_add(u64::from(backing_len));
        if backing_len > 1023 || end.is_none_or(|e| e > cluster || e > first.len() as u64) {
            return Err(malformed(
                8,
                format!("backing file name of {backing_len} bytes at {backing_offset}"),
            ));
        }
        let name =
            &first[backing_offset as usize..(backing_offset + u64::from(backing_len)) as usize];
        let name = String::from_utf8(name.to_vec())
            .map_err(|_| unsupported("a backing file name that is not UTF-8".into()))?;
        let format = match backing_format.as_deref() {
            Some("qcow2") => Format::Qcow2,
            Some("raw") => Format::Raw,
            Some(other) => {
                return Err(unsupported(format!(
                    "backing file {name} of format {other}"
                )));
            }
            None => {
                return Err(unsupported(format!(
                    "backing file {name} without a recorded format (qemu would probe it)"
                )));
            }
        };
        Some((name, format))
    };

    // The L1 table: as many entries as the virtual size needs, within the file and qemu's
    // bound, each naming a cluster-aligned L2 table inside the file.
    let l2_bits = cluster_bits - 3 - u32::from(extended_l2);
    let span = 1u64 << (cluster_bits + l2_bits);
    let needed = size.div_ceil(span);
    if needed > u64::from(l1_size) {
        return Err(malformed(
            36,
            format!("L1 table of {l1_size} entries for a {size}-byte disk"),
        ));
    }
    let l1_bytes = needed * 8;
    if l1_bytes > MAX_L1_BYTES {
        return Err(malformed(
            36,
            format!("L1 table of {needed} entries is larger than qemu allows"),
        ));
    }
    if needed > 0
        && (!l1_offset.is_multiple_of(cluster)
            || l1_offset
                .checked_add(l1_bytes)
                .is_none_or(|e| e > file_size))
    {
        return Err(malformed(
            40,
            format!("L1 table at {l1_offset} ({l1_bytes} bytes) outside the {file_size}-byte file"),
        ));
    }
    let mut raw = vec![0u8; l1_bytes as usize];
    read_exact(path, file, &mut raw, l1_offset)?;
    let l1: Vec<u64> = raw.chunks_exact(8).map(|e| be64(e, 0)).collect();
    for (i, e) in l1.iter().enumerate() {
        let l2 = e & OFFSET_MASK;
        if l2 != 0
            && (!l2.is_multiple_of(cluster)
                || l2.checked_add(cluster).is_none_or(|e| e > file_size))
        {
            return Err(malformed(
                l1_offset + 8 * i as u64,
                format!("L2 table at {l2} outside the {file_size}-byte file or unaligned"),
            ));
        }
    }
    Ok(Header {
        version,
        cluster_bits,
        size,
        extended_l2,
        l1,
        backing,
    })
}
