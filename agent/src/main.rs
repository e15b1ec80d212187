//! sendense-agent: the data mover. Parses the command line ([`sendense_agent::cli`]), runs the
//! subcommand ([`sendense_agent::cmd`]) and exits 0 (done), 1 (ran and failed: a failed backup
//! or probe, a checksum mismatch) or 2 (could not run; a rejected command line included).

use std::process::ExitCode;

use clap::Parser;
use sendense_agent::cli::{Cli, report_usage_error};
use sendense_agent::cmd::{self, Outcome};

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
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
    match cmd::run(cli.command).await {
        Ok(Outcome::Succeeded) => ExitCode::SUCCESS,
        Ok(Outcome::Failed) => ExitCode::from(1),
        Err(e) => {
            eprintln!("sendense-agent: {e:#}");
            ExitCode::from(2)
        }
    }
}
