//! The document core against real editing traces (tests/data/editing-traces, CC BY 4.0), and a
//! property test of convergence under random concurrent edits and delivery orders.
#![cfg(not(target_arch = "wasm32"))]

use std::collections::HashSet;
use std::io::Read;

use pattern_mesh::doc::SharedDoc;
use proptest::prelude::*;
use serde::Deserialize;

#[derive(Deserialize)]
struct Trace {
    #[serde(default, rename = "startContent")]
    start_content: String,
    #[serde(rename = "endContent")]
    end_content: String,
    txns: Vec<Txn>,
}

#[derive(Deserialize)]
struct Txn {
    #[serde(default)]
    parents: Vec<usize>,
    #[serde(default)]
    agent: usize,
    patches: Vec<(u32, u32, String)>,
}

fn load(name: &str) -> Trace {
    let path = format!(
        "{}/tests/data/editing-traces/{name}.json.gz",
        env!("CARGO_MANIFEST_DIR")
    );
    let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut json = String::new();
    flate2::read::GzDecoder::new(file)
        .read_to_string(&mut json)
        .unwrap();
    serde_json::from_str(&json).unwrap()
}

fn patches(txn: &Txn) -> Vec<(u32, u32, &str)> {
    txn.patches
        .iter()
        .map(|(p, d, i)| (*p, *d, i.as_str()))
        .collect()
}

/// A small deterministic generator (xorshift64*), so that delivery orders are seeded.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, (self.next() % (i as u64 + 1)) as usize);
        }
    }
}

#[test]
fn replaying_automerge_paper_gives_its_end_content() {
    let trace = load("automerge-paper");
    let doc = SharedDoc::with_client_id(1);
    if !trace.start_content.is_empty() {
        doc.insert("content", 0, &trace.start_content).unwrap();
    }
    let started = std::time::Instant::now();
    for txn in &trace.txns {
        doc.splice_all("content", &patches(txn)).unwrap();
    }
    println!(
        "automerge-paper: {} transactions applied in {:?}",
        trace.txns.len(),
        started.elapsed()
    );
    assert_eq!(doc.text("content"), trace.end_content);
    // The whole history travels as one update and rebuilds the same text elsewhere.
    let copy = SharedDoc::with_client_id(2);
    copy.apply_update(&doc.snapshot()).unwrap();
    assert_eq!(copy.text("content"), trace.end_content);
}

/// Replays the concurrent trace with one replica per agent. Before an agent applies a
/// transaction, its replica receives the encoded updates of every causal ancestor it lacks, in
/// a seeded random order; at the end every replica receives everything.
fn replay_concurrent(trace: &Trace, seed: u64) -> Vec<SharedDoc> {
    let agents = trace.txns.iter().map(|t| t.agent).max().unwrap_or(0) + 1;
    let replicas: Vec<SharedDoc> = (0..agents)
        .map(|a| SharedDoc::with_client_id(a as u64 + 1))
        .collect();
    let mut applied: Vec<HashSet<usize>> = vec![HashSet::new(); agents];
    let mut updates: Vec<Vec<u8>> = Vec::with_capacity(trace.txns.len());
    let mut rng = Rng(seed);
    for (index, txn) in trace.txns.iter().enumerate() {
        let have = &mut applied[txn.agent];
        // The ancestors this replica lacks: walk back from the parents, stopping at what it has.
        let mut missing = Vec::new();
        let mut stack: Vec<usize> = txn.parents.clone();
        let mut seen = HashSet::new();
        while let Some(t) = stack.pop() {
            if have.contains(&t) || !seen.insert(t) {
                continue;
            }
            missing.push(t);
            stack.extend(trace.txns[t].parents.iter().copied());
        }
        rng.shuffle(&mut missing);
        let replica = &replicas[txn.agent];
        for t in missing {
            replica.apply_update(&updates[t]).unwrap();
            have.insert(t);
        }
        assert!(
            !replica.has_pending(),
            "txn {index}: every ancestor was delivered"
        );
        updates.push(
            replica
                .splice_all("content", &patches(txn))
                .unwrap_or_else(|e| panic!("txn {index}: {e}")),
        );
        have.insert(index);
    }
    for (agent, replica) in replicas.iter().enumerate() {
        let mut rest: Vec<usize> = (0..trace.txns.len())
            .filter(|t| !applied[agent].contains(t))
            .collect();
        rng.shuffle(&mut rest);
        for t in rest {
            replica.apply_update(&updates[t]).unwrap();
        }
    }
    replicas
}

#[test]
fn replaying_clownschool_concurrently_converges_on_its_end_content() {
    let trace = load("clownschool");
    for seed in [1, 0x9e37_79b9_7f4a_7c15] {
        let replicas = replay_concurrent(&trace, seed);
        assert_eq!(replicas.len(), 3);
        for (agent, replica) in replicas.iter().enumerate() {
            assert_eq!(
                replica.text("content"),
                trace.end_content,
                "agent {agent}, seed {seed}"
            );
        }
        assert_eq!(replicas[0].digest(), replicas[2].digest());
    }
}

#[derive(Debug, Clone)]
enum Edit {
    Insert { at: u32, text: String },
    Delete { at: u32, len: u32 },
}

fn edit() -> impl Strategy<Value = (usize, Edit)> {
    (
        0usize..5,
        prop_oneof![
            (any::<u32>(), "[a-zé😀 ]{1,4}").prop_map(|(at, text)| Edit::Insert { at, text }),
            (any::<u32>(), 1u32..4).prop_map(|(at, len)| Edit::Delete { at, len }),
        ],
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn random_concurrent_edits_converge_whatever_the_delivery_order(
        replicas in 2usize..=5,
        edits in prop::collection::vec(edit(), 1..60),
        seed in 1u64..u64::MAX,
        sync_every in 1usize..20,
    ) {
        let docs: Vec<SharedDoc> = (0..replicas).map(|r| SharedDoc::with_client_id(r as u64 + 1)).collect();
        let mut updates: Vec<Vec<u8>> = Vec::new();
        let mut rng = Rng(seed);
        for (i, (who, edit)) in edits.into_iter().enumerate() {
            let doc = &docs[who % replicas];
            let len = doc.len("t");
            let before: Vec<u16> = doc.text("t").encode_utf16().collect();
            let mut expected = before.clone();
            let update = match edit {
                Edit::Insert { at, text } => {
                    // Indexes are UTF-16 units: never split a surrogate pair.
                    let mut at = at % (len + 1);
                    while at > 0 && at < len && (0xdc00..0xe000).contains(&before[at as usize]) {
                        at -= 1;
                    }
                    expected.splice(at as usize..at as usize, text.encode_utf16());
                    doc.insert("t", at, &text).ok()
                }
                Edit::Delete { at, len: n } if len > 0 => {
                    let mut at = at % len;
                    while at > 0 && (0xdc00..0xe000).contains(&before[at as usize]) {
                        at -= 1;
                    }
                    let mut end = (at + n).min(len);
                    while end < len && (0xdc00..0xe000).contains(&before[end as usize]) {
                        end += 1;
                    }
                    expected.drain(at as usize..end as usize);
                    doc.delete("t", at, end - at).ok()
                }
                Edit::Delete { .. } => None,
            };
            // A local edit changes exactly what a plain string splice would.
            prop_assert_eq!(doc.text("t"), String::from_utf16(&expected).unwrap());
            updates.extend(update);
            // Now and then, deliver a random subset of updates (with duplicates) to a random replica.
            if i % sync_every == 0 && !updates.is_empty() {
                let target = &docs[(rng.next() % replicas as u64) as usize];
                for _ in 0..updates.len() {
                    let u = &updates[(rng.next() % updates.len() as u64) as usize];
                    target.apply_update(u).unwrap();
                }
            }
        }
        // Finally everyone gets everything, in its own random order, some twice.
        for doc in &docs {
            let mut order: Vec<usize> = (0..updates.len()).chain(0..updates.len() / 2).collect();
            rng.shuffle(&mut order);
            for i in order {
                doc.apply_update(&updates[i]).unwrap();
            }
        }
        let expected = docs[0].text("t");
        for doc in &docs[1..] {
            prop_assert_eq!(doc.text("t"), expected.clone());
            prop_assert_eq!(doc.digest(), docs[0].digest());
        }
    }
}

/// Moves `at` off the low half of a surrogate pair in `text`.
fn snap(text: &[u16], mut at: usize) -> usize {
    while at > 0 && at < text.len() && (0xdc00..0xe000).contains(&text[at]) {
        at -= 1;
    }
    at
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Typing-like runs of edits near one another (what the text's search marker speeds up),
    /// with remote edits arriving in between, each checked against a plain string splice.
    #[test]
    fn nearby_local_edits_match_a_string_model(
        steps in prop::collection::vec((0u8..10, -6i64..6, "[a-zé😀 ]{1,3}", 1usize..5), 1..300),
    ) {
        let local = SharedDoc::with_client_id(1);
        let remote = SharedDoc::with_client_id(2);
        let mut cursor = 0i64;
        for (kind, offset, text, len) in steps {
            let before: Vec<u16> = local.text("t").encode_utf16().collect();
            let at = snap(&before, (cursor + offset).clamp(0, before.len() as i64) as usize);
            let mut expected = before.clone();
            match kind {
                0..=5 => {
                    local.insert("t", at as u32, &text).unwrap();
                    expected.splice(at..at, text.encode_utf16());
                    cursor = (at + text.encode_utf16().count()) as i64;
                }
                6..=8 if at < before.len() => {
                    let end = snap(&before, (at + len).min(before.len()));
                    let end = if end == at { (at + 2).min(before.len()) } else { end };
                    local.delete("t", at as u32, (end - at) as u32).unwrap();
                    expected.drain(at..end);
                    cursor = at as i64;
                }
                6..=8 => continue,
                _ => {
                    // Someone else edits somewhere: the update lands in the local replica.
                    remote.apply_update(&local.diff(&remote.state_vector()).unwrap()).unwrap();
                    let theirs: Vec<u16> = remote.text("t").encode_utf16().collect();
                    let there = snap(&theirs, (at * 7 + 3) % (theirs.len() + 1));
                    local.apply_update(&remote.insert("t", there as u32, "~").unwrap()).unwrap();
                    cursor += i64::from(there <= at);
                    continue;
                }
            }
            prop_assert_eq!(local.text("t"), String::from_utf16(&expected).unwrap());
        }
    }
}
