//! Room logs in Redis, shared by any number of relays: [`RedisStore`] and its [`Feed`].
//!
//! Each room has these keys, all with the room in a hash tag (`pm:{room}:...`) so that a Redis
//! Cluster keeps a room on one shard and every script touches one slot:
//!
//! - `pm:{room}:room`, a hash: the room's settings, its step (`high`), last position, next node
//!   id, log identity, bytes logged, the position of its last snapshot and the last position
//!   that snapshot holds (`covers`);
//! - `pm:{room}:log`, a stream: one entry per logged document message (updates and snapshots),
//!   whose id is `<position>-0`, with its sender, step, the room's step with it, its document,
//!   and the frame without a position (a reader puts the position in the header);
//! - `pm:{room}:data`, a stream of the logged messages of no document (data), as the log's:
//!   the two streams share one numbering of positions, and a reader merges them by it. Redis
//!   frees a stream's memory node by node, a node once every entry in it is deleted; in one
//!   stream, each data entry a compaction keeps pinned the memory of the updates it dropped
//!   beside it (a small data message after each update kept hundreds of times the bytes the
//!   room counts). A room logged before the split has data entries in its log too, read as
//!   before;
//! - `pm:{room}:tokens`, a hash from resume token to
//!   `"<node> <last stored step> <ms seen> <its position> <user>"` (the user its access token
//!   names, 0 for none: the token resumes the node for that user only; a record without it is
//!   one of user 0);
//! - `pm:{room}:nodes`, a hash from node id to its token;
//! - `pm:{room}:bus`, a stream of what is not stored (checkpoints, signals, sync messages,
//!   presence, peers) for the members on other relays: its newest 10,000 entries, and of those
//!   no more bytes of frames than the relay's bound (`--max-bus-bytes`), so that a member's
//!   large signals cannot fill the Redis every room shares. `pm:{room}:bus-sizes` lists each
//!   entry's id and frame size, oldest first, and `pm:{room}:bus-bytes` sums them. Each entry
//!   carries the next number of `pm:{room}:bus-seq`: a relay that reads a number that does not
//!   follow the last one it read missed publications, and reads the members again;
//!   `pm:{room}:members` is a hash from node id to `"<relay> <name>"`, and
//!   `pm:{room}:presence` from node id to its latest presence frame (for the relays that open
//!   the room later; it goes with the member);
//! - `pm:{room}:lease`: the relay that compacts the room;
//! - `pm:{room}:docs`, a list of the log's document entries (updates and snapshots) not yet
//!   compacted away, `"<position> <frame size>"`, oldest first: what a snapshot drops, found
//!   without reading the log (a room whose record says `indexed`).
//!
//! **Checks with the append.** One script makes the checks that need the state of the whole
//! room, atomically with the append, since no relay sees every message of the room: a step at or
//! below its node's last stored step is refused as `replay` (another relay stored it first), a
//! token that is not its node's as `senderMismatch`, a step more than the room's `maxFuture`
//! ahead of the room step as `futureStep`; the room's step moves by one when the message's step
//! is above it (publications of frames every member receives move it too); the position is the
//! next one. The rules are those of
//! [`pattern_mesh_core::store::MemoryStore::append_shared_now`].
//!
//! **Order.** Appends go through one writer task that sends them to Redis in the order they were
//! made, pipelined: a room's appends are positioned in that order. Once an append of a room
//! fails, every later append of it fails too until the room is opened again, so that a node's
//! stored messages stay a prefix of what it sent (its client reads `replay` as "stored"): in
//! later pipelines the relay does not send them, and in the same pipeline (Redis runs every
//! command of it) the script refuses an append whose node's append before it there was not
//! stored. Each command of a pipeline is judged on its own answer, so that one room's failure
//! is that room's alone.
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
use pattern_mesh_core::room::{Append, Relayed, Roster, NODE_BLOCK};
use pattern_mesh_core::store::{
    Appended, Followed, Logged, NodeRecord, RoomRecord, Store, StoreError, StoreFuture,
};
use pattern_mesh_core::wire::{with_position, NodeId, Peer, Reason, ResumeToken, RoomConfig};
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Value};
use tokio::sync::{mpsc, oneshot, Notify};

/// Opens a room, creating it unless it exists, and reserves a block of node ids. KEYS: room,
/// log, data. A room whose record is gone while its log is not (Redis evicted the record) is
/// not created again from nothing: its position would start over below the log's, and its
/// stored messages would no longer be the room's.
const OPEN: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then
  if redis.call('EXISTS', KEYS[2], KEYS[3]) > 0 then
    return {'lost'}
  end
  redis.call('HSET', KEYS[1], 'seed', ARGV[1], 'multiplier', ARGV[2], 'reset', ARGV[3],
    'future', ARGV[4], 'stale', ARGV[5], 'high', 0, 'position', 0, 'next_node', 1,
    'log', ARGV[6], 'bytes', 0, 'snapshot', 0, 'indexed', 1)
end
local ending = redis.call('HINCRBY', KEYS[1], 'next_node', ARGV[7])
return {ending, redis.call('HMGET', KEYS[1], 'seed', 'multiplier', 'reset', 'future', 'stale',
  'high', 'position', 'log', 'bytes')}
"#;

/// Appends a message, with the checks that need the room's state. KEYS: room, tokens, nodes,
/// log, lease, docs, data (where a message of no document goes). ARGV: sender, token ("" for none), step, snapshot ("1"/"0"), document ("" for
/// none), frame, milliseconds now, the last position a snapshot holds, relay, the identity of
/// the log the relay opened ("0": not known), the last position the relay read of it, the
/// sender's user (0: none), the step of the sender's append before this one in the same
/// pipeline (0: none).
///
/// A node's stored messages stay a prefix of what it sent: an append whose node's append before
/// it in the pipeline was not stored (it failed, or was refused) is not stored either
/// (`gap`): stored, it would make that one a replay when its client sends it again, and it
/// would be lost.
///
/// A record of another log (the room was created again), or a position below what the relay
/// read (Redis lost the last entries: a failover to a replica that lagged, an AOF written every
/// second, a restore), is `moved`: numbered at or below what the relay passed on already, the
/// append would be acknowledged and reach no one.
///
/// A snapshot is taken only from the relay that holds the room's compaction lease (it takes the
/// lease if nobody holds it, for a minute from each snapshot), and only if it holds more than
/// the last one; it drops the document entries it holds (never data entries), which it finds
/// in the room's index of them: one script holds every room of every relay while it runs, and
/// reading the log instead read every data entry since the last snapshot too (a member's
/// hundreds of megabytes of data held Redis for seconds). A room created before the index
/// reads its log once more, and is indexed from the first snapshot that holds all of it.
const APPEND: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'gone'}
end
-- The log's last entry is below the room's next position, or the record is not this log's:
-- checked before anything is written, so that an append that cannot be logged changes nothing.
local at = tonumber(redis.call('HGET', KEYS[1], 'position'))
for _, stream in ipairs({KEYS[4], KEYS[7]}) do
  local top = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)[1]
  if top and tonumber(string.match(top[1], '^(%d+)')) > at then
    return {'gone'}
  end
end
if ARGV[10] ~= '0' and redis.call('HGET', KEYS[1], 'log') ~= ARGV[10] then
  return {'moved', 'the room was created again in Redis since this relay opened it'}
end
if at < tonumber(ARGV[11]) then
  return {'moved', "the room's log in Redis went back to position " .. at ..
    ', below position ' .. ARGV[11] .. ' that this relay read'}
end
if ARGV[4] == '1' then
  local holder = redis.call('GET', KEYS[5])
  if holder and holder ~= ARGV[9] then
    return {'refused', 'busy', 'relay ' .. holder .. ' compacts this room'}
  end
  local covered = tonumber(redis.call('HGET', KEYS[1], 'covers') or '0')
  local covers = tonumber(ARGV[8])
  if covers <= covered then
    return {'refused', 'busy', 'a snapshot already holds position ' .. covered}
  end
  redis.call('SET', KEYS[5], ARGV[9], 'PX', 60000)
  local freed = 0
  if redis.call('HGET', KEYS[1], 'indexed') == '1' then
    -- The document entries from the index, oldest first: the log's data entries (and their
    -- frames) are not read.
    while true do
      local head = redis.call('LINDEX', KEYS[6], 0)
      if not head then break end
      local position, len = string.match(head, '^(%d+) (%d+)$')
      if tonumber(position) > covers then break end
      redis.call('LPOP', KEYS[6])
      if tonumber(position) > covered then
        redis.call('XDEL', KEYS[4], position .. '-0')
        freed = freed + tonumber(len)
      end
    end
  else
    -- A room whose log holds document entries the index does not (appended before it): read.
    local entries = redis.call('XRANGE', KEYS[4], (covered + 1) .. '-0', covers .. '-0')
    for _, e in ipairs(entries) do
      local fields, doc, len = e[2], nil, 0
      for i = 1, #fields, 2 do
        if fields[i] == 'd' then doc = fields[i + 1] elseif fields[i] == 'f' then len = string.len(fields[i + 1]) end
      end
      if doc and doc ~= '' then
        redis.call('XDEL', KEYS[4], e[1])
        freed = freed + len
      end
    end
    while true do
      local head = redis.call('LINDEX', KEYS[6], 0)
      if not head or tonumber(string.match(head, '^(%d+)')) > covers then break end
      redis.call('LPOP', KEYS[6])
    end
    -- Every document entry up to the last position is gone: the index holds every later one.
    if covers >= at then
      redis.call('HSET', KEYS[1], 'indexed', 1)
    end
  end
  redis.call('HINCRBY', KEYS[1], 'bytes', -freed)
  redis.call('HSET', KEYS[1], 'covers', covers)
end
local sender, token, step = ARGV[1], ARGV[2], tonumber(ARGV[3])
if token ~= '' then
  local record = redis.call('HGET', KEYS[2], token)
  local prev = tonumber(ARGV[13])
  if prev > 0 and not (record and tonumber(string.match(record, '^%d+ (%d+)')) >= prev) then
    return {'gap', 'step ' .. ARGV[13] .. ' of node ' .. sender ..
      ', sent before this one in the same batch, was not stored'}
  end
  if record then
    local node, last, seen, at = string.match(record, '^(%d+) (%d+) (%d+) ?(%d*)')
    if node ~= sender then
      return {'refused', 'senderMismatch', 'this resume token belongs to node ' .. node .. ', not ' .. sender}
    end
    if step <= tonumber(last) then
      return {'replayed', tonumber(at) or 0, 'step ' .. ARGV[3] .. ' of node ' .. sender ..
        ' is not above its last stored step ' .. last .. ': it was stored through another relay'}
    end
  else
    local owner = redis.call('HGET', KEYS[3], sender)
    if owner and owner ~= token then
      return {'refused', 'senderMismatch', 'node ' .. sender .. ' belongs to another resume token'}
    end
    redis.call('HSET', KEYS[3], sender, token)
  end
end
local high = redis.call('HGET', KEYS[1], 'high')
local future = tonumber(redis.call('HGET', KEYS[1], 'future'))
if ARGV[4] ~= '1' and step > tonumber(high) + future then
  return {'refused', 'future', 'step ' .. ARGV[3] .. ' is more than ' .. future ..
    ' steps ahead of the room step ' .. high}
end
if ARGV[4] ~= '1' and step > tonumber(high) then
  high = redis.call('HINCRBY', KEYS[1], 'high', 1)
end
local position = redis.call('HINCRBY', KEYS[1], 'position', 1)
local bytes = redis.call('HINCRBY', KEYS[1], 'bytes', string.len(ARGV[6]))
if token ~= '' then
  redis.call('HSET', KEYS[2], token,
    sender .. ' ' .. ARGV[3] .. ' ' .. ARGV[7] .. ' ' .. position .. ' ' .. ARGV[12])
end
if ARGV[4] == '1' then
  redis.call('HSET', KEYS[1], 'snapshot', position)
end
if ARGV[5] ~= '' then
  redis.call('RPUSH', KEYS[6], position .. ' ' .. string.len(ARGV[6]))
end
local stream = KEYS[4]
if ARGV[5] == '' and ARGV[4] ~= '1' then
  stream = KEYS[7]
end
redis.call('XADD', stream, position .. '-0', 's', sender, 't', ARGV[3], 'h', high,
  'd', ARGV[5], 'c', ARGV[8], 'f', ARGV[6])
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

/// Passes a frame on to the other relays' members of a room, and records who joined or left,
/// and each member's latest presence. KEYS: bus, members, room, bus sizes, bus bytes, bus
/// sequence, presences. ARGV: relay, after, to, frame, change ("j" joined, "l" left, "p" the
/// frame is its presence, "n" it has none, or ""), node, name, step, the most bytes of frames the bus may hold, and
/// how long the bus keeps a publication. The entry's place is after the room's last log position
/// now (never below `after`): the readers put it back there among the log's entries. A stamped
/// frame every member receives moves the room step as an append does. First the oldest entries
/// go, until the new one leaves at most 10,000 entries and the bytes the bus may hold (the new
/// one stays, whatever its size), and every entry older than the bus keeps one (by Redis's
/// clock, which numbers the entries): the relays read them within moments, and a small
/// publication a minute kept a full bus, so that a member in many rooms could fill Redis with
/// them. Each
/// entry is numbered (`q`, one more than the entry before it), so that a reader that finds a
/// number missing knows it missed publications. The bus, its sizes and its byte count go
/// ARGV[10] milliseconds after the room's last publication (see [`BUS_IDLE`]); its numbering
/// stays, so that a reader still following the room sees no gap.
const PUBLISH: &str = r#"
local after = math.max(tonumber(ARGV[2]), tonumber(redis.call('HGET', KEYS[3], 'position') or '0'))
local high = tonumber(redis.call('HGET', KEYS[3], 'high') or '0')
if tonumber(ARGV[8]) > high then
  high = redis.call('HINCRBY', KEYS[3], 'high', 1)
end
if ARGV[5] == 'j' then
  redis.call('HSET', KEYS[2], ARGV[6], ARGV[1] .. ' ' .. ARGV[7])
elseif ARGV[5] == 'l' then
  local member = redis.call('HGET', KEYS[2], ARGV[6])
  if member and string.sub(member, 1, string.len(ARGV[1]) + 1) == ARGV[1] .. ' ' then
    redis.call('HDEL', KEYS[2], ARGV[6])
    redis.call('HDEL', KEYS[7], ARGV[6])
  end
elseif ARGV[5] == 'p' or ARGV[5] == 'n' then
  -- Kept for a member listed on this relay only: one that left (or moved) keeps nothing.
  local member = redis.call('HGET', KEYS[2], ARGV[6])
  if member and string.sub(member, 1, string.len(ARGV[1]) + 1) == ARGV[1] .. ' ' then
    if ARGV[5] == 'p' then
      redis.call('HSET', KEYS[7], ARGV[6], ARGV[4])
    else
      redis.call('HDEL', KEYS[7], ARGV[6])
    end
  end
end
local size = string.len(ARGV[4])
local listed = redis.call('LLEN', KEYS[4])
local held = tonumber(redis.call('GET', KEYS[5]) or '0')
if listed == 0 and held ~= 0 then
  -- The sizes went (an idle bus expires key by key): so did the bytes they summed.
  held = 0
  redis.call('SET', KEYS[5], 0)
end
local now = redis.call('TIME')
local cutoff = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - tonumber(ARGV[10])
local function stale()
  local oldest = redis.call('LINDEX', KEYS[4], 0)
  return oldest and tonumber(string.match(oldest, '^(%d+)-')) < cutoff
end
while listed > 0 and (listed >= 10000 or held + size > tonumber(ARGV[9]) or stale()) do
  local oldest = redis.call('LPOP', KEYS[4])
  local space = string.find(oldest, ' ', 1, true)
  redis.call('XDEL', KEYS[1], string.sub(oldest, 1, space - 1))
  held = redis.call('DECRBY', KEYS[5], tonumber(string.sub(oldest, space + 1)))
  listed = listed - 1
end
local seq = redis.call('INCR', KEYS[6])
-- (MAXLEN: entries no size lists, of relays of an earlier version, go by their number.)
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', 10000, '*', 'r', ARGV[1], 'a', after,
  't', ARGV[3], 'h', high, 'q', seq, 'f', ARGV[4])
redis.call('RPUSH', KEYS[4], id .. ' ' .. size)
redis.call('INCRBY', KEYS[5], size)
redis.call('PEXPIRE', KEYS[1], ARGV[10])
redis.call('PEXPIRE', KEYS[4], ARGV[10])
redis.call('PEXPIRE', KEYS[5], ARGV[10])
return 1
"#;

/// How long a room's bus outlives its last publication, and keeps each publication. Its
/// readers follow it live (a relay that stalls for seconds is taken for dead by its heartbeat,
/// and one that reads too late reads the members again); without an end, every room ever used
/// kept up to `--max-bus-bytes` of frames in Redis, which a member could fill room after room
/// (and, kept alive by one small publication a minute, hold full).
const BUS_IDLE: Duration = Duration::from_secs(60);

/// Strikes the members of a relay that died off a room's list, with their presences. KEYS:
/// members, presences. ARGV: relay.
const STRIKE: &str = r#"
local all = redis.call('HGETALL', KEYS[1])
local prefix = ARGV[1] .. ' '
for i = 1, #all, 2 do
  if string.sub(all[i + 1], 1, string.len(prefix)) == prefix then
    redis.call('HDEL', KEYS[1], all[i])
    redis.call('HDEL', KEYS[2], all[i])
  end
end
return 1
"#;

/// Deletes the presences of nodes the room's list of members does not hold. KEYS: members,
/// presences.
const PRUNE_PRESENCES: &str = r#"
local gone = 0
for _, node in ipairs(redis.call('HKEYS', KEYS[2])) do
  if redis.call('HEXISTS', KEYS[1], node) == 0 then
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
    data: String,
    tokens: String,
    nodes: String,
    bus: String,
    bus_sizes: String,
    bus_bytes: String,
    bus_seq: String,
    members: String,
    lease: String,
    docs: String,
    presence: String,
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
            data: format!("pm:{{{tag}}}:data"),
            tokens: format!("pm:{{{tag}}}:tokens"),
            nodes: format!("pm:{{{tag}}}:nodes"),
            bus: format!("pm:{{{tag}}}:bus"),
            bus_sizes: format!("pm:{{{tag}}}:bus-sizes"),
            bus_bytes: format!("pm:{{{tag}}}:bus-bytes"),
            bus_seq: format!("pm:{{{tag}}}:bus-seq"),
            members: format!("pm:{{{tag}}}:members"),
            lease: format!("pm:{{{tag}}}:lease"),
            docs: format!("pm:{{{tag}}}:docs"),
            presence: format!("pm:{{{tag}}}:presence"),
        }
    }
}

fn backend(e: redis::RedisError) -> StoreError {
    StoreError::Backend(format!("redis: {e}"))
}

/// Refuses a Redis that may evict keys: with a memory limit and any policy but `noeviction`, a
/// full Redis drops keys, rooms' logs and members among them, and no one hears of it (with
/// `noeviction` it refuses the append, and the room's members are told). Warns when the
/// append-only file is off or not fsynced before each answer: a crash of Redis then loses
/// messages the relay acknowledged. A server that does not answer `CONFIG GET` (a managed
/// service may disable it) is said to be unchecked.
async fn check_server(conn: &ConnectionManager) -> Result<(), StoreError> {
    check_rights(conn).await?;
    let mut settings = HashMap::new();
    for name in ["maxmemory", "maxmemory-policy", "appendonly", "appendfsync"] {
        let mut get = redis::cmd("CONFIG");
        get.arg("GET").arg(name);
        match query::<HashMap<String, String>>(conn, &get).await {
            Ok(answer) => settings.extend(answer),
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "Redis does not answer CONFIG GET: its eviction policy and its append-only \
                     file are not checked (run it with maxmemory-policy noeviction, appendonly \
                     yes and appendfsync always)"
                );
                return Ok(());
            }
        }
    }
    let setting = |name: &str| settings.get(name).map(String::as_str).unwrap_or("");
    let (limit, policy) = (setting("maxmemory"), setting("maxmemory-policy"));
    if limit != "0" && policy != "noeviction" {
        return Err(StoreError::Backend(format!(
            "Redis may evict keys: maxmemory is {limit} bytes and maxmemory-policy is {policy}, \
             so once full it would drop rooms' logs and members without a word; run it with \
             maxmemory-policy noeviction (a full Redis then refuses appends, and the rooms' \
             members are told)"
        )));
    }
    if setting("appendonly") != "yes" || setting("appendfsync") != "always" {
        tracing::warn!(
            appendonly = setting("appendonly"),
            appendfsync = setting("appendfsync"),
            "Redis does not write and fsync its append-only file before it answers: a crash of \
             Redis loses messages the relay acknowledged (run it with appendonly yes and \
             appendfsync always)"
        );
    }
    Ok(())
}

/// Refuses a Redis user that may not run what the feed follows shared rooms with: `XREAD`, and
/// `CLIENT ID` and `CLIENT UNBLOCK` to end a blocked read when the rooms change. Without them the
/// feed would retry for ever, and no member on any relay would receive what was appended.
async fn check_rights(conn: &ConnectionManager) -> Result<(), StoreError> {
    let refused = |command: &str, e: StoreError| {
        let e = match e {
            StoreError::Backend(said) => said,
            other => other.to_string(),
        };
        StoreError::Backend(format!(
            "the Redis user may not run {command} ({e}): a relay follows the rooms it shares with \
             XREAD, CLIENT ID and CLIENT UNBLOCK; grant them (ACL SETUSER <user> +xread \
             +client|id +client|unblock)"
        ))
    };
    let id: i64 = query(conn, redis::cmd("CLIENT").arg("ID"))
        .await
        .map_err(|e| refused("CLIENT ID", e))?;
    query::<Value>(conn, redis::cmd("CLIENT").arg("UNBLOCK").arg(id))
        .await
        .map_err(|e| refused("CLIENT UNBLOCK", e))?;
    let mut xread = redis::cmd("XREAD");
    xread
        .arg("COUNT")
        .arg(1)
        .arg("STREAMS")
        .arg(Keys::of("pattern-mesh rights check").log)
        .arg("0");
    query::<Value>(conn, &xread)
        .await
        .map_err(|e| refused("XREAD", e))?;
    Ok(())
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
    let (mut sender, mut step, mut high, mut covers, mut doc, mut frame) = (0, 0, 0, 0, None, None);
    let mut fields = array(fields)?.into_iter();
    while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
        match text(&name)?.as_str() {
            "s" => sender = int(&value)?,
            "t" => step = int(&value)?,
            "h" => high = int(&value)?,
            "c" => covers = int(&value)?,
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
            covers,
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

/// What the writer sends to Redis, in order.
enum Write {
    /// An append, answered once Redis answered.
    Append {
        room: String,
        entry: Append,
        reply: oneshot::Sender<Result<Appended, StoreError>>,
    },
    /// A frame for the other relays' members, with the change of the room's members it says.
    Publish {
        room: String,
        to: Option<NodeId>,
        after: u64,
        bytes: Bytes,
        roster: Option<Roster>,
        step: u64,
    },
}

impl Write {
    fn room(&self) -> &str {
        match self {
            Write::Append { room, .. } | Write::Publish { room, .. } => room,
        }
    }

    /// Whether this publishes that `node` joined `room` (again).
    fn joins(&self, room: &str, node: NodeId) -> bool {
        matches!(self, Write::Publish { room: r, roster: Some(Roster::Joined(peer)), .. }
            if r == room && peer.node == node)
    }
}

/// How long a departure whose publication failed waits before it is sent again.
const DEPARTURE_RETRY: Duration = Duration::from_secs(1);

/// How many times a departure is sent again before it is given up (a minute at most: past the
/// heartbeat, a relay that lost Redis for that long is taken for dead by the others, which
/// strike its members, and it announces those it still has once it is back).
const DEPARTURE_TRIES: u32 = 60;

/// A member's departure whose publication failed, sent again (see `write_loop`).
struct Departure {
    room: String,
    node: NodeId,
    bytes: Bytes,
    step: u64,
    /// How many times it was sent again.
    tried: u32,
}

impl Departure {
    /// The departure `write` publishes, if it publishes one.
    fn of(write: &Write) -> Option<Departure> {
        match write {
            Write::Publish {
                room,
                bytes,
                roster: Some(Roster::Left(node)),
                step,
                ..
            } => Some(Departure {
                room: room.clone(),
                node: *node,
                bytes: bytes.clone(),
                step: *step,
                tried: 0,
            }),
            _ => None,
        }
    }

    /// Its publication once more. It names no place in the log: it goes after the log's last
    /// entry, wherever that is now.
    fn again(&mut self) -> Write {
        self.tried += 1;
        Write::Publish {
            room: self.room.clone(),
            to: None,
            after: 0,
            bytes: self.bytes.clone(),
            roster: Some(Roster::Left(self.node)),
            step: self.step,
        }
    }
}

struct Scripts {
    open: redis::Script,
    append: redis::Script,
    publish: redis::Script,
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
    /// the store and the feed that follows the logs of the rooms this relay opens. A room's bus
    /// keeps at most `bus_bytes` of frames (and its newest entry, whatever its size).
    pub async fn open(url: &str, bus_bytes: u64) -> Result<(Self, Feed), StoreError> {
        let client = redis::Client::open(url).map_err(backend)?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(Duration::from_secs(10)))
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_number_of_retries(3);
        let conn = client
            .get_connection_manager_with_config(config)
            .await
            .map_err(backend)?;
        check_server(&conn).await?;
        let scripts = Arc::new(Scripts {
            open: redis::Script::new(OPEN),
            append: redis::Script::new(APPEND),
            publish: redis::Script::new(PUBLISH),
            expire: redis::Script::new(EXPIRE),
        });
        // This relay's name in the store (53 bits: Lua keeps it exact).
        let mut relay = [0u8; 8];
        getrandom::fill(&mut relay).map_err(|e| StoreError::Backend(e.to_string()))?;
        let relay = (u64::from_le_bytes(relay) >> 11).max(1);
        let (writes, queue) = mpsc::unbounded_channel();
        let failed = Arc::new(Mutex::new(HashSet::new()));
        let state = Arc::new(FeedState {
            rooms: Mutex::new(HashMap::new()),
            changed: Notify::new(),
            next_id: std::sync::atomic::AtomicU64::new(1),
            relays: Mutex::new(HashMap::new()),
        });
        tokio::spawn(write_loop(
            conn.clone(),
            scripts.clone(),
            relay,
            bus_bytes,
            queue,
            failed.clone(),
            state.clone(),
        ));
        let feed = Feed::start(state, client, conn.clone(), writes.clone(), relay);
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

    /// The entries of `streams` (the room's log, and its data stream or none) from position
    /// `from` (inclusive) to `until` (appended already: nothing is added below it while this
    /// reads), merged in the order of their positions, at most about `max_bytes`, with each
    /// entry's document. Each stream is read a page at a time, and each page once: the next
    /// entry is the first of the stream pages in hand, each of which is read again only once
    /// used up.
    async fn range(
        conn: ConnectionManager,
        streams: &[&str],
        from: u64,
        until: u64,
        max_bytes: usize,
    ) -> Result<Vec<(Followed, Option<String>)>, StoreError> {
        struct Cursor<'a> {
            stream: &'a str,
            next: u64,
            page: std::collections::VecDeque<(Followed, Option<String>)>,
            // No entry left after the page in hand.
            ended: bool,
        }
        let mut cursors: Vec<Cursor> = streams
            .iter()
            .map(|&stream| Cursor {
                stream,
                next: from,
                page: Default::default(),
                ended: from > until,
            })
            .collect();
        let mut out = Vec::new();
        let mut bytes = 0;
        loop {
            for cursor in cursors.iter_mut() {
                if !cursor.page.is_empty() || cursor.ended {
                    continue;
                }
                let mut xrange = redis::cmd("XRANGE");
                xrange
                    .arg(cursor.stream)
                    .arg(format!("{}-0", cursor.next))
                    .arg(format!("{until}-0"))
                    .arg("COUNT")
                    .arg(PAGE);
                let page = array(query(&conn, &xrange).await?)?;
                cursor.ended = page.len() < PAGE;
                for value in page {
                    let (followed, doc) = entry(value)?;
                    cursor.next = followed.position + 1;
                    cursor.page.push_back((followed, doc));
                }
                cursor.ended |= cursor.next > until;
            }
            // Every stream has a page in hand or has ended: the first of them is the next.
            let Some(first) = cursors
                .iter_mut()
                .filter(|c| !c.page.is_empty())
                .min_by_key(|c| c.page.front().map(|(f, _)| f.position))
            else {
                return Ok(out);
            };
            let (followed, doc) = first.page.pop_front().expect("a page in hand");
            bytes += followed.bytes.len();
            out.push((followed, doc));
            if bytes >= max_bytes {
                return Ok(out);
            }
        }
    }
}

/// Sends appends to Redis in the order they were made, as many at once as are waiting, in one
/// pipeline; a room whose append failed fails its later appends until it is opened again.
async fn write_loop(
    mut conn: ConnectionManager,
    scripts: Arc<Scripts>,
    relay: u64,
    bus_bytes: u64,
    mut queue: mpsc::UnboundedReceiver<Write>,
    failed: Arc<Mutex<HashSet<String>>>,
    feed: Arc<FeedState>,
) {
    let mut batch = Vec::new();
    // Departures whose publication failed (Redis was down, say), sent again, with how many
    // times they were tried, until they go through: lost, the member stayed listed on every
    // other relay for as long as this one lives. One that its node's joining the room again
    // made void is dropped.
    let mut departures: Vec<Departure> = Vec::new();
    // When they are sent again next: once a second, however many writes come meanwhile.
    let mut retry_at = tokio::time::Instant::now();
    loop {
        let received = if departures.is_empty() {
            queue.recv_many(&mut batch, 512).await
        } else {
            tokio::select! {
                received = queue.recv_many(&mut batch, 512) => received,
                () = tokio::time::sleep_until(retry_at) => usize::MAX,
            }
        };
        if received == 0 {
            break;
        }
        departures.retain(|d| !batch.iter().any(|w| w.joins(&d.room, d.node)));
        // Sent again first, before what came.
        let mut retried = 0;
        if !departures.is_empty() && tokio::time::Instant::now() >= retry_at {
            retried = departures.len();
            let again: Vec<Write> = departures.iter_mut().map(Departure::again).collect();
            batch.splice(0..0, again);
            retry_at = tokio::time::Instant::now() + DEPARTURE_RETRY;
        }
        let mut doomed: HashSet<String> = failed.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut sent = Vec::with_capacity(batch.len());
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        // The step of each node's append before the next one in this batch: the next is stored
        // only if that one was (see APPEND).
        let mut before: HashMap<(String, NodeId), u64> = HashMap::new();
        for mut write in batch.drain(..) {
            if doomed.contains(write.room()) {
                match write {
                    Write::Append { reply, .. } => {
                        let _ = reply.send(Err(StoreError::Backend(
                            "an earlier append of this room failed; it is opened again on the next join"
                                .into(),
                        )));
                        continue;
                    }
                    // A member's departure still goes out (the room stops after a failure, and
                    // its members leave): dropped, a member that did not come back stayed listed
                    // on every other relay. It names no place in the log: it goes after the
                    // log's last entry, wherever that is now.
                    Write::Publish {
                        roster: Some(Roster::Left(_)),
                        ref mut after,
                        ..
                    } => *after = 0,
                    Write::Publish { .. } => continue,
                }
            }
            let keys = Keys::of(write.room());
            match &write {
                Write::Append { room, entry, .. } => {
                    let token = entry.token.map(|t| t.to_vec()).unwrap_or_default();
                    let prev = match entry.token {
                        Some(_) => before
                            .insert((room.clone(), entry.sender), entry.step)
                            .unwrap_or(0),
                        None => 0,
                    };
                    // The log this relay opened, and how far it read it.
                    let (log, read) = feed
                        .rooms()
                        .get(write.room())
                        .map_or((0, 0), |w| (w.log, w.after));
                    pipe.cmd("EVALSHA")
                        .arg(scripts.append.get_hash())
                        .arg(7)
                        .arg(&keys.room)
                        .arg(&keys.tokens)
                        .arg(&keys.nodes)
                        .arg(&keys.log)
                        .arg(&keys.lease)
                        .arg(&keys.docs)
                        .arg(&keys.data)
                        .arg(entry.sender)
                        .arg(token)
                        .arg(entry.step)
                        .arg(if entry.snapshot { "1" } else { "0" })
                        .arg(entry.doc.as_deref().unwrap_or(""))
                        .arg(entry.bytes.as_ref())
                        .arg(now_ms())
                        .arg(entry.covers)
                        .arg(relay)
                        .arg(log)
                        .arg(read)
                        .arg(entry.user)
                        .arg(prev);
                }
                Write::Publish {
                    to,
                    after,
                    bytes,
                    roster,
                    step,
                    ..
                } => {
                    let (change, node, name) = match roster {
                        Some(Roster::Joined(peer)) => ("j", peer.node, peer.name.as_str()),
                        Some(Roster::Left(node)) => ("l", *node, ""),
                        Some(Roster::Presence { node, set: true }) => ("p", *node, ""),
                        Some(Roster::Presence { node, set: false }) => ("n", *node, ""),
                        None => ("", 0, ""),
                    };
                    pipe.cmd("EVALSHA")
                        .arg(scripts.publish.get_hash())
                        .arg(7)
                        .arg(&keys.bus)
                        .arg(&keys.members)
                        .arg(&keys.room)
                        .arg(&keys.bus_sizes)
                        .arg(&keys.bus_bytes)
                        .arg(&keys.bus_seq)
                        .arg(&keys.presence)
                        .arg(relay)
                        .arg(*after)
                        .arg(to.unwrap_or(0))
                        .arg(bytes.as_ref())
                        .arg(change)
                        .arg(node)
                        .arg(name)
                        .arg(*step)
                        .arg(bus_bytes)
                        .arg(BUS_IDLE.as_millis() as u64);
                }
            }
            sent.push(write);
        }
        if sent.is_empty() {
            continue;
        }
        let rooms: Vec<&str> = sent.iter().map(Write::room).collect();
        let outcomes = run(&mut conn, &scripts, &pipe, &rooms).await;
        drop(rooms);
        let had_departures = !departures.is_empty();
        let fail = |room: &str, doomed: &mut HashSet<String>| {
            doomed.insert(room.to_owned());
            failed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(room.to_owned());
        };
        if let Some(error) = outcomes.iter().skip(retried).find_map(|o| o.as_ref().err()) {
            tracing::warn!(%error, "appends or publications failed");
        } else if let Some(error) = outcomes.iter().find_map(|o| o.as_ref().err()) {
            // Only departures sent again, every second while Redis is out.
            tracing::debug!(%error, "departures sent again failed");
        }
        // A departure sent again that went through is done; one that failed stays, tried again
        // a second later: its room was told at the first failure, and may have been opened again
        // since, so it neither stops nor fails once more. One tried for a minute is given up.
        let mut through = outcomes[..retried].iter().map(Result::is_ok);
        departures.retain(|d| {
            if through.next().unwrap_or(false) {
                return false;
            }
            let keep = d.tried < DEPARTURE_TRIES;
            if !keep {
                tracing::warn!(room = %d.room, node = d.node, "a member's departure could not be published for a minute: the other relays list it until this relay's heartbeat lapses or it ends");
            }
            keep
        });
        // Each write is judged on its own answer: one room's failing command (its keys of the
        // wrong type, a script error on its record) fails that room alone. A failed append
        // tells its room through its reply. A lost publication: its room's later ones are
        // dropped, and the room is told, so that it stops and its members reconnect (and every
        // relay hears them again); a departure is sent again.
        let mut lost = Vec::new();
        // A departure that failed, of a node that joined the room here again later in the
        // batch, is not sent again: it would strike the member present.
        let void: Vec<bool> = (0..sent.len())
            .map(|i| {
                Departure::of(&sent[i])
                    .is_some_and(|d| sent[i + 1..].iter().any(|w| w.joins(&d.room, d.node)))
            })
            .collect();
        for ((write, outcome), void) in sent.into_iter().zip(outcomes).zip(void).skip(retried) {
            match (write, outcome) {
                (Write::Append { room, reply, .. }, outcome) => {
                    let result = outcome.and_then(appended);
                    if result.is_err() {
                        fail(&room, &mut doomed);
                    }
                    let _ = reply.send(result);
                }
                (Write::Publish { .. }, Ok(_)) => {}
                (write, Err(error)) => {
                    fail(write.room(), &mut doomed);
                    departures.extend(Departure::of(&write).filter(|_| !void));
                    lost.push((write.room().to_owned(), error));
                }
            }
        }
        if !had_departures && !departures.is_empty() {
            // The first departures that failed: sent again in a second.
            retry_at = tokio::time::Instant::now() + DEPARTURE_RETRY;
        }
        lost.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        lost.dedup_by(|a, b| a.0 == b.0);
        for (room, error) in lost {
            let to = feed.rooms().get(&room).map(|w| w.to.clone());
            if let Some(to) = to {
                let _ = to.send(FeedEvent::Lost(error)).await;
            }
        }
    }
}

/// Runs `pipe` (one command for each of `rooms`, errors kept apart) and answers each command's
/// outcome: its value, or why it failed (every command's error when the whole pipeline failed:
/// the connection went, say). Commands that Redis answered `NOSCRIPT` (it restarted and forgot
/// the scripts: they did not run) run again, alone, once the scripts are loaded, unless a later
/// command of their room ran meanwhile (another relay loaded the scripts midway): run after it,
/// they would be out of order (an append stored after a later one of its node is a replay, and
/// lost; a departure after a join strikes a member present), so they fail, and so does their
/// room, whose members send them again.
async fn run(
    conn: &mut ConnectionManager,
    scripts: &Scripts,
    pipe: &redis::Pipeline,
    rooms: &[&str],
) -> Vec<Result<Value, StoreError>> {
    let count = rooms.len();
    let answers = |answer: redis::RedisResult<Vec<Value>>, count: usize| match answer {
        Ok(values) if values.len() == count => values
            .into_iter()
            .map(|value| match value {
                Value::ServerError(error) => Err(backend(error.into())),
                value => Ok(value),
            })
            .collect(),
        Ok(_) => vec![Err(corrupt("a pipeline answer of the wrong length")); count],
        Err(error) => vec![Err(backend(error)); count],
    };
    let answer: redis::RedisResult<Vec<Value>> = pipe.query_async(conn).await;
    let again: Vec<usize> = match &answer {
        Ok(values) => values
            .iter()
            .enumerate()
            .filter(|(_, v)| matches!(v, Value::ServerError(e) if e.kind() == Some(redis::ServerErrorKind::NoScript)))
            .map(|(i, _)| i)
            .collect(),
        Err(_) => Vec::new(),
    };
    let mut outcomes = answers(answer, count);
    let (again, failed) = run_again(&again, rooms);
    for i in failed {
        outcomes[i] = Err(StoreError::Backend(
            "Redis lost its scripts while the relay wrote (it restarted, or they were flushed), \
             and ran a later write of the room: this one fails, and the room is opened again"
                .into(),
        ));
    }
    if again.is_empty() {
        return outcomes;
    }
    let mut loaded = scripts.append.prepare_invoke().load_async(conn).await;
    if loaded.is_ok() {
        loaded = scripts.publish.prepare_invoke().load_async(conn).await;
    }
    let retried = match loaded {
        Ok(_) => {
            let mut retry = redis::pipe();
            retry.ignore_errors();
            let commands: Vec<&redis::Cmd> = pipe.cmd_iter().collect();
            for &i in &again {
                retry.add_command(commands[i].clone());
            }
            answers(retry.query_async(conn).await, again.len())
        }
        Err(error) => vec![Err(backend(error)); again.len()],
    };
    for (i, outcome) in again.into_iter().zip(retried) {
        outcomes[i] = outcome;
    }
    outcomes
}

/// Of the commands Redis answered `NOSCRIPT` (`noscript`, by index; `rooms` names each
/// command's room), those to run again, and those that fail: every one of a room with a later
/// command that ran (see [`run`]).
fn run_again(noscript: &[usize], rooms: &[&str]) -> (Vec<usize>, Vec<usize>) {
    let mut waiting: HashSet<&str> = HashSet::new();
    let mut out_of_order: HashSet<&str> = HashSet::new();
    for (i, room) in rooms.iter().enumerate() {
        if noscript.contains(&i) {
            waiting.insert(room);
        } else if waiting.contains(room) {
            out_of_order.insert(room);
        }
    }
    noscript
        .iter()
        .partition(|&&i| !out_of_order.contains(rooms[i]))
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
                "busy" => Reason::Unavailable,
                "future" => Reason::FutureStep,
                _ => Reason::SenderMismatch,
            };
            Ok(Appended::Refused {
                reason,
                detail: text(&parts[2])?,
            })
        }
        Some("replayed") if parts.len() == 3 => Ok(Appended::Replayed {
            position: int(&parts[1])?,
            detail: text(&parts[2])?,
        }),
        Some("gone") => Err(StoreError::Corrupt(
            "the room is gone from the store; it is created again on the next join".into(),
        )),
        Some("gap") if parts.len() == 2 => Err(StoreError::Backend(format!(
            "{}; the room is opened again, and its client sends it again",
            text(&parts[1])?
        ))),
        Some("moved") if parts.len() == 2 => Err(StoreError::Corrupt(format!(
            "{}; the room is opened again on the next join",
            text(&parts[1])?
        ))),
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
            open.key(&keys.log).key(&keys.data);
            open.arg(config.pattern.seed)
                .arg(config.pattern.multiplier)
                .arg(config.pattern.reset_interval)
                .arg(config.max_future)
                .arg(config.stale_window.map_or(String::new(), |w| w.to_string()))
                .arg(log)
                .arg(NODE_BLOCK);
            let answer: Value = invoke(&conn, &open).await?;
            let mut parts = array(answer)?.into_iter().peekable();
            if parts
                .peek()
                .is_some_and(|first| matches!(first, Value::BulkString(b) if b == b"lost"))
            {
                return Err(StoreError::Corrupt(
                    // First what a close reason (123 bytes) keeps.
                    "Redis evicted the record, not the log: use noeviction; the room is not opened again from nothing".into(),
                ));
            }
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
            let (node, last_step, _seen, position) =
                (fields.next(), fields.next(), fields.next(), fields.next());
            // A record written before records named their user names user 0.
            let user = fields.next().unwrap_or(Ok(0));
            match (node, last_step, user) {
                (Some(Ok(node)), Some(Ok(last_step)), Ok(user)) => Ok(Some(NodeRecord {
                    node,
                    token,
                    user,
                    last_step,
                    position: position.and_then(Result::ok).unwrap_or(0),
                })),
                _ => Err(StoreError::Corrupt(format!("a node record {record:?}"))),
            }
        })
    }

    fn room_exists(&self, room: &str) -> StoreFuture<bool> {
        let (conn, keys) = (self.conn.clone(), Keys::of(room));
        Box::pin(async move {
            // The log counts too: a room whose record Redis evicted is not a new room (its
            // opening says so).
            let mut exists = redis::cmd("EXISTS");
            exists.arg(&keys.room).arg(&keys.log).arg(&keys.data);
            let count: u64 = query(&conn, &exists).await?;
            Ok(count > 0)
        })
    }

    fn append(&self, room: &str, entry: Append) -> StoreFuture<Appended> {
        let (reply, answer) = oneshot::channel();
        let write = Write::Append {
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
        let (conn, keys) = (self.conn.clone(), Keys::of(room));
        Box::pin(async move {
            let mut hget = redis::cmd("HGET");
            // Every document entry after what the last snapshot holds, the snapshot among them.
            hget.arg(&keys.room).arg("covers");
            let covers: Option<u64> = query(&conn, &hget).await?;
            let from = covers.unwrap_or(0) + 1;
            // Document entries are in the log only (data entries of a room logged before the
            // data stream are there too, and passed over).
            let entries = Self::range(conn, &[&keys.log], from, u64::MAX >> 11, usize::MAX).await?;
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
            let keys = Keys::of(&room);
            let streams = [keys.log.as_str(), keys.data.as_str()];
            let entries = Self::range(conn, &streams, since + 1, until, max_bytes.max(1)).await?;
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

/// What the feed hands a room.
#[derive(Debug)]
pub enum FeedEvent {
    /// What one read brought (see [`pattern_mesh_core::room::RoomCore::followed`]).
    Read {
        /// New entries of its log, in order.
        logged: Vec<Followed>,
        /// Frames the other relays published for it, in order.
        relayed: Vec<Relayed>,
        /// Whether the read brought every publication there was.
        bus_complete: bool,
    },
    /// A relay that had members in it stopped renewing its heartbeat.
    Gone(u64),
    /// This relay read the room's bus too late: publications it had not read went (see
    /// [`PUBLISH`]), joins and leaves among them. The room's members on the other relays, as
    /// the store lists them now (see [`RemoteMembers`]).
    Missed(RemoteMembers),
    /// This relay's heartbeat lapsed: other relays may have struck its members off the room
    /// (see [`pattern_mesh_core::room::RoomCore::announce_members`]).
    Lapsed,
    /// A batch that held publications of the room failed: the other relays' members miss them
    /// (see [`pattern_mesh_core::room::RoomCore::publication_lost`]).
    Lost(StoreError),
}

/// The members of a room on other live relays, as the store lists them.
#[derive(Debug, Clone, Default)]
pub struct RemoteMembers {
    /// Each member, with its relay.
    pub members: Vec<(u64, Peer)>,
    /// The latest presence frames of those members that have one.
    pub presences: Vec<Bytes>,
}

/// Where a relay stands in a room's bus: the last entry it read, and that entry's number
/// (`None` for an entry written before entries were numbered).
#[derive(Debug, Clone)]
pub struct BusMark {
    /// The entry's id.
    pub id: String,
    seq: Option<u64>,
}

/// A room the feed follows: where it is in the log and in the bus, and where its events go.
struct Watch {
    id: u64,
    /// The identity of the room's log as this relay opened it.
    log: u64,
    after: u64,
    bus: BusMark,
    /// Publications went from the bus before this relay read them, and the room has not heard
    /// the members read again yet.
    missed: bool,
    /// The last read of the bus returned a full page: more may wait, and the room holds the log
    /// entries after the last publication read until a read says none is left.
    bus_full: bool,
    to: mpsc::Sender<FeedEvent>,
}

struct FeedState {
    rooms: Mutex<HashMap<String, Watch>>,
    /// Rings when the set of rooms changes.
    changed: Notify,
    next_id: std::sync::atomic::AtomicU64,
    /// The other relays with members in the rooms followed, and those rooms.
    relays: Mutex<HashMap<u64, HashSet<String>>>,
}

impl FeedState {
    fn rooms(&self) -> std::sync::MutexGuard<'_, HashMap<String, Watch>> {
        self.rooms.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn relays(&self) -> std::sync::MutexGuard<'_, HashMap<u64, HashSet<String>>> {
        self.relays.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Notes `relays` as relays with members in `room`: the room hears when one of them ends.
    /// Called under the lock of the rooms, with the room's watch current (its end, which
    /// forgets them, comes after); locks `relays`, never the reverse.
    fn note_relays(&self, room: &str, relays: impl IntoIterator<Item = u64>) {
        let mut known = self.relays();
        for relay in relays {
            known.entry(relay).or_default().insert(room.to_owned());
        }
    }

    /// Stops following `room` if `id` still follows it: the other relays' members in it are
    /// forgotten with it (a relay that follows rooms for a long time would otherwise remember
    /// every room it ever followed; whoever follows the room when one of those relays ends
    /// strikes its members, or the next reader of its list of members does). Whether it did.
    fn unfollow(&self, room: &str, id: u64) -> bool {
        // Under the lock of the rooms, as every noting of a followed room's relays is: a later
        // opening's notes come after this.
        let mut rooms = self.rooms();
        if rooms.get(room).is_none_or(|w| w.id != id) {
            return false;
        }
        rooms.remove(room);
        self.relays().retain(|_, rooms| {
            rooms.remove(room);
            !rooms.is_empty()
        });
        true
    }
}

/// Follows the rooms this relay has open in a shared store: their logs and what the other relays
/// publish for them, with one blocking read on a connection of its own; and keeps this relay's
/// heartbeat, and watches the other relays' (a relay whose heartbeat stops has its members leave).
#[derive(Clone)]
pub struct Feed {
    state: Arc<FeedState>,
    conn: ConnectionManager,
    writes: mpsc::UnboundedSender<Write>,
    relay: u64,
}

/// How often a relay renews its heartbeat, which lasts three times as long.
const HEARTBEAT: Duration = Duration::from_secs(2);

fn heartbeat_key(relay: u64) -> String {
    format!("pm:relay:{relay}")
}

impl Feed {
    fn start(
        state: Arc<FeedState>,
        client: redis::Client,
        conn: ConnectionManager,
        writes: mpsc::UnboundedSender<Write>,
        relay: u64,
    ) -> Self {
        let feed = Self {
            state,
            conn,
            writes,
            relay,
        };
        tokio::spawn(follow_loop(client, feed.clone()));
        tokio::spawn(heartbeat_loop(feed.clone()));
        tokio::spawn(log_check_loop(feed.clone()));
        feed
    }

    fn rooms(&self) -> std::sync::MutexGuard<'_, HashMap<String, Watch>> {
        self.state.rooms()
    }

    fn relays(&self) -> std::sync::MutexGuard<'_, HashMap<u64, HashSet<String>>> {
        self.state.relays()
    }

    /// What a room opening on this relay needs of the others: where their publications for it
    /// stand now, and its members on live relays (those of relays that died are struck off).
    pub async fn open(&self, room: &str) -> Result<(BusMark, RemoteMembers), StoreError> {
        let keys = Keys::of(room);
        // The numbering first: a bus that went idle and expired keeps it, and its next entry
        // follows it (read before the bus, so that an entry published between the two reads
        // is found in the bus).
        let mut numbered = redis::cmd("GET");
        numbered.arg(&keys.bus_seq);
        let numbered: Option<u64> = query(&self.conn, &numbered).await?;
        let mut last = redis::cmd("XREVRANGE");
        last.arg(&keys.bus).arg("+").arg("-").arg("COUNT").arg(1);
        let last = array(query::<Value>(&self.conn, &last).await?)?;
        let bus = match last.into_iter().next() {
            Some(entry) => {
                let (id, seq, _) = bus_entry(entry)?;
                BusMark { id, seq }
            }
            None => BusMark {
                id: "0-0".into(),
                seq: Some(numbered.unwrap_or(0)),
            },
        };
        let mut all = redis::cmd("HGETALL");
        all.arg(&keys.members);
        let all: Vec<(u64, String)> = query(&self.conn, &all).await?;
        let mut alive: HashMap<u64, bool> = HashMap::new();
        let mut struck: HashSet<u64> = HashSet::new();
        let mut members = Vec::new();
        for (node, value) in all {
            let (relay, name) = value.split_once(' ').unwrap_or((value.as_str(), ""));
            let Ok(relay) = relay.parse::<u64>() else {
                continue;
            };
            if relay == self.relay {
                continue;
            }
            let live = match alive.get(&relay) {
                Some(&live) => live,
                None => {
                    let mut exists = redis::cmd("EXISTS");
                    exists.arg(heartbeat_key(relay));
                    let live = query::<u64>(&self.conn, &exists).await? == 1;
                    alive.insert(relay, live);
                    live
                }
            };
            if live {
                members.push((
                    relay,
                    Peer {
                        node,
                        name: name.to_owned(),
                    },
                ));
            } else if struck.insert(relay) {
                // Struck off in one script, only while listed on that relay: one that moved to a
                // live relay since the read stays listed there.
                query::<Value>(&self.conn, &self.strike(room, relay)).await?;
            }
        }
        // The presences of nodes no longer listed go (a relay of an earlier version, or a
        // connection lost between two deletions, left them); then the latest presences, read
        // after the bus's place, so that one set since is read here or in the bus after that
        // place (the newer one last), never missed.
        let mut prune = redis::cmd("EVAL");
        prune
            .arg(PRUNE_PRESENCES)
            .arg(2)
            .arg(&keys.members)
            .arg(&keys.presence);
        query::<u64>(&self.conn, &prune).await?;
        let mut all = redis::cmd("HGETALL");
        all.arg(&keys.presence);
        let all: Vec<(u64, Vec<u8>)> = query(&self.conn, &all).await?;
        let listed: HashSet<u64> = members.iter().map(|(_, peer)| peer.node).collect();
        let presences = all
            .into_iter()
            .filter(|(node, _)| listed.contains(node))
            .map(|(_, frame)| Bytes::from(frame))
            .collect();
        Ok((bus, RemoteMembers { members, presences }))
    }

    /// Follows `room`, whose log has the identity `log`, from after log position `after` and bus
    /// entry `bus` (from [`Feed::open`]), until [`Feed::unwatch`] with the id this answers. The
    /// room's appends check that its log is still that one, and not below what was read of it.
    /// `relays` are those [`Feed::open`] found members of the room on: the room hears when one
    /// of them ends.
    pub fn watch(
        &self,
        room: &str,
        log: u64,
        after: u64,
        bus: BusMark,
        relays: &[u64],
    ) -> (u64, mpsc::Receiver<FeedEvent>) {
        let (to, events) = mpsc::channel(64);
        let id = self
            .state
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut rooms = self.rooms();
        rooms.insert(
            room.to_owned(),
            Watch {
                id,
                log,
                after,
                bus,
                missed: false,
                bus_full: false,
                to,
            },
        );
        // Noted with the watch, under the same lock: an earlier opening's end forgets only what
        // was noted before it.
        self.state.note_relays(room, relays.iter().copied());
        drop(rooms);
        self.state.changed.notify_one();
        (id, events)
    }

    /// Stops following `room`, unless it is followed for a later opening of the room.
    pub fn unwatch(&self, room: &str, id: u64) {
        if self.state.unfollow(room, id) {
            self.state.changed.notify_one();
        }
    }

    /// Passes a frame of `room` on to its members on the other relays, in order with this
    /// relay's appends, and records who joined or left.
    pub fn publish(
        &self,
        room: &str,
        to: Option<NodeId>,
        after: u64,
        bytes: Bytes,
        roster: Option<Roster>,
        step: u64,
    ) {
        let _ = self.writes.send(Write::Publish {
            room: room.to_owned(),
            to,
            after,
            bytes,
            roster,
            step,
        });
    }
}

/// Every heartbeat, checks that each followed room's log in Redis is the one this relay opened
/// and holds what the relay read of it. Redis can lose the last entries of a log, its position
/// going back with them (a failover to a replica that lagged, an AOF written every second, a
/// restore): the stream read from past what it holds would then wait for good, and the entries
/// other relays append under the positions again never reach this relay's members. Such a room
/// stops: its members join again, and catch up from the log as it is. (An append of this relay
/// checks the same, see `APPEND`.)
async fn log_check_loop(feed: Feed) {
    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let watched: Vec<(String, u64, u64, u64)> = feed
            .rooms()
            .iter()
            .map(|(room, w)| (room.clone(), w.id, w.log, w.after))
            .collect();
        for chunk in watched.chunks(512) {
            let mut pipe = redis::pipe();
            for (room, ..) in chunk {
                pipe.cmd("HMGET")
                    .arg(Keys::of(room).room)
                    .arg("position")
                    .arg("log");
            }
            let answers: Vec<(Option<u64>, Option<u64>)> =
                match pipe.query_async(&mut feed.conn.clone()).await {
                    Ok(answers) => answers,
                    Err(error) => {
                        tracing::warn!(%error, "could not check the logs of the rooms followed");
                        break;
                    }
                };
            for ((room, id, log, after), (position, stored_log)) in chunk.iter().zip(answers) {
                let why = match (position, stored_log) {
                    // Gone: the room's next append says so.
                    (None, _) | (_, None) => continue,
                    (_, Some(stored)) if stored != *log => {
                        "the room was created again in Redis since this relay opened it".to_owned()
                    }
                    (Some(position), _) if position < *after => format!(
                        "the room's log in Redis went back to position {position}, below position {after} that this relay read"
                    ),
                    _ => continue,
                };
                let to = feed
                    .rooms()
                    .get(room)
                    .filter(|w| w.id == *id)
                    .map(|w| w.to.clone());
                if let Some(to) = to {
                    tracing::warn!(%room, why, "the room stops; its members join again");
                    let _ = to.send(FeedEvent::Lost(StoreError::Corrupt(why))).await;
                }
            }
        }
    }
}

/// Renews this relay's heartbeat, and nothing else: the work of a lapse (the rooms announce
/// their members again) and of another relay's end (its members leave every room, one command
/// per room) is [`relays_loop`]'s, in a task of its own, so that it never holds up a renewal.
/// (Done between renewals, striking a dead relay's members off thousands of rooms, each strike
/// waiting for Redis's fsync, outlasted this relay's own heartbeat, and the other relays then
/// struck this one's members off every room.)
async fn heartbeat_loop(feed: Feed) {
    let key = heartbeat_key(feed.relay);
    let lasts = HEARTBEAT * 3;
    let mut renewed: Option<std::time::Instant> = None;
    let lapsed = Arc::new(Lapse::default());
    tokio::spawn(relays_loop(feed.clone(), lapsed.clone()));
    loop {
        // `GET`: the heartbeat as it was, gone if it lapsed (this relay stalled, or lost Redis,
        // for longer than it lasts).
        let mut set = redis::cmd("SET");
        set.arg(&key)
            .arg(1)
            .arg("PX")
            .arg(lasts.as_millis() as u64)
            .arg("GET");
        match query::<Option<String>>(&feed.conn, &set).await {
            Err(error) => tracing::warn!(%error, "could not renew this relay's heartbeat"),
            Ok(before) => {
                // Gone, or last renewed longer ago than it lasts (as far as this relay knows:
                // the answer to a renewal that found it gone may have been lost).
                if renewed.is_some_and(|at| before.is_none() || at.elapsed() >= lasts) {
                    tracing::warn!(
                        "this relay's heartbeat had lapsed: its rooms announce their members again"
                    );
                    lapsed.due.store(true, std::sync::atomic::Ordering::Relaxed);
                    lapsed.notify.notify_one();
                }
                renewed = Some(std::time::Instant::now());
            }
        }
        tokio::time::sleep(HEARTBEAT).await;
    }
}

/// That this relay's heartbeat lapsed, for [`relays_loop`].
#[derive(Default)]
struct Lapse {
    /// Set by a renewal that found the heartbeat lapsed; taken by the announcement.
    due: std::sync::atomic::AtomicBool,
    notify: Notify,
}

/// After this relay's heartbeat lapsed, has its rooms announce their members again; and has
/// the rooms hear of the relays whose heartbeat ended, and strikes those relays' members off.
/// A lapse is announced at once, between two rooms of a long strike too.
async fn relays_loop(feed: Feed, lapsed: Arc<Lapse>) {
    // Announcements still to make after a lapse: two, as another relay may strike this one's
    // members off a room just after the first (it found the heartbeat gone before this relay
    // renewed it, and strikes room by room).
    let mut announce = 0;
    let mut announced = tokio::time::Instant::now();
    // Another relay may have taken this one for dead and struck its members off every room:
    // each room announces its members again, at once, and once more a heartbeat later.
    let announce_now = |announce: &mut u32, announced: &mut tokio::time::Instant| {
        let due = lapsed.due.swap(false, std::sync::atomic::Ordering::Relaxed);
        if due {
            *announce = 2;
        }
        let now = *announce > 0 && (due || announced.elapsed() >= HEARTBEAT);
        if now {
            *announce -= 1;
            *announced = tokio::time::Instant::now();
        }
        let rooms: Vec<mpsc::Sender<FeedEvent>> = match now {
            true => feed.rooms().values().map(|w| w.to.clone()).collect(),
            false => Vec::new(),
        };
        async move {
            for to in rooms {
                let _ = to.send(FeedEvent::Lapsed).await;
            }
        }
    };
    loop {
        tokio::select! {
            () = lapsed.notify.notified() => {}
            () = tokio::time::sleep(HEARTBEAT) => {}
        }
        announce_now(&mut announce, &mut announced).await;
        let known: Vec<u64> = feed.relays().keys().copied().collect();
        for relay in known {
            let mut exists = redis::cmd("EXISTS");
            exists.arg(heartbeat_key(relay));
            if query::<u64>(&feed.conn, &exists).await.ok() != Some(0) {
                continue;
            }
            let rooms = feed.relays().remove(&relay).unwrap_or_default();
            tracing::info!(
                relay,
                rooms = rooms.len(),
                "a relay's heartbeat ended: its members leave"
            );
            for room in rooms {
                if lapsed.due.load(std::sync::atomic::Ordering::Relaxed) {
                    announce_now(&mut announce, &mut announced).await;
                }
                let to = feed.rooms().get(&room).map(|w| w.to.clone());
                if let Some(to) = to {
                    let _ = to.send(FeedEvent::Gone(relay)).await;
                }
                let strike = feed.strike(&room, relay);
                let _ = query::<Value>(&feed.conn, &strike).await;
            }
        }
    }
}

impl Feed {
    /// Strikes the members of `relay` off `room`'s list.
    fn strike(&self, room: &str, relay: u64) -> redis::Cmd {
        let mut eval = redis::cmd("EVAL");
        let keys = Keys::of(room);
        eval.arg(STRIKE)
            .arg(2)
            .arg(keys.members)
            .arg(keys.presence)
            .arg(relay);
        eval
    }
}

/// How long one read blocks at most.
const BLOCK_MS: u64 = 10_000;

async fn follow_loop(client: redis::Client, feed: Feed) {
    let state = feed.state.clone();
    let mut control = feed.conn.clone();
    let config = AsyncConnectionConfig::new()
        .set_response_timeout(Some(Duration::from_millis(BLOCK_MS + 5_000)))
        .set_connection_timeout(Some(Duration::from_secs(5)));
    let mut reader: Option<(MultiplexedConnection, i64)> = None;
    loop {
        let watched: Vec<Watched> = {
            let rooms = state.rooms.lock().unwrap_or_else(|e| e.into_inner());
            rooms
                .iter()
                .map(|(room, w)| Watched {
                    room: room.clone(),
                    id: w.id,
                    after: w.after,
                    bus: w.bus.clone(),
                    bus_full: w.bus_full,
                })
                .collect()
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
        xread.arg("COUNT").arg(PAGE);
        // A room whose last read returned a full page of publications learns at once whether
        // more wait: its log entries after them wait for that.
        if !watched.iter().any(|w| w.bus_full) {
            xread.arg("BLOCK").arg(BLOCK_MS);
        }
        xread.arg("STREAMS");
        for watch in &watched {
            let keys = Keys::of(&watch.room);
            xread.arg(keys.log).arg(keys.data).arg(keys.bus);
        }
        for watch in &watched {
            let after = format!("{}-0", watch.after);
            xread.arg(&after).arg(&after).arg(&watch.bus.id);
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
        let batches = answer
            .map_err(backend)
            .and_then(|value| streams(value, &watched, feed.relay));
        match batches {
            Ok(mut batches) => {
                reader = Some((conn, id));
                // A room that read a full page of publications last time and nothing this time
                // hears that none is left.
                for watch in watched.iter().filter(|w| w.bus_full) {
                    if !batches.iter().any(|(room, _)| *room == watch.room) {
                        let batch = Batch {
                            watch: watch.id,
                            ..Batch::default()
                        };
                        batches.push((watch.room.clone(), batch));
                    }
                }
                for (room, batch) in batches {
                    feed.deliver(&room, batch).await;
                }
            }
            Err(error) => {
                tracing::warn!(%error, "the feed's read failed; reconnecting");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// A room as the feed's read started: its watch, and where the read starts in its log and bus.
struct Watched {
    room: String,
    id: u64,
    after: u64,
    bus: BusMark,
    /// Its last read returned a full page of publications.
    bus_full: bool,
}

/// What one read brought for one room.
#[derive(Default)]
struct Batch {
    /// The watch the read was made for: a room closed and opened again meanwhile has a new one,
    /// which reads from places of its own.
    watch: u64,
    logged: Vec<Followed>,
    relayed: Vec<Relayed>,
    /// The last bus entry read, own publications included.
    bus: Option<BusMark>,
    /// How many bus entries were read, own publications included.
    bus_count: usize,
    /// Publications that went from the bus before this relay read them.
    bus_missed: bool,
}

impl Feed {
    /// Hands a room what was read for it, if it is still the watch the read was made for.
    async fn deliver(&self, room: &str, batch: Batch) {
        let last = batch.logged.last().map(|f| f.position);
        let bus_complete = batch.bus_count < PAGE;
        let (id, to, missed, bus_now_complete) = {
            let mut rooms = self.rooms();
            let Some(watch) = rooms.get_mut(room).filter(|w| w.id == batch.watch) else {
                return;
            };
            // Kept until the room hears the members read again.
            watch.missed |= batch.bus_missed;
            if let Some(last) = last {
                if last <= watch.after {
                    return;
                }
                watch.after = last;
            }
            let bus_now_complete = watch.bus_full && bus_complete;
            watch.bus_full = !bus_complete;
            if let Some(bus) = &batch.bus {
                watch.bus.clone_from(bus);
            }
            let others = batch.relayed.iter().map(|r| r.relay);
            self.state
                .note_relays(room, others.filter(|&relay| relay != self.relay));
            (watch.id, watch.to.clone(), watch.missed, bus_now_complete)
        };
        let mut gone = false;
        if !batch.logged.is_empty() || !batch.relayed.is_empty() || bus_now_complete {
            let event = FeedEvent::Read {
                logged: batch.logged,
                relayed: batch.relayed,
                // A read that returned a full page of publications may have left some.
                bus_complete,
            };
            gone = to.send(event).await.is_err();
        }
        if !gone && missed {
            // After what was read: the members the store lists now include those of the
            // publications read since.
            match self.read_members_again(room, id, &to).await {
                Reread::Done => {}
                Reread::Gone => gone = true,
                Reread::Failed => self.read_members_later(room.to_owned(), id, to),
            }
        }
        if gone {
            self.forget(room, id);
        }
    }

    /// The room's task has gone: its next opening watches anew.
    fn forget(&self, room: &str, id: u64) {
        self.state.unfollow(room, id);
    }

    /// Reads the members of the other relays again for the watch `id` of `room`, which missed
    /// publications, and hands them to the room.
    async fn read_members_again(
        &self,
        room: &str,
        id: u64,
        to: &mpsc::Sender<FeedEvent>,
    ) -> Reread {
        match self.open(room).await {
            Ok((_, members)) => {
                {
                    let rooms = self.rooms();
                    if rooms.get(room).is_some_and(|w| w.id == id) {
                        self.state
                            .note_relays(room, members.members.iter().map(|(relay, _)| *relay));
                    }
                }
                if to.send(FeedEvent::Missed(members)).await.is_err() {
                    return Reread::Gone;
                }
                if let Some(watch) = self.rooms().get_mut(room).filter(|w| w.id == id) {
                    watch.missed = false;
                }
                Reread::Done
            }
            Err(error) => {
                tracing::warn!(room, %error, "the members of the other relays could not be read again; trying again in a second");
                Reread::Failed
            }
        }
    }

    /// Tries [`Feed::read_members_again`] every second until it is done, or the watch is gone
    /// or has heard the members read again through a later read (a quiet room has none).
    fn read_members_later(&self, room: String, id: u64, to: mpsc::Sender<FeedEvent>) {
        let feed = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let waiting = feed
                    .rooms()
                    .get(&room)
                    .is_some_and(|w| w.id == id && w.missed);
                if !waiting {
                    return;
                }
                match feed.read_members_again(&room, id, &to).await {
                    Reread::Done => return,
                    Reread::Gone => return feed.forget(&room, id),
                    Reread::Failed => {}
                }
            }
        });
    }
}

/// How a read of the members again went.
enum Reread {
    Done,
    /// The room's task has gone.
    Gone,
    Failed,
}

/// An `XREAD` answer: what it brought for each room.
fn streams(
    value: Value,
    watched: &[Watched],
    own: u64,
) -> Result<Vec<(String, Batch)>, StoreError> {
    // The stream's room, and which of its log streams it is (none: its bus).
    let mut by_key: HashMap<String, (&Watched, Option<usize>)> = HashMap::new();
    for watch in watched {
        let keys = Keys::of(&watch.room);
        by_key.insert(keys.log, (watch, Some(0)));
        by_key.insert(keys.data, (watch, Some(1)));
        by_key.insert(keys.bus, (watch, None));
    }
    let mut out: HashMap<String, Batch> = HashMap::new();
    // Each room's pages of its log and its data stream, merged once all are read.
    let mut pages: HashMap<String, [(Vec<Followed>, bool); 2]> = HashMap::new();
    for stream in array(value)? {
        let mut parts = array(stream)?.into_iter();
        let (Some(key), Some(entries)) = (parts.next(), parts.next()) else {
            return Err(corrupt("a stream without entries"));
        };
        let Some(&(watch, log)) = by_key.get(&text(&key)?) else {
            continue;
        };
        let batch = out.entry(watch.room.clone()).or_insert_with(|| Batch {
            watch: watch.id,
            ..Batch::default()
        });
        if let Some(log) = log {
            let page = array(entries)?
                .into_iter()
                .map(|value| Ok(entry(value)?.0))
                .collect::<Result<Vec<_>, StoreError>>()?;
            let full = page.len() == PAGE;
            pages.entry(watch.room.clone()).or_default()[log] = (page, full);
            continue;
        }
        let mut last = watch.bus.seq;
        for value in array(entries)? {
            let (id, seq, mut relayed) = bus_entry(value)?;
            if let (Some(last), Some(seq)) = (last, seq) {
                if seq > last + 1 {
                    batch.bus_missed = true;
                }
            }
            last = seq;
            batch.bus = Some(BusMark { id, seq });
            batch.bus_count += 1;
            if relayed.relay == own {
                // Its members had it; its room step still counts.
                relayed.bytes = Bytes::new();
            }
            batch.relayed.push(relayed);
        }
    }
    for (room, pages) in pages {
        if let Some(batch) = out.get_mut(&room) {
            batch.logged = merge_pages(pages, |f| f.position).0;
        }
    }
    Ok(out.into_iter().collect())
}

/// Pages of entries read from a room's streams that share one numbering of positions, each in
/// the order of its positions and marked full when the read may have left entries after it,
/// merged into one order: the entries up to the last of the first page to end among the full
/// ones (and that position, the cut), or every entry if none is full. Past a full page's end
/// the other streams' entries may still miss one that comes before them; they are read again.
fn merge_pages<T>(
    pages: impl IntoIterator<Item = (Vec<T>, bool)>,
    position: impl Fn(&T) -> u64,
) -> (Vec<T>, Option<u64>) {
    let pages: Vec<(Vec<T>, bool)> = pages.into_iter().collect();
    let cut = pages
        .iter()
        .filter(|(_, full)| *full)
        .filter_map(|(page, _)| page.last().map(&position))
        .min();
    let mut merged: Vec<T> = pages
        .into_iter()
        .flat_map(|(page, _)| page)
        .filter(|e| cut.is_none_or(|cut| position(e) <= cut))
        .collect();
    merged.sort_by_key(|e| position(e));
    (merged, cut)
}

/// One bus entry: its id, its number (if it has one), and what it carries.
fn bus_entry(value: Value) -> Result<(String, Option<u64>, Relayed), StoreError> {
    let mut parts = array(value)?.into_iter();
    let (Some(id), Some(fields)) = (parts.next(), parts.next()) else {
        return Err(corrupt("a bus entry without fields"));
    };
    let mut relayed = Relayed {
        relay: 0,
        after: 0,
        to: None,
        high: 0,
        bytes: Bytes::new(),
    };
    let mut seq = None;
    let mut fields = array(fields)?.into_iter();
    while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
        match text(&name)?.as_str() {
            "q" => seq = Some(int(&value)?),
            "r" => relayed.relay = int(&value)?,
            "a" => relayed.after = int(&value)?,
            "h" => relayed.high = int(&value)?,
            "t" => relayed.to = Some(int(&value)?).filter(|&n| n != 0),
            "f" => {
                relayed.bytes = match value {
                    Value::BulkString(b) => Bytes::from(b),
                    _ => return Err(corrupt("a bus frame that is not a byte string")),
                }
            }
            _ => {}
        }
    }
    Ok((text(&id)?, seq, relayed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_of_two_streams_merge_up_to_the_end_of_the_first_full_one() {
        // Neither full: everything, in order.
        let (merged, cut) = merge_pages([(vec![1, 4], false), (vec![2, 3, 5], false)], |&p| p);
        assert_eq!((merged, cut), (vec![1, 2, 3, 4, 5], None));
        // The data stream's page is full at 4: position 6 of the log waits, for 5 may follow.
        let (merged, cut) = merge_pages([(vec![3, 6], false), (vec![1, 2, 4], true)], |&p| p);
        assert_eq!((merged, cut), (vec![1, 2, 3, 4], Some(4)));
        // Both full: up to the end of the one that ends first.
        let (merged, cut) = merge_pages([(vec![1, 5, 9], true), (vec![2, 3], true)], |&p| p);
        assert_eq!((merged, cut), (vec![1, 2, 3], Some(3)));
    }

    #[test]
    fn keys_keep_the_whole_room_in_the_hash_tag_and_never_collide() {
        assert_eq!(Keys::of("doc").log, "pm:{doc}:log");
        assert_eq!(Keys::of("a}b").room, "pm:{a%7Db}:room");
        assert_ne!(Keys::of("a%7Db").room, Keys::of("a}b").room);
        assert_eq!(Keys::of("{x").tokens, "pm:{%7Bx}:tokens");
    }

    /// After Redis lost its scripts, the commands it did not run run again, in order, unless a
    /// later command of their room ran (another relay loaded the scripts midway): those fail.
    #[test]
    fn commands_redis_did_not_run_run_again_unless_a_later_one_of_their_room_ran() {
        let rooms = ["a", "b", "a", "c", "b", "c"];
        // All of them: every command runs again.
        let all: Vec<usize> = (0..rooms.len()).collect();
        assert_eq!(run_again(&all, &rooms), (all.clone(), Vec::new()));
        // Room b's second command ran after its first did not: b's first fails. Room c's first
        // ran, its second did not: in order. Room a: both did not.
        assert_eq!(run_again(&[0, 1, 2, 5], &rooms), (vec![0, 2, 5], vec![1]));
    }

    /// A relay that follows rooms for months forgets each room's other relays once it stops
    /// following the room; a later opening's follow is not stopped by the earlier one's end.
    #[test]
    fn a_room_no_longer_followed_is_forgotten_with_its_other_relays() {
        let state = FeedState {
            rooms: Mutex::new(HashMap::new()),
            changed: Notify::new(),
            next_id: std::sync::atomic::AtomicU64::new(1),
            relays: Mutex::new(HashMap::new()),
        };
        let watch = |id| Watch {
            id,
            log: 1,
            after: 0,
            bus: BusMark {
                id: "0-0".into(),
                seq: None,
            },
            missed: false,
            bus_full: false,
            to: mpsc::channel(1).0,
        };
        for room in ["a", "b"] {
            state.rooms().insert(room.into(), watch(1));
        }
        state.relays().insert(7, ["a".into(), "b".into()].into());
        state.relays().insert(8, ["a".into()].into());
        assert!(!state.unfollow("a", 2), "not the id that follows the room");
        assert!(state.unfollow("a", 1));
        assert!(!state.unfollow("a", 1), "once");
        assert_eq!(
            *state.relays(),
            HashMap::from([(7, HashSet::from(["b".to_owned()]))])
        );
        assert!(state.unfollow("b", 1));
        assert!(state.relays().is_empty());
        assert!(state.rooms().is_empty());
    }
}
