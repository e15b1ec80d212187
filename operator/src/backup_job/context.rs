//! What every step of the BackupJob controller works with.

use std::time::Duration;

use kube::Client;
use kube::runtime::events::Recorder;

use crate::metrics::Metrics;
use crate::resources::PodSettings;

pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Metrics,
    pub images: PodSettings,
    /// Deadline of each vCenter call the operator makes (VM lookup, snapshot confirmation).
    pub vcenter_timeout: Duration,
    /// Namespace of the VM Leases (one backup per VM at a time, cluster-wide).
    pub lease_namespace: String,
    /// The Secret (in `lease_namespace`, the operator's own) holding the NBD CA.
    pub nbd_ca_secret: String,
    /// That Secret as its watch (by name) last showed it: the CA is not read per attempt.
    /// None, or not holding it: read from the API server.
    pub nbd_ca: Option<kube::runtime::reflector::Store<k8s_openapi::api::core::v1::Secret>>,
    /// Serializes port allocation in this process. Across processes and restarts the truth is
    /// the jobs' status, read fresh from the API server under this lock and written before it
    /// is released.
    pub allocation: tokio::sync::Mutex<()>,
    /// What the controller reads from its watches, and remembers in this process.
    pub caches: super::caches::Caches,
}

impl Context {
    /// The pods' ServiceAccount exists (made when missing), asked once in a while, not per pod.
    pub async fn ensure_account(
        &self,
        ns: &str,
        account: Option<&str>,
    ) -> Result<(), crate::children::ApiError> {
        let Some(name) = account else { return Ok(()) };
        if self.caches.account_known(ns, name) {
            return Ok(());
        }
        crate::children::ensure_service_account(&self.client, ns, Some(name)).await?;
        self.caches.account_ensured(ns, name);
        Ok(())
    }
}
