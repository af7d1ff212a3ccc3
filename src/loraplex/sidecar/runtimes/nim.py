"""NVIDIA NIM: an adapter is served once its folder is under NIM_PEFT_SOURCE and NIM's periodic
refresh has listed it in /v1/models; removing the folder retires it on the next refresh.
"""

from __future__ import annotations

import asyncio
import time

from loraplex.sidecar.runtimes.base import LoadFailed, RuntimeUnavailable
from loraplex.sidecar.runtimes.openai import OpenAiHttp


class NimClient:
    def __init__(self, base_url: str, served_model: str, refresh_interval: float = 10.0, poll: float = 0.5):
        self.http = OpenAiHttp(base_url)
        self.served_model = served_model
        self.refresh_interval = refresh_interval
        self.poll = poll

    async def healthy(self) -> bool:
        return await self.http.status_ok("/v1/health/ready")

    async def served_adapters(self) -> dict[str, str | None]:
        return await self.http.models(exclude=self.served_model)

    async def _wait_until(self, name: str, present: bool) -> None:
        deadline = time.monotonic() + 3 * self.refresh_interval + 5
        while time.monotonic() < deadline:
            try:
                if (name in await self.served_adapters()) == present:
                    return
            except RuntimeUnavailable:
                pass
            await asyncio.sleep(self.poll)
        if present:
            raise LoadFailed(f"NIM did not list {name} in /v1/models within {deadline:.0f}s of its refresh "
                             "interval; see the NIM logs for why it skipped the adapter")
        raise RuntimeUnavailable(f"NIM still lists {name} after its folder was removed")

    async def load(self, name: str, path: str) -> None:
        await self._wait_until(name, present=True)

    async def unload(self, name: str) -> None:
        """NIM has no unload call: the folder goes first (the caller does it), then NIM forgets it."""

    async def retired(self, name: str) -> None:
        await self._wait_until(name, present=False)

    async def close(self) -> None:
        await self.http.close()
