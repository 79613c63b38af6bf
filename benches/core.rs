//! Measures the core's hot paths and prints nanoseconds per call: `value(step)`, encode, decode
//! and validate. Run with `cargo bench --bench core`; `-- --quick` runs a short smoke pass.
//! It prints figures and never fails on a time.

#[cfg(not(target_arch = "wasm32"))]
mod native {
    use std::hint::black_box;
    use std::time::{Duration, Instant};

    use pattern_mesh::envelope::{Frame, Json, Stamp};
    use pattern_mesh::pattern::{iterative_value, PatternConfig, PatternParams};
    use pattern_mesh::validate::{Origin, Validator, ValidatorConfig};

    /// Runs `f` in batches until `budget` has passed; returns nanoseconds per call.
    fn measure(budget: Duration, mut f: impl FnMut(u64)) -> f64 {
        let mut calls = 0u64;
        let mut batch = 1_000u64;
        let start = Instant::now();
        loop {
            for i in 0..batch {
                f(calls + i);
            }
            calls += batch;
            let elapsed = start.elapsed();
            if elapsed >= budget {
                return elapsed.as_nanos() as f64 / calls as f64;
            }
            batch = batch.saturating_mul(2).min(1 << 22);
        }
    }

    fn report(name: &str, ns: f64) {
        println!("{name:<44} {ns:>10.1} ns/call {:>14.0} calls/s", 1e9 / ns);
    }

    /// Replays the automerge-paper editing trace (tests/data, CC BY 4.0) through `SharedDoc`, one
    /// transaction per keystroke, as a browser editor would. With `--quick`, the first 5,000.
    fn trace_replay(quick: bool) {
        use std::io::Read;
        #[derive(serde::Deserialize)]
        struct Trace {
            txns: Vec<Txn>,
            #[serde(rename = "endContent")]
            end_content: String,
        }
        #[derive(serde::Deserialize)]
        struct Txn {
            patches: Vec<(u32, u32, String)>,
        }
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/editing-traces/automerge-paper.json.gz"
        );
        let mut json = String::new();
        let file = std::fs::File::open(path).expect("the trace is in tests/data");
        flate2::read::GzDecoder::new(file)
            .read_to_string(&mut json)
            .expect("gzip");
        let trace: Trace = serde_json::from_str(&json).expect("json");
        let count = if quick { 5_000 } else { trace.txns.len() };
        let doc = pattern_mesh::doc::SharedDoc::with_client_id(1);
        let start = Instant::now();
        for txn in &trace.txns[..count] {
            let patches: Vec<(u32, u32, &str)> = txn
                .patches
                .iter()
                .map(|(p, d, i)| (*p, *d, i.as_str()))
                .collect();
            black_box(doc.splice_all("content", &patches).expect("in range"));
        }
        let took = start.elapsed();
        if !quick {
            assert_eq!(doc.text("content"), trace.end_content);
        }
        println!(
            "{:<44} {:>10.1} ms total {:>14.0} txns/s",
            format!("automerge-paper trace, {count} txns"),
            took.as_secs_f64() * 1e3,
            count as f64 / took.as_secs_f64()
        );
    }

    pub fn main() {
        let quick = std::env::args().any(|a| a == "--quick");
        let budget = Duration::from_millis(if quick { 20 } else { 1_000 });
        let params = PatternParams::default();
        let pattern = PatternConfig::new(params).expect("default config");

        report(
            "pattern value(step), closed form",
            measure(budget, |i| {
                black_box(pattern.value(black_box(i.wrapping_mul(2_654_435_761))));
            }),
        );
        report(
            "pattern value(step), seed's iteration",
            measure(budget, |i| {
                black_box(iterative_value(
                    &params,
                    black_box(i.wrapping_mul(2_654_435_761)),
                ));
            }),
        );

        let data = Frame::Data {
            stamp: Stamp {
                sender: 12,
                step: 123_456,
                pattern: pattern.value(123_456),
            },
            data: Json::parse(r#"{"temperature":23.5,"unit":"C","sensor":"north-3"}"#)
                .expect("json"),
        };
        let update = Frame::Update {
            stamp: Stamp {
                sender: 12,
                step: 123_456,
                pattern: pattern.value(123_456),
            },
            doc: "content".into(),
            update: vec![7; 200],
        };
        for (name, frame) in [
            ("data frame (JSON)", &data),
            ("update frame (200 B)", &update),
        ] {
            let bytes = frame.encode();
            report(
                &format!("encode {name}, {} bytes", bytes.len()),
                measure(budget, |_| {
                    black_box(black_box(frame).encode());
                }),
            );
            report(
                &format!("decode {name}, {} bytes", bytes.len()),
                measure(budget, |_| {
                    black_box(Frame::decode(black_box(&bytes)).expect("decodes"));
                }),
            );
        }

        trace_replay(quick);

        let mut validator = Validator::new(ValidatorConfig::default());
        report(
            "validate (1,000 senders, accepted)",
            measure(budget, |i| {
                let step = i + 1;
                let stamp = Stamp {
                    sender: 1 + i % 1_000,
                    step,
                    pattern: pattern.value(step),
                };
                black_box(validator.check(&stamp, Origin::Relayed { receiver: 0 }, step, i));
            }),
        );
    }
}

#[cfg(not(target_arch = "wasm32"))]
fn main() {
    native::main()
}

/// The benchmark is native; on wasm32 it does nothing.
#[cfg(target_arch = "wasm32")]
fn main() {}
