//! The agent's backup result: printed on stdout, and written as the pod's termination message
//! (at most 4096 bytes, see [`compact_json`]) for the operator to read.

use serde::{Deserialize, Serialize};

use crate::reason::AgentReason;

/// Whether a disk's target is a fresh image (full) or an overlay over the previous backup.
/// (Also the agent's `copy --kind`.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CopyKind {
    /// A fresh image: areas that read as zeros are skipped.
    Full,
    /// An overlay over the previous backup: every changed area is written, zeros as zeros.
    Incremental,
}

impl CopyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CopyKind::Full => "full",
            CopyKind::Incremental => "incremental",
        }
    }
}

/// How one disk went.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DiskReport {
    pub key: i32,
    pub label: String,
    pub capacity: u64,
    /// Absent only when the result was shrunk to fit a termination message.
    pub copy: Option<CopyKind>,
    /// Why this kind of copy.
    pub reason: String,
    pub change_id_used: String,
    /// Set only once the disk's data is flushed on the target.
    pub change_id_reached: Option<String>,
    pub areas: usize,
    pub bytes_to_copy: u64,
    pub bytes_written: u64,
    pub bytes_zeroed: u64,
    pub bytes_skipped: u64,
    pub seconds: f64,
    pub sha256: Option<String>,
    /// Bytes read back from the hub after the flush and found as the source gave them (every
    /// chunk copied); None when not verified.
    pub bytes_verified: Option<u64>,
    pub error: Option<String>,
}

/// The backup's snapshot and whether it is gone.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SnapshotReport {
    pub id: String,
    pub name: String,
    pub removed: bool,
    pub removal_error: Option<String>,
}

/// The machine-readable result of `sendense-agent backup`, on every outcome.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BackupResult {
    pub ok: bool,
    /// When not ok: what went wrong, a condition reason.
    pub reason: Option<AgentReason>,
    pub vm: Option<String>,
    pub vm_moref: Option<String>,
    pub instance_uuid: Option<String>,
    pub cbt_enabled_now: bool,
    pub leftover_snapshots_removed: Vec<String>,
    pub snapshot: Option<SnapshotReport>,
    pub disks: Vec<DiskReport>,
    pub error: Option<String>,
    /// Set by [`compact_json`] when details were dropped to fit.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

impl BackupResult {
    /// A backup that could not start: only the reason and the error.
    pub fn early_failure(reason: AgentReason, error: impl Into<String>) -> Self {
        Self {
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

/// The most a Kubernetes termination message holds; the kubelet truncates longer ones.
pub const TERMINATION_MESSAGE_LIMIT: usize = 4096;

/// `result` as JSON of at most `limit` bytes, for a termination message. When the whole result
/// does not fit, it is shrunk step by step, least useful first, and gets `"truncated": true`:
/// per-disk checksums and labels go, then long texts are shortened (never change IDs), then
/// disks keep only their essential fields, then only key and reached change ID, then the disks
/// and leftover snapshot names go. `ok`, `reason` and the start of `error` always stay.
pub fn compact_json(result: &BackupResult, limit: usize) -> String {
    use serde_json::{Value, json};
    let full = serde_json::to_string(result).unwrap_or_default();
    if full.len() <= limit {
        return full;
    }
    let mut v = serde_json::to_value(result).unwrap_or_else(|_| json!({}));
    v["truncated"] = Value::Bool(true);
    let fits = |v: &Value| Some(v.to_string()).filter(|s| s.len() <= limit);
    let disks = |v: &mut Value| -> Vec<serde_json::Map<String, Value>> {
        match v.get_mut("disks").map(Value::take) {
            Some(Value::Array(a)) => a
                .into_iter()
                .filter_map(|d| match d {
                    Value::Object(o) => Some(o),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        }
    };
    let keep_disks = |v: &mut Value, keep: &[&str], text: usize| {
        let shrunk: Vec<Value> = disks(v)
            .into_iter()
            .map(|mut d| {
                d.retain(|k, _| keep.contains(&k.as_str()));
                for k in ["error", "reason"] {
                    if let Some(s) = d.get_mut(k) {
                        shorten(s, text);
                    }
                }
                Value::Object(d)
            })
            .collect();
        v["disks"] = Value::Array(shrunk);
    };
    let shorten_top = |v: &mut Value, error: usize, other: usize| {
        let texts = |v: &mut Value, keys: &[&str], max: usize| {
            for k in keys {
                if let Some(s) = v.get_mut(*k) {
                    shorten(s, max);
                }
            }
        };
        texts(v, &["error"], error);
        texts(v, &["vm", "vm_moref", "instance_uuid"], other);
        if let Some(s) = v.get_mut("snapshot") {
            texts(s, &["id", "name", "removal_error"], other);
        }
        if let Some(Value::Array(names)) = v.get_mut("leftover_snapshots_removed") {
            names.truncate(8);
            names.iter_mut().for_each(|n| shorten(n, other.min(128)));
        }
    };

    const ALL: &[&str] = &[
        "key",
        "capacity",
        "copy",
        "reason",
        "change_id_used",
        "change_id_reached",
        "areas",
        "bytes_to_copy",
        "bytes_written",
        "bytes_zeroed",
        "bytes_skipped",
        "seconds",
        "bytes_verified",
        "error",
    ];
    const ESSENTIAL: &[&str] = &[
        "key",
        "copy",
        "change_id_used",
        "change_id_reached",
        "bytes_to_copy",
        "bytes_written",
        "bytes_verified",
        "error",
    ];
    let steps: [&dyn Fn(&mut Value); 6] = [
        &|v| keep_disks(v, ALL, usize::MAX),
        &|v| {
            keep_disks(v, ALL, 256);
            shorten_top(v, 2048, 512);
        },
        &|v| {
            keep_disks(v, ESSENTIAL, 96);
            shorten_top(v, 1024, 256);
        },
        &|v| {
            keep_disks(v, &["key", "change_id_reached"], 0);
            shorten_top(v, 768, 128);
        },
        &|v| {
            if let Some(o) = v.as_object_mut() {
                o.remove("disks");
                o.remove("leftover_snapshots_removed");
            }
        },
        &|v| {
            *v = json!({
                "ok": v["ok"].take(), "reason": v["reason"].take(), "error": v["error"].take(),
                "vm": v["vm"].take(), "truncated": true,
            });
            shorten_top(v, 512, 64);
        },
    ];
    for step in steps {
        step(&mut v);
        if let Some(s) = fits(&v) {
            return s;
        }
    }
    // Only for absurdly small limits.
    let tiny = json!({"ok": result.ok, "truncated": true}).to_string();
    if tiny.len() <= limit {
        tiny
    } else {
        String::new()
    }
}

/// Shortens a JSON string to at most `max` bytes of UTF-8 (marking the cut with "…").
fn shorten(v: &mut serde_json::Value, max: usize) {
    if let serde_json::Value::String(s) = v
        && s.len() > max
    {
        let mut cut = max.saturating_sub('…'.len_utf8());
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        if max >= '…'.len_utf8() {
            s.push('…');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(disks: usize, error_len: usize) -> BackupResult {
        let long = |tag: &str| {
            let mut s = format!("{tag}: ");
            // Quotes, control characters and multi-byte characters grow when escaped or cut.
            while s.len() < error_len {
                s.push_str("naïve \"quoted\"\n\t\u{1}✓ ");
            }
            s
        };
        BackupResult {
            ok: false,
            reason: Some(AgentReason::CopyFailed),
            vm: Some("db-01".into()),
            vm_moref: Some("vm-42".into()),
            instance_uuid: Some("5029a8f2-1b6c-4c2e-9a55-3f0b7e0d1c2a".into()),
            cbt_enabled_now: false,
            leftover_snapshots_removed: (0..50).map(|i| format!("sendense-old-{i}")).collect(),
            snapshot: Some(SnapshotReport {
                id: "snapshot-7".into(),
                name: "sendense-job".into(),
                removed: true,
                removal_error: None,
            }),
            disks: (0..disks)
                .map(|i| DiskReport {
                    key: 2000 + i as i32,
                    label: format!("Hard disk {i} with a rather long label"),
                    capacity: 64 << 30,
                    copy: Some(CopyKind::Incremental),
                    reason: "changes since the previous backup".into(),
                    change_id_used: format!("52 3c 1d 9e 4a 77 10 2b-8f 0e 44 61 9d 3a c2 71/{i}"),
                    change_id_reached: (i % 2 == 0).then(|| {
                        format!("52 3c 1d 9e 4a 77 10 2b-8f 0e 44 61 9d 3a c2 71/{}", i + 9)
                    }),
                    areas: 1234,
                    bytes_to_copy: 1 << 30,
                    bytes_written: 1 << 29,
                    sha256: Some("ab".repeat(32)),
                    error: (i % 2 == 1).then(|| long(&format!("disk {}", 2000 + i))),
                    ..Default::default()
                })
                .collect(),
            error: Some(long("disk 2001")),
            truncated: false,
        }
    }

    fn parse(s: &str) -> serde_json::Value {
        serde_json::from_str(s).unwrap_or_else(|e| panic!("invalid JSON ({e}): {s}"))
    }

    #[test]
    fn a_small_result_is_written_whole() {
        let r = result(2, 100);
        let s = compact_json(&r, TERMINATION_MESSAGE_LIMIT);
        assert_eq!(s, serde_json::to_string(&r).unwrap());
        assert!(parse(&s).get("truncated").is_none());
    }

    #[test]
    fn large_results_shrink_to_the_limit_keeping_outcome_and_change_ids() {
        for (disks, error_len) in [(4, 5_000), (8, 600), (12, 300), (16, 100_000), (30, 2_000)] {
            let r = result(disks, error_len);
            let s = compact_json(&r, TERMINATION_MESSAGE_LIMIT);
            assert!(
                s.len() <= TERMINATION_MESSAGE_LIMIT,
                "{disks} disks: {}",
                s.len()
            );
            let v = parse(&s);
            assert_eq!(v["truncated"], true);
            assert_eq!(v["ok"], false);
            assert_eq!(v["reason"], "CopyFailed");
            assert!(v["error"].as_str().unwrap().starts_with("disk 2001: naïve"));
            let d = v["disks"].as_array().expect("disks kept");
            assert_eq!(d.len(), disks);
            assert_eq!(
                d[0]["change_id_reached"],
                r.disks[0].change_id_reached.clone().unwrap().as_str()
            );
            assert!(
                d.iter()
                    .all(|d| d.get("sha256").is_none() && d.get("label").is_none())
            );
        }
    }

    #[test]
    fn results_too_large_for_any_disk_detail_keep_the_outcome() {
        let r = result(200, 50_000);
        let s = compact_json(&r, TERMINATION_MESSAGE_LIMIT);
        assert!(s.len() <= TERMINATION_MESSAGE_LIMIT, "{}", s.len());
        let v = parse(&s);
        assert_eq!(
            (v["ok"].clone(), v["reason"].clone()),
            (false.into(), "CopyFailed".into())
        );
        assert_eq!(v["truncated"], true);
        assert!(v["error"].as_str().unwrap().ends_with('…'));
        for limit in [2000, 600, 200, 40, 5] {
            let s = compact_json(&r, limit);
            assert!(s.len() <= limit, "{limit}: {}", s.len());
            if !s.is_empty() {
                assert_eq!(parse(&s)["ok"], false);
            }
        }
    }

    #[test]
    fn shortening_respects_character_boundaries() {
        let mut v = serde_json::Value::String("ééééé".into());
        shorten(&mut v, 6);
        assert_eq!(v, "é…");
        let mut v = serde_json::Value::String("short".into());
        shorten(&mut v, 6);
        assert_eq!(v, "short");
    }
}
