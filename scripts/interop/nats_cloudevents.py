"""CloudEvents on NATS JetStream between eventos and a client that is not
eventos: nats-py with the official CloudEvents SDK for Python. The NATS
binding's binary mode carries attributes in `ce-` headers the way HTTP
does, and its structured mode is the JSON format with
`application/cloudevents+json`, so the SDK's HTTP binding reads and writes
both.

    nats_cloudevents.py read URL STREAM SUBJECT COUNT [TIMEOUT_SECONDS]
        Reads COUNT events from the start of STREAM (a consumer of its own)
        and prints each as one JSON line: the attributes the SDK parsed
        and the data it decoded.

    nats_cloudevents.py write URL SUBJECT binary|structured
        Publishes one event in that mode through JetStream and prints it
        as one JSON line, as `read` does.

Exits non-zero if the events do not arrive in time or one does not parse.
"""

import asyncio
import base64
import json
import sys
import uuid
from datetime import datetime, timezone

import nats
from cloudevents.core.bindings.http import (
    HTTPMessage,
    from_http_event,
    to_binary_event,
    to_structured_event,
)
from cloudevents.core.v1.event import CloudEvent


def shown(event):
    attributes = {
        k: (v.isoformat() if hasattr(v, "isoformat") else v)
        for k, v in event.get_attributes().items()
    }
    data = event.get_data()
    if isinstance(data, (bytes, bytearray)):
        data = {"base64": base64.b64encode(data).decode()}
    return json.dumps({"attributes": attributes, "data": data})


async def read(url, stream, subject, count, timeout):
    nc = await nats.connect(url)
    js = nc.jetstream()
    sub = await js.pull_subscribe(subject, stream=stream)
    seen = 0
    deadline = asyncio.get_running_loop().time() + timeout
    while seen < count:
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            sys.exit(f"only {seen} of {count} events arrived on {subject}")
        try:
            messages = await sub.fetch(count - seen, timeout=min(left, 2))
        except nats.errors.TimeoutError:
            continue
        for message in messages:
            headers = dict(message.headers or {})
            event = from_http_event(HTTPMessage(headers=headers, body=message.data))
            print(shown(event), flush=True)
            await message.ack()
            seen += 1
    await nc.close()


async def write(url, subject, mode):
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
    message = to_binary_event(event) if mode == "binary" else to_structured_event(event)
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.publish(subject, message.body, headers=dict(message.headers))
    await nc.close()
    print(shown(event), flush=True)


def main(argv):
    if len(argv) >= 5 and argv[1] == "read":
        timeout = float(argv[6]) if len(argv) > 6 else 30.0
        asyncio.run(read(argv[2], argv[3], argv[4], int(argv[5]), timeout))
    elif len(argv) == 5 and argv[1] == "write":
        asyncio.run(write(argv[2], argv[3], argv[4]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
