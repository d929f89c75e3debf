#!/usr/bin/env bash
# The local stack without Docker: a Kafka-protocol broker, PostgreSQL and the
# BigQuery emulator, installed into a cache and started idempotently.
#
#   deploy/local/stack.sh up [kafka|postgres|bigquery ...]   install if needed, start, wait until healthy
#   deploy/local/stack.sh down [kafka|postgres|bigquery ...] stop what this script started
#   deploy/local/stack.sh status                             one line per service
#   deploy/local/stack.sh env                                export lines for the running stack
#   deploy/local/stack.sh tansu-bin                          install tansu if needed (also where Docker runs Kafka) and print its path
#
# Installs are cached in $TICKPIPE_CACHE (default ~/.cache/tickpipe), shared by
# every checkout on the machine; runtime state (pids, logs, a private Postgres)
# lives in $TICKPIPE_STATE (default <repo>/.local). Both are outside version
# control. Everything listens on 127.0.0.1 only.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CACHE="${TICKPIPE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tickpipe}"
STATE="${TICKPIPE_STATE:-$ROOT/.local}"

TANSU_VERSION=0.6.0
KAFKA_PORT="${TICKPIPE_KAFKA_PORT:-9092}"
PG_SHARED_PORT="${TICKPIPE_PG_SHARED_PORT:-5432}"
PG_PRIVATE_PORT="${TICKPIPE_PG_PRIVATE_PORT:-55432}"
BQ_VERSION=1.4.0
BQ_REST_PORT="${TICKPIPE_BQ_REST_PORT:-9050}"
BQ_GRPC_PORT="${TICKPIPE_BQ_GRPC_PORT:-9060}"
BQ_PROJECT="${TICKPIPE_BIGQUERY_PROJECT:-tickpipe-local}"

mkdir -p "$CACHE" "$STATE/logs" "$STATE/run"

say() { printf '[stack] %s\n' "$*" >&2; }
die() { printf '[stack] error: %s\n' "$*" >&2; exit 1; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# wait_for <what> <seconds> <command...>: polls the command until it succeeds.
wait_for() {
  local what=$1 secs=$2; shift 2
  local deadline=$((SECONDS + secs))
  until "$@"; do
    if ((SECONDS >= deadline)); then return 1; fi
    sleep 0.2
  done
  say "$what is ready"
}

pid_alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# start_daemon <name> <command...>: runs a command in the background, detached
# from this shell, with its pid and log under $STATE.
start_daemon() {
  local name=$1; shift
  nohup setsid "$@" >"$STATE/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$STATE/run/$name.pid"
}

stop_daemon() {
  local name=$1 pidf="$STATE/run/$1.pid"
  if pid_alive "$pidf"; then
    kill "$(cat "$pidf")" 2>/dev/null || true
    local deadline=$((SECONDS + 15))
    while pid_alive "$pidf" && ((SECONDS < deadline)); do sleep 0.2; done
    pid_alive "$pidf" && kill -9 "$(cat "$pidf")" 2>/dev/null || true
    say "$name stopped"
  fi
  rm -f "$pidf"
}

docker_engine() { command -v docker >/dev/null && docker info >/dev/null 2>&1; }

# ---------------------------------------------------------------- Kafka

tansu_bin() { echo "$CACHE/tansu-$TANSU_VERSION/bin/tansu"; }

install_tansu() {
  local bin; bin=$(tansu_bin)
  [[ -x $bin ]] && return 0
  command -v cargo >/dev/null || die "cargo is needed to build the tansu broker; install Rust from https://rustup.rs"
  say "building tansu $TANSU_VERSION into $CACHE (first run only, about 9 minutes on 2 cores; log: $STATE/logs/tansu-build.log)"
  local tmp="$CACHE/tansu-$TANSU_VERSION.partial"
  rm -rf "$tmp"
  if ! cargo install --locked tansu --version "$TANSU_VERSION" --features dynostore --root "$tmp" \
      >"$STATE/logs/tansu-build.log" 2>&1; then
    tail -20 "$STATE/logs/tansu-build.log" >&2
    die "building tansu failed; see $STATE/logs/tansu-build.log"
  fi
  rm -rf "$CACHE/tansu-$TANSU_VERSION"
  mv "$tmp" "$CACHE/tansu-$TANSU_VERSION"
}

kafka_up() {
  if pid_alive "$STATE/run/tansu.pid" && port_open "$KAFKA_PORT"; then
    say "kafka (tansu) already running on 127.0.0.1:$KAFKA_PORT"; return 0
  fi
  if port_open "$KAFKA_PORT"; then
    say "kafka: using the broker already listening on 127.0.0.1:$KAFKA_PORT"; return 0
  fi
  if docker_engine; then
    say "kafka: starting Apache Kafka with docker compose"
    docker compose -f "$ROOT/docker-compose.yml" up -d --wait kafka || die "docker compose could not start kafka"
    return 0
  fi
  install_tansu
  start_daemon tansu "$(tansu_bin)" broker \
    --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --storage-engine "memory://tansu/"
  wait_for "kafka (tansu) on 127.0.0.1:$KAFKA_PORT" 30 port_open "$KAFKA_PORT" \
    || { tail -20 "$STATE/logs/tansu.log" >&2; die "tansu did not start; see $STATE/logs/tansu.log"; }
}

kafka_down() { stop_daemon tansu; }

# ---------------------------------------------------------------- PostgreSQL

pg_bindir() {
  if command -v initdb >/dev/null && command -v pg_ctl >/dev/null; then dirname "$(command -v pg_ctl)"; return; fi
  local d; d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
  [[ -n $d ]] && { echo "$d"; return; }
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    say "installing PostgreSQL from Debian"
    apt-get install -y -q postgresql >"$STATE/logs/apt-postgresql.log" 2>&1 \
      || die "apt-get install postgresql failed; see $STATE/logs/apt-postgresql.log"
    ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1; return
  fi
  die "no PostgreSQL server binaries found; install Debian's postgresql package"
}

pg_ready() { pg_isready -q -h 127.0.0.1 -p "$1" 2>/dev/null || port_open "$1"; }

# Runs a PostgreSQL server binary as an unprivileged user (initdb refuses root).
as_pg_user() {
  if [[ $(id -u) == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

postgres_url() {
  if [[ -f $STATE/run/postgres.url ]]; then cat "$STATE/run/postgres.url"; else
    echo "postgres://postgres@127.0.0.1:$PG_SHARED_PORT/postgres"; fi
}

postgres_up() {
  local data="$STATE/postgres"
  if [[ -f $STATE/run/postgres.url ]] && pg_ready "$PG_PRIVATE_PORT"; then
    say "postgres (private) already running on 127.0.0.1:$PG_PRIVATE_PORT"; return 0
  fi
  if pg_ready "$PG_SHARED_PORT"; then
    rm -f "$STATE/run/postgres.url"
    say "postgres: using the server on 127.0.0.1:$PG_SHARED_PORT"; return 0
  fi
  local bin; bin=$(pg_bindir)
  if [[ ! -f $data/PG_VERSION ]]; then
    say "postgres: creating a private cluster in $data"
    mkdir -p "$data"
    [[ $(id -u) == 0 ]] && chown postgres "$data"
    as_pg_user "$bin/initdb" -D "$data" -U postgres -A trust -E UTF8 >"$STATE/logs/initdb.log" 2>&1 \
      || die "initdb failed; see $STATE/logs/initdb.log"
  fi
  [[ $(id -u) == 0 ]] && touch "$STATE/logs/postgres.log" && chown postgres "$STATE/logs/postgres.log"
  as_pg_user "$bin/pg_ctl" -D "$data" -l "$STATE/logs/postgres.log" -w -t 30 \
    -o "-p $PG_PRIVATE_PORT -c listen_addresses=127.0.0.1 -k $data" start >/dev/null \
    || { tail -20 "$STATE/logs/postgres.log" >&2; die "the private PostgreSQL did not start"; }
  echo "postgres://postgres@127.0.0.1:$PG_PRIVATE_PORT/postgres" >"$STATE/run/postgres.url"
  say "postgres (private) is ready on 127.0.0.1:$PG_PRIVATE_PORT"
}

postgres_down() {
  local data="$STATE/postgres"
  if [[ -f $data/postmaster.pid ]]; then
    as_pg_user "$(pg_bindir)/pg_ctl" -D "$data" -m fast -w stop >/dev/null 2>&1 || true
    say "postgres (private) stopped"
  fi
  rm -f "$STATE/run/postgres.url"
}

# ---------------------------------------------------------------- BigQuery emulator

bq_venv() { echo "$CACHE/bqemulator-$BQ_VERSION"; }

install_bqemulator() {
  local venv; venv=$(bq_venv)
  if [[ ! -x $venv/bin/bqemulator ]]; then
    say "installing bqemulator $BQ_VERSION into $venv (first run only)"
    rm -rf "$venv.partial"
    python3 -m venv "$venv.partial" || die "python3 -m venv failed; install python3-venv"
    # duckdb is pinned to 1.5 because its spatial extension then comes from PyPI;
    # 2.x would download it from the internet at start.
    "$venv.partial/bin/pip" install -q "bqemulator==$BQ_VERSION" "duckdb==1.5.*" \
        "duckdb-extension-spatial==1.5.*" numpy >"$STATE/logs/bqemulator-install.log" 2>&1 \
      || die "pip install bqemulator failed; see $STATE/logs/bqemulator-install.log"
    rm -rf "$venv"
    mv "$venv.partial" "$venv"
    # A venv is not relocatable: rewrite the paths baked into its scripts.
    grep -rl "$venv.partial" "$venv/bin" | xargs -r sed -i "s#$venv.partial#$venv#g"
  fi
  # DuckDB looks for extensions under ~/.duckdb/extensions/<version>/<platform>.
  local ext; ext=$(find "$venv" -path '*duckdb_extension_spatial/extensions/*/spatial.duckdb_extension' | head -1)
  [[ -n $ext ]] || die "the spatial extension is missing from $venv"
  local ver; ver=$(basename "$(dirname "$ext")")
  local dest="$HOME/.duckdb/extensions/$ver/linux_amd64"
  if [[ ! -f $dest/spatial.duckdb_extension ]]; then
    mkdir -p "$dest" && cp "$ext" "$dest/"
  fi
}

bq_ready() { curl -fsS -o /dev/null "http://127.0.0.1:$BQ_REST_PORT/bigquery/v2/projects/$BQ_PROJECT/datasets" 2>/dev/null; }

bigquery_up() {
  if pid_alive "$STATE/run/bqemulator.pid" && bq_ready; then
    say "bigquery emulator already running on 127.0.0.1:$BQ_REST_PORT"; return 0
  fi
  if bq_ready; then say "bigquery: using the emulator already on 127.0.0.1:$BQ_REST_PORT"; return 0; fi
  install_bqemulator
  # The emulator copies a table into a time-travel snapshot after every
  # insertAll and keeps the copies 7 days by default: memory grows with the
  # square of a streamed table (0.6 GB per run of the BigQuery sink tests,
  # more in a long demo).
  # Retention 0 lets its collector (every minute) drop them; nothing here
  # queries FOR SYSTEM_TIME AS OF.
  BQEMU_TIME_TRAVEL_RETENTION_DAYS=0 start_daemon bqemulator "$(bq_venv)/bin/bqemulator" start --project "$BQ_PROJECT" \
    --rest-host 127.0.0.1 --rest-port "$BQ_REST_PORT" --grpc-host 127.0.0.1 --grpc-port "$BQ_GRPC_PORT" \
    --log-level warning
  wait_for "bigquery emulator on 127.0.0.1:$BQ_REST_PORT" 60 bq_ready \
    || { tail -20 "$STATE/logs/bqemulator.log" >&2; die "bqemulator did not start; see $STATE/logs/bqemulator.log"; }
}

bigquery_down() { stop_daemon bqemulator; }

# ---------------------------------------------------------------- commands

services() { if (($#)); then echo "$@"; else echo kafka postgres bigquery; fi; }

cmd=${1:-}; shift || true
case $cmd in
  up)   for s in $(services "$@"); do "${s}_up"; done ;;
  down) for s in $(services "$@"); do "${s}_down"; done ;;
  status)
    port_open "$KAFKA_PORT" && echo "kafka     up   127.0.0.1:$KAFKA_PORT" || echo "kafka     down"
    url=$(postgres_url); port=${url##*:}; port=${port%%/*}
    pg_ready "$port" && echo "postgres  up   $url" || echo "postgres  down"
    bq_ready && echo "bigquery  up   http://127.0.0.1:$BQ_REST_PORT (grpc $BQ_GRPC_PORT)" || echo "bigquery  down" ;;
  env)
    echo "export TICKPIPE_KAFKA_BROKERS=127.0.0.1:$KAFKA_PORT"
    echo "export TICKPIPE_POSTGRES_URL=$(postgres_url)"
    echo "export TICKPIPE_BIGQUERY_REST=http://127.0.0.1:$BQ_REST_PORT"
    echo "export TICKPIPE_BIGQUERY_GRPC=127.0.0.1:$BQ_GRPC_PORT"
    echo "export TICKPIPE_BIGQUERY_PROJECT=$BQ_PROJECT"
    # Tests that need a broker of their own (behind a TLS proxy) start this one.
    echo "export TICKPIPE_TANSU_BIN=$(tansu_bin)" ;;
  # Tests that start a broker of their own need tansu even where Docker runs
  # the shared one.
  tansu-bin) install_tansu; tansu_bin ;;
  *) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
