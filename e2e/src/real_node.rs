//! The real node of the local control plane (e2e/cluster/node-up.sh: containerd, kubelet,
//! kube-proxy) for a test: finding it Ready, pinning a pod spec to it, loading image archives
//! into its containerd (no registry is reachable here), and a small busybox image made with the
//! project's OCI writer from the host's static busybox (Debian's busybox-static).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Node;
use kube::Api;

use crate::oci::{ContainerConfig, LayerInput, LayerSource, Owner, Reference, build_image};
use crate::{client, repo_root};

/// The taint node-up.sh registers the node with (SENDENSE_NODE_TAINT), so pods that do not
/// ask for the real node stay off it.
pub const TAINT_KEY: &str = "sendense.io/real-node";

/// The node's name (SENDENSE_NODE_NAME, as in e2e/cluster/env.sh).
pub fn node_name() -> String {
    std::env::var("SENDENSE_NODE_NAME").unwrap_or_else(|_| "sendense-node".into())
}

pub struct RealNode {
    pub name: String,
    pub node: Node,
}

impl RealNode {
    /// The real node, once its Ready condition is True (waits up to 60 s: right after
    /// node-up.sh it already is); None when the cluster runs without one (SENDENSE_NODE=0).
    pub async fn ready() -> Result<Option<Self>> {
        if std::env::var("SENDENSE_NODE").is_ok_and(|v| v == "0") {
            eprintln!("SENDENSE_NODE=0: no real node, test skipped");
            return Ok(None);
        }
        let name = node_name();
        let nodes: Api<Node> = Api::all(client().await?);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let last = match nodes.get_opt(&name).await {
                Ok(Some(node)) if is_ready(&node) => return Ok(Some(Self { name, node })),
                Ok(Some(_)) => "not Ready".to_owned(),
                Ok(None) => "not registered (is the node up? bash e2e/cluster/node-up.sh)".into(),
                Err(e) => e.to_string(),
            };
            if tokio::time::Instant::now() >= deadline {
                bail!("node {name} not Ready within 60s: {last}");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Pins a pod spec (JSON) to this node: a nodeSelector on its hostname label and a
    /// toleration of its taint.
    pub fn pin(&self, pod_spec: &mut serde_json::Value) {
        pod_spec["nodeSelector"] = serde_json::json!({"kubernetes.io/hostname": self.name});
        pod_spec["tolerations"] = serde_json::json!([
            {"key": TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}
        ]);
    }

    /// The node's InternalIP: the host's primary IPv4 address.
    pub fn internal_ip(&self) -> Option<String> {
        self.node
            .status
            .as_ref()?
            .addresses
            .as_ref()?
            .iter()
            .find(|a| a.type_ == "InternalIP")
            .map(|a| a.address.clone())
    }

    /// Imports image archives into the node's containerd (e2e/cluster/node-load.sh).
    pub fn load(&self, archives: &[&Path]) -> Result<()> {
        let script = repo_root().join("e2e/cluster/node-load.sh");
        let out = Command::new("bash")
            .arg(&script)
            .args(archives)
            .output()
            .with_context(|| format!("running {}", script.display()))?;
        if !out.status.success() {
            bail!(
                "loading {archives:?} into the node failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

fn is_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The busybox test image: /bin/busybox (static) with its applets as symlinks, /tmp, and an
/// /etc/passwd naming root and nobody.
pub const BUSYBOX_IMAGE: &str = "localhost/sendense/e2e-busybox:1";
/// The busybox image plus a static kubectl at /bin/kubectl: an in-cluster API client.
pub const KUBECTL_IMAGE: &str = "localhost/sendense/e2e-kubectl:1";
const BUSYBOX_APPLETS: &[&str] = &[
    "sh", "cat", "echo", "env", "hostname", "httpd", "id", "ls", "mkdir", "nc", "sleep", "timeout",
    "wget",
];

/// Builds the busybox image archive (once per test process) from the host's static busybox
/// and loads it into `node`. Returns the image reference.
pub fn load_busybox(node: &RealNode) -> Result<&'static str> {
    load_once(node, BUSYBOX_IMAGE, None)
}

/// Builds the kubectl image (once per test process) with `kubectl` (a static binary, as the
/// Go-built ones are) and loads it into `node`. Returns the image reference.
pub fn load_kubectl_image(node: &RealNode, kubectl: &Path) -> Result<&'static str> {
    load_once(node, KUBECTL_IMAGE, Some(kubectl))
}

fn load_once(
    node: &RealNode,
    reference: &'static str,
    kubectl: Option<&Path>,
) -> Result<&'static str> {
    static LOADED: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());
    let mut loaded = LOADED
        .lock()
        .map_err(|_| anyhow::anyhow!("an earlier image load panicked"))?;
    if !loaded.contains(&reference) {
        let dir = std::env::temp_dir().join(format!(
            "sendense-e2e-image-{}-{}",
            loaded.len(),
            std::process::id()
        ));
        let result =
            build_test_image(&dir, reference, kubectl).and_then(|archive| node.load(&[&archive]));
        let _ = std::fs::remove_dir_all(&dir);
        result?;
        loaded.push(reference);
    }
    Ok(reference)
}

/// Writes a busybox image archive (with `kubectl` at /bin/kubectl when given) into `dir`
/// (made afresh) and returns its path.
fn build_test_image(dir: &Path, reference: &str, kubectl: Option<&Path>) -> Result<PathBuf> {
    let busybox = Path::new("/bin/busybox");
    if !busybox.is_file() {
        bail!("/bin/busybox is missing: install Debian's busybox-static (e2e/install-deps.sh)");
    }
    let root = dir.join("root");
    let _ = std::fs::remove_dir_all(dir);
    for d in ["bin", "etc", "tmp"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    std::fs::copy(busybox, root.join("bin/busybox"))?;
    for applet in BUSYBOX_APPLETS {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))?;
    }
    if let Some(kubectl) = kubectl {
        std::fs::copy(kubectl, root.join("bin/kubectl"))
            .with_context(|| format!("copying {}", kubectl.display()))?;
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n",
    )?;
    std::fs::write(root.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n")?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777))?;

    let config = ContainerConfig {
        env: vec!["PATH=/bin".into(), "HOME=/tmp".into()],
        cmd: vec!["sh".into()],
        ..Default::default()
    };
    let layer = LayerInput {
        source: LayerSource::Dir {
            path: root.clone(),
            owner: Owner::Root,
        },
        created_by: "busybox (Debian busybox-static), its applets, kubectl for some".into(),
    };
    let archive = dir.join("image.oci.tar");
    build_image(
        &Reference::parse(reference)?,
        &config,
        0,
        &[layer],
        &archive,
    )?;
    Ok(archive)
}
