//! Where room logs live: the [`Store`] trait, and [`MemoryStore`], the implementation in memory
//! for tests and the simulation. The relay's embedded SQLite store implements the same trait.
//!
//! A store keeps, per room: its settings, its step and last log position, the next node id it
//! may hand out, one record per node that stored something (its resume token, its last stored
//! step, which is what keeps replay protection across restarts, and when it was last seen), and
//! the log itself. Its promises:
//!
//! - an append is answered once it is durable, and only then; it records its sender's token and
//!   step with it;
//! - appends of one room are positioned in the order they were handed to the store (1, 2, ...);
//! - once an append of a room fails, every later append of that room fails too, until the room
//!   is opened again: a node's stored messages stay a prefix of what it sent, which is what lets
//!   a client read `replay` as "stored". (A room reopens only after its failed appends are all
//!   answered.) A failing append fails only its own room;
//! - node ids are reserved in blocks, durably, before the room hands any of them out: an id is
//!   never handed out twice, whatever happens to the relay;
//! - the relay's snapshot of a document drops the older entries of that document (of every
//!   document for `*`); data entries are never dropped;
//! - every method answers with a typed [`StoreError`] rather than panicking.
//!
//! The methods return boxed futures that own what they need, so a driver can keep many appends
//! in flight while it goes on with other work; nothing here names a runtime.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::pattern::Step;
use crate::room::Append;
use crate::wire::{with_position, NodeId, Reason, ResumeToken, RoomConfig, WHOLE_DOC};

/// What a store knows of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeRecord {
    /// The node's id in its room.
    pub node: NodeId,
    /// The token that resumes it.
    pub token: ResumeToken,
    /// The user its member's access token named ([`crate::room::Access::user`], 0 on a relay
    /// without tokens): the token resumes it for that user only.
    pub user: u64,
    /// The last step of it that was stored.
    pub last_step: Step,
    /// The log position of that message, where the store keeps it (a store that several relays
    /// share does; 0 otherwise).
    pub position: u64,
}

/// What a store knows of a room, as it opens it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomRecord {
    /// Its settings.
    pub config: RoomConfig,
    /// Its step with its last stored message.
    pub high: Step,
    /// Its last log position.
    pub position: u64,
    /// The node ids `next_node..nodes_end` are reserved for this opening of the room: no other
    /// opening, before or after, hands them out.
    pub next_node: NodeId,
    /// See `next_node`.
    pub nodes_end: NodeId,
    /// The identity of this room's log, chosen by the store when it creates the room: a store
    /// that lost a room and creates it again gives it a new one.
    pub log: u64,
    /// Bytes its log holds.
    pub bytes: u64,
}

impl RoomRecord {
    /// A new, empty room whose log is `log`, with the first block of node ids.
    pub fn new(config: RoomConfig, log: u64) -> Self {
        Self {
            config,
            high: 0,
            position: 0,
            next_node: 1,
            nodes_end: 1 + crate::room::NODE_BLOCK,
            log,
            bytes: 0,
        }
    }
}

/// One logged message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Logged {
    /// Its position.
    pub position: u64,
    /// Its sender.
    pub sender: NodeId,
    /// The frame, with its position in the header: what a client receives.
    pub bytes: Bytes,
}

/// An entry of a room's log as a relay that follows the log of a shared store reads it (see
/// [`crate::room::RoomCore::share`]): what [`Logged`] holds, with the stamp's step and the room's
/// step after it, so that every relay's room moves as the log does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Followed {
    /// Its position.
    pub position: u64,
    /// Its sender (0: a relay's snapshot).
    pub sender: NodeId,
    /// Its step (0 for a snapshot).
    pub step: Step,
    /// The room's step with it.
    pub high: Step,
    /// For a snapshot: the last log position it holds (0 otherwise).
    pub covers: u64,
    /// The frame, with its position in the header: what a client receives.
    pub bytes: Bytes,
}

/// The store's answer to an append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Appended {
    /// Durable, at this position.
    Stored {
        /// The message's log position.
        position: u64,
        /// The bytes the room's log holds now.
        bytes: u64,
    },
    /// Not stored: a store that several relays share stored this step of the sender before
    /// (through another relay); the sender's last stored message is at `position`. Read as a
    /// `replay` refusal.
    Replayed {
        /// The log position of the sender's last stored message.
        position: u64,
        /// What exactly.
        detail: String,
    },
    /// Not stored, for a reason that concerns this message alone.
    Refused {
        /// Why.
        reason: Reason,
        /// What exactly.
        detail: String,
    },
}

/// A store that failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The storage engine reported an error.
    #[error("storage error: {0}")]
    Backend(String),
    /// The store is closed (the relay is shutting down).
    #[error("the store is closed")]
    Closed,
    /// A stored value could not be read back, or cannot be stored.
    #[error("corrupt or unstorable value: {0}")]
    Corrupt(String),
}

/// A store operation in flight.
pub type StoreFuture<T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'static>>;

/// Where room logs live.
pub trait Store: Send + Sync + 'static {
    /// Opens `room`, creating it with `config` unless it exists, and reserves a block of
    /// [`crate::room::NODE_BLOCK`] node ids for this opening; answers once that is durable.
    /// Appends of the room that failed before fail no more.
    fn open_room(&self, room: &str, config: RoomConfig) -> StoreFuture<RoomRecord>;
    /// Whether `room` was ever opened (its record or its log is kept), without opening it.
    fn room_exists(&self, room: &str) -> StoreFuture<bool>;
    /// Reserves `count` more node ids for `room`, durably; answers the first.
    fn reserve_nodes(&self, room: &str, count: u64) -> StoreFuture<NodeId>;
    /// The node of `room` that `token` resumes, if the store keeps its record.
    fn find_node(&self, room: &str, token: ResumeToken) -> StoreFuture<Option<NodeRecord>>;
    /// Appends a message to `room`'s log, with its sender's record; answers once it is durable.
    fn append(&self, room: &str, entry: Append) -> StoreFuture<Appended>;
    /// The document entries of `room`'s log in order: its last snapshot, if any, then every
    /// update after it. What the room applies to its document when it opens.
    fn read_document(&self, room: &str) -> StoreFuture<Vec<Logged>>;
    /// The log of `room` after position `since`, up to and including `until`, in order: at most
    /// about `max_bytes` (always at least one entry if there is one).
    fn read_after(
        &self,
        room: &str,
        since: u64,
        until: u64,
        max_bytes: usize,
    ) -> StoreFuture<Vec<Logged>>;
    /// Deletes the records of nodes not seen (no message stored) for `ttl`; answers how many.
    /// A node whose record is gone gets a new id and token when it comes back, and its client
    /// sends what it had not seen acknowledged again under them.
    fn expire_nodes(&self, ttl: std::time::Duration) -> StoreFuture<u64>;
    /// Finishes pending writes and stops.
    fn close(&self) -> StoreFuture<()>;
}

#[derive(Debug, Clone)]
struct MemoryRoom {
    record: RoomRecord,
    log: Vec<Logged>,
    /// For each logged entry: its document (for compaction).
    docs: Vec<Option<String>>,
    /// The records of the nodes that stored something, by token.
    nodes: HashMap<ResumeToken, NodeRecord>,
    /// The step, the room's step and what a snapshot covers, of each entry a shared room
    /// logged (see [`MemoryStore::append_shared_now`]), by position.
    stamps: HashMap<u64, (Step, Step, u64)>,
    /// The relay that compacts a shared room, and until when (milliseconds).
    lease: Option<(u64, u64)>,
    /// The last position a shared room's snapshots hold.
    covered: u64,
}

impl MemoryRoom {
    fn bytes(&self) -> u64 {
        self.log.iter().map(|l| l.bytes.len() as u64).sum()
    }
}

#[derive(Debug, Default)]
struct MemoryState {
    rooms: HashMap<String, MemoryRoom>,
    /// Rooms whose appends fail until they are opened again.
    failed: std::collections::HashSet<String>,
    /// Fail the next append, as a full disk would.
    fail_next: bool,
    /// Where the log identities of the rooms it creates start (see [`MemoryStore::with_log_seed`]).
    log_seed: u64,
}

/// A store in memory: for tests and the simulation. It is durable for as long as it lives.
#[derive(Debug, Clone, Default)]
pub struct MemoryStore {
    state: Arc<Mutex<MemoryState>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty store whose rooms' log identities start from `seed`: a random one where the
    /// store serves clients. A relay on memory that restarts lost every room; with identities
    /// that start over, its first room would have the identity the lost one had, and its
    /// clients would take the new, empty log for the one they hold and not give their documents
    /// back. (The store draws no randomness of its own.)
    pub fn with_log_seed(seed: u64) -> Self {
        let store = Self::default();
        store.state().log_seed = seed;
        store
    }

    fn with<T>(&self, f: impl FnOnce(&mut HashMap<String, MemoryRoom>) -> T) -> T {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut state.rooms)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, MemoryState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes the next append fail, as a full disk would (for tests).
    pub fn fail_next_append(&self) {
        self.state().fail_next = true;
    }

    /// Opens `room` now (the memory store needs no waiting).
    pub fn open_now(&self, room: &str, config: RoomConfig) -> RoomRecord {
        // Every room this process creates gets a log identity of its own, from 1 to 2^53 - 1
        // (a safe integer in JS).
        static NEXT_LOG: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        const LOGS: u64 = (1 << 53) - 1;
        let seed = {
            let mut state = self.state();
            state.failed.remove(room);
            state.log_seed
        };
        self.with(|rooms| {
            let room = rooms.entry(room.to_owned()).or_insert_with(|| MemoryRoom {
                record: RoomRecord::new(
                    config,
                    1 + (seed % LOGS + NEXT_LOG.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
                        % LOGS,
                ),
                log: Vec::new(),
                docs: Vec::new(),
                nodes: HashMap::new(),
                stamps: HashMap::new(),
                lease: None,
                covered: 0,
            });
            let mut record = room.record.clone();
            record.nodes_end = record.next_node + crate::room::NODE_BLOCK;
            room.record.next_node = record.nodes_end;
            record.bytes = room.bytes();
            record
        })
    }

    /// Reserves node ids now.
    pub fn reserve_now(&self, room: &str, count: u64) -> Result<NodeId, StoreError> {
        self.with(|rooms| {
            let room = rooms
                .get_mut(room)
                .ok_or_else(|| StoreError::Corrupt(format!("no room {room:?}")))?;
            let first = room.record.next_node;
            room.record.next_node += count;
            Ok(first)
        })
    }

    /// Looks a node up now.
    pub fn find_now(&self, room: &str, token: ResumeToken) -> Option<NodeRecord> {
        self.with(|rooms| rooms.get(room)?.nodes.get(&token).copied())
    }

    /// Appends now.
    pub fn append_now(&self, room: &str, entry: Append) -> Result<Appended, StoreError> {
        self.append_upto(room, entry, None)
    }

    /// Appends; a snapshot drops the entries of its document up to position `covers` (all of
    /// them before it for `None`).
    fn append_upto(
        &self,
        room: &str,
        entry: Append,
        covers: Option<u64>,
    ) -> Result<Appended, StoreError> {
        let mut state = self.state();
        if std::mem::take(&mut state.fail_next) {
            state.failed.insert(room.to_owned());
            return Err(StoreError::Backend("the disk is full".into()));
        }
        if state.failed.contains(room) {
            return Err(StoreError::Backend(
                "an earlier append of this room failed; open the room again".into(),
            ));
        }
        drop(state);
        self.with(|rooms| {
            let room = rooms
                .get_mut(room)
                .ok_or_else(|| StoreError::Corrupt(format!("no room {room:?}")))?;
            let position = room.record.position + 1;
            let bytes = with_position(&entry.bytes, position)
                .ok_or_else(|| StoreError::Corrupt("the frame already has a position".into()))?;
            room.record.position = position;
            room.record.high = room.record.high.max(entry.high);
            if let Some(token) = entry.token {
                let record = room.nodes.entry(token).or_insert(NodeRecord {
                    node: entry.sender,
                    token,
                    user: entry.user,
                    last_step: 0,
                    position: 0,
                });
                if entry.step > record.last_step {
                    record.last_step = entry.step;
                    record.position = position;
                }
            }
            if entry.snapshot {
                let doc = entry.doc.as_deref().unwrap_or(WHOLE_DOC);
                let upto = covers.unwrap_or(u64::MAX);
                let keep: Vec<bool> = room
                    .docs
                    .iter()
                    .zip(&room.log)
                    .map(|(d, logged)| match d {
                        None => true,
                        Some(d) => !((doc == WHOLE_DOC || d == doc) && logged.position <= upto),
                    })
                    .collect();
                let mut i = 0;
                room.log.retain(|_| {
                    i += 1;
                    keep[i - 1]
                });
                let mut i = 0;
                room.docs.retain(|_| {
                    i += 1;
                    keep[i - 1]
                });
            }
            room.log.push(Logged {
                position,
                sender: entry.sender,
                bytes: Bytes::from(bytes),
            });
            room.docs.push(entry.doc);
            Ok(Appended::Stored {
                position,
                bytes: room.bytes(),
            })
        })
    }

    /// Appends now as a store that several relays share does: the checks that need the room's
    /// state are made here, with the append, since no relay's room sees every message of the
    /// room before it is stored. A step at or below the last stored step of its sender is
    /// refused as `replay` (another relay stored it first), a sender whose node id belongs to
    /// another token as `senderMismatch`, a step more than the room's `max_future` above the
    /// room step as `futureStep`; the room's step moves by one when the step is above it,
    /// whatever the `high` the relay proposed. A snapshot is taken only from `relay` while it
    /// holds the room's compaction lease (taken when free, for a minute from each snapshot, at
    /// `now` milliseconds) and only when it holds more of the log than the last; it drops the
    /// document entries up to what it holds. The relay's Redis store runs the same rules in a
    /// script.
    pub fn append_shared_now(
        &self,
        room: &str,
        relay: u64,
        now: u64,
        mut entry: Append,
    ) -> Result<Appended, StoreError> {
        let checked = self.with(|rooms| {
            let room = rooms
                .get_mut(room)
                .ok_or_else(|| StoreError::Corrupt(format!("no room {room:?}")))?;
            if entry.snapshot {
                if let Some((holder, until)) = room.lease {
                    if holder != relay && until > now {
                        return Ok(Some(Appended::Refused {
                            reason: Reason::Unavailable,
                            detail: format!("relay {holder} compacts this room"),
                        }));
                    }
                }
                if entry.covers <= room.covered {
                    return Ok(Some(Appended::Refused {
                        reason: Reason::Unavailable,
                        detail: format!("a snapshot already holds position {}", room.covered),
                    }));
                }
                room.lease = Some((relay, now + 60_000));
                room.covered = entry.covers;
            }
            if let Some(token) = entry.token {
                if let Some(refused) = shared_check(&room.nodes, token, &entry) {
                    return Ok(Some(refused));
                }
            }
            let high = room.record.high;
            // Rule 5 against the room step as the store knows it: a relay's room never runs
            // ahead of it, so this refuses only what the relay should have refused.
            let future = room.record.config.max_future;
            if !entry.snapshot && entry.step > high.saturating_add(future) {
                return Ok(Some(Appended::Refused {
                    reason: Reason::FutureStep,
                    detail: format!(
                        "step {} is more than {future} steps ahead of the room step {high}",
                        entry.step
                    ),
                }));
            }
            entry.high = if !entry.snapshot && entry.step > high {
                high + 1
            } else {
                high
            };
            Ok(None)
        })?;
        if let Some(refused) = checked {
            return Ok(refused);
        }
        let (step, high) = (entry.step, entry.high);
        let covers = entry.snapshot.then_some(entry.covers);
        let appended = self.append_upto(room, entry, covers)?;
        if let Appended::Stored { position, .. } = appended {
            self.with(|rooms| {
                if let Some(room) = rooms.get_mut(room) {
                    room.stamps
                        .insert(position, (step, high, covers.unwrap_or(0)));
                }
            });
        }
        Ok(appended)
    }

    /// The last position of `room`'s log.
    pub fn position_now(&self, room: &str) -> u64 {
        self.with(|rooms| rooms.get(room).map_or(0, |r| r.record.position))
    }

    /// Takes a publication of a shared room (see [`crate::room::Output::Publish`]) as the
    /// Redis store's script does: answers its place (the log's last position) and the room step
    /// with it, moved by one when `step` is above it.
    pub fn publish_now(&self, room: &str, step: Step) -> (u64, Step) {
        self.with(|rooms| {
            let Some(room) = rooms.get_mut(room) else {
                return (0, 0);
            };
            if step > room.record.high {
                room.record.high += 1;
            }
            (room.record.position, room.record.high)
        })
    }

    /// The entries of a shared room after position `after`, as a relay that follows its log
    /// reads them.
    pub fn follow_now(&self, room: &str, after: u64) -> Vec<Followed> {
        self.with(|rooms| {
            let Some(room) = rooms.get(room) else {
                return Vec::new();
            };
            // What a snapshot dropped is not there to read.
            let start = room.log.partition_point(|l| l.position <= after);
            room.log[start..]
                .iter()
                .map(|l| {
                    let (step, high, covers) =
                        room.stamps.get(&l.position).copied().unwrap_or_default();
                    Followed {
                        position: l.position,
                        sender: l.sender,
                        step,
                        high,
                        covers,
                        bytes: l.bytes.clone(),
                    }
                })
                .collect()
        })
    }

    /// Reads now.
    pub fn read_now(&self, room: &str, since: u64, until: u64, max_bytes: usize) -> Vec<Logged> {
        self.with(|rooms| {
            let Some(room) = rooms.get(room) else {
                return Vec::new();
            };
            let start = room.log.partition_point(|l| l.position <= since);
            let mut out = Vec::new();
            let mut bytes = 0;
            for logged in &room.log[start..] {
                if logged.position > until || (!out.is_empty() && bytes >= max_bytes) {
                    break;
                }
                bytes += logged.bytes.len();
                out.push(logged.clone());
            }
            out
        })
    }

    /// The document entries of `room`, now.
    pub fn document_now(&self, room: &str) -> Vec<Logged> {
        self.with(|rooms| {
            let Some(room) = rooms.get(room) else {
                return Vec::new();
            };
            room.log
                .iter()
                .zip(&room.docs)
                .filter(|(_, doc)| doc.is_some())
                .map(|(logged, _)| logged.clone())
                .collect()
        })
    }

    /// Forgets a node, as a store that expired its record does (for tests of what a client
    /// does when the relay no longer knows it).
    pub fn forget_node(&self, room: &str, node: NodeId) {
        self.with(|rooms| {
            if let Some(room) = rooms.get_mut(room) {
                room.nodes.retain(|_, n| n.node != node);
            }
        });
    }

    /// Forgets every node of `room`, as a store that expired them all does.
    pub fn forget_nodes(&self, room: &str) {
        self.with(|rooms| {
            if let Some(room) = rooms.get_mut(room) {
                room.nodes.clear();
            }
        });
    }

    /// How many node records `room` keeps.
    pub fn node_records(&self, room: &str) -> usize {
        self.with(|rooms| rooms.get(room).map_or(0, |r| r.nodes.len()))
    }

    /// Every logged entry of `room`, in order.
    pub fn log(&self, room: &str) -> Vec<Logged> {
        self.read_now(room, 0, u64::MAX, usize::MAX)
    }
}

/// The checks a shared store makes with an append of `token`'s node (see
/// [`MemoryStore::append_shared_now`]): the refusal, if any.
fn shared_check(
    nodes: &HashMap<ResumeToken, NodeRecord>,
    token: ResumeToken,
    entry: &Append,
) -> Option<Appended> {
    if let Some(record) = nodes.get(&token) {
        if record.node != entry.sender {
            return Some(Appended::Refused {
                reason: Reason::SenderMismatch,
                detail: format!(
                    "this resume token belongs to node {}, not {}",
                    record.node, entry.sender
                ),
            });
        }
        if entry.step <= record.last_step {
            return Some(Appended::Replayed {
                position: record.position,
                detail: format!(
                    "step {} of node {} is not above its last stored step {}: it was stored through another relay",
                    entry.step, entry.sender, record.last_step
                ),
            });
        }
    } else if nodes.values().any(|n| n.node == entry.sender) {
        return Some(Appended::Refused {
            reason: Reason::SenderMismatch,
            detail: format!("node {} belongs to another resume token", entry.sender),
        });
    }
    None
}

fn ready<T: Send + 'static>(value: Result<T, StoreError>) -> StoreFuture<T> {
    Box::pin(std::future::ready(value))
}

impl Store for MemoryStore {
    fn open_room(&self, room: &str, config: RoomConfig) -> StoreFuture<RoomRecord> {
        ready(Ok(self.open_now(room, config)))
    }

    fn reserve_nodes(&self, room: &str, count: u64) -> StoreFuture<NodeId> {
        ready(self.reserve_now(room, count))
    }

    fn find_node(&self, room: &str, token: ResumeToken) -> StoreFuture<Option<NodeRecord>> {
        ready(Ok(self.find_now(room, token)))
    }

    fn room_exists(&self, room: &str) -> StoreFuture<bool> {
        ready(Ok(self.with(|rooms| rooms.contains_key(room))))
    }

    fn append(&self, room: &str, entry: Append) -> StoreFuture<Appended> {
        ready(self.append_now(room, entry))
    }

    fn read_document(&self, room: &str) -> StoreFuture<Vec<Logged>> {
        ready(Ok(self.document_now(room)))
    }

    fn read_after(
        &self,
        room: &str,
        since: u64,
        until: u64,
        max_bytes: usize,
    ) -> StoreFuture<Vec<Logged>> {
        ready(Ok(self.read_now(room, since, until, max_bytes)))
    }

    /// The memory store keeps no time (it reads no clock): it expires nothing. Tests expire
    /// records with [`MemoryStore::forget_node`].
    fn expire_nodes(&self, _ttl: std::time::Duration) -> StoreFuture<u64> {
        ready(Ok(0))
    }

    fn close(&self) -> StoreFuture<()> {
        ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(sender: NodeId, step: Step, doc: Option<&str>, snapshot: bool) -> Append {
        Append {
            sender,
            token: Some([sender as u8; 16]),
            user: 0,
            step,
            high: step,
            doc: doc.map(str::to_owned),
            snapshot,
            covers: 0,
            bytes: Bytes::from_static(&[2, 0x10, 0, 1, 1, 4, 1, b'1']),
        }
    }

    #[test]
    fn appends_are_positioned_in_order_and_read_back_in_pages() {
        let store = MemoryStore::new();
        store.open_now("r", RoomConfig::default());
        for step in 1..=5 {
            assert!(matches!(
                store.append_now("r", entry(1, step, None, false)),
                Ok(Appended::Stored { position, .. }) if position == step
            ));
        }
        let record = store.open_now("r", RoomConfig::default());
        assert_eq!((record.position, record.high), (5, 5));
        assert_eq!(store.find_now("r", [1; 16]).unwrap().last_step, 5);
        let page = store.read_now("r", 1, 4, 1);
        assert_eq!(page.len(), 1, "at least one entry, then the byte budget");
        assert_eq!(page[0].position, 2);
        assert_eq!(store.read_now("r", 1, 4, usize::MAX).len(), 3);
    }

    #[test]
    fn every_opening_and_reservation_gets_node_ids_of_its_own() {
        let store = MemoryStore::new();
        let first = store.open_now("r", RoomConfig::default());
        let second = store.open_now("r", RoomConfig::default());
        let more = store.reserve_now("r", 10).unwrap();
        let third = store.open_now("r", RoomConfig::default());
        assert!(first.nodes_end <= second.next_node);
        assert!(second.nodes_end <= more);
        assert!(more + 10 <= third.next_node);
    }

    #[test]
    fn after_a_failed_append_the_room_refuses_appends_until_it_is_opened_again() {
        let store = MemoryStore::new();
        store.open_now("r", RoomConfig::default());
        store.fail_next_append();
        assert!(store.append_now("r", entry(1, 1, None, false)).is_err());
        assert!(
            store.append_now("r", entry(1, 2, None, false)).is_err(),
            "step 2 must not be stored when step 1 was not"
        );
        store.open_now("r", RoomConfig::default());
        assert!(matches!(
            store.append_now("r", entry(1, 1, None, false)),
            Ok(Appended::Stored { position: 1, .. })
        ));
    }

    #[test]
    fn a_snapshot_drops_older_entries_of_its_document_but_never_data() {
        let store = MemoryStore::new();
        store.open_now("r", RoomConfig::default());
        store.append_now("r", entry(1, 1, None, false)).unwrap();
        store
            .append_now("r", entry(1, 2, Some("a"), false))
            .unwrap();
        store
            .append_now("r", entry(1, 3, Some("b"), false))
            .unwrap();
        store.append_now("r", entry(1, 4, Some("a"), true)).unwrap();
        let positions: Vec<u64> = store.log("r").iter().map(|l| l.position).collect();
        assert_eq!(positions, [1, 3, 4]);
        store.append_now("r", entry(1, 5, Some("*"), true)).unwrap();
        let positions: Vec<u64> = store.log("r").iter().map(|l| l.position).collect();
        assert_eq!(positions, [1, 5]);
        let document: Vec<u64> = store.document_now("r").iter().map(|l| l.position).collect();
        assert_eq!(document, [5]);
    }
}
