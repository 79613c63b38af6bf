//! A panic inside the module, and how the page recovers from it.
//!
//! `wasm32-unknown-unknown` aborts on a panic: the call traps, and the instance's state (a
//! `RefCell` left borrowed, a half-applied update) cannot be trusted again. So the panic hook
//! does four things before the trap, none of which needs that state:
//!
//! - it closes every client's socket with close code 4000 and a reason, so the relay sees the
//!   member leave, and keeps the socket's events from the dead instance's listeners (see
//!   [`listen`]);
//! - it clears every client's timers, for the same reason;
//! - it lets go of the Web Locks on the session records of every client that persists its
//!   room, so that the tab's next client (or another tab) takes in what their outboxes still
//!   held;
//! - from a timer, in a task of its own, it has wasm-bindgen replace the instance
//!   ([`wasm_bindgen::handler::schedule_reinit`], then a call into the module). Not sooner:
//!   wasm-bindgen replaces the instance at the start of the next call into the module, after
//!   the check that an object is not stale, so the first call made until then (from a
//!   microtask, say, or the caller of a listener in which the panic happened, which goes on
//!   with the listener's error) would run in the fresh instance with pointers into the dead
//!   one. Until the timer, such calls run in the dead instance, where every client has
//!   stopped: they throw a `PanicError` and do nothing ([`panicked`]);
//! - it calls every open client's `error` listeners, from a timer, with an `Error` named
//!   `PanicError` that says what failed and how many messages had not been acknowledged, and
//!   rejects a `connect` still pending with it.
//!
//! The hook is installed when the module starts ([`install`]), so a panic in any class (a
//! `SharedDocument`, a `Validator`) leaves a module that works again too.
//!
//! Afterwards the module works again: `MeshClient.connect` joins the room anew and loads the
//! document from the relay. Objects of the dead instance throw when used.
//!
//! What lives here is kept apart from each client's state, in plain JS values, because a
//! panic usually happens while that state is borrowed.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;

use wasm_bindgen::prelude::*;

#[wasm_bindgen(inline_js = "
export function pmListen(socket, listener) {
  socket.binaryType = 'arraybuffer';
  const on = (kind) => (event) => {
    if (socket.pmStopped) return;
    if (kind === 1) listener(1, event.data);
    else if (kind === 2) listener(2, event.code, event.reason);
    else listener(0);
  };
  socket.addEventListener('open', on(0));
  socket.addEventListener('message', on(1));
  socket.addEventListener('close', on(2));
  // A close event follows each error (what failed is in its code and reason). Heard here, an
  // error is not thrown: the ws package's socket is an EventEmitter, for which an error event
  // nobody listens to throws, and ends a Node process.
  socket.addEventListener('error', () => {});
}
export function pmStop(socket, code, reason) {
  socket.pmStopped = true;
  try { socket.close(code, reason); } catch (_) {}
}
export function pmAfterPanic(reinit, message, clients) {
  console.error(`pattern-mesh: ${message}`);
  setTimeout(() => {
    // In a task of its own, once no code of the dead instance is on the stack: the dead
    // instance asks wasm-bindgen for a fresh one, and the constructor call makes it.
    try { reinit.__pmReinit(); new reinit(); } catch (_) {}
    for (const [listeners, error, reject] of clients) {
      if (reject) reject(error);
      if (listeners.length === 0 && !reject) console.error(error);
      for (const listener of listeners) {
        try { listener(error); } catch (e) { console.error(e); }
      }
    }
  }, 0);
}
")]
extern "C" {
    /// Sets the socket's binary type to `ArrayBuffer` and calls `listener` with its events
    /// until [`stop`] has stopped it: `(0)` it opened, `(1, data)` a message, `(2, code,
    /// reason)` it closed. Its `error` events are heard and left out: a `close` event follows
    /// each.
    #[wasm_bindgen(js_name = pmListen)]
    pub(crate) fn listen(socket: &web_sys::WebSocket, listener: &js_sys::Function);
    /// Closes the socket, and keeps every later event of it from the client's listener: once
    /// the client has let go of a socket, the listener is gone, and calling it would throw.
    #[wasm_bindgen(js_name = pmStop)]
    pub(crate) fn stop(socket: &web_sys::WebSocket, code: u16, reason: &str);
    #[wasm_bindgen(js_name = pmAfterPanic)]
    fn after_panic(reinit: &JsValue, message: &str, clients: &js_sys::Array);
}

#[wasm_bindgen]
extern "C" {
    #[wasm_bindgen(js_name = setTimeout)]
    fn set_timeout(handler: &js_sys::Function, ms: i32) -> JsValue;
    #[wasm_bindgen(js_name = clearTimeout)]
    fn clear_timeout(id: &JsValue);
}

/// What the panic hook needs of one live client.
struct Live {
    id: u32,
    socket: Option<web_sys::WebSocket>,
    /// Its pending timers (the session's deadline, a delayed write, the look for records
    /// closed tabs left): each leaves the list when its [`Timer`] is dropped.
    timers: Vec<JsValue>,
    errors: Vec<js_sys::Function>,
    pending: Rc<Cell<usize>>,
    /// Closed for good: its socket is stopped, its listeners hear nothing more.
    closed: bool,
    /// The rejection of its `connect`, while that is pending.
    connecting: Option<js_sys::Function>,
    /// Lets go of the locks on its stored session records, when it persists the room.
    storage: Option<js_sys::Function>,
}

thread_local! {
    static LIVE: RefCell<Vec<Live>> = const { RefCell::new(Vec::new()) };
    static NEXT: Cell<u32> = const { Cell::new(1) };
    /// A class of this module: constructing one is a call into the module, which makes
    /// wasm-bindgen replace a dead instance.
    static REINIT: RefCell<Option<JsValue>> = const { RefCell::new(None) };
}

static HOOK: Once = Once::new();

/// A client's entry in the registry the panic hook reads; removed when dropped.
pub(crate) struct Registration {
    id: u32,
    /// How many messages wait for the relay's acknowledgement, as of the last change.
    pub(crate) pending: Rc<Cell<usize>>,
}

/// Installs the panic hook, once per instance: when the module starts, so that a panic in any
/// of its classes leaves a module that works again.
#[wasm_bindgen(start)]
pub fn install() {
    HOOK.call_once(|| {
        let class = super::PatternGenerator::new(None)
            .ok()
            .map(JsValue::from)
            .and_then(|g| js_sys::Reflect::get(&g, &"constructor".into()).ok());
        REINIT.with(|r| *r.borrow_mut() = class);
        // No hook to chain to: std's own prints nothing on this target (and keeping it keeps
        // its backtrace and thread-name printing in the module, about 2 KB).
        std::panic::set_hook(Box::new(move |info| {
            let payload = info.payload();
            let what = payload
                .downcast_ref::<&str>()
                .copied()
                .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
                .unwrap_or("a panic");
            match info.location() {
                Some(at) => on_panic(&format!("{what}, at {at}")),
                None => on_panic(what),
            }
        }));
    });
}

/// Registers a client for the panic hook.
pub(crate) fn register() -> Registration {
    install();
    let id = NEXT.with(|n| n.replace(n.get() + 1));
    let pending = Rc::new(Cell::new(0));
    LIVE.with(|live| {
        live.borrow_mut().push(Live {
            id,
            socket: None,
            timers: Vec::new(),
            errors: Vec::new(),
            pending: pending.clone(),
            closed: false,
            connecting: None,
            storage: None,
        })
    });
    Registration { id, pending }
}

impl Registration {
    fn with(&self, f: impl FnOnce(&mut Live)) {
        LIVE.with(|live| {
            if let Some(entry) = live.borrow_mut().iter_mut().find(|l| l.id == self.id) {
                f(entry);
            }
        });
    }

    /// The socket the client uses now.
    pub(crate) fn set_socket(&self, socket: Option<web_sys::WebSocket>) {
        self.with(|l| l.socket = socket);
    }

    /// The client closed for good.
    pub(crate) fn set_closed(&self) {
        self.with(|l| l.closed = true);
    }

    /// The rejection of the client's pending `connect`, or `None` once it settled.
    pub(crate) fn set_connecting(&self, reject: Option<js_sys::Function>) {
        self.with(|l| l.connecting = reject);
    }

    /// What lets go of the locks on the client's stored session records (see
    /// `storage::Holds::stop`); `None` once its storage went.
    #[cfg(feature = "document")]
    pub(crate) fn set_storage(&self, stop: Option<js_sys::Function>) {
        self.with(|l| l.storage = stop);
    }

    /// The client's `error` listeners.
    pub(crate) fn set_error_listeners(&self, listeners: Vec<js_sys::Function>) {
        self.with(|l| l.errors = listeners);
    }

    /// Runs `callback` once after `ms` milliseconds, unless the returned timer is dropped
    /// first (or the module panics).
    pub(crate) fn timeout(&self, ms: u32, callback: impl FnOnce() + 'static) -> Timer {
        let closure = Closure::once(callback);
        let id = set_timeout(
            closure.as_ref().unchecked_ref(),
            ms.min(i32::MAX as u32) as i32,
        );
        self.with(|l| l.timers.push(id.clone()));
        Timer {
            id,
            client: self.id,
            _closure: closure,
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        LIVE.with(|live| {
            if let Ok(mut live) = live.try_borrow_mut() {
                live.retain(|l| l.id != self.id);
            }
        });
    }
}

/// A pending `setTimeout`, cleared when dropped.
pub(crate) struct Timer {
    id: JsValue,
    /// The registration it is listed in.
    client: u32,
    _closure: Closure<dyn FnMut()>,
}

impl Drop for Timer {
    fn drop(&mut self) {
        clear_timeout(&self.id);
        LIVE.with(|live| {
            if let Ok(mut live) = live.try_borrow_mut() {
                if let Some(entry) = live.iter_mut().find(|l| l.id == self.client) {
                    entry.timers.retain(|id| *id != self.id);
                }
            }
        });
    }
}

/// Whether this instance panicked: it is dead, and a fresh one replaces it at the next task.
/// Every client of it has stopped; calls on them throw, and nothing of them touches the
/// network, the timers or storage again.
pub(crate) fn panicked() -> bool {
    PANICKED.load(Ordering::Relaxed)
}

/// The error a call on a client of a dead instance throws.
pub(crate) fn stopped() -> JsValue {
    let error = js_sys::Error::new(
        "the client stopped after an internal error (see the PanicError); connect again, from the next task on (the module is replaced then), to rejoin the room",
    );
    error.set_name("PanicError");
    error.into()
}

static PANICKED: AtomicBool = AtomicBool::new(false);

fn on_panic(message: &str) {
    // A second panic of the dead instance (a call on it before the fresh one replaces it)
    // tells no one again, and asks for no second fresh instance.
    if PANICKED.swap(true, Ordering::Relaxed) {
        return;
    }
    let live = LIVE.with(|live| {
        live.try_borrow_mut()
            .map(|mut l| std::mem::take(&mut *l))
            .unwrap_or_default()
    });
    let clients = js_sys::Array::new();
    for client in &live {
        if let Some(socket) = &client.socket {
            stop(socket, 4000, "the client stopped after an internal error");
        }
        for timer in &client.timers {
            clear_timeout(timer);
        }
        if let Some(stop) = &client.storage {
            let _ = stop.call0(&JsValue::NULL);
        }
        if client.closed {
            continue;
        }
        let unsent = client.pending.get();
        let error = js_sys::Error::new(&if client.storage.is_some() {
            format!(
                "the client stopped after an internal error ({message}); {unsent} message(s) \
                 not yet acknowledged by the relay: the next client of this room that persists \
                 sends those this one had stored; connect again to rejoin the room"
            )
        } else {
            format!(
                "the client stopped after an internal error ({message}); {unsent} message(s) \
                 not yet acknowledged by the relay were not delivered; connect again to rejoin \
                 the room"
            )
        });
        error.set_name("PanicError");
        let _ = js_sys::Reflect::set(&error, &"unsent".into(), &(unsent as f64).into());
        let listeners: js_sys::Array = client.errors.iter().collect();
        let reject = client
            .connecting
            .clone()
            .map_or(JsValue::NULL, JsValue::from);
        clients.push(&js_sys::Array::of3(&listeners, &error, &reject));
    }
    let reinit = REINIT.with(|r| r.try_borrow().ok().and_then(|r| r.clone()));
    after_panic(&reinit.unwrap_or(JsValue::UNDEFINED), message, &clients);
    // The sockets and closures are dropped with the instance; leaking them here keeps their
    // destructors (which would call into JS again) from running during the panic.
    std::mem::forget(live);
}
