// Access tokens in real Chromium pages against a relay started with --auth-key: a page without
// a token is refused and told why, a read-only page reads the room and cannot write to it, and
// a page whose tokens expire every two seconds gets fresh ones and loses nothing it typed.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { createRequire } from "node:module";

const root = fileURLToPath(new URL("../../", import.meta.url));
const require = createRequire(join(root, ".ci/package.json"));
const { chromium } = require("playwright-core");

const SECRET = "the e2e token test's secret, 32b";
let dir, relay, browser, base;

/** An HS256 JSON Web Token, as an application's server would issue it. */
function token(claims) {
  const part = (value) => Buffer.from(JSON.stringify(value)).toString("base64url");
  const body = `${part({ alg: "HS256", typ: "JWT" })}.${part(claims)}`;
  return `${body}.${createHmac("sha256", SECRET).update(body).digest("base64url")}`;
}
const now = () => Math.floor(Date.now() / 1000);

before(async () => {
  dir = await mkdtemp(join(tmpdir(), "pattern-mesh-e2e-tokens-"));
  relay = spawn(join(root, "target/debug/pattern-mesh-relay"), [
    "--listen", "127.0.0.1:0", "--www", join(root, "www"), "--pkg", join(root, "pkg"),
    "--data-dir", join(dir, "data"),
  ], { stdio: ["ignore", "pipe", "inherit"], env: { ...process.env, PM_AUTH_KEY: SECRET } });
  base = await new Promise((resolve, reject) => {
    let out = "";
    relay.stdout.on("data", (chunk) => {
      out += chunk;
      const found = out.match(/relay on (http:\/\/[^/\s]+)\//);
      if (found) resolve(found[1]);
    });
    relay.on("exit", (code) => reject(new Error(`the relay exited with ${code}`)));
  });
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

/** A page with the package loaded, and `window.nextToken(claims)` minting tokens in the test. */
async function page() {
  const p = await browser.newPage();
  p.problems = [];
  p.on("pageerror", (e) => p.problems.push(e.message));
  await p.exposeFunction("nextToken", (claims) => token({ ...claims, exp: now() + claims.ttl }));
  await p.goto(`${base}/pattern.html`);
  await p.evaluate(async () => {
    window.mesh = await import("/pkg/pattern_mesh.js");
    await window.mesh.default();
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
    text.insert(0, "from the reader ");
    for (let i = 0; i < 100 && refused.length === 0; i++) await new Promise((r) => setTimeout(r, 50));
    return { before, refused };
  }, { url, room });
  assert.equal(read.before, typed.typed, "the reader has every character the writer typed");
  assert.deepEqual(read.refused, ["update forbidden"]);
  // Nothing of the reader's reached the writer.
  await new Promise((r) => setTimeout(r, 500));
  assert.equal(await writer.evaluate(() => window.client.text("content").toString()), typed.typed);
  for (const p of [writer, reader]) assert.deepEqual(p.problems, []);
  await Promise.all([writer.close(), reader.close()]);
});
