// The demo end to end: real relay, real headless Chromium pages (playwright-core driving
// Debian's chromium), real typing. Screenshots go to tests/artifacts/ (ignored by git).
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtemp, mkdir, rm } from "node:fs/promises";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { createRequire } from "node:module";

const root = fileURLToPath(new URL("../../", import.meta.url));
const require = createRequire(join(root, ".ci/package.json"));
const { chromium } = require("playwright-core");
const artifacts = join(root, "tests/artifacts");

let dir, port, relay, browser;

const freePort = () => new Promise((resolve) => {
  const server = createServer();
  server.listen(0, "127.0.0.1", () => {
    const { port } = server.address();
    server.close(() => resolve(port));
  });
});

async function startRelay() {
  relay = spawn(join(root, "target/debug/pattern-mesh-relay"), [
    "--listen", `127.0.0.1:${port}`, "--www", join(root, "www"), "--pkg", join(root, "pkg"),
    "--data-dir", join(dir, "data"),
  ], { stdio: ["ignore", "pipe", "inherit"] });
  await new Promise((resolve, reject) => {
    relay.stdout.on("data", (chunk) => { if (String(chunk).includes("relay on")) resolve(); });
    relay.on("exit", (code) => reject(new Error(`the relay exited with ${code}`)));
  });
}

function killRelay() {
  return new Promise((resolve) => {
    relay.once("exit", resolve);
    relay.kill("SIGKILL");
  });
}

before(async () => {
  dir = await mkdtemp(join(tmpdir(), "pattern-mesh-e2e-"));
  await mkdir(artifacts, { recursive: true });
  port = await freePort();
  await startRelay();
  browser = await chromium.launch({
    executablePath: "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking"],
  });
});

after(async () => {
  await browser?.close();
  relay?.kill("SIGKILL");
  if (dir) await rm(dir, { recursive: true, force: true });
});

async function open(path) {
  const page = await browser.newPage({ viewport: { width: 1200, height: 800 } });
  page.problems = [];
  page.on("pageerror", (e) => page.problems.push(e.message));
  page.on("console", (m) => { if (m.type() === "error") page.problems.push(m.text()); });
  await page.goto(`http://127.0.0.1:${port}/${path}`);
  await page.waitForSelector("body[data-ready=true]");
  return page;
}

const textOf = (page) => page.evaluate(() => document.getElementById("editor").value);
const sharedOf = (page) => page.evaluate(() => window.meshText.toString());

async function waitForText(page, predicate, what) {
  const deadline = Date.now() + 20_000;
  let last;
  while (Date.now() < deadline) {
    last = await textOf(page);
    if (predicate(last)) return last;
    await new Promise((r) => setTimeout(r, 100));
  }
  assert.fail(`${what}: last text ${JSON.stringify(last)}`);
}

async function placeCursor(page, at) {
  await page.focus("#editor");
  await page.evaluate((at) => {
    const editor = document.getElementById("editor");
    const index = at === "end" ? editor.value.length : at;
    editor.setSelectionRange(index, index);
  }, at);
}

test("two pages type concurrently at different positions and converge, a late joiner and a reload see the text", async () => {
  const room = `e2e-${Date.now()}`;
  const a = await open(`textarea.html?room=${room}`);
  const b = await open(`textarea.html?room=${room}`);
  await placeCursor(a, 0);
  await a.keyboard.type("|middle|");
  await waitForText(b, (t) => t === "|middle|", "b sees a's first words");
  const fromA = "alpha typed at the start. ";
  const fromB = " bravo typed at the end.";
  await placeCursor(a, 0);
  await placeCursor(b, "end");
  await Promise.all([a.keyboard.type(fromA, { delay: 15 }), b.keyboard.type(fromB, { delay: 15 })]);
  const expected = fromA + "|middle|" + fromB;
  await waitForText(a, (t) => t === expected, "a converges");
  await waitForText(b, (t) => t === expected, "b converges");
  assert.equal(await sharedOf(a), expected);

  const late = await open(`textarea.html?room=${room}`);
  assert.equal(await textOf(late), expected, "a late joiner gets the whole text");
  assert.equal(await late.evaluate(() => document.querySelectorAll("#peers li").length), 2, "the late joiner lists both peers");
  await b.reload();
  await b.waitForSelector("body[data-ready=true]");
  assert.equal(await textOf(b), expected, "a reload keeps the text");
  await a.screenshot({ path: join(artifacts, "editor.png") });
  for (const p of [a, b, late]) assert.deepEqual(p.problems, []);
  await Promise.all([a.close(), b.close(), late.close()]);
});

test("the relay is killed and restarted while both pages type: nothing typed is lost", async () => {
  const room = `e2e-kill-${Date.now()}`;
  const a = await open(`textarea.html?room=${room}`);
  const b = await open(`textarea.html?room=${room}`);
  await placeCursor(a, 0);
  await a.keyboard.type("[a]");
  await waitForText(b, (t) => t === "[a]", "b sees a");
  await placeCursor(b, "end");
  await placeCursor(a, 0);
  const fromA = "abcdefghijklmnopqrstuvwxyz0123456789";
  const fromB = "ABCDEFGHIJKLMNOPQRSTUVWXYZ9876543210";
  const typing = Promise.all([a.keyboard.type(fromA, { delay: 40 }), b.keyboard.type(fromB, { delay: 40 })]);
  await new Promise((r) => setTimeout(r, 500));
  await killRelay();
  await new Promise((r) => setTimeout(r, 600));
  await startRelay();
  await typing;
  const expected = fromA + "[a]" + fromB;
  await waitForText(a, (t) => t === expected, "a has everything after the restart");
  await waitForText(b, (t) => t === expected, "b has everything after the restart");
  const offline = await a.evaluate(() => window.meshClient.status);
  assert.equal(offline, "open");
  await Promise.all([a.close(), b.close()]);
});

test("the tamper control produces anomalies in the other page's panel and changes no text", async () => {
  const room = `e2e-tamper-${Date.now()}`;
  const a = await open(`textarea.html?room=${room}`);
  const b = await open(`textarea.html?room=${room}`);
  await placeCursor(a, 0);
  await a.keyboard.type("untouched");
  await waitForText(b, (t) => t === "untouched", "b sees the text");
  await a.click("#tamper-pattern");
  await a.click("#tamper-replay");
  await b.waitForSelector('#counts tr[data-reason="local:patternMismatch"]');
  await b.waitForSelector('#counts tr[data-reason="local:replay"]');
  await a.waitForSelector('#counts tr[data-reason="relay:patternMismatch"]');
  const log = await b.evaluate(() => document.getElementById("log").textContent);
  assert.match(log, /local patternMismatch/);
  assert.equal(await textOf(b), "untouched");
  assert.equal(await textOf(a), "untouched");
  await b.screenshot({ path: join(artifacts, "editor-anomalies.png") });
  await Promise.all([a.close(), b.close()]);
});

test("a new name typed in one page's name field shows in the other page's peer list", async () => {
  const room = `e2e-rename-${Date.now()}`;
  const a = await open(`textarea.html?room=${room}`);
  const b = await open(`textarea.html?room=${room}`);
  const node = await a.evaluate(() => window.meshClient.node);
  await a.fill("#name", "grace hopper");
  await a.dispatchEvent("#name", "change");
  await b.waitForFunction((node) => [...document.querySelectorAll("#peers li")]
    .some((li) => li.textContent === `grace hopper (node ${node})`), node);
  for (const p of [a, b]) assert.deepEqual(p.problems, []);
  await Promise.all([a.close(), b.close()]);
});

test("in the game, two pages move their pieces and each sees the other's position", async () => {
  const room = `e2e-game-${Date.now()}`;
  const a = await open(`game.html?room=${room}`);
  const b = await open(`game.html?room=${room}`);
  const nodeOf = (p) => p.evaluate(() => window.game.client.node);
  const [na, nb] = [await nodeOf(a), await nodeOf(b)];
  const seen = (p, node) => p.evaluate((node) => window.game.players.get(node) ?? null, node);
  const mine = (p) => p.evaluate(() => ({ x: Math.round(window.game.me.x), y: Math.round(window.game.me.y) }));
  await a.focus("#board");
  await a.keyboard.down("ArrowRight");
  await new Promise((r) => setTimeout(r, 400));
  await a.keyboard.up("ArrowRight");
  await b.focus("#board");
  await b.keyboard.down("ArrowDown");
  await new Promise((r) => setTimeout(r, 400));
  await b.keyboard.up("ArrowDown");
  await new Promise((r) => setTimeout(r, 300));
  const [ma, mb] = [await mine(a), await mine(b)];
  const deadline = Date.now() + 10_000;
  let aSeesB, bSeesA;
  while (Date.now() < deadline) {
    [aSeesB, bSeesA] = [await seen(a, nb), await seen(b, na)];
    if (aSeesB?.x === mb.x && aSeesB?.y === mb.y && bSeesA?.x === ma.x && bSeesA?.y === ma.y) break;
    await new Promise((r) => setTimeout(r, 100));
  }
  assert.deepEqual(bSeesA, ma, "b sees a where a is");
  assert.deepEqual(aSeesB, mb, "a sees b where b is");
  await a.screenshot({ path: join(artifacts, "game.png") });
  for (const p of [a, b]) assert.deepEqual(p.problems, []);
  await Promise.all([a.close(), b.close()]);
});

test("keystroke to remote screen: measured over a few hundred keystrokes", async () => {
  const room = `e2e-latency-${Date.now()}`;
  const a = await open(`textarea.html?room=${room}`);
  const b = await open(`textarea.html?room=${room}`);
  await b.evaluate(() => {
    window.arrivals = [];
    window.meshText.observe((delta, origin) => {
      if (origin !== "remote") return;
      const now = performance.timeOrigin + performance.now();
      for (const op of delta) if ("insert" in op) for (const _ of op.insert) window.arrivals.push(now);
    });
  });
  await a.evaluate(() => {
    window.sent = [];
    document.getElementById("editor").addEventListener("input", () => window.sent.push(performance.timeOrigin + performance.now()));
  });
  await placeCursor(a, 0);
  const keystrokes = 300;
  await a.keyboard.type("x".repeat(keystrokes), { delay: 20 });
  await waitForText(b, (t) => t.length === keystrokes, "b receives every keystroke");
  const sent = await a.evaluate(() => window.sent);
  const arrivals = await b.evaluate(() => window.arrivals);
  assert.equal(sent.length, keystrokes);
  assert.equal(arrivals.length, keystrokes);
  const delays = sent.map((t, i) => arrivals[i] - t).sort((x, y) => x - y);
  const at = (p) => delays[Math.min(delays.length - 1, Math.round((delays.length - 1) * p))];
  console.log(`keystroke to remote screen over ${keystrokes} keystrokes: median ${at(0.5).toFixed(1)} ms, p99 ${at(0.99).toFixed(1)} ms, max ${at(1).toFixed(1)} ms`);
  await Promise.all([a.close(), b.close()]);
});
