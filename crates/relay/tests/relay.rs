//! The relay, end to end: a real server on 127.0.0.1:0, real WebSocket clients.
#![cfg(not(target_arch = "wasm32"))]

use std::path::PathBuf;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use pattern_mesh::envelope::{Frame, Json, Limits, Positioned, Reason, ResumeToken, Stamp};
use pattern_mesh::pattern::PatternConfig;
use pattern_mesh::relay::{serve, RelayConfig};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

const WAIT: Duration = Duration::from_secs(10);

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "pattern-mesh-test-{name}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

struct Server {
    addr: std::net::SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn start(name: &str, tweak: impl FnOnce(&mut RelayConfig)) -> Server {
    let mut config = RelayConfig {
        data_dir: temp_dir(name),
        ..RelayConfig::default()
    };
    tweak(&mut config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let done = tokio::spawn(serve(listener, config, async move {
        let _ = stopped.await;
    }));
    Server {
        addr,
        stop: Some(stop),
        done,
    }
}

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

struct Client {
    ws: Socket,
    node: u64,
    token: ResumeToken,
    local: u64,
    pattern: PatternConfig,
    /// The last log position received.
    position: u64,
}

/// What a join returned: the client, and the frames replayed before `caughtUp`.
async fn join(
    addr: std::net::SocketAddr,
    room: &str,
    since: u64,
    resume: Option<ResumeToken>,
) -> (Client, Vec<Positioned>) {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
        .await
        .unwrap();
    let join = Frame::Join {
        room: room.into(),
        name: "test".into(),
        since,
        resume,
        config: None,
    };
    ws.send(Message::Binary(join.encode().into()))
        .await
        .unwrap();
    let mut client = Client {
        ws,
        node: 0,
        token: [0; 16],
        local: 0,
        pattern: PatternConfig::default(),
        position: since,
    };
    let Frame::Welcome {
        node,
        resume,
        high,
        config,
        ..
    } = client.recv().await.frame
    else {
        panic!("the first frame is a welcome");
    };
    client.node = node;
    client.token = resume;
    client.local = high;
    client.pattern = PatternConfig::new(config.pattern).unwrap();
    let mut replay = Vec::new();
    loop {
        let frame = client.recv().await;
        if let Frame::CaughtUp { .. } = frame.frame {
            break;
        }
        replay.push(frame);
    }
    (client, replay)
}

impl Client {
    async fn recv(&mut self) -> Positioned {
        loop {
            let message = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("a frame within the wait")
                .expect("the socket is open")
                .expect("no socket error");
            if let Message::Binary(bytes) = message {
                let positioned = Frame::decode_positioned(&bytes, &Limits::default()).unwrap();
                if let Some(position) = positioned.position {
                    self.position = self.position.max(position);
                }
                if let Some(stamp) = positioned.frame.stamp() {
                    self.local = self.local.max(stamp.step);
                }
                return positioned;
            }
            if let Message::Close(frame) = message {
                panic!("closed: {frame:?}");
            }
        }
    }

    /// Receives frames until one matches, returning the ones skipped too.
    async fn recv_until(&mut self, mut done: impl FnMut(&Frame) -> bool) -> (Frame, Vec<Frame>) {
        let mut skipped = Vec::new();
        loop {
            let frame = self.recv().await.frame;
            if done(&frame) {
                return (frame, skipped);
            }
            skipped.push(frame);
        }
    }

    fn stamp(&mut self) -> Stamp {
        self.local += 1;
        Stamp {
            sender: self.node,
            step: self.local,
            pattern: self.pattern.value(self.local),
        }
    }

    async fn send_frame(&mut self, frame: &Frame) {
        self.ws
            .send(Message::Binary(frame.encode().into()))
            .await
            .unwrap();
    }

    /// Sends a data frame and returns its step.
    async fn data(&mut self, value: serde_json::Value) -> u64 {
        let stamp = self.stamp();
        let frame = Frame::Data {
            stamp,
            data: Json::from_value(&value).unwrap(),
        };
        self.send_frame(&frame).await;
        stamp.step
    }

    /// Sends a data frame and waits for its ack; returns (step, position).
    async fn data_acked(&mut self, value: serde_json::Value) -> (u64, u64) {
        let step = self.data(value).await;
        let (ack, _) = self
            .recv_until(|f| matches!(f, Frame::Ack { .. } | Frame::Reject { .. }))
            .await;
        match ack {
            Frame::Ack {
                step: acked,
                position,
            } => {
                assert_eq!(acked, step);
                (step, position)
            }
            other => panic!("expected an ack, got {other:?}"),
        }
    }

    async fn expect_reject(&mut self, reason: Reason) -> String {
        let (frame, _) = self
            .recv_until(|f| matches!(f, Frame::Reject { .. } | Frame::Ack { .. }))
            .await;
        match frame {
            Frame::Reject {
                reason: got,
                detail,
                ..
            } => {
                assert_eq!(got, reason, "{detail}");
                detail
            }
            other => panic!("expected a {reason} reject, got {other:?}"),
        }
    }

    /// Asserts that no data frame arrives within `within`.
    async fn expect_no_data(&mut self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        while let Ok(Some(Ok(message))) = tokio::time::timeout_at(deadline, self.ws.next()).await {
            if let Message::Binary(bytes) = message {
                let frame = Frame::decode_positioned(&bytes, &Limits::default())
                    .unwrap()
                    .frame;
                assert!(frame.stamp().is_none(), "unexpected {frame:?}");
            }
        }
    }

    /// Reads until the server closes; returns the close code and reason.
    async fn closed(&mut self) -> (CloseCode, String) {
        loop {
            match tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("closed within the wait")
            {
                Some(Ok(Message::Close(Some(frame)))) => {
                    return (frame.code, frame.reason.to_string())
                }
                Some(Ok(_)) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    }
}

/// Opens a raw connection, sends `first`, and returns the close frame the relay answers with.
async fn closed_after(
    addr: std::net::SocketAddr,
    first: &Frame,
) -> tokio_tungstenite::tungstenite::protocol::CloseFrame {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
        .await
        .unwrap();
    ws.send(Message::Binary(first.encode().into()))
        .await
        .unwrap();
    let message = tokio::time::timeout(WAIT, ws.next())
        .await
        .expect("an answer within the wait")
        .expect("a message")
        .expect("no socket error");
    let Message::Close(Some(close)) = message else {
        panic!("expected a close, got {message:?}")
    };
    close
}

fn data_value(frame: &Frame) -> Option<serde_json::Value> {
    match frame {
        Frame::Data { data, .. } => Some(data.to_value().unwrap()),
        _ => None,
    }
}

#[tokio::test]
async fn fan_out_reaches_every_member_of_the_room_and_no_other() {
    let server = start("fanout", |_| {}).await;
    let (mut a, _) = join(server.addr, "room-1", 0, None).await;
    let (mut b, _) = join(server.addr, "room-1", 0, None).await;
    let (mut c, _) = join(server.addr, "room-1", 0, None).await;
    let (mut d, _) = join(server.addr, "room-2", 0, None).await;
    assert_ne!(a.node, b.node);
    a.data_acked(serde_json::json!({ "temperature": 23.5 }))
        .await;
    for member in [&mut b, &mut c] {
        let (frame, _) = member.recv_until(|f| matches!(f, Frame::Data { .. })).await;
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
    let (mut a, _) = join(server.addr, "doc", 0, None).await;
    for i in 0..5 {
        a.data_acked(serde_json::json!(i)).await;
    }
    let (mut late, replay) = join(server.addr, "doc", 0, None).await;
    let values: Vec<_> = replay.iter().filter_map(|p| data_value(&p.frame)).collect();
    assert_eq!(
        values,
        (0..5).map(|i| serde_json::json!(i)).collect::<Vec<_>>()
    );
    assert_eq!(
        late.local, 5,
        "the welcome's high step fast-forwards the clock"
    );
    a.data_acked(serde_json::json!("live")).await;
    let (frame, _) = late.recv_until(|f| matches!(f, Frame::Data { .. })).await;
    assert_eq!(data_value(&frame), Some(serde_json::json!("live")));
}

#[tokio::test]
async fn a_reconnecting_client_receives_exactly_what_came_after_its_position() {
    let server = start("reconnect", |_| {}).await;
    let (mut a, _) = join(server.addr, "doc", 0, None).await;
    let (mut b, _) = join(server.addr, "doc", 0, None).await;
    for i in 0..3 {
        a.data_acked(serde_json::json!(i)).await;
        b.recv_until(|f| matches!(f, Frame::Data { .. })).await;
    }
    let (since, token, node) = (b.position, b.token, b.node);
    drop(b);
    for i in 3..5 {
        a.data_acked(serde_json::json!(i)).await;
    }
    let (b, replay) = join(server.addr, "doc", since, Some(token)).await;
    assert_eq!(b.node, node, "the resume token keeps the node id");
    let values: Vec<_> = replay.iter().filter_map(|p| data_value(&p.frame)).collect();
    assert_eq!(values, [serde_json::json!(3), serde_json::json!(4)]);
}

#[tokio::test]
async fn invalid_frames_are_rejected_with_their_reason_and_reach_no_one() {
    let server = start("reject", |_| {}).await;
    let (mut a, _) = join(server.addr, "r", 0, None).await;
    let (mut b, _) = join(server.addr, "r", 0, None).await;
    let good = a.data_acked(serde_json::json!("first")).await;
    b.recv_until(|f| matches!(f, Frame::Data { .. })).await;

    let mut forged = a.stamp();
    forged.sender = b.node;
    a.send_frame(&Frame::Data {
        stamp: forged,
        data: Json::parse("1").unwrap(),
    })
    .await;
    assert!(a
        .expect_reject(Reason::SenderMismatch)
        .await
        .contains("is not this connection's node id"));

    let mut wrong = a.stamp();
    wrong.pattern += 1;
    a.send_frame(&Frame::Data {
        stamp: wrong,
        data: Json::parse("2").unwrap(),
    })
    .await;
    a.expect_reject(Reason::PatternMismatch).await;

    let replay = Stamp {
        sender: a.node,
        step: good.0,
        pattern: a.pattern.value(good.0),
    };
    a.send_frame(&Frame::Data {
        stamp: replay,
        data: Json::parse("3").unwrap(),
    })
    .await;
    a.expect_reject(Reason::Replay).await;

    let far = a.local + 10_000;
    let future = Stamp {
        sender: a.node,
        step: far,
        pattern: a.pattern.value(far),
    };
    a.send_frame(&Frame::Data {
        stamp: future,
        data: Json::parse("4").unwrap(),
    })
    .await;
    a.expect_reject(Reason::FutureStep).await;

    a.data_acked(serde_json::json!("valid")).await;
    let (frame, skipped) = b.recv_until(|f| matches!(f, Frame::Data { .. })).await;
    assert_eq!(
        data_value(&frame),
        Some(serde_json::json!("valid")),
        "no rejected frame reached b"
    );
    assert!(skipped.iter().all(|f| f.stamp().is_none()));
}

#[tokio::test]
async fn garbage_and_oversized_frames_get_errors_while_the_relay_serves_others() {
    let server = start("garbage", |c| c.limits.max_frame = 4_096).await;
    let (mut a, _) = join(server.addr, "r", 0, None).await;
    let (mut b, _) = join(server.addr, "r", 0, None).await;
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
        a.ws.send(Message::Binary(bytes.into())).await.unwrap();
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
            ),
            "{reason}"
        );
    }
    let big = a.stamp();
    let oversized = Frame::Update {
        stamp: big,
        doc: "d".into(),
        update: vec![0; 5_000],
    };
    a.send_frame(&oversized).await;
    let detail = a.expect_reject(Reason::TooLarge).await;
    assert!(detail.contains("over the limit of 4096"), "{detail}");
    a.ws.send(Message::Text("hello".into())).await.unwrap();
    a.expect_reject(Reason::Malformed).await;

    a.data_acked(serde_json::json!("still serving")).await;
    let (frame, _) = b.recv_until(|f| matches!(f, Frame::Data { .. })).await;
    assert_eq!(data_value(&frame), Some(serde_json::json!("still serving")));
}

#[tokio::test]
async fn the_first_frame_must_be_a_join() {
    let server = start("nojoin", |_| {}).await;
    let close = closed_after(server.addr, &Frame::PeerLeft { node: 1 }).await;
    assert_eq!(close.code, CloseCode::Policy);
    assert!(close.reason.contains("must be a join"), "{}", close.reason);
}

#[tokio::test]
async fn a_slow_consumer_is_cut_off_while_the_others_keep_their_pace() {
    let server = start("slow", |c| {
        c.send_queue = 8;
        c.max_rate = 100_000;
    })
    .await;
    let (mut a, _) = join(server.addr, "r", 0, None).await;
    let (mut b, _) = join(server.addr, "r", 0, None).await;
    let (mut slow, _) = join(server.addr, "r", 0, None).await;
    // b reads everything as it comes; `slow` reads nothing until the end.
    let reader = tokio::spawn(async move {
        let mut got = 0;
        while got < 400 {
            if let Frame::Data { .. } = b.recv().await.frame {
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
    assert_eq!(code, CloseCode::from(4000));
    assert!(reason.contains("send queue full"), "{reason}");
}

#[tokio::test]
async fn graceful_shutdown_closes_clients_with_1001() {
    let mut server = start("shutdown", |_| {}).await;
    let (mut a, _) = join(server.addr, "r", 0, None).await;
    a.data_acked(serde_json::json!(1)).await;
    server.stop.take().unwrap().send(()).unwrap();
    let (code, reason) = a.closed().await;
    assert_eq!(code, CloseCode::Away);
    assert!(reason.contains("shutting down"), "{reason}");
    tokio::time::timeout(WAIT, server.done)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn health_and_metrics_answer_over_http() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = start("http", |_| {}).await;
    let (mut a, _) = join(server.addr, "r", 0, None).await;
    a.data_acked(serde_json::json!(1)).await;
    let get = |path: &'static str| async move {
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    };
    assert!(get("/healthz").await.ends_with("ok"));
    let metrics = get("/metrics").await;
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
async fn a_snapshot_compacts_the_log_and_late_joiners_get_it_plus_the_rest() {
    let server = start("snapshot", |_| {}).await;
    let (mut a, _) = join(server.addr, "doc", 0, None).await;
    let update = |stamp, byte: u8| Frame::Update {
        stamp,
        doc: "content".into(),
        update: vec![byte],
    };
    for byte in 1..=3 {
        let stamp = a.stamp();
        a.send_frame(&update(stamp, byte)).await;
        a.recv_until(|f| matches!(f, Frame::Ack { .. })).await;
    }
    a.data_acked(serde_json::json!("kept: not part of the document"))
        .await;
    let stamp = a.stamp();
    a.send_frame(&Frame::Snapshot {
        stamp,
        doc: "content".into(),
        state: vec![1, 2, 3],
    })
    .await;
    a.recv_until(|f| matches!(f, Frame::Ack { .. })).await;
    let stamp = a.stamp();
    a.send_frame(&update(stamp, 4)).await;
    a.recv_until(|f| matches!(f, Frame::Ack { .. })).await;

    let (_late, replay) = join(server.addr, "doc", 0, None).await;
    let kinds: Vec<_> = replay
        .iter()
        .map(|p| match &p.frame {
            Frame::Update { update, .. } => format!("update {update:?}"),
            Frame::Snapshot { state, .. } => format!("snapshot {state:?}"),
            Frame::Data { .. } => "data".into(),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(kinds, ["data", "snapshot [1, 2, 3]", "update [4]"]);
}

#[tokio::test]
async fn a_whole_document_snapshot_compacts_every_text_but_not_data() {
    let server = start("snapshot-all", |_| {}).await;
    let (mut a, _) = join(server.addr, "doc", 0, None).await;
    for (doc, byte) in [("title", 1u8), ("content", 2)] {
        let stamp = a.stamp();
        a.send_frame(&Frame::Update {
            stamp,
            doc: doc.into(),
            update: vec![byte],
        })
        .await;
        a.recv_until(|f| matches!(f, Frame::Ack { .. })).await;
    }
    a.data_acked(serde_json::json!("data stays")).await;
    let stamp = a.stamp();
    a.send_frame(&Frame::Snapshot {
        stamp,
        doc: "*".into(),
        state: vec![9],
    })
    .await;
    a.recv_until(|f| matches!(f, Frame::Ack { .. })).await;
    let (_late, replay) = join(server.addr, "doc", 0, None).await;
    let kinds: Vec<_> = replay
        .iter()
        .map(|p| format!("{:?}", p.frame.kind()))
        .collect();
    assert_eq!(kinds, ["Data", "Snapshot"]);
}

#[tokio::test]
async fn a_full_room_refuses_another_member_with_1013() {
    let server = start("members", |c| c.max_members = 2).await;
    let (_a, _) = join(server.addr, "r", 0, None).await;
    let (_b, _) = join(server.addr, "r", 0, None).await;
    let join_frame = Frame::Join {
        room: "r".into(),
        name: "c".into(),
        since: 0,
        resume: None,
        config: None,
    };
    let close = closed_after(server.addr, &join_frame).await;
    assert_eq!(close.code, CloseCode::Again);
    assert!(
        close.reason.contains("at most 2 members"),
        "{}",
        close.reason
    );
    // Another room still has room.
    join(server.addr, "other", 0, None).await;
}

#[tokio::test]
async fn a_sender_over_its_rate_gets_rate_limited_rejects() {
    let server = start("rate", |c| c.max_rate = 20).await;
    let (mut a, _) = join(server.addr, "r", 0, None).await;
    for i in 0..40 {
        a.data(serde_json::json!(i)).await;
    }
    let (mut acks, mut limited) = (0, 0);
    while acks + limited < 40 {
        match a.recv().await.frame {
            Frame::Ack { .. } => acks += 1,
            Frame::Reject {
                reason: Reason::RateLimited,
                ..
            } => limited += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        (18..=22).contains(&acks),
        "a burst of about 20 passes, got {acks}"
    );
    assert_eq!(acks + limited, 40);
}

#[tokio::test]
async fn presence_is_fanned_out_but_never_stored() {
    let server = start("presence", |_| {}).await;
    let (mut a, _) = join(server.addr, "r", 0, None).await;
    let (mut b, _) = join(server.addr, "r", 0, None).await;
    let presence = Frame::Presence {
        sender: a.node,
        data: Json::parse(r#"{"cursor":4}"#).unwrap(),
    };
    a.send_frame(&presence).await;
    let (frame, _) = b.recv_until(|f| matches!(f, Frame::Presence { .. })).await;
    assert_eq!(frame, presence);
    let (_late, replay) = join(server.addr, "r", 0, None).await;
    assert!(replay.is_empty(), "presence is not in the log: {replay:?}");
}
