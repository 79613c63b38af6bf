//! `encode` and `decode`: frames as plain JS objects and as the bytes of a WebSocket message.

use wasm_bindgen::prelude::*;

use super::errors::{from_js, js_error, to_f64, to_js};
use super::types::{JsFrame, JsReceived};
use crate::envelope::{Frame, Limits, Positioned};

/// Encodes a frame (a plain object such as
/// `{ kind: "data", sender: 1, step: 1, pattern: 4, data: { temperature: 23.5 } }`)
/// into the bytes of one binary WebSocket message. Throws `InvalidArgument` if the object is
/// not a frame, naming the field that is wrong.
#[wasm_bindgen]
pub fn encode(frame: JsFrame) -> Result<Vec<u8>, JsValue> {
    let frame: Frame = from_js("the frame", frame.into())?;
    Ok(frame.encode())
}

/// Decodes the bytes of one binary WebSocket message into a frame object, with `position` set
/// when the relay put a room log position in the header. Throws a `DecodeError` that says what
/// is wrong (unknown version or kind, a truncated field, a frame over the 1 MiB limit, invalid
/// JSON, ...). Never accepts a frame it cannot fully read.
#[wasm_bindgen]
pub fn decode(bytes: &[u8]) -> Result<JsReceived, JsValue> {
    let Positioned { position, frame } = Frame::decode_positioned(bytes, &Limits::default())
        .map_err(|e| js_error("DecodeError", e))?;
    let object = to_js(&frame)?;
    if let Some(position) = position {
        let position = to_f64("the position", position)?;
        js_sys::Reflect::set(&object, &"position".into(), &position.into())?;
    }
    Ok(object.unchecked_into())
}
