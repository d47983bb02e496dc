"""Key providers: one master key in one key service, named by a URI.

Like Tink's KMS clients, a provider is chosen by the URI's scheme
(``local://``, ``aws-kms://``, ``vault://``, ``azure-kv://``, ``gcp-kms://``)
and each lives in its own module, imported only when a URI names it, so a
missing optional dependency affects only the URIs that need it.
"""

from __future__ import annotations

import abc
import hashlib
import importlib
import os
from typing import Any, ClassVar, Mapping

from ..errors import ConfigurationError

__all__ = ["KeyProvider", "PROVIDER_IDS", "provider_for_uri", "key_fingerprint", "SCHEMES"]

Context = Mapping[str, str]

# scheme -> (provider id on the wire, module, class, pip extra that brings its dependencies)
SCHEMES: dict[str, tuple[int, str, str, str | None]] = {
    "local": (1, "kombu_envelope.providers.local", "LocalKeyProvider", None),
    "aws-kms": (2, "kombu_envelope.providers.aws_kms", "AwsKmsProvider", "aws"),
    "vault": (3, "kombu_envelope.providers.vault", "VaultTransitProvider", "vault"),
    "azure-kv": (4, "kombu_envelope.providers.azure_kv", "AzureKeyVaultProvider", "azure"),
    "gcp-kms": (5, "kombu_envelope.providers.gcp_kms", "GcpKmsProvider", "gcp"),
}
PROVIDER_IDS = {scheme: spec[0] for scheme, spec in SCHEMES.items()}

URI_EXAMPLES = (
    "local:///etc/kombu-envelope/dev.key, aws-kms://alias/orders, "
    "vault://transit/keys/orders, azure-kv://myvault.vault.azure.net/keys/orders, "
    "gcp-kms://projects/p/locations/l/keyRings/r/cryptoKeys/k"
)


def key_fingerprint(uri: str) -> bytes:
    """The 4 bytes that name a key URI on the wire: enough to pick a provider without trial decryption.

    Query parameters (``?public_key=...``) say how a producer wraps, not which
    key: ``aws-kms://alias/a?public_key=fetch`` and ``aws-kms://alias/a`` are
    the same key and share a fingerprint.
    """
    return hashlib.sha256(uri.partition("?")[0].encode("utf-8")).digest()[:4]


class KeyProvider(abc.ABC):
    """One master key that wraps and unwraps data keys.

    Subclasses implement ``wrap_data_key`` and ``unwrap_data_key``; services
    that generate data keys themselves (KMS GenerateDataKey, Transit datakey)
    override ``generate_data_key``; ``encrypt``/``decrypt`` serve direct mode.
    Network clients must be created per process (see ``client``): after a
    fork, a boto3 or hvac client of the parent must not be used.
    """

    scheme: ClassVar[str]
    #: Largest payload direct mode can send to this service, None if direct mode is unsupported.
    max_direct_plaintext: ClassVar[int | None] = None

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.fingerprint = key_fingerprint(uri)
        self.provider_id = PROVIDER_IDS[self.scheme]
        self._client_pid = -1
        self._client_obj: Any = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.uri}>"

    def generate_data_key(self, context: Context) -> tuple[bytes, bytes]:
        """Return ``(data_key, wrapped_data_key)`` for a fresh random data key."""
        from ..crypto import generate_data_key

        data_key = generate_data_key()
        return data_key, self.wrap_data_key(data_key, context)

    @abc.abstractmethod
    def wrap_data_key(self, data_key: bytes, context: Context) -> bytes:
        """Wrap ``data_key`` under this master key, binding ``context``."""

    @abc.abstractmethod
    def unwrap_data_key(self, wrapped: bytes, context: Context) -> bytes:
        """Return the data key inside ``wrapped``; raise InvalidEnvelope or KeyServiceError."""

    def encrypt(self, plaintext: bytes, context: Context) -> bytes:
        """Direct mode: the key service encrypts the payload itself."""
        raise ConfigurationError(f"envelope_mode='direct' is not supported by {self.scheme}:// keys; use envelope mode")

    def decrypt(self, ciphertext: bytes, context: Context) -> bytes:
        """Direct mode: the key service decrypts the payload itself."""
        raise ConfigurationError(f"envelope_mode='direct' is not supported by {self.scheme}:// keys; use envelope mode")

    @property
    def client(self) -> Any:
        """This process's client for the key service, created on first use after start or fork."""
        pid = os.getpid()
        if self._client_pid != pid:
            self._client_obj = self._create_client()
            self._client_pid = pid
        return self._client_obj

    def _create_client(self) -> Any:
        return None


def provider_for_uri(uri: str, setting: str = "envelope_key_uri") -> KeyProvider:
    """Build the provider a key URI names. Errors name ``setting`` and what to do."""
    scheme, sep, rest = uri.partition("://")
    if not sep or not rest:
        raise ConfigurationError(f"{setting}: {uri!r} is not a key URI; expected one like {URI_EXAMPLES}")
    spec = SCHEMES.get(scheme)
    if spec is None:
        raise ConfigurationError(
            f"{setting}: unknown key service {scheme!r} in {uri!r}; supported: "
            + ", ".join(f"{s}://" for s in SCHEMES)
        )
    _, module_name, class_name, extra = spec
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(
            f"{setting}: {uri!r} needs the {extra!r} extra ({exc.name or exc} is not installed): "
            f"pip install 'kombu-envelope[{extra}]'"
        ) from exc
    cls = getattr(module, class_name)
    try:
        return cls(uri)  # type: ignore[no-any-return]
    except ValueError as exc:  # a malformed URI: say which setting holds it
        raise ConfigurationError(f"{setting}: {exc}") from None
