"""Key-service calls per 100,000 messages on a prefork worker host: host-wide cache vs per-process caches.

Each run emulates what a Celery prefork worker host does with every task (see
shared/reference: the MainProcess decodes each body, then a pool child
decodes it again, runs the task and encodes the result):

* a producer encodes the task bodies (its calls are not counted);
* a fresh "MainProcess" forks N pool children, decodes every body and hands
  it to a child over a pipe; the child decodes it and encodes a result;
  with --max-tasks-per-child M a child exits after M tasks and is replaced
  by a new fork, as Celery does;
* every data-key generation and unwrap made by the host's processes is counted
  by wrapping the key provider's methods (not by kombu_envelope's own counters).

"host-wide" is kombu-envelope's DataKeyCache, made before the pool forks and
shared by every child. "per-process" gives each process its own cache made
after fork (what a fork-safe per-process cache does; a cache that survives
fork without fork handling would repeat nonces instead).

Run: python benchmarks/key_service_calls.py            (about 2 minutes on 2 cores)
     python benchmarks/key_service_calls.py --messages 20000 --processes 1 4
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from kombu_envelope import wire
from kombu_envelope.cache import DataKeyCache, KeyLimits
from kombu_envelope.codec import EnvelopeCodec
from kombu_envelope.providers.local import LocalKeyProvider, write_key_file

_FRAME = struct.Struct("<I")


def count_provider_calls() -> Any:
    """Shared counters [generate, unwrap, tasks done] incremented by every process (calls: by the provider's methods)."""
    counts = multiprocessing.Array("q", 3)

    def counted(method: Callable[..., Any], index: int) -> Callable[..., Any]:
        def call(self: Any, *args: Any) -> Any:
            with counts.get_lock():
                counts[index] += 1
            return method(self, *args)

        return call

    LocalKeyProvider.generate_data_key = counted(LocalKeyProvider.generate_data_key, 0)  # type: ignore[method-assign]
    LocalKeyProvider.unwrap_data_key = counted(LocalKeyProvider.unwrap_data_key, 1)  # type: ignore[method-assign]
    return counts


def pool_child(
    read_fd: int, codec: EnvelopeCodec | None, key_uri: str, limits: KeyLimits, tasks: int, counts: Any
) -> None:
    """Decode ``tasks`` bodies from the pipe, encode a result for each, exit (as a recycled Celery child)."""
    if codec is None:  # per-process cache: this process's own, made after fork
        codec = EnvelopeCodec([key_uri], limits=limits, cache=DataKeyCache())
    done = 0
    with os.fdopen(read_fd, "rb") as pipe:
        for _ in range(tasks):
            header = pipe.read(_FRAME.size)
            if not header:
                break
            args, _, _ = codec.decode(pipe.read(_FRAME.unpack(header)[0]))
            codec.encode({"status": "SUCCESS", "result": args[0] * 2})
            done += 1
    with counts.get_lock():
        counts[2] += done


def worker_host(
    bodies: list[bytes], key_uri: str, limits: KeyLimits, processes: int, max_tasks: int, shared: bool, counts: Any
) -> None:
    """The MainProcess: fork the pool, decode each body, dispatch it round-robin, recycle children."""
    main_codec = EnvelopeCodec([key_uri], limits=limits, cache=DataKeyCache())
    child_codec = main_codec if shared else None
    per_child = max_tasks or len(bodies)
    pool: list[tuple[int, Any, int]] = []  # (pid, pipe, tasks sent)

    def fork_child() -> tuple[int, Any, int]:
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(write_fd)
            for _, sibling, _ in pool:  # else a sibling's pipe never reaches end-of-file
                if not sibling.closed:
                    os.close(sibling.fileno())
            status = 0
            try:
                pool_child(read_fd, child_codec, key_uri, limits, per_child, counts)
            except BaseException:  # noqa: BLE001  (a child reports and exits, never returns)
                import traceback

                traceback.print_exc()
                status = 1
            os._exit(status)
        os.close(read_fd)
        return pid, os.fdopen(write_fd, "wb"), 0

    for _ in range(processes):
        pool.append(fork_child())
    for i, body in enumerate(bodies):
        main_codec.decode(body)
        slot = i % processes
        pid, pipe, sent = pool[slot]
        pipe.write(_FRAME.pack(len(body)) + body)
        sent += 1
        pool[slot] = (pid, pipe, sent)
        if sent == per_child:
            pipe.close()
            _wait(pid)
            pool[slot] = fork_child()
    for pid, pipe, _ in pool:
        pipe.close()
        _wait(pid)


def _wait(pid: int) -> None:
    _, status = os.waitpid(pid, 0)
    if status != 0:
        raise SystemExit(f"pool child {pid} failed with status {status}")


def run(
    bodies: list[bytes], key_uri: str, limits: KeyLimits, counts: Any, processes: int, max_tasks: int, shared: bool
) -> tuple[int, int, float]:
    """(generate calls, unwrap calls, seconds) made by one fresh worker host processing ``bodies``."""
    counts[0] = counts[1] = counts[2] = 0
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        status = 0
        try:
            worker_host(bodies, key_uri, limits, processes, max_tasks, shared, counts)
        except BaseException:  # noqa: BLE001  (a child reports and exits, never returns)
            import traceback

            traceback.print_exc()
            status = 1
        os._exit(status)
    _wait(pid)
    if counts[2] != len(bodies):
        raise SystemExit(f"the pool children ran {counts[2]} of {len(bodies)} tasks")
    return counts[0], counts[1], time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument(
        "--max-tasks-per-child", type=int, nargs="+", default=[0, 1000], help="0: children are never recycled"
    )
    parser.add_argument(
        "--max-messages", type=int, default=KeyLimits.max_messages, help="envelope_data_key_max_messages"
    )
    options = parser.parse_args()

    counts = count_provider_calls()
    limits = KeyLimits(max_messages=options.max_messages)
    with tempfile.TemporaryDirectory() as tmp:
        key_path = os.path.join(tmp, "master.key")
        write_key_file(key_path)
        key_uri = f"local://{key_path}"
        producer = EnvelopeCodec([key_uri], limits=limits, cache=DataKeyCache())
        bodies = [
            producer.encode([[i], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])
            for i in range(options.messages)
        ]
        task_keys = len({body[: wire.header_size(body)] for body in bodies})

        print(
            f"{options.messages:,} tasks under {task_keys} data key(s) (envelope_data_key_max_messages={limits.max_messages:,});"
        )
        print("key-service calls made by the worker host (data-key generations + unwraps):\n")
        print(
            "| cache | max tasks per child | "
            + " | ".join(f"{n} process{'es' if n > 1 else ''}" for n in options.processes)
            + " |"
        )
        print("|---|---|" + "---|" * len(options.processes))
        for max_tasks in options.max_tasks_per_child:
            for shared, name in ((True, "host-wide (kombu-envelope)"), (False, "per-process")):
                cells = []
                for processes in options.processes:
                    generate, unwrap, seconds = run(bodies, key_uri, limits, counts, processes, max_tasks, shared)
                    cells.append(f"{generate + unwrap} ({generate} + {unwrap})")
                    print(
                        f"  [{name}, max_tasks={max_tasks or 'none'}, {processes} processes: {seconds:.1f} s]",
                        file=sys.stderr,
                    )
                print(f"| {name} | {max_tasks or 'unlimited'} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
