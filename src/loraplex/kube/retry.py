"""When to send a request again and how long to wait first: which answers and failures are safe to repeat,
exponential backoff under the server's Retry-After, and re-running a read-modify-write after a conflict.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import aiohttp

from loraplex.kube.errors import Conflict

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How patiently to repeat a request the API server refused or failed for a passing reason."""

    attempts: int = 8
    first_delay: float = 0.25
    max_delay: float = 30.0


# Answers the API server gives without having acted: API Priority and Fairness and max-in-flight
# throttling, a fresh CRD's "storage is (re)initializing", an API server not ready or shutting down.
NOT_PROCESSED = frozenset({429, 503})
# Answers after which the request may or may not have taken effect (an etcd write that outlived the
# request's timeout, a proxy that lost the backend): repeated only when repeating cannot do harm.
MAYBE_PROCESSED = frozenset({500, 502, 504})


def idempotent(method: str, content_type: str | None) -> bool:
    """Whether sending the request twice has the effect of sending it once.

    PUT carries the resourceVersion it read, so a repeat of one that went through answers 409 and the
    caller's read-modify-write re-reads. A merge patch sets fields to values, which is the same twice.
    A repeated DELETE may answer 404 for an object it did delete. POST (create an object, post an Event)
    and JSON patch (list operations) are not repeated after an answer that may mean they happened.
    """
    method = method.upper()
    return method in ("GET", "HEAD", "PUT", "DELETE") or (
        method == "PATCH" and content_type == "application/merge-patch+json")


def retryable_status(status: int, repeatable: bool) -> bool:
    return status in NOT_PROCESSED or (repeatable and status in MAYBE_PROCESSED)


def retryable_failure(exc: BaseException, repeatable: bool) -> bool:
    """Whether a request that got no answer may be sent again."""
    if isinstance(exc, aiohttp.ClientSSLError):
        return False  # a certificate that does not verify will not verify next time either
    if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
        return True  # no connection, so the server never saw the request
    return repeatable and isinstance(exc, aiohttp.ClientConnectionError | aiohttp.ClientPayloadError | TimeoutError)


def retry_delay(attempt: int, retry_after: float | None, policy: RetryPolicy, jitter: float) -> float:
    """Seconds to wait after failed attempt number `attempt` (1 for the first).

    Exponential backoff, spread by `jitter` (0 to 1) so clients refused together do not come back
    together. The server's Retry-After is a floor, as asking sooner only earns another refusal; the
    policy's max_delay caps both, so one call never sleeps longer than that at a time.
    """
    delay = min(policy.max_delay, policy.first_delay * 2 ** (attempt - 1)) * (0.5 + jitter)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return min(delay, policy.max_delay)


def retry_after_seconds(headers: Mapping[str, str], text: str) -> float | None:
    """The server's Retry-After header, or the retryAfterSeconds in its Status details."""
    value: Any = headers.get("Retry-After")
    if value is None:
        try:
            value = (json.loads(text).get("details") or {}).get("retryAfterSeconds")
        except (ValueError, AttributeError):
            return None
    try:
        return max(0.0, float(value))
    except (TypeError, ValueError):
        return None  # an HTTP date: the API server never sends one; use our own backoff


async def retry_on_conflict(attempt: Callable[[], Awaitable[T]], attempts: int = 8) -> T:
    """Re-run a read-modify-write when the object changed underneath it (409), with jittered backoff."""
    for number in range(attempts):
        try:
            return await attempt()
        except Conflict:
            if number == attempts - 1:
                raise
            delay = min(2.0, 0.05 * 2**number) * (0.5 + random.random())
            logger.debug("conflict; retrying in %.2fs", delay)
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")
