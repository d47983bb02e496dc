"""The envelope wire format, version 1: the only place that knows the byte layout.

All integers are unsigned big-endian. ``docs/format.md`` is the specification;
keep the two in step.

    offset  size  field
    0       1     version            0x01
    1       1     algorithm          0x01 AES-256-GCM under a data key
                                     0x02 direct: the key service encrypted the payload
    2       1     flags              bit 0: encryption context present
                                     bits 1-2: payload compression (0 none, 1 zlib, 2 zstd)
                                     other bits must be zero
    3       1     n                  number of wrapped keys, 1..8
    [4      2     c                  context length        (only if flag bit 0)
     6      c     context            canonical JSON, UTF-8 (only if flag bit 0)]
    then n times:
            1     provider id        see kombu_envelope.providers.PROVIDER_IDS
            4     key fingerprint    first 4 bytes of SHA-256 of the key URI
            2     w                  wrapped key length, 1..65535
            w     wrapped key        opaque to this module
    then, for algorithm 0x01:
            12    nonce
            rest  ciphertext || 16-byte GCM tag
    for algorithm 0x02 the single "wrapped key" is the key service's
    ciphertext of the payload and nothing follows it.

The header (every byte before the nonce) is the AEAD's associated data, so
changing any header byte, including a wrapped key the reader does not use,
fails authentication.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Mapping

from .errors import InvalidEnvelope

VERSION = 1
ALG_AES256_GCM = 1
ALG_DIRECT = 2
FLAG_CONTEXT = 0x01
COMPRESSION_SHIFT = 1
COMPRESSION_MASK = 0x06
COMPRESSION_IDS = {None: 0, "zlib": 1, "zstd": 2}
COMPRESSION_NAMES = {v: k for k, v in COMPRESSION_IDS.items()}
KNOWN_FLAGS = FLAG_CONTEXT | COMPRESSION_MASK
MAX_WRAPPED_KEYS = 8
FINGERPRINT_SIZE = 4
NONCE_SIZE = 12
TAG_SIZE = 16
ALGORITHM_NAMES = {ALG_AES256_GCM: "AES-256-GCM", ALG_DIRECT: "direct (key service)"}

_KEY_ENTRY = struct.Struct(">B4sH")  # provider id, fingerprint, wrapped length


@dataclass(frozen=True)
class WrappedKey:
    """A data key (or, in direct mode, a payload) as wrapped by one key service."""

    provider_id: int
    fingerprint: bytes
    wrapped: bytes


@dataclass(frozen=True)
class Header:
    """The parsed, not yet authenticated, header of an envelope."""

    algorithm: int
    compression: str | None
    context: Mapping[str, str] | None
    wrapped_keys: tuple[WrappedKey, ...]
    size: int  # bytes from offset 0 to the end of the last wrapped key


def canonical_context(context: Mapping[str, str] | None) -> bytes:
    """The one byte form of an encryption context: sorted, compact JSON; empty for none."""
    if not context:
        return b""
    return json.dumps(dict(context), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def build_header(
    algorithm: int,
    wrapped_keys: list[WrappedKey] | tuple[WrappedKey, ...],
    context: Mapping[str, str] | None = None,
    compression: str | None = None,
) -> bytes:
    """Serialize a header. Raises ValueError for values the format cannot carry."""
    if not 1 <= len(wrapped_keys) <= MAX_WRAPPED_KEYS:
        raise ValueError(f"an envelope carries 1 to {MAX_WRAPPED_KEYS} wrapped keys, not {len(wrapped_keys)}")
    flags = COMPRESSION_IDS[compression] << COMPRESSION_SHIFT
    parts = [b""]
    context_bytes = canonical_context(context)
    if context_bytes:
        if len(context_bytes) > 0xFFFF:
            raise ValueError("the encryption context is larger than 65535 bytes")
        flags |= FLAG_CONTEXT
        parts.append(len(context_bytes).to_bytes(2, "big") + context_bytes)
    for key in wrapped_keys:
        if not 1 <= len(key.wrapped) <= 0xFFFF or len(key.fingerprint) != FINGERPRINT_SIZE:
            raise ValueError("a wrapped key must be 1 to 65535 bytes with a 4-byte fingerprint")
        parts.append(_KEY_ENTRY.pack(key.provider_id, key.fingerprint, len(key.wrapped)) + key.wrapped)
    parts[0] = bytes((VERSION, algorithm, flags, len(wrapped_keys)))
    return b"".join(parts)


def header_size(data: bytes) -> int:
    """Length of the header of ``data``, checking only what is needed to find it.

    The decoder's hot path: callers that find the header in their cache never
    build a ``Header``. Authentication (or ``parse_header``) checks the rest.
    """
    try:
        if data[0] != VERSION:
            raise InvalidEnvelope(_version_reason(data[0]))
        flags = data[2]
        count = data[3]
        if count > MAX_WRAPPED_KEYS:  # bound the walk: a forged count must not make a 16 MB "header"
            raise InvalidEnvelope(f"wrapped key count {count} is outside 1..{MAX_WRAPPED_KEYS}")
        pos = 4
        if flags & FLAG_CONTEXT:
            pos += 2 + ((data[4] << 8) | data[5])
        for _ in range(count):
            pos += 7 + ((data[pos + 5] << 8) | data[pos + 6])
    except IndexError:
        raise InvalidEnvelope("truncated header") from None
    if pos > len(data):
        raise InvalidEnvelope("truncated header")
    return pos


def parse_header(data: bytes) -> Header:
    """Parse and validate every header field. Raises InvalidEnvelope with the reason."""
    if len(data) < 4:
        raise InvalidEnvelope("truncated header")
    version, algorithm, flags, count = data[0], data[1], data[2], data[3]
    if version != VERSION:
        raise InvalidEnvelope(_version_reason(version))
    if algorithm not in ALGORITHM_NAMES:
        raise InvalidEnvelope(f"unknown algorithm id {algorithm}")
    if flags & ~KNOWN_FLAGS:
        raise InvalidEnvelope(f"unknown header flags 0x{flags:02x}")
    compression_id = (flags & COMPRESSION_MASK) >> COMPRESSION_SHIFT
    if compression_id not in COMPRESSION_NAMES:
        raise InvalidEnvelope(f"unknown compression id {compression_id}")
    if not 1 <= count <= MAX_WRAPPED_KEYS:
        raise InvalidEnvelope(f"wrapped key count {count} is outside 1..{MAX_WRAPPED_KEYS}")
    if algorithm == ALG_DIRECT and count != 1:
        raise InvalidEnvelope("a direct-mode envelope carries exactly one ciphertext")
    pos = 4
    context = None
    if flags & FLAG_CONTEXT:
        end = pos + 2 + int.from_bytes(data[pos : pos + 2], "big")
        if end > len(data) or end - pos < 2:
            raise InvalidEnvelope("truncated encryption context")
        context = _parse_context(data[pos + 2 : end])
        pos = end
    keys = []
    for _ in range(count):
        if pos + _KEY_ENTRY.size > len(data):
            raise InvalidEnvelope("truncated wrapped key")
        provider_id, fingerprint, length = _KEY_ENTRY.unpack_from(data, pos)
        pos += _KEY_ENTRY.size
        if length == 0 or pos + length > len(data):
            raise InvalidEnvelope("truncated wrapped key")
        keys.append(WrappedKey(provider_id, bytes(fingerprint), bytes(data[pos : pos + length])))
        pos += length
    if algorithm == ALG_AES256_GCM and len(data) - pos < NONCE_SIZE + TAG_SIZE:
        raise InvalidEnvelope("truncated ciphertext")
    if algorithm == ALG_DIRECT and pos != len(data):
        raise InvalidEnvelope("trailing bytes after a direct-mode ciphertext")
    return Header(algorithm, COMPRESSION_NAMES[compression_id], context, tuple(keys), pos)


def _parse_context(raw: bytes) -> dict[str, str]:
    try:
        context = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: deeply nested JSON
        raise InvalidEnvelope("malformed encryption context") from None
    if (
        not isinstance(context, dict)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in context.items())
        or canonical_context(context) != raw
    ):
        raise InvalidEnvelope("malformed encryption context")
    return context


def _version_reason(version: int) -> str:
    return f"unsupported format version {version} (this kombu-envelope reads version {VERSION}; upgrade it)"
