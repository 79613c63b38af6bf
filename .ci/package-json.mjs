// Completes pkg/package.json with what wasm-pack leaves out: `exports` (bundlers and Node
// resolve the module, its types and its wasm file through it), and `repository` when the
// package is built from a clone of a public repository (the `origin` remote, if it is an
// https, ssh or git URL; a local path is no place for a package's users to go).
// Usage: node .ci/package-json.mjs <package.json> [<origin url>]
import { readFileSync, writeFileSync } from "node:fs";

const [file, origin = ""] = process.argv.slice(2);
const pkg = JSON.parse(readFileSync(file, "utf8"));
pkg.exports = {
  ".": { types: "./pattern_mesh.d.ts", default: "./pattern_mesh.js" },
  "./yjs": { types: "./yjs.d.ts", default: "./yjs.js" },
  "./transport": { types: "./transport/pattern_mesh.d.ts", default: "./transport/pattern_mesh.js" },
  "./transport/yjs": { types: "./transport/yjs.d.ts", default: "./transport/yjs.js" },
  "./pattern_mesh_bg.wasm": "./pattern_mesh_bg.wasm",
  "./transport/pattern_mesh_bg.wasm": "./transport/pattern_mesh_bg.wasm",
  "./package.json": "./package.json",
};
pkg.files = (pkg.files ?? []).filter((f) => f !== "transport");
// Named one by one: the relay's precompressed copies (`.br`, `.gz`) stay out of the package.
const transport = ["pattern_mesh.js", "pattern_mesh.d.ts", "pattern_mesh_bg.wasm", "pattern_mesh_bg.wasm.d.ts", "snippets", "yjs.js", "yjs.d.ts"];
for (const file of ["yjs.js", "yjs.d.ts", ...transport.map((f) => `transport/${f}`)]) {
  if (!pkg.files.includes(file)) pkg.files.push(file);
}
// The provider (pattern-mesh/yjs) works with the application's Yjs; the rest needs neither.
pkg.peerDependencies = { yjs: "^13.6.0", "y-protocols": "^1.0.6" };
pkg.peerDependenciesMeta = { yjs: { optional: true }, "y-protocols": { optional: true } };
if (!pkg.repository) {
  const scp = origin.match(/^([\w.-]+@[\w.-]+):(.+)$/); // git@host:owner/name.git
  const url = scp ? `git+ssh://${scp[1]}/${scp[2]}` : origin;
  if (/^(https|ssh|git|git\+ssh|git\+https):\/\//.test(url)) {
    pkg.repository = { type: "git", url: url.startsWith("git+") || url.startsWith("git:") ? url : `git+${url}`, directory: "pkg" };
  }
}
writeFileSync(file, JSON.stringify(pkg, null, 2) + "\n");
