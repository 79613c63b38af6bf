//! The low-level codec: LEB128 varints, length-prefixed strings and byte strings, with a reader
//! that never reads past its input and never allocates more than the bytes that remain.

use super::DecodeError;

/// Appends fields to a frame being encoded.
pub(crate) struct Writer(pub(crate) Vec<u8>);

impl Writer {
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        Self(Vec::with_capacity(capacity))
    }

    pub(crate) fn u8(&mut self, value: u8) {
        self.0.push(value);
    }

    pub(crate) fn var(&mut self, mut value: u64) {
        while value >= 0x80 {
            self.0.push((value as u8) | 0x80);
            value >>= 7;
        }
        self.0.push(value as u8);
    }

    pub(crate) fn bytes(&mut self, bytes: &[u8]) {
        self.var(bytes.len() as u64);
        self.0.extend_from_slice(bytes);
    }

    pub(crate) fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }

    pub(crate) fn flag(&mut self, value: bool) {
        self.0.push(u8::from(value));
    }

    pub(crate) fn raw(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
    }
}

/// The encoded length of `value` as a varint.
pub(crate) fn var_len(value: u64) -> usize {
    let bits = 64 - value.leading_zeros() as usize;
    bits.div_ceil(7).max(1)
}

/// Reads fields of a frame being decoded. Every read names its field, so that an error says
/// which one was wrong.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, pos: 0 }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    pub(crate) fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        if n > self.remaining() {
            return Err(DecodeError::Truncated(field));
        }
        let slice = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(slice)
    }

    pub(crate) fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(1, field)?[0])
    }

    pub(crate) fn array<const N: usize>(
        &mut self,
        field: &'static str,
    ) -> Result<[u8; N], DecodeError> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N, field)?);
        Ok(out)
    }

    pub(crate) fn flag(&mut self, field: &'static str) -> Result<bool, DecodeError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            value => Err(DecodeError::InvalidFlag { field, value }),
        }
    }

    pub(crate) fn var(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        let mut value = 0u64;
        for i in 0..10 {
            let byte = self.u8(field)?;
            let low = u64::from(byte & 0x7f);
            // The tenth byte may only carry the 64th bit.
            if i == 9 && low > 1 {
                return Err(DecodeError::VarintOverflow(field));
            }
            value |= low << (7 * i);
            if byte & 0x80 == 0 {
                // Every integer of the protocol is a JS number on the other side, and a store
                // column: above 2^53 - 1 neither holds it exactly.
                if value > crate::pattern::MAX_SAFE_INTEGER {
                    return Err(DecodeError::Unsafe { field, value });
                }
                return Ok(value);
            }
        }
        Err(DecodeError::VarintOverflow(field))
    }

    pub(crate) fn bytes(&mut self, field: &'static str) -> Result<&'a [u8], DecodeError> {
        let len = self.var(field)?;
        if len > self.remaining() as u64 {
            return Err(DecodeError::Truncated(field));
        }
        self.take(len as usize, field)
    }

    pub(crate) fn str(&mut self, field: &'static str, max: usize) -> Result<String, DecodeError> {
        let bytes = self.bytes(field)?;
        if bytes.len() > max {
            return Err(DecodeError::TooLarge {
                field,
                len: bytes.len(),
                max,
            });
        }
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| DecodeError::InvalidUtf8(field))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn var_len_matches_the_encoding() {
        for value in [0, 1, 127, 128, 16_383, 16_384, u64::MAX >> 1, u64::MAX] {
            let mut w = Writer::with_capacity(10);
            w.var(value);
            assert_eq!(w.0.len(), var_len(value), "{value}");
            let read = Reader::new(&w.0).var("v");
            if value <= crate::pattern::MAX_SAFE_INTEGER {
                assert_eq!(read, Ok(value));
            } else {
                assert_eq!(read, Err(DecodeError::Unsafe { field: "v", value }));
            }
        }
    }
}
