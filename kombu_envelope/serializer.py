"""The ``envelope`` Kombu serializer: the ``kombu.serializers`` entry point.

Kombu imports this module while ``kombu.serialization`` is only partly
initialised, often in the middle of ``import celery``. So this module imports
nothing heavy: Celery, the key providers and the configuration are touched on
the first encode or decode, and a failure there is a clear error for that
message, never an ImportError that breaks every process importing Kombu.
"""

from __future__ import annotations

import sys
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .codec import EnvelopeCodec
    from .settings import EnvelopeSettings

__all__ = ["NAME", "CONTENT_TYPE", "CONTENT_ENCODING", "encode", "decode", "register_args", "codec_for_app", "reset"]

NAME = "envelope"
CONTENT_TYPE = "application/x-kombu-envelope"
# Raw bytes: Kombu's virtual transports base64 every body themselves.
CONTENT_ENCODING = "binary"

_lock = threading.Lock()
_codecs: dict[int, tuple[Any, EnvelopeCodec, EnvelopeSettings]] = {}
_last: tuple[Any, EnvelopeCodec] = (object(), None)  # type: ignore[assignment]


def _current_app() -> Any:
    """The Celery app whose settings apply, or None in a process that never imported Celery."""
    state = sys.modules.get("celery._state")
    return state.get_current_app() if state is not None else None


def codec_for_app(app: Any) -> tuple[EnvelopeCodec, EnvelopeSettings]:
    """The codec and settings of ``app`` (None: the environment), built once per app."""
    entry = _codecs.get(id(app))
    if entry is None or entry[0] is not app:
        from .codec import EnvelopeCodec
        from .settings import load_settings

        with _lock:
            settings = load_settings(app.conf if app is not None else None)
            entry = (app, EnvelopeCodec.from_settings(settings), settings)
            _codecs[id(app)] = entry
    return entry[1], entry[2]


def _codec() -> EnvelopeCodec:
    global _last
    app = _current_app()
    owner, codec = _last
    if owner is not app or codec is None:
        codec = codec_for_app(app)[0]
        _last = (app, codec)
    return codec


def encode(obj: Any) -> bytes:
    """Kombu encoder: any Kombu-json-serializable value -> envelope bytes."""
    return _codec().encode(obj)


def decode(data: bytes) -> Any:
    """Kombu decoder: envelope bytes -> value. Raises InvalidEnvelope or KeyServiceError."""
    return _codec().decode(data)


def reset() -> None:
    """Forget the codecs built so far, so changed settings take effect (tests, reconfiguration)."""
    global _last
    with _lock:
        _codecs.clear()
        _last = (object(), None)  # type: ignore[assignment]


#: What the ``kombu.serializers`` entry point resolves to.
register_args = (encode, decode, CONTENT_TYPE, CONTENT_ENCODING)

# Hook Celery's header redaction in as soon as Celery itself has loaded, so
# even the first message a process sends carries no argsrepr/kwargsrepr.
from .integration import install_when_celery_loads  # noqa: E402  (stdlib-only module)

install_when_celery_loads()

# Map the host-wide data-key cache now, before Celery's pool (or any pre-fork
# server) forks, so every child shares it. Stdlib only: no key material yet.
from .cache import default_cache  # noqa: E402

default_cache()
