"""A minimal Vault/OpenBao Transit key provider over urllib, registered as ``test-transit://MOUNT/keys/NAME``.

Test-local stand-in while kombu_envelope/providers/vault.py is being written:
real HTTP calls to a real OpenBao (VAULT_ADDR, VAULT_TOKEN), with the same
error contract every provider has: unreachable, timeout, 429 and 5xx are
transient KeyServiceErrors; other refusals are permanent. A worker loads it
through the ``imports`` setting of its app module.
"""

from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.request
from typing import Any

from kombu_envelope.errors import KeyServiceError
from kombu_envelope.providers import PROVIDER_IDS, SCHEMES, Context, KeyProvider

SCHEME = "test-transit"
TIMEOUT = 2.0


class UrllibTransitProvider(KeyProvider):
    scheme = SCHEME

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        mount, _, name = uri[len(SCHEME) + 3 :].partition("/keys/")
        self.mount, self.name = mount, name

    def generate_data_key(self, context: Context) -> tuple[bytes, bytes]:
        data = self._call("datakey/plaintext", {})
        return base64.b64decode(data["plaintext"]), data["ciphertext"].encode()

    def wrap_data_key(self, data_key: bytes, context: Context) -> bytes:
        return self._call("encrypt", {"plaintext": base64.b64encode(data_key).decode()})["ciphertext"].encode()

    def unwrap_data_key(self, wrapped: bytes, context: Context) -> bytes:
        return base64.b64decode(self._call("decrypt", {"ciphertext": wrapped.decode("ascii", "replace")})["plaintext"])

    def _call(self, operation: str, body: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(
            f"{os.environ['VAULT_ADDR']}/v1/{self.mount}/{operation}/{self.name}",
            data=json.dumps(body).encode(),
            headers={"X-Vault-Token": os.environ["VAULT_TOKEN"]},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
                return json.load(response)["data"]
        except urllib.error.HTTPError as exc:
            transient = exc.code == 429 or exc.code >= 500
            raise KeyServiceError(self.uri, f"HTTP {exc.code}", transient=transient) from None
        except (OSError, ValueError) as exc:  # URLError, refused, reset, timeout
            raise KeyServiceError(self.uri, f"unreachable: {exc}", transient=True) from None


def register() -> None:
    SCHEMES.setdefault(SCHEME, (250, __name__, "UrllibTransitProvider", None))
    PROVIDER_IDS.setdefault(SCHEME, 250)


register()
