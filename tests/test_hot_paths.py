"""The shortcuts that make envelope cheaper than Kombu json change no result.

``payload``: a reusable C encoder without circular-reference bookkeeping, the
C scanner called directly (falling back to ``json.loads`` for anything
unusual), no ``object_hook`` without a ``"__type__"`` marker. ``codec``: the
header of the previous message is recognised by prefix, large ciphertexts are
decrypted from a view.
"""

from __future__ import annotations

import math

import pytest
from kombu.utils import json as kombu_json

from kombu_envelope import payload, wire
from kombu_envelope.cache import DataKeyCache
from kombu_envelope.codec import EnvelopeCodec
from kombu_envelope.errors import InvalidEnvelope
from kombu_envelope.providers.local import write_key_file


def kombu_roundtrip(value):
    return kombu_json.loads(kombu_json.dumps(value))


def same(a, b):
    """Equal, NaN included, and of the same types all the way down."""
    return kombu_json.dumps(a) == kombu_json.dumps(b) and _types(a) == _types(b)


def _types(value):
    if isinstance(value, dict):
        return {k: _types(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_types(v) for v in value]
    return type(value)


@pytest.mark.parametrize(
    "value",
    [
        float("nan"),
        [float("inf"), float("-inf"), -0.0, 1e308, 5e-324],
        2**200,
        {1: "int key", 2.5: "float key", None: "none key"},
        {True: "bool key", False: "another"},
        ("tuple", ("nested",)),
        "quote \" backslash \\ controls \n\t\x00 unicode \u2603 \U0001f600 lone \udfff",
        {"__type__": "not a marker on its own"},
        {"text": 'a "__type__" inside a string'},
        {"__type__": "uuid", "__value__": {"hex": "12345678123456781234567812345678"}},
    ],
)
def test_payload_round_trips_edge_values_exactly_like_kombu_json(value):
    assert same(payload.loads(payload.dumps(value)), kombu_roundtrip(value))


class Money:
    """A type an application registers with Kombu: it must round-trip through envelope as through Kombu json."""

    def __init__(self, cents: int) -> None:
        self.cents = cents

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Money) and other.cents == self.cents


kombu_json.register_type(Money, "kombu_envelope_test_money", lambda m: m.cents, Money)


def test_a_type_registered_with_kombu_round_trips_through_the_marker_path():
    value = {"total": Money(1999), "lines": [Money(1), {"__type__": "text", "note": 1}]}
    assert b'"__type__"' in payload.dumps(value)
    assert payload.loads(payload.dumps(value)) == kombu_roundtrip(value) == value


def test_payload_is_compact_json_that_kombu_json_reads_identically():
    value = [{"a": [1, 2.5, None, True]}, "x"]
    assert payload.dumps(value) == b'[{"a":[1,2.5,null,true]},"x"]'
    assert kombu_json.loads(payload.dumps(value)) == kombu_roundtrip(value)


def test_a_circular_value_still_fails_to_encode():
    value: list[object] = []
    value.append(value)
    with pytest.raises((ValueError, RecursionError)):
        kombu_json.dumps(value)
    with pytest.raises(RecursionError):
        payload.dumps(value)


@pytest.mark.parametrize("text", [b' [1, {"a": 2}] ', b"\n[1]\n", b'\t{"a": "b"}'])
def test_whitespace_around_the_value_is_read_as_json_loads_reads_it(text):
    assert payload.loads(text) == kombu_json.loads(text)


@pytest.mark.parametrize(
    "text",
    [b"", b"   ", b"[1] [2]", b"[1]x", b"nul", b"[1,]", b"\xff[1]", b'{"__type__": "nope", "__value__": 1}', b"[" * 100_000],
)
def test_anything_that_is_not_one_json_value_is_refused(text):
    with pytest.raises(InvalidEnvelope, match="not valid JSON"):
        payload.loads(text)


@pytest.fixture
def key_uris(tmp_path):
    uris = []
    for name in ("a.key", "b.key"):
        write_key_file(str(tmp_path / name))
        uris.append(f"local://{tmp_path / name}")
    return uris


def test_messages_under_alternating_data_keys_decode_with_the_right_key(key_uris):
    producers = [EnvelopeCodec([uri], cache=DataKeyCache()) for uri in key_uris]
    reader = EnvelopeCodec([], decrypt_key_uris=key_uris, cache=DataKeyCache())
    bodies = [producers[i % 2].encode({"n": i}) for i in range(10)]
    assert len({b[: wire.header_size(b)] for b in bodies}) == 2
    assert [reader.decode(b) for b in bodies] == [{"n": i} for i in range(10)]


def test_a_body_that_starts_with_the_recent_header_is_still_checked(key_uris):
    codec = EnvelopeCodec(key_uris[:1], cache=DataKeyCache())
    body = codec.encode("first")
    assert codec.decode(body) == "first"  # the header is now the recent one
    end = wire.header_size(body)
    with pytest.raises(InvalidEnvelope, match="truncated ciphertext"):
        codec.decode(body[: end + wire.NONCE_SIZE + wire.TAG_SIZE - 1])
    tampered = bytearray(body)
    tampered[-1] ^= 1
    with pytest.raises(InvalidEnvelope, match="authentication failed"):
        codec.decode(bytes(tampered))


def test_an_expired_recent_header_is_verified_again(key_uris):
    from kombu_envelope.cache import KeyLimits

    codec = EnvelopeCodec(key_uris[:1], limits=KeyLimits(decrypt_ttl=0.0), cache=DataKeyCache())
    body = codec.encode("x")
    assert codec.decode(body) == "x"
    assert codec.decode(body) == "x"


@pytest.mark.parametrize("size", [10, 8192, 300_000])
def test_bodies_of_every_size_round_trip_in_bytes_bytearray_and_memoryview(key_uris, size):
    codec = EnvelopeCodec(key_uris[:1], cache=DataKeyCache())
    value = {"blob": "z" * size, "pi": math.pi}
    body = codec.encode(value)
    for form in (body, bytearray(body), memoryview(body)):
        assert codec.decode(form) == value
