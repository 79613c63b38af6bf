//! A load generator for the relay: many real WebSocket clients, real frames, real Yjs
//! updates. It speaks pattern-mesh's protocol, y-websocket's and Hocuspocus's, so that one
//! client measures all three.
//!
//! ```text
//! cargo run --release --example loadgen -- capacity --target y-websocket --addr 127.0.0.1:1234 --rooms 1 --members 16
//! cargo run --release --example loadgen -- load --addr 127.0.0.1:8080 --rooms 100 --members 10 --messages 200 --rate 10
//! cargo run --release --example loadgen -- idle --addr 127.0.0.1:8080 --connections 1000 --relay-pid PID
//! ```
//!
//! What the members send is `--workload`: `typing` (the default) replays a real editing trace
//! into each member's own part of the room's one text; `index0` is the pathological stress of
//! inserts at the start of the text. Only deliveries of one member's update to another member
//! count (a server's echo to the sender does not), and a delay percentile counts an update
//! that never arrived as infinitely late. An update arrives either as sent, byte for byte, or
//! inside an update the server merged or re-encoded (Hocuspocus's servers on one Redis pass
//! changes to each other as state-vector diffs): it counts as delivered once a member has
//! received everything it inserts and deletes, and such deliveries are reported apart
//! (`merged=`).
//!
//! `load`: every member of every room sends `--messages` updates, each as soon as the socket
//! takes it (or at `--rate` per second per member), and every member measures the delay from
//! send to delivery. It prints deliveries per second and p50/p99/p999 delivery latency.
//! `capacity`: repeated `load` runs at a rising rate until one fails twice (p99 over 50 ms,
//! under 99% delivered, or a member cut off), then a bisection; it prints the highest rate
//! that passed. `failover`: how long readers wait when one of several relays is killed.
//! `idle`: opens connections that join and stay quiet, then prints the relay's resident memory
//! per connection. Start the relay with a high `--max-rate` for `load` and `capacity`.

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

    /// The ids an update inserts and the ids it deletes.
    #[derive(Default)]
    struct Contents {
        inserts: yrs::IdSet,
        deletes: yrs::IdSet,
    }

    impl Contents {
        fn of(update: &[u8]) -> Option<Self> {
            use yrs::updates::decoder::Decode;
            let update = yrs::Update::decode_v1(update).ok()?;
            Some(Self {
                inserts: update.insertions(true),
                deletes: update.delete_set().clone(),
            })
        }

        fn add(&mut self, other: &Contents) {
            self.inserts.merge_with(other.inserts.clone());
            self.deletes.merge_with(other.deletes.clone());
        }

        /// Whether `self` holds every id `other` inserts and deletes.
        fn covers(&self, other: &Contents) -> bool {
            other.inserts.diff(&self.inserts).is_empty()
                && other.deletes.diff(&self.deletes).is_empty()
        }
    }

    /// One update a member sent.
    struct Sent {
        at: Instant,
        update: Vec<u8>,
        /// What it holds, decoded the first time a member that received a merged update needs
        /// it.
        contents: Option<Option<Contents>>,
    }

    impl Sent {
        fn contents(&mut self) -> Option<&Contents> {
            let update = &self.update;
            self.contents
                .get_or_insert_with(|| Contents::of(update))
                .as_ref()
        }
    }

    /// Every update the members sent: by fingerprint, and by the sender's Yjs client id in
    /// the order sent.
    #[derive(Default)]
    struct Ledger {
        by_fingerprint: HashMap<u64, (u64, usize)>,
        by_client: HashMap<u64, Vec<Sent>>,
    }

    impl Ledger {
        fn record(&mut self, client: u64, update: Vec<u8>, at: Instant) {
            let sent = self.by_client.entry(client).or_default();
            self.by_fingerprint
                .insert(fingerprint(&update), (client, sent.len()));
            sent.push(Sent {
                at,
                update,
                contents: None,
            });
        }
    }

    /// What one member has received of the others' updates.
    #[derive(Default)]
    struct Received {
        /// `(client, index)` of every update counted at or above its client's `low`.
        counted: std::collections::HashSet<(u64, usize)>,
        /// Per client, the index below which every update is counted (updates mostly arrive in
        /// order, so `counted` stays small).
        low: HashMap<u64, usize>,
        /// Every id this member has received, inserted or deleted: kept from the first update
        /// it received that no member sent as such (a server's merge may deliver one update in
        /// parts, over several of its own).
        have: Option<Contents>,
    }

    impl Received {
        /// Counts the update at `(client, index)` once; false if it was counted already.
        fn count(&mut self, client: u64, index: usize) -> bool {
            let low = self.low.entry(client).or_default();
            if index < *low || !self.counted.insert((client, index)) {
                return false;
            }
            while self.counted.remove(&(client, *low)) {
                *low += 1;
            }
            true
        }

        /// An update received as `client` sent it: its send time, unless it was counted
        /// already.
        fn as_sent(&mut self, ledger: &mut Ledger, client: u64, index: usize) -> Option<Instant> {
            if !self.count(client, index) {
                return None;
            }
            let entry = ledger.by_client.get_mut(&client)?.get_mut(index)?;
            // Decoded only for a member that has had a merged update: the others never need it.
            if let Some(have) = &mut self.have {
                if let Some(contents) = entry.contents() {
                    have.add(contents);
                }
            }
            Some(entry.at)
        }

        /// An update no member sent as such (the server merged or re-encoded it): the send
        /// times of the updates, not yet counted, that this member now holds in full; each is
        /// counted. A member deletes only what it inserted, so only the senders whose ids the
        /// update holds can be complete.
        fn merged(&mut self, ledger: &mut Ledger, update: &[u8], own: u64) -> Vec<Instant> {
            let Some(received) = Contents::of(update) else {
                return Vec::new();
            };
            let (counted, low) = (&self.counted, &self.low);
            let have = self.have.get_or_insert_with(|| {
                let mut have = Contents::default();
                let below = low
                    .iter()
                    .flat_map(|(&client, &low)| (0..low).map(move |index| (client, index)));
                for (client, index) in below.chain(counted.iter().copied()) {
                    let sent = ledger.by_client.get_mut(&client);
                    if let Some(contents) = sent.and_then(|s| s.get_mut(index)?.contents()) {
                        have.add(contents);
                    }
                }
                have
            });
            have.add(&received);
            let have: &Contents = have;
            let mut clients: Vec<u64> = received.inserts.client_ids().map(|c| c.get()).collect();
            clients.extend(received.deletes.client_ids().map(|c| c.get()));
            clients.sort_unstable();
            clients.dedup();
            let mut complete = Vec::new();
            for client in clients.into_iter().filter(|&c| c != own) {
                let Some(sent) = ledger.by_client.get_mut(&client) else {
                    continue;
                };
                let low = self.low.get(&client).copied().unwrap_or(0);
                for (index, entry) in sent.iter_mut().enumerate().skip(low) {
                    if !self.counted.contains(&(client, index))
                        && entry.contents().is_some_and(|c| have.covers(c))
                    {
                        complete.push((client, index, entry.at));
                    }
                }
            }
            complete
                .into_iter()
                .map(|(client, index, at)| {
                    self.count(client, index);
                    at
                })
                .collect()
        }
    }

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

    /// What the members type.
    #[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
    enum Workload {
        /// Each member replays a real editing trace (automerge-paper: one transaction per
        /// update, mostly one character typed or deleted near the previous edit) into its own
        /// part of the room's one text, which grows as in a writing session. Every edit's
        /// neighbours are the member's own characters, so a server that merges updates
        /// integrates each one next to its neighbours, as with people typing in one document.
        Typing,
        /// Pathological: each member inserts `--payload` bytes at index 0 of its own fresh text,
        /// without seeing anyone else's. Every insert conflicts with every concurrent insert
        /// at the start, so a server that merges updates pays for a scan that grows with the
        /// document. No editor produces this.
        Index0,
    }

    impl Workload {
        fn name(self) -> &'static str {
            match self {
                Workload::Typing => "typing",
                Workload::Index0 => "index0",
            }
        }
    }

    /// What every mode that sends updates takes.
    #[derive(clap::Args)]
    struct Common {
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
        #[arg(long, value_enum, default_value = "typing")]
        workload: Workload,
        /// The editing trace `typing` replays (gzipped JSON, the editing-traces format).
        #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/data/editing-traces/automerge-paper.json.gz"))]
        trace: String,
        /// Approximate bytes of each `index0` update.
        #[arg(long, default_value_t = 200)]
        payload: usize,
        /// The relays' process ids (separated by commas), to report their CPU time and
        /// memory.
        #[arg(long, value_delimiter = ',')]
        relay_pid: Vec<u32>,
        /// The name of the RESULT line (default: the target's).
        #[arg(long)]
        label: Option<String>,
    }

    impl Common {
        fn spec(&self, messages: u64, rate: f64, patience: Duration) -> anyhow::Result<LoadSpec> {
            anyhow::ensure!(self.members >= 2, "--members must be at least 2");
            let trace = match self.workload {
                Workload::Typing => load_trace(&self.trace)?,
                Workload::Index0 => Vec::new(),
            };
            Ok(LoadSpec {
                target: self.target,
                addrs: self.addr.split(',').map(|a| a.trim().to_string()).collect(),
                rooms: self.rooms,
                members: self.members,
                messages,
                payload: self.payload,
                rate,
                workload: self.workload,
                trace: Arc::new(trace),
                relay_pids: self.relay_pid.clone(),
                patience,
                run: format!("{:x}", now_micros()),
            })
        }
    }

    #[derive(Subcommand)]
    enum Mode {
        /// Rooms of members sending real Yjs text updates to each other.
        Load {
            #[command(flatten)]
            common: Common,
            /// Messages each member sends.
            #[arg(long, default_value_t = 500)]
            messages: u64,
            /// Messages per second per member; 0 sends as fast as the socket takes them.
            #[arg(long, default_value_t = 0.0)]
            rate: f64,
        },
        /// The highest rate the relay carries: runs of about `--seconds` each, the rate per
        /// member doubling from `--rate` until a rate fails twice in a row (p99 delivery over
        /// 50 ms with undelivered updates counted as infinitely late, under 99% delivered, or a
        /// member cut off), then `--refine` halvings of the gap between the last pass and the
        /// first failure.
        Capacity {
            #[command(flatten)]
            common: Common,
            /// The first rate tried, updates per second per member.
            #[arg(long, default_value_t = 2.0)]
            rate: f64,
            /// How long each run sends.
            #[arg(long, default_value_t = 4.0)]
            seconds: f64,
            #[arg(long, default_value_t = 3)]
            refine: u32,
            /// The search's ceiling, updates per second per member: when the next doubling
            /// would pass it, the search stops at the last rate that passed, reported with no
            /// failing rate (a lower bound).
            #[arg(long, default_value_t = 100_000.0)]
            max_rate: f64,
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

    /// The `p` quantile, in milliseconds, of `expected` delays of which `sorted` (microseconds,
    /// ascending) are the ones that arrived: an update that never arrived counts as infinitely
    /// late, so a run that loses more than 1% has an infinite p99.
    fn percentile(sorted: &[u64], expected: u64, p: f64) -> f64 {
        let n = expected.max(sorted.len() as u64);
        if n == 0 {
            return f64::NAN;
        }
        let rank = ((p * n as f64).ceil() as usize).max(1) - 1;
        sorted
            .get(rank)
            .map_or(f64::INFINITY, |&us| us as f64 / 1_000.0)
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

    /// The automerge-paper editing trace (tests/data/editing-traces, CC BY 4.0): its
    /// transactions, each a list of `[index, delete, insert]` patches.
    type Trace = Vec<Vec<(u32, u32, String)>>;

    fn load_trace(path: &str) -> anyhow::Result<Trace> {
        use std::io::Read;
        #[derive(serde::Deserialize)]
        struct Raw {
            txns: Vec<Txn>,
        }
        #[derive(serde::Deserialize)]
        struct Txn {
            patches: Vec<(u32, u32, String)>,
        }
        let mut json = String::new();
        let file = std::fs::File::open(path)
            .map_err(|e| anyhow::anyhow!("cannot open the trace {path}: {e}"))?;
        flate2::read::GzDecoder::new(file).read_to_string(&mut json)?;
        let raw: Raw = serde_json::from_str(&json)?;
        anyhow::ensure!(!raw.txns.is_empty(), "the trace {path} has no transactions");
        Ok(raw.txns.into_iter().map(|t| t.patches).collect())
    }

    /// One run of the `load` mode: who, how many, how fast, what kind of edit.
    struct LoadSpec {
        target: Target,
        addrs: Vec<String>,
        rooms: usize,
        members: usize,
        messages: u64,
        payload: usize,
        rate: f64,
        workload: Workload,
        trace: Arc<Trace>,
        relay_pids: Vec<u32>,
        /// A reader gives up this long after its last update.
        patience: Duration,
        /// Rooms are named after this, so that runs against one relay never share a room.
        run: String,
    }

    /// What one run measured.
    struct Outcome {
        delivered: u64,
        /// Updates received that no member sent byte for byte (re-encoded or merged by the
        /// server).
        unmatched: u64,
        /// Deliveries counted inside those: members' updates a member received in full within
        /// a server's merged or re-encoded update.
        merged: u64,
        expected: u64,
        /// From the first send to the last reader's end.
        elapsed: f64,
        /// Send-to-delivery delays, microseconds, sorted.
        latencies: Vec<u64>,
        /// Close codes of members the relay let go.
        closes: Vec<u16>,
        /// The relays' CPU seconds during the run.
        cpu: Option<f64>,
        rss_kib: u64,
        /// pattern-mesh's store commits during the run, from its `/metrics`:
        /// `(count, over 50 ms, over 100 ms, the largest bucket bound reached)`.
        commits: Option<(u64, u64, u64, String)>,
        /// The load generator's own CPU time over the run's, in cores: near the cores it may
        /// use, the generator, not the relay, set the pace.
        generator_cpu: f64,
        /// The mean size of the Yjs updates sent, bytes.
        update_bytes: f64,
    }

    impl Outcome {
        /// The `p` quantile of the delivery delay, ms, over every delivery expected.
        fn latency(&self, p: f64) -> f64 {
            percentile(&self.latencies, self.expected, p)
        }

        fn passes(&self) -> bool {
            self.closes.is_empty()
                && self.delivered as f64 >= 0.99 * self.expected as f64
                && self.latency(0.99) <= 50.0
        }
    }

    /// The store commit histogram in pattern-mesh's `/metrics`: `(upper bound, count)` pairs,
    /// cumulative, the last one `+Inf`.
    async fn commit_histogram(addr: &str) -> Option<Vec<(String, u64)>> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut socket = tokio::net::TcpStream::connect(addr).await.ok()?;
        let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        socket.write_all(request.as_bytes()).await.ok()?;
        let mut text = String::new();
        socket.read_to_string(&mut text).await.ok()?;
        let buckets: Vec<(String, u64)> = text
            .lines()
            .filter_map(|l| l.strip_prefix("pattern_mesh_store_commit_seconds_bucket{le=\""))
            .filter_map(|l| {
                let (bound, count) = l.split_once("\"} ")?;
                Some((bound.to_string(), count.trim().parse().ok()?))
            })
            .collect();
        (!buckets.is_empty()).then_some(buckets)
    }

    /// Commits between two histograms: how many, how many over 50 and 100 ms, and the
    /// largest bucket that gained one.
    fn commits_between(
        before: &[(String, u64)],
        after: &[(String, u64)],
    ) -> (u64, u64, u64, String) {
        let delta = |bound: &str| {
            let at = |h: &[(String, u64)]| h.iter().find(|(b, _)| b == bound).map_or(0, |x| x.1);
            at(after).saturating_sub(at(before))
        };
        let total = delta("+Inf");
        let mut largest = String::from("-");
        let mut below = 0;
        for (bound, _) in after {
            let here = delta(bound);
            if here > below {
                largest = bound.clone();
            }
            below = here;
        }
        // A scrape during a commit may see a bucket ahead of the count.
        (
            total,
            total.saturating_sub(delta("0.05")),
            total.saturating_sub(delta("0.1")),
            largest,
        )
    }

    /// Opens every member, lets them all send their updates (at `rate` each, or as fast as
    /// the sockets take them) and waits until each has every other member's updates or gives
    /// up.
    async fn run_load(spec: &LoadSpec) -> anyhow::Result<Outcome> {
        let pattern = PatternConfig::default();
        let ledger: Arc<std::sync::Mutex<Ledger>> = Arc::default();
        let latencies = Arc::new(Mutex::new(Vec::<u64>::new()));
        let delivered = Arc::new(AtomicU64::new(0));
        let unmatched = Arc::new(AtomicU64::new(0));
        let merged = Arc::new(AtomicU64::new(0));
        let update_bytes = Arc::new(AtomicU64::new(0));
        let closes = Arc::new(Mutex::new(Vec::<u16>::new()));
        let (target, members, messages, rate) =
            (spec.target, spec.members, spec.messages, spec.rate);
        let mut sockets = Vec::new();
        for r in 0..spec.rooms {
            for m in 0..members {
                let addr = &spec.addrs[(r * members + m) % spec.addrs.len()];
                let room = format!("load-{}-{r}", spec.run);
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
        let histogram = if target == Target::PatternMesh {
            commit_histogram(&spec.addrs[0]).await
        } else {
            None
        };
        let cpu_before = cpu_of(&spec.relay_pids)?;
        let own_before = cpu_seconds(std::process::id())?;
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
            let (l, d, un, me, lat, sent, c) = (
                local.clone(),
                delivered.clone(),
                unmatched.clone(),
                merged.clone(),
                latencies.clone(),
                ledger.clone(),
                closes.clone(),
            );
            let client = 1_000 + index as u64;
            let patience = spec.patience;
            let reader = tokio::spawn(async move {
                let (mut got, mut mine, mut received) = (0u64, Vec::new(), Received::default());
                // A server's keep-alives and awareness messages do not count as updates.
                let mut last_update = Instant::now();
                while got < expected_each {
                    let deadline = (last_update + patience).into();
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
                    // An update as some member sent it, or one the server merged or
                    // re-encoded: each update it holds in full is delivered once.
                    let Ok(mut ledger) = sent.lock() else { break };
                    let at = match ledger.by_fingerprint.get(&fingerprint(&update)).copied() {
                        Some((from, i)) => {
                            received.as_sent(&mut ledger, from, i).into_iter().collect()
                        }
                        None => {
                            un.fetch_add(1, Relaxed);
                            let found = received.merged(&mut ledger, &update, client);
                            me.fetch_add(found.len() as u64, Relaxed);
                            found
                        }
                    };
                    drop(ledger);
                    if at.is_empty() {
                        continue;
                    }
                    let now = Instant::now();
                    last_update = now;
                    mine.extend(
                        at.iter()
                            .map(|&at| now.duration_since(at).as_micros() as u64),
                    );
                    got += at.len() as u64;
                    d.fetch_add(at.len() as u64, Relaxed);
                }
                lat.lock().await.extend(mine);
                stream
            });
            let sent = ledger.clone();
            let bytes_sent = update_bytes.clone();
            let (workload, payload, trace) = (spec.workload, spec.payload, spec.trace.clone());
            let writer = tokio::spawn(async move {
                let doc = pattern_mesh_core::doc::SharedDoc::with_client_id(client);
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
                    let update = match workload {
                        Workload::Index0 => doc.insert("content", 0, &chunk).expect("insert at 0"),
                        Workload::Typing => {
                            // The trace from its start, again from an empty text of this
                            // member's own if a run outlasts it.
                            let txn = &trace[i as usize % trace.len()];
                            let clear = (i > 0 && i as usize % trace.len() == 0).then(|| {
                                let len = doc.len("content");
                                doc.delete("content", 0, len).expect("clear")
                            });
                            let patches: Vec<(u32, u32, &str)> =
                                txn.iter().map(|(p, d, s)| (*p, *d, s.as_str())).collect();
                            let edit = doc
                                .splice_all("content", &patches)
                                .expect("the trace applies");
                            // Starting over sends the clearing and the first edit as one
                            // update, so every member still sends `messages` updates.
                            match clear {
                                Some(clear) => {
                                    pattern_mesh_core::doc::merge_updates(&[&clear, &edit])
                                        .expect("two updates of one document merge")
                                }
                                None => edit,
                            }
                        }
                    };
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
                    bytes_sent.fetch_add(update.len() as u64, Relaxed);
                    if let Ok(mut own) = mine_sent.lock() {
                        own.insert(fingerprint(&update));
                    }
                    if let Ok(mut ledger) = sent.lock() {
                        ledger.record(client, update, Instant::now());
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
        let generator_cpu = (cpu_seconds(std::process::id())? - own_before) / elapsed;
        let cpu = match cpu_before {
            Some(before) => cpu_of(&spec.relay_pids)?.map(|after| after - before),
            None => None,
        };
        let commits = match histogram {
            Some(before) => commit_histogram(&spec.addrs[0])
                .await
                .map(|after| commits_between(&before, &after)),
            None => None,
        };
        let mut latencies = latencies.lock().await.clone();
        latencies.sort_unstable();
        let rss_kib = spec
            .relay_pids
            .iter()
            .map(|&p| rss_kib(p).unwrap_or(0))
            .sum();
        drop(keep);
        let closes = closes.lock().await.clone();
        Ok(Outcome {
            delivered: delivered.load(Relaxed),
            unmatched: unmatched.load(Relaxed),
            merged: merged.load(Relaxed),
            expected: expected_each * (spec.rooms * members) as u64,
            elapsed,
            latencies,
            closes,
            cpu,
            rss_kib,
            commits,
            generator_cpu,
            update_bytes: update_bytes.load(Relaxed) as f64
                / (messages * (spec.rooms * members) as u64).max(1) as f64,
        })
    }

    /// The `key=value` pairs of a RESULT line for one run.
    fn result_fields(spec: &LoadSpec, o: &Outcome) -> String {
        let (commits, over_50, over_100, largest) =
            o.commits.clone().unwrap_or((0, 0, 0, "-".into()));
        format!(
            "workload={} update_bytes={:.0} relays={} rooms={} members={} rate={} offered_per_s={:.0} delivered_per_s={:.0} delivered={} unmatched={} merged={} expected={} cut_off={} p50_ms={:.2} p99_ms={:.2} p999_ms={:.2} max_ms={:.2} cpu_s_per_100k={:.3} rss_kib={} commits={commits} commits_over_50ms={over_50} commits_over_100ms={over_100} slowest_commit_le_s={largest} loadgen_cores={:.2} passed={}",
            spec.workload.name(),
            o.update_bytes,
            spec.addrs.len(),
            spec.rooms,
            spec.members,
            spec.rate,
            spec.rate * (spec.rooms * spec.members * (spec.members - 1)) as f64,
            o.delivered as f64 / o.elapsed,
            o.delivered,
            o.unmatched,
            o.merged,
            o.expected,
            o.closes.len(),
            o.latency(0.5),
            o.latency(0.99),
            o.latency(0.999),
            o.latency(1.0),
            o.cpu.map_or(f64::NAN, |c| c / o.delivered.max(1) as f64 * 100_000.0),
            o.rss_kib,
            o.generator_cpu,
            o.passes(),
        )
    }

    async fn load(spec: LoadSpec, label: Option<String>) -> anyhow::Result<()> {
        let o = run_load(&spec).await?;
        let name = label.as_deref().unwrap_or(spec.target.name());
        println!(
            "{name}: {} rooms x {} members, {} {} updates each, {}",
            spec.rooms,
            spec.members,
            spec.messages,
            spec.workload.name(),
            if spec.rate > 0.0 {
                format!("{}/s per member", spec.rate)
            } else {
                "flat out".into()
            }
        );
        println!(
            "  delivered {:.0} msg/s ({} of {} in {:.2} s)",
            o.delivered as f64 / o.elapsed,
            o.delivered,
            o.expected,
            o.elapsed
        );
        if o.unmatched > 0 {
            println!(
                "  {} updates received that no member sent as such (merged or re-encoded by the server), holding {} deliveries",
                o.unmatched, o.merged
            );
        }
        if !o.closes.is_empty() {
            println!(
                "  {} members were let go by the relay before they had everything (close codes {:?})",
                o.closes.len(),
                o.closes
            );
        }
        println!(
            "  delivery latency ms: p50 {:.2}  p99 {:.2}  p999 {:.2}  max {:.2}",
            o.latency(0.5),
            o.latency(0.99),
            o.latency(0.999),
            o.latency(1.0)
        );
        if let Some(cpu) = o.cpu {
            println!(
                "  relay CPU {cpu:.2} s for {} deliveries: {:.2} s per 100k; relay RSS {} KiB",
                o.delivered,
                cpu / o.delivered.max(1) as f64 * 100_000.0,
                o.rss_kib
            );
        }
        if let Some((count, over_50, over_100, largest)) = &o.commits {
            println!(
                "  store commits {count}: {over_50} over 50 ms, {over_100} over 100 ms, slowest in the bucket up to {largest} s"
            );
        }
        println!("RESULT {name} {}", result_fields(&spec, &o));
        Ok(())
    }

    /// Raises the rate per member until a rate fails (p99 over 50 ms counting undelivered
    /// updates as infinitely late, under 99% delivered, or a member cut off, in two runs in a
    /// row), doubling from `spec.rate`, then halves the gap between the last rate that passed
    /// and the first that failed `refine` times. Each run lasts about `seconds` in fresh rooms.
    /// Prints every run, then the capacity: the highest rate that passed.
    async fn capacity(
        mut spec: LoadSpec,
        seconds: f64,
        refine: u32,
        max_rate: f64,
        label: Option<String>,
    ) -> anyhow::Result<()> {
        let name = label.unwrap_or_else(|| spec.target.name().to_string());
        let base = spec.run.clone();
        let mut runs = 0;
        // Runs `rate` in fresh rooms; a failing run is tried once more, so that one stall
        // does not end the search. The passing outcome, or `None` if both runs failed.
        let mut judge = async |spec: &mut LoadSpec, rate: f64| -> anyhow::Result<Option<Outcome>> {
            spec.rate = rate;
            spec.messages = ((rate * seconds).ceil() as u64).max(2);
            for _ in 0..2 {
                runs += 1;
                spec.run = format!("{base}-{runs}");
                let o = run_load(spec).await?;
                println!("RESULT step-{name} {}", result_fields(spec, &o));
                if o.passes() {
                    return Ok(Some(o));
                }
            }
            Ok(None)
        };
        let (mut low, mut high): (Option<(f64, Outcome)>, Option<f64>) = (None, None);
        let mut rate = spec.rate;
        loop {
            match judge(&mut spec, rate).await? {
                Some(o) => {
                    low = Some((rate, o));
                    if rate * 2.0 > max_rate {
                        break;
                    }
                    rate *= 2.0;
                }
                None => {
                    high = Some(rate);
                    break;
                }
            }
        }
        if let (Some(mut fail), Some(mut pass)) = (high, low.as_ref().map(|l| l.0)) {
            for _ in 0..refine {
                let mid = (pass + fail) / 2.0;
                match judge(&mut spec, mid).await? {
                    Some(o) => {
                        pass = mid;
                        low = Some((mid, o));
                    }
                    None => fail = mid,
                }
            }
            high = Some(fail);
        }
        match low {
            Some((rate, o)) => {
                spec.rate = rate;
                spec.messages = ((rate * seconds).ceil() as u64).max(2);
                println!(
                    "{name}: capacity {:.0} deliveries/s ({rate:.1} updates/s per member), p50 {:.2} ms, p99 {:.2} ms; first failing rate {}",
                    o.delivered as f64 / o.elapsed,
                    o.latency(0.5),
                    o.latency(0.99),
                    high.map_or("none (the search's ceiling)".into(), |h| format!("{h:.1}/s"))
                );
                println!(
                    "RESULT capacity-{name} {} failed_at={}",
                    result_fields(&spec, &o),
                    high.map_or("-".into(), |h| format!("{h:.1}"))
                );
            }
            None => {
                println!(
                    "{name}: no rate passed, not even {:.1}/s per member",
                    spec.rate
                );
                println!(
                    "RESULT capacity-{name} workload={} rooms={} members={} rate=0 delivered_per_s=0 passed=false failed_at={:.1}",
                    spec.workload.name(),
                    spec.rooms,
                    spec.members,
                    spec.rate
                );
            }
        }
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
                    common,
                    messages,
                    rate,
                } => {
                    let spec = common.spec(messages, rate, Duration::from_secs(30))?;
                    load(spec, common.label).await
                }
                Mode::Capacity {
                    common,
                    rate,
                    seconds,
                    refine,
                    max_rate,
                } => {
                    // A run that falls seconds behind has failed: its readers wait 3 s at most
                    // for the next update.
                    let spec = common.spec(2, rate, Duration::from_secs(3))?;
                    capacity(spec, seconds, refine, max_rate, common.label).await
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
