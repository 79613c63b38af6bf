//! `PatternGenerator` and `collapseDigits`.

use wasm_bindgen::prelude::*;

use super::errors::{from_js, js_error, to_f64, to_js, to_u64};
use super::types::{JsPatternParams, JsPatternParamsInit};
use crate::pattern::{PatternConfig, PatternParams};

/// Reads optional pattern parameters (missing fields take the defaults 7, 7, 100) and validates
/// them.
pub(crate) fn pattern_from_js(
    params: Option<JsPatternParamsInit>,
) -> Result<PatternConfig, JsValue> {
    let params: PatternParams = match params {
        Some(p) if !p.is_undefined() && !p.is_null() => {
            from_js("the pattern parameters", p.into())?
        }
        _ => PatternParams::default(),
    };
    PatternConfig::new(params).map_err(|e| js_error("ConfigError", e))
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
        Ok(to_js(&self.config.params())?.unchecked_into())
    }
}
