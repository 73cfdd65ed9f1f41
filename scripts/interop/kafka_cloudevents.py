"""CloudEvents on Kafka between eventos and a client that is not eventos:
confluent-kafka with the official CloudEvents SDK for Python (its Kafka
binding).

    kafka_cloudevents.py read BOOTSTRAP TOPIC COUNT [TIMEOUT_SECONDS]
        Reads COUNT events from the start of TOPIC (a consumer group of its
        own) and prints each as one JSON line: the attributes the SDK
        parsed, the data it decoded, and the record's key.

    kafka_cloudevents.py write BOOTSTRAP TOPIC binary|structured
        Publishes one event in that mode, with the subject as the key, and
        prints it as one JSON line, as `read` does.

Exits non-zero if the events do not arrive in time or one does not parse:
the caller compares what was printed with what it published or read.
"""

import base64
import json
import sys
import time
import uuid

from cloudevents.core.bindings.kafka import (
    KafkaMessage,
    from_kafka_event,
    to_binary_event,
    to_structured_event,
)
from cloudevents.core.v1.event import CloudEvent
from confluent_kafka import Consumer, Producer


def shown(event, key):
    attributes = {
        k: (v.isoformat() if hasattr(v, "isoformat") else v)
        for k, v in event.get_attributes().items()
    }
    data = event.get_data()
    if isinstance(data, (bytes, bytearray)):
        data = {"base64": base64.b64encode(data).decode()}
    if isinstance(key, bytes):
        key = key.decode("utf-8")
    return json.dumps({"attributes": attributes, "data": data, "key": key})


def read(bootstrap, topic, count, timeout):
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"python-{uuid.uuid4()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    deadline = time.monotonic() + timeout
    seen = 0
    while seen < count:
        if time.monotonic() > deadline:
            sys.exit(f"only {seen} of {count} events arrived on {topic}")
        record = consumer.poll(0.2)
        if record is None:
            continue
        if record.error():
            sys.exit(f"consuming {topic}: {record.error()}")
        message = KafkaMessage(
            headers={k: v for k, v in (record.headers() or [])},
            key=record.key(),
            value=record.value() or b"",
        )
        print(shown(from_kafka_event(message), record.key()), flush=True)
        seen += 1
    consumer.close()


def write(bootstrap, topic, mode):
    event = CloudEvent(
        attributes={
            "type": "school.python.note.v1",
            "source": "/python",
            "subject": "python-1",
            "datacontenttype": "application/json",
            "correlationid": "corr-py",
        },
        data={"from": "python", "n": 7},
    )
    convert = to_binary_event if mode == "binary" else to_structured_event
    message = convert(event, key_mapper=lambda e: e.get_subject())
    producer = Producer(
        {"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all"}
    )
    failures = []
    producer.produce(
        topic,
        key=message.key,
        value=message.value,
        headers=list(message.headers.items()),
        on_delivery=lambda err, _msg: err and failures.append(err),
    )
    producer.flush(30)
    if failures:
        sys.exit(f"producing to {topic}: {failures[0]}")
    print(shown(event, message.key), flush=True)


def main():
    command, bootstrap, topic = sys.argv[1], sys.argv[2], sys.argv[3]
    if command == "read":
        timeout = float(sys.argv[5]) if len(sys.argv) > 5 else 30.0
        read(bootstrap, topic, int(sys.argv[4]), timeout)
    elif command == "write":
        write(bootstrap, topic, sys.argv[4])
    else:
        sys.exit(f"unknown command {command!r}: use read or write")


if __name__ == "__main__":
    main()
