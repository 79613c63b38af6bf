//! Frames on the wire: the message types, their binary encoding, and the decoder's limits.
//!
//! One frame per WebSocket binary message. Every frame starts with three bytes:
//!
//! | offset | field     | type | meaning                                                      |
//! |--------|-----------|------|--------------------------------------------------------------|
//! | 0      | `version` | u8   | [`PROTOCOL_VERSION`] (2); anything else is refused           |
//! | 1      | `kind`    | u8   | which frame follows, see [`Kind`]                            |
//! | 2      | `flags`   | u8   | bit 0: sealed with an AEAD (reserved, refused); bit 1: a log position follows; other bits must be 0 |
//!
//! The body follows, field by field, with no padding. Integers are unsigned LEB128 varints (`var`,
//! at most 10 bytes, a value that overflows 64 bits is refused); strings and byte strings are a
//! `var` length then that many bytes (strings are UTF-8). A frame must end exactly where its last
//! field ends. The README's protocol section lists every body.
//!
//! Every message that carries content is a [`Stamped`] frame: a [`Stamp`] (sender, step, pattern
//! value) and a [`Body`]. A message larger than the relay's frame limit travels as consecutive
//! [`Frame::Part`]s that the receiver puts back together (see [`part`]).
//!
//! Decoding never panics: every input, however broken, gives a [`Frame`] or a [`DecodeError`]
//! that says which field was wrong and why. No length read from the input allocates more than
//! the bytes that remain in the frame.

pub mod close;
mod codec;
pub(crate) mod json;
pub mod part;

use serde::{Deserialize, Serialize};

use crate::pattern::{PatternParams, PatternValue, Step};
pub(crate) use codec::{Reader, Writer};
pub use json::JsonError;

/// The wire format's version, the first byte of every frame.
pub const PROTOCOL_VERSION: u8 = 2;

/// Flag bit 0: the payload is sealed with an AEAD under a room key. Reserved: the bit is defined
/// so that a sealed frame is refused clearly rather than misread.
pub const FLAG_SEALED: u8 = 0b0000_0001;

/// Flag bit 1: a room log position (`var`) follows the flags. The relay sets it on every stored
/// message it sends, so that a client can resume from the last position it received.
pub const FLAG_POSITIONED: u8 = 0b0000_0010;

/// The document name that stands for every text of a client's document: checkpoints, sync
/// requests and sync answers of the built-in clients cover the whole document.
pub const WHOLE_DOC: &str = "*";

/// A relay-assigned node id: the identity of one client in a room (kept across reconnects).
/// Id 0 is never assigned; as a recipient it means "anyone".
pub type NodeId = u64;

/// A secret that lets a reconnecting client keep its node id.
pub type ResumeToken = [u8; 16];

/// Limits the decoder enforces. A frame or field over a limit is refused, never truncated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame, in bytes (default 1 MiB). Larger messages travel in parts.
    pub max_frame: usize,
    /// Largest message put back together from parts, in bytes (default 64 MiB).
    pub max_message: usize,
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
            max_message: 64 << 20,
            max_room: 128,
            max_name: 64,
            max_detail: 256,
        }
    }
}

impl Limits {
    /// The limits for a message put back together from parts: the frame limit becomes the
    /// message limit.
    pub fn for_message(&self) -> Limits {
        Limits {
            max_frame: self.max_message,
            ..*self
        }
    }

    /// The limits a relay announced in its welcome, with the other fields of `self`.
    pub fn with_relay(&self, relay: &RelayLimits) -> Limits {
        Limits {
            max_frame: relay.max_frame as usize,
            max_message: relay.max_message as usize,
            ..*self
        }
    }
}

/// What a relay announces in its welcome, so that a client sends only what it will accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RelayLimits {
    /// Largest frame the relay reads, in bytes.
    pub max_frame: u64,
    /// Largest message it puts back together from parts, in bytes.
    pub max_message: u64,
    /// Frames a connection may send per second, on average.
    pub rate: u64,
    /// Frames a connection may send at once, above the average.
    pub burst: u64,
    /// Bytes of stored messages (data and updates) a node may send per second, on average.
    pub bandwidth: u64,
    /// Bytes of stored messages a node may send at once, above the average.
    pub bandwidth_burst: u64,
}

impl Default for RelayLimits {
    fn default() -> Self {
        let limits = Limits::default();
        Self {
            max_frame: limits.max_frame as u64,
            max_message: limits.max_message as u64,
            rate: 200,
            burst: 200,
            bandwidth: 4 << 20,
            bandwidth_burst: limits.max_message as u64,
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
    /// A piece of a message too large for one frame.
    Part = 0x09,
    /// Client to relay: the client has seen a refusal; what follows is sent anew.
    Fence = 0x0a,
    /// Relay to client, from the room log: the whole document as the relay compacted it.
    Snapshot = 0x0b,
    /// Client to relay: this member's new display name.
    Rename = 0x0c,
    /// Relay to client: a peer changed its display name.
    PeerRenamed = 0x0d,
    /// Either way: the connection is alive. A client sends one at a fixed interval; the relay
    /// answers each with one.
    Heartbeat = 0x0e,
    /// Stamped: application data as JSON.
    Data = 0x10,
    /// Stamped: a Yjs v1 document update.
    Update = 0x11,
    /// Stamped: a digest of a document at a version, published at phase boundaries.
    Checkpoint = 0x12,
    /// Stamped: a request for what the sender's state vector lacks.
    SyncRequest = 0x13,
    /// Stamped: an update answering a sync request.
    SyncState = 0x14,
    /// Stamped: application data as JSON that is fanned out, never stored nor replayed (game
    /// ticks, cursors).
    Signal = 0x16,
}

/// The kind byte of a frame of protocol 2 that clients no longer send: the client-posted
/// snapshot, which replaced the log before it (any member could wipe a document with one).
/// The relay now compacts the log itself ([`Frame::Snapshot`]).
pub const RETIRED_CLIENT_SNAPSHOT: u8 = 0x15;

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
            0x09 => Self::Part,
            0x0a => Self::Fence,
            0x0b => Self::Snapshot,
            0x0c => Self::Rename,
            0x0d => Self::PeerRenamed,
            0x0e => Self::Heartbeat,
            0x10 => Self::Data,
            0x11 => Self::Update,
            0x12 => Self::Checkpoint,
            0x13 => Self::SyncRequest,
            0x14 => Self::SyncState,
            0x16 => Self::Signal,
            _ => return None,
        })
    }

    /// Whether a frame of this kind is refused as [`Reason::Stale`] past a real-time room's
    /// stale window: data (a game's inputs) and signals are, document messages (updates, sync
    /// requests and answers, checkpoints) never are. A late edit is still an edit: refused, it
    /// would be lost, and every later edit of its sender with it (they come after a gap in that
    /// sender's clocks). Nothing from the room's log is stale either (see
    /// [`crate::validate::Validator::check_logged`]): the relay judges data as it takes it, and
    /// a client, which gets data from the log, judges only signals.
    pub fn may_be_stale(self) -> bool {
        matches!(self, Self::Data | Self::Signal)
    }

    /// Whether frames of this kind carry a [`Stamp`] and are validated against the pattern.
    pub fn is_stamped(self) -> bool {
        (self as u8) >= 0x10
    }

    /// The camelCase name used in JS (`syncRequest`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Join => "join",
            Kind::Welcome => "welcome",
            Kind::CaughtUp => "caughtUp",
            Kind::PeerJoined => "peerJoined",
            Kind::PeerLeft => "peerLeft",
            Kind::Ack => "ack",
            Kind::Reject => "reject",
            Kind::Presence => "presence",
            Kind::Part => "part",
            Kind::Fence => "fence",
            Kind::Snapshot => "snapshot",
            Kind::Rename => "rename",
            Kind::PeerRenamed => "peerRenamed",
            Kind::Heartbeat => "heartbeat",
            Kind::Data => "data",
            Kind::Update => "update",
            Kind::Checkpoint => "checkpoint",
            Kind::SyncRequest => "syncRequest",
            Kind::SyncState => "syncState",
            Kind::Signal => "signal",
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
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
    /// The sender exceeded its message rate. The message was not stored; send it again later.
    RateLimited = 9,
    /// A room or server limit was reached (rooms, members).
    Full = 10,
    /// The frame is valid but not allowed here (for example a second join).
    Unexpected = 11,
    /// The relay could not store the message; it was not applied anywhere. Send it again later.
    Unavailable = 12,
    /// An earlier frame of this connection was refused, so this one was not considered: send a
    /// fence, then send again from the refused frame on.
    OutOfOrder = 13,
    /// The member's access token does not let it do this (a read-only member's write, a
    /// rename when the token names the member).
    Forbidden = 14,
}

impl Reason {
    /// Every reason, in code order.
    pub const ALL: [Reason; 14] = [
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
        Reason::OutOfOrder,
        Reason::Forbidden,
    ];

    /// The reason for a wire code, if the code names one.
    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.get(usize::from(code).checked_sub(1)?).copied()
    }

    /// The wire code.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// Whether a message refused for this reason may be accepted when sent again later, with the
    /// same stamp: the relay refused it for a passing condition, not for what it is.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            Reason::RateLimited | Reason::Unavailable | Reason::OutOfOrder
        )
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
            Reason::OutOfOrder => "outOfOrder",
            Reason::Forbidden => "forbidden",
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

impl RoomConfig {
    /// The largest `max_future` and `stale_window` a room may have: a million steps.
    pub const MAX_WINDOW: u64 = 1_000_000;

    /// Checks that the configuration is usable: a valid pattern, `max_future` in
    /// `1..=MAX_WINDOW`, and a stale window, if any, in `1..=MAX_WINDOW`.
    pub fn check(&self) -> Result<(), crate::pattern::ConfigError> {
        use crate::pattern::ConfigError;
        crate::pattern::PatternConfig::new(self.pattern)?;
        if !(1..=Self::MAX_WINDOW).contains(&self.max_future) {
            return Err(ConfigError::OutOfRange {
                field: "maxFuture",
                value: self.max_future,
                max: Self::MAX_WINDOW,
            });
        }
        if let Some(window) = self.stale_window {
            if !(1..=Self::MAX_WINDOW).contains(&window) {
                return Err(ConfigError::OutOfRange {
                    field: "staleWindow",
                    value: window,
                    max: Self::MAX_WINDOW,
                });
            }
        }
        Ok(())
    }
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
    pub fn parse(text: impl Into<String>) -> Result<Self, JsonError> {
        let text = text.into();
        json::check(&text)?;
        Ok(Self(text))
    }

    /// JSON `null`.
    pub fn null() -> Self {
        Self("null".into())
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

/// The content of a stamped message. Which kinds are stored in the room log and acknowledged
/// ([`Body::is_durable`]) and which reach one node only ([`Body::recipient`]) is decided here, once,
/// for the relay and every client.
#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    /// Application data, as JSON (the seed's `data: { temperature: 23.5 }`).
    Data {
        /// The data.
        data: Json,
    },
    /// A Yjs v1 update to the document `doc`.
    Update {
        /// The document's name.
        doc: String,
        /// The update, Yjs v1 encoding.
        update: Vec<u8>,
    },
    /// The digest of the sender's copy of `doc` at a version: its state vector and its
    /// deletions. Two replicas at the same version must have the same digest.
    Checkpoint {
        /// The document's name.
        doc: String,
        /// What the sender has (a Yjs state vector).
        state_vector: Vec<u8>,
        /// A 64-bit hash of what the sender has deleted (its delete set): a state vector alone
        /// does not move on a delete.
        deletes: u64,
        /// The digest of the content at that version.
        digest: u64,
    },
    /// A request for everything the sender's state vector lacks, from one node or from anyone.
    SyncRequest {
        /// The document's name.
        doc: String,
        /// What the sender has (a Yjs state vector); empty asks for the whole document.
        state_vector: Vec<u8>,
        /// The node asked to answer (0: any node that has something to add).
        to: NodeId,
    },
    /// Application data that the relay validates and fans out but never stores: late joiners
    /// never see it, and nobody acknowledges it.
    Signal {
        /// The data.
        data: Json,
    },
    /// An update answering a sync request.
    SyncState {
        /// The document's name.
        doc: String,
        /// The missing part, as a Yjs v1 update.
        update: Vec<u8>,
        /// The node that asked (0: everyone).
        to: NodeId,
    },
}

impl Body {
    /// The frame kind of this body.
    pub fn kind(&self) -> Kind {
        match self {
            Body::Data { .. } => Kind::Data,
            Body::Update { .. } => Kind::Update,
            Body::Checkpoint { .. } => Kind::Checkpoint,
            Body::SyncRequest { .. } => Kind::SyncRequest,
            Body::SyncState { .. } => Kind::SyncState,
            Body::Signal { .. } => Kind::Signal,
        }
    }

    /// The document the body concerns, if any.
    pub fn doc(&self) -> Option<&str> {
        match self {
            Body::Data { .. } | Body::Signal { .. } => None,
            Body::Update { doc, .. }
            | Body::Checkpoint { doc, .. }
            | Body::SyncRequest { doc, .. }
            | Body::SyncState { doc, .. } => Some(doc),
        }
    }

    /// Whether the relay stores the message in the room log, replays it to late joiners and
    /// acknowledges it: data and updates. Checkpoints and the sync exchange are about the
    /// moment they are sent; they are validated and forwarded, never stored.
    pub fn is_durable(&self) -> bool {
        matches!(self, Body::Data { .. } | Body::Update { .. })
    }

    /// [`Body::encoded_len`] of an update of `doc` that holds `len` bytes, without making it.
    pub fn update_len(doc: &str, len: usize) -> usize {
        codec::var_len(doc.len() as u64) + doc.len() + codec::var_len(len as u64) + len
    }

    /// The length of the body's encoding, in bytes.
    pub fn encoded_len(&self) -> usize {
        fn field(len: usize) -> usize {
            codec::var_len(len as u64) + len
        }
        match self {
            Body::Data { data } | Body::Signal { data } => field(data.as_str().len()),
            Body::Update { doc, update } => Self::update_len(doc, update.len()),
            Body::Checkpoint {
                doc, state_vector, ..
            } => field(doc.len()) + field(state_vector.len()) + 16,
            Body::SyncRequest {
                doc,
                state_vector,
                to,
            } => field(doc.len()) + field(state_vector.len()) + codec::var_len(*to),
            Body::SyncState { doc, update, to } => {
                field(doc.len()) + field(update.len()) + codec::var_len(*to)
            }
        }
    }

    /// The one node this message is for, if it is not for the whole room.
    pub fn recipient(&self) -> Option<NodeId> {
        match self {
            Body::SyncRequest { to, .. } | Body::SyncState { to, .. } if *to != 0 => Some(*to),
            _ => None,
        }
    }

    /// Whether the room's step counts this message (see `crate::clock`): whether it goes to
    /// every member. A sync request never does (the relay gives one to everyone to one
    /// writer), nor does a message for one node. The relay moves the room's step by the same
    /// rule as every receiver moves its clock: a member that sent one node many such messages
    /// pushed that node's clock past the room's step, and the room then refused each of its
    /// edits as `futureStep`.
    pub fn moves_step(&self) -> bool {
        !matches!(self, Body::SyncRequest { .. }) && self.recipient().is_none()
    }
}

/// A stamped message: its stamp and its body.
#[derive(Debug, Clone, PartialEq)]
pub struct Stamped {
    /// Sender, step and pattern.
    pub stamp: Stamp,
    /// What it carries.
    pub body: Body,
}

impl Stamped {
    /// The length of the frame's encoding, in bytes, without a log position.
    pub fn encoded_len(&self) -> usize {
        3 + codec::var_len(self.stamp.sender)
            + codec::var_len(self.stamp.step)
            + codec::var_len(self.stamp.pattern)
            + self.body.encoded_len()
    }
}

/// One frame of the protocol.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// The first frame a client sends: which room, from which log position, as whom.
    Join {
        /// The room to join (1 to [`Limits::max_room`] bytes).
        room: String,
        /// The display name (at most [`Limits::max_name`] bytes).
        name: String,
        /// The last room log position the client has received (0: none); the relay replays
        /// every logged message after it.
        since: u64,
        /// The identity of the log `since` counts in, from an earlier welcome (0: none). When it
        /// is not the room's, the relay replays its whole log.
        log: u64,
        /// The token of an earlier welcome, to keep the same node id.
        resume: Option<ResumeToken>,
        /// The settings to create the room with, if it does not exist yet.
        config: Option<RoomConfig>,
        /// Asks for the welcome's `floor`. Encoded as a last flag only when set, so that a join
        /// without it is the one a client before it sent.
        floor: bool,
    },
    /// The relay's answer to a join.
    Welcome {
        /// The node id of this client from now on.
        node: NodeId,
        /// Present this in a later join to keep `node`.
        resume: ResumeToken,
        /// The room's settings.
        config: RoomConfig,
        /// What the relay accepts from this connection.
        limits: RelayLimits,
        /// The room's highest accepted step.
        high: Step,
        /// The identity of the room's log. It changes only when the room's history was lost (a
        /// new store): node ids and steps then begin again, and a client that knew the old log
        /// gives its document back.
        log: u64,
        /// The other members present.
        peers: Vec<Peer>,
        /// When the join asked for it and the relay knows it for certain: the highest step the
        /// relay accepted from this node, when the relay has held the node since (not when it
        /// took the node back from its store, or restarted, and the node sent nothing there
        /// since: what was never stored, such as signals, is not there). The node stamps above
        /// it and above `high`, and need stamp
        /// no higher: a client restored from storage starts at its stored ceiling, which may be
        /// far above both. Encoded last, only when present, so that a client that did not ask
        /// reads the welcome it always did.
        floor: Option<Step>,
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
    /// The sender's message at `step` is durable in the room log, at `position`. Each stored
    /// message gets its own acknowledgement, which covers that message only.
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
    /// A piece of a message too large for one frame (see [`part`]).
    Part {
        /// The whole message's length in bytes.
        total: u64,
        /// Where this piece starts in it.
        offset: u64,
        /// The piece.
        bytes: Vec<u8>,
    },
    /// The client has seen the refusal of its frame at `step`: the relay stops refusing its
    /// frames as [`Reason::OutOfOrder`], and what follows is sent anew.
    Fence {
        /// The step of the refusal this answers.
        step: Step,
    },
    /// A member's new display name, for every peer (client to relay).
    Rename {
        /// The name (at most 64 bytes).
        name: String,
    },
    /// A peer's new display name (relay to client).
    PeerRenamed {
        /// The peer, with its new name.
        peer: Peer,
    },
    /// The connection is alive (either way, no body): a client sends one every
    /// [`crate::session::SessionConfig::heartbeat`] milliseconds, and the relay answers each
    /// with one. Each side takes a connection it has heard nothing from for long enough for
    /// dead (a network that went away without closing it).
    Heartbeat,
    /// The relay's compaction of a document, from the room log (it always carries a position):
    /// every update logged before it, merged. A client applies it like an update. Only the
    /// relay writes one; it is refused from a client.
    Snapshot {
        /// The document's name ([`WHOLE_DOC`]: every text of the room's document).
        doc: String,
        /// The document, as a Yjs v1 update.
        state: Vec<u8>,
    },
    /// A stamped message.
    Stamped(Stamped),
}

impl Frame {
    /// A stamped frame.
    pub fn stamped(stamp: Stamp, body: Body) -> Frame {
        Frame::Stamped(Stamped { stamp, body })
    }

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
            Frame::Part { .. } => Kind::Part,
            Frame::Fence { .. } => Kind::Fence,
            Frame::Rename { .. } => Kind::Rename,
            Frame::PeerRenamed { .. } => Kind::PeerRenamed,
            Frame::Heartbeat => Kind::Heartbeat,
            Frame::Snapshot { .. } => Kind::Snapshot,
            Frame::Stamped(s) => s.body.kind(),
        }
    }

    /// The stamp of a stamped frame.
    pub fn stamp(&self) -> Option<&Stamp> {
        match self {
            Frame::Stamped(s) => Some(&s.stamp),
            _ => None,
        }
    }

    /// Encodes the frame. Encoding does not check limits; the receiver's decoder does, and a
    /// sender splits what is too large with [`part::fragment`].
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(32);
        w.raw(&[PROTOCOL_VERSION, self.kind() as u8, 0]);
        match self {
            Frame::Join {
                room,
                name,
                since,
                log,
                resume,
                config,
                floor,
            } => {
                w.str(room);
                w.str(name);
                w.var(*since);
                w.var(*log);
                w.flag(resume.is_some());
                if let Some(token) = resume {
                    w.raw(token);
                }
                w.flag(config.is_some());
                if let Some(config) = config {
                    room_config(&mut w, config);
                }
                if *floor {
                    w.flag(true);
                }
            }
            Frame::Welcome {
                node,
                resume,
                config,
                limits,
                high,
                log,
                peers,
                floor,
            } => {
                w.var(*node);
                w.raw(resume);
                room_config(&mut w, config);
                w.var(limits.max_frame);
                w.var(limits.max_message);
                w.var(limits.rate);
                w.var(limits.burst);
                w.var(limits.bandwidth);
                w.var(limits.bandwidth_burst);
                w.var(*high);
                w.var(*log);
                w.var(peers.len() as u64);
                for peer in peers {
                    w.var(peer.node);
                    w.str(&peer.name);
                }
                if let Some(floor) = floor {
                    w.var(*floor);
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
                w.u8(reason.code());
                w.str(detail);
            }
            Frame::Presence { sender, data } => {
                w.var(*sender);
                w.str(data.as_str());
            }
            Frame::Part {
                total,
                offset,
                bytes,
            } => {
                w.var(*total);
                w.var(*offset);
                w.bytes(bytes);
            }
            Frame::Fence { step } => w.var(*step),
            Frame::Heartbeat => {}
            Frame::Rename { name } => w.str(name),
            Frame::PeerRenamed { peer } => {
                w.var(peer.node);
                w.str(&peer.name);
            }
            Frame::Snapshot { doc, state } => {
                w.str(doc);
                w.bytes(state);
            }
            Frame::Stamped(Stamped { stamp, body }) => {
                w.var(stamp.sender);
                w.var(stamp.step);
                w.var(stamp.pattern);
                match body {
                    Body::Data { data } | Body::Signal { data } => w.str(data.as_str()),
                    Body::Update { doc, update } => {
                        w.str(doc);
                        w.bytes(update);
                    }
                    Body::Checkpoint {
                        doc,
                        state_vector,
                        deletes,
                        digest,
                    } => {
                        w.str(doc);
                        w.bytes(state_vector);
                        w.raw(&deletes.to_le_bytes());
                        w.raw(&digest.to_le_bytes());
                    }
                    Body::SyncRequest {
                        doc,
                        state_vector,
                        to,
                    } => {
                        w.str(doc);
                        w.bytes(state_vector);
                        w.var(*to);
                    }
                    Body::SyncState { doc, update, to } => {
                        w.str(doc);
                        w.bytes(update);
                        w.var(*to);
                    }
                }
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
        let mut r = Reader::new(bytes);
        let version = r.u8("version")?;
        if version != PROTOCOL_VERSION {
            return Err(DecodeError::UnknownVersion(version));
        }
        let kind_byte = r.u8("kind")?;
        if kind_byte == RETIRED_CLIENT_SNAPSHOT {
            return Err(DecodeError::Retired {
                kind: "snapshot",
                instead: "the relay compacts the room log itself",
            });
        }
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
                room: room(&mut r, limits)?,
                name: r.str("name", limits.max_name)?,
                since: r.var("since")?,
                log: r.var("log")?,
                resume: match r.flag("resume")? {
                    true => Some(r.array("resume")?),
                    false => None,
                },
                config: match r.flag("config")? {
                    true => Some(read_room_config(&mut r)?),
                    false => None,
                },
                // Only a set flag is encoded: a zero here is not a frame any client sends.
                floor: match r.remaining() {
                    0 => false,
                    _ => match r.u8("floor")? {
                        1 => true,
                        value => {
                            return Err(DecodeError::InvalidFlag {
                                field: "floor",
                                value,
                            })
                        }
                    },
                },
            },
            Kind::Welcome => {
                let node = r.var("node")?;
                let resume = r.array("resume")?;
                let config = read_room_config(&mut r)?;
                let limits_announced = RelayLimits {
                    max_frame: r.var("limits.max_frame")?,
                    max_message: r.var("limits.max_message")?,
                    rate: r.var("limits.rate")?,
                    burst: r.var("limits.burst")?,
                    bandwidth: r.var("limits.bandwidth")?,
                    bandwidth_burst: r.var("limits.bandwidth_burst")?,
                };
                let high = r.var("high")?;
                let log = r.var("log")?;
                let count = r.var("peers")?;
                // Each peer takes at least two bytes: never allocate past what remains.
                let mut peers = Vec::with_capacity((count as usize).min(r.remaining() / 2));
                for _ in 0..count {
                    peers.push(Peer {
                        node: r.var("peer.node")?,
                        name: r.str("peer.name", limits.max_name)?,
                    });
                }
                let floor = match r.remaining() {
                    0 => None,
                    _ => Some(r.var("floor")?),
                };
                Frame::Welcome {
                    node,
                    resume,
                    config,
                    limits: limits_announced,
                    high,
                    log,
                    peers,
                    floor,
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
                data: json(&mut r)?,
            },
            Kind::Part => Frame::Part {
                total: r.var("total")?,
                offset: r.var("offset")?,
                bytes: r.bytes("bytes")?.to_vec(),
            },
            Kind::Fence => Frame::Fence {
                step: r.var("step")?,
            },
            Kind::Heartbeat => Frame::Heartbeat,
            Kind::Rename => Frame::Rename {
                name: r.str("name", limits.max_name)?,
            },
            Kind::PeerRenamed => Frame::PeerRenamed {
                peer: Peer {
                    node: r.var("node")?,
                    name: r.str("name", limits.max_name)?,
                },
            },
            Kind::Snapshot => Frame::Snapshot {
                doc: r.str("doc", limits.max_name)?,
                state: r.bytes("state")?.to_vec(),
            },
            Kind::Data
            | Kind::Update
            | Kind::Checkpoint
            | Kind::SyncRequest
            | Kind::SyncState
            | Kind::Signal => {
                let stamp = Stamp {
                    sender: r.var("sender")?,
                    step: r.var("step")?,
                    pattern: r.var("pattern")?,
                };
                let body = match kind {
                    Kind::Data => Body::Data {
                        data: json(&mut r)?,
                    },
                    Kind::Signal => Body::Signal {
                        data: json(&mut r)?,
                    },
                    Kind::Update => Body::Update {
                        doc: r.str("doc", limits.max_name)?,
                        update: r.bytes("update")?.to_vec(),
                    },
                    Kind::Checkpoint => Body::Checkpoint {
                        doc: r.str("doc", limits.max_name)?,
                        state_vector: r.bytes("state_vector")?.to_vec(),
                        deletes: u64::from_le_bytes(r.array("deletes")?),
                        digest: u64::from_le_bytes(r.array("digest")?),
                    },
                    Kind::SyncRequest => Body::SyncRequest {
                        doc: r.str("doc", limits.max_name)?,
                        state_vector: r.bytes("state_vector")?.to_vec(),
                        to: r.var("to")?,
                    },
                    _ => Body::SyncState {
                        doc: r.str("doc", limits.max_name)?,
                        update: r.bytes("update")?.to_vec(),
                        to: r.var("to")?,
                    },
                };
                Frame::Stamped(Stamped { stamp, body })
            }
        };
        if r.remaining() != 0 {
            return Err(DecodeError::TrailingBytes(r.remaining()));
        }
        Ok(Positioned { position, frame })
    }
}

pub(crate) fn room_config(w: &mut Writer, config: &RoomConfig) {
    w.var(config.pattern.seed);
    w.var(config.pattern.multiplier);
    w.var(config.pattern.reset_interval);
    w.var(config.max_future);
    w.var(config.stale_window.map_or(0, |w| w.saturating_add(1)));
}

pub(crate) fn read_room_config(r: &mut Reader<'_>) -> Result<RoomConfig, DecodeError> {
    let pattern = PatternParams {
        seed: r.var("config.seed")?,
        multiplier: r.var("config.multiplier")?,
        reset_interval: r.var("config.resetInterval")?,
    };
    let config = RoomConfig {
        pattern,
        max_future: r.var("config.maxFuture")?,
        stale_window: r.var("config.staleWindow")?.checked_sub(1),
    };
    config.check()?;
    Ok(config)
}

fn room(r: &mut Reader<'_>, limits: &Limits) -> Result<String, DecodeError> {
    let room = r.str("room", limits.max_room)?;
    if room.is_empty() {
        return Err(DecodeError::Empty("room"));
    }
    Ok(room)
}

fn json(r: &mut Reader<'_>) -> Result<Json, DecodeError> {
    let bytes = r.bytes("data")?;
    let text = std::str::from_utf8(bytes).map_err(|_| DecodeError::InvalidUtf8("data"))?;
    Json::parse(text).map_err(|e| DecodeError::InvalidJson(e.to_string()))
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
/// frame of this version without a position.
pub fn with_position(bytes: &[u8], position: u64) -> Option<Vec<u8>> {
    if bytes.len() < 3 || bytes[0] != PROTOCOL_VERSION || bytes[2] & FLAG_POSITIONED != 0 {
        return None;
    }
    let mut w = Writer::with_capacity(bytes.len() + codec::var_len(position));
    w.raw(&[bytes[0], bytes[1], bytes[2] | FLAG_POSITIONED]);
    w.var(position);
    w.raw(&bytes[3..]);
    Some(w.0)
}

/// Reads only the header of a stamped frame: its kind and stamp, without decoding the body.
/// Returns `None` for a frame too short or not stamped. Useful to name the step of a frame that
/// is refused before it is decoded.
pub fn peek_stamp(bytes: &[u8]) -> Option<(Kind, Stamp)> {
    let mut r = Reader::new(bytes);
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
    Some((
        kind,
        Stamp {
            sender: r.var("sender").ok()?,
            step: r.var("step").ok()?,
            pattern: r.var("pattern").ok()?,
        },
    ))
}

/// What was wrong with a frame that did not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The frame or a field is over its limit.
    #[error("{field} is {len} bytes, over the limit of {max}")]
    TooLarge {
        /// Which field (`frame` for the whole frame, `message` for one put back together).
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
    #[error("unknown protocol version {0} (this build speaks version 2)")]
    UnknownVersion(u8),
    /// The kind byte names no frame kind.
    #[error("unknown frame kind 0x{0:02x}")]
    UnknownKind(u8),
    /// A kind of frame this version no longer takes.
    #[error("{kind} frames from clients are no longer accepted: {instead}")]
    Retired {
        /// Which kind.
        kind: &'static str,
        /// What replaced it.
        instead: &'static str,
    },
    /// The sealed flag is set; this version does not open sealed payloads.
    #[error("the frame is sealed (flag bit 0), which this version does not support")]
    SealedUnsupported,
    /// A flag bit other than the defined ones is set.
    #[error("reserved flag bits are set: 0x{0:02x}")]
    ReservedFlags(u8),
    /// A varint is longer than 10 bytes or exceeds 64 bits.
    #[error("the integer `{0}` does not fit in 64 bits")]
    VarintOverflow(&'static str),
    /// An integer is above 2^53 - 1: a JS number would not hold it exactly, nor a store column.
    #[error("`{field}` is {value}, above the largest integer a frame may carry (2^53 - 1)")]
    Unsafe {
        /// Which field.
        field: &'static str,
        /// Its value.
        value: u64,
    },
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
    /// A part does not continue the message being put back together.
    #[error("a part is out of sequence: {0}")]
    PartSequence(&'static str),
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

    pub(crate) fn samples() -> Vec<Frame> {
        let stamped = |body| Frame::stamped(stamp(), body);
        vec![
            Frame::Join {
                room: "doc-1".into(),
                name: "ada".into(),
                since: 42,
                log: 5,
                resume: Some([9; 16]),
                config: Some(RoomConfig {
                    stale_window: Some(20),
                    ..RoomConfig::default()
                }),
                floor: true,
            },
            Frame::Join {
                room: "r".into(),
                name: String::new(),
                since: 0,
                log: 0,
                resume: None,
                config: None,
                floor: false,
            },
            Frame::Welcome {
                node: 1,
                resume: [1; 16],
                config: RoomConfig::default(),
                limits: RelayLimits::default(),
                high: crate::pattern::MAX_SAFE_INTEGER,
                log: 12,
                peers: vec![Peer {
                    node: 2,
                    name: "grace".into(),
                }],
                floor: Some(crate::pattern::MAX_SAFE_INTEGER - 1),
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
            Frame::Part {
                total: 3_000_000,
                offset: 1_048_000,
                bytes: vec![5; 100],
            },
            Frame::Fence { step: 77 },
            Frame::Heartbeat,
            Frame::Rename {
                name: "grace".into(),
            },
            Frame::PeerRenamed {
                peer: Peer {
                    node: 4,
                    name: "grace".into(),
                },
            },
            stamped(Body::Data {
                data: Json::parse(r#"{"temperature":23.5}"#).unwrap(),
            }),
            stamped(Body::Signal {
                data: Json::parse(r#"{"x":3,"y":4}"#).unwrap(),
            }),
            stamped(Body::Update {
                doc: "content".into(),
                update: vec![1, 2, 3],
            }),
            stamped(Body::Checkpoint {
                doc: "content".into(),
                state_vector: vec![0],
                deletes: 17,
                digest: u64::MAX - 1,
            }),
            stamped(Body::SyncRequest {
                doc: "content".into(),
                state_vector: vec![],
                to: 4,
            }),
            stamped(Body::SyncState {
                doc: "content".into(),
                update: vec![0, 0],
                to: 0,
            }),
            Frame::Snapshot {
                doc: "*".into(),
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
    fn the_encoded_length_is_known_before_encoding() {
        for frame in samples() {
            if let Frame::Stamped(stamped) = &frame {
                assert_eq!(stamped.encoded_len(), frame.encode().len(), "{frame:?}");
            }
        }
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        for frame in samples() {
            let bytes = frame.encode();
            // Cut where the optional last field begins, the frame is the one without it.
            let without = without_floor(&frame).map(|f| (f.encode().len(), f));
            for cut in 0..bytes.len() {
                match &without {
                    Some((len, shorter)) if *len == cut => {
                        assert_eq!(Frame::decode(&bytes[..cut]).as_ref(), Ok(shorter));
                    }
                    _ => assert!(
                        Frame::decode(&bytes[..cut]).is_err(),
                        "{frame:?} cut at {cut}"
                    ),
                }
            }
        }
    }

    /// `frame` without its optional last field, if it has one.
    fn without_floor(frame: &Frame) -> Option<Frame> {
        let mut shorter = frame.clone();
        match &mut shorter {
            Frame::Join { floor, .. } if *floor => *floor = false,
            Frame::Welcome { floor, .. } if floor.is_some() => *floor = None,
            _ => return None,
        }
        Some(shorter)
    }

    /// The welcome's floor is asked for and sent as a last field, only when there is one: a
    /// join or a welcome without it is byte for byte the frame clients and relays before it
    /// sent and read. A join's flag is 1 or absent.
    #[test]
    fn the_floor_is_a_last_field_only_when_present() {
        for frame in samples() {
            let Some(shorter) = without_floor(&frame) else {
                continue;
            };
            let (long, short) = (frame.encode(), shorter.encode());
            assert_eq!(long[..short.len()], short[..], "{frame:?}");
            assert!(long.len() > short.len());
        }
        let mut join = Frame::Join {
            room: "r".into(),
            name: "n".into(),
            since: 0,
            log: 0,
            resume: None,
            config: None,
            floor: false,
        }
        .encode();
        join.push(0);
        assert_eq!(
            Frame::decode(&join),
            Err(DecodeError::InvalidFlag {
                field: "floor",
                value: 0
            })
        );
    }

    #[test]
    fn peek_reads_the_stamp_without_the_body() {
        let frame = Frame::stamped(
            stamp(),
            Body::Data {
                data: Json::parse("1").unwrap(),
            },
        );
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

    /// A client-posted snapshot replaced the log before it: any member could wipe a document
    /// for every late joiner. The kind is gone; the relay's own snapshot is another frame.
    #[test]
    fn a_client_snapshot_is_refused_with_what_replaced_it() {
        let mut bytes = Frame::stamped(
            Stamp {
                sender: 3,
                step: 4,
                pattern: 7,
            },
            Body::Update {
                doc: "*".into(),
                update: vec![0, 0],
            },
        )
        .encode();
        bytes[1] = RETIRED_CLIENT_SNAPSHOT;
        let refused = Frame::decode(&bytes).unwrap_err();
        assert_eq!(refused.reason(), Reason::Malformed);
        assert!(
            refused.to_string().contains("the relay compacts"),
            "{refused}"
        );
    }

    #[test]
    fn durability_and_recipients_are_decided_by_the_body() {
        let durable: Vec<Kind> = samples()
            .iter()
            .filter_map(|f| match f {
                Frame::Stamped(s) if s.body.is_durable() => Some(s.body.kind()),
                _ => None,
            })
            .collect();
        assert_eq!(durable, [Kind::Data, Kind::Update]);
        let to = |to| Body::SyncRequest {
            doc: "*".into(),
            state_vector: vec![],
            to,
        };
        assert_eq!(to(4).recipient(), Some(4));
        assert_eq!(to(0).recipient(), None);
    }

    #[test]
    fn header_errors_name_what_is_wrong() {
        assert_eq!(Frame::decode(&[]), Err(DecodeError::Truncated("version")));
        assert_eq!(
            Frame::decode(&[1, 1, 0]),
            Err(DecodeError::UnknownVersion(1))
        );
        assert_eq!(
            Frame::decode(&[2, 0x7f, 0]),
            Err(DecodeError::UnknownKind(0x7f))
        );
        assert_eq!(
            Frame::decode(&[2, 6, 1, 0]),
            Err(DecodeError::SealedUnsupported)
        );
        assert_eq!(
            Frame::decode(&[2, 6, 4, 0]),
            Err(DecodeError::ReservedFlags(4))
        );
        assert_eq!(
            Frame::decode(&[2, 6, 0, 0, 0, 0]),
            Err(DecodeError::TrailingBytes(1))
        );
    }

    #[test]
    fn varints_over_64_bits_are_refused() {
        let mut bytes = vec![2, 6, 0];
        bytes.extend_from_slice(&[0xff; 9]);
        bytes.push(0x02);
        assert_eq!(
            Frame::decode(&bytes),
            Err(DecodeError::VarintOverflow("step"))
        );
        let mut max = vec![2, 6, 0];
        max.extend_from_slice(&[0xff; 9]);
        max.extend_from_slice(&[0x01, 0x05]);
        assert_eq!(
            Frame::decode(&max),
            Err(DecodeError::Unsafe {
                field: "step",
                value: u64::MAX
            })
        );
    }

    /// A step above 2^53 - 1 is malformed wherever it appears: JS would round it, and a store
    /// column could not hold the larger ones (a frame at step 2^63 + 4 once failed a whole batch
    /// of other rooms' writes).
    #[test]
    fn integers_above_two_to_the_53_are_refused() {
        let safe = crate::pattern::MAX_SAFE_INTEGER;
        let frame = |step| {
            Frame::stamped(
                Stamp {
                    sender: 3,
                    step,
                    pattern: 7,
                },
                Body::Data {
                    data: Json::parse("1").unwrap(),
                },
            )
        };
        assert!(Frame::decode(&frame(safe).encode()).is_ok());
        for step in [safe + 1, (1 << 63) + 4, u64::MAX] {
            let refused = Frame::decode(&frame(step).encode()).unwrap_err();
            assert_eq!(
                refused,
                DecodeError::Unsafe {
                    field: "step",
                    value: step
                }
            );
            assert_eq!(refused.reason(), Reason::Malformed);
        }
    }

    #[test]
    fn room_settings_out_of_range_are_refused() {
        let join = |max_future, stale_window| Frame::Join {
            room: "r".into(),
            name: "n".into(),
            since: 0,
            log: 0,
            resume: None,
            config: Some(RoomConfig {
                max_future,
                stale_window,
                ..RoomConfig::default()
            }),
            floor: false,
        };
        assert!(Frame::decode(&join(1_000_000, Some(1_000_000)).encode()).is_ok());
        for (max_future, stale_window) in [
            (0, None),
            (1_000_001, None),
            (crate::pattern::MAX_SAFE_INTEGER, None),
            (1_000, Some(0)),
            (1_000, Some(1_000_001)),
        ] {
            let refused = Frame::decode(&join(max_future, stale_window).encode()).unwrap_err();
            assert!(
                matches!(refused, DecodeError::InvalidConfig(_)),
                "{max_future} {stale_window:?}: {refused}"
            );
        }
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
            log: 0,
            resume: None,
            config: None,
            floor: false,
        };
        assert!(matches!(
            Frame::decode(&join.encode()),
            Err(DecodeError::TooLarge { field: "room", .. })
        ));
        let empty_room = Frame::Join {
            room: String::new(),
            name: String::new(),
            since: 0,
            log: 0,
            resume: None,
            config: None,
            floor: false,
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
            limits: RelayLimits::default(),
            high: 0,
            log: 0,
            peers: vec![],
            floor: None,
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
        let mut bytes = vec![2, Kind::Data as u8, 0, 1, 1, 7, 3];
        bytes.extend_from_slice(b"{x}");
        assert!(matches!(
            Frame::decode(&bytes),
            Err(DecodeError::InvalidJson(_))
        ));
        let mut bytes = vec![2, Kind::Data as u8, 0, 1, 1, 7, 2];
        bytes.extend_from_slice(&[0xc3, 0x28]);
        assert_eq!(Frame::decode(&bytes), Err(DecodeError::InvalidUtf8("data")));
    }

    #[test]
    fn an_unusable_room_config_is_refused() {
        let join = Frame::Join {
            room: "r".into(),
            name: String::new(),
            since: 0,
            log: 0,
            resume: None,
            config: Some(RoomConfig {
                pattern: PatternParams {
                    reset_interval: 0,
                    ..PatternParams::default()
                },
                ..RoomConfig::default()
            }),
            floor: false,
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
}
