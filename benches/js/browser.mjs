// The browser side of the benchmarks, in headless Chromium (Debian's, driven by playwright-core):
// applying the automerge-paper trace through pattern-mesh's package and through Yjs in the same
// page, and the pattern value through the package against the seed's algorithm as written.
// Usage: node benches/js/browser.mjs BASE_URL [--quick]   (BASE_URL serves the repository root)
import { writeFile } from "node:fs/promises";
import { createRequire } from "node:module";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { importMap } from "./importmap.mjs";

const root = fileURLToPath(new URL("../../", import.meta.url));
const here = join(root, "benches/js");
const require = createRequire(join(root, ".ci/package.json"));
const { chromium } = require("playwright-core");
const [base, flag] = process.argv.slice(2);
const quick = flag === "--quick";

const imports = await importMap(here);
await writeFile(join(here, "browser.html"), `<!doctype html><meta charset="utf-8"><title>benchmarks</title>
<script type="importmap">${JSON.stringify(imports)}</script>
<script type="module">
  import * as Y from "yjs";
  import init, { SharedDocument, PatternGenerator, Validator, encode, decode } from "/pkg/pattern_mesh.js";
  await init();
  window.lib = { Y, SharedDocument, PatternGenerator, Validator, encode, decode };
  window.ready = true;
</script>`);

const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking"],
});
const page = await browser.newPage();
page.on("pageerror", (e) => { console.error(e); process.exitCode = 1; });
await page.goto(`${base}/benches/js/browser.html`);
await page.waitForFunction(() => window.ready === true, null, { timeout: 30_000 });

const results = await page.evaluate(async (quick) => {
  const { Y, SharedDocument, PatternGenerator, Validator, encode, decode } = window.lib;
  const response = await fetch("/tests/data/editing-traces/automerge-paper.json.gz");
  const trace = await new Response(response.body.pipeThrough(new DecompressionStream("gzip"))).json();
  const txns = quick ? trace.txns.slice(0, 2_000) : trace.txns;

  const ours = () => {
    const doc = new SharedDocument();
    const started = performance.now();
    for (const txn of txns) {
      for (const [pos, del, ins] of txn.patches) {
        if (del > 0) doc.delete("content", pos, del);
        if (ins.length > 0) doc.insert("content", pos, ins);
      }
    }
    return { ms: performance.now() - started, text: doc.text("content") };
  };
  const yjs = () => {
    const doc = new Y.Doc();
    const text = doc.getText("content");
    const updates = [];
    doc.on("update", (u) => updates.push(u.length)); // as a client sending each edit would
    const started = performance.now();
    for (const txn of txns) {
      doc.transact(() => {
        for (const [pos, del, ins] of txn.patches) {
          if (del > 0) text.delete(pos, del);
          if (ins.length > 0) text.insert(pos, ins);
        }
      });
    }
    return { ms: performance.now() - started, text: text.toString() };
  };
  const a = ours();
  const b = yjs();
  const traceResult = {
    txns: txns.length,
    oursMs: a.ms,
    yjsMs: b.ms,
    same: a.text === b.text && (quick || a.text === trace.endContent),
  };

  // The seed's algorithm as written: a Map cache and String(num).split('') digit sums.
  class SeedPatternGenerator {
    constructor() { this.cache = new Map(); this.seed = 7; this.multiplier = 7; this.resetInterval = 100; }
    collapseDigits(num) {
      const sum = String(num).split("").reduce((acc, digit) => acc + parseInt(digit), 0);
      return sum > 9 ? this.collapseDigits(sum) : sum;
    }
    calculatePattern(step) {
      let value = this.seed;
      for (let s = step - (step % this.resetInterval) + 1; s <= step; s++) value = this.collapseDigits(value * this.multiplier);
      return value;
    }
    computeValue(step) {
      if (this.cache.has(step)) return this.cache.get(step);
      const value = this.calculatePattern(step);
      this.cache.set(step, value);
      return value;
    }
  }
  const steps = quick ? 20_000 : 1_000_000;
  const time = (f) => { const t = performance.now(); let x = 0; for (let s = 0; s < steps; s++) x += f(s); return [performance.now() - t, x]; };
  const seed = new SeedPatternGenerator();
  const [seedMs, seedSum] = time((s) => seed.computeValue(s));
  const [seedCachedMs] = time((s) => seed.computeValue(s));
  const generator = new PatternGenerator();
  const [oursPatternMs, oursSum] = time((s) => generator.computeValue(s));

  // A message's way through each: the seed's object as JSON text (its `network.broadcast` and
  // its check `message.patternValue === computeValue(message.globalStep)`, on the Map-cached
  // generator), against our frame as bytes and the Validator, which also applies the replay,
  // future-step and sender rules.
  const messages = quick ? 2_000 : 200_000;
  const perCall = (f) => { const t = performance.now(); let x = 0; for (let i = 0; i < messages; i++) x += f(i); return [((performance.now() - t) * 1e6) / messages, x]; };
  const payload = { temperature: 23.5, unit: "C", sensor: "north-3" };
  const seedMessage = (i) => ({ senderId: `node-${2 + (i % 1000)}`, globalStep: i + 1, patternValue: seed.computeValue(i + 1), data: payload });
  const ourFrame = (i) => ({ kind: "data", sender: 2 + (i % 1000), step: i + 1, pattern: generator.computeValue(i + 1), data: payload });
  const seedTexts = Array.from({ length: messages }, (_, i) => JSON.stringify(seedMessage(i)));
  const ourBytes = Array.from({ length: messages }, (_, i) => encode(ourFrame(i)));
  const validator = new Validator();
  const [seedEncodeNs] = perCall((i) => JSON.stringify(seedMessage(i)).length);
  const [oursEncodeNs] = perCall((i) => encode(ourFrame(i)).length);
  const [seedDecodeNs] = perCall((i) => JSON.parse(seedTexts[i]).globalStep);
  const [oursDecodeNs] = perCall((i) => decode(ourBytes[i]).step);
  const [seedValidateNs, seedValid] = perCall((i) => { const m = JSON.parse(seedTexts[i]); return m.patternValue === seed.computeValue(m.globalStep) ? 1 : 0; });
  const [oursValidateNs, oursValid] = perCall((i) => (validator.check(ourBytes[i], { receiver: 1 }, i + 1).accepted ? 1 : 0));
  return {
    messages: {
      count: messages,
      bytesSeed: seedTexts[0].length,
      bytesOurs: ourBytes[0].length,
      seedEncodeNs, oursEncodeNs, seedDecodeNs, oursDecodeNs, seedValidateNs, oursValidateNs,
      allValid: seedValid === messages && oursValid === messages,
    },
    trace: traceResult,
    pattern: {
      steps,
      seedNs: (seedMs * 1e6) / steps,
      seedCachedNs: (seedCachedMs * 1e6) / steps,
      seedCacheEntries: seed.cache.size,
      oursNs: (oursPatternMs * 1e6) / steps,
      agree: seedSum === oursSum,
    },
  };
}, quick);
await browser.close();
if (!results.trace.same) throw new Error("the two documents disagree after the trace");
if (!results.pattern.agree) throw new Error("the seed's algorithm and the package disagree");
if (!results.messages.allValid) throw new Error("a well-formed message failed validation");
console.log(`RESULT browser-trace txns=${results.trace.txns} ours_ms=${results.trace.oursMs.toFixed(0)} yjs_ms=${results.trace.yjsMs.toFixed(0)}`);
console.log(`RESULT browser-pattern steps=${results.pattern.steps} seed_ns=${results.pattern.seedNs.toFixed(1)} seed_cached_ns=${results.pattern.seedCachedNs.toFixed(1)} seed_cache_entries=${results.pattern.seedCacheEntries} ours_ns=${results.pattern.oursNs.toFixed(1)}`);
const m = results.messages;
console.log(`RESULT browser-messages count=${m.count} seed_bytes=${m.bytesSeed} ours_bytes=${m.bytesOurs} seed_encode_ns=${m.seedEncodeNs.toFixed(0)} ours_encode_ns=${m.oursEncodeNs.toFixed(0)} seed_decode_ns=${m.seedDecodeNs.toFixed(0)} ours_decode_ns=${m.oursDecodeNs.toFixed(0)} seed_validate_ns=${m.seedValidateNs.toFixed(0)} ours_validate_ns=${m.oursValidateNs.toFixed(0)}`);
