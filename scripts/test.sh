#!/usr/bin/env bash
# The project's whole test suite: formatting, lints, every unit, integration, browser and
# end-to-end test. Needs chromium + chromedriver (see .ci/run, which installs them).
set -euo pipefail
cd "$(dirname "$0")/.."

# Tests open thousands of sockets and run several node processes.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== build binaries used by the end-to-end tests"
cargo build --workspace --bins --locked
echo "== cargo test"
cargo test --workspace --locked
echo "== JavaScript client (clients/js): install, web copy, type check, unit and integration tests"
# Its integration tests run the chat-node built above.
chat_node_bin="${CHAT_NODE_BIN:-$(realpath -m "${CARGO_TARGET_DIR:-target}")/debug/chat-node}"
(
  cd clients/js
  npm ci --no-audit --no-fund
  # The node embeds node/web/chatcluster.js: it must be exactly what this source builds.
  npm run --silent check:web
  npm run --silent typecheck
  CHAT_NODE_BIN="$chat_node_bin" npm test
)
echo "== helm chart lint and Kubernetes schema validation"; ./scripts/lint-chart.sh
