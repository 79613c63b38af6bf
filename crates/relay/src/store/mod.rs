//! Where the relay keeps its room logs: the core's [`Store`] trait, with the embedded SQLite
//! store ([`sqlite::SqliteStore`], the default), the in-memory one, or Redis
//! ([`redis::RedisStore`]), which any number of relays share. Only this module names them; the
//! rest of the relay sees a `dyn Store`, and, for a shared store, the [`Feed`] that reads the
//! rooms' logs back.

pub mod redis;
pub mod sqlite;

use std::path::PathBuf;
use std::sync::Arc;

use pattern_mesh_core::store::{MemoryStore, Store, StoreError};

use crate::metrics::Metrics;

/// Which store the relay keeps its room logs in. Its `Debug` form (which the relay logs) hides a
/// Redis URL's password.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// The embedded SQLite store in this directory (created if missing; survives restarts).
    Sqlite(PathBuf),
    /// In memory: gone when the relay stops (for tests and demos).
    Memory,
    /// Redis at this URL (`redis://host:port`), shared with any other relay that uses it: any
    /// of them serves any room.
    Redis(String),
}

impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreConfig::Sqlite(dir) => f.debug_tuple("Sqlite").field(dir).finish(),
            StoreConfig::Memory => f.write_str("Memory"),
            StoreConfig::Redis(url) => f.debug_tuple("Redis").field(&redacted(url)).finish(),
        }
    }
}

/// `url` with the password of its user part, if it has one, as `***`.
fn redacted(url: &str) -> String {
    let Some(start) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let authority_end = url[start..].find('/').map_or(url.len(), |i| start + i);
    let Some(at) = url[start..authority_end].rfind('@').map(|i| start + i) else {
        return url.to_owned();
    };
    match url[start..at].find(':').map(|i| start + i) {
        Some(colon) => format!("{}:***{}", &url[..colon], &url[at..]),
        None => url.to_owned(),
    }
}

impl StoreConfig {
    /// The store a `--store` value names: a `redis://` URL, `memory`, or a directory for the
    /// SQLite store.
    pub fn parse(value: &str) -> Self {
        if value.starts_with("redis://") || value.starts_with("rediss://") {
            StoreConfig::Redis(value.to_owned())
        } else if value == "memory" {
            StoreConfig::Memory
        } else {
            StoreConfig::Sqlite(PathBuf::from(value))
        }
    }
}

pub use self::redis::Feed;

/// Opens the store `config` names; a store other relays share comes with the feed that follows
/// its rooms' logs, and keeps at most `bus_bytes` of each room's frames for the other relays.
pub async fn open(
    config: &StoreConfig,
    metrics: Arc<Metrics>,
    bus_bytes: u64,
) -> Result<(Arc<dyn Store>, Option<Feed>), StoreError> {
    Ok(match config {
        StoreConfig::Sqlite(dir) => (Arc::new(sqlite::SqliteStore::open(dir, metrics)?), None),
        StoreConfig::Memory => {
            let mut seed = [0u8; 8];
            getrandom::fill(&mut seed).map_err(|e| StoreError::Backend(e.to_string()))?;
            let store = MemoryStore::with_log_seed(u64::from_le_bytes(seed));
            (Arc::new(store), None)
        }
        StoreConfig::Redis(url) => {
            let (store, feed) = self::redis::RedisStore::open(url, bus_bytes).await?;
            (Arc::new(store), Some(feed))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::StoreConfig;

    /// The relay logs its store when it starts: a Redis URL's password went into the log.
    #[test]
    fn a_redis_password_stays_out_of_what_the_relay_logs() {
        for (url, shown) in [
            (
                "redis://relay:s3cret@127.0.0.1:6379/0",
                "redis://relay:***@127.0.0.1:6379/0",
            ),
            (
                "rediss://:s3cret@cache.example:6380",
                "rediss://:***@cache.example:6380",
            ),
            ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379"),
            ("redis://relay@127.0.0.1", "redis://relay@127.0.0.1"),
        ] {
            let logged = format!("{:?}", StoreConfig::parse(url));
            assert!(!logged.contains("s3cret"), "{logged}");
            assert!(logged.contains(shown), "{logged}");
        }
    }
}
