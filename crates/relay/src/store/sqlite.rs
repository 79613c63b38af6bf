//! The embedded store: SQLite in WAL mode, behind the core's [`Store`] trait.
//!
//! Writes go through one writer thread that owns a connection. It takes every write waiting in
//! its queue, commits them in one transaction (group commit), and only then answers each: an
//! answer always means "on disk" (`synchronous = FULL`). The writer assigns log positions, so
//! they follow the order in which appends were handed over. A write is handed over when the
//! method is called, not when its future is first polled.
//!
//! A commit that fails fails every write of its batch, and every room with an append in it
//! refuses later appends until it is loaded again (see the trait's contract): what a node has
//! stored stays a prefix of what it sent.
//!
//! Reads use their own connection, so a late joiner's catch-up never holds up writers; a third
//! connection moves the write-ahead log into the database file every 200 ms.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use pattern_mesh_core::pattern::PatternParams;
use pattern_mesh_core::room::Append;
use pattern_mesh_core::store::{
    Appended, Logged, NodeRecord, RoomRecord, Store, StoreError, StoreFuture,
};
use pattern_mesh_core::wire::{with_position, ResumeToken, RoomConfig};
use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::{mpsc, oneshot};

use crate::metrics::Metrics;

fn backend(e: rusqlite::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

enum Write {
    Room {
        room: String,
        config: RoomConfig,
        reply: oneshot::Sender<Result<RoomRecord, StoreError>>,
    },
    Node {
        room: String,
        node: NodeRecord,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    Append {
        room: String,
        entry: Append,
        reply: oneshot::Sender<Result<Appended, StoreError>>,
    },
}

type Checkpointer = (std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>);

/// The SQLite store. Cloning it shares the same writer and reader.
#[derive(Clone)]
pub struct SqliteStore {
    writes: Arc<Mutex<Option<mpsc::UnboundedSender<Write>>>>,
    reader: Arc<Mutex<Connection>>,
    writer: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
    checkpointer: Arc<Mutex<Option<Checkpointer>>>,
    /// Rooms whose appends fail until they are loaded again.
    failed: Arc<Mutex<HashSet<String>>>,
}

const SCHEMA_VERSION: i64 = 2;

fn open(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).map_err(backend)?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(backend)?;
    // FULL: a commit is on disk before the call returns, also across a power loss.
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(backend)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(backend)?;
    Ok(conn)
}

fn migrate(conn: &Connection) -> Result<(), StoreError> {
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
    Ok(())
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
        let writer_conn = open(&path)?;
        migrate(&writer_conn)?;
        // The writer never checkpoints: a checkpoint copies and syncs the database file, which
        // would stall commits for tens of milliseconds. A separate thread does it instead.
        writer_conn
            .pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(backend)?;
        let reader = open(&path)?;
        let checkpoint_conn = open(&path)?;
        let (stop_checkpoints, stopped) = std::sync::mpsc::channel::<()>();
        let checkpoints = std::thread::Builder::new()
            .name("store-checkpoint".into())
            .spawn(move || checkpoint_loop(checkpoint_conn, stopped))
            .map_err(|e| StoreError::Backend(format!("cannot start the checkpointer: {e}")))?;
        let failed = Arc::new(Mutex::new(HashSet::new()));
        let (writes, queue) = mpsc::unbounded_channel();
        let writer_failed = failed.clone();
        let handle = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || write_loop(writer_conn, queue, metrics, writer_failed))
            .map_err(|e| StoreError::Backend(format!("cannot start the writer: {e}")))?;
        Ok(Self {
            writes: Arc::new(Mutex::new(Some(writes))),
            reader: Arc::new(Mutex::new(reader)),
            writer: Arc::new(Mutex::new(Some(handle))),
            checkpointer: Arc::new(Mutex::new(Some((stop_checkpoints, checkpoints)))),
            failed,
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
    let row = conn
        .query_row(
            "SELECT seed, multiplier, reset_interval, max_future, stale_window, high, position,
                    next_node, log
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
                    r.get::<_, i64>(7)? as u64,
                    r.get::<_, i64>(8)? as u64,
                ))
            },
        )
        .optional()
        .map_err(backend)?;
    let Some((config, high, position, next_node, log)) = row else {
        return Ok(None);
    };
    let mut stmt = conn
        .prepare_cached("SELECT node, token, last_step FROM nodes WHERE room = ?1")
        .map_err(backend)?;
    let nodes = stmt
        .query_map(params![room], |r| {
            Ok((
                r.get::<_, i64>(0)? as u64,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, i64>(2)? as u64,
            ))
        })
        .map_err(backend)?
        .map(|row| {
            let (node, token, last_step) = row.map_err(backend)?;
            let token = ResumeToken::try_from(token.as_slice())
                .map_err(|_| StoreError::Corrupt("a resume token is not 16 bytes".into()))?;
            Ok(NodeRecord {
                node,
                token,
                last_step,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    Ok(Some(RoomRecord {
        config,
        high,
        position,
        next_node,
        log,
        nodes,
    }))
}

impl Store for SqliteStore {
    fn load_room(&self, room: &str) -> StoreFuture<Option<RoomRecord>> {
        self.failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(room);
        let room = room.to_owned();
        self.read(move |conn| load(conn, &room))
    }

    fn create_room(&self, room: &str, config: RoomConfig) -> StoreFuture<RoomRecord> {
        let (reply, rx) = oneshot::channel();
        self.send(Write::Room {
            room: room.to_owned(),
            config,
            reply,
        });
        answer(rx)
    }

    fn register_node(&self, room: &str, node: NodeRecord) -> StoreFuture<()> {
        let (reply, rx) = oneshot::channel();
        self.send(Write::Node {
            room: room.to_owned(),
            node,
            reply,
        });
        answer(rx)
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

    fn close(&self) -> StoreFuture<()> {
        let store = self.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || store.close_blocking())
                .await
                .map_err(|_| StoreError::Closed)
        })
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

/// What a committed write answers.
enum Outcome {
    Room(RoomRecord),
    Node,
    Appended(Appended),
}

fn write_loop(
    mut conn: Connection,
    mut queue: mpsc::UnboundedReceiver<Write>,
    metrics: Arc<Metrics>,
    failed: Arc<Mutex<HashSet<String>>>,
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
        let poisoned: HashSet<String> = failed.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let result = commit(&mut conn, &batch, &poisoned);
        metrics.store_commit(started.elapsed(), batch.len());
        match result {
            Ok(outcomes) => {
                for (write, outcome) in batch.drain(..).zip(outcomes) {
                    reply(write, Ok(outcome));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, entries = batch.len(), "store commit failed");
                let mut failed = failed.lock().unwrap_or_else(|e| e.into_inner());
                for write in batch.drain(..) {
                    if let Write::Append { room, .. } = &write {
                        failed.insert(room.clone());
                    }
                    reply(write, Err(e.clone()));
                }
            }
        }
    }
    tracing::info!("store writer stopped: every queued write is committed");
}

fn reply(write: Write, outcome: Result<Option<Outcome>, StoreError>) {
    match write {
        Write::Room { reply, .. } => {
            let _ = reply.send(outcome.and_then(|o| match o {
                Some(Outcome::Room(record)) => Ok(record),
                _ => Err(StoreError::Corrupt("the room was not created".into())),
            }));
        }
        Write::Node { reply, .. } => {
            let _ = reply.send(outcome.map(|_| ()));
        }
        Write::Append { reply, .. } => {
            let _ = reply.send(outcome.and_then(|o| match o {
                Some(Outcome::Appended(appended)) => Ok(appended),
                Some(_) => Err(StoreError::Corrupt("an append without an answer".into())),
                None => Err(StoreError::Backend(
                    "an earlier append of this room failed; the room must be loaded again".into(),
                )),
            }));
        }
    }
}

/// Commits a batch in one transaction. An append of a room in `poisoned` is answered with
/// `None` (refused) without being written.
fn commit(
    conn: &mut Connection,
    batch: &[Write],
    poisoned: &HashSet<String>,
) -> Result<Vec<Option<Outcome>>, StoreError> {
    let tx = conn.transaction().map_err(backend)?;
    let mut outcomes = Vec::with_capacity(batch.len());
    {
        let mut position = tx
            .prepare_cached(
                "UPDATE rooms SET position = position + 1, high = MAX(high, ?2) WHERE room = ?1
                 RETURNING position",
            )
            .map_err(backend)?;
        let mut append = tx
            .prepare_cached(
                "INSERT INTO log (room, position, sender, step, doc, snapshot, bytes)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )
            .map_err(backend)?;
        let mut last = tx
            .prepare_cached(
                "UPDATE nodes SET last_step = MAX(last_step, ?3) WHERE room = ?1 AND node = ?2",
            )
            .map_err(backend)?;
        // A snapshot of `doc` replaces the document entries of `doc` before it; a snapshot of
        // "*" (the whole document) replaces every document entry before it. Data entries (no
        // doc) are never compacted.
        let mut compact = tx
            .prepare_cached(
                "DELETE FROM log WHERE room = ?1 AND doc IS NOT NULL AND (doc = ?2 OR ?2 = '*')
                 AND position < ?3",
            )
            .map_err(backend)?;
        for write in batch {
            match write {
                Write::Append { room, entry, .. } => {
                    if poisoned.contains(room) {
                        outcomes.push(None);
                        continue;
                    }
                    let at: i64 = position
                        .query_row(params![room, int(entry.high)?], |r| r.get(0))
                        .optional()
                        .map_err(backend)?
                        .ok_or_else(|| StoreError::Corrupt(format!("no room {room:?}")))?;
                    let at = at as u64;
                    let bytes = with_position(&entry.bytes, at).ok_or_else(|| {
                        StoreError::Corrupt("the frame already carries a position".into())
                    })?;
                    append
                        .execute(params![
                            room,
                            int(at)?,
                            int(entry.sender)?,
                            int(entry.step)?,
                            entry.doc,
                            entry.snapshot,
                            &bytes[..]
                        ])
                        .map_err(backend)?;
                    last.execute(params![room, int(entry.sender)?, int(entry.step)?])
                        .map_err(backend)?;
                    if entry.snapshot {
                        compact
                            .execute(params![room, entry.doc, int(at)?])
                            .map_err(backend)?;
                    }
                    outcomes.push(Some(Outcome::Appended(Appended::Stored { position: at })));
                }
                Write::Room { room, config, .. } => {
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
                    let record = load(&tx, room)?
                        .ok_or_else(|| StoreError::Corrupt(format!("no room {room:?}")))?;
                    outcomes.push(Some(Outcome::Room(record)));
                }
                Write::Node { room, node, .. } => {
                    tx.execute(
                        "INSERT OR REPLACE INTO nodes (room, node, token, last_step)
                         VALUES (?1, ?2, ?3, ?4)",
                        params![room, int(node.node)?, &node.token[..], int(node.last_step)?],
                    )
                    .map_err(backend)?;
                    tx.execute(
                        "UPDATE rooms SET next_node = MAX(next_node, ?2 + 1) WHERE room = ?1",
                        params![room, int(node.node)?],
                    )
                    .map_err(backend)?;
                    outcomes.push(Some(Outcome::Node));
                }
            }
        }
    }
    tx.commit().map_err(backend)?;
    Ok(outcomes)
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
        conn.execute(
            "INSERT INTO log VALUES ('r', 1, 3, 1, NULL, 0, ?1), ('r', 2, 3, 2, '*', 0, ?2)",
            params![&v1[..], &checkpoint[..]],
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
        let record = store.load_room("r").await.unwrap().unwrap();
        assert_eq!(
            record.next_node, 4,
            "node ids continue above the known ones"
        );
        assert_ne!(record.log, 0, "the room gets a log identity");
        let log = store.read_after("r", 0, 10, usize::MAX).await.unwrap();
        assert_eq!(log.len(), 1, "the checkpoint is gone");
        let frame = Frame::decode_positioned(&log[0].bytes, &Default::default()).unwrap();
        assert_eq!(frame.position, Some(1));
        assert!(matches!(frame.frame, Frame::Stamped(_)));
        store.close_blocking();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_large_message_is_stored_and_read_back_in_a_page_of_its_own() {
        let dir = std::env::temp_dir().join(format!("pm-sqlite-large-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = SqliteStore::open(&dir, Arc::new(Metrics::default())).unwrap();
        store.create_room("r", RoomConfig::default()).await.unwrap();
        let entry = |step: u64, len: usize| Append {
            sender: 1,
            step,
            high: step,
            doc: Some("content".into()),
            snapshot: false,
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
        };
        store.append("r", entry(1, 50_000_000)).await.unwrap();
        for step in 2..20 {
            store.append("r", entry(step, 20)).await.unwrap();
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
}
