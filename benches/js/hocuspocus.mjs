// Hocuspocus, the most used Yjs server, as the benchmarks' peer: `PORT` to listen on (loopback),
// and with `REDIS_URL` its Redis extension, so that several servers serve one document.
// Usage: PORT=1234 [REDIS_URL=redis://127.0.0.1:6379] node benches/js/hocuspocus.mjs
import { Server } from "@hocuspocus/server";
import { Redis } from "@hocuspocus/extension-redis";

const port = Number(process.env.PORT);
const extensions = [];
if (process.env.REDIS_URL) {
  const url = new URL(process.env.REDIS_URL);
  extensions.push(new Redis({ host: url.hostname, port: Number(url.port) }));
}
const server = new Server({ port, address: "127.0.0.1", quiet: true, extensions });
await server.listen();
console.log(`hocuspocus on ws://127.0.0.1:${port}/${process.env.REDIS_URL ? " with redis" : ""}`);
