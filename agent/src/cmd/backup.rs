//! `backup`: what happens around the backup proper (see [`crate::backup`]): the plan from the
//! command line, the status endpoint, the stop signals, the vCenter session, and the result —
//! on stdout, and in `--result-file` on every outcome. Exit: 0 done, 1 the backup failed, 2 it
//! could not start (the result says why in both).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use sendense_contract::AgentReason;
use sendense_contract::cli::BackupArgs;
use sendense_contract::progress::Stage;
use sendense_contract::result::{BackupResult, TERMINATION_MESSAGE_LIMIT, compact_json};
use sendense_vsphere::{VSphere, VSphereError};

use super::{Outcome, write_result_file};
use crate::backup::plan::{self, PlanError};
use crate::backup::progress::print_to_stderr;
use crate::backup::stop::{StopReason, stop_signal};
use crate::backup::{self, BackupPlan, LiveProgress, vsphere_reason};
use crate::status;

/// Why a backup could not start.
#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("--status-addr {addr}: cannot listen: {source}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("connecting to vCenter: {0}")]
    Connect(#[source] VSphereError),
    #[error("stopped while connecting to vCenter: {0}")]
    Stopped(StopReason),
    #[error("the status endpoint ended")]
    StatusEnded,
    #[error("the progress reporter ended")]
    ProgressEnded,
}

impl StartError {
    fn reason(&self) -> AgentReason {
        match self {
            StartError::Plan(e) => e.reason(),
            StartError::Listen { .. } | StartError::StatusEnded => AgentReason::StatusListenFailed,
            StartError::Connect(e) => vsphere_reason(e, AgentReason::Unreachable),
            StartError::Stopped(_) => AgentReason::Stopped,
            StartError::ProgressEnded => AgentReason::Internal,
        }
    }
}

pub async fn run(args: BackupArgs) -> Result<Outcome> {
    let live = Arc::new(LiveProgress::default());
    let attempt = attempt(&args, &live).await;
    live.set_stage(Stage::Done);
    let (result, not_started) = match attempt {
        Ok(result) => (result, None),
        Err(e) => {
            let message = e.to_string();
            let result = BackupResult::early_failure(e.reason(), message.clone());
            (result, Some(message))
        }
    };
    let written = match &args.result_file {
        Some(f) => write_result_file(f, &compact_json(&result, TERMINATION_MESSAGE_LIMIT)),
        None => Ok(()),
    };
    println!("{}", serde_json::to_string(&result)?);
    written?;
    if let Some(message) = not_started {
        anyhow::bail!("{message}");
    }
    if let Some(e) = &result.error {
        eprintln!("sendense-agent: backup failed: {e}");
    }
    Ok(Outcome::of(result.ok))
}

/// The backup's result, or why it could not start (arguments, credentials, the status
/// listener, connecting to vCenter, or a task the backup needs that ended).
async fn attempt(args: &BackupArgs, live: &Arc<LiveProgress>) -> Result<BackupResult, StartError> {
    let (plan, vcenter) = BackupPlan::new(args, &plan::Process)?;
    // Bound before vCenter is contacted, so a bad address fails at once.
    let listener = match &args.status_addr {
        None => None,
        Some(addr) => Some(
            status::bind(addr)
                .await
                .map_err(|source| StartError::Listen {
                    addr: addr.clone(),
                    source,
                })?,
        ),
    };
    if let Some(addr) = listener.as_ref().and_then(|l| l.local_addr().ok()) {
        // The bound address: with port 0 the kernel chose it.
        tracing::info!(%addr, "serving progress on /progress");
    }
    let serve = async {
        match listener {
            Some(l) => status::serve(l, live.clone()).await,
            None => std::future::pending().await,
        }
    };
    let work = async {
        let stop = stop_signal(args.deadline_seconds.map(Duration::from_secs));
        tokio::pin!(stop);
        let vs = tokio::select! {
            connected = VSphere::connect(vcenter) => connected.map_err(StartError::Connect)?,
            why = &mut stop => return Err(StartError::Stopped(why)),
        };
        let result = backup::run(&vs, &plan, live, stop).await;
        vs.logout().await;
        Ok(result)
    };
    tokio::select! {
        r = work => r,
        _ = serve => Err(StartError::StatusEnded),
        _ = print_to_stderr(live) => Err(StartError::ProgressEnded),
    }
}
