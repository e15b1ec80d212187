//! `sendense-agent files` on a real QCOW2 chain: a GPT disk whose partition holds an ext4 made
//! by `mke2fs -d`, backed up twice (the second link holds only the blocks that changed, made
//! by `qemu-img rebase`); files listed and extracted from the top of the chain equal the
//! guest's at that point, content, mode and mtime included. No mount, no privilege.

mod support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use anyhow::Result;
use sendense_contract::restore::{FilesResult, Refusal};
use support::*;

const MIB: u64 = 1 << 20;

fn agent_files(args: &[&str]) -> Result<(i32, String, String)> {
    let out = Command::new(env!("CARGO_BIN_EXE_sendense-agent"))
        .arg("files")
        .args(args)
        .output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// A 40 MiB GPT disk, partition 1 from 1 MiB holding an ext4 with `src`'s tree.
fn gpt_disk_with_ext4(s: &Scratch, src: &Path, name: &str) -> Result<std::path::PathBuf> {
    let fs = s.path(&format!("{name}.ext4"));
    run(Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-L", "guestroot", "-d"])
        .arg(src)
        .arg(&fs)
        .arg("30M"))?;
    let disk = s.path(&format!("{name}.raw"));
    raw_file(&disk, 40 * MIB)?;
    run(Command::new("sgdisk")
        .args(["-n", "1:2048:+30M", "-t", "1:8300", "-c", "1:root"])
        .arg(&disk))?;
    run(Command::new("dd")
        .arg(format!("if={}", fs.display()))
        .arg(format!("of={}", disk.display()))
        .args(["bs=1M", "seek=1", "conv=notrunc,sparse", "status=none"]))?;
    Ok(disk)
}

fn set_mtime(path: &Path, when: &str) -> Result<()> {
    run(Command::new("touch").args(["-h", "-d", when]).arg(path))?;
    Ok(())
}

#[test]
fn files_from_the_top_of_a_chain_equal_the_guests() -> Result<()> {
    let s = Scratch::new("files");
    let src = s.path("guest");
    std::fs::create_dir_all(src.join("etc/app"))?;
    std::fs::write(src.join("etc/hostname"), b"web-01\n")?;
    std::fs::write(src.join("etc/app/config.yaml"), b"level: 1\n")?;
    std::fs::write(
        src.join("etc/app/big.bin"),
        pattern(7, 3 * MIB as usize + 5),
    )?;
    std::fs::set_permissions(
        src.join("etc/app/config.yaml"),
        std::fs::Permissions::from_mode(0o640),
    )?;
    std::os::unix::fs::symlink("app/config.yaml", src.join("etc/current"))?;
    set_mtime(&src.join("etc/app/config.yaml"), "2024-02-03 04:05:06")?;
    let base_raw = gpt_disk_with_ext4(&s, &src, "v1")?;
    let base = s.path("base.qcow2");
    run(Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(&base_raw)
        .arg(&base))?;

    // The guest changes a file; the next restore point holds only the changed blocks.
    std::fs::write(src.join("etc/app/config.yaml"), b"level: 2\nmore: true\n")?;
    set_mtime(&src.join("etc/app/config.yaml"), "2025-06-07 08:09:10")?;
    let top_raw = gpt_disk_with_ext4(&s, &src, "v2")?;
    let top = s.path("top.qcow2");
    run(Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(&top_raw)
        .arg(&top))?;
    run(Command::new("qemu-img")
        .args([
            "rebase",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            "base.qcow2",
        ])
        .arg(&top))?;
    let top_s = top.display().to_string();

    let (code, out, err) = agent_files(&["volumes", "--image", &top_s])?;
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim())?;
    assert_eq!(v["volume"], "0:1", "{out}");
    assert_eq!(v["table"], "gpt");
    assert_eq!(v["filesystem"], "ext4");
    assert_eq!(v["label"], "guestroot");
    assert_eq!(v["start"], MIB);

    let (code, out, err) = agent_files(&["ls", "--image", &top_s, "--json", "/etc/app/*"])?;
    assert_eq!(code, 0, "{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let cfg = lines
        .iter()
        .find(|l| l["path"] == "/etc/app/config.yaml")
        .expect("config listed");
    assert_eq!(cfg["size"], 20);
    assert_eq!(cfg["mode"], "0640");

    let to = s.path("restored");
    let (code, out, err) = agent_files(&[
        "get",
        "--image",
        &top_s,
        "--to",
        to.to_str().unwrap(),
        "/etc/app",
        "/etc/current",
    ])?;
    assert_eq!(code, 0, "{out}\n{err}");
    let r = FilesResult::parse(&out).expect("a result");
    assert!(r.ok && !r.nothing_written, "{out}");
    assert_eq!((r.files, r.symlinks), (2, 1), "{out}");
    for f in ["etc/app/config.yaml", "etc/app/big.bin"] {
        let (a, b) = (src.join(f), to.join(f));
        assert_eq!(std::fs::read(&a)?, std::fs::read(&b)?, "{f}");
        let (ma, mb) = (std::fs::metadata(&a)?, std::fs::metadata(&b)?);
        assert_eq!(ma.mode() & 0o7777, mb.mode() & 0o7777, "{f}");
        assert_eq!(ma.mtime(), mb.mtime(), "{f}");
    }
    assert_eq!(
        std::fs::read_link(to.join("etc/current"))?,
        Path::new("app/config.yaml")
    );
    assert!(!to.join("etc/hostname").exists(), "only what was asked for");

    // A pattern that matches nothing: a clear error, nothing written.
    let none = s.path("none");
    let result = s.path("result.json");
    let (code, out, _) = agent_files(&[
        "get",
        "--image",
        &top_s,
        "--to",
        none.to_str().unwrap(),
        "--result-file",
        result.to_str().unwrap(),
        "/etc/hostname",
        "/var/log/*.log",
    ])?;
    assert_eq!(code, 1);
    let r = FilesResult::parse(&std::fs::read_to_string(&result)?).expect("a result");
    assert_eq!(FilesResult::parse(&out), Some(r.clone()));
    assert!(!r.ok && r.nothing_written, "{out}");
    assert_eq!(r.refused, Some(Refusal::NothingMatched));
    let e = r.error.unwrap_or_default();
    assert!(
        e.contains("/var/log/*.log") && e.contains("nothing was written"),
        "{e}"
    );
    assert!(!none.exists());
    Ok(())
}
