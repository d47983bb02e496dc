"""Tampered and plaintext messages land in the dead-letter queue with their reason; the good ones around them run.

A real prefork worker on Redis with ``worker_consumer`` set by configuration
alone. One genuine envelope per field of the wire format gets a flipped byte
in that field (its first byte's top bit); a json task is published where only envelope is accepted.
"""

from __future__ import annotations

import re
import time
import uuid

import pytest

from kombu_envelope.consumer import REASON_HEADER, REFUSED_BY_HEADER, SOURCE_HEADER
from kombu_envelope.providers.local import write_key_file
from kombu_envelope.serializer import CONTENT_TYPE, codec_for_app

from . import servers
from .fuzzing import envelope_fields
from .task_messages import publish, read_queue, task_message

CANARY = "canary-" + uuid.uuid4().hex[:12]

# The reason each field's damage must produce; other fields only need to be refused.
EXPECTED = {
    "version": "unsupported format version",
    "flags": "unknown header flags",
    "context": "encryption context",
    "fingerprint": "none of which is configured",
    "wrapped key": "wrapped data key failed authentication",
    "nonce": "authentication failed",
    "ciphertext": "authentication failed",
    "tag": "authentication failed",
}


@pytest.fixture
def make_app(tmp_path, redis_db_url):
    """``make_app(dead_letter_queue)`` -> (app module, its dir, task queue): a config-only app on the test Redis db."""
    key = tmp_path / "master.key"
    write_key_file(str(key))

    def make(dead_letters):
        name = "tamper_" + uuid.uuid4().hex[:8]
        queue = servers.unique_name("q")
        config = servers.envelope_config(
            redis_db_url,
            f"local://{key}",
            queue,
            envelope_encryption_context={"app": "tamper-test"},
            envelope_dead_letter_queue=dead_letters,
            worker_consumer="kombu_envelope.consumer:EnvelopeConsumer",
        )
        servers.write_app_module(tmp_path, name, config)
        return servers.import_app_module(tmp_path, name), tmp_path, queue

    return make


def test_each_damaged_field_and_plaintext_is_dead_lettered_and_the_rest_runs(make_app):
    dead_letters = servers.unique_name("dlq")
    module, app_dir, queue = make_app(dead_letters)
    app = module.app
    codec, _ = codec_for_app(app)
    add = f"{module.__name__}.add"

    sample = codec.encode(task_message(app, add, (1, 2))[3])
    fields = envelope_fields(sample)
    assert {name for name, _, _ in fields} >= set(EXPECTED)

    good, bad = [], {}  # bad: task id -> (field, body published)
    for n, (field, start, end) in enumerate(fields):
        good.append((module.echo.delay(CANARY, n), [[CANARY, n], {}]))
        task_id, headers, properties, body = task_message(app, add, (n, n))
        damaged = bytearray(codec.encode(body))
        damaged[start] ^= 0x80  # the top bit of the field's first byte
        publish(app, queue, headers, properties, bytes(damaged))
        bad[task_id] = (field, bytes(damaged))
    task_id, headers, properties, body = task_message(app, add, (40, 2))
    plaintext = b"[[40, 2], {}, {}]"
    publish(app, queue, headers, properties, plaintext, content_type="application/json", content_encoding="utf-8")
    bad[task_id] = ("plaintext json", plaintext)
    good.append((module.add.delay(3, 4), 7))

    with servers.CeleryWorker(app_dir, module.__name__, concurrency=2) as worker:
        assert [result.get(timeout=60) for result, _ in good] == [expected for _, expected in good]
        worker.wait_for_log("|".join(re.escape(f"refused task {task_id} ") for task_id in list(bad)[-1:]), timeout=30)
        report = app.control.inspect(timeout=5)._request("envelope_reliability")
        log = worker.log_text()

    refused = [line for line in log.splitlines() if "kombu-envelope: refused task" in line]
    assert len(refused) == len(bad), refused
    for task_id, (field, _) in bad.items():
        lines = [line for line in refused if f"refused task {task_id} " in line]
        assert len(lines) == 1, (field, lines)
        assert f"moved to dead-letter queue '{dead_letters}'" in lines[0]
        if field in EXPECTED:
            assert EXPECTED[field] in lines[0], (field, lines[0])
    assert "application/json" in next(line for line in refused if "plaintext" in line)
    # Celery's own decode-error report (headers and body dump) never appears; nor any argument.
    assert "Can't decode message body" not in log and "Received and deleted unknown message" not in log
    assert CANARY not in log

    dead = {m.headers["id"]: m for m in read_queue(app, dead_letters)}
    assert set(dead) == set(bad)
    for task_id, (field, body) in bad.items():
        message = dead[task_id]
        assert message.body == body, field  # intact: the operator sees exactly what arrived
        assert message.headers["task"] == add
        assert message.headers[SOURCE_HEADER] == f" {queue}"
        assert message.headers[REFUSED_BY_HEADER].startswith("w")
        assert message.content_type == ("application/json" if field == "plaintext json" else CONTENT_TYPE)
        if field in EXPECTED:
            assert EXPECTED[field] in message.headers[REASON_HEADER], field
    counts = [reply["counts"] for reply in report.values()]
    assert counts == [{"dead_lettered": len(bad)}]
    # Nothing is left behind: the queue is empty.
    time.sleep(0.5)
    assert read_queue(app, queue) == []


def test_dead_lettering_off_acknowledges_with_one_log_line(make_app):
    module, app_dir, queue = make_app(None)
    app = module.app
    codec, _ = codec_for_app(app)
    task_id, headers, properties, body = task_message(app, f"{module.__name__}.add", (1, 1))
    damaged = bytearray(codec.encode(body))
    damaged[-1] ^= 0x01
    publish(app, queue, headers, properties, bytes(damaged))
    after = module.add.delay(2, 2)
    with servers.CeleryWorker(app_dir, module.__name__, concurrency=1) as worker:
        assert after.get(timeout=60) == 4
        worker.wait_for_log(re.escape(f"refused task {task_id} "), timeout=10)
        log = worker.log_text()
    assert f"refused task {task_id} ({module.__name__}.add): authentication failed" in log
    assert "dropped (envelope_dead_letter_queue is None)" in log
    assert read_queue(app, "envelope.dead-letter") == [] and read_queue(app, queue) == []
