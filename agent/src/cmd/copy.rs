//! `copy`: areas of one NBD export copied to another (a whole disk by default), then flushed.
//! A tool for benchmarks and for trying the copy engine by hand. Several `--source`/`--target`
//! pairs (paired in order) are copied at once in one process, as `backup` copies the disks of
//! one VM.

use std::num::ParseIntError;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::Outcome;
use crate::copy::{ChangedArea, CopyKind, CopyOptions, Progress, copy_areas};
use crate::nbd::{ConnectOptions, NbdClient, NbdUrl, TlsClient};

#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct CopyArgs {
    #[arg(long, required = true)]
    pub source: Vec<NbdUrl>,
    #[arg(long, required = true)]
    pub target: Vec<NbdUrl>,
    /// What the target is, which decides what happens to areas that read as zeros.
    #[arg(long, value_enum, default_value_t = CopyKind::Full)]
    pub kind: CopyKind,
    /// Areas as start+length pairs in bytes, comma-separated; default the whole source.
    #[arg(long, value_delimiter = ',', value_parser = parse_area)]
    pub areas: Vec<ChangedArea>,
    /// Areas from a file, one start+length a line (blank lines and `#` comments ignored):
    /// for more areas than a command line holds. Adds to `--areas`.
    #[arg(long)]
    pub areas_file: Option<std::path::PathBuf>,
    #[arg(long, default_value_t = 2 << 20)]
    pub request_size: u32,
    #[arg(long, default_value_t = 32)]
    pub in_flight: usize,
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    #[arg(long, default_value_t = 120)]
    pub request_timeout: u64,
    /// Areas at most this many bytes apart are copied as one, gap included.
    #[arg(long, default_value_t = crate::copy::MERGE_GAP)]
    pub merge_gap: u64,
    /// Client certificate directory (ca-cert.pem, client-cert.pem, client-key.pem) for the
    /// `nbds://` and `nbds+unix://` URLs among the sources and targets.
    #[arg(long)]
    pub tls_dir: Option<std::path::PathBuf>,
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

/// Areas from the text of an `--areas-file`.
pub fn parse_areas_file(text: &str) -> Result<Vec<ChangedArea>, AreaError> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(parse_area)
        .collect()
}

pub async fn run(args: CopyArgs) -> Result<Outcome> {
    if args.source.len() != args.target.len() {
        anyhow::bail!(
            "{} --source and {} --target: give one target per source",
            args.source.len(),
            args.target.len()
        );
    }
    let tls = args
        .tls_dir
        .as_deref()
        .map(TlsClient::from_dir)
        .transpose()
        .context("--tls-dir")?;
    let opts = ConnectOptions {
        connections: args.connections,
        tls,
        ..ConnectOptions::with_request_timeout(Duration::from_secs(args.request_timeout))
    };
    let mut areas = args.areas.clone();
    if let Some(path) = &args.areas_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading --areas-file {}", path.display()))?;
        areas.extend(parse_areas_file(&text).with_context(|| path.display().to_string())?);
    }
    let copy_opts = CopyOptions {
        request_size: args.request_size,
        max_in_flight: args.in_flight,
        merge_gap: args.merge_gap,
        ..Default::default()
    };
    let started = Instant::now();
    let disks = args
        .source
        .iter()
        .zip(&args.target)
        .map(|(s, t)| copy_one(s, t, &areas, args.kind, &copy_opts, &opts));
    let reports = futures::future::try_join_all(disks).await?;
    let secs = started.elapsed().as_secs_f64();
    let sum = |k: &str| reports.iter().filter_map(|r| r[k].as_u64()).sum::<u64>();
    println!(
        "{}",
        serde_json::json!({
            "bytes": sum("bytes"), "data": sum("data"), "zeroed": sum("zeroed"),
            "skipped": sum("skipped"), "seconds": secs, "disks": reports,
        })
    );
    Ok(Outcome::Succeeded)
}

/// One source copied to its target; what it did as JSON.
async fn copy_one(
    source: &NbdUrl,
    target: &NbdUrl,
    areas: &[ChangedArea],
    kind: CopyKind,
    copy_opts: &CopyOptions,
    opts: &ConnectOptions,
) -> Result<serde_json::Value> {
    let (source, target) = futures::future::try_join(
        async { NbdClient::connect(source, opts).await.context("source") },
        async { NbdClient::connect(target, opts).await.context("target") },
    )
    .await?;
    let areas = if areas.is_empty() {
        vec![ChangedArea {
            start: 0,
            length: source.size(),
        }]
    } else {
        areas.to_vec()
    };
    let progress = Progress::default();
    let started = Instant::now();
    let stats = copy_areas(&source, &target, areas, kind, copy_opts, &progress).await?;
    let report = serde_json::json!({
        "bytes": stats.total, "data": stats.data, "zeroed": stats.zeroed, "skipped": stats.skipped,
        "seconds": started.elapsed().as_secs_f64(),
        "connections": [source.connections(), target.connections()],
    });
    source.disconnect().await;
    target.disconnect().await;
    Ok(report)
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

    #[test]
    fn areas_file_has_one_area_a_line_with_comments_and_blank_lines() {
        let got = parse_areas_file("# changed\n0+4096\n\n  8192+512 \n").expect("valid");
        assert_eq!(
            got,
            vec![
                ChangedArea {
                    start: 0,
                    length: 4096
                },
                ChangedArea {
                    start: 8192,
                    length: 512
                }
            ]
        );
        assert!(parse_areas_file("0+1\nbad\n").is_err());
    }
}
