// Access tokens from the package's client, in Node against a relay started with --auth-key:
// a token function called before every connection (an expiring token is replaced and nothing
// typed is lost), a fixed token that expired, and a read-only member's writes.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { createRequire } from "node:module";
import { root, startRelay, signToken, nowSeconds as now } from "../support/relay.mjs";

const require = createRequire(join(root, ".ci/package.json"));
const { WebSocket } = require("ws");
const pkg = new URL("../../pkg/", import.meta.url);
const mesh = await import(new URL("pattern_mesh.js", pkg));
mesh.initSync({ module: await readFile(new URL("pattern_mesh_bg.wasm", pkg)) });

const SECRET = "the token test's secret, 32 bytes";
const token = (claims) => signToken(SECRET, claims);
let relay, url;

before(async () => {
  relay = await startRelay({ PM_AUTH_KEY: SECRET });
  url = relay.url;
});

after(async () => {
  await relay?.stop();
});

const until = async (what, check, ms = 15_000) => {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    if (check()) return;
    await new Promise((r) => setTimeout(r, 25));
  }
  assert.fail(`timed out waiting for ${what}`);
};

test("a token that expires closes the connection with 4004; the token function gives a fresh one and nothing typed is lost", async () => {
  const room = `expiring-${Date.now()}`;
  let issued = 0;
  const statuses = [];
  const a = await mesh.MeshClient.connect({
    url, room, WebSocket,
    // Each token lives two seconds; the function is called before every connection.
    token: async () => { issued += 1; return token({ sub: "a", room, access: "write", exp: now() + 2 }); },
    on: { status: (status, reason) => statuses.push([status, reason]) },
  });
  const b = await mesh.MeshClient.connect({
    url, room, WebSocket, token: token({ sub: "b", room, access: "write", exp: now() + 600 }),
  });
  const text = a.text("content");
  let typed = "";
  const deadline = Date.now() + 5_000;
  while (Date.now() < deadline) {
    typed += "x";
    text.insert(text.length, "x");
    await new Promise((r) => setTimeout(r, 50));
  }
  assert.ok(issued >= 2, `a fresh token for each connection (${issued} issued)`);
  assert.ok(statuses.some(([, reason]) => /4004.*access token expired/.test(reason ?? "")), JSON.stringify(statuses));
  await until("every character typed", () => b.text("content").toString() === typed);
  assert.equal(a.pendingCount, 0);
  a.close();
  b.close();
});

test("a fixed token that expired: connect says so and stops", async () => {
  const room = `expired-${Date.now()}`;
  await assert.rejects(mesh.MeshClient.connect({
    url, room, WebSocket, token: token({ sub: "a", room, access: "write", exp: now() - 10 }),
  }), { name: "ConnectError", message: /4004.*the access token expired/ });
  await assert.rejects(mesh.MeshClient.connect({ url, room, WebSocket }), {
    name: "ConnectError", message: /4003.*requires an access token/,
  });
  await assert.rejects(mesh.MeshClient.connect({ url, room, WebSocket, token: 7 }), {
    name: "InvalidArgument", message: "token must be a string or a function that returns one, got the number 7",
  });
});

// The relay refuses a read-only member's writes (crates/relay/tests/auth.rs); a client that holds
// such a token knows it from the token's `access` claim, and refuses them before they are made.
test("a read-only member reads everything, and its writes are refused as forbidden", async () => {
  const room = `read-only-${Date.now()}`;
  const writer = await mesh.MeshClient.connect({
    url, room, WebSocket, token: token({ sub: "w", room, access: "write", exp: now() + 600 }),
  });
  writer.text("content").insert(0, "written");
  writer.broadcast({ note: "stored" });
  await until("the writer's messages are stored", () => writer.pendingCount === 0);
  const heard = [];
  const refused = [];
  const anomalies = [];
  const reader = await mesh.MeshClient.connect({
    url, room, WebSocket, token: token({ sub: "r", name: "Reader", room, access: "read", exp: now() + 600 }),
    on: {
      message: ({ data }) => heard.push(data),
      refused: (event) => refused.push(event),
      anomaly: (event) => anomalies.push(event),
    },
  });
  assert.equal(reader.text("content").toString(), "written");
  assert.deepEqual(heard, [{ note: "stored" }]);
  assert.equal(reader.readOnly, true);
  assert.throws(() => reader.text("content").insert(0, "from the reader"), {
    name: "ForbiddenError", message: /lets it read only: the edit was not made/,
  });
  assert.equal(reader.text("content").toString(), "written", "the edit was not made");
  reader.broadcast({ note: "from the reader" });
  await until("the refusal", () => refused.length === 1);
  assert.equal(refused[0].reason, "forbidden");
  assert.match(refused[0].detail, /lets it read only/);
  // A round trip later (the writer's next message reached the reader), nothing of the reader's
  // reached the relay to be refused there: no checkpoint, no sync answer.
  writer.broadcast({ note: "later" });
  await until("the writer's later message", () => heard.length === 2);
  assert.deepEqual(anomalies, [], "nothing reached the relay to be refused there");
  assert.equal(reader.pendingCount, 0, "a refused message leaves the outbox");
  assert.equal(reader.diverged, false);
  assert.deepEqual(writer.peers.map((p) => p.name), ["Reader"], "the name is the token's");
  reader.close();
  writer.close();
});
