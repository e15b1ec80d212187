//! Where a copy writes (an NBD export or a local file) and how the writes are aligned to it.

use bytes::Bytes;

use super::CopyError;
use crate::nbd::NbdClient;

/// Where a copy writes: an NBD export, or a local file written directly (a restore into a new
/// raw image: no server between the engine and the file).
#[derive(Clone, Copy)]
pub enum Sink<'a> {
    Nbd(&'a NbdClient),
    File(&'a FileSink),
}

/// A local file the copy writes with positioned writes, each on a blocking thread and within
/// a deadline (a file on network storage can stall).
#[derive(Debug, Clone)]
pub struct FileSink {
    file: std::sync::Arc<std::fs::File>,
    size: u64,
    deadline: std::time::Duration,
}

impl FileSink {
    /// `file` of `size` bytes (already sized); each write must end within `deadline`.
    pub fn new(file: std::fs::File, size: u64, deadline: std::time::Duration) -> Self {
        Self {
            file: std::sync::Arc::new(file),
            size,
            deadline,
        }
    }

    /// The file written.
    pub fn file(&self) -> &std::sync::Arc<std::fs::File> {
        &self.file
    }

    /// Its size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// How long one piece of blocking I/O on it may take.
    pub fn deadline(&self) -> std::time::Duration {
        self.deadline
    }

    async fn blocking<T: Send + 'static>(
        &self,
        offset: u64,
        f: impl FnOnce(&std::fs::File) -> std::io::Result<T> + Send + 'static,
    ) -> Result<T, CopyError> {
        let file = self.file.clone();
        within(self.deadline, move || f(&file))
            .await
            .and_then(|r| r)
            .map_err(|source| CopyError::TargetFile { offset, source })
    }
}

/// Runs blocking file I/O `f` on a blocking thread, and gives up on it after `deadline`: a
/// file on network storage can stall forever (the thread is then left behind; the caller
/// fails instead of hanging).
pub async fn within<T: Send + 'static>(
    deadline: std::time::Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<T> {
    match tokio::time::timeout(deadline, tokio::task::spawn_blocking(f)).await {
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer within {deadline:?}"),
        )),
        Ok(Err(join)) => Err(std::io::Error::other(join.to_string())),
        Ok(Ok(r)) => Ok(r),
    }
}

impl Sink<'_> {
    pub(super) fn size(&self) -> u64 {
        match self {
            Sink::Nbd(c) => c.size(),
            Sink::File(f) => f.size,
        }
    }

    /// The block size the target prefers writes to start and end on (1: none).
    fn preferred_block(&self) -> u32 {
        match self {
            Sink::Nbd(c) => c.block_size().preferred,
            Sink::File(_) => 1,
        }
    }

    pub(super) fn max_request(&self) -> u32 {
        match self {
            Sink::Nbd(c) => c.block_size().maximum,
            Sink::File(_) => u32::MAX,
        }
    }

    pub(super) async fn write(&self, offset: u64, data: Bytes) -> Result<(), CopyError> {
        match self {
            Sink::Nbd(c) => c
                .write(offset, data)
                .await
                .map_err(|source| CopyError::Target { offset, source }),
            Sink::File(f) => {
                use std::os::unix::fs::FileExt;
                f.blocking(offset, move |file| file.write_all_at(&data, offset))
                    .await
            }
        }
    }

    pub(super) async fn write_zeroes(&self, offset: u64, length: u64) -> Result<(), CopyError> {
        match self {
            Sink::Nbd(c) => {
                let r = if c.can_write_zeroes() {
                    c.write_zeroes(offset, length as u32, false).await
                } else {
                    c.write(offset, Bytes::from(vec![0u8; length as usize]))
                        .await
                };
                r.map_err(|source| CopyError::Target { offset, source })
            }
            Sink::File(f) => {
                use std::os::unix::fs::FileExt;
                f.blocking(offset, move |file| {
                    file.write_all_at(&vec![0u8; length as usize], offset)
                })
                .await
            }
        }
    }

    pub(super) async fn flush(&self) -> Result<(), CopyError> {
        match self {
            Sink::Nbd(c) => c
                .flush()
                .await
                .map_err(|source| CopyError::Target { offset: 0, source }),
            Sink::File(f) => f.blocking(0, |file| file.sync_all()).await,
        }
    }
}

/// Largest alignment the copy widens writes to (a server preferring more is not followed:
/// widening every small CBT area that far would cost more than it saves).
const MAX_ALIGN: u32 = 64 << 10;

/// What writes are aligned to: the target's preferred block size (NBD_INFO_BLOCK_SIZE; 4 KiB
/// from qemu-nbd), when it is a power of two of at most `MAX_ALIGN` that divides the request
/// size; otherwise 1 (no alignment). A write that covers whole blocks spares the server a
/// read-modify-write: in the hub's QCOW2 (2 KiB subclusters) a 4 KiB-aligned write never copies
/// from the parent or zero-fills part of a subcluster.
pub(super) fn write_alignment(target: &Sink<'_>, request_size: u32) -> u64 {
    let p = target.preferred_block();
    if p.is_power_of_two() && p <= MAX_ALIGN && request_size.is_multiple_of(p) {
        u64::from(p)
    } else {
        1
    }
}
