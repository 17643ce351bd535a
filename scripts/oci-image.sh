#!/usr/bin/env bash
# Packs the filter's .wasm as an OCI image that Istio's WasmPlugin pulls (`make oci`), with
# stock tools only (bash, GNU tar, gzip, sha256sum; no container engine):
#
#   target/oci/                 an OCI image layout (oci-layout, index.json, blobs/sha256/…)
#     one manifest, tagged with the workspace's version
#       config  application/vnd.oci.image.config.v1+json
#       layer   application/vnd.oci.image.layer.v1.tar+gzip: a tar holding only plugin.wasm
#
# That is the "compat" variant of the Wasm image format, the one Istio's image fetcher reads
# first (pkg/wasm/imagefetcher.go: a last layer of type tar+gzip holding plugin.wasm); the
# same image `FROM scratch` + `COPY plugin.wasm ./` builds. The image is reproducible: the
# same .wasm always gives the same digest (fixed mtime and owner, one entry, gzip -n).
#
# Prints the manifest's digest (hex, what a WasmPlugin's `sha256` must be for an oci:// URL)
# on stdout and writes it into the WasmPlugins of deploy/istio (the sidecars' and the
# gateway's), unless --no-update.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: scripts/oci-image.sh [--wasm FILE] [--out DIR] [--plugin FILE] [--no-update]
  --wasm FILE   the filter (default target/wasm32-wasip1/release/sluice_filter.wasm)
  --out DIR     where the OCI image layout goes (default target/oci; replaced)
  --plugin FILE a WasmPlugin to write the digest into; may be given more than once (default
                deploy/istio/wasmplugin.yaml and deploy/istio/gateway/wasmplugin.yaml)
  --no-update   do not write the digest into the WasmPlugin
EOF
}

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
wasm=$root/target/wasm32-wasip1/release/sluice_filter.wasm
out=$root/target/oci
plugins=()
update=1
while (($#)); do
    case $1 in
        --wasm) wasm=${2:?--wasm needs a file}; shift 2 ;;
        --out) out=${2:?--out needs a directory}; shift 2 ;;
        --plugin) plugins+=("${2:?--plugin needs a file}"); shift 2 ;;
        --no-update) update=0; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
done

((${#plugins[@]})) || plugins=("$root/deploy/istio/wasmplugin.yaml" "$root/deploy/istio/gateway/wasmplugin.yaml")

say() { echo "oci-image: $*" >&2; }
die() { say "$*"; exit 1; }

[[ -f $wasm ]] || die "$wasm not found: build it first (make wasm)"
# Istio refuses a module without the Wasm magic number; so do we, before anyone pushes it.
[[ $(head -c 4 "$wasm" | od -An -tx1 | tr -d ' \n') == 0061736d ]] || die "$wasm is not a Wasm module"
version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"$/\1/p' "$root/Cargo.toml")
[[ $version =~ ^[0-9A-Za-z._-]+$ ]] || die "no version in [workspace.package] of Cargo.toml"

sha256() { sha256sum "$1" | cut -d' ' -f1; }
size() { stat -c %s "$1"; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
blobs=$work/layout/blobs/sha256
mkdir -p "$work/root" "$blobs"

# Stores a file as a blob; prints its digest.
blob() {
    local digest
    digest=$(sha256 "$1")
    cp "$1" "$blobs/$digest"
    echo "$digest"
}

# The layer: plugin.wasm alone, owned by 0:0, mode 0644, mtime 0 (ustar: no extended
# headers carrying access times).
install -m 0644 "$wasm" "$work/root/plugin.wasm"
tar --create --file "$work/layer.tar" --directory "$work/root" --format=ustar \
    --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner --mode=0644 plugin.wasm
gzip -9 --no-name --stdout "$work/layer.tar" >"$work/layer.tar.gz"
diff_id=$(sha256 "$work/layer.tar")
layer=$(blob "$work/layer.tar.gz")
layer_size=$(size "$work/layer.tar.gz")

# The image configuration: no process to run, the layer's uncompressed digest. Istio reads
# neither; registries and tools want a well-formed one. No `created`: it would change the
# digest at every build.
printf '{"architecture":"wasm","os":"wasip1","config":{},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
    "$diff_id" >"$work/config.json"
config=$(blob "$work/config.json")
config_size=$(size "$work/config.json")

printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",%s,%s,%s}' \
    "$(printf '"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s}' "$config" "$config_size")" \
    "$(printf '"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:%s","size":%s}]' "$layer" "$layer_size")" \
    "$(printf '"annotations":{"org.opencontainers.image.title":"sluice-filter","org.opencontainers.image.version":"%s"}' "$version")" \
    >"$work/manifest.json"
manifest=$(blob "$work/manifest.json")
manifest_size=$(size "$work/manifest.json")

printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"org.opencontainers.image.ref.name":"%s"}}]}' \
    "$manifest" "$manifest_size" "$version" >"$work/layout/index.json"
printf '{"imageLayoutVersion":"1.0.0"}' >"$work/layout/oci-layout"

rm -rf "$out"
mkdir -p "$(dirname "$out")"
mv "$work/layout" "$out"

if ((update)); then
    line='^([[:space:]]*sha256:[[:space:]]*)[0-9a-f]{64}[[:space:]]*$'
    for plugin in "${plugins[@]}"; do
        count=$(grep -cE "$line" "$plugin" || true)
        ((count == 1)) || die "$plugin: expected one \`sha256: <64 hex digits>\` line, found $count"
    done
    for plugin in "${plugins[@]}"; do
        sed -E -i "s/$line/\\1$manifest/" "$plugin"
        say "wrote the digest into ${plugin#"$root"/}"
    done
fi

say "image: ${out#"$root"/} (tag $version), manifest sha256:$manifest"
say "push:  skopeo copy --preserve-digests oci:${out#"$root"/}:$version docker://REGISTRY/sluice-filter:$version"
echo "$manifest"
