"""A fake Azure Key Vault / Managed HSM for tests: the real SDK over a fake network.

No Key Vault emulator can run here, so the real ``azure-keyvault-keys``
pipeline (challenge authentication, API version, error parsing) and azure-core's
real ``RequestsTransport`` run unchanged; only the requests adapter under it
is replaced by ``FakeAzureNetwork``, which answers for the vaults registered
on it. Each ``FakeKeyVault`` holds real keys (RSA private keys, AES keys) and
does the cryptography for real, answers in the service's JSON formats
(REST API 7.x / 2025-07-01) and records every request, so tests can assert
exactly what the SDK sent.
"""

from __future__ import annotations

import base64
import io
import json
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import parse_qsl, urlsplit

import pytest
import requests
import urllib3
from azure.core.credentials import AccessToken
from azure.core.pipeline.transport import RequestsTransport
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap
from requests.adapters import HTTPAdapter

from kombu_envelope.crypto import rsa_oaep_unwrap, rsa_oaep_wrap
from kombu_envelope.providers import PROVIDER_IDS, SCHEMES
from kombu_envelope.providers.azure_kv import AzureKeyVaultProvider

TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass
class Recorded:
    """One request as it reached the vault."""

    method: str
    path: str
    query: dict[str, str]
    body: Any
    authorization: str | None


@dataclass
class KeyVersion:
    kty: str  # "RSA", "RSA-HSM", "EC" or "oct-HSM"
    secret: Any  # rsa.RSAPrivateKey, AES key bytes, or None for EC
    key_ops: list[str]
    enabled: bool = True
    created: int = field(default_factory=lambda: int(time.time()))


class FakeKeyVault:
    """One vault (or Managed HSM) at ``host``: keys, versions, access rules and injected failures."""

    def __init__(self, host: str, token: str) -> None:
        self.host = host
        self.resource = "https://managedhsm.azure.net" if ".managedhsm." in host else "https://vault.azure.net"
        self.token = token
        self.keys: dict[str, dict[str, KeyVersion]] = {}
        self.requests: list[Recorded] = []
        self.denied: set[str] = set()  # operations ("get", "unwrapKey", ...) the caller has no permission for
        self.failures: list[int | Exception] = []  # answered, in order, to the next authorized requests

    def create_key(self, name: str, kty: str = "RSA", size: int = 2048, key_ops: list[str] | None = None) -> str:
        """Add a new version of key ``name`` (created if new); returns the version."""
        if kty in ("RSA", "RSA-HSM"):
            secret: Any = rsa.generate_private_key(public_exponent=65537, key_size=size)
        elif kty == "oct-HSM":
            secret = os.urandom(size // 8)
        else:
            secret = None
        ops = key_ops if key_ops is not None else ["encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey"]
        version = secrets.token_hex(16)
        self.keys.setdefault(name, {})[version] = KeyVersion(kty, secret, ops)
        return version

    def key_id(self, name: str, version: str) -> str:
        return f"https://{self.host}/keys/{name}/{version}"

    def latest(self, name: str) -> str:
        return next(reversed(self.keys[name]))  # the version created last

    def operations(self) -> list[tuple[str, str]]:
        """(method, path) of every authorized request, in order."""
        return [(r.method, r.path) for r in self.requests if r.authorization]

    # -- the service ------------------------------------------------------

    def handle(
        self, method: str, url: str, body: bytes | None, headers: dict[str, str]
    ) -> tuple[int, dict[str, str], Any]:
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query))
        payload = json.loads(body) if body else None
        authorization = headers.get("Authorization")
        self.requests.append(Recorded(method, parts.path, query, payload, authorization))
        if authorization != f"Bearer {self.token}":
            challenge = f'Bearer authorization="https://login.microsoftonline.com/{TENANT}", resource="{self.resource}"'
            return 401, {"WWW-Authenticate": challenge}, None
        if self.failures:
            failure = self.failures.pop(0)
            if isinstance(failure, Exception):
                raise failure
            return failure, {"Retry-After": "0"}, _error(*_FAILURE_TEXT[failure])
        segments = parts.path.strip("/").split("/")
        if segments[0] != "keys" or len(segments) < 2:
            return 404, {}, _error("NotFound", "Not Found")
        name, version = segments[1], segments[2] if len(segments) > 2 else ""
        operation = segments[3] if len(segments) > 3 else None
        if method == "GET" and operation is None:
            return self._get(name, version)
        if method == "POST" and operation in ("wrapkey", "unwrapkey"):
            return self._wrap(name, version, "wrapKey" if operation == "wrapkey" else "unwrapKey", payload)
        return 405, {}, _error("MethodNotAllowed", "The requested method is not allowed")

    def _find(self, name: str, version: str, operation: str) -> tuple[int, dict[str, str], Any] | KeyVersion:
        if operation in self.denied:
            return (
                403,
                {},
                _error(
                    "Forbidden",
                    "The user, group or application 'appid=1950a258;oid=5f2c' does not have keys "
                    f"{operation} permission on key vault '{self.host.split('.')[0]};location=westeurope'. "
                    "For help resolving this issue, please see "
                    "https://go.microsoft.com/fwlink/?linkid=2125287",
                    inner="AccessDenied",
                ),
            )
        versions = self.keys.get(name, {})
        key = versions.get(version or (self.latest(name) if versions else ""))
        if key is None:
            return (
                404,
                {},
                _error(
                    "KeyNotFound",
                    f"A key with (name/id) {name}/{version} was not found in this key vault. If you recently "
                    "deleted this key you may be able to recover it using the correct recovery command.",
                ),
            )
        if not key.enabled and operation != "get":
            return 403, {}, _error("Forbidden", f"Operation {operation} is not allowed on a disabled key.")
        return key

    def _get(self, name: str, version: str) -> tuple[int, dict[str, str], Any]:
        found = self._find(name, version, "get")
        if not isinstance(found, KeyVersion):
            return found
        version = version or self.latest(name)
        jwk: dict[str, Any] = {"kid": self.key_id(name, version), "kty": found.kty, "key_ops": found.key_ops}
        if found.kty in ("RSA", "RSA-HSM"):
            numbers = found.secret.public_key().public_numbers()
            jwk["n"] = b64url(numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big"))
            jwk["e"] = b64url(numbers.e.to_bytes(3, "big"))
        elif found.kty == "EC":
            jwk.update(crv="P-256", x=b64url(os.urandom(32)), y=b64url(os.urandom(32)))
        attributes = {
            "enabled": found.enabled,
            "created": found.created,
            "updated": found.created,
            "recoveryLevel": "Recoverable+Purgeable",
            "recoverableDays": 90,
            "exportable": False,
        }
        return 200, {}, {"key": jwk, "attributes": attributes}

    def _wrap(self, name: str, version: str, operation: str, payload: Any) -> tuple[int, dict[str, str], Any]:
        found = self._find(name, version, operation)
        if not isinstance(found, KeyVersion):
            return found
        if operation not in found.key_ops:
            return 400, {}, _error("BadParameter", f"Operation {operation} is not permitted on this key.")
        algorithm, value = payload["alg"], unb64url(payload["value"])
        try:
            if found.kty in ("RSA", "RSA-HSM") and algorithm == "RSA-OAEP-256":
                if operation == "wrapKey":
                    result = rsa_oaep_wrap(found.secret.public_key(), value)
                else:
                    result = rsa_oaep_unwrap(found.secret, value)
            elif found.kty == "oct-HSM" and algorithm == "A256KW":
                wrap = aes_key_wrap if operation == "wrapKey" else aes_key_unwrap
                result = wrap(found.secret, value)
            else:
                return (
                    400,
                    {},
                    _error("BadParameter", f"Algorithm {algorithm} is not supported for key type {found.kty}."),
                )
        except (ValueError, InvalidUnwrap):
            return 400, {}, _error("BadParameter", "The parameter is incorrect.")
        return 200, {}, {"kid": self.key_id(name, version), "value": b64url(result)}


def _error(code: str, message: str, inner: str | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if inner:
        error["innererror"] = {"code": inner}
    return {"error": error}


_FAILURE_TEXT = {
    429: ("Throttled", "Request was not allowed because application is exceeding the rate limit of the vault."),
    500: ("InternalServerError", "An unexpected error occurred."),
    503: ("ServiceUnavailable", "The service is temporarily unavailable."),
}


class FakeAzureNetwork(HTTPAdapter):
    """A requests adapter that delivers HTTPS requests to the registered fake vaults, by host."""

    def __init__(self) -> None:
        super().__init__()
        self.vaults: dict[str, FakeKeyVault] = {}
        self.token = "token-" + secrets.token_hex(8)  # what Entra ID would issue to the test's identity

    def add_vault(self, host: str | None = None, *, hsm: bool = False) -> FakeKeyVault:
        """A new vault (a Managed HSM if ``hsm``); a fresh host name by default, so no SDK cache knows it yet."""
        if host is None:
            host = (
                f"hsm{secrets.token_hex(4)}.managedhsm.azure.net"
                if hsm
                else f"kv{secrets.token_hex(4)}.vault.azure.net"
            )
        self.vaults[host] = FakeKeyVault(host, self.token)
        return self.vaults[host]

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        url = str(request.url)
        host = urlsplit(url).hostname or ""
        vault = self.vaults.get(host)
        if vault is None:
            raise requests.ConnectionError(f"Failed to resolve '{host}' ([Errno -2] Name or service not known)")
        body = request.body.encode() if isinstance(request.body, str) else request.body
        assert body is None or isinstance(body, bytes)
        headers_in = {str(k): str(v) for k, v in request.headers.items()}
        status, headers, payload = vault.handle(str(request.method), url, body, headers_in)
        content = json.dumps(payload).encode() if payload is not None else b""
        headers = {**headers, "Content-Length": str(len(content)), "x-ms-keyvault-service-version": "1.9.2000.1"}
        if payload is not None:
            headers["Content-Type"] = "application/json; charset=utf-8"
        raw = urllib3.HTTPResponse(body=io.BytesIO(content), headers=headers, status=status, preload_content=False)
        return self.build_response(request, raw)

    def transport(self) -> RequestsTransport:
        """azure-core's real requests transport over this network."""
        session = requests.Session()
        session.mount("https://", self)
        return RequestsTransport(session=session, session_owner=False)


class FakeCredential:
    """A TokenCredential that hands out the network's token and records the scopes and tenants asked for."""

    def __init__(self, network: FakeAzureNetwork) -> None:
        self.network = network
        self.requests: list[tuple[tuple[str, ...], str | None]] = []

    def get_token(self, *scopes: str, tenant_id: str | None = None, **kwargs: Any) -> AccessToken:
        self.requests.append((scopes, tenant_id))
        return AccessToken(self.network.token, int(time.time()) + 3600)


class FakeAzureProvider(AzureKeyVaultProvider):
    """The real provider, its SDK clients on ``network``, a ``FakeCredential`` instead of DefaultAzureCredential."""

    network: ClassVar[FakeAzureNetwork]

    def _new_credential(self) -> FakeCredential:
        self.credential = FakeCredential(self.network)
        return self.credential

    def _client_options(self) -> dict[str, Any]:
        return {**super()._client_options(), "transport": self.network.transport()}


def install(monkeypatch: pytest.MonkeyPatch) -> FakeAzureNetwork:
    """A fresh fake network; until ``monkeypatch`` undoes it, ``azure-kv://`` URIs build a FakeAzureProvider on it."""
    network = FakeAzureNetwork()
    monkeypatch.setattr(FakeAzureProvider, "network", network, raising=False)
    monkeypatch.setitem(SCHEMES, "azure-kv", (PROVIDER_IDS["azure-kv"], __name__, "FakeAzureProvider", "azure"))
    return network
