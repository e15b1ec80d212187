//! The operator's RBAC as `kubectl auth can-i` sees it: one line per rule of
//! charts/sendense/templates/_helpers.tpl (and config/rbac/), with its reason, expected allowed;
//! and the things the operator must not be able to do, expected denied. The chart tests run it
//! against a release's ServiceAccount, so the table is the RBAC's documentation that cannot go
//! stale.

use std::time::Duration;

use anyhow::{Result, bail};
use sendense_e2e::{kubectl, wait_until};

/// Where a check is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum At {
    /// Every namespace the operator watches: all (`-A`) for an all-namespaces install, the
    /// watched namespace otherwise.
    Watched,
    /// The namespace of the VM Leases and the NBD CA (the release namespace; or watchNamespace).
    Own,
    /// A namespace Sendense serves (rbac.secretNamespaces; or watchNamespace).
    Served,
    /// A namespace Sendense does not serve.
    Unserved,
    /// Across all namespaces (`-A`), whatever the install.
    AllNamespaces,
    /// A cluster-scoped resource (no namespace).
    Cluster,
}

/// One `kubectl auth can-i` question per verb and resource, and the answer expected.
#[derive(Debug, Clone, Copy)]
pub struct Check {
    pub allowed: bool,
    pub verbs: &'static [&'static str],
    /// `resource[.group][/name]`, as kubectl takes it.
    pub resources: &'static [&'static str],
    pub subresource: Option<&'static str>,
    pub at: At,
    pub why: &'static str,
}

const fn allow(
    at: At,
    verbs: &'static [&'static str],
    resources: &'static [&'static str],
    why: &'static str,
) -> Check {
    Check {
        allowed: true,
        verbs,
        resources,
        subresource: None,
        at,
        why,
    }
}

const fn deny(
    at: At,
    verbs: &'static [&'static str],
    resources: &'static [&'static str],
    why: &'static str,
) -> Check {
    Check {
        allowed: false,
        ..allow(at, verbs, resources, why)
    }
}

const fn sub(mut c: Check, subresource: &'static str) -> Check {
    c.subresource = Some(subresource);
    c
}

const KINDS: &[&str] = &[
    "sourcenodes.sendense.io",
    "repositories.sendense.io",
    "backupjobs.sendense.io",
    "restorejobs.sendense.io",
    "backupschedules.sendense.io",
];
const CA: &str = "secrets/sendense-nbd-ca";

/// Every rule the operator has, in any install. Keep in step with _helpers.tpl.
pub const ALLOWED: &[Check] = &[
    allow(
        At::Cluster,
        &["get"],
        &[
            "customresourcedefinitions.apiextensions.k8s.io/sourcenodes.sendense.io",
            "customresourcedefinitions.apiextensions.k8s.io/repositories.sendense.io",
            "customresourcedefinitions.apiextensions.k8s.io/backupjobs.sendense.io",
            "customresourcedefinitions.apiextensions.k8s.io/restorepoints.sendense.io",
            "customresourcedefinitions.apiextensions.k8s.io/restorejobs.sendense.io",
            "customresourcedefinitions.apiextensions.k8s.io/backupschedules.sendense.io",
        ],
        "the CRD check at startup, by name",
    ),
    allow(
        At::Watched,
        &["get", "list", "watch"],
        KINDS,
        "the controllers' caches; a BackupJob's references read by name",
    ),
    allow(
        At::Watched,
        &["create", "patch", "delete"],
        &["backupjobs.sendense.io"],
        "the finalizer sendense.io/cleanup of a running job; a schedule's jobs made and removed",
    ),
    allow(
        At::Watched,
        &["get", "list", "create", "patch", "delete"],
        &["restorepoints.sendense.io"],
        "made from a committed manifest (get, then apply); listed for a chain parent; retention's",
    ),
    sub(
        allow(
            At::Watched,
            &["patch"],
            KINDS,
            "status written by server-side apply",
        ),
        "status",
    ),
    allow(
        At::Watched,
        &["get", "list", "watch", "create", "patch", "delete"],
        &["pods"],
        "hub, agent, probe and cleanup pods: applied, watched, deleted; the hub annotated to commit",
    ),
    sub(
        allow(
            At::Watched,
            &["get"],
            &["pods"],
            "the repository probe's log lists the manifests",
        ),
        "log",
    ),
    allow(
        At::Watched,
        &["create", "patch"],
        &["networkpolicies.networking.k8s.io"],
        "each job's two NetworkPolicies (hub from its agents, agent from the operator): applied",
    ),
    allow(
        At::Watched,
        &["get", "create", "patch"],
        &["persistentvolumeclaims"],
        "a Repository's claim: read by name, created from its claimTemplate",
    ),
    allow(
        At::Watched,
        &["get", "create", "patch"],
        &["serviceaccounts"],
        "the hub's and agent's accounts, created when missing",
    ),
    allow(
        At::Watched,
        &["create", "patch"],
        &["events.events.k8s.io"],
        "Events on the three kinds (kube's Recorder)",
    ),
    allow(
        At::Own,
        &["get", "create", "update", "delete"],
        &["leases.coordination.k8s.io"],
        "one Lease per VM being backed up",
    ),
    allow(
        At::Own,
        &["get", "update"],
        &[CA],
        "the NBD CA, read and rotated",
    ),
    allow(
        At::Own,
        &["list", "watch"],
        &[CA],
        "the NBD CA watched by name (not read per job)",
    ),
    allow(
        At::Own,
        &["create"],
        &["secrets"],
        "the NBD CA created at first use (create cannot be limited by name)",
    ),
    allow(
        At::Served,
        &["get"],
        &["secrets"],
        "a SourceNode's vCenter credentials, by name",
    ),
    allow(
        At::Served,
        &["create", "patch", "delete"],
        &["secrets"],
        "each job's <job>-nbd-tls Secret: applied, deleted with its pods",
    ),
    allow(
        At::Served,
        &["get"],
        &["configmaps"],
        "a SourceNode's CA bundle ConfigMap, by name",
    ),
];

/// What the operator must not be able to do, in any install.
pub const DENIED: &[Check] = &[
    deny(
        At::AllNamespaces,
        &["get", "list", "watch"],
        &["secrets"],
        "no Secret anywhere but where served",
    ),
    deny(
        At::Served,
        &["list", "watch"],
        &["secrets"],
        "Secrets are read by name: never enumerated",
    ),
    deny(
        At::Own,
        &["list", "watch"],
        &["secrets"],
        "... not even its own namespace's",
    ),
    deny(
        At::Unserved,
        &["get", "create", "update", "patch", "delete"],
        &["secrets", CA],
        "nothing of a namespace not served",
    ),
    deny(
        At::Unserved,
        &["get"],
        &["configmaps"],
        "ConfigMaps only where SourceNodes are served",
    ),
    deny(
        At::Served,
        &["list"],
        &["configmaps"],
        "ConfigMaps are read by name",
    ),
    deny(
        At::Watched,
        &["update", "delete", "deletecollection"],
        &["persistentvolumeclaims"],
        "backups outlive the Repository: claims are never deleted",
    ),
    deny(
        At::Watched,
        &["list", "watch"],
        &["persistentvolumeclaims"],
        "claims are read by name",
    ),
    deny(
        At::Watched,
        &["update", "deletecollection", "watch"],
        &["restorepoints.sendense.io"],
        "the volume is the source of truth: restore points deleted one by one, by retention only",
    ),
    deny(
        At::Watched,
        &["create", "update", "delete"],
        &[
            "sourcenodes.sendense.io",
            "repositories.sendense.io",
            "restorejobs.sendense.io",
            "backupschedules.sendense.io",
        ],
        "users' objects: only status and the finalizer are written",
    ),
    deny(
        At::Watched,
        &["update", "deletecollection"],
        &["backupjobs.sendense.io"],
        "a schedule's jobs are created and deleted one by one, never rewritten",
    ),
    deny(
        At::Watched,
        &["update", "deletecollection"],
        &["pods"],
        "pods are applied, not replaced",
    ),
    sub(
        deny(
            At::Watched,
            &["create", "get"],
            &["pods"],
            "no shell in any pod",
        ),
        "exec",
    ),
    sub(
        deny(
            At::Watched,
            &["create", "get"],
            &["pods"],
            "no attach to any pod",
        ),
        "attach",
    ),
    sub(
        deny(
            At::Watched,
            &["create", "get"],
            &["pods"],
            "no port-forward into any pod",
        ),
        "portforward",
    ),
    sub(
        deny(
            At::Watched,
            &["create"],
            &["serviceaccounts"],
            "no tokens of any account",
        ),
        "token",
    ),
    deny(
        At::Watched,
        &["get", "list", "watch", "create", "patch", "delete"],
        &["services"],
        "no Services: the agent dials the hub pod's IP",
    ),
    deny(
        At::Watched,
        &["delete", "update"],
        &["networkpolicies.networking.k8s.io"],
        "no NetworkPolicy of anyone else is removed or rewritten; a job's go with it",
    ),
    deny(
        At::Watched,
        &["create", "update", "delete"],
        &[
            "roles.rbac.authorization.k8s.io",
            "rolebindings.rbac.authorization.k8s.io",
        ],
        "the ServiceAccounts it creates get no bindings",
    ),
    deny(
        At::Cluster,
        &["escalate", "bind", "create", "update"],
        &[
            "clusterroles.rbac.authorization.k8s.io",
            "clusterrolebindings.rbac.authorization.k8s.io",
        ],
        "no way to widen its own rights",
    ),
    deny(
        At::Cluster,
        &["impersonate"],
        &["users", "groups", "serviceaccounts"],
        "no other identity",
    ),
    deny(
        At::Cluster,
        &["update", "patch", "delete"],
        &["customresourcedefinitions.apiextensions.k8s.io/backupjobs.sendense.io"],
        "its CRDs are read, not changed",
    ),
    deny(
        At::Cluster,
        &["list", "create"],
        &["customresourcedefinitions.apiextensions.k8s.io"],
        "only Sendense's CRDs, by name",
    ),
    deny(
        At::Cluster,
        &["get"],
        &["customresourcedefinitions.apiextensions.k8s.io/widgets.example.com"],
        "... no other CRD",
    ),
    deny(
        At::Cluster,
        &["get", "list", "create"],
        &["nodes", "persistentvolumes", "namespaces"],
        "nothing cluster-scoped",
    ),
    deny(
        At::Watched,
        &["create"],
        &["deployments.apps", "daemonsets.apps", "jobs.batch"],
        "its only workloads are the pods above",
    ),
    deny(At::Watched, &["*"], &["*"], "no wildcard"),
];

/// Only for an all-namespaces install: what is allowed in one place is not in the other.
pub const DENIED_ALL_NAMESPACES: &[Check] = &[
    deny(
        At::Own,
        &["delete", "patch"],
        &[CA],
        "the CA is replaced, never removed",
    ),
    deny(
        At::Own,
        &["get", "update"],
        &["secrets/some-other-secret"],
        "in its own namespace, only the CA by name",
    ),
    deny(
        At::Own,
        &["get"],
        &["configmaps"],
        "its own namespace is not served unless listed",
    ),
    deny(
        At::Served,
        &["get", "create"],
        &["leases.coordination.k8s.io"],
        "Leases only in its own namespace",
    ),
    deny(
        At::AllNamespaces,
        &["get", "create"],
        &["leases.coordination.k8s.io"],
        "... not cluster-wide",
    ),
    deny(
        At::Served,
        &["update"],
        &["secrets", CA],
        "credentials Secrets are never changed",
    ),
];

/// Only for a namespaced install (watchNamespace): nothing outside its namespace.
pub const DENIED_NAMESPACED: &[Check] = &[
    deny(
        At::AllNamespaces,
        &["list", "watch"],
        &["pods", "services", "backupjobs.sendense.io"],
        "one namespace only",
    ),
    deny(
        At::Unserved,
        &["create", "delete"],
        &["pods"],
        "... no pod elsewhere",
    ),
    deny(
        At::Unserved,
        &["get", "create"],
        &["leases.coordination.k8s.io"],
        "... no Lease elsewhere",
    ),
];

/// The namespaces of an install, for `At`.
pub struct Namespaces<'a> {
    /// None: every namespace (an all-namespaces install).
    pub watched: Option<&'a str>,
    pub own: &'a str,
    pub served: &'a str,
    pub unserved: &'a str,
}

impl Namespaces<'_> {
    fn args(&self, at: At) -> Vec<String> {
        let ns = |n: &str| vec!["-n".to_owned(), n.to_owned()];
        match at {
            At::Watched => self.watched.map(ns).unwrap_or_else(|| vec!["-A".into()]),
            At::Own => ns(self.own),
            At::Served => ns(self.served),
            At::Unserved => ns(self.unserved),
            // kubectl checks a cluster-scoped resource in no namespace only with -A (else in
            // the kubeconfig's, with a warning).
            At::AllNamespaces | At::Cluster => vec!["-A".into()],
        }
    }
}

/// The answer of `kubectl auth can-i` for `account`; an answer with a warning (an unknown
/// resource type, a namespace given for a cluster-scoped one) fails, so a misspelt line cannot
/// pass as denied.
fn can_i(
    account: &str,
    verb: &str,
    resource: &str,
    sub: Option<&str>,
    at: &[String],
) -> Result<bool> {
    let mut args = vec!["auth", "can-i", "--as", account, verb, resource];
    let subresource = sub.map(|s| format!("--subresource={s}"));
    args.extend(subresource.as_deref());
    args.extend(at.iter().map(String::as_str));
    let out = kubectl(&args)?;
    let answer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    match (answer.as_str(), out.status.code(), stderr.is_empty()) {
        ("yes", Some(0), true) => Ok(true),
        ("no", Some(1), true) => Ok(false),
        _ => bail!("kubectl {}: {answer:?} {stderr}", args.join(" ")),
    }
}

/// Asks every question of `checks` for `account` (`system:serviceaccount:NS:NAME`) and fails
/// naming every answer that differs. The allowed ones are asked first, each until it is
/// allowed or 30 s pass (the API server's RBAC cache sees new bindings a moment after they are
/// created); once every binding has granted something, a denial is final and is asked once.
pub fn expect(account: &str, ns: &Namespaces, checks: &[&[Check]]) -> Result<()> {
    let mut wrong = Vec::new();
    let all: Vec<&Check> = checks.iter().flat_map(|c| c.iter()).collect();
    let (allowed, denied): (Vec<&Check>, Vec<&Check>) = all.into_iter().partition(|c| c.allowed);
    for c in allowed.into_iter().chain(denied) {
        let at = ns.args(c.at);
        for verb in c.verbs {
            for resource in c.resources {
                let asked = || can_i(account, verb, resource, c.subresource, &at);
                let answer = if c.allowed {
                    wait_until("the binding in effect", Duration::from_secs(30), || {
                        if asked()? { Ok(true) } else { bail!("denied") }
                    })
                    .or_else(|_| asked())?
                } else {
                    asked()?
                };
                if answer != c.allowed {
                    let sub = c.subresource.map(|s| format!(" --subresource={s}"));
                    wrong.push(format!(
                        "{} {verb} {resource}{} {}: expected {} ({})",
                        if answer { "ALLOWED" } else { "DENIED" },
                        sub.unwrap_or_default(),
                        at.join(" "),
                        if c.allowed { "allowed" } else { "denied" },
                        c.why
                    ));
                }
            }
        }
    }
    if !wrong.is_empty() {
        bail!(
            "the RBAC of {account} differs from the table:\n{}",
            wrong.join("\n")
        );
    }
    Ok(())
}
