"""The reconciler's part in routing: apply the InferencePool and its endpoint picker when the cluster serves the
Gateway API Inference Extension, and the InferenceModelRewrites of shared model names (traffic.py); prune them
once routing is turned off, and remember what stood in the way (for the Routing condition and status.traffic).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Hashable
from typing import Any

from loraplex.api.types import BASE_MODEL_LABEL, BaseModelDeploymentSpec, ModelTraffic
from loraplex.kube import ApiError, NotFound, resource_path
from loraplex.operator.adapters import AdapterView
from loraplex.operator.apply import PLURALS, apply_object
from loraplex.operator.cluster_view import ClusterView, Key, first
from loraplex.operator.events import post_event
from loraplex.operator.naming import controller_ref
from loraplex.operator.records import AdapterRecord, BaseModelRecord
from loraplex.operator.routing import (
    OBJECTIVE_GROUPS,
    OBJECTIVE_VERSION,
    POOL_API_VERSION,
    render_model_rewrite,
    render_routing,
    routing_name_problem,
    routing_object_refs,
)
from loraplex.operator.traffic import Candidate, plan_traffic

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RoutingApis:
    """Which of the Inference Extension's APIs the cluster serves: the pool, and the apiVersion of
    InferenceModelRewrite the picker reads (llm-d.ai first, as the picker itself prefers), or None."""

    inference_pool: bool
    model_rewrite: str | None = None


async def _serves(client: Any, api_version: str, plural: str) -> bool:
    try:
        resources = (await client.get(f"/apis/{api_version}")).get("resources") or []
    except NotFound:
        return False
    return any(r.get("name") == plural for r in resources)


async def discover_routing_apis(client: Any) -> RoutingApis:
    rewrite = None
    for group in OBJECTIVE_GROUPS:
        if await _serves(client, f"{group}/{OBJECTIVE_VERSION}", "inferencemodelrewrites"):
            rewrite = f"{group}/{OBJECTIVE_VERSION}"
            break
    return RoutingApis(inference_pool=await _serves(client, POOL_API_VERSION, "inferencepools"), model_rewrite=rewrite)


def pool_unavailable() -> tuple[str, str]:
    return ("InferencePoolUnavailable",
            f"The cluster does not serve inferencepools.{POOL_API_VERSION}: install the Gateway API Inference "
            "Extension's CRDs (v1.5.0 or later); loraplex looks again at its next resync.")


class RoutingRuns(ClusterView):
    """Mixed into the Reconciler, which provides the locks and the records. What the cluster serves is looked up
    once and again at every resync."""

    _locks: dict[Hashable, asyncio.Lock]
    adapter_records: dict[Key, AdapterRecord]
    _routing_apis: RoutingApis | None = None

    def _base_model_record(self, key: Key) -> BaseModelRecord:
        raise NotImplementedError

    def owners_of(self, key: Key) -> dict[str, AdapterView]:
        raise NotImplementedError

    def forget_routing_apis(self) -> None:
        self._routing_apis = None

    async def routing_apis(self) -> RoutingApis:
        async with self._locks["routing-apis"]:  # every base model's first run asks at once: one lookup serves all
            if self._routing_apis is None:
                self._routing_apis = await discover_routing_apis(self.client)
            return self._routing_apis

    async def apply_routing(self, key: Key, body: dict[str, Any], spec: BaseModelDeploymentSpec
                            ) -> tuple[str, str] | None:
        """Bring routing to what the spec asks; the (reason, message) of what keeps it from working, or None."""
        record = self._base_model_record(key)
        if spec.routing is None:
            # Left over from routing turned off: known from the picker, or looked for once after each start and
            # resync (an apply that failed halfway leaves no picker but the rest).
            if record.routing_applied is not False or first(self.pickers, key) is not None:
                await self._prune_routing(key, body, spec)
                record.routing_applied = False
            return None
        if (bad_name := routing_name_problem(key[1])) is not None:
            return ("InvalidName", f"Routing cannot be set up: {bad_name}.")
        if not (await self.routing_apis()).inference_pool:
            return pool_unavailable()
        record.routing_applied = True
        try:
            for child in render_routing(body, spec):
                await apply_object(self.client, child)
        except ApiError as exc:
            return ("ApplyFailed", f"Applying the routing objects failed: {exc}")
        return None

    async def _prune_routing(self, key: Key, owner: dict[str, Any], spec: BaseModelDeploymentSpec) -> None:
        """Delete what routing added, each object only if this base model controls it."""
        meta = owner["metadata"]
        if (api_version := (await self.routing_apis()).model_rewrite) is not None:
            # Under the traffic lock: a traffic run that read the spec before routing went off finishes first.
            async with self._locks[("traffic", *key)]:
                record = self._base_model_record(key)
                record.applied_rewrites = None
                await self._converge_rewrites(owner, record, [], api_version)
        for api_version, kind, name in routing_object_refs(owner, spec):
            path = resource_path(api_version, PLURALS[kind], meta["namespace"], name)
            live = await self.client.get_or_none(path)
            if live is not None and _controlled_by(live, meta["uid"]):
                await self._delete_if_present(path)
                logger.info("deleted %s %s/%s: routing is off", kind, meta["namespace"], name)

    # ---- shared model names (spec.traffic) ----------------------------------------------------------

    def traffic_candidates(self, key: Key) -> list[Candidate]:
        candidates = []
        for view in self.adapters_of(key):
            if view.spec is None or view.spec.traffic is None or view.deleting:
                continue
            facts = (record := self.adapter_records.get((key[0], view.name))) and record.facts
            # Not decided since the operator started: as its status says, not as if it served nowhere.
            phase = facts.phase if facts else view.status.get("phase")
            serving = facts.serving if facts else int(view.status.get("readyReplicas") or 0) > 0
            candidates.append(Candidate(view.name, view.served_name, view.spec.traffic.model, view.spec.traffic.weight,
                                        phase, serving))
        return candidates

    async def apply_traffic(self, key: Key) -> None:
        """Bring the base model's InferenceModelRewrites to what its adapters' spec.traffic asks now, and keep the
        plan for its status; an Event when an adapter is withdrawn from a model's requests."""
        async with self._locks[("traffic", *key)]:
            body = self.base_model(key)
            if body is None or body["metadata"].get("deletionTimestamp"):
                return
            spec, _ = self.parse_spec(body)
            record = self._base_model_record(key)
            candidates = self.traffic_candidates(key)
            if spec is None or (spec.routing is None and not candidates):
                record.traffic = []
                return
            api_version = (await self.routing_apis()).model_rewrite if spec.routing is not None else None
            served = {name: view.name for name, view in self.owners_of(key).items()}
            plan = plan_traffic(candidates, served, _rewrite_problem(key[1], spec, record, api_version), spec.model)
            if api_version is not None:
                desired = [render_model_rewrite(body, m.model, m.targets, api_version) for m in plan if m.targets]
                await self._converge_rewrites(body, record, desired, api_version)
            await self._announce_withdrawals(body, record.traffic, plan)
            record.traffic = plan

    async def _converge_rewrites(self, owner: dict[str, Any], record: BaseModelRecord, desired: list[dict[str, Any]],
                                 api_version: str) -> None:
        meta = owner["metadata"]
        if record.applied_rewrites is None:
            items = (await self.client.list(resource_path(api_version, "inferencemodelrewrites", meta["namespace"]),
                                            label_selector=f"{BASE_MODEL_LABEL}={meta['name']}")).get("items") or []
            record.applied_rewrites = {i["metadata"]["name"] for i in items if _controlled_by(i, meta["uid"])}
        for rewrite in desired:
            await apply_object(self.client, rewrite)
        wanted = {r["metadata"]["name"] for r in desired}
        for name in sorted(record.applied_rewrites - wanted):
            await self._delete_if_present(resource_path(api_version, "inferencemodelrewrites", meta["namespace"], name))
        record.applied_rewrites = wanted

    async def _delete_if_present(self, path: str) -> None:
        try:
            await self.client.delete(path)
        except NotFound:
            pass

    async def _announce_withdrawals(self, owner: dict[str, Any], before: list[ModelTraffic] | None,
                                    after: list[ModelTraffic]) -> None:
        if before is None:  # the first plan since the operator started: nothing to compare with
            return
        served_before = {(m.model, t.adapter) for m in before for t in m.targets or []}
        for model in after:
            for withheld in model.withheld or []:
                if (model.model, withheld.adapter) in served_before:
                    await post_event(self.client, owner, "Warning", "TrafficWithdrawn",
                                     f"Requests for model {model.model} no longer go to {withheld.adapter}: "
                                     f"{withheld.reason}.")


def _rewrite_problem(base_model: str, spec: BaseModelDeploymentSpec, record: BaseModelRecord,
                     api_version: str | None) -> str | None:
    """Why no model name of the base model is rewritten at all, or None."""
    if spec.routing is None:
        return f"BaseModelDeployment {base_model} has no spec.routing: nothing rewrites model names"
    if record.routing_problem is not None:
        return f"Routing is not in place: {record.routing_problem[1]}"
    if api_version is None:
        return ("The cluster serves no InferenceModelRewrite API (llm-d.ai/v1alpha2, or "
                "inference.networking.x-k8s.io/v1alpha2): install the endpoint picker's CRDs")
    return None


def _controlled_by(obj: dict[str, Any], uid: str) -> bool:
    return (controller_ref(obj.get("metadata") or {}) or {}).get("uid") == uid
