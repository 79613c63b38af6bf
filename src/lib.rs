//! pattern-mesh: browser tabs share a document or a game session through a relay. Every message
//! carries the room's global step and the deterministic pattern value of that step, and every
//! receiver validates it before applying it.
//!
//! The core (`pattern`, `envelope`, `validate`, `clock`, `doc`) knows nothing of JavaScript, sockets or
//! time: the caller brings those in, so the same logic runs and is tested natively and in the
//! browser. The JS API lives in the `wasm` module, compiled for `wasm32` only.
#![warn(missing_docs)]

pub mod clock;
pub mod doc;
pub mod envelope;
pub mod pattern;
pub mod validate;

/// The relay (native only): rooms, validation, durable logs, the demo's web server.
#[cfg(not(target_arch = "wasm32"))]
pub mod relay;

/// The JavaScript API (`wasm32` only): classes and functions exported with `wasm-bindgen`.
#[cfg(target_arch = "wasm32")]
pub mod wasm;
