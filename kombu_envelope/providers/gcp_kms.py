"""``gcp-kms://projects/P/locations/L/keyRings/R/cryptoKeys/K[/cryptoKeyVersions/N]``: Google Cloud KMS.

- Symmetric keys (purpose ENCRYPT_DECRYPT), named without a version: Cloud
  KMS ``Encrypt`` wraps each data key under the key's primary version and
  ``Decrypt`` unwraps it (the ciphertext names its version, so rotation needs
  nothing here). The canonical encryption context is the additional
  authenticated data, so Cloud KMS itself refuses a wrapped key moved to
  another context. Direct mode encrypts payloads up to 64 KiB the same way.
- Asymmetric decrypt keys (RSA_DECRYPT_OAEP_{2048,3072,4096}_SHA256), named
  with their version (the API decrypts with one version, not a key): the
  producer reads the public key once (``GetPublicKey``) and wraps locally
  with RSA-OAEP-SHA-256; workers unwrap with ``AsymmetricDecrypt``. The
  context is bound inside the wrapped plaintext (``context_binding``).

Every request carries CRC32C checksums and every answer's checksums are
checked, as Google recommends; a mismatch is retried like any transient failure.

The client uses the REST transport: gRPC's threads and sockets do not survive
the forks of Celery's prefork pool, whose parent process unwraps data keys
before forking. Credentials are Application Default Credentials.
"""

from __future__ import annotations

import re
from typing import Any, Callable, TypeVar

import google_crc32c
import requests
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from google.api_core.exceptions import GoogleAPICallError
from google.auth.exceptions import DefaultCredentialsError, RefreshError, TransportError
from google.cloud.kms_v1 import CryptoKeyVersion, KeyManagementServiceClient

from ..crypto import load_rsa_public_key, rsa_oaep_wrap
from ..errors import InvalidEnvelope, KeyServiceError
from ..wire import canonical_context
from . import Context, KeyProvider
from .context_binding import bind_context, unbind_context
from .remote import (
    WRAPPED_BY_SERVICE,
    WRAPPED_RSA_OAEP_SHA256,
    direct_mode_needs_symmetric_key,
    split_wrapped,
    tag_wrapped,
)
from .retry import DEFAULT_POLICY, READ_TIMEOUT, Failure, Kind, RetryPolicy, call

__all__ = ["GcpKmsProvider"]

_T = TypeVar("_T")

EXAMPLE = (
    "gcp-kms://projects/my-project/locations/global/keyRings/celery/cryptoKeys/orders "
    "(asymmetric decrypt keys: .../cryptoKeys/orders/cryptoKeyVersions/1)"
)
_URI = re.compile(
    r"gcp-kms://projects/[a-z0-9.:-]{1,100}/locations/[a-z0-9-]{1,64}/keyRings/[A-Za-z0-9_-]{1,63}"
    r"/cryptoKeys/[A-Za-z0-9_-]{1,63}(?:/cryptoKeyVersions/(?P<version>[1-9][0-9]{0,18}))?"
)
_ALGORITHM = CryptoKeyVersion.CryptoKeyVersionAlgorithm
#: The asymmetric algorithms whose OAEP parameters (SHA-256, MGF1-SHA-256) ``rsa_oaep_wrap`` uses.
_OAEP_SHA256 = (
    _ALGORITHM.RSA_DECRYPT_OAEP_2048_SHA256,
    _ALGORITHM.RSA_DECRYPT_OAEP_3072_SHA256,
    _ALGORITHM.RSA_DECRYPT_OAEP_4096_SHA256,
)
#: gRPC status names that mean "try again" (the REST transport maps them to these HTTP codes too).
_TRANSIENT_STATUS = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "INTERNAL", "ABORTED"}
_METHOD_AND_URL = re.compile(r"^[A-Z]+ \S+: ")


class _Corrupted(Exception):
    """A CRC32C check failed: the request or the answer was damaged on the way."""


class GcpKmsProvider(KeyProvider):
    """Data keys wrapped by a Cloud KMS symmetric key or under a Cloud KMS RSA decrypt key version."""

    scheme = "gcp-kms"
    max_direct_plaintext = 65536  # Cloud KMS Encrypt takes at most 64 KiB

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        match = _URI.fullmatch(uri)
        if match is None:
            raise ValueError(f"{uri!r} is not a Cloud KMS key URI; expected {EXAMPLE}")
        #: The resource name Cloud KMS knows: a CryptoKey, or a CryptoKeyVersion for asymmetric keys.
        self.resource_name = uri[len("gcp-kms://") :]
        self.asymmetric = match["version"] is not None
        self._public_key: RSAPublicKey | None = None
        self.retry_policy: RetryPolicy = DEFAULT_POLICY

    def _create_client(self) -> KeyManagementServiceClient:
        return KeyManagementServiceClient(transport="rest")

    # -- envelope mode ----------------------------------------------------

    def wrap_data_key(self, data_key: bytes, context: Context) -> bytes:
        if self.asymmetric:
            return tag_wrapped(
                WRAPPED_RSA_OAEP_SHA256, rsa_oaep_wrap(self._rsa_public_key(), bind_context(data_key, context))
            )
        return tag_wrapped(WRAPPED_BY_SERVICE, self._encrypt(data_key, context))

    def unwrap_data_key(self, wrapped: bytes, context: Context) -> bytes:
        tag, ciphertext = split_wrapped(self.uri, wrapped)
        if tag != (WRAPPED_RSA_OAEP_SHA256 if self.asymmetric else WRAPPED_BY_SERVICE):
            raise InvalidEnvelope(f"the data key wrapped under {self.uri} is not in the format of this key's purpose")
        if self.asymmetric:
            return unbind_context(self.uri, self._asymmetric_decrypt(ciphertext), context)
        return self._decrypt(ciphertext, context)

    # -- direct mode ------------------------------------------------------

    def encrypt(self, plaintext: bytes, context: Context) -> bytes:
        if self.asymmetric:
            raise direct_mode_needs_symmetric_key(self.uri)
        return self._encrypt(plaintext, context)

    def decrypt(self, ciphertext: bytes, context: Context) -> bytes:
        if self.asymmetric:
            raise direct_mode_needs_symmetric_key(self.uri)
        return self._decrypt(ciphertext, context)

    # -- calls ------------------------------------------------------------

    def _encrypt(self, plaintext: bytes, context: Context) -> bytes:
        aad = canonical_context(context)
        request: dict[str, Any] = {
            "name": self.resource_name,
            "plaintext": plaintext,
            "plaintext_crc32c": _crc32c(plaintext),
        }
        if aad:
            request.update(additional_authenticated_data=aad, additional_authenticated_data_crc32c=_crc32c(aad))

        def send() -> bytes:
            response = self.client.encrypt(request=request, retry=None, timeout=READ_TIMEOUT)
            if not response.verified_plaintext_crc32c or (
                aad and not response.verified_additional_authenticated_data_crc32c
            ):
                raise _Corrupted("the request reached Cloud KMS damaged")
            if response.ciphertext_crc32c != _crc32c(response.ciphertext):
                raise _Corrupted("the answer arrived damaged")
            return bytes(response.ciphertext)

        return self._call("Encrypt", send, message_data=False)

    def _decrypt(self, ciphertext: bytes, context: Context) -> bytes:
        aad = canonical_context(context)
        request: dict[str, Any] = {
            "name": self.resource_name,
            "ciphertext": ciphertext,
            "ciphertext_crc32c": _crc32c(ciphertext),
        }
        if aad:
            request.update(additional_authenticated_data=aad, additional_authenticated_data_crc32c=_crc32c(aad))

        def send() -> bytes:
            response = self.client.decrypt(request=request, retry=None, timeout=READ_TIMEOUT)
            if response.plaintext_crc32c != _crc32c(response.plaintext):
                raise _Corrupted("the answer arrived damaged")
            return bytes(response.plaintext)

        return self._call("Decrypt", send, message_data=True)

    def _asymmetric_decrypt(self, ciphertext: bytes) -> bytes:
        request = {"name": self.resource_name, "ciphertext": ciphertext, "ciphertext_crc32c": _crc32c(ciphertext)}

        def send() -> bytes:
            response = self.client.asymmetric_decrypt(request=request, retry=None, timeout=READ_TIMEOUT)
            if not response.verified_ciphertext_crc32c:
                raise _Corrupted("the request reached Cloud KMS damaged")
            if response.plaintext_crc32c != _crc32c(response.plaintext):
                raise _Corrupted("the answer arrived damaged")
            return bytes(response.plaintext)

        return self._call("AsymmetricDecrypt", send, message_data=True)

    def _rsa_public_key(self) -> RSAPublicKey:
        """The key version's public key, read once per provider (a version's key never changes)."""
        if self._public_key is not None:
            return self._public_key

        def send() -> tuple[str, Any]:
            response = self.client.get_public_key(
                request={"name": self.resource_name}, retry=None, timeout=READ_TIMEOUT
            )
            if response.name != self.resource_name or response.pem_crc32c != _crc32c(response.pem.encode()):
                raise _Corrupted("the answer arrived damaged")
            return response.pem, response.algorithm

        pem, algorithm = self._call("GetPublicKey", send, message_data=False)
        if algorithm not in _OAEP_SHA256:
            raise KeyServiceError(
                self.uri,
                f"GetPublicKey: the key version is {_ALGORITHM(algorithm).name}, and kombu-envelope wraps with "
                "RSA-OAEP "
                "SHA-256: use an RSA_DECRYPT_OAEP_{2048,3072,4096}_SHA256 version, or a symmetric key named without "
                "/cryptoKeyVersions/",
                transient=False,
            )
        try:
            self._public_key = load_rsa_public_key(pem.encode())
        except ValueError as exc:
            raise KeyServiceError(self.uri, f"GetPublicKey: unusable public key: {exc}", transient=False) from None
        return self._public_key

    def _call(self, action: str, fn: Callable[[], _T], *, message_data: bool) -> _T:
        """Run one request with retries; ``message_data``: the request carries bytes taken from a message."""

        def classify(exc: Exception) -> Failure | None:
            return _classify(exc, message_data)

        return call(self.uri, action, fn, classify, self.retry_policy)


def _classify(exc: Exception, message_data: bool) -> Failure | None:
    if isinstance(exc, _Corrupted):
        return Failure(Kind.TRANSIENT, f"CRC32C mismatch: {exc}")
    if isinstance(exc, (requests.RequestException, TransportError)):  # refused, reset, timed out
        return Failure(Kind.TRANSIENT, f"unreachable: {exc}")
    if isinstance(exc, (DefaultCredentialsError, RefreshError)):
        return Failure(
            Kind.REFUSED,
            f"no usable Google credentials: {exc} (Application Default Credentials: GOOGLE_APPLICATION_CREDENTIALS, "
            "workload identity, the metadata server or `gcloud auth application-default login`)",
        )
    if isinstance(exc, GoogleAPICallError):
        status = _rpc_status(exc)
        code = exc.code if isinstance(exc.code, int) else 0
        reason = f"HTTP {code} {status}: {_METHOD_AND_URL.sub('', exc.message or '')}"
        if code in (408, 429) or code >= 500 or status in _TRANSIENT_STATUS:
            return Failure(Kind.TRANSIENT, reason)
        if message_data and status == "INVALID_ARGUMENT":  # "Decryption failed: the ciphertext is invalid."
            return Failure(Kind.INVALID, reason)
        return Failure(Kind.REFUSED, reason)
    return None


def _rpc_status(exc: GoogleAPICallError) -> str:
    """The error's status name (``PERMISSION_DENIED``, ...): REST answers carry it in the body."""
    response = exc.response
    if isinstance(response, requests.Response):
        try:
            return str(response.json()["error"]["status"])
        except (ValueError, KeyError, TypeError):
            pass
    return exc.grpc_status_code.name if exc.grpc_status_code is not None else ""


def _crc32c(data: bytes) -> int:
    return int(google_crc32c.value(data))
