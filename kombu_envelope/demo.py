"""``kombu-envelope demo``: the whole product in one process, with no servers.

A Celery app on Kombu's in-memory transport with a freshly generated local
key sends tasks that carry a visible secret, shows the raw broker message
(ciphertext only, headers redacted), then runs a worker thread and prints the
decrypted results.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
from typing import TextIO

SECRET = "4111-1111-1111-1111"  # a well-known test card number: the "secret" to look for


def run_demo(out: TextIO) -> int:
    """Run the demo, writing to ``out``; returns a process exit code."""
    from celery import Celery
    from celery.contrib.testing.worker import start_worker
    from kombu.transport.memory import Channel

    from .providers.local import write_key_file

    workdir = tempfile.mkdtemp(prefix="kombu-envelope-demo-")
    key_path = os.path.join(workdir, "demo.key")
    write_key_file(key_path)

    app = Celery("kombu_envelope_demo", broker="memory://", backend="cache+memory://", set_as_current=True)
    app.conf.update(
        task_serializer="envelope",
        result_serializer="envelope",
        accept_content=["envelope"],
        envelope_key_uri=f"local://{key_path}",
        worker_hijack_root_logger=False,
    )

    @app.task(name="demo.charge")
    def charge(customer: str, card: str, amount: float) -> str:
        return f"charged {amount:.2f} to {customer}'s card {card}"

    print(f"1. Generated a local demo key: {key_path} (local:// keys are for development only)", file=out)
    results = [charge.delay(name, SECRET, amount) for name, amount in (("alice", 12.5), ("bob", 99.0), ("carol", 7.25))]
    print(f"2. Sent {len(results)} tasks whose arguments contain the card number {SECRET}", file=out)

    raw = Channel.queues["celery"].queue[0]  # what the broker stores: Kombu's message envelope
    body = base64.b64decode(raw["body"])
    shown = {
        "content-type": raw["content-type"],
        "headers.argsrepr": raw["headers"]["argsrepr"],
        "headers.kwargsrepr": raw["headers"]["kwargsrepr"],
        "body (first 48 bytes of %d, hex)" % len(body): body[:48].hex(),
    }
    print("3. The first message as the broker holds it:", file=out)
    print(json.dumps(shown, indent=4), file=out)
    stored = json.dumps(list(Channel.queues["celery"].queue)).encode() + b"".join(
        base64.b64decode(m["body"]) for m in Channel.queues["celery"].queue
    )
    leaked = SECRET.encode() in stored
    print(f"   Card number readable anywhere in the queued messages: {'YES (bug!)' if leaked else 'no'}", file=out)

    print("4. A worker decrypts and runs them; the results travel encrypted too:", file=out)
    with start_worker(app, pool="solo", perform_ping_check=False, loglevel="WARNING"):
        for result in results:
            print(f"   {result.get(timeout=30)}", file=out)
    return 1 if leaked else 0
