//! oci-image: writes one reproducible image archive (OCI layout + docker-archive) from layers
//! and a config; see e2e/src/oci/ and e2e/images/build.sh.
//!
//! ```text
//! oci-image build --reference ghcr.io/sendense/sendense-operator:0.1.0 --out op.oci.tar \
//!   --epoch "$SOURCE_DATE_EPOCH" --layer dir:STAGE --user 65532:65532 \
//!   --entrypoint '["/usr/local/bin/sendense-operator"]' --env PATH=/usr/local/bin:/usr/bin:/bin
//! oci-image layer --layer tar:base.tar --epoch N --out-dir CACHE --created-by "debian base"
//! ```
//! `build` prints what it wrote as JSON (digests, sizes); `layer` prints the built layer as
//! JSON, which `--layer built:FILE` takes back.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use sendense_e2e::oci::{
    BuiltLayer, ContainerConfig, LayerInput, LayerSource, Owner, Reference, build_image,
    build_layer,
};

#[derive(Parser, Debug)]
#[command(about = "Writes reproducible OCI image archives (also docker-archives)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Build an image archive.
    Build(BuildArgs),
    /// Build one layer blob into a directory (to cache it) and print it as JSON.
    Layer(LayerArgs),
}

#[derive(clap::Args, Debug)]
struct BuildArgs {
    /// The image reference, with a tag (what containerd and docker name it).
    #[arg(long)]
    reference: String,
    /// The archive to write.
    #[arg(long)]
    out: PathBuf,
    /// Timestamp of every file and of the image, seconds since the epoch.
    #[arg(long, env = "SOURCE_DATE_EPOCH")]
    epoch: u64,
    /// A layer, base first: dir:PATH (owned by root), dir-owned:UID:GID:PATH, dir-keep:PATH
    /// (owners as on disk), tar:FILE, built:LAYER.json (from `oci-image layer`).
    #[arg(long = "layer", required = true)]
    layers: Vec<String>,
    /// History text of each layer given as dir or tar, in order (default: the layer's kind).
    #[arg(long = "created-by")]
    created_by: Vec<String>,
    /// User (and group) the container runs as, e.g. 65532:65532.
    #[arg(long, default_value = "")]
    user: String,
    /// Entrypoint as a JSON array of strings.
    #[arg(long)]
    entrypoint: Option<String>,
    /// Cmd as a JSON array of strings.
    #[arg(long)]
    cmd: Option<String>,
    /// Environment variable KEY=VALUE (repeatable).
    #[arg(long = "env")]
    env: Vec<String>,
    /// Working directory.
    #[arg(long, default_value = "")]
    workdir: String,
    /// Label KEY=VALUE (repeatable).
    #[arg(long = "label")]
    labels: Vec<String>,
}

#[derive(clap::Args, Debug)]
struct LayerArgs {
    /// The layer's source, as for `build --layer` (not built:).
    #[arg(long)]
    layer: String,
    #[arg(long, env = "SOURCE_DATE_EPOCH")]
    epoch: u64,
    /// Directory for the blob (named after its digest).
    #[arg(long)]
    out_dir: PathBuf,
    #[arg(long)]
    created_by: String,
}

fn parse_layer(spec: &str) -> Result<LayerSource> {
    let (kind, rest) = spec
        .split_once(':')
        .with_context(|| format!("layer {spec:?}: expected KIND:ARG"))?;
    Ok(match kind {
        "dir" => LayerSource::Dir {
            path: rest.into(),
            owner: Owner::Root,
        },
        "dir-keep" => LayerSource::Dir {
            path: rest.into(),
            owner: Owner::Keep,
        },
        "dir-owned" => {
            let mut parts = rest.splitn(3, ':');
            let (Some(uid), Some(gid), Some(path)) = (parts.next(), parts.next(), parts.next())
            else {
                bail!("layer {spec:?}: expected dir-owned:UID:GID:PATH");
            };
            LayerSource::Dir {
                path: path.into(),
                owner: Owner::Id {
                    uid: uid
                        .parse()
                        .with_context(|| format!("layer {spec:?}: uid"))?,
                    gid: gid
                        .parse()
                        .with_context(|| format!("layer {spec:?}: gid"))?,
                },
            }
        }
        "tar" => LayerSource::Tar { path: rest.into() },
        "built" => {
            let json = std::fs::read(rest).with_context(|| format!("reading {rest}"))?;
            LayerSource::Built(
                serde_json::from_slice::<BuiltLayer>(&json)
                    .with_context(|| format!("parsing {rest}"))?,
            )
        }
        other => {
            bail!("layer {spec:?}: unknown kind {other:?} (dir, dir-owned, dir-keep, tar, built)")
        }
    })
}

fn json_args(what: &str, value: Option<&str>) -> Result<Vec<String>> {
    value.map_or(Ok(Vec::new()), |v| {
        serde_json::from_str(v)
            .with_context(|| format!("--{what} {v:?}: not a JSON array of strings"))
    })
}

fn key_values(what: &str, items: &[String]) -> Result<BTreeMap<String, String>> {
    items
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .with_context(|| format!("--{what} {kv:?}: expected KEY=VALUE"))
        })
        .collect()
}

fn build(args: BuildArgs) -> Result<()> {
    let reference = Reference::parse(&args.reference)?;
    for e in &args.env {
        if !e.contains('=') {
            bail!("--env {e:?}: expected KEY=VALUE");
        }
    }
    let config = ContainerConfig {
        user: args.user,
        env: args.env,
        entrypoint: json_args("entrypoint", args.entrypoint.as_deref())?,
        cmd: json_args("cmd", args.cmd.as_deref())?,
        working_dir: args.workdir,
        labels: key_values("label", &args.labels)?,
    };
    let mut texts = args.created_by.into_iter();
    let mut layers = Vec::new();
    for spec in &args.layers {
        let source = parse_layer(spec)?;
        let created_by = match &source {
            LayerSource::Built(b) => b.created_by.clone(),
            // No build path in the history: it would make the image differ between machines.
            LayerSource::Dir { .. } => texts.next().unwrap_or_else(|| "directory layer".into()),
            LayerSource::Tar { .. } => texts.next().unwrap_or_else(|| "tar layer".into()),
        };
        layers.push(LayerInput { source, created_by });
    }
    let (written, skipped) = build_image(&reference, &config, args.epoch, &layers, &args.out)?;
    if skipped.special_files > 0 {
        eprintln!(
            "oci-image: skipped {} device, FIFO or socket entries",
            skipped.special_files
        );
    }
    println!("{}", serde_json::to_string(&written)?);
    Ok(())
}

fn layer(args: LayerArgs) -> Result<()> {
    let source = parse_layer(&args.layer)?;
    if matches!(source, LayerSource::Built(_)) {
        bail!("--layer built:... is already a layer");
    }
    std::fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("creating {}", args.out_dir.display()))?;
    let (built, skipped) = build_layer(&source, args.epoch, &args.created_by, &args.out_dir)?;
    if skipped.special_files > 0 {
        eprintln!(
            "oci-image: skipped {} device, FIFO or socket entries",
            skipped.special_files
        );
    }
    println!("{}", serde_json::to_string(&built)?);
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Build(a) => build(a),
        Command::Layer(a) => layer(a),
    }
}
