//! The room: the relay's side of the protocol as a state machine, with no IO.
//!
//! A [`RoomCore`] admits members, reads their frames (putting parts back together), applies the
//! rate limit and the validator, hands durable messages to the store, and, once the store says a
//! message is durable, acknowledges it to its sender and fans it out. The driver (the relay's
//! room task, or the simulation) feeds it inputs with the time in milliseconds and carries out
//! its [`Output`]s in order: send frames to members, append to the store, register nodes, close
//! sockets.
//!
//! Rules the room keeps, whatever a member sends:
//!
//! - every frame is checked before it moves anything: a frame that claims a log position (only
//!   the relay sets one) is refused before the validator sees it;
//! - a connection's frames are taken in order: after the room refuses one (for any reason but
//!   `replay`), it refuses every later stamped frame of that connection as `outOfOrder` until
//!   the client sends a fence, which the room echoes. So the stored messages of a node are always
//!   a prefix of what it sent, and a `replay` answer to a message sent again means "stored";
//! - a message is acknowledged, with its own step, only once it is durable; appends finish in
//!   the order they were handed out, and that order is the log's;
//! - checkpoints and the sync exchange are validated and forwarded, never stored;
//! - the room step moves by one for each message everyone receives whose step is above it,
//!   whatever that step (see [`crate::clock`]): a member cannot drag it forward.

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;

use crate::pace::TokenBucket;
use crate::pattern::Step;
use crate::store::{Appended, NodeRecord, RoomRecord, StoreError};
use crate::validate::{Counters, Origin, Validator, ValidatorConfig, Verdict};
use crate::wire::part::{self, Reassembler};
use crate::wire::{
    close, peek_stamp, with_position, Frame, Limits, NodeId, Peer, Positioned, Reason, RelayLimits,
    ResumeToken, RoomConfig, Stamp, Stamped,
};

/// A connection, as the driver names it. Each socket gets its own; a node that reconnects comes
/// back on a new one.
pub type ConnId = u64;

/// Consecutive frames that do not decode after which a connection is closed.
pub const MAX_MALFORMED: u32 = 16;

/// What the relay enforces in a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoomLimits {
    /// Decoder limits: frame, message and name sizes.
    pub limits: Limits,
    /// Frames a connection may send per second, on average.
    pub rate: u64,
    /// Frames a connection may send at once, above the average.
    pub burst: u64,
    /// The most members at once.
    pub max_members: usize,
}

impl Default for RoomLimits {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            rate: 200,
            burst: 200,
            max_members: 256,
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
}

/// What a [`Reader`] made of one binary message.
#[derive(Debug, Clone, PartialEq)]
pub enum Read {
    /// A part of a message still in progress: nothing for the room yet.
    Pending,
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
}

impl Reader {
    /// A reader for a room with these limits.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            reassembler: Reassembler::new(),
        }
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
                let step = first
                    .then(|| peek_stamp(&piece).map(|(_, s)| s.step))
                    .flatten()
                    .unwrap_or(0);
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
}

/// A durable message for the store.
#[derive(Debug, Clone, PartialEq)]
pub struct Append {
    /// The sender.
    pub sender: NodeId,
    /// Its step.
    pub step: Step,
    /// The room's high step with this message.
    pub high: Step,
    /// The document of an update or snapshot.
    pub doc: Option<String>,
    /// Whether it is a snapshot (after which older entries of `doc` may be dropped).
    pub snapshot: bool,
    /// The frame as the sender sent it, without a position: the store puts the position it
    /// assigns in the header of what it logs.
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
    /// Record a new node and its resume token in the store (before any of its appends).
    Register(NodeRecord),
    /// Append a message to the store; answer with [`RoomCore::appended`], in order.
    Append(Append),
    /// The room cannot go on (its store failed): close every member with this reason and drop
    /// the room; the next join loads it again from the store.
    Stop {
        /// Why.
        reason: String,
    },
}

struct Member {
    node: NodeId,
    name: String,
    rate: TokenBucket,
    /// The step of the refusal that opened a gap, until the client's fence.
    gap: Option<Step>,
    malformed: u32,
    /// Messages in a row that found no token.
    over_rate: u64,
}

/// A validated message on its way out. Messages leave in the order they were accepted: a
/// checkpoint or a sync answer waits behind its sender's (and everyone's) earlier messages that
/// the store has not made durable yet, or receivers would see its step before theirs.
struct Pending {
    stamp: Stamp,
    bytes: Bytes,
    /// `None` for a durable message (it waits for the store); for one that is only forwarded,
    /// who it is for (`Some(None)`: everyone).
    forward: Option<Option<NodeId>>,
}

/// One room's state and decisions.
pub struct RoomCore {
    name: String,
    config: RoomConfig,
    limits: RoomLimits,
    validator: Validator,
    high: Step,
    /// The last position fanned out.
    published: u64,
    /// The identity of the room's log.
    log: u64,
    members: HashMap<ConnId, Member>,
    by_node: HashMap<NodeId, ConnId>,
    tokens: HashMap<ResumeToken, NodeId>,
    next_node: NodeId,
    pending: VecDeque<Pending>,
    outputs: VecDeque<Output>,
    stopped: bool,
}

impl RoomCore {
    /// The room `name` as the store knows it.
    pub fn new(
        name: String,
        record: RoomRecord,
        limits: RoomLimits,
        now: u64,
    ) -> Result<Self, crate::pattern::ConfigError> {
        let config = record.config;
        let mut validator_config = ValidatorConfig::for_room(&config)?;
        validator_config.max_senders = validator_config.max_senders.max(limits.max_members * 4);
        let mut validator = Validator::new(validator_config);
        let mut tokens = HashMap::new();
        let mut next_node = 1;
        for node in record.nodes {
            validator.restore(node.node, node.last_step, now);
            tokens.insert(node.token, node.node);
            next_node = next_node.max(node.node + 1);
        }
        next_node = next_node.max(record.next_node);
        Ok(Self {
            name,
            config,
            limits,
            validator,
            high: record.high,
            published: record.position,
            log: record.log,
            members: HashMap::new(),
            by_node: HashMap::new(),
            tokens,
            next_node,
            pending: VecDeque::new(),
            outputs: VecDeque::new(),
            stopped: false,
        })
    }

    /// The next thing the driver must do.
    pub fn poll_output(&mut self) -> Option<Output> {
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

    /// The room's highest accepted step.
    pub fn high(&self) -> Step {
        self.high
    }

    /// The last position fanned out.
    pub fn published(&self) -> u64 {
        self.published
    }

    /// How many members are present.
    pub fn members(&self) -> usize {
        self.members.len()
    }

    /// Whether the room has no member and no append in flight: it may be dropped.
    pub fn is_idle(&self) -> bool {
        self.members.is_empty() && self.pending.is_empty()
    }

    /// Whether the room stopped after a store failure.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// The counts of every verdict and refusal so far.
    pub fn counters(&self) -> &Counters {
        self.validator.counters()
    }

    /// A new connection joins, resuming the node of its token if the room knows it.
    /// `fresh` is a random token for a new node (the room draws no randomness of its own).
    pub fn join(
        &mut self,
        now: u64,
        conn: ConnId,
        request: JoinRequest,
        fresh: ResumeToken,
    ) -> Result<Joined, JoinRefused> {
        let JoinRequest {
            name,
            since,
            log,
            resume,
        } = request;
        if self.stopped {
            return Err(JoinRefused {
                code: close::TRY_AGAIN_LATER,
                reason: "the room is restarting; try again".into(),
            });
        }
        let resumed = resume.and_then(|t| self.tokens.get(&t).copied());
        let replacing = resumed.and_then(|node| self.by_node.get(&node).copied());
        if replacing.is_none() && self.members.len() >= self.limits.max_members {
            return Err(JoinRefused {
                code: close::TRY_AGAIN_LATER,
                reason: format!(
                    "the room is full: at most {} members",
                    self.limits.max_members
                ),
            });
        }
        let (node, token) = match (resumed, resume) {
            (Some(node), Some(token)) => (node, token),
            _ => {
                let node = self.next_node;
                self.next_node += 1;
                self.tokens.insert(fresh, node);
                self.outputs.push_back(Output::Register(NodeRecord {
                    node,
                    token: fresh,
                    last_step: 0,
                }));
                (node, fresh)
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
        let peers = self
            .members
            .values()
            .map(|m| Peer {
                node: m.node,
                name: m.name.clone(),
            })
            .collect();
        let joined = Frame::PeerJoined {
            peer: Peer {
                node,
                name: name.clone(),
            },
        };
        self.outputs.push_back(Output::Fanout {
            except: Some(conn),
            bytes: Bytes::from(joined.encode()),
        });
        self.members.insert(
            conn,
            Member {
                node,
                name,
                rate: TokenBucket::new(self.limits.rate as f64, self.limits.burst as f64, now),
                gap: None,
                malformed: 0,
                over_rate: 0,
            },
        );
        self.by_node.insert(node, conn);
        let welcome = Frame::Welcome {
            node,
            resume: token,
            config: self.config,
            limits: self.limits.announced(),
            high: self.high,
            log: self.log,
            peers,
        };
        let caught_up = Frame::CaughtUp {
            high: self.high,
            position: self.published,
        };
        Ok(Joined {
            node,
            welcome: Bytes::from(welcome.encode()),
            from: if log != self.log || since > self.published {
                0
            } else {
                since
            },
            until: self.published,
            caught_up: Bytes::from(caught_up.encode()),
        })
    }

    /// The connection `conn` is gone.
    pub fn leave(&mut self, conn: ConnId) {
        if let Some(member) = self.members.remove(&conn) {
            self.forget_member(&member);
        }
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
            self.forget_member(&member);
        }
    }

    fn forget_member(&mut self, member: &Member) {
        self.by_node.remove(&member.node);
        let left = Frame::PeerLeft { node: member.node };
        self.outputs.push_back(Output::Fanout {
            except: None,
            bytes: Bytes::from(left.encode()),
        });
    }

    /// What `conn`'s [`Reader`] made of a binary message.
    ///
    /// The rate limit counts messages, not frames: the parts of a large message are put
    /// together first (at most the message limit), and the whole costs one token per part when
    /// its last part is in. A fence always goes through: it is how a client leaves a gap.
    pub fn receive(&mut self, now: u64, conn: ConnId, read: Read) {
        let (positioned, bytes, cost) = match read {
            Read::Pending => return,
            Read::Refused {
                step,
                reason,
                detail,
            } => return self.malformed(conn, step, reason, detail),
            Read::Frame { frame, bytes, cost } => (frame, bytes, cost),
        };
        let Some(member) = self.members.get_mut(&conn) else {
            return;
        };
        member.malformed = 0;
        if let Frame::Fence { step } = positioned.frame {
            // A fence that ends a gap is free: it must never be what starves the message
            // sent again after it. One that ends nothing costs a token like any frame.
            if member.gap.take().is_none() {
                member.rate.try_take(now);
            }
            self.outputs.push_back(Output::Send {
                to: conn,
                bytes: Bytes::from(Frame::Fence { step }.encode()),
            });
            return;
        }
        if !member.rate.try_take_n(cost, now) {
            let step = positioned.frame.stamp().map_or(0, |s| s.step);
            member.over_rate += 1;
            // More than a second's worth of messages in a row without a token: the client does
            // not pace itself, whatever it is told.
            if member.over_rate > self.limits.rate + self.limits.burst {
                self.validator.record(Reason::RateLimited);
                return self.drop_member(
                    conn,
                    close::RATE_LIMITED,
                    "kept sending over the rate limit",
                );
            }
            if member.gap.is_some() {
                let detail = "an earlier frame of this connection was refused: send a fence".into();
                return self.refuse(conn, step, Reason::OutOfOrder, detail);
            }
            let detail = format!(
                "over {} frames per second; this message was not stored: send it again later",
                self.limits.rate
            );
            return self.refuse(conn, step, Reason::RateLimited, detail);
        }
        member.over_rate = 0;
        if positioned.position.is_some() {
            let step = positioned.frame.stamp().map_or(0, |s| s.step);
            let detail = "the frame carries a log position; only the relay sets one".into();
            return self.refuse(conn, step, Reason::Malformed, detail);
        }
        match positioned.frame {
            Frame::Stamped(stamped) => self.stamped(now, conn, stamped, bytes),
            Frame::Presence { sender, .. } => {
                let node = self.members.get(&conn).map_or(0, |m| m.node);
                if sender != node {
                    let detail = format!("sender {sender} is not this connection's node id {node}");
                    return self.refuse(conn, 0, Reason::SenderMismatch, detail);
                }
                self.outputs.push_back(Output::Fanout {
                    except: Some(conn),
                    bytes,
                });
            }
            other => {
                let detail = format!(
                    "a {} frame is not accepted after the join; send stamped frames, presence or fences",
                    other.kind()
                );
                self.refuse(conn, 0, Reason::Unexpected, detail);
            }
        }
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
            if let Some(member) = self.members.get_mut(&conn) {
                member.gap.get_or_insert(step);
            }
        }
        let mut detail = detail;
        let max = self.limits.limits.max_detail;
        if detail.len() > max {
            let mut end = max;
            while !detail.is_char_boundary(end) {
                end -= 1;
            }
            detail.truncate(end);
        }
        let frame = Frame::Reject {
            step,
            reason,
            detail,
        };
        self.outputs.push_back(Output::Send {
            to: conn,
            bytes: Bytes::from(frame.encode()),
        });
    }

    fn stamped(&mut self, now: u64, conn: ConnId, stamped: Stamped, bytes: Bytes) {
        let Some(member) = self.members.get(&conn) else {
            return;
        };
        let node = member.node;
        let stamp = stamped.stamp;
        if let Some(gap) = member.gap {
            let detail = format!(
                "step {gap} of this connection was refused: send a fence, then send again from there"
            );
            return self.refuse(conn, stamp.step, Reason::OutOfOrder, detail);
        }
        let origin = Origin::Connection(node);
        if let Verdict::Rejected(reason) = self.validator.check(&stamp, origin, self.high, now) {
            let detail = self.validator.explain(&stamp, origin, self.high, reason);
            return self.reject(conn, stamp.step, reason, detail);
        }
        let body = &stamped.body;
        // The room step counts what everyone receives: a message above it moves it by one,
        // whatever its step (see `crate::clock`), so that no member can drag it forward.
        if stamp.step > self.high && body.recipient().is_none() {
            self.high += 1;
        }
        if !body.is_durable() {
            if self.pending.is_empty() {
                return self.forward(conn, body.recipient(), &bytes);
            }
            return self.pending.push_back(Pending {
                stamp,
                bytes,
                forward: Some(body.recipient()),
            });
        }
        let (doc, snapshot) = match body {
            crate::wire::Body::Snapshot { doc, .. } => (Some(doc.clone()), true),
            other => (other.doc().map(str::to_owned), false),
        };
        self.outputs.push_back(Output::Append(Append {
            sender: node,
            step: stamp.step,
            high: self.high,
            doc,
            snapshot,
            bytes: bytes.clone(),
        }));
        self.pending.push_back(Pending {
            stamp,
            bytes,
            forward: None,
        });
    }

    /// Sends `bytes` (one message) to `to`'s connection, or to everyone but `from`; larger than
    /// a frame, it goes in parts.
    fn forward(&mut self, from: ConnId, to: Option<NodeId>, bytes: &Bytes) {
        let target = match to {
            Some(node) => match self.by_node.get(&node) {
                Some(&conn) => Some(conn),
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

    /// The store's answer for the oldest append still in flight.
    pub fn appended(&mut self, result: Result<Appended, StoreError>) {
        let Some(pending) = self.pending.pop_front() else {
            return;
        };
        debug_assert!(
            pending.forward.is_none(),
            "the head of the queue is an append"
        );
        self.answer(pending, result);
        // What was only waiting for its turn goes now.
        while self.pending.front().is_some_and(|p| p.forward.is_some()) {
            let Some(Pending {
                stamp,
                bytes,
                forward: Some(to),
            }) = self.pending.pop_front()
            else {
                break;
            };
            if self.stopped {
                continue;
            }
            let from = self.by_node.get(&stamp.sender).copied().unwrap_or(0);
            self.forward(from, to, &bytes);
        }
    }

    fn answer(&mut self, pending: Pending, result: Result<Appended, StoreError>) {
        let conn = self.by_node.get(&pending.stamp.sender).copied();
        match result {
            Ok(Appended::Stored { position }) => {
                self.published = position;
                if let Some(conn) = conn {
                    let ack = Frame::Ack {
                        step: pending.stamp.step,
                        position,
                    };
                    self.outputs.push_back(Output::Send {
                        to: conn,
                        bytes: Bytes::from(ack.encode()),
                    });
                }
                let positioned = with_position(&pending.bytes, position)
                    .map(Bytes::from)
                    .unwrap_or(pending.bytes);
                self.forward(conn.unwrap_or(0), None, &positioned);
            }
            // Another relay stored this step first.
            Ok(Appended::Refused {
                reason: Reason::Replay,
                detail,
            }) => {
                if let Some(conn) = conn {
                    self.refuse(conn, pending.stamp.step, Reason::Replay, detail);
                }
            }
            Ok(Appended::Refused { reason, detail }) => {
                if let Some(conn) = conn {
                    self.refuse(conn, pending.stamp.step, reason, detail.clone());
                }
                self.stop(format!("the store refused a message: {detail}"));
            }
            Err(error) => {
                if let Some(conn) = conn {
                    let detail = format!("the relay could not store the message: {error}");
                    self.refuse(conn, pending.stamp.step, Reason::Unavailable, detail);
                }
                self.stop(format!("the store failed: {error}"));
            }
        }
    }

    /// The validator already counted a failed append as its sender's; the only state to trust
    /// now is the store's. Every member goes; the next join loads the room again.
    fn stop(&mut self, reason: String) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        for (conn, _) in self.members.drain() {
            self.outputs.push_back(Output::Close {
                conn,
                code: close::INTERNAL,
                reason: "the room stopped; reconnect to resume".into(),
            });
        }
        self.by_node.clear();
        self.outputs.push_back(Output::Stop { reason });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pattern::PatternConfig;
    use crate::wire::{Body, Json};

    fn room() -> RoomCore {
        let record = RoomRecord::new(RoomConfig::default(), 1);
        RoomCore::new("r".into(), record, RoomLimits::default(), 0).unwrap()
    }

    fn req(name: &str, resume: Option<ResumeToken>) -> JoinRequest {
        JoinRequest {
            name: name.into(),
            since: 0,
            log: 0,
            resume,
        }
    }

    /// Hands `bytes` to the room as connection `conn`'s reader would.
    fn send(room: &mut RoomCore, now: u64, conn: ConnId, bytes: Bytes) {
        let read = Reader::new(Limits::default()).read(bytes);
        room.receive(now, conn, read);
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
        room.appended(Ok(Appended::Stored { position: 1 }));
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
                update: vec![1; 20_000],
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
}
