//! Partition tables written by sgdisk and sfdisk read back as Linux numbers them.

mod common;

use std::os::unix::fs::FileExt;

use common::{Scratch, have, open_image, sh};
use sendense_guestfs::partition::{Volume, volumes};

const LINUX_FS: &str = "0fc63daf-8483-4772-8e79-3d69d8477de4";
const MIB: u64 = 1 << 20;

fn gpt_disk(dir: &Scratch, name: &str) -> std::path::PathBuf {
    let img = dir.join(name);
    sh(&format!(
        "truncate -s 64M {img}; sgdisk -n 1:2048:+8M -c 1:boot -t 1:ef00 -n 2:0:+16M -c 2:root \
         -t 2:8300 -n 4:0:+4M {img} >/dev/null",
        img = img.display()
    ));
    img
}

fn summary(v: &[Volume]) -> Vec<(u32, u64, u64, &str, Option<&str>)> {
    v.iter()
        .map(|v| {
            (
                v.number,
                v.start,
                v.size,
                v.type_id.as_str(),
                v.name.as_deref(),
            )
        })
        .collect()
}

#[test]
fn gpt_partitions_are_numbered_by_entry_with_names_and_types() {
    if !have("sgdisk") {
        return;
    }
    let dir = Scratch::new("gpt");
    let img = gpt_disk(&dir, "gpt.img");
    let v = volumes(&open_image(&img)).unwrap();
    assert_eq!(
        summary(&v),
        vec![
            (
                1,
                MIB,
                8 * MIB,
                "c12a7328-f81f-11d2-ba4b-00a0c93ec93b",
                Some("boot")
            ),
            (2, 9 * MIB, 16 * MIB, LINUX_FS, Some("root")),
            (4, 25 * MIB, 4 * MIB, LINUX_FS, None),
        ]
    );
    assert!(v.iter().all(|v| v.table == "gpt"));
}

#[test]
fn a_damaged_primary_gpt_header_falls_back_to_the_backup() {
    if !have("sgdisk") {
        return;
    }
    let dir = Scratch::new("gpt-backup");
    let img = gpt_disk(&dir, "gpt.img");
    let good = volumes(&open_image(&img)).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    // One byte of the primary header's disk GUID: its CRC no longer matches.
    f.write_all_at(&[0x5A], 512 + 60).unwrap();
    assert_eq!(volumes(&open_image(&img)).unwrap(), good);
    // The primary header intact but its entry array damaged: the backup's entries are used.
    let img2 = gpt_disk(&dir, "gpt2.img");
    let f = std::fs::OpenOptions::new().write(true).open(&img2).unwrap();
    f.write_all_at(b"garbage", 2 * 512 + 130).unwrap();
    assert_eq!(volumes(&open_image(&img2)).unwrap(), good);
    // Both headers damaged: an error, not a guess.
    let size = f.metadata().unwrap().len();
    f.write_all_at(&[0x5A], 512 + 60).unwrap();
    f.write_all_at(&[0x5A], size - 512 + 60).unwrap();
    let err = volumes(&open_image(&img2)).unwrap_err().to_string();
    assert!(err.contains("no valid GPT"), "{err}");
}

#[test]
fn mbr_logical_partitions_are_numbered_from_five() {
    if !have("sfdisk") {
        return;
    }
    let dir = Scratch::new("mbr");
    let img = dir.join("mbr.img");
    sh(&format!(
        "truncate -s 64M {img}; printf '%s\\n' 'label: dos' 'start=2048, size=16384, type=83' \
         'start=18432, size=100000, type=5' 'start=20480, size=8192, type=83' \
         'start=30720, size=8192, type=7' | sfdisk -q {img}",
        img = img.display()
    ));
    let v = volumes(&open_image(&img)).unwrap();
    assert_eq!(
        summary(&v),
        vec![
            (1, MIB, 8 * MIB, "0x83", None),
            (5, 10 * MIB, 4 * MIB, "0x83", None),
            (6, 15 * MIB, 4 * MIB, "0x07", None),
        ]
    );
    assert!(v.iter().all(|v| v.table == "mbr"));
}

#[test]
fn a_disk_without_a_table_is_one_volume() {
    let dir = Scratch::new("none");
    let img = dir.join("bare.img");
    sh(&format!("truncate -s 5M {}", img.display()));
    let v = volumes(&open_image(&img)).unwrap();
    assert_eq!(summary(&v), vec![(0, 0, 5 * MIB, "", None)]);
    assert_eq!(v[0].table, "none");
}

#[test]
fn garbage_never_panics() {
    let dir = Scratch::new("garbage");
    let img = dir.join("junk.img");
    // A protective MBR followed by noise, and a GPT header claiming an absurd entry array.
    let mut data = vec![0u8; 4 * MIB as usize];
    let mut x = 0x1234_5678u32;
    for b in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    data[446..510].fill(0);
    data[446 + 4] = 0xEE;
    data[446 + 12..446 + 16].copy_from_slice(&u32::MAX.to_le_bytes());
    data[510] = 0x55;
    data[511] = 0xAA;
    data[512..520].copy_from_slice(b"EFI PART");
    std::fs::write(&img, &data).unwrap();
    assert!(volumes(&open_image(&img)).is_err());
    // An extended partition whose chain points at itself.
    data[446..510].fill(0);
    data[446 + 4] = 0x05;
    data[446 + 8..446 + 12].copy_from_slice(&0u32.to_le_bytes());
    data[446 + 12..446 + 16].copy_from_slice(&8000u32.to_le_bytes());
    std::fs::write(&img, &data).unwrap();
    assert!(volumes(&open_image(&img)).is_ok());
}

/// A GPT on a disk with 4096-byte logical sectors, written by hand (sgdisk writes 512-byte
/// sectors to an image file).
#[test]
fn gpt_with_4096_byte_sectors_is_found() {
    let dir = Scratch::new("gpt4k");
    let img = dir.join("4k.img");
    let sector = 4096usize;
    let sectors = 2048usize; // 8 MiB
    let mut data = vec![0u8; sector * sectors];
    data[446 + 4] = 0xEE;
    data[446 + 8..446 + 12].copy_from_slice(&1u32.to_le_bytes());
    data[446 + 12..446 + 16].copy_from_slice(&((sectors - 1) as u32).to_le_bytes());
    data[510] = 0x55;
    data[511] = 0xAA;
    let mut entries = vec![0u8; 128 * 128];
    let linux = [
        0xAF, 0x3D, 0xC6, 0x0F, 0x83, 0x84, 0x72, 0x47, 0x8E, 0x79, 0x3D, 0x69, 0xD8, 0x47, 0x7D,
        0xE4,
    ];
    entries[0..16].copy_from_slice(&linux);
    entries[16] = 1;
    entries[32..40].copy_from_slice(&256u64.to_le_bytes());
    entries[40..48].copy_from_slice(&511u64.to_le_bytes());
    for (i, c) in "data".encode_utf16().enumerate() {
        entries[56 + 2 * i..58 + 2 * i].copy_from_slice(&c.to_le_bytes());
    }
    let mut h = vec![0u8; 92];
    h[0..8].copy_from_slice(b"EFI PART");
    h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
    h[12..16].copy_from_slice(&92u32.to_le_bytes());
    h[24..32].copy_from_slice(&1u64.to_le_bytes());
    h[32..40].copy_from_slice(&((sectors - 1) as u64).to_le_bytes());
    h[72..80].copy_from_slice(&2u64.to_le_bytes());
    h[80..84].copy_from_slice(&128u32.to_le_bytes());
    h[84..88].copy_from_slice(&128u32.to_le_bytes());
    h[88..92].copy_from_slice(&crc32fast::hash(&entries).to_le_bytes());
    let crc = crc32fast::hash(&h);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    data[sector..sector + 92].copy_from_slice(&h);
    data[2 * sector..2 * sector + entries.len()].copy_from_slice(&entries);
    std::fs::write(&img, &data).unwrap();
    let v = volumes(&open_image(&img)).unwrap();
    assert_eq!(
        summary(&v),
        vec![(1, 256 * 4096, 256 * 4096, LINUX_FS, Some("data"))]
    );
}
