"""Read the messages waiting in a broker queue without consuming them (Redis and RabbitMQ/AMQP).

Redis: Kombu keeps a queue as Redis lists (one per priority level), read
here with LRANGE, which changes nothing.

AMQP 0-9-1 has no way to browse a classic or quorum queue, so each message
is fetched with ``basic.get`` without acknowledgement and all of them are
given back with ``basic.recover(requeue=True)`` when the scan ends (or the
channel closes: the broker requeues unacknowledged messages itself if this
process dies). RabbitMQ puts requeued messages of a classic queue back in
their original positions; they are marked ``redelivered``. A quorum queue
changes their order and adds one to each ``x-delivery-count`` (see
docs/operations.md). While a scan runs, the messages it holds are not
delivered to consumers.

Messages already delivered to a worker (prefetched, unacknowledged) are not
in the queue and are not seen.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Protocol
from urllib.parse import urlparse

from .errors import EnvelopeError

__all__ = ["QueuedMessage", "QueueReader", "BrokerError", "open_reader", "parse_kombu_record"]

#: Kombu's Redis transport: separator between a queue name and its priority, and the priority levels it uses.
_REDIS_PRIORITY_SEP = "\x06\x16"
_REDIS_PRIORITIES = range(10)
_REDIS_BINDING_PREFIX = "_kombu.binding."
_REDIS_CHUNK = 500
#: Seconds without progress after which requeueing is taken as done (consumers are taking the messages).
_REQUEUE_STALL = 3.0
#: AMQP messages held per channel during a scan (more for long queues, to stay under this many channels).
_AMQP_RUN = 200
_AMQP_MAX_CHANNELS = 1000


class BrokerError(EnvelopeError):
    """The broker cannot be reached or the queue does not exist."""


@dataclass(frozen=True)
class QueuedMessage:
    """One message as the broker holds it; ``position`` 0 is the next to be delivered."""

    position: int
    content_type: str | None
    content_encoding: str | None
    body: bytes
    headers: Mapping[str, Any] = field(default_factory=dict)
    #: Why the broker's record of the message could not be read (then body is empty).
    problem: str | None = None


class QueueReader(Protocol):
    def count(self, queue: str) -> int:
        """Messages waiting in ``queue``."""

    def read(self, queue: str, limit: int | None = None) -> Iterator[QueuedMessage]:
        """The waiting messages in delivery order, leaving them in the queue."""

    def queues(self) -> list[str]:
        """Queue names the broker can list (Redis: Kombu's bindings); empty if it cannot."""


@contextmanager
def open_reader(broker_url: str) -> Iterator[QueueReader]:
    """A reader for ``broker_url`` (``redis://``, ``rediss://``, ``amqp://``, ``amqps://``, ``pyamqp://``)."""
    scheme = urlparse(broker_url).scheme
    reader: _RedisReader | _AmqpReader
    if scheme in ("redis", "rediss"):
        reader = _RedisReader(broker_url)
    elif scheme in ("amqp", "amqps", "pyamqp"):
        reader = _AmqpReader(broker_url)
    else:
        raise BrokerError(
            f"cannot read queues of a {scheme or 'scheme-less'}:// broker; "
            "supported: redis://, rediss://, amqp://, amqps:// (e.g. --broker redis://localhost:6379/0)"
        )
    try:
        yield reader
    finally:
        reader.close()


def parse_kombu_record(raw: bytes | str, position: int = 0) -> QueuedMessage:
    """A message as Kombu's virtual transports (Redis, ...) store it: JSON with a base64 body."""
    try:
        record = json.loads(raw)
        body = record["body"]
        properties = record.get("properties") or {}
        if properties.get("body_encoding") == "base64":
            data = base64.b64decode(body, validate=True)
        else:
            data = body.encode("utf-8") if isinstance(body, str) else bytes(body)
        return QueuedMessage(
            position, record.get("content-type"), record.get("content-encoding"), data, record.get("headers") or {}
        )
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
        return QueuedMessage(
            position, None, None, b"", {}, problem=f"not a Kombu message record ({type(exc).__name__})"
        )


class _RedisReader:
    def __init__(self, url: str) -> None:
        import redis

        self._client = redis.Redis.from_url(url, socket_connect_timeout=5)
        self._url = url
        try:
            self._client.ping()
        except redis.RedisError as exc:
            raise BrokerError(f"cannot reach the Redis broker {_safe(url)}: {exc}") from None

    def close(self) -> None:
        self._client.close()

    def _lists(self, queue: str) -> list[tuple[bytes, int]]:
        """(Redis key, length) of each non-empty priority list of ``queue``, in Kombu's delivery order."""
        keys = [queue] + [f"{queue}{_REDIS_PRIORITY_SEP}{p}" for p in _REDIS_PRIORITIES if p]
        pipe = self._client.pipeline(transaction=False)
        for key in keys:
            pipe.llen(key)
        return [(key.encode(), n) for key, n in zip(keys, pipe.execute()) if n]

    def count(self, queue: str) -> int:
        return sum(n for _, n in self._lists(queue))

    def read(self, queue: str, limit: int | None = None) -> Iterator[QueuedMessage]:
        position = 0
        for key, length in self._lists(queue):
            # Kombu pushes on the left and pops on the right: the rightmost is delivered next.
            for end in range(length, 0, -_REDIS_CHUNK):
                chunk = self._client.lrange(key, max(end - _REDIS_CHUNK, 0), end - 1)
                for raw in reversed(chunk):
                    if limit is not None and position >= limit:
                        return
                    yield parse_kombu_record(raw, position)
                    position += 1

    def queues(self) -> list[str]:
        names = set()
        for binding in self._client.scan_iter(match=_REDIS_BINDING_PREFIX + "*", count=1000):
            for member in self._client.smembers(binding):
                names.add(member.decode("utf-8", "replace").split(_REDIS_PRIORITY_SEP)[-1])
        return sorted(names)


class _AmqpReader:
    def __init__(self, url: str) -> None:
        from kombu import Connection

        self._connection = Connection(url, connect_timeout=5)
        try:
            self._connection.connect()
        except Exception as exc:  # socket errors, authentication: all mean "cannot read"
            raise BrokerError(f"cannot reach the AMQP broker {_safe(url)}: {exc}") from None
        self._url = url

    def close(self) -> None:
        self._connection.release()

    def _channel(self) -> Any:
        channel = self._connection.connection.channel()
        channel.auto_decode = False  # keep bodies as the bytes that were sent
        return channel

    def count(self, queue: str) -> int:
        from amqp.exceptions import NotFound

        channel = self._channel()
        try:
            _, count, _ = channel.queue_declare(queue, passive=True)
        except NotFound:
            raise BrokerError(f"queue {queue!r} does not exist on {_safe(self._url)}") from None
        channel.close()
        return int(count)

    def read(self, queue: str, limit: int | None = None) -> Iterator[QueuedMessage]:
        waiting = self.count(queue)
        wanted = waiting if limit is None else min(limit, waiting)
        # Messages are held in runs, one channel per run, and the runs are
        # given back last first: each run then goes in front of the ones
        # already back, which RabbitMQ does quickly. One channel holding them
        # all is given back in quadratic time (3.10, classic queue: 20,000
        # persistent messages took minutes; in runs of 200, under a second).
        run = max(_AMQP_RUN, -(-wanted // _AMQP_MAX_CHANNELS))
        channels: list[Any] = []
        try:
            for position in range(wanted):
                if position % run == 0:
                    channels.append(self._channel())
                message = channels[-1].basic_get(queue, no_ack=False)
                if message is None:  # consumed by someone else meanwhile
                    return
                properties = message.properties
                body = message.body if isinstance(message.body, bytes) else bytes(message.body, "utf-8")
                yield QueuedMessage(
                    position,
                    properties.get("content_type"),
                    properties.get("content_encoding"),
                    body,
                    properties.get("application_headers") or {},
                )
        finally:
            self._give_back(channels)
            self._wait_requeued(queue, waiting)

    @staticmethod
    def _give_back(channels: list[Any]) -> None:
        """Requeue every held message in place, the last run first (basic.recover, waiting for recover-ok)."""
        from amqp import spec

        for channel in reversed(channels):
            # A channel the broker closed after an error has had its messages requeued already.
            if channel.is_open:
                channel.send_method(spec.Basic.Recover, "b", (True,), wait=[spec.Basic.RecoverOk])
                channel.close()

    def _wait_requeued(self, queue: str, waiting: int) -> None:
        """Return once ``queue`` holds ``waiting`` messages again, or its count stops rising.

        RabbitMQ answers recover-ok before every message is back in the
        queue. Consumers taking them meanwhile keep the count below
        ``waiting``, hence the second condition.
        """
        last, since = -1, time.monotonic()
        while True:
            count = self.count(queue)
            if count >= waiting:
                return
            if count > last:
                last, since = count, time.monotonic()
            elif time.monotonic() - since > _REQUEUE_STALL:
                return
            time.sleep(0.05)

    def queues(self) -> list[str]:
        return []


def _safe(url: str) -> str:
    """``url`` without its password, for messages."""
    parsed = urlparse(url)
    if parsed.password:
        return url.replace(f":{parsed.password}@", ":***@", 1)
    return url
