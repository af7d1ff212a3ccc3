"""The client itself: credentials from the usual places (in-cluster service account, then KUBECONFIG)
through the `kubernetes` package's loaders, requests over aiohttp so nothing blocks the event loop, and
refusals and failures that are safe to repeat (throttling, an API server that is starting) retried here.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import random
import ssl
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import quote

import aiohttp
import kubernetes

from loraplex.kube.errors import NotFound, api_error
from loraplex.kube.retry import (
    RetryPolicy,
    idempotent,
    retry_after_seconds,
    retry_delay,
    retryable_failure,
    retryable_status,
)

logger = logging.getLogger(__name__)
DEFAULT_RETRY = RetryPolicy()  # frozen, so one instance serves every client


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


def auth_headers(configuration: kubernetes.client.Configuration) -> dict[str, str]:
    """The Authorization header the `kubernetes` package's loaders put into `configuration`.

    Where they keep it moved between releases (api_key['authorization'] before v36, ['BearerToken']
    since), so ask the configuration's own auth_settings(), which knows, and which first runs the
    refresh hook: the in-cluster token is re-read from disk as the kubelet rotates it, and kubeconfig
    exec plugins and auth providers are run again when their token expired.
    """
    headers = {}
    for setting in configuration.auth_settings().values():
        value = (setting.get("value") or "").strip()
        if setting.get("in") != "header" or not value:
            continue
        scheme, _, credentials = value.partition(" ")
        if scheme.lower() == "bearer":
            value = f"Bearer {credentials.strip()}"  # the in-cluster loader writes "bearer"
        headers[setting["key"].title()] = value
    return headers


class KubeClient:
    def __init__(self, server: str, headers: dict[str, str] | None = None,
                 ssl_context: ssl.SSLContext | bool = True,
                 refresh_headers: Callable[[], dict[str, str]] | None = None,
                 retry: RetryPolicy = DEFAULT_RETRY):
        self.server = server.rstrip("/")
        self._headers = headers or {}
        self._refresh_headers = refresh_headers
        self._ssl = ssl_context
        self.retry = retry
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_environment(cls) -> KubeClient:
        """In-cluster service account when running in a pod, else the current KUBECONFIG context."""
        configuration = kubernetes.client.Configuration()
        try:
            kubernetes.config.load_incluster_config(client_configuration=configuration)
        except kubernetes.config.ConfigException:
            # The package reads KUBECONFIG when it is imported; read it now, as kubectl would.
            kubernetes.config.load_kube_config(config_file=os.environ.get("KUBECONFIG"),
                                               client_configuration=configuration)

        context: ssl.SSLContext | bool = False
        if configuration.host.startswith("https"):
            context = ssl.create_default_context(cafile=configuration.ssl_ca_cert)
            if configuration.cert_file:
                context.load_cert_chain(configuration.cert_file, configuration.key_file)
            if not configuration.verify_ssl:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
        return cls(configuration.host, ssl_context=context, refresh_headers=lambda: auth_headers(configuration))

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

    async def _send(self, method: str, path: str, *, deadline: float,
                    attempt_timeout: Callable[[], aiohttp.ClientTimeout],
                    data: str | None = None, params: dict[str, str] | None = None,
                    content_type: str | None = None) -> aiohttp.ClientResponse:
        """Send until the answer is not a passing refusal, within the attempts of the retry policy and
        before `deadline` (event-loop time). The caller reads and releases the response."""
        loop = asyncio.get_running_loop()
        repeatable = idempotent(method, content_type)
        extra = {"Content-Type": content_type} if data is not None and content_type else None
        for attempt in itertools.count(1):
            failure: BaseException
            try:
                response = await self._client().request(method, self.server + path, data=data, params=params,
                                                        headers=self._request_headers(extra), timeout=attempt_timeout())
            except (aiohttp.ClientError, TimeoutError) as exc:
                if not retryable_failure(exc, repeatable):
                    raise
                failure, retry_after, why = exc, None, f"failed ({type(exc).__name__}: {exc})"
            else:
                if not retryable_status(response.status, repeatable):
                    return response
                async with response:
                    text = await response.text()
                failure = api_error(response.status, text)
                retry_after = retry_after_seconds(response.headers, text)
                why = f"answered {failure}"
            delay = retry_delay(attempt, retry_after, self.retry, random.random())
            if attempt >= self.retry.attempts or loop.time() + delay >= deadline:
                raise failure
            logger.warning("%s %s %s; retrying in %.1fs (attempt %d of %d)", method, path, why, delay,
                           attempt + 1, self.retry.attempts)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def request(self, method: str, path: str, body: Any = None, params: dict[str, str] | None = None,
                      content_type: str = "application/json", deadline_seconds: float = 30) -> Any:
        """One API call, retried as `_send` says, all of it within `deadline_seconds`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + deadline_seconds
        response = await self._send(
            method, path, deadline=deadline, data=None if body is None else json.dumps(body), params=params,
            content_type=content_type,
            attempt_timeout=lambda: aiohttp.ClientTimeout(total=max(1.0, deadline - loop.time())))
        async with response:
            text = await response.text()
        if response.status >= 400:
            raise api_error(response.status, text)
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

        An ERROR event (410 Gone and friends) is raised as ApiError so callers re-list. Opening the
        stream is retried like any GET, so a throttled watch backs off instead of failing at once.
        """
        params = {"watch": "true", "resourceVersion": resource_version, "allowWatchBookmarks": "true",
                  "timeoutSeconds": str(timeout_seconds)}
        if label_selector:
            params["labelSelector"] = label_selector
        if field_selector:
            params["fieldSelector"] = field_selector
        response = await self._send(
            "GET", path, params=params, deadline=asyncio.get_running_loop().time() + timeout_seconds,
            attempt_timeout=lambda: aiohttp.ClientTimeout(total=timeout_seconds + 30, sock_read=timeout_seconds + 30))
        async with response:
            if response.status >= 400:
                raise api_error(response.status, await response.text())
            async for line in response.content:
                if not line.strip():
                    continue
                event = json.loads(line)
                if event.get("type") == "ERROR":
                    status = event.get("object") or {}
                    raise api_error(int(status.get("code", 500)), json.dumps(status))
                yield event
