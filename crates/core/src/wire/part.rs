//! Messages larger than one frame: [`fragment`] splits an encoded frame into [`Frame::Part`]s,
//! and a [`Reassembler`] on the other side puts them back together before the whole is decoded.
//!
//! A part carries the whole message's length and the offset of its piece. The parts of one
//! message travel in order and back to back on one connection; other frames may come between
//! them (a presence update, say), but not the start of another message. The receiver holds at
//! most one message in progress per connection, grows it only as bytes arrive (a part that
//! claims a huge total allocates nothing by itself), and refuses a total over its message limit.
//! The relay puts a message together, validates it and stores it whole; when it sends it on, it
//! splits it again for each receiver's frame limit.

use super::codec::{var_len, Reader};
use super::{DecodeError, Frame, Kind, PROTOCOL_VERSION};

/// The bytes a part frame adds around its piece: the header and three varints.
pub fn overhead(total: u64, offset: u64, piece: usize) -> usize {
    3 + var_len(total) + var_len(offset) + var_len(piece as u64)
}

/// Splits the encoded frame `bytes` into part frames of at most `max_frame` bytes each; a frame
/// that already fits comes back as it is, alone.
///
/// `max_frame` must leave room for a part's header (at least 64 bytes).
pub fn fragment(bytes: &[u8], max_frame: usize) -> Vec<Vec<u8>> {
    if bytes.len() <= max_frame {
        return vec![bytes.to_vec()];
    }
    let total = bytes.len() as u64;
    // The largest header any part of this message can have.
    let piece = max_frame
        .saturating_sub(overhead(total, total, max_frame))
        .max(1);
    bytes
        .chunks(piece)
        .enumerate()
        .map(|(i, chunk)| {
            Frame::Part {
                total,
                offset: (i * piece) as u64,
                bytes: chunk.to_vec(),
            }
            .encode()
        })
        .collect()
}

/// How many frames [`fragment`] makes of a message of `len` bytes.
pub fn count(len: usize, max_frame: usize) -> usize {
    if len <= max_frame {
        return 1;
    }
    let total = len as u64;
    let piece = max_frame
        .saturating_sub(overhead(total, total, max_frame))
        .max(1);
    len.div_ceil(piece)
}

/// Where the piece of a part frame lies in its message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// The offset of the piece's first byte.
    pub offset: u64,
    /// The offset after the piece's last byte.
    pub end: u64,
    /// The whole message's length.
    pub total: u64,
}

impl Span {
    /// Whether the piece starts its message.
    pub fn starts(&self) -> bool {
        self.offset == 0
    }

    /// Whether the piece ends its message.
    pub fn ends(&self) -> bool {
        self.end >= self.total
    }
}

/// The span of `frame` if it is a part, read from its header alone (a sender's queue tells the
/// parts of one message from other frames without decoding them); `None` for any other frame,
/// or bytes that are not a frame.
pub fn span(frame: &[u8]) -> Option<Span> {
    let mut r = Reader::new(frame);
    if r.u8("version").ok()? != PROTOCOL_VERSION
        || Kind::from_byte(r.u8("kind").ok()?)? != Kind::Part
        || r.u8("flags").ok()? != 0
    {
        return None;
    }
    let total = r.var("total").ok()?;
    let offset = r.var("offset").ok()?;
    let len = r.var("bytes").ok()?;
    Some(Span {
        offset,
        end: offset.saturating_add(len),
        total,
    })
}

/// Puts the parts of one message back together.
#[derive(Debug, Default)]
pub struct Reassembler {
    state: State,
}

#[derive(Debug, Default)]
enum State {
    #[default]
    Idle,
    Assembling {
        total: usize,
        bytes: Vec<u8>,
    },
    /// The message was refused: its remaining parts are dropped without a word (one refusal
    /// per message, not one per part).
    Discarding {
        total: u64,
    },
}

impl Reassembler {
    /// A reassembler with nothing in progress.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes one part. Returns the whole message once its last part is in, `None` while parts
    /// are missing (or while the rest of a refused message goes by), and an error when the part
    /// does not continue the message or the message would exceed `max_message` bytes; the rest
    /// of that message is then dropped.
    pub fn push(
        &mut self,
        total: u64,
        offset: u64,
        piece: Vec<u8>,
        max_message: usize,
    ) -> Result<Option<Vec<u8>>, DecodeError> {
        if let State::Discarding { total: dropping } = self.state {
            if offset != 0 {
                if total != dropping {
                    self.state = State::Idle;
                    return Err(DecodeError::PartSequence(
                        "a part continues a message that was never started",
                    ));
                }
                if offset.saturating_add(piece.len() as u64) >= total {
                    self.state = State::Idle;
                }
                return Ok(None);
            }
            self.state = State::Idle;
        }
        let result = self.accept(total, offset, piece, max_message);
        if result.is_err() && offset.saturating_add(1) < total {
            self.state = State::Discarding { total };
        } else if result.is_err() {
            self.state = State::Idle;
        }
        result
    }

    fn accept(
        &mut self,
        total: u64,
        offset: u64,
        piece: Vec<u8>,
        max_message: usize,
    ) -> Result<Option<Vec<u8>>, DecodeError> {
        if total > max_message as u64 {
            return Err(DecodeError::TooLarge {
                field: "message",
                len: usize::try_from(total).unwrap_or(usize::MAX),
                max: max_message,
            });
        }
        let total = total as usize;
        if piece.is_empty() {
            return Err(DecodeError::PartSequence("a part must not be empty"));
        }
        if offset == 0 {
            if matches!(self.state, State::Assembling { .. }) {
                self.state = State::Idle;
                return Err(DecodeError::PartSequence(
                    "a new message started before the last one was complete",
                ));
            }
            self.state = State::Assembling {
                total,
                bytes: Vec::new(),
            };
        }
        let State::Assembling {
            total: expected,
            bytes,
        } = &mut self.state
        else {
            return Err(DecodeError::PartSequence(
                "a part continues a message that was never started",
            ));
        };
        if *expected != total || bytes.len() as u64 != offset {
            return Err(DecodeError::PartSequence(
                "a part does not continue the message in progress",
            ));
        }
        if bytes.len() + piece.len() > total {
            return Err(DecodeError::PartSequence(
                "a part runs past the message's length",
            ));
        }
        if bytes.is_empty() {
            *bytes = piece;
        } else {
            // Grown as `Vec` would (doubling), but never past the message's length: a
            // message held back by its last part holds no more than its own size.
            let needed = bytes.len() + piece.len();
            if needed > bytes.capacity() {
                let target = (bytes.len() * 2).clamp(needed, total);
                bytes.reserve_exact(target - bytes.len());
            }
            bytes.extend_from_slice(&piece);
        }
        if bytes.len() < total {
            return Ok(None);
        }
        let whole = match std::mem::take(&mut self.state) {
            State::Assembling { bytes, .. } => bytes,
            _ => Vec::new(),
        };
        if whole.first() != Some(&PROTOCOL_VERSION)
            || whole.get(1) == Some(&(super::Kind::Part as u8))
        {
            return Err(DecodeError::PartSequence(
                "the parts do not hold a frame of this version (or hold another part)",
            ));
        }
        Ok(Some(whole))
    }

    /// Bytes held for the message in progress.
    pub fn held(&self) -> usize {
        match &self.state {
            State::Assembling { bytes, .. } => bytes.len(),
            _ => 0,
        }
    }

    /// Whether a message is in progress.
    pub fn in_progress(&self) -> bool {
        matches!(self.state, State::Assembling { .. })
    }

    /// Drops the message in progress (its connection ended).
    pub fn clear(&mut self) {
        self.state = State::Idle;
    }

    /// Bytes allocated for the message in progress (at least [`Reassembler::held`]).
    pub fn allocated(&self) -> usize {
        match &self.state {
            State::Assembling { bytes, .. } => bytes.capacity(),
            _ => 0,
        }
    }

    /// Drops the message in progress and the parts of it still to come (refused by the
    /// caller, for a limit of its own); whatever follows them is read as usual.
    pub fn abandon(&mut self) {
        if let State::Assembling { total, bytes } = &self.state {
            self.state = if bytes.len() < *total {
                State::Discarding {
                    total: *total as u64,
                }
            } else {
                State::Idle
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Body, Limits, Stamp};

    fn big_update(len: usize) -> Vec<u8> {
        Frame::stamped(
            Stamp {
                sender: 1,
                step: 2,
                pattern: 1,
            },
            Body::Update {
                doc: "content".into(),
                update: (0..len).map(|i| i as u8).collect(),
            },
        )
        .encode()
    }

    fn reassemble(parts: &[Vec<u8>], limits: &Limits) -> Vec<u8> {
        let mut r = Reassembler::new();
        let mut out = None;
        for (i, part) in parts.iter().enumerate() {
            assert!(part.len() <= limits.max_frame, "part {i} is {}", part.len());
            let Frame::Part {
                total,
                offset,
                bytes,
            } = Frame::decode_with(part, limits).unwrap()
            else {
                panic!("a part");
            };
            assert!(out.is_none());
            out = r.push(total, offset, bytes, limits.max_message).unwrap();
        }
        out.expect("complete")
    }

    #[test]
    fn a_parts_span_is_read_from_its_header_and_other_frames_have_none() {
        let message = big_update(10_000);
        let parts = fragment(&message, 1_000);
        let spans: Vec<Span> = parts.iter().map(|p| span(p).expect("a part")).collect();
        assert!(spans[0].starts() && !spans[0].ends());
        assert!(spans.last().unwrap().ends());
        for (pair, part) in spans.windows(2).zip(&parts) {
            assert_eq!(pair[0].end, pair[1].offset);
            assert!(!pair[1].starts());
            assert_eq!(pair[0].total, message.len() as u64);
            let Frame::Part { offset, bytes, .. } = Frame::decode(part).unwrap() else {
                panic!("a part");
            };
            assert_eq!(
                (offset, offset + bytes.len() as u64),
                (pair[0].offset, pair[0].end)
            );
        }
        assert_eq!(span(&message), None);
        assert_eq!(span(&Frame::Heartbeat.encode()), None);
        assert_eq!(span(&parts[1][..4]), None, "a header cut short");
        assert_eq!(span(&[]), None);
    }

    /// A message held back by its last part allocates no more than its own length (growing by
    /// doubling, it held up to twice that), and one abandoned drops its buffer and the rest of
    /// its parts; the next message is read as usual.
    #[test]
    fn a_message_in_progress_holds_at_most_its_length_and_can_be_abandoned() {
        let message = big_update(100_000);
        let parts = fragment(&message, 1_000);
        let pieces: Vec<(u64, u64, Vec<u8>)> = parts
            .iter()
            .map(|p| match Frame::decode(p).unwrap() {
                Frame::Part {
                    total,
                    offset,
                    bytes,
                } => (total, offset, bytes),
                _ => panic!("a part"),
            })
            .collect();
        let mut r = Reassembler::new();
        for (total, offset, bytes) in &pieces[..pieces.len() - 1] {
            assert_eq!(r.push(*total, *offset, bytes.clone(), 1 << 20), Ok(None));
            assert!(r.allocated() <= message.len(), "{}", r.allocated());
        }
        r.abandon();
        assert_eq!(r.allocated(), 0);
        let (total, offset, bytes) = pieces.last().unwrap().clone();
        assert_eq!(r.push(total, offset, bytes, 1 << 20), Ok(None), "dropped");
        let mut whole = None;
        for (total, offset, bytes) in pieces {
            whole = r.push(total, offset, bytes, 1 << 20).unwrap();
        }
        assert_eq!(whole, Some(message));
    }

    #[test]
    fn a_large_frame_travels_in_parts_within_the_frame_limit() {
        let limits = Limits {
            max_frame: 1_000,
            ..Limits::default()
        };
        for len in [990, 1_000, 5_000, 100_003] {
            let bytes = big_update(len);
            let parts = fragment(&bytes, limits.max_frame);
            assert_eq!(parts.len(), count(bytes.len(), limits.max_frame));
            if bytes.len() <= limits.max_frame {
                assert_eq!(parts, vec![bytes.clone()]);
                continue;
            }
            assert_eq!(reassemble(&parts, &limits), bytes);
        }
    }

    #[test]
    fn out_of_sequence_parts_are_refused_and_dropped() {
        let bytes = big_update(3_000);
        let parts: Vec<Frame> = fragment(&bytes, 1_000)
            .iter()
            .map(|p| Frame::decode(p).unwrap())
            .collect();
        let piece = |i: usize| match &parts[i] {
            Frame::Part {
                total,
                offset,
                bytes,
            } => (*total, *offset, bytes.clone()),
            _ => unreachable!(),
        };
        let mut r = Reassembler::new();
        let (t, o, b) = piece(1);
        assert!(r.push(t, o, b, 1 << 20).is_err(), "no start");
        let (t, o, b) = piece(0);
        assert_eq!(r.push(t, o, b, 1 << 20), Ok(None));
        let (t, o, b) = piece(2);
        assert!(r.push(t, o, b, 1 << 20).is_err(), "a gap");
        assert!(!r.in_progress(), "the message in progress is dropped");
        let (t, o, b) = piece(0);
        assert!(matches!(
            r.push(t, o, b, 100),
            Err(DecodeError::TooLarge {
                field: "message",
                ..
            })
        ));
        // The rest of a refused message goes by without another error.
        let (t, o, b) = piece(1);
        assert_eq!(r.push(t, o, b, 100), Ok(None));
        let (t, o, b) = piece(2);
        assert_eq!(r.push(t, o, b, 100), Ok(None));
        let (t, o, b) = piece(0);
        assert_eq!(r.push(t, o, b, 1 << 20), Ok(None), "a new message starts");
    }

    #[test]
    fn a_huge_claimed_total_allocates_only_what_arrives() {
        let mut r = Reassembler::new();
        assert_eq!(r.push(60 << 20, 0, vec![2; 10], 64 << 20), Ok(None));
        assert_eq!(r.held(), 10);
    }
}
