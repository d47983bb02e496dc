"""``kombu-envelope audit`` on real Redis and RabbitMQ queues: exact counts, and every message left in place."""

from __future__ import annotations

import json

import redis

from kombu_envelope.cli import main
from kombu_envelope.codec import EnvelopeCodec

from .ops_helpers import (
    amqp_delete,
    amqp_drain,
    envelope_app,
    new_key,
    publish_raw,
    redis_lists,
    send_tasks,
    unique,
)

TRUNCATED = b"\x01\x01\x00\x01"  # a header that promises a wrapped key and ends


def forged_envelope(key_uri: str) -> bytes:
    """A well-formed envelope whose tag was altered: only decryption can tell."""
    body = EnvelopeCodec([key_uri]).encode([["x"], {}, {}])
    return body[:-1] + bytes([body[-1] ^ 1])


def audit_json(capsys, *args: str) -> tuple[int, dict]:
    code = main(["audit", "--json", *args])
    return code, json.loads(capsys.readouterr().out)


def test_audit_counts_a_mixed_redis_queue_exactly_and_leaves_every_message(tmp_path, redis_db_url, capsys, monkeypatch):
    queue = unique("audit-redis")
    key_uri = new_key(tmp_path)
    app = envelope_app(redis_db_url, key_uri, queue)
    send_tasks(app, 3)
    send_tasks(app, 2, serializer="json")
    send_tasks(app, 1, priority=6)  # Kombu keeps it in another list: queue\x06\x166
    publish_raw(redis_db_url, queue, TRUNCATED)
    publish_raw(redis_db_url, queue, forged_envelope(key_uri))
    send_tasks(app, 2)
    send_tasks(app, 1, serializer="json")
    client = redis.Redis.from_url(redis_db_url)
    client.lpush(queue, b"this is not a Kombu message")
    before = redis_lists(redis_db_url, queue)
    assert len(before) == 2 and sum(map(len, before.values())) == 12

    code, report = audit_json(capsys, "--broker", redis_db_url, "--queue", queue)
    assert code == 1  # plaintext found
    (counts,) = report["queues"]
    assert (counts["messages"], counts["encrypted"], counts["plaintext"], counts["undecodable"]) == (12, 7, 3, 2)
    assert counts["plaintext_content_types"] == {"application/json": 3}
    assert counts["undecodable_reasons"] == {
        "truncated wrapped key": 1,
        "not a Kombu message record (JSONDecodeError)": 1,
    }
    assert counts["keys"] == {f"local:{EnvelopeCodec([key_uri])._encrypt_providers[0].fingerprint.hex()}": 7}
    assert redis_lists(redis_db_url, queue) == before

    # With the app's settings the keys get their URIs; --decrypt also catches the forged tag.
    monkeypatch.setenv("KOMBU_ENVELOPE_KEY_URI", key_uri)
    code, report = audit_json(capsys, "--broker", redis_db_url, "--queue", queue, "--decrypt")
    (counts,) = report["queues"]
    assert (counts["encrypted"], counts["plaintext"], counts["undecodable"]) == (6, 3, 3)
    assert counts["keys"] == {key_uri: 6}
    assert (
        counts["undecodable_reasons"][
            "authentication failed: the ciphertext, tag, nonce or header was altered, or it was sealed under another data key"
        ]
        == 1
    )
    assert redis_lists(redis_db_url, queue) == before
    client.delete(*before)
    client.close()


def test_audit_of_an_all_encrypted_queue_exits_0_and_finds_queues_without_being_told(tmp_path, redis_db_url, capsys):
    queue = unique("audit-clean")
    app = envelope_app(redis_db_url, new_key(tmp_path), queue)
    send_tasks(app, 4)
    code = main(["audit", "--broker", redis_db_url])  # Redis: every queue Kombu has bound
    out = capsys.readouterr().out
    assert code == 0, out
    line = next(line for line in out.splitlines() if line.startswith(queue))
    assert line.split() == [queue, "4", "4", "0", "0"]
    assert "all 4 message(s) are encrypted; every message is still in its queue" in out
    redis.Redis.from_url(redis_db_url).delete(queue)


def test_long_redis_scan_crosses_read_chunks_in_delivery_order(tmp_path, redis_db_url, capsys):
    queue = unique("audit-long")
    app = envelope_app(redis_db_url, new_key(tmp_path), queue)
    send_tasks(app, 1)
    send_tasks(app, 1, serializer="json")
    client = redis.Redis.from_url(redis_db_url)
    plain, encrypted = client.lrange(queue, 0, -1)  # leftmost = newest = the json one
    client.delete(queue)
    client.lpush(queue, *([encrypted] * 700 + [plain] * 503))
    before = redis_lists(redis_db_url, queue)

    code = main(["audit", "--broker", redis_db_url, "--queue", queue, "--progress"])
    captured = capsys.readouterr()
    assert code == 1
    assert captured.out.splitlines()[1].split() == [queue, "1203", "700", "503", "0"]
    assert f"[{'#' * 30}] 1203/1203" in captured.err  # the progress bar, on stderr when asked
    assert redis_lists(redis_db_url, queue) == before

    code = main(["audit", "--broker", redis_db_url, "--queue", queue, "--limit", "700"])
    captured = capsys.readouterr()
    assert captured.out.splitlines()[1].split() == [queue, "700", "700", "0", "0"]  # the 700 delivered first
    assert captured.err == ""  # no progress bar when stderr is not a terminal and none was asked for
    client.delete(queue)
    client.close()


def test_audit_counts_a_mixed_rabbitmq_queue_exactly_and_leaves_every_message_in_order(tmp_path, amqp_url, capsys):
    queue = unique("audit-amqp")
    key_uri = new_key(tmp_path)
    app = envelope_app(amqp_url, key_uri, queue)
    try:
        sent = send_tasks(app, 2)
        sent += send_tasks(app, 2, serializer="json")
        sent.append(publish_raw(amqp_url, queue, TRUNCATED))
        sent += send_tasks(app, 403)  # the scan holds messages in runs of 200 per channel: cross two runs
        sent.append(publish_raw(amqp_url, queue, forged_envelope(key_uri)))
        sent += send_tasks(app, 1, serializer="json")

        for _ in range(2):  # a second audit sees exactly what the first saw
            code, report = audit_json(
                capsys, "--broker", amqp_url, "--queue", queue, "--queue", "no-such-queue-" + queue
            )
            assert code == 1
            (counts,) = report["queues"]
            assert (counts["messages"], counts["encrypted"], counts["plaintext"], counts["undecodable"]) == (
                410,
                406,
                3,
                1,
            )
            assert counts["undecodable_reasons"] == {"truncated wrapped key": 1}
            assert report["missing_queues"] == ["no-such-queue-" + queue]

        drained = amqp_drain(amqp_url, queue)
        assert [task_id for _, _, task_id in drained] == sent  # all there, in the order they were sent
        assert [ctype for ctype, _, _ in drained].count("application/json") == 3
    finally:
        amqp_delete(amqp_url, queue)
