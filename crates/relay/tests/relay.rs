//! The relay, end to end: a real server on 127.0.0.1:0, real WebSocket connections joined with
//! the native client's raw [`pattern_mesh_client::Connection`].

mod common;

use std::time::Duration;

use common::{
    closed_after, data_value, edit, http_get, is_data, join, join_log, replayed_text, start,
    start_in, temp_dir, Server, WAIT,
};
use pattern_mesh_core::doc::SharedDoc;
use pattern_mesh_core::wire::{close, Body, Frame, Json, Positioned, Reason, Stamp};

#[tokio::test]
async fn fan_out_reaches_every_member_of_the_room_and_no_other() {
    let server = start("fanout", |_| {}).await;
    let mut a = join(&server, "room-1", 0, None).await;
    let mut b = join(&server, "room-1", 0, None).await;
    let mut c = join(&server, "room-1", 0, None).await;
    let mut d = join(&server, "room-2", 0, None).await;
    assert_ne!(a.node, b.node);
    a.data_acked(serde_json::json!({ "temperature": 23.5 }))
        .await;
    for member in [&mut b, &mut c] {
        let (frame, _) = member.recv_until(is_data).await;
        assert_eq!(
            data_value(&frame),
            Some(serde_json::json!({ "temperature": 23.5 }))
        );
        assert_eq!(frame.stamp().unwrap().sender, a.node);
    }
    d.expect_no_data(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn a_late_joiner_receives_the_whole_log_then_live_traffic() {
    let server = start("late", |_| {}).await;
    let mut a = join(&server, "doc", 0, None).await;
    for i in 0..5 {
        a.data_acked(serde_json::json!(i)).await;
    }
    let mut late = join(&server, "doc", 0, None).await;
    let values: Vec<_> = late
        .replay()
        .iter()
        .filter_map(|p| data_value(&p.frame))
        .collect();
    assert_eq!(
        values,
        (0..5).map(|i| serde_json::json!(i)).collect::<Vec<_>>()
    );
    assert_eq!(
        late.local, 5,
        "the welcome's high step fast-forwards the clock"
    );
    a.data_acked(serde_json::json!("live")).await;
    let (frame, _) = late.recv_until(is_data).await;
    assert_eq!(data_value(&frame), Some(serde_json::json!("live")));
}

#[tokio::test]
async fn a_reconnecting_client_receives_exactly_what_came_after_its_position() {
    let server = start("reconnect", |_| {}).await;
    let mut a = join(&server, "doc", 0, None).await;
    let mut b = join(&server, "doc", 0, None).await;
    for i in 0..3 {
        a.data_acked(serde_json::json!(i)).await;
        b.recv_until(is_data).await;
    }
    let (since, token, node, log) = (b.position, b.token, b.node, b.welcome.log);
    drop(b);
    for i in 3..5 {
        a.data_acked(serde_json::json!(i)).await;
    }
    let b = join_log(&server, "doc", since, log, Some(token)).await;
    assert_eq!(b.node, node, "the resume token keeps the node id");
    let values: Vec<_> = b
        .replay()
        .iter()
        .filter_map(|p| data_value(&p.frame))
        .collect();
    assert_eq!(values, [serde_json::json!(3), serde_json::json!(4)]);
    // A position in another log (a relay that lost its store) counts for nothing: the whole
    // log comes.
    let c = join_log(&server, "doc", since, log + 1, None).await;
    assert_eq!(c.replay().len(), 5);
}

fn data(stamp: Stamp, text: &str) -> Frame {
    Frame::stamped(
        stamp,
        Body::Data {
            data: Json::parse(text).unwrap(),
        },
    )
}

#[tokio::test]
async fn invalid_frames_are_rejected_with_their_reason_and_reach_no_one() {
    let server = start("reject", |_| {}).await;
    let mut a = join(&server, "r", 0, None).await;
    let mut b = join(&server, "r", 0, None).await;
    let good = a.data_acked(serde_json::json!("first")).await;
    b.recv_until(is_data).await;

    let mut forged = a.stamp();
    forged.sender = b.node;
    a.send(&data(forged, "1")).await;
    assert!(a
        .expect_reject(Reason::SenderMismatch)
        .await
        .contains("is not this connection's node id"));
    // Every refusal but a replay opens a gap until the client's fence.
    a.fence().await;

    let mut wrong = a.stamp();
    wrong.pattern += 1;
    a.send(&data(wrong, "2")).await;
    a.expect_reject(Reason::PatternMismatch).await;
    a.fence().await;

    let replay = Stamp {
        sender: a.node,
        step: good.0,
        pattern: a.pattern.value(good.0),
    };
    a.send(&data(replay, "3")).await;
    a.expect_reject(Reason::Replay).await;

    let far = a.local + 10_000;
    let future = Stamp {
        sender: a.node,
        step: far,
        pattern: a.pattern.value(far),
    };
    a.send(&data(future, "4")).await;
    a.expect_reject(Reason::FutureStep).await;
    a.fence().await;

    a.data_acked(serde_json::json!("valid")).await;
    let (frame, skipped) = b.recv_until(is_data).await;
    assert_eq!(
        data_value(&frame),
        Some(serde_json::json!("valid")),
        "no rejected frame reached b"
    );
    assert!(skipped.iter().all(|f| f.stamp().is_none()));
}

#[tokio::test]
async fn after_a_refusal_nothing_of_the_connection_is_stored_until_its_fence() {
    let server = start("gap", |_| {}).await;
    let mut a = join(&server, "r", 0, None).await;
    let mut wrong = a.stamp();
    wrong.pattern += 1;
    a.send(&data(wrong, "1")).await;
    let step = a.data(serde_json::json!("after the refusal")).await;
    a.expect_reject(Reason::PatternMismatch).await;
    let detail = a.expect_reject(Reason::OutOfOrder).await;
    assert!(detail.contains("send a fence"), "{detail}");
    a.fence().await;
    // The same message, sent again with its stamp after the fence, is stored.
    let again = Stamp {
        sender: a.node,
        step,
        pattern: a.pattern.value(step),
    };
    a.send(&data(again, r#""after the refusal""#)).await;
    a.expect_ack(step).await;
}

#[tokio::test]
async fn garbage_and_oversized_frames_get_errors_while_the_relay_serves_others() {
    let server = start("garbage", |c| {
        c.limits.max_frame = 4_096;
        c.limits.max_message = 8_192;
    })
    .await;
    let mut a = join(&server, "r", 0, None).await;
    let mut b = join(&server, "r", 0, None).await;
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..10 {
        let bytes: Vec<u8> = (0..64)
            .map(|_| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng as u8
            })
            .collect();
        a.send_bytes(bytes).await;
        let (frame, _) = a.recv_until(|f| matches!(f, Frame::Reject { .. })).await;
        let Frame::Reject { reason, .. } = frame else {
            unreachable!()
        };
        assert!(
            matches!(
                reason,
                Reason::Malformed
                    | Reason::TooLarge
                    | Reason::Unexpected
                    | Reason::SenderMismatch
                    | Reason::PatternMismatch
                    | Reason::Replay
                    | Reason::FutureStep
                    | Reason::OutOfOrder
            ),
            "{reason}"
        );
    }
    a.fence().await;
    // Over the message limit, even in parts.
    let stamp = a.stamp();
    let oversized = Frame::stamped(
        stamp,
        Body::Update {
            doc: "d".into(),
            update: vec![0; 10_000],
        },
    );
    a.send(&oversized).await;
    let detail = a.expect_reject(Reason::TooLarge).await;
    assert!(detail.contains("over the limit of 8192"), "{detail}");
    a.conn.send_text("hello").await.unwrap();
    a.expect_reject(Reason::Malformed).await;
    a.fence().await;

    a.data_acked(serde_json::json!("still serving")).await;
    let (frame, _) = b.recv_until(is_data).await;
    assert_eq!(data_value(&frame), Some(serde_json::json!("still serving")));
}

#[tokio::test]
async fn a_message_larger_than_a_frame_travels_in_parts_and_is_stored_whole() {
    let server = start("parts", |c| c.limits.max_frame = 4_096).await;
    let mut a = join(&server, "r", 0, None).await;
    let mut b = join(&server, "r", 0, None).await;
    let big = serde_json::json!({ "text": "x".repeat(50_000) });
    a.data_acked(big.clone()).await;
    let (frame, _) = b.recv_until(is_data).await;
    assert_eq!(data_value(&frame), Some(big.clone()));
    let late = join(&server, "r", 0, None).await;
    assert_eq!(data_value(&late.replay()[0].frame), Some(big));
}

#[tokio::test]
async fn the_first_frame_must_be_a_join() {
    let server = start("nojoin", |_| {}).await;
    let (code, reason) = closed_after(&server, &Frame::PeerLeft { node: 1 }).await;
    assert_eq!(code, close::POLICY);
    assert!(reason.contains("must be a join"), "{reason}");
}

#[tokio::test]
async fn a_slow_consumer_is_cut_off_while_the_others_keep_their_pace() {
    let server = start("slow", |c| {
        c.send_queue = 8;
        c.max_rate = 100_000;
    })
    .await;
    let mut a = join(&server, "r", 0, None).await;
    let mut b = join(&server, "r", 0, None).await;
    let mut slow = join(&server, "r", 0, None).await;
    // b reads everything as it comes; `slow` reads nothing until the end.
    let reader = tokio::spawn(async move {
        let mut got = 0;
        while got < 400 {
            if is_data(&b.recv().await.frame) {
                got += 1;
            }
        }
        got
    });
    let payload = "x".repeat(60_000);
    // The room's pace: one message at a time, each acknowledged before the next.
    for i in 0..400 {
        a.data_acked(serde_json::json!({ "i": i, "pad": payload }))
            .await;
    }
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(60), reader)
            .await
            .unwrap()
            .unwrap(),
        400
    );
    let (code, reason) = slow.closed().await;
    assert_eq!(code, close::SLOW_CONSUMER);
    assert!(reason.contains("send queue full"), "{reason}");
}

#[tokio::test]
async fn graceful_shutdown_closes_clients_with_1001() {
    let mut server = start("shutdown", |_| {}).await;
    let mut a = join(&server, "r", 0, None).await;
    a.data_acked(serde_json::json!(1)).await;
    server.stop.take().unwrap().send(()).unwrap();
    let (code, reason) = a.closed().await;
    assert_eq!(code, close::GOING_AWAY);
    assert!(reason.contains("shutting down"), "{reason}");
    tokio::time::timeout(WAIT, server.done)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn health_and_metrics_answer_over_http() {
    let server = start("http", |_| {}).await;
    let mut a = join(&server, "r", 0, None).await;
    a.data_acked(serde_json::json!(1)).await;
    assert!(http_get(server.addr, "/healthz").await.ends_with("ok"));
    let metrics = http_get(server.addr, "/metrics").await;
    assert!(metrics.contains("pattern_mesh_connections 1"), "{metrics}");
    assert!(
        metrics.contains("pattern_mesh_frames_accepted_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("pattern_mesh_frames_rejected_total{reason=\"replay\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("pattern_mesh_store_commit_seconds_count"),
        "{metrics}"
    );
}

#[tokio::test]
async fn the_relay_compacts_the_log_and_late_joiners_get_its_snapshot_plus_the_rest() {
    let server = start("compact", |c| c.compact_updates = 4).await;
    let mut a = join(&server, "doc", 0, None).await;
    a.data_acked(serde_json::json!("kept: not part of the document"))
        .await;
    let writer = SharedDoc::with_client_id(11);
    for i in 0..6 {
        a.acked(edit(&writer, i, "x")).await;
    }
    let late = join(&server, "doc", 0, None).await;
    let kinds: Vec<_> = late
        .replay()
        .iter()
        .map(|p| p.frame.kind().as_str())
        .collect();
    assert_eq!(kinds, ["data", "snapshot", "update", "update"]);
    assert_eq!(replayed_text(late.replay()), "xxxxxx");
}

#[tokio::test]
async fn checkpoints_and_sync_answers_are_forwarded_but_never_stored() {
    let server = start("ephemeral", |_| {}).await;
    let mut a = join(&server, "doc", 0, None).await;
    let mut b = join(&server, "doc", 0, None).await;
    let mut c = join(&server, "doc", 0, None).await;
    let stamp = a.stamp();
    a.send(&Frame::stamped(
        stamp,
        Body::Checkpoint {
            doc: "*".into(),
            state_vector: vec![0],
            deletes: 1,
            digest: 2,
        },
    ))
    .await;
    // A sync answer to b alone.
    let stamp = a.stamp();
    a.send(&Frame::stamped(
        stamp,
        Body::SyncState {
            doc: "*".into(),
            update: vec![0, 0],
            to: b.node,
        },
    ))
    .await;
    let (checkpoint, _) = b.recv_until(|f| f.kind().as_str() == "checkpoint").await;
    assert!(checkpoint.stamp().is_some());
    b.recv_until(|f| f.kind().as_str() == "syncState").await;
    let (first, _) = c.recv_until(|f| f.stamp().is_some()).await;
    assert_eq!(first.kind().as_str(), "checkpoint");
    c.expect_no_data(Duration::from_millis(300)).await;
    let late = join(&server, "doc", 0, None).await;
    assert!(late.replay().is_empty(), "{:?}", late.replay());
}

/// A tab that wrote, then sent a signal (which no store keeps), closes; the relay lets its node
/// go, and the room retires. The tab comes back with its token and asks for the welcome's
/// floor: it gets the signal's step. With the store's last stored step alone it got no floor,
/// and a tab restored from storage (whose clock starts up to 100 steps ahead) went further
/// ahead of the room with each reopening, until all it sent was refused as `futureStep`.
#[tokio::test]
async fn a_node_let_go_is_welcomed_back_with_the_last_step_it_sent() {
    let server = start("released", |c| c.resume_grace = Duration::ZERO).await;
    let mut a = join(&server, "r", 0, None).await;
    a.data_acked(serde_json::json!("stored")).await;
    a.local += 300;
    let stamp = a.stamp();
    let signal = Frame::stamped(
        stamp,
        Body::Signal {
            data: Json::parse("1").unwrap(),
        },
    );
    a.send(&signal).await;
    a.fence().await;
    let (node, token) = (a.node, a.token);
    drop(a);
    let deadline = tokio::time::Instant::now() + WAIT;
    while !http_get(server.addr, "/metrics")
        .await
        .contains("pattern_mesh_rooms 0")
    {
        assert!(tokio::time::Instant::now() < deadline, "the room retires");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let back = Frame::Join {
        room: "r".into(),
        name: "test".into(),
        since: 1,
        log: 0,
        resume: Some(token),
        config: None,
        floor: true,
    };
    let mut conn = pattern_mesh_client::Connection::open(&server.url(), &back)
        .await
        .unwrap();
    match conn.recv_within(WAIT).await.unwrap().frame {
        Frame::Welcome {
            node: again, floor, ..
        } => {
            assert_eq!(again, node, "the store's record resumes the node");
            assert_eq!(floor, Some(stamp.step));
        }
        other => panic!("{other:?}"),
    }
}

/// A relay told to stop (SIGTERM) closes its connections with 1001 and stops once its rooms
/// have finished their writes. A room kept the nodes that had left for their resume grace (a
/// minute) and could not retire, so every stop waited out the relay's ten-second deadline
/// (a rolling restart, ten seconds a relay). A stopping room lets its nodes go at once.
#[tokio::test]
async fn a_relay_told_to_stop_stops_once_its_rooms_are_done() {
    let dir = temp_dir("stop-release");
    let server = start_in(dir.to_path_buf(), |_| {}).await;
    let mut a = join(&server, "r", 0, None).await;
    a.data_acked(serde_json::json!("stored")).await;
    let mut b = join(&server, "r", 0, None).await;
    drop(a);
    let Server {
        stop: Some(stop),
        done,
        ..
    } = server
    else {
        unreachable!("a running relay")
    };
    let _ = stop.send(());
    let (code, _) = b.conn.closed(WAIT).await.unwrap();
    assert_eq!(code, close::GOING_AWAY);
    drop(b);
    // Well within the relay's ten-second deadline.
    tokio::time::timeout(Duration::from_secs(5), done)
        .await
        .expect("the relay stops once its rooms are done")
        .unwrap()
        .unwrap();
    // What was stored is there for the next relay.
    let server = start_in(dir.to_path_buf(), |_| {}).await;
    let late = join(&server, "r", 0, None).await;
    assert_eq!(
        late.replay().iter().filter(|p| is_data(&p.frame)).count(),
        1
    );
    server.stop().await;
}

#[tokio::test]
async fn a_full_room_refuses_another_member_with_1013() {
    let server = start("members", |c| c.max_members = 2).await;
    let _a = join(&server, "r", 0, None).await;
    let _b = join(&server, "r", 0, None).await;
    let join_frame = Frame::Join {
        room: "r".into(),
        name: "c".into(),
        since: 0,
        log: 0,
        resume: None,
        config: None,
        floor: false,
    };
    let (code, reason) = closed_after(&server, &join_frame).await;
    assert_eq!(code, close::TRY_AGAIN_LATER);
    assert!(reason.contains("at most 2 members"), "{reason}");
    // Another room still has room.
    join(&server, "other", 0, None).await;
}

#[tokio::test]
async fn a_sender_over_its_rate_is_refused_and_nothing_after_is_stored_until_its_fence() {
    let server = start("rate", |c| c.max_rate = 20).await;
    let mut a = join(&server, "r", 0, None).await;
    let mut steps = Vec::new();
    for i in 0..40 {
        steps.push(a.data(serde_json::json!(i)).await);
    }
    let (mut acks, mut limited, mut out_of_order) = (0, 0, 0);
    while acks + limited + out_of_order < 40 {
        match a.recv().await.frame {
            Frame::Ack { .. } => acks += 1,
            Frame::Reject {
                reason: Reason::RateLimited,
                ..
            } => limited += 1,
            Frame::Reject {
                reason: Reason::OutOfOrder,
                ..
            } => out_of_order += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        (18..=22).contains(&acks),
        "a burst of about 20 passes, got {acks}"
    );
    assert_eq!(limited, 1, "one refusal for the rate, then a gap");
    // Fenced, the refused messages go through with the stamps they had.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    a.fence().await;
    let from = steps[acks];
    let again = Stamp {
        sender: a.node,
        step: from,
        pattern: a.pattern.value(from),
    };
    a.send(&data(again, "\"again\"")).await;
    a.expect_ack(from).await;
}

#[tokio::test]
async fn presence_is_fanned_out_held_for_late_joiners_and_never_stored() {
    let server = start("presence", |_| {}).await;
    let mut a = join(&server, "r", 0, None).await;
    let mut b = join(&server, "r", 0, None).await;
    let presence = Frame::Presence {
        sender: a.node,
        data: Json::parse(r#"{"cursor":4}"#).unwrap(),
    };
    a.send(&presence).await;
    let (frame, _) = b.recv_until(|f| matches!(f, Frame::Presence { .. })).await;
    assert_eq!(frame, presence);
    let late = join(&server, "r", 0, None).await;
    // The late joiner gets it after its welcome, outside the log (no position).
    assert_eq!(
        late.replay(),
        [Positioned {
            position: None,
            frame: presence
        }],
        "presence is held in memory, not in the log"
    );
    drop(a);
    let (left, _) = b.recv_until(|f| matches!(f, Frame::PeerLeft { .. })).await;
    assert!(matches!(left, Frame::PeerLeft { .. }));
    let later = join(&server, "r", 0, None).await;
    assert!(later.replay().is_empty(), "{:?}", later.replay());
}

#[tokio::test]
async fn a_connection_that_keeps_sending_over_its_rate_is_closed_with_4001() {
    let server = start("over-rate", |c| c.max_rate = 20).await;
    let mut a = join(&server, "r", 0, None).await;
    // A burst over the rate, refused in one go: a client that then stops is not closed...
    for i in 0..200 {
        a.data(serde_json::json!(i)).await;
    }
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    // ... but one that goes on sending a second later, never fencing, does not listen.
    for i in 0..41 {
        a.data(serde_json::json!(i)).await;
    }
    let (code, reason) = a.closed().await;
    assert_eq!(code, close::RATE_LIMITED);
    assert!(reason.contains("without a fence"), "{reason}");
}

/// A late joiner that reads slowly: its catch-up is still being read from the store, a page at
/// a time, when a snapshot becomes durable and the store drops every update before it. What
/// the joiner had not read yet is gone from the log, so it must get the snapshot instead, or
/// its document misses those updates for good (and holds back everything after them).
#[tokio::test]
async fn a_joiner_still_reading_its_catch_up_when_the_log_is_compacted_misses_nothing() {
    const EACH: usize = 100_000;
    let server = start("catch-up-compacted", |c| {
        c.compact_updates = 150;
        c.compact_bytes = 1 << 40;
        c.bandwidth = 1 << 30;
    })
    .await;
    let mut writer = join(&server, "doc", 0, None).await;
    let doc = SharedDoc::with_client_id(7);
    // Each update replaces the whole text, so the document stays small while the log grows.
    let replace = |step: u64| {
        let len = doc.len("content");
        let mut update = vec![doc.delete("content", 0, len).unwrap()];
        let text = char::from(b'a' + (step % 26) as u8)
            .to_string()
            .repeat(EACH);
        update.push(doc.insert("content", 0, &text).unwrap());
        let update = pattern_mesh_core::doc::merge_updates(
            &update.iter().map(Vec::as_slice).collect::<Vec<_>>(),
        )
        .unwrap();
        Body::Update {
            doc: "content".into(),
            update,
        }
    };
    // 12 MB of log: more than the sockets between the relay and a joiner that does not read
    // can hold.
    for step in 1..=120 {
        writer.acked(replace(step)).await;
    }
    let join = Frame::Join {
        room: "doc".into(),
        name: "slow".into(),
        since: 0,
        log: 0,
        resume: None,
        config: None,
        floor: false,
    };
    let mut slow = pattern_mesh_client::Connection::open(&server.url(), &join)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The 150th update calls for a snapshot while the joiner's catch-up waits on its socket.
    for step in 121..=160 {
        writer.acked(replace(step)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let replica = SharedDoc::new();
    let mut caught_up = false;
    loop {
        let positioned = match slow.recv_within(Duration::from_secs(3)).await {
            Ok(positioned) => positioned,
            // Everything arrived a while ago.
            Err(_) if caught_up => break,
            Err(e) => panic!("the catch-up stalled: {e}"),
        };
        match positioned.frame {
            Frame::Stamped(stamped) => {
                if let Body::Update { update, .. } = stamped.body {
                    replica.apply_update(&update).unwrap();
                }
            }
            Frame::Snapshot { state, .. } => replica.apply_update(&state).unwrap(),
            Frame::CaughtUp { .. } => caught_up = true,
            _ => {}
        }
        if caught_up && replica.text("content") == doc.text("content") && !replica.has_pending() {
            break;
        }
    }
    assert!(
        !replica.has_pending(),
        "updates are held back for want of earlier ones"
    );
    assert_eq!(replica.text("content"), doc.text("content"));
    server.stop().await;
}
