"""Decoder fuzzing shared by tests/test_fuzz_decoder.py and benchmarks/fuzz_decoder.py.

The property: ``EnvelopeCodec.decode`` of ANY input either returns a value or
raises one of the documented exceptions (InvalidEnvelope and its UnknownKey,
KeyServiceError, ConfigurationError). Inputs start from valid envelopes of
every shape the format has (context, compression, multi-wrap, direct mode)
and from envelopes whose authenticated plaintext is arbitrary bytes (a key
holder's garbage), and go through structure-aware mutations: every field of
the layout (``envelope_fields``) gets boundary values, lengths get
inconsistent, bytes flip, inputs are cut, stretched and spliced.
"""

from __future__ import annotations

import os
import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kombu_envelope import wire
from kombu_envelope.cache import DataKeyCache
from kombu_envelope.codec import EnvelopeCodec
from kombu_envelope.crypto import AESGCM
from kombu_envelope.errors import ConfigurationError, InvalidEnvelope, KeyServiceError
from kombu_envelope.providers.local import LocalKeyProvider, write_key_file

DOCUMENTED = (InvalidEnvelope, KeyServiceError, ConfigurationError)
INTERESTING_BYTES = (0x00, 0x01, 0x02, 0x03, 0x07, 0x08, 0x09, 0x7F, 0x80, 0xFE, 0xFF)


def envelope_fields(data: bytes) -> list[tuple[str, int, int]]:
    """``(field, start, end)`` for every field of a valid envelope, in wire order (see docs/format.md)."""
    header = wire.parse_header(data)
    fields = [("version", 0, 1), ("algorithm", 1, 2), ("flags", 2, 3), ("key count", 3, 4)]
    pos = 4
    if header.context is not None:
        size = int.from_bytes(data[4:6], "big")
        fields += [("context length", 4, 6), ("context", 6, 6 + size)]
        pos = 6 + size
    for _ in header.wrapped_keys:
        size = int.from_bytes(data[pos + 5 : pos + 7], "big")
        fields += [
            ("provider id", pos, pos + 1),
            ("fingerprint", pos + 1, pos + 5),
            ("wrapped key length", pos + 5, pos + 7),
            ("wrapped key", pos + 7, pos + 7 + size),
        ]
        pos += 7 + size
    if header.algorithm == wire.ALG_AES256_GCM:
        nonce_end = pos + wire.NONCE_SIZE
        fields += [
            ("nonce", pos, nonce_end),
            ("ciphertext", nonce_end, len(data) - wire.TAG_SIZE),
            ("tag", len(data) - wire.TAG_SIZE, len(data)),
        ]
    return fields


@dataclass
class Seed:
    """A valid input and the codec that decodes it."""

    codec: EnvelopeCodec
    data: bytes
    fields: list[tuple[str, int, int]]


class DecoderTarget:
    """Codecs of every shape under two local keys, and a corpus of valid envelopes for each."""

    def __init__(self, directory: str) -> None:
        uris = []
        for name in ("a.key", "b.key"):
            path = os.path.join(directory, name)
            write_key_file(path)
            uris.append(f"local://{path}")
        context = {"app": "fuzz", "tenant": "t-1"}
        codecs = [
            EnvelopeCodec([uris[0]], cache=DataKeyCache()),
            EnvelopeCodec(uris, context=context, compression="zlib", cache=DataKeyCache()),
            EnvelopeCodec([uris[1]], [uris[0]], context=context, cache=DataKeyCache()),
            EnvelopeCodec([uris[0]], mode="direct", context=context, cache=DataKeyCache()),
        ]
        values: list[Any] = [
            [],
            [[1, 2], {"x": "y"}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}],
            {"text": "é" * 40, "n": 2**70, "f": 1.5, "none": None, "nested": [[[[]]]]},
            ["z" * 3000],
        ]
        self.seeds = [Seed(c, d, envelope_fields(d)) for c in codecs for d in map(c.encode, values)]
        # Authenticated garbage: what a buggy or hostile key holder could send.
        plain, zlib_compressed = self.seeds[0], self.seeds[len(values)]
        for plaintext in (b"", b"\xff\xfe", b"[" * 5000, b'{"__type__": "decimal", "__value__": "x"}', b"1e999999", b"nul\x00l"):
            self.seeds.append(self._sealed(plain, plaintext))
        for plaintext in (b"", b"not zlib", zlib.compress(b"[1,2")[:-3], zlib.compress(b"\xff" * 100), zlib.compress(b"{}") + b"tail"):
            self.seeds.append(self._sealed(zlib_compressed, plaintext))
        self.codecs = codecs

    @staticmethod
    def _sealed(seed: Seed, plaintext: bytes) -> Seed:
        """An envelope under ``seed``'s header (so its data key) whose plaintext is ``plaintext``."""
        header = wire.parse_header(seed.data)
        wrapped = header.wrapped_keys[0].wrapped
        provider = LocalKeyProvider(seed.codec.key_uris[0])
        data_key = provider.unwrap_data_key(wrapped, header.context or {})
        nonce = os.urandom(wire.NONCE_SIZE)
        head = seed.data[: header.size]
        data = head + nonce + AESGCM(data_key).encrypt(nonce, plaintext, head)
        return Seed(seed.codec, data, envelope_fields(data))


# -- mutations: each takes the seed and a Random, returns new bytes ----------


def _flip_bits(seed: Seed, rng: random.Random) -> bytes:
    data = bytearray(seed.data)
    for _ in range(rng.randint(1, 4)):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    return bytes(data)


def _field_value(seed: Seed, rng: random.Random) -> bytes:
    """Give one field a boundary value: lengths 0, 1, off by one, maximal; bytes 0x00, 0xFF, ..."""
    fields = [f for f in seed.fields if f[2] <= len(seed.data)]
    if not fields:
        return _flip_bits(seed, rng)
    name, start, end = rng.choice(fields)
    data = bytearray(seed.data)
    if end - start == 2 and "length" in name:
        current = int.from_bytes(data[start:end], "big")
        value = rng.choice((0, 1, current - 1, current + 1, 0xFFFF, rng.randrange(0x10000)))
        data[start:end] = (value % 0x10000).to_bytes(2, "big")
    elif end > start:
        pos = rng.randrange(start, end)
        data[pos] = rng.choice(INTERESTING_BYTES + (rng.randrange(256),))
    return bytes(data)


def _cut(seed: Seed, rng: random.Random) -> bytes:
    """Truncate at or near a field boundary, or anywhere."""
    _, start, end = rng.choice(seed.fields)
    at = rng.choice((start, end, start + 1, end - 1, rng.randrange(len(seed.data) + 1)))
    return seed.data[: max(at, 0)]


def _stretch(seed: Seed, rng: random.Random) -> bytes:
    """Insert, delete or append bytes (lengths no longer match the fields)."""
    data = bytearray(seed.data)
    pos = rng.randrange(len(data) + 1)
    choice = rng.randrange(3)
    if choice == 0:
        data[pos:pos] = rng.randbytes(rng.randint(1, 16))
    elif choice == 1:
        del data[pos : pos + rng.randint(1, 16)]
    else:
        data += rng.randbytes(rng.choice((1, 15, 16, 17, 1000)))
    return bytes(data)


def _context(seed: Seed, rng: random.Random) -> bytes:
    """Replace the encryption context with hostile JSON, length kept consistent."""
    context = rng.choice(
        (
            b"[" * 20000 + b"]" * 20000,
            b'{"a":' * 10000 + b"1" + b"}" * 10000,
            b'{"app":"fuzz","tenant":"t-1"}',
            b'{"tenant":"t-1","app":"fuzz"}',
            b'{"app":1}',
            b'{"app":"\xff"}',
            b'{"a":"b","a":"c"}',
            b'{"app": "fuzz"}',
            b"1" * 5000,
            b"",
            rng.randbytes(rng.randint(1, 40)),
        )
    )
    data = seed.data
    if len(data) < 6:
        return _random_bytes(seed, rng)
    flags = data[2] | wire.FLAG_CONTEXT
    rest = 4 + 2 + int.from_bytes(data[4:6], "big") if data[2] & wire.FLAG_CONTEXT else 4
    return bytes((data[0], data[1], flags, data[3])) + len(context).to_bytes(2, "big") + context + data[rest:]


def _splice(seed: Seed, rng: random.Random, other: Seed | None = None) -> bytes:
    other = other or seed
    return seed.data[: rng.randrange(len(seed.data) + 1)] + other.data[rng.randrange(len(other.data) + 1) :]


def _random_bytes(seed: Seed, rng: random.Random) -> bytes:
    prefix = bytes((1, rng.choice((1, 2, 3)), rng.randrange(8), rng.randrange(10))) if rng.random() < 0.7 else b""
    return prefix + rng.randbytes(rng.choice((0, 1, 3, 7, 30, 100, 300)))


MUTATIONS: list[Callable[[Seed, random.Random], bytes]] = [
    _flip_bits,
    _field_value,
    _field_value,
    _cut,
    _stretch,
    _context,
    _splice,
    _random_bytes,
]


def mutate(target: DecoderTarget, rng: random.Random) -> tuple[EnvelopeCodec, Any]:
    """One fuzz input: a codec and the (possibly stacked) mutation of one of its seeds, as bytes-like or str."""
    seed = rng.choice(target.seeds)
    data = seed.data
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        mutation = rng.choice(MUTATIONS)
        if mutation is _splice:
            data = _splice(Seed(seed.codec, data, seed.fields), rng, rng.choice(target.seeds))
        else:
            data = mutation(Seed(seed.codec, data, seed.fields), rng)
        if not data:
            break
    kind = rng.random()
    if kind < 0.05:
        return seed.codec, memoryview(data)
    if kind < 0.08:
        return seed.codec, bytearray(data)
    if kind < 0.10:
        return seed.codec, data.decode("latin-1")
    return seed.codec, data
