// Loads the released package in pkg/ (as built for users: release profile, after wasm-opt) and
// calls it from Node. `wasm-pack test` never runs wasm-opt, so an optimiser that corrupts the
// output only shows up here. Run with `node --test tests/js/` after `wasm-pack build`.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import { spawnSync } from "node:child_process";
import { fileURLToPath } from "node:url";

const pkg = new URL("../../pkg/", import.meta.url);
const mesh = await import(new URL("pattern_mesh.js", pkg));
mesh.initSync({ module: await readFile(new URL("pattern_mesh_bg.wasm", pkg)) });

test("the package initialises and computes the seed's table", () => {
  const p = new mesh.PatternGenerator();
  assert.deepEqual([0, 1, 2, 3, 4].map((s) => p.computeValue(s)), [7, 4, 1, 7, 4]);
  assert.deepEqual([100, 101, 102].map((s) => p.computeValue(s)), [7, 4, 1]);
  assert.equal(p.computeValue(47), 1, "the seed's 'step 47 -> 6' cannot happen with 7, 7");
  assert.equal(mesh.collapseDigits(157), 4);
  assert.deepEqual(p.params, { seed: 7, multiplier: 7, resetInterval: 100 });
});

test("frames round-trip through encode and decode", () => {
  const frame = { kind: "data", sender: 2, step: 47, pattern: 1, data: { temperature: 23.5 } };
  const bytes = mesh.encode(frame);
  assert.ok(bytes instanceof Uint8Array);
  assert.equal(bytes[0], 2, "wire format version 2");
  assert.deepEqual(mesh.decode(bytes), frame);
  // The relay marks stored messages with their log position (flag bit 1, then a varint).
  const positioned = new Uint8Array([2, bytes[1], 0b10, 5, ...bytes.slice(3)]);
  assert.deepEqual(mesh.decode(positioned), { ...frame, position: 5 });
});

test("the validator rejects a replay, a forged sender and a wrong pattern", () => {
  const v = new mesh.Validator();
  const me = { receiver: 1 };
  const frame = { kind: "data", sender: 2, step: 1, pattern: 4, data: null };
  assert.deepEqual(v.check(frame, me, 0), { accepted: true });
  assert.equal(v.check(mesh.encode(frame), me, 1).reason, "replay");
  assert.equal(v.check({ ...frame, sender: 1, step: 2, pattern: 1 }, me, 1).reason, "senderMismatch");
  assert.equal(v.check({ ...frame, step: 2, pattern: 9 }, me, 1).reason, "patternMismatch");
  assert.equal(v.counts().accepted, 1);
  assert.equal(v.counts().replay, 1);
});

test("bad input throws an Error that says what was wrong", () => {
  assert.throws(() => new mesh.PatternGenerator({ resetInterval: 0 }), {
    name: "ConfigError",
    message: /reset_interval must be at least 1/,
  });
  assert.throws(() => mesh.decode(new Uint8Array([1, 0x10, 0])), {
    name: "DecodeError",
    message: /unknown protocol version 1 \(this build speaks version 2\)/,
  });
  assert.throws(() => mesh.decode(new Uint8Array([2, 0x7f, 0])), {
    name: "DecodeError",
    message: /unknown frame kind 0x7f/,
  });
  assert.throws(() => new mesh.PatternGenerator().computeValue(-3), {
    name: "InvalidArgument",
  });
});

test("arguments of the wrong type or out of range throw InvalidArgument, and change nothing", () => {
  const doc = new mesh.SharedDocument();
  doc.insert("t", 0, "abcd");
  const cases = [
    [() => doc.insert("t", 1.5, "X"), /^index must be an integer from 0 to 4294967295, got the number 1.5$/],
    [() => doc.insert("t", "abc", "X"), /^index must be .*, got the string "abc"$/],
    [() => doc.insert("t", NaN, "X"), /got the number NaN$/],
    [() => doc.insert("t", 2 ** 32 + 3, "X"), /got the number 4294967299$/],
    [() => doc.insert("t", -1, "X"), /got the number -1$/],
    [() => doc.insert("t", 0, 42), /^chunk must be a string, got the number 42$/],
    [() => doc.insert("t", 0, null), /^chunk must be a string, got null$/],
    [() => doc.insert(7, 0, "x"), /^name must be a string, got the number 7$/],
    [() => doc.delete("t", 0, 1.5), /^length must be an integer from 0 to 4294967295, got the number 1.5$/],
    [() => doc.text(undefined), /^name must be a string, got undefined$/],
    [() => doc.applyUpdate("nope"), /^update must be a Uint8Array, got the string "nope"$/],
    [() => doc.diff({}), /^remote must be a Uint8Array, got an object$/],
    [() => mesh.decode([2, 0x10, 0]), /^bytes must be a Uint8Array, got an array$/],
  ];
  for (const [call, message] of cases) assert.throws(call, { name: "InvalidArgument", message });
  assert.equal(doc.text("t"), "abcd");
  assert.equal(doc.insert("t", 4, "!").constructor, Uint8Array, "valid arguments still work");
});

test("the clock fires phase listeners at checkpoints", () => {
  const clock = new mesh.StepClock();
  const seen = [];
  const off = clock.onPhase((phase, step) => seen.push([phase, step]));
  clock.join(99);
  assert.deepEqual(clock.next(), { step: 100, pattern: 7 });
  off();
  clock.join(300);
  assert.deepEqual(seen, [[1, 100]]);
});

test("the .d.ts compiles under tsc --strict, without skipLibCheck, as an application uses it", () => {
  const tsc = fileURLToPath(new URL("../../.ci/node_modules/.bin/tsc", import.meta.url));
  const usage = fileURLToPath(new URL("../types/usage.ts", import.meta.url));
  const run = spawnSync(tsc, ["--noEmit", "--strict", "--target", "es2022", "--module", "esnext",
    "--moduleResolution", "bundler", usage], { encoding: "utf8" });
  assert.equal(run.status, 0, `tsc failed:\n${run.stdout}${run.stderr}`);
});

test("the .d.ts types the public API without any", async () => {
  const dts = await readFile(new URL("pattern_mesh.d.ts", pkg), "utf8");
  for (const name of ["class PatternGenerator", "class StepClock", "class Validator", "export type Frame"]) {
    assert.ok(dts.includes(name), `${name} is declared`);
  }
  const code = dts
    .split("export type InitInput")[0]
    .replace(/\/\*[\s\S]*?\*\//g, "")
    .replace(/\/\/.*$/gm, "");
  assert.doesNotMatch(code, /\bany\b/, "no `any` in the public API");
});

test("package.json gets its repository from a public origin, and none from a local path", async () => {
  const { mkdtemp, writeFile, rm } = await import("node:fs/promises");
  const { tmpdir } = await import("node:os");
  const { join } = await import("node:path");
  const script = fileURLToPath(new URL("../../.ci/package-json.mjs", import.meta.url));
  const dir = await mkdtemp(join(tmpdir(), "pattern-mesh-package-json-"));
  const repository = async (origin) => {
    const file = join(dir, "package.json");
    await writeFile(file, JSON.stringify({ name: "pattern-mesh" }));
    const run = spawnSync(process.execPath, [script, file, origin], { encoding: "utf8" });
    assert.equal(run.status, 0, run.stderr);
    const pkg = JSON.parse(await readFile(file, "utf8"));
    assert.equal(pkg.exports["."].types, "./pattern_mesh.d.ts");
    return pkg.repository;
  };
  assert.deepEqual(await repository("https://example.org/team/pattern-mesh.git"),
    { type: "git", url: "git+https://example.org/team/pattern-mesh.git", directory: "pkg" });
  assert.deepEqual(await repository("git@example.org:team/pattern-mesh.git"),
    { type: "git", url: "git+ssh://git@example.org/team/pattern-mesh.git", directory: "pkg" });
  assert.equal(await repository("/home/me/pattern-mesh"), undefined);
  assert.equal(await repository(""), undefined);
  await rm(dir, { recursive: true, force: true });
});
