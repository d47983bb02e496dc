"""Real key services end to end: a prefork ``celery worker`` on Redis, configured by settings alone.

The app module each worker loads holds configuration only (it never imports
kombu_envelope): the key URI selects moto's AWS KMS or OpenBao's Transit, the
key service's address and credentials come from the environment, as in a
deployment. A canary secret travels in task arguments and results; it must
appear nowhere in Redis (raw or base64-decoded) nor in the worker's log.
"""

from __future__ import annotations

import base64
import json
import time
import uuid

import pytest
import redis

from kombu_envelope import serializer
from kombu_envelope.cache import DataKeyCache
from kombu_envelope.codec import EnvelopeCodec
from kombu_envelope.providers import aws_kms, vault
from kombu_envelope.providers.retry import RetryPolicy

from . import servers

CANARY = "canary-" + uuid.uuid4().hex[:12]
CONTEXT = {"app": "orders", "env": "e2e"}


@pytest.fixture(autouse=True)
def forget_codecs():
    """Codecs are built once per app from its settings and the environment; start and end clean."""
    serializer.reset()
    yield
    serializer.reset()


def app_config(redis_db_url: str, key_uri: str, queue: str, **extra: object) -> dict[str, object]:
    return servers.envelope_config(redis_db_url, key_uri, queue, worker_prefetch_multiplier=1, **extra)


def write_app(app_dir, config: dict[str, object], name: str | None = None):
    """A config-only app module for the worker, and the same module imported here as the producer."""
    name = name or "envelope_app_" + uuid.uuid4().hex[:8]
    app_dir.mkdir(exist_ok=True)
    servers.write_app_module(app_dir, name, config)
    return servers.import_app_module(app_dir, name)


def use_env(monkeypatch, env: dict[str, str]) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def run_canary_round_trip(tmp_path, redis_db_url: str, module, worker_env: dict[str, str]) -> str:
    """Queue canary tasks, check Redis, run a prefork worker, check results, Redis and log; return the log."""
    results = [module.echo.delay(CANARY, n, secret=CANARY) for n in range(12)]
    results.append(module.secret_result.delay(CANARY))
    assert servers.scan_redis_for(redis_db_url, CANARY.encode()) == []

    with servers.CeleryWorker(tmp_path, module.__name__, concurrency=2, env=worker_env) as worker:
        values = [r.get(timeout=60) for r in results]
        log = worker.log_text()

    assert values[:12] == [[[CANARY, n], {"secret": CANARY}] for n in range(12)]
    assert values[12] == CANARY
    assert servers.scan_redis_for(redis_db_url, CANARY.encode()) == []
    assert "succeeded" in log and CANARY not in log
    return log


def test_aws_kms_by_configuration_alone(moto_server, redis_db_url, tmp_path, monkeypatch):
    arn = moto_server.create_key()
    alias = f"alias/e2e-{uuid.uuid4().hex[:8]}"
    moto_server.kms_client().create_alias(AliasName=alias, TargetKeyId=arn)
    use_env(monkeypatch, moto_server.env)
    queue = servers.unique_name("q-aws")
    module = write_app(
        tmp_path,
        app_config(redis_db_url, f"aws-kms://{alias}", queue, envelope_encryption_context=CONTEXT),
    )

    before = moto_server.kms_request_counts()
    run_canary_round_trip(tmp_path, redis_db_url, module, moto_server.env)
    calls = moto_server.kms_request_counts() - before
    # 13 tasks and 13 results: data keys are cached, so KMS sees a few calls, not one per message.
    assert 2 <= calls["GenerateDataKey"] + calls["Decrypt"] <= 8, calls


@pytest.mark.parametrize("key_type, producer_query", [("aes256-gcm96", ""), ("rsa-2048", "?public_key=fetch")])
def test_vault_transit_by_configuration_alone(
    bao_server, redis_db_url, tmp_path, monkeypatch, key_type, producer_query
):
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    bao_server.create_key(name, type=key_type)
    use_env(monkeypatch, bao_server.env)
    queue = servers.unique_name("q-vault")
    # One module for producer and worker: with an RSA key the worker also wraps its results locally.
    module = write_app(
        tmp_path,
        app_config(
            redis_db_url,
            f"vault://transit/keys/{name}{producer_query}",
            queue,
            envelope_encryption_context=CONTEXT,
        ),
    )

    run_canary_round_trip(tmp_path, redis_db_url, module, bao_server.env)
    assert 1 <= bao_server.audit_counts(f"transit/decrypt/{name}") <= 6
    if producer_query:
        assert bao_server.audit_counts(f"transit/encrypt/{name}") == 0  # every wrap was local
        assert bao_server.audit_counts(f"transit/datakey/plaintext/{name}") == 0


def test_rotation_on_openbao(bao_server, redis_db_url, tmp_path, monkeypatch):
    key_a, key_b = (f"rot-{label}-{uuid.uuid4().hex[:8]}" for label in "ab")
    for key in (key_a, key_b):
        bao_server.create_key(key)
    uri_a, uri_b = f"vault://transit/keys/{key_a}", f"vault://transit/keys/{key_b}"
    use_env(monkeypatch, bao_server.env)
    queue = servers.unique_name("q-rot")
    dead_letters = servers.unique_name("dlq-rot")
    # One app (same module and task names), three deployments of its configuration.
    name = "orders_" + uuid.uuid4().hex[:8]
    under_a = write_app(tmp_path / "under_a", app_config(redis_db_url, uri_a, queue), name)
    after_rotation = write_app(
        tmp_path / "after_rotation",
        app_config(redis_db_url, uri_b, queue, envelope_decrypt_key_uris=[uri_a]),
        name,
    )
    (tmp_path / "b_only").mkdir()
    servers.write_app_module(
        tmp_path / "b_only",
        name,
        app_config(
            redis_db_url,
            uri_b,
            queue,
            worker_consumer="kombu_envelope.consumer:EnvelopeConsumer",
            envelope_dead_letter_queue=dead_letters,
        ),
    )

    # The serializer serves the current app (several apps live in this one process).
    under_a.app.set_current()
    # Tasks queued under key A; the worker restarted with key B, and A for decryption only: all run.
    queued = [under_a.add.delay(n, 1000) for n in range(8)]
    with servers.CeleryWorker(tmp_path / "after_rotation", name, concurrency=2, env=bao_server.env):
        _wait_for_result_keys(redis_db_url, [r.id for r in queued])
    # Each header named key A, so the worker asked Transit about A only, never trying B.
    assert bao_server.audit_counts(f"transit/decrypt/{key_a}") >= 1
    assert bao_server.audit_counts(f"transit/decrypt/{key_b}") == 0
    after_rotation.app.set_current()
    results = [after_rotation.app.AsyncResult(r.id).get(timeout=10) for r in queued]  # results are under B
    assert results == [n + 1000 for n in range(8)]

    # More tasks under A; a worker that knows only B refuses them, says why, and keeps them.
    under_a.app.set_current()
    refused = [under_a.echo.delay(CANARY, n) for n in range(3)]
    with servers.CeleryWorker(tmp_path / "b_only", name, concurrency=2, env=bao_server.env) as worker:
        worker.wait_for_log(r"refused task .* moved to dead-letter queue", timeout=30)
        deadline = time.monotonic() + 15
        while _queue_length(redis_db_url, dead_letters) < len(refused) and time.monotonic() < deadline:
            time.sleep(0.1)
        log = worker.log_text()

    assert "none of which is configured" in log
    assert "Add the key URI that encrypted it to envelope_decrypt_key_uris" in log
    assert CANARY not in log
    kept = _queue_bodies(redis_db_url, dead_letters)
    assert sorted(m["headers"]["id"] for m in kept) == sorted(r.id for r in refused)
    assert all("none of which is configured" in m["headers"]["x-envelope-dead-letter-reason"] for m in kept)
    # Kept intact: a codec that lists key A still reads them.
    with_a = EnvelopeCodec([uri_a], cache=DataKeyCache())
    assert sorted(with_a.decode(base64.b64decode(m["body"]))[0][1] for m in kept) == [0, 1, 2]
    assert all(r.state == "PENDING" for r in refused)  # never run, never marked failed: still recoverable


def _wait_for_result_keys(url: str, task_ids: list[str], timeout: float = 60) -> None:
    """Wait until the Redis backend holds every task's result (without decrypting anything)."""
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + timeout
    try:
        while client.exists(*(f"celery-task-meta-{task_id}" for task_id in task_ids)) < len(task_ids):
            assert time.monotonic() < deadline, "the worker did not store every result in time"
            time.sleep(0.1)
    finally:
        client.close()


def _queue_length(url: str, queue: str) -> int:
    client = redis.Redis.from_url(url)
    try:
        return int(client.llen(queue))
    finally:
        client.close()


def _queue_bodies(url: str, queue: str) -> list[dict]:
    client = redis.Redis.from_url(url)
    try:
        return [json.loads(raw) for raw in client.lrange(queue, 0, -1)]
    finally:
        client.close()


def test_multi_wrap_across_services_survives_one_of_them_down(private_moto_server, bao_server, monkeypatch):
    use_env(monkeypatch, {**private_moto_server.env, **bao_server.env})
    # Keep the outage short: each provider retries its service for RETRY_TOTAL before falling through.
    monkeypatch.setattr(aws_kms, "DEFAULT_POLICY", RetryPolicy(total=0.3, first_delay=0.01))
    monkeypatch.setattr(vault, "DEFAULT_POLICY", RetryPolicy(total=0.3, first_delay=0.01))
    name = f"mw-{uuid.uuid4().hex[:8]}"
    bao_server.create_key(name)
    uris = [f"aws-kms://{private_moto_server.create_key()}", f"vault://transit/keys/{name}"]

    message = EnvelopeCodec(uris, context=CONTEXT, cache=DataKeyCache()).encode({"secret": CANARY})
    private_moto_server.stop()  # the first key's service is gone (connection refused)
    worker = EnvelopeCodec([], uris, context=CONTEXT, cache=DataKeyCache())
    assert worker.decode(message) == {"secret": CANARY}
    assert bao_server.audit_counts(f"transit/decrypt/{name}") == 1
