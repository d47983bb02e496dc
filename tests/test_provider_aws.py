"""``aws-kms://`` against a real moto server over HTTP.

Where moto cannot answer as KMS does, and only there, something else stands in,
and each test says so:
- RSA-OAEP decryption of a locally wrapped data key (moto answers
  InvalidCiphertextException) and key states (moto ignores disabled keys and
  pending deletion): botocore's Stubber checks the exact call shapes;
- throttling and 5xx answers (moto never sends them): ``ScriptedFront``, an
  HTTP front that answers the next requests as KMS does when it fails and
  forwards the rest to moto, so the whole HTTP path, botocore's parsing and
  the absence of botocore's own retries are real.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from botocore.stub import Stubber
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from kombu_envelope.cache import DataKeyCache
from kombu_envelope.codec import EnvelopeCodec
from kombu_envelope.crypto import rsa_oaep_unwrap
from kombu_envelope.errors import ConfigurationError, InvalidEnvelope, KeyServiceError
from kombu_envelope.providers import aws_kms, key_fingerprint, provider_for_uri
from kombu_envelope.providers.retry import RetryPolicy

from . import servers

CONTEXT = {"app": "orders", "env": "test"}
VALUE = {"card": "4111-1111-1111-1111", "amounts": [1, 2, 3]}
QUICK = RetryPolicy(total=0.5, first_delay=0.01, max_delay=0.1)


def fresh_codec(uris, decrypt_uris=(), **options) -> EnvelopeCodec:
    """A codec with its own cache, so it unwraps through KMS like a worker that has never seen the key."""
    return EnvelopeCodec(uris, decrypt_uris, cache=DataKeyCache(), **options)


def provider(uri: str, policy: RetryPolicy = QUICK) -> aws_kms.AwsKmsProvider:
    p = provider_for_uri(uri)
    assert isinstance(p, aws_kms.AwsKmsProvider)
    p.retry_policy = policy
    return p


@pytest.fixture
def kms(moto_server, monkeypatch):
    """The session's moto server, with boto3's own environment pointing at it (as a deployment would)."""
    for name, value in moto_server.env.items():
        monkeypatch.setenv(name, value)
    return moto_server


def _rsa_key_pair():
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    der = private.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, der


# -- symmetric keys, envelope mode ----------------------------------------------------------------


def test_round_trip_by_arn_key_id_and_alias_with_one_data_key_call(kms):
    arn = kms.create_key()
    kms.kms_client().create_alias(AliasName="alias/orders-rt", TargetKeyId=arn)
    for uri in (f"aws-kms://{arn}", f"aws-kms://{arn.rsplit('/', 1)[1]}", "aws-kms://alias/orders-rt"):
        before = kms.kms_request_counts()
        producer = fresh_codec([uri], context=CONTEXT)
        messages = [producer.encode([VALUE, n]) for n in range(20)]
        worker = fresh_codec([uri], context=CONTEXT)
        assert [worker.decode(m) for m in messages] == [[VALUE, n] for n in range(20)]
        calls = kms.kms_request_counts() - before
        assert calls == {"GenerateDataKey": 1, "Decrypt": 1}, (uri, calls)
        assert worker.inspect(messages[0]).wrapped_keys[0].fingerprint == key_fingerprint(uri)


def test_encryption_context_is_enforced_by_kms(kms):
    uri = f"aws-kms://{kms.create_key()}"
    p = provider(uri)
    data_key, wrapped = p.generate_data_key(CONTEXT)
    assert p.unwrap_data_key(wrapped, CONTEXT) == data_key

    with pytest.raises(InvalidEnvelope) as wrong_context:
        p.unwrap_data_key(wrapped, {**CONTEXT, "env": "prod"})
    message = str(wrong_context.value)
    assert uri in message and "Decrypt" in message and "InvalidCiphertextException" in message
    assert "encryption context differs" in message

    with pytest.raises(InvalidEnvelope, match="InvalidCiphertextException"):
        p.unwrap_data_key(wrapped[:-4] + b"XXXX", CONTEXT)


def test_multi_wrap_wraps_under_each_key_and_either_one_decrypts(kms):
    first, second = f"aws-kms://{kms.create_key()}", f"aws-kms://{kms.create_key()}"
    before = kms.kms_request_counts()
    message = fresh_codec([first, second], context=CONTEXT).encode(VALUE)
    assert kms.kms_request_counts() - before == {"GenerateDataKey": 1, "Encrypt": 1}
    assert fresh_codec([first], context=CONTEXT).decode(message) == VALUE
    assert fresh_codec([], [second], context=CONTEXT).decode(message) == VALUE


def test_unknown_key_is_refused_at_once_naming_uri_and_reason(kms):
    p = provider("aws-kms://alias/no-such-key", RetryPolicy(total=30))
    started = time.monotonic()
    with pytest.raises(KeyServiceError) as refused:
        p.generate_data_key(CONTEXT)
    assert time.monotonic() - started < 2  # not retried
    assert refused.value.transient is False
    assert str(refused.value).startswith(
        "key service for aws-kms://alias/no-such-key refused the request: GenerateDataKey"
    )
    assert "NotFoundException" in str(refused.value)


@pytest.mark.parametrize(
    "code, message",
    [
        ("DisabledException", "arn:aws:kms:us-east-1:111122223333:key/k is disabled."),
        ("KMSInvalidStateException", "arn:aws:kms:us-east-1:111122223333:key/k is pending deletion."),
        ("InvalidKeyUsageException", "You cannot generate a data key with an asymmetric KMS key"),
    ],
)
def test_key_state_refusals_fail_at_once(monkeypatch, code, message):
    # moto does not refuse disabled or pending-deletion keys: Stubber gives KMS's answers.
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    p = provider("aws-kms://arn:aws:kms:us-east-1:111122223333:key/k", RetryPolicy(total=30))
    with Stubber(p.client) as stub:
        stub.add_client_error(
            "generate_data_key", service_error_code=code, service_message=message, http_status_code=400
        )
        with pytest.raises(KeyServiceError) as refused:
            p.generate_data_key(CONTEXT)
        stub.assert_no_pending_responses()
    assert refused.value.transient is False
    assert f"GenerateDataKey: {code}: {message}" in str(refused.value)


# -- IAM: encrypt-only producers, decrypt-only workers ----------------------------------------------


DOCS = Path(__file__).resolve().parent.parent / "docs" / "key-services.md"


def documented_actions(marker: str) -> list[str]:
    """The IAM actions of the policy that follows ``<!-- marker -->`` in docs/key-services.md."""
    match = re.search(rf"<!-- {re.escape(marker)} -->\s*```json\n(.*?)```", DOCS.read_text(), re.DOTALL)
    assert match, f"no policy marked {marker} in {DOCS}"
    return [action for statement in json.loads(match.group(1))["Statement"] for action in statement["Action"]]


class IamMotoServer(servers.MotoServer):
    """moto with IAM enforced after the first ``free`` requests."""

    free = 0

    def environment(self):
        return {**super().environment(), "INITIAL_NO_AUTH_ACTION_COUNT": str(self.free)}


def _user_with_actions(iam, name: str, actions: list[str]) -> dict[str, str]:
    # moto matches KMS actions but neither key ARNs nor conditions: Resource "*" here, the key's ARN in the docs.
    iam.create_user(UserName=name)
    document = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}
    iam.put_user_policy(UserName=name, PolicyName=name, PolicyDocument=json.dumps(document))
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}


def test_documented_iam_policies_producers_encrypt_only_workers_decrypt_only(monkeypatch):
    import boto3

    roles = {
        "producer": documented_actions("aws-policy-producer"),
        "worker": documented_actions("aws-policy-worker"),
        "rsa-producer": documented_actions("aws-policy-rsa-producer"),
    }
    server = IamMotoServer()
    server.free = 2 + 3 * len(roles)  # two CreateKey, then CreateUser, PutUserPolicy, CreateAccessKey per role
    with server:
        for name, value in server.env.items():
            monkeypatch.setenv(name, value)
        uri = f"aws-kms://{server.create_key()}"
        rsa_arn = server.create_key(KeySpec="RSA_2048", KeyUsage="ENCRYPT_DECRYPT")
        iam = boto3.client("iam", endpoint_url=server.endpoint_url, region_name="us-east-1")
        credentials = {role: _user_with_actions(iam, role, actions) for role, actions in roles.items()}

        def act_as(role: str) -> None:
            for name, value in credentials[role].items():
                monkeypatch.setenv(name, value)

        act_as("producer")
        message = fresh_codec([uri], context=CONTEXT).encode(VALUE)
        with pytest.raises(KeyServiceError) as producer_decrypts:
            fresh_codec([uri], context=CONTEXT).decode(message)

        act_as("worker")
        assert fresh_codec([uri], context=CONTEXT).decode(message) == VALUE
        with pytest.raises(KeyServiceError) as worker_encrypts:
            fresh_codec([uri], context=CONTEXT).encode(VALUE)

        act_as("rsa-producer")
        rsa_message = fresh_codec([f"aws-kms://{rsa_arn}?public_key=fetch"], context=CONTEXT).encode(VALUE)
        assert fresh_codec([], [f"aws-kms://{rsa_arn}"]).inspect(rsa_message).wrapped_keys[0].wrapped[0] == 2
        with pytest.raises(KeyServiceError) as rsa_producer_encrypts:
            fresh_codec([uri], context=CONTEXT).encode(VALUE)

    assert producer_decrypts.value.transient is False
    assert f"{uri} refused the request: Decrypt" in str(producer_decrypts.value)
    assert "not authorized to perform: kms:Decrypt" in str(producer_decrypts.value)
    assert "not authorized to perform: kms:GenerateDataKey" in str(worker_encrypts.value)
    assert "not authorized to perform: kms:GenerateDataKey" in str(rsa_producer_encrypts.value)


# -- asymmetric RSA keys ------------------------------------------------------------------------------


def test_rsa_public_key_is_fetched_once_and_producers_never_decrypt(kms):
    arn = kms.create_key(KeySpec="RSA_2048", KeyUsage="ENCRYPT_DECRYPT")
    before = kms.kms_request_counts()
    producer = fresh_codec([f"aws-kms://{arn}?public_key=fetch"], context=CONTEXT)
    p = provider(f"aws-kms://{arn}?public_key=fetch")
    wrapped = [p.generate_data_key(CONTEXT)[1] for _ in range(3)] + [p.wrap_data_key(b"k" * 32, CONTEXT)]
    producer.encode(VALUE)
    assert kms.kms_request_counts() - before == {"GetPublicKey": 2}  # one per provider (two providers here)
    assert all(len(w) == 1 + 256 and w[0] == 2 for w in wrapped)  # format byte + RSA-2048 ciphertext
    # The query is not part of the key's identity: workers may name the key without it.
    assert p.fingerprint == key_fingerprint(f"aws-kms://{arn}")


def test_fetching_a_public_key_of_a_symmetric_key_says_what_to_do(kms):
    uri = f"aws-kms://{kms.create_key()}?public_key=fetch"
    with pytest.raises(KeyServiceError) as refused:
        provider(uri).generate_data_key(CONTEXT)
    assert refused.value.transient is False
    assert "cannot encrypt with RSAES_OAEP_SHA_256" in str(refused.value)
    assert "drop ?public_key= for a symmetric key" in str(refused.value)


def test_rsa_call_shapes_with_stubber(monkeypatch):
    # moto cannot decrypt an RSA-OAEP ciphertext made outside it, so botocore's Stubber checks the
    # exact KMS calls, and a private key made here plays KMS's part.
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    arn = "arn:aws:kms:us-east-1:111122223333:key/rsa-test"
    private, der = _rsa_key_pair()

    producer = provider(f"aws-kms://{arn}?public_key=fetch")
    with Stubber(producer.client) as stub:
        stub.add_response(
            "get_public_key",
            {
                "KeyId": arn,
                "PublicKey": der,
                "KeySpec": "RSA_2048",
                "KeyUsage": "ENCRYPT_DECRYPT",
                "EncryptionAlgorithms": ["RSAES_OAEP_SHA_1", "RSAES_OAEP_SHA_256"],
            },
            {"KeyId": arn},
        )
        pairs = [producer.generate_data_key(CONTEXT) for _ in range(3)]  # one GetPublicKey, then cached
        stub.assert_no_pending_responses()
    for data_key, wrapped in pairs:
        assert wrapped[0] == 2 and rsa_oaep_unwrap(private, wrapped[1:]) == data_key  # OAEP SHA-256 / MGF1 SHA-256

    worker = provider(f"aws-kms://{arn}")  # workers need no parameter: the format byte says RSA
    data_key, wrapped = pairs[0]
    with Stubber(worker.client) as stub:
        stub.add_response(
            "decrypt",
            {"KeyId": arn, "Plaintext": data_key, "EncryptionAlgorithm": "RSAES_OAEP_SHA_256"},
            {"CiphertextBlob": wrapped[1:], "KeyId": arn, "EncryptionAlgorithm": "RSAES_OAEP_SHA_256"},
        )
        assert worker.unwrap_data_key(wrapped, CONTEXT) == data_key
        stub.assert_no_pending_responses()


def test_rsa_with_a_public_key_file_needs_no_kms_to_encrypt(tmp_path, monkeypatch):
    # Nothing listens at the endpoint: encoding works because the producer never calls KMS.
    # Decoding goes through a Stubber (moto cannot RSA-decrypt), with the codec end to end.
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", f"http://127.0.0.1:{servers.find_free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    arn = "arn:aws:kms:us-east-1:111122223333:key/rsa-file"
    private, _ = _rsa_key_pair()
    pem = tmp_path / "orders.pem"
    pem.write_bytes(
        private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )

    message = fresh_codec([f"aws-kms://{arn}?public_key={pem}"], context=CONTEXT).encode(VALUE)

    worker = fresh_codec([], [f"aws-kms://{arn}"], context=CONTEXT)
    wrapped = worker.inspect(message).wrapped_keys[0].wrapped
    client = aws_kms.AwsKmsProvider(f"aws-kms://{arn}")._create_client()
    monkeypatch.setattr(aws_kms.AwsKmsProvider, "_create_client", lambda self: client)
    with Stubber(client) as stub:
        stub.add_response(
            "decrypt",
            {
                "KeyId": arn,
                "Plaintext": rsa_oaep_unwrap(private, wrapped[1:]),
                "EncryptionAlgorithm": "RSAES_OAEP_SHA_256",
            },
            {"CiphertextBlob": wrapped[1:], "KeyId": arn, "EncryptionAlgorithm": "RSAES_OAEP_SHA_256"},
        )
        assert worker.decode(message) == VALUE
        stub.assert_no_pending_responses()


# -- direct mode ---------------------------------------------------------------------------------------


def test_direct_mode_round_trip_and_the_4096_byte_limit(kms):
    uri = f"aws-kms://{kms.create_key()}"
    before = kms.kms_request_counts()
    message = fresh_codec([uri], context=CONTEXT, mode="direct").encode(VALUE)
    assert fresh_codec([uri], context=CONTEXT, mode="direct").decode(message) == VALUE
    assert kms.kms_request_counts() - before == {"Encrypt": 1, "Decrypt": 1}

    with pytest.raises(ConfigurationError) as too_big:
        fresh_codec([uri], context=CONTEXT, mode="direct").encode("x" * 4096)  # 4098 bytes once serialized
    assert f"over the 4096-byte limit of direct mode for {uri}" in str(too_big.value)
    assert "use envelope_mode='envelope'" in str(too_big.value)

    with pytest.raises(ConfigurationError, match="direct' needs a symmetric key"):
        fresh_codec([f"{uri}?public_key=fetch"], mode="direct").encode(VALUE)


# -- transient failures: retried within a bounded time ---------------------------------------------------


class ScriptedFront:
    """An HTTP front for moto: answers the next requests from ``script`` as KMS does when it throttles or
    fails, forwards every other request to moto, and records each request's KMS operation."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.script: list[tuple[int, str, str]] = []  # (HTTP status, KMS error type, message)
        self.operations: list[str] = []
        front = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                front.operations.append(self.headers.get("X-Amz-Target", "").rpartition(".")[2])
                if front.script:
                    status, error_type, message = front.script.pop(0)
                    self._answer(
                        status,
                        "application/x-amz-json-1.1",
                        json.dumps({"__type": error_type, "message": message}).encode(),
                    )
                    return
                request = urllib.request.Request(
                    front.upstream + self.path,
                    data=body,
                    method="POST",
                    headers={k: v for k, v in self.headers.items() if k.lower() != "host"},
                )
                try:
                    with urllib.request.urlopen(request, timeout=10) as answer:
                        status, content_type, payload = answer.status, answer.headers["Content-Type"], answer.read()
                except urllib.error.HTTPError as error:
                    status, content_type, payload = error.code, error.headers["Content-Type"], error.read()
                self._answer(status, content_type, payload)

            def _answer(self, status: int, content_type: str, payload: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((servers.HOST, 0), Handler)
        self.url = f"http://{servers.HOST}:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> ScriptedFront:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_throttling_and_5xx_are_retried_by_us_alone_then_succeed(kms, monkeypatch):
    uri = f"aws-kms://{kms.create_key()}"
    with ScriptedFront(kms.endpoint_url) as front:
        monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", front.url)
        front.script = [(400, "ThrottlingException", "Rate exceeded"), (500, "KMSInternalException", "internal")]
        p = provider(uri, RetryPolicy(total=5, first_delay=0.01))
        data_key, wrapped = p.generate_data_key(CONTEXT)
        # Exactly three requests: botocore's own retries are off, ours made the two extra ones.
        assert front.operations == ["GenerateDataKey"] * 3
        assert p.unwrap_data_key(wrapped, CONTEXT) == data_key


def test_transient_failures_give_up_within_the_bound_as_transient_errors(kms, monkeypatch):
    uri = f"aws-kms://{kms.create_key()}"
    with ScriptedFront(kms.endpoint_url) as front:
        monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", front.url)
        front.script = [(400, "ThrottlingException", "Rate exceeded")] * 1000
        started = time.monotonic()
        with pytest.raises(KeyServiceError) as unavailable:
            provider(uri, RetryPolicy(total=0.6, first_delay=0.02, max_delay=0.2)).generate_data_key(CONTEXT)
        elapsed = time.monotonic() - started
    # Bounded: the policy allows 0.6 s; the slack is for a loaded CI machine, not for the policy.
    assert 0.1 < elapsed < 3.0
    assert unavailable.value.transient is True
    text = str(unavailable.value)
    assert text.startswith(
        f"key service for {uri} temporarily unavailable: GenerateDataKey: ThrottlingException: Rate exceeded"
    )
    assert "gave up after" in text and len(front.operations) >= 2  # retried, then gave up


def test_refused_connection_is_transient(monkeypatch):
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", f"http://127.0.0.1:{servers.find_free_port()}")
    with pytest.raises(KeyServiceError) as unavailable:
        provider("aws-kms://alias/orders").generate_data_key(CONTEXT)
    assert unavailable.value.transient is True
    assert "Could not connect to the endpoint URL" in str(unavailable.value)


def test_timeouts_are_retried_until_the_service_answers_again(private_moto_server, monkeypatch):
    for name, value in private_moto_server.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(aws_kms, "READ_TIMEOUT", 0.3)
    uri = f"aws-kms://{private_moto_server.create_key()}"

    private_moto_server.pause()
    try:
        with pytest.raises(KeyServiceError) as unavailable:
            provider(uri, RetryPolicy(total=0.5, first_delay=0.01)).generate_data_key(CONTEXT)
        assert unavailable.value.transient is True and "Read timeout" in str(unavailable.value)

        threading.Timer(0.8, private_moto_server.resume).start()
        data_key, wrapped = provider(uri, RetryPolicy(total=10, first_delay=0.05)).generate_data_key(CONTEXT)
    finally:
        private_moto_server.resume()
    assert provider(uri).unwrap_data_key(wrapped, CONTEXT) == data_key


# -- configuration --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "uri, expected",
    [
        ("aws-kms://?public_key=fetch", "names no key"),
        ("aws-kms://arn:aws:s3:::bucket", "is not a KMS key or alias ARN"),
        ("aws-kms://alias/a?region=eu-west-1", "unknown parameter 'region'"),
        ("aws-kms://alias/a?public_key=keys/a.pem", "must be 'fetch'"),
    ],
)
def test_malformed_uris_name_the_setting(uri, expected):
    with pytest.raises(ConfigurationError) as bad:
        provider_for_uri(uri, "envelope_decrypt_key_uris")
    assert str(bad.value).startswith("envelope_decrypt_key_uris: ") and expected in str(bad.value)


def test_a_key_arn_chooses_its_region(monkeypatch):
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    assert provider("aws-kms://arn:aws:kms:eu-west-1:111122223333:key/k").client.meta.region_name == "eu-west-1"
    assert provider("aws-kms://alias/orders").client.meta.region_name == "us-east-1"


def test_missing_boto3_names_the_extra_to_install():
    # A fresh interpreter in which importing boto3 fails, as it does when the extra is not installed.
    code = (
        "import sys; sys.modules['boto3'] = None\n"
        "from kombu_envelope.providers import provider_for_uri\n"
        "provider_for_uri('aws-kms://alias/orders')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    assert "ConfigurationError: envelope_key_uri: 'aws-kms://alias/orders' needs the 'aws' extra" in run.stderr
    assert "pip install 'kombu-envelope[aws]'" in run.stderr


def test_missing_region_says_how_to_set_it(monkeypatch):
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    with pytest.raises(KeyServiceError) as refused:
        provider("aws-kms://alias/orders").generate_data_key(CONTEXT)
    assert refused.value.transient is False and "set AWS_REGION" in str(refused.value)
