//! A sub-document may outlive the document that holds it (an application keeps a handle to
//! it): once that document is dropped, the sub-document says it has no parent, and never reads
//! the parent's freed blocks. (Before the vendored yrs patch `subdoc-parent.patch`, the parent
//! was never freed at all: see `memory.rs`.)

use yrs::{Doc, Map, ReadTxn, Transact};

#[test]
fn a_subdocument_kept_past_its_parent_says_it_has_none() {
    let parent = Doc::with_client_id(1);
    let files = parent.get_or_insert_map("files");
    let sub = {
        let mut txn = parent.transact_mut();
        files.insert(&mut txn, "notes", Doc::new())
    };
    assert!(sub.parent_doc().is_some());
    assert!(sub.transact().branch_id().is_some());
    // A transaction on the sub-document stays open while its parent goes.
    let open = sub.transact();
    drop(parent);
    assert!(open.parent_doc().is_none(), "the parent was dropped");
    assert!(open.branch_id().is_none());
    drop(open);
    assert!(sub.parent_doc().is_none());
    assert!(!format!("{:?}", sub.transact().store()).contains("parent block"));
}
