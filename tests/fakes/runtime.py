"""A fake inference runtime that honours the LoRA contracts loraplex drives, for sidecar tests.

vLLM mode: /health, /v1/models, POST /v1/load_lora_adapter and /v1/unload_lora_adapter with vLLM's
status codes and error bodies; loading reads the folder the way vLLM does (adapter_config.json must
be there). NIM mode: /v1/health/ready, and /v1/models lists every folder under NIM_PEFT_SOURCE after
each refresh interval. Tests can restart it (adapters forgotten), take it down, or make loads fail.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.fakes.background import BackgroundServer


class FakeRuntime(BackgroundServer):
    def __init__(self, mode: str, served_model: str, peft_dir: Path | None = None, refresh_seconds: float = 0.3):
        super().__init__()
        self.mode, self.served_model, self.peft_dir = mode, served_model, peft_dir
        self.refresh_seconds = refresh_seconds
        self.loaded: dict[str, str] = {}  # name -> path
        self.load_calls: list[str] = []
        self.unload_calls: list[str] = []
        self.down = False
        self.refuse_loads: dict[str, str] = {}  # name -> error message

    def restart(self) -> None:
        """What a container restart does to a runtime: every adapter is forgotten."""
        self.loaded.clear()

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/health/ready", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/load_lora_adapter", self._load)
        app.router.add_post("/v1/unload_lora_adapter", self._unload)
        return app

    async def on_started(self) -> None:
        if self.mode == "nim":
            self._loop.create_task(self._nim_refresh())

    # ---- API -----------------------------------------------------------------------------------------------

    def _error(self, status: int, message: str, kind: str) -> web.Response:
        return web.json_response({"object": "error", "message": message, "type": kind, "param": None,
                                  "code": status}, status=status)

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=503 if self.down else 200)

    async def _models(self, request: web.Request) -> web.Response:
        if self.down:
            return web.Response(status=503)
        cards: list[dict[str, Any]] = [{"id": self.served_model, "object": "model", "root": self.served_model}]
        cards += [{"id": name, "object": "model", "root": path, "parent": self.served_model}
                  for name, path in sorted(self.loaded.items())]
        return web.json_response({"object": "list", "data": cards})

    async def _load(self, request: web.Request) -> web.Response:
        if self.mode != "vllm":
            return web.Response(status=404)
        body = await request.json()
        name, path = body.get("lora_name"), body.get("lora_path")
        self.load_calls.append(name)
        if not name or not path:
            return self._error(400, "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput")
        if name in self.loaded:
            return self._error(400, f"The lora adapter '{name}' has already been loaded.", "InvalidUserInput")
        if name in self.refuse_loads:
            return self._error(400, self.refuse_loads[name], "BadRequestError")
        if not (Path(path) / "adapter_config.json").is_file():
            return self._error(404, f"No adapter found for {path}", "NotFoundError")
        json.loads((Path(path) / "adapter_config.json").read_text())
        self.loaded[name] = path
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def _unload(self, request: web.Request) -> web.Response:
        body = await request.json()
        name = body.get("lora_name")
        self.unload_calls.append(name)
        if name not in self.loaded:
            return self._error(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
        del self.loaded[name]
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")

    async def _nim_refresh(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_seconds)
            if self.down or self.peft_dir is None or not self.peft_dir.is_dir():
                continue
            self.loaded = {p.name: str(p) for p in sorted(self.peft_dir.iterdir()) if p.is_dir()}
