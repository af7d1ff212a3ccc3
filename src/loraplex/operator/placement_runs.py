"""The reconciler's part in placement: gather what placing.plan_placement needs from the cluster view, remember the
plan, and re-decide the adapters whose place changed. The plan's slots reach the sidecars in the adapter set.
"""

from __future__ import annotations

from typing import Any

from loraplex.api.adapter_set import AdapterSet, DesiredAdapter
from loraplex.api.types import API_VERSION, LORA_ADAPTER, BaseModelDeploymentSpec
from loraplex.kube import resource_path
from loraplex.operator import render
from loraplex.operator.adapters import AdapterStatusUpdate, AdapterView, desired_adapters, keep_generations
from loraplex.operator.cluster_view import ClusterView, Key, first
from loraplex.operator.demand_scaling import holder_levels, replicas_wanted, scaled_replicas
from loraplex.operator.events import post_event
from loraplex.operator.naming import ChildNames
from loraplex.operator.placing import AdapterPlacement, PlacementPlan, largest_size, plan_placement
from loraplex.operator.records import BaseModelRecord


class PlacementRuns(ClusterView):
    """Mixed into the Reconciler, which provides the records and the adapter reconcile."""

    def _base_model_record(self, key: Key) -> BaseModelRecord:
        raise NotImplementedError

    async def _reconcile_adapter(self, view: AdapterView) -> AdapterStatusUpdate:
        raise NotImplementedError

    def owners_of(self, key: Key) -> dict[str, AdapterView]:
        raise NotImplementedError

    def loaded_generation(self, key: Key, uid: str) -> int | None:
        """The generation the adapter set gives an adapter (keep_generations); None before any plan has it."""
        decided = self._base_model_record(key).decided
        return decided[uid].generation if decided and uid in decided else None

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
        if record.replica_slots is None or record.scaled is None or record.decided is None:
            record.replica_slots, record.scaled, record.decided = await self._persisted_placement(key)
        adapters = keep_generations(adapters, record.decided)
        record.decided = {a.uid: a for a in adapters}
        views = {view.name: view for view in self.adapters_of(key)}
        specs = {a.name: view.spec for a in adapters if (view := views.get(a.name)) is not None and view.spec}
        wanted = {name: adapter_spec.replicas for name, adapter_spec in specs.items()}
        # A count is kept only while the adapter follows demand: one that stops, then starts again, starts afresh.
        record.scaled = {name: count for name, count in record.scaled.items()
                         if name in specs and specs[name].max_replicas is not None}
        extra = {name: scaled - (specs[name].replicas or 0) for name in record.scaled
                 if (scaled := replicas_wanted(specs[name], record.scaled[name])) is not None}
        sizes = {a.name: size for a in adapters
                 if (size := largest_size(self.adapter_entries(key, a.name))) is not None}
        reporting = {pod for pod, entries in self.reports.get(key, ()) if entries}
        previous_awaited = record.placement.awaited if record.placement is not None else ()
        plan = plan_placement(spec, adapters, wanted, sizes, self.live_replicas(key), record.replica_slots,
                              reporting, extra, self.expected_pods(key, spec), previous_awaited)
        record.replica_slots = plan.replica_slots
        for name in record.scaled:  # what placement found room for, so a count never runs ahead of it
            record.scaled[name] = plan.placements[name].replicas or record.scaled[name]
        return plan

    def expected_pods(self, key: Key, spec: BaseModelDeploymentSpec) -> int:
        """The pods placement keeps slots for: spec.replicas, or only the live ones while the Deployment says it
        cannot create pods (ReplicaFailure, e.g. a quota), so no adapter waits for a pod that will not come."""
        conditions = ((first(self.deployments, key) or {}).get("status") or {}).get("conditions") or []
        failing = any(c.get("type") == "ReplicaFailure" and c.get("status") == "True" for c in conditions)
        return len(self.live_replicas(key)) if failing else spec.replicas

    def placement_outdated(self, key: Key) -> bool:
        """Whether the pods the last plan expected are no longer what the Deployment will run."""
        plan = self._base_model_record(key).placement
        body = self.base_model(key)
        spec = self.parse_spec(body)[0] if body else None
        return plan is not None and spec is not None and plan.expected_pods != self.expected_pods(key, spec)

    async def _persisted_placement(self, key: Key
                                   ) -> tuple[dict[str, int], dict[str, int], dict[str, DesiredAdapter]]:
        """The slots the adapter set carries, how many replicas each adapter that follows demand holds, and each
        adapter's entry by uid (the generation its replicas load), so that an operator restart keeps every pod's
        adapters, every count demand reached and every version loaded. A failed read is an error (the handler
        retries it): starting afresh would drop every count at once."""
        path = resource_path("v1", "configmaps", key[0], ChildNames(key[1]).adapter_set)
        live = await self.client.get_or_none(path)
        try:
            published = AdapterSet.from_configmap_data((live or {}).get("data") or {}) if live else None
        except ValueError:
            published = None  # unreadable: new slots, at the cost of moving adapters once
        if published is None:
            return {}, {}, {}
        return (dict(published.replica_slots or {}),
                {a.name: len(a.slots) for a in published.adapters if a.follows_demand and a.slots is not None},
                {a.uid: a for a in published.adapters})

    async def scale_with_demand(self, key: Key, adapters: set[str]) -> bool:
        """Step the count of each of `adapters` that follows demand by the levels its replicas report
        (demand_scaling.py); True when one changed, and the placement must be made again."""
        record = self._base_model_record(key)
        plan = record.placement
        if plan is None or record.scaled is None:
            return False
        changed = False
        for view in self.adapters_of(key):
            placed = plan.placements.get(view.name)
            spec = view.spec
            if view.name not in adapters or spec is None or spec.max_replicas is None or spec.replicas is None \
                    or placed is None:
                continue
            current = replicas_wanted(spec, record.scaled.get(view.name)) or spec.replicas
            holders = len(placed.pods) + placed.awaiting
            levels = holder_levels(placed.pods, placed.awaiting, self.adapter_entries(key, view.name))
            scaled = scaled_replicas(current, holders, spec.replicas, spec.max_replicas, levels)
            if scaled == current:
                continue
            record.scaled[view.name] = scaled
            why = "its requests queue on every replica holding it" if scaled > current \
                else "no replica holding it has seen a request for a while"
            # The count an Event will say it was: the one before the first step not yet placed.
            was = record.scaling_reasons[view.name][1] if view.name in record.scaling_reasons else current
            record.scaling_reasons[view.name] = (why, was)
            changed = True
        return changed

    async def _announce_scaling(self, key: Key, plan: PlacementPlan) -> None:
        """A Scaled Event for each adapter that demand moved to another number of replicas, once a propagated plan
        places the count demand asked (or placement clamped it): not before, as a plan made before the step
        does not show it yet, and not at all when placement found no room for the step."""
        record = self._base_model_record(key)
        views = {view.name: view for view in self.adapters_of(key)}
        for name, (why, was) in sorted(record.scaling_reasons.items()):
            now = plan.placements[name].replicas if name in plan.placements else None
            target = (record.scaled or {}).get(name)
            if now is not None and target is not None and now != target:
                continue
            del record.scaling_reasons[name]
            if (view := views.get(name)) is None or now is None or now == was or view.spec is None:
                continue
            involved = {"apiVersion": API_VERSION, "kind": LORA_ADAPTER.kind,
                        "metadata": {"namespace": view.namespace, "name": view.name, "uid": view.uid}}
            await post_event(self.client, involved, "Normal", "Scaled",
                             f"Placed on {now} replica(s), was {was}: {why} (spec.replicas {view.spec.replicas}, "
                             f"spec.maxReplicas {view.spec.max_replicas}).")

    async def _update_placement(self, key: Key, body: dict[str, Any], plan: PlacementPlan) -> None:
        """Remember the plan, warn of adapters newly short of room, and re-decide those whose place changed since
        the last plan that went through here (placement_of may have planned in between, for some adapters)."""
        record = self._base_model_record(key)
        before = record.propagated_placement
        record.placement = record.propagated_placement = plan
        await self._announce_scaling(key, plan)
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
