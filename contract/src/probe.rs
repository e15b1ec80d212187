//! What `sendense-agent repo probe` reports: whether a repository volume is writable, and how
//! full it is.

use serde::{Deserialize, Serialize};

use crate::reason::ProbeReason;

/// On failure only `ok`, `reason` and `error` are set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ProbeResult {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capacity_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub used_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub available_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qcow2_files: Option<u64>,
    /// Space allocated to the QCOW2 files (not their apparent size).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qcow2_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<ProbeReason>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl ProbeResult {
    pub fn failed(reason: ProbeReason, error: impl Into<String>) -> Self {
        Self {
            ok: false,
            reason: Some(reason),
            error: Some(error.into()),
            ..Default::default()
        }
    }

    /// Reads a result (a termination message); `None` when it is not one.
    pub fn parse(text: &str) -> Option<Self> {
        serde_json::from_str(text.trim()).ok()
    }
}
