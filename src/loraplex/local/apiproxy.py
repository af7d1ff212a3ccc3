"""An HTTP proxy in front of the local kube-apiserver, for tests and benchmarks: it counts requests per
client, verb and resource, answers chosen requests with an error of its own (a 409, a 429 with Retry-After,
a 503...), ends every open watch at once, and can go down and come back as an apiserver restart does.

    proxy = ApiProxy(control_plane.url, control_plane.ca_file).start()
    proxy.write_kubeconfig(path, token)          # kubectl, kopf and the python client through it
    proxy.inject("patch", "loraadapters.loraplex.io", 409, count=3)
    proxy.counts[("kopf", "watch", "pods")]

The proxy serves TLS with a self-signed certificate of its own: kubectl (client-go) sends no credentials
to a plain-HTTP server. Upgraded connections (exec, attach, port-forward) are not supported. How a request
is classified (verb, resource, client) and how a refusal is worded are request_info.py's.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import json
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import yaml
from aiohttp import web
from yarl import URL

from loraplex.local.request_info import RequestInfo, client_name, request_info, status_body

# Headers that describe one hop's connection, not the request (RFC 9110 section 7.6.1), plus Host, which
# names the proxy. Content-Length is recomputed by whoever writes the body next.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
                        "te", "trailer", "transfer-encoding", "upgrade", "host", "content-length"})


@dataclass
class Fault:
    """The next `remaining` requests of one verb on one resource are answered with `status`."""

    verb: str
    resource: str
    status: int
    remaining: int
    retry_after: int | None = None


class ApiProxy:
    def __init__(self, upstream: str, ca_file: Path):
        self.upstream = upstream.rstrip("/")
        self.upstream_ca_file = Path(ca_file)
        self.port = 0
        self._pki: Path | None = None
        self._lock = threading.Lock()
        self._counts: collections.Counter[tuple[str, str, str]] = collections.Counter()
        self._faults: list[Fault] = []
        self._streams: set[asyncio.Task[None]] = set()
        self._watches: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: web.Server | None = None
        self._runner: web.ServerRunner | None = None
        self._site: web.SockSite | None = None
        self._session: aiohttp.ClientSession | None = None
        self._coming_back: concurrent.futures.Future[None] | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca_file(self) -> Path:
        """The proxy's self-signed serving certificate, which also verifies it."""
        assert self._pki is not None, "the proxy is not started"
        return self._pki / "proxy.crt"

    # ---- lifecycle (called from the test's thread) ------------------------------------------------------

    def start(self) -> ApiProxy:
        self._pki = Path(tempfile.mkdtemp(prefix="loraplex-api-proxy-"))
        _self_signed_certificate(self._pki / "proxy.crt", self._pki / "proxy.key")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="api-proxy", daemon=True)
        self._thread.start()
        self._call(self._serve())
        return self

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        if self._coming_back is not None:
            self._coming_back.cancel()
        with contextlib.suppress(Exception):
            self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
        self._loop = self._thread = None
        if self._pki is not None:
            shutil.rmtree(self._pki, ignore_errors=True)

    def __enter__(self) -> ApiProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def write_kubeconfig(self, path: Path, token: str, namespace: str = "default") -> Path:
        """A kubeconfig for this proxy that authenticates with `token`."""
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "proxy",
            "clusters": [{"name": "proxy", "cluster": {"server": self.url,
                                                       "certificate-authority": str(self.ca_file)}}],
            "users": [{"name": "proxy-user", "user": {"token": token}}],
            "contexts": [{"name": "proxy", "context": {"cluster": "proxy", "user": "proxy-user",
                                                       "namespace": namespace}}],
        }
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)
        return path

    # ---- faults ------------------------------------------------------------------------------------------

    def inject(self, verb: str, resource: str, status: int, count: int = 1, retry_after: int | None = None) -> None:
        """Answer the next `count` requests of `verb` on `resource` with `status` instead of forwarding them."""
        with self._lock:
            self._faults.append(Fault(verb, resource, status, count, retry_after))

    def injected_remaining(self, verb: str, resource: str) -> int:
        with self._lock:
            return sum(f.remaining for f in self._faults if (f.verb, f.resource) == (verb, resource))

    def close_watches(self) -> None:
        """End every open watch stream cleanly, as the apiserver does when it shuts down."""
        self._call(self._cancel(self._watches))

    def down(self) -> None:
        """Stop listening and drop every connection: clients see what an apiserver restart shows them,
        connections refused and streams cut."""
        self._call(self._go_down())

    def up(self) -> None:
        self._call(self._go_up())

    def outage(self, seconds: float) -> None:
        """Go down now and come back `seconds` later, without blocking the caller."""
        self.down()
        assert self._loop is not None
        self._coming_back = asyncio.run_coroutine_threadsafe(self._up_after(seconds), self._loop)

    # ---- counting ----------------------------------------------------------------------------------------

    @property
    def counts(self) -> collections.Counter[tuple[str, str, str]]:
        """Requests received so far, keyed by (client, verb, resource); a copy."""
        with self._lock:
            return collections.Counter(self._counts)

    def reset_counts(self) -> None:
        with self._lock:
            self._counts.clear()

    # ---- inside the proxy's event loop -----------------------------------------------------------------

    def _call(self, coroutine: Any) -> Any:
        assert self._loop is not None, "the proxy is not started"
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=30)

    async def _serve(self) -> None:
        upstream_tls = ssl.create_default_context(cafile=str(self.upstream_ca_file))
        # Bodies pass through as they are, compressed or not; the client decompresses.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=upstream_tls, limit=0), auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"))
        # Cancelling the handler when its client goes away closes the upstream watch with it.
        self._server = web.Server(self._handle, handler_cancellation=True, auto_decompress=False, access_log=None)
        self._runner = web.ServerRunner(self._server, shutdown_timeout=1)
        await self._runner.setup()
        await self._go_up()

    async def _go_up(self) -> None:
        if self._site is not None:
            return
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        self.port = listener.getsockname()[1]
        assert self._runner is not None
        serving_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        serving_tls.load_cert_chain(self.ca_file, self.ca_file.with_name("proxy.key"))
        self._site = web.SockSite(self._runner, listener, ssl_context=serving_tls)
        await self._site.start()

    async def _up_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        await self._go_up()

    async def _go_down(self) -> None:
        if self._site is not None:
            await self._site.stop()
            self._site = None
        assert self._server is not None
        for connection in self._server.connections:  # first, so no stream gets to end cleanly
            connection.force_close()
        await self._cancel(self._streams)

    async def _shutdown(self) -> None:
        await self._cancel(self._streams)
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()
        self._site = None

    @staticmethod
    async def _cancel(tasks: set[asyncio.Task[None]]) -> None:
        pending = list(tasks)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    def _take_fault(self, info: RequestInfo) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if (fault.verb, fault.resource) == (info.verb, info.resource) and fault.remaining > 0:
                    fault.remaining -= 1
                    return fault
        return None

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        target = urlsplit(request.raw_path)
        info = request_info(request.method, target.path, parse_qs(target.query, keep_blank_values=True))
        with self._lock:
            self._counts[(client_name(request.headers.get("User-Agent", "")), info.verb, info.resource)] += 1
        fault = self._take_fault(info)
        if fault is not None:
            headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
            return web.Response(status=fault.status, headers=headers, content_type="application/json",
                                text=json.dumps(status_body(fault.status, info, fault.retry_after)))
        return await self._forward(request, info)

    async def _forward(self, request: web.BaseRequest, info: RequestInfo) -> web.StreamResponse:
        assert self._session is not None
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        body = await request.read()
        try:
            upstream = await self._session.request(
                request.method, URL(self.upstream + request.raw_path, encoded=True), headers=headers,
                data=body or None, allow_redirects=False)
        except aiohttp.ClientError as exc:
            return web.Response(status=503, content_type="application/json",
                                text=json.dumps({**status_body(503, info), "message": f"API proxy: {exc}"}))
        try:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for key, value in upstream.headers.items():
                if key.lower() not in HOP_BY_HOP:
                    response.headers.add(key, value)
            if upstream.content_length is not None:
                response.content_length = upstream.content_length
            await response.prepare(request)
            pump = asyncio.ensure_future(self._pump(upstream, response))
            self._streams.add(pump)
            if info.verb == "watch":
                self._watches.add(pump)
            try:
                # A pump cancelled by close_watches or down ends here without cancelling this handler.
                await asyncio.wait({pump})
            finally:
                pump.cancel()
                self._streams.discard(pump)
                self._watches.discard(pump)
            if not pump.cancelled() and pump.exception() is not None and request.transport is not None:
                request.transport.close()  # the upstream cut the stream (or the client left): cut it too
            with contextlib.suppress(ConnectionError):
                await response.write_eof()
            return response
        finally:
            upstream.close()

    @staticmethod
    async def _pump(upstream: aiohttp.ClientResponse, response: web.StreamResponse) -> None:
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)


def _self_signed_certificate(certificate: Path, key: Path) -> None:
    result = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(certificate), "-days", "30", "-subj", "/CN=loraplex-api-proxy",
         "-addext", "subjectAltName=IP:127.0.0.1"], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"openssl could not make the API proxy's certificate: {result.stderr.strip()}")
