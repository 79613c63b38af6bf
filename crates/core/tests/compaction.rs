//! The room compacts its own log: after many small updates, what it stores is within twice
//! the document's encoded size plus the updates since its last snapshot, and a late joiner's
//! replica built from it has the writer's text. (The million-update figure is a benchmark:
//! `cargo bench --bench core`.)

#[path = "support/compaction.rs"]
mod compaction;

use pattern_mesh_core::room::RoomLimits;

#[test]
fn the_log_stays_within_twice_the_document_plus_the_tail() {
    let limits = RoomLimits {
        rate: 1_000_000,
        burst: 1_000_000,
        compact_updates: 1_000,
        ..RoomLimits::default()
    };
    let m = compaction::run(20_000, limits);
    println!("{m:?}");
    assert_eq!(m.updates, 20_000);
    assert!(m.snapshots >= 19, "{m:?}");
    assert!(m.stored <= 2 * m.document + m.tail, "{m:?}");
}
