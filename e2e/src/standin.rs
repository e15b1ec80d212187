//! A node stand-in process for a test: registers its own Node (a unique name), runs the pods
//! bound to it, and is stopped (SIGTERM, then SIGKILL) when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Node;
use kube::Api;

use crate::{client, kubeconfig};

pub struct StandIn {
    child: Child,
    pub node: String,
    pub root: PathBuf,
}

/// A name with a random suffix.
pub fn unique(prefix: &str) -> String {
    use std::collections::hash_map::RandomState;
    use std::hash::BuildHasher;
    format!(
        "{prefix}-{:08x}",
        RandomState::new().hash_one(std::time::Instant::now()) as u32
    )
}

impl StandIn {
    /// Starts `binary` (the node-standin executable); `path`: directories searched for
    /// container commands before the host's PATH.
    pub async fn start(binary: &Path, path: &[PathBuf], extra: &[&str]) -> Result<Self> {
        let node = unique("standin");
        let root = crate::scratch_dir().join(&node);
        let mut cmd = Command::new(binary);
        cmd.arg("--kubeconfig")
            .arg(kubeconfig())
            .args(["--node", &node, "--restart-backoff-ms", "500", "--root"])
            .arg(&root)
            .args(extra);
        if !path.is_empty() {
            cmd.arg("--path").arg(std::env::join_paths(path)?);
        }
        let child = cmd.spawn().context("starting node-standin")?;
        let mut standin = Self { child, node, root };
        let nodes: Api<Node> = Api::all(client().await?);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let mut last_err = None;
        loop {
            // Transient API errors are retried until the deadline; the last one is reported.
            match nodes.get_opt(&standin.node).await {
                Ok(n) => {
                    let ready = n
                        .and_then(|n| n.status)
                        .and_then(|s| s.conditions)
                        .is_some_and(|c| {
                            c.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                        });
                    if ready {
                        return Ok(standin);
                    }
                }
                Err(e) => last_err = Some(e),
            }
            if let Some(status) = standin.child.try_wait()? {
                bail!(
                    "node-standin for node {} exited before the node became Ready: {status}",
                    standin.node
                );
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "node {} did not become Ready within 30s (last error: {last_err:?})",
                    standin.node
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Pins a pod spec (JSON) to this stand-in's node with a nodeSelector on its hostname
    /// label, replacing any nodeSelector it had.
    pub fn pin(&self, pod_spec: &mut serde_json::Value) {
        pod_spec["nodeSelector"] = serde_json::json!({"kubernetes.io/hostname": self.node});
    }

    /// All container logs of pods still on this node, for a failing test's message.
    pub fn logs(&self) -> String {
        pod_logs(&self.root)
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
                let _ = std::fs::remove_dir_all(&self.root);
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// The last lines of every container log under a stand-in root.
pub fn pod_logs(root: &Path) -> String {
    let mut out = String::new();
    // <root>/<node>/pods/<ns>_<pod>_<uid>/logs/<container>.log
    let Ok(nodes) = std::fs::read_dir(root) else {
        return out;
    };
    let pods = nodes
        .flatten()
        .filter_map(|n| std::fs::read_dir(n.path().join("pods")).ok())
        .flat_map(|p| p.flatten());
    for pod in pods {
        let Ok(logs) = std::fs::read_dir(pod.path().join("logs")) else {
            continue;
        };
        for log in logs.flatten() {
            let text = std::fs::read_to_string(log.path()).unwrap_or_default();
            let tail: String = text
                .lines()
                .rev()
                .take(20)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            out.push_str(&format!(
                "--- {}/{}\n{tail}\n",
                pod.file_name().to_string_lossy(),
                log.file_name().to_string_lossy()
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn pod_logs_are_found_under_each_node() {
        let root = std::env::temp_dir().join(format!("standin-logs-{}", std::process::id()));
        let logs = root.join("node-a/pods/ns_web_uid/logs");
        std::fs::create_dir_all(&logs).expect("dirs");
        std::fs::write(logs.join("agent.log"), "first\nlast line\n").expect("log");
        let text = super::pod_logs(&root);
        let _ = std::fs::remove_dir_all(&root);
        assert!(
            text.contains("ns_web_uid/agent.log") && text.contains("last line"),
            "{text}"
        );
    }
}
