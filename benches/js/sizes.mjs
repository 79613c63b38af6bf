// What an application downloads, built the way applications are built: each entry bundled by
// esbuild (minified, tree-shaken, with all its dependencies), then compressed with gzip -9 and
// brotli (quality 11). pattern-mesh's wasm counts in full beside its bundled JS. Prints one
// `RESULT size-<name>` line per build.
// Usage: node benches/js/sizes.mjs   (needs pkg/ built; the libraries come from benches/js and .ci)
import { readFileSync, mkdtempSync, rmSync } from "node:fs";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { constants, brotliCompressSync, gzipSync } from "node:zlib";

const root = fileURLToPath(new URL("../../", import.meta.url));
const require = createRequire(join(root, ".ci/package.json"));
const { build } = require("esbuild");
const out = mkdtempSync(join(tmpdir(), "pattern-mesh-sizes-"));

const sizes = (bytes) => ({
  raw: bytes.length,
  gzip: gzipSync(bytes, { level: 9 }).length,
  brotli: brotliCompressSync(bytes, { params: { [constants.BROTLI_PARAM_QUALITY]: 11 } }).length,
});

async function bundle(name, contents) {
  const file = join(out, `${name}.js`);
  await build({
    stdin: { contents, resolveDir: root },
    outfile: file,
    bundle: true,
    minify: true,
    format: "esm",
    target: "es2022",
    // benches/js holds y-websocket and y-indexeddb; .ci holds Yjs, y-protocols and lib0.
    nodePaths: [join(root, "benches/js/node_modules"), join(root, ".ci/node_modules")],
    logLevel: "error",
  });
  return readFileSync(file);
}

function report(name, js, wasm = null) {
  const a = sizes(js);
  const w = wasm ? sizes(wasm) : { raw: 0, gzip: 0, brotli: 0 };
  console.log(`RESULT size-${name} js_raw=${a.raw} js_gzip=${a.gzip} js_brotli=${a.brotli} wasm_raw=${w.raw} wasm_gzip=${w.gzip} wasm_brotli=${w.brotli} gzip=${a.gzip + w.gzip} brotli=${a.brotli + w.brotli}`);
}

const full = readFileSync(join(root, "pkg/pattern_mesh_bg.wasm"));
const transport = readFileSync(join(root, "pkg/transport/pattern_mesh_bg.wasm"));
report("yjs-y-websocket", await bundle("yws", `
  import * as Y from "yjs";
  import { WebsocketProvider } from "y-websocket";
  window.p = new WebsocketProvider("ws://x", "room", new Y.Doc());`));
report("yjs-y-websocket-y-indexeddb", await bundle("ywsidb", `
  import * as Y from "yjs";
  import { WebsocketProvider } from "y-websocket";
  import { IndexeddbPersistence } from "y-indexeddb";
  const doc = new Y.Doc();
  window.p = [new WebsocketProvider("ws://x", "room", doc), new IndexeddbPersistence("room", doc)];`));
report("pattern-mesh-full", await bundle("full", `
  import init, { MeshClient } from "./pkg/pattern_mesh.js";
  window.p = [init, MeshClient];`), full);
report("pattern-mesh-transport", await bundle("transport", `
  import init, { MeshClient } from "./pkg/transport/pattern_mesh.js";
  window.p = [init, MeshClient];`), transport);
report("yjs-pattern-mesh-transport", await bundle("yjs-transport", `
  import * as Y from "yjs";
  import { Awareness } from "y-protocols/awareness";
  import init from "./pkg/transport/pattern_mesh.js";
  import { MeshProvider } from "./pkg/transport/yjs.js";
  const doc = new Y.Doc();
  window.p = [init, MeshProvider.connect(doc, { url: "ws://x", room: "room", awareness: new Awareness(doc) })];`), transport);
// Two CRDT libraries on WebAssembly, for scale: the document alone, without any network
// provider (their wasm counted in full, as ours).
const modules = join(root, "benches/js/node_modules");
report("loro", await bundle("loro", `
  import init, { LoroDoc } from "loro-crdt/web";
  window.p = [init, LoroDoc];`), readFileSync(join(modules, "loro-crdt/web/loro_wasm_bg.wasm")));
report("automerge", await bundle("automerge", `
  import { initializeWasm, from } from "@automerge/automerge/slim";
  window.p = [initializeWasm, from];`), readFileSync(join(modules, "@automerge/automerge/dist/automerge.wasm")));
rmSync(out, { recursive: true, force: true });
