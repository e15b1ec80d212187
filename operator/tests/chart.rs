//! The operator as users install it: `helm install` of charts/sendense into the local control
//! plane; the operator then runs as a pod (on the real node) under the chart's
//! ServiceAccount and RBAC only — no admin credentials — and backs up a VM of the simulator
//! through the same manifests a user applies. Its live /metrics passes `promtool check
//! metrics`, and the applied manifests diff empty afterwards (the operator writes only status,
//! which a Git source does not own).
//!
//! Needs `HELM` and `PROMTOOL` (the test command, e2e/run-tests.sh, builds and sets them).

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use sendense_crds::backup_job::Phase;
use sendense_crds::{Repository, SourceNode};
use sendense_e2e::{TestNamespace, client, kubeconfig, kubectl, kubectl_ok, repo_root};

mod support;
use support::{Bed, SERIAL, disk_file, rbac};

fn tool(var: &str) -> Result<String> {
    std::env::var(var).with_context(|| {
        format!("{var} is not set: the test command (make test) builds the chart tools and sets it")
    })
}

fn helm(args: &[&str]) -> Result<String> {
    let out = Command::new(tool("HELM")?)
        .arg("--kubeconfig")
        .arg(kubeconfig())
        .args(args)
        .output()?;
    if !out.status.success() {
        bail!(
            "helm {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test]
async fn the_chart_installs_an_operator_that_backs_up_under_its_own_rbac() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let promtool = tool("PROMTOOL")?;
    tool("HELM")?;
    // The whole backup in a namespace enforcing the `restricted` Pod Security Standard: the
    // operator's pod from the chart and every pod it creates are admitted there.
    let bed = Bed::start_restricted(1, (10650, 10670)).await?;
    let ns = bed.ns.name.clone();
    let chart = repo_root().join("charts/sendense");
    // A release name of its own: the chart's cluster-scoped objects are named after it, so a
    // failed earlier run cannot block this one.
    let release = ns.clone();
    helm(&[
        "install",
        &release,
        chart.to_str().context("path")?,
        "--namespace",
        &ns,
        "--set",
        &format!("watchNamespace={ns}"),
        // The images were loaded into the node (e2e/run-tests.sh): never pulled.
        "--set",
        "image.pullPolicy=Never",
        "--set",
        "agentImage.pullPolicy=Never",
        "--set",
        "vcenterProbeIntervalSeconds=10",
        "--set",
        "repositoryProbeIntervalSeconds=3600",
        "--set",
        "logLevel=debug",
        "--wait",
        "--timeout",
        "3m",
    ])?;

    // The operator runs as the chart's ServiceAccount, not as root, with its token only.
    let pods: Api<Pod> = Api::namespaced(client().await?, &ns);
    let operator = pods
        .list(
            &kube::api::ListParams::default()
                .labels(&format!("app.kubernetes.io/instance={release}")),
        )
        .await?
        .items
        .into_iter()
        .find(|p| {
            p.spec
                .as_ref()
                .is_some_and(|s| s.containers.iter().any(|c| c.name == "operator"))
        })
        .context("no operator pod from the chart")?;
    let spec = operator.spec.clone().unwrap_or_default();
    let account = spec.service_account_name.clone().unwrap_or_default();
    assert!(
        !account.is_empty() && account != "default",
        "the operator runs as the chart's own ServiceAccount, not {account:?}"
    );
    let sc = spec.security_context.clone().unwrap_or_default();
    assert_eq!(sc.run_as_non_root, Some(true));
    let rbac = kubectl(&[
        "auth",
        "can-i",
        "--list",
        "-n",
        &ns,
        &format!("--as=system:serviceaccount:{ns}:{account}"),
    ])?;
    let rbac = String::from_utf8_lossy(&rbac.stdout).into_owned();
    assert!(
        !rbac.contains("*.*"),
        "the chart's RBAC grants wildcards:\n{rbac}"
    );
    // Every rule, in the watched namespace only ("default" is not watched).
    let namespaces = rbac::Namespaces {
        watched: Some(&ns),
        own: &ns,
        served: &ns,
        unserved: "default",
    };
    rbac::expect(
        &format!("system:serviceaccount:{ns}:{account}"),
        &namespaces,
        &[rbac::ALLOWED, rbac::DENIED, rbac::DENIED_NAMESPACED],
    )?;

    bed.ready::<SourceNode>("vc").await?;
    bed.ready::<Repository>("primary").await?;
    let vm = "cbt-vm-0";
    bed.guest(&[
        "fill", "-vm", vm, "-disk", "2000", "-pattern", "random", "-seed", "7", "-count", "100",
        "-size", "64K",
    ]);
    let job_yaml = Bed::job_yaml("through-the-chart", vm, "full", "");
    bed.apply("job", &job_yaml)?;
    let job = bed
        .finished(
            "through-the-chart",
            Phase::Succeeded,
            Duration::from_secs(240),
        )
        .await?;
    bed.no_pods_remain().await?;
    for key in [2000, 2001] {
        bed.verify(&disk_file(&job, key), &bed.checksum(vm, key))?;
    }
    assert_eq!(bed.snapshots(vm), 0);

    // promtool accepts the live exposition, and the backup is in it.
    let ip = pods
        .get(&operator.metadata.name.clone().unwrap_or_default())
        .await?
        .status
        .and_then(|s| s.pod_ip)
        .context("the operator pod has no IP")?;
    let metrics = support::scrape_at(&format!("{ip}:8080")).await?;
    assert!(
        metrics.contains(&format!(
            "sendense_backups_total{{namespace=\"{ns}\",result=\"succeeded\",vm=\"cbt-vm-0\"}} 1"
        )),
        "{metrics}"
    );
    let mut check = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    {
        use std::io::Write;
        check
            .stdin
            .take()
            .context("stdin")?
            .write_all(metrics.as_bytes())?;
    }
    let out = check.wait_with_output()?;
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // GitOps: what was applied is still exactly what the live objects hold.
    for f in ["setup", "job"] {
        let file = bed.work.join(format!("{f}.yaml"));
        let out = kubectl(&["diff", "-n", &ns, "-f", file.to_str().context("path")?])?;
        assert!(
            out.status.success(),
            "kubectl diff of {f}.yaml is not empty:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    helm(&[
        "uninstall",
        &release,
        "--namespace",
        &ns,
        "--wait",
        "--timeout",
        "2m",
    ])?;
    Ok(())
}

/// An all-namespaces install serving one namespace (rbac.secretNamespaces): the operator's
/// ServiceAccount may do what each rule of the chart says, everywhere for the controllers'
/// objects, Secrets and ConfigMaps only in the namespace served, its Leases and the NBD CA only
/// in its own; and none of what it must not (support/rbac.rs lists both, with reasons).
#[tokio::test]
async fn an_all_namespaces_install_reads_secrets_only_where_it_serves() -> Result<()> {
    let _serial = SERIAL.lock().await;
    tool("HELM")?;
    let own = TestNamespace::create("sendense-rbac")?;
    let served = TestNamespace::create("sendense-served")?;
    let unserved = TestNamespace::create("sendense-unserved")?;
    let chart = repo_root().join("charts/sendense");
    // The release name is the namespace's: its cluster-scoped objects are its own.
    let release = own.name.clone();
    helm(&[
        "install",
        &release,
        chart.to_str().context("path")?,
        "--namespace",
        &own.name,
        "--set",
        &format!("rbac.secretNamespaces={{{}}}", served.name),
        "--set",
        "image.pullPolicy=Never",
        "--set",
        "agentImage.pullPolicy=Never",
    ])?;
    // The chart's ServiceAccount, as its Deployment names it.
    let account = kubectl_ok(&[
        "get",
        "deployment",
        "-n",
        &own.name,
        "-l",
        &format!("app.kubernetes.io/instance={release}"),
        "-o",
        "jsonpath={.items[0].spec.template.spec.serviceAccountName}",
    ])?;
    let namespaces = rbac::Namespaces {
        watched: None,
        own: &own.name,
        served: &served.name,
        unserved: &unserved.name,
    };
    let checked = rbac::expect(
        &format!("system:serviceaccount:{}:{}", own.name, account.trim()),
        &namespaces,
        &[rbac::ALLOWED, rbac::DENIED, rbac::DENIED_ALL_NAMESPACES],
    );
    helm(&["uninstall", &release, "--namespace", &own.name])?;
    checked
}

/// `helm template` only (no cluster): config/rbac/ (the kustomize install) holds the same
/// rules, comments included, as the chart renders with its default values.
#[test]
fn config_rbac_has_the_rules_of_the_chart() -> Result<()> {
    let out = Command::new(tool("HELM")?)
        .args(["template", "sendense"])
        .arg(repo_root().join("charts/sendense"))
        .args(["--namespace", "sendense-system"])
        .args(["--show-only", "templates/rbac.yaml"])
        .output()?;
    if !out.status.success() {
        bail!("helm template: {}", String::from_utf8_lossy(&out.stderr));
    }
    let rendered = String::from_utf8_lossy(&out.stdout).into_owned();
    // The rules of the object of that kind and name: the text after `rules:`.
    let rules_of = |text: &str, kind: &str, name: &str| -> Option<String> {
        text.split("\n---\n").find_map(|doc| {
            let (head, rules) = doc.split_once("\nrules:\n")?;
            let named = head.lines().any(|l| {
                l.trim_start()
                    .strip_prefix("name: ")
                    .map(|n| n.trim_matches('"'))
                    == Some(name)
            });
            (head.lines().any(|l| l == format!("kind: {kind}")) && named)
                .then(|| rules.trim_end().to_owned())
        })
    };
    for (file, kind, name) in [
        ("role.yaml", "ClusterRole", "sendense-operator"),
        (
            "secrets_role.yaml",
            "ClusterRole",
            "sendense-operator-secrets",
        ),
        ("namespace_role.yaml", "Role", "sendense-operator"),
    ] {
        let path = repo_root().join("config/rbac").join(file);
        let config = std::fs::read_to_string(&path)?;
        let want = rules_of(&rendered, kind, name)
            .with_context(|| format!("the chart renders no {kind} {name}:\n{rendered}"))?;
        let got = rules_of(&config, kind, name)
            .with_context(|| format!("{} has no {kind} {name}", path.display()))?;
        assert_eq!(
            got, want,
            "config/rbac/{file} differs from the chart's {kind} {name}"
        );
    }
    Ok(())
}

/// `helm template` only (no cluster): the images are tagged with the chart's appVersion, which
/// is the crates' version (the operator's default agent image and `make images` use it too),
/// and `global.imageRegistry` moves both the operator's and the agent's image to a mirror.
#[test]
fn global_image_registry_moves_both_images_to_the_mirror() -> Result<()> {
    let chart = repo_root().join("charts/sendense");
    let chart_yaml = std::fs::read_to_string(chart.join("Chart.yaml"))?;
    let app_version = chart_yaml
        .lines()
        .find_map(|l| l.strip_prefix("appVersion:"))
        .map(|v| v.trim().trim_matches('"').to_owned())
        .context("no appVersion in Chart.yaml")?;
    assert_eq!(app_version, env!("CARGO_PKG_VERSION"));
    let render = |extra: &[&str]| -> Result<String> {
        let out = Command::new(tool("HELM")?)
            .args(["template", "sendense"])
            .arg(&chart)
            .args(["--show-only", "templates/deployment.yaml"])
            .args(extra)
            .output()?;
        if !out.status.success() {
            bail!("helm template: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let default = render(&[])?;
    assert!(
        default.contains(&format!(
            "image: \"ghcr.io/sendense/sendense-operator:{app_version}\""
        )),
        "{default}"
    );
    assert!(
        default.contains(&format!(
            "value: \"ghcr.io/sendense/sendense-agent:{app_version}\""
        )),
        "{default}"
    );
    let mirrored = render(&["--set", "global.imageRegistry=registry.example:5000"])?;
    assert!(
        mirrored.contains(&format!(
            "image: \"registry.example:5000/sendense/sendense-operator:{app_version}\""
        )),
        "{mirrored}"
    );
    assert!(
        mirrored.contains(&format!(
            "value: \"registry.example:5000/sendense/sendense-agent:{app_version}\""
        )),
        "{mirrored}"
    );
    assert!(!mirrored.contains("ghcr.io"), "{mirrored}");
    assert!(
        mirrored.contains("imagePullPolicy: IfNotPresent"),
        "{mirrored}"
    );
    Ok(())
}
