//! `MeshClient` and `SharedText`: the browser client over gloo-net's WebSocket.
//!
//! All state lives in one `Rc<RefCell<State>>` on the page's thread. Nothing calls into JS while
//! the state is borrowed: events are queued during a change and dispatched after it, so a
//! listener may call back into the client.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::rc::Rc;

use futures_channel::mpsc::{unbounded, UnboundedSender};
use futures_channel::oneshot;
use futures_util::future::{self, Either};
use futures_util::{SinkExt, StreamExt};
use gloo_net::websocket::{futures::WebSocket, Message, WebSocketError};
use serde::{Deserialize, Serialize};
use wasm_bindgen::prelude::*;

use super::errors::{from_js, invalid_argument, js_error, to_js};
use super::frames::{json_from_js, message_to_js, presence_event_to_js};
use super::types::{JsJson, JsMeshClientOptions, JsTextListener, JsUnsubscribe};
use super::validator::{counts_to_js, verdict, VerdictJs};
use crate::clock::StepClock;
use crate::doc::{SharedDoc, TextDelta};
use crate::envelope::{Frame, Limits, NodeId, Peer, Reason, ResumeToken, RoomConfig, Stamp};
use crate::pattern::{PatternConfig, Step};
use crate::validate::{Origin, Validator, ValidatorConfig, Verdict};

/// The document every checkpoint covers: all texts of the client's document.
const WHOLE_DOC: &str = "*";

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Options {
    url: String,
    room: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    config: Option<RoomConfig>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Anomaly {
    source: &'static str,
    reason: Reason,
    detail: String,
    step: Step,
    #[serde(skip_serializing_if = "Option::is_none")]
    sender: Option<NodeId>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct StepEvent {
    step: Step,
    pattern: u64,
    phase: u64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PeersEvent {
    peers: Vec<Peer>,
    #[serde(skip_serializing_if = "Option::is_none")]
    joined: Option<Peer>,
    #[serde(skip_serializing_if = "Option::is_none")]
    left: Option<NodeId>,
}

struct Listener {
    id: u32,
    event: String,
    function: js_sys::Function,
}

struct State {
    url: String,
    room: String,
    name: String,
    requested: Option<RoomConfig>,
    node: NodeId,
    token: Option<ResumeToken>,
    /// The last room log position received.
    position: u64,
    clock: StepClock,
    validator: Validator,
    /// Sent but not yet acknowledged, in step order: resent after a reconnect.
    outbox: VecDeque<(Step, Vec<u8>)>,
    /// The current socket's writer, once the catch-up is over.
    writer: Option<UnboundedSender<Vec<u8>>>,
    status: &'static str,
    closed: bool,
    peers: BTreeMap<NodeId, String>,
    doc: SharedDoc,
    observed: HashMap<String, u64>,
    deltas: Rc<RefCell<Vec<TextChange>>>,
    remote: Rc<Cell<bool>>,
    events: Vec<(&'static str, JsValue)>,
    listeners: Vec<Listener>,
    text_listeners: Vec<(u32, String, js_sys::Function)>,
    next_listener: u32,
    joined: Option<oneshot::Sender<Result<(), String>>>,
}

type Shared = Rc<RefCell<State>>;

/// A change of the text named first, and whether it came from a remote update.
type TextChange = (String, Vec<TextDelta>, bool);

impl State {
    fn emit(&mut self, event: &'static str, value: &impl Serialize) {
        if let Ok(value) = to_js(value) {
            self.events.push((event, value));
        }
    }

    fn anomaly(
        &mut self,
        source: &'static str,
        reason: Reason,
        detail: String,
        step: Step,
        sender: Option<NodeId>,
    ) {
        self.emit(
            "anomaly",
            &Anomaly {
                source,
                reason,
                detail,
                step,
                sender,
            },
        );
    }

    fn set_status(&mut self, status: &'static str) {
        if self.status != status {
            self.status = status;
            self.events.push(("status", JsValue::from_str(status)));
        }
    }

    fn emit_peers(&mut self, joined: Option<Peer>, left: Option<NodeId>) {
        let peers = self.peer_list();
        self.emit(
            "peers",
            &PeersEvent {
                peers,
                joined,
                left,
            },
        );
    }

    fn peer_list(&self) -> Vec<Peer> {
        self.peers
            .iter()
            .map(|(&node, name)| Peer {
                node,
                name: name.clone(),
            })
            .collect()
    }

    fn now() -> u64 {
        js_sys::Date::now() as u64
    }

    /// Stamps a frame with the next step, queues it in the outbox and sends it if connected.
    fn send_stamped(&mut self, build: impl FnOnce(Stamp) -> Frame) -> Result<Step, JsValue> {
        let (tick, advance) = self.clock.next().map_err(|e| js_error("RangeError", e))?;
        let stamp = Stamp {
            sender: self.node,
            step: tick.step,
            pattern: tick.pattern,
        };
        let bytes = build(stamp).encode();
        if let Some(writer) = &self.writer {
            let _ = writer.unbounded_send(bytes.clone());
        }
        self.outbox.push_back((tick.step, bytes));
        self.emit(
            "step",
            &StepEvent {
                step: tick.step,
                pattern: tick.pattern,
                phase: self.clock.phase(),
            },
        );
        if advance.entered_phase.is_some() {
            self.checkpoint()?;
        }
        Ok(tick.step)
    }

    /// Publishes the document's digest at its version (a phase boundary was crossed).
    fn checkpoint(&mut self) -> Result<(), JsValue> {
        if self.observed.is_empty() {
            return Ok(());
        }
        let state_vector = self.doc.state_vector();
        let digest = self.doc.digest();
        self.send_stamped(|stamp| Frame::Checkpoint {
            stamp,
            doc: WHOLE_DOC.into(),
            state_vector,
            digest,
        })
        .map(|_| ())
    }

    fn apply_update(&mut self, update: &[u8], stamp: &Stamp) {
        self.remote.set(true);
        let result = self.doc.apply_update(update);
        self.remote.set(false);
        if let Err(e) = result {
            self.anomaly(
                "local",
                Reason::Malformed,
                e.to_string(),
                stamp.step,
                Some(stamp.sender),
            );
        }
    }

    fn handle(&mut self, bytes: &[u8], writer: &UnboundedSender<Vec<u8>>) {
        let positioned = match Frame::decode_positioned(bytes, &Limits::default()) {
            Ok(p) => p,
            Err(e) => return self.anomaly("local", e.reason(), e.to_string(), 0, None),
        };
        if let Some(position) = positioned.position {
            self.position = self.position.max(position);
        }
        match positioned.frame {
            Frame::Welcome {
                node,
                resume,
                config,
                high,
                peers,
            } => {
                if self.node != node || self.validator.config().pattern.params() != config.pattern {
                    // A new identity or a new room configuration: start the clock afresh.
                    if let Ok(pattern) = PatternConfig::new(config.pattern) {
                        self.clock = StepClock::new(pattern);
                    }
                    if let Ok(v) = ValidatorConfig::for_room(&config) {
                        self.validator = Validator::new(v);
                    }
                }
                self.node = node;
                self.token = Some(resume);
                self.clock.join(high);
                self.peers = peers.into_iter().map(|p| (p.node, p.name)).collect();
                self.emit_peers(None, None);
            }
            Frame::CaughtUp { .. } => {
                self.writer = Some(writer.clone());
                for (_, bytes) in &self.outbox {
                    let _ = writer.unbounded_send(bytes.clone());
                }
                self.set_status("open");
                // After the log, a state-vector sync: a peer that holds edits this client lacks
                // (ones the log no longer has) answers with exactly those.
                let state_vector = self.doc.state_vector();
                let _ = self.send_stamped(|stamp| Frame::SyncRequest {
                    stamp,
                    doc: WHOLE_DOC.into(),
                    state_vector,
                });
                if let Some(joined) = self.joined.take() {
                    let _ = joined.send(Ok(()));
                }
            }
            Frame::PeerJoined { peer } => {
                self.peers.insert(peer.node, peer.name.clone());
                self.emit_peers(Some(peer), None);
            }
            Frame::PeerLeft { node } => {
                self.peers.remove(&node);
                self.emit_peers(None, Some(node));
            }
            Frame::Ack { step, .. } => {
                while self.outbox.front().is_some_and(|(s, _)| *s <= step) {
                    self.outbox.pop_front();
                }
            }
            Frame::Reject {
                step,
                reason,
                detail,
            } => self.rejected(step, reason, detail),
            Frame::Presence { sender, data } => {
                if let Ok(event) = presence_event_to_js(sender, &data) {
                    self.events.push(("presence", event));
                }
            }
            Frame::Join { .. } => {}
            stamped => self.stamped(stamped),
        }
    }

    fn rejected(&mut self, step: Step, reason: Reason, detail: String) {
        let queued = self.outbox.iter().position(|(s, _)| *s == step);
        match (reason, queued) {
            // A resent message the relay already stored: it is delivered, not lost.
            (Reason::Replay, Some(i)) => {
                self.outbox.remove(i);
            }
            // Stamped too long ago (after a long time offline): stamp it again and resend.
            (Reason::FutureStep | Reason::Stale, Some(i)) => {
                if let Some((_, bytes)) = self.outbox.remove(i) {
                    if let Ok(frame) = Frame::decode(&bytes) {
                        let _ = self.send_stamped(|stamp| restamp(frame, stamp));
                    }
                }
                self.anomaly("relay", reason, detail, step, None);
            }
            // The relay could not store it: keep it for the next connection.
            (Reason::Unavailable | Reason::RateLimited, _) => {
                self.anomaly("relay", reason, detail, step, None)
            }
            (_, Some(i)) => {
                self.outbox.remove(i);
                self.anomaly("relay", reason, detail, step, None);
            }
            (_, None) => self.anomaly("relay", reason, detail, step, None),
        }
    }

    fn stamped(&mut self, frame: Frame) {
        let Some(&stamp) = frame.stamp() else { return };
        let origin = Origin::Relayed {
            receiver: self.node,
        };
        let local = self.clock.local();
        if let Verdict::Rejected(reason) = self.validator.check(&stamp, origin, local, Self::now())
        {
            let detail = self.validator.explain(&stamp, origin, local, reason);
            return self.anomaly("local", reason, detail, stamp.step, Some(stamp.sender));
        }
        let advance = self.clock.accept(stamp.step);
        if advance.moved() {
            self.emit(
                "step",
                &StepEvent {
                    step: stamp.step,
                    pattern: stamp.pattern,
                    phase: self.clock.phase(),
                },
            );
        }
        match &frame {
            Frame::Data { data, .. } => {
                if let Ok(event) = message_to_js(&stamp, data) {
                    self.events.push(("message", event));
                }
            }
            Frame::Update { update, .. } | Frame::SyncState { update, .. } => {
                self.apply_update(update, &stamp)
            }
            Frame::Snapshot { state, .. } => self.apply_update(state, &stamp),
            Frame::Checkpoint {
                state_vector,
                digest,
                ..
            } if *state_vector == self.doc.state_vector() && *digest != self.doc.digest() => {
                {
                    let detail = format!(
                        "node {} has digest {digest:016x} at the same version where this node has {:016x}",
                        stamp.sender,
                        self.doc.digest()
                    );
                    self.anomaly(
                        "local",
                        Reason::Desync,
                        detail,
                        stamp.step,
                        Some(stamp.sender),
                    );
                    // Ask for everything: whatever we lack comes back as a sync state.
                    let _ = self.send_stamped(|s| Frame::SyncRequest {
                        stamp: s,
                        doc: WHOLE_DOC.into(),
                        state_vector: Vec::new(),
                    });
                }
            }
            Frame::SyncRequest { state_vector, .. } => {
                let full = state_vector.is_empty();
                let missing = if full {
                    Ok(self.doc.snapshot())
                } else {
                    self.doc.diff(state_vector)
                };
                match missing {
                    // Answer only with something the requester lacks (new items); the delete set
                    // alone is in every diff.
                    Ok(update) if full || crate::doc::has_insertions(&update) => {
                        let _ = self.send_stamped(|s| Frame::SyncState {
                            stamp: s,
                            doc: WHOLE_DOC.into(),
                            update,
                        });
                    }
                    _ => {}
                }
            }
            _ => {}
        }
        if advance.entered_phase.is_some() {
            let _ = self.checkpoint();
        }
    }
}

fn restamp(frame: Frame, stamp: Stamp) -> Frame {
    match frame {
        Frame::Data { data, .. } => Frame::Data { stamp, data },
        Frame::Update { doc, update, .. } => Frame::Update { stamp, doc, update },
        Frame::Checkpoint {
            doc,
            state_vector,
            digest,
            ..
        } => Frame::Checkpoint {
            stamp,
            doc,
            state_vector,
            digest,
        },
        Frame::SyncRequest {
            doc, state_vector, ..
        } => Frame::SyncRequest {
            stamp,
            doc,
            state_vector,
        },
        Frame::SyncState { doc, update, .. } => Frame::SyncState { stamp, doc, update },
        Frame::Snapshot { doc, state, .. } => Frame::Snapshot { stamp, doc, state },
        other => other,
    }
}

/// Calls the listeners of every queued event and text change, after the state is released.
fn dispatch(shared: &Shared) {
    loop {
        let (events, deltas, listeners, text_listeners) = {
            let mut state = shared.borrow_mut();
            let events = std::mem::take(&mut state.events);
            let deltas = std::mem::take(&mut *state.deltas.borrow_mut());
            if events.is_empty() && deltas.is_empty() {
                return;
            }
            let listeners: Vec<(String, js_sys::Function)> = state
                .listeners
                .iter()
                .map(|l| (l.event.clone(), l.function.clone()))
                .collect();
            let text_listeners = state.text_listeners.clone();
            (events, deltas, listeners, text_listeners)
        };
        for (event, value) in events {
            for (name, function) in &listeners {
                if name == event {
                    if let Err(e) = function.call1(&JsValue::NULL, &value) {
                        web_log(&e);
                    }
                }
            }
        }
        for (text, delta, remote) in deltas {
            let Ok(delta) = to_js(&delta) else { continue };
            let origin = JsValue::from_str(if remote { "remote" } else { "local" });
            for (_, name, function) in &text_listeners {
                if *name == text {
                    if let Err(e) = function.call2(&JsValue::NULL, &delta, &origin) {
                        web_log(&e);
                    }
                }
            }
        }
    }
}

/// A listener that throws does not stop the others: its error goes to the console.
fn web_log(error: &JsValue) {
    let console = js_sys::Reflect::get(&js_sys::global(), &"console".into()).ok();
    if let Some(error_fn) = console
        .and_then(|c| js_sys::Reflect::get(&c, &"error".into()).ok())
        .and_then(|f| f.dyn_into::<js_sys::Function>().ok())
    {
        let _ = error_fn.call1(&JsValue::NULL, error);
    }
}

/// Exponential backoff with jitter: 250 ms doubling to 8 s, each wait between half and all of it.
fn backoff(attempt: u32) -> u32 {
    let ceiling = 250u32.saturating_mul(1 << attempt.min(5));
    let jitter = (js_sys::Math::random() * f64::from(ceiling / 2)) as u32;
    ceiling / 2 + jitter
}

/// Close codes after which reconnecting cannot help.
fn is_final(code: u16) -> bool {
    matches!(code, 1008 | 4002)
}

async fn run(shared: Shared) {
    let mut attempt = 0u32;
    loop {
        let (url, join) = {
            let mut state = shared.borrow_mut();
            if state.closed {
                break;
            }
            let status = if state.token.is_some() {
                "reconnecting"
            } else {
                "connecting"
            };
            state.set_status(status);
            let join = Frame::Join {
                room: state.room.clone(),
                name: state.name.clone(),
                since: state.position,
                resume: state.token,
                config: state.requested,
            };
            (state.url.clone(), join.encode())
        };
        dispatch(&shared);
        let mut close_code = None;
        match WebSocket::open(&url) {
            Ok(socket) => {
                let (mut sink, mut stream) = socket.split();
                let (writer, mut outgoing) = unbounded::<Vec<u8>>();
                let _ = writer.unbounded_send(join);
                // gloo-net closes the socket only when both halves are dropped: when the writer
                // stops (its channel was closed), it tells the reader to stop too.
                let (writer_done, mut stop_reading) = oneshot::channel::<()>();
                wasm_bindgen_futures::spawn_local(async move {
                    while let Some(bytes) = outgoing.next().await {
                        if sink.send(Message::Bytes(bytes)).await.is_err() {
                            break;
                        }
                    }
                    drop(sink);
                    let _ = writer_done.send(());
                });
                while let Either::Left((Some(next), _)) =
                    future::select(stream.next(), &mut stop_reading).await
                {
                    match next {
                        Ok(Message::Bytes(bytes)) => {
                            shared.borrow_mut().handle(&bytes, &writer);
                            attempt = 0;
                            dispatch(&shared);
                        }
                        Ok(Message::Text(_)) => {}
                        Err(WebSocketError::ConnectionClose(event)) => {
                            close_code = Some((event.code, event.reason));
                            break;
                        }
                        Err(_) => break,
                    }
                    if shared.borrow().closed {
                        break;
                    }
                }
                drop(stream);
                writer.close_channel();
            }
            Err(e) => close_code = Some((1006, format!("{e:?}"))),
        }
        {
            let mut state = shared.borrow_mut();
            state.writer = None;
            if state.closed {
                break;
            }
            if let Some((code, reason)) = &close_code {
                if is_final(*code) {
                    state.closed = true;
                    let reason = format!("the relay closed the connection ({code}): {reason}");
                    if let Some(joined) = state.joined.take() {
                        let _ = joined.send(Err(reason));
                    }
                    state.set_status("closed");
                    drop(state);
                    dispatch(&shared);
                    break;
                }
            }
            state.set_status("reconnecting");
        }
        dispatch(&shared);
        attempt += 1;
        gloo_timers::future::TimeoutFuture::new(backoff(attempt)).await;
    }
    shared.borrow_mut().set_status("closed");
    dispatch(&shared);
}

/// A connection to a room through the relay, that survives disconnects.
///
/// ```js
/// const client = await MeshClient.connect({ url: "ws://127.0.0.1:8080/ws", room: "demo", name: "ada" });
/// client.on("message", ({ sender, step, data }) => console.log(sender, step, data));
/// client.on("anomaly", ({ reason, detail }) => console.warn(reason, detail));
/// client.broadcast({ temperature: 23.5 });
/// const text = client.text("content");
/// text.observe((delta, origin) => applyToEditor(delta));
/// text.insert(0, "hello");
/// ```
#[wasm_bindgen]
pub struct MeshClient {
    shared: Shared,
}

#[wasm_bindgen]
impl MeshClient {
    /// Connects to `url` and joins `room`; resolves once the welcome and the catch-up are in.
    /// Rejects with an `Error` if the options are invalid or the relay refuses the join.
    /// Afterwards the client reconnects by itself, with exponential backoff and jitter.
    #[wasm_bindgen(js_name = connect)]
    pub async fn connect(options: JsMeshClientOptions) -> Result<MeshClient, JsValue> {
        let options: Options = from_js("the options", options.into())?;
        if !options.url.starts_with("ws://") && !options.url.starts_with("wss://") {
            return Err(invalid_argument(format!(
                "url must start with ws:// or wss://, got {:?}",
                options.url
            )));
        }
        if options.room.is_empty() || options.room.len() > Limits::default().max_room {
            return Err(invalid_argument("room must be 1 to 128 bytes"));
        }
        let pattern = PatternConfig::default();
        let (joined, on_joined) = oneshot::channel();
        let shared = Rc::new(RefCell::new(State {
            url: options.url,
            room: options.room,
            name: options.name,
            requested: options.config,
            node: 0,
            token: None,
            position: 0,
            clock: StepClock::new(pattern),
            validator: Validator::new(ValidatorConfig::default()),
            outbox: VecDeque::new(),
            writer: None,
            status: "closed",
            closed: false,
            peers: BTreeMap::new(),
            doc: SharedDoc::new(),
            observed: HashMap::new(),
            deltas: Rc::default(),
            remote: Rc::default(),
            events: Vec::new(),
            listeners: Vec::new(),
            text_listeners: Vec::new(),
            next_listener: 1,
            joined: Some(joined),
        }));
        wasm_bindgen_futures::spawn_local(run(shared.clone()));
        match on_joined.await {
            Ok(Ok(())) => Ok(MeshClient { shared }),
            Ok(Err(reason)) => Err(js_error("ConnectError", reason)),
            Err(_) => Err(js_error(
                "ConnectError",
                "the client closed before it joined",
            )),
        }
    }

    /// This connection's node id, assigned by the relay.
    #[wasm_bindgen(getter)]
    pub fn node(&self) -> f64 {
        self.shared.borrow().node as f64
    }

    /// `"connecting"`, `"open"`, `"reconnecting"` or `"closed"`.
    #[wasm_bindgen(getter)]
    pub fn status(&self) -> String {
        self.shared.borrow().status.into()
    }

    /// The room step this client has reached.
    #[wasm_bindgen(getter)]
    pub fn step(&self) -> f64 {
        self.shared.borrow().clock.local() as f64
    }

    /// The other members present now: `[{ node, name }]`.
    #[wasm_bindgen(getter)]
    pub fn peers(&self) -> Result<super::types::JsPeers, JsValue> {
        Ok(to_js(&self.shared.borrow().peer_list())?.unchecked_into())
    }

    /// The digest of the document (every text), as 16 hex digits: what checkpoints compare.
    #[wasm_bindgen(getter)]
    pub fn digest(&self) -> String {
        format!("{:016x}", self.shared.borrow().doc.digest())
    }

    /// The document's version, as a Yjs state vector.
    #[wasm_bindgen(js_name = stateVector)]
    pub fn state_vector(&self) -> Vec<u8> {
        self.shared.borrow().doc.state_vector()
    }

    /// Messages sent and not yet acknowledged as stored.
    #[wasm_bindgen(getter, js_name = pendingCount)]
    pub fn pending_count(&self) -> usize {
        self.shared.borrow().outbox.len()
    }

    /// Sends any JSON value to the room, stamped with the next step and its pattern value.
    /// Returns the step. While disconnected the message waits in the outbox and is sent after
    /// the reconnect.
    pub fn broadcast(&self, data: JsJson) -> Result<f64, JsValue> {
        let data = json_from_js("the data", &data)?;
        let step = self
            .shared
            .borrow_mut()
            .send_stamped(|stamp| Frame::Data { stamp, data })?;
        dispatch(&self.shared);
        Ok(step as f64)
    }

    /// Sends ephemeral state (a cursor, a selection) to the others; never stored.
    #[wasm_bindgen(js_name = setPresence)]
    pub fn set_presence(&self, data: JsJson) -> Result<(), JsValue> {
        let data = json_from_js("the presence", &data)?;
        let state = self.shared.borrow();
        if let Some(writer) = &state.writer {
            let _ = writer.unbounded_send(
                Frame::Presence {
                    sender: state.node,
                    data,
                }
                .encode(),
            );
        }
        Ok(())
    }

    /// Sends raw bytes as they are, bypassing stamping: for tests and for demonstrating the
    /// relay's validation (a tampered frame comes back as an `anomaly`).
    #[wasm_bindgen(js_name = sendRaw)]
    pub fn send_raw(&self, bytes: &[u8]) -> Result<(), JsValue> {
        match &self.shared.borrow().writer {
            Some(writer) => {
                let _ = writer.unbounded_send(bytes.to_vec());
                Ok(())
            }
            None => Err(js_error("NotConnected", "the client is not connected")),
        }
    }

    /// Posts a snapshot of the whole document (every text) to the room. The relay then drops
    /// the document's older updates from its log; late joiners get the snapshot and what
    /// follows. Returns the step it was sent at.
    #[wasm_bindgen(js_name = postSnapshot)]
    pub fn post_snapshot(&self) -> Result<f64, JsValue> {
        let step = {
            let mut state = self.shared.borrow_mut();
            let snapshot = state.doc.snapshot();
            state.send_stamped(|stamp| Frame::Snapshot {
                stamp,
                doc: WHOLE_DOC.into(),
                state: snapshot,
            })?
        };
        dispatch(&self.shared);
        Ok(step as f64)
    }

    /// Runs a frame through this client's validation without applying it or recording it:
    /// returns `{ accepted: true }`, or reports an `anomaly` (source `"local"`) and returns
    /// `{ accepted: false, reason, detail }`. For demonstrating what a receiver does with a
    /// tampered frame the relay would never forward.
    pub fn inspect(&self, bytes: &[u8]) -> Result<super::types::JsVerdict, JsValue> {
        let mut state = self.shared.borrow_mut();
        let (reason, detail, step, sender) = match Frame::decode(bytes) {
            Err(e) => (e.reason(), e.to_string(), 0, None),
            Ok(frame) => {
                let Some(&stamp) = frame.stamp() else {
                    return Err(invalid_argument("only stamped frames are validated"));
                };
                let origin = Origin::Relayed {
                    receiver: state.node,
                };
                let local = state.clock.local();
                match state.validator.peek(&stamp, origin, local) {
                    Verdict::Accepted => return verdict(VerdictJs::ACCEPTED),
                    Verdict::Rejected(reason) => {
                        state.validator.record(reason);
                        let detail = state.validator.explain(&stamp, origin, local, reason);
                        (reason, detail, stamp.step, Some(stamp.sender))
                    }
                }
            }
        };
        state.anomaly("local", reason, detail.clone(), step, sender);
        drop(state);
        dispatch(&self.shared);
        verdict(VerdictJs::rejected(reason, detail))
    }

    /// Counts of this client's local verdicts: `{ accepted, patternMismatch, replay, ... }`.
    pub fn counts(&self) -> Result<super::types::JsVerdictCounts, JsValue> {
        counts_to_js(self.shared.borrow().validator.counters())
    }

    /// The shared text `name` of the room's document.
    pub fn text(&self, name: &str) -> Result<SharedText, JsValue> {
        if name.is_empty() || name.len() > Limits::default().max_name {
            return Err(invalid_argument("a text name must be 1 to 64 bytes"));
        }
        let mut state = self.shared.borrow_mut();
        if !state.observed.contains_key(name) {
            let deltas = state.deltas.clone();
            let remote = state.remote.clone();
            let text = name.to_owned();
            let id = state.doc.observe(name, move |delta| {
                deltas
                    .borrow_mut()
                    .push((text.clone(), delta, remote.get()));
            });
            state.observed.insert(name.to_owned(), id);
        }
        Ok(SharedText {
            shared: self.shared.clone(),
            name: name.to_owned(),
        })
    }

    /// Subscribes `listener` to `event` (`message`, `anomaly`, `peers`, `status`, `step`,
    /// `presence`); returns a function that unsubscribes it.
    #[wasm_bindgen(skip_typescript)]
    pub fn on(&self, event: &str, listener: js_sys::Function) -> Result<JsUnsubscribe, JsValue> {
        const EVENTS: [&str; 6] = ["message", "anomaly", "peers", "status", "step", "presence"];
        if !EVENTS.contains(&event) {
            return Err(invalid_argument(format!(
                "unknown event {event:?}; events are {}",
                EVENTS.join(", ")
            )));
        }
        let mut state = self.shared.borrow_mut();
        let id = state.next_listener;
        state.next_listener += 1;
        state.listeners.push(Listener {
            id,
            event: event.to_owned(),
            function: listener,
        });
        let weak = Rc::downgrade(&self.shared);
        let off = Closure::<dyn FnMut()>::new(move || {
            if let Some(shared) = weak.upgrade() {
                shared.borrow_mut().listeners.retain(|l| l.id != id);
            }
        });
        Ok(off.into_js_value().unchecked_into())
    }

    /// Removes a listener added with `on`.
    #[wasm_bindgen(skip_typescript)]
    pub fn off(&self, event: &str, listener: &js_sys::Function) {
        self.shared
            .borrow_mut()
            .listeners
            .retain(|l| !(l.event == event && l.function == *listener));
    }

    /// Drops the connection now, as a network failure would; the client reconnects by itself.
    /// For tests and demos of the reconnect path.
    #[wasm_bindgen(js_name = dropConnection)]
    pub fn drop_connection(&self) {
        if let Some(writer) = self.shared.borrow_mut().writer.take() {
            writer.close_channel();
        }
    }

    /// Closes the connection for good; no reconnect follows.
    pub fn close(&self) {
        let mut state = self.shared.borrow_mut();
        state.closed = true;
        if let Some(writer) = state.writer.take() {
            writer.close_channel();
        }
        state.set_status("closed");
        drop(state);
        dispatch(&self.shared);
    }
}

/// A text of the room's shared document; edits converge in every tab.
#[wasm_bindgen]
pub struct SharedText {
    shared: Shared,
    name: String,
}

#[wasm_bindgen]
impl SharedText {
    /// Inserts `text` at `index` (UTF-16 code units, as `selectionStart`). Throws `RangeError`
    /// past the end.
    pub fn insert(&self, index: u32, text: &str) -> Result<(), JsValue> {
        self.edit(|doc, name| doc.insert(name, index, text))
    }

    /// Deletes `length` code units from `index`. Throws `RangeError` past the end.
    pub fn delete(&self, index: u32, length: u32) -> Result<(), JsValue> {
        self.edit(|doc, name| doc.delete(name, index, length))
    }

    /// The text's current content.
    #[wasm_bindgen(js_name = toString)]
    pub fn to_js_string(&self) -> String {
        self.shared.borrow().doc.text(&self.name)
    }

    /// The length in UTF-16 code units.
    #[wasm_bindgen(getter)]
    pub fn length(&self) -> u32 {
        self.shared.borrow().doc.len(&self.name)
    }

    /// Calls `listener(delta, origin)` after every change, local or remote: `delta` is a list of
    /// `{ retain }`, `{ insert }` and `{ delete }` steps an editor applies without losing its
    /// cursor; `origin` is `"local"` or `"remote"`. Returns a function that unsubscribes.
    pub fn observe(&self, listener: JsTextListener) -> Result<JsUnsubscribe, JsValue> {
        let function: js_sys::Function = JsValue::from(listener)
            .dyn_into()
            .map_err(|_| invalid_argument("observe needs a function"))?;
        let mut state = self.shared.borrow_mut();
        let id = state.next_listener;
        state.next_listener += 1;
        state.text_listeners.push((id, self.name.clone(), function));
        let weak = Rc::downgrade(&self.shared);
        let off = Closure::<dyn FnMut()>::new(move || {
            if let Some(shared) = weak.upgrade() {
                shared
                    .borrow_mut()
                    .text_listeners
                    .retain(|(i, _, _)| *i != id);
            }
        });
        Ok(off.into_js_value().unchecked_into())
    }
}

impl SharedText {
    fn edit(
        &self,
        change: impl FnOnce(&SharedDoc, &str) -> Result<Vec<u8>, crate::doc::DocError>,
    ) -> Result<(), JsValue> {
        {
            let mut state = self.shared.borrow_mut();
            let update = change(&state.doc, &self.name).map_err(|e| js_error("RangeError", e))?;
            let doc = self.name.clone();
            state.send_stamped(|stamp| Frame::Update { stamp, doc, update })?;
        }
        dispatch(&self.shared);
        Ok(())
    }
}
