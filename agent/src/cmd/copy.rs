//! `copy`: areas of one NBD export copied to another (a whole disk by default), then flushed.
//! A tool for benchmarks and for trying the copy engine by hand.

use std::num::ParseIntError;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::Outcome;
use crate::copy::{ChangedArea, CopyKind, CopyOptions, Progress, copy_areas};
use crate::nbd::{ConnectOptions, NbdClient, NbdUrl};

#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct CopyArgs {
    #[arg(long)]
    pub source: NbdUrl,
    #[arg(long)]
    pub target: NbdUrl,
    /// What the target is, which decides what happens to areas that read as zeros.
    #[arg(long, value_enum, default_value_t = CopyKind::Full)]
    pub kind: CopyKind,
    /// Areas as start+length pairs in bytes, comma-separated; default the whole source.
    #[arg(long, value_delimiter = ',', value_parser = parse_area)]
    pub areas: Vec<ChangedArea>,
    #[arg(long, default_value_t = 2 << 20)]
    pub request_size: u32,
    #[arg(long, default_value_t = 32)]
    pub in_flight: usize,
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    #[arg(long, default_value_t = 120)]
    pub request_timeout: u64,
}

/// Why an `--areas` entry was refused.
#[derive(Debug, thiserror::Error)]
pub enum AreaError {
    #[error("area {0:?}: expected start+length")]
    Form(String),
    #[error("area {area:?}: {part}: {source}")]
    Number {
        area: String,
        part: &'static str,
        #[source]
        source: ParseIntError,
    },
}

/// `start+length` in bytes.
pub fn parse_area(s: &str) -> Result<ChangedArea, AreaError> {
    let (start, length) = s
        .split_once('+')
        .ok_or_else(|| AreaError::Form(s.to_owned()))?;
    let number = |text: &str, part| {
        text.trim().parse().map_err(|source| AreaError::Number {
            area: s.to_owned(),
            part,
            source,
        })
    };
    Ok(ChangedArea {
        start: number(start, "start")?,
        length: number(length, "length")?,
    })
}

pub async fn run(args: CopyArgs) -> Result<Outcome> {
    let opts = ConnectOptions {
        connections: args.connections,
        ..ConnectOptions::with_request_timeout(Duration::from_secs(args.request_timeout))
    };
    let source = NbdClient::connect(&args.source, &opts)
        .await
        .context("source")?;
    let target = NbdClient::connect(&args.target, &opts)
        .await
        .context("target")?;
    let areas = if args.areas.is_empty() {
        vec![ChangedArea {
            start: 0,
            length: source.size(),
        }]
    } else {
        args.areas
    };
    let progress = Progress::default();
    let started = Instant::now();
    let copy_opts = CopyOptions {
        request_size: args.request_size,
        max_in_flight: args.in_flight,
        ..Default::default()
    };
    let stats = copy_areas(&source, &target, areas, args.kind, &copy_opts, &progress).await?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "bytes": stats.total, "data": stats.data, "zeroed": stats.zeroed, "skipped": stats.skipped,
            "seconds": secs, "connections": [source.connections(), target.connections()],
        })
    );
    source.disconnect().await;
    target.disconnect().await;
    Ok(Outcome::Succeeded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn areas_are_start_plus_length_in_bytes() {
        assert_eq!(
            parse_area(" 4096 + 512").ok(),
            Some(ChangedArea {
                start: 4096,
                length: 512
            })
        );
        for (bad, says) in [
            ("4096", "expected start+length"),
            ("x+1", "start"),
            ("1+-1", "length"),
        ] {
            let e = parse_area(bad).expect_err(bad).to_string();
            assert!(e.contains(says) && e.contains(bad), "{bad}: {e}");
        }
    }
}
