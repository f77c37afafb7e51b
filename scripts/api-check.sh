#!/usr/bin/env bash
# Sets up target/api-check-venv with schemathesis (pinned in scripts/api-check-requirements.txt),
# which e2e/tests/node_api.rs runs against a real node to check the server API against its
# OpenAPI document. Needs PyPI once; skipped when the venv is up to date.
#
#   scripts/api-check.sh --install
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${API_CHECK_VENV:-target/api-check-venv}"
requirements=scripts/api-check-requirements.txt

if [ "${1:-}" != "--install" ]; then
  echo "usage: scripts/api-check.sh --install" >&2
  exit 2
fi
if [ -x "$venv/bin/schemathesis" ] && cmp -s "$requirements" "$venv/requirements.txt"; then
  echo "api check venv $venv is up to date"
  exit 0
fi
echo "== creating $venv (pip install -r $requirements)"
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements"
cp "$requirements" "$venv/requirements.txt"
