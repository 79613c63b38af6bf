// Many relays, one room, in real Chromium pages: two relays on one real Redis, a page on each,
// typing into one document; and a page given both relays whose first relay is killed.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { createRequire } from "node:module";
import { join } from "node:path";
import { root, startRedis, startRelay } from "../support/relay.mjs";

const require = createRequire(join(root, ".ci/package.json"));
const { chromium } = require("playwright-core");

let redis, browser;
const relays = [];

before(async () => {
  redis = await startRedis();
  for (let i = 0; i < 2; i++) relays.push(await startRelay({ PM_STORE: redis.url }));
  browser = await chromium.launch({
    executablePath: "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking"],
  });
});

after(async () => {
  await browser?.close();
  for (const relay of relays) await relay.stop();
  await redis?.stop();
});

async function open(base, query) {
  const page = await browser.newPage();
  page.problems = [];
  page.on("pageerror", (e) => page.problems.push(e.message));
  await page.goto(`${base}/textarea.html?${query}`);
  await page.waitForSelector("body[data-ready=true]");
  await page.focus("#editor");
  return page;
}

const textOf = (page) => page.evaluate(() => document.getElementById("editor").value);

async function waitFor(page, predicate, what) {
  const deadline = Date.now() + 20_000;
  let last;
  while (Date.now() < deadline) {
    last = await textOf(page);
    if (predicate(last)) return last;
    await new Promise((r) => setTimeout(r, 50));
  }
  assert.fail(`${what}; the text is ${JSON.stringify(last)}`);
}

test("two pages on two relays of one Redis edit one document and converge", async () => {
  const room = `scale-${Date.now()}`;
  const a = await open(relays[0].base, `room=${room}&persist=0&name=a`);
  const b = await open(relays[1].base, `room=${room}&persist=0&name=b`);
  const [fromA, fromB] = ["typed on the first relay. ", "typed on the second relay. "];
  await Promise.all([a.keyboard.type(fromA, { delay: 10 }), b.keyboard.type(fromB, { delay: 10 })]);
  // Converged: the same text on both pages, every character of both in it. (A text read from
  // one page while the other's last keystroke is on its way is not the end state.)
  const deadline = Date.now() + 20_000;
  for (;;) {
    const [onA, onB] = [await textOf(a), await textOf(b)];
    const whole = onA.length === fromA.length + fromB.length && onA.includes(fromA.trim()) && onA.includes(fromB.trim());
    if (onA === onB && whole) break;
    if (Date.now() > deadline) assert.fail(`the pages did not converge: ${JSON.stringify([onA, onB])}`);
    await new Promise((r) => setTimeout(r, 50));
  }
  assert.deepEqual([...a.problems, ...b.problems], []);
  await a.close();
  await b.close();
});

test("a tab with storage that writes and reloads twelve times in a room shared through Redis still writes", async () => {
  // A tab restored from storage starts its clock up to 100 steps above its last one, and in a
  // room shared through Redis the relay welcomes a node it holds with no floor to bring the
  // clock back: reload after reload, the tab ran ahead of the room, until the room refused all
  // it stamped as `futureStep`.
  const room = `reloads-${Date.now()}`;
  const a = await open(relays[0].base, `room=${room}&name=a`);
  const b = await open(relays[1].base, `room=${room}&persist=0&name=b`);
  let typed = "";
  for (let i = 0; i < 12; i++) {
    await a.keyboard.type(`${i}.`, { delay: 5 });
    typed += `${i}.`;
    await waitFor(b, (text) => text === typed, `edit ${i} reached the other page`);
    await a.reload();
    await a.waitForSelector("body[data-ready=true]");
    await a.focus("#editor");
    await a.keyboard.press("End");
  }
  await a.keyboard.type("done", { delay: 5 });
  await waitFor(b, (text) => text === `${typed}done`, "the edit after the reloads reached the other page");
  const refused = await a.evaluate(() => [...document.querySelectorAll("#log li")].map((li) => li.textContent));
  assert.deepEqual(refused, []);
  assert.deepEqual([...a.problems, ...b.problems], []);
  await a.close();
  await b.close();
});

test("a page given two relays goes on through the second when the first is killed", async () => {
  const room = `failover-${Date.now()}`;
  const list = `${relays[0].url},${relays[1].url}`;
  // Served by the second relay, connected to the first.
  const a = await open(relays[1].base, `room=${room}&persist=0&name=a&relay=${encodeURIComponent(list)}`);
  const b = await open(relays[1].base, `room=${room}&persist=0&name=b`);
  await a.keyboard.type("before. ", { delay: 5 });
  await waitFor(b, (t) => t === "before. ", "the second page sees the first edits");
  await relays[0].stop();
  const started = Date.now();
  await a.keyboard.type("after the first relay died.", { delay: 5 });
  const expected = "before. after the first relay died.";
  await waitFor(b, (t) => t === expected, "every edit typed after the first relay died arrives");
  assert.equal(await textOf(a), expected);
  console.log(`RESULT browser-failover delivered_ms_after_kill=${Date.now() - started}`);
  assert.deepEqual(a.problems, []);
  await a.close();
  await b.close();
});
