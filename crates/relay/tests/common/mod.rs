//! What the relay's tests share: a real relay on `127.0.0.1:0`, and a member that stamps its
//! own frames over a raw connection.
#![allow(dead_code)]

pub mod ed25519;

use std::path::{Path, PathBuf};
use std::time::Duration;

use pattern_mesh_client::{ClientError, Connection, JoinOptions, Welcome};
use pattern_mesh_core::pattern::PatternConfig;
use pattern_mesh_core::wire::{
    Body, Frame, Json, Positioned, Reason, ResumeToken, RoomConfig, Stamp,
};
use pattern_mesh_relay::{serve, RelayConfig, StoreConfig};
use tokio::sync::oneshot;

/// How long a test waits for something that should come.
pub const WAIT: Duration = Duration::from_secs(20);

/// Starts the relay binary on a free loopback port with a high rate limit and `args`;
/// answers the process and its address (`host:port`). The rest of its output is read and
/// dropped, so that its log never meets a closed pipe.
pub fn spawn_relay(args: &[&str]) -> (std::process::Child, String) {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_pattern-mesh-relay"))
        .args(["--listen", "127.0.0.1:0", "--max-rate", "100000"])
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("the relay starts");
    let mut stdout = std::io::BufReader::new(child.stdout.take().expect("piped"));
    let mut line = String::new();
    stdout
        .read_line(&mut line)
        .expect("the relay prints a line");
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    let addr = line
        .split("ws://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_else(|| panic!("the relay prints its address: {line:?}"))
        .to_owned();
    (child, addr)
}

/// A fresh directory under the system's temporary directory, removed with all it holds when
/// dropped.
pub struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fresh directory under the system's temporary directory, named after `name`.
pub fn temp_dir(name: &str) -> TempDir {
    let dir = std::env::temp_dir().join(format!(
        "pattern-mesh-test-{name}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    TempDir(dir)
}

/// A relay running in this process.
pub struct Server {
    pub addr: std::net::SocketAddr,
    pub stop: Option<oneshot::Sender<()>>,
    pub done: tokio::task::JoinHandle<anyhow::Result<()>>,
    pub dir: PathBuf,
    /// The directory this server made for itself, removed after the server.
    pub own_dir: Option<TempDir>,
}

impl Server {
    /// The WebSocket URL.
    pub fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// Stops the relay and waits for it.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(WAIT, self.done).await;
    }
}

/// Starts a relay on a fresh SQLite directory, with `tweak` applied to its settings; the
/// directory goes with the server.
pub async fn start(name: &str, tweak: impl FnOnce(&mut RelayConfig)) -> Server {
    let dir = temp_dir(name);
    let mut server = start_in(dir.to_path_buf(), tweak).await;
    server.own_dir = Some(dir);
    server
}

/// Starts a relay on `dir`, which the caller keeps.
pub async fn start_in(dir: PathBuf, tweak: impl FnOnce(&mut RelayConfig)) -> Server {
    let mut config = RelayConfig {
        store: StoreConfig::Sqlite(dir.clone()),
        ..RelayConfig::default()
    };
    tweak(&mut config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let done = tokio::spawn(serve(listener, config, async move {
        let _ = stopped.await;
    }));
    Server {
        addr,
        stop: Some(stop),
        done,
        dir,
        own_dir: None,
    }
}

/// A member over a raw connection, stamping its own frames: what tests use to send what an
/// honest client never would.
pub struct Member {
    pub conn: Connection,
    pub welcome: Welcome,
    pub node: u64,
    pub token: ResumeToken,
    pub local: u64,
    pub pattern: PatternConfig,
    /// The last log position received.
    pub position: u64,
}

/// The response to a plain HTTP GET of `path`, headers and body.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

/// Joins `room` from log position `since`, resuming `resume` if given.
pub async fn join(server: &Server, room: &str, since: u64, resume: Option<ResumeToken>) -> Member {
    join_log(server, room, since, 0, resume).await
}

/// Joins `room` from log position `since` of the log `log`.
pub async fn join_log(
    server: &Server,
    room: &str,
    since: u64,
    log: u64,
    resume: Option<ResumeToken>,
) -> Member {
    join_at(&server.url(), room, since, log, resume).await
}

/// Joins `room` at the WebSocket URL `url` (one with an access token, say).
pub async fn join_at(
    url: &str,
    room: &str,
    since: u64,
    log: u64,
    resume: Option<ResumeToken>,
) -> Member {
    let options = JoinOptions {
        room: room.into(),
        name: "test".into(),
        since,
        log,
        resume,
        config: None,
    };
    let (conn, welcome) = tokio::time::timeout(WAIT, Connection::join(url, options))
        .await
        .expect("joined within the wait")
        .expect("the join succeeds");
    let mut member = Member {
        conn,
        node: welcome.node,
        token: welcome.resume,
        local: welcome.high,
        pattern: PatternConfig::new(welcome.config.pattern).unwrap(),
        position: welcome.position.max(since),
        welcome,
    };
    for p in &member.welcome.replay {
        if let Some(position) = p.position {
            member.position = member.position.max(position);
        }
    }
    member
}

impl Member {
    /// The frames replayed before `caughtUp`.
    pub fn replay(&self) -> &[Positioned] {
        &self.welcome.replay
    }

    pub async fn recv(&mut self) -> Positioned {
        let positioned = self
            .conn
            .recv_within(WAIT)
            .await
            .expect("a frame within the wait");
        if let Some(position) = positioned.position {
            self.position = self.position.max(position);
        }
        if let Some(stamp) = positioned.frame.stamp() {
            self.local = self.local.max(stamp.step);
        }
        positioned
    }

    /// Receives frames until one matches, returning the ones skipped too.
    pub async fn recv_until(
        &mut self,
        mut done: impl FnMut(&Frame) -> bool,
    ) -> (Frame, Vec<Frame>) {
        let mut skipped = Vec::new();
        loop {
            let frame = self.recv().await.frame;
            if done(&frame) {
                return (frame, skipped);
            }
            skipped.push(frame);
        }
    }

    /// The next stamp: the next step, with its pattern value.
    pub fn stamp(&mut self) -> Stamp {
        self.local += 1;
        Stamp {
            sender: self.node,
            step: self.local,
            pattern: self.pattern.value(self.local),
        }
    }

    pub async fn send(&mut self, frame: &Frame) {
        self.conn.send(frame).await.expect("sent");
    }

    pub async fn send_bytes(&mut self, bytes: Vec<u8>) {
        self.conn.send_bytes(bytes).await.expect("sent");
    }

    /// Sends a data frame and returns its step.
    pub async fn data(&mut self, value: serde_json::Value) -> u64 {
        let stamp = self.stamp();
        let frame = Frame::stamped(
            stamp,
            Body::Data {
                data: Json::from_value(&value).unwrap(),
            },
        );
        self.send(&frame).await;
        stamp.step
    }

    /// Sends a stamped body and waits for its acknowledgement; returns (step, position).
    pub async fn acked(&mut self, body: Body) -> (u64, u64) {
        let stamp = self.stamp();
        self.send(&Frame::stamped(stamp, body)).await;
        self.expect_ack(stamp.step).await
    }

    /// Waits for the acknowledgement of `step`; returns (step, position).
    pub async fn expect_ack(&mut self, step: u64) -> (u64, u64) {
        let (frame, _) = self
            .recv_until(|f| matches!(f, Frame::Ack { .. } | Frame::Reject { .. }))
            .await;
        match frame {
            Frame::Ack {
                step: acked,
                position,
            } => {
                assert_eq!(acked, step);
                (step, position)
            }
            other => panic!("expected an ack of step {step}, got {other:?}"),
        }
    }

    /// Sends a data frame and waits for its ack; returns (step, position).
    pub async fn data_acked(&mut self, value: serde_json::Value) -> (u64, u64) {
        let step = self.data(value).await;
        self.expect_ack(step).await
    }

    /// Waits for a reject; asserts its reason; returns its detail.
    pub async fn expect_reject(&mut self, reason: Reason) -> String {
        let (frame, _) = self
            .recv_until(|f| matches!(f, Frame::Reject { .. } | Frame::Ack { .. }))
            .await;
        match frame {
            Frame::Reject {
                reason: got,
                detail,
                ..
            } => {
                assert_eq!(got, reason, "{detail}");
                detail
            }
            other => panic!("expected a {reason} reject, got {other:?}"),
        }
    }

    /// Sends a fence after a refusal and waits for its echo.
    pub async fn fence(&mut self) {
        let step = self.local;
        self.send(&Frame::Fence { step }).await;
        self.recv_until(|f| matches!(f, Frame::Fence { .. })).await;
    }

    /// Asserts that no stamped frame arrives within `within`.
    pub async fn expect_no_data(&mut self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.conn.recv()).await {
                Err(_) => return,
                Ok(Ok(p)) => assert!(p.frame.stamp().is_none(), "unexpected {:?}", p.frame),
                Ok(Err(e)) => panic!("{e}"),
            }
        }
    }

    /// Reads until the relay closes; returns its close code and reason.
    pub async fn closed(&mut self) -> (u16, String) {
        self.conn
            .closed(WAIT)
            .await
            .expect("closed within the wait")
    }
}

/// The JSON value of a data frame.
pub fn data_value(frame: &Frame) -> Option<serde_json::Value> {
    match frame {
        Frame::Stamped(s) => match &s.body {
            Body::Data { data } => Some(data.to_value().unwrap()),
            _ => None,
        },
        _ => None,
    }
}

/// An update of the text `content`, inserting `text` at `index` of `doc`.
pub fn edit(doc: &pattern_mesh_core::doc::SharedDoc, index: u32, text: &str) -> Body {
    Body::Update {
        doc: "content".into(),
        update: doc.insert("content", index, text).unwrap(),
    }
}

/// The text `content` a late joiner builds from its replay: the snapshot, then the updates.
pub fn replayed_text(replay: &[Positioned]) -> String {
    let doc = pattern_mesh_core::doc::SharedDoc::new();
    for p in replay {
        match &p.frame {
            Frame::Snapshot { state, .. } => doc.apply_update(state).unwrap(),
            Frame::Stamped(s) => {
                if let Body::Update { update, .. } = &s.body {
                    doc.apply_update(update).unwrap();
                }
            }
            _ => {}
        }
    }
    doc.text("content")
}

/// Whether a frame is a data frame.
pub fn is_data(frame: &Frame) -> bool {
    data_value(frame).is_some()
}

/// Opens a raw connection, sends `first`, and returns the close the relay answers with.
pub async fn closed_after(server: &Server, first: &Frame) -> (u16, String) {
    let mut conn = Connection::open(&server.url(), first).await.unwrap();
    match conn.closed(WAIT).await {
        Ok(close) => close,
        Err(ClientError::Closed { code, reason }) => (code, reason),
        Err(e) => panic!("{e}"),
    }
}

/// A TCP proxy in front of a relay that the test can cut: a client behind it goes offline while
/// the relay and everyone else stay up, or finds another relay behind the same address.
pub struct Proxy {
    pub addr: std::net::SocketAddr,
    target: std::sync::Arc<std::sync::Mutex<std::net::SocketAddr>>,
    down: std::sync::Arc<std::sync::atomic::AtomicBool>,
    links: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    /// Bumped by [`Proxy::freeze`]: the links open then go silent.
    frozen: tokio::sync::watch::Sender<u64>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// A proxy to `target`, up.
    pub async fn start(target: std::net::SocketAddr) -> Proxy {
        Self::start_delayed(target, Duration::ZERO).await
    }

    /// A proxy to `target` that holds every byte the client sends for `uplink` before passing
    /// it on (in order): a client far from the relay.
    pub async fn start_delayed(target: std::net::SocketAddr, uplink: Duration) -> Proxy {
        Self::start_shaped(target, uplink, 0).await
    }

    /// A proxy to `target` that passes on what the client sends at `rate` bytes a second at
    /// most: a client on a slow uplink.
    pub async fn start_throttled(target: std::net::SocketAddr, rate: u64) -> Proxy {
        Self::start_shaped(target, Duration::ZERO, rate).await
    }

    async fn start_shaped(target: std::net::SocketAddr, uplink: Duration, rate: u64) -> Proxy {
        use std::sync::atomic::Ordering;
        use std::sync::{Arc, Mutex};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let target = Arc::new(Mutex::new(target));
        let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let links: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let (frozen, _) = tokio::sync::watch::channel(0u64);
        let accept = {
            let (target, down, links) = (target.clone(), down.clone(), links.clone());
            let frozen = frozen.clone();
            tokio::spawn(async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if down.load(Ordering::SeqCst) {
                        drop(inbound);
                        continue;
                    }
                    let to = *target.lock().unwrap();
                    let mut freeze = frozen.subscribe();
                    let link = tokio::spawn(async move {
                        if let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await {
                            let _ = inbound.set_nodelay(true);
                            let _ = outbound.set_nodelay(true);
                            let copy = async {
                                if rate > 0 {
                                    throttled(&mut inbound, &mut outbound, rate).await;
                                } else if uplink.is_zero() {
                                    let _ =
                                        tokio::io::copy_bidirectional(&mut inbound, &mut outbound)
                                            .await;
                                } else {
                                    let (a, b) = (&mut inbound, &mut outbound);
                                    delayed(a, b, uplink).await;
                                }
                            };
                            tokio::select! {
                                () = copy => {}
                                _ = freeze.changed() => {
                                    // Silent: both sockets stay open, and nothing passes.
                                    std::future::pending::<()>().await;
                                }
                            }
                        }
                    });
                    links.lock().unwrap().push(link.abort_handle());
                }
            })
        };
        Proxy {
            addr,
            target,
            down,
            links,
            frozen,
            accept,
        }
    }

    /// The WebSocket URL through the proxy.
    pub fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// Cuts every connection through the proxy and refuses new ones, or lets them through again.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, std::sync::atomic::Ordering::SeqCst);
        if down {
            for link in self.links.lock().unwrap().drain(..) {
                link.abort();
            }
        }
    }

    /// The connections through the proxy go silent, as a network that went away without
    /// closing them (a laptop that slept): both sockets stay open and nothing more passes on
    /// them, either way. New connections pass.
    pub fn freeze(&self) {
        self.frozen.send_modify(|n| *n += 1);
    }

    /// Points new connections at another relay.
    pub fn retarget(&self, target: std::net::SocketAddr) {
        *self.target.lock().unwrap() = target;
    }
}

/// Copies both ways, passing on what `client` sends at `rate` bytes a second at most.
async fn throttled(
    client: &mut tokio::net::TcpStream,
    relay: &mut tokio::net::TcpStream,
    rate: u64,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut client_read, mut client_write) = client.split();
    let (mut relay_read, mut relay_write) = relay.split();
    let up = async move {
        let chunk = (rate / 20).clamp(1, 64 * 1024) as usize;
        let mut buf = vec![0; chunk];
        let started = tokio::time::Instant::now();
        let mut passed = 0u64;
        while let Ok(n) = client_read.read(&mut buf).await {
            if n == 0 || relay_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
            passed += n as u64;
            tokio::time::sleep_until(
                started + Duration::from_secs_f64(passed as f64 / rate as f64),
            )
            .await;
        }
        let _ = relay_write.shutdown().await;
    };
    let down = async move {
        let _ = tokio::io::copy(&mut relay_read, &mut client_write).await;
        let _ = client_write.shutdown().await;
    };
    tokio::join!(up, down);
}

/// Copies both ways, holding what `client` sends for `uplink`.
async fn delayed(
    client: &mut tokio::net::TcpStream,
    relay: &mut tokio::net::TcpStream,
    uplink: Duration,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut client_read, mut client_write) = client.split();
    let (mut relay_read, mut relay_write) = relay.split();
    let (held, mut due) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let up = async move {
        let mut buf = vec![0; 64 * 1024];
        while let Ok(n) = client_read.read(&mut buf).await {
            if n == 0
                || held
                    .send((tokio::time::Instant::now() + uplink, buf[..n].to_vec()))
                    .is_err()
            {
                break;
            }
        }
    };
    let forward = async move {
        while let Some((at, bytes)) = due.recv().await {
            tokio::time::sleep_until(at).await;
            if relay_write.write_all(&bytes).await.is_err() {
                break;
            }
        }
        let _ = relay_write.shutdown().await;
    };
    let down = async move {
        let _ = tokio::io::copy(&mut relay_read, &mut client_write).await;
        let _ = client_write.shutdown().await;
    };
    tokio::join!(up, forward, down);
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.set_down(true);
    }
}

/// A session's settings for `room` as `name`, with a short connect timeout for tests.
pub fn session(room: &str, name: &str) -> pattern_mesh_core::session::SessionConfig {
    let mut config = pattern_mesh_core::session::SessionConfig::new(room, name);
    config.connect_timeout = 10_000;
    config
}

/// A room's settings a reader would choose to break the room for its writers (a stale window
/// of one step and `maxFuture` 1), and the ones its writer asks for.
pub fn hostile_and_wanted() -> (RoomConfig, RoomConfig) {
    let hostile = RoomConfig {
        max_future: 1,
        stale_window: Some(1),
        ..RoomConfig::default()
    };
    let wanted = RoomConfig {
        max_future: 500,
        ..RoomConfig::default()
    };
    (hostile, wanted)
}

/// Joins `room` at `url` as a new node that asks for `config` if it opens the room.
pub async fn join_asking(
    url: &str,
    room: &str,
    config: Option<RoomConfig>,
) -> Result<(Connection, Welcome), ClientError> {
    let options = JoinOptions {
        room: room.into(),
        name: "test".into(),
        since: 0,
        log: 0,
        resume: None,
        config,
    };
    Connection::join(url, options).await
}

/// The close that refused a reader's join of "doc" at `reader_url` asking for the hostile
/// settings (see [`hostile_and_wanted`]).
pub async fn reader_refused(reader_url: &str) -> (u16, String) {
    let (hostile, _) = hostile_and_wanted();
    match tokio::time::timeout(WAIT, join_asking(reader_url, "doc", Some(hostile))).await {
        Err(_) => panic!("no answer within the wait"),
        Ok(Ok((_, welcome))) => panic!("the reader opened the room with {:?}", welcome.config),
        Ok(Err(ClientError::Closed { code, reason })) => (code, reason),
        Ok(Err(e)) => panic!("{e}"),
    }
}

/// A writer at `writer_url` opens "doc" with the settings it wants, and the reader at
/// `reader_url`, asking for the hostile ones, gets them.
pub async fn writer_opens_and_reader_gets_its_settings(writer_url: &str, reader_url: &str) {
    let (hostile, wanted) = hostile_and_wanted();
    let (_writer, welcome) = join_asking(writer_url, "doc", Some(wanted)).await.unwrap();
    assert_eq!(welcome.config, wanted);
    let (_reader, welcome) = join_asking(reader_url, "doc", Some(hostile)).await.unwrap();
    assert_eq!(
        welcome.config, wanted,
        "the reader gets the writer's settings"
    );
}

/// A stamped update of `doc` holding `bytes`, under the member's next stamp.
pub fn raw_update(member: &mut Member, doc: &str, bytes: Vec<u8>) -> Frame {
    let stamp = member.stamp();
    Frame::stamped(
        stamp,
        Body::Update {
            doc: doc.into(),
            update: bytes,
        },
    )
}

/// `value` as an unsigned LEB128 varint, as Yjs writes numbers.
pub fn var(out: &mut Vec<u8>, mut value: u64) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// Deletes, in one update acknowledged, the `b` of each `"ab"` of `pairs` in client 7's text of
/// `"ab"` repeated (its clocks 1, 3, 5, ...).
pub async fn delete_every_b(member: &mut Member, pairs: std::ops::Range<u64>) {
    let mut deletion = vec![0, 1, 7];
    var(&mut deletion, pairs.end - pairs.start);
    for i in pairs {
        var(&mut deletion, 1 + 2 * i);
        var(&mut deletion, 1);
    }
    member
        .acked(Body::Update {
            doc: "content".into(),
            update: deletion,
        })
        .await;
}

/// On the text of [`delete_every_b`] over `"ab"` written 5,000 times by client 7 (10,000
/// blocks): client 9's item after the middle character whose right origin (client 7's clock 10)
/// lies behind it, which yrs ignores, placing the item where its conflicts let it; then 4,000
/// items after the first character and before that item. The estimate of what an update costs
/// follows the right origin to where it points, ten blocks on; each item really walks half the
/// text (about 2.6·10^9 steps, 15 s of yrs). Integration stops at its bound: `tooLarge`,
/// "walks too far", and the room loads again without it.
pub fn walks_too_far() -> Vec<u8> {
    let mut walks = vec![1];
    var(&mut walks, 4_001);
    walks.extend_from_slice(&[9, 0, 0xC4, 7]);
    var(&mut walks, 5_000);
    walks.extend_from_slice(&[7, 10, 1, b'x']);
    for _ in 0..4_000 {
        walks.extend_from_slice(&[0xC4, 7, 0, 9, 0, 1, b'x']);
    }
    walks.push(0);
    walks
}

/// A join of `room` from the start, as a new node.
pub fn join_frame(room: &str) -> Frame {
    Frame::Join {
        room: room.into(),
        name: "mallory".into(),
        since: 0,
        log: 0,
        resume: None,
        config: None,
        floor: false,
    }
}
