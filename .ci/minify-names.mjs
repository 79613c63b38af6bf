// Shortens the names the wasm module and its JS glue (wasm-bindgen 0.2.130, `--target web`) meet
// each other by: every import is renamed to one or two characters in a module of one character
// (`a` for the glue's own imports, `b`, `c`, ... for each snippet), and every export but `memory`
// (which `init()` hands to the application) likewise. wasm-bindgen's names carry a 16-digit
// hash each, which compresses badly, and appear in the wasm and again in the glue.
// The wasm is rewritten section by section (the import and export sections; every other byte
// stays as it is), and the glue and its type declarations take the same names. A module already
// renamed is left alone.
// Usage: node .ci/minify-names.mjs <dir>...   (each holding pattern_mesh.js and its wasm)
import { existsSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";

function fail(message) {
  console.error(`minify-names: ${message}: check it against the wasm-bindgen in use`);
  process.exit(1);
}

// Short names: a..z A..Z $ _, then two of them.
const alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ$_";
function shortName(i) {
  if (i < alphabet.length) return alphabet[i];
  i -= alphabet.length;
  if (i >= alphabet.length * alphabet.length) fail("more names than two characters hold");
  return alphabet[Math.floor(i / alphabet.length)] + alphabet[i % alphabet.length];
}

class Reader {
  constructor(bytes, at = 0) {
    this.bytes = bytes;
    this.at = at;
  }
  byte() {
    if (this.at >= this.bytes.length) fail("the wasm ends inside a section");
    return this.bytes[this.at++];
  }
  u32() {
    let value = 0;
    for (let shift = 0; ; shift += 7) {
      const b = this.byte();
      value += (b & 0x7f) * 2 ** shift;
      if (!(b & 0x80)) return value;
      if (shift > 28) fail("an integer longer than 32 bits");
    }
  }
  name() {
    const len = this.u32();
    const text = new TextDecoder().decode(this.bytes.subarray(this.at, this.at + len));
    this.at += len;
    return text;
  }
  // The bytes from `start` to here.
  since(start) {
    return this.bytes.subarray(start, this.at);
  }
}

function u32Bytes(value) {
  const out = [];
  do {
    let b = value & 0x7f;
    value = Math.floor(value / 128);
    if (value) b |= 0x80;
    out.push(b);
  } while (value);
  return out;
}

function nameBytes(text) {
  const bytes = new TextEncoder().encode(text);
  return [...u32Bytes(bytes.length), ...bytes];
}

// Skips an import's description (after its kind byte).
function skipImportDesc(r, kind) {
  const limits = () => {
    const flags = r.byte();
    r.u32();
    if (flags & 1) r.u32();
  };
  switch (kind) {
    case 0: // function: a type index
      r.u32();
      break;
    case 1: // table: a reference type and limits
      r.byte();
      limits();
      break;
    case 2: // memory
      limits();
      break;
    case 3: // global: a value type and mutability
      r.byte();
      r.byte();
      break;
    case 4: // tag: an attribute and a type index
      r.byte();
      r.u32();
      break;
    default:
      fail(`an import of unknown kind ${kind}`);
  }
}

// Rewrites the import and export sections of `wasm`; returns the new bytes, and the renames:
// `imports` as [module, name, new module, new name], `exports` as [name, new name].
function rewrite(wasm) {
  const r = new Reader(wasm, 8);
  const out = [wasm.subarray(0, 8)];
  const imports = [];
  const exports = [];
  const modules = new Map();
  const perModule = new Map();
  while (r.at < wasm.length) {
    const sectionStart = r.at;
    const id = r.byte();
    const size = r.u32();
    const start = r.at;
    let body;
    if (id === 2) {
      body = [];
      const count = r.u32();
      body.push(...u32Bytes(count));
      for (let i = 0; i < count; i++) {
        const module = r.name();
        const name = r.name();
        if (!modules.has(module)) modules.set(module, shortName(modules.size));
        const used = perModule.get(module) ?? 0;
        perModule.set(module, used + 1);
        const newModule = modules.get(module);
        const newName = shortName(used);
        imports.push([module, name, newModule, newName]);
        const descStart = r.at;
        skipImportDesc(r, r.byte());
        body.push(...nameBytes(newModule), ...nameBytes(newName), ...r.since(descStart));
      }
    } else if (id === 7) {
      body = [];
      const count = r.u32();
      body.push(...u32Bytes(count));
      let next = 0;
      for (let i = 0; i < count; i++) {
        const name = r.name();
        const kindStart = r.at;
        r.byte();
        r.u32();
        let newName = name;
        if (name !== "memory") {
          do newName = shortName(next++);
          while (newName === "memory");
          exports.push([name, newName]);
        }
        body.push(...nameBytes(newName), ...r.since(kindStart));
      }
    }
    r.at = start + size;
    if (r.at > wasm.length) fail("a section runs past the end of the wasm");
    if (body) {
      out.push(Uint8Array.from([id, ...u32Bytes(body.length), ...body]));
    } else {
      out.push(wasm.subarray(sectionStart, r.at));
    }
  }
  return { bytes: Buffer.concat(out), imports, exports };
}

const escape = (s) => s.replace(/[$]/g, "\\$&");

for (const dir of process.argv.slice(2)) {
  const glueFile = join(dir, "pattern_mesh.js");
  const wasmFile = join(dir, "pattern_mesh_bg.wasm");
  let glue = readFileSync(glueFile, "utf8");
  if (!glue.includes('"./pattern_mesh_bg.js": import0,')) {
    if (glue.includes("// Names shortened by .ci/minify-names.mjs")) continue;
    fail(`${glueFile}: the glue's import object is not the one this script knows`);
  }
  const { bytes, imports, exports } = rewrite(readFileSync(wasmFile));
  // The glue's own imports: keys of `import0`, each once.
  const snippets = new Map();
  for (const [module, name, newModule, newName] of imports) {
    if (module === "./pattern_mesh_bg.js") {
      const from = `\n        ${name}: function(`;
      const found = glue.split(from).length - 1;
      if (found !== 1) fail(`${glueFile}: the import ${name} is defined ${found} times`);
      glue = glue.replace(from, `\n        ${newName}: function(`);
      if (newModule !== "a") fail("the glue's own imports are not the module's first");
    } else {
      if (!snippets.has(module)) snippets.set(module, { newModule, entries: [] });
      snippets.get(module).entries.push([newName, name]);
    }
  }
  glue = glue.replace('"./pattern_mesh_bg.js": import0,', "a: import0,");
  // Each snippet's namespace, under its short names.
  for (const [module, { newModule, entries }] of snippets) {
    const line = new RegExp(`\n        "${escape(module).replace(/[.]/g, "\\.")}": (import[0-9]+),`);
    const match = glue.match(line);
    if (!match) fail(`${glueFile}: the snippet ${module} is not imported as this script knows`);
    const fields = entries
      .map(([newName, name]) => `${newName}: ${match[1]}[${JSON.stringify(name)}]`)
      .join(", ");
    glue = glue.replace(match[0], `\n        ${newModule}: { __proto__: null, ${fields} },`);
  }
  // Exports, as the glue calls them.
  const renamed = new Map(exports);
  glue = glue.replace(/\bwasm\.([A-Za-z0-9_$]+)/g, (whole, name) => {
    if (name === "memory") return whole;
    const to = renamed.get(name);
    if (to === undefined) fail(`${glueFile}: the glue calls ${name}, which the wasm does not export`);
    return `wasm.${to}`;
  });
  glue = glue.replace("function __wbg_get_imports() {", "// Names shortened by .ci/minify-names.mjs\nfunction __wbg_get_imports() {");
  // The exports' types, in `InitOutput` and the wasm's own declaration file.
  for (const [file, prefix] of [
    [join(dir, "pattern_mesh.d.ts"), "    readonly "],
    [join(dir, "pattern_mesh_bg.wasm.d.ts"), "export const "],
  ]) {
    if (!existsSync(file)) continue;
    let types = readFileSync(file, "utf8");
    for (const [name, to] of exports) {
      types = types.replace(new RegExp(`^${escape(prefix)}${escape(name)}:`, "m"), `${prefix}${to}:`);
    }
    writeFileSync(file, types);
  }
  writeFileSync(wasmFile, bytes);
  writeFileSync(glueFile, glue);
}
