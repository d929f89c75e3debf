"""The third-party side of the interoperability test (schemas/tests/interop.rs).

Uses confluent-kafka's own Schema Registry client, AvroSerializer and
AvroDeserializer (fastavro underneath), against the registry URL it is given.

    python confluent_client.py read  <registry-url> <in.json> <out.json>
    python confluent_client.py write <registry-url> <in.json> <out.json>

read:  in  = [{"topic", "hex"}]               (payloads tickpipe wrote)
       out = [{"topic", "record"}]            (decoded, in the normalised JSON form)
write: in  = [{"topic", "schema", "record"}]  (records in the normalised JSON form)
       out = [{"topic", "hex"}]               (payloads confluent-kafka wrote)

Normalised JSON form: decimals as plain strings without trailing zeros,
timestamps as integer microseconds, bytes as hex, enums as their symbol.
"""

import datetime
import decimal
import json
import sys

from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext
from fastavro.schema import fingerprint, parse_schema, to_parsing_canonical_form

EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


def norm(value):
    """A decoded Avro value in the normalised JSON form."""
    if isinstance(value, decimal.Decimal):
        return format(value.normalize(), "f")
    if isinstance(value, datetime.datetime):
        return (value - EPOCH) // datetime.timedelta(microseconds=1)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {k: norm(v) for k, v in value.items()}
    if isinstance(value, list):
        return [norm(v) for v in value]
    return value


def denorm(value, schema):
    """A normalised JSON value as the Python value fastavro writes for `schema`."""
    if value is None:
        return None
    if isinstance(schema, list):  # union: the first non-null branch that fits
        branch = next(s for s in schema if s != "null")
        return denorm(value, branch)
    if isinstance(schema, dict):
        logical = schema.get("logicalType")
        kind = schema["type"]
        if logical == "decimal":
            return decimal.Decimal(value)
        if logical == "timestamp-micros":
            return EPOCH + datetime.timedelta(microseconds=value)
        if kind == "record":
            return {f["name"]: denorm(value[f["name"]], f["type"]) for f in schema["fields"]}
        if kind == "map":
            return {k: denorm(v, schema["values"]) for k, v in value.items()}
        if kind == "array":
            return [denorm(v, schema["items"]) for v in value]
        if kind == "enum":
            return value
        return denorm(value, kind)
    if schema == "bytes":
        return bytes.fromhex(value)
    return value


def main():
    mode, url, src, dst = sys.argv[1:5]
    client = SchemaRegistryClient({"url": url})
    with open(src) as f:
        items = json.load(f)
    out = []
    if mode == "read":
        deserializer = AvroDeserializer(client)
        for item in items:
            payload = bytes.fromhex(item["hex"])
            ctx = SerializationContext(item["topic"], MessageField.VALUE)
            out.append({"topic": item["topic"], "record": norm(deserializer(payload, ctx))})
    elif mode == "write":
        # One serializer per topic, as an application would hold them. (A second
        # serializer for an already registered schema trips confluent-kafka
        # 2.12's cached-registration path, which builds RegisteredSchema with
        # its arguments in the wrong order.)
        serializers = {}
        for item in items:
            serializer = serializers.setdefault(
                item["topic"], AvroSerializer(client, item["schema"], conf={"auto.register.schemas": True})
            )
            ctx = SerializationContext(item["topic"], MessageField.VALUE)
            record = denorm(item["record"], json.loads(item["schema"]))
            out.append({"topic": item["topic"], "hex": serializer(record, ctx).hex()})
    elif mode == "fingerprint":
        # The single-object header fastavro's fingerprint gives for each schema.
        for item in items:
            canonical = to_parsing_canonical_form(parse_schema(json.loads(item["schema"])))
            out.append({"topic": item["topic"], "hex": "c301" + fingerprint(canonical, "CRC-64-AVRO")})
    else:
        sys.exit(f"unknown mode {mode!r}")
    with open(dst, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
