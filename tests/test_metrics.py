"""Observability in a real prefork worker: the plaintext counter for migrations, the summary log line, Prometheus."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
import uuid

from kombu_envelope.codec import EnvelopeCodec
from kombu_envelope.counters import stats
from kombu_envelope.metrics import received_by_content_type, summary_line

from . import servers
from .ops_helpers import new_key


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {m[0]: float(m[1]) for m in re.findall(r"^(kombu_envelope_\S+) (\S+)$", text, flags=re.M)}


def test_summary_line_reads_the_counters(tmp_path):
    codec = EnvelopeCodec([new_key(tmp_path)])
    codec.decode(codec.encode("x"))
    line = summary_line(
        stats(), {"by_content_type": {"application/json": 2}, "plaintext": 2, "last_plaintext_at": None}
    )
    assert line.startswith("kombu-envelope stats (")
    assert re.search(r"encrypted [1-9]\d* msgs/", line) and re.search(r"key service generate [1-9]\d* ok", line)
    assert line.endswith("tasks received 2, plaintext 2 (last: never)")
    assert received_by_content_type()["plaintext"] == 0  # a process that is not a worker received nothing


def test_a_migrating_worker_counts_plaintext_tasks_logs_a_summary_and_serves_prometheus(tmp_path, redis_db_url):
    key_uri = new_key(tmp_path)
    name = "metrics_app_" + uuid.uuid4().hex[:8]
    port = servers.find_free_port()
    conf = {
        "broker_url": redis_db_url,
        "result_backend": redis_db_url,
        "task_serializer": "envelope",
        "result_serializer": "envelope",
        "accept_content": ["envelope", "json"],  # migration: both accepted
        "task_default_queue": "q-" + name,
        "envelope_key_uri": key_uri,
        "envelope_stats_log_interval": 0.5,
        "envelope_metrics_listen": f"127.0.0.1:{port}",
    }
    servers.write_app_module(tmp_path, name, conf)
    producer = servers.import_app_module(tmp_path, name)
    # One pool process, so that the process count below does not depend on how tasks are shared out.
    worker = servers.CeleryWorker(tmp_path, name, concurrency=1, extra_args=["--without-mingle", "--without-gossip"])
    with worker:
        producer.app.set_current()
        results = [producer.add.delay(i, 1) for i in range(4)]
        results += [producer.add.apply_async((i, 1), serializer="json") for i in range(3)]
        assert [r.get(timeout=30) for r in results] == [1, 2, 3, 4, 1, 2, 3]

        metrics = scrape(port)  # the exporter started when the worker became ready
        assert metrics['kombu_envelope_received_tasks_total{content_type="application/json"}'] == 3
        assert metrics['kombu_envelope_received_tasks_total{content_type="application/x-kombu-envelope"}'] == 4
        assert metrics["kombu_envelope_encrypted_messages_total"] == 7  # the results, encrypted in the pool process
        assert metrics["kombu_envelope_decrypted_messages_total"] >= 4
        assert metrics['kombu_envelope_key_service_calls_total{operation="unwrap",outcome="ok"}'] >= 1
        assert metrics["kombu_envelope_processes"] == 2  # the MainProcess and its pool process

        inspect = subprocess.run(
            [sys.executable, "-m", "celery", "-A", name, "inspect", "envelope_received", "--json", "--timeout", "5"],
            cwd=tmp_path,
            env=worker.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert inspect.returncode == 0, inspect.stdout + inspect.stderr
        (answer,) = json.loads(inspect.stdout).values()
        assert answer["plaintext"] == 3 and answer["last_plaintext_at"] is not None

        line = worker.wait_for_log(r"INFO/MainProcess\] (kombu-envelope stats .*tasks received 7, plaintext 3 .*)")
    # 7 results, and perhaps already the encrypted reply to `celery inspect` (control replies use task_serializer).
    assert re.search(r"^kombu-envelope stats \(2 processes\): encrypted [78] msgs/", line.group(1))
    assert re.search(r"plaintext 3 \(last: 20\d\d-\d\d-\d\dT", line.group(1))
