"""Installing the package never breaks Kombu, and redaction covers the very first message.

Each test runs in a fresh interpreter: what matters here is import order.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("KOMBU_ENVELOPE_")}
    environ.update(env)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=environ, timeout=60
    )


@pytest.mark.parametrize("key_uri", ["", "not-a-uri", "aws-kms://alias/unreachable", "gcp-kms://nope"])
def test_importing_kombu_works_whatever_the_settings(key_uri):
    result = run_python(
        """
        import sys, kombu.serialization as s
        heavy = sorted(m for m in ("celery", "cryptography", "boto3", "hvac") if m in sys.modules)
        print(s.registry.name_to_type["envelope"], heavy)
        """,
        KOMBU_ENVELOPE_KEY_URI=key_uri,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "application/x-kombu-envelope []"


def test_celery_imports_cleanly_with_the_plugin_loaded_mid_import():
    # Kombu loads the entry point while celery.app.base is half imported.
    result = run_python(
        """
        from celery import Celery
        from celery.app import amqp
        import celery.signals
        print(getattr(amqp.AMQP.as_task_v2, "__wrapped_by_envelope__", False))
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"


def test_the_first_message_a_process_sends_has_redacted_headers_and_sent_event(tmp_path):
    from kombu_envelope.providers.local import write_key_file

    write_key_file(str(tmp_path / "k"))
    result = run_python(
        f"""
        import base64, json
        from celery import Celery
        from kombu.transport.memory import Channel
        app = Celery("first", broker="memory://")
        app.conf.update(task_serializer="envelope", accept_content=["envelope"],
                        envelope_key_uri="local://{tmp_path}/k", task_send_sent_event=True)
        sig = app.signature("t.secret", args=("canary-arg",), kwargs={{"k": "canary-kwarg"}})
        sig.apply_async(queue="first-q")
        raw = Channel.queues["first-q"].queue[0]
        message = app.amqp.create_task_message(
            "id-1", "t.secret", ("canary-arg",), {{"k": "canary-kwarg"}}, create_sent_event=True)
        print(json.dumps({{
            "argsrepr": raw["headers"]["argsrepr"],
            "kwargsrepr": raw["headers"]["kwargsrepr"],
            "event_args": message.sent_event["args"],
            "event_kwargs": message.sent_event["kwargs"],
            "anywhere": "canary" in json.dumps(raw) + base64.b64decode(raw["body"]).decode("latin-1"),
        }}))
        """
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen == {
        "argsrepr": "'<encrypted>'",
        "kwargsrepr": "'<encrypted>'",
        "event_args": "'<encrypted>'",
        "event_kwargs": "'<encrypted>'",
        "anywhere": False,
    }


def test_apps_on_other_serializers_keep_their_reprs():
    result = run_python(
        """
        from celery import Celery
        app = Celery("plain", broker="memory://")
        message = app.amqp.create_task_message("id-1", "t", ("visible",), {})
        print(message.headers["argsrepr"])
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "('visible',)"


def test_an_explicit_argsrepr_from_the_caller_is_kept(tmp_path):
    result = run_python(
        """
        from celery import Celery
        app = Celery("explicit", broker="memory://")
        app.conf.update(task_serializer="envelope")
        message = app.amqp.create_task_message("id-1", "t", ("secret",), {}, argsrepr="(order 42)")
        print(message.headers["argsrepr"], message.headers["kwargsrepr"])
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(order 42) '<encrypted>'"
