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
//! And rules of its own:
//!
//! - values (`Any`) nested deeper than [`MAX_DEPTH`] levels. yrs reads them recursively, and
//!   100,000 levels, 200 KB, overflowed the stack of the thread that read them, which aborts the
//!   process (the relay, or a tab's module). Nothing here recurses;
//! - a client's deleted ranges out of order or overlapping, or in two entries of the delete
//!   set. Yjs and yrs apply a range by walking the blocks it covers, range by range: 100,000
//!   ranges naming the same 10,000 blocks, 300 KB, took yrs 3 s, and a message of megabytes
//!   minutes, in the relay and in every member. Both write each client's ranges once, sorted,
//!   merged and apart, so no writer makes these.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use super::write_var;
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

/// The client and first clock of the first blocks `update` writes, if it writes any: where a
/// local edit's run of clocks starts.
pub fn first_write(update: &[u8]) -> Option<(u64, u64)> {
    let mut at = 0;
    let mut var = || {
        let (mut value, mut shift) = (0u64, 0u32);
        loop {
            let byte = *update.get(at)?;
            at += 1;
            value |= u64::from(byte & 0x7f).checked_shl(shift)?;
            if byte < 0x80 {
                return Some(value);
            }
            shift += 7;
        }
    };
    let clients = var()?;
    if clients == 0 {
        return None;
    }
    let _blocks = var()?;
    let client = var()?;
    let clock = var()?;
    Some((client, clock))
}

/// Checks that `update` is a Yjs v1 update that Yjs reads without throwing (see the module).
pub fn check(update: &[u8]) -> Result<()> {
    let mut reader = Reader {
        bytes: update,
        at: 0,
        record: None,
        capture: None,
        run: None,
    };
    reader.structs()?;
    reader.delete_set()
}

/// An update of deletions only (no blocks), larger than `max` bytes, as several updates of at
/// most `max` bytes each whose delete sets together are its delete set (a deletion applies the
/// same whatever update brings it, and in any order). A large deletion in a document many
/// clients wrote is one range per run of clocks it deletes, which can pass a relay's message
/// limit whatever the text's length; its pieces travel as separate edits. Any other update
/// comes back whole (the caller says it is too large), and `None` says the delete set does not
/// decode. A piece holds at least one range, so `max` should leave room for one (up to
/// 1 + 10 + 10 + 10 + 10 bytes with the counts). It reads only the delete set, with none of
/// [`check`]'s walk: a client without a document of its own (the transport-only build) splits
/// its application's deletions too.
pub fn split(update: &[u8], max: usize) -> Option<Vec<Vec<u8>>> {
    if update.len() <= max || update.first() != Some(&0) {
        return Some(vec![update.to_vec()]);
    }
    let mut input = &update[1..];
    // Room kept in each piece for the counts, written once the piece is complete: of clients
    // (at most 10 bytes as a LEB128 number), and of each client's ranges.
    const COUNT: usize = 10;
    let mut pieces = Vec::new();
    let mut piece = Piece::new(&[0]);
    let clients = super::read_var(&mut input)?;
    for _ in 0..clients {
        let client = super::read_var(&mut input)?;
        let ranges = super::read_var(&mut input)?;
        for _ in 0..ranges {
            let clock = super::read_var(&mut input)?;
            let len = super::read_var(&mut input).filter(|&len| len > 0)?;
            let range = var_len(clock) + var_len(len);
            let grows = |piece: &Piece| {
                range
                    + if piece.has(client) {
                        0
                    } else {
                        var_len(client) + COUNT
                    }
            };
            let mut by = grows(&piece);
            if piece.len + by + COUNT > max && !piece.clients.is_empty() {
                pieces.push(std::mem::replace(&mut piece, Piece::new(&[0])).finish());
                by = grows(&piece);
            }
            piece.add(client, (clock, len), by);
        }
    }
    if !input.is_empty() {
        return None;
    }
    pieces.push(piece.finish());
    Some(pieces)
}

/// One piece of [`split`]: its blocks, and its part of the delete set by client.
struct Piece {
    blocks: Vec<u8>,
    clients: Vec<(u64, Vec<(u64, u64)>)>,
    /// The bytes it takes so far, but the counts.
    len: usize,
}

impl Piece {
    fn new(blocks: &[u8]) -> Self {
        Piece {
            blocks: blocks.to_vec(),
            clients: Vec::new(),
            len: blocks.len(),
        }
    }

    fn has(&self, client: u64) -> bool {
        self.clients.last().is_some_and(|&(c, _)| c == client)
    }

    fn add(&mut self, client: u64, range: (u64, u64), grows: usize) {
        match self.clients.last_mut() {
            Some((c, ranges)) if *c == client => ranges.push(range),
            _ => self.clients.push((client, vec![range])),
        }
        self.len += grows;
    }

    fn finish(self) -> Vec<u8> {
        let mut out = self.blocks;
        write_var(&mut out, self.clients.len() as u64);
        for (client, ranges) in self.clients {
            write_var(&mut out, client);
            write_var(&mut out, ranges.len() as u64);
            for (clock, len) in ranges {
                write_var(&mut out, clock);
                write_var(&mut out, len);
            }
        }
        out
    }
}

/// The length of `value` as a LEB128 number.
fn var_len(value: u64) -> usize {
    (64 - value.max(1).leading_zeros() as usize).div_ceil(7)
}

/// An update cut down to what integrates: see [`integrable`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cut {
    /// The update without what was cut.
    pub update: Vec<u8>,
    /// The first thing cut, in words ("it deletes client 9's clocks 1..2, which no one has
    /// written").
    pub why: String,
}

/// `update` cut down to what a document holding each client's clocks below `have(client)`
/// integrates at once, or `None` when that is all of it. Checked as [`check`] does, on the way.
///
/// Yjs and yrs keep what does not integrate and wait for what it needs: blocks after clocks no
/// one has written (a gap), blocks whose origin, right origin or parent is such a clock, and
/// deletes of such clocks, which delete whatever later comes at them. A relay takes no member
/// update that holds any of these (a member could otherwise leave every replica waiting for
/// good, or delete another member's next edits as they arrive). A client giving its whole
/// document back to a relay that lost the room's history cuts, with `have` 0, what its replica
/// holds back: that waits, shows nothing, and would make the relay refuse the whole document.
pub fn integrable(update: &[u8], have: impl Fn(u64) -> u64) -> Result<Option<Cut>> {
    integrable_with(update, &have, None)
}

/// Why the room's document must not take `update` from a member, if so: the first thing
/// [`integrable`] would cut, or else the first clock the document holds (below `have(client)`)
/// that the update writes with other content. `held(client, from, to)` gives the document's
/// blocks of `client` that hold its clocks `from..to`, as a v1 update.
///
/// An update that writes clocks the document holds is taken as one it already has: a resend
/// after a reconnect, a document given back after the relay lost the room's history. Written
/// with other content, those clocks are another writer's under the same client id: a member
/// that wrote at another member's next clock (from its client id and clock, which every update
/// shows) before that member's edit went out. Taken, the victim's edit would be acknowledged
/// and passed on, and lost on every replica (each keeps what it had at those clocks). Compared
/// clock by clock (blocks split and merge differently on every replica): each clock's origin,
/// its block's right origin, its parent where it names one, and its content unit: a string's
/// UTF-16 code unit, binary content, a shared type, a value, an embed, a format, a sub-document's
/// guid. Writers encode one value differently (lib0 writes a number in whichever form holds
/// it, yrs writes an object's keys in its own order, JSON's text depends on its writer), so
/// values compare as [`Value`]s: what every encoding of them shares. A sub-document's options
/// are not compared (yrs writes its own). Content a replica collected after a deletion, skips
/// and collected ranges compare with anything.
pub fn refusal(
    update: &[u8],
    have: impl Fn(u64) -> u64,
    held: impl Fn(u64, u64, u64) -> Vec<u8>,
) -> Result<Option<String>> {
    let runs = match integrable_runs(update, &have, &held)? {
        Ok(runs) => runs,
        Err(why) => return Ok(Some(why)),
    };
    // Only blocks with content: a collected range, a skip or deleted content of ten bytes may
    // claim billions of clocks, and has nothing to lose: it compares with anything (but deleted
    // content that goes on past the held clocks, whose origins place its new part). Each clock
    // of a block with content takes at least half a byte of the update, and consecutive such
    // blocks of a client (its one section, in clock order: see `structs`) share one look at the
    // room's blocks, kept while later blocks fall in it: the room writes its blocks whole, so a
    // look per block would write a large block of the room's once per small block of the
    // update that falls in it.
    let mut seen: Option<(u64, u64, u64, Described)> = None;
    let mut i = 0;
    while i < runs.len() {
        let (client, first) = (&runs[i].0, &runs[i].1);
        let limit = have(*client);
        // Deleted content too where it goes on past the held clocks: its new part goes after
        // the clock before, in the parent its origins name (Yjs), so those must be the room's.
        let with_content = |run: &Run| match run.content {
            Units::Gone => false,
            Units::Deleted => run.end > limit,
            _ => true,
        };
        if !with_content(first) || first.start >= limit {
            i += 1;
            continue;
        }
        let mut j = i + 1;
        while j < runs.len()
            && runs[j].0 == *client
            && runs[j].1.start == runs[j - 1].1.end
            && runs[j].1.start < limit
            && with_content(&runs[j].1)
        {
            j += 1;
        }
        let to = runs[j - 1].1.end.min(limit);
        let covered = seen
            .as_ref()
            .is_some_and(|&(c, from, upto, _)| c == *client && from <= first.start && to <= upto);
        if !covered {
            let bytes = held(*client, first.start, to);
            let want = |c: u64, _: u64| c == *client;
            let Ok(described) = Described::new(bytes, &want) else {
                // Never for what the room wrote; refused rather than taken unseen.
                return Ok(Some(format!(
                    "the room's blocks of client {client} at clocks {}..{to} could not be read to compare with it",
                    first.start
                )));
            };
            let upto = described.runs.last().map_or(to, |run| run.end.max(to));
            seen = Some((*client, first.start, upto, described));
        }
        let Some((_, _, _, theirs)) = &seen else {
            unreachable!("described above")
        };
        for (_, run) in &runs[i..j] {
            if let Some(clock) = first_difference(*client, (update, run), theirs, to) {
                return Ok(Some(format!(
                    "it writes client {client}'s clock {clock} with other content than the room holds there (another writer used that client id first)"
                )));
            }
        }
        i = j;
    }
    Ok(None)
}

/// Why the room's document must not take a whole document a member gives back, if so: the
/// first thing [`integrable`] would cut, or an item that goes on from a clock the document
/// holds collected (see [`refusal`], whose `held` this takes). Clocks the document holds are
/// not compared otherwise: what it holds there stays.
pub fn given_back_refusal(
    update: &[u8],
    have: impl Fn(u64) -> u64,
    held: impl Fn(u64, u64, u64) -> Vec<u8>,
) -> Result<Option<String>> {
    Ok(integrable_runs(update, &have, &held)?.err())
}

/// The blocks of `update` at clocks the document holds, described, or why the update must not
/// be taken whatever they hold: the first thing [`integrable`] would cut, or an item that goes
/// on from a clock the document holds collected ([`continues_collected`]).
fn integrable_runs(
    update: &[u8],
    have: &dyn Fn(u64) -> u64,
    held: &dyn Fn(u64, u64, u64) -> Vec<u8>,
) -> Result<std::result::Result<Vec<(u64, Run)>, String>> {
    let mut runs = Vec::new();
    if let Some(cut) = integrable_with(update, have, Some(&mut runs))? {
        return Ok(Err(cut.why));
    }
    Ok(match continues_collected(&runs, have, held) {
        Some(why) => Err(why),
        None => Ok(runs),
    })
}

/// An item of `runs` (the update's blocks that start at clocks the document holds) that goes
/// on past the last clock the document holds of its client, where the document holds that
/// clock collected (a GC range). yrs and Yjs integrate the item's new part after that clock,
/// and Yjs throws on an item whose left neighbour is collected (it reads the neighbour's right
/// neighbour, which a collected range does not have): every Yjs replica the update reached
/// would fail on it. No Yjs client writes one (an item next to a collected range is collected
/// with it).
fn continues_collected(
    runs: &[(u64, Run)],
    have: &dyn Fn(u64) -> u64,
    held: &dyn Fn(u64, u64, u64) -> Vec<u8>,
) -> Option<String> {
    runs.iter().find_map(|(client, run)| {
        let limit = have(*client);
        if matches!(run.content, Units::Gone) || run.start >= limit || run.end <= limit {
            return None;
        }
        let last = limit - 1;
        let want = |c: u64, _: u64| c == *client;
        let collected = match describe(&held(*client, last, limit), &want) {
            Ok(theirs) => theirs.iter().any(|(_, their)| {
                their.start <= last && last < their.end && matches!(their.content, Units::Gone)
            }),
            // Never for what the room wrote; refused rather than taken unseen.
            Err(_) => true,
        };
        collected.then(|| {
            format!(
                "it writes client {client}'s clocks {}..{} on from its clock {last}, which the room's document holds collected: Yjs fails on such an item, and no Yjs client writes one",
                run.start, run.end
            )
        })
    })
}

/// The room's blocks of one client, described, with each string's UTF-16 code units.
struct Described {
    bytes: Vec<u8>,
    runs: Vec<Run>,
    codes: Vec<Vec<u16>>,
}

impl Described {
    fn new(bytes: Vec<u8>, want: &dyn Fn(u64, u64) -> bool) -> Result<Self> {
        let runs: Vec<Run> = describe(&bytes, want)?
            .into_iter()
            .map(|(_, run)| run)
            .collect();
        let codes = runs
            .iter()
            .map(|run| codes_of(&bytes, &run.content))
            .collect();
        Ok(Described { bytes, runs, codes })
    }
}

/// A string block's UTF-16 code units (none for other content).
fn codes_of(bytes: &[u8], units: &Units) -> Vec<u16> {
    match units {
        Units::Text(start, end) => std::str::from_utf8(&bytes[*start..*end])
            .map(|text| text.encode_utf16().collect())
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

/// The blocks of `bytes` that `want(client, clock)` picks, described.
fn describe(bytes: &[u8], want: &dyn Fn(u64, u64) -> bool) -> Result<Vec<(u64, Run)>> {
    let mut reader = Reader {
        bytes,
        at: 0,
        record: None,
        capture: Some(Capture {
            want,
            runs: Vec::new(),
        }),
        run: None,
    };
    reader.structs()?;
    Ok(reader.capture.map(|c| c.runs).unwrap_or_default())
}

/// The first clock below `to` where the block `run` (of `client`, in the update `a`) and the
/// room's blocks `theirs` (in clock order) differ.
fn first_difference(
    client: u64,
    (a, run): (&[u8], &Run),
    theirs: &Described,
    to: u64,
) -> Option<u64> {
    let origin_at = |run: &Run, clock: u64| {
        if clock == run.start {
            run.origin
        } else {
            Some((client, clock - 1))
        }
    };
    let end = run.end.min(to);
    let mut clock = run.start;
    let codes = codes_of(a, &run.content);
    let mut mine = Cursor::new(a, &run.content, &codes);
    // The room's blocks are in clock order: the first that ends after this block starts.
    let first = theirs.runs.partition_point(|their| their.end <= clock);
    for (k, their) in theirs.runs.iter().enumerate().skip(first) {
        if clock >= end {
            break;
        }
        if their.start > clock {
            // Not in the room's blocks (never, for clocks it holds): nothing to compare.
            mine.skip_to(their.start - run.start);
            clock = their.start;
            if clock >= end {
                break;
            }
        }
        let stop = end.min(their.end);
        if !matches!(their.content, Units::Gone) {
            let origin = origin_at(run, clock);
            // A room's block without the right origin the update names, after an origin: the
            // room ignored one that does not lie right of the origin (see
            // vendor/yrs/PATCHES.md); the content and its origin still compare.
            let ignored = their.right.is_none() && their.origin.is_some();
            if origin != origin_at(their, clock) || (run.right != their.right && !ignored) {
                return Some(clock);
            }
            let names_parent = origin.is_none() && run.right.is_none();
            if names_parent && run.parent != their.parent {
                return Some(clock);
            }
        }
        let mut theirs_units = Cursor::new(&theirs.bytes, &their.content, &theirs.codes[k]);
        theirs_units.skip_to(clock - their.start);
        for at in clock..stop {
            if !mine.next().matches(&theirs_units.next()) {
                return Some(at);
            }
        }
        clock = stop;
    }
    None
}

/// A position in a block's content, one unit per clock.
struct Cursor<'b> {
    at: u64,
    units: CursorUnits<'b>,
}

enum CursorUnits<'b> {
    Any,
    Text(&'b [u16]),
    Elements(u8, &'b [u8], &'b [(usize, usize)]),
}

/// One unit of content.
enum Unit<'b> {
    /// Anything (content collected, or past what a block holds).
    Any,
    /// A UTF-16 code unit of a string.
    Code(u16),
    /// A unit of another kind: its kind and what it holds, as read rather than as written.
    Value(u8, Value),
    /// One that does not read as a [`Value`]: its kind and bytes, compared as written.
    Raw(u8, &'b [u8]),
}

impl Unit<'_> {
    /// Whether two units may be the same clock's content: U+FFFD stands for half of a
    /// surrogate pair a replica split.
    fn matches(&self, other: &Unit<'_>) -> bool {
        match (self, other) {
            (Unit::Any, _) | (_, Unit::Any) => true,
            (Unit::Code(a), Unit::Code(b)) => a == b || *a == 0xfffd || *b == 0xfffd,
            (Unit::Value(k, a), Unit::Value(l, b)) => k == l && a == b,
            (Unit::Raw(k, a), Unit::Raw(l, b)) => k == l && a == b,
            _ => false,
        }
    }
}

impl<'b> Cursor<'b> {
    /// A cursor at the start of a block's content; `codes`, a string's UTF-16 code units.
    fn new(bytes: &'b [u8], units: &'b Units, codes: &'b [u16]) -> Self {
        let units = match units {
            Units::Gone | Units::Deleted => CursorUnits::Any,
            Units::Text(..) => CursorUnits::Text(codes),
            Units::Elements(kind, units) => CursorUnits::Elements(*kind, bytes, units),
        };
        Cursor { at: 0, units }
    }

    fn next(&mut self) -> Unit<'b> {
        let at = self.at as usize;
        self.at += 1;
        match self.units {
            CursorUnits::Any => Unit::Any,
            CursorUnits::Text(codes) => codes.get(at).map_or(Unit::Any, |&c| Unit::Code(c)),
            CursorUnits::Elements(kind, bytes, units) => {
                units.get(at).map_or(Unit::Any, |&(start, end)| {
                    let unit = &bytes[start..end];
                    match Value::of_unit(kind, unit) {
                        Some(value) => Unit::Value(kind, value),
                        None => Unit::Raw(kind, unit),
                    }
                })
            }
        }
    }

    /// Moves on to the unit at `offset` in the block (never back).
    fn skip_to(&mut self, offset: u64) {
        self.at = self.at.max(offset);
    }
}

fn integrable_with(
    update: &[u8],
    have: &dyn Fn(u64) -> u64,
    runs: Option<&mut Vec<(u64, Run)>>,
) -> Result<Option<Cut>> {
    let want = |client: u64, clock: u64| clock < have(client);
    let mut reader = Reader {
        bytes: update,
        at: 0,
        record: Some(Record::default()),
        capture: runs.is_some().then(|| Capture {
            want: &want,
            runs: Vec::new(),
        }),
        run: None,
    };
    reader.structs()?;
    if let (Some(runs), Some(capture)) = (runs, reader.capture.take()) {
        *runs = capture.runs;
    }
    let Record {
        blocks,
        refs,
        sections,
    } = reader.record.take().unwrap_or_default();
    // Each client's next clock, as blocks integrate.
    let mut next: BTreeMap<u64, u64> = BTreeMap::new();
    let next_of = |next: &mut BTreeMap<u64, u64>, client: u64| -> u64 {
        *next.entry(client).or_insert_with(|| have(client))
    };
    // How many blocks of each section integrate. A section goes as far as it can, then waits
    // for the first clock its next block needs, `(client, clock, section)`, and goes on once
    // that clock is there: each block is looked at once, and again for each clock it waited for
    // (a chain of sections each waiting for the next would otherwise take a pass per section).
    let mut kept = vec![0usize; sections.len()];
    let mut waiting: BTreeSet<(u64, u64, usize)> = BTreeSet::new();
    let mut work: Vec<usize> = (0..sections.len()).rev().collect();
    while let Some(section) = work.pop() {
        let (first, end) = sections[section];
        while first + kept[section] < end {
            let block = &blocks[first + kept[section]];
            let at = next_of(&mut next, block.client);
            let needs = if block.start > at {
                Some((block.client, block.start - 1))
            } else if block.skip {
                (block.end > at).then(|| (block.client, block.end - 1))
            } else {
                refs[block.refs.0..block.refs.1]
                    .iter()
                    .copied()
                    .find(|&(client, clock)| clock >= next_of(&mut next, client))
            };
            if let Some((client, clock)) = needs {
                waiting.insert((client, clock, section));
                break;
            }
            let to = at.max(block.end);
            next.insert(block.client, to);
            kept[section] += 1;
            let ready: Vec<(u64, u64, usize)> = waiting
                .range((block.client, 0, 0)..(block.client, to, 0))
                .copied()
                .collect();
            for entry in ready {
                waiting.remove(&entry);
                work.push(entry.2);
            }
        }
    }
    let mut why = None;
    for (section, (first, end)) in sections.iter().enumerate() {
        if first + kept[section] < *end {
            let block = &blocks[first + kept[section]];
            let at = next_of(&mut next, block.client);
            let (client, from, to) = (block.client, block.start, block.end);
            why = Some(if block.start > at || block.skip {
                format!(
                    "it writes client {client}'s clocks {from}..{to} after clocks {at}..{}, which no one has written",
                    from.max(at + 1)
                )
            } else {
                let (of, clock) = refs[block.refs.0..block.refs.1]
                    .iter()
                    .copied()
                    .find(|&(of, clock)| clock >= next_of(&mut next, of))
                    .unwrap_or_default();
                format!(
                    "it writes client {client}'s clocks {from}..{to} next to client {of}'s clock {clock}, which no one has written"
                )
            });
            break;
        }
    }
    // The delete set, cut to the clocks written: here before, or by the blocks kept.
    let mut written: Vec<(u64, u64, u64)> = Vec::new();
    for (section, &(first, _)) in sections.iter().enumerate() {
        for block in blocks[first..first + kept[section]]
            .iter()
            .filter(|b| !b.skip)
        {
            written.push((block.client, block.start, block.end));
        }
    }
    let written = merge_written(written);
    let mut deletes: Vec<(u64, Vec<(u64, u64)>)> = Vec::new();
    let clients = reader.number()?;
    for _ in 0..clients {
        let client = reader.number()?;
        let had = have(client);
        let first = written.partition_point(|&(c, ..)| c < client);
        let last = written.partition_point(|&(c, ..)| c <= client);
        // The client's clocks written: those the document holds, and those the blocks kept
        // write (which may overlap them), merged.
        let mut known: Vec<(u64, u64)> = vec![(0, had)];
        for &(_, start, stop) in &written[first..last] {
            match known.last_mut() {
                Some(last) if start <= last.1 => last.1 = last.1.max(stop),
                _ => known.push((start, stop)),
            }
        }
        let mut ranges = Vec::new();
        for _ in 0..reader.number()? {
            let clock = reader.number()?;
            let len = reader.deleted_length()?;
            let end = clock.saturating_add(len);
            let mut covered = 0;
            for &(start, stop) in &known {
                let (from, to) = (start.max(clock), stop.min(end));
                if from < to {
                    ranges.push((from, to - from));
                    covered += to - from;
                }
            }
            if covered < len && why.is_none() {
                why = Some(format!(
                    "it deletes client {client}'s clocks {clock}..{end}, which no one has written (the document holds that client's clocks up to {had})"
                ));
            }
        }
        if !ranges.is_empty() {
            deletes.push((client, ranges));
        }
    }
    let Some(why) = why else {
        return Ok(None);
    };
    // Each section's blocks kept, without the skips that would end it.
    let kept: Vec<&[BlockAt]> = sections
        .iter()
        .zip(kept)
        .map(|(&(first, _), n)| {
            let mut blocks = &blocks[first..first + n];
            while let [rest @ .., last] = blocks {
                if !last.skip {
                    break;
                }
                blocks = rest;
            }
            blocks
        })
        .filter(|blocks| !blocks.is_empty())
        .collect();
    let mut out = Vec::with_capacity(update.len());
    write_var(&mut out, kept.len() as u64);
    for blocks in kept {
        let (head, tail) = (&blocks[0], &blocks[blocks.len() - 1]);
        write_var(&mut out, blocks.len() as u64);
        write_var(&mut out, head.client);
        write_var(&mut out, head.start);
        out.extend_from_slice(&update[head.bytes.0..tail.bytes.1]);
    }
    write_var(&mut out, deletes.len() as u64);
    for (client, ranges) in deletes {
        write_var(&mut out, client);
        write_var(&mut out, ranges.len() as u64);
        for (clock, len) in ranges {
            write_var(&mut out, clock);
            write_var(&mut out, len);
        }
    }
    Ok(Some(Cut { update: out, why }))
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

/// What [`integrable`] needs of the blocks, recorded as the reader walks them.
#[derive(Default)]
struct Record {
    blocks: Vec<BlockAt>,
    /// The ids the blocks refer to (origins, right origins, parents).
    refs: Vec<(u64, u64)>,
    /// Each client's section of the update: its blocks `first..end`.
    sections: Vec<(usize, usize)>,
}

/// A block: its client, clocks `start..end`, whether it is a skip, and where its bytes and
/// the ids it refers to are.
struct BlockAt {
    client: u64,
    start: u64,
    end: u64,
    skip: bool,
    bytes: (usize, usize),
    refs: (usize, usize),
}

/// A position in the update, read the way lib0 reads.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
    /// What [`integrable`] needs, when it reads.
    record: Option<Record>,
    /// What [`refusal`] needs, when it reads: which blocks to describe (by client and first
    /// clock), and their descriptions.
    capture: Option<Capture<'a>>,
    /// The block being read, described, when it is one to capture.
    run: Option<Run>,
}

/// The blocks [`refusal`] wants described, and those described so far.
struct Capture<'a> {
    want: &'a dyn Fn(u64, u64) -> bool,
    runs: Vec<(u64, Run)>,
}

/// One block, as [`refusal`] compares it with another, clock by clock.
#[derive(Debug, Default)]
struct Run {
    start: u64,
    end: u64,
    origin: Option<(u64, u64)>,
    right: Option<(u64, u64)>,
    /// Its parent and key, when it writes them (no origin on either side).
    parent: Option<(Parent, Option<String>)>,
    content: Units,
}

/// A block's parent, as it names it.
#[derive(Debug, PartialEq)]
enum Parent {
    /// A root type, by name.
    Root(String),
    /// A shared type, by the id of the item that holds it.
    Item(u64, u64),
}

/// A block's content, one unit per clock.
#[derive(Debug, Default)]
enum Units {
    /// A collected range or a skip: nothing to compare.
    #[default]
    Gone,
    /// Deleted content: its origins compare, its content is gone.
    Deleted,
    /// A string, compared by UTF-16 code unit: its bytes.
    Text(usize, usize),
    /// Units of a kind, each its bytes: JSON strings, values, or the one unit of binary content,
    /// an embed, a format, a shared type or a sub-document.
    Elements(u8, Vec<(usize, usize)>),
}

/// A value as every writer's encoding of it reads: a number in one form (whether lib0 wrote it
/// as an integer, a float32, a float64 or a bigint), an object's entries in key order, JSON
/// text parsed. Two writers' encodings of one value give equal `Value`s.
#[derive(Debug, PartialEq)]
enum Value {
    Undefined,
    Null,
    Bool(bool),
    /// A number f64 holds exactly: its bits (one zero, one NaN).
    Number(u64),
    /// An integer f64 does not hold exactly (a bigint).
    Integer(i64),
    String(String),
    Binary(Vec<u8>),
    Array(Vec<Value>),
    /// Entries in key order, the last of each key (as JavaScript and yrs read them).
    Object(Vec<(String, Value)>),
}

impl Value {
    /// One unit of content of `kind` (2 JSON, 3 binary, 5 embed, 6 format, 7 shared type,
    /// 8 values, 9 sub-document), its bytes `unit`; none if it cannot be read.
    fn of_unit(kind: u8, unit: &[u8]) -> Option<Value> {
        let mut reader = Reader {
            bytes: unit,
            at: 0,
            record: None,
            capture: None,
            run: None,
        };
        match kind {
            2 => match reader.string().ok()? {
                "undefined" => Some(Value::Undefined),
                text => Value::of_json(text),
            },
            3 => {
                let len = reader.number().ok()?;
                Some(Value::Binary(reader.take(len).ok()?.to_vec()))
            }
            5 => Value::of_json(reader.string().ok()?),
            6 => {
                let key = reader.string().ok()?;
                let value = Value::of_json(reader.string().ok()?)?;
                Some(Value::Array(vec![Value::String(key.into()), value]))
            }
            // A shared type: its kind, and an XML element's name.
            7 => {
                let type_ref = reader.number().ok()?;
                let name = match type_ref {
                    3 => Value::String(reader.string().ok()?.into()),
                    _ => Value::Undefined,
                };
                Some(Value::Array(vec![Value::integer(type_ref as i64), name]))
            }
            8 => reader.value(0).ok(),
            // A sub-document: its guid (yrs writes options of its own).
            _ => reader.string().ok().map(|guid| Value::String(guid.into())),
        }
    }

    fn of_json(text: &str) -> Option<Value> {
        fn convert(value: serde_json::Value) -> Value {
            match value {
                serde_json::Value::Null => Value::Null,
                serde_json::Value::Bool(b) => Value::Bool(b),
                serde_json::Value::Number(n) => Value::number(n.as_f64().unwrap_or(f64::NAN)),
                serde_json::Value::String(s) => Value::String(s),
                serde_json::Value::Array(values) => {
                    Value::Array(values.into_iter().map(convert).collect())
                }
                serde_json::Value::Object(entries) => {
                    Value::object(entries.into_iter().map(|(k, v)| (k, convert(v))).collect())
                }
            }
        }
        serde_json::from_str(text).ok().map(convert)
    }

    fn number(x: f64) -> Value {
        let x = if x == 0.0 { 0.0 } else { x };
        Value::Number(if x.is_nan() { f64::NAN } else { x }.to_bits())
    }

    fn integer(n: i64) -> Value {
        // 2^63 rounds from i64::MAX and back to it; it is not i64::MAX.
        let x = n as f64;
        if x < 2f64.powi(63) && x as i64 == n {
            Value::number(x)
        } else {
            Value::Integer(n)
        }
    }

    /// Entries sorted by key; of a key written twice, the last.
    fn object(mut entries: Vec<(String, Value)>) -> Value {
        entries.reverse();
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        entries.dedup_by(|later, first| later.0 == first.0);
        Value::Object(entries)
    }
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
    fn signed(&mut self) -> Result<i64> {
        let start = self.at;
        let first = self.byte()?;
        let magnitude = self.rest_of_number(start, first, u64::from(first & 0x3f), 6)? as i64;
        Ok(if first & 0x40 != 0 {
            -magnitude
        } else {
            magnitude
        })
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
                125 => drop(self.signed()?),
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

    /// One lib0 value as a [`Value`], nested at most [`MAX_DEPTH`] levels below `depth`.
    fn value(&mut self, depth: usize) -> Result<Value> {
        Ok(match self.byte()? {
            127 => Value::Undefined,
            126 => Value::Null,
            121 => Value::Bool(false),
            120 => Value::Bool(true),
            125 => Value::integer(self.signed()?),
            124 => {
                let bytes = self.take(4)?;
                Value::number(f32::from_be_bytes(bytes.try_into().expect("four bytes")).into())
            }
            123 => Value::number(f64::from_be_bytes(
                self.take(8)?.try_into().expect("eight bytes"),
            )),
            122 => Value::integer(i64::from_be_bytes(
                self.take(8)?.try_into().expect("eight bytes"),
            )),
            119 => Value::String(self.string()?.into()),
            116 => {
                let len = self.number()?;
                Value::Binary(self.take(len)?.to_vec())
            }
            tag @ (118 | 117) => {
                let len = self.number()?;
                // As `any` counts them: an empty array or object nests nothing.
                if depth == MAX_DEPTH && len > 0 {
                    return Err(self.error("values nested more than 128 levels deep"));
                }
                // Each entry takes a byte at least: a length past the bytes left is refused
                // before anything is reserved.
                if len > (self.bytes.len() - self.at) as u64 {
                    return Err(self.error("the update ends early"));
                }
                if tag == 117 {
                    let mut values = Vec::with_capacity(len as usize);
                    for _ in 0..len {
                        values.push(self.value(depth + 1)?);
                    }
                    Value::Array(values)
                } else {
                    let mut entries = Vec::with_capacity(len as usize);
                    for _ in 0..len {
                        let key = self.string()?.to_owned();
                        entries.push((key, self.value(depth + 1)?));
                    }
                    Value::object(entries)
                }
            }
            _ => {
                self.at -= 1;
                return Err(self.error("a value type Yjs does not know"));
            }
        })
    }

    /// An id `(client, clock)`; one of the item's own client at or after its clock is refused.
    fn id_before(&mut self, client: u64, clock: u64, problem: &'static str) -> Result<(u64, u64)> {
        let start = self.at;
        let (of, at) = (self.number()?, self.number()?);
        if of == client && at >= clock {
            return Err(V1Error {
                problem,
                offset: start,
            });
        }
        if let Some(record) = &mut self.record {
            record.refs.push((of, at));
        }
        Ok((of, at))
    }

    /// The blocks, client by client.
    fn structs(&mut self) -> Result<()> {
        let clients = self.number()?;
        // The clients with a section so far: yrs refuses a client's blocks in a second section,
        // and Yjs keeps a client's last section, even an empty one, dropping the blocks of the
        // one before (which yrs applied). No encoder writes a client twice.
        let mut sectioned = BTreeSet::new();
        for _ in 0..clients {
            let section = self.at;
            let count = self.number()?;
            let client = self.number()?;
            let mut clock = self.number()?;
            let first = self.record.as_ref().map_or(0, |r| r.blocks.len());
            for _ in 0..count {
                let (at, refs) = (self.at, self.record.as_ref().map_or(0, |r| r.refs.len()));
                let skip = self.bytes.get(at).is_some_and(|info| info & 0x1f == 10);
                if self
                    .capture
                    .as_ref()
                    .is_some_and(|c| (c.want)(client, clock))
                {
                    self.run = Some(Run::default());
                }
                let len = self.block(client, clock)?;
                if len == 0 {
                    // yrs drops an item of no length (an empty string, no values, nothing
                    // deleted), and Yjs keeps it, which makes it fail on the next update that
                    // looks up its client's clocks. No encoder writes one.
                    return Err(V1Error {
                        problem: "a block of no length",
                        offset: at,
                    });
                }
                if let (Some(mut run), Some(capture)) = (self.run.take(), &mut self.capture) {
                    run.start = clock;
                    run.end = clock.saturating_add(len);
                    capture.runs.push((client, run));
                }
                if let Some(record) = &mut self.record {
                    record.blocks.push(BlockAt {
                        client,
                        start: clock,
                        end: clock.saturating_add(len),
                        skip,
                        bytes: (at, self.at),
                        refs: (refs, record.refs.len()),
                    });
                }
                clock = clock
                    .checked_add(len)
                    .filter(|&end| end <= MAX_SAFE)
                    .ok_or_else(|| self.error("a clock above 2^53 - 1"))?;
            }
            if !sectioned.insert(client) {
                return Err(V1Error {
                    problem: "a client in a second section",
                    offset: section,
                });
            }
            if let Some(record) = &mut self.record {
                record.sections.push((first, record.blocks.len()));
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
        let mut origin = None;
        let mut right = None;
        if info & 0x80 != 0 {
            origin =
                Some(self.id_before(client, clock, "an item whose origin is not before it")?);
        }
        if info & 0x40 != 0 {
            right = Some(self.id_before(
                client,
                clock,
                "an item whose right origin is not before it",
            )?);
        }
        // Its parent and key, kept (as read, not as written) for a run being described.
        let mut parent = None;
        if info & 0xc0 == 0 {
            // Yjs reads any number but 1 as "an id follows".
            let of = if self.number()? == 1 {
                Err(self.string()?)
            } else {
                Ok(self.id_before(client, clock, "an item whose parent is not before it")?)
            };
            let key = if info & 0x20 != 0 {
                Some(self.string()?)
            } else {
                None
            };
            if self.run.is_some() {
                let of = match of {
                    Ok((of, at)) => Parent::Item(of, at),
                    Err(name) => Parent::Root(name.to_owned()),
                };
                parent = Some((of, key.map(str::to_owned)));
            }
        }
        if let Some(run) = &mut self.run {
            run.origin = origin;
            run.right = right;
            run.parent = parent;
        }
        let kind = info & 0x1f;
        let content = self.at;
        // Each unit's bytes, for a run being described.
        let mut units = self.run.as_ref().map(|_| Vec::new());
        let len = match kind {
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
                    if let Some(units) = &mut units {
                        units.push((start, self.at));
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
            4 => {
                let text = self.string()?;
                if let Some(run) = &mut self.run {
                    let end = self.at;
                    run.content = Units::Text(end - text.len(), end);
                }
                text.chars().map(|c| c.len_utf16() as u64).sum()
            }
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
                    let start = self.at;
                    self.any()?;
                    if let Some(units) = &mut units {
                        units.push((start, self.at));
                    }
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
        };
        if let Some(run) = &mut self.run {
            match (kind, units) {
                (1, _) => run.content = Units::Deleted,
                (4, _) => {}
                (2 | 8, Some(units)) => run.content = Units::Elements(kind, units),
                _ => run.content = Units::Elements(kind, vec![(content, self.at)]),
            }
        }
        Ok(len)
    }

    /// The delete set: for each client, ranges `(clock, length)`, in order and apart, and each
    /// client's in one entry (see the module).
    fn delete_set(&mut self) -> Result<()> {
        let clients = self.number()?;
        let mut with_ranges = BTreeSet::new();
        for _ in 0..clients {
            let entry = self.at;
            let client = self.number()?;
            let ranges = self.number()?;
            if ranges > 0 && !with_ranges.insert(client) {
                return Err(V1Error {
                    problem: "a client's deleted ranges in a second entry",
                    offset: entry,
                });
            }
            let mut end = 0;
            for _ in 0..ranges {
                let start = self.at;
                let clock = self.number()?;
                let len = self.deleted_length()?;
                if clock < end {
                    return Err(V1Error {
                        problem: "a deleted range that overlaps or comes before the one before it",
                        offset: start,
                    });
                }
                end = clock.saturating_add(len);
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
    use yrs::updates::decoder::Decode;
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

    /// A deletion in a text a client wrote at both ends in turn deletes every other clock of
    /// it: one range each, 1,000 of them. Split to 600 bytes, every piece fits, and the pieces
    /// delete what the whole does.
    #[test]
    fn a_large_delete_set_splits_into_pieces_that_fit_and_delete_the_same() {
        use yrs::GetString;
        let doc = Doc::with_options(Options {
            client_id: yrs::block::ClientID::new(5),
            ..Options::default()
        });
        let text = doc.get_or_insert_text("t");
        for i in 0..2_000u32 {
            let mut txn = doc.transact_mut();
            let at = if i % 2 == 0 { 0 } else { text.len(&txn) };
            text.insert(&mut txn, at, "x");
        }
        let before = doc
            .transact()
            .encode_state_as_update_v1(&StateVector::default());
        let delete = {
            let mut txn = doc.transact_mut();
            text.remove_range(&mut txn, 0, 1_000);
            txn.encode_update_v1()
        };
        assert!(delete.len() > 2_000, "{} bytes", delete.len());
        let pieces = split(&delete, 600).unwrap();
        assert!(pieces.len() > 3, "{} pieces", pieces.len());
        let other = Doc::new();
        let other_text = other.get_or_insert_text("t");
        other
            .transact_mut()
            .apply_update(yrs::Update::decode_v1(&before).unwrap())
            .unwrap();
        for piece in &pieces {
            assert!(piece.len() <= 600, "{} bytes", piece.len());
            check(piece).unwrap();
            other
                .transact_mut()
                .apply_update(yrs::Update::decode_v1(piece).unwrap())
                .unwrap();
        }
        assert_eq!(
            other_text.get_string(&other.transact()),
            text.get_string(&doc.transact())
        );
        assert_eq!(other_text.len(&other.transact()), 1_000);
        // Within the limit, the update comes back whole.
        assert_eq!(split(&delete, delete.len()).unwrap(), vec![delete.clone()]);
        // An update with blocks comes back whole.
        let insert = {
            let mut txn = doc.transact_mut();
            text.insert(&mut txn, 0, &"y".repeat(700));
            txn.encode_update_v1()
        };
        assert!(split(&insert, 600).unwrap()[0].len() > 600);
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
        // A client's ranges: in order and apart (touching is apart), once.
        let overlaps = "a deleted range that overlaps or comes before the one before it";
        assert_eq!(problem(&[0, 1, 9, 2, 0, 5, 3, 1]), overlaps);
        assert_eq!(problem(&[0, 1, 9, 2, 5, 1, 0, 1]), overlaps);
        assert_eq!(problem(&[0, 1, 9, 2, 0, 5, 0, 5]), overlaps);
        assert_eq!(check(&[0, 1, 9, 2, 0, 5, 5, 1]), Ok(()));
        assert_eq!(
            problem(&[0, 2, 9, 1, 0, 1, 9, 1, 5, 1]),
            "a client's deleted ranges in a second entry"
        );
        assert_eq!(check(&[0, 2, 9, 0, 9, 1, 0, 1]), Ok(()));
        assert_eq!(check(&[0, 2, 9, 1, 0, 1, 8, 1, 0, 1]), Ok(()));
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

    /// Sections that each wait for the next one: client 1's block next to client 2's clock 0,
    /// client 2's next to client 3's, and so on; the last one needs nothing. All integrate,
    /// each block looked at about twice (not once for every section after it).
    #[test]
    fn a_chain_of_sections_each_waiting_for_the_next_integrates() {
        let n: u64 = 20_000;
        let chain = |last: bool| {
            let mut update = Vec::new();
            write_var(&mut update, if last { n } else { n - 1 });
            for client in 1..n {
                update.push(1);
                write_var(&mut update, client);
                update.extend_from_slice(&[0, 0x84]);
                write_var(&mut update, client + 1);
                update.extend_from_slice(&[0, 1, b'a']);
            }
            if last {
                update.push(1);
                write_var(&mut update, n);
                update.extend_from_slice(&[0, 4, 1, 1, b't', 1, b'a']);
            }
            update.push(0);
            update
        };
        let whole = chain(true);
        check(&whole).unwrap();
        assert_eq!(integrable(&whole, |_| 0).unwrap(), None);
        // Without the last, none does.
        let cut = integrable(&chain(false), |_| 0).unwrap().unwrap();
        assert_eq!(cut.update, [0, 0]);
        assert!(cut.why.contains("client 1's clocks 0..1"), "{}", cut.why);
    }

    /// A document of client `id` that counts text positions in UTF-16 code units, as Yjs does.
    fn doc_of(id: u64) -> Doc {
        Doc::with_options(Options {
            client_id: yrs::block::ClientID::new(id),
            offset_kind: OffsetKind::Utf16,
            ..Options::default()
        })
    }

    fn state(doc: &Doc) -> Vec<u8> {
        doc.transact()
            .encode_state_as_update_v1(&StateVector::default())
    }

    /// What a room holds, sent again, is taken however the room's blocks split and merged since:
    /// another client's insert inside it, a deletion of part of it (whose content the room
    /// collected), an insert between the halves of a surrogate pair, values in a map and an
    /// array. So is the writer's whole document given back.
    #[test]
    fn clocks_the_room_holds_sent_again_are_taken_however_its_blocks_split() {
        let writer = doc_of(5);
        let text = writer.get_or_insert_text("t");
        let map = writer.get_or_insert_map("m");
        let array = writer.get_or_insert_array("a");
        let mut sent = Vec::new();
        for edit in 0..4 {
            let mut txn = writer.transact_mut();
            match edit {
                0 => text.insert(&mut txn, 0, "hello a😀b world"),
                1 => {
                    map.insert(&mut txn, "k", Any::from("v"));
                    map.insert(&mut txn, "n", Any::from(1.5));
                }
                2 => array.insert_range(&mut txn, 0, [Any::from(1.0), Any::from("two")]),
                _ => text.insert(&mut txn, 5, ","),
            }
            sent.push(txn.encode_update_v1());
        }
        let room = crate::doc::SharedDoc::with_client_id(1);
        for update in &sent {
            room.apply_member_update(update).unwrap();
        }
        // Another member writes inside the text and the array, between the halves of the
        // surrogate pair, and deletes a word: the room's blocks split.
        let other = doc_of(6);
        other
            .transact_mut()
            .apply_update(yrs::Update::decode_v1(&state(&writer)).unwrap())
            .unwrap();
        let other_text = other.get_or_insert_text("t");
        let other_array = other.get_or_insert_array("a");
        let mut edits = Vec::new();
        for edit in 0..4 {
            let mut txn = other.transact_mut();
            match edit {
                0 => other_text.insert(&mut txn, 3, "X"),
                1 => other_text.insert(&mut txn, 10, "Y"),
                2 => other_text.remove_range(&mut txn, 14, 5),
                _ => drop(other_array.insert(&mut txn, 1, Any::from("between"))),
            }
            edits.push(txn.encode_update_v1());
        }
        for update in &edits {
            room.apply_member_update(update).unwrap();
        }
        for update in &sent {
            room.apply_member_update(update).unwrap();
        }
        room.apply_member_update(&state(&writer)).unwrap();
        room.apply_member_update(&state(&other)).unwrap();
    }

    /// A client's blocks in two sections: yrs refuses them (integrated, the same ids twice made
    /// a cycle), and Yjs keeps the last; the check refuses them, before the relay compares or
    /// integrates anything (unsorted, its comparison's work grew with the square of the
    /// sections). So is an empty second section: Yjs keeps it, and drops the blocks before it,
    /// which yrs applied. An empty section alone, and other clients' sections, are taken.
    #[test]
    fn a_client_in_two_sections_is_refused() {
        let a = [1, 5, 0, 4, 1, 1, b't', 1, b'a'];
        let b = [1, 5, 1, 0x84, 5, 0, 1, b'b'];
        let update = [&[2][..], &a, &b, &[0]].concat();
        assert_eq!(problem(&update), "a client in a second section");
        let empty = [0, 5, 7];
        let emptied = [&[2][..], &a, &empty, &[0]].concat();
        assert_eq!(problem(&emptied), "a client in a second section");
        check(&[&[1][..], &empty, &[0]].concat()).unwrap();
        let other = [1, 6, 0, 4, 1, 1, b't', 1, b'c'];
        check(&[&[2][..], &a, &other, &[0]].concat()).unwrap();
    }

    /// Deleted content that goes on past the clocks the room holds, naming an origin in another
    /// type than the room's block there (client 9's map entry, where the room holds its
    /// character "b" of the text): Yjs took its parent from that origin and its left neighbour
    /// from the clock before, linked it into the text and into the map at once, and threw
    /// ("Unexpected case") once the map was deleted. Deleted content is compared where it goes
    /// on past the held clocks, as content is; within them it still compares with anything.
    #[test]
    fn deleted_content_going_on_from_held_clocks_compares_its_origins() {
        let room = crate::doc::SharedDoc::with_client_id(1);
        let writer = doc_of(9);
        {
            let map = writer.get_or_insert_map("m");
            let text = writer.get_or_insert_text("content");
            let mut txn = writer.transact_mut();
            let inner = map.insert(&mut txn, "n", MapPrelim::default());
            inner.insert(&mut txn, "k", 1);
            text.insert(&mut txn, 0, "ab");
        }
        room.apply_member_update(&state(&writer)).unwrap();
        // Client 9, clock 3: deleted content of 3 clocks after its clock 1 (the map entry "k").
        let hostile = [1, 1, 9, 3, 0x81, 9, 1, 3, 0];
        let Err(crate::doc::DocError::NotTaken(why)) = room.apply_member_update(&hostile) else {
            panic!("taken")
        };
        assert!(why.contains("client 9's clock 3"), "{why}");
        // Within the held clocks, deleted content is a resend whatever its origins.
        room.apply_member_update(&[1, 1, 9, 3, 0x81, 9, 1, 1, 0])
            .unwrap();
        assert_eq!(room.text("content"), "ab");
    }

    /// A large block of the room's, sent again as a block per clock: each block shares the
    /// room's one look at it. A look per block encoded the room's block whole each time, the
    /// work growing with the square of the update's length (a room stalled by one message).
    #[test]
    fn a_block_sent_again_a_clock_at_a_time_is_taken_in_one_look() {
        const N: u64 = 20_000;
        let writer = doc_of(5);
        let text = writer.get_or_insert_text("t");
        text.insert(&mut writer.transact_mut(), 0, &"a".repeat(N as usize));
        let room = crate::doc::SharedDoc::with_client_id(1);
        room.apply_member_update(&state(&writer)).unwrap();
        // One section of client 5, N blocks: the first names its parent, each other has the
        // one before as its origin.
        let mut update = Vec::new();
        for n in [1, N, 5, 0] {
            write_var(&mut update, n);
        }
        update.extend_from_slice(&[4, 1, 1, b't', 1, b'a']);
        for clock in 1..N {
            update.push(0x84);
            write_var(&mut update, 5);
            write_var(&mut update, clock - 1);
            update.extend_from_slice(&[1, b'a']);
        }
        update.push(0);
        let looks = std::cell::Cell::new(0);
        let txn_doc = doc_of(5);
        txn_doc
            .transact_mut()
            .apply_update(yrs::Update::decode_v1(&state(&writer)).unwrap())
            .unwrap();
        let txn = txn_doc.transact();
        let refused = refusal(
            &update,
            |client| u64::from(txn.state_of(yrs::block::ClientID::new(client))),
            |client, from, to| {
                looks.set(looks.get() + 1);
                txn.encode_client_range_v1(
                    yrs::block::ClientID::new(client),
                    from as u32..to as u32,
                )
            },
        )
        .unwrap();
        assert_eq!(refused, None);
        assert_eq!(looks.get(), 1);
        room.apply_member_update(&update).unwrap();
    }

    /// A collected range of ten bytes claims two billion clocks of a client; sent again, the
    /// room holds them all. Compared clock by clock, it kept the relay busy for minutes per
    /// message; it has no content to lose, and is taken at once.
    #[test]
    fn a_range_without_content_sent_again_is_taken_at_once() {
        let room = crate::doc::SharedDoc::with_client_id(1);
        // One client (77), one block: a GC range of 2^31 clocks from 0; no deletions.
        let gc = vec![1, 1, 77, 0, 0, 0x80, 0x80, 0x80, 0x80, 0x08, 0];
        room.apply_member_update(&gc).unwrap();
        room.apply_member_update(&gc).unwrap();
    }

    /// One value as two writers encode it reads as one [`Value`]; other values read as others.
    #[test]
    fn values_compare_in_the_form_every_writer_shares() {
        let value = |bytes: &[u8]| Value::of_unit(8, bytes).expect("a value");
        let json = |text: &str| {
            let mut unit = vec![text.len() as u8];
            unit.extend_from_slice(text.as_bytes());
            Value::of_unit(5, &unit).expect("JSON")
        };
        let f64_of = |x: f64| [&[123][..], &x.to_be_bytes()].concat();
        let f32_of = |x: f32| [&[124][..], &x.to_be_bytes()].concat();
        let bigint = |n: i64| [&[122][..], &n.to_be_bytes()].concat();
        // 3 as lib0's integer, a float64, a float32 and a bigint.
        for three in [f64_of(3.0), f32_of(3.0), bigint(3)] {
            assert_eq!(value(&[125, 3]), value(&three));
        }
        assert_eq!(value(&[125, 0x43]), value(&f64_of(-3.0)));
        // -0 as lib0 writes it (a sign and no bits), and 0.
        assert_eq!(value(&[125, 0x40]), value(&[125, 0]));
        assert_eq!(value(&f32_of(1.5)), value(&f64_of(1.5)));
        assert_eq!(value(&f32_of(f32::NAN)), value(&f64_of(-f64::NAN)));
        assert_ne!(value(&f32_of(0.1)), value(&f64_of(0.1)));
        assert_ne!(value(&[125, 3]), value(&[125, 2]));
        // A bigint f64 does not hold is not the float64 nearest it.
        let big = (1i64 << 62) + 1;
        assert_ne!(value(&bigint(big)), value(&f64_of(big as f64)));
        assert_eq!(value(&bigint(big)), value(&bigint(big)));
        // {a: 1, b: "x"}, its keys in either order; the last of a key written twice counts.
        let ab = [118, 2, 1, b'a', 125, 1, 1, b'b', 119, 1, b'x'];
        let ba = [
            118, 2, 1, b'b', 119, 1, b'x', 1, b'a', 123, 63, 240, 0, 0, 0, 0, 0, 0,
        ];
        let twice = [
            118, 3, 1, b'a', 125, 2, 1, b'b', 119, 1, b'x', 1, b'a', 125, 1,
        ];
        assert_eq!(value(&ab), value(&ba));
        assert_eq!(value(&ab), value(&twice));
        assert_ne!(value(&ab), value(&[118, 1, 1, b'a', 125, 1]));
        assert_ne!(value(&[117, 1, 125, 1]), value(&[117, 2, 125, 1, 125, 1]));
        assert_ne!(value(&[119, 1, b'a']), value(&[119, 1, b'b']));
        assert_ne!(value(&[126]), value(&[127]));
        // JSON: the same value in another writer's text.
        assert_eq!(
            json(r#"{"w":1.0,"src":"x"}"#),
            json(r#"{ "src": "\u0078", "w": 1 }"#)
        );
        assert_ne!(json(r#"{"w":1}"#), json(r#"{"w":2}"#));
        // A format: its key and its value.
        let format = |key: &str, text: &str| {
            let mut unit = vec![key.len() as u8];
            unit.extend_from_slice(key.as_bytes());
            unit.push(text.len() as u8);
            unit.extend_from_slice(text.as_bytes());
            Value::of_unit(6, &unit).expect("a format")
        };
        assert_eq!(format("bold", "true"), format("bold", " true"));
        assert_ne!(format("bold", "true"), format("italic", "true"));
        // Lengths and kinds are read, not compared as written: lib0 reads 3 from [131, 0].
        assert_eq!(
            Value::of_unit(3, &[3, 1, 2, 3]),
            Value::of_unit(3, &[131, 0, 1, 2, 3])
        );
        assert_ne!(
            Value::of_unit(3, &[3, 1, 2, 3]),
            Value::of_unit(3, &[3, 1, 2, 4])
        );
        assert_eq!(
            Value::of_unit(7, &[3, 1, b'p']),
            Value::of_unit(7, &[131, 0, 129, 0, b'p'])
        );
        assert_ne!(
            Value::of_unit(7, &[3, 1, b'p']),
            Value::of_unit(7, &[3, 1, b'q'])
        );
        assert_ne!(Value::of_unit(7, &[0]), Value::of_unit(7, &[1]));
        // An empty array or object nests nothing, as the check counts: 128 arrays around an
        // empty one read.
        let deepest = [[117u8, 1].repeat(MAX_DEPTH), vec![117, 0]].concat();
        assert!(Value::of_unit(8, &deepest).is_some());
        // Nesting past the limit does not read.
        let deep = [117u8, 1].repeat(MAX_DEPTH + 1);
        assert!(Value::of_unit(8, &[deep, vec![126]].concat()).is_none());
    }

    /// Clocks the room holds, written with other content, are refused, at the first clock that
    /// differs: other text, the same text elsewhere (another origin), another key of a map,
    /// another kind of content.
    #[test]
    fn clocks_the_room_holds_written_with_other_content_are_refused() {
        let writer = doc_of(5);
        let text = writer.get_or_insert_text("t");
        let first = {
            let mut txn = writer.transact_mut();
            text.insert(&mut txn, 0, "first");
            txn.encode_update_v1()
        };
        let room = crate::doc::SharedDoc::with_client_id(1);
        room.apply_member_update(&first).unwrap();
        // An update of client 5 that a fresh document makes with `edit`.
        let forge = |edit: &dyn Fn(&Doc) -> Vec<u8>| edit(&doc_of(5));
        let text_in = |name: &'static str, content: &'static str| {
            forge(&move |d| {
                let t = d.get_or_insert_text(name);
                let mut txn = d.transact_mut();
                t.insert(&mut txn, 0, content);
                txn.encode_update_v1()
            })
        };
        let cases: Vec<(&str, Vec<u8>, u64)> = vec![
            ("other text", text_in("t", "fir5t"), 3),
            ("other text, longer", text_in("t", "firsT and more"), 4),
            ("another text", text_in("u", "first"), 0),
            (
                "a map entry",
                forge(&|d| {
                    let m = d.get_or_insert_map("m");
                    let mut txn = d.transact_mut();
                    m.insert(&mut txn, "k", Any::from("first"));
                    txn.encode_update_v1()
                }),
                0,
            ),
        ];
        for (what, update, clock) in cases {
            let error = room.apply_member_update(&update).unwrap_err().to_string();
            assert!(
                error.contains(&format!("client 5's clock {clock} with other content")),
                "{what}: {error}"
            );
        }
        // The same text at the next clocks, after another client's text instead of its own.
        let room_doc = doc_of(9);
        room_doc
            .transact_mut()
            .apply_update(yrs::Update::decode_v1(&first).unwrap())
            .unwrap();
        let next = {
            let mut txn = writer.transact_mut();
            text.insert(&mut txn, 5, " second");
            txn.encode_update_v1()
        };
        let elsewhere = {
            let forged = doc_of(5);
            forged
                .transact_mut()
                .apply_update(yrs::Update::decode_v1(&first).unwrap())
                .unwrap();
            let t = forged.get_or_insert_text("t");
            let mut txn = forged.transact_mut();
            t.insert(&mut txn, 0, " second");
            txn.encode_update_v1()
        };
        room.apply_member_update(&elsewhere).unwrap();
        let error = room.apply_member_update(&next).unwrap_err().to_string();
        assert!(
            error.contains("client 5's clock 5 with other content"),
            "{error}"
        );
        // The same text at client 3's first clocks, one in the root type `t` (no origins), one
        // placed before client 7's text in `u` (a right origin): the room's block has no right
        // origin, but no origin either, so it did not ignore one.
        let room = crate::doc::SharedDoc::with_client_id(1);
        let seven = forge(&|_| {
            let d = doc_of(7);
            let t = d.get_or_insert_text("u");
            let mut txn = d.transact_mut();
            t.insert(&mut txn, 0, "x");
            txn.encode_update_v1()
        });
        room.apply_member_update(&seven).unwrap();
        let at_three = |info: u8, body: &[u8]| {
            let mut update = one_item(info, body);
            update[2] = 3;
            update
        };
        room.apply_member_update(&at_three(4, &[5, b'f', b'i', b'r', b's', b't']))
            .unwrap();
        let before_x = at_three(0x44, &[7, 0, 5, b'f', b'i', b'r', b's', b't']);
        let error = room.apply_member_update(&before_x).unwrap_err().to_string();
        assert!(
            error.contains("client 3's clock 0 with other content"),
            "{error}"
        );
        // The same from the block's middle on: the room's block still has no origin of its own
        // (written from a clock inside it, it showed that clock's neighbour as one).
        let middle = [1, 1, 3, 2, 0xc4, 3, 1, 7, 0, 3, b'r', b's', b't', 0];
        let error = room.apply_member_update(&middle).unwrap_err().to_string();
        assert!(
            error.contains("client 3's clock 2 with other content"),
            "{error}"
        );
    }

    #[test]
    fn what_waits_for_clocks_no_one_wrote_is_cut() {
        use crate::doc::SharedDoc;
        let writer = SharedDoc::with_client_id(9);
        let _missed = writer.insert("t", 0, "abcdef").unwrap();
        let delete = writer.delete("t", 1, 3).unwrap();
        let after = writer.insert("t", 3, "!").unwrap();
        let other = SharedDoc::with_client_id(8);
        let own = other.insert("t", 0, "xyz").unwrap();
        let own_delete = other.delete("t", 0, 1).unwrap();
        let replica = SharedDoc::new();
        for update in [&delete, &after, &own, &own_delete] {
            replica.apply_update(update).unwrap();
        }
        assert!(replica.has_pending());
        let cut = integrable(&replica.snapshot(), |_| 0)
            .unwrap()
            .expect("what the replica holds back is cut");
        assert!(cut.why.contains("client 9"), "{}", cut.why);
        check(&cut.update).unwrap();
        let relay = SharedDoc::new();
        relay.apply_member_update(&cut.update).unwrap();
        assert_eq!(relay.text("t"), "yz", "the deletes it wrote stay");
        assert!(!relay.has_pending());
        assert_eq!(integrable(&relay.snapshot(), |_| 0).unwrap(), None);

        // A range partly written is cut to the written part; a client with nothing written
        // goes.
        let mut update = one_item(4, &[2, b'a', b'b']);
        update.pop();
        let structs = update.clone();
        update.extend_from_slice(&[2, 5, 1, 1, 5, 6, 1, 0, 3]);
        let mut expected = structs;
        expected.extend_from_slice(&[1, 5, 1, 1, 1]);
        let cut = integrable(&update, |_| 0).unwrap().unwrap();
        assert_eq!(cut.update, expected);
        assert!(cut.why.contains("client 5's clocks 1..6"), "{}", cut.why);
        // ... unless the document holds those clocks.
        assert_eq!(integrable(&update, |_| 10).unwrap(), None);

        // Blocks after a gap: client 5's clocks 3..5.
        let gap = [1, 1, 5, 3, 4, 1, 1, b't', 2, b'a', b'b', 0];
        assert_eq!(integrable(&gap, |_| 3).unwrap(), None);
        let cut = integrable(&gap, |_| 2).unwrap().unwrap();
        assert_eq!(cut.update, [0, 0]);
        assert!(cut.why.contains("after clocks 2..3"), "{}", cut.why);

        // A block whose origin is a clock no one wrote: client 6's clock 9.
        let next_to = [1, 1, 5, 0, 0x84, 6, 9, 2, b'a', b'b', 0];
        assert_eq!(
            integrable(&next_to, |c| 10 * u64::from(c == 6)).unwrap(),
            None
        );
        let cut = integrable(&next_to, |_| 0).unwrap().unwrap();
        assert_eq!(cut.update, [0, 0]);
        assert!(cut.why.contains("client 6's clock 9"), "{}", cut.why);

        // A block the document holds already covers nothing past what the document holds: a
        // GC block of client 9's clocks 3..5 does not make its delete of 0..7 written.
        let overlap = [1, 1, 9, 3, 0, 2, 1, 9, 1, 0, 7];
        let held = |client| if client == 9 { 5 } else { 0 };
        let cut = integrable(&overlap, held).unwrap().unwrap();
        assert!(cut.why.contains("client 9's clocks 0..7"), "{}", cut.why);
        assert_eq!(&cut.update[cut.update.len() - 5..], [1, 9, 1, 0, 5]);

        // Checked on the way.
        update.truncate(update.len() - 1);
        update.push(0);
        assert_eq!(
            integrable(&update, |_| 0).unwrap_err().problem,
            "a deleted range of length 0"
        );
    }
}
