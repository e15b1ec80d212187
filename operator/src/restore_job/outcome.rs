//! What can happen to a RestoreJob, as types: why it failed, and the reason of each of its
//! conditions (the strings written to the API, and the Event each change publishes).

use kube::runtime::events::EventType;
use sendense_contract::restore::Refusal;

use crate::status::ConditionReason;
use crate::vcenter::ProblemKind;

/// Why a restore failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureReason {
    RestorePointNotFound,
    RepositoryNotFound,
    DiskNotFound,
    ClaimNotFound,
    ClaimTooSmall,
    /// A claim is of the wrong kind for its disk (the agent found no directory, a file where
    /// the image goes, ...).
    ClaimUnusable,
    NothingMatched,
    NoFileSystem,
    /// The restore point's files are missing or unreadable on the repository volume.
    RestorePointUnreadable,
    /// The pod's command line was refused (a bug or an agent of another version).
    InvalidRequest,
    /// The SourceNode of a vSphere target does not exist.
    SourceNodeNotFound,
    /// The SourceNode asks for a datastore volume (writable) or a toleration the operator's
    /// settings do not allow.
    NotAllowed,
    /// In place: the VM is powered on (or suspended).
    VmPoweredOn,
    /// In place: the VM does not exist any more.
    VmNotFound,
    /// A VM of the new VM's name exists.
    VmExists,
    /// In place: the VM has snapshots.
    VmHasSnapshots,
    /// The new VM's folder, resource pool or datastore does not exist.
    PlacementNotFound,
    /// In place: the SourceNode's vCenter could not be used (to learn its identity, which
    /// names the VM's Lease) within the progress deadline.
    VCenter(ProblemKind),
    /// The attempt's pod did not start within the progress deadline.
    ProgressDeadlineExceeded,
    /// The attempt's pod was deleted or lost with its node.
    PodLost,
    /// The restore ran and failed (an I/O error, a read-back that did not match, ...).
    RestoreFailed,
    /// The pod ended without a readable result.
    ResultMissing,
}

impl FailureReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RestorePointNotFound => "RestorePointNotFound",
            Self::RepositoryNotFound => "RepositoryNotFound",
            Self::DiskNotFound => "DiskNotFound",
            Self::ClaimNotFound => "ClaimNotFound",
            Self::ClaimTooSmall => "ClaimTooSmall",
            Self::ClaimUnusable => "ClaimUnusable",
            Self::NothingMatched => "NothingMatched",
            Self::NoFileSystem => "NoFileSystem",
            Self::RestorePointUnreadable => "RestorePointUnreadable",
            Self::InvalidRequest => "InvalidRequest",
            Self::SourceNodeNotFound => "SourceNodeNotFound",
            Self::NotAllowed => "NotAllowed",
            Self::VmPoweredOn => "VmPoweredOn",
            Self::VmNotFound => "VmNotFound",
            Self::VmExists => "VmExists",
            Self::VmHasSnapshots => "VmHasSnapshots",
            Self::PlacementNotFound => "PlacementNotFound",
            Self::VCenter(p) => p.as_str(),
            Self::ProgressDeadlineExceeded => "ProgressDeadlineExceeded",
            Self::PodLost => "PodLost",
            Self::RestoreFailed => "RestoreFailed",
            Self::ResultMissing => "ResultMissing",
        }
    }

    /// Input that cannot work as given: the job fails at once, without retries.
    pub fn terminal(self) -> bool {
        !matches!(
            self,
            Self::ProgressDeadlineExceeded
                | Self::PodLost
                | Self::RestoreFailed
                | Self::ResultMissing
        )
    }

    /// The reason of an agent's refusal.
    pub fn of_refusal(r: Refusal) -> Self {
        match r {
            Refusal::BadArguments | Refusal::Other => Self::InvalidRequest,
            Refusal::SourceNotFound => Self::RestorePointUnreadable,
            Refusal::DiskNotFound => Self::DiskNotFound,
            Refusal::TargetTooSmall => Self::ClaimTooSmall,
            Refusal::TargetUnusable => Self::ClaimUnusable,
            Refusal::NothingMatched => Self::NothingMatched,
            Refusal::NoFileSystem => Self::NoFileSystem,
            Refusal::VmPoweredOn => Self::VmPoweredOn,
            Refusal::VmNotFound => Self::VmNotFound,
            Refusal::VmExists => Self::VmExists,
            Refusal::VmHasSnapshots => Self::VmHasSnapshots,
            Refusal::PlacementNotFound => Self::PlacementNotFound,
        }
    }
}

/// The `Running` condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Running {
    /// The pod is created and starting.
    Starting,
    Restoring,
    /// Waiting for a claim to exist.
    ClaimNotFound,
    /// In place: another job (a backup, another restore) holds the VM's Lease.
    VmBusy,
    /// In place: the SourceNode's vCenter cannot be used yet.
    VCenter(ProblemKind),
    /// The API server refused the pod (quota, admission).
    PodRejected,
    PodUnschedulable,
    Retrying,
    Completed,
    Failed,
}

impl ConditionReason for Running {
    fn condition_type(&self) -> &'static str {
        "Running"
    }
    fn is_true(&self) -> bool {
        matches!(self, Self::Starting | Self::Restoring)
    }
    fn reason(&self) -> &str {
        match self {
            Self::Starting => "Starting",
            Self::Restoring => "Restoring",
            Self::ClaimNotFound => "ClaimNotFound",
            Self::VmBusy => "VMBusy",
            Self::VCenter(p) => p.as_str(),
            Self::PodRejected => "PodRejected",
            Self::PodUnschedulable => "PodUnschedulable",
            Self::Retrying => "Retrying",
            Self::Completed => "Completed",
            Self::Failed => "Failed",
        }
    }
    fn event_type(&self) -> Option<EventType> {
        match self {
            Self::Starting | Self::Restoring => Some(EventType::Normal),
            Self::ClaimNotFound
            | Self::VmBusy
            | Self::VCenter(_)
            | Self::PodRejected
            | Self::PodUnschedulable
            | Self::Retrying => Some(EventType::Warning),
            Self::Completed | Self::Failed => None,
        }
    }
}

/// The `Complete` condition.
pub(super) struct Complete;

impl ConditionReason for Complete {
    fn condition_type(&self) -> &'static str {
        "Complete"
    }
    fn is_true(&self) -> bool {
        true
    }
    fn reason(&self) -> &str {
        "RestoreSucceeded"
    }
    fn event_type(&self) -> Option<EventType> {
        Some(EventType::Normal)
    }
}

/// The `Failed` condition.
pub(super) struct Failed(pub(super) FailureReason);

impl ConditionReason for Failed {
    fn condition_type(&self) -> &'static str {
        "Failed"
    }
    fn is_true(&self) -> bool {
        true
    }
    fn reason(&self) -> &str {
        self.0.as_str()
    }
    fn event_type(&self) -> Option<EventType> {
        Some(EventType::Warning)
    }
}
