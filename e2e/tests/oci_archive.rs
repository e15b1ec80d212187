//! The image writer's archives read by the real tools: `skopeo inspect` and `skopeo copy` take
//! them as `oci-archive:` (the same digests come out), and `umoci unpack` (when installed)
//! unpacks a root file system with the files, modes, owners and links that went in. No cluster
//! or registry needed. skopeo and umoci come from e2e/install-deps.sh.

use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use sendense_e2e::oci::{ContainerConfig, LayerInput, LayerSource, Owner, Reference, build_image};
use serde_json::Value;

const EPOCH: u64 = 1_747_699_200;

struct Scratch(PathBuf);
impl Scratch {
    fn new(name: &str) -> Result<Self> {
        let p = std::env::temp_dir().join(format!("sendense-oci-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p)?;
        Ok(Self(p))
    }
}
impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program} (bash e2e/install-deps.sh installs it)"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn have(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A base layer owned by root and an application layer owned by 65532, like the agent image.
fn sample_image(dir: &Path) -> Result<(PathBuf, sendense_e2e::oci::WrittenImage)> {
    let base = dir.join("base");
    std::fs::create_dir_all(base.join("usr/bin"))?;
    std::fs::create_dir_all(base.join("etc"))?;
    std::fs::write(base.join("usr/bin/tool"), b"#!/bin/sh\necho tool\n")?;
    std::fs::set_permissions(base.join("usr/bin/tool"), PermissionsExt::from_mode(0o755))?;
    symlink("tool", base.join("usr/bin/alias"))?;
    std::fs::write(base.join("etc/motd"), b"hello\n")?;
    std::fs::hard_link(base.join("etc/motd"), base.join("etc/motd.link"))?;
    let app = dir.join("app");
    std::fs::create_dir_all(app.join("home/app"))?;
    std::fs::write(app.join("home/app/state"), b"owned by 65532")?;
    let out = dir.join("sample.oci.tar");
    let (written, _) = build_image(
        &Reference::parse("localhost/sendense/sample:1.2.3")?,
        &ContainerConfig {
            user: "65532:65532".into(),
            cmd: vec!["/usr/bin/tool".into()],
            env: vec!["PATH=/usr/bin".into()],
            ..ContainerConfig::default()
        },
        EPOCH,
        &[
            LayerInput {
                source: LayerSource::Dir {
                    path: base,
                    owner: Owner::Root,
                },
                created_by: "base".into(),
            },
            LayerInput {
                source: LayerSource::Dir {
                    path: app,
                    owner: Owner::Id {
                        uid: 65532,
                        gid: 65532,
                    },
                },
                created_by: "app".into(),
            },
        ],
        &out,
    )?;
    Ok((out, written))
}

#[test]
fn skopeo_reads_the_archive_and_copies_it_with_the_same_digests() -> Result<()> {
    let s = Scratch::new("skopeo")?;
    let (archive, written) = sample_image(&s.0)?;
    let archive = archive.to_str().context("path")?;
    let inspect: Value = serde_json::from_str(&run(
        "skopeo",
        &["inspect", &format!("oci-archive:{archive}")],
    )?)?;
    assert_eq!(inspect["Digest"], written.manifest.to_string());
    assert_eq!(inspect["Architecture"], "amd64");
    assert_eq!(inspect["Os"], "linux");
    assert_eq!(inspect["Created"], "2025-05-20T00:00:00Z");
    assert_eq!(
        inspect["Layers"],
        Value::from(
            written
                .layers
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
        )
    );
    let config: Value = serde_json::from_str(&run(
        "skopeo",
        &["inspect", "--config", &format!("oci-archive:{archive}")],
    )?)?;
    assert_eq!(config["config"]["User"], "65532:65532");

    // The reference's tag is the OCI ref name: skopeo finds the image by it.
    let layout = s.0.join("layout");
    let layout = layout.to_str().context("path")?;
    run(
        "skopeo",
        &[
            "copy",
            "--quiet",
            &format!("oci-archive:{archive}:1.2.3"),
            &format!("oci:{layout}:copied"),
        ],
    )?;
    let copied: Value = serde_json::from_str(&run(
        "skopeo",
        &["inspect", &format!("oci:{layout}:copied")],
    )?)?;
    assert_eq!(
        copied["Digest"],
        written.manifest.to_string(),
        "copied unchanged"
    );
    Ok(())
}

#[test]
fn umoci_unpacks_files_links_modes_and_owners() -> Result<()> {
    if !have("umoci") || !have("skopeo") {
        eprintln!("umoci or skopeo is not installed: skipped (bash e2e/install-deps.sh)");
        return Ok(());
    }
    let s = Scratch::new("umoci")?;
    let (archive, _) = sample_image(&s.0)?;
    let layout = s.0.join("layout");
    let bundle = s.0.join("bundle");
    run(
        "skopeo",
        &[
            "copy",
            "--quiet",
            &format!("oci-archive:{}", archive.display()),
            &format!("oci:{}:sample", layout.display()),
        ],
    )?;
    let mut args = vec![
        "unpack".to_owned(),
        "--image".into(),
        format!("{}:sample", layout.display()),
    ];
    // As root umoci keeps the recorded owners; otherwise it maps them to the caller.
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        args.push("--rootless".into());
    }
    args.push(bundle.display().to_string());
    run(
        "umoci",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    )?;
    let rootfs = bundle.join("rootfs");
    assert_eq!(
        std::fs::read(rootfs.join("usr/bin/tool"))?,
        b"#!/bin/sh\necho tool\n"
    );
    let tool = std::fs::metadata(rootfs.join("usr/bin/tool"))?;
    assert_eq!(tool.mode() & 0o7777, 0o755);
    assert_eq!(
        std::fs::read_link(rootfs.join("usr/bin/alias"))?,
        Path::new("tool")
    );
    let motd = std::fs::metadata(rootfs.join("etc/motd"))?;
    let link = std::fs::metadata(rootfs.join("etc/motd.link"))?;
    assert_eq!(motd.ino(), link.ino(), "hard link kept");
    let state = std::fs::metadata(rootfs.join("home/app/state"))?;
    if root {
        assert_eq!((state.uid(), state.gid()), (65532, 65532));
        assert_eq!((tool.uid(), tool.gid()), (0, 0));
    }
    let config: Value = serde_json::from_slice(&std::fs::read(bundle.join("config.json"))?)?;
    assert_eq!(config["process"]["user"]["uid"], 65532);
    assert_eq!(config["process"]["args"][0], "/usr/bin/tool");
    Ok(())
}
