"""DataKeyCache across forked processes: one key service call per key per host, limits that hold, and
processes killed at the worst moment (SIGKILL while holding the shared lock).

Every child here is a real ``os.fork()`` of the test process, as prefork pools and pre-fork web
servers make them.
"""

from __future__ import annotations

import array
import collections
import hashlib
import os
import pickle
import random
import select
import signal
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import pytest

from kombu_envelope import cache as cache_module
from kombu_envelope.cache import DataKeyCache, KeyLimits

SCOPE = b"scope-0123456789"


class Child:
    """A forked process running ``fn(*args)``; ``result()`` is its return value (pickled back over a pipe)."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        read_end, write_end = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            os.close(read_end)
            status = 0
            try:
                payload = pickle.dumps(("ok", fn(*args)))
            except BaseException:  # noqa: BLE001  (reported to the parent)
                payload, status = pickle.dumps(("error", traceback.format_exc())), 1
            try:
                with os.fdopen(write_end, "wb") as pipe:
                    pipe.write(payload)
            finally:
                os._exit(status)  # never return into pytest in the child
        os.close(write_end)
        self._pipe = read_end

    def result(self, timeout: float = 120.0) -> Any:
        chunks, deadline = [], time.monotonic() + timeout
        while True:
            ready, _, _ = select.select([self._pipe], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                self.kill()
                raise TimeoutError(f"child {self.pid} did not finish in {timeout} s")
            chunk = os.read(self._pipe, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
        os.close(self._pipe)
        os.waitpid(self.pid, 0)
        status, value = pickle.loads(b"".join(chunks))
        assert status == "ok", value
        return value

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        os.close(self._pipe)


class CountingKeyService:
    """create/unwrap callables that log each call to a file: an account of calls kept outside the cache."""

    def __init__(self, log_path: str, delay: float = 0.0) -> None:
        self.log_path = log_path
        self.delay = delay

    def _log(self, what: str) -> None:
        fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, f"{what} {os.getpid()}\n".encode())
        finally:
            os.close(fd)

    def create(self) -> tuple[bytes, bytes]:
        time.sleep(self.delay)
        self._log("generate")
        return os.urandom(32), b"header:" + os.urandom(16)

    def unwrap(self) -> bytes:
        time.sleep(self.delay)
        self._log("unwrap")
        return b"k" * 32

    def calls(self, what: str) -> list[int]:
        if not os.path.exists(self.log_path):
            return []
        with open(self.log_path) as f:
            return [int(line.split()[1]) for line in f if line.startswith(what)]


def record_encryptions(cache, limits, create, count, seed):
    """Encrypt ``count`` messages of random sizes; compact arrays of what each used."""
    rng = random.Random(seed)
    keys, numbers, sizes = array.array("Q"), array.array("Q"), array.array("I")
    before, after = array.array("d"), array.array("d")  # the cache checks the key's age in between
    for _ in range(count):
        size = rng.randint(1, 127)
        before.append(time.monotonic())
        _, header, nonce = cache.next_nonce(SCOPE, size, limits, create)
        after.append(time.monotonic())
        keys.append(int.from_bytes(hashlib.blake2b(header, digest_size=8).digest(), "big"))
        numbers.append(int.from_bytes(nonce, "big"))
        sizes.append(size)
    return keys, numbers, sizes, before, after


def check_no_repeat_and_limits(records, limits):
    """Every (key, nonce) pair once; per key no more messages, bytes or seconds than the limits allow."""
    seen: set[tuple[int, int]] = set()
    messages: collections.Counter[int] = collections.Counter()
    total_bytes: collections.Counter[int] = collections.Counter()
    # A key's first use ended after it was made, its last one began before it expired.
    first_done: dict[int, float] = {}
    last_begun: dict[int, float] = {}
    total = 0
    for keys, numbers, sizes, before, after in records:
        total += len(keys)
        seen.update(zip(keys, numbers))
        messages.update(keys)
        for key, size, began, done in zip(keys, sizes, before, after):
            total_bytes[key] += size
            first_done[key] = min(first_done.get(key, done), done)
            last_begun[key] = max(last_begun.get(key, began), began)
        assert max(numbers) < limits.max_messages
    assert len(seen) == total, f"{total - len(seen)} (key, nonce) pairs were used twice"
    assert max(messages.values()) <= limits.max_messages
    assert max(total_bytes.values()) <= limits.max_bytes
    assert max(last_begun[k] - first_done[k] for k in first_done) < limits.max_age
    return messages, total_bytes


def encrypt_in_forks(total: int, limits: KeyLimits, tmp_path) -> tuple[list, DataKeyCache]:
    """The parent and three children encrypt ``total`` messages; two children fork at once, one later."""
    cache = DataKeyCache()
    service = CountingKeyService(str(tmp_path / "calls.log"))
    share = total // 4
    parent_first = record_encryptions(cache, limits, service.create, 10, seed=0)  # the parent holds a lease
    early = [Child(record_encryptions, cache, limits, service.create, share, seed) for seed in (1, 2)]
    parent_rest = record_encryptions(cache, limits, service.create, share // 2, seed=3)
    late = Child(record_encryptions, cache, limits, service.create, share, 4)  # forked with a lease half used
    parent_end = record_encryptions(cache, limits, service.create, share - share // 2 - 10, seed=5)
    records = [parent_first, parent_rest, parent_end] + [c.result() for c in early + [late]]
    assert sum(len(r[0]) for r in records) == total
    return records, cache


LIMITS_UNDER_LOAD = KeyLimits(max_messages=10_000, max_bytes=640_000, max_age=0.05)


def test_four_processes_never_repeat_a_nonce_nor_exceed_a_limit(tmp_path):
    records, cache = encrypt_in_forks(100_000, LIMITS_UNDER_LOAD, tmp_path)
    messages, _ = check_no_repeat_and_limits(records, LIMITS_UNDER_LOAD)
    host = cache.stats()["host"]
    assert host["encrypted"]["messages"] == 100_000
    assert host["data_keys"]["created"] + host["data_keys"]["created_ahead"] >= len(messages)


@pytest.mark.slow
def test_a_million_messages_from_four_processes_never_repeat_a_nonce_nor_exceed_a_limit(tmp_path):
    records, _ = encrypt_in_forks(1_000_000, LIMITS_UNDER_LOAD, tmp_path)
    messages, _ = check_no_repeat_and_limits(records, LIMITS_UNDER_LOAD)
    assert len(messages) >= 1_000_000 // 10_000


def test_forked_processes_share_one_data_key_and_one_unwrap(tmp_path):
    cache = DataKeyCache()
    service = CountingKeyService(str(tmp_path / "calls.log"), delay=0.1)
    limits = KeyLimits()

    def work(start_at: float) -> tuple[set[bytes], bytes]:
        time.sleep(max(0.0, start_at - time.monotonic()))  # all at once: the misses are concurrent
        headers = {cache.next_nonce(SCOPE, 100, limits, service.create)[1] for _ in range(2000)}
        return headers, cache.unwrapped_key(b"a message's header", limits, service.unwrap)

    start_at = time.monotonic() + 0.5
    children = [Child(work, start_at) for _ in range(4)]
    headers, key = work(start_at)
    for child in children:
        child_headers, child_key = child.result()
        assert child_headers == headers and child_key == key
    later = Child(work, 0.0).result()  # forked after the keys were cached: no call at all
    assert later == (headers, key)
    assert len(headers) == 1
    assert len(service.calls("generate")) == 1
    assert len(service.calls("unwrap")) == 1
    host = cache.stats()
    assert host["host_processes"] == 6
    assert host["host"]["encrypted"]["messages"] == 6 * 2000
    assert host["host"]["key_service"]["unwrap"]["ok"] == 1
    # Four concurrent lookups found the key the fifth stored; the later child inherited it in memory.
    assert host["host"]["decrypt_cache"] == {"hits": 5, "shared_hits": 4, "misses": 1}


def test_a_child_killed_inside_the_key_service_call_does_not_hold_up_the_others(tmp_path):
    cache = DataKeyCache()
    limits = KeyLimits()
    ready_read, ready_write = os.pipe()

    def hang_in_create() -> tuple[bytes, bytes]:
        os.write(ready_write, b"x")  # holding the slot's lock now
        time.sleep(3600)
        raise AssertionError("unreachable")

    def hang_in_unwrap() -> bytes:
        os.write(ready_write, b"x")  # holding the decrypt set's lock now
        time.sleep(3600)
        raise AssertionError("unreachable")

    service = CountingKeyService(str(tmp_path / "calls.log"))

    def encrypt_and_decrypt() -> tuple[float, bytes, int, bytes]:
        _, header, nonce = cache.next_nonce(SCOPE, 1, limits, service.create)
        encrypted_at = time.monotonic()
        key = cache.unwrapped_key(b"header", limits, service.unwrap)
        return encrypted_at, header, int.from_bytes(nonce, "big"), key

    holder = Child(lambda: cache.next_nonce(SCOPE, 1, limits, hang_in_create))
    select.select([ready_read], [], [], 30)
    os.read(ready_read, 1)
    waiters = [Child(encrypt_and_decrypt) for _ in range(3)]
    time.sleep(0.5)  # the waiters are blocked on the lock the holder has
    killed_at = time.monotonic()
    os.kill(holder.pid, signal.SIGKILL)
    results = [w.result(timeout=30) for w in waiters]
    os.waitpid(holder.pid, 0)
    resumed_after = max(r[0] for r in results) - killed_at
    assert resumed_after < 1.0
    assert len({(r[1], r[2]) for r in results}) == 3  # one shared key, distinct nonces
    assert len(service.calls("generate")) == 1

    # The same with the decrypt side's lock.
    holder = Child(lambda: cache.unwrapped_key(b"another header", limits, hang_in_unwrap))
    select.select([ready_read], [], [], 30)
    os.read(ready_read, 1)
    waiters = [
        Child(lambda: (cache.unwrapped_key(b"another header", limits, service.unwrap), time.monotonic()))
        for _ in range(3)
    ]
    time.sleep(0.5)
    killed_at = time.monotonic()
    os.kill(holder.pid, signal.SIGKILL)
    results = [w.result(timeout=30) for w in waiters]
    os.waitpid(holder.pid, 0)
    assert all(key == b"k" * 32 for key, _ in results)
    decrypt_resumed_after = max(at for _, at in results) - killed_at
    assert decrypt_resumed_after < 1.0
    print(
        f"\nwaiters went on {resumed_after:.3f} s (encrypt) and {decrypt_resumed_after:.3f} s (decrypt) after the SIGKILL"
    )
    assert len(service.calls("unwrap")) == 2  # "header" once, "another header" once
    os.close(ready_read)
    os.close(ready_write)


def test_a_child_killed_halfway_through_writing_a_slot_corrupts_nothing(tmp_path):
    cache = DataKeyCache()
    limits = KeyLimits()
    service = CountingKeyService(str(tmp_path / "calls.log"))
    before = record_encryptions(cache, limits, service.create, 100, seed=1)
    slot = cache._slot_of[SCOPE]

    def die_mid_write() -> None:
        with cache._region.hold(cache_module._ENC_SLOT_LOCKS + slot):
            offset = cache._slot_offset(slot)
            cache_module._SEQ.pack_into(cache._buf, offset, 41)  # the first step of a meta update
            cache._buf[offset + 40 : offset + 48] = os.urandom(8)  # ... and half of the next
            os.kill(os.getpid(), signal.SIGKILL)

    pid = os.fork()
    if pid == 0:
        try:
            die_mid_write()
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    started = time.monotonic()
    after = [Child(record_encryptions, cache, limits, service.create, 100, seed).result() for seed in (2, 3)]
    assert time.monotonic() - started < 5
    # The parent goes on with its lease of the retired key: those numbers are its own.
    after.append(record_encryptions(cache, limits, service.create, 100, seed=4))
    check_no_repeat_and_limits([before] + after, limits)
    assert len(service.calls("generate")) == 2  # the torn slot's key was retired, one new key made


def test_counts_of_exited_and_killed_children_stay_in_the_host_total(tmp_path):
    cache = DataKeyCache()
    service = CountingKeyService(str(tmp_path / "calls.log"))

    def encrypt_some(n: int) -> int:
        for _ in range(n):
            cache.next_nonce(SCOPE, 10, KeyLimits(), service.create)
        return n

    for n in (100, 200, 300):
        Child(encrypt_some, n).result()
    stuck = Child(lambda: (encrypt_some(50), time.sleep(3600)))
    deadline = time.monotonic() + 30
    while cache.stats()["host"]["encrypted"]["messages"] < 650 and time.monotonic() < deadline:
        time.sleep(0.05)
    stuck.kill()
    snapshot = cache.stats()
    assert snapshot["host"]["encrypted"] == {"messages": 650, "bytes": 6500}
    assert snapshot["process"]["encrypted"] == {"messages": 0, "bytes": 0}
    assert snapshot["host_processes"] == 5
    assert snapshot["host"]["key_service"]["generate"]["ok"] == 1


def test_rows_of_dead_processes_are_recycled_when_the_table_is_full(tmp_path, monkeypatch):
    rows = 8
    monkeypatch.setattr(cache_module, "_COUNTER_ROWS", rows)
    cache = DataKeyCache()
    service = CountingKeyService(str(tmp_path / "calls.log"))

    def encrypt_one() -> None:
        cache.next_nonce(SCOPE, 1, KeyLimits(), service.create)

    for _ in range(rows + 5):  # more processes than rows, one after another
        Child(encrypt_one).result()
    snapshot = cache.stats()
    assert snapshot["host"]["encrypted"]["messages"] == rows + 5
    assert snapshot["host_processes"] == rows + 6


def test_short_lived_children_waste_few_message_numbers(tmp_path):
    # Like pool children recycled every 25 tasks: leases start small, so 40 children using
    # 25 numbers each fit in two keys of 1,000 (a full-size lease each would need 40 keys).
    cache = DataKeyCache()
    service = CountingKeyService(str(tmp_path / "calls.log"))
    limits = KeyLimits(max_messages=1000)

    def encrypt_25() -> set[bytes]:
        return {cache.next_nonce(SCOPE, 10, limits, service.create)[1] for _ in range(25)}

    headers = set().union(*(Child(encrypt_25).result() for _ in range(40)))
    assert len(headers) <= 2


def test_a_fork_while_the_next_key_is_being_fetched_deadlocks_nothing(tmp_path):
    cache = DataKeyCache()
    limits = KeyLimits(max_messages=100)
    service = CountingKeyService(str(tmp_path / "calls.log"), delay=0.3)
    first = record_encryptions(cache, limits, service.create, 95, seed=1)  # 90 % used: the fetch starts
    assert [t.name for t in threading.enumerate()].count("kombu-envelope-key-refresh") == 1
    child = Child(record_encryptions, cache, limits, service.create, 300, 2)  # forked mid-fetch
    rest = record_encryptions(cache, limits, service.create, 300, seed=3)
    check_no_repeat_and_limits([first, child.result(timeout=30), rest], limits)
    assert len(service.calls("generate")) <= 10  # 695 messages need 7 keys; a few may be fetched twice
