"""vLLM: adapters are loaded and unloaded through its runtime LoRA endpoints.

POST /v1/load_lora_adapter {lora_name, lora_path} answers 200, or 400 "...has already been loaded.";
an adapter it refuses answers 400 up to vLLM 0.17 and 500 InternalServerError from 0.18 (docs/vllm-lora-
contract.md), with the engine still serving. POST /v1/unload_lora_adapter {lora_name} answers 200, or 404
"...cannot be found." /v1/models lists each adapter with root = the lora_path it was loaded from.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from loraplex.sidecar.demand import LoraRequests, parse_lora_requests
from loraplex.sidecar.runtimes.base import LoadFailed, RuntimeUnavailable
from loraplex.sidecar.runtimes.openai import OpenAiHttp, error_message

logger = logging.getLogger(__name__)


def is_vllm_error(text: str) -> bool:
    """True when the body is vLLM's own error object, i.e. vLLM answered rather than something in front of it."""
    try:
        error = json.loads(text).get("error")
    except (ValueError, AttributeError):
        return False
    return isinstance(error, dict) and "message" in error and "type" in error


def load_failure(name: str, status: int, text: str, engine_healthy: bool) -> Exception:
    """What a failed load means: vLLM refusing this adapter (its sentence), or vLLM not being able to answer."""
    message = error_message(text)
    if status >= 500 and not (engine_healthy and is_vllm_error(text)):
        return RuntimeUnavailable(f"vLLM answered {status} loading {name}: {message}")
    return LoadFailed(f"vLLM refused to load {name}: {message}")


class VllmClient:
    def __init__(self, base_url: str, served_model: str):
        self.http = OpenAiHttp(base_url)
        self.served_model = served_model

    async def healthy(self) -> bool:
        return await self.http.status_ok("/health")

    async def served_adapters(self) -> dict[str, str | None]:
        return await self.http.models(exclude=self.served_model)

    async def load(self, name: str, path: str) -> None:
        status, text = await self._request_load(name, path)
        if status == 400 and "already been loaded" in error_message(text):
            if (await self.served_adapters()).get(name) == path:
                return  # loaded from this very path by an earlier life of the sidecar
            # vLLM serves one path per name. load_inplace would swap without a gap, but vLLM up to 0.32 at least
            # then re-reads the adapter from disk at every engine step (docs/vllm-lora-contract.md §4.3): the name
            # is unserved instead for the time of one load.
            await self.unload(name)
            unserved = time.monotonic()
            status, text = await self._request_load(name, path)
            logger.info("vLLM did not serve %s for %.0f ms while it switched to %s", name,
                        (time.monotonic() - unserved) * 1000, path)
        if status == 200:
            return
        # A refused adapter and a dying engine both answer 500 on recent vLLM: /health tells them apart.
        raise load_failure(name, status, text, engine_healthy=status < 500 or await self.healthy())

    async def _request_load(self, name: str, path: str) -> tuple[int, str]:
        return await self.http.request("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})

    async def unload(self, name: str) -> None:
        status, text = await self.http.request("POST", "/v1/unload_lora_adapter", {"lora_name": name})
        if status == 200 or status == 404:  # 404: not loaded, which is what we wanted
            return
        message = error_message(text)
        if status >= 500:
            raise RuntimeUnavailable(f"vLLM answered {status} unloading {name}: {message}")
        raise LoadFailed(f"vLLM refused to unload {name}: {message}")

    async def retired(self, name: str) -> None:
        """Unload already took it out of /v1/models."""

    async def lora_requests(self) -> LoraRequests | None:
        status, text = await self.http.request("GET", "/metrics")
        return await asyncio.to_thread(parse_lora_requests, text) if status == 200 else None

    async def close(self) -> None:
        await self.http.close()
