// The import map that lets a page load Yjs, the y-websocket client, Hocuspocus's provider and
// y-protocols from benches/js/node_modules by their bare specifiers (lib0 included), as a
// bundler would.
import { readFile } from "node:fs/promises";
import { join } from "node:path";

const prefix = "/benches/js/node_modules";

// The browser's ES module file of an export condition tree.
const pick = (value) => {
  if (typeof value === "string") return value;
  if (!value || typeof value !== "object") return undefined;
  for (const condition of ["browser", "module", "import", "default"]) {
    const found = pick(value[condition]);
    if (typeof found === "string" && found.endsWith(".js")) return found;
  }
  return undefined;
};

/** `{ imports }` for every ES module export of lib0 and y-protocols, plus yjs, y-websocket and
 * Hocuspocus's provider with its two dependencies. */
export async function importMap(here) {
  const imports = {
    yjs: `${prefix}/yjs/dist/yjs.mjs`,
    "y-websocket": `${prefix}/y-websocket/src/y-websocket.js`,
    "@hocuspocus/provider": `${prefix}/@hocuspocus/provider/dist/hocuspocus-provider.esm.js`,
    "@hocuspocus/common": `${prefix}/@hocuspocus/common/dist/hocuspocus-common.esm.js`,
    "@lifeomic/attempt": `${prefix}/@lifeomic/attempt/dist/es6/src/index.js`,
  };
  for (const name of ["lib0", "y-protocols"]) {
    const manifest = JSON.parse(await readFile(join(here, "node_modules", name, "package.json"), "utf8"));
    for (const [key, value] of Object.entries(manifest.exports)) {
      const target = pick(value);
      if (typeof target === "string" && target.endsWith(".js")) imports[`${name}${key.slice(1)}`] = `${prefix}/${name}/${target.slice(2)}`;
    }
  }
  return { imports };
}
