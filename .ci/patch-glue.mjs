// Makes `free()` (and `[Symbol.dispose]`, the same function) of the JS glue wasm-bindgen
// 0.2.130 writes do nothing for an object of a module instance that was replaced after a panic.
// The glue checks that an object is not stale in every method but `free()`, which handed the
// dead instance's pointer to the fresh instance to free: it read, and could free, memory that
// a client of the fresh instance owns. An application that frees its clients once they told it
// they stopped (their `PanicError`) does exactly that. The dead instance's memory went with it:
// there is nothing to free.
// Usage: node .ci/patch-glue.mjs <pattern_mesh.js>...
import { readFileSync, writeFileSync } from "node:fs";

const free = `    free() {
        const ptr = this.__destroy_into_raw();`;
const checked = `    free() {
        // An object of an instance that was replaced (see the module's panic hook): its memory
        // went with that instance.
        if (this.__wbg_inst !== undefined && this.__wbg_inst !== __wbg_instance_id) {
            this.__wbg_ptr = 0;
            return;
        }
        const ptr = this.__destroy_into_raw();`;

for (const file of process.argv.slice(2)) {
  const glue = readFileSync(file, "utf8");
  if (glue.includes(checked)) continue;
  const classes = glue.split("    __destroy_into_raw() {").length - 1;
  const frees = glue.split(free).length - 1;
  if (classes === 0 || frees !== classes || !glue.includes("let __wbg_instance_id")) {
    console.error(`${file}: the glue's free() is not the one this patch knows (${frees} of ${classes} classes): check it against the wasm-bindgen in use`);
    process.exit(1);
  }
  writeFileSync(file, glue.replaceAll(free, checked));
}
