#!/usr/bin/env bash
# Lints charts/chatcluster-operator with real Helm (helm-sdkpy, Helm v4's Go library), renders it
# and validates every rendered manifest, examples/ and crds/ against the Kubernetes schemas
# (kubernetes-validate). Details: scripts/lint-chart.py. Needs no network.
#
#   scripts/lint-chart.sh            # run the checks (the venv must exist)
#   scripts/lint-chart.sh --install  # only create or update the venv (PyPI; .ci/run does this)
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${CHART_LINT_VENV:-target/chart-lint-venv}"
requirements=scripts/chart-lint-requirements.txt

installed() {
  [ -x "$venv/bin/python" ] && cmp -s "$requirements" "$venv/requirements.txt" &&
    "$venv/bin/python" -c 'import helm_sdkpy, kubernetes_validate' 2>/dev/null
}

if [ "${1:-}" = "--install" ]; then
  if installed; then
    echo "chart lint venv $venv is up to date"
  else
    echo "== creating $venv (pip install -r $requirements)"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check --ignore-requires-python -r "$requirements"
    cp "$requirements" "$venv/requirements.txt"
  fi
  exit 0
elif ! installed; then
  echo "scripts/lint-chart.sh: $venv is missing or stale; create it with: scripts/lint-chart.sh --install" >&2
  exit 1
fi

# Helm keeps releases in memory and its caches in a scratch directory; the Go runtime reads the
# environment when the library loads, so this must be set before Python starts.
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
export PYTHONUNBUFFERED=1 HELM_DRIVER=memory HELM_CACHE_HOME="$scratch/cache" HELM_CONFIG_HOME="$scratch/config" \
  HELM_DATA_HOME="$scratch/data" KUBECONFIG="$scratch/no-kubeconfig"
exec "$venv/bin/python" scripts/lint-chart.py
