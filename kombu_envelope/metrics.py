"""Observability for operators: a plaintext counter for migrations, a periodic summary log line, Prometheus.

- Every task a worker receives is counted by its content type
  (``received_by_content_type()``): during a migration from json, the
  count of plaintext tasks stops growing once every producer encrypts, which
  says when ``accept_content = ['envelope']`` is safe (docs/migration.md).
- Workers log the counters of ``kombu_envelope.counters.stats()`` in one INFO
  line every ``envelope_stats_log_interval`` seconds.
- With ``envelope_metrics_listen`` set and ``prometheus-client`` installed,
  workers serve the same counters to Prometheus; other processes (a web
  server that publishes tasks) can call ``register_collector()`` on their own
  registry.

Celery's signals are connected by ``kombu_envelope.integration``; this
module imports only the standard library until a worker starts.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Iterator, Mapping

__all__ = [
    "count_received",
    "received_by_content_type",
    "summary_line",
    "register_collector",
    "start_exporter",
    "connect_worker_signals",
    "register_inspect_command",
]

logger = logging.getLogger("kombu_envelope.metrics")

ENVELOPE_CONTENT_TYPE = "application/x-kombu-envelope"  # = serializer.CONTENT_TYPE, without importing it

_received: dict[str, int] = {}
_last_plaintext: list[float] = []  # wall-clock time of the last non-envelope task, once there was one
_received_lock = threading.Lock()
_started = False


def count_received(content_type: str | None) -> None:
    """Count one task received by this process (a worker's MainProcess receives them all)."""
    name = content_type or "unknown"
    with _received_lock:
        _received[name] = _received.get(name, 0) + 1
        if name != ENVELOPE_CONTENT_TYPE:
            _last_plaintext[:] = [time.time()]


def received_by_content_type() -> dict[str, Any]:
    """``{"by_content_type": {...}, "plaintext": N, "last_plaintext_at": unix time or None}``."""
    with _received_lock:
        counts = dict(_received)
        last = _last_plaintext[0] if _last_plaintext else None
    plaintext = sum(n for ctype, n in counts.items() if ctype != ENVELOPE_CONTENT_TYPE)
    return {"by_content_type": counts, "plaintext": plaintext, "last_plaintext_at": last}


def _ms(microseconds: int, calls: int) -> str:
    return f"{microseconds / calls / 1000:.1f} ms" if calls else "-"


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024:
            break
    return f"{value:.1f} {unit}"


def summary_line(stats: Mapping[str, Any], received: Mapping[str, Any]) -> str:
    """One log line from ``counters.stats()`` (host totals) and ``received_by_content_type()``."""
    host = stats["host"]
    gen, unwrap = host["key_service"]["generate"], host["key_service"]["unwrap"]
    cache = host["decrypt_cache"]
    lookups = cache["hits"] + cache["misses"]
    hit_rate = f"{100 * cache['hits'] / lookups:.1f}%" if lookups else "-"
    last = received["last_plaintext_at"]
    last_text = "never" if last is None else time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(last))
    return (
        f"kombu-envelope stats ({stats['host_processes']} processes): "
        f"encrypted {host['encrypted']['messages']} msgs/{_size(host['encrypted']['bytes'])}, "
        f"decrypted {host['decrypted']['messages']} msgs/{_size(host['decrypted']['bytes'])}; "
        f"key service generate {gen['ok']} ok {gen['transient_error']} transient {gen['error']} failed "
        f"avg {_ms(gen['microseconds'], gen['ok'] + gen['transient_error'] + gen['error'])}, "
        f"unwrap {unwrap['ok']} ok {unwrap['transient_error']} transient {unwrap['error']} failed "
        f"avg {_ms(unwrap['microseconds'], unwrap['ok'] + unwrap['transient_error'] + unwrap['error'])}; "
        f"decrypt cache hits {hit_rate}; data keys created {host['data_keys']['created'] + host['data_keys']['created_ahead']}; "
        f"tasks received {sum(received['by_content_type'].values())}, plaintext {received['plaintext']} (last: {last_text})"
    )


def log_summary() -> None:
    from .counters import stats

    logger.info("%s", summary_line(stats(), received_by_content_type()))


# -- Prometheus ---------------------------------------------------------------


class _Collector:
    """A prometheus_client collector that reads the host totals at scrape time."""

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        from .counters import stats

        snapshot = stats()
        host = dict(snapshot["host"])
        calls = CounterMetricFamily(
            "kombu_envelope_key_service_calls",
            "Key-service calls by this host's process tree, by operation and outcome.",
            labels=["operation", "outcome"],
        )
        seconds = CounterMetricFamily(
            "kombu_envelope_key_service_seconds", "Time spent in key-service calls.", labels=["operation"]
        )
        for operation, counts in host.pop("key_service").items():
            for outcome in ("ok", "transient_error", "error"):
                calls.add_metric([operation, outcome], counts[outcome])
            seconds.add_metric([operation], counts["microseconds"] / 1e6)
        yield calls
        yield seconds
        for group, counts in host.items():
            for leaf, value in counts.items():
                yield CounterMetricFamily(
                    f"kombu_envelope_{group}_{leaf}", f"kombu-envelope counter {group}.{leaf}.", value=value
                )
        received = CounterMetricFamily(
            "kombu_envelope_received_tasks",
            "Tasks this worker received, by content type (anything but application/x-kombu-envelope is plaintext).",
            labels=["content_type"],
        )
        for content_type, count in received_by_content_type()["by_content_type"].items():
            received.add_metric([content_type], count)
        yield received
        yield GaugeMetricFamily(
            "kombu_envelope_processes",
            "Processes whose counters are in the host totals.",
            value=snapshot["host_processes"],
        )


def register_collector(registry: Any = None) -> Any:
    """Add kombu-envelope's counters to ``registry`` (default: prometheus_client's global REGISTRY)."""
    try:
        from prometheus_client import REGISTRY
    except ImportError:
        from .errors import ConfigurationError

        raise ConfigurationError(
            "Prometheus metrics need prometheus-client: pip install 'kombu-envelope[prometheus]' "
            "(or unset envelope_metrics_listen)"
        ) from None
    collector = _Collector()
    (registry or REGISTRY).register(collector)
    return collector


def start_exporter(listen: str, registry: Any = None) -> None:
    """Serve ``registry`` (with kombu-envelope's counters added) over HTTP at ``PORT`` or ``HOST:PORT``."""
    host, _, port = listen.rpartition(":")
    register_collector(registry)
    from prometheus_client import REGISTRY, start_http_server

    start_http_server(int(port), addr=host or "0.0.0.0", registry=registry or REGISTRY)
    logger.info("kombu-envelope: Prometheus metrics on http://%s:%s/metrics", host or "0.0.0.0", port)


# -- Celery worker wiring -------------------------------------------------------


def connect_worker_signals() -> None:
    """Count received tasks and start the summary and the exporter when a worker is ready."""
    from celery import signals

    signals.task_received.connect(_on_task_received, weak=False)
    signals.worker_ready.connect(_on_worker_ready, weak=False)


def _on_task_received(sender: Any = None, request: Any = None, **kwargs: Any) -> None:
    message = getattr(request, "message", None)
    count_received(getattr(message, "content_type", None))


def _on_worker_ready(sender: Any = None, **kwargs: Any) -> None:
    """Runs in the worker's MainProcess (sender: its Consumer), after the pool has started."""
    global _started
    if _started:  # the consumer reports ready again after a broker reconnection
        return
    _started = True
    from .settings import load_settings

    settings = load_settings(sender.app.conf)
    if settings.stats_log_interval:
        # The worker's own timer runs in its event loop: no thread to worry about at fork.
        sender.timer.call_repeatedly(settings.stats_log_interval, log_summary)
    if settings.metrics_listen:
        try:
            start_exporter(settings.metrics_listen)
        except Exception as exc:  # metrics must never stop a worker from working
            logger.error("kombu-envelope: cannot serve Prometheus metrics on %s: %s", settings.metrics_listen, exc)


def register_inspect_command() -> None:
    """``celery -A proj inspect envelope_received``: each worker's received-task counts."""
    from celery.worker.control import Panel, inspect_command

    if "envelope_received" in Panel.meta:
        return

    @inspect_command()
    def envelope_received(state: Any) -> dict[str, Any]:
        """Tasks received by content type; plaintext ones and when the last one came (kombu-envelope)."""
        return received_by_content_type()
