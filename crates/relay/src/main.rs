//! `pattern-mesh-relay`: the WebSocket relay and the demo's web server.

mod native {
    use std::net::SocketAddr;
    use std::path::PathBuf;
    use std::time::Duration;

    use clap::Parser;
    use pattern_mesh_core::pattern::{PatternConfig, PatternParams};
    use pattern_mesh_core::wire::{Limits, RoomConfig};
    use pattern_mesh_relay::{serve, AuthKey, RelayConfig, StoreConfig};

    /// The pattern-mesh relay: rooms of browser tabs exchange pattern-validated messages through
    /// it. It validates every frame, stores accepted messages durably in SQLite, replays the room
    /// log to late joiners and reconnecting clients, and serves the demo.
    #[derive(Parser, Debug)]
    #[command(version)]
    struct Args {
        /// Address to listen on.
        #[arg(long, env = "PM_LISTEN", default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Directory of the SQLite store (created if missing; survives restarts).
        #[arg(long, env = "PM_DATA_DIR", default_value = "relay-data")]
        data_dir: PathBuf,
        /// Keep the room logs in memory instead (gone when the relay stops).
        #[arg(long, env = "PM_MEMORY", conflicts_with = "store")]
        memory: bool,
        /// Keep the room logs in Redis (`redis://HOST:PORT`), shared with every relay that
        /// names the same Redis: any of them serves any room. Run Redis with `appendonly yes`
        /// and `appendfsync always` so that an acknowledged message is on its disk.
        #[arg(long, env = "PM_STORE", hide_env_values = true)]
        store: Option<String>,
        /// Directory of the demo pages, served at `/`.
        #[arg(long, env = "PM_WWW", default_value = "www")]
        www: PathBuf,
        /// Directory of the npm package, served at `/pkg/`.
        #[arg(long, env = "PM_PKG", default_value = "pkg")]
        pkg: PathBuf,
        /// Largest frame in bytes; clients send larger messages in parts.
        #[arg(long, env = "PM_MAX_FRAME", default_value_t = 1 << 20,
              value_parser = clap::value_parser!(u64).range(1024..))]
        max_frame: u64,
        /// Largest message put back together from parts, in bytes (`tooLarge` above).
        #[arg(long, env = "PM_MAX_MESSAGE", default_value_t = 64 << 20,
              value_parser = clap::value_parser!(u64).range(1024..))]
        max_message: u64,
        /// The most rooms at once.
        #[arg(long, env = "PM_MAX_ROOMS", default_value_t = 10_000)]
        max_rooms: usize,
        /// The most members in one room.
        #[arg(long, env = "PM_MAX_MEMBERS", default_value_t = 256)]
        max_members: usize,
        /// The most members in one room whose access tokens name one user (`sub`): tokens that
        /// share a `sub` share this.
        #[arg(long, env = "PM_MAX_MEMBERS_PER_USER", default_value_t = 32,
              value_parser = clap::value_parser!(u64).range(1..))]
        max_members_per_user: u64,
        /// The most rooms the connections of one user (an access token's `sub`) are in at once
        /// on this relay: a token for every room under a prefix could otherwise hold every room
        /// the relay opens (`--max-rooms`).
        #[arg(long, env = "PM_MAX_ROOMS_PER_USER", default_value_t = 64,
              value_parser = clap::value_parser!(u64).range(1..))]
        max_rooms_per_user: u64,
        /// Messages one node may send per second (and at once).
        #[arg(long, env = "PM_MAX_RATE", default_value_t = 200)]
        max_rate: u32,
        /// Bytes of messages and presences one node may send per second (a whole message at
        /// once).
        #[arg(long, env = "PM_BANDWIDTH", default_value_t = 4 << 20,
              value_parser = clap::value_parser!(u64).range(1024..))]
        bandwidth: u64,
        /// A room compacts its document once the updates since its last snapshot hold this many
        /// bytes (and at least the snapshot's size)...
        #[arg(long, env = "PM_COMPACT_BYTES", default_value_t = 8 << 20)]
        compact_bytes: u64,
        /// ... or once there are this many of them.
        #[arg(long, env = "PM_COMPACT_UPDATES", default_value_t = 10_000,
              value_parser = clap::value_parser!(u64).range(1..))]
        compact_updates: u64,
        /// The most bytes one room's log may hold; messages past it are refused as `full`, and
        /// stored data past three quarters of it.
        #[arg(long, env = "PM_MAX_ROOM_BYTES", default_value_t = 1 << 30)]
        max_room_bytes: u64,
        /// Seconds after its last stored message that a node's record is deleted (the node
        /// then comes back under a new id).
        #[arg(long, env = "PM_NODE_TTL", default_value_t = 30 * 24 * 3_600,
              value_parser = clap::value_parser!(u64).range(1..))]
        node_ttl: u64,
        /// Milliseconds one update may take to apply to a room's document before it is
        /// refused as `tooLarge`.
        #[arg(long, env = "PM_APPLY_BUDGET", default_value_t = 2_000,
              value_parser = clap::value_parser!(u64).range(1..))]
        apply_budget: u64,
        /// Seconds within which a member whose updates stop a room twice (one that walks too
        /// far to apply, or makes applying it fail; each stop closes every member of the room)
        /// is then kept out of that room, for as long: its access token's user, or its address
        /// without tokens. 0: no one is kept out; at most a year.
        #[arg(long, env = "PM_OFFENCE_BAR", default_value_t = 600,
              value_parser = clap::value_parser!(u64).range(..=31_536_000))]
        offence_bar: u64,
        /// Seconds a room keeps a node that left without ever storing a message, so that a
        /// reconnect keeps its id (a node that stored one is kept for --node-ttl).
        #[arg(long, env = "PM_RESUME_GRACE", default_value_t = 60)]
        resume_grace: u64,
        /// Seconds a member may send nothing before its connection is taken for dead and closed
        /// (4005); clients send a heartbeat every 15 s (a hidden tab's timers may fire only once
        /// a minute), so keep this well above that. 0: never.
        #[arg(long, env = "PM_IDLE_TIMEOUT", default_value_t = 90)]
        idle_timeout: u64,
        /// Frames queued for one connection before it is disconnected as too slow.
        #[arg(long, env = "PM_SEND_QUEUE", default_value_t = 4_096,
              value_parser = clap::value_parser!(u32).range(1..))]
        send_queue: u32,
        /// Bytes queued for one connection before it is disconnected as too slow (a message
        /// whose start is queued is queued whole, whatever its size).
        #[arg(long, env = "PM_SEND_QUEUE_BYTES", default_value_t = 16 << 20,
              value_parser = clap::value_parser!(u64).range(1..))]
        send_queue_bytes: u64,
        /// Seconds a new connection has, from its TCP accept, to send its join frame (an HTTP
        /// request that is not a WebSocket must be over by then too).
        #[arg(long, env = "PM_JOIN_TIMEOUT", default_value_t = 10,
              value_parser = clap::value_parser!(u64).range(1..))]
        join_timeout: u64,
        /// The most connections open at once; more are closed as they are accepted.
        #[arg(long, env = "PM_MAX_CONNECTIONS", default_value_t = 10_000,
              value_parser = clap::value_parser!(u64).range(1..))]
        max_connections: u64,
        /// The most connections open at once from one IP address.
        #[arg(long, env = "PM_MAX_CONNECTIONS_PER_IP", default_value_t = 512,
              value_parser = clap::value_parser!(u64).range(1..))]
        max_connections_per_ip: u64,
        /// Bytes the relay holds, all connections together, for large messages whose parts are
        /// still arriving, and a quarter of it for one IP address; a part past either is
        /// refused as `rateLimited` with the rest of its message (the client sends it again
        /// later). WebSocket frames still arriving count too: a connection whose frame takes
        /// either over is closed with 1013.
        #[arg(long, env = "PM_MAX_PARTIAL_BYTES", default_value_t = 1 << 30,
              value_parser = clap::value_parser!(u64).range(1..))]
        max_partial_bytes: u64,
        /// Frames per second from one IP address, all its connections together (bursts of as
        /// many); over it: `rateLimited`.
        #[arg(long, env = "PM_IP_RATE", default_value_t = 2_000,
              value_parser = clap::value_parser!(u64).range(1..))]
        ip_rate: u64,
        /// Bytes per second from one IP address, all its connections and rooms together
        /// (bursts of a message; at least `--bandwidth`); over it: `rateLimited`.
        #[arg(long, env = "PM_IP_BANDWIDTH", default_value_t = 32 << 20,
              value_parser = clap::value_parser!(u64).range(1..))]
        ip_bandwidth: u64,
        /// Rooms one IP address may open per minute (bursts of as many): a join of a room that
        /// is not open costs one; over it, the join is closed with 1013.
        #[arg(long, env = "PM_IP_ROOM_OPENS", default_value_t = 600,
              value_parser = clap::value_parser!(u64).range(1..))]
        ip_room_opens: u64,
        /// With `--store redis://...`: the most bytes of frames one room keeps in Redis for the
        /// members on other relays (signals, presence, sync answers), its oldest going first;
        /// at least `--max-message`.
        #[arg(long, env = "PM_MAX_BUS_BYTES", default_value_t = 256 << 20,
              value_parser = clap::value_parser!(u64).range(1..))]
        max_bus_bytes: u64,
        /// Pattern seed of rooms created without settings.
        #[arg(long, env = "PM_SEED", default_value_t = 7)]
        seed: u64,
        /// Pattern multiplier of rooms created without settings.
        #[arg(long, env = "PM_MULTIPLIER", default_value_t = 7)]
        multiplier: u64,
        /// Phase length (reset interval) of rooms created without settings.
        #[arg(long, env = "PM_RESET_INTERVAL", default_value_t = 100)]
        reset_interval: u64,
        /// How far ahead of the room's step a message may be.
        #[arg(long, env = "PM_MAX_FUTURE", default_value_t = 1_000)]
        max_future: u64,
        /// Require an access token signed with this HMAC-SHA256 secret (at least 32 bytes) to
        /// join a room. Without a key the relay is open to anyone who reaches it.
        #[arg(
            long,
            env = "PM_AUTH_KEY",
            conflicts_with = "auth_public_key",
            hide_env_values = true
        )]
        auth_key: Option<String>,
        /// Require an access token signed with the private key of this Ed25519 public key (a
        /// PEM file), so that the relay never holds a signing key.
        #[arg(long, env = "PM_AUTH_PUBLIC_KEY")]
        auth_public_key: Option<PathBuf>,
        /// With a key: take only tokens whose `aud` names this (the relay's name for itself,
        /// where one key signs tokens for several services). Without it, a token that has an
        /// `aud` is refused.
        #[arg(long, env = "PM_AUTH_AUDIENCE")]
        auth_audience: Option<String>,
        /// With a key: take only tokens whose `iss` is this.
        #[arg(long, env = "PM_AUTH_ISSUER")]
        auth_issuer: Option<String>,
        /// Accept WebSocket upgrades only from pages of this origin (`https://app.example`);
        /// repeat for more. Without one, any origin.
        #[arg(
            long = "allowed-origin",
            env = "PM_ALLOWED_ORIGINS",
            value_delimiter = ','
        )]
        allowed_origins: Vec<String>,
        /// Serve `/metrics` only with `Authorization: Bearer <this>`.
        #[arg(long, env = "PM_METRICS_TOKEN", hide_env_values = true)]
        metrics_token: Option<String>,
    }

    pub fn main() -> anyhow::Result<()> {
        tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "info".into()),
            )
            .init();
        let args = Args::parse();
        let pattern = PatternParams {
            seed: args.seed,
            multiplier: args.multiplier,
            reset_interval: args.reset_interval,
        };
        PatternConfig::new(pattern)?;
        let config = RelayConfig {
            store: if let Some(store) = &args.store {
                StoreConfig::parse(store)
            } else if args.memory {
                StoreConfig::Memory
            } else {
                StoreConfig::Sqlite(args.data_dir.clone())
            },
            www_dir: args.www,
            pkg_dir: args.pkg,
            limits: Limits {
                max_frame: args.max_frame as usize,
                max_message: args.max_message.max(args.max_frame) as usize,
                ..Limits::default()
            },
            max_rooms: args.max_rooms,
            max_members: args.max_members,
            max_members_per_user: args.max_members_per_user as usize,
            max_rooms_per_user: args.max_rooms_per_user as usize,
            max_rate: args.max_rate,
            bandwidth: args.bandwidth,
            compact_bytes: args.compact_bytes,
            compact_updates: args.compact_updates,
            max_room_bytes: args.max_room_bytes,
            node_ttl: Duration::from_secs(args.node_ttl),
            apply_budget: Duration::from_millis(args.apply_budget),
            offence_bar: Duration::from_secs(args.offence_bar),
            resume_grace: Duration::from_secs(args.resume_grace),
            idle_timeout: Duration::from_secs(args.idle_timeout),
            send_queue: args.send_queue as usize,
            send_queue_bytes: args.send_queue_bytes as usize,
            join_timeout: Duration::from_secs(args.join_timeout),
            max_connections: args.max_connections as usize,
            max_connections_per_ip: args.max_connections_per_ip as usize,
            max_partial_bytes: usize::try_from(args.max_partial_bytes).unwrap_or(usize::MAX),
            ip_rate: args.ip_rate,
            ip_bandwidth: args.ip_bandwidth,
            ip_room_opens: args.ip_room_opens,
            max_bus_bytes: args.max_bus_bytes,
            room: RoomConfig {
                pattern,
                max_future: args.max_future,
                stale_window: None,
            },
            auth: match (args.auth_key, args.auth_public_key) {
                (Some(secret), _) => Some(AuthKey::Secret(secret)),
                (None, Some(path)) => Some(AuthKey::Ed25519Pem(
                    std::fs::read_to_string(&path).map_err(|e| {
                        anyhow::anyhow!("cannot read the auth public key {}: {e}", path.display())
                    })?,
                )),
                (None, None) => None,
            },
            auth_audience: args.auth_audience,
            auth_issuer: args.auth_issuer,
            allowed_origins: args.allowed_origins,
            metrics_token: args.metrics_token,
        };
        config.room.check()?;
        config.check()?;
        let runtime = tokio::runtime::Runtime::new()?;
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind(args.listen).await?;
            let address = listener.local_addr()?;
            tracing::info!(%address, store = ?config.store, "relay listening");
            println!("pattern-mesh relay on http://{address}/ (WebSocket: ws://{address}/ws)");
            serve(listener, config, shutdown_signal()).await
        })
    }

    async fn shutdown_signal() {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}

fn main() -> anyhow::Result<()> {
    native::main()
}
