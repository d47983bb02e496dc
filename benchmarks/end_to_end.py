"""Tasks per second through Redis with real prefork workers: Kombu json against envelope, in one run.

Two ``celery worker --pool=prefork`` processes run side by side on the same
Redis, one configured for json (task and result serializer) and one for
envelope (local key generated for the run), each on its own queue. Rounds
alternate json, envelope, envelope, json, ... so drift in machine load falls
on both alike. A round publishes --tasks ``echo(*args, **kwargs)`` tasks whose
arguments are a Celery body of --size bytes (``bodies.celery_body``; the task
returns them, so results are as large as arguments) and ends when the result
backend holds every result. Reported per serializer: the median over rounds of
tasks/s from the first publish to the last stored result, of the publish rate
alone, and of CPU time per task (the worker's processes, read from /proc, and
the producer's); and envelope / json as the median of the ratios of the
json and envelope rounds run back to back, which a machine whose load changes
from minute to minute (other jobs on it) moves far less than separate medians.
CPU time per task is the figure least disturbed by other load.

Every task is encoded once by the producer, decoded twice by the worker (the
MainProcess and the pool child) and its result encoded once by the child, so
the serializer's cost appears four times per task.

Run:  python benchmarks/end_to_end.py                  (about 2 minutes on 2 cores)
      python benchmarks/end_to_end.py --tasks 3000 --rounds 10
Uses REDIS_URL if it answers, else starts a private redis-server; the Redis db
is KOMBU_ENVELOPE_TEST_REDIS_DB (default 13) or --db, flushed before and after.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.servers: the Redis and worker helpers the tests use

from tests import servers  # noqa: E402

MARK = "end_to_end"
TARGET = 0.97
SERIALIZERS = ("json", "envelope")


@dataclass
class Round:
    """One round of one serializer."""

    serializer: str
    tasks_per_s: float
    published_per_s: float
    worker_cpu_us: float  # per task, worker MainProcess and pool children
    producer_cpu_us: float  # per task, this process while publishing


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from bodies import celery_body
    from docsection import write_section

    base_url, private_redis = servers.find_or_start_redis(args.redis_url)
    db_url = servers.redis_db_url(base_url, args.db if args.db is not None else servers.redis_test_db())
    servers.flush_redis_db(db_url)
    body = celery_body(args.size)
    try:
        with tempfile.TemporaryDirectory(prefix="kombu-envelope-e2e-") as tmp:
            rounds = measure(Path(tmp), db_url, body, args)
    finally:
        servers.flush_redis_db(db_url)
        if private_redis is not None:
            private_redis.close()
    report = Report(rounds, args)
    print(report.text())
    out = Path(args.out_dir) if args.out_dir else ROOT / "docs"
    out.mkdir(parents=True, exist_ok=True)
    write_section(out / "performance.md", MARK if args.redact else f"{MARK}_without_redaction", report.markdown())
    print(f"wrote {out / 'performance.md'}")
    return 1 if args.check and report.paired_ratio("tasks_per_s") < TARGET else 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=1000, help="tasks per round")
    parser.add_argument("--rounds", type=int, default=8, help="rounds per serializer")
    parser.add_argument("--size", type=int, default=1024, help="Kombu json size of each task's body in bytes")
    parser.add_argument("--concurrency", type=int, default=2, help="pool processes per worker")
    parser.add_argument("--redis-url", help="Redis base URL (default: REDIS_URL, else a private redis-server)")
    parser.add_argument("--db", type=int, help="Redis db to use (flushed); default KOMBU_ENVELOPE_TEST_REDIS_DB or 13")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one round may take")
    parser.add_argument("--out-dir", help="where performance.md goes (default: docs/)")
    parser.add_argument("--check", action="store_true", help=f"exit 1 if envelope / json tasks/s < {TARGET}")
    parser.add_argument(
        "--no-redact",
        dest="redact",
        action="store_false",
        help="envelope_redact_headers=False: measure the serializer alone, without the saferepr calls redaction saves",
    )
    return parser.parse_args(argv)


def app_config(serializer: str, db_url: str, queue: str, key_uri: str, redact: bool) -> dict[str, Any]:
    return {
        "broker_url": db_url,
        "result_backend": db_url,
        "task_serializer": serializer,
        "result_serializer": serializer,
        "accept_content": [serializer],
        "task_default_queue": queue,
        # Both apps carry it: in a process with several apps the serializer reads the current one's settings.
        "envelope_key_uri": key_uri,
        "envelope_redact_headers": redact,
    }


def measure(tmp: Path, db_url: str, body: Any, args: argparse.Namespace) -> list[Round]:
    """Every round, in the order run: json and envelope alternately, ABBA."""
    import redis

    from kombu_envelope.providers.local import write_key_file

    key = tmp / "bench.key"
    write_key_file(str(key))
    run_id = uuid.uuid4().hex[:8]
    apps, workers = {}, {}
    for serializer in SERIALIZERS:
        name = f"bench_{serializer}_{run_id}"
        servers.write_app_module(tmp, name, app_config(serializer, db_url, f"q-{name}", f"local://{key}", args.redact))
        workers[serializer] = servers.CeleryWorker(tmp, name, concurrency=args.concurrency, log_dir=tmp)
        apps[serializer] = servers.import_app_module(tmp, name)
    client = redis.Redis.from_url(db_url)
    rounds: list[Round] = []
    try:
        for worker in workers.values():
            worker.start()
        for serializer in SERIALIZERS:  # warm-up: data keys, connections, pool children
            run_round(serializer, apps[serializer], workers[serializer], client, body, min(args.tasks, 50), args.timeout)
        for r in range(args.rounds):
            for serializer in SERIALIZERS if r % 2 == 0 else reversed(SERIALIZERS):
                rounds.append(run_round(serializer, apps[serializer], workers[serializer], client, body, args.tasks, args.timeout))
                print(
                    f"round {r + 1} {serializer}: {rounds[-1].tasks_per_s:.0f} tasks/s, "
                    f"worker {rounds[-1].worker_cpu_us:.0f} us CPU/task",
                    flush=True,
                )
    finally:
        for worker in workers.values():
            worker.stop()
        client.close()
    return rounds


def run_round(serializer: str, module: Any, worker: Any, client: Any, body: Any, tasks: int, timeout: float) -> Round:
    """Publish ``tasks`` echo tasks and wait until the backend holds all their results."""
    stale = client.keys("celery-task-meta-*")
    if stale:
        client.delete(*stale)
    echo, args, kwargs = module.echo, body[0], body[1]
    worker_cpu = _cpu_seconds([worker.pid, *worker.child_pids()])
    producer_cpu = time.process_time()
    started = time.perf_counter()
    for _ in range(tasks):
        echo.apply_async(args, kwargs)
    published = time.perf_counter()
    producer_cpu = time.process_time() - producer_cpu
    deadline = started + timeout
    while len(client.keys("celery-task-meta-*")) < tasks:
        if time.perf_counter() > deadline:
            raise TimeoutError(f"{tasks} results not stored in {timeout} s; see the worker logs")
        time.sleep(0.01)
    finished = time.perf_counter()
    worker_cpu = _cpu_seconds([worker.pid, *worker.child_pids()]) - worker_cpu
    return Round(serializer, tasks / (finished - started), tasks / (published - started), worker_cpu / tasks * 1e6, producer_cpu / tasks * 1e6)


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes (Linux /proc; pool children persist between rounds)."""
    ticks = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


class Report:
    def __init__(self, rounds: list[Round], args: argparse.Namespace) -> None:
        self.rounds = rounds
        self.args = args

    def of(self, serializer: str) -> list[Round]:
        return [r for r in self.rounds if r.serializer == serializer]

    def median(self, serializer: str, field: str) -> float:
        return statistics.median(getattr(r, field) for r in self.of(serializer))

    def paired_ratio(self, field: str) -> float:
        """Median over round pairs of envelope / json (pairs run back to back)."""
        return statistics.median(getattr(e, field) / getattr(j, field) for j, e in zip(self.of("json"), self.of("envelope")))

    def environment(self) -> str:
        import celery
        import kombu
        import redis

        return (
            f"Python {platform.python_version()}, Celery {celery.__version__}, Kombu {kombu.__version__}, "
            f"redis-py {redis.__version__}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}"
        )

    def rows(self) -> list[str]:
        lines = [
            "| serializer | tasks/s end to end | each round | tasks/s publishing | worker CPU µs/task | producer CPU µs/task |",
            "|---|---|---|---|---|---|",
        ]
        for serializer in SERIALIZERS:
            each = ", ".join(f"{r.tasks_per_s:.0f}" for r in self.of(serializer))
            lines.append(
                f"| {serializer} | {self.median(serializer, 'tasks_per_s'):.0f} | {each} | "
                f"{self.median(serializer, 'published_per_s'):.0f} | {self.median(serializer, 'worker_cpu_us'):.0f} | "
                f"{self.median(serializer, 'producer_cpu_us'):.0f} |"
            )
        lines.append(
            f"| envelope / json (paired) | {self.paired_ratio('tasks_per_s'):.3f} | | {self.paired_ratio('published_per_s'):.3f} | "
            f"{self.paired_ratio('worker_cpu_us'):.3f} | {self.paired_ratio('producer_cpu_us'):.3f} |"
        )
        return lines

    def verdict(self) -> str:
        ratio = self.paired_ratio("tasks_per_s")
        return (
            f"envelope / json: {ratio:.3f} tasks/s end to end (target >= {TARGET}: {'met' if ratio >= TARGET else 'MISSED'}); "
            f"worker CPU per task {self.paired_ratio('worker_cpu_us'):.3f}, producer CPU per task {self.paired_ratio('producer_cpu_us'):.3f}"
        )

    def markdown(self) -> str:
        a = self.args
        return "\n".join(
            [
                (
                    f"Measured by `python benchmarks/end_to_end.py --tasks {a.tasks} --rounds {a.rounds} --size {a.size} "
                    f"--concurrency {a.concurrency}{'' if a.redact else ' --no-redact'}` on {self.environment()}."
                ),
                "",
                (
                    f"Each round: {a.tasks} `echo` tasks with a {a.size}-byte body published to Redis, run by a "
                    f"`--pool=prefork -c {a.concurrency}` worker, results stored in Redis (same serializer); "
                    "medians over rounds, ratios paired. "
                )
                + (
                    "envelope_redact_headers on (the default): envelope skips Celery's saferepr of arguments and results."
                    if a.redact
                    else "envelope_redact_headers=False: both compute Celery's argsrepr/kwargsrepr and result reprs."
                ),
                "",
                *self.rows(),
                "",
                f"**{self.verdict()}**",
            ]
        )

    def text(self) -> str:
        return "\n".join([*self.rows(), "", self.verdict()])


if __name__ == "__main__":
    sys.exit(main())
