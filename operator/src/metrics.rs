//! The operator's Prometheus metrics and its `/metrics`, `/healthz`, `/readyz` endpoints (a
//! deliberately small HTTP/1.1 responder: three GET routes need no web framework).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// Reconciles started, by controller.
    pub reconcile_runs: IntCounterVec,
    /// Reconciles that returned an error, by controller and error label.
    pub reconcile_failures: IntCounterVec,
    /// Reconcile durations, by controller.
    pub reconcile_duration: HistogramVec,
    /// vCenter probes by outcome reason (Connected, LoginFailed, ...).
    pub probes: IntCounterVec,
    /// Backups that got their plan (ports, chain) and started.
    pub backups_started: IntCounter,
    /// Backups that ended, by namespace, VM and result (succeeded, failed).
    pub backups: IntCounterVec,
    /// Time from start to success of a backup.
    pub backup_duration: Histogram,
    /// Bytes read from snapshots and written to the repository, by namespace, VM and disk.
    pub bytes_copied: IntCounterVec,
    /// Failed jobs whose snapshot could not be confirmed removed.
    pub snapshot_cleanup_failures: IntCounterVec,
    /// BackupJobs by namespace and phase, refreshed from the controller's cache.
    pub jobs: IntGaugeVec,
    /// Hub ports held by active jobs, by namespace and repository.
    pub ports_in_use: IntGaugeVec,
    /// Size of each repository's hub port range.
    pub ports_range: IntGaugeVec,
    /// Repository capacity and usage in bytes, by namespace and repository.
    pub repository_capacity: IntGaugeVec,
    pub repository_used: IntGaugeVec,
    /// Unix time of each VM's last successful backup (alerts on a missed backup window).
    pub last_success: IntGaugeVec,
    /// Average transfer rate of each VM's last successful backup.
    pub last_throughput: prometheus::GaugeVec,
    /// 1 when the SourceNode's last vCenter probe succeeded, else 0.
    pub vcenter_up: IntGaugeVec,
    /// Finished BackupJobs whose snapshot is still on the VM (the operator keeps removing it),
    /// by namespace and VM.
    pub snapshots_pending_removal: IntGaugeVec,
    /// Restores that ended, by namespace, target kind (pvc, files) and result.
    pub restores: IntCounterVec,
    /// Bytes restores wrote as data (holes and zeros are not written), by namespace.
    pub restore_bytes_written: IntCounterVec,
    /// Runs a BackupSchedule made, by namespace and schedule.
    pub schedule_runs: IntCounterVec,
    /// The next run of each BackupSchedule (Unix seconds).
    pub schedule_next_run: IntGaugeVec,
    /// Per VM a schedule selects: when its next successful backup is due (Unix seconds).
    pub schedule_backup_due: IntGaugeVec,
    /// Restore points retention merged out of their chains, by result.
    pub prunes: IntCounterVec,
    /// BackupJobs waiting for a slot of their SourceNode's limits, by reason.
    pub queued: IntGaugeVec,
    /// Bytes retention freed on each repository volume.
    pub retention_bytes_freed: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let reconcile_runs = IntCounterVec::new(
            Opts::new("sendense_reconcile_runs_total", "Reconciles started"),
            &["controller"],
        )?;
        let reconcile_failures = IntCounterVec::new(
            Opts::new(
                "sendense_reconcile_failures_total",
                "Reconciles that failed",
            ),
            &["controller", "error"],
        )?;
        let reconcile_duration = HistogramVec::new(
            HistogramOpts::new(
                "sendense_reconcile_duration_seconds",
                "Time spent in one reconcile",
            )
            .buckets(vec![0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0]),
            &["controller"],
        )?;
        let probes = IntCounterVec::new(
            Opts::new("sendense_vcenter_probes_total", "vCenter probes by outcome"),
            &["reason"],
        )?;
        let backups_started = IntCounter::new(
            "sendense_backups_started_total",
            "Backups that were planned and started",
        )?;
        let backups = IntCounterVec::new(
            Opts::new(
                "sendense_backups_total",
                "Backups that ended, by namespace, VM and result (succeeded, failed)",
            ),
            &["namespace", "vm", "result"],
        )?;
        let backup_duration = Histogram::with_opts(
            HistogramOpts::new(
                "sendense_backup_duration_seconds",
                "Duration of successful backups",
            )
            .buckets(vec![
                10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 21600.0,
            ]),
        )?;
        let bytes_copied = IntCounterVec::new(
            Opts::new(
                "sendense_backup_bytes_copied_total",
                "Bytes copied by successful backups",
            ),
            &["namespace", "vm", "disk"],
        )?;
        let snapshot_cleanup_failures = IntCounterVec::new(
            Opts::new(
                "sendense_snapshot_cleanup_failures_total",
                "Failed backups whose vSphere snapshot could not be confirmed removed, by namespace and VM",
            ),
            &["namespace", "vm"],
        )?;
        let jobs = IntGaugeVec::new(
            Opts::new("sendense_backupjobs", "BackupJobs by phase"),
            &["namespace", "phase"],
        )?;
        let ports_in_use = IntGaugeVec::new(
            Opts::new(
                "sendense_hub_ports_in_use",
                "Hub NBD ports held by active BackupJobs",
            ),
            &["namespace", "repository"],
        )?;
        let ports_range = IntGaugeVec::new(
            Opts::new(
                "sendense_hub_port_range_size",
                "Ports in the repository's hub port range",
            ),
            &["namespace", "repository"],
        )?;
        let repository_capacity = IntGaugeVec::new(
            Opts::new(
                "sendense_repository_capacity_bytes",
                "Capacity of the repository volume",
            ),
            &["namespace", "repository"],
        )?;
        let repository_used = IntGaugeVec::new(
            Opts::new(
                "sendense_repository_used_bytes",
                "Used space of the repository volume",
            ),
            &["namespace", "repository"],
        )?;
        let last_success = IntGaugeVec::new(
            Opts::new(
                "sendense_backup_last_success_timestamp_seconds",
                "Unix time of the VM's last successful backup",
            ),
            &["namespace", "vm"],
        )?;
        let last_throughput = prometheus::GaugeVec::new(
            Opts::new(
                "sendense_backup_last_throughput_bytes_per_second",
                "Bytes copied per second by the VM's last successful backup",
            ),
            &["namespace", "vm"],
        )?;
        let vcenter_up = IntGaugeVec::new(
            Opts::new(
                "sendense_vcenter_up",
                "1 when the SourceNode's last vCenter probe logged in, else 0",
            ),
            &["namespace", "sourcenode"],
        )?;
        let snapshots_pending_removal = IntGaugeVec::new(
            Opts::new(
                "sendense_snapshots_pending_removal",
                "Finished BackupJobs whose vSphere snapshot is still on the VM while the operator keeps removing it",
            ),
            &["namespace", "vm"],
        )?;
        let restores = IntCounterVec::new(
            Opts::new(
                "sendense_restores_total",
                "Restores that ended, by namespace, target (pvc, files) and result (succeeded, failed)",
            ),
            &["namespace", "target", "result"],
        )?;
        let restore_bytes_written = IntCounterVec::new(
            Opts::new(
                "sendense_restore_bytes_written_total",
                "Bytes successful restores wrote as data (holes and zeros are not written)",
            ),
            &["namespace"],
        )?;
        registry.register(Box::new(restores.clone()))?;
        let schedule_runs = IntCounterVec::new(
            Opts::new(
                "sendense_schedule_runs_total",
                "Runs BackupSchedules made (each makes one BackupJob per selected VM)",
            ),
            &["namespace", "schedule"],
        )?;
        registry.register(Box::new(schedule_runs.clone()))?;
        let schedule_next_run = IntGaugeVec::new(
            Opts::new(
                "sendense_schedule_next_run_timestamp_seconds",
                "When each BackupSchedule runs next (Unix seconds)",
            ),
            &["namespace", "schedule"],
        )?;
        registry.register(Box::new(schedule_next_run.clone()))?;
        let schedule_backup_due = IntGaugeVec::new(
            Opts::new(
                "sendense_schedule_backup_due_timestamp_seconds",
                "Per VM a BackupSchedule selects: by when its next successful backup is due (the first run after its last successful one, plus the window, or else the run after it); absent while the schedule is suspended or no longer selects the VM",
            ),
            &["namespace", "schedule", "vm"],
        )?;
        registry.register(Box::new(schedule_backup_due.clone()))?;
        let prunes = IntCounterVec::new(
            Opts::new(
                "sendense_retention_prunes_total",
                "Restore points retention merged out of their chains, by result (succeeded, refused, failed: resumed)",
            ),
            &["namespace", "repository", "result"],
        )?;
        registry.register(Box::new(prunes.clone()))?;
        let queued = IntGaugeVec::new(
            Opts::new(
                "sendense_backupjobs_queued",
                "BackupJobs waiting for a slot of their SourceNode's limits (SourceNodeLimit, DatastoreLimit)",
            ),
            &["namespace", "source_node", "reason"],
        )?;
        registry.register(Box::new(queued.clone()))?;
        let retention_bytes_freed = IntCounterVec::new(
            Opts::new(
                "sendense_retention_bytes_freed_total",
                "Bytes retention freed on each repository volume",
            ),
            &["namespace", "repository"],
        )?;
        registry.register(Box::new(retention_bytes_freed.clone()))?;
        registry.register(Box::new(restore_bytes_written.clone()))?;
        registry.register(Box::new(snapshots_pending_removal.clone()))?;
        registry.register(Box::new(last_success.clone()))?;
        registry.register(Box::new(last_throughput.clone()))?;
        registry.register(Box::new(vcenter_up.clone()))?;
        registry.register(Box::new(backups_started.clone()))?;
        registry.register(Box::new(backups.clone()))?;
        registry.register(Box::new(backup_duration.clone()))?;
        registry.register(Box::new(bytes_copied.clone()))?;
        registry.register(Box::new(snapshot_cleanup_failures.clone()))?;
        registry.register(Box::new(jobs.clone()))?;
        registry.register(Box::new(ports_in_use.clone()))?;
        registry.register(Box::new(ports_range.clone()))?;
        registry.register(Box::new(repository_capacity.clone()))?;
        registry.register(Box::new(repository_used.clone()))?;
        registry.register(Box::new(reconcile_runs.clone()))?;
        registry.register(Box::new(reconcile_failures.clone()))?;
        registry.register(Box::new(reconcile_duration.clone()))?;
        registry.register(Box::new(probes.clone()))?;
        Ok(Self {
            registry,
            reconcile_runs,
            reconcile_failures,
            reconcile_duration,
            probes,
            backups_started,
            backups,
            backup_duration,
            bytes_copied,
            snapshot_cleanup_failures,
            jobs,
            ports_in_use,
            ports_range,
            repository_capacity,
            repository_used,
            last_success,
            last_throughput,
            vcenter_up,
            snapshots_pending_removal,
            restores,
            schedule_runs,
            schedule_next_run,
            schedule_backup_due,
            prunes,
            queued,
            retention_bytes_freed,
            restore_bytes_written,
        })
    }

    /// Creates a VM's backup counters at zero, so the first failure is an increase that
    /// `increase()` sees (a series born at 1 is not).
    pub fn known_vm(&self, namespace: &str, vm: &str) {
        for result in ["succeeded", "failed"] {
            self.backups
                .with_label_values(&[namespace, vm, result])
                .inc_by(0);
        }
        self.snapshot_cleanup_failures
            .with_label_values(&[namespace, vm])
            .inc_by(0);
    }

    /// Creates a namespace's restore counters of a target kind at zero, so the first failed
    /// restore is an increase that `increase()` sees.
    pub fn known_restores(&self, namespace: &str, target: &str) {
        for result in ["succeeded", "failed"] {
            self.restores
                .with_label_values(&[namespace, target, result])
                .inc_by(0);
        }
    }

    /// Counts a reconcile and records its duration when the guard drops.
    pub fn reconcile(&self, controller: &str) -> ReconcileTimer {
        self.reconcile_runs.with_label_values(&[controller]).inc();
        ReconcileTimer {
            histogram: self.reconcile_duration.clone(),
            controller: controller.to_owned(),
            started: Instant::now(),
        }
    }

    /// A failed reconcile: logged with the object and the error, counted by the error's label.
    pub fn failed_reconcile(
        &self,
        controller: &str,
        object: &str,
        error: &dyn std::error::Error,
        label: &str,
    ) {
        tracing::warn!(controller, object, "reconcile failed: {error}");
        self.reconcile_failures
            .with_label_values(&[controller, label])
            .inc();
    }

    fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding our own registry into a Vec cannot fail short of a bug; report it as text.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            return format!("# encoding metrics failed: {e}\n");
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

pub struct ReconcileTimer {
    histogram: HistogramVec,
    controller: String,
    started: Instant,
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.histogram
            .with_label_values(&[self.controller.as_str()])
            .observe(self.started.elapsed().as_secs_f64());
    }
}

/// Serves the endpoints until the process ends. `ready` turns /readyz green once the
/// controllers run. Every connection has a 5 s deadline.
pub async fn serve(listener: TcpListener, metrics: Metrics, ready: Arc<AtomicBool>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        let ready = ready.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                // The request may come in several segments: read to the end of its head (a
                // response to a partial request, and the close after it, would reset the
                // connection while the client still writes).
                let mut buf = [0u8; 2048];
                let mut n = 0;
                while n < buf.len() && !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => n += k,
                    }
                }
                let request = String::from_utf8_lossy(&buf[..n]);
                let path = request.split_whitespace().nth(1).unwrap_or("/");
                let (status, body) = match path {
                    "/metrics" => ("200 OK", metrics.render()),
                    "/healthz" => ("200 OK", "ok\n".to_owned()),
                    "/readyz" if ready.load(Ordering::Relaxed) => ("200 OK", "ok\n".to_owned()),
                    "/readyz" => ("503 Service Unavailable", "controllers not running yet\n".to_owned()),
                    _ => ("404 Not Found", "not found\n".to_owned()),
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(body.as_bytes()).await;
                let _ = stream.shutdown().await;
            })
            .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_request_in_several_segments_is_answered_whole() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let m = Metrics::new().expect("metrics");
        tokio::spawn(serve(listener, m, Arc::new(AtomicBool::new(true))));
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET /rea").await.expect("write");
        tokio::time::sleep(Duration::from_millis(100)).await;
        s.write_all(b"dyz HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("write");
        tokio::time::sleep(Duration::from_millis(100)).await;
        s.write_all(b"\r\n")
            .await
            .expect("write the end of the head");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
        assert!(out.ends_with("ok\n"), "{out}");
    }

    #[test]
    fn reconciles_are_counted_and_timed() {
        let m = Metrics::new().expect("metrics");
        drop(m.reconcile("sourcenode"));
        m.probes.with_label_values(&["LoginFailed"]).inc();
        let text = m.render();
        assert!(
            text.contains("sendense_reconcile_runs_total{controller=\"sourcenode\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("sendense_reconcile_duration_seconds_count{controller=\"sourcenode\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("sendense_vcenter_probes_total{reason=\"LoginFailed\"} 1"),
            "{text}"
        );
    }
}
