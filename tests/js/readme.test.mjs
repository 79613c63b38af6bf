// Runs the README's JS example as written (its import and init lines swapped for a Node loader),
// and checks what it printed and returned, so the README cannot drift from the package.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";

const root = new URL("../../", import.meta.url);
const mesh = await import(new URL("pkg/pattern_mesh.js", root));
mesh.initSync({ module: await readFile(new URL("pkg/pattern_mesh_bg.wasm", root)) });

test("the README's JS example works as written", async () => {
  const readme = await readFile(new URL("README.md", root), "utf8");
  const section = readme.split("## The JS API")[1];
  assert.ok(section, "the README has a JS API section");
  const example = section.match(/```js\n([\s\S]*?)```/)[1];
  const body = example
    .split("\n")
    .filter((line) => !line.startsWith("import ") && line.trim() !== "await init();")
    .join("\n");
  const logged = [];
  const names = ["PatternGenerator", "StepClock", "Validator", "encode", "decode"];
  const AsyncFunction = (async () => {}).constructor;
  const run = new AsyncFunction(...names, "console", `${body}\nreturn { frame, validator, clock };`);
  const { frame, validator, clock } = await run(...names.map((n) => mesh[n]), {
    log: (...args) => logged.push(args.join(" ")),
  });
  assert.deepEqual(logged, ["checkpoint: phase 1 at step 100"]);
  assert.deepEqual(frame, { kind: "data", sender: 2, step: 100, pattern: 7, data: { temperature: 23.5 } });
  assert.equal(clock.local, 100);
  const counts = validator.counts();
  assert.equal(counts.accepted, 1);
  assert.equal(counts.replay, 1);
});
