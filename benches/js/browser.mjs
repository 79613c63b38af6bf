// The browser side of the benchmarks, in headless Chromium (Debian's, driven by playwright-core):
// applying the automerge-paper trace through pattern-mesh's package and through Yjs in the same
// page, and the pattern value through the package against the seed's algorithm as written.
// Usage: node benches/js/browser.mjs BASE_URL [--quick]   (BASE_URL serves the repository root)
import { readFile, writeFile } from "node:fs/promises";
import { createRequire } from "node:module";
import { join } from "node:path";
import { fileURLToPath } from "node:url";

const root = fileURLToPath(new URL("../../", import.meta.url));
const here = join(root, "benches/js");
const require = createRequire(join(root, ".ci/package.json"));
const { chromium } = require("playwright-core");
const [base, flag] = process.argv.slice(2);
const quick = flag === "--quick";

// Yjs's ES module imports lib0 by bare specifiers: an import map resolves them in the page.
const lib0 = JSON.parse(await readFile(join(here, "node_modules/lib0/package.json"), "utf8"));
const imports = { yjs: "/benches/js/node_modules/yjs/dist/yjs.mjs" };
// The browser's ES module file of an export condition tree.
const pick = (value) => {
  if (typeof value === "string") return value;
  if (!value || typeof value !== "object") return undefined;
  for (const condition of ["browser", "module", "import", "default"]) {
    const found = pick(value[condition]);
    if (typeof found === "string" && found.endsWith(".js")) return found;
  }
  return undefined;
};
for (const [key, value] of Object.entries(lib0.exports)) {
  const target = pick(value);
  if (typeof target === "string" && target.endsWith(".js")) imports[`lib0${key.slice(1)}`] = `/benches/js/node_modules/lib0/${target.slice(2)}`;
}
await writeFile(join(here, "browser.html"), `<!doctype html><meta charset="utf-8"><title>benchmarks</title>
<script type="importmap">${JSON.stringify({ imports })}</script>
<script type="module">
  import * as Y from "yjs";
  import init, { SharedDocument, PatternGenerator } from "/pkg/pattern_mesh.js";
  await init();
  window.lib = { Y, SharedDocument, PatternGenerator };
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
  const { Y, SharedDocument, PatternGenerator } = window.lib;
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
  return {
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
console.log(`RESULT browser-trace txns=${results.trace.txns} ours_ms=${results.trace.oursMs.toFixed(0)} yjs_ms=${results.trace.yjsMs.toFixed(0)}`);
console.log(`RESULT browser-pattern steps=${results.pattern.steps} seed_ns=${results.pattern.seedNs.toFixed(1)} seed_cached_ns=${results.pattern.seedCachedNs.toFixed(1)} seed_cache_entries=${results.pattern.seedCacheEntries} ours_ns=${results.pattern.oursNs.toFixed(1)}`);
