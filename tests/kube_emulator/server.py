"""HTTP front of the emulator: the Kubernetes REST paths, discovery, watch streams and Table output."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import re
import threading
from typing import Any

from aiohttp import web

from .selectors import SelectorError
from .store import ApiError, Store, conflict

_STORE_KEY = web.AppKey("store", Store)
_PATCH_TYPES = (
    "application/json-patch+json", "application/merge-patch+json", "application/strategic-merge-patch+json",
    "application/apply-patch+yaml",
)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(data), status=status, content_type="application/json")


def _error(exc: ApiError) -> web.Response:
    return _json(exc.status(), status=exc.code)


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return _error(exc)
    except SelectorError as exc:
        return _error(ApiError(400, "BadRequest", str(exc)))
    except json.JSONDecodeError as exc:
        return _error(ApiError(400, "BadRequest", f"the body of the request could not be decoded: {exc}"))


def _human_age(timestamp: str | None) -> str:
    if not timestamp:
        return "<unknown>"
    then = datetime.datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
    seconds = max(0, int((datetime.datetime.now(datetime.UTC) - then).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _json_path(obj: Any, path: str) -> Any:
    node = obj
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        if part.startswith("["):
            index = int(part[1:-1])
            node = node[index] if isinstance(node, list) and index < len(node) else None
        else:
            node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            return None
    return node


def _table(rt: Any, items: list[dict[str, Any]], resource_version: int) -> dict[str, Any]:
    columns = [{"name": "Name", "type": "string", "format": "name", "description": "Name", "priority": 0}]
    custom = list(rt.printer_columns) or [{"name": "Age", "type": "date",
                                           "jsonPath": ".metadata.creationTimestamp"}]
    for column in custom:
        columns.append({"name": column["name"], "type": column["type"], "format": column.get("format", ""),
                        "description": column.get("description", ""), "priority": column.get("priority", 0)})
    rows = []
    for obj in items:
        cells: list[Any] = [obj["metadata"]["name"]]
        for column in custom:
            value = _json_path(obj, column["jsonPath"])
            if column["type"] == "date":
                value = _human_age(value)
            cells.append(value)
        rows.append({"cells": cells, "object": {
            "kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj["metadata"]}})
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1",
            "metadata": {"resourceVersion": str(resource_version)}, "columnDefinitions": columns, "rows": rows}


def _wants_table(request: web.Request) -> bool:
    return "as=Table" in request.headers.get("Accept", "")


class _Route:
    """A parsed resource path: /api/v1/... or /apis/{group}/{version}/..."""

    def __init__(self, store: Store, group: str, version: str, rest: list[str]):
        self.namespace: str | None = None
        if len(rest) >= 3 and rest[0] == "namespaces":
            candidate = store.resolve(group, version, rest[2])
            if candidate is not None and candidate.namespaced:
                self.namespace, rest = rest[1], rest[2:]
        if not rest:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        rt = store.resolve(group, version, rest[0])
        if rt is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        self.rt = rt
        self.name = rest[1] if len(rest) > 1 else None
        self.subresource = rest[2] if len(rest) > 2 else None
        if len(rest) > 3 or (self.subresource and (self.subresource != "status" or not rt.status_subresource)):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")


async def _resource(request: web.Request) -> web.StreamResponse:
    store = request.app[_STORE_KEY]
    group = request.match_info.get("group", "")
    version = request.match_info["version"]
    rest = [p for p in request.match_info.get("rest", "").split("/") if p]
    route = _Route(store, group, version, rest)
    rt, namespace, name = route.rt, route.namespace, route.name
    query = request.query
    watching = query.get("watch") in ("1", "true")
    verb = {"GET": "watch" if watching else ("get" if name else "list"), "POST": "create", "PUT": "update",
            "PATCH": "patch", "DELETE": "delete" if name else "deletecollection"}.get(request.method, "?")
    counted = rt.key + (f"/{route.subresource}" if route.subresource else "")
    store.request_counts[(verb, counted)] += 1
    client = "aiohttp" if "aiohttp" in request.headers.get("User-Agent", "") else "other"
    store.client_counts[(client, verb, counted)] += 1
    if store.take_injected_conflict(verb, counted):
        raise conflict(rt, name or "")

    if request.method == "GET" and name is None:
        if watching:
            return await _watch(request, store, route)
        items, resource_version = store.list(rt, namespace, query.get("labelSelector"), query.get("fieldSelector"))
        if _wants_table(request):
            return _json(_table(rt, items, resource_version))
        return _json({"kind": f"{rt.kind}List", "apiVersion": rt.api_version,
                      "metadata": {"resourceVersion": str(resource_version)}, "items": items})
    if request.method == "GET":
        obj = store.get(rt, namespace, name)
        if _wants_table(request):
            return _json(_table(rt, [obj], store.resource_version))
        return _json(obj)
    strict = query.get("fieldValidation") == "Strict"
    if request.method == "POST" and name is None:
        return _json(store.create(rt, namespace, await request.json(), strict=strict), status=201)
    if request.method == "PUT" and name:
        return _json(store.update(rt, namespace, name, await request.json(), route.subresource, strict=strict))
    if request.method == "PATCH" and name:
        content_type = request.headers.get("Content-Type", "").split(";")[0].strip()
        if content_type not in _PATCH_TYPES or content_type == "application/apply-patch+yaml":
            raise ApiError(415, "UnsupportedMediaType", f"the emulator does not support patch type "
                           f"{content_type!r}; use merge-patch or json-patch")
        return _json(store.patch(rt, namespace, name, content_type, await request.json(), route.subresource,
                                 strict=strict))
    if request.method == "DELETE" and name:
        options = await _delete_options(request)
        return _json(store.delete(rt, namespace, name, options.get("propagationPolicy") or "Background",
                                  options.get("preconditions")))
    if request.method == "DELETE":
        items, _ = store.list(rt, namespace, query.get("labelSelector"), query.get("fieldSelector"))
        deleted = [store.delete(rt, item["metadata"].get("namespace"), item["metadata"]["name"]) for item in items]
        return _json({"kind": f"{rt.kind}List", "apiVersion": rt.api_version, "metadata": {}, "items": deleted})
    raise ApiError(405, "MethodNotAllowed", f"{request.method} is not supported here")


async def _delete_options(request: web.Request) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if request.can_read_body:
        raw = await request.read()
        if raw.strip():
            options = json.loads(raw)
    if "propagationPolicy" in request.query:
        options["propagationPolicy"] = request.query["propagationPolicy"]
    return options


async def _watch(request: web.Request, store: Store, route: _Route) -> web.StreamResponse:
    query = request.query
    watcher = store.subscribe(route.rt, route.namespace, query.get("labelSelector"),
                              query.get("fieldSelector"), query.get("resourceVersion"))
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    await response.prepare(request)
    timeout = float(query["timeoutSeconds"]) if "timeoutSeconds" in query else None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout if timeout else None
    try:
        while True:
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                break
            try:
                event = await asyncio.wait_for(watcher.queue.get(), timeout=remaining)
            except TimeoutError:
                break
            if event is None:
                break
            await response.write(json.dumps(event).encode() + b"\n")
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        store.unsubscribe(watcher)
    with contextlib.suppress(ConnectionResetError):
        await response.write_eof()
    return response


async def _core_discovery(request: web.Request) -> web.Response:
    return _json({"kind": "APIVersions", "versions": ["v1"],
                  "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]})


def _resource_list(store: Store, group: str, version: str) -> dict[str, Any]:
    resources = []
    for (g, v, _), rt in sorted(store.types.items()):
        if g == group and v == version:
            resources += rt.discovery_entries()
    if not resources:
        raise ApiError(404, "NotFound", "the server could not find the requested resource")
    return {"kind": "APIResourceList", "apiVersion": "v1",
            "groupVersion": f"{group}/{version}" if group else version, "resources": resources}


async def _core_resources(request: web.Request) -> web.Response:
    return _json(_resource_list(request.app[_STORE_KEY], "", request.match_info["version"]))


def _group_entry(group: str, versions: list[str]) -> dict[str, Any]:
    listed = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
    return {"name": group, "versions": listed, "preferredVersion": listed[0]}


async def _groups(request: web.Request) -> web.Response:
    groups = request.app[_STORE_KEY].group_versions()
    return _json({"kind": "APIGroupList", "apiVersion": "v1",
                  "groups": [_group_entry(g, vs) for g, vs in sorted(groups.items()) if g]})


async def _group(request: web.Request) -> web.Response:
    versions = request.app[_STORE_KEY].group_versions().get(request.match_info["group"])
    if not versions:
        raise ApiError(404, "NotFound", "the server could not find the requested resource")
    return _json({"kind": "APIGroup", "apiVersion": "v1", **_group_entry(request.match_info["group"], versions)})


async def _group_resources(request: web.Request) -> web.Response:
    return _json(_resource_list(request.app[_STORE_KEY], request.match_info["group"],
                                request.match_info["version"]))


def _gv_path(group: str, version: str) -> str:
    return f"apis/{group}/{version}" if group else f"api/{version}"


def _component_name(rt: Any) -> str:
    reversed_group = ".".join(reversed(rt.group.split("."))) if rt.group else "io.k8s.api.core"
    return f"{reversed_group}.{rt.version}.{rt.kind}"


async def _openapi_root(request: web.Request) -> web.Response:
    store = request.app[_STORE_KEY]
    paths = {
        _gv_path(group, version): {"serverRelativeURL": f"/openapi/v3/{_gv_path(group, version)}"
                                                        f"?hash={store.resource_version}"}
        for group, versions in store.group_versions().items() for version in versions
    }
    return _json({"paths": paths})


async def _openapi_group_version(request: web.Request) -> web.Response:
    """Enough OpenAPI v3 for kubectl: server-side field validation support and `kubectl explain`."""
    store = request.app[_STORE_KEY]
    wanted = request.match_info["gv"]
    paths: dict[str, Any] = {}
    schemas: dict[str, Any] = {}
    for (group, version, _), rt in store.types.items():
        if _gv_path(group, version) != wanted:
            continue
        gvk = {"group": group, "version": version, "kind": rt.kind}
        scope = "/namespaces/{namespace}" if rt.namespaced else ""
        operation = {
            "x-kubernetes-group-version-kind": gvk,
            "parameters": [{"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}],
            "responses": {"200": {"description": "OK"}},
        }
        paths[f"/{wanted}{scope}/{rt.plural}/{{name}}"] = {"patch": operation, "put": operation}
        paths[f"/{wanted}{scope}/{rt.plural}"] = {"post": operation}
        object_schema = rt.schema or {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
        schemas[_component_name(rt)] = {**object_schema, "x-kubernetes-group-version-kind": [gvk]}
    if not paths:
        raise ApiError(404, "NotFound", "the server could not find the requested resource")
    return _json({"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": "v1.35.0"},
                  "paths": paths, "components": {"schemas": schemas}})


async def _version(request: web.Request) -> web.Response:
    return _json({"major": "1", "minor": "35", "gitVersion": "v1.35.0-loraplex-emulator",
                  "platform": "linux/amd64"})


async def _ok(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def _request_counts(request: web.Request) -> web.Response:
    counts = request.app[_STORE_KEY].request_counts
    return _json([{"verb": verb, "resource": resource, "count": n} for (verb, resource), n in counts.items()])


def make_app(store: Store | None = None) -> web.Application:
    app = web.Application(middlewares=[_errors], client_max_size=64 * 1024 * 1024)
    app[_STORE_KEY] = store or Store()
    app.router.add_get("/version", _version)
    app.router.add_get("/healthz", _ok)
    app.router.add_get("/readyz", _ok)
    app.router.add_get("/_emulator/requests", _request_counts)
    app.router.add_get("/openapi/v3", _openapi_root)
    app.router.add_get("/openapi/v3/{gv:.+}", _openapi_group_version)
    app.router.add_get("/api", _core_discovery)
    app.router.add_get("/api/{version}", _core_resources)
    app.router.add_get("/apis", _groups)
    app.router.add_get("/apis/{group}", _group)
    app.router.add_get("/apis/{group}/{version}", _group_resources)
    app.router.add_route("*", "/api/{version}/{rest:.+}", _resource)
    app.router.add_route("*", "/apis/{group}/{version}/{rest:.+}", _resource)
    return app


class EmulatorThread:
    """Runs the emulator on a loopback port in a thread of its own, for tests and the demo."""

    def __init__(self, history_limit: int = 50_000, port: int = 0):
        self.store = Store(history_limit=history_limit)
        self._port = port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kube-emulator", daemon=True)
        self._runner: web.AppRunner | None = None
        self.url = ""

    def start(self) -> EmulatorThread:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        return self

    async def _start(self) -> None:
        # Cancel a watch handler as soon as its client goes away, as the API server does.
        self._runner = web.AppRunner(make_app(self.store), handle_signals=False, handler_cancellation=True,
                                     shutdown_timeout=2)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self._port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a Store method on the emulator's loop, where it is safe to touch its state."""
        async def invoke() -> Any:
            return fn(*args, **kwargs)
        return asyncio.run_coroutine_threadsafe(invoke(), self._loop).result(timeout=30)

    def stop(self) -> None:
        if self._runner is not None:
            self.call(self.store.close_watches)
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def kubeconfig(self, namespace: str = "default") -> dict[str, Any]:
        return {
            "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "emulator", "user": {"token": "emulator"}}],
            "contexts": [{"name": "emulator",
                          "context": {"cluster": "emulator", "user": "emulator", "namespace": namespace}}],
        }
