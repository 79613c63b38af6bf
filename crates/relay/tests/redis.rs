//! Many relays, one room: relay processes on one real Redis (started here on a free loopback
//! port, with its append-only file fsynced on every write). Members of one room spread over the
//! relays see one order with the same positions; a resend raced through two relays is stored
//! once; a relay killed with SIGKILL costs its clients a reconnect to another relay and nothing
//! else; Redis killed and restarted on its AOF keeps every acknowledged message.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{edit, join_at, replayed_text, session, temp_dir, Member, TempDir};
use pattern_mesh_client::Client;
use pattern_mesh_core::doc::SharedDoc;
use pattern_mesh_core::session::Event;
use pattern_mesh_core::wire::{Body, Frame, Json, Reason};

const WAIT: Duration = Duration::from_secs(20);

/// A child process, killed with SIGKILL when dropped so that a failing test leaves none behind.
struct Process(Child);

impl Process {
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Redis server of its own: a free loopback port, a temporary directory, `appendonly yes` and
/// `appendfsync always` (an acknowledged append is on disk).
struct Redis {
    process: Process,
    port: u16,
    dir: TempDir,
}

impl Redis {
    fn start(name: &str) -> Redis {
        let dir = temp_dir(name);
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let process = Self::spawn(&dir, port);
        Redis { process, port, dir }
    }

    fn spawn(dir: &Path, port: u16) -> Process {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server runs (bash .ci/setup installs Debian's redis-server)");
        let process = Process(child);
        let deadline = Instant::now() + WAIT;
        while !ping(port) {
            assert!(Instant::now() < deadline, "redis answers PING");
            std::thread::sleep(Duration::from_millis(20));
        }
        process
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL, then the same port and directory: what Redis still has is what its AOF holds.
    fn crash_and_restart(&mut self) {
        self.process.kill();
        self.restart();
    }

    /// Starts Redis again on its port and directory (after [`Process::kill`]).
    fn restart(&mut self) {
        self.process = Self::spawn(&self.dir, self.port);
    }
}

/// Sends one command in Redis's inline form and reads the first line of its answer.
fn command(port: u16, line: &str) -> String {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("redis is up");
    stream.write_all(format!("{line}\r\n").as_bytes()).unwrap();
    let mut answer = [0u8; 64];
    let n = stream.read(&mut answer).unwrap();
    String::from_utf8_lossy(&answer[..n]).trim_end().to_owned()
}

fn ping(port: u16) -> bool {
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let mut answer = [0u8; 7];
    stream.write_all(b"PING\r\n").is_ok()
        && stream.read_exact(&mut answer).is_ok()
        && &answer == b"+PONG\r\n"
}

/// A relay process on `redis`; answers it and its WebSocket URL.
fn relay(redis: &Redis) -> (Process, String) {
    relay_with(redis, &[])
}

/// A relay process on `redis`, with `args` besides the defaults of these tests.
fn relay_with(redis: &Redis, args: &[&str]) -> (Process, String) {
    let url = redis.url();
    let all: Vec<&str> = ["--store", url.as_str()]
        .into_iter()
        .chain(args.iter().copied())
        .collect();
    let (child, addr) = common::spawn_relay(&all);
    (Process(child), format!("ws://{addr}/ws"))
}

fn relays(redis: &Redis, n: usize) -> (Vec<Process>, Vec<String>) {
    (0..n).map(|_| relay(redis)).unzip()
}

/// Sends `update` as `member`'s next stamped update of the text `content`.
async fn send_update(member: &mut Member, update: Vec<u8>) {
    let stamp = member.stamp();
    let body = Body::Update {
        doc: "content".into(),
        update,
    };
    member.send(&Frame::stamped(stamp, body)).await;
}

/// What one member saw of the log: the position of each message, with its sender and step
/// (its own from their acknowledgements). Logged messages arrive in the log's order, and an
/// acknowledgement after every message logged before it.
async fn read_log(member: &mut Member, expected: usize) -> BTreeMap<u64, (u64, u64)> {
    let mut seen = BTreeMap::new();
    let mut last = 0;
    let deadline = tokio::time::Instant::now() + WAIT;
    while seen.len() < expected {
        let positioned = tokio::time::timeout_at(deadline, member.recv())
            .await
            .unwrap_or_else(|_| panic!("{} of {expected} messages arrived", seen.len()));
        match (&positioned.frame, positioned.position) {
            (Frame::Ack { step, position }, _) => {
                assert_eq!(
                    seen.range(..*position).count() as u64,
                    position - 1,
                    "the acknowledgement of position {position} comes after everything before it"
                );
                assert!(seen.insert(*position, (member.node, *step)).is_none());
            }
            (frame, Some(position)) => {
                let stamp = frame.stamp().expect("a logged message is stamped");
                assert!(
                    position > last,
                    "messages arrive in the log's order: {position} after {last}"
                );
                last = position;
                assert!(seen.insert(position, (stamp.sender, stamp.step)).is_none());
            }
            _ => continue,
        }
    }
    seen
}

/// A Redis with a memory limit and a policy that evicts keys would, once full, drop rooms' logs
/// and members without a word: the relay refuses to start on it, and says why. With
/// `noeviction` (a full Redis refuses appends instead, and the members are told), it starts.
#[test]
fn a_relay_refuses_a_redis_that_may_evict_its_keys() {
    let redis = Redis::start("redis-eviction");
    assert_eq!(command(redis.port, "CONFIG SET maxmemory 104857600"), "+OK");
    assert_eq!(
        command(redis.port, "CONFIG SET maxmemory-policy allkeys-lru"),
        "+OK"
    );
    let stderr = refused_start(&redis.url());
    assert!(
        stderr.contains("maxmemory-policy is allkeys-lru")
            && stderr.contains("maxmemory-policy noeviction"),
        "{stderr}"
    );
    // With noeviction, the same Redis is fine.
    assert_eq!(
        command(redis.port, "CONFIG SET maxmemory-policy noeviction"),
        "+OK"
    );
    let (_relay, _url) = relay(&redis);
}

/// Starts a relay on the store at `url` and waits for it to exit, as it must: answers what it
/// wrote to its standard error.
fn refused_start(url: &str) -> String {
    let mut child = Process(
        Command::new(env!("CARGO_BIN_EXE_pattern-mesh-relay"))
            .args(["--listen", "127.0.0.1:0", "--store", url])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the relay starts"),
    );
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the relay exits");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    child
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(!status.success(), "{stderr}");
    stderr
}

/// A relay follows the rooms it shares with `XREAD`, and ends a blocked read with `CLIENT
/// UNBLOCK` when the rooms change. On a Redis user without those rights it started all the
/// same, and its reader retried for ever: appends were acknowledged, and no member of any
/// room, on any relay, received them. It refuses to start, and says which right is missing.
#[test]
fn a_relay_refuses_a_redis_user_that_may_not_follow_rooms() {
    let redis = Redis::start("redis-rights");
    for missing in ["client", "xread"] {
        let user = format!("ACL SETUSER relay reset on >secret ~* &* +@all -{missing}");
        assert_eq!(command(redis.port, &user), "+OK");
        let url = format!("redis://relay:secret@127.0.0.1:{}", redis.port);
        let stderr = refused_start(&url);
        assert!(
            stderr.contains(&missing.to_uppercase()) && stderr.contains("ACL SETUSER"),
            "{stderr}"
        );
    }
    // With every right it needs, the same user is fine.
    let user = "ACL SETUSER relay reset on >secret ~* &* +@all";
    assert_eq!(command(redis.port, user), "+OK");
    let url = format!("redis://relay:secret@127.0.0.1:{}", redis.port);
    let (_relay, _addr) = common::spawn_relay(&["--store", &url]);
}

/// Redis evicts a room's record while its log stays (a memory policy other than `noeviction`
/// on a managed Redis that hides its settings, where the relay can only warn). The room was
/// created again at position 0; its next append recorded the message's step for its node and
/// then failed to log it; the client's resend was answered as stored. The edit was lost without
/// a word. The relay now refuses to open a room whose record is gone while its log is not, and
/// an append that could not be logged changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_whose_record_redis_lost_is_refused_not_reset() {
    let redis = Redis::start("redis-evicted");
    let (_relays, urls) = relays(&redis, 1);
    let typist = Client::connect(&urls[0], session("evicted", "typist"))
        .await
        .unwrap();
    typist.insert("content", 0, "kept ").unwrap();
    typist.settled(WAIT).await.unwrap();
    assert_eq!(command(redis.port, "DEL pm:{evicted}:room"), ":1");
    typist.insert("content", 5, "typed after").unwrap();
    if typist.settled(Duration::from_secs(8)).await.is_ok() {
        // Acknowledged: then the room's log holds it.
        let late = join_at(&urls[0], "evicted", 0, 0, None).await;
        assert_eq!(replayed_text(late.replay()), "kept typed after");
        return;
    }
    // Not acknowledged: a join says why.
    let options = pattern_mesh_client::JoinOptions {
        room: "evicted".into(),
        name: "late".into(),
        since: 0,
        log: 0,
        resume: None,
        config: None,
    };
    let refused = pattern_mesh_client::Connection::join(&urls[0], options)
        .await
        .err()
        .expect("the room is not opened again from nothing");
    assert!(refused.to_string().contains("noeviction"), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_spread_over_three_relays_see_one_order_with_the_same_positions() {
    let redis = Redis::start("redis-order");
    let (_relays, urls) = relays(&redis, 3);
    let mut members = Vec::new();
    for i in 0..6 {
        members.push(join_at(&urls[i % 3], "order", 0, 0, None).await);
    }
    let rounds = 40;
    for round in 0..rounds {
        for member in &mut members {
            member.data(serde_json::json!({ "round": round })).await;
        }
    }
    let total = rounds * members.len();
    let mut logs = Vec::new();
    for member in &mut members {
        logs.push(read_log(member, total).await);
    }
    let positions: BTreeSet<u64> = (1..=total as u64).collect();
    for log in &logs {
        assert_eq!(log.keys().copied().collect::<BTreeSet<_>>(), positions);
        assert_eq!(
            log, &logs[0],
            "every member saw the same message at each position"
        );
    }
    // Each sender's messages are in its own order.
    for member in &members {
        let steps: Vec<u64> = logs[0]
            .values()
            .filter(|(sender, _)| *sender == member.node)
            .map(|(_, step)| *step)
            .collect();
        assert_eq!(steps.len(), rounds);
        assert!(steps.windows(2).all(|w| w[0] < w[1]));
    }
    // A late joiner on any relay reads the same log.
    let late = join_at(&urls[2], "order", 0, 0, None).await;
    let replayed: BTreeMap<u64, (u64, u64)> = late
        .replay()
        .iter()
        .map(|p| {
            let stamp = p.frame.stamp().unwrap();
            (p.position.unwrap(), (stamp.sender, stamp.step))
        })
        .collect();
    assert_eq!(replayed, logs[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_edited_through_three_relays_converge() {
    let redis = Redis::start("redis-converge");
    let (_relays, urls) = relays(&redis, 3);
    let mut clients = Vec::new();
    for (i, url) in urls.iter().enumerate() {
        let client = Client::connect(url, session("converge", &format!("c{i}")))
            .await
            .expect("connected");
        clients.push(client);
    }
    for round in 0..60 {
        for (i, client) in clients.iter().enumerate() {
            let at = if round % 2 == 0 {
                0
            } else {
                client.text("content").chars().count() as u32
            };
            client.insert("content", at, &format!("{i}")).unwrap();
        }
        if round % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let deadline = Instant::now() + WAIT;
    loop {
        let texts: Vec<String> = clients.iter().map(|c| c.text("content")).collect();
        if texts.iter().all(|t| t == &texts[0] && t.len() == 180) {
            for i in 0..3 {
                assert_eq!(texts[0].matches(&i.to_string()).count(), 60);
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the documents converge: {texts:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for client in clients {
        client.settled(WAIT).await.expect("nothing pending");
        client.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resend_raced_through_two_relays_is_stored_once_and_refused_as_a_replay_on_the_other() {
    let redis = Redis::start("redis-race");
    let (_relays, urls) = relays(&redis, 2);
    let mut first = join_at(&urls[0], "race", 0, 0, None).await;
    // The node's record is in Redis once it stored a message.
    first.data_acked(serde_json::json!("hello")).await;
    let mut second = join_at(&urls[1], "race", 0, 0, Some(first.token)).await;
    assert_eq!(
        second.node, first.node,
        "the other relay resumes the same node"
    );
    let (mut stored, mut replays) = (0, 0);
    for round in 0..30 {
        // The same frame through both relays at once, as a client that failed over while its
        // first copy was in flight sends it.
        let stamp = first.stamp();
        let frame = Frame::stamped(
            stamp,
            pattern_mesh_core::wire::Body::Data {
                data: pattern_mesh_core::wire::Json::from_value(&serde_json::json!(round)).unwrap(),
            },
        );
        let bytes = frame.encode();
        let (a, b) = tokio::join!(first.send_bytes(bytes.clone()), second.send_bytes(bytes));
        let ((), ()) = (a, b);
        for member in [&mut first, &mut second] {
            let (answer, _) = member
                .recv_until(|f| matches!(f, Frame::Ack { step, .. } | Frame::Reject { step, .. } if *step == stamp.step))
                .await;
            match answer {
                Frame::Ack { .. } => stored += 1,
                Frame::Reject { reason, detail, .. } => {
                    assert_eq!(reason, Reason::Replay, "{detail}");
                    replays += 1;
                }
                _ => unreachable!(),
            }
        }
    }
    assert_eq!(
        (stored, replays),
        (30, 30),
        "each race: one stored, one replay"
    );
    let late = join_at(&urls[1], "race", 0, 0, None).await;
    let steps: Vec<u64> = late
        .replay()
        .iter()
        .filter_map(|p| p.frame.stamp().map(|s| s.step))
        .collect();
    assert_eq!(steps.len(), 31, "every step once in the log: {steps:?}");
    assert!(steps.windows(2).all(|w| w[0] < w[1]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_mid_stream_costs_its_clients_a_reconnect_to_another_and_nothing_else() {
    let redis = Redis::start("redis-failover");
    let (mut relays, urls) = relays(&redis, 3);
    let order: Vec<&str> = urls.iter().map(String::as_str).collect();
    let writer = Client::connect_any(&order, session("failover", "writer"))
        .await
        .expect("connected to the first relay");
    let readers = [
        Client::connect(&urls[1], session("failover", "r1"))
            .await
            .unwrap(),
        Client::connect(&urls[2], session("failover", "r2"))
            .await
            .unwrap(),
    ];
    let mut expected = String::new();
    let mut killed_at = None;
    for i in 0..300 {
        let chunk = format!("{} ", i);
        let at = writer.text("content").chars().count() as u32;
        writer.insert("content", at, &chunk).unwrap();
        expected.push_str(&chunk);
        if i == 120 {
            // The writer's relay dies with edits in flight.
            relays[0].kill();
            killed_at = Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    writer
        .settled(WAIT)
        .await
        .expect("the writer reconnected to another relay and sent its outbox");
    let reconnect = killed_at.unwrap().elapsed();
    assert_eq!(writer.text("content"), expected);
    for reader in &readers {
        let deadline = Instant::now() + WAIT;
        while reader.text("content") != expected {
            assert!(
                Instant::now() < deadline,
                "every edit reaches every reader: {:?}",
                reader.text("content")
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    println!(
        "RESULT relay-failover all_delivered_after_ms={}",
        reconnect.as_millis()
    );
    writer.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_on_its_aof_keeps_every_acknowledged_message() {
    let mut redis = Redis::start("redis-restart");
    let (_relays, urls) = relays(&redis, 2);
    // A client typing through it all: its relay's room stops when Redis fails, it reconnects,
    // and its outbox goes again; nothing it typed is lost.
    let typist = Client::connect(&urls[1], session("restart-doc", "typist"))
        .await
        .unwrap();
    let mut typed = String::new();
    for i in 0..150 {
        let chunk = format!("{i} ");
        let at = typist.text("content").chars().count() as u32;
        typist.insert("content", at, &chunk).unwrap();
        typed.push_str(&chunk);
        if i == 75 {
            redis.crash_and_restart();
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    typist
        .settled(WAIT)
        .await
        .expect("the typist's outbox was stored after Redis came back");
    let late = join_at(&urls[0], "restart-doc", 0, 0, None).await;
    assert_eq!(common::replayed_text(late.replay()), typed);
    typist.close().await;

    let mut writer = join_at(&urls[0], "restart", 0, 0, None).await;
    let mut acked = BTreeSet::new();
    // A hundred messages acknowledged, then three hundred more in flight while Redis dies:
    // some of those are acknowledged, the rest fail.
    for i in 0..100 {
        let (step, _) = writer.data_acked(serde_json::json!(i)).await;
        acked.insert(step);
    }
    let mut sent = 100;
    for i in 100..400 {
        writer.data(serde_json::json!(i)).await;
        sent += 1;
        if i == 250 {
            redis.crash_and_restart();
        }
    }
    // Read every answer until the relay closes the connection (the room stops on the failure).
    // (It ends closed, or with everything answered before Redis died.)
    while let Ok(Ok(p)) = tokio::time::timeout(Duration::from_secs(5), writer.conn.recv()).await {
        if let Frame::Ack { step, .. } = p.frame {
            acked.insert(step);
        }
    }
    assert!(
        acked.len() >= 100 && acked.len() <= sent,
        "{} of {sent} acknowledged",
        acked.len()
    );
    // Every acknowledged message is in the log, read through the other relay.
    let deadline = Instant::now() + WAIT;
    let logged: BTreeSet<u64> = loop {
        let options = pattern_mesh_client::JoinOptions {
            room: "restart".into(),
            name: "late".into(),
            since: 0,
            log: 0,
            resume: None,
            config: None,
        };
        match pattern_mesh_client::Connection::join(&urls[1], options).await {
            Ok((_, welcome)) => {
                break welcome
                    .replay
                    .iter()
                    .filter_map(|p| p.frame.stamp().map(|s| s.step))
                    .collect()
            }
            Err(e) => {
                assert!(Instant::now() < deadline, "the room opens again: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let lost: Vec<&u64> = acked.difference(&logged).collect();
    assert!(lost.is_empty(), "acknowledged but lost: {lost:?}");
    println!(
        "RESULT redis-restart sent={sent} acknowledged={} logged={}",
        acked.len(),
        logged.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_presence_and_signals_cross_relays_and_a_dead_relays_members_leave() {
    use pattern_mesh_core::wire::{Body, Json};
    let redis = Redis::start("redis-bus");
    let (mut relays, urls) = relays(&redis, 2);
    let mut a = join_at(&urls[0], "bus", 0, 0, None).await;
    let mut b = join_at(&urls[1], "bus", 0, 0, None).await;
    // The welcome lists the member on the other relay, or (when its join had not reached Redis
    // yet) a `peerJoined` follows.
    if !b.welcome.peers.iter().any(|p| p.node == a.node) {
        let (joined, _) = b
            .recv_until(|f| matches!(f, Frame::PeerJoined { .. }))
            .await;
        assert!(matches!(joined, Frame::PeerJoined { peer } if peer.node == a.node));
    }
    let (joined, _) = a
        .recv_until(|f| matches!(f, Frame::PeerJoined { .. }))
        .await;
    assert!(matches!(joined, Frame::PeerJoined { peer } if peer.node == b.node));
    // A presence, then a stored message and a signal behind it.
    let presence = Frame::Presence {
        sender: a.node,
        data: Json::from_value(&serde_json::json!({ "cursor": 3 })).unwrap(),
    };
    a.send(&presence).await;
    let (got, _) = b.recv_until(|f| matches!(f, Frame::Presence { .. })).await;
    assert_eq!(got, presence);
    let stored = a.data(serde_json::json!("stored")).await;
    let stamp = a.stamp();
    let signal = Frame::stamped(
        stamp,
        Body::Signal {
            data: Json::from_value(&serde_json::json!("signal")).unwrap(),
        },
    );
    a.send(&signal).await;
    let mut steps = Vec::new();
    while steps.len() < 2 {
        if let Some(s) = b.recv().await.frame.stamp() {
            steps.push(s.step);
        }
    }
    assert_eq!(
        steps,
        vec![stored, stamp.step],
        "the signal comes after the message before it"
    );
    // A late joiner on the other relay has the presence right after its welcome.
    let late = join_at(&urls[1], "bus", 0, 0, None).await;
    assert!(
        late.replay().iter().any(|p| p.frame == presence),
        "{:?}",
        late.replay()
    );
    // A's relay dies: its member leaves the room for everyone on the other relay.
    relays[0].kill();
    let started = Instant::now();
    let (left, _) = b.recv_until(|f| matches!(f, Frame::PeerLeft { .. })).await;
    assert!(matches!(left, Frame::PeerLeft { node } if node == a.node));
    println!(
        "RESULT relay-death peer_left_after_ms={}",
        started.elapsed().as_millis()
    );
}

/// A relay that stops answering for longer than its heartbeat lasts (a stall, or a partition
/// from Redis) is taken for dead by another relay, which strikes its members off the room and
/// tells its own members they left. They had not, and nothing announced them again: they stayed
/// gone for the others, and for every late joiner, while their edits kept coming. A relay that
/// finds its heartbeat had lapsed announces its members again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_whose_heartbeat_lapsed_announces_its_members_again() {
    let redis = Redis::start("redis-lapse");
    let (relays, urls) = relays(&redis, 2);
    let a = join_at(&urls[0], "lapse", 0, 0, None).await;
    let mut b = join_at(&urls[1], "lapse", 0, 0, None).await;
    if !b.welcome.peers.iter().any(|p| p.node == a.node) {
        b.recv_until(|f| matches!(f, Frame::PeerJoined { peer } if peer.node == a.node))
            .await;
    }
    // The relay of `a` stalls past its heartbeat (6 s): the other takes it for dead.
    let pid = relays[0].0.id().to_string();
    let signal = |which: &str| {
        let status = Command::new("kill").args([which, &pid]).status().unwrap();
        assert!(status.success(), "kill {which}");
    };
    signal("-STOP");
    let (left, _) = b.recv_until(|f| matches!(f, Frame::PeerLeft { .. })).await;
    signal("-CONT");
    assert_eq!(left, Frame::PeerLeft { node: a.node });
    // Back, it finds its heartbeat lapsed and announces `a` again.
    let (joined, _) = b
        .recv_until(|f| matches!(f, Frame::PeerJoined { .. }))
        .await;
    assert!(
        matches!(&joined, Frame::PeerJoined { peer } if peer.node == a.node),
        "{joined:?}"
    );
    let late = join_at(&urls[1], "lapse", 0, 0, None).await;
    assert!(
        late.welcome.peers.iter().any(|p| p.node == a.node),
        "{:?}",
        late.welcome.peers
    );
    drop(a);
}

/// A stamped signal from `member` carrying `value`.
fn signal(member: &mut Member, value: serde_json::Value) -> Frame {
    let stamp = member.stamp();
    Frame::stamped(
        stamp,
        Body::Signal {
            data: pattern_mesh_core::wire::Json::from_value(&value).unwrap(),
        },
    )
}

/// A game moves by signals alone, and one signal's publication fails while Redis is down. The
/// relay then dropped every later publication of the room, waiting for an append that a room
/// of signals never makes: the member on the other relay heard nothing more, and no one was
/// told. The room stops at the failure instead: its members reconnect and hear each other
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_lost_with_redis_stops_the_room_and_its_members_hear_each_other_again() {
    let mut redis = Redis::start("redis-lost-signal");
    let (_relays, urls) = relays(&redis, 2);
    let mut a = join_at(&urls[0], "game", 0, 0, None).await;
    let mut b = join_at(&urls[1], "game", 0, 0, None).await;
    a.recv_until(|f| matches!(f, Frame::PeerJoined { peer } if peer.node == b.node))
        .await;
    let before = signal(&mut a, serde_json::json!("before"));
    a.send(&before).await;
    let (got, _) = b.recv_until(|f| f.stamp().is_some()).await;
    assert_eq!(got, before);

    redis.process.kill();
    let lost = signal(&mut a, serde_json::json!("lost"));
    a.send(&lost).await;
    // Long enough for the relay to find Redis gone.
    tokio::time::sleep(Duration::from_secs(2)).await;
    redis.restart();

    // The member whose signal was lost is told: its room stopped.
    let (code, reason) = a.closed().await;
    assert_eq!(code, pattern_mesh_core::wire::close::INTERNAL, "{reason}");
    // It joins again, and the game goes on for the member on the other relay.
    let mut a = join_at(&urls[0], "game", 0, 0, Some(a.token)).await;
    let after = signal(&mut a, serde_json::json!("after"));
    a.send(&after).await;
    let (got, _) = b
        .recv_until(|f| f.stamp().is_some_and(|s| s.sender == a.node) && *f != lost)
        .await;
    assert_eq!(got, after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_relay_compacts_a_shared_room_and_the_log_keeps_every_data_entry() {
    let redis = Redis::start("redis-compact");
    let compact = ["--compact-updates", "40"];
    let (_a, first) = relay_with(&redis, &compact);
    let (_b, second) = relay_with(&redis, &compact);
    let writers = [
        Client::connect(&first, session("compact", "w1"))
            .await
            .unwrap(),
        Client::connect(&second, session("compact", "w2"))
            .await
            .unwrap(),
    ];
    let mut data = join_at(&first, "compact", 0, 0, None).await;
    // Every member has joined: from here on nothing reads the log's entries but a compaction.
    assert_eq!(command(redis.port, "CONFIG RESETSTAT"), "+OK");
    for i in 0..150 {
        for (w, writer) in writers.iter().enumerate() {
            let at = writer.text("content").chars().count() as u32;
            writer.insert("content", at, &format!("{w}")).unwrap();
        }
        if i % 10 == 0 {
            data.data_acked(serde_json::json!(i)).await;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    for writer in &writers {
        writer.settled(WAIT).await.unwrap();
    }
    let deadline = Instant::now() + WAIT;
    while writers[0].text("content") != writers[1].text("content") {
        assert!(Instant::now() < deadline, "the writers converge");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let text = writers[0].text("content");
    assert_eq!(text.len(), 300);
    // One relay holds the lease; the log holds the last snapshot and the updates after it (the
    // data entries are in a stream of their own).
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let holder: Option<String> = redis::cmd("GET")
        .arg("pm:{compact}:lease")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(holder.is_some(), "a relay took the compaction lease");
    let len: u64 = redis::cmd("XLEN")
        .arg("pm:{compact}:log")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        len < 150,
        "the log was compacted: {len} entries for 315 messages"
    );
    // A compaction finds the document entries it drops without reading the log: it read every
    // entry since the last snapshot, data entries and their frames too, in one script that
    // holds every room of every relay (a member's 700 MB of data held Redis for seconds).
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        !stats.contains("cmdstat_xrange:"),
        "a compaction read the log: {stats}"
    );
    // A late joiner on either relay builds the same text from the snapshot and the tail, and
    // gets every data message.
    for url in [&first, &second] {
        let late = join_at(url, "compact", 0, 0, None).await;
        assert!(late
            .replay()
            .iter()
            .any(|p| matches!(p.frame, Frame::Snapshot { .. })));
        assert_eq!(common::replayed_text(late.replay()), text);
        let values = late
            .replay()
            .iter()
            .filter(|p| common::is_data(&p.frame))
            .count();
        assert_eq!(values, 15);
    }
    println!("RESULT shared-compaction log_entries={len} messages=315");
    for writer in writers {
        writer.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_checks_replay_identity_and_the_future_bound_with_each_append() {
    use pattern_mesh_core::room::Append;
    use pattern_mesh_core::store::{Appended, Store};
    use pattern_mesh_core::wire::{Body, Json, RoomConfig, Stamp};
    let redis = Redis::start("redis-script");
    let (store, _feed) =
        pattern_mesh_relay::store::redis::RedisStore::open(&redis.url(), 256 << 20)
            .await
            .expect("connected");
    let record = store
        .open_room("script", RoomConfig::default())
        .await
        .unwrap();
    let max_future = record.config.max_future;
    let node = record.next_node;
    let append = |step: u64, token: [u8; 16]| {
        let frame = Frame::stamped(
            Stamp {
                sender: node,
                step,
                pattern: pattern_mesh_core::pattern::PatternConfig::default().value(step),
            },
            Body::Data {
                data: Json::from_value(&serde_json::json!(step)).unwrap(),
            },
        );
        Append {
            sender: node,
            token: Some(token),
            // A user hash above i64::MAX and 2^53, as most are: the record keeps it exactly.
            user: u64::MAX - 2,
            step,
            high: 0,
            doc: None,
            snapshot: false,
            covers: 0,
            bytes: bytes::Bytes::from(frame.encode()),
        }
    };
    let token = [7; 16];
    let refused = store
        .append("script", append(max_future + 1, token))
        .await
        .unwrap();
    assert!(
        matches!(
            refused,
            Appended::Refused {
                reason: Reason::FutureStep,
                ..
            }
        ),
        "{refused:?}"
    );
    let stored = store.append("script", append(1, token)).await.unwrap();
    assert!(
        matches!(stored, Appended::Stored { position: 1, .. }),
        "{stored:?}"
    );
    let record = store.find_node("script", token).await.unwrap().unwrap();
    assert_eq!((record.node, record.user), (node, u64::MAX - 2));
    let again = store.append("script", append(1, token)).await.unwrap();
    assert!(
        matches!(again, Appended::Replayed { position: 1, .. }),
        "{again:?}"
    );
    let forged = store.append("script", append(2, [8; 16])).await.unwrap();
    assert!(
        matches!(
            forged,
            Appended::Refused {
                reason: Reason::SenderMismatch,
                ..
            }
        ),
        "{forged:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_alone_on_its_relay_moves_the_room_step_with_its_signals() {
    use pattern_mesh_core::wire::{Body, Json};
    let redis = Redis::start("redis-signals");
    let (_relays, urls) = relays(&redis, 2);
    let mut a = join_at(&urls[0], "signals", 0, 0, None).await;
    let mut b = join_at(&urls[1], "signals", 0, 0, None).await;
    // More signals than the future bound (1000) ahead of a room step that only signals move.
    let total = 1_200u64;
    for i in 0..total {
        let stamp = a.stamp();
        let signal = Frame::stamped(
            stamp,
            Body::Signal {
                data: Json::from_value(&serde_json::json!(i)).unwrap(),
            },
        );
        a.send(&signal).await;
        if i % 100 == 99 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let mut got = 0;
    while got < total {
        let frame = b.recv().await.frame;
        if frame.stamp().is_some() {
            got += 1;
        }
    }
    // None of them was refused (as `futureStep`, were the relay's room step left behind).
    while let Ok(Ok(p)) = tokio::time::timeout(Duration::from_millis(300), a.conn.recv()).await {
        assert!(!matches!(p.frame, Frame::Reject { .. }), "{:?}", p.frame);
    }
}

/// The attack of `hostile.rs`'s `an_update_after_a_gap_in_a_clients_clocks_is_refused`, in a
/// room two relays share. A member writes under another member's Yjs client id past its next
/// clock, and deletes what it wrote there: Yjs keeps such blocks until the gap is filled, on
/// every replica, and the victim's next edit would fill it and lose a character. A relay of a
/// shared room cannot judge an update when it comes in (its document may lag the log); every
/// relay judges each update in the log's order instead, the same way: the attacker gets a
/// `malformed` refusal in place of its acknowledgement, the victim on the other relay never
/// sees the update, and no late joiner gets it, on either relay or on one started afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_after_a_gap_in_a_clients_clocks_is_refused_in_a_shared_room() {
    let redis = Redis::start("redis-gap");
    let (_relays, mut urls) = relays(&redis, 2);
    let mut victim = join_at(&urls[0], "gap", 0, 0, None).await;
    let mut attacker = join_at(&urls[1], "gap", 0, 0, None).await;
    let doc = SharedDoc::with_client_id(4_242);
    victim.acked(edit(&doc, 0, "first")).await;
    // lib0 varuints: one client (4242), one block at its clock 10, in the root type "content",
    // the string "x"; a delete set of that one clock.
    let mut gap = vec![1, 1, 0x92, 0x21, 10, 4, 1, 7];
    gap.extend_from_slice(b"content");
    gap.extend_from_slice(&[1, b'x', 1, 0x92, 0x21, 1, 10, 1]);
    send_update(&mut attacker, gap).await;
    let detail = attacker.expect_reject(Reason::Malformed).await;
    assert!(
        detail.contains("client 4242's clocks 10..11 after clocks 5..10, which no one has written"),
        "{detail}"
    );
    attacker.fence().await;
    victim.acked(edit(&doc, 5, " second")).await;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(300);
    while let Ok(p) = tokio::time::timeout_at(deadline, victim.recv()).await {
        let sender = p.frame.stamp().map(|s| s.sender);
        assert_ne!(sender, Some(attacker.node), "the victim got {:?}", p.frame);
    }
    let (_late_relay, late_url) = relay(&redis);
    urls.push(late_url);
    for url in &urls {
        let late = join_at(url, "gap", 0, 0, None).await;
        assert_eq!(replayed_text(late.replay()), "first second", "{url}");
        let senders: Vec<u64> = late
            .replay()
            .iter()
            .filter_map(|p| p.frame.stamp().map(|s| s.sender))
            .collect();
        assert!(!senders.contains(&attacker.node), "{url}: {senders:?}");
    }
}

/// A member on one relay sends large signals to a member on another: more bytes than the
/// room's bus in Redis may hold (`--max-bus-bytes`). Every signal arrives, and the bus holds
/// at most its bound: a member sending large signals cannot fill Redis, which every room of
/// every relay shares.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_signals_through_a_shared_room_leave_at_most_the_bus_bound_in_redis() {
    use pattern_mesh_core::wire::{Json, Kind};
    const BOUND: usize = 4 << 20;
    let redis = Redis::start("redis-bus-bytes");
    let bound = BOUND.to_string();
    let args = [
        "--max-message",
        "2097152",
        "--max-bus-bytes",
        bound.as_str(),
    ];
    let (_first, first) = relay_with(&redis, &args);
    let (_second, second) = relay_with(&redis, &args);
    let mut a = join_at(&first, "bus-bytes", 0, 0, None).await;
    let mut b = join_at(&second, "bus-bytes", 0, 0, None).await;
    let pad = "x".repeat(900 << 10);
    const SIGNALS: usize = 12;
    for i in 0..SIGNALS {
        let stamp = a.stamp();
        let data = Json::from_value(&serde_json::json!({ "i": i, "pad": pad })).unwrap();
        a.send(&Frame::stamped(stamp, Body::Signal { data })).await;
        // Within the member's bandwidth (4 MiB/s, bursts of a message).
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let mut seen = 0;
    while seen < SIGNALS {
        if b.recv().await.frame.kind() == Kind::Signal {
            seen += 1;
        }
    }
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    // Each entry: its id, and its fields with their values.
    type Entries = Vec<(String, Vec<(String, Vec<u8>)>)>;
    let entries: Entries = redis::cmd("XRANGE")
        .arg("pm:{bus-bytes}:bus")
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    let held: usize = entries
        .iter()
        .flat_map(|(_, fields)| fields.iter())
        .filter(|(field, _)| field == "f")
        .map(|(_, frame)| frame.len())
        .sum();
    println!(
        "RESULT bus-bytes sent={} held={held} entries={}",
        SIGNALS * pad.len(),
        entries.len()
    );
    assert!(
        held <= BOUND,
        "the bus holds {held} bytes, over its bound of {BOUND}"
    );
    assert!(
        held + (900 << 10) > BOUND,
        "the bus keeps as many of the newest signals as fit: {held} bytes"
    );
    let counted: usize = redis::cmd("GET")
        .arg("pm:{bus-bytes}:bus-bytes")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(counted, held, "the count of the bus's bytes is exact");

    // A room left idle does not keep its bus: it goes a minute after the last publication
    // (every room ever used kept its bus for good, which a member could fill room after room).
    for key in ["bus", "bus-sizes", "bus-bytes"] {
        let ttl: i64 = redis::cmd("PTTL")
            .arg(format!("pm:{{bus-bytes}}:{key}"))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(ttl > 0 && ttl <= 60_000, "{key}: {ttl} ms to live");
    }
    // Its keys expire one by one: a publication after the sizes went counts from zero.
    let _: () = redis::cmd("DEL")
        .arg("pm:{bus-bytes}:bus-sizes")
        .query_async(&mut conn)
        .await
        .unwrap();
    let stamp = a.stamp();
    let data = Json::from_value(&serde_json::json!("after")).unwrap();
    let signal = Frame::stamped(stamp, Body::Signal { data });
    a.send(&signal).await;
    b.recv_until(|f| *f == signal).await;
    let counted: usize = redis::cmd("GET")
        .arg("pm:{bus-bytes}:bus-bytes")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(counted, signal.encode().len(), "counted from zero again");

    // The bus expires whole while the room is idle; its numbering stays. A relay that opens
    // the room afterwards follows the numbering, and finds nothing missed (it took the first
    // entry after the expiry for a gap, and read the members again each time).
    drop((a, b));
    // Both relays read what was published as the members left.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _: () = redis::cmd("DEL")
        .arg("pm:{bus-bytes}:bus")
        .arg("pm:{bus-bytes}:bus-sizes")
        .arg("pm:{bus-bytes}:bus-bytes")
        .query_async(&mut conn)
        .await
        .unwrap();
    let missed = |relay: &str| {
        let relay: std::net::SocketAddr = relay
            .trim_start_matches("ws://")
            .trim_end_matches("/ws")
            .parse()
            .unwrap();
        async move {
            let metrics = common::http_get(relay, "/metrics").await;
            metrics
                .lines()
                .find_map(|l| l.strip_prefix("pattern_mesh_bus_missed_total "))
                .unwrap_or_else(|| panic!("the metric is listed: {metrics}"))
                .trim()
                .to_owned()
        }
    };
    let (_third, third) = relay_with(&redis, &args);
    let mut c = join_at(&third, "bus-bytes", 0, 0, None).await;
    let mut a = join_at(&first, "bus-bytes", 0, 0, None).await;
    let stamp = a.stamp();
    let data = Json::from_value(&serde_json::json!("after the expiry")).unwrap();
    let signal = Frame::stamped(stamp, Body::Signal { data });
    a.send(&signal).await;
    c.recv_until(|f| *f == signal).await;
    assert_eq!(missed(&third).await, "0", "nothing was missed");
}

/// A relay whose read of a room's bus falls behind the bus's trimming (it stalled while a member
/// on another relay sent more than the bus keeps) notices what it missed: the members on the
/// other relays are read again from the store, and its own members hear of the one that joined
/// meanwhile, whose join it never read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_reads_the_bus_too_late_reads_the_other_relays_members_again() {
    bus_gap("bus-gap", false).await;
}

/// As above, but the members cannot be read when the relay notices the gap (here their key
/// holds something else for a while): it tries again until they can, though nothing more
/// happens in the room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_cannot_read_the_members_again_at_once_tries_until_it_can() {
    bus_gap("bus-gap-retry", true).await;
}

async fn bus_gap(room: &str, unreadable: bool) {
    use pattern_mesh_core::wire::Json;
    let redis = Redis::start("redis-bus-gap");
    let args = ["--max-message", "2097152", "--max-bus-bytes", "2097152"];
    let (_first, first) = relay_with(&redis, &args);
    let (second_process, second) = relay_with(&redis, &args);
    let mut watcher = join_at(&second, room, 0, 0, None).await;
    let mut sender = join_at(&first, room, 0, 0, None).await;
    let (joined, _) = watcher
        .recv_until(|f| matches!(f, Frame::PeerJoined { .. }))
        .await;
    assert!(matches!(joined, Frame::PeerJoined { peer } if peer.node == sender.node));
    let signal = |member: &mut Member, size: usize| {
        let stamp = member.stamp();
        let data = Json::from_value(&serde_json::json!("x".repeat(size))).unwrap();
        Frame::stamped(stamp, Body::Signal { data })
    };
    // The second relay stalls (stopped, for less than its heartbeat lasts). A small signal
    // ends its blocked read of the bus, whose answer waits in its socket.
    let pid = second_process.0.id().to_string();
    let stopped = Command::new("kill").args(["-STOP", &pid]).status().unwrap();
    assert!(stopped.success());
    let small = signal(&mut sender, 10);
    sender.send(&small).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A member joins through the first relay; then more signals than the bus keeps push its
    // join out of the bus before the second relay reads it.
    let late = join_at(&first, room, 0, 0, None).await;
    for _ in 0..3 {
        let large = signal(&mut sender, 900 << 10);
        sender.send(&large).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let members = format!("pm:{{{room}}}:members");
    if unreadable {
        let away = format!("RENAME {members} {members}-away");
        assert_eq!(command(redis.port, &away), "+OK");
        assert_eq!(command(redis.port, &format!("SET {members} x")), "+OK");
    }
    let resumed = Command::new("kill").args(["-CONT", &pid]).status().unwrap();
    assert!(resumed.success());
    if unreadable {
        // The relay reads the bus, finds the gap, and fails to read the members; then they
        // can be read again, and the room stays quiet.
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        assert_eq!(command(redis.port, &format!("DEL {members}")), ":1");
        let back = format!("RENAME {members}-away {members}");
        assert_eq!(command(redis.port, &back), "+OK");
    }
    let (joined, _) = watcher
        .recv_until(|f| matches!(f, Frame::PeerJoined { peer } if peer.node == late.node))
        .await;
    assert!(matches!(joined, Frame::PeerJoined { peer } if peer.node == late.node));
}

/// The secret of the relays these tests start with access tokens.
const SECRET: &str = "the relay's test secret, 32 bytes";

/// An access token for room "doc", signed with [`SECRET`], valid for ten minutes.
fn doc_token(sub: &str, access: &str) -> String {
    use jsonwebtoken::{encode, EncodingKey, Header};
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let claims = serde_json::json!({ "sub": sub, "room": "doc", "access": access, "exp": exp });
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// Only a member that may write opens a room (its first opening chooses the room's settings for
/// good): in a room several relays share too. A reader on one relay waits until a writer on
/// another opened the room, then gets the writer's settings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_member_opens_no_room_on_any_relay() {
    use pattern_mesh_core::wire::close;

    let token = |access: &str| doc_token(access, access);
    let redis = Redis::start("redis-read-only-open");
    let (_a, a) = relay_with(&redis, &["--auth-key", SECRET]);
    let (_b, b) = relay_with(&redis, &["--auth-key", SECRET]);
    let reader_url = format!("{b}?token={}", token("read"));
    let (code, reason) = common::reader_refused(&reader_url).await;
    assert_eq!(code, close::TRY_AGAIN_LATER, "{reason}");
    let writer_url = format!("{a}?token={}", token("write"));
    common::writer_opens_and_reader_gets_its_settings(&writer_url, &reader_url).await;
}

/// Another user who learned a member's resume token (a shared profile, a script on the page)
/// joined with it on another relay of the same Redis: that relay found the token's record in
/// Redis, which named no user, and handed the thief the member's node while the member was
/// still in the room on its own relay. The record names the node's user now: the thief is a
/// new node, on every relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_users_resume_token_takes_no_node_through_another_relay() {
    let token = |sub: &str| doc_token(sub, "write");
    let redis = Redis::start("redis-resume-user");
    let (_a, a) = relay_with(&redis, &["--auth-key", SECRET]);
    let (_b, b) = relay_with(&redis, &["--auth-key", SECRET]);
    let mut member = join_at(&format!("{a}?token={}", token("ada")), "doc", 0, 0, None).await;
    member.data_acked(serde_json::json!("stored")).await;
    let thief = join_at(
        &format!("{b}?token={}", token("mallory")),
        "doc",
        0,
        0,
        Some(member.token),
    )
    .await;
    assert_ne!(thief.node, member.node, "a new node, not the member's");
    assert_ne!(thief.token, member.token);
    member
        .data_acked(serde_json::json!("still the only one"))
        .await;
}

/// Redis lost the last entries of a room's log and its position went back with them (a
/// failover to a replica that lagged, a restart from an AOF written every second, a restore).
/// The relays that had read those entries took the next appends, numbered at or below what they
/// had passed on already, for ones they had passed on: each was acknowledged to its sender and
/// reached no one, on any relay. A relay's append now checks that the room's log is the one it
/// opened and has not gone back below what the relay read of it; if not, the room stops, its
/// members join again, and what they send arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_that_went_back_in_redis_loses_no_acknowledged_message() {
    let redis = Redis::start("redis-rollback");
    let (_relays, urls) = relays(&redis, 2);
    let writer = Client::connect(&urls[0], session("rollback", "writer"))
        .await
        .unwrap();
    let mut reader = Client::connect(&urls[1], session("rollback", "reader"))
        .await
        .unwrap();
    let is = |value: i64| {
        let text = value.to_string();
        move |e: &Event| matches!(e, Event::Message { data, .. } if data.as_str() == text)
    };
    let send = |value: i64| {
        writer
            .broadcast(pattern_mesh_core::wire::Json::from_value(&value).unwrap())
            .unwrap()
    };
    for i in 0..3 {
        send(i);
    }
    writer.settled(WAIT).await.unwrap();
    // The reader has written too: the store keeps its node, which comes back as itself.
    reader
        .broadcast(pattern_mesh_core::wire::Json::from_value(&100).unwrap())
        .unwrap();
    reader.settled(WAIT).await.unwrap();
    reader
        .events_until(WAIT, is(2))
        .await
        .expect("the reader has the first three");
    // The room's keys as they are now, to put back later: Redis going back to this moment.
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let keys = ["room", "log", "data", "tokens", "nodes"].map(|k| format!("pm:{{rollback}}:{k}"));
    // (None: the key was not there.)
    let dumps: Vec<Option<Vec<u8>>> = keys
        .iter()
        .map(|key| redis::cmd("DUMP").arg(key).query(&mut conn).unwrap())
        .collect();
    for i in 3..6 {
        send(i);
    }
    writer.settled(WAIT).await.unwrap();
    reader
        .events_until(WAIT, is(5))
        .await
        .expect("the reader has the next three");
    for (key, dump) in keys.iter().zip(&dumps) {
        let _: () = match dump {
            Some(dump) => redis::cmd("RESTORE")
                .arg(key)
                .arg(0)
                .arg(dump.as_slice())
                .arg("REPLACE")
                .query(&mut conn)
                .unwrap(),
            None => redis::cmd("DEL").arg(key).query(&mut conn).unwrap(),
        };
    }
    // Each relay notices within a heartbeat (two seconds) and stops the room; its members join
    // again. (What a member sends before its relay noticed may still reach the others at steps
    // they saw before the log went back: they drop it as a replay, and say so.)
    tokio::time::sleep(Duration::from_secs(3)).await;
    send(42);
    reader
        .events_until(WAIT, is(42))
        .await
        .expect("what the writer sent after the log went back reaches the reader");
    writer.settled(WAIT).await.unwrap();
}

/// A member in many rooms filled each room's bus (up to `--max-bus-bytes`) and then kept it full
/// with one small presence a minute: each publication kept the whole bus another minute, so one
/// address could hold a bus per connection, and fill the Redis every room shares. A publication
/// now also drops every entry older than a bus keeps one (a minute). Here the bus already holds
/// a megabyte published long ago, as a kept-alive one would: the next publication drops it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bus_kept_alive_by_small_publications_does_not_keep_what_it_held() {
    let redis = Redis::start("redis-bus-kept");
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let old = vec![b'x'; 1 << 20];
    let id: String = redis::cmd("XADD")
        .arg("pm:{kept}:bus")
        .arg("1-1")
        .arg("f")
        .arg(old.as_slice())
        .query(&mut conn)
        .unwrap();
    let _: () = redis::cmd("RPUSH")
        .arg("pm:{kept}:bus-sizes")
        .arg(format!("{id} {}", old.len()))
        .query(&mut conn)
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg("pm:{kept}:bus-bytes")
        .arg(old.len())
        .query(&mut conn)
        .unwrap();
    let (_relays, urls) = relays(&redis, 2);
    // Each join is published to the other relays.
    let _a = join_at(&urls[0], "kept", 0, 0, None).await;
    let _b = join_at(&urls[1], "kept", 0, 0, None).await;
    let held: u64 = redis::cmd("GET")
        .arg("pm:{kept}:bus-bytes")
        .query(&mut conn)
        .unwrap();
    let kept: Vec<redis::Value> = redis::cmd("XRANGE")
        .arg("pm:{kept}:bus")
        .arg("1-1")
        .arg("1-1")
        .query(&mut conn)
        .unwrap();
    assert!(kept.is_empty(), "the old publication went");
    assert!(held < 10_000, "the bus holds {held} bytes");
}

/// A relay reads at most 256 publications of a room's bus at a time; a log entry after the last
/// publication it read waits until it knows none is left unread (the two are merged back into
/// one order). When a read returned exactly 256, nothing told the relay the bus held no more:
/// the entry waited for the room's next activity, which in a quiet room never came, and the
/// members of that relay never saw an acknowledged edit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_entry_behind_exactly_one_full_page_of_publications_is_not_held_back() {
    let room = "full-page";
    let redis = Redis::start("redis-full-page");
    let args = ["--ip-rate", "100000"];
    let (_first, first) = relay_with(&redis, &args);
    let (second_process, second) = relay_with(&redis, &args);
    let mut watcher = join_at(&second, room, 0, 0, None).await;
    let mut sender = join_at(&first, room, 0, 0, None).await;
    watcher
        .recv_until(|f| matches!(f, Frame::PeerJoined { peer } if peer.node == sender.node))
        .await;
    let bus = format!("XLEN pm:{{{room}}}:bus");
    let length = |answer: String| answer.trim_start_matches(':').parse::<u64>().unwrap();
    // The second relay stalls (for less than its heartbeat lasts); a first signal ends its
    // blocked read, whose answer waits in its socket.
    let pid = second_process.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap()
        .success());
    let first_signal = signal(&mut sender, serde_json::json!(0));
    sender.send(&first_signal).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Exactly one page of publications, then an edit logged after them: the second relay's
    // next read brings all of it at once.
    let before = length(command(redis.port, &bus));
    for i in 1..=256 {
        let frame = signal(&mut sender, serde_json::json!(i));
        sender.send(&frame).await;
    }
    let deadline = Instant::now() + WAIT;
    while length(command(redis.port, &bus)) < before + 256 {
        assert!(Instant::now() < deadline, "the signals reach the bus");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (step, _) = sender
        .data_acked(serde_json::json!("after a full page"))
        .await;
    assert!(Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap()
        .success());
    let (got, _) = watcher
        .recv_until(|f| {
            common::is_data(f)
                && f.stamp()
                    .is_some_and(|s| s.sender == sender.node && s.step == step)
        })
        .await;
    assert_eq!(
        common::data_value(&got),
        Some(serde_json::json!("after a full page"))
    );
}

/// A room stops on its relay when an append fails (here Redis no longer holds the log this relay
/// opened). The relay then dropped every later publication of the room, the leave notices its
/// members' departures make among them: a member that did not come back stayed listed on every
/// other relay, for every member and every late joiner, for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_leaves_a_room_stopped_by_a_failed_append_leaves_on_every_relay() {
    let room = "ghost";
    let redis = Redis::start("redis-ghost");
    let (_relays, urls) = relays(&redis, 2);
    let mut gone = join_at(&urls[0], room, 0, 0, None).await;
    let mut writer = join_at(&urls[0], room, 0, 0, None).await;
    let mut watcher = join_at(&urls[1], room, 0, 0, None).await;
    for node in [gone.node, writer.node] {
        if !watcher.welcome.peers.iter().any(|p| p.node == node) {
            watcher
                .recv_until(|f| matches!(f, Frame::PeerJoined { peer } if peer.node == node))
                .await;
        }
    }
    // The record names another log: the writer's next append fails, and the room stops.
    let record = format!("HSET pm:{{{room}}}:room log 1");
    assert_eq!(command(redis.port, &record), ":0");
    writer.data(serde_json::json!("refused")).await;
    let (code, reason) = gone.closed().await;
    println!("the room stopped: {code} {reason}");
    drop(gone.conn);
    writer.closed().await;
    // The writer comes back; the member whose room stopped does not. Every relay hears it left.
    let _writer = join_at(&urls[0], room, 0, 0, Some(writer.token)).await;
    until_unlisted(
        &urls[1],
        room,
        gone.node,
        "left a room stopped on its relay",
    )
    .await;
}

/// Joins `room` at `url` as a late joiner every half second until its welcome no longer lists
/// `node`, for up to [`WAIT`]; `why` says in the failure what the node did.
async fn until_unlisted(url: &str, room: &str, node: u64, why: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let late = join_at(url, room, 0, 0, None).await;
        if !late.welcome.peers.iter().any(|p| p.node == node) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node {node} {why}, and is still listed on the other relay: {:?}",
            late.welcome.peers
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A member leaves while Redis is down: its relay's publication of the departure failed, and
/// was not sent again once Redis was back. The member stayed listed on every other relay, for
/// its members and every late joiner, for as long as its own relay lived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_leaves_while_redis_is_down_leaves_on_every_relay_once_it_is_back() {
    let room = "left-offline";
    let mut redis = Redis::start("redis-left-offline");
    let (_relays, urls) = relays(&redis, 2);
    let gone = join_at(&urls[0], room, 0, 0, None).await;
    let mut watcher = join_at(&urls[1], room, 0, 0, None).await;
    if !watcher.welcome.peers.iter().any(|p| p.node == gone.node) {
        watcher
            .recv_until(|f| matches!(f, Frame::PeerJoined { peer } if peer.node == gone.node))
            .await;
    }
    // Down for less than a relay's heartbeat lasts (6 s), so that no relay is taken for dead
    // (which would strike its members anyway).
    redis.process.kill();
    drop(gone.conn);
    tokio::time::sleep(Duration::from_secs(2)).await;
    redis.restart();
    // The other relay's room stopped too (it lost Redis as well): its members come back, and
    // read who is in the room from Redis.
    drop(watcher.conn);
    until_unlisted(&urls[1], room, gone.node, "left while Redis was down").await;
}

/// A relay that opens a room learns from Redis which other relays have members in it, and
/// hears when one of them dies, though that member publishes nothing more: its member leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_found_at_a_rooms_opening_leaves_when_its_relay_dies() {
    let redis = Redis::start("redis-found-at-open");
    let (mut relays, urls) = relays(&redis, 2);
    let a = join_at(&urls[0], "quiet", 0, 0, None).await;
    // Its join is in Redis before the other relay opens the room (which then reads it from the
    // room's members, not from a publication).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut b = join_at(&urls[1], "quiet", 0, 0, None).await;
    assert!(
        b.welcome.peers.iter().any(|p| p.node == a.node),
        "the member on the other relay, read from Redis: {:?}",
        b.welcome.peers
    );
    relays[0].kill();
    let (left, _) = b.recv_until(|f| matches!(f, Frame::PeerLeft { .. })).await;
    assert!(matches!(left, Frame::PeerLeft { node } if node == a.node));
}

/// A departure whose publication fails for good (its room's keys hold the wrong type) is sent
/// again every second, for a minute. Redis fails a whole pipeline for one command's error, so,
/// sent beside other rooms' writes, it failed them too: every room of the relay stopped, again
/// and again. Each command is judged on its own answer now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_departure_that_cannot_be_published_stops_no_other_room() {
    let redis = Redis::start("redis-departure-for-good");
    let (_relays, urls) = relays(&redis, 2);
    let broken = join_at(&urls[0], "broken", 0, 0, None).await;
    let mut writer = join_at(&urls[0], "other", 0, 0, None).await;
    let mut reader = join_at(&urls[1], "other", 0, 0, None).await;
    assert_eq!(
        command(redis.port, "DEL pm:{broken}:members"),
        ":1",
        "the member's entry"
    );
    assert_eq!(command(redis.port, "SET pm:{broken}:members x"), "+OK");
    drop(broken.conn);
    // The departure has failed once, and is sent again every second.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    for i in 0..8 {
        let step = writer.data(serde_json::json!(i)).await;
        writer.expect_ack(step).await;
        let (got, _) = reader.recv_until(|f| f.stamp().is_some()).await;
        assert_eq!(got.stamp().map(|s| s.step), Some(step));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Rooms whose keys Redis holds as another type (a stray write, another application's) fail
/// every append: Redis answers that room's command with an error. The relay sends every room's
/// appends in one pipeline, and Redis fails a whole pipeline for one command's error, so the
/// other rooms' appends beside it failed too: their rooms stopped and their members were let go.
/// Each command is judged on its own answer now: a room with broken keys fails alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_whose_keys_redis_holds_as_another_type_fails_alone() {
    let redis = Redis::start("redis-wrong-type");
    let (_relay, url) = relay(&redis);
    let mut writer = join_at(&url, "other", 0, 0, None).await;
    let mut broken = Vec::new();
    for i in 0..8 {
        let room = format!("broken{i}");
        broken.push(join_at(&url, &room, 0, 0, None).await);
        assert_eq!(
            command(redis.port, &format!("SET pm:{{{room}}}:tokens x")),
            "+OK"
        );
    }
    // Each broken room's first append, among the other room's: after its first failure a room
    // sends nothing until it is opened again.
    let mut steps = Vec::new();
    for round in 0..4 {
        for (i, member) in broken.iter_mut().enumerate() {
            if round == 0 {
                member.data(serde_json::json!(i)).await;
            }
            steps.push(writer.data(serde_json::json!([round, i])).await);
        }
    }
    for step in steps {
        writer.expect_ack(step).await;
    }
    for mut member in broken {
        let detail = member.expect_reject(Reason::Unavailable).await;
        assert!(detail.contains("WRONGTYPE"), "{detail}");
    }
}

/// Redis forgets its scripts when it restarts (or on `SCRIPT FLUSH`): the appends and
/// publications that Redis answers `NOSCRIPT` did not run, and run again once the relay has
/// loaded the scripts, alone (the others of their pipeline ran already).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_after_redis_forgot_its_scripts_go_through() {
    let redis = Redis::start("redis-no-script");
    let (_relays, urls) = relays(&redis, 2);
    let mut writer = join_at(&urls[0], "doc", 0, 0, None).await;
    let mut reader = join_at(&urls[1], "doc", 0, 0, None).await;
    writer.data_acked(serde_json::json!("before")).await;
    for round in 0..3 {
        assert_eq!(command(redis.port, "SCRIPT FLUSH"), "+OK");
        let step = writer.data(serde_json::json!(round)).await;
        writer.expect_ack(step).await;
        let (got, _) = reader
            .recv_until(|f| f.stamp().is_some_and(|s| s.step == step))
            .await;
        assert_eq!(common::data_value(&got), Some(serde_json::json!(round)));
    }
}

/// A room whose log was written before rooms kept an index of their document entries has its
/// first compaction read the log, as before, and is indexed from then on: its document entries
/// all go, its data entries all stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_logged_before_the_index_of_its_document_entries_compacts_and_is_indexed() {
    let redis = Redis::start("redis-compact-legacy");
    let (_a, url) = relay_with(&redis, &["--compact-updates", "40"]);
    let writer = Client::connect(&url, session("legacy", "w")).await.unwrap();
    let mut data = join_at(&url, "legacy", 0, 0, None).await;
    let write = |from: usize, to: usize| {
        for i in from..to {
            let at = writer.text("content").chars().count() as u32;
            writer
                .insert("content", at, &format!("{}", i % 10))
                .unwrap();
        }
    };
    // As a relay without the index left the room: no `indexed`, and no index.
    write(0, 10);
    writer.settled(WAIT).await.unwrap();
    assert_eq!(command(redis.port, "HDEL pm:{legacy}:room indexed"), ":1");
    assert_eq!(command(redis.port, "DEL pm:{legacy}:docs"), ":1");
    for round in 0..6 {
        write(round * 20 + 10, round * 20 + 30);
        data.data_acked(serde_json::json!(round)).await;
        writer.settled(WAIT).await.unwrap();
    }
    assert_eq!(
        command(redis.port, "HGET pm:{legacy}:room indexed"),
        "$1\r\n1"
    );
    let text = writer.text("content");
    assert_eq!(text.len(), 130);
    // A compaction may still be on its way to the store (on a loaded machine): a late joiner
    // then reads the snapshot before it. Each late joiner gets the whole text and every value.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let late = join_at(&url, "legacy", 0, 0, None).await;
        assert_eq!(common::replayed_text(late.replay()), text);
        let values = late
            .replay()
            .iter()
            .filter(|p| common::is_data(&p.frame))
            .count();
        assert_eq!(values, 6);
        let updates = late
            .replay()
            .iter()
            .filter(
                |p| matches!(&p.frame, Frame::Stamped(s) if matches!(s.body, Body::Update { .. })),
            )
            .count();
        if updates < 40 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "compacted: {updates} updates after the last snapshot"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    writer.close().await;
}

/// A relay that opens a room reads its other relays' members from Redis, and had no presence
/// of theirs: a member joining there saw the others listed, without their cursors, until each
/// sent its presence again. Redis keeps each member's latest presence beside the list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_opens_a_room_late_gives_its_joiners_the_presences_of_the_others() {
    use pattern_mesh_core::wire::Json;
    let redis = Redis::start("redis-presence-late");
    let (_relays, urls) = relays(&redis, 2);
    let mut a = join_at(&urls[0], "cursors", 0, 0, None).await;
    let mut c = join_at(&urls[0], "cursors", 0, 0, None).await;
    let presence = |node, cursor| Frame::Presence {
        sender: node,
        data: Json::from_value(&serde_json::json!({ "cursor": cursor })).unwrap(),
    };
    a.send(&presence(a.node, 1)).await;
    a.send(&presence(a.node, 2)).await;
    c.send(&presence(c.node, 7)).await;
    // C takes its presence back (null): it has none.
    c.send(&Frame::Presence {
        sender: c.node,
        data: Json::null(),
    })
    .await;
    // Published in order with what follows: once these are stored, the presences are out.
    a.data_acked(serde_json::json!("after")).await;
    c.data_acked(serde_json::json!("after")).await;
    // A presence of a node the list does not hold (a relay of an earlier version left it).
    assert_eq!(
        command(redis.port, "HSET pm:{cursors}:presence 999 x"),
        ":1"
    );
    let b = join_at(&urls[1], "cursors", 0, 0, None).await;
    assert_eq!(
        command(redis.port, "HEXISTS pm:{cursors}:presence 999"),
        ":0",
        "pruned as the room opened"
    );
    assert!(b.welcome.peers.iter().any(|p| p.node == a.node));
    let presences: Vec<&Frame> = b
        .replay()
        .iter()
        .map(|p| &p.frame)
        .filter(|f| matches!(f, Frame::Presence { .. }))
        .collect();
    assert_eq!(
        presences,
        [&presence(a.node, 2)],
        "a's latest, and none of c's"
    );
    // Once a leaves, a relay that opens the room later has no presence of it.
    let gone = a.node;
    drop(a.conn);
    drop(b.conn);
    // a's leave, not b's: b may leave first, before a's presence is deleted with a's leave.
    c.recv_until(|f| matches!(f, Frame::PeerLeft { node } if *node == gone))
        .await;
    // The leave is fanned out to the relay's own members as its deletion goes to Redis: the
    // two race, so the deletion is awaited, for a few seconds at most.
    let deadline = Instant::now() + Duration::from_secs(5);
    while command(redis.port, "HLEN pm:{cursors}:presence") != ":0" {
        assert!(Instant::now() < deadline, "a's presence left with it");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A node's stored messages stay a prefix of what it sent. The relay sends a room's appends in
/// one pipeline; when one of a node's appends was not stored (Redis answered it with an error,
/// or refused it) and its next one in the same pipeline was, the first was lost: sent again by
/// its client, it is a replay of a step below a stored one, which the client takes for
/// stored. The next one is not stored either now (`gap`), and the room opens again.
#[tokio::test]
async fn an_append_after_one_of_its_node_that_was_not_stored_is_not_stored_either() {
    use pattern_mesh_core::room::Append;
    use pattern_mesh_core::store::{Appended, Store};
    use pattern_mesh_core::wire::{Json, RoomConfig, Stamp};
    let redis = Redis::start("redis-gap");
    let (store, _feed) =
        pattern_mesh_relay::store::redis::RedisStore::open(&redis.url(), 256 << 20)
            .await
            .expect("connected");
    let record = store.open_room("gap", RoomConfig::default()).await.unwrap();
    let future = record.config.max_future;
    let (a, c) = (record.next_node, record.next_node + 1);
    let append = |sender: u64, step: u64| {
        let frame = Frame::stamped(
            Stamp {
                sender,
                step,
                pattern: pattern_mesh_core::pattern::PatternConfig::default().value(step),
            },
            Body::Data {
                data: Json::from_value(&serde_json::json!(step)).unwrap(),
            },
        );
        Append {
            sender,
            token: Some([sender as u8; 16]),
            user: 0,
            step,
            high: 0,
            doc: None,
            snapshot: false,
            covers: 0,
            bytes: bytes::Bytes::from(frame.encode()),
        }
    };
    // One pipeline (this runtime runs the relay's writer only once this task waits): a's first
    // is past the room's step by more than the room allows, c's two move the room's step, and
    // a's second is then within it.
    let answers = [
        store.append("gap", append(a, future + 1)),
        store.append("gap", append(c, 1)),
        store.append("gap", append(c, 2)),
        store.append("gap", append(a, future + 2)),
    ];
    let mut answers = futures_util::future::join_all(answers).await.into_iter();
    assert!(matches!(
        answers.next(),
        Some(Ok(Appended::Refused {
            reason: Reason::FutureStep,
            ..
        }))
    ));
    assert!(matches!(answers.next(), Some(Ok(Appended::Stored { .. }))));
    assert!(matches!(answers.next(), Some(Ok(Appended::Stored { .. }))));
    let last = answers.next().unwrap();
    assert!(
        matches!(&last, Err(e) if e.to_string().contains("was not stored")),
        "{last:?}"
    );
}

/// Redis frees a stream's node only once every entry in it is deleted: with data entries in
/// the document's stream, a member that sent a small data message after each large update
/// kept every compacted update in memory (each pinned by the data entry beside it), while
/// the room's byte count said they were freed. Redis's memory for the room's log stays near
/// what the room counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_messages_between_updates_keep_no_compacted_update_in_redis_memory() {
    let redis = Redis::start("redis-pinned");
    let (_relay, url) = relay_with(&redis, &["--compact-updates", "40"]);
    let writer = Client::connect(&url, session("pinned", "w")).await.unwrap();
    let chunk = "x".repeat(3000);
    for round in 0..200 {
        writer.insert("content", 0, &chunk).unwrap();
        writer.delete("content", 0, 3000).unwrap();
        writer
            .broadcast(Json::parse(round.to_string()).unwrap())
            .unwrap();
        if round % 10 == 9 {
            writer.settled(WAIT).await.unwrap();
        }
    }
    writer.settled(WAIT).await.unwrap();
    let counted: u64 = command(redis.port, "HGET pm:{pinned}:room bytes")
        .lines()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("the room counts its bytes");
    let usage = |key: &str| -> u64 {
        let answer = command(redis.port, &format!("MEMORY USAGE {key} SAMPLES 0"));
        answer.trim_start_matches(':').trim().parse().unwrap_or(0)
    };
    let memory = usage("pm:{pinned}:log") + usage("pm:{pinned}:data");
    println!("RESULT pinned counted_bytes={counted} stream_memory={memory}");
    assert!(
        memory <= 2 * counted + 64 * 1024,
        "the room's streams hold {memory} bytes of Redis memory for {counted} bytes counted"
    );
    // Every data message is still there for a late joiner, after the snapshot.
    let late = join_at(&url, "pinned", 0, 0, None).await;
    let values = late
        .replay()
        .iter()
        .filter(|p| common::is_data(&p.frame))
        .count();
    assert_eq!(values, 200);
    assert_eq!(common::replayed_text(late.replay()), "");
    writer.close().await;
}

/// A room's data and document entries are in two streams with one numbering of positions: a
/// member on another relay that reads them live, more than a page of each at once, and a late
/// joiner on a relay that opens the room from Redis, a page at a time, both get every position
/// once and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_and_document_entries_read_a_page_at_a_time_come_in_one_order() {
    let redis = Redis::start("redis-merge");
    let args = ["--compact-updates", "100000"];
    let (_a, first) = relay_with(&redis, &args);
    let (mut b, second) = relay_with(&redis, &args);
    let mut writer = join_at(&first, "merge", 0, 0, None).await;
    let mut reader = join_at(&second, "merge", 0, 0, None).await;
    // The reader's relay is stopped while the writer's messages are logged: its next read
    // finds more than a page of each stream.
    let signal = |which: &str, process: &Process| {
        let pid = process.0.id().to_string();
        let status = Command::new("kill").args([which, &pid]).status().unwrap();
        assert!(status.success());
    };
    signal("-STOP", &b);
    let doc = SharedDoc::with_client_id(7);
    let total = 900;
    for i in 0..total {
        let body = if i % 3 == 0 {
            Body::Data {
                data: Json::parse(i.to_string()).unwrap(),
            }
        } else {
            edit(&doc, doc.text("content").chars().count() as u32, "x")
        };
        let stamp = writer.stamp();
        writer.send(&Frame::stamped(stamp, body)).await;
    }
    let log = read_log(&mut writer, total).await;
    signal("-CONT", &b);
    let positions: Vec<u64> = (1..=total as u64).collect();
    assert_eq!(log.keys().copied().collect::<Vec<_>>(), positions);
    let seen = read_log(&mut reader, total).await;
    assert_eq!(
        seen, log,
        "the member on the other relay saw the log's order"
    );
    // A relay that opens the room now reads it from Redis.
    let (_c, third) = relay_with(&redis, &args);
    let late = join_at(&third, "merge", 0, 0, None).await;
    let order: Vec<u64> = late.replay().iter().filter_map(|p| p.position).collect();
    assert_eq!(
        order, positions,
        "the late joiner read the log in its order"
    );
    let replayed: BTreeMap<u64, (u64, u64)> = late
        .replay()
        .iter()
        .map(|p| {
            let stamp = p.frame.stamp().unwrap();
            (p.position.unwrap(), (stamp.sender, stamp.step))
        })
        .collect();
    assert_eq!(replayed, log, "the late joiner read the log's order");
    assert_eq!(replayed_text(late.replay()), "x".repeat(600));
    b.kill();
}

/// A delete set that names the same clocks over and over costs every replica that applies it
/// a walk over those blocks per range (20,000 ranges over 2,000 blocks: 4·10^7 visits; a
/// message of megabytes took minutes). A shared room stores an update before any relay
/// applies it, so every relay and every member would pay it, at every load. The relay refuses
/// it as `malformed` before the store sees it: Yjs and yrs write each client's ranges sorted,
/// apart, and each client once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_whose_deleted_ranges_repeat_is_refused_before_it_is_stored() {
    let redis = Redis::start("redis-ranges");
    let (_relays, urls) = relays(&redis, 2);
    let mut writer = join_at(&urls[0], "ranges", 0, 0, None).await;
    let doc = SharedDoc::with_client_id(4_242);
    let blocks = vec![(0, 0, "a"); 2_000];
    let update = doc.splice_all("content", &blocks).unwrap();
    writer
        .acked(Body::Update {
            doc: "content".into(),
            update,
        })
        .await;
    // No blocks; a delete set of client 4242: 20,000 times its clocks 0..2000.
    let mut repeated = vec![0, 1, 0x92, 0x21, 0xa0, 0x9c, 0x01];
    for _ in 0..20_000 {
        repeated.extend_from_slice(&[0, 0xd0, 0x0f]);
    }
    send_update(&mut writer, repeated).await;
    let detail = writer.expect_reject(Reason::Malformed).await;
    assert!(detail.contains("deleted range"), "{detail}");
    // A joiner on the other relay gets the document, and no update after it.
    let late = join_at(&urls[1], "ranges", 0, 0, None).await;
    assert_eq!(late.replay().len(), 1);
    assert_eq!(replayed_text(late.replay()), "a".repeat(2_000));
}

/// A shared room stores an update before any relay applies it: one whose deletions cut a text
/// into 200,000 pieces (each cut a block inserted into the middle of the writer's block list,
/// 0.9 s of yrs for every relay and member, at every load) is refused as `tooLarge` by the
/// relay it came through, judged against its copy of the document, and never stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_that_cuts_a_text_into_pieces_is_not_stored_in_a_shared_room() {
    let redis = Redis::start("redis-cuts");
    let (_relays, urls) = relays(&redis, 2);
    let mut writer = join_at(&urls[0], "cuts", 0, 0, None).await;
    let doc = SharedDoc::with_client_id(7);
    let update = doc.insert("content", 0, &"ab".repeat(100_000)).unwrap();
    writer
        .acked(Body::Update {
            doc: "content".into(),
            update,
        })
        .await;
    // Client 7's clocks 1, 3, 5, ... deleted: 100,000 ranges.
    let mut cuts = vec![0, 1, 7, 0xa0, 0x8d, 0x06];
    for i in 0..100_000u64 {
        let mut clock = 2 * i + 1;
        while clock >= 0x80 {
            cuts.push((clock & 0x7f) as u8 | 0x80);
            clock >>= 7;
        }
        cuts.extend_from_slice(&[clock as u8, 1]);
    }
    send_update(&mut writer, cuts).await;
    let detail = writer.expect_reject(Reason::TooLarge).await;
    assert!(detail.contains("send it in smaller edits"), "{detail}");
    let late = join_at(&urls[1], "cuts", 0, 0, None).await;
    assert_eq!(late.replay().len(), 1);
}

/// In a shared room, an update sent again at a step already taken is judged by whether the
/// room's document holds it; that read decoded the bytes with yrs before anything had walked
/// them, and a value nested 100,000 levels deep (200 KB) overflowed the relay's stack, which
/// aborts the process: every room of the relay, on one member's word. It is walked first, and
/// refused as `malformed`, naming the nesting; the relay serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_sent_again_with_values_nested_deep_crashes_no_relay() {
    let redis = Redis::start("redis-nested");
    let (_relays, urls) = relays(&redis, 2);
    let mut member = join_at(&urls[0], "nested", 0, 0, None).await;
    let stamp = member.stamp();
    let first = Frame::stamped(
        stamp,
        Body::Data {
            data: Json::parse("1").unwrap(),
        },
    );
    member.send(&first).await;
    member.expect_ack(stamp.step).await;
    // One item of client 11 in the root text, whose content (kind 8, one value) nests.
    let mut update = vec![1, 1, 11, 0, 8, 1, 7];
    update.extend_from_slice(b"content");
    update.push(1);
    for _ in 0..100_000 {
        update.extend_from_slice(&[117, 1]);
    }
    update.extend_from_slice(&[126, 0]);
    let again = Frame::stamped(
        stamp,
        Body::Update {
            doc: "content".into(),
            update,
        },
    );
    member.send(&again).await;
    let detail = member.expect_reject(Reason::Malformed).await;
    assert!(
        detail.contains("nested more than 128 levels deep"),
        "{detail}"
    );
    // The relay still serves.
    let late = join_at(&urls[0], "nested", 0, 0, None).await;
    assert_eq!(late.replay().len(), 1);
}
