"""Stand-ins for the inference pods' sidecars in bench/operator_scale.py. The pods are real: the Deployment
controller makes them from the operator's Deployments, and with no kubelet they stay Pending, which the
operator counts as replicas. For every pod, this follows its base model's adapter-set ConfigMap and reports
the adapters placed on that pod (AdapterSet.assigned_to, as the real sidecar syncs them) Loaded in the pod's
LoraReplica: the object is created once, then every round's new adapters, and those placed elsewhere since,
go in one merge patch of its status.

    python bench/simulated_replicas.py KUBECONFIG NAMESPACE MODEL [MODEL ...]

A process of its own, talking asyncio + aiohttp, so that the simulation shares neither an interpreter
lock nor a thread pool with what is measured. Runs until terminated.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from loraplex.api.adapter_set import AdapterSet

GROUP, VERSION = "loraplex.io", "v1alpha1"
BASE_MODEL_LABEL = "loraplex.io/base-model"


async def report(session: aiohttp.ClientSession, limit: asyncio.Semaphore, namespace: str, pod: dict[str, Any],
                 base_model: str, adapters: list[tuple[str, int]], removed: list[tuple[str, int]],
                 reported: set[tuple[str, int]]) -> None:
    meta = pod["metadata"]
    replicas = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/lorareplicas"
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "LoraReplica",
            "metadata": {"name": meta["name"], "labels": {BASE_MODEL_LABEL: base_model},
                         "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": meta["name"],
                                              "uid": meta["uid"]}]},
            "spec": {"baseModel": base_model}}
    entries: dict[str, Any] = {adapter: None for adapter, _ in removed}
    entries.update({adapter: {"state": "Loaded", "observedGeneration": generation, "format": "hf", "rank": 8}
                    for adapter, generation in adapters})
    patch = {"status": {"adapters": entries}}
    async with limit:
        async with session.post(replicas, data=json.dumps(body), headers={"Content-Type": "application/json"}
                                ) as response:
            await response.read()
            created = response.status in (201, 409)
        if created:
            async with session.patch(f"{replicas}/{meta['name']}/status", data=json.dumps(patch),
                                     headers={"Content-Type": "application/merge-patch+json"}) as response:
                await response.read()
                created = response.status < 400
        if not created:  # the next round tries again
            reported.difference_update(adapters)
            reported.update(removed)


async def main(config: dict[str, Any], namespace: str, base_models: list[str]) -> None:
    cluster, user = config["clusters"][0]["cluster"], config["users"][0]["user"]
    tls = ssl.create_default_context(cafile=cluster["certificate-authority"])
    # A User-Agent of its own, so that no request counter takes these for the operator's.
    headers = {"User-Agent": "loraplex-bench-replicas", "Authorization": f"Bearer {user['token']}"}
    async with aiohttp.ClientSession(cluster["server"], headers=headers,
                                     connector=aiohttp.TCPConnector(ssl=tls)) as session:
        reported: dict[str, set[tuple[str, int]]] = {}  # per pod: (adapter, generation) reported Loaded
        limit = asyncio.Semaphore(16)
        tasks: set[asyncio.Task[None]] = set()
        while True:
            async with session.get(f"/api/v1/namespaces/{namespace}/pods",
                                   params={"labelSelector": BASE_MODEL_LABEL}) as response:
                pods = (await response.json())["items"] if response.status == 200 else []
            for name in base_models:
                async with session.get(f"/api/v1/namespaces/{namespace}/configmaps/{name}-adapters") as response:
                    if response.status != 200:
                        continue
                    data = (await response.json()).get("data") or {}
                published = AdapterSet.from_configmap_data(data)
                for pod in pods:
                    meta = pod["metadata"]
                    if meta["labels"][BASE_MODEL_LABEL] != name or meta.get("deletionTimestamp"):
                        continue
                    wanted = {(a.name, a.generation) for a in published.assigned_to(meta["name"])}
                    done = reported.setdefault(meta["name"], set())
                    new = sorted(wanted - done)
                    kept = {adapter for adapter, _ in wanted}
                    removed = sorted(entry for entry in done - wanted if entry[0] not in kept)
                    if new or removed:
                        done.update(new)
                        done.difference_update(removed)
                        task = asyncio.create_task(report(session, limit, namespace, pod, name, new, removed, done))
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
            await asyncio.sleep(0.5)


if __name__ == "__main__":
    asyncio.run(main(yaml.safe_load(Path(sys.argv[1]).read_text()), sys.argv[2], sys.argv[3:]))
