//! One NBD connection: set up (connect and negotiate within a deadline), then a writer task
//! (`writer.rs`) sends queued requests and a reader task (`reader.rs`) matches replies to the
//! requests in flight (`inflight.rs`) by handle, in any order. The number of requests in flight
//! is bounded by a semaphore; a request that outlives its deadline kills the connection,
//! failing every request on it, because a server that stopped answering cannot be trusted with
//! the rest.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, BufReader, BufWriter};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;

use super::handshake::{Negotiated, greet, negotiate, negotiate_export, start_tls};
use super::inflight::{Command, InFlight, Queued, Reply};
use super::reader::{Reader, read_loop};
use super::writer::{Writer, write_loop};
use super::{Address, ConnectOptions, NbdError, NbdUrl};

/// One open connection.
pub struct Conn {
    queue: mpsc::Sender<Queued>,
    slots: Arc<Semaphore>,
    in_flight: Arc<InFlight>,
    tasks: Vec<JoinHandle<()>>,
    pub negotiated: Negotiated,
    request_timeout: Duration,
}

/// Asks the kernel to acknowledge at once before every read. Servers answer negotiation
/// options in several small writes; with Nagle on their side and delayed ACKs on ours, each
/// such reply stalls ~40 ms (measured: 88 ms per TCP connection setup to qemu-nbd). The
/// setting is not sticky in Linux, hence once per read; it costs one syscall per read.
struct QuickAck<R> {
    inner: R,
    fd: std::os::fd::RawFd,
}

impl<R: AsyncRead + Unpin> AsyncRead for QuickAck<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let one: libc::c_int = 1;
        // SAFETY: setsockopt on the socket this reader owns, with a valid int option value.
        unsafe {
            libc::setsockopt(
                self.fd,
                libc::IPPROTO_TCP,
                libc::TCP_QUICKACK,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for QuickAck<W> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Negotiates over TLS: the greeting and STARTTLS in the clear, the TLS handshake (the server
/// proves the name `server_name`, the client presents its certificate), then the export over
/// the encrypted stream, which is split into the connection's reader and writer.
async fn tls_session<S>(
    mut stream: S,
    addr: &str,
    server_name: &str,
    url: &NbdUrl,
    opts: &ConnectOptions,
) -> Result<(Reader, Writer, Negotiated), NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let fail = |reason: String| NbdError::Negotiation {
        addr: addr.to_owned(),
        reason,
    };
    let tls = opts.tls.as_ref().ok_or_else(|| {
        fail("an nbds:// URL needs client certificates (the agent's --tls-dir)".into())
    })?;
    let no_zeroes = greet(&mut stream, addr).await?;
    start_tls(&mut stream, addr).await?;
    let name = super::tls::server_name(server_name).map_err(fail)?;
    let mut stream = tokio_rustls::TlsConnector::from(tls.config.clone())
        .connect(name, stream)
        .await
        .map_err(|e| fail(format!("TLS handshake as {server_name:?}: {e}")))?;
    // With TLS 1.3 the server judges the client certificate after the client's handshake is
    // done: a refused certificate shows as the connection closing at the first read.
    let negotiated = match negotiate_export(
        &mut stream,
        addr,
        &url.export,
        opts.block_status,
        no_zeroes,
    )
    .await
    {
        Err(NbdError::Io(e)) => {
            return Err(fail(format!(
                "the server closed the TLS session ({e}): it did not accept this client \
                     certificate (tls-authz), or its CA is not the one that signed it"
            )));
        }
        r => r?,
    };
    let (r, w) = tokio::io::split(stream);
    Ok((Box::new(r), Box::new(w), negotiated))
}

impl Conn {
    /// Connects and negotiates, all within `opts.connect_timeout`.
    pub async fn open(url: &NbdUrl, opts: &ConnectOptions) -> Result<Conn, NbdError> {
        let addr = url.address.to_string();
        let attempt = async {
            let (mut reader, mut writer): (Reader, Writer) = match (&url.address, &url.tls) {
                (Address::Tcp { host, port }, tls) => {
                    let s = TcpStream::connect((host.as_str(), *port))
                        .await
                        .map_err(|source| NbdError::Connect {
                            addr: addr.clone(),
                            source,
                        })?;
                    s.set_nodelay(true)?;
                    let fd = std::os::fd::AsRawFd::as_raw_fd(&s);
                    if let Some(name) = tls {
                        let s = QuickAck { inner: s, fd };
                        return tls_session(s, &addr, name, url, opts).await;
                    }
                    let (r, w) = s.into_split();
                    (Box::new(QuickAck { inner: r, fd }), Box::new(w))
                }
                (Address::Unix(path), tls) => {
                    let s =
                        UnixStream::connect(path)
                            .await
                            .map_err(|source| NbdError::Connect {
                                addr: addr.clone(),
                                source,
                            })?;
                    if let Some(name) = tls {
                        return tls_session(s, &addr, name, url, opts).await;
                    }
                    let (r, w) = s.into_split();
                    (Box::new(r), Box::new(w))
                }
            };
            let mut joined = tokio::io::join(&mut reader, &mut writer);
            let negotiated = negotiate(&mut joined, &addr, &url.export, opts.block_status).await?;
            Ok::<_, NbdError>((reader, writer, negotiated))
        };
        let (reader, writer, negotiated) = tokio::time::timeout(opts.connect_timeout, attempt)
            .await
            .map_err(|_| NbdError::Timeout {
                what: format!("connecting to {addr}"),
                after: opts.connect_timeout,
            })??;

        let in_flight = Arc::new(InFlight::default());
        let (queue, rx) = mpsc::channel(opts.max_in_flight.max(1));
        let handles = Arc::new(AtomicU64::new(1));
        let writer_task = tokio::spawn(write_loop(
            BufWriter::with_capacity(256 * 1024, writer),
            rx,
            in_flight.clone(),
            handles,
        ));
        let reader_task = tokio::spawn(read_loop(
            BufReader::with_capacity(256 * 1024, reader),
            in_flight.clone(),
            negotiated.allocation_context,
        ));
        Ok(Conn {
            queue,
            slots: Arc::new(Semaphore::new(opts.max_in_flight.max(1))),
            in_flight,
            tasks: vec![writer_task, reader_task],
            negotiated,
            request_timeout: opts.request_timeout,
        })
    }

    /// Sends one request and waits for its reply, within the request deadline (which also
    /// covers waiting for a free in-flight slot).
    pub async fn call(&self, command: Command) -> Result<Reply, NbdError> {
        let name = command.name();
        let timeout = self.request_timeout;
        let attempt = async {
            let permit = self
                .slots
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| NbdError::Closed("connection shut down".into()))?;
            let (done, rx) = oneshot::channel();
            self.queue
                .send(Queued {
                    command,
                    done,
                    permit,
                })
                .await
                .map_err(|_| self.closed_error())?;
            rx.await.map_err(|_| self.closed_error())?
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(r) => r,
            Err(_) => {
                let reason = format!("{name} got no reply within {timeout:?}");
                self.kill(&reason);
                Err(NbdError::Timeout {
                    what: name.to_owned(),
                    after: timeout,
                })
            }
        }
    }

    /// Requests that could be sent now without waiting for a reply.
    pub fn free_slots(&self) -> usize {
        self.slots.available_permits()
    }

    fn closed_error(&self) -> NbdError {
        self.in_flight.closed_error()
    }

    /// Fails everything in flight and stops both tasks.
    pub fn kill(&self, reason: &str) {
        self.in_flight.fail_all(reason);
        for t in &self.tasks {
            t.abort();
        }
        self.slots.close();
    }

    /// Sends NBD_CMD_DISC after everything already queued, then closes (bounded wait).
    pub async fn disconnect(self) {
        drop(self.queue);
        let mut tasks = self.tasks.into_iter();
        if let Some(writer) = tasks.next() {
            let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
        }
        for t in tasks {
            t.abort();
        }
    }
}
