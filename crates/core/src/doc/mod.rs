//! The shared document: named texts on `yrs` (the Rust port of Yjs), whose edits travel as
//! Yjs v1 updates inside pattern-validated frames, and the checkpoint digest.
//!
//! Convergence comes from a proven CRDT, not from this module: it only adds what the mesh needs
//! around it. Indexes are UTF-16 code units, as in Yjs and in a browser's text fields, so an
//! editor's selection offsets apply as they are. Every edit is checked before it reaches `yrs`:
//! an index past the end is an error, never a panic.
//!
//! The client session does not need texts: it drives any [`Replica`], a Yjs document it can
//! apply updates to, diff against a state vector, and compare at a [`Version`]. [`SharedDoc`] is
//! the built-in one.
//!
//! Without the `yrs` feature (the package's transport-only build), only the interface is here:
//! the application brings its document (a JS `Y.Doc` through the provider).

#[cfg(feature = "yrs")]
mod shared;
/// The test hooks of the built-in document, for the room's tests.
#[cfg(test)]
pub(crate) use shared::tests as shared_tests;
pub mod v1;

use serde::{Deserialize, Serialize};

#[cfg(feature = "yrs")]
pub use shared::{
    check_update, decode_update, merge_updates, SharedDoc, MAX_APPLY_COST, MAX_APPLY_STEPS,
};

/// What went wrong with a document operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DocError {
    /// An insert position past the end of the text.
    #[error("index {index} is past the end of the text (length {len})")]
    IndexOutOfRange {
        /// The index given.
        index: u32,
        /// The text's length in UTF-16 code units.
        len: u32,
    },
    /// A deletion that runs past the end of the text.
    #[error("deleting {length} from index {index} runs past the end of the text (length {len})")]
    RangeOutOfRange {
        /// The start given.
        index: u32,
        /// The length given.
        length: u32,
        /// The text's length.
        len: u32,
    },
    /// Bytes that are not a Yjs v1 update, or an update that cannot be applied.
    #[error("invalid Yjs update: {0}")]
    InvalidUpdate(String),
    /// A member's update the room's document does not take: it needs clocks no one has written
    /// (it deletes them, or writes after them or next to them), or it writes clocks the
    /// document holds with other content (see
    /// [`SharedDoc::apply_member_update`](shared::SharedDoc::apply_member_update)).
    #[error("{0}")]
    NotTaken(String),
    /// A member's update that cuts so many blocks (deleted ranges, or items placed inside
    /// others), or places items between origins so far apart, that applying it would cost more
    /// than [`MAX_APPLY_COST`] (see [`SharedDoc::check_member_update`]).
    #[error("applying it costs too much, send it in smaller edits: it cuts so many blocks (deleted ranges, items placed inside others), or places items between origins so far apart, that it costs {cost} in clocks copied, blocks moved and items walked past, over the bound of {max}")]
    TooCostly {
        /// What applying it would cost.
        cost: u64,
        /// The bound.
        max: u64,
    },
    /// A member's update whose integration walked past more items than
    /// [`MAX_APPLY_STEPS`] allows (items placed between origins far apart, in shapes the
    /// estimate of [`SharedDoc::check_member_update`] does not count): yrs stopped integrating
    /// it there. The document holds the part integrated until then, so its owner builds it
    /// again without the update.
    #[error("applying it walks too far, send it in smaller edits: placing its items walked past more than {max} steps of items between their origins (stopped at {steps})")]
    Overran {
        /// The steps walked when integration stopped.
        steps: u64,
        /// The bound.
        max: u64,
    },
    /// Applying a member's update panicked (a bug in yrs that the update meets; the panic's
    /// message says where). As with [`DocError::Overran`], the document may hold part of it,
    /// so its owner builds it again without the update.
    #[error("applying it failed inside the document, which may hold part of it ({0})")]
    Panicked(String),
    /// Bytes that are not a Yjs state vector.
    #[error("invalid Yjs state vector: {0}")]
    InvalidStateVector(String),
    /// Bytes that are not a Yjs snapshot (v1).
    #[error("invalid Yjs snapshot: {0}")]
    InvalidSnapshot(String),
}

impl DocError {
    /// Whether the document may hold part of the update that failed ([`DocError::Overran`],
    /// [`DocError::Panicked`]): then its owner builds it again without the update. Every other
    /// error left the document as it was.
    pub fn holds_part(&self) -> bool {
        matches!(self, DocError::Overran { .. } | DocError::Panicked(_))
    }
}

/// A replica's version: what it has (its state vector) and what it has deleted (a hash of its
/// delete set). A state vector alone does not move on a delete, so two replicas a delete apart
/// would look "equal"; two replicas at the same `Version` must hold the same content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    /// The Yjs state vector, v1 encoding.
    pub state_vector: Vec<u8>,
    /// A 64-bit hash of the delete set, in its canonical form (merged ranges by client).
    pub deletes: u64,
}

impl Version {
    /// The version of a replica whose state vector holds `clocks` (client, clock) and whose delete
    /// set holds `deletes` (client, ranges `start..end`), in any order: clients are sorted and
    /// ranges merged, so that replicas holding the same items agree byte for byte whatever their
    /// history or implementation (yrs or Yjs).
    pub fn canonical(mut clocks: Vec<(u64, u32)>, deletes: Vec<(u64, Vec<(u32, u32)>)>) -> Self {
        heap_sort(&mut clocks);
        let mut state_vector = Vec::with_capacity(1 + clocks.len() * 8);
        write_var(&mut state_vector, clocks.len() as u64);
        for (client, clock) in clocks {
            write_var(&mut state_vector, client);
            write_var(&mut state_vector, u64::from(clock));
        }
        let mut deletes: Vec<(u64, Vec<(u32, u32)>)> = deletes
            .into_iter()
            .map(|(client, ranges)| (client, merge_ranges(ranges)))
            .filter(|(_, ranges)| !ranges.is_empty())
            .collect();
        heap_sort(&mut deletes);
        let mut hash = Fnv::new();
        for (client, ranges) in &deletes {
            hash.u64(*client);
            for &(start, end) in ranges {
                hash.u64(u64::from(start));
                hash.u64(u64::from(end));
            }
            hash.u64(u64::MAX);
        }
        Version {
            state_vector,
            deletes: hash.finish(),
        }
    }

    /// The version in a Yjs snapshot, v1 encoding (`Y.encodeSnapshot(Y.snapshot(doc))`: the
    /// delete set, then the state vector).
    pub fn from_snapshot(bytes: &[u8]) -> Result<Self, DocError> {
        let bad = |what: &str| DocError::InvalidSnapshot(what.to_owned());
        let mut input = bytes;
        let mut next = |what: &str| read_var(&mut input).ok_or_else(|| bad(what));
        let clients = next("delete set size")?;
        let mut deletes = Vec::new();
        for _ in 0..clients {
            let client = next("delete set client")?;
            let count = next("delete set ranges")?;
            let mut ranges = Vec::new();
            for _ in 0..count {
                let clock = next("deleted clock")?;
                let len = next("deleted length")?;
                let end = clock.checked_add(len).ok_or_else(|| bad("deleted range"))?;
                let (Ok(start), Ok(end)) = (u32::try_from(clock), u32::try_from(end)) else {
                    return Err(bad("deleted range past 2^32"));
                };
                ranges.push((start, end));
            }
            deletes.push((client, ranges));
        }
        let count = next("state vector size")?;
        let mut clocks = Vec::new();
        for _ in 0..count {
            let client = next("state vector client")?;
            let clock = next("state vector clock")?;
            let clock = u32::try_from(clock).map_err(|_| bad("clock past 2^32"))?;
            clocks.push((client, clock));
        }
        if !input.is_empty() {
            return Err(bad("bytes after the state vector"));
        }
        Ok(Self::canonical(clocks, deletes))
    }
}

/// The digest of a document's texts, given as (name, content) in any order: FNV-1a over the
/// non-empty texts sorted by name. Two replicas at the same [`Version`] must have the same digest.
pub fn digest_texts(mut texts: Vec<(String, String)>) -> u64 {
    // An empty text is the same as no text: one replica may have opened it, another not.
    texts.retain(|(_, content)| !content.is_empty());
    heap_sort(&mut texts);
    let mut hash = Fnv::new();
    for (name, content) in &texts {
        hash.bytes(name.as_bytes());
        hash.bytes(&[0]);
        hash.bytes(content.as_bytes());
        hash.bytes(&[0]);
    }
    hash.finish()
}

/// Sorts `items` in place, in O(n log n) with no allocation: a heap sort, a few hundred bytes of
/// wasm where the standard library's sorts add several kilobytes to the package per type.
/// Clock ranges `start..end` sorted, with the empty ones dropped and those that overlap or
/// touch merged into one.
pub(crate) fn merge_ranges(mut ranges: Vec<(u32, u32)>) -> Vec<(u32, u32)> {
    ranges.retain(|(start, end)| start < end);
    heap_sort(&mut ranges);
    let mut merged: Vec<(u32, u32)> = Vec::with_capacity(ranges.len());
    for (start, end) in ranges {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    merged
}

pub(crate) fn heap_sort<T: Ord>(items: &mut [T]) {
    fn sift_down<T: Ord>(items: &mut [T], mut root: usize, end: usize) {
        loop {
            let mut child = 2 * root + 1;
            if child >= end {
                return;
            }
            if child + 1 < end && items[child] < items[child + 1] {
                child += 1;
            }
            if items[root] >= items[child] {
                return;
            }
            items.swap(root, child);
            root = child;
        }
    }
    let len = items.len();
    for root in (0..len / 2).rev() {
        sift_down(items, root, len);
    }
    for end in (1..len).rev() {
        items.swap(0, end);
        sift_down(items, 0, end);
    }
}

/// Writes a lib0 variable-length unsigned integer (7 bits a byte, low first).
pub(crate) fn write_var(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Whether `bytes` is a state vector in the v1 encoding (`Y.encodeStateVector`): a count, then
/// that many client ids and clocks, and nothing after them. A document asked for a diff against
/// anything else fails (Yjs throws), and the failure would read as the document's own.
pub fn is_state_vector(bytes: &[u8]) -> bool {
    let mut input = bytes;
    let Some(count) = read_var(&mut input) else {
        return false;
    };
    for _ in 0..count {
        if read_var(&mut input).is_none() || read_var(&mut input).is_none() {
            return false;
        }
    }
    input.is_empty()
}

/// Reads a lib0 variable-length unsigned integer; `None` at the end of the input or past 64 bits.
fn read_var(input: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = input.split_first()?;
        *input = rest;
        // The tenth byte holds bit 63 only.
        if shift == 63 && byte & 0x7f > 1 {
            return None;
        }
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// A Yjs document a client session keeps in sync: the built-in [`SharedDoc`], or a document that
/// lives elsewhere (a JS `Y.Doc` behind callbacks).
pub trait Replica {
    /// Applies a Yjs v1 update from another replica; updates may arrive in any order and more
    /// than once.
    fn apply_update(&mut self, update: &[u8]) -> Result<(), DocError>;
    /// This replica's state vector, v1 encoding.
    fn state_vector(&self) -> Vec<u8>;
    /// Everything this replica has that the state vector `remote` lacks, as a Yjs v1 update;
    /// an empty `remote` asks for everything.
    fn diff(&self, remote: &[u8]) -> Result<Vec<u8>, DocError>;
    /// This replica's version, for checkpoints.
    fn version(&self) -> Version;
    /// A digest of the content: equal versions must have equal digests.
    fn digest(&self) -> u64;
    /// Whether the replica holds anything at all (an empty one publishes no checkpoints).
    fn is_empty(&self) -> bool;
    /// Whether the replica holds back remote updates that wait for earlier parts (they are not
    /// shown until those arrive); a replica that cannot tell says `false`.
    fn has_pending(&self) -> bool {
        false
    }
    /// `updates` merged into one, or `None` where this replica cannot merge (edits waiting to be
    /// sent then travel one by one).
    fn merge_updates(&self, updates: &[&[u8]]) -> Option<Vec<u8>> {
        let _ = updates;
        None
    }
    /// The whole document as one Yjs v1 update, without what the replica holds back (blocks and
    /// deletes that wait for clocks it never received): what a client gives back to a relay
    /// that lost the room's history. A relay takes no update that needs clocks no one wrote
    /// ([`v1::integrable`]), and what is held back shows nothing. By default, [`Replica::diff`]
    /// of an empty state vector, for a replica that cannot leave it out.
    fn whole(&self) -> Result<Vec<u8>, DocError> {
        self.diff(&[])
    }
}

/// One step of a change to a text, in the form editors apply (`retain`, `insert`, `delete`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum TextDelta {
    /// Keep this many code units.
    Retain(u32),
    /// Insert this text here.
    Insert(String),
    /// Delete this many code units here.
    Delete(u32),
}

/// FNV-1a, 64 bits: a small, stable hash for digests that must agree across builds and targets.
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }

    fn bytes(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 ^= u64::from(byte);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn u64(&mut self, value: u64) {
        self.bytes(&value.to_le_bytes());
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// Whether a Yjs v1 update inserts anything: its first varint counts the clients that have new
/// items (an update of deletions only starts with 0). A diff against a state vector always
/// carries the whole delete set, so "non-empty" is the wrong test for "the peer lacks something".
pub fn has_insertions(update: &[u8]) -> bool {
    update.first().is_some_and(|&clients| clients != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heap_sort_sorts() {
        for len in 0..40u64 {
            let mut items: Vec<u64> = (0..len).map(|i| (i * 7919 + 13) % 31).collect();
            let mut expected = items.clone();
            expected.sort();
            heap_sort(&mut items);
            assert_eq!(items, expected);
        }
    }

    #[test]
    fn versions_do_not_depend_on_order_and_merge_ranges() {
        let a = Version::canonical(
            vec![(9, 4), (2, 7)],
            vec![(5, vec![(3, 5), (0, 2), (2, 3)]), (1, vec![(4, 4), (1, 2)])],
        );
        let b = Version::canonical(
            vec![(2, 7), (9, 4)],
            vec![(1, vec![(1, 2)]), (5, vec![(0, 5)])],
        );
        assert_eq!(a, b);
        assert_ne!(
            a,
            Version::canonical(vec![(2, 7), (9, 4)], vec![(5, vec![(0, 5)])])
        );
    }
}
