"""vLLM: adapters are loaded and unloaded through its runtime LoRA endpoints.

POST /v1/load_lora_adapter {lora_name, lora_path} answers 200, or 400 "...has already been loaded."
POST /v1/unload_lora_adapter {lora_name} answers 200, or 404 "...cannot be found."
"""

from __future__ import annotations

from loraplex.sidecar.runtimes.base import LoadFailed, RuntimeUnavailable
from loraplex.sidecar.runtimes.openai import OpenAiHttp, error_message


class VllmClient:
    def __init__(self, base_url: str, served_model: str):
        self.http = OpenAiHttp(base_url)
        self.served_model = served_model

    async def healthy(self) -> bool:
        return await self.http.status_ok("/health")

    async def served_adapters(self) -> set[str]:
        return await self.http.models(exclude=self.served_model)

    async def load(self, name: str, path: str) -> None:
        status, text = await self.http.request("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
        if status == 200:
            return
        message = error_message(text)
        if status == 400 and "already been loaded" in message:
            # Loaded under this name by an earlier sidecar life; the caller unloads first when weights changed.
            return
        if status >= 500:
            raise RuntimeUnavailable(f"vLLM answered {status} loading {name}: {message}")
        raise LoadFailed(f"vLLM refused to load {name}: {message}")

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

    async def close(self) -> None:
        await self.http.close()
