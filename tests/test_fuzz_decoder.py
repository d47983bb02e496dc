"""The decoder refuses every malformed input with a documented exception (short fuzz run).

The long run (>= 1,000,000 inputs, plus the linear-time check) is
benchmarks/fuzz_decoder.py. The regression tests pin the bugs the fuzzer
found: each raised an undocumented exception that Celery would have turned
into an unclassifiable decode error.
"""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kombu_envelope import wire
from kombu_envelope.errors import InvalidEnvelope

from .fuzzing import DOCUMENTED, DecoderTarget, envelope_fields, mutate


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return DecoderTarget(str(tmp_path_factory.mktemp("fuzz-keys")))


def _decode_documented(codec, data) -> None:
    try:
        codec.decode(data)
    except DOCUMENTED:
        pass


def test_every_seed_decodes(target):
    for seed in target.seeds[:16]:
        seed.codec.decode(seed.data)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rng=st.randoms(use_true_random=False))
def test_mutated_envelopes_raise_only_documented_errors(target, rng):
    codec, data = mutate(target, rng)
    _decode_documented(codec, data)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prefix=st.sampled_from([b"", b"\x01\x01\x00\x01", b"\x01\x01\x01\x01", b"\x01\x02\x00\x01", b"\x01\x01\x06\x08"]), rest=st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_documented_errors(target, prefix, rest):
    for codec in target.codecs:
        _decode_documented(codec, prefix + rest)


def test_truncated_message_with_a_cached_header_is_refused(target):
    # Found by the fuzzer: once a header's cipher was cached, a body cut inside
    # the nonce reached AES-GCM and raised ValueError (nonce too short).
    seed = target.seeds[0]
    seed.codec.decode(seed.data)
    nonce_start = next(start for name, start, _ in seed.fields if name == "nonce")
    for cut in range(nonce_start, nonce_start + wire.NONCE_SIZE + wire.TAG_SIZE):
        with pytest.raises(InvalidEnvelope, match="truncated ciphertext"):
            seed.codec.decode(seed.data[:cut])


@pytest.mark.parametrize("context", [b"[" * 5000 + b"]" * 5000, b'{"a":' * 3000 + b'"b"' + b"}" * 3000])
def test_deeply_nested_encryption_context_is_refused(target, context):
    # Found by the fuzzer: json.loads raised RecursionError before any key was used.
    seed = target.seeds[0]
    data = bytes((1, 1, wire.FLAG_CONTEXT, 1)) + len(context).to_bytes(2, "big") + context + seed.data[4:]
    with pytest.raises(InvalidEnvelope, match="malformed encryption context"):
        seed.codec.decode(data)


@pytest.mark.parametrize(
    "plaintext", [b"[" * 5000, b'{"__type__": "decimal", "__value__": "x"}', b'{"__type__": "uuid", "__value__": 5}']
)
def test_authenticated_garbage_is_refused(target, plaintext):
    # Found by the fuzzer: a key holder's malformed JSON raised RecursionError or
    # decimal.InvalidOperation from the payload parser.
    sealed = DecoderTarget._sealed(target.seeds[0], plaintext)
    with pytest.raises(InvalidEnvelope, match="decrypted payload is not valid JSON"):
        sealed.codec.decode(sealed.data)


def test_fields_cover_the_whole_envelope(target):
    for seed in target.seeds:
        fields = envelope_fields(seed.data)
        assert fields[0][1] == 0 and fields[-1][2] == len(seed.data)
        assert all(a[2] == b[1] for a, b in zip(fields, fields[1:]))


def test_random_bytes_of_every_length_up_to_a_header(target):
    rng = random.Random(5)
    for size in range(80):
        for _ in range(20):
            _decode_documented(target.codecs[1], b"\x01" + rng.randbytes(size))
    _decode_documented(target.codecs[0], os.urandom(1 << 20))
