//! The reader task of a connection: reads replies (simple or structured, in any order), fills
//! the waiting request found by handle, and answers it once its last chunk arrived. Anything
//! the protocol does not allow ends the connection.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, BufReader};

use super::NbdError;
use super::inflight::{InFlight, Pending};
use super::proto::{self, ReplyHeader};

pub type Reader = Box<dyn AsyncRead + Send + Unpin>;

/// Largest non-data chunk payload accepted (block status, errors): bounds memory use.
const MAX_META_PAYLOAD: u32 = 16 << 20;

/// Runs until the server closes the connection or breaks the protocol, then fails every
/// request in flight with the reason.
pub async fn read_loop(
    mut input: BufReader<Reader>,
    in_flight: Arc<InFlight>,
    allocation_context: Option<u32>,
) {
    let reason = match read_replies(&mut input, &in_flight, allocation_context).await {
        Ok(()) => "the server closed the connection".to_owned(),
        Err(e) => e.to_string(),
    };
    in_flight.fail_all(&reason);
}

async fn read_replies(
    input: &mut BufReader<Reader>,
    in_flight: &InFlight,
    allocation_context: Option<u32>,
) -> Result<(), NbdError> {
    loop {
        let magic = match input.read_u32().await {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let rest_len = proto::header_rest_len(magic).map_err(NbdError::Protocol)?;
        let mut rest = [0u8; 16];
        input.read_exact(&mut rest[..rest_len]).await?;
        match proto::parse_reply_header(magic, &rest[..rest_len]).map_err(NbdError::Protocol)? {
            ReplyHeader::Simple { error, handle } => {
                let mut p = in_flight.take(handle)?;
                if error != 0 {
                    p.error = Some(server_error(p.name, error, String::new()));
                    p.data = None;
                } else if let Some(buf) = p.data.as_mut() {
                    input.read_exact(buf.as_mut()).await?;
                    p.covered.add(0, p.length as u64);
                }
                p.finish();
            }
            ReplyHeader::Chunk {
                flags,
                kind,
                handle,
                length,
            } => {
                // Work on the entry without holding the lock across awaits: take it out, put
                // it back.
                let mut p = in_flight.take(handle)?;
                read_chunk(input, &mut p, kind, length, allocation_context).await?;
                if flags & proto::REPLY_FLAG_DONE != 0 {
                    p.finish();
                } else {
                    in_flight.insert(handle, p);
                }
            }
        }
    }
}

/// Reads one structured reply chunk's payload into its request.
async fn read_chunk(
    input: &mut BufReader<Reader>,
    p: &mut Pending,
    kind: u16,
    length: u32,
    allocation_context: Option<u32>,
) -> Result<(), NbdError> {
    let violation = NbdError::Protocol;
    match kind {
        proto::REPLY_TYPE_NONE if length == 0 => {}
        proto::REPLY_TYPE_OFFSET_DATA => {
            if length < 8 {
                return Err(violation(format!("OFFSET_DATA chunk of {length} bytes")));
            }
            let offset = input.read_u64().await?;
            let buf = p.chunk_buffer("data", offset, (length - 8) as u64)?;
            input.read_exact(buf).await?;
        }
        proto::REPLY_TYPE_OFFSET_HOLE => {
            if length != 12 {
                return Err(violation(format!("OFFSET_HOLE chunk of {length} bytes")));
            }
            let offset = input.read_u64().await?;
            let size = input.read_u32().await? as u64;
            p.chunk_buffer("hole", offset, size)?.fill(0);
        }
        proto::REPLY_TYPE_BLOCK_STATUS => {
            let payload = read_payload(input, length).await?;
            let (id, extents) = proto::parse_block_status(&payload).map_err(violation)?;
            let list = p
                .extents
                .as_mut()
                .ok_or_else(|| violation(format!("block status in reply to {}", p.name)))?;
            if Some(id) == allocation_context {
                list.extend(extents);
            }
        }
        k if k & proto::REPLY_TYPE_ERROR_BIT != 0 => {
            let payload = read_payload(input, length).await?;
            let (errno, msg) = proto::parse_error_chunk(&payload).map_err(violation)?;
            let msg = if msg.is_empty() {
                String::new()
            } else {
                format!(": {msg}")
            };
            p.error.get_or_insert(server_error(p.name, errno, msg));
        }
        k => {
            return Err(violation(format!(
                "unknown reply chunk type {k} (length {length})"
            )));
        }
    }
    Ok(())
}

async fn read_payload(input: &mut BufReader<Reader>, length: u32) -> Result<Vec<u8>, NbdError> {
    if length > MAX_META_PAYLOAD {
        return Err(NbdError::Protocol(format!(
            "reply chunk of {length} bytes is too large"
        )));
    }
    let mut v = vec![0u8; length as usize];
    input.read_exact(&mut v).await?;
    Ok(v)
}

fn server_error(command: &'static str, errno: u32, message: String) -> NbdError {
    NbdError::Server {
        command,
        errno,
        name: proto::errno_name(errno),
        message,
    }
}
