//! NBD wire format (fixed newstyle negotiation, simple and structured replies), as pure
//! encode/decode functions. The protocol reference is the NBD project's doc/proto.md.

use bytes::{Buf, BufMut, Bytes, BytesMut};

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
pub const FLAG_NO_ZEROES: u16 = 2;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_FLAG_ERROR: u32 = 1 << 31;
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;

// NBD_INFO types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const TF_HAS_FLAGS: u16 = 1 << 0;
pub const TF_READ_ONLY: u16 = 1 << 1;
pub const TF_SEND_FLUSH: u16 = 1 << 2;
pub const TF_SEND_FUA: u16 = 1 << 3;
pub const TF_SEND_TRIM: u16 = 1 << 5;
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;

// Commands and command flags.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// Structured reply chunk types.
pub const REPLY_FLAG_DONE: u16 = 1;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;
pub const REPLY_TYPE_ERROR: u16 = REPLY_TYPE_ERROR_BIT | 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_ERROR_BIT | 2;

// base:allocation flags.
pub const STATE_HOLE: u32 = 1;
pub const STATE_ZERO: u32 = 2;

/// Size of a simple reply header, a structured reply chunk header, a request header.
pub const SIMPLE_REPLY_LEN: usize = 16;
pub const STRUCTURED_HEADER_LEN: usize = 20;
pub const REQUEST_LEN: usize = 28;

/// One option request: magic, option, length, data.
pub fn option_request(option: u32, data: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(16 + data.len());
    b.put_u64(IHAVEOPT);
    b.put_u32(option);
    b.put_u32(data.len() as u32);
    b.put_slice(data);
    b.freeze()
}

/// Payload of NBD_OPT_GO: the export name and the info items we ask for.
pub fn go_payload(export: &str, infos: &[u16]) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u32(export.len() as u32);
    b.put_slice(export.as_bytes());
    b.put_u16(infos.len() as u16);
    for i in infos {
        b.put_u16(*i);
    }
    b.freeze()
}

/// Payload of NBD_OPT_SET_META_CONTEXT for one export and its queries.
pub fn meta_context_payload(export: &str, queries: &[&str]) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u32(export.len() as u32);
    b.put_slice(export.as_bytes());
    b.put_u32(queries.len() as u32);
    for q in queries {
        b.put_u32(q.len() as u32);
        b.put_slice(q.as_bytes());
    }
    b.freeze()
}

/// Header of a server's reply to an option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply_type: u32,
    pub length: u32,
}

pub fn parse_option_reply_header(b: &[u8; 20]) -> Result<OptionReplyHeader, String> {
    let mut buf = &b[..];
    let magic = buf.get_u64();
    if magic != OPTION_REPLY_MAGIC {
        return Err(format!("bad option reply magic {magic:#x}"));
    }
    Ok(OptionReplyHeader {
        option: buf.get_u32(),
        reply_type: buf.get_u32(),
        length: buf.get_u32(),
    })
}

/// Name of an option-reply error, for messages a person can act on.
pub fn option_error_name(reply_type: u32) -> &'static str {
    match reply_type & !REP_FLAG_ERROR {
        1 => "unsupported option",
        2 => "denied by server policy",
        3 => "invalid request",
        4 => "not supported on this platform",
        5 => "TLS required",
        6 => "unknown export",
        7 => "server shutting down",
        8 => "block size required",
        9 => "request too big",
        _ => "unknown error",
    }
}

/// Export facts learnt during negotiation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExportInfo {
    pub size: u64,
    pub flags: u16,
}

/// Block-size constraints advertised by the server (NBD_INFO_BLOCK_SIZE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    pub minimum: u32,
    pub preferred: u32,
    pub maximum: u32,
}

impl Default for BlockSize {
    /// The protocol's defaults when the server says nothing: 1 byte, 4 KiB, 32 MiB.
    fn default() -> Self {
        Self {
            minimum: 1,
            preferred: 4096,
            maximum: 32 << 20,
        }
    }
}

/// An NBD_REP_INFO payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Info {
    Export(ExportInfo),
    BlockSize(BlockSize),
    Other(u16),
}

pub fn parse_info(mut b: &[u8]) -> Result<Info, String> {
    if b.len() < 2 {
        return Err("short NBD_REP_INFO".into());
    }
    let kind = b.get_u16();
    match kind {
        INFO_EXPORT if b.len() >= 10 => Ok(Info::Export(ExportInfo {
            size: b.get_u64(),
            flags: b.get_u16(),
        })),
        INFO_BLOCK_SIZE if b.len() >= 12 => {
            let bs = BlockSize {
                minimum: b.get_u32(),
                preferred: b.get_u32(),
                maximum: b.get_u32(),
            };
            if bs.minimum == 0
                || !bs.minimum.is_power_of_two()
                || bs.preferred < bs.minimum
                || bs.maximum < bs.minimum
            {
                return Err(format!("invalid block size constraints {bs:?}"));
            }
            Ok(Info::BlockSize(bs))
        }
        INFO_EXPORT | INFO_BLOCK_SIZE => Err(format!("short NBD_INFO {kind}")),
        other => Ok(Info::Other(other)),
    }
}

/// An NBD_REP_META_CONTEXT payload: context id and name.
pub fn parse_meta_context(mut b: &[u8]) -> Result<(u32, String), String> {
    if b.len() < 4 {
        return Err("short NBD_REP_META_CONTEXT".into());
    }
    let id = b.get_u32();
    Ok((id, String::from_utf8_lossy(b).into_owned()))
}

/// A transmission-phase request header (WRITE's data follows it on the wire).
pub fn encode_request(
    out: &mut BytesMut,
    flags: u16,
    command: u16,
    handle: u64,
    offset: u64,
    length: u32,
) {
    out.put_u32(REQUEST_MAGIC);
    out.put_u16(flags);
    out.put_u16(command);
    out.put_u64(handle);
    out.put_u64(offset);
    out.put_u32(length);
}

/// The first 4 bytes of every reply tell simple from structured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// error, handle (for READ, `length` bytes of data follow when error is 0).
    Simple { error: u32, handle: u64 },
    /// One chunk of a structured reply; `length` bytes of payload follow.
    Chunk {
        flags: u16,
        kind: u16,
        handle: u64,
        length: u32,
    },
}

/// Bytes to read after the 4-byte magic to complete a reply header.
pub fn header_rest_len(magic: u32) -> Result<usize, String> {
    match magic {
        SIMPLE_REPLY_MAGIC => Ok(SIMPLE_REPLY_LEN - 4),
        STRUCTURED_REPLY_MAGIC => Ok(STRUCTURED_HEADER_LEN - 4),
        other => Err(format!("bad reply magic {other:#x}")),
    }
}

pub fn parse_reply_header(magic: u32, mut rest: &[u8]) -> Result<ReplyHeader, String> {
    match magic {
        SIMPLE_REPLY_MAGIC if rest.len() >= 12 => Ok(ReplyHeader::Simple {
            error: rest.get_u32(),
            handle: rest.get_u64(),
        }),
        STRUCTURED_REPLY_MAGIC if rest.len() >= 16 => Ok(ReplyHeader::Chunk {
            flags: rest.get_u16(),
            kind: rest.get_u16(),
            handle: rest.get_u64(),
            length: rest.get_u32(),
        }),
        _ => Err(format!(
            "bad reply header (magic {magic:#x}, {} bytes)",
            rest.len()
        )),
    }
}

/// A structured error chunk: errno and message.
pub fn parse_error_chunk(mut p: &[u8]) -> Result<(u32, String), String> {
    if p.len() < 6 {
        return Err("short error chunk".into());
    }
    let errno = p.get_u32();
    let len = p.get_u16() as usize;
    let msg = p
        .get(..len)
        .map(|m| String::from_utf8_lossy(m).into_owned())
        .unwrap_or_default();
    Ok((errno, msg))
}

/// One extent of a block-status reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u32,
    pub flags: u32,
}

/// A BLOCK_STATUS chunk: context id and its extents.
pub fn parse_block_status(mut p: &[u8]) -> Result<(u32, Vec<Extent>), String> {
    if p.len() < 4 || !(p.len() - 4).is_multiple_of(8) {
        return Err(format!("malformed block status chunk of {} bytes", p.len()));
    }
    let id = p.get_u32();
    let mut extents = Vec::with_capacity(p.len() / 8);
    while p.has_remaining() {
        extents.push(Extent {
            length: p.get_u32(),
            flags: p.get_u32(),
        });
    }
    Ok((id, extents))
}

/// errno values servers send, named.
pub fn errno_name(e: u32) -> &'static str {
    match e {
        1 => "EPERM (operation not permitted)",
        5 => "EIO (input/output error)",
        12 => "ENOMEM (out of memory)",
        22 => "EINVAL (invalid argument)",
        28 => "ENOSPC (no space left on device)",
        75 => "EOVERFLOW (value too large)",
        95 => "ENOTSUP (operation not supported)",
        108 => "ESHUTDOWN (server shutting down)",
        _ => "unknown error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_header_is_28_bytes_big_endian() {
        let mut b = BytesMut::new();
        encode_request(
            &mut b,
            CMD_FLAG_FUA,
            CMD_WRITE,
            0x0102030405060708,
            0x1000,
            512,
        );
        assert_eq!(b.len(), REQUEST_LEN);
        assert_eq!(&b[..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&b[4..8], &[0, 1, 0, 1]);
        assert_eq!(&b[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&b[16..24], &[0, 0, 0, 0, 0, 0, 0x10, 0]);
        assert_eq!(&b[24..28], &[0, 0, 2, 0]);
    }

    #[test]
    fn option_request_and_go_payload() {
        let go = go_payload("disk", &[INFO_BLOCK_SIZE]);
        assert_eq!(&go[..], &[0, 0, 0, 4, b'd', b'i', b's', b'k', 0, 1, 0, 3]);
        let req = option_request(OPT_GO, &go);
        assert_eq!(&req[..8], &IHAVEOPT.to_be_bytes());
        assert_eq!(&req[8..12], &OPT_GO.to_be_bytes());
        assert_eq!(&req[12..16], &(go.len() as u32).to_be_bytes());
    }

    #[test]
    fn meta_context_payload_lists_queries() {
        let p = meta_context_payload("", &["base:allocation"]);
        assert_eq!(&p[..8], &[0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(&p[8..12], &15u32.to_be_bytes());
        assert_eq!(&p[12..], b"base:allocation");
    }

    #[test]
    fn parses_option_reply_header_and_rejects_bad_magic() {
        let mut b = [0u8; 20];
        b[..8].copy_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        b[8..12].copy_from_slice(&OPT_GO.to_be_bytes());
        b[12..16].copy_from_slice(&REP_INFO.to_be_bytes());
        b[16..20].copy_from_slice(&12u32.to_be_bytes());
        let h = parse_option_reply_header(&b).expect("valid");
        assert_eq!(
            h,
            OptionReplyHeader {
                option: OPT_GO,
                reply_type: REP_INFO,
                length: 12
            }
        );
        b[1] = 0;
        assert!(parse_option_reply_header(&b).is_err());
    }

    #[test]
    fn parses_infos_and_validates_block_sizes() {
        let mut e = BytesMut::new();
        e.put_u16(INFO_EXPORT);
        e.put_u64(1 << 30);
        e.put_u16(TF_HAS_FLAGS | TF_CAN_MULTI_CONN);
        assert_eq!(
            parse_info(&e),
            Ok(Info::Export(ExportInfo {
                size: 1 << 30,
                flags: TF_HAS_FLAGS | TF_CAN_MULTI_CONN
            }))
        );
        let mut bs = BytesMut::new();
        bs.put_u16(INFO_BLOCK_SIZE);
        bs.put_u32(512);
        bs.put_u32(4096);
        bs.put_u32(32 << 20);
        assert_eq!(
            parse_info(&bs),
            Ok(Info::BlockSize(BlockSize {
                minimum: 512,
                preferred: 4096,
                maximum: 32 << 20
            }))
        );
        let mut bad = BytesMut::new();
        bad.put_u16(INFO_BLOCK_SIZE);
        bad.put_u32(3);
        bad.put_u32(4096);
        bad.put_u32(4096);
        assert!(parse_info(&bad).is_err(), "minimum must be a power of two");
        assert!(parse_info(&[0, 0, 1]).is_err(), "short export info");
    }

    #[test]
    fn parses_reply_headers() {
        let rest = [0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 9];
        assert_eq!(
            parse_reply_header(SIMPLE_REPLY_MAGIC, &rest),
            Ok(ReplyHeader::Simple {
                error: 5,
                handle: 9
            })
        );
        let mut c = BytesMut::new();
        c.put_u16(REPLY_FLAG_DONE);
        c.put_u16(REPLY_TYPE_OFFSET_HOLE);
        c.put_u64(7);
        c.put_u32(12);
        assert_eq!(
            parse_reply_header(STRUCTURED_REPLY_MAGIC, &c),
            Ok(ReplyHeader::Chunk {
                flags: REPLY_FLAG_DONE,
                kind: REPLY_TYPE_OFFSET_HOLE,
                handle: 7,
                length: 12
            })
        );
        assert!(header_rest_len(0xdeadbeef).is_err());
    }

    #[test]
    fn parses_block_status_and_error_chunks() {
        let mut p = BytesMut::new();
        p.put_u32(1);
        p.put_u32(65536);
        p.put_u32(0);
        p.put_u32(4096);
        p.put_u32(STATE_HOLE | STATE_ZERO);
        let (id, ext) = parse_block_status(&p).expect("valid");
        assert_eq!(id, 1);
        assert_eq!(
            ext,
            vec![
                Extent {
                    length: 65536,
                    flags: 0
                },
                Extent {
                    length: 4096,
                    flags: 3
                }
            ]
        );
        assert!(parse_block_status(&p[..7]).is_err());
        let mut e = BytesMut::new();
        e.put_u32(5);
        e.put_u16(4);
        e.put_slice(b"oops");
        assert_eq!(parse_error_chunk(&e), Ok((5, "oops".into())));
    }
}
