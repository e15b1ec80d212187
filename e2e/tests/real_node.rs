//! The real node (containerd, runc, a CNI bridge, kubelet and kube-proxy from
//! e2e/cluster/node-up.sh) against the real control plane: pods run as containers from
//! imported images; their IPs answer the host; `kubectl logs` and `exec` go through the
//! apiserver to the kubelet over TLS; pods reach the apiserver through the `kubernetes`
//! Service and each other through a ClusterIP Service; PodSecurity and ResourceQuota
//! admission hold, and the kubelet enforces what they admit (seccomp, capabilities, memory
//! limits). That node-down.sh leaves nothing behind is checked by the test command after these
//! tests (e2e/run-tests.sh runs node-down.sh, which ends with node-leftovers.sh).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, PostParams};
use sendense_e2e::real_node::{RealNode, load_busybox, load_kubectl_image};
use sendense_e2e::{TestNamespace, client, kubectl_ok, repo_root};

/// Polls the pod until `done` holds, failing after `timeout` with the last status seen.
async fn wait_pod(
    pods: &Api<Pod>,
    name: &str,
    what: &str,
    timeout: Duration,
    done: impl Fn(&Pod) -> bool,
) -> Result<Pod> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let last = match pods.get(name).await {
            Ok(p) if done(&p) => return Ok(p),
            Ok(p) => format!("{:?}", p.status),
            Err(e) => e.to_string(),
        };
        if tokio::time::Instant::now() >= deadline {
            bail!("pod {name}: {what} not reached within {timeout:?}; last: {last}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn phase(p: &Pod) -> &str {
    p.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or_default()
}

fn ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn ended(p: &Pod) -> bool {
    matches!(phase(p), "Succeeded" | "Failed")
}

fn pod_ip(p: &Pod) -> Result<String> {
    p.status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .context("pod has no IP")
}

/// Creates a pod pinned to the real node from a spec (JSON) and optional labels.
async fn create_pod(
    pods: &Api<Pod>,
    node: &RealNode,
    name: &str,
    labels: serde_json::Value,
    mut spec: serde_json::Value,
) -> Result<()> {
    node.pin(&mut spec);
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": labels}, "spec": spec
    }))?;
    pods.create(&PostParams::default(), &pod)
        .await
        .with_context(|| format!("creating pod {name}"))?;
    Ok(())
}

/// A busybox httpd serving "hello from <hostname>" on port 8080, ready when it listens.
fn web_spec(image: &str) -> serde_json::Value {
    serde_json::json!({
        "terminationGracePeriodSeconds": 1,
        "containers": [{
            "name": "web", "image": image,
            "command": ["sh", "-c", "mkdir -p /tmp/www && echo \"hello from $(hostname)\" > /tmp/www/index.html && echo serving && exec httpd -f -p 8080 -h /tmp/www"],
            "ports": [{"containerPort": 8080}],
            "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1}
        }]
    })
}

/// One HTTP GET from this host (the body), with a deadline on connect and read.
fn http_get(addr: SocketAddr) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    Ok(reply)
}

/// The pinned Kubernetes version (e2e/cluster/versions.env).
fn k8s_version() -> Result<String> {
    let env = std::fs::read_to_string(repo_root().join("e2e/cluster/versions.env"))?;
    env.lines()
        .find_map(|l| l.strip_prefix("K8S_VERSION="))
        .map(str::to_owned)
        .context("no K8S_VERSION in versions.env")
}

#[tokio::test]
async fn a_pod_runs_as_a_container_reachable_from_the_host_with_logs_and_exec() -> Result<()> {
    let Some(node) = RealNode::ready().await? else {
        return Ok(());
    };
    let info = node
        .node
        .status
        .as_ref()
        .and_then(|s| s.node_info.clone())
        .context("node info")?;
    assert!(
        info.container_runtime_version
            .starts_with("containerd://1."),
        "{info:?}"
    );
    assert_eq!(info.kubelet_version, k8s_version()?);
    let image = load_busybox(&node)?;
    let ns = TestNamespace::create("node-pod")?;
    let pods: Api<Pod> = Api::namespaced(client().await?, &ns.name);
    create_pod(&pods, &node, "web", serde_json::json!({}), web_spec(image)).await?;
    let pod = wait_pod(&pods, "web", "Ready", Duration::from_secs(90), ready).await?;

    // Its own IP on the node's bridge, answering the host.
    let ip = pod_ip(&pod)?;
    assert!(ip.starts_with("10.244.0."), "pod IP {ip}");
    assert_ne!(Some(ip.clone()), node.internal_ip());
    let reply = sendense_e2e::wait_until(
        "HTTP from the host to the pod",
        Duration::from_secs(20),
        || http_get(format!("{ip}:8080").parse()?),
    )?;
    assert!(reply.contains("hello from web"), "{reply}");

    // Logs and exec: the apiserver reaches the kubelet (its serving certificate checked against
    // the cluster CA; the kubelet authorizes the apiserver's client certificate by webhook).
    let logs = kubectl_ok(&["logs", "-n", &ns.name, "web"])?;
    assert!(logs.contains("serving"), "logs: {logs}");
    let out = kubectl_ok(&[
        "exec",
        "-n",
        &ns.name,
        "web",
        "--",
        "sh",
        "-c",
        "echo exec-ok; cat /proc/1/cmdline",
    ])?;
    // PID 1 of the container's own PID namespace is the httpd its command exec'd into.
    assert!(
        out.contains("exec-ok") && out.contains("httpd"),
        "exec output: {out}"
    );
    Ok(())
}

#[tokio::test]
async fn a_pod_reaches_the_apiserver_through_the_kubernetes_service() -> Result<()> {
    let Some(node) = RealNode::ready().await? else {
        return Ok(());
    };
    // kubectl in the pod, with no kubeconfig and no flag (any override, even
    // --request-timeout, turns its in-cluster configuration off; busybox's timeout bounds it):
    // the in-cluster configuration (the `kubernetes`
    // Service's address from the environment, the service-account token and CA the kubelet
    // mounts, the apiserver's certificate checked for 10.96.0.1).
    let kubectl = which(&sendense_e2e::kubectl_path())?;
    let image = load_kubectl_image(&node, &kubectl)?;
    let ns = TestNamespace::create("node-apiserver")?;
    let pods: Api<Pod> = Api::namespaced(client().await?, &ns.name);
    let script = r#"set -e
echo "service=$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT"
timeout 20 kubectl get --raw /version; echo
timeout 20 kubectl auth whoami -o jsonpath='user={.status.userInfo.username}'; echo"#;
    let spec = serde_json::json!({
        "restartPolicy": "Never",
        "containers": [{"name": "client", "image": image, "command": ["sh", "-c", script]}]
    });
    create_pod(&pods, &node, "in-cluster", serde_json::json!({}), spec).await?;
    let pod = wait_pod(
        &pods,
        "in-cluster",
        "an end",
        Duration::from_secs(90),
        ended,
    )
    .await?;
    let logs = kubectl_ok(&["logs", "-n", &ns.name, "in-cluster"])?;
    assert_eq!(phase(&pod), "Succeeded", "logs: {logs}");
    assert!(logs.contains("service=10.96.0.1:443"), "logs: {logs}");
    assert!(
        logs.contains(&format!("\"gitVersion\": \"{}\"", k8s_version()?)),
        "logs: {logs}"
    );
    assert!(
        logs.contains(&format!("user=system:serviceaccount:{}:default", ns.name)),
        "logs: {logs}"
    );
    Ok(())
}

/// The path of a command (as the shell's PATH finds it), symlinks resolved.
fn which(cmd: &str) -> Result<std::path::PathBuf> {
    let path = if cmd.contains('/') {
        std::path::PathBuf::from(cmd)
    } else {
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .map(|d| d.join(cmd))
            .find(|p| p.is_file())
            .with_context(|| format!("{cmd} not on PATH"))?
    };
    Ok(std::fs::canonicalize(&path)?)
}

#[tokio::test]
async fn pods_and_the_host_reach_a_pod_through_a_cluster_ip_service() -> Result<()> {
    let Some(node) = RealNode::ready().await? else {
        return Ok(());
    };
    let image = load_busybox(&node)?;
    let ns = TestNamespace::create("node-service")?;
    let client = client().await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let services: Api<Service> = Api::namespaced(client, &ns.name);
    create_pod(
        &pods,
        &node,
        "web",
        serde_json::json!({"app": "web"}),
        web_spec(image),
    )
    .await?;
    let service: Service = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}
    }))?;
    let service = services.create(&PostParams::default(), &service).await?;
    let cluster_ip = service
        .spec
        .and_then(|s| s.cluster_ip)
        .context("Service has no ClusterIP")?;
    wait_pod(&pods, "web", "Ready", Duration::from_secs(90), ready).await?;

    // Pod to pod on the same bridge through the ClusterIP (the reply is un-NATed only because
    // bridged traffic passes netfilter). kube-proxy may need a moment for the new endpoint.
    let script = format!(
        "i=0; while [ $i -lt 30 ]; do timeout 3 wget -q -O- http://{cluster_ip}/ && exit 0; i=$((i+1)); sleep 1; done; exit 1"
    );
    let spec = serde_json::json!({
        "restartPolicy": "Never",
        "containers": [{"name": "client", "image": image, "command": ["sh", "-c", script]}]
    });
    create_pod(&pods, &node, "client", serde_json::json!({}), spec).await?;
    let pod = wait_pod(&pods, "client", "an end", Duration::from_secs(90), ended).await?;
    let logs = kubectl_ok(&["logs", "-n", &ns.name, "client"])?;
    assert_eq!(phase(&pod), "Succeeded", "logs: {logs}");
    assert!(logs.contains("hello from web"), "logs: {logs}");

    // The host through the same ClusterIP.
    let reply = sendense_e2e::wait_until(
        "HTTP from the host to the ClusterIP",
        Duration::from_secs(30),
        || http_get(format!("{cluster_ip}:80").parse()?),
    )?;
    assert!(reply.contains("hello from web"), "{reply}");
    Ok(())
}

#[tokio::test]
async fn a_restricted_namespace_admits_a_compliant_pod_and_rejects_a_privileged_one() -> Result<()>
{
    let Some(node) = RealNode::ready().await? else {
        return Ok(());
    };
    let image = load_busybox(&node)?;
    let ns = TestNamespace::create_restricted("node-restricted")?;
    let pods: Api<Pod> = Api::namespaced(client().await?, &ns.name);

    let privileged = serde_json::json!({
        "containers": [{"name": "c", "image": image, "command": ["sleep", "3600"],
                        "securityContext": {"privileged": true}}]
    });
    let err = create_pod(
        &pods,
        &node,
        "privileged",
        serde_json::json!({}),
        privileged,
    )
    .await
    .expect_err("a privileged pod was admitted into a restricted namespace");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("violates PodSecurity") && msg.contains("privileged"),
        "{msg}"
    );

    // Compliant: non-root, no privilege escalation, no capabilities, the runtime's seccomp
    // profile. It runs, and the kernel shows what the kubelet and runc applied.
    let compliant = serde_json::json!({
        "securityContext": {"runAsNonRoot": true, "runAsUser": 65534, "runAsGroup": 65534,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "terminationGracePeriodSeconds": 1,
        "containers": [{
            "name": "c", "image": image,
            "command": ["sh", "-c", "cat /proc/self/status; exec sleep 3600"],
            "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}}
        }]
    });
    create_pod(&pods, &node, "compliant", serde_json::json!({}), compliant).await?;
    wait_pod(
        &pods,
        "compliant",
        "Running",
        Duration::from_secs(90),
        |p| phase(p) == "Running",
    )
    .await?;
    let id = kubectl_ok(&["exec", "-n", &ns.name, "compliant", "--", "id", "-u"])?;
    assert_eq!(id.trim(), "65534");
    let status =
        sendense_e2e::wait_until("the container's output", Duration::from_secs(20), || {
            let logs = kubectl_ok(&["logs", "-n", &ns.name, "compliant"])?;
            if logs.contains("Seccomp:") {
                Ok(logs)
            } else {
                bail!("no output yet")
            }
        })?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
            .unwrap_or_default()
    };
    assert_eq!(
        field("Seccomp:"),
        "2",
        "seccomp filter mode expected: {status}"
    );
    assert_eq!(field("CapEff:"), "0000000000000000", "{status}");
    assert_eq!(field("NoNewPrivs:"), "1", "{status}");
    Ok(())
}

#[tokio::test]
async fn a_resource_quota_rejects_a_pod_over_it_and_the_node_enforces_an_admitted_limit()
-> Result<()> {
    let Some(node) = RealNode::ready().await? else {
        return Ok(());
    };
    let image = load_busybox(&node)?;
    let ns = TestNamespace::create("node-quota")?;
    let quota = format!(
        "apiVersion: v1\nkind: ResourceQuota\nmetadata: {{name: small, namespace: {}}}\nspec:\n  hard: {{requests.memory: 64Mi, limits.memory: 64Mi, pods: \"2\"}}\n",
        ns.name
    );
    let file = std::env::temp_dir().join(format!("{}-quota.yaml", ns.name));
    std::fs::write(&file, quota)?;
    let applied = kubectl_ok(&["apply", "-f", sendense_e2e::path_str(&file)?]);
    let _ = std::fs::remove_file(&file);
    applied?;
    // The quota admission plugin needs the quota's status (hard) computed before it enforces.
    sendense_e2e::wait_until("the quota's status", Duration::from_secs(30), || {
        let hard = kubectl_ok(&[
            "get",
            "resourcequota",
            "small",
            "-n",
            &ns.name,
            "-o",
            "jsonpath={.status.hard.pods}",
        ])?;
        if hard.trim() == "2" {
            Ok(())
        } else {
            bail!("status not computed yet")
        }
    })?;
    let pods: Api<Pod> = Api::namespaced(client().await?, &ns.name);
    let sized = |memory: &str| {
        serde_json::json!({
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "c", "image": image, "command": ["sleep", "3600"],
                            "resources": {"requests": {"memory": memory}, "limits": {"memory": memory}}}]
        })
    };
    let err = create_pod(&pods, &node, "big", serde_json::json!({}), sized("128Mi"))
        .await
        .expect_err("a pod over the ResourceQuota was admitted");
    let msg = format!("{err:#}");
    assert!(msg.contains("exceeded quota: small"), "{msg}");

    create_pod(&pods, &node, "small", serde_json::json!({}), sized("32Mi")).await?;
    wait_pod(&pods, "small", "Running", Duration::from_secs(90), |p| {
        phase(p) == "Running"
    })
    .await?;
    // cgroup v1 here (cgroup2 would show memory.max): the container's own memory cgroup.
    let limit = kubectl_ok(&[
        "exec",
        "-n",
        &ns.name,
        "small",
        "--",
        "sh",
        "-c",
        "cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || cat /sys/fs/cgroup/memory.max",
    ])?;
    assert_eq!(limit.trim(), (32u64 << 20).to_string());
    Ok(())
}
