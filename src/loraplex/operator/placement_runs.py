"""The reconciler's part in placement: gather what placing.plan_placement needs from the cluster view, remember the
plan, and re-decide the adapters whose place changed. The plan's slots reach the sidecars in the adapter set.
"""

from __future__ import annotations

from typing import Any

from loraplex.api.adapter_set import AdapterSet, DesiredAdapter
from loraplex.api.types import API_VERSION, LORA_ADAPTER, BaseModelDeploymentSpec
from loraplex.kube import ApiError, resource_path
from loraplex.operator import render
from loraplex.operator.adapters import AdapterView, desired_adapters
from loraplex.operator.cluster_view import ClusterView, Key
from loraplex.operator.demand_scaling import holder_levels, replicas_wanted, scaled_replicas
from loraplex.operator.events import post_event
from loraplex.operator.naming import ChildNames
from loraplex.operator.placing import AdapterPlacement, PlacementPlan, largest_size, plan_placement
from loraplex.operator.records import BaseModelRecord


class PlacementRuns(ClusterView):
    """Mixed into the Reconciler, which provides the records and the adapter reconcile."""

    def _base_model_record(self, key: Key) -> BaseModelRecord:
        raise NotImplementedError

    async def _reconcile_adapter(self, view: AdapterView) -> str:
        raise NotImplementedError

    def owners_of(self, key: Key) -> dict[str, AdapterView]:
        raise NotImplementedError

    async def placement_of(self, key: Key, adapter: str) -> AdapterPlacement | None:
        """Where the plan puts an accepted adapter; None while its base model has no valid spec (every replica).

        An adapter the plan does not know yet (just created, or the operator just started) gets a new plan here,
        the one the adapter set will carry, so that no status is first written as if it were elsewhere."""
        record = self._base_model_record(key)
        if record.placement is None or adapter not in record.placement.placements:
            body = self.base_model(key)
            spec = self.parse_spec(body)[0] if body and not body["metadata"].get("deletionTimestamp") else None
            if spec is None or render.spec_problems(spec):
                return None
            record.placement = await self._plan_placement(
                key, spec, desired_adapters(spec, self.adapters_of(key), self.owners_of(key)))
        return record.placement.placements.get(adapter)

    async def _plan_placement(self, key: Key, spec: BaseModelDeploymentSpec,
                              adapters: list[DesiredAdapter]) -> PlacementPlan:
        record = self._base_model_record(key)
        if record.replica_slots is None or record.scaled is None:
            record.replica_slots, record.scaled = await self._persisted_placement(key)
        views = {view.name: view for view in self.adapters_of(key)}
        wanted = {a.name: replicas_wanted(view.spec, record.scaled.get(a.name)) for a in adapters
                  if (view := views.get(a.name)) is not None and view.spec is not None}
        sizes = {a.name: size for a in adapters
                 if (size := largest_size(self.adapter_entries(key, a.name))) is not None}
        reporting = {pod for pod, entries in self.reports.get(key, ()) if entries}
        record.scaled = {name: count for name, count in record.scaled.items() if name in wanted}
        plan = plan_placement(spec, adapters, wanted, sizes, self.live_replicas(key), record.replica_slots, reporting)
        record.replica_slots = plan.replica_slots
        return plan

    async def _persisted_placement(self, key: Key) -> tuple[dict[str, int], dict[str, int]]:
        """The slots the adapter set carries, and how many each placed adapter holds, so that an operator
        restart keeps every pod's adapters and every count demand reached."""
        path = resource_path("v1", "configmaps", key[0], ChildNames(key[1]).adapter_set)
        try:
            live = await self.client.get_or_none(path)
            if not live:
                return {}, {}
            published = AdapterSet.from_configmap_data(live.get("data") or {})
        except (ApiError, ValueError):
            return {}, {}  # unreadable: new slots, at the cost of moving adapters once
        return (dict(published.replica_slots or {}),
                {a.name: len(a.slots) for a in published.adapters if a.slots is not None})

    async def scale_with_demand(self, key: Key, adapters: set[str]) -> bool:
        """Step the count of each of `adapters` that has spec.maxReplicas by the demand its replicas report
        (demand_scaling.py); True when one changed, and the placement must be made again."""
        record = self._base_model_record(key)
        plan = record.placement
        if plan is None or record.scaled is None:
            return False
        changed = False
        for view in self.adapters_of(key):
            placed = plan.placements.get(view.name)
            if view.name not in adapters or view.spec is None or view.spec.max_replicas is None or placed is None:
                continue
            current = replicas_wanted(view.spec, record.scaled.get(view.name))
            assert current is not None and view.spec.replicas is not None
            levels = holder_levels(placed.pods, placed.awaiting, self.adapter_entries(key, view.name))
            scaled = scaled_replicas(current, view.spec.replicas, view.spec.max_replicas, levels)
            if scaled == current:
                continue
            record.scaled[view.name] = scaled
            changed = True
            why = "its requests queue on every replica holding it" if scaled > current \
                else "every replica holding it sees no requests"
            involved = {"apiVersion": API_VERSION, "kind": LORA_ADAPTER.kind,
                        "metadata": {"namespace": view.namespace, "name": view.name, "uid": view.uid}}
            await post_event(self.client, involved, "Normal", "Scaled",
                             f"Wants {scaled} replica(s), was {current}: {why} (spec.replicas {view.spec.replicas}, "
                             f"spec.maxReplicas {view.spec.max_replicas}).")
        return changed

    async def _update_placement(self, key: Key, body: dict[str, Any], plan: PlacementPlan) -> None:
        """Remember the plan, warn of adapters newly short of room, and re-decide those whose place changed since
        the last plan that went through here (placement_of may have planned in between, for some adapters)."""
        record = self._base_model_record(key)
        before = record.propagated_placement
        record.placement = record.propagated_placement = plan
        newly_short = plan.short() - record.warned_short
        record.warned_short = plan.short()
        if newly_short:
            first = sorted(newly_short)[0]
            await post_event(self.client, body, "Warning", "InsufficientCapacity",
                             f"{len(plan.short())} adapter(s) are placed on fewer replicas than they want; "
                             f"{first}: {plan.placements[first].shortfall}.")
        if before is not None and before.placements == plan.placements:
            return
        for view in self.adapters_of(key):
            if before is None or before.placements.get(view.name) != plan.placements.get(view.name):
                await self._reconcile_adapter(view)

    def sizes_changed(self, key: Key, adapters: set[str]) -> bool:
        """Whether a replica reported a size the last plan did not go by, where sizes count."""
        plan = self._base_model_record(key).placement
        return plan is not None and plan.by_size and any(
            (size := largest_size(self.adapter_entries(key, name))) is not None and plan.sizes.get(name) != size
            for name in adapters)
