//! The node stand-in against the real control plane: pods bound by the real scheduler run as
//! local processes, with init containers, Secret env, probes, exit codes, deletion, and
//! Deployments driven by the real controller-manager.

use std::process::{Child, Command};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, Pod, Secret};
use kube::api::{Api, DeleteParams, PostParams};
use sendense_e2e::{TestNamespace, client, kubeconfig};

/// A node stand-in process serving one uniquely named node, stopped (SIGTERM) on drop.
struct StandIn {
    child: Child,
    node: String,
    _root: TempDir,
}

struct TempDir(std::path::PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn unique(prefix: &str) -> String {
    use std::collections::hash_map::RandomState;
    use std::hash::BuildHasher;
    format!(
        "{prefix}-{:08x}",
        RandomState::new().hash_one(std::time::Instant::now()) as u32
    )
}

impl StandIn {
    async fn start() -> Result<Self> {
        let node = unique("standin");
        let root = TempDir(std::env::temp_dir().join(&node));
        let child = Command::new(env!("CARGO_BIN_EXE_node-standin"))
            .arg("--kubeconfig")
            .arg(kubeconfig())
            .args(["--node", &node, "--restart-backoff-ms", "500", "--root"])
            .arg(&root.0)
            .spawn()
            .context("starting node-standin")?;
        let standin = Self {
            child,
            node,
            _root: root,
        };
        let nodes: Api<Node> = Api::all(client().await?);
        wait_for(
            &format!("node {} Ready", standin.node),
            Duration::from_secs(30),
            || async {
                let n = nodes.get_opt(&standin.node).await?;
                let ready = n
                    .and_then(|n| n.status)
                    .and_then(|s| s.conditions)
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
                Ok(ready.then_some(()))
            },
        )
        .await?;
        Ok(standin)
    }

    fn pin(&self, pod_spec: &mut serde_json::Value) {
        pod_spec["nodeSelector"] = serde_json::json!({"kubernetes.io/hostname": self.node});
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` until it yields Some, failing after `timeout`.
async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("{what}: not reached within {timeout:?} (last error: {last_err:?})");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn phase(p: &Pod) -> String {
    p.status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_default()
}

fn ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn exit_code(p: &Pod, container: &str) -> Option<i32> {
    p.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find(|c| c.name == container)?
        .state
        .as_ref()?
        .terminated
        .as_ref()
        .map(|t| t.exit_code)
}

/// Exit code of the pod's first init container, once terminated.
fn init_exit_code(p: &Pod) -> Option<i32> {
    p.status
        .as_ref()?
        .init_container_statuses
        .as_ref()?
        .first()?
        .state
        .as_ref()?
        .terminated
        .as_ref()
        .map(|t| t.exit_code)
}

fn process_running(marker: &str) -> bool {
    Command::new("pgrep")
        .args(["-f", marker])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[tokio::test]
async fn pod_with_init_secret_env_and_tcp_readiness_runs_to_success() -> Result<()> {
    let standin = StandIn::start().await?;
    let ns = TestNamespace::create("standin-pod")?;
    let client = client().await?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "creds"}, "stringData": {"password": "s3cret value"}
    }))?;
    secrets.create(&PostParams::default(), &secret).await?;

    // The main container exits 0 only if the init container's file and the Secret's value both
    // reached it; it listens on its pod IP so the TCP readiness probe can pass, then ends.
    let script = r#"
import os, socket, sys, time
ok = open('/sendense-e2e/work/init.txt').read().strip() == 'init-done' and os.environ['PASSWORD'] == 's3cret value'
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((os.environ['POD_IP'], 8080)); s.listen(8)
time.sleep(6)
sys.exit(0 if ok else 3)
"#;
    let mut spec = serde_json::json!({
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": 5,
        "volumes": [{"name": "work", "emptyDir": {}}],
        "initContainers": [{
            "name": "init", "image": "busybox",
            "command": ["sh", "-c", "echo init-done > /sendense-e2e/work/init.txt"],
            "volumeMounts": [{"name": "work", "mountPath": "/sendense-e2e/work"}]
        }],
        "containers": [{
            "name": "main", "image": "python",
            "command": ["python3", "-c", script],
            "env": [
                {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}},
                {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
            ],
            "ports": [{"containerPort": 8080, "name": "serve"}],
            "readinessProbe": {"tcpSocket": {"port": "serve"}, "periodSeconds": 1},
            "volumeMounts": [{"name": "work", "mountPath": "/sendense-e2e/work"}]
        }]
    });
    standin.pin(&mut spec);
    let pods: Api<Pod> = Api::namespaced(client, &ns.name);
    let pod: Pod = serde_json::from_value(
        serde_json::json!({"metadata": {"name": "lifecycle"}, "spec": spec}),
    )?;
    pods.create(&PostParams::default(), &pod).await?;

    let mut seen = Vec::<String>::new();
    let mut was_ready = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let done = loop {
        let p = pods.get("lifecycle").await?;
        let ph = phase(&p);
        if seen.last() != Some(&ph) {
            seen.push(ph.clone());
        }
        was_ready |= ready(&p);
        if matches!(ph.as_str(), "Succeeded" | "Failed") {
            break p;
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "pod did not end within 60s; phases seen: {seen:?}; status: {:?}",
                p.status
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        was_ready,
        "the TCP readiness probe never made the pod Ready; phases seen: {seen:?}"
    );
    assert!(
        seen.contains(&"Running".to_string()),
        "phases seen: {seen:?}"
    );
    assert_eq!(
        phase(&done),
        "Succeeded",
        "phases seen: {seen:?}; status: {:?}",
        done.status
    );
    assert_eq!(exit_code(&done, "main"), Some(0));
    assert_eq!(
        exit_code(&done, "init"),
        None,
        "init status is in initContainerStatuses"
    );
    let init_exit = init_exit_code(&done);
    assert_eq!(init_exit, Some(0));
    assert!(!ready(&done), "a completed pod is not Ready");
    let ip = done
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .unwrap_or_default();
    assert!(ip.starts_with("127."), "pod IP {ip}");
    Ok(())
}

#[tokio::test]
async fn failing_container_fails_the_pod_with_its_exit_code() -> Result<()> {
    let standin = StandIn::start().await?;
    let ns = TestNamespace::create("standin-fail")?;
    let mut spec = serde_json::json!({
        "restartPolicy": "Never",
        "containers": [{"name": "main", "image": "busybox", "command": ["sh", "-c", "exit 3"]}]
    });
    standin.pin(&mut spec);
    let pods: Api<Pod> = Api::namespaced(client().await?, &ns.name);
    let pod: Pod =
        serde_json::from_value(serde_json::json!({"metadata": {"name": "fails"}, "spec": spec}))?;
    pods.create(&PostParams::default(), &pod).await?;
    let done = wait_for("pod fails", Duration::from_secs(30), || async {
        let p = pods.get("fails").await?;
        Ok(matches!(phase(&p).as_str(), "Succeeded" | "Failed").then_some(p))
    })
    .await?;
    assert_eq!(phase(&done), "Failed");
    assert_eq!(exit_code(&done, "main"), Some(3));

    // A failing init container fails a Never pod before any container starts.
    let marker = format!("{}.{}", 3603, std::process::id());
    let mut spec = serde_json::json!({
        "restartPolicy": "Never",
        "initContainers": [{"name": "init", "image": "x", "command": ["sh", "-c", "exit 4"]}],
        "containers": [{"name": "main", "image": "x", "command": ["sleep", marker]}]
    });
    standin.pin(&mut spec);
    let pod: Pod = serde_json::from_value(
        serde_json::json!({"metadata": {"name": "init-fails"}, "spec": spec}),
    )?;
    pods.create(&PostParams::default(), &pod).await?;
    let done = wait_for(
        "init failure ends the pod",
        Duration::from_secs(30),
        || async {
            let p = pods.get("init-fails").await?;
            Ok(matches!(phase(&p).as_str(), "Succeeded" | "Failed").then_some(p))
        },
    )
    .await?;
    assert_eq!(phase(&done), "Failed");
    let init_exit = init_exit_code(&done);
    assert_eq!(init_exit, Some(4));
    assert!(
        !process_running(&format!("sleep {marker}")),
        "the main container never started"
    );

    // A command that does not exist is a clear error, never a silent success.
    let mut spec = serde_json::json!({
        "restartPolicy": "Never",
        "containers": [{"name": "main", "image": "x", "command": ["no-such-command-sendense"]}]
    });
    standin.pin(&mut spec);
    let pod: Pod =
        serde_json::from_value(serde_json::json!({"metadata": {"name": "missing"}, "spec": spec}))?;
    pods.create(&PostParams::default(), &pod).await?;
    let waiting = wait_for(
        "missing command reported",
        Duration::from_secs(30),
        || async {
            let p = pods.get("missing").await?;
            let w = p
                .status
                .and_then(|s| s.container_statuses)
                .and_then(|c| c.into_iter().next())
                .and_then(|c| c.state)
                .and_then(|s| s.waiting)
                .filter(|w| w.reason.as_deref() == Some("CreateContainerConfigError"));
            Ok(w)
        },
    )
    .await?;
    assert!(
        waiting
            .message
            .unwrap_or_default()
            .contains("no-such-command-sendense"),
        "the message names the missing command"
    );
    Ok(())
}

#[tokio::test]
async fn deleting_a_pod_kills_its_processes_and_removes_it() -> Result<()> {
    let standin = StandIn::start().await?;
    let ns = TestNamespace::create("standin-delete")?;
    let pods: Api<Pod> = Api::namespaced(client().await?, &ns.name);
    // One process that exits on SIGTERM, one that ignores it and must be SIGKILLed after the
    // grace period.
    let polite = format!("{}.{}", 3600, std::process::id());
    let stubborn = format!("{}.{}", 3601, std::process::id());
    let mut spec = serde_json::json!({
        "terminationGracePeriodSeconds": 2,
        "containers": [
            {"name": "polite", "image": "x", "command": ["sleep", polite]},
            {"name": "stubborn", "image": "x", "command": ["sh", "-c", format!("trap '' TERM; sleep {stubborn}; sleep 1")]}
        ]
    });
    standin.pin(&mut spec);
    let pod: Pod =
        serde_json::from_value(serde_json::json!({"metadata": {"name": "sleeper"}, "spec": spec}))?;
    pods.create(&PostParams::default(), &pod).await?;
    wait_for("pod Ready", Duration::from_secs(30), || async {
        Ok(ready(&pods.get("sleeper").await?).then_some(()))
    })
    .await?;
    assert!(process_running(&format!("sleep {polite}")));
    assert!(process_running(&format!("sleep {stubborn}")));

    pods.delete("sleeper", &DeleteParams::default()).await?;
    wait_for("pod object removed", Duration::from_secs(30), || async {
        Ok(pods.get_opt("sleeper").await?.is_none().then_some(()))
    })
    .await?;
    assert!(
        !process_running(&format!("sleep {polite}")),
        "SIGTERM ended the polite process"
    );
    assert!(
        !process_running(&format!("sleep {stubborn}")),
        "SIGKILL ended the stubborn process"
    );
    Ok(())
}

#[tokio::test]
async fn deployment_pods_run_and_become_available() -> Result<()> {
    let standin = StandIn::start().await?;
    let ns = TestNamespace::create("standin-deploy")?;
    let marker = format!("{}.{}", 3602, std::process::id());
    let mut pod_spec = serde_json::json!({
        "containers": [{
            "name": "app", "image": "x", "command": ["sleep", marker],
            "readinessProbe": {"exec": {"command": ["true"]}, "periodSeconds": 1},
            "livenessProbe": {"exec": {"command": ["true"]}, "periodSeconds": 2}
        }]
    });
    standin.pin(&mut pod_spec);
    let deployment: Deployment = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "app"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "standin-e2e"}},
            "template": {"metadata": {"labels": {"app": "standin-e2e"}}, "spec": pod_spec}
        }
    }))?;
    let client = client().await?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    deployments
        .create(&PostParams::default(), &deployment)
        .await?;
    wait_for(
        "deployment has 2 available replicas",
        Duration::from_secs(60),
        || async {
            let d = deployments.get("app").await?;
            Ok((d.status.and_then(|s| s.available_replicas) == Some(2)).then_some(()))
        },
    )
    .await?;
    let out = Command::new("pgrep")
        .args(["-fc", &format!("sleep {marker}")])
        .output()?;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "2",
        "two replicas, two processes"
    );

    // Deleting the Deployment: the garbage collector removes its pods; the stand-in kills them.
    deployments
        .delete("app", &DeleteParams::foreground())
        .await?;
    let pods: Api<Pod> = Api::namespaced(client, &ns.name);
    wait_for("pods gone", Duration::from_secs(60), || async {
        Ok(pods
            .list(&Default::default())
            .await?
            .items
            .is_empty()
            .then_some(()))
    })
    .await?;
    assert!(!process_running(&format!("sleep {marker}")));
    Ok(())
}

#[tokio::test]
async fn on_failure_restarts_until_success_and_counts_restarts() -> Result<()> {
    let standin = StandIn::start().await?;
    let ns = TestNamespace::create("standin-restart")?;
    // Fails on its first two runs (a counter in an emptyDir survives restarts), then succeeds.
    let script = "n=$(cat /sendense-e2e/state/count 2>/dev/null || echo 0); n=$((n+1)); \
                  echo $n > /sendense-e2e/state/count; [ $n -ge 3 ]";
    let mut spec = serde_json::json!({
        "restartPolicy": "OnFailure",
        "volumes": [{"name": "state", "emptyDir": {}}],
        "containers": [{
            "name": "flaky", "image": "x", "command": ["sh", "-c", script],
            "volumeMounts": [{"name": "state", "mountPath": "/sendense-e2e/state"}]
        }]
    });
    standin.pin(&mut spec);
    let pods: Api<Pod> = Api::namespaced(client().await?, &ns.name);
    let pod: Pod =
        serde_json::from_value(serde_json::json!({"metadata": {"name": "flaky"}, "spec": spec}))?;
    pods.create(&PostParams::default(), &pod).await?;
    let done = wait_for("flaky pod ends", Duration::from_secs(60), || async {
        let p = pods.get("flaky").await?;
        Ok(matches!(phase(&p).as_str(), "Succeeded" | "Failed").then_some(p))
    })
    .await?;
    assert_eq!(phase(&done), "Succeeded");
    let status = &done
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.clone())
        .unwrap_or_default()[0];
    assert_eq!(status.restart_count, 2);
    let last_exit = status
        .last_state
        .as_ref()
        .and_then(|s| s.terminated.as_ref())
        .map(|t| t.exit_code);
    assert_eq!(last_exit, Some(1), "lastState keeps the previous failure");
    Ok(())
}
