"""20,000 tasks through a prefork worker (-c 4) with a key-service outage in the middle: nothing may be lost.

A producer queues --tasks ``add`` tasks on Redis, encrypted under an OpenBao
Transit key (``vault://``) with a new data key every 500 messages, and mixes
in --bad messages that must be refused: envelopes with a flipped ciphertext
byte and plaintext json tasks. One ``celery worker --pool=prefork -c 4`` with
``worker_consumer = kombu_envelope.consumer:EnvelopeConsumer`` starts; when
--pause-at of the tasks have run, OpenBao is paused (SIGSTOP: connections
hang, keys kept) for --outage seconds, then resumed.

Counted at the end, from the worker's log and the dead-letter queue: sent,
completed (ran at least once), ran more than once, dead-lettered, and lost =
sent - completed - dead-lettered. Exit status 1 unless lost == 0, nothing
ran twice and every bad message was dead-lettered.

Run:  KOMBU_ENVELOPE_TEST_REDIS_DB=3 python benchmarks/outage_load.py          (about 3 minutes on 2 cores)
      python benchmarks/outage_load.py --tasks 2000 --outage 10
Uses REDIS_URL if it answers, else a private redis-server; the Redis db is
KOMBU_ENVELOPE_TEST_REDIS_DB (default 13) or --db, flushed before and after.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.servers and tests.task_messages: the helpers the tests use

from tests import servers  # noqa: E402
from tests.task_messages import publish, read_queue, task_message  # noqa: E402

SUCCEEDED = re.compile(r"Task [\w.]+\[([0-9a-f-]{36})\] succeeded")
REFUSED = re.compile(r"kombu-envelope: refused task ([0-9a-f-]{36}) ")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base_url, private_redis = servers.find_or_start_redis(args.redis_url)
    db_url = servers.redis_db_url(base_url, args.db if args.db is not None else servers.redis_test_db())
    servers.flush_redis_db(db_url)
    try:
        with servers.BaoServer() as bao, tempfile.TemporaryDirectory(prefix="kombu-envelope-outage-") as tmp:
            counts = run(Path(tmp), db_url, bao, args)
    finally:
        servers.flush_redis_db(db_url)
        if private_redis is not None:
            private_redis.close()
    print_table(counts, args)
    ok = counts["lost"] == 0 and counts["ran more than once"] == 0 and counts["dead-lettered"] == counts["bad sent"]
    return 0 if ok else 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=20_000, help="good tasks to queue")
    parser.add_argument("--bad", type=int, default=25, help="messages to refuse: tampered envelopes, 1 in 5 plaintext json")
    parser.add_argument("--outage", type=float, default=30.0, help="seconds the key service stays paused")
    parser.add_argument("--pause-at", type=float, default=0.3, help="fraction of tasks completed when the outage starts")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--redis-url", help="Redis base URL (default: REDIS_URL, else a private redis-server)")
    parser.add_argument("--db", type=int, help="Redis db to use (flushed); default KOMBU_ENVELOPE_TEST_REDIS_DB or 13")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for every task")
    return parser.parse_args(argv)


def run(tmp: Path, db_url: str, bao: servers.BaoServer, args: argparse.Namespace) -> dict[str, Any]:
    bao.create_key("load")
    os.environ.update(bao.env)  # the producer's vault:// provider
    name = "outage_load_" + uuid.uuid4().hex[:8]
    queue, dead_letters = f"q-{name}", f"dlq-{name}"
    servers.write_app_module(
        tmp,
        name,
        {
            "broker_url": db_url,
            "task_serializer": "envelope",
            "accept_content": ["envelope"],
            "task_default_queue": queue,
            "task_ignore_result": True,
            "envelope_key_uri": "vault://transit/keys/load",
            "envelope_data_key_max_messages": 500,
            "envelope_dead_letter_queue": dead_letters,
            "worker_consumer": "kombu_envelope.consumer:EnvelopeConsumer",
        },
    )
    module = servers.import_app_module(tmp, name)
    bad_ids = queue_tasks(module, queue, args)
    decrypts_before = bao.audit_counts("transit/decrypt/")
    worker = servers.CeleryWorker(tmp, name, concurrency=args.concurrency, env=bao.env, log_dir=tmp)
    started = time.monotonic()
    outage: tuple[float, float] | None = None
    with worker:
        while True:
            log = worker.log_text()
            done = len(set(SUCCEEDED.findall(log))) + len(set(REFUSED.findall(log)))
            if outage is None and done >= args.pause_at * args.tasks:
                bao.pause()
                paused = time.monotonic()
                time.sleep(args.outage)
                bao.resume()
                outage = (paused - started, time.monotonic() - started)
            if done >= args.tasks + len(bad_ids) or time.monotonic() - started > args.timeout:
                break
            time.sleep(0.5)
        elapsed = time.monotonic() - started
        time.sleep(1)
        report = module.app.control.inspect(timeout=5)._request("envelope_reliability") or {}
        log = worker.log_text()
    ran = collections.Counter(SUCCEEDED.findall(log))
    dead = {m.headers.get("id") for m in read_queue(module.app, dead_letters)}
    reliability = next(iter(report.values()), {}).get("counts", {})
    return {
        "sent": args.tasks + len(bad_ids),
        "bad sent": len(bad_ids),
        "completed": len(ran),
        "ran more than once": sum(1 for n in ran.values() if n > 1),
        "dead-lettered": len(dead),
        "dead-lettered bad ones": len(dead & bad_ids),
        "lost": args.tasks + len(bad_ids) - len(ran) - len(dead),
        "waits (failed key-service probes)": log.count("waits, unacknowledged, for data key"),
        "waits counted by the worker": reliability.get("waits", 0),
        "transit decrypt requests": bao.audit_counts("transit/decrypt/") - decrypts_before,
        "outage (s after worker start)": f"{outage[0]:.0f} to {outage[1]:.0f}" if outage else "never reached",
        "elapsed (s)": f"{elapsed:.0f}",
    }


def queue_tasks(module: Any, queue: str, args: argparse.Namespace) -> set[str]:
    """Queue the good tasks with a bad message spread evenly among them; return the bad ones' task ids."""
    from kombu_envelope.serializer import codec_for_app

    app = module.app
    codec, _ = codec_for_app(app)
    every = max(1, args.tasks // max(1, args.bad))
    bad_ids: set[str] = set()
    for n in range(args.tasks):
        module.add.delay(n, 1)
        if n % every == every // 2 and len(bad_ids) < args.bad:
            task_id, headers, properties, body = task_message(app, f"{module.__name__}.add", (n, -1))
            if len(bad_ids) % 5 == 4:
                publish(app, queue, headers, properties, b"[[1, 2], {}, {}]", "application/json", "utf-8")
            else:
                damaged = bytearray(codec.encode(body))
                damaged[-1] ^= 0x01
                publish(app, queue, headers, properties, bytes(damaged))
            bad_ids.add(task_id)
    return bad_ids


def print_table(counts: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"\n{args.tasks:,} tasks + {counts['bad sent']} bad messages, prefork -c {args.concurrency}, "
          f"key service paused {args.outage:.0f} s after {args.pause_at:.0%} of the tasks ran\n")
    width = max(len(k) for k in counts)
    print(f"| {'count'.ljust(width)} | {'value':>14} |")
    print(f"|{'-' * (width + 2)}|{'-' * 16}|")
    for key, value in counts.items():
        text = f"{value:,}" if isinstance(value, int) else str(value)
        print(f"| {key.ljust(width)} | {text:>14} |")


if __name__ == "__main__":
    sys.exit(main())
