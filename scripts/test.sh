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
echo "== helm chart lint and Kubernetes schema validation"; ./scripts/lint-chart.sh
