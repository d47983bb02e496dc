"""Calling a key service: retry what may pass, refuse the rest at once.

Every remote provider sends its calls through ``call``. A failure is
classified by the provider (``Classify``) into one of three kinds:

- transient (throttling, 5xx, timeouts, refused or reset connections): the
  call is retried with full-jitter exponential backoff until ``RetryPolicy.total``
  seconds have passed, then ``KeyServiceError(transient=True)``: the message
  is kept and tried again later;
- refused (access denied, unknown or disabled key, bad credentials): at once
  ``KeyServiceError(transient=False)``, naming the key URI and the service's reason;
- invalid (the service says the ciphertext is not one it made, or the
  encryption context differs): at once ``InvalidEnvelope``, like any other
  forged or damaged message.

The SDKs' own retries are turned off where providers build their clients, so
this module alone decides how long a call may take: at most ``total`` plus
one call's connect and read timeouts (``CONNECT_TIMEOUT`` + ``READ_TIMEOUT``).
"""

from __future__ import annotations

import enum
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from ..errors import InvalidEnvelope, KeyServiceError

__all__ = ["Kind", "Failure", "RetryPolicy", "DEFAULT_POLICY", "CONNECT_TIMEOUT", "READ_TIMEOUT", "call"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

#: Seconds to open a connection to a key service; a healthy one answers in milliseconds.
CONNECT_TIMEOUT = 2.0
#: Seconds to wait for a key service's answer once connected (HSM-backed keys can be slow).
READ_TIMEOUT = 5.0


class Kind(enum.Enum):
    TRANSIENT = "transient"
    REFUSED = "refused"
    INVALID = "invalid"


@dataclass(frozen=True)
class Failure:
    """What a failed key-service call means: its kind and the service's reason, in words."""

    kind: Kind
    reason: str


#: Turns an exception raised by an SDK into a Failure; None means "not a key-service failure" (re-raised as is).
Classify = Callable[[Exception], "Failure | None"]


@dataclass(frozen=True)
class RetryPolicy:
    """How long transient failures are retried: full-jitter exponential backoff within ``total`` seconds.

    The defaults keep one message's worst case (8 s of retries, plus one
    call's timeouts) short enough for a producer inside a web request and
    for a worker, which keeps the message when the service stays unavailable.
    """

    total: float = 8.0
    first_delay: float = 0.05
    max_delay: float = 2.0

    def delay(self, attempt: int) -> float:
        """Sleep before retry number ``attempt`` (0-based): uniform in [0, min(max_delay, first_delay * 2**attempt)]."""
        return random.uniform(0.0, min(self.max_delay, self.first_delay * (1 << min(attempt, 30))))


DEFAULT_POLICY = RetryPolicy()


def call(
    key_uri: str, action: str, fn: Callable[[], _T], classify: Classify, policy: RetryPolicy = DEFAULT_POLICY
) -> _T:
    """Run ``fn`` (one request named ``action``, e.g. 'Decrypt') against the key service of ``key_uri``."""
    start = time.monotonic()
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as exc:
            failure = classify(exc)
            if failure is None:
                raise
            if failure.kind is Kind.INVALID:
                raise InvalidEnvelope(f"{key_uri} refused to {action}: {failure.reason}") from exc
            if failure.kind is Kind.REFUSED:
                raise KeyServiceError(key_uri, f"{action}: {failure.reason}", transient=False) from exc
            delay = policy.delay(attempt)
            attempt += 1
            elapsed = time.monotonic() - start
            if elapsed + delay >= policy.total:
                raise KeyServiceError(
                    key_uri,
                    f"{action}: {failure.reason} (gave up after {attempt} attempt{'s' if attempt > 1 else ''} "
                    f"in {elapsed:.1f} s)",
                    transient=True,
                ) from exc
            logger.info("%s %s: %s; retry %d in %.2f s", key_uri, action, failure.reason, attempt, delay)
        time.sleep(delay)
