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
            "{what} must be an integer from 0 to 2^53 - 1, got {}",
            number_text(value)
        )))
    }
}

/// A number as JS writes it (`1.5`, `NaN`, `Infinity`). JS formats it: Rust's float formatting
/// would add about 15 KB to the wasm for error messages alone.
pub(crate) fn number_text(n: f64) -> String {
    js_sys::Number::from(n)
        .to_string_with_radix(10)
        .map(String::from)
        .unwrap_or_else(|_| "a number".into())
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

/// A field of an options object: `None` when it is missing or `undefined`; an
/// `InvalidArgument` naming the key when reading it throws (a getter, a proxy).
pub(crate) fn field(object: &JsValue, key: &str) -> Result<Option<JsValue>, JsValue> {
    let value = js_sys::Reflect::get(object, &key.into())
        .map_err(|e| invalid_argument(format!("reading `{key}` threw: {}", describe(&e))))?;
    Ok((!value.is_undefined()).then_some(value))
}

/// An integer from 0 to 2^53 - 1, refused (with what it was) when it is anything else.
pub(crate) fn u64_arg(what: &str, value: &JsValue) -> Result<u64, JsValue> {
    match value.as_f64() {
        Some(n) => to_u64(what, n),
        None => Err(invalid_argument(format!(
            "{what} must be an integer from 0 to 2^53 - 1, got {}",
            what_it_is(value)
        ))),
    }
}

/// The message of a thrown JS value.
pub(crate) fn describe(error: &JsValue) -> String {
    error
        .dyn_ref::<js_sys::Error>()
        .map(|e| String::from(e.message()))
        .or_else(|| error.as_string())
        .unwrap_or_else(|| "unknown error".into())
}

/// `s` in double quotes, escaped as JSON writes it: how error messages show a string they name.
/// (Rust's `{:?}` would do the same, but brings in the standard library's `Debug` escaping.)
pub(crate) fn quoted(s: &str) -> String {
    js_sys::JSON::stringify(&JsValue::from_str(s))
        .ok()
        .and_then(|json| json.as_string())
        .unwrap_or_default()
}

/// How an argument of the wrong type is described: its type, and its value where short.
pub(crate) fn what_it_is(value: &JsValue) -> String {
    if value.is_null() {
        "null".into()
    } else if value.is_undefined() {
        "undefined".into()
    } else if let Some(n) = value.as_f64() {
        format!("the number {}", number_text(n))
    } else if let Some(s) = value.as_string() {
        let shown: String = s.chars().take(40).collect();
        format!("the string {}", quoted(&shown))
    } else if let Some(b) = value.as_bool() {
        format!("{b}")
    } else if value.is_bigint() {
        "a bigint".into()
    } else if value.is_symbol() {
        "a symbol".into()
    } else if value.is_function() {
        "a function".into()
    } else if js_sys::Array::is_array(value) {
        "an array".into()
    } else {
        "an object".into()
    }
}

/// A string argument, refused (with what it was) when it is not a string.
pub(crate) fn string_arg(what: &str, value: &JsValue) -> Result<String, JsValue> {
    value.as_string().ok_or_else(|| {
        invalid_argument(format!(
            "{what} must be a string, got {}",
            what_it_is(value)
        ))
    })
}

/// An index or a length: an integer from 0 to 2^32 - 1 (texts are measured in UTF-16 code
/// units, and yrs counts them in 32 bits).
pub(crate) fn u32_arg(what: &str, value: &JsValue) -> Result<u32, JsValue> {
    match value.as_f64() {
        Some(n) if n.fract() == 0.0 && (0.0..=f64::from(u32::MAX)).contains(&n) => Ok(n as u32),
        _ => Err(invalid_argument(format!(
            "{what} must be an integer from 0 to {}, got {}",
            u32::MAX,
            what_it_is(value)
        ))),
    }
}

/// Bytes: a `Uint8Array`.
pub(crate) fn bytes_arg(what: &str, value: &JsValue) -> Result<Vec<u8>, JsValue> {
    value
        .dyn_ref::<js_sys::Uint8Array>()
        .map(js_sys::Uint8Array::to_vec)
        .ok_or_else(|| {
            invalid_argument(format!(
                "{what} must be a Uint8Array, got {}",
                what_it_is(value)
            ))
        })
}

/// Refuses what is not a plain object (`null`, a number, an array, a function), saying that it
/// must be an object with `fields`.
pub(crate) fn object_arg(what: &str, value: &JsValue, fields: &str) -> Result<(), JsValue> {
    if !value.is_object() || value.is_function() || js_sys::Array::is_array(value) {
        return Err(invalid_argument(format!(
            "{what} must be an object with {fields}, got {}",
            what_it_is(value)
        )));
    }
    Ok(())
}

/// A function argument.
pub(crate) fn function_arg(what: &str, value: &JsValue) -> Result<js_sys::Function, JsValue> {
    value.dyn_ref::<js_sys::Function>().cloned().ok_or_else(|| {
        invalid_argument(format!(
            "{what} must be a function, got {}",
            what_it_is(value)
        ))
    })
}

/// An options object: a plain object whose keys are all among `accepted`.
pub(crate) fn options_arg(what: &str, value: &JsValue, accepted: &[&str]) -> Result<(), JsValue> {
    let list = accepted.join(", ");
    object_arg(what, value, &list)?;
    for key in js_sys::Object::keys(value.unchecked_ref::<js_sys::Object>()).iter() {
        let key = key.as_string().unwrap_or_default();
        if !accepted.contains(&key.as_str()) {
            return Err(invalid_argument(format!(
                "{what} has an unknown key {}; the accepted keys are {list}",
                quoted(&key)
            )));
        }
    }
    Ok(())
}
