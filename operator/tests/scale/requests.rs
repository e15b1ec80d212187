//! The API requests of a phase: `apiserver_request_total` deltas by verb and resource, the
//! audit log's requests by client, and the namespace's Events by reason.

use std::collections::BTreeMap;

use anyhow::Result;
use k8s_openapi::jiff::Timestamp;
use sendense_e2e::kubectl_ok;

/// The API server's audit log (SENDENSE_SCALE_AUDIT_LOG, written when the control plane runs
/// with SENDENSE_APISERVER_AUDIT=1): requests completed within [from, to], by client, verb and
/// resource. Clients: the node's kubelet, the scheduler, the controller manager's controllers,
/// and kube-rs (the operator, plus the test's creates and watches; both use the admin
/// credentials).
pub fn audited(from: Timestamp, to: Timestamp) -> Option<BTreeMap<(String, String), f64>> {
    let path = std::env::var("SENDENSE_SCALE_AUDIT_LOG").ok()?;
    let text = std::fs::read_to_string(path).ok()?;
    let mut by = BTreeMap::new();
    for line in text.lines() {
        let Ok(e) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let Some(t) = e["stageTimestamp"]
            .as_str()
            .and_then(|t| t.parse::<Timestamp>().ok())
        else {
            continue;
        };
        if t < from || t > to || e["stage"] != "ResponseComplete" {
            continue;
        }
        let user = e["user"]["username"].as_str().unwrap_or("");
        let agent = e["userAgent"].as_str().unwrap_or("");
        let client = if let Some(c) = user.strip_prefix("system:serviceaccount:kube-system:") {
            c.to_owned()
        } else if user.starts_with("system:node:") {
            "kubelet".to_owned()
        } else if user.starts_with("system:") {
            user.trim_start_matches("system:").to_owned()
        } else {
            agent.split(['/', ' ']).next().unwrap_or("").to_owned()
        };
        let r = &e["objectRef"];
        let mut resource = r["resource"].as_str().unwrap_or("").to_owned();
        if let Some(s) = r["subresource"].as_str() {
            resource = format!("{resource}/{s}");
        }
        let verb = e["verb"].as_str().unwrap_or("");
        *by.entry((client, format!("{verb} {resource}")))
            .or_insert(0.0) += 1.0;
    }
    Some(by)
}

/// The namespace's Events by (reporter, reason, object kind), counting repeats, most first.
pub fn events_by_reason(ns: &str, jobs: f64) -> Result<String> {
    let out = kubectl_ok(&["get", "events.events.k8s.io", "-n", ns, "-o", "json"])?;
    let list: serde_json::Value = serde_json::from_str(&out)?;
    let mut by: BTreeMap<String, f64> = BTreeMap::new();
    for e in list["items"].as_array().into_iter().flatten() {
        let who = e["reportingController"]
            .as_str()
            .or(e["deprecatedSource"]["component"].as_str())
            .unwrap_or("");
        let what = format!(
            "{who} {} ({})",
            e["reason"].as_str().unwrap_or(""),
            e["regarding"]["kind"].as_str().unwrap_or("")
        );
        let n = e["series"]["count"]
            .as_f64()
            .or(e["deprecatedCount"].as_f64())
            .unwrap_or(1.0)
            .max(1.0);
        *by.entry(what).or_default() += n;
    }
    let mut v: Vec<_> = by.into_iter().collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    Ok(v.iter()
        .take(15)
        .map(|(w, n)| format!("    {w:<60} {:>6.2}/job", n / jobs))
        .collect::<Vec<_>>()
        .join("\n"))
}

/// Requests per job by client, then the client's most frequent requests.
pub fn by_client(m: &BTreeMap<(String, String), f64>, jobs: f64) -> String {
    let mut clients: BTreeMap<&str, f64> = BTreeMap::new();
    for ((c, _), n) in m {
        *clients.entry(c).or_default() += n;
    }
    let mut clients: Vec<_> = clients.into_iter().collect();
    clients.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut out = String::new();
    for (c, n) in clients {
        out.push_str(&format!("    {c:<40} {:>8.1}/job\n", n / jobs));
        let mut reqs: Vec<_> = m.iter().filter(|((cc, _), _)| cc == c).collect();
        reqs.sort_by(|a, b| b.1.total_cmp(a.1));
        for ((_, r), n) in reqs.into_iter().take(8) {
            out.push_str(&format!("        {r:<40} {:>8.1}/job\n", n / jobs));
        }
    }
    out
}

/// `apiserver_request_total`, summed by (verb, resource), and its total.
pub fn api_requests() -> Result<BTreeMap<(String, String), f64>> {
    let text = kubectl_ok(&["get", "--raw", "/metrics"])?;
    let mut by = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let label = |k: &str| {
            labels
                .split(',')
                .find_map(|kv| kv.strip_prefix(&format!("{k}=\"")))
                .map(|v| v.trim_end_matches('"').to_owned())
                .unwrap_or_default()
        };
        let v: f64 = value.trim().parse().unwrap_or(0.0);
        *by.entry((label("verb"), label("resource"))).or_insert(0.0) += v;
    }
    Ok(by)
}

pub fn delta(
    after: &BTreeMap<(String, String), f64>,
    before: &BTreeMap<(String, String), f64>,
) -> BTreeMap<(String, String), f64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, v)| *v > 0.0)
        .collect()
}

pub fn total(m: &BTreeMap<(String, String), f64>) -> f64 {
    m.values().sum()
}

pub fn top(m: &BTreeMap<(String, String), f64>, jobs: f64, n: usize) -> String {
    let mut v: Vec<_> = m.iter().collect();
    v.sort_by(|a, b| b.1.total_cmp(a.1));
    v.iter()
        .take(n)
        .map(|((verb, res), c)| format!("    {verb:<8} {res:<28} {:>8.1}/job", *c / jobs))
        .collect::<Vec<_>>()
        .join("\n")
}
