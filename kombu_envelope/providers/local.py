"""``local://PATH``: a 256-bit master key in a file, for development and tests only.

Anyone who can read the file can read every message: production deployments
use a key service (AWS KMS, Vault/OpenBao Transit, Azure Key Vault, GCP KMS),
which keeps the master key out of the application's reach and audits its use.

Key file format: one line ``kombu-envelope-local-key-v1:<base64 of 32 bytes>``.
"""

from __future__ import annotations

import base64
import os
import stat

from ..crypto import DATA_KEY_SIZE, open_sealed, seal
from ..errors import ConfigurationError
from ..wire import canonical_context
from . import Context, KeyProvider

KEY_FILE_PREFIX = "kombu-envelope-local-key-v1:"
_WRAP_AAD = b"kombu-envelope local wrap v1\x00"
_DIRECT_AAD = b"kombu-envelope local direct v1\x00"


def write_key_file(path: str) -> None:
    """Create a new key file readable only by its owner; never overwrite an existing one."""
    key = base64.b64encode(os.urandom(DATA_KEY_SIZE)).decode()
    # O_EXCL: refuse to overwrite (a lost key loses every message under it); 0o600 from the start.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(KEY_FILE_PREFIX + key + "\n")


def read_key_file(path: str) -> bytes:
    """Read a key file, with errors that say how to make one."""
    try:
        with open(path, encoding="ascii") as f:
            text = f.read().strip()
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ConfigurationError(f"local key file {path!r} does not exist; create it with: kombu-envelope keygen {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"local key file {path!r} cannot be read: {exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigurationError(f"local key file {path!r} is readable by others; run: chmod 600 {path}")
    if not text.startswith(KEY_FILE_PREFIX):
        raise ConfigurationError(f"{path!r} is not a kombu-envelope key file; create one with: kombu-envelope keygen PATH")
    try:
        key = base64.b64decode(text[len(KEY_FILE_PREFIX) :], validate=True)
    except ValueError:
        key = b""
    if len(key) != DATA_KEY_SIZE:
        raise ConfigurationError(f"local key file {path!r} is damaged (expected a base64 256-bit key)")
    return key


class LocalKeyProvider(KeyProvider):
    """Wraps data keys with AES-256-GCM under a master key read from a file."""

    scheme = "local"
    max_direct_plaintext = 1 << 20

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        self.path = uri[len("local://") :]
        if not self.path:
            raise ValueError(f"{uri!r} names no key file; expected local:///path/to/key")
        self._master_key: bytes | None = None

    @property
    def master_key(self) -> bytes:
        if self._master_key is None:
            self._master_key = read_key_file(self.path)
        return self._master_key

    def wrap_data_key(self, data_key: bytes, context: Context) -> bytes:
        return seal(self.master_key, data_key, _WRAP_AAD + canonical_context(context))

    def unwrap_data_key(self, wrapped: bytes, context: Context) -> bytes:
        return open_sealed(self.master_key, wrapped, _WRAP_AAD + canonical_context(context), "wrapped data key")

    def encrypt(self, plaintext: bytes, context: Context) -> bytes:
        return seal(self.master_key, plaintext, _DIRECT_AAD + canonical_context(context))

    def decrypt(self, ciphertext: bytes, context: Context) -> bytes:
        return open_sealed(self.master_key, ciphertext, _DIRECT_AAD + canonical_context(context), "direct-mode ciphertext")
