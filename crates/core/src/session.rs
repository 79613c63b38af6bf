//! The client session: the whole client side of the protocol as a state machine, with no IO.
//!
//! A driver (the browser's `MeshClient`, the native tokio client, the simulation) owns a
//! [`Session`] and pumps it, in the shape of quinn-proto:
//!
//! - inputs: [`Session::handle_connected`], [`Session::handle_frame`], [`Session::handle_closed`],
//!   [`Session::handle_timeout`], and the application's operations ([`Session::broadcast`],
//!   [`Session::update`], [`Session::set_presence`], [`Session::close`], ...), each with `now` in
//!   milliseconds on any monotonic clock;
//! - outputs: [`Session::poll_output`] (open a socket, send bytes, close the socket),
//!   [`Session::poll_event`] (what the application hears), and [`Session::poll_timeout`] (when
//!   to call [`Session::handle_timeout`] next).
//!
//! The session never reads a clock and never draws a random number of its own: the jitter of its
//! backoff comes from a seed the driver passes in.
//!
//! # Delivery
//!
//! Durable messages (data, updates, snapshots) wait in an outbox until the relay acknowledges
//! each one by its step. A message is stamped when it is first sent, not when it is made: what
//! waits unsent (offline, or held back by the pacer) carries no step yet, and consecutive updates
//! of one document that wait are merged into one. Sending is paced a little under the rate the
//! relay announced in its welcome, so an honest client is not refused for its rate; a wait for
//! the pacer of [`PACED_NOTICE`] or more is told to the application ([`Event::Paced`]).
//!
//! Once sent, a message keeps its stamp: after a reconnect it is sent again as it was, and if the
//! relay had stored it already it answers `replay`, which the session reads as "stored". That is
//! exact because the relay never stores a connection's frames out of order: after it refuses a
//! frame, it refuses every later one as `outOfOrder` until the client sends a [`Frame::Fence`].
//! The session, on a refusal, stops sending, waits if the reason is passing (`rateLimited`,
//! `unavailable`), sends the fence and sends again from the refused message on; a message
//! refused for what it is (`tooLarge`, `stale`, ...) leaves the outbox with a
//! [`Event::Refused`]. So every edit reaches the room, or the application is told it never will.
//!
//! A relay that no longer knows the node's resume token gives a new node id; the messages in
//! flight are then stamped again for the new identity and sent anew (a data message whose
//! acknowledgement was lost may then arrive twice; an update applied twice changes nothing).
//! A session whose clock runs more than half the room's `max_future` (or more than its
//! `stale_window`) ahead of the room's step, welcomed with no floor to bring it back (a tab
//! reopened from storage starts at the ceiling it stored), asks for a new identity itself: it
//! joins again without its resume token (once no data message is in flight, which would arrive
//! twice).

use std::collections::VecDeque;

use crate::clock::{Advance, StepClock};
use crate::doc::{has_insertions, Replica, Version};
use crate::pace::TokenBucket;
use crate::pattern::{PatternConfig, PatternValue, Step};
use crate::saved::{decode_message, encode_unsent, Saved, Stored};
use crate::validate::{Counters, Origin, Validator, ValidatorConfig, Verdict};
use crate::vec_map::VecMap;
use crate::wire::part::{self, Reassembler};
use crate::wire::{
    close, Body, Frame, Json, Kind, Limits, NodeId, Peer, Positioned, Reason, RelayLimits,
    ResumeToken, RoomConfig, Stamp, Stamped, WHOLE_DOC,
};

/// The most bytes an insert's update and message add to the inserted text, besides the text's
/// name twice (the update's parent and the message's document): a Yjs v1 update of one item
/// (client, clock, origins, lengths, an empty delete set) and the message's header.
const INSERT_OVERHEAD: usize = 128;

/// A session's settings.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// The room to join.
    pub room: String,
    /// The display name.
    pub name: String,
    /// The settings to create the room with, if it does not exist yet.
    pub room_config: Option<RoomConfig>,
    /// How long the first join may take, in milliseconds, before the session gives up and
    /// closes with the last failure as its reason.
    pub connect_timeout: u64,
    /// How long one attempt may take from opening a socket to the relay's welcome.
    pub join_timeout: u64,
    /// The seed of the backoff's jitter.
    pub seed: u64,
    /// Decoder limits until the relay announces its own.
    pub limits: Limits,
    /// Whether the driver stores the session ([`Output::Save`]): then no stamped message goes
    /// out before the driver said its stamp is stored ([`Session::handle_saved`]), and the
    /// session never gives up connecting (the application works offline; `connect_timeout`
    /// does not apply).
    pub persist: bool,
    /// The state a previous session of this room stored: its identity, log position and
    /// outbox. The replica must hold the document stored with it.
    pub restore: Option<Saved>,
    /// Whether the driver gets a fresh access token before each connection: then a connection
    /// closed because its token expired ([`close::TOKEN_EXPIRED`]) is opened again; without,
    /// the session stops there, since the same token would be refused.
    pub fresh_tokens: bool,
    /// How many relays the driver can connect to (relays that share one store serve every room
    /// alike). Each new attempt after a connection failed or dropped goes to the next one,
    /// in turn: [`Session::relay`] says which. The outbox and the node's identity go along.
    pub relays: usize,
    /// Milliseconds between the heartbeats the session sends while joined (the relay answers
    /// each). A connection that brings nothing for this long after a heartbeat went out
    /// (between one and two heartbeats after its last frame) is taken for dead: the session
    /// drops it and reconnects. A relay closes a member it has heard nothing from for its idle
    /// timeout (90 s by default), so this must stay well under that. 0: no heartbeats: a
    /// silent connection is never given up, and the relay closes one that sends nothing else
    /// for its idle timeout (the session then reconnects).
    pub heartbeat: u64,
}

impl SessionConfig {
    /// Settings to join `room` as `name`, with the defaults: a 10 s connect timeout, a 10 s
    /// join timeout and a heartbeat every 15 s.
    pub fn new(room: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            room: room.into(),
            name: name.into(),
            room_config: None,
            connect_timeout: 10_000,
            join_timeout: 10_000,
            seed: 0x9e37_79b9_7f4a_7c15,
            limits: Limits::default(),
            persist: false,
            restore: None,
            fresh_tokens: false,
            relays: 1,
            heartbeat: 15_000,
        }
    }
}

/// The state of the connection, as the application sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// Opening the first connection.
    Connecting,
    /// Joined and caught up: messages flow.
    Open,
    /// The connection dropped; the session reconnects by itself after a backoff.
    Reconnecting,
    /// For good: closed by the application, refused by the relay, or never joined.
    Closed,
}

impl Status {
    /// `"connecting"`, `"open"`, `"reconnecting"` or `"closed"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Connecting => "connecting",
            Status::Open => "open",
            Status::Reconnecting => "reconnecting",
            Status::Closed => "closed",
        }
    }
}

/// Where an anomaly was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// This client's validation refused a frame it received.
    Local,
    /// The relay refused a frame this client sent.
    Relay,
}

impl Source {
    /// `"local"` or `"relay"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Local => "local",
            Source::Relay => "relay",
        }
    }
}

/// A frame refused, here or by the relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anomaly {
    /// Who refused it.
    pub source: Source,
    /// Why.
    pub reason: Reason,
    /// What exactly was wrong.
    pub detail: String,
    /// The frame's step (0 if it had none).
    pub step: Step,
    /// The frame's sender, for frames received.
    pub sender: Option<NodeId>,
}

/// What the application hears from the session.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The connection's state changed; `reason` says why when it is not `Open`.
    Status {
        /// The new state.
        status: Status,
        /// Why (a close code and reason, a timeout, ...).
        reason: Option<String>,
    },
    /// Application data from another member, validated.
    Message {
        /// Sender, step and pattern.
        stamp: Stamp,
        /// The data.
        data: Json,
        /// Whether the relay stored it (`broadcast`), or only passed it on
        /// (`broadcast_signal`).
        durable: bool,
    },
    /// A frame was refused (see [`Anomaly`]).
    Anomaly(Anomaly),
    /// A message of this client was refused for good: it will never reach the room.
    Refused {
        /// The step it was sent at.
        step: Step,
        /// What it was.
        kind: Kind,
        /// Its document, for updates and snapshots.
        doc: Option<String>,
        /// Why.
        reason: Reason,
        /// The relay's explanation.
        detail: String,
    },
    /// The members present changed.
    Peers {
        /// Everyone present now (but this client).
        peers: Vec<Peer>,
        /// Who joined, if someone did.
        joined: Option<Peer>,
        /// Who left, if someone did.
        left: Option<NodeId>,
        /// Who changed its name, if someone did (with the new name).
        renamed: Option<Peer>,
    },
    /// The room step moved.
    Step {
        /// The new step.
        step: Step,
        /// Its pattern value.
        pattern: PatternValue,
        /// Its phase.
        phase: u64,
    },
    /// A member's ephemeral state.
    Presence {
        /// The member.
        sender: NodeId,
        /// The state.
        data: Json,
    },
    /// The document changed through a remote update (the driver re-reads what it shows).
    Remote,
    /// Messages wait for the pacer, which keeps this client a little under the rate and
    /// bandwidth the relay announced: after a paste of tens of megabytes, or once `rateLimited`
    /// refusals have slowed the pace. Told when what waits will take [`PACED_NOTICE`] or more
    /// to go out, again if the wait grows to twice what was left of the one told, and with
    /// `wait` 0 once
    /// nothing waits for the pacer any more (it all went out, or the connection dropped: the
    /// messages then wait for the next one, which the status says).
    Paced {
        /// About how many milliseconds until what waits now has gone out (0: the wait is over).
        wait: u64,
        /// Stored messages not yet acknowledged ([`Session::pending`]).
        messages: usize,
    },
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Open a socket to the relay, then call [`Session::handle_connected`] (or
    /// [`Session::handle_closed`] if it fails).
    Connect,
    /// Send these bytes as one binary message on the open socket.
    Send(Vec<u8>),
    /// Close the socket with this code and reason; no [`Session::handle_closed`] is expected.
    Disconnect {
        /// The close code.
        code: u16,
        /// The reason.
        reason: String,
    },
    /// Store [`Session::saved`] and append [`Session::take_updates`] to the stored document, in
    /// one write (both as they are when the driver takes them), then call
    /// [`Session::handle_saved`] with what it stored ([`Saved::stored`]). Only with
    /// [`SessionConfig::persist`]. One write at a time is enough: if this comes again while a
    /// write is under way, write once more after it.
    Save,
}

/// An operation the session cannot take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// The session is closed.
    #[error("the client is closed")]
    Closed,
    /// The message would be larger than the relay accepts, even in parts.
    #[error("the message is {len} bytes, over the relay's limit of {max}")]
    TooLarge {
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The step clock is exhausted.
    #[error("the step clock is at its maximum")]
    StepOverflow,
    /// A display name longer than the relay accepts.
    #[error("the name is {len} bytes, over the {max} bytes a name may have")]
    NameTooLong {
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// This member may only read the room (its access token says so, or the relay refused a
    /// write of this connection as `forbidden`): the edit was not made.
    #[error("this member's access token lets it read only: the edit was not made")]
    ReadOnly,
    /// The document name `*` ([`WHOLE_DOC`]) is the client's own: it names the whole document
    /// given back to a relay that lost the room's history, which the relay takes without
    /// comparing it with what it holds.
    #[error("the document name \"*\" is reserved for the whole document a client gives back")]
    ReservedName,
}

/// The connection's phase, inside the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    /// No socket; the next attempt is at `retry_at` (or never, when closed).
    Down { retry_at: Option<u64> },
    /// A socket is being opened; the attempt is abandoned at `deadline`.
    Opening { deadline: u64 },
    /// The join is sent; the welcome is due by `deadline`.
    Joining { deadline: u64 },
    /// The welcome is in; the log is being replayed.
    CatchingUp,
    /// Live.
    Open,
}

/// What [`Session::repair`] set aside.
#[derive(Debug)]
pub struct Repaired<R> {
    /// The document that diverged.
    pub set_aside: R,
    /// The updates of the outbox, which the new document starts with (storage replaces the
    /// stored document with them).
    pub outbox: Vec<Vec<u8>>,
}

/// A message sent at least once: its stamp is fixed.
#[derive(Debug, Clone)]
struct Sent {
    stamp: Stamp,
    kind: Kind,
    doc: Option<String>,
    bytes: Vec<u8>,
    /// Stamped (and paced) but never sent: it waits for its stamp to be stored.
    fresh: bool,
    /// Restored from the stored session (see [`Session::set_read_only`]).
    restored: bool,
}

/// A message waiting to be stamped and sent.
#[derive(Debug, Clone)]
struct Waiting {
    body: Body,
    /// Restored from the stored session (see [`Session::set_read_only`]).
    restored: bool,
}

/// After a refusal: nothing stamped goes out until `until`; then a fence for `step`.
#[derive(Debug, Clone, Copy)]
struct Hold {
    until: u64,
    step: Step,
}

/// With `persist`, how many steps above its clock a session stores as its ceiling: it stamps
/// that many messages before it must store a higher one, and a session restored from storage
/// skips at most that many steps.
const STEP_RESERVE: Step = 100;

/// How long the replica may hold back remote updates that wait for earlier parts before the
/// application is told and the room asked for what is missing, in milliseconds.
const HELD_GRACE: u64 = 10_000;

/// A wait for the pacer at least this long, in milliseconds, is told to the application
/// ([`Event::Paced`]).
pub const PACED_NOTICE: u64 = 1_000;

/// Updates that wait are merged while the result stays under this size. Each merge re-encodes
/// the whole merged update, so a burst costs its keystrokes times this size: at 16 KiB, 30,000
/// keystrokes of the automerge-paper trace merge in 1.6 s natively and go out as 36 messages
/// (579.5 KB in all); at 256 KiB they took 24.4 s for 3 messages of the same total size.
const MERGE_LIMIT: usize = 16 * 1024;

/// A sender's checkpoints are compared with this replica at most once in this many
/// milliseconds. Each comparison takes the replica's version, which walks the whole document,
/// and a member could send checkpoint after checkpoint, as fast as the relay lets it (an honest
/// one sends one as each phase begins); those between are passed over.
pub const CHECKPOINT_EVERY: u64 = 1_000;

/// The most senders whose last compared checkpoint is kept; past it, those older than
/// [`CHECKPOINT_EVERY`] are forgotten.
const MAX_COMPARED: usize = 4_096;

/// Milliseconds between dropping a connection to join again as a new node and the new join.
const RENEW_WAIT: u64 = 100;

/// How many signals may wait for the pacer; more are dropped (`broadcast_signal` returns
/// `false`) rather than sent late in a burst.
pub const MAX_WAITING_SIGNALS: usize = 256;

/// The client side of the protocol. `R` is the document it keeps in sync.
pub struct Session<R> {
    config: SessionConfig,
    replica: R,
    status: Status,
    closed: bool,
    ever_open: bool,
    link: Link,
    attempt: u32,
    /// The relay the next (or current) connection goes to, in `0..config.relays`.
    target: usize,
    last_failure: Option<String>,
    connect_deadline: Option<u64>,
    node: NodeId,
    token: Option<ResumeToken>,
    position: u64,
    room: Option<RoomConfig>,
    limits: Limits,
    relay: RelayLimits,
    clock: StepClock,
    validator: Validator,
    reassembler: Reassembler,
    /// Durable messages sent and not yet acknowledged, in step order.
    in_flight: VecDeque<Sent>,
    /// `in_flight[resend..]` must be sent (again) on the current connection.
    resend: usize,
    /// Messages not yet stamped: durable ones and ephemeral ones, in order.
    waiting: VecDeque<Waiting>,
    hold: Option<Hold>,
    /// Fences sent that the relay has not echoed yet: until it does, `outOfOrder` refusals are
    /// about frames sent before the fence.
    unechoed: u32,
    /// The relay lost history this client had seen: after the catch-up, the client gives its
    /// whole document back.
    give_back: bool,
    /// The identity of the room's log, from the last welcome.
    log: u64,
    /// Consecutive passing refusals, for their backoff.
    refusals: u32,
    /// Whether an update of this client was refused for good (see [`Session::diverged`]).
    diverged: bool,
    pacer: TokenBucket,
    /// The same for the bytes of stored messages and signals (the relay's bandwidth per node).
    byte_pacer: TokenBucket,
    /// The share of the announced rate the pacer uses: halved on every refusal for the rate
    /// (the relay may count several tabs of one address together), grown back as messages are
    /// acknowledged.
    pace: f64,
    presence: Option<Json>,
    presence_due: bool,
    /// Since when the replica holds back remote updates whose earlier parts never arrived,
    /// and whether the application was told (once for each time it happens).
    held_since: Option<u64>,
    held_reported: bool,
    /// Since when messages wait for the pacer (cleared once nothing does).
    paced_since: Option<u64>,
    /// When the wait told to the application ([`Event::Paced`]) was to end, until its end is
    /// told.
    paced_told: Option<u64>,
    /// The name the last join gave, and whether the relay must hear a newer one.
    announced: String,
    rename_due: bool,
    peers: VecMap<NodeId, String>,
    /// The latest presence of each peer present (a peer that leaves takes its presence along).
    presences: VecMap<NodeId, Json>,
    rng: u64,
    outputs: VecDeque<Output>,
    events: VecDeque<Event>,
    /// With `persist`: every stamped message up to this step is stored; later ones may not go
    /// out yet.
    stored_upto: Step,
    /// With `persist`: the step storage holds as this node's ceiling. No message is stamped
    /// above it, so a session restored from storage (whose clock starts at the ceiling) never
    /// stamps a step again, signals included, that it may have used before.
    ceiling: Step,
    /// With `persist`: a message waits for a higher ceiling to be stored.
    ceiling_blocked: bool,
    /// With `persist`: the stored state is out of date.
    save_due: bool,
    /// With `persist`: document updates not yet handed to storage.
    unstored: Vec<Vec<u8>>,
    /// The next join presents no resume token, so the relay welcomes this client as a new node:
    /// the clock ran too far ahead of the room's, and the relay gave no floor to bring it back.
    renew: bool,
    /// The clock ran this far ahead of the room's with data in flight: the node joins again as
    /// a new one once no data is in flight (see [`Session::renew_identity`]).
    renew_due: Option<Step>,
    /// A new identity did not bring the clock back to the room's: no more are asked for.
    renew_futile: bool,
    /// This node is a new identity that has had nothing stored yet: a `futureStep` refusal
    /// of its messages is not answered with yet another one (see [`Session::on_reject`]).
    renew_unproven: bool,
    /// The relay refused a write of this connection as `forbidden` (a read-only token): no
    /// checkpoints go out until the next connection.
    forbidden: bool,
    /// The access token of the current connection lets this member read only, by its own claim
    /// (see [`Session::set_read_only`]).
    read_only: bool,
    /// After a repair: the log position the application had its data messages up to (the
    /// catch-up from the start of the log does not tell them again).
    quiet_upto: u64,
    /// The client and first clock of the first edit the relay refused for good: the outbox's
    /// updates that need that clock build on it (see [`Session::repair`]).
    refused_write: Option<(u64, u64)>,
    /// The relay refused a sync answer of this connection (it held what the room has not
    /// stored): no more answers until the next connection.
    answer_refused: bool,
    /// The digest of the replica at the version it was last taken at: a digest walks every
    /// text, and a member may send checkpoint after checkpoint at this replica's version.
    digested: Option<(Version, u64)>,
    /// When each sender's last checkpoint was compared with this replica (see
    /// [`CHECKPOINT_EVERY`]).
    compared: VecMap<NodeId, u64>,
    /// When the connection last brought a frame, when the next heartbeat goes out, and when
    /// the first heartbeat sent since that frame went out (the relay answers each).
    heard_at: u64,
    beat_at: u64,
    probe: Option<u64>,
}

impl<R: Replica> Session<R> {
    /// A session for `replica`; it asks to connect at once (see [`Session::poll_output`]).
    pub fn new(mut config: SessionConfig, replica: R, now: u64) -> Self {
        let pattern = PatternConfig::default();
        let relay = RelayLimits::default();
        let restore = config.restore.take();
        let mut session = Self {
            limits: config.limits,
            rng: config.seed | 1,
            connect_deadline: (!config.persist).then(|| now.saturating_add(config.connect_timeout)),
            config,
            replica,
            status: Status::Connecting,
            closed: false,
            ever_open: false,
            link: Link::Down { retry_at: None },
            attempt: 0,
            target: 0,
            last_failure: None,
            node: 0,
            token: None,
            position: 0,
            room: None,
            relay,
            clock: StepClock::new(pattern),
            validator: Validator::new(ValidatorConfig::default()),
            reassembler: Reassembler::new(),
            in_flight: VecDeque::new(),
            resend: 0,
            waiting: VecDeque::new(),
            hold: None,
            unechoed: 0,
            give_back: false,
            log: 0,
            refusals: 0,
            diverged: false,
            pacer: pacer(&relay, 1.0, now),
            byte_pacer: byte_pacer(&relay, 1.0, now),
            pace: 1.0,
            presence: None,
            presence_due: false,
            held_since: None,
            held_reported: false,
            paced_since: None,
            paced_told: None,
            announced: String::new(),
            rename_due: false,
            peers: VecMap::new(),
            presences: VecMap::new(),
            outputs: VecDeque::new(),
            events: VecDeque::new(),
            stored_upto: 0,
            ceiling: 0,
            ceiling_blocked: false,
            renew: false,
            renew_due: None,
            renew_futile: false,
            renew_unproven: false,
            save_due: false,
            unstored: Vec::new(),
            forbidden: false,
            read_only: false,
            quiet_upto: 0,
            refused_write: None,
            answer_refused: false,
            digested: None,
            compared: VecMap::new(),
            heard_at: now,
            beat_at: now,
            probe: None,
        };
        if let Some(saved) = restore {
            session.restore(saved);
        }
        session.open_socket(now);
        session
    }

    /// Takes up a stored state: the identity, the log position, the clock and the outbox.
    fn restore(&mut self, saved: Saved) {
        if let Some(config) = saved.room {
            if let (Ok(pattern), Ok(validator)) = (
                PatternConfig::new(config.pattern),
                ValidatorConfig::for_room(&config),
            ) {
                self.clock = StepClock::new(pattern);
                self.validator = Validator::new(validator);
                self.room = Some(config);
                self.position = saved.position;
                self.log = saved.log;
                // Owed to this log, if the tab closed before it caught up.
                self.give_back = saved.give_back;
                // A stored document that diverged, and that the driver loaded all the same
                // (see `Saved::sets_aside_document`), still does.
                self.diverged = saved.diverged;
            }
        }
        self.node = saved.node;
        self.token = saved.token;
        let mut broken = 0;
        for bytes in &saved.sent {
            match decode_message(bytes) {
                Ok(Stamped { stamp, body })
                    if self.token.is_some() && stamp.sender == self.node =>
                {
                    self.stored_upto = self.stored_upto.max(stamp.step);
                    self.in_flight.push_back(Sent {
                        stamp,
                        kind: body.kind(),
                        doc: body.doc().map(str::to_owned),
                        bytes: bytes.clone(),
                        fresh: false,
                        restored: true,
                    });
                }
                // Stamped under an identity this session does not have: stamped again.
                Ok(Stamped { body, .. }) => self.waiting.push_back(Waiting {
                    body,
                    restored: true,
                }),
                Err(_) => broken += 1,
            }
        }
        self.ceiling = saved.step.max(self.stored_upto);
        let advance = self.clock.pass(self.ceiling);
        self.step_event(advance);
        for bytes in &saved.unsent {
            match decode_message(bytes) {
                Ok(Stamped { body, .. }) if body.is_durable() => self.waiting.push_back(Waiting {
                    body,
                    restored: true,
                }),
                Ok(_) => {}
                Err(_) => broken += 1,
            }
        }
        if broken > 0 {
            self.anomaly(
                Source::Local,
                Reason::Malformed,
                format!("{broken} stored outbox messages did not decode and are lost"),
                0,
                None,
            );
        }
    }

    // ----- what the driver reads -----

    /// The next thing the driver must do.
    pub fn poll_output(&mut self) -> Option<Output> {
        if let Some(output) = self.outputs.pop_front() {
            return Some(output);
        }
        if std::mem::take(&mut self.save_due) && self.config.persist {
            return Some(Output::Save);
        }
        None
    }

    /// The next event for the application.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Session::handle_timeout`] must be called next, if ever.
    pub fn poll_timeout(&mut self) -> Option<u64> {
        if self.closed {
            return None;
        }
        let mut next: Option<u64> = None;
        let mut at = |t: u64| next = Some(next.map_or(t, |n| n.min(t)));
        match self.link {
            Link::Down { retry_at: Some(t) } => at(t),
            Link::Opening { deadline } | Link::Joining { deadline } => at(deadline),
            Link::Open => {
                if let Some(hold) = self.hold {
                    at(hold.until);
                } else if let Some((frames @ 1.., bytes)) = self.next_cost() {
                    let bytes_at = if bytes > 0 {
                        self.byte_pacer.ready_at(bytes)
                    } else {
                        0
                    };
                    at(self.pacer.ready_at(frames).max(bytes_at));
                }
            }
            _ => {}
        }
        if let Some(deadline) = self.connect_deadline {
            at(deadline);
        }
        if self.beats() {
            at(self.dead_at().map_or(self.beat_at, |d| d.min(self.beat_at)));
        }
        if let (Some(since), false, Link::Open) = (self.held_since, self.held_reported, &self.link)
        {
            at(since.saturating_add(HELD_GRACE));
        }
        next
    }

    /// Which of the [`SessionConfig::relays`] the next (or current) connection goes to: the
    /// driver opens that one's URL on [`Output::Connect`].
    pub fn relay(&self) -> usize {
        self.target
    }

    /// The connection's state.
    pub fn status(&self) -> Status {
        self.status
    }

    /// This client's node id (0 before the first welcome).
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// The room step this client has reached.
    pub fn step(&self) -> Step {
        self.clock.local()
    }

    /// The last room log position received.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// The room's settings, once welcomed.
    pub fn room_config(&self) -> Option<&RoomConfig> {
        self.room.as_ref()
    }

    /// The room's pattern (the default one until the welcome).
    pub fn pattern(&self) -> &PatternConfig {
        self.clock.pattern()
    }

    /// The phase of the current step.
    pub fn phase(&self) -> u64 {
        self.clock.phase()
    }

    /// The step of the next checkpoint.
    pub fn next_checkpoint(&self) -> Step {
        self.clock.next_checkpoint()
    }

    /// Durable messages not yet acknowledged (sent or waiting).
    pub fn pending(&self) -> usize {
        self.in_flight.len() + self.waiting.iter().filter(|w| w.body.is_durable()).count()
    }

    /// Whether an update of this client's document was refused for good (a `refused` event
    /// of kind `update`: by the relay, or here, on a read-only connection or over the relay's
    /// limit). The document then holds an edit the room never will: it shows what no other
    /// member sees, and the relay refuses its later edits that come after the refused one in
    /// its client's clocks, each with a `refused` event. A client that loads the room anew
    /// shares edits again. (Not stored: a tab reopened from storage starts with `false`.)
    pub fn diverged(&self) -> bool {
        self.diverged
    }

    /// Sets aside a document that diverged ([`Session::diverged`]) and starts again from the
    /// room's, as a session restored from storage does when it reopens: `replica` (empty, under
    /// a client id of its own) takes its place with the updates of the outbox applied, and the
    /// session catches up from the start of the room's log over a new connection ([`Output`]
    /// asks for it; the old one is done with). What the room has of the outbox is acknowledged,
    /// the rest sent, and what builds on the refused edit refused, each with its event, as
    /// ever. Returns the document set aside and the outbox's updates (for storage, which
    /// replaces the stored document with them); `None` when there is nothing to repair: the
    /// document has not diverged, or a relay that lost the room's history is owed it (it may
    /// be the only copy of everyone's edits, and goes back first).
    pub fn repair(&mut self, now: u64, replica: R) -> Result<Option<Repaired<R>>, SessionError> {
        if self.closed {
            return Err(SessionError::Closed);
        }
        // What `Saved::sets_aside_document` asks, without building the saved state twice.
        if !self.diverged || self.give_back {
            return Ok(None);
        }
        // The outbox's edits that build on the first one the relay refused: those that write
        // its client's clocks from there on (a local edit writes its own client's, after the
        // ones before). The relay would refuse each, and the new document hold it back for
        // good. They go with the document set aside; the rest (what came before it, deletions,
        // other clients' edits taken in from closed tabs, a document owed to a relay that lost
        // the room's history) goes to the room.
        if let Some((client, clock)) = self.refused_write {
            let builds_on = |body: &Body| match body {
                Body::Update { doc, update } if doc != WHOLE_DOC => {
                    crate::doc::v1::first_write(update)
                        .is_some_and(|(c, at)| c == client && at >= clock)
                }
                _ => false,
            };
            let mut dropped = Vec::new();
            for sent in std::mem::take(&mut self.in_flight) {
                let body = decode_message(&sent.bytes).ok().map(|s| s.body);
                match body.as_ref().is_some_and(builds_on) {
                    true => dropped.push((sent.stamp.step, sent.doc)),
                    false => self.in_flight.push_back(sent),
                }
            }
            for waiting in std::mem::take(&mut self.waiting) {
                match builds_on(&waiting.body) {
                    true => dropped.push((0, waiting.body.doc().map(str::to_owned))),
                    false => self.waiting.push_back(waiting),
                }
            }
            self.resend = self.resend.min(self.in_flight.len());
            for (step, doc) in dropped {
                self.events.push_back(Event::Refused {
                    step,
                    kind: Kind::Update,
                    doc,
                    reason: Reason::Malformed,
                    detail: "it builds on an edit the relay refused for good, and goes with the document the repair set aside".into(),
                });
            }
        }
        self.end_pace();
        let mut saved = self.saved();
        let outbox = saved.set_aside_document();
        let mut config = self.config.clone();
        config.restore = Some(saved);
        let mut next = Session::new(config, replica, now);
        for update in &outbox {
            if let Err(e) = next.replica.apply_update(update) {
                let detail =
                    format!("an edit of the outbox does not apply to the room's document: {e}");
                next.anomaly(Source::Local, Reason::Malformed, detail, 0, None);
            }
        }
        // The client was connected before: it does not give up on a first join that takes
        // long, as a new one does.
        next.connect_deadline = None;
        next.ever_open = self.ever_open;
        next.read_only = self.read_only;
        // What the relay's buckets hold for this node, and what the application set.
        next.pacer = self.pacer.clone();
        next.byte_pacer = self.byte_pacer.clone();
        next.pace = self.pace;
        next.presence = self.presence.take();
        next.quiet_upto = self.position;
        let mut events = std::mem::take(&mut self.events);
        events.append(&mut next.events);
        next.events = events;
        let old = std::mem::replace(self, next);
        let status = match self.ever_open {
            true => Status::Reconnecting,
            false => Status::Connecting,
        };
        // Told even when the status does not change: the connection starts again.
        self.status = status;
        self.emit(Event::Status {
            status,
            reason: Some("the document diverged: it loads again from the room's".into()),
        });
        Ok(Some(Repaired {
            set_aside: old.replica,
            outbox,
        }))
    }

    /// Whether storage may forget this session (delete its record): it is closed, nothing of
    /// it waits for the relay, and its replica holds no document. A record is also what says
    /// which log the stored document was last part of: without it, the next session of the tab
    /// starts with no log, takes a relay that lost the room's history (another log) for a
    /// first visit, and never gives the document back; the edits only the lost log held are
    /// then gone from the room, and the relay refuses every later edit made next to them.
    pub fn may_forget(&self) -> bool {
        self.closed && self.pending() == 0 && !self.give_back && self.replica.is_empty()
    }

    /// The latest presence of each peer present that has set one, by node id.
    pub fn presences(&self) -> &VecMap<NodeId, Json> {
        &self.presences
    }

    /// Removes a peer's presence, and says so with a presence of `null`.
    fn forget_presence(&mut self, node: NodeId) {
        if self.presences.remove(&node).is_some() {
            self.emit(Event::Presence {
                sender: node,
                data: Json::null(),
            });
        }
    }

    /// The members present now (but this client).
    pub fn peers(&self) -> Vec<Peer> {
        self.peers
            .iter()
            .map(|(&node, name)| Peer {
                node,
                name: name.clone(),
            })
            .collect()
    }

    /// The counts of this client's local verdicts.
    pub fn counters(&self) -> &Counters {
        self.validator.counters()
    }

    /// The largest update (or data) this session can send, in bytes of payload.
    pub fn max_payload(&self) -> usize {
        self.limits.max_message.saturating_sub(256)
    }

    /// Checks, before the document takes it, that an insert of `len` bytes of text into the
    /// text `name` makes an update this session can send: a document that took an edit it
    /// cannot send shows text no one else sees, and the relay refuses every later edit of its
    /// client (they come after a gap in its clocks). The bound covers the update's header and
    /// the message's (ids, origins, the text's name).
    pub fn check_insert(&self, name: &str, len: usize) -> Result<(), SessionError> {
        self.check_edit(name)?;
        self.check_size(len.saturating_add(INSERT_OVERHEAD + 2 * name.len()))
    }

    /// Whether this member may edit `doc` of the document, before the edit is made: not once it
    /// is known to read only ([`SessionError::ReadOnly`]: its access token says so, or the relay
    /// refused a write of this connection as `forbidden`), nor under the reserved name
    /// [`WHOLE_DOC`] ([`SessionError::ReservedName`]), nor once the session is closed. An edit
    /// made all the same would not reach the room, and leave the document showing what no other
    /// member has.
    pub fn check_edit(&self, doc: &str) -> Result<(), SessionError> {
        if self.closed {
            return Err(SessionError::Closed);
        }
        if doc == WHOLE_DOC {
            return Err(SessionError::ReservedName);
        }
        if self.read_only() {
            return Err(SessionError::ReadOnly);
        }
        Ok(())
    }

    /// Whether this member is known to read only: the access token of the current connection
    /// says so (see [`Session::set_read_only`]), or the relay refused a write of this
    /// connection as `forbidden`.
    pub fn read_only(&self) -> bool {
        self.read_only || self.forbidden
    }

    /// Whether the writes the session was restored with stay in the outbox, neither sent nor
    /// refused: a stored session whose token says it may only read (see
    /// [`Session::set_read_only`]). After a `forbidden` refusal the claim did not foretell, the
    /// relay has judged, and every write goes.
    fn keeps_outbox(&self) -> bool {
        self.read_only && self.config.persist
    }

    /// The waiting message to stamp next: the first, or, while the outbox is kept
    /// ([`Session::keeps_outbox`]), the first that is not a write (a sync request, wherever
    /// the kept writes left it).
    fn next_waiting(&self) -> Option<usize> {
        match self.keeps_outbox() {
            true => self.waiting.iter().position(|w| !w.body.is_durable()),
            false => (!self.waiting.is_empty()).then_some(0),
        }
    }

    /// Tells the application that the outbox is kept unsent ([`Session::keeps_outbox`]), if
    /// it holds anything.
    fn tell_kept(&mut self) {
        let kept =
            self.in_flight.len() + self.waiting.iter().filter(|w| w.body.is_durable()).count();
        if kept > 0 && self.keeps_outbox() {
            // Not refused: kept (and stored).
            self.events.push_back(Event::Refused {
                step: 0,
                kind: Kind::Update,
                doc: Some(WHOLE_DOC.into()),
                reason: Reason::Forbidden,
                detail: format!(
                    "{kept} message(s) in this client's stored outbox are not sent: this member may only read (they go under a token that may write, or from the next tab that may write once this one closes)"
                ),
            });
        }
    }

    /// The access token the driver connects with lets this member read only (its `access`
    /// claim is `read`), or not: set before each connection. The relay stays the judge of every
    /// write; this lets [`Session::check_edit`] refuse an edit before the document changes,
    /// rather than the relay after, when the document already shows it.
    ///
    /// A stored session keeps the writes it was restored with while it reads only, neither
    /// sent nor refused (see [`Event::Refused`] for the document [`WHOLE_DOC`]): they may be
    /// another tab's, taken with the stored session before a token from a function said this
    /// one may only read. They go under a token that may write, or from the next tab that may
    /// write and takes the stored session once this one closes. Its own writes, made before
    /// the token was in, are refused now, as the relay would refuse them.
    pub fn set_read_only(&mut self, read_only: bool) {
        self.read_only = read_only;
        // A `forbidden` refusal speaks of the connection before (whose token may have been
        // another).
        self.forbidden = false;
        if self.keeps_outbox() {
            self.refuse_writes();
        }
    }

    /// The document.
    pub fn replica(&self) -> &R {
        &self.replica
    }

    /// The document, to edit it; send each edit's update with [`Session::update`].
    pub fn replica_mut(&mut self) -> &mut R {
        &mut self.replica
    }

    /// Whether the session is closed for good.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    // ----- the application's operations -----

    /// Sends application data to the room. It is stamped when it goes out.
    pub fn broadcast(&mut self, now: u64, data: Json) -> Result<(), SessionError> {
        self.queue(now, Body::Data { data })
    }

    /// Sends application data that the relay passes on to the members present and never stores
    /// (a game tick, a cursor): it is stamped and validated like any message, but nobody
    /// acknowledges it, a late joiner never sees it, and it is not sent again. Returns whether
    /// it was queued: `false` when the session is not connected (a signal is about now, so it
    /// is dropped rather than sent after a reconnect; the same happens to signals still waiting
    /// for the pacer when the connection drops), or when [`MAX_WAITING_SIGNALS`] already wait
    /// for the pacer.
    pub fn broadcast_signal(&mut self, now: u64, data: Json) -> Result<bool, SessionError> {
        if self.closed {
            return Err(SessionError::Closed);
        }
        let waiting = self
            .waiting
            .iter()
            .filter(|w| matches!(w.body, Body::Signal { .. }))
            .count();
        if self.link != Link::Open || waiting >= MAX_WAITING_SIGNALS || self.read_only() {
            return Ok(false);
        }
        self.queue(now, Body::Signal { data })?;
        Ok(true)
    }

    /// Sends an update of `doc` that the application already applied to the replica. While it
    /// waits, it is merged with the updates of `doc` waiting before it.
    pub fn update(&mut self, now: u64, doc: &str, update: Vec<u8>) -> Result<(), SessionError> {
        if self.closed {
            return Err(SessionError::Closed);
        }
        if doc == WHOLE_DOC {
            return Err(SessionError::ReservedName);
        }
        // The message, not the update alone: one that fits only without its header would be
        // stored below, and then refused.
        let max = self.max_payload();
        if Body::update_len(doc, update.len()) > max {
            // A large deletion (one range per run of clocks it deletes) goes in pieces that
            // each fit; any other update is refused before anything of it is stored or sent.
            let room = max.saturating_sub(Body::update_len(doc, 0) + 10);
            let pieces = crate::doc::v1::split(&update, room).unwrap_or_default();
            let first = pieces.first().map_or(update.len(), Vec::len);
            self.check_size(Body::update_len(doc, first))?;
            for piece in pieces {
                self.update(now, doc, piece)?;
            }
            return Ok(());
        }
        // The document holds the edit whatever the room does with it: storage keeps what the
        // document holds, or a tab reopened from it misses this edit and holds back every
        // later one of its own for good.
        self.store_update(&update);
        if self.read_only() {
            return self.queue(
                now,
                Body::Update {
                    doc: doc.to_owned(),
                    update,
                },
            );
        }
        if let Some(Waiting {
            body:
                Body::Update {
                    doc: last_doc,
                    update: last,
                },
            // Not into a restored one (see `set_read_only`).
            restored: false,
        }) = self.waiting.back_mut()
        {
            if last_doc == doc && last.len() + update.len() <= MERGE_LIMIT {
                // Merged only while the message fits (a relay's message limit may be below the
                // merge limit).
                if let Some(merged) = self
                    .replica
                    .merge_updates(&[last.as_slice(), update.as_slice()])
                    .filter(|merged| Body::update_len(doc, merged.len()) <= max)
                {
                    *last = merged;
                    self.changed();
                    self.pump(now);
                    return Ok(());
                }
            }
        }
        self.queue(
            now,
            Body::Update {
                doc: doc.to_owned(),
                update,
            },
        )
    }

    /// Takes in, while this session runs, the outbox of another stored session of the room: a
    /// tab that closed while this one was open, with messages the relay never acknowledged.
    /// Its updates are that tab's own edits, which this replica never received: they are
    /// applied here (and so shown), and every message joins this outbox unstamped, to go out
    /// under this session's identity. Only for an [`adoptable`](Saved::adoptable) outbox (see
    /// [`Saved::adopt`]); the driver deletes the other record in the write that stores this
    /// outbox. Returns how many messages were taken in.
    pub fn take_in(&mut self, now: u64, other: &Saved) -> usize {
        if self.read_only() {
            // The relay would refuse every write of it: a tab that may write takes it in.
            return 0;
        }
        let mut taken = 0;
        let mut applied = false;
        // The closed tab owed the room's new log its document: this replica, which takes in
        // that tab's edits, goes back whole in its stead (the driver deletes its record).
        // A session that has not been welcomed yet knows no log: it takes the other's, whose
        // document this replica holds (storage keeps one document per room), so that a relay
        // that lost that log gets the document back.
        if self.log == 0 {
            self.log = other.log;
        }
        let owed = other.give_back && other.log == self.log && self.log != 0;
        if other.diverged && !self.diverged {
            // The closed tab's refused edit is in the stored document, and so in this replica.
            self.diverged = true;
            self.changed();
        }
        let broken = other.broken();
        if broken > 0 {
            let detail = match broken {
                1 => "1 message a closed tab left stored did not decode and is lost".to_owned(),
                n => format!("{n} messages a closed tab left stored did not decode and are lost"),
            };
            self.anomaly(Source::Local, Reason::Malformed, detail, 0, None);
        }
        for body in other.bodies() {
            if !body.is_durable() {
                continue;
            }
            if let Body::Update { update, .. } = &body {
                if let Err(e) = self.replica.apply_update(update) {
                    let detail = format!("an edit a closed tab left unsent does not apply: {e}");
                    self.anomaly(Source::Local, Reason::Malformed, detail, 0, None);
                    continue;
                }
                applied = true;
            }
            // Queued as any message is (refused at once on a read-only connection); one over
            // this relay's limit is refused here, and said so.
            let (kind, doc) = (body.kind(), body.doc().map(str::to_owned));
            // Another tab's: kept, not refused, if this member's token reads only later.
            match self.enqueue(now, body, true) {
                Ok(()) => taken += 1,
                Err(e) => self.emit(Event::Refused {
                    step: 0,
                    kind,
                    doc,
                    reason: Reason::TooLarge,
                    detail: format!("a message a closed tab left unsent cannot be sent: {e}"),
                }),
            }
        }
        if applied {
            self.note_held(now);
            self.emit(Event::Remote);
        }
        if owed && self.link == Link::Open {
            self.give_back_document();
            self.changed();
            self.pump(now);
        } else if owed {
            self.give_back = true;
            self.changed();
        }
        taken
    }

    /// Sets this client's ephemeral state (a cursor, a selection); it is sent now, or at the
    /// next connection, and never stored.
    pub fn set_presence(&mut self, now: u64, data: Json) -> Result<(), SessionError> {
        if self.closed {
            return Err(SessionError::Closed);
        }
        // Presence goes as one frame: one over the relay's limit would be refused (or close
        // the connection, and be sent again after every reconnect).
        let len = Frame::Presence {
            sender: self.node,
            data: data.clone(),
        }
        .encode()
        .len();
        let max = self.limits.max_frame;
        if len > max {
            return Err(SessionError::TooLarge { len, max });
        }
        self.presence = Some(data);
        self.presence_due = true;
        self.pump(now);
        Ok(())
    }

    /// Changes this client's display name for every peer: sent now if connected, and given in
    /// every later join.
    pub fn set_name(&mut self, now: u64, name: &str) -> Result<(), SessionError> {
        if self.closed {
            return Err(SessionError::Closed);
        }
        let max = crate::wire::Limits::default().max_name;
        if name.len() > max {
            return Err(SessionError::NameTooLong {
                len: name.len(),
                max,
            });
        }
        self.config.name = name.to_owned();
        // Sent when the connection is open (paced, like presence); a join under way gave the
        // old name, so the rename follows it.
        self.rename_due = self.link == Link::Open && self.config.name != self.announced;
        self.pump(now);
        Ok(())
    }

    /// What storage keeps of this session (see [`crate::saved`]): its identity, its place in
    /// the log and its outbox, as they are now.
    pub fn saved(&self) -> Saved {
        Saved {
            node: self.node,
            token: self.token,
            log: self.log,
            position: self.position,
            room: self.room,
            step: self
                .clock
                .local()
                .saturating_add(STEP_RESERVE)
                .max(self.ceiling),
            sent: self.in_flight.iter().map(|s| s.bytes.clone()).collect(),
            unsent: self
                .waiting
                .iter()
                .filter(|w| w.body.is_durable())
                .map(|w| encode_unsent(w.body.clone()))
                .collect(),
            give_back: self.give_back,
            diverged: self.diverged,
        }
    }

    /// Storage is gone for good (another page deleted the database): the session goes on
    /// without it, and what waited for a write goes out.
    pub fn stop_persisting(&mut self, now: u64) {
        self.config.persist = false;
        self.save_due = false;
        self.ceiling_blocked = false;
        self.unstored.clear();
        self.pump(now);
    }

    /// The driver stored a state ([`Saved::stored`] says what it covers): the messages stamped
    /// up to it may go out, and messages may be stamped up to its ceiling.
    pub fn handle_saved(&mut self, now: u64, stored: Stored) {
        if stored.log != self.log || stored.node != self.node {
            return;
        }
        if stored.upto > self.stored_upto || stored.ceiling > self.ceiling {
            self.stored_upto = self.stored_upto.max(stored.upto);
            self.ceiling = self.ceiling.max(stored.ceiling);
            self.pump(now);
        }
    }

    /// With `persist`: whether a stamped message waits for its stamp to be stored (so the next
    /// write is urgent; other changes, such as the log position, may wait a little to be
    /// written together).
    pub fn awaits_store(&self) -> bool {
        self.config.persist
            && (self.ceiling_blocked
                || self
                    .in_flight
                    .iter()
                    .any(|s| s.stamp.step > self.stored_upto))
    }

    /// Whether this stamped message may go out: its stamp is stored, or nothing is.
    fn is_stored(&self, sent: &Sent) -> bool {
        !self.config.persist || sent.stamp.step <= self.stored_upto
    }

    /// Notes that the stored state is out of date.
    fn changed(&mut self) {
        self.save_due = self.config.persist;
    }

    /// With `persist`: keeps an update applied to the replica for storage.
    fn store_update(&mut self, update: &[u8]) {
        if self.config.persist {
            self.unstored.push(update.to_vec());
            self.changed();
        }
    }

    /// With `persist`: the document's updates applied since the last call (the application's
    /// own, given to [`Session::update`], and those from the room, as they came, including
    /// parts the replica holds back for a missing dependency). The driver appends them to the
    /// stored document in the same write as [`Session::saved`], which is taken at the same
    /// moment; if the write fails, it keeps them for the next one.
    pub fn take_updates(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.unstored)
    }

    /// Closes the session for good.
    pub fn close(&mut self, _now: u64) {
        if self.closed {
            return;
        }
        if !matches!(self.link, Link::Down { .. }) {
            self.outputs.push_back(Output::Disconnect {
                code: 1000,
                reason: "closed by the application".into(),
            });
        }
        let pending = self.pending();
        let reason = if pending == 0 {
            "closed by the application".to_owned()
        } else {
            format!("closed by the application with {pending} messages not acknowledged")
        };
        self.finish(reason);
    }

    /// Drops the connection as a network failure would; the session reconnects by itself.
    pub fn disconnect(&mut self, now: u64) {
        if matches!(self.link, Link::Down { .. }) || self.closed {
            return;
        }
        self.outputs.push_back(Output::Disconnect {
            code: 1000,
            reason: "dropped by the application".into(),
        });
        self.handle_closed(now, 1006, "dropped by the application");
    }

    /// Sends bytes as they are, outside the protocol (to show what the relay does with a
    /// tampered frame). Returns false when not connected.
    pub fn send_raw(&mut self, bytes: Vec<u8>) -> bool {
        if self.link != Link::Open {
            return false;
        }
        // The clock moves past a raw frame's step, so that no message of this session shares it
        // (the relay's answer to one would be read as the answer to the other).
        if let Some((_, stamp)) = crate::wire::peek_stamp(&bytes) {
            let advance = self.clock.pass(stamp.step);
            self.step_event(advance);
        }
        self.outputs.push_back(Output::Send(bytes));
        true
    }

    /// Runs a received frame through this client's validation without applying or recording
    /// it; a refusal is counted and reported as an anomaly. Returns the refusal, if any.
    pub fn inspect(&mut self, bytes: &[u8]) -> Option<(Reason, String)> {
        let (reason, detail, step, sender) = match Frame::decode_with(bytes, &self.limits) {
            Err(e) => (e.reason(), e.to_string(), 0, None),
            Ok(Frame::Stamped(Stamped { stamp, body })) => {
                let origin = self.origin();
                let local = self.clock.local();
                match self.validator.peek(body.kind(), &stamp, origin, local) {
                    Verdict::Accepted => return None,
                    Verdict::Rejected(reason) => {
                        self.validator.record(reason);
                        let detail = self.validator.explain(&stamp, origin, local, reason);
                        (reason, detail, stamp.step, Some(stamp.sender))
                    }
                }
            }
            Ok(other) => (
                Reason::Unexpected,
                format!("a {} frame is not stamped", other.kind()),
                0,
                None,
            ),
        };
        self.anomaly(Source::Local, reason, detail.clone(), step, sender);
        Some((reason, detail))
    }

    // ----- the driver's inputs -----

    /// The socket the session asked for is open: the join goes out.
    pub fn handle_connected(&mut self, now: u64) {
        if self.closed || !matches!(self.link, Link::Opening { .. }) {
            return;
        }
        self.link = Link::Joining {
            deadline: now.saturating_add(self.config.join_timeout),
        };
        self.reassembler.clear();
        self.announced = self.config.name.clone();
        let join = Frame::Join {
            room: self.config.room.clone(),
            name: self.announced.clone(),
            since: self.position,
            log: self.log,
            resume: self.token.filter(|_| !self.renew),
            config: self.config.room_config,
            floor: true,
        };
        self.outputs.push_back(Output::Send(join.encode()));
    }

    /// The socket closed (or failed to open) with `code` and `reason`.
    pub fn handle_closed(&mut self, now: u64, code: u16, reason: &str) {
        if self.closed || matches!(self.link, Link::Down { .. }) {
            return;
        }
        self.reassembler.clear();
        let failure = if reason.is_empty() {
            format!("the connection closed ({code})")
        } else {
            format!("the connection closed ({code}): {reason}")
        };
        if close::is_final(code) || (code == close::TOKEN_EXPIRED && !self.config.fresh_tokens) {
            self.link = Link::Down { retry_at: None };
            return self.end(failure);
        }
        self.retry_later(now, failure);
    }

    /// A binary message arrived on the socket.
    pub fn handle_frame(&mut self, now: u64, bytes: &[u8]) {
        if self.closed || matches!(self.link, Link::Down { .. } | Link::Opening { .. }) {
            return;
        }
        self.heard_at = now;
        self.probe = None;
        let positioned = match Frame::decode_positioned(bytes, &self.limits) {
            Ok(Positioned {
                frame:
                    Frame::Part {
                        total,
                        offset,
                        bytes,
                    },
                ..
            }) => match self
                .reassembler
                .push(total, offset, bytes, self.limits.max_message)
            {
                Ok(None) => return,
                Ok(Some(whole)) => {
                    match Frame::decode_positioned(&whole, &self.limits.for_message()) {
                        Ok(p) => p,
                        Err(e) => {
                            return self.anomaly(Source::Local, e.reason(), e.to_string(), 0, None)
                        }
                    }
                }
                Err(e) => return self.anomaly(Source::Local, e.reason(), e.to_string(), 0, None),
            },
            Ok(p) => p,
            Err(e) => return self.anomaly(Source::Local, e.reason(), e.to_string(), 0, None),
        };
        let logged = positioned.position.is_some();
        if let Some(position) = positioned.position {
            self.position = self.position.max(position);
            self.changed();
        }
        self.on_frame(now, positioned.frame, logged);
        if let Some(ahead) = self.renew_due {
            if self.link == Link::Open && !self.data_in_flight() {
                self.renew_due = None;
                return self.renew_identity(now, ahead);
            }
        }
        self.pump(now);
    }

    /// Whether a data message that reached the relay, or may have, waits for its answer.
    fn data_in_flight(&self) -> bool {
        self.in_flight
            .iter()
            .any(|sent| sent.kind == Kind::Data && !sent.fresh)
    }

    /// Drops the connection and joins again at once without the resume token, as a new node:
    /// the clock runs `ahead` steps ahead of the room's, and the relay cannot bring it back
    /// (it cannot say where this node's steps stopped, or they stopped that far ahead).
    fn renew_identity(&mut self, now: u64, ahead: Step) {
        self.renew = true;
        self.renew_due = None;
        self.outputs.push_back(Output::Disconnect {
            code: 1000,
            reason: "joining again as a new node".into(),
        });
        // To the same relay, after about a round trip: the relay takes the old connection's
        // leave before the new join (a user at the most members one user may have would be
        // refused for a moment otherwise).
        self.down_until(
            now.saturating_add(RENEW_WAIT),
            format!(
                "this node's steps ran {ahead} or more ahead of the room's, which no longer \
                 takes what it stamps: joining again as a new node"
            ),
        );
    }

    /// Time passed: retries, deadlines, pacing and holds.
    pub fn handle_timeout(&mut self, now: u64) {
        if self.closed {
            return;
        }
        if let Some(deadline) = self.connect_deadline {
            if now >= deadline && !self.ever_open {
                if !matches!(self.link, Link::Down { .. }) {
                    self.outputs.push_back(Output::Disconnect {
                        code: 1000,
                        reason: "connect timeout".into(),
                    });
                }
                let last = self
                    .last_failure
                    .clone()
                    .unwrap_or_else(|| "no answer from the relay".into());
                return self.end(format!(
                    "could not join within {} ms; last: {last}",
                    self.config.connect_timeout
                ));
            }
        }
        if self.dead_at().is_some_and(|dead_at| now >= dead_at) {
            let failure = format!(
                "nothing came from the relay for {} s, not even an answer to a heartbeat: the connection is taken for dead",
                (now - self.heard_at) / 1000
            );
            self.outputs.push_back(Output::Disconnect {
                code: 1000,
                reason: "no answer to heartbeats".into(),
            });
            return self.retry_later(now, failure);
        }
        if self.beats() && now >= self.beat_at {
            self.beat_at = now.saturating_add(self.config.heartbeat);
            self.probe.get_or_insert(now);
            self.outputs
                .push_back(Output::Send(Frame::Heartbeat.encode()));
        }
        match self.link {
            Link::Down { retry_at: Some(t) } if now >= t => self.open_socket(now),
            Link::Opening { deadline } | Link::Joining { deadline } if now >= deadline => {
                self.outputs.push_back(Output::Disconnect {
                    code: 1000,
                    reason: "no welcome in time".into(),
                });
                let failure = format!(
                    "the relay did not welcome this client within {} ms",
                    self.config.join_timeout
                );
                self.retry_later(now, failure);
            }
            Link::Open => {
                self.check_held(now);
                self.pump(now);
            }
            _ => {}
        }
    }

    // ----- inside -----

    /// Whether heartbeats go out: while joined, unless they are off.
    fn beats(&self) -> bool {
        matches!(self.link, Link::CatchingUp | Link::Open) && self.config.heartbeat > 0
    }

    /// When the connection counts as dead if nothing comes: a heartbeat's time after the
    /// first heartbeat sent since the last frame. (Not a time after the last frame: a hidden
    /// tab's timers may fire a minute late, and the heartbeat they send must get its chance.)
    fn dead_at(&self) -> Option<u64> {
        let probe = self.probe.filter(|_| self.beats())?;
        Some(probe.saturating_add(self.config.heartbeat))
    }

    /// Notes whether the replica holds back remote updates after an apply.
    fn note_held(&mut self, now: u64) {
        if self.replica.has_pending() {
            self.held_since.get_or_insert(now);
        } else {
            self.held_since = None;
            self.held_reported = false;
        }
    }

    /// Updates held back longer than [`HELD_GRACE`]: the application is told (a `desync`
    /// anomaly), and every member asked for what this replica lacks.
    fn check_held(&mut self, now: u64) {
        let Some(since) = self.held_since else { return };
        if self.held_reported || now < since.saturating_add(HELD_GRACE) {
            return;
        }
        if !self.replica.has_pending() {
            self.held_since = None;
            return;
        }
        self.held_reported = true;
        self.anomaly(
            Source::Local,
            Reason::Desync,
            format!(
                "updates from the room have waited {} s for earlier updates that never arrived \
                 (a member's update the relay refused, or lost): this replica does not show \
                 them; the room is asked for what is missing",
                (now - since) / 1000
            ),
            self.clock.local(),
            None,
        );
        let state_vector = self.asking_state_vector();
        // To the room, which asks one writer (on a relay of its own).
        self.waiting.push_back(Waiting {
            body: Body::SyncRequest {
                doc: WHOLE_DOC.into(),
                state_vector,
                to: 0,
            },
            restored: false,
        });
    }

    /// The state vector a sync request carries: the replica's, or, when that is over one frame
    /// (a document thousands of tabs wrote to; the relay refuses it as `tooLarge`), none, which
    /// asks for everything.
    fn asking_state_vector(&self) -> Vec<u8> {
        let state_vector = self.replica.state_vector();
        if state_vector.len() > self.limits.max_frame {
            return Vec::new();
        }
        state_vector
    }

    fn origin(&self) -> Origin {
        Origin::Relayed {
            receiver: self.node,
        }
    }

    fn check_size(&self, len: usize) -> Result<(), SessionError> {
        let max = self.max_payload();
        if len > max {
            return Err(SessionError::TooLarge { len, max });
        }
        Ok(())
    }

    fn queue(&mut self, now: u64, body: Body) -> Result<(), SessionError> {
        self.enqueue(now, body, false)
    }

    /// Queues `body`; `restored` when it comes from a stored session (see
    /// [`Session::set_read_only`]).
    fn enqueue(&mut self, now: u64, body: Body, restored: bool) -> Result<(), SessionError> {
        if self.closed {
            return Err(SessionError::Closed);
        }
        self.check_size(body.encoded_len())?;
        if self.read_only() && !matches!(body, Body::SyncRequest { .. }) {
            // Read only on this connection: refused at once, as the relay would.
            if body.is_durable() {
                self.emit(Event::Refused {
                    step: 0,
                    kind: body.kind(),
                    doc: body.doc().map(str::to_owned),
                    reason: Reason::Forbidden,
                    detail: "this member's access token lets it read only".into(),
                });
            }
            return Ok(());
        }
        if body.is_durable() {
            self.changed();
        }
        self.waiting.push_back(Waiting { body, restored });
        self.pump(now);
        Ok(())
    }

    fn emit(&mut self, event: Event) {
        if let Event::Refused {
            kind: Kind::Update,
            doc: Some(doc),
            reason: Reason::Forbidden,
            ..
        } = &event
        {
            if doc == WHOLE_DOC {
                // This session's document given back (no application update has that name: see
                // `update`), refused because this member may only read (its token changed, or
                // the session did not know): no edit was refused, and the obligation stays, for
                // a token that may write or a tab that takes in this record. The document may
                // be the only copy of what the relay lost: it must not count as diverged, which
                // would have it set aside.
                if !self.give_back {
                    self.give_back = true;
                    self.changed();
                }
                self.events.push_back(event);
                return;
            }
        }
        if matches!(
            event,
            Event::Refused {
                kind: Kind::Update,
                ..
            }
        ) && !self.diverged
        {
            // Stored: the document storage keeps holds the refused edit (see `Saved::diverged`).
            self.diverged = true;
            self.changed();
        }
        self.events.push_back(event);
    }

    fn anomaly(
        &mut self,
        source: Source,
        reason: Reason,
        detail: String,
        step: Step,
        sender: Option<NodeId>,
    ) {
        self.emit(Event::Anomaly(Anomaly {
            source,
            reason,
            detail,
            step,
            sender,
        }));
    }

    fn set_status(&mut self, status: Status, reason: Option<String>) {
        if self.status != status {
            self.status = status;
            self.emit(Event::Status { status, reason });
        }
    }

    /// The session ends for good on a failure (`reason`: the relay's final close, a room that
    /// cannot be used, ...). What it has not had acknowledged goes from nowhere now: a session
    /// that persists leaves it stored, where the room's next client takes it in; any other
    /// refuses each durable message (`unavailable`, the reason in its detail), so that the
    /// application hears what did not go. (What the relay stored without its acknowledgement
    /// arriving is refused too: this session cannot tell.)
    fn end(&mut self, reason: String) {
        let pending = self.pending();
        if pending == 0 {
            return self.finish(reason);
        }
        let (messages, stay) = match pending {
            1 => ("message", "stays"),
            _ => ("messages", "stay"),
        };
        if self.config.persist {
            // Stored once more as closed: the driver then lets the record go, for the room's
            // next client to take in.
            self.changed();
            return self.finish(format!(
                "{reason}; {pending} {messages} not acknowledged {stay} stored for the room's next client"
            ));
        }
        let detail = format!("the client stopped before the relay acknowledged it: {reason}");
        self.refuse_outbox(Reason::Unavailable, &detail, false);
        self.finish(format!("{reason}; {pending} {messages} not sent"));
    }

    fn finish(&mut self, reason: String) {
        self.end_pace();
        self.closed = true;
        self.link = Link::Down { retry_at: None };
        self.connect_deadline = None;
        self.set_status(Status::Closed, Some(reason));
    }

    fn open_socket(&mut self, now: u64) {
        self.link = Link::Opening {
            deadline: now.saturating_add(self.config.join_timeout),
        };
        let status = if self.ever_open {
            Status::Reconnecting
        } else {
            Status::Connecting
        };
        self.set_status(status, self.last_failure.clone());
        self.outputs.push_back(Output::Connect);
    }

    fn retry_later(&mut self, now: u64, failure: String) {
        self.attempt = self.attempt.saturating_add(1);
        // Another relay may serve the room while this one is down.
        self.target = (self.target + 1) % self.config.relays.max(1);
        let wait = self.backoff();
        self.down_until(now.saturating_add(wait), failure);
    }

    /// The connection is gone (for `failure`): what was about it goes, and the next attempt is
    /// at `retry_at`.
    fn down_until(&mut self, retry_at: u64, failure: String) {
        // Checkpoints, sync messages and signals are about this connection's moment, and name
        // peers of this connection: after it they would be stale (a sync answer could even
        // reach a node that has the old addressee's id by then).
        self.waiting.retain(|w| w.body.is_durable());
        self.paced_since = None;
        self.end_pace();
        self.link = Link::Down {
            retry_at: Some(retry_at),
        };
        self.last_failure = Some(failure.clone());
        let status = if self.ever_open {
            Status::Reconnecting
        } else {
            Status::Connecting
        };
        if self.status == status {
            // Same state, new reason: say it.
            self.emit(Event::Status {
                status,
                reason: Some(failure),
            });
        } else {
            self.set_status(status, Some(failure));
        }
    }

    /// Exponential backoff with jitter: 250 ms doubling to 8 s, each wait between half and all
    /// of it.
    fn backoff(&mut self) -> u64 {
        self.jittered(250u64 << self.attempt.min(5))
    }

    /// A wait between half and all of `ceiling`, drawn from the driver's seed: sessions sent
    /// away together do not come back together.
    fn jittered(&mut self, ceiling: u64) -> u64 {
        ceiling / 2 + self.random() % (ceiling / 2 + 1)
    }

    /// xorshift64*, seeded by the driver.
    fn random(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A frame from the relay; `logged` if it carried a log position.
    fn on_frame(&mut self, now: u64, frame: Frame, logged: bool) {
        match frame {
            Frame::Welcome {
                node,
                resume,
                config,
                limits,
                high,
                log,
                peers,
                floor,
            } => self.on_welcome(now, node, resume, config, limits, (high, log, floor), peers),
            Frame::CaughtUp { position, .. } => {
                self.position = self.position.max(position);
                self.on_caught_up(now);
            }
            Frame::PeerJoined { peer } => {
                // The relay gives a newcomer the presences it holds, this client's included.
                self.peers.insert(peer.node, peer.name.clone());
                let peers = self.peers();
                self.emit(Event::Peers {
                    peers,
                    joined: Some(peer),
                    left: None,
                    renamed: None,
                });
            }
            Frame::PeerRenamed { peer } => {
                if let Some(name) = self.peers.get_mut(&peer.node) {
                    name.clone_from(&peer.name);
                    let peers = self.peers();
                    self.emit(Event::Peers {
                        peers,
                        joined: None,
                        left: None,
                        renamed: Some(peer),
                    });
                }
            }
            Frame::PeerLeft { node } => {
                self.peers.remove(&node);
                self.compared.remove(&node);
                self.forget_presence(node);
                let peers = self.peers();
                self.emit(Event::Peers {
                    peers,
                    joined: None,
                    left: Some(node),
                    renamed: None,
                });
            }
            Frame::Ack { step, position } => {
                // Everything logged before this message came through the same queue first.
                self.position = self.position.max(position);
                if let Some(i) = self.in_flight.iter().position(|s| s.stamp.step == step) {
                    self.remove_in_flight(i);
                    self.delivered(now);
                }
            }
            Frame::Reject {
                step,
                reason,
                detail,
            } => self.on_reject(now, step, reason, detail),
            Frame::Presence { sender, data } => {
                // `null` clears a peer's presence, as its leaving does.
                if data == Json::null() {
                    self.presences.remove(&sender);
                } else {
                    self.presences.insert(sender, data.clone());
                }
                self.emit(Event::Presence { sender, data });
            }
            Frame::Stamped(stamped) => self.on_stamped(now, stamped, logged),
            // The relay's compaction of the document, from the log: everything logged before
            // it, merged. Only the log carries one.
            Frame::Snapshot { state, .. } if logged => match self.replica.apply_update(&state) {
                Ok(()) => {
                    self.store_update(&state);
                    self.note_held(now);
                    self.emit(Event::Remote)
                }
                Err(e) => self.anomaly(Source::Local, Reason::Malformed, e.to_string(), 0, None),
            },
            Frame::Snapshot { .. } => self.anomaly(
                Source::Local,
                Reason::Unexpected,
                "a snapshot outside the room log".into(),
                0,
                None,
            ),
            Frame::Fence { .. } => self.unechoed = self.unechoed.saturating_sub(1),
            // The relay's answer to a heartbeat: hearing it was the point.
            Frame::Heartbeat => {}
            Frame::Join { .. } | Frame::Part { .. } | Frame::Rename { .. } => self.anomaly(
                Source::Local,
                Reason::Unexpected,
                "the relay sent a frame only clients send".into(),
                0,
                None,
            ),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_welcome(
        &mut self,
        now: u64,
        node: NodeId,
        resume: ResumeToken,
        config: RoomConfig,
        limits: RelayLimits,
        (high, log, floor): (Step, u64, Option<Step>),
        peers: Vec<Peer>,
    ) {
        if !matches!(self.link, Link::Joining { .. }) {
            return;
        }
        // The floor speaks of the node the relay welcomed, in this log: this one, resumed, or
        // a new one (the relay let this one go), whose steps need only pass the floor of the
        // senders the relay forgot; what was in flight is stamped again under it (below).
        let floor = floor.filter(|_| self.log == log);
        if self.log != 0 && self.log != log {
            // Another log: the relay lost the room's history (a new store). Node ids and steps
            // begin again, so the clock and the validator do too; the relay replays the whole
            // new log, and this client gives its document back afterwards, so that the log
            // holds it again for everyone.
            self.room = None;
            self.position = 0;
            self.quiet_upto = 0;
            self.stored_upto = 0;
            // The stored ceiling was of the old log's steps; a store write still under way
            // reports it for that log, and is not taken up (`handle_saved`).
            self.ceiling = 0;
            self.give_back = !self.replica.is_empty();
        }
        self.log = log;
        if self.room != Some(config) {
            // A new room configuration (or the first): the clock and the validator start anew.
            match (
                PatternConfig::new(config.pattern),
                ValidatorConfig::for_room(&config),
            ) {
                (Ok(pattern), Ok(validator)) => {
                    self.clock = StepClock::new(pattern);
                    self.validator = Validator::new(validator);
                    self.room = Some(config);
                }
                (Err(e), _) | (_, Err(e)) => {
                    self.outputs.push_back(Output::Disconnect {
                        code: close::POLICY,
                        reason: "unusable room configuration".into(),
                    });
                    return self.end(format!("the room's configuration is unusable: {e}"));
                }
            }
        }
        // A session restored from storage starts at the ceiling it stored, up to `STEP_RESERVE`
        // steps above those it stamped, and a relay that cannot say where this node's steps
        // stopped (it restarted since it let the node go, or another relay of a shared room
        // may have taken some) gives no floor to bring it back: each reopening took the clock
        // further ahead, until the room refused all it stamped as `futureStep`. A new node's
        // steps start at the room's (its welcome's floor brings the clock there).
        // Where the clock will be: at the welcome's floor if there is one (see `settle_clock`),
        // which may be far ahead too (the relay took that many steps of this node that the
        // room's step does not count).
        let ahead = match floor {
            Some(floor) => self
                .in_flight
                .iter()
                .map(|sent| sent.stamp.step)
                .fold(floor, Step::max)
                .saturating_sub(high),
            None => self.clock.local().saturating_sub(high),
        };
        // Far enough ahead that the room may soon refuse what it stamps (`max_future`), or, in
        // a real-time room, that it drops what the others stamp as too old (`stale_window`:
        // they stamp above the room's step).
        let limit = (config.max_future / 2).min(config.stale_window.unwrap_or(u64::MAX));
        self.renew_due = None;
        if self.token == Some(resume) && ahead > limit && !self.renew_futile {
            if !self.data_in_flight() {
                return self.renew_identity(now, ahead);
            }
            // What is in flight is stamped again under the new node (updates: the room applies
            // one twice as once), but data would arrive twice: the node joins again once the
            // data in flight is stored, and no more data goes out under it meanwhile.
            self.renew_due = Some(ahead);
        }
        let renewed = std::mem::take(&mut self.renew);
        self.renew_unproven = renewed;
        if self.token.is_some_and(|token| token != resume) {
            // The relay no longer knows this node (it gave a new token, and maybe a new id):
            // what was sent under the old identity is stamped again under the new one (its fate
            // under the old one is unknown).
            let resend: Vec<Waiting> = self
                .in_flight
                .drain(..)
                // This client encoded each, under the limits of the relay it went to (which may
                // have allowed more than this one).
                .filter_map(|sent| {
                    decode_message(&sent.bytes).ok().map(|stamped| Waiting {
                        body: stamped.body,
                        restored: sent.restored,
                    })
                })
                .collect();
            for waiting in resend.into_iter().rev() {
                self.waiting.push_front(waiting);
            }
            self.resend = 0;
            self.stored_upto = 0;
            // The ceiling was of the old node's steps; the new one's begin at the room's.
            self.ceiling = 0;
        }
        self.changed();
        self.forbidden = false;
        self.answer_refused = false;
        // The relay keeps a node's buckets across reconnects, and so do the pacers: a large
        // message sent just before the connection dropped is still being paid for there. A
        // fresh pacer sent it again at once, into the relay's debt, and each `rateLimited` that
        // followed halved the pace, until the debt a large message leaves at 1/64 of the rate
        // held every later edit back for many minutes. A new node, or other limits, start
        // with full buckets there, and here.
        if limits != self.relay || self.token != Some(resume) {
            self.pacer = pacer(&limits, self.pace, now);
            self.byte_pacer = byte_pacer(&limits, self.pace, now);
        }
        self.node = node;
        self.token = Some(resume);
        self.limits = self.config.limits.with_relay(&limits);
        self.relay = limits;
        let advance = self.clock.join(high);
        self.step_event(advance);
        if let Some(floor) = floor {
            self.settle_clock(high, floor);
        }
        let ahead = self.clock.local().saturating_sub(high);
        if ahead <= limit {
            self.renew_futile = false;
        } else if renewed {
            // The relay gives the new node no floor that brings it back (a relay that predates
            // the floor, or one whose floor for the senders it forgot is that high): joining
            // again would not help.
            self.renew_futile = true;
            self.anomaly(
                Source::Local,
                Reason::FutureStep,
                format!(
                    "this node's steps run {ahead} ahead of the room's, and a new identity did \
                     not bring them back: the room may refuse what it stamps"
                ),
                high,
                None,
            );
        }
        // Inserted one by one: `collect` into a map sorts with the standard library's stable sort,
        // kilobytes of wasm for a list the relay sends in order anyway.
        self.peers.clear();
        self.compared.clear();
        for peer in peers {
            self.peers.insert(peer.node, peer.name);
        }
        // Presences of peers that left while this client was away go; the relay sends those of
        // the peers present right after the welcome.
        let gone: Vec<NodeId> = self
            .presences
            .keys()
            .filter(|node| !self.peers.contains_key(node))
            .copied()
            .collect();
        for node in gone {
            self.forget_presence(node);
        }
        let peers = self.peers();
        self.emit(Event::Peers {
            peers,
            joined: None,
            left: None,
            renamed: None,
        });
        self.link = Link::CatchingUp;
        self.beat_at = now.saturating_add(self.config.heartbeat);
        self.probe = None;
    }

    /// Gives this replica's document back to a relay that lost the room's history: the whole
    /// document goes out first, so that the new log holds it again for everyone.
    fn give_back_document(&mut self) {
        // Without what the replica holds back (blocks and deletes waiting for clocks it never
        // received), which would make the relay refuse the whole document, and shows nothing.
        let kept = match self.replica.whole() {
            Ok(state) if state.len() <= self.max_payload() => {
                self.waiting.push_front(Waiting {
                    body: Body::Update {
                        doc: WHOLE_DOC.into(),
                        update: state,
                    },
                    restored: false,
                });
                Ok(())
            }
            Ok(state) => Err((
                Reason::TooLarge,
                format!(
                    "it is {} bytes, and the relay takes {} at most",
                    state.len(),
                    self.max_payload()
                ),
            )),
            Err(e) => Err((Reason::Malformed, e.to_string())),
        };
        if let Err((reason, why)) = kept {
            let detail = format!(
                "the relay lost the room's history, and this replica's document could not be given back ({why}): the room's log does not hold it, and members that join from now on do not get it"
            );
            self.anomaly(Source::Local, reason, detail, 0, None);
        }
    }

    fn on_caught_up(&mut self, now: u64) {
        if self.link != Link::CatchingUp {
            return;
        }
        self.link = Link::Open;
        self.ever_open = true;
        self.connect_deadline = None;
        self.attempt = 0;
        self.last_failure = None;
        self.hold = None;
        self.unechoed = 0;
        self.resend = 0;
        self.rename_due = self.config.name != self.announced;
        if self.presence.is_some() {
            self.presence_due = true;
        }
        self.set_status(Status::Open, None);
        if self.give_back && self.read_only() {
            // The relay would refuse it as `forbidden`. The obligation stays (stored with the
            // session): the document goes back from this session under a token that may write,
            // or from a tab that may write and takes in this record once this tab closes.
            // Not an edit refused: the document still shows what the room held (so not
            // `diverged`).
            self.events.push_back(Event::Refused {
                step: 0,
                kind: Kind::Update,
                doc: Some(WHOLE_DOC.into()),
                reason: Reason::Forbidden,
                detail: "the relay lost the room's history, and this member may only read: its document is not given back (a member that may write gives back its own)".into(),
            });
        } else if std::mem::take(&mut self.give_back) {
            self.give_back_document();
        }
        self.tell_kept();
        // A safety net after the log: one peer answers with what it has and this client lacks.
        if let Some(&peer) = self.peers.keys().next() {
            let state_vector = self.asking_state_vector();
            self.waiting.push_front(Waiting {
                body: Body::SyncRequest {
                    doc: WHOLE_DOC.into(),
                    state_vector,
                    to: peer,
                },
                restored: false,
            });
        }
        self.pump(now);
    }

    fn on_reject(&mut self, now: u64, step: Step, reason: Reason, detail: String) {
        let index = self.in_flight.iter().position(|s| s.stamp.step == step);
        match reason {
            // A message sent again that the relay had stored already: delivered. (Without an
            // entry, its acknowledgement came first.)
            Reason::Replay => {
                if let Some(i) = index {
                    self.remove_in_flight(i);
                    self.delivered(now);
                }
            }
            // Refused because an earlier frame was: it is sent again after the fence.
            Reason::OutOfOrder if self.hold.is_some() || self.unechoed > 0 => {}
            // Stamped further ahead of the room's step than the room allows: this node's clock
            // ran ahead of it (steps the room's step does not count, a floor that high), and
            // all it stamps would be refused the same way. It joins again as a new node, whose
            // steps start at the room's. A stored message is not lost: it and what this
            // connection sent after it (refused until the fence) go out again under the new
            // node (one not stored, a signal or a sync message, is told as an anomaly, as any
            // refusal of one). (Not for a node that is new already and had nothing stored:
            // joining again would not help.)
            Reason::FutureStep if !self.renew_unproven => {
                self.anomaly(Source::Relay, reason, detail, step, None);
                if let Some(from) = index {
                    let unsent: Vec<Waiting> = self
                        .in_flight
                        .drain(from..)
                        .filter_map(|sent| {
                            decode_message(&sent.bytes).ok().map(|stamped| Waiting {
                                body: stamped.body,
                                restored: sent.restored,
                            })
                        })
                        .collect();
                    for waiting in unsent.into_iter().rev() {
                        self.waiting.push_front(waiting);
                    }
                    self.resend = self.resend.min(self.in_flight.len());
                    self.changed();
                }
                let ahead = self.room.map_or(0, |room| room.max_future) + 1;
                self.renew_due = Some(ahead);
                self.hold_from(now, step, 0);
            }
            _ if reason.is_transient() => {
                self.anomaly(Source::Relay, reason, detail, step, None);
                self.refusals = self.refusals.saturating_add(1);
                if reason == Reason::RateLimited {
                    self.pace = (self.pace / 2.0).max(1.0 / 64.0);
                    self.repace(now);
                }
                // Drawn between half and all of the backoff: the tabs behind one address,
                // refused together once they are over its budget, come back one at a time.
                let wait = match reason {
                    Reason::RateLimited => self.jittered(250u64 << self.refusals.min(5)),
                    Reason::Unavailable => self.jittered(1_000u64 << self.refusals.min(5)),
                    _ => 0,
                };
                self.hold_from(now, step, wait);
            }
            _ => {
                self.anomaly(Source::Relay, reason, detail.clone(), step, None);
                if reason == Reason::Desync && index.is_none() {
                    // The relay refuses a sync answer that holds what the room has not stored.
                    self.answer_refused = true;
                }
                if reason == Reason::Forbidden && step != 0 {
                    // The token lets this member read only: every write of this connection
                    // would be refused the same way, so none is sent (again). (A refusal at
                    // step 0 is of a rename, for a member its token names: the anomaly says
                    // so, and its writes go on.)
                    self.forbidden = true;
                    self.refuse_writes();
                } else if let Some(i) = index {
                    let sent = self.remove_in_flight(i);
                    if self.refused_write.is_none() {
                        // (See `repair`.)
                        if let Ok(Stamped {
                            body: Body::Update { update, .. },
                            ..
                        }) = decode_message(&sent.bytes)
                        {
                            self.refused_write = crate::doc::v1::first_write(&update);
                        }
                    }
                    self.emit(Event::Refused {
                        step,
                        kind: sent.kind,
                        doc: sent.doc,
                        reason,
                        detail,
                    });
                }
                self.hold_from(now, step, 0);
            }
        }
    }

    /// A message in flight is stored: the relay took it, and the pace picks up again (it
    /// drops with each `rateLimited`).
    fn delivered(&mut self, now: u64) {
        self.refusals = 0;
        self.renew_unproven = false;
        if self.pace < 1.0 {
            self.pace = (self.pace * 1.02).min(1.0);
            self.repace(now);
        }
    }

    /// The pacers at the pace now, keeping what they hold or owe: a fresh bucket after each
    /// change of pace let a message go out at once into the relay's debt.
    fn repace(&mut self, now: u64) {
        self.pacer.retune(&pacer(&self.relay, self.pace, now), now);
        self.byte_pacer
            .retune(&byte_pacer(&self.relay, self.pace, now), now);
    }

    /// After a `forbidden` refusal, or a token known to read only: every stored message in the
    /// outbox leaves it with a [`Event::Refused`], and checkpoints and signals waiting go; but
    /// a stored session whose token says it may only read keeps those it was restored with
    /// ([`Session::keeps_outbox`]).
    fn refuse_writes(&mut self) {
        let keep = self.keeps_outbox();
        self.refuse_outbox(
            Reason::Forbidden,
            "this member's access token lets it read only",
            keep,
        );
    }

    /// Every stored message in the outbox leaves it with a [`Event::Refused`] for `reason`,
    /// but those it was restored with when `keep_restored`; checkpoints and signals waiting
    /// go, and sync requests stay.
    fn refuse_outbox(&mut self, reason: Reason, detail: &str, keep_restored: bool) {
        for sent in std::mem::take(&mut self.in_flight) {
            if keep_restored && sent.restored {
                self.in_flight.push_back(sent);
                continue;
            }
            self.emit(Event::Refused {
                step: sent.stamp.step,
                kind: sent.kind,
                doc: sent.doc,
                reason,
                detail: detail.to_owned(),
            });
        }
        self.resend = 0;
        for waiting in std::mem::take(&mut self.waiting) {
            match waiting.body {
                Body::SyncRequest { .. } => self.waiting.push_back(waiting),
                _ if keep_restored && waiting.restored => self.waiting.push_back(waiting),
                body if body.is_durable() => self.emit(Event::Refused {
                    step: 0,
                    kind: body.kind(),
                    doc: body.doc().map(str::to_owned),
                    reason,
                    detail: detail.to_owned(),
                }),
                _ => {}
            }
        }
        self.changed();
    }

    /// Stops stamped sends until `now + wait`; then a fence, and everything in flight from
    /// `step` on goes out again.
    fn hold_from(&mut self, now: u64, step: Step, wait: u64) {
        let from = self
            .in_flight
            .iter()
            .position(|s| s.stamp.step >= step)
            .unwrap_or(self.in_flight.len());
        self.resend = self.resend.min(from);
        let until = now.saturating_add(wait);
        self.hold = Some(match self.hold {
            Some(hold) => Hold {
                until: hold.until.max(until),
                step: hold.step.min(step),
            },
            None => Hold { until, step },
        });
    }

    fn remove_in_flight(&mut self, i: usize) -> Sent {
        self.changed();
        if i < self.resend {
            self.resend -= 1;
        }
        self.in_flight
            .remove(i)
            .expect("the index comes from a search of in_flight")
    }

    /// Brings the clock to where this node may stamp next, from the welcome's `floor`:
    /// above every step the relay accepted from it, the room's high step and what it still has
    /// in flight. A session restored from storage starts at its stored ceiling, which is above
    /// every step it may have stamped before it closed; left there, each restore would put it
    /// up to [`STEP_RESERVE`] steps further ahead of the room, until the relay refused all it
    /// stamps as `futureStep`.
    fn settle_clock(&mut self, high: Step, floor: Step) {
        let lowest = self
            .in_flight
            .iter()
            .map(|sent| sent.stamp.step)
            .fold(high.max(floor), Step::max);
        if lowest < self.clock.local() {
            self.clock.rewind(lowest);
            self.emit(Event::Step {
                step: lowest,
                pattern: self.clock.pattern().value(lowest),
                phase: self.clock.phase(),
            });
        } else {
            // Behind what the relay took from this node (storage that fell behind): a step at
            // or below the floor would be refused as a replay, which reads as delivered.
            let advance = self.clock.pass(lowest);
            self.step_event(advance);
        }
    }

    fn step_event(&mut self, advance: Advance) {
        if advance.moved() {
            self.emit(Event::Step {
                step: advance.to,
                pattern: self.clock.pattern().value(advance.to),
                phase: self.clock.phase(),
            });
        }
    }

    fn on_stamped(&mut self, now: u64, stamped: Stamped, logged: bool) {
        let Stamped { stamp, body } = stamped;
        if logged && stamp.sender == self.node && self.node != 0 {
            // This node's own message: the relay sends them only in a catch-up from the start
            // of the log (see `room::Joined::replays`), to a session that set its document
            // aside. It is in the log: what was in flight of it is acknowledged, and an update
            // goes back into the document (the one set aside held it).
            if let Some(i) = self
                .in_flight
                .iter()
                .position(|s| s.stamp.step == stamp.step)
            {
                self.remove_in_flight(i);
                self.delivered(now);
            }
            let advance = self.clock.accept(stamp.step);
            self.step_event(advance);
            if let Body::Update { update, .. } = &body {
                self.apply(now, update, &stamp);
            }
            return;
        }
        let origin = self.origin();
        let local = self.clock.local();
        // A message from the log is new by its position: a sender this client no longer tracks
        // is judged by its own steps, not by the floor of evicted senders.
        let verdict = if logged {
            self.validator
                .check_logged(body.kind(), &stamp, origin, local, now)
        } else {
            self.validator
                .check(body.kind(), &stamp, origin, local, now)
        };
        if let Verdict::Rejected(reason) = verdict {
            let detail = self.validator.explain(&stamp, origin, local, reason);
            return self.anomaly(
                Source::Local,
                reason,
                detail,
                stamp.step,
                Some(stamp.sender),
            );
        }
        // Only what every member receives moves the clock, as it moves the room's step (see
        // `Body::moves_step`).
        let entered_phase = body.moves_step() && {
            let advance = self.clock.accept(stamp.step);
            self.step_event(advance);
            advance.entered_phase.is_some()
        };
        let open = self.link == Link::Open;
        match body {
            // What the application had before a repair, come again in the catch-up from the
            // start of the log: not told twice.
            Body::Data { .. } if logged && self.position <= self.quiet_upto => {}
            Body::Data { data } => self.emit(Event::Message {
                stamp,
                data,
                durable: true,
            }),
            Body::Signal { data } => self.emit(Event::Message {
                stamp,
                data,
                durable: false,
            }),
            Body::Update { update, .. } => self.apply(now, &update, &stamp),
            Body::SyncState { update, to, .. } => {
                if to == 0 || to == self.node {
                    self.apply(now, &update, &stamp);
                }
            }
            Body::SyncRequest {
                state_vector, to, ..
            } => {
                // The relay takes an answer only when the room's document holds all of it. An
                // answer holds this replica's updates not yet stored, and what it holds back
                // (Yjs and yrs put both in a diff): then the asker waits for none (the log
                // brings it everything the room holds). After the relay refused one, this
                // replica holds what the room does not (an edit the relay refused, say): no
                // more answers on this connection.
                let unstored = self.in_flight.iter().any(|s| s.kind == Kind::Update)
                    || self
                        .waiting
                        .iter()
                        .any(|w| matches!(w.body, Body::Update { .. }))
                    || self.replica.has_pending()
                    || self.answer_refused;
                let full = state_vector.is_empty();
                if (to == 0 || to == self.node)
                    && !full
                    && !crate::doc::is_state_vector(&state_vector)
                {
                    // The asker's fault, not this document's: said as such, and not answered.
                    let detail = format!(
                        "node {} asked for the document with a state vector that does not decode",
                        stamp.sender
                    );
                    return self.anomaly(
                        Source::Local,
                        Reason::Malformed,
                        detail,
                        stamp.step,
                        Some(stamp.sender),
                    );
                }
                if open && !self.read_only() && !unstored && (to == 0 || to == self.node) {
                    if let Ok(update) = self.replica.diff(&state_vector) {
                        // An answer the relay could not take is not sent: the requester gets
                        // the same from the room log.
                        if (full || has_insertions(&update)) && update.len() <= self.max_payload() {
                            // One answer per asker waits at a time, the latest: a member that
                            // asks again and again would otherwise hold this replica's own
                            // edits back behind a whole document per request.
                            self.waiting.retain(|w| {
                                !matches!(w.body, Body::SyncState { to, .. } if to == stamp.sender)
                            });
                            self.waiting.push_back(Waiting {
                                body: Body::SyncState {
                                    doc: WHOLE_DOC.into(),
                                    update,
                                    to: stamp.sender,
                                },
                                restored: false,
                            });
                        }
                    }
                }
            }
            Body::Checkpoint {
                state_vector,
                deletes,
                digest,
                ..
            } => {
                if open && self.may_compare(stamp.sender, now) {
                    let version = self.replica.version();
                    // The digest walks every text: only at the same version, once.
                    let same = version.state_vector == state_vector && version.deletes == deletes;
                    let mine = if same {
                        self.digest_at(version)
                    } else {
                        digest
                    };
                    if digest != mine {
                        let detail = format!(
                            "node {} has digest {digest:016x} at the version where this node has {mine:016x}",
                            stamp.sender
                        );
                        self.validator.record(Reason::Desync);
                        self.anomaly(
                            Source::Local,
                            Reason::Desync,
                            detail,
                            stamp.step,
                            Some(stamp.sender),
                        );
                        // Repair from the one peer that disagrees: one request waits for it,
                        // however many checkpoints it sends.
                        let asked = self.waiting.iter().any(|w| {
                            matches!(&w.body, Body::SyncRequest { state_vector, to, .. }
                                if *to == stamp.sender && state_vector.is_empty())
                        });
                        if !asked {
                            self.waiting.push_back(Waiting {
                                body: Body::SyncRequest {
                                    doc: WHOLE_DOC.into(),
                                    state_vector: Vec::new(),
                                    to: stamp.sender,
                                },
                                restored: false,
                            });
                        }
                    }
                }
            }
        }
        if entered_phase && open {
            self.checkpoint();
        }
    }

    fn apply(&mut self, now: u64, update: &[u8], stamp: &Stamp) {
        match self.replica.apply_update(update) {
            Ok(()) => {
                self.store_update(update);
                self.note_held(now);
                self.emit(Event::Remote)
            }
            Err(e) => self.anomaly(
                Source::Local,
                Reason::Malformed,
                e.to_string(),
                stamp.step,
                Some(stamp.sender),
            ),
        }
    }

    /// Queues this replica's checkpoint (replacing one that has not gone out yet).
    fn checkpoint(&mut self) {
        if self.replica.is_empty() || self.read_only() {
            return;
        }
        self.waiting
            .retain(|w| !matches!(w.body, Body::Checkpoint { .. }));
        let version = self.replica.version();
        // The relay refuses a state vector over one frame (`tooLarge`): a document that many
        // tabs wrote to is not checked this way.
        if version.state_vector.len() > self.limits.max_frame {
            return;
        }
        let digest = self.digest_at(version.clone());
        self.waiting.push_back(Waiting {
            body: Body::Checkpoint {
                doc: WHOLE_DOC.into(),
                state_vector: version.state_vector,
                deletes: version.deletes,
                digest,
            },
            restored: false,
        });
    }

    /// Whether a checkpoint of `sender` may be compared with this replica now: at most one in
    /// [`CHECKPOINT_EVERY`] of each sender is.
    fn may_compare(&mut self, sender: NodeId, now: u64) -> bool {
        if let Some(at) = self.compared.get_mut(&sender) {
            if now < at.saturating_add(CHECKPOINT_EVERY) {
                return false;
            }
            *at = now;
            return true;
        }
        if self.compared.len() >= MAX_COMPARED {
            self.compared
                .retain(|_, at| now < at.saturating_add(CHECKPOINT_EVERY));
        }
        self.compared.insert(sender, now);
        true
    }

    /// The replica's digest, at `version` (its version now): taken once per version.
    fn digest_at(&mut self, version: Version) -> u64 {
        match &self.digested {
            Some((at, digest)) if *at == version => *digest,
            _ => {
                let digest = self.replica.digest();
                self.digested = Some((version, digest));
                digest
            }
        }
    }

    /// The pacers' costs of the next frame to go out, if any: frames, and the bytes the relay
    /// meters (every stamped message and presence; 0 for a rename).
    fn next_cost(&self) -> Option<(u64, u64)> {
        if self.rename_due {
            return Some((1, 0));
        }
        if self.presence_due {
            // The frame: its kind, the sender (at most 10 bytes), the state's length and text.
            let len = self
                .presence
                .as_ref()
                .map_or(0, |data| 1 + 10 + 5 + data.as_str().len());
            return Some((1, len as u64));
        }
        let frames = |len: usize| part::count(len, self.limits.max_frame) as u64;
        let mut waiting = self.next_waiting().map(|i| &self.waiting[i]);
        if let Some(sent) = self
            .in_flight
            .get(self.resend)
            .filter(|_| !self.keeps_outbox())
        {
            if self.is_stored(sent) {
                if self.renew_due.is_some() && sent.fresh && sent.kind == Kind::Data {
                    // Never sent: it goes under the new node (see `on_welcome`).
                    return None;
                }
                // A fresh message paid the pacers when it was stamped.
                return Some(match sent.fresh {
                    true => (0, 0),
                    false => (frames(sent.bytes.len()), sent.bytes.len() as u64),
                });
            }
            // Its stamp is being stored: more stored messages may be stamped behind it, to be
            // stored with it, but nothing that would go out before it.
            waiting = waiting.filter(|w| w.body.is_durable());
        }
        if self.config.persist && self.clock.local() >= self.ceiling {
            // Stamping waits for a higher ceiling in storage.
            return None;
        }
        if self.renew_due.is_some() {
            // Data waits for the new node (see `on_welcome`).
            waiting = waiting.filter(|w| !matches!(w.body, Body::Data { .. }));
        }
        waiting.map(|w| {
            // The stamp takes at most 30 bytes.
            let len = 3 + 30 + w.body.encoded_len();
            // The relay meters the bytes of every message.
            (frames(len), len as u64)
        })
    }

    /// Sends what the pacer allows, in order: presence, messages to send again, then new ones.
    fn pump(&mut self, now: u64) {
        self.send_what_may_go(now);
        // With `persist`: stamping that waits for a higher ceiling asks for a write.
        let blocked = self.config.persist
            && self.link == Link::Open
            && !self.closed
            && self.next_waiting().is_some()
            && self.clock.local() >= self.ceiling;
        if blocked && !self.ceiling_blocked {
            self.changed();
        }
        self.ceiling_blocked = blocked;
    }

    fn send_what_may_go(&mut self, now: u64) {
        if self.link != Link::Open || self.closed {
            return;
        }
        if let Some(hold) = self.hold {
            if now < hold.until {
                return;
            }
            self.hold = None;
            self.unechoed += 1;
            self.outputs
                .push_back(Output::Send(Frame::Fence { step: hold.step }.encode()));
        }
        let mut paced_until = None;
        while let Some((frames, bytes)) = self.next_cost() {
            // Both pacers must allow it before either is charged.
            if frames > 0 {
                let bytes_at = match bytes {
                    0 => 0,
                    _ => self.byte_pacer.ready_at(bytes),
                };
                let ready = self.pacer.ready_at(frames).max(bytes_at);
                if ready > now {
                    paced_until = Some(ready);
                    break;
                }
            }
            self.pacer.try_take_n(frames, now);
            if bytes > 0 {
                self.byte_pacer.try_take_n(bytes, now);
            }
            if self.rename_due {
                self.rename_due = false;
                self.announced = self.config.name.clone();
                let frame = Frame::Rename {
                    name: self.announced.clone(),
                };
                self.outputs.push_back(Output::Send(frame.encode()));
                continue;
            }
            if self.presence_due {
                self.presence_due = false;
                if let Some(data) = self.presence.clone() {
                    let frame = Frame::Presence {
                        sender: self.node,
                        data,
                    };
                    let bytes = frame.encode();
                    let (len, max) = (bytes.len(), self.limits.max_frame);
                    if len > max {
                        // The relay that answered has a lower limit than the one the state
                        // was checked against: it is dropped, and the application told.
                        self.presence = None;
                        self.emit(Event::Refused {
                            step: 0,
                            kind: Kind::Presence,
                            doc: None,
                            reason: Reason::TooLarge,
                            detail: format!(
                                "the presence state is {len} bytes, over the relay's limit of \
                                 {max} for one frame"
                            ),
                        });
                    } else {
                        self.outputs.push_back(Output::Send(bytes));
                    }
                }
                continue;
            }
            if let Some(sent) = self
                .in_flight
                .get(self.resend)
                .filter(|_| !self.keeps_outbox())
            {
                if self.is_stored(sent) {
                    let parts = part::fragment(&sent.bytes, self.limits.max_frame);
                    self.in_flight[self.resend].fresh = false;
                    self.resend += 1;
                    self.outputs.extend(parts.into_iter().map(Output::Send));
                    continue;
                }
            }
            let Some(Waiting { body, restored }) =
                self.next_waiting().and_then(|i| self.waiting.remove(i))
            else {
                break;
            };
            let (tick, advance) = match self.clock.next() {
                Ok(next) => next,
                Err(_) => {
                    self.end("the step clock is exhausted".into());
                    return;
                }
            };
            let stamp = Stamp {
                sender: self.node,
                step: tick.step,
                pattern: tick.pattern,
            };
            let kind = body.kind();
            let doc = body.doc().map(str::to_owned);
            let durable = body.is_durable();
            let bytes = Frame::stamped(stamp, body).encode();
            if durable && self.config.persist {
                // It goes out once its stamp is stored (`handle_saved`).
                self.in_flight.push_back(Sent {
                    stamp,
                    kind,
                    doc,
                    bytes,
                    fresh: true,
                    restored,
                });
                self.changed();
            } else {
                let parts = part::fragment(&bytes, self.limits.max_frame);
                self.outputs.extend(parts.into_iter().map(Output::Send));
                if durable {
                    self.in_flight.push_back(Sent {
                        stamp,
                        kind,
                        doc,
                        bytes,
                        fresh: false,
                        restored,
                    });
                    self.resend = self.in_flight.len();
                }
            }
            self.step_event(advance);
            if advance.entered_phase.is_some() {
                self.checkpoint();
            }
        }
        self.tell_pace(now, paced_until);
    }

    /// Tells the application of a long wait for the pacer, and of its end ([`Event::Paced`]):
    /// `paced_until` is when the next message may go, if one waits for the pacer. A wait is long
    /// when what waits will have taken [`PACED_NOTICE`] or more since the first of it waited,
    /// whether one large message holds the rest back or many small ones go out slowly (after
    /// `rateLimited` refusals slowed the pace). A wait that grows to twice what was left of the
    /// one told is told again.
    fn tell_pace(&mut self, now: u64, paced_until: Option<u64>) {
        let Some(ready) = paced_until else {
            self.paced_since = None;
            return self.end_pace();
        };
        let since = *self.paced_since.get_or_insert(now);
        let (frames, bytes) = self.backlog();
        let done = ready
            .max(self.pacer.drained_at(frames))
            .max(self.byte_pacer.drained_at(bytes));
        // A wait told is told again once it has at least doubled (and grown by a notice).
        let again = self.paced_told.map(|told| {
            let left = told.saturating_sub(now);
            now + (2 * left).max(left + PACED_NOTICE)
        });
        if done - since < PACED_NOTICE || again.is_some_and(|at| done < at) {
            return;
        }
        self.paced_told = Some(done);
        self.emit(Event::Paced {
            wait: done - now,
            messages: self.pending(),
        });
    }

    /// The end of a wait told ([`Event::Paced`]): nothing waits for the pacer any more (it all
    /// went out, or the connection dropped and messages wait for the next one).
    fn end_pace(&mut self) {
        if self.paced_told.take().is_some() {
            self.emit(Event::Paced {
                wait: 0,
                messages: self.pending(),
            });
        }
    }

    /// Frames and bytes of what waits to go out: messages to send again, messages waiting, and
    /// the presence and the name due.
    fn backlog(&self) -> (u64, u64) {
        let frames = |len: usize| part::count(len, self.limits.max_frame) as u64;
        // Not what the outbox keeps ([`Session::keeps_outbox`]): it does not go.
        let keep = self.keeps_outbox();
        let again = self
            .in_flight
            .iter()
            .skip(self.resend)
            .filter(|sent| !sent.fresh && !keep)
            .map(|sent| sent.bytes.len());
        // The stamp takes at most 30 bytes.
        let waiting = self
            .waiting
            .iter()
            .filter(|w| !(keep && w.body.is_durable()))
            .map(|w| 3 + 30 + w.body.encoded_len());
        let presence = self
            .presence
            .as_ref()
            .filter(|_| self.presence_due)
            .map(|data| 1 + 10 + 5 + data.as_str().len());
        let rename = self.rename_due.then_some(1);
        again
            .chain(waiting)
            .chain(presence)
            .chain(rename)
            .fold((0, 0), |(f, b), len| (f + frames(len), b + len as u64))
    }
}

/// The byte pacer: the relay's bucket at nine tenths of its rate. With the same capacity and a
/// slower refill, this bucket never holds more than the relay's, so what it lets through, the
/// relay takes.
fn byte_pacer(limits: &RelayLimits, share: f64, now: u64) -> TokenBucket {
    let full = limits.bandwidth as f64 * 0.9;
    TokenBucket::paced(
        (full * share).max(1.0),
        full,
        limits.bandwidth_burst as f64,
        now,
    )
}

/// The pacers send at `share` of nine tenths of the relay's rate; what a large message puts
/// them in debt for, they repay at nine tenths of the full rate, as the relay's bucket does.
fn pacer(limits: &RelayLimits, share: f64, now: u64) -> TokenBucket {
    // A little under what the relay allows, with half its burst: network jitter may bunch
    // frames together on the way, and the relay's bucket absorbs that.
    let full = limits.rate as f64 * 0.9;
    let burst = (limits.burst as f64 / 2.0 * share).max(1.0);
    TokenBucket::paced((full * share).max(1.0), full, burst, now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doc::SharedDoc;

    /// A node 600 steps ahead of a room at step 10, with a data message in flight, welcomed
    /// back with no floor: open, its new identity put off until the data is stored.
    fn far_ahead_with_data_in_flight() -> Harness {
        let mut h = Harness::new();
        h.join(2, 1, &[]);
        let _ = h.session.clock.pass(600);
        h.session
            .broadcast(h.now, Json::parse("1").unwrap())
            .unwrap();
        h.pump();
        h.reconnect();
        assert_eq!(last_join(&h), Some(Some([1; 16])));
        h.sent.clear();
        h.welcome(2, 1, (10, 1), None);
        assert_eq!(h.session.status(), Status::Open);
        h
    }

    /// The resume token of the last join sent, if one was.
    /// After a new identity was asked for: the session connects again once `RENEW_WAIT` has
    /// passed, and joins without its resume token.
    fn joins_again_without_its_token(h: &mut Harness) {
        h.now += RENEW_WAIT;
        h.session.handle_timeout(h.now);
        assert!(h.pump(), "the session asks to connect");
        h.session.handle_connected(h.now);
        h.pump();
        assert_eq!(last_join(h), Some(None), "without its token");
    }

    fn last_join<R>(h: &Harness<R>) -> Option<Option<ResumeToken>> {
        h.sent.iter().rev().find_map(|f| match f {
            Frame::Join { resume, .. } => Some(*resume),
            _ => None,
        })
    }

    /// A session and the relay's side of its conversation, by hand.
    struct Harness<R = SharedDoc> {
        session: Session<R>,
        now: u64,
        sent: Vec<Frame>,
        relay: RelayLimits,
        /// How many times the session asked to be stored.
        saves: usize,
    }

    impl Harness {
        fn new() -> Self {
            let mut config = SessionConfig::new("r", "a");
            config.connect_timeout = 5_000;
            Self::with(config)
        }

        fn with(config: SessionConfig) -> Self {
            Harness::of(config, SharedDoc::with_client_id(1))
        }
    }

    impl Harness {
        /// Joined as node 2 (token 1), with a remote edit received (member 9's "abc"): a
        /// document a relay that loses the room's history is owed.
        fn with_remote_edit() -> Self {
            let mut h = Harness::new();
            h.join(2, 1, &[]);
            let update = SharedDoc::with_client_id(9).insert("t", 0, "abc").unwrap();
            h.peer_sends(
                9,
                1,
                Body::Update {
                    doc: "content".into(),
                    update,
                },
            );
            h
        }

        /// Joined as node 2 (token 1) to a relay of 1 KiB frames and 50 frames a second
        /// (bursts of 10).
        fn slow() -> Self {
            let mut h = Harness::new();
            h.relay = RelayLimits {
                max_frame: 1_024,
                rate: 50,
                burst: 10,
                ..RelayLimits::default()
            };
            h.join(2, 1, &[]);
            h
        }

        /// Broadcasts 100 KB of data; answers how many parts went out at once.
        fn send_large(&mut self) -> usize {
            self.sent.clear();
            let data = Json::from_value(&serde_json::json!("x".repeat(100_000))).unwrap();
            self.session.broadcast(self.now, data).unwrap();
            self.pump();
            self.sent.iter().filter(|f| f.kind() == Kind::Part).count()
        }
    }

    impl<R: Replica> Harness<R> {
        fn of(config: SessionConfig, replica: R) -> Self {
            Self {
                session: Session::new(config, replica, 0),
                now: 0,
                sent: Vec::new(),
                relay: RelayLimits::default(),
                saves: 0,
            }
        }

        /// Carries out the outputs: returns whether a connect was asked for.
        fn pump(&mut self) -> bool {
            let mut connect = false;
            while let Some(output) = self.session.poll_output() {
                match output {
                    Output::Connect => connect = true,
                    Output::Send(bytes) => self.sent.push(Frame::decode(&bytes).unwrap()),
                    Output::Disconnect { .. } => {}
                    Output::Save => self.saves += 1,
                }
            }
            connect
        }

        /// Stores the session as a driver would, and carries out what follows.
        /// The details of the anomalies among the events waiting (the others go).
        fn anomalies(&mut self) -> Vec<String> {
            std::iter::from_fn(|| self.session.poll_event())
                .filter_map(|e| match e {
                    Event::Anomaly(a) => Some(a.detail),
                    _ => None,
                })
                .collect()
        }

        fn store(&mut self) -> Saved {
            let saved = self.session.saved();
            self.session.handle_saved(self.now, saved.stored());
            self.pump();
            saved
        }

        fn frame(&mut self, frame: Frame) {
            self.session.handle_frame(self.now, &frame.encode());
            self.pump();
        }

        /// `body` from peer `sender` at `step`, stamped with the default pattern.
        fn peer_sends(&mut self, sender: NodeId, step: Step, body: Body) {
            let pattern = PatternConfig::default().value(step);
            self.frame(Frame::stamped(
                Stamp {
                    sender,
                    step,
                    pattern,
                },
                body,
            ));
        }

        /// A sync request from peer 7 at `step` for everything, to `to`; what this session
        /// sends within the next second.
        fn sync_request(&mut self, step: Step, to: NodeId) -> Vec<Kind> {
            self.sent.clear();
            self.frame(Frame::stamped(
                Stamp {
                    sender: 7,
                    step,
                    pattern: PatternConfig::default().value(step),
                },
                Body::SyncRequest {
                    doc: WHOLE_DOC.into(),
                    state_vector: Vec::new(),
                    to,
                },
            ));
            self.now += 1_000;
            self.session.handle_timeout(self.now);
            self.pump();
            self.sent.iter().map(Frame::kind).collect()
        }

        /// Connects and joins as `node` with `peers`.
        fn join(&mut self, node: NodeId, token: u8, peers: &[NodeId]) {
            assert!(self.pump(), "the session asks to connect");
            self.session.handle_connected(self.now);
            self.pump();
            self.frame(Frame::Welcome {
                node,
                resume: [token; 16],
                config: RoomConfig::default(),
                limits: self.relay,
                high: 0,
                log: 1,
                peers: peers
                    .iter()
                    .map(|&node| Peer {
                        node,
                        name: "p".into(),
                    })
                    .collect(),
                floor: None,
            });
            self.frame(Frame::CaughtUp {
                high: 0,
                position: 0,
            });
        }

        /// The connection drops; a minute later the session connects again, up to its join.
        fn reconnect(&mut self) {
            self.session.handle_closed(self.now, 1006, "gone");
            self.pump();
            self.now += 60_000;
            self.session.handle_timeout(self.now);
            assert!(self.pump(), "the session asks to connect");
            self.session.handle_connected(self.now);
            self.pump();
        }

        /// Connects and joins as `node` (its token `[node; 16]`) of a room with `config`, at
        /// `high` in log `log`, with `floor`, and the catch-up's end.
        fn joined(
            &mut self,
            node: NodeId,
            config: RoomConfig,
            (high, log): (Step, u64),
            floor: Option<Step>,
        ) {
            assert!(self.pump(), "the session asks to connect");
            self.session.handle_connected(self.now);
            self.pump();
            self.welcome_in(config, node, node as u8, (high, log), floor);
        }

        /// A welcome as `node` (its token `[token; 16]`) at `high` in log `log`, with `floor`,
        /// and the catch-up's end.
        fn welcome(
            &mut self,
            node: NodeId,
            token: u8,
            (high, log): (Step, u64),
            floor: Option<Step>,
        ) {
            self.welcome_in(RoomConfig::default(), node, token, (high, log), floor);
        }

        /// The same, in a room with `config`.
        fn welcome_in(
            &mut self,
            config: RoomConfig,
            node: NodeId,
            token: u8,
            (high, log): (Step, u64),
            floor: Option<Step>,
        ) {
            self.frame(Frame::Welcome {
                node,
                resume: [token; 16],
                config,
                limits: self.relay,
                high,
                log,
                peers: Vec::new(),
                floor,
            });
            self.frame(Frame::CaughtUp { high, position: 0 });
        }

        /// The updates among the stamped messages sent.
        fn updates_sent(&self) -> Vec<Vec<u8>> {
            self.stamped()
                .iter()
                .filter_map(|s| match &s.body {
                    Body::Update { update, .. } => Some(update.clone()),
                    _ => None,
                })
                .collect()
        }

        fn stamped(&self) -> Vec<&Stamped> {
            self.sent
                .iter()
                .filter_map(|f| match f {
                    Frame::Stamped(s) => Some(s),
                    _ => None,
                })
                .collect()
        }
    }

    /// A large message goes out in many parts, and the connection drops before its answer. The
    /// relay keeps the node's buckets across a reconnect, so the pacers do too: the message goes
    /// out again once what it cost is paid. With fresh pacers it went out again at once, into
    /// the relay's debt, and each `rateLimited` that followed halved the pace, until the debt
    /// the next resend left at 1/64 of the rate held every later edit back for minutes (a long
    /// simulation run found a tab with ten edits waiting that way).
    #[test]
    fn the_pacers_keep_what_a_large_message_cost_across_a_reconnect() {
        let mut h = Harness::slow();
        let parts = h.send_large();
        assert!(parts > 90, "{parts} parts");
        h.session.handle_closed(h.now, 1006, "gone");
        h.pump();
        h.sent.clear();
        h.now += 1_000;
        h.session.handle_timeout(h.now);
        assert!(h.pump(), "the session asks to connect");
        h.session.handle_connected(h.now);
        h.pump();
        h.welcome(2, 1, (1, 1), None);
        let at_once = h.sent.iter().filter(|f| f.kind() == Kind::Part).count();
        assert_eq!(at_once, 0, "sent again into the relay's debt");
        // At 45 frames a second (nine tenths of the rate), the parts are paid for in about 2 s:
        // the session asks to be woken then.
        let at = h.session.poll_timeout().expect("a timer for the pacer");
        assert!(at > h.now && at <= h.now + 2_200, "{} ms", at - h.now);
        h.now = at;
        h.session.handle_timeout(h.now);
        h.pump();
        let later = h.sent.iter().filter(|f| f.kind() == Kind::Part).count();
        assert_eq!(later, parts);
    }

    /// Once `rateLimited` has slowed the pace, a large message leaves the pacers in debt. Its
    /// acknowledgement raises the pace again, and the pacers keep what they owe: rebuilt full,
    /// as they were, they let the next message out at once, into the relay's debt, where it
    /// was refused again and the pace fell further. What they owe they repay as fast as the
    /// relay's bucket does, whatever the pace.
    #[test]
    fn an_acknowledgement_keeps_what_the_pacers_owe() {
        let mut h = Harness::slow();
        h.session
            .broadcast(h.now, Json::parse("1").unwrap())
            .unwrap();
        h.pump();
        let first = h.stamped()[0].stamp.step;
        h.frame(Frame::Reject {
            step: first,
            reason: Reason::RateLimited,
            detail: "over the rate".into(),
        });
        h.now += 1_000;
        h.session.handle_timeout(h.now);
        h.pump();
        h.frame(Frame::Ack {
            step: first,
            position: 1,
        });
        assert!(h.session.pace < 1.0);
        let parts = h.send_large();
        assert!(parts > 90, "{parts} parts");
        let big = h.session.step();
        h.frame(Frame::Ack {
            step: big,
            position: 2,
        });
        h.sent.clear();
        h.session
            .broadcast(h.now, Json::parse("3").unwrap())
            .unwrap();
        h.pump();
        assert!(h.sent.is_empty(), "sent at once: {:?}", h.sent);
        // About 97 frames owed, repaid at 45 a second whatever the pace.
        let at = h.session.poll_timeout().expect("a timer for the pacer");
        assert!(
            at > h.now + 1_500 && at <= h.now + 2_500,
            "{} ms",
            at - h.now
        );
        h.now = at;
        h.session.handle_timeout(h.now);
        h.pump();
        assert_eq!(h.stamped().len(), 1);
    }

    /// Messages held back by the pacer for a second or more are told to the application, and
    /// so is the end of the wait: a large paste, or a burst typed offline, must not look like
    /// edits that went nowhere. A short wait is not told.
    #[test]
    fn a_long_wait_for_the_pacer_is_told_and_so_is_its_end() {
        let mut h = Harness::slow();
        let paced = |h: &mut Harness| -> Vec<(u64, usize)> {
            std::iter::from_fn(|| h.session.poll_event())
                .filter_map(|e| match e {
                    Event::Paced { wait, messages } => Some((wait, messages)),
                    _ => None,
                })
                .collect()
        };
        // Six small messages for five the pacer lets out at once: the last waits about 22 ms.
        for i in 0..6 {
            h.session
                .broadcast(h.now, Json::parse(i.to_string()).unwrap())
                .unwrap();
        }
        h.pump();
        assert_eq!(paced(&mut h), []);
        h.now += 10_000;
        h.session.handle_timeout(h.now);
        h.pump();
        assert_eq!(paced(&mut h), []);
        // 100 KB in parts go out at once into the pacers' debt; what comes next waits.
        assert!(h.send_large() > 90);
        h.session
            .broadcast(h.now, Json::parse("\"after\"").unwrap())
            .unwrap();
        h.pump();
        let told = paced(&mut h);
        assert_eq!(told.len(), 1, "{told:?}");
        let (wait, messages) = told[0];
        assert!((1_000..=2_500).contains(&wait), "{wait} ms");
        assert_eq!(messages, 8);
        let at = h.session.poll_timeout().expect("a timer for the pacer");
        assert_eq!(at, h.now + wait);
        h.now = at;
        h.session.handle_timeout(h.now);
        h.pump();
        assert_eq!(
            h.stamped().last().unwrap().body,
            Body::Data {
                data: Json::parse("\"after\"").unwrap()
            }
        );
        assert_eq!(paced(&mut h), [(0, 8)]);
    }

    /// After `rateLimited` refusals slowed the pace, many small messages go out one at a time
    /// with no single wait of a second: what they wait in all is told (again each time it
    /// doubles as they are queued one by one), and its end when the last is out. A connection
    /// that drops ends a wait told.
    #[test]
    fn many_short_waits_for_the_pacer_are_told_as_one_and_a_drop_ends_it() {
        let mut h = Harness::slow();
        // (when, wait, messages) of each `Paced`.
        let paced = |h: &mut Harness| -> Vec<(u64, u64, usize)> {
            let now = h.now;
            std::iter::from_fn(|| h.session.poll_event())
                .filter_map(|e| match e {
                    Event::Paced { wait, messages } => Some((now, wait, messages)),
                    _ => None,
                })
                .collect()
        };
        // A pace of 1/32: 1.4 frames a second.
        h.session.pace = 1.0 / 32.0;
        h.session.repace(h.now);
        h.session.pacer.try_take_n(1, h.now);
        let mut told = Vec::new();
        for i in 0..20 {
            h.session
                .broadcast(h.now, Json::parse(i.to_string()).unwrap())
                .unwrap();
            told.extend(paced(&mut h));
        }
        h.pump();
        let mut longest = 0;
        while let Some(at) = h.session.poll_timeout().filter(|_| h.stamped().len() < 20) {
            longest = longest.max(at - h.now);
            h.now = at;
            h.session.handle_timeout(h.now);
            h.pump();
            told.extend(paced(&mut h));
        }
        assert!(longest < PACED_NOTICE, "one wait took {longest} ms");
        assert_eq!(h.stamped().len(), 20);
        // Told as the second message queued, again as the wait doubled, then the end.
        let (last, ends) = told.split_last().unwrap();
        assert_eq!(*last, (h.now, 0, 20), "{told:?}");
        assert!((2..=5).contains(&ends.len()), "{told:?}");
        assert_eq!(ends[0].2, 2, "{told:?}");
        let (when, wait, _) = ends[ends.len() - 1];
        assert!(
            when + wait + 1_000 >= h.now,
            "told {wait} ms at {when}; over at {}",
            h.now
        );
        // Told again, then the connection drops: the wait for the pacer is over.
        for i in 0..5 {
            h.session
                .broadcast(h.now, Json::parse(i.to_string()).unwrap())
                .unwrap();
        }
        assert!(!paced(&mut h).is_empty());
        h.session.handle_closed(h.now, 1006, "gone");
        assert_eq!(paced(&mut h), [(h.now, 0, 25)]);
    }

    /// A node whose clock runs more than half the room's `max_future` ahead of the room's step
    /// (a tab reopened from storage again and again starts each time at the ceiling it stored),
    /// welcomed back with no floor to bring it down, joins again as a new node, whose steps
    /// start at the room's; with data in flight, which would arrive twice under a new identity,
    /// it does once the data is stored.
    #[test]
    fn a_node_far_ahead_of_the_room_with_no_floor_joins_again_as_a_new_node() {
        // Data in flight: the node is kept, and the data goes again with its stamp.
        let mut h = far_ahead_with_data_in_flight();
        assert_eq!(h.stamped().len(), 1);
        assert_eq!(h.stamped()[0].stamp.sender, 2);
        assert_eq!(h.stamped()[0].stamp.step, 601);
        std::iter::from_fn(|| h.session.poll_event()).for_each(drop);
        // Stored: now it joins again, without its token, and says why.
        h.frame(Frame::Ack {
            step: 601,
            position: 1,
        });
        assert_eq!(h.session.status(), Status::Reconnecting);
        let reason = std::iter::from_fn(|| h.session.poll_event()).find_map(|e| match e {
            Event::Status { reason, .. } => reason,
            _ => None,
        });
        assert!(
            reason
                .as_deref()
                .is_some_and(|r| r.contains("joining again as a new node")),
            "{reason:?}"
        );
        h.pump();
        let at = h.session.poll_timeout().expect("a timer to connect again");
        assert_eq!(at, h.now + RENEW_WAIT);
        h.now = at;
        h.session.handle_timeout(h.now);
        assert!(h.pump(), "the session asks to connect");
        h.session.handle_connected(h.now);
        h.pump();
        assert_eq!(last_join(&h), Some(None));
        h.welcome(3, 2, (10, 1), Some(0));
        assert_eq!(h.session.step(), 10);
        h.session
            .broadcast(h.now, Json::parse("2").unwrap())
            .unwrap();
        h.pump();
        let sent = h.stamped().last().unwrap().stamp;
        assert_eq!((sent.sender, sent.step), (3, 11));
        let anomalies: Vec<Event> = std::iter::from_fn(|| h.session.poll_event())
            .filter(|e| matches!(e, Event::Anomaly(_)))
            .collect();
        assert_eq!(anomalies, []);
        // The new node is not far ahead: welcomed back with no floor, it stays.
        h.reconnect();
        h.welcome(3, 2, (11, 1), None);
        assert_eq!(h.session.status(), Status::Open);
    }

    /// A node whose steps the relay took far ahead of the room's step (steps of messages to one
    /// member, which the room's step does not count) is welcomed back with a floor that high:
    /// the floor kept its clock there, and every reconnect left it as far ahead, until the
    /// room refused all it stamped. Such a floor is no help: the node joins again as a new one.
    #[test]
    fn a_node_whose_floor_is_far_ahead_of_the_room_joins_again_as_a_new_node() {
        let mut h = Harness::new();
        h.join(2, 1, &[]);
        h.reconnect();
        h.welcome(2, 1, (10, 1), Some(700));
        assert_eq!(h.session.status(), Status::Reconnecting);
        joins_again_without_its_token(&mut h);
        h.welcome(3, 2, (10, 1), Some(10));
        assert_eq!((h.session.node(), h.session.step()), (3, 10));
        // A floor within half of `max_future` brings the clock there, as before.
        h.reconnect();
        h.welcome(3, 2, (10, 1), Some(400));
        assert_eq!(h.session.status(), Status::Open);
        assert_eq!(h.session.step(), 400);
    }

    /// A node that sends only signals (a game's inputs) and whose clock ran ahead of the room's
    /// by its own sync messages: each signal was refused as `futureStep`, and, nothing stored
    /// being in flight, the node went on stamping signals the relay refused, until it happened
    /// to reconnect. The first such refusal takes it to a new node; one of a node that is new
    /// already and had nothing stored does not (joining again would not help).
    #[test]
    fn a_signal_refused_as_ahead_of_the_room_takes_the_node_to_a_new_identity() {
        let mut h = Harness::new();
        h.join(2, 1, &[]);
        h.session
            .broadcast_signal(h.now, Json::parse("1").unwrap())
            .unwrap();
        h.pump();
        let step = h.stamped()[0].stamp.step;
        h.frame(Frame::Reject {
            step,
            reason: Reason::FutureStep,
            detail: "ahead".into(),
        });
        assert_eq!(h.session.status(), Status::Reconnecting);
        joins_again_without_its_token(&mut h);
        h.welcome(3, 2, (10, 1), Some(10));
        assert_eq!(h.session.node(), 3);
        h.sent.clear();
        h.session
            .broadcast_signal(h.now, Json::parse("2").unwrap())
            .unwrap();
        h.pump();
        let step = h.stamped()[0].stamp.step;
        h.frame(Frame::Reject {
            step,
            reason: Reason::FutureStep,
            detail: "ahead".into(),
        });
        assert_eq!(h.session.status(), Status::Open, "not again for a new node");
    }

    /// In a real-time room, a clock ahead of the room's by more than the stale window takes a
    /// new identity too: left there, it would drop what the others stamp as too old.
    #[test]
    fn a_node_ahead_by_more_than_the_stale_window_joins_again_as_a_new_node() {
        let mut h = Harness::new();
        let config = RoomConfig {
            stale_window: Some(40),
            ..RoomConfig::default()
        };
        let welcome = |h: &mut Harness, node: NodeId, high: Step, floor: Option<Step>| {
            h.joined(node, config, (high, 1), floor);
        };
        welcome(&mut h, 2, 0, None);
        let _ = h.session.clock.pass(50);
        h.session.handle_closed(h.now, 1006, "gone");
        h.now += 60_000;
        h.session.handle_timeout(h.now);
        welcome(&mut h, 2, 5, None);
        assert_eq!(
            h.session.status(),
            Status::Reconnecting,
            "45 ahead, over 40"
        );
        h.now += RENEW_WAIT;
        h.session.handle_timeout(h.now);
        welcome(&mut h, 3, 5, Some(0));
        assert_eq!((h.session.node(), h.session.step()), (3, 5));
    }

    /// A new identity put off while data was in flight is not asked for once the relay gave
    /// a new node anyway (it forgot the old one), nor does more data go out under the old node
    /// meanwhile.
    #[test]
    fn a_new_identity_put_off_for_data_in_flight_is_not_asked_for_after_another_welcome() {
        let mut h = far_ahead_with_data_in_flight();
        h.session
            .broadcast(h.now, Json::parse("2").unwrap())
            .unwrap();
        h.pump();
        assert_eq!(h.stamped().len(), 1, "data waits for the new node");
        // The connection drops before the acknowledgement; the relay forgot the node.
        h.reconnect();
        h.sent.clear();
        h.welcome(3, 3, (10, 1), Some(0));
        let sent: Vec<(NodeId, Step)> = h
            .stamped()
            .iter()
            .map(|s| (s.stamp.sender, s.stamp.step))
            .collect();
        assert_eq!(sent, [(3, 11), (3, 12)]);
        h.frame(Frame::Ack {
            step: 11,
            position: 1,
        });
        assert_eq!(h.session.status(), Status::Open);
        assert_eq!(h.session.node(), 3);
    }

    /// A new identity that does not bring the clock back (the relay gives the new node no
    /// floor) is reported, and not asked for again and again.
    #[test]
    fn a_new_identity_that_does_not_help_is_reported_and_not_asked_for_again() {
        let mut h = Harness::new();
        h.join(2, 1, &[]);
        let _ = h.session.clock.pass(600);
        h.reconnect();
        h.welcome(2, 1, (10, 1), None);
        assert_eq!(h.session.status(), Status::Reconnecting);
        h.now += 1_000;
        h.session.handle_timeout(h.now);
        assert!(h.pump(), "the session asks to connect");
        h.session.handle_connected(h.now);
        h.pump();
        assert_eq!(last_join(&h), Some(None));
        std::iter::from_fn(|| h.session.poll_event()).for_each(drop);
        h.welcome(3, 2, (10, 1), None);
        assert_eq!(h.session.status(), Status::Open);
        let reported: Vec<Anomaly> = std::iter::from_fn(|| h.session.poll_event())
            .filter_map(|e| match e {
                Event::Anomaly(a) => Some(a),
                _ => None,
            })
            .collect();
        assert_eq!(reported.len(), 1, "{reported:?}");
        assert_eq!(reported[0].reason, Reason::FutureStep);
        h.reconnect();
        h.welcome(3, 2, (10, 1), None);
        assert_eq!(h.session.status(), Status::Open);
    }

    /// A new node's steps begin at the room's: the ceiling stored for the old node's steps is
    /// not kept for it, nor taken back from a write of the old node that ends after the change
    /// (with the old ceiling, each reopening would start the new node where the old one was).
    #[test]
    fn a_new_node_stores_a_ceiling_of_its_own_steps() {
        let mut config = SessionConfig::new("r", "a");
        config.persist = true;
        let mut h = Harness::with(config);
        h.join(2, 2, &[]);
        let _ = h.session.clock.pass(1_200);
        h.store();
        let under_way = h.session.saved();
        assert!(under_way.step > 1_200);
        // The relay forgot the node: a new one, at the room's step.
        h.reconnect();
        h.welcome(3, 3, (10, 1), Some(0));
        assert_eq!(h.session.node(), 3);
        h.session.handle_saved(h.now, under_way.stored());
        let saved = h.store();
        assert_eq!(saved.node, 3);
        assert!(
            saved.step <= h.session.step() + STEP_RESERVE,
            "ceiling {} with the clock at {}",
            saved.step,
            h.session.step()
        );
    }

    /// Sessions refused `rateLimited` at the same moment (the tabs behind one address, over
    /// its budget together) wait between half and all of the backoff, drawn from their seeds:
    /// they do not all send again at the same moment, to be refused together again.
    #[test]
    fn sessions_refused_together_send_again_at_different_moments() {
        let waits: Vec<u64> = (1..=8u64)
            .map(|seed| {
                let mut config = SessionConfig::new("r", "a");
                config.seed = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
                let mut h = Harness::with(config);
                h.join(2, 1, &[]);
                h.session
                    .broadcast(h.now, Json::parse("1").unwrap())
                    .unwrap();
                h.pump();
                let step = h.stamped()[0].stamp.step;
                h.frame(Frame::Reject {
                    step,
                    reason: Reason::RateLimited,
                    detail: "over the address's budget".into(),
                });
                h.session.hold.as_ref().unwrap().until - h.now
            })
            .collect();
        // The first refusal's backoff is 500 ms.
        assert!(waits.iter().all(|w| (250..=500).contains(w)), "{waits:?}");
        let mut distinct = waits.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert!(distinct.len() >= 6, "{waits:?}");
    }

    /// A message sent again and answered `replay` was stored: like an acknowledgement, the
    /// answer brings the pace back up after `rateLimited` refusals.
    #[test]
    fn a_replay_answer_brings_the_pace_back_up() {
        let mut h = Harness::new();
        h.join(2, 1, &[]);
        let data = Json::parse("1").unwrap();
        h.session.broadcast(h.now, data).unwrap();
        h.pump();
        let step = h.stamped()[0].stamp.step;
        h.frame(Frame::Reject {
            step,
            reason: Reason::RateLimited,
            detail: "over the rate".into(),
        });
        assert_eq!(h.session.pace, 0.5);
        h.frame(Frame::Reject {
            step,
            reason: Reason::Replay,
            detail: "stored already".into(),
        });
        assert!(h.session.pace > 0.5);
        assert_eq!(h.session.pending(), 0);
    }

    /// With storage, a stored message goes out only once its stamp is stored; a session
    /// restored from storage sends it again under the same stamp (the relay answers `replay`
    /// if it has it), and a relay that forgot the node gets it under the new identity.
    #[test]
    fn a_message_goes_out_after_its_stamp_is_stored_and_again_after_a_restore() {
        let mut config = SessionConfig::new("r", "a");
        config.persist = true;
        let mut h = Harness::with(config.clone());
        h.join(2, 1, &[]);
        let data = Json::from_value(&serde_json::json!({ "n": 1 })).unwrap();
        h.session.broadcast(h.now, data.clone()).unwrap();
        h.pump();
        assert!(h.saves > 0, "the session asks to be stored");
        // The first write stores a ceiling for the node's steps; then the message is stamped,
        // and the second write stores it.
        let ceiling = h.store();
        assert!(ceiling.sent.is_empty() && ceiling.step > h.session.step());
        assert!(
            h.stamped().is_empty(),
            "nothing goes out before it is stored"
        );
        let saved = h.session.saved();
        assert_eq!(saved.sent.len(), 1);
        assert_eq!((saved.node, saved.token), (2, Some([1; 16])));
        h.session.handle_saved(h.now, saved.stored());
        h.pump();
        let first = h.stamped()[0].clone();
        assert_eq!(first.stamp.step, saved.upto());
        assert_eq!(first.body, Body::Data { data: data.clone() });
        // The tab closes before the acknowledgement; it reopens from storage.
        let bytes = saved.encode();
        let mut config = config.clone();
        config.restore = Some(Saved::decode(&bytes).unwrap());
        let mut reopened = Harness::with(config.clone());
        assert_eq!(reopened.session.pending(), 1);
        reopened.join(2, 1, &[]);
        assert_eq!(reopened.stamped(), [&first], "sent again as it was");
        reopened.frame(Frame::Reject {
            step: first.stamp.step,
            reason: Reason::Replay,
            detail: "stored already".into(),
        });
        assert_eq!(reopened.session.pending(), 0);
        // A relay that forgot the node: the message goes out under the new identity.
        let mut forgotten = Harness::with(config);
        forgotten.join(5, 9, &[]);
        assert!(forgotten.stamped().is_empty(), "stamped anew, stored first");
        forgotten.store();
        forgotten.store();
        let again = forgotten.stamped()[0].clone();
        assert!(
            again.stamp.step > saved.step,
            "above every step the closed tab may have used"
        );
        assert_eq!(again.stamp.sender, 5);
        assert_eq!(again.body, Body::Data { data });
    }

    /// A session restored from storage starts its clock at the ceiling it stored, above every
    /// step it may have stamped; the welcome's floor (the last step the relay took from it)
    /// brings the clock back, and it stamps just above that and the room's step.
    #[test]
    fn the_welcome_floor_brings_a_restored_clock_back_to_the_room() {
        let mut config = SessionConfig::new("r", "a");
        config.persist = true;
        let mut h = Harness::with(config.clone());
        h.join(2, 1, &[]);
        h.store();
        let saved = h.session.saved();
        assert!(saved.step >= STEP_RESERVE);
        config.restore = Some(saved.clone());
        let mut reopened = Harness::with(config);
        assert_eq!(reopened.session.step(), saved.step);
        assert!(reopened.pump(), "the session asks to connect");
        reopened.session.handle_connected(reopened.now);
        reopened.pump();
        let join = reopened.sent.pop().unwrap();
        assert!(matches!(join, Frame::Join { floor: true, .. }), "{join:?}");
        reopened.welcome(2, 1, (10, 1), Some(12));
        assert_eq!(reopened.session.step(), 12);
        let data = Json::from_value(&serde_json::json!({ "n": 1 })).unwrap();
        reopened.session.broadcast(reopened.now, data).unwrap();
        reopened.pump();
        reopened.store();
        let sent = reopened.stamped();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].stamp.step, 13);
    }

    /// A relay whose floor for this node is above the clock (storage that fell behind the
    /// steps it sent): the session stamps above the floor. A step at or below it would be
    /// refused as a replay, which reads as delivered.
    #[test]
    fn a_floor_above_the_clock_moves_it_up() {
        let mut h = Harness::new();
        h.join(2, 1, &[]);
        h.reconnect();
        h.welcome(2, 1, (10, 1), Some(50));
        assert_eq!(h.session.step(), 50);
        h.sent.clear();
        let data = Json::from_value(&serde_json::json!({ "n": 1 })).unwrap();
        h.session.broadcast(h.now, data).unwrap();
        h.pump();
        assert_eq!(h.stamped()[0].stamp.step, 51);
    }

    /// The relay lost the room's history, and this replica's document is larger than the relay
    /// takes in one message: it cannot be given back, and the application is told so, where
    /// before it was left out without a word.
    #[test]
    fn a_document_too_large_to_give_back_is_reported() {
        let mut h = Harness::new();
        h.join(2, 1, &[]);
        let writer = SharedDoc::with_client_id(9);
        let update = writer.insert("t", 0, &"x".repeat(10_000)).unwrap();
        h.frame(Frame::stamped(
            Stamp {
                sender: 9,
                step: 1,
                pattern: PatternConfig::default().value(1),
            },
            Body::Update {
                doc: "content".into(),
                update,
            },
        ));
        // The relay restarts on an empty store, and takes less in a message.
        h.reconnect();
        std::iter::from_fn(|| h.session.poll_event()).for_each(drop);
        h.relay.max_frame = 2_048;
        h.relay.max_message = 4_096;
        h.welcome(3, 3, (0, 2), Some(0));
        let reported: Vec<Anomaly> = std::iter::from_fn(|| h.session.poll_event())
            .filter_map(|e| match e {
                Event::Anomaly(a) if a.reason == Reason::TooLarge => Some(a),
                _ => None,
            })
            .collect();
        assert_eq!(reported.len(), 1, "{reported:?}");
        assert!(
            reported[0].detail.contains("could not be given back"),
            "{}",
            reported[0].detail
        );
        assert!(h.stamped().iter().all(|s| s.body.kind() != Kind::Update));
    }

    /// The relay lost the room's history, and this replica holds back a delete of clocks it
    /// never received, and an insert next to them. Its whole state carried both, and a relay
    /// takes no update that needs clocks no one wrote: the give-back was refused as `malformed`
    /// and the room's new log never got the document. It goes back without them.
    #[test]
    fn a_give_back_leaves_out_deletes_of_clocks_never_received() {
        let mut h = Harness::new();
        h.join(2, 1, &[]);
        let stamp = |step| Stamp {
            sender: 9,
            step,
            pattern: PatternConfig::default().value(step),
        };
        let writer = SharedDoc::with_client_id(9);
        let _never_received = writer.insert("t", 0, "abc").unwrap();
        let delete = writer.delete("t", 1, 1).unwrap();
        let after = writer.insert("t", 2, "!").unwrap();
        let kept = SharedDoc::with_client_id(8).insert("t", 0, "xyz").unwrap();
        for (step, update) in [(1, delete), (2, after), (3, kept)] {
            h.frame(Frame::stamped(
                stamp(step),
                Body::Update {
                    doc: "content".into(),
                    update,
                },
            ));
        }
        assert!(h.session.replica().has_pending());
        assert_eq!(h.session.replica().text("t"), "xyz");
        h.reconnect();
        std::iter::from_fn(|| h.session.poll_event()).for_each(drop);
        h.welcome(3, 3, (0, 2), Some(0));
        let given = h.updates_sent();
        assert_eq!(given.len(), 1, "the document is given back");
        // What the relay does with it, on the empty document of its new log.
        let relay = SharedDoc::new();
        relay
            .apply_member_update(&given[0])
            .expect("the relay takes the give-back");
        let replica = SharedDoc::new();
        replica.apply_update(&given[0]).unwrap();
        assert_eq!(replica.text("t"), h.session.replica().text("t"));
        assert!(!replica.has_pending());
    }

    /// A member that knows it may only read does not give its document back to a relay that
    /// lost the room's history (the relay would refuse it): a `refused` event says so, its
    /// document, which shows only what the room held, is not taken as diverged, and the
    /// obligation stays, for a connection whose token may write.
    #[test]
    fn a_read_only_member_does_not_give_its_document_back_and_does_not_diverge() {
        let mut h = Harness::with_remote_edit();
        h.session.set_read_only(true);
        h.reconnect();
        std::iter::from_fn(|| h.session.poll_event()).for_each(drop);
        h.welcome(3, 3, (0, 2), Some(0));
        assert!(h.updates_sent().is_empty(), "nothing given back");
        let refused: Vec<Event> = std::iter::from_fn(|| h.session.poll_event())
            .filter(|e| matches!(e, Event::Refused { .. }))
            .collect();
        assert!(
            matches!(
                refused.as_slice(),
                [Event::Refused {
                    kind: Kind::Update,
                    reason: Reason::Forbidden,
                    doc: Some(doc),
                    ..
                }] if doc == WHOLE_DOC
            ),
            "{refused:?}"
        );
        assert!(!h.session.diverged());
        h.session.set_read_only(false);
        h.reconnect();
        h.welcome(3, 3, (0, 2), Some(0));
        assert_eq!(
            h.updates_sent().len(),
            1,
            "given back under a token that may write"
        );
    }

    /// A tab whose token comes from a function takes its stored session before the token says
    /// it may only read; that record may hold another tab's unsent edits. Sent, every one was
    /// refused as `forbidden` and lost: the tab that may write, which opens next, had nothing
    /// left to send. While read only, a stored session keeps its outbox, sends none of it, and
    /// says so; under a token that may write, it goes.
    #[test]
    fn a_read_only_member_keeps_the_stored_outbox_it_cannot_send() {
        let (mut config, _, saved) = closed_offline(&["typed offline"]);
        config.restore = Some(Saved::decode(&saved.encode()).unwrap());
        let mut reader = Harness::of(config, SharedDoc::with_client_id(1));
        // Its own edit, made before the token was in, is refused as the relay would refuse it.
        let own = reader.session.replica().insert("t", 0, "mine ").unwrap();
        reader.session.update(reader.now, "t", own).unwrap();
        reader.session.set_read_only(true);
        reader.joined(2, RoomConfig::default(), (0, 1), Some(0));
        reader.store();
        assert!(reader.updates_sent().is_empty(), "nothing sent");
        assert_eq!(reader.session.pending(), 1, "the restored outbox is kept");
        assert_eq!(reader.session.saved().bodies().len(), 1, "and stored");
        let events: Vec<Event> = std::iter::from_fn(|| reader.session.poll_event()).collect();
        let told: Vec<&Event> = events
            .iter()
            .filter(|e| matches!(e, Event::Refused { .. }))
            .collect();
        assert!(
            matches!(
                told.as_slice(),
                [Event::Refused {
                    reason: Reason::Forbidden,
                    doc: Some(own),
                    ..
                }, Event::Refused {
                    reason: Reason::Forbidden,
                    doc: Some(doc),
                    detail,
                    ..
                }] if own == "t" && doc == WHOLE_DOC && detail.contains("1 message")
            ),
            "{events:?}"
        );
        assert!(reader.session.diverged(), "its own edit was refused");
        // An update the replica holds back (its earlier clocks never came): the request for
        // them goes out past the writes the outbox keeps.
        let remote = SharedDoc::with_client_id(9);
        remote.insert("t", 0, "ab").unwrap();
        let later = remote.insert("t", 2, "c").unwrap();
        reader.peer_sends(
            7,
            1,
            Body::Update {
                doc: "t".into(),
                update: later,
            },
        );
        reader.now += HELD_GRACE + 1;
        reader.session.handle_timeout(reader.now);
        reader.pump();
        reader.store();
        assert!(
            reader
                .stamped()
                .iter()
                .any(|s| matches!(s.body, Body::SyncRequest { .. })),
            "the room is asked"
        );
        assert!(
            reader.updates_sent().is_empty(),
            "still nothing of the outbox"
        );
        reader.session.set_read_only(false);
        reader.reconnect();
        reader.welcome(2, 2, (0, 1), Some(0));
        reader.store();
        assert_eq!(
            reader.updates_sent().len(),
            1,
            "sent under a token that may write"
        );
    }

    /// A tab that may write takes in a closed tab's outbox, and its next token reads only: the
    /// other tab's edits are kept with the stored session, not refused (the closed tab's
    /// record is gone: they were in no other place).
    #[test]
    fn an_outbox_taken_in_is_kept_when_the_token_reads_only_later() {
        let (config, _, saved) = closed_offline(&["typed offline"]);
        let mut h = Harness::of(config, SharedDoc::with_client_id(1));
        h.joined(3, RoomConfig::default(), (0, 1), None);
        h.session.handle_closed(h.now, 1006, "offline");
        h.pump();
        assert_eq!(h.session.take_in(h.now, &saved), 1);
        h.store();
        std::iter::from_fn(|| h.session.poll_event()).for_each(drop);
        h.session.set_read_only(true);
        assert_eq!(h.session.pending(), 1, "kept");
        let refused: Vec<Event> = std::iter::from_fn(|| h.session.poll_event())
            .filter(|e| matches!(e, Event::Refused { .. }))
            .collect();
        assert_eq!(refused, [], "nothing refused");
        assert!(!h.session.diverged());
    }

    /// A client without storage goes offline, its user types, and its token expires: the relay
    /// closes the next connection for good. What the session had not had acknowledged can go
    /// from nowhere now: each such message is refused (the application hears which, and the
    /// document shows an edit the room does not have), where the session used to report only
    /// `closed`.
    #[test]
    fn a_session_ended_by_the_relay_refuses_what_it_did_not_send() {
        let mut h = Harness::new();
        h.joined(2, RoomConfig::default(), (0, 1), None);
        let sent = h.session.replica().insert("t", 0, "sent ").unwrap();
        h.session.update(h.now, "t", sent).unwrap();
        h.pump();
        h.session.handle_closed(h.now, 1006, "offline");
        let typed = h.session.replica().insert("t", 5, "typed offline").unwrap();
        h.session.update(h.now, "t", typed).unwrap();
        std::iter::from_fn(|| h.session.poll_event()).for_each(drop);
        // The next connection: the relay refuses it for good.
        h.now += 60_000;
        h.session.handle_timeout(h.now);
        assert!(h.pump(), "the session asks to connect");
        h.session
            .handle_closed(h.now, close::FORBIDDEN, "the access token has expired");
        let events: Vec<Event> = std::iter::from_fn(|| h.session.poll_event()).collect();
        let refused: Vec<(Step, Kind, Reason)> = events
            .iter()
            .filter_map(|e| match e {
                Event::Refused {
                    step, kind, reason, ..
                } => Some((*step, *kind, *reason)),
                _ => None,
            })
            .collect();
        assert_eq!(
            refused,
            [
                (1, Kind::Update, Reason::Unavailable),
                (0, Kind::Update, Reason::Unavailable)
            ],
            "{events:?}"
        );
        assert!(h.session.diverged());
        assert!(
            events.iter().any(
                |e| matches!(e, Event::Status { status: Status::Closed, reason: Some(d) }
                if d.contains("2 messages") && d.contains("expired"))
            ),
            "{events:?}"
        );
        assert_eq!(h.session.pending(), 0);
    }

    /// The same with storage: what was not acknowledged stays stored for the room's next
    /// client (a tab opened later takes it in), and the `closed` status says so.
    #[test]
    fn a_stored_session_ended_by_the_relay_keeps_what_it_did_not_send() {
        let mut config = SessionConfig::new("r", "a");
        config.persist = true;
        let mut h = Harness::with(config);
        h.joined(2, RoomConfig::default(), (0, 1), None);
        h.session.handle_closed(h.now, 1006, "offline");
        let typed = h.session.replica().insert("t", 0, "typed offline").unwrap();
        h.session.update(h.now, "t", typed).unwrap();
        h.store();
        std::iter::from_fn(|| h.session.poll_event()).for_each(drop);
        // The next connection: the relay refuses it for good.
        h.now += 60_000;
        h.session.handle_timeout(h.now);
        assert!(h.pump(), "the session asks to connect");
        let saves = h.saves;
        h.session
            .handle_closed(h.now, close::FORBIDDEN, "the access token has expired");
        h.pump();
        assert_eq!(
            h.saves,
            saves + 1,
            "stored as closed, so that the record is let go"
        );
        let events: Vec<Event> = std::iter::from_fn(|| h.session.poll_event()).collect();
        assert!(
            !events.iter().any(|e| matches!(e, Event::Refused { .. })),
            "{events:?}"
        );
        assert!(
            events.iter().any(
                |e| matches!(e, Event::Status { status: Status::Closed, reason: Some(d) }
                if d.contains("1 message") && d.contains("stored"))
            ),
            "{events:?}"
        );
        assert_eq!(h.session.saved().unsent.len(), 1);
    }

    /// A stored session's settings, and a tab that wrote `texts` (each after the last) while
    /// offline, then stored its session and closed: the tab, and what it stored (its outbox
    /// holds the edits).
    fn closed_offline(texts: &[&str]) -> (SessionConfig, Harness, Saved) {
        let mut config = SessionConfig::new("r", "a");
        config.persist = true;
        let mut writer = Harness::with(config.clone());
        writer.joined(2, RoomConfig::default(), (0, 1), None);
        writer.session.handle_closed(writer.now, 1006, "offline");
        writer.pump();
        let mut at = 0;
        for text in texts {
            let update = writer.session.replica().insert("t", at, text).unwrap();
            writer.session.update(writer.now, "t", update).unwrap();
            at += text.len() as u32;
        }
        writer.pump();
        let saved = writer.store();
        assert!(writer.session.pending() >= 1);
        (config, writer, saved)
    }

    /// What a tab does to a stored session it took (see the property below).
    #[derive(Debug, Clone)]
    enum TabOp {
        /// Connects again, under a token that may only read, or write.
        Connect { read_only: bool },
        /// The relay answers each stamped update it got on this connection: refused as
        /// `forbidden` under a token that reads only, stored otherwise.
        Answer,
        /// The stored state is written.
        Store,
        /// The application edits the document (when the session lets it).
        Edit,
        /// The connection drops.
        Drop,
        /// Time passes.
        Wait,
    }

    fn tab_op() -> impl proptest::strategy::Strategy<Value = TabOp> {
        use proptest::prelude::*;
        prop_oneof![
            any::<bool>().prop_map(|read_only| TabOp::Connect { read_only }),
            Just(TabOp::Answer),
            Just(TabOp::Store),
            Just(TabOp::Edit),
            Just(TabOp::Drop),
            Just(TabOp::Wait),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]

        /// A stored session holding a closed tab's unsent edits, taken by a tab whose tokens
        /// read only or write, in any order: each of those edits is stored by the room or
        /// still in the stored session, never lost.
        #[test]
        fn a_closed_tabs_edits_are_stored_by_the_room_or_kept(
            edits in 1usize..4,
            ops in proptest::collection::vec(tab_op(), 1..40),
        ) {
            let texts: Vec<String> = (0..edits).map(|i| format!("<w{i}>")).collect();
            let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
            let (mut config, writer, saved) = closed_offline(&texts);
            config.restore = Some(Saved::decode(&saved.encode()).unwrap());
            // The tab's document: the stored one, with the closed tab's edits.
            let tab = SharedDoc::with_client_id(5);
            tab.apply_update(&writer.session.replica().snapshot()).unwrap();
            let mut h = Harness::of(config, tab);
            let room = SharedDoc::new();
            let (mut open, mut read_only, mut answered, mut position) = (false, false, 0, 0);
            for op in ops {
                match op {
                    TabOp::Connect { read_only: ro } => {
                        if open {
                            h.session.handle_closed(h.now, 1006, "again");
                            h.pump();
                        }
                        h.now += 60_000;
                        h.session.handle_timeout(h.now);
                        h.pump();
                        h.session.set_read_only(ro);
                        h.session.handle_connected(h.now);
                        h.pump();
                        h.welcome(2, 2, (0, 1), Some(0));
                        (open, read_only, answered) = (true, ro, h.sent.len());
                    }
                    TabOp::Answer if open => {
                        let sent: Vec<Stamped> = h.sent[answered..]
                            .iter()
                            .filter_map(|f| match f {
                                Frame::Stamped(s) if matches!(s.body, Body::Update { .. }) => {
                                    Some(s.clone())
                                }
                                _ => None,
                            })
                            .collect();
                        answered = h.sent.len();
                        for stamped in sent {
                            if read_only {
                                h.frame(Frame::Reject {
                                    step: stamped.stamp.step,
                                    reason: Reason::Forbidden,
                                    detail: "read only".into(),
                                });
                            } else {
                                if let Body::Update { update, .. } = &stamped.body {
                                    room.apply_update(update).unwrap();
                                }
                                position += 1;
                                h.frame(Frame::Ack { step: stamped.stamp.step, position });
                            }
                        }
                        answered = answered.max(h.sent.len());
                    }
                    TabOp::Store => {
                        h.store();
                    }
                    TabOp::Edit if h.session.check_edit("t").is_ok() => {
                        let update = h.session.replica().insert("t", 0, "x").unwrap();
                        h.session.update(h.now, "t", update).unwrap();
                        h.pump();
                    }
                    TabOp::Drop if open => {
                        h.session.handle_closed(h.now, 1006, "gone");
                        h.pump();
                        open = false;
                    }
                    TabOp::Wait => {
                        h.now += 3_000;
                        h.session.handle_timeout(h.now);
                        h.pump();
                    }
                    _ => {}
                }
            }
            // What the room stored, and what the stored session keeps.
            let stored = h.session.saved();
            let kept = SharedDoc::new();
            kept.apply_update(&room.snapshot()).unwrap();
            for body in stored.bodies() {
                if let Body::Update { update, .. } = body {
                    kept.apply_update(&update).unwrap();
                }
            }
            let text = kept.text("t");
            for i in 0..edits {
                let edit = format!("<w{i}>");
                proptest::prop_assert!(text.contains(&edit), "{edit} lost: {text:?}");
            }
        }
    }

    /// A document given back that the relay refuses as `forbidden` (the session did not know its
    /// member may only read) keeps the obligation, and does not count as diverged: a diverged
    /// stored document is set aside when its tab reopens, and this one may be the only copy of
    /// what the relay lost. No application update may take the give-back's name.
    #[test]
    fn a_give_back_refused_as_forbidden_keeps_the_obligation_and_does_not_diverge() {
        let mut h = Harness::with_remote_edit();
        h.reconnect();
        h.welcome(3, 3, (0, 2), Some(0));
        let given = h
            .stamped()
            .into_iter()
            .find(|s| matches!(&s.body, Body::Update { doc, .. } if doc == WHOLE_DOC))
            .expect("the document is given back")
            .stamp
            .step;
        assert!(!h.session.saved().give_back);
        h.frame(Frame::Reject {
            step: given,
            reason: Reason::Forbidden,
            detail: "read only".into(),
        });
        assert!(!h.session.diverged());
        assert!(h.session.saved().give_back, "the obligation stays");
        assert_eq!(
            h.session.update(h.now, WHOLE_DOC, vec![0, 0]),
            Err(SessionError::ReservedName)
        );
    }

    /// The relay lost the room's history (a new log), and the tab closed after storing that,
    /// before its document went back. The obligation was not stored: the session reopened from
    /// storage joined the new log as if nothing were owed, the edits only the lost log had were
    /// gone from the room, and the relay refused every later edit of the tab (they came after
    /// them in its clocks). A simulation run found it. It gives the document back.
    #[test]
    fn a_give_back_owed_when_the_tab_closed_is_made_after_it_reopens() {
        let mut config = SessionConfig::new("r", "a");
        config.persist = true;
        let mut h = Harness::with(config.clone());
        h.joined(2, RoomConfig::default(), (0, 1), None);
        // An edit the relay stored, in the log it then lost.
        h.session
            .replica()
            .insert("t", 0, "only the lost log had this")
            .unwrap();
        h.reconnect();
        h.frame(Frame::Welcome {
            node: 3,
            resume: [3; 16],
            config: RoomConfig::default(),
            limits: h.relay,
            high: 0,
            log: 2,
            peers: Vec::new(),
            floor: None,
        });
        // Stored, and the tab closes before the catch-up ends.
        let saved = h.store();
        assert_eq!(saved.log, 2);
        config.restore = Some(Saved::decode(&saved.encode()).unwrap());
        let mut reopened = Harness::with(config);
        let snapshot = h.session.replica().snapshot();
        reopened.session.replica().apply_update(&snapshot).unwrap();
        reopened.joined(3, RoomConfig::default(), (0, 2), None);
        reopened.store();
        reopened.store();
        let given = reopened.updates_sent();
        assert_eq!(given.len(), 1, "the document is given back");
        let room = SharedDoc::new();
        room.apply_member_update(&given[0]).unwrap();
        assert_eq!(room.text("t"), "only the lost log had this");
    }

    /// An open tab takes in the outbox of a tab that closed owing the room's new log its
    /// document: the open tab's document goes back in its stead.
    #[test]
    fn a_give_back_a_closed_tab_owed_is_made_by_the_tab_that_takes_in_its_outbox() {
        let mut config = SessionConfig::new("r", "a");
        config.persist = true;
        let mut h = Harness::with(config);
        h.joined(2, RoomConfig::default(), (0, 2), None);
        h.session.replica().insert("t", 0, "held here").unwrap();
        let other = Saved {
            log: 2,
            give_back: true,
            ..Saved::default()
        };
        h.session.take_in(h.now, &other);
        h.pump();
        h.store();
        h.store();
        let given = h
            .stamped()
            .iter()
            .filter(|s| matches!(s.body, Body::Update { .. }))
            .count();
        assert_eq!(given, 1, "the document is given back");
        // Owed to another log, nothing is.
        let mut saved = Saved {
            log: 3,
            ..Saved::default()
        };
        saved.adopt(&other);
        assert!(!saved.give_back);
        saved.log = 2;
        saved.adopt(&other);
        assert!(saved.give_back);
    }

    /// A closed tab's record holds a message that does not decode (a damaged disk, or a newer
    /// version's message): a tab that takes the record in says so, as a tab restored from it
    /// does, where it used to drop the message without a word; and a record adopted at open
    /// keeps it, so that the restore says so.
    #[test]
    fn a_closed_tabs_message_that_does_not_decode_is_reported_not_dropped() {
        let (config, _, mut saved) = closed_offline(&["typed offline"]);
        saved.unsent.push(vec![0xff, 1, 2]);
        let mut h = Harness::of(config.clone(), SharedDoc::with_client_id(1));
        h.joined(3, RoomConfig::default(), (0, 1), None);
        std::iter::from_fn(|| h.session.poll_event()).for_each(drop);
        assert_eq!(h.session.take_in(h.now, &saved), 1);
        assert_eq!(
            h.anomalies(),
            ["1 message a closed tab left stored did not decode and is lost"]
        );

        let mut own = Saved::default();
        own.adopt(&saved);
        let mut config = config;
        config.restore = Some(own);
        let mut reopened = Harness::of(config, SharedDoc::with_client_id(2));
        assert_eq!(
            reopened.anomalies(),
            ["1 stored outbox messages did not decode and are lost"]
        );
    }

    /// An update the relay refuses for good leaves the document diverged, and the client says
    /// so; a refused data message does not.
    #[test]
    fn an_update_refused_for_good_leaves_the_client_diverged() {
        let mut h = Harness::new();
        h.joined(2, RoomConfig::default(), (0, 1), None);
        h.session.broadcast(h.now, Json::null()).unwrap();
        h.pump();
        let data = h.stamped().last().unwrap().stamp.step;
        h.frame(Frame::Reject {
            step: data,
            reason: Reason::Malformed,
            detail: "no".into(),
        });
        assert!(!h.session.diverged(), "data");
        let update = h.session.replica().insert("t", 0, "refused").unwrap();
        h.session.update(h.now, "t", update).unwrap();
        h.pump();
        let step = h.stamped().last().unwrap().stamp.step;
        h.frame(Frame::Reject {
            step,
            reason: Reason::Full,
            detail: "the room is full".into(),
        });
        assert!(h.session.diverged());
        // Stored with the session, whose document holds the refused edit; restored with it.
        let saved = h.session.saved();
        assert!(saved.diverged);
        let mut config = SessionConfig::new("r", "t");
        config.restore = Some(saved);
        let restored = Session::new(config, SharedDoc::new(), h.now);
        assert!(restored.diverged());
    }

    /// A document that diverged is repaired in place: the refused edit set aside, with the
    /// later edit that builds on it, and the room's document loaded again from the start of
    /// the log, the node's own messages included (the relay sends them in a catch-up from the
    /// start), with the status telling why the connection started again, and the data the
    /// application had not told again.
    #[test]
    fn a_diverged_document_is_repaired_from_the_rooms() {
        let mut h = Harness::new();
        h.joined(2, RoomConfig::default(), (0, 1), None);
        let mine = h.session.replica().insert("t", 0, "mine").unwrap();
        h.session.update(h.now, "t", mine.clone()).unwrap();
        h.pump();
        let stored = h.stamped().last().unwrap().stamp;
        h.frame(Frame::Ack {
            step: stored.step,
            position: 1,
        });
        let theirs = SharedDoc::with_client_id(9);
        theirs.apply_update(&mine).unwrap();
        let room = theirs.insert("t", 4, " and the room's").unwrap();
        let stamp = |step| Stamp {
            sender: 9,
            step,
            pattern: PatternConfig::default().value(step),
        };
        let from_room = Frame::stamped(
            stamp(stored.step + 1),
            Body::Update {
                doc: "t".into(),
                update: room,
            },
        );
        let positioned = |frame: &Frame, position| {
            crate::wire::with_position(&frame.encode(), position).expect("stamped")
        };
        h.session.handle_frame(h.now, &positioned(&from_room, 2));
        let data = Frame::stamped(
            stamp(stored.step + 2),
            Body::Data {
                data: Json::parse("1").unwrap(),
            },
        );
        h.session.handle_frame(h.now, &positioned(&data, 3));
        h.pump();
        assert_eq!(
            h.session
                .repair(h.now, SharedDoc::with_client_id(7))
                .unwrap()
                .map(|_| ()),
            None,
            "nothing to repair"
        );
        let update = h.session.replica().insert("t", 0, "refused ").unwrap();
        h.session.update(h.now, "t", update).unwrap();
        h.pump();
        let step = h.stamped().last().unwrap().stamp.step;
        // A later edit, in flight when the refusal comes: it builds on the refused one.
        let later = h.session.replica().insert("t", 0, "later ").unwrap();
        h.session.update(h.now, "t", later).unwrap();
        h.pump();
        // And one that only deletes what the room has: it does not build on the refused one.
        let deletion = h.session.replica().delete("t", 14, 1).unwrap();
        h.session.update(h.now, "t", deletion).unwrap();
        h.pump();
        h.frame(Frame::Reject {
            step,
            reason: Reason::Full,
            detail: "the room is full".into(),
        });
        assert!(h.session.diverged());
        std::iter::from_fn(|| h.session.poll_event()).for_each(drop);
        let repaired = h
            .session
            .repair(h.now, SharedDoc::with_client_id(7))
            .unwrap()
            .expect("repaired");
        assert_eq!(
            repaired.set_aside.text("t"),
            "later refused ine and the room's"
        );
        assert_eq!(repaired.outbox.len(), 1, "the deletion stays");
        assert_eq!(h.session.pending(), 1);
        assert!(!h.session.diverged());
        assert!(h.pump(), "it connects again");
        let events: Vec<Event> = std::iter::from_fn(|| h.session.poll_event()).collect();
        assert!(
            matches!(
                events.as_slice(),
                [Event::Refused { reason: Reason::Malformed, .. }, .., Event::Status {
                    status: Status::Reconnecting,
                    reason: Some(reason)
                }] if reason.contains("diverged")
            ),
            "{events:?}"
        );
        h.sent.clear();
        h.session.handle_connected(h.now);
        h.pump();
        assert!(
            matches!(
                h.sent.as_slice(),
                [Frame::Join {
                    since: 0,
                    resume: Some(_),
                    ..
                }]
            ),
            "from the start of the log, as the same node: {:?}",
            h.sent
        );
        h.welcome(2, 2, (step, 1), Some(step));
        std::iter::from_fn(|| h.session.poll_event()).for_each(drop);
        // The catch-up: the node's own edit, the other member's, and the data (told before).
        let own = Frame::stamped(
            stored,
            Body::Update {
                doc: "t".into(),
                update: mine,
            },
        );
        for (position, frame) in [own, from_room, data].iter().enumerate() {
            let bytes = positioned(frame, position as u64 + 1);
            h.session.handle_frame(h.now, &bytes);
        }
        h.pump();
        assert_eq!(h.session.replica().text("t"), "ine and the room's");
        assert!(!h.session.replica().has_pending());
        let events: Vec<Event> = std::iter::from_fn(|| h.session.poll_event()).collect();
        assert!(
            !events
                .iter()
                .any(|e| matches!(e, Event::Message { .. } | Event::Anomaly(_))),
            "{events:?}"
        );
        assert!(!h.session.diverged());
        let update = h.session.replica().insert("t", 0, "new ").unwrap();
        h.session.update(h.now, "t", update).unwrap();
        h.pump();
        assert_eq!(h.updates_sent().len(), 2, "the deletion, and the new edit");
    }

    /// A closed session's record is forgotten only when it holds nothing: not while its replica
    /// holds a document (the record says which log that document was part of).
    #[test]
    fn storage_forgets_a_closed_session_only_when_its_replica_is_empty() {
        let mut empty = Harness::new();
        empty.joined(2, RoomConfig::default(), (0, 1), None);
        assert!(!empty.session.may_forget(), "open");
        empty.session.close(empty.now);
        assert!(empty.session.may_forget());
        let mut h = Harness::new();
        h.joined(2, RoomConfig::default(), (0, 1), None);
        h.session.replica().insert("t", 0, "stored").unwrap();
        h.session.close(h.now);
        assert_eq!(h.session.pending(), 0);
        assert!(
            !h.session.may_forget(),
            "the record says which log the document was part of"
        );
    }

    /// A tab never welcomed (it opened offline and typed) takes in the record of a closed tab
    /// that was part of log 2; the stored document holds that tab's edits, and the relay, which
    /// lost the room's history meanwhile, welcomes with log 3. A record with no log took that
    /// for a first visit: the edits only log 2 held never went back, and the relay refused
    /// every later edit made next to them. The document goes back whole.
    #[test]
    fn a_session_never_welcomed_takes_the_log_of_the_records_it_takes_in() {
        let mut config = SessionConfig::new("r", "a");
        config.persist = true;
        let closed = Saved {
            node: 5,
            token: Some([5; 16]),
            log: 2,
            position: 40,
            room: Some(RoomConfig::default()),
            ..Saved::default()
        };
        // The stored document: what the closed tab's replica held.
        let stored = SharedDoc::new();
        stored.insert("t", 0, "only log 2 had this").unwrap();
        let snapshot = stored.snapshot();
        // At open: the tab's own record (no log) takes in the closed tab's.
        let mut own = Saved::default();
        own.adopt(&closed);
        assert_eq!(
            (own.log, own.position),
            (2, 0),
            "log 2, read from its start"
        );
        config.restore = Some(Saved::decode(&own.encode()).unwrap());
        let mut reopened = Harness::with(config.clone());
        reopened.session.replica().apply_update(&snapshot).unwrap();
        reopened.joined(3, RoomConfig::default(), (0, 3), None);
        reopened.store();
        reopened.store();
        let given = reopened.updates_sent();
        assert_eq!(given.len(), 1, "the document is given back");
        let room = SharedDoc::new();
        room.apply_member_update(&given[0]).unwrap();
        assert_eq!(room.text("t"), "only log 2 had this");

        // The same, taken in while the session runs, before its first welcome.
        config.restore = None;
        let mut h = Harness::with(config);
        h.session.replica().apply_update(&snapshot).unwrap();
        h.session.take_in(h.now, &closed);
        h.joined(3, RoomConfig::default(), (0, 3), None);
        h.store();
        h.store();
        assert_eq!(h.updates_sent().len(), 1, "the document is given back");
    }

    /// The relay restarts on an empty store (another log) after this tab stamped at step 1,200:
    /// the steps begin again, and so does the ceiling the tab stores. A ceiling kept from the old
    /// log put a tab reopened from storage 1,300 steps ahead of the new room, where the relay
    /// refused every message it stamped as `futureStep` until the room caught up.
    #[test]
    fn with_another_log_the_stored_ceiling_begins_again() {
        let mut config = SessionConfig::new("r", "a");
        config.persist = true;
        let joined = |h: &mut Harness, node: NodeId, log: u64, high: Step| {
            h.joined(node, RoomConfig::default(), (high, log), None);
        };
        let mut h = Harness::with(config.clone());
        joined(&mut h, 2, 1, 1_200);
        h.store();
        assert!(h.session.saved().step > 1_200);
        // The relay restarts on an empty store.
        h.session.handle_closed(h.now, 1006, "the relay restarted");
        h.pump();
        h.now += 60_000;
        h.session.handle_timeout(h.now);
        joined(&mut h, 3, 2, 0);
        h.store();
        let saved = h.session.saved();
        assert!(
            saved.step <= h.session.step() + STEP_RESERVE,
            "ceiling {} with the clock at {}",
            saved.step,
            h.session.step()
        );
        // The tab closes and reopens from storage: what it sends is within the new room's
        // bound (`maxFuture` 1,000 above its step).
        config.restore = Some(saved);
        let mut reopened = Harness::with(config);
        joined(&mut reopened, 3, 2, 1);
        let data = Json::from_value(&serde_json::json!({ "n": 1 })).unwrap();
        reopened.session.broadcast(reopened.now, data).unwrap();
        reopened.pump();
        reopened.store();
        reopened.store();
        let step = reopened.stamped()[0].stamp.step;
        assert!(step <= 1 + 1_000, "stamped at {step}");
    }

    /// A presence state (an avatar in a Yjs awareness state) over the relay's frame limit: set
    /// when the limit is known, it is refused at once (`TooLarge`); set before a relay with a
    /// lower limit answered, it is dropped with a `refused` event. It went out as one frame,
    /// which the relay refused, or closed the connection for (1009) and got again after every
    /// reconnect, while nothing else of the tab's went out.
    #[test]
    fn a_presence_state_over_the_frame_limit_is_refused_and_never_sent() {
        let presences = |h: &Harness| {
            h.sent
                .iter()
                .filter(|f| matches!(f, Frame::Presence { .. }))
                .count()
        };
        let state = |bytes: usize| {
            Json::from_value(&serde_json::json!({ "avatar": "x".repeat(bytes) })).unwrap()
        };
        let mut h = Harness::new();
        h.relay.max_frame = 16_384;
        h.join(2, 1, &[]);
        assert!(matches!(
            h.session.set_presence(h.now, state(40_000)),
            Err(SessionError::TooLarge { max: 16_384, .. })
        ));
        h.session.set_presence(h.now, state(1_000)).unwrap();
        h.pump();
        assert_eq!(presences(&h), 1, "a state within the limit goes out");

        let mut h = Harness::new();
        h.relay.max_frame = 16_384;
        h.session.set_presence(h.now, state(40_000)).unwrap();
        h.join(2, 1, &[]);
        assert_eq!(presences(&h), 0);
        let refused: Vec<Event> = std::iter::from_fn(|| h.session.poll_event())
            .filter(|e| matches!(e, Event::Refused { .. }))
            .collect();
        assert!(
            matches!(
                &refused[..],
                [Event::Refused {
                    kind: Kind::Presence,
                    reason: Reason::TooLarge,
                    ..
                }]
            ),
            "{refused:?}"
        );
    }

    /// Storage goes away for good (another page deleted the database) while a message waits
    /// for its stamp to be stored: it goes out without, and nothing asks for a write again.
    #[test]
    fn without_storage_any_more_what_waited_for_a_write_goes_out() {
        let mut config = SessionConfig::new("r", "a");
        config.persist = true;
        let mut h = Harness::with(config);
        h.join(2, 1, &[]);
        let data = Json::from_value(&serde_json::json!({ "n": 1 })).unwrap();
        h.session.broadcast(h.now, data).unwrap();
        h.pump();
        assert!(h.stamped().is_empty(), "it waits for a write");
        h.session.stop_persisting(h.now);
        h.pump();
        assert_eq!(h.stamped().len(), 1);
        let saves = h.saves;
        h.session
            .broadcast(h.now, Json::parse("2").unwrap())
            .unwrap();
        h.pump();
        assert_eq!(h.stamped().len(), 2);
        assert_eq!(h.saves, saves, "no write is asked for");
    }

    /// A member's update arrives without the earlier update it builds on (which the relay
    /// refused, or lost): the replica holds it back, and after 10 s the application hears of
    /// it (a `desync` anomaly) and every member is asked for what is missing, once; when the
    /// missing update comes, nothing more is said.
    #[test]
    fn updates_held_back_for_missing_parts_are_reported_and_asked_for() {
        // Its relay answers no heartbeat: without them, the quiet minute it waits through
        // keeps the connection.
        let mut config = SessionConfig::new("r", "a");
        config.connect_timeout = 5_000;
        config.heartbeat = 0;
        let mut h = Harness::with(config);
        h.join(2, 1, &[3]);
        let author = SharedDoc::with_client_id(9);
        let first = author.insert("content", 0, "first ").unwrap();
        let second = author.insert("content", 6, "second").unwrap();
        let stamp = Stamp {
            sender: 3,
            step: 1,
            pattern: PatternConfig::default().value(1),
        };
        h.frame(Frame::stamped(
            stamp,
            Body::Update {
                doc: "content".into(),
                update: second,
            },
        ));
        let desyncs = |h: &mut Harness| {
            std::iter::from_fn(|| h.session.poll_event())
                .filter(|e| {
                    matches!(
                        e,
                        Event::Anomaly(Anomaly {
                            reason: Reason::Desync,
                            ..
                        })
                    )
                })
                .count()
        };
        let requests = |h: &Harness| {
            h.sent
                .iter()
                .filter(|f| {
                    matches!(f, Frame::Stamped(s) if matches!(s.body, Body::SyncRequest { to: 0, .. }))
                })
                .count()
        };
        assert_eq!(desyncs(&mut h), 0);
        let at = h
            .session
            .poll_timeout()
            .expect("a deadline for the held update");
        assert!(at <= h.now + HELD_GRACE);
        h.now += HELD_GRACE;
        h.session.handle_timeout(h.now);
        h.pump();
        assert_eq!(desyncs(&mut h), 1);
        assert_eq!(requests(&h), 1);
        h.now += HELD_GRACE * 3;
        h.session.handle_timeout(h.now);
        h.pump();
        assert_eq!(desyncs(&mut h), 0, "said once");
        // The missing update comes (a member's sync answer): the held one applies.
        let stamp = Stamp {
            sender: 3,
            step: 2,
            pattern: PatternConfig::default().value(2),
        };
        h.frame(Frame::stamped(
            stamp,
            Body::SyncState {
                doc: "content".into(),
                update: first,
                to: 2,
            },
        ));
        assert_eq!(h.session.replica().text("content"), "first second");
        assert_eq!(h.session.poll_timeout(), None);
    }

    /// A read-only member's edits are refused by the room but held by its document: storage
    /// keeps them too. Before, an edit made once the session knew it was read-only was not
    /// stored, so a tab reopened from storage missed it and held back every later edit of its
    /// own for good (the simulation's held-back reports found it).
    #[test]
    fn an_edit_the_room_refuses_is_stored_like_the_document_holds_it() {
        let mut config = SessionConfig::new("r", "a");
        config.persist = true;
        let mut h = Harness::with(config);
        h.join(2, 1, &[]);
        let first = h.session.replica().insert("content", 0, "a").unwrap();
        h.session.update(h.now, "content", first.clone()).unwrap();
        h.pump();
        h.store();
        h.store();
        let step = h.stamped()[0].stamp.step;
        h.frame(Frame::Reject {
            step,
            reason: Reason::Forbidden,
            detail: "read only".into(),
        });
        let _ = h.session.take_updates();
        let second = h.session.replica().insert("content", 1, "b").unwrap();
        h.session.update(h.now, "content", second.clone()).unwrap();
        h.pump();
        assert_eq!(h.session.take_updates(), vec![second]);
    }

    /// A read-only member: the first `forbidden` refusal takes every write out of the outbox
    /// with a `refused` event (none is sent again), and a later write is refused at once, until
    /// the next connection.
    #[test]
    fn a_forbidden_write_refuses_every_write_of_the_connection_and_sends_none_again() {
        let mut h = Harness::new();
        h.join(2, 1, &[]);
        for n in 0..3 {
            let data = Json::from_value(&serde_json::json!({ "n": n })).unwrap();
            h.session.broadcast(h.now, data).unwrap();
        }
        h.pump();
        let first = h.stamped()[0].stamp.step;
        h.frame(Frame::Reject {
            step: first,
            reason: Reason::Forbidden,
            detail: "read only".into(),
        });
        let refused = |h: &mut Harness| {
            std::iter::from_fn(|| h.session.poll_event())
                .filter(|e| {
                    matches!(
                        e,
                        Event::Refused {
                            reason: Reason::Forbidden,
                            ..
                        }
                    )
                })
                .count()
        };
        assert_eq!(refused(&mut h), 3);
        assert_eq!(h.session.pending(), 0);
        let sent = h.stamped().len();
        h.now += 5_000;
        h.session.handle_timeout(h.now);
        h.pump();
        let data = Json::from_value(&serde_json::json!("later")).unwrap();
        h.session.broadcast(h.now, data.clone()).unwrap();
        h.pump();
        assert_eq!(refused(&mut h), 1, "refused at once");
        assert_eq!(h.stamped().len(), sent, "nothing sent again");
        assert!(!h.session.broadcast_signal(h.now, data).unwrap());
    }

    /// A member known to read only (its token's claim, or a `forbidden` refusal on this
    /// connection) is refused an edit before it is made, so the document never shows it.
    #[test]
    fn an_edit_of_a_member_known_to_read_only_is_refused_before_it_is_made() {
        let mut h = Harness::new();
        h.join(2, 1, &[]);
        h.session.check_insert("content", 5).unwrap();
        h.session.set_read_only(true);
        assert!(h.session.read_only());
        assert_eq!(
            h.session.check_insert("content", 5),
            Err(SessionError::ReadOnly)
        );
        assert_eq!(h.session.check_edit("content"), Err(SessionError::ReadOnly));
        h.session.set_read_only(false);
        h.session.check_edit("content").unwrap();
        // The relay refuses a write of this connection as forbidden: the next edit is refused
        // before it is made, until a connection the relay may let write.
        let data = Json::from_value(&serde_json::json!("a write")).unwrap();
        h.session.broadcast(h.now, data).unwrap();
        h.pump();
        let step = h.stamped()[0].stamp.step;
        h.frame(Frame::Reject {
            step,
            reason: Reason::Forbidden,
            detail: "read only".into(),
        });
        assert_eq!(h.session.check_edit("content"), Err(SessionError::ReadOnly));
        h.session.close(h.now);
        assert_eq!(h.session.check_edit("content"), Err(SessionError::Closed));
    }

    /// A name set while the join is under way (the join gave the old one) follows it.
    #[test]
    fn a_name_set_during_the_join_follows_it() {
        let mut h = Harness::new();
        assert!(h.pump());
        h.session.handle_connected(h.now);
        h.pump();
        h.session.set_name(h.now, "grace").unwrap();
        assert!(!h.sent.iter().any(|f| matches!(f, Frame::Rename { .. })));
        h.frame(Frame::Welcome {
            node: 2,
            resume: [1; 16],
            config: RoomConfig::default(),
            limits: h.relay,
            high: 0,
            log: 1,
            peers: vec![],
            floor: None,
        });
        h.frame(Frame::CaughtUp {
            high: 0,
            position: 0,
        });
        let renames: Vec<&Frame> = h
            .sent
            .iter()
            .filter(|f| matches!(f, Frame::Rename { .. }))
            .collect();
        assert_eq!(
            renames,
            [&Frame::Rename {
                name: "grace".into()
            }]
        );
        // Set again to the same name: nothing more to send.
        h.session.set_name(h.now, "grace").unwrap();
        h.pump();
        assert_eq!(
            h.sent
                .iter()
                .filter(|f| matches!(f, Frame::Rename { .. }))
                .count(),
            1
        );
    }

    /// The presence map: each peer's latest, gone (with a `null` event) when the peer leaves,
    /// or when a reconnect finds it no longer present.
    #[test]
    fn presences_follow_the_peers() {
        let mut h = Harness::new();
        h.join(2, 1, &[7, 8]);
        let presence = |sender, text: &str| Frame::Presence {
            sender,
            data: Json::parse(text).unwrap(),
        };
        h.frame(presence(7, r#"{"cursor":1}"#));
        h.frame(presence(7, r#"{"cursor":2}"#));
        h.frame(presence(8, r#"{"cursor":9}"#));
        let map = |h: &Harness| -> Vec<(NodeId, String)> {
            h.session
                .presences()
                .iter()
                .map(|(&n, d)| (n, d.as_str().to_owned()))
                .collect()
        };
        assert_eq!(
            map(&h),
            [
                (7, r#"{"cursor":2}"#.to_owned()),
                (8, r#"{"cursor":9}"#.to_owned())
            ]
        );
        while h.session.poll_event().is_some() {}
        h.frame(Frame::PeerLeft { node: 7 });
        assert_eq!(map(&h), [(8, r#"{"cursor":9}"#.to_owned())]);
        let events: Vec<Event> = std::iter::from_fn(|| h.session.poll_event()).collect();
        assert!(events.contains(&Event::Presence {
            sender: 7,
            data: Json::null()
        }));
        // Node 8 leaves while this client is away: the welcome of the reconnect lists it no more.
        h.session.handle_closed(h.now, 1006, "gone");
        h.now = h.session.poll_timeout().unwrap();
        h.session.handle_timeout(h.now);
        h.join(2, 1, &[9]);
        assert!(map(&h).is_empty());
    }

    /// While joined, the session sends a heartbeat every `heartbeat` ms, and any frame from
    /// the relay keeps the connection. A connection that brings nothing for a heartbeat's time
    /// after a heartbeat went out (a network gone away without closing it) is dropped and the
    /// session reconnects, saying why; what was in flight goes out again on the next
    /// connection. A timer that fires late (a hidden tab's) does not count as silence: the
    /// heartbeat it sends gets its time.
    #[test]
    fn a_connection_that_brings_nothing_is_given_up_and_opened_again() {
        let mut config = SessionConfig::new("r", "a");
        config.heartbeat = 1_000;
        let mut h = Harness::with(config);
        h.join(2, 1, &[3]);
        h.sent.clear();
        h.session.update(h.now, "content", vec![0, 0]).unwrap();
        let beats = |h: &Harness| h.sent.iter().filter(|f| **f == Frame::Heartbeat).count();
        let mut disconnected = None;
        // The relay answers for three seconds, then nothing comes.
        while disconnected.is_none() && h.now < 10_000 {
            h.now = h
                .session
                .poll_timeout()
                .expect("a heartbeat or a deadline is due");
            h.session.handle_timeout(h.now);
            while let Some(output) = h.session.poll_output() {
                match output {
                    Output::Send(bytes) => {
                        let frame = Frame::decode(&bytes).unwrap();
                        if frame == Frame::Heartbeat && h.now <= 3_000 {
                            h.session.handle_frame(h.now, &Frame::Heartbeat.encode());
                        }
                        h.sent.push(frame);
                    }
                    Output::Disconnect { reason, .. } => disconnected = Some((h.now, reason)),
                    _ => {}
                }
            }
        }
        let (at, reason) = disconnected.expect("the silent connection is dropped");
        assert_eq!(
            at, 5_000,
            "a heartbeat's time after the unanswered one, at 4 s"
        );
        assert!(reason.contains("heartbeat"), "{reason}");
        assert_eq!(beats(&h), 4, "one a second until then: {:?}", h.sent);
        assert_eq!(h.session.status(), Status::Reconnecting);
        let said = std::iter::from_fn(|| h.session.poll_event()).any(|e| {
            matches!(e, Event::Status { status: Status::Reconnecting, reason: Some(r) }
                if r.contains("nothing came from the relay for 2 s"))
        });
        assert!(said, "the application hears why");
        assert_eq!(
            h.session.pending(),
            1,
            "the update waits for the next connection"
        );
        // The next connection: the update goes out again.
        h.now = h.session.poll_timeout().unwrap();
        h.session.handle_timeout(h.now);
        h.sent.clear();
        h.join(2, 1, &[3]);
        h.now += 1;
        h.session.handle_timeout(h.now);
        h.pump();
        assert!(
            h.sent.iter().any(|f| f.kind() == Kind::Update),
            "{:?}",
            h.sent
        );
        // A timer that fires a minute late sends a heartbeat; its answer keeps the connection.
        h.sent.clear();
        h.now += 60_000;
        h.session.handle_timeout(h.now);
        h.pump();
        assert_eq!(h.sent, [Frame::Heartbeat]);
        assert_eq!(h.session.status(), Status::Open);
        h.now += 10;
        h.session.handle_frame(h.now, &Frame::Heartbeat.encode());
        h.now += 1_000;
        h.session.handle_timeout(h.now);
        assert_eq!(h.session.status(), Status::Open);
    }

    #[test]
    fn connect_gives_up_with_the_last_failure_as_its_reason() {
        let mut h = Harness::new();
        assert!(h.pump());
        h.session.handle_closed(10, 1006, "connection refused");
        let mut reasons = Vec::new();
        while h.now < 10_000 {
            h.now = h.session.poll_timeout().expect("a timer while it tries");
            h.session.handle_timeout(h.now);
            if h.pump() {
                h.session.handle_closed(h.now, 1006, "connection refused");
            }
            while let Some(event) = h.session.poll_event() {
                if let Event::Status { status, reason } = event {
                    reasons.push((status, reason));
                }
            }
            if h.session.is_closed() {
                break;
            }
        }
        let (status, reason) = reasons.last().unwrap();
        assert_eq!(*status, Status::Closed);
        let reason = reason.as_deref().unwrap();
        assert!(reason.contains("could not join within 5000 ms"), "{reason}");
        assert!(reason.contains("connection refused"), "{reason}");
        assert!(h.now <= 5_000, "gave up at {}", h.now);
    }

    #[test]
    fn a_sync_answer_does_not_outlive_its_connection() {
        let mut h = Harness::new();
        h.join(2, 1, &[7]);
        // Hold the pacer: a burst of messages, then a sync request from node 7.
        for _ in 0..200 {
            h.session
                .broadcast(h.now, Json::parse("1").unwrap())
                .unwrap();
        }
        h.pump();
        h.session.replica_mut().insert("t", 0, "x").unwrap();
        h.frame(Frame::stamped(
            Stamp {
                sender: 7,
                step: 500,
                pattern: PatternConfig::default().value(500),
            },
            Body::SyncRequest {
                doc: WHOLE_DOC.into(),
                state_vector: vec![0],
                to: 2,
            },
        ));
        h.session.handle_closed(h.now, 1006, "gone");
        h.sent.clear();
        h.now = h.session.poll_timeout().unwrap();
        h.session.handle_timeout(h.now);
        // Back as node 7: the answer to node 7 would now go to this client itself.
        h.join(7, 1, &[]);
        // Until the outbox is out (heartbeats go on for good).
        while let Some(at) = h.session.poll_timeout().filter(|&at| at < 20_000) {
            h.now = at.max(h.now + 1);
            h.session.handle_timeout(h.now);
            h.pump();
        }
        assert!(
            h.stamped()
                .iter()
                .all(|s| !matches!(s.body, Body::SyncState { .. })),
            "{:?}",
            h.sent
        );
    }

    #[test]
    fn a_sync_answer_the_relay_could_not_take_is_not_sent() {
        let mut h = Harness::new();
        h.relay.max_message = 10_000;
        h.join(2, 1, &[7]);
        let update = h
            .session
            .replica()
            .insert("t", 0, &"x".repeat(20_000))
            .unwrap();
        h.session.update(h.now, "t", update).ok();
        let kinds = h.sync_request(50, 2);
        assert!(!kinds.contains(&Kind::SyncState), "{kinds:?}");
    }

    /// A tab that closed offline while this one stayed open left an edit and a message unsent:
    /// taken in, the edit shows here at once (as a remote change), and both go out under this
    /// session's identity, the edit after this session's own.
    #[test]
    fn an_outbox_taken_in_while_running_shows_its_edits_and_sends_them() {
        let mut h = Harness::new();
        h.join(2, 1, &[]);
        let mine = h.session.replica().insert("t", 0, "mine ").unwrap();
        h.session.update(h.now, "t", mine).unwrap();
        let closed = SharedDoc::with_client_id(9);
        let theirs = closed.insert("t", 0, "theirs").unwrap();
        let other = Saved {
            sent: vec![Frame::stamped(
                Stamp {
                    sender: 3,
                    step: 4,
                    pattern: PatternConfig::default().value(4),
                },
                Body::Update {
                    doc: WHOLE_DOC.into(),
                    update: theirs,
                },
            )
            .encode()],
            unsent: vec![encode_unsent(Body::Data {
                data: Json::parse("1").unwrap(),
            })],
            ..Saved::default()
        };
        assert!(other.adoptable());
        while h.session.poll_event().is_some() {}
        assert_eq!(h.session.take_in(h.now, &other), 2);
        assert!(h.session.replica().text("t").contains("theirs"));
        let events: Vec<Event> = std::iter::from_fn(|| h.session.poll_event()).collect();
        assert!(events.contains(&Event::Remote), "{events:?}");
        h.now += 10_000;
        h.session.handle_timeout(h.now);
        h.pump();
        let stamped = h.stamped();
        let kinds: Vec<Kind> = stamped.iter().map(|s| s.body.kind()).collect();
        assert_eq!(kinds, [Kind::Update, Kind::Update, Kind::Data]);
        assert!(stamped.iter().all(|s| s.stamp.sender == 2));
        assert_eq!(h.session.pending(), 3);
    }

    /// The relay refuses an answer that holds what the room has not stored: while an update of
    /// this replica waits for its acknowledgement, a request gets no answer; once it is stored,
    /// it gets one.
    #[test]
    fn a_sync_answer_waits_for_none_while_an_update_of_this_replica_is_not_stored() {
        let mut h = Harness::new();
        h.join(2, 1, &[7]);
        let update = h.session.replica().insert("t", 0, "typed").unwrap();
        h.session.update(h.now, "t", update).unwrap();
        h.pump();
        let sent = h.stamped().last().map(|s| (*s).clone()).unwrap();
        assert!(matches!(sent.body, Body::Update { .. }));
        let kinds = h.sync_request(50, 0);
        assert!(!kinds.contains(&Kind::SyncState), "{kinds:?}");
        h.frame(Frame::Ack {
            step: sent.stamp.step,
            position: 1,
        });
        let kinds = h.sync_request(51, 0);
        assert!(kinds.contains(&Kind::SyncState), "{kinds:?}");
        // The relay refused that answer (this replica holds what the room has not stored): no
        // more answers on this connection.
        let answer = h
            .stamped()
            .into_iter()
            .find(|s| matches!(s.body, Body::SyncState { .. }))
            .map(|s| s.stamp.step)
            .unwrap();
        h.frame(Frame::Reject {
            step: answer,
            reason: Reason::Desync,
            detail: "the sync answer holds what the room has not stored".into(),
        });
        let kinds = h.sync_request(52, 0);
        assert!(!kinds.contains(&Kind::SyncState), "{kinds:?}");
    }

    /// A member that asks again and again (any member may ask, a read-only one too, and a
    /// request to 0 reaches everyone) has one answer waiting at a time, the latest. Each answer
    /// is the whole document: one queued per request held this replica's own edits back behind
    /// all of them, and the queue grew without bound (here 20 MB).
    /// A sync request whose state vector does not decode went to the document, whose failure
    /// then read as its own (an application's Y.Doc reported a `DocumentError` that named no
    /// one; the built-in document ignored it without a word). It is the asker's: an anomaly
    /// names it, and nothing is answered.
    #[test]
    fn a_sync_request_whose_state_vector_does_not_decode_is_the_askers_fault() {
        let mut h = Harness::new();
        h.join(2, 1, &[7]);
        h.anomalies();
        h.sent.clear();
        h.frame(Frame::stamped(
            Stamp {
                sender: 7,
                step: 1,
                pattern: PatternConfig::default().value(1),
            },
            Body::SyncRequest {
                doc: WHOLE_DOC.into(),
                state_vector: vec![0x05],
                to: 2,
            },
        ));
        h.now += 1_000;
        h.session.handle_timeout(h.now);
        h.pump();
        let anomalies = h.anomalies();
        assert_eq!(
            anomalies,
            ["node 7 asked for the document with a state vector that does not decode"]
        );
        assert!(h
            .stamped()
            .iter()
            .all(|s| !matches!(s.body, Body::SyncState { .. })));
        assert!(crate::doc::is_state_vector(&[0]));
        assert!(crate::doc::is_state_vector(&[1, 9, 3]));
        assert!(!crate::doc::is_state_vector(&[1, 9, 3, 0]));
        assert!(!crate::doc::is_state_vector(&[2, 9, 3]));
    }

    #[test]
    fn repeated_sync_requests_queue_one_answer_per_asker() {
        let mut h = Harness::new();
        h.join(2, 1, &[7]);
        let writer = SharedDoc::with_client_id(9);
        let update = writer.insert("t", 0, &"x".repeat(20_000)).unwrap();
        let stamp = |sender, step| Stamp {
            sender,
            step,
            pattern: PatternConfig::default().value(step),
        };
        h.frame(Frame::stamped(
            stamp(9, 1),
            Body::Update {
                doc: "content".into(),
                update,
            },
        ));
        for step in 2..1_002 {
            h.frame(Frame::stamped(
                stamp(7, step),
                Body::SyncRequest {
                    doc: WHOLE_DOC.into(),
                    state_vector: Vec::new(),
                    to: 0,
                },
            ));
        }
        // What the pacer let through at once went; what waits goes in the next seconds.
        h.sent.clear();
        for _ in 0..10 {
            h.now += 1_000;
            h.session.handle_timeout(h.now);
            h.pump();
        }
        let answers = |h: &Harness| {
            h.stamped()
                .iter()
                .filter(|s| matches!(s.body, Body::SyncState { .. }))
                .count()
        };
        assert_eq!(answers(&h), 1, "answers waiting after the requests");
        // An edit made now goes out at once.
        h.sent.clear();
        let update = h.session.replica().insert("t", 0, "typed").unwrap();
        h.session.update(h.now, "t", update).unwrap();
        h.pump();
        let kinds: Vec<Kind> = h.stamped().iter().map(|s| s.body.kind()).collect();
        assert_eq!(kinds, [Kind::Update]);
    }

    /// Taking the version walks the whole document, and a member may send checkpoints as fast
    /// as the relay lets it: each was compared with this replica, so one member could keep
    /// every other tab of a large document busy. A sender's checkpoints are compared at most
    /// once a second; another sender's are compared at once.
    #[test]
    fn a_senders_checkpoints_are_compared_at_most_once_a_second() {
        let doc = SharedDoc::new();
        let _ = doc.insert("t", 0, "text").unwrap();
        let replica = Counted::new(doc);
        let mut h = Harness::of(SessionConfig::new("r", "a"), replica);
        h.join(2, 1, &[7, 8]);
        let version = h.session.replica().doc.version();
        let checkpoint = || Body::Checkpoint {
            doc: WHOLE_DOC.into(),
            state_vector: version.state_vector.clone(),
            deletes: version.deletes,
            digest: 1,
        };
        let taken = |h: &Harness<Counted>| h.session.replica().versions.get();
        let before = taken(&h);
        for step in 2..52 {
            h.peer_sends(7, step, checkpoint());
        }
        assert_eq!(taken(&h) - before, 1, "50 checkpoints in a moment");
        h.peer_sends(8, 52, checkpoint());
        assert_eq!(taken(&h) - before, 2, "another sender's");
        h.now += CHECKPOINT_EVERY;
        h.peer_sends(7, 53, checkpoint());
        assert_eq!(taken(&h) - before, 3, "a second later");
    }

    /// A member sends checkpoint after checkpoint at this replica's version with a wrong
    /// digest (anyone can: the version is what every replica has). Each queued a whole-document
    /// repair request to it, without bound, in front of this replica's own edits. One waits.
    #[test]
    fn forged_checkpoints_queue_one_repair_request_per_sender() {
        let mut h = Harness::new();
        h.join(2, 1, &[7]);
        let update = h.session.replica().insert("t", 0, "text").unwrap();
        h.session.update(h.now, "t", update).unwrap();
        h.pump();
        let version = h.session.replica().version();
        for step in 2..1_002 {
            let body = Body::Checkpoint {
                doc: WHOLE_DOC.into(),
                state_vector: version.state_vector.clone(),
                deletes: version.deletes,
                digest: 1,
            };
            // Each compared, as if they came a second apart.
            h.session.compared.clear();
            h.peer_sends(7, step, body);
        }
        h.sent.clear();
        for _ in 0..10 {
            h.now += 1_000;
            h.session.handle_timeout(h.now);
            h.pump();
        }
        let repairs = h
            .stamped()
            .iter()
            .filter(|s| matches!(&s.body, Body::SyncRequest { to: 7, .. }))
            .count();
        assert_eq!(repairs, 1, "repair requests after the checkpoints");
    }

    /// The built-in document, counting the versions and digests taken of it.
    struct Counted {
        doc: SharedDoc,
        versions: std::cell::Cell<usize>,
        digests: std::cell::Cell<usize>,
    }

    impl Counted {
        fn new(doc: SharedDoc) -> Self {
            Self {
                doc,
                versions: std::cell::Cell::new(0),
                digests: std::cell::Cell::new(0),
            }
        }
    }

    impl Replica for Counted {
        fn apply_update(&mut self, update: &[u8]) -> Result<(), crate::doc::DocError> {
            Replica::apply_update(&mut self.doc, update)
        }
        fn state_vector(&self) -> Vec<u8> {
            Replica::state_vector(&self.doc)
        }
        fn diff(&self, remote: &[u8]) -> Result<Vec<u8>, crate::doc::DocError> {
            Replica::diff(&self.doc, remote)
        }
        fn version(&self) -> Version {
            self.versions.set(self.versions.get() + 1);
            Replica::version(&self.doc)
        }
        fn digest(&self) -> u64 {
            self.digests.set(self.digests.get() + 1);
            Replica::digest(&self.doc)
        }
        fn is_empty(&self) -> bool {
            Replica::is_empty(&self.doc)
        }
    }

    /// Every checkpoint at this replica's version calls for its digest, which walks every
    /// text; a member can send them at its frame rate, to every member. The digest is taken
    /// once per version.
    #[test]
    fn checkpoints_at_one_version_cost_one_digest() {
        let doc = SharedDoc::with_client_id(1);
        let counted = Counted::new(doc);
        let mut h = Harness::of(SessionConfig::new("r", "a"), counted);
        h.join(2, 1, &[7]);
        let update = h.session.replica().doc.insert("t", 0, "text").unwrap();
        h.session.update(h.now, "t", update).unwrap();
        h.pump();
        let version = h.session.replica().version();
        let digest = h.session.replica().doc.digest();
        let before = h.session.replica().digests.get();
        while h.session.poll_event().is_some() {}
        for step in 2..1_002 {
            let body = Body::Checkpoint {
                doc: WHOLE_DOC.into(),
                state_vector: version.state_vector.clone(),
                deletes: version.deletes,
                digest: if step % 2 == 0 { digest } else { 1 },
            };
            // A second apart: each is compared.
            h.now += CHECKPOINT_EVERY;
            h.peer_sends(7, step, body);
        }
        assert!(h.session.replica().digests.get() - before <= 1);
        // Half of them were forged: each is flagged.
        let desyncs = std::iter::from_fn(|| h.session.poll_event())
            .filter(|e| {
                matches!(
                    e,
                    Event::Anomaly(Anomaly {
                        reason: Reason::Desync,
                        ..
                    })
                )
            })
            .count();
        assert_eq!(desyncs, 500);
    }

    /// A state vector names each client once, and the relay refuses one over a frame as
    /// `tooLarge` (in a sync request or a checkpoint, it goes to every member). A replica of a
    /// document that many tabs wrote to asks for everything instead, and sends no checkpoint.
    #[test]
    fn a_state_vector_over_a_frame_asks_for_everything_and_sends_no_checkpoint() {
        let mut h = Harness::new();
        h.relay.max_frame = 1_024;
        for client in 10..400 {
            let writer = SharedDoc::with_client_id(client);
            let update = writer.insert("t", 0, "x").unwrap();
            h.session.replica_mut().apply_update(&update).unwrap();
        }
        assert!(h.session.replica().state_vector().len() > 1_024);
        h.join(2, 1, &[7]);
        // Past a phase: every replica checkpoints.
        for step in 1..=120 {
            let data = crate::wire::Json::parse("1").unwrap();
            h.peer_sends(7, step, Body::Signal { data });
        }
        h.now += 1_000;
        h.session.handle_timeout(h.now);
        h.pump();
        let sent = h.stamped();
        assert!(
            sent.iter().any(|s| matches!(&s.body,
                Body::SyncRequest { state_vector, to: 7, .. } if state_vector.is_empty())),
            "{sent:?}"
        );
        assert!(
            sent.iter().all(|s| match &s.body {
                Body::SyncRequest { state_vector, .. } => state_vector.len() <= 1_024,
                Body::Checkpoint { .. } => false,
                _ => true,
            }),
            "{sent:?}"
        );
    }

    /// A replica that holds back updates (they wait for one it never got) puts them in every
    /// diff, and the relay would refuse the answer: it gives none.
    #[test]
    fn a_replica_that_holds_updates_back_gives_no_sync_answer() {
        let mut h = Harness::new();
        h.join(2, 1, &[7]);
        let writer = SharedDoc::with_client_id(9);
        writer.insert("t", 0, "first").unwrap();
        let second = writer.insert("t", 5, " second").unwrap();
        h.session.replica_mut().apply_update(&second).unwrap();
        assert!(h.session.replica().has_pending());
        let kinds = h.sync_request(50, 0);
        assert!(!kinds.contains(&Kind::SyncState), "{kinds:?}");
    }

    #[test]
    fn updates_that_wait_for_the_pacer_are_merged() {
        let mut h = Harness::new();
        h.join(2, 1, &[]);
        for i in 0..1_000 {
            let update = h.session.replica().insert("t", i, "k").unwrap();
            h.session.update(h.now, "t", update).unwrap();
        }
        h.pump();
        h.now += 10_000;
        h.session.handle_timeout(h.now);
        h.pump();
        let updates = h
            .stamped()
            .iter()
            .filter(|s| matches!(s.body, Body::Update { .. }))
            .count();
        assert!(
            updates <= 101,
            "1,000 keystrokes went out as {updates} messages"
        );
        let check = SharedDoc::with_client_id(9);
        for s in h.stamped() {
            if let Body::Update { update, .. } = &s.body {
                check.apply_update(update).unwrap();
            }
        }
        assert_eq!(check.text("t"), "k".repeat(1_000));
    }

    /// A relay whose message limit is below the merge limit: updates that wait for the pacer
    /// merge only while the message fits. Merged past it, they went out as one message the
    /// relay refused for good, and every later edit of the tab with it.
    #[test]
    fn updates_that_wait_merge_only_within_the_relays_message_limit() {
        let mut h = Harness::new();
        h.relay = RelayLimits {
            max_frame: 2_048,
            max_message: 2_048,
            rate: 50,
            burst: 10,
            ..RelayLimits::default()
        };
        h.join(2, 1, &[]);
        for i in 0..2_000 {
            let update = h.session.replica().insert("t", i, "k").unwrap();
            h.session.update(h.now, "t", update).unwrap();
        }
        for _ in 0..200 {
            h.pump();
            h.now += 500;
            h.session.handle_timeout(h.now);
        }
        h.pump();
        let max = h.session.max_payload();
        let check = SharedDoc::with_client_id(9);
        for s in h.stamped() {
            assert!(
                s.body.encoded_len() <= max,
                "{} > {max}",
                s.body.encoded_len()
            );
            if let Body::Update { update, .. } = &s.body {
                check.apply_update(update).unwrap();
            }
        }
        assert_eq!(check.text("t").len(), 2_000);
    }

    /// The bound [`Session::check_insert`] checks holds for the largest ids and clocks Yjs
    /// writes, an insert between two items (both origins), and into a text of its own name.
    #[test]
    fn an_insert_makes_a_message_no_larger_than_check_insert_allows() {
        let writer = SharedDoc::with_client_id((1 << 53) - 1);
        let name = "a text with a rather long name, as an application may give one";
        for _ in 0..3 {
            writer.insert(name, 0, &"w".repeat(1_000)).unwrap();
        }
        let reader = SharedDoc::with_client_id((1 << 53) - 2);
        reader.apply_update(&writer.snapshot()).unwrap();
        reader.insert(name, 1_500, "between").unwrap();
        for len in [0, 1, 127, 128, 16_383, 16_384, 1 << 21] {
            let update = reader.insert(name, 1_502, &"é".repeat(len / 2)).unwrap();
            let body = Body::Update {
                doc: name.into(),
                update,
            };
            let bound = (len / 2 * 2) + INSERT_OVERHEAD + 2 * name.len();
            assert!(
                body.encoded_len() <= bound,
                "{len}: {} > {bound}",
                body.encoded_len()
            );
        }
    }

    #[test]
    fn a_refused_message_leaves_the_outbox_with_an_event_and_the_rest_is_sent_again_after_a_fence()
    {
        let mut h = Harness::new();
        h.join(2, 1, &[]);
        for i in 0..3 {
            h.session
                .broadcast(h.now, Json::parse(i.to_string()).unwrap())
                .unwrap();
        }
        h.pump();
        let steps: Vec<Step> = h.stamped().iter().map(|s| s.stamp.step).collect();
        h.sent.clear();
        h.frame(Frame::Ack {
            step: steps[0],
            position: 1,
        });
        h.frame(Frame::Reject {
            step: steps[1],
            reason: Reason::Stale,
            detail: "too old".into(),
        });
        h.frame(Frame::Reject {
            step: steps[2],
            reason: Reason::OutOfOrder,
            detail: "gap".into(),
        });
        let events: Vec<Event> = std::iter::from_fn(|| h.session.poll_event()).collect();
        assert!(events.iter().any(|e| matches!(
            e,
            Event::Refused {
                reason: Reason::Stale,
                ..
            }
        )));
        assert_eq!(h.sent[0], Frame::Fence { step: steps[1] });
        let again: Vec<Step> = h.stamped().iter().map(|s| s.stamp.step).collect();
        assert_eq!(again, [steps[2]], "the third, with its stamp");
        assert_eq!(h.session.pending(), 1);
    }
}
