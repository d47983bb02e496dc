"""The data-key cache, shared by a process and every process it forks.

Encryption: a data key encrypts until one of its limits (KeyLimits: age,
messages, bytes) is reached, counted over every process that shares it. A
message's number under its data key is its GCM nonce; numbers come from one
counter per data key in shared memory, taken in leases (runs of numbers and
a byte budget) so that a message costs no lock and no system call. A forked
child drops every lease it inherited, so no nonce is ever used twice, and
leases shrink as a key nears its limits, so no limit is exceeded by even one
message. The next data key is fetched in the background before the current
one runs out.

Decryption: unwrapped data keys are kept by the SHA-256 of the envelope
header that carries them, in this process and in a host-wide table, with a
TTL and a bounded size; a miss holds that table set's lock while calling the
key service, so concurrent misses make one call across threads and processes.

All shared state lives in one anonymous shared mapping created with the
cache (``sharedmem``), which Kombu's serializer entry point creates before any
fork; key material lives only there and in process memory. Layout,
guarantees and measurements: docs/cache.md.

This module imports only the standard library at import time (it is loaded
by the serializer entry point); ``cryptography`` is imported on first use.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import struct
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from .counters import (
    CACHE_HITS,
    CACHE_MISSES,
    CACHE_SHARED_HITS,
    DECRYPTED_BYTES,
    DECRYPTED_MESSAGES,
    ENCRYPTED_BYTES,
    ENCRYPTED_MESSAGES,
    ERROR,
    GENERATE_OK,
    KEYS_CREATED,
    KEYS_CREATED_AHEAD,
    LEASES,
    MICROSECONDS,
    TRANSIENT_ERROR,
    UNWRAP_OK,
    CounterTable,
    nested,
)
from .errors import ConfigurationError, is_transient
from .sharedmem import SharedRegion

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    _Loaded = tuple[AESGCM, bytes, bytes]  # a data key's cipher, envelope header and record id

__all__ = ["DataKeyCache", "KeyLimits", "default_cache"]

_T = TypeVar("_T")
NewDataKey = Callable[[], "tuple[bytes, bytes]"]  # -> (data key, envelope header)


@dataclass(frozen=True)
class KeyLimits:
    """How long and how much one data key may encrypt, and how unwrapped keys are kept. See docs/cache.md."""

    max_age: float = 300.0
    max_messages: int = 1 << 24
    max_bytes: int = 1 << 36
    decrypt_ttl: float = 600.0
    decrypt_capacity: int = 1024


# -- lease sizing and background refresh ---------------------------------

#: A thread's first lease takes this many message numbers and bytes; each
#: next one twice as many, up to LEASE_MESSAGES and LEASE_BYTES (more bytes
#: if one message is larger). Short-lived processes (pool children recycled
#: after a few tasks) so waste few numbers; busy ones rarely take a lock ...
FIRST_LEASE_MESSAGES = 16
FIRST_LEASE_BYTES = 1 << 16
LEASE_MESSAGES = 1024
LEASE_BYTES = 1 << 24
#: ... and at most this fraction of what its data key has left, so leases
#: shrink to one message near a limit and a key is shared fairly.
LEASE_SHARE = 16
#: The next data key is fetched once this fraction of any limit is used.
REFRESH_AT = 0.9
#: After the key service failed a refresh, the next one waits this many seconds
#: (a refresh whose process died is retried at once: its lock is gone).
REFRESH_RETRY = 10.0

# -- shared layout ---------------------------------------------------------

_COUNTER_ROWS = 1024
_ENC_SLOTS = 16  # data keys being encrypted with at once (one per codec configuration)
_RECORD_SIZE = 8192  # one data key and its envelope header
_DEC_WAYS = 4
_DEC_SETS = 256  # up to 1024 unwrapped keys host-wide

_NONE = 255  # no record
# Slot meta: seq | scope, current record, pending record, activated, next number,
# bytes used, last lease, last failed refresh | check. seq is odd while it is written.
_SEQ = struct.Struct("<Q")
_META_BODY = struct.Struct("<16sBB6xdQQdd")
_CHECK_SIZE = 8
_META_SIZE = 128
# Record: state | id, created, header length, data key | check | header. state 1 = complete.
_RECORD = struct.Struct("<B7x8sdI4x32s")
_MAX_HEADER = _RECORD_SIZE - _RECORD.size - _CHECK_SIZE
_SLOT_SIZE = _META_SIZE + 2 * _RECORD_SIZE
# Decryption entry: state | digest, data key, expiry | check.
_ENTRY = struct.Struct("<B7x32s32sd")
_ENTRY_SIZE = 96

_COUNTERS_OFF = 0
_ENC_OFF = _COUNTERS_OFF + CounterTable.size(_COUNTER_ROWS)
_DEC_OFF = _ENC_OFF + _ENC_SLOTS * _SLOT_SIZE
_REGION_SIZE = _DEC_OFF + _DEC_SETS * _DEC_WAYS * _ENTRY_SIZE

_COUNTER_LOCKS = 0
_ENC_TABLE_LOCK = _COUNTER_LOCKS + CounterTable.locks(_COUNTER_ROWS)
_ENC_SLOT_LOCKS = _ENC_TABLE_LOCK + 1
_ENC_REFRESH_LOCKS = _ENC_SLOT_LOCKS + _ENC_SLOTS  # held while a slot's next key is being fetched
_DEC_SET_LOCKS = _ENC_REFRESH_LOCKS + _ENC_SLOTS
_LOCKS = _DEC_SET_LOCKS + _DEC_SETS

_EMPTY_SCOPE = bytes(16)
_monotonic = time.monotonic


def _check(data: bytes) -> bytes:
    """Detects a record torn by a writer that died mid-write (not an authenticator: nothing here is untrusted)."""
    return hashlib.blake2b(data, digest_size=_CHECK_SIZE).digest()


def _new_cipher(data_key: bytes) -> AESGCM:
    from .crypto import AESGCM

    return AESGCM(data_key)


class _Lease:
    """Message numbers ``[next, end)`` and ``bytes_left`` plaintext bytes under one data key, for one thread."""

    __slots__ = (
        "bytes_left",
        "cipher",
        "deadline",
        "end",
        "granted_bytes",
        "header",
        "key_id",
        "numbers",
        "row",
        "start",
    )

    def __init__(
        self,
        cipher: AESGCM,
        header: bytes,
        key_id: object,
        start: int,
        end: int,
        bytes_left: int,
        deadline: float,
        row: memoryview,
    ) -> None:
        self.cipher = cipher
        self.key_id = key_id  # which data key: to give back what the lease did not use
        self.header = header
        # next() on a count is one C call: not even a signal handler that
        # encrypts can take the same number twice.
        self.numbers = itertools.count(start)
        self.start = start
        self.end = end
        self.granted_bytes = bytes_left
        self.bytes_left = bytes_left
        self.deadline = deadline
        self.row = row


class _ThreadLeases(threading.local):
    """Each thread encrypts from its own leases, so taking a number needs no lock."""

    def __init__(self) -> None:
        self.by_scope: dict[bytes, _Lease] = {}


class _Meta:
    """A data-key slot's counters, as read from (and written back to) shared memory."""

    __slots__ = ("activated", "bytes_used", "current", "last_lease", "next", "pending", "refresh_failed", "scope")

    def __init__(
        self,
        scope: bytes = _EMPTY_SCOPE,
        current: int = _NONE,
        pending: int = _NONE,
        activated: float = 0.0,
        next: int = 0,
        bytes_used: int = 0,
        last_lease: float = 0.0,
        refresh_failed: float = 0.0,
    ) -> None:
        self.scope = scope
        self.current = current
        self.pending = pending
        self.activated = activated
        self.next = next
        self.bytes_used = bytes_used
        self.last_lease = last_lease
        self.refresh_failed = refresh_failed

    def start_key(self, record: int, now: float) -> None:
        self.current = record
        self.activated = now
        self.next = 0
        self.bytes_used = 0


class _PrivateKey:
    """A data key this process keeps to itself (shared slots full, or a header too large for one)."""

    __slots__ = ("activated", "bytes_used", "cipher", "header", "next")

    def __init__(self, cipher: AESGCM, header: bytes, activated: float) -> None:
        self.cipher = cipher
        self.header = header
        self.activated = activated
        self.next = 0
        self.bytes_used = 0


def _exhausted(activated: float, used: int, bytes_used: int, limits: KeyLimits, size: int, now: float) -> bool:
    return now >= activated + limits.max_age or used >= limits.max_messages or bytes_used + size > limits.max_bytes


def _give_back(lease: _Lease, unused_from: int, used: int, bytes_used: int) -> tuple[int, int]:
    """A key's (numbers, bytes) used after ``lease`` returns what it did not use.

    Unused bytes always return; unused numbers only if nobody took numbers
    after the lease (they are the top of the counter), so none is handed out twice.
    """
    if used == lease.end and unused_from < lease.end:
        used = unused_from
    return used, bytes_used - lease.bytes_left


def _lease_size(used: int, bytes_used: int, limits: KeyLimits, size: int, old: _Lease | None) -> tuple[int, int]:
    """(message numbers, bytes) for a thread's next lease (after ``old``) of a key not exhausted for ``size`` bytes."""
    if old is None:
        want_count, want_bytes = FIRST_LEASE_MESSAGES, FIRST_LEASE_BYTES
    else:
        want_count = min(LEASE_MESSAGES, 2 * (old.end - old.start))
        want_bytes = min(LEASE_BYTES, 2 * old.granted_bytes)
    count = min(want_count, max(1, (limits.max_messages - used) // LEASE_SHARE))
    bytes_left = limits.max_bytes - bytes_used
    return count, min(bytes_left, max(size, min(want_bytes, bytes_left // LEASE_SHARE)))


def _decrypt_set(digest: bytes, limits: KeyLimits) -> int:
    """The set of the host-wide table that may hold ``digest``; fewer sets for a smaller decrypt_capacity."""
    return int.from_bytes(digest[:4], "little") % min(_DEC_SETS, -(-limits.decrypt_capacity // _DEC_WAYS))


class DataKeyCache:
    """Data keys for encryption (leased within limits) and unwrapped keys for decryption, host-wide.

    A cache is shared with the processes forked after it was created; make
    it before forking (``default_cache()`` is made when Kombu loads the
    serializer). Thread-safe and fork-safe.
    """

    def __init__(self) -> None:
        self._region = SharedRegion(_REGION_SIZE, _LOCKS)
        self._buf = self._region.buf
        self._counters = CounterTable(self._region, _COUNTERS_OFF, _COUNTER_ROWS, _COUNTER_LOCKS)
        self._slot_of: dict[bytes, int] = {}  # scope -> slot, verified under the slot's lock
        self._ciphers: dict[bytes, _Loaded] = {}  # record id -> (cipher, header, record id)
        self._unwrapped: dict[bytes, tuple[bytes, float]] = {}  # header digest -> (data key, expiry)
        self._start_process()
        _live_caches.add(self)

    def _start_process(self) -> None:
        """State that belongs to one process: fresh at creation and in every forked child."""
        self._lock = threading.Lock()
        self._unwrapped_lock = threading.Lock()
        self._row_lock = threading.Lock()
        self._row: memoryview | None = None
        self._local = _ThreadLeases()  # the parent's leases are gone: their numbers are the parent's
        self._private: dict[bytes, _PrivateKey] = {}
        self._refreshing: set[bytes] = set()

    def _after_fork_in_child(self) -> None:
        self._region.after_fork_in_child()
        self._start_process()

    # -- encryption ------------------------------------------------------

    def next_nonce(self, scope: bytes, size: int, limits: KeyLimits, create: NewDataKey) -> tuple[AESGCM, bytes, bytes]:
        """``(cipher, header, nonce)`` for one message of ``size`` plaintext bytes under ``scope``'s data key.

        ``create`` makes a new data key: ``() -> (data key, envelope header)``.
        """
        lease = self._local.by_scope.get(scope)
        if lease is None:
            return self._next_nonce_new_lease(scope, size, limits, create, None, 0)
        number = next(lease.numbers)
        if number < lease.end:
            bytes_left = lease.bytes_left - size
            if bytes_left >= 0 and _monotonic() < lease.deadline:
                lease.bytes_left = bytes_left
                row = lease.row
                row[ENCRYPTED_MESSAGES] += 1
                row[ENCRYPTED_BYTES] += size
                return lease.cipher, lease.header, number.to_bytes(12, "big")
        return self._next_nonce_new_lease(scope, size, limits, create, lease, number)

    def _next_nonce_new_lease(
        self, scope: bytes, size: int, limits: KeyLimits, create: NewDataKey, old: _Lease | None, unused_from: int
    ) -> tuple[AESGCM, bytes, bytes]:
        """Replace this thread's lease (``old``, unused from number ``unused_from`` on) and take a number from the new one."""
        if size > limits.max_bytes:
            raise ConfigurationError(
                f"a {size}-byte message is larger than envelope_data_key_max_bytes={limits.max_bytes}; "
                "raise the setting (e.g. envelope_data_key_max_bytes=68719476736)"
            )
        row = self._counting_row()
        lease = (
            None if scope in self._private else self._shared_lease(scope, size, limits, create, row, old, unused_from)
        )
        if lease is None:
            lease = self._private_lease(scope, size, limits, create, row, old, unused_from)
        self._local.by_scope[scope] = lease
        number = next(lease.numbers)
        lease.bytes_left -= size  # a lease always fits the message it was taken for
        row[ENCRYPTED_MESSAGES] += 1
        row[ENCRYPTED_BYTES] += size
        return lease.cipher, lease.header, number.to_bytes(12, "big")

    def _shared_lease(
        self,
        scope: bytes,
        size: int,
        limits: KeyLimits,
        create: NewDataKey,
        row: memoryview,
        old: _Lease | None,
        unused_from: int,
    ) -> _Lease | None:
        for _ in range(3):  # the slot can be given to another scope between lookup and lock
            slot = self._slot_for(scope)
            with self._region.hold(_ENC_SLOT_LOCKS + slot):
                meta = self._read_meta(slot)
                if meta is not None and meta.scope == scope:
                    if old is not None and meta.current != _NONE and old.key_id == self._record_id(slot, meta.current):
                        meta.next, meta.bytes_used = _give_back(old, unused_from, meta.next, meta.bytes_used)
                    return self._lease_from_slot(slot, meta, size, limits, create, row, old)
            self._slot_of.pop(scope, None)
        return None

    def _lease_from_slot(
        self,
        slot: int,
        meta: _Meta,
        size: int,
        limits: KeyLimits,
        create: NewDataKey,
        row: memoryview,
        old: _Lease | None,
    ) -> _Lease | None:
        """Under the slot's lock: a lease from its current data key, after rotating it if exhausted."""
        now = _monotonic()
        current = self._record_cipher(slot, meta.current) if meta.current != _NONE else None
        if current is None or _exhausted(meta.activated, meta.next, meta.bytes_used, limits, size, now):
            current = self._promote_pending(slot, meta, limits, now)
            if current is None:
                data_key, header = self._generate(create, KEYS_CREATED, row, limits)
                if len(header) > _MAX_HEADER:  # this scope's keys stay in this process
                    with self._lock:
                        self._private[meta.scope] = _PrivateKey(_new_cipher(data_key), header, _monotonic())
                    return None
                record = 1 - meta.current if meta.current in (0, 1) else 0
                current = self._write_record(slot, record, data_key, header)
                self._retire(slot, meta.current)
                now = _monotonic()
                meta.start_key(record, now)
        count, grant_bytes = _lease_size(meta.next, meta.bytes_used, limits, size, old)
        start = meta.next
        meta.next += count
        meta.bytes_used += grant_bytes
        meta.last_lease = now
        deadline = meta.activated + limits.max_age
        if meta.pending == _NONE and meta.scope not in self._refreshing:
            if not (
                now - meta.activated >= REFRESH_AT * limits.max_age
                or meta.next >= REFRESH_AT * limits.max_messages
                or meta.bytes_used >= REFRESH_AT * limits.max_bytes
            ):  # come back in time to start the refresh
                deadline = min(deadline, meta.activated + REFRESH_AT * limits.max_age)
            elif now - meta.refresh_failed >= REFRESH_RETRY and self._region.try_lock(_ENC_REFRESH_LOCKS + slot):
                self._start_refresh(slot, meta.scope, limits, create)  # else another process is refreshing
        self._write_meta(slot, meta)
        row[LEASES] += 1
        cipher, header, record_id = current
        return _Lease(cipher, header, record_id, start, start + count, grant_bytes, deadline, row)

    def _promote_pending(self, slot: int, meta: _Meta, limits: KeyLimits, now: float) -> _Loaded | None:
        """Make the key fetched ahead the current one, unless it is missing, torn or too old."""
        if meta.pending == _NONE:
            return None
        pending, meta.pending = meta.pending, _NONE
        created = _RECORD.unpack_from(self._buf, self._record_offset(slot, pending))[2]
        loaded = self._record_cipher(slot, pending)
        if loaded is None or now - created >= limits.max_age:
            self._retire(slot, pending)
            return None
        self._retire(slot, meta.current)
        meta.start_key(pending, now)
        return loaded

    def _private_lease(
        self,
        scope: bytes,
        size: int,
        limits: KeyLimits,
        create: NewDataKey,
        row: memoryview,
        old: _Lease | None,
        unused_from: int,
    ) -> _Lease:
        with self._lock:
            key = self._private.get(scope)
            if key is not None and old is not None and old.key_id is key:
                key.next, key.bytes_used = _give_back(old, unused_from, key.next, key.bytes_used)
            now = _monotonic()
            if key is None or _exhausted(key.activated, key.next, key.bytes_used, limits, size, now):
                data_key, header = self._generate(create, KEYS_CREATED, row, limits)
                key = self._private[scope] = _PrivateKey(_new_cipher(data_key), header, _monotonic())
            count, grant_bytes = _lease_size(key.next, key.bytes_used, limits, size, old)
            start = key.next
            key.next += count
            key.bytes_used += grant_bytes
        row[LEASES] += 1
        deadline = key.activated + limits.max_age
        return _Lease(key.cipher, key.header, key, start, start + count, grant_bytes, deadline, row)

    def _start_refresh(self, slot: int, scope: bytes, limits: KeyLimits, create: NewDataKey) -> None:
        """Under the slot's lock, holding its refresh lock: fetch the next key in a thread that releases it."""
        with self._lock:
            self._refreshing.add(scope)
        threading.Thread(
            target=self._refresh, args=(slot, scope, limits, create), name="kombu-envelope-key-refresh", daemon=True
        ).start()

    def _refresh(self, slot: int, scope: bytes, limits: KeyLimits, create: NewDataKey) -> None:
        """Background thread: fetch the next data key for ``scope`` and store it as the slot's pending key."""
        try:
            try:
                data_key, header = self._generate(create, KEYS_CREATED_AHEAD, self._counting_row(), limits)
            except Exception as exc:  # noqa: BLE001  (the next publish tries again and raises to its caller)
                import logging

                logging.getLogger(__name__).warning("fetching the next data key ahead of time failed: %s", exc)
                data_key, header = b"", b""
            if len(header) > _MAX_HEADER:
                return
            with self._region.hold(_ENC_SLOT_LOCKS + slot):
                meta = self._read_meta(slot)
                if meta is None or meta.scope != scope or meta.pending != _NONE:
                    return
                if data_key:
                    meta.pending = 1 - meta.current if meta.current in (0, 1) else 0
                    self._write_record(slot, meta.pending, data_key, header)
                else:
                    meta.refresh_failed = _monotonic()
                self._write_meta(slot, meta)
        finally:
            self._region.unlock(_ENC_REFRESH_LOCKS + slot)
            with self._lock:
                self._refreshing.discard(scope)

    def _generate(self, create: NewDataKey, counter: int, row: memoryview, limits: KeyLimits) -> tuple[bytes, bytes]:
        data_key, header = self._call_key_service(GENERATE_OK, create, row)
        row[counter] += 1
        self._seed_decrypt_cache(header, data_key, limits)
        return data_key, header

    def _seed_decrypt_cache(self, header: bytes, data_key: bytes, limits: KeyLimits) -> None:
        """Processes of the host that made a data key read messages sealed with it without the key service."""
        if limits.decrypt_ttl <= 0:
            return
        digest = hashlib.sha256(header).digest()
        cache_set = _decrypt_set(digest, limits)
        entry = (data_key, _monotonic() + limits.decrypt_ttl)
        with self._region.hold(_DEC_SET_LOCKS + cache_set):
            self._store_shared_entry(cache_set, digest, entry)
        self._remember(digest, entry, limits)

    # -- shared data-key slots -------------------------------------------

    def _slot_for(self, scope: bytes) -> int:
        """The slot holding ``scope``'s data keys, claiming the emptiest or least recently used one if none does."""
        slot = self._slot_of.get(scope)
        if slot is not None:
            return slot
        with self._region.hold(_ENC_TABLE_LOCK):
            scopes = [self._buf[self._slot_offset(s) + 8 : self._slot_offset(s) + 24] for s in range(_ENC_SLOTS)]
            if scope in scopes:
                slot = scopes.index(scope)
            else:

                def eviction_order(s: int) -> tuple[bool, float]:
                    last_lease = _META_BODY.unpack_from(self._buf, self._slot_offset(s) + 8)[6]
                    return scopes[s] != _EMPTY_SCOPE, last_lease

                slot = min(range(_ENC_SLOTS), key=eviction_order)
                with self._region.hold(_ENC_SLOT_LOCKS + slot):
                    self._reset_slot(slot, scope)
        self._slot_of[scope] = slot
        return slot

    def _slot_offset(self, slot: int) -> int:
        return _ENC_OFF + slot * _SLOT_SIZE

    def _record_offset(self, slot: int, record: int) -> int:
        return self._slot_offset(slot) + _META_SIZE + record * _RECORD_SIZE

    def _read_meta(self, slot: int) -> _Meta | None:
        """The slot's meta, or None (after wiping the slot) if a writer died while writing it."""
        offset = self._slot_offset(slot)
        raw = bytes(self._buf[offset : offset + _SEQ.size + _META_BODY.size + _CHECK_SIZE])
        body = raw[_SEQ.size : _SEQ.size + _META_BODY.size]
        if _SEQ.unpack_from(raw)[0] & 1 or raw[-_CHECK_SIZE:] != _check(body):
            self._reset_slot(slot, _EMPTY_SCOPE)
            return None
        return _Meta(*_META_BODY.unpack(body))

    def _write_meta(self, slot: int, meta: _Meta) -> None:
        offset = self._slot_offset(slot)
        seq = _SEQ.unpack_from(self._buf, offset)[0] | 1
        _SEQ.pack_into(self._buf, offset, seq)  # odd: being written
        body = _META_BODY.pack(
            meta.scope,
            meta.current,
            meta.pending,
            meta.activated,
            meta.next,
            meta.bytes_used,
            meta.last_lease,
            meta.refresh_failed,
        )
        start = offset + _SEQ.size
        self._buf[start : start + len(body)] = body
        self._buf[start + len(body) : start + len(body) + _CHECK_SIZE] = _check(body)
        _SEQ.pack_into(self._buf, offset, seq + 1)

    def _reset_slot(self, slot: int, scope: bytes) -> None:
        """Wipe the slot's keys and give it to ``scope``. Keys still leased keep working until their leases end."""
        for record in (0, 1):
            self._retire(slot, record)
        self._write_meta(slot, _Meta(scope))

    def _write_record(self, slot: int, record: int, data_key: bytes, header: bytes) -> _Loaded:
        offset = self._record_offset(slot, record)
        record_id = os.urandom(8)
        self._buf[offset] = 0
        fixed = _RECORD.pack(0, record_id, time.monotonic(), len(header), data_key)
        self._buf[offset : offset + len(fixed)] = fixed
        start = offset + _RECORD.size + _CHECK_SIZE
        self._buf[start : start + len(header)] = header
        self._buf[offset + _RECORD.size : start] = _check(fixed[1:] + header)
        self._buf[offset] = 1
        loaded = self._ciphers[record_id] = (_new_cipher(data_key), header, record_id)
        return loaded

    def _record_id(self, slot: int, record: int) -> bytes:
        return _RECORD.unpack_from(self._buf, self._record_offset(slot, record))[1]  # type: ignore[no-any-return]

    def _record_cipher(self, slot: int, record: int) -> _Loaded | None:
        """``(cipher, header, record id)`` of a record, built once per process; None if the record is torn."""
        offset = self._record_offset(slot, record)
        state, record_id, _, header_size, data_key = _RECORD.unpack_from(self._buf, offset)
        loaded = self._ciphers.get(record_id)
        if loaded is not None and state == 1:
            return loaded
        start = offset + _RECORD.size + _CHECK_SIZE
        header = bytes(self._buf[start : start + min(header_size, _MAX_HEADER)])
        fixed = bytes(self._buf[offset + 1 : offset + _RECORD.size])
        if state != 1 or bytes(self._buf[offset + _RECORD.size : start]) != _check(fixed + header):
            return None
        if len(self._ciphers) >= 4 * _ENC_SLOTS:
            self._ciphers.clear()
        loaded = self._ciphers[record_id] = (_new_cipher(data_key), header, record_id)
        return loaded

    def _retire(self, slot: int, record: int) -> None:
        """Zero a record, data key included; never reused, so no nonce of it is taken again."""
        if record in (0, 1):
            offset = self._record_offset(slot, record)
            self._buf[offset : offset + _RECORD_SIZE] = bytes(_RECORD_SIZE)

    # -- decryption ------------------------------------------------------

    def unwrapped_key(self, header: bytes, limits: KeyLimits, unwrap: Callable[[], bytes]) -> bytes:
        """The data key inside ``header``; ``unwrap`` (the key service) is called once per key per host."""
        digest = hashlib.sha256(header).digest()
        row = self._counting_row()
        now = _monotonic()
        entry = self._unwrapped.get(digest)
        if entry is not None and entry[1] > now:
            row[CACHE_HITS] += 1
            return entry[0]
        cache_set = _decrypt_set(digest, limits)
        entry = self._shared_entry(cache_set, digest, now)
        if entry is None:
            with self._region.hold(_DEC_SET_LOCKS + cache_set):  # single flight, host-wide
                entry = self._shared_entry(cache_set, digest, _monotonic())
                if entry is None:
                    data_key = self._call_key_service(UNWRAP_OK, unwrap, row)
                    row[CACHE_MISSES] += 1
                    if limits.decrypt_ttl <= 0:
                        return data_key
                    entry = (data_key, _monotonic() + limits.decrypt_ttl)
                    self._store_shared_entry(cache_set, digest, entry)
                    self._remember(digest, entry, limits)
                    return data_key
        row[CACHE_HITS] += 1
        row[CACHE_SHARED_HITS] += 1
        self._remember(digest, entry, limits)
        return entry[0]

    def _remember(self, digest: bytes, entry: tuple[bytes, float], limits: KeyLimits) -> None:
        with self._unwrapped_lock:
            while len(self._unwrapped) >= limits.decrypt_capacity:
                self._unwrapped.pop(next(iter(self._unwrapped)))
            self._unwrapped[digest] = entry

    def _entry_offset(self, cache_set: int, way: int) -> int:
        return _DEC_OFF + (cache_set * _DEC_WAYS + way) * _ENTRY_SIZE

    def _shared_entry(self, cache_set: int, digest: bytes, now: float) -> tuple[bytes, float] | None:
        """Lock-free read; a torn entry (concurrent or dead writer) fails its check and reads as a miss."""
        for way in range(_DEC_WAYS):
            offset = self._entry_offset(cache_set, way)
            raw = bytes(self._buf[offset : offset + _ENTRY.size + _CHECK_SIZE])
            state, entry_digest, data_key, expiry = _ENTRY.unpack_from(raw)
            if (
                state == 1
                and entry_digest == digest
                and expiry > now
                and raw[_ENTRY.size :] == _check(raw[1 : _ENTRY.size])
            ):
                return data_key, expiry
        return None

    def _store_shared_entry(self, cache_set: int, digest: bytes, entry: tuple[bytes, float]) -> None:
        """Under the set's lock: replace this digest's way, else a free or expired one, else the one expiring first."""
        now = _monotonic()

        def replacement_order(way: int) -> tuple[int, float]:
            state, entry_digest, _, expiry = _ENTRY.unpack_from(self._buf, self._entry_offset(cache_set, way))
            if entry_digest == digest:
                return 0, 0.0
            return (1, 0.0) if state != 1 or expiry <= now else (2, expiry)

        offset = self._entry_offset(cache_set, min(range(_DEC_WAYS), key=replacement_order))
        self._buf[offset] = 0
        raw = _ENTRY.pack(0, digest, entry[0], entry[1])
        self._buf[offset : offset + _ENTRY.size] = raw
        self._buf[offset + _ENTRY.size : offset + _ENTRY.size + _CHECK_SIZE] = _check(raw[1:])
        self._buf[offset] = 1

    def count_decrypted(self, size: int) -> None:
        """Count one message of ``size`` plaintext bytes decrypted (the codec calls this)."""
        row = self._row
        if row is None:
            row = self._counting_row()
        row[DECRYPTED_MESSAGES] += 1
        row[DECRYPTED_BYTES] += size

    # -- counters ----------------------------------------------------------

    def _counting_row(self) -> memoryview:
        row = self._row
        if row is None:
            with self._row_lock:
                row = self._row
                if row is None:
                    row = self._row = self._counters.claim()
        return row

    def _call_key_service(self, operation: int, call: Callable[[], _T], row: memoryview) -> _T:
        """``call()``, counted by outcome and timed, under ``operation`` (GENERATE_OK or UNWRAP_OK)."""
        started = time.perf_counter()
        try:
            result = call()
        except BaseException as exc:
            row[operation + (TRANSIENT_ERROR if is_transient(exc) else ERROR)] += 1
            raise
        else:
            row[operation] += 1
            return result
        finally:
            row[operation + MICROSECONDS] += int((time.perf_counter() - started) * 1e6)

    def stats(self) -> dict[str, Any]:
        """This process's counters and their sum over every process sharing this cache; see ``kombu_envelope.stats()``."""
        row = self._counting_row()
        totals, processes = self._counters.host_totals()
        return {"pid": os.getpid(), "process": nested(row[1:]), "host": nested(totals), "host_processes": processes}

    def clear(self) -> None:
        """Forget every data key, in this process and host-wide (tests; after a configuration change)."""
        with self._lock, self._unwrapped_lock:
            self._local = _ThreadLeases()
            self._private.clear()
            self._unwrapped.clear()
            self._ciphers.clear()
        for slot in range(_ENC_SLOTS):
            with self._region.hold(_ENC_SLOT_LOCKS + slot):
                self._reset_slot(slot, _EMPTY_SCOPE)
        self._slot_of.clear()
        for cache_set in range(_DEC_SETS):
            with self._region.hold(_DEC_SET_LOCKS + cache_set):
                start = self._entry_offset(cache_set, 0)
                self._buf[start : start + _DEC_WAYS * _ENTRY_SIZE] = bytes(_DEC_WAYS * _ENTRY_SIZE)


_live_caches: weakref.WeakSet[DataKeyCache] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for cache in list(_live_caches):
        cache._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)

_default: DataKeyCache | None = None
_default_lock = threading.Lock()


def default_cache() -> DataKeyCache:
    """The cache every codec shares unless given its own; Kombu's serializer entry point makes it before any fork."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = DataKeyCache()
    return _default
