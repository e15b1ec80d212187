//! Events for what the probe removed from the volume, and what it left.

use super::*;

/// Events for the orphaned attempt directories the probe removed, and for those it did not.
pub(super) async fn report_removals(repo: &Repository, ctx: &Context, p: &ProbeResult) {
    let mut events = Vec::new();
    if !p.removed_orphans.is_empty() {
        events.push((
            EventType::Normal,
            "OrphanedAttemptsRemoved",
            format!(
                "removed {} attempt directories of BackupJobs that no longer exist (no restore point in them): {}",
                p.removed_orphans.len(),
                p.removed_orphans.join(", ")
            ),
        ));
    }
    if !p.kept_orphans.is_empty() {
        events.push((
            EventType::Warning,
            "OrphanedAttemptsKept",
            format!(
                "did not remove {} attempt directories of BackupJobs that no longer exist (tried again at the next probe): {}",
                p.kept_orphans.len(),
                p.kept_orphans.join("; ")
            ),
        ));
    }
    for (type_, reason, note) in events {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note.chars().take(1000).collect()),
            action: "Probe".into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&event, &repo.object_ref(&())).await {
            tracing::warn!(repository = %repo.name_any(), "publishing event {reason}: {e}");
        }
    }
}
