//! Fixed-newstyle negotiation: the greeting, STARTTLS first when TLS is wanted (the stream is
//! then wrapped by the caller), structured replies, `base:allocation`, then NBD_OPT_GO with a
//! block-size request (falling back to NBD_OPT_EXPORT_NAME for servers without GO).

use bytes::Buf;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::NbdError;
use super::proto::{self, BlockSize, ExportInfo, Info};

/// What negotiation established for one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub export: ExportInfo,
    pub block_size: BlockSize,
    pub structured_replies: bool,
    /// Context id of `base:allocation`, when the server agreed to it.
    pub allocation_context: Option<u32>,
}

struct Neg<'a, S> {
    stream: &'a mut S,
    addr: &'a str,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Neg<'_, S> {
    fn fail(&self, reason: impl Into<String>) -> NbdError {
        NbdError::Negotiation {
            addr: self.addr.to_owned(),
            reason: reason.into(),
        }
    }

    async fn send_option(&mut self, option: u32, data: &[u8]) -> Result<(), NbdError> {
        self.stream
            .write_all(&proto::option_request(option, data))
            .await?;
        self.stream.flush().await?;
        Ok(())
    }

    /// Reads one option reply; payloads are bounded so a hostile server cannot make us allocate
    /// without limit.
    async fn reply(&mut self, option: u32) -> Result<(u32, Vec<u8>), NbdError> {
        let mut h = [0u8; 20];
        self.stream.read_exact(&mut h).await?;
        let h = proto::parse_option_reply_header(&h).map_err(|e| self.fail(e))?;
        if h.reply_type == proto::REP_ERR_TLS_REQD {
            return Err(self.fail(
                "the server requires TLS: connect with an nbds:// URL and the job's client certificate",
            ));
        }
        if h.option != option {
            return Err(self.fail(format!(
                "reply for option {} while waiting for {option}",
                h.option
            )));
        }
        if h.length > 64 * 1024 {
            return Err(self.fail(format!("option reply of {} bytes is too large", h.length)));
        }
        let mut data = vec![0u8; h.length as usize];
        self.stream.read_exact(&mut data).await?;
        Ok((h.reply_type, data))
    }

    fn option_error(&self, what: &str, reply_type: u32, data: &[u8]) -> NbdError {
        let msg = String::from_utf8_lossy(data);
        let detail = if msg.is_empty() {
            String::new()
        } else {
            format!(": {msg}")
        };
        self.fail(format!(
            "{what}: {}{detail}",
            proto::option_error_name(reply_type)
        ))
    }
}

/// Reads the server's greeting on a freshly connected stream and answers it; whether the
/// server leaves out the 124 zero bytes of an old-style export reply (NO_ZEROES).
pub async fn greet<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    addr: &str,
) -> Result<bool, NbdError> {
    let n = Neg { stream, addr };
    let mut greeting = [0u8; 18];
    n.stream.read_exact(&mut greeting).await?;
    let mut g = &greeting[..];
    let (magic, opt_magic) = (g.get_u64(), g.get_u64());
    if magic != proto::NBDMAGIC {
        return Err(n.fail("not an NBD server (bad greeting)"));
    }
    if opt_magic != proto::IHAVEOPT {
        return Err(n.fail("server speaks oldstyle NBD; newstyle is required"));
    }
    let server_flags = g.get_u16();
    if server_flags & proto::FLAG_FIXED_NEWSTYLE == 0 {
        return Err(n.fail("server does not support fixed newstyle negotiation"));
    }
    let no_zeroes = server_flags & proto::FLAG_NO_ZEROES != 0;
    let client_flags =
        u32::from(proto::FLAG_FIXED_NEWSTYLE | if no_zeroes { proto::FLAG_NO_ZEROES } else { 0 });
    n.stream.write_all(&client_flags.to_be_bytes()).await?;
    Ok(no_zeroes)
}

/// Asks for TLS (NBD_OPT_STARTTLS, the first option); on success the caller runs the TLS
/// handshake on the same stream and negotiates the rest over it.
pub async fn start_tls<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    addr: &str,
) -> Result<(), NbdError> {
    let mut n = Neg { stream, addr };
    n.send_option(proto::OPT_STARTTLS, &[]).await?;
    match n.reply(proto::OPT_STARTTLS).await? {
        (proto::REP_ACK, _) => Ok(()),
        (t, data) if t & proto::REP_FLAG_ERROR != 0 => {
            Err(n.option_error("the server does not offer TLS (STARTTLS)", t, &data))
        }
        (t, _) => Err(n.fail(format!("unexpected reply {t} to STARTTLS"))),
    }
}

/// Negotiates `export` on a freshly connected stream, without TLS.
pub async fn negotiate<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    addr: &str,
    export: &str,
    want_block_status: bool,
) -> Result<Negotiated, NbdError> {
    let no_zeroes = greet(stream, addr).await?;
    negotiate_export(stream, addr, export, want_block_status, no_zeroes).await
}

/// Negotiates `export` after the greeting (and after STARTTLS, over TLS).
pub async fn negotiate_export<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    addr: &str,
    export: &str,
    want_block_status: bool,
    no_zeroes: bool,
) -> Result<Negotiated, NbdError> {
    let mut n = Neg { stream, addr };
    n.send_option(proto::OPT_STRUCTURED_REPLY, &[]).await?;
    let (t, _) = n.reply(proto::OPT_STRUCTURED_REPLY).await?;
    let structured_replies = t == proto::REP_ACK;

    let mut allocation_context = None;
    if structured_replies && want_block_status {
        n.send_option(
            proto::OPT_SET_META_CONTEXT,
            &proto::meta_context_payload(export, &["base:allocation"]),
        )
        .await?;
        loop {
            let (t, data) = n.reply(proto::OPT_SET_META_CONTEXT).await?;
            match t {
                proto::REP_META_CONTEXT => {
                    let (id, name) = proto::parse_meta_context(&data).map_err(|e| n.fail(e))?;
                    if name == "base:allocation" {
                        allocation_context = Some(id);
                    }
                }
                proto::REP_ACK => break,
                // A server without meta contexts simply gives us none.
                t if t & proto::REP_FLAG_ERROR != 0 => break,
                t => return Err(n.fail(format!("unexpected reply {t} to SET_META_CONTEXT"))),
            }
        }
    }

    n.send_option(
        proto::OPT_GO,
        &proto::go_payload(export, &[proto::INFO_BLOCK_SIZE]),
    )
    .await?;
    let mut info = None;
    let mut block_size = BlockSize::default();
    loop {
        let (t, data) = n.reply(proto::OPT_GO).await?;
        match t {
            proto::REP_INFO => match proto::parse_info(&data).map_err(|e| n.fail(e))? {
                Info::Export(e) => info = Some(e),
                Info::BlockSize(b) => block_size = b,
                Info::Other(_) => {}
            },
            proto::REP_ACK => break,
            t if t == proto::REP_FLAG_ERROR | 1 => {
                // NBD_REP_ERR_UNSUP: an old server without OPT_GO.
                return export_name_fallback(n, export, no_zeroes, structured_replies).await;
            }
            t if t & proto::REP_FLAG_ERROR != 0 => {
                return Err(n.option_error(&format!("export {export:?}"), t, &data));
            }
            t => return Err(n.fail(format!("unexpected reply {t} to GO"))),
        }
    }
    let export = info.ok_or_else(|| n.fail("server acknowledged GO without export information"))?;
    Ok(Negotiated {
        export,
        block_size,
        structured_replies,
        allocation_context,
    })
}

async fn export_name_fallback<S: AsyncRead + AsyncWrite + Unpin>(
    mut n: Neg<'_, S>,
    export: &str,
    no_zeroes: bool,
    structured_replies: bool,
) -> Result<Negotiated, NbdError> {
    n.send_option(proto::OPT_EXPORT_NAME, export.as_bytes())
        .await?;
    let mut b = [0u8; 10];
    n.stream.read_exact(&mut b).await?;
    if !no_zeroes {
        let mut zeroes = [0u8; 124];
        n.stream.read_exact(&mut zeroes).await?;
    }
    let mut b = &b[..];
    let (size, flags) = (b.get_u64(), b.get_u16());
    Ok(Negotiated {
        export: ExportInfo { size, flags },
        block_size: BlockSize::default(),
        structured_replies,
        allocation_context: None,
    })
}
