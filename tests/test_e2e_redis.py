"""End to end on a real Redis with a real prefork worker, configured by settings alone.

The app module the worker loads contains only configuration: it never imports
kombu_envelope. A canary secret travels in task arguments and results; it must
appear nowhere in Redis (raw or base64-decoded), in the worker's INFO log or in
the events the worker emits.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid

import pytest
from kombu import Connection, Producer

from kombu_envelope.providers.local import write_key_file

from .servers import CeleryWorker, envelope_config, import_app_module, scan_redis_for, write_app_module

CANARY = "canary-" + uuid.uuid4().hex[:12]


@pytest.fixture
def envelope_app(tmp_path, redis_db_url):
    """A config-only app module on the test Redis db, and the same app imported here as the producer."""
    key = tmp_path / "master.key"
    write_key_file(str(key))
    name = "envelope_app_" + uuid.uuid4().hex[:8]
    queue = "q-" + name
    write_app_module(
        tmp_path,
        name,
        envelope_config(
            redis_db_url, f"local://{key}", queue, worker_send_task_events=True, task_send_sent_event=True
        ),
    )
    return import_app_module(tmp_path, name), tmp_path, queue


class EventRecorder:
    """Collects every event the worker sends while it runs, as raw text."""

    def __init__(self, app):
        self.app = app
        self.events: list[dict] = []
        self.receiver = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        with self.app.connection_for_read() as conn:
            self.receiver = self.app.events.Receiver(conn, handlers={"*": self.events.append})
            self.receiver.capture(limit=None, timeout=None, wakeup=False)

    def __enter__(self):
        self._thread.start()
        time.sleep(1)  # let the receiver subscribe before events flow
        return self

    def __exit__(self, *exc):
        if self.receiver is not None:
            self.receiver.should_stop = True
        self._thread.join(5)


def test_secrets_never_reach_redis_logs_or_events_and_tasks_run(envelope_app, redis_db_url):
    module, app_dir, queue = envelope_app
    app = module.app

    with EventRecorder(app) as recorder:
        results = [module.echo.delay(CANARY, n, secret=CANARY) for n in range(20)]
        results.append(module.secret_result.delay(CANARY))

        # Queued, not yet consumed: every key in the db, raw and base64-decoded.
        assert scan_redis_for(redis_db_url, CANARY.encode()) == []

        with CeleryWorker(app_dir, module.__name__, concurrency=2, extra_args=["-E"]) as worker:
            values = [r.get(timeout=60) for r in results]
            time.sleep(1)  # the last task-succeeded events
            log = worker.log_text()

    assert values[:20] == [[[CANARY, n], {"secret": CANARY}] for n in range(20)]
    assert values[20] == CANARY
    # Results are in the backend now: still nothing readable.
    assert scan_redis_for(redis_db_url, CANARY.encode()) == []
    assert "succeeded" in log and "'<encrypted>'" in log
    assert CANARY not in log
    seen = {e["type"] for e in recorder.events}
    assert {"task-sent", "task-received", "task-succeeded"} <= seen, seen
    assert CANARY not in repr(recorder.events)
    received = [e for e in recorder.events if e["type"] == "task-received"]
    assert all(e["args"] == "'<encrypted>'" and e["kwargs"] == "'<encrypted>'" for e in received)


def test_control_commands_keep_working(envelope_app):
    module, app_dir, _ = envelope_app
    with CeleryWorker(app_dir, module.__name__, concurrency=2) as worker:
        node = worker.nodename.replace("%h", socket.gethostname())
        inspect = module.app.control.inspect(timeout=10, destination=[node], limit=1)
        pings = inspect.ping()
        stats = inspect.stats()
    assert pings == {node: {"ok": "pong"}}
    assert stats[node]["pool"]["max-concurrency"] == 2


def _publish_raw(url: str, queue: str, body: bytes, content_type: str, task_id: str, task: str) -> None:
    with Connection(url) as conn:
        Producer(conn).publish(
            body,
            routing_key=queue,
            declare=[],
            content_type=content_type,
            content_encoding="binary",
            headers={"task": task, "id": task_id, "argsrepr": "()", "kwargsrepr": "{}", "lang": "py"},
        )


def test_plaintext_and_tampered_messages_are_refused_and_lose_no_other_message(envelope_app, redis_db_url):
    module, app_dir, queue = envelope_app
    before = module.add.delay(1, 2)

    # A json message where only envelope is accepted.
    _publish_raw(redis_db_url, queue, b'[[40, 2], {}, {}]', "application/json", "plain-1", f"{module.__name__}.add")
    # A genuine envelope body with one byte flipped in the ciphertext.
    from kombu_envelope.serializer import codec_for_app

    codec, _ = codec_for_app(module.app)
    body = bytearray(codec.encode([[40, 2], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]))
    body[-20] ^= 0x01
    _publish_raw(redis_db_url, queue, bytes(body), "application/x-kombu-envelope", "tampered-1", f"{module.__name__}.add")

    after = module.add.delay(3, 4)
    with CeleryWorker(app_dir, module.__name__, concurrency=2) as worker:
        assert before.get(timeout=60) == 3
        assert after.get(timeout=60) == 7
        time.sleep(1)
        log = worker.log_text()

    assert "Refusing to deserialize untrusted content of type json (application/json)" in log
    refused = [line for line in log.splitlines() if "'tampered-1'" in line]
    assert refused and "InvalidEnvelope('authentication failed" in refused[0]
