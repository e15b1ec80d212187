//! The CRDs on a real kube-apiserver: they install, the samples are accepted, malformed
//! objects are rejected at admission with messages that name the field, the BackupJob spec is
//! immutable, and `kubectl explain` / `kubectl get` read well.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use kube::api::{Api, Patch, PatchParams};
use sendense_crds::backup_job::{BackupMode, Phase};
use sendense_crds::restore_job::{ClaimAccessMode, FilesFormat, VolumeMode};
use sendense_crds::{BackupJob, Repository, RestoreJob, SourceNode};
use sendense_e2e::{TestNamespace, install_crds, kubectl, kubectl_ok, path_str, repo_root};

#[test]
fn crds_install_and_are_listed() -> Result<()> {
    install_crds()?;
    let out = kubectl_ok(&["get", "crd", "-o", "name"])?;
    for crd in [
        "sourcenodes.sendense.io",
        "repositories.sendense.io",
        "backupjobs.sendense.io",
        "restorepoints.sendense.io",
        "restorejobs.sendense.io",
        "backupschedules.sendense.io",
    ] {
        assert!(
            out.contains(&format!(
                "customresourcedefinition.apiextensions.k8s.io/{crd}"
            )),
            "{crd} missing from `kubectl get crd`: {out}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn samples_are_accepted_and_defaulted() -> Result<()> {
    install_crds()?;
    let ns = TestNamespace::create("samples")?;
    let samples = repo_root().join("config/samples");
    kubectl_ok(&["apply", "-n", &ns.name, "-k", path_str(&samples)?])?;

    // Read them back through the Rust types: the schema and the types agree, and the
    // API server applied the schema's defaults.
    let client = sendense_e2e::client().await?;
    let jobs: Api<BackupJob> = Api::namespaced(client.clone(), &ns.name);
    let nightly = jobs.get("web-01-nightly").await?;
    assert_eq!(nightly.spec.mode, BackupMode::Auto);
    assert_eq!(nightly.spec.retry_limit, 3, "retryLimit defaults to 3");
    assert!(!nightly.spec.quiesce);
    let full = jobs.get("db-01-full").await?;
    assert_eq!(full.spec.disks, Some(vec![2000, 2001]));

    let repos: Api<Repository> = Api::namespaced(client.clone(), &ns.name);
    let primary = repos.get("primary").await?;
    assert_eq!(
        (
            primary.spec.hub.port_range.low,
            primary.spec.hub.port_range.high
        ),
        (10100, 10200),
        "the hub port range defaults to 10100-10200"
    );
    assert_eq!(
        primary.spec.layout.directory, "{namespace}/{vm}",
        "one directory per VM, holding a directory per restore point"
    );

    let restores: Api<RestoreJob> = Api::namespaced(client.clone(), &ns.name);
    let to_kubevirt = restores.get("web-01-to-kubevirt").await?;
    assert_eq!(to_kubevirt.spec.retry_limit, 2, "retryLimit defaults to 2");
    assert_eq!(to_kubevirt.spec.progress_deadline_seconds, 600);
    let pvc = to_kubevirt.spec.target.pvc.expect("a pvc target");
    assert_eq!(pvc.volume_mode, VolumeMode::Filesystem);
    assert_eq!(pvc.access_mode, ClaimAccessMode::ReadWriteOnce);
    let files = restores.get("web-01-nginx-config").await?;
    assert_eq!(
        files.spec.target.files.expect("a files target").format,
        FilesFormat::Directory
    );

    let nodes: Api<SourceNode> = Api::namespaced(client, &ns.name);
    let lab = nodes.get("vcenter-lab").await?;
    assert_eq!(
        lab.spec.vcenter.credentials_secret_ref.username_key,
        "username"
    );
    assert_eq!(
        lab.spec.vcenter.credentials_secret_ref.password_key,
        "password"
    );
    Ok(())
}

/// The `# expect:` lines at the top of a malformed manifest: text the rejection must contain.
fn expectations(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# expect:"))
        .map(|s| s.trim().to_owned())
        .collect()
}

#[test]
fn malformed_manifests_are_rejected_naming_the_field() -> Result<()> {
    install_crds()?;
    let ns = TestNamespace::create("invalid")?;
    let dir = repo_root().join("e2e/invalid");
    let mut files: Vec<_> = std::fs::read_dir(&dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.retain(|p| p.extension().is_some_and(|e| e == "yaml"));
    files.sort();
    assert!(
        files.len() >= 15,
        "expected at least 15 malformed manifests, found {}",
        files.len()
    );

    let mut failures = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file)?;
        let expect = expectations(&text);
        if expect.is_empty() {
            failures.push(format!("{}: no `# expect:` line", file.display()));
            continue;
        }
        let out = kubectl(&["create", "-n", &ns.name, "-f", path_str(file)?])?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            failures.push(format!(
                "{}: accepted, but must be rejected",
                file.display()
            ));
            continue;
        }
        for e in &expect {
            if !stderr.contains(e.as_str()) {
                failures.push(format!(
                    "{}: rejection does not say {e:?}; it says: {}",
                    file.display(),
                    stderr.trim()
                ));
            }
        }
    }
    if !failures.is_empty() {
        bail!(
            "{} of {} malformed manifests misbehaved:\n{}",
            failures.len(),
            files.len(),
            failures.join("\n")
        );
    }
    // Nothing slipped in.
    let left = kubectl_ok(&[
        "get",
        "sourcenodes,repositories,backupjobs",
        "-n",
        &ns.name,
        "-o",
        "name",
    ])?;
    assert_eq!(left.trim(), "", "rejected objects must not exist");
    Ok(())
}

#[tokio::test]
async fn backupjob_spec_is_immutable_but_status_and_labels_change() -> Result<()> {
    install_crds()?;
    let ns = TestNamespace::create("immutable")?;
    let job = repo_root().join("config/samples/sendense_v1alpha1_backupjob.yaml");
    kubectl_ok(&["create", "-n", &ns.name, "-f", path_str(&job)?])?;

    let out = kubectl(&[
        "patch",
        "-n",
        &ns.name,
        "backupjob",
        "web-01-nightly",
        "--type=merge",
        "-p",
        r#"{"spec":{"mode":"full"}}"#,
    ])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "changing the spec must be rejected");
    assert!(
        stderr.contains("spec: Invalid value: \"object\": spec is immutable: create a new BackupJob instead of editing this one"),
        "unexpected rejection: {stderr}"
    );

    // Metadata and status stay writable: the operator reports through the status subresource.
    kubectl_ok(&[
        "label",
        "-n",
        &ns.name,
        "backupjob",
        "web-01-nightly",
        "team=web",
    ])?;
    let jobs: Api<BackupJob> = Api::namespaced(sendense_e2e::client().await?, &ns.name);
    let status = serde_json::json!({
        "apiVersion": "sendense.io/v1alpha1",
        "kind": "BackupJob",
        "status": {
            "phase": "Running",
            "progress": "42%",
            "size": "1.5 GiB",
            "conditions": [{
                "type": "Running", "status": "True", "reason": "Copying",
                "message": "copied 644245094 of 1610612736 bytes (42%)",
                "lastTransitionTime": "2026-11-22T00:00:00Z"
            }],
            "disks": [{"deviceKey": 2000, "bytesToCopy": 1073741824}, {"deviceKey": 2001, "bytesToCopy": 536870912}]
        }
    });
    jobs.patch_status(
        "web-01-nightly",
        &PatchParams::apply("sendense-e2e").force(),
        &Patch::Apply(&status),
    )
    .await
    .context("writing status through the status subresource")?;
    let got = jobs.get_status("web-01-nightly").await?;
    let st = got.status.context("status written")?;
    assert_eq!(st.phase, Some(Phase::Running));
    assert_eq!(st.disks.len(), 2);

    // Printer columns show phase, mode, progress and size.
    let table = kubectl_ok(&["get", "backupjobs", "-n", &ns.name])?;
    let header = table.lines().next().unwrap_or_default();
    for col in ["NAME", "PHASE", "MODE", "PROGRESS", "SIZE", "AGE"] {
        assert!(header.contains(col), "column {col} missing from: {header}");
    }
    let row = table.lines().nth(1).unwrap_or_default();
    for cell in ["web-01-nightly", "Running", "auto", "42%", "1.5 GiB"] {
        assert!(row.contains(cell), "{cell} missing from row: {row}");
    }
    Ok(())
}

#[test]
fn kubectl_explain_describes_every_kind() -> Result<()> {
    install_crds()?;
    // Discovery can lag the CRD becoming Established by a moment.
    let explain = |what: &str| {
        sendense_e2e::wait_until(
            &format!("kubectl explain {what}"),
            Duration::from_secs(30),
            || kubectl_ok(&["explain", what]),
        )
        // kubectl wraps descriptions to the terminal; compare words, not line breaks.
        .map(|text| text.split_whitespace().collect::<Vec<_>>().join(" "))
    };
    let job = explain("backupjob.spec")?;
    assert!(job.contains("One backup of one VM"), "{job}");
    assert!(
        job.contains("sourceNodeRef") && job.contains("repositoryRef") && job.contains("mode"),
        "{job}"
    );
    let mode = explain("backupjob.spec.mode")?;
    assert!(
        mode.contains("incremental when a usable previous backup"),
        "{mode}"
    );

    let repo = explain("repository.spec.hub.portRange")?;
    assert!(repo.contains("low") && repo.contains("high"), "{repo}");
    let url = explain("sourcenode.spec.vcenter.url")?;
    assert!(
        url.contains("Only https is accepted: credentials never travel in the clear"),
        "{url}"
    );
    let short = explain("srcnode")?;
    assert!(
        short.contains("A VMware vCenter that Sendense backs up VMs from"),
        "{short}"
    );
    Ok(())
}
