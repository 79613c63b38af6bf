//! The relay's counters, rendered as Prometheus text at `/metrics`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use pattern_mesh_core::wire::Reason;

/// Upper bounds (seconds) of the store commit latency histogram.
const BUCKETS: [f64; 10] = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0];

/// Process-wide counters. Every field is an atomic: updating one never takes a lock.
#[derive(Default)]
pub struct Metrics {
    /// Open WebSocket connections.
    pub connections: AtomicU64,
    /// Rooms with an actor running.
    pub rooms: AtomicU64,
    /// Rooms opened (loaded from the store) since the relay started.
    pub rooms_opened: AtomicU64,
    /// Stamped frames accepted by validation.
    pub accepted: AtomicU64,
    rejected: [AtomicU64; Reason::ALL.len()],
    /// Bytes received in WebSocket messages.
    pub bytes_in: AtomicU64,
    /// Bytes sent in WebSocket messages.
    pub bytes_out: AtomicU64,
    /// Connections closed because their send queue was full.
    pub slow_consumers: AtomicU64,
    /// Bytes held for large messages whose parts are still arriving.
    pub partial_bytes: AtomicU64,
    /// Bytes of WebSocket frames still arriving on members' connections.
    pub unframed_bytes: AtomicU64,
    /// Reads of a room's bus in Redis that came too late: entries went before this relay read
    /// them (numbers were missing).
    pub bus_missed: AtomicU64,
    /// Rooms that panicked (on a frame, or anywhere in their task) and were loaded again.
    pub room_panics: AtomicU64,
    /// Connections refused for their access token (missing, expired, forged, another room's).
    pub refused_tokens: AtomicU64,
    /// Members kept out of a room for stopping it twice ([`crate::RelayConfig::offence_bar`]).
    pub offenders_barred: AtomicU64,
    /// Joins refused because their user or address is kept out of the room.
    pub barred_joins: AtomicU64,
    commit_buckets: [AtomicU64; BUCKETS.len()],
    commit_count: AtomicU64,
    commit_micros: AtomicU64,
    committed_writes: AtomicU64,
}

impl Metrics {
    /// Counts a rejected frame.
    pub fn reject(&self, reason: Reason) {
        self.reject_n(reason, 1);
    }

    /// Counts `n` rejected frames.
    pub fn reject_n(&self, reason: Reason, n: u64) {
        self.rejected[usize::from(reason.code() - 1)].fetch_add(n, Relaxed);
    }

    /// Frames rejected for `reason` so far.
    pub fn rejected(&self, reason: Reason) -> u64 {
        self.rejected[usize::from(reason.code() - 1)].load(Relaxed)
    }

    /// Records one store commit of `writes` writes that took `took`.
    pub fn store_commit(&self, took: Duration, writes: usize) {
        let seconds = took.as_secs_f64();
        for (bucket, bound) in self.commit_buckets.iter().zip(BUCKETS) {
            if seconds <= bound {
                bucket.fetch_add(1, Relaxed);
            }
        }
        self.commit_count.fetch_add(1, Relaxed);
        self.commit_micros
            .fetch_add(took.as_micros() as u64, Relaxed);
        self.committed_writes.fetch_add(writes as u64, Relaxed);
    }

    /// The Prometheus text exposition of every counter.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(2_048);
        let mut gauge = |name: &str, help: &str, kind: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        gauge(
            "pattern_mesh_connections",
            "Open WebSocket connections.",
            "gauge",
            self.connections.load(Relaxed),
        );
        gauge(
            "pattern_mesh_rooms",
            "Rooms with members or pending writes.",
            "gauge",
            self.rooms.load(Relaxed),
        );
        gauge(
            "pattern_mesh_refused_tokens_total",
            "Connections refused for their access token.",
            "counter",
            self.refused_tokens.load(Relaxed),
        );
        gauge(
            "pattern_mesh_rooms_opened_total",
            "Rooms loaded from the store since the relay started.",
            "counter",
            self.rooms_opened.load(Relaxed),
        );
        gauge(
            "pattern_mesh_frames_accepted_total",
            "Stamped frames accepted by validation.",
            "counter",
            self.accepted.load(Relaxed),
        );
        gauge(
            "pattern_mesh_bytes_in_total",
            "Bytes received in WebSocket messages.",
            "counter",
            self.bytes_in.load(Relaxed),
        );
        gauge(
            "pattern_mesh_bytes_out_total",
            "Bytes sent in WebSocket messages.",
            "counter",
            self.bytes_out.load(Relaxed),
        );
        gauge(
            "pattern_mesh_slow_consumers_total",
            "Connections closed because their send queue was full.",
            "counter",
            self.slow_consumers.load(Relaxed),
        );
        gauge(
            "pattern_mesh_bus_missed_total",
            "Reads of a room's bus in Redis that came after entries had gone from it (the other relays' members were read again).",
            "counter",
            self.bus_missed.load(Relaxed),
        );
        gauge(
            "pattern_mesh_partial_bytes",
            "Bytes held for large messages whose parts are still arriving.",
            "gauge",
            self.partial_bytes.load(Relaxed),
        );
        gauge(
            "pattern_mesh_unframed_bytes",
            "Bytes of WebSocket frames still arriving on members' connections.",
            "gauge",
            self.unframed_bytes.load(Relaxed),
        );
        gauge(
            "pattern_mesh_room_panics_total",
            "Rooms that panicked and were loaded again from the store.",
            "counter",
            self.room_panics.load(Relaxed),
        );
        gauge(
            "pattern_mesh_offenders_barred_total",
            "Members kept out of a room for stopping it twice within the offence bar.",
            "counter",
            self.offenders_barred.load(Relaxed),
        );
        gauge(
            "pattern_mesh_barred_joins_total",
            "Joins refused because their user or address is kept out of the room.",
            "counter",
            self.barred_joins.load(Relaxed),
        );
        gauge(
            "pattern_mesh_store_writes_total",
            "Writes committed to the store.",
            "counter",
            self.committed_writes.load(Relaxed),
        );
        let _ = writeln!(
            out,
            "# HELP pattern_mesh_frames_rejected_total Frames rejected, by reason."
        );
        let _ = writeln!(out, "# TYPE pattern_mesh_frames_rejected_total counter");
        for reason in Reason::ALL {
            let _ = writeln!(
                out,
                "pattern_mesh_frames_rejected_total{{reason=\"{reason}\"}} {}",
                self.rejected(reason)
            );
        }
        let _ = writeln!(
            out,
            "# HELP pattern_mesh_store_commit_seconds Time to commit one batch to the store."
        );
        let _ = writeln!(out, "# TYPE pattern_mesh_store_commit_seconds histogram");
        for (bucket, bound) in self.commit_buckets.iter().zip(BUCKETS) {
            let _ = writeln!(
                out,
                "pattern_mesh_store_commit_seconds_bucket{{le=\"{bound}\"}} {}",
                bucket.load(Relaxed)
            );
        }
        let count = self.commit_count.load(Relaxed);
        let _ = writeln!(
            out,
            "pattern_mesh_store_commit_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "pattern_mesh_store_commit_seconds_sum {}",
            self.commit_micros.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "pattern_mesh_store_commit_seconds_count {count}");
        out
    }
}
