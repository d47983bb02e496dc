"""kombu-envelope: encrypted Celery/Kombu messages by configuration alone.

Set ``task_serializer = result_serializer = 'envelope'``,
``accept_content = ['envelope']`` and ``envelope_key_uri``. See README.md.

This package is imported by Kombu's serializer entry point while Celery may
be half imported, so nothing here is imported eagerly: names resolve on first
use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "EnvelopeCodec",
    "EnvelopeError",
    "ConfigurationError",
    "InvalidEnvelope",
    "UnknownKey",
    "KeyServiceError",
    "CONTENT_TYPE",
    "stats",
]

if TYPE_CHECKING:
    from .codec import EnvelopeCodec
    from .errors import ConfigurationError, EnvelopeError, InvalidEnvelope, KeyServiceError, UnknownKey
    from .counters import stats
    from .serializer import CONTENT_TYPE

_LAZY = {
    "EnvelopeCodec": "kombu_envelope.codec",
    "EnvelopeError": "kombu_envelope.errors",
    "ConfigurationError": "kombu_envelope.errors",
    "InvalidEnvelope": "kombu_envelope.errors",
    "UnknownKey": "kombu_envelope.errors",
    "KeyServiceError": "kombu_envelope.errors",
    "CONTENT_TYPE": "kombu_envelope.serializer",
    "stats": "kombu_envelope.counters",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kombu_envelope' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
