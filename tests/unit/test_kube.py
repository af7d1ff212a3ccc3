"""The API client against small stand-in API servers: credentials it sends, and which answers it retries."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import logging
import ssl
import sys
import types
from typing import Any

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from kubernetes.config import incluster_config

from loraplex.kube import (
    ApiError,
    KubeClient,
    RetryPolicy,
    idempotent,
    retry_after_seconds,
    retry_delay,
    retryable_status,
)
from loraplex.local.controlplane import free_port
from tests.fakes.files import self_signed_certificate

FAST = RetryPolicy(attempts=5, first_delay=0.05, max_delay=2.0)


@dataclasses.dataclass(frozen=True)
class Reply:
    status: int = 200
    body: Any = dataclasses.field(default_factory=dict)
    headers: dict[str, str] = dataclasses.field(default_factory=dict)


def refusal(code: int, reason: str, message: str, **headers: str) -> Reply:
    return Reply(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code,
                        "reason": reason, "message": message}, headers)


@dataclasses.dataclass(frozen=True)
class Seen:
    at: float
    method: str
    path: str
    headers: dict[str, str]


class ScriptedApiServer:
    """Answers each request with the next scripted reply (the last one repeats) and records what came."""

    def __init__(self, replies: list[Reply]):
        self.replies = list(replies)
        self.seen: list[Seen] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append(Seen(asyncio.get_running_loop().time(), request.method, request.path,
                              dict(request.headers)))
        reply = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        text = reply.body if isinstance(reply.body, str) else json.dumps(reply.body)
        return web.Response(status=reply.status, text=text, headers=reply.headers, content_type="application/json")

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    def gaps(self) -> list[float]:
        return [later.at - earlier.at for earlier, later in zip(self.seen, self.seen[1:], strict=False)]


@pytest.fixture
async def serve():
    """Start a ScriptedApiServer on a loopback port: serve(replies, ssl=None, port=None)."""
    servers: list[TestServer] = []

    async def start(replies: list[Reply], ssl_context: ssl.SSLContext | None = None,
                    port: int | None = None) -> tuple[ScriptedApiServer, TestServer]:
        api = ScriptedApiServer(replies)
        server = TestServer(api.app(), port=port)
        servers.append(server)
        await server.start_server(ssl=ssl_context)
        return api, server

    yield start
    for server in servers:
        await server.close()


def url(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


# ---- credentials ------------------------------------------------------------------------------------

def write_kubeconfig(tmp_path, server: str, user: dict[str, Any]) -> str:
    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": server}}],
        "users": [{"name": "someone", "user": user}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "someone"}}],
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def exec_plugin(token: str) -> dict[str, Any]:
    credential = {"apiVersion": "client.authentication.k8s.io/v1beta1", "kind": "ExecCredential",
                  "status": {"token": token}}
    return {"apiVersion": "client.authentication.k8s.io/v1beta1", "command": sys.executable,
            "args": ["-c", f"print({json.dumps(json.dumps(credential))})"]}


@pytest.mark.parametrize("user", [
    lambda tmp_path: {"token": "kubeconfig-token"},
    lambda tmp_path: {"tokenFile": str((tmp_path / "token").absolute())},
    lambda tmp_path: {"exec": exec_plugin("kubeconfig-token")},
], ids=["token", "tokenFile", "exec"])
async def test_a_kubeconfig_users_token_goes_out_as_a_bearer_header(tmp_path, monkeypatch, serve, user):
    (tmp_path / "token").write_text("kubeconfig-token\n")
    api, server = await serve([Reply(body={"kind": "APIVersions"})])
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", write_kubeconfig(tmp_path, url(server), user(tmp_path)))
    async with KubeClient.from_environment() as client:
        await client.get("/api")
    assert api.seen[0].headers.get("Authorization") == "Bearer kubeconfig-token"


class FiveMinutesLater(datetime.datetime):
    @classmethod
    def now(cls, tz: datetime.tzinfo | None = None) -> datetime.datetime:  # type: ignore[override]
        return datetime.datetime.now(tz) + datetime.timedelta(minutes=5)


async def test_in_cluster_the_service_account_token_goes_out_and_is_reread_as_it_rotates(
        tmp_path, monkeypatch, serve):
    cert, key = self_signed_certificate(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    api, server = await serve([Reply(body={"kind": "APIVersions"})], ssl_context=server_context)
    token = tmp_path / "token"
    token.write_text("service-account-token-1")
    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(token))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(cert))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(server.port))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))

    async with KubeClient.from_environment() as client:
        assert client.server == f"https://127.0.0.1:{server.port}"
        await client.get("/api")
        token.write_text("service-account-token-2")  # the kubelet rotated it
        monkeypatch.setattr(incluster_config, "datetime", types.SimpleNamespace(
            datetime=FiveMinutesLater, timedelta=datetime.timedelta))  # past the loader's re-read period
        await client.get("/api")
    assert [seen.headers.get("Authorization") for seen in api.seen] == [
        "Bearer service-account-token-1", "Bearer service-account-token-2"]


# ---- retries: the decisions ----------------------------------------------------------------------------

@pytest.mark.parametrize(("method", "content_type", "expected"), [
    ("GET", None, True),
    ("PUT", "application/json", True),
    ("DELETE", "application/json", True),
    ("PATCH", "application/merge-patch+json", True),
    ("PATCH", "application/json-patch+json", False),
    ("POST", "application/json", False),
])
def test_which_requests_are_safe_to_repeat(method, content_type, expected):
    assert idempotent(method, content_type) is expected


@pytest.mark.parametrize(("status", "repeatable", "expected"), [
    (429, False, True), (503, False, True),  # the server did not act on it
    (500, True, True), (502, True, True), (504, True, True),
    (500, False, False), (504, False, False),  # a create might have happened
    (400, True, False), (401, True, False), (403, True, False), (404, True, False), (409, True, False),
    (410, True, False), (422, True, False), (501, True, False),
])
def test_which_answers_are_retried(status, repeatable, expected):
    assert retryable_status(status, repeatable) is expected


@pytest.mark.parametrize(("attempt", "retry_after", "jitter", "expected"), [
    (1, None, 0.5, 0.25),
    (3, None, 0.5, 1.0),
    (3, None, 0.0, 0.5),
    (3, None, 0.99, 1.49),
    (20, None, 0.99, 30.0),  # capped
    (1, 2.0, 0.5, 2.0),  # the server's figure is a floor
    (6, 1.0, 0.5, 8.0),  # our own backoff when it is longer
    (1, 600.0, 0.5, 30.0),  # capped too
])
def test_retry_delays(attempt, retry_after, jitter, expected):
    assert retry_delay(attempt, retry_after, RetryPolicy(first_delay=0.25, max_delay=30.0), jitter) == \
        pytest.approx(expected)


@pytest.mark.parametrize(("headers", "text", "expected"), [
    ({"Retry-After": "3"}, "", 3.0),
    ({}, json.dumps({"kind": "Status", "details": {"retryAfterSeconds": 2}}), 2.0),
    ({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, "", None),
    ({}, "<html>busy</html>", None),
    ({}, json.dumps({"kind": "Status", "details": None}), None),
])
def test_retry_after_comes_from_the_header_or_the_status_details(headers, text, expected):
    assert retry_after_seconds(headers, text) == expected


# ---- retries: against a server ---------------------------------------------------------------------------

async def test_a_throttled_request_waits_as_long_as_the_server_asks_then_succeeds(serve, caplog):
    api, server = await serve([refusal(429, "TooManyRequests", "storage is (re)initializing", **{"Retry-After": "1"}),
                               Reply(body={"kind": "LoraAdapterList", "items": []})])
    caplog.set_level(logging.WARNING, logger="loraplex.kube")
    async with KubeClient(url(server), retry=FAST) as client:
        listing = await client.list("/apis/loraplex.io/v1alpha1/loraadapters")
    assert listing["items"] == []
    assert len(api.seen) == 2
    assert api.gaps()[0] >= 1.0
    assert "429 TooManyRequests: storage is (re)initializing; retrying in" in caplog.text


@pytest.mark.parametrize(("method", "call"), [
    ("GET", lambda client: client.get("/api/v1/namespaces/ns/configmaps/a")),
    ("POST", lambda client: client.create("/api/v1/namespaces/ns/configmaps", {"metadata": {"name": "a"}})),
])
async def test_an_unavailable_api_server_is_retried_with_backoff_for_every_verb(serve, method, call):
    api, server = await serve([refusal(503, "ServiceUnavailable", "apiserver is shutting down"),
                               refusal(503, "ServiceUnavailable", "apiserver is shutting down"),
                               Reply(body={"metadata": {"name": "a"}})])
    async with KubeClient(url(server), retry=FAST) as client:
        assert (await call(client))["metadata"]["name"] == "a"
    assert [seen.method for seen in api.seen] == [method] * 3
    assert all(gap > 0.02 for gap in api.gaps())


@pytest.mark.parametrize(("code", "reason"), [(400, "BadRequest"), (403, "Forbidden"), (404, "NotFound"),
                                              (409, "AlreadyExists"), (422, "Invalid")])
async def test_answers_that_would_not_change_are_not_retried(serve, code, reason):
    api, server = await serve([refusal(code, reason, "no"), Reply()])
    async with KubeClient(url(server), retry=FAST) as client:
        with pytest.raises(ApiError) as raised:
            await client.create("/api/v1/namespaces/ns/configmaps", {"metadata": {"name": "a"}})
    assert (raised.value.status, raised.value.reason) == (code, reason)
    assert len(api.seen) == 1


async def test_an_internal_error_repeats_a_read_but_not_a_create(serve):
    api, server = await serve([refusal(500, "InternalError", "etcd leader changed"), Reply(body={"kind": "Pod"})])
    async with KubeClient(url(server), retry=FAST) as client:
        assert (await client.get("/api/v1/namespaces/ns/pods/a"))["kind"] == "Pod"
    assert len(api.seen) == 2

    api, server = await serve([refusal(500, "InternalError", "etcd leader changed"), Reply()])
    async with KubeClient(url(server), retry=FAST) as client:
        with pytest.raises(ApiError) as raised:
            await client.create("/api/v1/namespaces/ns/events", {"kind": "Event"})
    assert raised.value.status == 500
    assert len(api.seen) == 1


async def test_retries_end_after_the_policys_attempts_with_the_last_answer(serve):
    api, server = await serve([refusal(429, "TooManyRequests", "slow down")])
    async with KubeClient(url(server), retry=RetryPolicy(attempts=3, first_delay=0.01)) as client:
        with pytest.raises(ApiError) as raised:
            await client.get("/api/v1/namespaces")
    assert raised.value.status == 429
    assert len(api.seen) == 3


async def test_retries_end_at_the_calls_deadline(serve):
    api, server = await serve([refusal(429, "TooManyRequests", "slow down", **{"Retry-After": "5"})])
    async with KubeClient(url(server), retry=RetryPolicy(max_delay=30.0)) as client:
        with pytest.raises(ApiError):
            await client.request("GET", "/api/v1/namespaces", deadline_seconds=2)
    assert len(api.seen) == 1  # waiting 5 s would overrun the 2 s the caller allowed


async def test_an_api_server_that_is_not_listening_yet_is_waited_for(serve):
    port = free_port()

    async def start_later() -> None:
        await asyncio.sleep(0.3)
        await serve([Reply(body={"kind": "APIVersions"})], port=port)

    starting = asyncio.create_task(start_later())
    async with KubeClient(f"http://127.0.0.1:{port}", retry=RetryPolicy(attempts=8, first_delay=0.1)) as client:
        assert (await client.create("/api/v1/namespaces/ns/events", {"kind": "Event"}))["kind"] == "APIVersions"
    await starting


async def test_a_throttled_watch_backs_off_then_streams(serve):
    events = [{"type": "ADDED", "object": {"metadata": {"name": "a", "resourceVersion": "2"}}},
              {"type": "MODIFIED", "object": {"metadata": {"name": "a", "resourceVersion": "3"}}}]
    api, server = await serve([refusal(429, "TooManyRequests", "too many watches", **{"Retry-After": "1"}),
                               Reply(body="".join(json.dumps(e) + "\n" for e in events))])
    async with KubeClient(url(server), retry=FAST) as client:
        seen = [event async for event in client.watch("/api/v1/namespaces/ns/configmaps", "1")]
    assert seen == events
    assert len(api.seen) == 2
    assert api.gaps()[0] >= 1.0


async def test_a_forbidden_watch_fails_at_once(serve):
    api, server = await serve([refusal(403, "Forbidden", "cannot watch configmaps")])
    async with KubeClient(url(server), retry=FAST) as client:
        with pytest.raises(ApiError) as raised:
            async for _ in client.watch("/api/v1/namespaces/ns/configmaps", "1"):
                pass
    assert raised.value.status == 403
    assert len(api.seen) == 1
