"""Settings: ``envelope_*`` in the Celery app's config, else ``KOMBU_ENVELOPE_*`` in the environment.

Read lazily, on the first encode or decode, never at import: the serializer is
loaded by Kombu while Celery itself is still importing. Every error names the
setting and shows a valid value.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from .cache import KeyLimits
from .errors import ConfigurationError

__all__ = ["EnvelopeSettings", "load_settings", "SETTINGS", "env_name"]


def env_name(setting: str) -> str:
    """``envelope_key_uri`` -> ``KOMBU_ENVELOPE_KEY_URI``."""
    return "KOMBU_" + setting.upper()


def _uri_list(setting: str, value: Any) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",")]
    elif isinstance(value, (list, tuple)):
        items = [v.strip() if isinstance(v, str) else v for v in value]
    else:
        raise ConfigurationError(f"{setting} must be a key URI string or a list of them, e.g. 'aws-kms://alias/orders'")
    if not all(isinstance(v, str) and v for v in items):
        raise ConfigurationError(f"{setting} holds an empty or non-string entry: {value!r}")
    return tuple(items)


def _context(setting: str, value: Any) -> dict[str, str] | None:
    if value is None or value == "" or value == {}:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ConfigurationError(
                f"{setting} is not valid JSON: {value!r}; example: {env_name(setting)}='{{\"app\": \"orders\"}}'"
            ) from None
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ConfigurationError(f"{setting} must map strings to strings, e.g. {{'app': 'orders'}}; got {value!r}")
    return dict(value)


def _number(kind: type, minimum: float) -> Callable[[str, Any], Any]:
    def parse(setting: str, value: Any) -> Any:
        try:
            number = kind(value)
        except (TypeError, ValueError):
            raise ConfigurationError(f"{setting} must be a {kind.__name__}, e.g. {setting}=300; got {value!r}") from None
        if number < minimum:
            raise ConfigurationError(f"{setting} must be at least {minimum}; got {value!r}")
        return number

    return parse


def _choice(*choices: str | None) -> Callable[[str, Any], Any]:
    def parse(setting: str, value: Any) -> Any:
        if value in ("", "none", "None"):
            value = None
        if value not in choices:
            raise ConfigurationError(f"{setting} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")
        return value

    return parse


def _boolean(setting: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigurationError(f"{setting} must be true or false; got {value!r}")


def _optional_name(setting: str, value: Any) -> str | None:
    if value in (None, "", False) or str(value).lower() in ("none", "false", "off"):
        return None
    if not isinstance(value, str):
        raise ConfigurationError(f"{setting} must be a queue name or None; got {value!r}")
    return value


def _listen_address(setting: str, value: Any) -> str | None:
    if value in (None, "", False) or str(value).lower() in ("none", "false", "off"):
        return None
    host, _, port = str(value).rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigurationError(f"{setting} must be a port or HOST:PORT, e.g. 9808 or 127.0.0.1:9808; got {value!r}")
    return str(value)


# setting -> (parser, default, one line of documentation)
SETTINGS: dict[str, tuple[Callable[[str, Any], Any], Any, str]] = {
    "envelope_key_uri": (_uri_list, (), "Key URI(s) that wrap new data keys; several = multi-wrap (any one decrypts). Required to encrypt."),
    "envelope_decrypt_key_uris": (_uri_list, (), "Extra key URIs accepted for decryption only (rotation)."),
    "envelope_encryption_context": (_context, None, "Dict of strings bound to every message; must match on decrypt."),
    "envelope_mode": (_choice("envelope", "direct"), "envelope", "'direct' sends each payload to the key service (small, rare, very sensitive data)."),
    "envelope_compression": (_choice(None, "zlib", "zstd"), None, "Compress before encrypting: None, 'zlib' or 'zstd'."),
    "envelope_data_key_max_age": (_number(float, 1), KeyLimits.max_age, "Seconds a data key encrypts before a new one is made."),
    "envelope_data_key_max_messages": (_number(int, 1), KeyLimits.max_messages, "Messages one data key encrypts, across all forked processes."),
    "envelope_data_key_max_bytes": (_number(int, 1), KeyLimits.max_bytes, "Plaintext bytes one data key encrypts, across all forked processes."),
    "envelope_decrypt_cache_ttl": (_number(float, 0), KeyLimits.decrypt_ttl, "Seconds an unwrapped data key stays cached for decryption."),
    "envelope_decrypt_cache_size": (_number(int, 1), KeyLimits.decrypt_capacity, "Unwrapped data keys kept for decryption."),
    "envelope_redact_headers": (_boolean, True, "Replace argsrepr/kwargsrepr (headers, events, logs) and result reprs with a placeholder."),
    "envelope_dead_letter_queue": (_optional_name, "envelope.dead-letter", "Queue that keeps refused messages for inspection; None to drop them."),
    "envelope_stats_log_interval": (_number(float, 0), 300.0, "Seconds between the workers' one-line INFO summary of the counters; 0 turns it off."),
    "envelope_metrics_listen": (_listen_address, None, "PORT or HOST:PORT where workers serve Prometheus metrics (needs prometheus-client); PORT alone listens on all interfaces."),
}


@dataclass(frozen=True)
class EnvelopeSettings:
    """The parsed ``envelope_*`` settings of one Celery app (or the environment)."""

    key_uris: tuple[str, ...] = ()
    decrypt_key_uris: tuple[str, ...] = ()
    encryption_context: dict[str, str] | None = None
    mode: str = "envelope"
    compression: str | None = None
    limits: KeyLimits = field(default_factory=KeyLimits)
    redact_headers: bool = True
    dead_letter_queue: str | None = "envelope.dead-letter"
    stats_log_interval: float = 300.0
    metrics_listen: str | None = None


def load_settings(config: Mapping[str, Any] | Any | None = None, environ: Mapping[str, str] | None = None) -> EnvelopeSettings:
    """Parse settings from ``config`` (a Celery ``app.conf`` or dict), falling back to the environment."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for name, (parse, default, _) in SETTINGS.items():
        raw = config.get(name) if config is not None else None
        if raw is None and parse is _optional_name and config is not None and name in config:
            values[name] = None  # set to None on purpose: off (envelope_dead_letter_queue = None)
            continue
        if raw is None:
            raw = environ.get(env_name(name))
        values[name] = default if raw is None else parse(name, raw)
    return EnvelopeSettings(
        key_uris=values["envelope_key_uri"],
        decrypt_key_uris=values["envelope_decrypt_key_uris"],
        encryption_context=values["envelope_encryption_context"],
        mode=values["envelope_mode"],
        compression=values["envelope_compression"],
        limits=KeyLimits(
            max_age=values["envelope_data_key_max_age"],
            max_messages=values["envelope_data_key_max_messages"],
            max_bytes=values["envelope_data_key_max_bytes"],
            decrypt_ttl=values["envelope_decrypt_cache_ttl"],
            decrypt_capacity=values["envelope_decrypt_cache_size"],
        ),
        redact_headers=values["envelope_redact_headers"],
        dead_letter_queue=values["envelope_dead_letter_queue"],
        stats_log_interval=values["envelope_stats_log_interval"],
        metrics_listen=values["envelope_metrics_listen"],
    )
