//! The pattern-mesh relay: rooms, fan-out, validation at the edge, durable room logs, and the
//! demo's static files, on one port.
//!
//! The relay is a thin tokio driver of the core's sans-IO [`RoomCore`]: each room is a task that
//! feeds its core the frames of its members and the answers of the store, and carries out what
//! the core asks (send, fan out, append, close). Each connection is a task that does the join,
//! streams the catch-up from the store under back-pressure, then pumps frames both ways.
//!
//! [`serve`] takes a bound listener, so tests bind `127.0.0.1:0` and drive the real server, and
//! a shutdown future, so the binary can stop it on SIGTERM. The HTTP surface:
//!
//! - `GET /ws`: the WebSocket endpoint (binary frames, see [`pattern_mesh_core::wire`]), with
//!   the access token as `?token=` when the relay checks tokens (see the `auth` module);
//! - `GET /healthz`: `ok` while the relay serves;
//! - `GET /metrics`: Prometheus text (behind a bearer token if one is set);
//! - `/pkg/...`: the npm package directory; everything else: the demo directory.
#![warn(missing_docs)]

pub mod auth;
mod connection;
mod guard;
pub mod metrics;
mod offences;
mod queue;
mod room;
pub mod store;

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, State, WebSocketUpgrade};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use futures_util::FutureExt;
use pattern_mesh_core::room::{ConnId, JoinRefused, JoinRequest, RoomCore, RoomLimits};
use pattern_mesh_core::store::Store;
use pattern_mesh_core::wire::{close, Limits, RoomConfig};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tower_http::services::ServeDir;

use guard::{GuardConfig, Guarded, Peer};
use metrics::Metrics;
use room::Command;

pub use auth::AuthKey;
pub use store::StoreConfig;

pub use pattern_mesh_core::wire::close as close_code;

/// The relay's settings.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Where the room logs live.
    pub store: StoreConfig,
    /// The demo directory, served at `/`.
    pub www_dir: PathBuf,
    /// The npm package directory, served at `/pkg/`.
    pub pkg_dir: PathBuf,
    /// Frame, message and field limits.
    pub limits: Limits,
    /// The most rooms at once.
    pub max_rooms: usize,
    /// The most members in one room.
    pub max_members: usize,
    /// The most members in one room whose access tokens name one user.
    pub max_members_per_user: usize,
    /// The most rooms the connections of one user (an access token's `sub`) are in at once on
    /// this relay.
    pub max_rooms_per_user: usize,
    /// Frames a node may send per second (a burst of as many is allowed).
    pub max_rate: u32,
    /// Bytes of stored messages a node may send per second (a burst of a whole message is
    /// allowed).
    pub bandwidth: u64,
    /// A room compacts its document once the updates logged since its last snapshot hold this
    /// many bytes (and at least the snapshot's size)...
    pub compact_bytes: u64,
    /// ... or once there are this many of them.
    pub compact_updates: u64,
    /// The most bytes one room's log may hold; messages past it are refused as `full`, and
    /// stored data past three quarters of it.
    pub max_room_bytes: u64,
    /// A node's record (its id, token and last step) is deleted once it has stored nothing for
    /// this long; the node then comes back with a new id.
    pub node_ttl: Duration,
    /// The longest the relay lets one update take to apply to a room's document; an update
    /// that takes longer is refused as `tooLarge` and the room reloads without it.
    pub apply_budget: Duration,
    /// A member whose messages stop a room twice within this time (an update that walks too
    /// far to apply or makes applying it panic, or a message the room panicked on; each stop
    /// closes every member of the room) is kept out of that room, on this relay, for as long:
    /// its access token's user, or its address on a relay without tokens. Zero: no one is kept
    /// out. (An update over `apply_budget` stops the room too, but is not counted: a loaded
    /// machine can make one of an honest update.)
    pub offence_bar: Duration,
    /// How long a room keeps a node that left and never wrote (so has no store record), for a
    /// reconnect to resume it.
    pub resume_grace: Duration,
    /// How long a member may send nothing (clients send a heartbeat every 15 s) before its
    /// connection is taken for dead and closed; zero: never.
    pub idle_timeout: Duration,
    /// Frames queued for one connection before it counts as too slow and is disconnected.
    pub send_queue: usize,
    /// Bytes queued for one connection before it counts as too slow and is disconnected (a
    /// message whose start is queued is queued whole, whatever its size: a queue holds at most
    /// this and one message).
    pub send_queue_bytes: usize,
    /// From its TCP accept, how long a connection has to send its join (an HTTP request that
    /// is not a WebSocket must be over by then too).
    pub join_timeout: Duration,
    /// The most connections open at once.
    pub max_connections: usize,
    /// The most connections open at once from one IP address.
    pub max_connections_per_ip: usize,
    /// The most bytes the relay holds, all connections together, for large messages whose
    /// parts are still arriving (and a quarter of it for one IP address); a part past it is
    /// refused as `rateLimited` with the rest of its message (the client sends it again later).
    /// WebSocket frames still arriving on members' connections count too (see
    /// `guard::Unframed`).
    pub max_partial_bytes: usize,
    /// Frames per second from one IP address, all its connections together (and as many at
    /// once).
    pub ip_rate: u64,
    /// Bytes per second from one IP address, all its connections and rooms together (and a
    /// whole message at once): what one address may make the relay store, or pass on. At least
    /// `bandwidth`.
    pub ip_bandwidth: u64,
    /// Rooms one IP address may open per minute (and as many at once): a join of a room that
    /// is not open costs one; over it, the join is closed with 1013. Each room opened stays
    /// open for `resume_grace` after its last member left, so that without it one address could
    /// fill `max_rooms` for everyone by joining and leaving new rooms.
    pub ip_room_opens: u64,
    /// With Redis: the most bytes of frames one room keeps in Redis for the members on other
    /// relays (signals, presence, sync answers), its oldest going first (at least one message
    /// of the largest size is kept).
    pub max_bus_bytes: u64,
    /// Settings of a room created by a join that names none.
    pub room: RoomConfig,
    /// The key access tokens are checked with; `None`: anyone may join any room.
    pub auth: Option<AuthKey>,
    /// With `auth`: the audience a token's `aud` must name. `None`: a token with an `aud` is
    /// refused (it was minted for another service).
    pub auth_audience: Option<String>,
    /// With `auth`: the issuer a token's `iss` must be. `None`: any.
    pub auth_issuer: Option<String>,
    /// The page origins whose WebSocket upgrades are accepted (the `Origin` header); empty:
    /// any.
    pub allowed_origins: Vec<String>,
    /// The bearer token `/metrics` asks for; `None`: it is public.
    pub metrics_token: Option<String>,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            store: StoreConfig::Sqlite(PathBuf::from("relay-data")),
            www_dir: PathBuf::from("www"),
            pkg_dir: PathBuf::from("pkg"),
            limits: Limits::default(),
            max_rooms: 10_000,
            max_members: 256,
            max_members_per_user: 32,
            max_rooms_per_user: 64,
            max_rate: 200,
            bandwidth: 4 << 20,
            compact_bytes: 8 << 20,
            compact_updates: 10_000,
            max_room_bytes: 1 << 30,
            node_ttl: Duration::from_secs(30 * 24 * 3_600),
            apply_budget: Duration::from_secs(2),
            offence_bar: Duration::from_secs(600),
            resume_grace: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(90),
            send_queue: 4_096,
            send_queue_bytes: 16 << 20,
            join_timeout: Duration::from_secs(10),
            max_connections: 10_000,
            max_connections_per_ip: 512,
            max_partial_bytes: 1 << 30,
            ip_rate: 2_000,
            ip_bandwidth: 32 << 20,
            ip_room_opens: 600,
            max_bus_bytes: 256 << 20,
            room: RoomConfig::default(),
            auth: None,
            auth_audience: None,
            auth_issuer: None,
            allowed_origins: Vec::new(),
            metrics_token: None,
        }
    }
}

impl RelayConfig {
    /// Refuses settings that do not go together: an audience or issuer for tokens without a
    /// key to check tokens with.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.auth.is_none() && (self.auth_audience.is_some() || self.auth_issuer.is_some()) {
            anyhow::bail!(
                "--auth-audience and --auth-issuer check access tokens: they need --auth-key or --auth-public-key"
            );
        }
        Ok(())
    }

    /// What every room enforces.
    pub fn room_limits(&self) -> RoomLimits {
        RoomLimits {
            limits: self.limits,
            rate: u64::from(self.max_rate),
            burst: u64::from(self.max_rate),
            max_members: self.max_members,
            max_members_per_user: self.max_members_per_user,
            bandwidth: self.bandwidth,
            bandwidth_burst: self.limits.max_message as u64,
            compact_bytes: self.compact_bytes,
            compact_updates: self.compact_updates,
            max_room_bytes: self.max_room_bytes,
            resume_grace: self.resume_grace.as_millis() as u64,
            idle_timeout: self.idle_timeout.as_millis() as u64,
        }
    }
}

/// How many released nodes' last steps the relay keeps (a few hundred bytes each, with their
/// room's name): a node forgotten here is welcomed back without a floor, as after a restart.
const RELEASES_KEPT: usize = 100_000;

/// The state shared by every connection and room.
pub(crate) struct Relay {
    config: RelayConfig,
    store: Arc<dyn Store>,
    /// For a store other relays share: what reads the rooms' logs back.
    feed: Option<store::Feed>,
    metrics: Arc<Metrics>,
    /// The token checker, if the relay checks tokens.
    auth: Option<auth::Auth>,
    rooms: Mutex<HashMap<String, mpsc::Sender<Command>>>,
    /// For each user of an access token, the rooms its connections are in, and how many in each.
    user_rooms: Mutex<HashMap<String, HashMap<String, u32>>>,
    /// The nodes the rooms let go, with their last steps.
    releases: Mutex<room::Releases>,
    /// Who stopped which room, and who is kept out of one for it.
    offences: Mutex<offences::Offences>,
    started: Instant,
    next_conn: AtomicU64,
    shutdown: watch::Receiver<bool>,
}

/// One connection of a user in a room, counted in [`Relay::user_rooms`] while it lives.
pub(crate) struct UserRoom {
    relay: Arc<Relay>,
    user: String,
    room: String,
}

impl Drop for UserRoom {
    fn drop(&mut self) {
        let mut users = self
            .relay
            .user_rooms
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(rooms) = users.get_mut(&self.user) {
            if let Some(count) = rooms.get_mut(&self.room) {
                *count -= 1;
                if *count == 0 {
                    rooms.remove(&self.room);
                }
            }
            if rooms.is_empty() {
                users.remove(&self.user);
            }
        }
    }
}

/// Counts a connection of `user` in `room`, unless the user's connections are in
/// `--max-rooms-per-user` other rooms already: then how many.
pub(crate) fn enter_user_room(
    relay: &Arc<Relay>,
    user: &str,
    room: &str,
) -> Result<UserRoom, usize> {
    let mut users = relay.user_rooms.lock().unwrap_or_else(|e| e.into_inner());
    let rooms = users.entry(user.to_owned()).or_default();
    if !rooms.contains_key(room) && rooms.len() >= relay.config.max_rooms_per_user {
        let held = rooms.len();
        if held == 0 {
            users.remove(user);
        }
        return Err(held);
    }
    *rooms.entry(room.to_owned()).or_default() += 1;
    Ok(UserRoom {
        relay: relay.clone(),
        user: user.to_owned(),
        room: room.to_owned(),
    })
}

impl Relay {
    /// Milliseconds since the relay started: the rooms' clock.
    pub(crate) fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// The instant of a time on the rooms' clock.
    fn instant_at(&self, ms: u64) -> tokio::time::Instant {
        tokio::time::Instant::from_std(self.started + Duration::from_millis(ms))
    }

    /// Joins `room` as connection `conn`, starting the room's task if needed.
    async fn join(
        self: &Arc<Self>,
        room: &str,
        request: JoinRequest,
        requested: Option<RoomConfig>,
        conn: ConnId,
        offender: offences::Offender,
    ) -> Result<(mpsc::Sender<Command>, room::Admitted), JoinRefused> {
        // A room task may retire between our look-up and our command: then start it anew.
        for _ in 0..3 {
            let commands = self
                .room_task(room, requested, request.access.write)
                .await?;
            let (reply, answer) = tokio::sync::oneshot::channel();
            let command = Command::Join {
                conn,
                request: request.clone(),
                offender,
                reply,
            };
            if commands.send(command).await.is_err() {
                continue;
            }
            match answer.await {
                Ok(result) => return result.map(|admitted| (commands, admitted)),
                Err(_) => continue,
            }
        }
        Err(JoinRefused {
            code: close::TRY_AGAIN_LATER,
            reason: "the room is restarting; try again".into(),
        })
    }

    /// The task of `room`, started if needed. A join that may not write (`writes` false) does
    /// not open a room that no writer opened: the first opening chooses the room's settings for
    /// good, and a reader could otherwise choose ones that break the room for its writers.
    async fn room_task(
        self: &Arc<Self>,
        room: &str,
        requested: Option<RoomConfig>,
        writes: bool,
    ) -> Result<mpsc::Sender<Command>, JoinRefused> {
        if let Some(commands) = self.lock_rooms().get(room) {
            return Ok(commands.clone());
        }
        if *self.shutdown.borrow() {
            return Err(JoinRefused {
                code: close::GOING_AWAY,
                reason: "the relay is shutting down".into(),
            });
        }
        let unavailable = |e: pattern_mesh_core::store::StoreError| JoinRefused {
            code: close::INTERNAL,
            reason: format!("the room could not be opened: {e}"),
        };
        if !writes && !self.store.room_exists(room).await.map_err(unavailable)? {
            return Err(JoinRefused {
                code: close::TRY_AGAIN_LATER,
                reason: "no member who may write has opened this room yet; try again later".into(),
            });
        }
        // A shared room: where the other relays' publications for it stand, and its members
        // on them; read before the room, so that no publication placed after the room's
        // position as read is passed over (the room drops those placed before it).
        let (bus, remote) = match &self.feed {
            Some(feed) => {
                let (bus, remote) = feed.open(room).await.map_err(unavailable)?;
                let relays = remote.members.iter().map(|(relay, _)| *relay).collect();
                (Some((bus, relays)), Some(remote))
            }
            None => (None, None),
        };
        let record = self
            .store
            .open_room(room, requested.unwrap_or(self.config.room))
            .await
            .map_err(unavailable)?;
        let document = self.store.read_document(room).await.map_err(unavailable)?;
        // Applying a large document takes a while: off the runtime's workers.
        let (name, limits, now) = (room.to_owned(), self.config.room_limits(), self.now_ms());
        let core = tokio::task::spawn_blocking(move || {
            let opened = match remote {
                Some(_) => RoomCore::new_shared(name, record, &document, limits, now),
                None => RoomCore::new(name, record, &document, limits, now),
            };
            opened.map(|mut core| {
                if let Some(remote) = remote {
                    core.remote_members(remote.members);
                    core.remote_presences(remote.presences);
                }
                core
            })
        })
        .await
        .map_err(|_| JoinRefused {
            code: close::INTERNAL,
            reason: "the room could not be opened".into(),
        })?
        .map_err(|e| JoinRefused {
            code: close::POLICY,
            reason: format!("the room's configuration is unusable: {e}"),
        })?;
        if core.load_failures() > 0 {
            tracing::warn!(
                %room,
                entries = core.load_failures(),
                "stored document entries that do not apply were skipped"
            );
        }
        let mut rooms = self.lock_rooms();
        // Another connection may have started it while we loaded.
        if let Some(commands) = rooms.get(room) {
            return Ok(commands.clone());
        }
        if rooms.len() >= self.config.max_rooms {
            return Err(JoinRefused {
                code: close::TRY_AGAIN_LATER,
                reason: format!("the relay is full: at most {} rooms", self.config.max_rooms),
            });
        }
        let (commands, queue) = mpsc::channel(1_024);
        rooms.insert(room.to_owned(), commands.clone());
        self.metrics.rooms.fetch_add(1, Relaxed);
        self.metrics.rooms_opened.fetch_add(1, Relaxed);
        // Unconstrained by tokio's cooperative budget: a room task that has used its budget sees
        // its store answers as not ready, each waking it again at once, and with thousands of
        // appends in flight that wake storm halved the room's throughput. The task still
        // yields whenever it has nothing to do.
        let (relay, name, registered) = (self.clone(), room.to_owned(), commands.clone());
        tokio::spawn(tokio::task::unconstrained(async move {
            let run = room::run(core, relay.clone(), queue, bus);
            if let Err(panic) = std::panic::AssertUnwindSafe(run).catch_unwind().await {
                // Its members' queues went with it (they are closed with 1011); the next join
                // loads the room again from the store.
                let detail = room::panic_message(&*panic);
                tracing::error!(room = %name, %detail, "the room panicked; it is loaded again on the next join");
                relay.metrics.room_panics.fetch_add(1, Relaxed);
                relay.forget(&name, &registered);
            }
        }));
        Ok(commands)
    }

    /// Called by an idle room task: removes it from the registry unless a command is waiting.
    /// Returns whether the task may stop.
    fn retire(&self, room: &str, queue: &mpsc::Receiver<Command>) -> bool {
        let mut rooms = self.lock_rooms();
        if !queue.is_empty() {
            return false;
        }
        if rooms.remove(room).is_some() {
            self.metrics.rooms.fetch_sub(1, Relaxed);
        }
        true
    }

    /// Removes a room task that ended without retiring, if it is still the registered one.
    fn forget(&self, room: &str, commands: &mpsc::Sender<Command>) {
        let mut rooms = self.lock_rooms();
        if rooms.get(room).is_some_and(|c| c.same_channel(commands)) {
            rooms.remove(room);
            self.metrics.rooms.fetch_sub(1, Relaxed);
        }
    }

    /// The bytes the relay holds at most for frames and messages still arriving, all
    /// connections together (`--max-partial-bytes`); never below the message limit, so that a
    /// message of that size always gets through.
    pub(crate) fn max_partial(&self) -> u64 {
        let message = self.config.limits.max_message as u64;
        (self.config.max_partial_bytes as u64).max(message)
    }

    /// What one address's connections may hold of [`Relay::max_partial`]: a quarter (at least
    /// a message), so that one address cannot keep every large message of the relay waiting.
    pub(crate) fn max_partial_per_ip(&self) -> u64 {
        let message = self.config.limits.max_message as u64;
        (self.max_partial() / 4).max(message)
    }

    /// Whether `room` is open on this relay now.
    pub(crate) fn is_open(&self, room: &str) -> bool {
        self.lock_rooms().contains_key(room)
    }

    fn lock_rooms(&self) -> std::sync::MutexGuard<'_, HashMap<String, mpsc::Sender<Command>>> {
        // A poisoned lock means a panic elsewhere; the map itself is still consistent.
        self.rooms.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Serves the relay on `listener` until `shutdown` completes, then closes every WebSocket with
/// 1001, lets the rooms finish their pending writes, and closes the store.
pub async fn serve(
    listener: TcpListener,
    config: RelayConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    config.check()?;
    let metrics = Arc::new(Metrics::default());
    let auth = match &config.auth {
        Some(key) => Some(
            auth::Auth::new(
                key,
                config.auth_audience.as_deref(),
                config.auth_issuer.as_deref(),
            )
            .map_err(anyhow::Error::msg)?,
        ),
        None => {
            tracing::warn!(
                "no --auth-key or --auth-public-key: anyone who reaches this relay may read and \
                 write every room"
            );
            None
        }
    };
    // A room's bus holds at least one message of the largest size.
    let bus_bytes = config.max_bus_bytes.max(config.limits.max_message as u64);
    let (store, feed) = store::open(&config.store, metrics.clone(), bus_bytes).await?;
    let (stop, stopped) = watch::channel(false);
    let relay = Arc::new(Relay {
        store: store.clone(),
        feed,
        metrics,
        auth,
        rooms: Mutex::default(),
        user_rooms: Mutex::default(),
        releases: Mutex::new(room::Releases::new(RELEASES_KEPT)),
        offences: Mutex::new(offences::Offences::new(
            u64::try_from(config.offence_bar.as_millis()).unwrap_or(u64::MAX),
        )),
        started: Instant::now(),
        next_conn: AtomicU64::new(1),
        shutdown: stopped.clone(),
        config,
    });
    let app = router(relay.clone());
    // Node records not seen for the TTL go, checked a few times per TTL (at most every minute).
    let expiry = {
        let (store, ttl) = (store.clone(), relay.config.node_ttl);
        tokio::spawn(async move {
            let every = (ttl / 4).clamp(Duration::from_millis(100), Duration::from_secs(60));
            loop {
                tokio::time::sleep(every).await;
                match store.expire_nodes(ttl).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(nodes = n, "expired node records"),
                    Err(e) => tracing::warn!(error = %e, "could not expire node records"),
                }
            }
        })
    };
    let mut http_stopped = stopped.clone();
    let guard = GuardConfig {
        max_connections: relay.config.max_connections,
        max_per_ip: relay.config.max_connections_per_ip,
        // A little after the join timeout, so that a WebSocket that sends no join hears why
        // (1008) before its socket is cut.
        deadline: relay.config.join_timeout + Duration::from_secs(2),
        ip_rate: relay.config.ip_rate,
        ip_room_opens: relay.config.ip_room_opens,
        // At least what one node may send: a client paces itself by its node's budget.
        ip_bandwidth: relay.config.ip_bandwidth.max(relay.config.bandwidth),
        // A whole message at once, as a node's byte budget allows, with its parts' headers.
        ip_burst: relay
            .config
            .ip_bandwidth
            .max((relay.config.limits.max_message + relay.config.limits.max_frame) as u64),
        max_partial: relay.max_partial(),
        max_partial_per_ip: relay.max_partial_per_ip(),
    };
    let clock = {
        let relay = relay.clone();
        Arc::new(move || relay.now_ms())
    };
    let listener = Guarded::new(listener, guard, clock, relay.metrics.clone());
    let server = axum::serve(listener, app.into_make_service_with_connect_info::<Peer>())
        .with_graceful_shutdown(async move {
            let _ = http_stopped.wait_for(|s| *s).await;
        });
    let server = tokio::spawn(async move { server.await });
    shutdown.await;
    tracing::info!("shutting down: closing connections with 1001");
    let _ = stop.send(true);
    // Connections see the signal, close with 1001 and leave their rooms; rooms finish their
    // pending writes and retire.
    let deadline = Instant::now() + Duration::from_secs(10);
    while (relay.metrics.connections.load(Relaxed) > 0 || relay.metrics.rooms.load(Relaxed) > 0)
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = server.await;
    expiry.abort();
    store.close().await?;
    tracing::info!("relay stopped");
    Ok(())
}

fn router(relay: Arc<Relay>) -> Router {
    Router::new()
        .route("/ws", get(websocket))
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics_text))
        .nest_service("/pkg", static_files(&relay.config.pkg_dir))
        .fallback_service(static_files(&relay.config.www_dir))
        .with_state(relay)
}

/// The files of `dir`: compressed (brotli or gzip) when the browser accepts it, from the
/// `.br` or `.gz` copy beside a file where there is one (`.ci/precompress.mjs` writes them at
/// the highest levels), else on the fly; with an `ETag` and `Cache-Control: no-cache`, so that a
/// browser asks again each time and gets `304 Not Modified` while a file has not changed (the
/// package's file names carry no hash).
fn static_files(dir: &std::path::Path) -> Router {
    Router::new()
        .fallback_service(ServeDir::new(dir).precompressed_br().precompressed_gzip())
        .layer(axum::middleware::from_fn(entity_tag))
        .layer(tower_http::compression::CompressionLayer::new())
}

/// Adds a weak `ETag` to a file's response (its length and modification time, as the file
/// server reports them: a precompressed copy has its own), `Vary: Accept-Encoding`, and answers
/// `304` when the request's `If-None-Match` names the tag.
async fn entity_tag(
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let asked = request.headers().get(header::IF_NONE_MATCH).cloned();
    if asked.is_some() {
        // With If-None-Match, If-Modified-Since is ignored (RFC 9110, 13.1.3): the tag decides.
        request.headers_mut().remove(header::IF_MODIFIED_SINCE);
    }
    let mut response = next.run(request).await;
    let cache = header::HeaderValue::from_static("no-cache");
    // The same path gives another body (a precompressed copy) to another Accept-Encoding; a
    // 304 says so too.
    let vary = |headers: &mut HeaderMap| {
        if !headers.contains_key(header::VARY) {
            headers.insert(
                header::VARY,
                header::HeaderValue::from_static("accept-encoding"),
            );
        }
    };
    if response.status() == StatusCode::NOT_MODIFIED {
        // The file server's own answer to If-Modified-Since.
        response.headers_mut().insert(header::CACHE_CONTROL, cache);
        vary(response.headers_mut());
        return response;
    }
    if response.status() != StatusCode::OK {
        return response;
    }
    let headers = response.headers();
    let (Some(length), Some(modified)) = (
        headers.get(header::CONTENT_LENGTH),
        headers.get(header::LAST_MODIFIED),
    ) else {
        return response;
    };
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in modified.as_bytes() {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
    }
    let tag = format!("W/\"{}-{hash:016x}\"", length.to_str().unwrap_or("0"));
    let Ok(tag) = header::HeaderValue::from_str(&tag) else {
        return response;
    };
    let matches = asked.is_some_and(|asked| {
        asked.as_bytes() == b"*"
            || asked
                .to_str()
                .is_ok_and(|list| list.split(',').any(|t| t.trim() == tag))
    });
    let mut response = if matches {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        response
    };
    let headers = response.headers_mut();
    headers.insert(header::ETAG, tag);
    headers.insert(header::CACHE_CONTROL, cache);
    vary(headers);
    response
}

async fn websocket(
    State(relay): State<Arc<Relay>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    uri: Uri,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> axum::response::Response {
    // A page of another site must not open a socket with this user's network position
    // (cross-site WebSocket hijacking): browsers always send `Origin`.
    if !relay.config.allowed_origins.is_empty() {
        let origin = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok());
        if !origin.is_some_and(|o| relay.config.allowed_origins.iter().any(|a| a == o)) {
            let what = origin.map_or("no Origin header".to_owned(), |o| format!("the origin {o}"));
            return (
                StatusCode::FORBIDDEN,
                format!("{what} is not allowed to open a WebSocket on this relay\n"),
            )
                .into_response();
        }
    }
    // The token is checked here, once; a refusal is said on the socket, right after the
    // upgrade, with a close code and a reason (a browser sees nothing of a refused upgrade);
    // whether it opens the room is known at the join.
    let grant = relay
        .auth
        .as_ref()
        .map(|auth| auth.check(auth::token_of(uri.query())));
    // A frame over the limit but within a margin is read and refused with a reject frame;
    // clients send what is larger in parts.
    let max = relay.config.limits.max_frame.saturating_mul(2);
    upgrade
        // The WebSocket layer zero-fills `read_buffer_size` bytes before every read: at the
        // default 128 KiB that was a fifth of the relay's CPU under load, and the buffer is
        // also most of an idle connection's memory. Frames are small; larger ones take several
        // reads.
        .read_buffer_size(1024)
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| connection::run(socket, relay, peer, grant))
        .into_response()
}

async fn metrics_text(
    State(relay): State<Arc<Relay>>,
    headers: HeaderMap,
) -> axum::response::Response {
    if let Some(token) = &relay.config.metrics_token {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|given| same_secret(given.as_bytes(), token.as_bytes())) {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                "the metrics need the bearer token\n",
            )
                .into_response();
        }
    }
    (
        [("content-type", "text/plain; version=0.0.4")],
        relay.metrics.render(),
    )
        .into_response()
}

/// Compares two secrets in a time that does not depend on where they differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
