"""A fake Google Cloud KMS for tests: the real SDK and REST transport over real HTTP on 127.0.0.1.

No Cloud KMS emulator can run here, so ``FakeCloudKms`` is a small HTTP
server speaking the Cloud KMS REST API v1 (the JSON the REST transport sends
and parses: base64 bytes, int64 as strings, enums as numbers). It holds real
keys (AES-256 for symmetric keys, RSA private keys for asymmetric decrypt
versions), does the cryptography for real, checks and returns the CRC32C
fields as Cloud KMS does, and records every request so tests can assert
exactly what the SDK sent. ``FakeGcpProvider`` is the real provider whose
client talks to it with a static OAuth token instead of Application Default
Credentials.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar
from urllib.parse import parse_qsl, urlsplit

import google_crc32c
import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from google.cloud.kms_v1 import CryptoKeyVersion, KeyManagementServiceClient, ProtectionLevel
from google.cloud.kms_v1.services.key_management_service.transports.rest import KeyManagementServiceRestTransport
from google.oauth2.credentials import Credentials

from kombu_envelope.crypto import rsa_oaep_unwrap
from kombu_envelope.providers import PROVIDER_IDS, SCHEMES
from kombu_envelope.providers.gcp_kms import GcpKmsProvider

ALGORITHM = CryptoKeyVersion.CryptoKeyVersionAlgorithm
_ROUTE = re.compile(
    r"/v1/(?P<name>projects/[^:]+?)(?::(?P<verb>encrypt|decrypt|asymmetricDecrypt)|/(?P<public>publicKey))"
)


def crc32c(data: bytes) -> str:
    return str(google_crc32c.value(data))  # int64 fields are strings in JSON


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@dataclass
class Recorded:
    """One request as it reached the service."""

    method: str
    path: str
    query: dict[str, str]
    body: Any
    authorization: str | None
    request_params: str | None  # x-goog-request-params: the routing header


@dataclass
class KeyVersion:
    algorithm: Any  # CryptoKeyVersionAlgorithm
    secret: Any  # AES key bytes or rsa.RSAPrivateKey
    state: str = "ENABLED"


@dataclass
class CryptoKey:
    purpose: str  # "ENCRYPT_DECRYPT" or "ASYMMETRIC_DECRYPT"
    versions: dict[int, KeyVersion] = field(default_factory=dict)
    primary: int = 0


class FakeCloudKms:
    """Cloud KMS REST API v1 on http://127.0.0.1:PORT: ``start()``, ``stop()``, keys, requests, injected failures."""

    def __init__(self) -> None:
        self.token = "ya29." + secrets.token_urlsafe(16)
        self.keys: dict[str, CryptoKey] = {}
        self.requests: list[Recorded] = []
        self.denied: set[str] = set()  # verbs ("encrypt", "publicKey", ...) the caller has no permission for
        # Next answers: an HTTP status, "corrupt" (bytes damaged on the way back) or "unverified" (the
        # request's checksums did not match what arrived).
        self.failures: list[int | str] = []
        self._server: ThreadingHTTPServer | None = None
        self.port = 0

    # -- keys -------------------------------------------------------------

    def create_symmetric_key(self, name: str) -> str:
        """A new ENCRYPT_DECRYPT key, or a new primary version of it; returns the key's resource name."""
        key = self.keys.setdefault(name, CryptoKey("ENCRYPT_DECRYPT"))
        key.primary = len(key.versions) + 1
        key.versions[key.primary] = KeyVersion(ALGORITHM.GOOGLE_SYMMETRIC_ENCRYPTION, os.urandom(32))
        return name

    def create_asymmetric_version(self, name: str, algorithm: Any = ALGORITHM.RSA_DECRYPT_OAEP_2048_SHA256) -> str:
        """A new ASYMMETRIC_DECRYPT key version; returns the version's resource name."""
        key = self.keys.setdefault(name, CryptoKey("ASYMMETRIC_DECRYPT"))
        number = len(key.versions) + 1
        size = int(re.search(r"_(\d{4})_", algorithm.name).group(1))  # type: ignore[union-attr]
        key.versions[number] = KeyVersion(algorithm, rsa.generate_private_key(public_exponent=65537, key_size=size))
        return f"{name}/cryptoKeyVersions/{number}"

    def version(self, version_name: str) -> KeyVersion:
        name, _, number = version_name.partition("/cryptoKeyVersions/")
        return self.keys[name].versions[int(number)]

    def operations(self) -> list[tuple[str, str]]:
        """(method, path) of every request, in order."""
        return [(r.method, r.path) for r in self.requests]

    # -- server -----------------------------------------------------------

    @property
    def host(self) -> str:
        """Where the service listens (after ``stop()``: where it listened, which now refuses connections)."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self._answer()

            def do_POST(self) -> None:
                self._answer()

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                status, payload = service.handle(self.command, self.path, body, dict(self.headers))
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=UTF-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="fake-cloud-kms", daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # -- the service ------------------------------------------------------

    def handle(self, method: str, target: str, body: Any, headers: dict[str, str]) -> tuple[int, Any]:
        parts = urlsplit(target)
        lower = {k.lower(): v for k, v in headers.items()}
        self.requests.append(
            Recorded(
                method,
                parts.path,
                dict(parse_qsl(parts.query)),
                body,
                lower.get("authorization"),
                lower.get("x-goog-request-params"),
            )
        )
        if lower.get("authorization") != f"Bearer {self.token}":
            return _error(
                401, "UNAUTHENTICATED", "Request had invalid authentication credentials. Expected OAuth 2 access token."
            )
        route = _ROUTE.fullmatch(parts.path)
        if route is None:
            return _error(404, "NOT_FOUND", f"The requested URL {parts.path} was not found on this server.")
        verb = route["verb"] or route["public"]
        failure = self.failures.pop(0) if self.failures else None
        if isinstance(failure, int):
            return _error(failure, *_FAILURE_TEXT[failure])
        status, payload = self._dispatch(verb, route["name"], body or {})
        if failure == "corrupt" and status == 200:
            for field_name in ("plaintext", "ciphertext", "pem"):
                if field_name in payload:
                    value = payload[field_name]
                    payload[field_name] = value[:-4] + ("AAAA" if value[-4:] != "AAAA" else "BBBB")
        if failure == "unverified" and status == 200:
            for field_name in list(payload):
                if field_name.startswith("verified"):
                    payload[field_name] = False
        return status, payload

    def _dispatch(self, verb: str, name: str, body: dict[str, Any]) -> tuple[int, Any]:
        if verb in self.denied:
            permission = {
                "encrypt": "useToEncrypt",
                "decrypt": "useToDecrypt",
                "asymmetricDecrypt": "useToDecrypt",
                "publicKey": "viewPublicKey",
            }[verb]
            return _error(
                403,
                "PERMISSION_DENIED",
                f"Permission 'cloudkms.cryptoKeyVersions.{permission}' denied on resource '{name}' "
                "(or it may not exist).",
            )
        key_name, _, number = name.partition("/cryptoKeyVersions/")
        key = self.keys.get(key_name)
        if key is None or (number and int(number) not in key.versions):
            kind = "CryptoKeyVersion" if number else "CryptoKey"
            return _error(404, "NOT_FOUND", f"{kind} {name} not found.")
        if verb in ("encrypt", "decrypt") and (number or key.purpose != "ENCRYPT_DECRYPT"):
            return _error(
                400, "FAILED_PRECONDITION", f"{name} has purpose {key.purpose}; {verb} needs ENCRYPT_DECRYPT."
            )
        if verb in ("asymmetricDecrypt", "publicKey") and key.purpose != "ASYMMETRIC_DECRYPT":
            return _error(
                400, "FAILED_PRECONDITION", f"{name} has purpose {key.purpose}; {verb} needs an asymmetric key."
            )
        for field_name in ("plaintext", "ciphertext", "additionalAuthenticatedData"):
            if (
                f"{field_name}Crc32c" in body
                and crc32c(base64.b64decode(body.get(field_name, ""))) != body[f"{field_name}Crc32c"]
            ):
                return _error(
                    400,
                    "INVALID_ARGUMENT",
                    f"The checksum in field {field_name}_crc32c did not match the data in field {field_name}.",
                )
        return getattr(self, f"_{verb}")(key, name, body)

    def _encrypt(self, key: CryptoKey, name: str, body: dict[str, Any]) -> tuple[int, Any]:
        version = key.versions[key.primary]
        if version.state != "ENABLED":
            return _disabled(f"{name}/cryptoKeyVersions/{key.primary}", version)
        nonce = os.urandom(12)
        aad = base64.b64decode(body.get("additionalAuthenticatedData", ""))
        ciphertext = (
            key.primary.to_bytes(4, "big")
            + nonce
            + AESGCM(version.secret).encrypt(nonce, base64.b64decode(body["plaintext"]), aad)
        )
        return 200, {
            "name": f"{name}/cryptoKeyVersions/{key.primary}",
            "ciphertext": b64(ciphertext),
            "ciphertextCrc32c": crc32c(ciphertext),
            "verifiedPlaintextCrc32c": "plaintextCrc32c" in body,
            "verifiedAdditionalAuthenticatedDataCrc32c": "additionalAuthenticatedDataCrc32c" in body,
            "protectionLevel": int(ProtectionLevel.SOFTWARE),
        }

    def _decrypt(self, key: CryptoKey, name: str, body: dict[str, Any]) -> tuple[int, Any]:
        ciphertext = base64.b64decode(body["ciphertext"])
        version = key.versions.get(int.from_bytes(ciphertext[:4], "big"))
        if version is None or len(ciphertext) < 4 + 12 + 16:
            return _error(400, "INVALID_ARGUMENT", "Decryption failed: the ciphertext is invalid.")
        if version.state != "ENABLED":
            return _disabled(f"{name}/cryptoKeyVersions/{int.from_bytes(ciphertext[:4], 'big')}", version)
        aad = base64.b64decode(body.get("additionalAuthenticatedData", ""))
        try:
            plaintext = AESGCM(version.secret).decrypt(ciphertext[4:16], ciphertext[16:], aad)
        except InvalidTag:
            return _error(400, "INVALID_ARGUMENT", "Decryption failed: the ciphertext is invalid.")
        return 200, {
            "plaintext": b64(plaintext),
            "plaintextCrc32c": crc32c(plaintext),
            "usedPrimary": version is key.versions[key.primary],
            "protectionLevel": int(ProtectionLevel.SOFTWARE),
        }

    def _asymmetricDecrypt(self, key: CryptoKey, name: str, body: dict[str, Any]) -> tuple[int, Any]:
        version = self.version(name)
        if version.state != "ENABLED":
            return _disabled(name, version)
        try:
            plaintext = rsa_oaep_unwrap(version.secret, base64.b64decode(body["ciphertext"]))
        except ValueError:
            return _error(
                400, "INVALID_ARGUMENT", "Decryption failed: verify that 'name' refers to the correct CryptoKey."
            )
        return 200, {
            "plaintext": b64(plaintext),
            "plaintextCrc32c": crc32c(plaintext),
            "verifiedCiphertextCrc32c": "ciphertextCrc32c" in body,
            "protectionLevel": int(ProtectionLevel.SOFTWARE),
        }

    def _publicKey(self, key: CryptoKey, name: str, body: dict[str, Any]) -> tuple[int, Any]:
        version = self.version(name)
        if version.state != "ENABLED":
            return _disabled(name, version)
        pem = version.secret.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return 200, {
            "pem": pem.decode(),
            "algorithm": int(version.algorithm),
            "pemCrc32c": crc32c(pem),
            "name": name,
            "protectionLevel": int(ProtectionLevel.SOFTWARE),
        }


def _error(status: int, rpc_status: str, message: str) -> tuple[int, Any]:
    return status, {"error": {"code": status, "message": message, "status": rpc_status}}


def _disabled(version_name: str, version: KeyVersion) -> tuple[int, Any]:
    return _error(400, "FAILED_PRECONDITION", f"{version_name} is not enabled, current state is: {version.state}.")


_FAILURE_TEXT = {
    429: (
        "RESOURCE_EXHAUSTED",
        "Quota exceeded for quota metric 'Cryptographic requests' and limit 'Cryptographic requests per minute'.",
    ),
    500: ("INTERNAL", "Internal error encountered."),
    503: ("UNAVAILABLE", "The service is currently unavailable."),
}


class FakeGcpProvider(GcpKmsProvider):
    """The real provider; its client uses the REST transport to ``service`` with a static OAuth token."""

    service: ClassVar[FakeCloudKms]

    def _create_client(self) -> KeyManagementServiceClient:
        credentials = Credentials(token=self.service.token)
        transport = KeyManagementServiceRestTransport(
            host=self.service.host, url_scheme="http", credentials=credentials
        )
        return KeyManagementServiceClient(transport=transport)


def install(service: FakeCloudKms, monkeypatch: pytest.MonkeyPatch) -> FakeCloudKms:
    """Clear ``service``'s records; until ``monkeypatch`` undoes it, ``gcp-kms://`` URIs build FakeGcpProviders."""
    service.requests.clear()
    service.failures.clear()
    service.denied.clear()
    monkeypatch.setattr(FakeGcpProvider, "service", service, raising=False)
    monkeypatch.setitem(SCHEMES, "gcp-kms", (PROVIDER_IDS["gcp-kms"], __name__, "FakeGcpProvider", "gcp"))
    return service


def key_name(prefix: str = "orders") -> str:
    """A fresh CryptoKey resource name."""
    return f"projects/kombu-test/locations/europe-west1/keyRings/celery/cryptoKeys/{prefix}-{secrets.token_hex(4)}"
