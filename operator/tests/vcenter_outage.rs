//! vCenter stops answering in the middle of a backup (the simulator SIGSTOPped) and comes back
//! later, on the real test bed. Data copied and flushed is kept as a restore point; the
//! snapshot the agent could not remove is hunted by the operator, with back-off and across its
//! restarts, until vCenter confirms it gone; and the simulator still serves afterwards (a panic
//! in it fails the test when the bed is dropped).

use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use sendense_crds::backup_job::Phase;

mod support;
use support::faults::*;
use support::{Bed, SERIAL, events_of};

/// The job's SnapshotRemoved condition: (status, reason, message).
async fn snapshot_condition(bed: &Bed, name: &str) -> Result<(String, String, String)> {
    let st = bed
        .jobs()
        .await?
        .get(name)
        .await?
        .status
        .unwrap_or_default();
    let c = condition(&st, "SnapshotRemoved")?;
    Ok((c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// Waits until the operator's metric of snapshots pending removal for the VM reads `want`.
async fn pending_metric(bed: &Bed, want: u32) -> Result<()> {
    let series = format!(
        "sendense_snapshots_pending_removal{{namespace=\"{}\",vm=\"{VM}\"}}",
        bed.ns.name
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let text = bed.metrics().await?;
        let value = text
            .lines()
            .find(|l| l.starts_with(&series))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0);
        if value == want {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{series} is {value}, not {want}");
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

#[tokio::test]
async fn vcenter_frozen_mid_copy_keeps_the_restore_point_and_the_snapshot_is_hunted_until_gone()
-> Result<()> {
    let _serial = SERIAL.lock().await;
    let mut bed = Bed::start(1, (11160, 11180)).await?;
    write_data(&bed);
    cap_bandwidth(&bed, Some(8))?;
    bed.apply("outage", &Bed::job_yaml("outage", VM, "full", ""))?;
    mid_copy(&bed, "outage").await?;
    // vCenter stops answering; the copy goes on (the nfs transport reads the datastore, not
    // vCenter), and the agent cannot remove its snapshot within its budget.
    let vcenter = Frozen::new(vec![bed.sim.child.id() as i32]);
    let j = bed
        .finished("outage", Phase::Succeeded, Duration::from_secs(400))
        .await?;
    let st = j.status.clone().context("status")?;
    assert_eq!(st.attempts, Some(1), "the complete copy is not retried");
    let rp = st
        .restore_point
        .clone()
        .context("a restore point, vCenter still frozen")?;
    let (status, reason, message) = snapshot_condition(&bed, "outage").await?;
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "RemovalPending"),
        "{message}"
    );
    assert!(message.contains("copy is complete"), "{message}");
    pending_metric(&bed, 1).await?;
    // The operator restarts during the hunt: the hunt goes on from status.
    bed.stop_operator();
    bed.start_operator()?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let st = bed
            .jobs()
            .await?
            .get("outage")
            .await?
            .status
            .unwrap_or_default();
        let tried = st
            .snapshot
            .as_ref()
            .and_then(|s| s.removal_attempts)
            .unwrap_or(0);
        if tried >= 2 {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the operator did not try again: {:?}", st.snapshot);
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let (status, reason, _) = snapshot_condition(&bed, "outage").await?;
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "RemovalPending")
    );
    // vCenter comes back: the snapshot goes, and the condition says so.
    drop(vcenter);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(420);
    loop {
        let (status, reason, message) = snapshot_condition(&bed, "outage").await?;
        if status == "True" {
            assert!(
                matches!(reason.as_str(), "RemovedByOperator" | "NoSnapshot"),
                "{reason}: {message}"
            );
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "the snapshot was never confirmed removed: {reason}: {message}{}",
                bed.diagnostics()
            );
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    assert_eq!(
        bed.snapshots(VM),
        0,
        "the simulator serves, and no snapshot is left"
    );
    pending_metric(&bed, 0).await?;
    let ev = events_of(&bed.ns.name, "outage").await?;
    assert!(
        ev.contains(&("Warning".into(), "RemovalPending".into())),
        "the history tells the story: {ev:?}"
    );
    let j = bed.jobs().await?.get("outage").await?;
    assert_eq!(
        j.status.as_ref().and_then(|s| s.restore_point.as_deref()),
        Some(rp.as_str())
    );
    verified(&bed, &j).await?;
    nothing_left(&bed, "outage").await?;
    // The job, its hunt over, may go at once (no finalizer left).
    assert!(j.metadata.finalizers.unwrap_or_default().is_empty());
    Ok(())
}

/// vCenter stops answering as the agent starts, before any snapshot: the attempt fails with a
/// reason naming vCenter, the next attempt (once vCenter is back) commits, and no snapshot is
/// left, not even one whose creation was asked while vCenter was frozen.
#[tokio::test]
async fn vcenter_frozen_before_the_snapshot_fails_the_attempt_clearly_and_the_next_one_commits()
-> Result<()> {
    let _serial = SERIAL.lock().await;
    let bed = Bed::start(1, (11190, 11210)).await?;
    write_data(&bed);
    bed.apply(
        "early",
        &Bed::job_yaml("early", VM, "full", "  retryLimit: 3\n"),
    )?;
    running_reason(&bed, "early", "AgentStarting", Duration::from_secs(180)).await?;
    let vcenter = Frozen::new(vec![bed.sim.child.id() as i32]);
    let message = running_reason(&bed, "early", "Retrying", Duration::from_secs(300)).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    drop(vcenter);
    let message = message?;
    assert!(
        message.contains("attempt 1") && message.to_lowercase().contains("vcenter"),
        "the reason names vCenter: {message}"
    );
    let j = bed
        .finished("early", Phase::Succeeded, Duration::from_secs(420))
        .await?;
    assert!(j.status.as_ref().and_then(|s| s.attempts).unwrap_or(0) >= 2);
    verified(&bed, &j).await?;
    nothing_left(&bed, "early").await?;
    Ok(())
}

/// vCenter stops answering while the agent asks it for the changed areas (the simulator holds
/// QueryChangedDiskAreas, and is frozen once a call is inside it): the query times out, the
/// attempt fails with a reason naming the query and vCenter, its snapshot cannot be removed
/// while vCenter is away, and the next attempt, with vCenter back, removes that leftover and
/// commits.
#[tokio::test]
async fn vcenter_frozen_while_changed_areas_are_queried_fails_the_attempt_clearly_and_the_next_one_commits()
-> Result<()> {
    let _serial = SERIAL.lock().await;
    let bed = Bed::start(1, (11220, 11240)).await?;
    write_data(&bed);
    bed.sim.query_delay(VM, Duration::from_secs(3600));
    bed.apply(
        "query",
        &Bed::job_yaml("query", VM, "full", "  retryLimit: 1\n"),
    )?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(240);
    while bed.sim.queries_held(VM) == 0 {
        if tokio::time::Instant::now() > deadline {
            bail!(
                "the agent never asked for changed areas{}",
                bed.diagnostics()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        bed.snapshots(VM),
        1,
        "the query runs on the backup's snapshot"
    );
    let vcenter = Frozen::new(vec![bed.sim.child.id() as i32]);
    // The agent's vCenter call deadline (120 s) and its snapshot removal budget (90 s) pass.
    let message = running_reason(&bed, "query", "Retrying", Duration::from_secs(420)).await;
    drop(vcenter);
    bed.sim.query_delay(VM, Duration::ZERO);
    let message = message?;
    assert!(
        message.contains("attempt 1")
            && message.contains("querying changed areas")
            && message.to_lowercase().contains("vcenter"),
        "the reason names the query and vCenter: {message}"
    );
    let j = bed
        .finished("query", Phase::Succeeded, Duration::from_secs(420))
        .await?;
    assert_eq!(j.status.as_ref().and_then(|s| s.attempts), Some(2));
    let ev = events_of(&bed.ns.name, "query").await?;
    assert!(
        ev.contains(&("Warning".into(), "Retrying".into())),
        "the history tells the story: {ev:?}"
    );
    verified(&bed, &j).await?;
    nothing_left(&bed, "query").await?;
    Ok(())
}
