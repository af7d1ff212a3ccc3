"""The reconciler's part in routing: apply the InferencePool and its endpoint picker when the cluster serves the
Gateway API Inference Extension, prune them once routing is turned off, and remember what stood in the way
(for the Routing condition).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from loraplex.api.types import BaseModelDeploymentSpec
from loraplex.kube import ApiError, NotFound, resource_path
from loraplex.operator.apply import PLURALS, apply_object
from loraplex.operator.cluster_view import ClusterView, Key, first
from loraplex.operator.routing import (
    POOL_API_VERSION,
    render_routing,
    routing_name_problem,
    routing_object_refs,
)

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RoutingApis:
    """Which of the Inference Extension's APIs the cluster serves."""

    inference_pool: bool


async def discover_routing_apis(client: Any) -> RoutingApis:
    try:
        resources = (await client.get(f"/apis/{POOL_API_VERSION}")).get("resources") or []
    except NotFound:
        return RoutingApis(inference_pool=False)
    return RoutingApis(inference_pool=any(r.get("name") == "inferencepools" for r in resources))


def pool_unavailable() -> tuple[str, str]:
    return ("InferencePoolUnavailable",
            f"The cluster does not serve inferencepools.{POOL_API_VERSION}: install the Gateway API Inference "
            "Extension's CRDs (v1.5.0 or later); loraplex looks again at its next resync.")


class RoutingRuns(ClusterView):
    """Mixed into the Reconciler. What the cluster serves is looked up once and again at every resync."""

    _routing_apis: RoutingApis | None = None

    def forget_routing_apis(self) -> None:
        self._routing_apis = None

    async def routing_apis(self) -> RoutingApis:
        if self._routing_apis is None:
            self._routing_apis = await discover_routing_apis(self.client)
        return self._routing_apis

    async def apply_routing(self, key: Key, body: dict[str, Any], spec: BaseModelDeploymentSpec
                            ) -> tuple[str, str] | None:
        """Bring routing to what the spec asks; the (reason, message) of what keeps it from working, or None."""
        if spec.routing is None:
            if first(self.pickers, key) is not None:
                await self._prune_routing(body)
            return None
        if (bad_name := routing_name_problem(key[1])) is not None:
            return ("InvalidName", f"Routing cannot be set up: {bad_name}.")
        if not (await self.routing_apis()).inference_pool:
            return pool_unavailable()
        try:
            for child in render_routing(body, spec):
                await apply_object(self.client, child)
        except ApiError as exc:
            return ("ApplyFailed", f"Applying the routing objects failed: {exc}")
        return None

    async def _prune_routing(self, owner: dict[str, Any]) -> None:
        """Delete what routing added, each object only if this base model controls it."""
        meta = owner["metadata"]
        for api_version, kind, name in routing_object_refs(meta["name"]):
            path = resource_path(api_version, PLURALS[kind], meta["namespace"], name)
            live = await self.client.get_or_none(path)
            refs = (live or {}).get("metadata", {}).get("ownerReferences") or []
            if any(ref.get("uid") == meta["uid"] and ref.get("controller") for ref in refs):
                try:
                    await self.client.delete(path)
                except NotFound:
                    pass
                logger.info("deleted %s %s/%s: routing is off", kind, meta["namespace"], name)
