"""Settings come from the Celery config, else the environment; bad values name the setting."""

from __future__ import annotations

import pytest
from celery import Celery

from kombu_envelope.errors import ConfigurationError
from kombu_envelope.serializer import codec_for_app
from kombu_envelope.settings import SETTINGS, load_settings


def test_defaults_encrypt_nothing_until_a_key_uri_is_set():
    settings = load_settings({}, environ={})
    assert settings.key_uris == ()
    assert settings.mode == "envelope"
    assert settings.redact_headers is True
    assert settings.dead_letter_queue == "envelope.dead-letter"


def test_celery_config_wins_over_the_environment():
    settings = load_settings(
        {"envelope_key_uri": "local:///from/config"}, environ={"KOMBU_ENVELOPE_KEY_URI": "local:///from/env"}
    )
    assert settings.key_uris == ("local:///from/config",)


def test_environment_fills_what_the_config_leaves_out():
    settings = load_settings(
        {},
        environ={
            "KOMBU_ENVELOPE_KEY_URI": "local:///a, local:///b",
            "KOMBU_ENVELOPE_DECRYPT_KEY_URIS": "local:///old",
            "KOMBU_ENVELOPE_ENCRYPTION_CONTEXT": '{"app": "orders"}',
            "KOMBU_ENVELOPE_DATA_KEY_MAX_AGE": "60",
            "KOMBU_ENVELOPE_REDACT_HEADERS": "false",
            "KOMBU_ENVELOPE_DEAD_LETTER_QUEUE": "none",
        },
    )
    assert settings.key_uris == ("local:///a", "local:///b")
    assert settings.decrypt_key_uris == ("local:///old",)
    assert settings.encryption_context == {"app": "orders"}
    assert settings.limits.max_age == 60.0
    assert settings.redact_headers is False
    assert settings.dead_letter_queue is None


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("envelope_encryption_context", "{not json", "envelope_encryption_context is not valid JSON.*KOMBU_ENVELOPE_ENCRYPTION_CONTEXT="),
        ("envelope_encryption_context", {"n": 1}, "envelope_encryption_context must map strings to strings"),
        ("envelope_data_key_max_age", "soon", "envelope_data_key_max_age must be a float"),
        ("envelope_data_key_max_messages", 0, "envelope_data_key_max_messages must be at least 1"),
        ("envelope_mode", "fast", "envelope_mode must be one of 'envelope', 'direct'"),
        ("envelope_compression", "lz4", "envelope_compression must be one of None, 'zlib', 'zstd'"),
        ("envelope_redact_headers", "maybe", "envelope_redact_headers must be true or false"),
        ("envelope_key_uri", 42, "envelope_key_uri must be a key URI string"),
    ],
)
def test_malformed_settings_name_the_setting(name, value, message):
    with pytest.raises(ConfigurationError, match=message):
        load_settings({name: value}, environ={})


def test_every_setting_is_documented_in_the_readme():
    readme = open("README.md", encoding="utf-8").read()
    assert [name for name in SETTINGS if f"`{name}`" not in readme] == []


def test_django_style_namespaced_settings_reach_the_codec(tmp_path):
    from kombu_envelope.providers.local import write_key_file

    write_key_file(str(tmp_path / "k"))

    class DjangoSettings:
        CELERY_TASK_SERIALIZER = "envelope"
        CELERY_ENVELOPE_KEY_URI = f"local://{tmp_path}/k"
        CELERY_ENVELOPE_ENCRYPTION_CONTEXT = {"site": "shop"}

    app = Celery("django_style", set_as_current=False)
    app.config_from_object(DjangoSettings, namespace="CELERY")
    codec, settings = codec_for_app(app)
    assert settings.key_uris == (f"local://{tmp_path}/k",)
    assert codec.decode(codec.encode("x")) == "x"
    assert codec.inspect(codec.encode("x")).context == {"site": "shop"}
