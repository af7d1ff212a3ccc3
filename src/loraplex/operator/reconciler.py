"""Level-triggered reconciliation: read the cluster (kopf indices), call the pure core, write the difference.

Every method can run any number of times with the same outcome. Writes happen only where the
cluster differs from what the core computed, so re-running changes nothing and status never churns.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Hashable, Mapping
from typing import Any

from loraplex.api.conditions import find
from loraplex.api.types import API_VERSION, BASE_MODEL_DEPLOYMENT, LORA_ADAPTER
from loraplex.kube import KubeClient
from loraplex.operator.adapter_finalizer import set_finalizer
from loraplex.operator.adapter_set_runs import AdapterSetRuns
from loraplex.operator.adapters import (
    FINALIZER,
    AdapterStatusUpdate,
    AdapterView,
    adapter_set_full,
    adapter_status,
    check_adapter,
    cleanup_done,
    served_name_owners,
)
from loraplex.operator.base_models import base_model_status
from loraplex.operator.cluster_view import Key, first
from loraplex.operator.coalescer import Coalescer
from loraplex.operator.events import post_event
from loraplex.operator.owned_objects import OwnedObjectRuns
from loraplex.operator.records import AdapterClaim, AdapterFacts, AdapterRecord, BaseModelRecord
from loraplex.operator.routing import PICKER_STARTING
from loraplex.operator.settings import OperatorSettings
from loraplex.operator.status_writes import write_status

logger = logging.getLogger(__name__)


class Reconciler(AdapterSetRuns, OwnedObjectRuns):
    """Decides from what the ClusterView shows and writes the difference, remembering one record per object."""

    def __init__(self, client: KubeClient, settings: OperatorSettings, indices: Mapping[str, Any],
                 namespaces: list[str] | None = None):
        super().__init__(client, indices, namespaces)
        self.settings = settings
        # Locks outlive records: a run that outlived its object must still exclude one for a new object.
        self._locks: dict[Hashable, asyncio.Lock] = collections.defaultdict(asyncio.Lock)
        self.base_model_records: dict[Key, BaseModelRecord] = {}
        self.adapter_records: dict[Key, AdapterRecord] = {}
        self._seen_reports: dict[Key, dict[str, Any]] = {}  # (namespace, pod) -> its status.adapters, last seen
        self._base_model_runs = Coalescer(self._reconcile_base_model)
        self._owned_runs = Coalescer(self._converge_owned)
        # Every write of an adapter set carries the whole set (and reaches every replica's sidecar), so a
        # burst of adapter changes is published a few times a second, not once per adapter.
        self._adapter_sets = Coalescer(self._sync_adapter_set, settings.batch_seconds)
        self._base_statuses = Coalescer(self._write_base_model_status, settings.batch_seconds)
        self._traffic_runs = Coalescer(self.apply_traffic, settings.batch_seconds)

    # ---- served names ------------------------------------------------------------------------------

    async def load_adapters(self) -> None:
        await super().load_adapters()
        for record in self.base_model_records.values():
            record.served_name_owners = None

    def owners_of(self, key: Key) -> dict[str, AdapterView]:
        """Who holds each served name among one base model's adapters."""
        record = self._base_model_record(key)
        if record.served_name_owners is None:
            record.served_name_owners = served_name_owners(self.adapters_of(key))
        return record.served_name_owners

    def _forget_owners(self, key: Key) -> None:
        record = self.base_model_records.get(key)
        if record is not None:
            record.served_name_owners = None

    # ---- records --------------------------------------------------------------------------------------

    def _base_model_record(self, key: Key) -> BaseModelRecord:
        """The record of a base model the index holds; for one that is gone a throwaway, so a run that
        outlived its object does not bring the record back."""
        record = self.base_model_records.get(key)
        if record is None:
            record = BaseModelRecord()
            if self.base_model(key) is not None:
                self.base_model_records[key] = record
        return record

    def _adapter_record(self, view: AdapterView) -> AdapterRecord:
        """The record of an adapter the index holds (a throwaway for one that is gone, as above)."""
        record = self.adapter_records.get((view.namespace, view.name))
        if record is None:
            record = AdapterRecord()
            if self.adapters.holds(view.namespace, view.name):
                self.adapter_records[(view.namespace, view.name)] = record
        return record

    def forget_shortcuts(self) -> None:
        """Trust the indices alone again: forget the status we wrote, the finalizers we gave, the adapter
        sets we applied, what we reconciled, the served-name owners and the routing APIs served, keeping our
        decisions. The periodic resync calls this, so its pass undoes any external edit."""
        for record in [*self.base_model_records.values(), *self.adapter_records.values()]:
            record.forget_shortcuts()
        self.forget_routing_apis()

    # ---- BaseModelDeployment ----------------------------------------------------------------------

    async def reconcile_base_model(self, key: Key) -> None:
        """Apply every owned object, publish the adapter set, refresh statuses."""
        await self._base_model_runs.run(key)

    async def base_model_changed(self, key: Key, body: dict[str, Any] | None) -> None:
        """A BaseModelDeployment event. Most are the echo of our own status write, which changes nothing
        the owned objects or the adapters depend on: those only refresh the status."""
        meta = (body or {}).get("metadata") or {}
        seen = (meta.get("uid"), meta.get("generation"), meta.get("deletionTimestamp")) if body else None
        if body is None:
            self.base_model_records.pop(key, None)
        record = self.base_model_records.get(key)
        if seen is not None and record is not None and record.reconciled == seen:
            await self._base_statuses.run(key)
            return
        if record is not None:
            record.reconciled = None
        await self.reconcile_base_model(key)
        if seen is not None:
            self._base_model_record(key).reconciled = seen

    async def converge_owned_objects(self, key: Key) -> None:
        """An owned object changed (drift, deletion, Deployment status): repair it and refresh the model's
        status. Adapters depend only on the model's spec, so they are not re-examined here."""
        await self._owned_runs.run(key)
        if self.placement_outdated(key):  # the Deployment started or stopped failing to create pods
            await self._adapter_sets.run(key)

    async def _reconcile_base_model(self, key: Key) -> None:
        body = self.base_model(key)
        if body is None or body["metadata"].get("deletionTimestamp"):
            await self.refresh_adapters(key)  # they now wait for a base model
            return
        await self._apply_owned(key)
        await self._adapter_sets.run(key)
        await self.refresh_adapters(key)
        await self._base_statuses.run(key)

    async def _converge_owned(self, key: Key) -> None:
        await self._apply_owned(key)
        await self._base_statuses.run(key)

    async def _write_base_model_status(self, key: Key) -> None:
        body = self.base_model(key)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return
        spec, _ = self.parse_spec(body)
        record = self._base_model_record(key)
        problem = record.apply_problem
        deployment = first(self.deployments, key)
        adapters = self.adapters_of(key)
        # Our own status writes reach the index later than we know their outcome: count what we decided.
        phases = {a.name: adapter.facts.phase for a in adapters
                  if (adapter := self.adapter_records.get((key[0], a.name))) and adapter.facts}
        desired = base_model_status(body, spec, problem, deployment, adapters, phases, self.replica_problems(key),
                                    record.routing_problem, first(self.pickers, key), record.traffic)
        known = record.known_status(body.get("status") or {}).get("conditions")
        before = {kind: find(known, kind) for kind in ("Reconciled", "Routing")}
        await write_status(self.client, record, BASE_MODEL_DEPLOYMENT.plural, body, desired)
        for kind, was in before.items():
            after = find(desired["conditions"], kind)
            # A picker that is still starting is no news: the condition says so.
            if after is not None and after["status"] == "False" and after["reason"] not in PICKER_STARTING \
                    and (was is None or was.get("message") != after["message"]):
                await post_event(self.client, body, "Warning", after["reason"], after["message"])

    async def refresh_base_model_status(self, key: Key) -> None:
        await self._base_statuses.run(key)

    async def replicas_changed(self, key: Key) -> None:
        """A pod of the base model came, went or changed: place again, then refresh every status."""
        await self._adapter_sets.run(key)
        await self.refresh_adapters(key)
        await self._base_statuses.run(key)

    # ---- LoraAdapter -------------------------------------------------------------------------------

    async def adapter_changed(self, key: Key, body: dict[str, Any] | None) -> None:
        """React to one adapter's event; `body` is None once the object is gone."""
        namespace, _ = key
        record = self.adapter_records.get(key)
        before = record.facts if record is not None else None
        after: AdapterFacts | None = None
        if body is None:
            self.adapters.remove(*key)
            self.adapter_records.pop(key, None)
            if before is not None:
                self._forget_owners((namespace, before.claim.base or ""))
        else:
            view = AdapterView.from_body(body)
            self.adapters.put(view)
            claim = AdapterClaim.of(view)
            if before is None or before.claim != claim:
                for base in {claim.base, before.claim.base if before else None}:
                    self._forget_owners((namespace, base or ""))
            update = await self._reconcile_adapter(view)
            after = AdapterFacts(claim, update.phase, update.serving,
                                 view.spec.traffic.model if view.spec and view.spec.traffic else None)
            self._adapter_record(view).facts = after
        if before == after:
            return  # most events are status writes and replica reports: nothing else depends on them
        claim_changed = before is None or after is None or before.claim != after.claim
        for base in sorted({facts.claim.base for facts in (before, after) if facts is not None and facts.claim.base}):
            if claim_changed:
                await self._adapter_sets.run((namespace, base))
                await self._recheck_served_name_rivals((namespace, base), key, before, after)
            # A shared name depends on the sharers' phases, and on which names the others serve.
            if claim_changed or any(facts is not None and facts.traffic for facts in (before, after)):
                await self._traffic_runs.run((namespace, base))
            await self._base_statuses.run((namespace, base))

    async def _recheck_served_name_rivals(self, base: Key, key: Key, before: AdapterFacts | None,
                                          after: AdapterFacts | None) -> None:
        """An adapter that took, changed or freed a served name can change its rivals' verdicts."""
        names = {facts.claim.served_name for facts in (before, after) if facts is not None}
        rivals = [a for a in self.adapters_of(base) if a.served_name in names and a.name != key[1]]
        for rival in rivals:
            await self._reconcile_adapter(rival)

    # ---- LoraReplica: what each replica reports ----------------------------------------------------

    async def report_changed(self, base: Key, pod: str, adapters: dict[str, Any] | None) -> None:
        """A replica's LoraReplica changed (`adapters`: its status.adapters) or is gone (None): decide again
        the adapters whose entries differ from what we last saw of that pod, and no other."""
        namespace = base[0]
        before, after = self._seen_reports.get((namespace, pod), {}), adapters or {}
        # A report of a pod that is gone or not yet seen counts for nothing: the pod's own event refreshes all.
        if pod in self.live_replicas(base):
            changed = {name for name in before.keys() | after.keys() if before.get(name) != after.get(name)}
            for name in sorted(changed):
                if (view := self.adapters.find(namespace, name)) is not None:
                    await self._reconcile_adapter(view)
            # Place again by new sizes (where a byte budget counts them) or counts demand changed; `|`, not `or`:
            # demand is stepped even when sizes already call for a new placement.
            if self.sizes_changed(base, changed) | await self.scale_with_demand(base, changed):
                await self._adapter_sets.run(base)
        # Only once decided: a failed run is retried (handlers.py) and must find the same difference again.
        if adapters is None:
            self._seen_reports.pop((namespace, pod), None)
        else:
            self._seen_reports[(namespace, pod)] = dict(adapters)

    async def refresh_adapters(self, key: Key) -> None:
        """Recompute the status of every adapter of one base model (limits, replicas or pods changed)."""
        for view in self.adapters_of(key):
            await self._reconcile_adapter(view)

    async def _reconcile_adapter(self, view: AdapterView) -> AdapterStatusUpdate:
        """Finalizer, verdict and status of one adapter; returns the status it now has."""
        async with self._locks[("adapter", view.namespace, view.name)]:
            record = self._adapter_record(view)
            if not view.deleting and FINALIZER not in view.finalizers and record.finalizer_given_to != view.uid:
                await set_finalizer(self.client, view, present=True)
                record.finalizer_given_to = view.uid
            base_key = (view.namespace, view.base_model or "")
            body = self.base_model(base_key) if view.base_model else None
            spec = None
            if body is not None and not body["metadata"].get("deletionTimestamp"):
                spec, _ = self.parse_spec(body)
            # The index took this event before this call, so the owners are never older than it.
            verdict = check_adapter(view, spec, [], self.owners_of(base_key) if spec else {})
            base_record = self.base_model_records.get(base_key)
            if verdict.accepted and base_record is not None and view.uid in base_record.left_out:
                verdict = adapter_set_full(base_key[1], self.settings.adapter_set_max_bytes)
            replicas = self.live_replicas(base_key) if view.base_model else []
            entries = self.adapter_entries(base_key, view.name) if view.base_model else {}
            placed = await self.placement_of(base_key, view.name) if verdict.accepted and not view.deleting else None
            loaded = self.loaded_generation(base_key, view.uid) if view.base_model else None
            update = adapter_status(view, verdict, replicas, entries, placed, loaded)
            adapter_body = {"metadata": {"namespace": view.namespace, "name": view.name},
                            "status": view.status}
            previous_phase = record.known_status(view.status).get("phase")
            await write_status(self.client, record, LORA_ADAPTER.plural, adapter_body, update.status)
            if update.phase != previous_phase:
                await self._announce_phase(view, update.phase, update.status)
            if view.deleting and FINALIZER in view.finalizers and cleanup_done(replicas, entries):
                await set_finalizer(self.client, view, present=False)
            return update

    async def _announce_phase(self, view: AdapterView, phase: str, status: dict[str, Any]) -> None:
        ready = next(c for c in status["conditions"] if c["type"] == "Ready")
        involved = {"apiVersion": API_VERSION, "kind": LORA_ADAPTER.kind,
                    "metadata": {"namespace": view.namespace, "name": view.name, "uid": view.uid}}
        event_type = "Warning" if phase == "Failed" else "Normal"
        await post_event(self.client, involved, event_type, ready["reason"], f"{phase}: {ready['message']}")
