//! Retention: which restore points of each VM a Repository (or a BackupSchedule) keeps, and the
//! pruning of the others by merging them out of their chains.

pub mod preview;
pub mod prune;
pub mod select;

use kube::{Client, ResourceExt};
use sendense_crds::repository::RetentionStatus;
use sendense_crds::{BackupSchedule, Repository, RestorePoint};

use crate::children::{ApiError, list};

/// The restore points of `repository` among `points`.
pub fn count(points: &[RestorePoint], repository: &str) -> i32 {
    points
        .iter()
        .filter(|p| p.spec.repository_ref.name == repository)
        .count() as i32
}

/// The retention's verdict for the Repository's status (the namespace's schedules read for
/// their own rules); the counters and the prune under way are carried over from `previous`.
pub async fn status(
    client: &Client,
    repo: &Repository,
    points: &[RestorePoint],
    previous: Option<&RetentionStatus>,
) -> Result<Option<RetentionStatus>, ApiError> {
    let ns = repo.namespace().unwrap_or_default();
    let schedules = list::<BackupSchedule>(client, &ns).await?;
    let mut st = preview::preview(repo, points, &schedules);
    // The counters and the last prune are kept across evaluations.
    if let Some(old) = previous {
        let new = st.get_or_insert_with(RetentionStatus::default);
        new.pruned = old.pruned;
        new.bytes_freed = old.bytes_freed;
        new.last_prune = old.last_prune.clone();
        new.pruning = old.pruning.clone();
    }
    Ok(st)
}

/// What a reconcile's pruning step asks of the Repository controller.
#[derive(Debug, Default, Clone, Copy)]
pub struct Pruning {
    /// A point was pruned: probe the volume now (its children's RestorePoints are made again).
    pub probe_now: bool,
    /// Look again within this long.
    pub again: Option<std::time::Duration>,
    /// A prune pod runs: no probe now (its listing would be of a volume being changed).
    pub running: bool,
}

/// One step of pruning (see [`prune`]), its outcome recorded in `status.retention`.
pub async fn step(
    repo: &Repository,
    ctx: &crate::repository::Context,
    points: &[RestorePoint],
    status: &mut sendense_crds::repository::RepositoryStatus,
) -> Result<Pruning, ApiError> {
    let Some(st) = status.retention.as_mut() else {
        return Ok(Pruning::default());
    };
    Ok(match prune::step(repo, ctx, points, st).await? {
        prune::Step::Idle => Pruning::default(),
        prune::Step::Again(d) => Pruning {
            probe_now: false,
            again: Some(d),
            running: false,
        },
        prune::Step::Running(d) => Pruning {
            probe_now: false,
            again: Some(d),
            running: true,
        },
        prune::Step::Pruned => Pruning {
            probe_now: true,
            again: Some(std::time::Duration::from_secs(2)),
            running: false,
        },
    })
}
