#!/usr/bin/env bash
# Installs Debian packages by name, as root or through sudo. Used by the Makefile for
# redis-server, wrk and chromium when they are missing.
set -euo pipefail
sudo=()
[ "$(id -u)" -eq 0 ] || sudo=(sudo)
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "$@" >/dev/null
