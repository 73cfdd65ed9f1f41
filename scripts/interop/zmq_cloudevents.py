"""CloudEvents over ZeroMQ between eventos and a client that is not
eventos: pyzmq (libzmq itself) with the official CloudEvents SDK for
Python reading and writing the JSON format. It speaks the eventos-zmq
protocol (crates/eventos-zmq/src/wire.rs): multipart messages, deliveries
as topic, event JSON, tag, attempt; control messages with a `$` verb.

    zmq_cloudevents.py consume ENDPOINT TOPIC GROUP COUNT [TIMEOUT_SECONDS]
        A DEALER joins GROUP on TOPIC at the eventos publisher ENDPOINT,
        reads COUNT deliveries, acks each and prints each as one JSON line: the attributes the
        SDK parsed, the data, the topic frame and the attempt.

    zmq_cloudevents.py publish ENDPOINT
        A ROUTER bound at ENDPOINT plays the publisher: it welcomes the
        first consumer, hands it one event the SDK wrote, waits for the
        settlement, confirms it, and prints the event as `consume` does
        with the outcome the consumer chose.

Exits non-zero if nothing arrives in time or an event does not parse.
"""

import base64
import json
import sys
import time
import uuid
from datetime import datetime, timezone

import zmq
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent


def shown(event, **extra):
    attributes = {
        k: (v.isoformat() if hasattr(v, "isoformat") else v)
        for k, v in event.get_attributes().items()
    }
    data = event.get_data()
    if isinstance(data, (bytes, bytearray)):
        data = {"base64": base64.b64encode(data).decode()}
    return json.dumps({"attributes": attributes, "data": data, **extra})


def frames(*parts):
    return [p if isinstance(p, bytes) else str(p).encode() for p in parts]


def consume(endpoint, topic, group, count, timeout):
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.connect(endpoint)
    socket.send_multipart(frames("$hello", "1", topic, group, "earliest", 16))
    deadline = time.monotonic() + timeout
    seen, last_ping = 0, 0.0
    while seen < count:
        now = time.monotonic()
        if now > deadline:
            sys.exit(f"only {seen} of {count} events arrived on {topic}")
        if now - last_ping > 0.5:
            socket.send_multipart(frames("$ping"))
            last_ping = now
        if not socket.poll(200):
            continue
        message = socket.recv_multipart()
        verb = message[0].decode()
        if verb == "$refused":
            sys.exit(f"refused: {message[1].decode()}")
        if verb == "$settled":
            sys.exit(f"settlement failed: {message[2:]}")
        if verb.startswith("$"):
            continue
        event = JSONFormat().read(None, message[1])
        tag, attempt = message[2].decode(), int(message[3])
        print(shown(event, topic=verb, attempt=attempt), flush=True)
        # An ack is answered only if it fails.
        socket.send_multipart(frames("$settle", tag, "ack"))
        seen += 1
    socket.send_multipart(frames("$bye"))
    socket.close(linger=1000)


def publish(endpoint):
    socket = zmq.Context.instance().socket(zmq.ROUTER)
    socket.bind(endpoint)
    event = CloudEvent(
        attributes={
            "type": "school.python.note.v1",
            "source": "/python",
            "id": str(uuid.uuid4()),
            "subject": "python-1",
            "time": datetime.now(timezone.utc).replace(microsecond=123000),
            "datacontenttype": "application/json",
            "correlationid": "corr-py",
        },
        data={"from": "python", "n": 7},
    )
    deadline = time.monotonic() + 30
    consumer, topic = None, None
    while time.monotonic() < deadline:
        if not socket.poll(200):
            continue
        identity, verb, *rest = socket.recv_multipart()
        verb = verb.decode()
        if verb == "$ping":
            socket.send_multipart([identity] + frames("$pong"))
        elif verb == "$hello" and consumer is None:
            consumer, topic = identity, rest[1]
            socket.send_multipart([identity] + frames("$welcome"))
            socket.send_multipart(
                [identity, topic, JSONFormat().write(event)] + frames(1, 1)
            )
        elif verb in ("$settle", "$acks") and identity == consumer:
            # Acks come one per `$settle` or several per `$acks`, and are
            # answered only when they fail; the rest always.
            outcome = rest[1].decode() if verb == "$settle" else "ack"
            if outcome != "ack":
                socket.send_multipart([identity] + frames("$settled", rest[0]))
            print(shown(event, outcome=outcome), flush=True)
            socket.close(linger=1000)
            return
    sys.exit("no consumer settled the event within 30 s")


def main(argv):
    if len(argv) >= 6 and argv[1] == "consume":
        timeout = float(argv[6]) if len(argv) > 6 else 30.0
        consume(argv[2], argv[3], argv[4], int(argv[5]), timeout)
    elif len(argv) == 3 and argv[1] == "publish":
        publish(argv[2])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
