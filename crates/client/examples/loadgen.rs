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
        /// Hocuspocus: the same sync protocol, each message behind its document's name, after
        /// an authentication message per document.
        Hocuspocus,
    }

    impl Target {
        fn name(self) -> &'static str {
            match self {
                Target::PatternMesh => "pattern-mesh",
                Target::YWebsocket => "y-websocket",
                Target::Hocuspocus => "hocuspocus",
            }
        }
    }

    #[derive(Subcommand)]
    enum Mode {
        /// Rooms of members sending real Yjs text updates to each other.
        Load {
            #[arg(long, value_enum, default_value = "pattern-mesh")]
            target: Target,
            /// The relay's address, or several separated by commas (relays that share a store):
            /// the members are spread over them in turn.
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
            /// The relays' process ids (separated by commas), to report their CPU time and
            /// memory.
            #[arg(long, value_delimiter = ',')]
            relay_pid: Vec<u32>,
            /// The name of the RESULT line (default: the target's).
            #[arg(long)]
            label: Option<String>,
        },
        /// What one relay's death costs: a writer given every relay (`--addr a,b,...`) types
        /// into a document through the first; a reader on the last watches; the first relay is
        /// killed with SIGKILL. Prints how long the reader waited for the first edit typed after
        /// the kill, and whether every edit arrived.
        Failover {
            #[arg(long)]
            addr: String,
            /// The first relay's process id, killed mid-stream.
            #[arg(long)]
            kill_pid: u32,
            /// Edits per second.
            #[arg(long, default_value_t = 50.0)]
            rate: f64,
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
            Target::Hocuspocus => format!("ws://{addr}/"),
        };
        if target == Target::YWebsocket {
            let (ws, _) = tokio_tungstenite::connect_async_with_config(url, None, true).await?;
            return Ok((ws, 0, 0));
        }
        if target == Target::Hocuspocus {
            let (mut ws, _) = tokio_tungstenite::connect_async_with_config(url, None, true).await?;
            // Auth (2), token (0), an empty token: the server has no authentication hook.
            let mut auth = var_string(room);
            auth.extend([2, 0]);
            auth.extend(var_string(""));
            ws.send(Message::Binary(auth.into())).await?;
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

    fn var_uint(mut n: usize, out: &mut Vec<u8>) {
        while n >= 0x80 {
            out.push((n as u8) | 0x80);
            n >>= 7;
        }
        out.push(n as u8);
    }

    /// lib0's string: its length, then its bytes.
    fn var_string(s: &str) -> Vec<u8> {
        let mut out = Vec::new();
        var_uint(s.len(), &mut out);
        out.extend_from_slice(s.as_bytes());
        out
    }

    /// Reads a lib0 unsigned integer at `*i`.
    fn read_var(bytes: &[u8], i: &mut usize) -> Option<usize> {
        let (mut n, mut shift) = (0usize, 0);
        loop {
            let b = *bytes.get(*i)?;
            n |= usize::from(b & 0x7f) << shift;
            *i += 1;
            if b & 0x80 == 0 {
                return Some(n);
            }
            shift += 7;
        }
    }

    /// y-websocket's framing of an update: messageSync (0), messageYjsUpdate (2), then the
    /// update as a length-prefixed byte array. Hocuspocus puts the document's name first.
    fn y_websocket_update(update: &[u8]) -> Vec<u8> {
        let mut out = vec![0, 2];
        var_uint(update.len(), &mut out);
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
            Target::YWebsocket | Target::Hocuspocus => {
                let mut i = 0;
                if target == Target::Hocuspocus {
                    let name = read_var(bytes, &mut i)?;
                    i += name;
                }
                if read_var(bytes, &mut i)? != 0 || read_var(bytes, &mut i)? != 2 {
                    return None;
                }
                let len = read_var(bytes, &mut i)?;
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
        relay_pids: Vec<u32>,
        label: Option<String>,
    ) -> anyhow::Result<()> {
        let pattern = PatternConfig::default();
        let addrs: Vec<&str> = addr.split(',').map(str::trim).collect();
        let sent_at: Arc<std::sync::Mutex<HashMap<u64, Instant>>> = Arc::default();
        let latencies = Arc::new(Mutex::new(Vec::<u64>::new()));
        let delivered = Arc::new(AtomicU64::new(0));
        let closes = Arc::new(Mutex::new(Vec::<u16>::new()));
        let run = format!("{:x}", now_micros());
        let mut sockets = Vec::new();
        for r in 0..rooms {
            for m in 0..members {
                let addr = addrs[(r * members + m) % addrs.len()];
                let room = format!("load-{run}-{r}");
                sockets.push((room.clone(), join(target, addr, &room).await?));
            }
        }
        // Let y-websocket's opening sync exchange settle before measuring.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let expected_each = messages * (members as u64 - 1);
        let cpu_of = |pids: &[u32]| -> anyhow::Result<Option<f64>> {
            if pids.is_empty() {
                return Ok(None);
            }
            pids.iter()
                .map(|&p| cpu_seconds(p))
                .sum::<anyhow::Result<f64>>()
                .map(Some)
        };
        let cpu_before = cpu_of(&relay_pids)?;
        let start = Instant::now();
        let mut tasks = Vec::new();
        let total = sockets.len();
        for (index, (room, (ws, node, high))) in sockets.into_iter().enumerate() {
            let (mut sink, mut stream) = ws.split();
            let local = Arc::new(AtomicU64::new(high));
            // This member's own updates: a relay that echoes them (y-websocket, Hocuspocus)
            // does not get them counted as deliveries.
            let own: Arc<std::sync::Mutex<std::collections::HashSet<u64>>> = Arc::default();
            let mine_sent = own.clone();
            let (l, d, lat, sent, c) = (
                local.clone(),
                delivered.clone(),
                latencies.clone(),
                sent_at.clone(),
                closes.clone(),
            );
            let reader = tokio::spawn(async move {
                let (mut got, mut mine) = (0u64, Vec::new());
                // A reader gives up 30 s after its last update (a server's keep-alives and
                // awareness messages do not count).
                let mut last_update = Instant::now();
                while got < expected_each {
                    let deadline = (last_update + Duration::from_secs(30)).into();
                    let Ok(Some(Ok(message))) =
                        tokio::time::timeout_at(deadline, stream.next()).await
                    else {
                        break;
                    };
                    let bytes = match message {
                        Message::Binary(bytes) => bytes,
                        Message::Close(frame) => {
                            // Let go by the relay (a member that falls behind is cut off).
                            let code = frame.map_or(1005, |f| u16::from(f.code));
                            c.lock().await.push(code);
                            break;
                        }
                        _ => continue,
                    };
                    if let Some((_, stamp)) = pattern_mesh_core::wire::peek_stamp(&bytes) {
                        l.fetch_max(stamp.step, Relaxed);
                    }
                    let Some(update) = received_update(target, &bytes) else {
                        continue;
                    };
                    if own
                        .lock()
                        .is_ok_and(|own| own.contains(&fingerprint(&update)))
                    {
                        continue;
                    }
                    let now = Instant::now();
                    last_update = now;
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
                        Target::Hocuspocus => {
                            let mut framed = var_string(&room);
                            framed.extend(y_websocket_update(&update));
                            framed
                        }
                    };
                    if let Ok(mut own) = mine_sent.lock() {
                        own.insert(fingerprint(&update));
                    }
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
        let cpu = match cpu_before {
            Some(before) => cpu_of(&relay_pids)?.map(|after| after - before),
            None => None,
        };
        let mut lat = latencies.lock().await.clone();
        lat.sort_unstable();
        let delivered = delivered.load(Relaxed);
        let name = label.as_deref().unwrap_or(target.name());
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
        let closes = closes.lock().await.clone();
        if !closes.is_empty() {
            println!(
                "  {} members were let go by the relay before they had everything (close codes {closes:?})",
                closes.len()
            );
        }
        println!(
            "  delivery latency ms: p50 {:.2}  p99 {:.2}  p999 {:.2}  max {:.2}",
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            percentile(&lat, 0.999),
            percentile(&lat, 1.0)
        );
        if let Some(cpu) = cpu {
            let rss: u64 = relay_pids.iter().map(|&p| rss_kib(p).unwrap_or(0)).sum();
            println!(
                "  relay CPU {:.2} s for {delivered} deliveries: {:.2} s per 100k; relay RSS {rss} KiB",
                cpu,
                cpu / delivered.max(1) as f64 * 100_000.0,
            );
        }
        println!(
            "RESULT {name} relays={} rooms={rooms} members={members} rate={rate} delivered_per_s={:.0} delivered={delivered} expected={} cut_off={} p50_ms={:.2} p99_ms={:.2} p999_ms={:.2} cpu_s_per_100k={:.3}",
            addrs.len(),
            delivered as f64 / elapsed,
            expected_each * (rooms * members) as u64,
            closes.len(),
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            percentile(&lat, 0.999),
            cpu.map_or(f64::NAN, |c| c / delivered.max(1) as f64 * 100_000.0)
        );
        drop(keep);
        Ok(())
    }

    async fn failover(addr: String, kill_pid: u32, rate: f64) -> anyhow::Result<()> {
        use pattern_mesh_client::Client;
        use pattern_mesh_core::session::SessionConfig;
        let urls: Vec<String> = addr
            .split(',')
            .map(|a| format!("ws://{}/ws", a.trim()))
            .collect();
        anyhow::ensure!(urls.len() >= 2, "--addr needs at least two relays");
        let room = format!("failover-{:x}", now_micros());
        let order: Vec<&str> = urls.iter().map(String::as_str).collect();
        let writer = Client::connect_any(&order, SessionConfig::new(&room, "writer")).await?;
        let reader =
            Client::connect(&urls[urls.len() - 1], SessionConfig::new(&room, "reader")).await?;
        let interval = Duration::from_secs_f64(1.0 / rate);
        let mut typed = String::new();
        let type_one = |i: usize, typed: &mut String| -> anyhow::Result<()> {
            let chunk = format!("{i} ");
            let at = writer.text("content").chars().count() as u32;
            writer.insert("content", at, &chunk)?;
            typed.push_str(&chunk);
            Ok(())
        };
        let steady = (rate * 2.0) as usize;
        for i in 0..steady {
            type_one(i, &mut typed)?;
            tokio::time::sleep(interval).await;
        }
        std::process::Command::new("kill")
            .args(["-9", &kill_pid.to_string()])
            .status()?;
        let killed = Instant::now();
        let marker = format!(" {steady} ");
        type_one(steady, &mut typed)?;
        let mut first = None;
        let mut i = steady + 1;
        while killed.elapsed() < Duration::from_secs(20) {
            if first.is_none() && reader.text("content").contains(&marker) {
                first = Some(killed.elapsed());
            }
            if first.is_some() && i > steady * 2 {
                break;
            }
            if i <= steady * 2 {
                type_one(i, &mut typed)?;
                i += 1;
            }
            tokio::time::sleep(interval.min(Duration::from_millis(5))).await;
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while reader.text("content") != typed && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let complete = reader.text("content") == typed;
        let ms = first.map_or(f64::NAN, |d| d.as_secs_f64() * 1_000.0);
        println!(
            "failover: the first edit typed after the writer's relay was killed reached the reader on another relay after {ms:.0} ms; every edit arrived: {complete}"
        );
        println!(
            "RESULT failover relays={} first_edit_after_kill_ms={ms:.0} complete={complete}",
            urls.len()
        );
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
                    label,
                } => {
                    load(
                        target, addr, rooms, members, messages, payload, rate, relay_pid, label,
                    )
                    .await
                }
                Mode::Failover {
                    addr,
                    kill_pid,
                    rate,
                } => failover(addr, kill_pid, rate).await,
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
