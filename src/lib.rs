//! pattern-mesh: browser tabs share a document or a game session through a relay. Every message
//! carries the room's global step and the deterministic pattern value of that step, and every
//! receiver validates it before applying it.
//!
//! This crate is the npm package's: on `wasm32` it is the JavaScript API ([`wasm`]), a thin
//! driver of the core's client session. Everywhere it re-exports the core
//! ([`pattern_mesh_core`]), which knows nothing of JavaScript, sockets or time.
#![warn(missing_docs)]

pub use pattern_mesh_core::*;

/// The JavaScript API (`wasm32` only): classes and functions exported with `wasm-bindgen`.
#[cfg(target_arch = "wasm32")]
pub mod wasm;
