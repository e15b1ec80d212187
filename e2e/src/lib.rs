//! Helpers for Sendense's end-to-end tests against the real local control plane
//! (`make cluster-up`): where the kubeconfig and kubectl are, namespaces per test, and bounded
//! waits. Nothing here talks to a fake; everything goes to the running kube-apiserver.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Root of the repository (for manifests under config/ and e2e/). Taken from the running test's
/// `CARGO_MANIFEST_DIR` (every crate of the workspace is one level below the root): the
/// compile-time value can name another clone whose build the shared target directory reused.
pub fn repo_root() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .join("..")
}

/// Cache directory shared with the shell scripts (e2e/cluster/env.sh).
fn cache_dir() -> PathBuf {
    std::env::var_os("SENDENSE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
            Path::new(&home).join(".cache/sendense")
        })
}

/// Where tests keep files that pods or non-root test processes read: /var/tmp (or
/// $SENDENSE_SCRATCH), outside root's home and private /tmp directories, readable by the pods'
/// non-root users.
pub fn scratch_dir() -> PathBuf {
    std::env::var_os("SENDENSE_SCRATCH")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp"))
}

/// The port the operator's metrics server bound, read from its log (`log`, where the child's
/// output goes): the operator is started with `SENDENSE_METRICS_ADDR=127.0.0.1:0`, so the
/// kernel picks a free port and no other process can take it between a choice and the bind.
/// Only the log after its first `from` bytes is read (a log appended to by an earlier run of
/// the operator). Waits at most `within`; fails early when the child exits.
pub fn bound_metrics_port(
    child: &mut std::process::Child,
    log: &Path,
    from: usize,
    within: Duration,
) -> Result<u16> {
    let deadline = Instant::now() + within;
    loop {
        let all = std::fs::read(log).unwrap_or_default();
        let text = String::from_utf8_lossy(all.get(from..).unwrap_or_default()).into_owned();
        if let Some(port) = text
            .lines()
            .map(strip_ansi)
            .filter(|l| l.contains("serving /metrics"))
            .find_map(|l| {
                let addr = l.split("addr=").nth(1)?.split_whitespace().next()?;
                addr.rsplit(':').next()?.parse::<u16>().ok()
            })
        {
            return Ok(port);
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "the operator exited ({status}) before serving its metrics; log {}:\n{text}",
                log.display()
            );
        }
        if Instant::now() >= deadline {
            bail!(
                "the operator did not report its metrics address within {within:?}; log {}:\n{text}",
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `s` without ANSI colour sequences.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ ... final byte in @..~
            for d in chars.by_ref() {
                if ('@'..='~').contains(&d) && d != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The admin kubeconfig of the local control plane: $KUBECONFIG when set, else where
/// e2e/cluster/up.sh writes it.
pub fn kubeconfig() -> PathBuf {
    if let Some(p) = std::env::var_os("KUBECONFIG") {
        return PathBuf::from(p);
    }
    let state = std::env::var_os("SENDENSE_CLUSTER_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("cluster"));
    state.join("admin.kubeconfig")
}

/// The kubectl to use: $KUBECTL (the Makefile sets it to one matching the control plane).
pub fn kubectl_path() -> String {
    std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into())
}

/// Runs kubectl against the local control plane. The command has a deadline: kubectl's own
/// `--request-timeout`, so no test can hang on a dead apiserver.
pub fn kubectl(args: &[&str]) -> Result<Output> {
    let kubeconfig = kubeconfig();
    Command::new(kubectl_path())
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .arg("--request-timeout=30s")
        .args(args)
        .output()
        .with_context(|| format!("running {} {}", kubectl_path(), args.join(" ")))
}

/// Runs kubectl and fails with its stderr unless it succeeds; returns stdout.
pub fn kubectl_ok(args: &[&str]) -> Result<String> {
    let out = kubectl(args)?;
    if !out.status.success() {
        bail!(
            "kubectl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A kube-rs client for the local control plane.
pub async fn client() -> Result<kube::Client> {
    let kubeconfig = kube::config::Kubeconfig::read_from(kubeconfig())
        .context("reading the local control plane's kubeconfig: is `make cluster-up` done?")?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
    Ok(kube::Client::try_from(config)?)
}

/// Retries `check` until it returns Ok or `timeout` passes; returns the last error then.
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<T>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => {
                return Err(e.context(format!("{what}: not reached within {timeout:?}")));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

/// Installs the committed CRDs (config/crd) and waits until all are Established. Idempotent,
/// so every test may call it.
pub fn install_crds() -> Result<()> {
    let dir = repo_root().join("config/crd");
    kubectl_ok(&[
        "apply",
        "--server-side",
        "--force-conflicts",
        "-k",
        path_str(&dir)?,
    ])?;
    for crd in [
        "sourcenodes.sendense.io",
        "repositories.sendense.io",
        "backupjobs.sendense.io",
        "restorepoints.sendense.io",
        "restorejobs.sendense.io",
        "backupschedules.sendense.io",
    ] {
        // Read the condition rather than `kubectl wait`, which errors out ("accessor error")
        // on a CRD created a moment ago whose status has no conditions yet.
        wait_until(
            &format!("CRD {crd} Established"),
            Duration::from_secs(60),
            || {
                let status = kubectl_ok(&[
                    "get",
                    &format!("crd/{crd}"),
                    "-o",
                    "jsonpath={.status.conditions[?(@.type==\"Established\")].status}",
                ])?;
                if status.trim() == "True" {
                    Ok(())
                } else {
                    anyhow::bail!("Established is {status:?}")
                }
            },
        )?;
    }
    Ok(())
}

/// A namespace created for one test, labelled so leftovers can be found, deleted on drop
/// (without waiting: the controller-manager finishes it).
pub struct TestNamespace {
    pub name: String,
}

impl TestNamespace {
    pub fn create(prefix: &str) -> Result<Self> {
        let suffix: u32 =
            std::process::id() ^ (Instant::now().elapsed().subsec_nanos()) ^ rand_seed();
        let name = format!("{prefix}-{:08x}", suffix);
        kubectl_ok(&["create", "namespace", &name])?;
        kubectl_ok(&["label", "namespace", &name, "sendense.io/e2e=true"])?;
        Ok(Self { name })
    }

    /// A namespace enforcing the `restricted` Pod Security Standard (latest version).
    pub fn create_restricted(prefix: &str) -> Result<Self> {
        let ns = Self::create(prefix)?;
        kubectl_ok(&[
            "label",
            "namespace",
            &ns.name,
            "pod-security.kubernetes.io/enforce=restricted",
            "pod-security.kubernetes.io/enforce-version=latest",
        ])?;
        Ok(ns)
    }
}

fn rand_seed() -> u32 {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let mut h = RandomState::new().build_hasher();
    h.write_u64(0);
    h.finish() as u32
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let _ = kubectl(&["delete", "namespace", &self.name, "--wait=false"]);
    }
}

pub mod oci;
pub mod real_node;
pub mod vcsim;

pub fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("non-UTF-8 path {}", p.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bound_port_is_read_from_a_coloured_log_line() {
        let dir = scratch_dir().join(format!("sendense-port-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let log = dir.join("operator.log");
        std::fs::write(
            &log,
            "\u{1b}[2m2026\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m \u{1b}[2mruntime\u{1b}[0m: serving /metrics, /healthz, /readyz \u{1b}[3maddr\u{1b}[0m\u{1b}[2m=\u{1b}[0m127.0.0.1:41234\n",
        )
        .expect("log");
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .expect("sleep");
        let port = bound_metrics_port(&mut child, &log, 0, Duration::from_secs(2));
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(port.expect("port"), 41234);
    }
}
