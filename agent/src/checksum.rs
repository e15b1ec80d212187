//! Checksums of whole disks read over NBD, for verifying restore points: a QCOW2 chain read
//! through qemu-nbd must hash like the source disk at the snapshot instant.

use futures::{StreamExt, TryStreamExt};
use sha2::{Digest, Sha256};

use crate::copy::{ChangedArea, chunks};
use crate::nbd::{NbdClient, NbdError, proto};

/// Request size for hashing a whole export.
pub const REQUEST_SIZE: u32 = 2 << 20;
/// Reads in flight while hashing a whole export.
pub const IN_FLIGHT: usize = 16;

/// SHA-256 (hex) of the export's full contents. Reads run concurrently but are hashed in order;
/// ranges the server reports as zero are hashed without being read.
pub async fn sha256(
    client: &NbdClient,
    request_size: u32,
    in_flight: usize,
) -> Result<String, NbdError> {
    sha256_of_first(client, client.size(), request_size, in_flight).await
}

/// SHA-256 (hex) of the export's first `length` bytes (a restored disk on a larger target).
pub async fn sha256_of_first(
    client: &NbdClient,
    length: u64,
    request_size: u32,
    in_flight: usize,
) -> Result<String, NbdError> {
    if length > client.size() {
        return Err(NbdError::Range(format!(
            "hashing {length} bytes of a {}-byte export",
            client.size()
        )));
    }
    let whole = [ChangedArea { start: 0, length }];
    let mut hasher = Sha256::new();
    let zero_block = vec![0u8; request_size as usize];
    let mut pieces = futures::stream::iter(chunks(&whole, request_size))
        .map(|c| read_or_zero(client, c))
        .buffered(in_flight.max(1));
    while let Some(piece) = pieces.try_next().await? {
        match piece {
            Piece::Data(d) => hasher.update(&d),
            Piece::Zero(n) => hasher.update(&zero_block[..n]),
        }
    }
    Ok(hex::encode(hasher.finalize()))
}

enum Piece {
    Data(bytes::Bytes),
    Zero(usize),
}

async fn read_or_zero(client: &NbdClient, c: ChangedArea) -> Result<Piece, NbdError> {
    if client.can_block_status() {
        let extents = client.block_status(c.start, c.length as u32).await?;
        if let Some(first) = extents.first()
            && first.flags & proto::STATE_ZERO != 0
            && first.length as u64 >= c.length
        {
            return Ok(Piece::Zero(c.length as usize));
        }
    }
    Ok(Piece::Data(client.read(c.start, c.length as u32).await?))
}
