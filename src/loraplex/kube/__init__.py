"""A small async Kubernetes API client shared by the operator and the sidecar: `KubeClient` (client.py),
the API's refusals as exceptions (errors.py), when a request is sent again (retry.py), and following one
object with list + watch (follow.py).
"""

from loraplex.kube.client import KubeClient, auth_headers, resource_path
from loraplex.kube.errors import ApiError, Conflict, NotFound
from loraplex.kube.follow import follow_object
from loraplex.kube.retry import (
    MAYBE_PROCESSED,
    NOT_PROCESSED,
    RetryPolicy,
    idempotent,
    retry_after_seconds,
    retry_delay,
    retry_on_conflict,
    retryable_failure,
    retryable_status,
)

__all__ = ["MAYBE_PROCESSED", "NOT_PROCESSED", "ApiError", "Conflict", "KubeClient", "NotFound", "RetryPolicy",
           "auth_headers", "follow_object", "idempotent", "resource_path", "retry_after_seconds", "retry_delay",
           "retry_on_conflict", "retryable_failure", "retryable_status"]
