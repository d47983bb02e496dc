"""Tasks per second through Redis with real prefork workers: Kombu json against envelope, in one run.

Two ``celery worker --pool=prefork`` processes run side by side on the same
Redis, one configured for json (task and result serializer) and one for
envelope (local key generated for the run), each on its own queue. Rounds
alternate json, envelope, envelope, json, ... so drift in machine load falls
on both alike. A round publishes --tasks ``echo(*args, **kwargs)`` tasks whose
arguments are a Celery body of --size bytes (``bodies.celery_body``; the task
returns them, so results are as large as arguments) and ends when the result
backend holds every result. Reported per serializer: the median over rounds of
tasks/s from the first publish to the last stored result, and of the publish
rate alone; and envelope / json.

Every task is encoded once by the producer, decoded twice by the worker (the
MainProcess and the pool child) and its result encoded once by the child, so
the serializer's cost appears four times per task.

Run:  python benchmarks/end_to_end.py                  (about 1 minute on 2 cores)
      python benchmarks/end_to_end.py --tasks 5000 --rounds 6
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
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.servers: the Redis and worker helpers the tests use

from tests import servers  # noqa: E402

MARK = "end_to_end"
TARGET = 0.97


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
            rates = measure(Path(tmp), db_url, body, args)
    finally:
        servers.flush_redis_db(db_url)
        if private_redis is not None:
            private_redis.close()
    report = Report(rates, args)
    print(report.text())
    out = Path(args.out_dir) if args.out_dir else ROOT / "docs"
    out.mkdir(parents=True, exist_ok=True)
    write_section(out / "performance.md", MARK, report.markdown())
    print(f"wrote {out / 'performance.md'}")
    return 1 if args.check and report.ratio() < TARGET else 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=2000, help="tasks per round")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per serializer")
    parser.add_argument("--size", type=int, default=1024, help="Kombu json size of each task's body in bytes")
    parser.add_argument("--concurrency", type=int, default=2, help="pool processes per worker")
    parser.add_argument("--redis-url", help="Redis base URL (default: REDIS_URL, else a private redis-server)")
    parser.add_argument("--db", type=int, help="Redis db to use (flushed); default KOMBU_ENVELOPE_TEST_REDIS_DB or 13")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one round may take")
    parser.add_argument("--out-dir", help="where performance.md goes (default: docs/)")
    parser.add_argument("--check", action="store_true", help=f"exit 1 if envelope / json < {TARGET}")
    return parser.parse_args(argv)


def app_config(serializer: str, db_url: str, queue: str, key_uri: str) -> dict[str, Any]:
    return {
        "broker_url": db_url,
        "result_backend": db_url,
        "task_serializer": serializer,
        "result_serializer": serializer,
        "accept_content": [serializer],
        "task_default_queue": queue,
        # Both apps carry it: in a process with several apps the serializer reads the current one's settings.
        "envelope_key_uri": key_uri,
    }


def measure(tmp: Path, db_url: str, body: Any, args: argparse.Namespace) -> dict[str, list[tuple[float, float]]]:
    """Per serializer: (tasks/s end to end, tasks/s published) of each round."""
    import redis

    from kombu_envelope.providers.local import write_key_file

    key = tmp / "bench.key"
    write_key_file(str(key))
    run_id = uuid.uuid4().hex[:8]
    apps, workers = {}, []
    for serializer in ("json", "envelope"):
        name = f"bench_{serializer}_{run_id}"
        servers.write_app_module(tmp, name, app_config(serializer, db_url, f"q-{name}", f"local://{key}"))
        workers.append(servers.CeleryWorker(tmp, name, concurrency=args.concurrency, log_dir=tmp))
        apps[serializer] = servers.import_app_module(tmp, name)
    client = redis.Redis.from_url(db_url)
    rates: dict[str, list[tuple[float, float]]] = {"json": [], "envelope": []}
    try:
        for worker in workers:
            worker.start()
        for serializer, module in apps.items():  # warm-up: data keys, connections, pool children
            run_round(module, client, body[0], body[1], min(args.tasks, 50), args.timeout)
        for r in range(args.rounds):
            order = ("json", "envelope") if r % 2 == 0 else ("envelope", "json")
            for serializer in order:
                rates[serializer].append(run_round(apps[serializer], client, body[0], body[1], args.tasks, args.timeout))
                print(f"round {r + 1} {serializer}: {rates[serializer][-1][0]:.0f} tasks/s", flush=True)
    finally:
        for worker in workers:
            worker.stop()
        client.close()
    return rates


def run_round(module: Any, client: Any, args: list[Any], kwargs: dict[str, Any], tasks: int, timeout: float) -> tuple[float, float]:
    """Publish ``tasks`` echo tasks and wait for all their results: (tasks/s overall, tasks/s publishing)."""
    stale = client.keys("celery-task-meta-*")
    if stale:
        client.delete(*stale)
    echo = module.echo
    started = time.perf_counter()
    for _ in range(tasks):
        echo.apply_async(args, kwargs)
    published = time.perf_counter()
    deadline = started + timeout
    while len(client.keys("celery-task-meta-*")) < tasks:
        if time.perf_counter() > deadline:
            raise TimeoutError(f"{tasks} results not stored in {timeout} s; see the worker logs")
        time.sleep(0.01)
    finished = time.perf_counter()
    return tasks / (finished - started), tasks / (published - started)


class Report:
    def __init__(self, rates: dict[str, list[tuple[float, float]]], args: argparse.Namespace) -> None:
        self.rates = rates
        self.args = args

    def median(self, serializer: str, which: int = 0) -> float:
        return statistics.median(r[which] for r in self.rates[serializer])

    def ratio(self, which: int = 0) -> float:
        return self.median("envelope", which) / self.median("json", which)

    def environment(self) -> str:
        import celery
        import kombu
        import redis

        return (
            f"Python {platform.python_version()}, Celery {celery.__version__}, Kombu {kombu.__version__}, "
            f"redis-py {redis.__version__}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}"
        )

    def rows(self) -> list[str]:
        lines = ["| serializer | tasks/s end to end (median) | rounds | tasks/s publishing (median) |", "|---|---|---|---|"]
        for serializer in ("json", "envelope"):
            rounds = ", ".join(f"{r[0]:.0f}" for r in self.rates[serializer])
            lines.append(f"| {serializer} | {self.median(serializer):.0f} | {rounds} | {self.median(serializer, 1):.0f} |")
        return lines

    def verdict(self) -> str:
        ok = self.ratio() >= TARGET
        return (
            f"envelope / json: {self.ratio():.3f} end to end, {self.ratio(1):.3f} publishing "
            f"(target >= {TARGET}: {'met' if ok else 'MISSED'})"
        )

    def markdown(self) -> str:
        a = self.args
        return "\n".join(
            [
                f"Measured by `python benchmarks/end_to_end.py --tasks {a.tasks} --rounds {a.rounds} --size {a.size} "
                f"--concurrency {a.concurrency}` on {self.environment()}.",
                "",
                f"Each round: {a.tasks} `echo` tasks with a {a.size}-byte body published to Redis, run by a "
                f"`--pool=prefork -c {a.concurrency}` worker, results stored in Redis (same serializer).",
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
