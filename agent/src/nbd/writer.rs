//! The writer task of a connection: gives each queued request a handle, registers it in the
//! in-flight table and sends it; everything already queued goes out before one flush.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::BytesMut;
use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::mpsc;

use super::inflight::{InFlight, Pending, Queued};
use super::proto;

pub type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// Runs until the queue closes (then says goodbye with NBD_CMD_DISC) or sending fails (then
/// fails every request in flight).
pub async fn write_loop(
    mut out: BufWriter<Writer>,
    mut rx: mpsc::Receiver<Queued>,
    in_flight: Arc<InFlight>,
    handles: Arc<AtomicU64>,
) {
    let mut header = BytesMut::with_capacity(proto::REQUEST_LEN);
    let result: Result<(), std::io::Error> = async {
        while let Some(first) = rx.recv().await {
            let mut next = Some(first);
            // Send everything already queued before flushing: one syscall for many requests.
            while let Some(q) = next.take() {
                let handle = handles.fetch_add(1, Ordering::Relaxed);
                let (cmd, flags, offset, length, payload) = q.command.wire();
                // Registered before it is sent: the reply may come back at once.
                in_flight.insert(handle, Pending::new(q, offset, length));
                header.clear();
                proto::encode_request(&mut header, flags, cmd, handle, offset, length);
                out.write_all(&header).await?;
                if let Some(p) = payload {
                    out.write_all(&p).await?;
                }
                next = rx.try_recv().ok();
            }
            out.flush().await?;
        }
        // The client is gone: say goodbye so the server does not wait for us.
        header.clear();
        proto::encode_request(&mut header, 0, proto::CMD_DISC, 0, 0, 0);
        out.write_all(&header).await?;
        out.flush().await?;
        out.shutdown().await
    }
    .await;
    if let Err(e) = result {
        in_flight.fail_all(&format!("sending to the server failed: {e}"));
    }
}
