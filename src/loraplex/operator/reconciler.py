"""Level-triggered reconciliation: read the cluster (kopf indices), call the pure core, write the difference.

Every method can run any number of times with the same outcome. Writes happen only where the
cluster differs from what the core computed, so re-running changes nothing and status never churns.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import fnmatch
import logging
from collections.abc import Awaitable, Callable, Hashable, Mapping
from typing import Any

import pydantic

from loraplex.api.adapter_set import DATA_KEY
from loraplex.api.conditions import find, merge_conditions, utc_now
from loraplex.api.types import BASE_MODEL_DEPLOYMENT, GROUP, LORA_ADAPTER, VERSION, BaseModelDeploymentSpec
from loraplex.kube import ApiError, KubeClient, NotFound, resource_path, retry_on_conflict
from loraplex.operator import render
from loraplex.operator.adapter_index import AdapterIndex
from loraplex.operator.adapters import (
    FINALIZER,
    AdapterView,
    adapter_set_full,
    adapter_status,
    check_adapter,
    cleanup_done,
    desired_adapters,
    served_name_owners,
)
from loraplex.operator.apply import apply_object, in_sync
from loraplex.operator.base_models import base_model_status
from loraplex.operator.events import post_event
from loraplex.operator.settings import OperatorSettings

logger = logging.getLogger(__name__)
API_VERSION = f"{GROUP}/{VERSION}"
Key = tuple[str, str]  # (namespace, name)


def _first(index: Mapping[Any, Any], key: Any) -> Any:
    """The single value kopf's index holds under `key`, or None."""
    values = index.get(key)
    return next(iter(values), None) if values else None


class Coalescer:
    """Runs `fn(key)` so that concurrent requests for one key share a run that starts after them.

    Many adapter events for one base model collapse into a few adapter-set writes.

    With `min_interval`, runs for one key start at least that many seconds apart: the first request after
    a quiet spell runs at once, and a burst is folded into one run per interval instead of one per event.
    """

    def __init__(self, fn: Callable[[Any], Awaitable[None]], min_interval: float = 0.0):
        self._fn = fn
        self._min_interval = min_interval
        self._pending: dict[Hashable, asyncio.Future[None]] = {}
        self._running: set[Hashable] = set()
        self._last_start: dict[Hashable, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self, key: Hashable) -> None:
        future = self._pending.get(key)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self._pending[key] = future
            if key not in self._running:
                task = asyncio.create_task(self._drain(key))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        await asyncio.shield(future)

    async def _drain(self, key: Hashable) -> None:
        self._running.add(key)
        try:
            while key in self._pending:
                loop = asyncio.get_running_loop()
                wait = self._last_start.get(key, -self._min_interval) + self._min_interval - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)  # requests arriving meanwhile join this run
                self._last_start[key] = loop.time()
                future = self._pending.pop(key)
                try:
                    await self._fn(key)
                except Exception as exc:
                    future.set_exception(exc)
                else:
                    future.set_result(None)
        finally:
            self._running.discard(key)


@dataclasses.dataclass(frozen=True)
class AdapterClaim:
    """What an adapter's base model depends on: its adapter set and who holds each served name."""

    base: str | None
    served_name: str
    spec: tuple[Any, ...]

    @classmethod
    def of(cls, view: AdapterView) -> AdapterClaim:
        return cls(view.base_model, view.served_name, (view.uid, view.generation, view.deleting))


@dataclasses.dataclass(frozen=True)
class AdapterFacts:
    """The parts of an adapter that other objects depend on: its claim, and its phase (for the counts)."""

    claim: AdapterClaim
    phase: str


class Reconciler:
    def __init__(self, client: KubeClient, settings: OperatorSettings, indices: Mapping[str, Any],
                 namespaces: list[str] | None = None):
        self.client = client
        self.settings = settings
        self.namespaces = namespaces  # None: every namespace
        self.base_models = indices["base_model_index"]
        self.adapters = AdapterIndex()
        self.replicas = indices["replica_index"]
        self.deployments = indices["deployment_index"]
        self._locks: dict[Hashable, asyncio.Lock] = collections.defaultdict(asyncio.Lock)
        self._adapter_facts: dict[Key, AdapterFacts] = {}  # what others depend on, as last seen
        self._apply_problems: dict[Key, tuple[str, str] | None] = {}  # (reason, message) of the last apply
        # Status we wrote that the indices may not show yet (their watch event is still on its way).
        self._written: dict[tuple[str, str, str], dict[str, Any]] = {}
        self._finalized: set[str] = set()  # uids we already gave our finalizer
        # Served-name owners per base model, dropped whenever an adapter's claim changes.
        self._owners: dict[Key, dict[str, AdapterView]] = {}
        # The adapter set as we last applied it, so echoes of our own writes cost nothing.
        self._applied_adapter_sets: dict[Key, dict[str, Any]] = {}
        # uids of accepted adapters that did not fit in their base model's adapter set.
        self._left_out: dict[Key, set[str]] = {}
        # What each base model's last full reconcile saw of it: (uid, generation, deletionTimestamp).
        self._reconciled_base_models: dict[Key, tuple[Any, ...]] = {}
        self._base_model_runs = Coalescer(self._reconcile_base_model)
        self._owned_runs = Coalescer(self._converge_owned)
        # Every write of an adapter set carries the whole set (and reaches every replica's sidecar), so a
        # burst of adapter changes is published a few times a second, not once per adapter.
        self._adapter_sets = Coalescer(self._sync_adapter_set, settings.batch_seconds)
        self._base_statuses = Coalescer(self._write_base_model_status, settings.batch_seconds)

    # ---- lookups over the indices ---------------------------------------------------------------

    def base_model(self, key: Key) -> dict[str, Any] | None:
        return _first(self.base_models, key)

    def adapters_of(self, key: Key) -> list[AdapterView]:
        return list(self.adapters.get(key, ()))

    async def load_adapters(self) -> None:
        """LIST every LoraAdapter in scope into the index: before the first event, and at every resync."""
        changes_before = self.adapters.changes
        plural = LORA_ADAPTER.plural
        if self.namespaces is None or any(set(n) & set("*?[!") for n in self.namespaces):
            items = (await self.client.list(resource_path(API_VERSION, plural))).get("items") or []
            if self.namespaces is not None:  # kopf also takes glob patterns of namespaces
                items = [i for i in items if any(fnmatch.fnmatchcase(i["metadata"].get("namespace", ""), pattern)
                                                 for pattern in self.namespaces)]
        else:
            items = []
            for namespace in self.namespaces:
                items += (await self.client.list(resource_path(API_VERSION, plural, namespace))).get("items") or []
        self.adapters.merge_list(items, changes_before)
        self._owners.clear()

    def owners_of(self, key: Key) -> dict[str, AdapterView]:
        """Who holds each served name among one base model's adapters."""
        owners = self._owners.get(key)
        if owners is None:
            owners = self._owners[key] = served_name_owners(self.adapters_of(key))
        return owners

    def adapter_phases(self) -> dict[str, int]:
        counts: dict[str, int] = collections.Counter()
        for views in self.adapters.values():
            for view in views:
                counts[view.status.get("phase") or "Unknown"] += 1
        return dict(counts)

    def live_replicas(self, key: Key) -> list[str]:
        return sorted(name for name, _ in self.replicas.get(key, ()))

    def replica_problems(self, key: Key) -> dict[str, str]:
        return {name: problem for name, problem in self.replicas.get(key, ()) if problem is not None}

    @staticmethod
    def parse_spec(body: dict[str, Any]) -> tuple[BaseModelDeploymentSpec | None, str | None]:
        try:
            return BaseModelDeploymentSpec.model_validate(body.get("spec") or {}), None
        except pydantic.ValidationError as exc:
            return None, "; ".join(f"spec.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())

    # ---- BaseModelDeployment ----------------------------------------------------------------------

    async def reconcile_base_model(self, key: Key) -> None:
        """Apply every owned object, publish the adapter set, refresh statuses."""
        await self._base_model_runs.run(key)

    async def base_model_changed(self, key: Key, body: dict[str, Any] | None) -> None:
        """A BaseModelDeployment event. Most are the echo of our own status write, which changes nothing
        the owned objects or the adapters depend on: those only refresh the status."""
        meta = (body or {}).get("metadata") or {}
        seen = (meta.get("uid"), meta.get("generation"), meta.get("deletionTimestamp")) if body else None
        if seen is not None and self._reconciled_base_models.get(key) == seen:
            await self._base_statuses.run(key)
            return
        self._reconciled_base_models.pop(key, None)
        await self.reconcile_base_model(key)
        if seen is not None:
            self._reconciled_base_models[key] = seen

    async def converge_owned_objects(self, key: Key) -> None:
        """An owned object changed (drift, deletion, Deployment status): repair it and refresh the model's
        status. Adapters depend only on the model's spec, so they are not re-examined here."""
        await self._owned_runs.run(key)

    async def sync_adapter_set(self, key: Key, live: dict[str, Any] | None) -> None:
        """The adapter-set ConfigMap changed (`live`) or is gone (None): put back what it should say."""
        applied = self._applied_adapter_sets.get(key)
        if live is not None and applied is not None and in_sync(applied, live):
            return  # the echo of our own write
        self._applied_adapter_sets.pop(key, None)
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

    async def _apply_owned(self, key: Key) -> None:
        # One at a time per base model, each reading the spec as it is when it starts: the last to finish
        # has applied, and recorded the problem of, the newest spec.
        async with self._locks[("owned", *key)]:
            body = self.base_model(key)
            if body is not None and not body["metadata"].get("deletionTimestamp"):
                await self._apply_owned_objects(key, body)

    async def _apply_owned_objects(self, key: Key, body: dict[str, Any]) -> None:
        spec, error = self.parse_spec(body)
        # Checked before any write: the API server would refuse each with a 422, on every retry.
        bad_name = render.name_problems(body["metadata"]["name"])
        problem = ("InvalidName", "; ".join(bad_name)) if bad_name else ("InvalidSpec", error) if error else None
        if spec is not None and not bad_name:
            try:
                children = render.render_children(body, spec, self.settings)
            except render.RenderError as exc:
                problem = ("InvalidSpec", str(exc))
            else:
                try:
                    for child in children:
                        await apply_object(self.client, child)
                except ApiError as exc:
                    problem = ("ApplyFailed", f"Applying owned objects failed: {exc}")
        self._apply_problems[key] = problem

    async def _sync_adapter_set(self, key: Key) -> None:
        body = self.base_model(key)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return
        spec, _ = self.parse_spec(body)
        if spec is None or render.spec_problems(spec) or render.name_problems(body["metadata"]["name"]):
            return  # keep serving the last good set until the spec is fixed
        adapters = desired_adapters(spec, self.adapters_of(key), self.owners_of(key))
        desired = render.render_adapter_set(body, spec, adapters)
        left_out: list[Any] = []
        if len(desired["data"][DATA_KEY]) > self.settings.adapter_set_max_bytes:
            adapters, left_out = render.fit_adapter_set(body, spec, adapters, self.settings.adapter_set_max_bytes)
            desired = render.render_adapter_set(body, spec, adapters)
        if desired != self._applied_adapter_sets.get(key):  # else as we last applied it, and nothing moved it
            await apply_object(self.client, desired)
            self._applied_adapter_sets[key] = desired
        await self._update_left_out(key, body, {a.uid for a in left_out})

    async def _update_left_out(self, key: Key, body: dict[str, Any], uids: set[str]) -> None:
        """Record which adapters did not fit, and re-examine those that went in or out."""
        before = self._left_out.get(key, set())
        if uids == before:
            return
        self._left_out[key] = uids
        if uids - before:
            await post_event(self.client, body, "Warning", "AdapterSetFull",
                             f"{len(uids)} adapter(s) do not fit in the adapter set "
                             f"(at most {self.settings.adapter_set_max_bytes} bytes) and wait for room.")
        for view in self.adapters_of(key):
            if view.uid in uids ^ before:
                await self._reconcile_adapter(view)

    async def _write_base_model_status(self, key: Key) -> None:
        body = self.base_model(key)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return
        spec, _ = self.parse_spec(body)
        problem = self._apply_problems.get(key)
        deployment = _first(self.deployments, key)
        adapters = self.adapters_of(key)
        # Our own status writes reach the index later than we know their outcome: count what we decided.
        phases = {a.name: facts.phase for a in adapters if (facts := self._adapter_facts.get((key[0], a.name)))}
        desired = base_model_status(body, spec, problem, deployment, adapters, phases, self.replica_problems(key))
        before = find(self._known_status(BASE_MODEL_DEPLOYMENT.plural, body).get("conditions"), "Reconciled")
        await self._write_status(BASE_MODEL_DEPLOYMENT.plural, body, desired)
        after = desired["conditions"][0]
        if after["status"] == "False" and (before is None or before.get("message") != after["message"]):
            await post_event(self.client, body, "Warning", after["reason"], after["message"])

    async def refresh_base_model_status(self, key: Key) -> None:
        await self._base_statuses.run(key)

    # ---- LoraAdapter -------------------------------------------------------------------------------

    async def adapter_changed(self, key: Key, body: dict[str, Any] | None) -> None:
        """React to one adapter's event; `body` is None once the object is gone."""
        namespace, _ = key
        before = self._adapter_facts.get(key)
        after: AdapterFacts | None = None
        if body is None:
            self.adapters.remove(*key)
            self._adapter_facts.pop(key, None)
            self._written.pop((LORA_ADAPTER.plural, *key), None)
            if before is not None:
                self._owners.pop((namespace, before.claim.base or ""), None)
        else:
            view = AdapterView.from_body(body)
            self.adapters.put(view)
            claim = AdapterClaim.of(view)
            if before is None or before.claim != claim:
                for base in {claim.base, before.claim.base if before else None}:
                    self._owners.pop((namespace, base or ""), None)
            after = AdapterFacts(claim, await self._reconcile_adapter(view))
            self._adapter_facts[key] = after
        if before == after:
            return  # most events are status writes and replica reports: nothing else depends on them
        claim_changed = before is None or after is None or before.claim != after.claim
        for base in sorted({facts.claim.base for facts in (before, after) if facts is not None and facts.claim.base}):
            if claim_changed:
                await self._adapter_sets.run((namespace, base))
                await self._recheck_served_name_rivals((namespace, base), key, before, after)
            await self._base_statuses.run((namespace, base))

    async def _recheck_served_name_rivals(self, base: Key, key: Key, before: AdapterFacts | None,
                                          after: AdapterFacts | None) -> None:
        """An adapter that took, changed or freed a served name can change its rivals' verdicts."""
        names = {facts.claim.served_name for facts in (before, after) if facts is not None}
        rivals = [a for a in self.adapters_of(base) if a.served_name in names and a.name != key[1]]
        for rival in rivals:
            await self._reconcile_adapter(rival)

    async def refresh_adapters(self, key: Key) -> None:
        """Recompute the status of every adapter of one base model (limits, replicas or pods changed)."""
        for view in self.adapters_of(key):
            await self._reconcile_adapter(view)

    async def _reconcile_adapter(self, view: AdapterView) -> str:
        """Finalizer, verdict and status of one adapter; returns the phase it now has."""
        async with self._locks[("adapter", view.namespace, view.name)]:
            if not view.deleting and FINALIZER not in view.finalizers and view.uid not in self._finalized:
                await self._set_finalizer(view, present=True)
                self._finalized.add(view.uid)
            base_key = (view.namespace, view.base_model or "")
            body = self.base_model(base_key) if view.base_model else None
            spec = None
            if body is not None and not body["metadata"].get("deletionTimestamp"):
                spec, _ = self.parse_spec(body)
            # The index took this event before this call, so the owners are never older than it.
            verdict = check_adapter(view, spec, [], self.owners_of(base_key) if spec else {})
            if verdict.accepted and view.uid in self._left_out.get(base_key, ()):
                verdict = adapter_set_full(base_key[1], self.settings.adapter_set_max_bytes)
            replicas = self.live_replicas(base_key) if view.base_model else []
            update = adapter_status(view, verdict, replicas)
            patch_extra = {"replicaStatus": {pod: None for pod in update.stale_replicas}} \
                if update.stale_replicas else {}
            adapter_body = {"metadata": {"namespace": view.namespace, "name": view.name},
                            "status": view.status}
            previous_phase = self._known_status(LORA_ADAPTER.plural, adapter_body).get("phase")
            await self._write_status(LORA_ADAPTER.plural, adapter_body, update.status, patch_extra)
            if update.phase != previous_phase:
                await self._announce_phase(view, update.phase, update.status)
            if view.deleting and FINALIZER in view.finalizers and cleanup_done(view, replicas):
                await self._set_finalizer(view, present=False)
            return update.phase

    async def _announce_phase(self, view: AdapterView, phase: str, status: dict[str, Any]) -> None:
        ready = next(c for c in status["conditions"] if c["type"] == "Ready")
        involved = {"apiVersion": API_VERSION, "kind": LORA_ADAPTER.kind,
                    "metadata": {"namespace": view.namespace, "name": view.name, "uid": view.uid}}
        event_type = "Warning" if phase == "Failed" else "Normal"
        await post_event(self.client, involved, event_type, ready["reason"], f"{phase}: {ready['message']}")

    async def _set_finalizer(self, view: AdapterView, present: bool) -> None:
        path = resource_path(API_VERSION, LORA_ADAPTER.plural, view.namespace, view.name)

        # The first attempt trusts the event's copy; if the object moved since, the 409 makes us read it.
        known: dict[str, Any] | None = {
            "uid": view.uid, "finalizers": list(view.finalizers), "resourceVersion": view.resource_version,
            "deletionTimestamp": "set" if view.deleting else None} if view.resource_version else None

        async def attempt() -> None:
            nonlocal known
            meta, known = known or (await self.client.get(path))["metadata"], None
            if meta.get("uid") != view.uid:
                return
            finalizers = list(meta.get("finalizers") or [])
            if (FINALIZER in finalizers) == present:
                return
            if present and meta.get("deletionTimestamp"):
                return  # finalizers cannot be added to an object that is being deleted
            finalizers = [*finalizers, FINALIZER] if present else [f for f in finalizers if f != FINALIZER]
            await self.client.merge_patch(path, {"metadata": {"finalizers": finalizers or None,
                                                              "resourceVersion": meta["resourceVersion"]}})
            logger.info("%s finalizer on LoraAdapter %s/%s", "added" if present else "released",
                        view.namespace, view.name)

        try:
            await retry_on_conflict(attempt)
        except NotFound:
            pass

    # ---- shared ------------------------------------------------------------------------------------

    def forget_written_status(self) -> None:
        """Trust the indices alone again (the periodic resync calls this, undoing any external edit)."""
        self._written.clear()
        self._finalized.clear()
        self._owners.clear()
        self._applied_adapter_sets.clear()
        self._reconciled_base_models.clear()

    def _known_status(self, plural: str, body: dict[str, Any]) -> dict[str, Any]:
        """The object's status as the cluster has it, counting our own writes the index has not seen yet.

        We are the only writer of the fields we cache, so our last write is their truth until the
        index catches up, after which the cache entry is dropped.
        """
        meta = body["metadata"]
        key = (plural, meta["namespace"], meta["name"])
        observed = body.get("status") or {}
        written = self._written.get(key)
        if written is None:
            return observed
        if all(observed.get(field) == value for field, value in written.items()):
            del self._written[key]
            return observed
        return {**observed, **written}

    async def _write_status(self, plural: str, body: dict[str, Any], desired: dict[str, Any],
                            extra: dict[str, Any] | None = None) -> None:
        """Merge-patch the status subresource, only where it differs from what is there."""
        current = self._known_status(plural, body)
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
            await self.client.merge_patch(path, {"status": changed})
        except NotFound:
            return  # deleted meanwhile; nothing left to report on
        self._written[(plural, meta["namespace"], meta["name"])] = {
            k: v for k, v in wanted.items() if v is not None}

