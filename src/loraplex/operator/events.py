"""Kubernetes Events for what a user should notice: adapters turning Ready or Failed, specs rejected."""

from __future__ import annotations

import logging
from typing import Any

from loraplex.api.conditions import utc_now
from loraplex.kube import ApiError, KubeClient, resource_path

logger = logging.getLogger(__name__)
COMPONENT = "loraplex-operator"


async def post_event(client: KubeClient, involved: dict[str, Any], event_type: str, reason: str,
                     message: str) -> None:
    meta = involved["metadata"]
    now = utc_now()
    event = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
        "involvedObject": {"apiVersion": involved["apiVersion"], "kind": involved["kind"], "name": meta["name"],
                           "namespace": meta["namespace"], "uid": meta.get("uid")},
        "type": event_type,
        "reason": reason,
        "message": message[:1024],
        "source": {"component": COMPONENT},
        "reportingComponent": COMPONENT,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }
    try:
        await client.create(resource_path("v1", "events", meta["namespace"]), event)
    except ApiError as exc:  # an event is a courtesy; never fail a reconcile over it
        logger.warning("could not post event %s on %s/%s: %s", reason, meta["namespace"], meta["name"], exc)
