"""The reconciler's part in the adapter set: render the ConfigMap from a base model's adapters and their placement,
leave out what does not fit its size limit, apply it only when it changed, and re-decide the adapters that went in
or out. Every write carries the whole set to every replica's sidecar.
"""

from __future__ import annotations

from typing import Any

from loraplex.api.adapter_set import DATA_KEY
from loraplex.operator import naming, render
from loraplex.operator.adapters import desired_adapters
from loraplex.operator.apply import apply_object, in_sync
from loraplex.operator.cluster_view import Key
from loraplex.operator.coalescer import Coalescer
from loraplex.operator.events import post_event
from loraplex.operator.placement_runs import PlacementRuns
from loraplex.operator.records import BaseModelRecord
from loraplex.operator.settings import OperatorSettings


class AdapterSetRuns(PlacementRuns):
    """Mixed into the Reconciler, which provides the settings and the coalescer that runs _sync_adapter_set."""

    settings: OperatorSettings
    base_model_records: dict[Key, BaseModelRecord]
    _adapter_sets: Coalescer

    async def sync_adapter_set(self, key: Key, live: dict[str, Any] | None) -> None:
        """The adapter-set ConfigMap changed (`live`) or is gone (None): put back what it should say."""
        record = self.base_model_records.get(key)
        applied = record.applied_adapter_set if record is not None else None
        if live is not None and applied is not None and in_sync(applied, live):
            return  # the echo of our own write
        if record is not None:
            record.applied_adapter_set = None
        await self._adapter_sets.run(key)

    async def _sync_adapter_set(self, key: Key) -> None:
        body = self.base_model(key)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return
        spec, _ = self.parse_spec(body)
        if spec is None or render.spec_problems(spec) or naming.name_problems(body["metadata"]["name"]):
            return  # keep serving the last good set until the spec is fixed
        record = self._base_model_record(key)
        plan = await self._plan_placement(key, spec, desired_adapters(spec, self.adapters_of(key), self.owners_of(key)))
        adapters, slots = plan.adapters, plan.replica_slots
        desired = render.render_adapter_set(body, spec, adapters, slots)
        left_out: list[Any] = []
        if len(desired["data"][DATA_KEY]) > self.settings.adapter_set_max_bytes:
            adapters, left_out = render.fit_adapter_set(body, spec, adapters, self.settings.adapter_set_max_bytes,
                                                        slots)
            desired = render.render_adapter_set(body, spec, adapters, slots)
        if desired != record.applied_adapter_set:  # else as we last applied it, and nothing moved it
            await apply_object(self.client, desired)
            record.applied_adapter_set = desired
        await self._update_placement(key, body, plan)
        await self._update_left_out(key, body, {a.uid for a in left_out})

    async def _update_left_out(self, key: Key, body: dict[str, Any], uids: set[str]) -> None:
        """Record which adapters did not fit, and re-examine those that went in or out."""
        record = self._base_model_record(key)
        before = record.left_out
        if uids == before:
            return
        record.left_out = frozenset(uids)
        if uids - before:
            await post_event(self.client, body, "Warning", "AdapterSetFull",
                             f"{len(uids)} adapter(s) do not fit in the adapter set "
                             f"(at most {self.settings.adapter_set_max_bytes} bytes) and wait for room.")
        for view in self.adapters_of(key):
            if view.uid in uids ^ before:
                await self._reconcile_adapter(view)
