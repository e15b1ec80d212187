//! The probes of one running container, on the kubelet's schedule: the startup probe first;
//! once it passes, readiness (which moves the container's `ready`) and liveness side by side.
//! A startup or liveness probe failing failureThreshold times in a row ends the run.

use crate::node::probe::{self, Timing};
use crate::node::process::ProcessSpec;

use super::supervisor::Supervisor;

impl Supervisor {
    /// Runs startup, then readiness and liveness probes; returns only when the container must be
    /// killed (startup or liveness failed failureThreshold times), saying why.
    pub(super) async fn probe_loop(&self) -> String {
        let c = &self.container;
        let pod_ip = self.state.pod_ip.as_str();
        // Exec probes run like the container (same program environment and mounts), but their
        // output is not the container's log.
        let exec_base = ProcessSpec {
            log: None,
            ..self.spec.clone()
        };
        if let Some(p) = &c.startup_probe {
            let t = Timing::of(p);
            tokio::time::sleep(t.initial_delay).await;
            let mut failures = 0;
            loop {
                match probe::attempt(p, c, pod_ip, &exec_base).await {
                    Ok(()) => break,
                    Err(e) => {
                        failures += 1;
                        if failures >= t.failure_threshold {
                            return format!("startup probe failed: {e}");
                        }
                    }
                }
                tokio::time::sleep(t.period).await;
            }
            let ready_now = c.readiness_probe.is_none() && !self.slot.is_init();
            self.set(|cs| {
                cs.started = Some(true);
                cs.ready = ready_now;
            })
            .await;
        }
        let readiness = async {
            let Some(p) = &c.readiness_probe else {
                return std::future::pending::<()>().await;
            };
            let t = Timing::of(p);
            tokio::time::sleep(t.initial_delay).await;
            let (mut ok, mut bad, mut ready) = (0, 0, false);
            loop {
                match probe::attempt(p, c, pod_ip, &exec_base).await {
                    Ok(()) => {
                        ok += 1;
                        bad = 0;
                    }
                    Err(_) => {
                        bad += 1;
                        ok = 0;
                    }
                }
                // Ready after successThreshold successes in a row, not ready after
                // failureThreshold failures in a row.
                let now_ready = if ready {
                    bad < t.failure_threshold
                } else {
                    ok >= t.success_threshold
                };
                if now_ready != ready {
                    ready = now_ready;
                    self.set(|cs| cs.ready = now_ready).await;
                }
                tokio::time::sleep(t.period).await;
            }
        };
        let liveness = async {
            let Some(p) = &c.liveness_probe else {
                return std::future::pending::<String>().await;
            };
            let t = Timing::of(p);
            tokio::time::sleep(t.initial_delay).await;
            let mut bad = 0;
            loop {
                match probe::attempt(p, c, pod_ip, &exec_base).await {
                    Ok(()) => bad = 0,
                    Err(e) => {
                        bad += 1;
                        if bad >= t.failure_threshold {
                            return format!("liveness probe failed: {e}");
                        }
                    }
                }
                tokio::time::sleep(t.period).await;
            }
        };
        // The readiness loop never ends; only a liveness failure returns.
        tokio::select! {
            _ = readiness => String::new(),
            why = liveness => why,
        }
    }
}
