// The demo editor's textarea binding (www/binding.js) against a model text, in Node: local
// edits reach the text as splices that never cut a surrogate pair, and remote deltas land in
// the textarea with the caret moved around them.
import { test } from "node:test";
import assert from "node:assert/strict";
import { bindTextarea } from "../../www/binding.js";

// Just enough of a textarea: value, selection, setRangeText("preserve"), input listeners.
class FakeTextarea {
  constructor() { this.value = ""; this.selectionStart = 0; this.selectionEnd = 0; this.listeners = []; }
  addEventListener(_, fn) { this.listeners.push(fn); }
  removeEventListener(_, fn) { this.listeners = this.listeners.filter((f) => f !== fn); }
  type(next) { this.value = next; for (const fn of this.listeners) fn(); }
  setRangeText(chunk, start, end) {
    const shift = (at) => (at > end ? at + chunk.length - (end - start) : at > start ? start : at);
    this.value = this.value.slice(0, start) + chunk + this.value.slice(end);
    this.selectionStart = shift(this.selectionStart);
    this.selectionEnd = shift(this.selectionEnd);
  }
}

// A text that refuses half a surrogate pair, as the shared document would store U+FFFD.
class ModelText {
  constructor(initial = "") { this.value = initial; this.observers = []; }
  check(chunk) { assert.ok(chunk.isWellFormed(), `a lone surrogate reached the text: ${JSON.stringify(chunk)}`); }
  insert(at, chunk) { this.check(chunk); this.check(this.value.slice(0, at)); this.value = this.value.slice(0, at) + chunk + this.value.slice(at); }
  delete(at, length) { this.check(this.value.slice(0, at)); this.check(this.value.slice(at, at + length)); this.value = this.value.slice(0, at) + this.value.slice(at + length); }
  toString() { return this.value; }
  observe(fn) { this.observers.push(fn); return () => {}; }
  remote(delta, result) { this.value = result; for (const fn of this.observers) fn(delta, "remote"); }
}

test("local edits next to emoji never split a surrogate pair", () => {
  const editor = new FakeTextarea();
  const text = new ModelText("😀😃");
  bindTextarea(editor, text);
  editor.type("😃"); // delete the first emoji: both start with the same high surrogate
  assert.equal(text.toString(), "😃");
  editor.type("😁😃"); // insert an emoji before one that starts the same way
  assert.equal(text.toString(), "😁😃");
  editor.type("😁😃😄😃"); // and after, before another that ends the same way
  assert.equal(text.toString(), "😁😃😄😃");
  editor.type("a😁😃😄😃b");
  assert.equal(text.toString(), "a😁😃😄😃b");
});

test("remote deltas land in the textarea and move the caret", () => {
  const editor = new FakeTextarea();
  const text = new ModelText("hello world");
  const seen = [];
  bindTextarea(editor, text, { onRemote: (inserted) => seen.push(inserted) });
  editor.selectionStart = editor.selectionEnd = 6; // before "world"
  text.remote([{ insert: ">> " }], ">> hello world");
  assert.equal(editor.value, ">> hello world");
  assert.equal(editor.selectionStart, 9);
  text.remote([{ retain: 3 }, { delete: 6 }], ">> world");
  assert.equal(editor.value, ">> world");
  assert.equal(editor.selectionStart, 3);
  assert.deepEqual(seen, [[">> "], []]);
  // Local typing after remote changes splices the right place.
  editor.type(">> new world");
  assert.equal(text.toString(), ">> new world");
});
