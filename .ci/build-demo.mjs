// Bundles the demo editor (www/editor.js: CodeMirror 6, Yjs, y-codemirror.next and the package's
// Yjs provider from pkg/) into www/build/editor.js with esbuild, minified, with a source map.
// The libraries come from .ci/node_modules. The package's module itself stays out of the bundle:
// the page loads /pkg/pattern_mesh.js beside the wasm file it was built with, so the two always
// match (the provider, pkg/yjs.js, is bundled: rebuild the demo after the package).
import { build } from "esbuild";
import { fileURLToPath } from "node:url";

const root = fileURLToPath(new URL("../", import.meta.url));
const result = await build({
  absWorkingDir: root,
  entryPoints: ["www/editor.js"],
  outfile: "www/build/editor.js",
  bundle: true,
  format: "esm",
  target: "es2022",
  minify: true,
  sourcemap: true,
  nodePaths: [`${root}.ci/node_modules`],
  plugins: [{
    name: "package-module-external",
    setup(build) {
      build.onResolve({ filter: /(^|\/)pattern_mesh\.js$/ }, () => ({ path: "/pkg/pattern_mesh.js", external: true }));
    },
  }],
  metafile: true,
  logLevel: "warning",
});
const bytes = Object.values(result.metafile.outputs).find((o) => o.entryPoint)?.bytes ?? 0;
console.log(`www/build/editor.js: ${bytes} bytes`);
