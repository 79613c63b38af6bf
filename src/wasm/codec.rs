//! `encode` and `decode`: frames as plain JS objects and as the bytes of a WebSocket message.
//!
//! The frames that carry traffic (`data`, `update`, `presence`) cross the boundary field by
//! field, with JSON values through the engine's own `JSON.stringify` and `JSON.parse`: a
//! generic serde walk over a JS object costs several microseconds a frame. The other kinds are
//! read and written field by field too; both ways accept and produce the same objects.

use wasm_bindgen::prelude::*;

use super::errors::{
    describe, field, invalid_argument, js_error, object_arg, quoted, string_arg, to_f64, u64_arg,
    what_it_is,
};
use super::frames::{
    json_from_js, json_to_js, peer_to_js, peers_to_js, presence_to_js, stamped_to_js, Fields,
    Object,
};
use super::pattern::params_to_js;
use super::pattern::room_config_arg;
use super::types::{JsFrame, JsReceived};
use crate::wire::{
    Body, Frame, Limits, Peer, Positioned, Reason, RelayLimits, ResumeToken, RoomConfig, Stamp,
    Stamped,
};

/// Encodes a frame (a plain object such as
/// `{ kind: "data", sender: 1, step: 1, pattern: 4, data: { temperature: 23.5 } }`)
/// into the bytes of one binary WebSocket message. Throws `InvalidArgument` if the object is
/// not a frame, naming the field that is wrong.
#[wasm_bindgen]
pub fn encode(frame: JsFrame) -> Result<Vec<u8>, JsValue> {
    Ok(frame_from_js(frame.into())?.encode())
}

/// Decodes the bytes of one binary WebSocket message into a frame object, with `position` set
/// when the relay put a room log position in the header. Throws a `DecodeError` that says what
/// is wrong (unknown version or kind, a truncated field, a frame over the 1 MiB limit, invalid
/// JSON, ...). Never accepts a frame it cannot fully read.
#[wasm_bindgen]
pub fn decode(
    #[wasm_bindgen(unchecked_param_type = "Uint8Array")] bytes: JsValue,
) -> Result<JsReceived, JsValue> {
    let bytes = super::errors::bytes_arg("bytes", &bytes)?;
    let Positioned { position, frame } = Frame::decode_positioned(&bytes, &Limits::default())
        .map_err(|e| js_error("DecodeError", e))?;
    let object = frame_to_js(&frame)?;
    if let Some(position) = position {
        object
            .unchecked_ref::<Fields>()
            .set_position(to_f64("the position", position)?);
    }
    Ok(object.unchecked_into())
}

/// A frame from its JS object; `InvalidArgument` names what is wrong.
pub(crate) fn frame_from_js(value: JsValue) -> Result<Frame, JsValue> {
    if !value.is_object() {
        return Err(invalid_argument(
            "the frame is not valid: expected an object",
        ));
    }
    let fields: &Fields = value.unchecked_ref();
    let kind_value = read(fields.kind(), "kind")?;
    let kind = kind_value.as_string();
    match kind.as_deref() {
        Some("data") => Ok(Frame::stamped(
            stamp_from_js(fields)?,
            Body::Data {
                data: json_from_js("the frame's `data`", &read(fields.data(), "data")?)?,
            },
        )),
        Some("signal") => Ok(Frame::stamped(
            stamp_from_js(fields)?,
            Body::Signal {
                data: json_from_js("the frame's `data`", &read(fields.data(), "data")?)?,
            },
        )),
        Some("update") => Ok(Frame::stamped(
            stamp_from_js(fields)?,
            Body::Update {
                doc: read(fields.doc(), "doc")?
                    .as_string()
                    .ok_or_else(|| invalid_argument("the frame's `doc` must be a string"))?,
                update: bytes_from_js(read(fields.update(), "update")?, "update")?,
            },
        )),
        Some("presence") => Ok(Frame::Presence {
            sender: u64_arg("the frame's `sender`", &read(fields.sender(), "sender")?)?,
            data: json_from_js("the frame's `data`", &read(fields.data(), "data")?)?,
        }),
        Some(kind) => AnyFrame(&value).into_frame(kind),
        None => Err(invalid_argument(format!(
            "the frame is not valid: `kind` must be a string, got {}",
            what_it_is(&kind_value)
        ))),
    }
}

/// Bytes given as a Uint8Array, an ArrayBuffer or an array of numbers from 0 to 255.
fn bytes_from_js(value: JsValue, field: &str) -> Result<Vec<u8>, JsValue> {
    if let Some(bytes) = value.dyn_ref::<js_sys::Uint8Array>() {
        return Ok(bytes.to_vec());
    }
    if let Some(buffer) = value.dyn_ref::<js_sys::ArrayBuffer>() {
        return Ok(js_sys::Uint8Array::new(buffer).to_vec());
    }
    if js_sys::Array::is_array(&value) {
        let array: &js_sys::Array = value.unchecked_ref();
        let mut bytes = Vec::with_capacity(array.length() as usize);
        for (i, byte) in array.iter().enumerate() {
            match byte.as_f64() {
                Some(n) if n.fract() == 0.0 && (0.0..=255.0).contains(&n) => bytes.push(n as u8),
                _ => {
                    return Err(invalid_argument(format!(
                        "the frame's `{field}[{i}]` must be an integer from 0 to 255, got {}",
                        what_it_is(&byte)
                    )))
                }
            }
        }
        return Ok(bytes);
    }
    Err(invalid_argument(format!(
        "the frame's `{field}` must be a Uint8Array, an ArrayBuffer or an array of bytes, got {}",
        what_it_is(&value)
    )))
}

/// A property read that may have thrown (a getter, a Proxy) as an `InvalidArgument`.
fn read(value: Result<JsValue, JsValue>, field: &str) -> Result<JsValue, JsValue> {
    value.map_err(|e| {
        invalid_argument(format!(
            "reading the frame's `{field}` threw: {}",
            describe(&e)
        ))
    })
}

/// The fields of a frame object, read one by one for the kinds without a fast path. Written out
/// rather than a serde derive: serde's walk over a JS object, and its error messages (which
/// format floats), made up a tenth of the package. A field that is `null` counts as missing.
struct AnyFrame<'a>(&'a JsValue);

/// A field the frame's kind requires.
fn required<T>(value: Option<T>, field: &str) -> Result<T, JsValue> {
    value
        .ok_or_else(|| invalid_argument(format!("the frame is not valid: missing field `{field}`")))
}

fn token(bytes: Vec<u8>) -> Result<ResumeToken, JsValue> {
    let len = bytes.len();
    ResumeToken::try_from(bytes)
        .map_err(|_| invalid_argument(format!("the frame's `resume` must be 16 bytes, not {len}")))
}

impl AnyFrame<'_> {
    /// The field `key`, `None` when it is missing, `undefined` or `null`.
    fn get(&self, key: &str) -> Result<Option<JsValue>, JsValue> {
        let value = read(js_sys::Reflect::get(self.0, &key.into()), key)?;
        Ok((!value.is_undefined() && !value.is_null()).then_some(value))
    }

    fn u64(&self, key: &str) -> Result<Option<u64>, JsValue> {
        self.get(key)?
            .map(|v| u64_arg(&format!("the frame's `{key}`"), &v))
            .transpose()
    }

    fn bool(&self, key: &str) -> Result<Option<bool>, JsValue> {
        self.get(key)?
            .map(|v| {
                v.as_bool().ok_or_else(|| {
                    invalid_argument(format!(
                        "the frame's `{key}` must be a boolean, got {}",
                        what_it_is(&v)
                    ))
                })
            })
            .transpose()
    }

    fn string(&self, key: &str) -> Result<Option<String>, JsValue> {
        self.get(key)?
            .map(|v| string_arg(&format!("the frame's `{key}`"), &v))
            .transpose()
    }

    fn bytes(&self, key: &str) -> Result<Option<Vec<u8>>, JsValue> {
        self.get(key)?.map(|v| bytes_from_js(v, key)).transpose()
    }

    fn peer(&self, key: &str) -> Result<Option<Peer>, JsValue> {
        self.get(key)?
            .map(|v| peer_from_js(&format!("the frame's `{key}`"), &v))
            .transpose()
    }

    fn stamp(&self) -> Result<Stamp, JsValue> {
        Ok(Stamp {
            sender: required(self.u64("sender")?, "sender")?,
            step: required(self.u64("step")?, "step")?,
            pattern: required(self.u64("pattern")?, "pattern")?,
        })
    }

    fn config(&self) -> Result<Option<RoomConfig>, JsValue> {
        self.get("config")?
            .map(|v| room_config_arg("config", &v))
            .transpose()
    }

    fn limits(&self) -> Result<Option<RelayLimits>, JsValue> {
        let Some(value) = self.get("limits")? else {
            return Ok(None);
        };
        const KEYS: [&str; 6] = [
            "maxFrame",
            "maxMessage",
            "rate",
            "burst",
            "bandwidth",
            "bandwidthBurst",
        ];
        // Every limit is required, so a misspelt key cannot pass unseen; other keys are ignored,
        // as they are at the frame's top level.
        object_arg("the frame's `limits`", &value, &KEYS.join(", "))?;
        let mut numbers = [0; 6];
        for (number, key) in numbers.iter_mut().zip(KEYS) {
            let field = field(&value, key)?.ok_or_else(|| {
                invalid_argument(format!(
                    "the frame is not valid: missing field `limits.{key}`"
                ))
            })?;
            *number = u64_arg(&format!("the frame's `limits.{key}`"), &field)?;
        }
        let [max_frame, max_message, rate, burst, bandwidth, bandwidth_burst] = numbers;
        Ok(Some(RelayLimits {
            max_frame,
            max_message,
            rate,
            burst,
            bandwidth,
            bandwidth_burst,
        }))
    }

    fn peers(&self) -> Result<Option<Vec<Peer>>, JsValue> {
        let Some(value) = self.get("peers")? else {
            return Ok(None);
        };
        let array = value.dyn_ref::<js_sys::Array>().ok_or_else(|| {
            invalid_argument(format!(
                "the frame's `peers` must be an array, got {}",
                what_it_is(&value)
            ))
        })?;
        let mut peers = Vec::with_capacity(array.length() as usize);
        for (i, peer) in array.iter().enumerate() {
            peers.push(peer_from_js(&format!("the frame's `peers[{i}]`"), &peer)?);
        }
        Ok(Some(peers))
    }

    fn reason(&self) -> Result<Option<Reason>, JsValue> {
        let Some(name) = self.string("reason")? else {
            return Ok(None);
        };
        Reason::ALL
            .into_iter()
            .find(|r| r.as_str() == name)
            .map(Some)
            .ok_or_else(|| {
                invalid_argument(format!(
                    "the frame's `reason` {} is not one of the reasons ({})",
                    quoted(&name),
                    Reason::ALL.map(Reason::as_str).join(", ")
                ))
            })
    }

    /// The frame, refused with the first field that is missing or of the wrong type.
    fn into_frame(self, kind: &str) -> Result<Frame, JsValue> {
        let stamped = |body| -> Result<Frame, JsValue> { Ok(Frame::stamped(self.stamp()?, body)) };
        Ok(match kind {
            "join" => Frame::Join {
                room: required(self.string("room")?, "room")?,
                name: required(self.string("name")?, "name")?,
                since: required(self.u64("since")?, "since")?,
                log: self.u64("log")?.unwrap_or(0),
                resume: self.bytes("resume")?.map(token).transpose()?,
                config: self.config()?,
                floor: self.bool("floor")?.unwrap_or(false),
            },
            "welcome" => Frame::Welcome {
                node: required(self.u64("node")?, "node")?,
                resume: token(required(self.bytes("resume")?, "resume")?)?,
                config: required(self.config()?, "config")?,
                limits: required(self.limits()?, "limits")?,
                high: required(self.u64("high")?, "high")?,
                log: required(self.u64("log")?, "log")?,
                peers: required(self.peers()?, "peers")?,
                floor: self.u64("floor")?,
            },
            "caughtUp" => Frame::CaughtUp {
                high: required(self.u64("high")?, "high")?,
                position: required(self.u64("position")?, "position")?,
            },
            "peerJoined" => Frame::PeerJoined {
                peer: required(self.peer("peer")?, "peer")?,
            },
            "peerLeft" => Frame::PeerLeft {
                node: required(self.u64("node")?, "node")?,
            },
            "ack" => Frame::Ack {
                step: required(self.u64("step")?, "step")?,
                position: required(self.u64("position")?, "position")?,
            },
            "reject" => Frame::Reject {
                step: required(self.u64("step")?, "step")?,
                reason: required(self.reason()?, "reason")?,
                detail: required(self.string("detail")?, "detail")?,
            },
            "part" => Frame::Part {
                total: required(self.u64("total")?, "total")?,
                offset: required(self.u64("offset")?, "offset")?,
                bytes: required(self.bytes("bytes")?, "bytes")?,
            },
            "fence" => Frame::Fence {
                step: required(self.u64("step")?, "step")?,
            },
            "rename" => Frame::Rename {
                name: required(self.string("name")?, "name")?,
            },
            "heartbeat" => Frame::Heartbeat,
            "peerRenamed" => Frame::PeerRenamed {
                peer: required(self.peer("peer")?, "peer")?,
            },
            "checkpoint" => stamped(Body::Checkpoint {
                doc: required(self.string("doc")?, "doc")?,
                state_vector: required(self.bytes("stateVector")?, "stateVector")?,
                deletes: hex(self.string("deletes")?.as_deref(), "deletes")?,
                digest: hex(self.string("digest")?.as_deref(), "digest")?,
            })?,
            "syncRequest" => stamped(Body::SyncRequest {
                doc: required(self.string("doc")?, "doc")?,
                state_vector: required(self.bytes("stateVector")?, "stateVector")?,
                to: self.u64("to")?.unwrap_or(0),
            })?,
            "syncState" => stamped(Body::SyncState {
                doc: required(self.string("doc")?, "doc")?,
                update: required(self.bytes("update")?, "update")?,
                to: self.u64("to")?.unwrap_or(0),
            })?,
            "snapshot" => Frame::Snapshot {
                doc: required(self.string("doc")?, "doc")?,
                state: required(self.bytes("state")?, "state")?,
            },
            other => {
                return Err(invalid_argument(format!(
                    "the frame is not valid: unknown kind `{other}`"
                )))
            }
        })
    }
}

/// A peer: `{ node, name }` (other keys are ignored, as at the frame's top level).
fn peer_from_js(what: &str, value: &JsValue) -> Result<Peer, JsValue> {
    object_arg(what, value, "node, name")?;
    let missing = |key: &str| invalid_argument(format!("{what} has no `{key}`"));
    Ok(Peer {
        node: u64_arg(
            &format!("{what}.node"),
            &field(value, "node")?.ok_or_else(|| missing("node"))?,
        )?,
        name: string_arg(
            &format!("{what}.name"),
            &field(value, "name")?.ok_or_else(|| missing("name"))?,
        )?,
    })
}

/// A 64-bit value given as 16 hex digits (a JS number cannot hold 64 bits).
fn hex(value: Option<&str>, field: &str) -> Result<u64, JsValue> {
    let text = required(value, field)?;
    (text.len() == 16)
        .then(|| u64::from_str_radix(text, 16).ok())
        .flatten()
        .ok_or_else(|| invalid_argument(format!("the frame's `{field}` must be 16 hex digits")))
}

/// `{ maxFrame, maxMessage, rate, burst, bandwidth, bandwidthBurst }`.
fn limits_to_js(limits: &RelayLimits) -> Result<JsValue, JsValue> {
    Ok(Object::new()
        .int("maxFrame", limits.max_frame)?
        .int("maxMessage", limits.max_message)?
        .int("rate", limits.rate)?
        .int("burst", limits.burst)?
        .int("bandwidth", limits.bandwidth)?
        .int("bandwidthBurst", limits.bandwidth_burst)?
        .into())
}

/// `{ pattern: { seed, multiplier, resetInterval }, maxFuture, staleWindow }`, `staleWindow`
/// `null` when late messages are kept.
fn config_to_js(config: &RoomConfig) -> Result<JsValue, JsValue> {
    let stale = match config.stale_window {
        Some(window) => to_f64("the stale window", window)?.into(),
        None => JsValue::NULL,
    };
    Ok(Object::new()
        .set("pattern", &params_to_js(&config.pattern)?)?
        .int("maxFuture", config.max_future)?
        .set("staleWindow", &stale)?
        .into())
}

/// A copy of `bytes` as a `Uint8Array`: a `&[u8]` would reach JS as a view of wasm memory,
/// soon reused.
fn bytes_to_js(bytes: &[u8]) -> JsValue {
    js_sys::Uint8Array::from(bytes).into()
}

/// A frame of a kind the codec has no fast path for, key by key: `kind` first, then only the
/// fields the kind has, as [`frame_from_js`] reads them.
fn other_to_js(frame: &Frame) -> Result<JsValue, JsValue> {
    let object = Object::new().string("kind", frame.kind().as_str())?;
    let object = match frame {
        Frame::Join {
            room,
            name,
            since,
            log,
            resume,
            config,
            floor,
        } => {
            let mut object = object
                .string("room", room)?
                .string("name", name)?
                .int("since", *since)?;
            if let Some(resume) = resume {
                object = object.set("resume", &bytes_to_js(&resume[..]))?;
            }
            if let Some(config) = config {
                object = object.set("config", &config_to_js(config)?)?;
            }
            let object = object.int("log", *log)?;
            match floor {
                true => object.set("floor", &JsValue::TRUE)?,
                false => object,
            }
        }
        Frame::Welcome {
            node,
            resume,
            config,
            limits,
            high,
            log,
            peers,
            floor,
        } => object
            .int("node", *node)?
            .set("resume", &bytes_to_js(&resume[..]))?
            .set("config", &config_to_js(config)?)?
            .set("limits", &limits_to_js(limits)?)?
            .int("high", *high)?
            .int("log", *log)?
            .set("peers", &peers_to_js(peers)?)?
            .int_if("floor", *floor)?,
        Frame::CaughtUp { high, position } => {
            object.int("high", *high)?.int("position", *position)?
        }
        Frame::PeerJoined { peer } | Frame::PeerRenamed { peer } => {
            object.set("peer", &peer_to_js(peer)?)?
        }
        Frame::Rename { name } => object.string("name", name)?,
        Frame::Heartbeat => object,
        Frame::PeerLeft { node } => object.int("node", *node)?,
        Frame::Ack { step, position } => object.int("step", *step)?.int("position", *position)?,
        Frame::Reject {
            step,
            reason,
            detail,
        } => object
            .int("step", *step)?
            .string("reason", reason.as_str())?
            .string("detail", detail)?,
        Frame::Presence { sender, .. } => object.int("sender", *sender)?,
        Frame::Part {
            total,
            offset,
            bytes,
        } => object
            .int("total", *total)?
            .int("offset", *offset)?
            .set("bytes", &bytes_to_js(bytes))?,
        Frame::Fence { step } => object.int("step", *step)?,
        Frame::Snapshot { doc, state } => object
            .string("doc", doc)?
            .set("state", &bytes_to_js(state))?,
        Frame::Stamped(Stamped { stamp, body }) => {
            let mut object = object
                .int("sender", stamp.sender)?
                .int("step", stamp.step)?
                .int("pattern", stamp.pattern)?;
            if let Some(doc) = body.doc() {
                object = object.string("doc", doc)?;
            }
            match body {
                Body::Data { .. } | Body::Signal { .. } => object,
                Body::Update { update, .. } => object.set("update", &bytes_to_js(update))?,
                Body::Checkpoint {
                    state_vector,
                    deletes,
                    digest,
                    ..
                } => object
                    .set("stateVector", &bytes_to_js(state_vector))?
                    .string("deletes", &format!("{deletes:016x}"))?
                    .string("digest", &format!("{digest:016x}"))?,
                Body::SyncRequest {
                    state_vector, to, ..
                } => object
                    .set("stateVector", &bytes_to_js(state_vector))?
                    .int("to", *to)?,
                Body::SyncState { update, to, .. } => {
                    object.int("to", *to)?.set("update", &bytes_to_js(update))?
                }
            }
        }
    };
    Ok(object.into())
}

/// A frame as the JS object [`frame_from_js`] reads.
pub(crate) fn frame_to_js(frame: &Frame) -> Result<JsValue, JsValue> {
    let object = match frame {
        Frame::Stamped(Stamped {
            stamp,
            body: Body::Data { data },
        }) => {
            let object = stamped_to_js(Some("data"), stamp)?;
            object.set_data(&json_to_js(data)?);
            object
        }
        Frame::Stamped(Stamped {
            stamp,
            body: Body::Signal { data },
        }) => {
            let object = stamped_to_js(Some("signal"), stamp)?;
            object.set_data(&json_to_js(data)?);
            object
        }
        Frame::Stamped(Stamped {
            stamp,
            body: Body::Update { doc, update },
        }) => {
            let object = stamped_to_js(Some("update"), stamp)?;
            object.set_doc(doc);
            // A copy: a `&[u8]` would reach JS as a view of wasm memory, soon reused.
            object.set_update(&js_sys::Uint8Array::from(update.as_slice()));
            object
        }
        Frame::Presence { sender, data } => presence_to_js(Some("presence"), *sender, data)?,
        other => return other_to_js(other),
    };
    Ok(object.into())
}

fn stamp_from_js(fields: &Fields) -> Result<Stamp, JsValue> {
    Ok(Stamp {
        sender: u64_arg("the frame's `sender`", &read(fields.sender(), "sender")?)?,
        step: u64_arg("the frame's `step`", &read(fields.step(), "step")?)?,
        pattern: u64_arg("the frame's `pattern`", &read(fields.pattern(), "pattern")?)?,
    })
}
