//! Verdicts for JS, and `Validator`: the receiver's rules on their own (with the `tools`
//! feature).

use wasm_bindgen::prelude::*;

use super::types::{JsVerdict, JsVerdictCounts};
use crate::validate::Counters;
use crate::wire::Reason;
#[cfg(feature = "tools")]
use {
    super::codec::frame_from_js,
    super::errors::{
        describe, field, invalid_argument, js_error, object_arg, options_arg, quoted, to_u64,
        u64_arg,
    },
    super::pattern::params_arg,
    super::types::{JsFrameOrBytes, JsOrigin, JsValidatorOptions},
    crate::pattern::{PatternParams, Step},
    crate::validate::{self, Origin, ValidatorConfig, Verdict},
    crate::wire::{Frame, RoomConfig},
};

/// Validates stamped frames before they are applied: pattern, sender, replay, future step and,
/// with a stale window, stale steps of data and signals (document messages are never stale).
/// Counts every verdict.
///
/// ```js
/// const v = new Validator();
/// v.check({ kind: "data", sender: 2, step: 1, pattern: 4, data: {} }, { receiver: 1 }, 0);
/// // { accepted: true }
/// v.check(sameFrameAgain, { receiver: 1 }, 1);
/// // { accepted: false, reason: "replay", detail: "step 1 is not above sender 2's last accepted step 1" }
/// ```
#[cfg(feature = "tools")]
#[wasm_bindgen]
pub struct Validator {
    inner: validate::Validator,
}

#[cfg(feature = "tools")]
#[derive(Default)]
struct Options {
    pattern: PatternParams,
    max_future: Option<u64>,
    stale_window: Option<u64>,
    max_senders: Option<u64>,
    idle_after_ms: Option<u64>,
}

#[cfg(feature = "tools")]
impl Options {
    /// Reads `{ pattern?, maxFuture?, staleWindow?, maxSenders?, idleAfterMs? }`, refusing
    /// unknown keys and values of the wrong type by name.
    fn from_js(value: &JsValue) -> Result<Self, JsValue> {
        options_arg(
            "the options",
            value,
            &[
                "pattern",
                "maxFuture",
                "staleWindow",
                "maxSenders",
                "idleAfterMs",
            ],
        )?;
        let number = |key: &str| {
            field(value, key)?
                .filter(|v| !v.is_null())
                .map(|v| u64_arg(key, &v))
                .transpose()
        };
        Ok(Self {
            pattern: match field(value, "pattern")?.filter(|v| !v.is_null()) {
                Some(p) => params_arg("pattern", "pattern.", &p)?,
                None => PatternParams::default(),
            },
            max_future: number("maxFuture")?,
            stale_window: number("staleWindow")?,
            max_senders: number("maxSenders")?,
            idle_after_ms: number("idleAfterMs")?,
        })
    }
}

/// A verdict as JS sees it: `{ accepted: true }` or `{ accepted: false, reason, detail }`.
pub(crate) struct VerdictJs {
    accepted: bool,
    reason: Option<Reason>,
    detail: Option<String>,
}

impl VerdictJs {
    pub(crate) const ACCEPTED: VerdictJs = VerdictJs {
        accepted: true,
        reason: None,
        detail: None,
    };

    pub(crate) fn rejected(reason: Reason, detail: String) -> Self {
        Self {
            accepted: false,
            reason: Some(reason),
            detail: Some(detail),
        }
    }
}

#[cfg(feature = "tools")]
#[wasm_bindgen]
impl Validator {
    /// A validator for a room. Omitted options take the defaults: pattern 7, 7, 100;
    /// `maxFuture` 1000; no stale window; 4096 senders; idle after 10 minutes. Throws a
    /// `ConfigError` for an unusable pattern and `InvalidArgument` for an unknown option.
    #[wasm_bindgen(constructor)]
    pub fn new(options: Option<JsValidatorOptions>) -> Result<Validator, JsValue> {
        let options: Options = match options {
            Some(o) if !o.is_undefined() && !o.is_null() => Options::from_js(&o.into())?,
            _ => Options::default(),
        };
        let room = RoomConfig {
            pattern: options.pattern,
            max_future: options
                .max_future
                .unwrap_or(RoomConfig::default().max_future),
            stale_window: options.stale_window,
        };
        let mut config =
            ValidatorConfig::for_room(&room).map_err(|e| js_error("ConfigError", e))?;
        if let Some(max) = options.max_senders {
            if max == 0 {
                return Err(js_error("ConfigError", "maxSenders must be at least 1"));
            }
            config.max_senders = usize::try_from(max).unwrap_or(usize::MAX);
        }
        if let Some(ms) = options.idle_after_ms {
            config.idle_after_ms = ms;
        }
        Ok(Self {
            inner: validate::Validator::new(config),
        })
    }

    /// Validates a stamped frame, given as an object or as the received bytes, from `origin`
    /// (`{ receiver: myNodeId }` for frames the relay forwarded, `{ connection: id }` for frames
    /// straight from a connection), against the local step `local`, at `nowMs` (default
    /// `Date.now()`). Bytes that do not decode are counted and rejected as `malformed` or
    /// `tooLarge`. Bytes that carry a log position (a stored message the relay sent) are judged
    /// as a message from the log: never `stale`, and not against the floor of evicted senders.
    /// Throws `InvalidArgument` for a frame kind that carries no stamp.
    pub fn check(
        &mut self,
        frame: JsFrameOrBytes,
        origin: JsOrigin,
        local: f64,
        #[wasm_bindgen(js_name = nowMs)] now_ms: Option<f64>,
    ) -> Result<JsVerdict, JsValue> {
        let local: Step = to_u64("local", local)?;
        let now = match now_ms {
            Some(ms) => to_u64("nowMs", ms)?,
            None => js_sys::Date::now() as u64,
        };
        let origin = origin_from_js(origin.into())?;
        let frame: JsValue = frame.into();
        // Bytes the relay sent from the room's log carry its position: such a message is judged
        // as the client judges it (`check_logged`: never stale, nor below the eviction floor).
        let (frame, logged): (Frame, bool) = match frame.dyn_ref::<js_sys::Uint8Array>() {
            Some(bytes) => match Frame::decode_positioned(&bytes.to_vec(), &Default::default()) {
                Ok(positioned) => (positioned.frame, positioned.position.is_some()),
                Err(e) => {
                    self.inner.record(e.reason());
                    return verdict(VerdictJs::rejected(e.reason(), e.to_string()));
                }
            },
            None => (frame_from_js(frame)?, false),
        };
        let stamp = *frame.stamp().ok_or_else(|| {
            invalid_argument(format!(
                "a {} frame carries no stamp; only data, update, checkpoint, syncRequest \
                 and syncState frames are validated",
                frame.kind()
            ))
        })?;
        let checked = if logged {
            self.inner
                .check_logged(frame.kind(), &stamp, origin, local, now)
        } else {
            self.inner.check(frame.kind(), &stamp, origin, local, now)
        };
        let result = match checked {
            Verdict::Accepted => VerdictJs::ACCEPTED,
            Verdict::Rejected(reason) => {
                VerdictJs::rejected(reason, self.inner.explain(&stamp, origin, local, reason))
            }
        };
        verdict(result)
    }

    /// Counts of every verdict so far: `{ accepted, malformed, tooLarge, patternMismatch, ... }`.
    pub fn counts(&self) -> Result<JsVerdictCounts, JsValue> {
        counts_to_js(self.inner.counters())
    }

    /// How many senders are tracked.
    #[wasm_bindgen(getter, js_name = trackedSenders)]
    pub fn tracked_senders(&self) -> usize {
        self.inner.tracked_senders()
    }

    /// The last accepted step of `sender`, or `undefined` if it is not tracked.
    #[wasm_bindgen(js_name = lastStep)]
    pub fn last_step(&self, sender: f64) -> Result<Option<f64>, JsValue> {
        Ok(self
            .inner
            .last_step(to_u64("sender", sender)?)
            .map(|s| s as f64))
    }

    /// Forgets a sender that left; its old steps still count as replays.
    pub fn forget(&mut self, sender: f64) -> Result<(), JsValue> {
        self.inner.forget(to_u64("sender", sender)?);
        Ok(())
    }
}

/// `{ accepted, malformed, tooLarge, ... }` for JS: every reason, zeros included.
pub(crate) fn counts_to_js(counters: &Counters) -> Result<JsVerdictCounts, JsValue> {
    let mut object = super::frames::Object::new().int("accepted", counters.accepted)?;
    for (reason, count) in counters.by_reason() {
        object = object.int(reason.as_str(), count)?;
    }
    Ok(JsValue::from(object).unchecked_into())
}

#[wasm_bindgen]
extern "C" {
    /// A verdict object, written through direct property accesses.
    type Fields;
    #[wasm_bindgen(method, setter)]
    fn set_accepted(this: &Fields, value: bool);
    #[wasm_bindgen(method, setter)]
    fn set_reason(this: &Fields, value: &str);
    #[wasm_bindgen(method, setter)]
    fn set_detail(this: &Fields, value: &str);
}

#[cfg(feature = "tools")]
#[wasm_bindgen]
extern "C" {
    /// An origin object, read through direct property accesses.
    type OriginFields;
    #[wasm_bindgen(method, getter, catch)]
    fn receiver(this: &OriginFields) -> Result<JsValue, JsValue>;
    #[wasm_bindgen(method, getter, catch)]
    fn connection(this: &OriginFields) -> Result<JsValue, JsValue>;
}

/// `{ receiver: id }` or `{ connection: id }`; anything else is refused, saying what was wrong.
#[cfg(feature = "tools")]
fn origin_from_js(origin: JsValue) -> Result<Origin, JsValue> {
    const SHAPE: &str = "the origin must be { receiver: node } or { connection: id }";
    object_arg("the origin", &origin, "receiver or connection")?;
    let threw =
        |e: JsValue| invalid_argument(format!("reading the origin threw: {}", describe(&e)));
    let keys = js_sys::Reflect::own_keys(origin.unchecked_ref()).map_err(threw)?;
    if keys.length() != 1 {
        return Err(invalid_argument(format!(
            "{SHAPE}, got an object with {} keys",
            keys.length()
        )));
    }
    let fields: &OriginFields = origin.unchecked_ref();
    let key = keys.get(0).as_string().unwrap_or_default();
    match key.as_str() {
        "receiver" => Ok(Origin::Relayed {
            receiver: u64_arg("the origin's receiver", &fields.receiver().map_err(threw)?)?,
        }),
        "connection" => Ok(Origin::Connection(u64_arg(
            "the origin's connection",
            &fields.connection().map_err(threw)?,
        )?)),
        _ => Err(invalid_argument(format!(
            "{SHAPE}, got the key {}",
            quoted(&key)
        ))),
    }
}

/// `{ accepted: true }` or `{ accepted: false, reason, detail }`.
pub(crate) fn verdict(v: VerdictJs) -> Result<JsVerdict, JsValue> {
    let object: Fields = js_sys::Object::new().unchecked_into();
    object.set_accepted(v.accepted);
    if let Some(reason) = v.reason {
        object.set_reason(reason.as_str());
    }
    if let Some(detail) = &v.detail {
        object.set_detail(detail);
    }
    Ok(object.unchecked_into())
}
