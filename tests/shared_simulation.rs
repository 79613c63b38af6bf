//! Many relays, one room, under a deterministic simulation: room cores in shared mode on one
//! store (the in-memory model of the Redis store: [`MemoryStore::append_shared_now`] checks
//! replay and identity with each append, `follow_now` reads the log back), each relay writing
//! its appends and publications in order with a delay, reading the log and the other relays'
//! publications on timers of its own; client sessions spread over the relays, each given every
//! relay, on a network that delays; relays that crash (losing their writes not yet made, or
//! made but not answered) and come back; in half the runs, sessions that keep their state in
//! storage, whose tabs close (losing what they had not stored) and reopen from it, now and then
//! again and again while relays restart; in a quarter, a real-time room (a stale window), whose
//! clients edit the document only.
//!
//! After the faults the run goes on until nothing moves; then it checks:
//!
//! - every replica, and the document the log holds, has the same text;
//! - every data message reached every other session exactly once, in the log's order;
//! - every acknowledged message is in the log, at its position;
//! - no session waits: each is open with nothing pending;
//! - no replica raised an anomaly.
//!
//! `cargo test --test shared_simulation` runs 300 seeds (`PM_SIM_SEEDS` sets how many,
//! `PM_SIM_FROM` the first); `PM_SIM_SEED=N` runs one, with `PM_SIM_TRACE=1` to see it.
#![cfg(not(target_arch = "wasm32"))]

mod storage;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet, VecDeque};

use bytes::Bytes;
use pattern_mesh::doc::SharedDoc;
use pattern_mesh::room::{self, Append, ConnId, Relayed, RoomCore, RoomLimits};
use pattern_mesh::session::{self, Event, Session, SessionConfig, Source, Status};
use pattern_mesh::store::{Appended, MemoryStore};
use pattern_mesh::wire::{close, part, Frame, Json, Limits, RoomConfig};
use storage::Storage;

const ROOM: &str = "shared";
const TEXT: &str = "content";

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    fn chance(&mut self, p: f64) -> bool {
        (self.next() % 1_000_000) as f64 / 1_000_000.0 < p
    }
}

#[derive(Debug)]
enum Ev {
    Op {
        client: usize,
    },
    Timer {
        client: usize,
        generation: u64,
    },
    Opened {
        client: usize,
        relay: usize,
        conn: ConnId,
    },
    Unreachable {
        client: usize,
        conn: ConnId,
    },
    ToRelay {
        relay: usize,
        conn: ConnId,
        bytes: Bytes,
    },
    ToClient {
        client: usize,
        conn: ConnId,
        bytes: Bytes,
    },
    Closed {
        client: usize,
        conn: ConnId,
        code: u16,
        reason: String,
    },
    /// The relay's oldest write reaches the store.
    Write {
        relay: usize,
        life: u64,
    },
    /// The store's answer to it reaches the relay.
    Answer {
        relay: usize,
        life: u64,
        answer: Result<Appended, pattern_mesh::store::StoreError>,
    },
    /// The relay reads the log and the bus.
    Follow {
        relay: usize,
        life: u64,
    },
    Crash {
        relay: usize,
    },
    Restart {
        relay: usize,
    },
    /// The other relays notice that a relay's heartbeat ended.
    Gone {
        relay: usize,
        id: u64,
    },
    /// A write to a client's storage ends.
    Saved {
        client: usize,
        write: storage::Write,
    },
    /// A client's tab closes (its socket dies with it, with no close frame), and reopens
    /// from storage after `down` ms.
    Close {
        client: usize,
        down: u64,
    },
    Reopen {
        client: usize,
    },
    /// A client types a few characters, whenever it is (a tab just reopened types, even after
    /// the active period).
    Edit {
        client: usize,
    },
    /// A relay notices that a closed tab's socket is gone.
    SocketGone {
        relay: usize,
        conn: ConnId,
    },
}

enum Write {
    Append(Append),
    /// A publication, with the step that moves the room step.
    Publish(Relayed, u64),
}

/// A connection as its relay sees it. Each direction is FIFO.
struct Conn {
    client: usize,
    /// Set once it joined.
    reader: Option<room::Reader>,
    up_at: u64,
    down_at: u64,
}

struct Relay {
    /// Which life of the relay (it changes with each restart): its name on the bus.
    life: u64,
    up: bool,
    core: Option<RoomCore>,
    conns: BTreeMap<ConnId, Conn>,
    writes: VecDeque<Write>,
    writing: bool,
    /// When the last answer of the store reaches the relay: answers come in order.
    answer_at: u64,
    bus_read: usize,
}

struct Client {
    session: Session<SharedDoc>,
    conn: Option<(usize, ConnId)>,
    timer: Option<(u64, u64)>,
    generation: u64,
    ops: u64,
    sent: Vec<String>,
    /// The data received, with the log position the session had then.
    received: Vec<(String, u64)>,
    /// (step, position) of each acknowledgement.
    acked: Vec<(u64, u64)>,
    /// The log positions received.
    positions: HashSet<u64>,
    anomalies: Vec<String>,
    storage: Storage,
    closed: bool,
}

struct Sim {
    rng: Rng,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: HashMap<u64, Ev>,
    store: MemoryStore,
    bus: Vec<Relayed>,
    relays: Vec<Relay>,
    clients: Vec<Client>,
    next_conn: ConnId,
    active: u64,
    limits: RoomLimits,
    /// (position, sender, step) of every append stored.
    history: Vec<(u64, u64, u64)>,
    trace: Option<String>,
    crashes: u64,
    /// Whether the sessions keep their state in storage.
    persist: bool,
    /// A real-time room (a game session) with this stale window, in a quarter of the runs. Its
    /// clients only edit the document, whose messages are never stale: every check holds as
    /// in any room, no anomaly included.
    stale_window: Option<u64>,
    /// When the last tab reopened, or typed after the active period, or will reopen.
    last_activity: u64,
    reopens: u64,
    /// Sessions that joined again as a new node, their clock too far ahead of the room's.
    renewed: u64,
}

impl Sim {
    fn new(seed: u64, trace: bool) -> Self {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let store = MemoryStore::new();
        let relays = rng.range(2, 3) as usize;
        let clients = rng.range(2, 5) as usize;
        let active = rng.range(2_000, 5_000);
        // In half the runs the rooms compact often (one relay at a time).
        let limits = RoomLimits {
            compact_updates: if rng.chance(0.5) {
                rng.range(5, 40)
            } else {
                10_000
            },
            ..RoomLimits::default()
        };
        let mut sim = Sim {
            rng,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            events: HashMap::new(),
            store,
            bus: Vec::new(),
            relays: (0..relays)
                .map(|i| Relay {
                    life: i as u64 * 1_000 + 1,
                    up: true,
                    core: None,
                    conns: BTreeMap::new(),
                    writes: VecDeque::new(),
                    writing: false,
                    answer_at: 0,
                    bus_read: 0,
                })
                .collect(),
            clients: Vec::new(),
            next_conn: 1,
            active,
            limits,
            history: Vec::new(),
            trace: trace.then(String::new),
            crashes: 0,
            persist: false,
            stale_window: None,
            last_activity: 0,
            reopens: 0,
            renewed: 0,
        };
        // Drawn here, after what the runs drew before storage existed, and before the clients'
        // seeds (which storage changes anyway).
        let mut rng = Rng(seed.wrapping_mul(0xbf58_476d_1ce4_e5b9) | 1);
        sim.persist = rng.chance(0.5);
        // Drawn apart, so that the runs draw what they drew before real-time rooms.
        let mut rng = Rng(seed.wrapping_mul(0x94d0_49bb_1331_11eb) | 1);
        if rng.chance(0.25) {
            sim.stale_window = Some(rng.range(20, 200));
        }
        for i in 0..clients {
            let session = sim.new_session(i, None);
            sim.clients.push(Client {
                session,
                conn: None,
                timer: None,
                generation: 0,
                ops: 0,
                sent: Vec::new(),
                received: Vec::new(),
                acked: Vec::new(),
                positions: HashSet::new(),
                anomalies: Vec::new(),
                storage: Storage::default(),
                closed: false,
            });
            let first = sim.rng.range(0, 100);
            sim.at(first, Ev::Op { client: i });
            sim.drive(i);
        }
        for r in 0..relays {
            let (at, life) = (sim.rng.range(1, 10), sim.relays[r].life);
            sim.at(at, Ev::Follow { relay: r, life });
        }
        let crashes = sim.rng.range(0, 3);
        for _ in 0..crashes {
            let at = sim.rng.range(200, active);
            let relay = sim.rng.range(0, relays as u64 - 1) as usize;
            sim.at(at, Ev::Crash { relay });
        }
        if sim.persist {
            // Tabs that close and reopen; now and then one again and again, with relays
            // restarting meanwhile.
            for _ in 0..rng.range(0, 3) {
                let at = rng.range(100, active);
                let client = rng.range(0, clients as u64 - 1) as usize;
                let down = rng.range(50, 5_000);
                sim.at(at, Ev::Close { client, down });
            }
            if rng.chance(0.2) {
                let client = rng.range(0, clients as u64 - 1) as usize;
                let mut at = rng.range(active / 2, active);
                for _ in 0..rng.range(12, 20) {
                    let down = rng.range(100, 1_500);
                    sim.at(at, Ev::Close { client, down });
                    if rng.chance(0.3) {
                        let relay = rng.range(0, relays as u64 - 1) as usize;
                        sim.at(at + down / 2, Ev::Crash { relay });
                    }
                    at += down + rng.range(200, 2_000);
                }
            }
        }
        sim
    }

    /// A session for client `i`, restored from `stored` if given.
    fn new_session(&mut self, i: usize, storage: Option<&Storage>) -> Session<SharedDoc> {
        let mut config = SessionConfig::new(ROOM, format!("c{i}"));
        config.connect_timeout = 3_600_000;
        config.seed = self.rng.next();
        config.relays = self.relays.len();
        config.persist = self.persist;
        let replica = SharedDoc::with_client_id(100 + i as u64);
        if let Some(storage) = storage {
            storage.restore(&mut config, &replica);
        }
        Session::new(config, replica, self.now)
    }

    /// Starts a write to storage if one is wanted and none is under way.
    fn save(&mut self, client: usize) {
        let c = &mut self.clients[client];
        if c.closed {
            return;
        }
        let Some(write) = c.storage.begin(&mut c.session) else {
            return;
        };
        let t = self.now + self.rng.range(1, 30);
        self.at(t, Ev::Saved { client, write });
    }

    fn log(&mut self, what: impl FnOnce() -> String) {
        if let Some(trace) = &mut self.trace {
            trace.push_str(&format!("{:>6} {}\n", self.now, what()));
        }
    }

    fn at(&mut self, time: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse((time, self.seq)));
        self.events.insert(self.seq, ev);
    }

    fn latency(&mut self) -> u64 {
        if self.rng.chance(0.05) {
            self.rng.range(20, 200)
        } else {
            self.rng.range(1, 10)
        }
    }

    fn run(&mut self) -> Result<(), String> {
        let mut processed = 0u64;
        let mut quiet_since = None;
        while let Some(Reverse((time, seq))) = self.queue.pop() {
            if let Some(Ev::Timer { client, generation }) = self.events.get(&seq) {
                if self.clients[*client].generation != *generation {
                    self.events.remove(&seq);
                    continue;
                }
            }
            self.now = time;
            let ev = self.events.remove(&seq).expect("scheduled");
            self.handle(ev);
            // Heartbeats never stop: the run ends after a quiet minute, every client open.
            let open = self
                .clients
                .iter()
                .all(|c| c.session.status() == Status::Open);
            if self.now >= self.settled_after() && self.quiet() && open {
                let since = *quiet_since.get_or_insert(self.now);
                if self.now >= since + 60_000 {
                    break;
                }
            } else {
                quiet_since = None;
            }
            processed += 1;
            if processed > 5_000_000 || self.now > self.settled_after() + 570_000 {
                let clients: Vec<String> = self
                    .clients
                    .iter()
                    .map(|c| {
                        format!(
                            "{:?} pending {} on {:?}",
                            c.session.status(),
                            c.session.pending(),
                            c.conn
                        )
                    })
                    .collect();
                let relays: Vec<String> = self
                    .relays
                    .iter()
                    .map(|r| {
                        format!(
                            "up {} core {} writes {}",
                            r.up,
                            r.core.is_some(),
                            r.writes.len()
                        )
                    })
                    .collect();
                return Err(format!(
                    "the run does not settle (at {} ms): clients {clients:?}, relays {relays:?}",
                    self.now
                ));
            }
        }
        self.check()
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Op { client } => self.op(client),
            Ev::Timer { client, generation } => {
                if self.clients[client].generation == generation {
                    self.clients[client].timer = None;
                    self.clients[client].session.handle_timeout(self.now);
                    self.drive(client);
                }
            }
            Ev::Opened {
                client,
                relay,
                conn,
            } => {
                let live = self.relays[relay].conns.contains_key(&conn);
                if self.clients[client].conn == Some((relay, conn)) && live {
                    self.clients[client].session.handle_connected(self.now);
                    self.drive(client);
                }
            }
            Ev::Unreachable { client, conn } => {
                if self.clients[client].conn.map(|c| c.1) == Some(conn) {
                    self.clients[client].conn = None;
                    let now = self.now;
                    self.clients[client]
                        .session
                        .handle_closed(now, 1006, "unreachable");
                    self.drive(client);
                }
            }
            Ev::ToRelay { relay, conn, bytes } => self.relay_receive(relay, conn, bytes),
            Ev::ToClient {
                client,
                conn,
                bytes,
            } => {
                if self.clients[client].conn.map(|c| c.1) == Some(conn) {
                    self.observe(client, &bytes);
                    let now = self.now;
                    self.clients[client].session.handle_frame(now, &bytes);
                    self.drive(client);
                }
            }
            Ev::Closed {
                client,
                conn,
                code,
                reason,
            } => {
                if self.clients[client].conn.map(|c| c.1) == Some(conn) {
                    self.clients[client].conn = None;
                    let now = self.now;
                    self.clients[client]
                        .session
                        .handle_closed(now, code, &reason);
                    self.drive(client);
                }
            }
            Ev::Write { relay, life } => self.write(relay, life),
            Ev::Answer {
                relay,
                life,
                answer,
            } => {
                if self.relays[relay].life == life {
                    if self.trace.is_some() {
                        let what = match &answer {
                            Ok(Appended::Stored { position, .. }) => {
                                format!("stored at {position}")
                            }
                            other => format!("{other:?}"),
                        };
                        self.log(|| format!("relay {relay}'s append: {what}"));
                    }
                    if let Some(core) = &mut self.relays[relay].core {
                        core.appended(answer);
                    }
                    self.outputs(relay);
                }
            }
            Ev::Follow { relay, life } => {
                if self.relays[relay].life != life || !self.relays[relay].up {
                    return;
                }
                self.follow(relay);
                if self.now < self.settled_after() || !self.quiet() {
                    let next = self.now + self.rng.range(1, 20);
                    self.at(next, Ev::Follow { relay, life });
                }
            }
            Ev::Crash { relay } => self.crash(relay),
            Ev::Restart { relay } => {
                let r = &mut self.relays[relay];
                r.up = true;
                r.life += 1;
                r.bus_read = self.bus.len();
                let life = r.life;
                self.log(|| format!("relay {relay} restarts"));
                let next = self.now + 1;
                self.at(next, Ev::Follow { relay, life });
            }
            Ev::Gone { relay, id } => {
                if let Some(core) = &mut self.relays[relay].core {
                    core.relay_gone(id);
                }
                self.outputs(relay);
            }
            Ev::Saved { client, write } => {
                let now = self.now;
                let c = &mut self.clients[client];
                let Some(stored) = c.storage.end(write) else {
                    return;
                };
                c.session.handle_saved(now, stored);
                self.save(client);
                self.drive(client);
            }
            Ev::Close { client, down } => {
                if self.clients[client].closed {
                    return;
                }
                self.log(|| format!("c{client}'s tab closes for {down} ms"));
                let c = &mut self.clients[client];
                c.closed = true;
                c.storage.close();
                c.generation += 1;
                c.timer = None;
                if let Some((relay, conn)) = c.conn.take() {
                    let t = self.now + self.latency();
                    self.at(t, Ev::SocketGone { relay, conn });
                }
                let t = self.now + down;
                self.last_activity = self.last_activity.max(t);
                self.at(t, Ev::Reopen { client });
            }
            Ev::Reopen { client } => {
                let storage = std::mem::take(&mut self.clients[client].storage);
                let session = self.new_session(client, Some(&storage));
                let position = storage.held.as_ref().map_or(0, |(saved, _)| saved.position);
                self.reopens += 1;
                self.log(|| format!("c{client} reopens from storage at position {position}"));
                let c = &mut self.clients[client];
                c.session = session;
                c.closed = false;
                c.storage = storage;
                // What the closed tab had not stored is gone: it was never sent.
                let stored_ids = &c.storage.ids;
                c.sent.retain(|id| stored_ids.contains(id));
                // What came after the stored position comes again, to the new page.
                c.received.retain(|&(_, p)| p <= position);
                self.drive(client);
                let t = self.now + self.rng.range(100, 500);
                self.at(t, Ev::Edit { client });
            }
            Ev::Edit { client } => {
                self.last_activity = self.last_activity.max(self.now);
                if !self.clients[client].closed {
                    self.edit(client);
                    self.drive(client);
                }
            }
            Ev::SocketGone { relay, conn } => {
                if self.relays[relay].conns.remove(&conn).is_some() {
                    if let Some(core) = &mut self.relays[relay].core {
                        core.leave(conn);
                    }
                    self.outputs(relay);
                }
            }
        }
    }

    /// When the run may be over, if nothing moves: 30 s after the last edit or tab reopened.
    fn settled_after(&self) -> u64 {
        self.active.max(self.last_activity) + 30_000
    }

    /// Whether nothing is left to do but the relays' reading.
    fn quiet(&self) -> bool {
        self.relays
            .iter()
            .all(|r| r.writes.is_empty() && !r.writing)
            && self.clients.iter().all(|c| c.session.pending() == 0)
    }

    fn op(&mut self, client: usize) {
        if self.now > self.active {
            return;
        }
        if self.clients[client].closed {
            let next = self.now + self.rng.range(1, 80);
            return self.at(next, Ev::Op { client });
        }
        let now = self.now;
        let c = &mut self.clients[client];
        c.ops += 1;
        let roll = self.rng.range(0, 99);
        if self.stale_window.is_some() {
            // A real-time room's inputs may be stale (dropped, by design): only the document.
            self.edit(client);
        } else if roll < 20 {
            let id = format!("c{client}-{}", c.ops);
            c.sent.push(id.clone());
            let data = Json::from_value(&serde_json::json!({ "id": id })).expect("json");
            c.session.broadcast(now, data).expect("broadcast");
        } else if roll < 25 {
            let data = Json::from_value(&serde_json::json!({ "signal": c.ops })).expect("json");
            c.session.broadcast_signal(now, data).expect("signal");
        } else {
            self.edit(client);
        }
        self.drive(client);
        let next = self.now + self.rng.range(1, 80);
        self.at(next, Ev::Op { client });
    }

    /// Inserts a few characters somewhere in the client's text.
    fn edit(&mut self, client: usize) {
        let now = self.now;
        let len = self.clients[client].session.replica().len(TEXT);
        let index = self.rng.range(0, u64::from(len)) as u32;
        let text = ["a", "bc", "def", "ghij"][self.rng.range(0, 3) as usize];
        let c = &mut self.clients[client];
        let update = c
            .session
            .replica()
            .insert(TEXT, index, text)
            .expect("insert");
        c.session.update(now, TEXT, update).expect("update");
    }

    fn drive(&mut self, client: usize) {
        while let Some(output) = self.clients[client].session.poll_output() {
            match output {
                session::Output::Connect => {
                    // Each client has the relays in its own order: they start spread out.
                    let relay = (self.clients[client].session.relay() + client) % self.relays.len();
                    let conn = self.next_conn;
                    self.next_conn += 1;
                    self.clients[client].conn = Some((relay, conn));
                    let t = self.now + self.latency();
                    if self.relays[relay].up {
                        let link = Conn {
                            client,
                            reader: None,
                            up_at: t,
                            down_at: t,
                        };
                        self.relays[relay].conns.insert(conn, link);
                        self.at(
                            t,
                            Ev::Opened {
                                client,
                                relay,
                                conn,
                            },
                        );
                    } else {
                        self.at(t, Ev::Unreachable { client, conn });
                    }
                }
                session::Output::Send(bytes) => {
                    let Some((relay, conn)) = self.clients[client].conn else {
                        continue;
                    };
                    let lat = self.latency();
                    if let Some(link) = self.relays[relay].conns.get_mut(&conn) {
                        link.up_at = link.up_at.max(self.now + lat);
                        let t = link.up_at;
                        let bytes = Bytes::from(bytes);
                        self.at(t, Ev::ToRelay { relay, conn, bytes });
                    }
                }
                session::Output::Disconnect { .. } => {
                    if let Some((relay, conn)) = self.clients[client].conn.take() {
                        if let Some(core) = &mut self.relays[relay].core {
                            core.leave(conn);
                        }
                        self.relays[relay].conns.remove(&conn);
                        self.outputs(relay);
                    }
                }
                session::Output::Save => {
                    self.clients[client].storage.want();
                    self.save(client);
                }
            }
        }
        while let Some(event) = self.clients[client].session.poll_event() {
            let c = &mut self.clients[client];
            match event {
                Event::Message {
                    data,
                    durable: true,
                    ..
                } => {
                    if let Ok(value) = data.to_value::<serde_json::Value>() {
                        if let Some(id) = value["id"].as_str() {
                            let position = c.session.position();
                            c.received.push((id.to_owned(), position));
                        }
                    }
                }
                Event::Status {
                    reason: Some(reason),
                    ..
                } if reason.contains("joining again as a new node") => self.renewed += 1,
                Event::Anomaly(anomaly) if anomaly.source == Source::Local => {
                    c.anomalies
                        .push(format!("{}: {}", anomaly.reason, anomaly.detail));
                }
                // Every member is honest: nothing of theirs is refused for good (a refused edit
                // takes every later edit of its client with it).
                Event::Refused {
                    kind,
                    reason,
                    detail,
                    ..
                } => c
                    .anomalies
                    .push(format!("{kind:?} refused for good, {reason}: {detail}")),
                _ => {}
            }
        }
        let next = self.clients[client].session.poll_timeout();
        let c = &mut self.clients[client];
        if next != c.timer.map(|(t, _)| t) {
            c.generation += 1;
            c.timer = next.map(|t| (t, c.generation));
            if let Some(t) = next {
                let generation = c.generation;
                let t = t.max(self.now);
                self.at(t, Ev::Timer { client, generation });
            }
        }
    }

    fn observe(&mut self, client: usize, bytes: &[u8]) {
        if let Ok(p) = Frame::decode_positioned(bytes, &Limits::default()) {
            if let Some(position) = p.position {
                self.clients[client].positions.insert(position);
            }
        }
        if self.trace.is_some() {
            if let Ok(p) = Frame::decode_positioned(bytes, &Limits::default()) {
                let kind = p.frame.kind();
                let stamp = p.frame.stamp().map(|s| (s.sender, s.step));
                let position = p.position;
                self.log(|| format!("c{client} gets {kind} {stamp:?} at {position:?}"));
            }
        }
        if let Ok(Frame::Ack { step, position }) = Frame::decode(bytes) {
            self.clients[client].acked.push((step, position));
        }
    }

    fn relay_receive(&mut self, relay: usize, conn: ConnId, bytes: Bytes) {
        if !self.relays[relay].up {
            return;
        }
        let Some(link) = self.relays[relay].conns.get(&conn) else {
            return;
        };
        let client = link.client;
        if link.reader.is_none() {
            let Ok(Frame::Join {
                name,
                since,
                log,
                resume,
                floor,
                ..
            }) = Frame::decode(&bytes)
            else {
                return self.cut(relay, conn, close::POLICY, "the first frame must be a join");
            };
            if self.relays[relay].core.is_none() {
                let config = RoomConfig {
                    stale_window: self.stale_window,
                    ..RoomConfig::default()
                };
                let record = self.store.open_now(ROOM, config);
                let document = self.store.document_now(ROOM);
                let mut core = RoomCore::new(ROOM.into(), record, &document, self.limits, self.now)
                    .expect("a valid room");
                core.share();
                self.relays[relay].core = Some(core);
            }
            let fresh: [u8; 16] = self.rng.next().to_le_bytes().repeat(2).try_into().unwrap();
            let core = self.relays[relay].core.as_mut().expect("loaded");
            let stored = resume
                .filter(|token| !core.knows(token))
                .and_then(|token| self.store.find_now(ROOM, token));
            let request = room::JoinRequest {
                name,
                since,
                log,
                resume,
                stored,
                access: room::Access::OPEN,
                floor,
                // Shared rooms let nodes go without a record of their steps.
                released: None,
            };
            match core.join(self.now, conn, request, fresh) {
                Err(refused) => self.cut(relay, conn, refused.code, &refused.reason),
                Ok(joined) => {
                    let node = joined.node;
                    self.log(|| format!("c{client} joins relay {relay} as node {node}"));
                    if let Some(entry) = self.relays[relay].conns.get_mut(&conn) {
                        entry.reader = Some(room::Reader::new(Limits::default()));
                    }
                    self.send(relay, conn, joined.welcome.clone());
                    for presence in joined.presences.clone() {
                        self.send(relay, conn, presence);
                    }
                    for logged in self
                        .store
                        .read_now(ROOM, joined.from, joined.until, usize::MAX)
                    {
                        if !joined.replays(&logged) {
                            continue;
                        }
                        for piece in part::fragment(&logged.bytes, Limits::default().max_frame) {
                            self.send(relay, conn, Bytes::from(piece));
                        }
                    }
                    self.send(relay, conn, joined.caught_up.clone());
                    self.outputs(relay);
                }
            }
            return;
        }
        let now = self.now;
        let r = &mut self.relays[relay];
        let Some(Conn {
            reader: Some(reader),
            ..
        }) = r.conns.get_mut(&conn)
        else {
            return;
        };
        let read = reader.read(bytes);
        let what = match &read {
            room::Read::Frame { frame, .. } => {
                let stamp = frame.frame.stamp().map(|s| (s.sender, s.step));
                Some(format!("{} {stamp:?}", frame.frame.kind()))
            }
            _ => None,
        };
        if let Some(core) = &mut r.core {
            core.receive(now, conn, read);
        }
        if let Some(what) = what {
            self.log(|| format!("relay {relay} reads {what} from c{client}"));
        }
        self.outputs(relay);
    }

    fn send(&mut self, relay: usize, conn: ConnId, bytes: Bytes) {
        let lat = self.latency();
        let Some(link) = self.relays[relay].conns.get_mut(&conn) else {
            return;
        };
        link.down_at = link.down_at.max(self.now + lat);
        let (client, t) = (link.client, link.down_at);
        self.at(
            t,
            Ev::ToClient {
                client,
                conn,
                bytes,
            },
        );
    }

    fn cut(&mut self, relay: usize, conn: ConnId, code: u16, reason: &str) {
        if let Some(link) = self.relays[relay].conns.remove(&conn) {
            if let Some(core) = &mut self.relays[relay].core {
                core.leave(conn);
            }
            let client = link.client;
            // After what was sent before it.
            let t = link.down_at.max(self.now) + self.latency();
            let reason = reason.to_owned();
            self.at(
                t,
                Ev::Closed {
                    client,
                    conn,
                    code,
                    reason,
                },
            );
        }
    }

    fn outputs(&mut self, relay: usize) {
        loop {
            let Some(output) = self.relays[relay]
                .core
                .as_mut()
                .and_then(|c| c.poll_output())
            else {
                break;
            };
            match output {
                room::Output::Send { to, bytes } => self.send(relay, to, bytes),
                room::Output::Fanout { except, bytes } => {
                    let conns: Vec<ConnId> = self.relays[relay]
                        .conns
                        .iter()
                        .filter(|(c, link)| Some(**c) != except && link.reader.is_some())
                        .map(|(c, _)| *c)
                        .collect();
                    for conn in conns {
                        self.send(relay, conn, bytes.clone());
                    }
                }
                room::Output::Close { conn, code, reason } => self.cut(relay, conn, code, &reason),
                room::Output::Reserve { count } => {
                    let answer = self.store.reserve_now(ROOM, count);
                    if let Some(core) = &mut self.relays[relay].core {
                        core.reserved(answer);
                    }
                }
                room::Output::Append(append) => {
                    let (sender, step) = (append.sender, append.step);
                    self.log(|| format!("relay {relay} appends ({sender}, {step})"));
                    self.enqueue(relay, Write::Append(append));
                }
                room::Output::Released(_) => unreachable!("a shared room keeps no releases"),
                room::Output::Publish {
                    to,
                    after,
                    bytes,
                    step,
                    ..
                } => {
                    if self.trace.is_some() {
                        let stamp = Frame::decode(&bytes)
                            .ok()
                            .and_then(|f| f.stamp().map(|s| (s.sender, s.step)));
                        self.log(|| format!("relay {relay} publishes {stamp:?} after {after}"));
                    }
                    let relayed = Relayed {
                        relay: self.relays[relay].life,
                        after,
                        to,
                        high: 0,
                        bytes,
                    };
                    self.enqueue(relay, Write::Publish(relayed, step));
                }
                room::Output::Stop { reason, .. } => {
                    self.log(|| format!("relay {relay}'s room stops: {reason}"));
                    self.relays[relay].core = None;
                }
            }
        }
    }

    /// A write for the store, made in order after a delay.
    fn enqueue(&mut self, relay: usize, write: Write) {
        let r = &mut self.relays[relay];
        r.writes.push_back(write);
        if !r.writing {
            r.writing = true;
            let life = r.life;
            let t = self.now + self.rng.range(1, 8);
            self.at(t, Ev::Write { relay, life });
        }
    }

    fn write(&mut self, relay: usize, life: u64) {
        if self.relays[relay].life != life {
            return;
        }
        let Some(write) = self.relays[relay].writes.pop_front() else {
            self.relays[relay].writing = false;
            return;
        };
        match write {
            Write::Append(append) => {
                let (sender, step) = (append.sender, append.step);
                if append.snapshot {
                    let covers = append.covers;
                    let pending = self.relays[relay]
                        .core
                        .as_ref()
                        .map(|c| c.document().has_pending());
                    self.log(|| format!("relay {relay} stores a snapshot covering {covers} (pending {pending:?})"));
                }
                let answer = self.store.append_shared_now(ROOM, life, self.now, append);
                if let Ok(Appended::Stored { position, .. }) = &answer {
                    self.history.push((*position, sender, step));
                }
                let t = (self.now + self.rng.range(0, 5)).max(self.relays[relay].answer_at);
                self.relays[relay].answer_at = t;
                self.at(
                    t,
                    Ev::Answer {
                        relay,
                        life,
                        answer,
                    },
                );
            }
            Write::Publish(mut relayed, step) => {
                // Its place in the store's order and the room step, as the store's script sets
                // them.
                let (position, high) = self.store.publish_now(ROOM, step);
                relayed.after = relayed.after.max(position);
                relayed.high = high;
                self.bus.push(relayed);
            }
        }
        let t = self.now + self.rng.range(0, 3);
        self.at(t, Ev::Write { relay, life });
    }

    fn follow(&mut self, relay: usize) {
        let now = self.now;
        let life = self.relays[relay].life;
        let from = self.relays[relay].bus_read;
        self.relays[relay].bus_read = self.bus.len();
        let Some(core) = &mut self.relays[relay].core else {
            return;
        };
        // The log after what the room has read (its backlog included), and the bus.
        let entries = self.store.follow_now(ROOM, core.published());
        let relayed: Vec<Relayed> = self.bus[from..]
            .iter()
            .map(|r| {
                let mut r = r.clone();
                if r.relay == life {
                    r.bytes = Bytes::new();
                }
                r
            })
            .collect();
        core.followed(now, &entries, &relayed, true);
        self.outputs(relay);
    }

    /// SIGKILL: the writes not made are lost, those made but not answered stay made; every
    /// connection drops; the relay comes back a little later.
    fn crash(&mut self, relay: usize) {
        if !self.relays[relay].up {
            return;
        }
        self.crashes += 1;
        self.log(|| format!("relay {relay} crashes"));
        let r = &mut self.relays[relay];
        let id = r.life;
        r.up = false;
        r.core = None;
        r.writes.clear();
        r.writing = false;
        r.life += 1;
        let conns: Vec<(ConnId, usize)> =
            r.conns.iter().map(|(c, link)| (*c, link.client)).collect();
        r.conns.clear();
        for (conn, client) in conns {
            let t = self.now + self.latency();
            self.at(
                t,
                Ev::Closed {
                    client,
                    conn,
                    code: 1006,
                    reason: "the relay died".into(),
                },
            );
        }
        for other in 0..self.relays.len() {
            if other != relay {
                let t = self.now + self.rng.range(100, 6_000);
                self.at(t, Ev::Gone { relay: other, id });
            }
        }
        let back = self.now + self.rng.range(50, 3_000);
        self.at(back, Ev::Restart { relay });
    }

    fn check(&self) -> Result<(), String> {
        let log = self.store.log(ROOM);
        let doc = SharedDoc::new();
        for logged in self.store.document_now(ROOM) {
            let limits = Limits {
                max_frame: usize::MAX,
                max_message: usize::MAX,
                ..Limits::default()
            };
            match Frame::decode_with(&logged.bytes, &limits) {
                Ok(Frame::Stamped(s)) => {
                    if let pattern_mesh::wire::Body::Update { update, .. } = s.body {
                        doc.apply_update(&update).map_err(|e| e.to_string())?;
                    }
                }
                Ok(Frame::Snapshot { state, .. }) => {
                    doc.apply_update(&state).map_err(|e| e.to_string())?;
                }
                _ => {}
            }
        }
        let text = doc.text(TEXT);
        let positions: HashMap<u64, &pattern_mesh::store::Logged> =
            log.iter().map(|l| (l.position, l)).collect();
        for (i, c) in self.clients.iter().enumerate() {
            if c.session.status() != session::Status::Open || c.session.pending() > 0 {
                return Err(format!(
                    "c{i} waits: {:?} with {} pending",
                    c.session.status(),
                    c.session.pending()
                ));
            }
            if c.session.replica().text(TEXT) != text {
                let missing: Vec<u64> = log
                    .iter()
                    .map(|l| l.position)
                    .filter(|p| !c.positions.contains(p) && !c.acked.iter().any(|a| a.1 == *p))
                    .collect();
                let missing: Vec<(u64, u64, Option<u64>)> = missing
                    .iter()
                    .map(|p| {
                        let l = positions[p];
                        let step = Frame::decode(&l.bytes)
                            .ok()
                            .and_then(|f| f.stamp().map(|s| s.step));
                        (*p, l.sender, step)
                    })
                    .collect();
                let node = c.session.node();
                let never: Vec<&(u64, u64, u64)> = self
                    .history
                    .iter()
                    .filter(|(p, s, _)| {
                        *s != 0 && !c.positions.contains(p) && !c.acked.iter().any(|a| a.1 == *p)
                    })
                    .collect();
                let snapshots = log
                    .iter()
                    .filter(|l| matches!(Frame::decode(&l.bytes), Ok(Frame::Snapshot { .. })))
                    .count();
                return Err(format!(
                    "c{i} did not converge on the log's text ({} against {} characters; {snapshots} snapshots in the log, compacting every {} updates; node {node:?} has none of {missing:?}; never got {never:?})",
                    c.session.replica().text(TEXT).len(),
                    text.len(),
                    self.limits.compact_updates
                ));
            }
            if !c.anomalies.is_empty() {
                return Err(format!("c{i} anomalies: {:?}", c.anomalies));
            }
            for &(step, position) in &c.acked {
                let Some(logged) = positions.get(&position) else {
                    // A snapshot after it may have dropped it (an update).
                    let compacted = log.iter().any(|l| {
                        l.position > position
                            && matches!(Frame::decode(&l.bytes), Ok(Frame::Snapshot { .. }))
                    });
                    if compacted {
                        continue;
                    }
                    return Err(format!(
                        "c{i}'s acknowledged step {step} is not at {position}"
                    ));
                };
                let logged_step = Frame::decode(&logged.bytes)
                    .ok()
                    .and_then(|f| f.stamp().map(|s| s.step));
                if logged_step != Some(step) {
                    return Err(format!(
                        "position {position} does not hold c{i}'s step {step}"
                    ));
                }
            }
            let mut expected: Vec<String> = Vec::new();
            for logged in &log {
                if let Ok(Frame::Stamped(s)) = Frame::decode(&logged.bytes) {
                    if let pattern_mesh::wire::Body::Data { data } = &s.body {
                        let value: serde_json::Value = data.to_value().unwrap();
                        let id = value["id"].as_str().unwrap_or_default().to_owned();
                        if !c.sent.contains(&id) {
                            expected.push(id);
                        }
                    }
                }
            }
            let received: Vec<&String> = c.received.iter().map(|(id, _)| id).collect();
            if received != expected.iter().collect::<Vec<_>>() {
                return Err(format!(
                    "c{i} received {} data messages, the log holds {} of the others': {:?} against {:?}",
                    c.received.len(),
                    expected.len(),
                    c.received,
                    expected
                ));
            }
        }
        let sent: HashSet<&String> = self.clients.iter().flat_map(|c| &c.sent).collect();
        for id in &sent {
            let holders = log
                .iter()
                .filter(|l| {
                    Frame::decode(&l.bytes)
                        .ok()
                        .and_then(|f| match f {
                            Frame::Stamped(s) => match s.body {
                                pattern_mesh::wire::Body::Data { data } => {
                                    data.to_value::<serde_json::Value>().ok()
                                }
                                _ => None,
                            },
                            _ => None,
                        })
                        .is_some_and(|v| v["id"].as_str() == Some(id.as_str()))
                })
                .count();
            if holders != 1 {
                return Err(format!("{id} is in the log {holders} times"));
            }
        }
        Ok(())
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn many_relays_on_one_store_hold_the_protocol_for_every_seed() {
    let trace = std::env::var("PM_SIM_TRACE").is_ok();
    let seeds: Vec<u64> = match env_u64("PM_SIM_SEED") {
        Some(seed) => vec![seed],
        None => {
            let from = env_u64("PM_SIM_FROM").unwrap_or(0);
            (from..from + env_u64("PM_SIM_SEEDS").unwrap_or(300)).collect()
        }
    };
    let (mut failed, mut crashes, mut reopens, mut renewed) = (Vec::new(), 0, 0, 0);
    for &seed in &seeds {
        let mut sim = Sim::new(seed, trace);
        let result = sim.run();
        crashes += sim.crashes;
        reopens += sim.reopens;
        renewed += sim.renewed;
        if let Some(trace) = &sim.trace {
            println!("{trace}");
        }
        if let Err(e) = result {
            println!("seed {seed}: {e}");
            failed.push(seed);
        }
    }
    println!(
        "shared simulation: {} seeds, {} failed, {crashes} relay crashes, {reopens} tabs reopened \
         from storage, {renewed} new identities taken by clocks too far ahead",
        seeds.len(),
        failed.len()
    );
    assert!(failed.is_empty(), "failing seeds: {failed:?}");
}
