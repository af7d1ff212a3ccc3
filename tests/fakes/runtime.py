"""A stand-in for NVIDIA NIM, which cannot run here (vLLM tests run the real vLLM: tests/vllm_server.py).

It keeps to the part of NIM's documented LoRA contract loraplex relies on: /v1/health/ready, and /v1/models,
which lists the base model and every adapter folder found under NIM_PEFT_SOURCE at the last refresh (every
NIM_PEFT_REFRESH_INTERVAL seconds). There are no load or unload endpoints: a folder appearing or going is
the whole interface.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.fakes.background import BackgroundServer


class FakeNim(BackgroundServer):
    def __init__(self, served_model: str, peft_source: Path, refresh_seconds: float = 0.3):
        super().__init__()
        self.served_model, self.peft_source, self.refresh_seconds = served_model, peft_source, refresh_seconds
        self.listed: set[str] = set()  # adapter names /v1/models lists since the last refresh

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/health/ready", self._ready)
        app.router.add_get("/v1/models", self._models)
        return app

    async def on_started(self) -> None:
        self._loop.create_task(self._refresh())

    async def _ready(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "health.response", "message": "Service is ready."})

    async def _models(self, request: web.Request) -> web.Response:
        cards: list[dict[str, Any]] = [{"id": name, "object": "model"}
                                       for name in [self.served_model, *sorted(self.listed)]]
        return web.json_response({"object": "list", "data": cards})

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_seconds)
            if self.peft_source.is_dir():
                self.listed = {p.name for p in self.peft_source.iterdir() if p.is_dir()}
