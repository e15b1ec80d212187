//! Hub port allocation, derived only from live BackupJobs: the ports a job holds are the ones
//! recorded in its status while it is not finished. Nothing is kept in memory, so an operator
//! restart can neither leak nor double-book a port. (The caller serializes allocations and
//! reads jobs fresh from the API before writing the result into the job's status.)

use std::collections::{BTreeMap, BTreeSet};

use sendense_crds::BackupJob;
use sendense_crds::backup_job::Phase;
use sendense_crds::repository::PortRange;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortError {
    #[error(
        "the repository's hub port range {low}-{high} has {free} free ports but this job needs {needed}: it waits until running jobs finish (or widen spec.hub.portRange)"
    )]
    Exhausted {
        low: i32,
        high: i32,
        free: usize,
        needed: usize,
    },
}

/// True while a job holds its ports: not yet Succeeded or Failed.
fn active(job: &BackupJob) -> bool {
    !matches!(
        job.status.as_ref().and_then(|s| s.phase),
        Some(Phase::Succeeded) | Some(Phase::Failed)
    )
}

/// Ports held by active jobs of `repository` in `namespace`, except `except` (the job being
/// allocated for, whose own earlier allocation is reused rather than counted against it).
pub fn in_use(
    jobs: &[BackupJob],
    namespace: &str,
    repository: &str,
    except: Option<&str>,
) -> BTreeSet<i32> {
    jobs.iter()
        .filter(|j| j.metadata.namespace.as_deref() == Some(namespace))
        .filter(|j| j.spec.repository_ref.name == repository)
        .filter(|j| except.is_none() || j.metadata.name.as_deref() != except)
        .filter(|j| active(j))
        .flat_map(|j| {
            j.status
                .iter()
                .flat_map(|s| s.disks.iter().filter_map(|d| d.port))
        })
        .collect()
}

/// The ports `job` already holds, by device key, when every disk has one.
pub fn held(job: &BackupJob, keys: &[i32]) -> Option<BTreeMap<i32, i32>> {
    let disks = &job.status.as_ref()?.disks;
    keys.iter()
        .map(|k| {
            disks
                .iter()
                .find(|d| d.device_key == *k)
                .and_then(|d| d.port)
                .map(|p| (*k, p))
        })
        .collect()
}

/// One port per disk: the lowest free ports of the range, in device-key order.
pub fn allocate(
    range: &PortRange,
    in_use: &BTreeSet<i32>,
    keys: &[i32],
) -> Result<BTreeMap<i32, i32>, PortError> {
    let mut keys = keys.to_vec();
    keys.sort_unstable();
    keys.dedup();
    let free: Vec<i32> = (range.low..=range.high)
        .filter(|p| !in_use.contains(p))
        .collect();
    if free.len() < keys.len() {
        return Err(PortError::Exhausted {
            low: range.low,
            high: range.high,
            free: free.len(),
            needed: keys.len(),
        });
    }
    Ok(keys.into_iter().zip(free).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{Fixture, TestObject};

    /// A job of namespace `ns` holding `ports` (device key, port) in its status.
    fn job(name: &str, repo: &str, phase: Option<&str>, ports: &[(i32, i32)]) -> BackupJob {
        let disks: Vec<_> = ports
            .iter()
            .map(|(k, p)| serde_json::json!({"deviceKey": k, "port": p}))
            .collect();
        BackupJob::test()
            .named(name)
            .in_namespace("ns")
            .with_spec(serde_json::json!({"vm": {"name": name}, "repositoryRef": {"name": repo}}))
            .with_status(serde_json::json!({"phase": phase, "disks": disks}))
    }

    fn range(low: i32, high: i32) -> PortRange {
        PortRange { low, high }
    }

    #[test]
    fn finished_jobs_and_other_repositories_hold_no_ports() {
        let jobs = vec![
            job(
                "a",
                "repo",
                Some("Running"),
                &[(2000, 10100), (2001, 10101)],
            ),
            job("b", "repo", Some("Succeeded"), &[(2000, 10102)]),
            job("c", "repo", Some("Failed"), &[(2000, 10103)]),
            job("d", "other", Some("Running"), &[(2000, 10104)]),
            job("e", "repo", Some("Pending"), &[(2000, 10105)]),
            job("f", "repo", None, &[]),
        ];
        assert_eq!(
            in_use(&jobs, "ns", "repo", None),
            BTreeSet::from([10100, 10101, 10105])
        );
        assert_eq!(
            in_use(&jobs, "ns", "repo", Some("a")),
            BTreeSet::from([10105])
        );
        assert_eq!(in_use(&jobs, "elsewhere", "repo", None), BTreeSet::new());
    }

    #[test]
    fn allocates_the_lowest_free_ports_in_key_order() {
        let used = BTreeSet::from([10100, 10102]);
        let got = allocate(&range(10100, 10105), &used, &[2001, 2000, 2001]).expect("room");
        assert_eq!(got, BTreeMap::from([(2000, 10101), (2001, 10103)]));
    }

    #[test]
    fn a_full_range_is_an_error_saying_what_to_do() {
        let used = BTreeSet::from([10100, 10101]);
        let err = allocate(&range(10100, 10102), &used, &[2000, 2001]).expect_err("full");
        assert_eq!(
            err,
            PortError::Exhausted {
                low: 10100,
                high: 10102,
                free: 1,
                needed: 2
            }
        );
        assert!(err.to_string().contains("widen spec.hub.portRange"));
    }

    #[test]
    fn concurrent_jobs_never_share_a_port() {
        // Jobs allocated one after another, each seeing the earlier ones in status.
        let r = range(10100, 10200);
        let mut jobs: Vec<BackupJob> = Vec::new();
        for i in 0..5 {
            let used = in_use(&jobs, "ns", "repo", None);
            let got = allocate(&r, &used, &[2000, 2001]).expect("room");
            let ports: Vec<(i32, i32)> = got.into_iter().collect();
            jobs.push(job(&format!("j{i}"), "repo", Some("Running"), &ports));
        }
        let all: Vec<i32> = jobs
            .iter()
            .flat_map(|j| held(j, &[2000, 2001]).expect("held").into_values())
            .collect();
        let distinct: BTreeSet<i32> = all.iter().copied().collect();
        assert_eq!(all.len(), 10);
        assert_eq!(distinct.len(), 10, "{all:?}");
        // After an operator restart nothing changes: the same jobs give the same answer.
        assert_eq!(
            held(&jobs[3], &[2000, 2001]),
            Some(BTreeMap::from([(2000, 10106), (2001, 10107)]))
        );
        assert_eq!(
            held(&jobs[3], &[2000, 2002]),
            None,
            "a disk without a port is no full holding"
        );
    }
}
