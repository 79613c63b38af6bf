//! A load generator for the relay: many real WebSocket clients, real frames.
//!
//! ```text
//! cargo run --release --example loadgen -- load --addr 127.0.0.1:8080 --rooms 100 --members 10 --messages 200
//! cargo run --release --example loadgen -- idle --addr 127.0.0.1:8080 --connections 1000 --relay-pid PID
//! ```
//!
//! `load`: every member of every room sends `--messages` data frames of about `--payload` bytes,
//! each as soon as its window of `--window` unacknowledged frames allows (or at `--rate` per
//! second per member), and every member measures the delay from send to delivery. It prints
//! accepted messages per second, deliveries per second, and p50/p99/p999 delivery latency.
//! `idle`: opens connections that join and stay quiet, then prints the relay's resident memory
//! per connection. Start the relay with a high `--max-rate` for `load`.

mod native {
    use std::collections::HashMap;
    use std::hash::{Hash, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    use std::sync::Arc;
    use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

    use clap::{Parser, Subcommand};
    use futures_util::{SinkExt, StreamExt};
    use pattern_mesh_client::{Connection, JoinOptions};
    use pattern_mesh_core::pattern::PatternConfig;
    use pattern_mesh_core::wire::{Body, Frame, Stamp, Stamped};
    use tokio::sync::Mutex;
    use tokio_tungstenite::tungstenite::Message;

    #[derive(Parser)]
    struct Args {
        #[command(subcommand)]
        mode: Mode,
    }

    /// Which relay protocol to speak.
    #[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
    enum Target {
        /// This project's relay: binary frames on `/ws`, stamped and acknowledged.
        PatternMesh,
        /// y-websocket's server: its sync protocol on `/<room>`.
        YWebsocket,
    }

    #[derive(Subcommand)]
    enum Mode {
        /// Rooms of members sending real Yjs text updates to each other.
        Load {
            #[arg(long, value_enum, default_value = "pattern-mesh")]
            target: Target,
            #[arg(long, default_value = "127.0.0.1:8080")]
            addr: String,
            #[arg(long, default_value_t = 1)]
            rooms: usize,
            #[arg(long, default_value_t = 16)]
            members: usize,
            /// Messages each member sends.
            #[arg(long, default_value_t = 500)]
            messages: u64,
            /// Approximate bytes of each Yjs update.
            #[arg(long, default_value_t = 200)]
            payload: usize,
            /// Messages per second per member; 0 sends as fast as the socket takes them.
            #[arg(long, default_value_t = 0.0)]
            rate: f64,
            /// The relay's process id, to report its CPU time and memory.
            #[arg(long)]
            relay_pid: Option<u32>,
        },
        /// Connections that join and stay idle; prints the relay's memory per connection.
        Idle {
            #[arg(long, value_enum, default_value = "pattern-mesh")]
            target: Target,
            #[arg(long, default_value = "127.0.0.1:8080")]
            addr: String,
            #[arg(long, default_value_t = 1_000)]
            connections: usize,
            /// Members per room.
            #[arg(long, default_value_t = 10)]
            members: usize,
            /// The relay's process id, to read its resident memory.
            #[arg(long)]
            relay_pid: u32,
        },
    }

    fn now_micros() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0)
    }

    type Socket = tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >;

    /// Opens a member's connection; for pattern-mesh, joins and waits for the catch-up.
    /// Returns the socket, the node id and the room's high step.
    async fn join(target: Target, addr: &str, room: &str) -> anyhow::Result<(Socket, u64, u64)> {
        let url = match target {
            Target::PatternMesh => format!("ws://{addr}/ws"),
            Target::YWebsocket => format!("ws://{addr}/{room}"),
        };
        if target == Target::YWebsocket {
            let (ws, _) = tokio_tungstenite::connect_async_with_config(url, None, true).await?;
            return Ok((ws, 0, 0));
        }
        let options = JoinOptions {
            room: room.into(),
            name: "load".into(),
            ..JoinOptions::default()
        };
        let (connection, welcome) = Connection::join(&url, options).await?;
        Ok((connection.into_socket(), welcome.node, welcome.high))
    }

    fn rss_kib(pid: u32) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no VmRSS for {pid}"))
    }

    /// User plus system CPU seconds of a process.
    fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        let ticks: u64 = fields.get(11).and_then(|u| u.parse().ok()).unwrap_or(0)
            + fields.get(12).and_then(|s| s.parse().ok()).unwrap_or(0);
        Ok(ticks as f64 / 100.0)
    }

    fn percentile(sorted: &[u64], p: f64) -> f64 {
        if sorted.is_empty() {
            return f64::NAN;
        }
        let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
        sorted[i] as f64 / 1_000.0
    }

    fn fingerprint(update: &[u8]) -> u64 {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        update.hash(&mut hasher);
        hasher.finish()
    }

    /// y-websocket's framing of an update: messageSync (0), messageYjsUpdate (2), then the
    /// update as a length-prefixed byte array.
    fn y_websocket_update(update: &[u8]) -> Vec<u8> {
        let mut out = vec![0, 2];
        let mut len = update.len();
        while len >= 0x80 {
            out.push((len as u8) | 0x80);
            len >>= 7;
        }
        out.push(len as u8);
        out.extend_from_slice(update);
        out
    }

    /// The Yjs update carried by an incoming message, if it carries one.
    fn received_update(target: Target, bytes: &[u8]) -> Option<Vec<u8>> {
        match target {
            Target::PatternMesh => match Frame::decode(bytes).ok()? {
                Frame::Stamped(Stamped {
                    body: Body::Update { update, .. },
                    ..
                }) => Some(update),
                _ => None,
            },
            Target::YWebsocket => {
                if bytes.len() < 3 || bytes[0] != 0 || bytes[1] != 2 {
                    return None;
                }
                let (mut len, mut shift, mut i) = (0usize, 0, 2);
                loop {
                    let b = *bytes.get(i)?;
                    len |= usize::from(b & 0x7f) << shift;
                    i += 1;
                    if b & 0x80 == 0 {
                        break;
                    }
                    shift += 7;
                }
                bytes.get(i..i + len).map(<[u8]>::to_vec)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn load(
        target: Target,
        addr: String,
        rooms: usize,
        members: usize,
        messages: u64,
        payload: usize,
        rate: f64,
        relay_pid: Option<u32>,
    ) -> anyhow::Result<()> {
        let pattern = PatternConfig::default();
        let sent_at: Arc<std::sync::Mutex<HashMap<u64, Instant>>> = Arc::default();
        let latencies = Arc::new(Mutex::new(Vec::<u64>::new()));
        let delivered = Arc::new(AtomicU64::new(0));
        let run = format!("{:x}", now_micros());
        let mut sockets = Vec::new();
        for r in 0..rooms {
            for _ in 0..members {
                sockets.push(join(target, &addr, &format!("load-{run}-{r}")).await?);
            }
        }
        // Let y-websocket's opening sync exchange settle before measuring.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let expected_each = messages * (members as u64 - 1);
        let cpu_before = relay_pid.map(cpu_seconds).transpose()?;
        let start = Instant::now();
        let mut tasks = Vec::new();
        let total = sockets.len();
        for (index, (ws, node, high)) in sockets.into_iter().enumerate() {
            let (mut sink, mut stream) = ws.split();
            let local = Arc::new(AtomicU64::new(high));
            let (l, d, lat, sent) = (
                local.clone(),
                delivered.clone(),
                latencies.clone(),
                sent_at.clone(),
            );
            let reader = tokio::spawn(async move {
                let (mut got, mut mine) = (0u64, Vec::new());
                while got < expected_each {
                    let Ok(Some(Ok(message))) =
                        tokio::time::timeout(Duration::from_secs(30), stream.next()).await
                    else {
                        break;
                    };
                    let Message::Binary(bytes) = message else {
                        continue;
                    };
                    if let Some((_, stamp)) = pattern_mesh_core::wire::peek_stamp(&bytes) {
                        l.fetch_max(stamp.step, Relaxed);
                    }
                    let Some(update) = received_update(target, &bytes) else {
                        continue;
                    };
                    let now = Instant::now();
                    if let Some(at) = sent
                        .lock()
                        .ok()
                        .and_then(|m| m.get(&fingerprint(&update)).copied())
                    {
                        mine.push(now.duration_since(at).as_micros() as u64);
                    }
                    got += 1;
                    d.fetch_add(1, Relaxed);
                }
                lat.lock().await.extend(mine);
                stream
            });
            let sent = sent_at.clone();
            let writer = tokio::spawn(async move {
                let doc = pattern_mesh_core::doc::SharedDoc::with_client_id(1_000 + index as u64);
                let chunk = "x".repeat(payload.saturating_sub(40).max(1));
                let interval = (rate > 0.0).then(|| Duration::from_secs_f64(1.0 / rate));
                // Spread the members' ticks over one interval, as independent clients would be.
                let offset =
                    interval.map_or(Duration::ZERO, |i| i.mul_f64(index as f64 / total as f64));
                let begin = Instant::now() + offset;
                for i in 0..messages {
                    if let Some(interval) = interval {
                        tokio::time::sleep_until((begin + interval * i as u32).into()).await;
                    }
                    let update = doc.insert("content", 0, &chunk).expect("insert at 0");
                    let bytes = match target {
                        Target::PatternMesh => {
                            let step = local.fetch_add(1, Relaxed) + 1;
                            Frame::stamped(
                                Stamp {
                                    sender: node,
                                    step,
                                    pattern: pattern.value(step),
                                },
                                Body::Update {
                                    doc: "content".into(),
                                    update: update.clone(),
                                },
                            )
                            .encode()
                        }
                        Target::YWebsocket => y_websocket_update(&update),
                    };
                    if let Ok(mut map) = sent.lock() {
                        map.insert(fingerprint(&update), Instant::now());
                    }
                    if sink.send(Message::Binary(bytes.into())).await.is_err() {
                        break;
                    }
                }
                sink
            });
            tasks.push((reader, writer));
        }
        let mut keep = Vec::new();
        for (reader, writer) in tasks {
            let sink = writer.await?;
            let stream = reader.await?;
            keep.push((sink, stream));
        }
        let elapsed = start.elapsed().as_secs_f64();
        let cpu = match (relay_pid, cpu_before) {
            (Some(pid), Some(before)) => Some(cpu_seconds(pid)? - before),
            _ => None,
        };
        let mut lat = latencies.lock().await.clone();
        lat.sort_unstable();
        let delivered = delivered.load(Relaxed);
        let name = match target {
            Target::PatternMesh => "pattern-mesh",
            Target::YWebsocket => "y-websocket",
        };
        println!(
            "{name}: {rooms} rooms x {members} members, {messages} updates each (~{payload} B), {}",
            if rate > 0.0 {
                format!("{rate}/s per member")
            } else {
                "flat out".into()
            }
        );
        println!(
            "  delivered {:.0} msg/s ({delivered} of {} in {elapsed:.2} s)",
            delivered as f64 / elapsed,
            expected_each * (rooms * members) as u64
        );
        println!(
            "  delivery latency ms: p50 {:.2}  p99 {:.2}  p999 {:.2}  max {:.2}",
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            percentile(&lat, 0.999),
            percentile(&lat, 1.0)
        );
        if let (Some(cpu), Some(pid)) = (cpu, relay_pid) {
            println!(
                "  relay CPU {:.2} s for {delivered} deliveries: {:.2} s per 100k; relay RSS {} KiB",
                cpu,
                cpu / delivered.max(1) as f64 * 100_000.0,
                rss_kib(pid)?
            );
        }
        println!(
            "RESULT {name} rooms={rooms} members={members} rate={rate} delivered_per_s={:.0} p50_ms={:.2} p99_ms={:.2} p999_ms={:.2} cpu_s_per_100k={:.3}",
            delivered as f64 / elapsed,
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            percentile(&lat, 0.999),
            cpu.map_or(f64::NAN, |c| c / delivered.max(1) as f64 * 100_000.0)
        );
        drop(keep);
        Ok(())
    }

    async fn idle(
        target: Target,
        addr: String,
        connections: usize,
        members: usize,
        pid: u32,
    ) -> anyhow::Result<()> {
        let before = rss_kib(pid)?;
        let run = format!("{:x}", now_micros());
        let mut sockets = Vec::with_capacity(connections);
        for i in 0..connections {
            sockets.push(
                join(target, &addr, &format!("idle-{run}-{}", i / members.max(1)))
                    .await?
                    .0,
            );
        }
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        let after = rss_kib(pid)?;
        let per = after.saturating_sub(before) as f64 / connections as f64;
        println!(
            "idle: {connections} connections in rooms of {members}: relay RSS {before} KiB -> {after} KiB, {per:.1} KiB per connection"
        );
        println!("RESULT idle connections={connections} kib_per_connection={per:.1}");
        drop(sockets);
        Ok(())
    }

    pub fn main() -> anyhow::Result<()> {
        let args = Args::parse();
        let runtime = tokio::runtime::Runtime::new()?;
        runtime.block_on(async move {
            match args.mode {
                Mode::Load {
                    target,
                    addr,
                    rooms,
                    members,
                    messages,
                    payload,
                    rate,
                    relay_pid,
                } => {
                    load(
                        target, addr, rooms, members, messages, payload, rate, relay_pid,
                    )
                    .await
                }
                Mode::Idle {
                    target,
                    addr,
                    connections,
                    members,
                    relay_pid,
                } => idle(target, addr, connections, members, relay_pid).await,
            }
        })
    }
}

fn main() -> anyhow::Result<()> {
    native::main()
}
