#!/usr/bin/env bash
# Creates (once) the Python virtualenv with the third-party Kafka/Avro clients the
# interoperability tests run against, and prints its interpreter's path.
#
# Pinned: confluent-kafka (its Schema Registry client and AvroSerializer /
# AvroDeserializer), fastavro, and psycopg and pyarrow for the Python sink
# baselines of `make bench`. Cached in $TICKPIPE_CACHE.
set -euo pipefail

CACHE="${TICKPIPE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tickpipe}"
CONFLUENT_KAFKA_VERSION=2.12.0
FASTAVRO_VERSION=1.13.1
PSYCOPG_VERSION=3.3.9
PYARROW_VERSION=26.0.1
VENV="$CACHE/interop-ck$CONFLUENT_KAFKA_VERSION-fa$FASTAVRO_VERSION-pg$PSYCOPG_VERSION-pa$PYARROW_VERSION"

if [[ ! -x $VENV/bin/python ]] || ! "$VENV/bin/python" -c 'import confluent_kafka.schema_registry.avro, fastavro, psycopg, pyarrow' 2>/dev/null; then
  echo "[python-env] installing confluent-kafka $CONFLUENT_KAFKA_VERSION, fastavro $FASTAVRO_VERSION, psycopg $PSYCOPG_VERSION and pyarrow $PYARROW_VERSION into $VENV" >&2
  mkdir -p "$CACHE"
  rm -rf "$VENV"
  python3 -m venv "$VENV" >&2
  "$VENV/bin/pip" install -q "confluent-kafka[avro]==$CONFLUENT_KAFKA_VERSION" "fastavro==$FASTAVRO_VERSION" \
    "psycopg[binary]==$PSYCOPG_VERSION" "pyarrow==$PYARROW_VERSION" >&2
fi
echo "$VENV/bin/python"
