//! The `Read + Seek` view of a volume that the `ntfs` crate reads through, with a budget of
//! reads per step: the crate follows on-disk references (index subnodes, attribute lists) without
//! loop detection, so a hostile image could otherwise keep it reading, and allocating, forever.

use std::io::{self, Read, Seek, SeekFrom};
use std::sync::Arc;

use crate::ReadAt;

/// Reads allowed for one step (one index entry, one attribute, one chunk of a file). A sound
/// volume needs a handful: the B-tree depth of a directory index, the records of an attribute
/// list. Each read is at most one record or one data run's part of the caller's buffer.
pub(super) const READS_PER_STEP: u32 = 4096;

/// Marks an `io::Error` as the budget running out (a loop in the structures, not an I/O fault).
#[derive(Debug, thiserror::Error)]
#[error(
    "more than {READS_PER_STEP} reads for one step: a reference loop in the on-disk structures"
)]
pub(super) struct ReadBudgetExhausted;

pub(super) struct VolumeReader {
    volume: Arc<dyn ReadAt>,
    position: u64,
    reads_left: u32,
}

impl VolumeReader {
    pub(super) fn new(volume: Arc<dyn ReadAt>) -> Self {
        Self {
            volume,
            position: 0,
            reads_left: READS_PER_STEP,
        }
    }

    /// Starts a new step with a full budget.
    pub(super) fn refill(&mut self) {
        self.reads_left = READS_PER_STEP;
    }

    /// Starts a step that may take `reads` reads (a whole walk whose size is known).
    pub(super) fn allow(&mut self, reads: u32) {
        self.reads_left = reads;
    }
}

impl Read for VolumeReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.reads_left == 0 {
            return Err(io::Error::other(ReadBudgetExhausted));
        }
        self.reads_left -= 1;
        let remaining = self.volume.size().saturating_sub(self.position);
        let n = usize::try_from(remaining).map_or(buf.len(), |r| r.min(buf.len()));
        if n == 0 {
            return Ok(0);
        }
        self.volume
            .read_exact_at(self.position, &mut buf[..n])
            .map_err(io::Error::other)?;
        self.position += n as u64;
        Ok(n)
    }
}

impl Seek for VolumeReader {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(offset) => Some(offset),
            SeekFrom::End(delta) => self.volume.size().checked_add_signed(delta),
            SeekFrom::Current(delta) => self.position.checked_add_signed(delta),
        };
        self.position = target.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek before the volume's start",
            )
        })?;
        Ok(self.position)
    }
}
