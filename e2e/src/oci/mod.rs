//! A small OCI image writer: layers from directories or tar archives, a config, a reference ->
//! one reproducible archive that containerd, Docker, kind, k3s and skopeo all read (see
//! `archive`). Used by e2e/images/build.sh through the `oci-image` binary.
//!
//! Reproducible: the same inputs and epoch (SOURCE_DATE_EPOCH) give a byte-identical archive,
//! so the same digests (see `layer` for what is normalised).

mod archive;
mod digest;
mod layer;
mod spec;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};

pub use archive::{ArchiveError, WrittenImage, write_archive};
pub use digest::Digest;
pub use layer::{BuiltLayer, LayerError, LayerSource, Owner, Skipped, build_layer};
pub use spec::{ContainerConfig, Reference, ReferenceError, rfc3339};

#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error(transparent)]
    Layer(#[from] LayerError),
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error("creating the work directory {0}: {1}")]
    WorkDir(PathBuf, #[source] std::io::Error),
}

/// One layer to build and the history line the config records for it.
#[derive(Clone, Debug)]
pub struct LayerInput {
    pub source: LayerSource,
    pub created_by: String,
}

/// Builds every layer (in a work directory beside `out`, removed afterwards) and writes the
/// archive to `out`.
pub fn build_image(
    reference: &Reference,
    config: &ContainerConfig,
    epoch: u64,
    layers: &[LayerInput],
    out: &Path,
) -> Result<(WrittenImage, Skipped), OciError> {
    let parent = out.parent().unwrap_or(Path::new("."));
    let name = out
        .file_name()
        .map_or_else(|| "image".into(), |n| n.to_string_lossy().into_owned());
    let work = parent.join(format!(".{name}.layers.{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| OciError::WorkDir(work.clone(), e))?;
    let result = build_in(reference, config, epoch, layers, out, &work);
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn build_in(
    reference: &Reference,
    config: &ContainerConfig,
    epoch: u64,
    layers: &[LayerInput],
    out: &Path,
    work: &Path,
) -> Result<(WrittenImage, Skipped), OciError> {
    let mut built = Vec::with_capacity(layers.len());
    let mut skipped = Skipped::default();
    for l in layers {
        let (layer, s) = build_layer(&l.source, epoch, &l.created_by, work)?;
        skipped.special_files += s.special_files;
        built.push(layer);
    }
    Ok((
        write_archive(reference, config, epoch, &built, out)?,
        skipped,
    ))
}
