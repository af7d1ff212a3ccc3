"""A small async Kubernetes API client shared by the operator and the sidecar.

Credentials come from the usual places (in-cluster service account, then KUBECONFIG) through the
`kubernetes` package's loaders; requests go over aiohttp so nothing blocks the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import quote

import aiohttp
import kubernetes

logger = logging.getLogger(__name__)
T = TypeVar("T")


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


def resource_path(api_version: str, plural: str, namespace: str | None = None, name: str | None = None,
                  subresource: str | None = None) -> str:
    prefix = "/api" if "/" not in api_version else "/apis"
    parts = [prefix, api_version]
    if namespace:
        parts += ["namespaces", quote(namespace, safe="")]
    parts.append(plural)
    if name:
        parts.append(quote(name, safe=""))
    if subresource:
        parts.append(subresource)
    return "/".join(parts)


class KubeClient:
    def __init__(self, server: str, headers: dict[str, str] | None = None,
                 ssl_context: ssl.SSLContext | bool = True,
                 refresh_headers: Callable[[], dict[str, str]] | None = None):
        self.server = server.rstrip("/")
        self._headers = headers or {}
        self._refresh_headers = refresh_headers
        self._ssl = ssl_context
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_environment(cls) -> KubeClient:
        """In-cluster service account when running in a pod, else the current KUBECONFIG context."""
        configuration = kubernetes.client.Configuration()
        try:
            kubernetes.config.load_incluster_config(client_configuration=configuration)
        except kubernetes.config.ConfigException:
            kubernetes.config.load_kube_config(client_configuration=configuration)

        def headers() -> dict[str, str]:
            if configuration.refresh_api_key_hook is not None:
                configuration.refresh_api_key_hook(configuration)  # bound tokens rotate on disk
            token = configuration.get_api_key_with_prefix("authorization")
            return {"Authorization": token} if token else {}

        context: ssl.SSLContext | bool = False
        if configuration.host.startswith("https"):
            context = ssl.create_default_context(cafile=configuration.ssl_ca_cert)
            if configuration.cert_file:
                context.load_cert_chain(configuration.cert_file, configuration.key_file)
            if not configuration.verify_ssl:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
        return cls(configuration.host, ssl_context=context, refresh_headers=headers)

    async def __aenter__(self) -> KubeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl, limit=32),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            )
        return self._session

    def _request_headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = {"Accept": "application/json", **self._headers}
        if self._refresh_headers is not None:
            headers.update(self._refresh_headers())
        return {**headers, **(extra or {})}

    async def request(self, method: str, path: str, body: Any = None, params: dict[str, str] | None = None,
                      content_type: str = "application/json", deadline_seconds: float = 30) -> Any:
        data = None if body is None else json.dumps(body)
        async with self._client().request(
            method, self.server + path, data=data, params=params,
            headers=self._request_headers({"Content-Type": content_type} if data is not None else None),
            timeout=aiohttp.ClientTimeout(total=deadline_seconds),
        ) as response:
            text = await response.text()
            if response.status >= 400:
                raise _error(response.status, text)
            return json.loads(text) if text else None

    async def get(self, path: str) -> dict[str, Any]:
        return await self.request("GET", path)

    async def get_or_none(self, path: str) -> dict[str, Any] | None:
        try:
            return await self.get(path)
        except NotFound:
            return None

    async def list(self, path: str, label_selector: str | None = None,
                   field_selector: str | None = None) -> dict[str, Any]:
        params = {}
        if label_selector:
            params["labelSelector"] = label_selector
        if field_selector:
            params["fieldSelector"] = field_selector
        return await self.request("GET", path, params=params)

    async def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.request("POST", path, body)

    async def replace(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.request("PUT", path, body)

    async def merge_patch(self, path: str, patch: dict[str, Any]) -> dict[str, Any]:
        return await self.request("PATCH", path, patch, content_type="application/merge-patch+json")

    async def json_patch(self, path: str, operations: list[dict[str, Any]]) -> dict[str, Any]:
        return await self.request("PATCH", path, operations, content_type="application/json-patch+json")

    async def delete(self, path: str, propagation: str = "Background") -> dict[str, Any] | None:
        return await self.request("DELETE", path, {"kind": "DeleteOptions", "apiVersion": "v1",
                                                   "propagationPolicy": propagation})

    async def watch(self, path: str, resource_version: str, label_selector: str | None = None,
                    field_selector: str | None = None, timeout_seconds: int = 300,
                    ) -> AsyncIterator[dict[str, Any]]:
        """Stream watch events from `resource_version` until the server closes the stream.

        An ERROR event (410 Gone and friends) is raised as ApiError so callers re-list.
        """
        params = {"watch": "true", "resourceVersion": resource_version, "allowWatchBookmarks": "true",
                  "timeoutSeconds": str(timeout_seconds)}
        if label_selector:
            params["labelSelector"] = label_selector
        if field_selector:
            params["fieldSelector"] = field_selector
        async with self._client().get(
            self.server + path, params=params, headers=self._request_headers(),
            timeout=aiohttp.ClientTimeout(total=timeout_seconds + 30, sock_read=timeout_seconds + 30),
        ) as response:
            if response.status >= 400:
                raise _error(response.status, await response.text())
            async for line in response.content:
                if not line.strip():
                    continue
                event = json.loads(line)
                if event.get("type") == "ERROR":
                    status = event.get("object") or {}
                    raise _error(int(status.get("code", 500)), json.dumps(status))
                yield event


def _error(status: int, text: str) -> ApiError:
    try:
        payload = json.loads(text)
        reason, message = payload.get("reason", ""), payload.get("message", text)
    except ValueError:
        reason, message = "", text
    kind = {404: NotFound, 409: Conflict}.get(status, ApiError)
    return kind(status, reason, message)


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
