//! Property tests of the core: the pattern's closed form against the seed's iterative definition,
//! and the decoder against random and mutated bytes.
#![cfg(not(target_arch = "wasm32"))]

use pattern_mesh::pattern::{
    collapse_digits, iterative_value, PatternConfig, PatternParams, MAX_SAFE_INTEGER,
};
use pattern_mesh::wire::{
    Body, DecodeError, Frame, Json, Limits, Peer, Reason, RelayLimits, RoomConfig, Stamp,
};
use proptest::prelude::*;

fn params() -> impl Strategy<Value = PatternParams> {
    (1u64..1_000_000, 1u64..1_000_000, 1u64..1_000).prop_map(
        |(seed, multiplier, reset_interval)| PatternParams {
            seed,
            multiplier,
            reset_interval,
        },
    )
}

/// An integer a frame may carry: at most 2^53 - 1 (digests are fixed-width and take any value).
fn int() -> impl Strategy<Value = u64> {
    prop_oneof![0..=1_000u64, 0..=MAX_SAFE_INTEGER, Just(MAX_SAFE_INTEGER)]
}

fn stamp() -> impl Strategy<Value = Stamp> {
    (int(), int(), int()).prop_map(|(sender, step, pattern)| Stamp {
        sender,
        step,
        pattern,
    })
}

fn json() -> impl Strategy<Value = Json> {
    prop_oneof![
        any::<f64>()
            .prop_filter("finite", |x| x.is_finite())
            .prop_map(|x| Json::from_value(&serde_json::json!({ "temperature": x })).unwrap()),
        ".{0,40}".prop_map(|s| Json::from_value(&serde_json::json!([s, null, true])).unwrap()),
    ]
}

fn frame() -> impl Strategy<Value = Frame> {
    let name = "[a-z0-9 é]{0,20}";
    prop_oneof![
        (name, name, int(), any::<Option<[u8; 16]>>(), any::<bool>()).prop_map(
            |(room, name, since, resume, config)| Frame::Join {
                room: format!("r{room}"),
                name,
                since,
                log: since / 3,
                resume,
                config: config.then(RoomConfig::default),
                floor: since % 2 == 0,
            }
        ),
        (
            int(),
            any::<[u8; 16]>(),
            int(),
            prop::collection::vec((int(), name), 0..5)
        )
            .prop_map(|(node, resume, high, peers)| Frame::Welcome {
                node,
                resume,
                config: RoomConfig::default(),
                limits: RelayLimits::default(),
                high,
                log: high / 2,
                peers: peers
                    .into_iter()
                    .map(|(node, name)| Peer { node, name })
                    .collect(),
                floor: (high % 2 == 0).then_some(high / 3),
            }),
        (int(), prop::sample::select(Reason::ALL.to_vec()), ".{0,30}").prop_map(
            |(step, reason, detail)| Frame::Reject {
                step,
                reason,
                detail
            }
        ),
        (stamp(), json()).prop_map(|(stamp, data)| Frame::stamped(stamp, Body::Data { data })),
        (stamp(), name, prop::collection::vec(any::<u8>(), 0..200))
            .prop_map(|(stamp, doc, update)| Frame::stamped(stamp, Body::Update { doc, update })),
        (
            stamp(),
            name,
            prop::collection::vec(any::<u8>(), 0..20),
            any::<u64>(),
            any::<u64>()
        )
            .prop_map(
                |(stamp, doc, state_vector, deletes, digest)| Frame::stamped(
                    stamp,
                    Body::Checkpoint {
                        doc,
                        state_vector,
                        deletes,
                        digest,
                    }
                )
            ),
        (
            stamp(),
            name,
            prop::collection::vec(any::<u8>(), 0..20),
            int()
        )
            .prop_map(|(stamp, doc, state_vector, to)| Frame::stamped(
                stamp,
                Body::SyncRequest {
                    doc,
                    state_vector,
                    to
                }
            )),
        (int(), int(), prop::collection::vec(any::<u8>(), 1..50)).prop_map(
            |(total, offset, bytes)| Frame::Part {
                total,
                offset,
                bytes
            }
        ),
        int().prop_map(|step| Frame::Fence { step }),
        (int(), json()).prop_map(|(sender, data)| Frame::Presence { sender, data }),
        (int(), int()).prop_map(|(step, position)| Frame::Ack { step, position }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1_000))]

    #[test]
    fn closed_form_equals_iteration_for_random_configs(params in params(), steps in prop::collection::vec(any::<u64>(), 1..20)) {
        let config = PatternConfig::new(params).unwrap();
        for step in steps {
            // Iterating costs `step mod reset_interval` products: bounded by the strategy.
            prop_assert_eq!(config.value(step), iterative_value(&params, step), "step {}", step);
        }
    }

    #[test]
    fn closed_form_equals_iteration_over_whole_phases(params in params(), start_phase in 0u64..1_000_000) {
        // Walk the seed's definition one step at a time across two whole phases.
        let config = PatternConfig::new(params).unwrap();
        let start = start_phase * params.reset_interval;
        let mut expected = params.seed;
        for step in start..start + params.reset_interval * 2 {
            if step % params.reset_interval == 0 {
                expected = params.seed;
            } else {
                expected = collapse_digits(expected * params.multiplier);
            }
            prop_assert_eq!(config.value(step), expected, "step {}", step);
        }
    }

    #[test]
    fn random_bytes_never_panic_the_decoder(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = Frame::decode(&bytes);
    }

    #[test]
    fn random_bodies_after_a_valid_header_never_panic(kind in prop::sample::select(vec![1u8, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0x10, 0x11, 0x12, 0x13, 0x14, 0x15]), body in prop::collection::vec(any::<u8>(), 0..300)) {
        let mut bytes = vec![2, kind, 0];
        bytes.extend_from_slice(&body);
        if let Ok(frame) = Frame::decode(&bytes) {
            // Whatever decodes re-encodes to a frame that decodes to the same value.
            prop_assert_eq!(Frame::decode(&frame.encode()), Ok(frame));
        }
    }

    #[test]
    fn frames_round_trip(frame in frame()) {
        prop_assert_eq!(Frame::decode(&frame.encode()), Ok(frame));
    }

    #[test]
    fn integers_above_2_pow_53_are_refused(step in (MAX_SAFE_INTEGER + 1)..=u64::MAX, position in int()) {
        let bytes = Frame::Ack { step, position }.encode();
        prop_assert_eq!(
            Frame::decode(&bytes),
            Err(DecodeError::Unsafe { field: "step", value: step })
        );
    }

    #[test]
    fn mutated_frames_decode_or_fail_cleanly(frame in frame(), flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6), cut in any::<prop::sample::Index>()) {
        let mut bytes = frame.encode();
        for (at, byte) in flips {
            let i = at.index(bytes.len());
            bytes[i] ^= byte;
        }
        let _ = Frame::decode(&bytes);
        let cut = cut.index(bytes.len() + 1);
        let small = Limits { max_frame: 64, ..Limits::default() };
        if let Err(e) = Frame::decode_with(&bytes[..cut], &small) {
            prop_assert!(!e.to_string().is_empty());
        }
    }
}
