//! Retention end to end on the real test bed: a VM backed up four times (a full, then three
//! incrementals, the guest writing between them), then `retention: {keepLast: 2}` set on the
//! Repository. The operator merges the two oldest points out of the chain with `repo prune`
//! pods; the two kept points still read back byte-identically (their recorded SHA-256, which is
//! the simulator's checksum of the disk at their snapshot), the volume holds fewer bytes, and
//! the next incremental continues the shortened chain.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use kube::Api;
use sendense_crds::backup_job::{CopyKind, Phase};
use sendense_crds::{BackupJob, Repository, RestorePoint, SourceNode};

mod support;
use support::{Bed, SERIAL};

const VM: &str = "cbt-vm-0";

async fn backup(bed: &Bed, name: &str) -> Result<BackupJob> {
    bed.apply(name, &Bed::job_yaml(name, VM, "auto", ""))?;
    bed.finished(name, Phase::Succeeded, Duration::from_secs(240))
        .await
}

fn write(bed: &Bed, seed: u32) {
    for disk in ["2000", "2001"] {
        bed.guest(&[
            "fill",
            "-vm",
            VM,
            "-disk",
            disk,
            "-pattern",
            "random",
            "-seed",
            &(seed * 10 + disk.len() as u32).to_string(),
            "-count",
            "40",
            "-size",
            "64K",
        ]);
    }
}

/// Bytes allocated under `dir` (what the files really take on the volume).
fn allocated(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else {
                total += m.blocks() * 512;
            }
        }
    }
    total
}

#[tokio::test]
async fn keep_last_merges_the_oldest_points_and_every_kept_point_still_restores() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let bed = Bed::start(1, (11430, 11450)).await?;
    bed.ready::<SourceNode>("vc").await?;
    bed.ready::<Repository>("primary").await?;

    // A full and three incrementals; each point's SHA-256 is the disks' checksum at its time.
    let mut sums: BTreeMap<String, Vec<(i32, String)>> = BTreeMap::new();
    let mut points = Vec::new();
    for (i, name) in ["b0", "b1", "b2", "b3"].iter().enumerate() {
        write(&bed, i as u32 + 1);
        let at = vec![
            (2000, bed.checksum(VM, 2000)),
            (2001, bed.checksum(VM, 2001)),
        ];
        let job = backup(&bed, name).await?;
        let rp = job
            .status
            .as_ref()
            .and_then(|s| s.restore_point.clone())
            .context("restore point")?;
        sums.insert(rp.clone(), at);
        points.push(rp);
    }
    let before = allocated(&bed.repo_dir);

    sendense_e2e::kubectl_ok(&[
        "patch",
        "-n",
        &bed.ns.name,
        "repository",
        "primary",
        "--type",
        "merge",
        "-p",
        r#"{"spec": {"retention": {"keepLast": 2}}}"#,
    ])?;
    let rps: Api<RestorePoint> = Api::namespaced(sendense_e2e::client().await?, &bed.ns.name);
    let repos: Api<Repository> = Api::namespaced(sendense_e2e::client().await?, &bed.ns.name);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(400);
    loop {
        let items = rps.list(&Default::default()).await?.items;
        // The children's RestorePoints are made again from their new manifests: the oldest
        // kept point has no parent any more.
        let rebased = items.iter().any(|p| {
            p.metadata.name.as_deref() == Some(points[2].as_str()) && p.spec.parent.is_none()
        });
        let names: Vec<String> = items.into_iter().filter_map(|p| p.metadata.name).collect();
        let st = repos.get("primary").await?.status.unwrap_or_default();
        let r = st.retention.clone().unwrap_or_default();
        if names.len() == 2 && rebased && r.prune.is_empty() && r.pruning.is_none() && r.pruned == 2
        {
            let mut want = points[2..].to_vec();
            want.sort();
            let mut got = names.clone();
            got.sort();
            assert_eq!(got, want, "the two newest points are kept");
            assert!(r.bytes_freed > 0, "{r:?}");
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "retention did not finish: points {names:?}, {r:#?}{}",
                bed.diagnostics()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Every kept point reads back as the disks were at its snapshot.
    for name in &points[2..] {
        let rp = rps.get(name).await?;
        for d in &rp.spec.disks {
            let want = &sums[name]
                .iter()
                .find(|(k, _)| *k == d.device_key)
                .context("disk")?
                .1;
            assert_eq!(&d.sha256, want, "{name} disk {}", d.device_key);
            bed.verify(&d.file, want)?;
        }
    }
    // The oldest kept point is now the chain's base.
    let base = rps.get(&points[2]).await?;
    assert!(base.spec.parent.is_none(), "{:?}", base.spec.parent);
    assert!(
        base.spec.disks.iter().all(|d| d.copy == CopyKind::Full),
        "{:?}",
        base.spec.disks
    );
    let after = allocated(&bed.repo_dir);
    assert!(
        after < before,
        "the volume holds fewer bytes: {before} before, {after} after"
    );
    let metrics = bed.metrics().await?;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("sendense_retention_prunes_total")
                && l.contains("result=\"succeeded\"")
                && l.ends_with(" 2")),
        "{metrics}"
    );

    // The next backup continues the shortened chain.
    write(&bed, 9);
    let want = [bed.checksum(VM, 2000), bed.checksum(VM, 2001)];
    let next = backup(&bed, "b4").await?;
    let st = next.status.clone().context("status")?;
    assert_eq!(st.chain_parent.as_deref(), Some(points[3].as_str()));
    for d in &st.disks {
        assert_eq!(d.copy, Some(CopyKind::Incremental), "{d:?}");
        let sha = if d.device_key == 2000 {
            &want[0]
        } else {
            &want[1]
        };
        bed.verify(d.file.as_deref().context("file")?, sha)?;
    }
    Ok(())
}
