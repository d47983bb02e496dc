"""The data-key cache: reuse data keys within limits, unwrap each wrapped key once.

Encryption side: a data key is used for a bounded number of messages, bytes
and seconds. Message numbers (which are also the GCM nonces) are handed out
from the key's counter in leases, so each message under a data key has a
unique nonce.

Decryption side: unwrapped data keys are kept by the digest of the envelope
header that carried them, with a TTL and a bounded capacity; concurrent misses
for one header make a single key-service call.

This is the process-local implementation; see docs/cache.md.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable

from .crypto import AESGCM, counter_nonce

__all__ = ["KeyLimits", "DataKeyCache", "default_cache"]


@dataclass(frozen=True)
class KeyLimits:
    """How long and how much one data key may encrypt. See docs/cache.md for the defaults."""

    max_age: float = 300.0
    max_messages: int = 1 << 24
    max_bytes: int = 1 << 36
    decrypt_ttl: float = 600.0
    decrypt_capacity: int = 1024


class _Lease:
    """A run of message numbers under one data key that this process may use."""

    __slots__ = ("cipher", "header", "next", "end", "bytes_left", "deadline", "lock")

    def __init__(self, cipher: AESGCM, header: bytes, start: int, end: int, bytes_left: int, deadline: float):
        self.cipher = cipher
        self.header = header
        self.next = start
        self.end = end
        self.bytes_left = bytes_left
        self.deadline = deadline
        self.lock = threading.Lock()

    def take(self, size: int) -> bytes | None:
        with self.lock:
            n = self.next
            if n >= self.end or size > self.bytes_left or time.monotonic() >= self.deadline:
                return None
            self.next = n + 1
            self.bytes_left -= size
        return counter_nonce(n)


NewDataKey = Callable[[], "tuple[bytes, bytes]"]  # -> (data key, envelope header)


class DataKeyCache:
    """Data keys for encryption (leased within limits) and unwrapped keys for decryption."""

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        # After fork: fresh locks, and no lease of the parent's, so no nonce is used twice.
        self._lock = threading.Lock()
        self._leases: dict[bytes, _Lease] = {}
        self._unwrapped: dict[bytes, tuple[bytes, float]] = {}
        self._inflight: dict[bytes, threading.Lock] = {}

    def next_nonce(
        self, scope: bytes, size: int, limits: KeyLimits, create: NewDataKey
    ) -> tuple[AESGCM, bytes, bytes]:
        """``(cipher, header, nonce)`` for one message of ``size`` plaintext bytes under ``scope``'s data key."""
        lease = self._leases.get(scope)
        if lease is not None:
            nonce = lease.take(size)
            if nonce is not None:
                return lease.cipher, lease.header, nonce
        return self._renew(scope, size, limits, create)

    def _renew(self, scope: bytes, size: int, limits: KeyLimits, create: NewDataKey) -> tuple[AESGCM, bytes, bytes]:
        if size > limits.max_bytes:
            raise ValueError(f"a {size}-byte message exceeds envelope_data_key_max_bytes={limits.max_bytes}")
        with self._lock:
            lease = self._leases.get(scope)
            nonce = lease.take(size) if lease is not None else None
            if nonce is None:
                data_key, header = create()
                lease = _Lease(
                    AESGCM(data_key), header, 0, limits.max_messages, limits.max_bytes, time.monotonic() + limits.max_age
                )
                self._leases[scope] = lease
                nonce = lease.take(size)
        assert nonce is not None
        return lease.cipher, lease.header, nonce

    def unwrapped_key(self, header: bytes, limits: KeyLimits, unwrap: Callable[[], bytes]) -> bytes:
        """The data key inside ``header``, calling ``unwrap`` at most once per header at a time."""
        digest = hashlib.sha256(header).digest()
        now = time.monotonic()
        entry = self._unwrapped.get(digest)
        if entry is not None and entry[1] > now:
            return entry[0]
        with self._lock:
            flight = self._inflight.setdefault(digest, threading.Lock())
        with flight:
            entry = self._unwrapped.get(digest)
            if entry is not None and entry[1] > time.monotonic():
                return entry[0]
            try:
                data_key = unwrap()
            finally:
                with self._lock:
                    self._inflight.pop(digest, None)
            with self._lock:
                while len(self._unwrapped) >= limits.decrypt_capacity:
                    self._unwrapped.pop(next(iter(self._unwrapped)))
                self._unwrapped[digest] = (data_key, time.monotonic() + limits.decrypt_ttl)
        return data_key

    def clear(self) -> None:
        """Forget every data key (for tests and after a configuration change)."""
        with self._lock:
            self._leases.clear()
            self._unwrapped.clear()


_default: DataKeyCache | None = None


def default_cache() -> DataKeyCache:
    """The process-wide cache every codec shares unless given its own."""
    global _default
    if _default is None:
        _default = DataKeyCache()
    return _default
