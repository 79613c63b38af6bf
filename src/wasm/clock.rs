//! `StepClock`: a node's room clock, with phase listeners.

use std::cell::RefCell;
use std::rc::Rc;

use wasm_bindgen::prelude::*;

use super::errors::{invalid_argument, js_error, to_f64, to_u64};
use super::frames::Object;
use super::pattern::pattern_from_js;
use super::types::{JsAdvance, JsPatternParamsInit, JsPhaseListener, JsTick, JsUnsubscribe};
use crate::clock::{self, Advance};

type Listeners = Rc<RefCell<Vec<(u32, js_sys::Function)>>>;

/// A node's view of the room's global step.
///
/// ```js
/// const clock = new StepClock();
/// const off = clock.onPhase((phase, step) => console.log(`checkpoint: phase ${phase} at ${step}`));
/// clock.join(250);          // fast-forward to the room's high step from the welcome
/// const { step, pattern } = clock.next();   // 251, and its pattern value
/// clock.accept(300);        // a message ahead moves the clock by one: 252
/// off();
/// ```
#[wasm_bindgen]
pub struct StepClock {
    inner: clock::StepClock,
    listeners: Listeners,
    next_id: u32,
}

#[wasm_bindgen]
impl StepClock {
    /// A clock at step 0 for a room with these pattern parameters (defaults 7, 7, 100).
    #[wasm_bindgen(constructor)]
    pub fn new(pattern: Option<JsPatternParamsInit>) -> Result<StepClock, JsValue> {
        Ok(Self {
            inner: clock::StepClock::new(pattern_from_js(pattern)?),
            listeners: Rc::default(),
            next_id: 0,
        })
    }

    /// The highest step accepted or sent.
    #[wasm_bindgen(getter)]
    pub fn local(&self) -> Result<f64, JsValue> {
        to_f64("the step", self.inner.local())
    }

    /// The phase of the local step.
    #[wasm_bindgen(getter)]
    pub fn phase(&self) -> f64 {
        self.inner.phase() as f64
    }

    /// The step of the next checkpoint (phase boundary).
    #[wasm_bindgen(getter, js_name = nextCheckpoint)]
    pub fn next_checkpoint(&self) -> Result<f64, JsValue> {
        to_f64("the checkpoint", self.inner.next_checkpoint())
    }

    /// Takes the step to send at (`local + 1`) with its pattern value, and moves to it.
    // Not an iterator: the clock also moves on `accept` and `join`, and it can fail.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<JsTick, JsValue> {
        let (tick, advance) = self.inner.next().map_err(|e| js_error("RangeError", e))?;
        if tick.step > crate::pattern::MAX_SAFE_INTEGER {
            return Err(js_error("RangeError", "the step clock passed 2^53 - 1"));
        }
        self.notify(advance)?;
        Ok(JsValue::from(
            Object::new()
                .int("step", tick.step)?
                .int("pattern", tick.pattern)?,
        )
        .unchecked_into())
    }

    /// Records the step of an accepted message: a step above the clock moves it by one, whatever
    /// the step (the room step counts messages, so no sender can drag it).
    pub fn accept(&mut self, step: f64) -> Result<JsAdvance, JsValue> {
        let advance = self.inner.accept(to_u64("step", step)?);
        self.report(advance)
    }

    /// Fast-forwards to the room's high step, as given by the relay's welcome.
    pub fn join(&mut self, high: f64) -> Result<JsAdvance, JsValue> {
        let advance = self.inner.join(to_u64("high", high)?);
        self.report(advance)
    }

    /// Calls `listener(phase, step)` whenever the clock enters a new phase (a checkpoint).
    /// Returns a function that removes the listener.
    #[wasm_bindgen(js_name = onPhase)]
    pub fn on_phase(&mut self, listener: JsPhaseListener) -> Result<JsUnsubscribe, JsValue> {
        let listener: JsValue = listener.into();
        let function = listener
            .dyn_into::<js_sys::Function>()
            .map_err(|_| invalid_argument("onPhase needs a function"))?;
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        self.listeners.borrow_mut().push((id, function));
        let listeners = Rc::downgrade(&self.listeners);
        let off = Closure::<dyn FnMut()>::new(move || {
            if let Some(listeners) = listeners.upgrade() {
                listeners.borrow_mut().retain(|(i, _)| *i != id);
            }
        });
        Ok(off.into_js_value().unchecked_into())
    }
}

impl StepClock {
    fn report(&self, advance: Advance) -> Result<JsAdvance, JsValue> {
        self.notify(advance)?;
        let entered = match advance.entered_phase {
            Some(phase) => to_f64("the phase", phase)?.into(),
            None => JsValue::NULL,
        };
        Ok(JsValue::from(
            Object::new()
                .int("from", advance.from)?
                .int("to", advance.to)?
                .set("enteredPhase", &entered)?,
        )
        .unchecked_into())
    }

    fn notify(&self, advance: Advance) -> Result<(), JsValue> {
        let Some(phase) = advance.entered_phase else {
            return Ok(());
        };
        // Clone the list so that a listener may unsubscribe while it runs.
        let listeners: Vec<js_sys::Function> = self
            .listeners
            .borrow()
            .iter()
            .map(|(_, f)| f.clone())
            .collect();
        for listener in listeners {
            listener.call2(
                &JsValue::NULL,
                &JsValue::from_f64(phase as f64),
                &JsValue::from_f64(advance.to as f64),
            )?;
        }
        Ok(())
    }
}
