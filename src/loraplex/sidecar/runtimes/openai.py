"""HTTP plumbing shared by runtimes that speak the OpenAI API."""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from loraplex.sidecar.runtimes.base import RuntimeUnavailable


class OpenAiHttp:
    def __init__(self, base_url: str, timeout: float = 30.0):
        self.base_url = base_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=3)
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, str]:
        try:
            async with self.session().request(method, self.base_url + path, json=body) as response:
                return response.status, await response.text()
        except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
            raise RuntimeUnavailable(f"{self.base_url}{path}: {type(exc).__name__}: {exc}") from None

    async def status_ok(self, path: str) -> bool:
        try:
            status, _ = await self.request("GET", path)
        except RuntimeUnavailable:
            return False
        return status == 200

    async def models(self, exclude: str) -> dict[str, str | None]:
        """Model id -> its card's root (for an adapter, where the runtime loaded it from), but `exclude`."""
        status, text = await self.request("GET", "/v1/models")
        if status != 200:
            raise RuntimeUnavailable(f"GET /v1/models answered {status}")
        return {card["id"]: card.get("root") for card in json.loads(text).get("data", []) if card.get("id") != exclude}

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def error_message(text: str) -> str:
    """The message of an OpenAI-style error body, flat or nested under "error"."""
    try:
        payload = json.loads(text)
    except ValueError:
        return text.strip()
    if isinstance(payload, dict):
        inner = payload.get("error", payload)
        if isinstance(inner, dict) and "message" in inner:
            return str(inner["message"])
    return text.strip()
