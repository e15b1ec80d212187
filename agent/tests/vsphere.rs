//! The vSphere client against a real simulator (e2e/vcsim-cbt: govmomi's vcsim with disks,
//! snapshots that freeze them and CBT) over real SOAP and TLS. Each test starts its own.

mod support;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use support::vcsim::Sim;

use sendense_agent::copy::ChangedArea;
use sendense_vsphere::{Disk, Tls, VSphere, VSphereError, VmRef, VmSelector, parse_datastore_path};
use serde_json::Value;

const VM: &str = "cbt-vm-0";

async fn vm(vs: &VSphere) -> VmRef {
    vs.find_vm("DC0", &VmSelector::Name(VM.into()))
        .await
        .expect("find_vm")
}

fn disk(disks: &[Disk], key: i32) -> Disk {
    disks
        .iter()
        .find(|d| d.key == key)
        .cloned()
        .unwrap_or_else(|| panic!("disk {key} in {disks:?}"))
}

/// The CBT view of written extents: whole blocks, touching ones joined.
fn blocks_of(extents: &Value, block: u64) -> Vec<ChangedArea> {
    let mut spans: Vec<(u64, u64)> = extents
        .as_array()
        .expect("extents")
        .iter()
        .map(|e| {
            let off = e["offset"].as_u64().expect("offset");
            let len = e["length"].as_u64().expect("length");
            (off / block * block, (off + len).div_ceil(block) * block)
        })
        .collect();
    spans.sort();
    let mut out: Vec<ChangedArea> = Vec::new();
    for (start, end) in spans {
        match out.last_mut() {
            Some(last) if last.end() >= start => {
                last.length = end.max(last.end()) - last.start;
            }
            _ => out.push(ChangedArea {
                start,
                length: end - start,
            }),
        }
    }
    out
}

// ---- connecting and trust ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connects_with_sha256_thumbprint() {
    let sim = Sim::start(&[]);
    let vs = sim.connect().await;
    let about = vs.about().await.expect("about");
    assert!(about.starts_with("VMware vCenter Server 6.5"), "{about}");
    // The same pin written without colons, in lower case.
    let plain = sim.s("thumbprint").replace(':', "").to_lowercase();
    let vs2 = VSphere::connect(sim.config(Tls::Thumbprint(plain)))
        .await
        .expect("lower-case pin");
    assert_eq!(vs2.about().await.expect("about"), about);
    vs.logout().await;
    vs2.logout().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connects_with_sha1_thumbprint() {
    let sim = Sim::start(&[]);
    let vs = VSphere::connect(sim.config(Tls::Thumbprint(sim.s("thumbprint_sha1"))))
        .await
        .expect("connect with SHA-1 pin");
    vm(&vs).await;
    vs.logout().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connects_with_ca_file() {
    let sim = Sim::start(&[]);
    let ca = std::fs::read(sim.s("ca_file")).expect("CA file");
    let vs = VSphere::connect(sim.config(Tls::CaPem(ca)))
        .await
        .expect("connect trusting the CA");
    vm(&vs).await;
    vs.logout().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_trust_is_a_tls_error_naming_the_presented_certificate() {
    let sim = Sim::start(&[]);
    let real = sim.s("thumbprint");
    // Another certificate's pin: the last byte changed.
    let mut wrong = real.clone();
    wrong.replace_range(
        real.len() - 2..,
        if real.ends_with("00") { "01" } else { "00" },
    );
    match VSphere::connect(sim.config(Tls::Thumbprint(wrong.clone()))).await {
        Err(VSphereError::Tls(msg)) => {
            assert!(msg.contains(&real), "presented thumbprint missing: {msg}");
            assert!(msg.contains(&wrong), "pinned thumbprint missing: {msg}");
        }
        other => panic!("expected a TLS error, got {other:?}"),
    }
    // The server's own certificate is not a CA: trusting only it must fail, naming the
    // thumbprint presented.
    let leaf = std::fs::read(sim.s("cert_file")).expect("cert file");
    match VSphere::connect(sim.config(Tls::CaPem(leaf))).await {
        Err(VSphereError::Tls(msg)) => assert!(msg.contains(&real), "{msg}"),
        other => panic!("expected a TLS error, got {other:?}"),
    }
    // Insecure accepts it.
    let vs = VSphere::connect(sim.config(Tls::Insecure))
        .await
        .expect("insecure");
    vm(&vs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_a_login_error_that_quotes_no_credential() {
    let sim = Sim::start(&[]);
    let mut cfg = sim.pinned();
    cfg.password = "Not-The-Password-42".into();
    let shown = format!("{cfg:?}");
    assert!(!shown.contains("Not-The-Password-42"), "{shown}");
    match VSphere::connect(cfg).await {
        Err(e @ VSphereError::Login(_)) => {
            let text = format!("{e} {e:?}");
            assert!(!text.contains("Not-The-Password-42"), "{text}");
            // Not the user name either: with a Secret's keys swapped it is the password.
            assert!(!text.contains(&sim.s("username")), "{text}");
            assert!(
                text.contains("rejected the user name or its password"),
                "{text}"
            );
        }
        other => panic!("expected a login error, got {other:?}"),
    }
}

// ---- inventory ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finds_vms_by_name_and_instance_uuid() {
    let sim = Sim::start(&["-vms", "2"]);
    let vs = sim.connect().await;
    let by_name = vm(&vs).await;
    let expected = &sim.info["vms"][0];
    assert_eq!(by_name.name, VM);
    assert_eq!(by_name.moref, expected["moref"].as_str().expect("moref"));
    assert_eq!(
        by_name.instance_uuid,
        expected["instance_uuid"].as_str().expect("uuid")
    );
    let other_uuid = sim.info["vms"][1]["instance_uuid"]
        .as_str()
        .expect("uuid")
        .to_string();
    let by_uuid = vs
        .find_vm("DC0", &VmSelector::InstanceUuid(other_uuid.clone()))
        .await
        .expect("by uuid");
    assert_eq!(by_uuid.name, "cbt-vm-1");
    assert_eq!(by_uuid.instance_uuid, other_uuid);
    assert_ne!(by_uuid.moref, by_name.moref);

    for (dc, sel) in [
        ("DC0", VmSelector::Name("no-such-vm".into())),
        (
            "DC0",
            VmSelector::InstanceUuid("500c0000-0000-4000-8000-0000000000ff".into()),
        ),
        ("DC9", VmSelector::Name(VM.into())),
    ] {
        match vs.find_vm(dc, &sel).await {
            Err(VSphereError::NotFound(what)) => {
                let wanted = match &sel {
                    VmSelector::Name(n) if dc == "DC0" => n.as_str(),
                    VmSelector::InstanceUuid(u) => u.as_str(),
                    _ => dc,
                };
                assert!(what.contains(wanted), "{what}");
            }
            other => panic!("{dc} {sel:?}: expected NotFound, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_info_shows_disks_and_cbt_before_and_after_enabling() {
    let sim = Sim::start(&["-disk-size", "64M,32M"]);
    let vs = sim.connect().await;
    let vm = vm(&vs).await;
    let before = vs.vm_info(&vm).await.expect("vm_info");
    assert!(!before.cbt_enabled);
    assert!(before.snapshots.is_empty());
    assert_eq!(before.disks.len(), 2, "{:?}", before.disks);
    for (d, want) in before
        .disks
        .iter()
        .zip(sim.info["vms"][0]["disks"].as_array().expect("disks"))
    {
        assert_eq!(i64::from(d.key), want["key"].as_i64().expect("key"));
        assert_eq!(d.file_name, want["file_name"].as_str().expect("file_name"));
        assert_eq!(d.capacity, want["capacity"].as_u64().expect("capacity"));
        assert_eq!(d.change_id, None, "{d:?}");
        assert!(d.label.starts_with("Hard disk"), "{d:?}");
        assert_eq!(
            sim.datastore_file(&d.file_name).to_str(),
            want["flat_file"].as_str()
        );
    }
    assert_eq!(disk(&before.disks, 2001).capacity, 32 << 20);

    vs.enable_cbt(&vm).await.expect("enable_cbt");
    let after = vs.vm_info(&vm).await.expect("vm_info");
    assert!(after.cbt_enabled);
    for d in &after.disks {
        let id = d.change_id.as_deref().unwrap_or_else(|| panic!("{d:?}"));
        assert!(id.contains('/'), "{id}");
    }
    // Enabling again changes nothing: the change IDs stay valid.
    vs.enable_cbt(&vm).await.expect("enable_cbt again");
    assert_eq!(vs.vm_info(&vm).await.expect("vm_info").disks, after.disks);
    assert_eq!(sim.cli(&["vm"])["cbt"], Value::Bool(true));
}

// ---- snapshots ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_create_read_remove() {
    let sim = Sim::start(&[]);
    let vs = sim.connect().await;
    let vm = vm(&vs).await;
    vs.enable_cbt(&vm).await.expect("enable_cbt");
    sim.cli(&["write", "-disk", "2000", "-offset", "1M", "-data", "hello"]);
    let snap = vs
        .create_snapshot(&vm, "sendense-test", "a test", false)
        .await
        .expect("create_snapshot");
    assert_eq!(snap.name, "sendense-test");
    assert!(snap.moref.starts_with("snapshot-"), "{snap:?}");
    assert_eq!(
        vs.vm_info(&vm).await.expect("vm_info").snapshots,
        vec![snap.clone()]
    );

    let disks = vs.snapshot_disks(&snap).await.expect("snapshot_disks");
    let live = vs.vm_info(&vm).await.expect("vm_info").disks;
    assert_eq!(disks.len(), 2);
    for d in &disks {
        let live = disk(&live, d.key);
        let (_, rel) = parse_datastore_path(&live.file_name).expect("path");
        let frozen = format!(
            "[LocalDS_0] {}-{}.vmdk",
            rel.trim_end_matches(".vmdk"),
            snap.moref
        );
        assert_eq!(d.file_name, frozen);
        assert!(d.change_id.is_some(), "{d:?}");
        assert_eq!(d.capacity, live.capacity);
        let flat = sim.datastore_file(&d.file_name);
        assert!(flat.is_file(), "{} missing", flat.display());
    }
    // The frozen disk holds what was written before the snapshot.
    let frozen = sim.datastore_file(&disk(&disks, 2000).file_name);
    let bytes = std::fs::read(&frozen).expect("frozen flat file");
    assert_eq!(&bytes[1 << 20..(1 << 20) + 5], b"hello");

    vs.remove_snapshot(&snap).await.expect("remove_snapshot");
    assert!(vs.vm_info(&vm).await.expect("vm_info").snapshots.is_empty());
    assert!(!frozen.exists(), "{} left behind", frozen.display());
    match vs.remove_snapshot(&snap).await {
        Err(VSphereError::NotFound(what)) => assert!(what.contains(&snap.moref), "{what}"),
        other => panic!("removing twice: expected NotFound, got {other:?}"),
    }
    match vs.snapshot_disks(&snap).await {
        Err(VSphereError::NotFound(_)) => {}
        other => panic!("disks of a removed snapshot: expected NotFound, got {other:?}"),
    }
}

/// Removal is safe to repeat: a snapshot already gone is success, and so is one whose removal
/// another session asked for at the same time (the simulator answers the later request with
/// vCenter's TaskInProgress; a look afterwards decides).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ensuring_a_snapshot_removed_is_idempotent_and_survives_a_concurrent_removal() {
    use sendense_vsphere::Removal;
    let sim = Sim::start(&[]);
    let vs = sim.connect().await;
    let other = sim.connect().await;
    let vm = vm(&vs).await;
    let snap = vs
        .create_snapshot(&vm, "sendense-idem", "", false)
        .await
        .expect("create_snapshot");
    assert_eq!(
        vs.ensure_snapshot_removed(&vm, &snap).await.expect("first"),
        Removal::Removed
    );
    assert_eq!(
        vs.ensure_snapshot_removed(&vm, &snap).await.expect("again"),
        Removal::AlreadyGone
    );
    assert!(!vs.has_snapshot(&vm, &snap).await.expect("has_snapshot"));

    for round in 0..5 {
        let snap = vs
            .create_snapshot(&vm, &format!("sendense-race-{round}"), "", false)
            .await
            .expect("create_snapshot");
        let (a, b) = tokio::join!(
            other.remove_snapshot(&snap),
            vs.ensure_snapshot_removed(&vm, &snap)
        );
        // Each request either removed it, found it gone, or was refused while the other ran.
        for r in [a.map(|()| Removal::Removed), b] {
            match r {
                Ok(_) | Err(VSphereError::NotFound(_)) => {}
                Err(e) => assert!(
                    e.to_string().contains("TaskInProgress"),
                    "round {round}: {e}"
                ),
            }
        }
        // Asked once more, whatever happened: it is gone.
        let again = vs.ensure_snapshot_removed(&vm, &snap).await;
        assert!(again.is_ok(), "round {round}: {again:?}");
        assert!(vs.vm_info(&vm).await.expect("vm_info").snapshots.is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_leftovers_by_prefix_keeps_other_snapshots() {
    let sim = Sim::start(&[]);
    let vs = sim.connect().await;
    let vm = vm(&vs).await;
    let mut made = Vec::new();
    for name in [
        "sendense-1",
        "user-before-upgrade",
        "sendense-2",
        "sendense",
    ] {
        made.push(
            vs.create_snapshot(&vm, name, "", false)
                .await
                .expect("create_snapshot"),
        );
    }
    assert_eq!(vs.vm_info(&vm).await.expect("vm_info").snapshots, made);
    let mut removed = vs
        .remove_snapshots_with_prefix(&vm, "sendense-")
        .await
        .expect("remove by prefix");
    removed.sort_by(|a, b| a.name.cmp(&b.name));
    let names: Vec<&str> = removed.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["sendense-1", "sendense-2"]);
    let left: Vec<String> = vs
        .vm_info(&vm)
        .await
        .expect("vm_info")
        .snapshots
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(left, ["user-before-upgrade", "sendense"]);
    // The simulator agrees.
    let sim_names: Vec<String> = sim
        .cli(&["snapshots"])
        .as_array()
        .expect("snapshots")
        .iter()
        .map(|s| s["name"].as_str().expect("name").to_string())
        .collect();
    assert_eq!(sim_names.len(), 2, "{sim_names:?}");
    assert!(
        vs.remove_snapshots_with_prefix(&vm, "").await.is_err(),
        "an empty prefix must be refused"
    );
    assert_eq!(vs.vm_info(&vm).await.expect("vm_info").snapshots.len(), 2);
}

// ---- changed block tracking ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_areas_match_guest_writes_across_pages() {
    let sim = Sim::start(&["-disk-size", "1G"]);
    let block = sim.info["block_size"].as_u64().expect("block_size");
    let page_size = sim.info["page_size"].as_u64().expect("page_size") as usize;
    let vs = sim.connect().await;
    let vm = vm(&vs).await;
    vs.enable_cbt(&vm).await.expect("enable_cbt");
    let base = vs
        .create_snapshot(&vm, "sendense-base", "", false)
        .await
        .expect("snapshot");
    let base_disk = disk(&vs.snapshot_disks(&base).await.expect("disks"), 2000);
    let base_id = base_disk.change_id.clone().expect("change id at base");
    assert!(
        vs.changed_areas(&vm, &base, &base_disk, "*")
            .await
            .expect("allocated at base")
            .is_empty(),
        "nothing written yet"
    );

    let written = sim.cli(&[
        "fill",
        "-disk",
        "2000",
        "-pattern",
        "fragmented",
        "-seed",
        "7",
        "-count",
        "5000",
        "-size",
        "4K",
    ]);
    let expected = blocks_of(&written["extents"], block);
    assert_eq!(expected.len(), 5000);
    // Written to the other disk too: must not show up on 2000.
    sim.cli(&[
        "write",
        "-disk",
        "2001",
        "-offset",
        "0",
        "-data",
        "other disk",
    ]);

    let next = vs
        .create_snapshot(&vm, "sendense-next", "", false)
        .await
        .expect("snapshot");
    let next_disk = disk(&vs.snapshot_disks(&next).await.expect("disks"), 2000);
    assert_ne!(next_disk.change_id.as_deref(), Some(base_id.as_str()));

    // One page is not the whole answer.
    let first = vs
        .query_changed_disk_areas(&vm, &next, 2000, 0, &base_id)
        .await
        .expect("first page");
    assert_eq!(first.start_offset, 0);
    assert!(first.areas.len() <= page_size && !first.areas.is_empty());
    assert!(
        first.length < next_disk.capacity,
        "{first:?} should be one page of several"
    );
    assert_eq!(first.areas[..], expected[..first.areas.len()]);

    let changed = vs
        .changed_areas(&vm, &next, &next_disk, &base_id)
        .await
        .expect("changed areas");
    assert_eq!(changed, expected);
    // Pages listing their areas out of order (vCenter sorts them; nothing promises it) give
    // the same areas, none dropped or joined wrongly.
    sim.unsorted_pages(VM, true);
    let unsorted = vs
        .changed_areas(&vm, &next, &next_disk, &base_id)
        .await
        .expect("changed areas from unsorted pages");
    assert_eq!(unsorted.len(), expected.len(), "areas from unsorted pages");
    assert!(unsorted == expected, "areas from unsorted pages differ");
    sim.unsorted_pages(VM, false);
    let allocated = vs
        .changed_areas(&vm, &next, &next_disk, "*")
        .await
        .expect("allocated areas");
    assert_eq!(allocated, expected);
    // Since the snapshot's own change ID: nothing.
    let none = vs
        .changed_areas(
            &vm,
            &next,
            &next_disk,
            next_disk.change_id.as_deref().expect("id"),
        )
        .await
        .expect("no changes");
    assert!(none.is_empty(), "{none:?}");

    // Writes after `next` are not in `next`, and an incremental from it sees only them.
    let later = sim.cli(&["write", "-disk", "2000", "-offset", "3M", "-data", "late"]);
    let last = vs
        .create_snapshot(&vm, "sendense-last", "", false)
        .await
        .expect("snapshot");
    let last_disk = disk(&vs.snapshot_disks(&last).await.expect("disks"), 2000);
    let incremental = vs
        .changed_areas(
            &vm,
            &last,
            &last_disk,
            next_disk.change_id.as_deref().expect("id"),
        )
        .await
        .expect("incremental");
    assert_eq!(incremental, blocks_of(&later["extents"], block));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_change_ids_are_reported_as_invalid() {
    let sim = Sim::start(&[]);
    let vs = sim.connect().await;
    let vm = vm(&vs).await;

    // CBT off: a fault, not a stale change ID.
    let off = vs
        .create_snapshot(&vm, "sendense-off", "", false)
        .await
        .expect("snapshot");
    match vs.query_changed_disk_areas(&vm, &off, 2000, 0, "*").await {
        Err(VSphereError::Fault { fault, .. }) => assert_eq!(fault, "FileFault"),
        other => panic!("CBT off: expected FileFault, got {other:?}"),
    }
    vs.remove_snapshot(&off).await.expect("remove");

    vs.enable_cbt(&vm).await.expect("enable_cbt");
    let old = vs
        .create_snapshot(&vm, "sendense-old", "", false)
        .await
        .expect("snapshot");
    let old_disks = vs.snapshot_disks(&old).await.expect("disks");
    let old_2000 = disk(&old_disks, 2000).change_id.expect("id");
    let old_2001 = disk(&old_disks, 2001).change_id.expect("id");
    vs.remove_snapshot(&old).await.expect("remove");

    // CBT reset of disk 2000.
    sim.cli(&["cbt", "-reset", "-disk", "2000"]);
    let now = vs
        .create_snapshot(&vm, "sendense-now", "", false)
        .await
        .expect("snapshot");
    let now_disks = vs.snapshot_disks(&now).await.expect("disks");
    match vs
        .changed_areas(&vm, &now, &disk(&now_disks, 2000), &old_2000)
        .await
    {
        Err(VSphereError::InvalidChangeId {
            device_key,
            change_id,
            message,
        }) => {
            assert_eq!(device_key, 2000);
            assert_eq!(change_id, old_2000);
            assert!(message.contains("changeId"), "{message}");
        }
        other => panic!("after a CBT reset: expected InvalidChangeId, got {other:?}"),
    }
    // Disk 2001 was not reset: its old change ID is still good.
    vs.changed_areas(&vm, &now, &disk(&now_disks, 2001), &old_2001)
        .await
        .expect("untouched disk keeps its change ID");
    // A change ID ahead of the snapshot is refused too.
    let ahead = format!("{}/999", old_2001.rsplit_once('/').expect("uuid/n").0);
    assert!(matches!(
        vs.query_changed_disk_areas(&vm, &now, 2001, 0, &ahead)
            .await,
        Err(VSphereError::InvalidChangeId {
            device_key: 2001,
            ..
        })
    ));
    vs.remove_snapshot(&now).await.expect("remove");

    // A resize of disk 2001 (no snapshots may exist) invalidates its change IDs.
    sim.cli(&["resize", "-disk", "2001", "-capacity", "128M"]);
    let grown = vs
        .create_snapshot(&vm, "sendense-grown", "", false)
        .await
        .expect("snapshot");
    let grown_2001 = disk(&vs.snapshot_disks(&grown).await.expect("disks"), 2001);
    assert_eq!(grown_2001.capacity, 128 << 20);
    match vs.changed_areas(&vm, &grown, &grown_2001, &old_2001).await {
        Err(VSphereError::InvalidChangeId { device_key, .. }) => assert_eq!(device_key, 2001),
        other => panic!("after a resize: expected InvalidChangeId, got {other:?}"),
    }
}

// ---- sessions and deadlines ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_in_again_when_the_session_is_gone() {
    let sim = Sim::start(&[]);
    let vs = std::sync::Arc::new(sim.connect().await);
    let admin = sim.connect().await;
    let key = vs.session_key().await.expect("session key");
    // What expiry looks like to the client: the server forgets the session.
    admin
        .terminate_sessions(std::slice::from_ref(&key))
        .await
        .expect("terminate");
    // Several callers at once see the session gone; each call still succeeds.
    let calls: Vec<_> = (0..4)
        .map(|_| {
            let vs = vs.clone();
            tokio::spawn(async move { vm(&vs).await })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.expect("task").name, VM);
    }
    let new_key = vs.session_key().await.expect("session key");
    assert_ne!(new_key, key, "a new session was expected");

    // Every kind of call notices: a probe, a property read, a session query.
    let mut key = new_key;
    for probe in ["about", "vm_info", "session_key"] {
        admin
            .terminate_sessions(std::slice::from_ref(&key))
            .await
            .expect("terminate");
        match probe {
            "about" => assert!(vs.about().await.expect(probe).contains("vCenter")),
            "vm_info" => assert_eq!(
                vs.vm_info(&vm(&admin).await)
                    .await
                    .expect(probe)
                    .disks
                    .len(),
                2
            ),
            _ => {}
        }
        let next = vs.session_key().await.expect("session key");
        assert_ne!(next, key, "{probe}: a new session was expected");
        key = next;
    }
    // Credentials in Debug output? Never.
    let shown = format!("{vs:?}");
    assert!(!shown.contains(&sim.s("password")), "{shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_fail_within_the_deadline_when_the_server_stops() {
    // A missing deadline must fail this test, not hang it.
    tokio::time::timeout(Duration::from_secs(60), deadlines())
        .await
        .expect("the calls hung: a deadline is missing");
}

async fn deadlines() {
    let sim = Sim::start(&[]);
    let mut cfg = sim.pinned();
    cfg.call_timeout = Duration::from_secs(2);
    let vs = VSphere::connect(cfg.clone()).await.expect("connect");
    let vm = vm(&vs).await;

    // Stopped (SIGSTOP): the socket accepts, nothing answers.
    sim.signal("STOP");
    let started = Instant::now();
    let result = vs.vm_info(&vm).await;
    let took = started.elapsed();
    sim.signal("CONT");
    match result {
        Err(VSphereError::Timeout { after, .. }) => assert_eq!(after, cfg.call_timeout),
        other => panic!("stopped server: expected a timeout, got {other:?}"),
    }
    assert!(took < Duration::from_secs(5), "took {took:?}");

    // Gone: refused at once.
    let mut sim = sim;
    let _ = sim.child.kill();
    let _ = sim.child.wait();
    let started = Instant::now();
    match vs.vm_info(&vm).await {
        Err(VSphereError::Transport(_) | VSphereError::Timeout { .. }) => {}
        other => panic!("dead server: expected a transport error, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    let started = Instant::now();
    assert!(VSphere::connect(cfg.clone()).await.is_err());
    assert!(started.elapsed() < Duration::from_secs(5));

    // A listener that accepts and never speaks TLS: connect gives up in time.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    cfg.url = format!(
        "https://127.0.0.1:{}/sdk",
        silent.local_addr().expect("addr").port()
    );
    let started = Instant::now();
    match VSphere::connect(cfg.clone()).await {
        Err(VSphereError::Timeout { .. }) => {}
        other => panic!("silent server: expected a timeout, got {other:?}"),
    }
    assert!(started.elapsed() < cfg.call_timeout * 2 + Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_logout_calls_fail() {
    let sim = Sim::start(&[]);
    let vs = sim.connect().await;
    let vm = vm(&vs).await;
    vs.logout().await;
    assert!(vs.vm_info(&vm).await.is_err());
    assert!(
        vs.find_vm("DC0", &VmSelector::Name(VM.into()))
            .await
            .is_err()
    );
}

// ---- logs ----

/// Everything logged in this test process (tracing, and the `log` records of vim_rs, reqwest and
/// hyper through the tracing-log bridge), at every level.
fn captured_logs() -> &'static std::sync::Mutex<Vec<u8>> {
    static LOGS: OnceLock<&'static std::sync::Mutex<Vec<u8>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs: &'static std::sync::Mutex<Vec<u8>> =
            Box::leak(Box::new(std::sync::Mutex::new(Vec::new())));
        struct Sink(&'static std::sync::Mutex<Vec<u8>>);
        impl std::io::Write for Sink {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().expect("logs").extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || Sink(logs))
            .try_init()
            .expect("the only subscriber of this test binary");
        logs
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_never_reach_the_logs() {
    let logs = captured_logs();
    let password = "Sendense-Secret-7f3a";
    let wrong = "Wrong-Secret-9c1e";
    let sim = Sim::start(&["-password", password]);
    assert_eq!(sim.s("password"), password);

    let mut bad = sim.pinned();
    bad.password = wrong.into();
    assert!(matches!(
        VSphere::connect(bad).await,
        Err(VSphereError::Login(_))
    ));
    let vs = sim.connect().await;
    let vm = vm(&vs).await;
    // A re-login sends the password again.
    let key = vs.session_key().await.expect("key");
    sim.connect()
        .await
        .terminate_sessions(&[key])
        .await
        .expect("terminate");
    vs.vm_info(&vm).await.expect("after re-login");
    let snap = vs
        .create_snapshot(&vm, "sendense-log", "", false)
        .await
        .expect("snapshot");
    vs.remove_snapshot(&snap).await.expect("remove");
    vs.logout().await;

    let text = String::from_utf8_lossy(&logs.lock().expect("logs")).into_owned();
    // The capture works: our own lines and vim_rs' wire summaries (a `log` crate record) are in.
    assert!(text.contains("logged in to vCenter again"), "{text}");
    assert!(text.contains("method=Login"), "vim_rs records missing");
    assert!(!text.contains(password), "the password was logged");
    assert!(!text.contains(wrong), "the wrong password was logged");
}
