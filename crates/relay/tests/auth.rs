//! Who may read and write a room, against the real relay over real sockets: signed access
//! tokens checked at the join, read-only members, names bound to tokens, tokens that expire
//! during a connection, the `Origin` check and the metrics' bearer token.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{
    data_value, delete_every_b, edit, join_at, join_frame, raw_update, reader_refused,
    replayed_text, session, start, start_in, walks_too_far,
    writer_opens_and_reader_gets_its_settings, Server, WAIT,
};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use pattern_mesh_client::{Client, ClientError, Connection};
use pattern_mesh_core::session::Event;
use pattern_mesh_core::wire::{close, Body, Frame, Json, Reason, ResumeToken};
use pattern_mesh_relay::AuthKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SECRET: &str = "the relay's test secret, 32 bytes";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A token signed with `secret`.
fn signed(secret: &str, claims: serde_json::Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// A token for `room` with `access`, valid for ten minutes.
fn token(room: &str, access: &str) -> String {
    signed(
        SECRET,
        serde_json::json!({ "sub": "u1", "room": room, "access": access, "exp": now() + 600 }),
    )
}

async fn secured(name: &str) -> Server {
    start(name, |c| c.auth = Some(AuthKey::Secret(SECRET.into()))).await
}

fn with_token(server: &Server, token: &str) -> String {
    format!("{}?token={token}", server.url())
}

/// The close a join of `room` with `token` gets.
async fn refused(server: &Server, token: Option<&str>, room: &str) -> (u16, String) {
    let url = token.map_or(server.url(), |t| with_token(server, t));
    let mut conn = Connection::open(&url, &join_frame(room)).await.unwrap();
    close_of(conn.closed(WAIT).await)
}

/// The close code and reason a connection ended with.
fn close_of(closed: Result<(u16, String), ClientError>) -> (u16, String) {
    match closed {
        Ok(close) => close,
        Err(ClientError::Closed { code, reason }) => (code, reason),
        Err(e) => panic!("{e}"),
    }
}

fn data(text: &str) -> Body {
    Body::Data {
        data: Json::parse(text).unwrap(),
    }
}

#[tokio::test]
async fn a_join_without_a_valid_token_is_refused_with_a_reason_that_says_why() {
    let server = secured("auth-refused").await;
    let cases = [
        (
            None,
            "doc",
            close::FORBIDDEN,
            "this relay requires an access token (the token parameter of the URL)".to_owned(),
        ),
        (
            Some(token("other", "write")),
            "doc",
            close::FORBIDDEN,
            r#"the access token opens the room "other", not "doc""#.to_owned(),
        ),
        (
            Some(signed(
                SECRET,
                serde_json::json!({ "sub": "u1", "room": "doc", "access": "write", "exp": now() - 5 }),
            )),
            "doc",
            close::TOKEN_EXPIRED,
            "the access token expired".to_owned(),
        ),
        (
            Some(signed(
                "a forged secret of thirty-two by",
                serde_json::json!({ "sub": "u1", "room": "doc", "access": "write", "exp": now() + 600 }),
            )),
            "doc",
            close::FORBIDDEN,
            "the access token's signature is not valid".to_owned(),
        ),
        // Issued for later (`nbf`): it was taken at once.
        (
            Some(signed(
                SECRET,
                serde_json::json!({ "sub": "u1", "room": "doc", "access": "write", "exp": now() + 600, "nbf": now() + 300 }),
            )),
            "doc",
            close::FORBIDDEN,
            "the access token is not valid yet (its nbf claim)".to_owned(),
        ),
    ];
    for (token, room, code, reason) in cases {
        assert_eq!(
            refused(&server, token.as_deref(), room).await,
            (code, reason)
        );
    }
}

/// Issuers set `nbf` to the time they sign, on a clock that may run a little ahead of the
/// relay's: such a token is taken (refused, it would end the client for good).
#[tokio::test]
async fn a_token_whose_nbf_is_a_little_ahead_of_the_relays_clock_is_taken() {
    let server = secured("auth-nbf").await;
    let early = signed(
        SECRET,
        serde_json::json!({ "sub": "u1", "room": "doc", "access": "write", "exp": now() + 600, "nbf": now() + 5 }),
    );
    let mut member = join_at(&with_token(&server, &early), "doc", 0, 0, None).await;
    let stamp = member.stamp();
    member.send(&Frame::stamped(stamp, data("1"))).await;
    member.expect_ack(stamp.step).await;
    server.stop().await;
}

#[tokio::test]
async fn a_prefix_token_opens_every_room_under_the_prefix_and_no_other() {
    let server = secured("auth-prefix").await;
    let team = signed(
        SECRET,
        serde_json::json!({ "sub": "u1", "roomPrefix": "team-42/", "access": "write", "exp": now() + 600 }),
    );
    for room in ["team-42/a", "team-42/b/c"] {
        let mut member = join_at(&with_token(&server, &team), room, 0, 0, None).await;
        let stamp = member.stamp();
        member.send(&Frame::stamped(stamp, data("1"))).await;
        member.expect_ack(stamp.step).await;
    }
    for room in ["team-43/a", "team-42", "Team-42/a"] {
        let (code, reason) = refused(&server, Some(&team), room).await;
        assert_eq!(code, close::FORBIDDEN, "{room}: {reason}");
    }
}

#[tokio::test]
async fn a_prefix_that_ends_inside_a_name_or_is_empty_opens_no_room() {
    let server = secured("auth-prefix-boundary").await;
    // An issuer meaning team 42's rooms writes "team-42", and team 420's rooms would be open to
    // team 42; an empty prefix would open every room of the relay.
    for (prefix, room) in [
        ("team-42", "team-420/notes"),
        ("team-42", "team-42/notes"),
        ("", "anything"),
    ] {
        let token = signed(
            SECRET,
            serde_json::json!({ "sub": "u1", "roomPrefix": prefix, "access": "write", "exp": now() + 600 }),
        );
        let (code, reason) = refused(&server, Some(&token), room).await;
        assert_eq!(code, close::FORBIDDEN, "{prefix:?} {room}: {reason}");
        assert!(reason.contains("roomPrefix"), "{reason}");
    }
    // A prefix that ends with a separator of the issuer's choosing opens its rooms.
    for (prefix, room) in [("team-42:", "team-42:notes"), ("team-42-", "team-42-notes")] {
        let token = signed(
            SECRET,
            serde_json::json!({ "sub": "u1", "roomPrefix": prefix, "access": "write", "exp": now() + 600 }),
        );
        let mut member = join_at(&with_token(&server, &token), room, 0, 0, None).await;
        let stamp = member.stamp();
        member.send(&Frame::stamped(stamp, data("1"))).await;
        member.expect_ack(stamp.step).await;
    }
}

#[tokio::test]
async fn a_read_only_member_reads_the_history_and_live_edits_and_none_of_its_writes_is_stored_or_passed_on(
) {
    let server = secured("auth-read-only").await;
    let writer_url = with_token(&server, &token("doc", "write"));
    let mut writer = join_at(&writer_url, "doc", 0, 0, None).await;
    let stamp = writer.stamp();
    writer
        .send(&Frame::stamped(stamp, data(r#"{"secret":"launch codes"}"#)))
        .await;
    writer.expect_ack(stamp.step).await;

    let reader_url = with_token(&server, &token("doc", "read"));
    let mut reader = join_at(&reader_url, "doc", 0, 0, None).await;
    let history: Vec<_> = reader
        .replay()
        .iter()
        .filter_map(|p| data_value(&p.frame))
        .collect();
    assert_eq!(history, [serde_json::json!({ "secret": "launch codes" })]);

    // Live edits reach it.
    let stamp = writer.stamp();
    writer.send(&Frame::stamped(stamp, data("\"live\""))).await;
    writer.expect_ack(stamp.step).await;
    let (live, _) = reader.recv_until(|f| data_value(f).is_some()).await;
    assert_eq!(data_value(&live), Some(serde_json::json!("live")));

    // Its writes are refused, and never reach the others or the log.
    for body in [
        data("\"from the reader\""),
        Body::Update {
            doc: "content".into(),
            update: pattern_mesh_core::doc::SharedDoc::new()
                .insert("content", 0, "x")
                .unwrap(),
        },
    ] {
        let stamp = reader.stamp();
        reader.send(&Frame::stamped(stamp, body)).await;
        let detail = reader.expect_reject(Reason::Forbidden).await;
        assert!(detail.contains("lets it read only"), "{detail}");
        reader.send(&Frame::Fence { step: stamp.step }).await;
    }
    let stamp = writer.stamp();
    writer.send(&Frame::stamped(stamp, data("\"last\""))).await;
    let (_, before) = writer.recv_until(|f| matches!(f, Frame::Ack { .. })).await;
    assert!(
        before.iter().all(|f| data_value(f).is_none()),
        "nothing of the reader's reached the writer: {before:?}"
    );
    let late = join_at(&writer_url, "doc", 0, 0, None).await;
    let logged: Vec<_> = late
        .replay()
        .iter()
        .filter_map(|p| data_value(&p.frame))
        .collect();
    assert_eq!(
        logged,
        [
            serde_json::json!({ "secret": "launch codes" }),
            serde_json::json!("live"),
            serde_json::json!("last"),
        ]
    );
}

/// One user's token, a read-only one too, opened as many connections as the room has places:
/// every other member, reconnecting ones too, was then refused ("the room is full"). The
/// members of one user hold at most `--max-members-per-user` places; others still get in.
#[tokio::test]
async fn one_users_token_cannot_take_every_place_in_a_room() {
    let server = start("auth-per-user", |c| {
        c.auth = Some(AuthKey::Secret(SECRET.into()));
        c.max_members = 5;
        c.max_members_per_user = 3;
    })
    .await;
    let other = signed(
        SECRET,
        serde_json::json!({ "sub": "u2", "room": "doc", "access": "write", "exp": now() + 600 }),
    );
    // A writer opens the room (a read-only join opens none) and stays.
    let _opener = join_at(&with_token(&server, &other), "doc", 0, 0, None).await;
    let reader = token("doc", "read");
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(join_at(&with_token(&server, &reader), "doc", 0, 0, None).await);
    }
    let (code, reason) = refused(&server, Some(&reader), "doc").await;
    assert_eq!(code, close::TRY_AGAIN_LATER, "{reason}");
    assert!(reason.contains("in the room 3 times already"), "{reason}");
    let mut member = join_at(&with_token(&server, &other), "doc", 0, 0, None).await;
    let stamp = member.stamp();
    member.send(&Frame::stamped(stamp, data("1"))).await;
    member.expect_ack(stamp.step).await;
    drop(held);
}

#[tokio::test]
async fn the_display_name_comes_from_the_token_and_cannot_be_changed() {
    let server = secured("auth-name").await;
    let ada = signed(
        SECRET,
        serde_json::json!({ "sub": "u-ada", "name": "Ada", "room": "doc", "access": "write", "exp": now() + 600 }),
    );
    // `join_at` asks for the name "test"; the token's wins.
    let mut a = join_at(&with_token(&server, &ada), "doc", 0, 0, None).await;
    let b = join_at(
        &with_token(&server, &token("doc", "write")),
        "doc",
        0,
        0,
        None,
    )
    .await;
    let named: Vec<_> = b
        .welcome
        .peers
        .iter()
        .map(|p| (p.node, p.name.as_str()))
        .collect();
    assert_eq!(named, [(a.node, "Ada")]);
    a.send(&Frame::Rename {
        name: "Grace".into(),
    })
    .await;
    let detail = a.expect_reject(Reason::Forbidden).await;
    assert_eq!(detail, "this member's name comes from its access token");
}

/// A token valid at the upgrade, where the relay checks it, expires before the join arrives
/// (a slow network, a page put to sleep): the relay admitted it all the same, with the room's
/// whole history, and closed the connection only once it was in. It is refused with the
/// expired token's own code.
#[tokio::test]
async fn a_token_that_expires_before_its_join_arrives_is_refused() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let server = secured("auth-late-join").await;
    let soon = signed(
        SECRET,
        serde_json::json!({ "sub": "u1", "room": "doc", "access": "write", "exp": now() + 2 }),
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(with_token(&server, &soon))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(3_100)).await;
    socket
        .send(Message::Binary(join_frame("doc").encode().into()))
        .await
        .unwrap();
    let mut frames = 0;
    let close = tokio::time::timeout(WAIT, async {
        while let Some(message) = socket.next().await {
            match message {
                Ok(Message::Close(Some(frame))) => {
                    return (u16::from(frame.code), frame.reason.to_string())
                }
                Ok(Message::Close(None)) | Err(_) => return (0, String::new()),
                Ok(Message::Binary(_)) => frames += 1,
                Ok(_) => continue,
            }
        }
        (0, String::new())
    })
    .await
    .expect("closed within the wait");
    assert_eq!(
        close,
        (close::TOKEN_EXPIRED, "the access token expired".to_owned())
    );
    assert_eq!(frames, 0, "no welcome, no history");
    server.stop().await;
}

/// A token names its member with more than the 64 bytes a name may have (40 accented letters):
/// the relay put it as it was in every welcome and `peerJoined`, which no client decodes, so
/// while that member was in the room no one else could join or reconnect, and each client
/// tried again and again without a word. The name is cut at 64 bytes, between two characters.
#[tokio::test]
async fn a_token_name_longer_than_a_name_may_be_is_cut_and_locks_no_one_out() {
    let server = secured("auth-long-name").await;
    let long = signed(
        SECRET,
        serde_json::json!({ "sub": "u-long", "name": "é".repeat(40), "room": "doc", "access": "write", "exp": now() + 600 }),
    );
    let a = join_at(&with_token(&server, &long), "doc", 0, 0, None).await;
    let url = with_token(&server, &token("doc", "write"));
    let b = Client::connect(&url, session("doc", "b")).await.unwrap();
    let peers = b.with_session(|s, _| s.peers());
    let named: Vec<_> = peers.iter().map(|p| (p.node, p.name.clone())).collect();
    assert_eq!(named, [(a.node, "é".repeat(32))]);
    drop(a);
    server.stop().await;
}

/// A member whose token names it renames itself (`setName`). The relay refuses the rename as
/// `forbidden`, and the client took that for a read-only token: every edit in flight and every
/// later one left the outbox with a `refused` event that said "read only", and never reached
/// the room. The refusal is an anomaly now, and the member's edits, before and after it,
/// arrive.
#[tokio::test]
async fn a_refused_rename_costs_a_member_named_by_its_token_none_of_its_edits() {
    let server = secured("auth-rename-edits").await;
    let ada = signed(
        SECRET,
        serde_json::json!({ "sub": "u-ada", "name": "Ada", "room": "doc", "access": "write", "exp": now() + 600 }),
    );
    let mut a = Client::connect(&with_token(&server, &ada), session("doc", "ada"))
        .await
        .unwrap();
    let b = Client::connect(
        &with_token(&server, &token("doc", "write")),
        session("doc", "bo"),
    )
    .await
    .unwrap();
    a.insert("content", 0, "before ").unwrap();
    a.with_session(|s, now| s.set_name(now, "Grace")).unwrap();
    a.insert("content", 7, "after").unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while b.text("content") != "before after" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the other member has {:?}",
            b.text("content")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.settled(WAIT).await.unwrap();
    let events = a.take_events();
    assert!(
        !events.iter().any(|e| matches!(e, Event::Refused { .. })),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Anomaly(a) if a.reason == Reason::Forbidden)),
        "{events:?}"
    );
}

/// A member spends its frame budget, leaves and joins again without its resume token: a new
/// node, which started with full budgets, every time. A new node of a user (the token's
/// `sub`) starts from the budgets of the user's last node that left.
#[tokio::test]
async fn a_user_that_joins_again_as_a_new_node_keeps_its_spent_budget() {
    let server = start("auth-budget", |c| {
        c.auth = Some(AuthKey::Secret(SECRET.into()));
        c.max_rate = 50;
        c.ip_rate = 100_000;
    })
    .await;
    let url = with_token(&server, &token("doc", "write"));
    let mut a = join_at(&url, "doc", 0, 0, None).await;
    for i in 0..50 {
        a.data(serde_json::json!(i)).await;
    }
    for _ in 0..50 {
        a.recv_until(|f| matches!(f, Frame::Ack { .. })).await;
    }
    a.conn.close().await;
    let mut again = join_at(&url, "doc", 0, 0, None).await;
    assert_ne!(again.node, a.node, "a new node");
    // The budget refills (50 a second) while this runs: of 20 more messages, a node with the
    // spent budget has some refused, however slow the machine; a fresh node would have none.
    for i in 0..20 {
        again.data(serde_json::json!(i)).await;
    }
    let mut refusals = Vec::new();
    for _ in 0..20 {
        let (frame, _) = again
            .recv_until(|f| matches!(f, Frame::Ack { .. } | Frame::Reject { .. }))
            .await;
        if let Frame::Reject { reason, detail, .. } = frame {
            refusals.push((reason, detail));
        }
    }
    assert!(
        refusals
            .iter()
            .any(|(reason, detail)| *reason == Reason::RateLimited && detail.contains("per second")),
        "{refusals:?}"
    );
    // Another user's new node has its own budgets.
    let other = signed(
        SECRET,
        serde_json::json!({ "sub": "u-other", "room": "doc", "access": "write", "exp": now() + 600 }),
    );
    let mut b = join_at(&with_token(&server, &other), "doc", 0, 0, None).await;
    b.data_acked(serde_json::json!("fine")).await;
}

#[tokio::test]
async fn a_token_that_expires_during_the_connection_closes_it_with_its_own_code() {
    let server = secured("auth-expiry").await;
    let short = signed(
        SECRET,
        serde_json::json!({ "sub": "u1", "room": "doc", "access": "write", "exp": now() + 2 }),
    );
    let mut member = join_at(&with_token(&server, &short), "doc", 0, 0, None).await;
    let (code, reason) = close_of(member.conn.closed(Duration::from_secs(5)).await);
    assert_eq!(code, close::TOKEN_EXPIRED);
    assert_eq!(
        reason,
        "the access token expired; reconnect with a fresh one"
    );
}

#[tokio::test]
async fn with_an_ed25519_public_key_the_relay_admits_tokens_of_the_private_key_and_no_other() {
    let (pkcs8, pem) = common::ed25519::key_pair();
    let server = start("auth-ed25519", |c| c.auth = Some(AuthKey::Ed25519Pem(pem))).await;
    let claims =
        serde_json::json!({ "sub": "u1", "room": "doc", "access": "write", "exp": now() + 600 });
    let good = encode(
        &Header::new(Algorithm::EdDSA),
        &claims,
        &EncodingKey::from_ed_der(&pkcs8),
    )
    .unwrap();
    let mut member = join_at(&with_token(&server, &good), "doc", 0, 0, None).await;
    let stamp = member.stamp();
    member.send(&Frame::stamped(stamp, data("1"))).await;
    member.expect_ack(stamp.step).await;
    let hmac = signed(SECRET, claims);
    assert_eq!(
        refused(&server, Some(&hmac), "doc").await,
        (
            close::FORBIDDEN,
            "the access token is signed with another algorithm than this relay's".into()
        )
    );
}

/// The HTTP status line the relay answers a WebSocket upgrade (or any GET) with.
async fn status_of(server: &Server, path: &str, headers: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{headers}\r\n",
        server.addr
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = vec![0; 512];
    let n = tokio::time::timeout(WAIT, stream.read(&mut answer))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&answer[..n])
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn a_foreign_origin_is_refused_when_origins_are_set() {
    let server = start("auth-origin", |c| {
        c.allowed_origins = vec!["https://app.example".into()];
    })
    .await;
    assert_eq!(
        status_of(&server, "/ws", "Origin: https://evil.example\r\n").await,
        "HTTP/1.1 403 Forbidden"
    );
    assert_eq!(
        status_of(&server, "/ws", "").await,
        "HTTP/1.1 403 Forbidden",
        "no Origin header"
    );
    assert_eq!(
        status_of(&server, "/ws", "Origin: https://app.example\r\n").await,
        "HTTP/1.1 101 Switching Protocols"
    );
}

#[tokio::test]
async fn the_metrics_ask_for_their_bearer_token_when_one_is_set() {
    let server = start("auth-metrics", |c| {
        c.metrics_token = Some("m-secret".into())
    })
    .await;
    let get = |headers: &'static str| {
        let addr = server.addr;
        async move {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let request =
                format!("GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}\r\n");
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut answer = String::new();
            stream.read_to_string(&mut answer).await.unwrap();
            answer.lines().next().unwrap_or_default().to_owned()
        }
    };
    assert_eq!(get("").await, "HTTP/1.1 401 Unauthorized");
    assert_eq!(
        get("Authorization: Bearer wrong\r\n").await,
        "HTTP/1.1 401 Unauthorized"
    );
    assert_eq!(
        get("Authorization: Bearer m-secret\r\n").await,
        "HTTP/1.1 200 OK"
    );
}

/// The first join of a room gives it its settings for good. A read-only member that came
/// first chose them: a document room with a stale window of one step and `maxFuture` 1, in
/// which the writers' late edits were dropped and their clocks refused. Only a member that may
/// write opens a room; a read-only join of a room no writer opened waits (1013, with a reason)
/// and then gets the writer's settings.
#[tokio::test]
async fn a_read_only_member_cannot_choose_the_settings_of_a_room() {
    let server = secured("auth-read-only-config").await;
    let reader_url = with_token(&server, &token("doc", "read"));
    let (code, reason) = reader_refused(&reader_url).await;
    assert_eq!(code, close::TRY_AGAIN_LATER, "{reason}");
    assert!(reason.contains("may write"), "{reason}");
    // A reader's client waits, says why, and gets in once a writer opened the room.
    let waiting = tokio::spawn({
        let url = reader_url.clone();
        async move { Client::connect(&url, session("doc", "viewer")).await }
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    let writer_url = with_token(&server, &token("doc", "write"));
    writer_opens_and_reader_gets_its_settings(&writer_url, &reader_url).await;
    let mut viewer = tokio::time::timeout(WAIT, waiting)
        .await
        .expect("the waiting reader got in")
        .unwrap()
        .expect("the waiting reader got in");
    let said: Vec<_> = viewer
        .take_events()
        .into_iter()
        .filter_map(|e| match e {
            Event::Status { reason, .. } => reason,
            _ => None,
        })
        .collect();
    assert!(
        said.iter().any(|r| r.contains("may write")),
        "the reader's client said why it waited: {said:?}"
    );
}

/// A join refused without opening its room cost the address a room opening all the same: a
/// reader's client waiting for a writer to open its room (or any client retrying against a full
/// relay) spent its address's openings, and then even the address's writers could open no
/// room. An opening that opened nothing is given back.
#[tokio::test]
async fn a_join_refused_before_its_room_opened_costs_no_opening() {
    let server = start("auth-opens", |c| {
        c.auth = Some(AuthKey::Secret(SECRET.into()));
        c.ip_room_opens = 3;
    })
    .await;
    for _ in 0..8 {
        let (code, reason) = refused(&server, Some(&token("waiting", "read")), "waiting").await;
        assert_eq!(code, close::TRY_AGAIN_LATER, "{reason}");
        assert!(reason.contains("may write"), "{reason}");
    }
    for room in ["one", "two", "three"] {
        let mut writer = join_at(
            &with_token(&server, &token(room, "write")),
            room,
            0,
            0,
            None,
        )
        .await;
        let stamp = writer.stamp();
        writer.send(&Frame::stamped(stamp, data("1"))).await;
        writer.expect_ack(stamp.step).await;
    }
}

/// A connection whose token the relay refused was upgraded all the same and held one of the
/// relay's connection slots until its join came or the join timeout (10 s) ran out: addresses
/// with no valid token could keep every slot taken, and members that had one were turned away.
/// It is closed at once, with the refusal's code and reason.
#[tokio::test]
async fn a_connection_whose_token_is_refused_is_closed_at_once_without_waiting_for_its_join() {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let server = secured("auth-refused-at-once").await;
    let forged = signed(
        "a forged secret of thirty-two by",
        serde_json::json!({ "sub": "u1", "room": "doc", "access": "write", "exp": now() + 600 }),
    );
    for (url, code) in [
        (server.url(), close::FORBIDDEN),
        (with_token(&server, "garbage"), close::FORBIDDEN),
        (with_token(&server, &forged), close::FORBIDDEN),
    ] {
        let (mut socket, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
        // No join: the refusal comes well before the join timeout.
        let closed = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(message) = socket.next().await {
                match message {
                    Ok(Message::Close(Some(frame))) => {
                        return (u16::from(frame.code), frame.reason.to_string())
                    }
                    Ok(Message::Close(None)) | Err(_) => return (0, String::new()),
                    Ok(_) => continue,
                }
            }
            (0, String::new())
        })
        .await
        .unwrap_or_else(|_| panic!("{url}: still open two seconds after the upgrade"));
        assert_eq!(closed.0, code, "{url}: {closed:?}");
        assert!(closed.1.contains("access token"), "{url}: {closed:?}");
    }
    server.stop().await;
}

/// An issuer's "never expires": an `exp` past what a system time can hold made the relay panic
/// while it read the token, and the connection died without a word. It is a token that expires
/// when time can no longer be told, and opens its room.
#[tokio::test]
async fn a_token_whose_expiry_is_past_any_date_opens_its_room() {
    let server = secured("auth-far-exp").await;
    let far = signed(
        SECRET,
        serde_json::json!({ "sub": "u1", "room": "doc", "access": "write", "exp": u64::MAX }),
    );
    let mut conn = Connection::open(&with_token(&server, &far), &join_frame("doc"))
        .await
        .unwrap();
    let welcome = conn.recv_within(WAIT).await.expect("a welcome");
    assert!(
        matches!(welcome.frame, Frame::Welcome { .. }),
        "{:?}",
        welcome.frame
    );
    server.stop().await;
}

/// With access tokens, a stop counts against the user the token names: the user whose updates
/// stopped a room twice (each walked too far to apply) is kept out of that room, whatever
/// address it comes from, and another user behind the same address is not.
#[tokio::test]
async fn a_user_whose_updates_stop_a_room_twice_is_kept_out_of_it_and_no_one_else() {
    let server = secured("offence").await;
    let mallory = with_token(&server, &doc_writer("mallory"));
    let mut m = join_at(&mallory, "doc", 0, 0, None).await;
    let writer = pattern_mesh_core::doc::SharedDoc::with_client_id(7);
    m.acked(edit(&writer, 0, &"ab".repeat(5_000))).await;
    delete_every_b(&mut m, 0..5_000).await;
    for stop in 1..=2 {
        let frame = raw_update(&mut m, "content", walks_too_far());
        m.send_bytes(frame.encode()).await;
        m.expect_reject(Reason::TooLarge).await;
        let (code, reason) = m.closed().await;
        assert_eq!(code, close::INTERNAL, "stop {stop}: {reason}");
        if stop == 1 {
            m = join_at(&mallory, "doc", 0, 0, None).await;
        }
    }
    let mut conn = Connection::open(&mallory, &join_frame("doc"))
        .await
        .unwrap();
    let (code, reason) = close_of(conn.closed(WAIT).await);
    assert_eq!(code, close::TRY_AGAIN_LATER, "{reason}");
    assert!(
        reason.starts_with("this access token's user stopped the room twice"),
        "{reason}"
    );
    let alice = join_at(
        &with_token(&server, &doc_writer("alice")),
        "doc",
        0,
        0,
        None,
    )
    .await;
    assert_eq!(replayed_text(alice.replay()), "a".repeat(5_000));
}

/// A token of user `sub` for writing in room "doc", valid for ten minutes.
fn doc_writer(sub: &str) -> String {
    signed(
        SECRET,
        serde_json::json!({ "sub": sub, "room": "doc", "access": "write", "exp": now() + 600 }),
    )
}

/// User `sub` joins room "doc" on `server` with the resume token `resume`.
async fn resume_as(server: &Server, sub: &str, resume: ResumeToken) -> common::Member {
    join_at(
        &with_token(server, &doc_writer(sub)),
        "doc",
        0,
        0,
        Some(resume),
    )
    .await
}

/// A member's resume token is a secret of its tab (kept in its storage with `persist`). Another
/// user who learned it (a shared profile, a script on the page) joined with it and their own
/// valid access token: the relay handed them that member's node, with its name among the
/// peers and its budgets, and closed the member's connection as replaced. Another user's token
/// now resumes nothing: the joiner is a new node, and the member stays.
#[tokio::test]
async fn another_users_resume_token_takes_over_no_one() {
    let server = secured("auth-resume-user").await;
    let ada = with_token(&server, &token("doc", "write"));
    let mut member = join_at(&ada, "doc", 0, 0, None).await;
    let thief = resume_as(&server, "mallory", member.token).await;
    assert_ne!(thief.node, member.node, "a new node, not the member's");
    assert_ne!(thief.token, member.token);
    // The member is still in, and hears the newcomer as another node.
    member
        .recv_until(|f| matches!(f, Frame::PeerJoined { peer } if peer.node == thief.node))
        .await;
    member.data_acked(serde_json::json!("still here")).await;
    // The member's own user resumes it as ever.
    drop(member.conn);
    let back = join_at(&ada, "doc", 0, 0, Some(member.token)).await;
    assert_eq!(back.node, member.node);
    server.stop().await;
}

/// The same theft after the relay restarted: the room takes the node back from the store's
/// record of the token, and that record named no user, so the first to present the token (any
/// user with a valid access token) became the member's node and spoke as it. The record names
/// the node's user now: another user's join with the token is a new node, and the member's own
/// user still resumes it.
#[tokio::test]
async fn another_users_resume_token_takes_over_no_node_the_relay_restores_from_its_store() {
    let dir = common::temp_dir("auth-resume-user-restart");
    let secured_in = || {
        start_in(dir.to_path_buf(), |c| {
            c.auth = Some(AuthKey::Secret(SECRET.into()))
        })
    };
    let server = secured_in().await;
    let mut member = join_at(
        &with_token(&server, &token("doc", "write")),
        "doc",
        0,
        0,
        None,
    )
    .await;
    member.data_acked(serde_json::json!("stored")).await;
    drop(member.conn);
    server.stop().await;

    let server = secured_in().await;
    let thief = resume_as(&server, "mallory", member.token).await;
    assert_ne!(thief.node, member.node, "a new node, not the member's");
    assert_ne!(thief.token, member.token);
    drop(thief.conn);
    let back = join_at(
        &with_token(&server, &token("doc", "write")),
        "doc",
        0,
        0,
        Some(member.token),
    )
    .await;
    assert_eq!(back.node, member.node, "the member's own user resumes it");
    server.stop().await;
}

/// Two `sub`s that a 64-bit FNV-1a hash took to one user (found in minutes on a laptop): the
/// relay knew users by that hash, so one user's resume token took the other's node, and the two
/// shared every per-user cap and budget. Users are told apart by SHA-256 now.
#[tokio::test]
async fn two_users_whose_subs_collide_in_a_fast_hash_are_two_users() {
    let server = secured("auth-user-hash").await;
    let ada = with_token(&server, &doc_writer("017bf672ad970641"));
    let mut member = join_at(&ada, "doc", 0, 0, None).await;
    let thief = resume_as(&server, "2893ea9411391b85", member.token).await;
    assert_ne!(thief.node, member.node, "a new node, not the member's");
    member.data_acked(serde_json::json!("still here")).await;
    server.stop().await;
}

/// A token for every room under a prefix let one user hold members in as many rooms as the
/// relay opens (`--max-rooms`, 10,000 by default), from a few addresses: no one else could open
/// a room. One user's connections hold at most `--max-rooms-per-user` rooms on a relay at once.
#[tokio::test]
async fn one_user_cannot_hold_every_room_of_the_relay() {
    let server = start("auth-user-rooms", |c| {
        c.auth = Some(AuthKey::Secret(SECRET.into()));
        c.max_rooms_per_user = 2;
    })
    .await;
    let prefix = |sub: &str| {
        signed(
            SECRET,
            serde_json::json!({ "sub": sub, "roomPrefix": "team/", "access": "write", "exp": now() + 600 }),
        )
    };
    let url = with_token(&server, &prefix("hoarder"));
    let first = join_at(&url, "team/a", 0, 0, None).await;
    let _second = join_at(&url, "team/b", 0, 0, None).await;
    // Another connection of the user in a room it holds already is fine.
    let _again = join_at(&url, "team/b", 0, 0, None).await;
    let (code, reason) = refused(&server, Some(&prefix("hoarder")), "team/c").await;
    assert_eq!(code, close::TRY_AGAIN_LATER, "{reason}");
    assert!(reason.contains("2 rooms"), "{reason}");
    // Another user opens it.
    let _other = join_at(&with_token(&server, &prefix("other")), "team/c", 0, 0, None).await;
    // Once the user leaves a room, it may join another.
    first.conn.close().await;
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let url = with_token(&server, &prefix("hoarder"));
        match Connection::open(&url, &join_frame("team/d")).await {
            Ok(mut conn) => {
                let welcome = conn.recv_within(WAIT).await;
                if welcome
                    .as_ref()
                    .is_ok_and(|w| matches!(w.frame, Frame::Welcome { .. }))
                {
                    break;
                }
            }
            Err(e) => panic!("{e}"),
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the user may join another room once it left one"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.stop().await;
}

/// An issuer that signs tokens for several services with one key: a token it minted for
/// another service (its `aud` names that one) opens no room here (RFC 7519 §4.1.3: a
/// principal that does not find itself in `aud` refuses the token).
#[tokio::test]
async fn a_token_minted_for_another_service_with_the_same_key_opens_no_room() {
    let server = secured("auth-audience-unset").await;
    let billing = signed(
        SECRET,
        serde_json::json!({ "sub": "u1", "room": "doc", "access": "write", "exp": now() + 600, "aud": "billing" }),
    );
    let (code, reason) = refused(&server, Some(&billing), "doc").await;
    assert_eq!(code, close::FORBIDDEN);
    assert_eq!(
        reason,
        "the access token is for another service (its aud claim; this relay has no --auth-audience)"
    );
    // An `aud` of a shape jsonwebtoken cannot read was taken for none.
    for aud in [
        serde_json::json!(42),
        serde_json::json!(["billing", 7]),
        serde_json::json!({ "x": "billing" }),
    ] {
        let odd = signed(
            SECRET,
            serde_json::json!({ "sub": "u1", "room": "doc", "access": "write", "exp": now() + 600, "aud": aud }),
        );
        assert_eq!(
            refused(&server, Some(&odd), "doc").await,
            (
                close::FORBIDDEN,
                "the access token's aud claim is not a string or a list of strings".to_owned()
            ),
            "{aud}"
        );
    }
    server.stop().await;
}

/// With `--auth-audience` and `--auth-issuer`, a token opens a room only if its `aud` names the
/// relay (alone or in a list) and its `iss` is the issuer; each other token is refused with a
/// reason that says which claim is wrong.
#[tokio::test]
async fn with_an_audience_and_an_issuer_only_tokens_for_this_relay_from_its_issuer_open_rooms() {
    let server = start("auth-audience", |c| {
        c.auth = Some(AuthKey::Secret(SECRET.into()));
        c.auth_audience = Some("mesh".into());
        c.auth_issuer = Some("https://id.example".into());
    })
    .await;
    let with = |extra: serde_json::Value| {
        let mut claims = serde_json::json!({ "sub": "u1", "room": "doc", "access": "write", "exp": now() + 600 });
        claims
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        signed(SECRET, claims)
    };
    let iss = "https://id.example";
    for taken in [
        with(serde_json::json!({ "aud": "mesh", "iss": iss })),
        with(serde_json::json!({ "aud": ["billing", "mesh"], "iss": iss })),
    ] {
        let mut member = join_at(&with_token(&server, &taken), "doc", 0, 0, None).await;
        let stamp = member.stamp();
        member.send(&Frame::stamped(stamp, data("1"))).await;
        member.expect_ack(stamp.step).await;
    }
    let cases = [
        (
            with(serde_json::json!({ "aud": "billing", "iss": iss })),
            r#"the access token is for another service (its aud claim does not name "mesh")"#,
        ),
        (
            with(serde_json::json!({ "iss": iss })),
            "the access token has no aud claim",
        ),
        (
            with(serde_json::json!({ "aud": ["mesh", 7], "iss": iss })),
            "the access token's aud claim is not a string or a list of strings",
        ),
        (
            with(serde_json::json!({ "aud": "mesh", "iss": "https://other.example" })),
            r#"the access token comes from another issuer than "https://id.example" (its iss claim)"#,
        ),
        (
            with(serde_json::json!({ "aud": "mesh" })),
            "the access token has no iss claim",
        ),
        // jsonwebtoken took a list, and passed it if any of it matched.
        (
            with(serde_json::json!({ "aud": "mesh", "iss": ["https://other.example", iss] })),
            "the access token's iss claim is not a string",
        ),
    ];
    for (token, reason) in cases {
        assert_eq!(
            refused(&server, Some(&token), "doc").await,
            (close::FORBIDDEN, reason.to_owned())
        );
    }
    server.stop().await;
}
