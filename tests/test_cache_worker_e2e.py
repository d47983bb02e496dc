"""A real prefork worker host asks the key service once per data key, whatever its pool does.

``celery worker --pool=prefork -c 4 --max-tasks-per-child=25`` on Redis runs 2,000 tasks
published under one data key: the MainProcess decodes every task, about 80 pool children
(recycled every 25 tasks) decode them again and encrypt the results. The key server's own
audit log, not our counters, must show one data-key generation and one decrypt for the
producer, and the same for the whole worker host.

The key server is a real OpenBao Transit engine over HTTP (``vault://``). Producer, worker and
``celery inspect`` use three tokens so the audit log tells their calls apart.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

from celery.result import ResultSet

from kombu_envelope import serializer

from . import servers

TASKS = 2000


def token(bao: servers.BaoServer, name: str) -> str:
    """A token whose calls the audit log shows as ``token-<name>``."""
    return str(
        bao.api("POST", "auth/token/create", {"display_name": name, "policies": ["root"]})["auth"]["client_token"]
    )


def audit_calls(bao: servers.BaoServer, who: str, operation: str) -> int:
    """Transit ``operation`` calls (datakey, decrypt, ...) answered for token ``who``, per the server's audit log."""
    return sum(
        1
        for e in bao.audit_entries()
        if e.get("type") == "response"
        and e.get("auth", {}).get("display_name") == f"token-{who}"
        and e.get("request", {}).get("path", "").startswith(f"transit/{operation}/")
    )


def test_the_worker_host_unwraps_once_and_makes_one_result_key(tmp_path, bao_server, redis_db_url, monkeypatch):
    key = "orders-" + uuid.uuid4().hex[:8]
    bao_server.create_key(key)
    tokens = {who: token(bao_server, who) for who in ("producer", "worker", "inspector")}
    name = "cache_e2e_" + uuid.uuid4().hex[:8]
    servers.write_app_module(
        tmp_path, name, servers.envelope_config(redis_db_url, f"vault://transit/keys/{key}", "q-" + name)
    )
    monkeypatch.setenv("VAULT_ADDR", bao_server.addr)
    monkeypatch.setenv("VAULT_TOKEN", tokens["producer"])
    app_module = servers.import_app_module(tmp_path, name)
    app_module.app.set_current()
    serializer.reset()

    results = [app_module.add.delay(i, i) for i in range(TASKS)]  # all published before any worker runs
    assert (audit_calls(bao_server, "producer", "datakey"), audit_calls(bao_server, "producer", "decrypt")) == (1, 0)

    worker_env = {"VAULT_ADDR": bao_server.addr, "VAULT_TOKEN": tokens["worker"]}
    started = time.monotonic()
    with servers.CeleryWorker(
        tmp_path, name, concurrency=4, extra_args=["--max-tasks-per-child=25"], env=worker_env, ready_timeout=60
    ) as worker:
        values = ResultSet(results).join_native(timeout=120)
        elapsed = time.monotonic() - started
        calls = {
            (who, op): audit_calls(bao_server, who, op)
            for who in ("producer", "worker")
            for op in ("datakey", "decrypt")
        }
        replies = inspect_envelope_stats(tmp_path, name, worker.nodename, bao_server.addr, tokens["inspector"])

    assert values == [2 * i for i in range(TASKS)]
    # The key server's own record: the producer made one data key and read the results under one;
    # the worker host (MainProcess and every pool child) read the tasks' key once and made one key.
    assert calls == {
        ("producer", "datakey"): 1,
        ("producer", "decrypt"): 1,
        ("worker", "datakey"): 1,
        ("worker", "decrypt"): 1,
    }

    # `celery inspect envelope_stats` answers with the worker host's counters. The inspect request
    # is itself encrypted under the inspecting process's own data key: one more unwrap.
    assert audit_calls(bao_server, "worker", "decrypt") == 2
    assert audit_calls(bao_server, "inspector", "datakey") == audit_calls(bao_server, "inspector", "decrypt") == 1
    ((node, snapshot),) = replies.items()
    assert node == worker.nodename.replace("%h", os.uname().nodename)
    host = snapshot["host"]
    assert host["key_service"]["unwrap"] == {
        "ok": 2,
        "transient_error": 0,
        "error": 0,
        "microseconds": host["key_service"]["unwrap"]["microseconds"],
    }
    assert host["key_service"]["generate"]["ok"] == 1
    assert host["decrypted"]["messages"] >= 2 * TASKS  # the MainProcess and a pool child decode each task
    assert host["encrypted"]["messages"] >= TASKS  # every result
    assert snapshot["host_processes"] > TASKS // 25  # the MainProcess and every pool child that ever ran
    print(f"\n{TASKS} tasks in {elapsed:.1f} s; worker host: {snapshot['host_processes']} processes, {host}")


def inspect_envelope_stats(app_dir, module: str, nodename: str, vault_addr: str, vault_token: str) -> dict:
    """``celery -A module inspect envelope_stats --json`` as an operator would run it."""
    env = {
        **os.environ,
        "VAULT_ADDR": vault_addr,
        "VAULT_TOKEN": vault_token,
        "PYTHONPATH": os.pathsep.join([str(app_dir), str(servers.REPO_ROOT)]),
    }
    node = nodename.replace("%h", os.uname().nodename)
    command = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        module,
        "inspect",
        "envelope_stats",
        "--json",
        "-t",
        "20",
        "-d",
        node,
    ]
    result = subprocess.run(command, cwd=app_dir, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr + result.stdout
    return json.loads(result.stdout.strip().splitlines()[-1])
