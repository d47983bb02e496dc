"""What an envelope says about itself, read without any key: for ``inspect`` and ``audit``.

Everything here comes from ``wire.parse_header``: nothing is authenticated,
nothing is decrypted and no key service is called. Wrapped keys are matched
to the configured key URIs by their 4-byte fingerprint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import wire
from .providers import PROVIDER_IDS, key_fingerprint
from .settings import EnvelopeSettings

__all__ = ["KeyRef", "Description", "configured_keys", "describe", "scheme_name"]


def scheme_name(provider_id: int) -> str:
    for scheme, pid in PROVIDER_IDS.items():
        if pid == provider_id:
            return scheme
    return f"provider#{provider_id}"


def configured_keys(settings: EnvelopeSettings | None) -> dict[tuple[int, bytes], tuple[str, str]]:
    """(provider id, fingerprint) -> (key URI, setting that names it)."""
    found: dict[tuple[int, bytes], tuple[str, str]] = {}
    if settings is None:
        return found
    for setting, uris in (
        ("envelope_key_uri", settings.key_uris),
        ("envelope_decrypt_key_uris", settings.decrypt_key_uris),
    ):
        for uri in uris:
            scheme = uri.partition("://")[0]
            if scheme in PROVIDER_IDS:
                found.setdefault((PROVIDER_IDS[scheme], key_fingerprint(uri)), (uri, setting))
    return found


@dataclass(frozen=True)
class KeyRef:
    """One wrapped key of a message, and the configured key URI it names, if any."""

    scheme: str
    fingerprint: str  # hex
    wrapped_size: int
    uri: str | None
    setting: str | None

    def label(self) -> str:
        return self.uri or f"{self.scheme} key {self.fingerprint} (not configured here)"


@dataclass(frozen=True)
class Description:
    """An envelope's header fields and sizes."""

    version: int
    algorithm: str
    compression: str | None
    context: dict[str, str] | None
    keys: tuple[KeyRef, ...]
    total_size: int
    header_size: int
    nonce_size: int
    ciphertext_size: int  # without the tag
    tag_size: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.version,
            "algorithm": self.algorithm,
            "compression": self.compression,
            "encryption_context": self.context,
            "wrapped_keys": [
                {
                    "scheme": k.scheme,
                    "fingerprint": k.fingerprint,
                    "wrapped_size": k.wrapped_size,
                    "key_uri": k.uri,
                    "setting": k.setting,
                }
                for k in self.keys
            ],
            "sizes": {
                "total": self.total_size,
                "header": self.header_size,
                "nonce": self.nonce_size,
                "ciphertext": self.ciphertext_size,
                "tag": self.tag_size,
            },
        }


def describe(body: bytes, settings: EnvelopeSettings | None = None) -> Description:
    """Parse ``body``'s header (raises InvalidEnvelope) and name its keys from ``settings``."""
    header = wire.parse_header(body)
    known = configured_keys(settings)
    keys = tuple(
        KeyRef(
            scheme_name(k.provider_id),
            k.fingerprint.hex(),
            len(k.wrapped),
            *known.get((k.provider_id, k.fingerprint), (None, None)),
        )
        for k in header.wrapped_keys
    )
    if header.algorithm == wire.ALG_AES256_GCM:
        nonce, tag = wire.NONCE_SIZE, wire.TAG_SIZE
        ciphertext = len(body) - header.size - nonce - tag
    else:  # direct mode: the key service's ciphertext is the single "wrapped key"
        nonce = tag = ciphertext = 0
    return Description(
        version=body[0],
        algorithm=wire.ALGORITHM_NAMES[header.algorithm],
        compression=header.compression,
        context=dict(header.context) if header.context else None,
        keys=keys,
        total_size=len(body),
        header_size=header.size,
        nonce_size=nonce,
        ciphertext_size=ciphertext,
        tag_size=tag,
    )
