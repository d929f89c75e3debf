"""The baseline of `make bench` for lake-sink: Kafka to a Parquet file written
the way such jobs usually are (confluent-kafka + fastavro + pyarrow, the
records of every poll appended as a row group, zstd), with the same column
types as lake-sink's files: exact decimal128(38, 18), timestamps in
microseconds UTC, and the Kafka coordinates.

Usage: lake_sink.py BROKERS TOPIC GROUP SCHEMA_JSON COUNT OUT_FILE
Prints "<rows/s> <CPU µs per row> <bytes>" over COUNT records (the clock
starts at the first record)."""

import io
import json
import os
import sys
import time

import fastavro
import pyarrow as pa
import pyarrow.parquet as pq
from confluent_kafka import Consumer

brokers, topic, group, schema_json, count, out = sys.argv[1:7]
count = int(count)
schema = fastavro.parse_schema(json.loads(schema_json))

decimal = pa.decimal128(38, 18)
time_us = pa.timestamp("us", tz="UTC")
columns = pa.schema([
    ("venue", pa.string()), ("symbol", pa.string()), ("kind", pa.string()), ("trade_id", pa.int64()),
    ("price", decimal), ("quantity", decimal), ("buyer_is_maker", pa.bool_()),
    ("first_trade_id", pa.int64()), ("last_trade_id", pa.int64()), ("source", pa.string()),
    ("event_time", time_us), ("ingest_time", time_us),
    ("kafka_topic", pa.string()), ("kafka_partition", pa.int32()), ("kafka_offset", pa.int64()),
])

consumer = Consumer({
    "bootstrap.servers": brokers,
    "group.id": group,
    "enable.auto.commit": False,
    "auto.offset.reset": "earliest",
})
consumer.subscribe([topic])
writer = pq.ParquetWriter(out, columns, compression="zstd")
done = 0
start = cpu = None
while done < count:
    msgs = consumer.consume(num_messages=min(10000, count - done), timeout=1.0)
    if not msgs:
        continue
    if start is None:
        start, cpu = time.perf_counter(), time.process_time()
    rows = {name: [] for name in columns.names}
    for m in msgs:
        if m.error():
            continue
        # Single-object encoding: 2 marker bytes and an 8-byte fingerprint.
        r = fastavro.schemaless_reader(io.BytesIO(m.value()[10:]), schema)
        for name in columns.names[:12]:
            rows[name].append(r[name])
        rows["kafka_topic"].append(m.topic())
        rows["kafka_partition"].append(m.partition())
        rows["kafka_offset"].append(m.offset())
    writer.write_table(pa.table(rows, schema=columns))
    consumer.commit(asynchronous=False)
    done += len(msgs)
writer.close()
elapsed = time.perf_counter() - start
cpu_used = time.process_time() - cpu
consumer.close()
print(f"{done / elapsed:.0f} {cpu_used / done * 1e6:.1f} {os.path.getsize(out)}")
