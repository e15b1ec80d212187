//! The requests of one connection and the table of those in flight: the writer registers each
//! request under its handle before sending it, the reader takes it out by the handle of a reply
//! (in any order), and a dead connection fails everything still in the table.

use std::collections::HashMap;
use std::sync::Mutex;

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, oneshot};

use super::NbdError;
use super::pool::{Coverage, PoolBuf, pool};
use super::proto::{self, Extent};

/// A request as the caller states it.
#[derive(Debug, Clone)]
pub enum Command {
    Read {
        offset: u64,
        length: u32,
    },
    Write {
        offset: u64,
        data: Bytes,
        flags: u16,
    },
    WriteZeroes {
        offset: u64,
        length: u32,
        flags: u16,
    },
    Trim {
        offset: u64,
        length: u32,
    },
    Flush,
    BlockStatus {
        offset: u64,
        length: u32,
    },
}

impl Command {
    pub fn name(&self) -> &'static str {
        match self {
            Command::Read { .. } => "READ",
            Command::Write { .. } => "WRITE",
            Command::WriteZeroes { .. } => "WRITE_ZEROES",
            Command::Trim { .. } => "TRIM",
            Command::Flush => "FLUSH",
            Command::BlockStatus { .. } => "BLOCK_STATUS",
        }
    }

    /// The request header's fields: (command, flags, offset, length), and the payload to send.
    pub fn wire(&self) -> (u16, u16, u64, u32, Option<Bytes>) {
        match self {
            Command::Read { offset, length } => (proto::CMD_READ, 0, *offset, *length, None),
            Command::Write {
                offset,
                data,
                flags,
            } => (
                proto::CMD_WRITE,
                *flags,
                *offset,
                data.len() as u32,
                Some(data.clone()),
            ),
            Command::WriteZeroes {
                offset,
                length,
                flags,
            } => (proto::CMD_WRITE_ZEROES, *flags, *offset, *length, None),
            Command::Trim { offset, length } => (proto::CMD_TRIM, 0, *offset, *length, None),
            Command::Flush => (proto::CMD_FLUSH, 0, 0, 0, None),
            Command::BlockStatus { offset, length } => {
                (proto::CMD_BLOCK_STATUS, 0, *offset, *length, None)
            }
        }
    }
}

/// What a completed request yields.
#[derive(Debug)]
pub enum Reply {
    Done,
    Data(Bytes),
    Extents(Vec<Extent>),
}

pub type Completion = oneshot::Sender<Result<Reply, NbdError>>;

/// A request waiting for the writer; its permit holds one in-flight slot until it completes.
pub struct Queued {
    pub command: Command,
    pub done: Completion,
    pub permit: OwnedSemaphorePermit,
}

/// A request sent and not yet fully answered.
pub struct Pending {
    pub name: &'static str,
    pub offset: u64,
    pub length: u32,
    /// READ: the data, in a reused buffer (old contents until the reply covers them).
    pub data: Option<PoolBuf>,
    /// READ: which bytes the reply has covered so far.
    pub covered: Coverage,
    pub extents: Option<Vec<Extent>>,
    pub error: Option<NbdError>,
    done: Completion,
    _permit: OwnedSemaphorePermit,
}

impl Pending {
    /// The entry for `queued`, about to be sent with these header fields.
    pub fn new(queued: Queued, offset: u64, length: u32) -> Self {
        let Queued {
            command,
            done,
            permit,
        } = queued;
        Self {
            name: command.name(),
            offset,
            length,
            data: matches!(command, Command::Read { .. }).then(|| pool().take(length as usize)),
            covered: Coverage::default(),
            extents: matches!(command, Command::BlockStatus { .. }).then(Vec::new),
            error: None,
            done,
            _permit: permit,
        }
    }

    /// Answers the caller (releasing the in-flight slot).
    pub fn finish(self) {
        let result = match (self.error, self.data, self.extents) {
            (Some(e), _, _) => Err(e),
            (None, Some(_), _) if !self.covered.is_exactly(self.length as u64) => {
                Err(NbdError::Protocol(format!(
                    "the reply to READ {}+{} did not cover each byte exactly once",
                    self.offset, self.length
                )))
            }
            (None, Some(d), _) => Ok(Reply::Data(d.freeze())),
            (None, None, Some(e)) => Ok(Reply::Extents(e)),
            (None, None, None) => Ok(Reply::Done),
        };
        let _ = self.done.send(result);
    }

    /// The part of this READ's buffer that a data or hole chunk (`what`) at `offset+length`
    /// covers. A chunk in reply to another command, or outside the request, breaks the protocol.
    pub fn chunk_buffer(
        &mut self,
        what: &str,
        offset: u64,
        length: u64,
    ) -> Result<&mut [u8], NbdError> {
        let (request_offset, request_length) = (self.offset, self.length as u64);
        let buf = self
            .data
            .as_mut()
            .ok_or_else(|| NbdError::Protocol(format!("{what} chunk in reply to {}", self.name)))?;
        let (start, end) = offset
            .checked_sub(request_offset)
            .and_then(|s| Some((s, s.checked_add(length)?)))
            .filter(|(_, end)| *end <= request_length)
            .ok_or_else(|| {
                NbdError::Protocol(format!(
                    "{what} at {offset}+{length} outside the request {request_offset}+{request_length}"
                ))
            })?;
        self.covered.add(start, end);
        Ok(&mut buf.as_mut()[start as usize..end as usize])
    }
}

/// The requests in flight on one connection, by handle, and why the connection died.
#[derive(Default)]
pub struct InFlight {
    pending: Mutex<HashMap<u64, Pending>>,
    /// Set once the connection is dead; why.
    dead: Mutex<Option<String>>,
}

impl InFlight {
    /// Registers a request under `handle` (before it is sent: the reply may come back at once),
    /// or puts back one whose reply goes on.
    pub fn insert(&self, handle: u64, pending: Pending) {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(handle, pending);
    }

    /// Takes out the request a reply is for; the caller puts it back unless the reply is done,
    /// so that no lock is held across awaits.
    pub fn take(&self, handle: u64) -> Result<Pending, NbdError> {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&handle)
            .ok_or_else(|| NbdError::Protocol(format!("reply for unknown handle {handle}")))
    }

    /// Marks the connection dead (the first reason stays) and fails every request in flight.
    pub fn fail_all(&self, reason: &str) {
        {
            let mut dead = self.dead.lock().unwrap_or_else(|e| e.into_inner());
            if dead.is_none() {
                *dead = Some(reason.to_owned());
            }
        }
        let drained: Vec<Pending> = {
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            p.drain().map(|(_, v)| v).collect()
        };
        for p in drained {
            let _ = p.done.send(Err(NbdError::Closed(reason.to_owned())));
        }
    }

    /// The error for a request on a connection that is gone, saying why when it is known.
    pub fn closed_error(&self) -> NbdError {
        let why = self.dead.lock().unwrap_or_else(|e| e.into_inner()).clone();
        NbdError::Closed(why.unwrap_or_else(|| "connection closed".into()))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::sync::Semaphore;

    use super::*;

    fn read(offset: u64, length: u32) -> (Pending, oneshot::Receiver<Result<Reply, NbdError>>) {
        let (done, rx) = oneshot::channel();
        let permit = Arc::new(Semaphore::new(1))
            .try_acquire_owned()
            .expect("a free slot");
        let q = Queued {
            command: Command::Read { offset, length },
            done,
            permit,
        };
        (Pending::new(q, offset, length), rx)
    }

    #[test]
    fn a_read_is_answered_only_when_its_chunks_cover_it_exactly() {
        let (mut p, mut rx) = read(100, 10);
        p.chunk_buffer("data", 100, 4).expect("inside").fill(1);
        p.chunk_buffer("hole", 104, 6).expect("inside").fill(0);
        p.finish();
        match rx.try_recv() {
            Ok(Ok(Reply::Data(d))) => assert_eq!(&d[..], &[1, 1, 1, 1, 0, 0, 0, 0, 0, 0]),
            other => panic!("expected the data, got {other:?}"),
        }

        let (mut p, mut rx) = read(100, 10);
        p.chunk_buffer("data", 100, 4).expect("inside").fill(1);
        p.finish();
        match rx.try_recv() {
            Ok(Err(NbdError::Protocol(m))) => assert!(m.contains("cover"), "{m}"),
            other => panic!("a gap must fail the read, got {other:?}"),
        }

        let (mut p, mut rx) = read(0, 8);
        p.chunk_buffer("data", 0, 6).expect("inside");
        p.chunk_buffer("hole", 4, 4).expect("inside");
        p.finish();
        assert!(
            matches!(rx.try_recv(), Ok(Err(NbdError::Protocol(_)))),
            "overlapping chunks fail the read"
        );
        let (mut p, _rx) = read(0, 8);
        assert!(p.chunk_buffer("data", 4, 8).is_err(), "past the request");
    }
}
