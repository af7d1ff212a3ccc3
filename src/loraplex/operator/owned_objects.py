"""The reconciler's part in a base model's owned objects: render the Deployment, Service and RBAC from its spec,
apply them and then routing's (routing_runs.py), and remember what stopped them (for the Reconciled and Routing
conditions); warn once per spec when the runtime version its rules go by is assumed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable
from typing import Any

from loraplex.api.runtime_capabilities import deployed_version, version_note
from loraplex.kube import ApiError
from loraplex.operator import naming, render
from loraplex.operator.apply import apply_object
from loraplex.operator.cluster_view import Key
from loraplex.operator.events import post_event
from loraplex.operator.records import BaseModelRecord
from loraplex.operator.routing_runs import RoutingRuns
from loraplex.operator.settings import OperatorSettings


class OwnedObjectRuns(RoutingRuns):
    """Mixed into the Reconciler, which provides the settings, the locks and the records."""

    settings: OperatorSettings
    _locks: dict[Hashable, asyncio.Lock]

    def _base_model_record(self, key: Key) -> BaseModelRecord:
        raise NotImplementedError

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
        bad_name = naming.name_problems(body["metadata"]["name"])
        problem = ("InvalidName", "; ".join(bad_name)) if bad_name else ("InvalidSpec", error) if error else None
        routing_problem = None
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
                else:
                    routing_problem = await self.apply_routing(key, body, spec)
                await self._note_assumed_version(key, body, version_note(
                    spec.runtime, deployed_version(spec.runtime, spec.image, spec.runtime_version)))
        record = self._base_model_record(key)
        record.apply_problem, record.routing_problem = problem, routing_problem
        if spec is not None and not bad_name:
            await self.apply_traffic(key)

    async def _note_assumed_version(self, key: Key, body: dict[str, Any], note: str | None) -> None:
        """Warn once per spec that its runtime version is assumed: the rules it is judged by may be wrong."""
        record = self._base_model_record(key)
        if note and note != record.version_note:
            await post_event(self.client, body, "Warning", "RuntimeVersionAssumed", f"{note[0].upper()}{note[1:]}.")
        record.version_note = note
