#!/usr/bin/env bash
# The local stack without Docker: Apache Kafka (KRaft), a Schema Registry
# (Apicurio), PostgreSQL, the BigQuery emulator, and the object stores of the
# data-lake sink, S3 (moto) and GCS (fake-gcs-server), installed into a cache
# and started idempotently.
#
#   deploy/local/stack.sh up [kafka|registry|postgres|bigquery|s3|gcs ...]   install if needed, start, wait until healthy
#   deploy/local/stack.sh down [kafka|registry|postgres|bigquery|s3|gcs ...] stop what this script started
#   deploy/local/stack.sh status                             one line per service
#   deploy/local/stack.sh env                                export lines for the running stack
#   deploy/local/stack.sh kafka-home                         install Apache Kafka if needed and print its folder (tests' own brokers)
#   deploy/local/stack.sh lake-python                        install the lake Python (DuckDB, pyarrow) if needed and print it
#
# Installs are cached in $TICKPIPE_CACHE (default ~/.cache/tickpipe), shared by
# every checkout on the machine; runtime state (pids, logs, a private Postgres)
# lives in $TICKPIPE_STATE (default <repo>/.local). Both are outside version
# control. Everything listens on 127.0.0.1 only.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CACHE="${TICKPIPE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tickpipe}"
STATE="${TICKPIPE_STATE:-$ROOT/.local}"

KAFKA_VERSION=4.1.1
LOG4J_VERSION=2.24.3
KAFKA_PORT="${TICKPIPE_KAFKA_PORT:-9092}"
PG_SHARED_PORT="${TICKPIPE_PG_SHARED_PORT:-5432}"
PG_PRIVATE_PORT="${TICKPIPE_PG_PRIVATE_PORT:-55432}"
# Apicurio Registry 2.6 runs on Java 17 (3.x needs Java 21); its Confluent-compatible
# API is under /apis/ccompat/v7.
APICURIO_VERSION=2.6.13.Final
REGISTRY_PORT="${TICKPIPE_REGISTRY_PORT:-8081}"
BQ_VERSION=1.4.0
BQ_REST_PORT="${TICKPIPE_BQ_REST_PORT:-9050}"
BQ_GRPC_PORT="${TICKPIPE_BQ_GRPC_PORT:-9060}"
BQ_PROJECT="${TICKPIPE_BIGQUERY_PROJECT:-tickpipe-local}"
MOTO_VERSION=5.2.6
S3_PORT="${TICKPIPE_S3_PORT:-9000}"
FAKE_GCS_VERSION=1.56.1
GCS_PORT="${TICKPIPE_GCS_PORT:-4443}"
# The lake Python's DuckDB is the series bqemulator runs (see install_bqemulator).
LAKE_DUCKDB_VERSION=1.5
LAKE_PYARROW_VERSION=26.0.1

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

# Apache Kafka from Maven Central: the broker's jars (what the distribution's
# libs/ holds) resolved by Maven into the cache, a log4j 2 configuration, and
# nothing else. docker-compose.yml runs the same version (apache/kafka image).
kafka_home() { echo "$CACHE/kafka-$KAFKA_VERSION"; }

install_kafka() {
  local home; home=$(kafka_home)
  [[ -f $home/libs/kafka_2.13-$KAFKA_VERSION.jar && -f $home/log4j2.properties ]] && return 0
  command -v java >/dev/null || die "Java 17 or newer is needed to run Apache Kafka; install a JDK (Debian: openjdk-17-jre-headless)"
  command -v mvn >/dev/null || die "Maven is needed to fetch Apache Kafka from Maven Central; install it (Debian: maven)"
  say "installing Apache Kafka $KAFKA_VERSION from Maven Central into $home (first run only; log: $STATE/logs/kafka-install.log)"
  local tmp="$home.partial"
  rm -rf "$tmp" && mkdir -p "$tmp"
  cat >"$tmp/pom.xml" <<EOF
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>tickpipe.local</groupId>
  <artifactId>kafka-broker</artifactId>
  <version>$KAFKA_VERSION</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>$KAFKA_VERSION</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId><version>$LOG4J_VERSION</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId><version>$LOG4J_VERSION</version></dependency>
  </dependencies>
</project>
EOF
  if ! mvn -B -q -f "$tmp/pom.xml" dependency:copy-dependencies -DoutputDirectory="$tmp/libs" \
      >"$STATE/logs/kafka-install.log" 2>&1; then
    tail -20 "$STATE/logs/kafka-install.log" >&2
    die "fetching Apache Kafka from Maven Central failed; see $STATE/logs/kafka-install.log"
  fi
  cat >"$tmp/log4j2.properties" <<'EOF'
status = warn
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = info
rootLogger.appenderRef.out.ref = OUT
logger.state.name = state.change.logger
logger.state.level = warn
logger.request.name = kafka.request.logger
logger.request.level = warn
EOF
  rm -rf "$home"
  mv "$tmp" "$home"
}

# The java command line of a Kafka node or tool, in KAFKA_CMD.
kafka_cmd() {
  # shellcheck disable=SC2206 # the heap options are words on purpose
  KAFKA_CMD=(java ${TICKPIPE_KAFKA_HEAP:--Xms256m -Xmx1g} -XX:+UseG1GC -Djava.awt.headless=true
    "-Dlog4j2.configurationFile=$(kafka_home)/log4j2.properties" -cp "$(kafka_home)/libs/*")
}

# The one node of the local stack: broker and controller in one process (KRaft),
# its log under $STATE/kafka, kept across `down` and `up` like a real broker's.
kafka_config() {
  local dir=$1 cport=$((KAFKA_PORT + 1))
  mkdir -p "$dir/data"
  cat >"$dir/server.properties" <<EOF
process.roles=broker,controller
node.id=1
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
controller.quorum.voters=1@127.0.0.1:$cport
log.dirs=$dir/data
num.partitions=1
default.replication.factor=1
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# A group forms at once: nothing here waits for more members to arrive.
group.initial.rebalance.delay.ms=0
# Topics are created by the services, with their settings, never by a typo.
auto.create.topics.enable=false
# The log cleaner looks for work every second (default 15 s), so that a
# compacted topic with short segments compacts while a test watches.
log.cleaner.backoff.ms=1000
EOF
}

kafka_started() {
  pid_alive "$STATE/run/kafka.pid" \
    || { tail -30 "$STATE/logs/kafka.log" >&2; die "Apache Kafka exited; see $STATE/logs/kafka.log"; }
  port_open "$KAFKA_PORT" && grep -q 'Kafka Server started' "$STATE/logs/kafka.log"
}

kafka_up() {
  if pid_alive "$STATE/run/kafka.pid" && port_open "$KAFKA_PORT"; then
    say "kafka already running on 127.0.0.1:$KAFKA_PORT"; return 0
  fi
  if port_open "$KAFKA_PORT"; then
    say "kafka: using the broker already listening on 127.0.0.1:$KAFKA_PORT"; return 0
  fi
  if docker_engine; then
    say "kafka: starting Apache Kafka with docker compose"
    docker compose -f "$ROOT/docker-compose.yml" up -d --wait kafka || die "docker compose could not start kafka"
    return 0
  fi
  install_kafka
  kafka_cmd
  local dir="$STATE/kafka"
  kafka_config "$dir"
  if [[ ! -f $dir/data/meta.properties ]]; then
    local id; id=$("${KAFKA_CMD[@]}" kafka.tools.StorageTool random-uuid 2>/dev/null)
    "${KAFKA_CMD[@]}" kafka.tools.StorageTool format -t "$id" -c "$dir/server.properties" \
        >"$STATE/logs/kafka-format.log" 2>&1 \
      || { cat "$STATE/logs/kafka-format.log" >&2; die "formatting the Kafka storage in $dir/data failed"; }
  fi
  start_daemon kafka "${KAFKA_CMD[@]}" kafka.Kafka "$dir/server.properties"
  wait_for "kafka (Apache Kafka $KAFKA_VERSION) on 127.0.0.1:$KAFKA_PORT" 90 kafka_started \
    || { tail -30 "$STATE/logs/kafka.log" >&2; die "Apache Kafka did not start within 90 s; see $STATE/logs/kafka.log"; }
}

kafka_down() { stop_daemon kafka; }

# ---------------------------------------------------------------- Schema Registry

apicurio_home() { echo "$CACHE/apicurio-registry-$APICURIO_VERSION"; }
registry_url() { echo "http://127.0.0.1:$REGISTRY_PORT/apis/ccompat/v7"; }

install_apicurio() {
  local home; home=$(apicurio_home)
  [[ -f $home/apicurio-registry-app-$APICURIO_VERSION-runner.jar ]] && return 0
  command -v java >/dev/null || die "Java 17 or newer is needed to run Apicurio Registry"
  command -v mvn >/dev/null || die "Maven is needed to fetch Apicurio Registry from Maven Central; install it (Debian: maven)"
  say "installing Apicurio Registry $APICURIO_VERSION from Maven Central into $home (first run only)"
  local tmp="$home.partial"
  rm -rf "$tmp" && mkdir -p "$tmp"
  if ! mvn -B -q dependency:copy -Dartifact="io.apicurio:apicurio-registry-app:$APICURIO_VERSION:tar.gz:all"       -DoutputDirectory="$tmp" >"$STATE/logs/apicurio-install.log" 2>&1; then
    tail -20 "$STATE/logs/apicurio-install.log" >&2
    die "fetching Apicurio Registry from Maven Central failed; see $STATE/logs/apicurio-install.log"
  fi
  tar xzf "$tmp/apicurio-registry-app-$APICURIO_VERSION-all.tar.gz" -C "$tmp" \
    && rm "$tmp/apicurio-registry-app-$APICURIO_VERSION-all.tar.gz" \
    || die "unpacking Apicurio Registry failed"
  rm -rf "$home"
  mv "$tmp" "$home"
}

registry_ready() { curl -fsS -o /dev/null "$(registry_url)/subjects" 2>/dev/null; }

registry_up() {
  if pid_alive "$STATE/run/registry.pid" && registry_ready; then
    say "schema registry already running on $(registry_url)"; return 0
  fi
  if registry_ready; then say "schema registry: using the one already on $(registry_url)"; return 0; fi
  install_apicurio
  # In-memory storage: schemas live as long as the process (the services
  # register theirs again at start).
  start_daemon registry java ${TICKPIPE_REGISTRY_HEAP:--Xms64m -Xmx512m} \
    -Dquarkus.http.host=127.0.0.1 -Dquarkus.http.port="$REGISTRY_PORT" \
    -jar "$(apicurio_home)/apicurio-registry-app-$APICURIO_VERSION-runner.jar"
  wait_for "schema registry (Apicurio $APICURIO_VERSION) on $(registry_url)" 90 registry_ready \
    || { tail -20 "$STATE/logs/registry.log" >&2; die "Apicurio Registry did not start; see $STATE/logs/registry.log"; }
}

registry_down() { stop_daemon registry; }

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

# ---------------------------------------------------------------- S3 (moto)

# moto's server from PyPI (Apache-2.0; MinIO is AGPL): S3 in memory, for as long
# as the process lives, path-style (http://127.0.0.1:9000/<bucket>/<key>).
# It takes any access key and secret (it checks no signature) and any region,
# but wants requests signed: unsigned reads of an object are refused (403).
moto_venv() { echo "$CACHE/moto-$MOTO_VERSION"; }
s3_url() { echo "http://127.0.0.1:$S3_PORT"; }

install_moto() {
  local venv; venv=$(moto_venv)
  [[ -x $venv/bin/moto_server ]] && return 0
  say "installing moto $MOTO_VERSION into $venv (first run only)"
  rm -rf "$venv.partial"
  python3 -m venv "$venv.partial" || die "python3 -m venv failed; install python3-venv"
  "$venv.partial/bin/pip" install -q "moto[server]==$MOTO_VERSION" >"$STATE/logs/moto-install.log" 2>&1 \
    || die "pip install moto failed; see $STATE/logs/moto-install.log"
  rm -rf "$venv"
  mv "$venv.partial" "$venv"
  # A venv is not relocatable: rewrite the paths baked into its scripts.
  grep -rl "$venv.partial" "$venv/bin" | xargs -r sed -i "s#$venv.partial#$venv#g"
}

# S3's ListBuckets, which moto answers without a signature.
s3_ready() { curl -fsS -o /dev/null "$(s3_url)/" 2>/dev/null; }

s3_up() {
  install_lake_python
  if pid_alive "$STATE/run/moto.pid" && s3_ready; then
    say "s3 (moto) already running on $(s3_url)"; return 0
  fi
  if s3_ready; then say "s3: using the server already on $(s3_url)"; return 0; fi
  install_moto
  start_daemon moto "$(moto_venv)/bin/moto_server" -H 127.0.0.1 -p "$S3_PORT"
  wait_for "s3 (moto $MOTO_VERSION) on $(s3_url)" 60 s3_ready \
    || { tail -20 "$STATE/logs/moto.log" >&2; die "moto did not start; see $STATE/logs/moto.log"; }
}

s3_down() { stop_daemon moto; }

# ---------------------------------------------------------------- GCS (fake-gcs-server)

# fake-gcs-server (BSD-2-Clause), built once from the Go module proxy (its go.mod
# wants Go 1.26; an older go fetches that toolchain). It serves the JSON API
# (/storage/v1, uploads under /upload/storage/v1, ifGenerationMatch honored) and,
# of the XML API, GET, HEAD, DELETE and the list of /<bucket>[/<object>] when the
# Host header is -public-host; not the XML API's plain PUT (400 "invalid
# uploadType", fsouza/fake-gcs-server#331), which is how object_store uploads.
# Buckets are created (POST /storage/v1/b) before any upload. Objects in memory,
# for as long as the process lives; no token is checked.
fake_gcs_home() { echo "$CACHE/fake-gcs-server-$FAKE_GCS_VERSION"; }
gcs_url() { echo "http://127.0.0.1:$GCS_PORT"; }

install_fake_gcs() {
  local home; home=$(fake_gcs_home)
  [[ -x $home/fake-gcs-server ]] && return 0
  command -v go >/dev/null || die "Go is needed to build fake-gcs-server from the Go module proxy; install a Go toolchain"
  say "building fake-gcs-server $FAKE_GCS_VERSION into $home (first run only; log: $STATE/logs/fake-gcs-install.log)"
  local tmp="$home.partial"
  rm -rf "$tmp" && mkdir -p "$tmp"
  if ! GOBIN="$tmp" go install "github.com/fsouza/fake-gcs-server@v$FAKE_GCS_VERSION" \
      >"$STATE/logs/fake-gcs-install.log" 2>&1; then
    tail -20 "$STATE/logs/fake-gcs-install.log" >&2
    die "building fake-gcs-server failed; see $STATE/logs/fake-gcs-install.log"
  fi
  rm -rf "$home"
  mv "$tmp" "$home"
}

gcs_ready() { curl -fsS -o /dev/null "$(gcs_url)/storage/v1/b" 2>/dev/null; }

gcs_up() {
  install_lake_python
  if pid_alive "$STATE/run/fake-gcs.pid" && gcs_ready; then
    say "gcs (fake-gcs-server) already running on $(gcs_url)"; return 0
  fi
  if gcs_ready; then say "gcs: using the server already on $(gcs_url)"; return 0; fi
  install_fake_gcs
  start_daemon fake-gcs "$(fake_gcs_home)/fake-gcs-server" -scheme http -host 127.0.0.1 -port "$GCS_PORT" \
    -backend memory -public-host "127.0.0.1:$GCS_PORT" -external-url "$(gcs_url)" -log-level warn
  wait_for "gcs (fake-gcs-server $FAKE_GCS_VERSION) on $(gcs_url)" 60 gcs_ready \
    || { tail -20 "$STATE/logs/fake-gcs.log" >&2; die "fake-gcs-server did not start; see $STATE/logs/fake-gcs.log"; }
}

gcs_down() { stop_daemon fake-gcs; }

# ---------------------------------------------------------------- lake Python

# A Python with DuckDB and pyarrow, with which the data-lake sink's tests read
# back the Parquet files it wrote. Not a service: `up s3` and `up gcs` install
# it (the slow part, once), so `env`, which prints it, finds it in place; `env`
# and `lake-python` install it too where it is still missing, saying so on stderr.
lake_venv() { echo "$CACHE/lake-py-$LAKE_DUCKDB_VERSION-$LAKE_PYARROW_VERSION"; }
lake_python() { echo "$(lake_venv)/bin/python"; }

install_lake_python() {
  local venv; venv=$(lake_venv)
  [[ -x $venv/bin/python ]] && return 0
  say "installing duckdb $LAKE_DUCKDB_VERSION and pyarrow $LAKE_PYARROW_VERSION into $venv (first run only)"
  rm -rf "$venv.partial"
  python3 -m venv "$venv.partial" || die "python3 -m venv failed; install python3-venv"
  "$venv.partial/bin/pip" install -q "duckdb==$LAKE_DUCKDB_VERSION.*" "pyarrow==$LAKE_PYARROW_VERSION" \
      >"$STATE/logs/lake-python-install.log" 2>&1 \
    || die "pip install duckdb pyarrow failed; see $STATE/logs/lake-python-install.log"
  rm -rf "$venv"
  mv "$venv.partial" "$venv"
  # A venv is not relocatable: rewrite the paths baked into its scripts.
  grep -rl "$venv.partial" "$venv/bin" | xargs -r sed -i "s#$venv.partial#$venv#g"
}

# ---------------------------------------------------------------- commands

# gcs is not started by default: no test uses it yet (object_store uploads with
# the XML API's PUT, which fake-gcs-server does not serve).
services() { if (($#)); then echo "$@"; else echo kafka registry postgres bigquery s3; fi; }

cmd=${1:-}; shift || true
case $cmd in
  up)   for s in $(services "$@"); do "${s}_up"; done ;;
  down) for s in $(services "$@"); do "${s}_down"; done ;;
  status)
    port_open "$KAFKA_PORT" && echo "kafka     up   127.0.0.1:$KAFKA_PORT" || echo "kafka     down"
    registry_ready && echo "registry  up   $(registry_url)" || echo "registry  down"
    url=$(postgres_url); port=${url##*:}; port=${port%%/*}
    pg_ready "$port" && echo "postgres  up   $url" || echo "postgres  down"
    bq_ready && echo "bigquery  up   http://127.0.0.1:$BQ_REST_PORT (grpc $BQ_GRPC_PORT)" || echo "bigquery  down"
    s3_ready && echo "s3        up   $(s3_url)" || echo "s3        down"
    gcs_ready && echo "gcs       up   $(gcs_url)" || echo "gcs       down" ;;
  env)
    # A no-op after `up` (see install_lake_python); first, so that a failed
    # install prints no export line.
    install_lake_python
    echo "export TICKPIPE_KAFKA_BROKERS=127.0.0.1:$KAFKA_PORT"
    echo "export TICKPIPE_POSTGRES_URL=$(postgres_url)"
    # Not TICKPIPE_SCHEMA_REGISTRY_URL: that would switch every service a test
    # starts to the Confluent framing. Tests that want the registry ask for it.
    echo "export TICKPIPE_TEST_REGISTRY_URL=$(registry_url)"
    echo "export TICKPIPE_BIGQUERY_REST=http://127.0.0.1:$BQ_REST_PORT"
    echo "export TICKPIPE_BIGQUERY_GRPC=127.0.0.1:$BQ_GRPC_PORT"
    echo "export TICKPIPE_BIGQUERY_PROJECT=$BQ_PROJECT"
    # Path-style; moto takes any access key and secret, fake-gcs-server no token.
    echo "export TICKPIPE_S3_ENDPOINT=$(s3_url)"
    echo "export TICKPIPE_GCS_ENDPOINT=$(gcs_url)"
    # The data-lake sink's tests read the Parquet files back with it.
    echo "export TICKPIPE_LAKE_PYTHON=$(lake_python)"
    # Tests that start brokers of their own (behind a TLS proxy, a three-node
    # cluster) run these jars.
    echo "export TICKPIPE_KAFKA_HOME=$(kafka_home)" ;;
  # Tests that start brokers of their own need the jars even where Docker runs
  # the shared one.
  kafka-home) install_kafka; kafka_home ;;
  lake-python) install_lake_python; lake_python ;;
  *) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
