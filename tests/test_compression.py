"""``envelope_compression``: compress before encrypting, round-trip exactly, refuse bombs and garbage."""

from __future__ import annotations

import datetime
import threading
import uuid
import zlib

import pytest
import zstandard
from kombu.utils import json as kombu_json

from kombu_envelope import payload, wire
from kombu_envelope.cache import DataKeyCache
from kombu_envelope.codec import EnvelopeCodec
from kombu_envelope.errors import ConfigurationError, InvalidEnvelope
from kombu_envelope.providers.local import write_key_file
from kombu_envelope.settings import load_settings

COMPRESSIONS = ["zlib", "zstd"]

# A task body as Celery sends it: arguments of mixed types, typed values included.
BODY = (
    [42, "order-7f3a", 19.99, True, None, uuid.UUID(int=7)],
    {
        "placed_at": datetime.datetime(2024, 5, 17, 9, 30, tzinfo=datetime.timezone.utc),
        "items": [{"sku": f"SKU-{i:06d}", "qty": i % 7, "price": i * 1.25, "note": "gift wrap" if i % 3 else ""} for i in range(300)],
        "raw": b"\x00\x01 bytes",
    },
    {"callbacks": None, "errbacks": None, "chain": None, "chord": None},
)


@pytest.fixture
def key_uri(tmp_path):
    path = tmp_path / "master.key"
    write_key_file(str(path))
    return f"local://{path}"


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_compressed_bodies_round_trip_exactly_like_kombu_json(key_uri, compression):
    codec = EnvelopeCodec([key_uri], compression=compression, cache=DataKeyCache())
    expected = kombu_json.loads(kombu_json.dumps(BODY))
    for value in (BODY, "", [], {"x": "y"}, "unicode \u2603 \ud800"):
        assert codec.decode(codec.encode(value)) == kombu_json.loads(kombu_json.dumps(value))
    assert codec.decode(codec.encode(BODY)) == expected


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_the_header_records_the_compression_and_any_reader_follows_it(key_uri, compression):
    body = EnvelopeCodec([key_uri], compression=compression, cache=DataKeyCache()).encode(BODY)
    assert wire.parse_header(body).compression == compression
    # Compression is per message: a reader configured without it still reads it.
    assert EnvelopeCodec([key_uri], cache=DataKeyCache()).decode(body) == kombu_json.loads(kombu_json.dumps(BODY))


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_compression_shrinks_a_realistic_body_several_fold(key_uri, compression):
    plain = EnvelopeCodec([key_uri], cache=DataKeyCache()).encode(BODY)
    compressed = EnvelopeCodec([key_uri], compression=compression, cache=DataKeyCache()).encode(BODY)
    assert len(compressed) * 4 < len(plain)


def test_settings_choose_the_compression(key_uri):
    settings = load_settings({"envelope_key_uri": key_uri, "envelope_compression": "zstd"})
    body = EnvelopeCodec.from_settings(settings, cache=DataKeyCache()).encode(BODY)
    assert wire.parse_header(body).compression == "zstd"


def test_an_unknown_compression_names_the_setting_and_the_choices():
    with pytest.raises(ConfigurationError, match="envelope_compression.*'zstd', 'zlib' or None"):
        payload.compressor("lz4")


def test_zstd_compression_is_safe_from_many_threads(key_uri):
    codec = EnvelopeCodec([key_uri], compression="zstd", cache=DataKeyCache())
    values = [{"thread": t, "rows": [f"row {t}-{i}" for i in range(2000)]} for t in range(8)]
    results: dict[int, bool] = {}

    def work(t: int) -> None:
        results[t] = all(codec.decode(codec.encode(values[t])) == values[t] for _ in range(30))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {t: True for t in range(8)}


@pytest.mark.parametrize(
    "compressed",
    [
        pytest.param(zlib.compress(b"\0" * (2 << 20)), id="zlib"),
        pytest.param(zstandard.ZstdCompressor().compress(b"\0" * (2 << 20)), id="zstd-declared-size"),
        pytest.param(zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * (2 << 20)), id="zstd-streamed"),
    ],
)
def test_output_beyond_the_limit_is_refused_not_allocated(monkeypatch, compressed):
    name = "zlib" if compressed[:1] == b"\x78" else "zstd"
    assert len(payload.decompress(name, compressed)) == 2 << 20
    monkeypatch.setattr(payload, "MAX_DECOMPRESSED_SIZE", 1 << 20)
    with pytest.raises(InvalidEnvelope, match="larger than the size limit"):
        payload.decompress(name, compressed)


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("zlib", b"not zlib at all"),
        ("zlib", zlib.compress(b"[1, 2, 3]")[:-4]),
        ("zstd", b"not zstd at all"),
        ("zstd", zstandard.ZstdCompressor().compress(b"[1, 2, 3]" * 100)[:-6]),
    ],
)
def test_malformed_or_truncated_compressed_payloads_are_refused(name, data):
    with pytest.raises(InvalidEnvelope, match="compressed payload is (malformed|truncated)"):
        payload.decompress(name, data)
