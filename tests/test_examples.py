"""examples/celeryconfig_redis.py works as its docstring says: configuration only, on Redis."""

from __future__ import annotations

from pathlib import Path

from kombu_envelope.providers.local import write_key_file

from .servers import CeleryWorker, import_app_module, scan_redis_for

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_the_redis_example_runs_encrypted_by_configuration_alone(tmp_path, redis_db_url, monkeypatch):
    code = (EXAMPLES / "celeryconfig_redis.py").read_text()
    assert "import kombu_envelope" not in code and "from kombu_envelope" not in code
    key = tmp_path / "dev.key"
    write_key_file(str(key))
    env = {"REDIS_URL": redis_db_url, "KOMBU_ENVELOPE_KEY_URI": f"local://{key}"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    example = import_app_module(EXAMPLES, "celeryconfig_redis")
    example.app.set_current()
    result = example.charge.delay("alice", "4111-1111-1111-1111")
    assert scan_redis_for(redis_db_url, b"4111-1111-1111-1111") == []
    with CeleryWorker(EXAMPLES, "celeryconfig_redis", env=env, log_dir=tmp_path) as worker:
        assert result.get(timeout=30) == "charged alice's card ending 1111"
        log = worker.log_text()
    assert "4111" not in log
    assert scan_redis_for(redis_db_url, b"charged alice") == []
