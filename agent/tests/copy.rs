//! The copy engine between real servers: nbdkit's file plugin serving a sparse raw disk (the
//! `nfs` transport's source) and qemu-nbd serving QCOW2 targets (the hub). Every result is
//! checked by qemu-img compare against the source.

mod support;

use std::process::Command;

use anyhow::Result;
use sendense_agent::copy::{ChangedArea, CopyKind, CopyOptions, Progress, copy_areas};
use sendense_agent::nbd::NbdClient;
use support::*;

const MIB: u64 = 1 << 20;

fn area(start: u64, length: u64) -> ChangedArea {
    ChangedArea { start, length }
}

fn compare(raw: &std::path::Path, qcow2: &std::path::Path) -> Result<bool> {
    let st = Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "qcow2"])
        .arg(raw)
        .arg(qcow2)
        .status()?;
    Ok(st.code() == Some(0))
}

#[tokio::test]
async fn full_then_incremental_restores_byte_identical() -> Result<()> {
    let s = Scratch::new("copy");
    let disk = s.path("disk-flat.vmdk");
    raw_file(&disk, 64 * MIB)?;
    // Scattered data, a zero run inside data, and holes.
    write_at(&disk, 0, &pattern(1, 3 * MIB as usize))?;
    write_at(&disk, MIB, &vec![0u8; 512 * 1024])?;
    write_at(&disk, 20 * MIB + 4096, &pattern(2, 5 * MIB as usize + 123))?;
    write_at(&disk, 63 * MIB, &pattern(3, MIB as usize))?;

    // Full: every allocated area (here: the whole disk; holes are skipped by block status).
    let full = s.path("full.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&full)
        .arg((64 * MIB).to_string()))?;
    {
        let src = nbdkit(
            &s.path("src.sock"),
            &["file", &format!("file={}", disk.display())],
        )?;
        let dst = qemu_nbd(&full, &s.path("full.sock"), "qcow2", &["--shared=8"])?;
        let source = NbdClient::connect(&src.url(""), &opts()).await?;
        let target = NbdClient::connect(&dst.url(""), &opts()).await?;
        let progress = Progress::default();
        let stats = copy_areas(
            &source,
            &target,
            vec![area(0, 64 * MIB)],
            CopyKind::Full,
            &CopyOptions::default(),
            &progress,
        )
        .await?;
        assert_eq!(stats.total, 64 * MIB);
        assert!(stats.skipped >= 50 * MIB, "holes were skipped: {stats:?}");
        assert!(stats.data <= 10 * MIB, "only data was sent: {stats:?}");
        source.disconnect().await;
        target.disconnect().await;
    }
    assert!(
        compare(&disk, &full)?,
        "full backup differs from the source"
    );

    // The guest changes things: new data, and zeros over data that the parent holds.
    write_at(&disk, 2 * MIB, &pattern(4, 700 * 1024))?;
    write_at(&disk, 20 * MIB + 4096, &vec![0u8; 2 * MIB as usize])?;
    write_at(&disk, 40 * MIB, &pattern(5, 4096))?;
    let changed = vec![
        area(2 * MIB, 768 * 1024),
        area(20 * MIB, 3 * MIB),
        area(40 * MIB, 64 * 1024),
    ];

    for (kind, name, expect_identical) in [
        (CopyKind::Incremental, "incr.qcow2", true),
        (CopyKind::Full, "wrong.qcow2", false),
    ] {
        let top = s.path(name);
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(&full)
            .arg(&top))?;
        let src = nbdkit(
            &s.path(&format!("{name}.src.sock")),
            &["file", &format!("file={}", disk.display())],
        )?;
        let dst = qemu_nbd(
            &top,
            &s.path(&format!("{name}.sock")),
            "qcow2",
            &["--shared=8"],
        )?;
        let source = NbdClient::connect(&src.url(""), &opts()).await?;
        let target = NbdClient::connect(&dst.url(""), &opts()).await?;
        let progress = Progress::default();
        let stats = copy_areas(
            &source,
            &target,
            changed.clone(),
            kind,
            &CopyOptions::default(),
            &progress,
        )
        .await?;
        source.disconnect().await;
        target.disconnect().await;
        drop(dst);
        assert_eq!(
            compare(&disk, &top)?,
            expect_identical,
            "{kind:?} copy of the changes into an overlay: {stats:?}"
        );
        if kind == CopyKind::Incremental {
            assert!(
                stats.zeroed >= 2 * MIB,
                "zeroed areas sent as WRITE_ZEROES: {stats:?}"
            );
            assert_eq!(stats.total, 768 * 1024 + 3 * MIB + 64 * 1024);
        }
    }
    Ok(())
}

#[tokio::test]
async fn areas_past_the_end_are_refused_before_any_write() -> Result<()> {
    let s = Scratch::new("copy-range");
    let disk = s.path("d.raw");
    raw_file(&disk, 8 * MIB)?;
    let img = s.path("t.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg((4 * MIB).to_string()))?;
    let src = nbdkit(
        &s.path("s.sock"),
        &["file", &format!("file={}", disk.display())],
    )?;
    let dst = qemu_nbd(&img, &s.path("t.sock"), "qcow2", &["--shared=8"])?;
    let source = NbdClient::connect(&src.url(""), &opts()).await?;
    let target = NbdClient::connect(&dst.url(""), &opts()).await?;
    let err = copy_areas(
        &source,
        &target,
        vec![area(3 * MIB, 2 * MIB)],
        CopyKind::Full,
        &CopyOptions::default(),
        &Progress::default(),
    )
    .await
    .expect_err("target too small");
    assert!(err.to_string().contains("target"), "{err}");
    Ok(())
}

#[tokio::test]
async fn verification_reads_every_chunk_back_and_catches_what_differs() -> Result<()> {
    use sendense_agent::copy::{CopyError, verify_written};
    let s = Scratch::new("verify");
    let disk = s.path("disk-flat.vmdk");
    raw_file(&disk, 16 * MIB)?;
    write_at(&disk, 0, &pattern(7, 4 * MIB as usize))?;
    let base = s.path("base.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&base)
        .arg((16 * MIB).to_string()))?;
    // The parent holds data where the source now reads zeros.
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x5a 8M 2M"])
        .arg(&base))?;
    let opts_verify = CopyOptions {
        verify: true,
        ..CopyOptions::default()
    };
    let changed = vec![area(0, 4 * MIB), area(8 * MIB, 2 * MIB)];
    for (kind, name, right) in [
        (CopyKind::Incremental, "right.qcow2", true),
        // A full-copy's zero skipping into an overlay lets the parent's bytes show through.
        (CopyKind::Full, "wrong.qcow2", false),
    ] {
        let top = s.path(name);
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(&base)
            .arg(&top))?;
        let src = nbdkit(
            &s.path(&format!("{name}.src.sock")),
            &["file", &format!("file={}", disk.display())],
        )?;
        let dst = qemu_nbd(
            &top,
            &s.path(&format!("{name}.sock")),
            "qcow2",
            &["--shared=8"],
        )?;
        let source = NbdClient::connect(&src.url(""), &opts()).await?;
        let target = NbdClient::connect(&dst.url(""), &opts()).await?;
        let progress = Progress::default();
        let stats = copy_areas(
            &source,
            &target,
            changed.clone(),
            kind,
            &opts_verify,
            &progress,
        )
        .await?;
        assert_eq!(
            stats
                .chunks
                .iter()
                .map(|c| u64::from(c.length))
                .sum::<u64>(),
            6 * MIB,
            "every chunk has its digest"
        );
        let verified = verify_written(&target, &stats.chunks, 8, &progress).await;
        if right {
            assert_eq!(verified?, 6 * MIB);
            // Now damage one byte on the hub side: the next read-back catches it.
            target
                .write(3 * MIB + 17, bytes::Bytes::from_static(&[0xff]))
                .await?;
            target.flush().await?;
            match verify_written(&target, &stats.chunks, 8, &progress).await {
                Err(CopyError::Mismatch { start, .. }) => {
                    assert!(start <= 3 * MIB + 17 && 3 * MIB + 17 < start + 2 * MIB)
                }
                other => panic!("a damaged byte went unnoticed: {other:?}"),
            }
        } else {
            match verified {
                Err(CopyError::Mismatch { start, .. }) => assert!(start >= 8 * MIB),
                other => panic!("the parent's bytes showing through went unnoticed: {other:?}"),
            }
        }
        source.disconnect().await;
        target.disconnect().await;
    }
    Ok(())
}

/// The overlay's own allocated ranges (depth 0) from `qemu-img map`.
fn top_ranges(img: &std::path::Path) -> Result<Vec<(u64, u64)>> {
    let out = run(Command::new("qemu-img")
        .args(["map", "--output=json", "-f", "qcow2"])
        .arg(img))?;
    let map: Vec<serde_json::Value> = serde_json::from_str(&out)?;
    Ok(map
        .iter()
        .filter(|e| e["depth"] == 0 && (e["data"] == true || e["zero"] == true))
        .map(|e| {
            let start = e["start"].as_u64().unwrap_or(u64::MAX);
            (start, start + e["length"].as_u64().unwrap_or(0))
        })
        .collect())
}

#[tokio::test]
async fn unaligned_changes_are_written_in_whole_blocks_of_the_hubs_image() -> Result<()> {
    // A disk whose size is not a multiple of 4 KiB: the last block is widened up to the end,
    // not past it.
    let size = 8 * MIB + 1536;
    let s = Scratch::new("copy-align");
    let disk = s.path("disk-flat.vmdk");
    raw_file(&disk, size)?;
    write_at(&disk, 0, &pattern(11, size as usize))?;
    let base = s.path("base.qcow2");
    run(Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2", "-o"])
        .arg(sendense_agent::hub::IMAGE_OPTIONS)
        .arg(&disk)
        .arg(&base))?;
    // The guest changes small, unaligned areas (one of them into zeros, one at the very end).
    let changed = vec![
        area(2560, 1000),
        area(65536 + 4095, 2),
        area(3 * MIB + 100, 9000),
        area(5 * MIB + 512, 512),
        area(size - 700, 700),
    ];
    for (i, a) in changed.iter().enumerate() {
        let data = if i == 3 {
            vec![0u8; a.length as usize].into()
        } else {
            pattern(100 + i as u64, a.length as usize)
        };
        write_at(&disk, a.start, &data)?;
    }
    let top = s.path("top.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-o"])
        .arg(sendense_agent::hub::IMAGE_OPTIONS)
        .arg("-b")
        .arg(&base)
        .arg(&top))?;
    {
        let src = nbdkit(
            &s.path("src.sock"),
            &["file", &format!("file={}", disk.display())],
        )?;
        let dst = qemu_nbd(&top, &s.path("top.sock"), "qcow2", &["--shared=8"])?;
        let source = NbdClient::connect(&src.url(""), &opts()).await?;
        let target = NbdClient::connect(&dst.url(""), &opts()).await?;
        assert_eq!(
            target.block_size().preferred,
            4096,
            "qemu-nbd prefers 4 KiB"
        );
        let stats = copy_areas(
            &source,
            &target,
            changed.clone(),
            CopyKind::Incremental,
            &CopyOptions::default(),
            &Progress::default(),
        )
        .await?;
        // Each area widened to its 4 KiB blocks (two areas share none).
        assert_eq!(stats.total, 4096 + 8192 + 12288 + 4096 + 1536, "{stats:?}");
        source.disconnect().await;
        target.disconnect().await;
    }
    assert!(compare(&disk, &top)?, "the overlay differs from the source");
    let ranges = top_ranges(&top)?;
    assert!(!ranges.is_empty(), "the overlay holds the changes");
    for &(start, end) in &ranges {
        assert!(
            start % 4096 == 0 && (end % 4096 == 0 || end == size),
            "the overlay holds {start}..{end}, not whole 4 KiB blocks: {ranges:?}"
        );
    }
    Ok(())
}
