//! The vCenter session: login over SOAP, a deadline on every call, and one re-login when the
//! session has expired.
//!
//! The session lives in the HTTP client's cookie store (vim_rs' SOAP transport), so logging in
//! again on the same client replaces it for every stub built on that client.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use vim_rs::core::client::{
    Client, ClientBuilder, Error as VimError, TransportMode, VimClient, WireLoggingMode,
};
use vim_rs::mo::{ServiceInstance, SessionManager};
use vim_rs::types::structs::{ManagedObjectReference, UserSession};

use super::error::{from_vim, is_invalid_login, is_not_authenticated};
use super::tls::{self, Rejections};
use super::{VCenterConfig, VSphereError};

/// A logged-in connection to one vCenter. Cheap to share behind an `Arc`; calls may run
/// concurrently.
pub struct VSphere {
    pub(super) client: Arc<Client>,
    server: String,
    username: String,
    password: String,
    pub(super) call_timeout: Duration,
    pub(super) task_timeout: Duration,
    rejections: Rejections,
    /// Bumped by every successful re-login, so concurrent callers that all saw the session
    /// expire log in once, not once each.
    login_generation: AtomicU64,
    login_lock: tokio::sync::Mutex<()>,
    /// Set by `logout`: no call (and no silent re-login) after it.
    logged_out: AtomicBool,
}

impl fmt::Debug for VSphere {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VSphere")
            .field("server", &self.server)
            .field("username", &"<redacted>")
            .field("call_timeout", &self.call_timeout)
            .field("task_timeout", &self.task_timeout)
            .finish_non_exhaustive()
    }
}

/// One attempt of a call, before re-login is considered.
enum Attempt<T> {
    Done(Result<T, VSphereError>),
    NotAuthenticated,
}

impl VSphere {
    /// Connects and logs in. The whole exchange (service content, login) is bounded by twice
    /// `call_timeout`, each request by `call_timeout`.
    pub async fn connect(cfg: VCenterConfig) -> Result<VSphere, VSphereError> {
        let server = super::config::server_address(&cfg.url)?;
        let (tls_config, rejections) = tls::client_config(&cfg.tls)?;
        let http = reqwest::Client::builder()
            .cookie_store(true)
            .tls_backend_preconfigured(tls_config)
            .timeout(cfg.call_timeout)
            .connect_timeout(cfg.call_timeout)
            .build()
            .map_err(|e| VSphereError::Transport(format!("HTTP client: {e}")))?;
        // Summary wire logging also silences vim_rs' legacy trace lines, which would print whole
        // request bodies, the Login request and its password included.
        let builder = ClientBuilder::new(&server, http)
            .basic_authn(&cfg.username, &cfg.password)
            .app_details("sendense-agent", env!("CARGO_PKG_VERSION"))
            .transport(TransportMode::Soap)
            .wire_logging(WireLoggingMode::Summary);
        let what = format!("connecting to vCenter {server}");
        let after = cfg.call_timeout * 2;
        let client = match tokio::time::timeout(after, builder.build()).await {
            Err(_) => return Err(VSphereError::Timeout { what, after }),
            Ok(Err(e)) if is_invalid_login(&e) => {
                return Err(login_rejected(&server));
            }
            Ok(Err(e)) => return Err(timeout_or(e, &what, after, "Login", &rejections)),
            Ok(Ok(client)) => client,
        };
        tracing::info!(
            server = %server,
            about = %client.service_content().about.full_name,
            "logged in to vCenter"
        );
        Ok(VSphere {
            client,
            server,
            username: cfg.username,
            password: cfg.password,
            call_timeout: cfg.call_timeout,
            task_timeout: cfg.task_timeout,
            rejections,
            login_generation: AtomicU64::new(0),
            login_lock: tokio::sync::Mutex::new(()),
            logged_out: AtomicBool::new(false),
        })
    }

    /// The server's identity, read live (`RetrieveServiceContent`) after checking that the
    /// session is authenticated (logging in again if not): a probe of reachability, trust and
    /// credentials. E.g. "VMware vCenter Server 6.5.0 build-5973321".
    pub async fn about(&self) -> Result<String, VSphereError> {
        self.authenticated_session().await?;
        let content = self
            .call("RetrieveServiceContent", || async move {
                ServiceInstance::new(self.handle(), "ServiceInstance")
                    .retrieve_service_content()
                    .await
            })
            .await?;
        Ok(content.about.full_name)
    }

    /// The server's own identity, `about.instanceUuid` as read at login: one vCenter, whatever
    /// URL it is reached by. None for a server that reports none.
    pub fn instance_uuid(&self) -> Option<String> {
        self.client
            .service_content()
            .about
            .instance_uuid
            .clone()
            .filter(|u| !u.is_empty())
    }

    /// Ends the session (best effort, bounded by `call_timeout`). Later calls fail.
    pub async fn logout(&self) {
        self.logged_out.store(true, Ordering::Release);
        // Best effort (an abandoned session expires on its own): an unresponsive vCenter does
        // not hold the caller for a whole call timeout.
        let limit = self.call_timeout.min(std::time::Duration::from_secs(10));
        match tokio::time::timeout(limit, self.client.close()).await {
            Ok(Ok(())) => tracing::debug!(server = %self.server, "logged out of vCenter"),
            Ok(Err(e)) => tracing::debug!(server = %self.server, error = %e, "vCenter logout"),
            Err(_) => tracing::debug!(server = %self.server, "vCenter logout timed out"),
        }
    }

    /// The key of this connection's session (what vCenter's session list shows).
    pub async fn session_key(&self) -> Result<String, VSphereError> {
        self.authenticated_session().await
    }

    /// The key of the session, logging in again when the server has none for us. Property reads
    /// do not always fault without a session (the simulator answers them), so an absent
    /// `currentSession` counts as expiry too.
    async fn authenticated_session(&self) -> Result<String, VSphereError> {
        let generation = self.login_generation.load(Ordering::Acquire);
        if let Some(key) = self.current_session_key().await? {
            return Ok(key);
        }
        tracing::info!(server = %self.server, "vCenter reports no session; logging in again");
        self.relogin(generation).await?;
        self.current_session_key().await?.ok_or_else(|| {
            // No user name: with a Secret's keys swapped it is the password.
            VSphereError::Login(format!(
                "vCenter {} reports no session even right after a fresh login",
                self.server
            ))
        })
    }

    async fn current_session_key(&self) -> Result<Option<String>, VSphereError> {
        let session_manager = self
            .session_manager()
            .map_err(|e| from_vim("CurrentSession", e, &self.rejections))?
            .clone();
        let Some(mut props) = self
            .properties(&session_manager, &["currentSession"])
            .await?
        else {
            return Ok(None);
        };
        Ok(props
            .object::<UserSession>("currentSession")?
            .map(|s| s.key))
    }

    /// Ends other sessions by key, as an administrator does (and as expiry does).
    pub async fn terminate_sessions(&self, keys: &[String]) -> Result<(), VSphereError> {
        self.call("TerminateSession", || async move {
            SessionManager::new(self.handle(), &self.session_manager()?.value)
                .terminate_session(keys)
                .await
        })
        .await
    }

    pub(super) fn handle(&self) -> Arc<dyn VimClient> {
        self.client.clone()
    }

    fn session_manager(&self) -> Result<&ManagedObjectReference, VimError> {
        self.client
            .service_content()
            .session_manager
            .as_ref()
            .ok_or_else(|| VimError::ParseError("the server has no SessionManager".into()))
    }

    /// Runs one vCenter call (`method` names it in errors) with the call deadline; when the
    /// session is no longer authenticated, logs in again and runs it once more.
    pub(super) async fn call<T, Fut>(
        &self,
        method: &str,
        op: impl Fn() -> Fut,
    ) -> Result<T, VSphereError>
    where
        Fut: Future<Output = Result<T, VimError>>,
    {
        if self.logged_out.load(Ordering::Acquire) {
            return Err(VSphereError::Transport(format!(
                "{method}: this vCenter connection was logged out"
            )));
        }
        let generation = self.login_generation.load(Ordering::Acquire);
        match self.attempt(method, &op).await {
            Attempt::Done(result) => result,
            Attempt::NotAuthenticated => {
                tracing::info!(server = %self.server, method, "vCenter session expired; logging in again");
                self.relogin(generation).await?;
                match self.attempt(method, &op).await {
                    Attempt::Done(result) => result,
                    Attempt::NotAuthenticated => Err(VSphereError::Login(format!(
                        "{method}: the session is not authenticated even right after a fresh \
                         login"
                    ))),
                }
            }
        }
    }

    async fn attempt<T, Fut>(&self, method: &str, op: &impl Fn() -> Fut) -> Attempt<T>
    where
        Fut: Future<Output = Result<T, VimError>>,
    {
        let after = self.call_timeout;
        match tokio::time::timeout(after, op()).await {
            Err(_) => Attempt::Done(Err(VSphereError::Timeout {
                what: format!("{method} on vCenter {}", self.server),
                after,
            })),
            Ok(Ok(v)) => Attempt::Done(Ok(v)),
            Ok(Err(e)) if is_not_authenticated(&e) => Attempt::NotAuthenticated,
            Ok(Err(e)) => Attempt::Done(Err(timeout_or(
                e,
                &format!("{method} on vCenter {}", self.server),
                after,
                method,
                &self.rejections,
            ))),
        }
    }

    async fn relogin(&self, seen_generation: u64) -> Result<(), VSphereError> {
        // Waiting here is bounded: the holder's login is itself bounded by call_timeout.
        let _guard = self.login_lock.lock().await;
        if self.login_generation.load(Ordering::Acquire) != seen_generation {
            return Ok(()); // another caller logged in while we waited
        }
        let sm_id = self
            .session_manager()
            .map_err(|e| from_vim("Login", e, &self.rejections))?
            .value
            .clone();
        let sm = SessionManager::new(self.handle(), &sm_id);
        let what = format!("logging in again to vCenter {}", self.server);
        let after = self.call_timeout;
        match tokio::time::timeout(after, sm.login(&self.username, &self.password, None)).await {
            Err(_) => Err(VSphereError::Timeout { what, after }),
            Ok(Err(e)) if is_invalid_login(&e) => Err(login_rejected(&self.server)),
            Ok(Err(e)) => Err(timeout_or(e, &what, after, "Login", &self.rejections)),
            Ok(Ok(_)) => {
                self.login_generation.fetch_add(1, Ordering::AcqRel);
                tracing::info!(server = %self.server, "logged in to vCenter again");
                Ok(())
            }
        }
    }
}

/// Never quotes the user name: with a Secret's keys swapped it is the password, and this
/// message reaches status and Events.
fn login_rejected(server: &str) -> VSphereError {
    VSphereError::Login(format!(
        "vCenter {server} rejected the user name or its password (InvalidLogin)"
    ))
}

/// reqwest's own per-request timeout surfaces as an error: report it as a timeout too.
fn timeout_or(
    err: VimError,
    what: &str,
    after: Duration,
    method: &str,
    rejections: &Rejections,
) -> VSphereError {
    if let VimError::ReqwestError(e) = &err
        && e.is_timeout()
    {
        return VSphereError::Timeout {
            what: what.to_string(),
            after,
        };
    }
    from_vim(method, err, rejections)
}
