//! The room: the relay's side of the protocol as a state machine, with no IO.
//!
//! A [`RoomCore`] admits members, reads their frames (putting parts back together), applies the
//! rate limits and the validator, keeps the room's document, hands durable messages to the store,
//! and, once the store says a message is durable, acknowledges it to its sender and fans it out.
//! The driver (the relay's room task, or the simulation) feeds it inputs with the time in
//! milliseconds and carries out its [`Output`]s in order: send frames to members, append to the
//! store, reserve node ids, close sockets.
//!
//! Rules the room keeps, whatever a member sends:
//!
//! - every frame is checked before it moves anything: a frame that claims a log position (only
//!   the relay sets one) is refused before the validator sees it, and a message refused for any
//!   reason leaves the room step, the sender's last step and the document as they were;
//! - a connection's frames are taken in order: after the room refuses one (for any reason but
//!   `replay`), it refuses every later stamped frame of that connection as `outOfOrder` until
//!   the client sends a fence, which the room echoes. So the stored messages of a node are always
//!   a prefix of what it sent, and a `replay` answer to a message sent again means "stored" (a
//!   message sent again before its answer came gets that answer; in a shared room, a message
//!   stored and then refused in the log's order gets the refusal);
//! - a message is acknowledged, with its own step, only once it is durable (and, in a shared
//!   room, judged in its turn); appends finish in the order they were handed out, and that order
//!   is the log's;
//! - checkpoints and the sync exchange are validated and forwarded, never stored;
//! - the room step moves by one for each message everyone receives whose step is above it,
//!   whatever that step (see [`crate::clock`]): a member cannot drag it forward.
//!
//! **The document.** The room applies every update to its own copy of the document before it
//! stores it, and refuses as `malformed` one that does not apply or does not integrate whole: an
//! update that would break a replica, or leave replicas waiting, never reaches the log or a
//! member. (A shared room judges updates as it reads the log back: see [`RoomCore::share`].)
//! When the updates logged since the last compaction
//! pass [`RoomLimits::compact_bytes`] (and the size of the last snapshot) or
//! [`RoomLimits::compact_updates`], the room appends a [`Frame::Snapshot`] of its document, and
//! the store drops the document entries before it: late joiners get the snapshot and the tail.
//! Members cannot post snapshots.
//!
//! **Nodes.** A node's state (its resume token, last step and rate buckets) lives in the room
//! while it is a member, while its appends are in flight, and until its buckets have filled up
//! again after it left, so that reconnecting never resets a rate limit; then only the store
//! keeps it, and a join that presents the node's token brings the store's record back
//! ([`JoinRequest::stored`]). The store keeps the node's last *stored* step; the room hands the
//! driver its last step of all ([`Output::Released`]), which the driver keeps while it runs and
//! gives back with the record ([`JoinRequest::released`]), so that the node's welcome can carry
//! a floor. Node ids come from blocks the store reserves durably, so no id is ever handed out
//! twice, whatever the interleaving of joins, leaves and room reloads.

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;

use crate::doc::{decode_update, DocError, SharedDoc};
use crate::pace::TokenBucket;
use crate::pattern::Step;
use crate::store::{Appended, Followed, Logged, NodeRecord, RoomRecord, StoreError};
use crate::validate::{Counters, Origin, Validator, ValidatorConfig, Verdict};
use crate::wire::part::{self, Reassembler};
use crate::wire::{
    close, peek_stamp, with_position, Body, Frame, Kind, Limits, NodeId, Peer, Positioned, Reason,
    RelayLimits, ResumeToken, RoomConfig, Stamp, Stamped, WHOLE_DOC,
};

/// A connection, as the driver names it. Each socket gets its own; a node that reconnects comes
/// back on a new one.
pub type ConnId = u64;

/// Consecutive frames that do not decode after which a connection is closed.
pub const MAX_MALFORMED: u32 = 16;

/// How many node ids the room asks the store to reserve at a time.
pub const NODE_BLOCK: u64 = 1_024;

/// While the parts of a member's message come in, the room sends it a heartbeat at most this
/// often (ms), so that the member hears its connection is alive (see [`RoomCore::receive`]).
pub const PARTS_BEAT: u64 = 1_000;

/// What the relay enforces in a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoomLimits {
    /// Decoder limits: frame, message and name sizes.
    pub limits: Limits,
    /// Frames a node may send per second, on average.
    pub rate: u64,
    /// Frames a node may send at once, above the average.
    pub burst: u64,
    /// The most members at once.
    pub max_members: usize,
    /// The most members at once whose access tokens name one user: one token, a read-only one
    /// too, cannot take every place of a room.
    pub max_members_per_user: usize,
    /// Bytes of messages and presences a node may send per second, on average.
    pub bandwidth: u64,
    /// Bytes of messages and presences a node may send at once, above the average.
    pub bandwidth_burst: u64,
    /// The room compacts its document once the updates logged since the last compaction hold
    /// this many bytes (and at least as many as the last snapshot)...
    pub compact_bytes: u64,
    /// ... or once there are this many of them.
    pub compact_updates: u64,
    /// The most bytes a room's log may hold; a message that would take it past this is refused
    /// as `full`, and stored data past three quarters of it (the rest is kept for document
    /// updates, which compaction shrinks).
    pub max_room_bytes: u64,
    /// Milliseconds the room keeps a node that left in memory, so a reconnect resumes it even
    /// when it never wrote (a node that wrote is in the store for good; one that never did
    /// has nothing to protect, and after this it gets a new id).
    pub resume_grace: u64,
    /// Milliseconds a member may stay silent (no frame at all: clients send a heartbeat every
    /// 15 s, though a hidden tab's timers may fire only once a minute) before the room takes its connection for dead and closes it
    /// ([`close::SILENT`]). 0: never.
    pub idle_timeout: u64,
}

impl Default for RoomLimits {
    fn default() -> Self {
        let limits = Limits::default();
        Self {
            limits,
            rate: 200,
            burst: 200,
            max_members: 256,
            max_members_per_user: 32,
            bandwidth: 4 << 20,
            bandwidth_burst: limits.max_message as u64,
            compact_bytes: 8 << 20,
            compact_updates: 10_000,
            max_room_bytes: 1 << 30,
            resume_grace: 60_000,
            idle_timeout: 90_000,
        }
    }
}

impl RoomLimits {
    /// What the welcome announces.
    pub fn announced(&self) -> RelayLimits {
        RelayLimits {
            max_frame: self.limits.max_frame as u64,
            max_message: self.limits.max_message as u64,
            rate: self.rate,
            burst: self.burst,
            bandwidth: self.bandwidth,
            bandwidth_burst: self.bandwidth_burst,
        }
    }
}

/// A connection's reader: it puts parts back together and decodes, before the room sees a
/// frame. It belongs to one connection and holds nothing of the room, so a driver runs it where
/// the connection's bytes arrive (the relay, in each connection's own task, beside the others)
/// and hands the room what it read.
#[derive(Debug)]
pub struct Reader {
    limits: Limits,
    reassembler: Reassembler,
    /// The step of the message in progress, from its first part's stamp (0: none read).
    step: Step,
}

/// What a [`Reader`] made of one binary message.
#[derive(Debug, Clone, PartialEq)]
pub enum Read {
    /// A part of a message still in progress: the room hears that the connection is alive,
    /// and now and then tells the member that it is receiving ([`PARTS_BEAT`]).
    Pending,
    /// Anything else that shows the connection is alive (the driver wrote to it, or read a
    /// heartbeat it will not answer): nothing for the room but that.
    Alive,
    /// A whole frame, with the bytes it came in (the whole message, for parts) and its cost in
    /// frames for the rate limit.
    Frame {
        /// The frame, and the log position its header claimed, if any.
        frame: Positioned,
        /// Its bytes.
        bytes: Bytes,
        /// Frames it took on the wire.
        cost: u64,
    },
    /// Bytes that are not a frame (or parts out of sequence), with the step they claimed.
    Refused {
        /// The step of the frame, if its stamp could be read.
        step: Step,
        /// `malformed` or `tooLarge`.
        reason: Reason,
        /// What was wrong.
        detail: String,
    },
    /// A frame the driver refused for a limit outside the room (the rate of the connection's
    /// address): refused as `rateLimited`, like one over the node's own rate.
    Throttled {
        /// The step of the frame, if its stamp could be read.
        step: Step,
        /// Which limit.
        detail: String,
    },
    /// A fence over a limit outside the room (see [`Read::Throttled`]): one that ends a gap is
    /// taken all the same (a fence must never be what keeps a refused message from being sent
    /// again); any other is refused as `rateLimited`.
    ThrottledFence {
        /// The fence's step.
        step: Step,
        /// Which limit.
        detail: String,
    },
}

impl Reader {
    /// A reader for a room with these limits.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            reassembler: Reassembler::new(),
            step: 0,
        }
    }

    /// Bytes allocated for the message in progress, whose parts are still arriving.
    pub fn held(&self) -> usize {
        self.reassembler.allocated()
    }

    /// Whether a message is in progress (not one refused, whose parts are dropped as they come).
    pub fn assembling(&self) -> bool {
        self.reassembler.in_progress()
    }

    /// Drops the message in progress, and the rest of its parts as they come, for a limit of
    /// the driver's (the relay's memory for such messages); returns its step, for the refusal.
    pub fn abandon(&mut self) -> Step {
        self.reassembler.abandon();
        std::mem::take(&mut self.step)
    }

    /// Reads one binary message.
    pub fn read(&mut self, bytes: Bytes) -> Read {
        let limits = self.limits;
        let refused = |bytes: &[u8], e: crate::wire::DecodeError| Read::Refused {
            step: peek_stamp(bytes).map_or(0, |(_, s)| s.step),
            reason: e.reason(),
            detail: e.to_string(),
        };
        match Frame::decode_positioned(&bytes, &limits) {
            Ok(Positioned {
                frame:
                    Frame::Part {
                        total,
                        offset,
                        bytes: piece,
                    },
                position: None,
            }) => {
                let first = offset == 0;
                if first {
                    self.step = peek_stamp(&piece).map_or(0, |(_, s)| s.step);
                }
                let step = if first { self.step } else { 0 };
                match self
                    .reassembler
                    .push(total, offset, piece, limits.max_message)
                {
                    Ok(None) => Read::Pending,
                    Ok(Some(whole)) => {
                        let cost = part::count(whole.len(), limits.max_frame) as u64;
                        let whole = Bytes::from(whole);
                        match Frame::decode_positioned(&whole, &limits.for_message()) {
                            Ok(frame) => Read::Frame {
                                frame,
                                bytes: whole,
                                cost,
                            },
                            Err(e) => refused(&whole, e),
                        }
                    }
                    Err(e) => Read::Refused {
                        step,
                        reason: e.reason(),
                        detail: e.to_string(),
                    },
                }
            }
            Ok(frame) => Read::Frame {
                frame,
                bytes,
                cost: 1,
            },
            Err(e) => refused(&bytes, e),
        }
    }
}

/// A join the room refuses, with the close code and reason for the socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinRefused {
    /// The close code.
    pub code: u16,
    /// Why.
    pub reason: String,
}

/// What a joining client asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinRequest {
    /// Its display name.
    pub name: String,
    /// The last log position it received (0: none)...
    pub since: u64,
    /// ... in this log (0: none).
    pub log: u64,
    /// The token of its earlier welcome, to keep its node id.
    pub resume: Option<ResumeToken>,
    /// What the store knows of the node `resume` names, looked up by the driver when
    /// [`RoomCore::knows`] said the room does not know the token.
    pub stored: Option<NodeRecord>,
    /// What the member's access token lets it do (the driver checked the token).
    pub access: Access,
    /// It asked for the welcome's `floor` (see [`Frame::Welcome`]).
    pub floor: bool,
    /// What this relay kept of the node `resume` names when a room let it go
    /// ([`Output::Released`]), taken by the driver with the store's record.
    pub released: Option<Release>,
}

/// A node a room let go, with the last step it accepted from it: every step the node stamped
/// and anyone received, stored or not (a store keeps only the stored ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Release {
    /// The node.
    pub node: NodeId,
    /// Its resume token.
    pub token: ResumeToken,
    /// The user its access token named (0: none): the release is that user's only.
    pub user: u64,
    /// Its last accepted step.
    pub step: Step,
}

/// What a member may do, from its access token ([`Access::OPEN`] on a relay without tokens).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    /// It may write. Without it, every stamped frame but a sync request (which writes nothing
    /// and reaches one peer) is refused as [`Reason::Forbidden`]: never stored, never passed on.
    pub write: bool,
    /// Its display name comes from its token: renames are refused as [`Reason::Forbidden`].
    pub fixed_name: bool,
    /// Who the token names, as a hash of its user (0: no one, a relay without tokens): the
    /// members of one user hold at most [`RoomLimits::max_members_per_user`] of a room's places.
    pub user: u64,
}

impl Access {
    /// Everything: a relay without tokens.
    pub const OPEN: Access = Access {
        write: true,
        fixed_name: false,
        user: 0,
    };
}

/// A member admitted: what its connection sends before the live traffic.
#[derive(Debug, Clone)]
pub struct Joined {
    /// The member's node id.
    pub node: NodeId,
    /// The welcome frame, to send first.
    pub welcome: Bytes,
    /// Replay the log after this position (the join's `since`; 0 when `since` counts in another
    /// log, or beyond this one: the client gets the whole log)...
    pub from: u64,
    /// ... up to and including this one, then send `caught_up`; the live traffic queued
    /// meanwhile follows.
    pub until: u64,
    /// The caught-up frame.
    pub caught_up: Bytes,
    /// The latest presence frame of each other member present, to send right after the
    /// welcome: a late joiner has everyone's presence before the catch-up.
    pub presences: Vec<Bytes>,
    /// The positions in the catch-up of updates the room refused after the store took them (a
    /// shared room's, judged in the log's order, or any met at load; see [`Joined::replays`]),
    /// in order.
    pub refused: Vec<u64>,
}

impl Joined {
    /// Whether the catch-up sends this entry of the log: not the member's own messages (it has
    /// them), but for a catch-up from the start of the log (a member that set aside its
    /// document, one that diverged, has them no more: it takes each of its own as the
    /// acknowledgement of what it sent); and not an update the room refused when its document
    /// took it in (a shared room judges updates in the log's order, after the store took them;
    /// such an update would leave every replica that took it waiting for clocks no one wrote).
    pub fn replays(&self, logged: &Logged) -> bool {
        (logged.sender != self.node || self.from == 0)
            && self.refused.binary_search(&logged.position).is_err()
    }
}

/// A durable message for the store.
#[derive(Debug, Clone, PartialEq)]
pub struct Append {
    /// The sender (0: the relay's own snapshot).
    pub sender: NodeId,
    /// The sender's resume token: the store keeps the sender's record (token, last step, when it
    /// was last seen) with its messages.
    pub token: Option<ResumeToken>,
    /// The user the sender's access token names (0: none): the store's record of the sender
    /// keeps it, and resumes the node for that user only.
    pub user: u64,
    /// Its step.
    pub step: Step,
    /// The room's step with this message.
    pub high: Step,
    /// The document of an update or snapshot.
    pub doc: Option<String>,
    /// Whether it is the relay's snapshot of `doc`, after which the store drops the older
    /// entries of `doc` (of every document for [`WHOLE_DOC`]).
    pub snapshot: bool,
    /// For a snapshot: the last log position it holds. On one relay that is every position
    /// before it; in a shared room other relays may have appended after it, and the store drops
    /// only the document entries up to this one.
    pub covers: u64,
    /// The frame without a position: the store puts the position it assigns in the header of
    /// what it logs.
    pub bytes: Bytes,
}

/// What the driver must do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Send a frame to one member.
    Send {
        /// The member's connection.
        to: ConnId,
        /// The frame.
        bytes: Bytes,
    },
    /// Send a frame to every member but `except`.
    Fanout {
        /// The connection that must not get it (the sender's), if any.
        except: Option<ConnId>,
        /// The frame.
        bytes: Bytes,
    },
    /// The member has left the room: close its socket with this code and reason.
    Close {
        /// The member's connection.
        conn: ConnId,
        /// The close code.
        code: u16,
        /// The reason.
        reason: String,
    },
    /// A shared room's frame for the members on other relays (see [`RoomCore::share`]): pass it
    /// on through the store, in order with the appends, and record `roster` in its list of
    /// members. Another relay hands it to its room with [`RoomCore::relayed`].
    Publish {
        /// For one node only, or (`None`) for every member.
        to: Option<NodeId>,
        /// It waits, on every relay, for the log up to this position.
        after: u64,
        /// The frame.
        bytes: Bytes,
        /// Who joined or left, if that is what the frame says.
        roster: Option<Roster>,
        /// The step of a stamped frame every member receives (0 otherwise): the store moves the
        /// room step with it, as with an append.
        step: Step,
    },
    /// Reserve `count` more node ids in the store; answer with [`RoomCore::reserved`].
    Reserve {
        /// How many.
        count: u64,
    },
    /// Append a message to the store; answer with [`RoomCore::appended`], in order.
    Append(Append),
    /// The room let a node go. Keep this for as long as the relay runs, and hand it back with
    /// [`JoinRequest::released`] when the node's token comes back: its welcome then carries a
    /// floor, and its client's clock goes back to the room's (a client restored from storage
    /// starts up to a hundred steps ahead, and without a floor each reopening would take it
    /// further, until the room refused all it sent as `futureStep`). A relay that stopped
    /// has no such record: what the node stamped after its last stored message is unknown,
    /// and its welcome carries no floor. A shared room never lets go this way (another relay
    /// may have taken steps of the node since).
    Released(Release),
    /// The room cannot go on (its store failed, or its document may hold what it refused):
    /// close every member with this reason and drop the room; the next join loads it again from
    /// the store.
    Stop {
        /// Why.
        reason: String,
        /// The node whose message stopped the room, if one did (its update walked too far to
        /// apply, or made applying it panic, or the room panicked on its message): every stop
        /// closes every member, so a driver keeps out for a while one that stops a room again
        /// and again. Not an update over the driver's time budget ([`RoomCore::overran`]),
        /// which a loaded machine can make of an honest one.
        by: Option<NodeId>,
    },
}

/// A change of who is in a shared room, for the store's list of members: so that a relay that
/// opens the room later knows the members of the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Roster {
    /// The node is a member on this relay, under this name (again, after a rename).
    Joined(Peer),
    /// The node left this relay.
    Left(NodeId),
    /// The node's latest presence, kept for relays that open the room later: the publication's
    /// frame (`set`), or none (it cleared its presence with `null`).
    Presence {
        /// The member.
        node: NodeId,
        /// Whether it has one.
        set: bool,
    },
}

/// A frame that another relay of a shared room passed on (see [`RoomCore::relayed`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relayed {
    /// Which relay, as the store names it.
    pub relay: u64,
    /// Its place in the store's order: after the log entry at this position, before the next
    /// (the store sets it as it takes the publication; it is never below the position the
    /// publishing relay's own appends before it reached).
    pub after: u64,
    /// For one node only, or (`None`) for every member.
    pub to: Option<NodeId>,
    /// The room's step with it, as the store moved it.
    pub high: Step,
    /// The frame; empty for one of the reading relay's own publications (its members had it;
    /// only its room step matters).
    pub bytes: Bytes,
}

/// A member of a shared room on another relay.
#[derive(Debug, Clone)]
struct Remote {
    relay: u64,
    name: String,
    presence: Option<Bytes>,
}

impl Remote {
    /// A member on `relay`, with no presence yet.
    fn new(relay: u64, name: String) -> Self {
        Self {
            relay,
            name,
            presence: None,
        }
    }
}

/// A connection in the room.
struct Member {
    node: NodeId,
    name: String,
    access: Access,
    /// The member's latest presence frame (in memory only; it goes with the member).
    presence: Option<Bytes>,
    /// The step of the refusal that opened a gap, until the client's fence.
    gap: Option<Step>,
    /// When the gap opened, and the stamped frames that came in it more than a second later
    /// (a client that heard the refusal has stopped by then).
    gap_at: u64,
    ignored: u64,
    malformed: u32,
    /// Refusals for the rate in the current second, and when that second began.
    limited: u64,
    limited_since: u64,
    /// When its last frame came in.
    heard: u64,
    /// When the room last sent it a heartbeat while the parts of a message came in.
    beat: u64,
}

/// A node the room holds the state of.
struct Node {
    token: ResumeToken,
    /// The user its access token names (0 without tokens): only that user resumes it.
    user: u64,
    /// Its connection while it is a member.
    conn: Option<ConnId>,
    /// Its appends not answered yet.
    in_flight: u32,
    /// Frames.
    rate: TokenBucket,
    /// Bytes of durable messages and signals.
    bandwidth: TokenBucket,
    /// When it left, plus the resume grace: the room keeps it at least until then.
    kept_until: u64,
    /// The store may keep a record of it: it came from one, or the room handed the store a
    /// message of it. Only such a node can come back as itself once the room lets it go.
    recorded: bool,
}

/// What an entry of the pipeline is waiting for.
enum Waits {
    /// A message of `node`, `len` bytes, for the store.
    Append { node: NodeId, len: u64 },
    /// The room's snapshot, `len` bytes, for the store.
    Compaction { len: u64 },
    /// A message only forwarded, to `to` (`None`: everyone), behind the appends before it.
    Forward { to: Option<NodeId> },
}

/// A message on its way out. Messages leave in the order they were accepted: a checkpoint or a
/// sync answer waits behind every earlier message the store has not made durable yet, or
/// receivers would see its step before theirs.
struct Pending {
    stamp: Stamp,
    bytes: Bytes,
    waits: Waits,
}

/// A message only forwarded, or an acknowledgement, held until the room's log has been fanned
/// out to `after` (a room whose log is shared: see [`RoomCore::share`]).
struct Held {
    after: u64,
    sender: NodeId,
    /// For an acknowledgement: `None`, and `ack` is set.
    to: Option<NodeId>,
    /// An acknowledgement of this step, to `sender`'s connection.
    ack: Option<Step>,
    bytes: Bytes,
    /// For the answer to an update (its acknowledgement, or a `replay`): the update's frame.
    /// Released past entries the log skipped, the answer waits to be judged (see
    /// `RoomCore::unjudged`).
    update: Option<Bytes>,
}

/// `frame` if it is a stamped update (the frame an answer held for its turn may have to be
/// judged by: see `Held::update`).
fn if_update(frame: &Bytes) -> Option<Bytes> {
    peek_stamp(frame)
        .is_some_and(|(kind, _)| kind == Kind::Update)
        .then(|| frame.clone())
}

/// Whether `bytes` are a presence frame (by its kind byte: it is not decoded).
fn is_presence(bytes: &[u8]) -> bool {
    bytes.get(1).copied().and_then(Kind::from_byte) == Some(Kind::Presence)
}

/// Whether `bytes` are a frame that says who is a member (`peerJoined`, `peerLeft`,
/// `peerRenamed`): frames of a few dozen bytes, so larger ones are not decoded.
fn is_membership(bytes: &[u8]) -> bool {
    bytes.len() <= 512
        && matches!(
            Frame::decode(bytes),
            Ok(Frame::PeerJoined { .. } | Frame::PeerLeft { .. } | Frame::PeerRenamed { .. })
        )
}

/// Applies a member's update of `doc` to the room's document. A whole document (`*`, given back
/// after the relay lost the room's history) is not compared with the clocks the document holds:
/// every tab gives back all it shows, and where one tab's replica differs from the room's at
/// some clocks (a tab that was written over under its own client id), refusing its document
/// whole would lose every edit only it held; the room keeps what it has at those clocks, and
/// takes the rest.
fn apply_member(room: &SharedDoc, doc: &str, update: &[u8]) -> Result<(), DocError> {
    if doc == WHOLE_DOC {
        room.apply_given_back(update)
    } else {
        room.apply_member_update(update)
    }
}

/// [`apply_member`] for an update a member sends now, or a shared room's log holds next:
/// refused too if applying it would cost more than [`crate::doc::MAX_APPLY_COST`]. A room's own
/// log, loaded again, is applied without the bound: what it holds was taken. A shared room's
/// relays judge the cost again in the log's order (each has the same document there, and
/// judges it alike): a relay's copy of the document lags the log when an update comes in, so
/// an update anchored on items an update just before it placed counted nothing then.
fn admit_member(room: &SharedDoc, doc: &str, update: &[u8]) -> Result<(), DocError> {
    if doc == WHOLE_DOC {
        room.admit_given_back(update)
    } else {
        room.admit_member_update(update)
    }
}

/// The reason a member's update the room's document did not take is refused with.
fn refusal_reason(error: &DocError) -> Reason {
    match error {
        DocError::TooCostly { .. } | DocError::Overran { .. } => Reason::TooLarge,
        _ => Reason::Malformed,
    }
}

/// Why the room's document did not take a member's update, for its refusal.
fn refusal_detail(error: DocError) -> String {
    match error {
        DocError::NotTaken(detail) => format!("the update was not taken: {detail}"),
        e @ (DocError::TooCostly { .. } | DocError::Overran { .. }) => e.to_string(),
        e => format!("the update does not apply to the room's document: {e}"),
    }
}

/// One room's state and decisions.
pub struct RoomCore {
    name: String,
    config: RoomConfig,
    limits: RoomLimits,
    validator: Validator,
    high: Step,
    /// The last position fanned out (or taken by a snapshot).
    published: u64,
    /// The identity of the room's log.
    log: u64,
    members: HashMap<ConnId, Member>,
    nodes: HashMap<NodeId, Node>,
    tokens: HashMap<ResumeToken, NodeId>,
    /// The emptiest frame and byte budgets of the nodes of each user (an access token's `sub`)
    /// that left, until they are full again: a new node of the user starts from them. Without
    /// it, a member that joined again without its resume token had full budgets each time.
    spent: HashMap<u64, (TokenBucket, TokenBucket)>,
    /// Nodes that left, with when their buckets are full again: then the room lets them go.
    departures: VecDeque<(NodeId, u64)>,
    /// The relay is stopping ([`RoomCore::close_down`]): nodes that leave are let go at once.
    closing: bool,
    /// Node ids `next_node..nodes_end` are reserved for this room.
    next_node: NodeId,
    /// Counts sync requests to everyone, to ask the writers in turn.
    next_answerer: usize,
    nodes_end: NodeId,
    /// A further block the store reserved, used when this one runs out.
    spare_nodes: Option<(NodeId, NodeId)>,
    reserving: bool,
    pending: VecDeque<Pending>,
    outputs: VecDeque<Output>,
    stopped: bool,
    doc: SharedDoc,
    /// Bytes and count of the updates accepted since the last compaction, and the size of the
    /// last snapshot.
    tail_bytes: u64,
    tail_updates: u64,
    snapshot_len: u64,
    compacting: bool,
    /// The room loaded without updates of its log that its document may have held part of
    /// ([`DocError::holds_part`]): it writes a snapshot at once, so that no later load meets
    /// them again (each costs a load the bound and a rebuild of the document).
    compact_now: bool,
    /// Bytes the log holds (as the store last said), and bytes of appends in flight.
    stored_bytes: u64,
    in_flight_bytes: u64,
    /// Stored entries of the document that did not apply when the room was loaded.
    load_failures: u64,
    /// The update the last call to `receive` applied to the document: its connection and step.
    applied: Option<(ConnId, Step)>,
    /// The frame the last call to `receive` took in, until its outputs are polled.
    receiving: Option<Receiving>,
    /// Whether other relays append to the room's log too (see [`RoomCore::share`]).
    shared: bool,
    /// The highest position the store gave one of this room's appends: in a shared room,
    /// forwarded messages accepted after that append wait until the log has been fanned out to
    /// there.
    awaited: u64,
    /// Those messages.
    held: VecDeque<Held>,
    /// Answers to updates that were waiting for positions the log then skipped (a snapshot
    /// dropped them before this relay read them): this relay never judged those updates, and
    /// the relays that did may have refused them. Each is judged once the document holds the
    /// snapshot: an update it holds was taken, and its answer goes; one it lacks becomes a
    /// refusal. (Sent as they were, the client would take a refused update for stored.)
    unjudged: Vec<Held>,
    /// The members of a shared room on other relays.
    remote: HashMap<NodeId, Remote>,
    /// The members that joined since a snapshot went by and may still be reading their
    /// catch-up, with how far it reads. The store drops what a snapshot covers as soon as it is
    /// durable, so a catch-up that reads on past that point misses it: those members get the
    /// snapshot.
    joined_since_snapshot: Vec<(ConnId, u64)>,
    /// Log entries of a shared room read but not fanned out yet: they wait for the publications
    /// of other relays that came before them.
    backlog: VecDeque<Followed>,
    /// Publications of other relays read but not passed on yet: they wait for the log entries
    /// before them.
    bus_backlog: VecDeque<Relayed>,
    /// How far the log may be fanned out before more publications are read.
    horizon: u64,
    /// The log position a shared room started from on this relay.
    opened_at: u64,
    /// A shared room's log skipped positions up to this one (document entries another relay's
    /// snapshot dropped before this relay read them): the members get snapshots until one holds
    /// that far.
    missed: u64,
    /// The updates of a shared room's log read while the document lacks entries the log
    /// skipped (`missed` past `doc_covers`: the snapshot that holds them was not read yet), in
    /// order, with their log entries: they are judged (see [`SharedDoc::apply_member_update`])
    /// once that snapshot is in. Their members got them unjudged.
    deferred: Vec<(Followed, String, Vec<u8>)>,
    /// The highest position a snapshot the document took ahead of its turn holds (see
    /// `snapshot_ahead`).
    doc_covers: u64,
    /// The position of the last snapshot `snapshot_ahead` took (or tried to).
    ahead_tried: u64,
    /// The log positions of the updates the room refused as its document took them in (an
    /// update of a shared room, judged in the log's order; a stored update that does not
    /// integrate, met at load), in order. The store still holds them until a snapshot drops
    /// them; no member's catch-up replays them ([`Joined::replays`]).
    refused: Vec<u64>,
    /// The refusals of updates judged in the log's order (or at load), by sender and step, with
    /// each update's position: a resend of one (its client did not hear the refusal: it had no
    /// connection here, or was on another relay) is refused, not answered `replay`. Dropped
    /// with the updates by a snapshot.
    owed: HashMap<(NodeId, Step), (u64, Reason, String)>,
    /// When the room next looks for members silent past the idle timeout.
    idle_check_at: u64,
    now: u64,
}

/// What [`RoomCore::panicked`] needs of the frame a `receive` was handling.
#[derive(Debug, Clone, Copy)]
struct Receiving {
    conn: ConnId,
    /// Its step, once its stamp was read.
    step: Option<Step>,
    /// How many outputs and pending messages there were before it.
    outputs: usize,
    pending: usize,
}

impl RoomCore {
    /// The room `name` as the store knows it, with its document: the document entries of its
    /// log in order (the last snapshot, then the updates after it; see
    /// [`crate::store::Store::read_document`]).
    pub fn new(
        name: String,
        record: RoomRecord,
        document: &[Logged],
        limits: RoomLimits,
        now: u64,
    ) -> Result<Self, crate::pattern::ConfigError> {
        Self::open(name, record, document, limits, now, false)
    }

    /// [`RoomCore::new`] for a room whose log other relays append to as well
    /// ([`RoomCore::share`]): the updates of its document are judged as every relay judges
    /// them in the log's order, what they cost included.
    pub fn new_shared(
        name: String,
        record: RoomRecord,
        document: &[Logged],
        limits: RoomLimits,
        now: u64,
    ) -> Result<Self, crate::pattern::ConfigError> {
        let mut room = Self::open(name, record, document, limits, now, true)?;
        room.share();
        Ok(room)
    }

    fn open(
        name: String,
        record: RoomRecord,
        document: &[Logged],
        limits: RoomLimits,
        now: u64,
        shared: bool,
    ) -> Result<Self, crate::pattern::ConfigError> {
        let config = record.config;
        let mut validator_config = ValidatorConfig::for_room(&config)?;
        // Only the nodes in the room's hands are tracked, and each is released (its last step
        // kept by the store) when the room lets it go: nothing is ever evicted.
        validator_config.max_senders = usize::MAX;
        let mut room = Self {
            name,
            config,
            limits,
            validator: Validator::new(validator_config),
            high: record.high,
            published: record.position,
            log: record.log,
            members: HashMap::new(),
            nodes: HashMap::new(),
            tokens: HashMap::new(),
            spent: HashMap::new(),
            departures: VecDeque::new(),
            closing: false,
            next_node: record.next_node,
            next_answerer: 0,
            nodes_end: record.nodes_end,
            spare_nodes: None,
            reserving: false,
            pending: VecDeque::new(),
            outputs: VecDeque::new(),
            stopped: false,
            doc: SharedDoc::with_client_id(0),
            tail_bytes: 0,
            tail_updates: 0,
            snapshot_len: 0,
            compacting: false,
            compact_now: false,
            stored_bytes: record.bytes,
            in_flight_bytes: 0,
            load_failures: 0,
            applied: None,
            receiving: None,
            shared,
            awaited: 0,
            held: VecDeque::new(),
            unjudged: Vec::new(),
            remote: HashMap::new(),
            missed: 0,
            deferred: Vec::new(),
            doc_covers: 0,
            ahead_tried: 0,
            refused: Vec::new(),
            owed: HashMap::new(),
            idle_check_at: 0,
            joined_since_snapshot: Vec::new(),
            backlog: VecDeque::new(),
            bus_backlog: VecDeque::new(),
            horizon: u64::MAX,
            opened_at: 0,
            now,
        };
        room.load(document);
        Ok(room)
    }

    /// The limits a frame read back from the room's log is decoded with: the store holds only
    /// what the room took, whole (a large message is one entry, not parts), so no size limit.
    fn log_limits(&self) -> Limits {
        Limits {
            max_frame: usize::MAX,
            max_message: usize::MAX,
            ..self.limits.limits
        }
    }

    fn load(&mut self, document: &[Logged]) {
        // The updates whose integration walked too far or panicked (see
        // `DocError::holds_part`): the document may have taken part of each, so it is built
        // again without them, until none is left.
        let mut partial = Vec::new();
        while let Some(refused) = self.load_once(document, &partial) {
            partial.push(refused);
            self.doc = SharedDoc::with_client_id(0);
            self.refused.clear();
            self.owed.clear();
            self.snapshot_len = 0;
            self.tail_bytes = 0;
            self.tail_updates = 0;
            self.load_failures = 0;
        }
        if !partial.is_empty() {
            self.compact_now = true;
            self.compact_if_due();
        }
    }

    /// Loads `document` into the room, leaving out the updates of `partial`; returns an update
    /// the document may hold part of ([`DocError::holds_part`]: its integration walked too far,
    /// or panicked), as its position, reason and detail.
    fn load_once(
        &mut self,
        document: &[Logged],
        partial: &[(u64, Reason, String)],
    ) -> Option<(u64, Reason, String)> {
        let limits = self.log_limits();
        // The snapshot first: in a shared room, updates logged after what it holds may come
        // before it in the log (another relay appended them while it was on its way), and they
        // build on what it holds. Only what the room's record counts: in a shared room the
        // document, read after the record, may hold later entries, which come when the room
        // follows the log, and are judged then, once.
        let mut updates = Vec::new();
        for logged in document {
            match Frame::decode_with(&logged.bytes, &limits) {
                Ok(Frame::Snapshot { state, .. }) => {
                    if logged.position <= self.published {
                        self.snapshot_len = logged.bytes.len() as u64;
                        self.tail_bytes = 0;
                        self.tail_updates = 0;
                    }
                    if self.doc.apply_stored(&state).is_err() {
                        self.load_failures += 1;
                    }
                }
                Ok(_) if logged.position > self.published => {}
                Ok(Frame::Stamped(Stamped {
                    stamp,
                    body: Body::Update { doc, update },
                })) => {
                    self.tail_bytes += logged.bytes.len() as u64;
                    self.tail_updates += 1;
                    updates.push((logged.position, stamp, doc, update));
                }
                _ => self.load_failures += 1,
            }
        }
        // Then each update, judged as when it came in (see `deliver_log`): a log written before
        // the relay checked updates this way, or a shared room's, may hold one that does not
        // integrate, and a shared room's one that costs too much. Left out, it is left out of
        // every catch-up too.
        for (position, stamp, doc, update) in updates {
            let judged = match partial.iter().find(|(at, ..)| *at == position) {
                Some((_, reason, detail)) => Err((false, *reason, detail.clone())),
                None => match self.shared {
                    true => admit_member(&self.doc, &doc, &update),
                    false => apply_member(&self.doc, &doc, &update),
                }
                .map_err(|error| {
                    let holds_part = error.holds_part();
                    let reason = refusal_reason(&error);
                    (holds_part, reason, refusal_detail(error))
                }),
            };
            if let Err((holds_part, reason, detail)) = judged {
                if holds_part {
                    return Some((position, reason, detail));
                }
                self.refused.push(position);
                self.owed
                    .insert((stamp.sender, stamp.step), (position, reason, detail));
            }
        }
        None
    }

    /// Makes this a room whose log other relays append to as well (a store several relays
    /// share). Then:
    ///
    /// - the store makes the checks that need the whole room's state (replay per sender, the
    ///   sender's identity, the room's step) with each append, and answers `replay` for a step
    ///   another relay stored first; this room's validator still checks everything first,
    ///   against the room step as this relay knows it (never ahead of the log's);
    /// - the room fans out its log as the driver reads it back from the store
    ///   ([`RoomCore::followed`]), its own appends included, so that every member of every relay
    ///   sees one order: the log's. An append's answer only acknowledges it to its sender, and
    ///   a message only forwarded waits until the log before it has been fanned out;
    /// - an update's form is checked when it comes in; whether it integrates (see
    ///   [`SharedDoc::apply_member_update`]) is judged in the log's order, as the room applies
    ///   it to its document, the same way on every relay: one that does not reaches no member
    ///   and no catch-up ([`Joined::replays`]), and its sender gets a refusal in place of its
    ///   acknowledgement (`malformed`, or `tooLarge` for one that costs too much to apply
    ///   there: the relay it came through judged that against a copy that may lag the log).
    ///
    /// Call it before the first join.
    pub fn share(&mut self) {
        self.shared = true;
        self.opened_at = self.published;
    }

    /// Whether the room's log is shared with other relays.
    pub fn is_shared(&self) -> bool {
        self.shared
    }

    /// What the driver read of a shared room in the store: new entries of its log (after
    /// [`RoomCore::published`], in order) and what the other relays published for it (in the
    /// order they published it). The two are merged back into the store's one order: each
    /// publication names the log position it came after ([`Relayed::after`]), and goes out after
    /// that entry and before the next. A log entry after the last publication read waits for the
    /// next read unless `bus_complete` says the read returned every publication there was.
    ///
    /// Each log entry is applied to the document, moves the room's step and its sender's last
    /// step, and goes to every member but its sender; a gap (entries a snapshot dropped) is
    /// passed over. Each publication goes to its members here; peers and presences of other
    /// relays are kept for late joiners.
    pub fn followed(&mut self, now: u64, log: &[Followed], bus: &[Relayed], bus_complete: bool) {
        self.tick(now);
        if self.stopped {
            return;
        }
        for entry in log {
            let last = self.backlog.back().map_or(self.published, |e| e.position);
            if entry.position > last {
                self.backlog.push_back(entry.clone());
            }
        }
        self.bus_backlog.extend(bus.iter().cloned());
        // The log may go past the last publication read only if none is left unread.
        self.horizon = match bus.last() {
            Some(last) if !bus_complete => last.after,
            _ if bus_complete => u64::MAX,
            _ => self.horizon,
        };
        self.pump_followed(now);
    }

    /// Fans out what was read of a shared room, in the store's order, as far as it may go.
    fn pump_followed(&mut self, now: u64) {
        loop {
            // Stopped on an entry (see `stop_partial`): its document is no longer the log's.
            if self.stopped {
                return;
            }
            self.snapshot_ahead();
            // One of this relay's appends goes out only once the store answered it, as on a
            // relay of its own: what it let wait behind the append goes out after it.
            let next_log = self
                .backlog
                .front()
                .filter(|e| !self.unanswered(e.sender, e.step))
                .map(|e| e.position);
            let next_bus = self.bus_backlog.front().map(|b| b.after);
            match (next_log, next_bus) {
                (Some(position), Some(after)) if position <= after => self.deliver_log(now),
                (_, Some(after)) if next_log.is_some() || after <= self.published => {
                    if let Some(publication) = self.bus_backlog.pop_front() {
                        self.deliver_publication(&publication);
                    }
                }
                (Some(position), None) if position <= self.horizon => self.deliver_log(now),
                _ => break,
            }
        }
        self.compact_if_due();
    }

    /// When the next entry read comes after positions the log skipped (a snapshot dropped them
    /// before this relay read them), the document lacks them until it has that snapshot, which
    /// comes later in the log. If it was read already, it goes into the document now, ahead
    /// of its turn: the updates before it are then judged as every other relay judged them.
    /// (If not, they are judged once it is in: see `deferred`.)
    fn snapshot_ahead(&mut self) {
        let Some(front) = self.backlog.front() else {
            return;
        };
        let skipped = front.position.saturating_sub(1);
        if skipped <= self.published || skipped <= self.doc_covers {
            return;
        }
        let Some(at) = self
            .backlog
            .iter()
            .position(|e| e.sender == 0 && e.covers >= skipped)
        else {
            return;
        };
        let snapshot = &self.backlog[at];
        let (covers, position) = (snapshot.covers, snapshot.position);
        // Not if it holds updates read before it dropped them (and judged them on the relay
        // that took it): judged here again, against it, they could be taken where they were
        // refused. Those are judged in their turn, and it in its.
        let holds_read = self.backlog.iter().take(at).any(|e| {
            e.position <= covers
                && peek_stamp(&e.bytes).is_some_and(|(kind, _)| kind == Kind::Update)
        });
        if holds_read || position == self.ahead_tried {
            return;
        }
        self.ahead_tried = position;
        let limits = self.log_limits();
        match Frame::decode_with(&self.backlog[at].bytes, &limits) {
            Ok(Frame::Snapshot { state, .. }) if self.doc.apply_stored(&state).is_ok() => {
                self.doc_covers = covers;
            }
            _ => self.load_failures += 1,
        }
    }

    /// Whether a message of `sender` at `step` is still to be acknowledged or refused: its
    /// append not answered yet, or, in a shared room, its acknowledgement held for its turn.
    fn answer_due(&self, sender: NodeId, step: Step) -> bool {
        self.unanswered(sender, step)
            || self
                .held
                .iter()
                .any(|held| held.sender == sender && held.ack == Some(step))
    }

    /// Whether a message of `sender` at `step` is one of this relay's appends not answered yet.
    fn unanswered(&self, sender: NodeId, step: Step) -> bool {
        sender != 0
            && self.pending.iter().any(|p| {
                matches!(p.waits, Waits::Append { .. })
                    && p.stamp.sender == sender
                    && p.stamp.step == step
            })
    }

    /// The next log entry read.
    fn deliver_log(&mut self, now: u64) {
        let limits = self.log_limits();
        {
            let Some(entry) = self.backlog.pop_front() else {
                return;
            };
            if entry.position <= self.published {
                return;
            }
            if entry.position > self.published + 1 {
                self.missed = entry.position - 1;
                // What waits for a position the log skipped goes before this entry; answers to
                // updates wait to be judged.
                let skipped = self.published + 1..entry.position;
                let (unjudged, held): (VecDeque<Held>, VecDeque<Held>) =
                    std::mem::take(&mut self.held)
                        .into_iter()
                        .partition(|held| held.update.is_some() && skipped.contains(&held.after));
                self.held = held;
                self.unjudged.extend(unjudged);
                self.release_held_below(entry.position);
            }
            // Whether the members may lack what a snapshot here holds.
            let skipped = self.missed;
            self.published = entry.position;
            self.high = self.high.max(entry.high);
            let len = entry.bytes.len() as u64;
            let mut refusal = None;
            match Frame::decode_with(&entry.bytes, &limits) {
                // Judged here, in the log's order, the same way on every relay: when it came
                // in, the document of the relay it came through may have lagged the log.
                Ok(Frame::Stamped(Stamped {
                    body: Body::Update { doc, update },
                    ..
                })) => {
                    self.tail_bytes += len;
                    self.tail_updates += 1;
                    if self.missed > self.doc_covers {
                        self.deferred.push((entry.clone(), doc, update));
                    } else if let Err(error) = admit_member(&self.doc, &doc, &update) {
                        refusal = Some(error);
                    }
                }
                Ok(Frame::Snapshot { state, .. }) => {
                    self.tail_bytes = 0;
                    self.tail_updates = 0;
                    self.snapshot_len = len;
                    if self.doc.apply_stored(&state).is_err() {
                        self.load_failures += 1;
                    }
                    // The store dropped the updates it holds, refused ones too.
                    self.refused.retain(|&position| position > entry.covers);
                    self.owed
                        .retain(|_, (position, ..)| *position > entry.covers);
                    self.deferred
                        .retain(|(deferred, ..)| deferred.position > entry.covers);
                    // The members hold everything it does, unless this relay skipped entries
                    // (then everyone gets snapshots until one holds them all) or they joined
                    // since (their catch-up, up to where the relay was, may have met entries a
                    // snapshot dropped: they get snapshots until one holds that far).
                    if self.missed <= entry.covers {
                        self.missed = 0;
                        self.judge_deferred();
                        if self.stopped {
                            // An update it judged left the document holding part of it.
                            return;
                        }
                        self.judge_unjudged();
                    }
                    if skipped == 0 {
                        let covers = entry.covers;
                        let joiners: Vec<ConnId> = self
                            .joined_since_snapshot
                            .iter()
                            .map(|&(conn, _)| conn)
                            .collect();
                        self.joined_since_snapshot
                            .retain(|&(_, until)| until > covers);
                        for conn in joiners {
                            if let Some(node) = self.members.get(&conn).map(|m| m.node) {
                                self.forward(0, Some(node), &entry.bytes);
                            }
                        }
                        self.release_held();
                        return;
                    }
                    self.joined_since_snapshot
                        .retain(|&(_, until)| until > entry.covers);
                }
                Ok(_) => {}
                Err(_) => self.load_failures += 1,
            }
            let from = match self.nodes.get(&entry.sender) {
                Some(node) => {
                    self.validator.restore(entry.sender, entry.step, now);
                    node.conn.unwrap_or(0)
                }
                None => 0,
            };
            match refusal {
                Some(error) => {
                    let partial = error.holds_part().then(|| error.to_string());
                    self.refuse_logged(&entry, error);
                    if let Some(why) = partial {
                        return self.stop_partial(entry.sender, &why);
                    }
                }
                None => self.forward(from, None, &entry.bytes),
            }
            self.release_held();
        }
    }

    /// The updates read while the document lacked entries the log skipped, now that a snapshot
    /// holds those: judged in order, as every other relay judged them. (Their members got
    /// them unjudged: no relay can tell sooner.)
    fn judge_deferred(&mut self) {
        for (entry, doc, update) in std::mem::take(&mut self.deferred) {
            if let Err(error) = admit_member(&self.doc, &doc, &update) {
                let partial = error.holds_part().then(|| error.to_string());
                self.refuse_logged(&entry, error);
                if let Some(why) = partial {
                    return self.stop_partial(entry.sender, &why);
                }
            }
        }
    }

    /// A shared room's document may hold part of an update of its log
    /// ([`DocError::holds_part`]: integration walked too far, or panicked): the room stops, and
    /// loads again from its log without it (every relay judges it in the log's order alike, at
    /// load too). `why` is the error.
    fn stop_partial(&mut self, by: NodeId, why: &str) {
        self.stop_by(
            Some(by),
            format!("an update of the room's log did not apply ({why}); the document is loaded again without it"),
        );
    }

    /// The answers of `unjudged`, now that the document holds the snapshot that dropped their
    /// updates' entries: sent if the document holds the update, a refusal in their place if
    /// not.
    fn judge_unjudged(&mut self) {
        let limits = self.log_limits();
        for held in std::mem::take(&mut self.unjudged) {
            let Some(conn) = self.nodes.get(&held.sender).and_then(|n| n.conn) else {
                continue;
            };
            let refused =
                held.update
                    .as_ref()
                    .and_then(|frame| match Frame::decode_with(frame, &limits) {
                        Ok(Frame::Stamped(stamped)) => self.refused_in_log(&stamped.body),
                        _ => None,
                    });
            match (refused, held.ack) {
                (Some((reason, why)), Some(step)) => self.refuse(conn, step, reason, why),
                _ => self.outputs.push_back(Output::Send {
                    to: conn,
                    bytes: held.bytes,
                }),
            }
        }
    }

    /// An update of a shared room's log that does not integrate into the room's document where
    /// the log puts it: it reaches no member, and its sender, if it is a member here, gets a
    /// refusal in place of its acknowledgement.
    fn refuse_logged(&mut self, entry: &Followed, error: DocError) {
        self.refused.push(entry.position);
        let reason = refusal_reason(&error);
        let detail = refusal_detail(error);
        // What was held for the entries before it goes first.
        self.release_held_below(entry.position);
        // Its answer held for its turn (an acknowledgement, or a `replay` to a resend another
        // relay stored first) becomes the refusal.
        let held = self
            .held
            .iter()
            .position(|held| held.sender == entry.sender && held.ack == Some(entry.step));
        if let Some(i) = held {
            self.held.remove(i);
        }
        // Should its client not hear it and send the update again (here after a reconnect, or
        // through another relay, which judged it too), it is refused then, not answered
        // `replay` as if stored.
        self.owed.insert(
            (entry.sender, entry.step),
            (entry.position, reason, detail.clone()),
        );
        // (Judged late, after the acknowledgement went out, its client shows an anomaly.)
        if let Some(conn) = self.nodes.get(&entry.sender).and_then(|n| n.conn) {
            self.refuse(conn, entry.step, reason, detail);
        }
    }

    /// Why a shared room's log refused an update sent again, which the validator takes for a
    /// replay, and the reason to refuse it with: the room's document, which holds every update
    /// the log kept, lacks some of it (`tooLarge` if it still costs too much to apply).
    /// The refusal itself (`owed`) goes once a snapshot drops its entry, and its client, which
    /// may not have heard it (its connection dropped), would otherwise take the `replay` for an
    /// acknowledgement. `None` for anything else, and while the document lacks
    /// entries (the log skipped them, or they failed to load): it cannot tell then.
    fn refused_in_log(&self, body: &Body) -> Option<(Reason, String)> {
        let Body::Update { update, .. } = body else {
            return None;
        };
        if !self.shared || self.missed > 0 || !self.deferred.is_empty() || self.load_failures > 0 {
            return None;
        }
        let why = self.doc.holds(update).err()?;
        // Refused for what applying it costs, it costs as much against the document now, which
        // holds what the log put before it: said so again, with the bound.
        if let Err(costly @ DocError::TooCostly { .. }) = self.doc.check_member_update(update) {
            return Some((
                Reason::TooLarge,
                format!("the update was not taken: the room's log refused it: {costly}"),
            ));
        }
        Some((
            Reason::Malformed,
            format!(
                "the update was not taken: the room's log refused it, and the room's document does not hold it ({why})"
            ),
        ))
    }

    /// Whether a message only forwarded must wait for the shared log first.
    fn waits_for_log(&self) -> bool {
        !self.held.is_empty() || self.awaited > self.published
    }

    /// Forwards what was held for the part of the log fanned out by now.
    fn release_held(&mut self) {
        self.release_held_below(self.published + 1);
    }

    /// Forwards what was held for positions below `position`.
    fn release_held_below(&mut self, position: u64) {
        while self.held.front().is_some_and(|held| held.after < position) {
            let Some(held) = self.held.pop_front() else {
                break;
            };
            let conn = self.nodes.get(&held.sender).and_then(|n| n.conn);
            if held.ack.is_some() {
                if let Some(to) = conn {
                    self.outputs.push_back(Output::Send {
                        to,
                        bytes: held.bytes,
                    });
                }
                continue;
            }
            self.forward(conn.unwrap_or(0), held.to, &held.bytes);
        }
    }

    /// Forwards a message now, or, in a shared room whose log is not fanned out as far as this
    /// room's appends before it, once it is.
    fn forward_in_turn(&mut self, sender: NodeId, to: Option<NodeId>, bytes: Bytes) {
        if self.shared && self.waits_for_log() {
            self.held.push_back(Held {
                after: self.awaited,
                sender,
                to,
                ack: None,
                bytes,
                update: None,
            });
            return;
        }
        let from = self.nodes.get(&sender).and_then(|n| n.conn).unwrap_or(0);
        self.forward(from, to, &bytes);
    }

    /// In a shared room, a frame for the members on the other relays.
    fn publish(&mut self, to: Option<NodeId>, after: u64, bytes: Bytes, roster: Option<Roster>) {
        self.publish_stamped(to, after, bytes, roster, 0);
    }

    /// [`RoomCore::publish`] for a stamped frame, whose step moves the room step in the store.
    fn publish_stamped(
        &mut self,
        to: Option<NodeId>,
        after: u64,
        bytes: Bytes,
        roster: Option<Roster>,
        step: Step,
    ) {
        if self.shared {
            self.outputs.push_back(Output::Publish {
                to,
                after,
                bytes,
                roster,
                step,
            });
        }
    }

    /// The members of a shared room on other relays, as the store lists them when the room
    /// opens on this relay: each with its relay. Call it before the first join.
    pub fn remote_members(&mut self, members: Vec<(u64, Peer)>) {
        for (relay, peer) in members {
            self.remote.insert(peer.node, Remote::new(relay, peer.name));
        }
    }

    /// The latest presences of the members on other relays, as the store keeps them when the
    /// room opens on this relay (or reads its members again): each a presence frame. A member
    /// on another relay has the one listed for it, or none; the members here hear each presence
    /// that changed (a re-read after a missed bus brings those it missed). Call it after
    /// [`RoomCore::remote_members`] (or [`RoomCore::resync_remote`]).
    pub fn remote_presences(&mut self, presences: Vec<Bytes>) {
        let limits = self.log_limits();
        let mut listed: HashMap<NodeId, Bytes> = HashMap::new();
        for bytes in presences {
            if let Ok(Frame::Presence { sender, data }) = Frame::decode_with(&bytes, &limits) {
                if data != crate::wire::Json::null() {
                    listed.insert(sender, bytes);
                }
            }
        }
        // A member here too (its client moved, its connection here not yet closed) speaks for
        // itself here.
        let here: std::collections::HashSet<NodeId> = self
            .remote
            .keys()
            .copied()
            .filter(|&node| self.is_member_here(node))
            .collect();
        let mut changed: Vec<(NodeId, Bytes)> = Vec::new();
        for (&node, remote) in self.remote.iter_mut() {
            let now = listed.remove(&node);
            if here.contains(&node) || remote.presence == now {
                continue;
            }
            let told = now.clone().unwrap_or_else(|| {
                let data = crate::wire::Json::null();
                Bytes::from(Frame::Presence { sender: node, data }.encode())
            });
            remote.presence = now;
            changed.push((node, told));
        }
        if self.members.is_empty() {
            return;
        }
        changed.sort_unstable_by_key(|(node, _)| *node);
        for (_, bytes) in changed {
            self.outputs.push_back(Output::Fanout {
                except: None,
                bytes,
            });
        }
    }

    /// Whether `node` is a member on this relay.
    fn is_member_here(&self, node: NodeId) -> bool {
        self.nodes.get(&node).is_some_and(|n| n.conn.is_some())
    }

    /// One publication of another relay, in its place in the store's order (one of this
    /// relay's own, with no frame, only moves the room step).
    fn deliver_publication(&mut self, entry: &Relayed) {
        self.high = self.high.max(entry.high);
        if entry.bytes.is_empty() {
            return;
        }
        let limits = self.log_limits();
        match Frame::decode_with(&entry.bytes, &limits) {
            Ok(Frame::PeerJoined { peer }) if self.is_member_here(peer.node) => {
                // Its client went to another relay while its connection here is still open: one
                // it gave up (gone silent), which this room closes in time. Noted, so that the
                // members here do not hear then that it left. (A `PeerLeft` of that relay, or
                // the node's return here, ends it.)
                self.remote
                    .insert(peer.node, Remote::new(entry.relay, peer.name));
                return;
            }
            Ok(Frame::PeerJoined { peer } | Frame::PeerRenamed { peer }) => {
                if self.is_member_here(peer.node) {
                    return;
                }
                // What the members here know already (the members listed when the room opened
                // here, or read again after missed publications) is not said twice.
                if self
                    .remote
                    .get(&peer.node)
                    .is_some_and(|r| r.relay == entry.relay && r.name == peer.name)
                {
                    return;
                }
                let remote = self
                    .remote
                    .entry(peer.node)
                    .or_insert(Remote::new(entry.relay, String::new()));
                remote.relay = entry.relay;
                remote.name = peer.name;
            }
            Ok(Frame::PeerLeft { node }) => {
                // Only the relay it was on says it left (it may have moved here).
                if self
                    .remote
                    .get(&node)
                    .is_none_or(|r| r.relay != entry.relay)
                {
                    return;
                }
                self.remote.remove(&node);
            }
            Ok(Frame::Presence { sender, data }) => {
                if let Some(remote) = self.remote.get_mut(&sender) {
                    remote.presence =
                        (data != crate::wire::Json::null()).then(|| entry.bytes.clone());
                }
            }
            Ok(_) => {}
            Err(_) => return,
        }
        // A stamped frame placed before the log this room started from: its members' catch-up
        // went past its place, so it would come after later messages of its sender. It is of
        // the past. (Peers and presences are not: they always go on.)
        if entry.after < self.opened_at && peek_stamp(&entry.bytes).is_some() {
            return;
        }
        // Its place has come (its sender's messages before it went out here already); what
        // this relay's own members wait for concerns other senders. A sync request to everyone
        // goes to one writer here (see `stamped`).
        let to = match peek_stamp(&entry.bytes) {
            Some((Kind::SyncRequest, _)) if entry.to.is_none() => match self.answerer(0) {
                Some(node) => Some(node),
                None => return,
            },
            _ => entry.to,
        };
        self.forward(0, to, &entry.bytes);
    }

    /// The members of a shared room on other relays as the store lists them now, after this
    /// relay missed publications of the others (it read them too late: they had gone from the
    /// store). The members here hear of the changes they missed: who joined, who left, who
    /// was renamed. A node with a connection here as well is noted as
    /// [`RoomCore::deliver_publication`] notes it, and the members here hear nothing of it.
    /// The listing holds what every publication read before it says of the members, so those
    /// still waiting for their turn (behind log entries not fanned out yet) say nothing more:
    /// a join whose leave went from the store unread would bring back a member that is gone.
    pub fn resync_remote(&mut self, members: Vec<(u64, Peer)>) {
        // What is read again supersedes what was read before it and waits for its turn:
        // joins, leaves, renames and presences.
        for publication in &mut self.bus_backlog {
            if is_membership(&publication.bytes) || is_presence(&publication.bytes) {
                publication.bytes = Bytes::new();
            }
        }
        let listed: std::collections::HashSet<NodeId> =
            members.iter().map(|(_, peer)| peer.node).collect();
        let (here, gone): (Vec<NodeId>, Vec<NodeId>) = self
            .remote
            .keys()
            .copied()
            .filter(|node| !listed.contains(node))
            .partition(|&node| self.is_member_here(node));
        for node in here {
            self.remote.remove(&node);
        }
        self.remotes_leave(gone);
        let mut members = members;
        members.sort_by_key(|(_, peer)| peer.node);
        for (relay, peer) in members {
            if self.is_member_here(peer.node) {
                self.remote.insert(peer.node, Remote::new(relay, peer.name));
                continue;
            }
            let told = match self.remote.get_mut(&peer.node) {
                Some(remote) => {
                    remote.relay = relay;
                    (remote.name != peer.name).then(|| {
                        remote.name.clone_from(&peer.name);
                        Frame::PeerRenamed { peer }
                    })
                }
                None => {
                    self.remote
                        .insert(peer.node, Remote::new(relay, peer.name.clone()));
                    Some(Frame::PeerJoined { peer })
                }
            };
            if let Some(frame) = told {
                self.outputs.push_back(Output::Fanout {
                    except: None,
                    bytes: Bytes::from(frame.encode()),
                });
            }
        }
    }

    /// Another relay of a shared room is gone: its members leave.
    pub fn relay_gone(&mut self, relay: u64) {
        let gone: Vec<NodeId> = self
            .remote
            .iter()
            .filter(|(_, r)| r.relay == relay)
            .map(|(&node, _)| node)
            .collect();
        self.remotes_leave(gone);
    }

    /// The shared store lost a publication of this room, and with it the order of what this
    /// relay passes on to the other relays' members: what they would miss is not known. The
    /// room stops, as on a failed append; its members reconnect, and every relay hears them
    /// again. (A room that only publishes, signals and presence, would otherwise never fail an
    /// append and never stop.)
    pub fn publication_lost(&mut self, error: &StoreError) {
        self.stop(format!("the store lost a publication: {error}"));
    }

    /// This relay's heartbeat lapsed (it stalled, or lost Redis, for longer than the heartbeat
    /// lasts): another relay may have taken it for dead, struck its members off the room's list
    /// and told its own members they left. Each member here is announced again, with its
    /// presence: the other relays' members hear it join (a relay that had not struck it says
    /// nothing twice), and the room's list holds it again for relays that open the room later.
    pub fn announce_members(&mut self) {
        // Not one another relay announced since: its client moved there, and its connection
        // here is one it gave up.
        let mut here: Vec<(NodeId, String, Option<Bytes>)> = self
            .members
            .values()
            .filter(|m| !self.remote.contains_key(&m.node))
            .map(|m| (m.node, m.name.clone(), m.presence.clone()))
            .collect();
        here.sort_unstable_by_key(|(node, ..)| *node);
        for (node, name, presence) in here {
            let peer = Peer { node, name };
            let joined = Bytes::from(Frame::PeerJoined { peer: peer.clone() }.encode());
            self.publish(None, 0, joined, Some(Roster::Joined(peer)));
            if let Some(presence) = presence {
                let roster = Roster::Presence { node, set: true };
                self.publish(None, 0, presence, Some(roster));
            }
        }
    }

    /// Members on other relays leave: the members here hear it, in the order of their ids.
    fn remotes_leave(&mut self, mut gone: Vec<NodeId>) {
        gone.sort_unstable();
        for node in gone {
            self.remote.remove(&node);
            self.outputs.push_back(Output::Fanout {
                except: None,
                bytes: Bytes::from(Frame::PeerLeft { node }.encode()),
            });
        }
    }

    /// The next thing the driver must do.
    pub fn poll_output(&mut self) -> Option<Output> {
        // Once the driver carries out outputs, an update can no longer be taken back.
        self.applied = None;
        self.receiving = None;
        self.outputs.pop_front()
    }

    /// The room's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The room's settings.
    pub fn config(&self) -> &RoomConfig {
        &self.config
    }

    /// The room step.
    pub fn high(&self) -> Step {
        self.high
    }

    /// The identity of the room's log (see [`RoomRecord`]).
    pub fn log(&self) -> u64 {
        self.log
    }

    /// The last position fanned out.
    pub fn published(&self) -> u64 {
        self.published
    }

    /// How many members are present.
    pub fn members(&self) -> usize {
        self.members.len()
    }

    /// How many nodes the room holds the state of (members, and nodes that left recently).
    pub fn nodes(&self) -> usize {
        self.nodes.len()
    }

    /// The room's document.
    pub fn document(&self) -> &SharedDoc {
        &self.doc
    }

    /// Bytes the room's log holds, as the store last said.
    pub fn stored_bytes(&self) -> u64 {
        self.stored_bytes
    }

    /// Stored document entries that did not apply when the room was loaded (written before the
    /// relay checked updates).
    pub fn load_failures(&self) -> u64 {
        self.load_failures
    }

    /// Whether the room holds nothing that must outlive it: no member, no append in flight, no
    /// node whose rate state still matters. It may be dropped.
    pub fn is_idle(&self) -> bool {
        self.members.is_empty()
            && self.pending.is_empty()
            && self.nodes.is_empty()
            && self.held.is_empty()
            && self.backlog.is_empty()
            && self.bus_backlog.is_empty()
    }

    /// Whether the room stopped after a store failure.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// The counts of every verdict and refusal so far.
    pub fn counters(&self) -> &Counters {
        self.validator.counters()
    }

    /// When the room next needs [`RoomCore::tick`], if ever.
    pub fn next_deadline(&self) -> Option<u64> {
        let departure = self.departures.front().map(|&(_, at)| at);
        let idle = (self.limits.idle_timeout > 0 && !self.members.is_empty())
            .then_some(self.idle_check_at);
        match (departure, idle) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Time passed: nodes that left long enough ago are let go, and members silent past the
    /// idle timeout are closed.
    pub fn tick(&mut self, now: u64) {
        self.now = self.now.max(now);
        self.sweep();
        self.close_silent();
    }

    /// Closes the connections the room has heard nothing from for
    /// [`RoomLimits::idle_timeout`]: their network went away without closing them (a laptop
    /// that slept, a NAT that forgot them), and until then they would count as members (their
    /// peers would see them, and might ask them for what they lack). Looks every quarter of the
    /// timeout.
    fn close_silent(&mut self) {
        let idle = self.limits.idle_timeout;
        if idle == 0 || self.now < self.idle_check_at {
            return;
        }
        self.idle_check_at = self.now.saturating_add((idle / 4).max(1));
        let mut silent: Vec<(ConnId, u64)> = self
            .members
            .iter()
            .filter(|(_, m)| self.now.saturating_sub(m.heard) >= idle)
            .map(|(&conn, m)| (conn, self.now - m.heard))
            .collect();
        silent.sort_unstable();
        for (conn, quiet) in silent {
            let reason = format!(
                "nothing heard from this connection for {} s: taken for dead",
                quiet / 1000
            );
            self.drop_member(conn, close::SILENT, &reason);
        }
    }

    /// Whether the room holds `node` (a member, or one that left and is not let go yet): what
    /// the driver keeps of a node may go once this is false.
    pub fn holds_node(&self, node: NodeId) -> bool {
        self.nodes.contains_key(&node)
    }

    /// Whether the room holds the node that `token` resumes. When it does not, the driver
    /// looks the token up in the store and passes what it found in [`JoinRequest::stored`],
    /// with what it kept when the room let the node go in [`JoinRequest::released`] (taken
    /// once the store answered, as it hands the join over).
    pub fn knows(&self, token: &ResumeToken) -> bool {
        // A shared room's node may have stored messages through another relay since: the store
        // says how far.
        !self.shared && self.tokens.contains_key(token)
    }

    fn new_node(&self, token: ResumeToken, user: u64) -> Node {
        Node {
            token,
            user,
            conn: None,
            in_flight: 0,
            rate: TokenBucket::new(self.limits.rate as f64, self.limits.burst as f64, self.now),
            bandwidth: TokenBucket::new(
                self.limits.bandwidth as f64,
                self.limits.bandwidth_burst as f64,
                self.now,
            ),
            kept_until: 0,
            recorded: false,
        }
    }

    /// A new connection joins, resuming the node of its token if the room or the store knows
    /// it. `fresh` is a random token for a new node (the room draws no randomness of its own).
    pub fn join(
        &mut self,
        now: u64,
        conn: ConnId,
        request: JoinRequest,
        fresh: ResumeToken,
    ) -> Result<Joined, JoinRefused> {
        // Time moves, but nothing is let go before the token is looked at: the driver asked
        // `knows` a moment ago, and a node it was told the room holds must still be here.
        self.now = self.now.max(now);
        let JoinRequest {
            name,
            since,
            log,
            resume,
            stored,
            access,
            floor,
            released,
        } = request;
        if self.stopped {
            return Err(JoinRefused {
                code: close::TRY_AGAIN_LATER,
                reason: "the room is restarting; try again".into(),
            });
        }
        let user = access.user;
        // The store's record of the token resumes its node for the user it names only: another
        // user who learned the token (leaked from a tab's storage, say) would take the node's
        // identity after a restart, or on another relay of a shared store.
        let stored = stored.filter(|s| s.user == user);
        if let Some(record) = stored.filter(|s| self.shared && Some(s.token) == resume) {
            // Its last message may have been stored through another relay: what it sends from
            // here waits until this relay has fanned the log out that far, and steps at or
            // below that one are replays here too.
            self.awaited = self.awaited.max(record.position);
            if self.nodes.contains_key(&record.node) {
                self.validator.restore(record.node, record.last_step, now);
            }
        }
        let known = resume.and_then(|token| {
            self.tokens
                .get(&token)
                .copied()
                // Another user's resume token (leaked from its storage, say) resumes nothing:
                // it would take that member's identity and close its connection. The joiner
                // is a new node.
                .filter(|node| self.nodes.get(node).is_none_or(|n| n.user == user))
                .or_else(|| {
                    // The store's record of the token, if the driver found one.
                    stored
                        .filter(|s| s.token == token && !self.nodes.contains_key(&s.node))
                        .map(|s| {
                            // What this relay kept when it let the node go is its exact last
                            // step; the store's is its last stored one.
                            // A stored step above it would say the release is not the node's last.
                            match released.filter(|r| {
                                !self.shared
                                    && r.node == s.node
                                    && r.token == token
                                    && r.step >= s.last_step
                            }) {
                                Some(r) => self.validator.resume(s.node, r.step, now),
                                None => self.validator.restore(s.node, s.last_step, now),
                            }
                            let mut node = self.new_node(token, user);
                            node.recorded = true;
                            self.nodes.insert(s.node, node);
                            self.tokens.insert(token, s.node);
                            self.departures.push_back((s.node, now));
                            s.node
                        })
                })
        });
        let replacing = known.and_then(|node| self.nodes.get(&node).and_then(|n| n.conn));
        if replacing.is_none() && self.members.len() >= self.limits.max_members {
            return Err(JoinRefused {
                code: close::TRY_AGAIN_LATER,
                reason: format!(
                    "the room is full: at most {} members",
                    self.limits.max_members
                ),
            });
        }
        if replacing.is_none() && user != 0 {
            let held = self
                .members
                .values()
                .filter(|m| m.access.user == user)
                .count();
            if held >= self.limits.max_members_per_user {
                return Err(JoinRefused {
                    code: close::TRY_AGAIN_LATER,
                    reason: format!(
                        "this access token's user is in the room {held} times already, the most one user may be"
                    ),
                });
            }
        }
        let node = match known {
            Some(node) => node,
            None => {
                let Some(node) = self.take_node_id() else {
                    return Err(JoinRefused {
                        code: close::TRY_AGAIN_LATER,
                        reason: "the room is reserving node ids; try again".into(),
                    });
                };
                let mut state = self.new_node(fresh, user);
                if let Some((rate, bandwidth)) = self.spent.get(&request.access.user) {
                    state.rate = rate.clone();
                    state.bandwidth = bandwidth.clone();
                }
                self.nodes.insert(node, state);
                self.tokens.insert(fresh, node);
                node
            }
        };
        if let Some(old) = replacing {
            if self.members.remove(&old).is_some() {
                self.outputs.push_back(Output::Close {
                    conn: old,
                    code: close::REPLACED,
                    reason: "replaced by a newer connection of the same node".into(),
                });
            }
        }
        let token = match self.nodes.get_mut(&node) {
            Some(state) => {
                state.conn = Some(conn);
                state.token
            }
            None => fresh,
        };
        let mut peers: Vec<Peer> = self
            .members
            .values()
            .map(|m| Peer {
                node: m.node,
                name: m.name.clone(),
            })
            .collect();
        peers.extend(
            self.remote
                .iter()
                .filter(|&(&other, _)| other != node && !self.is_member_here(other))
                .map(|(&node, remote)| Peer {
                    node,
                    name: remote.name.clone(),
                }),
        );
        peers.sort_unstable_by_key(|p| p.node);
        peers.dedup_by_key(|p| p.node);
        let peer = Peer {
            node,
            name: name.clone(),
        };
        let joined = Bytes::from(Frame::PeerJoined { peer: peer.clone() }.encode());
        self.outputs.push_back(Output::Fanout {
            except: Some(conn),
            bytes: joined.clone(),
        });
        // It is here now, whatever another relay said.
        self.remote.remove(&node);
        self.joined_since_snapshot.push((conn, self.published));
        self.publish(None, 0, joined, Some(Roster::Joined(peer)));
        self.members.insert(
            conn,
            Member {
                node,
                name,
                access,
                presence: None,
                gap: None,
                gap_at: 0,
                ignored: 0,
                malformed: 0,
                limited: 0,
                limited_since: now,
                heard: now,
                beat: now,
            },
        );
        let welcome = Frame::Welcome {
            node,
            resume: token,
            config: self.config,
            limits: self.limits.announced(),
            high: self.high,
            log: self.log,
            peers,
            // Only where it is certain: in a shared room another relay may have taken steps of
            // a node it knew that this one has not read yet (a node new here is new to all:
            // node ids come from blocks the store reserves for this relay alone).
            floor: (floor && (!self.shared || known.is_none()))
                .then(|| self.validator.floor(node))
                .flatten(),
        };
        let caught_up = Frame::CaughtUp {
            high: self.high,
            position: self.published,
        };
        let mut presences: Vec<(NodeId, Bytes)> = self
            .members
            .iter()
            .filter(|(&other, member)| other != conn && member.node != node)
            .filter_map(|(_, member)| Some((member.node, member.presence.clone()?)))
            .collect();
        presences.extend(
            self.remote
                .iter()
                .filter_map(|(&node, remote)| Some((node, remote.presence.clone()?))),
        );
        presences.sort_by_key(|&(node, _)| node);
        let presences = presences.into_iter().map(|(_, bytes)| bytes).collect();
        self.sweep();
        let from = if log != self.log || since > self.published {
            0
        } else {
            since
        };
        let refused = self
            .refused
            .iter()
            .copied()
            .filter(|&position| position > from && position <= self.published)
            .collect();
        Ok(Joined {
            node,
            welcome: Bytes::from(welcome.encode()),
            from,
            until: self.published,
            caught_up: Bytes::from(caught_up.encode()),
            presences,
            refused,
        })
    }

    /// The next node id, asking the store for more in time.
    fn take_node_id(&mut self) -> Option<NodeId> {
        if self.next_node >= self.nodes_end {
            let (start, end) = self.spare_nodes.take()?;
            self.next_node = start;
            self.nodes_end = end;
        }
        let node = self.next_node;
        self.next_node += 1;
        if self.nodes_end - self.next_node < NODE_BLOCK / 2
            && self.spare_nodes.is_none()
            && !self.reserving
        {
            self.reserving = true;
            self.outputs
                .push_back(Output::Reserve { count: NODE_BLOCK });
        }
        Some(node)
    }

    /// The store's answer to [`Output::Reserve`]: the first id of the block it reserved.
    pub fn reserved(&mut self, result: Result<NodeId, StoreError>) {
        self.reserving = false;
        if let Ok(first) = result {
            let block = (first, first + NODE_BLOCK);
            if self.next_node >= self.nodes_end {
                (self.next_node, self.nodes_end) = block;
            } else {
                self.spare_nodes = Some(block);
            }
        }
    }

    /// The connection `conn` is gone.
    pub fn leave(&mut self, conn: ConnId) {
        if let Some(member) = self.members.remove(&conn) {
            self.forget_member(conn, &member);
        }
    }

    /// The relay is stopping: from now on, the nodes that left (and those that leave) are let
    /// go as soon as they have nothing in flight, without waiting for their resume grace or
    /// their budgets ([`Output::Released`] as ever), and the room can retire once its writes
    /// are done. (It kept them for their grace, and the relay waited out its deadline.)
    pub fn close_down(&mut self, now: u64) {
        self.closing = true;
        self.tick(now);
    }

    /// The driver had to let `conn` go (its send queue was full): it leaves the room, and its
    /// socket closes with `code` and `reason`.
    pub fn drop_member(&mut self, conn: ConnId, code: u16, reason: &str) {
        if let Some(member) = self.members.remove(&conn) {
            self.outputs.push_back(Output::Close {
                conn,
                code,
                reason: reason.into(),
            });
            self.forget_member(conn, &member);
        }
    }

    fn forget_member(&mut self, conn: ConnId, member: &Member) {
        self.forget_member_now(conn, member);
        if self.closing {
            self.sweep();
        }
    }

    fn forget_member_now(&mut self, conn: ConnId, member: &Member) {
        self.joined_since_snapshot.retain(|&(c, _)| c != conn);
        if let Some(node) = self.nodes.get_mut(&member.node) {
            if node.conn == Some(conn) {
                node.conn = None;
                node.kept_until = self.now.saturating_add(self.limits.resume_grace);
                let at = node.rate.full_at().max(node.bandwidth.full_at());
                if member.access.user != 0 && at > self.now {
                    let now = self.now;
                    self.spent
                        .retain(|_, (r, b)| r.full_at().max(b.full_at()) > now);
                    // The emptier of each budget: a node that spent little, leaving after one
                    // that spent all, does not hand the next node full budgets.
                    let (rate, bandwidth) = self
                        .spent
                        .entry(member.access.user)
                        .or_insert_with(|| (node.rate.clone(), node.bandwidth.clone()));
                    if node.rate.full_at() > rate.full_at() {
                        *rate = node.rate.clone();
                    }
                    if node.bandwidth.full_at() > bandwidth.full_at() {
                        *bandwidth = node.bandwidth.clone();
                    }
                }
                self.departures
                    .push_back((member.node, at.max(node.kept_until)));
            }
        }
        let left = Bytes::from(Frame::PeerLeft { node: member.node }.encode());
        // A node that joined another relay since is still there for the members here.
        if !self.remote.contains_key(&member.node) {
            self.outputs.push_back(Output::Fanout {
                except: None,
                bytes: left.clone(),
            });
        }
        self.publish(None, 0, left, Some(Roster::Left(member.node)));
    }

    /// Lets go of the nodes that left, have nothing in flight and whose buckets are full again:
    /// the store holds their state from now on.
    fn sweep(&mut self) {
        // Closing down, every departure is due now; one not let go now (back, or still
        // writing) comes back to the queue when it leaves or its writes end.
        let mut left = if self.closing {
            self.departures.len()
        } else {
            usize::MAX
        };
        while let Some(&(node, at)) = self.departures.front() {
            if left == 0 || (at > self.now && !self.closing) {
                break;
            }
            left -= 1;
            self.departures.pop_front();
            let Some(state) = self.nodes.get(&node) else {
                continue;
            };
            if state.conn.is_some() || state.in_flight > 0 {
                // Back, or still writing: looked at again when it leaves or its writes end.
                continue;
            }
            let due = state
                .rate
                .full_at()
                .max(state.bandwidth.full_at())
                .max(state.kept_until);
            if due > self.now && !self.closing {
                self.departures.push_back((node, due));
                continue;
            }
            let (token, user, recorded) = (state.token, state.user, state.recorded);
            self.nodes.remove(&node);
            self.tokens.remove(&token);
            // Only a step known for certain: one restored from the store, with nothing accepted
            // since, may miss what the node stamped before the relay last stopped. A node the
            // store has no record of comes back as a new one: nothing to keep.
            let known = self
                .validator
                .last_step(node)
                .and(self.validator.floor(node));
            if let Some(step) = known.filter(|_| recorded && !self.shared) {
                self.outputs.push_back(Output::Released(Release {
                    node,
                    token,
                    user,
                    step,
                }));
            }
            self.validator.release(node);
        }
    }

    /// While the parts of a large message come in, a heartbeat to the member at most every
    /// [`PARTS_BEAT`]: its own heartbeat waits behind the parts on its link, and a message of
    /// megabytes on a slow link takes longer to go out than a client waits for an answer
    /// before it takes the connection for dead (it then sent the message again, and again).
    fn still_receiving(&mut self, now: u64, conn: ConnId) {
        let Some(member) = self.members.get_mut(&conn) else {
            return;
        };
        if now.saturating_sub(member.beat) >= PARTS_BEAT {
            member.beat = now;
            self.outputs.push_back(Output::Send {
                to: conn,
                bytes: Bytes::from(Frame::Heartbeat.encode()),
            });
        }
    }

    /// What `conn`'s [`Reader`] made of a binary message.
    ///
    /// The rate limit counts messages, not frames: the parts of a large message are put
    /// together first (at most the message limit), and the whole costs one token per part when
    /// its last part is in. A fence always goes through: it is how a client leaves a gap.
    pub fn receive(&mut self, now: u64, conn: ConnId, read: Read) {
        self.applied = None;
        self.receiving = Some(Receiving {
            conn,
            step: None,
            outputs: self.outputs.len(),
            pending: self.pending.len(),
        });
        // Heard before the look for silent members that `tick` may make: this frame counts.
        if let Some(member) = self.members.get_mut(&conn) {
            member.heard = now.max(self.now);
        }
        self.tick(now);
        let (positioned, bytes, cost) = match read {
            Read::Pending => return self.still_receiving(now, conn),
            Read::Alive => return,
            Read::Refused {
                step,
                reason,
                detail,
            } => return self.malformed(conn, step, reason, detail),
            Read::Throttled { step, detail } => return self.limited(conn, step, detail),
            Read::ThrottledFence { step, detail } => {
                if self.members.get(&conn).is_none_or(|m| m.gap.is_none()) {
                    return self.limited(conn, 0, detail);
                }
                let fence = Positioned {
                    position: None,
                    frame: Frame::Fence { step },
                };
                (fence, Bytes::new(), 1)
            }
            Read::Frame { frame, bytes, cost } => (frame, bytes, cost),
        };
        let Some(member) = self.members.get_mut(&conn) else {
            return;
        };
        let node = member.node;
        let access = member.access;
        let had_gap = member.gap.take();
        if let Frame::Fence { step } = positioned.frame {
            // A fence that ends a gap is free: it must never be what starves the message
            // sent again after it. One that ends nothing costs a token like any frame (no
            // client sends one: a member that does so over its rate is refused, and closed
            // if it goes on). Nor does a fence clear the count of malformed frames: each
            // opens a gap that the next fence would end.
            if had_gap.is_none()
                && !self
                    .nodes
                    .get_mut(&node)
                    .is_some_and(|state| state.rate.try_take(now))
            {
                let detail = format!(
                    "over {} frames per second, with fences that end no refusal",
                    self.limits.rate
                );
                return self.limited(conn, 0, detail);
            }
            self.outputs.push_back(Output::Send {
                to: conn,
                bytes: Bytes::from(Frame::Fence { step }.encode()),
            });
            return;
        }
        member.gap = had_gap;
        member.malformed = 0;
        let step = positioned.frame.stamp().map_or(0, |s| s.step);
        if let Some(receiving) = &mut self.receiving {
            receiving.step = Some(step);
        }
        if let (Some(gap), Frame::Stamped(_)) = (had_gap, &positioned.frame) {
            // Refused without a token: what was in flight when the client heard the refusal
            // must not drain the budget its fence and resend need.
            return self.out_of_order(conn, step, gap);
        }
        let passed = self
            .nodes
            .get_mut(&node)
            .is_some_and(|state| state.rate.try_take_n(cost, now));
        if !passed && positioned.frame == Frame::Heartbeat {
            // Heard, and not answered: a refusal would open a gap that the client's stamped
            // frames then fall into, for a frame that only says it is alive. (Counted: a
            // member that keeps sending them over the rate is closed.)
            self.over_rate(conn);
            return;
        }
        if !passed {
            let detail = format!(
                "over {} frames per second; this message was not stored: send it again later",
                self.limits.rate
            );
            return self.limited(conn, step, detail);
        }
        if positioned.position.is_some() {
            let detail = "the frame carries a log position; only the relay sets one".into();
            return self.refuse(conn, step, Reason::Malformed, detail);
        }
        match positioned.frame {
            Frame::Stamped(stamped)
                if !access.write && !matches!(stamped.body, Body::SyncRequest { .. }) =>
            {
                let detail = format!(
                    "this member's access token lets it read only: its {} was not stored or passed on",
                    stamped.body.kind()
                );
                self.refuse(conn, stamped.stamp.step, Reason::Forbidden, detail)
            }
            Frame::Stamped(stamped) => self.stamped(now, conn, node, stamped, bytes),
            Frame::Presence { sender, data } => {
                if sender != node {
                    let detail = format!("sender {sender} is not this connection's node id {node}");
                    return self.refuse(conn, 0, Reason::SenderMismatch, detail);
                }
                // Passed to every member, and to every joiner while it stands.
                let max = self.limits.limits.max_frame;
                if bytes.len() > max {
                    let detail = format!(
                        "a presence of {} bytes; the relay takes {max} at most (one frame)",
                        bytes.len()
                    );
                    return self.refuse(conn, 0, Reason::TooLarge, detail);
                }
                if !self.spend(node, bytes.len(), now) {
                    return self.over_bandwidth(conn, 0);
                }
                // `null` clears it: a late joiner has nothing to hear.
                let set = data != crate::wire::Json::null();
                if let Some(member) = self.members.get_mut(&conn) {
                    member.presence = set.then(|| bytes.clone());
                }
                self.outputs.push_back(Output::Fanout {
                    except: Some(conn),
                    bytes: bytes.clone(),
                });
                self.publish(None, 0, bytes, Some(Roster::Presence { node, set }));
            }
            Frame::Heartbeat => self.outputs.push_back(Output::Send {
                to: conn,
                bytes: Bytes::from(Frame::Heartbeat.encode()),
            }),
            Frame::Rename { .. } if access.fixed_name => {
                let detail = "this member's name comes from its access token".into();
                self.refuse(conn, 0, Reason::Forbidden, detail)
            }
            Frame::Rename { name } => {
                let Some(member) = self.members.get_mut(&conn) else {
                    return;
                };
                member.name.clone_from(&name);
                let peer = Peer { node, name };
                let renamed = Bytes::from(Frame::PeerRenamed { peer: peer.clone() }.encode());
                self.outputs.push_back(Output::Fanout {
                    except: Some(conn),
                    bytes: renamed.clone(),
                });
                self.publish(None, 0, renamed, Some(Roster::Joined(peer)));
            }
            other => {
                let detail = format!(
                    "a {} frame is not accepted from a member; send stamped frames, presence, renames or fences",
                    other.kind()
                );
                self.refuse(conn, 0, Reason::Unexpected, detail);
            }
        }
    }

    /// A stamped frame of `conn` in a gap: refused as `outOfOrder`. A client that is still
    /// sending more than a second after the refusal that opened the gap (more than a second's
    /// worth of frames) does not listen: it is closed.
    fn out_of_order(&mut self, conn: ConnId, step: Step, gap: Step) {
        let (now, allowed) = (self.now, self.limits.rate + self.limits.burst);
        let Some(member) = self.members.get_mut(&conn) else {
            return;
        };
        if now.saturating_sub(member.gap_at) > 1_000 {
            member.ignored += 1;
            if member.ignored > allowed {
                self.validator.record(Reason::OutOfOrder);
                return self.drop_member(
                    conn,
                    close::RATE_LIMITED,
                    "kept sending for over a second after a refusal, without a fence",
                );
            }
        }
        let detail = format!(
            "step {gap} of this connection was refused: send a fence, then send again from there"
        );
        self.refuse(conn, step, Reason::OutOfOrder, detail);
    }

    /// A frame of `conn` refused for a rate. A connection refused more than a second's worth of
    /// times within a second (each time after its fence) does not pace itself, whatever it is
    /// told: it is closed.
    fn limited(&mut self, conn: ConnId, step: Step, detail: String) {
        let Some(member) = self.members.get(&conn) else {
            return;
        };
        if let Some(gap) = member.gap {
            return self.out_of_order(conn, step, gap);
        }
        if !self.over_rate(conn) {
            self.refuse(conn, step, Reason::RateLimited, detail);
        }
    }

    /// Counts a frame of `conn` over a rate: a member that sends more of them in a second than
    /// the rate and its burst allow is closed. Returns whether it was.
    fn over_rate(&mut self, conn: ConnId) -> bool {
        let now = self.now;
        let allowed = self.limits.rate + self.limits.burst;
        let Some(member) = self.members.get_mut(&conn) else {
            return true;
        };
        if now.saturating_sub(member.limited_since) >= 1_000 {
            member.limited_since = now;
            member.limited = 0;
        }
        member.limited += 1;
        if member.limited <= allowed {
            return false;
        }
        self.validator.record(Reason::RateLimited);
        self.drop_member(
            conn,
            close::RATE_LIMITED,
            "kept sending over the rate limit",
        );
        true
    }

    /// The writer a sync request to everyone from `asker` goes to: the next one in turn, never
    /// the asker, never a reader (whose answers are refused). `None` when there is none.
    fn answerer(&mut self, asker: ConnId) -> Option<NodeId> {
        let mut writers: Vec<(ConnId, NodeId)> = self
            .members
            .iter()
            .filter(|&(&conn, member)| conn != asker && member.access.write)
            .map(|(&conn, member)| (conn, member.node))
            .collect();
        if writers.is_empty() {
            return None;
        }
        crate::doc::heap_sort(&mut writers);
        let turn = self.next_answerer % writers.len();
        self.next_answerer = self.next_answerer.wrapping_add(1);
        Some(writers[turn].1)
    }

    /// Takes `len` bytes from `node`'s bandwidth; whether they were there.
    fn spend(&mut self, node: NodeId, len: usize, now: u64) -> bool {
        self.nodes
            .get_mut(&node)
            .is_some_and(|state| state.bandwidth.try_take_n(len as u64, now))
    }

    /// Refuses a message over its sender's bandwidth, to send again later.
    fn over_bandwidth(&mut self, conn: ConnId, step: Step) {
        let detail = format!(
            "over {} bytes per second; this message was not taken: send it again later",
            self.limits.bandwidth
        );
        self.limited(conn, step, detail);
    }

    fn malformed(&mut self, conn: ConnId, step: Step, reason: Reason, detail: String) {
        self.refuse(conn, step, reason, detail);
        if let Some(member) = self.members.get_mut(&conn) {
            member.malformed += 1;
            if member.malformed >= MAX_MALFORMED {
                self.drop_member(conn, close::POLICY, "too many malformed frames");
            }
        }
    }

    /// Refuses a frame of `conn` for a reason found outside the validator: counted, then
    /// rejected.
    fn refuse(&mut self, conn: ConnId, step: Step, reason: Reason, detail: String) {
        self.validator.record(reason);
        self.reject(conn, step, reason, detail);
    }

    /// A reject to `conn` alone; and, but for a replay, a gap that lasts until its fence.
    fn reject(&mut self, conn: ConnId, step: Step, reason: Reason, detail: String) {
        if reason != Reason::Replay {
            let now = self.now;
            if let Some(member) = self.members.get_mut(&conn) {
                if member.gap.is_none() {
                    member.gap = Some(step);
                    member.gap_at = now;
                    member.ignored = 0;
                }
            }
        }
        let bytes = self.reject_frame(step, reason, detail);
        self.outputs.push_back(Output::Send { to: conn, bytes });
    }

    /// A reject frame, its detail cut to the limit.
    fn reject_frame(&self, step: Step, reason: Reason, mut detail: String) -> Bytes {
        let max = self.limits.limits.max_detail;
        if detail.len() > max {
            let mut end = max;
            while !detail.is_char_boundary(end) {
                end -= 1;
            }
            detail.truncate(end);
        }
        Bytes::from(
            Frame::Reject {
                step,
                reason,
                detail,
            }
            .encode(),
        )
    }

    fn stamped(&mut self, now: u64, conn: ConnId, node: NodeId, stamped: Stamped, bytes: Bytes) {
        let Some(member) = self.members.get(&conn) else {
            return;
        };
        let stamp = stamped.stamp;
        debug_assert!(member.gap.is_none(), "frames in a gap are refused before");
        let origin = Origin::Connection(node);
        // Every check that can refuse the message comes before anything it moves: the
        // validator's verdict is peeked, and recorded only once the message is taken.
        let kind = stamped.body.kind();
        if let Verdict::Rejected(reason) = self.validator.peek(kind, &stamp, origin, self.high) {
            // Sent again before its answer (the store's, or its turn in a shared room's log)
            // came: that answer is the one it gets. It may yet be a refusal: a shared room
            // judges updates in the log's order, and a client refused there sends again what
            // it sent after.
            if reason == Reason::Replay {
                if let Some((_, why, detail)) = self.owed.get(&(node, stamp.step)).cloned() {
                    return self.refuse(conn, stamp.step, why, detail);
                }
                if self.answer_due(node, stamp.step) {
                    return;
                }
                // Judged here already (else its answer waits for its turn, below).
                if !(self.shared && self.awaited > self.published) {
                    if let Some((reason, why)) = self.refused_in_log(&stamped.body) {
                        return self.refuse(conn, stamp.step, reason, why);
                    }
                }
            }
            self.validator.record(reason);
            let detail = self.validator.explain(&stamp, origin, self.high, reason);
            // In a shared room, a message stored through another relay (its node came back
            // here) is answered once this relay has judged it, in its turn.
            if reason == Reason::Replay && self.shared && self.awaited > self.published {
                let answer = self.reject_frame(stamp.step, reason, detail);
                return self.held.push_back(Held {
                    after: self.awaited,
                    sender: node,
                    to: None,
                    ack: Some(stamp.step),
                    bytes: answer,
                    update: if_update(&bytes),
                });
            }
            return self.reject(conn, stamp.step, reason, detail);
        }
        let body = &stamped.body;
        let len = bytes.len() as u64;
        if body.is_durable() {
            let holds = self.stored_bytes + self.in_flight_bytes;
            let max = self.limits.max_room_bytes;
            // Stored data is never compacted: it may fill three quarters of the log, and the
            // rest is kept for document updates (which compaction shrinks), so that one
            // member's data cannot stop the document for everyone.
            let detail = match body {
                Body::Update { .. } if holds + len > max => Some(format!(
                    "the room's log is full: it holds {holds} bytes, and the relay keeps at most {max} per room"
                )),
                Body::Update { .. } => None,
                _ if holds + len > max / 4 * 3 => Some(format!(
                    "the room's log is full for data: it holds {holds} bytes, and the relay keeps at most {max} per room, the last quarter for document updates"
                )),
                _ => None,
            };
            if let Some(detail) = detail {
                return self.refuse(conn, stamp.step, Reason::Full, detail);
            }
        }
        // A state vector names each client once: one over a frame is no client's, and a sync
        // request to everyone or a checkpoint goes to every member.
        if let Body::SyncRequest { state_vector, .. } | Body::Checkpoint { state_vector, .. } = body
        {
            let max = self.limits.limits.max_frame;
            if state_vector.len() > max {
                let detail = format!(
                    "a {} with a state vector of {} bytes; the relay takes {max} at most (one frame)",
                    body.kind(),
                    state_vector.len()
                );
                return self.refuse(conn, stamp.step, Reason::TooLarge, detail);
            }
        }
        // One that does not decode fails the document it goes to, where it reads as that
        // document's own failure.
        if let Body::SyncRequest { state_vector, .. } = body {
            if !state_vector.is_empty() && !crate::doc::is_state_vector(state_vector) {
                let detail = "a sync request whose state vector does not decode (a count, then \
                              that many client ids and clocks)";
                return self.refuse(conn, stamp.step, Reason::Malformed, detail.into());
            }
        }
        // Every message spends the sender's bytes: the room stores it, fans it out, or reads it
        // through.
        if !self.spend(node, bytes.len(), now) {
            return self.over_bandwidth(conn, stamp.step);
        }
        match body {
            Body::Update { update, .. } if self.shared => {
                // Applied in the log's order, when the log comes back (`followed`); what it
                // would cost to apply is judged against the document as it is here, and again
                // there (`admit_member`): this copy may lack what the log holds before it.
                if let Err(e) = self.doc.check_member_update(update) {
                    return self.refuse(conn, stamp.step, refusal_reason(&e), e.to_string());
                }
            }
            Body::Update { doc, update } => {
                if let Err(e) = admit_member(&self.doc, doc, update) {
                    let partial = e.holds_part().then(|| e.to_string());
                    let reason = refusal_reason(&e);
                    self.refuse(conn, stamp.step, reason, refusal_detail(e));
                    if let Some(why) = partial {
                        // The document may hold part of it: the room loads again without it.
                        self.stop_by(
                            Some(node),
                            format!("an update did not apply ({why}); the document is loaded again without it"),
                        );
                    }
                    return;
                }
                self.applied = Some((conn, stamp.step));
            }
            Body::SyncState { update, .. } => {
                let decoded = match decode_update(update) {
                    Ok(decoded) => decoded,
                    Err(e) => {
                        return self.refuse(conn, stamp.step, Reason::Malformed, e.to_string())
                    }
                };
                // An answer carries only what the room's document holds. Every receiver gets
                // the updates the room took before this answer ahead of it, so an answer can
                // then add nothing; one that does (blocks under another member's client id at
                // its next clock, deletions no one made) would make the replicas that take it
                // keep it and ignore the real edit.
                if let Err(detail) = self.doc.holds_decoded(&decoded) {
                    let detail = format!(
                        "the sync answer holds what the room has not stored: {detail}; it went to no one"
                    );
                    return self.refuse(conn, stamp.step, Reason::Desync, detail);
                }
            }
            _ => {}
        }
        let verdict = self.validator.check(kind, &stamp, origin, self.high, now);
        debug_assert_eq!(verdict, Verdict::Accepted, "the peeked verdict holds");
        // The room step counts what everyone receives: a message above it moves it by one,
        // whatever its step (see `crate::clock`), so that no member can drag it forward. In a
        // shared room the store moves it, with each append and publication, and the room takes
        // it from what it reads back: it never runs ahead of the store's, so that the store's
        // check of the future bound never refuses what this room accepted.
        // A sync request to everyone would have every writer answer with the same document:
        // one writer is asked, the next one each time. (A shared room's relays each know only
        // their own members: with no writer here, each other relay asks one of its own.)
        let to = match body {
            Body::SyncRequest { to: 0, .. } => match self.answerer(conn) {
                Some(node) => Some(node),
                None if self.shared => None,
                None => return,
            },
            _ => body.recipient(),
        };
        if stamp.step > self.high && body.moves_step() && !self.shared {
            self.high += 1;
        }
        if !body.is_durable() {
            if self.shared && !to.is_some_and(|node| self.is_member_here(node)) {
                // For the members on other relays, now: in the order of this relay's appends,
                // the store puts it after the appends handed to it before, and before the next.
                let step = if body.moves_step() { stamp.step } else { 0 };
                self.publish_stamped(to, self.awaited, bytes.clone(), None, step);
            }
            if self.pending.is_empty() {
                return self.forward_in_turn(node, to, bytes);
            }
            return self.pending.push_back(Pending {
                stamp,
                bytes,
                waits: Waits::Forward { to },
            });
        }
        let (doc, token, user) = (
            body.doc().map(str::to_owned),
            self.nodes.get(&node).map(|n| n.token),
            self.nodes.get(&node).map_or(0, |n| n.user),
        );
        if let (Body::Update { .. }, false) = (body, self.shared) {
            self.tail_bytes += len;
            self.tail_updates += 1;
        }
        if let Some(state) = self.nodes.get_mut(&node) {
            state.in_flight += 1;
            state.recorded = true;
        }
        self.in_flight_bytes += len;
        self.outputs.push_back(Output::Append(Append {
            sender: node,
            token,
            user,
            step: stamp.step,
            high: self.high,
            doc,
            snapshot: false,
            covers: 0,
            bytes: bytes.clone(),
        }));
        self.pending.push_back(Pending {
            stamp,
            bytes,
            waits: Waits::Append { node, len },
        });
        self.compact_if_due();
    }

    /// Appends a snapshot of the document when the updates since the last one call for it. The
    /// snapshot takes the place of every update accepted before it (the store drops them once it
    /// is durable); a snapshot larger than a message could never reach a client, so the document
    /// then stays uncompacted until its tail doubles.
    fn compact_if_due(&mut self) {
        let due = self.tail_updates > 0
            && (self.compact_now
                || self.tail_bytes >= self.limits.compact_bytes.max(self.snapshot_len)
                || self.tail_updates >= self.limits.compact_updates);
        // A room that loaded with entries its document could not apply does not compact: the
        // snapshot would hold the rest only, and the store drops what a snapshot covers.
        // Nor does a shared room's document that lacks entries the log skipped.
        if !due
            || self.compacting
            || self.stopped
            || self.load_failures > 0
            || self.missed > 0
            || !self.deferred.is_empty()
        {
            return;
        }
        let frame = Frame::Snapshot {
            doc: WHOLE_DOC.into(),
            state: self.doc.snapshot(),
        }
        .encode();
        let len = frame.len() as u64;
        self.tail_bytes = 0;
        self.tail_updates = 0;
        self.compact_now = false;
        if frame.len() > self.limits.limits.max_message {
            self.snapshot_len = len;
            return;
        }
        self.compacting = true;
        self.in_flight_bytes += len;
        let bytes = Bytes::from(frame);
        self.outputs.push_back(Output::Append(Append {
            sender: 0,
            token: None,
            user: 0,
            step: 0,
            high: self.high,
            doc: Some(WHOLE_DOC.into()),
            snapshot: true,
            covers: self.published,
            bytes: bytes.clone(),
        }));
        self.pending.push_back(Pending {
            stamp: Stamp {
                sender: 0,
                step: 0,
                pattern: 0,
            },
            bytes,
            waits: Waits::Compaction { len },
        });
    }

    /// Applying the update of the last [`RoomCore::receive`] took the driver `elapsed_ms`, over
    /// its budget of `budget_ms`: the update is refused as `tooLarge` before the store sees it,
    /// and, since the document now holds it, the room stops, to be loaded again from its log.
    /// Call it before polling the outputs of that `receive`. Returns whether there was such an
    /// update.
    pub fn overran(&mut self, elapsed_ms: u64, budget_ms: u64) -> bool {
        let Some((conn, step)) = self.applied.take() else {
            return false;
        };
        let appended = self
            .outputs
            .iter()
            .rposition(|o| matches!(o, Output::Append(a) if a.step == step && !a.snapshot));
        if let Some(i) = appended {
            self.outputs.remove(i);
        }
        // Also a snapshot that already holds it.
        self.outputs
            .retain(|o| !matches!(o, Output::Append(a) if a.snapshot));
        while let Some(last) = self.pending.pop_back() {
            match last.waits {
                Waits::Append { node, len } => {
                    if let Some(state) = self.nodes.get_mut(&node) {
                        state.in_flight = state.in_flight.saturating_sub(1);
                    }
                    self.in_flight_bytes -= len;
                    if last.stamp.step == step {
                        break;
                    }
                }
                Waits::Compaction { len } => {
                    self.in_flight_bytes -= len;
                    self.compacting = false;
                }
                Waits::Forward { .. } => {}
            }
        }
        let detail = format!(
            "applying it took too long, send it in smaller edits: it took {elapsed_ms} ms, over the relay's budget of {budget_ms} ms"
        );
        self.refuse(conn, step, Reason::TooLarge, detail);
        self.stop(format!(
            "an update took {elapsed_ms} ms to apply; the document is loaded again without it"
        ));
        true
    }

    /// The last [`RoomCore::receive`] panicked (a driver that can catch a panic calls this, before
    /// it polls any output): nothing of the frame it was handling goes out or to the store, its
    /// sender hears it refused as `malformed` (so that its client does not send it again), and
    /// the room stops, to be loaded again from its log, since the panic may have left the
    /// document or the room's state half changed. `detail` says what failed.
    pub fn panicked(&mut self, detail: &str) {
        let receiving = self.receiving.take();
        self.applied = None;
        let by = receiving
            .as_ref()
            .and_then(|receiving| self.members.get(&receiving.conn))
            .map(|member| member.node);
        if let Some(receiving) = receiving {
            self.outputs.truncate(receiving.outputs);
            self.pending.truncate(receiving.pending);
            if let Some(step) = receiving.step {
                let detail =
                    format!("the relay failed on this message and did not store it: {detail}");
                self.refuse(receiving.conn, step, Reason::Malformed, detail);
            }
        }
        self.stop_by(
            by,
            format!("the room failed on a message ({detail}); it is loaded again without it"),
        );
    }

    /// Sends `bytes` (one message) to `to`'s connection, or to everyone but `from`; larger than
    /// a frame, it goes in parts.
    fn forward(&mut self, from: ConnId, to: Option<NodeId>, bytes: &Bytes) {
        let target = match to {
            Some(node) => match self.nodes.get(&node).and_then(|n| n.conn) {
                Some(conn) => Some(conn),
                // The one it is for is gone: nobody else wants it.
                None => return,
            },
            None => None,
        };
        let frames: Vec<Bytes> = if bytes.len() <= self.limits.limits.max_frame {
            vec![bytes.clone()]
        } else {
            part::fragment(bytes, self.limits.limits.max_frame)
                .into_iter()
                .map(Bytes::from)
                .collect()
        };
        for bytes in frames {
            self.outputs.push_back(match target {
                Some(to) => Output::Send { to, bytes },
                None => Output::Fanout {
                    except: Some(from),
                    bytes,
                },
            });
        }
    }

    /// `conn`'s catch-up has been read to its end: a snapshot stored from now on drops nothing
    /// it still has to read.
    ///
    /// A shared room keeps it listed until a snapshot covers how far it read (another relay's
    /// snapshot may have dropped entries before this relay reads it back), and so does a room
    /// whose snapshot is on its way to the store (the store may have dropped the entries
    /// already).
    pub fn caught_up(&mut self, conn: ConnId) {
        if !self.shared && !self.compacting {
            self.joined_since_snapshot.retain(|&(c, _)| c != conn);
        }
    }

    /// The store's answer for the oldest append still in flight.
    pub fn appended(&mut self, result: Result<Appended, StoreError>) {
        let Some(pending) = self.pending.pop_front() else {
            return;
        };
        match pending.waits {
            Waits::Append { node, len } => {
                self.in_flight_bytes -= len;
                let done = self.nodes.get_mut(&node).is_some_and(|state| {
                    state.in_flight -= 1;
                    state.in_flight == 0 && state.conn.is_none()
                });
                if done {
                    self.departures.push_back((node, self.now));
                }
                self.answer(node, pending.stamp.step, pending.bytes, result);
            }
            Waits::Compaction { len } => {
                self.in_flight_bytes -= len;
                self.compacting = false;
                match result {
                    // A shared room's snapshot comes back through the log (`followed`).
                    Ok(Appended::Stored { bytes, .. }) if self.shared => {
                        self.stored_bytes = bytes;
                    }
                    Ok(Appended::Stored {
                        position,
                        bytes: stored,
                    }) => {
                        self.published = position;
                        self.stored_bytes = stored;
                        self.snapshot_len = len;
                        self.refused.retain(|&refused| refused > position);
                        self.owed.retain(|_, (refused, ..)| *refused > position);
                        // The store just dropped every document entry before the snapshot: a
                        // catch-up still reading (it reads the log a page at a time) finds them
                        // gone. Its member gets the snapshot, after the catch-up and in order
                        // with the live messages.
                        let joiners = std::mem::take(&mut self.joined_since_snapshot);
                        if !joiners.is_empty() {
                            let positioned = with_position(&pending.bytes, position)
                                .map(Bytes::from)
                                .unwrap_or(pending.bytes);
                            for (conn, _) in joiners {
                                if let Some(node) = self.members.get(&conn).map(|m| m.node) {
                                    self.forward(0, Some(node), &positioned);
                                }
                            }
                        }
                    }
                    // Another relay compacts this shared room: its snapshots reset the tail.
                    Ok(Appended::Refused { .. } | Appended::Replayed { .. }) if self.shared => {}
                    Ok(Appended::Refused { detail, .. } | Appended::Replayed { detail, .. }) => {
                        self.stop(format!("the store refused the room's snapshot: {detail}"))
                    }
                    Err(error) => self.stop(format!("the store failed: {error}")),
                }
            }
            Waits::Forward { .. } => {
                debug_assert!(false, "the head of the queue is an append");
            }
        }
        // What was only waiting for its turn goes now.
        while let Some(Pending {
            waits: Waits::Forward { .. },
            ..
        }) = self.pending.front()
        {
            let Some(Pending {
                stamp,
                bytes,
                waits: Waits::Forward { to },
            }) = self.pending.pop_front()
            else {
                break;
            };
            if self.stopped {
                continue;
            }
            self.forward_in_turn(stamp.sender, to, bytes);
        }
        if self.shared {
            self.pump_followed(self.now);
        }
        self.sweep();
    }

    fn answer(
        &mut self,
        node: NodeId,
        step: Step,
        bytes: Bytes,
        result: Result<Appended, StoreError>,
    ) {
        let conn = self.nodes.get(&node).and_then(|n| n.conn);
        match result {
            Ok(Appended::Stored {
                position,
                bytes: stored,
            }) if self.shared => {
                // Fanned out when the log comes back, in its order (`followed`); the sender's
                // acknowledgement follows every entry before it, as on a relay of its own
                // (its client counts on it: what was logged before came first).
                self.awaited = self.awaited.max(position);
                self.stored_bytes = stored;
                let ack = Bytes::from(Frame::Ack { step, position }.encode());
                self.held.push_back(Held {
                    after: position,
                    sender: node,
                    to: None,
                    ack: Some(step),
                    bytes: ack,
                    update: if_update(&bytes),
                });
                self.release_held();
            }
            Ok(Appended::Stored {
                position,
                bytes: stored,
            }) => {
                self.published = position;
                self.stored_bytes = stored;
                if let Some(conn) = conn {
                    let ack = Frame::Ack { step, position };
                    self.outputs.push_back(Output::Send {
                        to: conn,
                        bytes: Bytes::from(ack.encode()),
                    });
                }
                let positioned = with_position(&bytes, position)
                    .map(Bytes::from)
                    .unwrap_or(bytes);
                self.forward(conn.unwrap_or(0), None, &positioned);
            }
            // Another relay stored this step first: what this node sends next waits for the log
            // to be fanned out as far as its last stored message, or receivers would see the
            // next step before this one.
            Ok(Appended::Replayed { position, detail }) => {
                self.awaited = self.awaited.max(position);
                if let Some(conn) = conn {
                    if let Some((_, reason, why)) = self.owed.get(&(node, step)).cloned() {
                        self.refuse(conn, step, reason, why);
                    } else if self.shared && position > self.published {
                        // Answered in its turn: the log may yet refuse what it stored.
                        self.validator.record(Reason::Replay);
                        let answer = self.reject_frame(step, Reason::Replay, detail);
                        self.held.push_back(Held {
                            after: self.awaited,
                            sender: node,
                            to: None,
                            ack: Some(step),
                            bytes: answer,
                            update: if_update(&bytes),
                        });
                    } else {
                        self.refuse(conn, step, Reason::Replay, detail);
                    }
                }
            }
            Ok(Appended::Refused {
                reason: Reason::Replay,
                detail,
            }) => {
                if let Some(conn) = conn {
                    self.refuse(conn, step, Reason::Replay, detail);
                }
            }
            Ok(Appended::Refused { reason, detail }) => {
                if let Some(conn) = conn {
                    self.refuse(conn, step, reason, detail.clone());
                }
                self.stop(format!("the store refused a message: {detail}"));
            }
            Err(error) => {
                if let Some(conn) = conn {
                    let detail = format!("the relay could not store the message: {error}");
                    self.refuse(conn, step, Reason::Unavailable, detail);
                }
                self.stop(format!("the store failed: {error}"));
            }
        }
    }

    /// The validator already counted a failed append as its sender's; the only state to trust
    /// now is the store's. Every member goes; the next join loads the room again.
    fn stop(&mut self, reason: String) {
        self.stop_by(None, reason);
    }

    /// [`RoomCore::stop`], for a message of node `by` (see [`Output::Stop`]).
    fn stop_by(&mut self, by: Option<NodeId>, reason: String) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        // In connection order, so that what follows does not depend on a hash's order.
        let mut conns: Vec<(ConnId, NodeId)> = self
            .members
            .drain()
            .map(|(conn, m)| (conn, m.node))
            .collect();
        conns.sort_unstable();
        for &(_, node) in &conns {
            // Members on other relays hear that these left.
            let left = Bytes::from(Frame::PeerLeft { node }.encode());
            self.publish(None, 0, left, Some(Roster::Left(node)));
        }
        for (conn, _) in conns {
            self.outputs.push_back(Output::Close {
                conn,
                code: close::INTERNAL,
                reason: "the room stopped; reconnect to resume".into(),
            });
        }
        // Nothing of the room outlives it but what the store holds.
        self.held.clear();
        self.unjudged.clear();
        self.backlog.clear();
        self.bus_backlog.clear();
        self.nodes.clear();
        self.tokens.clear();
        self.departures.clear();
        self.outputs.push_back(Output::Stop { reason, by });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pattern::PatternConfig;
    use crate::wire::{Body, Json};

    fn room() -> RoomCore {
        let record = RoomRecord::new(RoomConfig::default(), 1);
        RoomCore::new("r".into(), record, &[], RoomLimits::default(), 0).unwrap()
    }

    fn req(name: &str, resume: Option<ResumeToken>) -> JoinRequest {
        JoinRequest {
            name: name.into(),
            since: 0,
            log: 0,
            resume,
            stored: None,
            access: Access::OPEN,
            floor: true,
            released: None,
        }
    }

    /// The floor a join's welcome carries.
    fn welcome_floor(joined: &Joined) -> Option<Step> {
        match Frame::decode(&joined.welcome) {
            Ok(Frame::Welcome { floor, .. }) => floor,
            other => panic!("{other:?}"),
        }
    }

    /// Hands `bytes` to the room as connection `conn`'s reader would.
    fn send(room: &mut RoomCore, now: u64, conn: ConnId, bytes: Bytes) {
        let read = Reader::new(Limits::default()).read(bytes);
        room.receive(now, conn, read);
    }

    /// Another relay's publication that `peer` joined, read from the bus.
    fn relayed_join(relay: u64, peer: Peer) -> Relayed {
        Relayed {
            relay,
            after: 0,
            to: None,
            high: 0,
            bytes: Bytes::from(Frame::PeerJoined { peer }.encode()),
        }
    }

    fn outputs(room: &mut RoomCore) -> Vec<Output> {
        std::iter::from_fn(|| room.poll_output()).collect()
    }

    fn data(node: NodeId, step: Step) -> Bytes {
        let stamp = Stamp {
            sender: node,
            step,
            pattern: PatternConfig::default().value(step),
        };
        Bytes::from(
            Frame::stamped(
                stamp,
                Body::Data {
                    data: Json::parse("1").unwrap(),
                },
            )
            .encode(),
        )
    }

    fn sent_to(outputs: &[Output], conn: ConnId) -> Vec<Frame> {
        outputs
            .iter()
            .filter_map(|o| match o {
                Output::Send { to, bytes } if *to == conn => {
                    Some(Frame::decode_with(bytes, &Limits::default()).unwrap())
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_message_is_acknowledged_only_once_stored_and_then_fanned_out() {
        let mut room = room();
        let a = room.join(0, 1, req("a", None), [1; 16]).unwrap();
        room.join(0, 2, req("b", None), [2; 16]).unwrap();
        outputs(&mut room);
        send(&mut room, 0, 1, data(a.node, 1));
        let out = outputs(&mut room);
        assert!(matches!(out.as_slice(), [Output::Append(_)]), "{out:?}");
        room.appended(Ok(Appended::Stored {
            position: 1,
            bytes: 10,
        }));
        let out = outputs(&mut room);
        assert_eq!(
            sent_to(&out, 1),
            [Frame::Ack {
                step: 1,
                position: 1
            }]
        );
        assert!(matches!(
            &out[1],
            Output::Fanout {
                except: Some(1),
                ..
            }
        ));
    }

    /// A member (a read-only one too) asks everyone for what an empty state vector lacks: the
    /// whole document. Every writer answered, each with all of it, for one small request. The
    /// room asks one writer, the next one each time, and never the asker or a reader.
    #[test]
    fn a_sync_request_to_everyone_goes_to_one_writer_in_turn() {
        let mut room = room();
        let reader = Access {
            write: false,
            ..Access::OPEN
        };
        let asker = room
            .join(
                0,
                1,
                JoinRequest {
                    access: reader,
                    ..req("a", None)
                },
                [1; 16],
            )
            .unwrap();
        room.join(0, 2, req("b", None), [2; 16]).unwrap();
        room.join(0, 3, req("c", None), [3; 16]).unwrap();
        room.join(
            0,
            4,
            JoinRequest {
                access: reader,
                ..req("d", None)
            },
            [4; 16],
        )
        .unwrap();
        outputs(&mut room);
        let mut asked = Vec::new();
        for step in 1..=4 {
            let request = Frame::stamped(
                Stamp {
                    sender: asker.node,
                    step,
                    pattern: PatternConfig::default().value(step),
                },
                Body::SyncRequest {
                    doc: "*".into(),
                    state_vector: Vec::new(),
                    to: 0,
                },
            );
            send(&mut room, 0, 1, Bytes::from(request.encode()));
            let out = outputs(&mut room);
            assert!(
                !out.iter().any(|o| matches!(o, Output::Fanout { .. })),
                "{out:?}"
            );
            let to: Vec<ConnId> = out
                .iter()
                .filter_map(|o| match o {
                    Output::Send { to, .. } => Some(*to),
                    _ => None,
                })
                .collect();
            assert_eq!(to.len(), 1, "{out:?}");
            asked.push(to[0]);
        }
        assert_eq!(asked, [2, 3, 2, 3]);
    }

    /// A rename reaches the other members, and a newcomer's welcome lists the new name.
    #[test]
    fn a_member_renames_itself_for_every_peer() {
        let mut room = room();
        let a = room.join(0, 1, req("ada", None), [1; 16]).unwrap();
        room.join(0, 2, req("bob", None), [2; 16]).unwrap();
        outputs(&mut room);
        let rename = Frame::Rename {
            name: "grace".into(),
        };
        send(&mut room, 0, 1, Bytes::from(rename.encode()));
        let out = outputs(&mut room);
        let renamed = Frame::PeerRenamed {
            peer: Peer {
                node: a.node,
                name: "grace".into(),
            },
        };
        assert!(
            matches!(
                out.as_slice(),
                [Output::Fanout { except: Some(1), bytes }] if *bytes == renamed.encode()
            ),
            "{out:?}"
        );
        let c = room.join(0, 3, req("cy", None), [3; 16]).unwrap();
        let Frame::Welcome { peers, .. } = Frame::decode(&c.welcome).unwrap() else {
            panic!("a welcome");
        };
        assert!(peers.contains(&Peer {
            node: a.node,
            name: "grace".into()
        }));
    }

    /// A heartbeat is answered to its sender alone. A member the room hears nothing from for
    /// the idle timeout (its network went away without closing the socket) is closed as
    /// `SILENT`, and its peers hear that it left; a member whose heartbeats come in stays.
    #[test]
    fn a_silent_member_is_closed_and_a_heartbeat_is_answered() {
        let limits = RoomLimits {
            idle_timeout: 10_000,
            ..RoomLimits::default()
        };
        let mut room = with_limits(limits);
        room.join(0, 1, req("a", None), [1; 16]).unwrap();
        let b = room.join(0, 2, req("b", None), [2; 16]).unwrap();
        outputs(&mut room);
        let heartbeat = Bytes::from(Frame::Heartbeat.encode());
        for t in [3_000, 6_000, 9_000] {
            send(&mut room, t, 1, heartbeat.clone());
            let out = outputs(&mut room);
            assert!(
                matches!(out.as_slice(), [Output::Send { to: 1, bytes }] if *bytes == heartbeat),
                "{out:?}"
            );
        }
        let due = room
            .next_deadline()
            .expect("the room looks for silent members");
        assert!(
            due <= 11_500,
            "it looks every quarter of the timeout, not at {due}"
        );
        room.tick(11_500);
        let out = outputs(&mut room);
        let closed: Vec<(ConnId, u16)> = out
            .iter()
            .filter_map(|o| match o {
                Output::Close { conn, code, reason } => {
                    assert!(reason.contains("nothing heard"), "{reason}");
                    Some((*conn, *code))
                }
                _ => None,
            })
            .collect();
        assert_eq!(closed, [(2, close::SILENT)]);
        let left = Frame::PeerLeft { node: b.node }.encode();
        assert!(
            out.iter()
                .any(|o| matches!(o, Output::Fanout { bytes, .. } if *bytes == left)),
            "{out:?}"
        );
        assert_eq!(room.members(), 1);
        // Without an idle timeout, a silent member stays.
        let mut room = with_limits(RoomLimits {
            idle_timeout: 0,
            ..RoomLimits::default()
        });
        room.join(0, 1, req("a", None), [1; 16]).unwrap();
        room.tick(3_600_000);
        assert_eq!(room.members(), 1);
        assert_eq!(room.next_deadline(), None);
    }

    /// A heartbeat over the rate limit is heard and not answered: it is never refused, since a
    /// refusal would stop the member's stamped frames until its fence.
    #[test]
    fn a_heartbeat_over_the_rate_goes_unanswered_and_opens_no_gap() {
        let mut room = with_limits(RoomLimits {
            rate: 1,
            burst: 1,
            ..RoomLimits::default()
        });
        let a = room.join(0, 1, req("a", None), [1; 16]).unwrap();
        outputs(&mut room);
        let heartbeat = Bytes::from(Frame::Heartbeat.encode());
        send(&mut room, 0, 1, heartbeat.clone());
        assert_eq!(sent_to(&outputs(&mut room), 1), [Frame::Heartbeat]);
        send(&mut room, 0, 1, heartbeat);
        assert_eq!(outputs(&mut room), [], "neither answered nor refused");
        // Once the bucket refills, a stamped frame is taken: no gap was opened.
        send(&mut room, 2_000, 1, data(a.node, 1));
        let out = outputs(&mut room);
        assert!(matches!(out.as_slice(), [Output::Append(_)]), "{out:?}");
    }

    /// In a shared room, a client that gave up its connection here (gone silent) and joined
    /// another relay is still a peer: when this room closes the silent connection, its members
    /// do not hear that the node left.
    #[test]
    fn a_silent_connection_whose_node_joined_another_relay_closes_without_a_leave() {
        let mut room = with_limits(RoomLimits {
            idle_timeout: 10_000,
            ..RoomLimits::default()
        });
        room.share();
        let a = room.join(0, 1, req("a", None), [1; 16]).unwrap();
        room.join(0, 2, req("b", None), [2; 16]).unwrap();
        outputs(&mut room);
        let joined = relayed_join(
            9,
            Peer {
                node: a.node,
                name: "a".into(),
            },
        );
        room.followed(5_000, &[], &[joined], true);
        send(&mut room, 9_000, 2, Bytes::from(Frame::Heartbeat.encode()));
        room.tick(12_000);
        let out = outputs(&mut room);
        assert!(
            out.iter().any(
                |o| matches!(o, Output::Close { conn: 1, code, .. } if *code == close::SILENT)
            ),
            "{out:?}"
        );
        let left = Frame::PeerLeft { node: a.node }.encode();
        assert!(
            !out.iter()
                .any(|o| matches!(o, Output::Fanout { bytes, .. } if *bytes == left)),
            "the members here still see it: {out:?}"
        );
        assert_eq!(room.members(), 1);
    }

    /// The store keeps the latest presence of each member on another relay: a room opening
    /// here takes them for its late joiners, and a relay that missed publications reads them
    /// again, tells its members those that changed (cleared ones too), and drops the older
    /// presences still waiting for their turn.
    #[test]
    fn the_stored_presences_of_the_other_relays_members_are_the_latest() {
        let mut room = room();
        room.share();
        let peer = |node, name: &str| Peer {
            node,
            name: name.into(),
        };
        let presence = |node, cursor: serde_json::Value| {
            Bytes::from(
                Frame::Presence {
                    sender: node,
                    data: Json::from_value(&cursor).unwrap(),
                }
                .encode(),
            )
        };
        room.remote_members(vec![(9, peer(100, "r")), (9, peer(101, "s"))]);
        room.remote_presences(vec![
            presence(100, serde_json::json!(1)),
            presence(101, serde_json::json!(1)),
            // Not a member on another relay: nothing to keep.
            presence(555, serde_json::json!(1)),
        ]);
        let a = room.join(0, 1, req("a", None), [1; 16]).unwrap();
        assert_eq!(
            a.presences,
            [
                presence(100, serde_json::json!(1)),
                presence(101, serde_json::json!(1))
            ]
        );
        outputs(&mut room);
        // Read again: 100 moved its cursor, 101 cleared its presence.
        room.resync_remote(vec![(9, peer(100, "r")), (9, peer(101, "s"))]);
        room.remote_presences(vec![presence(100, serde_json::json!(2))]);
        let told: Vec<Bytes> = outputs(&mut room)
            .into_iter()
            .filter_map(|o| match o {
                Output::Fanout { bytes, .. } => Some(bytes),
                _ => None,
            })
            .collect();
        assert_eq!(
            told,
            [
                presence(100, serde_json::json!(2)),
                presence(101, serde_json::Value::Null)
            ]
        );
        let late = room.join(0, 2, req("b", None), [2; 16]).unwrap();
        assert_eq!(late.presences, [presence(100, serde_json::json!(2))]);
    }

    /// A shared room's relay that missed publications of the others reads their members again:
    /// its members hear who joined, left or was renamed meanwhile, and nothing of the members
    /// that did not change, nor of its own.
    #[test]
    fn a_relay_that_missed_publications_tells_its_members_what_changed() {
        let mut room = room();
        room.share();
        let peer = |node, name: &str| Peer {
            node,
            name: name.into(),
        };
        room.remote_members(vec![
            (9, peer(100, "stays")),
            (9, peer(101, "leaves")),
            (8, peer(102, "old")),
        ]);
        let a = room.join(0, 1, req("a", None), [1; 16]).unwrap();
        outputs(&mut room);
        room.resync_remote(vec![
            (9, peer(100, "stays")),
            (8, peer(102, "new")),
            (7, peer(103, "joined")),
            (9, peer(a.node, "a")),
        ]);
        let told: Vec<Frame> = outputs(&mut room)
            .into_iter()
            .filter_map(|o| match o {
                Output::Fanout {
                    except: None,
                    bytes,
                } => Some(Frame::decode(&bytes).unwrap()),
                _ => None,
            })
            .collect();
        assert_eq!(
            told,
            [
                Frame::PeerLeft { node: 101 },
                Frame::PeerRenamed {
                    peer: peer(102, "new")
                },
                Frame::PeerJoined {
                    peer: peer(103, "joined")
                },
            ]
        );
        // What the relay reads later of what it read again is not said twice.
        let again = Relayed {
            relay: 7,
            after: 0,
            to: None,
            high: 0,
            bytes: Bytes::from(
                Frame::PeerJoined {
                    peer: peer(103, "joined"),
                }
                .encode(),
            ),
        };
        room.followed(0, &[], &[again], true);
        let fanouts = |out: Vec<Output>| {
            out.into_iter()
                .filter(|o| matches!(o, Output::Fanout { .. }))
                .count()
        };
        assert_eq!(fanouts(outputs(&mut room)), 0, "a join said twice");
        // a's client is on relay 9 as well (it gave up its connection here): when that
        // connection closes, the members here do not hear that a left.
        room.leave(1);
        assert_eq!(fanouts(outputs(&mut room)), 0, "a left, it seems");
        room.resync_remote(vec![
            (9, peer(100, "stays")),
            (8, peer(102, "new")),
            (7, peer(103, "joined")),
            (9, peer(a.node, "a")),
        ]);
        assert!(outputs(&mut room).is_empty(), "nothing changed");
    }

    /// The members read again hold what every publication read before says of them: one read
    /// earlier but still waiting for its turn (behind log entries not fanned out yet) does not
    /// undo them. Here a join waits, its member's leave went from the bus unread, and the
    /// members read again lack it: it does not come back as a member no one will see leave.
    #[test]
    fn a_publication_waiting_for_its_turn_does_not_undo_the_members_read_again() {
        let mut room = room();
        room.share();
        room.join(0, 1, req("a", None), [1; 16]).unwrap();
        outputs(&mut room);
        let joined = Relayed {
            relay: 7,
            after: 2,
            to: None,
            high: 0,
            bytes: Bytes::from(
                Frame::PeerJoined {
                    peer: Peer {
                        node: 104,
                        name: "gone".into(),
                    },
                }
                .encode(),
            ),
        };
        let signal = Relayed {
            after: 2,
            bytes: data(50, 3),
            ..joined.clone()
        };
        room.followed(0, &[], &[joined, signal], true);
        assert!(outputs(&mut room).is_empty(), "it waits for position 2");
        room.resync_remote(Vec::new());
        outputs(&mut room);
        let log = [
            followed(1, 50, 1, &data(50, 1), 0),
            followed(2, 50, 2, &data(50, 2), 0),
        ];
        room.followed(0, &log, &[], true);
        let told: Vec<Frame> = outputs(&mut room)
            .into_iter()
            .filter_map(|o| match o {
                Output::Fanout { bytes, .. } => Some(
                    Frame::decode_positioned(&bytes, &Limits::default())
                        .unwrap()
                        .frame,
                ),
                _ => None,
            })
            .collect();
        assert!(
            !told
                .iter()
                .any(|f| matches!(f, Frame::PeerJoined { peer } if peer.node == 104)),
            "{told:?}"
        );
        // What else waited still goes out, in its turn.
        assert_eq!(steps(&told), [(50, 1), (50, 2), (50, 3)]);
    }

    /// The relay holds each member's latest presence in memory and gives a late joiner those of
    /// the members present after its welcome; `null` clears one, and it goes with its member.
    #[test]
    fn a_late_joiner_gets_the_presences_of_the_members_present() {
        let mut room = room();
        let a = room.join(0, 1, req("ada", None), [1; 16]).unwrap();
        let b = room.join(0, 2, req("bob", None), [2; 16]).unwrap();
        let presence = |node, data: serde_json::Value| Frame::Presence {
            sender: node,
            data: Json::from_value(&data).unwrap(),
        };
        let first = presence(a.node, serde_json::json!({ "cursor": 1 }));
        let latest = presence(a.node, serde_json::json!({ "cursor": 2 }));
        send(&mut room, 0, 1, Bytes::from(first.encode()));
        send(&mut room, 0, 1, Bytes::from(latest.encode()));
        send(
            &mut room,
            0,
            2,
            Bytes::from(presence(b.node, serde_json::json!("x")).encode()),
        );
        send(
            &mut room,
            0,
            2,
            Bytes::from(presence(b.node, serde_json::Value::Null).encode()),
        );
        outputs(&mut room);
        let c = room.join(0, 3, req("cy", None), [3; 16]).unwrap();
        assert_eq!(c.presences, vec![Bytes::from(latest.encode())]);
        room.leave(1);
        let d = room.join(0, 4, req("dee", None), [4; 16]).unwrap();
        assert!(d.presences.is_empty(), "a presence goes with its member");
    }

    /// A member stamping each message 999 steps ahead (within `maxFuture`) moves the room step
    /// by one per message, as an honest member does: in a game room with a stale window of 40,
    /// the others' inputs stay fresh.
    #[test]
    fn a_member_stamping_far_ahead_cannot_drag_the_room_step() {
        let config = RoomConfig {
            stale_window: Some(40),
            ..RoomConfig::default()
        };
        let mut room = RoomCore::new(
            "r".into(),
            RoomRecord::new(config, 1),
            &[],
            RoomLimits::default(),
            0,
        )
        .unwrap();
        let hostile = room.join(0, 1, req("h", None), [1; 16]).unwrap();
        let honest = room.join(0, 2, req("a", None), [2; 16]).unwrap();
        outputs(&mut room);
        let mut step = 0;
        for i in 1..=50u64 {
            step = room.high() + 999;
            send(&mut room, i, 1, data(hostile.node, step));
            assert_eq!(room.high(), i, "the room step counts messages");
        }
        assert!(step > 1_000, "the hostile member is far ahead");
        // The honest member's clock followed the same messages: it is at 50, and its input
        // is neither stale nor refused.
        send(&mut room, 60, 2, data(honest.node, 51));
        let out = outputs(&mut room);
        assert!(sent_to(&out, 2).is_empty(), "{:?}", sent_to(&out, 2));
        assert_eq!(room.counters().accepted, 51);
        assert_eq!(room.high(), 51);
    }

    #[test]
    fn after_a_refusal_every_later_frame_is_out_of_order_until_the_fence() {
        let mut room = room();
        let a = room.join(0, 1, req("a", None), [1; 16]).unwrap();
        outputs(&mut room);
        send(&mut room, 0, 1, data(a.node, 5));
        // Sent again before it is stored: the store's answer is the one it gets.
        send(&mut room, 0, 1, data(a.node, 5));
        assert!(sent_to(&outputs(&mut room), 1).is_empty());
        stored(&mut room, 1);
        send(&mut room, 0, 1, data(a.node, 5)); // a replay: refused, but opens no gap
        send(&mut room, 0, 1, data(a.node, 5_000)); // too far ahead: opens a gap
        send(&mut room, 0, 1, data(a.node, 6)); // valid, but after the gap
        let rejects: Vec<Reason> = sent_to(&outputs(&mut room), 1)
            .into_iter()
            .filter_map(|f| match f {
                Frame::Reject { reason, .. } => Some(reason),
                _ => None,
            })
            .collect();
        assert_eq!(
            rejects,
            [Reason::Replay, Reason::FutureStep, Reason::OutOfOrder]
        );
        send(
            &mut room,
            0,
            1,
            Bytes::from(Frame::Fence { step: 5_000 }.encode()),
        );
        send(&mut room, 0, 1, data(a.node, 6));
        let out = outputs(&mut room);
        assert_eq!(sent_to(&out, 1), [Frame::Fence { step: 5_000 }]);
        assert!(matches!(out.last(), Some(Output::Append(a)) if a.step == 6));
    }

    #[test]
    fn a_fence_that_ends_a_gap_is_never_refused_for_the_rate_and_a_large_message_passes_in_debt() {
        let limits = RoomLimits {
            limits: Limits {
                max_frame: 1_024,
                ..Limits::default()
            },
            rate: 10,
            burst: 10,
            ..RoomLimits::default()
        };
        let mut room = RoomCore::new(
            "r".into(),
            RoomRecord::new(RoomConfig::default(), 1),
            &[],
            limits,
            0,
        )
        .unwrap();
        let a = room.join(0, 1, req("a", None), [1; 16]).unwrap();
        outputs(&mut room);
        for step in 1..=11 {
            send(&mut room, 0, 1, data(a.node, step));
        }
        let out = outputs(&mut room);
        assert!(
            sent_to(&out, 1).iter().any(|f| matches!(
                f,
                Frame::Reject {
                    reason: Reason::RateLimited,
                    step: 11,
                    ..
                }
            )),
            "{out:?}"
        );
        // The bucket is empty: the fence still passes.
        send(
            &mut room,
            0,
            1,
            Bytes::from(Frame::Fence { step: 11 }.encode()),
        );
        assert_eq!(sent_to(&outputs(&mut room), 1), [Frame::Fence { step: 11 }]);
        // A message of 20 parts, more than the whole bucket, passes once it is half full.
        let stamp = Stamp {
            sender: a.node,
            step: 11,
            pattern: PatternConfig::default().value(11),
        };
        let big = Frame::stamped(
            stamp,
            Body::Update {
                doc: "d".into(),
                update: SharedDoc::with_client_id(1)
                    .insert("d", 0, &"x".repeat(20_000))
                    .unwrap(),
            },
        )
        .encode();
        let mut reader = Reader::new(limits.limits);
        for piece in part::fragment(&big, 1_024) {
            let read = reader.read(Bytes::from(piece));
            room.receive(500, 1, read);
        }
        let out = outputs(&mut room);
        assert!(
            matches!(out.as_slice(), [Output::Append(append)] if append.step == 11),
            "{out:?}"
        );
    }

    #[test]
    fn a_client_set_position_is_refused_before_it_moves_the_room() {
        let mut room = room();
        let a = room.join(0, 1, req("a", None), [1; 16]).unwrap();
        outputs(&mut room);
        let positioned = with_position(&data(a.node, 500), 9).unwrap();
        send(&mut room, 0, 1, Bytes::from(positioned));
        assert_eq!(room.high(), 0);
        let out = outputs(&mut room);
        assert!(matches!(
            sent_to(&out, 1).as_slice(),
            [Frame::Reject {
                reason: Reason::Malformed,
                step: 500,
                ..
            }]
        ));
    }

    #[test]
    fn a_resumed_node_keeps_its_id_and_replaces_its_old_connection() {
        let mut room = room();
        let first = room.join(0, 1, req("a", None), [7; 16]).unwrap();
        outputs(&mut room);
        let again = room.join(0, 2, req("a", Some([7; 16])), [8; 16]).unwrap();
        assert_eq!(again.node, first.node);
        let out = outputs(&mut room);
        assert!(out.iter().any(|o| matches!(
            o,
            Output::Close {
                conn: 1,
                code: close::REPLACED,
                ..
            }
        )));
        let unknown = room.join(0, 3, req("a", Some([9; 16])), [3; 16]).unwrap();
        assert_ne!(unknown.node, first.node, "an unknown token gets a new node");
    }

    fn update(node: NodeId, step: Step, update: Vec<u8>) -> Bytes {
        let stamp = Stamp {
            sender: node,
            step,
            pattern: PatternConfig::default().value(step),
        };
        Bytes::from(
            Frame::stamped(
                stamp,
                Body::Update {
                    doc: "content".into(),
                    update,
                },
            )
            .encode(),
        )
    }

    fn stored(room: &mut RoomCore, position: u64) {
        room.appended(Ok(Appended::Stored {
            position,
            bytes: position * 100,
        }));
    }

    fn with_limits(limits: RoomLimits) -> RoomCore {
        RoomCore::new(
            "r".into(),
            RoomRecord::new(RoomConfig::default(), 1),
            &[],
            limits,
            0,
        )
        .unwrap()
    }

    fn rejects(out: &[Output], conn: ConnId) -> Vec<Reason> {
        sent_to(out, conn)
            .into_iter()
            .filter_map(|f| match f {
                Frame::Reject { reason, .. } => Some(reason),
                _ => None,
            })
            .collect()
    }

    /// An update that would hang every replica that reads the text (a client's blocks in two
    /// sections of one update) is refused before the store or any member sees it, and the
    /// room's document is as it was.
    #[test]
    fn an_update_that_does_not_apply_is_refused_before_the_store_sees_it() {
        let mut room = room();
        let a = room.join(0, 1, req("a", None), [1; 16]).unwrap();
        outputs(&mut room);
        let writer = SharedDoc::with_client_id(11);
        let good = writer.insert("content", 0, "hello").unwrap();
        send(&mut room, 0, 1, update(a.node, 1, good));
        assert!(matches!(outputs(&mut room).as_slice(), [Output::Append(_)]));
        stored(&mut room, 1);
        outputs(&mut room);
        let poisoned = vec![
            2, 1, 22, 0, 193, 11, 4, 11, 11, 1, 1, 22, 0, 193, 11, 4, 11, 11, 1, 1, 11, 1, 4, 1,
        ];
        send(&mut room, 0, 1, update(a.node, 2, poisoned));
        let out = outputs(&mut room);
        assert!(
            !out.iter().any(|o| matches!(o, Output::Append(_))),
            "{out:?}"
        );
        assert_eq!(rejects(&out, 1), [Reason::Malformed]);
        assert_eq!(room.document().text("content"), "hello");
        assert_eq!(room.high(), 1, "a refused message moves nothing");
        // Not even the sender's last step: step 2 is still free after the fence.
        send(
            &mut room,
            0,
            1,
            Bytes::from(Frame::Fence { step: 2 }.encode()),
        );
        send(&mut room, 0, 1, data(a.node, 2));
        assert!(matches!(outputs(&mut room).last(), Some(Output::Append(a)) if a.step == 2));
    }

    fn answer(node: NodeId, step: Step, update: Vec<u8>) -> Bytes {
        let stamp = Stamp {
            sender: node,
            step,
            pattern: PatternConfig::default().value(step),
        };
        let body = Body::SyncState {
            doc: "content".into(),
            update,
            to: 0,
        };
        Bytes::from(Frame::stamped(stamp, body).encode())
    }

    /// A member answers, unasked and to everyone, with blocks under another member's Yjs
    /// client id at that member's next clock, or with a deletion no one made. Every replica
    /// that took it would keep it and ignore the real edit at those ids: the room refuses it
    /// (`desync`, naming the client and clocks), and it reaches no one. An answer that holds
    /// only what the room stored goes on.
    #[test]
    fn a_sync_answer_that_holds_what_the_room_has_not_stored_reaches_no_one() {
        let mut room = room();
        let a = room.join(0, 1, req("a", None), [1; 16]).unwrap();
        let b = room.join(0, 2, req("b", None), [2; 16]).unwrap();
        room.join(0, 3, req("c", None), [3; 16]).unwrap();
        outputs(&mut room);
        let writer = SharedDoc::with_client_id(11);
        let hello = writer.insert("content", 0, "hello ").unwrap();
        send(&mut room, 0, 1, update(a.node, 1, hello.clone()));
        outputs(&mut room);
        stored(&mut room, 1);
        outputs(&mut room);

        // The forger holds what a wrote, writes as a's client, and deletes a's text.
        let forger = SharedDoc::with_client_id(11);
        forger.apply_update(&hello).unwrap();
        let evil = forger.insert("content", 6, "EVIL").unwrap();
        let wipe = forger.delete("content", 0, 6).unwrap();
        let quiet = |out: &[Output]| {
            !out.iter()
                .any(|o| matches!(o, Output::Fanout { .. } | Output::Send { to: 1 | 3, .. }))
        };
        send(&mut room, 0, 2, answer(b.node, 1, evil));
        let out = outputs(&mut room);
        assert_eq!(rejects(&out, 2), [Reason::Desync]);
        assert!(quiet(&out), "{out:?}");
        let detail = sent_to(&out, 2)
            .into_iter()
            .find_map(|f| match f {
                Frame::Reject { detail, .. } => Some(detail),
                _ => None,
            })
            .unwrap();
        assert!(detail.contains("client 11's clocks 6..10"), "{detail}");
        send(
            &mut room,
            0,
            2,
            Bytes::from(Frame::Fence { step: 1 }.encode()),
        );
        outputs(&mut room);
        send(&mut room, 0, 2, answer(b.node, 1, wipe));
        let out = outputs(&mut room);
        assert_eq!(rejects(&out, 2), [Reason::Desync]);
        assert!(quiet(&out), "{out:?}");
        assert_eq!(room.document().text("content"), "hello ");

        // What a replica that holds the room's document answers goes on.
        send(
            &mut room,
            0,
            2,
            Bytes::from(Frame::Fence { step: 1 }.encode()),
        );
        outputs(&mut room);
        let honest = SharedDoc::with_client_id(22);
        honest.apply_update(&hello).unwrap();
        send(
            &mut room,
            0,
            2,
            answer(b.node, 1, honest.diff(&[0]).unwrap()),
        );
        let out = outputs(&mut room);
        assert!(rejects(&out, 2).is_empty(), "{out:?}");
        assert!(
            out.iter().any(|o| matches!(o, Output::Fanout { .. })),
            "{out:?}"
        );
    }

    /// Sync answers spend the sender's bandwidth, as signals do: a member cannot send everyone
    /// answers the room reads through, without end.
    #[test]
    fn sync_answers_spend_the_senders_bandwidth() {
        let mut room = with_limits(RoomLimits {
            bandwidth: 1_024,
            bandwidth_burst: 8_192,
            ..RoomLimits::default()
        });
        let a = room.join(0, 1, req("a", None), [1; 16]).unwrap();
        room.join(0, 2, req("b", None), [2; 16]).unwrap();
        outputs(&mut room);
        let writer = SharedDoc::with_client_id(11);
        let text = writer.insert("content", 0, &"x".repeat(3_000)).unwrap();
        send(&mut room, 0, 1, update(a.node, 1, text.clone()));
        outputs(&mut room);
        stored(&mut room, 1);
        outputs(&mut room);
        send(&mut room, 0, 1, answer(a.node, 2, text.clone()));
        assert!(rejects(&outputs(&mut room), 1).is_empty());
        send(&mut room, 0, 1, answer(a.node, 3, text));
        assert_eq!(rejects(&outputs(&mut room), 1), [Reason::RateLimited]);
    }

    /// Past the compaction threshold the room appends its own snapshot; loaded again from the
    /// snapshot and the tail, the document is the same.
    #[test]
    fn the_room_compacts_its_document_and_loads_from_the_snapshot_and_tail() {
        let mut room = with_limits(RoomLimits {
            compact_updates: 5,
            ..RoomLimits::default()
        });
        let a = room.join(0, 1, req("a", None), [1; 16]).unwrap();
        outputs(&mut room);
        let writer = SharedDoc::with_client_id(11);
        let mut appends = Vec::new();
        for step in 1..=7u64 {
            let u = writer.insert("content", 0, &step.to_string()).unwrap();
            send(&mut room, step, 1, update(a.node, step, u));
            for o in outputs(&mut room) {
                if let Output::Append(append) = o {
                    appends.push(append);
                }
            }
        }
        let snapshots: Vec<usize> = appends
            .iter()
            .enumerate()
            .filter(|(_, a)| a.snapshot)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(snapshots, [5], "after the fifth update");
        let snapshot = &appends[5];
        assert_eq!((snapshot.sender, snapshot.token), (0, None));
        assert!(matches!(
            Frame::decode(&snapshot.bytes),
            Ok(Frame::Snapshot { doc, .. }) if doc == WHOLE_DOC
        ));
        for position in 1..=appends.len() as u64 {
            stored(&mut room, position);
        }
        let out = outputs(&mut room);
        let acks = sent_to(&out, 1)
            .iter()
            .filter(|f| matches!(f, Frame::Ack { .. }))
            .count();
        assert_eq!(acks, 7, "the snapshot is not a member's message");
        // What the store keeps: the snapshot, then the two updates after it.
        let logged: Vec<Logged> = appends[5..]
            .iter()
            .enumerate()
            .map(|(i, a)| Logged {
                position: 6 + i as u64,
                sender: a.sender,
                bytes: Bytes::from(with_position(&a.bytes, 6 + i as u64).unwrap()),
            })
            .collect();
        let record = RoomRecord {
            position: 8,
            ..RoomRecord::new(RoomConfig::default(), 1)
        };
        let again = RoomCore::new("r".into(), record, &logged, RoomLimits::default(), 0).unwrap();
        assert_eq!(again.document().text("content"), writer.text("content"));
        assert_eq!(again.load_failures(), 0);
    }

    /// A Yjs update may delete clocks no one has written yet, and every replica then deletes
    /// what later comes at them: a member could delete another's next edits as they arrive,
    /// everywhere. The room refuses such an update and takes one that deletes what exists.
    #[test]
    fn an_update_that_deletes_clocks_no_one_wrote_is_refused() {
        let mut room = room();
        let a = room.join(0, 1, req("a", None), [1; 16]).unwrap();
        let b = room.join(0, 2, req("b", None), [2; 16]).unwrap();
        let victim = SharedDoc::with_client_id(11);
        let u = victim.insert("content", 0, "hello").unwrap();
        send(&mut room, 0, 1, update(a.node, 1, u));
        stored(&mut room, 1);
        outputs(&mut room);
        // lib0 varuints (the wire's LEB128): no blocks; a delete set of one client, one range.
        let deletes = |start: u64, len: u64| {
            let mut w = crate::wire::Writer::with_capacity(16);
            for n in [0, 1, 11, 1, start, len] {
                w.var(n);
            }
            w.0
        };
        // After a refusal the client fences before it sends again.
        let fence = |room: &mut RoomCore, step| {
            send(room, 0, 2, Bytes::from(Frame::Fence { step }.encode()));
            outputs(room);
        };
        send(&mut room, 0, 2, update(b.node, 2, deletes(5, 1_000_000)));
        let out = outputs(&mut room);
        assert_eq!(rejects(&out, 2), [Reason::Malformed]);
        assert!(!out.iter().any(|o| matches!(o, Output::Append(_))));
        fence(&mut room, 3);
        // Half of it exists, half not: refused as well.
        send(&mut room, 0, 2, update(b.node, 3, deletes(3, 4)));
        assert_eq!(rejects(&outputs(&mut room), 2), [Reason::Malformed]);
        fence(&mut room, 4);
        // What exists may be deleted.
        send(&mut room, 0, 2, update(b.node, 4, deletes(1, 3)));
        let out = outputs(&mut room);
        assert!(rejects(&out, 2).is_empty());
        assert!(out.iter().any(|o| matches!(o, Output::Append(_))));
        stored(&mut room, 2);
        assert_eq!(room.document().text("content"), "ho");
    }

    /// A member's catch-up reads the log a page at a time, and the store drops what a snapshot
    /// covers as soon as the snapshot is durable: a member that joined before the snapshot, and
    /// may still be reading, gets it, positioned after its catch-up. Once its driver says the
    /// catch-up was read to the end, it gets no other.
    #[test]
    fn a_member_still_catching_up_gets_the_snapshot_that_dropped_its_entries() {
        let mut room = with_limits(RoomLimits {
            compact_updates: 3,
            ..RoomLimits::default()
        });
        let a = room.join(0, 1, req("a", None), [1; 16]).unwrap();
        room.caught_up(1);
        let writer = SharedDoc::with_client_id(11);
        let position = std::cell::Cell::new(0);
        // A's update at `step`, and every append the store makes durable at once.
        let write = |room: &mut RoomCore, step: u64| {
            let u = writer.insert("content", 0, &step.to_string()).unwrap();
            send(room, step, 1, update(a.node, step, u));
            let mut out = Vec::new();
            loop {
                let batch = outputs(room);
                if batch.is_empty() {
                    return out;
                }
                for o in batch {
                    if let Output::Append(_) = o {
                        position.set(position.get() + 1);
                        stored(room, position.get());
                    } else {
                        out.push(o);
                    }
                }
            }
        };
        write(&mut room, 1);
        write(&mut room, 2);
        room.join(0, 2, req("b", None), [2; 16]).unwrap();
        outputs(&mut room);
        // The third update calls for a snapshot, at position 4; B's catch-up reads up to 2.
        let out = write(&mut room, 3);
        let snapshots = |out: &[Output], conn| -> Vec<Option<u64>> {
            out.iter()
                .filter_map(|o| match o {
                    Output::Send { to, bytes } if *to == conn => {
                        Frame::decode_positioned(bytes, &Limits::default()).ok()
                    }
                    _ => None,
                })
                .filter(|p| matches!(p.frame, Frame::Snapshot { .. }))
                .map(|p| p.position)
                .collect()
        };
        assert_eq!(snapshots(&out, 2), [Some(4)]);
        assert!(snapshots(&out, 1).is_empty(), "A's catch-up was over");
        // C joins, and says its catch-up is read while a snapshot is on its way to the store
        // (which may have dropped the entries already): it gets that snapshot all the same.
        room.join(0, 3, req("c", None), [3; 16]).unwrap();
        outputs(&mut room);
        let u = writer.insert("content", 0, "4").unwrap();
        send(&mut room, 4, 1, update(a.node, 4, u));
        let u = writer.insert("content", 0, "5").unwrap();
        send(&mut room, 5, 1, update(a.node, 5, u));
        let u = writer.insert("content", 0, "6").unwrap();
        send(&mut room, 6, 1, update(a.node, 6, u));
        let appends = outputs(&mut room)
            .into_iter()
            .filter(|o| matches!(o, Output::Append(_)))
            .count();
        assert_eq!(appends, 4, "three updates and a snapshot");
        room.caught_up(3);
        let mut out = Vec::new();
        for _ in 0..appends {
            position.set(position.get() + 1);
            stored(&mut room, position.get());
            out.extend(outputs(&mut room));
        }
        assert_eq!(snapshots(&out, 3), [Some(position.get())]);
        // B's catch-up is read to the end: the next snapshot is not for it.
        room.caught_up(2);
        let mut out = write(&mut room, 7);
        out.extend(write(&mut room, 8));
        out.extend(write(&mut room, 9));
        assert!(out.iter().any(|o| matches!(o, Output::Fanout { .. })));
        assert!(snapshots(&out, 2).is_empty());
    }

    /// Node ids come from blocks the store reserved: the room asks for the next block when half
    /// of one is left, and refuses a join rather than hand out an id outside a block.
    #[test]
    fn node_ids_come_only_from_reserved_blocks() {
        let mut room = room();
        let mut ids = std::collections::HashSet::new();
        let mut asked = 0;
        for conn in 0..NODE_BLOCK {
            let joined = room.join(0, conn, req("a", None), [0; 16]);
            let joined = joined.unwrap();
            assert!(ids.insert(joined.node));
            room.leave(conn);
            asked += outputs(&mut room)
                .iter()
                .filter(|o| matches!(o, Output::Reserve { .. }))
                .count();
        }
        assert_eq!(asked, 1, "one reservation in flight at a time");
        let refused = room.join(0, 9_999, req("a", None), [0; 16]).unwrap_err();
        assert_eq!(refused.code, close::TRY_AGAIN_LATER);
        room.reserved(Ok(5_000));
        let joined = room.join(0, 9_999, req("a", None), [0; 16]).unwrap();
        assert_eq!(joined.node, 5_000);
    }

    /// The store's record of a node names its user, from the appends of the node: another
    /// user's join with the node's token is a new node, the node's own user takes it back.
    #[test]
    fn a_stored_node_is_taken_back_by_its_own_user_only() {
        let mut room = with_limits(RoomLimits::default());
        let ada = Access {
            user: 11,
            ..Access::OPEN
        };
        // Ada's node is not the first id of a room, which the thief's new node is below.
        room.join(0, 8, req("x", None), [1; 16]).unwrap();
        let a = room
            .join(
                0,
                1,
                JoinRequest {
                    access: ada,
                    ..req("a", None)
                },
                [7; 16],
            )
            .unwrap();
        send(&mut room, 0, 1, data(a.node, 1));
        let appended = outputs(&mut room).into_iter().find_map(|o| match o {
            Output::Append(append) => Some(append),
            _ => None,
        });
        assert_eq!(
            appended.map(|a| (a.token, a.user)),
            Some((Some([7; 16]), 11))
        );
        let record = NodeRecord {
            node: a.node,
            token: [7; 16],
            user: 11,
            last_step: 1,
            position: 0,
        };
        let mut other = with_limits(RoomLimits::default());
        let join = |access| JoinRequest {
            access,
            stored: Some(record),
            ..req("b", Some([7; 16]))
        };
        let thief = other
            .join(
                0,
                1,
                join(Access {
                    user: 12,
                    ..Access::OPEN
                }),
                [8; 16],
            )
            .unwrap();
        assert_ne!(thief.node, a.node);
        assert!(other.knows(&[8; 16]) && !other.knows(&[7; 16]));
        let back = other.join(0, 2, join(ada), [9; 16]).unwrap();
        assert_eq!(back.node, a.node);
    }

    /// A node's state outlives its connection until its appends are answered and its buckets
    /// are full again; after that a join with its token brings the store's record back, and
    /// its old steps are still replays.
    #[test]
    fn a_node_that_left_keeps_its_rate_and_comes_back_with_its_last_step() {
        let mut room = with_limits(RoomLimits {
            rate: 10,
            burst: 10,
            resume_grace: 0,
            ..RoomLimits::default()
        });
        let a = room.join(0, 1, req("a", None), [7; 16]).unwrap();
        for step in 1..=10 {
            send(&mut room, 0, 1, data(a.node, step));
        }
        room.leave(1);
        // Back at once: the bucket is still empty.
        let again = room.join(10, 2, req("a", Some([7; 16])), [8; 16]).unwrap();
        assert_eq!(again.node, a.node);
        outputs(&mut room);
        send(&mut room, 10, 2, data(a.node, 11));
        assert_eq!(rejects(&outputs(&mut room), 2), [Reason::RateLimited]);
        room.leave(2);
        for position in 1..=10 {
            stored(&mut room, position);
        }
        room.tick(500);
        assert_eq!(room.nodes(), 1, "its bucket is not full yet");
        room.tick(1_000);
        assert_eq!(room.nodes(), 0);
        assert!(room.is_idle());
        assert!(!room.knows(&[7; 16]));
        // The store's record: last step 10.
        let mut request = req("a", Some([7; 16]));
        request.stored = Some(NodeRecord {
            node: a.node,
            token: [7; 16],
            user: 0,
            last_step: 10,
            position: 0,
        });
        let back = room.join(2_000, 3, request, [9; 16]).unwrap();
        assert_eq!(back.node, a.node);
        outputs(&mut room);
        send(&mut room, 2_000, 3, data(a.node, 10));
        assert_eq!(rejects(&outputs(&mut room), 3), [Reason::Replay]);
        send(&mut room, 2_000, 3, data(a.node, 11));
        assert!(matches!(outputs(&mut room).last(), Some(Output::Append(x)) if x.step == 11));
    }

    /// A node that wrote, then sent a signal (which no store keeps), is let go: the room hands
    /// the driver its exact last step, and a welcome back that brings it gets a floor there.
    /// With the store's record alone (a relay that restarted) it gets none: the last stored
    /// step would bring the client's clock back below the signal's, which the other members
    /// would refuse as replays.
    #[test]
    fn a_node_let_go_comes_back_with_its_last_step_as_its_floor() {
        let mut room = with_limits(RoomLimits {
            resume_grace: 0,
            ..RoomLimits::default()
        });
        let signal = |node, step| {
            let stamp = Stamp {
                sender: node,
                step,
                pattern: PatternConfig::default().value(step),
            };
            let data = Json::parse("2").unwrap();
            Bytes::from(Frame::stamped(stamp, Body::Signal { data }).encode())
        };
        let a = room.join(0, 1, req("a", None), [7; 16]).unwrap();
        // B stores nothing: the store has no record of it, and it would come back as a new node.
        let b = room.join(0, 4, req("b", None), [4; 16]).unwrap();
        send(&mut room, 0, 1, data(a.node, 1));
        send(&mut room, 0, 1, signal(a.node, 90));
        send(&mut room, 0, 4, signal(b.node, 2));
        stored(&mut room, 1);
        room.leave(1);
        room.leave(4);
        outputs(&mut room);
        room.tick(5_000);
        assert!(!room.knows(&[7; 16]));
        let released: Vec<Release> = outputs(&mut room)
            .into_iter()
            .filter_map(|o| match o {
                Output::Released(release) => Some(release),
                _ => None,
            })
            .collect();
        let expected = Release {
            node: a.node,
            token: [7; 16],
            user: 0,
            step: 90,
        };
        assert_eq!(released, [expected]);
        let record = NodeRecord {
            node: a.node,
            token: [7; 16],
            user: 0,
            last_step: 1,
            position: 0,
        };
        let back = |room: &mut RoomCore, conn, released| {
            let request = JoinRequest {
                stored: Some(record),
                released,
                ..req("a", Some([7; 16]))
            };
            room.join(5_000, conn, request, [9; 16]).unwrap()
        };
        let restarted = back(&mut room, 2, None);
        assert_eq!(restarted.node, a.node);
        assert_eq!(welcome_floor(&restarted), None);
        // A release below the stored step is not the node's last: no floor from it.
        room.leave(2);
        room.tick(7_000);
        outputs(&mut room);
        let mut stale = expected;
        stale.step = 0;
        let again = back(&mut room, 5, Some(stale));
        assert_eq!(welcome_floor(&again), None);
        room.leave(5);
        room.tick(10_000);
        assert!(outputs(&mut room)
            .iter()
            .all(|o| !matches!(o, Output::Released(_))));
        let resumed = back(&mut room, 3, Some(expected));
        assert_eq!(resumed.node, a.node);
        assert_eq!(welcome_floor(&resumed), Some(90));
        send(&mut room, 10_000, 3, data(a.node, 90));
        assert_eq!(rejects(&outputs(&mut room), 3), [Reason::Replay]);
    }

    /// A room whose relay is stopping lets go of the nodes that left, and of those that leave,
    /// at once (their grace and budgets would have kept them a minute): it is idle, and may
    /// retire, once its writes are done.
    #[test]
    fn a_room_closing_down_lets_its_nodes_go_at_once() {
        let mut room = with_limits(RoomLimits {
            resume_grace: 60_000,
            ..RoomLimits::default()
        });
        let a = room.join(0, 1, req("a", None), [7; 16]).unwrap();
        let b = room.join(0, 2, req("b", None), [8; 16]).unwrap();
        send(&mut room, 0, 1, data(a.node, 1));
        stored(&mut room, 1);
        room.leave(1);
        send(&mut room, 0, 2, data(b.node, 1));
        outputs(&mut room);
        room.tick(10);
        assert_eq!(room.nodes(), 2, "within the grace period");
        room.close_down(20);
        assert_eq!(room.nodes(), 1, "b is still a member");
        let released = |room: &mut RoomCore| {
            outputs(room)
                .into_iter()
                .filter_map(|o| match o {
                    Output::Released(release) => Some(release.node),
                    _ => None,
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(released(&mut room), [a.node]);
        // B leaves with its message still being written: let go once the write is done.
        room.leave(2);
        assert_eq!(room.nodes(), 1);
        assert!(!room.is_idle());
        stored(&mut room, 1);
        assert_eq!(room.nodes(), 0);
        assert_eq!(released(&mut room), [b.node]);
        assert!(room.is_idle());
    }

    /// A node that never wrote has no store record, so the room keeps its token for the grace
    /// period: a reconnect within it keeps the id, one after it gets a new one.
    #[test]
    fn a_node_that_never_wrote_keeps_its_id_for_the_grace_period() {
        let mut room = with_limits(RoomLimits {
            resume_grace: 1_000,
            ..RoomLimits::default()
        });
        let a = room.join(0, 1, req("a", None), [7; 16]).unwrap();
        room.leave(1);
        room.tick(999);
        let again = room.join(999, 2, req("a", Some([7; 16])), [8; 16]).unwrap();
        assert_eq!(again.node, a.node);
        room.leave(2);
        room.tick(1_998);
        assert_eq!(room.nodes(), 1, "still within the grace period");
        room.tick(1_999);
        assert_eq!(room.nodes(), 0);
        assert!(room.is_idle());
        let other = room
            .join(2_000, 3, req("a", Some([7; 16])), [9; 16])
            .unwrap();
        assert_ne!(other.node, a.node);
    }

    /// A connection refused for its rate more than a second's worth of times within a second
    /// is closed; one that backs off is not.
    #[test]
    fn a_connection_that_keeps_sending_over_its_rate_is_closed_within_a_second() {
        let mut room = with_limits(RoomLimits {
            rate: 10,
            burst: 10,
            ..RoomLimits::default()
        });
        let a = room.join(0, 1, req("a", None), [1; 16]).unwrap();
        outputs(&mut room);
        let mut closed_at = None;
        for i in 0..1_000u64 {
            // 1,000 frames a second, with a fence after every refusal.
            send(&mut room, i, 1, data(a.node, i + 1));
            send(
                &mut room,
                i,
                1,
                Bytes::from(Frame::Fence { step: i + 1 }.encode()),
            );
            if outputs(&mut room)
                .iter()
                .any(|o| matches!(o, Output::Close { code, .. } if *code == close::RATE_LIMITED))
            {
                closed_at = Some(i);
                break;
            }
        }
        assert!(closed_at.is_some_and(|t| t < 1_000), "{closed_at:?}");
    }

    /// A client that never fences is closed once it has kept sending for more than a second
    /// after its refusal; an honest client whose pipeline was refused in one go is not, and the
    /// frames refused in its gap took none of the tokens its resend needs.
    #[test]
    fn frames_in_a_gap_cost_nothing_but_a_client_deaf_to_its_refusal_is_closed() {
        let mut room = with_limits(RoomLimits {
            rate: 10,
            burst: 10,
            ..RoomLimits::default()
        });
        let a = room.join(0, 1, req("a", None), [1; 16]).unwrap();
        outputs(&mut room);
        // 200 frames at once: 10 pass, one is refused for the rate, the rest are in its gap.
        for step in 1..=200 {
            send(&mut room, 0, 1, data(a.node, step));
        }
        let out = outputs(&mut room);
        assert!(!out.iter().any(|o| matches!(o, Output::Close { .. })));
        let refused = rejects(&out, 1);
        assert_eq!(refused[0], Reason::RateLimited);
        assert!(refused[1..].iter().all(|r| *r == Reason::OutOfOrder));
        // The fence, a tenth of a second later: a token is there for the resend.
        send(
            &mut room,
            100,
            1,
            Bytes::from(Frame::Fence { step: 10 }.encode()),
        );
        send(&mut room, 100, 1, data(a.node, 11));
        assert!(matches!(outputs(&mut room).last(), Some(Output::Append(x)) if x.step == 11));

        // Deaf: a frame every millisecond, never a fence.
        let b = room.join(200, 2, req("b", None), [2; 16]).unwrap();
        outputs(&mut room);
        let mut closed_at = None;
        for i in 0..3_000u64 {
            send(&mut room, 200 + i, 2, data(b.node, i + 1));
            let out = outputs(&mut room);
            if out
                .iter()
                .any(|o| matches!(o, Output::Close { code, .. } if *code == close::RATE_LIMITED))
            {
                closed_at = Some(i);
                break;
            }
        }
        let closed_at = closed_at.expect("closed");
        assert!((1_000..1_100).contains(&closed_at), "{closed_at}");
    }

    /// Stored messages cost bytes from the node's bandwidth, and the room's log has a cap.
    #[test]
    fn bandwidth_and_the_room_budget_hold() {
        let mut room = with_limits(RoomLimits {
            bandwidth: 1_000,
            bandwidth_burst: 2_000,
            // Data may take three quarters: 3,750 bytes.
            max_room_bytes: 5_000,
            ..RoomLimits::default()
        });
        let a = room.join(0, 1, req("a", None), [1; 16]).unwrap();
        outputs(&mut room);
        let big = |step| {
            let stamp = Stamp {
                sender: a.node,
                step,
                pattern: PatternConfig::default().value(step),
            };
            let text = format!("\"{}\"", "x".repeat(1_500));
            Bytes::from(
                Frame::stamped(
                    stamp,
                    Body::Data {
                        data: Json::parse(text).unwrap(),
                    },
                )
                .encode(),
            )
        };
        send(&mut room, 0, 1, big(1));
        send(&mut room, 0, 1, big(2));
        assert_eq!(rejects(&outputs(&mut room), 1), [Reason::RateLimited]);
        stored(&mut room, 1);
        send(
            &mut room,
            0,
            1,
            Bytes::from(Frame::Fence { step: 2 }.encode()),
        );
        send(&mut room, 2_000, 1, big(2));
        assert!(matches!(outputs(&mut room).last(), Some(Output::Append(_))));
        room.appended(Ok(Appended::Stored {
            position: 2,
            bytes: 3_100,
        }));
        send(&mut room, 4_000, 1, big(3));
        let out = outputs(&mut room);
        assert_eq!(rejects(&out, 1), [Reason::Full]);
    }

    /// An update the driver found too slow to apply is refused, and the room stops to load its
    /// document again without it.
    #[test]
    fn an_update_over_the_time_budget_is_refused_and_the_room_reloads() {
        let mut room = room();
        let a = room.join(0, 1, req("a", None), [1; 16]).unwrap();
        outputs(&mut room);
        let writer = SharedDoc::with_client_id(11);
        let u = writer.insert("content", 0, "slow").unwrap();
        send(&mut room, 0, 1, update(a.node, 1, u));
        assert!(room.overran(3_000, 1_000));
        let out = outputs(&mut room);
        assert!(
            !out.iter().any(|o| matches!(o, Output::Append(_))),
            "{out:?}"
        );
        assert_eq!(rejects(&out, 1), [Reason::TooLarge]);
        assert!(matches!(out.last(), Some(Output::Stop { by: None, .. })));
        assert!(room.is_idle());
    }

    /// A `receive` that panicked (here: after it had taken the update in, as a panic at its
    /// end would leave it) sends and stores nothing of the frame; its sender hears it refused,
    /// the other members are closed, and the room stops to load its log again.
    #[test]
    fn a_receive_that_panicked_leaves_nothing_behind_and_the_room_reloads() {
        let mut room = room();
        let a = room.join(0, 1, req("a", None), [1; 16]).unwrap();
        room.join(0, 2, req("b", None), [2; 16]).unwrap();
        outputs(&mut room);
        let writer = SharedDoc::with_client_id(11);
        let u = writer.insert("content", 0, "boom").unwrap();
        send(&mut room, 0, 1, update(a.node, 1, u));
        room.panicked("index out of bounds");
        let out = outputs(&mut room);
        assert!(
            !out.iter()
                .any(|o| matches!(o, Output::Append(_) | Output::Fanout { .. })),
            "{out:?}"
        );
        assert_eq!(rejects(&out, 1), [Reason::Malformed]);
        let closed: Vec<ConnId> = out
            .iter()
            .filter_map(|o| match o {
                Output::Close { conn, .. } => Some(*conn),
                _ => None,
            })
            .collect();
        assert_eq!(closed.len(), 2, "{out:?}");
        assert!(matches!(out.last(), Some(Output::Stop { by: Some(node), .. }) if *node == a.node));
        assert!(room.is_idle());
    }

    /// A publication the shared store lost stops the room: every member here is closed to
    /// reconnect (and be heard again by the other relays), whether or not an append failed.
    #[test]
    fn a_lost_publication_stops_the_room_and_its_members_reconnect() {
        let mut room = room();
        room.join(0, 1, req("a", None), [1; 16]).unwrap();
        room.join(0, 2, req("b", None), [2; 16]).unwrap();
        outputs(&mut room);
        room.publication_lost(&StoreError::Backend("connection refused".into()));
        let out = outputs(&mut room);
        let closed: Vec<(ConnId, u16)> = out
            .iter()
            .filter_map(|o| match o {
                Output::Close { conn, code, .. } => Some((*conn, *code)),
                _ => None,
            })
            .collect();
        assert_eq!(closed, [(1, close::INTERNAL), (2, close::INTERNAL)]);
        assert!(
            matches!(out.last(), Some(Output::Stop { reason, by: None }) if reason.contains("connection refused")),
            "{out:?}"
        );
        assert!(room.is_idle());
    }

    /// A relay whose heartbeat lapsed announces its members again, presences included, in the
    /// order of their ids; what it publishes is what a join publishes.
    #[test]
    fn a_lapsed_heartbeat_announces_the_members_here_again() {
        let mut room = room();
        room.share();
        let a = room.join(0, 1, req("a", None), [1; 16]).unwrap();
        let b = room.join(0, 2, req("b", None), [2; 16]).unwrap();
        let presence = Frame::Presence {
            sender: b.node,
            data: Json::from_value(&serde_json::json!({ "cursor": 3 })).unwrap(),
        };
        send(&mut room, 0, 2, Bytes::from(presence.encode()));
        outputs(&mut room);
        room.announce_members();
        let published: Vec<(Frame, Option<Roster>)> = outputs(&mut room)
            .into_iter()
            .filter_map(|o| match o {
                Output::Publish { bytes, roster, .. } => {
                    Some((Frame::decode(&bytes).unwrap(), roster))
                }
                _ => None,
            })
            .collect();
        let peer = |node, name: &str| Peer {
            node,
            name: name.into(),
        };
        assert_eq!(
            published,
            [
                (
                    Frame::PeerJoined {
                        peer: peer(a.node, "a")
                    },
                    Some(Roster::Joined(peer(a.node, "a")))
                ),
                (
                    Frame::PeerJoined {
                        peer: peer(b.node, "b")
                    },
                    Some(Roster::Joined(peer(b.node, "b")))
                ),
                (
                    presence,
                    Some(Roster::Presence {
                        node: b.node,
                        set: true
                    })
                ),
            ]
        );
        // A member whose client went to another relay meanwhile (that relay announced it) is
        // not announced from here: its connection here is one its client gave up.
        room.followed(0, &[], &[relayed_join(9, peer(a.node, "a"))], true);
        outputs(&mut room);
        room.announce_members();
        let announced: Vec<Frame> = outputs(&mut room)
            .into_iter()
            .filter_map(|o| match o {
                Output::Publish { bytes, .. } => Some(Frame::decode(&bytes).unwrap()),
                _ => None,
            })
            .filter(|f| matches!(f, Frame::PeerJoined { .. }))
            .collect();
        assert_eq!(
            announced,
            [Frame::PeerJoined {
                peer: peer(b.node, "b")
            }]
        );
    }

    /// Two relays' rooms on one shared store: `A` and `B`, each driven as its relay's task
    /// would be, appending through [`crate::store::MemoryStore::append_shared_now`] and
    /// following the log with `follow_now`.
    struct Shared {
        store: crate::store::MemoryStore,
        rooms: Vec<RoomCore>,
        /// What each room's members received, by connection.
        got: Vec<HashMap<ConnId, Vec<Frame>>>,
        /// What the rooms published for the other relays, by relay, in order.
        bus: Vec<(usize, Relayed)>,
        /// How much of the bus each relay has read.
        bus_read: Vec<usize>,
        /// The rooms that stopped, by relay, with the node that stopped each.
        stops: Vec<(usize, Option<NodeId>)>,
    }

    impl Shared {
        fn new(relays: usize) -> Self {
            Self::with_limits(relays, RoomLimits::default())
        }

        fn with_limits(relays: usize, limits: RoomLimits) -> Self {
            let store = crate::store::MemoryStore::new();
            let rooms = (0..relays)
                .map(|_| {
                    let record = store.open_now("r", RoomConfig::default());
                    let mut room = RoomCore::new("r".into(), record, &[], limits, 0).unwrap();
                    room.share();
                    room
                })
                .collect();
            Self {
                store,
                rooms,
                got: vec![HashMap::new(); relays],
                bus: Vec::new(),
                bus_read: vec![0; relays],
                stops: Vec::new(),
            }
        }

        /// Carries out relay `i`'s outputs: appends go to the store, in order.
        fn drive(&mut self, i: usize) {
            while let Some(output) = self.rooms[i].poll_output() {
                match output {
                    Output::Append(append) => {
                        let answer = self.store.append_shared_now("r", i as u64, 0, append);
                        self.rooms[i].appended(answer);
                    }
                    Output::Send { to, bytes } => self.got[i].entry(to).or_default().push(
                        Frame::decode_positioned(&bytes, &Limits::default())
                            .unwrap()
                            .frame,
                    ),
                    Output::Fanout { except, bytes } => {
                        let frame = Frame::decode_positioned(&bytes, &Limits::default()).unwrap();
                        let conns: Vec<ConnId> = self.got[i].keys().copied().collect();
                        for conn in conns.into_iter().filter(|&c| Some(c) != except) {
                            self.got[i]
                                .entry(conn)
                                .or_default()
                                .push(frame.frame.clone());
                        }
                    }
                    Output::Publish {
                        to,
                        after,
                        bytes,
                        step,
                        ..
                    } => {
                        let (position, high) = self.store.publish_now("r", step);
                        let relayed = Relayed {
                            relay: i as u64,
                            after: after.max(position),
                            to,
                            high,
                            bytes,
                        };
                        self.bus.push((i, relayed));
                    }
                    Output::Stop { by, .. } => self.stops.push((i, by)),
                    _ => {}
                }
            }
        }

        /// Relay `i` restarts: its room loads again from the store.
        fn reload(&mut self, i: usize) {
            let record = self.store.open_now("r", RoomConfig::default());
            let document = self.store.document_now("r");
            let limits = self.rooms[i].limits;
            self.rooms[i] = RoomCore::new_shared("r".into(), record, &document, limits, 0).unwrap();
            self.got[i].clear();
        }

        /// Relay `i` reads the log after what it fanned out.
        fn follow(&mut self, i: usize) {
            let entries = self.store.follow_now("r", self.rooms[i].published());
            self.rooms[i].followed(0, &entries, &[], true);
            self.drive(i);
        }

        /// Relay `i` reads what the others published since it last read.
        fn listen(&mut self, i: usize) {
            let entries: Vec<Relayed> = self.bus[self.bus_read[i]..]
                .iter()
                .map(|(from, r)| {
                    let mut r = r.clone();
                    if *from == i {
                        r.bytes = Bytes::new();
                    }
                    r
                })
                .collect();
            self.bus_read[i] = self.bus.len();
            self.rooms[i].followed(0, &[], &entries, true);
            self.drive(i);
        }

        fn join(
            &mut self,
            i: usize,
            conn: ConnId,
            resume: Option<ResumeToken>,
            fresh: u8,
        ) -> NodeId {
            let stored = resume.and_then(|t| self.store.find_now("r", t));
            let request = JoinRequest {
                stored,
                ..req("m", resume)
            };
            let joined = self.rooms[i].join(0, conn, request, [fresh; 16]).unwrap();
            self.got[i].insert(conn, Vec::new());
            self.drive(i);
            self.got[i].get_mut(&conn).unwrap().clear();
            joined.node
        }
    }

    fn steps(frames: &[Frame]) -> Vec<(NodeId, Step)> {
        frames
            .iter()
            .filter_map(|f| f.stamp().map(|s| (s.sender, s.step)))
            .collect()
    }

    fn acks(frames: &[Frame]) -> Vec<(Step, u64)> {
        frames
            .iter()
            .filter_map(|f| match f {
                Frame::Ack { step, position } => Some((*step, *position)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn members_of_two_relays_on_one_store_see_the_log_in_one_order() {
        let mut shared = Shared::new(2);
        let a = shared.join(0, 1, None, 1);
        let b = shared.join(1, 2, None, 2);
        assert_ne!(a, b, "node ids come from blocks of their own");
        // Both relays append before either follows the log: positions 1 (a) and 2 (b), 3 (a).
        send(&mut shared.rooms[0], 0, 1, data(a, 1));
        shared.drive(0);
        send(&mut shared.rooms[1], 0, 2, data(b, 1));
        shared.drive(1);
        send(&mut shared.rooms[0], 0, 1, data(a, 2));
        shared.drive(0);
        // Nothing is acknowledged or fanned out before the log is read back.
        assert!(shared.got[0][&1].is_empty() && shared.got[1][&2].is_empty());
        shared.follow(0);
        shared.follow(1);
        assert_eq!(steps(&shared.got[1][&2]), vec![(a, 1), (a, 2)]);
        assert_eq!(steps(&shared.got[0][&1]), vec![(b, 1)]);
        // Each sender's acknowledgements come after the entries logged before them.
        assert_eq!(acks(&shared.got[0][&1]), vec![(1, 1), (2, 3)]);
        let order: Vec<&Frame> = shared.got[0][&1].iter().collect();
        assert!(matches!(order[0], Frame::Ack { position: 1, .. }));
        assert!(matches!(order[1], Frame::Stamped(_)));
        assert!(matches!(order[2], Frame::Ack { position: 3, .. }));
        assert_eq!(acks(&shared.got[1][&2]), vec![(1, 2)]);
        assert_eq!(shared.rooms[0].high(), shared.rooms[1].high());
    }

    #[test]
    fn a_resend_raced_through_two_relays_is_stored_once_and_refused_as_replay_on_the_other() {
        let mut shared = Shared::new(2);
        let a = shared.join(0, 1, None, 1);
        shared.join(1, 3, None, 3);
        send(&mut shared.rooms[0], 0, 1, data(a, 1));
        shared.drive(0);
        // The node's client lost relay A before it heard the acknowledgement, and resumes on B
        // (whose room never heard of it) to send step 1 again, while A's copy is stored.
        let token = [1; 16];
        let again = shared.join(1, 2, Some(token), 9);
        assert_eq!(again, a, "the node keeps its id on the other relay");
        send(&mut shared.rooms[1], 0, 2, data(a, 1));
        shared.drive(1);
        // Answered once B has fanned the log out that far (it judges updates there).
        assert_eq!(rejects_of(&shared.got[1][&2]), vec![]);
        shared.follow(1);
        assert_eq!(rejects_of(&shared.got[1][&2]), vec![Reason::Replay]);
        shared.follow(0);
        // Exactly once in the log, and to the watcher.
        assert_eq!(shared.store.log("r").len(), 1);
        assert_eq!(steps(&shared.got[1][&3]), vec![(a, 1)]);
    }

    /// An entry of a shared room's log as a relay reads it: `frame` at `position`.
    fn followed(position: u64, sender: NodeId, step: Step, frame: &Bytes, covers: u64) -> Followed {
        Followed {
            position,
            sender,
            step,
            high: position,
            covers,
            bytes: Bytes::from(with_position(frame, position).unwrap()),
        }
    }

    /// The room's snapshot frame of a document whose state is `state`.
    fn snapshot_frame(state: Vec<u8>) -> Bytes {
        let frame = Frame::Snapshot {
            doc: WHOLE_DOC.into(),
            state,
        };
        Bytes::from(frame.encode())
    }

    /// An update under a client id no one uses, from its clock 3 (lib0 varuints: one client,
    /// 77, one block at clock 3 in the root type "content", the string "x"; no deletes): Yjs
    /// would keep it until clocks 0..3 arrive, which no one wrote.
    fn after_a_gap() -> Vec<u8> {
        let mut gap = vec![1, 1, 77, 3, 4, 1, 7];
        gap.extend_from_slice(b"content");
        gap.extend_from_slice(&[1, b'x', 0]);
        gap
    }

    /// What an update costs to apply is judged when it comes in, against the relay's copy of
    /// the document, which lags the log: a member sends one item near the end of a text of
    /// 10,000 blocks, then at once 1,000 items each between the text's first character and
    /// that item. The second was judged before the document had the first: its items' right
    /// origin was nowhere, and its walks counted nothing. It was stored, and every relay, member
    /// and late joiner walked the text 1,000 times. Every relay judges the cost again in the
    /// log's order, the same way: the second is refused as `tooLarge` in place of its
    /// acknowledgement, and reaches no one.
    #[test]
    fn a_shared_room_judges_in_the_logs_order_what_an_update_costs() {
        let mut shared = Shared::new(2);
        let a = shared.join(0, 1, None, 1);
        shared.join(1, 2, None, 2);
        let m = 5_000;
        let [text, cuts] = text_of_blocks();
        send(&mut shared.rooms[0], 0, 1, update(a, 1, text));
        send(&mut shared.rooms[0], 0, 1, update(a, 2, cuts));
        shared.drive(0);
        shared.follow(0);
        let [near_end, walks] = walks_to_an_item_near_the_end();
        send(&mut shared.rooms[0], 0, 1, update(a, 3, near_end));
        send(&mut shared.rooms[0], 0, 1, update(a, 4, walks));
        shared.drive(0);
        shared.follow(0);
        shared.follow(1);
        let got = &shared.got[0][&1];
        assert_eq!(acks(got), vec![(1, 1), (2, 2), (3, 3)]);
        let refusal = refusal_of(got, 4);
        let Some((Reason::TooLarge, detail)) = refusal else {
            panic!("{got:?}")
        };
        assert!(detail.contains("send it in smaller edits"), "{detail}");
        assert_eq!(steps(&shared.got[1][&2]), vec![(a, 1), (a, 2), (a, 3)]);
        for i in 0..2 {
            let late = shared.rooms[i]
                .join(0, 3, req("late", None), [3; 16])
                .unwrap();
            assert_eq!(late.refused, vec![4], "relay {i}");
        }
        let text = shared.rooms[1].doc.text("content");
        assert_eq!(text, format!("{}x{}", "a".repeat(m as usize - 1), "a"));
    }

    /// An update the log refused as too costly, sent again after a snapshot dropped its entry
    /// (its client never heard the refusal), is refused again as `tooLarge`, as the log refused
    /// it: the room's document does not hold it, and what applying it would cost says why.
    #[test]
    fn an_update_the_log_refused_as_too_costly_sent_again_after_a_snapshot_is_too_large_again() {
        let mut shared = Shared::with_limits(
            2,
            RoomLimits {
                compact_updates: 4,
                ..RoomLimits::default()
            },
        );
        let a = shared.join(0, 1, None, 1);
        shared.join(1, 2, None, 2);
        let [text, cuts] = text_of_blocks();
        send(&mut shared.rooms[0], 0, 1, update(a, 1, text));
        send(&mut shared.rooms[0], 0, 1, update(a, 2, cuts));
        shared.drive(0);
        shared.follow(0);
        let [near_end, walks] = walks_to_an_item_near_the_end();
        send(&mut shared.rooms[0], 0, 1, update(a, 3, near_end));
        send(&mut shared.rooms[0], 0, 1, update(a, 4, walks.clone()));
        shared.drive(0);
        // Its client is gone before the log is read back, and the refusal with it.
        shared.rooms[0].leave(1);
        for _ in 0..2 {
            shared.follow(0);
            shared.follow(1);
        }
        let log = shared.store.log("r");
        assert!(
            matches!(Frame::decode(&log[0].bytes), Ok(Frame::Snapshot { .. })),
            "the snapshot dropped the entries before it"
        );
        let again = shared.join(0, 3, Some([1; 16]), 9);
        assert_eq!(again, a);
        send(&mut shared.rooms[0], 0, 3, update(a, 4, walks));
        shared.drive(0);
        shared.follow(0);
        let got = &shared.got[0][&3];
        let [Frame::Reject {
            step: 4,
            reason: Reason::TooLarge,
            detail,
        }] = got.as_slice()
        else {
            panic!("{got:?}")
        };
        assert!(detail.contains("send it in smaller edits"), "{detail}");
    }

    /// The reason and detail of the refusal of `step` among `frames`, if there is one.
    fn refusal_of<'a>(
        frames: impl IntoIterator<Item = &'a Frame>,
        step: Step,
    ) -> Option<(Reason, String)> {
        frames.into_iter().find_map(|f| match f {
            Frame::Reject {
                step: s,
                reason,
                detail,
            } if *s == step => Some((*reason, detail.clone())),
            _ => None,
        })
    }

    /// A text of 10,000 blocks, as client 7's two updates: `"ab"` 5,000 times, then every `b`
    /// deleted.
    fn text_of_blocks() -> [Vec<u8>; 2] {
        use crate::doc::write_var;
        let writer = SharedDoc::with_client_id(7);
        let text = writer.insert("content", 0, &"ab".repeat(5_000)).unwrap();
        let mut cuts = vec![0, 1, 7];
        write_var(&mut cuts, 5_000);
        for i in 0..5_000 {
            write_var(&mut cuts, 2 * i + 1);
            cuts.push(1);
        }
        [text, cuts]
    }

    /// On [`text_of_blocks`]: client 9's item between the last two characters, then its 1,000
    /// items, each after the first character and before that item. Judged against a document
    /// without the first, the second walks nothing; with it, each of its items walks the text.
    fn walks_to_an_item_near_the_end() -> [Vec<u8>; 2] {
        use crate::doc::write_var;
        let m = 5_000u64;
        let mut near_end = vec![1, 1, 9, 0, 0xC4, 7];
        write_var(&mut near_end, 2 * m - 3);
        near_end.push(7);
        write_var(&mut near_end, 2 * m - 2);
        near_end.extend_from_slice(&[1, b'x', 0]);
        let mut walks = vec![1];
        write_var(&mut walks, 1_000);
        walks.extend_from_slice(&[9, 1]);
        for _ in 0..1_000 {
            walks.extend_from_slice(&[0xC4, 7, 0, 9, 0, 1, b'y']);
        }
        walks.push(0);
        [near_end, walks]
    }

    /// On [`text_of_blocks`]: one item after the middle character whose right origin lies
    /// behind it (yrs ignores it, and places the item where its conflicts let it), then 2,000
    /// items after the first character and before that item. The estimate of what an update
    /// costs follows the right origin to where it points, ten blocks on; each item really walks
    /// half the text (1.3·10^9 steps, 7.5 s in a release build).
    fn walks_too_far() -> Vec<u8> {
        let mut walks = vec![1];
        crate::doc::write_var(&mut walks, 2_001);
        walks.extend_from_slice(&[9, 0]);
        walks.extend_from_slice(&[0xC4, 7, 0x88, 0x27, 7, 10, 1, b'x']);
        for _ in 0..2_000 {
            walks.extend_from_slice(&[0xC4, 7, 0, 9, 0, 1, b'x']);
        }
        walks.push(0);
        walks
    }

    /// A member's update whose integration walks too far is stopped there: it is refused as
    /// `tooLarge`, never stored, and the room, whose document took part of it, stops to load
    /// again without it.
    #[test]
    fn an_update_that_walks_too_far_is_stopped_refused_and_the_room_reloads() {
        let mut room = room();
        let a = room.join(0, 1, req("a", None), [1; 16]).unwrap();
        outputs(&mut room);
        let [text, cuts] = text_of_blocks();
        send(&mut room, 0, 1, update(a.node, 1, text));
        stored(&mut room, 1);
        send(&mut room, 0, 1, update(a.node, 2, cuts));
        stored(&mut room, 2);
        outputs(&mut room);
        send(&mut room, 0, 1, update(a.node, 3, walks_too_far()));
        let out = outputs(&mut room);
        assert!(
            !out.iter().any(|o| matches!(o, Output::Append(_))),
            "{out:?}"
        );
        let sent = sent_to(&out, 1);
        let refusal = refusal_of(&sent, 3);
        let Some((Reason::TooLarge, detail)) = refusal else {
            panic!("{out:?}")
        };
        assert!(detail.contains("walks too far"), "{detail}");
        let Some(Output::Stop { by, .. }) = out.last() else {
            panic!("{out:?}")
        };
        assert_eq!(
            *by,
            Some(a.node),
            "the stop names the node whose update it was"
        );
    }

    /// In a shared room, integration that walks too far stops in the log's order on every
    /// relay alike: the update reaches no member, its sender hears `tooLarge`, each relay's
    /// room stops, and loads again from the log without it (and judges it so at load), with
    /// what the log holds after it.
    #[test]
    fn a_shared_room_stops_in_the_logs_order_an_update_that_walks_too_far() {
        let mut shared = Shared::new(2);
        let a = shared.join(0, 1, None, 1);
        shared.join(1, 2, None, 2);
        let [text, cuts] = text_of_blocks();
        let after = SharedDoc::with_client_id(8);
        after.apply_update(&text).unwrap();
        after.apply_update(&cuts).unwrap();
        let typed = after.insert("content", 0, "y").unwrap();
        send(&mut shared.rooms[0], 0, 1, update(a, 1, text));
        send(&mut shared.rooms[0], 0, 1, update(a, 2, cuts));
        shared.drive(0);
        shared.follow(0);
        send(&mut shared.rooms[0], 0, 1, update(a, 3, walks_too_far()));
        send(&mut shared.rooms[0], 0, 1, update(a, 4, typed));
        shared.drive(0);
        shared.follow(0);
        shared.follow(1);
        let refusal = refusal_of(&shared.got[0][&1], 3);
        let Some((Reason::TooLarge, detail)) = refusal else {
            panic!("{:?}", shared.got[0][&1])
        };
        assert!(detail.contains("walks too far"), "{detail}");
        assert_eq!(steps(&shared.got[1][&2]), vec![(a, 1), (a, 2)]);
        assert_eq!(shared.stops, [(0, Some(a)), (1, Some(a))]);
        for i in 0..2 {
            assert!(shared.rooms[i].is_stopped(), "relay {i}");
            shared.reload(i);
            let late = shared.rooms[i]
                .join(0, 3, req("late", None), [3; 16])
                .unwrap();
            assert_eq!(late.refused, vec![3], "relay {i}");
            let text = shared.rooms[i].doc.text("content");
            assert_eq!(text, format!("y{}", "a".repeat(5_000)), "relay {i}");
        }
        // Each load after it paid the bound again, and rebuilt the document: a relay that met
        // such an entry at load writes a snapshot at once, and the log holds it no more.
        shared.drive(0);
        let log = shared.store.log("r");
        assert!(
            matches!(Frame::decode(&log[0].bytes), Ok(Frame::Snapshot { .. })),
            "a snapshot holds the log's document"
        );
        assert!(log.iter().all(|logged| logged.position != 3), "{log:?}");
    }

    /// A member's update that makes applying it panic (a bug in yrs, say) costs that update,
    /// not the room: every relay of a shared room meets it in the log's order, refuses it as
    /// `malformed` with what failed, and loads again without it (its document may hold part of
    /// it), and a relay loading the room judges it so too. What the log holds after it stays.
    #[test]
    fn a_shared_room_refuses_in_the_logs_order_an_update_that_makes_applying_it_panic() {
        let mut shared = Shared::new(2);
        let a = shared.join(0, 1, None, 1);
        shared.join(1, 2, None, 2);
        let writer = SharedDoc::with_client_id(7);
        let hello = writer.insert("content", 0, "hello").unwrap();
        let poison = writer.insert("content", 5, "!").unwrap();
        let other = SharedDoc::with_client_id(8);
        other.apply_update(&hello).unwrap();
        let typed = other.insert("content", 0, "> ").unwrap();
        crate::doc::shared_tests::PANICS_ON.with(|p| *p.borrow_mut() = Some(poison.clone()));
        send(&mut shared.rooms[0], 0, 1, update(a, 1, hello));
        send(&mut shared.rooms[0], 0, 1, update(a, 2, poison));
        send(&mut shared.rooms[0], 0, 1, update(a, 3, typed));
        shared.drive(0);
        shared.follow(0);
        shared.follow(1);
        let refusal = refusal_of(&shared.got[0][&1], 2);
        let Some((Reason::Malformed, detail)) = refusal else {
            panic!("{:?}", shared.got[0][&1])
        };
        assert!(detail.contains("a bug in integration"), "{detail}");
        assert_eq!(steps(&shared.got[1][&2]), vec![(a, 1)]);
        assert_eq!(shared.stops, [(0, Some(a)), (1, Some(a))]);
        for i in 0..2 {
            assert!(shared.rooms[i].is_stopped(), "relay {i}");
            shared.reload(i);
            let late = shared.rooms[i]
                .join(0, 3, req("late", None), [3; 16])
                .unwrap();
            assert_eq!(late.refused, vec![2], "relay {i}");
            assert_eq!(shared.rooms[i].doc.text("content"), "> hello", "relay {i}");
        }
    }

    /// A shared room cannot judge an update when it comes in (its document may lag the log), so
    /// every relay judges it in the log's order, the same way: one that does not integrate
    /// reaches no member, and its sender gets a `malformed` refusal in place of its
    /// acknowledgement. What the sender sent after it, sent again after its fence, gets the
    /// answer still to come, not a `replay`. No catch-up replays it, on either relay.
    #[test]
    fn a_shared_room_refuses_in_the_logs_order_an_update_that_does_not_integrate() {
        let mut shared = Shared::new(2);
        let a = shared.join(0, 1, None, 1);
        shared.join(1, 2, None, 2);
        send(&mut shared.rooms[0], 0, 1, update(a, 1, after_a_gap()));
        shared.drive(0);
        // Step 2 goes out before step 1's refusal comes back: relay A reads the log (step 1)
        // before the store has step 2.
        send(&mut shared.rooms[0], 0, 1, data(a, 2));
        let entries = shared.store.follow_now("r", shared.rooms[0].published());
        shared.rooms[0].followed(0, &entries, &[], true);
        shared.drive(0);
        let got = std::mem::take(shared.got[0].get_mut(&1).unwrap());
        let [Frame::Reject {
            step: 1,
            reason: Reason::Malformed,
            detail,
        }] = got.as_slice()
        else {
            panic!("{got:?}")
        };
        assert!(
            detail.contains("client 77's clocks 3..4 after clocks 0..3"),
            "{detail}"
        );
        // The client's fence, and step 2 sent again: its acknowledgement is still to come.
        send(
            &mut shared.rooms[0],
            0,
            1,
            Bytes::from(Frame::Fence { step: 2 }.encode()),
        );
        send(&mut shared.rooms[0], 0, 1, data(a, 2));
        shared.drive(0);
        shared.follow(0);
        shared.follow(1);
        assert_eq!(
            shared.got[0][&1],
            [
                Frame::Fence { step: 2 },
                Frame::Ack {
                    step: 2,
                    position: 2
                }
            ]
        );
        assert_eq!(steps(&shared.got[1][&2]), vec![(a, 2)]);
        for i in 0..2 {
            let late = shared.rooms[i]
                .join(0, 3, req("late", None), [3; 16])
                .unwrap();
            assert_eq!(late.refused, vec![1], "relay {i}");
        }
        // A relay that loads the room later judges it the same way.
        let record = shared.store.open_now("r", RoomConfig::default());
        let document = shared.store.document_now("r");
        let mut reloaded =
            RoomCore::new("r".into(), record, &document, RoomLimits::default(), 0).unwrap();
        let late = reloaded.join(0, 1, req("late", None), [4; 16]).unwrap();
        assert_eq!(late.refused, vec![1]);
        assert_eq!(reloaded.load_failures(), 0);
    }

    /// An update the log refused, whose refusal its client never heard (its connection
    /// dropped), and which a snapshot then dropped from the log: sent again after the client
    /// resumes, on the same relay or on another (whose validators know the step), or on a relay
    /// that restarted since (whose store finds the step stored), it is refused again, not
    /// answered `replay` as if stored. The room's document is what tells: it holds every update
    /// the log kept.
    #[test]
    fn an_update_the_log_refused_sent_again_after_a_snapshot_dropped_it_is_refused_again() {
        for (resume_on, restarted) in [(0, false), (1, false), (1, true)] {
            let mut shared = Shared::with_limits(
                2,
                RoomLimits {
                    compact_updates: 2,
                    ..RoomLimits::default()
                },
            );
            let follow_all = |shared: &mut Shared| {
                shared.follow(0);
                shared.follow(1);
            };
            let a = shared.join(0, 1, None, 1);
            let b = shared.join(0, 2, None, 2);
            send(&mut shared.rooms[0], 0, 1, update(a, 1, after_a_gap()));
            shared.drive(0);
            // Its client is gone before the log is read back, and the refusal with it.
            shared.rooms[0].leave(1);
            follow_all(&mut shared);
            // Two honest updates, and the snapshot after them drops what came before.
            let writer = SharedDoc::with_client_id(11);
            for step in 1..=2 {
                let u = writer.insert("content", 0, "b").unwrap();
                send(&mut shared.rooms[0], 0, 2, update(b, step, u));
                shared.drive(0);
                follow_all(&mut shared);
            }
            follow_all(&mut shared);
            let log = shared.store.log("r");
            assert!(
                matches!(Frame::decode(&log[0].bytes), Ok(Frame::Snapshot { .. })),
                "the snapshot dropped the entries before it"
            );
            if restarted {
                shared.reload(resume_on);
            }
            // The client resumes, and sends its update again.
            let again = shared.join(resume_on, 3, Some([1; 16]), 9);
            assert_eq!(again, a);
            send(
                &mut shared.rooms[resume_on],
                0,
                3,
                update(a, 1, after_a_gap()),
            );
            shared.drive(resume_on);
            follow_all(&mut shared);
            let got = &shared.got[resume_on][&3];
            let [Frame::Reject {
                step: 1,
                reason: Reason::Malformed,
                detail,
            }] = got.as_slice()
            else {
                panic!("relay {resume_on}, restarted {restarted}: {got:?}")
            };
            assert!(detail.contains("client 77"), "{detail}");
            for room in &shared.rooms {
                assert_eq!(room.document().text("content"), "bb");
            }
        }
    }

    /// A relay that lags the log so far that another relay's snapshot drops entries before it
    /// reads them never judges the updates among them. An acknowledgement it holds for one of
    /// them (its member's update, refused by the relays that read it) is not sent as it was
    /// when the relay reads past them: the update is judged against that snapshot, and its
    /// sender gets the refusal; an update the snapshot holds gets its acknowledgement.
    #[test]
    fn an_answer_held_past_a_stretch_the_log_skipped_is_judged_against_the_snapshot() {
        let mut shared = Shared::with_limits(
            2,
            RoomLimits {
                compact_updates: 2,
                ..RoomLimits::default()
            },
        );
        let a = shared.join(1, 1, None, 1);
        let b = shared.join(0, 2, None, 2);
        let c = shared.join(1, 3, None, 3);
        // Relay 1 appends a's update (which does not integrate) and c's (which does), and
        // reads nothing back yet.
        send(&mut shared.rooms[1], 0, 1, update(a, 1, after_a_gap()));
        shared.drive(1);
        let writer = SharedDoc::with_client_id(12);
        let first = writer.insert("content", 0, "c").unwrap();
        send(&mut shared.rooms[1], 0, 3, update(c, 1, first));
        shared.drive(1);
        // Relay 0 reads them, refuses a's, and b's two updates make it compact: its snapshot
        // drops everything before it.
        shared.follow(0);
        let other = SharedDoc::with_client_id(11);
        for step in 1..=2 {
            let u = other.insert("content", 0, "b").unwrap();
            send(&mut shared.rooms[0], 0, 2, update(b, step, u));
            shared.drive(0);
            shared.follow(0);
        }
        shared.follow(0);
        let log = shared.store.log("r");
        assert!(
            matches!(Frame::decode(&log[0].bytes), Ok(Frame::Snapshot { .. })),
            "the snapshot dropped the entries before it"
        );
        // Relay 1 reads the log now: past the skipped stretch, to the snapshot.
        shared.follow(1);
        let got_a = &shared.got[1][&1];
        assert_eq!(acks(got_a), [], "{got_a:?}");
        assert_eq!(rejects_of(got_a), [Reason::Malformed], "{got_a:?}");
        assert_eq!(acks(&shared.got[1][&3]), [(1, 2)]);
        for room in &shared.rooms {
            assert_eq!(room.document().text("content"), "bbc");
        }
    }

    /// A relay that reads a shared room's log after another relay's snapshot dropped entries
    /// it had not read lacks them until it has that snapshot, which comes later in the log than
    /// the updates appended while it was on its way. Read in the same batch, the snapshot goes
    /// into the document first, and the updates are judged in their turn as every other relay
    /// judged them: an honest one that builds on the dropped entries reaches the members, one
    /// after a gap does not. Read later, the snapshot is waited for, and the updates judged
    /// then (the members got them unjudged); either way the relay's document is the others'.
    #[test]
    fn updates_read_past_a_dropped_stretch_of_the_log_are_judged_as_everywhere_else() {
        let writer = SharedDoc::with_client_id(5);
        writer.insert("content", 0, "first").unwrap();
        let state = writer.snapshot();
        let second = writer.insert("content", 5, " second").unwrap();
        // Position 1 (`first`) was dropped by the snapshot at 4, which holds position 1; 2 and
        // 3 came while it was on its way.
        let log = [
            followed(2, 7, 2, &update(7, 2, second), 0),
            followed(3, 8, 1, &update(8, 1, after_a_gap()), 0),
            followed(4, 0, 0, &snapshot_frame(state), 1),
        ];
        for batches in [vec![&log[..]], vec![&log[..2], &log[2..]]] {
            let mut room = room();
            room.share();
            room.join(0, 1, req("m", None), [1; 16]).unwrap();
            outputs(&mut room);
            for batch in &batches {
                room.followed(0, batch, &[], true);
            }
            let got: Vec<(NodeId, Step)> = outputs(&mut room)
                .iter()
                .filter_map(|o| match o {
                    Output::Fanout { bytes, .. } => {
                        let frame = Frame::decode_positioned(bytes, &Limits::default()).ok()?;
                        frame.frame.stamp().map(|s| (s.sender, s.step))
                    }
                    _ => None,
                })
                .collect();
            if batches.len() == 1 {
                assert_eq!(got, [(7, 2)]);
            }
            assert_eq!(room.document().text("content"), "first second");
            let late = room.join(0, 2, req("late", None), [2; 16]).unwrap();
            assert_eq!(late.refused, vec![3]);
        }
    }

    /// A relay opening a shared room reads the room's record, then its document, which may
    /// hold entries past the record's position: the room reads those again as it follows the
    /// log. Each is judged once, in its turn, as on every other relay: here an update after a
    /// gap in client 77's clocks, then client 77's first edit, which fills the gap only later.
    #[test]
    fn a_shared_room_judges_entries_past_its_record_once_in_their_turn() {
        let abc = SharedDoc::with_client_id(77)
            .insert("content", 0, "abc")
            .unwrap();
        let log = [
            followed(1, 8, 1, &update(8, 1, after_a_gap()), 0),
            followed(2, 9, 1, &update(9, 1, abc), 0),
        ];
        let logged: Vec<Logged> = log
            .iter()
            .map(|f| Logged {
                position: f.position,
                sender: f.sender,
                bytes: f.bytes.clone(),
            })
            .collect();
        let record = RoomRecord::new(RoomConfig::default(), 1);
        let mut room =
            RoomCore::new("r".into(), record, &logged, RoomLimits::default(), 0).unwrap();
        room.share();
        room.followed(0, &log, &[], true);
        assert_eq!(room.document().text("content"), "abc");
        let late = room.join(0, 1, req("late", None), [1; 16]).unwrap();
        assert_eq!(late.refused, vec![1]);
    }

    /// A client whose update the log refused after it lost its connection sends the update
    /// again from its outbox, on the same relay or another, which judged the update too, or
    /// judges it after the resend came: it is refused there, not answered `replay` (which its
    /// client takes for "stored").
    #[test]
    fn a_refusal_the_sender_missed_answers_its_resend_on_any_relay() {
        for (rejoin_on, judged_first) in [(0, true), (1, true), (1, false)] {
            let mut shared = Shared::new(2);
            let a = shared.join(0, 1, Some([1; 16]), 1);
            send(&mut shared.rooms[0], 0, 1, update(a, 1, after_a_gap()));
            shared.drive(0);
            shared.rooms[0].leave(1);
            shared.drive(0);
            shared.follow(0);
            if judged_first {
                shared.follow(1);
            }
            let again = shared.join(rejoin_on, 5, Some([1; 16]), 9);
            assert_eq!(again, a);
            send(
                &mut shared.rooms[rejoin_on],
                0,
                5,
                update(a, 1, after_a_gap()),
            );
            shared.drive(rejoin_on);
            shared.follow(rejoin_on);
            assert_eq!(
                rejects_of(&shared.got[rejoin_on][&5]),
                [Reason::Malformed],
                "rejoined on relay {rejoin_on}, judged first: {judged_first}"
            );
        }
    }

    /// A snapshot read after an update it dropped from the store (the relay read the update
    /// before the drop, and it waits in the backlog) holds that update as the relay that took
    /// the snapshot judged it: it does not go into the document ahead of its turn, or the
    /// update would be judged again against what came after it.
    #[test]
    fn a_snapshot_holding_an_update_read_before_it_waits_for_its_turn() {
        // The relay that compacted refused client 77's update after a gap (position 9), then
        // took client 77's first edit (position 12), then took a snapshot of that (covers 20).
        let writer = SharedDoc::with_client_id(77);
        writer.insert("content", 0, "abc").unwrap();
        let mut room = room();
        room.share();
        room.join(0, 1, req("m", None), [1; 16]).unwrap();
        outputs(&mut room);
        // The update at 9 waits for a publication placed before it.
        let publication = Relayed {
            relay: 9,
            after: 5,
            to: None,
            high: 0,
            bytes: Bytes::from(Frame::PeerLeft { node: 99 }.encode()),
        };
        let gap = update(8, 1, after_a_gap());
        room.followed(0, &[followed(9, 8, 1, &gap, 0)], &[publication], false);
        let snapshot = followed(25, 0, 0, &snapshot_frame(writer.snapshot()), 20);
        room.followed(0, &[snapshot], &[], true);
        assert_eq!(room.document().text("content"), "abc");
    }

    /// In a room two relays share, a sync request to everyone (any member may send one, a
    /// read-only one too) had every member of every relay answer with its whole document. It
    /// goes to one writer of the asker's relay; with none there, to one writer of each other
    /// relay.
    #[test]
    fn a_sync_request_to_everyone_in_a_shared_room_goes_to_one_writer_per_relay_at_most() {
        let request = |asker: NodeId, step: Step| {
            let stamp = Stamp {
                sender: asker,
                step,
                pattern: PatternConfig::default().value(step),
            };
            let body = Body::SyncRequest {
                doc: WHOLE_DOC.into(),
                state_vector: Vec::new(),
                to: 0,
            };
            Bytes::from(Frame::stamped(stamp, body).encode())
        };
        let asked = |shared: &Shared| -> usize {
            shared
                .got
                .iter()
                .flat_map(|got| got.values())
                .flatten()
                .filter(|f| matches!(f, Frame::Stamped(s) if matches!(s.body, Body::SyncRequest { .. })))
                .count()
        };
        for writers_with_asker in [2, 0] {
            let mut shared = Shared::new(2);
            let asker = shared.join(0, 1, None, 1);
            for i in 0..writers_with_asker {
                shared.join(0, 10 + i, None, 10 + i as u8);
            }
            for i in 0..3 {
                shared.join(1, 20 + i, None, 20 + i as u8);
            }
            send(&mut shared.rooms[0], 0, 1, request(asker, 1));
            shared.drive(0);
            shared.listen(1);
            shared.follow(0);
            shared.follow(1);
            assert_eq!(
                asked(&shared),
                1,
                "{writers_with_asker} writers beside the asker"
            );
        }
    }

    /// A tab reopened after its node was released gets a new node. Its clock starts at what
    /// its storage reserved, up to 100 steps ahead of where it was; the welcome's floor brings
    /// it back, or each reopening would take it further ahead of the room until the relay
    /// refused all it sent as `futureStep`. A shared room gave no floor at all; a node new to
    /// it gets one now (nothing of it can be on another relay), a node it knew still none.
    #[test]
    fn a_node_new_to_a_shared_room_gets_a_floor() {
        let mut room = room();
        room.share();
        let fresh = room.join(0, 1, req("a", None), [1; 16]).unwrap();
        assert_eq!(welcome_floor(&fresh), Some(0));
        room.leave(1);
        let resumed = room.join(0, 2, req("a", Some([1; 16])), [2; 16]).unwrap();
        assert_eq!(resumed.node, fresh.node);
        assert_eq!(welcome_floor(&resumed), None);
    }

    fn rejects_of(frames: &[Frame]) -> Vec<Reason> {
        frames
            .iter()
            .filter_map(|f| match f {
                Frame::Reject { reason, .. } => Some(*reason),
                _ => None,
            })
            .collect()
    }
    #[test]
    fn what_is_not_stored_reaches_the_other_relay_after_the_log_before_it() {
        let mut shared = Shared::new(2);
        let a = shared.join(0, 1, None, 1);
        shared.listen(1);
        let b = shared.join(1, 2, None, 2);
        // B's welcome lists A's member; A hears that B's joined.
        shared.listen(0);
        assert!(matches!(
            shared.got[0][&1].as_slice(),
            [Frame::PeerJoined { peer }] if peer.node == b
        ));
        // A stored message, then a signal behind it: B's member gets the message first.
        send(&mut shared.rooms[0], 0, 1, data(a, 1));
        shared.drive(0);
        let stamp = Stamp {
            sender: a,
            step: 2,
            pattern: PatternConfig::default().value(2),
        };
        let signal = Frame::stamped(
            stamp,
            Body::Signal {
                data: Json::parse("2").unwrap(),
            },
        );
        send(&mut shared.rooms[0], 0, 1, Bytes::from(signal.encode()));
        shared.drive(0);
        // The signal is published before B has read the log: B holds it.
        shared.listen(1);
        assert!(
            steps(&shared.got[1][&2]).is_empty(),
            "{:?}",
            shared.got[1][&2]
        );
        shared.follow(1);
        assert_eq!(steps(&shared.got[1][&2]), vec![(a, 1), (a, 2)]);
        // A presence, and a late joiner on B hears it and sees A's member in its welcome.
        let presence = Frame::Presence {
            sender: a,
            data: Json::parse("{\"cursor\":3}").unwrap(),
        };
        send(&mut shared.rooms[0], 0, 1, Bytes::from(presence.encode()));
        shared.drive(0);
        shared.listen(1);
        let late = shared.rooms[1]
            .join(0, 3, req("late", None), [3; 16])
            .unwrap();
        assert_eq!(late.presences.len(), 1);
        let welcome = Frame::decode(&late.welcome).unwrap();
        let Frame::Welcome { peers, .. } = welcome else {
            panic!("{welcome:?}")
        };
        assert_eq!(peers.iter().map(|p| p.node).collect::<Vec<_>>(), vec![a, b]);
        // A's member leaves: B's members hear it.
        shared.rooms[0].leave(1);
        shared.drive(0);
        shared.listen(1);
        assert!(shared.got[1][&2]
            .iter()
            .any(|f| matches!(f, Frame::PeerLeft { node } if *node == a)));
    }
}
