// Access tokens in real Chromium pages against a relay started with --auth-key: a page without
// a token is refused and told why, a read-only page reads the room and cannot write to it (its
// edits throw before its document shows them), and a page whose tokens expire every two seconds
// gets fresh ones and loses nothing it typed.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import { createRequire } from "node:module";
import { root, startRelay, signToken, nowSeconds as now } from "../support/relay.mjs";

const require = createRequire(join(root, ".ci/package.json"));
const { chromium } = require("playwright-core");

const SECRET = "the e2e token test's secret, 32b";
const token = (claims) => signToken(SECRET, claims);
let relay, browser, base;

before(async () => {
  relay = await startRelay({ PM_AUTH_KEY: SECRET });
  base = relay.base;
  browser = await chromium.launch({
    executablePath: "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking"],
  });
});

after(async () => {
  await browser?.close();
  await relay?.stop();
});

/**
 * A page with the package loaded, `window.nextToken(claims)` minting tokens in the test, and
 * `window.heldToken(claims)`: a token function that answers once `release()` is called, as a
 * slow token endpoint does (`{ source, release }`). A client cannot know what a token it has not
 * got lets it do: an offline-first client's edits before then are made, and the relay judges
 * them.
 */
async function page() {
  const p = await browser.newPage();
  p.problems = [];
  p.on("pageerror", (e) => p.problems.push(e.message));
  await p.exposeFunction("nextToken", (claims) => token({ ...claims, exp: now() + claims.ttl }));
  await p.goto(`${base}/pattern.html`);
  await p.evaluate(async () => {
    window.mesh = await import("/pkg/pattern_mesh.js");
    await window.mesh.default();
    // A tab that may write closes with "typed offline" unsent (its connection dropped, and its
    // token endpoint stopped answering): how many messages it left.
    window.closeOffline = async (url, room) => {
      let first = true;
      const write = () => window.nextToken({ sub: "w", room, access: "write", ttl: 600 });
      const writer = await window.mesh.MeshClient.connect({
        url, room, persist: true,
        token: () => (first ? ((first = false), write()) : new Promise(() => {})),
      });
      for (let i = 0; i < 100 && writer.status !== "open"; i++) await new Promise((r) => setTimeout(r, 50));
      writer.dropConnection();
      writer.text("content").insert(0, "typed offline");
      const unsent = writer.pendingCount;
      writer.close();
      return unsent;
    };
    // A writer puts "the room's text" in the room, and stays (as `window.client`).
    window.writeRoomText = async (url, room) => {
      const client = await window.mesh.MeshClient.connect({
        url, room, token: await window.nextToken({ sub: "w", room, access: "write", ttl: 600 }),
      });
      client.text("content").insert(0, "the room's text");
      for (let i = 0; i < 100 && client.pendingCount > 0; i++) await new Promise((r) => setTimeout(r, 50));
      window.client = client;
    };
    // A reader with stored data, its errors in `problems`, once its text is the room's (or
    // after 5 s).
    window.openReader = async (url, room, problems) => {
      const client = await window.mesh.MeshClient.connect({
        url, room, persist: true,
        token: await window.nextToken({ sub: "r", room, access: "read", ttl: 600 }),
        on: { error: (e) => problems.push(e.message) },
      });
      for (let i = 0; i < 100 && client.text("content").toString() !== "the room's text"; i++) {
        await new Promise((r) => setTimeout(r, 50));
      }
      return client;
    };
    window.heldToken = (claims) => {
      let release;
      const token = new Promise((resolve) => { release = async () => resolve(await window.nextToken(claims)); });
      return { source: () => token, release };
    };
    // A reader with stored data that types before its read-only token is in: the edit is
    // refused for good, and the client's document diverged (once the relay said so, or 5 s).
    window.divergedReader = async (url, room) => {
      const held = window.heldToken({ sub: "r", room, access: "read", ttl: 600 });
      const client = await window.mesh.MeshClient.connect({ url, room, persist: true, token: held.source });
      client.text("content").insert(0, "the reader's ");
      await held.release();
      for (let i = 0; i < 100 && !client.diverged; i++) await new Promise((r) => setTimeout(r, 50));
      return client;
    };
  });
  return p;
}

test("in Chromium: refused without a token, read-only pages cannot write, expiring tokens are replaced and nothing typed is lost", async () => {
  const room = `e2e-tokens-${Date.now()}`;
  const url = base.replace("http", "ws") + "/ws";
  const writer = await page();
  const reader = await page();

  const refused = await writer.evaluate(async ({ url, room }) => {
    try { await window.mesh.MeshClient.connect({ url, room }); return "joined"; } catch (e) { return `${e.name}: ${e.message}`; }
  }, { url, room });
  assert.match(refused, /^ConnectError: .*4003.*requires an access token/);

  // The writer's tokens live two seconds: it types for five.
  const typed = await writer.evaluate(async ({ url, room }) => {
    let issued = 0;
    const client = await window.mesh.MeshClient.connect({
      url, room,
      token: () => { issued += 1; return window.nextToken({ sub: "w", room, access: "write", ttl: 2 }); },
    });
    window.client = client;
    const text = client.text("content");
    let typed = "";
    for (const end = Date.now() + 5_000; Date.now() < end;) {
      typed += "w";
      text.insert(text.length, "w");
      await new Promise((r) => setTimeout(r, 40));
    }
    for (let i = 0; i < 200 && client.pendingCount > 0; i++) await new Promise((r) => setTimeout(r, 50));
    return { typed, issued, pending: client.pendingCount };
  }, { url, room });
  assert.ok(typed.issued >= 2, `fresh tokens (${typed.issued} issued)`);
  assert.equal(typed.pending, 0);

  const read = await reader.evaluate(async ({ url, room }) => {
    const refused = [];
    const client = await window.mesh.MeshClient.connect({
      url, room,
      token: await window.nextToken({ sub: "r", name: "Reader", room, access: "read", ttl: 600 }),
      on: { refused: (e) => refused.push(`${e.kind} ${e.reason}`) },
    });
    const text = client.text("content");
    const before = text.toString();
    let thrown = "nothing";
    try { text.insert(0, "from the reader "); } catch (e) { thrown = `${e.name}: ${e.message}`; }
    // A broadcast is refused too, at once (the relay would refuse it), with a `refused` event.
    client.broadcast({ from: "the reader" });
    for (let i = 0; i < 100 && refused.length === 0; i++) await new Promise((r) => setTimeout(r, 50));
    return { before, after: text.toString(), thrown, readOnly: client.readOnly, refused, diverged: client.diverged };
  }, { url, room });
  assert.equal(read.before, typed.typed, "the reader has every character the writer typed");
  assert.match(read.thrown, /^ForbiddenError: .*read only/, "the reader's edit is refused at the call");
  assert.equal(read.after, read.before, "the reader's document does not show the edit");
  assert.equal(read.readOnly, true);
  assert.deepEqual(read.refused, ["data forbidden"]);
  assert.equal(read.diverged, false, "the reader's document shows what the room holds");
  // Nothing of the reader's reached the writer.
  await new Promise((r) => setTimeout(r, 500));
  assert.equal(await writer.evaluate(() => window.client.text("content").toString()), typed.typed);
  for (const p of [writer, reader]) assert.deepEqual(p.problems, []);
  await Promise.all([writer.close(), reader.close()]);
});

// A read-only page with stored data types before its token is in: the edit is refused for good,
// and its document holds what the room does not (`diverged`). The page reopens its client, as an application does to
// repair that: the stored document, refused edit and all, loaded again, and the reopened client
// said nothing of it (`diverged` false, the reader's text shown as if the room held it). A
// client whose stored document diverged sets it aside and loads the room's, and says so.
test("in Chromium: a stored document that diverged is set aside when its client reopens, and the room's loads instead", async () => {
  const room = `e2e-diverged-${Date.now()}`;
  const url = base.replace("http", "ws") + "/ws";
  const writer = await page();
  const reader = await page();
  await writer.evaluate(({ url, room }) => window.writeRoomText(url, room), { url, room });
  const result = await reader.evaluate(async ({ url, room }) => {
    const open = (problems) => window.openReader(url, room, problems);
    const first = await window.divergedReader(url, room);
    const diverged = first.diverged;
    first.close();
    const problems = [];
    const again = await open(problems);
    const reopened = { text: again.text("content").toString(), diverged: again.diverged };
    again.close();
    const third = await open([]);
    const text = third.text("content").toString();
    third.close();
    return { diverged, reopened, problems, third: text };
  }, { url, room });
  assert.equal(result.diverged, true);
  assert.deepEqual(result.reopened, { text: "the room's text", diverged: false });
  assert.equal(result.problems.length, 1, JSON.stringify(result.problems));
  assert.match(result.problems[0], /stored document.*diverged.*set aside/);
  assert.equal(result.third, "the room's text", "the stored document was replaced");
  for (const p of [writer, reader]) assert.deepEqual(p.problems, []);
  await Promise.all([writer.close(), reader.close()]);
});

// The same, with the diverged client still open: another client of the room opened meanwhile (a
// second tab, a reload of another tab) loaded the stored document, the refused edit in it,
// because only the records it took were looked at, and showed the reader's text as the room's
// with `diverged` false. The document is one per room: a record of it that diverged, open or
// not, sets it aside.
test("in Chromium: a client opened while another client's stored document diverged sets it aside too", async () => {
  const room = `e2e-diverged-open-${Date.now()}`;
  const url = base.replace("http", "ws") + "/ws";
  const writer = await page();
  const reader = await page();
  await writer.evaluate(({ url, room }) => window.writeRoomText(url, room), { url, room });
  const result = await reader.evaluate(async ({ url, room }) => {
    const first = await window.divergedReader(url, room);
    const diverged = first.diverged;
    // Its record says so once written.
    await new Promise((r) => setTimeout(r, 500));
    const problems = [];
    const second = await window.openReader(url, room, problems);
    const opened = { text: second.text("content").toString(), diverged: second.diverged };
    second.close();
    first.close();
    return { diverged, opened, problems };
  }, { url, room });
  assert.equal(result.diverged, true);
  assert.deepEqual(result.opened, { text: "the room's text", diverged: false });
  assert.equal(result.problems.length, 1, JSON.stringify(result.problems));
  assert.match(result.problems[0], /stored document.*diverged.*set aside/);
  for (const p of [writer, reader]) assert.deepEqual(p.problems, []);
  await Promise.all([writer.close(), reader.close()]);
});

// The document set aside is replaced in storage, a new epoch of it. Another client's record of
// the room (a tab open meanwhile) holds a log position that counted in the document set aside:
// opened over a replacement that does not hold yet what came before that position (the client
// that set it aside closed before it caught up), it caught up from there, and showed a document
// with a hole. A record of an earlier epoch catches up from the start of the log.
test("in Chromium: a client whose record predates a stored document set aside catches up from the start", async () => {
  const room = `e2e-epoch-${Date.now()}`;
  const url = base.replace("http", "ws") + "/ws";
  const writer = await page();
  const reader = await page();
  await writer.evaluate(async ({ url, room }) => {
    const client = await window.mesh.MeshClient.connect({
      url, room, token: await window.nextToken({ sub: "w", room, access: "write", ttl: 600 }),
    });
    for (const word of ["the ", "room's ", "text"]) {
      const text = client.text("content");
      text.insert(text.length, word);
    }
    for (let i = 0; i < 100 && client.pendingCount > 0; i++) await new Promise((r) => setTimeout(r, 50));
    window.client = client;
  }, { url, room });
  await reader.exposeFunction("closeWriter", () => writer.evaluate(() => window.client.close()));
  const result = await reader.evaluate(async ({ url, room, key }) => {
    const open = async () => {
      const client = await window.mesh.MeshClient.connect({
        url, room, persist: true,
        token: await window.nextToken({ sub: "r", room, access: "read", ttl: 600 }),
      });
      for (let i = 0; i < 100 && client.text("content").toString() !== "the room's text"; i++) {
        await new Promise((r) => setTimeout(r, 50));
      }
      return client;
    };
    const kept = await open();
    const typing = await window.divergedReader(url, room);
    typing.close();
    const setAside = await open();
    setAside.close();
    // As if the client that set the document aside had closed before it caught up: only the
    // new epoch's first, empty, record is stored, and no session record of that epoch.
    const db = await new Promise((resolve, reject) => {
      const r = indexedDB.open("pattern-mesh");
      r.onsuccess = () => resolve(r.result);
      r.onerror = () => reject(r.error);
    });
    const epochs = await new Promise((resolve, reject) => {
      const tx = db.transaction(["updates", "sessions"], "readwrite");
      const seen = [];
      tx.objectStore("updates").openCursor().onsuccess = (e) => {
        const cursor = e.target.result;
        if (!cursor) return;
        if (cursor.value.room === key) {
          seen.push(cursor.value.epoch ?? 0);
          if (cursor.value.update.length > 2) cursor.delete();
        }
        cursor.continue();
      };
      tx.objectStore("sessions").openCursor().onsuccess = (e) => {
        const cursor = e.target.result;
        if (!cursor) return;
        if (cursor.value.room === key && cursor.value.epoch > 0) cursor.delete();
        cursor.continue();
      };
      tx.oncomplete = () => resolve(seen);
      tx.onerror = () => reject(tx.error);
    });
    db.close();
    kept.close();
    // No member is left to answer a sync request: the relay's log is where the text comes from.
    await window.closeWriter();
    const again = await open();
    const text = again.text("content").toString();
    again.close();
    return { epochs: [...new Set(epochs)], text };
  }, { url, room, key: `${url}\n${room}` });
  assert.deepEqual(result.epochs, [1], "the stored document was replaced: one epoch, the next");
  assert.equal(result.text, "the room's text");
  for (const p of [writer, reader]) assert.deepEqual(p.problems, []);
  await Promise.all([writer.close(), reader.close()]);
});

// A writer tab closes with edits the relay never got (its connection dropped, and its token
// endpoint stopped answering), and a read-only tab of the room opens first: it took the
// writer's record, outbox and all, sent the edits, and the relay refused them as forbidden, so
// the writer's next tab had nothing left to send. A tab whose token says it may only read
// leaves records with writes to a tab that may write: with a token given as a string, it takes
// another record; with one from a function (which comes after the record is taken), it keeps
// the record's outbox unsent, and the writer's next tab takes it once the reader closes.
for (const given of ["as a string", "from a function"]) test(`in Chromium: a read-only tab leaves a closed tab's unsent edits to a tab that may write (token ${given})`, async () => {
  const room = `e2e-leave-${given.replaceAll(" ", "-")}-${Date.now()}`;
  const url = base.replace("http", "ws") + "/ws";
  const p = await page();
  const result = await p.evaluate(async ({ url, room, given }) => {
    const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
    const write = () => window.nextToken({ sub: "w", room, access: "write", ttl: 600 });
    const read = () => window.nextToken({ sub: "r", room, access: "read", ttl: 600 });
    // Until no session record of the page is held (a closed client lets go of its record
    // once its last write is stored).
    const released = async () => {
      for (let i = 0; i < 100; i++) {
        const { held } = await navigator.locks.query();
        if (!held.some((l) => l.name.startsWith("pattern-mesh "))) return;
        await sleep(50);
      }
      throw new Error("a session record stayed held");
    };
    const unsent = await window.closeOffline(url, room);
    await released();
    const refused = [];
    const reader = await window.mesh.MeshClient.connect({
      url, room, persist: true,
      token: given === "as a string" ? await read() : read,
      on: { refused: (e) => refused.push(e.doc === "*" ? e.detail : `${e.kind} ${e.reason}`) },
    });
    for (let i = 0; i < 100 && reader.status !== "open"; i++) await sleep(50);
    await sleep(300);
    const readerPending = reader.pendingCount;
    reader.close();
    await released();
    const again = await window.mesh.MeshClient.connect({ url, room, persist: true, token: await write() });
    for (let i = 0; i < 100 && (again.status !== "open" || again.pendingCount > 0); i++) await sleep(50);
    again.close();
    await released();
    const check = await window.mesh.MeshClient.connect({ url, room, token: await write() });
    const text = check.text("content").toString();
    check.close();
    return { unsent, refused, readerPending, text };
  }, { url, room, given });
  assert.ok(result.unsent >= 1, `the writer closed with its edit unsent (${result.unsent})`);
  if (given === "as a string") {
    // It took a record of its own.
    assert.deepEqual(result.refused, [], "the read-only tab sent nothing of the writer's");
    assert.equal(result.readerPending, 0);
  } else {
    // It took the writer's record before its token came: it keeps the outbox, and says so.
    // (Told again at each connection.)
    assert.ok(result.refused.length >= 1, "told");
    for (const told of result.refused) {
      assert.match(told, /message\(s\) in this client's stored outbox are not sent: this member may only read/);
    }
    assert.equal(result.readerPending, result.unsent, "the outbox is kept");
  }
  assert.equal(result.text, "typed offline", "the writer's next tab sent it");
  assert.deepEqual(p.problems, []);
  await p.close();
});

// A tab reads only while a writer tab of the room closes with edits the relay never got: the
// reader leaves the writer's record alone. Its token then lets it write (a token function gives
// a token that may write at the next connection): it takes the record in and sends the edits.
// Before, the reader's periodic look claimed the record while it read only, let go of it, and
// never looked at it again, so the edits waited for the next tab of the room to open.
test("in Chromium: a tab that reads only takes in a closed tab's unsent edits once its token lets it write", async () => {
  const room = `e2e-later-${Date.now()}`;
  const url = base.replace("http", "ws") + "/ws";
  const p = await page();
  const result = await p.evaluate(async ({ url, room }) => {
    const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
    const write = () => window.nextToken({ sub: "w", room, access: "write", ttl: 600 });
    let access = "read";
    const reader = await window.mesh.MeshClient.connect({
      url, room, persist: true,
      token: () => window.nextToken({ sub: "r", room, access, ttl: 600 }),
    });
    for (let i = 0; i < 100 && (reader.status !== "open" || !reader.readOnly); i++) await sleep(50);
    const readOnly = reader.readOnly;
    const unsent = await window.closeOffline(url, room);
    // The writer's record is let go of once its last write is stored; the reader looks for
    // such records every 5 s.
    for (let i = 0; i < 100; i++) {
      const { held } = await navigator.locks.query();
      if (held.filter((l) => l.name.startsWith("pattern-mesh ")).length === 1) break;
      await sleep(50);
    }
    await sleep(6_000);
    access = "write";
    reader.dropConnection();
    for (let i = 0; i < 100 && (reader.status !== "open" || reader.readOnly); i++) await sleep(50);
    const writable = !reader.readOnly;
    let text = "";
    for (let i = 0; i < 30 && text !== "typed offline"; i++) {
      await sleep(500);
      const check = await window.mesh.MeshClient.connect({ url, room, token: await write() });
      text = check.text("content").toString();
      check.close();
    }
    reader.close();
    return { readOnly, unsent, writable, text };
  }, { url, room });
  assert.equal(result.readOnly, true);
  assert.ok(result.unsent >= 1, `the writer closed with its edit unsent (${result.unsent})`);
  assert.equal(result.writable, true);
  assert.equal(result.text, "typed offline", "the reader, now a writer, sent the closed tab's edit");
  assert.deepEqual(p.problems, []);
  await p.close();
});

// A page whose document diverged (a read-only page typed before its token was in, offline
// first) repairs it in place: `repair()` sets the refused edit aside and loads the room's
// document again, the text's listeners see the change, and the stored document is replaced, so
// that the page reopened shows the room's text with nothing set aside.
test("in Chromium: a diverged document is repaired in place, its listeners told, its stored copy replaced", async () => {
  const room = `e2e-repair-${Date.now()}`;
  const url = base.replace("http", "ws") + "/ws";
  const writer = await page();
  const reader = await page();
  await writer.evaluate(({ url, room }) => window.writeRoomText(url, room), { url, room });
  const result = await reader.evaluate(async ({ url, room }) => {
    const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
    const held = window.heldToken({ sub: "r", room, access: "read", ttl: 600 });
    const statuses = [];
    const client = await window.mesh.MeshClient.connect({
      url, room, persist: true, token: held.source,
      on: { status: (status, why) => statuses.push(`${status} ${why ?? ""}`) },
    });
    const text = client.text("content");
    // What an editor shows: the text as the listener's deltas build it.
    let shown = "";
    text.observe((delta) => {
      let at = 0, next = "";
      for (const step of delta) {
        if (step.retain !== undefined) { next += shown.slice(at, at + step.retain); at += step.retain; }
        else if (step.insert !== undefined) next += step.insert;
        else if (step.delete !== undefined) at += step.delete;
      }
      shown = next + shown.slice(at);
    });
    text.insert(0, "the reader's ");
    await held.release();
    for (let i = 0; i < 100 && !client.diverged; i++) await sleep(50);
    const diverged = client.diverged;
    const before = text.toString();
    const repaired = client.repair();
    for (let i = 0; i < 100 && (text.toString() !== "the room's text" || client.status !== "open"); i++) await sleep(50);
    const after = { text: text.toString(), shown, diverged: client.diverged, status: client.status, again: client.repair() };
    client.close();
    for (let i = 0; i < 100; i++) {
      const { held } = await navigator.locks.query();
      if (!held.some((l) => l.name.startsWith("pattern-mesh "))) break;
      await sleep(50);
    }
    const problems = [];
    const reopened = await window.mesh.MeshClient.connect({
      url, room, persist: true,
      token: await window.nextToken({ sub: "r", room, access: "read", ttl: 600 }),
      on: { error: (e) => problems.push(e.message) },
    });
    const stored = reopened.text("content").toString();
    reopened.close();
    return { diverged, before, repaired, after, statuses, stored, problems };
  }, { url, room });
  assert.equal(result.diverged, true);
  // (The room's text may not have come yet when the refusal did.)
  assert.match(result.before, /the reader's /);
  assert.equal(result.repaired, true);
  assert.deepEqual(result.after, {
    text: "the room's text", shown: "the room's text", diverged: false, status: "open", again: false,
  });
  assert.ok(result.statuses.some((s) => s.includes("diverged")), result.statuses.join("; "));
  assert.equal(result.stored, "the room's text", "the stored document was replaced");
  assert.deepEqual(result.problems, [], "nothing set aside at the reopen");
  for (const p of [writer, reader]) assert.deepEqual(p.problems, []);
  await Promise.all([writer.close(), reader.close()]);
});
