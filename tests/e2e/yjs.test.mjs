// The Yjs ecosystem through pattern-mesh, in real Chromium pages on a real relay: a Y.Doc with a
// Y.Text, a Y.Map and a Y.Array behind pattern-mesh/yjs's MeshProvider converges with a client
// on the built-in document; Y.UndoManager undoes local edits only, with remote edits in between;
// awareness states cross and leave with their page; the CodeMirror demo shows remote cursors.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { createRequire } from "node:module";
import { mkdir, readFile } from "node:fs/promises";
import { join } from "node:path";
import { root, startRelay, signToken, nowSeconds } from "../support/relay.mjs";

const require = createRequire(join(root, ".ci/package.json"));
const { chromium } = require("playwright-core");
const { build } = require("esbuild");
const artifacts = join(root, "tests/artifacts");

let relay, browser;

before(async () => {
  await mkdir(artifacts, { recursive: true });
  // A page script with Yjs, y-protocols and the package's provider, served by the relay from
  // www/build/ (ignored by git).
  await build({
    stdin: {
      contents: `
        import * as Y from "yjs";
        import { Awareness, encodeAwarenessUpdate } from "y-protocols/awareness";
        import init, { MeshClient } from "../pkg/pattern_mesh.js";
        import { MeshProvider } from "../pkg/yjs.js";
        import { EditorView, basicSetup } from "codemirror";
        import { yCollab } from "y-codemirror.next";
        await init({ module_or_path: new URL("../pkg/pattern_mesh_bg.wasm", location.href) });
        Object.assign(window, { Y, Awareness, encodeAwarenessUpdate, MeshClient, MeshProvider, EditorView, basicSetup, yCollab });
        document.body.dataset.ready = "true";`,
      resolveDir: join(root, "www"),
    },
    outfile: join(root, "www/build/yjs-test.js"),
    bundle: true,
    format: "esm",
    nodePaths: [join(root, ".ci/node_modules")],
    logLevel: "warning",
  });
  relay = await startRelay();
  browser = await chromium.launch({
    executablePath: "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking"],
  });
});

after(async () => {
  await browser?.close();
  await relay?.stop();
});

/** A blank page of the relay's with Yjs, the provider and the client loaded. */
async function blank() {
  const page = await browser.newPage();
  page.problems = [];
  page.on("pageerror", (e) => page.problems.push(e.message));
  page.on("console", (m) => { if (m.type() === "error") page.problems.push(m.text()); });
  await page.goto(`${relay.base}/pattern.html`);
  await page.evaluate(() => {
    document.body.removeAttribute("data-ready");
    const script = document.createElement("script");
    script.type = "module";
    script.src = "/build/yjs-test.js";
    document.head.append(script);
  });
  await page.waitForSelector("body[data-ready=true]");
  return page;
}

async function until(what, check, ms = 20_000) {
  const deadline = Date.now() + ms;
  let last;
  while (Date.now() < deadline) {
    last = await check();
    if (last === true) return;
    await new Promise((r) => setTimeout(r, 100));
  }
  assert.fail(`${what}: ${JSON.stringify(last)}`);
}

/** Joins `room` with a Y.Doc (and an Awareness named `name`) behind a MeshProvider. */
const joinYjs = (page, room, name) => page.evaluate(async ({ url, room, name }) => {
  const ydoc = new Y.Doc();
  const awareness = new Awareness(ydoc);
  awareness.setLocalStateField("user", { name, color: "#d1495b" });
  const provider = await MeshProvider.connect(ydoc, { url, room, name, awareness });
  window.errors = [];
  provider.client.on("anomaly", (a) => window.errors.push(`anomaly ${a.reason}: ${a.detail}`));
  provider.client.on("error", (e) => window.errors.push(`${e.name}: ${e.message}`));
  Object.assign(window, { ydoc, awareness, provider });
  return provider.client.node;
}, { url: relay.url, room, name });

const sortedVector = (page, expression) => page.evaluate((expression) => {
  const bytes = new Function("return " + expression)();
  return JSON.stringify([...Y.decodeStateVector(bytes)].sort((a, b) => a[0] - b[0]));
}, expression);

test("a Y.Doc with a text, a map and an array converges with a client on the built-in document", async () => {
  const room = `yjs-${Date.now()}`;
  const a = await blank();
  const b = await blank();
  await joinYjs(a, room, "ada");
  await b.evaluate(async ({ url, room }) => {
    window.client = await MeshClient.connect({ url, room, name: "bo" });
    window.text = window.client.text("content");
  }, { url: relay.url, room });

  await a.evaluate(() => {
    ydoc.getText("content").insert(0, "hello from Yjs");
    ydoc.getMap("settings").set("theme", "dark");
    ydoc.getMap("settings").set("size", 14);
    ydoc.getArray("items").push(["one", { two: 2 }, [3]]);
  });
  await until("the built-in client has the text", () =>
    b.evaluate(() => text.toString() === "hello from Yjs" || text.toString()));
  await b.evaluate(() => text.insert(text.length, ", and from yrs"));
  await until("the Y.Text has the built-in client's edit", () =>
    a.evaluate(() => ydoc.getText("content").toString() === "hello from Yjs, and from yrs" || ydoc.getText("content").toString()));

  // Same items on both sides (maps and arrays included), same checkpoint digest.
  await until("both documents hold the same items", async () => {
    const ours = await sortedVector(a, "Y.encodeStateVector(ydoc)");
    const theirs = await sortedVector(b, "client.stateVector()");
    return ours === theirs || [ours, theirs];
  });
  assert.equal(await a.evaluate(() => provider.client.digest), await b.evaluate(() => client.digest));

  // A late Y.Doc gets the map and the array from the room's log.
  const late = await blank();
  await joinYjs(late, room, "cy");
  await until("the late Y.Doc has everything", () => late.evaluate(() => {
    const got = {
      text: ydoc.getText("content").toString(),
      settings: ydoc.getMap("settings").toJSON(),
      items: ydoc.getArray("items").toJSON(),
    };
    return JSON.stringify(got) === JSON.stringify({
      text: "hello from Yjs, and from yrs",
      settings: { theme: "dark", size: 14 },
      items: ["one", { two: 2 }, [3]],
    }) || got;
  }));
  for (const page of [a, late]) {
    assert.deepEqual(await page.evaluate(() => window.errors), []);
    assert.deepEqual(page.problems, []);
  }
  for (const page of [a, b, late]) await page.close();
});

test("Y.UndoManager undoes this page's edits and keeps the remote ones between them", async () => {
  const room = `undo-${Date.now()}`;
  const a = await blank();
  const b = await blank();
  await joinYjs(a, room, "ada");
  await joinYjs(b, room, "bo");
  await a.evaluate(() => {
    window.undo = new Y.UndoManager(ydoc.getText("content"), { captureTimeout: 0 });
    ydoc.getText("content").insert(0, "local ");
  });
  await until("b has a's edit", () => b.evaluate(() => ydoc.getText("content").toString() === "local " || ydoc.getText("content").toString()));
  await b.evaluate(() => ydoc.getText("content").insert(6, "remote"));
  await until("a has b's edit", () => a.evaluate(() => ydoc.getText("content").toString() === "local remote" || ydoc.getText("content").toString()));
  await a.evaluate(() => undo.undo());
  assert.equal(await a.evaluate(() => ydoc.getText("content").toString()), "remote");
  await until("b sees the undo", () => b.evaluate(() => ydoc.getText("content").toString() === "remote" || ydoc.getText("content").toString()));
  await a.evaluate(() => undo.redo());
  await until("b sees the redo", () => b.evaluate(() => ydoc.getText("content").toString() === "local remote" || ydoc.getText("content").toString()));
  for (const page of [a, b]) {
    assert.deepEqual(await page.evaluate(() => window.errors), []);
    await page.close();
  }
});

test("a Y.Doc observer that calls the client during a remote update gets a BusyError, and the client goes on", async () => {
  const room = `busy-${Date.now()}`;
  const a = await blank();
  const b = await blank();
  await joinYjs(a, room, "ada");
  await joinYjs(b, room, "bo");
  await b.evaluate(() => {
    window.seen = [];
    ydoc.getText("content").observe(() => {
      try { seen.push(provider.client.status); } catch (e) { seen.push(e.name); }
      // What the observer defers runs once the client is free again.
      queueMicrotask(() => seen.push(provider.client.status));
    });
  });
  await a.evaluate(() => ydoc.getText("content").insert(0, "one"));
  await until("b saw the edit", () => b.evaluate(() => seen.length >= 2 || seen));
  assert.deepEqual(await b.evaluate(() => seen), ["BusyError", "open"]);
  await b.evaluate(() => ydoc.getText("content").insert(3, " two"));
  await until("a has b's later edit", () => a.evaluate(() => ydoc.getText("content").toString() === "one two" || ydoc.getText("content").toString()));
  assert.deepEqual(await b.evaluate(() => window.errors), []);
  await Promise.all([a.close(), b.close()]);
});

test("awareness states cross through presence and leave with their page", async () => {
  const room = `aware-${Date.now()}`;
  const a = await blank();
  const b = await blank();
  await joinYjs(a, room, "ada");
  await joinYjs(b, room, "bo");
  const names = (page) => page.evaluate(() =>
    [...awareness.getStates().values()].map((s) => s.user?.name).sort().join(","));
  await until("both see both", async () => (await names(a)) === "ada,bo" && (await names(b)) === "ada,bo" || [await names(a), await names(b)]);
  await a.evaluate(() => awareness.setLocalStateField("cursor", { anchor: 3, head: 5 }));
  await until("b sees a's cursor", () => b.evaluate(() =>
    [...awareness.getStates().values()].some((s) => s.user?.name === "ada" && s.cursor?.head === 5) || "not yet"));
  await a.close();
  await until("a's state leaves b", async () => (await names(b)) === "bo" || names(b));
  await b.close();
});

// A member whose connection dropped for a moment left the others' awareness (they heard it
// leave), and came back with the same awareness state at the same clock, which y-protocols
// ignored: its cursor stayed hidden until its next renewal, 15 s later.
test("a member's cursor shows again as soon as it is back from a dropped connection", async () => {
  const room = `aware-back-${Date.now()}`;
  const a = await blank();
  const b = await blank();
  await joinYjs(a, room, "ada");
  await joinYjs(b, room, "bo");
  const bo = await b.evaluate(() => ydoc.clientID);
  await b.evaluate(() => awareness.setLocalStateField("cursor", { anchor: 1, head: 1 }));
  const shown = () => a.evaluate((bo) => awareness.getStates().get(bo)?.cursor?.head === 1, bo);
  await until("a sees bo's cursor", async () => (await shown()) || "not yet");
  await b.evaluate(() => provider.client.dropConnection());
  await until("bo's cursor leaves with its connection", async () => !(await shown()) || "still shown");
  const started = Date.now();
  await until("bo's cursor is back", async () => (await shown()) || "not yet");
  assert.ok(Date.now() - started < 5_000, `back after ${Date.now() - started} ms`);
  for (const page of [a, b]) await page.close();
});

test("a member cannot move or rename another member's cursor through its own presence", async () => {
  const room = `spoof-${Date.now()}`;
  const a = await blank();
  const b = await blank();
  await joinYjs(a, room, "ada");
  await joinYjs(b, room, "bo");
  const ada = await a.evaluate(() => ydoc.clientID);
  await until("b sees ada", () => b.evaluate((ada) => awareness.getStates().get(ada)?.user?.name === "ada" || "not yet", ada));
  await b.evaluate(() => { window.refusals = []; provider.onError((e) => refusals.push(e.message)); });
  // Mallory, a member on a plain client, speaks for ada's client id with a newer clock, and then
  // for two clients at once.
  const mallory = await blank();
  await mallory.evaluate(async ({ url, room, ada }) => {
    const client = await MeshClient.connect({ url, room, name: "mallory" });
    const forged = (ids) => {
      const doc = new Y.Doc();
      doc.clientID = ids[0];
      const aw = new Awareness(doc);
      for (let i = 0; i < 50; i++) aw.setLocalStateField("user", { name: "mallory as ada", color: "#000" });
      const more = ids.slice(1).map((id) => { const d = new Y.Doc(); d.clientID = id; const w = new Awareness(d); w.setLocalStateField("user", { name: "ghost" }); return w; });
      for (const w of more) aw.states.set(w.clientID, w.getLocalState()), aw.meta.set(w.clientID, w.meta.get(w.clientID));
      return btoa(String.fromCharCode(...encodeAwarenessUpdate(aw, ids)));
    };
    // Again and again: it is told once.
    for (let i = 0; i < 5; i++) {
      client.setPresence({ yjs: { client: ada, awareness: forged([ada]) } });
      await new Promise((r) => setTimeout(r, 100));
    }
    client.setPresence({ yjs: { client: 12345, awareness: forged([12345, ada]) } });
    await new Promise((r) => setTimeout(r, 300));
    client.setPresence({ yjs: { client: 777, awareness: "%%% not base64" } });
    await new Promise((r) => setTimeout(r, 300));
    // A new client id in every presence: y-protocols keeps each one's clock for good.
    const doc = new Y.Doc();
    const aw = new Awareness(doc);
    for (let i = 0; i < 300; i++) {
      doc.clientID = 100000 + i;
      aw.clientID = doc.clientID;
      // Twice: y-protocols takes a remote state from its second clock on.
      aw.setLocalState({ user: { name: `mallory ${i}` } });
      aw.setLocalState({ user: { name: `mallory ${i}` } });
      client.setPresence({ yjs: { client: doc.clientID, awareness: btoa(String.fromCharCode(...encodeAwarenessUpdate(aw, [doc.clientID]))) } });
      aw.states.delete(doc.clientID);
    }
    window.mallory = client;
  }, { url: relay.url, room, ada });
  await until("b refused all three", () => b.evaluate(() => refusals.length >= 3 || refusals));
  await until("b has mallory's last state", () => b.evaluate(() => awareness.getStates().get(100299)?.user?.name === "mallory 299" || "not yet"));
  const refusals = await b.evaluate(() => refusals);
  assert.equal(refusals.length, 3, JSON.stringify(refusals));
  assert.match(refusals[0], /client \d+ is node \d+'s/);
  assert.match(refusals[1], /exactly one client's state/);
  assert.match(refusals[2], /not base64/);
  // Ada keeps her client id: her name and her later cursor are shown, not mallory's.
  assert.equal(await b.evaluate((ada) => awareness.getStates().get(ada)?.user?.name ?? "none", ada), "ada");
  assert.equal(await b.evaluate(() => awareness.getStates().has(12345)), false);
  await a.evaluate(() => awareness.setLocalStateField("cursor", { anchor: 1, head: 2 }));
  await until("b sees ada's cursor", () => b.evaluate((ada) => awareness.getStates().get(ada)?.cursor?.head === 2 || "not yet", ada));
  // What b keeps of mallory's states: its last one, not three hundred clocks.
  assert.ok(await b.evaluate(() => awareness.meta.size) <= 4, "y-protocols' clocks are bounded");
  // Once mallory leaves, its client id's clock goes too.
  await mallory.evaluate(() => mallory.close());
  await until("mallory's state leaves", () => b.evaluate(() => !awareness.getStates().has(100299) || "still there"));
  assert.equal(await b.evaluate(() => awareness.meta.has(100299)), false);
  for (const page of [a, b, mallory]) await page.close();
});

test("an image a Yjs editor embeds takes one character in the textarea editor, and what is typed after it lands there", async () => {
  const room = `doc-embed-${Date.now()}`;
  const a = await blank();
  await joinYjs(a, room, "ada");
  await a.evaluate(() => {
    const text = ydoc.getText("content");
    text.insert(0, "ab😀cd");
    // What a rich-text editor (Quill, ProseMirror through y-prosemirror's text) puts in a text.
    text.insertEmbed(2, { image: "cat.png" });
  });
  const b = await browser.newPage();
  b.problems = [];
  b.on("pageerror", (e) => b.problems.push(e.message));
  await b.goto(`${relay.base}/textarea.html?room=${room}&persist=0`);
  await b.waitForSelector("body[data-ready=true]");
  const shown = "ab\uFFFC😀cd";
  await until("the textarea shows the embed as one character", () => b.evaluate((shown) => {
    const value = document.getElementById("editor").value;
    return (value === shown && window.meshText.toString() === shown && window.meshText.length === shown.length) || value;
  }, shown));
  // The user clicks after the "c" and types.
  await b.evaluate(() => {
    const editor = document.getElementById("editor");
    const at = editor.value.indexOf("c") + 1;
    editor.focus();
    editor.setSelectionRange(at, at);
  });
  await b.keyboard.type("X");
  await until("the Y.Doc has the X after the c, and the image where it was", () => a.evaluate(() =>
    JSON.stringify(ydoc.getText("content").toDelta()) === JSON.stringify([{ insert: "ab" }, { insert: { image: "cat.png" } }, { insert: "😀cXd" }])
      || ydoc.getText("content").toDelta()));
  // A remote edit after the image reaches the textarea at its place.
  await a.evaluate(() => ydoc.getText("content").insert(7, "!"));
  await until("the textarea has the remote edit after the image", () => b.evaluate(() =>
    document.getElementById("editor").value === "ab\uFFFC😀cX!d" || document.getElementById("editor").value));
  assert.deepEqual(await a.evaluate(() => window.errors), []);
  for (const page of [a, b]) assert.deepEqual(page.problems, []);
  await Promise.all([a.close(), b.close()]);
});

test("destroy() right after an edit delivers the edit before it closes, and says what did not arrive", async () => {
  const room = `destroy-${Date.now()}`;
  const a = await blank();
  const b = await blank();
  await joinYjs(a, room, "ada");
  await joinYjs(b, room, "bo");
  const left = await a.evaluate(async () => {
    ydoc.getText("content").insert(0, "the last words");
    return await provider.destroy();
  });
  assert.equal(left, 0);
  await until("b has the edit made just before destroy()", () => b.evaluate(() =>
    ydoc.getText("content").toString() === "the last words" || ydoc.getText("content").toString()));
  // Offline, nothing can arrive: destroy() says so instead of waiting.
  const c = await blank();
  await joinYjs(c, room, "cy");
  const offline = await c.evaluate(async () => {
    provider.client.dropConnection();
    ydoc.getText("content").insert(0, "typed offline, ");
    const heard = [];
    provider.onError((e) => heard.push(e.message));
    const left = await provider.destroy({ wait: 1_000 });
    return { left, heard };
  });
  assert.ok(offline.left > 0, JSON.stringify(offline));
  assert.match(offline.heard.join(" "), /not acknowledged|did not reach the room/);
  assert.deepEqual(await b.evaluate(() => window.errors), []);
  for (const page of [a, b, c]) await page.close();
});

// A writer whose Y.Doc held the room's text when it connected (y-indexeddb loaded it, or the
// page connected again after destroy()) sent its whole Y.Doc as a new update: every page load
// stored another copy of the document in the room's log and sent it to every member, and near
// the room's byte limit the copy was refused as `full` and the provider said its edits no longer
// reached the room. It sends what the room lacks, and nothing when it lacks nothing.
test("a writer that connects with the room's text sends only what the room lacks", async () => {
  const room = `reconnect-${Date.now()}`;
  const a = await blank();
  const b = await blank();
  await joinYjs(a, room, "ada");
  await joinYjs(b, room, "bo");
  // Destroys a's provider, makes `offline` edit (if any), and connects a new one: what it sends.
  const reconnect = (offline) => a.evaluate(async ({ url, room, offline }) => {
    await provider.destroy();
    if (offline) ydoc.getText("content").insert(0, offline);
    const sizes = [];
    const send = MeshClient.prototype.sendUpdate;
    MeshClient.prototype.sendUpdate = function (doc, update) {
      sizes.push(update.length);
      return send.call(this, doc, update);
    };
    try {
      window.provider = await MeshProvider.connect(ydoc, { url, room, name: "ada", awareness });
      await new Promise((r) => setTimeout(r, 300));
      return sizes;
    } finally {
      MeshClient.prototype.sendUpdate = send;
    }
  }, { url: relay.url, room, offline });
  await a.evaluate(() => ydoc.getText("content").insert(0, "x".repeat(20_000)));
  await until("b has the text", () => b.evaluate(() => ydoc.getText("content").length === 20_000 || ydoc.getText("content").length));
  assert.deepEqual(await reconnect(null), [], "nothing new, nothing sent");
  // An edit made while the provider was away goes, alone.
  const sizes = await reconnect("offline ");
  assert.equal(sizes.length, 1, JSON.stringify(sizes));
  assert.ok(sizes[0] < 1_000, `the edit, not the document: ${sizes[0]} bytes`);
  await until("b has the offline edit", () => b.evaluate(() => ydoc.getText("content").toString().startsWith("offline x") || ydoc.getText("content").toString().slice(0, 20)));
  assert.deepEqual(await a.evaluate(() => [provider.diverged, window.errors]), [false, []]);
  for (const page of [a, b]) await page.close();
});

test("destroy() called from a Y.Doc observer or update listener delivers the edit that set it off", async () => {
  const room = `destroy-observer-${Date.now()}`;
  const a = await blank();
  const b = await blank();
  await joinYjs(a, room, "ada");
  await joinYjs(b, room, "bo");
  // Yjs calls observers, and then the update listeners in the order they were added, before
  // the provider's own update listener hears the transaction's update.
  const left = await a.evaluate(async () => {
    const meta = ydoc.getMap("meta");
    let destroyed;
    meta.observe(() => {
      if (meta.get("state") === "final") destroyed = provider.destroy();
    });
    meta.set("state", "final");
    return await destroyed;
  });
  assert.equal(left, 0);
  await until("b has the edit that set off destroy() in an observer", () => b.evaluate(() =>
    ydoc.getMap("meta").get("state") === "final" || String(ydoc.getMap("meta").get("state"))));
  const c = await blank();
  const left2 = await c.evaluate(async ({ url, room }) => {
    const ydoc = new Y.Doc();
    let destroyed, provider;
    // An update listener of the application's, added before the provider's.
    ydoc.on("update", () => {
      if (ydoc.getMap("meta").get("closing") === true) destroyed ??= provider.destroy();
    });
    provider = await MeshProvider.connect(ydoc, { url, room });
    ydoc.getMap("meta").set("closing", true);
    return await destroyed;
  }, { url: relay.url, room });
  assert.equal(left2, 0);
  await until("b has the edit that set off destroy() in an update listener", () => b.evaluate(() =>
    ydoc.getMap("meta").get("closing") === true || String(ydoc.getMap("meta").get("closing"))));
  for (const page of [a, b, c]) await page.close();
});

test("a panic in the module reaches the provider's error listeners, and the Y.Doc counts as diverged", async () => {
  const a = await blank();
  await joinYjs(a, `panic-${Date.now()}`, "ada");
  const got = await a.evaluate(async () => {
    const heard = [];
    provider.onError((e) => heard.push(`${e.name}: ${e.message}`));
    try { provider.client.__panicForTests("a test panic"); } catch {}
    await new Promise((r) => setTimeout(r, 200));
    // An edit after it reaches the listeners too, not the page as an uncaught exception.
    ydoc.getText("content").insert(0, "after the panic");
    await new Promise((r) => setTimeout(r, 200));
    return { heard, diverged: provider.diverged };
  });
  assert.equal(got.heard.length, 2, JSON.stringify(got.heard));
  assert.match(got.heard[0], /^PanicError: /);
  assert.equal(got.diverged, true);
  // destroy() after it resolves with what the client had not delivered (the PanicError's
  // count), as it does for a live client: it rejected with the stale instance's plain Error.
  const destroyed = await a.evaluate(async () => {
    try { return { left: await provider.destroy() }; } catch (e) { return { threw: `${e.name}: ${e.message}` }; }
  });
  assert.deepEqual(destroyed, { left: 0 });
  assert.deepEqual(a.problems.filter((p) => !/unreachable|a test panic/.test(p)), []);
  await a.close();
});

// An application that unmounts a document calls ydoc.destroy(), which drops every listener of
// the Y.Doc: the provider heard nothing, its client stayed in the room (holding a place of the
// room's and the user's caps, its socket and heartbeats), and the member stayed listed.
test("ydoc.destroy() destroys its provider: the edit made before it arrives, and the member leaves", async () => {
  const room = `ydoc-destroy-${Date.now()}`;
  const a = await blank();
  const b = await blank();
  const node = await joinYjs(a, room, "ada");
  await joinYjs(b, room, "bo");
  await until("b lists a", () => b.evaluate((node) => provider.client.peers.some((p) => p.node === node), node));
  await a.evaluate(() => {
    ydoc.getText("content").insert(0, "typed before the unmount");
    ydoc.destroy();
  });
  await until("b has the edit made before ydoc.destroy()", () => b.evaluate(() =>
    ydoc.getText("content").toString() === "typed before the unmount" || ydoc.getText("content").toString()));
  await until("a's client closed", () => a.evaluate(() => provider.client.status === "closed" || provider.client.status));
  await until("b no longer lists a", () => b.evaluate((node) => !provider.client.peers.some((p) => p.node === node), node));
  // Unmounted while its provider still connects: the client closes once it is there.
  const late = await a.evaluate(async ({ url, room }) => {
    const ydoc = new Y.Doc();
    const connecting = MeshProvider.connect(ydoc, { url, room, name: "gone" });
    ydoc.destroy();
    const provider = await connecting;
    window.late = provider;
    return provider.client.node;
  }, { url: relay.url, room });
  await until("the late client closed", () => a.evaluate(() => window.late.client.status === "closed" || window.late.client.status));
  await until("b does not list the late client", () => b.evaluate((node) => !provider.client.peers.some((p) => p.node === node), late));
  assert.deepEqual(a.problems, []);
  for (const page of [a, b]) await page.close();
});

test("what cannot be sent while a provider connects reaches on.error, not only the console", async () => {
  // A relay whose messages are at most 64 KiB, and a Y.Doc loaded with 80 KB before connect.
  const small = await startRelay({ PM_MAX_FRAME: "16384", PM_MAX_MESSAGE: "65536" });
  try {
    const page = await blank();
    const heard = await page.evaluate(async ({ url }) => {
      const ydoc = new Y.Doc();
      ydoc.getText("content").insert(0, "x".repeat(80_000));
      const heard = [];
      const provider = await MeshProvider.connect(ydoc, { url, room: `big-${Date.now()}`, on: { error: (e) => heard.push(`${e.name}: ${e.message}`) } });
      await new Promise((r) => setTimeout(r, 200));
      provider.client.close();
      return heard;
    }, { url: small.url });
    assert.equal(heard.length, 1, JSON.stringify(heard));
    assert.match(heard[0], /^RangeError: /);
    await page.close();
  } finally {
    await small.stop();
  }
});

test("when the relay refuses a Y.Doc's update, the edits built on it are refused too, and no other replica waits for them", async () => {
  // A room the relay caps at 50,000 bytes: a 60 KB paste is refused (`full`), and every later
  // edit of that Y.Doc builds on it (its clocks follow the paste's), so no other replica could
  // show it: the relay refuses it too, instead of every replica holding it back.
  const small = await startRelay({ PM_MAX_ROOM_BYTES: "50000" });
  try {
    const room = `full-${Date.now()}`;
    const [a, b] = [await blank(), await blank()];
    const joinAt = (page, name) => page.evaluate(async ({ url, room, name }) => {
      const ydoc = new Y.Doc();
      window.events = [];
      const provider = await MeshProvider.connect(ydoc, { url, room, name });
      provider.client.on("refused", (r) => events.push(`refused ${r.reason}`));
      provider.client.on("anomaly", (a) => events.push(`anomaly ${a.reason}: ${a.detail}`));
      provider.onError((e) => events.push(`error ${e.message}`));
      Object.assign(window, { ydoc, provider });
    }, { url: small.url, room, name });
    await joinAt(a, "ada");
    await joinAt(b, "bo");
    await a.evaluate(() => ydoc.getText("content").insert(0, "before "));
    await until("b has the first edit", () => b.evaluate(() => ydoc.getText("content").toString() === "before " || ydoc.getText("content").toString()));
    await a.evaluate(() => ydoc.getText("content").insert(7, "x".repeat(60_000)));
    await until("a hears its paste refused", () => a.evaluate(() => events.some((e) => e === "refused full") || events));
    // The provider says so too, and marks itself diverged; the other is not.
    const told = await a.evaluate(() => ({ diverged: provider.diverged, error: events.find((e) => e.startsWith("error ")) }));
    assert.equal(told.diverged, true);
    assert.match(told.error, /refused an update of this Y\.Doc \(full: .*no other member shows/);
    assert.equal(await b.evaluate(() => provider.diverged), false);
    await a.evaluate(() => ydoc.getText("content").insert(0, "typed after, "));
    await until("a hears the edit after the paste refused for the paste's clocks", () => a.evaluate(() =>
      events.some((e) => e.startsWith("error ") && e.includes("(malformed:") && e.includes("which no one has written")) || events));
    assert.equal(await b.evaluate(() => ydoc.getText("content").toString()), "before ");
    assert.deepEqual(await b.evaluate(() => events.filter((e) => e.startsWith("anomaly"))), []);
    for (const page of [a, b]) await page.close();
  } finally {
    await small.stop();
  }
});

test("a Y.Doc that holds back a delete it cannot apply yet still gives the room what it shows", async () => {
  const room = `held-${Date.now()}`;
  const [a, b] = [await blank(), await blank()];
  const held = await a.evaluate(async ({ url, room }) => {
    // A delete of clocks this Y.Doc never got, which Yjs holds back, then an edit of its own.
    const other = new Y.Doc();
    other.getText("content").insert(0, "never sent");
    const before = Y.encodeStateVector(other);
    other.getText("content").delete(0, 6);
    const ydoc = new Y.Doc();
    Y.applyUpdate(ydoc, Y.encodeStateAsUpdate(other, before));
    ydoc.getText("content").insert(0, "shown");
    const held = ydoc.store.pendingDs !== null;
    window.errors = [];
    const provider = await MeshProvider.connect(ydoc, { url, room, name: "ada" });
    provider.onError((e) => window.errors.push(e.message));
    Object.assign(window, { ydoc, provider });
    return held;
  }, { url: relay.url, room });
  assert.equal(held, true);
  await joinYjs(b, room, "bo");
  await until("the other Y.Doc shows what this one shows", () => b.evaluate(() =>
    ydoc.getText("content").toString() === "shown" || ydoc.getText("content").toString()));
  assert.deepEqual(await a.evaluate(() => window.errors), []);
  for (const page of [a, b]) await page.close();
});

test("the editor demo shows an update the relay refused, in its panel", async () => {
  const small = await startRelay({ PM_MAX_ROOM_BYTES: "50000" });
  try {
    const page = await browser.newPage();
    page.problems = [];
    page.on("pageerror", (e) => page.problems.push(e.message));
    await page.goto(`${small.base}/index.html?room=full-editor-${Date.now()}&name=ada`);
    await page.waitForSelector("body[data-ready=true]");
    await page.evaluate(() => meshDoc.getText("content").insert(0, "x".repeat(60_000)));
    await until("the panel says so", async () => {
      const log = await page.evaluate(() => document.getElementById("log").textContent);
      return (log.includes("refused an update of this Y.Doc") && log.includes("will never reach the room")) || log;
    });
    assert.equal(await page.evaluate(() => meshProvider.diverged), true);
    assert.deepEqual(page.problems, []);
    await page.close();
  } finally {
    await small.stop();
  }
});

test("a 3 MB paste into a Y.Text reaches the other Y.Doc, and edits after it too", async () => {
  const room = `paste-${Date.now()}`;
  const a = await blank();
  const b = await blank();
  await joinYjs(a, room, "ada");
  await joinYjs(b, room, "bo");
  await a.evaluate(() => {
    const text = ydoc.getText("content");
    text.insert(0, "x".repeat(3_000_000));
    text.insert(text.length, " and after");
  });
  await until("b has the paste and the edit after it", () => b.evaluate(() => {
    const text = ydoc.getText("content").toString();
    return (text.length === 3_000_010 && text.endsWith(" and after")) || text.length;
  }), 60_000);
  assert.deepEqual(await a.evaluate(() => window.errors), []);
  assert.deepEqual(await b.evaluate(() => window.errors), []);
  await Promise.all([a.close(), b.close()]);
});

test("the CodeMirror demo: two pages edit one text and each shows the other's cursor with its name", async () => {
  const room = `doc-cm-${Date.now()}`;
  const open = async (name) => {
    const page = await browser.newPage({ viewport: { width: 1200, height: 760 } });
    page.problems = [];
    page.on("pageerror", (e) => page.problems.push(e.message));
    await page.addInitScript((name) => localStorage.setItem("pattern-mesh-name", name), name);
    await page.goto(`${relay.base}/index.html?room=${room}`);
    await page.waitForSelector("body[data-ready=true]");
    return page;
  };
  const a = await open("ada");
  const b = await open("bo");
  await a.click(".cm-content");
  await a.keyboard.type("Shared notes, typed in CodeMirror.\nSecond line from ada.");
  const docOf = (page) => page.evaluate(() => meshView.state.doc.toString());
  await until("b's editor has a's text", async () => (await docOf(b)).includes("Second line from ada.") || docOf(b));
  await b.click(".cm-content");
  await b.keyboard.press("Control+End");
  await b.keyboard.type("\nA line from bo.");
  await until("a's editor has b's line", async () => (await docOf(a)).endsWith("A line from bo.") || docOf(a));
  // Remote carets carry the other member's name.
  await until("a shows bo's caret", () => a.evaluate(() =>
    [...document.querySelectorAll(".cm-ySelectionInfo")].some((e) => e.textContent === "bo") || "no caret"));
  await b.keyboard.press("Shift+Home");
  await until("b shows ada's caret", () => b.evaluate(() =>
    [...document.querySelectorAll(".cm-ySelectionInfo")].some((e) => e.textContent === "ada") || "no caret"));
  assert.equal(await docOf(a), await docOf(b));
  await a.screenshot({ path: join(artifacts, "codemirror.png") });
  // Undo in one page takes back that page's typing only; the other member's line stays.
  await a.click(".cm-content");
  await a.keyboard.press("Control+z");
  await until("b's editor has a's typing undone and its own line", async () => {
    const text = await docOf(b);
    return (!text.includes("ada") && text.includes("A line from bo.")) || text;
  });
  assert.deepEqual(a.problems, []);
  assert.deepEqual(b.problems, []);
  await a.close();
  await b.close();
});

test("the README's Yjs example works as written", async () => {
  const readme = await readFile(join(root, "README.md"), "utf8");
  const example = readme.split("### Yjs: any Y.Doc, editor bindings, cursors")[1].match(/```js\n([\s\S]*?)```/)[1];
  const room = `readme-yjs-${Date.now()}`;
  const body = example
    .split("\n")
    .filter((line) => !line.startsWith("import ") && line.trim() !== "await init();")
    .join("\n")
    .replace("ws://127.0.0.1:8080/ws", relay.url)
    .replace('room: "notes"', `room: "${room}"`);
  const page = await blank();
  await page.evaluate(async (body) => {
    const AsyncFunction = (async () => {}).constructor;
    const run = new AsyncFunction("Y", "Awareness", "EditorView", "basicSetup", "yCollab", "MeshProvider",
      `${body}\nwindow.provider = provider; window.ytext = ytext;`);
    await run(Y, Awareness, EditorView, basicSetup, yCollab, MeshProvider);
  }, body);
  const other = await blank();
  await joinYjs(other, room, "bo");
  await other.evaluate(() => ydoc.getText("content").insert(0, "typed elsewhere"));
  await until("the README's editor shows the edit", () => page.evaluate(() =>
    document.querySelector(".cm-content")?.textContent === "typed elsewhere" || document.querySelector(".cm-content")?.textContent));
  assert.deepEqual(page.problems, []);
  await Promise.all([page.close(), other.close()]);
});

test("a member that may only read is not taken for diverged: its Y.Doc's earlier state and Yjs's own cleanups are not sent", async () => {
  // A viewer (a token that reads only) whose Y.Doc holds what the room holds (loaded by
  // y-indexeddb, say) before it connects; and a writer that formats a word and deletes it:
  // Yjs then removes the formatting marks on every other replica, in a transaction of its own.
  // The viewer sent both as its edits, had them refused (`forbidden`) and counted its Y.Doc as
  // diverged, with an error that blamed edits it never made.
  const secret = "the provider's token test secret, 32";
  const secured = await startRelay({ PM_AUTH_KEY: secret });
  try {
    const room = `viewer-${Date.now()}`;
    const token = (access) => signToken(secret, { sub: access, room, access, exp: nowSeconds() + 600 });
    const [writer, viewer] = [await blank(), await blank()];
    await writer.evaluate(async ({ url, room, token }) => {
      window.ydoc = new Y.Doc();
      window.provider = await MeshProvider.connect(ydoc, { url, room, token });
      ydoc.getText("content").insert(0, "plain bold plain");
      ydoc.getText("content").format(6, 4, { bold: true });
    }, { url: secured.url, room, token: token("write") });
    const join = () => viewer.evaluate(async ({ url, room, token }) => {
      window.heard = [];
      const ydoc = new Y.Doc();
      // What a y-indexeddb of an earlier visit would load: the room's text as it was.
      if (window.earlier) Y.applyUpdate(ydoc, window.earlier);
      window.ydoc = ydoc;
      window.provider = await MeshProvider.connect(ydoc, { url, room, token, on: { error: (e) => heard.push(`${e.name}: ${e.message}`) } });
      provider.client.on("refused", (r) => heard.push(`refused ${r.reason}: ${r.detail}`));
    }, { url: secured.url, room, token: token("read") });
    await join();
    await until("the viewer has the text", () =>
      viewer.evaluate(() => ydoc.getText("content").toString() === "plain bold plain" || ydoc.getText("content").toString()));
    await viewer.evaluate(async () => {
      window.earlier = Y.encodeStateAsUpdate(ydoc);
      await provider.destroy();
    });
    await join();
    await writer.evaluate(() => ydoc.getText("content").delete(6, 5));
    await until("the viewer has the deletion", () =>
      viewer.evaluate(() => ydoc.getText("content").toString() === "plain plain" || ydoc.getText("content").toString()));
    // Two replicas that italicised the same word at once, merged into the writer's Y.Doc: the
    // marks come twice, and every replica that receives them removes the extra ones.
    await writer.evaluate(() => {
      const base = Y.encodeStateAsUpdate(ydoc);
      const [one, two] = [new Y.Doc(), new Y.Doc()];
      for (const other of [one, two]) {
        Y.applyUpdate(other, base);
        other.getText("content").format(0, 5, { italic: true });
      }
      for (const other of [one, two]) Y.applyUpdate(ydoc, Y.encodeStateAsUpdate(other, Y.encodeStateVector(ydoc)));
    });
    await until("the viewer has the italics", () =>
      viewer.evaluate(() => ydoc.getText("content").toDelta()[0]?.attributes?.italic === true || ydoc.getText("content").toDelta()));
    await new Promise((r) => setTimeout(r, 500));
    assert.deepEqual(await viewer.evaluate(() => ({ heard, diverged: provider.diverged })), { heard: [], diverged: false });
    // What the viewer's Y.Doc holds that the room does not is still refused, and said so.
    await viewer.evaluate(() => ydoc.getText("content").insert(0, "mine "));
    await until("the viewer's own edit is refused", () =>
      viewer.evaluate(() => provider.diverged && heard.some((h) => h.startsWith("refused forbidden")) || heard));
    await writer.close();
    await viewer.close();
  } finally {
    await secured.stop();
  }
});

// A viewer's page that opens y-indexeddb without awaiting `whenSynced` gets the stored copy of
// the room while its provider connects, as an update of the indexeddb's origin: the provider
// sent it as the viewer's edit, the relay refused it (`forbidden`), and the Y.Doc counted as
// diverged, for an edit no one made. A writer sent its whole stored copy again.
test("what a Y.Doc loads while its provider connects is sent only where the room lacks it", async () => {
  const secret = "the provider's token test secret, 32";
  const secured = await startRelay({ PM_AUTH_KEY: secret });
  try {
    const room = `loading-${Date.now()}`;
    const token = (access) => signToken(secret, { sub: access, room, access, exp: nowSeconds() + 600 });
    const [writer, viewer] = [await blank(), await blank()];
    const stored = await writer.evaluate(async ({ url, room, token }) => {
      window.ydoc = new Y.Doc();
      window.provider = await MeshProvider.connect(ydoc, { url, room, token });
      ydoc.getText("content").insert(0, "what the room holds");
      ydoc.getMap("settings").set("theme", "dark");
      while (provider.client.pendingCount > 0) await new Promise((r) => setTimeout(r, 20));
      return [...Y.encodeStateAsUpdate(ydoc)];
    }, { url: secured.url, room, token: token("write") });
    // The page loads its stored copy (`new IndexeddbPersistence(room, ydoc)`, not awaited)
    // while the provider connects.
    const connect = (page, access) => page.evaluate(async ({ url, room, token, stored }) => {
      window.heard = [];
      window.sent = 0;
      const ydoc = new Y.Doc();
      const connecting = MeshProvider.connect(ydoc, { url, room, token, on: { error: (e) => heard.push(`${e.name}: ${e.message}`) } });
      Y.applyUpdate(ydoc, new Uint8Array(stored), "y-indexeddb");
      window.ydoc = ydoc;
      window.provider = await connecting;
      provider.client.on("refused", (r) => heard.push(`refused ${r.reason}: ${r.detail}`));
      const send = provider.client.sendUpdate.bind(provider.client);
      provider.client.sendUpdate = (doc, update) => { window.sent += update.length; return send(doc, update); };
    }, { url: secured.url, room, token: token(access), stored });
    await connect(viewer, "read");
    await new Promise((r) => setTimeout(r, 500));
    assert.deepEqual(await viewer.evaluate(() => ({
      heard, diverged: provider.diverged, text: ydoc.getText("content").toString(), theme: ydoc.getMap("settings").get("theme"),
    })), { heard: [], diverged: false, text: "what the room holds", theme: "dark" });
    // A writer's stored copy holds nothing new either: nothing of it is sent again. What it
    // loads that the room lacks is sent, alone.
    const second = await blank();
    await connect(second, "write");
    await new Promise((r) => setTimeout(r, 300));
    assert.deepEqual(await second.evaluate(() => ({ heard, sent, diverged: provider.diverged })), { heard: [], sent: 0, diverged: false });
    await viewer.close();
    await writer.close();
    await second.close();
  } finally {
    await secured.stop();
  }
});

// A viewer whose observer deletes text while a remote update is applied: the provider took the
// deletion for Yjs's own removal of formatting marks, which a viewer leaves to the writers, and
// dropped it. The viewer's Y.Doc no longer showed what the room holds, and nothing said so.
test("a viewer's observer that deletes text during a remote update is told its edit cannot reach the room", async () => {
  const secret = "the provider's token test secret, 32";
  const secured = await startRelay({ PM_AUTH_KEY: secret });
  try {
    const room = `observer-${Date.now()}`;
    const token = (access) => signToken(secret, { sub: access, room, access, exp: nowSeconds() + 600 });
    const [writer, viewer] = [await blank(), await blank()];
    await writer.evaluate(async ({ url, room, token }) => {
      window.ydoc = new Y.Doc();
      window.provider = await MeshProvider.connect(ydoc, { url, room, token });
      ydoc.getText("content").insert(0, "plain text");
    }, { url: secured.url, room, token: token("write") });
    await viewer.evaluate(async ({ url, room, token }) => {
      window.heard = [];
      window.ydoc = new Y.Doc();
      const text = ydoc.getText("content");
      // An application rule: no swearing on this page.
      text.observe((event) => {
        const at = text.toString().indexOf("darn");
        if (!event.transaction.local && at >= 0) text.delete(at, 4);
      });
      window.provider = await MeshProvider.connect(ydoc, { url, room, token, on: { error: (e) => heard.push(`${e.name}: ${e.message}`) } });
      provider.client.on("refused", (r) => heard.push(`refused ${r.reason}: ${r.detail}`));
    }, { url: secured.url, room, token: token("read") });
    await until("the viewer has the text", () =>
      viewer.evaluate(() => ydoc.getText("content").toString() === "plain text" || ydoc.getText("content").toString()));
    await writer.evaluate(() => ydoc.getText("content").insert(0, "darn "));
    await until("the viewer hears that its observer's edit was refused", () => viewer.evaluate(() =>
      (provider.diverged && heard.some((h) => h.startsWith("refused forbidden"))) || { heard, diverged: provider.diverged, text: ydoc.getText("content").toString() }));
    await writer.close();
    await viewer.close();
  } finally {
    await secured.stop();
  }
});

// destroy() waits for the relay to acknowledge what was sent; what was typed in that time (a
// keystroke after "close" was clicked) was neither sent nor reported, and destroy() resolved
// to 0 as if everything had arrived.
test("what is typed while destroy() waits for the relay is sent and waited for too", async () => {
  const room = `destroying-${Date.now()}`;
  const [a, b] = [await blank(), await blank()];
  await a.evaluate(async ({ url, room }) => {
    // A slow network: every message from the relay (its acknowledgements among them) arrives
    // 600 ms late, in order.
    class SlowSocket extends WebSocket {
      addEventListener(type, listener, options) {
        if (type !== "message") return super.addEventListener(type, listener, options);
        return super.addEventListener(type, (event) => {
          if (window.slow) setTimeout(() => listener.call(this, event), window.slow);
          else listener.call(this, event);
        }, options);
      }
    }
    window.ydoc = new Y.Doc();
    window.provider = await MeshProvider.connect(ydoc, { url, room, WebSocket: SlowSocket });
  }, { url: relay.url, room });
  await joinYjs(b, room, "bo");
  const left = await a.evaluate(async () => {
    window.slow = 600;
    const text = ydoc.getText("content");
    text.insert(0, "goodbye");
    const destroyed = provider.destroy();
    await new Promise((r) => setTimeout(r, 200));
    text.insert(text.length, ", and one more thing");
    return await destroyed;
  });
  assert.equal(left, 0);
  await until("b has what was typed while a's provider was destroyed", () => b.evaluate(() =>
    ydoc.getText("content").toString() === "goodbye, and one more thing" || ydoc.getText("content").toString()));
  await a.close();
  await b.close();
});

test("the provider refuses bad arguments by name", async () => {
  const page = await blank();
  const result = await page.evaluate(async (url) => {
    const outcome = async (f) => { try { await f(); return "ok"; } catch (e) { return `${e.name}: ${e.message}`; } };
    const ydoc = new Y.Doc();
    return {
      notDoc: await outcome(() => MeshProvider.connect({}, { url, room: "r" })),
      document: await outcome(() => MeshProvider.connect(ydoc, { url, room: "r", document: {} })),
      awareness: await outcome(() => MeshProvider.connect(ydoc, { url, room: "r", awareness: new Awareness(new Y.Doc()) })),
      on: await outcome(() => MeshProvider.connect(ydoc, { url, room: "r", on: { presence: 5 } })),
      persist: await outcome(() => MeshProvider.connect(ydoc, { url, room: "r", persist: true })),
      room: await outcome(() => MeshProvider.connect(ydoc, { url, room: 7 })),
      // Each of these was taken, and failed only at the first edit or refusal.
      longDoc: await outcome(() => MeshProvider.connect(ydoc, { url, room: "r", doc: "é".repeat(33) })),
      wholeDoc: await outcome(() => MeshProvider.connect(ydoc, { url, room: "r", doc: "*" })),
      refused: await outcome(() => MeshProvider.connect(ydoc, { url, room: "r", on: { refused: 1 } })),
    };
  }, relay.url);
  assert.deepEqual(result, {
    notDoc: "InvalidArgument: MeshProvider.connect needs a Y.Doc, got object",
    document: "InvalidArgument: the provider makes the document option from the Y.Doc: leave it out",
    awareness: "InvalidArgument: awareness must be an Awareness of the Y.Doc",
    on: "InvalidArgument: on.presence must be a function",
    persist: "InvalidArgument: persist keeps the built-in document; with the application's document, persist it beside the client (y-indexeddb for a Y.Doc)",
    room: "InvalidArgument: room must be a string, got the number 7",
    longDoc: "InvalidArgument: doc must be 1 to 64 bytes of UTF-8, got 66",
    wholeDoc: "InvalidArgument: doc \"*\" names the whole document in the protocol: choose another name",
    refused: "InvalidArgument: on.refused must be a function",
  });
  await page.close();
});

test("a second provider for a Y.Doc that has one is refused, and destroy() takes only an options object", async () => {
  const page = await blank();
  const result = await page.evaluate(async ({ url, room }) => {
    const outcome = async (f) => { try { await f(); return "ok"; } catch (e) { return `${e.name}: ${e.message}`; } };
    const ydoc = new Y.Doc();
    // Both at once, as a component mounted twice would: the second would send every update
    // again, and both would claim one awareness client id from two nodes.
    const first = MeshProvider.connect(ydoc, { url, room });
    const second = await outcome(() => MeshProvider.connect(ydoc, { url, room }));
    const provider = await first;
    const badDestroy = await outcome(() => provider.destroy(null));
    const badWait = await outcome(() => provider.destroy({ wait: -1 }));
    await provider.destroy();
    // Once destroyed, the Y.Doc may have a provider again.
    const again = await MeshProvider.connect(ydoc, { url, room });
    await again.destroy();
    return { second, badDestroy, badWait };
  }, { url: relay.url, room: `twice-${Date.now()}` });
  assert.deepEqual(result, {
    second: "InvalidArgument: this Y.Doc has a provider already: destroy it first",
    badDestroy: "InvalidArgument: destroy takes an options object, got null",
    badWait: "InvalidArgument: wait must be a number of milliseconds, 0 or more, got -1",
  });
  await page.close();
});

test("edits that each fit the relay's message limit reach the room, however many wait together", async () => {
  // Three 30 KB inserts in one tick, on a relay whose messages are at most 64 KiB: merged into
  // one update they did not fit, and all three were refused.
  const small = await startRelay({ PM_MAX_FRAME: "16384", PM_MAX_MESSAGE: "65536" });
  try {
    const room = `fits-${Date.now()}`;
    const [a, b] = [await blank(), await blank()];
    const join = (page) => page.evaluate(async ({ url, room }) => {
      const ydoc = new Y.Doc();
      window.heard = [];
      const provider = await MeshProvider.connect(ydoc, { url, room, on: { error: (e) => heard.push(`${e.name}: ${e.message}`) } });
      Object.assign(window, { ydoc, provider });
    }, { url: small.url, room });
    await join(a);
    await join(b);
    await a.evaluate(() => {
      for (let i = 0; i < 3; i++) ydoc.getText("content").insert(0, String(i).repeat(30_000));
    });
    await until("the other Y.Doc has all three", () =>
      b.evaluate(() => ydoc.getText("content").length === 90_000 || ydoc.getText("content").length));
    const heard = await a.evaluate(() => ({ heard, diverged: provider.diverged }));
    assert.deepEqual(heard, { heard: [], diverged: false });
    await a.close();
    await b.close();
  } finally {
    await small.stop();
  }
});
