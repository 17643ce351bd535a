#!/usr/bin/env bash
# Builds a part of Sluice as it was at a git ref and prints the artifact's path:
#   filter      the release .wasm  (`make bench BASELINE=<ref>` runs it beside the tree's)
#   controller  the controller binary (the version-skew tests run the previous release's)
# Each ref is built once, from `git archive` into target/at-ref/<commit>, with its own lock
# file, and kept for the next run.
set -euo pipefail
cd "$(dirname "$0")/.."
ref=${1:?usage: build-at-ref.sh <git ref> filter|controller}
part=${2:?usage: build-at-ref.sh <git ref> filter|controller}
commit=$(git rev-parse --verify "$ref^{commit}")
short=$(git rev-parse --short=12 "$commit")
dir=target/at-ref/$commit
case "$part" in
  filter)
    artifact=$dir/target/wasm32-wasip1/release/sluice_filter.wasm
    build=(--release -p sluice-filter --target wasm32-wasip1) ;;
  controller)
    artifact=$dir/target/debug/sluice-controller
    build=(-p sluice-controller --bin sluice-controller) ;;
  *) echo "build-at-ref.sh: unknown part '$part' (filter or controller)" >&2; exit 2 ;;
esac
if [ ! -f "$artifact" ]; then
  if [ ! -d "$dir/src" ]; then
    mkdir -p "$dir"
    git archive --format=tar --prefix=src/ "$commit" | tar -x -C "$dir"
  fi
  (cd "$dir/src" && SLUICE_COMMIT=$short CARGO_TARGET_DIR=../target cargo build --locked "${build[@]}" >&2)
fi
echo "$PWD/$artifact"
