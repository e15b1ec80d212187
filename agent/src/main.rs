//! sendense-agent: the data mover. Parses the command line ([`sendense_agent::cli`]), runs the
//! subcommand ([`sendense_agent::cmd`]) and exits 0 (done), 1 (ran and failed: a failed backup
//! or probe, a checksum mismatch) or 2 (could not run; a rejected command line included).

use std::process::ExitCode;

use clap::Parser;
use sendense_agent::cli::{Cli, report_usage_error};
use sendense_agent::cmd::{self, Outcome};

fn main() -> ExitCode {
    use tracing_subscriber::filter::FilterExt as _;
    use tracing_subscriber::prelude::*;
    // RUST_LOG, but never the lines of libraries that would log a credential at any level.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info".into())
        .and(tracing_subscriber::filter::filter_fn(|m| {
            sendense_vsphere::may_log(m.target(), m.level())
        }));
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_filter(filter),
        )
        .init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let args: Vec<_> = std::env::args_os().skip(1).collect();
            report_usage_error(&e, &args);
            e.exit()
        }
    };
    let runtime = match cli.runtime() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sendense-agent: starting the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    // On a multi-threaded runtime the work itself runs on the workers (spawned), so replies
    // are not handed to the main thread one by one.
    let result = runtime.block_on(async move {
        match tokio::spawn(cmd::run(cli.command)).await {
            Ok(r) => r,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(anyhow::anyhow!("the agent's main task ended: {e}")),
        }
    });
    match result {
        Ok(Outcome::Succeeded) => ExitCode::SUCCESS,
        Ok(Outcome::Failed) => ExitCode::from(1),
        Err(e) => {
            eprintln!("sendense-agent: {e:#}");
            ExitCode::from(2)
        }
    }
}
