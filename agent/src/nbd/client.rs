//! The client callers use: one export over one or more connections (more only when the server
//! advertises multi-conn), with range and capability checks before anything is sent.

use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;

use super::conn::Conn;
use super::inflight::{Command, Reply};
use super::proto::{self, BlockSize, Extent};
use super::{ConnectOptions, NbdError, NbdUrl};

const EXTRA_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// A connected NBD export.
pub struct NbdClient {
    conns: Vec<Conn>,
    next: AtomicUsize,
    size: u64,
    flags: u16,
    block_size: BlockSize,
    structured: bool,
    block_status: bool,
    url: NbdUrl,
}

impl NbdClient {
    /// Connects to `url`; opens `opts.connections` connections if the server allows multi-conn.
    pub async fn connect(url: &NbdUrl, opts: &ConnectOptions) -> Result<Self, NbdError> {
        let first = Conn::open(url, opts).await?;
        let n = first.negotiated.clone();
        let mut conns = vec![first];
        if n.export.flags & proto::TF_CAN_MULTI_CONN != 0 {
            // A server may cap its clients (qemu-nbd --shared=N) and leave the next one waiting
            // in negotiation: extra connections get a short deadline, and we carry on with
            // those we have.
            let extra = ConnectOptions {
                connect_timeout: opts.connect_timeout.min(EXTRA_CONNECT_TIMEOUT),
                ..opts.clone()
            };
            // Opened at once, not one after another: over a WAN each negotiation costs
            // several round trips.
            let extras = (1..opts.connections.max(1)).map(|_| Conn::open(url, &extra));
            let mut refused = None;
            for c in futures::future::join_all(extras).await {
                match c {
                    Ok(c) if c.negotiated.export != n.export => {
                        return Err(NbdError::Protocol(format!(
                            "connections to {} disagree about the export ({:?} vs {:?})",
                            url.address, c.negotiated.export, n.export
                        )));
                    }
                    Ok(c) => conns.push(c),
                    Err(e) => refused = Some(e),
                }
            }
            if let Some(e) = refused {
                tracing::warn!(export = %url.address, "using {} of {} connections: {e}", conns.len(), opts.connections);
            }
        }
        Ok(Self {
            conns,
            next: AtomicUsize::new(0),
            size: n.export.size,
            flags: n.export.flags,
            block_size: n.block_size,
            structured: n.structured_replies,
            block_status: n.allocation_context.is_some(),
            url: url.clone(),
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }
    pub fn block_size(&self) -> BlockSize {
        self.block_size
    }
    pub fn connections(&self) -> usize {
        self.conns.len()
    }
    pub fn read_only(&self) -> bool {
        self.flags & proto::TF_READ_ONLY != 0
    }
    pub fn can_multi_conn(&self) -> bool {
        self.flags & proto::TF_CAN_MULTI_CONN != 0
    }
    pub fn can_write_zeroes(&self) -> bool {
        self.flags & proto::TF_SEND_WRITE_ZEROES != 0
    }
    pub fn can_fast_zero(&self) -> bool {
        self.flags & proto::TF_SEND_FAST_ZERO != 0
    }
    pub fn can_trim(&self) -> bool {
        self.flags & proto::TF_SEND_TRIM != 0
    }
    pub fn can_flush(&self) -> bool {
        self.flags & proto::TF_SEND_FLUSH != 0
    }
    pub fn can_block_status(&self) -> bool {
        self.block_status
    }
    pub fn structured_replies(&self) -> bool {
        self.structured
    }
    pub fn url(&self) -> &NbdUrl {
        &self.url
    }

    /// The connection with the fewest requests in flight (the most free slots), looking from
    /// the next one in turn so that ties rotate. A TCP stream slowed by a loss keeps its
    /// requests; new ones go to the others instead of queueing behind it a quarter of the time.
    fn conn(&self) -> &Conn {
        let n = self.conns.len();
        let first = self.next.fetch_add(1, Ordering::Relaxed) % n;
        (0..n)
            .map(|k| &self.conns[(first + k) % n])
            .min_by_key(|c| std::cmp::Reverse(c.free_slots()))
            .unwrap_or(&self.conns[first])
    }

    fn check_range(
        &self,
        what: &str,
        offset: u64,
        length: u64,
        max: Option<u32>,
    ) -> Result<u32, NbdError> {
        let end = offset
            .checked_add(length)
            .ok_or_else(|| NbdError::Range(format!("{what} at {offset}+{length} overflows")))?;
        if end > self.size {
            return Err(NbdError::Range(format!(
                "{what} {offset}+{length} is past the end of the {}-byte export",
                self.size
            )));
        }
        if let Some(max) = max
            && length > max as u64
        {
            return Err(NbdError::Range(format!(
                "{what} of {length} bytes exceeds the server's maximum of {max}"
            )));
        }
        let min = self.block_size.minimum as u64;
        if min > 1 && (!offset.is_multiple_of(min) || !length.is_multiple_of(min)) {
            return Err(NbdError::Range(format!(
                "{what} {offset}+{length} is not aligned to the server's {min}-byte blocks"
            )));
        }
        u32::try_from(length).map_err(|_| {
            NbdError::Range(format!(
                "{what} of {length} bytes is too long for one request"
            ))
        })
    }

    /// Reads `length` bytes (at most the server's maximum payload) at `offset`.
    pub async fn read(&self, offset: u64, length: u32) -> Result<Bytes, NbdError> {
        let length =
            self.check_range("read", offset, length as u64, Some(self.block_size.maximum))?;
        match self.conn().call(Command::Read { offset, length }).await? {
            Reply::Data(d) => Ok(d),
            other => Err(NbdError::Protocol(format!("READ answered with {other:?}"))),
        }
    }

    /// Writes `data` at `offset` (at most the server's maximum payload).
    pub async fn write(&self, offset: u64, data: Bytes) -> Result<(), NbdError> {
        if self.read_only() {
            return Err(NbdError::Unsupported("writes (read-only export)"));
        }
        self.check_range(
            "write",
            offset,
            data.len() as u64,
            Some(self.block_size.maximum),
        )?;
        self.conn()
            .call(Command::Write {
                offset,
                data,
                flags: 0,
            })
            .await
            .map(|_| ())
    }

    /// Writes zeros over `length` bytes. The range reads back as zeros (never as the backing
    /// file's data): NO_HOLE is not set, so the server may punch a hole or allocate zeros, but
    /// for a QCOW2 overlay either way records zero clusters. `fast` asks the server to fail
    /// rather than fall back to a slow write (only when it advertises FAST_ZERO).
    pub async fn write_zeroes(&self, offset: u64, length: u32, fast: bool) -> Result<(), NbdError> {
        if !self.can_write_zeroes() {
            return Err(NbdError::Unsupported("WRITE_ZEROES"));
        }
        let length = self.check_range("write_zeroes", offset, length as u64, None)?;
        let flags = if fast && self.can_fast_zero() {
            proto::CMD_FLAG_FAST_ZERO
        } else {
            0
        };
        self.conn()
            .call(Command::WriteZeroes {
                offset,
                length,
                flags,
            })
            .await
            .map(|_| ())
    }

    pub async fn trim(&self, offset: u64, length: u32) -> Result<(), NbdError> {
        if !self.can_trim() {
            return Err(NbdError::Unsupported("TRIM"));
        }
        let length = self.check_range("trim", offset, length as u64, None)?;
        self.conn()
            .call(Command::Trim { offset, length })
            .await
            .map(|_| ())
    }

    /// Makes every completed write durable. With multi-conn one flush covers all connections;
    /// callers must have awaited their writes first.
    pub async fn flush(&self) -> Result<(), NbdError> {
        if !self.can_flush() {
            return Ok(());
        }
        self.conns[0].call(Command::Flush).await.map(|_| ())
    }

    /// `base:allocation` extents from `offset` (the server may answer for less than `length`).
    pub async fn block_status(&self, offset: u64, length: u32) -> Result<Vec<Extent>, NbdError> {
        if !self.block_status {
            return Err(NbdError::Unsupported("block status (base:allocation)"));
        }
        let length = self.check_range("block_status", offset, length as u64, None)?;
        match self
            .conn()
            .call(Command::BlockStatus { offset, length })
            .await?
        {
            Reply::Extents(e) if e.iter().any(|x| x.length == 0) => {
                Err(NbdError::Protocol("block status extent of length 0".into()))
            }
            Reply::Extents(e) if e.is_empty() => Err(NbdError::Protocol(
                "block status reply without extents".into(),
            )),
            Reply::Extents(e) => Ok(e),
            other => Err(NbdError::Protocol(format!(
                "BLOCK_STATUS answered with {other:?}"
            ))),
        }
    }

    /// Disconnects every connection cleanly (NBD_CMD_DISC), with a bounded wait.
    pub async fn disconnect(self) {
        for c in self.conns {
            c.disconnect().await;
        }
    }
}
