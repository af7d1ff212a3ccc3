"""Stand-ins for inference pods in bench/operator_scale.py: one Pod per base model whose "sidecar" follows
the adapter-set ConfigMap and reports every adapter in it Loaded, by merge patch, as the real sidecar does.

    python bench/simulated_replicas.py API_URL MODEL [MODEL ...]

A process of its own, talking asyncio + aiohttp, so that the simulation neither shares the emulator's
interpreter lock nor spends its time in a thread pool: what the benchmark measures is the operator.
Runs until terminated.
"""

from __future__ import annotations

import asyncio
import json
import sys

import aiohttp

GROUP, VERSION = "loraplex.io", "v1alpha1"
# The emulator counts requests by client; anything but "aiohttp" in the User-Agent is not the operator's.
HEADERS = {"User-Agent": "loraplex-bench-replicas"}


async def report(session: aiohttp.ClientSession, limit: asyncio.Semaphore, pod: str, adapter: str,
                 generation: int) -> None:
    patch = {"status": {"replicaStatus": {pod: {"state": "Loaded", "observedGeneration": generation,
                                                "format": "hf", "rank": 8}}}}
    async with limit, session.patch(
            f"/apis/{GROUP}/{VERSION}/namespaces/default/loraadapters/{adapter}/status", data=json.dumps(patch),
            headers={"Content-Type": "application/merge-patch+json"}) as response:
        await response.read()


async def main(url: str, base_models: list[str]) -> None:
    async with aiohttp.ClientSession(url, headers=HEADERS) as session:
        for name in base_models:
            async with session.post("/api/v1/namespaces/default/pods", json={
                    "metadata": {"name": f"{name}-0", "labels": {"loraplex.io/base-model": name}},
                    "spec": {"containers": [{"name": "inference", "image": "x"}]}}) as response:
                response.raise_for_status()
        reported: dict[str, set[tuple[str, int]]] = {name: set() for name in base_models}
        limit = asyncio.Semaphore(16)
        tasks: set[asyncio.Task[None]] = set()
        while True:
            for name in base_models:
                async with session.get(f"/api/v1/namespaces/default/configmaps/{name}-adapters") as response:
                    if response.status != 200:
                        continue
                    data = (await response.json()).get("data") or {}
                wanted = {(a["name"], a["generation"]) for a in json.loads(data["adapters.json"])["adapters"]}
                for adapter, generation in sorted(wanted - reported[name]):
                    task = asyncio.create_task(report(session, limit, f"{name}-0", adapter, generation))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                reported[name] |= wanted
            await asyncio.sleep(0.5)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2:]))
