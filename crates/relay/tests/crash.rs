//! The relay as a process. It is killed with SIGKILL in the middle of a stream and restarted on
//! the same data directory: every acknowledged message is still there, and the room's step and
//! each sender's replay protection continue from where they were. And its resident memory is
//! measured while joiners that read nothing hang on a large log.

mod common;

use std::collections::BTreeSet;
use std::process::{Child, Command};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use pattern_mesh_client::{Connection, JoinOptions, Welcome};
use pattern_mesh_core::pattern::{PatternConfig, MAX_SAFE_INTEGER};
use pattern_mesh_core::wire::{Body, Frame, Json, Reason, Stamp};
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(10);

/// A relay process, killed when dropped so a failing test leaves none behind.
struct Relay(Child);

impl std::ops::Deref for Relay {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Relay {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_relay(dir: &std::path::Path) -> (Relay, String) {
    start_relay_with(dir, &[])
}

/// Starts the relay binary on `dir` with `args` besides the defaults of these tests.
fn start_relay_with(dir: &std::path::Path, args: &[&str]) -> (Relay, String) {
    let dir = dir.to_str().expect("a UTF-8 path");
    let all: Vec<&str> = ["--data-dir", dir]
        .into_iter()
        .chain(args.iter().copied())
        .collect();
    let (child, addr) = common::spawn_relay(&all);
    (Relay(child), addr)
}

async fn connect(addr: &str, since: u64, resume: Option<[u8; 16]>) -> (Connection, Welcome) {
    let options = JoinOptions {
        room: "crash".into(),
        name: "writer".into(),
        since,
        log: 0,
        resume,
        config: None,
    };
    tokio::time::timeout(WAIT, Connection::join(&format!("ws://{addr}/ws"), options))
        .await
        .expect("joined within the wait")
        .expect("joined")
}

fn data(node: u64, step: u64) -> Frame {
    Frame::stamped(
        Stamp {
            sender: node,
            step,
            pattern: PatternConfig::default().value(step),
        },
        Body::Data {
            data: Json::from_value(&serde_json::json!({ "step": step })).unwrap(),
        },
    )
}

#[tokio::test]
async fn acknowledged_messages_survive_sigkill_and_the_step_continues() {
    let dir = std::env::temp_dir().join(format!("pattern-mesh-crash-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (mut relay, addr) = start_relay(&dir);

    // A writer that streams without waiting, and a reader that collects acks.
    let (conn, welcome) = connect(&addr, 0, None).await;
    let (node, resume) = (welcome.node, welcome.resume);
    let (mut sink, mut stream) = conn.into_socket().split();
    let writer = tokio::spawn(async move {
        for step in 1..=5_000u64 {
            if sink
                .send(Message::Binary(data(node, step).encode().into()))
                .await
                .is_err()
            {
                break;
            }
            if step % 50 == 0 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    });
    let mut acked = BTreeSet::new();
    let mut killed = false;
    while let Ok(Some(Ok(message))) = tokio::time::timeout(WAIT, stream.next()).await {
        let Message::Binary(bytes) = message else {
            continue;
        };
        if let Ok(Frame::Ack { step, .. }) = Frame::decode(&bytes) {
            acked.insert(step);
            if acked.len() == 300 && !killed {
                // Mid-stream: more frames are in flight, some in the store's queue.
                relay.kill().unwrap();
                killed = true;
            }
        }
    }
    assert!(killed, "the relay was killed mid-stream");
    let _ = relay.wait();
    writer.abort();
    let last_acked = *acked.last().unwrap();
    assert!(acked.len() >= 300);

    // Restart on the same directory.
    let (mut relay, addr) = start_relay(&dir);
    let (_reader, welcome) = connect(&addr, 0, None).await;
    let stored: BTreeSet<u64> = welcome
        .replay
        .iter()
        .filter_map(|p| p.frame.stamp().filter(|s| s.sender == node).map(|s| s.step))
        .collect();
    let lost: Vec<_> = acked.difference(&stored).collect();
    assert!(
        lost.is_empty(),
        "acknowledged but lost after SIGKILL: {lost:?}"
    );

    // The same node resumes: the room's high step and its replay protection survived.
    let (mut conn, welcome) = connect(&addr, MAX_SAFE_INTEGER, Some(resume)).await;
    let (again, high) = (welcome.node, welcome.high);
    assert_eq!(again, node, "the resume token survived the restart");
    assert!(
        high >= last_acked,
        "room high {high} is below the last acknowledged step {last_acked}"
    );
    conn.send(&data(node, last_acked)).await.unwrap();
    conn.send(&data(node, high + 1)).await.unwrap();
    let mut verdicts = Vec::new();
    while verdicts.len() < 2 {
        match conn.recv_within(WAIT).await.unwrap().frame {
            Frame::Reject { reason, step, .. } => verdicts.push((step, Err(reason))),
            Frame::Ack { step, .. } => verdicts.push((step, Ok(()))),
            _ => {}
        }
    }
    assert_eq!(
        verdicts,
        [(last_acked, Err(Reason::Replay)), (high + 1, Ok(()))]
    );
    relay.kill().unwrap();
    let _ = relay.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn sigterm_closes_clients_with_1001_and_exits_cleanly() {
    let dir = std::env::temp_dir().join(format!("pattern-mesh-term-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (mut relay, addr) = start_relay(&dir);
    let (mut conn, _) = connect(&addr, 0, None).await;
    let status = Command::new("kill")
        .args(["-TERM", &relay.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let (code, _) = conn.closed(WAIT).await.unwrap();
    assert_eq!(code, 1001);
    let exit = tokio::task::spawn_blocking(move || relay.0.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(
        exit.success(),
        "the relay exits cleanly after SIGTERM: {exit}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The relay's resident memory, in bytes.
fn resident(relay: &Relay) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", relay.id())).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib * 1024
}

/// Finding 6 of the hostile-load issue: joiners that do not read cost the relay their queue
/// bound, not the log. A room log of 100 MiB, then 8 joiners that send their join and read
/// nothing: the relay's whole resident memory stays under 100 MiB.
#[tokio::test]
async fn joiners_that_do_not_read_a_large_log_cost_little_memory() {
    let dir = std::env::temp_dir().join(format!("pattern-mesh-rss-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (relay, addr) = start_relay_with(
        &dir,
        &[
            "--bandwidth",
            "1073741824",
            "--ip-rate",
            "100000",
            "--ip-bandwidth",
            "1073741824",
        ],
    );
    let (mut writer, welcome) = connect(&addr, 0, None).await;
    let node = welcome.node;
    let chunk = serde_json::Value::String("x".repeat(1_000_000));
    for step in 1..=105u64 {
        let frame = Frame::stamped(
            Stamp {
                sender: node,
                step,
                pattern: PatternConfig::default().value(step),
            },
            Body::Data {
                data: Json::from_value(&chunk).unwrap(),
            },
        );
        writer.send(&frame).await.unwrap();
        loop {
            match writer.recv_within(WAIT).await.unwrap().frame {
                Frame::Ack { step: acked, .. } if acked == step => break,
                Frame::Reject { detail, .. } => panic!("{detail}"),
                _ => {}
            }
        }
    }
    drop(writer);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = resident(&relay);
    let mut joiners = Vec::new();
    for i in 0..8 {
        let join = Frame::Join {
            room: "crash".into(),
            name: format!("stalled {i}"),
            since: 0,
            log: 0,
            resume: None,
            config: None,
            floor: false,
        };
        joiners.push(
            Connection::open(&format!("ws://{addr}/ws"), &join)
                .await
                .unwrap(),
        );
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = resident(&relay);
    println!(
        "a 100 MiB log; relay resident memory {} MiB before 8 stalled joiners, {} MiB with them",
        before >> 20,
        after >> 20
    );
    assert!(after < 100 << 20, "{} MiB", after >> 20);
    drop(joiners);
    drop(relay);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A relay that keeps its rooms in memory (`--memory`) and restarts has lost every room: its
/// clients must see that their log is gone, and give their documents back, or the new log
/// holds none of what they hold, their next edits build on clocks it never stored (the relay
/// refuses them), and a late joiner gets an empty document. A client sees it by the log's
/// identity, which came from a counter that started over with the process: the restarted
/// relay's first room had the identity the old one's had.
#[tokio::test]
async fn a_relay_on_memory_that_restarts_gives_its_rooms_new_log_identities() {
    let (child, addr) = common::spawn_relay(&["--memory"]);
    let first = Relay(child);
    let (mut conn, welcome) = connect(&addr, 0, None).await;
    conn.send(&data(welcome.node, 1)).await.unwrap();
    drop(conn);
    drop(first);
    let (child, addr) = common::spawn_relay(&["--memory"]);
    let _second = Relay(child);
    let (_conn, again) = connect(&addr, 0, None).await;
    assert_ne!(again.log, welcome.log, "a new log, not the lost one");
}
