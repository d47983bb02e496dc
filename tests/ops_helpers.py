"""Helpers for the operator-tool tests: apps, messages of every kind in real queues, queue snapshots."""

from __future__ import annotations

import uuid
from typing import Any

import redis
from celery import Celery
from kombu import Connection, Exchange, Producer, Queue

from kombu_envelope.providers.local import write_key_file

ENVELOPE = "application/x-kombu-envelope"


def new_key(tmp_path: Any, name: str = "master.key") -> str:
    """A fresh local key; returns its URI."""
    path = tmp_path / name
    write_key_file(str(path))
    return f"local://{path}"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def envelope_app(broker_url: str, key_uri: str, queue: str, **conf: Any) -> Celery:
    """A producer app whose tasks are encrypted under ``key_uri`` and routed to ``queue``."""
    app = Celery(unique("ops"), broker=broker_url, set_as_current=True)
    app.conf.update(
        task_serializer="envelope",
        result_serializer="envelope",
        accept_content=["envelope"],
        task_default_queue=queue,
        envelope_key_uri=key_uri,
        broker_connection_retry_on_startup=False,
        **conf,
    )
    return app


def send_tasks(app: Celery, count: int, serializer: str | None = None, **options: Any) -> list[str]:
    """Publish ``count`` tasks (encrypted unless ``serializer`` says otherwise); their ids, in order."""
    app.set_current()  # the envelope serializer encrypts with the current app's settings
    ids = []
    for i in range(count):
        result = app.send_task("ops.charge", args=("4111-1111-1111-1111", i), serializer=serializer, **options)
        ids.append(result.id)
    return ids


def publish_raw(broker_url: str, queue: str, body: bytes, content_type: str = ENVELOPE, **options: Any) -> str:
    """Publish ``body`` as it is (a forged or truncated envelope, say) to ``queue``; returns its id header."""
    message_id = uuid.uuid4().hex
    with Connection(broker_url) as conn:
        target = Queue(queue, Exchange(queue), routing_key=queue)
        Producer(conn).publish(
            body,
            exchange=target.exchange,
            routing_key=queue,
            content_type=content_type,
            content_encoding="binary",
            declare=[target],
            headers={"id": message_id, "task": "ops.charge"},
            **options,
        )
    return message_id


def redis_lists(url: str, queue: str) -> dict[bytes, list[bytes]]:
    """Every Redis list that holds ``queue``'s messages (one per priority), verbatim."""
    client = redis.Redis.from_url(url)
    try:
        keys = [queue.encode()] + [f"{queue}\x06\x16{p}".encode() for p in range(1, 10)]
        return {key: client.lrange(key, 0, -1) for key in keys if client.exists(key)}
    finally:
        client.close()


def amqp_drain(url: str, queue: str) -> list[tuple[str, bytes, str]]:
    """Consume (and delete) every message of ``queue``: (content type, body, task id) in delivery order."""
    with Connection(url) as conn:
        channel = conn.connection.channel()
        channel.auto_decode = False
        out = []
        while True:
            message = channel.basic_get(queue, no_ack=True)
            if message is None:
                break
            body = message.body if isinstance(message.body, bytes) else message.body.encode()
            out.append((message.properties.get("content_type"), body, (message.headers or {}).get("id")))
        channel.queue_delete(queue)
        return out


def amqp_delete(url: str, queue: str) -> None:
    with Connection(url) as conn:
        channel = conn.connection.channel()
        channel.queue_delete(queue)
        channel.exchange_delete(queue)
