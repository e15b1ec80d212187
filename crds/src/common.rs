//! Small pieces shared by the three resources: references to other objects and label maps.

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// A VM's virtual hardware as vCenter reported it when it was backed up: what a restore to a
/// new VM recreates.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct VmHardware {
    /// Virtual CPUs (`config.hardware.numCPU`).
    pub cpus: i32,
    /// Memory in MiB (`config.hardware.memoryMB`).
    pub memory_mib: i64,
    /// Guest OS identifier (`config.guestId`), e.g. `ubuntu64Guest`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub guest_id: String,
    /// `bios` or `efi` (`config.firmware`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<String>,
}

/// A reference to another object in the same namespace, by name.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
pub struct LocalObjectRef {
    /// Name of the referenced object, in the same namespace as this one.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = kube::core::Rule::new(DNS_SUBDOMAIN_RULE)
        .message("must be a lowercase DNS name: letters, digits, '-' and '.', starting and ending with a letter or digit"))]
    pub name: String,
}

/// CEL rule for a Kubernetes object name (RFC 1123 subdomain).
pub const DNS_SUBDOMAIN_RULE: &str =
    "self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')";

/// A key inside a named Secret or ConfigMap in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
pub struct KeyRef {
    /// Name of the Secret or ConfigMap, in the same namespace.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = kube::core::Rule::new(DNS_SUBDOMAIN_RULE)
        .message("must be a lowercase DNS name: letters, digits, '-' and '.', starting and ending with a letter or digit"))]
    pub name: String,
    /// Key of the entry inside it.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// Human-readable size with binary units, as shown in printer columns ("1.5 GiB").
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::human_bytes;

    #[test]
    fn human_bytes_uses_binary_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1024), "1.0 KiB");
        assert_eq!(human_bytes(3 * 1024 * 1024 * 1024 / 2), "1.5 GiB");
        assert_eq!(human_bytes(u64::MAX), "16384.0 PiB");
    }
}
