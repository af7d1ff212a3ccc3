"""Status writes that send only what differs from what the object has, counting our own writes its
watch event has not brought yet, so re-running a reconcile never churns status."""

from __future__ import annotations

from typing import Any

from loraplex.api.conditions import merge_conditions, utc_now
from loraplex.api.types import API_VERSION
from loraplex.kube import KubeClient, NotFound, resource_path
from loraplex.kube.merge_patch import merge_difference
from loraplex.operator.records import StatusRecord


async def write_status(client: KubeClient, record: StatusRecord, plural: str, body: dict[str, Any],
                       desired: dict[str, Any]) -> None:
    """Merge-patch the status subresource, only where it differs from what is there."""
    current = record.known_status(body.get("status") or {})
    conditions = merge_conditions(current.get("conditions"), desired.get("conditions") or [], utc_now())
    wanted = {**desired, "conditions": conditions}
    changed = {}
    for key, value in wanted.items():  # a field left out of `desired` is not ours: left alone
        if isinstance(value, dict) and isinstance(current.get(key), dict):
            if difference := merge_difference(current[key], value):
                changed[key] = difference
        elif current.get(key) != value:
            changed[key] = value  # None, where the field became empty: merge patch removes it
    if not changed:
        return
    meta = body["metadata"]
    path = resource_path(API_VERSION, plural, meta["namespace"], meta["name"], "status")
    try:
        await client.merge_patch(path, {"status": changed})
    except NotFound:
        return  # deleted meanwhile; nothing left to report on
    record.written_status = {k: v for k, v in wanted.items() if v is not None}
