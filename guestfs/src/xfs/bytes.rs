//! Big-endian field access and the error every malformed structure turns into.
//!
//! The fixed-layout readers (`be16`, `be32`, `be64`) give 0 past the end of the buffer instead of
//! panicking: callers check a structure's length once, up front, and a stray read of garbage
//! must never take the process down.

use crate::Error;

pub(super) fn corrupt(what: impl Into<String>) -> Error {
    Error::Corrupt {
        fs: "xfs",
        what: what.into(),
    }
}

pub(super) fn unsupported(what: impl Into<String>) -> Error {
    Error::Unsupported {
        fs: "xfs",
        what: what.into(),
    }
}

pub(super) fn be16(buf: &[u8], at: usize) -> u16 {
    field::<2>(buf, at).map_or(0, u16::from_be_bytes)
}

pub(super) fn be32(buf: &[u8], at: usize) -> u32 {
    field::<4>(buf, at).map_or(0, u32::from_be_bytes)
}

pub(super) fn be64(buf: &[u8], at: usize) -> u64 {
    field::<8>(buf, at).map_or(0, u64::from_be_bytes)
}

fn field<const N: usize>(buf: &[u8], at: usize) -> Option<[u8; N]> {
    buf.get(at..at.checked_add(N)?)?.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_past_the_end_read_as_zero() {
        let buf = [0x12, 0x34, 0x56];
        assert_eq!(be16(&buf, 0), 0x1234);
        assert_eq!(be16(&buf, 2), 0);
        assert_eq!(be32(&buf, 0), 0);
        assert_eq!(be64(&buf, usize::MAX), 0);
    }
}
