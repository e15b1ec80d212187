//! The node stand-in against the real control plane: pods bound by the real scheduler run as
//! local processes, with init containers, Secret env, probes, exit codes, deletion, and
//! Deployments driven by the real controller-manager.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod, Secret};
use kube::api::{Api, DeleteParams, PostParams};
use sendense_e2e::standin::StandIn;
use sendense_e2e::{TestNamespace, client};

/// A stand-in running this package's node-standin binary, with commands found on the host's
/// PATH.
async fn start_standin() -> Result<StandIn> {
    StandIn::start(Path::new(env!("CARGO_BIN_EXE_node-standin")), &[], &[]).await
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

/// The status of the pod's container or init container `name`.
fn container_status<'a>(p: &'a Pod, name: &str) -> Option<&'a ContainerStatus> {
    let s = p.status.as_ref()?;
    s.container_statuses
        .iter()
        .flatten()
        .chain(s.init_container_statuses.iter().flatten())
        .find(|c| c.name == name)
}

/// `state.terminated.message` of the pod's container or init container `name`.
fn terminated_message(p: &Pod, name: &str) -> Option<String> {
    container_status(p, name)?
        .state
        .as_ref()?
        .terminated
        .as_ref()?
        .message
        .clone()
}

fn process_running(marker: &str) -> bool {
    Command::new("pgrep")
        .args(["-f", marker])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[tokio::test]
async fn pod_with_init_secret_env_and_tcp_readiness_runs_to_success() -> Result<()> {
    let standin = start_standin().await?;
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
    let standin = start_standin().await?;
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
    let standin = start_standin().await?;
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
    let standin = start_standin().await?;
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
    let standin = start_standin().await?;
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

#[tokio::test]
async fn termination_messages_come_from_each_containers_own_file_or_its_log() -> Result<()> {
    let standin = start_standin().await?;
    let ns = TestNamespace::create("standin-message")?;
    let pods: Api<Pod> = Api::namespaced(client().await?, &ns.name);
    // Both pods' main containers write their own words to the same path, /dev/termination-log,
    // while the other pod's runs, and check after a while that the file still holds their own:
    // each container binds its own file there in its own mount namespace.
    let own = |words: &str| {
        format!(
            "printf '{words}' > /dev/termination-log; sleep 3; \
             [ \"$(cat /dev/termination-log)\" = '{words}' ]"
        )
    };
    let mut a = serde_json::json!({
        "restartPolicy": "Never",
        "volumes": [{"name": "out", "emptyDir": {}}],
        "initContainers": [{
            "name": "init", "image": "x",
            "command": ["sh", "-c", "echo init-a > /dev/termination-log"]
        }],
        "containers": [
            {"name": "main", "image": "x", "command": ["sh", "-c", own("pod-a-main")]},
            {
                // A custom path inside a volume: the message is still what it wrote.
                "name": "custom", "image": "x",
                "command": ["sh", "-c", "printf pod-a-custom > /sendense-e2e/out/message; sleep 3"],
                "terminationMessagePath": "/sendense-e2e/out/message",
                "volumeMounts": [{"name": "out", "mountPath": "/sendense-e2e/out"}]
            }
        ]
    });
    let mut b = serde_json::json!({
        "restartPolicy": "Never",
        "containers": [
            {"name": "main", "image": "x", "command": ["sh", "-c", own("pod-b-main")]},
            {
                // Fails without writing a message: the last 80 lines of its output are the message.
                "name": "fallback", "image": "x",
                "command": ["sh", "-c", "sleep 1; for i in $(seq 1 100); do echo line-$i; done; exit 2"],
                "terminationMessagePolicy": "FallbackToLogsOnError"
            },
            {
                // Fails having written a message: the file wins over the output.
                "name": "written", "image": "x",
                "command": ["sh", "-c", "echo noise; printf own-words > /dev/termination-log; exit 3"],
                "terminationMessagePolicy": "FallbackToLogsOnError"
            },
            {
                // Succeeds without a message: no fallback on exit 0, so no message.
                "name": "quiet", "image": "x",
                "command": ["sh", "-c", "echo chatter"],
                "terminationMessagePolicy": "FallbackToLogsOnError"
            }
        ]
    });
    // Appends, so a file carried over from the failed first run would show in the second's.
    let flaky = "n=$(cat /sendense-e2e/state/count 2>/dev/null || echo 0); n=$((n+1)); \
                 echo $n > /sendense-e2e/state/count; printf attempt-$n >> /dev/termination-log; \
                 [ $n -ge 2 ]";
    let mut restarts = serde_json::json!({
        "restartPolicy": "OnFailure",
        "volumes": [{"name": "state", "emptyDir": {}}],
        "containers": [{
            "name": "flaky", "image": "x", "command": ["sh", "-c", flaky],
            "volumeMounts": [{"name": "state", "mountPath": "/sendense-e2e/state"}]
        }]
    });
    for (name, spec) in [
        ("msg-a", &mut a),
        ("msg-b", &mut b),
        ("msg-restart", &mut restarts),
    ] {
        standin.pin(spec);
        let pod: Pod =
            serde_json::from_value(serde_json::json!({"metadata": {"name": name}, "spec": spec}))?;
        pods.create(&PostParams::default(), &pod).await?;
    }

    let running = |p: &Pod| {
        container_status(p, "main")
            .and_then(|c| c.state.as_ref())
            .is_some_and(|s| s.running.is_some())
    };
    let mut together = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let (a, b, restarted) = loop {
        let (a, b, r) = (
            pods.get("msg-a").await?,
            pods.get("msg-b").await?,
            pods.get("msg-restart").await?,
        );
        together |= running(&a) && running(&b);
        if [&a, &b, &r]
            .iter()
            .all(|p| matches!(phase(p).as_str(), "Succeeded" | "Failed"))
        {
            break (a, b, r);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "pods did not end within 60s: {:?} {:?} {:?}",
                a.status,
                b.status,
                r.status
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        together,
        "the two pods' main containers ran at the same time"
    );

    assert_eq!(phase(&a), "Succeeded", "status: {:?}", a.status);
    assert_eq!(terminated_message(&a, "init").as_deref(), Some("init-a\n"));
    assert_eq!(
        terminated_message(&a, "main").as_deref(),
        Some("pod-a-main")
    );
    assert_eq!(
        terminated_message(&a, "custom").as_deref(),
        Some("pod-a-custom")
    );

    assert_eq!(phase(&b), "Failed", "status: {:?}", b.status);
    assert_eq!(exit_code(&b, "main"), Some(0), "status: {:?}", b.status);
    assert_eq!(
        terminated_message(&b, "main").as_deref(),
        Some("pod-b-main")
    );
    let tail: String = (21..=100).map(|i| format!("line-{i}\n")).collect();
    assert_eq!(terminated_message(&b, "fallback"), Some(tail));
    assert_eq!(exit_code(&b, "fallback"), Some(2));
    assert_eq!(
        terminated_message(&b, "written").as_deref(),
        Some("own-words")
    );
    assert_eq!(terminated_message(&b, "quiet"), None);

    assert_eq!(phase(&restarted), "Succeeded");
    let flaky = container_status(&restarted, "flaky").context("flaky status")?;
    assert_eq!(flaky.restart_count, 1);
    assert_eq!(
        terminated_message(&restarted, "flaky").as_deref(),
        Some("attempt-2"),
        "every run starts from an empty file"
    );
    let last = flaky
        .last_state
        .as_ref()
        .and_then(|s| s.terminated.as_ref())
        .and_then(|t| t.message.clone());
    assert_eq!(
        last.as_deref(),
        Some("attempt-1"),
        "lastState keeps the failed run's message"
    );

    // The writes went to the containers' own files, never to the host's mount point.
    let host = std::fs::read("/dev/termination-log").unwrap_or_default();
    assert!(
        host.is_empty(),
        "the host's /dev/termination-log is untouched: {:?}",
        String::from_utf8_lossy(&host)
    );
    Ok(())
}
