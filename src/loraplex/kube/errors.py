"""The API server's refusals as exceptions: a failed call carries its HTTP status and the server's Status
reason and message, and the two that callers act on (404, 409) have types of their own.
"""

from __future__ import annotations

import json


class ApiError(Exception):
    """A failed API call, carrying the HTTP status and the server's Status reason and message."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(f"{status} {reason}: {message}")
        self.status, self.reason, self.message = status, reason, message

    @property
    def transient(self) -> bool:
        return self.status in (409, 429) or self.status >= 500


class NotFound(ApiError):
    pass


class Conflict(ApiError):
    pass


def api_error(status: int, text: str) -> ApiError:
    try:
        payload = json.loads(text)
        reason, message = payload.get("reason", ""), payload.get("message", text)
    except ValueError:
        reason, message = "", text
    kind = {404: NotFound, 409: Conflict}.get(status, ApiError)
    return kind(status, reason, message)
