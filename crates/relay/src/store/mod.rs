//! Where the relay keeps its room logs: the core's [`Store`] trait, with the embedded SQLite
//! store ([`sqlite::SqliteStore`], the default) or the in-memory one. Only this module names
//! either; the rest of the relay sees a `dyn Store`.

pub mod sqlite;

use std::path::PathBuf;
use std::sync::Arc;

use pattern_mesh_core::store::{MemoryStore, Store, StoreError};

use crate::metrics::Metrics;

/// Which store the relay keeps its room logs in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// The embedded SQLite store in this directory (created if missing; survives restarts).
    Sqlite(PathBuf),
    /// In memory: gone when the relay stops (for tests and demos).
    Memory,
}

/// Opens the store `config` names.
pub fn open(config: &StoreConfig, metrics: Arc<Metrics>) -> Result<Arc<dyn Store>, StoreError> {
    Ok(match config {
        StoreConfig::Sqlite(dir) => Arc::new(sqlite::SqliteStore::open(dir, metrics)?),
        StoreConfig::Memory => Arc::new(MemoryStore::new()),
    })
}
