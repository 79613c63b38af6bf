//! Checks that bytes are a Yjs v1 update that Yjs itself can read and apply, before yrs sees
//! them: the gate for every update and sync answer a member sends through the relay, and for
//! every update a replica here applies.
//!
//! yrs reads more than Yjs does. An update that yrs applies but Yjs throws on is refused by every
//! Yjs replica (a `Y.Doc` behind the provider) as a whole, and once the relay's document holds
//! it, every snapshot holds it too: a Yjs client that joins late can load none of the room. So
//! this walks the update as Yjs's `UpdateDecoderV1` and lib0's decoder read it, builds nothing,
//! and refuses what they throw on:
//!
//! - a number above 2^53 − 1 (lib0 reads numbers as JS doubles, and throws on one that
//!   passes 2^53 − 1 before its last byte; no writer makes the others), and bytes that end
//!   early;
//! - a string that is not UTF-8 (lib0 decodes strings with a fatal `TextDecoder`);
//! - a content type other than 1 to 9, a shared type other than 0 to 6, a value type lib0 does
//!   not know, and a sub-document whose options are `null` or `undefined`;
//! - an XML hook (shared type 5): Yjs writes a name after it and yrs neither reads nor writes
//!   one, so each reads the other's update wrong from there on;
//! - JSON content (and an embed's or a format's value) that `JSON.parse` refuses;
//! - an item whose origin, right origin or parent is an id of its own client at or after its own
//!   clock (Yjs looks such an id up without checking that it exists);
//! - a deleted range of length 0 (Yjs fails to write one it must keep for later).
//!
//! And one rule of its own: values (`Any`) nested deeper than [`MAX_DEPTH`] levels. yrs reads
//! them recursively, and 100,000 levels, 200 KB, overflowed the stack of the thread that read
//! them, which aborts the process (the relay, or a tab's module). Nothing here recurses.

use std::fmt;

use crate::wire::json;

/// How deep values may nest inside an update (lib0's `Any`: arrays and objects).
pub const MAX_DEPTH: usize = 128;

/// The largest integer a JS number holds exactly.
const MAX_SAFE: u64 = (1 << 53) - 1;

/// Why bytes are not an update Yjs applies: what was wrong, and the byte offset where it was
/// found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct V1Error {
    /// What was wrong ("a shared type Yjs does not know", ...).
    pub problem: &'static str,
    /// The byte offset in the update where it was found.
    pub offset: usize,
}

impl fmt::Display for V1Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at byte {}", self.problem, self.offset)
    }
}

impl std::error::Error for V1Error {}

/// Checks that `update` is a Yjs v1 update that Yjs reads without throwing (see the module).
pub fn check(update: &[u8]) -> Result<()> {
    let mut reader = Reader {
        bytes: update,
        at: 0,
        written: None,
    };
    reader.structs()?;
    reader.delete_set()
}

/// `update` with its delete set cut down to the clocks its own blocks write, or `None` when it
/// deletes nothing else. Checked as [`check`] does, on the way.
///
/// A replica keeps deletes of clocks it has not received (Yjs and yrs hold them back until the
/// clocks arrive), and its whole state as an update carries them. A relay takes no update that
/// deletes clocks no one has written; a client giving its document back to a relay that lost
/// the room's history leaves them out with this. They delete nothing the replica shows.
pub fn without_unwritten_deletes(update: &[u8]) -> Result<Option<Vec<u8>>> {
    let mut reader = Reader {
        bytes: update,
        at: 0,
        written: Some(Vec::new()),
    };
    reader.structs()?;
    let structs_end = reader.at;
    let written = merge_written(reader.written.take().unwrap_or_default());
    let mut kept: Vec<(u64, Vec<(u64, u64)>)> = Vec::new();
    let mut dropped = false;
    let clients = reader.number()?;
    for _ in 0..clients {
        let client = reader.number()?;
        let first = written.partition_point(|&(c, ..)| c < client);
        let last = written.partition_point(|&(c, ..)| c <= client);
        let mut ranges = Vec::new();
        for _ in 0..reader.number()? {
            let clock = reader.number()?;
            let len = reader.deleted_length()?;
            let end = clock.saturating_add(len);
            let mut covered = 0;
            for &(_, start, stop) in &written[first..last] {
                let (from, to) = (start.max(clock), stop.min(end));
                if from < to {
                    ranges.push((from, to - from));
                    covered += to - from;
                }
            }
            dropped |= covered < len;
        }
        if !ranges.is_empty() {
            kept.push((client, ranges));
        }
    }
    if !dropped {
        return Ok(None);
    }
    let mut out = update[..structs_end].to_vec();
    super::write_var(&mut out, kept.len() as u64);
    for (client, ranges) in kept {
        super::write_var(&mut out, client);
        super::write_var(&mut out, ranges.len() as u64);
        for (clock, len) in ranges {
            super::write_var(&mut out, clock);
            super::write_var(&mut out, len);
        }
    }
    Ok(Some(out))
}

/// Written ranges `(client, start, end)` sorted, those of a client that touch or overlap
/// merged into one.
fn merge_written(mut written: Vec<(u64, u64, u64)>) -> Vec<(u64, u64, u64)> {
    super::heap_sort(&mut written);
    let mut merged: Vec<(u64, u64, u64)> = Vec::with_capacity(written.len());
    for (client, start, end) in written {
        match merged.last_mut() {
            Some(last) if last.0 == client && start <= last.2 => last.2 = last.2.max(end),
            _ => merged.push((client, start, end)),
        }
    }
    merged
}

/// A position in the update, read the way lib0 reads.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
    /// When kept: the clock ranges the blocks write, `(client, start, end)` (skips write none).
    written: Option<Vec<(u64, u64, u64)>>,
}

type Result<T> = std::result::Result<T, V1Error>;

impl<'a> Reader<'a> {
    fn error(&self, problem: &'static str) -> V1Error {
        V1Error {
            problem,
            offset: self.at,
        }
    }

    fn byte(&mut self) -> Result<u8> {
        let byte = *self
            .bytes
            .get(self.at)
            .ok_or_else(|| self.error("the update ends early"))?;
        self.at += 1;
        Ok(byte)
    }

    fn take(&mut self, len: u64) -> Result<&'a [u8]> {
        let left = self.bytes.len() - self.at;
        if len > left as u64 {
            return Err(self.error("the update ends early"));
        }
        let start = self.at;
        self.at += len as usize;
        Ok(&self.bytes[start..self.at])
    }

    /// An unsigned LEB128 number, at most 2^53 − 1.
    fn number(&mut self) -> Result<u64> {
        let start = self.at;
        let first = self.byte()?;
        self.rest_of_number(start, first, u64::from(first & 0x7f), 7)
    }

    /// lib0's signed number: a sign bit and six bits in the first byte, seven in the others.
    fn signed(&mut self) -> Result<()> {
        let start = self.at;
        let first = self.byte()?;
        self.rest_of_number(start, first, u64::from(first & 0x3f), 6)
            .map(drop)
    }

    /// The bytes of a number after its `first`, whose `shift` low bits are `value`: seven bits
    /// a byte while the top bit says more follow, at most 2^53 − 1 in all.
    fn rest_of_number(&mut self, start: usize, first: u8, value: u64, shift: u32) -> Result<u64> {
        let too_large = V1Error {
            problem: "a number above 2^53 - 1",
            offset: start,
        };
        let (mut value, mut shift, mut more) = (value, shift, first & 0x80 != 0);
        while more {
            if shift > 49 {
                return Err(too_large);
            }
            let byte = self.byte()?;
            value |= u64::from(byte & 0x7f) << shift;
            shift += 7;
            more = byte & 0x80 != 0;
        }
        if value > MAX_SAFE {
            return Err(too_large);
        }
        Ok(value)
    }

    fn string(&mut self) -> Result<&'a str> {
        let len = self.number()?;
        let start = self.at;
        let bytes = self.take(len)?;
        std::str::from_utf8(bytes).map_err(|_| V1Error {
            problem: "a string that is not UTF-8",
            offset: start,
        })
    }

    /// A string that `JSON.parse` takes.
    fn json(&mut self) -> Result<()> {
        let start = self.at;
        let text = self.string()?;
        json::check(text).map_err(|_| V1Error {
            problem: "JSON content that JSON.parse refuses",
            offset: start,
        })
    }

    /// One lib0 value (`Any`), its arrays and objects walked with a stack of their own.
    fn any(&mut self) -> Result<()> {
        // For each open array or object: the values left in it, and whether it is an object
        // (whose values each follow a key).
        let mut open: Vec<(u64, bool)> = Vec::new();
        loop {
            match self.byte()? {
                127 | 126 | 121 | 120 => {}
                125 => self.signed()?,
                124 => drop(self.take(4)?),
                123 | 122 => drop(self.take(8)?),
                119 => drop(self.string()?),
                116 => {
                    let len = self.number()?;
                    self.take(len)?;
                }
                tag @ (118 | 117) => {
                    let len = self.number()?;
                    if len > 0 {
                        if open.len() == MAX_DEPTH {
                            return Err(self.error("values nested more than 128 levels deep"));
                        }
                        let object = tag == 118;
                        open.push((len, object));
                        if object {
                            self.string()?;
                        }
                        continue;
                    }
                }
                _ => {
                    self.at -= 1;
                    return Err(self.error("a value type Yjs does not know"));
                }
            }
            // A value is complete: go on to the next one in its array or object.
            loop {
                let Some((left, object)) = open.last_mut() else {
                    return Ok(());
                };
                *left -= 1;
                if *left == 0 {
                    open.pop();
                    continue;
                }
                if *object {
                    self.string()?;
                }
                break;
            }
        }
    }

    /// An id `(client, clock)`; one of the item's own client at or after its clock is refused.
    fn id_before(&mut self, client: u64, clock: u64, problem: &'static str) -> Result<()> {
        let start = self.at;
        let (of, at) = (self.number()?, self.number()?);
        if of == client && at >= clock {
            return Err(V1Error {
                problem,
                offset: start,
            });
        }
        Ok(())
    }

    /// The blocks, client by client.
    fn structs(&mut self) -> Result<()> {
        let clients = self.number()?;
        for _ in 0..clients {
            let count = self.number()?;
            let client = self.number()?;
            let mut clock = self.number()?;
            for _ in 0..count {
                let skip = self.bytes.get(self.at).is_some_and(|info| info & 0x1f == 10);
                let len = self.block(client, clock)?;
                if let (Some(written), false) = (&mut self.written, skip) {
                    match written.last_mut() {
                        Some(last) if last.0 == client && last.2 == clock => {
                            last.2 = clock.saturating_add(len)
                        }
                        _ => written.push((client, clock, clock.saturating_add(len))),
                    }
                }
                clock = clock
                    .checked_add(len)
                    .filter(|&end| end <= MAX_SAFE)
                    .ok_or_else(|| self.error("a clock above 2^53 - 1"))?;
            }
        }
        Ok(())
    }

    /// One block at `client`'s `clock`; returns its length in clock ticks.
    fn block(&mut self, client: u64, clock: u64) -> Result<u64> {
        let info = self.byte()?;
        match info & 0x1f {
            // A GC range or a skip.
            0 | 10 => return self.number(),
            1..=9 => {}
            _ => {
                self.at -= 1;
                return Err(self.error("a content type Yjs does not know"));
            }
        }
        if info & 0x80 != 0 {
            self.id_before(client, clock, "an item whose origin is not before it")?;
        }
        if info & 0x40 != 0 {
            self.id_before(client, clock, "an item whose right origin is not before it")?;
        }
        if info & 0xc0 == 0 {
            if self.number()? == 1 {
                self.string()?;
            } else {
                self.id_before(client, clock, "an item whose parent is not before it")?;
            }
            if info & 0x20 != 0 {
                self.string()?;
            }
        }
        Ok(match info & 0x1f {
            // Deleted content: its length.
            1 => self.number()?,
            // JSON content: strings that `JSON.parse` takes, or "undefined".
            2 => {
                let count = self.number()?;
                for _ in 0..count {
                    let start = self.at;
                    let text = self.string()?;
                    if text != "undefined" && json::check(text).is_err() {
                        return Err(V1Error {
                            problem: "JSON content that JSON.parse refuses",
                            offset: start,
                        });
                    }
                }
                count
            }
            // Binary content.
            3 => {
                let len = self.number()?;
                self.take(len)?;
                1
            }
            // A string: its length in UTF-16 code units.
            4 => self.string()?.chars().map(|c| c.len_utf16() as u64).sum(),
            // An embed.
            5 => {
                self.json()?;
                1
            }
            // A format: a key and a JSON value.
            6 => {
                self.string()?;
                self.json()?;
                1
            }
            // A shared type: array, map, text, XML element (named), XML fragment, XML text.
            7 => {
                let start = self.at;
                let problem = match self.number()? {
                    3 => {
                        self.string()?;
                        None
                    }
                    0..=2 | 4 | 6 => None,
                    5 => Some("an XML hook (yrs and Yjs encode it differently)"),
                    _ => Some("a shared type Yjs does not know"),
                };
                if let Some(problem) = problem {
                    return Err(V1Error {
                        problem,
                        offset: start,
                    });
                }
                1
            }
            // Values.
            8 => {
                let count = self.number()?;
                for _ in 0..count {
                    self.any()?;
                }
                count
            }
            // A sub-document: its guid and its options (Yjs reads `opts.shouldLoad`).
            _ => {
                self.string()?;
                if matches!(self.bytes.get(self.at), Some(126 | 127)) {
                    return Err(self.error("a sub-document whose options are null or undefined"));
                }
                self.any()?;
                1
            }
        })
    }

    /// The delete set: for each client, ranges `(clock, length)`.
    fn delete_set(&mut self) -> Result<()> {
        let clients = self.number()?;
        for _ in 0..clients {
            self.number()?;
            let ranges = self.number()?;
            for _ in 0..ranges {
                self.number()?;
                self.deleted_length()?;
            }
        }
        Ok(())
    }

    /// The length of a deleted range: not 0.
    fn deleted_length(&mut self) -> Result<u64> {
        let start = self.at;
        match self.number()? {
            0 => Err(V1Error {
                problem: "a deleted range of length 0",
                offset: start,
            }),
            len => Ok(len),
        }
    }
}

#[cfg(all(test, feature = "yrs"))]
mod tests {
    use super::*;
    use yrs::types::xml::XmlFragment;
    use yrs::{
        Any, Array, ArrayPrelim, Doc, Map, MapPrelim, OffsetKind, Options, ReadTxn, StateVector,
        Text, Transact, XmlElementPrelim,
    };

    /// An update of one item under client 5 at clock 0 in the root type `t`: `info`, then
    /// `body` (origins, then content).
    fn one_item(info: u8, body: &[u8]) -> Vec<u8> {
        let mut update = vec![1, 1, 5, 0, info];
        if info & 0xc0 == 0 {
            update.extend_from_slice(&[1, 1, b't']);
        }
        update.extend_from_slice(body);
        update.push(0);
        update
    }

    fn problem(update: &[u8]) -> &'static str {
        check(update).expect_err("refused").problem
    }

    #[test]
    fn what_yrs_writes_for_every_kind_of_content_passes() {
        let doc = Doc::with_options(Options {
            client_id: yrs::block::ClientID::new(7),
            offset_kind: OffsetKind::Utf16,
            ..Options::default()
        });
        let text = doc.get_or_insert_text("text");
        let map = doc.get_or_insert_map("map");
        let array = doc.get_or_insert_array("array");
        let xml = doc.get_or_insert_xml_fragment("xml");
        let mut updates = Vec::new();
        {
            let mut txn = doc.transact_mut();
            text.insert(&mut txn, 0, "héllo 😀 world");
            text.format(&mut txn, 0, 4, [("bold".into(), Any::Bool(true))].into());
            text.insert_embed(&mut txn, 3, Any::from(vec![Any::from(1.5), Any::Null]));
            let mut deep = Any::from("leaf");
            for _ in 0..MAX_DEPTH {
                deep = Any::from(vec![deep]);
            }
            map.insert(&mut txn, "deep", deep);
            map.insert(&mut txn, "bytes", Any::from(vec![0u8, 1, 2]));
            map.insert(&mut txn, "big", -(1i64 << 60));
            map.insert(&mut txn, "int", -123_456_789i64);
            let inner = map.insert(&mut txn, "inner", MapPrelim::default());
            inner.insert(&mut txn, "k", "v");
            array.insert_range(&mut txn, 0, [1, 2, 3]);
            array.insert(&mut txn, 1, ArrayPrelim::default());
            xml.insert(&mut txn, 0, XmlElementPrelim::empty("p"));
            updates.push(txn.encode_update_v1());
        }
        {
            let mut txn = doc.transact_mut();
            text.remove_range(&mut txn, 2, 5);
            map.remove(&mut txn, "inner");
            array.remove(&mut txn, 0);
            updates.push(txn.encode_update_v1());
        }
        updates.push(
            doc.transact()
                .encode_state_as_update_v1(&StateVector::default()),
        );
        for update in &updates {
            assert_eq!(check(update), Ok(()), "{update:?}");
        }
    }

    #[test]
    fn what_yjs_throws_on_is_refused_with_where() {
        assert_eq!(
            check(&one_item(2, &[1, 1, b'{'])),
            Err(V1Error {
                problem: "JSON content that JSON.parse refuses",
                offset: 9,
            })
        );
        assert_eq!(
            check(&one_item(2, &[2, 9])),
            Err(V1Error {
                problem: "the update ends early",
                offset: 10
            })
        );
        assert_eq!(
            check(&one_item(
                2,
                &[1, 9, b'u', b'n', b'd', b'e', b'f', b'i', b'n', b'e', b'd']
            )),
            Ok(())
        );
        assert_eq!(
            problem(&one_item(5, &[1, b'x'])),
            "JSON content that JSON.parse refuses"
        );
        assert_eq!(
            problem(&one_item(6, &[1, b'b', 1, b'x'])),
            "JSON content that JSON.parse refuses"
        );
        assert_eq!(
            check(&one_item(6, &[1, b'b', 4, b't', b'r', b'u', b'e'])),
            Ok(())
        );
        assert_eq!(
            problem(&one_item(4, &[2, 0xc3, 0x28])),
            "a string that is not UTF-8"
        );
        assert_eq!(
            problem(&one_item(7, &[9])),
            "a shared type Yjs does not know"
        );
        assert_eq!(
            problem(&one_item(7, &[5])),
            "an XML hook (yrs and Yjs encode it differently)"
        );
        assert_eq!(check(&one_item(7, &[3, 1, b'p'])), Ok(()));
        assert_eq!(
            problem(&one_item(11, &[])),
            "a content type Yjs does not know"
        );
        assert_eq!(
            problem(&one_item(8, &[1, 115])),
            "a value type Yjs does not know"
        );
        assert_eq!(
            problem(&one_item(9, &[1, b'g', 126])),
            "a sub-document whose options are null or undefined"
        );
        assert_eq!(check(&one_item(9, &[1, b'g', 118, 0])), Ok(()));
        // lib0 numbers are JS doubles: 2^53 - 1 is the largest.
        let mut at_most = one_item(1, &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x0f]);
        assert_eq!(check(&at_most), Ok(()));
        at_most[15] = 0x1f;
        assert_eq!(problem(&at_most), "a number above 2^53 - 1");
        assert_eq!(
            problem(&one_item(
                8,
                &[1, 125, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1]
            )),
            "a number above 2^53 - 1"
        );
        // Ids of the item's own client at or after its clock.
        assert_eq!(
            problem(&one_item(0x84, &[5, 0, 1, b'x'])),
            "an item whose origin is not before it"
        );
        assert_eq!(
            problem(&one_item(0x44, &[5, 1, 1, b'x'])),
            "an item whose right origin is not before it"
        );
        assert_eq!(check(&one_item(0x84, &[6, 0, 1, b'x'])), Ok(()));
        let parent_id = vec![1, 1, 5, 0, 4, 0, 5, 2, 1, b'x', 0];
        assert_eq!(problem(&parent_id), "an item whose parent is not before it");
        assert_eq!(problem(&[0, 1, 9, 1, 0, 0]), "a deleted range of length 0");
        assert_eq!(check(&[0, 1, 9, 1, 0, 1]), Ok(()));
        assert_eq!(problem(&[0]), "the update ends early");
        assert_eq!(problem(&[]), "the update ends early");
    }

    #[test]
    fn values_nest_up_to_the_limit_without_recursion() {
        for (depth, ok) in [
            (MAX_DEPTH, true),
            (MAX_DEPTH + 1, false),
            (1_000_000, false),
        ] {
            let mut body = vec![1];
            for level in 0..depth {
                // Arrays and objects alternate; each holds one value.
                if level % 2 == 0 {
                    body.extend_from_slice(&[117, 1]);
                } else {
                    body.extend_from_slice(&[118, 1, 1, b'k']);
                }
            }
            body.push(120);
            let result = check(&one_item(8, &body));
            assert_eq!(result.is_ok(), ok, "{depth}: {result:?}");
        }
        // Counts are bounded by the bytes: a billion values in three bytes end early.
        let mut billion = one_item(8, &[1, 117, 0x80, 0x94, 0xeb, 0xdc, 0x03, 127, 127]);
        billion.pop();
        assert_eq!(problem(&billion), "the update ends early");
    }

    #[test]
    fn deletes_of_clocks_the_update_does_not_write_are_left_out() {
        use crate::doc::SharedDoc;
        let writer = SharedDoc::with_client_id(9);
        let _missed = writer.insert("t", 0, "abcdef").unwrap();
        let delete = writer.delete("t", 1, 3).unwrap();
        let other = SharedDoc::with_client_id(8);
        let own = other.insert("t", 0, "xyz").unwrap();
        let own_delete = other.delete("t", 0, 1).unwrap();
        let replica = SharedDoc::new();
        for update in [&delete, &own, &own_delete] {
            replica.apply_update(update).unwrap();
        }
        assert!(replica.has_pending());
        let trimmed = without_unwritten_deletes(&replica.snapshot())
            .unwrap()
            .expect("the held-back delete is left out");
        check(&trimmed).unwrap();
        let relay = SharedDoc::new();
        relay.apply_member_update(&trimmed).unwrap();
        assert_eq!(relay.text("t"), "yz", "the deletes it wrote stay");
        assert!(!relay.has_pending());
        assert_eq!(without_unwritten_deletes(&relay.snapshot()).unwrap(), None);

        // A range partly written is cut to the written part; a client with nothing written
        // goes.
        let mut update = one_item(4, &[2, b'a', b'b']);
        update.pop();
        let structs = update.clone();
        update.extend_from_slice(&[2, 5, 1, 1, 5, 6, 1, 0, 3]);
        let mut expected = structs;
        expected.extend_from_slice(&[1, 5, 1, 1, 1]);
        assert_eq!(without_unwritten_deletes(&update).unwrap(), Some(expected));
        // Checked on the way.
        update.truncate(update.len() - 1);
        update.push(0);
        assert_eq!(
            without_unwritten_deletes(&update).unwrap_err().problem,
            "a deleted range of length 0"
        );
    }
}
