"""A stand-in for NVIDIA NIM, which cannot run here (vLLM tests run the real vLLM: tests/vllm_server.py).

It keeps to the part of NIM's documented LoRA contract loraplex relies on (docs/formats/trtllm-and-nim.md, part B):
/v1/health/ready, and /v1/models, which lists the base model and every adapter NIM serves, by folder name.

- NIM 1.x (`FakeNim(...)`) lists every adapter folder found under NIM_PEFT_SOURCE at its last rescan, every
  NIM_PEFT_REFRESH_INTERVAL seconds. There are no load or unload endpoints: a folder appearing or going is the whole
  interface.
- NIM 2.x (`FakeNim.two(...)`) is told the environment the operator renders for its container. In static LoRA mode
  it serves the folders present when it starts, and never a later one. Its dynamic LoRA mode is "a watcher or the
  API"; which variable switches that mode on is not established, so the double takes one reading per instance
  (`Switch`): the watcher, on when NIM_PEFT_REFRESH_INTERVAL is set, rescans as 1.x does; the API, on when
  VLLM_ALLOW_RUNTIME_LORA_UPDATING is true, is vLLM's runtime LoRA endpoints as the vLLM inside NIM 2.0.2 and later
  answer them (a refused adapter: 500 with vLLM's error object).
"""

from __future__ import annotations

import asyncio
import enum
import json
import shlex
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.fakes.background import BackgroundServer


class Switch(enum.StrEnum):
    """The variable that turns NIM 2.x's dynamic LoRA mode on, in one reading of NVIDIA's docs."""

    WATCHER = "NIM_PEFT_REFRESH_INTERVAL"
    API = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"


class FakeNim(BackgroundServer):
    def __init__(self, served_model: str, peft_source: Path, refresh_seconds: float | None = 0.3,
                 generation: int = 1, api: bool = False, max_lora_rank: int | None = None):
        super().__init__()
        self.served_model, self.peft_source = served_model, peft_source
        self.refresh_seconds = refresh_seconds  # None: no rescans after the one at start
        self.generation, self.api, self.max_lora_rank = generation, api, max_lora_rank
        self.served: dict[str, str] = {}  # adapter name /v1/models lists -> the folder it was read from

    @classmethod
    def two(cls, served_model: str, peft_source: Path, env: dict[str, str], switch: Switch) -> FakeNim:
        """NIM 2.x as the container `env` configures it, dynamic mode switched on by `switch` alone."""
        args = shlex.split(env.get("NIM_PASSTHROUGH_ARGS", ""))
        rank = int(args[args.index("--max-lora-rank") + 1]) if "--max-lora-rank" in args else None
        watcher = switch == Switch.WATCHER and "NIM_PEFT_REFRESH_INTERVAL" in env
        api = switch == Switch.API and env.get(Switch.API, "").lower() in ("true", "1")
        return cls(served_model, peft_source, float(env["NIM_PEFT_REFRESH_INTERVAL"]) if watcher else None,
                   generation=2, api=api, max_lora_rank=rank)

    @property
    def listed(self) -> set[str]:
        return set(self.served)

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/health/ready", self._ready)
        app.router.add_get("/v1/models", self._models)
        if self.api:
            app.router.add_post("/v1/load_lora_adapter", self._load)
            app.router.add_post("/v1/unload_lora_adapter", self._unload)
        return app

    async def on_started(self) -> None:
        self._rescan()
        if self.refresh_seconds is not None:
            self._loop.create_task(self._refresh())

    async def _ready(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "health.response", "message": "Service is ready."})

    async def _models(self, request: web.Request) -> web.Response:
        cards: list[dict[str, Any]] = [{"id": self.served_model, "object": "model", "root": self.served_model}]
        cards += [{"id": name, "object": "model", "root": root} for name, root in sorted(self.served.items())]
        return web.json_response({"object": "list", "data": cards})

    def _rescan(self) -> None:
        if self.peft_source.is_dir():
            # 1.x also reads .nemo folders; 2.x documents only the Hugging Face layout, and skips what vLLM refuses.
            self.served = {p.name: str(p) for p in self.peft_source.iterdir()
                           if p.is_dir() and (self.generation == 1 or self._refusal(p) is None)}

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_seconds)
            self._rescan()

    def _refusal(self, folder: Path) -> str | None:
        """Why vLLM would not load the adapter in `folder`, or None."""
        try:
            config = json.loads((folder / "adapter_config.json").read_text())
        except (OSError, ValueError):
            return f"No adapter found for {folder}"
        if self.max_lora_rank is not None and config.get("r", 0) > self.max_lora_rank:
            return f"LoRA rank {config['r']} is greater than max_lora_rank {self.max_lora_rank}."
        return None

    async def _load(self, request: web.Request) -> web.Response:
        body = await request.json()
        name, path = body["lora_name"], body["lora_path"]
        if name in self.served:
            return _error(400, "BadRequestError", f"The lora adapter '{name}' has already been loaded.")
        if (refusal := self._refusal(Path(path))) is not None:
            return _error(500, "InternalServerError", refusal)
        self.served[name] = path
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def _unload(self, request: web.Request) -> web.Response:
        name = (await request.json())["lora_name"]
        if self.served.pop(name, None) is None:
            return _error(404, "NotFoundError", f"The lora adapter '{name}' cannot be found.")
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")


def _error(status: int, kind: str, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "param": None, "code": status}},
                             status=status)
