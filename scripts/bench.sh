#!/usr/bin/env bash
# Builds the node, the reference server and the load tool in release mode, then runs every
# benchmark (chat-node and the bare tokio-tungstenite reference, one after the other) and prints
# the figures with the exact command that produced them. See docs/benchmarks.md.
#
#   scripts/bench.sh                 # all benchmarks with the defaults of the issue
#   scripts/bench.sh --only node     # extra arguments go to `chat-bench all`
#   BENCH=broadcast scripts/bench.sh # one benchmark: memory, connect or broadcast
#
# Everything listens on 127.0.0.1 and stops by itself (about 2 minutes in all). Run it on an
# otherwise idle machine: the table shows how much CPU other processes used. On a shared machine,
# `sudo chrt -r 1 scripts/bench.sh` keeps other work off the CPU while it runs.
set -euo pipefail
cd "$(dirname "$0")/.."

# 10 000 connections on each side of loopback need more than the usual 1024 open files.
hard=$(ulimit -Hn)
if [ "$hard" != unlimited ] && [ "$hard" -lt 10200 ]; then
  echo "open files hard limit is $hard; 10 200+ are needed (ulimit -Hn)" >&2
  exit 1
fi
ulimit -Sn "$hard"

cargo build --release -p chat-node -p chat-e2e --bin chat-node --bin ref-server --bin chat-bench

target/release/chat-bench "${BENCH:-all}" "$@"
echo
# Three nodes on 127.0.0.2-4: cross-node latency at 10 000 msg/s, then saturation.
target/release/chat-bench cluster
