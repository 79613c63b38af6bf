// The npm package as a user gets it: `npm pack` the built pkg/, `npm install` the tarball into
// a fresh project, and use it from there in headless Chromium against a real relay. Two pages in
// one room exchange data and text edits. Also times the automerge-paper trace through the JS API.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync, spawn, spawnSync } from "node:child_process";
import { cp, mkdtemp, mkdir, writeFile, copyFile, rm, readdir } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { createRequire } from "node:module";

const root = fileURLToPath(new URL("../../", import.meta.url));
const require = createRequire(join(root, ".ci/package.json"));
const { chromium } = require("playwright-core");

let dir, relay, base, browser, packed;

const page = `<!doctype html><meta charset="utf-8"><title>package test</title>
<script type="module">
  import init, { MeshClient, SharedDocument } from "./node_modules/pattern-mesh/pattern_mesh.js";
  await init();
  window.mesh = { MeshClient, SharedDocument };
  window.ready = true;
</script>`;

before(async () => {
  dir = await mkdtemp(join(tmpdir(), "pattern-mesh-npm-"));
  packed = join(dir, execFileSync("npm", ["pack", join(root, "pkg"), "--pack-destination", dir, "--silent"], {
    encoding: "utf8",
  }).trim().split("\n").pop());
  const project = join(dir, "project");
  execFileSync("mkdir", ["-p", project]);
  await writeFile(join(project, "package.json"), JSON.stringify({ name: "app", private: true }));
  execFileSync("npm", ["install", packed, "--no-audit", "--no-fund", "--loglevel=error"], {
    cwd: project,
  });
  const installed = await readdir(join(project, "node_modules", "pattern-mesh"));
  assert.ok(installed.includes("pattern_mesh_bg.wasm"), `installed files: ${installed}`);
  // The relay's precompressed copies stay out of the package; the transport-only build is in.
  const transport = await readdir(join(project, "node_modules", "pattern-mesh", "transport"));
  for (const file of [...installed, ...transport]) assert.ok(!/\.(br|gz)$/.test(file), `installed ${file}`);
  assert.ok(transport.includes("pattern_mesh_bg.wasm") && transport.includes("yjs.js"), `transport files: ${transport}`);
  await writeFile(join(project, "index.html"), page);
  await copyFile(join(root, "tests/data/editing-traces/automerge-paper.json.gz"), join(project, "trace.json.gz"));

  relay = spawn(join(root, "target/debug/pattern-mesh-relay"), [
    "--listen", "127.0.0.1:0", "--www", project, "--pkg", join(root, "pkg"), "--data-dir", join(dir, "data"),
  ], { stdio: ["ignore", "pipe", "inherit"] });
  base = await new Promise((resolve, reject) => {
    let out = "";
    relay.stdout.on("data", (chunk) => {
      out += chunk;
      const m = out.match(/on (http:\/\/[^/]+)\//);
      if (m) resolve(m[1]);
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
  relay?.kill();
  if (dir) await rm(dir, { recursive: true, force: true });
});

async function openPage() {
  const p = await browser.newPage();
  const errors = [];
  p.on("pageerror", (e) => errors.push(e.message));
  await p.goto(`${base}/index.html`);
  await p.waitForFunction(() => window.ready === true);
  p.errors = errors;
  return p;
}

test("two pages using the installed package exchange data and text edits", async () => {
  const url = base.replace("http://", "ws://") + "/ws";
  const room = `npm-${Date.now()}`;
  const [a, b] = [await openPage(), await openPage()];
  for (const p of [a, b]) {
    await p.evaluate(async ({ url, room }) => {
      const client = await window.mesh.MeshClient.connect({ url, room, name: "page" });
      window.client = client;
      window.messages = [];
      client.on("message", (m) => window.messages.push(m.data));
      window.text = client.text("content");
    }, { url, room });
  }
  await a.evaluate(() => { window.client.broadcast({ temperature: 23.5 }); window.text.insert(0, "from a. "); });
  await b.evaluate(() => window.text.insert(0, "from b. "));
  await b.waitForFunction(() => window.messages.length === 1);
  assert.deepEqual(await b.evaluate(() => window.messages[0]), { temperature: 23.5 });
  const converged = (p) => p.waitForFunction(() => window.text.toString().length === 16);
  await Promise.all([converged(a), converged(b)]);
  const [ta, tb] = [await a.evaluate(() => window.text.toString()), await b.evaluate(() => window.text.toString())];
  assert.equal(ta, tb);
  assert.ok(ta.includes("from a. ") && ta.includes("from b. "), ta);
  assert.deepEqual([...a.errors, ...b.errors], []);
});

/**
 * A Vite app in strict TypeScript (no skipLibCheck) on the installed tarball, with `modules`
 * copied from .ci/node_modules and `main` as src/main.ts: type-checked and built into dist/.
 */
async function viteApp(name, modules, main) {
  const app = join(dir, "project", name);
  await mkdir(join(app, "src"), { recursive: true });
  await writeFile(join(app, "package.json"), JSON.stringify({ name, private: true, type: "module" }));
  execFileSync("npm", ["install", packed, "--offline", "--no-audit", "--no-fund", "--loglevel=error"], { cwd: app });
  for (const module of modules) {
    await cp(join(root, ".ci/node_modules", module), join(app, "node_modules", module), { recursive: true });
  }
  await writeFile(join(app, "tsconfig.json"), JSON.stringify({
    compilerOptions: {
      strict: true, noEmit: true, target: "es2022", module: "esnext", moduleResolution: "bundler",
      lib: ["es2022", "dom"], types: [],
    },
    include: ["src"],
  }));
  await writeFile(join(app, "index.html"), `<!doctype html><meta charset="utf-8"><title>${name}</title>
<script type="module" src="./src/main.ts"></script>`);
  await writeFile(join(app, "src", "main.ts"), main);
  const tools = join(root, ".ci/node_modules/.bin");
  const tsc = spawnSync(join(tools, "tsc"), ["-p", join(app, "tsconfig.json")], { encoding: "utf8" });
  assert.equal(tsc.status, 0, `tsc --strict failed:\n${tsc.stdout}${tsc.stderr}`);
  const vite = spawnSync(join(tools, "vite"), ["build", "--base", "./", "--logLevel", "error", app], { encoding: "utf8" });
  assert.equal(vite.status, 0, `vite build failed:\n${vite.stdout}${vite.stderr}`);
  return app;
}

test("a Vite app in strict TypeScript, on the installed package, type-checks, builds and joins a room", async () => {
  const app = await viteApp("vite-app", [], `import init, { MeshClient, type MessageEvent, type Status } from "pattern-mesh";

declare global {
  interface Window { app?: { client: MeshClient; messages: MessageEvent[]; statuses: Status[] } }
}

async function main(): Promise<void> {
  await init();
  const params = new URLSearchParams(location.search);
  const url = params.get("relay");
  const room = params.get("room");
  if (url === null || room === null) throw new Error("relay and room are required");
  const messages: MessageEvent[] = [];
  const statuses: Status[] = [];
  const client = await MeshClient.connect({ url, room, name: "vite", on: { message: (m) => messages.push(m) } });
  client.on("status", (status) => statuses.push(status));
  client.text("content").insert(0, "from vite");
  window.app = { client, messages, statuses };
}

main();
`);
  const assets = await readdir(join(app, "dist", "assets"));
  assert.ok(assets.some((f) => f.endsWith(".wasm")), `the wasm is among the built assets: ${assets}`);

  const url = base.replace("http://", "ws://") + "/ws";
  const room = `vite-${Date.now()}`;
  const other = await openPage();
  await other.evaluate(async ({ url, room }) => {
    const client = await window.mesh.MeshClient.connect({ url, room, name: "other" });
    client.broadcast({ before: "the vite app came" });
    window.text = client.text("content");
  }, { url, room });
  const p = await browser.newPage();
  const errors = [];
  p.on("pageerror", (e) => errors.push(e.message));
  await p.goto(`${base}/vite-app/dist/index.html?relay=${encodeURIComponent(url)}&room=${room}`);
  await p.waitForFunction(() => window.app !== undefined);
  assert.deepEqual(await p.evaluate(() => window.app.messages.map((m) => m.data)), [{ before: "the vite app came" }]);
  await other.waitForFunction(() => window.text.toString() === "from vite");
  assert.deepEqual([...errors, ...other.errors], []);
  await Promise.all([p.close(), other.close()]);
});

test("a Vite app on the transport-only build keeps a Y.Doc in sync with pattern-mesh/transport/yjs", async () => {
  // The provider's peer dependencies, yjs and y-protocols (with lib0), as .ci/setup installed them.
  const app = await viteApp("yjs-app", ["yjs", "y-protocols", "lib0", "isomorphic.js"], `import * as Y from "yjs";
import { Awareness } from "y-protocols/awareness";
import init from "pattern-mesh/transport";
import { MeshProvider } from "pattern-mesh/transport/yjs";

declare global {
  interface Window { app?: { doc: Y.Doc; provider: MeshProvider } }
}

async function main(): Promise<void> {
  await init();
  const params = new URLSearchParams(location.search);
  const url = params.get("relay");
  const room = params.get("room");
  if (url === null || room === null) throw new Error("relay and room are required");
  const doc = new Y.Doc();
  const awareness = new Awareness(doc);
  awareness.setLocalStateField("user", { name: "transport" });
  const provider = await MeshProvider.connect(doc, { url, room, name: "transport", awareness });
  doc.getText("content").insert(0, "from the transport build");
  doc.getMap("meta").set("build", "transport");
  window.app = { doc, provider };
}

main();
`);

  const url = base.replace("http://", "ws://") + "/ws";
  const room = `transport-${Date.now()}`;
  const other = await openPage();
  await other.evaluate(async ({ url, room }) => {
    const client = await window.mesh.MeshClient.connect({ url, room, name: "full" });
    window.text = client.text("content");
  }, { url, room });
  const p = await browser.newPage();
  const errors = [];
  p.on("pageerror", (e) => errors.push(e.message));
  await p.goto(`${base}/yjs-app/dist/index.html?relay=${encodeURIComponent(url)}&room=${room}`);
  await p.waitForFunction(() => window.app !== undefined);
  await other.waitForFunction(() => window.text.toString() === "from the transport build");
  await other.evaluate(() => window.text.insert(0, "full build, then "));
  await p.waitForFunction(() => window.app.doc.getText("content").toString() === "full build, then from the transport build");
  assert.deepEqual([...errors, ...other.errors], []);
  await Promise.all([p.close(), other.close()]);
});

test("the README's client example works as written", async () => {
  const { readFile } = await import("node:fs/promises");
  const readme = await readFile(join(root, "README.md"), "utf8");
  const section = readme.split("### Connecting to a room")[1];
  const example = section.match(/```js\n([\s\S]*?)```/)[1];
  const body = example
    .split("\n")
    .filter((line) => !line.startsWith("import ") && line.trim() !== "await init();")
    .join("\n")
    .replace("ws://127.0.0.1:8080/ws", base.replace("http://", "ws://") + "/ws")
    .replace('room: "demo"', `room: "readme-${Date.now()}"`);
  const p = await openPage();
  const logged = await p.evaluate(async (body) => {
    const logged = [];
    const AsyncFunction = (async () => {}).constructor;
    await new AsyncFunction("MeshClient", "console", body)(window.mesh.MeshClient, {
      log: (line) => logged.push(String(line)),
    });
    return logged;
  }, body);
  assert.ok(logged.includes('local change: [{"insert":"hello"}]'), logged.join("\n"));
  assert.ok(logged.includes('local change: [{"retain":5},{"insert":"!"}]'), logged.join("\n"));
  assert.ok(logged.includes("hello!"), logged.join("\n"));
  assert.deepEqual(p.errors, []);
});

test("the automerge-paper trace applied through the package in Chromium", async () => {
  const p = await openPage();
  const result = await p.evaluate(async () => {
    const response = await fetch("trace.json.gz");
    const trace = await new Response(response.body.pipeThrough(new DecompressionStream("gzip"))).json();
    const doc = new window.mesh.SharedDocument();
    const started = performance.now();
    for (const txn of trace.txns) {
      for (const [pos, del, ins] of txn.patches) {
        if (del > 0) doc.delete("content", pos, del);
        if (ins.length > 0) doc.insert("content", pos, ins);
      }
    }
    const ms = performance.now() - started;
    return { ms, ok: doc.text("content") === trace.endContent, txns: trace.txns.length };
  });
  assert.ok(result.ok, "the trace ends at its endContent");
  console.log(`automerge-paper in Chromium through the package: ${result.txns} transactions in ${result.ms.toFixed(0)} ms`);
});
