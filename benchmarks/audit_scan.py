"""How fast ``kombu-envelope audit`` scans a queue, on Redis and RabbitMQ, and that it leaves every message.

    python benchmarks/audit_scan.py [--messages 20000] [--amqp-messages 2000 5000 10000]
                                    [--redis redis://127.0.0.1:6379/13] [--amqp amqp://guest:guest@127.0.0.1:5672//]

Fills a fresh queue with encrypted and json messages (copies of two real
Celery task messages), audits it, checks the counts and that the queue is
unchanged, deletes it, and prints messages per second. On RabbitMQ the time
includes waiting for the broker to put every message back in place, which
grows faster than linearly with the number of messages held.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import uuid

import redis
from celery import Celery
from kombu import Connection

from kombu_envelope.audit import audit_queue
from kombu_envelope.providers.local import write_key_file
from kombu_envelope.queues import open_reader


def producer(broker: str, queue: str) -> Celery:
    key = os.path.join(tempfile.mkdtemp(), "bench.key")
    write_key_file(key)
    app = Celery("bench", broker=broker)
    app.conf.update(task_serializer="envelope", envelope_key_uri=f"local://{key}", task_default_queue=queue)
    return app


def fill(app: Celery, encrypted: int, plaintext: int) -> list[str]:
    """Send the messages; their task ids in order."""
    with app.producer_or_acquire() as pool_producer:
        return [
            app.send_task(
                "bench.task",
                args=("4111-1111-1111-1111", i),
                serializer="json" if i >= encrypted else None,
                producer=pool_producer,
            ).id
            for i in range(encrypted + plaintext)
        ]


def timed_audit(broker: str, queue: str) -> tuple[float, tuple[int, int, int]]:
    with open_reader(broker) as reader:
        started = time.perf_counter()
        report = audit_queue(reader, queue, progress=False)
        elapsed = time.perf_counter() - started
    return elapsed, (report.encrypted, report.plaintext, report.undecodable)


def bench_redis(url: str, messages: int) -> None:
    queue = "bench-audit-" + uuid.uuid4().hex[:8]
    app = producer(url, queue)
    fill(app, 1, 1)
    client = redis.Redis.from_url(url)
    plain, encrypted = client.lrange(queue, 0, -1)
    client.delete(queue)
    half = messages // 2
    for start in range(0, messages, 5000):  # pipelined LPUSH of copies
        n = min(5000, messages - start)
        client.lpush(queue, *[encrypted if start + i < half else plain for i in range(n)])
    before = client.lrange(queue, 0, -1)
    elapsed, counts = timed_audit(url, queue)
    assert counts == (half, messages - half, 0), counts
    assert client.lrange(queue, 0, -1) == before
    client.delete(queue)
    print(
        f"redis    {messages:>7} messages  {elapsed:6.2f} s  {messages / elapsed:>9,.0f} msg/s  counts {counts}  queue unchanged"
    )


def bench_amqp(url: str, messages: int) -> None:
    queue = "bench-audit-" + uuid.uuid4().hex[:8]
    app = producer(url, queue)
    half = messages // 2
    sent = fill(app, half, messages - half)
    try:
        elapsed, counts = timed_audit(url, queue)
        assert counts == (half, messages - half, 0), counts
        with Connection(url) as conn:
            channel = conn.default_channel
            _, waiting, _ = channel.queue_declare(queue, passive=True)
            drained = []
            while (message := channel.basic_get(queue, no_ack=True)) is not None:
                drained.append(message.headers["id"])
        assert waiting == messages and drained == sent, (waiting, len(drained))
        print(
            f"rabbitmq {messages:>7} messages  {elapsed:6.2f} s  {messages / elapsed:>9,.0f} msg/s  counts {counts}  all still queued, in order"
        )
    finally:
        with Connection(url) as conn:
            conn.default_channel.queue_delete(queue)
            conn.default_channel.exchange_delete(queue)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20000, help="Redis queue size")
    parser.add_argument(
        "--amqp-messages", type=int, nargs="+", default=[2000, 5000, 10000], help="RabbitMQ queue sizes"
    )
    parser.add_argument("--redis", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/13"))
    parser.add_argument("--amqp", default=os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//"))
    args = parser.parse_args()
    bench_redis(args.redis, args.messages)
    for messages in args.amqp_messages:
        bench_amqp(args.amqp, messages)


if __name__ == "__main__":
    main()
