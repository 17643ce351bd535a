#!/usr/bin/env bash
# Builds the filter as it was at a git ref, for `make bench BASELINE=<ref>`: the benchmark
# then runs that build beside the working tree's in the same run. Prints the .wasm's path.
set -euo pipefail
cd "$(dirname "$0")/.."
ref=${1:?usage: build-baseline-wasm.sh <git ref>}
commit=$(git rev-parse --verify "$ref^{commit}")
dir=target/baseline/$commit
wasm=$dir/target/wasm32-wasip1/release/sluice_filter.wasm
if [ ! -f "$wasm" ]; then
  rm -rf "$dir/src"
  mkdir -p "$dir"
  git archive --format=tar --prefix=src/ "$commit" | tar -x -C "$dir"
  (cd "$dir/src" && CARGO_TARGET_DIR=../target cargo build --release --locked -p sluice-filter \
    --target wasm32-wasip1 >&2)
fi
echo "$PWD/$wasm"
