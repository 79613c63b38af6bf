// Updates made by pattern-mesh's document apply in a plain-JS Yjs document from npm, and the
// reverse: the two speak the same Yjs v1 update format.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import { createRequire } from "node:module";

const root = new URL("../../", import.meta.url);
const require = createRequire(new URL(".ci/package.json", root));
const Y = require("yjs");
const mesh = await import(new URL("pkg/pattern_mesh.js", root));
mesh.initSync({ module: await readFile(new URL("pkg/pattern_mesh_bg.wasm", root)) });

test("an update from SharedDocument applies in a Yjs document", () => {
  const ours = new mesh.SharedDocument();
  const ydoc = new Y.Doc();
  Y.applyUpdate(ydoc, ours.insert("content", 0, "hello wörld 😀"));
  Y.applyUpdate(ydoc, ours.delete("content", 5, 1));
  assert.equal(ydoc.getText("content").toString(), "hellowörld 😀");
  assert.equal(ours.text("content"), "hellowörld 😀");
});

test("an update from Yjs applies in SharedDocument, and concurrent edits converge", () => {
  const ydoc = new Y.Doc();
  const ours = new mesh.SharedDocument();
  ydoc.getText("content").insert(0, "from yjs");
  ours.applyUpdate(Y.encodeStateAsUpdate(ydoc));
  assert.equal(ours.text("content"), "from yjs");

  // Concurrent edits on both sides, exchanged by state-vector diffs.
  ydoc.getText("content").insert(0, "[Y] ");
  ours.insert("content", 8, " [ours]");
  ours.applyUpdate(Y.encodeStateAsUpdate(ydoc, ours.stateVector()));
  Y.applyUpdate(ydoc, ours.diff(Y.encodeStateVector(ydoc)));
  assert.equal(ours.text("content"), ydoc.getText("content").toString());
  assert.equal(ours.text("content"), "[Y] from yjs [ours]");
});

test("bytes that are not an update throw InvalidUpdate", () => {
  const ours = new mesh.SharedDocument();
  assert.throws(() => ours.applyUpdate(new Uint8Array([255, 255, 255])), { name: "InvalidUpdate" });
  assert.throws(() => ours.insert("content", 3, "x"), { name: "RangeError", message: /past the end/ });
});

// An item whose origin or right origin lies in a collected (GC) range, its other neighbour a
// live character (no Yjs client writes one; a hostile member can): Yjs collects it. yrs placed
// it next to its other neighbour, so the relay and every SharedDocument showed a character no
// Yjs tab did, under the same state vector. Both now hold the same document.
test("an item next to a collected range ends the same in Yjs and in SharedDocument", () => {
  const writer = new Y.Doc();
  writer.clientID = 7;
  writer.getText("content").insert(0, "hello");
  const hello = Y.encodeStateAsUpdate(writer);
  // Client 9: a GC range at clock 0, then "z" at clock 1 between it and client 7's clock 2;
  // and the other way round.
  const updates = [
    [1, 2, 9, 0, 0, 1, 0xc4, 9, 0, 7, 2, 1, 0x7a, 0],
    [1, 2, 9, 0, 0, 1, 0xc4, 7, 2, 9, 0, 1, 0x7a, 0],
  ];
  for (const bytes of updates) {
    const update = new Uint8Array(bytes);
    const ydoc = new Y.Doc();
    Y.applyUpdate(ydoc, hello);
    Y.applyUpdate(ydoc, update);
    const ours = new mesh.SharedDocument();
    ours.applyUpdate(hello);
    ours.applyUpdate(update);
    assert.equal(ydoc.getText("content").toString(), "hello", `${bytes}`);
    assert.equal(ours.text("content"), "hello", `${bytes}`);
    assert.deepEqual(ours.stateVector(), Y.encodeStateVector(ydoc), `${bytes}`);
    const loaded = new Y.Doc();
    Y.applyUpdate(loaded, ours.snapshot());
    assert.deepEqual(Y.encodeStateAsUpdate(loaded), Y.encodeStateAsUpdate(ydoc), `${bytes}`);
    ours.free();
  }
});

// An item that goes on from a clock its document holds collected (a GC range at client 9's
// clock 0, then "zz" at its clocks 0..2): Yjs integrates the new part after the collected
// clock, and throws. The relay takes no such update from a member
// (`an_item_that_continues_a_collected_range_is_refused` in crates/core/src/doc/shared.rs);
// this is why.
test("Yjs fails on an item that goes on from a collected clock, which the relay refuses", () => {
  const writer = new Y.Doc();
  writer.clientID = 7;
  writer.getText("content").insert(0, "hello");
  const content = [...new TextEncoder().encode("content")];
  for (const bytes of [
    [1, 1, 9, 0, 0x04, 1, 7, ...content, 2, 0x7a, 0x7a, 0],
    [1, 1, 9, 0, 0x84, 7, 1, 2, 0x7a, 0x7a, 0],
  ]) {
    const ydoc = new Y.Doc();
    Y.applyUpdate(ydoc, Y.encodeStateAsUpdate(writer));
    Y.applyUpdate(ydoc, new Uint8Array([1, 1, 9, 0, 0, 1, 0]));
    assert.throws(() => Y.applyUpdate(ydoc, new Uint8Array(bytes)), TypeError, `${bytes}`);
  }
});

// Every update the fuzzer kept for the document (4,300 inputs, most of them malformed on
// purpose): what pattern-mesh applies, Yjs applies too, and what it then writes loads in Yjs.
// The relay applies or checks every update with the same check, so nothing it lets into a room
// can make a Yjs tab refuse an update or load an empty snapshot.
test("every update the document accepts from the fuzzing corpus applies in Yjs, and so does its snapshot", async () => {
  const { readdir } = await import("node:fs/promises");
  const dir = new URL("crates/core/fuzz/corpus/document/", root);
  const names = (await readdir(dir)).sort();
  const quiet = [console.error, console.warn];
  console.error = console.warn = () => {};
  const disagreements = [];
  let accepted = 0;
  try {
    for (const name of names) {
      const update = await readFile(new URL(name, dir));
      const ours = new mesh.SharedDocument();
      try {
        ours.applyUpdate(update);
      } catch (e) {
        assert.equal(e.name, "InvalidUpdate", `${name}: ${e}`);
        continue;
      }
      accepted++;
      for (const [what, bytes] of [["the update", update], ["its snapshot", ours.snapshot()]]) {
        try {
          Y.applyUpdate(new Y.Doc(), bytes);
        } catch (e) {
          disagreements.push(`${name}: Yjs refuses ${what}: ${e}`);
        }
      }
      ours.free();
    }
  } finally {
    [console.error, console.warn] = quiet;
  }
  console.log(`RESULT yjs-agreement inputs=${names.length} accepted=${accepted} disagreements=${disagreements.length}`);
  assert.ok(accepted > 900, `${accepted} of ${names.length} inputs accepted`);
  assert.deepEqual(disagreements.slice(0, 10), []);
});
