//! The document behind a `MeshClient`: the built-in one (`yrs`), or the application's own, a
//! JS object that speaks Yjs v1 updates (the `document` option; `pattern-mesh/yjs` makes one
//! from a `Y.Doc`).
//!
//! The session calls the application's document while the client is busy: its callbacks, and
//! the document's observers they run, cannot use the client (it throws a `BusyError`; the Yjs
//! provider defers everything it sends to a microtask). A callback that throws or returns the
//! wrong type is an `error` event (`DocumentError`), never a panic. An `applyUpdate` that threw
//! may have applied the update all the same (Yjs integrates an update before its observers
//! run); the session reports it as a `malformed` anomaly too, and a later sync repairs it.

use std::cell::RefCell;

use wasm_bindgen::prelude::*;

use super::errors::{describe, invalid_argument, what_it_is};
#[cfg(feature = "document")]
use crate::doc::SharedDoc;
use crate::doc::{digest_texts, DocError, Replica, Version};

/// The document a client keeps in sync.
pub(crate) enum ClientDoc {
    /// The built-in document (`client.text(name)`).
    #[cfg(feature = "document")]
    Built(SharedDoc),
    /// The application's document.
    Js(JsDocument),
}

impl ClientDoc {
    /// The built-in document, if this client has it.
    #[cfg(feature = "document")]
    pub(crate) fn built(&self) -> Option<&SharedDoc> {
        match self {
            ClientDoc::Built(doc) => Some(doc),
            ClientDoc::Js(_) => None,
        }
    }

    /// What the application's document reported as wrong since the last call.
    pub(crate) fn take_problems(&self) -> Vec<String> {
        match self {
            #[cfg(feature = "document")]
            ClientDoc::Built(_) => Vec::new(),
            ClientDoc::Js(doc) => std::mem::take(&mut *doc.problems.borrow_mut()),
        }
    }
}

impl Replica for ClientDoc {
    fn apply_update(&mut self, update: &[u8]) -> Result<(), DocError> {
        match self {
            #[cfg(feature = "document")]
            ClientDoc::Built(doc) => doc.apply_update(update),
            ClientDoc::Js(doc) => doc.apply_update(update),
        }
    }

    fn state_vector(&self) -> Vec<u8> {
        match self {
            #[cfg(feature = "document")]
            ClientDoc::Built(doc) => doc.state_vector(),
            ClientDoc::Js(doc) => doc.state_vector(),
        }
    }

    fn diff(&self, remote: &[u8]) -> Result<Vec<u8>, DocError> {
        match self {
            #[cfg(feature = "document")]
            ClientDoc::Built(doc) => Replica::diff(doc, remote),
            ClientDoc::Js(doc) => doc.diff(remote),
        }
    }

    fn version(&self) -> Version {
        match self {
            #[cfg(feature = "document")]
            ClientDoc::Built(doc) => doc.version(),
            ClientDoc::Js(doc) => doc.version(),
        }
    }

    fn digest(&self) -> u64 {
        match self {
            #[cfg(feature = "document")]
            ClientDoc::Built(doc) => doc.digest(),
            ClientDoc::Js(doc) => doc.digest(),
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            #[cfg(feature = "document")]
            ClientDoc::Built(doc) => doc.is_empty(),
            // An encoded empty state vector is the one byte 0.
            ClientDoc::Js(doc) => doc.state_vector().iter().all(|&b| b == 0),
        }
    }

    fn has_pending(&self) -> bool {
        match self {
            #[cfg(feature = "document")]
            ClientDoc::Built(doc) => Replica::has_pending(doc),
            ClientDoc::Js(doc) => doc.has_pending(),
        }
    }

    fn merge_updates(&self, updates: &[&[u8]]) -> Option<Vec<u8>> {
        match self {
            #[cfg(feature = "document")]
            ClientDoc::Built(doc) => Replica::merge_updates(doc, updates),
            ClientDoc::Js(doc) => doc.merge_updates(updates),
        }
    }

    fn whole(&self) -> Result<Vec<u8>, DocError> {
        match self {
            #[cfg(feature = "document")]
            ClientDoc::Built(doc) => Replica::whole(doc),
            ClientDoc::Js(doc) => doc.whole(),
        }
    }
}

/// The application's document: a JS object with `applyUpdate`, `stateVector`, `diff`,
/// `snapshot`, `texts` and, optionally, `mergeUpdates`, `pending` and `whole` (see
/// `MeshDocument` in the types).
pub(crate) struct JsDocument {
    object: JsValue,
    apply: js_sys::Function,
    state_vector: js_sys::Function,
    diff: js_sys::Function,
    snapshot: js_sys::Function,
    texts: js_sys::Function,
    merge: Option<js_sys::Function>,
    pending: Option<js_sys::Function>,
    whole: Option<js_sys::Function>,
    problems: RefCell<Vec<String>>,
}

impl JsDocument {
    /// Reads the `document` option; names the missing or wrong method.
    pub(crate) fn from_js(value: &JsValue) -> Result<Self, JsValue> {
        if !value.is_object() {
            return Err(invalid_argument(format!(
                "document must be an object with applyUpdate, stateVector, diff, snapshot and texts, got {}",
                what_it_is(value)
            )));
        }
        let method = |name: &str, required: bool| -> Result<Option<js_sys::Function>, JsValue> {
            let f = js_sys::Reflect::get(value, &name.into()).unwrap_or(JsValue::UNDEFINED);
            if f.is_undefined() && !required {
                return Ok(None);
            }
            f.dyn_into::<js_sys::Function>().map(Some).map_err(|f| {
                invalid_argument(format!(
                    "document.{name} must be a function, got {}",
                    what_it_is(&f)
                ))
            })
        };
        let required = |name: &str| method(name, true).map(|f| f.unwrap_or_else(|| unreachable!()));
        Ok(JsDocument {
            object: value.clone(),
            apply: required("applyUpdate")?,
            state_vector: required("stateVector")?,
            diff: required("diff")?,
            snapshot: required("snapshot")?,
            texts: required("texts")?,
            merge: method("mergeUpdates", false)?,
            pending: method("pending", false)?,
            whole: method("whole", false)?,
            problems: RefCell::default(),
        })
    }

    fn problem(&self, what: String) {
        self.problems.borrow_mut().push(what);
    }

    /// Calls `f` with `args`, expecting a `Uint8Array` back.
    fn bytes(
        &self,
        name: &str,
        f: &js_sys::Function,
        args: &[&JsValue],
    ) -> Result<Vec<u8>, String> {
        let result = match args {
            [] => f.call0(&self.object),
            [a] => f.call1(&self.object, a),
            _ => unreachable!("document methods take at most one argument"),
        }
        .map_err(|e| format!("document.{name} threw: {}", describe(&e)))?;
        result
            .dyn_into::<js_sys::Uint8Array>()
            .map(|bytes| bytes.to_vec())
            .map_err(|v| {
                format!(
                    "document.{name} must return a Uint8Array, got {}",
                    what_it_is(&v)
                )
            })
    }

    fn apply_update(&self, update: &[u8]) -> Result<(), DocError> {
        let bytes = js_sys::Uint8Array::from(update);
        self.apply
            .call1(&self.object, &bytes)
            .map(|_| ())
            .map_err(|e| {
                let what = format!("document.applyUpdate threw: {}", describe(&e));
                self.problem(what.clone());
                DocError::InvalidUpdate(what)
            })
    }

    fn state_vector(&self) -> Vec<u8> {
        self.bytes("stateVector", &self.state_vector, &[])
            .unwrap_or_else(|e| {
                self.problem(e);
                // Asks the room for everything: more than needed, never less.
                vec![0]
            })
    }

    fn diff(&self, remote: &[u8]) -> Result<Vec<u8>, DocError> {
        let remote = js_sys::Uint8Array::from(remote);
        self.bytes("diff", &self.diff, &[&remote]).map_err(|e| {
            self.problem(e.clone());
            DocError::InvalidUpdate(e)
        })
    }

    /// `whole()`, when the document has it; `diff` of an empty state vector otherwise.
    fn whole(&self) -> Result<Vec<u8>, DocError> {
        let Some(whole) = self.whole.as_ref() else {
            return self.diff(&[]);
        };
        self.bytes("whole", whole, &[]).map_err(|e| {
            self.problem(e.clone());
            DocError::InvalidUpdate(e)
        })
    }

    fn version(&self) -> Version {
        let version = self
            .bytes("snapshot", &self.snapshot, &[])
            .and_then(|bytes| {
                Version::from_snapshot(&bytes).map_err(|e| format!("document.snapshot: {e}"))
            });
        version.unwrap_or_else(|e| {
            self.problem(e);
            // A version no replica has: the checkpoint compares with nothing.
            Version {
                state_vector: Vec::new(),
                deletes: u64::MAX,
            }
        })
    }

    fn digest(&self) -> u64 {
        let texts = self
            .texts
            .call0(&self.object)
            .map_err(|e| format!("document.texts threw: {}", describe(&e)))
            .and_then(|list| {
                if !js_sys::Array::is_array(&list) {
                    return Err(format!(
                        "document.texts must return an array, got {}",
                        what_it_is(&list)
                    ));
                }
                js_sys::Array::from(&list)
                    .iter()
                    .map(|pair| {
                        let pair = js_sys::Array::from(&pair);
                        match (pair.get(0).as_string(), pair.get(1).as_string()) {
                            (Some(name), Some(content)) => Ok((name, content)),
                            _ => Err(
                                "document.texts must return [name, content] pairs of strings"
                                    .to_owned(),
                            ),
                        }
                    })
                    .collect()
            });
        match texts {
            Ok(texts) => digest_texts(texts),
            Err(e) => {
                self.problem(e);
                0
            }
        }
    }

    /// `pending()`, when the document has it: whether it holds back remote updates.
    fn has_pending(&self) -> bool {
        let Some(pending) = self.pending.as_ref() else {
            return false;
        };
        match pending.call0(&self.object) {
            Ok(value) => value.is_truthy(),
            Err(e) => {
                self.problem(format!("document.pending threw: {}", describe(&e)));
                false
            }
        }
    }

    fn merge_updates(&self, updates: &[&[u8]]) -> Option<Vec<u8>> {
        let merge = self.merge.as_ref()?;
        let list: js_sys::Array = updates
            .iter()
            .map(|u| js_sys::Uint8Array::from(*u))
            .collect();
        match self.bytes("mergeUpdates", merge, &[&list]) {
            Ok(merged) => Some(merged),
            Err(e) => {
                self.problem(e);
                None
            }
        }
    }
}
