//! The writer's promises: digests stable across builds and file times, a valid layout that
//! names the image, sorted and normalised layer entries, symlinks, hard links and owners kept.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;
use serde_json::Value;

use super::*;

const EPOCH: u64 = 1_747_699_200; // 2025-05-20T00:00:00Z

struct Scratch(PathBuf);
impl Scratch {
    fn new(name: &str) -> Self {
        let p =
            std::env::temp_dir().join(format!("sendense-oci-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("scratch dir");
        Self(p)
    }
}
impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One entry of a layer tar as a reader sees it.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    path: String,
    kind: char,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    link: Option<String>,
    data: Vec<u8>,
}

fn entries_of(tar_bytes: &[u8]) -> Vec<Seen> {
    let mut ar = tar::Archive::new(tar_bytes);
    ar.entries()
        .expect("entries")
        .map(|e| {
            let mut e = e.expect("entry");
            let h = e.header().clone();
            let mut data = Vec::new();
            e.read_to_end(&mut data).expect("data");
            Seen {
                path: String::from_utf8_lossy(&e.path_bytes()).into_owned(),
                kind: h.entry_type().as_byte() as char,
                mode: h.mode().expect("mode"),
                uid: h.uid().expect("uid"),
                gid: h.gid().expect("gid"),
                mtime: h.mtime().expect("mtime"),
                link: e
                    .link_name_bytes()
                    .map(|l| String::from_utf8_lossy(&l).into_owned()),
                data,
            }
        })
        .collect()
}

fn gunzip(path: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    GzDecoder::new(std::fs::File::open(path).expect("blob"))
        .read_to_end(&mut out)
        .expect("gzip");
    out
}

fn write(path: &Path, bytes: &[u8], mode: u32) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, bytes).expect("write");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn long_target() -> String {
    format!("../{}/target", "long-directory-name".repeat(7))
}

/// A tree with a file, a setuid file, a symlink (short and long), a hard link pair, a FIFO and
/// a deep path over 100 bytes.
fn sample_tree(root: &Path) {
    write(&root.join("usr/bin/tool"), b"#!/bin/sh\necho tool\n", 0o755);
    write(&root.join("usr/bin/su-ish"), b"setuid", 0o4755);
    write(
        &root.join("etc/passwd"),
        b"root:x:0:0::/root:/bin/sh\n",
        0o644,
    );
    symlink("tool", root.join("usr/bin/alias")).expect("symlink");
    symlink(long_target(), root.join("usr/bin/far")).expect("symlink");
    // "b-copy" sorts after "a-orig": the first in sorted order holds the bytes.
    write(&root.join("data/a-orig"), b"shared bytes", 0o600);
    std::fs::hard_link(root.join("data/a-orig"), root.join("data/b-copy")).expect("hard link");
    let deep = root.join(format!("deep/{}/leaf", "d".repeat(120)));
    write(&deep, b"deep", 0o644);
    let fifo = std::ffi::CString::new(root.join("data/fifo").as_os_str().as_encoded_bytes())
        .expect("path");
    // SAFETY: a valid NUL-terminated path; mkfifo only creates a node.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0, "mkfifo");
}

fn dir_layer(root: &Path, owner: Owner) -> LayerInput {
    LayerInput {
        source: LayerSource::Dir {
            path: root.to_owned(),
            owner,
        },
        created_by: "test layer".into(),
    }
}

#[test]
fn rfc3339_of_the_epoch() {
    assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
    assert_eq!(rfc3339(EPOCH), "2025-05-20T00:00:00Z");
    assert_eq!(rfc3339(951_782_400 + 3_661), "2000-02-29T01:01:01Z");
    assert_eq!(rfc3339(4_102_444_799), "2099-12-31T23:59:59Z");
}

#[test]
fn references_are_fully_qualified_and_need_a_tag() {
    let r = |s: &str| Reference::parse(s).map(|r| r.to_string());
    assert_eq!(
        r("ghcr.io/sendense/sendense-operator:0.1.0").as_deref(),
        Ok("ghcr.io/sendense/sendense-operator:0.1.0")
    );
    assert_eq!(r("nginx:1").as_deref(), Ok("docker.io/library/nginx:1"));
    assert_eq!(r("team/app:v2").as_deref(), Ok("docker.io/team/app:v2"));
    assert_eq!(
        r("localhost/sendense/pause:3.10").as_deref(),
        Ok("localhost/sendense/pause:3.10")
    );
    assert_eq!(
        r("registry.example:5000/a/b:t").as_deref(),
        Ok("registry.example:5000/a/b:t")
    );
    assert!(matches!(
        Reference::parse("registry.example:5000/a/b"),
        Err(ReferenceError::NoTag(_))
    ));
    assert!(matches!(
        Reference::parse("ghcr.io/Sendense/x:1"),
        Err(ReferenceError::BadPath(..))
    ));
    assert!(matches!(
        Reference::parse("x:-bad"),
        Err(ReferenceError::BadTag(..))
    ));
}

#[test]
fn digests_print_and_parse_as_sha256_hex() {
    let d = Digest::of(b"");
    assert_eq!(
        d.to_string(),
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    assert_eq!(Digest::parse(&d.to_string()), Some(d));
    assert_eq!(Digest::parse("sha256:abc"), None);
    assert_eq!(Digest::parse("md5:e3b0c44298fc1c149afbf4c8996fb924"), None);
}

#[test]
fn a_directory_layer_is_sorted_normalised_and_keeps_links_and_modes() {
    let s = Scratch::new("dir-layer");
    let root = s.0.join("root");
    sample_tree(&root);
    let (layer, skipped) = build_layer(
        &LayerSource::Dir {
            path: root.clone(),
            owner: Owner::Id {
                uid: 65532,
                gid: 65533,
            },
        },
        EPOCH,
        "test",
        &s.0,
    )
    .expect("layer");
    assert_eq!(skipped.special_files, 1, "the FIFO is skipped");
    let tar = gunzip(&layer.blob);
    assert_eq!(Digest::of(&tar), layer.diff_id);
    assert_eq!(tar.len() as u64, layer.tar_size);
    assert_eq!(
        Digest::of(&std::fs::read(&layer.blob).expect("blob")),
        layer.digest
    );
    let seen = entries_of(&tar);
    let paths: Vec<&str> = seen.iter().map(|e| e.path.as_str()).collect();
    let mut sorted = paths.clone();
    sorted.sort();
    assert_eq!(paths, sorted, "entries sorted by path");
    assert!(!paths.iter().any(|p| p.contains("fifo")));
    for e in &seen {
        assert_eq!(e.mtime, EPOCH, "{}", e.path);
        assert_eq!((e.uid, e.gid), (65532, 65533), "{}", e.path);
    }
    let get = |p: &str| seen.iter().find(|e| e.path == p).expect(p);
    assert_eq!(get("usr/bin/tool").mode, 0o755);
    assert_eq!(get("usr/bin/su-ish").mode, 0o4755, "setuid kept");
    assert_eq!(get("usr/bin/tool").data, b"#!/bin/sh\necho tool\n");
    assert_eq!(get("usr/bin/alias").kind, '2');
    assert_eq!(get("usr/bin/alias").link.as_deref(), Some("tool"));
    assert_eq!(
        get("usr/bin/far").link,
        Some(long_target()),
        "long symlink target"
    );
    assert_eq!(get("data/a-orig").kind, '0');
    assert_eq!(get("data/a-orig").data, b"shared bytes");
    assert_eq!(get("data/b-copy").kind, '1', "hard link kept as a link");
    assert_eq!(get("data/b-copy").link.as_deref(), Some("data/a-orig"));
    let deep = format!("deep/{}/leaf", "d".repeat(120));
    assert_eq!(get(&deep).data, b"deep", "long path");
    assert_eq!(get("usr").kind, '5');
}

#[test]
fn a_directory_layer_is_owned_by_root_unless_told() {
    let s = Scratch::new("root-owner");
    write(&s.0.join("root/f"), b"x", 0o644);
    let (layer, _) = build_layer(
        &LayerSource::Dir {
            path: s.0.join("root"),
            owner: Owner::Root,
        },
        EPOCH,
        "test",
        &s.0,
    )
    .expect("layer");
    let seen = entries_of(&gunzip(&layer.blob));
    assert_eq!((seen[0].uid, seen[0].gid), (0, 0));
}

#[test]
fn the_same_inputs_give_the_same_bytes_whatever_the_file_times() {
    let s = Scratch::new("determinism");
    let reference = Reference::parse("localhost/sendense/test:1").expect("ref");
    let config = ContainerConfig {
        user: "65532:65532".into(),
        entrypoint: vec!["/usr/bin/tool".into()],
        ..ContainerConfig::default()
    };
    let mut archives = Vec::new();
    for (i, when) in [1_000_000_000i64, 1_700_000_000].into_iter().enumerate() {
        // Two trees with the same content, written at different times and in another order.
        let root = s.0.join(format!("root{i}"));
        sample_tree(&root);
        let stamp =
            std::ffi::CString::new(root.join("usr/bin/tool").as_os_str().as_encoded_bytes())
                .expect("path");
        let times = [libc::timespec {
            tv_sec: when,
            tv_nsec: 0,
        }; 2];
        // SAFETY: a valid path and two timespecs.
        assert_eq!(
            unsafe { libc::utimensat(libc::AT_FDCWD, stamp.as_ptr(), times.as_ptr(), 0) },
            0
        );
        let out = s.0.join(format!("image{i}.oci.tar"));
        let (written, _) = build_image(
            &reference,
            &config,
            EPOCH,
            &[dir_layer(&root, Owner::Root)],
            &out,
        )
        .expect("image");
        archives.push((std::fs::read(&out).expect("archive"), written));
    }
    assert_eq!(archives[0].1.manifest, archives[1].1.manifest);
    assert_eq!(archives[0].1.config, archives[1].1.config);
    assert!(archives[0].0 == archives[1].0, "byte-identical archives");
    let leftovers: Vec<_> = std::fs::read_dir(&s.0)
        .expect("ls")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "work files left: {leftovers:?}");
}

#[test]
fn a_tar_layer_is_sorted_and_its_hard_links_and_devices_handled() {
    let s = Scratch::new("tar-layer");
    let src = s.0.join("base.tar");
    {
        let mut b = tar::Builder::new(std::fs::File::create(&src).expect("tar"));
        let mut add = |path: &str,
                       kind: tar::EntryType,
                       mode: u32,
                       uid: u64,
                       data: &[u8],
                       link: Option<&str>| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_uid(uid);
            h.set_gid(uid);
            h.set_mtime(123);
            h.set_size(data.len() as u64);
            if let Some(l) = link {
                h.set_link_name(l).expect("link");
            }
            h.set_path(path).expect("path");
            h.set_cksum();
            b.append(&h, data).expect("append");
        };
        add("./", tar::EntryType::Directory, 0o755, 0, b"", None);
        add(
            "./z-target",
            tar::EntryType::Regular,
            0o640,
            8,
            b"bytes",
            None,
        );
        add("./b", tar::EntryType::Regular, 0o644, 0, b"old", None);
        add("./a/", tar::EntryType::Directory, 0o755, 0, b"", None);
        add(
            "./a/link",
            tar::EntryType::Link,
            0o640,
            8,
            b"",
            Some("./z-target"),
        );
        add("./dev/null", tar::EntryType::Char, 0o666, 0, b"", None);
        add("./b", tar::EntryType::Regular, 0o644, 0, b"new", None);
        b.finish().expect("finish");
    }
    let (layer, skipped) =
        build_layer(&LayerSource::Tar { path: src }, EPOCH, "base", &s.0).expect("layer");
    assert_eq!(skipped.special_files, 1, "the device is skipped");
    let seen = entries_of(&gunzip(&layer.blob));
    type Summary<'a> = (&'a str, char, Option<&'a str>, &'a [u8], u64);
    let summary: Vec<Summary<'_>> = seen
        .iter()
        .map(|e| {
            (
                e.path.as_str(),
                e.kind,
                e.link.as_deref(),
                e.data.as_slice(),
                e.uid,
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("a", '5', None, &b""[..], 0),
            // The link sorts first, so it holds the bytes; the old target links to it.
            ("a/link", '0', None, &b"bytes"[..], 8),
            ("b", '0', None, &b"new"[..], 0),
            ("z-target", '1', Some("a/link"), &b""[..], 8),
        ]
    );
    assert!(seen.iter().all(|e| e.mtime == EPOCH));
    assert_eq!(seen[1].mode, 0o640);
}

mod archive;
