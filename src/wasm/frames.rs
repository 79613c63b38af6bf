//! Frames' JS side: the direct property access the codec and the client's events share, the
//! `message` and `presence` events, JSON values across the boundary, and [`Object`], which
//! writes every other event and value the client returns key by key. The codec itself
//! (`encode`, `decode`) is in `codec`.
//!
//! The frames that carry traffic (`data`, `update`, `presence`) cross the boundary field by
//! field, with JSON values through the engine's own `JSON.stringify` and `JSON.parse`: a
//! generic serde walk over a JS object costs several microseconds a frame. The codec reads the
//! other kinds field by field too, and writes them through serde (one flat struct of every
//! field); both ways accept and produce the same objects.

use wasm_bindgen::prelude::*;

use super::errors::{describe, invalid_argument, js_error, to_f64};
use crate::wire::{Json, Peer, Stamp};

#[wasm_bindgen]
extern "C" {
    /// Any JS object, read and written through direct property accesses.
    pub(super) type Fields;
    #[wasm_bindgen(method, getter, catch)]
    pub(super) fn kind(this: &Fields) -> Result<JsValue, JsValue>;
    #[wasm_bindgen(method, getter, catch)]
    pub(super) fn sender(this: &Fields) -> Result<JsValue, JsValue>;
    #[wasm_bindgen(method, getter, catch)]
    pub(super) fn step(this: &Fields) -> Result<JsValue, JsValue>;
    #[wasm_bindgen(method, getter, catch)]
    pub(super) fn pattern(this: &Fields) -> Result<JsValue, JsValue>;
    #[wasm_bindgen(method, getter, catch)]
    pub(super) fn data(this: &Fields) -> Result<JsValue, JsValue>;
    #[wasm_bindgen(method, getter, catch)]
    pub(super) fn doc(this: &Fields) -> Result<JsValue, JsValue>;
    #[wasm_bindgen(method, getter, catch)]
    pub(super) fn update(this: &Fields) -> Result<JsValue, JsValue>;
    #[wasm_bindgen(method, setter)]
    pub(super) fn set_kind(this: &Fields, value: &str);
    #[wasm_bindgen(method, setter)]
    pub(super) fn set_sender(this: &Fields, value: f64);
    #[wasm_bindgen(method, setter)]
    pub(super) fn set_step(this: &Fields, value: f64);
    #[wasm_bindgen(method, setter)]
    pub(super) fn set_pattern(this: &Fields, value: f64);
    #[wasm_bindgen(method, setter)]
    pub(super) fn set_data(this: &Fields, value: &JsValue);
    #[wasm_bindgen(method, setter)]
    pub(super) fn set_doc(this: &Fields, value: &str);
    #[wasm_bindgen(method, setter)]
    pub(super) fn set_update(this: &Fields, value: &js_sys::Uint8Array);
    #[wasm_bindgen(method, setter)]
    pub(super) fn set_position(this: &Fields, value: f64);
}
/// The `message` event: `{ sender, step, pattern, data }`.
pub(crate) fn message_to_js(stamp: &Stamp, data: &Json, durable: bool) -> Result<JsValue, JsValue> {
    let object = stamped_to_js(None, stamp)?;
    object.set_data(&json_to_js(data)?);
    js_sys::Reflect::set(&object, &"durable".into(), &durable.into())?;
    Ok(object.into())
}

/// The `presence` event: `{ sender, data }`.
pub(crate) fn presence_event_to_js(sender: u64, data: &Json) -> Result<JsValue, JsValue> {
    Ok(presence_to_js(None, sender, data)?.into())
}

/// A new object, with `kind` first if there is one.
pub(super) fn object(kind: Option<&str>) -> Fields {
    let object: Fields = js_sys::Object::new().unchecked_into();
    if let Some(kind) = kind {
        object.set_kind(kind);
    }
    object
}

/// `{ kind?, sender, step, pattern }`.
pub(super) fn stamped_to_js(kind: Option<&str>, stamp: &Stamp) -> Result<Fields, JsValue> {
    let object = object(kind);
    object.set_sender(to_f64("the sender", stamp.sender)?);
    object.set_step(to_f64("the step", stamp.step)?);
    object.set_pattern(to_f64("the pattern value", stamp.pattern)?);
    Ok(object)
}

/// `{ kind?, sender, data }`.
pub(super) fn presence_to_js(
    kind: Option<&str>,
    sender: u64,
    data: &Json,
) -> Result<Fields, JsValue> {
    let object = object(kind);
    object.set_sender(to_f64("the sender", sender)?);
    object.set_data(&json_to_js(data)?);
    Ok(object)
}

/// Any JSON value from JS, through `JSON.stringify`; `InvalidArgument` for what has no JSON
/// form (`undefined`, a function, a BigInt, a cycle).
pub(crate) fn json_from_js(what: &str, value: &JsValue) -> Result<Json, JsValue> {
    let text = js_sys::JSON::stringify(value)
        .map_err(|e| invalid_argument(format!("{what} is not valid JSON: {}", describe(&e))))?;
    let text = text
        .as_string()
        .ok_or_else(|| invalid_argument(format!("{what} has no JSON form (undefined?)")))?;
    Json::parse(text).map_err(|e| invalid_argument(format!("{what} is not valid JSON: {e}")))
}

/// A JSON value for JS, through `JSON.parse`.
pub(crate) fn json_to_js(json: &Json) -> Result<JsValue, JsValue> {
    js_sys::JSON::parse(json.as_str())
        .map_err(|e| js_error("DecodeError", format!("invalid JSON: {}", describe(&e))))
}

/// A plain object for JS written key by key, in the order the keys are set: the client's
/// events and the values its getters return.
pub(crate) struct Object(js_sys::Object);

impl Object {
    /// An empty object.
    pub(crate) fn new() -> Self {
        Self(js_sys::Object::new())
    }

    /// Sets `key` to `value`.
    pub(crate) fn set(self, key: &str, value: &JsValue) -> Result<Self, JsValue> {
        js_sys::Reflect::set(&self.0, &key.into(), value)?;
        Ok(self)
    }

    /// Sets `key` to a string.
    pub(crate) fn string(self, key: &str, value: &str) -> Result<Self, JsValue> {
        self.set(key, &value.into())
    }

    /// Sets `key` to an integer; a `RangeError` above 2^53 - 1, which a JS number does not hold
    /// exactly.
    pub(crate) fn int(self, key: &str, value: u64) -> Result<Self, JsValue> {
        self.set(key, &to_f64(key, value)?.into())
    }

    /// Sets `key` to an integer when there is one; leaves it out when there is not.
    pub(crate) fn int_if(self, key: &str, value: Option<u64>) -> Result<Self, JsValue> {
        match value {
            Some(value) => self.int(key, value),
            None => Ok(self),
        }
    }
}

impl From<Object> for JsValue {
    fn from(object: Object) -> Self {
        object.0.into()
    }
}

/// `{ node, name }`.
pub(crate) fn peer_to_js(peer: &Peer) -> Result<JsValue, JsValue> {
    Ok(Object::new()
        .int("node", peer.node)?
        .string("name", &peer.name)?
        .into())
}

/// `[{ node, name }]`.
pub(crate) fn peers_to_js(peers: &[Peer]) -> Result<JsValue, JsValue> {
    let list = js_sys::Array::new();
    for peer in peers {
        list.push(&peer_to_js(peer)?);
    }
    Ok(list.into())
}
