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
