"""``azure-kv://`` against the real azure-keyvault-keys SDK with a fake vault under its transport.

No Key Vault emulator can run here. The SDK's pipeline (challenge
authentication, API version, error parsing) and azure-core's
RequestsTransport run for real; only the requests adapter below them is
``FakeAzureNetwork`` (tests/fake_azure_kv.py), whose vaults hold real RSA and
AES keys and answer in Key Vault's JSON. These tests assert the exact
requests the SDK sends. They were not run against the live service.
"""

from __future__ import annotations

import base64
import subprocess
import sys
import time

import pytest
from azure.keyvault.keys.crypto import CryptographyClient, KeyWrapAlgorithm
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap

from kombu_envelope.cache import DataKeyCache
from kombu_envelope.codec import EnvelopeCodec
from kombu_envelope.crypto import rsa_oaep_unwrap
from kombu_envelope.errors import InvalidEnvelope, KeyServiceError
from kombu_envelope.providers import azure_kv, provider_for_uri
from kombu_envelope.providers.context_binding import bind_context
from kombu_envelope.providers.retry import RetryPolicy

from . import fake_azure_kv
from .fake_azure_kv import TENANT, FakeAzureNetwork, FakeCredential, b64url

CONTEXT = {"app": "orders", "env": "test"}
QUICK = RetryPolicy(total=0.5, first_delay=0.01, max_delay=0.1)
API = {"api-version": "2025-07-01"}


@pytest.fixture
def azure_network(monkeypatch: pytest.MonkeyPatch) -> FakeAzureNetwork:
    return fake_azure_kv.install(monkeypatch)


def provider(uri: str, policy: RetryPolicy = QUICK) -> azure_kv.AzureKeyVaultProvider:
    """A provider as a process builds it from a URI (here: the FakeAzureProvider subclass, see azure_network)."""
    p = provider_for_uri(uri)
    assert isinstance(p, azure_kv.AzureKeyVaultProvider)
    p.retry_policy = policy
    return p


def split(wrapped: bytes) -> tuple[int, str, bytes]:
    """(format byte, key version, ciphertext) of an azure-kv wrapped-key field."""
    size = wrapped[1]
    return wrapped[0], wrapped[2 : 2 + size].decode(), wrapped[2 + size :]


# -- RSA keys --------------------------------------------------------------------------------------


def test_rsa_producer_reads_the_key_once_and_wraps_locally_worker_only_unwraps(azure_network):
    vault = azure_network.add_vault()
    version = vault.create_key("orders", size=3072)
    uri = f"azure-kv://{vault.host}/keys/orders"
    vault.denied = {"wrapKey", "unwrapKey", "encrypt", "decrypt"}  # a producer's access policy: get only

    producer = provider(uri)
    data_key, wrapped = producer.generate_data_key(CONTEXT)
    producer.wrap_data_key(data_key, CONTEXT)
    # The SDK elicited the challenge (no token, no body), then sent one authorized GET of the key's latest version.
    assert [(r.method, r.path, r.query, r.authorization) for r in vault.requests] == [
        ("GET", "/keys/orders/", API, None),
        ("GET", "/keys/orders/", API, f"Bearer {azure_network.token}"),
    ]
    tag, wrapped_version, ciphertext = split(wrapped)
    assert (tag, wrapped_version, len(ciphertext)) == (2, version, 384)
    private_key = vault.keys["orders"][version].secret
    assert rsa_oaep_unwrap(private_key, ciphertext) == bind_context(data_key, CONTEXT)

    vault.denied = {"get", "wrapKey", "encrypt", "decrypt"}  # a worker's access policy: unwrapKey only
    vault.requests.clear()
    worker = provider(uri)
    assert worker.unwrap_data_key(wrapped, CONTEXT) == data_key
    authorized = [r for r in vault.requests if r.authorization]
    assert [(r.method, r.path, r.query) for r in authorized] == [("POST", f"/keys/orders/{version}/unwrapkey", API)]
    assert authorized[0].body == {"alg": "RSA-OAEP-256", "value": b64url(ciphertext)}


def test_token_is_asked_for_the_vault_scope_and_the_challenge_tenant(azure_network):
    vault = azure_network.add_vault()
    vault.create_key("orders")
    p = provider(f"azure-kv://{vault.host}/keys/orders")
    p.wrap_data_key(b"k" * 32, {})
    assert p.credential.requests == [(("https://vault.azure.net/.default",), TENANT)]


def test_a_new_key_version_is_picked_up_and_old_messages_still_unwrap(azure_network, monkeypatch):
    vault = azure_network.add_vault()
    first = vault.create_key("orders")
    p = provider(f"azure-kv://{vault.host}/keys/orders")
    _, old = p.generate_data_key(CONTEXT)
    _, again = p.generate_data_key(CONTEXT)
    assert split(old)[1] == split(again)[1] == first
    assert [r.method for r in vault.requests if r.authorization] == ["GET"]  # the public key is cached

    second = vault.create_key("orders")
    monkeypatch.setattr(azure_kv, "KEY_REFRESH", 0.0)  # as if KEY_REFRESH seconds had passed
    key, new = p.generate_data_key(CONTEXT)
    assert split(new)[1] == second
    assert p.unwrap_data_key(new, CONTEXT) == key
    assert provider(p.uri).unwrap_data_key(old, CONTEXT)  # unwrapped by the version that wrapped it
    assert ("POST", f"/keys/orders/{first}/unwrapkey") in vault.operations()


def test_a_uri_with_a_version_wraps_under_it_and_refuses_other_versions(azure_network):
    vault = azure_network.add_vault()
    first = vault.create_key("orders")
    vault.create_key("orders")
    pinned = provider(f"azure-kv://{vault.host}/keys/orders/{first}")
    key, wrapped = pinned.generate_data_key(CONTEXT)
    assert ("GET", f"/keys/orders/{first}") in vault.operations()
    assert pinned.unwrap_data_key(wrapped, CONTEXT) == key

    _, latest = provider(f"azure-kv://{vault.host}/keys/orders").generate_data_key(CONTEXT)
    with pytest.raises(
        InvalidEnvelope, match=f"wrapped under key version [0-9a-f]{{32}}, not {first} that azure-kv://"
    ):
        pinned.unwrap_data_key(latest, CONTEXT)


# -- Managed HSM AES keys ----------------------------------------------------------------------------


def test_managed_hsm_aes_key_wraps_and_unwraps_in_the_hsm_with_a256kw(azure_network):
    hsm = azure_network.add_vault(hsm=True)
    version = hsm.create_key("orders", kty="oct-HSM", size=256)
    uri = f"azure-kv://{hsm.host}/keys/orders"
    p = provider(uri)
    data_key, wrapped = p.generate_data_key(CONTEXT)
    authorized = [r for r in hsm.requests if r.authorization]
    assert [(r.method, r.path) for r in authorized] == [
        ("GET", "/keys/orders/"),
        ("POST", f"/keys/orders/{version}/wrapkey"),
    ]
    assert authorized[1].body == {"alg": "A256KW", "value": b64url(bind_context(data_key, CONTEXT))}
    tag, wrapped_version, ciphertext = split(wrapped)
    assert (tag, wrapped_version, len(ciphertext)) == (1, version, 72)
    assert aes_key_unwrap(hsm.keys["orders"][version].secret, ciphertext) == bind_context(data_key, CONTEXT)

    hsm.requests.clear()
    assert provider(uri).unwrap_data_key(wrapped, CONTEXT) == data_key
    authorized = [r for r in hsm.requests if r.authorization]
    assert [(r.method, r.path) for r in authorized] == [("POST", f"/keys/orders/{version}/unwrapkey")]
    assert authorized[0].body == {"alg": "A256KW", "value": b64url(ciphertext)}
    with pytest.raises(InvalidEnvelope, match="bound to another encryption context"):
        provider(uri).unwrap_data_key(wrapped, {"app": "billing"})


def test_why_not_cryptography_client_it_wraps_hsm_keys_under_a_key_it_made_up(azure_network):
    """azure-keyvault-keys 4.11: CryptographyClient.wrap_key on an oct-HSM key never calls the HSM.

    GET returns no AES material for HSM keys, and the SDK's local provider then
    draws a random key of its own and "wraps" under it. If this starts failing,
    the SDK changed; the provider does not depend on it either way.
    """
    hsm = azure_network.add_vault(hsm=True)
    version = hsm.create_key("orders", kty="oct-HSM", size=256)
    client = CryptographyClient(
        f"https://{hsm.host}/keys/orders/{version}",
        FakeCredential(azure_network),
        transport=azure_network.transport(),
    )
    result = client.wrap_key(KeyWrapAlgorithm.aes_256, b"k" * 32)
    assert all(r.method == "GET" for r in hsm.requests)  # no wrapkey request reached the HSM
    with pytest.raises(InvalidUnwrap):
        aes_key_unwrap(hsm.keys["orders"][version].secret, result.encrypted_key)


# -- refusals, retries, outages ----------------------------------------------------------------------


def _key_vault_with(refusal: str, azure_network: FakeAzureNetwork) -> tuple[str, bytes]:
    vault = azure_network.add_vault()
    version = vault.create_key("orders")
    uri = f"azure-kv://{vault.host}/keys/orders"
    _, wrapped = provider(uri).generate_data_key(CONTEXT)
    if refusal == "denied":
        vault.denied = {"unwrapKey"}
    elif refusal == "disabled":
        vault.keys["orders"][version].enabled = False
    elif refusal == "deleted":
        del vault.keys["orders"]
    vault.requests.clear()
    return uri, wrapped


@pytest.mark.parametrize(
    "refusal, expected",
    [
        (
            "denied",
            "unwrapKey: HTTP 403 Forbidden: The user, group or application 'appid=1950a258;oid=5f2c' does not "
            "have keys unwrapKey permission on key vault",
        ),
        ("disabled", "unwrapKey: HTTP 403 Forbidden: Operation unwrapKey is not allowed on a disabled key."),
        ("deleted", "unwrapKey: HTTP 404 KeyNotFound: A key with (name/id) orders/"),
    ],
)
def test_refusals_fail_at_once_naming_the_key_uri_and_the_vaults_reason(azure_network, refusal, expected):
    uri, wrapped = _key_vault_with(refusal, azure_network)
    vault = next(iter(azure_network.vaults.values()))
    with pytest.raises(KeyServiceError) as refused:
        provider(uri, RetryPolicy(total=5)).unwrap_data_key(wrapped, CONTEXT)
    assert refused.value.transient is False
    assert str(refused.value).startswith(f"key service for {uri} refused the request: {expected}")
    assert len([r for r in vault.requests if r.authorization]) == 1  # not retried


@pytest.mark.parametrize(
    "kty, key_ops, expected",
    [
        ("EC", None, "the key's type is EC, which cannot wrap data keys; use an RSA key"),
        ("RSA", ["sign", "verify"], "the key's permitted operations (sign, verify) lack wrapKey/unwrapKey"),
    ],
)
def test_keys_that_cannot_wrap_are_refused_before_any_wrapping(azure_network, kty, key_ops, expected):
    vault = azure_network.add_vault()
    vault.create_key("orders", kty=kty, key_ops=key_ops)
    uri = f"azure-kv://{vault.host}/keys/orders"
    with pytest.raises(KeyServiceError) as refused:
        provider(uri).generate_data_key(CONTEXT)
    assert refused.value.transient is False
    assert str(refused.value).startswith(f"key service for {uri} refused the request: {expected}")


def test_a_disabled_key_is_not_used_for_wrapping(azure_network):
    vault = azure_network.add_vault()
    version = vault.create_key("orders")
    vault.keys["orders"][version].enabled = False
    with pytest.raises(KeyServiceError, match=f"key version {version} is disabled") as refused:
        provider(f"azure-kv://{vault.host}/keys/orders").generate_data_key(CONTEXT)
    assert refused.value.transient is False


def test_throttling_and_5xx_are_retried_by_us_alone_then_succeed(azure_network):
    vault = azure_network.add_vault()
    vault.create_key("orders")
    uri = f"azure-kv://{vault.host}/keys/orders"
    data_key, wrapped = provider(uri).generate_data_key(CONTEXT)
    vault.requests.clear()
    vault.failures = [429, 503, 500]
    assert provider(uri, RetryPolicy(total=5, first_delay=0.01)).unwrap_data_key(wrapped, CONTEXT) == data_key
    # Four unwrapkey requests: the SDK's own retry policy is off, ours made the three extra ones.
    assert [op for op in vault.operations()] == [("POST", f"/keys/orders/{split(wrapped)[1]}/unwrapkey")] * 4


def test_transient_failures_give_up_within_the_bound_as_transient_errors(azure_network):
    vault = azure_network.add_vault()
    vault.create_key("orders")
    uri = f"azure-kv://{vault.host}/keys/orders"
    vault.failures = [503] * 1000
    started = time.monotonic()
    with pytest.raises(KeyServiceError) as unavailable:
        provider(uri, RetryPolicy(total=0.6, first_delay=0.02, max_delay=0.2)).generate_data_key(CONTEXT)
    assert 0.1 < time.monotonic() - started < 1.5
    assert unavailable.value.transient is True
    assert str(unavailable.value).startswith(
        f"key service for {uri} temporarily unavailable: get key: HTTP 503 ServiceUnavailable: "
        "The service is temporarily unavailable."
    )
    assert "gave up after" in str(unavailable.value)


def test_an_unreachable_vault_is_transient(azure_network):
    with pytest.raises(KeyServiceError) as unavailable:
        provider("azure-kv://nosuchvault.vault.azure.net/keys/orders").generate_data_key(CONTEXT)
    assert unavailable.value.transient is True
    assert "unreachable: " in str(unavailable.value) and "Name or service not known" in str(unavailable.value)


def test_malformed_wrapped_keys_are_invalid_without_a_request(azure_network):
    vault = azure_network.add_vault()
    vault.create_key("orders")
    p = provider(f"azure-kv://{vault.host}/keys/orders")
    _, wrapped = p.generate_data_key(CONTEXT)
    vault.requests.clear()
    bad_version = wrapped[:2] + b"../" + wrapped[5:]  # never let message bytes steer the request path
    for bad in (bad_version, wrapped[: 2 + wrapped[1]], b"\x09" + wrapped[1:]):
        with pytest.raises(InvalidEnvelope):
            p.unwrap_data_key(bad, CONTEXT)
    assert vault.requests == []


# -- configuration -----------------------------------------------------------------------------------


def test_production_clients_use_default_azure_credential_and_no_sdk_retries():
    from azure.identity import DefaultAzureCredential

    p = azure_kv.AzureKeyVaultProvider("azure-kv://myvault.vault.azure.net/keys/orders")
    assert isinstance(p._new_credential(), DefaultAzureCredential)
    assert p._client_options() == {"retry_total": 0, "connection_timeout": 2.0, "read_timeout": 5.0}


@pytest.mark.parametrize(
    "uri, expected",
    [
        (
            "azure-kv://myvault/keys/orders",
            "is not an Azure Key Vault key URI; expected azure-kv://myvault.vault.azure.net",
        ),
        ("azure-kv://myvault.vault.azure.net/secrets/orders", "is not an Azure Key Vault key URI"),
        ("azure-kv://myvault.vault.azure.net/keys/orders/", "is not an Azure Key Vault key URI"),
        ("azure-kv://myvault.vault.azure.net/keys/or_ders", "is not an Azure Key Vault key URI"),
        ("azure-kv://myvault.example.com/keys/orders", "'myvault.example.com' is not a Key Vault or Managed HSM host"),
    ],
)
def test_malformed_uris_name_the_setting(uri, expected):
    with pytest.raises(ValueError, match=r"^envelope_key_uri: ") as bad:
        provider_for_uri(uri)
    assert expected in str(bad.value)


def test_uris_of_vaults_hsms_and_versions_are_parsed():
    p = provider_for_uri("azure-kv://MyVault.vault.azure.net/keys/orders-2/0123456789abcdef0123456789abcdef")
    assert (p.vault_url, p.key_name, p.key_version) == (
        "https://myvault.vault.azure.net",
        "orders-2",
        "0123456789abcdef0123456789abcdef",
    )
    assert (
        provider_for_uri("azure-kv://myhsm.managedhsm.azure.net/keys/k").vault_url
        == "https://myhsm.managedhsm.azure.net"
    )


def test_missing_sdk_names_the_extra_to_install():
    code = (
        "import sys; sys.modules['azure.keyvault.keys'] = None\n"
        "from kombu_envelope.providers import provider_for_uri\n"
        "provider_for_uri('azure-kv://myvault.vault.azure.net/keys/orders')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "needs the 'azure' extra" in run.stderr and "pip install 'kombu-envelope[azure]'" in run.stderr


def test_codec_round_trip_through_the_vault(azure_network):
    vault = azure_network.add_vault()
    vault.create_key("orders")
    uri = f"azure-kv://{vault.host}/keys/orders"
    body = EnvelopeCodec([uri], context=CONTEXT, cache=DataKeyCache()).encode({"card": "4111"})
    assert EnvelopeCodec([], [uri], context=CONTEXT, cache=DataKeyCache()).decode(body) == {"card": "4111"}
    assert b"4111" not in body and base64.b64encode(b"4111") not in body
