"""Observability in a real prefork worker: the plaintext counter for migrations, the summary log line, Prometheus."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

from kombu_envelope.codec import EnvelopeCodec
from kombu_envelope.counters import stats
from kombu_envelope.metrics import received_by_content_type, summary_line

from .ops_helpers import envelope_app, new_key, send_tasks


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {m[0]: float(m[1]) for m in re.findall(r"^(kombu_envelope_\S+) (\S+)$", text, flags=re.M)}


def test_summary_line_reads_the_counters(tmp_path):
    codec = EnvelopeCodec([new_key(tmp_path)])
    codec.decode(codec.encode("x"))
    line = summary_line(stats(), {"by_content_type": {"application/json": 2}, "plaintext": 2, "last_plaintext_at": None})
    assert line.startswith("kombu-envelope stats (")
    assert re.search(r"encrypted [1-9]\d* msgs/", line) and re.search(r"key service generate [1-9]\d* ok", line)
    assert line.endswith("tasks received 2, plaintext 2 (last: never)")
    assert received_by_content_type()["plaintext"] == 0  # a process that is not a worker received nothing


def test_a_migrating_worker_counts_plaintext_tasks_logs_a_summary_and_serves_prometheus(tmp_path, redis_db_url):
    key_uri = new_key(tmp_path)
    name = "metrics_app_" + uuid.uuid4().hex[:8]
    queue = "q-" + name
    port = free_port()
    conf = {
        "broker_url": redis_db_url,
        "result_backend": redis_db_url,
        "task_serializer": "envelope",
        "result_serializer": "envelope",
        "accept_content": ["envelope", "json"],  # migration: both accepted
        "task_default_queue": queue,
        "envelope_key_uri": key_uri,
        "envelope_stats_log_interval": 0.5,
        "envelope_metrics_listen": f"127.0.0.1:{port}",
    }
    (tmp_path / f"{name}.py").write_text(
        f"from celery import Celery\napp = Celery({name!r})\napp.conf.update({conf!r})\n"
        "@app.task(name='ops.charge')\ndef charge(card, n):\n    return n\n"
    )
    log = tmp_path / "worker.log"
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    command = [sys.executable, "-m", "celery", "-A", name, "worker", "-P", "prefork", "-c", "2", "-l", "INFO",
               "--without-mingle", "--without-gossip", "-n", f"{name}@%h"]
    with open(log, "wb") as out:
        worker = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_for(lambda: scrape(port), worker, log)  # the exporter starts once the worker is ready

        producer = envelope_app(redis_db_url, key_uri, queue, result_backend=redis_db_url)
        ids = send_tasks(producer, 4) + send_tasks(producer, 3, serializer="json")
        assert [producer.AsyncResult(i).get(timeout=30) for i in ids] == [0, 1, 2, 3, 0, 1, 2]

        metrics = scrape(port)
        assert metrics['kombu_envelope_received_tasks_total{content_type="application/json"}'] == 3
        assert metrics['kombu_envelope_received_tasks_total{content_type="application/x-kombu-envelope"}'] == 4
        assert metrics["kombu_envelope_encrypted_messages_total"] == 7  # the results, encrypted in the pool children
        assert metrics["kombu_envelope_decrypted_messages_total"] >= 4
        assert metrics['kombu_envelope_key_service_calls_total{operation="unwrap",outcome="ok"}'] >= 1
        assert metrics["kombu_envelope_processes"] == 3  # MainProcess and two children

        inspect = subprocess.run(
            [sys.executable, "-m", "celery", "-A", name, "inspect", "envelope_received", "--json", "--timeout", "5"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
        )
        assert inspect.returncode == 0, inspect.stdout + inspect.stderr
        (answer,) = json.loads(inspect.stdout).values()
        assert answer["plaintext"] == 3 and answer["last_plaintext_at"] is not None

        _wait_for(lambda: "tasks received 7, plaintext 3" in log.read_text() or None, worker, log)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=30)
    summary = [line for line in log.read_text().splitlines() if "kombu-envelope stats (" in line]
    assert summary and "INFO/MainProcess" in summary[-1]
    # 7 results, and the encrypted reply to `celery inspect` (control replies use task_serializer).
    assert re.search(r"kombu-envelope stats \(3 processes\): encrypted 8 msgs/", summary[-1])
    assert summary[-1].endswith(")") and "tasks received 7, plaintext 3 (last: 20" in summary[-1]


def _wait_for(probe, worker: subprocess.Popen, log, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert worker.poll() is None, log.read_text()
        try:
            result = probe()
        except OSError:
            result = None
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"timed out; worker log:\n{log.read_text()}")
