"""One conformance suite for every key provider: what any key URI must guarantee.

Each test runs against every kind of key the providers support here:

- ``local``: a key file;
- ``aws-kms``: a symmetric key in moto's KMS server (real HTTP);
- ``vault``, ``vault-rsa``: aes256-gcm96 and rsa-2048 Transit keys in an OpenBao dev server (real HTTP);
- ``azure-kv``, ``azure-kv-hsm``: an RSA key in Key Vault and an AES key in a Managed HSM, through the
  real azure-keyvault-keys SDK over a fake network (tests/fake_azure_kv.py: no emulator exists);
- ``gcp-kms``, ``gcp-kms-rsa``: a symmetric key and an RSA_DECRYPT_OAEP_2048_SHA256 key version, through
  the real google-cloud-kms SDK to a fake Cloud KMS on 127.0.0.1 (tests/fake_gcp_kms.py: no emulator exists).

AWS RSA keys are missing: moto cannot decrypt RSA-OAEP (test_provider_aws.py covers their call shapes).

The guarantees: a wrap/unwrap round trip (with and without a context), a wrapped key refused under
another encryption context (by the provider where it binds the context to the wrapped key, and for
every kind by the message's authentication tag), tampered or truncated wrapped keys refused as
permanent failures, rotation through ``envelope_decrypt_key_uris``, multi-wrap (any one key
decrypts), errors that name the key URI, and a client of its own in a forked child.
"""

from __future__ import annotations

import os
import secrets
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from kombu_envelope import wire
from kombu_envelope.cache import DataKeyCache
from kombu_envelope.codec import EnvelopeCodec
from kombu_envelope.errors import ConfigurationError, InvalidEnvelope, KeyServiceError, UnknownKey, is_transient
from kombu_envelope.providers import KeyProvider, provider_for_uri
from kombu_envelope.providers.local import write_key_file
from kombu_envelope.providers.retry import RetryPolicy

from . import fake_azure_kv, fake_gcp_kms
from .fake_gcp_kms import FakeCloudKms, key_name

CONTEXT = {"app": "orders", "env": "test"}
VALUE = {"card": "4111-1111-1111-1111", "amounts": [1, 2, 3]}
QUICK = RetryPolicy(total=0.5, first_delay=0.01, max_delay=0.1)

ALL_KINDS = ["local", "aws-kms", "vault", "vault-rsa", "azure-kv", "azure-kv-hsm", "gcp-kms", "gcp-kms-rsa"]
# Transit RSA decryption takes no associated data and the vault provider binds none to the wrapped
# key: for it the context is enforced by the message's AES-GCM tag only (see the test below).
BINDING_KINDS = [k for k in ALL_KINDS if k != "vault-rsa"]


@dataclass
class Kind:
    """One kind of key: how to make a fresh key URI, a URI naming no key, and what its errors show of a URI."""

    name: str
    new_key: Callable[[], str]
    missing_key: Callable[[], str]
    shown_in_errors: Callable[[str], str] = lambda uri: uri


def _unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


@pytest.fixture(scope="module")
def cloud_kms_server() -> Iterator[FakeCloudKms]:
    service = FakeCloudKms()
    service.start()
    yield service
    service.stop()


@pytest.fixture
def kind(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Kind:
    name = request.param
    if name == "local":

        def new_local() -> str:
            path = tmp_path / f"{_unique('key')}.key"
            write_key_file(str(path))
            return f"local://{path}"

        return Kind(
            name, new_local, lambda: f"local://{tmp_path}/{_unique('missing')}.key", lambda uri: uri[len("local://") :]
        )
    if name == "aws-kms":
        moto = request.getfixturevalue("moto_server")
        for variable, value in moto.env.items():
            monkeypatch.setenv(variable, value)
        return Kind(name, lambda: f"aws-kms://{moto.create_key()}", lambda: f"aws-kms://alias/{_unique('missing')}")
    if name in ("vault", "vault-rsa"):
        bao = request.getfixturevalue("bao_server")
        for variable, value in bao.env.items():
            monkeypatch.setenv(variable, value)
        key_type, query = ("aes256-gcm96", "") if name == "vault" else ("rsa-2048", "?public_key=fetch")

        def new_transit() -> str:
            key = _unique("orders")
            bao.create_key(key, type=key_type)
            return f"vault://transit/keys/{key}{query}"

        return Kind(name, new_transit, lambda: f"vault://transit/keys/{_unique('missing')}{query}")
    if name in ("azure-kv", "azure-kv-hsm"):
        network = fake_azure_kv.install(monkeypatch)
        hsm = name == "azure-kv-hsm"
        vault = network.add_vault(hsm=hsm)

        def new_azure() -> str:
            key = _unique("orders")
            vault.create_key(key, kty="oct-HSM" if hsm else "RSA", size=256 if hsm else 2048)
            return f"azure-kv://{vault.host}/keys/{key}"

        return Kind(name, new_azure, lambda: f"azure-kv://{vault.host}/keys/{_unique('missing')}")
    service = fake_gcp_kms.install(request.getfixturevalue("cloud_kms_server"), monkeypatch)
    if name == "gcp-kms":
        return Kind(
            name, lambda: f"gcp-kms://{service.create_symmetric_key(key_name())}", lambda: f"gcp-kms://{key_name()}"
        )
    return Kind(
        name,
        lambda: f"gcp-kms://{service.create_asymmetric_version(key_name('rsa'))}",
        lambda: f"gcp-kms://{key_name('rsa')}/cryptoKeyVersions/1",
    )


def provider(uri: str) -> KeyProvider:
    """A provider as a new process builds it from a key URI, with quick retries."""
    p = provider_for_uri(uri)
    if hasattr(p, "retry_policy"):
        p.retry_policy = QUICK  # type: ignore[attr-defined]
    return p


def codec(
    key_uris: Sequence[str], decrypt_key_uris: Sequence[str] = (), context: dict[str, str] = CONTEXT
) -> EnvelopeCodec:
    """A codec with a cache of its own: it unwraps through the key service like a worker new to the key."""
    return EnvelopeCodec(key_uris, decrypt_key_uris, context=context, cache=DataKeyCache())


def all_kinds(kinds: list[str] = ALL_KINDS) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("kind", kinds, indirect=True)


# -- round trip ----------------------------------------------------------------------------------------


@all_kinds()
@pytest.mark.parametrize("context", [CONTEXT, {}], ids=["context", "no-context"])
def test_wrap_unwrap_round_trip(kind, context):
    uri = kind.new_key()
    data_key, wrapped = provider(uri).generate_data_key(context)
    assert len(data_key) == 32 and data_key not in wrapped
    assert provider(uri).unwrap_data_key(wrapped, context) == data_key  # another process: a fresh provider

    other = os.urandom(32)  # what multi-wrap asks of every key after the first
    assert provider(uri).unwrap_data_key(provider(uri).wrap_data_key(other, context), context) == other


@all_kinds()
def test_codec_round_trip(kind):
    uri = kind.new_key()
    body = codec([uri]).encode(VALUE)
    assert codec([], [uri]).decode(body) == VALUE
    (entry,) = wire.parse_header(body).wrapped_keys
    assert entry.fingerprint == provider(uri).fingerprint


# -- encryption context ----------------------------------------------------------------------------------


@all_kinds(BINDING_KINDS)
def test_a_wrapped_key_is_refused_under_another_context(kind):
    uri = kind.new_key()
    _, wrapped = provider(uri).generate_data_key(CONTEXT)
    for other in ({"app": "billing", "env": "test"}, {}):
        with pytest.raises(InvalidEnvelope):
            provider(uri).unwrap_data_key(wrapped, other)


@all_kinds()
def test_a_message_moved_to_another_context_is_refused(kind):
    """A header rebuilt around the same wrapped key, nonce and ciphertext, with another context."""
    uri = kind.new_key()
    body = codec([uri]).encode(VALUE)
    header = wire.parse_header(body)
    billing = {"app": "billing", "env": "test"}
    forged_header = wire.build_header(header.algorithm, header.wrapped_keys, billing, header.compression)
    forged = forged_header + body[wire.header_size(body) :]
    with pytest.raises((InvalidEnvelope, KeyServiceError)) as refused:
        codec([], [uri], context=billing).decode(forged)
    assert not is_transient(refused.value)


# -- tampering -------------------------------------------------------------------------------------------


@all_kinds()
def test_tampered_or_truncated_wrapped_keys_are_refused_as_permanent(kind):
    uri = kind.new_key()
    _, wrapped = provider(uri).generate_data_key(CONTEXT)
    middle = len(wrapped) // 2
    variants = {
        "first byte flipped": bytes([wrapped[0] ^ 0x01]) + wrapped[1:],
        "middle byte flipped": wrapped[:middle] + bytes([wrapped[middle] ^ 0x10]) + wrapped[middle + 1 :],
        "last byte flipped": wrapped[:-1] + bytes([wrapped[-1] ^ 0x01]),
        "last byte cut": wrapped[:-1],
        "cut to 2 bytes": wrapped[:2],
    }
    for what, bad in variants.items():
        with pytest.raises((InvalidEnvelope, KeyServiceError)) as refused:
            provider(uri).unwrap_data_key(bad, CONTEXT)
        assert not is_transient(refused.value), f"{what}: {refused.value}"


# -- rotation and multi-wrap -------------------------------------------------------------------------------


@all_kinds()
def test_rotation_old_messages_decrypt_with_decrypt_key_uris_and_are_refused_without(kind):
    old_uri, new_uri = kind.new_key(), kind.new_key()
    old_body = codec([old_uri]).encode(VALUE)
    new_body = codec([new_uri], [old_uri]).encode(VALUE)

    rotated = codec([new_uri], [old_uri])
    assert rotated.decode(old_body) == VALUE
    assert rotated.decode(new_body) == VALUE
    assert codec([new_uri]).decode(new_body) == VALUE
    with pytest.raises(UnknownKey) as unknown:
        codec([new_uri]).decode(old_body)
    assert new_uri in str(unknown.value) and "envelope_decrypt_key_uris" in str(unknown.value)


@all_kinds()
def test_multi_wrap_any_one_key_decrypts(kind):
    first, second = kind.new_key(), kind.new_key()
    body = codec([first, second]).encode(VALUE)
    assert len(wire.parse_header(body).wrapped_keys) == 2
    assert codec([], [first]).decode(body) == VALUE
    assert codec([], [second]).decode(body) == VALUE


# -- errors ---------------------------------------------------------------------------------------------


@all_kinds()
def test_errors_about_a_key_that_does_not_exist_name_it_and_are_permanent(kind):
    missing = kind.missing_key()
    with pytest.raises((KeyServiceError, ConfigurationError)) as wrapping:
        provider(missing).generate_data_key(CONTEXT)
    assert kind.shown_in_errors(missing) in str(wrapping.value)
    assert not is_transient(wrapping.value)

    _, wrapped = provider(kind.new_key()).generate_data_key(CONTEXT)
    with pytest.raises((KeyServiceError, ConfigurationError, InvalidEnvelope)) as unwrapping:
        provider(missing).unwrap_data_key(wrapped, CONTEXT)
    assert kind.shown_in_errors(missing) in str(unwrapping.value)
    assert not is_transient(unwrapping.value)


# -- fork safety ----------------------------------------------------------------------------------------


@all_kinds()
def test_a_forked_child_unwraps_with_a_client_of_its_own(kind):
    uri = kind.new_key()
    p = provider(uri)
    data_key, wrapped = p.generate_data_key(CONTEXT)
    parents_client = p.client
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, never return into pytest
        status = 1
        try:
            own_client = parents_client is None or p.client is not parents_client
            status = 0 if own_client and p.unwrap_data_key(wrapped, CONTEXT) == data_key else 2
        finally:
            os.write(write_end, bytes([status]))
            os._exit(0)
    os.close(write_end)
    deadline = time.monotonic() + 30
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung")
        time.sleep(0.01)
    with os.fdopen(read_end, "rb") as reader:
        assert reader.read() == b"\x00"
