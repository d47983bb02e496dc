"""Publishing hand-made Celery task messages: bodies encrypted under another key, tampered, or plaintext."""

from __future__ import annotations

import uuid
from typing import Any

from kombu_envelope.serializer import CONTENT_TYPE

REDACTED = "'<encrypted>'"


def task_message(app: Any, task_name: str, args: tuple[Any, ...]) -> tuple[str, dict[str, Any], dict[str, Any], Any]:
    """(task id, headers, properties, body not yet serialized) of a protocol-2 message, built by Celery itself."""
    task_id = str(uuid.uuid4())
    message = app.amqp.as_task_v2(task_id, task_name, args=args, kwargs={}, argsrepr=REDACTED, kwargsrepr=REDACTED)
    return task_id, message.headers, message.properties, message.body


def publish(
    app: Any,
    queue: str,
    headers: dict[str, Any],
    properties: dict[str, Any],
    body: bytes,
    content_type: str = CONTENT_TYPE,
    content_encoding: str = "binary",
) -> None:
    """Publish ``body`` as is to Celery's ``queue`` (declared as the worker declares it)."""
    with app.producer_or_acquire() as producer:
        producer.publish(
            body,
            exchange="",
            routing_key=queue,
            headers=headers,
            content_type=content_type,
            content_encoding=content_encoding,
            declare=[app.amqp.queues[queue]],
            **properties,
        )


def read_queue(app: Any, queue: str) -> list[Any]:
    """Take every message out of ``queue`` (acknowledged): kombu Messages with body, headers, content type."""
    from kombu import Queue

    messages = []
    with app.connection_for_read() as conn:
        bound = Queue(queue, routing_key=queue, durable=True)(conn.default_channel)
        bound.declare()
        while True:
            message = bound.get(no_ack=True)
            if message is None:
                return messages
            messages.append(message)
