//! What a restore to vSphere asks of the vSphere client, against a real simulator
//! (e2e/vcsim-cbt): creating VMs with new thin disks, reading their state, destroying them and
//! resetting CBT. Each test starts its own simulator.

mod support;

use support::vcsim::Sim;

use sendense_vsphere::{
    Hardware, NewVm, PowerState, VSphere, VSphereError, VmRef, VmSelector, parse_datastore_path,
};

const DS: &str = "LocalDS_0";

fn new_vm(name: &str, disks: Vec<u64>) -> NewVm {
    NewVm {
        name: name.into(),
        folder: None,
        resource_pool: None,
        datastore: DS.into(),
        hardware: Hardware {
            num_cpus: 2,
            memory_mib: 1024,
            guest_id: "ubuntu64Guest".into(),
            firmware: Some("efi".into()),
        },
        disks,
        annotation: "sendense.io/restore-job: 0b6f-42".into(),
        change_tracking: false,
    }
}

async fn find(vs: &VSphere, name: &str) -> Result<VmRef, VSphereError> {
    vs.find_vm("DC0", &VmSelector::Name(name.into())).await
}

fn not_found(result: Result<VmRef, VSphereError>) -> String {
    match result {
        Err(VSphereError::NotFound(what)) => what,
        other => panic!("expected NotFound, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn created_vm_has_its_hardware_and_real_thin_disks_and_destroying_it_deletes_them() {
    let sim = Sim::start(&[]);
    let vs = sim.connect().await;
    vs.create_vm_folder("DC0", "restored/2025")
        .await
        .expect("create_vm_folder");
    // Again: existing folders are fine.
    vs.create_vm_folder("DC0", "restored/2025")
        .await
        .expect("create_vm_folder again");
    let mut spec = new_vm("restored-web", vec![64 << 20, 32 << 20]);
    spec.folder = Some("restored/2025".into());
    spec.resource_pool = Some("DC0_C0".into());
    let vm = vs.create_vm("DC0", &spec).await.expect("create_vm");
    assert_eq!(vm.name, "restored-web");
    assert!(vm.moref.starts_with("vm-"), "{vm:?}");
    assert!(!vm.instance_uuid.is_empty(), "{vm:?}");
    assert_eq!(find(&vs, "restored-web").await.expect("find_vm"), vm);

    let state = vs.vm_state(&vm).await.expect("vm_state");
    assert_eq!(state.power_state, PowerState::PoweredOff);
    assert_eq!(state.hardware, spec.hardware);
    assert_eq!(state.annotation, spec.annotation);

    let info = vs.vm_info(&vm).await.expect("vm_info");
    assert!(!info.cbt_enabled);
    assert!(info.snapshots.is_empty());
    let capacities: Vec<u64> = info.disks.iter().map(|d| d.capacity).collect();
    assert_eq!(capacities, spec.disks);
    let mut flats = Vec::new();
    for d in &info.disks {
        let (ds, rel) = parse_datastore_path(&d.file_name).expect("datastore path");
        assert_eq!(ds, DS, "{d:?}");
        assert!(rel.starts_with("restored-web/"), "{d:?}");
        assert_eq!(d.change_id, None, "{d:?}");
        let flat = sim.datastore_file(&d.file_name);
        let meta = std::fs::metadata(&flat).unwrap_or_else(|e| panic!("{}: {e}", flat.display()));
        assert_eq!(meta.len(), d.capacity, "{}", flat.display());
        flats.push(flat);
    }
    // The simulator sees them as the VM's disks too.
    let sim_vm = sim.cli(&["vm", "-vm", "restored-web"]);
    assert_eq!(sim_vm["disks"].as_array().expect("disks").len(), 2);

    // The same name again, wherever it would go: refused, saying so.
    for folder in [None, Some("restored/2025")] {
        let mut again = new_vm("restored-web", vec![1 << 20]);
        again.folder = folder.map(String::from);
        match vs.create_vm("DC0", &again).await {
            Err(e @ VSphereError::Fault { .. }) => {
                assert_eq!(e.fault_type(), Some("DuplicateName"), "{e}");
                let text = e.to_string();
                assert!(text.contains("\"restored-web\" already exists"), "{text}");
                assert!(text.contains(&vm.moref), "{text}");
            }
            other => panic!("a second VM of the same name: {other:?}"),
        }
    }

    vs.destroy_vm(&vm).await.expect("destroy_vm");
    not_found(find(&vs, "restored-web").await);
    for flat in &flats {
        assert!(!flat.exists(), "{} left behind", flat.display());
    }
    match vs.destroy_vm(&vm).await {
        Err(VSphereError::NotFound(what)) => assert!(what.contains(&vm.moref), "{what}"),
        other => panic!("destroying twice: expected NotFound, got {other:?}"),
    }
    match vs.vm_state(&vm).await {
        Err(VSphereError::NotFound(_)) => {}
        other => panic!("state of a destroyed VM: expected NotFound, got {other:?}"),
    }
    // The name is free again.
    let again = vs
        .create_vm("DC0", &new_vm("restored-web", vec![1 << 20]))
        .await
        .expect("create_vm after destroy");
    assert_ne!(again.moref, vm.moref);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placements_resolve_and_missing_ones_are_not_found_naming_them() {
    let sim = Sim::start(&[]);
    let vs = sim.connect().await;
    vs.create_vm_folder("DC0", "restored")
        .await
        .expect("create_vm_folder");

    // Every way of naming a pool: the default, a cluster, a standalone host, the cluster's
    // root pool as a path, a host of the cluster by name and by path.
    for (i, pool) in [
        None,
        Some("DC0_C0"),
        Some("DC0_H0"),
        Some("DC0_C0/Resources"),
        Some("DC0_C0_H1"),
        Some("DC0_C0/DC0_C0_H2"),
    ]
    .into_iter()
    .enumerate()
    {
        let mut spec = new_vm(&format!("placed-{i}"), vec![1 << 20]);
        spec.resource_pool = pool.map(String::from);
        spec.folder = Some("/restored/".into());
        let vm = vs
            .create_vm("DC0", &spec)
            .await
            .unwrap_or_else(|e| panic!("pool {pool:?}: {e}"));
        assert_eq!(find(&vs, &spec.name).await.expect("find_vm"), vm);
    }

    let missing = |f: fn(&mut NewVm)| {
        let mut spec = new_vm("nowhere", vec![1 << 20]);
        f(&mut spec);
        spec
    };
    for (spec, wanted) in [
        (
            missing(|s| s.datastore = "NoSuchDS".into()),
            "datastore \"NoSuchDS\" in datacenter \"DC0\"",
        ),
        (
            missing(|s| s.folder = Some("restored/nope".into())),
            "folder \"restored/nope\" in datacenter \"DC0\"",
        ),
        (
            missing(|s| s.folder = Some("nope".into())),
            "folder \"nope\" in datacenter \"DC0\"",
        ),
        (
            missing(|s| s.resource_pool = Some("DC0_C0/Resources/nope".into())),
            "resource pool \"DC0_C0/Resources/nope\" in datacenter \"DC0\"",
        ),
        (
            missing(|s| s.resource_pool = Some("NoCluster".into())),
            "resource pool \"NoCluster\" in datacenter \"DC0\"",
        ),
    ] {
        let what = not_found(vs.create_vm("DC0", &spec).await);
        assert!(what.contains(wanted), "{what:?} should contain {wanted:?}");
    }
    // A folder path that names something else.
    let mut spec = new_vm("nowhere", vec![1 << 20]);
    spec.folder = Some("restored/placed-0".into());
    let what = not_found(vs.create_vm("DC0", &spec).await);
    assert!(what.contains("\"restored/placed-0\""), "{what}");
    assert!(what.contains("VirtualMachine"), "{what}");

    let what = not_found(vs.create_vm("DC9", &new_vm("nowhere", vec![])).await);
    assert!(what.contains("datacenter \"DC9\""), "{what}");
    // Nothing was made by the failures.
    not_found(find(&vs, "nowhere").await);
    assert!(
        !std::path::Path::new(&sim.info["datastores"][DS].as_str().expect("ds"))
            .join("nowhere")
            .exists()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_of_a_powered_on_vm_and_destroying_it_is_refused() {
    let sim = Sim::start(&[]);
    let vs = sim.connect().await;
    let vm = find(&vs, "cbt-vm-0").await.expect("find_vm");
    let state = vs.vm_state(&vm).await.expect("vm_state");
    assert_eq!(state.power_state, PowerState::PoweredOn);
    assert_eq!(state.hardware.num_cpus, 1);
    assert_eq!(state.hardware.memory_mib, 256);
    assert_eq!(state.hardware.guest_id, "otherGuest64");
    assert_eq!(state.annotation, "");

    match vs.destroy_vm(&vm).await {
        Err(e @ VSphereError::Fault { .. }) => {
            assert_eq!(e.fault_type(), Some("InvalidPowerState"), "{e}");
            let text = e.to_string();
            assert!(
                text.contains("cbt-vm-0") && text.contains("poweredOn"),
                "{text}"
            );
        }
        other => panic!("destroying a powered-on VM: {other:?}"),
    }
    assert_eq!(find(&vs, "cbt-vm-0").await.expect("still there"), vm);
    let disks = vs.vm_info(&vm).await.expect("vm_info").disks;
    for d in &disks {
        assert!(sim.datastore_file(&d.file_name).is_file(), "{d:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cbt_reset_invalidates_change_ids_issued_before() {
    let sim = Sim::start(&[]);
    let vs = sim.connect().await;
    let mut spec = new_vm("restored-cbt", vec![16 << 20, 8 << 20]);
    spec.change_tracking = true;
    let vm = vs.create_vm("DC0", &spec).await.expect("create_vm");
    let info = vs.vm_info(&vm).await.expect("vm_info");
    assert!(info.cbt_enabled);
    for d in &info.disks {
        assert!(d.change_id.is_some(), "CBT on at creation: {d:?}");
    }
    let key = info.disks[0].key;

    // Data written into the flat file behind CBT's back (as a restore through the datastore).
    let flat = sim.datastore_file(&info.disks[0].file_name);
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&flat)
            .expect("open flat file");
        f.seek(SeekFrom::Start(1 << 20)).expect("seek");
        f.write_all(b"restored bytes").expect("write");
    }
    let before = vs
        .create_snapshot(&vm, "sendense-before", "", false)
        .await
        .expect("snapshot");
    let old = vs.snapshot_disks(&before).await.expect("disks");
    let old_id = old
        .iter()
        .find(|d| d.key == key)
        .and_then(|d| d.change_id.clone())
        .expect("change ID");
    vs.remove_snapshot(&before).await.expect("remove");

    vs.reset_cbt(&vm).await.expect("reset_cbt");
    let after_info = vs.vm_info(&vm).await.expect("vm_info");
    assert!(after_info.cbt_enabled, "CBT is on again after the reset");
    let new_id = after_info.disks[0].change_id.clone().expect("change ID");
    assert_ne!(
        new_id.rsplit_once('/').map(|p| p.0),
        old_id.rsplit_once('/').map(|p| p.0),
        "a new tracking uuid"
    );

    let after = vs
        .create_snapshot(&vm, "sendense-after", "", false)
        .await
        .expect("snapshot");
    match vs
        .query_changed_disk_areas(&vm, &after, key, 0, &old_id)
        .await
    {
        Err(VSphereError::InvalidChangeId {
            device_key,
            change_id,
            ..
        }) => {
            assert_eq!(device_key, key);
            assert_eq!(change_id, old_id);
        }
        other => {
            panic!("a change ID from before the reset: expected InvalidChangeId, got {other:?}")
        }
    }
    // "*" still reads the data written behind CBT's back.
    let all = vs
        .query_changed_disk_areas(&vm, &after, key, 0, "*")
        .await
        .expect("all allocated areas");
    assert!(
        all.areas
            .iter()
            .any(|a| a.start <= 1 << 20 && a.start + a.length > 1 << 20),
        "{all:?}"
    );
    vs.remove_snapshot(&after).await.expect("remove");
    vs.destroy_vm(&vm).await.expect("destroy_vm");
    assert!(!flat.exists(), "{} left behind", flat.display());
}
