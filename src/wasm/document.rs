//! `SharedDocument`: the document core on its own, for offline use, tools, and exchanging
//! updates with Yjs.

use wasm_bindgen::prelude::*;

use super::errors::{bytes_arg, js_error, string_arg, u32_arg};
use crate::doc::SharedDoc;

/// A document of named texts that exchanges Yjs v1 updates, without a connection. Its updates
/// apply in a Yjs `Y.Doc` and Yjs updates apply here.
///
/// ```js
/// const doc = new SharedDocument();
/// const update = doc.insert("content", 0, "hello");   // a Yjs v1 update
/// Y.applyUpdate(ydoc, update);                         // ydoc.getText("content") is "hello"
/// doc.applyUpdate(Y.encodeStateAsUpdate(ydoc));
/// ```
#[wasm_bindgen]
pub struct SharedDocument {
    doc: SharedDoc,
}

impl Default for SharedDocument {
    fn default() -> Self {
        Self::new()
    }
}

#[wasm_bindgen]
impl SharedDocument {
    /// An empty document with a random client id.
    #[wasm_bindgen(constructor)]
    pub fn new() -> SharedDocument {
        Self {
            doc: SharedDoc::new(),
        }
    }

    /// Inserts `chunk` at `index` (UTF-16 code units) in the text `name`; returns the edit as
    /// a Yjs v1 update. Throws `RangeError` past the end.
    pub fn insert(
        &self,
        #[wasm_bindgen(unchecked_param_type = "string")] name: JsValue,
        #[wasm_bindgen(unchecked_param_type = "number")] index: JsValue,
        #[wasm_bindgen(unchecked_param_type = "string")] chunk: JsValue,
    ) -> Result<Vec<u8>, JsValue> {
        let name = string_arg("name", &name)?;
        let index = u32_arg("index", &index)?;
        let chunk = string_arg("chunk", &chunk)?;
        self.doc
            .insert(&name, index, &chunk)
            .map_err(|e| js_error("RangeError", e))
    }

    /// Deletes `length` code units at `index` in the text `name`; returns the edit as a Yjs v1
    /// update. Throws `RangeError` past the end.
    pub fn delete(
        &self,
        #[wasm_bindgen(unchecked_param_type = "string")] name: JsValue,
        #[wasm_bindgen(unchecked_param_type = "number")] index: JsValue,
        #[wasm_bindgen(unchecked_param_type = "number")] length: JsValue,
    ) -> Result<Vec<u8>, JsValue> {
        let name = string_arg("name", &name)?;
        let index = u32_arg("index", &index)?;
        let length = u32_arg("length", &length)?;
        self.doc
            .delete(&name, index, length)
            .map_err(|e| js_error("RangeError", e))
    }

    /// Applies a Yjs v1 update. Throws `InvalidUpdate` for bytes that are not one, or that Yjs
    /// itself would not apply (the message says what and at which byte).
    #[wasm_bindgen(js_name = applyUpdate)]
    pub fn apply_update(
        &self,
        #[wasm_bindgen(unchecked_param_type = "Uint8Array")] update: JsValue,
    ) -> Result<(), JsValue> {
        let update = bytes_arg("update", &update)?;
        self.doc
            .apply_update(&update)
            .map_err(|e| js_error("InvalidUpdate", e))
    }

    /// The content of the text `name`.
    pub fn text(
        &self,
        #[wasm_bindgen(unchecked_param_type = "string")] name: JsValue,
    ) -> Result<String, JsValue> {
        Ok(self.doc.text(&string_arg("name", &name)?))
    }

    /// This document's version, as a Yjs state vector.
    #[wasm_bindgen(js_name = stateVector)]
    pub fn state_vector(&self) -> Vec<u8> {
        self.doc.state_vector()
    }

    /// What the state vector `remote` lacks, as a Yjs v1 update.
    pub fn diff(
        &self,
        #[wasm_bindgen(unchecked_param_type = "Uint8Array")] remote: JsValue,
    ) -> Result<Vec<u8>, JsValue> {
        let remote = bytes_arg("remote", &remote)?;
        self.doc
            .diff(&remote)
            .map_err(|e| js_error("InvalidStateVector", e))
    }

    /// The whole document as one Yjs v1 update.
    pub fn snapshot(&self) -> Vec<u8> {
        self.doc.snapshot()
    }

    /// A 64-bit digest of every text, as 16 hex digits: equal versions must have equal digests.
    pub fn digest(&self) -> String {
        format!("{:016x}", self.doc.digest())
    }
}
