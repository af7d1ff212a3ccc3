"""NVIDIA NIM: an adapter is a folder under NIM_PEFT_SOURCE, served under the folder's name.

NIM 1.x rescans the folder every NIM_PEFT_REFRESH_INTERVAL seconds and has no load call: the client waits for
/v1/models to list a new folder, or to stop listing a removed one. NIM 2.x serves folders added after its start only
in its dynamic LoRA mode, "a watcher or the API"; which of the two an image offers is not established
(docs/formats/trtllm-and-nim.md §B2). So on 2.x the client first asks the API, vLLM's runtime LoRA endpoints, which
the operator turns on and which answer with NIM's own sentence when it refuses an adapter; where NIM does not serve
them, it waits for the watcher as on 1.x.
"""

from __future__ import annotations

import asyncio
import time

from loraplex.api.runtime_capabilities import NimPickup
from loraplex.sidecar.demand import LoraRequests
from loraplex.sidecar.runtimes.base import LoadFailed, RuntimeUnavailable
from loraplex.sidecar.runtimes.openai import OpenAiHttp, error_message
from loraplex.sidecar.runtimes.vllm import is_vllm_error

NO_SUCH_ENDPOINT = (404, 405)  # the route is not there: this NIM offers no load API


class NimClient:
    def __init__(self, base_url: str, served_model: str, refresh_interval: float = 10.0, poll: float = 0.5,
                 pickup: NimPickup = NimPickup.REFRESH):
        self.http = OpenAiHttp(base_url)
        self.served_model = served_model
        self.refresh_interval = refresh_interval
        self.poll = poll
        self.pickup = pickup

    async def healthy(self) -> bool:
        return await self.http.status_ok("/v1/health/ready")

    async def served_adapters(self) -> dict[str, str | None]:
        return await self.http.models(exclude=self.served_model)

    async def _wait_until(self, name: str, present: bool, api: bool = False) -> None:
        timeout = 3 * self.refresh_interval + 5
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if (name in await self.served_adapters()) == present:
                    return
            except RuntimeUnavailable:
                pass
            await asyncio.sleep(self.poll)
        if not present:
            raise RuntimeUnavailable(f"NIM still lists {name} after its folder was removed")
        if api:
            raise LoadFailed(f"NIM took {name} through its load API but did not list it in /v1/models within "
                             f"{timeout:.0f}s")
        if self.pickup == NimPickup.DYNAMIC:
            raise LoadFailed(f"NIM did not list {name} in /v1/models within {timeout:.0f}s and serves no load API: "
                             "it runs in static LoRA mode, which reads NIM_PEFT_SOURCE only at start, or it skipped "
                             "the adapter; see the NIM logs")
        raise LoadFailed(f"NIM did not list {name} in /v1/models within {timeout:.0f}s of its refresh interval; "
                         "see the NIM logs for why it skipped the adapter")

    async def load(self, name: str, path: str) -> None:
        through_api = self.pickup == NimPickup.DYNAMIC and await self._load_through_api(name, path)
        await self._wait_until(name, present=True, api=through_api)

    async def _load_through_api(self, name: str, path: str) -> bool:
        """True once NIM serves `name` from `path` through its load API; False when it has no such API."""
        status, text = await self._request_load(name, path)
        if status == 400 and "already" in error_message(text):
            # The watcher may have been first, or still hold the weights of the folder this one replaced.
            await self.unload(name)
            status, text = await self._request_load(name, path)
        if status == 200 or (status == 400 and "already" in error_message(text)):
            return True
        if status in NO_SUCH_ENDPOINT:
            return False
        # A refused adapter answers 500 on the vLLM inside NIM 2.0.2 and later, as a dying engine does.
        if status >= 500 and not (is_vllm_error(text) and await self.healthy()):
            raise RuntimeUnavailable(f"NIM answered {status} loading {name}: {error_message(text)}")
        raise LoadFailed(f"NIM refused to load {name}: {error_message(text)}")

    async def _request_load(self, name: str, path: str) -> tuple[int, str]:
        return await self.http.request("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})

    async def unload(self, name: str) -> None:
        """1.x has no unload call: the folder goes (the caller removes it), then NIM forgets it. 2.x unloads through
        its API where it has one; its watcher, if that is what it has, forgets the folder once it is gone."""
        if self.pickup != NimPickup.DYNAMIC:
            return
        status, text = await self.http.request("POST", "/v1/unload_lora_adapter", {"lora_name": name})
        if status == 200 or status in NO_SUCH_ENDPOINT:  # 404 is also "not loaded", which is what we wanted
            return
        if status >= 500:
            raise RuntimeUnavailable(f"NIM answered {status} unloading {name}: {error_message(text)}")
        raise LoadFailed(f"NIM refused to unload {name}: {error_message(text)}")

    async def retired(self, name: str) -> None:
        await self._wait_until(name, present=False)

    async def lora_requests(self) -> LoraRequests | None:
        """NIM's metrics for per-adapter requests are not documented where loraplex could check them."""
        return None

    async def close(self) -> None:
        await self.http.close()
