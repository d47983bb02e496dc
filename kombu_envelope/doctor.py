"""``kombu-envelope doctor -A proj``: what a security reviewer would check in a Celery app's configuration.

Each check returns findings with a severity (error, warning, ok, info), one
sentence saying what is wrong and why it matters, and a one-line fix. The key
check makes real calls to the key service: a data key is generated and
unwrapped through every configured key URI, and the latency is reported.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from .errors import EnvelopeError
from .settings import EnvelopeSettings, load_settings

__all__ = ["Finding", "run_checks", "ERROR", "WARNING", "OK", "INFO", "ENVELOPE_CONSUMER", "SLOW_KEY_SERVICE_MS"]

ERROR, WARNING, OK, INFO = "error", "warning", "ok", "info"
ENVELOPE = "envelope"
ENVELOPE_CONTENT_TYPE = "application/x-kombu-envelope"
ENVELOPE_CONSUMER = "kombu_envelope.consumer:EnvelopeConsumer"
#: Content types whose decoders can run code or build arbitrary objects.
UNSAFE_CONTENT_TYPES = {"application/x-python-serialize": "pickle", "application/x-yaml": "yaml"}
#: A round trip slower than this makes first messages (and cache misses) visibly slow.
SLOW_KEY_SERVICE_MS = 250.0
#: AES-GCM usage limits for one key (draft-irtf-cfrg-aead-limits, advantage <= 2^-57; NIST SP 800-38D).
GCM_MAX_BYTES = 1 << 39
GCM_MAX_MESSAGES = 1 << 32
DAY = 86400.0


@dataclass(frozen=True)
class Finding:
    """One result of one check."""

    check: str
    severity: str
    message: str
    fix: str = ""


Check = Callable[[Any, EnvelopeSettings], Iterable[Finding]]


def run_checks(app: Any, key_check: bool = True) -> list[Finding]:
    """Run every check against ``app`` (a Celery app); ``key_check=False`` skips the key-service calls."""
    try:
        settings = load_settings(app.conf)
    except EnvelopeError as exc:
        return [Finding("settings", ERROR, str(exc), "correct the setting named above")]
    checks: list[Check] = [
        _plugin,
        _task_serializer,
        _result_serializer,
        _accept_content,
        _redaction,
        _result_extended,
        _events,
        _dead_letter_queue,
        _worker_consumer,
        _cache_limits,
        _encryption_context,
    ]
    if key_check:
        checks.append(_keys)
    findings: list[Finding] = []
    for check in checks:
        findings.extend(check(app, settings))
    return findings


# -- serializers and content types ------------------------------------------


def _plugin(app: Any, settings: EnvelopeSettings) -> Iterable[Finding]:
    from kombu.serialization import registry

    if registry.name_to_type.get(ENVELOPE) == ENVELOPE_CONTENT_TYPE:
        yield Finding("plugin", OK, "the envelope serializer is registered with Kombu")
    else:
        yield Finding(
            "plugin",
            ERROR,
            "Kombu has no 'envelope' serializer in this environment",
            "pip install kombu-envelope (in the environment that runs Celery)",
        )


def _task_serializer(app: Any, settings: EnvelopeSettings) -> Iterable[Finding]:
    value = app.conf.task_serializer
    if value == ENVELOPE:
        yield Finding("task_serializer", OK, "task arguments are encrypted")
    else:
        yield Finding(
            "task_serializer",
            ERROR,
            f"task_serializer is {value!r}: task arguments travel and wait in the broker in plaintext",
            "task_serializer = 'envelope'",
        )


def _result_serializer(app: Any, settings: EnvelopeSettings) -> Iterable[Finding]:
    value = app.conf.result_serializer
    if value == ENVELOPE:
        yield Finding("result_serializer", OK, "task results are encrypted")
    else:
        yield Finding(
            "result_serializer",
            ERROR,
            f"result_serializer is {value!r}: task results are stored in the result backend in plaintext",
            "result_serializer = 'envelope'",
        )


def _accept_findings(setting: str, accept: Iterable[str]) -> Iterable[Finding]:
    from kombu.serialization import registry

    fix = f"{setting} = ['envelope']"
    findings = []
    types = set()
    for name in accept:  # names ('json') or content types ('application/json'), as Kombu takes them
        if "/" in name:
            types.add(name)
        elif name in registry.name_to_type:
            types.add(registry.name_to_type[name])
        else:
            message = f"{setting} names {name!r}, which no installed serializer provides: workers will not start"
            findings.append(Finding(setting, ERROR, message, fix))
    unsafe = sorted(name for ctype, name in UNSAFE_CONTENT_TYPES.items() if ctype in types)
    others = sorted(types - {ENVELOPE_CONTENT_TYPE} - set(UNSAFE_CONTENT_TYPES))
    if ENVELOPE_CONTENT_TYPE not in types:
        findings.append(
            Finding(setting, ERROR, f"{setting} does not include 'envelope': encrypted messages are refused", fix)
        )
    if unsafe:
        message = f"{setting} allows {', '.join(unsafe)}: anyone who can write to the broker can make workers run code, encrypted or not"
        findings.append(Finding(setting, ERROR, message, fix))
    elif others and ENVELOPE_CONTENT_TYPE in types:
        message = (
            f"{setting} also allows {', '.join(others)}: migration mode, plaintext messages are still accepted "
            "(see docs/migration.md for when it is safe to refuse them)"
        )
        findings.append(Finding(setting, WARNING, message, fix))
    return findings or [Finding(setting, OK, f"{setting} accepts only envelope messages")]


def _accept_content(app: Any, settings: EnvelopeSettings) -> Iterable[Finding]:
    yield from _accept_findings("accept_content", app.conf.accept_content)
    if app.conf.result_accept_content is not None:
        yield from _accept_findings("result_accept_content", app.conf.result_accept_content)


# -- what leaves the encrypted body: headers, events, result backend ----------


def _redaction(app: Any, settings: EnvelopeSettings) -> Iterable[Finding]:
    if not settings.redact_headers:
        yield Finding(
            "redaction",
            ERROR,
            "envelope_redact_headers is off: argsrepr/kwargsrepr headers, events and worker logs show task arguments and results",
            "envelope_redact_headers = True",
        )
        return
    # Build (not send) a task message and look for the probe in what is not encrypted.
    probe = f"doctor-probe-{uuid.uuid4().hex}"
    message = app.amqp.as_task_v2(
        str(uuid.uuid4()), "kombu_envelope.doctor.probe", args=(probe,), kwargs={"probe": probe}, create_sent_event=True
    )
    if probe in repr(message.headers) or probe in repr(message.sent_event):
        yield Finding(
            "redaction",
            ERROR,
            "task arguments appear in the message headers (argsrepr/kwargsrepr) and task-sent events",
            "task_serializer = 'envelope' (redaction applies to envelope apps only)",
        )
    else:
        yield Finding("redaction", OK, "argsrepr/kwargsrepr headers and task-sent events carry a placeholder")


def _result_extended(app: Any, settings: EnvelopeSettings) -> Iterable[Finding]:
    if not app.conf.result_extended:
        yield Finding("result_extended", OK, "result_extended is off: task arguments are not stored with results")
    elif app.conf.result_serializer == ENVELOPE:
        yield Finding(
            "result_extended",
            OK,
            "result_extended stores task arguments with results, encrypted by the envelope result serializer",
        )
    else:
        yield Finding(
            "result_extended",
            ERROR,
            f"result_extended stores task arguments in the result backend, serialized with {app.conf.result_serializer!r} (plaintext)",
            "result_serializer = 'envelope' (or result_extended = False)",
        )


def _events(app: Any, settings: EnvelopeSettings) -> Iterable[Finding]:
    enabled = [name for name in ("task_send_sent_event", "worker_send_task_events") if app.conf.get(name)]
    if not enabled:
        yield Finding("events", OK, "task events are off (note: `celery worker -E` turns them on at run time)")
    elif app.conf.event_serializer == ENVELOPE:
        yield Finding("events", OK, f"{' and '.join(enabled)} on; events are encrypted (event_serializer = 'envelope')")
    else:
        yield Finding(
            "events",
            WARNING,
            f"{' and '.join(enabled)} on with event_serializer {app.conf.event_serializer!r}: task names, ids, "
            "exception messages and tracebacks are readable in the broker (argument and result reprs are redacted)",
            "event_serializer = 'envelope' (monitors then need key access) or turn the events off",
        )


# -- failure handling ---------------------------------------------------------


def _dead_letter_queue(app: Any, settings: EnvelopeSettings) -> Iterable[Finding]:
    if settings.dead_letter_queue:
        yield Finding("dead_letter_queue", OK, f"refused messages are kept in {settings.dead_letter_queue!r}")
    else:
        yield Finding(
            "dead_letter_queue",
            WARNING,
            "envelope_dead_letter_queue is None: tampered, undecryptable and plaintext messages are dropped without a trace",
            "envelope_dead_letter_queue = 'envelope.dead-letter'",
        )


def _worker_consumer(app: Any, settings: EnvelopeSettings) -> Iterable[Finding]:
    from kombu.utils.imports import symbol_by_name

    value = app.conf.worker_consumer
    name = value if isinstance(value, str) else f"{value.__module__}:{value.__qualname__}"
    fix = f"worker_consumer = '{ENVELOPE_CONSUMER}'"
    try:
        cls = symbol_by_name(value)
        envelope_consumer = symbol_by_name(ENVELOPE_CONSUMER)
    except (ImportError, AttributeError, ValueError) as exc:
        yield Finding(
            "worker_consumer",
            ERROR,
            f"worker_consumer {name!r} cannot be imported ({exc}): workers will not start",
            fix,
        )
        return
    if isinstance(cls, type) and issubclass(cls, envelope_consumer):
        yield Finding("worker_consumer", OK, "key-service outages requeue messages; refused messages are dead-lettered")
    else:
        yield Finding(
            "worker_consumer",
            ERROR,
            f"worker_consumer is {name!r}: when the key service is unreachable, Celery acks and drops every task it cannot decrypt",
            fix,
        )


# -- data-key cache -------------------------------------------------------------


def _cache_limits(app: Any, settings: EnvelopeSettings) -> Iterable[Finding]:
    limits = settings.limits
    problems = []
    if limits.max_age > DAY:
        problems.append(
            (
                "envelope_data_key_max_age",
                f"is {limits.max_age:g} s: one stolen data key opens more than a day of messages",
                "300",
            )
        )
    if limits.max_age < 10:
        problems.append(
            (
                "envelope_data_key_max_age",
                f"is {limits.max_age:g} s: every process calls the key service that often (cost, quota)",
                "300",
            )
        )
    if limits.max_messages > GCM_MAX_MESSAGES:
        problems.append(
            (
                "envelope_data_key_max_messages",
                f"is {limits.max_messages}: above 2**32 messages per AES-GCM key",
                str(1 << 24),
            )
        )
    if limits.max_bytes > GCM_MAX_BYTES:
        problems.append(
            (
                "envelope_data_key_max_bytes",
                f"is {limits.max_bytes}: above AES-GCM's safe 2**39 bytes per key",
                str(1 << 36),
            )
        )
    if limits.decrypt_ttl == 0:
        problems.append(
            (
                "envelope_decrypt_cache_ttl",
                "is 0: every message is unwrapped by the key service (latency, cost, quota)",
                "600",
            )
        )
    if limits.decrypt_ttl > DAY:
        problems.append(
            (
                "envelope_decrypt_cache_ttl",
                f"is {limits.decrypt_ttl:g} s: a key revoked in the key service keeps decrypting for more than a day",
                "600",
            )
        )
    if limits.decrypt_capacity < 16:
        problems.append(
            (
                "envelope_decrypt_cache_size",
                f"is {limits.decrypt_capacity}: data keys in use at once (rotation, several producers) will evict each other",
                "1024",
            )
        )
    for setting, text, good in problems:
        yield Finding("cache_limits", WARNING, f"{setting} {text}", f"{setting} = {good}")
    if not problems:
        yield Finding(
            "cache_limits",
            OK,
            f"data keys encrypt for at most {limits.max_age:g} s, {limits.max_messages} messages, {limits.max_bytes} bytes; "
            f"unwrapped keys are kept {limits.decrypt_ttl:g} s, {limits.decrypt_capacity} at most",
        )


def _encryption_context(app: Any, settings: EnvelopeSettings) -> Iterable[Finding]:
    if settings.encryption_context:
        yield Finding("encryption_context", OK, f"messages are bound to {settings.encryption_context}")
    else:
        yield Finding(
            "encryption_context",
            INFO,
            "no envelope_encryption_context: a message can be replayed into another app that shares the key",
            "envelope_encryption_context = {'app': 'orders'}",
        )


# -- key service ----------------------------------------------------------------


def _keys(app: Any, settings: EnvelopeSettings) -> Iterable[Finding]:
    from .providers import provider_for_uri

    if not settings.key_uris:
        yield Finding(
            "key_uri",
            ERROR,
            "envelope_key_uri is not set: nothing can be encrypted",
            "envelope_key_uri = 'aws-kms://alias/orders' (or KOMBU_ENVELOPE_KEY_URI)",
        )
        return
    context = settings.encryption_context or {}
    for setting, uris in (
        ("envelope_key_uri", settings.key_uris),
        ("envelope_decrypt_key_uris", settings.decrypt_key_uris),
    ):
        for uri in uris:
            try:
                provider = provider_for_uri(uri, setting)
                if settings.mode == "direct" and setting == "envelope_key_uri":
                    finding = _round_trip_direct(provider, context)
                else:
                    finding = _round_trip(provider, context, setting)
            except Exception as exc:  # any failure of a key service is a finding, not a crash
                # A key kept for decryption only may have lost its encrypt permission on purpose.
                severity = ERROR if setting == "envelope_key_uri" else WARNING
                finding = Finding(
                    "key_uri",
                    severity,
                    f"{uri} ({setting}): {_one_line(exc)}",
                    "check the URI, network access and this identity's permissions (docs/troubleshooting.md)",
                )
            yield finding
            if uri.startswith("local://"):
                yield Finding(
                    "key_uri",
                    WARNING,
                    f"{uri} is a local key file: anyone who can read it reads every message, and its use is not audited",
                    "use a key service: aws-kms://, vault://, azure-kv:// or gcp-kms://",
                )


def _round_trip(provider: Any, context: dict[str, str], setting: str) -> Finding:
    started = time.perf_counter()
    data_key, wrapped = provider.generate_data_key(context)
    generated = time.perf_counter()
    unwrapped = provider.unwrap_data_key(wrapped, context)
    done = time.perf_counter()
    if unwrapped != data_key:
        return Finding(
            "key_uri",
            ERROR,
            f"{provider.uri}: unwrapping returned a different data key",
            "check the key URI names one key",
        )
    return _latency_finding(provider.uri, setting, "generate", generated - started, "unwrap", done - generated)


def _round_trip_direct(provider: Any, context: dict[str, str]) -> Finding:
    probe = os.urandom(32)
    started = time.perf_counter()
    ciphertext = provider.encrypt(probe, context)
    encrypted = time.perf_counter()
    plaintext = provider.decrypt(ciphertext, context)
    done = time.perf_counter()
    if plaintext != probe:
        return Finding(
            "key_uri", ERROR, f"{provider.uri}: decrypting returned different bytes", "check the key URI names one key"
        )
    return _latency_finding(
        provider.uri, "envelope_key_uri", "encrypt", encrypted - started, "decrypt", done - encrypted
    )


def _latency_finding(uri: str, setting: str, first: str, first_s: float, second: str, second_s: float) -> Finding:
    text = f"{uri} ({setting}): {first} {first_s * 1000:.1f} ms, {second} {second_s * 1000:.1f} ms"
    if max(first_s, second_s) * 1000 > SLOW_KEY_SERVICE_MS:
        return Finding(
            "key_uri",
            WARNING,
            f"{text}: slow; first messages and cache misses wait this long",
            "use a key in the workers' own region",
        )
    return Finding("key_uri", OK, text)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, EnvelopeError) else f"{type(exc).__name__}: {text}"
