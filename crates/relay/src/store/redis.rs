//! Room logs in Redis, shared by any number of relays: [`RedisStore`] and its [`Feed`].
//!
//! Each room has four keys, all with the room in a hash tag (`pm:{room}:...`) so that a Redis
//! Cluster keeps a room on one shard and every script touches one slot:
//!
//! - `pm:{room}:room`, a hash: the room's settings, its step (`high`), last position, next node
//!   id, log identity, bytes logged, and the position of its last whole-document snapshot;
//! - `pm:{room}:log`, a stream: one entry per logged message, whose id is `<position>-0`, with
//!   its sender, step, the room's step with it, its document, and the frame without a position
//!   (a reader puts the position in the header);
//! - `pm:{room}:tokens`, a hash from resume token to `"<node> <last stored step> <ms seen>"`;
//! - `pm:{room}:nodes`, a hash from node id to its token.
//!
//! **Checks with the append.** One script makes the checks that need the state of the whole
//! room, atomically with the append, since no relay sees every message of the room: a step at or
//! below its node's last stored step is refused as `replay` (another relay stored it first), a
//! token that is not its node's as `senderMismatch`; the room's step moves by one when the
//! message's step is above it; the position is the next one. The rules are those of
//! [`pattern_mesh_core::store::MemoryStore::append_shared_now`].
//!
//! **Order.** Appends go through one writer task that sends them to Redis in the order they were
//! made, pipelined: a room's appends are positioned in that order. Once an append of a room
//! fails, every later append of it fails too until the room is opened again, so that a node's
//! stored messages stay a prefix of what it sent (its client reads `replay` as "stored").
//!
//! **Durability.** An append is answered once Redis answered the script. That is durable when
//! Redis runs with `appendonly yes` and `appendfsync always` (it writes and fsyncs its AOF before
//! it answers); see the README.
//!
//! **Fan-out.** The [`Feed`] reads the new entries of every room this relay has open with one
//! blocking `XREAD` over all their streams, on a connection of its own, and hands each room its
//! entries; an idle relay waits in one blocked read, and a room without members is not read.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use pattern_mesh_core::pattern::PatternParams;
use pattern_mesh_core::room::{Append, NODE_BLOCK};
use pattern_mesh_core::store::{
    Appended, Followed, Logged, NodeRecord, RoomRecord, Store, StoreError, StoreFuture,
};
use pattern_mesh_core::wire::{with_position, NodeId, Reason, ResumeToken, RoomConfig};
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Value};
use tokio::sync::{mpsc, oneshot, Notify};

/// Opens a room, creating it unless it exists, and reserves a block of node ids.
const OPEN: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'seed', ARGV[1], 'multiplier', ARGV[2], 'reset', ARGV[3],
    'future', ARGV[4], 'stale', ARGV[5], 'high', 0, 'position', 0, 'next_node', 1,
    'log', ARGV[6], 'bytes', 0, 'snapshot', 0)
end
local ending = redis.call('HINCRBY', KEYS[1], 'next_node', ARGV[7])
return {ending, redis.call('HMGET', KEYS[1], 'seed', 'multiplier', 'reset', 'future', 'stale',
  'high', 'position', 'log', 'bytes')}
"#;

/// Appends a message, with the checks that need the room's state. KEYS: room, tokens, nodes,
/// log. ARGV: sender, token ("" for none), step, snapshot ("1"/"0"), document ("" for none),
/// frame, milliseconds now.
const APPEND: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'gone'}
end
local sender, token, step = ARGV[1], ARGV[2], tonumber(ARGV[3])
if token ~= '' then
  local record = redis.call('HGET', KEYS[2], token)
  if record then
    local node, last = string.match(record, '^(%d+) (%d+)')
    if node ~= sender then
      return {'refused', 'senderMismatch', 'this resume token belongs to node ' .. node .. ', not ' .. sender}
    end
    if step <= tonumber(last) then
      return {'refused', 'replay', 'step ' .. ARGV[3] .. ' of node ' .. sender ..
        ' is not above its last stored step ' .. last .. ': it was stored through another relay'}
    end
  else
    local owner = redis.call('HGET', KEYS[3], sender)
    if owner and owner ~= token then
      return {'refused', 'senderMismatch', 'node ' .. sender .. ' belongs to another resume token'}
    end
    redis.call('HSET', KEYS[3], sender, token)
  end
  redis.call('HSET', KEYS[2], token, sender .. ' ' .. ARGV[3] .. ' ' .. ARGV[7])
end
local high = redis.call('HGET', KEYS[1], 'high')
if ARGV[4] ~= '1' and step > tonumber(high) then
  high = redis.call('HINCRBY', KEYS[1], 'high', 1)
end
local position = redis.call('HINCRBY', KEYS[1], 'position', 1)
local bytes = redis.call('HINCRBY', KEYS[1], 'bytes', string.len(ARGV[6]))
if ARGV[4] == '1' then
  redis.call('HSET', KEYS[1], 'snapshot', position)
end
redis.call('XADD', KEYS[4], position .. '-0', 's', sender, 't', ARGV[3], 'h', high,
  'd', ARGV[5], 'f', ARGV[6])
return {'stored', position, bytes}
"#;

/// Deletes the records of nodes not seen since ARGV[1] (milliseconds). KEYS: tokens, nodes.
const EXPIRE: &str = r#"
local gone = 0
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local node, seen = string.match(all[i + 1], '^(%d+) %d+ (%d+)')
  if seen and tonumber(seen) < tonumber(ARGV[1]) then
    redis.call('HDEL', KEYS[1], all[i])
    redis.call('HDEL', KEYS[2], node)
    gone = gone + 1
  end
end
return gone
"#;

/// Entries read at a time from a room's stream.
const PAGE: usize = 256;

/// The keys of a room. Braces and `%` in the name are escaped, so that the hash tag is the whole
/// name and two names never share keys.
#[derive(Debug, Clone)]
struct Keys {
    room: String,
    log: String,
    tokens: String,
    nodes: String,
}

impl Keys {
    fn of(room: &str) -> Self {
        let mut tag = String::with_capacity(room.len());
        for c in room.chars() {
            match c {
                '%' => tag.push_str("%25"),
                '{' => tag.push_str("%7B"),
                '}' => tag.push_str("%7D"),
                c => tag.push(c),
            }
        }
        Self {
            room: format!("pm:{{{tag}}}:room"),
            log: format!("pm:{{{tag}}}:log"),
            tokens: format!("pm:{{{tag}}}:tokens"),
            nodes: format!("pm:{{{tag}}}:nodes"),
        }
    }
}

fn backend(e: redis::RedisError) -> StoreError {
    StoreError::Backend(format!("redis: {e}"))
}

/// Whether a command failed because the connection did (it is reconnecting): worth one more try.
fn dropped(e: &redis::RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_timeout()
}

/// Runs a command that is safe to run twice, once more if the connection had dropped (a Redis
/// that restarted costs the first command after it).
async fn query<T: redis::FromRedisValue>(
    conn: &ConnectionManager,
    cmd: &redis::Cmd,
) -> Result<T, StoreError> {
    match cmd.query_async(&mut conn.clone()).await {
        Err(e) if dropped(&e) => {
            tokio::time::sleep(Duration::from_millis(100)).await;
            cmd.query_async(&mut conn.clone()).await.map_err(backend)
        }
        answer => answer.map_err(backend),
    }
}

/// [`query`] for a script.
async fn invoke<T: redis::FromRedisValue>(
    conn: &ConnectionManager,
    invocation: &redis::ScriptInvocation<'_>,
) -> Result<T, StoreError> {
    match invocation.invoke_async(&mut conn.clone()).await {
        Err(e) if dropped(&e) => {
            tokio::time::sleep(Duration::from_millis(100)).await;
            invocation
                .invoke_async(&mut conn.clone())
                .await
                .map_err(backend)
        }
        answer => answer.map_err(backend),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn int(value: &Value) -> Result<u64, StoreError> {
    match value {
        Value::Int(i) => u64::try_from(*i).map_err(|_| corrupt("a negative number")),
        Value::BulkString(b) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| corrupt("a number that does not parse")),
        Value::SimpleString(s) => s
            .parse()
            .map_err(|_| corrupt("a number that does not parse")),
        other => Err(corrupt(&format!("a number expected, {other:?} found"))),
    }
}

fn text(value: &Value) -> Result<String, StoreError> {
    match value {
        Value::BulkString(b) => Ok(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Ok(s.clone()),
        Value::Int(i) => Ok(i.to_string()),
        other => Err(corrupt(&format!("a string expected, {other:?} found"))),
    }
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(format!("redis answered {what}"))
}

fn array(value: Value) -> Result<Vec<Value>, StoreError> {
    match value {
        Value::Array(items) => Ok(items),
        Value::Nil => Ok(Vec::new()),
        other => Err(corrupt(&format!("an array expected, {other:?} found"))),
    }
}

/// One stream entry: `[id, [field, value, ...]]`, as a followed entry.
fn entry(value: Value) -> Result<(Followed, Option<String>), StoreError> {
    let mut parts = array(value)?.into_iter();
    let (Some(id), Some(fields)) = (parts.next(), parts.next()) else {
        return Err(corrupt("a stream entry without fields"));
    };
    let id = text(&id)?;
    let position: u64 = id
        .split('-')
        .next()
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| corrupt("a stream entry id that is not a position"))?;
    let (mut sender, mut step, mut high, mut doc, mut frame) = (0, 0, 0, None, None);
    let mut fields = array(fields)?.into_iter();
    while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
        match text(&name)?.as_str() {
            "s" => sender = int(&value)?,
            "t" => step = int(&value)?,
            "h" => high = int(&value)?,
            "d" => doc = Some(text(&value)?).filter(|d| !d.is_empty()),
            "f" => {
                frame = match value {
                    Value::BulkString(b) => Some(b),
                    _ => return Err(corrupt("a frame that is not a byte string")),
                }
            }
            _ => {}
        }
    }
    let frame = frame.ok_or_else(|| corrupt("a stream entry without a frame"))?;
    let bytes = with_position(&frame, position)
        .ok_or_else(|| StoreError::Corrupt(format!("entry {position} holds no frame")))?;
    Ok((
        Followed {
            position,
            sender,
            step,
            high,
            bytes: Bytes::from(bytes),
        },
        doc,
    ))
}

fn logged(followed: Followed) -> Logged {
    Logged {
        position: followed.position,
        sender: followed.sender,
        bytes: followed.bytes,
    }
}

/// An append for the writer.
struct Write {
    room: String,
    entry: Append,
    reply: oneshot::Sender<Result<Appended, StoreError>>,
}

struct Scripts {
    open: redis::Script,
    append: redis::Script,
    expire: redis::Script,
}

/// The room logs of any number of relays, in one Redis.
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    scripts: Arc<Scripts>,
    writes: mpsc::UnboundedSender<Write>,
    /// Rooms whose appends fail until they are opened again.
    failed: Arc<Mutex<HashSet<String>>>,
}

impl RedisStore {
    /// Connects to the Redis at `url` (`redis://host:port`) and starts the writer; answers with
    /// the store and the feed that follows the logs of the rooms this relay opens.
    pub async fn open(url: &str) -> Result<(Self, Feed), StoreError> {
        let client = redis::Client::open(url).map_err(backend)?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(Duration::from_secs(10)))
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_number_of_retries(3);
        let conn = client
            .get_connection_manager_with_config(config)
            .await
            .map_err(backend)?;
        let scripts = Arc::new(Scripts {
            open: redis::Script::new(OPEN),
            append: redis::Script::new(APPEND),
            expire: redis::Script::new(EXPIRE),
        });
        let (writes, queue) = mpsc::unbounded_channel();
        let failed = Arc::new(Mutex::new(HashSet::new()));
        tokio::spawn(write_loop(
            conn.clone(),
            scripts.clone(),
            queue,
            failed.clone(),
        ));
        let feed = Feed::start(client, conn.clone());
        Ok((
            Self {
                conn,
                scripts,
                writes,
                failed,
            },
            feed,
        ))
    }

    fn failed(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.failed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The log of `room` from position `from` (inclusive) to `until`, at most about
    /// `max_bytes`, with each entry's document.
    async fn range(
        conn: ConnectionManager,
        room: &str,
        from: u64,
        until: u64,
        max_bytes: usize,
    ) -> Result<Vec<(Followed, Option<String>)>, StoreError> {
        let keys = Keys::of(room);
        let mut out = Vec::new();
        let mut bytes = 0;
        let mut start = from;
        while start <= until {
            let mut xrange = redis::cmd("XRANGE");
            xrange
                .arg(&keys.log)
                .arg(format!("{start}-0"))
                .arg(format!("{until}-0"))
                .arg("COUNT")
                .arg(PAGE);
            let page: Value = query(&conn, &xrange).await?;
            let page = array(page)?;
            let full = page.len() == PAGE;
            for value in page {
                let (followed, doc) = entry(value)?;
                start = followed.position + 1;
                bytes += followed.bytes.len();
                out.push((followed, doc));
                if bytes >= max_bytes {
                    return Ok(out);
                }
            }
            if !full {
                break;
            }
        }
        Ok(out)
    }
}

/// Sends appends to Redis in the order they were made, as many at once as are waiting, in one
/// pipeline; a room whose append failed fails its later appends until it is opened again.
async fn write_loop(
    mut conn: ConnectionManager,
    scripts: Arc<Scripts>,
    mut queue: mpsc::UnboundedReceiver<Write>,
    failed: Arc<Mutex<HashSet<String>>>,
) {
    let lock = |f: &Arc<Mutex<HashSet<String>>>| {
        f.lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect::<HashSet<String>>()
    };
    let mut batch = Vec::new();
    while queue.recv_many(&mut batch, 512).await > 0 {
        let mut doomed = lock(&failed);
        let mut sent = Vec::with_capacity(batch.len());
        let mut pipe = redis::pipe();
        for write in batch.drain(..) {
            if doomed.contains(&write.room) {
                let _ = write.reply.send(Err(StoreError::Backend(
                    "an earlier append of this room failed; it is opened again on the next join"
                        .into(),
                )));
                continue;
            }
            let keys = Keys::of(&write.room);
            let entry = &write.entry;
            let token = entry.token.map(|t| t.to_vec()).unwrap_or_default();
            pipe.cmd("EVALSHA")
                .arg(scripts.append.get_hash())
                .arg(4)
                .arg(&keys.room)
                .arg(&keys.tokens)
                .arg(&keys.nodes)
                .arg(&keys.log)
                .arg(entry.sender)
                .arg(token)
                .arg(entry.step)
                .arg(if entry.snapshot { "1" } else { "0" })
                .arg(entry.doc.as_deref().unwrap_or(""))
                .arg(entry.bytes.as_ref())
                .arg(now_ms());
            sent.push(write);
        }
        if sent.is_empty() {
            continue;
        }
        let mut answer: Result<Vec<Value>, redis::RedisError> = pipe.query_async(&mut conn).await;
        if matches!(&answer, Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript))
        {
            // Redis restarted and forgot its scripts; nothing of the batch ran.
            let loaded = scripts.append.prepare_invoke().load_async(&mut conn).await;
            answer = match loaded {
                Ok(_) => pipe.query_async(&mut conn).await,
                Err(e) => Err(e),
            };
        }
        match answer {
            Ok(values) if values.len() == sent.len() => {
                for (write, value) in sent.into_iter().zip(values) {
                    let result = appended(value);
                    if result.is_err() {
                        doomed.insert(write.room.clone());
                        failed
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(write.room.clone());
                    }
                    let _ = write.reply.send(result);
                }
            }
            other => {
                let error = match other {
                    Err(e) => backend(e),
                    Ok(_) => corrupt("a pipeline answer of the wrong length"),
                };
                let mut rooms = failed.lock().unwrap_or_else(|e| e.into_inner());
                for write in sent {
                    rooms.insert(write.room.clone());
                    let _ = write.reply.send(Err(error.clone()));
                }
            }
        }
    }
}

/// The append script's answer.
fn appended(value: Value) -> Result<Appended, StoreError> {
    let parts = array(value)?;
    match parts.first().map(text).transpose()?.as_deref() {
        Some("stored") if parts.len() == 3 => Ok(Appended::Stored {
            position: int(&parts[1])?,
            bytes: int(&parts[2])?,
        }),
        Some("refused") if parts.len() == 3 => {
            let reason = match text(&parts[1])?.as_str() {
                "replay" => Reason::Replay,
                _ => Reason::SenderMismatch,
            };
            Ok(Appended::Refused {
                reason,
                detail: text(&parts[2])?,
            })
        }
        Some("gone") => Err(StoreError::Corrupt(
            "the room is gone from the store; it is created again on the next join".into(),
        )),
        _ => Err(corrupt("an append answer it does not know")),
    }
}

impl Store for RedisStore {
    fn open_room(&self, room: &str, config: RoomConfig) -> StoreFuture<RoomRecord> {
        let (conn, scripts, keys) = (self.conn.clone(), self.scripts.clone(), Keys::of(room));
        self.failed().remove(room);
        Box::pin(async move {
            // A log identity of its own for a room created now (53 bits: Lua keeps it exact).
            let mut log = [0u8; 8];
            getrandom::fill(&mut log).map_err(|e| StoreError::Backend(e.to_string()))?;
            let log = (u64::from_le_bytes(log) >> 11).max(1);
            let mut open = scripts.open.key(&keys.room);
            open.arg(config.pattern.seed)
                .arg(config.pattern.multiplier)
                .arg(config.pattern.reset_interval)
                .arg(config.max_future)
                .arg(config.stale_window.map_or(String::new(), |w| w.to_string()))
                .arg(log)
                .arg(NODE_BLOCK);
            let answer: Value = invoke(&conn, &open).await?;
            let mut parts = array(answer)?.into_iter();
            let (Some(ending), Some(fields)) = (parts.next(), parts.next()) else {
                return Err(corrupt("a room without its fields"));
            };
            let ending = int(&ending)?;
            let f = array(fields)?;
            if f.len() != 9 {
                return Err(corrupt("a room without its fields"));
            }
            let stale = text(&f[4])?;
            Ok(RoomRecord {
                config: RoomConfig {
                    pattern: PatternParams {
                        seed: int(&f[0])?,
                        multiplier: int(&f[1])?,
                        reset_interval: int(&f[2])?,
                    },
                    max_future: int(&f[3])?,
                    stale_window: if stale.is_empty() {
                        None
                    } else {
                        Some(int(&f[4])?)
                    },
                },
                high: int(&f[5])?,
                position: int(&f[6])?,
                next_node: ending - NODE_BLOCK,
                nodes_end: ending,
                log: int(&f[7])?,
                bytes: int(&f[8])?,
            })
        })
    }

    fn reserve_nodes(&self, room: &str, count: u64) -> StoreFuture<NodeId> {
        let (conn, keys) = (self.conn.clone(), Keys::of(room));
        Box::pin(async move {
            // Run twice, it only leaves a block unused.
            let mut hincrby = redis::cmd("HINCRBY");
            hincrby.arg(&keys.room).arg("next_node").arg(count);
            let ending: u64 = query(&conn, &hincrby).await?;
            Ok(ending - count)
        })
    }

    fn find_node(&self, room: &str, token: ResumeToken) -> StoreFuture<Option<NodeRecord>> {
        let (conn, keys) = (self.conn.clone(), Keys::of(room));
        Box::pin(async move {
            let mut hget = redis::cmd("HGET");
            hget.arg(&keys.tokens).arg(token.as_slice());
            let record: Option<String> = query(&conn, &hget).await?;
            let Some(record) = record else {
                return Ok(None);
            };
            let mut fields = record.split(' ').map(str::parse::<u64>);
            match (fields.next(), fields.next()) {
                (Some(Ok(node)), Some(Ok(last_step))) => Ok(Some(NodeRecord {
                    node,
                    token,
                    last_step,
                })),
                _ => Err(StoreError::Corrupt(format!("a node record {record:?}"))),
            }
        })
    }

    fn append(&self, room: &str, entry: Append) -> StoreFuture<Appended> {
        let (reply, answer) = oneshot::channel();
        let write = Write {
            room: room.to_owned(),
            entry,
            reply,
        };
        if self.writes.send(write).is_err() {
            return Box::pin(std::future::ready(Err(StoreError::Closed)));
        }
        Box::pin(async move { answer.await.map_err(|_| StoreError::Closed)? })
    }

    fn read_document(&self, room: &str) -> StoreFuture<Vec<Logged>> {
        let (conn, keys, room) = (self.conn.clone(), Keys::of(room), room.to_owned());
        Box::pin(async move {
            let mut hget = redis::cmd("HGET");
            hget.arg(&keys.room).arg("snapshot");
            let snapshot: Option<u64> = query(&conn, &hget).await?;
            let from = snapshot.unwrap_or(0).max(1);
            let entries = Self::range(conn, &room, from, u64::MAX >> 11, usize::MAX).await?;
            Ok(entries
                .into_iter()
                .filter(|(_, doc)| doc.is_some())
                .map(|(followed, _)| logged(followed))
                .collect())
        })
    }

    fn read_after(
        &self,
        room: &str,
        since: u64,
        until: u64,
        max_bytes: usize,
    ) -> StoreFuture<Vec<Logged>> {
        let (conn, room) = (self.conn.clone(), room.to_owned());
        Box::pin(async move {
            if until <= since {
                return Ok(Vec::new());
            }
            let entries = Self::range(conn, &room, since + 1, until, max_bytes.max(1)).await?;
            Ok(entries.into_iter().map(|(f, _)| logged(f)).collect())
        })
    }

    fn expire_nodes(&self, ttl: Duration) -> StoreFuture<u64> {
        let (conn, scripts) = (self.conn.clone(), self.scripts.clone());
        Box::pin(async move {
            let cutoff = now_ms().saturating_sub(ttl.as_millis() as u64);
            let mut cursor = 0u64;
            let mut gone = 0;
            loop {
                let mut scan = redis::cmd("SCAN");
                scan.arg(cursor)
                    .arg("MATCH")
                    .arg("pm:{*}:tokens")
                    .arg("COUNT")
                    .arg(500);
                let (next, keys): (u64, Vec<String>) = query(&conn, &scan).await?;
                for key in keys {
                    let nodes = format!("{}:nodes", key.trim_end_matches(":tokens"));
                    let mut expire = scripts.expire.key(&key);
                    expire.key(&nodes).arg(cutoff);
                    let n: u64 = invoke(&conn, &expire).await?;
                    gone += n;
                }
                cursor = next;
                if cursor == 0 {
                    return Ok(gone);
                }
            }
        })
    }

    fn close(&self) -> StoreFuture<()> {
        Box::pin(std::future::ready(Ok(())))
    }
}

/// A room the feed follows: where it is, and where its entries go.
struct Watch {
    id: u64,
    after: u64,
    to: mpsc::Sender<Vec<Followed>>,
}

struct FeedState {
    rooms: Mutex<HashMap<String, Watch>>,
    /// Rings when the set of rooms changes.
    changed: Notify,
    next_id: std::sync::atomic::AtomicU64,
}

/// Follows the logs of the rooms this relay has open: one blocking read over all of them, on a
/// connection of its own.
#[derive(Clone)]
pub struct Feed {
    state: Arc<FeedState>,
}

impl Feed {
    fn start(client: redis::Client, control: ConnectionManager) -> Self {
        let state = Arc::new(FeedState {
            rooms: Mutex::new(HashMap::new()),
            changed: Notify::new(),
            next_id: std::sync::atomic::AtomicU64::new(1),
        });
        tokio::spawn(follow_loop(client, control, state.clone()));
        Self { state }
    }

    fn rooms(&self) -> std::sync::MutexGuard<'_, HashMap<String, Watch>> {
        self.state.rooms.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Follows `room` from after position `after`: its entries come in order, in batches, until
    /// [`Feed::unwatch`] with the id this answers.
    pub fn watch(&self, room: &str, after: u64) -> (u64, mpsc::Receiver<Vec<Followed>>) {
        let (to, entries) = mpsc::channel(64);
        let id = self
            .state
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.rooms()
            .insert(room.to_owned(), Watch { id, after, to });
        self.state.changed.notify_one();
        (id, entries)
    }

    /// Stops following `room`, unless it is followed for a later opening of the room.
    pub fn unwatch(&self, room: &str, id: u64) {
        let mut rooms = self.rooms();
        if rooms.get(room).is_some_and(|w| w.id == id) {
            rooms.remove(room);
            self.state.changed.notify_one();
        }
    }
}

/// How long one read blocks at most.
const BLOCK_MS: u64 = 10_000;

async fn follow_loop(client: redis::Client, mut control: ConnectionManager, state: Arc<FeedState>) {
    let config = AsyncConnectionConfig::new()
        .set_response_timeout(Some(Duration::from_millis(BLOCK_MS + 5_000)))
        .set_connection_timeout(Some(Duration::from_secs(5)));
    let mut reader: Option<(MultiplexedConnection, i64)> = None;
    loop {
        let watched: Vec<(String, u64)> = {
            let rooms = state.rooms.lock().unwrap_or_else(|e| e.into_inner());
            rooms.iter().map(|(r, w)| (r.clone(), w.after)).collect()
        };
        if watched.is_empty() {
            state.changed.notified().await;
            continue;
        }
        let (conn, id) = match reader.take() {
            Some(reader) => reader,
            None => {
                let connected = async {
                    let mut conn = client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await?;
                    let id: i64 = redis::cmd("CLIENT")
                        .arg("ID")
                        .query_async(&mut conn)
                        .await?;
                    Ok::<_, redis::RedisError>((conn, id))
                };
                match connected.await {
                    Ok(reader) => reader,
                    Err(error) => {
                        tracing::warn!(%error, "the feed could not connect to redis; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                }
            }
        };
        let mut xread = redis::cmd("XREAD");
        xread
            .arg("COUNT")
            .arg(PAGE)
            .arg("BLOCK")
            .arg(BLOCK_MS)
            .arg("STREAMS");
        for (room, _) in &watched {
            xread.arg(Keys::of(room).log);
        }
        for (_, after) in &watched {
            xread.arg(format!("{after}-0"));
        }
        let read = {
            let mut conn = conn.clone();
            async move { xread.query_async::<Value>(&mut conn).await }
        };
        tokio::pin!(read);
        let answer = tokio::select! {
            answer = &mut read => answer,
            _ = state.changed.notified() => loop {
                // The rooms changed: end the blocked read at once, take what it read, and
                // start again with the new set. (An unblock that comes before the read
                // blocks does nothing: it is sent again until the read ends.)
                let _: Result<Value, _> = redis::cmd("CLIENT")
                    .arg("UNBLOCK")
                    .arg(id)
                    .query_async(&mut control)
                    .await;
                tokio::select! {
                    answer = &mut read => break answer,
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
            }
        };
        match answer
            .map_err(backend)
            .and_then(|value| streams(value, &watched))
        {
            Ok(batches) => {
                reader = Some((conn, id));
                for (room, entries) in batches {
                    let Some(last) = entries.last().map(|f| f.position) else {
                        continue;
                    };
                    let to = {
                        let mut rooms = state.rooms.lock().unwrap_or_else(|e| e.into_inner());
                        match rooms.get_mut(&room) {
                            // Still the watch the read was made for.
                            Some(watch) if watch.after < last => {
                                watch.after = last;
                                Some((watch.id, watch.to.clone()))
                            }
                            _ => None,
                        }
                    };
                    if let Some((id, to)) = to {
                        if to.send(entries).await.is_err() {
                            // The room's task has gone; its next opening watches anew.
                            let mut rooms = state.rooms.lock().unwrap_or_else(|e| e.into_inner());
                            if rooms.get(&room).is_some_and(|w| w.id == id) {
                                rooms.remove(&room);
                            }
                        }
                    }
                }
            }
            Err(error) => {
                tracing::warn!(%error, "the feed's read failed; reconnecting");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// An `XREAD` answer: the entries of each room, in order.
fn streams(
    value: Value,
    watched: &[(String, u64)],
) -> Result<Vec<(String, Vec<Followed>)>, StoreError> {
    let by_key: HashMap<String, &str> = watched
        .iter()
        .map(|(room, _)| (Keys::of(room).log, room.as_str()))
        .collect();
    let mut out = Vec::new();
    for stream in array(value)? {
        let mut parts = array(stream)?.into_iter();
        let (Some(key), Some(entries)) = (parts.next(), parts.next()) else {
            return Err(corrupt("a stream without entries"));
        };
        let key = text(&key)?;
        let Some(room) = by_key.get(&key) else {
            continue;
        };
        let entries = array(entries)?
            .into_iter()
            .map(|e| entry(e).map(|(f, _)| f))
            .collect::<Result<Vec<_>, _>>()?;
        out.push(((*room).to_owned(), entries));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_keep_the_whole_room_in_the_hash_tag_and_never_collide() {
        assert_eq!(Keys::of("doc").log, "pm:{doc}:log");
        assert_eq!(Keys::of("a}b").room, "pm:{a%7Db}:room");
        assert_ne!(Keys::of("a%7Db").room, Keys::of("a}b").room);
        assert_eq!(Keys::of("{x").tokens, "pm:{%7Bx}:tokens");
    }
}
