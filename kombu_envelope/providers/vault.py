"""``vault://MOUNT/keys/NAME``: HashiCorp Vault and OpenBao Transit keys, through hvac.

Address and token come from ``VAULT_ADDR``/``VAULT_TOKEN`` (or ``BAO_ADDR``/
``BAO_TOKEN``); ``VAULT_NAMESPACE``/``BAO_NAMESPACE`` and ``VAULT_CACERT``/
``BAO_CACERT`` are honoured too. MOUNT may contain slashes (nested mounts).

- aes256-gcm96 (and other AEAD) keys: without an encryption context,
  ``datakey/plaintext`` makes data keys; with one, a random data key is
  sent to ``encrypt`` with the context as ``associated_data``, because
  HashiCorp Vault's ``datakey`` ignores ``associated_data`` (OpenBao's
  accepts it). ``decrypt`` unwraps, with the same associated data, so Transit
  refuses a wrong context. A second key of a multi-wrap uses ``encrypt``.
- RSA keys (``?public_key=fetch``, or ``?public_key=/path.pem&key_version=N``):
  the producer wraps locally with RSA-OAEP-SHA-256 under the public key of
  the key's latest version (read once per process from ``keys/NAME``, or
  from the PEM file) into Transit's ``vault:vN:BASE64`` form, and needs no
  decrypt permission; workers unwrap with ``decrypt`` (Transit uses OAEP with
  SHA-256 for RSA keys).
- Direct mode: ``encrypt``/``decrypt`` of the payload itself, up to
  ``max_direct_plaintext`` bytes, AEAD keys only.

Errors and retries: ``retry``. Policies and setup: docs/key-services.md.
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Callable
from typing import Any

import hvac
import hvac.exceptions
import requests
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from ..crypto import load_rsa_public_key, rsa_oaep_wrap
from ..errors import ConfigurationError, KeyServiceError
from ..wire import canonical_context
from . import Context, KeyProvider
from .remote import (
    FETCH,
    WRAPPED_BY_SERVICE,
    WRAPPED_RSA_OAEP_SHA256,
    direct_mode_needs_symmetric_key,
    parse_key_uri,
    read_public_key_file,
    split_wrapped,
    tag_wrapped,
)
from .retry import CONNECT_TIMEOUT, DEFAULT_POLICY, READ_TIMEOUT, Failure, Kind, RetryPolicy, call

__all__ = ["VaultTransitProvider"]

EXAMPLE = "vault://transit/keys/NAME (vault://MOUNT/keys/NAME)"

# Transit answers 400 for these: the ciphertext is not one this key made, or the associated data differs.
_INVALID_MARKERS = ("message authentication failed", "invalid ciphertext")
# ... and 500 for a failed RSA decryption, which no retry can fix.
_RSA_DECRYPT_FAILED = "failed to RSA decrypt"
_MULTIERROR_PREFIX = re.compile(r"^\d+ errors? occurred:\s*\*\s*")
# Transit's encrypt creates a missing key ("upsert") when the token may create, so a mistyped URI would
# silently make a new key. It reads ``type`` only when it is about to create one, and refuses a type it
# does not know: this one makes encrypt refuse a missing key and changes nothing for an existing key.
_NO_UPSERT_TYPE = "kombu-envelope-never-creates-keys"
# hvac raises one exception class per HTTP status; errors show the status.
_STATUS = {
    hvac.exceptions.InvalidRequest: "400",
    hvac.exceptions.Unauthorized: "401",
    hvac.exceptions.Forbidden: "403",
    hvac.exceptions.InvalidPath: "404",
    hvac.exceptions.PreconditionFailed: "412",
    hvac.exceptions.RateLimitExceeded: "429",
    hvac.exceptions.InternalServerError: "500",
    hvac.exceptions.VaultNotInitialized: "501",
    hvac.exceptions.BadGateway: "502",
    hvac.exceptions.VaultDown: "503",
}


def _env(name: str) -> str | None:
    """``VAULT_<name>``, else OpenBao's ``BAO_<name>``."""
    return os.environ.get("VAULT_" + name) or os.environ.get("BAO_" + name) or None


def classify(exc: Exception) -> Failure | None:
    """Map an hvac/requests exception to a Failure (see ``retry``)."""
    if isinstance(exc, hvac.exceptions.VaultError):
        reason = _one_line(str(exc.args[0])) if exc.args and exc.args[0] else type(exc).__name__
        if _NO_UPSERT_TYPE in reason:
            return Failure(
                Kind.REFUSED, "HTTP 400: encryption key not found (kombu-envelope never lets Transit create it)"
            )
        if isinstance(exc, hvac.exceptions.InvalidRequest) and any(m in reason for m in _INVALID_MARKERS):
            return Failure(Kind.INVALID, reason + " (the wrapped key was altered, or the encryption context differs)")
        if _RSA_DECRYPT_FAILED in reason:
            return Failure(Kind.INVALID, reason + " (the wrapped key was altered or wrapped under another key)")
        if isinstance(
            exc,
            (
                hvac.exceptions.RateLimitExceeded,
                hvac.exceptions.InternalServerError,
                hvac.exceptions.VaultNotInitialized,
                hvac.exceptions.BadGateway,
                hvac.exceptions.VaultDown,  # 503: sealed, or a standby without a leader
                hvac.exceptions.PreconditionFailed,  # 412: a performance standby not caught up yet
            ),
        ):
            return Failure(Kind.TRANSIENT, f"HTTP {_status(exc)}: {reason}")
        if isinstance(exc, hvac.exceptions.Forbidden):
            reason += (
                " (the token's policy does not allow this path, or the key does not exist: see docs/key-services.md)"
            )
        return Failure(Kind.REFUSED, f"HTTP {_status(exc)}: {reason}")
    if isinstance(exc, requests.exceptions.RequestException):  # refused, reset, timed out, TLS
        return Failure(Kind.TRANSIENT, f"{type(exc).__name__}: {exc}")
    return None


def _one_line(text: str) -> str:
    """Vault's errors, for one log line: "1 error occurred:\\n\\t* permission denied\\n\\n" -> "permission denied"."""
    return " ".join(_MULTIERROR_PREFIX.sub("", text.strip()).split())


def _status(exc: hvac.exceptions.VaultError) -> str:
    return _STATUS.get(type(exc), "error")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class VaultTransitProvider(KeyProvider):
    """One Transit key; see the module docstring for AEAD keys, RSA keys and direct mode."""

    scheme = "vault"
    #: Transit has no small limit (its request limit is 32 MiB); direct mode is for small, rare,
    #: very sensitive payloads, and this keeps each one a small request.
    max_direct_plaintext = 32 * 1024

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        parsed = parse_key_uri(uri, self.scheme, EXAMPLE, allowed=("public_key", "key_version"))
        mount, sep, name = parsed.key.rpartition("/keys/")
        mount = mount.strip("/")
        if not sep or not mount or not name or "/" in name:
            raise ValueError(f"{uri!r} is not a Transit key URI; expected {EXAMPLE}")
        self.mount, self.name = mount, name
        self.public_key_source = parsed.public_key
        if parsed.public_key not in (None, FETCH) and parsed.key_version is None:
            raise ValueError(
                f"{uri!r}: with a public key file, also give the Transit key version it belongs to "
                f"(&key_version=N; 'bao read transit/keys/{name}' lists them)"
            )
        self._file_key_version = parsed.key_version
        self._public_key: tuple[RSAPublicKey, int] | None = None
        self.retry_policy: RetryPolicy = DEFAULT_POLICY

    def _create_client(self) -> Any:
        address = _env("ADDR")
        if not address:
            # A configuration error, not a refusal: the worker keeps messages until it is fixed.
            raise ConfigurationError(
                f"{self.uri}: VAULT_ADDR (or BAO_ADDR) is not set in the environment; "
                "set it to the server's address, e.g. VAULT_ADDR=https://vault.example.com:8200"
            )
        options: dict[str, Any] = {}
        cacert = _env("CACERT")
        if cacert and not os.environ.get("VAULT_CAPATH"):
            options["verify"] = cacert
        # hvac reads VAULT_TOKEN (then ~/.vault-token) itself when token is None.
        return hvac.Client(
            url=address,
            token=_env("TOKEN"),
            namespace=_env("NAMESPACE"),
            timeout=(CONNECT_TIMEOUT, READ_TIMEOUT),  # passed to requests, which does not retry by default
            **options,
        )

    def _call(self, action: str, request: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
        """Run ``request(transit)`` with retries; ``action`` names the Transit path in errors."""
        path = f"{self.mount}/{action}/{self.name}"
        answer = call(self.uri, path, lambda: request(self.client.secrets.transit), classify, self.retry_policy)
        return answer["data"]  # type: ignore[no-any-return]

    def _associated_data(self, context: Context) -> str | None:
        return _b64(canonical_context(context)) if context else None

    # -- envelope mode ----------------------------------------------------

    def generate_data_key(self, context: Context) -> tuple[bytes, bytes]:
        if self.public_key_source is not None or context:
            return super().generate_data_key(context)  # random data key, then wrap_data_key
        data = self._call(
            "datakey/plaintext",
            lambda t: t.generate_data_key(self.name, key_type="plaintext", bits=256, mount_point=self.mount),
        )
        return base64.b64decode(data["plaintext"]), tag_wrapped(WRAPPED_BY_SERVICE, data["ciphertext"].encode("ascii"))

    def wrap_data_key(self, data_key: bytes, context: Context) -> bytes:
        if self.public_key_source is not None:
            public_key, version = self.public_key()
            wrapped = f"vault:v{version}:{_b64(rsa_oaep_wrap(public_key, data_key))}"
            return tag_wrapped(WRAPPED_RSA_OAEP_SHA256, wrapped.encode("ascii"))
        return tag_wrapped(WRAPPED_BY_SERVICE, self._encrypt(data_key, context))

    def unwrap_data_key(self, wrapped: bytes, context: Context) -> bytes:
        tag, ciphertext = split_wrapped(self.uri, wrapped)
        # Transit takes no associated data for RSA keys; the header (context included) is still
        # authenticated by the payload's AES-GCM tag under this data key.
        return self._decrypt(ciphertext, context if tag == WRAPPED_BY_SERVICE else {})

    def public_key(self) -> tuple[RSAPublicKey, int]:
        """The RSA public key producers wrap with and its Transit key version: from the file, or read once."""
        if self._public_key is None:
            if self.public_key_source == FETCH:
                self._public_key = self._fetch_public_key()
            else:
                assert self.public_key_source is not None and self._file_key_version is not None
                self._public_key = (read_public_key_file(self.uri, self.public_key_source), self._file_key_version)
        return self._public_key

    def _fetch_public_key(self) -> tuple[RSAPublicKey, int]:
        data = self._call("keys", lambda t: t.read_key(self.name, mount_point=self.mount))
        key_type, version = str(data.get("type", "")), int(data.get("latest_version", 0))
        if not key_type.startswith("rsa-"):
            raise KeyServiceError(
                self.uri,
                f"the Transit key is {key_type}, not RSA, so there is no public key to wrap with; "
                "drop ?public_key= to let Transit wrap, or use an rsa-2048/3072/4096 key",
                transient=False,
            )
        try:
            return load_rsa_public_key(data["keys"][str(version)]["public_key"].encode()), version
        except (KeyError, ValueError) as exc:
            raise KeyServiceError(
                self.uri, f"unusable public key for version {version}: {exc}", transient=False
            ) from None

    def _encrypt(self, plaintext: bytes, context: Context) -> bytes:
        data = self._call(
            "encrypt",
            lambda t: t.encrypt_data(
                self.name,
                _b64(plaintext),
                associated_data=self._associated_data(context),
                type=_NO_UPSERT_TYPE,
                mount_point=self.mount,
            ),
        )
        return data["ciphertext"].encode("ascii")  # type: ignore[no-any-return]

    def _decrypt(self, ciphertext: bytes, context: Context) -> bytes:
        text = ciphertext.decode("ascii", "replace")
        data = self._call(
            "decrypt",
            lambda t: t.decrypt_data(
                self.name, text, associated_data=self._associated_data(context), mount_point=self.mount
            ),
        )
        return base64.b64decode(data["plaintext"])

    # -- direct mode ------------------------------------------------------

    def encrypt(self, plaintext: bytes, context: Context) -> bytes:
        if self.public_key_source is not None:
            raise direct_mode_needs_symmetric_key(self.uri)
        return self._encrypt(plaintext, context)

    def decrypt(self, ciphertext: bytes, context: Context) -> bytes:
        return self._decrypt(ciphertext, context)
