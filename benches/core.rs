//! Criterion benchmarks of the core's hot paths: `value(step)` (against the seed's step-by-step
//! iteration), encode, decode, validate, and the automerge-paper editing trace through
//! `SharedDoc`, and the size of a room's log after a million small updates (it compacts as it
//! goes). Run with `cargo bench --bench core`; `-- --quick` is criterion's short pass
//! (and replays only the trace's first 5,000 transactions). It prints figures and never fails
//! on a time.

#[cfg(not(target_arch = "wasm32"))]
#[path = "../crates/core/tests/support/compaction.rs"]
mod compaction;

#[cfg(not(target_arch = "wasm32"))]
mod native {
    use std::hint::black_box;
    use std::io::Read;
    use std::time::{Duration, Instant};

    use criterion::{BatchSize, Criterion, Throughput};
    use pattern_mesh::doc::SharedDoc;
    use pattern_mesh::pattern::{iterative_value, PatternConfig, PatternParams};
    use pattern_mesh::validate::{Origin, Validator, ValidatorConfig};
    use pattern_mesh::wire::{Body, Frame, Json, Kind, Stamp};

    /// A spread of steps, so that no branch predictor learns one step.
    fn step(i: u64) -> u64 {
        i.wrapping_mul(2_654_435_761) >> 8
    }

    fn pattern(c: &mut Criterion) {
        let params = PatternParams::default();
        let config = PatternConfig::new(params).expect("default config");
        let mut group = c.benchmark_group("pattern value(step)");
        let mut i = 0u64;
        group.bench_function("closed form", |b| {
            b.iter(|| {
                i += 1;
                config.value(black_box(step(i)))
            })
        });
        group.bench_function("seed's iteration", |b| {
            b.iter(|| {
                i += 1;
                iterative_value(&params, black_box(step(i)))
            })
        });
        group.finish();
    }

    fn frames(c: &mut Criterion) {
        let config = PatternConfig::new(PatternParams::default()).expect("default config");
        let stamp = Stamp {
            sender: 12,
            step: 123_456,
            pattern: config.value(123_456),
        };
        let data = Frame::stamped(
            stamp,
            Body::Data {
                data: Json::parse(r#"{"temperature":23.5,"unit":"C","sensor":"north-3"}"#)
                    .expect("json"),
            },
        );
        let update = Frame::stamped(
            stamp,
            Body::Update {
                doc: "content".into(),
                update: vec![7; 200],
            },
        );
        let mut group = c.benchmark_group("frames");
        for (name, frame) in [("data (JSON)", &data), ("update (200 B)", &update)] {
            let bytes = frame.encode();
            group.throughput(Throughput::Bytes(bytes.len() as u64));
            group.bench_function(format!("encode {name}, {} bytes", bytes.len()), |b| {
                b.iter(|| black_box(frame).encode())
            });
            group.bench_function(format!("decode {name}, {} bytes", bytes.len()), |b| {
                b.iter(|| Frame::decode(black_box(&bytes)).expect("decodes"))
            });
        }
        group.finish();
    }

    fn validate(c: &mut Criterion) {
        let config = PatternConfig::new(PatternParams::default()).expect("default config");
        let mut validator = Validator::new(ValidatorConfig::default());
        let mut i = 0u64;
        c.bench_function("validate (1,000 senders, accepted)", |b| {
            b.iter(|| {
                i += 1;
                let stamp = Stamp {
                    sender: 1 + i % 1_000,
                    step: i,
                    pattern: config.value(i),
                };
                validator.check(
                    Kind::Data,
                    black_box(&stamp),
                    Origin::Relayed { receiver: 0 },
                    i,
                    i,
                )
            })
        });
    }

    /// The automerge-paper editing trace (tests/data, CC BY 4.0).
    struct Trace {
        txns: Vec<Vec<(u32, u32, String)>>,
        end_content: String,
    }

    fn load_trace() -> Trace {
        #[derive(serde::Deserialize)]
        struct Raw {
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
        let raw: Raw = serde_json::from_str(&json).expect("json");
        Trace {
            txns: raw.txns.into_iter().map(|t| t.patches).collect(),
            end_content: raw.end_content,
        }
    }

    /// Replays the trace through `SharedDoc`, one transaction (and one encoded update) per
    /// keystroke, as a browser editor does. With `--quick`, the first 5,000 transactions.
    fn trace(c: &mut Criterion, quick: bool) {
        let trace = load_trace();
        let count = if quick { 5_000 } else { trace.txns.len() };
        let replay = |txns: &[Vec<(u32, u32, String)>]| {
            let doc = SharedDoc::with_client_id(1);
            for patches in txns {
                let patches: Vec<(u32, u32, &str)> = patches
                    .iter()
                    .map(|(p, d, i)| (*p, *d, i.as_str()))
                    .collect();
                black_box(doc.splice_all("content", &patches).expect("in range"));
            }
            doc
        };
        if !quick {
            let doc = replay(&trace.txns);
            assert_eq!(doc.text("content"), trace.end_content);
        }

        let mut group = c.benchmark_group("automerge-paper trace");
        group.sample_size(10);
        group.measurement_time(Duration::from_secs(if quick { 1 } else { 60 }));
        group.throughput(Throughput::Elements(count as u64));
        group.bench_function(format!("{count} txns"), |b| {
            b.iter_batched(
                || (),
                |()| replay(&trace.txns[..count]),
                BatchSize::PerIteration,
            )
        });
        group.finish();
    }

    /// A million small updates through a room (20,000 with `--quick`): the size of its log
    /// against the document's. Prints; asserts nothing.
    fn compaction(quick: bool) {
        let updates = if quick { 20_000 } else { 1_000_000 };
        let limits = pattern_mesh::room::RoomLimits {
            rate: u64::MAX / 4,
            burst: u64::MAX / 4,
            ..Default::default()
        };
        let start = Instant::now();
        let m = super::compaction::run(updates, limits);
        println!(
            "compaction: {} updates in {:.1} s; document {} bytes, log {} bytes ({} snapshots, tail {} bytes): log / (document + tail) = {:.2}",
            m.updates,
            start.elapsed().as_secs_f64(),
            m.document,
            m.stored,
            m.snapshots,
            m.tail,
            m.stored as f64 / (m.document + m.tail) as f64
        );
    }

    pub fn main() {
        let quick = std::env::args().any(|a| a == "--quick");
        let start = Instant::now();
        let mut c = Criterion::default().configure_from_args();
        pattern(&mut c);
        frames(&mut c);
        validate(&mut c);
        trace(&mut c, quick);
        c.final_summary();
        compaction(quick);
        eprintln!("benchmarks took {:.1} s", start.elapsed().as_secs_f64());
    }
}

#[cfg(not(target_arch = "wasm32"))]
fn main() {
    native::main()
}

/// The benchmarks are native; on wasm32 there is nothing to run.
#[cfg(target_arch = "wasm32")]
fn main() {}
