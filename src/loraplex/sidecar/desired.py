"""Follow this base model's adapter set (a ConfigMap the operator writes) with list + watch, so a
change arrives within a watch round-trip; disconnects and expired versions re-list."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from loraplex.api.adapter_set import AdapterSet
from loraplex.kube import KubeClient, follow_object, resource_path

logger = logging.getLogger(__name__)


async def follow_adapter_set(client: KubeClient, namespace: str, name: str,
                             on_change: Callable[[AdapterSet], None], backoff: float = 1.0) -> None:
    seen_version: str | None = None

    def deliver(obj: dict[str, Any] | None) -> None:
        nonlocal seen_version
        if obj is None:
            return  # absent or deleted: keep serving what we have; the pod goes away with its base model
        version = obj["metadata"].get("resourceVersion")
        if version == seen_version:
            return
        seen_version = version
        try:
            on_change(AdapterSet.from_configmap_data(obj.get("data") or {}))
        except ValueError as exc:
            logger.error("ConfigMap %s/%s is not a valid adapter set: %s", namespace, name, exc)

    await follow_object(client, resource_path("v1", "configmaps", namespace), name, deliver, "adapter set", logger,
                        backoff)
