//! Frames on the wire: the message types, their binary encoding, and the decoder's limits.
//!
//! One frame per WebSocket binary message. Every frame starts with three bytes:
//!
//! | offset | field     | type | meaning                                                      |
//! |--------|-----------|------|--------------------------------------------------------------|
//! | 0      | `version` | u8   | [`PROTOCOL_VERSION`] (1); anything else is refused           |
//! | 1      | `kind`    | u8   | which frame follows, see [`Kind`]                            |
//! | 2      | `flags`   | u8   | bit 0: payload sealed with an AEAD (reserved, refused in v1); other bits must be 0 |
//!
//! The body follows, field by field, with no padding. Integers are unsigned LEB128 varints (`var`,
//! at most 10 bytes, a value that overflows 64 bits is refused); strings and byte strings are a
//! `var` length then that many bytes (strings are UTF-8). A frame must end exactly where its last
//! field ends. The README's protocol section lists every body.
//!
//! Decoding never panics: every input, however broken, gives a [`Frame`] or a [`DecodeError`]
//! that says which field was wrong and why. No length read from the input allocates more than
//! the bytes that remain in the frame.

use serde::{Deserialize, Serialize};

use crate::pattern::{PatternParams, PatternValue, Step};

/// The wire format's version, the first byte of every frame.
pub const PROTOCOL_VERSION: u8 = 1;

/// Flag bit 0: the payload is sealed with an AEAD under a room key. Reserved: version 1 defines
/// the bit so that a sealed frame is refused clearly rather than misread.
pub const FLAG_SEALED: u8 = 0b0000_0001;

/// Flag bit 1: a room log position (`var`) follows the flags. The relay sets it on every stored
/// message it sends, so that a client can resume from the last position it received.
pub const FLAG_POSITIONED: u8 = 0b0000_0010;

/// A relay-assigned node id: the identity of one connection (kept across reconnects).
/// Id 0 is never assigned.
pub type NodeId = u64;

/// A secret that lets a reconnecting client keep its node id.
pub type ResumeToken = [u8; 16];

/// Limits the decoder enforces. A frame or field over a limit is refused, never truncated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame, in bytes (default 1 MiB).
    pub max_frame: usize,
    /// Longest room name, in bytes (default 128).
    pub max_room: usize,
    /// Longest display name or document name, in bytes (default 64).
    pub max_name: usize,
    /// Longest reject detail, in bytes (default 256).
    pub max_detail: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame: 1 << 20,
            max_room: 128,
            max_name: 64,
            max_detail: 256,
        }
    }
}

/// The frame kinds, the second byte of every frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// Client to relay, first frame of a connection.
    Join = 0x01,
    /// Relay to client, the answer to a join.
    Welcome = 0x02,
    /// Relay to client: the catch-up replay is complete; live traffic follows.
    CaughtUp = 0x03,
    /// Relay to client: a peer joined the room.
    PeerJoined = 0x04,
    /// Relay to client: a peer left the room.
    PeerLeft = 0x05,
    /// Relay to sender: a message is durable.
    Ack = 0x06,
    /// Relay to sender: a frame was refused.
    Reject = 0x07,
    /// Ephemeral state (cursors, who is typing), fanned out, never stored.
    Presence = 0x08,
    /// Stamped: application data as JSON.
    Data = 0x10,
    /// Stamped: a Yjs v1 document update.
    Update = 0x11,
    /// Stamped: a digest of a document at a version, published at phase boundaries.
    Checkpoint = 0x12,
    /// Stamped: a request for what the sender's state vector lacks.
    SyncRequest = 0x13,
    /// Stamped: an update answering a sync request (or a full resync).
    SyncState = 0x14,
    /// Stamped: a full document state at a step, after which the log before it may be compacted.
    Snapshot = 0x15,
}

impl Kind {
    /// The kind for a byte, if the byte names one.
    pub fn from_byte(byte: u8) -> Option<Self> {
        Some(match byte {
            0x01 => Self::Join,
            0x02 => Self::Welcome,
            0x03 => Self::CaughtUp,
            0x04 => Self::PeerJoined,
            0x05 => Self::PeerLeft,
            0x06 => Self::Ack,
            0x07 => Self::Reject,
            0x08 => Self::Presence,
            0x10 => Self::Data,
            0x11 => Self::Update,
            0x12 => Self::Checkpoint,
            0x13 => Self::SyncRequest,
            0x14 => Self::SyncState,
            0x15 => Self::Snapshot,
            _ => return None,
        })
    }

    /// Whether frames of this kind carry a [`Stamp`] and are validated against the pattern.
    pub fn is_stamped(self) -> bool {
        (self as u8) >= 0x10
    }
}

/// Why a frame was refused: by the decoder, by a [`crate::validate::Validator`], or by the relay.
/// The numeric codes travel in [`Frame::Reject`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[repr(u8)]
pub enum Reason {
    /// The frame did not decode.
    Malformed = 1,
    /// The frame, or one of its fields, is over a limit.
    TooLarge = 2,
    /// The pattern is not the value of the step.
    PatternMismatch = 3,
    /// The sender is not the connection it came from.
    SenderMismatch = 4,
    /// The step is not above the sender's last accepted step.
    Replay = 5,
    /// The step is too far ahead of the receiver's clock.
    FutureStep = 6,
    /// The step is too far behind the receiver's clock (real-time rooms only).
    Stale = 7,
    /// Two nodes at the same document version hold different states.
    Desync = 8,
    /// The sender exceeded its message rate.
    RateLimited = 9,
    /// A room or server limit was reached (rooms, members).
    Full = 10,
    /// The frame is valid but not allowed here (for example a second join).
    Unexpected = 11,
    /// The relay could not store the message; it was not applied anywhere. Send it again later.
    Unavailable = 12,
}

impl Reason {
    /// Every reason, in code order.
    pub const ALL: [Reason; 12] = [
        Reason::Malformed,
        Reason::TooLarge,
        Reason::PatternMismatch,
        Reason::SenderMismatch,
        Reason::Replay,
        Reason::FutureStep,
        Reason::Stale,
        Reason::Desync,
        Reason::RateLimited,
        Reason::Full,
        Reason::Unexpected,
        Reason::Unavailable,
    ];

    /// The reason for a wire code, if the code names one.
    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.get(usize::from(code).checked_sub(1)?).copied()
    }

    /// The wire code.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The camelCase name used in JS and in metrics (`patternMismatch`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Malformed => "malformed",
            Reason::TooLarge => "tooLarge",
            Reason::PatternMismatch => "patternMismatch",
            Reason::SenderMismatch => "senderMismatch",
            Reason::Replay => "replay",
            Reason::FutureStep => "futureStep",
            Reason::Stale => "stale",
            Reason::Desync => "desync",
            Reason::RateLimited => "rateLimited",
            Reason::Full => "full",
            Reason::Unexpected => "unexpected",
            Reason::Unavailable => "unavailable",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The header every stamped frame carries: who sent it, at which room step, with which pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Stamp {
    /// The sending node (its relay-assigned id).
    pub sender: NodeId,
    /// The room step the message was sent at.
    pub step: Step,
    /// The pattern value the sender computed for `step`.
    pub pattern: PatternValue,
}

/// A room's settings: its pattern and its validation windows. Sent in every welcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RoomConfig {
    /// The pattern parameters every node of the room uses.
    pub pattern: PatternParams,
    /// How far ahead of a receiver's clock a step may be (rule 5).
    pub max_future: u64,
    /// For real-time rooms, how far behind a step may be before it is dropped as stale (rule 6);
    /// `None` for documents, which keep late edits.
    pub stale_window: Option<u64>,
}

impl Default for RoomConfig {
    fn default() -> Self {
        Self {
            pattern: PatternParams::default(),
            max_future: 1_000,
            stale_window: None,
        }
    }
}

/// A member of a room as others see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Peer {
    /// The member's node id.
    pub node: NodeId,
    /// The member's display name.
    pub name: String,
}

/// A JSON document carried as its text. In JS it is the parsed value; on the wire, its UTF-8
/// text; the decoder checks that it parses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Json(String);

impl Json {
    /// Parses `text` as JSON, keeping the text as given.
    pub fn parse(text: impl Into<String>) -> Result<Self, serde_json::Error> {
        let text = text.into();
        serde_json::from_str::<serde::de::IgnoredAny>(&text)?;
        Ok(Self(text))
    }

    /// Serialises a value to JSON.
    pub fn from_value<T: Serialize + ?Sized>(value: &T) -> Result<Self, serde_json::Error> {
        serde_json::to_string(value).map(Self)
    }

    /// The JSON text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Parses the text into `T`.
    pub fn to_value<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_str(&self.0)
    }
}

impl Serialize for Json {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let value: serde_json::Value =
            serde_json::from_str(&self.0).map_err(serde::ser::Error::custom)?;
        value.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(deserializer)?;
        Json::from_value(&value).map_err(serde::de::Error::custom)
    }
}

/// One frame of the protocol. In JS a frame is a plain object whose `kind` names the variant
/// (`{ kind: "data", sender, step, pattern, data }`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    tag = "kind",
    rename_all = "camelCase",
    rename_all_fields = "camelCase"
)]
pub enum Frame {
    /// The first frame a client sends: which room, from which step, as whom.
    Join {
        /// The room to join (1 to [`Limits::max_room`] bytes).
        room: String,
        /// The display name (at most [`Limits::max_name`] bytes).
        name: String,
        /// The last room log position the client has received (0: none); the relay replays
        /// every logged message after it.
        since: u64,
        /// The token of an earlier welcome, to keep the same node id.
        #[serde(default, with = "option_token")]
        resume: Option<ResumeToken>,
        /// The settings to create the room with, if it does not exist yet.
        #[serde(default)]
        config: Option<RoomConfig>,
    },
    /// The relay's answer to a join.
    Welcome {
        /// The node id of this connection from now on.
        node: NodeId,
        /// Present this in a later join to keep `node`.
        #[serde(with = "token")]
        resume: ResumeToken,
        /// The room's settings.
        config: RoomConfig,
        /// The room's highest accepted step.
        high: Step,
        /// The other members present.
        peers: Vec<Peer>,
    },
    /// The catch-up replay is complete; what follows is live.
    CaughtUp {
        /// The room's highest step at that moment.
        high: Step,
        /// The room log's last position at that moment.
        position: u64,
    },
    /// A member joined.
    PeerJoined {
        /// The member.
        peer: Peer,
    },
    /// A member left.
    PeerLeft {
        /// The member's node id.
        node: NodeId,
    },
    /// The sender's message at `step` is durable in the room log, at `position`.
    Ack {
        /// The acknowledged step.
        step: Step,
        /// Its position in the room log.
        position: u64,
    },
    /// A frame was refused; sent to its sender alone.
    Reject {
        /// The step of the refused frame, or 0 if it had none.
        step: Step,
        /// Why.
        reason: Reason,
        /// A human-readable explanation.
        detail: String,
    },
    /// Ephemeral state of a member (a cursor, a selection), never stored.
    Presence {
        /// The member.
        sender: NodeId,
        /// The state, as JSON.
        data: Json,
    },
    /// Application data, as JSON (the seed's `data: { temperature: 23.5 }`).
    Data {
        /// Sender, step and pattern.
        #[serde(flatten)]
        stamp: Stamp,
        /// The data.
        data: Json,
    },
    /// A Yjs v1 update to the document `doc`.
    Update {
        /// Sender, step and pattern.
        #[serde(flatten)]
        stamp: Stamp,
        /// The document's name.
        doc: String,
        /// The update, Yjs v1 encoding.
        #[serde(with = "serde_bytes")]
        update: Vec<u8>,
    },
    /// The digest of the sender's copy of `doc` at the version `state_vector`.
    Checkpoint {
        /// Sender, step and pattern.
        #[serde(flatten)]
        stamp: Stamp,
        /// The document's name.
        doc: String,
        /// The version the digest is for (a Yjs state vector).
        #[serde(with = "serde_bytes")]
        state_vector: Vec<u8>,
        /// The digest of the document's content at that version (16 hex digits in JS, where a
        /// number could not hold 64 bits).
        #[serde(with = "hex_u64")]
        digest: u64,
    },
    /// A request for everything the sender's state vector lacks.
    SyncRequest {
        /// Sender, step and pattern.
        #[serde(flatten)]
        stamp: Stamp,
        /// The document's name.
        doc: String,
        /// What the sender has (a Yjs state vector).
        #[serde(with = "serde_bytes")]
        state_vector: Vec<u8>,
    },
    /// An update answering a sync request.
    SyncState {
        /// Sender, step and pattern.
        #[serde(flatten)]
        stamp: Stamp,
        /// The document's name.
        doc: String,
        /// The missing part, as a Yjs v1 update.
        #[serde(with = "serde_bytes")]
        update: Vec<u8>,
    },
    /// The full state of `doc` at this step; the relay may drop the log before it.
    Snapshot {
        /// Sender, step and pattern.
        #[serde(flatten)]
        stamp: Stamp,
        /// The document's name.
        doc: String,
        /// The whole document, as a Yjs v1 update.
        #[serde(with = "serde_bytes")]
        state: Vec<u8>,
    },
}

impl Frame {
    /// The frame's kind.
    pub fn kind(&self) -> Kind {
        match self {
            Frame::Join { .. } => Kind::Join,
            Frame::Welcome { .. } => Kind::Welcome,
            Frame::CaughtUp { .. } => Kind::CaughtUp,
            Frame::PeerJoined { .. } => Kind::PeerJoined,
            Frame::PeerLeft { .. } => Kind::PeerLeft,
            Frame::Ack { .. } => Kind::Ack,
            Frame::Reject { .. } => Kind::Reject,
            Frame::Presence { .. } => Kind::Presence,
            Frame::Data { .. } => Kind::Data,
            Frame::Update { .. } => Kind::Update,
            Frame::Checkpoint { .. } => Kind::Checkpoint,
            Frame::SyncRequest { .. } => Kind::SyncRequest,
            Frame::SyncState { .. } => Kind::SyncState,
            Frame::Snapshot { .. } => Kind::Snapshot,
        }
    }

    /// The stamp of a stamped frame (data, update, checkpoint, sync, snapshot).
    pub fn stamp(&self) -> Option<&Stamp> {
        match self {
            Frame::Data { stamp, .. }
            | Frame::Update { stamp, .. }
            | Frame::Checkpoint { stamp, .. }
            | Frame::SyncRequest { stamp, .. }
            | Frame::SyncState { stamp, .. }
            | Frame::Snapshot { stamp, .. } => Some(stamp),
            _ => None,
        }
    }

    /// Encodes the frame. Encoding does not check limits; the receiver's decoder does.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer(Vec::with_capacity(32));
        w.0.extend_from_slice(&[PROTOCOL_VERSION, self.kind() as u8, 0]);
        if let Some(stamp) = self.stamp() {
            w.var(stamp.sender);
            w.var(stamp.step);
            w.var(stamp.pattern);
        }
        match self {
            Frame::Join {
                room,
                name,
                since,
                resume,
                config,
            } => {
                w.str(room);
                w.str(name);
                w.var(*since);
                match resume {
                    Some(token) => {
                        w.0.push(1);
                        w.0.extend_from_slice(token);
                    }
                    None => w.0.push(0),
                }
                match config {
                    Some(config) => {
                        w.0.push(1);
                        w.room_config(config);
                    }
                    None => w.0.push(0),
                }
            }
            Frame::Welcome {
                node,
                resume,
                config,
                high,
                peers,
            } => {
                w.var(*node);
                w.0.extend_from_slice(resume);
                w.room_config(config);
                w.var(*high);
                w.var(peers.len() as u64);
                for peer in peers {
                    w.var(peer.node);
                    w.str(&peer.name);
                }
            }
            Frame::CaughtUp { high, position } => {
                w.var(*high);
                w.var(*position);
            }
            Frame::PeerJoined { peer } => {
                w.var(peer.node);
                w.str(&peer.name);
            }
            Frame::PeerLeft { node } => w.var(*node),
            Frame::Ack { step, position } => {
                w.var(*step);
                w.var(*position);
            }
            Frame::Reject {
                step,
                reason,
                detail,
            } => {
                w.var(*step);
                w.0.push(reason.code());
                w.str(detail);
            }
            Frame::Presence { sender, data } => {
                w.var(*sender);
                w.str(data.as_str());
            }
            Frame::Data { data, .. } => w.str(data.as_str()),
            Frame::Update { doc, update, .. } | Frame::SyncState { doc, update, .. } => {
                w.str(doc);
                w.bytes(update);
            }
            Frame::Snapshot { doc, state, .. } => {
                w.str(doc);
                w.bytes(state);
            }
            Frame::Checkpoint {
                doc,
                state_vector,
                digest,
                ..
            } => {
                w.str(doc);
                w.bytes(state_vector);
                w.0.extend_from_slice(&digest.to_le_bytes());
            }
            Frame::SyncRequest {
                doc, state_vector, ..
            } => {
                w.str(doc);
                w.bytes(state_vector);
            }
        }
        w.0
    }

    /// Decodes one frame with the default [`Limits`], ignoring a log position.
    pub fn decode(bytes: &[u8]) -> Result<Frame, DecodeError> {
        Self::decode_with(bytes, &Limits::default())
    }

    /// Decodes one frame, enforcing `limits`, ignoring a log position.
    pub fn decode_with(bytes: &[u8], limits: &Limits) -> Result<Frame, DecodeError> {
        Self::decode_positioned(bytes, limits).map(|p| p.frame)
    }

    /// Decodes one frame and the room log position the relay put in its header, if any.
    pub fn decode_positioned(bytes: &[u8], limits: &Limits) -> Result<Positioned, DecodeError> {
        if bytes.len() > limits.max_frame {
            return Err(DecodeError::TooLarge {
                field: "frame",
                len: bytes.len(),
                max: limits.max_frame,
            });
        }
        let mut r = Reader { bytes, pos: 0 };
        let version = r.u8("version")?;
        if version != PROTOCOL_VERSION {
            return Err(DecodeError::UnknownVersion(version));
        }
        let kind_byte = r.u8("kind")?;
        let kind = Kind::from_byte(kind_byte).ok_or(DecodeError::UnknownKind(kind_byte))?;
        let flags = r.u8("flags")?;
        if flags & FLAG_SEALED != 0 {
            return Err(DecodeError::SealedUnsupported);
        }
        if flags & !FLAG_POSITIONED != 0 {
            return Err(DecodeError::ReservedFlags(flags));
        }
        let position = if flags & FLAG_POSITIONED != 0 {
            Some(r.var("position")?)
        } else {
            None
        };
        let frame = match kind {
            Kind::Join => Frame::Join {
                room: r.room(limits)?,
                name: r.str("name", limits.max_name)?,
                since: r.var("since")?,
                resume: match r.flag("resume")? {
                    true => Some(r.token()?),
                    false => None,
                },
                config: match r.flag("config")? {
                    true => Some(r.room_config()?),
                    false => None,
                },
            },
            Kind::Welcome => {
                let node = r.var("node")?;
                let resume = r.token()?;
                let config = r.room_config()?;
                let high = r.var("high")?;
                let count = r.var("peers")?;
                // Each peer takes at least two bytes: never allocate past what remains.
                let mut peers = Vec::with_capacity((count as usize).min(r.remaining() / 2));
                for _ in 0..count {
                    peers.push(Peer {
                        node: r.var("peer.node")?,
                        name: r.str("peer.name", limits.max_name)?,
                    });
                }
                Frame::Welcome {
                    node,
                    resume,
                    config,
                    high,
                    peers,
                }
            }
            Kind::CaughtUp => Frame::CaughtUp {
                high: r.var("high")?,
                position: r.var("position")?,
            },
            Kind::PeerJoined => Frame::PeerJoined {
                peer: Peer {
                    node: r.var("node")?,
                    name: r.str("name", limits.max_name)?,
                },
            },
            Kind::PeerLeft => Frame::PeerLeft {
                node: r.var("node")?,
            },
            Kind::Ack => Frame::Ack {
                step: r.var("step")?,
                position: r.var("position")?,
            },
            Kind::Reject => Frame::Reject {
                step: r.var("step")?,
                reason: {
                    let code = r.u8("reason")?;
                    Reason::from_code(code).ok_or(DecodeError::UnknownReason(code))?
                },
                detail: r.str("detail", limits.max_detail)?,
            },
            Kind::Presence => Frame::Presence {
                sender: r.var("sender")?,
                data: r.json()?,
            },
            Kind::Data => Frame::Data {
                stamp: r.stamp()?,
                data: r.json()?,
            },
            Kind::Update => Frame::Update {
                stamp: r.stamp()?,
                doc: r.str("doc", limits.max_name)?,
                update: r.bytes("update")?.to_vec(),
            },
            Kind::Checkpoint => Frame::Checkpoint {
                stamp: r.stamp()?,
                doc: r.str("doc", limits.max_name)?,
                state_vector: r.bytes("state_vector")?.to_vec(),
                digest: u64::from_le_bytes(r.array("digest")?),
            },
            Kind::SyncRequest => Frame::SyncRequest {
                stamp: r.stamp()?,
                doc: r.str("doc", limits.max_name)?,
                state_vector: r.bytes("state_vector")?.to_vec(),
            },
            Kind::SyncState => Frame::SyncState {
                stamp: r.stamp()?,
                doc: r.str("doc", limits.max_name)?,
                update: r.bytes("update")?.to_vec(),
            },
            Kind::Snapshot => Frame::Snapshot {
                stamp: r.stamp()?,
                doc: r.str("doc", limits.max_name)?,
                state: r.bytes("state")?.to_vec(),
            },
        };
        if r.remaining() != 0 {
            return Err(DecodeError::TrailingBytes(r.remaining()));
        }
        Ok(Positioned { position, frame })
    }
}

/// A decoded frame with the room log position its header carried, if any.
#[derive(Debug, Clone, PartialEq)]
pub struct Positioned {
    /// The room log position (set by the relay on stored messages).
    pub position: Option<u64>,
    /// The frame.
    pub frame: Frame,
}

/// Rewrites the header of an encoded frame to carry the room log `position`, keeping every
/// other byte (the sender's stamp and body are untouched). Returns `None` if `bytes` is not a
/// version-1 frame without a position.
pub fn with_position(bytes: &[u8], position: u64) -> Option<Vec<u8>> {
    if bytes.len() < 3 || bytes[0] != PROTOCOL_VERSION || bytes[2] & FLAG_POSITIONED != 0 {
        return None;
    }
    let mut w = Writer(Vec::with_capacity(bytes.len() + 10));
    w.0.extend_from_slice(&[bytes[0], bytes[1], bytes[2] | FLAG_POSITIONED]);
    w.var(position);
    w.0.extend_from_slice(&bytes[3..]);
    Some(w.0)
}

/// Reads only the header of a stamped frame: its kind and stamp, without decoding the body.
/// Returns `None` for a frame too short or not stamped. Useful to reject or route quickly.
pub fn peek_stamp(bytes: &[u8]) -> Option<(Kind, Stamp)> {
    let mut r = Reader { bytes, pos: 0 };
    if r.u8("version").ok()? != PROTOCOL_VERSION {
        return None;
    }
    let kind = Kind::from_byte(r.u8("kind").ok()?)?;
    let flags = r.u8("flags").ok()?;
    if !kind.is_stamped() {
        return None;
    }
    if flags & FLAG_POSITIONED != 0 {
        r.var("position").ok()?;
    }
    Some((kind, r.stamp().ok()?))
}

/// What was wrong with a frame that did not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The frame or a field is over its limit.
    #[error("{field} is {len} bytes, over the limit of {max}")]
    TooLarge {
        /// Which field (`frame` for the whole frame).
        field: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The frame ended inside a field.
    #[error("the frame ends inside the field `{0}`")]
    Truncated(&'static str),
    /// The first byte is not a known protocol version.
    #[error("unknown protocol version {0} (this build speaks version 1)")]
    UnknownVersion(u8),
    /// The kind byte names no frame kind.
    #[error("unknown frame kind 0x{0:02x}")]
    UnknownKind(u8),
    /// The sealed flag is set; version 1 does not open sealed payloads.
    #[error("the frame is sealed (flag bit 0), which this version does not support")]
    SealedUnsupported,
    /// A flag bit other than the defined ones is set.
    #[error("reserved flag bits are set: 0x{0:02x}")]
    ReservedFlags(u8),
    /// A varint is longer than 10 bytes or exceeds 64 bits.
    #[error("the integer `{0}` does not fit in 64 bits")]
    VarintOverflow(&'static str),
    /// A string is not valid UTF-8.
    #[error("the field `{0}` is not valid UTF-8")]
    InvalidUtf8(&'static str),
    /// A required string is empty.
    #[error("the field `{0}` must not be empty")]
    Empty(&'static str),
    /// A JSON payload does not parse.
    #[error("the JSON payload does not parse: {0}")]
    InvalidJson(String),
    /// A boolean byte is neither 0 nor 1.
    #[error("the field `{field}` must be 0 or 1, not {value}")]
    InvalidFlag {
        /// Which field.
        field: &'static str,
        /// The byte found.
        value: u8,
    },
    /// The room configuration is not usable.
    #[error("the room configuration is invalid: {0}")]
    InvalidConfig(#[from] crate::pattern::ConfigError),
    /// A reject frame names an unknown reason code.
    #[error("unknown reject reason code {0}")]
    UnknownReason(u8),
    /// Bytes remain after the last field.
    #[error("{0} unexpected bytes after the end of the frame")]
    TrailingBytes(usize),
}

impl DecodeError {
    /// The reject reason for this error: [`Reason::TooLarge`] or [`Reason::Malformed`].
    pub fn reason(&self) -> Reason {
        match self {
            DecodeError::TooLarge { .. } => Reason::TooLarge,
            _ => Reason::Malformed,
        }
    }
}

struct Writer(Vec<u8>);

impl Writer {
    fn var(&mut self, mut value: u64) {
        while value >= 0x80 {
            self.0.push((value as u8) | 0x80);
            value >>= 7;
        }
        self.0.push(value as u8);
    }

    fn bytes(&mut self, bytes: &[u8]) {
        self.var(bytes.len() as u64);
        self.0.extend_from_slice(bytes);
    }

    fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }

    fn room_config(&mut self, config: &RoomConfig) {
        self.var(config.pattern.seed);
        self.var(config.pattern.multiplier);
        self.var(config.pattern.reset_interval);
        self.var(config.max_future);
        self.var(config.stale_window.map_or(0, |w| w.saturating_add(1)));
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        if n > self.remaining() {
            return Err(DecodeError::Truncated(field));
        }
        let slice = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(slice)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(1, field)?[0])
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N, field)?);
        Ok(out)
    }

    fn flag(&mut self, field: &'static str) -> Result<bool, DecodeError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            value => Err(DecodeError::InvalidFlag { field, value }),
        }
    }

    fn var(&mut self, field: &'static str) -> Result<u64, DecodeError> {
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
                return Ok(value);
            }
        }
        Err(DecodeError::VarintOverflow(field))
    }

    fn bytes(&mut self, field: &'static str) -> Result<&'a [u8], DecodeError> {
        let len = self.var(field)?;
        if len > self.remaining() as u64 {
            return Err(DecodeError::Truncated(field));
        }
        self.take(len as usize, field)
    }

    fn str(&mut self, field: &'static str, max: usize) -> Result<String, DecodeError> {
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

    fn stamp(&mut self) -> Result<Stamp, DecodeError> {
        Ok(Stamp {
            sender: self.var("sender")?,
            step: self.var("step")?,
            pattern: self.var("pattern")?,
        })
    }

    fn room(&mut self, limits: &Limits) -> Result<String, DecodeError> {
        let room = self.str("room", limits.max_room)?;
        if room.is_empty() {
            return Err(DecodeError::Empty("room"));
        }
        Ok(room)
    }

    fn json(&mut self) -> Result<Json, DecodeError> {
        let bytes = self.bytes("data")?;
        let text = std::str::from_utf8(bytes).map_err(|_| DecodeError::InvalidUtf8("data"))?;
        Json::parse(text).map_err(|e| DecodeError::InvalidJson(e.to_string()))
    }

    fn token(&mut self) -> Result<ResumeToken, DecodeError> {
        self.array("resume")
    }

    fn room_config(&mut self) -> Result<RoomConfig, DecodeError> {
        let pattern = PatternParams {
            seed: self.var("config.seed")?,
            multiplier: self.var("config.multiplier")?,
            reset_interval: self.var("config.reset_interval")?,
        };
        crate::pattern::PatternConfig::new(pattern)?;
        Ok(RoomConfig {
            pattern,
            max_future: self.var("config.max_future")?,
            stale_window: self.var("config.stale_window")?.checked_sub(1),
        })
    }
}

/// Serde for a 64-bit digest as 16 hex digits.
mod hex_u64 {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{value:016x}"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let text = String::deserialize(d)?;
        if text.len() != 16 {
            return Err(D::Error::custom("digest must be 16 hex digits"));
        }
        u64::from_str_radix(&text, 16).map_err(|_| D::Error::custom("digest must be 16 hex digits"))
    }
}

/// Serde for a resume token: 16 bytes (a `Uint8Array` in JS).
mod token {
    use super::ResumeToken;
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(token: &ResumeToken, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(token)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<ResumeToken, D::Error> {
        let bytes = serde_bytes::ByteBuf::deserialize(d)?;
        ResumeToken::try_from(bytes.as_slice())
            .map_err(|_| D::Error::custom(format!("resume must be 16 bytes, not {}", bytes.len())))
    }
}

/// Serde for an optional resume token.
mod option_token {
    use super::ResumeToken;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(token: &Option<ResumeToken>, s: S) -> Result<S::Ok, S::Error> {
        match token {
            Some(token) => s.serialize_some(serde_bytes::Bytes::new(token)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<ResumeToken>, D::Error> {
        #[derive(Deserialize)]
        struct Wrap(#[serde(with = "super::token")] ResumeToken);
        Ok(Option::<Wrap>::deserialize(d)?.map(|w| w.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp() -> Stamp {
        Stamp {
            sender: 3,
            step: 300,
            pattern: 7,
        }
    }

    fn samples() -> Vec<Frame> {
        vec![
            Frame::Join {
                room: "doc-1".into(),
                name: "ada".into(),
                since: 42,
                resume: Some([9; 16]),
                config: Some(RoomConfig {
                    stale_window: Some(20),
                    ..RoomConfig::default()
                }),
            },
            Frame::Join {
                room: "r".into(),
                name: String::new(),
                since: 0,
                resume: None,
                config: None,
            },
            Frame::Welcome {
                node: 1,
                resume: [1; 16],
                config: RoomConfig::default(),
                high: u64::MAX,
                peers: vec![Peer {
                    node: 2,
                    name: "grace".into(),
                }],
            },
            Frame::CaughtUp {
                high: 10,
                position: 4,
            },
            Frame::PeerJoined {
                peer: Peer {
                    node: 5,
                    name: "é".into(),
                },
            },
            Frame::PeerLeft { node: 5 },
            Frame::Ack {
                step: 1 << 40,
                position: 3,
            },
            Frame::Reject {
                step: 9,
                reason: Reason::Replay,
                detail: "step 9 is not above 12".into(),
            },
            Frame::Presence {
                sender: 4,
                data: Json::parse(r#"{"cursor":3}"#).unwrap(),
            },
            Frame::Data {
                stamp: stamp(),
                data: Json::parse(r#"{"temperature":23.5}"#).unwrap(),
            },
            Frame::Update {
                stamp: stamp(),
                doc: "content".into(),
                update: vec![1, 2, 3],
            },
            Frame::Checkpoint {
                stamp: stamp(),
                doc: "content".into(),
                state_vector: vec![0],
                digest: u64::MAX - 1,
            },
            Frame::SyncRequest {
                stamp: stamp(),
                doc: "content".into(),
                state_vector: vec![],
            },
            Frame::SyncState {
                stamp: stamp(),
                doc: "content".into(),
                update: vec![0, 0],
            },
            Frame::Snapshot {
                stamp: stamp(),
                doc: "content".into(),
                state: vec![7; 300],
            },
        ]
    }

    #[test]
    fn every_kind_round_trips() {
        for frame in samples() {
            let bytes = frame.encode();
            assert_eq!(bytes[0], PROTOCOL_VERSION);
            assert_eq!(bytes[1], frame.kind() as u8);
            assert_eq!(Frame::decode(&bytes), Ok(frame.clone()), "{frame:?}");
        }
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        for frame in samples() {
            let bytes = frame.encode();
            for cut in 0..bytes.len() {
                assert!(
                    Frame::decode(&bytes[..cut]).is_err(),
                    "{frame:?} cut at {cut}"
                );
            }
        }
    }

    #[test]
    fn peek_reads_the_stamp_without_the_body() {
        let frame = &samples()[9];
        assert_eq!(peek_stamp(&frame.encode()), Some((Kind::Data, stamp())));
        assert_eq!(peek_stamp(&Frame::PeerLeft { node: 1 }.encode()), None);
        let positioned = with_position(&frame.encode(), 300).unwrap();
        assert_eq!(peek_stamp(&positioned), Some((Kind::Data, stamp())));
    }

    #[test]
    fn a_position_in_the_header_leaves_the_frame_intact() {
        for frame in samples() {
            let bytes = with_position(&frame.encode(), 1 << 33).unwrap();
            assert_eq!(
                Frame::decode_positioned(&bytes, &Limits::default()),
                Ok(Positioned {
                    position: Some(1 << 33),
                    frame: frame.clone()
                })
            );
            assert_eq!(with_position(&bytes, 1), None, "a position is set once");
        }
    }

    #[test]
    fn header_errors_name_what_is_wrong() {
        assert_eq!(Frame::decode(&[]), Err(DecodeError::Truncated("version")));
        assert_eq!(
            Frame::decode(&[2, 1, 0]),
            Err(DecodeError::UnknownVersion(2))
        );
        assert_eq!(
            Frame::decode(&[1, 0x7f, 0]),
            Err(DecodeError::UnknownKind(0x7f))
        );
        assert_eq!(
            Frame::decode(&[1, 6, 1, 0]),
            Err(DecodeError::SealedUnsupported)
        );
        assert_eq!(
            Frame::decode(&[1, 6, 4, 0]),
            Err(DecodeError::ReservedFlags(4))
        );
        assert_eq!(
            Frame::decode(&[1, 6, 0, 0, 0, 0]),
            Err(DecodeError::TrailingBytes(1))
        );
    }

    #[test]
    fn varints_over_64_bits_are_refused() {
        let mut bytes = vec![1, 6, 0];
        bytes.extend_from_slice(&[0xff; 9]);
        bytes.push(0x02);
        assert_eq!(
            Frame::decode(&bytes),
            Err(DecodeError::VarintOverflow("step"))
        );
        let mut max = vec![1, 6, 0];
        max.extend_from_slice(&[0xff; 9]);
        max.extend_from_slice(&[0x01, 0x05]);
        assert_eq!(
            Frame::decode(&max),
            Ok(Frame::Ack {
                step: u64::MAX,
                position: 5
            })
        );
    }

    #[test]
    fn limits_are_enforced() {
        let limits = Limits::default();
        let big = vec![0u8; limits.max_frame + 1];
        assert_eq!(Frame::decode(&big).unwrap_err().reason(), Reason::TooLarge);
        let join = Frame::Join {
            room: "x".repeat(limits.max_room + 1),
            name: String::new(),
            since: 0,
            resume: None,
            config: None,
        };
        assert!(matches!(
            Frame::decode(&join.encode()),
            Err(DecodeError::TooLarge { field: "room", .. })
        ));
        let empty_room = Frame::Join {
            room: String::new(),
            name: String::new(),
            since: 0,
            resume: None,
            config: None,
        };
        assert_eq!(
            Frame::decode(&empty_room.encode()),
            Err(DecodeError::Empty("room"))
        );
    }

    #[test]
    fn a_huge_declared_count_allocates_nothing_unbounded() {
        let mut bytes = Frame::Welcome {
            node: 1,
            resume: [0; 16],
            config: RoomConfig::default(),
            high: 0,
            peers: vec![],
        }
        .encode();
        bytes.pop(); // drop the peer count 0 ...
        bytes.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]); // ... and claim 4 billion
        assert_eq!(
            Frame::decode(&bytes),
            Err(DecodeError::Truncated("peer.node"))
        );
    }

    #[test]
    fn invalid_json_and_utf8_are_malformed() {
        let mut bytes = vec![1, Kind::Data as u8, 0, 1, 1, 7, 3];
        bytes.extend_from_slice(b"{x}");
        assert!(matches!(
            Frame::decode(&bytes),
            Err(DecodeError::InvalidJson(_))
        ));
        let mut bytes = vec![1, Kind::Data as u8, 0, 1, 1, 7, 2];
        bytes.extend_from_slice(&[0xc3, 0x28]);
        assert_eq!(Frame::decode(&bytes), Err(DecodeError::InvalidUtf8("data")));
    }

    #[test]
    fn an_unusable_room_config_is_refused() {
        let join = Frame::Join {
            room: "r".into(),
            name: String::new(),
            since: 0,
            resume: None,
            config: Some(RoomConfig {
                pattern: PatternParams {
                    reset_interval: 0,
                    ..PatternParams::default()
                },
                ..RoomConfig::default()
            }),
        };
        assert!(matches!(
            Frame::decode(&join.encode()),
            Err(DecodeError::InvalidConfig(_))
        ));
    }

    #[test]
    fn reason_codes_round_trip() {
        for reason in Reason::ALL {
            assert_eq!(Reason::from_code(reason.code()), Some(reason));
        }
        assert_eq!(Reason::from_code(0), None);
        assert_eq!(Reason::from_code(200), None);
    }

    #[test]
    fn frames_serialise_to_camel_case_objects() {
        let json = serde_json::to_value(&samples()[9]).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "kind": "data", "sender": 3, "step": 300, "pattern": 7,
                "data": { "temperature": 23.5 }
            })
        );
        let back: Frame = serde_json::from_value(json).unwrap();
        assert_eq!(back, samples()[9]);
    }
}
