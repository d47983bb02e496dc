"""What the providers of remote key services (AWS KMS, Vault/OpenBao Transit) share.

Key URIs: ``SCHEME://KEY[?public_key=fetch|/abs/path.pem[&key_version=N]]``.
The query only says how a producer wraps; it is not part of the key's
identity, so a producer's ``aws-kms://alias/a?public_key=fetch`` and a
worker's ``aws-kms://alias/a`` name the same key (``key_fingerprint`` ignores it).

Wrapped-key field: one format byte, then the service's bytes. The byte says
how the data key was wrapped, so a worker unwraps any message without
configuration or an extra call to learn the key's type:

- ``WRAPPED_BY_SERVICE``: the key service wrapped it (KMS GenerateDataKey or
  Encrypt, Transit datakey or encrypt), binding the encryption context;
- ``WRAPPED_RSA_OAEP_SHA256``: wrapped here with the key's RSA public key
  (OAEP, SHA-256, MGF1-SHA-256); only the key service can unwrap it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import parse_qsl

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from ..crypto import load_rsa_public_key
from ..errors import ConfigurationError, InvalidEnvelope

__all__ = [
    "KeyUri",
    "parse_key_uri",
    "WRAPPED_BY_SERVICE",
    "WRAPPED_RSA_OAEP_SHA256",
    "tag_wrapped",
    "split_wrapped",
    "read_public_key_file",
    "direct_mode_needs_symmetric_key",
]

WRAPPED_BY_SERVICE = 1
WRAPPED_RSA_OAEP_SHA256 = 2
#: ``public_key=fetch``: ask the key service for the public key, once per process.
FETCH = "fetch"


@dataclass(frozen=True)
class KeyUri:
    """A parsed key URI: ``key`` (what follows ``SCHEME://``, without the query) and the query's parameters."""

    key: str
    public_key: str | None = None
    key_version: int | None = None


def parse_key_uri(uri: str, scheme: str, example: str, allowed: tuple[str, ...] = ("public_key",)) -> KeyUri:
    """Split and check a key URI. Raises ValueError (provider_for_uri names the setting)."""
    identity, _, query = uri.partition("?")
    key = identity[len(scheme) + 3 :]
    if not key:
        raise ValueError(f"{uri!r} names no key; expected {example}")
    params: dict[str, str] = {}
    for name, value in parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)):
        if name not in allowed:
            raise ValueError(f"{uri!r}: unknown parameter {name!r}; {scheme}:// key URIs accept {', '.join(allowed)}")
        params[name] = value
    public_key = params.get("public_key")
    if public_key is not None and public_key != FETCH and not os.path.isabs(public_key):
        raise ValueError(
            f"{uri!r}: public_key must be 'fetch' (ask the key service once) or an absolute path to a PEM file, "
            f"not {public_key!r}"
        )
    version = params.get("key_version")
    if version is not None and not (version.isdigit() and int(version) > 0):
        raise ValueError(f"{uri!r}: key_version must be a positive integer, not {version!r}")
    return KeyUri(key, public_key, int(version) if version else None)


def tag_wrapped(tag: int, wrapped: bytes) -> bytes:
    return bytes((tag,)) + wrapped


def split_wrapped(uri: str, wrapped: bytes) -> tuple[int, bytes]:
    """The format byte and the service's bytes of a wrapped-key field; unknown formats are invalid envelopes."""
    if len(wrapped) < 2 or wrapped[0] not in (WRAPPED_BY_SERVICE, WRAPPED_RSA_OAEP_SHA256):
        raise InvalidEnvelope(f"the data key wrapped under {uri} is not in a format this version knows")
    return wrapped[0], wrapped[1:]


def read_public_key_file(uri: str, path: str) -> RSAPublicKey:
    """The RSA public key in the PEM (or DER) file a ``public_key=`` parameter names."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigurationError(f"{uri}: cannot read the public key file {path!r}: {exc.strerror}") from None
    try:
        return load_rsa_public_key(data)
    except ValueError as exc:
        raise ConfigurationError(f"{uri}: {path!r} is not a usable RSA public key: {exc}") from None


def direct_mode_needs_symmetric_key(uri: str) -> ConfigurationError:
    return ConfigurationError(
        f"envelope_mode='direct' needs a symmetric key, and {uri} wraps with an RSA public key: anyone holding "
        "the public key could forge messages, and the encryption context would not be bound. Use a symmetric "
        "key for direct mode, or envelope_mode='envelope'"
    )
