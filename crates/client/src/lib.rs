//! A native pattern-mesh client on tokio and tokio-tungstenite.
//!
//! Two layers:
//!
//! - [`Client`] drives the core's [`Session`]: the whole client protocol (join, catch-up, outbox,
//!   pacing, refusals and fences, reconnects with backoff, checkpoints, sync), with a shared
//!   document. It is the same state machine the browser's `MeshClient` drives; this crate only
//!   moves bytes and time.
//! - [`Connection`] is one raw connection that has joined a room: frames in, frames out, nothing
//!   decided for you. Load generators and the relay's attack tests use it to send what an honest
//!   client never would.
#![warn(missing_docs)]

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use pattern_mesh_core::doc::SharedDoc;
use pattern_mesh_core::session::{Event, Output, Session, SessionConfig, SessionError, Status};
use pattern_mesh_core::wire::part::Reassembler;
use pattern_mesh_core::wire::{
    DecodeError, Frame, Json, Limits, NodeId, Peer, Positioned, RelayLimits, ResumeToken,
    RoomConfig,
};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The longest the client's driver waits for the socket to open or to take a frame: a network
/// gone silent must not hold up the session's timers. (The relay lets a peer that reads
/// nothing go after as long.)
const STALL: Duration = Duration::from_secs(30);

/// The longest it waits for a close to go out.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The WebSocket could not be opened or failed.
    #[error("websocket: {0}")]
    Socket(#[from] tokio_tungstenite::tungstenite::Error),
    /// A frame did not decode.
    #[error("a frame did not decode: {0}")]
    Decode(#[from] DecodeError),
    /// The relay closed the connection.
    #[error("the relay closed the connection ({code}): {reason}")]
    Closed {
        /// The close code (1006 when there was no close frame).
        code: u16,
        /// The reason.
        reason: String,
    },
    /// The relay answered something the protocol does not expect here.
    #[error("unexpected frame: {0}")]
    Unexpected(String),
    /// Nothing came within the time allowed.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The session refused the operation.
    #[error(transparent)]
    Session(#[from] SessionError),
    /// A document edit was out of range.
    #[error(transparent)]
    Document(#[from] pattern_mesh_core::doc::DocError),
}

/// What a join asks for.
#[derive(Debug, Clone, Default)]
pub struct JoinOptions {
    /// The room.
    pub room: String,
    /// The display name.
    pub name: String,
    /// The last log position received (0: the whole log)...
    pub since: u64,
    /// ... in this log (0: none).
    pub log: u64,
    /// A resume token from an earlier welcome.
    pub resume: Option<ResumeToken>,
    /// Settings for a new room.
    pub config: Option<RoomConfig>,
}

/// The relay's welcome, and the log it replayed before `caughtUp`.
#[derive(Debug, Clone)]
pub struct Welcome {
    /// This connection's node id.
    pub node: NodeId,
    /// The token that resumes it.
    pub resume: ResumeToken,
    /// The room's settings.
    pub config: RoomConfig,
    /// What the relay accepts.
    pub limits: RelayLimits,
    /// The room's high step at the join.
    pub high: u64,
    /// The identity of the room's log.
    pub log: u64,
    /// The members present.
    pub peers: Vec<Peer>,
    /// The logged messages replayed, in order.
    pub replay: Vec<Positioned>,
    /// The room's last log position at the join.
    pub position: u64,
}

/// One raw connection that has joined a room.
pub struct Connection {
    socket: Socket,
    limits: Limits,
    reassembler: Reassembler,
}

impl Connection {
    /// Opens `url` (`ws://host:port/ws`) and sends `join` as it is, without waiting for an
    /// answer: for tests of what the relay does with a join.
    pub async fn open(url: &str, join: &Frame) -> Result<Connection, ClientError> {
        let (mut socket, _) = tokio_tungstenite::connect_async(url).await?;
        socket.send(Message::Binary(join.encode().into())).await?;
        Ok(Connection {
            socket,
            limits: Limits::default(),
            reassembler: Reassembler::new(),
        })
    }

    /// Opens `url`, joins, and reads the welcome and the catch-up up to `caughtUp`.
    pub async fn join(
        url: &str,
        options: JoinOptions,
    ) -> Result<(Connection, Welcome), ClientError> {
        let join = Frame::Join {
            room: options.room,
            name: options.name,
            since: options.since,
            log: options.log,
            resume: options.resume,
            config: options.config,
            floor: false,
        };
        let mut connection = Connection::open(url, &join).await?;
        let Frame::Welcome {
            node,
            resume,
            config,
            limits,
            high,
            log,
            peers,
            ..
        } = connection.recv().await?.frame
        else {
            return Err(ClientError::Unexpected(
                "the first answer was not a welcome".into(),
            ));
        };
        connection.limits = Limits::default().with_relay(&limits);
        let mut replay = Vec::new();
        let position = loop {
            let positioned = connection.recv().await?;
            if let Frame::CaughtUp { position, .. } = positioned.frame {
                break position;
            }
            replay.push(positioned);
        };
        Ok((
            connection,
            Welcome {
                node,
                resume,
                config,
                limits,
                high,
                log,
                peers,
                replay,
                position,
            },
        ))
    }

    /// Sends a frame, in parts if it is larger than the relay's frame limit.
    pub async fn send(&mut self, frame: &Frame) -> Result<(), ClientError> {
        for piece in pattern_mesh_core::wire::part::fragment(&frame.encode(), self.limits.max_frame)
        {
            self.socket.send(Message::Binary(piece.into())).await?;
        }
        Ok(())
    }

    /// Sends bytes as they are, in one message.
    pub async fn send_bytes(&mut self, bytes: Vec<u8>) -> Result<(), ClientError> {
        self.socket.send(Message::Binary(bytes.into())).await?;
        Ok(())
    }

    /// Sends a text message (which the protocol does not allow).
    pub async fn send_text(&mut self, text: &str) -> Result<(), ClientError> {
        self.socket.send(Message::Text(text.into())).await?;
        Ok(())
    }

    /// The next frame (parts put back together); a close becomes [`ClientError::Closed`].
    pub async fn recv(&mut self) -> Result<Positioned, ClientError> {
        loop {
            let message = match self.socket.next().await {
                Some(message) => message?,
                None => {
                    return Err(ClientError::Closed {
                        code: 1006,
                        reason: "the connection ended without a close frame".into(),
                    })
                }
            };
            match message {
                Message::Binary(bytes) => {
                    let positioned = Frame::decode_positioned(&bytes, &self.limits)?;
                    if let Frame::Part {
                        total,
                        offset,
                        bytes,
                    } = positioned.frame
                    {
                        if let Some(whole) =
                            self.reassembler
                                .push(total, offset, bytes, self.limits.max_message)?
                        {
                            return Ok(Frame::decode_positioned(
                                &whole,
                                &self.limits.for_message(),
                            )?);
                        }
                        continue;
                    }
                    return Ok(positioned);
                }
                Message::Close(frame) => return Err(closed(frame)),
                _ => continue,
            }
        }
    }

    /// The next frame within `wait`.
    pub async fn recv_within(&mut self, wait: Duration) -> Result<Positioned, ClientError> {
        tokio::time::timeout(wait, self.recv())
            .await
            .map_err(|_| ClientError::Timeout(format!("no frame within {wait:?}")))?
    }

    /// Reads until the relay closes; returns its close code and reason.
    pub async fn closed(&mut self, wait: Duration) -> Result<(u16, String), ClientError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.socket.next()).await {
                Err(_) => return Err(ClientError::Timeout("no close within the wait".into())),
                Ok(Some(Ok(Message::Close(frame)))) => {
                    let ClientError::Closed { code, reason } = closed(frame) else {
                        unreachable!("closed() makes a Closed")
                    };
                    return Ok((code, reason));
                }
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(e))) => return Err(e.into()),
                Ok(None) => {
                    return Ok((1006, String::new()));
                }
            }
        }
    }

    /// The WebSocket itself, to split it into a writer and a reader.
    pub fn into_socket(self) -> WebSocketStream<MaybeTlsStream<TcpStream>> {
        self.socket
    }

    /// Closes the connection.
    pub async fn close(mut self) {
        let _ = self.socket.close(None).await;
    }
}

fn closed(frame: Option<CloseFrame>) -> ClientError {
    match frame {
        Some(frame) => ClientError::Closed {
            code: frame.code.into(),
            reason: frame.reason.to_string(),
        },
        None => ClientError::Closed {
            code: 1005,
            reason: String::new(),
        },
    }
}

/// The state a [`Client`] and its driver share.
struct Shared {
    session: Mutex<Session<SharedDoc>>,
    /// Wakes the driver: the application did something.
    wake: Notify,
    started: Instant,
}

impl Shared {
    fn now(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn session(&self) -> MutexGuard<'_, Session<SharedDoc>> {
        self.session.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A client of a room: the core's session, driven over tokio-tungstenite, with its document.
pub struct Client {
    shared: Arc<Shared>,
    events: mpsc::UnboundedReceiver<Event>,
    driver: tokio::task::JoinHandle<()>,
}

impl Client {
    /// Connects to `url` and joins as `config` says; resolves once the session is open, or with
    /// the reason it closed (the session gives up after `config.connect_timeout`).
    pub async fn connect(url: &str, config: SessionConfig) -> Result<Client, ClientError> {
        Self::connect_any(&[url], config).await
    }

    /// [`Client::connect`] to any of several relays that share one store: the first, and after
    /// a failure or a drop the next in turn, with the same outbox and node.
    pub async fn connect_any(urls: &[&str], config: SessionConfig) -> Result<Client, ClientError> {
        if urls.is_empty() {
            return Err(ClientError::Unexpected("no relay URL to connect to".into()));
        }
        let mut config = config;
        config.relays = urls.len();
        if config.seed == SessionConfig::new("", "").seed {
            let mut seed = [0u8; 8];
            let _ = getrandom::fill(&mut seed);
            config.seed = u64::from_le_bytes(seed);
        }
        let started = Instant::now();
        let session = Session::new(config, SharedDoc::new(), 0);
        let shared = Arc::new(Shared {
            session: Mutex::new(session),
            wake: Notify::new(),
            started,
        });
        let (events_tx, events) = mpsc::unbounded_channel();
        let urls = urls.iter().map(|u| (*u).to_owned()).collect();
        let driver = tokio::spawn(drive(shared.clone(), urls, events_tx));
        let mut client = Client {
            shared,
            events,
            driver,
        };
        let mut held = Vec::new();
        loop {
            match client.events.recv().await {
                Some(Event::Status {
                    status: Status::Open,
                    reason,
                }) => {
                    held.push(Event::Status {
                        status: Status::Open,
                        reason,
                    });
                    break;
                }
                Some(Event::Status {
                    status: Status::Closed,
                    reason,
                }) => {
                    return Err(ClientError::Closed {
                        code: 0,
                        reason: reason.unwrap_or_default(),
                    })
                }
                Some(event) => held.push(event),
                None => {
                    return Err(ClientError::Closed {
                        code: 0,
                        reason: "the client stopped".into(),
                    })
                }
            }
        }
        // Give the events of the join back, first in line.
        let (tx, rx) = mpsc::unbounded_channel();
        for event in held {
            let _ = tx.send(event);
        }
        let old = std::mem::replace(&mut client.events, rx);
        tokio::spawn(forward(old, tx));
        Ok(client)
    }

    /// Runs `f` on the session (to read it, or to edit its document), then lets the driver send
    /// what it queued.
    pub fn with_session<T>(&self, f: impl FnOnce(&mut Session<SharedDoc>, u64) -> T) -> T {
        let now = self.shared.now();
        let result = f(&mut self.shared.session(), now);
        self.shared.wake.notify_one();
        result
    }

    /// Sends application data.
    pub fn broadcast(&self, data: Json) -> Result<(), ClientError> {
        self.with_session(|s, now| s.broadcast(now, data))?;
        Ok(())
    }

    /// Inserts `chunk` at `index` in the text `name` and sends the edit.
    pub fn insert(&self, name: &str, index: u32, chunk: &str) -> Result<(), ClientError> {
        self.with_session(|s, now| {
            s.check_insert(name, chunk.len())?;
            let update = s.replica().insert(name, index, chunk)?;
            s.update(now, name, update)?;
            Ok(())
        })
    }

    /// Deletes `length` units from `index` in the text `name` and sends the edit.
    pub fn delete(&self, name: &str, index: u32, length: u32) -> Result<(), ClientError> {
        self.with_session(|s, now| {
            s.check_edit(name)?;
            let update = s.replica().delete(name, index, length)?;
            s.update(now, name, update)?;
            Ok(())
        })
    }

    /// The text `name` now.
    pub fn text(&self, name: &str) -> String {
        self.with_session(|s, _| s.replica().text(name))
    }

    /// This client's node id.
    pub fn node(&self) -> NodeId {
        self.with_session(|s, _| s.node())
    }

    /// The connection's state.
    pub fn status(&self) -> Status {
        self.with_session(|s, _| s.status())
    }

    /// Messages not yet acknowledged.
    pub fn pending(&self) -> usize {
        self.with_session(|s, _| s.pending())
    }

    /// Whether an edit of the document was refused for good (see `Session::diverged`).
    pub fn diverged(&self) -> bool {
        self.with_session(|s, _| s.diverged())
    }

    /// Repairs a document that diverged: sets it aside and loads the room's again, over a new
    /// connection (see `Session::repair`). Whether it did (`false`: nothing to repair).
    pub fn repair(&self) -> Result<bool, ClientError> {
        let repaired = self.with_session(|s, now| s.repair(now, SharedDoc::new()))?;
        Ok(repaired.is_some())
    }

    /// The next event.
    pub async fn next_event(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// Every event that has arrived and not been read, without waiting.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::iter::from_fn(|| self.events.try_recv().ok()).collect()
    }

    /// Events until `done` says stop, within `wait`; returns them all.
    pub async fn events_until(
        &mut self,
        wait: Duration,
        mut done: impl FnMut(&Event) -> bool,
    ) -> Result<Vec<Event>, ClientError> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut seen = Vec::new();
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(event)) => {
                    let stop = done(&event);
                    seen.push(event);
                    if stop {
                        return Ok(seen);
                    }
                }
                Ok(None) => return Err(ClientError::Unexpected("the client stopped".into())),
                Err(_) => {
                    return Err(ClientError::Timeout(format!(
                        "the awaited event did not come within {wait:?}; saw {seen:?}"
                    )))
                }
            }
        }
    }

    /// Waits until the client is open with nothing pending, within `wait`.
    pub async fn settled(&self, wait: Duration) -> Result<(), ClientError> {
        let deadline = Instant::now() + wait;
        loop {
            let (status, pending) = self.with_session(|s, _| (s.status(), s.pending()));
            if status == Status::Open && pending == 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(ClientError::Timeout(format!(
                    "still {status:?} with {pending} pending after {wait:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Drops the connection as a network failure would; the session reconnects by itself.
    pub fn disconnect(&self) {
        self.with_session(|s, now| s.disconnect(now));
    }

    /// Sends bytes as they are (to show what the relay does with them).
    pub fn send_raw(&self, bytes: Vec<u8>) -> bool {
        self.with_session(|s, _| s.send_raw(bytes))
    }

    /// Closes for good and waits for the driver to stop.
    pub async fn close(self) {
        self.with_session(|s, now| s.close(now));
        let _ = self.driver.await;
    }
}

async fn forward(mut from: mpsc::UnboundedReceiver<Event>, to: mpsc::UnboundedSender<Event>) {
    while let Some(event) = from.recv().await {
        if to.send(event).is_err() {
            break;
        }
    }
}

/// Pumps the session: its outputs to the socket, the socket's frames and the timers to it.
async fn drive(shared: Arc<Shared>, urls: Vec<String>, events: mpsc::UnboundedSender<Event>) {
    let mut socket: Option<Socket> = None;
    loop {
        // Carry out what the session asks, until it asks nothing more.
        loop {
            let (output, relay) = {
                let mut session = shared.session();
                while let Some(event) = session.poll_event() {
                    let _ = events.send(event);
                }
                (session.poll_output(), session.relay())
            };
            let Some(output) = output else { break };
            let url = urls[relay.min(urls.len() - 1)].as_str();
            match output {
                // Every socket operation is bounded in time: awaited here, one that hangs on a
                // network gone silent would hold up the session's timers (its heartbeats).
                Output::Connect => {
                    match tokio::time::timeout(STALL, tokio_tungstenite::connect_async(url))
                        .await
                        .unwrap_or_else(|_| {
                            Err(tokio_tungstenite::tungstenite::Error::Io(
                                std::io::ErrorKind::TimedOut.into(),
                            ))
                        }) {
                        Ok((ws, _)) => {
                            socket = Some(ws);
                            let now = shared.now();
                            shared.session().handle_connected(now);
                        }
                        Err(e) => {
                            let now = shared.now();
                            let reason = format!("could not connect: {e}");
                            shared.session().handle_closed(now, 1006, &reason);
                        }
                    }
                }
                Output::Send(bytes) => {
                    let failed = match socket.as_mut() {
                        Some(ws) => !matches!(
                            tokio::time::timeout(STALL, ws.send(Message::Binary(bytes.into())))
                                .await,
                            Ok(Ok(()))
                        ),
                        None => false,
                    };
                    if failed {
                        socket = None;
                        let now = shared.now();
                        shared
                            .session()
                            .handle_closed(now, 1006, "the connection failed");
                    }
                }
                Output::Disconnect { code, reason } => {
                    if let Some(mut ws) = socket.take() {
                        let frame = CloseFrame {
                            code: code.into(),
                            reason: reason.into(),
                        };
                        let _ = tokio::time::timeout(CLOSE_WAIT, ws.close(Some(frame))).await;
                    }
                }
                // This client keeps nothing in storage: its sessions are not `persist`.
                Output::Save => {}
            }
        }
        let (timeout, closed) = {
            let mut session = shared.session();
            (session.poll_timeout(), session.is_closed())
        };
        if closed {
            break;
        }
        let sleep = async {
            match timeout {
                Some(at) => {
                    let wait = at.saturating_sub(shared.now());
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                }
                None => std::future::pending().await,
            }
        };
        let next = async {
            match socket.as_mut() {
                Some(ws) => ws.next().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shared.wake.notified() => {}
            _ = sleep => {
                let now = shared.now();
                shared.session().handle_timeout(now);
            }
            message = next => {
                let now = shared.now();
                match message {
                    Some(Ok(Message::Binary(bytes))) => shared.session().handle_frame(now, &bytes),
                    Some(Ok(Message::Close(frame))) => {
                        socket = None;
                        let (code, reason) = match frame {
                            Some(f) => (u16::from(f.code), f.reason.to_string()),
                            None => (1005, String::new()),
                        };
                        shared.session().handle_closed(now, code, &reason);
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        socket = None;
                        shared.session().handle_closed(now, 1006, &e.to_string());
                    }
                    None => {
                        socket = None;
                        shared.session().handle_closed(now, 1006, "the connection ended");
                    }
                }
            }
        }
    }
    {
        let mut session = shared.session();
        while let Some(event) = session.poll_event() {
            let _ = events.send(event);
        }
    }
    if let Some(mut ws) = socket {
        let _ = ws.close(None).await;
    }
}
