//! What a failed backup step reports: a condition reason and what went wrong. Each step has
//! its own error enum that knows its reason; vSphere errors are mapped here, in one place.

use sendense_contract::AgentReason;
use sendense_vsphere::VSphereError;

/// A failed step, as the result reports it (`BackupResult::reason` and `error`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    pub reason: AgentReason,
    pub message: String,
}

impl Failure {
    pub fn new(reason: AgentReason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

/// The condition reason of a vSphere error met in a step whose own failures are `otherwise`:
/// connectivity, trust and login problems keep their own reason wherever they happen.
pub fn vsphere_reason(err: &VSphereError, otherwise: AgentReason) -> AgentReason {
    match err {
        VSphereError::Transport(_) => AgentReason::Unreachable,
        VSphereError::Tls(_) => AgentReason::TlsVerificationFailed,
        VSphereError::Login(_) => AgentReason::LoginFailed,
        VSphereError::Timeout { .. } => AgentReason::Timeout,
        _ => otherwise,
    }
}

/// Looking up a VM by name: a name that several VMs share is its own reason.
pub fn find_vm_reason(err: &VSphereError) -> AgentReason {
    match err {
        VSphereError::Fault { fault, .. } if fault == "DuplicateName" => {
            AgentReason::VmNameNotUnique
        }
        _ => vsphere_reason(err, AgentReason::VmNotFound),
    }
}

/// A step's error becomes a failure with its reason and its message.
macro_rules! failure_from {
    ($($error:ty),* $(,)?) => {$(
        impl From<$error> for Failure {
            fn from(e: $error) -> Self {
                Failure::new(e.reason(), e.to_string())
            }
        }
    )*};
}
pub(crate) use failure_from;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connectivity_trust_and_login_keep_their_reason_in_every_step() {
        let transport = VSphereError::Transport("refused".into());
        let login = VSphereError::Login("bad password".into());
        let fault = |fault: &str| VSphereError::Fault {
            method: "FindByInventoryPath".into(),
            fault: fault.into(),
            message: "m".into(),
        };
        assert_eq!(
            vsphere_reason(&transport, AgentReason::SnapshotFailed),
            AgentReason::Unreachable
        );
        assert_eq!(
            vsphere_reason(&login, AgentReason::CopyFailed),
            AgentReason::LoginFailed
        );
        assert_eq!(
            vsphere_reason(&fault("FileFault"), AgentReason::SnapshotFailed),
            AgentReason::SnapshotFailed
        );
        assert_eq!(
            find_vm_reason(&fault("DuplicateName")),
            AgentReason::VmNameNotUnique
        );
        assert_eq!(
            find_vm_reason(&VSphereError::NotFound("vm".into())),
            AgentReason::VmNotFound
        );
        assert_eq!(find_vm_reason(&transport), AgentReason::Unreachable);
    }
}
