//! The JSON documents of an image, as the OCI image spec and Docker's `docker save` format
//! define them. Field order is fixed by the structs and maps are `BTreeMap`s, so the same image
//! always serialises to the same bytes and digests.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use super::digest::Digest;

pub const MEDIA_TYPE_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_TYPE_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_TYPE_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MEDIA_TYPE_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// The annotation containerd (`ctr images import`, kind, k3s) names the imported image by.
pub const ANNOTATION_CONTAINERD_NAME: &str = "io.containerd.image.name";
/// The OCI annotation `skopeo ... oci-archive:FILE:REF` and `umoci --image DIR:REF` match.
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";

/// An image reference `[domain/]path:tag`, kept in the fully qualified form containerd and the
/// kubelet use (`nginx:1` is `docker.io/library/nginx:1`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reference {
    /// Domain and path, e.g. `ghcr.io/sendense/sendense-operator`.
    pub repository: String,
    pub tag: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReferenceError {
    #[error("image reference {0:?} has no tag (expected name:tag)")]
    NoTag(String),
    #[error("image reference {0:?}: tag {1:?} is not [A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}}")]
    BadTag(String, String),
    #[error("image reference {0:?}: path component {1:?} is not lowercase [a-z0-9._-]")]
    BadPath(String, String),
}

impl Reference {
    pub fn parse(s: &str) -> Result<Reference, ReferenceError> {
        let slash = s.rfind('/').map_or(0, |i| i + 1);
        let colon = s[slash..]
            .rfind(':')
            .map(|i| slash + i)
            .ok_or_else(|| ReferenceError::NoTag(s.to_owned()))?;
        let (name, tag) = (&s[..colon], &s[colon + 1..]);
        let tag_ok = !tag.is_empty()
            && tag.len() <= 128
            && !tag.starts_with(['.', '-'])
            && tag
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if !tag_ok {
            return Err(ReferenceError::BadTag(s.to_owned(), tag.to_owned()));
        }
        let mut parts: Vec<&str> = name.split('/').collect();
        // A first component with a dot or a port, or "localhost", is a registry domain.
        let has_domain = parts.len() > 1
            && (parts[0].contains(['.', ':']) || parts[0] == "localhost")
            && !parts[0].is_empty();
        let domain = if has_domain {
            Some(parts.remove(0))
        } else {
            None
        };
        for p in &parts {
            let ok = !p.is_empty()
                && p.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
                });
            if !ok {
                return Err(ReferenceError::BadPath(s.to_owned(), (*p).to_owned()));
            }
        }
        let repository = match domain {
            Some(d) => format!("{d}/{}", parts.join("/")),
            None if parts.len() == 1 => format!("docker.io/library/{}", parts[0]),
            None => format!("docker.io/{}", parts.join("/")),
        };
        Ok(Reference {
            repository,
            tag: tag.to_owned(),
        })
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.repository, self.tag)
    }
}

/// A content descriptor: what a manifest or index says about one blob.
#[derive(Serialize, Clone, Debug)]
pub struct Descriptor {
    #[serde(rename = "mediaType")]
    pub media_type: &'static str,
    pub digest: Digest,
    pub size: u64,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// The image configuration blob (OCI image-spec config.md).
#[derive(Serialize, Debug)]
pub struct ConfigBlob {
    pub created: String,
    pub architecture: &'static str,
    pub os: &'static str,
    pub config: ContainerConfig,
    pub rootfs: RootFs,
    pub history: Vec<History>,
}

/// What a container of the image runs with, unless the runtime is told otherwise.
#[derive(Serialize, Debug, Default, Clone)]
pub struct ContainerConfig {
    #[serde(rename = "User", skip_serializing_if = "String::is_empty")]
    pub user: String,
    #[serde(rename = "Env", skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    #[serde(rename = "Entrypoint", skip_serializing_if = "Vec::is_empty")]
    pub entrypoint: Vec<String>,
    #[serde(rename = "Cmd", skip_serializing_if = "Vec::is_empty")]
    pub cmd: Vec<String>,
    #[serde(rename = "WorkingDir", skip_serializing_if = "String::is_empty")]
    pub working_dir: String,
    #[serde(rename = "Labels", skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

#[derive(Serialize, Debug)]
pub struct RootFs {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub diff_ids: Vec<Digest>,
}

#[derive(Serialize, Debug)]
pub struct History {
    pub created: String,
    pub created_by: String,
}

/// The image manifest (OCI image-spec manifest.md).
#[derive(Serialize, Debug)]
pub struct Manifest {
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    #[serde(rename = "mediaType")]
    pub media_type: &'static str,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

/// `index.json` of the image layout.
#[derive(Serialize, Debug)]
pub struct Index {
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    #[serde(rename = "mediaType")]
    pub media_type: &'static str,
    pub manifests: Vec<Descriptor>,
}

/// One image of Docker's `manifest.json` (what `docker load` reads).
#[derive(Serialize, Debug)]
pub struct DockerManifestEntry {
    #[serde(rename = "Config")]
    pub config: String,
    #[serde(rename = "RepoTags")]
    pub repo_tags: Vec<String>,
    #[serde(rename = "Layers")]
    pub layers: Vec<String>,
}

/// `created` timestamps: RFC 3339 in UTC from seconds since the epoch (SOURCE_DATE_EPOCH).
pub fn rfc3339(epoch: u64) -> String {
    let days = (epoch / 86_400) as i64;
    let secs = epoch % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3_600,
        secs % 3_600 / 60,
        secs % 60
    )
}
