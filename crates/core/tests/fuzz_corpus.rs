//! Replays the committed fuzzing corpus (`crates/core/fuzz/corpus/<target>/`) through the same
//! harness the fuzz targets run, each batch under a time limit: every input the fuzzer kept,
//! and every input that once crashed or hung something, must pass.

#[path = "../fuzz/harness.rs"]
mod harness;

use std::path::PathBuf;
use std::time::Duration;

fn replay(target: &str, run: fn(&[u8])) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut inputs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("a corpus entry").path())
        .collect();
    inputs.sort();
    assert!(!inputs.is_empty(), "{} holds no input", dir.display());
    // In batches on a helper thread: a hang fails the test instead of stopping it.
    for batch in inputs.chunks(256) {
        let batch: Vec<(PathBuf, Vec<u8>)> = batch
            .iter()
            .map(|p| (p.clone(), std::fs::read(p).expect("readable")))
            .collect();
        let names: Vec<String> = batch.iter().map(|(p, _)| p.display().to_string()).collect();
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for (_, bytes) in &batch {
                run(bytes);
            }
            let _ = done.send(());
        });
        match finished.recv_timeout(Duration::from_secs(60)) {
            Ok(()) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                panic!("{target}: a batch did not finish within 60 s: {names:?}")
            }
            Err(_) => panic!("{target}: an input of this batch failed: {names:?}"),
        }
    }
}

#[test]
fn the_decode_corpus_passes() {
    replay("decode", harness::decode);
}

#[test]
fn the_validator_corpus_passes() {
    replay("validator", harness::validator);
}

#[test]
fn the_room_corpus_passes() {
    replay("room", harness::room);
}

#[test]
fn the_document_corpus_passes() {
    replay("document", harness::document);
}
