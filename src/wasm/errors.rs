//! Errors and number conversions at the JS boundary.

use std::fmt::Display;

use wasm_bindgen::{JsCast, JsValue};

use crate::pattern::MAX_SAFE_INTEGER;

/// A JS `Error` with `name` set to `name` and the message `message`.
pub(crate) fn js_error(name: &str, message: impl Display) -> JsValue {
    let error = js_sys::Error::new(&message.to_string());
    error.set_name(name);
    error.into()
}

/// A `TypeError`-like error for an argument of the wrong shape.
pub(crate) fn invalid_argument(message: impl Display) -> JsValue {
    js_error("InvalidArgument", message)
}

/// Converts a JS number to a `u64`, refusing what is not a non-negative safe integer.
pub(crate) fn to_u64(what: &str, value: f64) -> Result<u64, JsValue> {
    if value.is_finite() && value >= 0.0 && value.fract() == 0.0 && value <= MAX_SAFE_INTEGER as f64
    {
        Ok(value as u64)
    } else {
        Err(invalid_argument(format!(
            "{what} must be an integer from 0 to 2^53 - 1, got {value}"
        )))
    }
}

/// Converts a `u64` to a JS number, refusing what a number cannot hold exactly.
pub(crate) fn to_f64(what: &str, value: u64) -> Result<f64, JsValue> {
    if value <= MAX_SAFE_INTEGER {
        Ok(value as f64)
    } else {
        Err(js_error(
            "RangeError",
            format!("{what} is {value}, more than a JS number holds exactly (2^53 - 1)"),
        ))
    }
}

/// Serialises a value for JS: maps become plain objects, `None` becomes `null`.
pub(crate) fn to_js<T: serde::Serialize + ?Sized>(value: &T) -> Result<JsValue, JsValue> {
    let serializer = serde_wasm_bindgen::Serializer::new()
        .serialize_maps_as_objects(true)
        .serialize_missing_as_null(true);
    value
        .serialize(&serializer)
        .map_err(|e| js_error("RangeError", e))
}

/// Deserialises a JS value, naming `what` in the error.
pub(crate) fn from_js<T: serde::de::DeserializeOwned>(
    what: &str,
    value: JsValue,
) -> Result<T, JsValue> {
    serde_wasm_bindgen::from_value(value)
        .map_err(|e| invalid_argument(format!("{what} is not valid: {e}")))
}

/// The message of a thrown JS value.
pub(crate) fn describe(error: &JsValue) -> String {
    error
        .dyn_ref::<js_sys::Error>()
        .map(|e| String::from(e.message()))
        .or_else(|| error.as_string())
        .unwrap_or_else(|| "unknown error".into())
}
