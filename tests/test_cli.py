"""The operator commands: --help everywhere, inspect and decrypt from files, stdin, Redis and RabbitMQ."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys

import pytest
import redis

from kombu_envelope.cli import build_parser, main
from kombu_envelope.codec import EnvelopeCodec
from kombu_envelope.providers import key_fingerprint

from .ops_helpers import (
    amqp_delete,
    amqp_drain,
    envelope_app,
    new_key,
    publish_raw,
    redis_lists,
    send_tasks,
    unique,
)

SUBCOMMANDS = ["keygen", "demo", "inspect", "decrypt", "doctor", "audit"]


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit:
        main([command, "--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: kombu-envelope {command}")


def test_the_parser_knows_exactly_the_documented_subcommands():
    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    assert sorted(subparsers.choices) == sorted(SUBCOMMANDS)


def test_python_dash_m_runs_the_same_command():
    result = subprocess.run(
        [sys.executable, "-m", "kombu_envelope", "inspect", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and "authenticated header" in result.stdout


@pytest.fixture
def sealed(tmp_path):
    """A message encrypted under two keys with a context and zlib, written to a file; and the key URIs."""
    first, second = new_key(tmp_path, "a.key"), new_key(tmp_path, "b.key")
    codec = EnvelopeCodec([first, second], context={"app": "orders"}, compression="zlib")
    body = codec.encode([["4111-1111-1111-1111"], {"amount": 12}, {}])
    path = tmp_path / "message.bin"
    path.write_bytes(body)
    return path, body, first, second


def test_inspect_a_file_prints_the_header_and_names_configured_keys_without_reading_them(sealed, capsys, monkeypatch):
    path, body, first, second = sealed
    # The configured key files are gone: inspect must not need them (no key-service call, no key read).
    monkeypatch.setenv("KOMBU_ENVELOPE_KEY_URI", first)
    monkeypatch.setenv("KOMBU_ENVELOPE_ENCRYPTION_CONTEXT", '{"app": "orders"}')
    os.remove(first[len("local://") :])
    os.remove(second[len("local://") :])

    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format_version"] == 1
    assert info["algorithm"] == "AES-256-GCM"
    assert info["compression"] == "zlib"
    assert info["encryption_context"] == {"app": "orders"}
    keys = info["wrapped_keys"]
    assert [k["fingerprint"] for k in keys] == [key_fingerprint(first).hex(), key_fingerprint(second).hex()]
    assert (keys[0]["key_uri"], keys[0]["setting"]) == (first, "envelope_key_uri")
    assert keys[1]["key_uri"] is None  # not configured in this environment
    sizes = info["sizes"]
    assert sizes["total"] == len(body) == sizes["header"] + sizes["nonce"] + sizes["ciphertext"] + sizes["tag"]
    assert "4111" not in json.dumps(info)

    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert f"{first} (envelope_key_uri)" in text
    assert f"local fingerprint {key_fingerprint(second).hex()}" in text and "not a configured key" in text
    assert 'encryption context: {"app": "orders"}' in text


def test_inspect_reads_base64_from_stdin(tmp_path):
    body = EnvelopeCodec([new_key(tmp_path)]).encode("x")
    result = subprocess.run(
        [sys.executable, "-m", "kombu_envelope", "inspect", "-", "--json"],
        input=base64.b64encode(body) + b"\n",
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["sizes"]["total"] == len(body)


def test_inspect_says_why_a_message_is_not_an_envelope(tmp_path, capsys):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\x02\x01\x00\x01")
    assert main(["inspect", str(bad)]) == 1
    assert "not a valid envelope: unsupported format version 2" in capsys.readouterr().out


def test_inspect_and_decrypt_read_a_redis_queue_without_consuming(tmp_path, redis_db_url, capsys, monkeypatch):
    queue = unique("cli-redis")
    key_uri = new_key(tmp_path)
    app = envelope_app(redis_db_url, key_uri, queue, envelope_encryption_context={"app": "cli"})
    ids = send_tasks(app, 2)
    send_tasks(app, 1, serializer="json")
    before = redis_lists(redis_db_url, queue)

    assert main(["inspect", "--broker", redis_db_url, "--queue", queue, "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["headers"]["id"] == ids[0]  # position 0 = the next to be delivered = the first sent
    assert first["headers"]["argsrepr"] == "'<encrypted>'"
    assert first["encryption_context"] == {"app": "cli"}

    assert main(["inspect", "--broker", redis_db_url, "--queue", queue, "--index", "2"]) == 1
    assert "not an envelope message: content type 'application/json' (plaintext)" in capsys.readouterr().out

    monkeypatch.setenv("KOMBU_ENVELOPE_KEY_URI", key_uri)
    monkeypatch.setenv("KOMBU_ENVELOPE_ENCRYPTION_CONTEXT", '{"app": "cli"}')
    assert main(["decrypt", "--broker", redis_db_url, "--queue", queue, "--index", "1"]) == 0
    assert json.loads(capsys.readouterr().out)[0] == ["4111-1111-1111-1111", 1]

    # An operator without the key is told which key the message needs.
    env = dict(os.environ, KOMBU_ENVELOPE_KEY_URI=new_key(tmp_path, "other.key"))
    result = subprocess.run(
        [sys.executable, "-m", "kombu_envelope", "decrypt", "--broker", redis_db_url, "--queue", queue],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert f"message wrapped under local key {key_fingerprint(key_uri).hex()}" in result.stderr

    assert redis_lists(redis_db_url, queue) == before
    redis.Redis.from_url(redis_db_url).delete(*before)


def test_decrypt_a_kombu_record_file_with_the_apps_settings(tmp_path, redis_db_url, capsys, monkeypatch):
    """The record as `redis-cli LINDEX queue -1` prints it; settings from -A."""
    queue = unique("cli-record")
    key_uri = new_key(tmp_path)
    module = tmp_path / "cliapp_record.py"
    module.write_text(
        "from celery import Celery\n"
        f"app = Celery('cliapp_record', broker={redis_db_url!r})\n"
        f"app.conf.update(task_serializer='envelope', envelope_key_uri={key_uri!r})\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    app = envelope_app(redis_db_url, key_uri, queue)
    send_tasks(app, 1)
    client = redis.Redis.from_url(redis_db_url)
    record = tmp_path / "record.json"
    record.write_bytes(client.lindex(queue, -1))
    client.delete(queue)

    assert main(["decrypt", "-A", "cliapp_record", str(record)]) == 0
    assert json.loads(capsys.readouterr().out)[0] == ["4111-1111-1111-1111", 0]
    assert main(["inspect", "-A", "cliapp_record", str(record)]) == 0
    assert f"{key_uri} (envelope_key_uri)" in capsys.readouterr().out


def test_inspect_and_decrypt_read_a_rabbitmq_queue_and_leave_it_in_order(tmp_path, amqp_url, capsys, monkeypatch):
    queue = unique("cli-amqp")
    key_uri = new_key(tmp_path)
    app = envelope_app(amqp_url, key_uri, queue)
    try:
        sent = send_tasks(app, 2)
        sent.append(publish_raw(amqp_url, queue, b"\x01\x01\x00\x01"))
        assert main(["inspect", "--broker", amqp_url, "--queue", queue, "--index", "1", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["headers"]["id"] == sent[1]
        assert main(["inspect", "--broker", amqp_url, "--queue", queue, "--index", "2"]) == 1
        assert "not a valid envelope: truncated wrapped key" in capsys.readouterr().out
        assert main(["inspect", "--broker", amqp_url, "--queue", queue, "--index", "3"]) == 2
        assert "holds fewer than 4 messages" in capsys.readouterr().err

        monkeypatch.setenv("KOMBU_ENVELOPE_KEY_URI", key_uri)
        assert main(["decrypt", "--broker", amqp_url, "--queue", queue]) == 0
        assert json.loads(capsys.readouterr().out)[0] == ["4111-1111-1111-1111", 0]

        assert [task_id for _, _, task_id in amqp_drain(amqp_url, queue)] == sent
    finally:
        amqp_delete(amqp_url, queue)


def test_broker_errors_are_one_clear_line(capsys):
    assert main(["audit", "--broker", "redis://127.0.0.1:1/0", "--queue", "x"]) == 2
    assert "cannot reach the Redis broker redis://127.0.0.1:1/0" in capsys.readouterr().err
    assert main(["audit", "--broker", "sqs://", "--queue", "x"]) == 2
    assert "cannot read queues of a sqs:// broker; supported: redis://" in capsys.readouterr().err
    assert main(["inspect", "--queue", "x"]) == 2
    assert "name the broker: --broker" in capsys.readouterr().err
