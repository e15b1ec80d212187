//! The hub's exports over the network while a backup runs, on the real test bed: only the
//! attempt's agent certificate is served. A plain NBD client, a certificate of the same CA for
//! another identity, and pods without the job's certificate all fail; a pod with it and the
//! test with it succeed. The CA is rotated mid-copy: the running attempt finishes with its own
//! certificates, its Secret goes with it, and the next backup runs under a new CA.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Api;
use kube::api::PostParams;
use sendense_agent::nbd::{ConnectOptions, NbdClient, NbdUrl, TlsClient};
use sendense_crds::backup_job::Phase;
use sendense_e2e::{client, kubectl_ok};
use sendense_operator::nbd_tls;
use serde_json::json;

mod support;
use support::faults::*;
use support::{Bed, SERIAL};

fn secret_text(s: &Secret, key: &str) -> Result<String> {
    let data = s.data.as_ref().context("a Secret without data")?;
    let bytes = data.get(key).with_context(|| format!("no {key}"))?;
    Ok(String::from_utf8(bytes.0.clone())?)
}

/// A client directory (ca-cert.pem, client-cert.pem, client-key.pem) at `dir`.
fn client_dir(dir: &Path, ca: &str, cert: &str, key: &str) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join(nbd_tls::CA_CERT_FILE), ca)?;
    std::fs::write(dir.join(nbd_tls::CLIENT_CERT_FILE), cert)?;
    std::fs::write(dir.join(nbd_tls::CLIENT_KEY_FILE), key)?;
    Ok(())
}

fn opts(tls: Option<&Path>) -> Result<ConnectOptions> {
    Ok(ConnectOptions {
        connect_timeout: Duration::from_secs(10),
        request_timeout: Duration::from_secs(10),
        connections: 1,
        tls: tls.map(TlsClient::from_dir).transpose()?,
        ..Default::default()
    })
}

/// Runs `sendense-agent nbd-ping ARGS` in a pod of the bed's namespace (the Secret `secret`
/// mounted at /tls when given); whether it succeeded, and its output.
async fn ping_from_a_pod(
    bed: &Bed,
    name: &str,
    image: &str,
    args: &[&str],
    secret: Option<&str>,
) -> Result<(bool, String)> {
    let pods: Api<Pod> = Api::namespaced(client().await?, &bed.ns.name);
    let mut command = vec!["sendense-agent", "nbd-ping"];
    command.extend_from_slice(args);
    let mut pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": false,
            "containers": [{"name": "ping", "image": image, "imagePullPolicy": "IfNotPresent",
                            "command": command}]
        }
    });
    if let Some(secret) = secret {
        pod["spec"]["volumes"] = json!([{"name": "tls", "secret": {"secretName": secret}}]);
        pod["spec"]["containers"][0]["volumeMounts"] =
            json!([{"name": "tls", "mountPath": "/tls", "readOnly": true}]);
    }
    pods.create(&PostParams::default(), &serde_json::from_value(pod)?)
        .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let p = pods.get(name).await?;
        let phase = p
            .status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_default();
        if phase == "Succeeded" || phase == "Failed" {
            let log = pods
                .logs(name, &Default::default())
                .await
                .unwrap_or_default();
            pods.delete(name, &Default::default()).await?;
            return Ok((phase == "Succeeded", log));
        }
        if tokio::time::Instant::now() > deadline {
            bail!("pod {name} did not finish: {:?}", p.status);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test]
async fn only_the_attempts_agent_certificate_reaches_the_hub_over_the_network() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let mut bed = Bed::start_without_operator(1, (11250, 11270)).await?;
    // With the job's NetworkPolicies, as the chart runs it (this node's bridge network plugin
    // does not enforce them; what they select is checked below).
    bed.start_operator_with(&[("SENDENSE_NETWORK_POLICY", "true")])?;
    let ns = bed.ns.name.clone();
    write_data(&bed);
    cap_bandwidth(&bed, Some(8))?;
    bed.apply("tls", &Bed::job_yaml("tls", VM, "full", ""))?;
    let j = mid_copy(&bed, "tls").await?;
    let kube = client().await?;
    let hub = Api::<Pod>::namespaced(kube.clone(), &ns)
        .get("tls-hub")
        .await?;
    let ip = hub
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .context("hub IP")?;
    let image = hub
        .spec
        .as_ref()
        .and_then(|s| s.containers[0].image.clone())
        .context("hub image")?;
    let port = j
        .status
        .as_ref()
        .and_then(|s| s.disks.first())
        .and_then(|d| d.port)
        .context("a port")?;
    let server_name = format!("tls-hub.{ns}.svc");
    let tls_url = format!("nbds://{ip}:{port}/?tls-hostname={server_name}");
    let plain_url = format!("nbd://{ip}:{port}/");

    // The attempt's certificates, as the agent has them.
    let secrets: Api<Secret> = Api::namespaced(kube.clone(), &ns);
    let job_secret = secrets.get("tls-nbd-tls").await?;
    let scratch = bed.work.join("tls");
    let agent_dir = scratch.join("agent");
    client_dir(
        &agent_dir,
        &secret_text(&job_secret, nbd_tls::CA_CERT_FILE)?,
        &secret_text(&job_secret, nbd_tls::CLIENT_CERT_FILE)?,
        &secret_text(&job_secret, nbd_tls::CLIENT_KEY_FILE)?,
    )?;
    // Another identity from the same CA: the next attempt's agent.
    let ca_secret = secrets.get("sendense-nbd-ca").await?;
    let ca = nbd_tls::Ca::from_pem(
        &secret_text(&ca_secret, nbd_tls::CA_CERT_KEY)?,
        &secret_text(&ca_secret, nbd_tls::CA_KEY_KEY)?,
    )
    .context("the operator's CA")?;
    let uid = j.metadata.uid.clone().context("uid")?;
    let other = ca.issue(
        &server_name,
        &format!("sendense-agent.{uid}.2"),
        time::OffsetDateTime::now_utc(),
        1,
    )?;
    let other_dir = scratch.join("other");
    client_dir(
        &other_dir,
        &other.ca_cert,
        &other.client_cert,
        &other.client_key,
    )?;

    // From this machine, over the pod network.
    let url: NbdUrl = tls_url.parse()?;
    let c = NbdClient::connect(&url, &opts(Some(&agent_dir))?)
        .await
        .context("the attempt's agent certificate is served")?;
    assert_eq!(c.read(0, 4096).await?.len(), 4096);
    c.disconnect().await;
    let plain = NbdClient::connect(&plain_url.parse()?, &opts(None)?)
        .await
        .err()
        .context("plain NBD was served")?
        .to_string();
    assert!(plain.contains("requires TLS"), "{plain}");
    let foreign = NbdClient::connect(&url, &opts(Some(&other_dir))?)
        .await
        .err()
        .context("another identity of the same CA was served")?
        .to_string();
    assert!(
        foreign.contains("did not accept this client certificate"),
        "{foreign}"
    );
    let nbdinfo = std::process::Command::new("timeout")
        .args(["20", "nbdinfo", "--size", &plain_url])
        .output()?;
    assert!(
        !nbdinfo.status.success(),
        "nbdinfo read the export in the clear"
    );

    // From pods: without a certificate, with another identity's, and with the job's own.
    let (ok, log) = ping_from_a_pod(&bed, "plain", &image, &[&plain_url], None).await?;
    assert!(
        !ok && log.contains("requires TLS"),
        "plain from a pod: {log}"
    );
    let intruder = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "intruder"},
        "stringData": {"ca-cert.pem": other.ca_cert, "client-cert.pem": other.client_cert,
                       "client-key.pem": other.client_key}});
    secrets
        .create(&PostParams::default(), &serde_json::from_value(intruder)?)
        .await?;
    let (ok, log) = ping_from_a_pod(
        &bed,
        "intruder",
        &image,
        &[&tls_url, "--tls-dir", "/tls"],
        Some("intruder"),
    )
    .await?;
    assert!(
        !ok && log.contains("did not accept"),
        "another identity from a pod: {log}"
    );
    secrets.delete("intruder", &Default::default()).await?;
    let (ok, log) = ping_from_a_pod(
        &bed,
        "own",
        &image,
        &[&tls_url, "--tls-dir", "/tls"],
        Some("tls-nbd-tls"),
    )
    .await?;
    assert!(ok, "the job's own certificate from a pod: {log}");

    // The job's NetworkPolicies, as the API server selects: the hub's admits the job's agent
    // pod only, on the job's ports; the agent's admits the operator's pods on its progress
    // port.
    let policies: Api<NetworkPolicy> = Api::namespaced(kube.clone(), &ns);
    let selected = |selector: &Option<LabelSelector>| -> Result<String> {
        let labels = selector
            .as_ref()
            .and_then(|s| s.match_labels.clone())
            .context("matchLabels")?;
        let query: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        kubectl_ok(&[
            "get",
            "pods",
            "-n",
            &ns,
            "-l",
            &query.join(","),
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ])
    };
    let hub_np = policies.get("tls-hub").await?.spec.context("spec")?;
    assert_eq!(selected(&hub_np.pod_selector)?.trim(), "tls-hub");
    let rule = &hub_np.ingress.as_ref().context("ingress")?[0];
    let from = rule.from.as_ref().context("from")?;
    assert_eq!(from.len(), 1);
    assert!(from[0].namespace_selector.is_none() && from[0].ip_block.is_none());
    assert_eq!(selected(&from[0].pod_selector)?.trim(), "tls-agent");
    let ports: Vec<String> = rule
        .ports
        .iter()
        .flatten()
        .filter_map(|p| p.port.as_ref().map(|p| format!("{p:?}")))
        .collect();
    let job_ports: Vec<String> = j
        .status
        .as_ref()
        .map(|s| s.disks.iter().filter_map(|d| d.port).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|p| format!("{:?}", IntOrString::Int(p)))
        .collect();
    assert!(job_ports.len() >= 2, "a port per disk: {job_ports:?}");
    assert_eq!(
        ports, job_ports,
        "the hub's policy opens exactly the job's ports"
    );
    let agent_np = policies.get("tls-agent").await?.spec.context("spec")?;
    assert_eq!(selected(&agent_np.pod_selector)?.trim(), "tls-agent");
    let rule = &agent_np.ingress.as_ref().context("ingress")?[0];
    assert_eq!(
        rule.ports.as_ref().context("ports")?[0].port,
        Some(IntOrString::Int(9090))
    );
    let peer = &rule.from.as_ref().context("from")?[0];
    assert!(
        peer.namespace_selector.is_some() && peer.pod_selector.is_some(),
        "the operator's pods in its namespace, not every pod: {peer:?}"
    );

    // The CA rotated while the attempt runs: the attempt keeps its own certificates.
    let old_ca = secret_text(&ca_secret, nbd_tls::CA_CERT_KEY)?;
    secrets
        .delete("sendense-nbd-ca", &Default::default())
        .await?;
    // The backup itself went on, and its certificates go with it.
    cap_bandwidth(&bed, None)?;
    let j = bed
        .finished("tls", Phase::Succeeded, Duration::from_secs(300))
        .await?;
    verified(&bed, &j).await?;
    nothing_left(&bed, "tls").await?;
    assert!(
        secrets.get_opt("tls-nbd-tls").await?.is_none(),
        "the attempt's Secret is removed with its pods"
    );
    // The next backup runs under a new CA.
    bed.apply("tls2", &Bed::job_yaml("tls2", VM, "incremental", ""))?;
    let j2 = bed
        .finished("tls2", Phase::Succeeded, Duration::from_secs(300))
        .await?;
    verified(&bed, &j2).await?;
    let new_ca = secret_text(&secrets.get("sendense-nbd-ca").await?, nbd_tls::CA_CERT_KEY)?;
    assert_ne!(new_ca, old_ca, "a new CA was made after the rotation");
    nothing_left(&bed, "tls2").await?;
    Ok(())
}
