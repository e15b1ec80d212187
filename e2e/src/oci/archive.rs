//! The image archive: one tar that is an OCI image layout (`oci-layout`, `index.json`,
//! `blobs/sha256/...`) and a Docker archive (`manifest.json`, as `docker save` writes since
//! Docker 25) at once, over the same blobs. containerd (`ctr images import`, kind, k3s) names
//! the image by the index's `io.containerd.image.name`, `docker load` by `RepoTags`, skopeo
//! reads it as `oci-archive:`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use tar::{EntryType, Header};

use super::digest::Digest;
use super::layer::{BuiltLayer, Exact};
use super::spec::{
    ANNOTATION_CONTAINERD_NAME, ANNOTATION_REF_NAME, ConfigBlob, ContainerConfig, Descriptor,
    DockerManifestEntry, History, Index, MEDIA_TYPE_CONFIG, MEDIA_TYPE_INDEX,
    MEDIA_TYPE_LAYER_GZIP, MEDIA_TYPE_MANIFEST, Manifest, Reference, RootFs, rfc3339,
};

/// What the archive holds, in its own words: enough to check a load or a push.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WrittenImage {
    pub archive: PathBuf,
    pub reference: String,
    /// Digest of the manifest: the image's digest in a registry and in containerd.
    pub manifest: Digest,
    /// Digest of the config: the image ID `docker images` shows.
    pub config: Digest,
    /// The layers' blob digests, base first.
    pub layers: Vec<Digest>,
    pub archive_size: u64,
    /// Sum of the layers' uncompressed tar sizes: about what the image takes unpacked.
    pub unpacked_size: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("serialising the image's {0}: {1}")]
    Json(&'static str, #[source] serde_json::Error),
}

/// The blobs and JSON documents of one image, before they are written.
struct Documents {
    config: Vec<u8>,
    manifest: Vec<u8>,
    index: Vec<u8>,
    docker_manifest: Vec<u8>,
}

fn documents(
    reference: &Reference,
    config: &ContainerConfig,
    epoch: u64,
    layers: &[BuiltLayer],
) -> Result<Documents, ArchiveError> {
    let created = rfc3339(epoch);
    let config_blob = ConfigBlob {
        created: created.clone(),
        architecture: "amd64",
        os: "linux",
        config: config.clone(),
        rootfs: RootFs {
            kind: "layers",
            diff_ids: layers.iter().map(|l| l.diff_id.clone()).collect(),
        },
        history: layers
            .iter()
            .map(|l| History {
                created: created.clone(),
                created_by: l.created_by.clone(),
            })
            .collect(),
    };
    let config = serde_json::to_vec(&config_blob).map_err(|e| ArchiveError::Json("config", e))?;
    let manifest = Manifest {
        schema_version: 2,
        media_type: MEDIA_TYPE_MANIFEST,
        config: Descriptor {
            media_type: MEDIA_TYPE_CONFIG,
            digest: Digest::of(&config),
            size: config.len() as u64,
            annotations: BTreeMap::new(),
        },
        layers: layers
            .iter()
            .map(|l| Descriptor {
                media_type: MEDIA_TYPE_LAYER_GZIP,
                digest: l.digest.clone(),
                size: l.size,
                annotations: BTreeMap::new(),
            })
            .collect(),
    };
    let manifest = serde_json::to_vec(&manifest).map_err(|e| ArchiveError::Json("manifest", e))?;
    let index = Index {
        schema_version: 2,
        media_type: MEDIA_TYPE_INDEX,
        manifests: vec![Descriptor {
            media_type: MEDIA_TYPE_MANIFEST,
            digest: Digest::of(&manifest),
            size: manifest.len() as u64,
            // As Docker 25 and containerd write them: the full name for containerd, the tag as
            // the OCI ref name.
            annotations: BTreeMap::from([
                (ANNOTATION_CONTAINERD_NAME.to_owned(), reference.to_string()),
                (ANNOTATION_REF_NAME.to_owned(), reference.tag.clone()),
            ]),
        }],
    };
    let index = serde_json::to_vec(&index).map_err(|e| ArchiveError::Json("index", e))?;
    let docker_manifest = vec![DockerManifestEntry {
        config: blob_path(&Digest::of(&config)),
        repo_tags: vec![familiar(reference)],
        layers: layers.iter().map(|l| blob_path(&l.digest)).collect(),
    }];
    let docker_manifest =
        serde_json::to_vec(&docker_manifest).map_err(|e| ArchiveError::Json("manifest.json", e))?;
    Ok(Documents {
        config,
        manifest,
        index,
        docker_manifest,
    })
}

fn blob_path(d: &Digest) -> String {
    format!("blobs/sha256/{}", d.hex())
}

/// The name as Docker shows it (`nginx:1`, not `docker.io/library/nginx:1`).
fn familiar(r: &Reference) -> String {
    let full = r.to_string();
    full.strip_prefix("docker.io/library/")
        .or_else(|| full.strip_prefix("docker.io/"))
        .map_or(full.clone(), str::to_owned)
}

enum Blob<'a> {
    Bytes(&'a [u8]),
    File(&'a Path, u64),
}

/// Writes the archive of an image made of `layers` (in order, base first) to `out`, through a
/// temporary file beside it, so `out` is either the old archive or the complete new one.
pub fn write_archive(
    reference: &Reference,
    config: &ContainerConfig,
    epoch: u64,
    layers: &[BuiltLayer],
    out: &Path,
) -> Result<WrittenImage, ArchiveError> {
    let docs = documents(reference, config, epoch, layers)?;
    let mut blobs: BTreeMap<Digest, Blob<'_>> = BTreeMap::new();
    blobs.insert(Digest::of(&docs.config), Blob::Bytes(&docs.config));
    blobs.insert(Digest::of(&docs.manifest), Blob::Bytes(&docs.manifest));
    for l in layers {
        blobs.insert(l.digest.clone(), Blob::File(&l.blob, l.size));
    }

    let tmp = out.with_extension(format!("tmp.{}", std::process::id()));
    let result = write_tar(&tmp, epoch, &blobs, &docs).and_then(|()| {
        std::fs::rename(&tmp, out).map_err(|source| ArchiveError::Io {
            what: "moving the archive to",
            path: out.to_owned(),
            source,
        })
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    let archive_size = std::fs::metadata(out)
        .map_err(|source| ArchiveError::Io {
            what: "reading",
            path: out.to_owned(),
            source,
        })?
        .len();
    Ok(WrittenImage {
        archive: out.to_owned(),
        reference: reference.to_string(),
        manifest: Digest::of(&docs.manifest),
        config: Digest::of(&docs.config),
        layers: layers.iter().map(|l| l.digest.clone()).collect(),
        archive_size,
        unpacked_size: layers.iter().map(|l| l.tar_size).sum(),
    })
}

fn write_tar(
    path: &Path,
    epoch: u64,
    blobs: &BTreeMap<Digest, Blob<'_>>,
    docs: &Documents,
) -> Result<(), ArchiveError> {
    let err = |what| {
        move |source| ArchiveError::Io {
            what,
            path: path.to_owned(),
            source,
        }
    };
    let file = File::create(path).map_err(err("creating"))?;
    let mut tar = tar::Builder::new(BufWriter::with_capacity(1 << 20, file));
    let header = |kind: EntryType, mode: u32, size: u64| {
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(epoch);
        h.set_size(size);
        h
    };
    let dir = |tar: &mut tar::Builder<_>, name: &str| {
        tar.append_data(
            &mut header(EntryType::Directory, 0o755, 0),
            name,
            io::empty(),
        )
    };
    dir(&mut tar, "blobs").map_err(err("writing"))?;
    dir(&mut tar, "blobs/sha256").map_err(err("writing"))?;
    for (digest, blob) in blobs {
        let name = blob_path(digest);
        match blob {
            Blob::Bytes(b) => tar.append_data(
                &mut header(EntryType::Regular, 0o644, b.len() as u64),
                &name,
                *b,
            ),
            Blob::File(p, size) => {
                let f = File::open(p).map_err(|source| ArchiveError::Io {
                    what: "opening the layer blob",
                    path: p.to_path_buf(),
                    source,
                })?;
                tar.append_data(
                    &mut header(EntryType::Regular, 0o644, *size),
                    &name,
                    Exact::new(f, *size),
                )
            }
        }
        .map_err(err("writing"))?;
    }
    let layout = br#"{"imageLayoutVersion":"1.0.0"}"#;
    for (name, bytes) in [
        ("index.json", docs.index.as_slice()),
        ("manifest.json", docs.docker_manifest.as_slice()),
        ("oci-layout", layout.as_slice()),
    ] {
        tar.append_data(
            &mut header(EntryType::Regular, 0o644, bytes.len() as u64),
            name,
            bytes,
        )
        .map_err(err("writing"))?;
    }
    let mut out = tar.into_inner().map_err(err("writing"))?;
    out.flush().map_err(err("writing"))?;
    Ok(())
}
