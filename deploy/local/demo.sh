#!/usr/bin/env bash
# The whole pipeline on this machine, no Docker: the local stack, then the
# producer, the candles aggregator and the three sinks in the background.
#
#   deploy/local/demo.sh up [producer|consumers|prometheus ...]  start (all when none named)
#   deploy/local/demo.sh watch [seconds]              print progress every 5 s (default 60 s)
#   deploy/local/demo.sh down                         stop what `up` started (the stack stays)
#   deploy/local/demo.sh status                       one line per service
#   deploy/local/demo.sh prometheus-config <dir>      write the demo's Prometheus configuration
#
# Prometheus (Debian's package) scrapes the five services on 127.0.0.1:9090
# with the alert rules of deploy/prometheus; Grafana comes with docker compose.
# The services use the stack's addresses (deploy/local/stack.sh env), a database
# `tickpipe` on its PostgreSQL, a dataset `tickpipe` in the BigQuery emulator
# and the lake in <repo>/.local/lake (files rolled over every 30 s).
# Environment variables the services read (README) pass through, e.g.
# TICKPIPE_PRODUCER_SOURCES=simulator to skip the probe of Binance.
# Pids and logs: $TICKPIPE_STATE/demo (default <repo>/.local/demo).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
STATE="${TICKPIPE_STATE:-$ROOT/.local}/demo"
STACK="$ROOT/deploy/local/stack.sh"
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release"
DATABASE="${TICKPIPE_DEMO_DATABASE:-tickpipe}"
PROMETHEUS_PORT="${TICKPIPE_DEMO_PROMETHEUS_PORT:-9090}"
mkdir -p "$STATE"

say() { printf '[demo] %s\n' "$*" >&2; }
die() { printf '[demo] error: %s\n' "$*" >&2; exit 1; }
pid_alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# The stack's addresses, with the demo's database in the Postgres URL.
stack_env() {
  eval "$("$STACK" env)"
  ADMIN_URL=$TICKPIPE_POSTGRES_URL
  export TICKPIPE_POSTGRES_URL="${TICKPIPE_POSTGRES_URL%/*}/$DATABASE"
  export TICKPIPE_BIGQUERY_EMULATOR="${TICKPIPE_BIGQUERY_EMULATOR:-$TICKPIPE_BIGQUERY_REST}"
  export TICKPIPE_BIGQUERY_DATASET="${TICKPIPE_BIGQUERY_DATASET:-tickpipe}"
  export TICKPIPE_LAKE_SINK_TARGET="${TICKPIPE_LAKE_SINK_TARGET:-$ROOT/.local/lake}"
  export TICKPIPE_LAKE_SINK_FILE_MAX_SECS="${TICKPIPE_LAKE_SINK_FILE_MAX_SECS:-30}"
}

start() {
  local name=$1; shift
  if pid_alive "$STATE/$name.pid"; then say "$name already running (pid $(cat "$STATE/$name.pid"))"; return 0; fi
  nohup setsid "$BIN/$@" >"$STATE/$name.log" 2>&1 </dev/null &
  echo $! >"$STATE/$name.pid"
  say "$name started (log: $STATE/$name.log)"
}

# prometheus_config <dir>: deploy/prometheus/prometheus.yml as the demo runs
# it: the same jobs and ports on 127.0.0.1, less the backfill the demo does not
# run, and the same alert rules.
prometheus_config() {
  local dir=$1
  mkdir -p "$dir"
  cp "$ROOT/deploy/prometheus/alerts.yml" "$dir/alerts.yml"
  cat >"$dir/prometheus.yml" <<EOF
# Written by deploy/local/demo.sh from deploy/prometheus/prometheus.yml.
global:
  scrape_interval: 5s
  evaluation_interval: 15s

rule_files:
  - alerts.yml

scrape_configs:
  - job_name: prometheus
    static_configs:
      - targets: ["127.0.0.1:$PROMETHEUS_PORT"]
  - job_name: producer
    static_configs:
      - targets: ["127.0.0.1:9101"]
  - job_name: candles
    static_configs:
      - targets: ["127.0.0.1:9103"]
  - job_name: postgres-sink
    static_configs:
      - targets: ["127.0.0.1:9104"]
  - job_name: bigquery-sink
    static_configs:
      - targets: ["127.0.0.1:9105"]
  - job_name: lake-sink
    static_configs:
      - targets: ["127.0.0.1:9107"]
EOF
}

start_prometheus() {
  if pid_alive "$STATE/prometheus.pid"; then say "prometheus already running (pid $(cat "$STATE/prometheus.pid"))"; return 0; fi
  if (exec 3<>"/dev/tcp/127.0.0.1/$PROMETHEUS_PORT") 2>/dev/null; then
    say "prometheus: something already listens on 127.0.0.1:$PROMETHEUS_PORT; not starting another"; return 0
  fi
  local bin; bin=$("$ROOT/deploy/local/prometheus.sh")
  prometheus_config "$STATE/prometheus"
  nohup setsid "$bin/prometheus" --config.file="$STATE/prometheus/prometheus.yml" \
    --storage.tsdb.path="$STATE/prometheus/data" --storage.tsdb.retention.time=7d \
    --web.listen-address="127.0.0.1:$PROMETHEUS_PORT" >"$STATE/prometheus.log" 2>&1 </dev/null &
  echo $! >"$STATE/prometheus.pid"
  local deadline=$((SECONDS + 60))
  until curl -fsS -o /dev/null "http://127.0.0.1:$PROMETHEUS_PORT/-/ready" 2>/dev/null; do
    if ! pid_alive "$STATE/prometheus.pid"; then tail -5 "$STATE/prometheus.log" >&2; die "prometheus exited; see $STATE/prometheus.log"; fi
    ((SECONDS < deadline)) || die "prometheus did not answer within 60 s; see $STATE/prometheus.log"
    sleep 0.2
  done
  say "prometheus on http://127.0.0.1:$PROMETHEUS_PORT (log: $STATE/prometheus.log)"
}

# Waits until a service answers /healthz, or says why not from its log.
healthy() {
  local name=$1 port=$2 deadline=$((SECONDS + 60))
  until curl -fsS -o /dev/null "http://127.0.0.1:$port/healthz" 2>/dev/null; do
    if ! pid_alive "$STATE/$name.pid"; then tail -5 "$STATE/$name.log" >&2; die "$name exited; see $STATE/$name.log"; fi
    ((SECONDS < deadline)) || die "$name did not answer on 127.0.0.1:$port within 60 s; see $STATE/$name.log"
    sleep 0.2
  done
}

up() {
  "$STACK" up
  stack_env
  say "building the release binaries (the first build takes a few minutes)"
  (cd "$ROOT" && cargo build --release --locked --bins -q)
  psql -q "$ADMIN_URL" -tc "SELECT 1 FROM pg_database WHERE datname = '$DATABASE'" | grep -q 1 \
    || psql -q "$ADMIN_URL" -c "CREATE DATABASE $DATABASE" >/dev/null
  local parts=("$@"); ((${#parts[@]})) || parts=(producer consumers prometheus)
  for part in "${parts[@]}"; do
    case $part in
      producer)
        start producer producer run
        healthy producer 9101 ;;
      consumers)
        start candles candles
        start postgres-sink postgres-sink
        start bigquery-sink bigquery-sink
        start lake-sink lake-sink
        healthy candles 9103; healthy postgres-sink 9104; healthy bigquery-sink 9105; healthy lake-sink 9107 ;;
      prometheus) start_prometheus ;;
      *) die "unknown part $part (producer, consumers or prometheus)" ;;
    esac
  done
}

metric() { # metric <port> <name>: the sum of a metric's samples, 0 if absent
  curl -fsS "http://127.0.0.1:$1/metrics" 2>/dev/null \
    | awk -v m="$2" '$1 == m || index($1, m "{") == 1 { s += $2 } END { printf "%d", s }'
}

rows() { psql -qtA "$TICKPIPE_POSTGRES_URL" -c "SELECT count(*) FROM $1" 2>/dev/null || echo 0; }

bq_rows() {
  curl -fsS -X POST "$TICKPIPE_BIGQUERY_REST/bigquery/v2/projects/$TICKPIPE_BIGQUERY_PROJECT/queries" \
    -H 'content-type: application/json' \
    -d "{\"query\": \"SELECT COUNT(*) FROM $TICKPIPE_BIGQUERY_DATASET.$1\", \"useLegacySql\": false}" 2>/dev/null \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["rows"][0]["f"][0]["v"])' 2>/dev/null || echo 0
}

watch() {
  stack_env
  local until=$((SECONDS + ${1:-60}))
  printf '%8s %12s %10s %10s %10s %10s %10s %12s\n' time published pg-trades pg-candles pg-assets bq-trades lake-rows dead-letters
  while :; do
    printf '%7ss %12s %10s %10s %10s %10s %10s %12s\n' "$SECONDS" \
      "$(metric 9101 tickpipe_producer_records_published_total)" \
      "$(rows trades)" "$(rows candles)" "$(rows assets)" "$(bq_rows trades)" \
      "$(metric 9107 tickpipe_lake_sink_rows_written_total)" "$(rows dead_letters)"
    ((SECONDS < until)) || break
    sleep 5
  done
  say "still running; query Postgres with: psql $TICKPIPE_POSTGRES_URL"
  say "the lake's files: $TICKPIPE_LAKE_SINK_TARGET/raw/<entity>/venue=<venue>/date=<day>/"
  say "stop with: make demo-stop"
}

down() {
  for name in prometheus lake-sink bigquery-sink postgres-sink candles producer; do
    local pidf="$STATE/$name.pid"
    if pid_alive "$pidf"; then
      kill -TERM "$(cat "$pidf")"
      local deadline=$((SECONDS + 30))
      while pid_alive "$pidf" && ((SECONDS < deadline)); do sleep 0.2; done
      pid_alive "$pidf" && kill -9 "$(cat "$pidf")" 2>/dev/null || true
      say "$name stopped"
    fi
    rm -f "$pidf"
  done
}

status() {
  for name in producer candles postgres-sink bigquery-sink lake-sink prometheus; do
    if pid_alive "$STATE/$name.pid"; then echo "$name up (pid $(cat "$STATE/$name.pid"))"; else echo "$name down"; fi
  done
}

cmd=${1:-}; shift || true
case $cmd in
  up) up "$@" ;;
  watch) watch "$@" ;;
  down) down ;;
  status) status ;;
  prometheus-config) (($#)) || die "prometheus-config <dir>"; prometheus_config "$1" ;;
  *) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
