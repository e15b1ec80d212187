//! sendense-operator: reconciles Sendense's resources (SourceNode vCenter probes, Repository
//! volume probes, BackupJob backups). Runs in-cluster or from a kubeconfig ($KUBECONFIG).
//! Settings come from flags or environment variables (`sendense-operator --help`).

use clap::Parser;
use sendense_operator::runtime::{self, CrdMissing};
use sendense_operator::settings::Settings;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    use tracing_subscriber::filter::FilterExt as _;
    use tracing_subscriber::prelude::*;
    // RUST_LOG, but never the lines of libraries that would log a credential at any level.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info".into())
        .and(tracing_subscriber::filter::filter_fn(|m| {
            sendense_vsphere::may_log(m.target(), m.level())
        }));
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_filter(filter))
        .init();
    let settings = Settings::parse();
    match runtime::run(settings).await {
        Err(e) if e.downcast_ref::<CrdMissing>().is_some() => {
            eprintln!("sendense-operator: {e}");
            std::process::exit(1);
        }
        other => other,
    }
}
