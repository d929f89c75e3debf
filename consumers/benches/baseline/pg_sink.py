"""The baseline of `make bench` for postgres-sink: a Kafka-to-Postgres consumer
written the way such pipelines usually are (confluent-kafka + fastavro +
psycopg `executemany`, one commit per poll batch, offsets committed to Kafka
after the database commit).

Usage: pg_sink.py BROKERS TOPIC GROUP POSTGRES_URL SCHEMA_JSON COUNT
Prints the rows/s it reached on COUNT records (the clock starts at the first
record)."""

import io
import json
import sys
import time

import fastavro
import psycopg
from confluent_kafka import Consumer

brokers, topic, group, url, schema_json, count = sys.argv[1:7]
count = int(count)
schema = fastavro.parse_schema(json.loads(schema_json))

consumer = Consumer({
    "bootstrap.servers": brokers,
    "group.id": group,
    "enable.auto.commit": False,
    "auto.offset.reset": "earliest",
})
consumer.subscribe([topic])
conn = psycopg.connect(url)
sql = (
    "INSERT INTO trades_python (venue, symbol, kind, trade_id, price, quantity, buyer_is_maker, "
    "first_trade_id, last_trade_id, source, event_time, ingest_time) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING"
)
done = 0
start = None
while done < count:
    msgs = consumer.consume(num_messages=min(5000, count - done), timeout=1.0)
    if not msgs:
        continue
    if start is None:
        start = time.perf_counter()
    rows = []
    for m in msgs:
        if m.error():
            continue
        r = fastavro.schemaless_reader(io.BytesIO(m.value()[10:]), schema)
        rows.append((r["venue"], r["symbol"], r["kind"], r["trade_id"], r["price"], r["quantity"],
                     r["buyer_is_maker"], r["first_trade_id"], r["last_trade_id"], r["source"],
                     r["event_time"], r["ingest_time"]))
    with conn.cursor() as cur:
        cur.executemany(sql, rows)
    conn.commit()
    consumer.commit(asynchronous=False)
    done += len(msgs)
elapsed = time.perf_counter() - start
consumer.close()
print(f"{done / elapsed:.0f}")
