#!/usr/bin/env bash
# The demo behind `make run`: Redis (when redis-server is installed, otherwise the
# controller's embedded store), the controller, the demo upstream and Envoy with the built
# filter, all in the foreground. Ctrl-C stops everything this script started.
set -euo pipefail
cd "$(dirname "$0")/.."

ENVOY_BIN=${ENVOY_BIN:?set ENVOY_BIN to the envoy binary (make run does)}
REDIS_PORT=${SLUICE_DEMO_REDIS_PORT:-6380}
LOGS=.run
mkdir -p "$LOGS"

pids=()
stop() {
  trap - EXIT INT TERM
  [ ${#pids[@]} -eq 0 ] || kill "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap stop EXIT
trap 'echo; echo "stopping"; exit 0' INT TERM

wait_for() { # what url
  for _ in $(seq 1 300); do
    curl -fsS -o /dev/null "$2" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "$1 did not become ready; see $LOGS/" >&2
  exit 1
}

controller_args=(--config controller/demo-rules.toml --listen 127.0.0.1:8081)
if command -v redis-server >/dev/null; then
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
    >"$LOGS/redis.log" 2>&1 &
  pids+=($!)
  controller_args+=(--redis-url "redis://127.0.0.1:$REDIS_PORT")
  store="Redis on 127.0.0.1:$REDIS_PORT"
else
  store="the embedded in-memory store (no redis-server on the PATH)"
fi

target/release/sluice-controller "${controller_args[@]}" >"$LOGS/controller.log" 2>&1 &
pids+=($!)
target/release/sluice-demo-upstream 127.0.0.1:8080 >"$LOGS/upstream.log" 2>&1 &
pids+=($!)
wait_for controller http://127.0.0.1:8081/readyz

"$ENVOY_BIN" -c envoy/demo.yaml --concurrency 2 --disable-hot-restart --log-level warn \
  >"$LOGS/envoy.log" 2>&1 &
pids+=($!)
wait_for envoy http://127.0.0.1:9901/ready

cat <<MSG

Sluice demo is up (counters in $store).
  Envoy      http://127.0.0.1:10000   (admin http://127.0.0.1:9901)
  controller http://127.0.0.1:8081    (rules: controller/demo-rules.toml)
  upstream   http://127.0.0.1:8080
  logs       $LOGS/

Try it: 5 requests per 10 s per client pass, the 6th gets a 429:
  for i in \$(seq 6); do curl -s -i http://127.0.0.1:10000/hello | grep -iE '^(HTTP|x-ratelimit|retry-after)'; done

Ctrl-C stops everything.
MSG

# Stay in the foreground until Ctrl-C or until one of the parts dies.
wait -n "${pids[@]}"
echo "a part of the demo exited; see $LOGS/" >&2
exit 1
