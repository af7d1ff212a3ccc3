"""Adding and releasing our finalizer on one LoraAdapter, which keeps it until every replica let it go."""

from __future__ import annotations

import logging
from typing import Any

from loraplex.api.types import API_VERSION, LORA_ADAPTER
from loraplex.kube import KubeClient, NotFound, resource_path, retry_on_conflict
from loraplex.operator.adapters import FINALIZER, AdapterView

logger = logging.getLogger(__name__)


async def set_finalizer(client: KubeClient, view: AdapterView, present: bool) -> None:
    path = resource_path(API_VERSION, LORA_ADAPTER.plural, view.namespace, view.name)

    # The first attempt trusts the event's copy; if the object moved since, the 409 makes us read it.
    known: dict[str, Any] | None = {
        "uid": view.uid, "finalizers": list(view.finalizers), "resourceVersion": view.resource_version,
        "deletionTimestamp": "set" if view.deleting else None} if view.resource_version else None

    async def attempt() -> None:
        nonlocal known
        meta, known = known or (await client.get(path))["metadata"], None
        if meta.get("uid") != view.uid:
            return
        finalizers = list(meta.get("finalizers") or [])
        if (FINALIZER in finalizers) == present:
            return
        if present and meta.get("deletionTimestamp"):
            return  # finalizers cannot be added to an object that is being deleted
        finalizers = [*finalizers, FINALIZER] if present else [f for f in finalizers if f != FINALIZER]
        await client.merge_patch(path, {"metadata": {"finalizers": finalizers or None,
                                                     "resourceVersion": meta["resourceVersion"]}})
        logger.info("%s finalizer on LoraAdapter %s/%s", "added" if present else "released",
                    view.namespace, view.name)

    try:
        await retry_on_conflict(attempt)
    except NotFound:
        pass
