//! Avro binary encoding primitives: zig-zag varints, length-prefixed bytes, unions,
//! maps and arrays.
//!
//! Pure functions over byte slices. The reader never trusts a length prefix: a
//! length larger than the bytes that remain is reported as truncation before any
//! allocation, so a hostile prefix of 2^31 costs nothing.

use std::fmt;

/// What went wrong while reading an Avro body, without the field context (the
/// record decoder adds it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireError {
    /// The input ended before the value did.
    Truncated { offset: usize },
    /// The bytes are present but do not form a valid value.
    Invalid { offset: usize, reason: String },
}

impl WireError {
    pub(crate) fn invalid(offset: usize, reason: impl Into<String>) -> Self {
        WireError::Invalid {
            offset,
            reason: reason.into(),
        }
    }
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::Truncated { offset } => write!(f, "input ends at byte {offset}"),
            WireError::Invalid { offset, reason } => write!(f, "{reason} at byte {offset}"),
        }
    }
}

/// A cursor over one Avro body.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    /// Bytes consumed so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Bytes not yet consumed.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn truncated(&self) -> WireError {
        WireError::Truncated { offset: self.buf.len() }
    }

    /// A zig-zag variable-length `long` (also used for `int`, lengths and counts).
    #[inline]
    pub fn long(&mut self) -> Result<i64, WireError> {
        let start = self.pos;
        let mut value: u64 = 0;
        let mut shift = 0u32;
        loop {
            let Some(&byte) = self.buf.get(self.pos) else {
                return Err(self.truncated());
            };
            self.pos += 1;
            if shift == 63 && byte > 1 {
                return Err(WireError::invalid(start, "varint longer than 64 bits"));
            }
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                break;
            }
            shift += 7;
        }
        Ok(((value >> 1) as i64) ^ -((value & 1) as i64))
    }

    #[inline]
    pub fn int(&mut self) -> Result<i32, WireError> {
        let start = self.pos;
        let v = self.long()?;
        i32::try_from(v).map_err(|_| WireError::invalid(start, format!("{v} does not fit an int")))
    }

    #[inline]
    pub fn boolean(&mut self) -> Result<bool, WireError> {
        match self.buf.get(self.pos) {
            Some(0) => {
                self.pos += 1;
                Ok(false)
            }
            Some(1) => {
                self.pos += 1;
                Ok(true)
            }
            Some(b) => Err(WireError::invalid(self.pos, format!("boolean byte {b:#04x}"))),
            None => Err(self.truncated()),
        }
    }

    /// Skips `n` bytes of fixed size.
    pub fn skip(&mut self, n: usize) -> Result<(), WireError> {
        if n > self.remaining() {
            return Err(self.truncated());
        }
        self.pos += n;
        Ok(())
    }

    /// A length-prefixed byte string, borrowed from the input.
    #[inline]
    pub fn bytes(&mut self) -> Result<&'a [u8], WireError> {
        let start = self.pos;
        let len = self.long()?;
        if len < 0 {
            return Err(WireError::invalid(start, format!("negative length {len}")));
        }
        // Compare before converting: a length beyond the input is truncation,
        // whatever its size, and nothing is allocated for it.
        if len as u64 > self.remaining() as u64 {
            return Err(self.truncated());
        }
        let end = self.pos + len as usize;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    #[inline]
    pub fn str(&mut self) -> Result<&'a str, WireError> {
        let start = self.pos;
        let raw = self.bytes()?;
        std::str::from_utf8(raw).map_err(|_| WireError::invalid(start, "string is not UTF-8"))
    }

    /// The branch index of a union, checked against the number of branches.
    #[inline]
    pub fn union_index(&mut self, branches: usize) -> Result<usize, WireError> {
        let start = self.pos;
        let idx = self.long()?;
        if idx < 0 || idx as u64 >= branches as u64 {
            return Err(WireError::invalid(
                start,
                format!("union branch {idx} out of {branches}"),
            ));
        }
        Ok(idx as usize)
    }

    /// The item count of the next array or map block; 0 ends the sequence. A
    /// negative count is followed by the block's size in bytes, which is skipped.
    /// A count larger than the remaining bytes is truncation (every item takes at
    /// least one byte), so callers may reserve `count` items safely.
    pub fn block_count(&mut self) -> Result<usize, WireError> {
        let start = self.pos;
        let count = self.long()?;
        let count = if count < 0 {
            let _size = self.long()?;
            count
                .checked_neg()
                .ok_or_else(|| WireError::invalid(start, "block count overflows"))?
        } else {
            count
        };
        if count as u64 > self.remaining() as u64 {
            return Err(self.truncated());
        }
        Ok(count as usize)
    }
}

/// Appends a zig-zag variable-length `long`.
#[inline]
pub fn put_long(out: &mut Vec<u8>, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    while z >= 0x80 {
        out.push((z as u8) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

#[inline]
pub fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_long(out, b.len() as i64);
    out.extend_from_slice(b);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_long(v: i64, expected: &[u8]) {
        let mut out = Vec::new();
        put_long(&mut out, v);
        assert_eq!(out, expected, "encoding of {v}");
        assert_eq!(Reader::new(expected).long(), Ok(v));
    }

    #[test]
    fn longs_match_the_avro_spec_examples() {
        check_long(0, &[0x00]);
        check_long(-1, &[0x01]);
        check_long(1, &[0x02]);
        check_long(-2, &[0x03]);
        check_long(2, &[0x04]);
        check_long(-64, &[0x7f]);
        check_long(64, &[0x80, 0x01]);
        check_long(i64::MAX, &[0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]);
        check_long(i64::MIN, &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]);
    }

    #[test]
    fn overlong_varint_is_invalid_not_a_panic() {
        let bytes = [0xff; 11];
        assert!(matches!(Reader::new(&bytes).long(), Err(WireError::Invalid { .. })));
    }

    #[test]
    fn huge_length_prefix_is_truncation() {
        let mut buf = Vec::new();
        put_long(&mut buf, 1 << 31);
        buf.extend_from_slice(b"abc");
        assert_eq!(
            Reader::new(&buf).bytes(),
            Err(WireError::Truncated { offset: buf.len() })
        );
    }
}
