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

#[cfg(not(target_arch = "wasm32"))]
mod native {
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    use std::sync::Arc;
    use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

    use clap::{Parser, Subcommand};
    use futures_util::{SinkExt, StreamExt};
    use pattern_mesh::envelope::{Frame, Json, Stamp};
    use pattern_mesh::pattern::PatternConfig;
    use tokio::sync::{Mutex, Semaphore};
    use tokio_tungstenite::tungstenite::Message;

    #[derive(Parser)]
    struct Args {
        #[command(subcommand)]
        mode: Mode,
    }

    #[derive(Subcommand)]
    enum Mode {
        /// Rooms of members sending data frames to each other.
        Load {
            #[arg(long, default_value = "127.0.0.1:8080")]
            addr: String,
            #[arg(long, default_value_t = 1)]
            rooms: usize,
            #[arg(long, default_value_t = 16)]
            members: usize,
            /// Messages each member sends.
            #[arg(long, default_value_t = 500)]
            messages: u64,
            /// Approximate payload bytes per message.
            #[arg(long, default_value_t = 200)]
            payload: usize,
            /// Unacknowledged messages each member may have in flight.
            #[arg(long, default_value_t = 32)]
            window: usize,
            /// Messages per second per member; 0 sends as fast as the window allows.
            #[arg(long, default_value_t = 0.0)]
            rate: f64,
        },
        /// Connections that join and stay idle; prints the relay's memory per connection.
        Idle {
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

    type Socket = tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >;

    fn now_micros() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0)
    }

    async fn join(addr: &str, room: &str) -> anyhow::Result<(Socket, u64, u64)> {
        let url = format!("ws://{addr}/ws");
        let (mut ws, _) = tokio_tungstenite::connect_async_with_config(url, None, true).await?;
        let join = Frame::Join {
            room: room.into(),
            name: "load".into(),
            since: u64::MAX >> 1,
            resume: None,
            config: None,
        };
        ws.send(Message::Binary(join.encode().into())).await?;
        let (mut node, mut high) = (0, 0);
        while let Some(message) = ws.next().await {
            let Message::Binary(bytes) = message? else {
                continue;
            };
            match Frame::decode(&bytes)? {
                Frame::Welcome {
                    node: n, high: h, ..
                } => (node, high) = (n, h),
                Frame::CaughtUp { .. } => return Ok((ws, node, high)),
                _ => {}
            }
        }
        anyhow::bail!("closed before the catch-up ended")
    }

    fn rss_kib(pid: u32) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no VmRSS for {pid}"))
    }

    fn percentile(sorted: &[u64], p: f64) -> f64 {
        if sorted.is_empty() {
            return f64::NAN;
        }
        let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
        sorted[i] as f64 / 1_000.0
    }

    #[allow(clippy::too_many_arguments)]
    async fn load(
        addr: String,
        rooms: usize,
        members: usize,
        messages: u64,
        payload: usize,
        window: usize,
        rate: f64,
    ) -> anyhow::Result<()> {
        let pattern = PatternConfig::default();
        let latencies = Arc::new(Mutex::new(Vec::<u64>::new()));
        let accepted = Arc::new(AtomicU64::new(0));
        let delivered = Arc::new(AtomicU64::new(0));
        let run = format!("{:x}", now_micros());
        let mut sockets = Vec::new();
        for r in 0..rooms {
            for _ in 0..members {
                sockets.push(join(&addr, &format!("load-{run}-{r}")).await?);
            }
        }
        let expected_each = messages * (members as u64 - 1);
        let start = Instant::now();
        let mut tasks = Vec::new();
        let total = sockets.len();
        for (index, (ws, node, high)) in sockets.into_iter().enumerate() {
            let (mut sink, mut stream) = ws.split();
            let local = Arc::new(AtomicU64::new(high));
            let credit = Arc::new(Semaphore::new(window));
            let (l, c, a, d, lat) = (
                local.clone(),
                credit.clone(),
                accepted.clone(),
                delivered.clone(),
                latencies.clone(),
            );
            let reader = tokio::spawn(async move {
                let (mut got, mut acks, mut mine) = (0u64, 0u64, Vec::new());
                while got < expected_each || acks < messages {
                    let Some(Ok(Message::Binary(bytes))) = stream.next().await else {
                        break;
                    };
                    let Ok(frame) = Frame::decode(&bytes) else {
                        continue;
                    };
                    match frame {
                        Frame::Ack { .. } => {
                            acks += 1;
                            a.fetch_add(1, Relaxed);
                            c.add_permits(1);
                        }
                        Frame::Data { stamp, data } => {
                            l.fetch_max(stamp.step, Relaxed);
                            if let Ok(value) = data.to_value::<serde_json::Value>() {
                                if let Some(sent) = value.get("t").and_then(|t| t.as_u64()) {
                                    mine.push(now_micros().saturating_sub(sent));
                                }
                            }
                            got += 1;
                            d.fetch_add(1, Relaxed);
                        }
                        Frame::Reject { reason, detail, .. } => {
                            eprintln!("rejected: {reason}: {detail}");
                            c.add_permits(1);
                            acks += 1;
                        }
                        _ => {}
                    }
                }
                lat.lock().await.extend(mine);
            });
            let pad = "x".repeat(payload.saturating_sub(60));
            let writer = tokio::spawn(async move {
                let interval = (rate > 0.0).then(|| Duration::from_secs_f64(1.0 / rate));
                // Spread the members' ticks over one interval, as independent clients would be.
                let offset =
                    interval.map_or(Duration::ZERO, |i| i.mul_f64(index as f64 / total as f64));
                let begin = Instant::now() + offset;
                for i in 0..messages {
                    if let Some(interval) = interval {
                        tokio::time::sleep_until((begin + interval * i as u32).into()).await;
                    }
                    let Ok(permit) = credit.acquire().await else {
                        break;
                    };
                    permit.forget();
                    let step = local.fetch_add(1, Relaxed) + 1;
                    let frame = Frame::Data {
                        stamp: Stamp {
                            sender: node,
                            step,
                            pattern: pattern.value(step),
                        },
                        data: Json::from_value(
                            &serde_json::json!({ "t": now_micros(), "pad": pad }),
                        )
                        .expect("json"),
                    };
                    if sink
                        .send(Message::Binary(frame.encode().into()))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                sink
            });
            tasks.push((reader, writer));
        }
        let mut sinks = Vec::new();
        for (reader, writer) in tasks {
            sinks.push(writer.await?);
            let _ = tokio::time::timeout(Duration::from_secs(120), reader).await;
        }
        let elapsed = start.elapsed().as_secs_f64();
        let mut lat = latencies.lock().await.clone();
        lat.sort_unstable();
        println!(
            "load: {rooms} rooms x {members} members, {messages} messages each, ~{payload} B payloads, window {window}, rate {}",
            if rate > 0.0 { format!("{rate}/s per member") } else { "flat out".into() }
        );
        println!(
            "  accepted {:.0} msg/s ({} in {elapsed:.2} s); delivered {:.0} msg/s ({})",
            accepted.load(Relaxed) as f64 / elapsed,
            accepted.load(Relaxed),
            delivered.load(Relaxed) as f64 / elapsed,
            delivered.load(Relaxed)
        );
        println!(
            "  delivery latency ms: p50 {:.2}  p99 {:.2}  p999 {:.2}  max {:.2}  ({} samples)",
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            percentile(&lat, 0.999),
            percentile(&lat, 1.0),
            lat.len()
        );
        drop(sinks);
        Ok(())
    }

    async fn idle(
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
                join(&addr, &format!("idle-{run}-{}", i / members.max(1)))
                    .await?
                    .0,
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = rss_kib(pid)?;
        println!(
            "idle: {connections} connections in rooms of {members}: relay RSS {before} KiB -> {after} KiB, {:.1} KiB per connection",
            (after.saturating_sub(before)) as f64 / connections as f64
        );
        drop(sockets);
        Ok(())
    }

    pub fn main() -> anyhow::Result<()> {
        let args = Args::parse();
        let runtime = tokio::runtime::Runtime::new()?;
        runtime.block_on(async move {
            match args.mode {
                Mode::Load {
                    addr,
                    rooms,
                    members,
                    messages,
                    payload,
                    window,
                    rate,
                } => load(addr, rooms, members, messages, payload, window, rate).await,
                Mode::Idle {
                    addr,
                    connections,
                    members,
                    relay_pid,
                } => idle(addr, connections, members, relay_pid).await,
            }
        })
    }
}

#[cfg(not(target_arch = "wasm32"))]
fn main() -> anyhow::Result<()> {
    native::main()
}

/// The load generator is a native program; on wasm32 it does nothing.
#[cfg(target_arch = "wasm32")]
fn main() {}
