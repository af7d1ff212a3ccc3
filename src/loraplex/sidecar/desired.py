"""Follow this base model's adapter set (a ConfigMap the operator writes) with list + watch, so a
change arrives within a watch round-trip; disconnects and expired versions re-list."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from loraplex.api.adapter_set import AdapterSet
from loraplex.kube import ApiError, KubeClient, resource_path

logger = logging.getLogger(__name__)


async def follow_adapter_set(client: KubeClient, namespace: str, name: str,
                             on_change: Callable[[AdapterSet], None], backoff: float = 1.0) -> None:
    path = resource_path("v1", "configmaps", namespace)
    selector = f"metadata.name={name}"
    seen_version: str | None = None

    def deliver(obj: dict) -> None:
        nonlocal seen_version
        version = obj["metadata"].get("resourceVersion")
        if version == seen_version:
            return
        seen_version = version
        try:
            on_change(AdapterSet.from_configmap_data(obj.get("data") or {}))
        except ValueError as exc:
            logger.error("ConfigMap %s/%s is not a valid adapter set: %s", namespace, name, exc)

    while True:
        try:
            listing = await client.list(path, field_selector=selector)
            for item in listing.get("items", []):
                deliver(item)
            version = listing["metadata"]["resourceVersion"]
            async for event in client.watch(path, version, field_selector=selector):
                if event["type"] in ("ADDED", "MODIFIED"):
                    deliver(event["object"])
                # DELETED: keep serving what we have; the pod goes away with its base model.
            continue  # the server closed the watch (timeout): re-list and watch again
        except asyncio.CancelledError:
            raise
        except (ApiError, OSError, TimeoutError, ValueError) as exc:
            logger.warning("adapter set watch interrupted (%s); re-listing in %.0fs", exc, backoff)
        except Exception as exc:  # aiohttp payload errors and the like: never let the follower die
            logger.warning("adapter set watch failed (%s: %s); re-listing", type(exc).__name__, exc)
        await asyncio.sleep(backoff)
