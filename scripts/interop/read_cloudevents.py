"""Reads CloudEvents that eventos published on RabbitMQ, with pika and the
official CloudEvents SDK for Python (its AMQP binding), and prints each as
one JSON line: the attributes the SDK parsed and the data it decoded.

    read_cloudevents.py AMQP_URL QUEUE COUNT [TIMEOUT_SECONDS]

Exits non-zero if COUNT events do not arrive within the timeout or one does
not parse: the caller compares what was printed with what it published.
"""

import json
import sys
import time

import pika
from cloudevents.core.bindings.amqp import AMQPMessage, from_amqp_event


def text(value):
    # pika hands AMQP long strings back as bytes when they are not UTF-8
    # clean; CloudEvents attributes are strings.
    return value.decode("utf-8") if isinstance(value, bytes) else value


def main():
    url, queue, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    deadline = time.monotonic() + (float(sys.argv[4]) if len(sys.argv) > 4 else 30.0)
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    seen = 0
    while seen < count:
        method, properties, body = channel.basic_get(queue=queue, auto_ack=False)
        if method is None:
            if time.monotonic() > deadline:
                sys.exit(f"only {seen} of {count} events arrived on {queue}")
            time.sleep(0.05)
            continue
        message = AMQPMessage(
            properties={"content-type": properties.content_type} if properties.content_type else {},
            application_properties={k: text(v) for k, v in (properties.headers or {}).items()},
            application_data=body,
        )
        event = from_amqp_event(message)
        attributes = {
            k: (v.isoformat() if hasattr(v, "isoformat") else v)
            for k, v in event.get_attributes().items()
        }
        data = event.get_data()
        if isinstance(data, (bytes, bytearray)):
            data = {"base64": __import__("base64").b64encode(data).decode()}
        print(json.dumps({"attributes": attributes, "data": data}), flush=True)
        channel.basic_ack(method.delivery_tag)
        seen += 1
    connection.close()


if __name__ == "__main__":
    main()
