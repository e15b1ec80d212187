//! Retention: which restore points of each VM a Repository (or a BackupSchedule) keeps, and the
//! pruning of the others by merging them out of their chains.

pub mod preview;
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
/// their own rules).
pub async fn status(
    client: &Client,
    repo: &Repository,
    points: &[RestorePoint],
) -> Result<Option<RetentionStatus>, ApiError> {
    let ns = repo.namespace().unwrap_or_default();
    let schedules = list::<BackupSchedule>(client, &ns).await?;
    Ok(preview::preview(repo, points, &schedules))
}
