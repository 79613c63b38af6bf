//! [`SharedDoc`], the built-in document on `yrs`, and the update functions that need it.

use std::sync::atomic::{AtomicU64, Ordering};

use yrs::block::ClientID;
use yrs::types::text::TextEvent;
use yrs::types::Delta;
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{
    Doc, GetString, Observable, OffsetKind, Options, ReadTxn, StateVector, Text, Transact, Update,
};

use super::{digest_texts, DocError, Replica, TextDelta, Version};

/// Checks that `update` is a Yjs v1 update that Yjs applies ([`super::v1::check`]) and that yrs
/// decodes, without applying it anywhere: what the relay does with an update it forwards but
/// does not apply (a sync answer).
pub fn check_update(update: &[u8]) -> Result<(), DocError> {
    decode_update(update).map(|_| ())
}

/// [`check_update`], keeping what yrs decoded: for [`SharedDoc::holds_decoded`].
pub fn decode_update(update: &[u8]) -> Result<Update, DocError> {
    check_v1(update)?;
    Update::decode_v1(update).map_err(|e| DocError::InvalidUpdate(e.to_string()))
}

/// [`super::v1::check`], as a [`DocError`].
fn check_v1(update: &[u8]) -> Result<(), DocError> {
    super::v1::check(update)
        .map_err(|e| DocError::InvalidUpdate(format!("not an update Yjs applies: {e}")))
}

/// The most applying one member's update may cost, in clocks copied, blocks moved and items
/// walked past ([`SharedDoc::apply_cost`], [`DocError::TooCostly`],
/// [`SharedDoc::check_member_update`]):
/// about half a second of yrs on the relay (200,000 cuts of one 300,000-character block, 10^11,
/// took 2.7 s), a little more in a member's Yjs or wasm. Replacing 10,000 words at once in a
/// document of 100,000 blocks of 10 characters costs about 2·10^10.
pub const MAX_APPLY_COST: u64 = 20_000_000_000;

/// What integrating an item costs for each item of the document it walks past, in
/// [`MAX_APPLY_COST`]'s units: a walk of 5,000,000 items (about 1.5 s, under the relay's
/// default apply budget of 2 s) is the bound. An honest tab's outbox can cost a third of that:
/// hundreds of entries written newest first at the start of a text where others wrote 1,609
/// characters meanwhile (each walks past those), found by the simulation at 0.7 s.
const WALK_WEIGHT: u64 = 4_000;

/// The most integrating one member's update may walk, in yrs's steps
/// ([`yrs::TransactionMut::limit_steps`]: an item passed over while placing an item, and
/// [`yrs::STEPS_PER_CONFLICT`] for one of the conflict resolution between its origins): 1 to
/// 2.5 s in a release build, by the shape (a step costs 2 to 6 ns, more where a walk misses the
/// cache). It is the bound for what [`SharedDoc::check_member_update`]'s estimate misses:
/// integration stops
/// there ([`DocError::Overran`]), rather than walk for minutes on an update crafted to make
/// each of its items walk the whole text.
pub const MAX_APPLY_STEPS: u64 = 400_000_000;

/// Runs `apply` (a member's update checked, then applied), turning a panic in it into
/// [`DocError::Panicked`]: a bug in yrs that some update meets costs that update, not the
/// process, nor (in a relay) the room whose log holds it, which would meet it again at every
/// load. The document may then hold part of the update; its owner builds it again without it.
/// Where a panic aborts (wasm), this is `apply()`.
fn guarded<T>(apply: impl FnOnce() -> Result<T, DocError>) -> Result<T, DocError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(apply)).unwrap_or_else(|panic| {
        let detail = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".into());
        Err(DocError::Panicked(detail))
    })
}

/// Merges Yjs v1 updates into one (what a client does with edits that wait to be sent).
pub fn merge_updates(updates: &[&[u8]]) -> Result<Vec<u8>, DocError> {
    yrs::merge_updates_v1(updates.iter().copied())
        .map_err(|e| DocError::InvalidUpdate(e.to_string()))
}

/// A document of named texts.
pub struct SharedDoc {
    doc: Doc,
    next_observer: AtomicU64,
}

impl Default for SharedDoc {
    fn default() -> Self {
        Self::new()
    }
}

impl SharedDoc {
    /// An empty document with a random client id (below 2^53, safe for JS).
    pub fn new() -> Self {
        Self::with_options(Options::default())
    }

    /// An empty document with a chosen client id; every replica needs a different one.
    pub fn with_client_id(client_id: u64) -> Self {
        Self::with_options(Options::with_client_id(yrs::block::ClientID::new(
            client_id,
        )))
    }

    fn with_options(mut options: Options) -> Self {
        options.offset_kind = OffsetKind::Utf16;
        Self {
            doc: Doc::with_options(options),
            next_observer: AtomicU64::new(1),
        }
    }

    /// This replica's Yjs client id.
    pub fn client_id(&self) -> u64 {
        self.doc.client_id().get()
    }

    /// The content of the text `name` (empty if it was never written). An embed (an image or a
    /// shared type a Yjs application put in the text) reads as one U+FFFC (OBJECT REPLACEMENT
    /// CHARACTER), the one position it takes in the text, so that positions in the content are
    /// positions in the document. (Yjs's `toString()` leaves embeds out; the digest does too.)
    /// An embed whose value is a string, which no rich-text editor writes, reads as that
    /// string: yrs gives it as it gives text.
    pub fn text(&self, name: &str) -> String {
        let text = self.doc.get_or_insert_text(name);
        let txn = self.doc.transact();
        let plain = text.get_string(&txn);
        if plain.encode_utf16().count() == text.len(&txn) as usize {
            // No embed: every position holds a character of the string.
            return plain;
        }
        let mut content = String::with_capacity(plain.len() + 16);
        for chunk in text.diff(&txn, |_| ()) {
            match chunk.insert {
                yrs::Out::Any(yrs::Any::String(run)) => content.push_str(&run),
                _ => content.push(EMBED),
            }
        }
        content
    }

    /// The names of every text the document holds, including those only remote updates made.
    pub fn text_names(&self) -> Vec<String> {
        let txn = self.doc.transact();
        let mut names: Vec<String> = txn
            .root_refs()
            .filter(|(_, value)| matches!(value, yrs::Out::YText(_) | yrs::Out::UndefinedRef(_)))
            .map(|(name, _)| name.to_owned())
            .collect();
        super::heap_sort(&mut names);
        names
    }

    /// The length of the text `name`, in UTF-16 code units.
    pub fn len(&self, name: &str) -> u32 {
        let text = self.doc.get_or_insert_text(name);
        text.len(&self.doc.transact())
    }

    /// Inserts `chunk` at `index` in the text `name`; returns the edit as a Yjs v1 update.
    pub fn insert(&self, name: &str, index: u32, chunk: &str) -> Result<Vec<u8>, DocError> {
        let text = self.doc.get_or_insert_text(name);
        let mut txn = self.doc.transact_mut();
        let len = text.len(&txn);
        if index > len {
            return Err(DocError::IndexOutOfRange { index, len });
        }
        text.insert(&mut txn, index, chunk);
        Ok(txn.encode_update_v1())
    }

    /// Deletes `length` code units from `index` in the text `name`; returns the edit as a Yjs
    /// v1 update.
    pub fn delete(&self, name: &str, index: u32, length: u32) -> Result<Vec<u8>, DocError> {
        let text = self.doc.get_or_insert_text(name);
        let mut txn = self.doc.transact_mut();
        let len = text.len(&txn);
        if index.checked_add(length).is_none_or(|end| end > len) {
            return Err(DocError::RangeOutOfRange { index, length, len });
        }
        text.remove_range(&mut txn, index, length);
        Ok(txn.encode_update_v1())
    }

    /// Applies several edits `[index, delete, insert]` to the text `name` in one transaction
    /// (as the editing traces record them); returns them as one Yjs v1 update.
    pub fn splice_all(
        &self,
        name: &str,
        patches: &[(u32, u32, &str)],
    ) -> Result<Vec<u8>, DocError> {
        let text = self.doc.get_or_insert_text(name);
        let mut txn = self.doc.transact_mut();
        for &(index, delete, insert) in patches {
            let len = text.len(&txn);
            if index.checked_add(delete).is_none_or(|end| end > len) {
                return Err(DocError::RangeOutOfRange {
                    index,
                    length: delete,
                    len,
                });
            }
            if delete > 0 {
                text.remove_range(&mut txn, index, delete);
            }
            if !insert.is_empty() {
                text.insert(&mut txn, index, insert);
            }
        }
        Ok(txn.encode_update_v1())
    }

    /// What applying `update` to this document would cost. Each block the update cuts in two
    /// (where a deleted range starts or ends inside it, or an item's origin or right origin
    /// lies inside it, in the document or in the update's own blocks) has its content copied
    /// into two halves, and the right one inserted into the middle of its client's block list,
    /// moving every block after it, in yrs as in Yjs: cutting `k` blocks of a client with `n`
    /// costs the lengths of the blocks cut (the bytes of a JSON item's strings, each copied
    /// whole) plus about `k · (n + k)` blocks moved (counted 8 each). A deletion of
    /// every other character of one 200,000-character insertion (790 KB) took yrs 2.7 s, and a
    /// message of tens of megabytes would take hours, in the relay and in every member; an edit
    /// that cuts few blocks (a selection deleted whole, however large, a long paste) costs next
    /// to nothing. Placing each item also walks past every item between its origin and its
    /// right origin (`Update::walks`): one a Yjs client wrote lies next to both, but 1,000 items
    /// of 9 KB naming the two ends of a text of 200,000 blocks took yrs 67 s.
    fn apply_cost(&self, update: &Update) -> u64 {
        let txn = self.doc.transact();
        let store = txn.store();
        let mut points = update.cut_points();
        points.sort_unstable();
        points.dedup();
        // Integration walks each item past every item between its origins (see
        // `Update::walks`), about 0.3 µs an item in a release build.
        let walked = update.walks(store, MAX_APPLY_COST / WALK_WEIGHT);
        let mut cost = walked.saturating_mul(WALK_WEIGHT);
        let mut clocks = Vec::new();
        for run in points.chunk_by(|a, b| a.0 == b.0) {
            let client = run[0].0;
            clocks.clear();
            clocks.extend(run.iter().map(|&(_, clock)| clock));
            let (held, held_cuts, held_len) = store.cuts(client, &clocks);
            let (own, own_cuts, own_len) = update.cuts(client, &clocks);
            let blocks = (held + own) as u64;
            let cuts = (held_cuts + own_cuts) as u64;
            // A block in the list is 24 bytes, moved at a time's cost of about 8 characters.
            let moved = cuts
                .saturating_mul(blocks.saturating_add(cuts))
                .saturating_mul(8);
            cost = cost
                .saturating_add(held_len)
                .saturating_add(own_len)
                .saturating_add(moved);
        }
        cost
    }

    /// Decodes a member's update (checked already by [`super::v1`]) and refuses it if applying
    /// it here would cost more than [`MAX_APPLY_COST`] ([`SharedDoc::apply_cost`]).
    fn decode_within_cost(&self, update: &[u8]) -> Result<Update, DocError> {
        let update =
            Update::decode_v1(update).map_err(|e| DocError::InvalidUpdate(e.to_string()))?;
        let cost = self.apply_cost(&update);
        if cost > MAX_APPLY_COST {
            return Err(DocError::TooCostly {
                cost,
                max: MAX_APPLY_COST,
            });
        }
        Ok(update)
    }

    /// [`check_update`], and the bound on what applying the update here would cost
    /// ([`DocError::TooCostly`]): a shared room's check of a member's update that it
    /// applies later, in the log's order.
    pub fn check_member_update(&self, update: &[u8]) -> Result<(), DocError> {
        guarded(|| {
            check_v1(update)?;
            self.decode_within_cost(update).map(|_| ())
        })
    }

    /// Applies a Yjs v1 update from another replica (or from Yjs itself). Updates may arrive
    /// in any order and more than once; `yrs` holds back what it cannot integrate yet. Bytes
    /// that Yjs would not apply are refused first ([`super::v1::check`]).
    pub fn apply_update(&self, update: &[u8]) -> Result<(), DocError> {
        check_v1(update)?;
        self.apply_stored(update)
    }

    /// Applies an update that was checked when it was admitted: the room's own log (a relay
    /// loading a room), what the relay forwards, a tab's stored updates. Without
    /// [`super::v1::check`], so that what a room stored before that check existed (a value
    /// nested deeper than it allows, say) still loads, instead of the room losing it.
    pub fn apply_stored(&self, update: &[u8]) -> Result<(), DocError> {
        let update =
            Update::decode_v1(update).map_err(|e| DocError::InvalidUpdate(e.to_string()))?;
        self.apply_decoded(update)
    }

    /// [`SharedDoc::apply_decoded`] for a member's update: integration stops once it has
    /// walked [`MAX_APPLY_STEPS`] ([`DocError::Overran`]; the document then holds part of it).
    fn apply_metered(&self, update: Update) -> Result<(), DocError> {
        let mut txn = self.doc.transact_mut();
        txn.limit_steps(MAX_APPLY_STEPS);
        txn.apply_update(update).map_err(|e| match e {
            yrs::error::UpdateError::Overrun { steps, limit } => {
                DocError::Overran { steps, max: limit }
            }
            e => DocError::InvalidUpdate(e.to_string()),
        })
    }

    fn apply_decoded(&self, update: Update) -> Result<(), DocError> {
        self.doc
            .transact_mut()
            .apply_update(update)
            .map_err(|e| DocError::InvalidUpdate(e.to_string()))
    }

    /// Checks that `update` holds nothing this document lacks: every block in it (an item, a
    /// deleted item or a collected range) is at an id this document holds, and every deleted
    /// range in it is deleted here. Applying such an update adds nothing anywhere this
    /// document's updates reached first. The error says what the update holds that this
    /// document does not.
    ///
    /// The relay checks every sync answer against its document with this: a member could
    /// otherwise answer with blocks under another member's client id at that member's next
    /// clock, or delete what no one deleted, and the replicas that took the answer would keep
    /// that and ignore the real edit (Yjs integrates an id once). A panic while reading it is
    /// such an error too (see [`DocError::Panicked`]).
    pub fn holds(&self, update: &[u8]) -> Result<(), String> {
        match guarded(|| Ok(self.holds_unguarded(update))) {
            Ok(held) => held,
            Err(DocError::Panicked(detail)) => Err(format!("reading it failed ({detail})")),
            Err(e) => Err(e.to_string()),
        }
    }

    fn holds_unguarded(&self, update: &[u8]) -> Result<(), String> {
        // Walked first, as everything a member sends is before yrs reads it: yrs reads nested
        // values recursively (see `super::v1`), and a resent update comes here unchecked.
        super::v1::check(update).map_err(|e| format!("not an update Yjs applies: {e}"))?;
        let update = Update::decode_v1(update).map_err(|e| e.to_string())?;
        self.holds_decoded(&update)
    }

    /// [`SharedDoc::holds`] for an update [`decode_update`] has walked and decoded: a sync
    /// answer, which the relay checks first (a malformed answer is refused as such), is walked
    /// and decoded once.
    pub fn holds_decoded(&self, update: &Update) -> Result<(), String> {
        let txn = self.doc.transact();
        // The clocks of the clients the answer names, not a state vector of every client.
        for (client, ranges) in update.insertions(true).iter() {
            let have = txn.state_of(*client);
            if let Some(range) = ranges.iter().find(|range| range.end > have) {
                return Err(format!(
                    "it holds client {client}'s clocks {}..{}, and the room's document holds that client's clocks up to {have} only",
                    range.start, range.end
                ));
            }
        }
        for (client, ranges) in update.delete_set().iter() {
            // As decoded, ranges may repeat and overlap, millions of times over in a large
            // answer: merged first, each block is visited once.
            let merged = super::merge_ranges(ranges.iter().map(|r| (r.start, r.end)).collect());
            if let Some((start, end)) = merged
                .into_iter()
                .find(|&(start, end)| !txn.is_deleted_range(*client, start..end))
            {
                return Err(format!(
                    "it deletes client {client}'s clocks {start}..{end}, which the room's document has not deleted"
                ));
            }
        }
        Ok(())
    }

    /// [`SharedDoc::apply_update`] for an update a member sent: it is applied only if all of it
    /// integrates here at once (see [`super::v1::integrable`]). Yjs keeps what does not, and
    /// waits for what it needs: a member could otherwise leave every replica waiting for good
    /// (blocks after a gap in a client's clocks), or delete another member's next edits as they
    /// arrive (deletes of clocks no one wrote). Nor is one that writes clocks this document
    /// holds with other content (see [`super::v1::refusal`]): another member's edit at a
    /// member's next clocks, under its client id, would have this one's real edit taken as one
    /// the room already had, and lost. Such an update is [`DocError::NotTaken`], naming the
    /// client and clocks.
    pub fn apply_member_update(&self, update: &[u8]) -> Result<(), DocError> {
        self.member_update(update, false)
    }

    /// [`SharedDoc::apply_member_update`] for an update a member sends now, which is refused
    /// too ([`DocError::TooCostly`]) if applying it would cost more than [`MAX_APPLY_COST`]. (A
    /// room's own log is applied without the bound: what it holds was taken. A shared room's is
    /// judged with it again, in the log's order.)
    pub fn admit_member_update(&self, update: &[u8]) -> Result<(), DocError> {
        self.member_update(update, true)
    }

    fn member_update(&self, update: &[u8], bounded: bool) -> Result<(), DocError> {
        guarded(|| {
            let applied = self.member_update_unguarded(update, bounded);
            #[cfg(test)]
            tests::panic_if_marked(update);
            applied
        })
    }

    fn member_update_unguarded(&self, update: &[u8], bounded: bool) -> Result<(), DocError> {
        // The clocks of the few clients the update names, not the whole state vector: a
        // document keeps every client id that ever wrote, and this runs for every update.
        let checked = {
            let txn = self.doc.transact();
            super::v1::refusal(
                update,
                |client| u64::from(txn.state_of(ClientID::new(client))),
                |client, from, to| {
                    // Clocks the document holds: below 2^32.
                    txn.encode_client_range_v1(ClientID::new(client), from as u32..to as u32)
                },
            )
        };
        match checked {
            Ok(None) if bounded => self.apply_metered(self.decode_within_cost(update)?),
            Ok(None) => self.apply_stored(update),
            Ok(Some(why)) => Err(DocError::NotTaken(why)),
            Err(e) => Err(DocError::InvalidUpdate(format!(
                "not an update Yjs applies: {e}"
            ))),
        }
    }

    /// [`SharedDoc::apply_member_update`] for a whole document a member gives back (after the
    /// relay lost the room's history): it must integrate whole, but clocks this document holds
    /// are not compared with it (what it holds there stays).
    pub fn apply_given_back(&self, update: &[u8]) -> Result<(), DocError> {
        self.given_back(update, false)
    }

    /// [`SharedDoc::apply_given_back`] for a document a member gives back now, with the bound
    /// of [`SharedDoc::admit_member_update`].
    pub fn admit_given_back(&self, update: &[u8]) -> Result<(), DocError> {
        self.given_back(update, true)
    }

    fn given_back(&self, update: &[u8], bounded: bool) -> Result<(), DocError> {
        guarded(|| self.given_back_unguarded(update, bounded))
    }

    fn given_back_unguarded(&self, update: &[u8], bounded: bool) -> Result<(), DocError> {
        let checked = {
            let txn = self.doc.transact();
            super::v1::given_back_refusal(
                update,
                |client| u64::from(txn.state_of(ClientID::new(client))),
                |client, from, to| {
                    // Clocks the document holds: below 2^32.
                    txn.encode_client_range_v1(ClientID::new(client), from as u32..to as u32)
                },
            )
        };
        match checked {
            Ok(None) if bounded => self.apply_metered(self.decode_within_cost(update)?),
            Ok(None) => self.apply_stored(update),
            Ok(Some(why)) => Err(DocError::NotTaken(why)),
            Err(e) => Err(DocError::InvalidUpdate(format!(
                "not an update Yjs applies: {e}"
            ))),
        }
    }

    /// This replica's version: a Yjs state vector.
    pub fn state_vector(&self) -> Vec<u8> {
        self.doc.transact().state_vector().encode_v1()
    }

    /// Everything this replica has that the state vector `remote` lacks, as a Yjs v1 update.
    pub fn diff(&self, remote: &[u8]) -> Result<Vec<u8>, DocError> {
        let sv = StateVector::decode_v1(remote)
            .map_err(|e| DocError::InvalidStateVector(e.to_string()))?;
        Ok(self.doc.transact().encode_state_as_update_v1(&sv))
    }

    /// The whole document as one Yjs v1 update (a snapshot).
    pub fn snapshot(&self) -> Vec<u8> {
        self.doc
            .transact()
            .encode_state_as_update_v1(&StateVector::default())
    }

    /// Whether updates are held back waiting for missing dependencies.
    pub fn has_pending(&self) -> bool {
        let txn = self.doc.transact();
        txn.store().pending_update().is_some() || txn.store().pending_ds().is_some()
    }

    /// This replica's version: its state vector and a hash of its delete set.
    pub fn version(&self) -> Version {
        let snapshot = self.doc.transact().snapshot();
        let deletes = snapshot
            .delete_set
            .iter()
            .map(|(client, ranges)| {
                let ranges = ranges.iter().map(|r| (r.start, r.end)).collect();
                (client.get(), ranges)
            })
            .collect();
        let clocks = snapshot
            .state_map
            .iter()
            .map(|(client, &clock)| (client.get(), clock))
            .collect();
        Version::canonical(clocks, deletes)
    }

    /// A 64-bit digest (FNV-1a) of the content of every text, by name. Two replicas at the same
    /// version must have the same digest; a difference is a desync.
    pub fn digest(&self) -> u64 {
        let txn = self.doc.transact();
        let texts: Vec<(String, String)> = txn
            .root_refs()
            .filter_map(|(name, value)| match value {
                yrs::Out::YText(text) => Some((name.to_owned(), text.get_string(&txn))),
                // A text that only arrived in remote updates and was never opened here has no
                // type yet; its content is the same.
                yrs::Out::UndefinedRef(branch) => {
                    Some((name.to_owned(), yrs::TextRef::from(branch).get_string(&txn)))
                }
                _ => None,
            })
            .collect();
        digest_texts(texts)
    }

    /// Whether the document holds no item at all.
    pub fn is_empty(&self) -> bool {
        self.doc.transact().state_vector().is_empty()
    }

    /// Calls `listener` with the deltas of every committed change to the text `name`, local or
    /// remote. Returns an id for [`SharedDoc::unobserve`].
    pub fn observe(&self, name: &str, mut listener: impl FnMut(Vec<TextDelta>) + 'static) -> u64 {
        let id = self.next_observer.fetch_add(1, Ordering::Relaxed);
        let text = self.doc.get_or_insert_text(name);
        text.observe(key(name, id), move |txn, event: &TextEvent| {
            listener(event.delta(txn).iter().map(to_delta).collect());
        });
        id
    }

    /// Removes an observer of the text `name`.
    pub fn unobserve(&self, name: &str, id: u64) -> bool {
        self.doc.get_or_insert_text(name).unobserve(key(name, id))
    }
}

impl Replica for SharedDoc {
    /// What a session applies came through the relay, which checked it when a member sent it
    /// (or is the relay's own snapshot, or this tab's stored updates): see
    /// [`SharedDoc::apply_stored`].
    fn apply_update(&mut self, update: &[u8]) -> Result<(), DocError> {
        SharedDoc::apply_stored(self, update)
    }

    fn state_vector(&self) -> Vec<u8> {
        SharedDoc::state_vector(self)
    }

    fn whole(&self) -> Result<Vec<u8>, DocError> {
        // Unlike `encode_state_as_update`, without the pending updates and deletes.
        Ok(self.doc.transact().encode_diff_v1(&StateVector::default()))
    }

    fn diff(&self, remote: &[u8]) -> Result<Vec<u8>, DocError> {
        if remote.is_empty() {
            return Ok(self.snapshot());
        }
        SharedDoc::diff(self, remote)
    }

    fn version(&self) -> Version {
        SharedDoc::version(self)
    }

    fn digest(&self) -> u64 {
        SharedDoc::digest(self)
    }

    fn is_empty(&self) -> bool {
        SharedDoc::is_empty(self)
    }

    fn has_pending(&self) -> bool {
        SharedDoc::has_pending(self)
    }

    fn merge_updates(&self, updates: &[&[u8]]) -> Option<Vec<u8>> {
        merge_updates(updates).ok()
    }
}

fn key(name: &str, id: u64) -> String {
    format!("pattern-mesh/{name}/{id}")
}

/// What an embed reads as in a text's content and deltas: U+FFFC, OBJECT REPLACEMENT CHARACTER.
const EMBED: char = '\u{FFFC}';

/// A yrs delta as a [`TextDelta`]. Text inserts as itself; an embed (an image or a shared type
/// a Yjs application put in the text) as one [`EMBED`], the one position it takes, as in
/// [`SharedDoc::text`].
fn to_delta(delta: &Delta) -> TextDelta {
    match delta {
        Delta::Retain(n, _) => TextDelta::Retain(*n),
        Delta::Deleted(n) => TextDelta::Delete(*n),
        Delta::Inserted(yrs::Out::Any(yrs::Any::String(text)), _) => {
            TextDelta::Insert(text.to_string())
        }
        Delta::Inserted(_, _) => TextDelta::Insert(EMBED.into()),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    thread_local! {
        /// An update that makes applying it panic once it is applied, as a bug in yrs would:
        /// for the tests of what a panic there costs.
        pub(crate) static PANICS_ON: std::cell::RefCell<Option<Vec<u8>>> =
            const { std::cell::RefCell::new(None) };
    }

    /// Panics if `update` is [`PANICS_ON`]'s.
    pub(crate) fn panic_if_marked(update: &[u8]) {
        if PANICS_ON.with(|p| p.borrow().as_deref() == Some(update)) {
            panic!("a bug in integration");
        }
    }
    use crate::doc::{digest_texts, has_insertions, write_var};
    use std::sync::{Arc, Mutex};

    #[test]
    fn edits_travel_as_updates_and_converge() {
        let a = SharedDoc::with_client_id(1);
        let b = SharedDoc::with_client_id(2);
        let u1 = a.insert("content", 0, "hello").unwrap();
        let u2 = b.insert("content", 0, "world").unwrap();
        b.apply_update(&u1).unwrap();
        a.apply_update(&u2).unwrap();
        assert_eq!(a.text("content"), b.text("content"));
        assert_eq!(a.digest(), b.digest());
        let u3 = a.delete("content", 0, 5).unwrap();
        b.apply_update(&u3).unwrap();
        b.apply_update(&u3).unwrap();
        assert_eq!(a.text("content"), b.text("content"));
        assert_eq!(a.text("content").len(), 5);
    }

    #[test]
    fn out_of_range_edits_are_errors_not_panics() {
        let doc = SharedDoc::new();
        doc.insert("t", 0, "abc").unwrap();
        assert_eq!(
            doc.insert("t", 4, "x"),
            Err(DocError::IndexOutOfRange { index: 4, len: 3 })
        );
        assert_eq!(
            doc.delete("t", 2, 2),
            Err(DocError::RangeOutOfRange {
                index: 2,
                length: 2,
                len: 3
            })
        );
        assert!(doc.delete("t", u32::MAX, 2).is_err());
        assert_eq!(doc.text("t"), "abc");
    }

    #[test]
    fn indexes_are_utf16_code_units() {
        let doc = SharedDoc::new();
        doc.insert("t", 0, "a😀b").unwrap();
        assert_eq!(doc.len("t"), 4);
        doc.insert("t", 3, "!").unwrap();
        assert_eq!(doc.text("t"), "a😀!b");
    }

    #[test]
    fn garbage_updates_and_state_vectors_are_errors() {
        let doc = SharedDoc::new();
        assert!(matches!(
            doc.apply_update(&[0xff, 0xff, 0xff]),
            Err(DocError::InvalidUpdate(_))
        ));
        assert!(matches!(
            doc.diff(&[0xff, 0xff]),
            Err(DocError::InvalidStateVector(_))
        ));
    }

    #[test]
    fn state_vector_sync_brings_a_replica_up_to_date() {
        let a = SharedDoc::with_client_id(1);
        let b = SharedDoc::with_client_id(2);
        a.insert("t", 0, "shared history").unwrap();
        let missing = a.diff(&b.state_vector()).unwrap();
        b.apply_update(&missing).unwrap();
        assert_eq!(b.text("t"), "shared history");
        let fresh = SharedDoc::with_client_id(3);
        fresh.apply_update(&a.snapshot()).unwrap();
        assert_eq!(fresh.text("t"), "shared history");
        assert_eq!(fresh.state_vector(), a.state_vector());
    }

    #[test]
    fn observers_see_deltas_an_editor_can_apply() {
        let a = SharedDoc::with_client_id(1);
        let b = SharedDoc::with_client_id(2);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let id = b.observe("t", move |delta| sink.lock().unwrap().push(delta));
        let u = a.insert("t", 0, "abc").unwrap();
        b.apply_update(&u).unwrap();
        let u = a.delete("t", 1, 1).unwrap();
        b.apply_update(&u).unwrap();
        assert_eq!(
            *seen.lock().unwrap(),
            [
                vec![TextDelta::Insert("abc".into())],
                vec![TextDelta::Retain(1), TextDelta::Delete(1)]
            ]
        );
        assert!(b.unobserve("t", id));
        b.apply_update(&a.insert("t", 0, "z").unwrap()).unwrap();
        assert_eq!(seen.lock().unwrap().len(), 2);
    }

    /// A Yjs application (a rich-text editor) puts an image and a table in a text; a replica here
    /// edits the same text by the positions its content shows. Each embed takes one position in
    /// the document, so it must take one in the content and in the deltas too, or every edit
    /// after it lands somewhere else than where the user made it.
    #[test]
    fn an_embed_takes_one_position_in_the_text_and_its_deltas() {
        use yrs::{Any, ArrayPrelim, Text as _};
        let yjs = Doc::with_options(Options {
            client_id: yrs::block::ClientID::new(1),
            offset_kind: OffsetKind::Utf16,
            ..Options::default()
        });
        let text = yjs.get_or_insert_text("t");
        let ours = SharedDoc::with_client_id(2);
        let seen = Arc::new(Mutex::new(String::new()));
        let mirror = seen.clone();
        ours.observe("t", move |delta| {
            // What an editor binding does with a delta.
            let mut mirror = mirror.lock().unwrap();
            let mut units: Vec<u16> = mirror.encode_utf16().collect();
            let mut at = 0;
            for step in delta {
                match step {
                    TextDelta::Retain(n) => at += n as usize,
                    TextDelta::Insert(chunk) => {
                        let chunk: Vec<u16> = chunk.encode_utf16().collect();
                        at += chunk.len();
                        units.splice(at - chunk.len()..at - chunk.len(), chunk);
                    }
                    TextDelta::Delete(n) => drop(units.drain(at..at + n as usize)),
                }
            }
            *mirror = String::from_utf16(&units).unwrap();
        });
        let edit = |f: &dyn Fn(&mut yrs::TransactionMut)| {
            let mut txn = yjs.transact_mut();
            f(&mut txn);
            ours.apply_update(&txn.encode_update_v1()).unwrap();
        };
        edit(&|txn| text.insert(txn, 0, "ab😀cd"));
        edit(&|txn| {
            let image = Any::from(std::collections::HashMap::from([(
                "image".to_owned(),
                Any::from("cat.png"),
            )]));
            text.insert_embed(txn, 2, image);
        });
        edit(&|txn| {
            text.insert_embed(txn, 6, ArrayPrelim::default());
        });
        let content = ours.text("t");
        assert_eq!(content, "ab\u{FFFC}😀c\u{FFFC}d");
        assert_eq!(content.encode_utf16().count(), ours.len("t") as usize);
        assert_eq!(
            *seen.lock().unwrap(),
            content,
            "the deltas give the content"
        );
        // The user types after the "c" of what the replica shows.
        let at = content.find('c').unwrap() + 1;
        let at = content[..at].encode_utf16().count() as u32;
        let typed = ours.insert("t", at, "X").unwrap();
        yjs.transact_mut()
            .apply_update(Update::decode_v1(&typed).unwrap())
            .unwrap();
        assert_eq!(text.get_string(&yjs.transact()), "ab😀cXd");
        assert_eq!(ours.text("t"), "ab\u{FFFC}😀cX\u{FFFC}d");
        // Deleting the embed's character deletes the embed.
        let removed = ours.delete("t", 2, 1).unwrap();
        yjs.transact_mut()
            .apply_update(Update::decode_v1(&removed).unwrap())
            .unwrap();
        assert_eq!(text.len(&yjs.transact()), ours.len("t"));
        assert_eq!(ours.text("t"), "ab😀cX\u{FFFC}d");
        // The digest stays on what Yjs's toString() reads, so that replicas on a Y.Doc agree.
        assert_eq!(
            ours.digest(),
            digest_texts(vec![("t".into(), "ab😀cXd".into())])
        );
    }

    #[test]
    fn a_diff_against_the_same_version_carries_no_insertions() {
        let a = SharedDoc::with_client_id(1);
        a.insert("t", 0, "abc").unwrap();
        a.delete("t", 0, 1).unwrap();
        assert!(!has_insertions(&a.diff(&a.state_vector()).unwrap()));
        let b = SharedDoc::with_client_id(2);
        assert!(!has_insertions(&b.diff(&a.state_vector()).unwrap()));
        assert!(has_insertions(&a.diff(&b.state_vector()).unwrap()));
    }

    #[test]
    fn a_text_known_only_from_remote_updates_counts_in_the_digest() {
        let a = SharedDoc::with_client_id(1);
        let b = SharedDoc::with_client_id(2);
        b.apply_update(&a.insert("notes", 0, "hi").unwrap())
            .unwrap();
        assert_eq!(b.digest(), a.digest(), "before b opens the text");
        assert_ne!(b.digest(), SharedDoc::with_client_id(3).digest());
        assert_eq!(b.text("notes"), "hi");
        assert_eq!(b.digest(), a.digest(), "after b opens the text");
    }

    #[test]
    fn an_opened_empty_text_does_not_change_the_digest() {
        let a = SharedDoc::with_client_id(1);
        let b = SharedDoc::with_client_id(2);
        assert_eq!(a.text("notes"), "");
        assert_eq!(a.digest(), b.digest());
    }

    #[test]
    fn a_delete_changes_the_version_though_not_the_state_vector() {
        let a = SharedDoc::with_client_id(1);
        let b = SharedDoc::with_client_id(2);
        b.apply_update(&a.insert("t", 0, "abc").unwrap()).unwrap();
        assert_eq!(a.version(), b.version());
        let delete = a.delete("t", 1, 1).unwrap();
        assert_eq!(
            a.state_vector(),
            b.state_vector(),
            "a delete moves no state vector"
        );
        assert_ne!(a.version(), b.version(), "but it moves the version");
        b.apply_update(&delete).unwrap();
        assert_eq!(a.version(), b.version());
        assert_eq!(a.digest(), b.digest());
    }

    #[test]
    fn the_version_does_not_depend_on_how_the_deletes_arrived() {
        let a = SharedDoc::with_client_id(1);
        let b = SharedDoc::with_client_id(2);
        let insert = a.insert("t", 0, "abcdef").unwrap();
        b.apply_update(&insert).unwrap();
        let d1 = a.delete("t", 1, 1).unwrap();
        let d2 = a.delete("t", 1, 1).unwrap();
        b.apply_update(&d2).unwrap();
        b.apply_update(&d1).unwrap();
        assert_eq!(a.version(), b.version());
    }

    #[test]
    fn merged_updates_apply_as_the_originals() {
        let a = SharedDoc::with_client_id(1);
        let mut updates: Vec<Vec<u8>> = (0..20)
            .map(|i| a.insert("t", i, &i.to_string()[..1]).unwrap())
            .collect();
        updates.push(a.delete("t", 3, 4).unwrap());
        let refs: Vec<&[u8]> = updates.iter().map(Vec::as_slice).collect();
        let merged = merge_updates(&refs).unwrap();
        let b = SharedDoc::with_client_id(2);
        b.apply_update(&merged).unwrap();
        assert_eq!(b.text("t"), a.text("t"));
        assert_eq!(b.version(), a.version());
    }

    /// Updates that hold the same items once as content and once as a garbage-collected range
    /// (what a sync answer holds after their parent's deletion), many at once, as when a tab's
    /// stored updates are compacted: yrs sorts its decoders before every run of blocks it writes,
    /// and with more than 20 the standard sort panicked on its comparison, which was not a total
    /// order (an item and a GC range at one id were each "less" than the other).
    #[test]
    fn many_updates_with_an_item_and_its_collected_range_merge() {
        use yrs::{Map, MapPrelim, MapRef};
        // A map in a map: deleting the inner map collects its entries into a GC range, which is
        // what a later snapshot holds where the first update held the entries themselves.
        let doc = Doc::with_client_id(7);
        let outer: MapRef = doc.get_or_insert_map("m");
        let record = |f: &dyn Fn(&mut yrs::TransactionMut)| {
            let mut txn = doc.transact_mut();
            f(&mut txn);
            txn.encode_update_v1()
        };
        let created = record(&|txn| {
            outer.insert(txn, "inner", MapPrelim::default());
        });
        let since = doc.transact().state_vector();
        let inserted = record(&|txn| {
            let inner: MapRef = outer.get(txn, "inner").unwrap().cast().unwrap();
            for key in ["a", "b", "c", "d", "e", "f"] {
                inner.insert(txn, key, key);
            }
        });
        let deleted = record(&|txn| {
            outer.remove(txn, "inner");
        });
        // What a replica that had the map but not its entries receives in sync: the entries'
        // range, collected.
        let collected = doc.transact().encode_state_as_update_v1(&since);
        let shown = format!("{:?}", Update::decode_v1(&collected).unwrap());
        assert!(shown.contains("gc"), "no GC range in {shown}");
        let want = doc.transact().state_vector();
        // Which updates are the collected range: 1,000 arrangements of each count.
        for n in [21usize, 24, 25, 28, 32, 40, 64, 100] {
            for pattern in 0..1000u64 {
                let refs: Vec<&[u8]> = (0..n)
                    .map(|i| {
                        let x = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                            ^ pattern.wrapping_mul(0xD1B5_4A32_D192_ED03);
                        let gc = (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) & 1 == 1;
                        if gc {
                            collected.as_slice()
                        } else {
                            inserted.as_slice()
                        }
                    })
                    .chain([created.as_slice(), deleted.as_slice()])
                    .collect();
                let merged = merge_updates(&refs).unwrap();
                let b = Doc::with_client_id(8);
                b.transact_mut()
                    .apply_update(Update::decode_v1(&merged).unwrap())
                    .unwrap();
                let m = b.get_or_insert_map("m");
                assert_eq!(m.len(&b.transact()), 0, "{n} updates, pattern {pattern}");
                assert_eq!(b.transact().state_vector(), want);
            }
        }
    }

    /// A room stored before the Yjs check existed may hold what the check now refuses at the
    /// door (a value nested 200 deep in a map): loading the room's log, or a tab's stored
    /// updates, applies it all the same, so that the room does not lose it.
    #[test]
    fn what_a_room_stored_before_the_check_still_loads() {
        use yrs::{Any, Map};
        let doc = Doc::with_client_id(4);
        let map = doc.get_or_insert_map("settings");
        let mut deep = Any::from("leaf");
        for _ in 0..200 {
            deep = Any::from(vec![deep]);
        }
        let update = {
            let mut txn = doc.transact_mut();
            map.insert(&mut txn, "tree", deep);
            txn.encode_update_v1()
        };
        let room = SharedDoc::with_client_id(5);
        assert!(room.apply_update(&update).is_err(), "refused at the door");
        room.apply_stored(&update).unwrap();
        let late = SharedDoc::with_client_id(6);
        Replica::apply_update(&mut { late }, &room.snapshot()).unwrap();
    }

    /// What a sync answer may hold: only blocks at ids the document has and deletions it made,
    /// collected ones included; a deleted range that runs past what was deleted is refused.
    /// `state_of` (the patched yrs's one entry of the state vector) agrees with the state
    /// vector, for clients written in order, out of order (held back) and not at all.
    #[test]
    fn one_clients_state_is_its_entry_of_the_state_vector() {
        let a = SharedDoc::with_client_id(3);
        let first = a.insert("t", 0, "abc").unwrap();
        let second = a.insert("t", 3, "def").unwrap();
        let doc = SharedDoc::new();
        doc.apply_update(&second).unwrap();
        let b = SharedDoc::with_client_id(4).insert("t", 0, "xy").unwrap();
        doc.apply_update(&b).unwrap();
        let check = |doc: &SharedDoc| {
            let txn = doc.doc.transact();
            let vector = txn.state_vector();
            for client in [3, 4, 5, doc.client_id()] {
                let client = ClientID::new(client);
                assert_eq!(txn.state_of(client), vector.get(&client));
            }
        };
        check(&doc);
        doc.apply_update(&first).unwrap();
        check(&doc);
    }

    #[test]
    fn an_update_is_held_only_when_every_block_and_deletion_is_here() {
        let room = SharedDoc::with_client_id(1);
        let writer = SharedDoc::with_client_id(11);
        let first = writer.insert("t", 0, "hello world").unwrap();
        room.apply_update(&first).unwrap();
        assert_eq!(room.holds(&first), Ok(()));
        assert_eq!(room.holds(&room.snapshot()), Ok(()));
        let cut = writer.delete("t", 0, 6).unwrap();
        room.apply_update(&cut).unwrap();
        assert_eq!(room.holds(&cut), Ok(()));
        assert_eq!(room.holds(&writer.snapshot()), Ok(()));
        // The forger writes as client 11, and deletes more than was deleted.
        let forger = SharedDoc::with_client_id(11);
        forger.apply_update(&writer.snapshot()).unwrap();
        let more = forger.delete("t", 0, 2).unwrap();
        let next = forger.insert("t", 0, "x").unwrap();
        let refused = room.holds(&more).unwrap_err();
        assert!(
            refused.contains("deletes client 11's clocks 6..8"),
            "{refused}"
        );
        let refused = room.holds(&next).unwrap_err();
        assert!(refused.contains("client 11's clocks 11..12"), "{refused}");
        assert!(room.holds(&forger.snapshot()).is_err());
        // A client the document never saw.
        let stranger = SharedDoc::with_client_id(99);
        let theirs = stranger.insert("t", 0, "?").unwrap();
        assert!(room.holds(&theirs).unwrap_err().contains("client 99"));
    }

    /// One range repeated 100,000 times over 1,000 blocks (10^8 visits of the document, walked
    /// range by range; a 64 MiB answer holds 20 million such ranges) is refused before the
    /// document is walked: no writer repeats a range.
    #[test]
    fn a_delete_set_of_one_range_repeated_is_refused_unwalked() {
        let room = SharedDoc::with_client_id(1);
        let writer = SharedDoc::with_client_id(11);
        for _ in 0..1_000 {
            let update = writer.insert("t", 0, "x").unwrap();
            room.apply_update(&update).unwrap();
        }
        let update = writer.delete("t", 0, 1_000).unwrap();
        room.apply_update(&update).unwrap();
        let mut repeated = vec![0, 1, 11];
        let count = 100_000u32;
        let mut n = count;
        while n >= 0x80 {
            repeated.push((n as u8 & 0x7f) | 0x80);
            n >>= 7;
        }
        repeated.push(n as u8);
        for _ in 0..count {
            repeated.extend_from_slice(&[0, 0xe8, 0x07]);
        }
        let refused = room.holds(&repeated).unwrap_err();
        assert!(refused.contains("overlaps or comes before"), "{refused}");
        // Once, it is held.
        let once = [0, 1, 11, 1, 0, 0xe8, 0x07];
        assert_eq!(room.holds(&once), Ok(()));
    }

    #[test]
    fn different_content_gives_a_different_digest() {
        let a = SharedDoc::with_client_id(1);
        let b = SharedDoc::with_client_id(2);
        a.insert("t", 0, "x").unwrap();
        b.insert("t", 0, "y").unwrap();
        assert_ne!(a.digest(), b.digest());
    }

    /// The updates of the hostile-member findings (the inputs that made published yrs 0.28.1
    /// hang or panic): each is refused with an error, and the document stays readable.
    #[test]
    fn hostile_updates_are_refused_and_the_document_stays_usable() {
        let doc = SharedDoc::with_client_id(33);
        doc.apply_update(
            &SharedDoc::with_client_id(11)
                .insert("content", 0, "hello")
                .unwrap(),
        )
        .unwrap();
        // A client's blocks in two sections: an item linked to itself, a read that never ends.
        let cycle = [
            2, 1, 22, 0, 193, 11, 4, 11, 11, 1, 1, 22, 0, 193, 11, 4, 11, 11, 1, 1, 11, 1, 4, 1,
        ];
        assert!(matches!(
            doc.apply_update(&cycle),
            Err(DocError::InvalidUpdate(reason)) if reason.contains("a client in a second section")
        ));
        // A clock past 2^32 - 1 (an `unwrap` on `None` in the block store).
        let overflow = [
            1, 1, 11, 180, 238, 154, 146, 11, 196, 11, 4, 11, 5, 6, 44, 32, 100, 101, 97, 114, 0,
        ];
        let _ = doc.apply_update(&overflow);
        // Content reference 18 names no content type (published yrs read it as JSON).
        let mut unknown = vec![1, 1, 11, 0, 0x12, 1, 7];
        unknown.extend_from_slice(b"content");
        unknown.extend_from_slice(&[2, 1, b'1', 1, b'2', 0]);
        assert!(doc.apply_update(&unknown).is_err());
        // A client id of 2^53, beyond what Yjs holds (a failed assertion in yrs).
        let mut client = vec![
            1, 1, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x10, 0, 4, 1, 7,
        ];
        client.extend_from_slice(b"content");
        client.extend_from_slice(&[1, b'x', 0]);
        assert!(matches!(
            doc.apply_update(&client),
            Err(DocError::InvalidUpdate(reason)) if reason.contains("2^53")
        ));
        // A deleted range that runs past clock 2^32 - 1 (an overflow in yrs).
        let deletes = [0, 1, 1, 1, 0xff, 0xff, 0xff, 0xff, 0x0f, 2];
        assert!(matches!(
            doc.apply_update(&deletes),
            Err(DocError::InvalidUpdate(reason)) if reason.contains("2^32")
        ));
        assert_eq!(doc.text("content"), "hello");
        let copy = SharedDoc::new();
        copy.apply_update(&doc.snapshot()).unwrap();
        assert_eq!(copy.text("content"), "hello");
    }

    /// Two replicas that took the same updates in different orders are at the same version:
    /// the checkpoint compares versions byte for byte, and a state vector written in the
    /// order of a hash map's insertion history made equal replicas look different (so their
    /// digests were never compared, and a desync between them would go unreported).
    #[test]
    fn equal_replicas_have_equal_versions_whatever_the_order_of_their_updates() {
        let updates: Vec<Vec<u8>> = (1..=24)
            .map(|client| {
                SharedDoc::with_client_id(client)
                    .insert("content", 0, &client.to_string())
                    .unwrap()
            })
            .collect();
        let forward = SharedDoc::with_client_id(100);
        let backward = SharedDoc::with_client_id(101);
        for update in &updates {
            forward.apply_update(update).unwrap();
        }
        for update in updates.iter().rev() {
            backward.apply_update(update).unwrap();
        }
        assert_eq!(forward.text("content"), backward.text("content"));
        assert_eq!(forward.version(), backward.version());
        let copy = SharedDoc::new();
        copy.apply_update(&forward.snapshot()).unwrap();
        assert_eq!(copy.version(), forward.version());
        // Two clients, one of them local: the case the simulation's checkpoints see most.
        let a = SharedDoc::with_client_id(1);
        a.insert("content", 0, "a").unwrap();
        a.apply_update(
            &SharedDoc::with_client_id(33)
                .insert("content", 0, "b")
                .unwrap(),
        )
        .unwrap();
        let copy = SharedDoc::new();
        copy.apply_update(&a.snapshot()).unwrap();
        assert_eq!(copy.version(), a.version());
    }

    /// A GC range that overlaps one the document holds past a hole: published yrs kept the
    /// overlap twice when it trimmed the update (an underflow, or a corrupted block list in
    /// release builds). The range is taken once, and the document stays readable.
    #[test]
    fn a_gc_range_overlapping_a_known_one_is_taken_once() {
        let doc = SharedDoc::with_client_id(1);
        doc.insert("content", 0, "hello").unwrap();
        // Client 33: a GC range at clocks 39..150 (0..39 becomes a hole), then one at 7..118.
        doc.apply_update(&[1, 1, 33, 39, 0, 111, 0]).unwrap();
        doc.apply_update(&[1, 1, 33, 7, 0, 111, 0]).unwrap();
        doc.apply_update(&[1, 1, 33, 0, 0, 7, 0]).unwrap();
        let copy = SharedDoc::new();
        copy.apply_update(&doc.snapshot()).unwrap();
        assert_eq!(copy.text("content"), "hello");
        assert_eq!(copy.version(), doc.version());
        assert_eq!(copy.digest(), doc.digest());
    }

    /// An item whose origin or right origin lies in a collected (GC) range, its other
    /// neighbour a live character (no Yjs client writes one; a hostile member can): Yjs
    /// collects the item (its parent is unknown), where published yrs placed it next to its
    /// other neighbour, visible. The relay's document showed a character that no Yjs tab did,
    /// with the same state vector, so no sync mended it. Now yrs collects it too: the document
    /// is what a GC range over the item gives, as in Yjs.
    #[test]
    fn an_item_next_to_a_collected_range_is_collected_as_yjs_collects_it() {
        // Client 9: a GC range at clock 0, then "z" at clock 1 between it and client 7's
        // clock 2 (the first "l" of "hello"); and the other way round.
        let origin_collected = [1, 2, 9, 0, 0, 1, 0xC4, 9, 0, 7, 2, 1, b'z', 0];
        let right_collected = [1, 2, 9, 0, 0, 1, 0xC4, 7, 2, 9, 0, 1, b'z', 0];
        for update in [origin_collected, right_collected] {
            let doc = SharedDoc::with_client_id(1);
            let writer = SharedDoc::with_client_id(7);
            doc.apply_update(&writer.insert("content", 0, "hello").unwrap())
                .unwrap();
            let collected = SharedDoc::with_client_id(1);
            collected.apply_update(&doc.snapshot()).unwrap();
            collected.apply_update(&[1, 1, 9, 0, 0, 2, 0]).unwrap();
            doc.apply_update(&update).unwrap();
            assert_eq!(doc.text("content"), "hello", "{update:?}");
            assert_eq!(doc.version(), collected.version(), "{update:?}");
            let copy = SharedDoc::new();
            copy.apply_update(&doc.snapshot()).unwrap();
            assert_eq!(copy.text("content"), "hello", "{update:?}");
            // A member's update, sent again after a reconnect, is what the document holds.
            let room = SharedDoc::with_client_id(1);
            room.apply_update(&writer.snapshot()).unwrap();
            room.apply_member_update(&update).unwrap();
            room.apply_member_update(&update).unwrap();
            assert_eq!(room.version(), collected.version(), "{update:?}");
        }
    }

    /// A member's item that continues its client's clocks past the last one the document
    /// holds, where the document holds that one collected (a GC range at the client's clock 0,
    /// then an item at clocks 0..2: its first clock is a resend, its second new). yrs and Yjs
    /// integrate the new part after the clock before it, and Yjs throws on an item whose left
    /// neighbour is collected ("Cannot read properties of undefined"), so every Yjs tab the
    /// relay passed it to failed on it. No Yjs client writes one; the relay takes none, as a
    /// member's update or in a document given back.
    #[test]
    fn an_item_that_continues_a_collected_range_is_refused() {
        let writer = SharedDoc::with_client_id(7);
        let hello = writer.insert("content", 0, "hello").unwrap();
        // Client 9: "zz" at clocks 0..2 in the root text "content"; and after client 7's clock
        // 1 (the "e").
        let mut named = vec![1, 1, 9, 0, 0x04, 1, 7];
        named.extend_from_slice(b"content");
        named.extend_from_slice(&[2, b'z', b'z', 0]);
        let after_e = vec![1, 1, 9, 0, 0x84, 7, 1, 2, b'z', b'z', 0];
        for update in [named, after_e] {
            let room = SharedDoc::with_client_id(1);
            room.apply_update(&hello).unwrap();
            room.apply_member_update(&[1, 1, 9, 0, 0, 1, 0]).unwrap();
            let Err(DocError::NotTaken(why)) = room.apply_member_update(&update) else {
                panic!("taken: {update:?}")
            };
            assert!(why.contains("client 9's clocks 0..2"), "{why}");
            assert!(why.contains("holds collected"), "{why}");
            let Err(DocError::NotTaken(why)) = room.apply_given_back(&update) else {
                panic!("given back: {update:?}")
            };
            assert!(why.contains("collected"), "{why}");
            assert_eq!(room.text("content"), "hello");
            // Where clock 0 is an item, the same shape is a resend and its continuation (an
            // outbox merged after a reconnect).
            let live = SharedDoc::with_client_id(1);
            live.apply_update(&hello).unwrap();
            let tab = SharedDoc::with_client_id(9);
            tab.apply_update(&hello).unwrap();
            let first = tab.insert("content", 0, "z").unwrap();
            let second = tab.insert("content", 1, "z").unwrap();
            live.apply_member_update(&first).unwrap();
            let outbox = crate::doc::merge_updates(&[&first, &second]).unwrap();
            live.apply_member_update(&outbox).unwrap();
            assert_eq!(live.text("content"), "zzhello");
        }
    }

    /// Two shapes on which Yjs and yrs part, each found against Yjs itself: an item of no
    /// length (an empty string, say), which yrs drops and Yjs keeps, so that Yjs throws on the
    /// next update that looks up its client's clocks ("Cannot read properties of undefined"):
    /// a member's empty item at another member's next clock broke every Yjs tab on that
    /// member's next keystroke; and a client's blocks followed by a second, empty section of
    /// the same client, whose blocks yrs applies and Yjs drops (it keeps a client's last
    /// section). No Yjs client writes either; neither is taken.
    #[test]
    fn an_empty_item_or_an_empty_second_section_is_refused() {
        let writer = SharedDoc::with_client_id(7);
        let hello = writer.insert("content", 0, "hello").unwrap();
        let mut after_a = vec![1, 2, 9, 0, 0x04, 1, 7];
        after_a.extend_from_slice(b"content");
        after_a.extend_from_slice(&[1, b'a', 0x84, 9, 0, 0, 0]);
        let mut emptied = vec![2, 1, 9, 0, 0x04, 1, 7];
        emptied.extend_from_slice(b"content");
        emptied.extend_from_slice(&[2, b'a', b'b', 0, 9, 0, 0]);
        let at_next_clock = vec![1, 1, 7, 5, 0x84, 7, 4, 0, 0];
        for update in [after_a, emptied, at_next_clock] {
            let room = SharedDoc::with_client_id(1);
            room.apply_update(&hello).unwrap();
            let Err(DocError::InvalidUpdate(why)) = room.apply_member_update(&update) else {
                panic!("taken: {update:?}")
            };
            assert!(why.contains("not an update Yjs applies"), "{why}");
            assert_eq!(room.text("content"), "hello");
        }
    }

    /// An item whose right origin lies left of its origin (no Yjs client writes one; a hostile
    /// member can): published yrs placed it by the order updates arrived in, so two replicas,
    /// and a replica and its own snapshot, held different texts for good. Its right origin is
    /// now ignored, the same way whatever the order.
    #[test]
    fn an_item_whose_right_origin_precedes_its_origin_lands_the_same_in_any_order() {
        let base = SharedDoc::with_client_id(1);
        let abc = base.insert("content", 0, "abcdef").unwrap();
        let writer = SharedDoc::with_client_id(2);
        writer.apply_update(&abc).unwrap();
        let honest = writer.insert("content", 6, "XYZ").unwrap();
        // Client 9: "!!" after (1, 5) (the "f"), before (1, 1) (the "b").
        let hostile = [1, 1, 9, 0, 0xC4, 1, 5, 1, 1, 2, b'!', b'!', 0];
        let first = SharedDoc::with_client_id(3);
        let second = SharedDoc::with_client_id(4);
        for update in [&abc[..], &honest, &hostile] {
            first.apply_update(update).unwrap();
        }
        for update in [&abc[..], &hostile, &honest] {
            second.apply_update(update).unwrap();
        }
        assert_eq!(first.text("content"), second.text("content"));
        let copy = SharedDoc::new();
        copy.apply_update(&first.snapshot()).unwrap();
        assert_eq!(copy.text("content"), first.text("content"));
        assert_eq!(copy.digest(), first.digest());
    }

    /// An update whose blocks wait for a missing client, one of them with a parent that is
    /// text, not a shared type: published yrs kept them pending and wrote them into the
    /// document's snapshot, which then failed to apply anywhere ("block parent must be deleted
    /// or shared ref type"), so a room compacted over it could not be loaded. Such an item is
    /// collected, as Yjs does.
    #[test]
    fn a_snapshot_holding_an_item_whose_parent_is_text_applies() {
        let a = SharedDoc::with_client_id(11);
        let b = SharedDoc::with_client_id(22);
        let u1 = a.insert("content", 0, "hello world, ").unwrap();
        b.apply_update(&u1).unwrap();
        let u2 = b.insert("content", 13, "this is shared text").unwrap();
        let doc = SharedDoc::with_client_id(33);
        doc.apply_update(&u1).unwrap();
        doc.apply_update(&u2).unwrap();
        // Client 22 again: a deleted range whose parent is missing, then JSON under <22#0>.
        let hostile = [
            2, 2, 22, 1, 1, 50, 0, 0, 255, 206, 255, 255, 22, 2, 2, 22, 0, 1, 2, 0, 3, 0, 6, 0, 0,
            0, 1,
        ];
        let _ = doc.apply_update(&hostile);
        let copy = SharedDoc::new();
        copy.apply_update(&doc.snapshot())
            .expect("the snapshot applies");
        assert_eq!(copy.text("content"), doc.text("content"));
    }

    /// An item whose author's earlier items are missing waits for them, as in Yjs. Published
    /// yrs integrated it behind a skip, so what a replica showed depended on the order updates
    /// came in, and a replica built from its snapshot (which lists a held-back earlier item
    /// first) showed something else, for good when the earlier item never resolves.
    #[test]
    fn an_item_after_a_clock_gap_waits_for_the_gap() {
        let a = SharedDoc::with_client_id(1);
        let first = a.insert("content", 0, "x").unwrap();
        let second = a.insert("content", 1, "y").unwrap();
        let doc = SharedDoc::with_client_id(2);
        doc.apply_update(&second).unwrap();
        assert_eq!(doc.text("content"), "");
        assert!(doc.has_pending());
        let copy = SharedDoc::new();
        copy.apply_update(&doc.snapshot()).unwrap();
        assert_eq!(copy.text("content"), "");
        doc.apply_update(&first).unwrap();
        assert_eq!(doc.text("content"), "xy");
        assert!(!doc.has_pending());
        // Items of clients 1 and 62 at clock 1473, before ",", then an item of client 1
        // at clock 1 that never resolves (its parent is itself): the replica and its
        // snapshot's copy show the same text.
        let input = include_bytes!("../../fuzz/corpus/document/item-after-a-clock-gap");
        let (head, tail) = input.split_at(input.len() / 2);
        let doc = SharedDoc::with_client_id(3);
        let hello = SharedDoc::with_client_id(11);
        doc.apply_update(&hello.insert("content", 0, "hello world, ").unwrap())
            .unwrap();
        let _ = doc.apply_update(head);
        let _ = doc.apply_update(tail);
        let copy = SharedDoc::new();
        copy.apply_update(&doc.snapshot()).unwrap();
        assert_eq!(copy.text("content"), doc.text("content"));
    }

    /// JSON content (written by old Yjs versions) holds as many strings as its count says:
    /// published yrs read one more, so it refused Yjs's bytes and could not decode its own.
    #[test]
    fn json_content_decodes_as_it_is_encoded() {
        let mut json = vec![1, 1, 11, 0, 2, 1, 7];
        json.extend_from_slice(b"content");
        json.extend_from_slice(&[2, 1, b'1', 1, b'2', 0]);
        let doc = SharedDoc::new();
        doc.apply_update(&json).unwrap();
        assert_eq!(merge_updates(&[&json]).unwrap(), json);
    }

    #[test]
    fn a_yjs_snapshot_gives_the_same_version_as_the_document() {
        let a = SharedDoc::with_client_id(7);
        let b = SharedDoc::with_client_id(3);
        b.apply_update(&a.insert("content", 0, "hello world").unwrap())
            .unwrap();
        a.apply_update(&b.insert("content", 5, ", dear").unwrap())
            .unwrap();
        a.apply_update(&b.delete("content", 0, 2).unwrap()).unwrap();
        a.delete("content", 8, 3).unwrap();
        let encoded = a.doc.transact().snapshot().encode_v1();
        assert_eq!(Version::from_snapshot(&encoded).unwrap(), a.version());
        assert!(Version::from_snapshot(&encoded[..encoded.len() - 1]).is_err());
        assert!(Version::from_snapshot(&[0x80; 12]).is_err());
        assert_eq!(
            digest_texts(vec![
                ("content".into(), a.text("content")),
                ("x".into(), "".into())
            ]),
            a.digest()
        );
    }

    /// One Yjs v1 item of text `"x"` for [`crafted`]: `(client, clock)` origins.
    type Crafted = (Option<(u64, u64)>, Option<(u64, u64)>);

    /// A Yjs v1 update of one-character items, each `(client, items)` written from clock 0.
    fn crafted(clients: &[(u64, Vec<Crafted>)]) -> Vec<u8> {
        let mut out = Vec::new();
        write_var(&mut out, clients.len() as u64);
        for (client, items) in clients {
            write_var(&mut out, items.len() as u64);
            write_var(&mut out, *client);
            out.push(0);
            for (origin, right) in items {
                out.push(4 | u8::from(origin.is_some()) << 7 | u8::from(right.is_some()) << 6);
                for (c, clock) in origin.iter().chain(right) {
                    write_var(&mut out, *c);
                    write_var(&mut out, *clock);
                }
                out.extend_from_slice(&[1, b'x']);
            }
        }
        out.push(0);
        out
    }

    /// Items anchored at the update's own items walk the document as far as those land: an
    /// item placed near the end, then 1,000 items between the first character and it (each
    /// walks the whole text); 4,000 clients' items after one of the update's own items (each
    /// walks past those placed before it); and 4,000 clients' items each before one of 4,000
    /// items of one client at one place (each walks past the rest of them); items before an item
    /// yrs places far from its origin, after one of the update's own items and before the end,
    /// or between origins the update places items between; a deleted range as right origin. A
    /// list written newest first, by two clients one after the other or in turns, and an outbox
    /// that typed inside a pasted word and then in front of what it typed, walk nothing and are
    /// taken.
    #[test]
    fn items_anchored_at_the_updates_own_items_count_what_they_walk() {
        let doc = SharedDoc::with_client_id(7);
        let m = 5_000u64;
        doc.insert("content", 0, &"ab".repeat(m as usize)).unwrap();
        for i in 0..m {
            doc.delete("content", i as u32 + 1, 1).unwrap();
        }
        let too_costly = |update: &[u8]| {
            matches!(
                doc.check_member_update(update),
                Err(DocError::TooCostly { .. })
            )
        };
        let far = crafted(&[(
            9,
            std::iter::once((Some((7, 2 * m - 3)), Some((7, 2 * m - 2))))
                .chain((0..1_000).map(|_| (Some((7, 0)), Some((9, 0)))))
                .collect(),
        )]);
        assert!(too_costly(&far));
        // 4,000 clients' items after one of the update's own items, all before one right
        // origin: each stops in conflict at the one placed before it, and hops over the rest
        // to check where its right origin lies (31 ms in a release build; 20,000 take 1 to 2 s,
        // and 60,000 ten times that).
        let after_own = |clients: u64| {
            let mut after_own = vec![(9, vec![(Some((7, 0)), Some((7, 1)))])];
            after_own.extend((0..clients).map(|c| (1_000 + c, vec![(Some((9, 0)), Some((7, 1)))])));
            crafted(&after_own)
        };
        doc.check_member_update(&after_own(4_000)).unwrap();
        assert!(too_costly(&after_own(60_000)));
        let mut before_own = vec![(9, vec![(Some((7, 0)), Some((7, 1))); 4_000])];
        before_own.extend((0..4_000).map(|c| (1_000 + c, vec![(Some((7, 0)), Some((9, c)))])));
        assert!(too_costly(&crafted(&before_own)));
        // An item with no origin that yrs places near the end (it walks the text once), then
        // 1,000 items first in the text before it: each walks the text up to it.
        let no_origin = crafted(&[
            (9, vec![(None, Some((7, 2 * m - 2)))]),
            (10, vec![(None, Some((9, 0))); 1_000]),
        ]);
        assert!(too_costly(&no_origin));
        // 60,000 items after one of the update's own items, before the last character: placing
        // each checks where its right origin lies, past every item of the text.
        let hops = crafted(&[
            (9, vec![(Some((7, 0)), Some((7, 1)))]),
            (10, vec![(Some((9, 0)), Some((7, 2 * m - 2))); 60_000]),
        ]);
        assert!(too_costly(&hops));
        // 3,000 items after the second character, then 3,000 items after the first and before
        // the third: each walks past the first 3,000.
        let between = crafted(&[
            (20, vec![(Some((7, 1)), Some((7, 2))); 3_000]),
            (10, vec![(Some((7, 0)), Some((7, 2))); 3_000]),
        ]);
        assert!(too_costly(&between));
        // A deleted range the document keeps no item of as the right origin: yrs places the
        // items before the end of the text, and each walks it.
        let mut gc = vec![1];
        write_var(&mut gc, 1_001);
        gc.extend_from_slice(&[9, 0, 0, 1]);
        for _ in 0..1_000 {
            gc.extend_from_slice(&[0xC4, 7, 0, 9, 0, 1, b'x']);
        }
        gc.push(0);
        assert!(too_costly(&gc));
        // One client's 4,000 items after the first character of a block of 10,000, each before
        // another of its characters: each walks past every one placed before it, its own
        // client's too (counted as nothing before).
        let block = SharedDoc::with_client_id(7);
        block.insert("content", 0, &"a".repeat(10_000)).unwrap();
        let own_rights = crafted(&[(
            9,
            (1..=4_000).map(|r| (Some((7, 0)), Some((7, r)))).collect(),
        )]);
        assert!(matches!(
            block.check_member_update(&own_rights),
            Err(DocError::TooCostly { .. })
        ));
        // 20,000 clients' items after the first character and before the second: each stops at
        // the one placed before it (the same right origin), and walks past none.
        let same_place: Vec<_> = (0..20_000)
            .map(|c| (1_000 + c, vec![(Some((7, 0)), Some((7, 1)))]))
            .collect();
        doc.check_member_update(&crafted(&same_place)).unwrap();
        // Two writers each writing newest first at one place, in turn: each entry before the
        // other writer's last one. Integrated in the order yrs takes them, none walks.
        let mut turns = vec![(9, Vec::new()), (10, Vec::new())];
        for k in 0..1_500u64 {
            let right = if k == 0 { (7, 1) } else { (10, k - 1) };
            turns[0].1.push((Some((7, 0)), Some(right)));
            turns[1].1.push((Some((7, 0)), Some((9, k))));
        }
        doc.check_member_update(&crafted(&turns)).unwrap();
        // An outbox that typed inside a pasted word, then in front of what it typed there, 2,000
        // times, before the text of 10,000 blocks: each item before the update's own item lies
        // right of its origin, and walks nothing.
        let pasted = SharedDoc::with_client_id(8);
        pasted.apply_update(&doc.snapshot()).unwrap();
        pasted.insert("content", 0, &"w".repeat(4_001)).unwrap();
        let inside = crafted(&[(
            9,
            (0..2_000u64)
                .flat_map(|i| {
                    let at = 2 * i;
                    [
                        (Some((8, at)), Some((8, at + 1))),
                        (Some((8, at)), Some((9, at))),
                    ]
                })
                .collect(),
        )]);
        pasted.check_member_update(&inside).unwrap();
        // Newest first: each item after the first character, before the one written last.
        let newest_first = |client: u64, first_right: (u64, u64)| {
            std::iter::once((Some((7, 0)), Some(first_right)))
                .chain((1..3_000).map(|i| (Some((7, 0)), Some((client, i - 1)))))
                .collect::<Vec<_>>()
        };
        let list = crafted(&[
            (9, newest_first(9, (7, 1))),
            (10, newest_first(10, (9, 2_999))),
        ]);
        doc.check_member_update(&list).unwrap();
        doc.apply_update(&list).unwrap();
        assert_eq!(doc.text("content").len(), m as usize + 6_000);
    }

    /// What the estimate of [`SharedDoc::check_member_update`] does not count, integration
    /// stops at [`MAX_APPLY_STEPS`]. On a text of 10,000 blocks: one item after the middle
    /// character whose right origin lies behind it (yrs ignores such a right origin, and places
    /// the item where its conflicts let it), then 2,000 items each after the first character and
    /// before that item. The estimate follows the right origin to where it points, ten blocks
    /// on; each really walks half the text (1.3·10^9 steps, 7.5 s in a release build, unbounded).
    /// A member's update stops at the bound ([`DocError::Overran`]); the room's own log,
    /// applied without the bound, takes it.
    #[test]
    fn integrating_a_members_update_stops_where_it_walks_too_far() {
        let doc = SharedDoc::with_client_id(7);
        let m = 5_000u64;
        doc.insert("content", 0, &"ab".repeat(m as usize)).unwrap();
        for i in 0..m {
            doc.delete("content", i as u32 + 1, 1).unwrap();
        }
        let base = doc.snapshot();
        let attack = crafted(&[(
            9,
            std::iter::once((Some((7, m)), Some((7, 10))))
                .chain((0..2_000).map(|_| (Some((7, 0)), Some((9, 0)))))
                .collect(),
        )]);
        doc.check_member_update(&attack).unwrap();
        let Err(DocError::Overran { steps, max }) = doc.admit_member_update(&attack) else {
            panic!("taken whole")
        };
        assert_eq!(max, MAX_APPLY_STEPS);
        // It stops within one item's walk of the bound.
        assert!(
            steps > max && steps < max + 2 * m * (1 + yrs::STEPS_PER_CONFLICT),
            "{steps}"
        );
        // Part of it was integrated before the walk stopped.
        let len = doc.text("content").len();
        assert!(len > m as usize + 1 && len < m as usize + 2_001, "{len}");
        let error = DocError::Overran { steps, max }.to_string();
        assert!(error.contains("send it in smaller edits"), "{error}");
        // The document still encodes whole, and takes further edits.
        let copy = SharedDoc::new();
        copy.apply_update(&doc.snapshot()).unwrap();
        assert_eq!(copy.text("content"), doc.text("content"));
        doc.insert("content", 0, "z").unwrap();
        // An honest update of as many items is far under the bound.
        let honest = SharedDoc::with_client_id(8);
        honest.apply_update(&base).unwrap();
        let typed = honest.insert("content", 5_000, &"x".repeat(6_000)).unwrap();
        let fresh = SharedDoc::new();
        fresh.apply_update(&base).unwrap();
        fresh.admit_member_update(&typed).unwrap();
    }
}
