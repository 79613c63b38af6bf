//! `MeshClient` and `SharedText` in a real browser against a real relay.
//!
//! Needs a running relay: `.ci/test` starts one on loopback and builds these tests with its URL
//! in `PM_RELAY_URL` (for example `ws://127.0.0.1:8090/ws`).
#![cfg(target_arch = "wasm32")]

use std::cell::RefCell;
use std::rc::Rc;

use js_sys::{Reflect, JSON};
use pattern_mesh::doc::SharedDoc;
use pattern_mesh::pattern::PatternConfig;
use pattern_mesh::wasm::MeshClient;
use pattern_mesh::wire::{Body, Frame, Json, Stamp};
use wasm_bindgen::prelude::*;
use wasm_bindgen_test::*;

wasm_bindgen_test_configure!(run_in_browser);

fn relay_url() -> &'static str {
    match option_env!("PM_RELAY_URL") {
        Some(url) => url,
        None => panic!("build these tests with PM_RELAY_URL set to a running relay's ws:// URL"),
    }
}

fn unique_room(name: &str) -> String {
    format!("{name}-{}", (js_sys::Math::random() * 1e12) as u64)
}

async fn connect(room: &str, name: &str) -> MeshClient {
    let options = JSON::parse(&format!(
        r#"{{"url":"{}","room":"{room}","name":"{name}"}}"#,
        relay_url()
    ))
    .unwrap();
    MeshClient::join(options.unchecked_into(), None)
        .await
        .expect("the client joins")
}

async fn sleep(ms: u32) {
    gloo_timers::future::TimeoutFuture::new(ms).await;
}

/// Waits up to 10 s for `done`.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..200 {
        if done() {
            return;
        }
        sleep(50).await;
    }
    panic!("timed out waiting for {what}");
}

/// Collects the payloads of `event` on `client`.
fn collect(client: &MeshClient, event: &str) -> Rc<RefCell<Vec<JsValue>>> {
    let seen = Rc::new(RefCell::new(Vec::new()));
    let sink = seen.clone();
    let listener = Closure::<dyn FnMut(JsValue)>::new(move |e: JsValue| sink.borrow_mut().push(e));
    client.on(event.into(), listener.into_js_value()).unwrap();
    seen
}

#[wasm_bindgen_test]
async fn two_clients_exchange_data_and_converge_on_text() {
    let room = unique_room("converge");
    let a = connect(&room, "a").await;
    let b = connect(&room, "b").await;
    assert_ne!(a.node().unwrap(), b.node().unwrap());
    let messages = collect(&b, "message");
    a.broadcast(
        JSON::parse(r#"{"temperature":23.5}"#)
            .unwrap()
            .unchecked_into(),
        None,
    )
    .unwrap();
    until("b receives a's data", || !messages.borrow().is_empty()).await;
    let first = messages.borrow()[0].clone();
    assert_eq!(
        JSON::stringify(&Reflect::get(&first, &"data".into()).unwrap()).unwrap(),
        r#"{"temperature":23.5}"#
    );
    assert_eq!(
        Reflect::get(&first, &"sender".into()).unwrap(),
        a.node().unwrap()
    );

    let ta = a.text("content".into()).unwrap();
    let tb = b.text("content".into()).unwrap();
    let deltas = Rc::new(RefCell::new(Vec::new()));
    let sink = deltas.clone();
    let observer =
        Closure::<dyn FnMut(JsValue, JsValue)>::new(move |d: JsValue, origin: JsValue| {
            sink.borrow_mut().push((
                JSON::stringify(&d).unwrap().as_string().unwrap(),
                origin.as_string().unwrap(),
            ));
        });
    tb.observe(observer.into_js_value().unchecked_into())
        .unwrap();
    ta.insert(JsValue::from(0), JsValue::from("hello")).unwrap();
    tb.insert(JsValue::from(0), JsValue::from("world "))
        .unwrap();
    until("both texts converge", || {
        let (x, y) = (ta.to_js_string().unwrap(), tb.to_js_string().unwrap());
        x == y && x.len() == 11
    })
    .await;
    assert!(
        ta.to_js_string().unwrap().contains("hello")
            && ta.to_js_string().unwrap().contains("world ")
    );
    let deltas = deltas.borrow();
    assert!(deltas.iter().any(|(_, origin)| origin == "local"));
    assert!(
        deltas
            .iter()
            .any(|(d, origin)| origin == "remote" && d.contains("hello")),
        "{deltas:?}"
    );
    a.close().unwrap();
    b.close().unwrap();
}

#[wasm_bindgen_test]
async fn a_tampered_frame_is_reported_as_an_anomaly_and_not_applied() {
    let room = unique_room("tamper");
    let a = connect(&room, "a").await;
    let b = connect(&room, "b").await;
    let anomalies = collect(&a, "anomaly");
    let messages = collect(&b, "message");
    let step = a.step().unwrap() as u64 + 1;
    let tampered = Frame::stamped(
        Stamp {
            sender: a.node().unwrap() as u64,
            step,
            pattern: 2,
        },
        Body::Data {
            data: Json::parse(r#""tampered""#).unwrap(),
        },
    );
    a.send_raw(bytes(&tampered.encode())).unwrap();
    until("the relay's reject arrives", || {
        !anomalies.borrow().is_empty()
    })
    .await;
    let anomaly = anomalies.borrow()[0].clone();
    assert_eq!(
        Reflect::get(&anomaly, &"reason".into()).unwrap(),
        "patternMismatch"
    );
    assert_eq!(Reflect::get(&anomaly, &"source".into()).unwrap(), "relay");
    a.broadcast(JsValue::from_str("genuine").unchecked_into(), None)
        .unwrap();
    until("the genuine message arrives", || {
        !messages.borrow().is_empty()
    })
    .await;
    let got: Vec<String> = messages
        .borrow()
        .iter()
        .map(|m| {
            JSON::stringify(&Reflect::get(m, &"data".into()).unwrap())
                .unwrap()
                .into()
        })
        .collect();
    assert_eq!(got, [r#""genuine""#], "the tampered frame reached no one");
    a.close().unwrap();
    b.close().unwrap();
}

#[wasm_bindgen_test]
async fn edits_made_while_disconnected_arrive_exactly_once() {
    let room = unique_room("offline");
    let a = connect(&room, "a").await;
    let b = connect(&room, "b").await;
    let statuses = collect(&a, "status");
    let ta = a.text("content".into()).unwrap();
    let tb = b.text("content".into()).unwrap();
    ta.insert(JsValue::from(0), JsValue::from("online "))
        .unwrap();
    until("b has the first edit", || {
        tb.to_js_string().unwrap() == "online "
    })
    .await;

    a.drop_connection().unwrap();
    for (i, word) in ["while ", "the ", "socket ", "was ", "down "]
        .iter()
        .enumerate()
    {
        let at = ta.length().unwrap();
        ta.insert(JsValue::from(at), JsValue::from(*word)).unwrap();
        if i == 2 {
            sleep(100).await;
        }
    }
    until("a reconnects and its outbox drains", || {
        a.status().unwrap() == "open" && a.pending_count().unwrap() == 0
    })
    .await;
    let expected = "online while the socket was down ";
    until("b has every offline edit", || {
        tb.to_js_string().unwrap() == expected
    })
    .await;
    sleep(300).await;
    assert_eq!(
        tb.to_js_string().unwrap(),
        expected,
        "each edit arrived exactly once"
    );
    assert_eq!(ta.to_js_string().unwrap(), expected);
    let statuses: Vec<String> = statuses
        .borrow()
        .iter()
        .filter_map(|s| s.as_string())
        .collect();
    assert!(
        statuses.contains(&"reconnecting".to_owned()),
        "{statuses:?}"
    );
    a.close().unwrap();
    b.close().unwrap();
}

#[wasm_bindgen_test]
async fn equal_versions_with_different_digests_raise_a_desync_anomaly() {
    let room = unique_room("desync");
    let a = connect(&room, "a").await;
    let b = connect(&room, "b").await;
    let ta = a.text("content".into()).unwrap();
    let tb = b.text("content".into()).unwrap();
    ta.insert(JsValue::from(0), JsValue::from("same text"))
        .unwrap();
    until("b has a's text", || {
        tb.to_js_string().unwrap() == "same text"
    })
    .await;
    assert_eq!(
        a.digest().unwrap(),
        b.digest().unwrap(),
        "same version, same content, same digest"
    );
    let anomalies = collect(&b, "anomaly");
    // A checkpoint at b's exact version (its state vector, and no deletions, like a fresh
    // document) whose digest does not match b's content.
    let step = a.step().unwrap() as u64 + 1;
    let checkpoint = Frame::stamped(
        Stamp {
            sender: a.node().unwrap() as u64,
            step,
            pattern: PatternConfig::default().value(step),
        },
        Body::Checkpoint {
            doc: "*".into(),
            state_vector: b.state_vector().unwrap(),
            deletes: SharedDoc::with_client_id(99).version().deletes,
            digest: 0x1234,
        },
    );
    a.send_raw(bytes(&checkpoint.encode())).unwrap();
    until("b reports the desync", || {
        anomalies
            .borrow()
            .iter()
            .any(|x| Reflect::get(x, &"reason".into()).unwrap() == "desync")
    })
    .await;
    assert_eq!(
        tb.to_js_string().unwrap(),
        "same text",
        "a checkpoint never changes the text"
    );
    a.close().unwrap();
    b.close().unwrap();
}

/// Bytes as the JS API takes them.
fn bytes(bytes: &[u8]) -> JsValue {
    js_sys::Uint8Array::from(bytes).into()
}
