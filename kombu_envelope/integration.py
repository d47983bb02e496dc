"""Celery integration: keep task arguments and results out of headers, events and logs.

Celery copies ``saferepr(args)`` into the ``argsrepr``/``kwargsrepr`` headers
(plaintext in the broker) and into task-sent/received events, and the worker
logs and emits ``saferepr(result)``. With an encrypted body these copies would
leak everything the encryption protects, so when an app's ``task_serializer``
(or ``result_serializer``) is ``envelope`` and ``envelope_redact_headers`` is
on, they become ``REDACTED``.

This module imports only the standard library at import time: it is loaded by
the serializer entry point, while Celery may itself be half imported. The
hooks go in once ``celery.app.amqp`` has finished loading, which is before any
app can send a message.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
from types import ModuleType
from typing import Any, Callable

__all__ = ["REDACTED", "install_when_celery_loads", "install"]

#: Placeholder for argument and result reprs. Non-empty on purpose: Celery
#: falls back to repr(args) when argsrepr is empty (celery/app/trace.py).
REDACTED = "'<encrypted>'"

_WATCHED = "celery.app.amqp"
# Remote-control commands are registered here; ``celery inspect`` checks names against it in the client too.
_CONTROL = "celery.worker.control"
_installed = False
_install_lock = threading.Lock()


def install_when_celery_loads() -> None:
    """Install the hooks now if Celery is loaded, else right after ``celery.app.amqp`` (and ``celery.worker.control``) load."""
    for name, ready, hook in ((_WATCHED, "AMQP", install), (_CONTROL, "inspect_command", _register_inspect_command)):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, ready):
            hook()
        elif not any(isinstance(f, _CeleryImportWatcher) and f.name == name for f in sys.meta_path):
            sys.meta_path.insert(0, _CeleryImportWatcher(name, hook))


class _CeleryImportWatcher(importlib.abc.MetaPathFinder):
    """Runs ``hook()`` once module ``name`` has executed; finds nothing itself."""

    def __init__(self, name: str, hook: Callable[[], None]) -> None:
        self.name = name
        self.hook = hook

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_then_hook(module: ModuleType) -> None:
            exec_module(module)
            self.hook()

        loader.exec_module = exec_then_hook  # type: ignore[method-assign]
        return spec


def install() -> None:
    """Wrap header construction and connect the worker hooks. Idempotent."""
    global _installed
    with _install_lock:
        if _installed:
            return
        _installed = True
    from celery import signals
    from celery.app import amqp

    _wrap_as_task_v2(amqp.AMQP)
    signals.worker_init.connect(_on_worker_init, weak=False)
    signals.worker_process_init.connect(_on_worker_init, weak=False)
    from .metrics import connect_worker_signals

    connect_worker_signals()  # plaintext-task counter (migration), summary log line, Prometheus


def _register_inspect_command() -> None:
    """``celery inspect envelope_stats``: each worker answers with kombu_envelope.stats()."""
    from .counters import register_inspect_command
    from .metrics import register_inspect_command as register_received_command

    register_inspect_command()
    register_received_command()  # celery inspect envelope_received


def _settings(app: Any) -> Any:
    from .serializer import codec_for_app

    return codec_for_app(app)[1]


def _wrap_as_task_v2(amqp_class: type) -> None:
    # Celery offers no setting that runs before the headers and the task-sent
    # event are built; passing argsrepr/kwargsrepr here is exactly what a
    # caller of apply_async(argsrepr=..., kwargsrepr=...) does, for every call.
    original = amqp_class.as_task_v2  # type: ignore[attr-defined]
    if getattr(original, "__wrapped_by_envelope__", False):
        return

    def as_task_v2(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self.app.conf.task_serializer == "envelope" and _settings(self.app).redact_headers:
            if kwargs.get("argsrepr") is None:
                kwargs["argsrepr"] = REDACTED
            if kwargs.get("kwargsrepr") is None:
                kwargs["kwargsrepr"] = REDACTED
        return original(self, *args, **kwargs)

    as_task_v2.__wrapped_by_envelope__ = True  # type: ignore[attr-defined]
    as_task_v2.__wrapped__ = original  # type: ignore[attr-defined]
    as_task_v2.__doc__ = original.__doc__
    amqp_class.as_task_v2 = as_task_v2  # type: ignore[attr-defined]


def _redacted_repr(obj: Any, *args: Any, **kwargs: Any) -> str:
    return REDACTED


def _on_worker_init(sender: Any = None, **kwargs: Any) -> None:
    """In worker processes: keep return values out of the success log and task-succeeded events."""
    from celery import current_app

    app = getattr(sender, "app", None) or current_app
    if app.conf.result_serializer != "envelope" or not _settings(app).redact_headers:
        return
    from celery.app import trace
    from celery.worker import request

    # Both modules use saferepr only for result reprs (LOG_SUCCESS and the
    # task-succeeded event); argument reprs come from the redacted headers.
    trace.saferepr = _redacted_repr  # type: ignore[attr-defined]
    request.saferepr = _redacted_repr  # type: ignore[attr-defined]
