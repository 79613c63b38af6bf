//! The room log: a storage trait and its embedded SQLite implementation.
//!
//! Writes go through one writer thread that owns a SQLite connection in WAL mode. It takes every
//! request waiting in its queue, commits them in one transaction (group commit), and only then
//! answers each request: an acknowledgement always means "on disk". Reads use their own
//! connection, so a late joiner's catch-up never holds up writers.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::{mpsc, oneshot};

use crate::envelope::{NodeId, ResumeToken, RoomConfig};
use crate::pattern::{PatternParams, Step};

use super::metrics::Metrics;

/// A storage failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite reported an error.
    #[error("storage error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The writer thread has stopped (the relay is shutting down).
    #[error("the store is closed")]
    Closed,
    /// A stored value could not be read back.
    #[error("corrupt stored value: {0}")]
    Corrupt(String),
}

/// One accepted message, ready to be logged.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The room.
    pub room: String,
    /// Its position in the room log (1, 2, ...).
    pub position: u64,
    /// The sender's node id.
    pub sender: NodeId,
    /// The sender's step.
    pub step: Step,
    /// The room's high step after this message.
    pub high: Step,
    /// The document a snapshot or update is for, if any.
    pub doc: Option<String>,
    /// Whether this is a snapshot, after which older updates of `doc` may be dropped.
    pub snapshot: bool,
    /// The frame as sent to clients (with its position in the header).
    pub bytes: bytes::Bytes,
}

/// What the store knows of a room when it is opened.
#[derive(Debug, Clone, Default)]
pub struct RoomRecord {
    /// The room's settings, if it was created before.
    pub config: Option<RoomConfig>,
    /// The highest accepted step.
    pub high: Step,
    /// The last log position.
    pub position: u64,
    /// Every node ever admitted: id, resume token and last accepted step.
    pub nodes: Vec<(NodeId, ResumeToken, Step)>,
}

/// A logged message read back for catch-up.
#[derive(Debug, Clone)]
pub struct Logged {
    /// Its position.
    pub position: u64,
    /// Its sender.
    pub sender: NodeId,
    /// The frame bytes as sent to clients.
    pub bytes: bytes::Bytes,
}

enum Write {
    Append(Entry, oneshot::Sender<Result<(), String>>),
    Room {
        room: String,
        config: RoomConfig,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Node {
        room: String,
        node: NodeId,
        token: ResumeToken,
        reply: oneshot::Sender<Result<(), String>>,
    },
}

/// The checkpoint thread and the channel whose closing stops it.
type Checkpointer = (std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>);

/// The SQLite store. Cheap to clone; every clone shares the writer thread.
#[derive(Clone)]
pub struct SqliteStore {
    /// `None` once closed: later writes fail with [`StoreError::Closed`].
    writes: Arc<Mutex<Option<mpsc::UnboundedSender<Write>>>>,
    reader: Arc<Mutex<Connection>>,
    writer: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
    /// Dropping it stops the checkpointer.
    checkpointer: Arc<Mutex<Option<Checkpointer>>>,
}

const SCHEMA_VERSION: i64 = 1;

fn open(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // FULL: a commit is on disk before the call returns, also across a power loss.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(conn)
}

fn migrate(conn: &Connection) -> Result<(), StoreError> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::Corrupt(format!(
            "the data directory has schema version {version}, newer than this relay's {SCHEMA_VERSION}"
        )));
    }
    if version < 1 {
        conn.execute_batch(
            "BEGIN;
             CREATE TABLE IF NOT EXISTS rooms (
                 room TEXT PRIMARY KEY,
                 seed INTEGER NOT NULL, multiplier INTEGER NOT NULL, reset_interval INTEGER NOT NULL,
                 max_future INTEGER NOT NULL, stale_window INTEGER,
                 high INTEGER NOT NULL DEFAULT 0, position INTEGER NOT NULL DEFAULT 0
             );
             CREATE TABLE IF NOT EXISTS nodes (
                 room TEXT NOT NULL, node INTEGER NOT NULL, token BLOB NOT NULL,
                 last_step INTEGER NOT NULL DEFAULT 0,
                 PRIMARY KEY (room, node)
             );
             CREATE TABLE IF NOT EXISTS log (
                 room TEXT NOT NULL, position INTEGER NOT NULL, sender INTEGER NOT NULL,
                 step INTEGER NOT NULL, doc TEXT, snapshot INTEGER NOT NULL, bytes BLOB NOT NULL,
                 PRIMARY KEY (room, position)
             ) WITHOUT ROWID;
             PRAGMA user_version = 1;
             COMMIT;",
        )?;
    }
    Ok(())
}

/// SQLite stores integers as i64; steps and ids are u64 below 2^63 in practice, and anything
/// else is refused rather than wrapped.
fn int(value: u64) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(|_| StoreError::Corrupt(format!("{value} does not fit in SQLite")))
}

impl SqliteStore {
    /// Opens (creating and migrating) the store in `dir/relay.sqlite3` and starts its writer.
    pub fn open(dir: &Path, metrics: Arc<Metrics>) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Corrupt(format!("cannot create {}: {e}", dir.display())))?;
        let path: PathBuf = dir.join("relay.sqlite3");
        let writer_conn = open(&path)?;
        migrate(&writer_conn)?;
        // The writer never checkpoints: a checkpoint copies and syncs the database file, which
        // would stall commits for tens of milliseconds. A separate thread does it instead.
        writer_conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        let reader = open(&path)?;
        let checkpoint_conn = open(&path)?;
        let (stop_checkpoints, stopped) = std::sync::mpsc::channel::<()>();
        let checkpoints = std::thread::Builder::new()
            .name("store-checkpoint".into())
            .spawn(move || checkpoint_loop(checkpoint_conn, stopped))
            .map_err(|e| StoreError::Corrupt(format!("cannot start the checkpointer: {e}")))?;
        let (writes, queue) = mpsc::unbounded_channel();
        let handle = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || write_loop(writer_conn, queue, metrics))
            .map_err(|e| StoreError::Corrupt(format!("cannot start the writer: {e}")))?;
        Ok(Self {
            writes: Arc::new(Mutex::new(Some(writes))),
            reader: Arc::new(Mutex::new(reader)),
            writer: Arc::new(Mutex::new(Some(handle))),
            checkpointer: Arc::new(Mutex::new(Some((stop_checkpoints, checkpoints)))),
        })
    }

    fn send(&self, write: Write) -> Result<(), StoreError> {
        let writes = self.writes.lock().map_err(|_| StoreError::Closed)?;
        let sender = writes.as_ref().ok_or(StoreError::Closed)?;
        sender.send(write).map_err(|_| StoreError::Closed)
    }

    /// Appends an entry; the returned receiver answers once it is durable (or failed).
    pub fn append(&self, entry: Entry) -> oneshot::Receiver<Result<(), String>> {
        let (reply, rx) = oneshot::channel();
        // On failure the reply sender is dropped with the write, and the receiver sees an error.
        let _ = self.send(Write::Append(entry, reply));
        rx
    }

    /// Records a room's settings (once, when it is created), durably.
    pub async fn create_room(&self, room: &str, config: RoomConfig) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(Write::Room {
            room: room.to_owned(),
            config,
            reply,
        })?;
        rx.await
            .map_err(|_| StoreError::Closed)?
            .map_err(StoreError::Corrupt)
    }

    /// Records a node's resume token, durably.
    pub async fn add_node(
        &self,
        room: &str,
        node: NodeId,
        token: ResumeToken,
    ) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(Write::Node {
            room: room.to_owned(),
            node,
            token,
            reply,
        })?;
        rx.await
            .map_err(|_| StoreError::Closed)?
            .map_err(StoreError::Corrupt)
    }

    /// Reads what the store knows of `room`.
    pub async fn load_room(&self, room: &str) -> Result<RoomRecord, StoreError> {
        let reader = self.reader.clone();
        let room = room.to_owned();
        tokio::task::spawn_blocking(move || {
            let conn = reader.lock().map_err(|_| StoreError::Closed)?;
            let row = conn
                .query_row(
                    "SELECT seed, multiplier, reset_interval, max_future, stale_window, high, position
                     FROM rooms WHERE room = ?1",
                    params![room],
                    |r| {
                        Ok((
                            RoomConfig {
                                pattern: PatternParams {
                                    seed: r.get::<_, i64>(0)? as u64,
                                    multiplier: r.get::<_, i64>(1)? as u64,
                                    reset_interval: r.get::<_, i64>(2)? as u64,
                                },
                                max_future: r.get::<_, i64>(3)? as u64,
                                stale_window: r.get::<_, Option<i64>>(4)?.map(|w| w as u64),
                            },
                            r.get::<_, i64>(5)? as u64,
                            r.get::<_, i64>(6)? as u64,
                        ))
                    },
                )
                .optional()?;
            let Some((config, high, position)) = row else {
                return Ok(RoomRecord::default());
            };
            let mut stmt =
                conn.prepare("SELECT node, token, last_step FROM nodes WHERE room = ?1")?;
            let nodes = stmt
                .query_map(params![room], |r| {
                    Ok((
                        r.get::<_, i64>(0)? as u64,
                        r.get::<_, Vec<u8>>(1)?,
                        r.get::<_, i64>(2)? as u64,
                    ))
                })?
                .map(|row| {
                    let (node, token, last) = row?;
                    let token = ResumeToken::try_from(token.as_slice())
                        .map_err(|_| StoreError::Corrupt("a resume token is not 16 bytes".into()))?;
                    Ok((node, token, last))
                })
                .collect::<Result<Vec<_>, StoreError>>()?;
            Ok(RoomRecord {
                config: Some(config),
                high,
                position,
                nodes,
            })
        })
        .await
        .map_err(|_| StoreError::Closed)?
    }

    /// Reads the log of `room` after position `since`, up to `until`, in order.
    pub async fn read_after(
        &self,
        room: &str,
        since: u64,
        until: u64,
    ) -> Result<Vec<Logged>, StoreError> {
        let reader = self.reader.clone();
        let room = room.to_owned();
        tokio::task::spawn_blocking(move || {
            let conn = reader.lock().map_err(|_| StoreError::Closed)?;
            let mut stmt = conn.prepare_cached(
                "SELECT position, sender, bytes FROM log
                 WHERE room = ?1 AND position > ?2 AND position <= ?3 ORDER BY position",
            )?;
            let rows = stmt
                .query_map(params![room, int(since)?, int(until)?], |r| {
                    Ok(Logged {
                        position: r.get::<_, i64>(0)? as u64,
                        sender: r.get::<_, i64>(1)? as u64,
                        bytes: bytes::Bytes::from(r.get::<_, Vec<u8>>(2)?),
                    })
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
        .await
        .map_err(|_| StoreError::Closed)?
    }

    /// Stops accepting writes, commits what is queued, and waits for the writer to finish.
    /// Blocks: call it from a blocking context (or `spawn_blocking`).
    pub fn close(&self) {
        if let Ok(mut writes) = self.writes.lock() {
            writes.take();
        }
        let handle = self.writer.lock().ok().and_then(|mut w| w.take());
        if let Some(handle) = handle {
            let _ = handle.join();
        }
        let checkpointer = self.checkpointer.lock().ok().and_then(|mut c| c.take());
        if let Some((stop, handle)) = checkpointer {
            drop(stop);
            let _ = handle.join();
        }
    }
}

/// Moves committed WAL pages into the database file every 200 ms, without blocking the writer
/// (a passive checkpoint never waits for writers), and once more, fully, when the store closes.
fn checkpoint_loop(conn: Connection, stop: std::sync::mpsc::Receiver<()>) {
    let every = std::time::Duration::from_millis(200);
    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(every) {
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!(error = %e, "WAL checkpoint failed");
        }
    }
    let _ = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
}

fn write_loop(
    mut conn: Connection,
    mut queue: mpsc::UnboundedReceiver<Write>,
    metrics: Arc<Metrics>,
) {
    const MAX_BATCH: usize = 1_024;
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = queue.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let started = Instant::now();
        let result = commit(&mut conn, &batch).map_err(|e| e.to_string());
        metrics.store_commit(started.elapsed(), batch.len());
        if let Err(e) = &result {
            tracing::error!(error = %e, entries = batch.len(), "store commit failed");
        }
        for write in batch.drain(..) {
            let reply = match write {
                Write::Append(_, reply) | Write::Room { reply, .. } | Write::Node { reply, .. } => {
                    reply
                }
            };
            let _ = reply.send(result.clone());
        }
    }
    tracing::info!("store writer stopped: every queued write is committed");
}

fn commit(conn: &mut Connection, batch: &[Write]) -> Result<(), StoreError> {
    let tx = conn.transaction()?;
    {
        let mut append = tx.prepare_cached(
            "INSERT INTO log (room, position, sender, step, doc, snapshot, bytes)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?;
        let mut high = tx.prepare_cached(
            "UPDATE rooms SET high = MAX(high, ?2), position = MAX(position, ?3) WHERE room = ?1",
        )?;
        let mut last = tx.prepare_cached(
            "UPDATE nodes SET last_step = MAX(last_step, ?3) WHERE room = ?1 AND node = ?2",
        )?;
        // A snapshot of `doc` replaces the document entries of `doc` before it; a snapshot of
        // "*" (the whole document, as the browser client posts it) replaces every document
        // entry before it. Data frames (no doc) are never compacted.
        let mut compact = tx.prepare_cached(
            "DELETE FROM log WHERE room = ?1 AND doc IS NOT NULL AND (doc = ?2 OR ?2 = '*')
             AND position < ?3",
        )?;
        for write in batch {
            match write {
                Write::Append(e, _) => {
                    append.execute(params![
                        e.room,
                        int(e.position)?,
                        int(e.sender)?,
                        int(e.step)?,
                        e.doc,
                        e.snapshot,
                        &e.bytes[..]
                    ])?;
                    high.execute(params![e.room, int(e.high)?, int(e.position)?])?;
                    last.execute(params![e.room, int(e.sender)?, int(e.step)?])?;
                    if e.snapshot {
                        // Everything the snapshot contains: older updates and snapshots of its doc.
                        compact.execute(params![e.room, e.doc, int(e.position)?])?;
                    }
                }
                Write::Room { room, config, .. } => {
                    tx.execute(
                        "INSERT OR IGNORE INTO rooms
                         (room, seed, multiplier, reset_interval, max_future, stale_window)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                        params![
                            room,
                            int(config.pattern.seed)?,
                            int(config.pattern.multiplier)?,
                            int(config.pattern.reset_interval)?,
                            int(config.max_future)?,
                            config.stale_window.map(int).transpose()?
                        ],
                    )?;
                }
                Write::Node {
                    room, node, token, ..
                } => {
                    tx.execute(
                        "INSERT OR REPLACE INTO nodes (room, node, token, last_step)
                         VALUES (?1, ?2, ?3, COALESCE(
                             (SELECT last_step FROM nodes WHERE room = ?1 AND node = ?2), 0))",
                        params![room, int(*node)?, &token[..]],
                    )?;
                }
            }
        }
    }
    tx.commit()?;
    Ok(())
}
