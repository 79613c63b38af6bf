//! A hostile member and hostile load, against the real relay over real sockets: each test
//! performs one of the attacks the relay must hold against.

mod common;

use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::*;
use pattern_mesh_client::{Client, ClientError};
use pattern_mesh_core::doc::SharedDoc;
use pattern_mesh_core::pattern::MAX_SAFE_INTEGER;
use pattern_mesh_core::session::Event;
use pattern_mesh_core::wire::{part, with_position, Body, Frame, Json, Reason, RoomConfig, Stamp};

/// The demo game's room: inputs older than 40 steps are dropped.
fn game() -> RoomConfig {
    RoomConfig {
        max_future: 1_000,
        stale_window: Some(40),
        ..RoomConfig::default()
    }
}

/// A member stamps every message about 1,000 steps ahead of the room (within `maxFuture`), while
/// an honest member 25 ms away from the relay plays: between two honest inputs the hostile
/// member sends 15 messages, some while the honest input is on its way, so the honest member's
/// view of the room is up to 30 steps behind when its input arrives, inside the room's window
/// of 40. Every honest input is accepted: the far-ahead stamps do not move the room's step
/// past the messages it received. The turns are taken in order, so the outcome does not depend
/// on how fast the machine is.
#[tokio::test]
async fn a_member_stamping_far_ahead_cannot_push_others_inputs_out_of_a_game_room() {
    // The rate limit is another test's: here the hostile member may send as fast as it likes.
    let server = start("drag", |c| c.max_rate = 100_000).await;
    let mut config = session("arena", "honest");
    config.room_config = Some(game());
    let proxy = Proxy::start_delayed(server.addr, Duration::from_millis(25)).await;
    let mut honest = Client::connect(&proxy.url(), config).await.unwrap();
    let mut hostile = join(&server, "arena", 0, None).await;
    assert_eq!(hostile.welcome.config, game());

    // The hostile member's view of the room step: the relay adds one for each message stamped
    // above it. It stamps 990 above that view.
    let mut room = hostile.welcome.high;
    let mut last = 0;
    let inputs = 100;
    let burst = 15;
    for i in 0..inputs {
        let value = serde_json::json!({ "input": i });
        honest.broadcast(Json::from_value(&value).unwrap()).unwrap();
        let mut acked = 0;
        while acked < burst {
            let step = (last + 1).max(room + 990);
            let stamp = Stamp {
                sender: hostile.node,
                step,
                pattern: hostile.pattern.value(step),
            };
            let data = Json::parse("{\"fire\":true}").unwrap();
            hostile
                .send(&Frame::stamped(stamp, Body::Data { data }))
                .await;
            // Its answer, and whatever else arrived meanwhile.
            loop {
                match hostile.recv().await.frame {
                    Frame::Stamped(s) if s.stamp.step > room => room += 1,
                    Frame::Ack { .. } => {
                        (room, last, acked) = (room + 1, step, acked + 1);
                        break;
                    }
                    Frame::Reject { reason, detail, .. } => {
                        panic!("the hostile stamp {step} was refused: {reason:?} {detail}")
                    }
                    _ => {}
                }
            }
        }
        honest.settled(Duration::from_secs(30)).await.unwrap();
    }
    let refused: Vec<Reason> = honest
        .take_events()
        .into_iter()
        .filter_map(|e| match e {
            Event::Refused { reason, .. } => Some(reason),
            _ => None,
        })
        .collect();
    println!(
        "hostile: {} messages, the last at step {last}; honest: {} of {inputs} inputs accepted",
        inputs * burst,
        inputs - refused.len()
    );
    assert_eq!(refused, [], "every honest input is accepted");
}

/// Finding 1. A member tries to wipe the document for every late joiner: a client snapshot
/// (the retired kind 0x15) of `*` and of one document, holding an empty state, zero bytes or
/// garbage, and updates that are not Yjs updates. Each is refused as `malformed` and reaches no
/// one. Meanwhile two members race their edits while the relay compacts every 10 updates: a
/// late joiner loads all 43 acknowledged updates.
#[tokio::test]
async fn no_member_can_wipe_the_document_for_late_joiners() {
    let server = start("wipe", |c| c.compact_updates = 10).await;
    let mut a = join(&server, "doc", 0, None).await;
    let mut b = join(&server, "doc", 0, None).await;
    let (doc_a, doc_b) = (SharedDoc::with_client_id(11), SharedDoc::with_client_id(12));
    let reference = SharedDoc::new();
    let attacks: Vec<(&str, Vec<u8>)> = vec![
        ("*", vec![0, 0]),
        ("content", vec![0, 0]),
        ("*", vec![]),
        ("content", vec![0xff; 12]),
    ];
    for i in 0..43u32 {
        let (member, doc) = if i % 2 == 0 {
            (&mut a, &doc_a)
        } else {
            (&mut b, &doc_b)
        };
        let body = edit(doc, 0, &format!("{i} "));
        if let Body::Update { update, .. } = &body {
            reference.apply_update(update).unwrap();
        }
        member.acked(body).await;
        if i % 10 == 5 {
            // A client snapshot: the same layout as an update, under the retired kind.
            let (doc, state) = attacks[(i / 10) as usize % attacks.len()].clone();
            let mut bytes = raw_update(&mut b, doc, state).encode();
            bytes[1] = pattern_mesh_core::wire::RETIRED_CLIENT_SNAPSHOT;
            b.send_bytes(bytes).await;
            let detail = b.expect_reject(Reason::Malformed).await;
            assert!(detail.contains("no longer accepted"), "{detail}");
            b.fence().await;
            // Bytes that are no Yjs update.
            for garbage in [vec![], vec![0xff; 12], vec![1, 1, 11]] {
                let frame = raw_update(&mut b, "content", garbage);
                b.send(&frame).await;
                b.expect_reject(Reason::Malformed).await;
                b.fence().await;
            }
        }
    }
    let late = join(&server, "doc", 0, None).await;
    let kinds: Vec<_> = late
        .replay()
        .iter()
        .map(|p| p.frame.kind().as_str())
        .collect();
    assert!(
        kinds.contains(&"snapshot"),
        "the relay compacted: {kinds:?}"
    );
    assert!(kinds.len() < 43, "{kinds:?}");
    let text = replayed_text(late.replay());
    assert_eq!(text, reference.text("content"));
    assert_eq!(text.split_whitespace().count(), 43);
}

/// A member answers, unasked and to everyone, with blocks under an honest member's Yjs client
/// id at that member's next clock ("EVIL"), and with a deletion no one made. A replica that
/// took the answer would keep it and ignore the honest member's real edit at those ids, and
/// show "hello EVIL" for good while everyone else shows "hello good". The relay refuses both
/// answers (`desync`), they reach no one, and every replica and a late joiner agree.
#[tokio::test]
async fn a_forged_sync_answer_reaches_no_one_and_every_replica_agrees() {
    let server = start("forged-sync", |_| {}).await;
    let a = Client::connect(&server.url(), session("doc", "a"))
        .await
        .unwrap();
    let c = Client::connect(&server.url(), session("doc", "c"))
        .await
        .unwrap();
    let mut b = join(&server, "doc", 0, None).await;
    a.insert("content", 0, "hello ").unwrap();
    a.settled(Duration::from_secs(10)).await.unwrap();
    let (client, state) = a.with_session(|s, _| (s.replica().client_id(), s.replica().snapshot()));
    let forger = SharedDoc::with_client_id(client);
    forger.apply_update(&state).unwrap();
    let evil = forger.insert("content", 6, "EVIL").unwrap();
    let wipe = forger.delete("content", 0, 6).unwrap();
    for update in [evil, wipe] {
        let stamp = b.stamp();
        b.send(&Frame::stamped(
            stamp,
            Body::SyncState {
                doc: "*".into(),
                update,
                to: 0,
            },
        ))
        .await;
        let detail = b.expect_reject(Reason::Desync).await;
        assert!(detail.contains("has not stored"), "{detail}");
        b.fence().await;
    }
    a.insert("content", 6, "good").unwrap();
    a.settled(Duration::from_secs(10)).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while c.text("content") != "hello good" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "c shows {:?}",
            c.text("content")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(a.text("content"), "hello good");
    let late = join(&server, "doc", 0, None).await;
    assert_eq!(replayed_text(late.replay()), "hello good");
}

/// An update of one item under client 5 at clock 0, in the root type `content`: `info` (its
/// content type and flags), then `body` (origins, then content).
fn one_item(info: u8, body: &[u8]) -> Vec<u8> {
    let mut update = vec![1, 1, 5, 0, info];
    if info & 0xc0 == 0 {
        update.extend_from_slice(&[1, 7]);
        update.extend_from_slice(b"content");
    }
    update.extend_from_slice(body);
    update.push(0);
    update
}

/// A member sends updates that yrs reads and Yjs does not, each of which a Yjs tab refuses as a
/// whole and which, once in the room's document, would be in every snapshot a late Yjs tab
/// loads (its document then empty); and a value nested 100,000 levels deep (200 KB), which
/// yrs reads recursively: it overflowed the stack of the relay's thread and aborted the relay.
/// Each, as an update and as a sync answer, is refused as `malformed`, naming what is wrong;
/// the relay goes on, and a late joiner loads the honest edits.
#[tokio::test]
async fn updates_that_yjs_cannot_apply_or_that_nest_deep_are_refused_and_crash_nothing() {
    let server = start("yjs-only", |c| c.compact_updates = 4).await;
    let mut a = join(&server, "doc", 0, None).await;
    let mut b = join(&server, "doc", 0, None).await;
    let writer = SharedDoc::with_client_id(11);
    let mut nested = vec![1];
    for _ in 0..100_000 {
        nested.extend_from_slice(&[117, 1]);
    }
    nested.push(126);
    let attacks: Vec<(&str, Vec<u8>)> = vec![
        (
            "values nested more than 128 levels deep",
            one_item(8, &nested),
        ),
        // JSON content `{`, which JSON.parse refuses.
        ("JSON content", one_item(2, &[1, 1, b'{'])),
        // Shared type 9 (yrs's sub-document reference), and a fuzzer's 17-byte find that
        // names one.
        ("a shared type Yjs does not know", one_item(7, &[9])),
        (
            "a shared type Yjs does not know",
            vec![2, 2, 1, 1, 39, 1, 1, 1, 1, 1, 9, 0, 40, 0, 0, 0, 0],
        ),
        // An item whose origin is its own client's clock 3, after the item itself.
        ("origin is not before it", one_item(0x84, &[5, 3, 1, b'x'])),
        // A deleted range of length 0 of a client nobody has.
        ("a deleted range of length 0", vec![0, 1, 9, 1, 0, 0]),
    ];
    for (i, (problem, bytes)) in attacks.into_iter().enumerate() {
        a.acked(edit(&writer, 0, &format!("{i} "))).await;
        let frame = raw_update(&mut b, "content", bytes.clone());
        b.send(&frame).await;
        let detail = b.expect_reject(Reason::Malformed).await;
        assert!(
            detail.contains("not an update Yjs applies") && detail.contains(problem),
            "{problem}: {detail}"
        );
        b.fence().await;
        let stamp = b.stamp();
        let answer = Frame::stamped(
            stamp,
            Body::SyncState {
                doc: "content".into(),
                update: bytes,
                to: 0,
            },
        );
        b.send(&answer).await;
        let detail = b.expect_reject(Reason::Malformed).await;
        assert!(detail.contains(problem), "{problem}: {detail}");
        b.fence().await;
        a.expect_no_data(Duration::from_millis(100)).await;
    }
    a.acked(edit(&writer, 0, "after ")).await;
    let late = join(&server, "doc", 0, None).await;
    assert_eq!(replayed_text(late.replay()), writer.text("content"));
    assert_eq!(
        writer.text("content").split_whitespace().count(),
        7,
        "{}",
        writer.text("content")
    );
}

/// Finding 2. A member asks for a room whose `maxFuture` the store cannot hold, or one out of
/// range, and sends a step above 2^53 - 1: each is refused on its own (the join closed with a
/// reason, the frame as `malformed`), and a member of another room is served throughout.
#[tokio::test]
async fn values_the_store_cannot_hold_are_refused_alone_and_break_no_other_room() {
    let server = start("unsafe", |_| {}).await;
    let mut victim = join(&server, "victim", 0, None).await;
    victim.data_acked(serde_json::json!("before")).await;
    for max_future in [u64::MAX, 1 << 63, 2_000_000] {
        let join = Frame::Join {
            room: "evil".into(),
            name: "evil".into(),
            since: 0,
            log: 0,
            resume: None,
            config: Some(RoomConfig {
                max_future,
                ..RoomConfig::default()
            }),
            floor: false,
        };
        let (code, reason) = closed_after(&server, &join).await;
        assert_eq!(code, pattern_mesh_core::wire::close::POLICY, "{reason}");
        assert!(reason.contains("maxFuture"), "{reason}");
        victim.data_acked(serde_json::json!(max_future)).await;
    }
    let mut evil = join(&server, "evil", 0, None).await;
    for step in [(1u64 << 63) + 4, u64::MAX, MAX_SAFE_INTEGER + 1] {
        let stamp = Stamp {
            sender: evil.node,
            step,
            pattern: evil.pattern.value(step),
        };
        evil.send(&Frame::stamped(
            stamp,
            Body::Data {
                data: Json::parse("1").unwrap(),
            },
        ))
        .await;
        let detail = evil.expect_reject(Reason::Malformed).await;
        assert!(detail.contains("2^53"), "{detail}");
        evil.fence().await;
        victim.data_acked(serde_json::json!(step)).await;
    }
    evil.data_acked(serde_json::json!("evil still served"))
        .await;
    let late = join(&server, "victim", 0, None).await;
    assert_eq!(late.replay().len(), 7);
}

/// Finding 9. A client frame carrying the log-position flag (only the relay sets it), stamped
/// 500 steps ahead, is refused and moves nothing: the next joiner sees the same high step.
#[tokio::test]
async fn a_refused_frame_moves_neither_the_room_step_nor_the_log() {
    let server = start("positioned", |_| {}).await;
    let mut a = join(&server, "r", 0, None).await;
    let (step, position) = a.data_acked(serde_json::json!("first")).await;
    let ahead = step + 500;
    let stamp = Stamp {
        sender: a.node,
        step: ahead,
        pattern: a.pattern.value(ahead),
    };
    let frame = Frame::stamped(
        stamp,
        Body::Data {
            data: Json::parse("2").unwrap(),
        },
    );
    let bytes = with_position(&frame.encode(), position + 1).unwrap();
    a.send_bytes(bytes).await;
    a.expect_reject(Reason::Malformed).await;
    let late = join(&server, "r", 0, None).await;
    assert_eq!(late.welcome.high, step);
    assert_eq!(late.replay().len(), 1);
}

/// Finding 10. A 24-byte update that hung yrs 0.28.1 for good is refused as `malformed` at
/// the relay: it reaches no tab and no log, and its sender's room goes on. A mutated update
/// that made yrs panic now decodes as an update whose dependencies are missing: stored or not,
/// every replica that applies it reads its text and goes on editing.
#[tokio::test]
async fn updates_that_hang_or_crash_a_replica_are_refused_or_harmless() {
    let server = start("poison", |_| {}).await;
    let mut a = join(&server, "doc", 0, None).await;
    let mut b = join(&server, "doc", 0, None).await;
    let hang = vec![
        2, 1, 22, 0, 193, 11, 4, 11, 11, 1, 1, 22, 0, 193, 11, 4, 11, 11, 1, 1, 11, 1, 4, 1,
    ];
    let frame = raw_update(&mut a, "content", hang);
    a.send(&frame).await;
    let detail = a.expect_reject(Reason::Malformed).await;
    assert!(detail.contains("a client in a second section"), "{detail}");
    a.fence().await;
    b.expect_no_data(Duration::from_millis(300)).await;

    let panic = vec![
        1, 1, 11, 180, 238, 154, 146, 11, 196, 11, 4, 11, 5, 6, 44, 32, 100, 101, 97, 114, 0,
    ];
    let frame = raw_update(&mut a, "content", panic);
    a.send(&frame).await;
    let (answer, _) = a
        .recv_until(|f| matches!(f, Frame::Ack { .. } | Frame::Reject { .. }))
        .await;
    if let Frame::Reject { reason, .. } = answer {
        assert_eq!(reason, Reason::Malformed);
        a.fence().await;
    }
    let writer = SharedDoc::with_client_id(5);
    a.acked(edit(&writer, 0, "still editable")).await;
    let late = join(&server, "doc", 0, None).await;
    assert_eq!(replayed_text(late.replay()), "still editable");
}

/// Updates that cut a text into pieces. Each cut copies the block's content into two halves and
/// inserts the right one into the middle of its client's block list, in the relay's yrs and in
/// every member's Yjs (100,000 cuts by deletion of one 200,000-character block, 390 KB, took yrs
/// 0.9 s; tens of megabytes, hours, the relay's worker held all along). Each of these is
/// refused as `tooLarge` before anything applies it, and the room goes on: a deletion of every
/// other character of one long insertion; items placed after every other character of it; an
/// update that writes a long text and deletes every other character of it itself; and 30,000
/// cuts of a text of a million characters (few blocks moved, but a million characters copied
/// each time). Deleting the whole text, one range, is taken.
#[tokio::test]
async fn updates_that_cut_a_text_into_pieces_are_refused_before_they_are_applied() {
    // A delete set of `client`'s clocks `first`, `first + 2`, ... (`count` of them).
    fn every_other(out: &mut Vec<u8>, client: u64, first: u64, count: u64) {
        out.extend_from_slice(&[1]);
        var(out, client);
        var(out, count);
        for i in 0..count {
            var(out, first + 2 * i);
            var(out, 1);
        }
    }
    let server = start("cuts", |_| {}).await;
    let mut a = join(&server, "doc", 0, None).await;
    let writer = SharedDoc::with_client_id(7);
    a.acked(edit(&writer, 0, &"ab".repeat(150_000))).await;
    let long = SharedDoc::with_client_id(11);
    a.acked(edit(&long, 0, &"c".repeat(1_000_000))).await;
    let mut deletion = vec![0];
    every_other(&mut deletion, 7, 1, 100_000);
    // Client 9's 150,000 items, each an "x" after one of client 7's clocks 0, 2, 4, ...
    let mut insertion = vec![1];
    var(&mut insertion, 150_000);
    insertion.extend_from_slice(&[9, 0]);
    for i in 0..150_000 {
        insertion.extend_from_slice(&[0x84, 7]);
        var(&mut insertion, 2 * i);
        insertion.extend_from_slice(&[1, b'x']);
    }
    insertion.push(0);
    // Client 10's one item, 200,000 characters in the root text, then every other one of them
    // deleted.
    let mut own = vec![1, 1, 10, 0, 4, 1, 7];
    own.extend_from_slice(b"content");
    var(&mut own, 200_000);
    own.extend_from_slice("ab".repeat(100_000).as_bytes());
    every_other(&mut own, 10, 1, 100_000);
    let mut copies = vec![0];
    every_other(&mut copies, 11, 1, 30_000);
    for update in [deletion, insertion, own, copies] {
        refused_as_too_costly(&mut a, update).await;
    }
    for doc in [&writer, &long] {
        let len = doc.len("content");
        a.acked(Body::Update {
            doc: "content".into(),
            update: doc.delete("content", 0, len).unwrap(),
        })
        .await;
    }
    let late = join(&server, "doc", 0, None).await;
    assert_eq!(replayed_text(late.replay()), "");
}

/// Sends `update` in parts (it may be over a frame) and expects it refused as costing too much
/// to apply.
async fn refused_as_too_costly(member: &mut Member, update: Vec<u8>) {
    let frame = raw_update(member, "content", update);
    for piece in part::fragment(&frame.encode(), 512 << 10) {
        member.send_bytes(piece).await;
    }
    let detail = member.expect_reject(Reason::TooLarge).await;
    assert!(detail.contains("send it in smaller edits"), "{detail}");
    member.fence().await;
}

/// Integrating an item walks past every item between its origin and its right origin, in yrs
/// as in Yjs; no Yjs client writes an item whose origins lie apart. Measured in a release
/// build on a text of 100,000 characters with every other deleted in between: 1,000 items each
/// naming the text's first character and one near its end (9 KB) took yrs 67 s, and applying
/// the room's snapshot after it as long again, in every late joiner. 60,000 items of as many
/// clients, all at one place, each hop over those placed before them to check where their right
/// origin lies: 20,000 (225 KB) take 1 to 2 s, and the square of the size. The same walks through the update's own items: an item that lands
/// near the end, then 1,000 items each between the first character and it (on a text of 10,000
/// blocks, 7 KB took 2.5 s: as many items walked as naming the end itself); 3,000 clients'
/// items each before one of 3,000 items of one client placed at one place (57 KB, 0.9 s, and
/// the square of the size; this test sends 10,000).
#[tokio::test]
async fn updates_whose_items_walk_the_text_are_refused_before_they_are_applied() {
    let server = start("walks", |_| {}).await;
    let mut a = join(&server, "doc", 0, None).await;
    let writer = SharedDoc::with_client_id(7);
    let n = 100_000u64;
    a.acked(edit(&writer, 0, &"ab".repeat(n as usize))).await;
    // Every other character deleted, 1,000 at a time: 200,000 blocks.
    for first in (0..n).step_by(1_000) {
        delete_every_b(&mut a, first..first + 1_000).await;
    }
    // Client 9's 1,000 items, each after the first character and before one near the end.
    let mut far = vec![1];
    var(&mut far, 1_000);
    far.extend_from_slice(&[9, 0]);
    for i in 0..1_000 {
        far.extend_from_slice(&[0xC4, 7, 0, 7]);
        var(&mut far, 2 * n - 2 - 2 * i);
        far.extend_from_slice(&[1, b'x']);
    }
    far.push(0);
    // 60,000 clients' one item each, all after the first character and before the second:
    // each hops over those placed before it, to check where its right origin lies.
    let mut crowd = Vec::new();
    var(&mut crowd, 60_000);
    for client in 0..60_000 {
        crowd.push(1);
        var(&mut crowd, 1_000 + client);
        crowd.extend_from_slice(&[0, 0xC4, 7, 0, 7, 1, 1, b'x']);
    }
    crowd.push(0);
    // Client 9's item near the end, then 1,000 items each between the first character and it.
    let mut far_own = vec![1];
    var(&mut far_own, 1_001);
    far_own.extend_from_slice(&[9, 0, 0xC4, 7]);
    var(&mut far_own, 2 * n - 3);
    far_own.push(7);
    var(&mut far_own, 2 * n - 2);
    far_own.extend_from_slice(&[1, b'x']);
    for _ in 0..1_000 {
        far_own.extend_from_slice(&[0xC4, 7, 0, 9, 0, 1, b'x']);
    }
    far_own.push(0);
    // Client 9's 10,000 items after the first character, and 10,000 clients' items each
    // before one of them: each walks past the rest of them.
    let mut before_own = Vec::new();
    var(&mut before_own, 10_001);
    var(&mut before_own, 10_000);
    before_own.extend_from_slice(&[9, 0]);
    for _ in 0..10_000 {
        before_own.extend_from_slice(&[0xC4, 7, 0, 7, 1, 1, b'x']);
    }
    for client in 0..10_000 {
        before_own.push(1);
        var(&mut before_own, 1_000 + client);
        before_own.extend_from_slice(&[0, 0xC4, 7, 0, 9]);
        var(&mut before_own, client);
        before_own.extend_from_slice(&[1, b'x']);
    }
    before_own.push(0);
    for update in [far, crowd, far_own, before_own] {
        refused_as_too_costly(&mut a, update).await;
    }
    // An honest edit in the middle of that text is taken.
    a.acked(edit(&writer, 50_000, "honest")).await;
    let late = join(&server, "doc", 0, None).await;
    let text = replayed_text(late.replay());
    assert_eq!(text.len(), n as usize + "honest".len());
    assert!(!text.contains('x'));
}

/// What the estimate of an update's walks does not count, integration stops at its bound. On a
/// text of 10,000 blocks: one item after the middle character whose right origin lies behind it
/// (yrs ignores such a right origin, and places the item where its conflicts let it), then
/// 4,000 items each after the first character and before that item (28 KB). The estimate
/// follows the right origin to where it points, ten blocks on; each item really walks half the
/// text, about 2.6·10^9 steps: 15 s of yrs, the room's task blocked all the while, before the
/// wall-clock budget could refuse it. The relay stops integrating at the bound, refuses the
/// update as `tooLarge`, and loads the room again without it: its members reconnect to a
/// document that never held it.
#[tokio::test]
async fn an_update_that_walks_further_than_its_estimate_is_stopped_at_the_bound() {
    use pattern_mesh_core::wire::close;
    let server = start("overrun", |_| {}).await;
    let mut a = join(&server, "doc", 0, None).await;
    let mut b = join(&server, "doc", 0, None).await;
    let writer = SharedDoc::with_client_id(7);
    let m = 5_000u64;
    a.acked(edit(&writer, 0, &"ab".repeat(m as usize))).await;
    delete_every_b(&mut a, 0..m).await;
    let frame = raw_update(&mut a, "content", walks_too_far());
    a.send_bytes(frame.encode()).await;
    let detail = a.expect_reject(Reason::TooLarge).await;
    assert!(detail.contains("walks too far"), "{detail}");
    // The room stopped: its members are closed, to reconnect.
    let (code, reason) = b.closed().await;
    assert_eq!(code, close::INTERNAL, "{reason}");
    let mut late = join(&server, "doc", 0, None).await;
    assert_eq!(replayed_text(late.replay()), "a".repeat(m as usize));
    late.acked(edit(&writer, 0, "b")).await;
}

/// Every update that stops a room (one that walks too far to apply, say) closes every member
/// of the room, to reconnect, and costs the relay the bound and a reload; a member sending one
/// after another kept the room reconnecting for as long as it liked. An address whose updates
/// stopped a room twice within the bar's time is kept out of that room for that time: its
/// joins close with 1013, saying why and for how long. Its other rooms stay open to it.
#[tokio::test]
async fn an_address_whose_updates_stop_a_room_twice_is_kept_out_of_it() {
    use pattern_mesh_core::wire::close;
    let server = start("offence", |_| {}).await;
    let mut a = join(&server, "doc", 0, None).await;
    let writer = SharedDoc::with_client_id(7);
    a.acked(edit(&writer, 0, &"ab".repeat(5_000))).await;
    delete_every_b(&mut a, 0..5_000).await;
    for stop in 1..=2 {
        let frame = raw_update(&mut a, "content", walks_too_far());
        a.send_bytes(frame.encode()).await;
        let detail = a.expect_reject(Reason::TooLarge).await;
        assert!(detail.contains("walks too far"), "stop {stop}: {detail}");
        let (code, reason) = a.closed().await;
        assert_eq!(code, close::INTERNAL, "stop {stop}: {reason}");
        if stop == 1 {
            a = join(&server, "doc", 0, None).await;
        }
    }
    let (code, reason) = closed_after(&server, &join_frame("doc")).await;
    assert_eq!(code, close::TRY_AGAIN_LATER, "{reason}");
    assert!(
        reason.contains("stopped the room twice") && reason.contains("may join again in"),
        "{reason}"
    );
    join(&server, "other", 0, None).await;
}

/// Finding 11. One member writing large updates as fast as it can: its bandwidth budget
/// refuses what is over it (`rateLimited`, to send again later), and the room's hard cap
/// refuses what would take the log past it (`full`, with the figures).
#[tokio::test]
async fn a_member_cannot_fill_the_store() {
    let server = start("quota", |c| {
        c.limits.max_frame = 16 << 10;
        c.limits.max_message = 64 << 10;
        c.bandwidth = 32 << 10;
        c.max_room_bytes = 256 << 10;
        c.compact_bytes = u64::MAX;
    })
    .await;
    let mut a = join(&server, "doc", 0, None).await;
    assert_eq!(a.welcome.limits.bandwidth, 32 << 10);
    let writer = SharedDoc::with_client_id(5);
    let chunk = "x".repeat(15 << 10);
    // Twice the burst at once: some are refused for the bandwidth.
    let mut limited = 0;
    let mut acked = 0;
    // What was refused for the bandwidth, sent again later (the edits after it need its clocks).
    let mut again = None;
    for i in 0..8 {
        let body = edit(&writer, i * (15 << 10), &chunk);
        let frame = Frame::stamped(a.stamp(), body.clone());
        again = Some(body);
        a.send(&frame).await;
        let (frame, _) = a
            .recv_until(|f| matches!(f, Frame::Ack { .. } | Frame::Reject { .. }))
            .await;
        match frame {
            Frame::Ack { .. } => {
                acked += 1;
                again = None;
            }
            Frame::Reject { reason, detail, .. } => {
                assert_eq!(reason, Reason::RateLimited, "{detail}");
                assert!(detail.contains("bytes per second"), "{detail}");
                limited += 1;
                break;
            }
            _ => unreachable!(),
        }
    }
    assert!(
        acked >= 2 && limited == 1,
        "{acked} acked, {limited} limited"
    );
    a.fence().await;
    // At the bandwidth, until the room is full.
    let mut stored = acked * (15 << 10);
    let detail = loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let body = again.take().unwrap_or_else(|| edit(&writer, 0, &chunk));
        let frame = Frame::stamped(a.stamp(), body.clone());
        again = Some(body);
        a.send(&frame).await;
        let (frame, _) = a
            .recv_until(|f| matches!(f, Frame::Ack { .. } | Frame::Reject { .. }))
            .await;
        match frame {
            Frame::Ack { .. } => {
                stored += 15 << 10;
                again = None;
            }
            Frame::Reject {
                reason: Reason::Full,
                detail,
                ..
            } => break detail,
            Frame::Reject { reason, detail, .. } => {
                assert_eq!(reason, Reason::RateLimited, "{detail}");
                a.fence().await;
            }
            _ => unreachable!(),
        }
        assert!(stored <= 300 << 10, "{stored} bytes stored");
    };
    assert!(detail.contains("at most 262144"), "{detail}");
    assert!(stored >= 200 << 10, "{stored}");
}

/// One member stores `data` until the room's log is full. Stored data is never compacted, so
/// before, every member's next document edit was refused as `full` for good: one member could
/// stop a document for everyone. Data may fill the log to three quarters of its cap; the rest
/// is kept for document updates, which compaction shrinks.
#[tokio::test]
async fn stored_data_cannot_fill_the_log_against_document_edits() {
    let server = start("data-quota", |c| {
        c.limits.max_frame = 16 << 10;
        c.bandwidth = 1 << 30;
        c.max_room_bytes = 256 << 10;
    })
    .await;
    let mut victim = join(&server, "doc", 0, None).await;
    let mut attacker = join(&server, "doc", 0, None).await;
    let filler = serde_json::json!("x".repeat(15 << 10));
    let mut stored = 0u64;
    let detail = loop {
        let step = attacker.data(filler.clone()).await;
        let (frame, _) = attacker
            .recv_until(|f| matches!(f, Frame::Ack { .. } | Frame::Reject { .. }))
            .await;
        match frame {
            Frame::Ack { step: acked, .. } => {
                assert_eq!(acked, step);
                stored += 15 << 10;
            }
            Frame::Reject {
                reason: Reason::Full,
                detail,
                ..
            } => break detail,
            other => panic!("{other:?}"),
        }
        assert!(stored <= 256 << 10, "{stored} bytes of data stored");
    };
    assert!(detail.contains("data"), "{detail}");
    assert!(stored >= 150 << 10, "{stored}");
    attacker.fence().await;
    let doc = SharedDoc::with_client_id(4_242);
    for i in 0..4 {
        victim.acked(edit(&doc, i, "x")).await;
    }
    drop((victim, attacker));
    server.stop().await;
}

/// Reads until the peer closes the TCP connection (EOF or reset) or `within` passes; returns
/// whether it closed.
async fn tcp_closed(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// Finding 7. 32 silent TCP connections and 32 that send an HTTP request a byte at a time
/// (slowloris) fill the relay's connection cap. A connection over the cap is closed at once;
/// every attacker is closed at its join deadline; then a member joins.
#[tokio::test]
async fn silent_and_slowloris_connections_are_closed_and_never_lock_members_out() {
    let server = start("slowloris", |c| {
        c.join_timeout = Duration::from_secs(1);
        c.max_connections = 64;
    })
    .await;
    let mut silent = Vec::new();
    for _ in 0..32 {
        silent.push(TcpStream::connect(server.addr).await.unwrap());
    }
    let started = tokio::time::Instant::now();
    let mut slow = Vec::new();
    for _ in 0..32 {
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        slow.push(tokio::spawn(async move {
            let request = b"GET /ws HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\n";
            for byte in request.iter().cycle() {
                if stream.write_all(&[*byte]).await.is_err() {
                    return started.elapsed();
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                if started.elapsed() > Duration::from_secs(12) {
                    break;
                }
            }
            // Writes may still succeed into a closed socket's buffer: read for the close.
            if tcp_closed(&mut stream, Duration::from_millis(100)).await {
                started.elapsed()
            } else {
                Duration::MAX
            }
        }));
    }
    // At the cap: the next connection is closed as soon as it is accepted.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut over = TcpStream::connect(server.addr).await.unwrap();
    assert!(
        tcp_closed(&mut over, Duration::from_millis(900)).await,
        "a connection over the cap is closed at once"
    );
    for stream in &mut silent {
        assert!(
            tcp_closed(stream, Duration::from_secs(5)).await,
            "a silent connection is closed at its deadline"
        );
    }
    let mut latest = Duration::ZERO;
    for task in slow {
        let closed_after = task.await.unwrap();
        assert!(
            closed_after < Duration::from_secs(6),
            "a slowloris connection is closed at its deadline"
        );
        latest = latest.max(closed_after);
    }
    println!("64 attacking connections, the last closed after {latest:?}");
    let mut member = join(&server, "r", 0, None).await;
    member.data_acked(serde_json::json!("in")).await;
    // A member is past its deadline for good.
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    member.data_acked(serde_json::json!("still in")).await;
}

/// Finding 8, large frames. A frame over twice the frame limit is not read: the socket is
/// closed with 1009 and a reason that says what to do.
#[tokio::test]
async fn a_frame_over_twice_the_limit_closes_with_1009_and_a_reason() {
    let server = start("toobig", |c| c.limits.max_frame = 4_096).await;
    let mut a = join(&server, "r", 0, None).await;
    a.send_bytes(vec![2; 8_193]).await;
    let (code, reason) = a.closed().await;
    assert_eq!(code, pattern_mesh_core::wire::close::TOO_BIG, "{reason}");
    assert!(reason.contains("in parts"), "{reason}");
}

/// Finding 8, rates. A node's budget survives its reconnects; an address's budget is shared by
/// all its connections; a connection that keeps sending over its limit is closed.
#[tokio::test]
async fn rate_limits_hold_across_reconnects_and_addresses_and_close_who_ignores_them() {
    let server = start("rates", |c| {
        c.max_rate = 50;
        c.ip_rate = 100_000;
    })
    .await;
    let mut a = join(&server, "r", 0, None).await;
    for i in 0..50 {
        a.data(serde_json::json!(i)).await;
    }
    for _ in 0..50 {
        a.recv_until(|f| matches!(f, Frame::Ack { .. })).await;
    }
    let (token, local) = (a.token, a.local);
    drop(a);
    // (Joined from the start of the log, it gets its own 50 messages back first: the bucket
    // refills a little meanwhile, one every 20 ms, but not ten.)
    let mut again = join(&server, "r", 0, Some(token)).await;
    again.local = local;
    for i in 0..10 {
        again.data(serde_json::json!({ "over": i })).await;
    }
    let mut limited = Vec::new();
    for _ in 0..10 {
        let (frame, _) = again
            .recv_until(|f| matches!(f, Frame::Ack { .. } | Frame::Reject { .. }))
            .await;
        if let Frame::Reject { reason, detail, .. } = frame {
            assert_eq!(reason, Reason::RateLimited, "{detail}");
            assert!(detail.contains("per second"), "{detail}");
            limited.push(detail);
            again.fence().await;
            break;
        }
    }
    assert!(
        !limited.is_empty(),
        "the node's budget was not reset by the reconnect"
    );

    // An address: 4 nodes of 50 a second each, 60 a second from their address.
    let server = start("ip-rate", |c| {
        c.max_rate = 50;
        c.ip_rate = 60;
    })
    .await;
    let mut members = Vec::new();
    for _ in 0..4 {
        members.push(join(&server, "r", 0, None).await);
    }
    let mut refused = 0;
    for member in &mut members {
        for i in 0..20 {
            member.data(serde_json::json!(i)).await;
        }
    }
    for member in &mut members {
        let mut answers = 0;
        while answers < 20 {
            let (frame, _) = member
                .recv_until(|f| matches!(f, Frame::Ack { .. } | Frame::Reject { .. }))
                .await;
            answers += 1;
            if let Frame::Reject { reason, detail, .. } = frame {
                if detail.contains("from this address") {
                    assert_eq!(reason, Reason::RateLimited);
                    refused += 1;
                }
            }
        }
    }
    assert!(refused >= 1, "the address's budget refused some");

    // 5,000 frames a second, never pausing: closed within about a second.
    let server = start("flood", |c| c.max_rate = 50).await;
    let mut flood = join(&server, "r", 0, None).await;
    let started = tokio::time::Instant::now();
    let (code, reason) = loop {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the flood was not closed"
        );
        let frame = Frame::stamped(
            flood.stamp(),
            Body::Data {
                data: Json::parse("0").unwrap(),
            },
        );
        let sent = flood.conn.send(&frame).await;
        if flood.local % 5 == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let received = tokio::time::timeout(Duration::ZERO, flood.conn.recv()).await;
        match (sent, received) {
            (_, Ok(Err(ClientError::Closed { code, reason }))) => break (code, reason),
            (Err(_), _) => break flood.closed().await,
            _ => {}
        }
    };
    assert_eq!(
        code,
        pattern_mesh_core::wire::close::RATE_LIMITED,
        "{reason}"
    );
    println!("a flood of frames was closed after {:?}", started.elapsed());
}

/// Finding 5. 2,000 join/leave cycles on one room, 4 at a time, while the room retires and
/// reopens between them: no node id is handed to two tokens, and every token that resumes gets
/// its own id back.
#[tokio::test]
async fn node_ids_are_unique_under_churn_and_room_reloads() {
    let server = std::sync::Arc::new(
        start("churn", |c| {
            c.resume_grace = Duration::ZERO;
            c.max_rate = 100_000;
            // The room retires and opens again thousands of times, from one address.
            c.ip_room_opens = 1_000_000;
        })
        .await,
    );
    let mut tasks = Vec::new();
    for worker in 0..4u64 {
        let server = server.clone();
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            for i in 0..500u64 {
                let mut m = join(&server, "churn", 0, None).await;
                if i % 10 == 0 {
                    // Some write, so the store keeps their node; they come back later.
                    m.data_acked(serde_json::json!([worker, i])).await;
                    seen.push((m.node, m.token));
                }
                let node = m.node;
                drop(m);
                if i % 50 == 0 {
                    // Long enough for the room to retire when no one else is in it.
                    tokio::time::sleep(Duration::from_millis(30)).await;
                }
                seen.push((node, [0; 16]));
            }
            seen
        }));
    }
    let mut by_node = std::collections::HashMap::new();
    let mut writers = Vec::new();
    for task in tasks {
        for (node, token) in task.await.unwrap() {
            if token == [0; 16] {
                *by_node.entry(node).or_insert(0u32) += 1;
            } else {
                writers.push((node, token));
            }
        }
    }
    let metrics = http_get(server.addr, "/metrics").await;
    let opened: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("pattern_mesh_rooms_opened_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    println!("2,000 joins; the room was loaded {opened} times");
    assert!(opened > 1, "the room retired and reopened during the churn");
    let twice: Vec<_> = by_node.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "node ids handed out twice: {twice:?}");
    assert_eq!(by_node.len(), 2_000);
    for (node, token) in writers {
        let m = join(&server, "churn", 0, Some(token)).await;
        assert_eq!(m.node, node, "the token resumes its own node");
    }
}

/// The rows of the store's nodes table.
fn node_rows(dir: &std::path::Path) -> i64 {
    let db = rusqlite::Connection::open(dir.join("relay.sqlite3")).unwrap();
    db.query_row("SELECT count(*) FROM nodes", [], |row| row.get(0))
        .unwrap()
}

/// Finding 4. Eight members edit, go offline and edit again; meanwhile 4,200 other nodes pass
/// through the room (which retires and reloads between them). Back online, every offline edit
/// is delivered: the room never forgot the eight senders' last steps. Nodes that never wrote
/// leave no row in the store.
#[tokio::test]
async fn offline_edits_survive_thousands_of_nodes_passing_through() {
    let server = std::sync::Arc::new(
        start("passers", |c| {
            c.resume_grace = Duration::ZERO;
            c.max_rate = 100_000;
            // The room retires and opens again thousands of times, from one address.
            c.ip_room_opens = 1_000_000;
        })
        .await,
    );
    let proxy = Proxy::start(server.addr).await;
    let mut offline = Vec::new();
    for i in 0..8 {
        let client = Client::connect(&proxy.url(), session("doc", &format!("m{i}")))
            .await
            .unwrap();
        client
            .insert("content", 0, &format!("<online {i}>"))
            .unwrap();
        client.settled(WAIT).await.unwrap();
        offline.push(client);
    }
    proxy.set_down(true);
    for (i, client) in offline.iter().enumerate() {
        client
            .insert("content", 0, &format!("<offline {i}>"))
            .unwrap();
    }
    let mut tasks = Vec::new();
    for worker in 0..4u64 {
        let server = server.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..1_050u64 {
                let mut m = join(&server, "doc", 0, None).await;
                if i % 100 == 0 {
                    m.data_acked(serde_json::json!([worker, i])).await;
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let rows = node_rows(&server.dir);
    assert!(rows <= 8 + 44, "{rows} node rows after 4,200 joins");
    proxy.set_down(false);
    for client in &offline {
        client.settled(WAIT).await.unwrap();
    }
    let late = join(&server, "doc", 0, None).await;
    let text = replayed_text(late.replay());
    for i in 0..8 {
        assert!(text.contains(&format!("<online {i}>")), "{text}");
        assert!(text.contains(&format!("<offline {i}>")), "{text}");
    }
    println!("4,200 nodes passed through; {rows} node rows; every offline edit delivered");
}

/// Finding 4, expiry. A node whose record expired (here after a second) comes back under a new
/// id, and its client sends its outbox again under it: nothing is lost.
#[tokio::test]
async fn an_expired_nodes_outbox_is_still_delivered() {
    let server = start("expiry", |c| {
        c.resume_grace = Duration::ZERO;
        c.node_ttl = Duration::from_secs(1);
    })
    .await;
    let proxy = Proxy::start(server.addr).await;
    let client = Client::connect(&proxy.url(), session("doc", "away"))
        .await
        .unwrap();
    client.insert("content", 0, "before ").unwrap();
    client.settled(WAIT).await.unwrap();
    let node = client.node();
    proxy.set_down(true);
    client.insert("content", 7, "while away").unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while node_rows(&server.dir) > 0 {
        assert!(tokio::time::Instant::now() < deadline, "the record expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    proxy.set_down(false);
    client.settled(WAIT).await.unwrap();
    assert_ne!(client.node(), node, "a new identity");
    let late = join(&server, "doc", 0, None).await;
    assert_eq!(replayed_text(late.replay()), "before while away");
}

/// Finding 6. A member that stops reading is cut off once its queue holds more than
/// `--send-queue-bytes` (4000, with the reason), however large or small the frames.
#[tokio::test]
async fn a_member_that_stops_reading_is_cut_off_at_its_queue_bytes() {
    let server = start("queue-bytes", |c| {
        c.send_queue_bytes = 256 << 10;
        c.bandwidth = 1 << 30;
        c.max_rate = 100_000;
        c.ip_rate = 100_000;
    })
    .await;
    let mut stalled = join(&server, "r", 0, None).await;
    let mut writer = join(&server, "r", 0, None).await;
    let payload = "x".repeat(60 << 10);
    // Far more than the kernel's socket buffers hold, so the relay's queue fills.
    for _ in 0..600 {
        writer.data_acked(serde_json::json!(payload)).await;
        let metrics = http_get(server.addr, "/metrics").await;
        if metrics.contains("pattern_mesh_slow_consumers_total 1") {
            break;
        }
    }
    let (code, reason) = stalled.closed().await;
    assert_eq!(
        code,
        pattern_mesh_core::wire::close::SLOW_CONSUMER,
        "{reason}"
    );
    assert!(reason.contains("over 262144 bytes"), "{reason}");
    // The writer was never slowed.
    writer.data_acked(serde_json::json!("after")).await;
}

/// An update whose client sections each wait for the next one (client 1's block next to
/// client 2's clock 0, and so on; the last needs nothing): it integrates whole, and the relay
/// takes it, in time. Checking it with a pass over every section until one moves nothing took
/// a pass per section: 30,000 sections, 300 KB, held the room for minutes.
#[tokio::test]
async fn an_update_of_sections_each_waiting_for_the_next_is_checked_in_time() {
    let server = start("chain", |_| {}).await;
    let mut writer = join(&server, "doc", 0, None).await;
    let mut other = join(&server, "doc", 0, None).await;
    let var = |out: &mut Vec<u8>, mut n: u64| {
        while n >= 0x80 {
            out.push(n as u8 | 0x80);
            n >>= 7;
        }
        out.push(n as u8);
    };
    let n: u64 = 30_000;
    let mut chain = Vec::new();
    var(&mut chain, n);
    for client in 1..n {
        chain.push(1);
        var(&mut chain, client);
        chain.extend_from_slice(&[0, 0x84]);
        var(&mut chain, client + 1);
        chain.extend_from_slice(&[0, 1, b'a']);
    }
    chain.push(1);
    var(&mut chain, n);
    chain.extend_from_slice(&[0, 4, 1, 7]);
    chain.extend_from_slice(b"content");
    chain.extend_from_slice(&[1, b'a', 0]);
    let frame = raw_update(&mut writer, "content", chain);
    let step = frame.stamp().unwrap().step;
    writer.send(&frame).await;
    writer.expect_ack(step).await;
    let (got, _) = other
        .recv_until(|f| matches!(f, Frame::Stamped(s) if s.stamp.step == step))
        .await;
    assert!(matches!(got, Frame::Stamped(_)));
    let late = join(&server, "doc", 0, None).await;
    assert_eq!(replayed_text(late.replay()).len(), n as usize);
    server.stop().await;
}

/// A member (a read-only one could too: sync requests and presences need no write access) sends
/// a sync request to everyone, a checkpoint and a presence far larger than any client makes:
/// each was fanned out to every member, spending no bandwidth, and the presence was kept and
/// sent to every joiner. Whole messages of the message limit, as fast as the frame rate allows,
/// filled every member's send queue until the relay cut them all as slow. Each is refused as
/// `tooLarge` and reaches no one.
/// A sync request whose state vector does not decode reached the member it named, whose
/// document then failed on it: an application's Y.Doc reported a `DocumentError` of its own
/// that named no one. The relay refuses it as `malformed`, and it reaches no one.
#[tokio::test]
async fn a_sync_request_whose_state_vector_does_not_decode_reaches_no_one() {
    let server = start("bad-state-vector", |_| {}).await;
    let mut victim = join(&server, "r", 0, None).await;
    let mut attacker = join(&server, "r", 0, None).await;
    let frame = Frame::stamped(
        attacker.stamp(),
        Body::SyncRequest {
            doc: "content".into(),
            state_vector: vec![0x05],
            to: victim.node,
        },
    );
    attacker.send(&frame).await;
    let detail = attacker.expect_reject(Reason::Malformed).await;
    assert!(detail.contains("state vector does not decode"), "{detail}");
    attacker.fence().await;
    victim.expect_no_data(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn sync_requests_checkpoints_and_presences_over_a_frame_are_refused() {
    let server = start("oversized", |c| {
        c.limits.max_frame = 16 << 10;
        c.limits.max_message = 1 << 20;
    })
    .await;
    let mut victim = join(&server, "r", 0, None).await;
    let mut attacker = join(&server, "r", 0, None).await;
    let state_vector = vec![0x80; 200 << 10];
    let bodies = [
        Body::SyncRequest {
            doc: "content".into(),
            state_vector: state_vector.clone(),
            to: 0,
        },
        Body::Checkpoint {
            doc: "content".into(),
            state_vector,
            deletes: 0,
            digest: 0,
        },
    ];
    for body in bodies {
        let frame = Frame::stamped(attacker.stamp(), body);
        for piece in part::fragment(&frame.encode(), 16 << 10) {
            attacker.send_bytes(piece).await;
        }
        let detail = attacker.expect_reject(Reason::TooLarge).await;
        assert!(detail.contains("state vector of 204800 bytes"), "{detail}");
        attacker.fence().await;
    }
    let presence = Frame::Presence {
        sender: attacker.node,
        data: Json::from_value(&serde_json::json!({ "cursor": "x".repeat(200 << 10) })).unwrap(),
    };
    for piece in part::fragment(&presence.encode(), 16 << 10) {
        attacker.send_bytes(piece).await;
    }
    let detail = attacker.expect_reject(Reason::TooLarge).await;
    assert!(detail.contains("presence of"), "{detail}");
    let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
    while let Ok(frame) = tokio::time::timeout_at(deadline, victim.recv()).await {
        let frame = frame.frame;
        assert!(
            !matches!(
                frame,
                Frame::Presence { .. } | Frame::Part { .. } | Frame::Stamped(_)
            ),
            "the victim got {frame:?}"
        );
    }
    server.stop().await;
}

/// A member writes under another member's Yjs client id past its next clock, and deletes what
/// it wrote there. Yjs keeps blocks after a gap until the gap is filled, on every replica: the
/// victim's next edit would fill it, and the attacker's block and delete would then take its
/// place. An update under a fresh client id after a gap would leave every replica, and every
/// late joiner, waiting for good. The relay refuses both as `malformed`, naming the clocks.
#[tokio::test]
async fn an_update_after_a_gap_in_a_clients_clocks_is_refused() {
    let server = start("gap", |_| {}).await;
    let mut victim = join(&server, "doc", 0, None).await;
    let mut attacker = join(&server, "doc", 0, None).await;
    let doc = SharedDoc::with_client_id(4_242);
    victim.acked(edit(&doc, 0, "first")).await;
    // lib0 varuints: one client (4242), one block at its clock 10, in the root type "content",
    // the string "x"; a delete set of that one clock.
    let mut gap = vec![1, 1, 0x92, 0x21, 10, 4, 1, 7];
    gap.extend_from_slice(b"content");
    gap.extend_from_slice(&[1, b'x', 1, 0x92, 0x21, 1, 10, 1]);
    let frame = raw_update(&mut attacker, "content", gap.clone());
    attacker.send(&frame).await;
    let detail = attacker.expect_reject(Reason::Malformed).await;
    assert!(
        detail.contains("client 4242's clocks 10..11 after clocks 5..10, which no one has written"),
        "{detail}"
    );
    // Under a client id no one uses, from its clock 3.
    attacker.fence().await;
    let mut fresh = vec![1, 1, 77, 3, 4, 1, 7];
    fresh.extend_from_slice(b"content");
    fresh.extend_from_slice(&[1, b'x', 0]);
    let frame = raw_update(&mut attacker, "content", fresh);
    attacker.send(&frame).await;
    let detail = attacker.expect_reject(Reason::Malformed).await;
    assert!(
        detail.contains("client 77's clocks 3..4 after clocks 0..3"),
        "{detail}"
    );
    victim.acked(edit(&doc, 5, " second")).await;
    let late = join(&server, "doc", 0, None).await;
    assert_eq!(replayed_text(late.replay()), "first second");
    server.stop().await;
}

/// A member deletes another member's next edits before they exist: an update whose delete set
/// runs over clocks of the victim's Yjs client id that no one has written yet. Yjs keeps such
/// deletions and applies them to whatever comes at those clocks, on every replica. The relay
/// refuses it as `malformed`, naming the client and clocks; the victim's next edit reaches a
/// late joiner whole.
#[tokio::test]
async fn an_update_deleting_clocks_no_one_wrote_is_refused() {
    let server = start("unwritten-deletes", |_| {}).await;
    let mut victim = join(&server, "doc", 0, None).await;
    let mut attacker = join(&server, "doc", 0, None).await;
    let doc = SharedDoc::with_client_id(4_242);
    victim.acked(edit(&doc, 0, "first")).await;
    // lib0 varuints: no blocks; one client (4242), one range: its clocks 5 to 1,000,005.
    let bomb = vec![0, 1, 0x92, 0x21, 1, 5, 0xc0, 0x84, 0x3d];
    let frame = raw_update(&mut attacker, "content", bomb);
    attacker.send(&frame).await;
    let detail = attacker.expect_reject(Reason::Malformed).await;
    assert!(
        detail.contains("client 4242's clocks 5..1000005, which no one has written"),
        "{detail}"
    );
    victim.acked(edit(&doc, 5, " second")).await;
    let late = join(&server, "doc", 0, None).await;
    assert_eq!(replayed_text(late.replay()), "first second");
    server.stop().await;
}

/// A member writes under another member's Yjs client id at its next clock (no gap: the victim's
/// edits so far are its origin), before the victim's next edit goes out. The relay took the
/// victim's edit as one it already held: acknowledged, and passed on, every replica kept the
/// attacker's content at those clocks, and the victim's text went nowhere, with nothing said.
/// An edit that writes clocks the room holds with other content is refused, naming the clocks;
/// the same edit sent again (a resend after a reconnect) is taken, and so is the victim's whole
/// document given back (after a relay lost the room's history): the room keeps what it holds at
/// the clocks that differ, and takes the rest, rather than lose every edit only that tab held.
#[tokio::test]
async fn an_edit_at_clocks_another_member_wrote_first_is_refused_not_lost() {
    let server = start("taken-clocks", |_| {}).await;
    let mut victim = join(&server, "doc", 0, None).await;
    let mut attacker = join(&server, "doc", 0, None).await;
    let doc = SharedDoc::with_client_id(4_242);
    let first = edit(&doc, 0, "first");
    victim.acked(first.clone()).await;
    // The attacker saw the victim's edit: it writes the victim's next clock, after its text.
    let forged = SharedDoc::with_client_id(4_242);
    forged.apply_update(&doc.snapshot()).unwrap();
    attacker.acked(edit(&forged, 5, "X")).await;
    victim.fence().await;
    let frame = Frame::stamped(victim.stamp(), edit(&doc, 5, " second"));
    victim.send(&frame).await;
    let detail = victim.expect_reject(Reason::Malformed).await;
    assert!(
        detail.contains("client 4242's clock 5 with other content than the room holds there"),
        "{detail}"
    );
    // What the room holds, sent again, is taken.
    victim.fence().await;
    victim.acked(first).await;
    let late = join(&server, "doc", 0, None).await;
    assert_eq!(replayed_text(late.replay()), "firstX");
    let whole = Body::Update {
        doc: "*".into(),
        update: doc.snapshot(),
    };
    victim.acked(whole).await;
    let late = join(&server, "doc", 0, None).await;
    assert_eq!(replayed_text(late.replay()), "firstXsecond");
    server.stop().await;
}

/// The same attack on a map's entry: a member sets the victim's next clock under its client
/// id, on the entry the victim set last (its origin), before the victim sets it again. The
/// victim's value differs from the attacker's only in the value: the relay compared values by
/// kind alone (writers encode one value differently), took the victim's edit as one it held,
/// and every replica kept the attacker's value, with nothing said. Values are compared in a form
/// every writer's encoding shares: the victim's edit is refused, naming the clock, while the
/// same value written another way (a float64 where yrs writes an integer, an object's keys in
/// another order) is taken as the one the room holds.
#[tokio::test]
async fn a_value_at_clocks_another_member_wrote_first_is_refused_not_lost() {
    use yrs::updates::decoder::Decode;
    use yrs::{Any, Doc, Map, ReadTxn, StateVector, Transact, Update};

    fn set(doc: &Doc, key: &str, value: Any) -> Body {
        let map = doc.get_or_insert_map("m");
        let before = doc.transact().state_vector();
        map.insert(&mut doc.transact_mut(), key, value);
        Body::Update {
            doc: "content".into(),
            update: doc.transact().encode_state_as_update_v1(&before),
        }
    }
    fn value(replay: &[pattern_mesh_core::wire::Positioned], key: &str) -> Option<String> {
        let doc = Doc::new();
        let map = doc.get_or_insert_map("m");
        for p in replay {
            let update = match &p.frame {
                Frame::Snapshot { state, .. } => state.clone(),
                Frame::Stamped(stamped) => match &stamped.body {
                    Body::Update { update, .. } => update.clone(),
                    _ => continue,
                },
                _ => continue,
            };
            doc.transact_mut()
                .apply_update(Update::decode_v1(&update).unwrap())
                .unwrap();
        }
        let txn = doc.transact();
        map.get(&txn, key).map(|v| v.to_string(&txn))
    }

    let server = start("taken-values", |_| {}).await;
    let mut victim = join(&server, "doc", 0, None).await;
    let mut attacker = join(&server, "doc", 0, None).await;
    let doc = Doc::with_client_id(4_242);
    let first = set(&doc, "k", Any::from("first"));
    victim.acked(first).await;
    let forged = Doc::with_client_id(4_242);
    forged
        .transact_mut()
        .apply_update(
            Update::decode_v1(
                &doc.transact()
                    .encode_state_as_update_v1(&StateVector::default()),
            )
            .unwrap(),
        )
        .unwrap();
    attacker.acked(set(&forged, "k", Any::from(3))).await;
    victim.fence().await;
    let frame = Frame::stamped(victim.stamp(), set(&doc, "k", Any::from(2)));
    victim.send(&frame).await;
    let detail = victim.expect_reject(Reason::Malformed).await;
    assert!(
        detail.contains("client 4242's clock 1 with other content than the room holds there"),
        "{detail}"
    );
    let late = join(&server, "doc", 0, None).await;
    assert_eq!(value(late.replay(), "k").as_deref(), Some("3"));
    server.stop().await;
}

/// The other side of comparing values: an honest resend of values Yjs wrote (every form lib0
/// writes a number in, bigints, objects with keys in JavaScript's order, embeds, formats, XML, a
/// sub-document; `tests/data/yjs/values.v1`, from `values.mjs` beside it) is compared with what
/// the room's document writes for the same clocks, in yrs's forms, and taken.
#[tokio::test]
async fn values_yjs_wrote_sent_again_are_taken_as_the_ones_the_room_holds() {
    let update = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/data/yjs/values.v1"
    ))
    .unwrap();
    let server = start("yjs-values", |_| {}).await;
    let mut member = join(&server, "doc", 0, None).await;
    let body = Body::Update {
        doc: "content".into(),
        update,
    };
    member.acked(body.clone()).await;
    member.acked(body).await;
    server.stop().await;
}

/// The relay's bytes in large messages whose parts are still arriving, from its metrics.
async fn partial_bytes(server: &Server) -> u64 {
    gauge(server, "pattern_mesh_partial_bytes").await
}

/// A value of the relay's metrics.
async fn gauge(server: &Server, name: &str) -> u64 {
    let metrics = http_get(server.addr, "/metrics").await;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .expect("the metric is there")
}

/// Members start large messages and never finish them (a read-only member can: nothing is
/// judged before the last part). Each connection held up to the message limit, with no bound
/// across connections, until the relay ran out of memory and every room went with it. The
/// relay holds at most `--max-partial-bytes` for such messages, and one address a quarter of
/// that: a part past either is refused as `rateLimited` with the rest of its message, and what
/// a connection held is given back when it closes. (The test's members share one address.)
#[tokio::test]
async fn messages_never_finished_hold_at_most_the_relays_partial_bytes() {
    let server = start("partial", |c| {
        c.limits.max_frame = 16 << 10;
        c.limits.max_message = 256 << 10;
        c.max_partial_bytes = 2 << 20;
        c.max_rate = 100_000;
        c.ip_rate = 100_000;
    })
    .await;
    let mut members = Vec::new();
    for _ in 0..3 {
        members.push(join(&server, "r", 0, None).await);
    }
    // Each holds a message of about 250 KB but for its last part, one after the other.
    for (i, member) in members.iter_mut().enumerate() {
        let frame = Frame::stamped(
            member.stamp(),
            Body::Data {
                data: Json::from_value(&serde_json::json!("x".repeat(250_000))).unwrap(),
            },
        );
        let parts = part::fragment(&frame.encode(), 16 << 10);
        for piece in &parts[..parts.len() - 1] {
            member.send_bytes(piece.clone()).await;
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        while i < 2 && partial_bytes(&server).await < (i as u64 + 1) * 240_000 {
            assert!(tokio::time::Instant::now() < deadline, "not held");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let detail = members[2].expect_reject(Reason::RateLimited).await;
    assert!(
        detail.contains("this address holds 524288 bytes of large messages still arriving"),
        "{detail}"
    );
    let held = partial_bytes(&server).await;
    assert!(held <= 512 << 10, "the relay holds {held} bytes");
    // The member goes on: after its fence, a small message is stored.
    members[2].fence().await;
    members[2].data_acked(serde_json::json!("small")).await;
    // Connections that close give back what they held.
    for stalled in members.drain(..2) {
        stalled.conn.close().await;
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    while partial_bytes(&server).await > 0 {
        assert!(tokio::time::Instant::now() < deadline, "still held");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for member in members {
        member.conn.close().await;
    }
    server.stop().await;
}

/// The parts of a message that is never finished cost nothing from the address's frame budget
/// (the whole was counted when its last part came): a member could send parts as fast as the
/// socket took them. Every part counts as it comes now, and one over the budget is refused
/// with the rest of its message.
#[tokio::test]
async fn the_parts_of_a_message_count_against_the_addresss_frame_budget_as_they_come() {
    let server = start("partial-rate", |c| {
        c.limits.max_frame = 16 << 10;
        c.limits.max_message = 1 << 20;
        c.max_rate = 100_000;
        c.ip_rate = 20;
    })
    .await;
    let mut member = join(&server, "r", 0, None).await;
    let frame = Frame::stamped(
        member.stamp(),
        Body::Data {
            data: Json::from_value(&serde_json::json!("x".repeat(1_000_000))).unwrap(),
        },
    );
    let parts = part::fragment(&frame.encode(), 16 << 10);
    for piece in &parts[..40] {
        member.send_bytes(piece.clone()).await;
    }
    let detail = member.expect_reject(Reason::RateLimited).await;
    assert!(
        detail.contains("over 20 frames per second from this address"),
        "{detail}"
    );
    assert_eq!(partial_bytes(&server).await, 0, "the message was dropped");
    // One refusal for the message: the rest of its parts are dropped in silence.
    let step = member.local;
    member.send(&Frame::Fence { step }).await;
    let (_, skipped) = member
        .recv_until(|f| matches!(f, Frame::Fence { .. }))
        .await;
    assert!(
        !skipped.iter().any(|f| matches!(f, Frame::Reject { .. })),
        "{skipped:?}"
    );
    server.stop().await;
}

/// The `pattern_mesh_connections` gauge: WebSocket connections open now.
async fn connections(server: &Server) -> u64 {
    let metrics = http_get(server.addr, "/metrics").await;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("pattern_mesh_connections "))
        .and_then(|v| v.trim().parse().ok())
        .expect("the metric is there")
}

/// Sends `count` data frames of `size` bytes and reads their answers: how many were refused
/// for their address's budgets, and what the last such refusal said.
async fn data_over_address(member: &mut Member, count: usize, size: usize) -> (usize, String) {
    for _ in 0..count {
        member.data(serde_json::json!("x".repeat(size))).await;
    }
    let (mut refused, mut said) = (0, String::new());
    for _ in 0..count {
        let (frame, _) = member
            .recv_until(|f| matches!(f, Frame::Ack { .. } | Frame::Reject { .. }))
            .await;
        if let Frame::Reject { reason, detail, .. } = frame {
            if detail.contains("from this address") {
                assert_eq!(reason, Reason::RateLimited, "{detail}");
                refused += 1;
                said = detail;
            }
        }
    }
    (refused, said)
}

/// An address's budgets were forgotten when its last connection closed: closing every
/// connection and opening new ones (new nodes) started the address from full budgets again, so
/// that they held for nothing. They are kept now until they are full again. (The byte budget
/// here: it takes seconds to fill again, where the frame budget takes one.)
#[tokio::test]
async fn an_addresss_budgets_hold_when_all_its_connections_close_and_new_ones_open() {
    let server = start("ip-reopen", |c| {
        c.limits.max_frame = 16 << 10;
        c.limits.max_message = 64 << 10;
        c.bandwidth = 16 << 10;
        c.ip_bandwidth = 16 << 10;
    })
    .await;
    let mut first = join(&server, "r", 0, None).await;
    let (refused, said) = data_over_address(&mut first, 4, 15 << 10).await;
    assert_eq!(refused, 0, "{said}");
    drop(first);
    while connections(&server).await > 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut second = join(&server, "r", 0, None).await;
    let (refused, said) = data_over_address(&mut second, 4, 15 << 10).await;
    // (One refusal per connection: what it sends after waits for its fence.)
    assert!(refused >= 1, "{refused} refused for the address");
    assert!(
        said.contains("over 16384 bytes per second from this address"),
        "{said}"
    );
    server.stop().await;
}

/// One address writing into several rooms, each member within its own byte budget: nothing
/// bounded what the address as a whole made the relay store, so that it could fill the disk
/// every room shares. The address's byte budget (`--ip-bandwidth`) holds across its rooms.
#[tokio::test]
async fn an_addresss_bytes_are_bounded_across_its_rooms() {
    let server = start("ip-bytes", |c| {
        c.limits.max_frame = 16 << 10;
        c.limits.max_message = 64 << 10;
        c.bandwidth = 32 << 10;
        c.ip_bandwidth = 32 << 10;
    })
    .await;
    let mut refused = 0;
    let mut said = String::new();
    for room in ["one", "two", "three"] {
        let mut member = join(&server, room, 0, None).await;
        let (n, detail) = data_over_address(&mut member, 4, 15 << 10).await;
        refused += n;
        if n > 0 {
            said = detail;
        }
    }
    // (One refusal per connection: what it sends after waits for its fence.)
    assert!(refused >= 2, "{refused} refused for the address");
    assert!(
        said.contains("over 32768 bytes per second from this address"),
        "{said}"
    );
    server.stop().await;
}

/// A member writes at the victim's next clock first: the victim's edit there is refused for
/// good, and its document diverged. The victim repairs it in place: it loads the room's
/// document again, and its next edits reach the others.
#[tokio::test]
async fn a_document_diverged_by_another_members_write_is_repaired_in_place() {
    let server = start("repair", |_| {}).await;
    let url = format!("ws://{}/ws", server.addr);
    let mut victim = Client::connect(&url, session("doc", "victim"))
        .await
        .unwrap();
    victim.insert("content", 0, "ab").unwrap();
    victim.settled(Duration::from_secs(10)).await.unwrap();
    // The attacker writes under the victim's client id, at its next clock.
    let id = victim.with_session(|s, _| s.replica().client_id());
    let mut attacker = join(&server, "doc", 0, None).await;
    let forged = SharedDoc::with_client_id(id);
    for p in attacker.replay().to_vec() {
        if let Frame::Stamped(s) = &p.frame {
            if let Body::Update { update, .. } = &s.body {
                forged.apply_update(update).unwrap();
            }
        }
    }
    attacker.acked(edit(&forged, 2, "X")).await;
    victim.insert("content", 2, "c").unwrap();
    let wait = tokio::time::Instant::now() + Duration::from_secs(10);
    while !victim.diverged() && tokio::time::Instant::now() < wait {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(victim.diverged(), "the victim's edit was refused");
    assert_eq!(victim.text("content"), "abc");
    assert!(victim.repair().unwrap());
    let wait = tokio::time::Instant::now() + Duration::from_secs(10);
    while victim.text("content") != "abX" && tokio::time::Instant::now() < wait {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "status {:?} events {:?}",
        victim.status(),
        victim.take_events()
    );
    assert_eq!(victim.text("content"), "abX", "the room's document");
    assert!(!victim.diverged());
    assert!(!victim.repair().unwrap(), "nothing left to repair");
    victim.insert("content", 3, "d").unwrap();
    victim.settled(Duration::from_secs(10)).await.unwrap();
    let late = Client::connect(&url, session("doc", "late")).await.unwrap();
    let wait = tokio::time::Instant::now() + Duration::from_secs(10);
    while late.text("content") != "abXd" && tokio::time::Instant::now() < wait {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(late.text("content"), "abXd", "the victim writes again");
    drop(attacker);
    server.stop().await;
}

/// Sends `count` rounds of `frames` (raw bytes) as fast as the socket takes them, reading
/// nothing; returns how the relay closed the connection.
async fn flood(member: &mut Member, count: usize, frames: &[Vec<u8>]) -> (u16, String) {
    'sending: for _ in 0..count {
        for frame in frames {
            if member.conn.send_bytes(frame.clone()).await.is_err() {
                break 'sending;
            }
        }
    }
    loop {
        match member.conn.recv_within(WAIT).await {
            Ok(_) => continue,
            Err(ClientError::Closed { code, reason }) => return (code, reason),
            Err(e) => panic!("no close: {e}"),
        }
    }
}

/// A member (one that may only read would do) sends fences that end no gap, each echoed, bytes
/// that are not a frame with a fence after each (which cleared the count of malformed frames),
/// or heartbeats: none cost the address's budget, and over the node's rate a fence was echoed
/// and a heartbeat ignored, so one member kept the room's task and the relay's workers busy
/// with millions of frames a second, and no connection was ever closed. A fence that ends no
/// gap now costs a frame like any other, a fence does not clear the count of malformed frames,
/// and whoever keeps sending over the node's rate, or over its address's, is closed with 4001.
#[tokio::test]
async fn fences_heartbeats_and_undecodable_frames_cost_a_frame_like_any_other() {
    use pattern_mesh_core::wire::close;
    let fence = Frame::Fence { step: 0 }.encode();
    let heartbeat = Frame::Heartbeat.encode();
    let server = start("fences", |c| {
        c.max_rate = 50;
        c.ip_rate = 100_000;
    })
    .await;
    for frames in [vec![fence.clone()], vec![heartbeat.clone()]] {
        let mut a = join(&server, "r", 0, None).await;
        let (code, reason) = flood(&mut a, 20_000, &frames).await;
        assert_eq!(code, close::RATE_LIMITED, "over the node's rate: {reason}");
    }
    let mut b = join(&server, "r", 0, None).await;
    let (code, reason) = flood(&mut b, 20_000, &[vec![0xFF], fence.clone()]).await;
    assert_eq!(code, close::POLICY, "{reason}");
    assert!(reason.contains("malformed"), "{reason}");
    server.stop().await;

    let server = start("fences-ip", |c| {
        c.max_rate = 100_000;
        c.ip_rate = 100;
    })
    .await;
    for frames in [vec![fence.clone()], vec![heartbeat.clone()]] {
        let mut a = join(&server, "r", 0, None).await;
        let (code, reason) = flood(&mut a, 20_000, &frames).await;
        assert_eq!(code, close::RATE_LIMITED, "over the address's: {reason}");
    }
    server.stop().await;
}

/// A room whose steps may run `max_future` ahead.
fn session_ahead(name: &str, max_future: u64) -> pattern_mesh_core::session::SessionConfig {
    let mut config = session("doc", name);
    config.room_config = Some(RoomConfig {
        max_future,
        ..RoomConfig::default()
    });
    config
}

/// Waits until a late joiner's copy of the room's text is `want`.
async fn late_text_is(server: &Server, want: &str) {
    let url = format!("ws://{}/ws", server.addr);
    let late = Client::connect(&url, session_ahead("late", 20))
        .await
        .unwrap();
    let wait = tokio::time::Instant::now() + Duration::from_secs(10);
    while late.text("content") != want && tokio::time::Instant::now() < wait {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(late.text("content"), want);
}

/// A member (one that may only read would do: a sync request needs no write access) sends the
/// writer, by name, more sync requests than the room's steps may run ahead, each a step further,
/// each asking nothing the writer could answer. The relay's room step never counts a message to
/// one member, but the writer's clock moved one step with each: its next edits were stamped past
/// what the room accepts, and each was refused as `futureStep` and lost. A sync message now
/// moves no one's step.
#[tokio::test]
async fn sync_requests_to_one_member_do_not_push_its_steps_past_the_room() {
    let server = start("pushed", |_| {}).await;
    let url = format!("ws://{}/ws", server.addr);
    let mut writer = Client::connect(&url, session_ahead("writer", 20))
        .await
        .unwrap();
    writer.insert("content", 0, "first").unwrap();
    writer.settled(Duration::from_secs(10)).await.unwrap();
    let node = writer.node();
    let vector = writer.with_session(|s, _| s.replica().state_vector());
    let mut attacker = join(&server, "doc", 0, None).await;
    for _ in 0..25 {
        let frame = Frame::stamped(
            attacker.stamp(),
            Body::SyncRequest {
                doc: "*".into(),
                state_vector: vector.clone(),
                to: node,
            },
        );
        attacker.send(&frame).await;
    }
    attacker.fence().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    writer.insert("content", 5, " second").unwrap();
    writer.settled(Duration::from_secs(10)).await.unwrap();
    let refused: Vec<Event> = writer
        .take_events()
        .into_iter()
        .filter(|e| matches!(e, Event::Refused { .. }))
        .collect();
    assert!(refused.is_empty(), "{refused:?}");
    assert_eq!(writer.node(), node, "no new identity was needed");
    late_text_is(&server, "first second").await;
    server.stop().await;
}

/// A member asks the writer for the whole document, again and again, in a room whose steps
/// may run 4 ahead: each answer took the writer a step that the room's step does not count,
/// until its edits were stamped past what the room accepts and refused as `futureStep`, for
/// good (joining again did not help: the relay's floor kept the clock there). A writer
/// refused that way now joins again as a new node and sends the edit again: nothing is lost.
#[tokio::test]
async fn a_writer_whose_answers_ran_its_steps_ahead_loses_no_edit() {
    let server = start("answers", |_| {}).await;
    let url = format!("ws://{}/ws", server.addr);
    let writer = Client::connect(&url, session_ahead("writer", 4))
        .await
        .unwrap();
    writer.insert("content", 0, "first").unwrap();
    writer.settled(Duration::from_secs(10)).await.unwrap();
    let node = writer.node();
    let mut asker = join(&server, "doc", 0, None).await;
    for _ in 0..10 {
        let frame = Frame::stamped(
            asker.stamp(),
            Body::SyncRequest {
                doc: "*".into(),
                state_vector: vec![0],
                to: node,
            },
        );
        asker.send(&frame).await;
        // Answered, until the writer's answers run past what the room accepts.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    writer.insert("content", 5, " second").unwrap();
    writer.settled(Duration::from_secs(10)).await.unwrap();
    late_text_is(&server, "first second").await;
    server.stop().await;
}

/// An outsider (no token needed: the token is judged at the join) opens a WebSocket and starts
/// a binary frame of 2 MB that it never finishes. The WebSocket held every byte of it until the
/// join deadline, twice the frame limit per socket, on up to 512 sockets per address: gigabytes
/// that no budget counted. Before its join, a connection may send 64 KiB (an HTTP request and a
/// join need far less); past that it is cut.
#[tokio::test]
async fn a_connection_that_has_not_joined_cannot_make_the_relay_hold_its_bytes() {
    let server = start("pre-join", |c| c.join_timeout = Duration::from_secs(30)).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        server.addr
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = [0u8; 1024];
    let n = stream.read(&mut response).await.unwrap();
    assert!(
        String::from_utf8_lossy(&response[..n]).starts_with("HTTP/1.1 101"),
        "upgraded"
    );
    // A masked binary frame of 2,000,000 bytes: its header, then most of its payload.
    let mut header = vec![0x82, 0xFF];
    header.extend_from_slice(&2_000_000u64.to_be_bytes());
    header.extend_from_slice(&[1, 2, 3, 4]);
    let _ = stream.write_all(&header).await;
    let chunk = vec![0u8; 16 * 1024];
    for _ in 0..100 {
        if stream.write_all(&chunk).await.is_err() {
            break;
        }
    }
    assert!(
        tcp_closed(&mut stream, Duration::from_secs(5)).await,
        "cut long before its join deadline"
    );
    let mut member = join(&server, "r", 0, None).await;
    member.data_acked(serde_json::json!("in")).await;
    server.stop().await;
}

/// A member (a read-only token for a prefix would do, or anyone on a relay without keys) joins
/// and leaves a new room again and again. Each room stays open a while after its last member
/// left, so the relay soon held `--max-rooms` of them, and refused every room not open yet,
/// for everyone, with "the relay is full". An address may open so many rooms a minute: past
/// that its joins of new rooms are closed with 1013, and others open theirs.
#[tokio::test]
async fn one_address_joining_new_rooms_cannot_fill_the_relay() {
    use pattern_mesh_client::Connection;
    use pattern_mesh_core::wire::close;
    let server = start("room-opens", |c| {
        c.max_rooms = 50;
        c.ip_room_opens = 20;
    })
    .await;
    let mut refused = None;
    for i in 0..60 {
        let join = Frame::Join {
            room: format!("churn-{i}"),
            name: "churn".into(),
            since: 0,
            log: 0,
            resume: None,
            config: None,
            floor: false,
        };
        let mut conn = Connection::open(&server.url(), &join).await.unwrap();
        match conn.recv_within(WAIT).await {
            Ok(_) => conn.close().await,
            Err(ClientError::Closed { code, reason }) => {
                refused = Some((i, code, reason));
                break;
            }
            Err(e) => panic!("{e}"),
        }
    }
    let (i, code, reason) = refused.expect("a join of a new room was refused");
    // The 20 at once, and one more every 3 s: a slow machine may open one or two more.
    assert!((20..30).contains(&i), "refused at the join of room {i}");
    assert_eq!(code, close::TRY_AGAIN_LATER, "{reason}");
    assert!(reason.contains("rooms in the last minute"), "{reason}");
    // A room already open costs nothing to join.
    let mut again = join(&server, "churn-0", 0, None).await;
    again.data_acked(serde_json::json!("in")).await;
    server.stop().await;
}

/// A member starts a frame and never finishes it, on every socket its address may open. The
/// WebSocket holds each frame's bytes until it ends (up to twice the frame limit), and no budget
/// counted them: a few addresses made the relay hold gigabytes. They count now with the parts
/// of large messages (`--max-partial-bytes`, a quarter of it per address): a connection that
/// takes either over is closed with 1013 and a reason, and what it held is given back.
#[tokio::test]
async fn members_that_start_frames_and_never_finish_them_are_held_to_the_partial_bound() {
    use pattern_mesh_core::wire::close;
    use tokio_tungstenite::MaybeTlsStream;

    let server = start("unfinished-frames", |c| {
        c.limits.max_frame = 128 * 1024;
        c.limits.max_message = 256 * 1024;
        // An address may hold 256 KiB.
        c.max_partial_bytes = 1024 * 1024;
    })
    .await;
    let mut held = Vec::new();
    let mut refusals = Vec::new();
    for _ in 0..5 {
        let (conn, _) = join_asking(&server.url(), "r", None).await.unwrap();
        let mut socket = conn.into_socket();
        let MaybeTlsStream::Plain(tcp) = socket.get_mut() else {
            unreachable!("a plain socket")
        };
        // A masked binary frame of 120,000 bytes: its header and 100,000 of them.
        let mut start = vec![0x82, 0xFF];
        start.extend_from_slice(&120_000u64.to_be_bytes());
        start.extend_from_slice(&[0, 0, 0, 0]);
        start.extend_from_slice(&[0u8; 100_000]);
        tcp.write_all(&start).await.unwrap();
        // What the relay says within a moment: nothing, or a close.
        let said = tokio::time::timeout(Duration::from_millis(500), async {
            loop {
                match socket.next().await {
                    Some(Ok(tokio_tungstenite::tungstenite::Message::Close(Some(close)))) => {
                        return Some((u16::from(close.code), close.reason.to_string()));
                    }
                    Some(Ok(_)) => continue,
                    _ => return None,
                }
            }
        })
        .await;
        match said {
            Ok(Some(close)) => refusals.push(close),
            Ok(None) => panic!("the socket ended without a close"),
            Err(_) => held.push(socket),
        }
    }
    assert_eq!(held.len(), 2, "two frames fit the address's bound, no more");
    assert_eq!(refusals.len(), 3);
    for (code, reason) in &refusals {
        assert_eq!(*code, close::TRY_AGAIN_LATER, "{reason}");
        assert!(reason.contains("still arriving"), "{reason}");
    }
    let holding = gauge(&server, "pattern_mesh_unframed_bytes").await;
    assert!(
        (200_000..=262_144).contains(&holding),
        "the relay counts what the two held: {holding}"
    );
    drop(held);
    let deadline = tokio::time::Instant::now() + WAIT;
    while gauge(&server, "pattern_mesh_unframed_bytes").await != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "what they held is given back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut member = join(&server, "r", 0, None).await;
    member.data_acked(serde_json::json!("in")).await;
    server.stop().await;
}
