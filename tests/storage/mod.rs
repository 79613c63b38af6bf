//! A tab's storage in the simulations: what it holds, the write under way, and the data
//! messages it ever held.

use std::collections::HashSet;

use pattern_mesh::doc::SharedDoc;
use pattern_mesh::saved::{Saved, Stored};
use pattern_mesh::session::{Session, SessionConfig};
use pattern_mesh::wire::Body;

/// What a tab keeps in storage.
#[derive(Default)]
pub struct Storage {
    /// What it holds: the session's state and its document's updates.
    pub held: Option<(Saved, Vec<Vec<u8>>)>,
    /// The data messages it held at some point: a message is sent only after that.
    pub ids: HashSet<String>,
    writing: bool,
    wanted: bool,
    /// The document was set aside while a write was under way: that write is not stored.
    reset: bool,
    /// Which opening of the tab (a write that ends after the tab closed is lost).
    opening: u64,
}

/// A write to storage, under way: the simulation hands it back when it ends.
#[derive(Debug)]
pub struct Write {
    opening: u64,
    saved: Saved,
    updates: Vec<Vec<u8>>,
}

impl Storage {
    /// The session asked to be stored.
    pub fn want(&mut self) {
        self.wanted = true;
    }

    /// Starts a write of what `session` asks to store, if one is wanted and none is under way.
    pub fn begin(&mut self, session: &mut Session<SharedDoc>) -> Option<Write> {
        if self.writing || !self.wanted {
            return None;
        }
        self.writing = true;
        self.wanted = false;
        Some(Write {
            opening: self.opening,
            saved: session.saved(),
            updates: session.take_updates(),
        })
    }

    /// A write ended: what it covers, for the session, unless the tab closed meanwhile.
    pub fn end(&mut self, write: Write) -> Option<Stored> {
        if write.opening != self.opening {
            return None;
        }
        self.writing = false;
        if std::mem::take(&mut self.reset) {
            // Of the session before the repair, which the next write replaces.
            self.wanted = true;
            return None;
        }
        for body in write.saved.bodies() {
            if let Body::Data { data } = body {
                if let Ok(value) = data.to_value::<serde_json::Value>() {
                    if let Some(id) = value["id"].as_str() {
                        self.ids.insert(id.to_owned());
                    }
                }
            }
        }
        let stored = write.saved.stored();
        let mut doc = self.held.take().map(|(_, doc)| doc).unwrap_or_default();
        doc.extend(write.updates);
        self.held = Some((write.saved, doc));
        Some(stored)
    }

    /// The document diverged and is repaired: the stored one is replaced by the outbox's
    /// updates (see `Session::repair`), and the session by the next write. (The shared-room
    /// simulation has no member whose edits are refused, so none of its documents diverges.)
    #[allow(dead_code)]
    pub fn set_aside(&mut self, outbox: Vec<Vec<u8>>) {
        self.reset = self.writing;
        if let Some((_, doc)) = &mut self.held {
            *doc = outbox;
            self.wanted = true;
        }
    }

    /// The tab closed: a write under way is lost.
    pub fn close(&mut self) {
        self.opening += 1;
        self.writing = false;
        self.wanted = false;
    }

    /// A session's settings and replica restored from what storage holds, if anything.
    pub fn restore(&self, config: &mut SessionConfig, replica: &SharedDoc) {
        if let Some((saved, doc)) = &self.held {
            config.restore = Some(saved.clone());
            for update in doc {
                replica
                    .apply_update(update)
                    .expect("the stored document applies");
            }
        }
    }
}
