use super::*;
use crate::fixtures::{Fixture, TestObject};
use sendense_vsphere::{PowerState, VmRef};
use serde_json::json;

fn vm(name: &str, folder: &str, attrs: &[(&str, &str)]) -> VmListing {
    VmListing {
        vm: VmRef {
            moref: format!("vm-{name}"),
            name: name.into(),
            instance_uuid: format!("uuid-{name}"),
        },
        folder: folder.into(),
        attributes: attrs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        template: false,
        power: PowerState::PoweredOn,
    }
}

fn selection(v: serde_json::Value) -> VmSelection {
    serde_json::from_value(v).expect("selection")
}

#[test]
fn every_criterion_set_must_match_and_templates_never_do() {
    let web = vm("web-01", "prod/web", &[("backup", "gold")]);
    let db = vm("db-01", "prod", &[("backup", "silver")]);
    let s = selection(json!({"namePattern": "web-*"}));
    assert!(selected(&s, &web) && !selected(&s, &db));
    let s = selection(json!({"folder": "prod"}));
    assert!(!selected(&s, &web) && selected(&s, &db));
    let s = selection(json!({"folder": "/prod/", "includeSubfolders": true}));
    assert!(selected(&s, &web) && selected(&s, &db));
    // "prod" does not contain "production".
    assert!(!selected(&s, &vm("x", "production", &[])));
    let s = selection(json!({"attribute": {"name": "backup", "value": "gold"}}));
    assert!(selected(&s, &web) && !selected(&s, &db));
    let s = selection(json!({"names": ["db-01"], "folder": "prod"}));
    assert!(!selected(&s, &web) && selected(&s, &db));
    let s = selection(json!({"namePattern": "*"}));
    let mut template = web.clone();
    template.template = true;
    assert!(!selected(&s, &template));
}

#[test]
fn job_names_are_stable_dns_labels_of_at_most_52_characters() {
    let at: Timestamp = "2026-11-27T01:30:00Z".parse().unwrap();
    let a = job_name("nightly", "Web_01", "UUID-1", at);
    assert_eq!(a, job_name("nightly", "Web_01", "uuid-1", at), "stable");
    assert!(a.starts_with("nightly-web-01-"), "{a}");
    let long = job_name(
        "a-twenty-char-sched",
        "a very long VM name that goes on and on",
        "u",
        at,
    );
    assert!(long.len() <= 52, "{long}");
    for n in [&a, &long] {
        assert!(
            n.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && n.starts_with(|c: char| c.is_ascii_lowercase())
                && !n.ends_with('-'),
            "{n}"
        );
    }
    let later = job_name(
        "nightly",
        "Web_01",
        "uuid-1",
        at.checked_add(jiff::SignedDuration::from_secs(1)).unwrap(),
    );
    assert_ne!(a, later, "one name per run");
    assert_ne!(a, job_name("nightly", "Web_01", "uuid-2", at), "per VM");
}

fn point(name: &str, mode: &str, parent: Option<&str>, completed: &str) -> RestorePoint {
    RestorePoint::test().named(name).with_spec(json!({
        "mode": mode,
        "parent": parent.map(|p| json!({"name": p, "directory": format!("d/{p}")})),
        "completed": completed,
    }))
}

fn schedule(spec: serde_json::Value) -> BackupSchedule {
    let base = json!({
        "apiVersion": "sendense.io/v1alpha1", "kind": "BackupSchedule",
        "metadata": {"name": "nightly", "namespace": "backups"},
        "spec": {"schedule": "0 1 * * *", "sourceNodeRef": {"name": "vc"},
                 "repositoryRef": {"name": "primary"}, "vms": {"namePattern": "*"}}
    });
    let mut s: BackupSchedule = serde_json::from_value(base).unwrap();
    let mut v = serde_json::to_value(&s).unwrap();
    if let serde_json::Value::Object(fields) = spec {
        for (k, val) in fields {
            v["spec"][k] = val;
        }
    }
    s = serde_json::from_value(v).unwrap();
    s
}

#[test]
fn full_every_makes_a_long_or_old_chain_full() {
    let uuid = "5029a8f2-1b6c-4c2e-9a55-3f0b7e0d1c2a";
    let points = vec![
        point("p1", "Full", None, "2026-11-01T01:00:00Z"),
        point("p2", "Incremental", Some("p1"), "2026-11-02T01:00:00Z"),
        point("p3", "Incremental", Some("p2"), "2026-11-03T01:00:00Z"),
    ];
    assert_eq!(crate::chain::chain_of(&points, "primary", uuid).0, 3);
    let now: Timestamp = "2026-11-04T01:00:00Z".parse().unwrap();
    let s = schedule(json!({"fullEvery": {"backups": 4}}));
    assert_eq!(mode_for(&s, &points, uuid, now).0, BackupMode::Auto);
    let s = schedule(json!({"fullEvery": {"backups": 3}}));
    let (mode, why) = mode_for(&s, &points, uuid, now);
    assert_eq!(mode, BackupMode::Full);
    assert!(why.unwrap().contains("3 backups"));
    let s = schedule(json!({"fullEvery": {"days": 3}}));
    assert_eq!(mode_for(&s, &points, uuid, now).0, BackupMode::Full);
    let s = schedule(json!({"fullEvery": {"days": 4}}));
    assert_eq!(mode_for(&s, &points, uuid, now).0, BackupMode::Auto);
    // Another VM's points do not count; no chain yet is no reason for a full.
    assert_eq!(mode_for(&s, &points, "other", now).0, BackupMode::Auto);
}

fn job(name: &str, at: &str, phase: &str) -> BackupJob {
    BackupJob::test()
        .named(name)
        .edit(|v| {
            v["metadata"]["labels"] = json!({SCHEDULE_LABEL: "nightly", VM_LABEL: "u1"});
            v["metadata"]["annotations"] = json!({SCHEDULED_AT: at});
        })
        .with_status(if phase.is_empty() {
            json!({})
        } else {
            json!({"phase": phase, "completionTime": at, "restorePoint": format!("rp-{name}")})
        })
}

#[test]
fn history_limits_keep_the_newest_finished_jobs_per_vm() {
    let jobs = vec![
        job("a", "2026-11-01T01:00:00Z", "Succeeded"),
        job("b", "2026-11-02T01:00:00Z", "Failed"),
        job("c", "2026-11-03T01:00:00Z", "Succeeded"),
        job("d", "2026-11-04T01:00:00Z", "Failed"),
        job("e", "2026-11-05T01:00:00Z", "Running"),
    ];
    let s = schedule(json!({"successfulJobsHistoryLimit": 1, "failedJobsHistoryLimit": 1}));
    let mut gone: Vec<String> = past_history(&s, &jobs)
        .iter()
        .map(|j| j.name_any())
        .collect();
    gone.sort();
    assert_eq!(gone, ["a", "b"]);
}

#[test]
fn a_closed_window_catches_unstarted_jobs_only() {
    let jobs = vec![
        job("queued", "2026-11-05T01:00:00Z", "Pending"),
        job("new", "2026-11-05T01:00:00Z", ""),
        job("running", "2026-11-05T01:00:00Z", "Running"),
    ];
    let s = schedule(json!({"windowMinutes": 60}));
    let open: Timestamp = "2026-11-05T01:59:59Z".parse().unwrap();
    assert!(window_closed(&s, &jobs, open).is_empty());
    let closed: Timestamp = "2026-11-05T02:00:00Z".parse().unwrap();
    let names: Vec<String> = window_closed(&s, &jobs, closed)
        .iter()
        .map(|j| j.name_any())
        .collect();
    assert_eq!(names, ["queued", "new"]);
    assert!(window_closed(&schedule(json!({})), &jobs, closed).is_empty());
}

#[test]
fn failures_in_a_row_are_counted_once_each_and_a_success_resets_them() {
    let names = BTreeMap::from([("u1".to_string(), "web-01".to_string())]);
    let v = vm_status(&[], &[job("a", "2026-11-01T01:00:00Z", "Failed")], &names);
    assert_eq!(
        (v[0].consecutive_failures, v[0].name.as_str()),
        (1, "web-01")
    );
    // The same job seen again does not count again.
    let v = vm_status(&v, &[job("a", "2026-11-01T01:00:00Z", "Failed")], &names);
    assert_eq!(v[0].consecutive_failures, 1);
    let jobs = vec![
        job("a", "2026-11-01T01:00:00Z", "Failed"),
        job("b", "2026-11-02T01:00:00Z", "Failed"),
    ];
    let v = vm_status(&v, &jobs, &names);
    assert_eq!(v[0].consecutive_failures, 2);
    assert_eq!(v[0].last_result.as_deref(), Some("Failed"));
    let jobs = vec![
        job("b", "2026-11-02T01:00:00Z", "Failed"),
        job("c", "2026-11-03T01:00:00Z", "Succeeded"),
    ];
    let v = vm_status(&v, &jobs, &names);
    assert_eq!(v[0].consecutive_failures, 0);
    assert_eq!(v[0].last_restore_point.as_deref(), Some("rp-c"));
    assert_eq!(
        last_success(&v).map(|t| t.0.to_string()).as_deref(),
        Some("2026-11-03T01:00:00Z")
    );
}

#[test]
fn a_vms_backup_is_due_by_the_run_after_its_last_success_or_the_window_end() {
    let t = |s: &str| -> Timestamp { s.parse().unwrap() };
    let cron: super::super::cron::Cron = "0 1 * * *".parse().unwrap();
    let tz = jiff::tz::TimeZone::UTC;
    let names = BTreeMap::from([("u1".to_string(), "web-01".to_string())]);
    let s = schedule(json!({}));
    let mut vms = Vec::new();
    // Selected by the run of Nov 1: its first backup is due by the run after (Nov 2).
    mark_selected(&mut vms, "u1", "web-01", t("2026-11-01T01:00:00Z"));
    let last = Some(t("2026-11-01T01:00:00Z"));
    let due = |s: &BackupSchedule, v: &ScheduledVm, last| {
        backup_due(s, &cron, &tz, v, last).map(|t| t.to_string())
    };
    assert_eq!(
        due(&s, &vms[0], last).as_deref(),
        Some("2026-11-02T01:00:00Z")
    );
    assert_eq!(due(&s, &vms[0], None), None, "no run yet");
    // Its backup of Nov 1 succeeded (at 03:00): the next is due when the Nov 3 run starts.
    let mut ok = job("a", "2026-11-01T01:00:00Z", "Succeeded");
    if let Some(st) = ok.status.as_mut() {
        st.completion_time = Some(Time(t("2026-11-01T03:00:00Z")));
    }
    let v = vm_status(&vms, &[ok.clone()], &names);
    assert_eq!(
        v[0].last_successful_run.as_ref().map(|t| t.0),
        Some(t("2026-11-01T01:00:00Z"))
    );
    assert_eq!(
        v[0].first_run.as_ref().map(|t| t.0),
        Some(t("2026-11-01T01:00:00Z"))
    );
    assert_eq!(
        due(&s, &v[0], last).as_deref(),
        Some("2026-11-03T01:00:00Z")
    );
    // With a 3-hour window: due when the window of the Nov 2 run closes.
    let windowed = schedule(json!({"windowMinutes": 180}));
    assert_eq!(
        due(&windowed, &v[0], last).as_deref(),
        Some("2026-11-02T04:00:00Z")
    );
    // Suspended, or no longer selected: nothing is due.
    assert_eq!(due(&schedule(json!({"suspend": true})), &v[0], last), None);
    let mut gone = v[0].clone();
    gone.last_selected_run = None;
    assert_eq!(due(&s, &gone, last), None);
    // Selected again later: the first run stays the first.
    let mut vms = v;
    mark_selected(&mut vms, "u1", "web-01", t("2026-11-05T01:00:00Z"));
    assert_eq!(
        vms[0].first_run.as_ref().map(|t| t.0),
        Some(t("2026-11-01T01:00:00Z"))
    );
    assert_eq!(vms.len(), 1);
}

#[test]
fn a_window_closed_run_stays_the_vms_latest_until_a_later_run() {
    let names = BTreeMap::from([("u1".to_string(), "web-01".to_string())]);
    let t = |s: &str| -> Timestamp { s.parse().unwrap() };
    let earlier = job("a", "2026-11-01T01:00:00Z", "Succeeded");
    let mut vms = vm_status(&[], std::slice::from_ref(&earlier), &names);
    mark_selected(&mut vms, "u1", "web-01", t("2026-11-02T01:00:00Z"));
    // The Nov 2 job was removed unstarted when its window closed.
    vms[0].last_result = Some("WindowClosed".into());
    vms[0].last_job = Some("b".into());
    let unstarted = job("b", "2026-11-02T01:00:00Z", "");
    for jobs in [vec![unstarted, earlier.clone()], vec![earlier.clone()]] {
        let v = vm_status(&vms, &jobs, &names);
        assert_eq!(
            (v[0].last_result.as_deref(), v[0].last_job.as_deref()),
            (Some("WindowClosed"), Some("b"))
        );
    }
    let later = job("c", "2026-11-03T01:00:00Z", "Succeeded");
    let v = vm_status(&vms, &[later, earlier], &names);
    assert_eq!(v[0].last_result.as_deref(), Some("Succeeded"));
}
