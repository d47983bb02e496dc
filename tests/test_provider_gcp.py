"""``gcp-kms://`` against the real google-cloud-kms SDK and REST transport, talking to a fake Cloud KMS.

No Cloud KMS emulator can run here. The SDK's client, its REST transport
(requests, google-auth's AuthorizedSession) and real HTTP on 127.0.0.1 run
unchanged; the service is ``FakeCloudKms`` (tests/fake_gcp_kms.py), which
holds real AES and RSA keys, speaks the v1 REST JSON and checks CRC32C like
Cloud KMS. These tests assert the exact requests the SDK sends. They were not
run against the live service.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from kombu_envelope.cache import DataKeyCache
from kombu_envelope.codec import EnvelopeCodec
from kombu_envelope.crypto import rsa_oaep_unwrap
from kombu_envelope.errors import ConfigurationError, InvalidEnvelope, KeyServiceError
from kombu_envelope.providers import gcp_kms, provider_for_uri
from kombu_envelope.providers.context_binding import bind_context
from kombu_envelope.providers.retry import RetryPolicy
from kombu_envelope.wire import canonical_context

from . import fake_gcp_kms
from .fake_gcp_kms import ALGORITHM, FakeCloudKms, b64, crc32c, key_name

CONTEXT = {"app": "orders", "env": "test"}
QUICK = RetryPolicy(total=0.5, first_delay=0.01, max_delay=0.1)
QUERY = {"$alt": "json;enum-encoding=int"}


@pytest.fixture(scope="module")
def cloud_kms_server() -> Iterator[FakeCloudKms]:
    service = FakeCloudKms()
    service.start()
    yield service
    service.stop()


@pytest.fixture
def cloud_kms(cloud_kms_server: FakeCloudKms, monkeypatch: pytest.MonkeyPatch) -> FakeCloudKms:
    return fake_gcp_kms.install(cloud_kms_server, monkeypatch)


def provider(uri: str, policy: RetryPolicy = QUICK) -> gcp_kms.GcpKmsProvider:
    """A provider as a process builds it from a URI (here: the FakeGcpProvider subclass, see cloud_kms)."""
    p = provider_for_uri(uri)
    assert isinstance(p, gcp_kms.GcpKmsProvider)
    p.retry_policy = policy
    return p


# -- symmetric keys ---------------------------------------------------------------------------------


def test_symmetric_wrap_and_unwrap_send_encrypt_and_decrypt_with_context_and_checksums(cloud_kms):
    name = cloud_kms.create_symmetric_key(key_name())
    p = provider(f"gcp-kms://{name}")
    data_key, wrapped = p.generate_data_key(CONTEXT)
    assert p.unwrap_data_key(wrapped, CONTEXT) == data_key

    aad = canonical_context(CONTEXT)
    encrypt, decrypt = cloud_kms.requests
    assert (encrypt.method, encrypt.path, encrypt.query) == ("POST", f"/v1/{name}:encrypt", QUERY)
    assert encrypt.body == {
        "plaintext": b64(data_key),
        "plaintextCrc32c": crc32c(data_key),
        "additionalAuthenticatedData": b64(aad),
        "additionalAuthenticatedDataCrc32c": crc32c(aad),
    }
    assert wrapped[0] == 1  # wrapped by the service; the rest is Cloud KMS's ciphertext as is
    assert (decrypt.method, decrypt.path, decrypt.query) == ("POST", f"/v1/{name}:decrypt", QUERY)
    assert decrypt.body == {
        "ciphertext": b64(wrapped[1:]),
        "ciphertextCrc32c": crc32c(wrapped[1:]),
        "additionalAuthenticatedData": b64(aad),
        "additionalAuthenticatedDataCrc32c": crc32c(aad),
    }
    for request in cloud_kms.requests:
        assert request.authorization == f"Bearer {cloud_kms.token}"
        assert request.request_params == f"name={name}"  # the routing header


def test_without_a_context_no_associated_data_is_sent(cloud_kms):
    name = cloud_kms.create_symmetric_key(key_name())
    p = provider(f"gcp-kms://{name}")
    data_key, wrapped = p.generate_data_key({})
    assert p.unwrap_data_key(wrapped, {}) == data_key
    assert [sorted(r.body) for r in cloud_kms.requests] == [
        ["plaintext", "plaintextCrc32c"],
        ["ciphertext", "ciphertextCrc32c"],
    ]


def test_cloud_kms_itself_refuses_another_context(cloud_kms):
    name = cloud_kms.create_symmetric_key(key_name())
    uri = f"gcp-kms://{name}"
    _, wrapped = provider(uri).generate_data_key(CONTEXT)
    with pytest.raises(InvalidEnvelope) as refused:
        provider(uri).unwrap_data_key(wrapped, {"app": "billing"})
    assert str(refused.value) == (
        f"{uri} refused to Decrypt: HTTP 400 INVALID_ARGUMENT: Decryption failed: the ciphertext is invalid."
    )
    assert cloud_kms.requests[-1].body["additionalAuthenticatedData"] == b64(b'{"app":"billing"}')


def test_key_rotation_new_primary_version_wraps_and_old_ciphertexts_still_unwrap(cloud_kms):
    name = cloud_kms.create_symmetric_key(key_name())
    p = provider(f"gcp-kms://{name}")
    old_key, old = p.generate_data_key(CONTEXT)
    cloud_kms.create_symmetric_key(name)  # a new primary version, as rotation makes
    new_key, new = p.generate_data_key(CONTEXT)
    assert old[1:5] != new[1:5]  # the fake's ciphertexts start with their version number, as Cloud KMS's name theirs
    assert (p.unwrap_data_key(old, CONTEXT), p.unwrap_data_key(new, CONTEXT)) == (old_key, new_key)


def test_direct_mode_encrypts_payloads_up_to_64_kib_with_cloud_kms(cloud_kms):
    name = cloud_kms.create_symmetric_key(key_name())
    uri = f"gcp-kms://{name}"
    codec = EnvelopeCodec([uri], context=CONTEXT, mode="direct", cache=DataKeyCache())
    body = codec.encode({"card": "4111"})
    assert EnvelopeCodec([], [uri], context=CONTEXT, mode="direct", cache=DataKeyCache()).decode(body) == {
        "card": "4111"
    }
    assert json.loads(base64.b64decode(cloud_kms.requests[0].body["plaintext"])) == {"card": "4111"}
    with pytest.raises(ConfigurationError, match="over the 65536-byte limit of direct mode for gcp-kms://"):
        codec.encode("x" * 70000)


# -- asymmetric decrypt keys ---------------------------------------------------------------------------


def test_rsa_producer_reads_the_public_key_once_and_wraps_locally_worker_only_decrypts(cloud_kms):
    version_name = cloud_kms.create_asymmetric_version(key_name("rsa"), ALGORITHM.RSA_DECRYPT_OAEP_3072_SHA256)
    uri = f"gcp-kms://{version_name}"
    cloud_kms.denied = {"encrypt", "decrypt", "asymmetricDecrypt"}  # a producer: roles/cloudkms.publicKeyViewer
    producer = provider(uri)
    data_key, wrapped = producer.generate_data_key(CONTEXT)
    producer.wrap_data_key(data_key, CONTEXT)
    assert [(r.method, r.path, r.query, r.body) for r in cloud_kms.requests] == [
        ("GET", f"/v1/{version_name}/publicKey", QUERY, None)
    ]
    assert wrapped[0] == 2 and len(wrapped) == 1 + 384
    private_key = cloud_kms.version(version_name).secret
    assert rsa_oaep_unwrap(private_key, wrapped[1:]) == bind_context(data_key, CONTEXT)

    cloud_kms.denied = {"encrypt", "decrypt", "publicKey"}  # a worker: roles/cloudkms.cryptoKeyDecrypter
    cloud_kms.requests.clear()
    assert provider(uri).unwrap_data_key(wrapped, CONTEXT) == data_key
    (request,) = cloud_kms.requests
    assert (request.method, request.path) == ("POST", f"/v1/{version_name}:asymmetricDecrypt")
    assert request.body == {"ciphertext": b64(wrapped[1:]), "ciphertextCrc32c": crc32c(wrapped[1:])}
    with pytest.raises(InvalidEnvelope, match="bound to another encryption context"):
        provider(uri).unwrap_data_key(wrapped, {})


@pytest.mark.parametrize("algorithm", [ALGORITHM.RSA_DECRYPT_OAEP_2048_SHA1, ALGORITHM.RSA_DECRYPT_OAEP_3072_SHA1])
def test_rsa_versions_with_other_oaep_hashes_are_refused_naming_the_algorithm(cloud_kms, algorithm):
    uri = f"gcp-kms://{cloud_kms.create_asymmetric_version(key_name('rsa'), algorithm)}"
    with pytest.raises(KeyServiceError) as refused:
        provider(uri).generate_data_key(CONTEXT)
    assert refused.value.transient is False
    assert str(refused.value).startswith(
        f"key service for {uri} refused the request: GetPublicKey: the key version is {algorithm.name}, and "
        "kombu-envelope wraps with RSA-OAEP SHA-256"
    )


def test_a_symmetric_key_named_with_a_version_is_refused_with_the_services_reason(cloud_kms):
    name = cloud_kms.create_symmetric_key(key_name())
    uri = f"gcp-kms://{name}/cryptoKeyVersions/1"
    with pytest.raises(
        KeyServiceError, match="GetPublicKey: HTTP 400 FAILED_PRECONDITION: .* has purpose ENCRYPT_DECRYPT"
    ):
        provider(uri).generate_data_key(CONTEXT)
    with pytest.raises(ConfigurationError, match="envelope_mode='direct' needs a symmetric key"):
        provider(uri).encrypt(b"x", CONTEXT)


def test_a_wrapped_key_of_the_other_key_purpose_is_invalid_without_a_request(cloud_kms):
    name = cloud_kms.create_symmetric_key(key_name())
    _, wrapped = provider(f"gcp-kms://{name}").generate_data_key({})
    version_name = cloud_kms.create_asymmetric_version(key_name("rsa"))
    cloud_kms.requests.clear()
    with pytest.raises(InvalidEnvelope, match="not in the format of this key's purpose"):
        provider(f"gcp-kms://{version_name}").unwrap_data_key(wrapped, {})
    assert cloud_kms.requests == []


# -- integrity, refusals, retries, outages ----------------------------------------------------------------


@pytest.mark.parametrize(
    "purpose, damage, expected",
    [
        ("symmetric", "corrupt", ["encrypt", "encrypt", "decrypt", "decrypt"]),
        ("symmetric", "unverified", ["encrypt", "encrypt", "decrypt"]),  # Decrypt answers carry no verified_* flags
        ("asymmetric", "corrupt", ["publicKey", "publicKey", "asymmetricDecrypt", "asymmetricDecrypt"]),
        ("asymmetric", "unverified", ["publicKey", "asymmetricDecrypt", "asymmetricDecrypt"]),  # nor GetPublicKey's
    ],
)
def test_checksum_mismatches_are_retried_as_transient(cloud_kms, purpose, damage, expected):
    if purpose == "symmetric":
        uri = f"gcp-kms://{cloud_kms.create_symmetric_key(key_name())}"
    else:
        uri = f"gcp-kms://{cloud_kms.create_asymmetric_version(key_name('rsa'))}"
    p = provider(uri, RetryPolicy(total=5, first_delay=0.01))
    cloud_kms.failures = [damage]  # the first answer (Encrypt, or GetPublicKey) is damaged
    data_key, wrapped = p.generate_data_key(CONTEXT)
    cloud_kms.failures = [damage]  # and the first answer to Decrypt / AsymmetricDecrypt
    assert p.unwrap_data_key(wrapped, CONTEXT) == data_key
    assert [re.split(r"[:/]", r.path)[-1] for r in cloud_kms.requests] == expected


def test_checksum_mismatch_that_persists_gives_up_as_transient(cloud_kms):
    uri = f"gcp-kms://{cloud_kms.create_symmetric_key(key_name())}"
    cloud_kms.failures = ["corrupt"] * 1000
    with pytest.raises(KeyServiceError) as unavailable:
        provider(uri).generate_data_key(CONTEXT)
    assert unavailable.value.transient is True
    assert "Encrypt: CRC32C mismatch: the answer arrived damaged (gave up after" in str(unavailable.value)


def _refuse(cloud_kms: FakeCloudKms, refusal: str, name: str) -> None:
    if refusal == "denied":
        cloud_kms.denied = {"decrypt"}
    elif refusal == "disabled":
        cloud_kms.keys[name].versions[1].state = "DISABLED"
    elif refusal == "deleted":
        del cloud_kms.keys[name]


@pytest.mark.parametrize(
    "refusal, expected",
    [
        (
            "denied",
            "Decrypt: HTTP 403 PERMISSION_DENIED: Permission 'cloudkms.cryptoKeyVersions.useToDecrypt' denied on "
            "resource '{name}' (or it may not exist).",
        ),
        (
            "disabled",
            "Decrypt: HTTP 400 FAILED_PRECONDITION: {name}/cryptoKeyVersions/1 is not enabled, "
            "current state is: DISABLED.",
        ),
        ("deleted", "Decrypt: HTTP 404 NOT_FOUND: CryptoKey {name} not found."),
    ],
)
def test_refusals_fail_at_once_naming_the_key_uri_and_the_services_reason(cloud_kms, refusal, expected):
    name = cloud_kms.create_symmetric_key(key_name())
    uri = f"gcp-kms://{name}"
    _, wrapped = provider(uri).generate_data_key(CONTEXT)
    _refuse(cloud_kms, refusal, name)
    cloud_kms.requests.clear()
    with pytest.raises(KeyServiceError) as refused:
        provider(uri, RetryPolicy(total=5)).unwrap_data_key(wrapped, CONTEXT)
    assert refused.value.transient is False
    assert str(refused.value) == f"key service for {uri} refused the request: " + expected.format(name=name)
    assert len(cloud_kms.requests) == 1  # not retried


def test_throttling_and_5xx_are_retried_by_us_alone_then_succeed(cloud_kms):
    uri = f"gcp-kms://{cloud_kms.create_symmetric_key(key_name())}"
    cloud_kms.failures = [429, 503, 500]
    data_key, wrapped = provider(uri, RetryPolicy(total=5, first_delay=0.01)).generate_data_key(CONTEXT)
    # Four Encrypt requests: the SDK's own retries are off (retry=None), ours made the three extra ones.
    assert [r.path.rsplit(":", 1)[1] for r in cloud_kms.requests] == ["encrypt"] * 4
    assert provider(uri).unwrap_data_key(wrapped, CONTEXT) == data_key


def test_transient_failures_give_up_within_the_bound_as_transient_errors(cloud_kms):
    uri = f"gcp-kms://{cloud_kms.create_symmetric_key(key_name())}"
    cloud_kms.failures = [503] * 1000
    started = time.monotonic()
    with pytest.raises(KeyServiceError) as unavailable:
        provider(uri, RetryPolicy(total=0.6, first_delay=0.02, max_delay=0.2)).generate_data_key(CONTEXT)
    assert 0.1 < time.monotonic() - started < 1.5
    assert unavailable.value.transient is True
    assert str(unavailable.value).startswith(
        f"key service for {uri} temporarily unavailable: Encrypt: HTTP 503 UNAVAILABLE: "
        "The service is currently unavailable."
    )


def test_an_unreachable_service_is_transient(monkeypatch):
    stopped = FakeCloudKms()
    stopped.start()
    stopped.stop()  # its port now refuses connections
    fake_gcp_kms.install(stopped, monkeypatch)
    with pytest.raises(KeyServiceError) as unavailable:
        provider(f"gcp-kms://{key_name()}").generate_data_key(CONTEXT)
    assert unavailable.value.transient is True
    assert "Encrypt: unreachable: " in str(unavailable.value) and "Connection refused" in str(unavailable.value)


# -- configuration ----------------------------------------------------------------------------------------


def test_production_client_uses_the_rest_transport_and_application_default_credentials(tmp_path, monkeypatch):
    # A service-account key made now (never stored); creating the client makes no request.
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    account = {
        "type": "service_account",
        "project_id": "kombu-test",
        "private_key_id": "0" * 40,
        "private_key": pem.decode(),
        "client_email": "celery@kombu-test.iam.gserviceaccount.com",
        "client_id": "1",
        "token_uri": "https://oauth2.googleapis.com/token",
    }
    path = tmp_path / "sa.json"
    path.write_text(json.dumps(account))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(path))
    assert gcp_kms.GcpKmsProvider(f"gcp-kms://{key_name()}").client.transport.kind == "rest"


def test_missing_credentials_are_refused_saying_where_they_come_from(tmp_path, monkeypatch):
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path))  # no gcloud configuration
    monkeypatch.setenv("GCE_METADATA_IP", "127.0.0.1:9")  # no metadata server: its probe is refused
    p = gcp_kms.GcpKmsProvider(f"gcp-kms://{key_name()}")
    p.retry_policy = QUICK
    with pytest.raises(KeyServiceError) as refused:
        p.generate_data_key(CONTEXT)
    assert refused.value.transient is False
    assert "Encrypt: no usable Google credentials: " in str(refused.value)
    assert "GOOGLE_APPLICATION_CREDENTIALS" in str(refused.value)


@pytest.mark.parametrize(
    "uri",
    [
        "gcp-kms://projects/p/locations/global/keyRings/r",
        "gcp-kms://projects/p/locations/global/keyRings/r/cryptoKeys/k/",
        "gcp-kms://projects/p/locations/global/keyRings/r/cryptoKeys/k/cryptoKeyVersions/0",
        "gcp-kms://projects/p/locations/global/keyRings/r/cryptoKeys/k:encrypt",
        "gcp-kms://locations/global/keyRings/r/cryptoKeys/k",
    ],
)
def test_malformed_uris_name_the_setting(uri):
    with pytest.raises(
        ValueError, match=r"^envelope_key_uri: .* is not a Cloud KMS key URI; expected gcp-kms://projects/"
    ):
        provider_for_uri(uri)


def test_missing_sdk_names_the_extra_to_install():
    code = (
        "import sys; sys.modules['google.cloud.kms_v1'] = None\n"
        "from kombu_envelope.providers import provider_for_uri\n"
        "provider_for_uri('gcp-kms://projects/p/locations/global/keyRings/r/cryptoKeys/k')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "needs the 'gcp' extra" in run.stderr and "pip install 'kombu-envelope[gcp]'" in run.stderr
