//! What the fuzz targets run, shared with the test that replays the committed corpus
//! (`crates/core/tests/fuzz_corpus.rs`): each function takes any bytes, must never panic or
//! hang, and checks the invariants it can.
#![allow(dead_code)]

use std::collections::HashMap;

use pattern_mesh_core::doc::{DocError, SharedDoc};
use pattern_mesh_core::pattern::PatternConfig;
use pattern_mesh_core::room::{JoinRequest, Output, Reader, RoomCore, RoomLimits};
use pattern_mesh_core::saved::Saved;
use pattern_mesh_core::session::{Session, SessionConfig};
use pattern_mesh_core::store::{Appended, NodeRecord, RoomRecord, StoreError};
use pattern_mesh_core::validate::{Origin, Validator, ValidatorConfig, Verdict};
use pattern_mesh_core::wire::part::Reassembler;
use pattern_mesh_core::wire::{Body, Frame, Json, Kind, Limits, Positioned, RoomConfig, Stamp};

/// Reads the fuzzer's bytes as a stream of small choices.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> Option<u8> {
        let (&first, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(first)
    }

    fn u16(&mut self) -> Option<u16> {
        Some(u16::from(self.u8()?) | u16::from(self.u8()?) << 8)
    }

    fn take(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head
    }
}

fn limits() -> Limits {
    Limits {
        max_frame: 4_096,
        max_message: 64 * 1_024,
        ..Limits::default()
    }
}

/// The decoder: any bytes give a frame or an error; a frame encodes back to bytes that decode
/// to the same frame; parts put together never exceed the message limit.
pub fn decode(data: &[u8]) {
    let limits = limits();
    if let Ok(Positioned { position, frame }) = Frame::decode_positioned(data, &limits) {
        let bytes = frame.encode();
        let again = Frame::decode_with(&bytes, &limits.for_message())
            .expect("what decoded encodes to something that decodes");
        assert_eq!(again, frame);
        if let Some(position) = position {
            let positioned = pattern_mesh_core::wire::with_position(&bytes, position)
                .expect("a frame takes a position");
            assert_eq!(
                Frame::decode_positioned(&positioned, &limits.for_message()).map(|p| p.frame),
                Ok(frame)
            );
        }
    }
    // The same bytes as a stored session (what IndexedDB gives back, maybe damaged): it
    // decodes to something that encodes to itself, and a session restored from it starts.
    if let Ok(saved) = Saved::decode(data) {
        assert_eq!(Saved::decode(&saved.encode()).as_ref(), Ok(&saved));
        let mut config = SessionConfig::new("fuzz", "fuzz");
        config.persist = true;
        config.restore = Some(saved);
        let mut session = Session::new(config, SharedDoc::new(), 0);
        while session.poll_output().is_some() {}
        while session.poll_event().is_some() {}
        assert!(session.saved().upto() <= session.step());
    }
    // The same bytes as a stream of parts.
    let mut reassembler = Reassembler::new();
    let mut input = Bytes(data);
    while let Some(len) = input.u8() {
        let chunk = input.take(usize::from(len));
        if let Ok(Frame::Part {
            total,
            offset,
            bytes,
        }) = Frame::decode_with(chunk, &limits)
        {
            if let Ok(Some(whole)) = reassembler.push(total, offset, bytes, limits.max_message) {
                assert!(whole.len() <= limits.max_message);
            }
        }
    }
}

/// The validator over a sequence of stamps: a sender's accepted steps strictly increase, a
/// wrong pattern or a forged sender is never accepted, and every check is counted once.
pub fn validator(data: &[u8]) {
    let config = ValidatorConfig {
        max_senders: 8,
        idle_after_ms: 50,
        stale_window: Some(30),
        ..ValidatorConfig::default()
    };
    let pattern = PatternConfig::default();
    let mut validator = Validator::new(config);
    let mut accepted: HashMap<u64, u64> = HashMap::new();
    let mut checks = 0u64;
    let mut input = Bytes(data);
    let mut now = 0u64;
    while let (Some(sender), Some(step), Some(flags), Some(local)) =
        (input.u8(), input.u16(), input.u8(), input.u16())
    {
        // The sender's high bits: an update or data, live or from the log.
        let kind = if sender & 0x10 == 0 {
            Kind::Data
        } else {
            Kind::Update
        };
        let logged = sender & 0x20 != 0;
        let sender = u64::from(sender % 16);
        let step = u64::from(step);
        let right = pattern.value(step);
        let stamp = Stamp {
            sender,
            step,
            pattern: if flags & 1 == 0 { right } else { right + 1 },
        };
        let origin = if flags & 2 == 0 {
            Origin::Relayed { receiver: 3 }
        } else {
            Origin::Connection(u64::from(flags >> 4))
        };
        now += u64::from(flags >> 2 & 3) * 20;
        checks += 1;
        let local = u64::from(local);
        let tracked = validator.last_step(sender);
        let verdict = if logged {
            validator.check_logged(kind, &stamp, origin, local, now)
        } else {
            validator.check(kind, &stamp, origin, local, now)
        };
        if verdict == Verdict::Accepted {
            assert_eq!(stamp.pattern, right, "a wrong pattern was accepted");
            // Live data may be stale; an update, or anything from the log, never is.
            if kind == Kind::Data && !logged {
                assert!(
                    step + 30 >= local,
                    "a stale step {step} at {local} was accepted"
                );
            }
            match origin {
                Origin::Relayed { receiver } => assert!(sender != receiver && sender != 0),
                Origin::Connection(node) => assert_eq!(sender, node),
            }
            // From the log, a sender the validator no longer tracks is judged by its own steps
            // alone (the log's position proves the message new): only a tracked one's last
            // step binds it.
            let last = if logged {
                tracked
            } else {
                accepted.get(&sender).copied()
            };
            if let Some(last) = last {
                assert!(step > last, "sender {sender}: step {step} after {last}");
            }
            accepted.insert(sender, step);
        }
    }
    let counters = validator.counters();
    assert_eq!(counters.accepted + counters.rejected_total(), checks);
}

/// The room over joins, leaves, frames (well formed or not), fences, store answers and time:
/// never a panic, and what it hands the store for each node has strictly increasing steps (a
/// node's stored messages are a prefix of what it sent).
pub fn room(data: &[u8]) {
    let limits = RoomLimits {
        limits: limits(),
        rate: 50,
        burst: 20,
        max_members: 4,
        max_members_per_user: 4,
        bandwidth: 2_000,
        bandwidth_burst: 4_000,
        compact_bytes: 200,
        compact_updates: 3,
        max_room_bytes: 20_000,
        resume_grace: 500,
        idle_timeout: 1_000,
    };
    let Ok(mut room) = RoomCore::new(
        "r".into(),
        RoomRecord::new(RoomConfig::default(), 1),
        &[],
        limits,
        0,
    ) else {
        return;
    };
    let pattern = PatternConfig::default();
    let mut readers: HashMap<u64, Reader> = HashMap::new();
    let mut nodes: HashMap<u64, u64> = HashMap::new();
    let mut steps: HashMap<u64, u64> = HashMap::new();
    let mut appended: HashMap<u64, u64> = HashMap::new();
    let mut in_store = 0usize;
    let mut position = 0u64;
    let mut next_block = 10_000u64;
    let mut records: HashMap<[u8; 16], NodeRecord> = HashMap::new();
    let mut releases: HashMap<[u8; 16], pattern_mesh_core::room::Release> = HashMap::new();
    let mut in_flight = std::collections::VecDeque::new();
    let mut now = 0u64;
    let mut input = Bytes(data);
    while let Some(op) = input.u8() {
        let conn = u64::from(op >> 4 & 3) + 1;
        match op % 8 {
            0 => {
                let resume = input.u8().map(|b| [b % 4; 16]).filter(|_| op & 0x40 != 0);
                // What the store says of the token (its records come from the appends it
                // answered); sometimes the driver did not look.
                let looked = resume.filter(|_| op & 0x80 != 0);
                let stored = looked.and_then(|token| records.get(&token).copied());
                let released = looked.and_then(|token| releases.remove(&token));
                let request = JoinRequest {
                    name: "f".into(),
                    since: 0,
                    log: 1,
                    resume,
                    stored,
                    access: pattern_mesh_core::room::Access::OPEN,
                    floor: true,
                    released,
                };
                let fresh = [input.u8().unwrap_or(0); 16];
                if let Ok(joined) = room.join(now, conn, request, fresh) {
                    nodes.insert(conn, joined.node);
                    readers.insert(conn, Reader::new(limits.limits));
                }
            }
            1 => {
                room.leave(conn);
                nodes.remove(&conn);
                readers.remove(&conn);
            }
            2 => {
                // A stamped frame, its step near the node's own.
                let (Some(&node), Some(kind), Some(jump)) =
                    (nodes.get(&conn), input.u8(), input.u8())
                else {
                    continue;
                };
                let step = steps.entry(node).or_insert(0);
                *step = (*step + u64::from(jump % 8)).saturating_sub(u64::from(kind >> 7));
                let stamp = Stamp {
                    sender: node,
                    step: *step,
                    pattern: pattern.value(*step) + u64::from(kind >> 6 & 1),
                };
                let body = match kind % 4 {
                    0 => Body::Data {
                        data: Json::parse("1").expect("json"),
                    },
                    1 => Body::Update {
                        doc: "d".into(),
                        update: input.take(usize::from(jump)).to_vec(),
                    },
                    2 => Body::Checkpoint {
                        doc: "*".into(),
                        state_vector: vec![0],
                        deletes: 0,
                        digest: 0,
                    },
                    _ => Body::SyncRequest {
                        doc: "*".into(),
                        state_vector: vec![],
                        to: u64::from(jump % 4),
                    },
                };
                let bytes = Frame::stamped(stamp, body).encode();
                for piece in pattern_mesh_core::wire::part::fragment(&bytes, 256) {
                    if let Some(reader) = readers.get_mut(&conn) {
                        let read = reader.read(piece.into());
                        room.receive(now, conn, read);
                    }
                }
            }
            3 => {
                let len = input.u8().unwrap_or(0);
                let raw = input.take(usize::from(len)).to_vec();
                if let Some(reader) = readers.get_mut(&conn) {
                    let read = reader.read(raw.into());
                    room.receive(now, conn, read);
                }
            }
            4 | 5 if in_store > 0 => {
                in_store -= 1;
                let result = if op % 8 == 4 {
                    position += 1;
                    if let Some((Some(token), node, step)) = in_flight.pop_front() {
                        let record = records.entry(token).or_insert(NodeRecord {
                            node,
                            token,
                            user: 0,
                            last_step: 0,
                            position: 0,
                        });
                        record.last_step = record.last_step.max(step);
                    }
                    Ok(Appended::Stored {
                        position,
                        bytes: position * 50,
                    })
                } else {
                    in_flight.pop_front();
                    Err(StoreError::Backend("fuzzed failure".into()))
                };
                room.appended(result);
            }
            6 => {
                if let Some(reader) = readers.get_mut(&conn) {
                    let fence = Frame::Fence { step: 0 }.encode();
                    let read = reader.read(fence.into());
                    room.receive(now, conn, read);
                }
            }
            7 if op & 0x40 != 0 => {
                room.overran(2_000, 1_000);
            }
            _ => {
                now += u64::from(input.u8().unwrap_or(0)) * 10;
                room.tick(now);
            }
        }
        while let Some(output) = room.poll_output() {
            // The room survives a panic while applying an update (it reloads without it), so
            // that a bug in yrs costs one update: here it is still a bug to find.
            if let Output::Stop { reason, .. } = &output {
                assert!(!reason.contains(PANICKED), "{reason}");
            }
            if let Output::Released(release) = output {
                // Above every step of the node the room handed the store.
                let stored = appended.get(&release.node).copied().unwrap_or(0);
                assert!(
                    release.step >= stored,
                    "node {} released at step {} after storing step {stored}",
                    release.node,
                    release.step
                );
                releases.insert(release.token, release);
            }
            if let Output::Reserve { count } = output {
                next_block += count;
                room.reserved(Ok(next_block - count));
            }
            if let Output::Append(append) = output {
                in_store += 1;
                in_flight.push_back((append.token, append.sender, append.step));
                if append.snapshot {
                    continue;
                }
                let last = appended.entry(append.sender).or_insert(0);
                assert!(
                    append.step > *last,
                    "node {} stored step {} after {}",
                    append.sender,
                    append.step,
                    last
                );
                *last = append.step;
            }
        }
    }
}

/// What the reason of a room's stop says of a panic while applying an update
/// ([`DocError::Panicked`]).
const PANICKED: &str = "applying it failed inside the document";

/// A replica with some history, from two clients.
fn base() -> SharedDoc {
    let a = SharedDoc::with_client_id(11);
    let b = SharedDoc::with_client_id(22);
    let u1 = a.insert("content", 0, "hello world, ").expect("insert");
    b.apply_update(&u1).expect("apply");
    let u2 = b
        .insert("content", 13, "this is shared text")
        .expect("insert");
    let u3 = a.delete("content", 0, 6).expect("delete");
    let u4 = a.insert("notes", 0, "second text").expect("insert");
    let doc = SharedDoc::with_client_id(33);
    for update in [u1, u2, u3, u4] {
        doc.apply_update(&update).expect("apply");
    }
    doc
}

/// The document: any bytes applied as a Yjs update to a replica with history (and again, and
/// in two halves), then every text read, the digest, the version and a diff: never a panic,
/// and (under the fuzzer's timeout) never a hang.
pub fn document(data: &[u8]) {
    let doc = base();
    let _ = doc.apply_update(data);
    let _ = doc.apply_update(data);
    read_all(&doc);
    // The room's document takes what it holds sent again (a resend after a reconnect): its own
    // blocks at those clocks, as it writes them, compare equal to the update's, whatever
    // forms the update wrote its values in.
    let room = base();
    match room.apply_member_update(data) {
        Ok(()) => {
            if let Err(e) = room.apply_member_update(data) {
                panic!("an update the room took is refused when sent again: {e}");
            }
        }
        // The room survives it (see `room`), but it is a bug to find.
        Err(e @ DocError::Panicked(_)) => panic!("{e}"),
        Err(_) => {}
    }
    let (first, second) = data.split_at(data.len() / 2);
    let halves = base();
    let _ = halves.apply_update(first);
    let _ = halves.apply_update(second);
    read_all(&halves);
    // Merging is decoding and encoding: what it gives back decodes again, and where the two
    // halves applied, it applies too. Where their ids do not overlap (the client merges only
    // its own consecutive updates), it gives the same texts. Halves that give the same ids
    // different content contradict each other: which arrives first wins (as in Yjs), and a
    // merge picks a winner per range, so no single update stands for them.
    let checked = |update: &[u8]| pattern_mesh_core::doc::check_update(update).is_ok();
    // Split into pieces (a large deletion goes that way): every piece but the first is within
    // the size asked for and passes the check, and the pieces apply where the whole does, to
    // the same texts.
    // Room for one range of the largest numbers, with the counts (see `split`).
    let max = 64 + usize::from(data.first().copied().unwrap_or(0));
    if let Some(pieces) = pattern_mesh_core::doc::v1::split(data, max) {
        for piece in pieces.iter().skip(1) {
            assert!(
                piece.len() <= max,
                "a piece of {} bytes, over {max}",
                piece.len()
            );
        }
        if checked(data) {
            for piece in &pieces {
                pattern_mesh_core::doc::check_update(piece).expect("a piece passes the check");
            }
            let whole = SharedDoc::new();
            if whole.apply_update(data).is_ok() {
                let split = SharedDoc::new();
                for piece in &pieces {
                    split.apply_update(piece).expect("a piece applies");
                }
                for name in whole.text_names() {
                    assert_eq!(split.text(&name), whole.text(&name), "text {name:?} split");
                }
            }
        }
    }
    if let Ok(merged) = pattern_mesh_core::doc::merge_updates(&[first, second]) {
        if checked(first) && checked(second) {
            pattern_mesh_core::doc::check_update(&merged)
                .expect("a merge of updates that pass the check passes it");
        }
        let parts = SharedDoc::new();
        if parts.apply_update(first).is_ok() && parts.apply_update(second).is_ok() {
            let whole = SharedDoc::new();
            whole
                .apply_update(&merged)
                .expect("a merged update applies where its parts did");
            if !ids_overlap(first, second) {
                for name in parts.text_names() {
                    assert_eq!(whole.text(&name), parts.text(&name), "text {name:?} merged");
                }
            }
        }
    }
}

fn read_all(doc: &SharedDoc) {
    for name in doc.text_names() {
        let text = doc.text(&name);
        assert!(text.len() < 1 << 24);
    }
    let _ = doc.digest();
    let _ = doc.version();
    let _ = doc.diff(&[0]);
    // What a replica encodes, another decodes to the same texts.
    let copy = SharedDoc::with_client_id(44);
    let snapshot = doc.snapshot();
    copy.apply_update(&snapshot)
        .expect("a snapshot applies to a fresh document");
    // A replica holds its own state, and so does one that applied it: the relay's check of a
    // sync answer takes an honest answer (one that holds nothing held back).
    if !doc.has_pending() {
        if let Err(e) = doc.holds(&snapshot) {
            panic!("a replica does not hold its own snapshot: {e}");
        }
        if let Err(e) = copy.holds(&snapshot) {
            panic!("a replica does not hold the snapshot it applied: {e}");
        }
    }
    for name in doc.text_names() {
        assert_eq!(
            copy.text(&name),
            doc.text(&name),
            "text {name:?} after a snapshot"
        );
    }
}

/// Whether two updates insert blocks (items or collected ranges) with the same ids.
fn ids_overlap(a: &[u8], b: &[u8]) -> bool {
    use yrs::updates::decoder::Decode;
    let (Ok(a), Ok(b)) = (yrs::Update::decode_v1(a), yrs::Update::decode_v1(b)) else {
        return false;
    };
    let (a, b) = (a.insertions(true), b.insertions(true));
    a.iter().any(|(client, ours)| {
        b.iter()
            .filter(|(other, _)| *other == client)
            .any(|(_, theirs)| {
                ours.iter()
                    .any(|x| theirs.iter().any(|y| x.start < y.end && y.start < x.end))
            })
    })
}
