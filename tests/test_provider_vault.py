"""``vault://`` against a real OpenBao dev server (Transit) over HTTP, nothing stubbed.

Throttling is a real rate-limit quota, a 5xx is a really sealed server, a
timeout is a paused (SIGSTOPped) server, a refused connection a stopped one.
The Vault policies are the ones in docs/key-services.md, applied to real tokens.
"""

from __future__ import annotations

import base64
import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from kombu_envelope.cache import DataKeyCache
from kombu_envelope.codec import EnvelopeCodec
from kombu_envelope.errors import ConfigurationError, InvalidEnvelope, KeyServiceError
from kombu_envelope.providers import key_fingerprint, provider_for_uri, vault
from kombu_envelope.providers.retry import RetryPolicy

CONTEXT = {"app": "orders", "env": "test"}
VALUE = {"card": "4111-1111-1111-1111", "amounts": [1, 2, 3]}
QUICK = RetryPolicy(total=0.5, first_delay=0.01, max_delay=0.1)
DOCS = Path(__file__).resolve().parent.parent / "docs" / "key-services.md"


def fresh_codec(uris, decrypt_uris=(), **options) -> EnvelopeCodec:
    """A codec with its own cache, so it unwraps through Transit like a worker that has never seen the key."""
    return EnvelopeCodec(uris, decrypt_uris, cache=DataKeyCache(), **options)


def provider(uri: str, policy: RetryPolicy = QUICK) -> vault.VaultTransitProvider:
    p = provider_for_uri(uri)
    assert isinstance(p, vault.VaultTransitProvider)
    p.retry_policy = policy
    return p


def key_name(prefix: str = "k") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def use_server(monkeypatch, server) -> None:
    for name, value in server.env.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def transit(bao_server, monkeypatch):
    """The session's OpenBao, with VAULT_ADDR/VAULT_TOKEN pointing at it (as a deployment would)."""
    use_server(monkeypatch, bao_server)
    return bao_server


def docs_block(marker: str) -> str:
    """The fenced block that follows ``<!-- marker -->`` in docs/key-services.md."""
    match = re.search(rf"<!-- {re.escape(marker)} -->\s*```\w*\n(.*?)```", DOCS.read_text(), re.DOTALL)
    assert match, f"no block marked {marker} in {DOCS}"
    return match.group(1)


# -- AEAD (aes256-gcm96) keys ----------------------------------------------------------------


def test_round_trip_without_context_uses_datakey(transit):
    name = key_name()
    transit.create_key(name)
    uri = f"vault://transit/keys/{name}"
    messages = [fresh_codec([uri]).encode([VALUE, n]) for n in range(3)]
    assert [fresh_codec([uri]).decode(m) for m in messages] == [[VALUE, n] for n in range(3)]
    assert transit.audit_counts(f"transit/datakey/plaintext/{name}") == 3
    assert transit.audit_counts(f"transit/encrypt/{name}") == 0
    assert transit.audit_counts(f"transit/decrypt/{name}") == 3


def test_context_is_bound_as_associated_data_and_enforced_by_transit(transit):
    name = key_name()
    transit.create_key(name)
    uri = f"vault://transit/keys/{name}"
    producer = fresh_codec([uri], context=CONTEXT)
    messages = [producer.encode([VALUE, n]) for n in range(20)]
    assert [fresh_codec([uri], context=CONTEXT).decode(m) for m in messages[:2]] == [[VALUE, 0], [VALUE, 1]]
    # HashiCorp Vault's datakey ignores associated_data, so a context goes through encrypt (one call per data key).
    assert transit.audit_counts(f"transit/encrypt/{name}") == 1
    assert transit.audit_counts(f"transit/datakey/plaintext/{name}") == 0

    p = provider(uri)
    data_key, wrapped = p.generate_data_key(CONTEXT)
    assert wrapped.startswith(b"\x01vault:v1:")
    with pytest.raises(InvalidEnvelope) as wrong_context:
        p.unwrap_data_key(wrapped, {**CONTEXT, "env": "prod"})
    text = str(wrong_context.value)
    assert text.startswith(f"{uri} refused to transit/decrypt/{name}: cipher: message authentication failed")
    assert "encryption context differs" in text
    with pytest.raises(InvalidEnvelope, match="message authentication failed"):
        p.unwrap_data_key(wrapped[:-8] + b"AAAAAAA=", CONTEXT)
    assert p.unwrap_data_key(wrapped, CONTEXT) == data_key


def test_openbao_variables_nested_mounts_and_multi_wrap(transit, monkeypatch):
    for name in ("VAULT_ADDR", "VAULT_TOKEN"):
        monkeypatch.delenv(name)  # BAO_ADDR / BAO_TOKEN alone
    transit.api("POST", "sys/mounts/team/transit", {"type": "transit"})
    first, second = key_name(), key_name()
    transit.create_key(first)
    transit.api("POST", f"team/transit/keys/{second}", {"type": "aes256-gcm96"})
    uris = [f"vault://transit/keys/{first}", f"vault://team/transit/keys/{second}"]

    message = fresh_codec(uris, context=CONTEXT).encode(VALUE)
    assert fresh_codec([uris[0]], context=CONTEXT).decode(message) == VALUE
    assert fresh_codec([], [uris[1]], context=CONTEXT).decode(message) == VALUE
    assert transit.audit_counts(f"team/transit/encrypt/{second}") == 1
    assert transit.audit_counts(f"team/transit/decrypt/{second}") == 1


# -- RSA keys: local wrap, remote unwrap ------------------------------------------------------------


def test_rsa_4096_local_wrap_with_fetched_public_key_and_transit_unwrap(transit):
    name = key_name("rsa")
    transit.create_key(name, type="rsa-4096")
    key_reads = transit.audit_counts(f"transit/keys/{name}")  # create_key's own calls
    producer = fresh_codec([f"vault://transit/keys/{name}?public_key=fetch"], context=CONTEXT)
    messages = [producer.encode([VALUE, n]) for n in range(5)]
    # The producer read the public key once and made no Transit call to wrap.
    assert transit.audit_counts(f"transit/keys/{name}") == key_reads + 1
    assert (
        transit.audit_counts(f"transit/encrypt/{name}")
        == transit.audit_counts(f"transit/datakey/plaintext/{name}")
        == 0
    )

    worker = fresh_codec([f"vault://transit/keys/{name}"], context=CONTEXT)  # no parameter needed to decrypt
    assert [worker.decode(m) for m in messages] == [[VALUE, n] for n in range(5)]
    assert transit.audit_counts(f"transit/decrypt/{name}") == 1
    wrapped = worker.inspect(messages[0]).wrapped_keys[0]
    assert wrapped.fingerprint == key_fingerprint(f"vault://transit/keys/{name}")
    assert wrapped.wrapped.startswith(b"\x02vault:v1:")
    assert len(base64.b64decode(wrapped.wrapped[len(b"\x02vault:v1:") :])) == 512  # RSA-4096


def test_rsa_public_key_file_names_its_key_version(transit, tmp_path):
    name = key_name("rsa")
    transit.create_key(name, type="rsa-2048")
    transit.api("POST", f"transit/keys/{name}/rotate")
    pem = tmp_path / "v2.pem"
    pem.write_text(transit.api("GET", f"transit/keys/{name}")["data"]["keys"]["2"]["public_key"])
    worker = fresh_codec([f"vault://transit/keys/{name}"], context=CONTEXT)

    message = fresh_codec([f"vault://transit/keys/{name}?public_key={pem}&key_version=2"], context=CONTEXT).encode(
        VALUE
    )
    assert worker.inspect(message).wrapped_keys[0].wrapped.startswith(b"\x02vault:v2:")
    assert worker.decode(message) == VALUE

    # The version-2 public key labelled as version 1: Transit fails to decrypt (HTTP 500), refused at once.
    mislabelled = fresh_codec([f"vault://transit/keys/{name}?public_key={pem}&key_version=1"], context=CONTEXT)
    started = time.monotonic()
    with pytest.raises(InvalidEnvelope) as refused:
        fresh_codec([f"vault://transit/keys/{name}"], context=CONTEXT).decode(mislabelled.encode(VALUE))
    assert time.monotonic() - started < 2
    assert "failed to RSA decrypt the ciphertext" in str(refused.value)

    with pytest.raises(ConfigurationError, match="also give the Transit key version"):
        provider_for_uri(f"vault://transit/keys/{name}?public_key={pem}")


def test_fetching_the_public_key_of_an_aes_key_says_what_to_do(transit):
    name = key_name()
    transit.create_key(name)
    with pytest.raises(KeyServiceError) as refused:
        provider(f"vault://transit/keys/{name}?public_key=fetch").generate_data_key({})
    assert refused.value.transient is False
    assert "the Transit key is aes256-gcm96, not RSA" in str(refused.value)


# -- the documented policies, on real tokens -----------------------------------------------------------


def _token(server, policy_name: str, hcl: str, key: str) -> str:
    server.api("POST", f"sys/policies/acl/{policy_name}", {"policy": re.sub(r"/orders(-rsa)?\b", f"/{key}", hcl)})
    auth = server.api("POST", "auth/token/create", {"policies": [policy_name], "no_default_policy": True})
    return str(auth["auth"]["client_token"])


def test_documented_policies_producers_encrypt_only_workers_decrypt_only(transit, monkeypatch):
    aes, rsa = key_name(), key_name("rsa")
    transit.create_key(aes)
    transit.create_key(rsa, type="rsa-2048")
    producer = _token(transit, f"p-{aes}", docs_block("vault-policy-producer"), aes)
    rsa_producer = _token(transit, f"rp-{rsa}", docs_block("vault-policy-rsa-producer"), rsa)
    worker = _token(transit, f"w-{aes}", docs_block("vault-policy-worker"), aes)
    rsa_worker = _token(transit, f"rw-{rsa}", docs_block("vault-policy-worker"), rsa)

    monkeypatch.setenv("VAULT_TOKEN", producer)
    aes_uri = f"vault://transit/keys/{aes}"
    with_context = fresh_codec([aes_uri], context=CONTEXT).encode(VALUE)
    without_context = fresh_codec([aes_uri]).encode(VALUE)
    with pytest.raises(KeyServiceError) as producer_decrypts:
        fresh_codec([aes_uri]).decode(without_context)

    monkeypatch.setenv("VAULT_TOKEN", rsa_producer)
    rsa_message = fresh_codec([f"vault://transit/keys/{rsa}?public_key=fetch"]).encode(VALUE)

    monkeypatch.setenv("VAULT_TOKEN", worker)
    assert fresh_codec([aes_uri], context=CONTEXT).decode(with_context) == VALUE
    assert fresh_codec([aes_uri]).decode(without_context) == VALUE
    with pytest.raises(KeyServiceError) as worker_encrypts:
        fresh_codec([aes_uri]).encode(VALUE)

    monkeypatch.setenv("VAULT_TOKEN", rsa_worker)
    assert fresh_codec([f"vault://transit/keys/{rsa}"]).decode(rsa_message) == VALUE

    assert producer_decrypts.value.transient is False
    text = str(producer_decrypts.value)
    assert text.startswith(
        f"key service for {aes_uri} refused the request: transit/decrypt/{aes}: HTTP 403: permission denied"
    )
    assert "docs/key-services.md" in text
    assert f"transit/datakey/plaintext/{aes}: HTTP 403: permission denied" in str(worker_encrypts.value)


# -- refusals ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "uri, expected",
    [
        (
            "vault://transit/keys/no-such-key",
            "transit/datakey/plaintext/no-such-key: HTTP 400: encryption key not found",
        ),
        ("vault://no-such-mount/keys/k", "no-such-mount/datakey/plaintext/k: HTTP 404: no handler for route"),
    ],
)
def test_unknown_keys_and_mounts_are_refused_at_once(transit, uri, expected):
    started = time.monotonic()
    with pytest.raises(KeyServiceError) as refused:
        provider(uri, RetryPolicy(total=30)).generate_data_key({})
    assert time.monotonic() - started < 2
    assert refused.value.transient is False
    assert str(refused.value).startswith(f"key service for {uri} refused the request: {expected}")


def test_encrypt_never_creates_a_missing_key(transit):
    # Transit's encrypt would create the key for a token allowed to (the dev root token is).
    name = key_name("typo")
    uri = f"vault://transit/keys/{name}"
    for encode in (
        lambda: fresh_codec([uri], context=CONTEXT).encode(VALUE),  # encrypt with associated data
        lambda: fresh_codec([uri], mode="direct").encode(VALUE),
    ):
        with pytest.raises(KeyServiceError) as refused:
            encode()
        assert refused.value.transient is False
        assert f"{uri} refused the request: transit/encrypt/" in str(refused.value)
        assert "encryption key not found (kombu-envelope never lets Transit create it)" in str(refused.value)
    with pytest.raises(RuntimeError, match="404"):
        transit.api("GET", f"transit/keys/{name}")


def test_a_bad_token_and_a_missing_address_are_refused(transit, monkeypatch):
    name = key_name()
    transit.create_key(name)
    monkeypatch.setenv("VAULT_TOKEN", "not-a-token")
    monkeypatch.setenv("BAO_TOKEN", "not-a-token")
    with pytest.raises(KeyServiceError, match="HTTP 403: permission denied") as refused:
        provider(f"vault://transit/keys/{name}").generate_data_key({})
    assert refused.value.transient is False

    monkeypatch.delenv("VAULT_ADDR")
    monkeypatch.delenv("BAO_ADDR")
    with pytest.raises(ConfigurationError, match=r"VAULT_ADDR \(or BAO_ADDR\) is not set"):
        provider(f"vault://transit/keys/{name}").generate_data_key({})


@pytest.mark.parametrize(
    "uri, expected",
    [
        ("vault://transit/orders", "is not a Transit key URI"),
        ("vault://transit/keys/", "is not a Transit key URI"),
        ("vault://keys/orders", "is not a Transit key URI"),
        ("vault://transit/keys/a?public_key=fetch&key_version=0", "key_version must be a positive integer"),
        ("vault://transit/keys/a?mount=x", "unknown parameter 'mount'"),
    ],
)
def test_malformed_uris_name_the_setting(uri, expected):
    with pytest.raises(ConfigurationError) as bad:
        provider_for_uri(uri)
    assert str(bad.value).startswith("envelope_key_uri: ") and expected in str(bad.value)


def test_missing_hvac_names_the_extra_to_install():
    # A fresh interpreter in which importing hvac fails, as it does when the extra is not installed.
    code = (
        "import sys; sys.modules['hvac'] = None\n"
        "from kombu_envelope.providers import provider_for_uri\n"
        "provider_for_uri('vault://transit/keys/orders')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    assert "ConfigurationError: envelope_key_uri: 'vault://transit/keys/orders' needs the 'vault' extra" in run.stderr
    assert "pip install 'kombu-envelope[vault]'" in run.stderr


# -- direct mode ------------------------------------------------------------------------------------------


def test_direct_mode_round_trip_context_and_limit(transit):
    name = key_name()
    transit.create_key(name)
    uri = f"vault://transit/keys/{name}"
    message = fresh_codec([uri], context=CONTEXT, mode="direct").encode(VALUE)
    assert fresh_codec([uri], context=CONTEXT, mode="direct").decode(message) == VALUE
    assert transit.audit_counts(f"transit/encrypt/{name}") == transit.audit_counts(f"transit/decrypt/{name}") == 1

    # Transit itself refuses the ciphertext under another context (the codec's header check bypassed).
    ciphertext = fresh_codec([uri]).inspect(message).wrapped_keys[0].wrapped
    with pytest.raises(InvalidEnvelope, match="message authentication failed"):
        provider(uri).decrypt(ciphertext, {"app": "other"})

    limit = vault.VaultTransitProvider.max_direct_plaintext
    with pytest.raises(ConfigurationError) as too_big:
        fresh_codec([uri], mode="direct").encode("x" * limit)
    assert f"over the {limit}-byte limit of direct mode for {uri}" in str(too_big.value)
    with pytest.raises(ConfigurationError, match="direct' needs a symmetric key"):
        fresh_codec([f"{uri}?public_key=fetch"], mode="direct").encode(VALUE)


# -- transient failures on a private server ------------------------------------------------------------------


def test_throttling_by_a_rate_limit_quota_is_retried_then_succeeds(private_bao_server, monkeypatch):
    use_server(monkeypatch, private_bao_server)
    name = key_name()
    private_bao_server.create_key(name)
    private_bao_server.api("POST", "sys/quotas/rate-limit/transit", {"rate": 1, "interval": "1s", "path": "transit/"})
    uri = f"vault://transit/keys/{name}"

    provider(uri).generate_data_key({})  # uses the second's one request
    with pytest.raises(KeyServiceError) as throttled:
        provider(uri, RetryPolicy(total=0.3, first_delay=0.01)).generate_data_key({})
    assert throttled.value.transient is True
    assert "HTTP 429: request path" in str(throttled.value) and "rate limit quota exceeded" in str(throttled.value)
    assert "gave up after" in str(throttled.value)

    data_key, wrapped = provider(uri, RetryPolicy(total=5, first_delay=0.1, max_delay=0.5)).generate_data_key({})
    assert len(data_key) == 32 and wrapped.startswith(b"\x01vault:v1:")


def _unseal_key(server) -> str:
    """The dev server prints its unseal key a moment after it starts answering."""
    deadline = time.monotonic() + 10
    while not (match := re.search(r"Unseal Key: (\S+)", server.log_text())):
        assert time.monotonic() < deadline, "the dev server printed no unseal key"
        time.sleep(0.05)
    return match.group(1)


def test_sealed_paused_and_stopped_servers_are_transient_and_retried(private_bao_server, monkeypatch):
    server = private_bao_server
    use_server(monkeypatch, server)
    name = key_name()
    server.create_key(name)
    uri = f"vault://transit/keys/{name}"
    data_key, wrapped = provider(uri).generate_data_key({})

    unseal_key = _unseal_key(server)
    server.api("POST", "sys/seal")
    with pytest.raises(KeyServiceError, match="HTTP 503: Vault is sealed") as sealed:
        provider(uri).unwrap_data_key(wrapped, {})
    assert sealed.value.transient is True
    threading.Timer(0.5, server.api, ("POST", "sys/unseal", {"key": unseal_key})).start()
    assert provider(uri, RetryPolicy(total=5, first_delay=0.05)).unwrap_data_key(wrapped, {}) == data_key

    monkeypatch.setattr(vault, "READ_TIMEOUT", 0.3)
    server.pause()
    try:
        with pytest.raises(KeyServiceError, match="ReadTimeout") as paused:
            provider(uri).unwrap_data_key(wrapped, {})
        assert paused.value.transient is True
        threading.Timer(0.8, server.resume).start()
        assert provider(uri, RetryPolicy(total=5, first_delay=0.05)).unwrap_data_key(wrapped, {}) == data_key
    finally:
        server.resume()

    server.stop()
    with pytest.raises(KeyServiceError, match="ConnectionError") as stopped:
        provider(uri).unwrap_data_key(wrapped, {})
    assert stopped.value.transient is True
    assert str(stopped.value).startswith(f"key service for {uri} temporarily unavailable: transit/decrypt/{name}")
