//! The client's storage in IndexedDB (`MeshClient.connect({ persist: true })`): the room's
//! document and each tab's session, so that a tab that closes loses nothing it had stored and a
//! tab that reopens shows its text at once, offline.
//!
//! The database `pattern-mesh` has two object stores, both keyed by room (the relay's URL and
//! the room's name):
//!
//! - `updates`: the document as the Yjs updates applied to it, appended in the order they were
//!   applied. Every tab of the room appends to the same list, so their states merge; none
//!   overwrites another's. When the list grows long it is replaced by its merge, in one
//!   transaction that reads, merges and deletes exactly the records it merged.
//! - `sessions`: one record per tab, what [`Saved`] holds: the node's identity and resume token,
//!   its log position and its outbox. A tab holds a Web Lock named after its record for as long
//!   as it lives; a tab that opens takes a record whose lock is free (a tab that closed), or a
//!   new one. The outboxes of further free records join its own (they would otherwise wait for
//!   another tab to open), and so do those of records freed later, while it lives: it looks
//!   for them every few seconds.
//!
//! Each write puts the session record and appends the document's new updates in one
//! transaction, so the two always agree; the session sends a message only after the write that
//! holds its stamp completed (see the core's `saved` module).
//!
//! A tab whose stored document diverged from the room's (an edit of it was refused for good:
//! the record says so beside its state) sets it aside when it opens (see
//! `Saved::set_aside_document`), and its first write replaces the room's updates. The
//! replacement starts a new epoch of the document: every update record carries the epoch it
//! was written in, and every session record the epoch its log position counts in. A record of
//! an earlier epoch (another tab's, live or closed, whose position counted in the document set
//! aside) catches up from the start of the log when it is opened: the replacement may not hold
//! yet what came before its position.

use std::collections::VecDeque;

use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::JsFuture;

use super::errors::js_error;
use crate::saved::Saved;

#[wasm_bindgen(inline_js = r#"
const request = (r) => new Promise((resolve, reject) => {
  r.onsuccess = () => resolve(r.result);
  r.onerror = () => reject(r.error);
});
const finished = (tx) => new Promise((resolve, reject) => {
  tx.oncomplete = () => resolve();
  tx.onerror = () => reject(tx.error);
  tx.onabort = () => reject(tx.error ?? new Error("the transaction was aborted"));
});
// The Web Locks one client holds; `stop` lets go of all of them, and of any it would take
// after: the module panicked, and the records go to the tab's next client, or another tab.
// Nothing is written under stopped holds, and what an open or a look for freed records claimed
// as they were stopped is not handed back (the dead instance's tasks run on until the module
// is replaced).
const STOPPED = "the module stopped after a panic: this client writes nothing more";
// How long a write may take before it is given up and tried again.
const WRITE_LIMIT_MS = 10_000;
export function pmStorageHolds() {
  const holds = { locks: new Set(), stopped: false };
  holds.stop = () => {
    holds.stopped = true;
    for (const release of holds.locks) release();
  };
  return holds;
}
const lock = (name, holds) => new Promise((resolve) => {
  if (holds.stopped) return resolve(null);
  navigator.locks.request(`pattern-mesh ${name}`, { ifAvailable: true }, (held) => {
    if (!held || holds.stopped) return resolve(null);
    // Held until the returned function is called (or the tab goes).
    return new Promise((done) => {
      const release = () => {
        holds.locks.delete(release);
        done();
        if (holds.locks.size === 0) holds.onEmpty?.();
      };
      holds.locks.add(release);
      resolve(release);
    });
  }).catch(() => resolve(null));
});
// The latest epoch of the document that `records` (update or session records) were written in;
// records written before epochs existed count as the first, 0.
const latest = (records) => records.reduce((epoch, record) => Math.max(epoch, record.epoch ?? 0), 0);
export function pmStorageMissing() {
  if (typeof indexedDB === "undefined") return "this runtime has no IndexedDB";
  if (!globalThis.navigator?.locks) {
    return "this page has no Web Locks API (it needs a secure context: https, or http on localhost)";
  }
  return null;
}
// A new session record's id, under its lock: without it, the record would look free to the other
// tabs of the room, which take in such a record's outbox while this tab still sends it.
export async function pmStorageNewRecord(room, holds) {
  const id = `${room}\n${Date.now().toString(36)}${Math.random().toString(36).slice(2)}`;
  const release = await lock(id, holds);
  if (!release) throw new Error("the Web Lock of this tab's new session record could not be taken");
  return [id, release];
}
// The clients of this page that closed and still hold records, by room: their last write is
// under way, and they let go of their records after it.
const closing = new Map();
export function pmStorageClosing(holds, room) {
  if (holds.closing) return;
  holds.closing = new Promise((resolve) => {
    holds.onEmpty = resolve;
    if (holds.locks.size === 0) resolve();
  });
  const clients = closing.get(room) ?? new Set();
  closing.set(room, clients);
  clients.add(holds);
  holds.closing.then(() => {
    clients.delete(holds);
    if (clients.size === 0 && closing.get(room) === clients) closing.delete(room);
  });
}
export async function pmStorageOpen(room, wait, holds) {
  // A client of the room this page closed a moment ago (an application that closes and
  // connects again) still holds its record while its last write completes: taken now, the
  // record would look held by a live tab, and a new one would be made beside it, which holds
  // none of what the closed client had not sent. Its record is waited for, a while.
  const waiting = [...(closing.get(room) ?? [])].map((other) => other.closing);
  if (waiting.length > 0) {
    let timer;
    await Promise.race([Promise.all(waiting), new Promise((resolve) => { timer = setTimeout(resolve, wait); })]);
    clearTimeout(timer);
  }
  const deadline = Date.now() + wait;
  const open = indexedDB.open("pattern-mesh", 1);
  open.onupgradeneeded = () => {
    const db = open.result;
    db.createObjectStore("updates", { autoIncrement: true }).createIndex("room", "room");
    db.createObjectStore("sessions", { keyPath: "id" }).createIndex("room", "room");
  };
  // An open waits behind a deletion or an upgrade of the database that another page's open
  // connection holds up: it gives up after `wait` ms instead of waiting for good.
  const db = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      open.onsuccess = () => open.result.close();
      reject(new Error(`the database did not open within ${wait} ms (a deletion or an upgrade of it waits for another tab)`));
    }, wait);
    open.onsuccess = () => { clearTimeout(timer); resolve(open.result); };
    open.onerror = () => { clearTimeout(timer); reject(open.error); };
  });
  // Another page deletes or upgrades the database (an application clearing its data): this
  // connection steps aside, and this tab's next write says so. The browser may also close it
  // (the user cleared the site's data, a Clear-Site-Data response, the storage failed): the
  // same, with its own reason. `pmGone` holds the reason.
  db.onversionchange = () => { db.pmGone = "another tab deleted or upgraded the stored data"; db.close(); };
  db.onclose = () => { db.pmGone ??= "the browser closed the stored data (the site's data was cleared, or the storage failed)"; };
  // Reading the room's records waits behind another page's write on the stores for as long as
  // that write goes on: within the same time limit as the open, or not at all.
  let late = false;
  const reading = readRoom(db, room, holds, () => late);
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => {
      late = true;
      reject(new Error(`the stored data was not read within ${wait} ms (another page holds a write on it)`));
    }, Math.max(0, deadline - Date.now()));
  });
  try {
    return await Promise.race([reading, timeout]);
  } catch (e) {
    if (late) {
      // What the reading claims once it completes is let go then.
      reading.then(([, claimed]) => { for (const [, , release] of claimed) release(); db.close(); }, () => {});
    }
    throw e;
  } finally {
    clearTimeout(timer);
  }
}
async function readRoom(db, room, holds, late) {
  const tx = db.transaction(["sessions", "updates"], "readonly");
  const records = request(tx.objectStore("sessions").index("room").getAll(room));
  const updates = request(tx.objectStore("updates").index("room").getAll(room));
  const [sessions, stored] = [await records, await updates];
  // The document's epoch: the latest any of its records was written in (a session record keeps
  // it where a tab of an older version merged the updates without it).
  const epoch = Math.max(latest(stored), latest(sessions));
  const claimed = [];
  try {
    for (const record of sessions) {
      const release = await lock(record.id, holds);
      if (!release) continue;
      // [id, state, release, diverged, epoch]
      const entry = [record.id, null, release, false, 0];
      claimed.push(entry);
      // Read again under the lock: its last owner may have written it, or let it go for
      // good, between the first read and its lock.
      const fresh = await request(db.transaction("sessions", "readonly").objectStore("sessions").get(record.id));
      if (fresh) {
        entry[1] = fresh.saved;
        entry[3] = fresh.diverged === true;
        entry[4] = fresh.epoch ?? 0;
      } else {
        claimed.pop()[2]();
      }
    }
  } catch (e) {
    // No record stays locked by an open that failed.
    for (const [, , release] of claimed) release();
    db.close();
    throw e;
  }
  if (claimed.length === 0) {
    try {
      const [id, release] = await pmStorageNewRecord(room, holds);
      claimed.push([id, null, release, false, epoch]);
    } catch (e) {
      db.close();
      throw e;
    }
  }
  if (holds.stopped || late()) {
    for (const [, , release] of claimed) release();
    db.close();
    throw new Error(STOPPED);
  }
  // Every record's state, the claimed or not (a live tab's), for what they owe; and whether one
  // of this epoch diverged (the document is one per room: its refused edit is in it).
  const diverged = sessions.some((record) => record.diverged === true && (record.epoch ?? 0) === epoch);
  // The records of the document's epoch that live tabs hold: their outboxes' edits are in the
  // stored document this tab shows.
  const mine = new Set(claimed.map(([id]) => id));
  const live = sessions.filter((record) => !mine.has(record.id) && (record.epoch ?? 0) === epoch).map((record) => record.saved);
  return [db, claimed, stored.map((record) => record.update), epoch, sessions.map((record) => record.saved), diverged, live];
}
export async function pmStorageFreed(db, room, known, holds) {
  if (db.pmGone || holds.stopped) return [];
  const ids = await request(db.transaction("sessions", "readonly").objectStore("sessions").index("room").getAllKeys(room));
  const taken = [];
  for (const id of ids) {
    if (known.includes(id)) continue;
    const release = await lock(id, holds);
    if (!release) continue;
    try {
      // Read under the lock: a client closed with nothing left to keep deleted it.
      const fresh = await request(db.transaction("sessions", "readonly").objectStore("sessions").get(id));
      if (fresh) taken.push([id, fresh.saved, release, fresh.diverged === true, fresh.epoch ?? 0]);
      else release();
    } catch (e) {
      release();
      for (const [, , held] of taken) held();
      throw e;
    }
  }
  // Stopped while it looked: what it took was let go.
  return holds.stopped ? [] : taken;
}
export function pmStorageGone(db) {
  return db.pmGone ?? null;
}
export async function pmStorageWrite(db, room, id, saved, diverged, epoch, updates, drop, replace, holds) {
  if (holds.stopped) throw new Error(STOPPED);
  if (db.pmGone) throw new Error(db.pmGone);
  try {
    // Strict: the session sends what this write covers once it completes, so it must be on
    // disk by then (browsers default to relaxed, which may lose the last writes to a crash).
    const tx = db.transaction(["sessions", "updates"], "readwrite", { durability: "strict" });
    const sessions = tx.objectStore("sessions");
    const store = tx.objectStore("updates");
    const write = () => {
      if (saved) sessions.put({ id, room, saved, diverged, epoch });
      else sessions.delete(id);
      for (const other of drop) sessions.delete(other);
      for (const update of updates) store.add({ room, update, epoch });
    };
    if (replace) {
      // The room's stored document goes, in the write that stores its replacement: a new
      // epoch, past every one the room's records know (another tab may have replaced the
      // document since this one opened), which starts with an empty update (so that the epoch
      // is there to read before any update is).
      const others = sessions.index("room").getAll(room);
      others.onsuccess = () => {
        epoch = latest(others.result);
        const cursor = store.index("room").openCursor(room);
        cursor.onsuccess = () => {
          const at = cursor.result;
          if (at) {
            epoch = Math.max(epoch, at.value.epoch ?? 0);
            at.delete();
            at.continue();
            return;
          }
          epoch += 1;
          store.add({ room, update: new Uint8Array([0, 0]), epoch });
          write();
          if (leaving) tx.commit?.();
        };
      };
    } else {
      write();
      // A page that goes away gets no next turn, and Chromium drops a write made then that
      // waits for the page's next turn to commit: every request is made, so the commit goes
      // now. (Any other write is left to commit by itself, so that a write held up can still be
      // given up below: a committing one cannot. A hidden page still gets its turns.)
      if (leaving) tx.commit?.();
    }
    // A write held up (another page of the origin keeps a transaction on these stores open,
    // or the browser's store stalls) is given up after a while and said so: the client tries
    // again a second later, and nothing waiting for this write goes out meanwhile.
    let timer;
    const stalled = new Promise((_, reject) => {
      timer = setTimeout(() => {
        try {
          tx.abort();
        } catch {
          // Committing already, or done: its own end is the answer.
          return;
        }
        reject(new Error(`the write did not complete within ${WRITE_LIMIT_MS / 1000} s (another page may hold the database); tried again`));
      }, WRITE_LIMIT_MS);
    });
    try {
      await Promise.race([finished(tx), stalled]);
    } finally {
      clearTimeout(timer);
    }
    return epoch;
  } catch (e) {
    // A browser that closes the database aborts its transactions first and says why (the
    // close event) after: a write cut short that way is told as the closing, not as a
    // failure to try again.
    await new Promise((resolve) => setTimeout(resolve, 50));
    if (db.pmGone) throw new Error(db.pmGone);
    throw e;
  }
}
export async function pmStorageCompact(db, room, merge, holds) {
  if (db.pmGone || holds.stopped) return 0;
  const tx = db.transaction("updates", "readwrite");
  const store = tx.objectStore("updates");
  const keys = store.index("room").getAllKeys(room);
  const values = store.index("room").getAll(room);
  values.onsuccess = () => {
    if (values.result.length < 2) return;
    const merged = merge(values.result.map((record) => record.update));
    if (!merged) return;
    const epoch = latest(values.result);
    for (const key of keys.result) store.delete(key);
    store.add({ room, update: merged, epoch });
  };
  await finished(tx);
  return values.result.length;
}

// The page is hidden (another tab, a minimised window, a phone's home screen) or goes away
// (closed, reloaded, navigated from): what waits to be written goes now, since a hidden page's
// timers may wait a minute, and a page that goes gets no later turn. `visibilitychange` is the
// one a phone reliably sends before it may discard a page; `pagehide` covers a page closed
// while visible, and sets `leaving`, under which a write commits at once (see
// `pmStorageWrite`).
let leaving = false;
globalThis.addEventListener?.("pagehide", () => { leaving = true; }, { capture: true });
globalThis.addEventListener?.("pageshow", () => { leaving = false; }, { capture: true });
export function pmStorageOnHide(flush) {
  const hidden = () => { if (document.visibilityState === "hidden") flush(); };
  globalThis.addEventListener?.("pagehide", flush);
  globalThis.document?.addEventListener("visibilitychange", hidden);
  return () => {
    globalThis.removeEventListener?.("pagehide", flush);
    globalThis.document?.removeEventListener("visibilitychange", hidden);
  };
}
"#)]
extern "C" {
    #[wasm_bindgen(js_name = pmStorageOnHide)]
    fn on_hide_js(flush: &Closure<dyn FnMut()>) -> js_sys::Function;
    #[wasm_bindgen(js_name = pmStorageMissing)]
    fn missing() -> Option<String>;
    /// The Web Locks on session records that one client holds.
    pub(crate) type Holds;
    /// A client's holds, none yet.
    #[wasm_bindgen(js_name = pmStorageHolds)]
    pub(crate) fn holds() -> Holds;
    /// Lets go of every lock of the holds, and keeps them from taking another: for the panic
    /// hook, which calls it without the client's state.
    #[wasm_bindgen(method, getter)]
    pub(crate) fn stop(this: &Holds) -> js_sys::Function;
    #[wasm_bindgen(js_name = pmStorageOpen)]
    fn open_js(room: &str, wait: u32, holds: &Holds) -> js_sys::Promise;
    #[wasm_bindgen(js_name = pmStorageClosing)]
    fn closing_js(holds: &Holds, room: &str);
    #[wasm_bindgen(js_name = pmStorageNewRecord)]
    fn new_record_js(room: &str, holds: &Holds) -> js_sys::Promise;
    #[wasm_bindgen(js_name = pmStorageFreed)]
    fn freed_js(db: &JsValue, room: &str, known: js_sys::Array, holds: &Holds) -> js_sys::Promise;
    #[wasm_bindgen(js_name = pmStorageGone)]
    fn gone_js(db: &JsValue) -> Option<String>;
    #[wasm_bindgen(js_name = pmStorageWrite)]
    fn write_js(
        db: &JsValue,
        room: &str,
        id: &str,
        saved: Option<Vec<u8>>,
        diverged: bool,
        epoch: u32,
        updates: js_sys::Array,
        drop: js_sys::Array,
        replace: bool,
        holds: &Holds,
    ) -> js_sys::Promise;
    #[wasm_bindgen(js_name = pmStorageCompact)]
    fn compact_js(
        db: &JsValue,
        room: &str,
        merge: &js_sys::Function,
        holds: &Holds,
    ) -> js_sys::Promise;
}

/// The stored document is merged into one record when it has more records than this.
const COMPACT_AT: usize = 200;

/// A tab's storage of one room.
pub(crate) struct Storage {
    db: JsValue,
    /// The locks this client holds on session records.
    holds: Holds,
    room: String,
    id: String,
    /// Releases this tab's lock on its record.
    release: js_sys::Function,
    /// Records of closed tabs whose outboxes this session took in: deleted by the next write,
    /// their locks released after it.
    adopted: Vec<(String, js_sys::Function)>,
    /// Records of closed tabs left whole for a tab that resumes them (see
    /// [`Saved::adoptable`]): not looked at again.
    left: Vec<String>,
    /// Updates taken from the session and not yet written.
    updates: VecDeque<Vec<u8>>,
    /// How many update records the room has in storage (as far as this tab knows).
    records: usize,
    /// The room's stored document is set aside (it diverged): the next write replaces it.
    replace: bool,
    /// The queue was replaced ([`Storage::set_aside`]) while a write was under way: what that
    /// write took is not in it any more, and what it stored is not the session's since.
    pub(crate) reset: bool,
    /// The epoch of the stored document this tab writes in (see the module's notes).
    epoch: u32,
    /// A write is under way; another one is wanted after it.
    pub(crate) writing: bool,
    pub(crate) wanted: bool,
    /// The last write is done and the record let go: another tab may own it now, so nothing
    /// more is written.
    pub(crate) released: bool,
    merge: Closure<dyn Fn(js_sys::Array) -> Option<Vec<u8>>>,
}

/// What storage held for the room when the tab opened.
pub(crate) struct Loaded {
    pub(crate) storage: Storage,
    /// The session to restore, with the outboxes of other closed tabs taken in.
    pub(crate) saved: Option<Saved>,
    /// The document's updates, in the order they were applied.
    pub(crate) updates: Vec<Vec<u8>>,
    /// What could not be read (a damaged record): each is said to the application.
    pub(crate) problems: Vec<String>,
    /// A record of the room (this tab's, a closed tab's or a live tab's) owes the stored
    /// document to a relay that lost the room's history: it may be the only copy of everyone's
    /// edits, and is not set aside (see `Saved::sets_aside_document`).
    pub(crate) owed: bool,
    /// A record of the room of the document's epoch, this tab's or another's (a live tab's
    /// too), says the document diverged: an edit of it was refused for good, and it shows what
    /// the room does not hold. A tab that opens while the one whose edit was refused lives
    /// sets it aside all the same (see `Saved::set_aside_document`).
    pub(crate) diverged: bool,
}

/// Opens the storage of `room` at `url`, claims a session record under `holds`, and reads the
/// document. A client that knows it may only read (`read_only`: its token says so) takes no
/// record with writes in it (the relay would refuse them): they are left for a tab that may
/// write, and the client takes a new record if no other is free.
pub(crate) async fn open(
    url: &str,
    room: &str,
    wait: u32,
    holds: Holds,
    read_only: bool,
) -> Result<Loaded, JsValue> {
    if let Some(why) = missing() {
        return Err(js_error(
            "StorageError",
            format!("persist needs IndexedDB and Web Locks: {why}"),
        ));
    }
    let key = format!("{url}\n{room}");
    let opened = JsFuture::from(open_js(&key, wait, &holds))
        .await
        .map_err(|e| storage_error("opening the database", &e))?;
    let opened: js_sys::Array = opened.unchecked_into();
    let db = opened.get(0);
    let claimed: js_sys::Array = opened.get(1).unchecked_into();
    let stored: js_sys::Array = opened.get(2).unchecked_into();
    let epoch = opened.get(3).as_f64().unwrap_or(0.0) as u32;
    let owed = js_sys::Array::from(&opened.get(4))
        .iter()
        .filter_map(|bytes| read_saved(&bytes)?.ok())
        .any(|saved| saved.give_back);
    let diverged = opened.get(5).is_truthy();
    let mut problems = Vec::new();
    let mut read = |bytes: JsValue| match read_saved(&bytes)? {
        Ok(saved) => Some(saved),
        Err(problem) => {
            problems.push(problem);
            None
        }
    };
    // A record a newer version of the package wrote is left whole, for a tab of that version:
    // taken in here, it would be deleted unread.
    let mut left_newer = false;
    let mut claimed: Vec<(String, Option<Saved>, js_sys::Function)> = claimed
        .iter()
        .filter(|entry| {
            let entry: &js_sys::Array = entry.unchecked_ref();
            let newer = newer(&entry.get(1));
            if newer {
                let _ = entry
                    .get(2)
                    .unchecked_into::<js_sys::Function>()
                    .call0(&JsValue::NULL);
                left_newer = true;
            }
            !newer
        })
        .map(|entry| {
            let entry: js_sys::Array = entry.unchecked_into();
            let id = entry.get(0).as_string().unwrap_or_default();
            let saved = read(entry.get(1)).map(|mut saved| {
                saved.diverged = entry.get(3).is_truthy();
                // Its position counts in a document since set aside: the one stored now may
                // not hold what came before it.
                if entry.get(4).as_f64().unwrap_or(0.0) as u32 != epoch {
                    saved.position = 0;
                }
                saved
            });
            let release: js_sys::Function = entry.get(2).unchecked_into();
            (id, saved, release)
        })
        .collect();
    if left_newer {
        problems.push(NEWER.into());
    }
    if read_only {
        claimed.retain(|(_, saved, release)| {
            let writes = saved
                .as_ref()
                .is_some_and(|s| !s.sent.is_empty() || !s.unsent.is_empty() || s.give_back);
            if writes {
                let _ = release.call0(&JsValue::NULL);
            }
            !writes
        });
    }
    // Every record it claimed was left (a reader's, or a newer version's): a new one.
    if claimed.is_empty() {
        let fresh = match JsFuture::from(new_record_js(&key, &holds)).await {
            Ok(fresh) => fresh,
            Err(e) => {
                // No connection stays open behind an open that failed.
                if let Ok(close) = js_sys::Reflect::get(&db, &"close".into()) {
                    let _ = close.unchecked_into::<js_sys::Function>().call0(&db);
                }
                return Err(storage_error("taking a new session record", &e));
            }
        };
        let fresh: js_sys::Array = fresh.unchecked_into();
        let id = fresh.get(0).as_string().unwrap_or_default();
        claimed.push((id, None, fresh.get(1).unchecked_into()));
    }
    // This tab resumes a record that no other tab may take in, if there is one (a stamped data
    // message may have reached the relay under its identity); otherwise the oldest.
    let own = claimed
        .iter()
        .position(|(_, saved, _)| saved.as_ref().is_some_and(|s| !s.adoptable()))
        .unwrap_or(0);
    let (id, mut saved, release) = claimed.remove(own);
    // What live tabs of the room have not sent yet is in the document this tab shows, and its
    // edits may build on it: it goes out first from here too (see `Saved::carry_updates_of`).
    // A member that may only read sends no update.
    if !read_only {
        for live in js_sys::Array::from(&opened.get(6)).iter() {
            if let Some(Ok(live)) = read_saved(&live) {
                if !live.sent.is_empty() || !live.unsent.is_empty() {
                    saved
                        .get_or_insert_with(Saved::default)
                        .carry_updates_of(&live);
                }
            }
        }
    }
    let mut adopted = Vec::new();
    for (other_id, other, other_release) in claimed {
        match other {
            // Left whole for a tab that resumes it.
            Some(other) if !other.adoptable() => {
                let _ = other_release.call0(&JsValue::NULL);
                continue;
            }
            Some(other) => saved.get_or_insert_with(Saved::default).adopt(&other),
            None => {}
        }
        adopted.push((other_id, other_release));
    }
    let updates: Vec<Vec<u8>> = stored
        .iter()
        .map(|u| js_sys::Uint8Array::new(&u).to_vec())
        .collect();
    let merge =
        Closure::<dyn Fn(js_sys::Array) -> Option<Vec<u8>>>::new(|updates: js_sys::Array| {
            let updates: Vec<Vec<u8>> = updates
                .iter()
                .map(|u| js_sys::Uint8Array::new(&u).to_vec())
                .collect();
            let refs: Vec<&[u8]> = updates.iter().map(Vec::as_slice).collect();
            crate::doc::merge_updates(&refs).ok()
        });
    Ok(Loaded {
        storage: Storage {
            db,
            holds,
            room: key,
            id,
            release,
            adopted,
            left: Vec::new(),
            updates: VecDeque::new(),
            records: updates.len(),
            replace: false,
            reset: false,
            epoch,
            writing: false,
            wanted: false,
            released: false,
            merge,
        },
        saved,
        updates,
        problems,
        owed,
        diverged,
    })
}

/// One write under way: what to tell the storage when it ends.
pub(crate) struct Write {
    promise: js_sys::Promise,
    updates: usize,
    dropped: usize,
    /// It replaces the room's stored document.
    replaced: bool,
}

impl Storage {
    /// Starts a write of `saved` (`None`: the session is over and storage may forget it, see
    /// `Session::may_forget`, and its record goes) and of the document's `updates`.
    pub(crate) fn write(&mut self, saved: Option<&Saved>, updates: Vec<Vec<u8>>) -> Write {
        self.writing = true;
        self.wanted = false;
        self.updates.extend(updates);
        let array = js_sys::Array::new();
        for update in &self.updates {
            array.push(&js_sys::Uint8Array::from(update.as_slice()));
        }
        let drop = js_sys::Array::new();
        for (id, _) in &self.adopted {
            drop.push(&JsValue::from_str(id));
        }
        Write {
            promise: write_js(
                &self.db,
                &self.room,
                &self.id,
                saved.map(Saved::encode),
                saved.is_some_and(|saved| saved.diverged),
                self.epoch,
                array,
                drop,
                self.replace,
                &self.holds,
            ),
            updates: self.updates.len(),
            dropped: self.adopted.len(),
            replaced: self.replace,
        }
    }

    /// The stored document diverged from the room's and is not loaded (see
    /// `Saved::set_aside_document`): the next write replaces it with `updates` (the outbox's,
    /// which the new document starts with) and what the session hands over after them.
    pub(crate) fn set_aside(&mut self, updates: Vec<Vec<u8>>) {
        self.replace = true;
        self.reset = self.writing;
        self.updates = updates.into();
    }

    /// Looks for records of the room that tabs which closed since this one opened left with
    /// messages unsent: claims each whose lock is free and reads it again under the lock.
    pub(crate) fn freed(&self) -> js_sys::Promise {
        let known = js_sys::Array::new();
        for id in std::iter::once(&self.id)
            .chain(self.adopted.iter().map(|(id, _)| id))
            .chain(&self.left)
        {
            known.push(&JsValue::from_str(id));
        }
        freed_js(&self.db, &self.room, known, &self.holds)
    }

    /// Takes in what [`Storage::freed`] found: for each claimed record, its id, its state
    /// (`None`: it did not decode, and is deleted all the same), and whether this session took
    /// it in (`take` says, for a decoded one). A record taken in (or broken) is deleted by the
    /// next write; one left is released at once and not looked at again.
    pub(crate) fn take_up(
        &mut self,
        found: &JsValue,
        mut take: impl FnMut(&Saved) -> bool,
    ) -> Vec<String> {
        let mut problems = Vec::new();
        let found: js_sys::Array = found.clone().unchecked_into();
        for entry in found.iter() {
            let entry: js_sys::Array = entry.unchecked_into();
            let id = entry.get(0).as_string().unwrap_or_default();
            let release: js_sys::Function = entry.get(2).unchecked_into();
            if self.released {
                let _ = release.call0(&JsValue::NULL);
                continue;
            }
            if newer(&entry.get(1)) {
                let _ = release.call0(&JsValue::NULL);
                self.left.push(id);
                problems.push(NEWER.into());
                continue;
            }
            // A record of an earlier epoch diverged from a document set aside since.
            let same_epoch = entry.get(4).as_f64().unwrap_or(0.0) as u32 == self.epoch;
            let read = read_saved(&entry.get(1)).map(|saved| {
                saved.map(|mut saved| {
                    saved.diverged = entry.get(3).is_truthy() && same_epoch;
                    saved
                })
            });
            match read {
                Some(Ok(saved)) if !take(&saved) => {
                    let _ = release.call0(&JsValue::NULL);
                    self.left.push(id);
                    continue;
                }
                Some(Err(problem)) => problems.push(problem),
                _ => {}
            }
            self.adopted.push((id, release));
        }
        problems
    }

    /// The write ended: what it wrote leaves the queue (if it succeeded). Returns whether the
    /// stored document should be compacted now.
    pub(crate) fn written(&mut self, write: &WriteDone) -> bool {
        self.writing = false;
        // The document it wrote to was set aside while it was under way: what it took from
        // the queue is not there any more, and the next write replaces that document.
        let reset = std::mem::take(&mut self.reset);
        if write.ok {
            if write.replaced {
                if let Some(epoch) = write.epoch {
                    self.epoch = epoch;
                }
            }
            if !reset {
                self.updates.drain(..write.updates);
                if write.replaced {
                    self.replace = false;
                    self.records = write.updates + 1;
                } else {
                    self.records += write.updates;
                }
            }
            // Records taken up while the write was under way wait for the next one.
            for (_, release) in self.adopted.drain(..write.dropped) {
                let _ = release.call0(&JsValue::NULL);
            }
        }
        !reset && self.records > COMPACT_AT
    }

    /// Replaces the room's stored updates by their merge.
    pub(crate) fn compact(&mut self) -> js_sys::Promise {
        self.records = 1;
        compact_js(
            &self.db,
            &self.room,
            self.merge.as_ref().unchecked_ref(),
            &self.holds,
        )
    }

    /// Why nothing can be written any more, if so: another page deleted or upgraded the
    /// database, or the browser closed it.
    pub(crate) fn gone(&self) -> Option<String> {
        gone_js(&self.db)
    }

    /// Says that the client closed: a client of the room that this page opens meanwhile waits
    /// (a while) for this one's records, which it lets go of after its last write.
    pub(crate) fn closing(&self) {
        closing_js(&self.holds, &self.room);
    }

    /// Lets another tab take this record; nothing is written after it.
    pub(crate) fn release(&mut self) {
        self.released = true;
        let _ = self.release.call0(&JsValue::NULL);
        for (_, release) in &self.adopted {
            let _ = release.call0(&JsValue::NULL);
        }
    }
}

/// Calls a function each time the page is hidden or goes away, until dropped: the moment to
/// write what was put off, before the page may get no other turn.
pub(crate) struct OnHide {
    _flush: Closure<dyn FnMut()>,
    remove: js_sys::Function,
}

impl OnHide {
    /// Calls `flush` when the page is hidden or goes away.
    pub(crate) fn new(flush: impl FnMut() + 'static) -> OnHide {
        let flush = Closure::<dyn FnMut()>::new(flush);
        let remove = on_hide_js(&flush);
        OnHide {
            _flush: flush,
            remove,
        }
    }
}

impl Drop for OnHide {
    fn drop(&mut self) {
        let _ = self.remove.call0(&JsValue::NULL);
    }
}

/// A client let go of without `close()` (freed, or collected once nothing refers to it) lets go
/// of its records too: held for as long as the tab lived, they kept the next client of the room
/// from taking up what this one had not sent. A write under way completes first: the next
/// reader of the record reads it after that write, in the database's order.
impl Drop for Storage {
    fn drop(&mut self) {
        if !self.released {
            self.release();
        }
    }
}

impl Write {
    /// Waits for the write to end.
    pub(crate) async fn done(self) -> WriteDone {
        let result = JsFuture::from(self.promise).await;
        WriteDone {
            ok: result.is_ok(),
            epoch: result
                .as_ref()
                .ok()
                .and_then(JsValue::as_f64)
                .map(|e| e as u32),
            error: result.err().map(|e| storage_error("writing", &e)),
            updates: self.updates,
            dropped: self.dropped,
            replaced: self.replaced,
        }
    }
}

/// How a write ended.
pub(crate) struct WriteDone {
    pub(crate) ok: bool,
    /// The epoch of the document the write was in (a replacement picks a new one).
    epoch: Option<u32>,
    pub(crate) error: Option<JsValue>,
    updates: usize,
    dropped: usize,
    replaced: bool,
}

/// Lets go of every record in what [`Storage::freed`] found (the client went, or its storage
/// did, while it looked).
pub(crate) fn release_found(found: &JsValue) {
    let found: js_sys::Array = found.clone().unchecked_into();
    for entry in found.iter() {
        let entry: js_sys::Array = entry.unchecked_into();
        let release: js_sys::Function = entry.get(2).unchecked_into();
        let _ = release.call0(&JsValue::NULL);
    }
}

/// What storage says of a record a newer version of the package wrote.
const NEWER: &str =
    "a stored session of this room was written by a newer version of pattern-mesh: it is left for a tab of that version";

/// Whether a stored session record's state was written by a newer version of the package.
fn newer(bytes: &JsValue) -> bool {
    !bytes.is_null()
        && !bytes.is_undefined()
        && Saved::stored_by_newer_version(&js_sys::Uint8Array::new(bytes).to_vec())
}

/// A stored session record's state: `None` when there is none, an error that says what was
/// lost when it does not decode.
fn read_saved(bytes: &JsValue) -> Option<Result<Saved, String>> {
    if bytes.is_null() || bytes.is_undefined() {
        return None;
    }
    let bytes = js_sys::Uint8Array::new(bytes).to_vec();
    Some(Saved::decode(&bytes).map_err(|e| {
        format!("a stored session did not decode ({e}); its unsent messages are lost")
    }))
}

fn storage_error(doing: &str, error: &JsValue) -> JsValue {
    js_error(
        "StorageError",
        format!(
            "IndexedDB failed {doing}: {}",
            super::errors::describe(error)
        ),
    )
}
