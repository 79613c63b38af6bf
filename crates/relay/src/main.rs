//! `pattern-mesh-relay`: the WebSocket relay and the demo's web server.

mod native {
    use std::net::SocketAddr;
    use std::path::PathBuf;
    use std::time::Duration;

    use clap::Parser;
    use pattern_mesh_core::pattern::{PatternConfig, PatternParams};
    use pattern_mesh_core::wire::{Limits, RoomConfig};
    use pattern_mesh_relay::{serve, RelayConfig, StoreConfig};

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
        #[arg(long, env = "PM_MEMORY")]
        memory: bool,
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
        /// Messages one connection may send per second.
        #[arg(long, env = "PM_MAX_RATE", default_value_t = 200)]
        max_rate: u32,
        /// Frames queued for one connection before it is disconnected as too slow.
        #[arg(long, env = "PM_SEND_QUEUE", default_value_t = 4_096,
              value_parser = clap::value_parser!(u32).range(1..))]
        send_queue: u32,
        /// Seconds a new connection has to send its join frame.
        #[arg(long, env = "PM_JOIN_TIMEOUT", default_value_t = 10)]
        join_timeout: u64,
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
            store: if args.memory {
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
            max_rate: args.max_rate,
            send_queue: args.send_queue as usize,
            join_timeout: Duration::from_secs(args.join_timeout),
            room: RoomConfig {
                pattern,
                max_future: args.max_future,
                stale_window: None,
            },
        };
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
