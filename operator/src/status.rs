//! The one status writer of the three controllers: a reconcile changes a copy of the object's
//! status (conditions set through typed reasons), then `write` applies it (server-side, the
//! operator owns all of status) only when it changed, and publishes one Event per condition
//! whose status or reason changed. Whether that Event is Normal or Warning (or none) is decided
//! by the reason's variant, never by looking at strings.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Client, ResourceExt};
use sendense_crds::conditions::{self, FALSE, TRUE};
use sendense_crds::{
    BackupJob, BackupJobStatus, BackupSchedule, BackupScheduleStatus, Repository, RepositoryStatus,
    RestoreJob, RestoreJobStatus, SourceNode, SourceNodeStatus,
};
use serde::Serialize;

use crate::children::{ApiError, MANAGER, Namespaced, Verb};

/// An object whose status the operator writes.
pub trait Reported: Namespaced {
    type Status: Serialize + Clone + PartialEq + Default;
    /// The `action` of the Events about this kind ("Probe", "Backup").
    const EVENT_ACTION: &'static str;
    fn status(&self) -> Option<&Self::Status>;
    fn conditions(status: &Self::Status) -> &[Condition];
    fn conditions_mut(status: &mut Self::Status) -> &mut Vec<Condition>;
    fn set_observed_generation(status: &mut Self::Status, generation: Option<i64>);
}

/// A condition as a value: which condition it sets, True or False, the reason written to the
/// API, and the Event a change to it publishes.
pub trait ConditionReason {
    fn condition_type(&self) -> &'static str;
    fn is_true(&self) -> bool;
    /// The reason as the API shows it (CamelCase, as users and alerts match it).
    fn reason(&self) -> &str;
    /// The Event published when the condition changes; None when another condition's Event
    /// already says it.
    fn event_type(&self) -> Option<EventType>;
}

/// The condition `reason` sets, when it is in `conditions` with that status and reason.
pub fn holding<'c>(
    conditions: &'c [Condition],
    reason: &impl ConditionReason,
) -> Option<&'c Condition> {
    let status = if reason.is_true() { TRUE } else { FALSE };
    conditions::find(conditions, reason.condition_type())
        .filter(|c| c.status == status && c.reason == reason.reason())
}

/// The status changes of one reconcile.
pub struct StatusUpdate<'a, K: Reported> {
    object: &'a K,
    old: K::Status,
    /// The new status; starts as the object's current one.
    pub status: K::Status,
    /// Per condition type set in this update: the Event its change publishes.
    events: BTreeMap<&'static str, Option<EventType>>,
}

pub fn now() -> Time {
    Time(Timestamp::now())
}

impl<'a, K: Reported> StatusUpdate<'a, K> {
    pub fn new(object: &'a K) -> Self {
        let old = object.status().cloned().unwrap_or_default();
        let mut status = old.clone();
        K::set_observed_generation(&mut status, object.meta().generation);
        Self {
            object,
            old,
            status,
            events: BTreeMap::new(),
        }
    }

    /// The object whose status this is.
    pub fn object(&self) -> &'a K {
        self.object
    }

    /// The status as it was before this update.
    pub fn old(&self) -> &K::Status {
        &self.old
    }

    /// Sets a condition; its `lastTransitionTime` moves only when its status changes.
    pub fn set(&mut self, reason: &impl ConditionReason, message: impl Into<String>) {
        conditions::set_condition(
            K::conditions_mut(&mut self.status),
            conditions::condition(
                reason.condition_type(),
                if reason.is_true() { TRUE } else { FALSE },
                reason.reason(),
                message,
                self.object.meta().generation,
                now(),
            ),
        );
        self.events
            .insert(reason.condition_type(), reason.event_type());
    }

    /// True when the update changes nothing.
    pub fn is_unchanged(&self) -> bool {
        self.old == self.status
    }

    /// Applies the status when it changed, then publishes the Events of changed conditions.
    pub async fn write(self, client: &Client, recorder: &Recorder) -> Result<(), ApiError> {
        self.write_versioned(client, recorder).await.map(|_| ())
    }

    /// As `write`: the object's resourceVersion the write made (None: nothing changed, nothing
    /// was written).
    pub async fn write_versioned(
        self,
        client: &Client,
        recorder: &Recorder,
    ) -> Result<Option<String>, ApiError> {
        if self.is_unchanged() {
            return Ok(None);
        }
        let ns = self.object.namespace().unwrap_or_default();
        let name = self.object.name_any();
        let patch = serde_json::json!({
            "apiVersion": K::api_version(&()),
            "kind": K::kind(&()),
            "status": self.status,
        });
        let written = Api::<K>::namespaced(client.clone(), &ns)
            .patch_status(
                &name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
            .map_err(|e| ApiError::new::<K>(Verb::WriteStatus, &ns, &name, e))?;
        let reference = self.object.object_ref(&());
        for c in K::conditions(&self.status) {
            let before = conditions::find(K::conditions(&self.old), &c.type_);
            if before.is_some_and(|b| b.status == c.status && b.reason == c.reason) {
                continue;
            }
            let Some(Some(type_)) = self.events.get(c.type_.as_str()) else {
                continue;
            };
            let event = Event {
                type_: *type_,
                reason: c.reason.clone(),
                // The API refuses longer notes.
                note: Some(c.message.chars().take(1000).collect()),
                action: K::EVENT_ACTION.to_owned(),
                secondary: None,
            };
            // An Event that cannot be published is logged, never fatal to the reconcile.
            if let Err(e) = recorder.publish(&event, &reference).await {
                tracing::warn!(object = %self.object.name_any(), "publishing event {}: {e}", c.reason);
            }
        }
        Ok(written.meta().resource_version.clone())
    }
}

macro_rules! reported {
    ($kind:ty, $status:ty, $action:literal) => {
        impl Reported for $kind {
            type Status = $status;
            const EVENT_ACTION: &'static str = $action;
            fn status(&self) -> Option<&$status> {
                self.status.as_ref()
            }
            fn conditions(status: &$status) -> &[Condition] {
                &status.conditions
            }
            fn conditions_mut(status: &mut $status) -> &mut Vec<Condition> {
                &mut status.conditions
            }
            fn set_observed_generation(status: &mut $status, generation: Option<i64>) {
                status.observed_generation = generation;
            }
        }
    };
}

reported!(SourceNode, SourceNodeStatus, "Probe");
reported!(Repository, RepositoryStatus, "Probe");
reported!(BackupJob, BackupJobStatus, "Backup");
reported!(RestoreJob, RestoreJobStatus, "Restore");
reported!(BackupSchedule, BackupScheduleStatus, "Schedule");
