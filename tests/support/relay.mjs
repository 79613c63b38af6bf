// What the JS tests share: a relay of this checkout on a free loopback port, and access tokens
// signed as an application's server would sign them.
import { spawn } from "node:child_process";
import { createServer, connect } from "node:net";
import { createHmac } from "node:crypto";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";

export const root = fileURLToPath(new URL("../../", import.meta.url));

/**
 * Starts `target/debug/pattern-mesh-relay` on a free port with a fresh data directory, serving
 * the demo and the package; `env` adds to its environment. Resolves to `{ base, url, stop }`:
 * the HTTP base, the WebSocket URL, and a function that kills it and removes its data.
 */
export async function startRelay(env = {}) {
  const dir = await mkdtemp(join(tmpdir(), "pattern-mesh-relay-"));
  const relay = spawn(join(root, "target/debug/pattern-mesh-relay"), [
    "--listen", "127.0.0.1:0", "--www", join(root, "www"), "--pkg", join(root, "pkg"),
    "--data-dir", join(dir, "data"),
  ], { stdio: ["ignore", "pipe", "inherit"], env: { ...process.env, ...env } });
  const base = await new Promise((resolve, reject) => {
    let out = "";
    relay.stdout.on("data", (chunk) => {
      out += chunk;
      const found = out.match(/relay on (http:\/\/[^/\s]+)\//);
      if (found) resolve(found[1]);
    });
    relay.on("exit", (code) => reject(new Error(`the relay exited with ${code}`)));
  });
  return {
    base,
    url: `${base.replace("http", "ws")}/ws`,
    stop: async () => {
      relay.kill("SIGKILL");
      await rm(dir, { recursive: true, force: true });
    },
  };
}

/** A free loopback port. */
export const freePort = () => new Promise((resolve) => {
  const server = createServer();
  server.listen(0, "127.0.0.1", () => {
    const { port } = server.address();
    server.close(() => resolve(port));
  });
});

/** Whether a Redis answers PING on `port`. */
const pong = (port) => new Promise((resolve) => {
  const socket = connect(port, "127.0.0.1");
  socket.on("connect", () => socket.write("PING\r\n"));
  socket.on("data", (data) => { socket.destroy(); resolve(String(data).startsWith("+PONG")); });
  socket.on("error", () => resolve(false));
});

/**
 * Starts Debian's `redis-server` on a free loopback port with a fresh directory, its
 * append-only file fsynced on every write (an acknowledged message is on disk). Resolves to
 * `{ url, stop }`: `stop` kills it and removes its directory.
 */
export async function startRedis() {
  const dir = await mkdtemp(join(tmpdir(), "pattern-mesh-redis-"));
  const port = await freePort();
  const redis = spawn("redis-server", [
    "--bind", "127.0.0.1", "--port", String(port), "--dir", dir,
    "--appendonly", "yes", "--appendfsync", "always", "--save", "",
  ], { stdio: "ignore" });
  const failed = new Promise((_, reject) => redis.on("error", (e) =>
    reject(new Error(`redis-server does not run (bash .ci/setup installs it): ${e.message}`))));
  const deadline = Date.now() + 10_000;
  while (!(await Promise.race([pong(port), failed]))) {
    if (Date.now() > deadline) throw new Error("redis-server did not answer PING");
    await new Promise((r) => setTimeout(r, 20));
  }
  return {
    url: `redis://127.0.0.1:${port}`,
    stop: async () => {
      redis.kill("SIGKILL");
      await rm(dir, { recursive: true, force: true });
    },
  };
}

/** An HS256 JSON Web Token with `claims`, signed with `secret`. */
export function signToken(secret, claims) {
  const part = (value) => Buffer.from(JSON.stringify(value)).toString("base64url");
  const body = `${part({ alg: "HS256", typ: "JWT" })}.${part(claims)}`;
  return `${body}.${createHmac("sha256", secret).update(body).digest("base64url")}`;
}

/** Now, in seconds since the Unix epoch (a token's `exp` counts in them). */
export const nowSeconds = () => Math.floor(Date.now() / 1000);
