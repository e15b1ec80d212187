//! Partition tables: MBR (with extended partitions) and GPT.
//!
//! Partitions are numbered as Linux numbers them, so that `sda5` in a guest's fstab is volume 5
//! here: MBR primaries 1-4 by slot, logical partitions from 5 in chain order; GPT partitions by
//! their index in the entry array plus one. A disk without a table is one volume, number 0.

use std::collections::HashSet;
use std::sync::Arc;

use crate::{Error, ReadAt, Result};

/// One volume of a disk: a partition, or the whole disk when it has no partition table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    /// 1-based partition number as Linux numbers them (`sda1`, MBR logical from 5); 0 for a
    /// whole disk without a partition table.
    pub number: u32,
    pub start: u64,
    pub size: u64,
    /// "gpt", "mbr" or "none".
    pub table: &'static str,
    /// GPT type GUID or MBR type byte, as text.
    pub type_id: String,
    /// GPT partition name, if any.
    pub name: Option<String>,
}

/// MBR sectors are 512 bytes whatever the disk's logical sector size (as Linux reads them).
const MBR_SECTOR: u64 = 512;
const GPT_SIGNATURE: &[u8; 8] = b"EFI PART";
/// Bounds on what a (possibly hostile) GPT header may ask us to read: 128 entries is the usual
/// count; Linux itself accepts any, but a table of more than 1 MiB is not a real disk's.
const GPT_MAX_ENTRIES_BYTES: u64 = 1 << 20;
/// A chain of extended boot records longer than this is a loop or garbage.
const MBR_MAX_LOGICAL: usize = 256;

/// The volumes of a disk image.
pub fn volumes(disk: &Arc<dyn ReadAt>) -> Result<Vec<Volume>> {
    let size = disk.size();
    let whole = || {
        vec![Volume {
            number: 0,
            start: 0,
            size,
            table: "none",
            type_id: String::new(),
            name: None,
        }]
    };
    if size < MBR_SECTOR {
        return Ok(whole());
    }
    let mut mbr = [0u8; 512];
    disk.read_exact_at(0, &mut mbr)?;
    let Some(entries) = mbr_entries(&mbr) else {
        return Ok(whole());
    };
    if entries.iter().any(|e| e.kind == 0xEE) {
        return gpt_volumes(&**disk);
    }
    let volumes = mbr_volumes(&**disk, &entries)?;
    if volumes.is_empty() {
        return Ok(whole());
    }
    Ok(volumes)
}

fn corrupt(what: String) -> Error {
    Error::Corrupt {
        fs: "partition table",
        what,
    }
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

#[derive(Debug, Clone, Copy)]
struct MbrEntry {
    /// Slot 0-3.
    slot: usize,
    kind: u8,
    start_lba: u64,
    sectors: u64,
}

/// The four slots of a boot record, or None when the sector is not a partition table (no
/// 0x55AA signature, a file system's boot sector, or boot flags other than 0x00/0x80).
fn mbr_entries(sector: &[u8; 512]) -> Option<Vec<MbrEntry>> {
    if sector[510..512] != [0x55, 0xAA] {
        return None;
    }
    // NTFS and FAT boot sectors end in 0x55AA too; a volume formatted without a table must
    // not be read as one.
    if &sector[3..11] == b"NTFS    " || &sector[82..87] == b"FAT32" || &sector[54..59] == b"FAT16" {
        return None;
    }
    let mut entries = Vec::new();
    for slot in 0..4 {
        let e = &sector[446 + slot * 16..446 + (slot + 1) * 16];
        if e[0] != 0 && e[0] != 0x80 {
            return None;
        }
        let (kind, start_lba, sectors) = (e[4], le32(e, 8) as u64, le32(e, 12) as u64);
        if kind != 0 && sectors != 0 {
            entries.push(MbrEntry {
                slot,
                kind,
                start_lba,
                sectors,
            });
        }
    }
    Some(entries)
}

fn is_extended(kind: u8) -> bool {
    matches!(kind, 0x05 | 0x0F | 0x85)
}

/// A volume clipped to the disk (a partition running past the end of the image is cut at
/// the end; one starting past it is left out).
fn clipped(
    disk_size: u64,
    number: u32,
    start: u64,
    len: u64,
    table: &'static str,
    type_id: String,
    name: Option<String>,
) -> Option<Volume> {
    if start >= disk_size || len == 0 {
        return None;
    }
    Some(Volume {
        number,
        start,
        size: len.min(disk_size - start),
        table,
        type_id,
        name,
    })
}

fn mbr_volumes(disk: &dyn ReadAt, entries: &[MbrEntry]) -> Result<Vec<Volume>> {
    let size = disk.size();
    let mut volumes = Vec::new();
    let mut logical = Vec::new();
    for e in entries {
        if is_extended(e.kind) {
            // Linux reads only the first extended partition's chain.
            if logical.is_empty() {
                logical = logical_partitions(disk, e.start_lba, e.sectors)?;
            }
            continue;
        }
        volumes.extend(clipped(
            size,
            e.slot as u32 + 1,
            e.start_lba * MBR_SECTOR,
            e.sectors * MBR_SECTOR,
            "mbr",
            format!("0x{:02x}", e.kind),
            None,
        ));
    }
    for (i, e) in logical.into_iter().enumerate() {
        volumes.extend(clipped(
            size,
            5 + i as u32,
            e.start_lba * MBR_SECTOR,
            e.sectors * MBR_SECTOR,
            "mbr",
            format!("0x{:02x}", e.kind),
            None,
        ));
    }
    Ok(volumes)
}

/// The logical partitions of an extended partition: a chain of boot records, each holding one
/// partition (relative to itself) and a link to the next (relative to the extended partition).
fn logical_partitions(
    disk: &dyn ReadAt,
    ext_start: u64,
    ext_sectors: u64,
) -> Result<Vec<MbrEntry>> {
    let mut found = Vec::new();
    let mut seen = HashSet::new();
    let mut ebr = ext_start;
    while found.len() < MBR_MAX_LOGICAL && seen.insert(ebr) {
        let Some(offset) = ebr.checked_mul(MBR_SECTOR) else {
            break;
        };
        if offset.saturating_add(MBR_SECTOR) > disk.size() {
            break;
        }
        let mut sector = [0u8; 512];
        disk.read_exact_at(offset, &mut sector)?;
        if sector[510..512] != [0x55, 0xAA] {
            break;
        }
        let mut next = None;
        for slot in 0..2 {
            let e = &sector[446 + slot * 16..446 + (slot + 1) * 16];
            let (kind, rel, sectors) = (e[4], le32(e, 8) as u64, le32(e, 12) as u64);
            if kind == 0 || sectors == 0 {
                continue;
            }
            if is_extended(kind) {
                next.get_or_insert(ext_start + rel);
            } else {
                found.push(MbrEntry {
                    slot,
                    kind,
                    start_lba: ebr + rel,
                    sectors,
                });
            }
        }
        match next {
            Some(n) if n < ext_start + ext_sectors => ebr = n,
            _ => break,
        }
    }
    Ok(found)
}

/// The fields of a GPT header that passed its checks.
struct GptHeader {
    entries_lba: u64,
    count: u64,
    entry_size: u64,
    entries_crc: u32,
}

fn gpt_volumes(disk: &dyn ReadAt) -> Result<Vec<Volume>> {
    let mut problems = Vec::new();
    // The logical sector size is not recorded anywhere: a header at LBA 1 tells it.
    let mut sizes = vec![];
    for sector in [512u64, 4096] {
        if has_signature(disk, sector)? {
            sizes.push(sector);
        }
    }
    if sizes.is_empty() {
        sizes = vec![512, 4096];
    }
    for &sector in &sizes {
        let last = disk.size() / sector;
        if last < 2 {
            continue;
        }
        for (which, lba) in [("primary", 1), ("backup", last - 1)] {
            match read_gpt(disk, sector, lba) {
                Ok(volumes) => return Ok(volumes),
                Err(why) => problems.push(format!(
                    "{which} header at LBA {lba} ({sector}-byte sectors): {why}"
                )),
            }
        }
    }
    Err(corrupt(format!(
        "protective MBR but no valid GPT: {}",
        problems.join("; ")
    )))
}

fn has_signature(disk: &dyn ReadAt, sector: u64) -> Result<bool> {
    if disk.size() < sector + 8 {
        return Ok(false);
    }
    let mut sig = [0u8; 8];
    disk.read_exact_at(sector, &mut sig)?;
    Ok(&sig == GPT_SIGNATURE)
}

/// Reads and checks the header at `lba` and its entry array; the reason as text when either
/// is not valid (the caller tries the other header).
fn read_gpt(disk: &dyn ReadAt, sector: u64, lba: u64) -> Result<Vec<Volume>, String> {
    let header = gpt_header(disk, sector, lba)?;
    let len = header.count * header.entry_size;
    let mut entries = vec![0u8; len as usize];
    let offset = header
        .entries_lba
        .checked_mul(sector)
        .filter(|o| o.saturating_add(len) <= disk.size())
        .ok_or_else(|| {
            format!(
                "entry array at LBA {} is past the end of the disk",
                header.entries_lba
            )
        })?;
    disk.read_exact_at(offset, &mut entries)
        .map_err(|e| e.to_string())?;
    if crc32fast::hash(&entries) != header.entries_crc {
        return Err("entry array CRC32 does not match".into());
    }
    let mut volumes = Vec::new();
    for (i, e) in entries.chunks_exact(header.entry_size as usize).enumerate() {
        let type_guid = &e[0..16];
        if type_guid.iter().all(|&b| b == 0) {
            continue;
        }
        let (first, last) = (le64(e, 32), le64(e, 40));
        if last < first {
            continue;
        }
        let name: Vec<u16> = (0..36)
            .map(|k| le16(e, 56 + 2 * k))
            .take_while(|&c| c != 0)
            .collect();
        let name = String::from_utf16_lossy(&name);
        let (Some(start), Some(len)) = (
            first.checked_mul(sector),
            (last - first + 1).checked_mul(sector),
        ) else {
            continue;
        };
        volumes.extend(clipped(
            disk.size(),
            i as u32 + 1,
            start,
            len,
            "gpt",
            guid_text(type_guid),
            (!name.is_empty()).then_some(name),
        ));
    }
    Ok(volumes)
}

fn gpt_header(disk: &dyn ReadAt, sector: u64, lba: u64) -> Result<GptHeader, String> {
    let mut h = vec![0u8; sector as usize];
    disk.read_exact_at(lba * sector, &mut h)
        .map_err(|e| e.to_string())?;
    if &h[0..8] != GPT_SIGNATURE {
        return Err("no \"EFI PART\" signature".into());
    }
    let header_size = le32(&h, 12) as usize;
    if !(92..=h.len()).contains(&header_size) {
        return Err(format!("header size {header_size} is out of range"));
    }
    let stored = le32(&h, 16);
    h[16..20].fill(0);
    if crc32fast::hash(&h[..header_size]) != stored {
        return Err("header CRC32 does not match".into());
    }
    if le64(&h, 24) != lba {
        return Err(format!("header says it is at LBA {}", le64(&h, 24)));
    }
    let (count, entry_size) = (le32(&h, 80) as u64, le32(&h, 84) as u64);
    if entry_size < 128 || entry_size % 128 != 0 || count * entry_size > GPT_MAX_ENTRIES_BYTES {
        return Err(format!(
            "{count} entries of {entry_size} bytes is not a plausible table"
        ));
    }
    Ok(GptHeader {
        entries_lba: le64(&h, 72),
        count,
        entry_size,
        entries_crc: le32(&h, 88),
    })
}

/// A GUID as GPT tools print it (the first three fields are stored little-endian), lower case
/// as lsblk shows PARTTYPE.
fn guid_text(g: &[u8]) -> String {
    format!(
        "{:08x}-{:04x}-{:04x}-{:02x}{:02x}-{}",
        le32(g, 0),
        le16(g, 4),
        le16(g, 6),
        g[8],
        g[9],
        g[10..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guid_text_matches_the_linux_filesystem_type() {
        // 0FC63DAF-8483-4772-8E79-3D69D8477DE4 as stored on disk.
        let g = [
            0xAF, 0x3D, 0xC6, 0x0F, 0x83, 0x84, 0x72, 0x47, 0x8E, 0x79, 0x3D, 0x69, 0xD8, 0x47,
            0x7D, 0xE4,
        ];
        assert_eq!(guid_text(&g), "0fc63daf-8483-4772-8e79-3d69d8477de4");
    }

    #[test]
    fn a_boot_sector_with_bad_boot_flags_is_not_a_table() {
        let mut s = [0u8; 512];
        s[510] = 0x55;
        s[511] = 0xAA;
        s[446] = 0x12;
        assert!(mbr_entries(&s).is_none());
        s[446] = 0x80;
        assert_eq!(mbr_entries(&s).map(|e| e.len()), Some(0));
    }
}
