"""EnvelopeCodec as a specification: what round-trips, what is refused, and how it says so."""

from __future__ import annotations

import datetime
import decimal
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kombu.utils import json as kombu_json

from kombu_envelope import wire
from kombu_envelope.cache import DataKeyCache
from kombu_envelope.codec import EnvelopeCodec
from kombu_envelope.errors import ConfigurationError, InvalidEnvelope, UnknownKey
from kombu_envelope.providers.local import write_key_file

CONTEXT = {"app": "orders", "env": "test"}


@pytest.fixture
def key_uri(tmp_path):
    path = tmp_path / "master.key"
    write_key_file(str(path))
    return f"local://{path}"


@pytest.fixture
def other_key_uri(tmp_path):
    path = tmp_path / "other.key"
    write_key_file(str(path))
    return f"local://{path}"


@pytest.fixture
def codec(key_uri):
    return EnvelopeCodec([key_uri], context=CONTEXT, cache=DataKeyCache())


def kombu_json_roundtrip(value):
    """What Kombu's own json serializer gives back: our reference for type fidelity."""
    return kombu_json.loads(kombu_json.dumps(value))


# Values Kombu's json serializer can carry, including its typed extensions.
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary(max_size=64)
    | st.datetimes()
    | st.dates()
    | st.times()
    | st.uuids()
    | st.decimals(allow_nan=False, allow_infinity=False)
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=25,
)


# The codec is reused across examples on purpose: a warm cache must not change results.
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=json_values)
def test_every_kombu_json_value_round_trips_exactly_as_with_kombu_json(codec, value):
    assert codec.decode(codec.encode(value)) == kombu_json_roundtrip(value)


@pytest.mark.parametrize(
    "value",
    [
        {},
        [],
        "",
        ((), {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}),
        datetime.datetime(2026, 11, 29, 3, 4, 5, 678901, tzinfo=datetime.timezone.utc),
        uuid.UUID("12345678-1234-5678-1234-567812345678"),
        decimal.Decimal("3.14159265358979323846264338327950288"),
        b"\x00\xff binary",
        {"nested": [{"deep": [[], {}, [None]]}]},
        "unicode \u2603 and a lone surrogate \ud800",
    ],
)
def test_edge_values_round_trip_like_kombu_json(codec, value):
    decoded = codec.decode(codec.encode(value))
    assert decoded == kombu_json_roundtrip(value)
    assert type(decoded) is type(kombu_json_roundtrip(value))


def test_ciphertext_does_not_contain_the_plaintext(codec):
    assert b"canary-7f3a" not in codec.encode(["canary-7f3a"])


def test_each_message_has_a_unique_nonce_under_one_data_key(codec):
    bodies = [codec.encode("same") for _ in range(1000)]
    headers = {b[: wire.header_size(b)] for b in bodies}
    nonces = {b[wire.header_size(b) : wire.header_size(b) + wire.NONCE_SIZE] for b in bodies}
    assert len(headers) == 1, "the cached data key is reused"
    assert len(nonces) == 1000


def test_overhead_is_the_wrapped_key_plus_at_most_40_bytes(key_uri):
    codec = EnvelopeCodec([key_uri], cache=DataKeyCache())
    body = codec.encode({"x": "y" * 100})
    header = wire.parse_header(body)
    plaintext_size = len(b'{"x":"' + b"y" * 100 + b'"}')
    wrapped = sum(len(k.wrapped) for k in header.wrapped_keys)
    assert len(body) - plaintext_size - wrapped <= 40


def test_header_names_the_key_by_fingerprint_and_carries_the_context(codec, key_uri):
    header = codec.inspect(codec.encode(1))
    assert header.algorithm == wire.ALG_AES256_GCM
    assert header.context == CONTEXT
    assert [k.fingerprint for k in header.wrapped_keys] == [wire_fingerprint(key_uri)]


def wire_fingerprint(uri):
    from kombu_envelope.providers import key_fingerprint

    return key_fingerprint(uri)


def test_every_single_byte_change_is_refused(codec):
    body = codec.encode({"amount": 100, "to": "alice"})
    for i in range(len(body)):
        tampered = bytearray(body)
        tampered[i] ^= 0x01
        with pytest.raises(InvalidEnvelope):
            codec.decode(bytes(tampered))


@pytest.mark.parametrize("cut", [0, 1, 3, 4, 10, -17, -1])
def test_truncated_messages_are_refused(codec, cut):
    body = codec.encode("x")
    with pytest.raises(InvalidEnvelope, match="truncated|authentication failed"):
        codec.decode(body[:cut])


def test_tampered_ciphertext_names_the_failure(codec):
    body = bytearray(codec.encode("x"))
    body[-1] ^= 0x80
    with pytest.raises(InvalidEnvelope, match="authentication failed"):
        codec.decode(bytes(body))


def test_tampered_wrapped_key_is_refused_even_when_its_data_key_is_cached(codec):
    body = codec.encode("x")
    codec.decode(body)  # data key now cached
    tampered = bytearray(body)
    tampered[wire.header_size(body) - 1] ^= 0x01  # last byte of the wrapped key
    with pytest.raises(InvalidEnvelope):
        codec.decode(bytes(tampered))


def test_unsupported_version_says_to_upgrade(codec):
    body = bytearray(codec.encode("x"))
    body[0] = 2
    with pytest.raises(InvalidEnvelope, match="unsupported format version 2.*upgrade"):
        codec.decode(bytes(body))


def test_wrong_encryption_context_is_refused_naming_both(key_uri):
    producer = EnvelopeCodec([key_uri], context={"tenant": "a"}, cache=DataKeyCache())
    consumer = EnvelopeCodec([key_uri], context={"tenant": "b"}, cache=DataKeyCache())
    with pytest.raises(InvalidEnvelope, match="encryption context mismatch.*'tenant': 'a'.*'tenant': 'b'"):
        consumer.decode(producer.encode("x"))


def test_message_under_an_unconfigured_key_names_the_setting_to_fix(key_uri, other_key_uri):
    producer = EnvelopeCodec([other_key_uri], cache=DataKeyCache())
    consumer = EnvelopeCodec([key_uri], cache=DataKeyCache())
    with pytest.raises(UnknownKey, match="envelope_decrypt_key_uris"):
        consumer.decode(producer.encode("x"))


def test_a_cached_data_key_does_not_open_messages_under_keys_this_codec_is_not_given(key_uri, other_key_uri):
    shared = DataKeyCache()
    body = EnvelopeCodec([key_uri], cache=shared).encode("secret")
    EnvelopeCodec([key_uri], cache=shared).decode(body)  # its data key is now in the shared cache
    with pytest.raises(UnknownKey):
        EnvelopeCodec([other_key_uri], cache=shared).decode(body)


def test_rotation_old_messages_decrypt_with_the_old_key_listed_for_decryption(key_uri, other_key_uri):
    old = EnvelopeCodec([key_uri], cache=DataKeyCache()).encode("queued before rotation")
    rotated = EnvelopeCodec([other_key_uri], decrypt_key_uris=[key_uri], cache=DataKeyCache())
    assert rotated.decode(old) == "queued before rotation"
    assert rotated.decode(rotated.encode("after")) == "after"
    assert wire.parse_header(rotated.encode("after")).wrapped_keys[0].fingerprint == wire_fingerprint(other_key_uri)


def test_multi_wrap_any_one_key_decrypts(key_uri, other_key_uri):
    body = EnvelopeCodec([key_uri, other_key_uri], cache=DataKeyCache()).encode("dr")
    assert len(wire.parse_header(body).wrapped_keys) == 2
    assert EnvelopeCodec([], decrypt_key_uris=[other_key_uri], cache=DataKeyCache()).decode(body) == "dr"
    assert EnvelopeCodec([], decrypt_key_uris=[key_uri], cache=DataKeyCache()).decode(body) == "dr"


def test_a_wrong_local_key_file_fails_authentication_not_silently(tmp_path, key_uri):
    body = EnvelopeCodec([key_uri], cache=DataKeyCache()).encode("x")
    path = key_uri[len("local://") :]
    (tmp_path / "master.key").unlink()
    write_key_file(path)  # same URI, new key material
    with pytest.raises(InvalidEnvelope, match="wrapped data key failed authentication"):
        EnvelopeCodec([key_uri], cache=DataKeyCache()).decode(body)


@pytest.mark.parametrize("compression", ["zlib", "zstd"])
def test_compression_round_trips_and_shrinks_repetitive_payloads(key_uri, compression):
    codec = EnvelopeCodec([key_uri], compression=compression, cache=DataKeyCache())
    value = {"rows": ["the same line of text"] * 200}
    body = codec.encode(value)
    assert codec.decode(body) == value
    assert len(body) < len(EnvelopeCodec([key_uri], cache=DataKeyCache()).encode(value)) // 4
    assert wire.parse_header(body).compression == compression


def test_direct_mode_round_trips_without_a_data_key(key_uri):
    codec = EnvelopeCodec([key_uri], mode="direct", context=CONTEXT, cache=DataKeyCache())
    body = codec.encode({"ssn": "078-05-1120"})
    assert wire.parse_header(body).algorithm == wire.ALG_DIRECT
    assert codec.decode(body) == {"ssn": "078-05-1120"}


def test_encoding_without_a_key_uri_names_the_setting_and_an_example():
    with pytest.raises(ConfigurationError, match="envelope_key_uri is not set.*KOMBU_ENVELOPE_KEY_URI"):
        EnvelopeCodec([], cache=DataKeyCache()).encode("x")


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("alias/orders", "is not a key URI"),
        ("kms://alias/orders", "unknown key service 'kms'"),
        ("local://", "is not a key URI"),
    ],
)
def test_malformed_key_uris_are_refused_naming_the_setting(uri, message):
    with pytest.raises(ConfigurationError, match=f"envelope_key_uri: .*{message}"):
        EnvelopeCodec([uri])


def test_missing_local_key_file_says_how_to_create_it(tmp_path):
    codec = EnvelopeCodec([f"local://{tmp_path}/nope.key"], cache=DataKeyCache())
    with pytest.raises(ConfigurationError, match="kombu-envelope keygen"):
        codec.encode("x")


def test_memoryview_and_bytearray_bodies_are_accepted(codec):
    body = codec.encode([1, 2])
    assert codec.decode(memoryview(body)) == [1, 2]
    assert codec.decode(bytearray(body)) == [1, 2]
