"""Binding the encryption context to a data key wrapped without associated data.

RSA-OAEP (Azure Key Vault RSA keys, GCP asymmetric decrypt keys) and AES key
wrap (Azure Managed HSM A256KW) take no associated data, so the key service
cannot check the context the way KMS Encrypt or Transit do. Instead the
wrapped plaintext is ``data key || SHA-256(label || canonical context)``;
after the service unwraps it, the digest must match the reader's context.
Both wraps are non-malleable, so the digest cannot be changed without the
data key changing too. 64 bytes fit every RSA-OAEP-SHA-256 key of 2048 bits
or more (190 bytes) and are a multiple of AES key wrap's 8-byte blocks.
"""

from __future__ import annotations

import hashlib
import hmac

from ..crypto import DATA_KEY_SIZE
from ..errors import InvalidEnvelope
from ..wire import canonical_context
from . import Context

__all__ = ["bind_context", "unbind_context", "BOUND_SIZE"]

_LABEL = b"kombu-envelope context binding v1\x00"
BOUND_SIZE = DATA_KEY_SIZE + hashlib.sha256().digest_size


def _digest(context: Context) -> bytes:
    return hashlib.sha256(_LABEL + canonical_context(context)).digest()


def bind_context(data_key: bytes, context: Context) -> bytes:
    """The plaintext to wrap: the data key followed by the digest of ``context``."""
    return data_key + _digest(context)


def unbind_context(key_uri: str, unwrapped: bytes, context: Context) -> bytes:
    """The data key inside an unwrapped ``bind_context`` plaintext, if it was bound to ``context``."""
    if len(unwrapped) != BOUND_SIZE:
        raise InvalidEnvelope(f"the data key unwrapped by {key_uri} is {len(unwrapped)} bytes, not a bound data key")
    if not hmac.compare_digest(unwrapped[DATA_KEY_SIZE:], _digest(context)):
        raise InvalidEnvelope(f"the data key wrapped under {key_uri} is bound to another encryption context")
    return unwrapped[:DATA_KEY_SIZE]
