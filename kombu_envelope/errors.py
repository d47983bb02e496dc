"""The exceptions kombu-envelope raises, and nothing else.

Callers (and the worker consumer that decides between retry and dead-letter)
need exactly two questions answered: is the message itself bad, or is the key
service unavailable right now? ``InvalidEnvelope`` answers the first (one
exception for every forgery, like Fernet's ``InvalidToken``); ``transient`` on
``KeyServiceError`` answers the second.
"""

from __future__ import annotations

__all__ = [
    "EnvelopeError",
    "ConfigurationError",
    "InvalidEnvelope",
    "UnknownKey",
    "KeyServiceError",
    "is_transient",
]


class EnvelopeError(Exception):
    """Base class of every error raised by kombu-envelope."""


class ConfigurationError(EnvelopeError, ValueError):
    """A setting is missing or malformed. The message names the setting and shows a valid value."""


class InvalidEnvelope(EnvelopeError):
    """The message is not a valid envelope: truncated, tampered, wrong context or unsupported format.

    A permanent failure: retrying cannot help, so the message is dead-lettered.
    ``reason`` is a short phrase for logs and counters; it never contains
    plaintext or key material.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UnknownKey(InvalidEnvelope):
    """The message was wrapped under keys this process is not configured to use for decryption."""


class KeyServiceError(EnvelopeError):
    """A key service refused or failed a request.

    ``transient`` is true for outages, throttling, timeouts and 5xx answers
    (retry later: the message is kept), false for access denied, unknown or
    disabled keys and wrong encryption context (the message is dead-lettered).
    """

    def __init__(self, key_uri: str, reason: str, *, transient: bool) -> None:
        kind = "temporarily unavailable" if transient else "refused the request"
        super().__init__(f"key service for {key_uri} {kind}: {reason}")
        self.key_uri = key_uri
        self.reason = reason
        self.transient = transient

    def __reduce__(self) -> tuple[object, ...]:
        # A prefork pool child sends its decode error to the worker by pickle;
        # the default (cls(*args)) would fail there and lose the message.
        return (_rebuild_key_service_error, (type(self), self.key_uri, self.reason, self.transient))


def _rebuild_key_service_error(cls: type[KeyServiceError], key_uri: str, reason: str, transient: bool) -> KeyServiceError:
    return cls(key_uri, reason, transient=transient)


def is_transient(exc: BaseException) -> bool:
    """True if ``exc`` (or the error it wraps, as Kombu's DecodeError does) is worth retrying."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, KeyServiceError):
            return exc.transient
        if isinstance(exc, EnvelopeError):
            return False
        # kombu.exceptions.DecodeError(original) keeps the original as args[0].
        inner = exc.args[0] if exc.args and isinstance(exc.args[0], BaseException) else None
        exc = inner or exc.__cause__ or exc.__context__
        seen += 1
    return False
