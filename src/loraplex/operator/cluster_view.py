"""What the operator knows of the cluster: kopf's indices of base models, replicas, their LoraReplica reports,
Deployments and endpoint pickers, and its own index of LoraAdapters, with the lookups every decision starts from."""

from __future__ import annotations

import collections
import fnmatch
from collections.abc import Mapping
from typing import Any

import pydantic

from loraplex.api.types import API_VERSION, LORA_ADAPTER, BaseModelDeploymentSpec
from loraplex.kube import KubeClient, resource_path
from loraplex.operator.adapter_index import AdapterIndex
from loraplex.operator.adapters import AdapterView

Key = tuple[str, str]  # (namespace, name)


def first(index: Mapping[Any, Any], key: Any) -> Any:
    """The single value kopf's index holds under `key`, or None."""
    values = index.get(key)
    return next(iter(values), None) if values else None


class ClusterView:
    def __init__(self, client: KubeClient, indices: Mapping[str, Any], namespaces: list[str] | None = None):
        self.client = client
        self.namespaces = namespaces  # None: every namespace
        self.base_models = indices["base_model_index"]
        self.adapters = AdapterIndex()
        self.replicas = indices["replica_index"]
        self.reports = indices["replica_report_index"]  # (namespace, base model) -> [(pod, {adapter: entry})]
        self.deployments = indices["deployment_index"]
        self.pickers = indices["picker_index"]  # the endpoint pickers' Deployments, where routing is on

    def base_model(self, key: Key) -> dict[str, Any] | None:
        return first(self.base_models, key)

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

    def adapter_phases(self) -> dict[str, int]:
        counts: dict[str, int] = collections.Counter()
        for views in self.adapters.values():
            for view in views:
                counts[view.status.get("phase") or "Unknown"] += 1
        return dict(counts)

    def live_replicas(self, key: Key) -> list[str]:
        return sorted(name for name, _ in self.replicas.get(key, ()))

    def adapter_entries(self, key: Key, adapter: str) -> dict[str, Any]:
        """One adapter's entries in the LoraReplicas of base model `key`, by pod name."""
        return {pod: adapters[adapter] for pod, adapters in self.reports.get(key, ()) if adapter in adapters}

    def replica_problems(self, key: Key) -> dict[str, str]:
        return {name: problem for name, problem in self.replicas.get(key, ()) if problem is not None}

    @staticmethod
    def parse_spec(body: dict[str, Any]) -> tuple[BaseModelDeploymentSpec | None, str | None]:
        try:
            return BaseModelDeploymentSpec.model_validate(body.get("spec") or {}), None
        except pydantic.ValidationError as exc:
            return None, "; ".join(f"spec.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
