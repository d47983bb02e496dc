"""Cryptographic primitives: data keys, AES-256-GCM and local RSA-OAEP wrapping.

Everything here is a thin, explicit use of pyca/cryptography. Key management
(who holds the master key) lives in ``kombu_envelope.providers``.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import InvalidEnvelope

__all__ = [
    "AESGCM",
    "DATA_KEY_SIZE",
    "generate_data_key",
    "counter_nonce",
    "seal",
    "open_sealed",
    "load_rsa_public_key",
    "rsa_oaep_wrap",
]

DATA_KEY_SIZE = 32  # AES-256
NONCE_SIZE = 12
_MAX_COUNTER = (1 << 96) - 1

_OAEP_SHA256 = padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


def generate_data_key() -> bytes:
    """A fresh random 256-bit data key from the operating system's CSPRNG."""
    return os.urandom(DATA_KEY_SIZE)


def counter_nonce(counter: int) -> bytes:
    """The 96-bit GCM nonce for message number ``counter`` under one data key.

    Counters are handed out once per data key across every process sharing
    it (see ``kombu_envelope.cache``), so nonces never repeat and no random
    nonce birthday bound applies.
    """
    if not 0 <= counter <= _MAX_COUNTER:
        raise ValueError("nonce counter out of range")
    return counter.to_bytes(NONCE_SIZE, "big")


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """AES-256-GCM with a random nonce: ``nonce || ciphertext || tag``.

    For low-volume use (wrapping data keys under a local master key), where a
    random nonce per call is well inside GCM's 2**32 random-nonce limit.
    """
    nonce = os.urandom(NONCE_SIZE)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def open_sealed(key: bytes, sealed: bytes, aad: bytes, what: str) -> bytes:
    """Reverse ``seal``; any forgery raises InvalidEnvelope naming ``what`` failed."""
    if len(sealed) < NONCE_SIZE + 16:
        raise InvalidEnvelope(f"truncated {what}")
    try:
        return AESGCM(key).decrypt(sealed[:NONCE_SIZE], sealed[NONCE_SIZE:], aad)
    except InvalidTag:
        raise InvalidEnvelope(f"{what} failed authentication (altered, or sealed under another key)") from None


def load_rsa_public_key(pem_or_der: bytes) -> rsa.RSAPublicKey:
    """Load an RSA public key from PEM or DER (SubjectPublicKeyInfo), as key services export them."""
    if pem_or_der.lstrip().startswith(b"-----"):
        key = serialization.load_pem_public_key(pem_or_der)
    else:
        key = serialization.load_der_public_key(pem_or_der)
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("the public key is not an RSA key")
    if key.key_size < 2048:
        raise ValueError(f"RSA keys shorter than 2048 bits are refused (got {key.key_size})")
    return key


def rsa_oaep_wrap(public_key: rsa.RSAPublicKey, data_key: bytes) -> bytes:
    """Wrap a data key locally with RSA-OAEP (SHA-256, MGF1-SHA-256), the scheme KMS, Transit and Key Vault unwrap."""
    return public_key.encrypt(data_key, _OAEP_SHA256)


def rsa_oaep_unwrap(private_key: rsa.RSAPrivateKey, wrapped: bytes) -> bytes:
    """Inverse of ``rsa_oaep_wrap``; used by test doubles of key services that hold a real private key."""
    return private_key.decrypt(wrapped, _OAEP_SHA256)
