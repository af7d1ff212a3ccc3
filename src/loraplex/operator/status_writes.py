"""Status writes that send only what differs from what the object has, counting our own writes its
watch event has not brought yet, so re-running a reconcile never churns status."""

from __future__ import annotations

from typing import Any

from loraplex.api.conditions import merge_conditions, utc_now
from loraplex.api.types import API_VERSION
from loraplex.kube import KubeClient, NotFound, resource_path
from loraplex.operator.records import StatusRecord


async def write_status(client: KubeClient, record: StatusRecord, plural: str, body: dict[str, Any],
                       desired: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
    """Merge-patch the status subresource, only where it differs from what is there."""
    current = record.known_status(body.get("status") or {})
    conditions = merge_conditions(current.get("conditions"), desired.get("conditions") or [], utc_now())
    wanted = {**desired, "conditions": conditions}
    changed = {k: v for k, v in wanted.items() if current.get(k) != v}
    # Fields that became empty must be removed, which merge patch spells as null.
    changed.update({k: None for k, v in wanted.items() if v is None and k in current})
    changed = {k: v for k, v in changed.items() if not (v is None and k not in current)}
    if extra:
        changed.update(extra)
    if not changed:
        return
    meta = body["metadata"]
    path = resource_path(API_VERSION, plural, meta["namespace"], meta["name"], "status")
    try:
        await client.merge_patch(path, {"status": changed})
    except NotFound:
        return  # deleted meanwhile; nothing left to report on
    record.written_status = {k: v for k, v in wanted.items() if v is not None}
