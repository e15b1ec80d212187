use super::*;
use crate::fixtures::{Fixture, TestObject};
use sendense_crds::{Repository, RestorePoint, SourceNode};
use serde_json::json;

fn disk(key: i32, capacity: u64) -> Disk {
    Disk {
        key,
        label: format!("Hard disk {}", key - 1999),
        capacity,
        file_name: format!("[ds] web-01/web-01_{key}.vmdk"),
        change_id: None,
    }
}

/// VM `web-01` with two disks, no other job, the default port range 10100-10200.
fn refs(jobs: Vec<BackupJob>) -> Dereferenced {
    Dereferenced {
        source_node: SourceNode::test(),
        repository: Repository::test(),
        vm_name: "web-01".into(),
        vm_instance_uuid: "5029a8f2-1b6c-4c2e-9a55-3f0b7e0d1c2a".into(),
        vm_hardware: None,
        vcenter_identity: "vc-1".into(),
        disks: vec![disk(2000, 1 << 30), disk(2001, 1 << 29)],
        jobs,
        restore_points: Vec::new(),
    }
}

fn waits(result: Result<Plan, Wait>) -> Wait {
    result.expect_err("the job waits")
}

#[test]
fn a_first_backup_is_full_on_the_lowest_ports_with_files_from_the_layout() {
    let p = plan(&BackupJob::test(), &refs(Vec::new())).expect("a plan");
    assert_eq!(p.vm_name, "web-01");
    assert_eq!(p.chain_parent, None);
    assert_eq!(p.ports_text(), "2000:10100,2001:10101");
    assert_eq!(p.vm_instance_uuid, "5029a8f2-1b6c-4c2e-9a55-3f0b7e0d1c2a");
    let d = &p.disks[0];
    assert_eq!(d.copy, Some(CopyKind::Full));
    // The job's own directory: its name, its UID, the attempt.
    assert_eq!(
        d.file.as_deref(),
        Some("backups/web-01/web-01-b2-u-2-a1/2000.qcow2")
    );
    assert_eq!(d.capacity_bytes, Some(1 << 30));
}

#[test]
fn an_auto_backup_is_incremental_on_the_vms_newest_restore_point() {
    let dir = "backups/web-01/web-01-b1-0000000b-0000-4000-8000-000000000001-a1";
    let parent = RestorePoint::test().with_spec(json!({"disks": [
        {"deviceKey": 2000, "capacityBytes": 1u64 << 30, "file": format!("{dir}/2000.qcow2"), "changeIdReached": "u/1", "copy": "Full", "bytesWritten": 1, "sha256": ""},
        {"deviceKey": 2001, "capacityBytes": 1u64 << 29, "file": format!("{dir}/2001.qcow2"), "changeIdReached": "u/2", "copy": "Full", "bytesWritten": 1, "sha256": ""}
    ]}));
    // The job that made it is gone or was a namesake: only the restore point counts. A finished
    // job holds no ports.
    let finished = BackupJob::test().named("web-01-b1").with_status(json!({
        "phase": "Succeeded", "disks": [{"deviceKey": 2000, "port": 10100}]}));
    let mut r = refs(vec![finished]);
    r.restore_points = vec![parent];
    let p = plan(&BackupJob::test(), &r).expect("a plan");
    assert_eq!(p.chain_parent.as_deref(), Some("web-01-b1-0000000b"));
    assert_eq!(p.disks[1].copy, Some(CopyKind::Incremental));
    assert_eq!(p.disks[1].change_id_used.as_deref(), Some("u/2"));
    assert_eq!(
        p.disks[1].backing_file.as_deref(),
        Some(format!("{dir}/2001.qcow2").as_str())
    );
    assert_eq!(p.ports_text(), "2000:10100,2001:10101");
    // Another VM's restore point (a different instance UUID, whatever its name) is no parent.
    r.vm_instance_uuid = "4129a8f2-0000-4c2e-9a55-3f0b7e0d1c2a".into();
    let p = plan(&BackupJob::test(), &r).expect("a plan");
    assert_eq!(p.chain_parent, None);
}

#[test]
fn a_missing_disk_or_a_vm_without_disks_waits_with_its_reason() {
    let job = BackupJob::test().with_spec(json!({"disks": [2000, 2002]}));
    let w = waits(plan(&job, &refs(Vec::new())));
    assert_eq!(w.reason.as_str(), "DiskNotFound");
    assert!(
        w.message.contains("[2002]") && w.message.contains("spec.disks"),
        "{}",
        w.message
    );
    let mut no_disks = refs(Vec::new());
    no_disks.disks.clear();
    assert_eq!(
        waits(plan(&BackupJob::test(), &no_disks)).reason.as_str(),
        "NoDisks"
    );
}

#[test]
fn a_vm_being_backed_up_by_another_job_makes_this_one_wait() {
    let other = BackupJob::test()
        .named("web-01-b1")
        .with_status(json!({"phase": "Running", "vmName": "web-01"}));
    let w = waits(plan(&BackupJob::test(), &refs(vec![other])));
    assert_eq!(
        (w.reason.as_str(), w.reason.retry()),
        ("VMBusy", std::time::Duration::from_secs(10))
    );
    assert!(w.message.contains("web-01-b1"), "{}", w.message);
}

#[test]
fn a_full_port_range_and_an_impossible_incremental_wait() {
    let mut full = refs(Vec::new());
    full.repository = Repository::test().with_spec(json!({
        "storage": {"persistentVolumeClaim": {"claimName": "backups-data"}},
        "hub": {"portRange": {"low": 10100, "high": 10100}}
    }));
    assert_eq!(
        waits(plan(&BackupJob::test(), &full)).reason.as_str(),
        "PortsExhausted"
    );
    let incremental = BackupJob::test().with_spec(json!({"mode": "incremental"}));
    assert_eq!(
        waits(plan(&incremental, &refs(Vec::new()))).reason.as_str(),
        "IncrementalNotPossible"
    );
}

/// Job `name` of SourceNode `sn`, created at minute `minute`, with `status`.
fn job_at(name: &str, sn: &str, minute: u32, status: serde_json::Value) -> BackupJob {
    BackupJob::test()
        .named(name)
        .with_spec(json!({"sourceNodeRef": {"name": sn}}))
        .edit(|v| {
            v["metadata"]["creationTimestamp"] = json!(format!("2026-11-27T10:{minute:02}:00Z"))
        })
        .with_status(status)
}

fn running_on(ds: &str) -> serde_json::Value {
    json!({"phase": "Running", "vmName": "other", "disks": [{"deviceKey": 2000, "datastore": ds}]})
}

fn queued() -> serde_json::Value {
    json!({"phase": "Pending", "conditions": [{"type": "Running", "status": "False",
        "reason": "SourceNodeLimit", "message": "queued", "lastTransitionTime": "2026-11-27T10:00:00Z"}]})
}

fn limited(limits: serde_json::Value, jobs: Vec<BackupJob>) -> Dereferenced {
    let mut r = refs(jobs);
    r.source_node = SourceNode::test().with_spec(json!({"limits": limits}));
    r
}

#[test]
fn a_source_node_at_its_limit_queues_the_job_first_come_first_served() {
    let me = job_at("web-01-b2", "vc", 30, json!({}));
    // Two run on this SourceNode; one on another does not count.
    let r = limited(
        json!({"maxConcurrentJobs": 2}),
        vec![
            job_at("a", "vc", 1, running_on("ds")),
            job_at("b", "vc", 2, running_on("ds")),
            job_at("c", "vc-2", 3, running_on("ds")),
        ],
    );
    let w = waits(plan(&me, &r));
    assert_eq!(
        (w.reason.as_str(), w.reason.retry()),
        ("SourceNodeLimit", std::time::Duration::from_secs(10))
    );
    // The same message whoever runs and however many wait (no status write per change).
    assert!(
        w.message.contains("at most 2")
            && !w.message.contains("a, b")
            && w.message.contains("maxConcurrentJobs"),
        "{}",
        w.message
    );
    let message = w.message;
    // One slot free, but an older job waits for it: it goes first.
    let r = limited(
        json!({"maxConcurrentJobs": 2}),
        vec![
            job_at("a", "vc", 1, running_on("ds")),
            job_at("older", "vc", 10, queued()),
        ],
    );
    let w = waits(plan(&me, &r));
    assert_eq!(
        (w.reason.as_str(), &w.message),
        ("SourceNodeLimit", &message)
    );
    // A younger queued job, or an older one waiting for something else, holds no place.
    let busy = json!({"phase": "Pending", "conditions": [{"type": "Running", "status": "False",
        "reason": "VMBusy", "message": "", "lastTransitionTime": "2026-11-27T10:00:00Z"}]});
    let r = limited(
        json!({"maxConcurrentJobs": 2}),
        vec![
            job_at("a", "vc", 1, running_on("ds")),
            job_at("younger", "vc", 50, queued()),
            job_at("vm-busy", "vc", 5, busy),
            job_at("done", "vc", 6, json!({"phase": "Succeeded"})),
        ],
    );
    plan(&me, &r).expect("a free slot");
}

#[test]
fn a_datastore_at_its_limit_queues_jobs_reading_it_only() {
    let me = job_at("web-01-b2", "vc", 30, json!({}));
    let limits = json!({"maxConcurrentJobs": 8, "maxConcurrentJobsPerDatastore": 1});
    // The fixture's disks are on datastore `ds`.
    let r = limited(limits.clone(), vec![job_at("a", "vc", 1, running_on("ds"))]);
    let w = waits(plan(&me, &r));
    assert_eq!(w.reason.as_str(), "DatastoreLimit");
    assert!(
        w.message.contains("datastore ds at once") && w.message.contains("PerDatastore"),
        "{}",
        w.message
    );
    let r = limited(limits, vec![job_at("a", "vc", 1, running_on("other-ds"))]);
    let p = plan(&me, &r).expect("its datastore is free");
    assert!(
        p.disks.iter().all(|d| d.datastore.as_deref() == Some("ds")),
        "{:?}",
        p.disks
    );
}

#[test]
fn a_source_node_without_limits_runs_four_backups_at_once() {
    let me = job_at("web-01-b2", "vc", 30, json!({}));
    let jobs: Vec<BackupJob> = (0..4)
        .map(|i| job_at(&format!("j{i}"), "vc", i, running_on("ds")))
        .collect();
    let mut r = refs(jobs[..3].to_vec());
    plan(&me, &r).expect("three run: a fourth may");
    r.jobs = jobs;
    assert_eq!(waits(plan(&me, &r)).reason.as_str(), "SourceNodeLimit");
}
