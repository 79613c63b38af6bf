//! One writer sends many small updates to a room over the in-memory store, as a typist would
//! (runs of characters at a cursor that jumps now and then, and some deletes); the room compacts
//! its log as it goes. Shared by the compaction test and the benchmark.

use bytes::Bytes;
use pattern_mesh_core::doc::SharedDoc;
use pattern_mesh_core::pattern::PatternConfig;
use pattern_mesh_core::room::{JoinRequest, Output, Reader, RoomCore, RoomLimits};
use pattern_mesh_core::store::MemoryStore;
use pattern_mesh_core::wire::{Body, Frame, Limits, RoomConfig, Stamp};

/// What a run measured.
#[derive(Debug, Clone, Copy)]
pub struct Measured {
    /// Updates sent (and stored).
    pub updates: u64,
    /// The document's encoded size (a Yjs v1 update of the whole state).
    pub document: u64,
    /// Bytes the room's log holds at the end.
    pub stored: u64,
    /// Bytes of the updates logged after the last snapshot.
    pub tail: u64,
    /// Snapshots the room wrote.
    pub snapshots: u64,
}

const ROOM: &str = "doc";

/// Carries out what the room asks of the store, at once, until it asks nothing more.
fn drain(room: &mut RoomCore, store: &MemoryStore, snapshots: &mut u64) {
    while let Some(output) = room.poll_output() {
        match output {
            Output::Append(append) => {
                *snapshots += u64::from(append.snapshot);
                room.appended(store.append_now(ROOM, append));
            }
            Output::Reserve { count } => room.reserved(store.reserve_now(ROOM, count)),
            _ => {}
        }
    }
}

/// Sends `updates` updates under `limits` and measures the log; panics if a replica built from
/// the log differs from the writer's text.
pub fn run(updates: u64, limits: RoomLimits) -> Measured {
    let store = MemoryStore::new();
    let record = store.open_now(ROOM, RoomConfig::default());
    let mut room = RoomCore::new(ROOM.into(), record, &[], limits, 0).expect("a valid room");
    let mut snapshots = 0;
    let request = || JoinRequest {
        name: "typist".into(),
        since: 0,
        log: 0,
        resume: None,
        stored: None,
        access: pattern_mesh_core::room::Access::OPEN,
        floor: false,
        released: None,
    };
    let node = match room.join(0, 1, request(), [1; 16]) {
        Ok(joined) => joined.node,
        Err(_) => {
            // The room first asks the store for node ids.
            drain(&mut room, &store, &mut snapshots);
            room.join(0, 1, request(), [1; 16]).expect("joined").node
        }
    };
    drain(&mut room, &store, &mut snapshots);
    let writer = SharedDoc::with_client_id(7);
    let pattern = PatternConfig::default();
    let mut cursor = 0u32;
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for step in 1..=updates {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let len = writer.len("content");
        if seed % 60 == 0 {
            cursor = (seed >> 8) as u32 % (len + 1);
        }
        let update = if seed % 9 == 0 && cursor > 0 {
            cursor -= 1;
            writer.delete("content", cursor, 1).expect("in range")
        } else {
            let update = writer.insert("content", cursor, "x").expect("in range");
            cursor += 1;
            update
        };
        let stamp = Stamp {
            sender: node,
            step,
            pattern: pattern.value(step),
        };
        let frame = Frame::stamped(
            stamp,
            Body::Update {
                doc: "content".into(),
                update,
            },
        );
        let read = Reader::new(limits.limits).read(Bytes::from(frame.encode()));
        room.receive(step, 1, read);
        drain(&mut room, &store, &mut snapshots);
    }

    let log = store.log(ROOM);
    let stored: u64 = log.iter().map(|l| l.bytes.len() as u64).sum();
    let last_snapshot = log.iter().rposition(|l| l.sender == 0);
    let tail: u64 = log[last_snapshot.map_or(0, |i| i + 1)..]
        .iter()
        .map(|l| l.bytes.len() as u64)
        .sum();
    // A late joiner's replica, from the log as the store serves it.
    let replica = SharedDoc::new();
    for logged in store.document_now(ROOM) {
        let limits = Limits::default().for_message();
        match Frame::decode_with(&logged.bytes, &limits).expect("a stored frame decodes") {
            Frame::Snapshot { state, .. } => replica.apply_update(&state).expect("applies"),
            Frame::Stamped(s) => {
                if let Body::Update { update, .. } = s.body {
                    replica.apply_update(&update).expect("applies");
                }
            }
            other => panic!("a document entry that is {other:?}"),
        }
    }
    assert_eq!(replica.text("content"), writer.text("content"));
    Measured {
        updates,
        document: writer.snapshot().len() as u64,
        stored,
        tail,
        snapshots,
    }
}
