//! The core of pattern-mesh, with no runtime: the pattern, the step clock, the wire format, the
//! validator, the shared document, and the protocol itself as two sans-IO state machines, the
//! client [`session`] and the relay's [`room`], with the [`store`] the room log lives in.
//!
//! Nothing here reads a clock, draws a random number, opens a socket or touches a disk: time,
//! randomness, transport and storage come in from the drivers (the relay on tokio, the native
//! client on tokio-tungstenite, the browser client on wasm-bindgen), so the same logic runs, and
//! is tested by one deterministic simulation, everywhere.
#![warn(missing_docs)]

pub mod clock;
pub mod doc;
pub mod pace;
pub mod pattern;
#[cfg(feature = "yrs")]
pub mod room;
pub mod saved;
pub mod session;
#[cfg(feature = "yrs")]
pub mod store;
pub mod token;
pub mod validate;
pub mod vec_map;
pub mod wire;
