//! The SourceNode controller against the real control plane and the vCenter simulator: the
//! operator binary probes each SourceNode and says in its Ready condition what it found.

use std::process::{Child, Command};
use std::time::Duration;

use anyhow::{Result, bail};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use sendense_crds::SourceNode;
use sendense_e2e::vcsim::Simulator;
use sendense_e2e::{
    TestNamespace, bound_metrics_port, client, install_crds, kubeconfig, kubectl_ok, scratch_dir,
};

struct Operator(Child);
impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn source_node(name: &str, url: &str, secret: &str, thumbprint: &str) -> Result<SourceNode> {
    source_node_with(
        name,
        url,
        secret,
        thumbprint,
        serde_json::json!({"name": "LocalDS_0", "persistentVolumeClaim": {"claimName": "datastore"}}),
        serde_json::json!({}),
    )
}

/// A SourceNode with this datastore entry and placement.
fn source_node_with(
    name: &str,
    url: &str,
    secret: &str,
    thumbprint: &str,
    datastore: serde_json::Value,
    placement: serde_json::Value,
) -> Result<SourceNode> {
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "sendense.io/v1alpha1", "kind": "SourceNode",
        "metadata": {"name": name},
        "spec": {
            "vcenter": {"url": url, "credentialsSecretRef": {"name": secret}, "tls": {"thumbprint": thumbprint}},
            "datacenter": "DC0",
            "transport": {"type": "nfs", "nfs": {"datastores": [datastore]}},
            "placement": placement
        }
    }))?)
}

fn secret(name: &str, user: &str, password: &str) -> Result<Secret> {
    Ok(serde_json::from_value(serde_json::json!({
        "metadata": {"name": name}, "stringData": {"username": user, "password": password}
    }))?)
}

/// Waits for the Ready condition's (status, reason); returns its message.
async fn ready(api: &Api<SourceNode>, name: &str, status: &str, reason: &str) -> Result<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let sn = api.get(name).await?;
        let cond = sn
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready").cloned());
        if let Some(c) = &cond
            && c.status == status
            && c.reason == reason
        {
            return Ok(c.message.clone());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("SourceNode {name}: Ready never became {status}/{reason}; last: {cond:?}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test]
async fn source_nodes_report_what_the_vcenter_probe_found() -> Result<()> {
    install_crds()?;
    let sim = Simulator::start(&[]);
    let ns = TestNamespace::create("sourcenode")?;
    let log = scratch_dir().join(format!("{}-operator.log", ns.name));
    let out = std::fs::File::create(&log)?;
    let mut operator = Operator(
        Command::new(env!("CARGO_BIN_EXE_sendense-operator"))
            .env("KUBECONFIG", kubeconfig())
            .env("SENDENSE_WATCH_NAMESPACE", &ns.name)
            .env("SENDENSE_PROBE_INTERVAL_SECONDS", "5")
            // What SourceNodes of this namespace may ask for (the chart's datastoreVolumes and
            // agentPlacement.allowedTolerations).
            .env(
                "SENDENSE_DATASTORE_VOLUMES",
                format!(r#"[{{"name": "lab", "namespaces": ["{}"], "hostPath": {{"path": "/tmp"}}}}, {{"name": "elsewhere", "namespaces": ["not-{}"], "hostPath": {{"path": "/"}}}}]"#, ns.name, ns.name),
            )
            .env(
                "SENDENSE_ALLOWED_TOLERATIONS",
                r#"[{"key": "sendense.io/site", "effect": "NoSchedule"}]"#,
            )
            // Port 0: the operator binds a free port and logs it.
            .env("SENDENSE_METRICS_ADDR", "127.0.0.1:0")
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()?,
    );
    let metrics_port = bound_metrics_port(&mut operator.0, &log, 0, Duration::from_secs(60))?;
    let client = client().await?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let nodes: Api<SourceNode> = Api::namespaced(client, &ns.name);
    let pp = PostParams::default();
    let (url, tp) = (sim.s("url"), sim.s("thumbprint"));
    secrets
        .create(
            &pp,
            &secret("good", &sim.s("username"), &sim.s("password"))?,
        )
        .await?;
    secrets
        .create(&pp, &secret("no-domain", "administrator", "wrong")?)
        .await?;
    nodes
        .create(&pp, &source_node("good", &url, "good", &tp)?)
        .await?;
    nodes
        .create(&pp, &source_node("bad-login", &url, "no-domain", &tp)?)
        .await?;
    nodes
        .create(&pp, &source_node("no-secret", &url, "missing", &tp)?)
        .await?;
    let wrong_tp = "00:".repeat(31) + "00";
    nodes
        .create(&pp, &source_node("bad-cert", &url, "good", &wrong_tp)?)
        .await?;

    // What the operator's settings allow, and what they do not: a datastore volume of
    // another namespace, a taint not listed. Those are not probed, and say why.
    let lab = serde_json::json!({"name": "LocalDS_0", "volume": "lab"});
    let site = serde_json::json!({"tolerations": [{"key": "sendense.io/site", "operator": "Exists", "effect": "NoSchedule"}]});
    nodes
        .create(
            &pp,
            &source_node_with("allowed", &url, "good", &tp, lab.clone(), site)?,
        )
        .await?;
    nodes
        .create(
            &pp,
            &source_node_with(
                "other-volume",
                &url,
                "good",
                &tp,
                serde_json::json!({"name": "LocalDS_0", "volume": "elsewhere"}),
                serde_json::json!({}),
            )?,
        )
        .await?;
    nodes
        .create(
            &pp,
            &source_node_with(
                "control-plane",
                &url,
                "good",
                &tp,
                lab,
                serde_json::json!({"tolerations": [{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists", "effect": "NoSchedule"}]}),
            )?,
        )
        .await?;
    ready(&nodes, "allowed", "True", "Connected").await?;
    let msg = ready(&nodes, "other-volume", "False", "NotAllowed").await?;
    assert!(
        msg.starts_with("spec.transport.nfs.datastores[0] (LocalDS_0): volume \"elsewhere\" is not a datastore volume the operator allows in namespace")
            && msg.ends_with("allowed here: lab"),
        "{msg}"
    );
    let msg = ready(&nodes, "control-plane", "False", "NotAllowed").await?;
    assert!(
        msg.starts_with("spec.placement.tolerations[0]: the taint node-role.kubernetes.io/control-plane:NoSchedule is not one")
            && msg.contains("agentPlacement.allowedTolerations"),
        "{msg}"
    );
    // Refused before vCenter is asked: no probe time.
    let cp = nodes.get("control-plane").await?;
    assert_eq!(cp.status.and_then(|s| s.last_probe_time), None);

    let msg = ready(&nodes, "good", "True", "Connected").await?;
    assert!(msg.contains("VMware vCenter Server"), "{msg}");
    let good = nodes.get("good").await?;
    assert!(
        good.status
            .as_ref()
            .and_then(|s| s.vcenter_version.clone())
            .is_some_and(|v| v.contains("vCenter"))
    );
    let msg = ready(&nodes, "bad-login", "False", "LoginFailed").await?;
    assert!(msg.contains("no SSO domain"), "{msg}");
    assert!(
        !msg.contains("wrong"),
        "the password never reaches the status: {msg}"
    );
    let msg = ready(&nodes, "no-secret", "False", "SecretNotFound").await?;
    assert!(msg.contains("missing"), "{msg}");
    let msg = ready(&nodes, "bad-cert", "False", "CertificateNotTrusted").await?;
    assert!(
        msg.contains(&tp)
            || msg
                .to_lowercase()
                .contains(&tp.to_lowercase().replace(':', "")),
        "names the presented certificate: {msg}"
    );

    // The fix is picked up: create the missing Secret and the next probe connects.
    secrets
        .create(
            &pp,
            &secret("missing", &sim.s("username"), &sim.s("password"))?,
        )
        .await?;
    ready(&nodes, "no-secret", "True", "Connected").await?;

    // Health and metrics endpoints.
    assert!(http_get(metrics_port, "/healthz")?.starts_with("HTTP/1.1 200"));
    assert!(http_get(metrics_port, "/readyz")?.starts_with("HTTP/1.1 200"));
    let m = http_get(metrics_port, "/metrics")?;
    for want in [
        "sendense_reconcile_runs_total{controller=\"sourcenode\"}",
        "sendense_vcenter_probes_total{reason=\"Connected\"}",
        "sendense_vcenter_probes_total{reason=\"LoginFailed\"}",
        "sendense_reconcile_duration_seconds_bucket",
    ] {
        assert!(m.contains(want), "{want} missing from /metrics:\n{m}");
    }

    // Events say the same.
    let events = kubectl_ok(&["get", "events", "-n", &ns.name, "-o", "json"])?;
    for reason in [
        "Connected",
        "LoginFailed",
        "SecretNotFound",
        "CertificateNotTrusted",
        "NotAllowed",
    ] {
        assert!(
            events.contains(&format!("\"reason\": \"{reason}\"")),
            "no {reason} event"
        );
    }
    Ok(())
}

fn http_get(port: u16, path: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}
