// What users hit, in real Chromium pages against the real relay: large pastes, a large document
// for a late joiner, two tabs typing as fast as they can, a tab typing while offline, and a
// real editing trace replayed with checkpoints on the way. Each lost or held edits before the
// client's protocol was a sans-IO session; these pin that down where users meet it.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtemp, rm } from "node:fs/promises";
import { createServer, connect } from "node:net";
import { readFileSync } from "node:fs";
import { gunzipSync } from "node:zlib";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { createRequire } from "node:module";

const root = fileURLToPath(new URL("../../", import.meta.url));
const require = createRequire(join(root, ".ci/package.json"));
const { chromium } = require("playwright-core");

let dir, port, relay, browser;

const freePort = () => new Promise((resolve) => {
  const server = createServer();
  server.listen(0, "127.0.0.1", () => {
    const { port } = server.address();
    server.close(() => resolve(port));
  });
});

before(async () => {
  dir = await mkdtemp(join(tmpdir(), "pattern-mesh-e2e-delivery-"));
  port = await freePort();
  // PM_RELAY_BIN picks another build of the relay (the release one, to measure).
  relay = spawn(process.env.PM_RELAY_BIN ?? join(root, "target/debug/pattern-mesh-relay"), [
    "--listen", `127.0.0.1:${port}`, "--www", join(root, "www"), "--pkg", join(root, "pkg"),
    "--data-dir", join(dir, "data"),
  ], { stdio: ["ignore", "pipe", "inherit"] });
  await new Promise((resolve, reject) => {
    relay.stdout.on("data", (chunk) => { if (String(chunk).includes("relay on")) resolve(); });
    relay.on("exit", (code) => reject(new Error(`the relay exited with ${code}`)));
  });
  browser = await chromium.launch({
    executablePath: "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
      "--enable-precise-memory-info", "--js-flags=--expose-gc"],
  });
});

after(async () => {
  await browser?.close();
  relay?.kill("SIGKILL");
  if (dir) await rm(dir, { recursive: true, force: true });
});

/**
 * A TCP proxy to the relay that the test can cut (a page behind it goes offline) or freeze (its
 * connections go silent without closing, as when a laptop sleeps).
 */
async function proxy() {
  const sockets = new Set();
  const links = new Set();
  let down = false;
  const server = createServer((inbound) => {
    if (down) return inbound.destroy();
    const outbound = connect(port, "127.0.0.1");
    for (const s of [inbound, outbound]) { sockets.add(s); s.on("close", () => sockets.delete(s)); s.on("error", () => {}); }
    inbound.pipe(outbound).pipe(inbound);
    links.add([inbound, outbound]);
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  return {
    port: server.address().port,
    setDown(value) {
      down = value;
      if (value) for (const s of sockets) s.destroy();
    },
    /** The connections open now pass nothing more, either way, and stay open; new ones pass. */
    freeze() {
      for (const [inbound, outbound] of links) {
        inbound.unpipe(outbound);
        outbound.unpipe(inbound);
        inbound.pause();
        outbound.pause();
      }
      links.clear();
    },
    close: () => { down = true; for (const s of sockets) s.destroy(); server.close(); },
  };
}

async function open(path, via = port) {
  const page = await browser.newPage({ viewport: { width: 1000, height: 700 } });
  page.problems = [];
  page.on("pageerror", (e) => page.problems.push(e.message));
  await page.goto(`http://127.0.0.1:${via}/${path}`);
  await page.waitForSelector("body[data-ready=true]");
  return page;
}

const length = (page) => page.evaluate(() => window.meshText.length);

async function until(what, check, ms = 60_000) {
  const deadline = Date.now() + ms;
  let last;
  while (Date.now() < deadline) {
    last = await check();
    if (last === true) return;
    await new Promise((r) => setTimeout(r, 100));
  }
  assert.fail(`timed out waiting for ${what} (last: ${JSON.stringify(last)})`);
}

/** Pastes `count` copies of `unit` at the start of the editor, as a paste does: one input event. */
function paste(page, unit, count) {
  return page.evaluate(([unit, count]) => {
    const editor = document.getElementById("editor");
    editor.setRangeText(unit.repeat(count), 0, 0, "end");
    editor.dispatchEvent(new Event("input"));
  }, [unit, count]);
}

test("pastes of 1.2 MiB and 20 MB in the editor reach the other tab, and edits after them too", async () => {
  const room = `e2e-paste-${Date.now()}`;
  const a = await open(`textarea.html?room=${room}`);
  const b = await open(`textarea.html?room=${room}`);
  await paste(a, "1.2 MiB paste. ", 83_887); // 1,258,305 bytes
  await until("the 1.2 MiB paste", async () => (await length(b)) === 1_258_305 || await length(b));
  await a.evaluate(() => { const e = document.getElementById("editor"); e.setRangeText("after ", 0, 0, "end"); e.dispatchEvent(new Event("input")); });
  await until("the edit after it", async () => (await b.evaluate(() => window.meshText.toString().startsWith("after "))));
  await paste(b, "twenty megabytes", 1_250_000); // 20,000,000 bytes
  await until("the 20 MB paste", async () => (await length(a)) === 21_258_311 || await length(a), 120_000);
  assert.equal(await a.evaluate(() => document.getElementById("editor").value.length), 21_258_311);
  for (const p of [a, b]) assert.deepEqual(p.problems, []);
  await Promise.all([a.close(), b.close()]);
});

test("a late joiner loads a 50 MB document: time and memory", async () => {
  const room = `e2e-large-${Date.now()}`;
  const a = await open(`textarea.html?room=${room}`);
  await paste(a, "fifty megabytes of text, ", 2_000_000); // 50,000,000 bytes
  await until("the document is stored", async () => (await a.evaluate(() => window.meshClient.pendingCount)) === 0, 120_000);
  await a.close();
  // The late joiner: a page that only joins and reads, so that the document's cost is measured,
  // not a textarea's.
  const late = await browser.newPage();
  await late.goto(`http://127.0.0.1:${port}/pattern.html`);
  const measured = await late.evaluate(async (room) => {
    const mesh = await import("/pkg/pattern_mesh.js");
    const wasm = await mesh.default();
    const started = performance.now();
    const client = await mesh.MeshClient.connect({ url: `ws://${location.host}/ws`, room, name: "late", connectTimeout: 120000 });
    const text = client.text("content");
    const ms = performance.now() - started;
    const result = { ms, length: text.length, wasmMiB: wasm.memory.buffer.byteLength / 2 ** 20, jsHeapMiB: performance.memory.usedJSHeapSize / 2 ** 20 };
    client.close();
    return result;
  }, room);
  assert.equal(measured.length, 50_000_000);
  console.log(`RESULT late-joiner-50mb ms=${measured.ms.toFixed(0)} wasm_mib=${measured.wasmMiB.toFixed(0)} js_heap_mib=${measured.jsHeapMiB.toFixed(0)}`);
  await late.close();
});

test("two tabs typing 2,000 characters each as fast as they can converge with every character", async () => {
  const room = `e2e-fast-${Date.now()}`;
  const a = await open(`textarea.html?room=${room}`);
  const b = await open(`textarea.html?room=${room}`);
  await a.focus("#editor");
  await b.focus("#editor");
  await Promise.all([a.keyboard.type("a".repeat(2_000)), b.keyboard.type("b".repeat(2_000))]);
  const both = async (p) => p.evaluate(() => window.meshText.toString());
  await until("convergence", async () => {
    const [ta, tb] = [await both(a), await both(b)];
    return (ta === tb && ta.length === 4_000) || [ta.length, tb.length];
  });
  const text = await both(a);
  assert.equal(text.split("a").length - 1, 2_000);
  assert.equal(text.split("b").length - 1, 2_000);
  for (const p of [a, b]) assert.deepEqual(p.problems, []);
  await Promise.all([a.close(), b.close()]);
});

test("a tab that typed 400 characters offline delivers all of them within seconds of coming back", async () => {
  const room = `e2e-offline-${Date.now()}`;
  const cut = await proxy();
  const a = await open(`textarea.html?room=${room}`, cut.port);
  const b = await open(`textarea.html?room=${room}`);
  await a.focus("#editor");
  await a.keyboard.type("online ");
  await until("the first words", async () => (await b.evaluate(() => window.meshText.toString())) === "online ");
  cut.setDown(true);
  await until("a notices", async () => (await a.evaluate(() => window.meshClient.status)) !== "open");
  await a.keyboard.type("x".repeat(400), { delay: 50 });
  assert.equal(await b.evaluate(() => window.meshText.toString()), "online ", "nothing passed while offline");
  cut.setDown(false);
  const back = Date.now();
  await until("the offline typing", async () => (await length(b)) === 407 || await length(b), 20_000);
  console.log(`RESULT offline-400 ms_after_back=${Date.now() - back}`);
  cut.close();
  await Promise.all([a.close(), b.close()]);
});

test("an edit made after the tab's connection went silent (a laptop that slept) reaches the other tab once the client gives the connection up", async (t) => {
  const room = `e2e-silent-${Date.now()}`;
  const cut = await proxy();
  t.after(() => cut.close());
  const profile = await browser.newContext({ viewport: { width: 1000, height: 700 } });
  t.after(() => profile.close());
  const a = await editorIn(profile, room, cut);
  const b = await open(`textarea.html?room=${room}`);
  await a.evaluate(() => {
    window.statuses = [];
    window.meshClient.on("status", (status, reason) => window.statuses.push([status, reason ?? null]));
  });
  await a.focus("#editor");
  await a.keyboard.type("before ");
  await until("the first words", async () => (await b.evaluate(() => window.meshText.toString())) === "before ");
  cut.freeze();
  const frozen = Date.now();
  await a.keyboard.type("after");
  // The default heartbeat: every 15 s, and a connection that brings nothing for 30 s is dropped.
  await until("the edit made on the silent connection", async () => (await b.evaluate(() => window.meshText.toString())) === "before after" || await b.evaluate(() => window.meshText.toString()), 60_000);
  console.log(`RESULT silent-connection ms_after_silence=${Date.now() - frozen}`);
  const statuses = await a.evaluate(() => window.statuses);
  assert.ok(statuses.some(([status, reason]) => status === "reconnecting" && reason?.includes("nothing came from the relay")), JSON.stringify(statuses));
  assert.equal(await a.evaluate(() => window.meshClient.status), "open");
  await until("a's outbox empties", async () => (await a.evaluate(() => window.meshClient.pendingCount)) === 0, 10_000);
  for (const p of [a, b]) assert.deepEqual(p.problems, []);
  await Promise.all([a.close(), b.close()]);
});

test("a tab that typed offline and closed shows its text at once when it reopens offline, and delivers every edit exactly once", async (t) => {
  const room = `e2e-reopen-${Date.now()}`;
  const cut = await proxy();
  t.after(() => cut.close());
  // One browser profile: the tab that reopens finds what the closed one stored in IndexedDB.
  const profile = await browser.newContext({ viewport: { width: 1000, height: 700 } });
  const openInProfile = () => editorIn(profile, room, cut);
  const a = await openInProfile();
  const b = await open(`textarea.html?room=${room}`);
  await b.evaluate(() => {
    window.notes = [];
    window.meshClient.on("message", ({ data }) => { if (data.note) window.notes.push(data.note); });
  });
  await a.focus("#editor");
  await a.keyboard.type("online ");
  await until("the first words", async () => (await b.evaluate(() => window.meshText.toString())) === "online ");
  cut.setDown(true);
  await until("a notices", async () => (await a.evaluate(() => window.meshClient.status)) !== "open");
  await a.keyboard.type("typed offline, then the tab closed. ", { delay: 20 });
  await a.evaluate(() => window.meshClient.broadcast({ note: "sent offline" }));
  const typed = await a.evaluate(() => window.meshText.toString());
  assert.equal(typed, "online typed offline, then the tab closed. ");
  // The writes of changes that no message waits for are put off by at most 250 ms.
  await new Promise((r) => setTimeout(r, 1_000));
  await a.close();

  const reopened = await openInProfile();
  assert.equal(await reopened.evaluate(() => window.meshText.toString()), typed, "the text, at once, offline");
  assert.notEqual(await reopened.evaluate(() => window.meshClient.status), "open");
  assert.equal(await reopened.evaluate(() => document.getElementById("editor").value), typed);
  cut.setDown(false);
  const back = Date.now();
  await until("the offline edits reach the other tab", async () => (await b.evaluate(() => window.meshText.toString())) === typed || await b.evaluate(() => window.meshText.toString()), 30_000);
  console.log(`RESULT reopen-offline ms_after_back=${Date.now() - back}`);
  await until("the reopened tab's outbox empties", async () => (await reopened.evaluate(() => window.meshClient.pendingCount)) === 0, 30_000);
  // Time for a duplicate to show up, if any were sent.
  await new Promise((r) => setTimeout(r, 1_000));
  assert.deepEqual(await b.evaluate(() => window.notes), ["sent offline"], "the message sent offline arrives once");
  assert.equal(await b.evaluate(() => window.meshText.toString()), typed);
  assert.equal(await reopened.evaluate(() => window.meshText.toString()), typed);
  for (const p of [reopened, b]) assert.deepEqual(p.problems, []);
  cut.close();
  await Promise.all([reopened.close(), b.close()]);
  await profile.close();
});

test("a tab closed offline right after its last keystrokes keeps them: the write put off for later goes as the page is hidden", async (t) => {
  const room = `e2e-close-at-once-${Date.now()}`;
  const cut = await proxy();
  t.after(() => cut.close());
  const profile = await browser.newContext({ viewport: { width: 1000, height: 700 } });
  const a = await editorIn(profile, room, cut);
  await a.focus("#editor");
  await a.keyboard.type("online ");
  await until("a is open", async () => (await a.evaluate(() => window.meshClient.pendingCount)) === 0);
  cut.setDown(true);
  await until("a notices", async () => (await a.evaluate(() => window.meshClient.status)) !== "open");
  await a.keyboard.type("closed at once");
  const typed = await a.evaluate(() => window.meshText.toString());
  // No pause: the page goes while the last keystrokes' write is still put off.
  await a.close();

  const reopened = await editorIn(profile, room, cut);
  assert.equal(await reopened.evaluate(() => window.meshText.toString()), typed, "every keystroke, after the tab closed at once");
  cut.setDown(false);
  const b = await open(`textarea.html?room=${room}`);
  await until("the edits reach another browser", async () => {
    const text = await b.evaluate(() => window.meshText.toString());
    return text === typed || text;
  }, 30_000);
  for (const p of [reopened, b]) assert.deepEqual(p.problems, []);
  cut.close();
  await Promise.all([reopened.close(), b.close()]);
  await profile.close();
});

/**
 * The editor on `room` in a page of `profile` (a browser profile: its pages share IndexedDB).
 * The page comes from the relay; its socket goes through the proxy `cut`, which can cut it.
 */
async function editorIn(profile, room, cut) {
  const page = await profile.newPage();
  page.problems = [];
  page.on("pageerror", (e) => page.problems.push(e.message));
  const relay = encodeURIComponent(`ws://127.0.0.1:${cut.port}/ws`);
  await page.goto(`http://127.0.0.1:${port}/textarea.html?room=${room}&relay=${relay}`);
  await page.waitForSelector("body[data-ready=true]");
  return page;
}

/** How many update records IndexedDB holds for the room at `relay`, read in `page`. */
const storedRecords = (page, relay, room) => page.evaluate(async (key) => {
  const db = await new Promise((ok, no) => { const r = indexedDB.open("pattern-mesh"); r.onsuccess = () => ok(r.result); r.onerror = () => no(r.error); });
  const count = await new Promise((ok, no) => {
    const r = db.transaction("updates").objectStore("updates").index("room").count(key);
    r.onsuccess = () => ok(r.result);
    r.onerror = () => no(r.error);
  });
  db.close();
  return count;
}, `${relay}\n${room}`);

test("two tabs of one browser on one room keep their own identities, and the stored document merges both", async (t) => {
  const room = `e2e-two-tabs-${Date.now()}`;
  const cut = await proxy();
  t.after(() => cut.close());
  const profile = await browser.newContext({ viewport: { width: 1000, height: 700 } });
  const openInProfile = () => editorIn(profile, room, cut);
  const x = await openInProfile();
  const y = await openInProfile();
  const nodes = [await x.evaluate(() => window.meshClient.node), await y.evaluate(() => window.meshClient.node)];
  assert.notEqual(nodes[0], nodes[1], "each tab its own node");
  // Enough edits that the stored list of updates is merged on the way.
  await x.focus("#editor");
  await x.keyboard.type("x".repeat(300), { delay: 10 });
  await y.focus("#editor");
  await y.keyboard.press("End");
  await y.keyboard.type("y".repeat(300), { delay: 10 });
  await until("both tabs converge", async () => {
    const [tx, ty] = [await x.evaluate(() => window.meshText.toString()), await y.evaluate(() => window.meshText.toString())];
    return (tx === ty && tx.length === 600) || [tx.length, ty.length];
  });
  const text = await x.evaluate(() => window.meshText.toString());
  await new Promise((r) => setTimeout(r, 1_000));
  const records = await storedRecords(x, `ws://127.0.0.1:${cut.port}/ws`, room);
  console.log(`RESULT two-tabs stored_update_records=${records}`);
  // Each tab appended 600 updates (its own 300 and the other's); each merges the list once it
  // has appended more than 200 since its last merge.
  assert.ok(records < 600, `the stored updates were merged (${records} records)`);
  await Promise.all([x.close(), y.close()]);
  // Offline: what the tab shows comes from storage.
  cut.setDown(true);
  const page = await openInProfile();
  assert.equal(await page.evaluate(() => window.meshText.toString()), text, "the stored document has both tabs' edits");
  assert.ok(nodes.includes(await page.evaluate(() => window.meshClient.node)), "the tab took up a closed tab's identity");
  assert.deepEqual(page.problems, []);
  await page.close();
  cut.close();
  await profile.close();
});

test("a tab that typed offline and closed while another tab of the room stayed open: the open tab delivers its edits, once", async (t) => {
  const room = `e2e-left-open-${Date.now()}`;
  const cut = await proxy();
  t.after(() => cut.close());
  const profile = await browser.newContext({ viewport: { width: 1000, height: 700 } });
  const keeper = await editorIn(profile, room, cut);
  const leaving = await editorIn(profile, room, cut);
  const b = await open(`textarea.html?room=${room}`);
  await b.evaluate(() => {
    window.notes = [];
    window.meshClient.on("message", ({ data }) => { if (data.note) window.notes.push(data.note); });
  });
  await leaving.focus("#editor");
  await leaving.keyboard.type("online ");
  await until("the first words", async () => (await keeper.evaluate(() => window.meshText.toString())) === "online ");
  // The browser goes offline; one tab types, sends a message and closes; the other stays open.
  cut.setDown(true);
  await until("the tabs notice", async () => (await leaving.evaluate(() => window.meshClient.status)) !== "open");
  await leaving.keyboard.press("End");
  await leaving.keyboard.type("typed offline in a tab that closed", { delay: 20 });
  await leaving.evaluate(() => window.meshClient.broadcast({ note: "sent offline" }));
  const typed = await leaving.evaluate(() => window.meshText.toString());
  await new Promise((r) => setTimeout(r, 1_000));
  await leaving.close();
  cut.setDown(false);
  const back = Date.now();
  await until("the closed tab's edits reach the other browser", async () => {
    const text = await b.evaluate(() => window.meshText.toString());
    return text === typed || text;
  }, 30_000);
  console.log(`RESULT left-open ms_after_back=${Date.now() - back}`);
  await until("the open tab shows them too", async () => (await keeper.evaluate(() => window.meshText.toString())) === typed);
  assert.equal(await keeper.evaluate(() => document.getElementById("editor").value), typed);
  await until("the open tab's outbox empties", async () => (await keeper.evaluate(() => window.meshClient.pendingCount)) === 0, 30_000);
  await new Promise((r) => setTimeout(r, 1_000));
  assert.deepEqual(await b.evaluate(() => window.notes), ["sent offline"], "the message sent offline arrives once");
  // The closed tab's record is gone: the next tab has nothing of it to send again.
  const records = await keeper.evaluate(async (key) => {
    const db = await new Promise((ok, no) => { const r = indexedDB.open("pattern-mesh"); r.onsuccess = () => ok(r.result); r.onerror = () => no(r.error); });
    const count = await new Promise((ok, no) => {
      const r = db.transaction("sessions").objectStore("sessions").index("room").count(key);
      r.onsuccess = () => ok(r.result);
      r.onerror = () => no(r.error);
    });
    db.close();
    return count;
  }, `ws://127.0.0.1:${cut.port}/ws\n${room}`);
  assert.equal(records, 1, "only the open tab's own record is left");
  for (const p of [keeper, b]) assert.deepEqual(p.problems, []);
  cut.close();
  await Promise.all([keeper.close(), b.close()]);
  await profile.close();
});

/** A page of `profile` (tabs of one browser profile share its storage) with the package loaded as
 * `window.mesh`, and the errors it throws in `page.problems`. */
async function packagePage(profile) {
  const page = await profile.newPage();
  page.problems = [];
  page.on("pageerror", (e) => page.problems.push(e.message));
  await page.goto(`http://127.0.0.1:${port}/pkg/package.json`);
  await page.evaluate(async () => {
    window.mesh = await import("/pkg/pattern_mesh.js");
    await window.mesh.default();
  });
  return page;
}

test("an insert within the relay's message limit whose edit is over it throws before the text changes, and the next edit reaches the room", async () => {
  const room = `e2e-over-limit-${Date.now()}`;
  const profile = await browser.newContext();
  const page = await packagePage(profile);
  const url = `ws://127.0.0.1:${port}/ws`;
  const got = await page.evaluate(async ({ url, room }) => {
    const client = await mesh.MeshClient.connect({ url, room });
    const refused = [];
    client.on("refused", (e) => refused.push(`${e.reason}: ${e.detail}`));
    const text = client.text("content");
    // 10 bytes under the payload the client allows (64 MiB less 256): the text fits, its
    // update (the text, its ids and the text's name) does not.
    let thrown = null;
    try { text.insert(0, "x".repeat(64 * 1024 * 1024 - 256 - 10)); } catch (e) { thrown = `${e.name}: ${e.message}`; }
    const lengthAfter = text.length;
    text.insert(0, "after");
    const deadline = Date.now() + 20_000;
    while (client.pendingCount > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    await new Promise((r) => setTimeout(r, 200));
    const other = await mesh.MeshClient.connect({ url, room });
    const seen = other.text("content").toString();
    other.close();
    client.close();
    return { thrown, lengthAfter, refused, seen };
  }, { url, room });
  assert.match(got.thrown ?? "", /^RangeError: /);
  assert.equal(got.lengthAfter, 0, "the text is as it was");
  assert.deepEqual(got.refused, []);
  assert.equal(got.seen, "after");
  assert.deepEqual(page.problems, []);
  await profile.close();
});

/** A relay of its own on `port`, storing in `data`, for a test that stops it and starts it again. */
async function ownRelay(port, data) {
  const child = spawn(process.env.PM_RELAY_BIN ?? join(root, "target/debug/pattern-mesh-relay"), [
    "--listen", `127.0.0.1:${port}`, "--data-dir", data,
  ], { stdio: ["ignore", "pipe", "inherit"] });
  await new Promise((resolve, reject) => {
    child.stdout.on("data", (chunk) => { if (String(chunk).includes("relay on")) resolve(); });
    child.on("exit", (code) => reject(new Error(`the relay exited with ${code}`)));
  });
  return child;
}

test("a client the application closed with nothing left to send, then a relay that lost the room: the next client of the tab gives the stored document back", async (t) => {
  const room = `e2e-closed-then-lost-${Date.now()}`;
  const ownPort = await freePort();
  const data = join(dir, `own-${ownPort}`);
  let own = await ownRelay(ownPort, data);
  t.after(() => own.kill("SIGKILL"));
  const url = `ws://127.0.0.1:${ownPort}/ws`;
  const profile = await browser.newContext();
  const page = await packagePage(profile);
  // An application that closes its client when the user leaves the document (a single-page
  // app), after the relay stored every edit.
  await page.evaluate(async ({ url, room }) => {
    const client = await mesh.MeshClient.connect({ url, room, persist: true });
    client.text("content").insert(0, "written before the relay lost the room");
    const deadline = Date.now() + 20_000;
    while (client.pendingCount > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    client.close();
    // The last write of the closed client.
    await new Promise((r) => setTimeout(r, 1_000));
  }, { url, room });
  // The relay's store is lost (a new disk, a wiped volume): the room begins a new log.
  own.kill("SIGKILL");
  await new Promise((resolve) => own.once("exit", resolve));
  await rm(data, { recursive: true, force: true });
  own = await ownRelay(ownPort, data);
  // The user comes back to the document: the stored text shows, and goes back to the room.
  const got = await page.evaluate(async ({ url, room }) => {
    const client = await mesh.MeshClient.connect({ url, room, persist: true });
    const refused = [];
    client.on("refused", (e) => refused.push(`${e.reason}: ${e.detail}`));
    const text = client.text("content");
    const shown = text.toString();
    const wait = async (check) => {
      const deadline = Date.now() + 20_000;
      while (!check() && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    };
    await wait(() => client.status === "open");
    text.insert(text.length, ", and typed after it");
    await wait(() => client.pendingCount === 0);
    await new Promise((r) => setTimeout(r, 300));
    const other = await mesh.MeshClient.connect({ url, room });
    const otherText = other.text("content");
    await wait(() => otherText.toString() === text.toString());
    const seen = otherText.toString();
    other.close();
    client.close();
    return { shown, refused, seen };
  }, { url, room });
  assert.equal(got.shown, "written before the relay lost the room", "the stored document, at once");
  assert.deepEqual(got.refused, []);
  assert.equal(got.seen, "written before the relay lost the room, and typed after it");
  assert.deepEqual(page.problems, []);
  await profile.close();
});

test("deleting the stored data while a tab holds it open neither hangs a new connect nor fails silently", async () => {
  const room = `e2e-delete-${Date.now()}`;
  const profile = await browser.newContext();
  const pages = [await packagePage(profile), await packagePage(profile)];
  const [holder, other] = pages;
  const url = `ws://127.0.0.1:${port}/ws`;
  await holder.evaluate(async ({ url, room }) => {
    window.errors = [];
    window.client = await mesh.MeshClient.connect({ url, room, persist: true });
    client.on("error", (e) => errors.push(`${e.name}: ${e.message}`));
    client.text("content").insert(0, "kept by the relay ");
    while (client.pendingCount > 0) await new Promise((r) => setTimeout(r, 20));
  }, { url, room });
  // The application clears its local data (a sign-out) in another tab of the same profile.
  const outcome = await other.evaluate(async ({ url, room }) => {
    const deleted = await Promise.race([
      new Promise((resolve) => {
        const request = indexedDB.deleteDatabase("pattern-mesh");
        request.onsuccess = () => resolve("deleted");
        request.onerror = () => resolve(`failed: ${request.error}`);
      }),
      new Promise((resolve) => setTimeout(() => resolve("still blocked after 5 s"), 5_000)),
    ]);
    const connected = await Promise.race([
      mesh.MeshClient.connect({ url, room, persist: true, connectTimeout: 5_000 })
        .then((c) => { window.client = c; return "connected"; }, (e) => `${e.name}: ${e.message}`),
      new Promise((resolve) => setTimeout(() => resolve("connect still pending after 15 s"), 15_000)),
    ]);
    return { deleted, connected };
  }, { url, room });
  assert.equal(outcome.deleted, "deleted");
  assert.equal(outcome.connected, "connected");
  await until("the new tab loads the room from the relay", async () =>
    (await other.evaluate(() => client.text("content").toString())) === "kept by the relay ");
  // The tab that held the database says that its storage is gone, at its next write.
  await holder.evaluate(() => client.text("content").insert(0, "after the deletion "));
  await until("the holding tab reports its storage error", async () =>
    (await holder.evaluate(() => errors.some((e) => e.startsWith("StorageError")))) || await holder.evaluate(() => errors));
  await until("its edit still reaches the other tab", async () =>
    (await other.evaluate(() => client.text("content").toString())) === "after the deletion kept by the relay ");
  for (const page of pages) assert.deepEqual(page.problems, []);
  await profile.close();
});

/** Connects `holder` (with `persist`) and `other` (without) to `room`, each page's errors in `window.errors`. */
async function holderAndOther(holder, other, room) {
  const url = `ws://127.0.0.1:${port}/ws`;
  for (const [page, persist] of [[holder, true], [other, false]]) {
    await page.evaluate(async ({ url, room, persist }) => {
      window.errors = [];
      window.client = await mesh.MeshClient.connect({ url, room, persist });
      client.on("error", (e) => errors.push(`${e.name}: ${e.message}`));
    }, { url, room, persist });
  }
}

test("the browser clearing a tab's stored data under it: the tab says so once, and its edits still reach the room", async () => {
  const room = `e2e-cleared-${Date.now()}`;
  const profile = await browser.newContext();
  const pages = [await packagePage(profile), await packagePage(profile)];
  const [holder, other] = pages;
  await holderAndOther(holder, other, room);
  // The user clears the site's data, or a response says Clear-Site-Data: the browser closes
  // the database under the tab (no versionchange: no other page asked for it), while the tab
  // types, so that a write is cut short too.
  const typing = holder.evaluate(async () => {
    for (let i = 0; i < 60; i++) {
      client.text("content").insert(0, "k");
      await new Promise((r) => setTimeout(r, 5));
    }
  });
  await new Promise((r) => setTimeout(r, 100));
  const cdp = await profile.newCDPSession(holder);
  await cdp.send("Storage.clearDataForOrigin", { origin: `http://127.0.0.1:${port}`, storageTypes: "indexeddb" });
  await typing;
  await holder.evaluate(() => client.text("content").insert(0, "after the clearing "));
  await until("the edits reach the other tab", async () =>
    (await other.evaluate(() => client.text("content").toString())) === "after the clearing " + "k".repeat(60));
  await new Promise((r) => setTimeout(r, 2_500));
  const errors = await holder.evaluate(() => errors);
  assert.equal(errors.length, 1, JSON.stringify(errors));
  assert.match(errors[0], /^StorageError: the browser closed the stored data/);
  for (const page of pages) assert.deepEqual(page.problems, []);
  await profile.close();
});

/** Has `page` keep a read-write transaction on the client's stores open (one request after
 * another) until `window.holding` turns false: the client's reads and writes wait behind it. */
const holdStores = (page) => page.evaluate(() => new Promise((resolve, reject) => {
  const open = indexedDB.open("pattern-mesh", 1);
  open.onerror = () => reject(open.error);
  open.onsuccess = () => {
    const tx = open.result.transaction(["sessions", "updates"], "readwrite");
    const store = tx.objectStore("sessions");
    window.holding = true;
    const spin = () => { if (window.holding) store.get(0).onsuccess = spin; };
    spin();
    resolve();
  };
}));

test("a storage write another page holds up is given up and said so, and the edit goes once the database is free", async () => {
  const room = `e2e-held-${Date.now()}`;
  const profile = await browser.newContext();
  const [holder, other, blocker] = [await packagePage(profile), await packagePage(profile), await packagePage(profile)];
  await holderAndOther(holder, other, room);
  // Another page of the origin holds the client's stores, so that its next write waits.
  await holdStores(blocker);
  await holder.evaluate(() => client.text("content").insert(0, "held"));
  // Said within the write's time limit (10 s), where it used to wait without a word.
  await until("the tab says its write is held up", async () =>
    (await holder.evaluate(() => errors)).some((e) => /^StorageError: .*did not complete within 10 s/.test(e)), 20_000);
  await blocker.evaluate(() => { window.holding = false; });
  await until("the edit reaches the other tab", async () =>
    (await other.evaluate(() => client.text("content").toString())) === "held");
  for (const page of [holder, other]) assert.deepEqual(page.problems, []);
  await profile.close();
});

// The database opened, but reading the room's records waited behind another page's write for
// as long as that write went on: `connect` neither resolved nor rejected, and no client existed
// yet whose listeners could hear why.
test("a connect whose stored records another page holds up is refused with a StorageError, and joins once they are free", async () => {
  const room = `e2e-open-held-${Date.now()}`;
  const profile = await browser.newContext();
  const [tab, blocker] = [await packagePage(profile), await packagePage(profile)];
  const url = `ws://127.0.0.1:${port}/ws`;
  // A first visit stores the room.
  await tab.evaluate(async ({ url, room }) => {
    const client = await mesh.MeshClient.connect({ url, room, persist: true });
    client.text("content").insert(0, "stored");
    while (client.pendingCount > 0) await new Promise((r) => setTimeout(r, 20));
    client.close();
    await new Promise((r) => setTimeout(r, 500));
  }, { url, room });
  await holdStores(blocker);
  const started = Date.now();
  const held = await tab.evaluate(({ url, room }) => Promise.race([
    mesh.MeshClient.connect({ url, room, persist: true }).then(() => "connected", (e) => `${e.name}: ${e.message}`),
    new Promise((r) => setTimeout(() => r("still waiting after 30 s"), 30_000)),
  ]), { url, room });
  assert.match(held, /^StorageError: .*within 10000 ms/, held);
  assert.ok(Date.now() - started < 20_000, `${Date.now() - started} ms`);
  await blocker.evaluate(() => { window.holding = false; });
  const text = await tab.evaluate(async ({ url, room }) => {
    const client = await mesh.MeshClient.connect({ url, room, persist: true });
    return client.text("content").toString();
  }, { url, room });
  assert.equal(text, "stored");
  assert.deepEqual(tab.problems, []);
  await profile.close();
});

/** A browser profile with `count` pages of the package, and a watcher page whose client (in
 * memory) is in `room` and keeps the messages it hears in `messages`. */
async function pagesAndWatcher(room, count) {
  const profile = await browser.newContext();
  const pages = [];
  for (let i = 0; i < count; i++) pages.push(await packagePage(profile));
  const watcher = await packagePage(profile);
  const url = `ws://127.0.0.1:${port}/ws`;
  await watcher.evaluate(async ({ url, room }) => {
    window.client = await mesh.MeshClient.connect({ url, room });
    window.messages = [];
    client.on("message", (m) => messages.push(JSON.stringify(m.data)));
  }, { url, room });
  return { profile, pages, watcher, url };
}

// An application closes its client and connects again at once (a repair, a new token): the
// closing client's last write still held its record, so the new client took a new one, and
// the old record (its outbox holds a stamped message) was left for a later tab. Its edits did
// not reach the room, and the new client's next edit, built on them, was refused.
test("a client closed and connected again at once takes up its own record: what it had not sent reaches the room", async () => {
  const room = `e2e-reconnect-${Date.now()}`;
  const { profile, pages: [tab], watcher, url } = await pagesAndWatcher(room, 1);
  const got = await tab.evaluate(async ({ url, room }) => {
    const first = await mesh.MeshClient.connect({ url, room, persist: true });
    for (let i = 0; i < 250 && first.status !== "open"; i++) await new Promise((r) => setTimeout(r, 20));
    const node = first.node;
    first.text("content").insert(0, "abc");
    first.broadcast({ bye: 1 });
    first.close();
    const second = await mesh.MeshClient.connect({ url, room, persist: true });
    const refused = [];
    second.on("refused", (r) => refused.push(`${r.reason}: ${r.detail}`));
    const text = second.text("content");
    text.insert(text.length, "!");
    for (let i = 0; i < 250 && (second.pendingCount > 0 || second.status !== "open"); i++) {
      await new Promise((r) => setTimeout(r, 20));
    }
    await new Promise((r) => setTimeout(r, 500));
    return { node, again: second.node, refused, pending: second.pendingCount, text: text.toString() };
  }, { url, room });
  assert.deepEqual(got.refused, []);
  assert.equal(got.again, got.node, "the new client resumes the closed one's node");
  assert.equal(got.pending, 0);
  await until("the watcher has the closed client's edit and the new one", async () =>
    (await watcher.evaluate(() => client.text("content").toString())) === "abc!");
  assert.deepEqual(await watcher.evaluate(() => messages), ['{"bye":1}']);
  for (const page of [tab, watcher]) assert.deepEqual(page.problems, []);
  await profile.close();
});

// A client the application lets go of without `close()` (freed, or collected once nothing
// refers to it) kept the Web Lock on its record for as long as the tab lived: the next client of
// the room took a new record beside it and showed the text typed offline, which never reached
// the room, and its next edit, built on that text, was refused.
test("a client let go of without close() lets go of its record: the next client of the room sends what it had not", async () => {
  const room = `e2e-freed-${Date.now()}`;
  const { profile, pages: [tab], watcher, url } = await pagesAndWatcher(room, 1);
  const got = await tab.evaluate(async ({ url, room }) => {
    const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
    // Offline: its token never comes.
    const first = await mesh.MeshClient.connect({ url, room, persist: true, token: () => new Promise(() => {}) });
    const text = first.text("content");
    text.insert(0, "typed offline");
    await sleep(600);
    text.free();
    first.free();
    const second = await mesh.MeshClient.connect({ url, room, persist: true });
    const refused = [];
    second.on("refused", (r) => refused.push(`${r.reason}: ${r.detail}`));
    for (let i = 0; i < 250 && (second.pendingCount > 0 || second.status !== "open"); i++) await sleep(20);
    const again = second.text("content");
    again.insert(again.length, "!");
    for (let i = 0; i < 250 && second.pendingCount > 0; i++) await sleep(20);
    await sleep(300);
    return { refused, text: again.toString() };
  }, { url, room });
  assert.deepEqual(got, { refused: [], text: "typed offline!" });
  await until("the watcher has what was typed offline, and the edit after it", async () =>
    (await watcher.evaluate(() => client.text("content").toString())) === "typed offline!");
  for (const page of [tab, watcher]) assert.deepEqual(page.problems, []);
  await profile.close();
});

// Tabs of one browser share the room's stored document. A tab offline (its token does not come)
// typed; a second tab opened and showed that text, and what its user typed after it was
// refused: the relay lacked what it built on, which only the first tab could send.
test("a tab that shows another live tab's unsent edits sends them before its own, and its edits are taken", async () => {
  const room = `e2e-shown-${Date.now()}`;
  const { profile, pages: [offline, second], watcher, url } = await pagesAndWatcher(room, 2);
  await offline.evaluate(async ({ url, room }) => {
    window.client = await mesh.MeshClient.connect({ url, room, persist: true, token: () => new Promise(() => {}) });
    client.text("content").insert(0, "abc");
    await new Promise((r) => setTimeout(r, 600));
  }, { url, room });
  const got = await second.evaluate(async ({ url, room }) => {
    const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
    const client = await mesh.MeshClient.connect({ url, room, persist: true });
    const refused = [];
    client.on("refused", (r) => refused.push(`${r.reason}: ${r.detail}`));
    const text = client.text("content");
    const shown = text.toString();
    text.insert(text.length, "!");
    for (let i = 0; i < 250 && (client.pendingCount > 0 || client.status !== "open"); i++) await sleep(20);
    await sleep(300);
    return { shown, refused, diverged: client.diverged };
  }, { url, room });
  assert.deepEqual(got, { shown: "abc", refused: [], diverged: false });
  await until("the watcher has the offline tab's text and the edit after it", async () =>
    (await watcher.evaluate(() => client.text("content").toString())) === "abc!");
  for (const page of [offline, second, watcher]) assert.deepEqual(page.problems, []);
  await profile.close();
});

// During a deploy, tabs of two versions of the package share a browser. A tab of the older one
// that opened, or looked for records of closed tabs, took a record the newer version wrote,
// could not read it, and deleted it with its unsent edits. It leaves such a record whole.
test("a stored session written by a newer version of the package is left whole, and said so", async () => {
  const room = `e2e-newer-${Date.now()}`;
  const profile = await browser.newContext();
  const tab = await packagePage(profile);
  const url = `ws://127.0.0.1:${port}/ws`;
  const got = await tab.evaluate(async ({ url, room }) => {
    const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
    const key = `${url}\n${room}`;
    const db = await new Promise((resolve, reject) => {
      const open = indexedDB.open("pattern-mesh", 1);
      open.onupgradeneeded = () => {
        open.result.createObjectStore("updates", { autoIncrement: true }).createIndex("room", "room");
        open.result.createObjectStore("sessions", { keyPath: "id" }).createIndex("room", "room");
      };
      open.onsuccess = () => resolve(open.result);
      open.onerror = () => reject(open.error);
    });
    const put = (id) => new Promise((resolve, reject) => {
      const tx = db.transaction("sessions", "readwrite");
      tx.objectStore("sessions").put({ id, room: key, saved: new Uint8Array([200, 1, 2, 3]), epoch: 0 });
      tx.oncomplete = resolve;
      tx.onerror = () => reject(tx.error);
    });
    const exists = (id) => new Promise((resolve) => {
      const get = db.transaction("sessions", "readonly").objectStore("sessions").get(id);
      // Still there, and still what the newer version wrote.
      get.onsuccess = () => resolve(get.result !== undefined && new Uint8Array(get.result.saved)[0] === 200);
    });
    // One there when a client opens, one that appears while it is open (a newer tab closed).
    await put(`${key}\nnewer-at-open`);
    const errors = [];
    const client = await mesh.MeshClient.connect({ url, room, persist: true, on: { error: (e) => errors.push(`${e.name}: ${e.message}`) } });
    client.text("content").insert(0, "mine");
    await put(`${key}\nnewer-later`);
    // The open tab looks for closed tabs' records every 5 s.
    await sleep(6_500);
    return { errors, atOpen: await exists(`${key}\nnewer-at-open`), later: await exists(`${key}\nnewer-later`) };
  }, { url, room });
  assert.equal(got.atOpen, true, JSON.stringify(got));
  assert.equal(got.later, true, JSON.stringify(got));
  assert.ok(got.errors.length >= 1 && got.errors.every((e) => /StorageError: .*newer version/.test(e)), JSON.stringify(got.errors));
  assert.deepEqual(tab.problems, []);
  await profile.close();
});

test("a panic inside the module stops its client with a PanicError, and the module serves a new one", async () => {
  const room = `e2e-panic-${Date.now()}`;
  const b = await open(`textarea.html?room=${room}`);
  // A page with no script of its own: objects of the stopped instance throw when used.
  const page = await packagePage(browser);
  const result = await page.evaluate(async (room) => {
    const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
    const { mesh } = window;
    const url = `ws://${location.host}/ws`;
    const a = await mesh.MeshClient.connect({ url, room, name: "a" });
    a.text("content").insert(0, "kept ");
    while (a.pendingCount > 0) await sleep(20);
    const node = a.node;
    const errors = [];
    a.on("error", (e) => errors.push({ name: e.name, message: e.message }));
    let thrown = null;
    const shared = a.text("content");
    try { a.__panicForTests("a test panic"); } catch (e) { thrown = `${e.name}: ${e.message}`; }
    // At once, before the fresh instance replaces the dead one (in the next task): the call
    // runs in the dead instance, where the client has stopped. (It used to run in the fresh
    // instance with the dead client's pointer, reading and writing memory the fresh instance
    // owns.)
    let staleAtOnce = null;
    try { a.text("content").insert(0, "x"); } catch (e) { staleAtOnce = `${e.name}: ${e.message}`; }
    // A text of the client too (it was borrowed when the panic came).
    let textAtOnce = null;
    try { shared.insert(0, "x"); } catch (e) { textAtOnce = `${e.name}: ${e.message}`; }
    for (let i = 0; i < 100 && errors.length === 0; i++) await sleep(20);
    // A connect pending when the module panics is rejected with the same error.
    const pending = mesh.MeshClient.connect({ url: "ws://127.0.0.1:9/ws", room, connectTimeout: 60000 })
      .then(() => "joined", (e) => `${e.name}: ${e.message}`);
    await sleep(50);
    let pendingThrown = null;
    const b = await mesh.MeshClient.connect({ url, room, name: "b" });
    // And so is one that has not started yet (it starts in a microtask), with the stored
    // document still to load.
    const stored = mesh.MeshClient.connect({ url, room, persist: true })
      .then(() => "opened", (e) => `${e.name}: ${e.message}`);
    // And one whose stored document is loading: the callbacks of its IndexedDB requests come
    // after the module was replaced, and do nothing (no error in the console).
    const loading = mesh.MeshClient.connect({ url, room: `${room}-loading`, persist: true })
      .then(() => "opened", (e) => `${e.name}: ${e.message}`);
    for (let i = 0; i < 5; i++) await Promise.resolve();
    try { b.__panicForTests("a second panic"); } catch (e) { pendingThrown = e.name; }
    const pendingOutcome = await Promise.race([pending, sleep(5000).then(() => "still pending")]);
    const storedOutcome = await Promise.race([stored, sleep(5000).then(() => "still pending")]);
    const loadingOutcome = await Promise.race([loading, sleep(5000).then(() => "still pending")]);
    let stale = null;
    try { a.text("content"); } catch (e) { stale = e.message; }
    const again = await mesh.MeshClient.connect({ url, room, name: "again" });
    const text = again.text("content");
    const loaded = text.toString();
    text.insert(text.length, "and after");
    while (again.pendingCount > 0) await sleep(20);
    return { node, thrown, errors, stale, staleAtOnce, textAtOnce, loaded, pendingThrown, pendingOutcome, storedOutcome, loadingOutcome };
  }, room);
  assert.match(result.thrown, /RuntimeError: unreachable/);
  assert.equal(result.errors.length, 1, "one error event");
  assert.equal(result.errors[0].name, "PanicError");
  assert.match(result.errors[0].message, /internal error \(.*a test panic.*\); 0 message\(s\) not yet acknowledged/);
  assert.match(result.stale, /previous Wasm instance/);
  assert.match(result.staleAtOnce, /^PanicError: the client stopped after an internal error/);
  assert.match(result.textAtOnce, /^PanicError: the client stopped after an internal error/);
  assert.equal(result.pendingThrown, "RuntimeError");
  assert.match(result.pendingOutcome, /^PanicError: the client stopped after an internal error \(a second panic, at /);
  assert.match(result.storedOutcome, /^PanicError: the client stopped after an internal error/);
  assert.match(result.loadingOutcome, /^PanicError: the client stopped after an internal error/);
  assert.equal(result.loaded, "kept ", "the new client loads the document from the relay");
  await until("the other tab sees the edit of the new client", async () =>
    (await b.evaluate(() => window.meshText.toString())) === "kept and after");
  await until("the other tab sees the stopped client leave", async () =>
    !(await b.evaluate((node) => window.meshClient.peers.some((p) => p.node === node), result.node)));
  assert.deepEqual(page.problems, []);
  assert.deepEqual(b.problems, []);
  await Promise.all([page.close(), b.close()]);
});

test("a tab whose persisting client panicked with edits not yet sent: the tab's next client sends them, once", async (t) => {
  const room = `e2e-panic-stored-${Date.now()}`;
  const cut = await proxy();
  t.after(() => cut.close());
  const b = await open(`textarea.html?room=${room}`);
  await b.evaluate(() => {
    window.notes = [];
    window.meshClient.on("message", ({ data }) => { if (data.note) window.notes.push(data.note); });
  });
  const page = await packagePage(browser);
  const url = `ws://127.0.0.1:${cut.port}/ws`;
  await page.evaluate(async ([url, room]) => {
    window.a = await window.mesh.MeshClient.connect({ url, room, name: "a", persist: true });
    for (let i = 0; i < 250 && window.a.status !== "open"; i++) await new Promise((r) => setTimeout(r, 20));
  }, [url, room]);
  cut.setDown(true);
  await until("a notices", async () => (await page.evaluate(() => window.a.status)) !== "open");
  const result = await page.evaluate(async ([url, room]) => {
    const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
    const { mesh, a } = window;
    a.text("content").insert(0, "typed before the panic");
    a.broadcast({ note: "sent before the panic" });
    const pending = a.pendingCount;
    // The writes of changes that no message waits for are put off by at most 250 ms.
    await sleep(1_000);
    const errors = [];
    a.on("error", (e) => errors.push(e.message));
    try { a.__panicForTests("a test panic"); } catch (_) {}
    for (let i = 0; i < 100 && errors.length === 0; i++) await sleep(20);
    const again = await mesh.MeshClient.connect({ url, room, name: "again", persist: true });
    window.again = again;
    return { pending, errors, text: again.text("content").toString(), againPending: again.pendingCount };
  }, [url, room]);
  assert.equal(result.pending, 2, "an update and a broadcast wait for the relay");
  assert.match(result.errors[0], /2 message\(s\) not yet acknowledged by the relay: the next client of this room that persists sends those this one had stored/);
  assert.equal(result.text, "typed before the panic", "the stored document, at once");
  assert.equal(result.againPending, 2, "the next client of the tab takes in the stopped one's outbox");
  cut.setDown(false);
  await until("the stored edit reaches the other tab", async () =>
    (await b.evaluate(() => window.meshText.toString())) === "typed before the panic", 30_000);
  await until("the outbox empties", async () => (await page.evaluate(() => window.again.pendingCount)) === 0, 30_000);
  // Time for a duplicate to show up, if any were sent.
  await new Promise((r) => setTimeout(r, 1_000));
  assert.deepEqual(await b.evaluate(() => window.notes), ["sent before the panic"], "the message arrives once");
  assert.equal(await b.evaluate(() => window.meshText.toString()), "typed before the panic");
  assert.deepEqual(page.problems.filter((p) => !/unreachable/.test(p)), []);
  assert.deepEqual(b.problems, []);
  await Promise.all([page.close(), b.close()]);
});

test("free() on a client of the instance that panicked leaves the fresh instance's clients whole", async () => {
  const room = `e2e-panic-free-${Date.now()}`;
  const b = await open(`textarea.html?room=${room}`);
  const page = await packagePage(browser);
  const result = await page.evaluate(async (room) => {
    const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
    const { mesh } = window;
    const url = `ws://${location.host}/ws`;
    const a = await mesh.MeshClient.connect({ url, room, name: "a" });
    const text = a.text("content");
    const errors = [];
    a.on("error", (e) => errors.push(e.name));
    try { a.__panicForTests("a test panic"); } catch (_) {}
    for (let i = 0; i < 100 && errors.length === 0; i++) await sleep(20);
    // The fresh instance's first client: made the way the stopped one was, it sits where that
    // one sat in memory.
    const again = await mesh.MeshClient.connect({ url, room, name: "again" });
    const freed = [];
    for (const stale of [text, a]) {
      try { stale.free(); freed.push("ok"); } catch (e) { freed.push(`${e.name}: ${e.message}`); }
    }
    let outcome = "ok";
    try {
      again.text("content").insert(0, "after free() ");
      for (let i = 0; i < 250 && again.pendingCount > 0; i++) await sleep(20);
    } catch (e) { outcome = `${e.name}: ${e.message}`; }
    let status = null;
    try { status = again.status; } catch (e) { status = `${e.name}: ${e.message}`; }
    return { errors, freed, outcome, status, pending: again.pendingCount };
  }, room);
  assert.deepEqual(result.errors, ["PanicError"]);
  assert.deepEqual(result.freed, ["ok", "ok"], "free() of a stale object does nothing");
  assert.equal(result.outcome, "ok");
  assert.equal(result.status, "open");
  assert.equal(result.pending, 0);
  await until("the other tab sees the fresh client's edit", async () =>
    (await b.evaluate(() => window.meshText.toString())) === "after free() ");
  assert.deepEqual(page.problems.filter((p) => !/unreachable/.test(p)), []);
  await Promise.all([page.close(), b.close()]);
});

test("a panic inside a listener the module calls: the listeners after it and the module's next client work", async () => {
  const room = `e2e-panic-nested-${Date.now()}`;
  const page = await packagePage(browser);
  const result = await page.evaluate(async (room) => {
    const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
    const { mesh } = window;
    const url = `ws://${location.host}/ws`;
    const a = await mesh.MeshClient.connect({ url, room, name: "a" });
    const c = await mesh.MeshClient.connect({ url, room, name: "c" });
    const seen = [];
    const errors = [];
    a.on("error", (e) => errors.push(e.name));
    // The module calls the listeners from inside a call of its own (the frame's arrival): the
    // panic comes back to it as the listener's error, and it goes on to the next listener.
    a.on("message", () => { a.__panicForTests("a panic in a listener"); });
    a.on("message", () => {
      try { seen.push(a.step); } catch (e) { seen.push(`${e.name}: ${e.message}`); }
    });
    c.broadcast({ hello: 1 });
    for (let i = 0; i < 100 && errors.length === 0; i++) await sleep(20);
    const again = await mesh.MeshClient.connect({ url, room, name: "again" });
    again.text("content").insert(0, "after a nested panic");
    const d = await mesh.MeshClient.connect({ url, room, name: "d" });
    for (let i = 0; i < 100 && d.text("content").toString() === ""; i++) await sleep(20);
    return { seen, errors, text: d.text("content").toString() };
  }, room);
  assert.equal(result.seen.length, 1, JSON.stringify(result.seen));
  assert.match(String(result.seen[0]), /^PanicError: the client stopped after an internal error/);
  assert.deepEqual(result.errors, ["PanicError"]);
  assert.equal(result.text, "after a nested panic");
  assert.deepEqual(page.problems.filter((p) => !/unreachable/.test(p)), []);
  await page.close();
});

test("the client refuses bad options and arguments by name, and every change after close()", async () => {
  const page = await browser.newPage();
  await page.goto(`http://127.0.0.1:${port}/pkg/package.json`);
  const result = await page.evaluate(async (room) => {
    const mesh = await import("/pkg/pattern_mesh.js");
    await mesh.default();
    const url = `ws://${location.host}/ws`;
    const outcome = async (f) => {
      try { return `ok ${JSON.stringify(await f())}`; } catch (e) { return `${e.name}: ${e.message}`; }
    };
    const r = {};
    r.misspelled = await outcome(() => mesh.MeshClient.connect({ url, room, nmae: "x" }).then(() => "joined"));
    r.notObject = await outcome(() => mesh.MeshClient.connect(42));
    r.roomType = await outcome(() => mesh.MeshClient.connect({ url, room: 7 }));
    r.timeoutType = await outcome(() => mesh.MeshClient.connect({ url, room, connectTimeout: "soon" }));
    r.documentEmpty = await outcome(() => mesh.MeshClient.connect({ url, room, document: {} }));
    const methods = { applyUpdate() {}, stateVector: () => new Uint8Array([0]), diff: () => new Uint8Array([0, 0]), snapshot: () => new Uint8Array([0, 0]), texts: () => [] };
    r.documentPersist = await outcome(() => mesh.MeshClient.connect({ url, room, document: methods, persist: true }));
    const client = await mesh.MeshClient.connect({ url, room, name: "strict" });
    const text = client.text("content");
    text.insert(0, "abcd");
    for (const [key, f] of [
      ["fraction", () => text.insert(1.5, "X")], ["string", () => text.insert("abc", "X")],
      ["nan", () => text.insert(NaN, "X")], ["wide", () => text.insert(2 ** 32 + 3, "X")],
      ["negative", () => text.insert(-1, "X")], ["number", () => text.insert(0, 42)],
      ["null", () => text.insert(0, null)], ["deleteLength", () => text.delete(0, 1.5)],
      ["textName", () => client.text(null)], ["listener", () => client.on("message", 5)],
      ["event", () => client.on("mesage", () => {})], ["raw", () => client.sendRaw("bytes")],
      ["updateDoc", () => client.sendUpdate(5, new Uint8Array([0, 0]))],
      ["updateBytes", () => client.sendUpdate("content", new Uint8Array([7, 7, 7]))],
    ]) r[key] = await outcome(f);
    r.unchanged = text.toString();
    r.status = client.status;
    client.close();
    for (const [key, f] of [
      ["afterInsert", () => text.insert(0, "q")], ["afterDelete", () => text.delete(0, 1)],
      ["afterBroadcast", () => client.broadcast({ a: 1 })], ["afterPresence", () => client.setPresence({ a: 1 })],
      ["afterText", () => client.text("content")], ["afterObserve", () => text.observe(() => {})],
    ]) r[key] = await outcome(f);
    r.readAfterClose = text.toString();
    return r;
  }, `e2e-strict-${Date.now()}`);
  assert.deepEqual(result, {
    misspelled: 'InvalidArgument: the options has an unknown key "nmae"; the accepted keys are url, room, name, config, connectTimeout, heartbeat, WebSocket, on, persist, token, document',
    notObject: "InvalidArgument: the options must be an object with url, room, name, config, connectTimeout, heartbeat, WebSocket, on, persist, token, document, got the number 42",
    roomType: "InvalidArgument: room must be a string, got the number 7",
    timeoutType: 'InvalidArgument: connectTimeout must be an integer from 0 to 4294967295, got the string "soon"',
    documentEmpty: "InvalidArgument: document.applyUpdate must be a function, got undefined",
    documentPersist: "InvalidArgument: persist keeps the built-in document; with the application's document, persist it beside the client (y-indexeddb for a Y.Doc)",
    fraction: "InvalidArgument: index must be an integer from 0 to 4294967295, got the number 1.5",
    string: 'InvalidArgument: index must be an integer from 0 to 4294967295, got the string "abc"',
    nan: "InvalidArgument: index must be an integer from 0 to 4294967295, got the number NaN",
    wide: "InvalidArgument: index must be an integer from 0 to 4294967295, got the number 4294967299",
    negative: "InvalidArgument: index must be an integer from 0 to 4294967295, got the number -1",
    number: "InvalidArgument: text must be a string, got the number 42",
    null: "InvalidArgument: text must be a string, got null",
    deleteLength: "InvalidArgument: length must be an integer from 0 to 4294967295, got the number 1.5",
    textName: "InvalidArgument: name must be a string, got null",
    listener: "InvalidArgument: listener must be a function, got the number 5",
    event: 'InvalidArgument: unknown event "mesage"; events are message, anomaly, refused, peers, status, step, presence, paced, error',
    raw: 'InvalidArgument: bytes must be a Uint8Array, got the string "bytes"',
    updateDoc: "InvalidArgument: doc must be a string, got the number 5",
    updateBytes: result.updateBytes.startsWith("DocumentError: invalid Yjs update") ? result.updateBytes : "DocumentError: invalid Yjs update ...",
    unchanged: "abcd",
    status: "open",
    afterInsert: "ClosedError: the client is closed",
    afterDelete: "ClosedError: the client is closed",
    afterBroadcast: "ClosedError: the client is closed",
    afterPresence: "ClosedError: the client is closed",
    afterText: "ClosedError: the client is closed",
    afterObserve: "ClosedError: the client is closed",
    readAfterClose: "abcd",
  });
  await page.close();
});

test("a real editing trace replayed through the relay raises no desync", async () => {
  const trace = JSON.parse(gunzipSync(readFileSync(join(root, "tests/data/editing-traces/automerge-paper.json.gz"))));
  const txns = trace.txns.slice(0, 30_000).map((t) => t.patches);
  const room = `e2e-trace-${Date.now()}`;
  const a = await open(`textarea.html?room=${room}`);
  const b = await open(`textarea.html?room=${room}`);
  await a.evaluate((txns) => {
    const text = window.meshText;
    for (const patches of txns) {
      for (const [at, del, ins] of patches) {
        if (del > 0) text.delete(at, del);
        if (ins) text.insert(at, ins);
      }
    }
  }, txns);
  const expected = await a.evaluate(() => window.meshText.toString());
  await until("b has the trace", async () => (await b.evaluate(() => window.meshText.toString())) === expected || false);
  await until("a's outbox drains", async () => (await a.evaluate(() => window.meshClient.pendingCount)) === 0);
  for (const p of [a, b]) {
    const counts = await p.evaluate(() => window.meshClient.counts());
    assert.equal(counts.desync, 0, JSON.stringify(counts));
  }
  await Promise.all([a.close(), b.close()]);
});
