//! A restore point's disks as guest file systems: each disk's QCOW2 chain is served read-only
//! by a private qemu-nbd, read over NBD (the agent's client, with its deadlines) through a small
//! block cache, split into volumes by its partition table and opened by `sendense-guestfs`.
//! No kernel mount, no loop or NBD device, no privilege.
//!
//! The file system readers are synchronous: they run on a blocking thread and each read waits
//! on the runtime for its NBD request.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};
use sendense_contract::manifest::{MANIFEST_FILE, Manifest};
use sendense_contract::restore::Refusal;
use sendense_guestfs::partition::{self, Volume};
use sendense_guestfs::{FileSystem, ReadAt, Slice};

use crate::nbd::{ConnectOptions, NbdClient};
use crate::qemu_nbd::ReadOnlyExport;

/// Reads of at most this size go through the cache, in blocks of `BLOCK`.
const CACHED_BELOW: usize = 256 << 10;
const BLOCK: u64 = 64 << 10;
/// Blocks kept (16 MiB).
const CACHE_BLOCKS: usize = 256;
/// Largest single NBD read.
const MAX_READ: usize = 2 << 20;

/// An NBD export as a synchronous [`ReadAt`], for code on a blocking thread.
pub struct NbdImage {
    client: Arc<NbdClient>,
    runtime: tokio::runtime::Handle,
    cache: Mutex<Cache>,
}

#[derive(Default)]
struct Cache {
    blocks: HashMap<u64, (Arc<Vec<u8>>, u64)>,
    tick: u64,
}

impl NbdImage {
    pub fn new(client: Arc<NbdClient>, runtime: tokio::runtime::Handle) -> Self {
        Self {
            client,
            runtime,
            cache: Mutex::default(),
        }
    }

    fn fetch(&self, offset: u64, buf: &mut [u8]) -> sendense_guestfs::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let n = (buf.len() - done).min(MAX_READ);
            let at = offset + done as u64;
            let data = self
                .runtime
                .block_on(self.client.read(at, n as u32))
                .map_err(|e| sendense_guestfs::Error::Io {
                    offset: at,
                    source: std::io::Error::other(e),
                })?;
            buf[done..done + n].copy_from_slice(&data);
            done += n;
        }
        Ok(())
    }

    fn block(&self, index: u64) -> sendense_guestfs::Result<Arc<Vec<u8>>> {
        {
            let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            c.tick += 1;
            let tick = c.tick;
            if let Some((b, used)) = c.blocks.get_mut(&index) {
                *used = tick;
                return Ok(b.clone());
            }
        }
        let start = index * BLOCK;
        let len = BLOCK.min(self.client.size() - start) as usize;
        let mut data = vec![0u8; len];
        self.fetch(start, &mut data)?;
        let data = Arc::new(data);
        let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if c.blocks.len() >= CACHE_BLOCKS
            && let Some(oldest) = c
                .blocks
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .map(|(k, _)| *k)
        {
            c.blocks.remove(&oldest);
        }
        let tick = c.tick;
        c.blocks.insert(index, (data.clone(), tick));
        Ok(data)
    }
}

impl ReadAt for NbdImage {
    fn size(&self) -> u64 {
        self.client.size()
    }

    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> sendense_guestfs::Result<()> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > self.size()) {
            return Err(sendense_guestfs::Error::Io {
                offset,
                source: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("read of {} bytes past the end of the disk", buf.len()),
                ),
            });
        }
        if buf.len() >= CACHED_BELOW {
            return self.fetch(offset, buf);
        }
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            let block = self.block(at / BLOCK)?;
            let within = (at % BLOCK) as usize;
            let n = (buf.len() - done).min(block.len() - within);
            buf[done..done + n].copy_from_slice(&block[within..within + n]);
            done += n;
        }
        Ok(())
    }
}

/// One disk of a restore point, opened.
pub struct GuestDisk {
    pub key: i32,
    pub file: PathBuf,
    pub image: Arc<dyn ReadAt>,
    _export: ReadOnlyExport,
    client: Arc<NbdClient>,
}

impl GuestDisk {
    pub async fn open(key: i32, file: &Path, opts: &ConnectOptions) -> Result<Self> {
        std::fs::metadata(file).map_err(|e| {
            crate::cmd::refused(
                Refusal::SourceNotFound,
                format!("disk {key}: {}: {e}", file.display()),
            )
        })?;
        let export = ReadOnlyExport::start(file)
            .await
            .with_context(|| format!("disk {key}: opening the chain of {}", file.display()))?;
        let client = Arc::new(
            NbdClient::connect(&export.url(), opts)
                .await
                .with_context(|| format!("disk {key}: reading {}", file.display()))?,
        );
        let image: Arc<dyn ReadAt> = Arc::new(NbdImage::new(
            client.clone(),
            tokio::runtime::Handle::current(),
        ));
        Ok(Self {
            key,
            file: file.to_owned(),
            image,
            _export: export,
            client,
        })
    }

    pub fn size(&self) -> u64 {
        self.client.size()
    }
}

/// The disks of a restore point's directory (from its manifest), or one QCOW2 file as disk 0.
pub fn disk_files(
    restore_point: Option<&Path>,
    image: Option<&Path>,
    keys: &[i32],
) -> Result<Vec<(i32, PathBuf)>> {
    match (restore_point, image) {
        (Some(dir), None) => {
            let path = dir.join(MANIFEST_FILE);
            let text = std::fs::read_to_string(&path).map_err(|e| {
                crate::cmd::refused(
                    Refusal::SourceNotFound,
                    format!(
                        "{}: not a committed restore point (no readable manifest: {e})",
                        dir.display()
                    ),
                )
            })?;
            let m = Manifest::parse(&text).with_context(|| path.display().to_string())?;
            if m.being_pruned() {
                return Err(crate::cmd::refused(
                    Refusal::SourceNotFound,
                    format!(
                        "{}: the restore point is being pruned (retention is merging it into its children): restore from another point",
                        dir.display()
                    ),
                ));
            }
            for k in keys {
                if !m.disks.iter().any(|d| d.device_key == *k) {
                    let have: Vec<i32> = m.disks.iter().map(|d| d.device_key).collect();
                    return Err(crate::cmd::refused(
                        Refusal::DiskNotFound,
                        format!("--disk {k}: the restore point has disks {have:?}"),
                    ));
                }
            }
            Ok(m.disks
                .iter()
                .filter(|d| keys.is_empty() || keys.contains(&d.device_key))
                .map(|d| {
                    let name = Path::new(&d.file)
                        .file_name()
                        .map(PathBuf::from)
                        .unwrap_or_else(|| PathBuf::from(&d.file));
                    (d.device_key, dir.join(name))
                })
                .collect())
        }
        (None, Some(file)) => Ok(vec![(keys.first().copied().unwrap_or(0), file.to_owned())]),
        _ => bail!("give exactly one of --restore-point DIR or --image FILE"),
    }
}

/// A volume of a disk and what is on it.
pub struct GuestVolume {
    pub disk: i32,
    pub volume: Volume,
    /// The file system, or why there is none we can read.
    pub fs: Result<Box<dyn FileSystem>, String>,
}

impl GuestVolume {
    /// `2000:1` (disk 2000, partition 1; 0 for a disk without a partition table).
    pub fn name(&self) -> String {
        format!("{}:{}", self.disk, self.volume.number)
    }
}

/// Every volume of every disk, each with its file system opened (blocking: run on a blocking
/// thread).
pub fn volumes(disks: &[GuestDisk]) -> Result<Vec<GuestVolume>> {
    let mut out = Vec::new();
    for d in disks {
        let vols = partition::volumes(&d.image)
            .with_context(|| format!("disk {}: reading its partition table", d.key))?;
        for v in vols {
            let slice: Arc<dyn ReadAt> = Arc::new(Slice::new(d.image.clone(), v.start, v.size));
            let fs = sendense_guestfs::open_filesystem(
                slice,
                &format!("disk {} volume {}", d.key, v.number),
            )
            .map_err(|e| e.to_string());
            out.push(GuestVolume {
                disk: d.key,
                volume: v,
                fs,
            });
        }
    }
    Ok(out)
}
