// Keystroke to remote screen: N headless Chromium pages (one browser context each) type into one
// shared document at a few characters a second each, through pattern-mesh's relay, the
// y-websocket server or Hocuspocus, with the same page and editor binding (typist.html). For every
// keystroke and every other page, the delay from the keystroke to the moment the other page's
// textarea holds it; p50/p99/p999 over the run and per third of it (drift), and a convergence
// check at the end. Measures and prints; fails only if the documents do not converge.
//
// Usage: node benches/js/keystrokes.mjs --target pattern-mesh|y-websocket|hocuspocus --ws URL
//          [--pages 16] [--seconds 180] [--rate 6] [--profile]
// --profile: also samples page 1's main thread with the browser's profiler during the middle
// third of the run and prints where its time went (self time by function) on stderr.
// URL: ws://HOST:PORT/ws for pattern-mesh, ws://HOST:PORT for y-websocket and Hocuspocus.
import { createServer } from "node:http";
import { readFile } from "node:fs/promises";
import { createRequire } from "node:module";
import { extname, join, normalize } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { importMap } from "./importmap.mjs";

const root = fileURLToPath(new URL("../../", import.meta.url));
const here = join(root, "benches/js");
const require = createRequire(join(root, ".ci/package.json"));
const { chromium } = require("playwright-core");

const { values: args } = parseArgs({
  options: {
    target: { type: "string" },
    ws: { type: "string" },
    pages: { type: "string", default: "16" },
    seconds: { type: "string", default: "180" },
    rate: { type: "string", default: "6" },
    profile: { type: "boolean", default: false },
  },
});
const target = args.target;
const pages = Number(args.pages), seconds = Number(args.seconds), rate = Number(args.rate);
if (!["pattern-mesh", "y-websocket", "hocuspocus"].includes(target) || !args.ws) {
  throw new Error("usage: keystrokes.mjs --target pattern-mesh|y-websocket|hocuspocus --ws URL [--pages N] [--seconds S] [--rate R]");
}
if (!(pages >= 2 && pages <= 26 && seconds > 0 && rate > 0)) {
  throw new Error("--pages must be 2 to 26 (one letter each), --seconds and --rate positive");
}

// The pages come from this process: the repository's pkg/, www/ (the demo's editor binding)
// and benches/js/ (with the import map put into typist.html), so both targets load the same way.
const page = (await readFile(join(here, "typist.html"), "utf8"))
  .replace("<!-- importmap -->", `<script type="importmap">${JSON.stringify(await importMap(here))}</script>`);
const types = { ".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm", ".html": "text/html" };
const server = createServer(async (request, response) => {
  const path = normalize(decodeURIComponent(new URL(request.url, "http://x").pathname));
  try {
    if (path === "/benches/js/typist.html") {
      response.writeHead(200, { "content-type": "text/html" }).end(page);
    } else if (["/pkg/", "/www/", "/benches/js/node_modules/"].some((dir) => path.startsWith(dir))) {
      const body = await readFile(join(root, path));
      response.writeHead(200, { "content-type": types[extname(path)] ?? "application/octet-stream" }).end(body);
    } else {
      response.writeHead(404).end();
    }
  } catch {
    response.writeHead(404).end();
  }
});
await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
const base = `http://127.0.0.1:${server.address().port}`;

const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking"],
});
const room = `keystrokes-${Date.now()}`;
const url = `${base}/benches/js/typist.html?${new URLSearchParams({ target, ws: args.ws, room })}`;
const typists = [];
for (let i = 0; i < pages; i++) {
  // A context each: separate tabs that share nothing but the server.
  const context = await browser.newContext();
  const p = await context.newPage();
  p.on("pageerror", (e) => { console.error(`page ${i}: ${e.message}`); process.exitCode = 1; });
  await p.goto(url);
  await p.waitForSelector("body[data-ready=true]", { timeout: 60_000 });
  typists.push(p);
}

const poll = async (what, check, timeoutMs) => {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (await check()) return true;
    await new Promise((r) => setTimeout(r, 100));
  }
  console.error(`timed out waiting for ${what}`);
  return false;
};

// One line per typist; typist i starts at the head of line i, with letter A + i.
await typists[0].evaluate((lines) => window.bench.seed(lines), pages);
await poll("the seed lines", async () => (await Promise.all(typists.map((p) => p.evaluate(() => window.bench.length())))).every((n) => n === pages), 30_000);
// The pages' clocks: performance.timeOrigin + now() against Date.now(), to check that times
// taken in different pages can be compared.
const skews = await Promise.all(typists.map((p) => p.evaluate(() => performance.timeOrigin + performance.now() - Date.now())));
const skew = Math.max(...skews) - Math.min(...skews);

const letter = (i) => String.fromCharCode(65 + i);
await Promise.all(typists.map((p, i) => p.evaluate(([r, l, c]) => window.bench.start(r, l, c), [rate, letter(i), i])));
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
if (args.profile) {
  const cdp = await typists[1].context().newCDPSession(typists[1]);
  await cdp.send("Profiler.enable");
  await cdp.send("Profiler.setSamplingInterval", { interval: 200 });
  await sleep((seconds * 1000) / 3);
  await cdp.send("Profiler.start");
  await sleep((seconds * 1000) / 3);
  const { profile } = await cdp.send("Profiler.stop");
  await sleep((seconds * 1000) / 3);
  const self = new Map();
  let total = 0;
  for (const node of profile.nodes) {
    const { functionName, url } = node.callFrame;
    const key = `${functionName || "(anonymous)"} ${url ? url.split("/").pop() : ""}`.trim();
    self.set(key, (self.get(key) ?? 0) + (node.hitCount ?? 0));
    total += node.hitCount ?? 0;
  }
  console.error(`PROFILE page 1, ${total} samples over ${(seconds / 3).toFixed(0)} s (self time):`);
  for (const [key, hits] of [...self].sort((a, b) => b[1] - a[1]).slice(0, 20)) {
    console.error(`PROFILE ${((100 * hits) / total).toFixed(1).padStart(5)}%  ${key}`);
  }
} else {
  await sleep(seconds * 1000);
}
await Promise.all(typists.map((p) => p.evaluate(() => window.bench.stop())));

const texts = async () => Promise.all(typists.map((p) => p.evaluate(() => [window.bench.text(), window.bench.sharedText()])));
const converged = await poll("convergence", async () => {
  const all = await texts();
  return all.every(([screen, doc]) => screen === all[0][0] && doc === all[0][0]);
}, 60_000);
const results = await Promise.all(typists.map((p) => p.evaluate(() => window.bench.results())));
const finalText = (await texts())[0][0];
await browser.close();
server.close();

// Latencies, each tagged with its keystroke's time since typing began.
const start = Math.min(...results.flatMap((r) => r.sent.slice(0, 1)));
const samples = [];
let missing = 0;
results.forEach((receiver, r) => {
  results.forEach((sender, s) => {
    if (r === s) return;
    const arrived = receiver.arrivals[letter(s)] ?? [];
    missing += Math.max(0, sender.sent.length - arrived.length);
    for (let n = 0; n < Math.min(arrived.length, sender.sent.length); n++) {
      samples.push([sender.sent[n] - start, arrived[n] - sender.sent[n]]);
    }
  });
});
const quantile = (sorted, q) => (sorted.length ? sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))] : NaN);
const summary = (list) => {
  const sorted = list.map(([, d]) => d).sort((a, b) => a - b);
  return { p50: quantile(sorted, 0.5), p99: quantile(sorted, 0.99), p999: quantile(sorted, 0.999), max: sorted.at(-1) };
};
const all = summary(samples);
const third = (seconds * 1000) / 3;
const thirds = [0, 1, 2].map((k) => summary(samples.filter(([t]) => t >= k * third && (k === 2 || t < (k + 1) * third))));
const keystrokes = results.reduce((n, r) => n + r.sent.length, 0);
const expectedLength = pages + keystrokes;
const ok = converged && finalText.length === expectedLength && missing === 0;
const f = (x) => x.toFixed(2);
console.log(
  `RESULT keystrokes-${target} pages=${pages} seconds=${seconds} rate=${rate} keystrokes=${keystrokes} ` +
  `typed_per_s=${f(keystrokes / seconds / pages)} deliveries=${samples.length} p50_ms=${f(all.p50)} p99_ms=${f(all.p99)} ` +
  `p999_ms=${f(all.p999)} max_ms=${f(all.max)} ` +
  `thirds_p50_ms=${thirds.map((t) => f(t.p50)).join("/")} thirds_p99_ms=${thirds.map((t) => f(t.p99)).join("/")} ` +
  `clock_skew_ms=${f(skew)} converged=${ok ? "yes" : "no"}`,
);
if (!ok) {
  console.error(`the documents did not converge: ${missing} keystrokes never appeared, final length ${finalText.length}, expected ${expectedLength}`);
  process.exitCode = 1;
}
