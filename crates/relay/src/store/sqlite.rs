//! The embedded store: SQLite in WAL mode, behind the core's [`Store`] trait.
//!
//! Writes go through one writer thread that owns a connection. It takes every write waiting in
//! its queue, commits them in one transaction (group commit), and only then answers each: an
//! answer always means "on disk" (`synchronous = FULL`). The writer assigns log positions, so
//! they follow the order in which appends were handed over. A write is handed over when the
//! method is called, not when its future is first polled.
//!
//! Each write of a batch runs in its own savepoint: a write that fails (a value the database
//! cannot hold, a constraint) is rolled back and refused alone, and the rest of the batch
//! commits. Its room then refuses later appends until it is opened again (see the trait's
//! contract): what a node has stored stays a prefix of what it sent. Only a commit that fails as
//! a whole (a full disk) fails every write of the batch.
//!
//! Reads use their own connection, so a late joiner's catch-up never holds up writers; a third
//! connection moves the write-ahead log into the database file every 200 ms. Past 64 MiB of log
//! the writer finishes that checkpoint itself between two batches, so that the log starts over
//! instead of growing with everything ever written.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use pattern_mesh_core::pattern::PatternParams;
use pattern_mesh_core::room::{Append, NODE_BLOCK};
use pattern_mesh_core::store::{
    Appended, Logged, NodeRecord, RoomRecord, Store, StoreError, StoreFuture,
};
use pattern_mesh_core::wire::{with_position, Frame, NodeId, ResumeToken, RoomConfig};
use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::{mpsc, oneshot};

use crate::metrics::Metrics;

fn backend(e: rusqlite::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

enum Write {
    Open {
        room: String,
        config: RoomConfig,
        reply: oneshot::Sender<Result<RoomRecord, StoreError>>,
    },
    Reserve {
        room: String,
        count: u64,
        reply: oneshot::Sender<Result<NodeId, StoreError>>,
    },
    Append {
        room: String,
        entry: Append,
        reply: oneshot::Sender<Result<Appended, StoreError>>,
    },
    Expire {
        ttl: Duration,
        reply: oneshot::Sender<Result<u64, StoreError>>,
    },
}

impl Write {
    fn room(&self) -> Option<&str> {
        match self {
            Write::Open { room, .. } | Write::Reserve { room, .. } | Write::Append { room, .. } => {
                Some(room)
            }
            Write::Expire { .. } => None,
        }
    }
}

/// What a write answers, once committed.
enum Outcome {
    Opened(RoomRecord),
    Reserved(NodeId),
    Appended(Appended),
    Expired(u64),
}

type Checkpointer = (std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>);

/// The SQLite store. Cloning it shares the same writer and reader.
#[derive(Clone)]
pub struct SqliteStore {
    writes: Arc<Mutex<Option<mpsc::UnboundedSender<Write>>>>,
    reader: Arc<Mutex<Connection>>,
    writer: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
    checkpointer: Arc<Mutex<Option<Checkpointer>>>,
}

const SCHEMA_VERSION: i64 = 4;

fn open(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).map_err(backend)?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(backend)?;
    // FULL: a commit is on disk before the call returns, also across a power loss.
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(backend)?;
    conn.busy_timeout(Duration::from_secs(5)).map_err(backend)?;
    Ok(conn)
}

/// Milliseconds since the Unix epoch: when a node was last seen.
fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(backend)?;
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
        )
        .map_err(backend)?;
    }
    if version < 2 {
        // Wire format 2: stored data, updates and snapshots keep their bytes but for the
        // version byte; checkpoints and the sync exchange are no longer stored. Rooms remember
        // the next node id, so that ids are never handed out twice.
        // The log becomes a rowid table with an index on (room, position): in a table without
        // rowid every row lives in the key's b-tree, and a seek past a large message (a 50 MB
        // paste) read its whole payload on every later insert of the room.
        conn.execute_batch(
            "BEGIN;
             CREATE TABLE log2 (
                 id INTEGER PRIMARY KEY,
                 room TEXT NOT NULL, position INTEGER NOT NULL, sender INTEGER NOT NULL,
                 step INTEGER NOT NULL, doc TEXT, snapshot INTEGER NOT NULL, bytes BLOB NOT NULL
             );
             INSERT INTO log2 (room, position, sender, step, doc, snapshot, bytes)
                 SELECT room, position, sender, step, doc, snapshot,
                        CASE WHEN substr(bytes, 1, 1) = x'01'
                             THEN CAST(x'02' || substr(bytes, 2) AS BLOB)
                             ELSE bytes END
                 FROM log WHERE substr(bytes, 2, 1) NOT IN (x'12', x'13', x'14')
                 ORDER BY room, position;
             DROP TABLE log;
             ALTER TABLE log2 RENAME TO log;
             CREATE UNIQUE INDEX log_room_position ON log (room, position);
             ALTER TABLE rooms ADD COLUMN next_node INTEGER NOT NULL DEFAULT 1;
             UPDATE rooms SET next_node = 1 + COALESCE(
                 (SELECT MAX(node) FROM nodes WHERE nodes.room = rooms.room), 0);
             ALTER TABLE rooms ADD COLUMN log INTEGER NOT NULL DEFAULT 0;
             UPDATE rooms SET log = 1 + abs(random() % 9007199254740991);
             PRAGMA user_version = 2;
             COMMIT;",
        )
        .map_err(backend)?;
    }
    if version < 3 {
        migrate_to_3(conn)?;
    }
    if version < 4 {
        // Schema 4: a node record names the user of its node's access token; a resume token
        // takes the node back for that user only. Records made before name none (0): on a
        // relay with tokens every user's join with such a token is a new node.
        conn.execute_batch(
            "BEGIN;
             ALTER TABLE nodes ADD COLUMN user INTEGER NOT NULL DEFAULT 0;
             PRAGMA user_version = 4;
             COMMIT;",
        )
        .map_err(backend)?;
    }
    Ok(())
}

/// Schema 3: node records carry when they were last seen (for their expiry) and are found by
/// token; rooms count the bytes of their log (for their budget); snapshots that members posted
/// become the relay's own snapshot frames (members no longer post any).
fn migrate_to_3(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = conn.transaction().map_err(backend)?;
    tx.execute_batch(
        "ALTER TABLE nodes ADD COLUMN last_seen INTEGER NOT NULL DEFAULT 0;
         CREATE INDEX nodes_token ON nodes (room, token);
         ALTER TABLE rooms ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0;",
    )
    .map_err(backend)?;
    tx.execute("UPDATE nodes SET last_seen = ?1", params![unix_ms()])
        .map_err(backend)?;
    let posted: Vec<(i64, u64, Vec<u8>)> = {
        let mut stmt = tx
            .prepare("SELECT id, position, bytes FROM log WHERE snapshot = 1")
            .map_err(backend)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)? as u64, r.get(2)?))
            })
            .map_err(backend)?;
        rows.collect::<Result<_, _>>().map_err(backend)?
    };
    for (id, position, bytes) in posted {
        let converted = posted_snapshot(&bytes)
            .and_then(|frame| with_position(&frame.encode(), position))
            .ok_or_else(|| {
                StoreError::Corrupt(format!(
                    "the stored snapshot at position {position} does not decode"
                ))
            })?;
        tx.execute(
            "UPDATE log SET bytes = ?2, sender = 0, step = 0 WHERE id = ?1",
            params![id, converted],
        )
        .map_err(backend)?;
    }
    tx.execute_batch(
        "UPDATE rooms SET bytes = COALESCE(
             (SELECT SUM(length(bytes)) FROM log WHERE log.room = rooms.room), 0);
         PRAGMA user_version = 3;",
    )
    .map_err(backend)?;
    tx.commit().map_err(backend)
}

/// A snapshot a member posted in protocol 2 (kind 0x15: a stamp, then the document's name and
/// state), as the relay's snapshot frame.
fn posted_snapshot(bytes: &[u8]) -> Option<Frame> {
    fn var(bytes: &[u8], at: &mut usize) -> Option<u64> {
        let mut value = 0u64;
        for i in 0..10 {
            let byte = *bytes.get(*at)?;
            *at += 1;
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }
    fn field<'a>(bytes: &'a [u8], at: &mut usize) -> Option<&'a [u8]> {
        let len = var(bytes, at)? as usize;
        let field = bytes.get(*at..at.checked_add(len)?)?;
        *at += len;
        Some(field)
    }
    if bytes.get(1) != Some(&pattern_mesh_core::wire::RETIRED_CLIENT_SNAPSHOT) {
        return None;
    }
    let flags = *bytes.get(2)?;
    let mut at = 3;
    if flags & pattern_mesh_core::wire::FLAG_POSITIONED != 0 {
        var(bytes, &mut at)?;
    }
    for _ in 0..3 {
        var(bytes, &mut at)?; // sender, step, pattern
    }
    let doc = std::str::from_utf8(field(bytes, &mut at)?).ok()?.to_owned();
    let state = field(bytes, &mut at)?.to_vec();
    Some(Frame::Snapshot { doc, state })
}

/// SQLite stores integers as i64: a value above 2^63 - 1 is refused, never wrapped.
fn int(value: u64) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(|_| StoreError::Corrupt(format!("{value} does not fit in SQLite")))
}

impl SqliteStore {
    /// Opens (creating and migrating) the store in `dir/relay.sqlite3` and starts its writer.
    pub fn open(dir: &Path, metrics: Arc<Metrics>) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Corrupt(format!("cannot create {}: {e}", dir.display())))?;
        let path: PathBuf = dir.join("relay.sqlite3");
        let mut writer_conn = open(&path)?;
        migrate(&mut writer_conn)?;
        // The writer does not checkpoint after its commits: a checkpoint copies and syncs the
        // database file, which would stall them for tens of milliseconds. A separate thread does
        // it instead; the writer only finishes one when the log passes `WAL_LIMIT`.
        writer_conn
            .pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(backend)?;
        // When the log starts over, its file is cut back to this size.
        writer_conn
            .pragma_update(None, "journal_size_limit", WAL_LIMIT as i64)
            .map_err(backend)?;
        let wal = dir.join("relay.sqlite3-wal");
        let reader = open(&path)?;
        let checkpoint_conn = open(&path)?;
        let (stop_checkpoints, stopped) = std::sync::mpsc::channel::<()>();
        let checkpoints = std::thread::Builder::new()
            .name("store-checkpoint".into())
            .spawn(move || checkpoint_loop(checkpoint_conn, stopped))
            .map_err(|e| StoreError::Backend(format!("cannot start the checkpointer: {e}")))?;
        let (writes, queue) = mpsc::unbounded_channel();
        let handle = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || write_loop(writer_conn, queue, metrics, wal))
            .map_err(|e| StoreError::Backend(format!("cannot start the writer: {e}")))?;
        Ok(Self {
            writes: Arc::new(Mutex::new(Some(writes))),
            reader: Arc::new(Mutex::new(reader)),
            writer: Arc::new(Mutex::new(Some(handle))),
            checkpointer: Arc::new(Mutex::new(Some((stop_checkpoints, checkpoints)))),
        })
    }

    /// Hands `write` to the writer now.
    fn send(&self, write: Write) {
        let writes = self.writes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(sender) = writes.as_ref() {
            // A writer that has stopped drops the write and its reply: the caller sees Closed.
            let _ = sender.send(write);
        }
    }

    /// Stops accepting writes, commits what is queued, and waits for the writer to finish.
    /// Blocks: call it from a blocking context.
    pub fn close_blocking(&self) {
        self.writes.lock().unwrap_or_else(|e| e.into_inner()).take();
        let handle = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(handle) = handle {
            let _ = handle.join();
        }
        let checkpointer = self
            .checkpointer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some((stop, handle)) = checkpointer {
            drop(stop);
            let _ = handle.join();
        }
    }

    fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> StoreFuture<T> {
        let reader = self.reader.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let conn = reader.lock().map_err(|_| StoreError::Closed)?;
                f(&conn)
            })
            .await
            .map_err(|_| StoreError::Closed)?
        })
    }
}

fn answer<T: Send + 'static>(rx: oneshot::Receiver<Result<T, StoreError>>) -> StoreFuture<T> {
    Box::pin(async move { rx.await.map_err(|_| StoreError::Closed)? })
}

fn load(conn: &Connection, room: &str) -> Result<Option<RoomRecord>, StoreError> {
    conn.query_row(
        "SELECT seed, multiplier, reset_interval, max_future, stale_window, high, position,
                next_node, log, bytes
         FROM rooms WHERE room = ?1",
        params![room],
        |r| {
            Ok(RoomRecord {
                config: RoomConfig {
                    pattern: PatternParams {
                        seed: r.get::<_, i64>(0)? as u64,
                        multiplier: r.get::<_, i64>(1)? as u64,
                        reset_interval: r.get::<_, i64>(2)? as u64,
                    },
                    max_future: r.get::<_, i64>(3)? as u64,
                    stale_window: r.get::<_, Option<i64>>(4)?.map(|w| w as u64),
                },
                high: r.get::<_, i64>(5)? as u64,
                position: r.get::<_, i64>(6)? as u64,
                next_node: r.get::<_, i64>(7)? as u64,
                nodes_end: r.get::<_, i64>(7)? as u64,
                log: r.get::<_, i64>(8)? as u64,
                bytes: r.get::<_, i64>(9)? as u64,
            })
        },
    )
    .optional()
    .map_err(backend)
}

impl Store for SqliteStore {
    fn open_room(&self, room: &str, config: RoomConfig) -> StoreFuture<RoomRecord> {
        let (reply, rx) = oneshot::channel();
        self.send(Write::Open {
            room: room.to_owned(),
            config,
            reply,
        });
        answer(rx)
    }

    fn reserve_nodes(&self, room: &str, count: u64) -> StoreFuture<NodeId> {
        let (reply, rx) = oneshot::channel();
        self.send(Write::Reserve {
            room: room.to_owned(),
            count,
            reply,
        });
        answer(rx)
    }

    fn find_node(&self, room: &str, token: ResumeToken) -> StoreFuture<Option<NodeRecord>> {
        let room = room.to_owned();
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT node, last_step, user FROM nodes WHERE room = ?1 AND token = ?2",
            )
            .map_err(backend)?
            .query_row(params![room, &token[..]], |r| {
                Ok(NodeRecord {
                    node: r.get::<_, i64>(0)? as u64,
                    token,
                    // Stored as the i64 of the same bits.
                    user: r.get::<_, i64>(2)? as u64,
                    last_step: r.get::<_, i64>(1)? as u64,
                    position: 0,
                })
            })
            .optional()
            .map_err(backend)
        })
    }

    fn room_exists(&self, room: &str) -> StoreFuture<bool> {
        let room = room.to_owned();
        self.read(move |conn| {
            conn.prepare_cached("SELECT 1 FROM rooms WHERE room = ?1")
                .map_err(backend)?
                .exists(params![room])
                .map_err(backend)
        })
    }

    fn append(&self, room: &str, entry: Append) -> StoreFuture<Appended> {
        let (reply, rx) = oneshot::channel();
        self.send(Write::Append {
            room: room.to_owned(),
            entry,
            reply,
        });
        answer(rx)
    }

    fn read_document(&self, room: &str) -> StoreFuture<Vec<Logged>> {
        let room = room.to_owned();
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT position, sender, bytes FROM log
                     WHERE room = ?1 AND doc IS NOT NULL ORDER BY position",
                )
                .map_err(backend)?;
            let rows = stmt
                .query_map(params![room], |r| {
                    Ok(Logged {
                        position: r.get::<_, i64>(0)? as u64,
                        sender: r.get::<_, i64>(1)? as u64,
                        bytes: Bytes::from(r.get::<_, Vec<u8>>(2)?),
                    })
                })
                .map_err(backend)?;
            rows.collect::<Result<_, _>>().map_err(backend)
        })
    }

    fn read_after(
        &self,
        room: &str,
        since: u64,
        until: u64,
        max_bytes: usize,
    ) -> StoreFuture<Vec<Logged>> {
        let room = room.to_owned();
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT position, sender, bytes FROM log
                     WHERE room = ?1 AND position > ?2 AND position <= ?3 ORDER BY position",
                )
                .map_err(backend)?;
            let rows = stmt
                .query_map(params![room, int(since)?, int(until)?], |r| {
                    Ok(Logged {
                        position: r.get::<_, i64>(0)? as u64,
                        sender: r.get::<_, i64>(1)? as u64,
                        bytes: Bytes::from(r.get::<_, Vec<u8>>(2)?),
                    })
                })
                .map_err(backend)?;
            let mut out = Vec::new();
            let mut bytes = 0;
            for row in rows {
                if !out.is_empty() && bytes >= max_bytes {
                    break;
                }
                let logged = row.map_err(backend)?;
                bytes += logged.bytes.len();
                out.push(logged);
            }
            Ok(out)
        })
    }

    fn expire_nodes(&self, ttl: Duration) -> StoreFuture<u64> {
        let (reply, rx) = oneshot::channel();
        self.send(Write::Expire { ttl, reply });
        answer(rx)
    }

    fn close(&self) -> StoreFuture<()> {
        let store = self.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || store.close_blocking())
                .await
                .map_err(|_| StoreError::Closed)
        })
    }
}

/// Bytes of write-ahead log past which the writer finishes a checkpoint itself (64 MiB; 1 MiB
/// in tests).
#[cfg(not(test))]
const WAL_LIMIT: u64 = 64 << 20;
#[cfg(test)]
const WAL_LIMIT: u64 = 1 << 20;

/// Copies the write-ahead log into the database every 200 ms without ever blocking the writer (a
/// passive checkpoint never waits for writers), and once more, fully, when the store closes.
/// Under a steady stream of commits such a checkpoint never reaches the log's end, and the log
/// starts over only once one has: the writer sees to that (see `write_loop`).
fn checkpoint_loop(conn: Connection, stop: std::sync::mpsc::Receiver<()>) {
    let every = Duration::from_millis(200);
    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(every) {
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!(error = %e, "WAL checkpoint failed");
        }
    }
    let _ = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
}

/// A commit this slow is logged with what its batch held.
const SLOW_COMMIT: Duration = Duration::from_millis(50);

fn write_loop(
    mut conn: Connection,
    mut queue: mpsc::UnboundedReceiver<Write>,
    metrics: Arc<Metrics>,
    wal: PathBuf,
) {
    // The log's size past which the writer tries the next checkpoint of its own.
    let mut checkpoint_past = WAL_LIMIT;
    const MAX_BATCH: usize = 1_024;
    let mut batch = Vec::with_capacity(MAX_BATCH);
    // Rooms whose appends fail until they are opened again.
    let mut poisoned: HashSet<String> = HashSet::new();
    while let Some(first) = queue.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let started = Instant::now();
        let before = poisoned.clone();
        let result = commit(&mut conn, &batch, &mut poisoned);
        let took = started.elapsed();
        metrics.store_commit(took, batch.len());
        if took >= SLOW_COMMIT {
            // What a stalled commit held, to tell a slow `COMMIT` (the log's write and sync) from
            // heavy statements.
            let (mut bytes, mut snapshots) = (0, 0);
            for write in &batch {
                if let Write::Append { entry, .. } = write {
                    bytes += entry.bytes.len();
                    snapshots += usize::from(entry.snapshot);
                }
            }
            let committing = result.as_ref().map_or(Duration::ZERO, |r| r.1);
            tracing::warn!(
                ms = took.as_millis() as u64,
                commit_ms = committing.as_millis() as u64,
                writes = batch.len(),
                bytes,
                snapshots,
                "slow store commit"
            );
        }
        let result = result.map(|r| r.0);
        match result {
            Ok(outcomes) => {
                for (write, outcome) in batch.drain(..).zip(outcomes) {
                    reply(write, outcome);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, entries = batch.len(), "store commit failed");
                // Nothing of the batch is on disk: every room with a write in it refuses its
                // later appends until it is opened again.
                poisoned = before;
                for write in batch.drain(..) {
                    if let Some(room) = write.room() {
                        poisoned.insert(room.to_owned());
                    }
                    reply(write, Err(e.clone()));
                }
            }
        }
        let wal_len = std::fs::metadata(&wal).map_or(0, |m| m.len());
        if wal_len <= WAL_LIMIT {
            checkpoint_past = WAL_LIMIT;
        } else if wal_len > checkpoint_past {
            // Between two batches no frame is added, so this checkpoint reaches the log's end
            // unless a reader holds an older snapshot; the next commit then starts the log over
            // (if no read is under way) and cuts its file back to `WAL_LIMIT`. It copies only
            // what the background checkpoint has not copied yet. Until the file is cut back, the
            // next try waits for another eighth of the limit, so that readers that keep the log
            // from starting over never put a database sync behind every batch.
            checkpoint_past = wal_len + WAL_LIMIT / 8;
            let started = Instant::now();
            let outcome = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            });
            let took = started.elapsed();
            match outcome {
                Ok((busy, frames, copied))
                    if took >= SLOW_COMMIT || busy != 0 || copied < frames =>
                {
                    tracing::warn!(
                        ms = took.as_millis() as u64,
                        busy,
                        frames,
                        copied,
                        "write-ahead log checkpoint by the writer was slow or stopped short"
                    )
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "WAL checkpoint failed"),
            }
        }
    }
    tracing::info!("store writer stopped: every queued write is committed");
}

fn reply(write: Write, outcome: Result<Outcome, StoreError>) {
    let mismatch = || StoreError::Corrupt("a write got another write's answer".into());
    match write {
        Write::Open { reply, .. } => {
            let _ = reply.send(outcome.and_then(|o| match o {
                Outcome::Opened(record) => Ok(record),
                _ => Err(mismatch()),
            }));
        }
        Write::Reserve { reply, .. } => {
            let _ = reply.send(outcome.and_then(|o| match o {
                Outcome::Reserved(first) => Ok(first),
                _ => Err(mismatch()),
            }));
        }
        Write::Append { reply, .. } => {
            let _ = reply.send(outcome.and_then(|o| match o {
                Outcome::Appended(appended) => Ok(appended),
                _ => Err(mismatch()),
            }));
        }
        Write::Expire { reply, .. } => {
            let _ = reply.send(outcome.and_then(|o| match o {
                Outcome::Expired(n) => Ok(n),
                _ => Err(mismatch()),
            }));
        }
    }
}

/// Commits a batch in one transaction, each write in its own savepoint. An append of a room in
/// `poisoned` is refused without being written; a write that fails poisons its room.
/// Returns each write's outcome and how long the final `COMMIT` took (writing the log's frames,
/// growing its file, and the sync).
#[allow(clippy::type_complexity)]
fn commit(
    conn: &mut Connection,
    batch: &[Write],
    poisoned: &mut HashSet<String>,
) -> Result<(Vec<Result<Outcome, StoreError>>, Duration), StoreError> {
    let tx = conn.transaction().map_err(backend)?;
    let mut outcomes = Vec::with_capacity(batch.len());
    let now = unix_ms();
    for write in batch {
        if let Write::Append { room, .. } = write {
            if poisoned.contains(room) {
                outcomes.push(Err(StoreError::Backend(
                    "an earlier write of this room failed; the room must be opened again".into(),
                )));
                continue;
            }
        }
        tx.execute_batch("SAVEPOINT write").map_err(backend)?;
        match apply(&tx, write, now) {
            Ok(outcome) => {
                tx.execute_batch("RELEASE write").map_err(backend)?;
                if let Write::Open { room, .. } = write {
                    poisoned.remove(room);
                }
                outcomes.push(Ok(outcome));
            }
            Err(e) => {
                tx.execute_batch("ROLLBACK TO write; RELEASE write")
                    .map_err(backend)?;
                tracing::error!(error = %e, room = write.room(), "a store write failed alone");
                if let Some(room) = write.room() {
                    poisoned.insert(room.to_owned());
                }
                outcomes.push(Err(e));
            }
        }
    }
    let syncing = Instant::now();
    tx.commit().map_err(backend)?;
    Ok((outcomes, syncing.elapsed()))
}

/// One write, inside its savepoint.
fn apply(tx: &Connection, write: &Write, now: i64) -> Result<Outcome, StoreError> {
    match write {
        Write::Append { room, entry, .. } => append(tx, room, entry, now).map(Outcome::Appended),
        Write::Open { room, config, .. } => {
            // A log identity below 2^53, so that it is a safe integer in JS too.
            let mut random = [0u8; 8];
            getrandom::fill(&mut random)
                .map_err(|e| StoreError::Backend(format!("no randomness: {e}")))?;
            let log = 1 + u64::from_le_bytes(random) % ((1 << 53) - 2);
            tx.execute(
                "INSERT OR IGNORE INTO rooms
                 (room, seed, multiplier, reset_interval, max_future, stale_window, log)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    room,
                    int(config.pattern.seed)?,
                    int(config.pattern.multiplier)?,
                    int(config.pattern.reset_interval)?,
                    int(config.max_future)?,
                    config.stale_window.map(int).transpose()?,
                    int(log)?
                ],
            )
            .map_err(backend)?;
            let first = reserve(tx, room, NODE_BLOCK)?;
            let mut record =
                load(tx, room)?.ok_or_else(|| StoreError::Corrupt(format!("no room {room:?}")))?;
            record.next_node = first;
            record.nodes_end = first + NODE_BLOCK;
            Ok(Outcome::Opened(record))
        }
        Write::Reserve { room, count, .. } => reserve(tx, room, *count).map(Outcome::Reserved),
        Write::Expire { ttl, .. } => {
            let before = now.saturating_sub(ttl.as_millis().min(i64::MAX as u128) as i64);
            let expired = tx
                .execute("DELETE FROM nodes WHERE last_seen < ?1", params![before])
                .map_err(backend)?;
            Ok(Outcome::Expired(expired as u64))
        }
    }
}

/// Moves `room`'s next node id `count` ahead; returns the first id of the block.
fn reserve(tx: &Connection, room: &str, count: u64) -> Result<NodeId, StoreError> {
    let end: i64 = tx
        .query_row(
            "UPDATE rooms SET next_node = next_node + ?2 WHERE room = ?1 RETURNING next_node",
            params![room, int(count)?],
            |r| r.get(0),
        )
        .optional()
        .map_err(backend)?
        .ok_or_else(|| StoreError::Corrupt(format!("no room {room:?}")))?;
    Ok(end as u64 - count)
}

fn append(tx: &Connection, room: &str, entry: &Append, now: i64) -> Result<Appended, StoreError> {
    let at: i64 = tx
        .prepare_cached(
            "UPDATE rooms SET position = position + 1, high = MAX(high, ?2) WHERE room = ?1
             RETURNING position",
        )
        .map_err(backend)?
        .query_row(params![room, int(entry.high)?], |r| r.get(0))
        .optional()
        .map_err(backend)?
        .ok_or_else(|| StoreError::Corrupt(format!("no room {room:?}")))?;
    let at = at as u64;
    let framed = with_position(&entry.bytes, at)
        .ok_or_else(|| StoreError::Corrupt("the frame already carries a position".into()))?;
    let mut bytes: i64 = tx
        .prepare_cached("UPDATE rooms SET bytes = bytes + ?2 WHERE room = ?1 RETURNING bytes")
        .map_err(backend)?
        .query_row(params![room, framed.len() as i64], |r| r.get(0))
        .map_err(backend)?;
    tx.prepare_cached(
        "INSERT INTO log (room, position, sender, step, doc, snapshot, bytes)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )
    .map_err(backend)?
    .execute(params![
        room,
        int(at)?,
        int(entry.sender)?,
        int(entry.step)?,
        entry.doc,
        entry.snapshot,
        &framed[..]
    ])
    .map_err(backend)?;
    if let Some(token) = entry.token {
        // The sender's record: created with its first stored message, kept up to date with
        // each, and expired once it has not been seen for the relay's node TTL.
        tx.prepare_cached(
            "INSERT INTO nodes (room, node, token, last_step, last_seen, user)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (room, node) DO UPDATE SET
                 last_step = MAX(last_step, excluded.last_step), last_seen = excluded.last_seen",
        )
        .map_err(backend)?
        .execute(params![
            room,
            int(entry.sender)?,
            &token[..],
            int(entry.step)?,
            now,
            entry.user as i64
        ])
        .map_err(backend)?;
    }
    if entry.snapshot {
        // The relay's snapshot of `doc` replaces the document entries of `doc` before it; one of
        // "*" (the whole document) replaces every document entry before it. Data entries (no
        // doc) are never compacted.
        let mut freed = 0i64;
        let mut stmt = tx
            .prepare_cached(
                "DELETE FROM log WHERE room = ?1 AND doc IS NOT NULL AND (doc = ?2 OR ?2 = '*')
                 AND position < ?3 RETURNING length(bytes)",
            )
            .map_err(backend)?;
        let mut rows = stmt
            .query(params![room, entry.doc, int(at)?])
            .map_err(backend)?;
        while let Some(row) = rows.next().map_err(backend)? {
            freed += row.get::<_, i64>(0).map_err(backend)?;
        }
        drop(rows);
        bytes = tx
            .query_row(
                "UPDATE rooms SET bytes = bytes - ?2 WHERE room = ?1 RETURNING bytes",
                params![room, freed],
                |r| r.get(0),
            )
            .map_err(backend)?;
    }
    Ok(Appended::Stored {
        position: at,
        bytes: bytes as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use pattern_mesh_core::wire::{Body, Frame, Json, Stamp};

    /// A data directory as the first relay (wire format 1, schema 1) left it.
    fn version_one(dir: &Path) {
        let conn = Connection::open(dir.join("relay.sqlite3")).unwrap();
        conn.execute_batch(
            "CREATE TABLE rooms (
                 room TEXT PRIMARY KEY,
                 seed INTEGER NOT NULL, multiplier INTEGER NOT NULL, reset_interval INTEGER NOT NULL,
                 max_future INTEGER NOT NULL, stale_window INTEGER,
                 high INTEGER NOT NULL DEFAULT 0, position INTEGER NOT NULL DEFAULT 0
             );
             CREATE TABLE nodes (
                 room TEXT NOT NULL, node INTEGER NOT NULL, token BLOB NOT NULL,
                 last_step INTEGER NOT NULL DEFAULT 0,
                 PRIMARY KEY (room, node)
             );
             CREATE TABLE log (
                 room TEXT NOT NULL, position INTEGER NOT NULL, sender INTEGER NOT NULL,
                 step INTEGER NOT NULL, doc TEXT, snapshot INTEGER NOT NULL, bytes BLOB NOT NULL,
                 PRIMARY KEY (room, position)
             ) WITHOUT ROWID;
             PRAGMA user_version = 1;
             INSERT INTO rooms VALUES ('r', 7, 7, 100, 1000, NULL, 2, 2);
             INSERT INTO nodes VALUES ('r', 3, zeroblob(16), 2);",
        )
        .unwrap();
        let data = Frame::stamped(
            Stamp {
                sender: 3,
                step: 1,
                pattern: 4,
            },
            Body::Data {
                data: Json::parse("1").unwrap(),
            },
        );
        let mut v1 = with_position(&data.encode(), 1).unwrap();
        v1[0] = 1;
        // A version-1 checkpoint (kind 0x12): no longer stored in version 2.
        let checkpoint = [1u8, 0x12, 2, 2, 3, 2, 1];
        // A version-1 snapshot that a member posted (kind 0x15, at position 3): a stamp, the
        // document's name, its state.
        let posted = [1u8, 0x15, 2, 3, 3, 3, 7, 1, b'*', 2, 0, 0];
        conn.execute(
            "INSERT INTO log VALUES ('r', 1, 3, 1, NULL, 0, ?1), ('r', 2, 3, 2, '*', 0, ?2),
                                    ('r', 3, 3, 3, '*', 1, ?3)",
            params![&v1[..], &checkpoint[..], &posted[..]],
        )
        .unwrap();
    }

    #[tokio::test]
    async fn a_version_one_directory_is_migrated_and_served_in_version_two() {
        let dir = std::env::temp_dir().join(format!("pm-sqlite-migrate-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        version_one(&dir);
        let store = SqliteStore::open(&dir, Arc::new(Metrics::default())).unwrap();
        let record = store.open_room("r", RoomConfig::default()).await.unwrap();
        assert_eq!(
            record.next_node, 4,
            "node ids continue above the known ones"
        );
        assert_eq!(
            store.find_node("r", [0; 16]).await.unwrap().map(|n| n.node),
            Some(3),
            "the node's record is kept, and found by its token"
        );
        assert_ne!(record.log, 0, "the room gets a log identity");
        let log = store.read_after("r", 0, 10, usize::MAX).await.unwrap();
        assert_eq!(log.len(), 2, "the checkpoint is gone");
        let frame = Frame::decode_positioned(&log[0].bytes, &Default::default()).unwrap();
        assert_eq!(frame.position, Some(1));
        assert!(matches!(frame.frame, Frame::Stamped(_)));
        let snapshot = Frame::decode_positioned(&log[1].bytes, &Default::default()).unwrap();
        assert_eq!(snapshot.position, Some(3));
        assert_eq!(
            snapshot.frame,
            Frame::Snapshot {
                doc: "*".into(),
                state: vec![0, 0]
            },
            "the posted snapshot is now the relay's"
        );
        let bytes: u64 = log.iter().map(|l| l.bytes.len() as u64).sum();
        assert_eq!(record.bytes, bytes);
        store.close_blocking();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_large_message_is_stored_and_read_back_in_a_page_of_its_own() {
        let dir = std::env::temp_dir().join(format!("pm-sqlite-large-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = SqliteStore::open(&dir, Arc::new(Metrics::default())).unwrap();
        store.open_room("r", RoomConfig::default()).await.unwrap();
        store.append("r", update(1, 50_000_000)).await.unwrap();
        for step in 2..20 {
            store.append("r", update(step, 20)).await.unwrap();
        }
        let page = store.read_after("r", 0, 20, 1 << 20).await.unwrap();
        assert_eq!(
            page.len(),
            1,
            "a page holds at least one entry, then stops at the budget"
        );
        assert!(page[0].bytes.len() > 50_000_000);
        let rest = store.read_after("r", 1, 20, 1 << 20).await.unwrap();
        assert_eq!(rest.len(), 18);
        store.close_blocking();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Under a steady stream of commits the write-ahead log stays near its limit instead of
    /// growing with everything ever written.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_write_ahead_log_stays_bounded_under_steady_writes() {
        let (dir, store) = fresh("wal");
        let store = Arc::new(store);
        let (writers, each, size) = (32, 250, 4_096);
        for w in 0..writers {
            store
                .open_room(&format!("r{w}"), RoomConfig::default())
                .await
                .unwrap();
        }
        let mut tasks = Vec::new();
        for w in 0..writers {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let room = format!("r{w}");
                for step in 1..=each {
                    store.append(&room, update(step, size)).await.unwrap();
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        let written = writers * each * size as u64;
        let wal = std::fs::metadata(dir.join("relay.sqlite3-wal"))
            .map(|m| m.len())
            .unwrap_or(0);
        let limit = WAL_LIMIT;
        assert!(
            wal <= 4 * limit,
            "the log is {wal} bytes after {written} bytes written (limit {limit})"
        );
        store.close_blocking();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A document update of `len` bytes from node 1.
    fn update(step: u64, len: usize) -> Append {
        Append {
            sender: 1,
            token: Some([1; 16]),
            user: 0,
            step,
            high: step,
            doc: Some("content".into()),
            snapshot: false,
            covers: 0,
            bytes: Bytes::from(
                Frame::stamped(
                    Stamp {
                        sender: 1,
                        step,
                        pattern: 1,
                    },
                    Body::Update {
                        doc: "content".into(),
                        update: vec![0; len],
                    },
                )
                .encode(),
            ),
        }
    }

    fn data(sender: u64, step: u64) -> Append {
        Append {
            sender,
            token: Some([sender as u8; 16]),
            // A user hash above i64::MAX, as half of them are.
            user: u64::MAX - sender,
            step,
            high: step,
            doc: None,
            snapshot: false,
            covers: 0,
            bytes: Bytes::from(
                Frame::stamped(
                    Stamp {
                        sender,
                        step,
                        pattern: 1,
                    },
                    Body::Data {
                        data: Json::parse("1").unwrap(),
                    },
                )
                .encode(),
            ),
        }
    }

    fn fresh(name: &str) -> (PathBuf, SqliteStore) {
        let dir = std::env::temp_dir().join(format!("pm-sqlite-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = SqliteStore::open(&dir, Arc::new(Metrics::default())).unwrap();
        (dir, store)
    }

    /// One entry the database cannot hold fails alone: its room refuses later appends until it
    /// is opened again, and the other rooms' entries in the same batch commit.
    #[test]
    fn a_write_that_fails_fails_alone_and_poisons_only_its_room() {
        let dir = std::env::temp_dir().join(format!("pm-sqlite-alone-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut conn = open(&dir.join("relay.sqlite3")).unwrap();
        migrate(&mut conn).unwrap();
        let write = |room: &str, entry: Append| Write::Append {
            room: room.into(),
            entry,
            reply: oneshot::channel().0,
        };
        let open_room = |room: &str| Write::Open {
            room: room.into(),
            config: RoomConfig::default(),
            reply: oneshot::channel().0,
        };
        let mut poisoned = HashSet::new();
        commit(&mut conn, &[open_room("a"), open_room("b")], &mut poisoned).unwrap();
        let mut huge = data(1, 1);
        huge.step = (1 << 63) + 4;
        let batch = [
            write("a", data(1, 1)),
            write("b", huge),
            write("a", data(1, 2)),
            write("b", data(1, 2)),
        ];
        let outcomes = commit(&mut conn, &batch, &mut poisoned).unwrap().0;
        let ok: Vec<bool> = outcomes.iter().map(Result::is_ok).collect();
        assert_eq!(ok, [true, false, true, false]);
        assert!(poisoned.contains("b") && !poisoned.contains("a"));
        let logged: i64 = conn
            .query_row("SELECT COUNT(*) FROM log WHERE room = 'a'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(logged, 2);
        let logged: i64 = conn
            .query_row("SELECT COUNT(*) FROM log WHERE room = 'b'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(logged, 0);
        commit(&mut conn, &[open_room("b")], &mut poisoned).unwrap();
        assert!(poisoned.is_empty(), "opening the room again clears it");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn every_opening_reserves_node_ids_of_its_own() {
        let (dir, store) = fresh("reserve");
        let first = store.open_room("r", RoomConfig::default()).await.unwrap();
        let more = store.reserve_nodes("r", 10).await.unwrap();
        let second = store.open_room("r", RoomConfig::default()).await.unwrap();
        assert_eq!(first.nodes_end - first.next_node, NODE_BLOCK);
        assert!(first.nodes_end <= more && more + 10 <= second.next_node);
        store.close_blocking();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A node's record comes with its first stored message, names its user, follows its steps,
    /// and goes once it has not been seen for the TTL.
    #[tokio::test]
    async fn node_records_follow_appends_and_expire() {
        let (dir, store) = fresh("nodes");
        store.open_room("r", RoomConfig::default()).await.unwrap();
        assert_eq!(store.find_node("r", [3; 16]).await.unwrap(), None);
        store.append("r", data(3, 5)).await.unwrap();
        store.append("r", data(3, 9)).await.unwrap();
        let record = store.find_node("r", [3; 16]).await.unwrap().unwrap();
        assert_eq!(
            (record.node, record.last_step, record.user),
            (3, 9, u64::MAX - 3)
        );
        assert_eq!(
            store.expire_nodes(Duration::from_secs(60)).await.unwrap(),
            0
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(
            store.expire_nodes(Duration::from_millis(10)).await.unwrap(),
            1
        );
        assert_eq!(store.find_node("r", [3; 16]).await.unwrap(), None);
        store.close_blocking();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The relay's snapshot replaces the document entries before it, never data, and the
    /// room's byte count follows.
    #[tokio::test]
    async fn a_snapshot_drops_the_document_before_it_and_the_bytes_follow() {
        let (dir, store) = fresh("compact");
        store.open_room("r", RoomConfig::default()).await.unwrap();
        let update = |step: u64| {
            let mut entry = data(1, step);
            entry.doc = Some("content".into());
            entry
        };
        store.append("r", data(1, 1)).await.unwrap();
        for step in 2..=5 {
            store.append("r", update(step)).await.unwrap();
        }
        let snapshot = Append {
            sender: 0,
            token: None,
            user: 0,
            step: 0,
            high: 5,
            doc: Some("*".into()),
            snapshot: true,
            covers: 0,
            bytes: Bytes::from(
                Frame::Snapshot {
                    doc: "*".into(),
                    state: vec![0, 0],
                }
                .encode(),
            ),
        };
        let Appended::Stored { position, bytes } = store.append("r", snapshot).await.unwrap()
        else {
            panic!("stored");
        };
        store.append("r", update(6)).await.unwrap();
        let log = store.read_after("r", 0, 100, usize::MAX).await.unwrap();
        let positions: Vec<u64> = log.iter().map(|l| l.position).collect();
        assert_eq!(positions, [1, position, position + 1]);
        let sum: u64 = log[..2].iter().map(|l| l.bytes.len() as u64).sum();
        assert_eq!(bytes, sum);
        let document = store.read_document("r").await.unwrap();
        assert_eq!(document.len(), 2, "the snapshot and the update after it");
        assert!(matches!(
            Frame::decode(&document[0].bytes),
            Ok(Frame::Snapshot { .. })
        ));
        store.close_blocking();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
