//! `PatternGenerator` and `collapseDigits`.

use wasm_bindgen::prelude::*;

use super::errors::{field, invalid_argument, js_error, options_arg, to_f64, to_u64, u64_arg};
use super::frames::Object;
use super::types::{JsPatternParams, JsPatternParamsInit};
use crate::pattern::{PatternConfig, PatternParams};
use crate::wire::RoomConfig;

/// Reads optional pattern parameters (missing fields take the defaults 7, 7, 100) and validates
/// them.
pub(crate) fn pattern_from_js(
    params: Option<JsPatternParamsInit>,
) -> Result<PatternConfig, JsValue> {
    let params = match params {
        Some(p) if !p.is_undefined() && !p.is_null() => {
            params_arg("the pattern parameters", "", &p)?
        }
        _ => PatternParams::default(),
    };
    PatternConfig::new(params).map_err(|e| js_error("ConfigError", e))
}

/// Reads `{ seed?, multiplier?, resetInterval? }` (missing fields take the defaults), refusing
/// unknown keys and values that are not integers from 0 to 2^53 - 1. Errors name `what` for the
/// object and `prefix` + the key for a field (`config.pattern.seed`). Read by hand rather than
/// through serde, whose error messages would bring float formatting into the wasm.
pub(crate) fn params_arg(
    what: &str,
    prefix: &str,
    value: &JsValue,
) -> Result<PatternParams, JsValue> {
    options_arg(what, value, &["seed", "multiplier", "resetInterval"])?;
    let defaults = PatternParams::default();
    let read = |key: &str, default: u64| match field(value, key)? {
        Some(v) => u64_arg(&format!("{prefix}{key}"), &v),
        None => Ok(default),
    };
    Ok(PatternParams {
        seed: read("seed", defaults.seed)?,
        multiplier: read("multiplier", defaults.multiplier)?,
        reset_interval: read("resetInterval", defaults.reset_interval)?,
    })
}

/// Reads a room config: `{ pattern: { seed?, multiplier?, resetInterval? }, maxFuture,
/// staleWindow? }` (`staleWindow` `null` or missing for none), refusing unknown keys by name.
/// Errors name `what` (`config`) and its fields (`config.maxFuture`).
pub(crate) fn room_config_arg(what: &str, value: &JsValue) -> Result<RoomConfig, JsValue> {
    options_arg(what, value, &["pattern", "maxFuture", "staleWindow"])?;
    let required = |key: &str| {
        field(value, key)?.ok_or_else(|| invalid_argument(format!("{what} has no `{key}`")))
    };
    Ok(RoomConfig {
        pattern: params_arg(
            &format!("{what}.pattern"),
            &format!("{what}.pattern."),
            &required("pattern")?,
        )?,
        max_future: u64_arg(&format!("{what}.maxFuture"), &required("maxFuture")?)?,
        stale_window: field(value, "staleWindow")?
            .filter(|v| !v.is_null())
            .map(|v| u64_arg(&format!("{what}.staleWindow"), &v))
            .transpose()?,
    })
}

/// Collapses `n` to one digit by summing its decimal digits until one is left (157 → 13 → 4);
/// `collapseDigits(0)` is 0. Throws if `n` is not an integer from 0 to 2^53 - 1.
#[wasm_bindgen(js_name = collapseDigits)]
pub fn collapse_digits(n: f64) -> Result<f64, JsValue> {
    Ok(crate::pattern::collapse_digits(to_u64("n", n)?) as f64)
}

/// Computes a room's pattern value for any step in constant time.
///
/// ```js
/// const p = new PatternGenerator();            // seed 7, multiplier 7, resetInterval 100
/// p.computeValue(1);                           // 4
/// p.phase(250);                                // 2
/// new PatternGenerator({ resetInterval: 0 });  // throws ConfigError
/// ```
#[wasm_bindgen]
pub struct PatternGenerator {
    config: PatternConfig,
}

#[wasm_bindgen]
impl PatternGenerator {
    /// Asks wasm-bindgen for a fresh instance of the module at the next call into it: what the
    /// panic hook's timer calls on the dead instance (see `fatal`). Not part of the API.
    #[doc(hidden)]
    #[wasm_bindgen(js_name = "__pmReinit", skip_typescript)]
    pub fn pm_reinit() {
        wasm_bindgen::handler::schedule_reinit();
    }

    /// Creates a generator. Omitted parameters take the defaults (seed 7, multiplier 7,
    /// resetInterval 100). Throws a `ConfigError` for parameters that cannot work: a reset
    /// interval of 0, a seed or multiplier of 0, or values whose product overflows.
    #[wasm_bindgen(constructor)]
    pub fn new(params: Option<JsPatternParamsInit>) -> Result<PatternGenerator, JsValue> {
        Ok(Self {
            config: pattern_from_js(params)?,
        })
    }

    /// The pattern value of `step`: the seed at every multiple of `resetInterval`, else the digit
    /// collapse of the previous value times the multiplier.
    #[wasm_bindgen(js_name = computeValue)]
    pub fn compute_value(&self, step: f64) -> Result<f64, JsValue> {
        to_f64("the value", self.config.value(to_u64("step", step)?))
    }

    /// Whether `pattern` is the value of `step`.
    pub fn matches(&self, step: f64, pattern: f64) -> Result<bool, JsValue> {
        Ok(self
            .config
            .matches(to_u64("step", step)?, to_u64("pattern", pattern)?))
    }

    /// The phase of `step`: `Math.floor(step / resetInterval)`.
    pub fn phase(&self, step: f64) -> Result<f64, JsValue> {
        Ok(self.config.phase(to_u64("step", step)?) as f64)
    }

    /// The first step of the phase after the one `step` is in: the next checkpoint.
    #[wasm_bindgen(js_name = nextBoundary)]
    pub fn next_boundary(&self, step: f64) -> Result<f64, JsValue> {
        to_f64(
            "the boundary",
            self.config.next_boundary(to_u64("step", step)?),
        )
    }

    /// The parameters in use: `{ seed, multiplier, resetInterval }`.
    #[wasm_bindgen(getter)]
    pub fn params(&self) -> Result<JsPatternParams, JsValue> {
        Ok(params_to_js(&self.config.params())?.unchecked_into())
    }
}

/// `{ seed, multiplier, resetInterval }`.
pub(crate) fn params_to_js(params: &PatternParams) -> Result<JsValue, JsValue> {
    Ok(Object::new()
        .int("seed", params.seed)?
        .int("multiplier", params.multiplier)?
        .int("resetInterval", params.reset_interval)?
        .into())
}
