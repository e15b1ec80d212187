//! Twenty kills at random moments in one run, seeded and so reproducible
//! (`SENDENSE_FAULT_SEED=<n>` replays a run; the seed in use is printed): the operator SIGKILLed
//! and restarted, an agent pod force-deleted, a hub's qemu-nbd SIGKILLed, while a chain of
//! backups of one VM is made (a full, then incrementals, new data before each). Every job must
//! end Succeeded; every restore point must read back, through its chain, as the simulator's disk
//! at its snapshot, and all of them still do at the end; no snapshot, pod, Lease or stray file
//! is left.

use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use kube::Api;
use sendense_crds::backup_job::Phase;
use sendense_e2e::kubectl_ok;

mod support;
use support::faults::*;
use support::{Bed, SERIAL};

const KILLS: usize = 20;
/// Pod kills per job at most: each costs a retry and its back-off (10 s, 20 s, ...).
const POD_KILLS_PER_JOB: usize = 2;
/// Kills per job at most, so that the chain grows to three restore points or more.
const KILLS_PER_JOB: usize = 7;

/// xorshift64*: small, seedable, the same sequence everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in [lo, hi).
    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }
}

#[derive(Debug, Clone, Copy)]
enum Kill {
    Operator,
    Agent,
    HubQemuNbd,
}

#[tokio::test]
async fn twenty_seeded_random_kills_leave_every_restore_point_verified() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let seed = std::env::var("SENDENSE_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_261_126u64);
    eprintln!("random kills: SENDENSE_FAULT_SEED={seed}");
    let mut rng = Rng(seed.max(1));
    let mut bed = Bed::start(1, (10840, 10860)).await?;
    cap_bandwidth(&bed, Some(8))?;
    let jobs = bed.jobs().await?;
    let mut done: Vec<(String, [String; 2])> = Vec::new();
    let mut kills: Vec<(String, Kill, u64)> = Vec::new();
    let mut n = 0;
    while kills.len() < KILLS {
        if n == 10 {
            bail!("ten jobs ended before twenty kills landed: {kills:?}");
        }
        let name = format!("chain-{n}");
        // New data for each backup: 8 MiB at a random place on each disk.
        // The simulator's disks: 2000 has 32 MiB, 2001 16 MiB.
        for (disk, mib) in [("2000", 32), ("2001", 16)] {
            let offset = format!("{}M", rng.between(0, mib - 8 + 1));
            let seed = rng.between(1, 1_000_000).to_string();
            bed.guest(&[
                "fill",
                "-vm",
                VM,
                "-disk",
                disk,
                "-pattern",
                "sequential",
                "-seed",
                &seed,
                "-count",
                "8",
                "-size",
                "1M",
                "-offset",
                &offset,
            ]);
        }
        let mode = if n == 0 { "full" } else { "auto" };
        bed.apply(&name, &Bed::job_yaml(&name, VM, mode, "  retryLimit: 6\n"))?;
        let mut pod_kills = 0;
        let mut job_kills = 0;
        while job_kills < KILLS_PER_JOB {
            tokio::time::sleep(Duration::from_millis(rng.between(500, 6000))).await;
            let j = jobs.get(&name).await?;
            let st = j.status.clone().unwrap_or_default();
            if matches!(st.phase, Some(Phase::Succeeded | Phase::Failed)) || kills.len() >= KILLS {
                break;
            }
            let copying = st
                .conditions
                .iter()
                .any(|c| c.type_ == "Running" && c.reason == "Copying");
            let attempt = st.attempts.unwrap_or(1) as u64;
            let mut kind = match rng.between(0, 4) {
                0 => Kill::Agent,
                1 => Kill::HubQemuNbd,
                _ => Kill::Operator,
            };
            if !copying || pod_kills >= POD_KILLS_PER_JOB {
                kind = Kill::Operator;
            }
            let landed = match kind {
                Kill::Operator => {
                    bed.stop_operator();
                    tokio::time::sleep(Duration::from_millis(rng.between(0, 3000))).await;
                    bed.start_operator()?;
                    true
                }
                Kill::Agent => kubectl_ok(&[
                    "delete",
                    "pod",
                    "-n",
                    &bed.ns.name,
                    &format!("{name}-agent"),
                    "--force",
                    "--grace-period=0",
                ])
                .is_ok(),
                Kill::HubQemuNbd => {
                    let uid = j.metadata.uid.clone().unwrap_or_default();
                    let pids = hub_qemu_nbd_pids(&name, &uid, attempt)?;
                    signal(&pids[..pids.len().min(1)], "-KILL");
                    !pids.is_empty()
                }
            };
            if landed {
                job_kills += 1;
                if !matches!(kind, Kill::Operator) {
                    pod_kills += 1;
                }
                eprintln!(
                    "kill {}: {kind:?} of {name} (attempt {attempt})",
                    kills.len() + 1
                );
                kills.push((name.clone(), kind, attempt));
            }
        }
        let j = bed
            .finished(&name, Phase::Succeeded, Duration::from_secs(600))
            .await?;
        verified(&bed, &j).await?;
        // Nothing writes to the VM until the next job: its disks now are the snapshot's.
        done.push((
            j.status
                .as_ref()
                .and_then(|s| s.restore_point.clone())
                .context("restore point")?,
            [bed.checksum(VM, 2000), bed.checksum(VM, 2001)],
        ));
        n += 1;
    }
    // Every restore point, old ones included, still reads back as its disks were.
    let rps = bed.restore_points().await?;
    assert_eq!(rps.len(), done.len(), "one restore point per job");
    for (name, sums) in &done {
        let rp = rps
            .iter()
            .find(|r| r.metadata.name.as_deref() == Some(name.as_str()))
            .with_context(|| format!("RestorePoint {name}"))?;
        assert!(rp.spec.verified, "{name} verified");
        for (i, key) in [2000, 2001].into_iter().enumerate() {
            let d = rp
                .spec
                .disks
                .iter()
                .find(|d| d.device_key == key)
                .context("disk")?;
            assert_eq!(&d.sha256, &sums[i], "{name} disk {key}");
            bed.verify(&d.file, &sums[i])?;
        }
    }
    let last = format!("chain-{}", n - 1);
    nothing_left(&bed, &last).await?;
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(sendense_e2e::client().await?, &bed.ns.name);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !leases
        .list(&kube::api::ListParams::default().labels("sendense.io/vm-lease"))
        .await?
        .items
        .is_empty()
    {
        if tokio::time::Instant::now() > deadline {
            bail!("a VM Lease outlived every job");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    bed.stop_operator();
    eprintln!("{} kills over {n} jobs: {kills:?}", kills.len());
    Ok(())
}
