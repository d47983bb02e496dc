"""``azure-kv://VAULT.vault.azure.net/keys/NAME[/VERSION]``: Azure Key Vault and Managed HSM keys.

- RSA keys (``RSA``, ``RSA-HSM``): the producer reads the key once
  (``get``; refreshed every ``KEY_REFRESH`` seconds when the URI names no
  version, so a rotated key is picked up) and wraps data keys locally with
  RSA-OAEP-256; workers unwrap with the vault (``unwrapKey``).
- Managed HSM AES keys (``oct-HSM``, host ``NAME.managedhsm.azure.net``):
  wrapped and unwrapped by the HSM with A256KW (``wrapKey``, ``unwrapKey``).

Neither algorithm takes associated data, so the encryption context is bound
inside the wrapped plaintext (``context_binding``).

Wrapped-key field: the format byte of ``remote`` (RSA-OAEP-SHA-256 wrapped
here, or wrapped by the service), one length byte and the ASCII key version
that wrapped it, then the ciphertext. The version makes old messages
unwrappable after the key is rotated, whatever version the URI names.

Key operations go through ``KeyClient.send_request`` (the SDK's pipeline:
challenge authentication, API version, tracing) rather than
``CryptographyClient``: azure-keyvault-keys 4.11 ``CryptographyClient`` first
GETs the key (an extra call workers would need ``get`` permission for), and
for an ``oct-HSM`` key, whose material a GET never returns, it "wraps locally"
under a random key it made up, so nothing could ever unwrap the result.

Credentials come from azure-identity's ``DefaultAzureCredential``
(environment, workload identity, managed identity, Azure CLI, ...).
"""

from __future__ import annotations

import base64
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from azure.core.credentials import TokenCredential
from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.core.rest import HttpRequest
from azure.identity import DefaultAzureCredential
from azure.keyvault.keys import KeyClient, KeyType, KeyVaultKey
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey, RSAPublicNumbers

from ..crypto import load_rsa_public_key, rsa_oaep_wrap
from ..errors import InvalidEnvelope, KeyServiceError
from . import Context, KeyProvider
from .context_binding import bind_context, unbind_context
from .remote import WRAPPED_BY_SERVICE, WRAPPED_RSA_OAEP_SHA256, split_wrapped, tag_wrapped
from .retry import CONNECT_TIMEOUT, DEFAULT_POLICY, READ_TIMEOUT, Failure, Kind, RetryPolicy, call

__all__ = ["AzureKeyVaultProvider", "KEY_REFRESH"]

_T = TypeVar("_T")

EXAMPLE = (
    "azure-kv://myvault.vault.azure.net/keys/orders (or azure-kv://myhsm.managedhsm.azure.net/keys/orders/VERSION)"
)
#: Public and sovereign clouds: Key Vault and Managed HSM host suffixes.
HOST_SUFFIXES = (
    ".vault.azure.net",
    ".vault.azure.cn",
    ".vault.usgovcloudapi.net",
    ".vault.microsoftazure.de",
    ".managedhsm.azure.net",
    ".managedhsm.azure.cn",
    ".managedhsm.usgovcloudapi.net",
)
_URI = re.compile(
    r"azure-kv://(?P<host>[A-Za-z0-9-]{3,24}(?:\.[a-z0-9-]+)+)/keys/(?P<name>[A-Za-z0-9-]{1,127})(?:/(?P<version>[A-Za-z0-9]{1,64}))?"
)
_VERSION = re.compile(rb"[A-Za-z0-9]{1,64}")
#: Seconds a producer uses the wrapping key it read before reading it again (URIs without a version only).
KEY_REFRESH = 900.0
_RSA_TYPES = (KeyType.rsa, KeyType.rsa_hsm)
_ALGORITHMS = {WRAPPED_RSA_OAEP_SHA256: "RSA-OAEP-256", WRAPPED_BY_SERVICE: "A256KW"}


@dataclass(frozen=True)
class _WrappingKey:
    """The key version a producer wraps under: its RSA public key, or None for an HSM AES key."""

    version: str
    public_key: RSAPublicKey | None
    fetched: float


class AzureKeyVaultProvider(KeyProvider):
    """Data keys wrapped under an Azure Key Vault RSA key or a Managed HSM AES key."""

    scheme = "azure-kv"

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        match = _URI.fullmatch(uri)
        if match is None:
            raise ValueError(f"{uri!r} is not an Azure Key Vault key URI; expected {EXAMPLE}")
        host = match["host"].lower()
        if not host.endswith(HOST_SUFFIXES):
            raise ValueError(f"{uri!r}: {host!r} is not a Key Vault or Managed HSM host (*{', *'.join(HOST_SUFFIXES)})")
        self.vault_url = f"https://{host}"
        self.key_name: str = match["name"]
        self.key_version: str | None = match["version"]
        self._wrapping_key: _WrappingKey | None = None
        self.retry_policy: RetryPolicy = DEFAULT_POLICY

    # -- SDK clients, one per process -------------------------------------

    def _create_client(self) -> KeyClient:
        return KeyClient(self.vault_url, self._new_credential(), **self._client_options())

    def _new_credential(self) -> TokenCredential:
        return DefaultAzureCredential()

    def _client_options(self) -> dict[str, Any]:
        # The SDK's own retries are off: retry.call alone bounds how long a call may take.
        return {"retry_total": 0, "connection_timeout": CONNECT_TIMEOUT, "read_timeout": READ_TIMEOUT}

    # -- wrapping ---------------------------------------------------------

    def wrap_data_key(self, data_key: bytes, context: Context) -> bytes:
        key = self._current_wrapping_key()
        plaintext = bind_context(data_key, context)
        if key.public_key is not None:
            return _pack(WRAPPED_RSA_OAEP_SHA256, key.version, rsa_oaep_wrap(key.public_key, plaintext))
        ciphertext = self._key_operation("wrapKey", key.version, WRAPPED_BY_SERVICE, plaintext)
        return _pack(WRAPPED_BY_SERVICE, key.version, ciphertext)

    def unwrap_data_key(self, wrapped: bytes, context: Context) -> bytes:
        tag, rest = split_wrapped(self.uri, wrapped)
        version, ciphertext = self._split_version(rest)
        unwrapped = self._key_operation("unwrapKey", version, tag, ciphertext)
        return unbind_context(self.uri, unwrapped, context)

    def _current_wrapping_key(self) -> _WrappingKey:
        key = self._wrapping_key
        if key is None or (self.key_version is None and time.monotonic() - key.fetched > KEY_REFRESH):
            vault_key = self._call(
                "get key", lambda: self.client.get_key(self.key_name, self.key_version), message_data=False
            )
            key = self._wrapping_key = self._check_wrapping_key(vault_key)
        return key

    def _check_wrapping_key(self, vault_key: KeyVaultKey) -> _WrappingKey:
        """The usable wrapping key in a GET answer; refuse keys that cannot wrap (or unwrap) data keys."""
        props = vault_key.properties
        version = props.version or ""
        if not _VERSION.fullmatch(version.encode()):
            raise KeyServiceError(
                self.uri, f"get key: the vault returned an unusable key id {vault_key.id!r}", transient=False
            )
        if props.enabled is False:
            raise KeyServiceError(
                self.uri, f"key version {version} is disabled; enable it or name another version", transient=False
            )
        now = time.time()
        if (props.not_before and props.not_before.timestamp() > now) or (
            props.expires_on and props.expires_on.timestamp() < now
        ):
            raise KeyServiceError(
                self.uri, f"key version {version} is outside its activation/expiry dates", transient=False
            )
        ops = set(vault_key.key_operations or ())
        if ops and not {"wrapKey", "unwrapKey"} <= ops:
            raise KeyServiceError(
                self.uri,
                f"the key's permitted operations ({', '.join(sorted(ops))}) lack wrapKey/unwrapKey; allow both "
                "(az keyvault key set-attributes --ops wrapKey unwrapKey ...)",
                transient=False,
            )
        if vault_key.key_type in _RSA_TYPES:
            jwk: Any = vault_key.key  # JsonWebKey sets n and e dynamically
            numbers = RSAPublicNumbers(int.from_bytes(jwk.e, "big"), int.from_bytes(jwk.n, "big"))
            der = numbers.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            try:
                public_key = load_rsa_public_key(der)
            except ValueError as exc:
                raise KeyServiceError(self.uri, f"get key: unusable public key: {exc}", transient=False) from None
            return _WrappingKey(version, public_key, time.monotonic())
        if vault_key.key_type == KeyType.oct_hsm:
            return _WrappingKey(version, None, time.monotonic())
        key_type = getattr(vault_key.key_type, "value", vault_key.key_type)
        raise KeyServiceError(
            self.uri,
            f"the key's type is {key_type}, which cannot wrap data keys; use an RSA key "
            "(az keyvault key create --kty RSA --size 3072) or a Managed HSM AES key (--kty oct-HSM --size 256)",
            transient=False,
        )

    def _split_version(self, rest: bytes) -> tuple[str, bytes]:
        size = rest[0]
        raw = rest[1 : 1 + size]
        ciphertext = rest[1 + size :]
        if not _VERSION.fullmatch(raw) or not ciphertext:
            raise InvalidEnvelope(f"the data key wrapped under {self.uri} names no valid key version")
        version = raw.decode("ascii")
        if self.key_version is not None and version != self.key_version:
            raise InvalidEnvelope(
                f"the data key was wrapped under key version {version}, not {self.key_version} that {self.uri} names"
            )
        return version, ciphertext

    # -- calls ------------------------------------------------------------

    def _key_operation(self, operation: str, version: str, tag: int, value: bytes) -> bytes:
        """``wrapKey``/``unwrapKey`` with the key version that wraps (or wrapped) the data key."""
        request = HttpRequest(
            "POST",
            f"/keys/{self.key_name}/{version}/{operation.lower()}",
            json={"alg": _ALGORITHMS[tag], "value": _b64url(value)},
        )

        def send() -> bytes:
            response = self.client.send_request(request)
            response.raise_for_status()
            return _unb64url(response.json()["value"])

        return self._call(operation, send, message_data=operation == "unwrapKey")

    def _call(self, action: str, fn: Callable[[], _T], *, message_data: bool) -> _T:
        """Run one request with retries; ``message_data``: the request carries bytes taken from a message."""

        def classify(exc: Exception) -> Failure | None:
            return _classify(exc, message_data)

        return call(self.uri, action, fn, classify, self.retry_policy)


def _classify(exc: Exception, message_data: bool) -> Failure | None:
    if isinstance(exc, (ServiceRequestError, ServiceResponseError)):  # refused, reset, timed out
        return Failure(Kind.TRANSIENT, f"unreachable: {exc.message}")
    if isinstance(exc, HttpResponseError) and exc.status_code is not None:
        status = exc.status_code
        code = exc.error.code if exc.error else exc.reason
        message = exc.error.message if exc.error else exc.message
        reason = f"HTTP {status} {code}: {message}"
        if status in (408, 429) or status >= 500:
            return Failure(Kind.TRANSIENT, reason)
        if status == 400 and message_data:  # the vault cannot unwrap these bytes: not a ciphertext of this key
            return Failure(Kind.INVALID, reason)
        return Failure(Kind.REFUSED, reason)
    if isinstance(exc, ClientAuthenticationError):  # no credential found, or the token request was refused
        return Failure(
            Kind.REFUSED,
            f"no Azure credential: {exc.message} (DefaultAzureCredential reads AZURE_CLIENT_ID/AZURE_TENANT_ID/"
            "AZURE_CLIENT_SECRET, workload identity, a managed identity or `az login`)",
        )
    if isinstance(exc, (AzureError, ValueError, KeyError)):  # an answer the SDK (or we) could not read
        return Failure(Kind.TRANSIENT, f"unreadable answer: {exc}")
    return None


def _pack(tag: int, version: str, ciphertext: bytes) -> bytes:
    raw = version.encode("ascii")
    return tag_wrapped(tag, bytes((len(raw),)) + raw + ciphertext)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
