"""DataKeyCache within one process: nonces, limits, keys fetched ahead, the decryption cache, counters.

Forked processes: tests/test_cache_forks.py; a real prefork worker: tests/test_cache_worker_e2e.py.
"""

from __future__ import annotations

import collections
import os
import random
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from kombu_envelope import cache as cache_module
from kombu_envelope.cache import DataKeyCache, KeyLimits
from kombu_envelope.codec import EnvelopeCodec
from kombu_envelope.errors import ConfigurationError, KeyServiceError
from kombu_envelope.providers.local import write_key_file

SCOPE = b"scope-0123456789"


class KeyService:
    """``create`` and ``unwrap`` callables as the codec passes them: counted, optionally slow or failing."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.created: list[bytes] = []
        self.threads: list[str] = []  # which thread made each key
        self.unwrapped = 0
        self.fail_with: Exception | None = None
        self._lock = threading.Lock()

    def create(self) -> tuple[bytes, bytes]:
        time.sleep(self.delay)
        if self.fail_with is not None:
            raise self.fail_with
        header = b"header:" + os.urandom(16)
        with self._lock:
            self.created.append(header)
            self.threads.append(threading.current_thread().name)
        return os.urandom(32), header

    def unwrap(self, key: bytes = b"k" * 32):
        def call() -> bytes:
            time.sleep(self.delay)
            if self.fail_with is not None:
                raise self.fail_with
            with self._lock:
                self.unwrapped += 1
            return key

        return call


def encrypt(cache, limits, service, sizes, scope=SCOPE):
    """Encrypt one message per size; the (header, nonce number, size, (time before, time after)) of each."""
    out = []
    for size in sizes:
        before = time.monotonic()  # the cache checks the key's age in between
        _, header, nonce = cache.next_nonce(scope, size, limits, service.create)
        out.append((header, int.from_bytes(nonce, "big"), size, (before, time.monotonic())))
    return out


def assert_nonces_unique_and_limits_held(uses, limits):
    pairs = [(header, number) for header, number, _, _ in uses]
    assert len(set(pairs)) == len(pairs), "a (data key, nonce) pair was used twice"
    per_key = collections.defaultdict(list)
    for header, number, size, at in uses:
        per_key[header].append((number, size, at))
    for entries in per_key.values():
        assert len(entries) <= limits.max_messages
        assert max(number for number, _, _ in entries) < limits.max_messages
        assert sum(size for _, size, _ in entries) <= limits.max_bytes
        # The key's first use ended after it was made; its last one began before it expired.
        assert (
            max(before for _, _, (before, _) in entries) - min(after for _, _, (_, after) in entries) < limits.max_age
        )
    return per_key


def test_nonces_never_repeat_and_message_and_byte_limits_hold():
    cache, service = DataKeyCache(), KeyService()
    limits = KeyLimits(max_messages=100, max_bytes=3000)
    rng = random.Random(1)
    uses = encrypt(cache, limits, service, [rng.randint(0, 60) for _ in range(5000)])
    per_key = assert_nonces_unique_and_limits_held(uses, limits)
    assert len(per_key) >= 5000 // 100
    # Leases shrink near a limit, so keys are used up rather than abandoned early.
    full = [e for e in per_key.values() if len(e) == 100 or sum(s for _, s, _ in e) > 3000 - 60]
    assert len(full) >= len(per_key) - 2


def test_age_limit_holds_to_the_message():
    cache, service = DataKeyCache(), KeyService()
    limits = KeyLimits(max_age=0.05)
    uses = []
    deadline = time.monotonic() + 0.4
    while time.monotonic() < deadline:
        uses += encrypt(cache, limits, service, [10] * 20)
    per_key = assert_nonces_unique_and_limits_held(uses, limits)
    assert len(per_key) >= 5


def test_threads_share_a_key_without_repeating_nonces():
    cache, service = DataKeyCache(), KeyService()
    limits = KeyLimits(max_messages=500, max_bytes=40_000)
    results: list[list] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        results.append(encrypt(cache, limits, service, [rng.randint(1, 40) for _ in range(3000)]))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    uses = [u for r in results for u in r]
    assert len(uses) == 24_000
    per_key = assert_nonces_unique_and_limits_held(uses, limits)
    assert len(per_key) <= 24_000 // 400  # keys are shared by the threads, not one per thread
    assert cache.stats()["process"]["encrypted"] == {"messages": 24_000, "bytes": sum(u[2] for u in uses)}


def test_the_next_key_is_fetched_ahead_so_publishers_do_not_wait():
    # Keys run out by age (0.4 s) and by count (400 messages at about 1 per ms), in turn.
    cache, service = DataKeyCache(), KeyService(delay=0.02)
    limits = KeyLimits(max_age=0.4, max_messages=400)
    headers = []
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        headers.append(cache.next_nonce(SCOPE, 10, limits, service.create)[1])
        time.sleep(0.001)
    # Only the first key was made by the publishing thread; every later one by the refresh thread.
    assert service.threads[0] == threading.current_thread().name
    assert set(service.threads[1:]) == {"kombu-envelope-key-refresh"}
    assert len(set(headers)) >= 5
    counts = cache.stats()["process"]["data_keys"]
    assert counts["created"] == 1 and counts["created_ahead"] == len(service.created) - 1


def test_a_failed_refresh_is_retried_by_the_publisher_and_counted():
    cache, service = DataKeyCache(), KeyService()
    limits = KeyLimits(max_messages=20)
    encrypt(cache, limits, service, [1] * 10)
    service.fail_with = KeyServiceError("vault://transit/keys/k", "503 from the server", transient=True)
    encrypt(cache, limits, service, [1] * 8)  # reaches 90%: the background fetch fails
    wait_for_refresh_threads()
    with pytest.raises(KeyServiceError):  # the key runs out: the publisher asks, and is told
        encrypt(cache, limits, service, [1] * 10)
    service.fail_with = None
    encrypt(cache, limits, service, [1] * 10)
    wait_for_refresh_threads()
    generate = cache.stats()["process"]["key_service"]["generate"]
    assert (generate["ok"], generate["transient_error"], generate["error"]) == (2, 2, 0)


def wait_for_refresh_threads() -> None:
    for thread in threading.enumerate():
        if thread.name == "kombu-envelope-key-refresh":
            thread.join(10)


def test_a_message_larger_than_max_bytes_names_the_setting():
    with pytest.raises(ConfigurationError, match="envelope_data_key_max_bytes"):
        DataKeyCache().next_nonce(SCOPE, 101, KeyLimits(max_bytes=100), KeyService().create)


def test_a_header_too_large_to_share_stays_in_this_process():
    cache = DataKeyCache()
    created = []

    def create():
        created.append(1)
        return os.urandom(32), os.urandom(cache_module._MAX_HEADER + 1)

    limits = KeyLimits(max_messages=50)
    headers = {cache.next_nonce(SCOPE, 1, limits, create)[1] for _ in range(120)}
    assert len(created) == len(headers) == 3


def test_unwrap_is_called_once_per_key_and_expires_with_the_ttl():
    cache, service = DataKeyCache(), KeyService()
    limits = KeyLimits(decrypt_ttl=0.2)
    for _ in range(50):
        assert cache.unwrapped_key(b"header-a", limits, service.unwrap(b"a" * 32)) == b"a" * 32
    assert cache.unwrapped_key(b"header-b", limits, service.unwrap(b"b" * 32)) == b"b" * 32
    assert service.unwrapped == 2
    time.sleep(0.25)
    cache.unwrapped_key(b"header-a", limits, service.unwrap(b"a" * 32))
    assert service.unwrapped == 3
    counts = cache.stats()["process"]["decrypt_cache"]
    assert counts == {"hits": 49, "shared_hits": 0, "misses": 3}


def test_decrypt_capacity_bounds_the_cache():
    cache, service = DataKeyCache(), KeyService()
    limits = KeyLimits(decrypt_capacity=4)
    for i in range(40):
        cache.unwrapped_key(b"header-%d" % i, limits, service.unwrap())
    assert len(cache._unwrapped) == 4
    cache.unwrapped_key(b"header-0", limits, service.unwrap())
    assert service.unwrapped == 41


def test_concurrent_misses_in_threads_make_one_call():
    cache, service = DataKeyCache(), KeyService(delay=0.2)
    barrier = threading.Barrier(8)
    keys = []

    def worker() -> None:
        barrier.wait()
        keys.append(cache.unwrapped_key(b"header", KeyLimits(), service.unwrap()))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert keys == [b"k" * 32] * 8 and service.unwrapped == 1


def test_key_service_failures_are_counted_by_outcome_and_not_cached():
    cache, service = DataKeyCache(), KeyService()
    service.fail_with = KeyServiceError("aws-kms://alias/a", "throttled", transient=True)
    with pytest.raises(KeyServiceError):
        cache.unwrapped_key(b"h", KeyLimits(), service.unwrap())
    service.fail_with = KeyServiceError("aws-kms://alias/a", "access denied", transient=False)
    with pytest.raises(KeyServiceError):
        cache.unwrapped_key(b"h", KeyLimits(), service.unwrap())
    service.fail_with = None
    cache.unwrapped_key(b"h", KeyLimits(), service.unwrap())
    unwrap = cache.stats()["process"]["key_service"]["unwrap"]
    assert (unwrap["ok"], unwrap["transient_error"], unwrap["error"]) == (1, 1, 1)


def test_a_slot_torn_by_a_dead_writer_is_retired_and_nonces_still_never_repeat():
    cache, service = DataKeyCache(), KeyService()
    limits = KeyLimits()
    uses = encrypt(cache, limits, service, [5] * 10)
    slot = cache._slot_of[SCOPE]
    offset = cache._slot_offset(slot)
    cache_module._SEQ.pack_into(cache._buf, offset, 7)  # odd: a writer died mid-update
    cache._local = cache_module._ThreadLeases()  # as in another thread, which holds no lease yet
    uses += encrypt(cache, limits, service, [5] * 10)
    assert len(service.created) == 2  # the torn key's counter is unknown, so the key is never used again
    assert_nonces_unique_and_limits_held(uses, limits)
    # A torn data-key record is treated the same way.
    record = cache._record_offset(slot, cache._read_meta(slot).current)
    cache._buf[record + 20] ^= 0xFF
    cache._ciphers.clear()
    cache._local = cache_module._ThreadLeases()
    uses += encrypt(cache, limits, service, [5] * 10)
    assert len(service.created) == 3
    assert_nonces_unique_and_limits_held(uses, limits)


def test_keys_this_process_made_decrypt_without_the_key_service(tmp_path):
    path = tmp_path / "master.key"
    write_key_file(str(path))
    cache = DataKeyCache()
    codec = EnvelopeCodec([f"local://{path}"], cache=cache)
    bodies = [codec.encode([[i], {}, {}]) for i in range(100)]
    assert [codec.decode(b)[0][0] for b in bodies] == list(range(100))
    counts = cache.stats()["process"]
    assert counts["key_service"]["generate"]["ok"] == 1
    assert counts["key_service"]["unwrap"]["ok"] == 0
    assert counts["encrypted"]["messages"] == counts["decrypted"]["messages"] == 100
    assert counts["encrypted"]["bytes"] == counts["decrypted"]["bytes"] > 0


def test_clear_forgets_every_key():
    cache, service = DataKeyCache(), KeyService()
    encrypt(cache, KeyLimits(), service, [1])
    cache.unwrapped_key(b"h", KeyLimits(), service.unwrap())
    cache.clear()
    encrypt(cache, KeyLimits(), service, [1])
    cache.unwrapped_key(b"h", KeyLimits(), service.unwrap())
    assert len(service.created) == 2 and service.unwrapped == 2
    assert b"k" * 32 in bytes(cache._buf)  # (the table holds the key again)
    cache.clear()
    assert b"k" * 32 not in bytes(cache._buf)


def test_stats_are_exported_by_the_package():
    import kombu_envelope

    snapshot = kombu_envelope.stats()
    assert snapshot["pid"] == os.getpid()
    assert set(snapshot) == {"pid", "process", "host", "host_processes"}
    assert set(snapshot["host"]) == {"key_service", "decrypt_cache", "data_keys", "encrypted", "decrypted"}
    assert set(snapshot["host"]["key_service"]) == {"generate", "unwrap"}


def test_kombu_maps_the_shared_cache_at_import_without_heavy_imports():
    code = """
        import sys, kombu.serialization
        from kombu_envelope import cache
        heavy = sorted(m for m in ("celery", "cryptography", "boto3", "hvac") if m in sys.modules)
        print(cache._default is not None, heavy)
    """
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True []"
