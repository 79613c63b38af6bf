//! One room: an actor task that owns the room's validator, clock and members.
//!
//! Every frame of the room passes through this one task, in order: it validates the frame with
//! the core [`Validator`], appends it to the store, and when the store says the message is
//! durable, acknowledges it to its sender and fans it out to the other members. Appends are
//! pipelined: many are in flight at once, so the store can commit them in one batch, and
//! `FuturesOrdered` releases them in log order. Fan-out never waits: each member has a bounded
//! queue, and a member whose queue is full is disconnected.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream::{FuturesOrdered, StreamExt};
use tokio::sync::{mpsc, oneshot};

use crate::envelope::{with_position, Frame, NodeId, Peer, Reason, ResumeToken, RoomConfig, Stamp};
use crate::pattern::Step;
use crate::validate::{Origin, Validator, ValidatorConfig, Verdict};

use super::queue;
use super::store::{Entry, SqliteStore};
use super::{close_code, Relay};

/// What a connection asks of its room.
pub(crate) enum Command {
    Join {
        name: String,
        resume: Option<ResumeToken>,
        conn: u64,
        reply: oneshot::Sender<Result<Joined, JoinRefused>>,
    },
    Frame {
        node: NodeId,
        frame: Frame,
        bytes: Bytes,
    },
    Leave {
        node: NodeId,
        conn: u64,
    },
}

/// A join that was refused, with the close code and reason to give the client.
#[derive(Debug)]
pub(crate) struct JoinRefused {
    pub code: u16,
    pub reason: String,
}

/// What a connection gets when it joins.
pub(crate) struct Joined {
    pub node: NodeId,
    pub token: ResumeToken,
    pub config: RoomConfig,
    pub high: Step,
    /// The last position already fanned out: catch-up replays the log up to here, and the
    /// queue carries everything after it.
    pub position: u64,
    pub peers: Vec<Peer>,
    /// The member's send queue, which also carries the reason the room lets it go.
    pub queue: queue::Receiver,
    /// Answers once the node's resume token is durable.
    pub registered: Option<oneshot::Receiver<Result<(), String>>>,
}

struct Member {
    name: String,
    conn: u64,
    queue: queue::Sender,
}

type Durable = Pin<Box<dyn Future<Output = (Stamp, u64, Bytes, Result<(), String>)> + Send>>;

pub(crate) struct Room {
    name: String,
    relay: Arc<Relay>,
    store: SqliteStore,
    config: RoomConfig,
    validator: Validator,
    high: Step,
    /// The last position assigned.
    position: u64,
    /// The last position fanned out.
    published: u64,
    members: HashMap<NodeId, Member>,
    tokens: HashMap<ResumeToken, NodeId>,
    next_node: NodeId,
    pending: FuturesOrdered<Durable>,
}

impl Room {
    /// Loads the room from the store (creating it with `requested` settings, or the relay's
    /// defaults, if it is new).
    pub(crate) async fn open(
        name: String,
        relay: Arc<Relay>,
        requested: Option<RoomConfig>,
    ) -> Result<Room, String> {
        let store = relay.store.clone();
        let record = store.load_room(&name).await.map_err(|e| e.to_string())?;
        let config = match record.config {
            Some(config) => config,
            None => {
                let config = requested.unwrap_or(relay.config.room);
                store
                    .create_room(&name, config)
                    .await
                    .map_err(|e| e.to_string())?;
                config
            }
        };
        let mut validator_config = ValidatorConfig::for_room(&config).map_err(|e| e.to_string())?;
        validator_config.max_senders = validator_config
            .max_senders
            .max(relay.config.max_members * 4);
        let mut validator = Validator::new(validator_config);
        let now = relay.now_ms();
        let mut tokens = HashMap::new();
        let mut next_node = 1;
        for (node, token, last_step) in record.nodes {
            validator.restore(node, last_step, now);
            tokens.insert(token, node);
            next_node = next_node.max(node + 1);
        }
        Ok(Room {
            name,
            store,
            config,
            validator,
            high: record.high,
            position: record.position,
            published: record.position,
            members: HashMap::new(),
            tokens,
            next_node,
            pending: FuturesOrdered::new(),
            relay,
        })
    }

    /// Runs the room until it has no members, no pending writes and no queued commands.
    pub(crate) async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        loop {
            tokio::select! {
                command = commands.recv() => match command {
                    Some(command) => self.handle(command),
                    None => break,
                },
                Some((stamp, position, bytes, result)) = self.pending.next(), if !self.pending.is_empty() => {
                    if !self.durable(stamp, position, bytes, result) {
                        break;
                    }
                }
            }
            if self.members.is_empty()
                && self.pending.is_empty()
                && self.relay.retire(&self.name, &commands)
            {
                break;
            }
        }
        self.close_all(
            close_code::INTERNAL,
            "the room stopped; reconnect to resume",
        );
        tracing::debug!(room = %self.name, "room closed");
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Join {
                name,
                resume,
                conn,
                reply,
            } => {
                let result = self.join(name, resume, conn);
                if let Err(Ok(joined)) = reply.send(result) {
                    // The connection went away before it got its answer.
                    self.leave(joined.node, conn);
                }
            }
            Command::Frame { node, frame, bytes } => self.frame(node, frame, bytes),
            Command::Leave { node, conn } => self.leave(node, conn),
        }
    }

    fn join(
        &mut self,
        name: String,
        resume: Option<ResumeToken>,
        conn: u64,
    ) -> Result<Joined, JoinRefused> {
        let resumed = resume.and_then(|t| self.tokens.get(&t).copied());
        if resumed.is_none_or(|node| !self.members.contains_key(&node))
            && self.members.len() >= self.relay.config.max_members
        {
            return Err(JoinRefused {
                code: close_code::TRY_AGAIN_LATER,
                reason: format!(
                    "the room is full: at most {} members",
                    self.relay.config.max_members
                ),
            });
        }
        let (node, token, registered) = match resumed {
            Some(node) => {
                if let Some(old) = self.members.remove(&node) {
                    old.queue.set_close(
                        close_code::REPLACED,
                        "replaced by a newer connection of the same node",
                    );
                }
                (node, resume.unwrap_or_default(), None)
            }
            None => {
                let node = self.next_node;
                self.next_node += 1;
                let mut token = ResumeToken::default();
                if getrandom::fill(&mut token).is_err() {
                    return Err(JoinRefused {
                        code: close_code::INTERNAL,
                        reason: "no randomness for a resume token".into(),
                    });
                }
                self.tokens.insert(token, node);
                let store = self.store.clone();
                let room = self.name.clone();
                let (tx, rx) = oneshot::channel();
                tokio::spawn(async move {
                    let result = store
                        .add_node(&room, node, token)
                        .await
                        .map_err(|e| e.to_string());
                    let _ = tx.send(result);
                });
                (node, token, Some(rx))
            }
        };
        let peers = self
            .members
            .iter()
            .map(|(&node, m)| Peer {
                node,
                name: m.name.clone(),
            })
            .collect();
        let joined_frame = Bytes::from(
            Frame::PeerJoined {
                peer: Peer {
                    node,
                    name: name.clone(),
                },
            }
            .encode(),
        );
        self.fan_out(node, &joined_frame);
        let (queue, rx) = queue::queue(self.relay.config.send_queue);
        self.members.insert(node, Member { name, conn, queue });
        Ok(Joined {
            node,
            token,
            config: self.config,
            high: self.high,
            position: self.published,
            peers,
            queue: rx,
            registered,
        })
    }

    fn leave(&mut self, node: NodeId, conn: u64) {
        if self.members.get(&node).is_some_and(|m| m.conn == conn) {
            self.members.remove(&node);
            self.announce_left(node);
        }
    }

    fn announce_left(&mut self, node: NodeId) {
        let left = Bytes::from(Frame::PeerLeft { node }.encode());
        self.fan_out(node, &left);
    }

    fn reject(&mut self, node: NodeId, step: Step, reason: Reason, detail: String) {
        self.relay.metrics.reject(reason);
        let frame = Frame::Reject {
            step,
            reason,
            detail,
        };
        self.send_to(node, Bytes::from(frame.encode()));
    }

    fn frame(&mut self, node: NodeId, frame: Frame, bytes: Bytes) {
        if !self.members.contains_key(&node) {
            return;
        }
        if let Frame::Presence { sender, .. } = &frame {
            if *sender != node {
                let detail = format!("sender {sender} is not this connection's node id {node}");
                return self.reject(node, 0, Reason::SenderMismatch, detail);
            }
            return self.fan_out(node, &bytes);
        }
        let Some(&stamp) = frame.stamp() else {
            let detail = format!(
                "a {:?} frame is not accepted after the join; send stamped frames or presence",
                frame.kind()
            );
            return self.reject(node, 0, Reason::Unexpected, detail);
        };
        let origin = Origin::Connection(node);
        let now = self.relay.now_ms();
        if let Verdict::Rejected(reason) = self.validator.check(&stamp, origin, self.high, now) {
            let detail = self.validator.explain(&stamp, origin, self.high, reason);
            return self.reject(node, stamp.step, reason, detail);
        }
        self.high = self.high.max(stamp.step);
        self.position += 1;
        let position = self.position;
        let Some(positioned) = with_position(&bytes, position) else {
            let detail = "the frame already carries a log position; only the relay sets one".into();
            return self.reject(node, stamp.step, Reason::Malformed, detail);
        };
        let positioned = Bytes::from(positioned);
        let (doc, snapshot) = match &frame {
            Frame::Snapshot { doc, .. } => (Some(doc.clone()), true),
            Frame::Update { doc, .. }
            | Frame::SyncState { doc, .. }
            | Frame::Checkpoint { doc, .. }
            | Frame::SyncRequest { doc, .. } => (Some(doc.clone()), false),
            _ => (None, false),
        };
        let durable = self.store.append(Entry {
            room: self.name.clone(),
            position,
            sender: node,
            step: stamp.step,
            high: self.high,
            doc,
            snapshot,
            bytes: positioned.clone(),
        });
        self.pending.push_back(Box::pin(async move {
            let result = durable
                .await
                .unwrap_or_else(|_| Err("the store stopped".into()));
            (stamp, position, positioned, result)
        }));
    }

    /// A message is durable (or failed to be): acknowledge it and fan it out. Returns false when
    /// the room must stop.
    fn durable(
        &mut self,
        stamp: Stamp,
        position: u64,
        bytes: Bytes,
        result: Result<(), String>,
    ) -> bool {
        if let Err(error) = result {
            // The validator already counted this step as the sender's; the only state to trust
            // now is the store's. Stop the room: the next join reloads it from disk.
            tracing::error!(room = %self.name, %error, "a message could not be stored; closing the room");
            self.reject(
                stamp.sender,
                stamp.step,
                Reason::Unavailable,
                format!("the relay could not store the message: {error}"),
            );
            return false;
        }
        self.published = position;
        self.relay
            .metrics
            .accepted
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ack = Frame::Ack {
            step: stamp.step,
            position,
        };
        self.send_to(stamp.sender, Bytes::from(ack.encode()));
        self.fan_out(stamp.sender, &bytes);
        true
    }

    fn send_to(&mut self, node: NodeId, bytes: Bytes) {
        let full = match self.members.get(&node) {
            Some(member) => matches!(member.queue.try_send(bytes), Err(queue::SendError::Full)),
            None => false,
        };
        if full {
            self.drop_slow(node);
        }
    }

    /// Sends `bytes` to every member but `except`. Members whose queue is full are cut off.
    fn fan_out(&mut self, except: NodeId, bytes: &Bytes) {
        let mut slow = Vec::new();
        for (&node, member) in &self.members {
            if node == except {
                continue;
            }
            if let Err(queue::SendError::Full) = member.queue.try_send(bytes.clone()) {
                slow.push(node);
            }
        }
        for node in slow {
            self.drop_slow(node);
        }
    }

    fn drop_slow(&mut self, node: NodeId) {
        if let Some(member) = self.members.remove(&node) {
            self.relay
                .metrics
                .slow_consumers
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(room = %self.name, node, "send queue full: disconnecting a slow consumer");
            member.queue.set_close(
                close_code::SLOW_CONSUMER,
                "send queue full: the connection did not keep up with the room",
            );
            self.announce_left(node);
        }
    }

    fn close_all(&mut self, code: u16, reason: &str) {
        for (_, member) in self.members.drain() {
            member.queue.set_close(code, reason);
        }
    }
}
