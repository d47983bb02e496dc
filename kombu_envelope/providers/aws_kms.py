"""``aws-kms://KEY``: AWS KMS keys, symmetric or asymmetric RSA, through boto3.

KEY is a key id, a key ARN, ``alias/NAME`` or an alias ARN. Credentials,
region and endpoint follow boto3's own conventions (profiles,
``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL_KMS``, instance and task roles),
with ``AWS_REGION`` as a fallback region; for an ARN, the ARN's region is
used, so keys of several regions can be listed for multi-wrap.

- Symmetric keys (the default): ``GenerateDataKey`` (AES_256) makes data keys,
  ``Encrypt`` wraps one for a second key (multi-wrap), ``Decrypt`` unwraps;
  the encryption context goes with every call, so KMS enforces it and
  CloudTrail records it. ``Decrypt`` always names the key (KeyId), so a
  ciphertext made under any other key is refused.
- RSA keys (``?public_key=fetch`` or ``?public_key=/path/key.pem``): the
  producer wraps locally with RSA-OAEP-SHA-256 under the public key (fetched
  once per process with ``GetPublicKey``, or read from the PEM file, then no
  KMS call at all) and needs no decrypt permission; workers unwrap with
  ``Decrypt`` (``RSAES_OAEP_SHA_256``). The wrapped-key format byte tells
  workers which kind of key wrapped a message (``remote``).
- Direct mode: ``Encrypt``/``Decrypt`` of the payload itself, up to 4096
  bytes (the KMS limit), symmetric keys only.

Errors and retries: ``retry``. Permissions: docs/key-services.md.
"""

from __future__ import annotations

import os
from typing import Any

import boto3
import botocore.exceptions
from botocore.config import Config
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from ..crypto import load_rsa_public_key, rsa_oaep_wrap
from ..errors import KeyServiceError
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

__all__ = ["AwsKmsProvider"]

EXAMPLE = "aws-kms://alias/NAME, aws-kms://KEY-ID or aws-kms://arn:aws:kms:REGION:ACCOUNT:key/KEY-ID"
RSA_ALGORITHM = "RSAES_OAEP_SHA_256"

# KMS error codes (ClientError 'Code'): what each means for the message.
_TRANSIENT_CODES = frozenset(
    {
        "ThrottlingException",
        "Throttling",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "KMSInternalException",
        "InternalFailure",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "DependencyTimeoutException",
        "KeyUnavailableException",
        "RequestTimeout",
        "RequestTimeoutException",
    }
)
# The ciphertext is not one this key made, or the encryption context differs: the message is bad.
_INVALID_CODES = frozenset({"InvalidCiphertextException", "IncorrectKeyException"})


def classify(exc: Exception) -> Failure | None:
    """Map a boto3/botocore exception to a Failure (see ``retry``)."""
    if isinstance(exc, botocore.exceptions.ClientError):
        error = exc.response.get("Error", {})
        code = error.get("Code", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        reason = f"{code}: {error.get('Message') or 'no message'}"
        if code in _INVALID_CODES:
            return Failure(Kind.INVALID, reason + " (the wrapped key was altered, or the encryption context differs)")
        if code in _TRANSIENT_CODES or status == 429 or status >= 500:
            return Failure(Kind.TRANSIENT, reason)
        return Failure(Kind.REFUSED, reason)
    if isinstance(
        exc,
        (
            botocore.exceptions.ConnectionError,  # refused, DNS, connect timeout, TLS
            botocore.exceptions.HTTPClientError,  # read timeout, connection reset
            botocore.exceptions.CredentialRetrievalError,  # e.g. the instance metadata service timed out
        ),
    ):
        return Failure(Kind.TRANSIENT, f"{type(exc).__name__}: {exc}")
    if isinstance(exc, (botocore.exceptions.NoCredentialsError, botocore.exceptions.PartialCredentialsError)):
        return Failure(
            Kind.REFUSED,
            f"{exc}; give boto3 credentials the usual way: AWS_PROFILE, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
            "or an instance/task role",
        )
    if isinstance(exc, botocore.exceptions.NoRegionError):
        return Failure(Kind.REFUSED, "no AWS region is configured; set AWS_REGION, a profile region, or use a key ARN")
    return None


class AwsKmsProvider(KeyProvider):
    """One AWS KMS key; see the module docstring for symmetric, RSA and direct mode."""

    scheme = "aws-kms"
    max_direct_plaintext = 4096  # the KMS Encrypt limit

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        parsed = parse_key_uri(uri, self.scheme, EXAMPLE)
        self.key_id = parsed.key
        self.region: str | None = None
        if self.key_id.startswith("arn:"):
            parts = self.key_id.split(":")
            if len(parts) < 6 or parts[2] != "kms" or not parts[3]:
                raise ValueError(f"{uri!r} is not a KMS key or alias ARN; expected {EXAMPLE}")
            self.region = parts[3]
        self.public_key_source = parsed.public_key
        self._public_key: RSAPublicKey | None = None
        self.retry_policy: RetryPolicy = DEFAULT_POLICY

    def _create_client(self) -> Any:
        config = Config(
            connect_timeout=CONNECT_TIMEOUT,
            read_timeout=READ_TIMEOUT,
            retries={"total_max_attempts": 1},  # ``retry`` retries, within a bounded time
            user_agent_extra="kombu-envelope",
        )
        session = boto3.session.Session()
        # botocore itself reads AWS_DEFAULT_REGION and profiles only; other AWS SDKs (and Lambda) use AWS_REGION.
        region = self.region or session.region_name or os.environ.get("AWS_REGION") or None
        return session.client("kms", region_name=region, config=config)

    def _call(self, action: str, **params: Any) -> dict[str, Any]:
        def request() -> dict[str, Any]:
            return getattr(self.client, action)(**params)  # type: ignore[no-any-return]

        # botocore's method names are snake_case; errors and docs use the API's names.
        api_name = "".join(word.capitalize() for word in action.split("_"))
        return call(self.uri, api_name, request, classify, self.retry_policy)

    def _context_params(self, context: Context) -> dict[str, Any]:
        return {"EncryptionContext": dict(context)} if context else {}

    # -- envelope mode ----------------------------------------------------

    def generate_data_key(self, context: Context) -> tuple[bytes, bytes]:
        if self.public_key_source is not None:
            return super().generate_data_key(context)  # random data key, wrapped locally
        answer = self._call("generate_data_key", KeyId=self.key_id, KeySpec="AES_256", **self._context_params(context))
        return answer["Plaintext"], tag_wrapped(WRAPPED_BY_SERVICE, answer["CiphertextBlob"])

    def wrap_data_key(self, data_key: bytes, context: Context) -> bytes:
        if self.public_key_source is not None:
            return tag_wrapped(WRAPPED_RSA_OAEP_SHA256, rsa_oaep_wrap(self.public_key(), data_key))
        answer = self._call("encrypt", KeyId=self.key_id, Plaintext=data_key, **self._context_params(context))
        return tag_wrapped(WRAPPED_BY_SERVICE, answer["CiphertextBlob"])

    def unwrap_data_key(self, wrapped: bytes, context: Context) -> bytes:
        tag, blob = split_wrapped(self.uri, wrapped)
        if tag == WRAPPED_RSA_OAEP_SHA256:
            # KMS binds no encryption context to RSA decryption; the header (context included)
            # is still authenticated by the payload's AES-GCM tag under this data key.
            answer = self._call("decrypt", CiphertextBlob=blob, KeyId=self.key_id, EncryptionAlgorithm=RSA_ALGORITHM)
        else:
            answer = self._call("decrypt", CiphertextBlob=blob, KeyId=self.key_id, **self._context_params(context))
        return answer["Plaintext"]  # type: ignore[no-any-return]

    def public_key(self) -> RSAPublicKey:
        """The key's RSA public key: from the PEM file, or from GetPublicKey once per provider."""
        if self._public_key is None:
            if self.public_key_source == FETCH:
                self._public_key = self._fetch_public_key()
            else:
                assert self.public_key_source is not None
                self._public_key = read_public_key_file(self.uri, self.public_key_source)
        return self._public_key

    def _fetch_public_key(self) -> RSAPublicKey:
        answer = self._call("get_public_key", KeyId=self.key_id)
        usage, spec = answer.get("KeyUsage"), answer.get("KeySpec")
        if usage != "ENCRYPT_DECRYPT" or RSA_ALGORITHM not in answer.get("EncryptionAlgorithms", ()):
            raise KeyServiceError(
                self.uri,
                f"GetPublicKey: the key is {spec} for {usage}, which cannot encrypt with {RSA_ALGORITHM}; "
                "use an RSA_2048/3072/4096 ENCRYPT_DECRYPT key, or drop ?public_key= for a symmetric key",
                transient=False,
            )
        try:
            return load_rsa_public_key(answer["PublicKey"])
        except ValueError as exc:
            raise KeyServiceError(self.uri, f"GetPublicKey: unusable public key: {exc}", transient=False) from None

    # -- direct mode ------------------------------------------------------

    def encrypt(self, plaintext: bytes, context: Context) -> bytes:
        if self.public_key_source is not None:
            raise direct_mode_needs_symmetric_key(self.uri)
        answer = self._call("encrypt", KeyId=self.key_id, Plaintext=plaintext, **self._context_params(context))
        return answer["CiphertextBlob"]  # type: ignore[no-any-return]

    def decrypt(self, ciphertext: bytes, context: Context) -> bytes:
        answer = self._call("decrypt", CiphertextBlob=ciphertext, KeyId=self.key_id, **self._context_params(context))
        return answer["Plaintext"]  # type: ignore[no-any-return]
