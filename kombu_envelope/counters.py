"""Counters: key-service calls, cache use, and the traffic encrypted and decrypted.

Every process counts into its own row of a table kept in the data-key
cache's shared mapping (``kombu_envelope.sharedmem``), so any process of a
host's process tree can add them all up, and the counts of a process that
exited (a recycled pool child) or was killed stay in the total. A row is
claimed by the first count a process makes and marked live by a record lock
that the kernel drops when the process dies; rows of dead processes are
folded into row 0 only when the table runs out of rows.

``stats()`` (``kombu_envelope.stats()``) returns this process's counters
and the host's sum; the Celery remote-control command ``envelope_stats``
(``celery -A proj inspect envelope_stats``) returns the same from each
worker. This module imports only the standard library.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from .sharedmem import SharedRegion

__all__ = ["COUNTERS", "CounterTable", "nested", "register_inspect_command", "stats"]

#: Counter names, in row order; dots become nesting in ``stats()``.
COUNTERS = (
    # One call of the key service per data key made (KMS GenerateDataKey,
    # Transit datakey, or local generation + wrap) and per data key unwrapped.
    "key_service.generate.ok",
    "key_service.generate.transient_error",
    "key_service.generate.error",
    "key_service.generate.microseconds",
    "key_service.unwrap.ok",
    "key_service.unwrap.transient_error",
    "key_service.unwrap.error",
    "key_service.unwrap.microseconds",
    # Unwrapped-key lookups that missed the codec's own cipher table.
    "decrypt_cache.hits",  # answered without the key service
    "decrypt_cache.shared_hits",  # ... of which from the host-wide table (another process, or another thread)
    "decrypt_cache.misses",  # this process called the key service
    "data_keys.created",  # made while a message waited (first use, or a limit reached before a refresh)
    "data_keys.created_ahead",  # made in the background before the current one ran out
    "data_keys.leases",  # runs of message numbers taken from a shared data key
    "encrypted.messages",
    "encrypted.bytes",  # plaintext bytes (after compression) sealed with AES-GCM
    "decrypted.messages",
    "decrypted.bytes",
)
_INDEX = {name: i + 1 for i, name in enumerate(COUNTERS)}  # word 0 of a row is the owner's pid

GENERATE_OK = _INDEX["key_service.generate.ok"]
UNWRAP_OK = _INDEX["key_service.unwrap.ok"]
# Offsets from GENERATE_OK / UNWRAP_OK.
TRANSIENT_ERROR, ERROR, MICROSECONDS = 1, 2, 3
CACHE_HITS = _INDEX["decrypt_cache.hits"]
CACHE_SHARED_HITS = _INDEX["decrypt_cache.shared_hits"]
CACHE_MISSES = _INDEX["decrypt_cache.misses"]
KEYS_CREATED = _INDEX["data_keys.created"]
KEYS_CREATED_AHEAD = _INDEX["data_keys.created_ahead"]
LEASES = _INDEX["data_keys.leases"]
ENCRYPTED_MESSAGES = _INDEX["encrypted.messages"]
ENCRYPTED_BYTES = _INDEX["encrypted.bytes"]
DECRYPTED_MESSAGES = _INDEX["decrypted.messages"]
DECRYPTED_BYTES = _INDEX["decrypted.bytes"]

ROW_WORDS = 1 + len(COUNTERS)
_WORD = 8


class CounterTable:
    """Rows of 64-bit counters in a shared region, one per process, plus row 0 for rows recycled.

    Lock ``lock_base`` serializes claiming rows; lock ``lock_base + 1 + r``
    is held by the owner of row ``r`` for as long as it lives.
    """

    def __init__(self, region: SharedRegion, offset: int, rows: int, lock_base: int) -> None:
        self._region = region
        self._rows = rows
        self._lock_base = lock_base
        self._words = memoryview(region.buf)[offset : offset + self.size(rows)].cast("Q")

    @staticmethod
    def size(rows: int) -> int:
        return rows * ROW_WORDS * _WORD

    @staticmethod
    def locks(rows: int) -> int:
        return 1 + rows

    def claim(self) -> memoryview:
        """A row for this process to count into (a private one if the table is full of live processes)."""
        words, pid = self._words, os.getpid()
        with self._region.hold(self._lock_base):
            free = next((r for r in range(1, self._rows) if words[r * ROW_WORDS] == 0), None)
            if free is None:
                free = self._recycle_dead_rows()
            if free is not None and self._region.try_lock(self._lock_base + 1 + free):
                start = free * ROW_WORDS
                words[start + 1 : start + ROW_WORDS] = memoryview(bytes((ROW_WORDS - 1) * _WORD)).cast("Q")
                words[start] = pid
                return words[start : start + ROW_WORDS]
        return memoryview(bytearray(ROW_WORDS * _WORD)).cast("Q")

    def _recycle_dead_rows(self) -> int | None:
        """Fold the rows of dead processes into row 0 and free them; the first freed row, if any."""
        words, own = self._words, os.getpid()
        first = None
        for r in range(1, self._rows):
            start = r * ROW_WORDS
            if words[start] == own or self._region.held_by_other_process(self._lock_base + 1 + r):
                continue
            for i in range(1, ROW_WORDS):
                words[i] += words[start + i]
                words[start + i] = 0
            words[0] += 1
            words[start] = 0
            if first is None:
                first = r
        return first

    def host_totals(self) -> tuple[list[int], int]:
        """Counters summed over every process that counted (live, exited or killed), and how many did."""
        words = self._words
        totals = list(words[1:ROW_WORDS])
        processes = words[0]
        for r in range(1, self._rows):
            start = r * ROW_WORDS
            if words[start]:
                processes += 1
                for i, value in enumerate(words[start + 1 : start + ROW_WORDS]):
                    totals[i] += value
        return totals, processes


def nested(values: Sequence[int]) -> dict[str, Any]:
    """``[1, 0, ...]`` in COUNTERS order -> ``{"key_service": {"generate": {"ok": 1, ...}}, ...}``."""
    out: dict[str, Any] = {}
    for name, value in zip(COUNTERS, values):
        *groups, leaf = name.split(".")
        node = out
        for group in groups:
            node = node.setdefault(group, {})
        node[leaf] = value
    return out


def stats() -> dict[str, Any]:
    """This process's counters and their sum over the host's process tree (forks of the process that loaded Kombu).

    ``{"pid": 123, "process": {...}, "host": {...}, "host_processes": 9}``;
    each counter dict looks like ``{"key_service": {"generate": {"ok": 1,
    "transient_error": 0, "error": 0, "microseconds": 812}, "unwrap": {...}},
    "decrypt_cache": {"hits": .., "shared_hits": .., "misses": ..},
    "data_keys": {"created": .., "created_ahead": .., "leases": ..},
    "encrypted": {"messages": .., "bytes": ..}, "decrypted": {...}}``.
    """
    from .cache import default_cache

    return default_cache().stats()


def register_inspect_command() -> None:
    """Add ``envelope_stats`` to Celery's remote-control commands (workers answer it, ``celery inspect`` sends it)."""
    from celery.worker.control import Panel, inspect_command

    if "envelope_stats" in Panel.meta:
        return

    @inspect_command()
    def envelope_stats(state: Any) -> dict[str, Any]:
        """kombu-envelope counters of this worker's process and of all its pool processes."""
        return stats()
