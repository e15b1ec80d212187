//! Why a backup stops early: SIGTERM (the pod is deleted), Ctrl-C, or its deadline. The copy is
//! abandoned; the snapshot is still removed.

use std::fmt;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Terminated,
    Interrupted,
    DeadlinePassed(Duration),
    /// SIGTERM could not be watched, so the backup does not start.
    NoSignalHandler,
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StopReason::Terminated => f.write_str("SIGTERM"),
            StopReason::Interrupted => f.write_str("interrupted"),
            StopReason::DeadlinePassed(d) => write!(f, "deadline of {}s passed", d.as_secs()),
            StopReason::NoSignalHandler => f.write_str("no SIGTERM handler"),
        }
    }
}

/// Resolves when the backup must stop: SIGTERM, Ctrl-C, or `deadline` after its first poll.
pub async fn stop_signal(deadline: Option<Duration>) -> StopReason {
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        return StopReason::NoSignalHandler;
    };
    let past_deadline = async {
        match deadline {
            Some(d) => {
                tokio::time::sleep(d).await;
                d
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = term.recv() => StopReason::Terminated,
        _ = tokio::signal::ctrl_c() => StopReason::Interrupted,
        d = past_deadline => StopReason::DeadlinePassed(d),
    }
}
