"""Fuzz the envelope decoder with >= 1,000,000 inputs; then check decode time grows linearly with input size.

Inputs come from tests/fuzzing.py (valid envelopes of every shape plus
structure-aware mutations). The property: ``EnvelopeCodec.decode`` returns a
value or raises InvalidEnvelope / KeyServiceError / ConfigurationError,
nothing else. Every other exception is counted and its input saved under
--out for replay. Exit status 1 if any was found or if decoding is not linear.

Run: python benchmarks/fuzz_decoder.py                  (1,000,000 inputs: about 25 s on one core)
     python benchmarks/fuzz_decoder.py --inputs 20000 --seed 7
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kombu_envelope import wire  # noqa: E402
from tests.fuzzing import DOCUMENTED, DecoderTarget, mutate  # noqa: E402


def fuzz(target: DecoderTarget, inputs: int, seed: int, out: str) -> tuple[collections.Counter[str], list[str]]:
    """Decode ``inputs`` mutated inputs; count outcomes by exception type; save unexpected ones."""
    rng = random.Random(seed)
    outcomes: collections.Counter[str] = collections.Counter()
    unexpected: list[str] = []
    for i in range(inputs):
        codec, data = mutate(target, rng)
        try:
            codec.decode(data)
            outcomes["decoded"] += 1
        except DOCUMENTED as exc:
            outcomes[type(exc).__name__] += 1
        except Exception as exc:  # what the run is looking for
            outcomes["UNEXPECTED " + type(exc).__name__] += 1
            if len(unexpected) < 20:
                path = os.path.join(out, f"unexpected-{i}.bin")
                raw = data.encode("latin-1") if isinstance(data, str) else bytes(data)
                with open(path, "wb") as f:
                    f.write(raw)
                unexpected.append(f"input {i} ({type(data).__name__}, {len(raw)} B, saved to {path}):\n" + "".join(traceback.format_exception_only(exc)).strip())
    return outcomes, unexpected


def scaling(target: DecoderTarget) -> list[tuple[str, int, float]]:
    """Median µs to refuse inputs of growing size; linear decoding keeps µs per KiB flat."""
    seed = target.seeds[0]
    header = seed.data[: wire.parse_header(seed.data).size]
    rows = []
    for size in (1 << 10, 1 << 14, 1 << 18, 1 << 22, 1 << 24):
        cases = {
            "forged ciphertext": header + os.urandom(size),  # runs AES-GCM over all of it, then refuses
            "random bytes": b"\x01" + os.urandom(size),
            "8 keys of 64 KiB": bytes((1, 1, 0, 8)) + (bytes(5) + b"\xff\xff" + bytes(0xFFFF)) * 8 + bytes(size),
        }
        for name, data in cases.items():
            times = []
            for _ in range(5):
                start = time.perf_counter()
                try:
                    seed.codec.decode(data)
                except wire.InvalidEnvelope:
                    pass
                times.append(time.perf_counter() - start)
            rows.append((name, size, sorted(times)[2] * 1e6))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--inputs", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=20240501)
    parser.add_argument("--out", default=None, help="directory for inputs that raised an undocumented exception")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as keys:
        out = args.out or tempfile.mkdtemp(prefix="fuzz-decoder-")
        os.makedirs(out, exist_ok=True)
        target = DecoderTarget(keys)
        start = time.perf_counter()
        outcomes, unexpected = fuzz(target, args.inputs, args.seed, out)
        elapsed = time.perf_counter() - start
        print(f"fuzzed {args.inputs:,} inputs in {elapsed:.1f} s ({args.inputs / elapsed:,.0f}/s), seed {args.seed}")
        for outcome, count in outcomes.most_common():
            print(f"  {count:>9,}  {outcome}")
        print(f"undocumented exceptions: {sum(c for o, c in outcomes.items() if o.startswith('UNEXPECTED'))}")
        for text in unexpected:
            print("  " + text.replace("\n", "\n    "))
        print("\ndecode time against input size (median of 5):")
        print(f"  {'input':<20} {'bytes':>10} {'µs':>10} {'µs/KiB':>8}")
        rows = scaling(target)
        linear = True
        for name in dict.fromkeys(r[0] for r in rows):
            mine = [r for r in rows if r[0] == name]
            for _, size, micros in mine:
                print(f"  {name:<20} {size:>10,} {micros:>10.1f} {micros / (size / 1024):>8.2f}")
            # 64x the input may cost at most 4x the linear extrapolation from 256 KiB (plus 2 ms of noise);
            # quadratic work would cost 64x more than that.
            micros_at = {size: micros for _, size, micros in mine}
            if micros_at[1 << 24] > 4 * 64 * micros_at[1 << 18] + 2000:
                linear = False
                print(f"  NOT LINEAR: {name}")
    return 0 if not unexpected and linear else 1


if __name__ == "__main__":
    sys.exit(main())
