// Patches the JS glue wasm-bindgen 0.2.130 writes for a module instance replaced after a panic
// (see the module's panic hook):
// - `free()` (and `[Symbol.dispose]`, the same function) of an object of the replaced instance
//   does nothing. The glue checks that an object is not stale in every method but `free()`,
//   which handed the dead instance's pointer to the fresh instance to free: it read, and could
//   free, memory that a client of the fresh instance owns. An application that frees its
//   clients once they told it they stopped (their `PanicError`) does exactly that. The dead
//   instance's memory went with it: there is nothing to free.
// - A callback the replaced instance handed to the browser and that comes after the panic (the
//   answer of an IndexedDB request that was under way, a socket's event) does nothing, rather
//   than throw an uncaught "Cannot invoke closure from previous WASM instance" into the page's
//   console: the clients of that instance stopped with it, and said so with their `PanicError`.
// Usage: node .ci/patch-glue.mjs <pattern_mesh.js>...
import { readFileSync, writeFileSync } from "node:fs";

const patches = [
  {
    what: "free()",
    from: `    free() {
        const ptr = this.__destroy_into_raw();`,
    to: `    free() {
        // An object of an instance that was replaced (see the module's panic hook): its memory
        // went with that instance.
        if (this.__wbg_inst !== undefined && this.__wbg_inst !== __wbg_instance_id) {
            this.__wbg_ptr = 0;
            return;
        }
        const ptr = this.__destroy_into_raw();`,
    // One in each class.
    count: (glue) => glue.split("    __destroy_into_raw() {").length - 1,
  },
  {
    what: "closures",
    from: `        if (state.instance !== __wbg_instance_id) {
            throw new Error('Cannot invoke closure from previous WASM instance');
        }`,
    to: `        if (state.instance !== __wbg_instance_id) {
            // A callback of an instance that was replaced: its clients stopped with it.
            return;
        }`,
    // One in each kind of closure the glue makes.
    count: (glue) => glue.split("const state = { a: arg0, b: arg1, cnt: 1, instance: __wbg_instance_id };").length - 1,
  },
];

for (const file of process.argv.slice(2)) {
  let glue = readFileSync(file, "utf8");
  if (!glue.includes("let __wbg_instance_id")) {
    console.error(`${file}: the glue has no instance id: check it against the wasm-bindgen in use`);
    process.exit(1);
  }
  for (const { what, from, to, count } of patches) {
    if (glue.includes(to)) continue;
    const expected = count(glue);
    const found = glue.split(from).length - 1;
    if (expected === 0 || found !== expected) {
      console.error(`${file}: the glue's ${what} are not the ones this patch knows (${found} of ${expected}): check it against the wasm-bindgen in use`);
      process.exit(1);
    }
    glue = glue.replaceAll(from, to);
  }
  writeFileSync(file, glue);
}
