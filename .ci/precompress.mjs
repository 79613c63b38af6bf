// Writes brotli (quality 11) and gzip (level 9) copies beside the files the relay serves most
// (`x.wasm.br`, `x.wasm.gz`), which it sends as they are to browsers that accept them, instead
// of compressing on every request at a faster level. Stale copies are replaced; the npm package
// leaves them out (its `files` list names what it ships).
// Usage: node .ci/precompress.mjs <file>...
import { readFileSync, writeFileSync } from "node:fs";
import { constants, brotliCompressSync, gzipSync } from "node:zlib";

for (const file of process.argv.slice(2)) {
  const bytes = readFileSync(file);
  writeFileSync(`${file}.br`, brotliCompressSync(bytes, {
    params: { [constants.BROTLI_PARAM_QUALITY]: 11, [constants.BROTLI_PARAM_SIZE_HINT]: bytes.length },
  }));
  writeFileSync(`${file}.gz`, gzipSync(bytes, { level: 9 }));
}
