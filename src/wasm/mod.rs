//! The JavaScript API, compiled for `wasm32` only.
//!
//! Thin classes over the core, named for JS (`PatternGenerator`, `StepClock`, `Validator`) plus
//! `encode` and `decode` of frames as plain objects. Every error reaches JS as a thrown `Error`
//! whose `name` says which kind of problem it is and whose message says what was wrong.
//! `types.rs` declares the TypeScript types of every object that crosses the boundary.

mod client;
#[cfg(feature = "tools")]
mod clock;
#[cfg(feature = "tools")]
mod codec;
#[cfg(feature = "document")]
mod document;
mod errors;
mod fatal;
mod frames;
mod pattern;
mod replica;
#[cfg(feature = "document")]
mod storage;
mod types;
mod validator;

pub use client::MeshClient;
#[cfg(feature = "document")]
pub use client::SharedText;
#[cfg(feature = "tools")]
pub use clock::StepClock;
#[cfg(feature = "tools")]
pub use codec::{decode, encode};
#[cfg(feature = "document")]
pub use document::SharedDocument;
pub use pattern::{collapse_digits, PatternGenerator};
#[cfg(feature = "tools")]
pub use validator::Validator;
