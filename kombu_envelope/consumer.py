"""``EnvelopeConsumer``: a Celery worker consumer that loses no message it cannot decrypt.

Enable it by configuration alone::

    worker_consumer = "kombu_envelope.consumer:EnvelopeConsumer"

Celery's own consumer acknowledges a message whose body fails to decode and
drops it (its result stays PENDING forever), whatever ``task_acks_late``
says, and rejects a refused content type without requeueing it. This
subclass sorts every such failure into one of two kinds:

* Wait: the key service is unreachable, throttled, answered 5xx or timed out
  (``errors.is_transient``), or the worker's own configuration is broken. The
  message stays unacknowledged in this worker. The first message under a
  data key the worker has not decrypted lately is decrypted in a thread (a
  probe), so a slow or unreachable key service never blocks the worker's
  event loop; messages under the same data key wait for the probe without
  calling the key service. While the service is down the probe is repeated
  after a delay that doubles per failed attempt (``retry_initial_delay`` up
  to ``retry_max_delay``); when it decrypts, they all run. The prefetch window
  is widened for waiting messages (up to ``widen_prefetch_limit``), so
  messages whose data keys are cached keep flowing; past the limit the window
  fills and the consumer pauses by itself. A message held longer than
  ``max_hold`` (and never longer than half the broker's
  ``visibility_timeout``) is handed back to the broker with a requeue, so no
  broker redelivers it behind our back.
* Refuse: tampered or truncated envelope, unknown key, wrong encryption
  context, unsupported version, a key service refusing for good, a content
  type outside ``accept_content``. One log line names the task id and the
  reason (never body bytes, plaintext or key material), the intact message is
  published to ``envelope_dead_letter_queue`` with the reason in the
  ``x-envelope-dead-letter-reason`` header, and only then acknowledged.

Prefork pool children decode the body a second time. They read the data key
the worker process just unwrapped from the host-wide cache, so they rarely
need the key service; when one still fails (cache entry expired or evicted in
between), the worker sorts that failure the same way: a message not yet
acknowledged (``task_acks_late``) waits; an acknowledged one is published
again to its queue with ``x-envelope-retry-at`` / ``x-envelope-retries``
headers, and held until then by the worker that receives it.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, ClassVar

from billiard.einfo import ExceptionWithTraceback
from celery import signals
from celery.utils.imports import symbol_by_name
from celery.utils.log import get_logger
from celery.worker.consumer import Consumer
from celery.worker.consumer.mingle import Mingle
from celery.worker.state import task_ready
from kombu import Queue
from kombu.exceptions import ContentDisallowed, DecodeError, EncodeError

from . import wire
from .errors import ConfigurationError, EnvelopeError, InvalidEnvelope, KeyServiceError, is_transient
from .serializer import CONTENT_TYPE, codec_for_app

__all__ = [
    "REASON_HEADER",
    "REFUSED_AT_HEADER",
    "REFUSED_BY_HEADER",
    "RETRIES_HEADER",
    "RETRY_AT_HEADER",
    "SOURCE_HEADER",
    "EnvelopeConsumer",
    "refusal_reason",
]

logger = get_logger(__name__)

#: Headers added to a dead-lettered copy: why, where it was headed ("exchange routing-key"), when, by whom.
REASON_HEADER = "x-envelope-dead-letter-reason"
SOURCE_HEADER = "x-envelope-dead-letter-source"
REFUSED_AT_HEADER = "x-envelope-dead-lettered-at"
REFUSED_BY_HEADER = "x-envelope-dead-lettered-by"
#: Headers of a copy sent back to its queue after a pool child failed to decrypt it.
RETRIES_HEADER = "x-envelope-retries"
RETRY_AT_HEADER = "x-envelope-retry-at"  # Unix time before which workers hold it

# Waiting messages are grouped by the header of their envelope (one data
# key); these two keys group the rest.
_NOT_AN_ENVELOPE = b""
_DEAD_LETTER_PENDING = b"dead-letter"  # an envelope header starts with 0x01, never with this

# Seconds between checks of whether a probe thread has finished.
_PROBE_POLL = 0.1
# Publishing blocks the worker's event loop: give up after about 3 s and keep the message.
_PUBLISH_RETRY = {"max_retries": 3, "interval_start": 0, "interval_step": 0.5, "interval_max": 1.0}


@dataclass
class _Held:
    """A message this worker keeps unacknowledged; ``widened``: it got its own prefetch slot."""

    message: Any
    since: float
    widened: bool


@dataclass
class _Waiting:
    """Messages waiting for one data key after ``attempts`` failed tries, the next try's timer, and its probe."""

    attempts: int
    held: deque[_Held] = field(default_factory=deque)
    timer_entry: Any = None
    probe: threading.Thread | None = None
    probe_error: BaseException | None = None


class EnvelopeConsumer(Consumer):
    """Celery's worker consumer, plus waiting out key-service outages and dead-lettering refused messages."""

    #: Seconds before the first retry of a data key; doubles per failed attempt.
    retry_initial_delay: ClassVar[float] = 1.0
    #: Longest delay between two tries of one data key.
    retry_max_delay: ClassVar[float] = 30.0
    #: Seconds a waiting message is held before it goes back to the broker.
    max_hold: ClassVar[float] = 300.0
    #: Waiting messages that get a prefetch slot of their own; beyond this the consumer pauses.
    widen_prefetch_limit: ClassVar[int] = 1000
    #: Data keys remembered as decryptable (for at most ``envelope_decrypt_cache_ttl``).
    known_keys_limit: ClassVar[int] = 4096

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.envelope_counts: Counter[str] = Counter()
        self._waiting: dict[bytes, _Waiting] = {}
        # Headers whose data key decrypted here lately -> until when that is trusted.
        self._known: dict[bytes, float] = {}
        # key -> (attempts, when released): a key failing again soon after (a pool
        # child failed, or the service flaps) continues its backoff instead of restarting it.
        self._released: dict[bytes, tuple[int, float]] = {}
        self._delayed: dict[int, tuple[_Held, Any]] = {}  # id(held) -> (held, timer entry)
        self._widened = 0
        self._lock = threading.RLock()  # timers of non-event-loop pools run on their own thread
        self._celery_handler: Callable[[Any], Any] | None = None
        self._request_classes: dict[type, type] = {}
        super().__init__(*args, **kwargs)
        for step in self.blueprint.order:
            if isinstance(step, Mingle):
                _let_mingle_skip_outages(step)
        _register_inspect_command()

    # -- Celery hooks ----------------------------------------------------

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Callable[[Any], Any]:
        self._celery_handler = super().create_task_handler(*args, **kwargs)

        def on_task_received(message: Any) -> Any:
            return self._dispatch(message, honour_retry_at=True)

        return on_task_received

    def update_strategies(self) -> None:
        # Requests are built by each task's strategy from task.Request; ours
        # adds handling of a decode failure in a pool child. Worker process only.
        for task in self.app.tasks.values():
            task.Request = self._request_class(task.Request)
        super().update_strategies()

    def on_decode_error(self, message: Any, exc: BaseException) -> None:
        """Called by Celery instead of logging the body and acknowledging the message into nothing."""
        if _should_wait(exc):
            self._wait(message, _data_key_id(message), exc)
        else:
            self._refuse(message, refusal_reason(exc, message))

    def on_invalid_task(self, body: Any, message: Any, exc: BaseException) -> None:
        if not isinstance(exc, ContentDisallowed):
            return super().on_invalid_task(body, message, exc)
        self._refuse(message, refusal_reason(exc, message))
        signals.task_rejected.send(sender=self, message=message, exc=exc)
        return None

    def on_close(self) -> None:
        # The connection is gone: delivery tags are void and the broker
        # redelivers every unacknowledged message, as for Celery's prefetched ones.
        with self._lock:
            entries = [w.timer_entry for w in self._waiting.values()] + [e for _, e in self._delayed.values()]
            self._waiting.clear()
            self._delayed.clear()
            self._released.clear()
            self._widened = 0
        for entry in entries:
            if entry is not None:
                entry.cancel()
        super().on_close()

    def envelope_report(self) -> dict[str, Any]:
        """Counters and current waits, as answered to ``celery inspect envelope_reliability``."""
        with self._lock:
            waiting = sum(len(w.held) for w in self._waiting.values())
            return {"counts": dict(self.envelope_counts), "waiting": waiting, "delayed": len(self._delayed)}

    # -- receiving -------------------------------------------------------

    def _dispatch(self, message: Any, honour_retry_at: bool = False) -> Any:
        """Hand ``message`` to Celery, unless it must wait: not due yet, or its data key not known to decrypt.

        The first message under a data key this worker has not decrypted
        lately is decoded in a thread (a probe), so a slow or unreachable key
        service never blocks the worker's event loop; messages under the same
        key wait for that probe without calling the key service.
        """
        if honour_retry_at:
            headers = message.headers
            if isinstance(headers, dict) and RETRY_AT_HEADER in headers and self._hold_until(message, headers[RETRY_AT_HEADER]):
                return None
        key = _data_key_id(message)
        if key != _NOT_AN_ENVELOPE or self._waiting:
            with self._lock:
                waiting = self._waiting.get(key)
                if waiting is not None:
                    waiting.held.append(self._hold(message))
                    return None
                if key != _NOT_AN_ENVELOPE and not self._is_known(key) and self._decrypt_ttl() > 0:
                    waiting = self._waiting[key] = _Waiting(0, deque([self._hold(message)]))
                    self._start_probe(key, waiting)
                    return None
        assert self._celery_handler is not None
        return self._celery_handler(message)

    def _dispatch_released(self, handler: Callable[[Any], Any], message: Any) -> None:
        """Hand a held message to ``handler``; called by a timer, so it must not raise and strand the others."""
        try:
            handler(message)
        except Exception:  # Celery's handler logs its own errors; this is the last resort
            logger.exception("kombu-envelope: handling a released message failed; it stays unacknowledged")

    def _is_known(self, key: bytes) -> bool:
        until = self._known.get(key)
        return until is not None and until > time.monotonic()

    def _remember(self, key: bytes) -> None:
        known = self._known
        while len(known) >= self.known_keys_limit:
            known.pop(next(iter(known)))
        # A margin, so Celery's decode still finds the key in the codec's cache.
        known[key] = time.monotonic() + 0.9 * self._decrypt_ttl()

    def _decrypt_ttl(self) -> float:
        """How long a decrypted data key stays cached (``envelope_decrypt_cache_ttl``); 0 if unknown."""
        try:
            return float(codec_for_app(self.app)[1].limits.decrypt_ttl)
        except ConfigurationError:
            return 0.0

    # -- waiting ---------------------------------------------------------

    def _wait(self, message: Any, key: bytes, exc: BaseException | str) -> None:
        """Keep ``message`` unacknowledged; try its data key again after a backoff delay."""
        with self._lock:
            self._known.pop(key, None)
            waiting = self._waiting.get(key)
            if waiting is not None:  # another message of this data key already failed
                waiting.held.append(self._hold(message))
                return
            attempts, released_at = self._released.pop(key, (0, 0.0))
            if time.monotonic() - released_at > self.retry_max_delay:
                attempts = 0
            waiting = self._waiting[key] = _Waiting(attempts + 1, deque([self._hold(message)]))
            delay = self._schedule_retry(key, waiting)
        self._log_wait(message, key, exc, delay, waiting.attempts)

    def _schedule_retry(self, key: bytes, waiting: _Waiting) -> float:
        delay = min(self.retry_initial_delay * 2 ** min(waiting.attempts - 1, 32), self.retry_max_delay)
        waiting.timer_entry = self.timer.call_after(delay, self._retry, (key,))
        self.envelope_counts["waits"] += 1
        return delay

    def _log_wait(self, message: Any, key: bytes, exc: BaseException | str, delay: float, attempts: int) -> None:
        task_id, task_name = _task_identity(message)
        logger.warning(
            "kombu-envelope: task %s (%s) waits, unacknowledged, for data key %s: %s; next try in %.3g s (attempt %d)",
            task_id, task_name, _key_label(key), _reason_text(exc), delay, attempts,
        )

    def _retry(self, key: bytes) -> None:
        """Timer: probe the data key again (messages whose dead-lettering failed go back to Celery's path)."""
        with self._lock:
            waiting = self._waiting.get(key)
            if waiting is None:
                return
            waiting.held = self._give_back_expired(waiting.held)
            retry_in_celery = not waiting.held or key in (_NOT_AN_ENVELOPE, _DEAD_LETTER_PENDING)
            if retry_in_celery:
                del self._waiting[key]
            else:
                self._start_probe(key, waiting)
        if retry_in_celery:
            self._release(waiting.held)

    def _start_probe(self, key: bytes, waiting: _Waiting) -> None:
        """Decode the first waiting message of ``key`` in a thread; ``_probe_finished`` polls it from the timer."""
        waiting.probe = threading.Thread(
            target=_probe, args=(waiting, waiting.held[0].message), name="kombu-envelope-probe", daemon=True
        )
        waiting.probe.start()
        self.timer.call_after(_PROBE_POLL, self._probe_finished, (key, waiting))

    def _probe_finished(self, key: bytes, waiting: _Waiting) -> None:
        """Timer: when the probe is done, wait longer if the key service is still down, else release them all."""
        with self._lock:
            if self._waiting.get(key) is not waiting:  # the connection was closed meanwhile
                return
            assert waiting.probe is not None
            if waiting.probe.is_alive():
                self.timer.call_after(_PROBE_POLL, self._probe_finished, (key, waiting))
                return
            error, waiting.probe, waiting.probe_error = waiting.probe_error, None, None
            still_down = error is not None and _should_wait(error)
            if still_down:
                waiting.attempts += 1
                delay = self._schedule_retry(key, waiting)
                message = waiting.held[0].message
            else:
                del self._waiting[key]
                if error is None:
                    self._remember(key)
                now = time.monotonic()
                for old in [k for k, (_, at) in self._released.items() if now - at > self.retry_max_delay]:
                    del self._released[old]
                if waiting.attempts:
                    self._released[key] = (waiting.attempts, now)
        if still_down:
            assert error is not None
            self._log_wait(message, key, error, delay, waiting.attempts)
            return
        if waiting.attempts:
            logger.info(
                "kombu-envelope: data key %s is usable again after %d failed attempt(s); releasing %d waiting message(s)",
                _key_label(key), waiting.attempts, len(waiting.held),
            )
        self._release(waiting.held)  # a refused probe is refused again, with its reason, on Celery's path

    def _release(self, held: Iterable[_Held]) -> None:
        """Give held messages to Celery itself: a probe's body is decoded already, the others' keys are cached
        (or they fail on Celery's path and are sorted there: refused, or waiting again)."""
        assert self._celery_handler is not None
        for item in list(held):
            with self._lock:
                self._unhold(item)
            self._dispatch_released(self._celery_handler, item.message)

    def _give_back_expired(self, held: deque[_Held]) -> deque[_Held]:
        """Requeue messages held for too long (a broker could redeliver them elsewhere); return the rest."""
        limit = self._max_hold()
        now = time.monotonic()
        keep: deque[_Held] = deque()
        for item in held:
            if now - item.since < limit:
                keep.append(item)
                continue
            self._unhold(item)
            item.message.reject_log_error(logger, self.connection_errors, requeue=True)
            self.envelope_counts["given_back"] += 1
        if len(keep) < len(held):
            logger.info(
                "kombu-envelope: %d message(s) waited %.0f s and went back to the broker", len(held) - len(keep), limit
            )
        return keep

    def _hold_until(self, message: Any, retry_at: Any) -> bool:
        """Hold a copy a pool child failed to decrypt until its ``x-envelope-retry-at`` time."""
        try:
            delay = min(float(retry_at) - time.time(), self.retry_max_delay)
        except (TypeError, ValueError):
            return False
        if delay <= 0:
            return False
        with self._lock:
            held = self._hold(message)
            entry = self.timer.call_after(delay, self._end_delay, (held,))
            self._delayed[id(held)] = (held, entry)
        return True

    def _end_delay(self, held: _Held) -> None:
        with self._lock:
            if self._delayed.pop(id(held), None) is None:
                return
            self._unhold(held)
        self._dispatch_released(self._dispatch, held.message)

    def _hold(self, message: Any) -> _Held:
        widened = self._widened < self.widen_prefetch_limit
        if widened:
            self._widened += 1
            self.qos.increment_eventually()
        return _Held(message, time.monotonic(), widened)

    def _unhold(self, held: _Held) -> None:
        if held.widened:
            held.widened = False
            self._widened -= 1
            self.qos.decrement_eventually()

    def _max_hold(self) -> float:
        options = self.app.conf.broker_transport_options or {}
        visibility = options.get("visibility_timeout")
        return min(self.max_hold, float(visibility) / 2) if visibility else self.max_hold

    # -- refusing --------------------------------------------------------

    def _refuse(self, message: Any, reason: str) -> None:
        """Log once, publish the intact message to the dead-letter queue, then acknowledge it."""
        task_id, task_name = _task_identity(message)
        try:
            queue = codec_for_app(self.app)[1].dead_letter_queue
        except ConfigurationError as exc:
            self._wait(message, _DEAD_LETTER_PENDING, exc)
            return
        if queue is None:
            logger.error(
                "kombu-envelope: refused task %s (%s): %s; dropped (envelope_dead_letter_queue is None)",
                task_id, task_name, reason,
            )
            self.envelope_counts["dropped"] += 1
        else:
            try:
                self._publish_dead_letter(message, reason, queue)
            except Exception as exc:  # broker unreachable or refusing: keep the message and try again later
                self._wait(message, _DEAD_LETTER_PENDING, f"refused ({reason}), but the dead-letter queue {queue!r} is unreachable: {exc!r}")
                return
            logger.error(
                "kombu-envelope: refused task %s (%s): %s; moved to dead-letter queue %r",
                task_id, task_name, reason, queue,
            )
            self.envelope_counts["dead_lettered"] += 1
        if not message.acknowledged:
            message.ack_log_error(logger, self.connection_errors)

    def _publish_dead_letter(self, message: Any, reason: str, queue: str) -> None:
        info = message.delivery_info or {}
        extra = {
            REASON_HEADER: reason,
            SOURCE_HEADER: f"{info.get('exchange') or ''} {info.get('routing_key') or ''}",
            REFUSED_AT_HEADER: datetime.now(timezone.utc).isoformat(),
            REFUSED_BY_HEADER: self.hostname,
        }
        self._publish(message, "", queue, extra, declare=[Queue(queue, routing_key=queue, durable=True)])

    def _publish(self, message: Any, exchange: str, routing_key: str, extra_headers: dict[str, Any], declare: list[Queue] | None = None) -> None:
        """Publish a copy of ``message``: same body bytes, content type and headers, plus ``extra_headers``."""
        headers = dict(message.headers) if isinstance(message.headers, dict) else {}
        compression = headers.pop("compression", None)  # Kombu decompressed the body; compress it again
        headers.update(extra_headers)
        properties = message.properties or {}
        options = {k: properties[k] for k in ("correlation_id", "reply_to", "priority") if properties.get(k) is not None}
        content_type = message.content_type or "application/data"
        with self.app.producer_or_acquire() as producer:
            producer.publish(
                message.body,
                exchange=exchange,
                routing_key=routing_key,
                headers=headers,
                content_type=content_type,
                content_encoding=message.content_encoding or "binary",
                compression=compression,
                delivery_mode=2,
                declare=declare or [],
                retry=True,
                retry_policy=_PUBLISH_RETRY,
                **options,
            )

    # -- decode failures in pool children ----------------------------------

    def _request_class(self, base: Any) -> type:
        base = symbol_by_name(base)
        if issubclass(base, _EnvelopeRequest):
            return base
        cls = self._request_classes.get(base)
        if cls is None:
            cls = self._request_classes[base] = type(
                f"Envelope{base.__name__}", (_EnvelopeRequest, base), {"envelope_consumer": self}
            )
        return cls

    def child_decode_failed(self, message: Any, exc: BaseException) -> None:
        """A pool child could not decrypt a message the worker process had decrypted."""
        if not _should_wait(exc):
            self._refuse(message, refusal_reason(exc, message))
        elif not message.acknowledged:  # task_acks_late: the broker still holds it
            self._wait(message, _data_key_id(message), exc)
        else:
            self._send_back(message, exc)

    def _send_back(self, message: Any, exc: BaseException) -> None:
        """Publish an acknowledged message again, due after a backoff delay (its copy counts the retries)."""
        task_id, task_name = _task_identity(message)
        headers = message.headers if isinstance(message.headers, dict) else {}
        try:
            retries = int(headers.get(RETRIES_HEADER) or 0) + 1
        except (TypeError, ValueError):
            retries = 1
        delay = min(self.retry_initial_delay * 2 ** min(retries - 1, 32), self.retry_max_delay)
        info = message.delivery_info or {}
        try:
            self._publish(
                message,
                info.get("exchange") or "",
                info.get("routing_key") or "",
                {RETRIES_HEADER: retries, RETRY_AT_HEADER: time.time() + delay},
            )
        except Exception as publish_error:
            self.envelope_counts["lost"] += 1
            logger.critical(
                "kombu-envelope: task %s (%s) LOST: a pool process could not decrypt it (%s) after it was "
                "acknowledged, and sending it back to its queue failed: %r. Set task_acks_late=True to keep such "
                "messages in the broker",
                task_id, task_name, _reason_text(exc), publish_error,
            )
            return
        self.envelope_counts["sent_back"] += 1
        logger.warning(
            "kombu-envelope: task %s (%s) could not be decrypted in a pool process: %s; sent back to its queue, "
            "due in %.3g s (retry %d)",
            task_id, task_name, _reason_text(exc), delay, retries,
        )


class _EnvelopeRequest:
    """Mixed into each task's Request class: a pool child's decode failure goes to the consumer, not FAILURE."""

    __slots__ = ()
    envelope_consumer: ClassVar[EnvelopeConsumer]

    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> Any:
        exc = exc_info.exception
        if isinstance(exc, ExceptionWithTraceback):
            exc = exc.exc
        # return_ok is False only for errors raised outside the task's trace:
        # here, the child's loads() of the body.
        if not return_ok and isinstance(exc, (DecodeError, ContentDisallowed, EnvelopeError)):
            task_ready(self)
            self.envelope_consumer.child_decode_failed(self._message, exc)  # type: ignore[attr-defined]
            return None
        return super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)  # type: ignore[misc]


# -- classifying ---------------------------------------------------------


def _probe(waiting: _Waiting, message: Any) -> None:
    """Thread: decode ``message`` (Kombu caches the result on it); keep the error for ``_probe_finished``."""
    try:
        message.decode()
    except Exception as exc:  # classified on the event loop by _probe_finished
        waiting.probe_error = exc


def _inner(exc: BaseException) -> BaseException:
    """The serializer's own exception inside Kombu's DecodeError or EncodeError."""
    if isinstance(exc, (DecodeError, EncodeError)) and exc.args and isinstance(exc.args[0], BaseException):
        return exc.args[0]
    return exc


def _should_wait(exc: BaseException) -> bool:
    """Transient key-service failures wait; so does a broken worker configuration (fixing it needs a restart)."""
    return is_transient(exc) or isinstance(_inner(exc), ConfigurationError)


def refusal_reason(exc: BaseException, message: Any) -> str:
    """A short reason for logs and the dead-letter header; never body bytes, plaintext or key material."""
    inner = _inner(exc)
    if isinstance(inner, ContentDisallowed):
        return f"content type {message.content_type!r} is not in accept_content (plaintext is refused)"
    if isinstance(inner, InvalidEnvelope):
        return inner.reason
    if isinstance(inner, KeyServiceError):
        return str(inner)
    return f"the body could not be decoded ({type(inner).__name__})"


def _reason_text(exc: BaseException | str) -> str:
    if isinstance(exc, str):
        return exc
    inner = _inner(exc)
    return str(inner) if isinstance(inner, EnvelopeError) else type(inner).__name__


def _data_key_id(message: Any) -> bytes:
    """The envelope header of ``message`` (names its data key), or ``_NOT_AN_ENVELOPE``."""
    body = message.body
    if isinstance(body, (bytearray, memoryview)):
        body = bytes(body)
    if message.content_type != CONTENT_TYPE or not isinstance(body, bytes):
        return _NOT_AN_ENVELOPE
    try:
        return bytes(body[: wire.header_size(body)])
    except InvalidEnvelope:
        return _NOT_AN_ENVELOPE


def _key_label(key: bytes) -> str:
    if key in (_NOT_AN_ENVELOPE, _DEAD_LETTER_PENDING):
        return "(none)"
    return hashlib.sha256(key).hexdigest()[:12]


def _task_identity(message: Any) -> tuple[str, str]:
    """Task id and name from the plaintext headers (protocol 2), one line each, bounded."""
    headers = message.headers if isinstance(message.headers, dict) else {}

    def clean(value: Any) -> str:
        return "".join(c if c.isprintable() else "?" for c in str(value))[:200]

    return clean(headers.get("id", "unknown")), clean(headers.get("task", "unknown"))


def _let_mingle_skip_outages(step: Mingle) -> None:
    """Start without mingle when the key service is down, instead of dying.

    Mingle's hello to the other workers goes through the control mailbox,
    which uses ``task_serializer``: encrypting it needs a data key, and Celery
    treats the failure as unrecoverable. Mingle only syncs revoked task ids
    and logical clocks, so a worker that starts during an outage goes on
    without it (as with ``--without-mingle``).
    """
    sync = step.sync

    def sync_unless_key_service_down(c: Any) -> None:
        try:
            sync(c)
        except (EncodeError, DecodeError) as exc:
            if not _should_wait(exc):
                raise
            logger.warning(
                "kombu-envelope: mingle skipped (revoked ids and clocks not synced with other workers): %s",
                _reason_text(exc),
            )

    step.sync = sync_unless_key_service_down  # type: ignore[method-assign]


def _register_inspect_command() -> None:
    """``celery inspect envelope_reliability``: each worker's refusal and wait counters."""
    from celery.worker.control import Panel, inspect_command

    if "envelope_reliability" in Panel.meta:
        return

    @inspect_command()
    def envelope_reliability(state: Any) -> dict[str, Any]:
        """kombu-envelope: messages dead-lettered, dropped, waiting and sent back by this worker."""
        consumer = state.consumer
        return consumer.envelope_report() if isinstance(consumer, EnvelopeConsumer) else {}
