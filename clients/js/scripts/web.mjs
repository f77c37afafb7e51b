// The node serves only files built into its binary, so the web page's copy of the library is a
// committed file: `write` makes node/web/chatcluster.js from dist/index.js, `check` fails if the
// committed one differs from what `write` would make.
import { readFileSync, writeFileSync } from "node:fs";

const target = new URL("../../../node/web/chatcluster.js", import.meta.url);
const header = "// Built from clients/js by `npm run build` (ChatCluster client library): do not edit.\n";
const built = Buffer.concat([Buffer.from(header), readFileSync(new URL("../dist/index.js", import.meta.url))]);

const mode = process.argv[2];
if (mode === "write") {
  writeFileSync(target, built);
} else if (mode === "check") {
  let committed = Buffer.alloc(0);
  try {
    committed = readFileSync(target);
  } catch {
    // missing: reported as stale below
  }
  if (!committed.equals(built)) {
    console.error("node/web/chatcluster.js is not what `npm run build` makes from clients/js:");
    console.error("run `npm run build` in clients/js and commit node/web/chatcluster.js.");
    process.exit(1);
  }
  console.log("node/web/chatcluster.js matches the build of clients/js");
} else {
  console.error("usage: node scripts/web.mjs write|check");
  process.exit(2);
}
