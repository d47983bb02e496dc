"""Per-message cost of kombu-envelope against Kombu json and every peer, side by side in one process.

For Celery protocol-2 bodies (``bodies.celery_body``) of 200 B, 1 KiB, 16 KiB
and 256 KiB (sizes of their Kombu json encoding), every system encodes and
decodes through Kombu's own serializer registry (``kombu.serialization.dumps``
and ``loads``), as a producer and a worker do, so the registry's overhead is in
every figure alike. Timing: after warm-up, rounds that each time one batch
(about --batch-ms) of encodes and one of decodes per system, systems in a
shuffled order per round so drifts in machine load fall on all of them alike;
every call is timed on its own (``perf_counter_ns``, about 0.05 us of it is
the clock) and the figure is the median of all of a system's calls, which a
busy machine's preemptions, hitting a few calls, do not move. As ``timeit``
does, the garbage collector is paused during a batch.

Systems (peers only where installed):

* ``kombu json``: the baseline.
* ``envelope``: kombu-envelope through its ``envelope`` entry point, Celery app
  configured with a local key generated for the run, warm data-key cache.
* ``envelope + zlib`` / ``envelope + zstd``: ``envelope_compression``.
* ``floor``: Kombu json, then AES-256-GCM under a cached key with a counter
  nonce and a header the size of ours: what any encrypting serializer built
  on Kombu's json costs at least.
* ``kombu-fernet-serializers`` (``fernet_json``); ``Celery auth`` (RSA-2048
  signature over Kombu json, no encryption); ``aws-encryption-sdk`` with its
  caching materials manager and a raw AES wrapping key, unsigned
  (AES_256_GCM_HKDF_SHA512_COMMIT_KEY) and signed (its default,
  ..._ECDSA_P384) suites, over Kombu json.

Writes the tables into docs/performance.md (between its generated-section
markers; the rest of the file is kept) and a chart to docs/performance.png.

Run:  python benchmarks/serializers.py                      (about 1 minute)
      pip install kombu-fernet-serializers aws-encryption-sdk   (the peers)
Quick check that it still runs: python benchmarks/serializers.py --quick --out-dir /tmp/bench

kombu-fernet-serializers breaks ``import kombu`` in every process that lacks
KOMBU_FERNET_KEY, so on a shared machine install it aside
(``pip install --no-deps --target DIR kombu-fernet-serializers``) and pass
``--peers-dir DIR``; this script sets a throwaway KOMBU_FERNET_KEY itself.
"""

from __future__ import annotations

import argparse
import base64
import gc
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
SIZES = (200, 1024, 16384, 262144)
MARK = "serializers"

#: Targets from the performance issue: envelope / kombu json, encode and decode each.
RATIO_TARGETS = {200: 1.2, 1024: 1.05, 16384: 1.0, 262144: 1.0}
FERNET_SPEEDUP_TARGET = 2.0


@dataclass
class System:
    """One serializer as Kombu's registry runs it."""

    name: str
    encode: Callable[[Any], Any]
    decode: Callable[[bytes], Any]
    note: str = ""
    encoded: dict[int, bytes] = field(default_factory=dict)
    enc_us: dict[int, list[float]] = field(default_factory=dict)
    dec_us: dict[int, list[float]] = field(default_factory=dict)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.peers_dir:
        sys.path.insert(0, args.peers_dir)
    setup_fernet_key()
    from bodies import celery_body  # after the path and key: importing Kombu loads every serializer plugin
    from docsection import write_section

    with tempfile.TemporaryDirectory(prefix="kombu-envelope-bench-") as keys:
        systems, skipped = build_systems(Path(keys), args.quick)
        sizes = tuple(args.sizes)
        bodies = {size: celery_body(size) for size in sizes}
        results = run(systems, bodies, args.rounds, args.batch_ms, args.seed)
        typed_sizes = tuple(s for s in sizes if s >= 1024)
        typed_systems = [s for s in build_systems(Path(keys), True)[0] if s.name in ("kombu json", "envelope", "floor")]
        typed = run(typed_systems, {s: celery_body(s, typed=True) for s in typed_sizes}, args.rounds, args.batch_ms, args.seed)
        envelope_info = envelope_overhead(bodies)
    report = Report(results, typed, skipped, sizes, envelope_info, args)
    print(report.text())
    out = Path(args.out_dir) if args.out_dir else ROOT / "docs"
    out.mkdir(parents=True, exist_ok=True)
    write_section(out / "performance.md", MARK, report.markdown())
    report.chart(out / "performance.png")
    if args.json:
        Path(args.json).write_text(json.dumps(report.as_json(), indent=2))
    print(f"wrote {out / 'performance.md'} and {out / 'performance.png'}")
    return 1 if args.check and report.missed() else 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="Kombu json body sizes in bytes")
    parser.add_argument("--rounds", type=int, default=41, help="timed rounds per size (median over rounds)")
    parser.add_argument("--batch-ms", type=float, default=4.0, help="target duration of one timed batch")
    parser.add_argument("--seed", type=int, default=1, help="seed of the per-round system order")
    parser.add_argument("--peers-dir", help="extra import path holding peer packages installed with pip --target")
    parser.add_argument("--out-dir", help="where performance.md and performance.png go (default: docs/)")
    parser.add_argument("--json", help="also write every figure to this JSON file")
    parser.add_argument("--check", action="store_true", help="exit 1 if an issue target is missed")
    parser.add_argument("--quick", action="store_true", help="3 rounds of tiny batches, 200 B and 1 KiB, no signed peers")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.batch_ms = 3, 0.2
        if args.sizes == list(SIZES):
            args.sizes = [200, 1024]
    return args


def setup_fernet_key() -> None:
    """kombu-fernet-serializers reads its key from the environment when Kombu loads it (at import)."""
    from cryptography.fernet import Fernet

    os.environ.setdefault("KOMBU_FERNET_KEY", Fernet.generate_key().decode())


# -- the systems ---------------------------------------------------------------


def build_systems(keys: Path, quick: bool) -> tuple[list[System], list[str]]:
    """Every system that can run here, and a line for each peer that cannot."""
    from kombu.serialization import dumps, loads

    def through_kombu(name: str, content_type: str, encoding: str, note: str = "") -> System:
        accept = {content_type}
        return System(
            name,
            lambda body: dumps(body, serializer=name)[2],
            lambda data: loads(data, content_type, encoding, accept=accept),
            note,
        )

    systems = [through_kombu("json", "application/json", "utf-8")]
    systems[0].name = "kombu json"
    systems += envelope_systems(keys, through_kombu)
    systems.append(floor_system(keys, through_kombu))
    skipped = []
    for builder in (fernet_system, auth_system, esdk_systems):
        try:
            found = builder(keys, through_kombu, quick)
        except ImportError as exc:
            skipped.append(f"{builder.__doc__} not installed ({exc.name}): not measured")
            continue
        systems += found if isinstance(found, list) else [found]
    return systems, skipped


def envelope_systems(keys: Path, through_kombu: Callable[..., System]) -> list[System]:
    from celery import Celery
    from kombu.serialization import registry

    from kombu_envelope import serializer
    from kombu_envelope.codec import EnvelopeCodec
    from kombu_envelope.errors import ConfigurationError
    from kombu_envelope.providers.local import write_key_file

    key = keys / "envelope.key"
    if not key.exists():
        write_key_file(str(key))
    app = Celery("kombu-envelope-bench", set_as_current=True)
    app.conf.envelope_key_uri = f"local://{key}"
    serializer.reset()
    systems = [through_kombu("envelope", serializer.CONTENT_TYPE, serializer.CONTENT_ENCODING)]
    for compression in ("zlib", "zstd"):
        try:
            codec = EnvelopeCodec([f"local://{key}"], compression=compression)
        except ConfigurationError:  # zstandard is not installed
            continue
        name, content_type = f"envelope_{compression}", f"application/x-bench-envelope-{compression}"
        registry.register(name, codec.encode, codec.decode, content_type, "binary")
        systems.append(through_kombu(name, content_type, "binary", "codec registered directly"))
        systems[-1].name = f"envelope + {compression}"
    return systems


def floor_system(keys: Path, through_kombu: Callable[..., System]) -> System:
    """Kombu json + AES-256-GCM, cached key, counter nonce, a header as long as envelope's."""
    import itertools

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from kombu.serialization import registry
    from kombu.utils.json import dumps as json_dumps
    from kombu.utils.json import loads as json_loads

    cipher = AESGCM(os.urandom(32))
    header = os.urandom(71)  # envelope's header with one local wrapped key: 4 + 7 + 60 bytes
    numbers = itertools.count()

    def encode(obj: Any) -> bytes:
        nonce = next(numbers).to_bytes(12, "big")
        return b"".join((header, nonce, cipher.encrypt(nonce, json_dumps(obj).encode(), header)))

    def decode(data: bytes) -> Any:
        return json_loads(cipher.decrypt(data[71:83], data[83:], header))

    registry.register("bench_floor", encode, decode, "application/x-bench-floor", "binary")
    system = through_kombu("bench_floor", "application/x-bench-floor", "binary")
    system.name = "floor"
    return system


def fernet_system(keys: Path, through_kombu: Callable[..., System], quick: bool) -> System:
    """kombu-fernet-serializers"""
    import kombu_fernet  # noqa: F401  (ImportError: not installed)
    from kombu.serialization import registry

    if "fernet_json" not in registry._encoders:  # on the path but not seen by Kombu's entry-point scan
        from kombu_fernet.serializers.json import register_args

        registry.register("fernet_json", *register_args)
    system = through_kombu("fernet_json", "application/x-fernet-json", "utf-8", "stdlib json inside")
    system.name = "kombu-fernet-serializers"
    return system


def auth_system(keys: Path, through_kombu: Callable[..., System], quick: bool) -> System:
    """Celery auth"""
    import datetime

    from celery.security.certificate import Certificate, CertStore
    from celery.security.key import PrivateKey
    from celery.security.serialization import SecureSerializer
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID
    from kombu.serialization import registry

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kombu-envelope-bench")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(private, hashes.SHA256())
    )
    key_pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    certificate = Certificate(cert.public_bytes(serialization.Encoding.PEM).decode())
    store = CertStore()
    store.add_cert(certificate)
    secure = SecureSerializer(PrivateKey(key_pem), certificate, store, "sha256", serializer="json")
    # What celery.security.setup_security registers: content type application/data, which Kombu trusts.
    registry.register("auth", secure.serialize, secure.deserialize, content_type="application/data", content_encoding="utf-8")
    system = through_kombu("auth", "application/data", "utf-8", "RSA-2048 signature, not encrypted")
    system.name = "Celery auth"
    return system


def esdk_systems(keys: Path, through_kombu: Callable[..., System], quick: bool) -> list[System]:
    """aws-encryption-sdk"""
    import aws_encryption_sdk
    from aws_encryption_sdk.identifiers import Algorithm, CommitmentPolicy, EncryptionKeyType, WrappingAlgorithm
    from aws_encryption_sdk.internal.crypto.wrapping_keys import WrappingKey
    from aws_encryption_sdk.key_providers.raw import RawMasterKeyProvider
    from kombu.serialization import registry
    from kombu.utils.json import dumps as json_dumps
    from kombu.utils.json import loads as json_loads

    wrapping_key = WrappingKey(
        wrapping_algorithm=WrappingAlgorithm.AES_256_GCM_IV12_TAG16_NO_PADDING,
        wrapping_key=os.urandom(32),
        wrapping_key_type=EncryptionKeyType.SYMMETRIC,
    )

    class BenchKeys(RawMasterKeyProvider):  # type: ignore[misc]
        provider_id = "kombu-envelope-bench"

        def _get_raw_key(self, key_id: bytes) -> WrappingKey:
            return wrapping_key

    provider = BenchKeys()
    provider.add_master_key(b"bench")
    client = aws_encryption_sdk.EncryptionSDKClient(commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT)
    suites = [("unsigned", Algorithm.AES_256_GCM_HKDF_SHA512_COMMIT_KEY)]
    if not quick:
        suites.append(("signed", Algorithm.AES_256_GCM_HKDF_SHA512_COMMIT_KEY_ECDSA_P384))
    systems = []
    for label, suite in suites:
        cmm = aws_encryption_sdk.CachingCryptoMaterialsManager(
            master_key_provider=provider,
            cache=aws_encryption_sdk.LocalCryptoMaterialsCache(capacity=100),
            max_age=600.0,
            max_messages_encrypted=2**32,
        )

        def encode(obj: Any, cmm: Any = cmm, suite: Any = suite) -> bytes:
            return client.encrypt(source=json_dumps(obj).encode(), materials_manager=cmm, algorithm=suite)[0]

        def decode(data: bytes, cmm: Any = cmm) -> Any:
            return json_loads(client.decrypt(source=data, materials_manager=cmm)[0])

        name, content_type = f"esdk_{label}", f"application/x-bench-esdk-{label}"
        registry.register(name, encode, decode, content_type, "binary")
        systems.append(through_kombu(name, content_type, "binary", f"{suite.name}, caching CMM"))
        systems[-1].name = f"aws-encryption-sdk {label}"
    return systems


# -- timing --------------------------------------------------------------------


def run(systems: list[System], bodies: dict[int, Any], rounds: int, batch_ms: float, seed: int) -> list[System]:
    order = random.Random(seed)
    for size, body in bodies.items():
        batches = {}
        for system in systems:
            encoded = system.encode(body)
            system.encoded[size] = encoded.encode() if isinstance(encoded, str) else encoded  # bytes, as delivered
            if not _equal(system.decode(system.encoded[size]), body):
                raise AssertionError(f"{system.name} does not round-trip the {size}-byte body")
            batches[system.name] = (
                _batch_size(system.encode, body, batch_ms),
                _batch_size(system.decode, system.encoded[size], batch_ms),
            )
            system.enc_us[size], system.dec_us[size] = [], []
        for _ in range(rounds):
            for system in order.sample(systems, len(systems)):
                enc_n, dec_n = batches[system.name]
                system.enc_us[size] += _call_times_us(system.encode, body, enc_n)
                system.dec_us[size] += _call_times_us(system.decode, system.encoded[size], dec_n)
    return systems


def _equal(decoded: Any, body: Any) -> bool:
    """Kombu json turns tuples into lists; compare as JSON would."""
    from kombu.utils.json import dumps

    return bool(dumps(decoded) == dumps(body))


def _batch_size(call: Callable[[Any], Any], arg: Any, batch_ms: float) -> int:
    """Calls per batch for about ``batch_ms``, estimated after a warm-up of at least 20 calls or 50 ms."""
    started, calls = time.perf_counter(), 0
    while calls < 20 or time.perf_counter() - started < 0.05:
        call(arg)
        calls += 1
    per_call = statistics.median(_call_times_us(call, arg, max(1, calls // 2))) / 1e3
    return max(3, min(100_000, round(batch_ms / per_call)))  # 3: enough samples of large bodies too


def _call_times_us(call: Callable[[Any], Any], arg: Any, n: int) -> list[float]:
    """The duration of each of ``n`` calls, in microseconds."""
    clock = time.perf_counter_ns
    times = [0] * n
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for i in range(n):
            started = clock()
            call(arg)
            times[i] = clock() - started
    finally:
        if gc_was_enabled:
            gc.enable()
    return [t / 1e3 for t in times]


def envelope_overhead(bodies: dict[int, Any]) -> dict[str, Any]:
    """Bytes envelope adds over its own plaintext (compact JSON), and the wrapped key that explains them."""
    from kombu.serialization import dumps

    from kombu_envelope import payload, wire

    out: dict[Any, Any] = {}
    for size, body in bodies.items():
        encoded = dumps(body, serializer="envelope")[2]
        header = wire.parse_header(encoded)
        wrapped = sum(len(k.wrapped) for k in header.wrapped_keys)
        added = len(encoded) - len(payload.dumps(body))
        out[size] = {"plaintext": len(payload.dumps(body)), "encoded": len(encoded), "added": added, "wrapped": wrapped}
    out["limit"] = "wrapped key(s) + 40"
    out["header_fixed"] = 4 + 7 + wire.NONCE_SIZE + wire.TAG_SIZE
    return out


# -- reporting -----------------------------------------------------------------


def _human(size: int) -> str:
    return f"{size // 1024} KiB" if size >= 1024 else f"{size} B"


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _readable(encoded: bytes, body: Any) -> bool:
    """Can the task's order id be read in the message, raw or after one base64 decode?"""
    needle = body[0][1].encode()
    if needle in encoded:
        return True
    try:
        return needle in base64.b64decode(encoded, validate=False)
    except ValueError:
        return False


class Report:
    def __init__(
        self,
        systems: list[System],
        typed: list[System],
        skipped: list[str],
        sizes: tuple[int, ...],
        overhead: dict[Any, Any],
        args: argparse.Namespace,
    ) -> None:
        self.systems = systems
        self.typed = typed
        self.skipped = skipped
        self.sizes = sizes
        self.overhead = overhead
        self.args = args
        self.by_name = {s.name: s for s in systems}
        from bodies import celery_body

        self.body200 = celery_body(min(sizes))

    def enc(self, name: str, size: int, systems: list[System] | None = None) -> float:
        return _median({s.name: s for s in systems or self.systems}[name].enc_us[size])

    def dec(self, name: str, size: int, systems: list[System] | None = None) -> float:
        return _median({s.name: s for s in systems or self.systems}[name].dec_us[size])

    def ratios(self) -> dict[int, tuple[float, float]]:
        return {
            size: (self.enc("envelope", size) / self.enc("kombu json", size), self.dec("envelope", size) / self.dec("kombu json", size))
            for size in self.sizes
        }

    def fernet_speedups(self) -> dict[int, tuple[float, float]] | None:
        if "kombu-fernet-serializers" not in self.by_name:
            return None
        name = "kombu-fernet-serializers"
        return {
            size: (self.enc(name, size) / self.enc("envelope", size), self.dec(name, size) / self.dec("envelope", size))
            for size in self.sizes
        }

    def checks(self) -> list[tuple[str, bool]]:
        lines = []
        for size, (enc, dec) in self.ratios().items():
            target = RATIO_TARGETS.get(size)
            if target is not None:
                lines.append((f"{_human(size)}: envelope / kombu json {enc:.2f}x encode, {dec:.2f}x decode (target <= {target}x)", max(enc, dec) <= target))
        speedups = self.fernet_speedups()
        if speedups is None:
            lines.append(("kombu-fernet-serializers not installed: 2x target not measured", False))
        else:
            for size, (enc, dec) in speedups.items():
                lines.append((f"{_human(size)}: envelope {enc:.1f}x / {dec:.1f}x faster than kombu-fernet (target >= {FERNET_SPEEDUP_TARGET}x)", min(enc, dec) >= FERNET_SPEEDUP_TARGET))
        for size in self.sizes:
            o = self.overhead[size]
            lines.append((f"{_human(size)}: envelope adds {o['added']} B over its plaintext; wrapped key {o['wrapped']} B (limit: wrapped + 40)", o["added"] <= o["wrapped"] + 40))
        return lines

    def missed(self) -> bool:
        return not all(ok for _, ok in self.checks())

    def environment(self) -> str:
        import celery
        import cryptography
        import kombu
        from cryptography.hazmat.backends.openssl.backend import backend

        return (
            f"Python {platform.python_version()}, Kombu {kombu.__version__}, Celery {celery.__version__}, "
            f"cryptography {cryptography.__version__} ({backend.openssl_version_text()}), "
            f"{os.cpu_count()} CPUs ({platform.machine()}), {time.strftime('%Y-%m-%d')}"
        )

    def timing_table(self, systems: list[System], sizes: tuple[int, ...]) -> list[str]:
        head = "| system | " + " | ".join(_human(s) for s in sizes) + " |"
        lines = [head, "|---" * (len(sizes) + 1) + "|"]
        for s in systems:
            cells = [f"{self.enc(s.name, z, systems):.1f} / {self.dec(s.name, z, systems):.1f}" for z in sizes]
            lines.append(f"| {s.name} | " + " | ".join(cells) + " |")
        return lines

    def ratio_table(self, systems: list[System], sizes: tuple[int, ...]) -> list[str]:
        head = "| system | " + " | ".join(_human(s) for s in sizes) + " |"
        lines = [head, "|---" * (len(sizes) + 1) + "|"]
        for s in systems:
            cells = [
                f"{self.enc(s.name, z, systems) / self.enc('kombu json', z, systems):.2f} / "
                f"{self.dec(s.name, z, systems) / self.dec('kombu json', z, systems):.2f}"
                for z in sizes
            ]
            lines.append(f"| {s.name} | " + " | ".join(cells) + " |")
        return lines

    def size_table(self) -> list[str]:
        head = "| system | " + " | ".join(_human(s) for s in self.sizes) + " | readable? |"
        lines = [head, "|---" * (len(self.sizes) + 2) + "|"]
        for s in self.systems:
            cells = []
            for z in self.sizes:
                added = len(s.encoded[z]) - len(self.by_name["kombu json"].encoded[z])
                cells.append(f"{len(s.encoded[z])} ({added:+d})")
            readable = "YES" if _readable(s.encoded[min(self.sizes)], self.body200) else "no"
            lines.append(f"| {s.name} | " + " | ".join(cells) + f" | {readable} |")
        return lines

    def markdown(self) -> str:
        sizes = self.sizes
        typed_sizes = tuple(z for z in sizes if z >= 1024)
        out = [
            f"Measured by `python benchmarks/serializers.py` on {self.environment()}.",
            (
                f"Rounds: {self.args.rounds}, batches of about {self.args.batch_ms} ms; median of every call timed on its own; "
                "garbage collector paused in batches."
            ),
            "",
            "### Median µs per message, encode / decode (through Kombu's serializer registry)",
            "",
            *self.timing_table(self.systems, sizes),
            "",
            "### Ratio to Kombu json, encode / decode (lower is faster)",
            "",
            *self.ratio_table(self.systems, sizes),
            "",
            "### Encoded bytes (difference to Kombu json)",
            "",
            "\"readable?\": the task's arguments can be read in the message bytes (raw or base64-decoded).",
            "",
            *self.size_table(),
            "",
        ]
        if typed_sizes and self.typed:
            out += [
                "### Bodies with UUID and datetime arguments (Kombu's `__type__` markers), µs encode / decode",
                "",
                *self.timing_table(self.typed, typed_sizes),
                "",
                "Ratio to Kombu json:",
                "",
                *self.ratio_table(self.typed, typed_sizes),
                "",
            ]
        out += ["### Targets", ""]
        out += [f"- {'met' if ok else '**MISSED**'}: {line}" for line, ok in self.checks()]
        out += [f"- {line}" for line in self.skipped]
        out += ["", "![ratio to Kombu json](performance.png)"]
        return "\n".join(out)

    def text(self) -> str:
        lines = ["µs per message, encode / decode:", *self.timing_table(self.systems, self.sizes), ""]
        lines += ["ratio to kombu json, encode / decode:", *self.ratio_table(self.systems, self.sizes), ""]
        lines += [("ok     " if ok else "MISSED ") + line for line, ok in self.checks()]
        lines += self.skipped
        return "\n".join(lines)

    def as_json(self) -> dict[str, Any]:
        def figures(systems: list[System]) -> dict[str, Any]:
            return {
                s.name: {
                    str(z): {
                        "encode_us": _median(s.enc_us[z]),
                        "decode_us": _median(s.dec_us[z]),
                        "bytes": len(s.encoded[z]),
                        "note": s.note,
                    }
                    for z in s.enc_us
                }
                for s in systems
            }

        return {
            "environment": self.environment(),
            "systems": figures(self.systems),
            "typed_bodies": figures(self.typed),
            "ratios_envelope_to_json": {str(z): {"encode": e, "decode": d} for z, (e, d) in self.ratios().items()},
            "fernet_over_envelope": {str(z): {"encode": e, "decode": d} for z, (e, d) in (self.fernet_speedups() or {}).items()},
            "envelope_overhead": {str(k): v for k, v in self.overhead.items()},
            "targets": [{"check": line, "met": ok} for line, ok in self.checks()],
        }

    def chart(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), sharey=True)
        sizes = list(self.sizes)
        for ax, (label, pick) in zip(axes, (("encode", self.enc), ("decode", self.dec))):
            for s in self.systems:
                if s.name == "kombu json":
                    continue
                ratios = [pick(s.name, z) / pick("kombu json", z) for z in sizes]
                style = {"linewidth": 3, "color": "black"} if s.name == "envelope" else {"linewidth": 1.4}
                ax.plot(sizes, ratios, marker="o", label=s.name, **style)
            ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(sizes, [_human(z) for z in sizes])
            ax.set_title(f"{label}: time / Kombu json time")
            ax.set_xlabel("Kombu json body size")
            ax.grid(True, which="both", alpha=0.3)
        axes[0].set_ylabel("ratio (log scale; 1 = Kombu json)")
        axes[1].legend(fontsize=8, loc="upper right")
        fig.suptitle("Per-message cost relative to Kombu's plaintext json (median, warm caches)")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
