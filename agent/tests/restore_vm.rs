//! `sendense-agent restore-vm` against a real simulator (e2e/vcsim-cbt), without Kubernetes:
//! a disk's state at a snapshot (made a QCOW2 restore point by qemu-img) restored into a new VM
//! and back into the VM in place, only the blocks changed since written, past the temporary
//! snapshot a dead attempt left; and the refusals that write nothing.

mod support;

use std::process::{Command, Stdio};

use serde_json::Value;
use support::vcsim::Sim;

use sendense_vsphere::{VmRef, VmSelector};

const VM: &str = "cbt-vm-0";

fn restore_vm(sim: &Sim, extra: &[&str]) -> (bool, Value, String) {
    let ds = sim.info["datastores"]["LocalDS_0"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let out = Command::new(env!("CARGO_BIN_EXE_sendense-agent"))
        .args([
            "restore-vm",
            "--vcenter",
            &sim.s("url"),
            "--datacenter",
            "DC0",
        ])
        .args([
            "--thumbprint",
            &sim.s("thumbprint"),
            "--request-timeout",
            "20",
        ])
        .arg("--datastore")
        .arg(format!("LocalDS_0={ds}"))
        .args(extra)
        .env("SENDENSE_VCENTER_USERNAME", sim.s("username"))
        .env("SENDENSE_VCENTER_PASSWORD", sim.s("password"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .expect("sendense-agent runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let result: Value = serde_json::from_str(stdout.lines().last().unwrap_or("null"))
        .unwrap_or_else(|e| panic!("a JSON result: {e}: {stdout}"));
    (
        out.status.success(),
        result,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn checksum(sim: &Sim, vm: &str, key: i64) -> String {
    sim.cli(&["checksum", "-vm", vm, "-disk", &key.to_string()])["sha256"]
        .as_str()
        .expect("sha256")
        .to_owned()
}

async fn find(sim: &Sim, name: &str) -> VmRef {
    sim.connect()
        .await
        .find_vm("DC0", &VmSelector::Name(name.into()))
        .await
        .expect("find_vm")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_point_restores_into_a_new_vm_and_in_place_writing_only_what_changed() {
    let sim = Sim::start(&["-disks", "1", "-disk-size", "16MiB"]);
    let vs = sim.connect().await;
    let vm = find(&sim, VM).await;
    vs.enable_cbt(&vm).await.expect("CBT on");
    sim.cli(&[
        "fill", "-vm", VM, "-disk", "2000", "-pattern", "random", "-seed", "1", "-count", "64",
        "-size", "64K",
    ]);

    // The restore point: the disk at a snapshot, as a QCOW2.
    let snap = vs
        .create_snapshot(&vm, "point", "the restore point", false)
        .await
        .expect("snapshot");
    let frozen = vs.snapshot_disks(&snap).await.expect("snapshot disks");
    let change_id = frozen[0].change_id.clone().expect("a change ID");
    let point_sum =
        sim.cli(&["checksum", "-vm", VM, "-disk", "2000", "-snapshot", "point"])["sha256"]
            .as_str()
            .expect("sha256")
            .to_owned();
    let dir = sim.dir.join("points");
    std::fs::create_dir_all(&dir).expect("dir");
    let qcow2 = dir.join("2000.qcow2");
    let st = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(sim.datastore_file(&frozen[0].file_name))
        .arg(&qcow2)
        .status()
        .expect("qemu-img");
    assert!(st.success());
    vs.remove_snapshot(&snap).await.expect("remove snapshot");
    // The guest goes on: a few blocks change after the point.
    sim.cli(&[
        "fill",
        "-vm",
        VM,
        "-disk",
        "2000",
        "-pattern",
        "fragmented",
        "-seed",
        "2",
        "-count",
        "3",
        "-size",
        "4K",
        "-offset",
        "1M",
    ]);
    let source = format!("2000:{}", qcow2.display());
    let expect = format!("2000:{point_sum}");

    // Into a new VM.
    let (ok, r, err) = restore_vm(
        &sim,
        &[
            "--source",
            &source,
            "--expect-sha256",
            &expect,
            "--new-vm",
            "restored",
            "--target-datastore",
            "LocalDS_0",
            "--tag",
            "t1",
            "--cpus",
            "2",
        ],
    );
    assert!(ok, "{r}\n{err}");
    assert_eq!(r["vm"]["created"], true, "{r}");
    assert_eq!(r["disks"][0]["verified"], true, "{r}");
    let key = sim.cli(&["vm", "-vm", "restored"])["disks"][0]["key"]
        .as_i64()
        .expect("key");
    assert_eq!(checksum(&sim, "restored", key), point_sum);

    // The same name: refused, the VM untouched.
    let (ok, r, _) = restore_vm(
        &sim,
        &[
            "--source",
            &source,
            "--new-vm",
            "restored",
            "--target-datastore",
            "LocalDS_0",
            "--tag",
            "t-other",
        ],
    );
    assert!(!ok);
    assert_eq!(
        (r["refused"].as_str(), r["nothingWritten"].as_bool()),
        (Some("VmExists"), Some(true)),
        "{r}"
    );

    // In place while the VM runs: refused, nothing written.
    let live = checksum(&sim, VM, 2000);
    assert_ne!(live, point_sum);
    let in_place = |tag: &'static str| {
        vec![
            "--source".to_owned(),
            source.clone(),
            "--vm".into(),
            VM.into(),
            "--tag".into(),
            tag.into(),
            "--since-change-id".into(),
            format!("2000:{change_id}"),
            "--expect-sha256".into(),
            expect.clone(),
        ]
    };
    let args = in_place("t2");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, r, _) = restore_vm(&sim, &args);
    assert!(!ok);
    assert_eq!(r["refused"], "VmPoweredOn", "{r}");
    assert_eq!(checksum(&sim, VM, 2000), live, "nothing was written");

    // Powered off, with the temporary snapshot an earlier attempt of this restore left: that
    // one is removed, and only the blocks changed since the point are written.
    vs.set_power(&vm, false).await.expect("power off");
    vs.create_snapshot(&vm, "sendense-restore-t2", "left by a dead attempt", false)
        .await
        .expect("leftover");
    let (ok, r, err) = restore_vm(&sim, &args);
    assert!(ok, "{r}\n{err}");
    assert_eq!(checksum(&sim, VM, 2000), point_sum, "back at the point");
    let d = &r["disks"][0];
    assert_eq!(d["differential"], true, "{r}");
    let written = d["bytesWritten"].as_u64().expect("bytes");
    assert!(
        written > 0 && written <= 3 * 64 * 1024,
        "changed blocks only: {written}"
    );
    assert!(d["bytesVerified"].as_u64().unwrap_or(0) >= written, "{r}");
    assert_eq!(r["vm"]["cbtReset"], true, "{r}");
    assert_eq!(
        sim.cli(&["snapshots", "-vm", VM]).as_array().map(Vec::len),
        Some(0)
    );

    // Again: CBT was reset, so the point's change ID is stale: the whole disk, and why.
    let (ok, r, err) = restore_vm(&sim, &args);
    assert!(ok, "{r}\n{err}");
    assert_eq!(r["disks"][0]["differential"], false, "{r}");
    assert!(
        r["disks"][0]["fullReason"]
            .as_str()
            .unwrap_or("")
            .contains("change ID"),
        "{r}"
    );
    assert_eq!(r["disks"][0]["verified"], true, "{r}");
    assert_eq!(checksum(&sim, VM, 2000), point_sum);

    // A snapshot that is not this restore's: refused, nothing written.
    vs.create_snapshot(&vm, "before-upgrade", "the user's", false)
        .await
        .expect("user snapshot");
    let (ok, r, _) = restore_vm(&sim, &args);
    assert!(!ok);
    assert_eq!(r["refused"], "VmHasSnapshots", "{r}");
    assert!(
        r["error"].as_str().unwrap_or("").contains("before-upgrade"),
        "{r}"
    );
    vs.logout().await;
}
