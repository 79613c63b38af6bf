//! The JS-facing API in a real browser: run with `wasm-pack test --headless --chrome`.
//!
//! Arguments are built as JS values (`JSON.parse`, `Uint8Array`) and results are read back with
//! `Reflect`, so these tests cross the same boundary a JS caller does.
#![cfg(target_arch = "wasm32")]

use js_sys::{Reflect, Uint8Array, JSON};
use pattern_mesh::wasm::{collapse_digits, decode, encode, PatternGenerator, StepClock, Validator};
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_test::*;

wasm_bindgen_test_configure!(run_in_browser);

fn js(text: &str) -> JsValue {
    JSON::parse(text).expect("test JSON parses")
}

fn get(object: &JsValue, key: &str) -> JsValue {
    Reflect::get(object, &key.into()).expect("object")
}

/// The name and message of the error a call threw.
fn error_message<T>(result: Result<T, JsValue>) -> (String, String) {
    let Err(error) = result else {
        panic!("the call should have thrown");
    };
    let error: js_sys::Error = error.dyn_into().expect("a thrown value is an Error");
    (error.name().into(), error.message().into())
}

#[wasm_bindgen_test]
fn pattern_values_follow_the_algorithm() {
    let p = PatternGenerator::new(None).unwrap();
    let values: Vec<f64> = (0..5).map(|s| p.compute_value(s as f64).unwrap()).collect();
    assert_eq!(values, [7.0, 4.0, 1.0, 7.0, 4.0]);
    let reset: Vec<f64> = (100..103)
        .map(|s| p.compute_value(s as f64).unwrap())
        .collect();
    assert_eq!(reset, [7.0, 4.0, 1.0]);
    assert_eq!(p.phase(250.0).unwrap(), 2.0);
    assert_eq!(collapse_digits(157.0).unwrap(), 4.0);
    let custom = PatternGenerator::new(Some(
        js(r#"{"seed":5,"resetInterval":10}"#).unchecked_into(),
    ))
    .unwrap();
    assert_eq!(custom.compute_value(20.0).unwrap(), 5.0);
    assert_eq!(get(&custom.params().unwrap().into(), "multiplier"), 7.0);
}

#[wasm_bindgen_test]
fn bad_input_throws_an_error_that_says_what_was_wrong() {
    let zero = PatternGenerator::new(Some(js(r#"{"resetInterval":0}"#).unchecked_into()));
    let (name, message) = error_message(zero);
    assert_eq!(name, "ConfigError");
    assert!(message.contains("reset_interval"), "{message}");

    let p = PatternGenerator::new(None).unwrap();
    let (name, message) = error_message(p.compute_value(-1.0));
    assert_eq!(name, "InvalidArgument");
    assert!(message.contains("step must be an integer"), "{message}");
    assert!(p.compute_value(1.5).is_err());
    assert!(p.compute_value(f64::NAN).is_err());

    let (name, message) = error_message(decode(js_bytes(&[2, 0x7f, 0])));
    assert_eq!(name, "DecodeError");
    assert!(message.contains("unknown frame kind 0x7f"), "{message}");

    let (name, message) = error_message(encode(js(r#"{"kind":"nope"}"#).unchecked_into()));
    assert_eq!(name, "InvalidArgument");
    assert!(message.contains("nope"), "{message}");

    // The traffic kinds are read field by field: the error names the field.
    for (frame, field) in [
        (
            r#"{"kind":"data","sender":-1,"step":1,"pattern":4,"data":1}"#,
            "`sender`",
        ),
        (
            r#"{"kind":"data","sender":1,"step":1.5,"pattern":4,"data":1}"#,
            "`step`",
        ),
        (
            r#"{"kind":"data","sender":1,"step":1,"data":1}"#,
            "`pattern`",
        ),
        (
            r#"{"kind":"data","sender":1,"step":1,"pattern":4}"#,
            "`data`",
        ),
        (
            r#"{"kind":"update","sender":1,"step":1,"pattern":4,"doc":"d","update":{}}"#,
            "`update`",
        ),
        (
            r#"{"kind":"update","sender":1,"step":1,"pattern":4,"update":[1]}"#,
            "`doc`",
        ),
        (r#"{"kind":"presence","data":{}}"#, "`sender`"),
    ] {
        let (name, message) = error_message(encode(js(frame).unchecked_into()));
        assert_eq!(name, "InvalidArgument", "{frame}");
        assert!(message.contains(field), "{frame}: {message}");
    }
    let (name, _) = error_message(encode(JsValue::from(3).unchecked_into()));
    assert_eq!(name, "InvalidArgument");

    // The other kinds are read field by field too, nested fields included: the error names the
    // field and says what it was.
    for (frame, expected) in [
        (
            r#"{"kind":"ack","step":1,"position":"2"}"#,
            r#"the frame's `position` must be an integer from 0 to 2^53 - 1, got the string "2""#,
        ),
        (
            r#"{"kind":"ack","step":1}"#,
            "the frame is not valid: missing field `position`",
        ),
        (
            r#"{"kind":"part","total":2,"offset":0,"bytes":[1,256]}"#,
            "the frame's `bytes[1]` must be an integer from 0 to 255, got the number 256",
        ),
        (
            r#"{"kind":"reject","step":1,"reason":"nope","detail":""}"#,
            r#"the frame's `reason` "nope" is not one of the reasons"#,
        ),
        (
            r#"{"kind":"join","room":"r","name":"a","since":0,"config":{"pattern":{},"maxFuture":0.5}}"#,
            "config.maxFuture must be an integer from 0 to 2^53 - 1, got 0.5",
        ),
        (
            r#"{"kind":"join","room":"r","name":"a","since":0,"config":{"pattern":{"sed":1},"maxFuture":5}}"#,
            r#"config.pattern has an unknown key "sed""#,
        ),
        (
            r#"{"kind":"peerJoined","peer":{"node":1}}"#,
            "the frame's `peer` has no `name`",
        ),
        (
            r#"{"kind":"welcome","node":1,"resume":[1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16],"config":{"pattern":{},"maxFuture":5},"limits":{"maxFrame":1},"high":0,"log":1,"peers":[]}"#,
            "missing field `limits.maxMessage`",
        ),
        (r#"{"kind":7}"#, "`kind` must be a string, got the number 7"),
        (r#"{"room":"r"}"#, "`kind` must be a string, got undefined"),
    ] {
        let (name, message) = error_message(encode(js(frame).unchecked_into()));
        assert_eq!(name, "InvalidArgument", "{frame}");
        assert!(message.contains(expected), "{frame}: {message}");
    }

    let (name, message) = error_message(PatternGenerator::new(Some(
        js(r#"{"seed":"7"}"#).unchecked_into(),
    )));
    assert_eq!(name, "InvalidArgument");
    assert_eq!(
        message,
        r#"seed must be an integer from 0 to 2^53 - 1, got the string "7""#
    );
    let (name, message) = error_message(Validator::new(Some(
        js(r#"{"maxFuture":-1}"#).unchecked_into(),
    )));
    assert_eq!(name, "InvalidArgument");
    assert!(
        message.starts_with("maxFuture must be an integer"),
        "{message}"
    );
    let (_, message) = error_message(Validator::new(Some(
        js(r#"{"maxFutur":1}"#).unchecked_into(),
    )));
    assert!(message.contains(r#"unknown key "maxFutur""#), "{message}");
    // A peer or limits with a key more than it needs is read like a frame with one: the key is
    // ignored (every field of theirs is required, so a misspelt one still fails).
    let welcome = js(
        r#"{"kind":"welcome","node":1,"resume":[1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16],"config":{"pattern":{},"maxFuture":5},"limits":{"maxFrame":1024,"maxMessage":2048,"rate":1,"burst":1,"bandwidth":1,"bandwidthBurst":1,"note":"x"},"high":0,"log":1,"peers":[{"node":2,"name":"b","data":{}}]}"#,
    );
    assert!(encode(welcome.unchecked_into()).is_ok());

    // A getter that throws inside an options object is an error that names the key, never a
    // silent default.
    let throwing = js_sys::Function::new_no_args(
        r#"const o = {};
           Object.defineProperty(o, "maxFuture", { enumerable: true, get() { throw new Error("no"); } });
           return o;"#,
    )
    .call0(&JsValue::NULL)
    .unwrap();
    let (name, message) = error_message(Validator::new(Some(throwing.unchecked_into())));
    assert_eq!(name, "InvalidArgument");
    assert_eq!(message, "reading `maxFuture` threw: no");

    let mut v = Validator::new(None).unwrap();
    let frame = || js(r#"{"kind":"data","sender":2,"step":1,"pattern":4,"data":null}"#);
    for (origin, expected) in [
        (
            r#"{"receiver":"1"}"#,
            "the origin's receiver must be an integer",
        ),
        (
            r#"{"receiver":1,"connection":2}"#,
            "got an object with 2 keys",
        ),
        (r#"{"sender":1}"#, r#"got the key "sender""#),
        ("[1]", "got an array"),
    ] {
        let result = v.check(
            frame().unchecked_into(),
            js(origin).unchecked_into(),
            1.0,
            Some(0.0),
        );
        let (name, message) = error_message(result);
        assert_eq!(name, "InvalidArgument", "{origin}");
        assert!(message.contains(expected), "{origin}: {message}");
    }
}

#[wasm_bindgen_test]
fn frames_round_trip_as_plain_objects() {
    let frame = js(
        r#"{"kind":"data","sender":3,"step":47,"pattern":1,"data":{"temperature":23.5,"tags":["a"]}}"#,
    );
    let bytes = encode(frame.clone().unchecked_into()).unwrap();
    assert_eq!(bytes[0], 2, "version byte first");
    let back: JsValue = decode(js_bytes(&bytes)).unwrap().into();
    assert_eq!(
        JSON::stringify(&back).unwrap(),
        JSON::stringify(&frame).unwrap()
    );
    let data = get(&back, "data");
    assert_eq!(get(&data, "temperature"), 23.5);

    let update = js(r#"{"kind":"update","sender":1,"step":2,"pattern":1,"doc":"content"}"#);
    Reflect::set(
        &update,
        &"update".into(),
        &Uint8Array::from(&[1u8, 2, 3][..]),
    )
    .unwrap();
    let back: JsValue = decode(js_bytes(&encode(update.unchecked_into()).unwrap()))
        .unwrap()
        .into();
    let payload: Uint8Array = get(&back, "update")
        .dyn_into()
        .expect("bytes come back as a Uint8Array");
    assert_eq!(payload.to_vec(), [1, 2, 3]);
}

/// In a real-time room only live data and signals are stale: bytes the relay sent from the
/// room's log (they carry a position) are history, and an update is a late edit, never stale.
#[wasm_bindgen_test]
fn a_stale_window_judges_live_data_and_signals_only() {
    use pattern_mesh::pattern::PatternConfig;
    use pattern_mesh::wire::{with_position, Body, Frame, Json, Stamp};
    let stamped = |sender: u64, body: Body| {
        let stamp = Stamp {
            sender,
            step: 3,
            pattern: PatternConfig::default().value(3),
        };
        Frame::stamped(stamp, body).encode()
    };
    let data = || Body::Data {
        data: Json::parse("null").unwrap(),
    };
    let mut v = Validator::new(Some(js(r#"{"staleWindow":20}"#).unchecked_into())).unwrap();
    let me = || js(r#"{"receiver":1}"#).unchecked_into();
    let mut verdict = |bytes: Vec<u8>| -> JsValue {
        let bytes = Uint8Array::from(&bytes[..]);
        v.check(bytes.unchecked_into(), me(), 1_000.0, Some(0.0))
            .unwrap()
            .into()
    };
    let live = verdict(stamped(2, data()));
    assert_eq!(get(&live, "reason"), "stale");
    let logged = verdict(with_position(&stamped(3, data()), 7).unwrap());
    assert_eq!(get(&logged, "accepted"), true);
    let update = verdict(stamped(
        4,
        Body::Update {
            doc: "content".into(),
            update: vec![0, 0],
        },
    ));
    assert_eq!(get(&update, "accepted"), true);
}

#[wasm_bindgen_test]
fn a_replayed_and_a_forged_message_are_rejected() {
    let mut v = Validator::new(None).unwrap();
    let me = || js(r#"{"receiver":1}"#).unchecked_into();
    let frame =
        || js(r#"{"kind":"data","sender":2,"step":1,"pattern":4,"data":null}"#).unchecked_into();
    let first: JsValue = v.check(frame(), me(), 0.0, Some(0.0)).unwrap().into();
    assert_eq!(get(&first, "accepted"), true);

    let replay: JsValue = v.check(frame(), me(), 1.0, Some(0.0)).unwrap().into();
    assert_eq!(get(&replay, "accepted"), false);
    assert_eq!(get(&replay, "reason"), "replay");

    let forged = js(r#"{"kind":"data","sender":1,"step":2,"pattern":1,"data":null}"#);
    let forged: JsValue = v
        .check(forged.unchecked_into(), me(), 1.0, Some(0.0))
        .unwrap()
        .into();
    assert_eq!(get(&forged, "reason"), "senderMismatch");

    let wrong = js(r#"{"kind":"data","sender":2,"step":2,"pattern":6,"data":null}"#);
    let wrong: JsValue = v
        .check(wrong.unchecked_into(), me(), 1.0, Some(0.0))
        .unwrap()
        .into();
    assert_eq!(get(&wrong, "reason"), "patternMismatch");
    assert!(get(&wrong, "detail")
        .as_string()
        .unwrap()
        .contains("pattern 6"));

    let garbage = Uint8Array::from(&[9u8, 9, 9][..]);
    let garbage: JsValue = v
        .check(garbage.unchecked_into(), me(), 1.0, None)
        .unwrap()
        .into();
    assert_eq!(get(&garbage, "reason"), "malformed");

    let counts: JsValue = v.counts().unwrap().into();
    assert_eq!(get(&counts, "accepted"), 1.0);
    assert_eq!(get(&counts, "replay"), 1.0);
    assert_eq!(get(&counts, "senderMismatch"), 1.0);
    assert_eq!(get(&counts, "patternMismatch"), 1.0);
    assert_eq!(get(&counts, "malformed"), 1.0);
}

#[wasm_bindgen_test]
fn the_clock_steps_and_reports_phases() {
    let mut clock = StepClock::new(None).unwrap();
    let seen = js_sys::Array::new();
    let record =
        js_sys::Function::new_with_args("phase, step", "this.push([phase, step])").bind0(&seen);
    let off: JsValue = clock.on_phase(record.unchecked_into()).unwrap().into();
    clock.join(99.0).unwrap();
    let tick: JsValue = clock.next().unwrap().into();
    assert_eq!(get(&tick, "step"), 100.0);
    assert_eq!(get(&tick, "pattern"), 7.0);
    assert_eq!(seen.length(), 1);
    assert_eq!(JSON::stringify(&seen).unwrap(), "[[1,100]]");
    let advance: JsValue = clock.accept(50.0).unwrap().into();
    assert_eq!(get(&advance, "to"), 100.0, "a step behind moves nothing");
    assert_eq!(get(&advance, "enteredPhase"), JsValue::NULL);
    let advance: JsValue = clock.accept(5_000.0).unwrap().into();
    assert_eq!(
        get(&advance, "to"),
        101.0,
        "a step ahead moves the clock by one"
    );
    off.unchecked_ref::<js_sys::Function>()
        .call0(&JsValue::NULL)
        .unwrap();
    clock.join(250.0).unwrap();
    assert_eq!(seen.length(), 1, "no calls after unsubscribing");
    assert_eq!(clock.phase(), 2.0);
}

#[wasm_bindgen_test]
fn every_frame_kind_survives_decode_and_encode_in_js() {
    use pattern_mesh::wire::{Body, Frame, Json, Peer, Reason, RelayLimits, RoomConfig, Stamp};
    let stamp = Stamp {
        sender: 3,
        step: 47,
        pattern: 1,
    };
    let peer = Peer {
        node: 4,
        name: "ada".into(),
    };
    let frames = [
        Frame::Join {
            room: "r".into(),
            name: "ada".into(),
            since: 9,
            log: 3,
            resume: Some([7; 16]),
            config: Some(RoomConfig::default()),
            floor: true,
        },
        Frame::Join {
            room: "r".into(),
            name: "".into(),
            since: 0,
            log: 0,
            resume: None,
            config: None,
            floor: false,
        },
        Frame::Welcome {
            node: 4,
            resume: [1; 16],
            config: RoomConfig {
                stale_window: Some(40),
                ..RoomConfig::default()
            },
            limits: RelayLimits::default(),
            high: 100,
            log: 77,
            peers: vec![peer.clone()],
            floor: Some(250),
        },
        Frame::CaughtUp {
            high: 100,
            position: 12,
        },
        Frame::PeerJoined { peer },
        Frame::PeerLeft { node: 4 },
        Frame::Ack {
            step: 47,
            position: 13,
        },
        Frame::Reject {
            step: 47,
            reason: Reason::Replay,
            detail: "again".into(),
        },
        Frame::Presence {
            sender: 3,
            data: Json::parse(r#"{"cursor":[1,2]}"#).unwrap(),
        },
        Frame::Part {
            total: 3_000,
            offset: 1_000,
            bytes: vec![9; 30],
        },
        Frame::Fence { step: 47 },
        Frame::stamped(
            stamp,
            Body::Data {
                data: Json::parse(r#"{"t":23.5,"s":"é😀","n":null,"a":[true,false]}"#).unwrap(),
            },
        ),
        Frame::stamped(
            stamp,
            Body::Update {
                doc: "content".into(),
                update: vec![1, 2, 3],
            },
        ),
        Frame::stamped(
            stamp,
            Body::Checkpoint {
                doc: "content".into(),
                state_vector: vec![1, 0],
                deletes: 0x0123_4567_89ab_cdef,
                digest: 0xfedc_ba98_7654_3210,
            },
        ),
        Frame::stamped(
            stamp,
            Body::SyncRequest {
                doc: "content".into(),
                state_vector: vec![0],
                to: 4,
            },
        ),
        Frame::stamped(
            stamp,
            Body::SyncState {
                doc: "content".into(),
                update: vec![0, 0],
                to: 0,
            },
        ),
        Frame::Snapshot {
            doc: "content".into(),
            state: vec![5; 40],
        },
    ];
    for frame in frames {
        let bytes = frame.encode();
        let object: JsValue = decode(js_bytes(&bytes)).unwrap().into();
        let again = encode(object.clone().unchecked_into())
            .unwrap_or_else(|e| panic!("{frame:?} as {object:?}: {e:?}"));
        assert_eq!(again, bytes, "{frame:?}");
    }
}

#[wasm_bindgen_test]
fn a_throwing_getter_is_an_invalid_argument_and_the_validator_lives_on() {
    let throwing: JsValue = js_sys::Function::new_no_args(
        r#"const f = { kind: "data", sender: 2, step: 1, pattern: 4 };
           Object.defineProperty(f, "data", { get() { throw new Error("no data here"); } });
           return f;"#,
    )
    .call0(&JsValue::NULL)
    .unwrap();
    let (name, message) = error_message(encode(throwing.clone().unchecked_into()));
    assert_eq!(name, "InvalidArgument");
    assert!(message.contains("no data here"), "{message}");

    let mut v = Validator::new(None).unwrap();
    let me = || js(r#"{"receiver":1}"#).unchecked_into();
    let (name, _) = error_message(v.check(throwing.unchecked_into(), me(), 1.0, Some(0.0)));
    assert_eq!(name, "InvalidArgument");
    let fine = js(r#"{"kind":"data","sender":2,"step":1,"pattern":4,"data":null}"#);
    let verdict: JsValue = v
        .check(fine.unchecked_into(), me(), 1.0, Some(0.0))
        .unwrap()
        .into();
    assert_eq!(
        Reflect::get(&verdict, &"accepted".into()).unwrap(),
        JsValue::TRUE
    );
}

#[wasm_bindgen_test]
fn update_bytes_may_be_an_array_of_numbers() {
    let frame =
        js(r#"{"kind":"update","sender":1,"step":2,"pattern":1,"doc":"d","update":[1,2,3]}"#);
    let back: JsValue = decode(js_bytes(&encode(frame.unchecked_into()).unwrap()))
        .unwrap()
        .into();
    let bytes: Uint8Array = get(&back, "update").dyn_into().unwrap();
    assert_eq!(bytes.to_vec(), [1, 2, 3]);
}

/// Bytes as the JS API takes them.
fn js_bytes(bytes: &[u8]) -> JsValue {
    js_sys::Uint8Array::from(bytes).into()
}
