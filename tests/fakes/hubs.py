"""Fake Hugging Face Hub and Cloud Storage JSON API over plain HTTP, for hf:// and gs:// sources."""

from __future__ import annotations

import collections
from pathlib import Path
from urllib.parse import unquote

from aiohttp import web

from tests.fakes.background import BackgroundServer


class FakeHubs(BackgroundServer):
    """/api/models/{org}/{repo}/revision/{rev} + /{org}/{repo}/resolve/{sha}/{path} (the Hub) and
    /storage/v1/b/{bucket}/o (Cloud Storage), serving folders under `root/hf/<org>/<repo>` and
    `root/gcs/<bucket>`. Requests without the expected bearer token are refused."""

    def __init__(self, root: Path, token: str = "secret-token"):
        super().__init__()
        self.root, self.token = root, token
        self.requests: collections.Counter[str] = collections.Counter()

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/models/{org}/{repo}/revision/{revision}", self._hf_info)
        app.router.add_get("/{org}/{repo}/resolve/{revision}/{path:.+}", self._hf_file)
        app.router.add_get("/storage/v1/b/{bucket}/o", self._gcs_list)
        app.router.add_get("/storage/v1/b/{bucket}/o/{name}", self._gcs_object)
        return app

    def _authorized(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {self.token}"

    async def _hf_info(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.Response(status=401)
        repo = self.root / "hf" / request.match_info["org"] / request.match_info["repo"]
        if not repo.is_dir():
            return web.Response(status=404)
        sized = request.query.get("blobs") == "true"
        siblings = [{"rfilename": str(p.relative_to(repo)), **({"size": p.stat().st_size} if sized else {})}
                    for p in sorted(repo.rglob("*")) if p.is_file()]
        return web.json_response({"id": f"{request.match_info['org']}/{request.match_info['repo']}",
                                  "sha": "0123456789abcdef0123456789abcdef01234567", "siblings": siblings})

    async def _hf_file(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            return web.Response(status=401)
        path = self.root / "hf" / request.match_info["org"] / request.match_info["repo"] / request.match_info["path"]
        self.requests[f"hf:{request.match_info['path']}"] += 1
        return await self._file(request, path)

    async def _gcs_list(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.Response(status=401)
        bucket = self.root / "gcs" / request.match_info["bucket"]
        prefix = request.query.get("prefix", "")
        items = [{"name": str(p.relative_to(bucket)), "size": str(p.stat().st_size)}
                 for p in sorted(bucket.rglob("*")) if p.is_file() and str(p.relative_to(bucket)).startswith(prefix)]
        return web.json_response({"kind": "storage#objects", "items": items})

    async def _gcs_object(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request) or request.query.get("alt") != "media":
            return web.Response(status=401)
        path = self.root / "gcs" / request.match_info["bucket"] / unquote(request.match_info["name"])
        self.requests[f"gcs:{unquote(request.match_info['name'])}"] += 1
        return await self._file(request, path)

    async def _file(self, request: web.Request, path: Path) -> web.StreamResponse:
        if not path.is_file():
            return web.Response(status=404)
        data = path.read_bytes()
        if "Range" in request.headers:
            first, _, last = request.headers["Range"].removeprefix("bytes=").partition("-")
            start, end = int(first), min(int(last) + 1, len(data))
            return web.Response(body=data[start:end], status=206,
                                headers={"Content-Range": f"bytes {start}-{end - 1}/{len(data)}"})
        return web.Response(body=data)
