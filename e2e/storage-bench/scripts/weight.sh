#!/usr/bin/env bash
# Compile weight of each candidate on its own: an empty binary crate that depends on it alone,
# built from scratch in release mode with one job. Prints `cargo tree | wc -l` (the crate itself
# included, as the brief counts it), the number of distinct crates, and the build's CPU and wall
# time. Scratch crates live in a temp dir; targets under $CARGO_TARGET_DIR/weight-*.
set -euo pipefail
: "${CARGO_TARGET_DIR:=/work/target-bench}"
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-1}"
scratch=$(mktemp -d /tmp/storage-weight-XXXXXX)
trap 'rm -rf "$scratch"' EXIT
printf '%-16s %10s %8s %12s %12s\n' candidate 'tree lines' crates 'build cpu s' 'build wall s'
for dep in 'redb = "=4.6.0"' 'redb = "=3.1.3"' 'fjall = "=3.1.13"'; do
  name=$(echo "$dep" | sed -E 's/ = "=?/-/; s/"//')
  dir="$scratch/$name"
  mkdir -p "$dir/src"
  printf '[package]\nname = "weight"\nversion = "0.0.0"\nedition = "2024"\n[workspace]\n[dependencies]\n%s\n' "$dep" >"$dir/Cargo.toml"
  echo 'fn main() {}' >"$dir/src/main.rs"
  target="$CARGO_TARGET_DIR/weight-$name"
  rm -rf "$target"
  lines=$(cd "$dir" && cargo tree -q 2>/dev/null | wc -l)
  crates=$(cd "$dir" && cargo tree -q --prefix none -e normal,build 2>/dev/null | sed 's/ (\*)//' | sort -u | wc -l)
  t=$( { cd "$dir" && CARGO_TARGET_DIR="$target" /usr/bin/time -f '%U %S %e' cargo build -q --release 2>&1 >/dev/null; } | tail -1)
  read -r u s e <<<"$t"
  printf '%-16s %10s %8s %12.1f %12.1f\n' "$name" "$lines" "$((crates - 1))" "$(awk "BEGIN{print $u + $s}")" "$e"
done
