//! A document gives back all its memory when it is dropped, whatever members wrote into it.
//!
//! The relay drops a room's document whenever the room unloads, and loads it again from the log
//! when a member comes back; a document that stayed allocated after its drop would grow the
//! relay's memory by the whole document on every load, at any member's will. The test binary
//! counts the bytes its allocator holds (one test, so nothing else allocates meanwhile).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use pattern_mesh_core::doc::SharedDoc;
use yrs::{Doc, Map, ReadTxn, Text, Transact};

/// The system allocator, counting the bytes it holds.
struct Counting;

static HELD: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        HELD.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        HELD.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        HELD.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// What a Yjs app with a sub-document writes: a text, and a map holding a sub-document (a
/// `Y.Doc` set as a map value).
fn a_document_with_a_subdocument() -> Vec<u8> {
    let writer = Doc::with_client_id(7);
    let text = writer.get_or_insert_text("content");
    let map = writer.get_or_insert_map("files");
    {
        let mut txn = writer.transact_mut();
        text.insert(&mut txn, 0, &"a line of the shared text\n".repeat(400));
        map.insert(&mut txn, "notes", Doc::new());
    }
    let update = writer
        .transact()
        .encode_state_as_update_v1(&Default::default());
    update
}

#[test]
fn a_room_document_that_took_a_subdocument_frees_it_when_dropped() {
    let update = a_document_with_a_subdocument();
    // Once, so that whatever is allocated on first use (and kept) is counted before.
    drop(load(&update));
    let before = HELD.load(Ordering::Relaxed);
    const LOADS: isize = 50;
    for _ in 0..LOADS {
        drop(load(&update));
    }
    let kept = HELD.load(Ordering::Relaxed) - before;
    assert!(
        kept < 1024,
        "{LOADS} loads of a {}-byte document kept {kept} bytes after their drops",
        update.len()
    );
}

/// The room's document, as the relay loads it: the member's update taken through the check,
/// and read.
fn load(update: &[u8]) -> SharedDoc {
    let room = SharedDoc::new();
    room.apply_member_update(update)
        .expect("the room takes the update");
    assert_eq!(room.text("content").len(), 26 * 400);
    room
}
