//! What real users hit, against the real relay with the native client (the same session the
//! browser drives): large pastes and messages, typing faster than the rate limit, typing
//! offline, a relay that forgot the node, a relay that is not there, and real editing traces
//! with checkpoints on the way. Each of these lost or held edits before the session was sans-IO.

mod common;

use std::io::Read;
use std::time::{Duration, Instant};

use common::{http_get, session, start, Proxy};
use pattern_mesh_client::{Client, ClientError};
use pattern_mesh_core::session::{Event, Source, Status};
use pattern_mesh_core::wire::{Json, Reason};

const TEXT: &str = "content";

/// Waits until `done` holds, checking every 20 ms, for at most `wait`.
async fn until(what: &str, wait: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + wait;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn pastes_of_1_2_mib_and_20_mb_reach_the_other_client_and_a_late_joiner() {
    let server = start("paste", |_| {}).await;
    let a = Client::connect(&server.url(), session("paste", "a"))
        .await
        .unwrap();
    let b = Client::connect(&server.url(), session("paste", "b"))
        .await
        .unwrap();
    let medium = "m".repeat(1_258_291); // 1.2 MiB
    a.insert(TEXT, 0, &medium).unwrap();
    until("the 1.2 MiB paste", Duration::from_secs(30), || {
        b.text(TEXT).len() == medium.len()
    })
    .await;
    // Later edits of the pasting client are not held back by it.
    a.insert(TEXT, 0, "after").unwrap();
    until("the edit after the paste", Duration::from_secs(10), || {
        b.text(TEXT).starts_with("after")
    })
    .await;
    let large = "L".repeat(20_000_000);
    b.insert(TEXT, 0, &large).unwrap();
    until("the 20 MB paste", Duration::from_secs(60), || {
        a.text(TEXT).len() == large.len() + medium.len() + 5
    })
    .await;
    a.settled(Duration::from_secs(30)).await.unwrap();
    b.settled(Duration::from_secs(30)).await.unwrap();
    let late = Client::connect(&server.url(), session("paste", "late"))
        .await
        .unwrap();
    assert_eq!(late.text(TEXT), a.text(TEXT));
}

/// A message larger than a member's send queue holds in bytes (a paste of 20 MB against the
/// default 16 MiB) goes out to each member in parts, queued all at once: the queue refused the
/// part that took it over its bound, and the relay cut every other member off as slow. They
/// reconnected and read the paste from the log, so it arrived late, and every time. A queue
/// that lets in a message's first part now lets in the rest of it.
#[tokio::test]
async fn a_message_larger_than_the_send_queue_reaches_every_member_without_cutting_it_off() {
    let server = start("queue-message", |c| c.send_queue_bytes = 256 << 10).await;
    let a = Client::connect(&server.url(), session("queue", "a"))
        .await
        .unwrap();
    let b = Client::connect(&server.url(), session("queue", "b"))
        .await
        .unwrap();
    let paste = "p".repeat(3 << 20);
    b.insert(TEXT, 0, &paste).unwrap();
    // A busy room: what follows the paste on every member's queue does not cut it off either.
    for i in 0..20 {
        b.insert(TEXT, i, "k").unwrap();
    }
    until("the paste", Duration::from_secs(30), || {
        a.text(TEXT).len() == paste.len() + 20
    })
    .await;
    b.settled(Duration::from_secs(30)).await.unwrap();
    let late = Client::connect(&server.url(), session("queue", "late"))
        .await
        .unwrap();
    assert_eq!(late.text(TEXT).len(), paste.len() + 20);
    let metrics = http_get(server.addr, "/metrics").await;
    assert!(
        metrics.contains("pattern_mesh_slow_consumers_total 0"),
        "a member was cut off as slow: {}",
        metrics
            .lines()
            .find(|l| l.starts_with("pattern_mesh_slow_consumers_total"))
            .unwrap_or("no such metric")
    );
}

/// A paste of megabytes on a slow uplink takes longer to go out than a client waits for an
/// answer to its heartbeat, which waits behind the paste's parts on the link (a 20 MB paste
/// below about 5 Mbit/s, with the default 15 s heartbeat). The client took the connection for
/// dead, reconnected and sent the paste again, from its start, and again: it never arrived.
/// While parts come in, the relay sends a heartbeat now and then. (Frames of 64 KiB and a
/// heartbeat of 2 s stand for 1 MiB and 15 s, to keep the test short.)
#[tokio::test]
async fn a_paste_that_takes_longer_to_upload_than_a_heartbeat_arrives() {
    let server = start("slow-uplink", |c| c.limits.max_frame = 64 << 10).await;
    let proxy = Proxy::start_throttled(server.addr, 128 << 10).await;
    let mut config = session("slow", "a");
    config.heartbeat = 2_000;
    let mut a = Client::connect(&proxy.url(), config).await.unwrap();
    let b = Client::connect(&server.url(), session("slow", "b"))
        .await
        .unwrap();
    // About 12 s at 128 KiB/s, past a heartbeat and its answer's wait (4 s).
    let paste = "s".repeat(1_500_000);
    a.insert(TEXT, 0, &paste).unwrap();
    until("the paste", Duration::from_secs(60), || {
        b.text(TEXT).len() == paste.len()
    })
    .await;
    let reconnects: Vec<Event> = a
        .take_events()
        .into_iter()
        .filter(|e| {
            matches!(
                e,
                Event::Status {
                    status: Status::Reconnecting,
                    ..
                }
            )
        })
        .collect();
    assert!(reconnects.is_empty(), "{reconnects:?}");
}

#[tokio::test]
async fn a_2_mib_broadcast_is_delivered_once() {
    let server = start("broadcast", |_| {}).await;
    let a = Client::connect(&server.url(), session("big", "a"))
        .await
        .unwrap();
    let mut b = Client::connect(&server.url(), session("big", "b"))
        .await
        .unwrap();
    let value = serde_json::json!({ "blob": "x".repeat(2 << 20) });
    a.broadcast(Json::from_value(&value).unwrap()).unwrap();
    let events = b
        .events_until(Duration::from_secs(30), |e| {
            matches!(e, Event::Message { .. })
        })
        .await
        .unwrap();
    let Some(Event::Message { data, .. }) = events.last() else {
        unreachable!()
    };
    assert_eq!(data.to_value::<serde_json::Value>().unwrap(), value);
    a.settled(Duration::from_secs(10)).await.unwrap();
    assert_eq!(a.status(), Status::Open, "no reconnect loop");
}

#[tokio::test]
async fn connect_rejects_with_the_reason_when_the_relay_is_not_there() {
    // A port nothing listens on.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let mut config = session("nobody", "a");
    config.connect_timeout = 1_500;
    let started = Instant::now();
    let result = Client::connect(&format!("ws://{addr}/ws"), config.clone()).await;
    let Err(ClientError::Closed { reason, .. }) = result else {
        panic!("expected a refusal, got {:?}", result.map(|_| ()));
    };
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(reason.contains("could not join within 1500 ms"), "{reason}");
    assert!(reason.contains("could not connect"), "{reason}");
    // A wrong path on a real relay: refused by the HTTP server.
    let server = start("wrong-path", |_| {}).await;
    let result = Client::connect(&format!("ws://{}/nope", server.addr), config.clone()).await;
    assert!(matches!(result, Err(ClientError::Closed { .. })));
    // A host that does not resolve.
    let result = Client::connect("ws://no-such-host.invalid:9/ws", config).await;
    assert!(matches!(result, Err(ClientError::Closed { .. })));
}

#[tokio::test]
async fn two_clients_typing_2000_characters_as_fast_as_they_can_converge() {
    let server = start("typing", |_| {}).await;
    let a = Client::connect(&server.url(), session("typing", "a"))
        .await
        .unwrap();
    let b = Client::connect(&server.url(), session("typing", "b"))
        .await
        .unwrap();
    for i in 0..2_000u32 {
        a.insert(TEXT, i, "a").unwrap();
        let len = b.text(TEXT).encode_utf16().count() as u32;
        b.insert(TEXT, len, "b").unwrap();
    }
    a.settled(Duration::from_secs(30)).await.unwrap();
    b.settled(Duration::from_secs(30)).await.unwrap();
    until("convergence", Duration::from_secs(30), || {
        a.text(TEXT) == b.text(TEXT)
    })
    .await;
    let text = a.text(TEXT);
    assert_eq!(text.matches('a').count(), 2_000);
    assert_eq!(text.matches('b').count(), 2_000);
}

#[tokio::test]
async fn typing_offline_is_delivered_within_seconds_of_coming_back() {
    let server = start("offline", |_| {}).await;
    let proxy = Proxy::start(server.addr).await;
    let a = Client::connect(&proxy.url(), session("offline", "a"))
        .await
        .unwrap();
    let b = Client::connect(&server.url(), session("offline", "b"))
        .await
        .unwrap();
    a.insert(TEXT, 0, "online ").unwrap();
    until("the first edit", Duration::from_secs(10), || {
        b.text(TEXT) == "online "
    })
    .await;
    proxy.set_down(true);
    until("a to notice", Duration::from_secs(10), || {
        a.status() != Status::Open
    })
    .await;
    // 400 characters at 20 a second, offline.
    for i in 0..400u32 {
        a.insert(TEXT, 7 + i, "x").unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(b.text(TEXT), "online ", "nothing passed while offline");
    proxy.set_down(false);
    let back = Instant::now();
    until("the offline typing", Duration::from_secs(20), || {
        b.text(TEXT).len() == 407
    })
    .await;
    println!(
        "400 characters typed offline reached the other client {:?} after the network came back",
        back.elapsed()
    );
    a.settled(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test]
async fn a_relay_that_forgot_the_node_still_gets_everything_it_had_not_stored() {
    let first = start("forget-1", |_| {}).await;
    let proxy = Proxy::start(first.addr).await;
    let mut a = Client::connect(&proxy.url(), session("forget", "a"))
        .await
        .unwrap();
    a.insert(TEXT, 0, "stored ").unwrap();
    a.settled(Duration::from_secs(10)).await.unwrap();
    proxy.set_down(true);
    for (i, c) in "typed while away".chars().enumerate() {
        a.insert(TEXT, 7 + i as u32, &c.to_string()).unwrap();
    }
    // Another relay on an empty store takes over the address: it knows neither the room's
    // history nor the node's token.
    first.stop().await;
    let second = start("forget-2", |_| {}).await;
    // Someone else is there first: the node id `a` had is another member's now.
    let _other = Client::connect(&second.url(), session("forget", "other"))
        .await
        .unwrap();
    proxy.retarget(second.addr);
    proxy.set_down(false);
    a.settled(Duration::from_secs(20)).await.unwrap();
    let refused: Vec<Event> = a
        .take_events()
        .into_iter()
        .filter(|e| matches!(e, Event::Refused { .. }))
        .collect();
    assert!(refused.is_empty(), "{refused:?}");
    let b = Client::connect(&second.url(), session("forget", "b"))
        .await
        .unwrap();
    until("the edits made while away", Duration::from_secs(10), || {
        b.text(TEXT).ends_with("typed while away")
    })
    .await;
}

#[derive(serde::Deserialize)]
struct Trace {
    txns: Vec<Txn>,
}

#[derive(serde::Deserialize)]
struct Txn {
    patches: Vec<(u32, u32, String)>,
}

#[tokio::test]
async fn a_real_editing_trace_through_the_relay_raises_no_desync() {
    let path = format!(
        "{}/../../tests/data/editing-traces/automerge-paper.json.gz",
        env!("CARGO_MANIFEST_DIR")
    );
    let mut json = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open(&path).unwrap())
        .read_to_string(&mut json)
        .unwrap();
    let trace: Trace = serde_json::from_str(&json).unwrap();
    let server = start("trace", |_| {}).await;
    let mut a = Client::connect(&server.url(), session("trace", "a"))
        .await
        .unwrap();
    let mut b = Client::connect(&server.url(), session("trace", "b"))
        .await
        .unwrap();
    // The author replays the trace; the other client adds a line at the start now and then,
    // so both publish checkpoints while deletes are in flight.
    for (i, txn) in trace.txns.iter().take(40_000).enumerate() {
        a.with_session(|s, now| {
            let patches: Vec<(u32, u32, &str)> = txn
                .patches
                .iter()
                .map(|(p, d, t)| (*p, *d, t.as_str()))
                .collect();
            let update = s.replica().splice_all(TEXT, &patches).unwrap();
            s.update(now, TEXT, update).unwrap();
        });
        if i % 2_000 == 0 {
            let end = b.text(TEXT).encode_utf16().count() as u32;
            b.insert(TEXT, end, "\n(b)").unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    a.settled(Duration::from_secs(60)).await.unwrap();
    b.settled(Duration::from_secs(60)).await.unwrap();
    until("convergence", Duration::from_secs(30), || {
        a.text(TEXT) == b.text(TEXT)
    })
    .await;
    for client in [&mut a, &mut b] {
        let desyncs: Vec<Event> = client
            .take_events()
            .into_iter()
            .filter(|e| {
                matches!(e, Event::Anomaly(x) if x.reason == Reason::Desync || x.source == Source::Local)
            })
            .collect();
        assert!(desyncs.is_empty(), "{desyncs:?}");
    }
}

/// A network that goes away without closing the socket (a laptop that sleeps, a NAT that
/// forgets the connection): neither end hears of it. The client gives the silent connection up
/// a heartbeat's time after a heartbeat went unanswered, says why, and reconnects; the edit it made meanwhile
/// arrives. Without heartbeats it sat in flight, status `open`, until TCP gave up.
#[tokio::test]
async fn an_edit_made_on_a_connection_gone_silent_arrives_after_the_client_gives_it_up() {
    let server = start("silent", |_| {}).await;
    let proxy = Proxy::start(server.addr).await;
    let mut config = session("silent", "a");
    config.heartbeat = 500;
    let mut a = Client::connect(&proxy.url(), config).await.unwrap();
    let b = Client::connect(&server.url(), session("silent", "b"))
        .await
        .unwrap();
    a.insert(TEXT, 0, "before ").unwrap();
    until("the first edit", Duration::from_secs(10), || {
        b.text(TEXT) == "before "
    })
    .await;
    a.take_events();
    proxy.freeze();
    let frozen = Instant::now();
    a.insert(TEXT, 7, "after").unwrap();
    let events = a
        .events_until(Duration::from_secs(10), |e| {
            matches!(
                e,
                Event::Status {
                    status: Status::Reconnecting,
                    ..
                }
            )
        })
        .await
        .unwrap();
    let Some(Event::Status {
        reason: Some(reason),
        ..
    }) = events.last()
    else {
        panic!("a reconnecting status with a reason: {events:?}");
    };
    assert!(reason.contains("nothing came from the relay"), "{reason}");
    until(
        "the edit made on the silent connection",
        Duration::from_secs(10),
        || b.text(TEXT) == "before after",
    )
    .await;
    println!(
        "the edit made on a silent connection arrived {:?} after the network went silent",
        frozen.elapsed()
    );
    a.settled(Duration::from_secs(10)).await.unwrap();
}

/// A late joiner of a real-time room (a game session, with a stale window) catches up from the
/// log, whose edits and inputs were stamped long before the room's step now: the document's
/// edits are applied (they were dropped as `stale`: with no other member there to answer its
/// sync request, the late joiner never saw the text written since the last compaction), and the
/// inputs the room took in time are history, not anomalies.
#[tokio::test]
async fn a_late_joiner_of_a_game_room_gets_the_document_and_no_stale_anomalies() {
    let server = start("late-joiner", |_| {}).await;
    let game = pattern_mesh_core::wire::RoomConfig {
        stale_window: Some(40),
        ..Default::default()
    };
    let mut config = session("late-joiner", "a");
    config.room_config = Some(game);
    let a = Client::connect(&server.url(), config).await.unwrap();
    a.insert(TEXT, 0, "the rules of the game").unwrap();
    for i in 0..100 {
        a.broadcast(Json::parse(i.to_string()).unwrap()).unwrap();
    }
    a.settled(Duration::from_secs(30)).await.unwrap();
    // Gone: no member is left to answer the late joiner's sync request.
    a.close().await;
    let mut config = session("late-joiner", "c");
    config.room_config = Some(game);
    let mut c = Client::connect(&server.url(), config).await.unwrap();
    until("the document", Duration::from_secs(10), || {
        c.text(TEXT) == "the rules of the game"
    })
    .await;
    c.settled(Duration::from_secs(10)).await.unwrap();
    let events = c.take_events();
    let anomalies: Vec<&Event> = events
        .iter()
        .filter(|e| matches!(e, Event::Anomaly(_)))
        .collect();
    assert!(
        anomalies.is_empty(),
        "{} anomalies, the first {:?}",
        anomalies.len(),
        anomalies.first()
    );
    let inputs = events
        .iter()
        .filter(|e| matches!(e, Event::Message { .. }))
        .count();
    assert_eq!(inputs, 100, "the inputs, as history");
}

/// An insert just within the relay's message limit, whose update (the text and its header) is
/// over it: the client refuses it before the document takes it. It used to change the
/// document, then fail to send: the tab showed text no one else would see, and the relay
/// refused every later edit of the tab (a gap in its clocks).
#[tokio::test]
async fn an_insert_whose_update_is_over_the_limit_leaves_the_document_as_it_was() {
    let server = start("over-limit", |c| c.limits.max_message = 64 << 10).await;
    let a = Client::connect(&server.url(), session("over-limit", "a"))
        .await
        .unwrap();
    let b = Client::connect(&server.url(), session("over-limit", "b"))
        .await
        .unwrap();
    let max = a.with_session(|s, _| s.max_payload());
    for len in [max, max - 40, max + 1] {
        let error = a.insert(TEXT, 0, &"x".repeat(len)).unwrap_err();
        assert!(error.to_string().contains("over"), "{len}: {error}");
        assert_eq!(
            a.text(TEXT).len(),
            0,
            "an insert of {len} bytes changed the document"
        );
    }
    a.insert(TEXT, 0, "after").unwrap();
    a.settled(Duration::from_secs(10)).await.unwrap();
    until("the next edit", Duration::from_secs(10), || {
        b.text(TEXT) == "after"
    })
    .await;
}

/// A deletion's edit is one range per run of clocks it deletes: in a text a member wrote at both
/// ends in turn, deleting half of it deletes every other clock, 1,000 ranges, an edit over a
/// relay's 2 KiB message limit however short the text. The document took it, and the edit
/// could not go: the tab showed a deletion no one else saw. It goes in pieces, and arrives.
#[tokio::test]
async fn a_deletion_whose_edit_is_over_the_message_limit_reaches_the_room() {
    let server = start("large-delete", |c| c.limits.max_message = 2 << 10).await;
    let a = Client::connect(&server.url(), session("large-delete", "a"))
        .await
        .unwrap();
    let b = Client::connect(&server.url(), session("large-delete", "b"))
        .await
        .unwrap();
    for i in 0..2_000 {
        let at = if i % 2 == 0 {
            0
        } else {
            a.text(TEXT).len() as u32
        };
        a.insert(TEXT, at, "x").unwrap();
    }
    a.settled(Duration::from_secs(30)).await.unwrap();
    until("the text", Duration::from_secs(10), || {
        b.text(TEXT).len() == 2_000
    })
    .await;
    a.delete(TEXT, 0, 1_000).unwrap();
    a.insert(TEXT, 0, "after ").unwrap();
    a.settled(Duration::from_secs(10)).await.unwrap();
    until(
        "the deletion and the edit after it",
        Duration::from_secs(10),
        || b.text(TEXT) == a.text(TEXT),
    )
    .await;
    assert_eq!(b.text(TEXT), format!("after {}", "x".repeat(1_000)));
}

/// In a real-time room (a game session, with a stale window), an edit sent on a connection that
/// went silent is sent again, with its stamp, once the client gives the connection up; by then the
/// room has moved on by more than the stale window. The relay refused it as `stale`, and every
/// later edit of that tab as one after a gap in its clocks: the tab kept typing into a document
/// no one else would ever see. A late edit is still an edit: it arrives, and so do the later ones.
#[tokio::test]
async fn an_edit_sent_again_after_the_game_room_moved_past_its_stale_window_arrives() {
    let server = start("late-edit", |_| {}).await;
    let proxy = Proxy::start(server.addr).await;
    let game = pattern_mesh_core::wire::RoomConfig {
        stale_window: Some(40),
        ..Default::default()
    };
    let mut config = session("late-edit", "a");
    config.room_config = Some(game);
    config.heartbeat = 500;
    let mut a = Client::connect(&proxy.url(), config).await.unwrap();
    let mut config = session("late-edit", "b");
    config.room_config = Some(game);
    let b = Client::connect(&server.url(), config).await.unwrap();
    a.insert(TEXT, 0, "before ").unwrap();
    until("the first edit", Duration::from_secs(10), || {
        b.text(TEXT) == "before "
    })
    .await;
    a.take_events();
    proxy.freeze();
    a.insert(TEXT, 7, "late").unwrap();
    // The others play on: the room's step passes the late edit's by more than the window.
    for i in 0..100 {
        b.broadcast(Json::parse(i.to_string()).unwrap()).unwrap();
    }
    b.settled(Duration::from_secs(30)).await.unwrap();
    a.events_until(Duration::from_secs(10), |e| {
        matches!(
            e,
            Event::Status {
                status: Status::Open,
                ..
            }
        )
    })
    .await
    .unwrap();
    a.insert(TEXT, 11, " and after").unwrap();
    a.settled(Duration::from_secs(30)).await.unwrap();
    let refused: Vec<Event> = a
        .take_events()
        .into_iter()
        .filter(|e| matches!(e, Event::Refused { .. }))
        .collect();
    assert!(refused.is_empty(), "{refused:?}");
    until(
        "the late edit and the next",
        Duration::from_secs(10),
        || b.text(TEXT) == "before late and after",
    )
    .await;
}

/// A member whose network went away without closing its socket is closed once the relay has
/// heard nothing from it for the idle timeout, and its peers see it leave; a member that sends
/// heartbeats stays.
#[tokio::test]
async fn the_relay_closes_a_member_it_hears_nothing_from_and_its_peers_see_it_leave() {
    use common::{join, join_at};
    use pattern_mesh_core::wire::Frame;
    let server = start("ghost", |c| c.idle_timeout = Duration::from_secs(2)).await;
    let proxy = Proxy::start(server.addr).await;
    let mut a = join(&server, "ghost", 0, None).await;
    let ghost = join_at(&proxy.url(), "ghost", 0, 0, None).await;
    a.recv_until(|f| matches!(f, Frame::PeerJoined { peer } if peer.node == ghost.node))
        .await;
    proxy.freeze();
    let frozen = Instant::now();
    // `a` keeps its own connection alive with a heartbeat every 300 ms.
    'waiting: loop {
        assert!(
            frozen.elapsed() < Duration::from_secs(10),
            "the silent member never left"
        );
        a.send(&Frame::Heartbeat).await;
        let beat = tokio::time::Instant::now() + Duration::from_millis(300);
        while let Ok(next) = tokio::time::timeout_at(beat, a.conn.recv()).await {
            match next.expect("a's connection stays open") {
                p if p.frame == (Frame::PeerLeft { node: ghost.node }) => break 'waiting,
                p => assert_eq!(p.frame, Frame::Heartbeat, "only answers come"),
            }
        }
    }
    let gone = frozen.elapsed();
    println!("the silent member left its peers' view {gone:?} after its network went silent");
}

/// A relay with a small frame limit (`--max-frame 1024`) and a room of 20 members with names of
/// 60 bytes: the welcome, which lists them all, is larger than a frame. It went whole, and a
/// client that knew the relay's frame limit from its first welcome could not read the next one:
/// after a dropped connection it tried to join again and again, without end. The welcome goes
/// in parts, as any message larger than a frame does.
#[tokio::test]
async fn a_welcome_larger_than_a_frame_comes_in_parts_and_the_client_joins_again() {
    use pattern_mesh_client::{Connection, JoinOptions};
    let server = start("welcome-parts", |c| c.limits.max_frame = 1_024).await;
    let mut members = Vec::new();
    for i in 0..20 {
        let options = JoinOptions {
            room: "doc".into(),
            name: format!("{i:02} {}", "m".repeat(57)),
            since: 0,
            log: 0,
            resume: None,
            config: None,
        };
        members.push(Connection::join(&server.url(), options).await.unwrap().0);
    }
    let client = Client::connect(&server.url(), session("doc", "late"))
        .await
        .unwrap();
    assert_eq!(client.with_session(|s, _| s.peers()).len(), 20);
    client.disconnect();
    assert_ne!(client.with_session(|s, _| s.status()), Status::Open);
    until("the client is open again", Duration::from_secs(15), || {
        client.with_session(|s, _| s.status()) == Status::Open
    })
    .await;
    client.insert("content", 0, "still here").unwrap();
    client.settled(Duration::from_secs(10)).await.unwrap();
    drop(members);
    server.stop().await;
}
