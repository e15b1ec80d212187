//! What can happen to a BackupJob, as types: why it waits, why an attempt failed, and the
//! reason of each of its conditions. The strings written to the API come from here only, and so
//! does each condition change's Event (Normal, Warning, or none).

use std::time::Duration;

use kube::runtime::events::EventType;

use sendense_contract::AgentReason;

use crate::status::ConditionReason;
use crate::vcenter::ProblemKind;

/// Why a job waits (phase Pending) before anything of it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitReason {
    SourceNodeNotFound,
    SourceNodeNotReady,
    RepositoryNotFound,
    RepositoryNotReady,
    /// Logging in to the SourceNode's vCenter failed.
    VCenter(ProblemKind),
    /// Logged in, but looking the VM up failed.
    VmLookup(ProblemKind),
    VmNotFound,
    DiskNotFound,
    NoDisks,
    /// Another job is backing up the same VM.
    VmBusy,
    /// `spec.mode: incremental`, and an incremental is not possible.
    IncrementalNotPossible,
    PortsExhausted,
    /// The SourceNode's `limits.maxConcurrentJobs` backups run (or are queued before it).
    SourceNodeLimit,
    /// `limits.maxConcurrentJobsPerDatastore` backups read one of its VM's datastores.
    DatastoreLimit,
}

impl WaitReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SourceNodeNotFound => "SourceNodeNotFound",
            Self::SourceNodeNotReady => "SourceNodeNotReady",
            Self::RepositoryNotFound => "RepositoryNotFound",
            Self::RepositoryNotReady => "RepositoryNotReady",
            Self::VCenter(p) | Self::VmLookup(p) => p.as_str(),
            Self::VmNotFound => "VMNotFound",
            Self::DiskNotFound => "DiskNotFound",
            Self::NoDisks => "NoDisks",
            Self::VmBusy => "VMBusy",
            Self::IncrementalNotPossible => "IncrementalNotPossible",
            Self::PortsExhausted => "PortsExhausted",
            Self::SourceNodeLimit => "SourceNodeLimit",
            Self::DatastoreLimit => "DatastoreLimit",
        }
    }

    /// When to look again: soon for what passes by itself, rarely for what a person must fix
    /// (a change of the referenced objects triggers a reconcile anyway).
    pub fn retry(self) -> Duration {
        Duration::from_secs(match self {
            Self::VCenter(p) if p.transient() => 30,
            Self::VmLookup(_) => 30,
            Self::VmBusy => 10,
            Self::PortsExhausted => 15,
            Self::SourceNodeLimit | Self::DatastoreLimit => 10,
            Self::IncrementalNotPossible => 60,
            _ => 300,
        })
    }
}

/// A job's wait: the reason and what a person reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wait {
    pub reason: WaitReason,
    pub message: String,
}

impl Wait {
    pub fn new(reason: WaitReason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

/// Why one attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureReason {
    RepositoryNotFound,
    SourceNodeNotFound,
    HubFailed,
    /// The agent failed, with the reason it reported (none: `AgentFailed`).
    Agent(Option<AgentReason>),
    /// The agent ended without a result the operator can read.
    ResultMissing,
    /// The copied files could not be committed as a restore point.
    CommitFailed,
    /// A pod of the attempt disappeared or was replaced while the attempt ran.
    PodLost,
    /// The attempt made no progress for `spec.progressDeadlineSeconds`.
    ProgressDeadlineExceeded,
    /// The job ran longer than `spec.activeDeadlineSeconds`.
    DeadlineExceeded,
}

/// What a failed attempt calls for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureClass {
    /// The same plan again, in a fresh attempt (network, a pod lost, a stall).
    Retry,
    /// The VM changed under the plan (a disk resized, added or removed): plan again, then a
    /// fresh attempt; a changed disk is copied in full.
    Replan,
    /// Another attempt cannot succeed (invalid arguments, CBT cannot be enabled, no time
    /// left): the job fails at once.
    Fatal,
}

impl FailureReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RepositoryNotFound => "RepositoryNotFound",
            Self::SourceNodeNotFound => "SourceNodeNotFound",
            Self::HubFailed => "HubFailed",
            Self::Agent(Some(r)) => r.as_str(),
            Self::Agent(None) => "AgentFailed",
            Self::ResultMissing => "ResultMissing",
            Self::CommitFailed => "CommitFailed",
            Self::PodLost => "PodLost",
            Self::ProgressDeadlineExceeded => "ProgressDeadlineExceeded",
            Self::DeadlineExceeded => "DeadlineExceeded",
        }
    }

    /// Retry, plan again, or fail the job now.
    pub fn class(self) -> FailureClass {
        use AgentReason as A;
        match self {
            Self::Agent(Some(A::DiskResized | A::DiskNotFound)) => FailureClass::Replan,
            Self::Agent(Some(
                A::InvalidArguments
                | A::CredentialsUnavailable
                | A::TlsVerificationFailed
                | A::LoginFailed
                | A::VmNameNotUnique
                | A::VmNotFound
                | A::CbtEnableFailed
                | A::CbtNotActive
                | A::RepositoryFull,
            ))
            | Self::RepositoryNotFound
            | Self::SourceNodeNotFound
            | Self::DeadlineExceeded => FailureClass::Fatal,
            Self::Agent(_)
            | Self::HubFailed
            | Self::ResultMissing
            | Self::CommitFailed
            | Self::PodLost
            | Self::ProgressDeadlineExceeded => FailureClass::Retry,
        }
    }
}

/// A failed attempt: the reason and what a person reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub reason: FailureReason,
    pub message: String,
}

impl Failure {
    pub fn new(reason: FailureReason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

/// Pause before attempt `attempt` (2, 3, ...): 10 s, 20 s, 40 s, ... at most 5 minutes.
pub fn retry_backoff(attempt: i32) -> Duration {
    let exp = (attempt - 2).clamp(0, 5) as u32;
    Duration::from_secs((10u64 << exp).min(300))
}

/// One of the pods of a job's attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobPod {
    Hub,
    Agent,
}

/// The `Running` condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Running {
    HubStarting,
    AgentStarting,
    /// The API server refused to create the pod (or an object it needs): a quota, Pod
    /// Security admission, a policy. Tried again periodically.
    Refused(JobPod),
    Copying,
    /// A pod of the attempt cannot be scheduled (the scheduler's message says why). The
    /// attempt fails when this lasts `spec.progressDeadlineSeconds`.
    Unschedulable(JobPod),
    /// The copy is flushed; its files are being read back and committed as a restore point.
    Committing,
    Waiting(WaitReason),
    Retrying,
    /// The Complete condition's Event says it.
    Completed,
    /// The Failed condition's Event says it.
    Failed,
}

impl ConditionReason for Running {
    fn condition_type(&self) -> &'static str {
        "Running"
    }
    fn is_true(&self) -> bool {
        matches!(
            self,
            Self::HubStarting | Self::AgentStarting | Self::Copying | Self::Committing
        )
    }
    fn reason(&self) -> &str {
        match self {
            Self::HubStarting => "HubStarting",
            Self::AgentStarting => "AgentStarting",
            Self::Copying => "Copying",
            Self::Committing => "Committing",
            Self::Waiting(w) => w.as_str(),
            Self::Refused(JobPod::Hub) => "HubPodRejected",
            Self::Refused(JobPod::Agent) => "AgentPodRejected",
            Self::Unschedulable(JobPod::Hub) => "HubPodUnschedulable",
            Self::Unschedulable(JobPod::Agent) => "AgentPodUnschedulable",
            Self::Retrying => "Retrying",
            Self::Completed => "Completed",
            Self::Failed => "Failed",
        }
    }
    /// A Normal Event when an attempt starts (its hub) and when it commits; the steps between
    /// (the agent starting, the copy) are in the condition and `status.progress` only: an
    /// Event each would be two more API writes per job for what the condition already says.
    fn event_type(&self) -> Option<EventType> {
        match self {
            Self::HubStarting | Self::Committing => Some(EventType::Normal),
            Self::Waiting(_) | Self::Refused(_) | Self::Unschedulable(_) | Self::Retrying => {
                Some(EventType::Warning)
            }
            Self::AgentStarting | Self::Copying | Self::Completed | Self::Failed => None,
        }
    }
}

/// The `Complete` condition: the backup succeeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Complete;

impl ConditionReason for Complete {
    fn condition_type(&self) -> &'static str {
        "Complete"
    }
    fn is_true(&self) -> bool {
        true
    }
    fn reason(&self) -> &str {
        "BackupSucceeded"
    }
    fn event_type(&self) -> Option<EventType> {
        Some(EventType::Normal)
    }
}

/// The `Failed` condition: the last attempt failed, for this reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failed<'a>(pub &'a FailureReason);

impl ConditionReason for Failed<'_> {
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

/// The `SnapshotRemoved` condition: is the backup's vSphere snapshot gone?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotRemoved {
    /// The agent removed it.
    Removed,
    /// vCenter shows none (or the VM is gone).
    NoSnapshot,
    RemovedByOperator,
    /// vCenter could not be asked.
    Unverified,
    RemovalFailed,
    /// The copy completed, the snapshot is still there: the operator keeps removing it.
    RemovalPending,
}

impl SnapshotRemoved {
    /// The reasons of a snapshot the operator keeps hunting, with back-off, until vCenter
    /// confirms it gone.
    pub const HUNTED: [Self; 3] = [Self::RemovalPending, Self::RemovalFailed, Self::Unverified];
}

impl ConditionReason for SnapshotRemoved {
    fn condition_type(&self) -> &'static str {
        "SnapshotRemoved"
    }
    fn is_true(&self) -> bool {
        matches!(
            self,
            Self::Removed | Self::NoSnapshot | Self::RemovedByOperator
        )
    }
    fn reason(&self) -> &str {
        match self {
            Self::Removed => "Removed",
            Self::NoSnapshot => "NoSnapshot",
            Self::RemovedByOperator => "RemovedByOperator",
            Self::Unverified => "Unverified",
            Self::RemovalFailed => "SnapshotRemovalFailed",
            Self::RemovalPending => "RemovalPending",
        }
    }
    fn event_type(&self) -> Option<EventType> {
        Some(if self.is_true() {
            EventType::Normal
        } else {
            EventType::Warning
        })
    }
}

/// The `PartialFilesRemoved` condition of a failed job, or of a succeeded one whose earlier
/// attempts failed: the directories of the attempts that did not commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilesRemoved {
    /// The cleanup pod is to run.
    Pending,
    Removed,
    RepositoryNotFound,
    RemovalFailed,
    /// The API server refused the cleanup pod; tried again periodically.
    CleanupPodRejected,
}

impl FilesRemoved {
    /// The cleanup is still to run (first try, or a retry after a refusal).
    pub const OUTSTANDING: [Self; 2] = [Self::Pending, Self::CleanupPodRejected];
}

impl ConditionReason for FilesRemoved {
    fn condition_type(&self) -> &'static str {
        "PartialFilesRemoved"
    }
    fn is_true(&self) -> bool {
        matches!(self, Self::Removed)
    }
    fn reason(&self) -> &str {
        match self {
            Self::Pending => "Pending",
            Self::Removed => "Removed",
            Self::RepositoryNotFound => "RepositoryNotFound",
            Self::RemovalFailed => "RemovalFailed",
            Self::CleanupPodRejected => "CleanupPodRejected",
        }
    }
    fn event_type(&self) -> Option<EventType> {
        Some(match self {
            Self::Pending | Self::Removed => EventType::Normal,
            Self::RepositoryNotFound | Self::RemovalFailed | Self::CleanupPodRejected => {
                EventType::Warning
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off() {
        assert_eq!(retry_backoff(2), Duration::from_secs(10));
        assert_eq!(retry_backoff(3), Duration::from_secs(20));
        assert_eq!(retry_backoff(9), Duration::from_secs(300));
    }

    #[test]
    fn failures_are_classified() {
        use FailureClass::*;
        let cases = [
            (
                FailureReason::Agent(Some(AgentReason::HubUnreachable)),
                Retry,
            ),
            (FailureReason::Agent(Some(AgentReason::Unreachable)), Retry),
            (FailureReason::Agent(Some(AgentReason::Stopped)), Retry),
            (FailureReason::Agent(None), Retry),
            (FailureReason::Agent(Some(AgentReason::Unknown)), Retry),
            (FailureReason::PodLost, Retry),
            (FailureReason::ProgressDeadlineExceeded, Retry),
            (FailureReason::CommitFailed, Retry),
            (FailureReason::Agent(Some(AgentReason::DiskResized)), Replan),
            (
                FailureReason::Agent(Some(AgentReason::DiskNotFound)),
                Replan,
            ),
            (
                FailureReason::Agent(Some(AgentReason::InvalidArguments)),
                Fatal,
            ),
            (
                FailureReason::Agent(Some(AgentReason::CbtEnableFailed)),
                Fatal,
            ),
            (FailureReason::Agent(Some(AgentReason::LoginFailed)), Fatal),
            (
                FailureReason::Agent(Some(AgentReason::RepositoryFull)),
                Fatal,
            ),
            (
                FailureReason::Agent(Some(AgentReason::VerificationFailed)),
                Retry,
            ),
            (FailureReason::DeadlineExceeded, Fatal),
            (FailureReason::RepositoryNotFound, Fatal),
        ];
        for (reason, class) in cases {
            assert_eq!(reason.class(), class, "{}", reason.as_str());
        }
    }
}
