"""Nothing is lost through a key-service outage: real prefork worker, real broker, real OpenBao Transit.

Tasks are queued under a data key the worker has never seen; the key server
is paused (it accepts connections and never answers, keeping its keys); the
worker starts; the key server comes back 20 s after it went down. Every task
must complete exactly once, tasks under another key (a local one) must run
during the outage, and the worker's tries must be bounded.

Bound stated and checked: the worker decrypts the first message of an unseen
data key in a probe thread; while the key service is down, probes repeat
after 1, 2, 4, 8, 16, then 30 s, one probe per data key, never one per
message. Each probe is one ``vault://`` unwrap, which itself gives up after
at most two requests (its 8-s retry budget with 5-s read timeouts). So a 20-s
outage costs at most 5 failed probes ("waits" in the log) and at most 12
decrypt requests for the 40 queued tasks.
"""

from __future__ import annotations

import collections
import re
import time
import uuid

import pytest
from celery.result import AsyncResult

from kombu_envelope.codec import EnvelopeCodec
from kombu_envelope.providers.local import write_key_file

from . import servers
from .task_messages import publish, read_queue, task_message

OUTAGE = 20.0
MAX_WAITS = 5
MAX_DECRYPT_REQUESTS = 2 * (MAX_WAITS + 1)
WAIT_LINE = "waits, unacknowledged, for data key"


@pytest.fixture(params=["redis", "rabbitmq"])
def broker_url(request, redis_db_url):
    return redis_db_url if request.param == "redis" else request.getfixturevalue("amqp_url")


@pytest.fixture
def outage_app(tmp_path, broker_url, redis_db_url, private_bao_server, monkeypatch):
    """A config-only app: vault:// key for new messages, a local key accepted for decryption, EnvelopeConsumer."""
    bao = private_bao_server
    key_name = "orders-" + uuid.uuid4().hex[:6]
    bao.create_key(key_name)
    for name, value in bao.env.items():
        monkeypatch.setenv(name, value)
    local_key = tmp_path / "local.key"
    write_key_file(str(local_key))
    name = "outage_" + uuid.uuid4().hex[:8]
    queue, dead_letters = servers.unique_name("q"), servers.unique_name("dlq")
    servers.write_app_module(
        tmp_path,
        name,
        servers.envelope_config(
            broker_url,
            f"vault://transit/keys/{key_name}",
            queue,
            result_backend=redis_db_url,
            # Results in json: a worker that never had a data key cannot encrypt anything while the
            # key service is down, and these results are plain numbers.
            result_serializer="json",
            result_accept_content=["json"],
            envelope_decrypt_key_uris=[f"local://{local_key}"],
            envelope_dead_letter_queue=dead_letters,
            worker_consumer="kombu_envelope.consumer:EnvelopeConsumer",
        ),
    )
    module = servers.import_app_module(tmp_path, name)
    yield module, tmp_path, queue, dead_letters, f"local://{local_key}", bao
    if not broker_url.startswith("redis"):
        servers.delete_amqp_queues(broker_url, [queue, dead_letters])


def test_outage_loses_nothing_and_runs_every_task_exactly_once(outage_app):
    module, app_dir, queue, dead_letters, local_uri, bao = outage_app
    app = module.app
    vault_tasks = [(module.add.delay(n, n), 2 * n) for n in range(40)]  # one data key, unseen by the worker
    local_codec = EnvelopeCodec([local_uri])
    local_tasks = []
    for n in range(5):
        task_id, headers, properties, body = task_message(app, f"{module.__name__}.add", (n, 100))
        publish(app, queue, headers, properties, local_codec.encode(body))
        local_tasks.append((AsyncResult(task_id, app=app), n + 100))
    decrypts_before = bao.audit_counts("transit/decrypt/")

    bao.pause()
    down_at = time.monotonic()
    try:
        with servers.CeleryWorker(app_dir, module.__name__, concurrency=2, env=bao.env, ready_timeout=60) as worker:
            # Messages under a key the worker can use keep running while the key service is down.
            assert [r.get(timeout=OUTAGE) for r, _ in local_tasks] == [v for _, v in local_tasks]
            assert time.monotonic() - down_at < OUTAGE
            assert all(r.state == "PENDING" for r, _ in vault_tasks)
            time.sleep(max(0.0, down_at + OUTAGE - time.monotonic()))
            bao.resume()
            assert [r.get(timeout=90) for r, _ in vault_tasks] == [v for _, v in vault_tasks]
            report = app.control.inspect(timeout=5)._request("envelope_reliability")
            log = worker.log_text()
    finally:
        if bao.paused:
            bao.resume()

    succeeded = collections.Counter(re.findall(r"Task [\w.]+\[([0-9a-f-]{36})\] succeeded", log))
    assert {r.id for r, _ in vault_tasks + local_tasks} == set(succeeded)
    assert set(succeeded.values()) == {1}, "a task ran more than once"
    assert "refused task" not in log and "LOST" not in log
    waits = log.count(WAIT_LINE)
    assert waits <= MAX_WAITS, log
    assert bao.audit_counts("transit/decrypt/") - decrypts_before <= MAX_DECRYPT_REQUESTS
    assert [reply["counts"].get("waits", 0) for reply in report.values()] == [waits]
    assert read_queue(app, dead_letters) == [] and read_queue(app, queue) == []


def test_decode_failure_in_a_pool_child_sends_the_task_back(tmp_path, redis_db_url, private_bao_server, monkeypatch):
    """The worker process decrypts a task, the key service goes down, then the pool child cannot decrypt it.

    With envelope_decrypt_cache_ttl = 0 the child must call the key service
    itself. Celery would record FAILURE (DecodeError) for a message it has
    already acknowledged; the consumer sends it back to its queue, due after a
    delay, and it runs once the key service is back.
    """
    bao = private_bao_server
    key_name = "child-" + uuid.uuid4().hex[:6]
    bao.create_key(key_name)
    for name, value in bao.env.items():
        monkeypatch.setenv(name, value)
    name = "child_" + uuid.uuid4().hex[:8]
    servers.write_app_module(
        tmp_path,
        name,
        servers.envelope_config(
            redis_db_url,
            f"vault://transit/keys/{key_name}",
            servers.unique_name("q"),
            result_serializer="json",
            result_accept_content=["json"],
            envelope_decrypt_cache_ttl=0,
            worker_consumer="kombu_envelope.consumer:EnvelopeConsumer",
        ),
    )
    module = servers.import_app_module(tmp_path, name)
    busy = module.sleep.delay(5)  # keeps the only pool process busy while the key service goes down
    task = module.add.delay(20, 22)
    try:
        with servers.CeleryWorker(tmp_path, name, concurrency=1, env=bao.env) as worker:
            worker.wait_for_log(re.escape(f"[{task.id}] received"), timeout=20)  # decrypted by the worker process
            time.sleep(1.5)  # the pool process has decrypted the sleep task and is running it
            bao.pause()
            worker.wait_for_log(re.escape(task.id) + r".* could not be decrypted in a pool process", timeout=40)
            bao.resume()
            assert busy.get(timeout=30) == 5
            assert task.get(timeout=60) == 42
            log = worker.wait_for_log(re.escape(f"[{task.id}] succeeded"), timeout=10).string
    finally:
        if bao.paused:
            bao.resume()
    assert log.count(f"{name}.add[{task.id}] succeeded") == 1
    assert "sent back to its queue, due in" in log
    assert "DecodeError" not in log and "LOST" not in log
