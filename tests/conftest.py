"""pytest fixtures over tests/servers.py: Redis, RabbitMQ, moto (KMS) and OpenBao (Transit).

Session fixtures share one server per test session. A test that stops, restarts or pauses a
key service must not do it to a shared one: use ``private_moto_server`` / ``private_bao_server``
(or ``with MotoServer() as kms:`` directly).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from . import servers


@pytest.fixture(scope="session")
def redis_server_url() -> Iterator[str]:
    """Base URL (no db) of Redis: REDIS_URL if it answers, else a private redis-server for the session."""
    yield servers.redis_url()
    servers.stop_private_redis()


@pytest.fixture
def redis_db_url(redis_server_url: str) -> Iterator[str]:
    """URL of the tests' own Redis db (KOMBU_ENVELOPE_TEST_REDIS_DB, default 13), flushed before and after."""
    url = servers.redis_db_url(redis_server_url, servers.redis_test_db())
    servers.flush_redis_db(url)
    yield url
    servers.flush_redis_db(url)


@pytest.fixture(scope="session")
def amqp_url() -> str:
    """AMQP URL of a RabbitMQ that accepts guest/guest (AMQP_URL overrides; started if installed but down).

    Fails, never skips, when RabbitMQ is neither running nor installed: install it (Debian: rabbitmq-server).
    """
    return servers.ensure_rabbitmq()


@pytest.fixture
def amqp_queues(amqp_url: str) -> Iterator[Callable[[str], str]]:
    """``name = amqp_queues("prefix")``: a unique queue name, deleted from RabbitMQ after the test."""
    names: list[str] = []

    def make(prefix: str = "test") -> str:
        names.append(servers.unique_name(prefix))
        return names[-1]

    yield make
    if names:
        servers.delete_amqp_queues(amqp_url, names)


@pytest.fixture(scope="session")
def moto_server() -> Iterator[servers.MotoServer]:
    """One moto server (AWS KMS) for the session: .endpoint_url, .env, .create_key(), .kms_request_counts()."""
    with servers.MotoServer() as server:
        yield server


@pytest.fixture
def private_moto_server() -> Iterator[servers.MotoServer]:
    """A moto server for this test only, free to stop()/start()/pause() (about 1.5 s to start)."""
    with servers.MotoServer() as server:
        yield server


@pytest.fixture(scope="session")
def bao_server() -> Iterator[servers.BaoServer]:
    """One OpenBao dev server for the session (Transit at transit/): .addr, .env, .create_key(), .audit_counts()."""
    with servers.BaoServer() as server:
        yield server


@pytest.fixture
def private_bao_server() -> Iterator[servers.BaoServer]:
    """An OpenBao dev server for this test only, free to stop()/start()/pause()."""
    with servers.BaoServer() as server:
        yield server
