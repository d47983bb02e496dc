"""``kombu-envelope doctor``: a deliberately weak app shows every weakness; a good one passes."""

from __future__ import annotations

import json
import uuid

import pytest

from kombu_envelope.cli import main

from .ops_helpers import new_key

GOOD = {
    "task_serializer": "envelope",
    "result_serializer": "envelope",
    "accept_content": ["envelope"],
    "result_extended": True,  # fine: stored encrypted
    "task_send_sent_event": True,
    "worker_send_task_events": True,
    "event_serializer": "envelope",
    "envelope_encryption_context": {"app": "orders"},
    "worker_consumer": "kombu_envelope.consumer:EnvelopeConsumer",
}

WEAK = {
    "task_serializer": "json",
    "result_serializer": "json",
    "accept_content": ["json", "pickle", "envelope"],
    "result_accept_content": ["json", "envelope"],
    "envelope_redact_headers": False,
    "result_extended": True,
    "task_send_sent_event": True,
    "worker_send_task_events": True,
    "envelope_key_uri": "local:///nonexistent/kombu-envelope/missing.key",
    "envelope_data_key_max_age": 7 * 86400,
    "envelope_data_key_max_messages": 2**40,
    "envelope_data_key_max_bytes": 2**50,
    "envelope_decrypt_cache_ttl": 0,
    "envelope_decrypt_cache_size": 2,
    "envelope_dead_letter_queue": False,
    # worker_consumer: Celery's own, which acks and drops what it cannot decrypt
}


@pytest.fixture
def app_module(tmp_path, redis_db_url, monkeypatch):
    """Writes a config-only app module and returns its name for -A."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(conf: dict) -> str:
        name = "doctor_app_" + uuid.uuid4().hex[:8]
        (tmp_path / f"{name}.py").write_text(
            f"from celery import Celery\napp = Celery({name!r}, broker={redis_db_url!r})\napp.conf.update({conf!r})\n"
        )
        return name

    return write


def doctor(capsys, name: str, *extra: str) -> tuple[int, set[tuple[str, str]], list[dict]]:
    code = main(["doctor", "-A", name, "--json", *extra])
    findings = json.loads(capsys.readouterr().out)
    return code, {(f["check"], f["severity"]) for f in findings}, findings


def test_a_weak_config_shows_every_weakness_and_fails(app_module, capsys):
    code, found, findings = doctor(capsys, app_module(WEAK))
    assert code == 1
    expected = {
        ("task_serializer", "error"),
        ("result_serializer", "error"),
        ("accept_content", "error"),  # pickle
        ("result_accept_content", "warning"),  # json: migration mode
        ("redaction", "error"),
        ("result_extended", "error"),  # arguments stored with a json result serializer
        ("events", "warning"),
        ("key_uri", "error"),
        ("cache_limits", "warning"),
        ("dead_letter_queue", "warning"),
        ("worker_consumer", "error"),
        ("encryption_context", "info"),
    }
    assert expected <= found
    assert not {check for check, severity in found if severity == "ok"} - {"plugin"}, findings
    cache = [f["message"] for f in findings if f["check"] == "cache_limits"]
    for setting in (
        "envelope_data_key_max_age",
        "envelope_data_key_max_messages",
        "envelope_data_key_max_bytes",
        "envelope_decrypt_cache_ttl",
        "envelope_decrypt_cache_size",
    ):
        assert any(m.startswith(setting) for m in cache), setting
    key = next(f for f in findings if f["check"] == "key_uri" and f["severity"] == "error")
    assert "does not exist; create it with: kombu-envelope keygen" in key["message"]
    assert all(f["fix"] for f in findings if f["severity"] in ("error", "warning"))


def test_the_text_report_gives_a_fix_per_problem_and_counts(app_module, capsys):
    code = main(["doctor", "-A", app_module(WEAK), "--skip-key-check"])
    out = capsys.readouterr().out
    assert code == 1
    assert "ERROR   task_serializer     task_serializer is 'json'" in out
    assert "fix: task_serializer = 'envelope'" in out
    assert "fix: worker_consumer = 'kombu_envelope.consumer:EnvelopeConsumer'" in out
    assert out.rstrip().endswith("6 error(s), 8 warning(s)")


def test_a_good_config_passes_with_a_real_key_round_trip(app_module, capsys, tmp_path):
    key_uri = new_key(tmp_path)
    code, _, findings = doctor(capsys, app_module({**GOOD, "envelope_key_uri": key_uri}))
    assert code == 0, findings
    problems = [f for f in findings if f["severity"] != "ok"]
    # The only remark: a local key file is for development.
    assert [(f["check"], f["severity"]) for f in problems] == [("key_uri", "warning")]
    assert "is a local key file" in problems[0]["message"]
    (round_trip,) = [f["message"] for f in findings if f["check"] == "key_uri" and f["severity"] == "ok"]
    assert round_trip.startswith(f"{key_uri} (envelope_key_uri): generate ") and " ms, unwrap " in round_trip
    strict = main(["doctor", "-A", app_module({**GOOD, "envelope_key_uri": key_uri}), "--strict"])
    assert strict == 1  # warnings fail under --strict


def test_migration_mode_is_a_warning_and_redaction_is_proved_on_a_built_message(app_module, capsys, tmp_path):
    key_uri = new_key(tmp_path)
    code, _, findings = doctor(
        capsys, app_module({**GOOD, "envelope_key_uri": key_uri, "accept_content": ["envelope", "json"]})
    )
    assert code == 0
    (migration,) = [f for f in findings if f["check"] == "accept_content"]
    assert migration["severity"] == "warning" and "migration mode" in migration["message"]

    # Redaction on, but tasks are json: the probe argument shows up in the headers.
    code, _, findings = doctor(capsys, app_module({**GOOD, "envelope_key_uri": key_uri, "task_serializer": "json"}))
    assert code == 1
    (redaction,) = [f for f in findings if f["check"] == "redaction"]
    assert redaction["severity"] == "error" and "argsrepr" in redaction["message"]


def test_a_retired_decrypt_key_that_fails_is_a_warning_not_an_error(app_module, capsys, tmp_path):
    conf = {
        **GOOD,
        "envelope_key_uri": new_key(tmp_path),
        "envelope_decrypt_key_uris": ["local:///nonexistent/old.key"],
    }
    code, _, findings = doctor(capsys, app_module(conf))
    assert code == 0
    assert any(
        f["severity"] == "warning"
        and f["message"].startswith("local:///nonexistent/old.key (envelope_decrypt_key_uris)")
        for f in findings
    )


def test_doctor_needs_an_app_and_says_when_it_cannot_load_it(capsys):
    with pytest.raises(SystemExit):
        main(["doctor"])
    assert "-A/--app" in capsys.readouterr().err
    assert main(["doctor", "-A", "no_such_module_for_doctor"]) == 2
    assert "cannot load the Celery app 'no_such_module_for_doctor'" in capsys.readouterr().err


def test_direct_mode_round_trips_the_payload_itself(app_module, capsys, tmp_path):
    key_uri = new_key(tmp_path)
    code, _, findings = doctor(capsys, app_module({**GOOD, "envelope_key_uri": key_uri, "envelope_mode": "direct"}))
    assert code == 0
    (round_trip,) = [f["message"] for f in findings if f["check"] == "key_uri" and f["severity"] == "ok"]
    assert round_trip.startswith(f"{key_uri} (envelope_key_uri): encrypt ") and " ms, decrypt " in round_trip


def test_a_worker_consumer_that_cannot_be_imported_is_an_error(app_module, capsys, tmp_path):
    conf = {**GOOD, "envelope_key_uri": new_key(tmp_path), "worker_consumer": "kombu_envelope.consumer:EnvelopeConsumr"}
    code, _, findings = doctor(capsys, app_module(conf), "--skip-key-check")
    assert code == 1
    (consumer,) = [f for f in findings if f["check"] == "worker_consumer"]
    assert consumer["severity"] == "error" and "cannot be imported" in consumer["message"]
