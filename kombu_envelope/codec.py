"""``EnvelopeCodec``: Python value <-> envelope bytes. Works without Celery.

Encode: serialize (``payload``), take a nonce under the current cached data
key (``cache``), AES-256-GCM with the header as associated data (``wire``).
Decode: find the header, look up its unwrapped data key (unwrapping it through
the key service named by the header's fingerprint on a miss), decrypt, parse.
"""

from __future__ import annotations

import hashlib
import threading
from time import monotonic as _monotonic
from typing import Any, Mapping, Sequence

from cryptography.exceptions import InvalidTag

from . import payload, wire
from .cache import DataKeyCache, KeyLimits, default_cache
from .crypto import AESGCM
from .errors import ConfigurationError, InvalidEnvelope, KeyServiceError, UnknownKey
from .providers import KeyProvider, provider_for_uri
from .settings import EnvelopeSettings

__all__ = ["EnvelopeCodec"]

#: Bodies from this size on are decrypted from a memoryview (below it, the view costs more than the copy).
_VIEW_FROM = 8192
_AUTH_FAILED = "authentication failed: the ciphertext, tag, nonce or header was altered, or it was sealed under another data key"


class EnvelopeCodec:
    """Encrypts and decrypts message bodies under one key configuration.

    ``key_uris`` wrap new data keys (several: each wraps it, any one
    decrypts); ``decrypt_key_uris`` are accepted for decryption only (keys
    being rotated out). ``context`` is bound to every message and must match
    on decryption.
    """

    def __init__(
        self,
        key_uris: Sequence[str] = (),
        decrypt_key_uris: Sequence[str] = (),
        *,
        context: Mapping[str, str] | None = None,
        compression: str | None = None,
        mode: str = "envelope",
        limits: KeyLimits | None = None,
        cache: DataKeyCache | None = None,
    ) -> None:
        if mode not in ("envelope", "direct"):
            raise ConfigurationError(f"envelope_mode must be 'envelope' or 'direct', not {mode!r}")
        self._encrypt_providers = [provider_for_uri(u, "envelope_key_uri") for u in key_uris]
        self._decrypt_providers: dict[tuple[int, bytes], KeyProvider] = {}
        for p in self._encrypt_providers + [provider_for_uri(u, "envelope_decrypt_key_uris") for u in decrypt_key_uris]:
            self._decrypt_providers.setdefault((p.provider_id, p.fingerprint), p)
        self._context = dict(context) if context else None
        self._context_bytes = wire.canonical_context(self._context)
        self._compression = compression
        self._compress = payload.compressor(compression)
        self._mode = mode
        self._limits = limits or KeyLimits()
        self._cache = cache or default_cache()
        if mode == "direct" and len(self._encrypt_providers) > 1:
            raise ConfigurationError("envelope_mode='direct' takes exactly one envelope_key_uri (multi-wrap needs envelope mode)")
        # Data keys are shared by every codec with the same keys, context and compression.
        self._scope = hashlib.sha256(
            repr((tuple(key_uris), self._context_bytes, compression, mode)).encode()
        ).digest()[:16]
        # Decryption fast path: header bytes -> (cipher, expiry), for headers this codec has verified.
        self._ciphers: dict[bytes, tuple[AESGCM, float]] = {}
        self._ciphers_lock = threading.Lock()
        # The last of them used: (header, cipher, expiry); the empty header has expired.
        self._recent: tuple[bytes, AESGCM | None, float] = (b"", None, float("-inf"))

    @classmethod
    def from_settings(cls, settings: EnvelopeSettings, cache: DataKeyCache | None = None) -> EnvelopeCodec:
        return cls(
            settings.key_uris,
            settings.decrypt_key_uris,
            context=settings.encryption_context,
            compression=settings.compression,
            mode=settings.mode,
            limits=settings.limits,
            cache=cache,
        )

    @property
    def key_uris(self) -> list[str]:
        return [p.uri for p in self._encrypt_providers]

    # -- encryption -----------------------------------------------------

    def encode(self, obj: Any) -> bytes:
        """Serialize and encrypt ``obj``; the result is the whole message body."""
        plaintext = payload.dumps(obj)
        if self._compress is not None:
            plaintext = self._compress(plaintext)
        if self._mode == "direct":
            return self._encode_direct(plaintext)
        cipher, header, nonce = self._cache.next_nonce(self._scope, len(plaintext), self._limits, self._new_data_key)
        return b"".join((header, nonce, cipher.encrypt(nonce, plaintext, header)))

    def _require_key_uris(self) -> None:
        if not self._encrypt_providers:
            raise ConfigurationError(
                "envelope_key_uri is not set, so nothing can be encrypted; set it in the Celery config "
                "(envelope_key_uri='aws-kms://alias/orders') or the environment "
                "(KOMBU_ENVELOPE_KEY_URI=local:///path/made/by/kombu-envelope-keygen)"
            )

    def _new_data_key(self) -> tuple[bytes, bytes]:
        """A fresh data key wrapped under every ``key_uris`` entry, and the header that carries it."""
        self._require_key_uris()
        first, *others = self._encrypt_providers
        data_key, wrapped = first.generate_data_key(self._context or {})
        keys = [wire.WrappedKey(first.provider_id, first.fingerprint, wrapped)]
        for p in others:
            keys.append(wire.WrappedKey(p.provider_id, p.fingerprint, p.wrap_data_key(data_key, self._context or {})))
        return data_key, wire.build_header(wire.ALG_AES256_GCM, keys, self._context, self._compression)

    def _encode_direct(self, plaintext: bytes) -> bytes:
        self._require_key_uris()
        provider = self._encrypt_providers[0]
        limit = provider.max_direct_plaintext
        if limit is not None and len(plaintext) > limit:
            raise ConfigurationError(
                f"a {len(plaintext)}-byte payload is over the {limit}-byte limit of direct mode for {provider.uri}; "
                "use envelope_mode='envelope' (the default) for payloads of this size"
            )
        ciphertext = provider.encrypt(plaintext, self._context or {})
        key = wire.WrappedKey(provider.provider_id, provider.fingerprint, ciphertext)
        return wire.build_header(wire.ALG_DIRECT, [key], self._context, self._compression)

    # -- decryption -----------------------------------------------------

    def decode(self, data: bytes | bytearray | memoryview | str) -> Any:
        """Authenticate, decrypt and deserialize one message body. Raises InvalidEnvelope or KeyServiceError."""
        if type(data) is not bytes:
            data = _as_bytes(data)
        # Fast path: the header of the previous message. A header's length is
        # fixed by its own bytes, so a body that starts with a whole header
        # verified before carries exactly that header.
        header, cipher, expiry = self._recent
        if not data.startswith(header) or expiry < _monotonic():
            header = data[: wire.header_size(data)]
            entry = self._ciphers.get(header)
            if entry is None or entry[1] < _monotonic():
                parsed = wire.parse_header(data)
                if parsed.algorithm == wire.ALG_DIRECT:
                    plaintext = self._decrypt_direct(parsed)
                    if parsed.compression:
                        plaintext = payload.decompress(parsed.compression, plaintext)
                    return payload.loads(plaintext)
                entry = self._verified_cipher(header, parsed)
            cipher, expiry = entry
            self._recent = (header, cipher, expiry)
        end = len(header)
        if len(data) - end < wire.NONCE_SIZE + wire.TAG_SIZE:
            raise InvalidEnvelope("truncated ciphertext")
        # A view instead of a copy of a large ciphertext: copying 256 KiB cost 135 us here, decrypting it 28 us.
        ciphertext = data[end + wire.NONCE_SIZE :] if len(data) < _VIEW_FROM else memoryview(data)[end + wire.NONCE_SIZE :]
        try:
            plaintext = cipher.decrypt(data[end : end + wire.NONCE_SIZE], ciphertext, header)
        except InvalidTag:
            raise InvalidEnvelope(_AUTH_FAILED) from None
        self._cache.count_decrypted(len(plaintext))
        compression_id = data[2] & wire.COMPRESSION_MASK
        if compression_id:  # a valid id: the header was parsed before its cipher was cached
            plaintext = payload.decompress(wire.COMPRESSION_NAMES[compression_id >> wire.COMPRESSION_SHIFT], plaintext)
        return payload.loads(plaintext)

    def _verified_cipher(self, header: bytes, parsed: wire.Header) -> tuple[AESGCM, float]:
        """The cipher of a header seen for the first time (context checked, key unwrapped) and its expiry."""
        self._check_context(parsed)
        # Before the shared cache: a data key another codec (or a key since removed from
        # envelope_decrypt_key_uris) unwrapped must not open messages this codec may not read.
        self._providers_for(parsed)
        data_key = self._cache.unwrapped_key(header, self._limits, lambda: self._unwrap(parsed))
        entry = (AESGCM(data_key), _monotonic() + self._limits.decrypt_ttl)
        # Misses are rare; the lock keeps concurrent evictions (Celery's thread pool,
        # the consumer's decrypting thread) from iterating a dict another thread changes.
        with self._ciphers_lock:
            ciphers = self._ciphers
            while len(ciphers) >= self._limits.decrypt_capacity:
                ciphers.pop(next(iter(ciphers)))
            ciphers[header] = entry
        return entry

    def _check_context(self, parsed: wire.Header) -> None:
        if (parsed.context or None) != self._context:
            raise InvalidEnvelope(
                f"encryption context mismatch: the message is bound to {parsed.context or {}}, "
                f"envelope_encryption_context is {self._context or {}}"
            )

    def _providers_for(self, parsed: wire.Header) -> list[tuple[KeyProvider, bytes]]:
        found = [
            (self._decrypt_providers[(k.provider_id, k.fingerprint)], k.wrapped)
            for k in parsed.wrapped_keys
            if (k.provider_id, k.fingerprint) in self._decrypt_providers
        ]
        if not found:
            wanted = ", ".join(f"{_scheme_name(k.provider_id)} key {k.fingerprint.hex()}" for k in parsed.wrapped_keys)
            have = ", ".join(f"{p.uri} ({p.fingerprint.hex()})" for p in self._decrypt_providers.values()) or "none"
            raise UnknownKey(
                f"message wrapped under {wanted}, none of which is configured; configured keys: {have}. "
                "Add the key URI that encrypted it to envelope_decrypt_key_uris"
            )
        return found

    def _unwrap(self, parsed: wire.Header) -> bytes:
        # Try each configured key the message names; a transient failure of one
        # (a region down) falls through to the next, as multi-wrap promises.
        last: Exception | None = None
        for provider, wrapped in self._providers_for(parsed):
            try:
                data_key = provider.unwrap_data_key(wrapped, self._context or {})
            except KeyServiceError as exc:
                if not exc.transient:
                    raise
                last = exc
                continue
            if len(data_key) != 32:
                raise InvalidEnvelope("the unwrapped data key is not 256 bits")
            return data_key
        assert last is not None
        raise last

    def _decrypt_direct(self, parsed: wire.Header) -> bytes:
        self._check_context(parsed)
        provider, ciphertext = self._providers_for(parsed)[0]
        return provider.decrypt(ciphertext, self._context or {})

    def inspect(self, data: bytes) -> wire.Header:
        """The message's header, parsed but not authenticated (no key-service call)."""
        return wire.parse_header(_as_bytes(data))


def _as_bytes(data: bytes | bytearray | memoryview | str) -> bytes:
    if isinstance(data, str):
        # Only a transport that decoded binary as text gives str here; latin-1 maps it back byte for byte.
        try:
            return data.encode("latin-1")
        except UnicodeEncodeError:
            raise InvalidEnvelope("the message body arrived as text that is not binary; check the transport") from None
    return bytes(data)


def _scheme_name(provider_id: int) -> str:
    from .providers import PROVIDER_IDS

    for scheme, pid in PROVIDER_IDS.items():
        if pid == provider_id:
            return scheme
    return f"provider#{provider_id}"
