"""``kombu-envelope audit``: how many queued messages are encrypted, plaintext or undecodable.

A message is
- *encrypted* if its content type is ``application/x-kombu-envelope`` and its
  header is a valid envelope header (with ``codec``: and it decrypts);
- *plaintext* if it has any other content type (json, pickle, yaml, msgpack...);
- *undecodable* if the broker's record of it cannot be read, or it claims to
  be an envelope and is not one (or, with ``codec``, does not decrypt).

Queues are read with ``kombu_envelope.queues``: every message stays where it was.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, TextIO

from .describe import configured_keys, scheme_name
from .errors import EnvelopeError, InvalidEnvelope
from .queues import QueuedMessage, QueueReader
from .settings import EnvelopeSettings
from .wire import parse_header

__all__ = ["ENVELOPE_CONTENT_TYPE", "QueueReport", "classify", "audit_queue", "Progress"]

ENVELOPE_CONTENT_TYPE = "application/x-kombu-envelope"
ENCRYPTED, PLAINTEXT, UNDECODABLE = "encrypted", "plaintext", "undecodable"


@dataclass
class QueueReport:
    """Counts for one queue; the breakdowns say by what (content type, reason, key)."""

    queue: str
    messages: int = 0
    encrypted: int = 0
    plaintext: int = 0
    undecodable: int = 0
    plaintext_content_types: Counter[str] = field(default_factory=Counter)
    undecodable_reasons: Counter[str] = field(default_factory=Counter)
    keys: Counter[str] = field(default_factory=Counter)

    def add(self, kind: str, detail: str) -> None:
        self.messages += 1
        if kind == ENCRYPTED:
            self.encrypted += 1
            self.keys[detail] += 1
        elif kind == PLAINTEXT:
            self.plaintext += 1
            self.plaintext_content_types[detail] += 1
        else:
            self.undecodable += 1
            self.undecodable_reasons[detail] += 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "queue": self.queue,
            "messages": self.messages,
            "encrypted": self.encrypted,
            "plaintext": self.plaintext,
            "undecodable": self.undecodable,
            "plaintext_content_types": dict(self.plaintext_content_types),
            "undecodable_reasons": dict(self.undecodable_reasons),
            "keys": dict(self.keys),
        }


def classify(
    message: QueuedMessage,
    known_keys: dict[tuple[int, bytes], tuple[str, str]],
    decode: Callable[[bytes], Any] | None = None,
) -> tuple[str, str]:
    """(kind, detail): detail is the keys for encrypted, the content type for plaintext, the reason otherwise."""
    if message.problem:
        return UNDECODABLE, message.problem
    if message.content_type != ENVELOPE_CONTENT_TYPE:
        return PLAINTEXT, message.content_type or "no content type"
    try:
        header = parse_header(message.body)
        if decode is not None:
            decode(message.body)
    except InvalidEnvelope as exc:
        return UNDECODABLE, exc.reason
    except EnvelopeError as exc:  # KeyServiceError, ConfigurationError: the message may be fine
        return UNDECODABLE, f"not decrypted: {exc}"
    names = []
    for key in header.wrapped_keys:
        match = known_keys.get((key.provider_id, key.fingerprint))
        names.append(match[0] if match else f"{scheme_name(key.provider_id)}:{key.fingerprint.hex()}")
    return ENCRYPTED, " + ".join(names)


class Progress:
    """A one-line progress bar on ``stream`` (stderr), redrawn at most 10 times a second."""

    def __init__(self, stream: TextIO, label: str, total: int) -> None:
        self._stream = stream
        self._label = label
        self._total = total
        self._drawn = 0.0

    def update(self, done: int, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._drawn < 0.1:
            return
        self._drawn = now
        total = max(self._total, done, 1)
        filled = int(30 * done / total)
        self._stream.write(f"\r{self._label}: [{'#' * filled}{'.' * (30 - filled)}] {done}/{self._total}")
        self._stream.flush()

    def finish(self, done: int) -> None:
        self.update(done, force=True)
        self._stream.write("\n")
        self._stream.flush()


def audit_queue(
    reader: QueueReader,
    queue: str,
    settings: EnvelopeSettings | None = None,
    decode: Callable[[bytes], Any] | None = None,
    limit: int | None = None,
    progress: bool | None = None,
    stream: TextIO | None = None,
) -> QueueReport:
    """Count ``queue``'s messages by kind, leaving them in the queue.

    ``progress``: draw a progress bar on ``stream`` (default stderr); None
    means only when ``stream`` is a terminal. ``decode``: also decrypt each
    envelope (needs key access).
    """
    stream = stream or sys.stderr
    show = stream.isatty() if progress is None else progress
    known = configured_keys(settings)
    report = QueueReport(queue)
    total = reader.count(queue)
    if limit is not None:
        total = min(total, limit)
    bar = Progress(stream, queue, total) if show else None
    for message in reader.read(queue, limit):
        report.add(*classify(message, known, decode))
        if bar:
            bar.update(report.messages)
    if bar:
        bar.finish(report.messages)
    return report
