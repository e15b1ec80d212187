//! Why an agent run failed: stable CamelCase labels that become condition reasons.

use serde::{Deserialize, Serialize};

/// Why `sendense-agent backup` failed (its result's `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AgentReason {
    /// The command line was refused.
    InvalidArguments,
    /// The credentials files or variables could not be read.
    CredentialsUnavailable,
    /// `--status-addr` could not be served.
    StatusListenFailed,
    /// The agent itself broke (a task it runs ended).
    Internal,
    /// SIGTERM, Ctrl-C or the deadline stopped the backup.
    Stopped,
    /// vCenter could not be reached.
    Unreachable,
    #[serde(rename = "TLSVerificationFailed")]
    TlsVerificationFailed,
    LoginFailed,
    /// A vCenter call or task passed its deadline.
    Timeout,
    #[serde(rename = "VMNameNotUnique")]
    VmNameNotUnique,
    #[serde(rename = "VMNotFound")]
    VmNotFound,
    DiskNotFound,
    #[serde(rename = "CBTEnableFailed")]
    CbtEnableFailed,
    #[serde(rename = "CBTNotActive")]
    CbtNotActive,
    SnapshotFailed,
    SnapshotRemovalFailed,
    CopyFailed,
    HubUnreachable,
    DiskResized,
    /// Read back after the flush, the hub's image differs from what the source gave.
    VerificationFailed,
    /// The hub could not write: the repository volume is full (ENOSPC).
    RepositoryFull,
    /// A reason this build does not know (an agent newer than the operator).
    #[serde(other)]
    Unknown,
}

impl AgentReason {
    /// The label as written in results and conditions.
    pub fn as_str(self) -> &'static str {
        match self {
            AgentReason::InvalidArguments => "InvalidArguments",
            AgentReason::CredentialsUnavailable => "CredentialsUnavailable",
            AgentReason::StatusListenFailed => "StatusListenFailed",
            AgentReason::Internal => "Internal",
            AgentReason::Stopped => "Stopped",
            AgentReason::Unreachable => "Unreachable",
            AgentReason::TlsVerificationFailed => "TLSVerificationFailed",
            AgentReason::LoginFailed => "LoginFailed",
            AgentReason::Timeout => "Timeout",
            AgentReason::VmNameNotUnique => "VMNameNotUnique",
            AgentReason::VmNotFound => "VMNotFound",
            AgentReason::DiskNotFound => "DiskNotFound",
            AgentReason::CbtEnableFailed => "CBTEnableFailed",
            AgentReason::CbtNotActive => "CBTNotActive",
            AgentReason::SnapshotFailed => "SnapshotFailed",
            AgentReason::SnapshotRemovalFailed => "SnapshotRemovalFailed",
            AgentReason::CopyFailed => "CopyFailed",
            AgentReason::HubUnreachable => "HubUnreachable",
            AgentReason::DiskResized => "DiskResized",
            AgentReason::VerificationFailed => "VerificationFailed",
            AgentReason::RepositoryFull => "RepositoryFull",
            AgentReason::Unknown => "Unknown",
        }
    }

    /// Every known reason (for tests and documentation).
    pub const ALL: [AgentReason; 21] = [
        AgentReason::InvalidArguments,
        AgentReason::CredentialsUnavailable,
        AgentReason::StatusListenFailed,
        AgentReason::Internal,
        AgentReason::Stopped,
        AgentReason::Unreachable,
        AgentReason::TlsVerificationFailed,
        AgentReason::LoginFailed,
        AgentReason::Timeout,
        AgentReason::VmNameNotUnique,
        AgentReason::VmNotFound,
        AgentReason::DiskNotFound,
        AgentReason::CbtEnableFailed,
        AgentReason::CbtNotActive,
        AgentReason::SnapshotFailed,
        AgentReason::SnapshotRemovalFailed,
        AgentReason::CopyFailed,
        AgentReason::HubUnreachable,
        AgentReason::DiskResized,
        AgentReason::VerificationFailed,
        AgentReason::RepositoryFull,
    ];
}

impl std::fmt::Display for AgentReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why `sendense-agent repo probe` failed (its result's `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ProbeReason {
    InvalidArguments,
    NotFound,
    NotADirectory,
    ReadOnly,
    PermissionDenied,
    NoSpace,
    /// What was read back differs from what was written.
    Corrupted,
    #[serde(rename = "IOError")]
    IoError,
    #[serde(other)]
    Unknown,
}

impl ProbeReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ProbeReason::InvalidArguments => "InvalidArguments",
            ProbeReason::NotFound => "NotFound",
            ProbeReason::NotADirectory => "NotADirectory",
            ProbeReason::ReadOnly => "ReadOnly",
            ProbeReason::PermissionDenied => "PermissionDenied",
            ProbeReason::NoSpace => "NoSpace",
            ProbeReason::Corrupted => "Corrupted",
            ProbeReason::IoError => "IOError",
            ProbeReason::Unknown => "Unknown",
        }
    }
}

impl std::fmt::Display for ProbeReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_serializes_as_its_label_and_reads_back() {
        for r in AgentReason::ALL {
            let json = serde_json::to_string(&r).unwrap();
            assert_eq!(json, format!("\"{}\"", r.as_str()));
            assert_eq!(serde_json::from_str::<AgentReason>(&json).unwrap(), r);
        }
        for r in [
            ProbeReason::IoError,
            ProbeReason::ReadOnly,
            ProbeReason::Corrupted,
        ] {
            let json = serde_json::to_string(&r).unwrap();
            assert_eq!(json, format!("\"{}\"", r.as_str()));
        }
    }

    #[test]
    fn a_reason_from_a_newer_agent_reads_as_unknown() {
        let r: AgentReason = serde_json::from_str("\"QuantumFault\"").unwrap();
        assert_eq!(r, AgentReason::Unknown);
    }
}
