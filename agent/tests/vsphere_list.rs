//! What a backup schedule asks of the vSphere client when it selects VMs, against a real
//! simulator (e2e/vcsim-cbt): every VM of a datacenter with its folder path, instance UUID,
//! custom attributes, template flag and power state. Each test starts its own simulator, whose
//! inventory holds one powered-on VM, `cbt-vm-0`, in the datacenter's VM folder.

mod support;

use std::collections::BTreeMap;

use support::vcsim::Sim;

use sendense_vsphere::{
    Hardware, NewVm, PowerState, VSphere, VSphereError, VmListing, VmRef, VmSelector,
};

const DC: &str = "DC0";

async fn create(vs: &VSphere, name: &str, folder: Option<&str>) -> VmRef {
    let spec = NewVm {
        name: name.into(),
        folder: folder.map(String::from),
        resource_pool: None,
        datastore: "LocalDS_0".into(),
        hardware: Hardware {
            num_cpus: 1,
            memory_mib: 256,
            guest_id: "otherGuest64".into(),
            firmware: None,
        },
        disks: vec![1 << 20],
        annotation: String::new(),
        change_tracking: false,
    };
    vs.create_vm(DC, &spec)
        .await
        .unwrap_or_else(|e| panic!("create_vm {name}: {e}"))
}

async fn list(vs: &VSphere) -> Vec<VmListing> {
    vs.list_vms(DC).await.expect("list_vms")
}

fn by_name<'a>(listing: &'a [VmListing], name: &str) -> &'a VmListing {
    listing
        .iter()
        .find(|l| l.vm.name == name)
        .unwrap_or_else(|| panic!("{name} not listed: {listing:#?}"))
}

fn attributes(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_vm_is_listed_with_its_folder_path_and_instance_uuid_and_a_new_vm_in_the_next_listing()
 {
    let sim = Sim::start(&[]);
    let vs = sim.connect().await;
    vs.create_vm_folder(DC, "prod/web")
        .await
        .expect("create_vm_folder");
    let db = create(&vs, "db-1", Some("prod")).await;
    let web1 = create(&vs, "web-1", Some("prod/web")).await;
    let web2 = create(&vs, "web-2", Some("prod/web")).await;
    let loose = create(&vs, "loose", None).await;
    let seeded = vs
        .find_vm(DC, &VmSelector::Name("cbt-vm-0".into()))
        .await
        .expect("find_vm cbt-vm-0");

    let first = list(&vs).await;
    let seen: Vec<(&str, &str)> = first
        .iter()
        .map(|l| (l.folder.as_str(), l.vm.name.as_str()))
        .collect();
    // Sorted by folder, then name.
    assert_eq!(
        seen,
        vec![
            ("", "cbt-vm-0"),
            ("", "loose"),
            ("prod", "db-1"),
            ("prod/web", "web-1"),
            ("prod/web", "web-2"),
        ]
    );
    for (vm, folder) in [
        (&seeded, ""),
        (&loose, ""),
        (&db, "prod"),
        (&web1, "prod/web"),
        (&web2, "prod/web"),
    ] {
        let listed = by_name(&first, &vm.name);
        // The same moref, name and instance UUID as the lookup or creation answered.
        assert_eq!(&listed.vm, vm);
        assert!(!listed.vm.instance_uuid.is_empty(), "{listed:?}");
        assert_eq!(listed.folder, folder, "{listed:?}");
        assert!(!listed.template, "{listed:?}");
        assert!(listed.attributes.is_empty(), "{listed:?}");
    }
    assert_eq!(by_name(&first, "cbt-vm-0").power, PowerState::PoweredOn);
    assert_eq!(by_name(&first, "web-1").power, PowerState::PoweredOff);
    vs.set_power(&web1, true).await.expect("power on web-1");

    // The selection is evaluated at each run: the inventory as it is now.
    let web3 = create(&vs, "web-3", Some("prod/web")).await;
    let second = list(&vs).await;
    assert_eq!(second.len(), 6, "{second:#?}");
    let listed = by_name(&second, "web-3");
    assert_eq!(listed.vm, web3);
    assert_eq!(listed.folder, "prod/web");
    assert_eq!(by_name(&second, "web-1").power, PowerState::PoweredOn);
    for earlier in &first {
        let now = by_name(&second, &earlier.vm.name);
        assert_eq!((&now.vm, &now.folder), (&earlier.vm, &earlier.folder));
    }

    match vs.list_vms("DC-missing").await {
        Err(VSphereError::NotFound(what)) => assert!(what.contains("DC-missing"), "{what}"),
        other => panic!("listing an unknown datacenter: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_attribute_set_on_two_vms_is_listed_on_those_two_only() {
    let sim = Sim::start(&[]);
    let vs = sim.connect().await;
    let a = create(&vs, "app-a", None).await;
    let b = create(&vs, "app-b", None).await;
    create(&vs, "app-c", None).await;

    // The first set defines the field; the second reuses it.
    vs.set_custom_attribute(&a, "backup-policy", "gold")
        .await
        .expect("set on app-a");
    vs.set_custom_attribute(&b, "backup-policy", "silver")
        .await
        .expect("set on app-b");
    let listing = list(&vs).await;
    assert_eq!(
        by_name(&listing, "app-a").attributes,
        attributes(&[("backup-policy", "gold")])
    );
    assert_eq!(
        by_name(&listing, "app-b").attributes,
        attributes(&[("backup-policy", "silver")])
    );
    for other in ["app-c", "cbt-vm-0"] {
        assert!(
            by_name(&listing, other).attributes.is_empty(),
            "{:?}",
            by_name(&listing, other)
        );
    }

    // Setting again replaces the value; a second attribute sits beside the first.
    vs.set_custom_attribute(&a, "backup-policy", "bronze")
        .await
        .expect("set app-a again");
    vs.set_custom_attribute(&a, "owner", "team-shop")
        .await
        .expect("set owner");
    let listing = list(&vs).await;
    assert_eq!(
        by_name(&listing, "app-a").attributes,
        attributes(&[("backup-policy", "bronze"), ("owner", "team-shop")])
    );
    assert_eq!(
        by_name(&listing, "app-b").attributes,
        attributes(&[("backup-policy", "silver")])
    );
    assert!(by_name(&listing, "app-c").attributes.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_is_listed_and_flagged_as_one() {
    let sim = Sim::start(&[]);
    let vs = sim.connect().await;
    let golden = create(&vs, "golden-image", None).await;
    vs.mark_as_template(&golden)
        .await
        .expect("mark_as_template");
    let seeded = vs
        .find_vm(DC, &VmSelector::Name("cbt-vm-0".into()))
        .await
        .expect("find_vm cbt-vm-0");
    // vSphere makes templates of powered-off VMs only.
    match vs.mark_as_template(&seeded).await {
        Err(e) => assert_eq!(e.fault_type(), Some("InvalidPowerState"), "{e}"),
        Ok(()) => panic!("a powered-on VM was marked as a template"),
    }

    let listing = list(&vs).await;
    let template = by_name(&listing, "golden-image");
    assert!(template.template, "{template:?}");
    assert_eq!(template.vm, golden);
    assert_eq!(template.power, PowerState::PoweredOff);
    assert!(!by_name(&listing, "cbt-vm-0").template);
}
