// How the relay serves the package and the demo: compressed (brotli or gzip, as the request
// accepts), byte for byte the files on disk once decompressed, with an ETag that turns a
// repeated request into a 304.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { request } from "node:http";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { brotliDecompressSync, gunzipSync } from "node:zlib";
import { root, startRelay } from "../support/relay.mjs";

let relay;
before(async () => { relay = await startRelay(); });
after(async () => { await relay?.stop(); });

/** GET `path` with `headers`, without any decoding: status, headers and the raw body. */
const get = (path, headers = {}) => new Promise((resolve, reject) => {
  const req = request(`${relay.base}${path}`, { headers }, (res) => {
    const chunks = [];
    res.on("data", (c) => chunks.push(c));
    res.on("end", () => resolve({ status: res.statusCode, headers: res.headers, body: Buffer.concat(chunks) }));
    res.on("error", reject);
  });
  req.on("error", reject);
  req.end();
});

test("the wasm file travels compressed, and decompresses to the file on disk", async () => {
  const file = await readFile(join(root, "pkg/pattern_mesh_bg.wasm"));
  const br = await get("/pkg/pattern_mesh_bg.wasm", { "accept-encoding": "gzip, deflate, br" });
  assert.equal(br.status, 200);
  assert.equal(br.headers["content-encoding"], "br");
  assert.equal(br.headers["content-type"], "application/wasm");
  assert.match(br.headers.vary ?? "", /accept-encoding/i);
  assert.ok(br.body.length < file.length / 2, `${br.body.length} bytes of ${file.length}`);
  assert.ok(brotliDecompressSync(br.body).equals(file));

  const gz = await get("/pkg/pattern_mesh_bg.wasm", { "accept-encoding": "gzip" });
  assert.equal(gz.headers["content-encoding"], "gzip");
  assert.ok(gunzipSync(gz.body).equals(file));

  const plain = await get("/pkg/pattern_mesh_bg.wasm");
  assert.equal(plain.headers["content-encoding"], undefined);
  assert.ok(plain.body.equals(file));
  console.log(`RESULT served-wasm raw=${file.length} br=${br.body.length} gzip=${gz.body.length}`);
});

test("a file carries an ETag and no-cache; asking again with it gives 304 without a body", async () => {
  const first = await get("/pkg/pattern_mesh.js", { "accept-encoding": "br" });
  assert.equal(first.status, 200);
  const tag = first.headers.etag;
  assert.match(tag ?? "", /^W\/".+"$/);
  assert.equal(first.headers["cache-control"], "no-cache");
  const again = await get("/pkg/pattern_mesh.js", { "accept-encoding": "br", "if-none-match": tag });
  assert.equal(again.status, 304);
  assert.equal(again.body.length, 0);
  assert.equal(again.headers.etag, tag);
  assert.match(again.headers.vary ?? "", /accept-encoding/i);
  // The tag decides even when If-Modified-Since says the file changed since then.
  const both = await get("/pkg/pattern_mesh.js", { "accept-encoding": "br", "if-none-match": 'W/"0-0000000000000000"', "if-modified-since": first.headers["last-modified"] });
  assert.equal(both.status, 200);
  // The file server's own 304 (If-Modified-Since alone) carries the cache headers too.
  const since = await get("/pkg/pattern_mesh.js", { "accept-encoding": "br", "if-modified-since": first.headers["last-modified"] });
  assert.equal(since.status, 304);
  assert.equal(since.headers["cache-control"], "no-cache");
  assert.match(since.headers.vary ?? "", /accept-encoding/i);
  const other = await get("/pkg/pattern_mesh.js", { "if-none-match": 'W/"0-0000000000000000"' });
  assert.equal(other.status, 200);
  // The demo's pages are compressed too; a missing file is still a 404.
  const page = await get("/index.html", { "accept-encoding": "gzip" });
  assert.equal(page.headers["content-encoding"], "gzip");
  assert.match(gunzipSync(page.body).toString(), /pattern-mesh editor/);
  assert.equal((await get("/no-such-file.js")).status, 404);
});
