//! `MeshClient` and `SharedText`: the browser's driver of the core's client session.
//!
//! The protocol (join, catch-up, outbox, pacing, refusals and fences, reconnects, checkpoints,
//! sync) is the core's [`Session`]; this module only moves bytes over a WebSocket,
//! runs one timer for the session's next deadline, and turns the session's events into JS
//! listener calls.
//!
//! All state lives in one `Rc<RefCell<Driver>>` on the page's thread. Events are collected
//! during a change and dispatched after it, so a listener may call back into the client. The
//! one call into JS while the state is borrowed is the application's document (the `document`
//! option), whose observers run while a remote update is applied: a call into the client from
//! there throws a `BusyError` instead of touching the borrowed state.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use wasm_bindgen::prelude::*;

use super::errors::{
    bytes_arg, function_arg, invalid_argument, js_error, options_arg, quoted, string_arg, u32_arg,
};
use super::fatal::{panicked, register, stopped, Registration, Timer};
use super::frames::{
    json_from_js, message_to_js, peer_to_js, peers_to_js, presence_event_to_js, Object,
};
use super::pattern::room_config_arg;
use super::replica::{ClientDoc, JsDocument};
#[cfg(feature = "document")]
use super::storage::{OnHide, Storage};
#[cfg(feature = "document")]
use super::types::JsTextListener;
use super::types::{JsJson, JsMeshClientOptions, JsUnsubscribe};
use super::validator::{counts_to_js, verdict, VerdictJs};
use crate::doc::Replica as _;
#[cfg(feature = "document")]
use crate::doc::{SharedDoc, TextDelta};
use crate::session::{Event, Output, Session, SessionConfig, SessionError, Status};
#[cfg(feature = "document")]
use crate::vec_map::VecMap;
use crate::wire::{Limits, RoomConfig};

/// `MeshClient.connect`'s options.
struct Options {
    /// The relays, in the order they are tried (relays that share one store).
    urls: Vec<String>,
    room: String,
    name: String,
    config: Option<RoomConfig>,
    /// How long `connect` may take, in milliseconds (default 10 000).
    connect_timeout: Option<u32>,
    /// Milliseconds between heartbeats (default 15 000; 0: none).
    heartbeat: Option<u32>,
    /// The WebSocket class: the option's, or the global one.
    web_socket: js_sys::Function,
    /// Listeners registered before the join, so that they hear the catch-up.
    on: Vec<(&'static str, js_sys::Function)>,
    /// Keep the document and the session in IndexedDB (refused without the built-in document).
    #[cfg_attr(not(feature = "document"), allow(dead_code))]
    persist: bool,
    /// The access token, or what gives one before each connection.
    token: Token,
    /// The application's document, instead of the built-in one.
    document: Option<JsDocument>,
}

/// Where the access token comes from.
#[derive(Clone)]
enum Token {
    None,
    Fixed(String),
    /// Called before every connection; returns a string or a promise of one.
    Source(js_sys::Function),
}

impl Options {
    const KEYS: [&'static str; 11] = [
        "url",
        "room",
        "name",
        "config",
        "connectTimeout",
        "heartbeat",
        "WebSocket",
        "on",
        "persist",
        "token",
        "document",
    ];

    /// Reads the options, refusing unknown keys and values of the wrong type by name.
    fn from_js(value: &JsValue) -> Result<Self, JsValue> {
        options_arg("the options", value, &Self::KEYS)?;
        let field = |key: &str| super::errors::field(value, key);
        let on = match field("on")? {
            None => Vec::new(),
            Some(on) => {
                options_arg("on", &on, &EVENTS)?;
                let mut listeners = Vec::new();
                for event in EVENTS {
                    if let Ok(f) = js_sys::Reflect::get(&on, &event.into()) {
                        if !f.is_undefined() {
                            listeners.push((event, function_arg(&format!("on.{event}"), &f)?));
                        }
                    }
                }
                listeners
            }
        };
        let persist = match field("persist")? {
            None => false,
            Some(value) => value.as_bool().ok_or_else(|| {
                invalid_argument(format!(
                    "persist must be a boolean, got {}",
                    super::errors::what_it_is(&value)
                ))
            })?,
        };
        let token = match field("token")? {
            None => Token::None,
            Some(value) if value.is_function() => Token::Source(value.unchecked_into()),
            Some(value) => Token::Fixed(value.as_string().ok_or_else(|| {
                invalid_argument(format!(
                    "token must be a string or a function that returns one, got {}",
                    super::errors::what_it_is(&value)
                ))
            })?),
        };
        let document = field("document")?
            .map(|d| JsDocument::from_js(&d))
            .transpose()?;
        if persist && document.is_some() {
            return Err(invalid_argument(
                "persist keeps the built-in document; with the application's document, persist it beside the client (y-indexeddb for a Y.Doc)",
            ));
        }
        Ok(Options {
            on,
            persist,
            token,
            document,
            urls: urls_arg(&field("url")?.unwrap_or(JsValue::UNDEFINED))?,
            room: string_arg("room", &field("room")?.unwrap_or(JsValue::UNDEFINED))?,
            name: field("name")?
                .map(|v| string_arg("name", &v))
                .transpose()?
                .unwrap_or_default(),
            config: field("config")?
                .filter(|v| !v.is_null())
                .map(|v| room_config_arg("config", &v))
                .transpose()?,
            connect_timeout: field("connectTimeout")?
                .map(|v| u32_arg("connectTimeout", &v))
                .transpose()?,
            heartbeat: field("heartbeat")?
                .map(|v| u32_arg("heartbeat", &v))
                .transpose()?,
            web_socket: match field("WebSocket")? {
                // A class has a prototype object; an arrow function has none.
                Some(class)
                    if class.is_function()
                        && js_sys::Reflect::get(&class, &"prototype".into())
                            .is_ok_and(|p| p.is_object()) =>
                {
                    class.unchecked_into()
                }
                Some(class) => {
                    return Err(invalid_argument(format!(
                        "WebSocket must be a constructor, got {}",
                        super::errors::what_it_is(&class)
                    )))
                }
                None => js_sys::Reflect::get(&js_sys::global(), &"WebSocket".into())
                    .ok()
                    .and_then(|class| class.dyn_into().ok())
                    .ok_or_else(|| {
                        invalid_argument(
                            "this runtime has no global WebSocket (Node before 22): pass one as \
                             the WebSocket option, for example the ws package's",
                        )
                    })?,
            },
        })
    }
}

/// A text change for JS: `[{ retain: n } | { insert: text } | { delete: n }]`.
#[cfg(feature = "document")]
fn delta_to_js(delta: &[TextDelta]) -> Result<JsValue, JsValue> {
    let list = js_sys::Array::new();
    for op in delta {
        let object = match op {
            TextDelta::Retain(n) => Object::new().int("retain", (*n).into())?,
            TextDelta::Insert(text) => Object::new().string("insert", text)?,
            TextDelta::Delete(n) => Object::new().int("delete", (*n).into())?,
        };
        list.push(&object.into());
    }
    Ok(list.into())
}

/// The events a listener may subscribe to.
const EVENTS: [&str; 9] = [
    "message", "anomaly", "refused", "peers", "status", "step", "presence", "paced", "error",
];

struct Listener {
    id: u32,
    event: &'static str,
    function: js_sys::Function,
}

/// The socket, and its listener. Dropping it (a close, a reconnect, or the client let go of
/// without `close()`) closes the socket and keeps its later events from the listener, which
/// goes with it.
struct Socket {
    id: u64,
    raw: web_sys::WebSocket,
    /// What the session sent before the socket opened, in order; `None` once it is open.
    waiting: Option<Vec<Vec<u8>>>,
    _listener: Closure<dyn FnMut(u32, JsValue, JsValue)>,
}

impl Socket {
    fn close(self) {
        drop(self);
    }

    /// Sends `bytes` now, or once the socket is open. A send the socket refuses (it is
    /// closing) is dropped: its `close` event follows, and the session sends again what was
    /// not acknowledged.
    fn send(&mut self, bytes: Vec<u8>) {
        match &mut self.waiting {
            Some(waiting) => waiting.push(bytes),
            None => {
                let _ = self.raw.send_with_u8_array(&bytes);
            }
        }
    }

    /// The socket opened: what waited goes.
    fn opened(&mut self) {
        for bytes in self.waiting.take().unwrap_or_default() {
            let _ = self.raw.send_with_u8_array(&bytes);
        }
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        super::fatal::stop(&self.raw, 1000, "the client closed the connection");
    }
}

/// A change of the text named first, and whether it came from a remote update.
#[cfg(feature = "document")]
type TextChange = (String, Vec<TextDelta>, bool);

struct Driver {
    session: Session<ClientDoc>,
    /// The relays; the session says which one a connection goes to.
    urls: Vec<String>,
    /// The class sockets are made with.
    web_socket: js_sys::Function,
    socket: Option<Socket>,
    next_socket: u64,
    timer: Option<Timer>,
    /// What the panic hook needs of this client (see `fatal`).
    registration: Registration,
    timer_at: Option<u64>,
    /// The clock: milliseconds of `Date.now()` plus `skew`, never going back. When the system
    /// clock steps back, `skew` takes the step, so that the clock goes on from where it was
    /// (frozen instead, it would hold up heartbeats and retries for as long as the step).
    last_now: Cell<u64>,
    skew: Cell<u64>,
    #[cfg(feature = "document")]
    observed: VecMap<String, u64>,
    #[cfg(feature = "document")]
    deltas: Rc<RefCell<Vec<TextChange>>>,
    #[cfg(feature = "document")]
    remote: Rc<Cell<bool>>,
    calls: Vec<(&'static str, JsValue, Option<JsValue>)>,
    /// A dispatch of the calls is under way (see [`dispatch`]).
    dispatching: bool,
    listeners: Vec<Listener>,
    #[cfg(feature = "document")]
    text_listeners: Vec<(u32, String, js_sys::Function)>,
    next_listener: u32,
    /// `connect`'s promise until the first join: its resolve and reject functions.
    joined: Option<(js_sys::Function, js_sys::Function)>,
    /// With `persist`: the room's storage in IndexedDB (the built-in document's: the
    /// transport-only build has none).
    #[cfg(feature = "document")]
    storage: Option<Storage>,
    /// The access token's source, and how many connections were asked for (a token that comes
    /// after a newer connection was asked for is not used).
    token: Token,
    connects: u64,
    /// The next write, when one waits: a change that no message waits for, or a write that
    /// failed and is tried again.
    #[cfg(feature = "document")]
    retry: Option<Timer>,
    /// The next look for records that tabs closed since this one opened left unsent.
    #[cfg(feature = "document")]
    freed: Option<Timer>,
    /// Writes the next write at once when the page is hidden or goes away.
    #[cfg(feature = "document")]
    on_hide: Option<OnHide>,
}

type Shared = Rc<RefCell<Driver>>;

/// The `url` option: one relay's WebSocket URL, or a non-empty array of relays that share one
/// store, tried in turn.
fn urls_arg(value: &JsValue) -> Result<Vec<String>, JsValue> {
    if !js_sys::Array::is_array(value) {
        return Ok(vec![string_arg("url", value)?]);
    }
    let urls = js_sys::Array::from(value)
        .iter()
        .enumerate()
        .map(|(i, url)| string_arg(&format!("url[{i}]"), &url))
        .collect::<Result<Vec<_>, _>>()?;
    if urls.is_empty() {
        return Err(invalid_argument("url must name at least one relay"));
    }
    Ok(urls)
}

impl Driver {
    /// The URL of the relay the session connects to now.
    fn url(&self) -> &str {
        &self.urls[self.session.relay().min(self.urls.len() - 1)]
    }

    /// Hands the `error` listeners to the panic hook, which calls them.
    fn error_listeners_changed(&self) {
        self.registration.set_error_listeners(
            self.listeners
                .iter()
                .filter(|l| l.event == "error")
                .map(|l| l.function.clone())
                .collect(),
        );
    }

    fn now(&self) -> u64 {
        let raw = (js_sys::Date::now() as u64).saturating_add(self.skew.get());
        let last = self.last_now.get();
        if raw < last {
            self.skew.set(self.skew.get() + (last - raw));
        }
        let now = raw.max(last);
        self.last_now.set(now);
        now
    }

    /// After a repair, the texts observed on the document set aside (`old`) are observed on the
    /// new one, and each listener told of the change from one to the other.
    #[cfg(feature = "document")]
    fn reobserve(&mut self, old: Option<&SharedDoc>) {
        let Some(doc) = self.session.replica().built() else {
            return;
        };
        let observed = std::mem::take(&mut self.observed).entries().to_vec();
        for (name, id) in observed {
            let before = old.map_or(0, |old| {
                old.unobserve(&name, id);
                old.len(&name)
            });
            let after = doc.text(&name);
            let mut delta = Vec::new();
            if before > 0 {
                delta.push(TextDelta::Delete(before));
            }
            if !after.is_empty() {
                delta.push(TextDelta::Insert(after));
            }
            if !delta.is_empty() {
                self.deltas.borrow_mut().push((name.clone(), delta, true));
            }
            let (deltas, remote, text) = (self.deltas.clone(), self.remote.clone(), name.clone());
            let id = doc.observe(&name, move |delta| {
                deltas
                    .borrow_mut()
                    .push((text.clone(), delta, remote.get()));
            });
            self.observed.insert(name, id);
        }
    }

    /// The text listeners' calls for the text changes collected since the last dispatch:
    /// (listener, delta, origin).
    fn text_calls(&mut self) -> Vec<(js_sys::Function, JsValue, JsValue)> {
        #[cfg(feature = "document")]
        {
            let deltas = std::mem::take(&mut *self.deltas.borrow_mut());
            let mut calls = Vec::new();
            for (text, delta, remote) in deltas {
                let Ok(delta) = delta_to_js(&delta) else {
                    continue;
                };
                let origin = JsValue::from_str(if remote { "remote" } else { "local" });
                for (_, name, function) in &self.text_listeners {
                    if *name == text {
                        calls.push((function.clone(), delta.clone(), origin.clone()));
                    }
                }
            }
            calls
        }
        #[cfg(not(feature = "document"))]
        Vec::new()
    }

    fn call(&mut self, event: &'static str, value: JsValue) {
        self.calls.push((event, value, None));
    }

    /// Calls the listeners of `event` with the object `build` makes.
    fn call_object(
        &mut self,
        event: &'static str,
        build: impl FnOnce() -> Result<Object, JsValue>,
    ) {
        if let Ok(value) = build() {
            self.call(event, value.into());
        }
    }

    /// Turns the session's events into listener calls.
    fn events(&mut self) {
        for problem in self.session.replica().take_problems() {
            self.calls
                .push(("error", js_error("DocumentError", problem), None));
        }
        while let Some(event) = self.session.poll_event() {
            match event {
                Event::Status { status, reason } => {
                    match (status, self.joined.take()) {
                        (Status::Open, Some((resolve, _))) => {
                            let _ = resolve.call0(&JsValue::UNDEFINED);
                        }
                        (Status::Closed, Some((_, reject))) => {
                            let reason = JsValue::from_str(reason.as_deref().unwrap_or_default());
                            let _ = reject.call1(&JsValue::UNDEFINED, &reason);
                        }
                        (_, joined) => self.joined = joined,
                    }
                    let reason = reason.map(|r| JsValue::from_str(&r));
                    self.calls
                        .push(("status", JsValue::from_str(status.as_str()), reason));
                }
                Event::Message {
                    stamp,
                    data,
                    durable,
                } => {
                    if let Ok(value) = message_to_js(&stamp, &data, durable) {
                        self.call("message", value);
                    }
                }
                Event::Anomaly(a) => self.call_object("anomaly", || {
                    Object::new()
                        .string("source", a.source.as_str())?
                        .string("reason", a.reason.as_str())?
                        .string("detail", &a.detail)?
                        .int("step", a.step)?
                        .int_if("sender", a.sender)
                }),
                Event::Refused {
                    step,
                    kind,
                    doc,
                    reason,
                    detail,
                } => self.call_object("refused", || {
                    let object = Object::new()
                        .int("step", step)?
                        .string("kind", kind.as_str())?;
                    let object = match &doc {
                        Some(doc) => object.string("doc", doc)?,
                        None => object,
                    };
                    object
                        .string("reason", reason.as_str())?
                        .string("detail", &detail)
                }),
                Event::Peers {
                    peers,
                    joined,
                    left,
                    renamed,
                } => self.call_object("peers", || {
                    let mut object = Object::new().set("peers", &peers_to_js(&peers)?)?;
                    if let Some(joined) = &joined {
                        object = object.set("joined", &peer_to_js(joined)?)?;
                    }
                    object = object.int_if("left", left)?;
                    if let Some(renamed) = &renamed {
                        object = object.set("renamed", &peer_to_js(renamed)?)?;
                    }
                    Ok(object)
                }),
                Event::Step {
                    step,
                    pattern,
                    phase,
                } => self.call_object("step", || {
                    Object::new()
                        .int("step", step)?
                        .int("pattern", pattern)?
                        .int("phase", phase)
                }),
                Event::Presence { sender, data } => {
                    if let Ok(value) = presence_event_to_js(sender, &data) {
                        self.call("presence", value);
                    }
                }
                Event::Paced { wait, messages } => self.call_object("paced", || {
                    Object::new()
                        .int("waitMs", wait)?
                        .int("messages", messages as u64)
                }),
                Event::Remote => {}
            }
        }
    }
}

/// Carries out what the session asks (sockets, sends, the timer), then calls the listeners.
/// In an instance that panicked, nothing: its clients have stopped.
fn pump(shared: &Shared) {
    if panicked() {
        return;
    }
    loop {
        let output = {
            let mut driver = shared.borrow_mut();
            driver.events();
            driver.session.poll_output()
        };
        let Some(output) = output else { break };
        match output {
            Output::Connect => connect(shared),
            Output::Send(bytes) => {
                if let Some(socket) = &mut shared.borrow_mut().socket {
                    socket.send(bytes);
                }
            }
            Output::Disconnect { .. } => {
                if let Some(socket) = shared.borrow_mut().socket.take() {
                    socket.close();
                }
            }
            Output::Save =>
            {
                #[cfg(feature = "document")]
                if shared.borrow().session.awaits_store() {
                    save(shared);
                } else {
                    save_soon(shared);
                }
            }
        }
    }
    schedule(shared);
    {
        let driver = shared.borrow();
        driver.registration.pending.set(driver.session.pending());
        if driver.session.is_closed() {
            driver.registration.set_closed();
            #[cfg(feature = "document")]
            if let Some(storage) = driver.storage.as_ref().filter(|s| !s.released) {
                storage.closing();
            }
        }
    }
    dispatch(shared);
}

/// How long a change that no message waits for (the log position, a typed edit not yet
/// stamped) may wait to be written with the next ones.
#[cfg(feature = "document")]
const SAVE_DELAY_MS: u32 = 250;

/// Writes soon: changes that come meanwhile join the write.
#[cfg(feature = "document")]
fn save_soon(shared: &Shared) {
    let mut driver = shared.borrow_mut();
    if driver.retry.is_some() || driver.storage.is_none() {
        return;
    }
    let weak = Rc::downgrade(shared);
    driver.retry = Some(driver.registration.timeout(SAVE_DELAY_MS, move || {
        if let Some(shared) = weak.upgrade() {
            shared.borrow_mut().retry = None;
            save(&shared);
            dispatch(&shared);
        }
    }));
}

/// Writes what waits for a later write ([`save_soon`], or a failed write tried again) at once
/// whenever the page is hidden or goes away: a tab closed right after its last keystrokes, or
/// frozen in the background, may get no later turn to write them.
#[cfg(feature = "document")]
fn write_when_hidden(shared: &Shared) {
    let weak = Rc::downgrade(shared);
    let on_hide = OnHide::new(move || {
        // The module panicked: its state may be held mid-change, and its records went to the
        // next client (see `fatal`).
        if panicked() {
            return;
        }
        let Some(shared) = weak.upgrade() else { return };
        let due = shared.borrow_mut().retry.take().is_some();
        if due {
            save(&shared);
            dispatch(&shared);
        }
    });
    shared.borrow_mut().on_hide = Some(on_hide);
}

/// Writes the session and the document's new updates to storage, unless a write is under way
/// (then once more after it). Once the session is closed, the last write lets the record go if
/// storage may forget it (`Session::may_forget`: nothing left to send, and no document whose
/// log it must remember), and the tab's lock on it is released after it.
#[cfg(feature = "document")]
fn save(shared: &Shared) {
    // A client of a module that panicked writes nothing more: its records went to the next
    // client (see `fatal`).
    if panicked() {
        return;
    }
    let write = {
        let mut driver = shared.borrow_mut();
        let driver = &mut *driver;
        let Some(storage) = driver.storage.as_mut() else {
            return;
        };
        if storage.released {
            return;
        }
        if storage.writing {
            storage.wanted = true;
            return;
        }
        let saved = driver.session.saved();
        let stored = saved.stored();
        let over = driver.session.may_forget();
        let updates = driver.session.take_updates();
        let write = storage.write((!over).then_some(&saved), updates);
        (write, stored)
    };
    let weak = Rc::downgrade(shared);
    wasm_bindgen_futures::spawn_local(async move {
        let (write, stored) = write;
        let done = write.done().await;
        let Some(shared) = weak.upgrade() else { return };
        if panicked() {
            return;
        }
        let (compact, again) = {
            let mut driver = shared.borrow_mut();
            let now = driver.now();
            let driver = &mut *driver;
            let Some(storage) = driver.storage.as_mut() else {
                return;
            };
            // A write of the session before a repair: not what the session now holds.
            let superseded = storage.reset;
            let compact = storage.written(&done);
            let again = storage.wanted;
            let gone = done.error.as_ref().and_then(|_| storage.gone());
            if let Some(gone) = gone {
                // Another page deleted or upgraded the stored data, or the browser closed it:
                // said once, and the session goes on in memory (nothing waits for a write any
                // more).
                driver.calls.push((
                    "error",
                    js_error(
                        "StorageError",
                        format!("{gone}: this tab's edits are kept in memory only from now on"),
                    ),
                    None,
                ));
                driver.storage = None;
                driver.registration.set_storage(None);
                driver.session.stop_persisting(now);
                (false, false)
            } else if let Some(error) = done.error {
                // Nothing stamped after the failed write goes out; the write is tried again.
                driver.calls.push(("error", error, None));
                storage.wanted = true;
                let weak = Rc::downgrade(&shared);
                driver.retry = Some(driver.registration.timeout(1_000, move || {
                    if let Some(shared) = weak.upgrade() {
                        shared.borrow_mut().retry = None;
                        save(&shared);
                        dispatch(&shared);
                    }
                }));
                (false, false)
            } else {
                if !superseded {
                    driver.session.handle_saved(now, stored);
                }
                if !again && driver.session.is_closed() {
                    storage.release();
                }
                (compact, again)
            }
        };
        if compact {
            let promise = shared.borrow_mut().storage.as_mut().map(Storage::compact);
            if let Some(promise) = promise {
                wasm_bindgen_futures::spawn_local(async move {
                    // A compaction that fails leaves the records as they were.
                    let _ = wasm_bindgen_futures::JsFuture::from(promise).await;
                });
            }
        }
        if again {
            save(&shared);
        }
        pump(&shared);
    });
}

/// How often a tab with storage looks for records that tabs of its room left with messages
/// unsent when they closed (offline) while it was open.
#[cfg(feature = "document")]
const FREED_EVERY_MS: u32 = 5_000;

/// Looks for such records in `FREED_EVERY_MS`, then again, while the client is open: their
/// outboxes would otherwise wait for the next tab of the room to open.
#[cfg(feature = "document")]
fn look_for_freed(shared: &Shared) {
    let weak = Rc::downgrade(shared);
    let mut driver = shared.borrow_mut();
    driver.freed = Some(driver.registration.timeout(FREED_EVERY_MS, move || {
        let Some(shared) = weak.upgrade() else { return };
        let promise = {
            let driver = shared.borrow();
            match &driver.storage {
                // A member that may only read takes in no record (the relay would refuse every
                // write in it), and does not look until it may write: a record it claimed and
                // let go of would not be looked at again by this tab.
                Some(storage) if !storage.released && !driver.session.is_closed() => {
                    (!driver.session.read_only()).then(|| storage.freed())
                }
                _ => return,
            }
        };
        let Some(promise) = promise else {
            return look_for_freed(&shared);
        };
        let weak = Rc::downgrade(&shared);
        wasm_bindgen_futures::spawn_local(async move {
            // A look that fails leaves the records where they are, for the next one.
            let found = wasm_bindgen_futures::JsFuture::from(promise).await;
            let Some(shared) = weak.upgrade() else {
                if let Ok(found) = &found {
                    super::storage::release_found(found);
                }
                return;
            };
            if panicked() {
                return;
            }
            let taken = match found {
                Ok(found) => take_up(&shared, &found),
                Err(_) => false,
            };
            if taken {
                save(&shared);
                pump(&shared);
            }
            look_for_freed(&shared);
        });
    }));
}

/// Takes in the records [`look_for_freed`] claimed; returns whether any was.
#[cfg(feature = "document")]
fn take_up(shared: &Shared, found: &JsValue) -> bool {
    if panicked() {
        // The panic let go of what the look claimed.
        return false;
    }
    let mut driver = shared.borrow_mut();
    let now = driver.now();
    let driver = &mut *driver;
    let (session, remote) = (&mut driver.session, &driver.remote);
    let Some(storage) = driver.storage.as_mut() else {
        super::storage::release_found(found);
        return false;
    };
    let mut taken = false;
    let problems = storage.take_up(found, |saved| {
        // A member that may only read leaves the record to a tab that may write: the relay
        // would refuse every write in it.
        if session.is_closed() || session.read_only() || !saved.adoptable() {
            return false;
        }
        remote.set(true);
        session.take_in(now, saved);
        remote.set(false);
        taken = true;
        true
    });
    let broken = !problems.is_empty();
    for problem in problems {
        driver
            .calls
            .push(("error", js_error("StorageError", problem), None));
    }
    taken || broken
}

/// Sets the one timer to the session's next deadline.
fn schedule(shared: &Shared) {
    let mut driver = shared.borrow_mut();
    let next = driver.session.poll_timeout();
    if next == driver.timer_at {
        return;
    }
    driver.timer_at = next;
    driver.timer = next.map(|at| {
        let wait = at.saturating_sub(driver.now()).min(u64::from(u32::MAX)) as u32;
        let weak = Rc::downgrade(shared);
        driver.registration.timeout(wait, move || {
            if let Some(shared) = weak.upgrade() {
                {
                    let mut driver = shared.borrow_mut();
                    driver.timer = None;
                    driver.timer_at = None;
                    let now = driver.now();
                    driver.session.handle_timeout(now);
                }
                pump(&shared);
            }
        })
    });
}

/// Gets the access token, if any (calling the application's function), then opens a socket.
fn connect(shared: &Shared) {
    let (token, attempt) = {
        let mut driver = shared.borrow_mut();
        driver.connects += 1;
        (driver.token.clone(), driver.connects)
    };
    let source = match token {
        Token::None => return open(shared, None),
        Token::Fixed(token) => return open(shared, Some(&token)),
        Token::Source(source) => source,
    };
    let weak = Rc::downgrade(shared);
    wasm_bindgen_futures::spawn_local(async move {
        let token = async {
            let mut value = source.call0(&JsValue::NULL)?;
            if value.has_type::<js_sys::Promise>() {
                value =
                    wasm_bindgen_futures::JsFuture::from(value.unchecked_into::<js_sys::Promise>())
                        .await?;
            }
            value.as_string().ok_or_else(|| {
                JsValue::from_str(&format!(
                    "it gave {}, not a string",
                    super::errors::what_it_is(&value)
                ))
            })
        }
        .await;
        let Some(shared) = weak.upgrade() else { return };
        if shared.borrow().connects != attempt || shared.borrow().session.is_closed() {
            return;
        }
        match token {
            Ok(token) => open(&shared, Some(&token)),
            Err(e) => {
                let mut driver = shared.borrow_mut();
                let now = driver.now();
                let reason = format!("the token function failed: {}", super::errors::describe(&e));
                driver.session.handle_closed(now, 1006, &reason);
            }
        }
        pump(&shared);
    });
}

/// Opens a socket for the session (with `token` in its URL), with one listener that feeds the
/// session its frames and its close.
fn open(shared: &Shared, token: Option<&str>) {
    if panicked() {
        return;
    }
    let (url, shown, id, class) = {
        let mut driver = shared.borrow_mut();
        if let Some(old) = driver.socket.take() {
            old.close();
        }
        driver.next_socket += 1;
        let base = driver.url().to_owned();
        let url = match token {
            None => base.clone(),
            Some(token) => {
                let separator = if base.contains('?') { '&' } else { '?' };
                let token = String::from(js_sys::encode_uri_component(token));
                format!("{base}{separator}token={token}")
            }
        };
        // What messages name: the URL without the token.
        let shown = base;
        (url, shown, driver.next_socket, driver.web_socket.clone())
    };
    let raw = match js_sys::Reflect::construct(&class, &js_sys::Array::of1(&url.as_str().into())) {
        Ok(raw) => raw.unchecked_into::<web_sys::WebSocket>(),
        Err(e) => {
            let mut driver = shared.borrow_mut();
            let now = driver.now();
            let reason = format!("could not open {shown}: {}", super::errors::describe(&e));
            driver.session.handle_closed(now, 1006, &reason);
            return;
        }
    };
    let weak = Rc::downgrade(shared);
    let listener = Closure::<dyn FnMut(u32, JsValue, JsValue)>::new(
        move |kind: u32, data: JsValue, reason: JsValue| {
            let Some(shared) = weak.upgrade() else { return };
            socket_event(&shared, id, kind, data, reason);
        },
    );
    super::fatal::listen(&raw, listener.as_ref().unchecked_ref());
    let mut driver = shared.borrow_mut();
    driver.socket = Some(Socket {
        id,
        raw: raw.clone(),
        waiting: Some(Vec::new()),
        _listener: listener,
    });
    driver.registration.set_socket(Some(raw));
    driver.session.set_read_only(token.is_some_and(reads_only));
    let now = driver.now();
    driver.session.handle_connected(now);
}

/// An event of socket `id` (see `fatal::listen`): 0 it opened, 1 a message (`data`), 2 it
/// closed (`data` its code, `reason` its reason).
fn socket_event(shared: &Shared, id: u64, kind: u32, data: JsValue, reason: JsValue) {
    {
        let mut driver = shared.borrow_mut();
        let Some(socket) = driver.socket.as_mut().filter(|s| s.id == id) else {
            return;
        };
        match kind {
            0 => {
                socket.opened();
                return;
            }
            1 => {
                // Text messages are not part of the protocol.
                if !data.is_instance_of::<js_sys::ArrayBuffer>() {
                    return;
                }
                let bytes = js_sys::Uint8Array::new(&data).to_vec();
                let now = driver.now();
                #[cfg(feature = "document")]
                driver.remote.set(true);
                driver.session.handle_frame(now, &bytes);
                #[cfg(feature = "document")]
                driver.remote.set(false);
            }
            _ => {
                let opened = socket.waiting.is_none();
                if let Some(socket) = driver.socket.take() {
                    socket.close();
                }
                let now = driver.now();
                let code = data.as_f64().map_or(1006, |code| code as u16);
                let reason = reason.as_string().unwrap_or_default();
                let reason = match (reason.is_empty() && code == 1006, opened) {
                    (false, _) => reason,
                    (true, false) => format!("could not reach the relay at {}", driver.url()),
                    (true, true) => {
                        format!("the connection to the relay at {} was lost", driver.url())
                    }
                };
                driver.session.handle_closed(now, code, &reason);
            }
        }
    }
    pump(shared);
}

/// Whether `token`'s `access` claim is `read` (see [`crate::token`]): a token that does not
/// read is taken as one that may write, and the relay judges.
fn reads_only(token: &str) -> bool {
    crate::token::claims(token)
        .and_then(|json| String::from_utf8(json).ok())
        .and_then(|text| js_sys::JSON::parse(&text).ok())
        .and_then(|claims| js_sys::Reflect::get(&claims, &JsValue::from_str("access")).ok())
        .and_then(|access| access.as_string())
        .is_some_and(|access| access == "read")
}

/// Calls the listeners of every collected event and text change, after the state is released.
fn dispatch(shared: &Shared) {
    // One dispatch at a time: a listener that acts on the client (a repair, an edit) has what
    // it collects called by the dispatch under way, in order, after what that one took.
    if shared.borrow().dispatching {
        return;
    }
    shared.borrow_mut().dispatching = true;
    let _done = Dispatching(shared);
    loop {
        let (calls, text_calls, listeners) = {
            let mut driver = shared.borrow_mut();
            let calls = std::mem::take(&mut driver.calls);
            let text_calls = driver.text_calls();
            if calls.is_empty() && text_calls.is_empty() {
                return;
            }
            let listeners: Vec<(&'static str, js_sys::Function)> = driver
                .listeners
                .iter()
                .map(|l| (l.event, l.function.clone()))
                .collect();
            (calls, text_calls, listeners)
        };
        for (event, value, extra) in calls {
            for (name, function) in &listeners {
                if *name == event {
                    let result = match &extra {
                        Some(extra) => function.call2(&JsValue::NULL, &value, extra),
                        None => function.call1(&JsValue::NULL, &value),
                    };
                    if let Err(e) = result {
                        web_log(&e);
                    }
                }
            }
        }
        for (function, delta, origin) in text_calls {
            if let Err(e) = function.call2(&JsValue::NULL, &delta, &origin) {
                web_log(&e);
            }
        }
    }
}

/// Marks the end of a dispatch, however it ends.
struct Dispatching<'a>(&'a Shared);

impl Drop for Dispatching<'_> {
    fn drop(&mut self) {
        if let Ok(mut driver) = self.0.try_borrow_mut() {
            driver.dispatching = false;
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

/// A call into the client from code the client itself is running: an observer of the
/// application's document, while a remote update is applied to it.
fn busy() -> JsValue {
    js_error(
        "BusyError",
        "the client is applying a remote update to the document and cannot be used from its observers; call it after they return (queueMicrotask)",
    )
}

fn session_error(e: SessionError) -> JsValue {
    match e {
        SessionError::Closed => js_error("ClosedError", e),
        SessionError::TooLarge { .. } => js_error("RangeError", e),
        SessionError::StepOverflow => js_error("RangeError", e),
        SessionError::NameTooLong { .. } => invalid_argument(e),
        SessionError::ReadOnly => js_error("ForbiddenError", e),
        SessionError::ReservedName => invalid_argument(e),
    }
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
    /// Rejects with a `ConnectError` that says why if the relay cannot be reached or refuses
    /// the join within `connectTimeout` milliseconds (default 10 000), and with an
    /// `InvalidArgument` for invalid options. Afterwards the client reconnects by itself, with
    /// exponential backoff and jitter, and says so in `status` events. A panic in the module
    /// while it is pending rejects it with the `PanicError`.
    ///
    /// With `persist: true`, it resolves as soon as the document and the session stored in
    /// IndexedDB are loaded, online or not, and rejects with a `StorageError` if the page has
    /// no IndexedDB or Web Locks.
    #[wasm_bindgen(js_name = connect, unchecked_return_type = "Promise<MeshClient>")]
    pub fn connect(options: JsMeshClientOptions) -> js_sys::Promise {
        let mut settle = None;
        let promise = js_sys::Promise::new(&mut |resolve, reject| settle = Some((resolve, reject)));
        if let Some((resolve, reject)) = settle {
            // Registered at once: a panic before the join has even started (it starts in a
            // microtask), or while it loads the stored document, rejects the promise.
            let registration = register();
            registration.set_connecting(Some(reject.clone()));
            wasm_bindgen_futures::spawn_local(async move {
                let _ = match Self::join_registered(options, registration).await {
                    Ok(client) => resolve.call1(&JsValue::NULL, &client.into()),
                    Err(e) => reject.call1(&JsValue::NULL, &e),
                };
            });
        }
        promise
    }
}

impl MeshClient {
    /// The client's state, or a `BusyError` while the client is applying a remote update to
    /// the application's document (whose observers run inside that call).
    fn driver(&self) -> Result<std::cell::Ref<'_, Driver>, JsValue> {
        if panicked() {
            return Err(stopped());
        }
        self.shared.try_borrow().map_err(|_| busy())
    }

    /// The client's state for a change; a `BusyError` as for [`MeshClient::driver`].
    fn driver_mut(&self) -> Result<std::cell::RefMut<'_, Driver>, JsValue> {
        if panicked() {
            return Err(stopped());
        }
        self.shared.try_borrow_mut().map_err(|_| busy())
    }

    /// What `connect` does, for Rust callers; `reject` is the JS promise's, for the panic hook.
    pub async fn join(
        options: JsMeshClientOptions,
        reject: Option<&js_sys::Function>,
    ) -> Result<MeshClient, JsValue> {
        let registration = register();
        registration.set_connecting(reject.cloned());
        Self::join_registered(options, registration).await
    }

    /// [`MeshClient::join`] with the client's registration for the panic hook, which holds the
    /// pending connect's rejection.
    async fn join_registered(
        options: JsMeshClientOptions,
        registration: Registration,
    ) -> Result<MeshClient, JsValue> {
        if panicked() {
            return Err(stopped());
        }
        let options = Options::from_js(&options.into())?;
        if let Some(url) = options
            .urls
            .iter()
            .find(|url| !url.starts_with("ws://") && !url.starts_with("wss://"))
        {
            return Err(invalid_argument(format!(
                "url must start with ws:// or wss://, got {}",
                quoted(url)
            )));
        }
        let limits = Limits::default();
        if options.room.is_empty() || options.room.len() > limits.max_room {
            return Err(invalid_argument("room must be 1 to 128 bytes"));
        }
        if options.name.len() > limits.max_name {
            return Err(invalid_argument("name must be at most 64 bytes"));
        }
        #[cfg_attr(not(feature = "document"), allow(unused_mut))]
        let mut replica = match options.document {
            Some(document) => ClientDoc::Js(document),
            #[cfg(feature = "document")]
            None => ClientDoc::Built(SharedDoc::new()),
            #[cfg(not(feature = "document"))]
            None => {
                return Err(invalid_argument(
                    "this build of pattern-mesh (transport) has no document of its own: pass the document option (pattern-mesh/transport/yjs makes one from a Y.Doc)",
                ))
            }
        };
        #[cfg(feature = "document")]
        let mut storage = None;
        #[cfg_attr(not(feature = "document"), allow(unused_mut))]
        let mut problems: Vec<String> = Vec::new();
        #[cfg(feature = "document")]
        if options.persist {
            // The first relay names the storage: the same list finds the same storage.
            // An open of the database that waits behind another page gives up after 10 s.
            let holds = super::storage::holds();
            registration.set_storage(Some(holds.stop()));
            // A member whose token says it may only read leaves the records with writes in them
            // to a tab that may write (a token function's token is not known yet).
            let read_only = matches!(&options.token, Token::Fixed(token) if reads_only(token));
            let loaded =
                super::storage::open(&options.urls[0], &options.room, 10_000, holds, read_only)
                    .await?;
            if panicked() {
                // The module panicked while the stored document loaded: this client stops
                // with the others (the panic let go of the records it had claimed).
                return Err(stopped());
            }
            let mut loaded = loaded;
            // Not where a record of the room owes the stored document to a relay that lost the
            // room's history: it may be the only copy of everyone's edits.
            // An edit of the stored document was refused for good (by this record's tab, or by
            // another tab's, open or not): it shows what the room does not hold. It is not
            // loaded: the room's document is, from the start of the log, with the outbox's
            // edits (see `Saved::set_aside_document`).
            let diverged = loaded.diverged || loaded.saved.as_ref().is_some_and(|s| s.diverged);
            match (diverged && !loaded.owed).then_some(loaded.saved.as_mut()) {
                Some(saved) => {
                    let outbox = saved.map(|s| s.set_aside_document()).unwrap_or_default();
                    for update in &outbox {
                        if let Err(e) = replica.apply_update(update) {
                            problems.push(format!("an unsent stored edit did not apply: {e}"));
                        }
                    }
                    loaded.storage.set_aside(outbox);
                    problems.push(
                        "the stored document had diverged from the room's (an edit of it was refused for good, so it showed what no one else has): it was set aside, and the room's document loads instead"
                            .into(),
                    );
                }
                None => {
                    for update in &loaded.updates {
                        if let Err(e) = replica.apply_update(update) {
                            problems.push(format!("a stored update did not apply: {e}"));
                        }
                    }
                }
            }
            problems.extend(loaded.problems);
            storage = Some((loaded.storage, loaded.saved));
        }
        #[cfg(feature = "document")]
        let persist = storage.is_some();
        #[cfg(not(feature = "document"))]
        let persist = false;
        let mut config = SessionConfig::new(options.room, options.name);
        config.room_config = options.config;
        config.persist = persist;
        config.fresh_tokens = matches!(options.token, Token::Source(_));
        config.relays = options.urls.len();
        #[cfg(feature = "document")]
        let storage = storage.map(|(storage, saved)| {
            config.restore = saved;
            storage
        });
        if let Some(ms) = options.heartbeat {
            config.heartbeat = u64::from(ms);
        }
        if let Some(ms) = options.connect_timeout {
            config.connect_timeout = u64::from(ms);
        }
        config.seed = (js_sys::Math::random() * 9_007_199_254_740_991.0) as u64;
        let now = js_sys::Date::now() as u64;
        let mut joined = None;
        let on_joined =
            js_sys::Promise::new(&mut |resolve, reject| joined = Some((resolve, reject)));
        let shared = Rc::new(RefCell::new(Driver {
            session: Session::new(config, replica, now),
            urls: options.urls,
            web_socket: options.web_socket,
            socket: None,
            next_socket: 0,
            timer: None,
            registration,
            timer_at: None,
            last_now: Cell::new(now),
            skew: Cell::new(0),
            #[cfg(feature = "document")]
            observed: VecMap::new(),
            #[cfg(feature = "document")]
            deltas: Rc::default(),
            #[cfg(feature = "document")]
            remote: Rc::default(),
            calls: Vec::new(),
            dispatching: false,
            listeners: Vec::new(),
            #[cfg(feature = "document")]
            text_listeners: Vec::new(),
            next_listener: 1,
            // With `persist`, `connect` does not wait for the join (and a rejection no one
            // waits for would go unhandled).
            joined: joined.filter(|_| !persist),
            #[cfg(feature = "document")]
            storage,
            #[cfg(feature = "document")]
            retry: None,
            #[cfg(feature = "document")]
            freed: None,
            #[cfg(feature = "document")]
            on_hide: None,
            token: options.token,
            connects: 0,
        }));
        {
            let mut driver = shared.borrow_mut();
            for (event, function) in options.on {
                let id = driver.next_listener;
                driver.next_listener += 1;
                driver.listeners.push(Listener {
                    id,
                    event,
                    function,
                });
            }
            driver.error_listeners_changed();
            for problem in problems {
                driver
                    .calls
                    .push(("error", js_error("StorageError", problem), None));
            }
            if persist {
                // Settled now: the stored document is loaded.
                driver.registration.set_connecting(None);
            }
        }
        pump(&shared);
        #[cfg(feature = "document")]
        if persist {
            look_for_freed(&shared);
            write_when_hidden(&shared);
        }
        if persist {
            // Offline first: the stored document is there now; `status` events say when the
            // relay is reached.
            return Ok(MeshClient { shared });
        }
        let joined = wasm_bindgen_futures::JsFuture::from(on_joined).await;
        if panicked() {
            return Err(stopped());
        }
        shared.borrow().registration.set_connecting(None);
        match joined {
            Ok(_) => Ok(MeshClient { shared }),
            Err(reason) => Err(js_error(
                "ConnectError",
                reason.as_string().unwrap_or_default(),
            )),
        }
    }
}

#[wasm_bindgen]
impl MeshClient {
    /// This client's node id, assigned by the relay.
    #[wasm_bindgen(getter)]
    pub fn node(&self) -> Result<f64, JsValue> {
        Ok(self.driver()?.session.node() as f64)
    }

    /// `"connecting"`, `"open"`, `"reconnecting"` or `"closed"`.
    #[wasm_bindgen(getter, unchecked_return_type = "Status")]
    pub fn status(&self) -> Result<String, JsValue> {
        Ok(self.driver()?.session.status().as_str().into())
    }

    /// The room step this client has reached.
    #[wasm_bindgen(getter)]
    pub fn step(&self) -> Result<f64, JsValue> {
        Ok(self.driver()?.session.step() as f64)
    }

    /// The other members present now: `[{ node, name }]`.
    #[wasm_bindgen(getter)]
    pub fn peers(&self) -> Result<super::types::JsPeers, JsValue> {
        Ok(peers_to_js(&self.driver()?.session.peers())?.unchecked_into())
    }

    /// The latest presence of each peer present that has set one: `[{ node, name, data }]`. A
    /// `presence` event says whose changed; one with `data: null` that a peer left.
    pub fn presence(&self) -> Result<super::types::JsPresences, JsValue> {
        let driver = self.driver()?;
        let peers = driver.session.peers();
        let list = js_sys::Array::new();
        for (&node, data) in driver.session.presences().iter() {
            let name = peers
                .iter()
                .find(|p| p.node == node)
                .map_or("", |p| p.name.as_str());
            let entry = Object::new()
                .int("node", node)?
                .string("name", name)?
                .set("data", &super::frames::json_to_js(data)?)?;
            list.push(&entry.into());
        }
        Ok(list.unchecked_into())
    }

    /// The digest of the document (every text), as 16 hex digits: what checkpoints compare.
    #[wasm_bindgen(getter)]
    pub fn digest(&self) -> Result<String, JsValue> {
        Ok(format!(
            "{:016x}",
            self.driver()?.session.replica().digest()
        ))
    }

    /// The document's version, as a Yjs state vector.
    #[wasm_bindgen(js_name = stateVector)]
    pub fn state_vector(&self) -> Result<Vec<u8>, JsValue> {
        Ok(self.driver()?.session.replica().state_vector())
    }

    /// Whether an edit of the document will never reach the room: the relay refused it for good
    /// (a `refused` event of kind `update`: a room at its size limit, a read-only token the
    /// client did not hold yet when the edit was made: see [`MeshClient::read_only`]). The
    /// document then shows what no other member sees, and the relay refuses the later edits
    /// that come after it; a client that loads the room anew shares edits again. With
    /// `persist` the flag is stored, and a client that opens a stored document that diverged
    /// sets it aside and loads the room's (an `error` event says so).
    #[wasm_bindgen(getter)]
    pub fn diverged(&self) -> Result<bool, JsValue> {
        Ok(self.driver()?.session.diverged())
    }

    /// Repairs a document that diverged ([`MeshClient::diverged`]) in place: the refused edit
    /// is set aside with the document that shows it, and the room's document loads again from
    /// the start of the room's log, with the edits of the outbox, over a new connection (a
    /// `status` event says why). Each text's listeners get a change from the text set aside to
    /// the new one, then the room's as it loads; texts and listeners stay as they are. With
    /// `persist`, the stored document is replaced too. Returns `false`, changing nothing, when
    /// there is nothing to repair: the document has not diverged, or a relay that lost the
    /// room's history is owed it (it may be the only copy of everyone's edits: it goes back
    /// first). Throws a `DocumentError` for the application's document (repair that one).
    pub fn repair(&self) -> Result<bool, JsValue> {
        #[cfg(feature = "document")]
        {
            let repaired = {
                let mut driver = self.driver_mut()?;
                if driver.session.replica().built().is_none() {
                    return Err(js_error(
                        "DocumentError",
                        "this client carries the application's document (the document option): repair that one",
                    ));
                }
                let now = driver.now();
                let fresh = ClientDoc::Built(SharedDoc::new());
                match driver.session.repair(now, fresh).map_err(session_error)? {
                    None => false,
                    Some(repaired) => {
                        // Closed now: its close must not reach the new session (with a token
                        // function, the new socket waits for the token).
                        if let Some(old) = driver.socket.take() {
                            old.close();
                        }
                        if let Some(storage) = driver.storage.as_mut() {
                            storage.set_aside(repaired.outbox);
                        }
                        driver.reobserve(repaired.set_aside.built());
                        true
                    }
                }
            };
            if repaired {
                pump(&self.shared);
            }
            Ok(repaired)
        }
        #[cfg(not(feature = "document"))]
        Err(js_error(
            "DocumentError",
            "this build of pattern-mesh (transport) has no document of its own: repair the application's",
        ))
    }

    /// Whether this member may only read the room: the access token of the current connection
    /// says `"access": "read"`, or the relay refused a write of this connection as `forbidden`.
    /// Then the texts' `insert` and `delete` throw a `ForbiddenError` and change nothing (an
    /// editor may turn read-only). The relay judges every write all the same.
    #[wasm_bindgen(getter, js_name = readOnly)]
    pub fn read_only(&self) -> Result<bool, JsValue> {
        Ok(self.driver()?.session.read_only())
    }

    /// Messages not yet acknowledged as stored (sent, or waiting to be sent).
    #[wasm_bindgen(getter, js_name = pendingCount)]
    pub fn pending_count(&self) -> Result<usize, JsValue> {
        Ok(self.driver()?.session.pending())
    }

    /// Sends any JSON value to the room. It is stamped with the room's next step when it goes
    /// out: at once, or after a reconnect (it waits in the outbox meanwhile), or when the
    /// relay's rate allows; the relay stores it, and late joiners get it. With `{ durable:
    /// false }` (game ticks, cursors) the relay only passes it on to the members present: it is
    /// never stored, replayed or sent again, and it is dropped (`broadcast` returns `false`)
    /// when the client is not connected. Returns whether the message was queued. Throws
    /// `ClosedError` after `close()`.
    pub fn broadcast(
        &self,
        data: JsJson,
        options: Option<super::types::JsBroadcastOptions>,
    ) -> Result<bool, JsValue> {
        let durable = match options {
            None => true,
            Some(options) => {
                let options = JsValue::from(options);
                options_arg("the broadcast options", &options, &["durable"])?;
                match js_sys::Reflect::get(&options, &"durable".into())? {
                    v if v.is_undefined() => true,
                    v => v.as_bool().ok_or_else(|| {
                        invalid_argument(format!(
                            "durable must be a boolean, got {}",
                            super::errors::what_it_is(&v)
                        ))
                    })?,
                }
            }
        };
        let data = json_from_js("the data", &data)?;
        let queued = {
            let mut driver = self.driver_mut()?;
            let now = driver.now();
            if durable {
                driver.session.broadcast(now, data).map(|()| true)
            } else {
                driver.session.broadcast_signal(now, data)
            }
            .map_err(session_error)?
        };
        pump(&self.shared);
        Ok(queued)
    }

    /// Sets this client's ephemeral state (a cursor, a selection); sent now and to every
    /// newcomer, never stored. It goes as one frame: throws `RangeError` for a state over the
    /// relay's frame limit (1 MiB by default); one set before the relay said its limit and over
    /// it is dropped with a `refused` event (kind `presence`).
    #[wasm_bindgen(js_name = setPresence)]
    pub fn set_presence(&self, data: JsJson) -> Result<(), JsValue> {
        let data = json_from_js("the presence", &data)?;
        {
            let mut driver = self.driver_mut()?;
            let now = driver.now();
            driver
                .session
                .set_presence(now, data)
                .map_err(session_error)?;
        }
        pump(&self.shared);
        Ok(())
    }

    /// Changes this client's display name for every peer (a `peers` event with `renamed` on
    /// their side), and in every later join. Throws `InvalidArgument` for a name over 64 bytes,
    /// `ClosedError` after `close()`.
    #[wasm_bindgen(js_name = setName)]
    pub fn set_name(
        &self,
        #[wasm_bindgen(unchecked_param_type = "string")] name: JsValue,
    ) -> Result<(), JsValue> {
        let name = string_arg("name", &name)?;
        {
            let mut driver = self.driver_mut()?;
            let now = driver.now();
            driver.session.set_name(now, &name).map_err(session_error)?;
        }
        pump(&self.shared);
        Ok(())
    }

    /// Sends raw bytes as they are, bypassing stamping: for tests and for demonstrating the
    /// relay's validation (a tampered frame comes back as an `anomaly`).
    #[wasm_bindgen(js_name = sendRaw)]
    pub fn send_raw(
        &self,
        #[wasm_bindgen(unchecked_param_type = "Uint8Array")] bytes: JsValue,
    ) -> Result<(), JsValue> {
        let bytes = bytes_arg("bytes", &bytes)?;
        let sent = self.driver_mut()?.session.send_raw(bytes);
        pump(&self.shared);
        if sent {
            Ok(())
        } else {
            Err(js_error("NotConnected", "the client is not connected"))
        }
    }

    /// Runs a frame through this client's validation without applying it or recording it:
    /// returns `{ accepted: true }`, or reports an `anomaly` (source `"local"`) and returns
    /// `{ accepted: false, reason, detail }`. For demonstrating what a receiver does with a
    /// tampered frame the relay would never forward.
    pub fn inspect(
        &self,
        #[wasm_bindgen(unchecked_param_type = "Uint8Array")] bytes: JsValue,
    ) -> Result<super::types::JsVerdict, JsValue> {
        let bytes = bytes_arg("bytes", &bytes)?;
        let refused = self.driver_mut()?.session.inspect(&bytes);
        pump(&self.shared);
        match refused {
            None => verdict(VerdictJs::ACCEPTED),
            Some((reason, detail)) => verdict(VerdictJs::rejected(reason, detail)),
        }
    }

    /// Counts of this client's local verdicts: `{ accepted, patternMismatch, replay, ... }`.
    pub fn counts(&self) -> Result<super::types::JsVerdictCounts, JsValue> {
        counts_to_js(self.driver()?.session.counters())
    }

    /// Sends `update`, a Yjs v1 update of the document named `doc` (1 to 64 bytes) that the
    /// application made: with the application's document (the `document` option), one it has
    /// applied already; with the built-in document, it is applied first. It goes into the outbox
    /// like any edit, merged with the updates of `doc` waiting before it where the document can
    /// merge; an update of deletions only that is larger than the relay accepts goes in pieces.
    /// Throws `RangeError` for an update larger than the relay accepts, `DocumentError`
    /// for bytes the built-in document cannot apply, `ClosedError` after `close()`.
    #[wasm_bindgen(js_name = sendUpdate)]
    pub fn send_update(
        &self,
        #[wasm_bindgen(unchecked_param_type = "string")] doc: JsValue,
        #[wasm_bindgen(unchecked_param_type = "Uint8Array")] update: JsValue,
    ) -> Result<(), JsValue> {
        let doc = string_arg("doc", &doc)?;
        let update = bytes_arg("update", &update)?;
        if doc.is_empty() || doc.len() > Limits::default().max_name {
            return Err(invalid_argument("a document name must be 1 to 64 bytes"));
        }
        {
            let mut driver = self.driver_mut()?;
            if driver.session.is_closed() {
                return Err(session_error(SessionError::Closed));
            }
            // The built-in document takes no edit of a member that may only read (the
            // application's own document has it already: the session refuses it, and says so).
            #[cfg(feature = "document")]
            if driver.session.replica().built().is_some() {
                driver.session.check_edit(&doc).map_err(session_error)?;
            }
            // With the built-in document: bytes that decode, then the outbox (which refuses an
            // update too large), then the document, so that neither takes what the other refused.
            // A copy for the built-in document only: the application's has the update already.
            #[cfg(feature = "document")]
            let for_built = match driver.session.replica().built() {
                Some(_) => {
                    crate::doc::check_update(&update).map_err(|e| js_error("DocumentError", e))?;
                    Some(update.clone())
                }
                None => None,
            };
            let now = driver.now();
            driver
                .session
                .update(now, &doc, update)
                .map_err(session_error)?;
            #[cfg(feature = "document")]
            if let (Some(built), Some(update)) = (driver.session.replica().built(), for_built) {
                if let Err(e) = built.apply_update(&update) {
                    driver
                        .calls
                        .push(("error", js_error("DocumentError", e), None));
                }
            }
        }
        pump(&self.shared);
        Ok(())
    }

    /// The shared text `name` of the room's document. Throws `DocumentError` when the client
    /// carries the application's document (the `document` option): edit that one instead.
    #[cfg(feature = "document")]
    pub fn text(
        &self,
        #[wasm_bindgen(unchecked_param_type = "string")] name: JsValue,
    ) -> Result<SharedText, JsValue> {
        let name = string_arg("name", &name)?;
        let name = name.as_str();
        if self.driver()?.session.is_closed() {
            return Err(session_error(SessionError::Closed));
        }
        if name.is_empty() || name.len() > Limits::default().max_name {
            return Err(invalid_argument("a text name must be 1 to 64 bytes"));
        }
        if name == crate::wire::WHOLE_DOC {
            return Err(session_error(SessionError::ReservedName));
        }
        let mut driver = self.driver_mut()?;
        let Some(built) = driver.session.replica().built() else {
            return Err(js_error(
                "DocumentError",
                "this client carries the application's document (the document option): edit that one",
            ));
        };
        if !driver.observed.keys().any(|observed| observed == name) {
            let deltas = driver.deltas.clone();
            let remote = driver.remote.clone();
            let text = name.to_owned();
            let id = built.observe(name, move |delta| {
                deltas
                    .borrow_mut()
                    .push((text.clone(), delta, remote.get()));
            });
            driver.observed.insert(name.to_owned(), id);
        }
        Ok(SharedText {
            shared: self.shared.clone(),
            name: name.to_owned(),
        })
    }

    /// Subscribes `listener` to `event` (`message`, `anomaly`, `refused`, `peers`, `status`,
    /// `step`, `presence`, `error`); returns a function that unsubscribes it. A `status`
    /// listener also gets the reason as its second argument when the status is not `open`. An
    /// `error` listener gets an `Error` named `PanicError` if the module panics (see `fatal`).
    #[wasm_bindgen(skip_typescript)]
    pub fn on(&self, event: JsValue, listener: JsValue) -> Result<JsUnsubscribe, JsValue> {
        let event = string_arg("event", &event)?;
        let listener = function_arg("listener", &listener)?;
        let Some(&event) = EVENTS.iter().find(|e| **e == event) else {
            return Err(invalid_argument(format!(
                "unknown event {}; events are {}",
                quoted(&event),
                EVENTS.join(", ")
            )));
        };
        let mut driver = self.driver_mut()?;
        let id = driver.next_listener;
        driver.next_listener += 1;
        driver.listeners.push(Listener {
            id,
            event,
            function: listener,
        });
        driver.error_listeners_changed();
        let weak = Rc::downgrade(&self.shared);
        let off = Closure::<dyn FnMut()>::new(move || {
            if let Some(shared) = weak.upgrade() {
                let mut driver = shared.borrow_mut();
                driver.listeners.retain(|l| l.id != id);
                driver.error_listeners_changed();
            }
        });
        Ok(off.into_js_value().unchecked_into())
    }

    /// Removes a listener added with `on`.
    #[wasm_bindgen(skip_typescript)]
    pub fn off(&self, event: JsValue, listener: JsValue) -> Result<(), JsValue> {
        let event = string_arg("event", &event)?;
        function_arg("listener", &listener)?;
        let mut driver = self.driver_mut()?;
        driver
            .listeners
            .retain(|l| !(l.event == event && JsValue::from(l.function.clone()) == listener));
        driver.error_listeners_changed();
        Ok(())
    }

    /// Drops the connection now, as a network failure would; the client reconnects by itself.
    /// For tests and demos of the reconnect path.
    #[wasm_bindgen(js_name = dropConnection)]
    pub fn drop_connection(&self) -> Result<(), JsValue> {
        {
            let mut driver = self.driver_mut()?;
            let now = driver.now();
            driver.session.disconnect(now);
        }
        pump(&self.shared);
        Ok(())
    }

    /// Panics inside the module while this client's state is borrowed, as a bug in an update's
    /// integration would: for the tests of what a panic leaves behind (see `fatal`). Not part
    /// of the API.
    #[doc(hidden)]
    #[wasm_bindgen(js_name = "__panicForTests", skip_typescript)]
    pub fn panic_for_tests(&self, message: &str) {
        let _driver = self.shared.borrow_mut();
        panic!("{message}");
    }

    /// Closes the connection for good; no reconnect follows.
    pub fn close(&self) -> Result<(), JsValue> {
        {
            let mut driver = self.driver_mut()?;
            let now = driver.now();
            driver.session.close(now);
        }
        pump(&self.shared);
        // The last write: the outbox that is left, for the next tab of this room. A write put
        // off until later is this one: one after it would write over a record that another tab
        // may own by then.
        #[cfg(feature = "document")]
        {
            let mut driver = self.shared.borrow_mut();
            driver.retry = None;
            driver.freed = None;
            drop(driver);
            save(&self.shared);
        }
        Ok(())
    }
}

/// A text of the room's shared document; edits converge in every tab.
#[cfg(feature = "document")]
#[wasm_bindgen]
pub struct SharedText {
    shared: Shared,
    name: String,
}

#[cfg(feature = "document")]
#[wasm_bindgen]
impl SharedText {
    /// Inserts `text` at `index` (UTF-16 code units, as `selectionStart`). Throws `RangeError`
    /// past the end or for a text larger than the relay accepts (64 MiB by default),
    /// `ForbiddenError` for a member that may only read (see `MeshClient.readOnly`), and
    /// `ClosedError` after `close()`.
    pub fn insert(
        &self,
        #[wasm_bindgen(unchecked_param_type = "number")] index: JsValue,
        #[wasm_bindgen(unchecked_param_type = "string")] text: JsValue,
    ) -> Result<(), JsValue> {
        let index = u32_arg("index", &index)?;
        let text = string_arg("text", &text)?;
        let text = text.as_str();
        self.state()?
            .session
            .check_insert(&self.name, text.len())
            .map_err(session_error)?;
        self.edit(|doc, name| doc.insert(name, index, text))
    }

    /// Deletes `length` code units from `index`. Throws `RangeError` past the end, and
    /// `ForbiddenError` for a member that may only read.
    pub fn delete(
        &self,
        #[wasm_bindgen(unchecked_param_type = "number")] index: JsValue,
        #[wasm_bindgen(unchecked_param_type = "number")] length: JsValue,
    ) -> Result<(), JsValue> {
        let index = u32_arg("index", &index)?;
        let length = u32_arg("length", &length)?;
        self.edit(|doc, name| doc.delete(name, index, length))
    }

    /// The text's current content. An embed a Yjs application put in the text (an image, a
    /// shared type) reads as one U+FFFC, the one position it takes, as in the deltas.
    #[wasm_bindgen(js_name = toString)]
    pub fn to_js_string(&self) -> Result<String, JsValue> {
        let driver = self.state()?;
        Ok(driver
            .session
            .replica()
            .built()
            .map(|doc| doc.text(&self.name))
            .unwrap_or_default())
    }

    /// The length in UTF-16 code units.
    #[wasm_bindgen(getter)]
    pub fn length(&self) -> Result<u32, JsValue> {
        let driver = self.state()?;
        Ok(driver
            .session
            .replica()
            .built()
            .map_or(0, |doc| doc.len(&self.name)))
    }

    /// Calls `listener(delta, origin)` after every change, local or remote: `delta` is a list of
    /// `{ retain }`, `{ insert }` and `{ delete }` steps an editor applies without losing its
    /// cursor; `origin` is `"local"` or `"remote"`. Returns a function that unsubscribes.
    pub fn observe(&self, listener: JsTextListener) -> Result<JsUnsubscribe, JsValue> {
        let function: js_sys::Function = JsValue::from(listener)
            .dyn_into()
            .map_err(|_| invalid_argument("observe needs a function"))?;
        let mut driver = self.state()?;
        if driver.session.is_closed() {
            return Err(session_error(SessionError::Closed));
        }
        let id = driver.next_listener;
        driver.next_listener += 1;
        driver
            .text_listeners
            .push((id, self.name.clone(), function));
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

#[cfg(feature = "document")]
impl SharedText {
    /// The client's state, as [`MeshClient::driver_mut`] gives it (a `PanicError` once the
    /// module panicked, a `BusyError` while it applies a remote update).
    fn state(&self) -> Result<std::cell::RefMut<'_, Driver>, JsValue> {
        if panicked() {
            return Err(stopped());
        }
        self.shared.try_borrow_mut().map_err(|_| busy())
    }

    fn edit(
        &self,
        change: impl FnOnce(&SharedDoc, &str) -> Result<Vec<u8>, crate::doc::DocError>,
    ) -> Result<(), JsValue> {
        {
            let mut driver = self.state()?;
            driver
                .session
                .check_edit(&self.name)
                .map_err(session_error)?;
            let Some(doc) = driver.session.replica().built() else {
                return Err(js_error(
                    "DocumentError",
                    "this client has no built-in document",
                ));
            };
            let update = change(doc, &self.name).map_err(|e| js_error("RangeError", e))?;
            let now = driver.now();
            driver
                .session
                .update(now, &self.name, update)
                .map_err(session_error)?;
        }
        pump(&self.shared);
        Ok(())
    }
}
