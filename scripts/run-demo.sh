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

# The admin token: made on the first run and kept in .run/, so that the CLI keeps working
# across runs.
TOKEN_FILE="$LOGS/admin-token"
if [ ! -s "$TOKEN_FILE" ]; then
  (umask 077; printf 'sluice-demo-%s\n' "$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')" >"$TOKEN_FILE")
fi
ADMIN_TOKEN=$(cat "$TOKEN_FILE")
# The check token Envoy's filter presents to the controller (the filter reads it from
# Envoy's environment: envoy/demo.yaml's token_env); made once, like the admin token.
CHECK_TOKEN_FILE="$LOGS/check-token"
if [ ! -s "$CHECK_TOKEN_FILE" ]; then
  (umask 077; printf 'sluice-check-%s\n' "$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')" >"$CHECK_TOKEN_FILE")
fi
CHECK_TOKEN=$(cat "$CHECK_TOKEN_FILE")

controller_args=(--config controller/demo-rules.toml --listen 127.0.0.1:8081
                 --admin-listen 127.0.0.1:8082)
if command -v redis-server >/dev/null; then
  # The configuration lives in Redis: every change the admin API acknowledged is on disk
  # first (append-only file, fsync always), so it survives restarts of the demo.
  mkdir -p "$LOGS/redis"
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly yes \
    --appendfsync always --dir "$LOGS/redis" >"$LOGS/redis.log" 2>&1 &
  pids+=($!)
  controller_args+=(--redis-url "redis://127.0.0.1:$REDIS_PORT")
  store="Redis on 127.0.0.1:$REDIS_PORT"
else
  controller_args+=(--state-file "$LOGS/controller-state.json")
  store="the embedded store (no redis-server on the PATH; configuration in $LOGS/controller-state.json)"
fi

SLUICE_ADMIN_TOKENS="demo:admin:$ADMIN_TOKEN" SLUICE_CHECK_TOKENS="$CHECK_TOKEN" \
  target/release/sluice-controller "${controller_args[@]}" >"$LOGS/controller.log" 2>&1 &
pids+=($!)
target/release/sluice-demo-upstream 127.0.0.1:8080 >"$LOGS/upstream.log" 2>&1 &
pids+=($!)
wait_for controller http://127.0.0.1:8081/readyz

SLUICE_CHECK_TOKEN="$CHECK_TOKEN" "$ENVOY_BIN" -c envoy/demo.yaml --concurrency 2 --disable-hot-restart --log-level warn \
  >"$LOGS/envoy.log" 2>&1 &
pids+=($!)
wait_for envoy http://127.0.0.1:9901/ready

cat <<MSG

Sluice demo is up (counters and configuration in $store).
  Envoy      http://127.0.0.1:10000   (admin http://127.0.0.1:9901)
  controller http://127.0.0.1:8081    (check API: proxies only, check token in $CHECK_TOKEN_FILE)
  admin API  http://127.0.0.1:8082/v1/admin   token: $ADMIN_TOKEN
  dashboard  http://127.0.0.1:8082/dashboard  (sign in with the token above)
  upstream   http://127.0.0.1:8080
  logs       $LOGS/

Try it: 5 requests per 10 s per client pass, the 6th gets a 429:
  for i in \$(seq 6); do curl -s -i http://127.0.0.1:10000/hello | grep -iE '^(HTTP|x-ratelimit|retry-after)'; done

Change it while it runs, with the CLI:
  export SLUICE_ADMIN_TOKEN=$ADMIN_TOKEN
  target/release/sluice rules list
  target/release/sluice deny add ip 127.0.0.1 --expires-in 1m --reason demo

Ctrl-C stops everything.
MSG

# Stay in the foreground until Ctrl-C or until one of the parts dies.
wait -n "${pids[@]}"
echo "a part of the demo exited; see $LOGS/" >&2
exit 1
