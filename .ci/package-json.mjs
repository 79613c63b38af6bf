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
  "./pattern_mesh_bg.wasm": "./pattern_mesh_bg.wasm",
  "./package.json": "./package.json",
};
if (!pkg.repository) {
  const scp = origin.match(/^([\w.-]+@[\w.-]+):(.+)$/); // git@host:owner/name.git
  const url = scp ? `git+ssh://${scp[1]}/${scp[2]}` : origin;
  if (/^(https|ssh|git|git\+ssh|git\+https):\/\//.test(url)) {
    pkg.repository = { type: "git", url: url.startsWith("git+") || url.startsWith("git:") ? url : `git+${url}`, directory: "pkg" };
  }
}
writeFileSync(file, JSON.stringify(pkg, null, 2) + "\n");
