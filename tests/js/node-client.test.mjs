// The package's client in Node 20, against the real relay: Node 20 has no global WebSocket, so
// the `ws` package's is passed in (`connect({ WebSocket })`); the wasm is loaded with `initSync`.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { createRequire } from "node:module";
import { root, startRelay } from "../support/relay.mjs";

const require = createRequire(join(root, ".ci/package.json"));
const { WebSocket } = require("ws");
const pkg = new URL("../../pkg/", import.meta.url);
const mesh = await import(new URL("pattern_mesh.js", pkg));
mesh.initSync({ module: await readFile(new URL("pattern_mesh_bg.wasm", pkg)) });

let relay, url;

before(async () => {
  relay = await startRelay();
  url = relay.url;
});

after(async () => {
  await relay?.stop();
});

const until = async (what, check) => {
  for (let i = 0; i < 200; i++) {
    if (check()) return;
    await new Promise((r) => setTimeout(r, 25));
  }
  assert.fail(`timed out waiting for ${what}`);
};

test("two clients in Node exchange a message and text edits through the relay, and close cleanly", async () => {
  const room = `node-${Date.now()}`;
  const a = await mesh.MeshClient.connect({ url, room, name: "a", WebSocket });
  const b = await mesh.MeshClient.connect({ url, room, name: "b", WebSocket });
  const received = [];
  b.on("message", ({ data }) => received.push(data));
  a.broadcast({ hello: "from node" });
  a.text("content").insert(0, "typed in node");
  await until("the message and the edit", () => received.length === 1 && b.text("content").toString() === "typed in node");
  assert.deepEqual(received, [{ hello: "from node" }]);
  const statuses = [];
  a.on("status", (status) => statuses.push(status));
  a.close();
  b.close();
  await new Promise((r) => setTimeout(r, 200));
  assert.deepEqual(statuses, ["closed"]);
  assert.equal(a.status, "closed");
});

test("without a WebSocket implementation, connect says so at once", async () => {
  assert.equal(typeof globalThis.WebSocket, "undefined", "Node 20 has no global WebSocket");
  await assert.rejects(mesh.MeshClient.connect({ url, room: "none" }), {
    name: "InvalidArgument",
    message: /no global WebSocket.*pass one as the WebSocket option/,
  });
  await assert.rejects(mesh.MeshClient.connect({ url, room: "none", WebSocket: 42 }), {
    name: "InvalidArgument",
    message: /^WebSocket must be a constructor, got the number 42$/,
  });
  await assert.rejects(mesh.MeshClient.connect({ url, room: "none", WebSocket: () => {} }), {
    name: "InvalidArgument",
    message: /^WebSocket must be a constructor, got a function$/,
  });
});

test("persist where there is no IndexedDB rejects with a StorageError that says so", async () => {
  await assert.rejects(mesh.MeshClient.connect({ url, room: "stored", WebSocket, persist: true }), {
    name: "StorageError",
    message: "persist needs IndexedDB and Web Locks: this runtime has no IndexedDB",
  });
  await assert.rejects(mesh.MeshClient.connect({ url, room: "stored", WebSocket, persist: "yes" }), {
    name: "InvalidArgument",
    message: 'persist must be a boolean, got the string "yes"',
  });
});

test("a late joiner's listeners passed to connect get the stored messages of the catch-up", async () => {
  const room = `node-history-${Date.now()}`;
  const a = await mesh.MeshClient.connect({ url, room, name: "a", WebSocket });
  for (let i = 0; i < 5; i++) a.broadcast({ i });
  await until("the messages are stored", () => a.pendingCount === 0);
  const history = [];
  const late = await mesh.MeshClient.connect({
    url, room, name: "late", WebSocket,
    on: { message: ({ sender, data }) => history.push([sender, data.i]) },
  });
  assert.deepEqual(history, [0, 1, 2, 3, 4].map((i) => [a.node, i]), "every stored message, in order, before connect resolves");
  assert.equal(late.counts().accepted, 5);
  await assert.rejects(mesh.MeshClient.connect({ url, room, WebSocket, on: { mesage: () => {} } }), {
    name: "InvalidArgument",
    message: /^on has an unknown key "mesage"; the accepted keys are message, anomaly, /,
  });
  await assert.rejects(mesh.MeshClient.connect({ url, room, WebSocket, on: { message: 1 } }), {
    name: "InvalidArgument",
    message: /^on\.message must be a function, got the number 1$/,
  });
  a.close();
  late.close();
});

test("a message sent with { durable: false } reaches the members present, and is never stored", async () => {
  const room = `node-signal-${Date.now()}`;
  const a = await mesh.MeshClient.connect({ url, room, name: "a", WebSocket });
  const b = await mesh.MeshClient.connect({ url, room, name: "b", WebSocket });
  const live = [];
  b.on("message", ({ sender, data, durable }) => live.push([sender, data.tick, durable]));
  for (let tick = 0; tick < 10; tick++) assert.equal(a.broadcast({ tick }, { durable: false }), true);
  assert.equal(a.broadcast({ tick: "stored" }), true);
  await until("the ten ticks and the stored message", () => live.length === 11);
  assert.deepEqual(live.slice(0, 10), [...Array(10).keys()].map((tick) => [a.node, tick, false]));
  assert.deepEqual(live[10], [a.node, "stored", true]);
  assert.equal(a.pendingCount, 0, "nothing of the ticks waits for an acknowledgement");
  const history = [];
  const late = await mesh.MeshClient.connect({
    url, room, name: "late", WebSocket, on: { message: ({ data }) => history.push(data.tick) },
  });
  assert.deepEqual(history, ["stored"], "a late joiner gets the stored message only");
  assert.equal(late.counts().accepted, 1);
  assert.throws(() => a.broadcast({}, { durable: "no" }), {
    name: "InvalidArgument", message: 'durable must be a boolean, got the string "no"',
  });
  assert.throws(() => a.broadcast({}, { durabel: false }), {
    name: "InvalidArgument", message: 'the broadcast options has an unknown key "durabel"; the accepted keys are durable',
  });
  a.dropConnection();
  assert.equal(a.broadcast({ tick: "offline" }, { durable: false }), false, "dropped while not connected");
  for (const c of [a, b, late]) c.close();
});

test("messages held back by the pacer for a second or more say so, and say when the wait is over", async () => {
  // 128 KiB/s of bandwidth and 1 MiB messages: the second of two 800 KB messages waits for the
  // pacer about 2.3 s.
  const slow = await startRelay({ PM_BANDWIDTH: String(128 << 10), PM_MAX_MESSAGE: String(1 << 20) });
  try {
    const room = `node-paced-${Date.now()}`;
    const a = await mesh.MeshClient.connect({ url: slow.url, room, name: "a", WebSocket });
    const b = await mesh.MeshClient.connect({ url: slow.url, room, name: "b", WebSocket });
    const paced = [];
    a.on("paced", (event) => paced.push(event));
    const received = [];
    b.on("message", ({ data }) => received.push(data.length));
    a.broadcast("x".repeat(800_000));
    a.broadcast("y".repeat(800_000));
    assert.equal(paced.length, 1, "the wait is told as it begins");
    assert.ok(paced[0].waitMs >= 1000 && paced[0].waitMs < 5000, `waits ${paced[0].waitMs} ms`);
    assert.equal(paced[0].messages, 2);
    for (let i = 0; i < 400 && received.length < 2; i++) await new Promise((r) => setTimeout(r, 25));
    assert.deepEqual(received, [800_000, 800_000]);
    // (A `rateLimited` refusal, should the relay's clock and the client's disagree, would make
    // the client wait once more, and say so again.)
    assert.equal(paced.at(-1).waitMs, 0, `the end of the wait is told: ${JSON.stringify(paced)}`);
    a.close();
    b.close();
  } finally {
    await slow.stop();
  }
});

test("presence is a map: a late joiner gets what was set before it came, a reconnect sends it again, a leave removes it", async () => {
  const room = `node-presence-${Date.now()}`;
  const a = await mesh.MeshClient.connect({ url, room, name: "ada", WebSocket });
  a.setPresence({ cursor: 3 });
  const b = await mesh.MeshClient.connect({ url, room, name: "bob", WebSocket });
  await until("the presence set before b came", () => b.presence().length === 1);
  assert.deepEqual(b.presence(), [{ node: a.node, name: "ada", data: { cursor: 3 } }]);
  const changes = [];
  b.on("presence", ({ sender, data }) => changes.push([sender, data]));
  a.setPresence({ cursor: 4 });
  await until("the new presence", () => changes.length === 1);
  a.dropConnection();
  await until("the presence sent again after a's reconnect", () => changes.length >= 3 && a.status === "open");
  assert.deepEqual(changes.at(-1), [a.node, { cursor: 4 }]);
  assert.ok(changes.some(([, data]) => data === null), "a's leave (the dropped connection) removed it");
  assert.deepEqual(b.presence(), [{ node: a.node, name: "ada", data: { cursor: 4 } }]);
  const node = a.node;
  a.close();
  await until("a's leave", () => b.presence().length === 0);
  assert.deepEqual(changes.at(-1), [node, null]);
  b.close();
});

test("setName renames a member for every peer, and for newcomers", async () => {
  const room = `node-rename-${Date.now()}`;
  const a = await mesh.MeshClient.connect({ url, room, name: "ada", WebSocket });
  const b = await mesh.MeshClient.connect({ url, room, name: "bob", WebSocket });
  const renames = [];
  b.on("peers", ({ renamed }) => { if (renamed) renames.push(renamed); });
  a.setName("grace");
  await until("the rename", () => renames.length === 1);
  assert.deepEqual(renames, [{ node: a.node, name: "grace" }]);
  assert.deepEqual(b.peers, [{ node: a.node, name: "grace" }]);
  const c = await mesh.MeshClient.connect({ url, room, name: "cy", WebSocket });
  assert.ok(c.peers.some((p) => p.node === a.node && p.name === "grace"), "a newcomer sees the new name");
  const rejoined = [];
  b.on("peers", ({ joined }) => { if (joined) rejoined.push(joined); });
  a.dropConnection();
  await until("a's rejoin, seen by b", () => rejoined.some((p) => p.node === a.node));
  assert.deepEqual(rejoined.filter((p) => p.node === a.node), [{ node: a.node, name: "grace" }], "the rejoin gives the new name");
  assert.throws(() => a.setName("x".repeat(65)), { name: "InvalidArgument", message: "the name is 65 bytes, over the 64 bytes a name may have" });
  assert.throws(() => a.setName(7), { name: "InvalidArgument", message: "name must be a string, got the number 7" });
  for (const client of [a, b, c]) client.close();
  assert.throws(() => a.setName("late"), { name: "ClosedError" });
});

test("a client let go of without close() leaves the room, and Node keeps running", async () => {
  const room = `node-free-${Date.now()}`;
  const a = await mesh.MeshClient.connect({ url, room, name: "a", WebSocket });
  const b = await mesh.MeshClient.connect({ url, room, name: "b", WebSocket });
  const node = b.node;
  assert.throws(() => a.off(5, () => {}), { name: "InvalidArgument", message: "event must be a string, got the number 5" });
  assert.throws(() => a.off("message", "f"), { name: "InvalidArgument", message: 'listener must be a function, got the string "f"' });
  b.free();
  await until("b's leave", () => !a.peers.some((p) => p.node === node));
  await new Promise((r) => setTimeout(r, 200));
  a.close();
});

// The `ws` package's socket is an EventEmitter: an `error` event nobody listens to throws, and
// took the whole Node process down (a relay that cannot be reached, a relay that went away
// while the client typed, a socket closed while still connecting).
test("with the ws package, an unreachable relay rejects connect with a ConnectError and the process lives", async () => {
  const closed = await startRelay();
  const gone = closed.url;
  await closed.stop();
  await assert.rejects(
    mesh.MeshClient.connect({ url: gone, room: "unreachable", WebSocket, connectTimeout: 1_500 }),
    { name: "ConnectError" },
  );
  const other = await startRelay();
  try {
    const client = await mesh.MeshClient.connect({ url: other.url, room: "goes-away", WebSocket });
    const statuses = [];
    client.on("status", (status) => statuses.push(status));
    await other.stop();
    client.text("content").insert(0, "typed while the relay is gone");
    await until("reconnecting", () => statuses.includes("reconnecting"));
    // Attempts against the dead relay, each an error event of ws.
    await new Promise((r) => setTimeout(r, 1_500));
    assert.equal(client.text("content").toString(), "typed while the relay is gone");
    client.close();
  } finally {
    await other.stop();
  }
});
