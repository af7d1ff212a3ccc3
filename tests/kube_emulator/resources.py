"""The resource types the emulator serves: a fixed set of built-ins plus every CRD created in it."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class ResourceType:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    status_subresource: bool = False
    singular: str = ""
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    printer_columns: tuple[dict[str, Any], ...] = ()
    schema: dict[str, Any] | None = None
    # CRDs and most built-ins refuse a PUT without metadata.resourceVersion; ConfigMaps and friends allow it.
    unconditional_update: bool = False

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def key(self) -> str:
        """Identity across versions: plural.group, as in a CRD's name."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def verbs(self) -> list[str]:
        return ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]

    def discovery_entries(self) -> list[dict[str, Any]]:
        entry: dict[str, Any] = {
            "name": self.plural,
            "singularName": self.singular or self.kind.lower(),
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": self.verbs,
        }
        if self.short_names:
            entry["shortNames"] = list(self.short_names)
        if self.categories:
            entry["categories"] = list(self.categories)
        entries = [entry]
        if self.status_subresource:
            entries.append({
                "name": f"{self.plural}/status", "singularName": "", "namespaced": self.namespaced,
                "kind": self.kind, "verbs": ["get", "patch", "update"],
            })
        return entries


BUILTINS: list[ResourceType] = [
    ResourceType("", "v1", "namespaces", "Namespace", namespaced=False, status_subresource=True,
                 short_names=("ns",), unconditional_update=True),
    ResourceType("", "v1", "configmaps", "ConfigMap", short_names=("cm",), unconditional_update=True),
    ResourceType("", "v1", "secrets", "Secret", unconditional_update=True),
    ResourceType("", "v1", "services", "Service", status_subresource=True, short_names=("svc",),
                 categories=("all",), unconditional_update=True),
    ResourceType("", "v1", "serviceaccounts", "ServiceAccount", short_names=("sa",),
                 unconditional_update=True),
    ResourceType("", "v1", "pods", "Pod", status_subresource=True, short_names=("po",),
                 categories=("all",), unconditional_update=True),
    ResourceType("", "v1", "events", "Event", short_names=("ev",), unconditional_update=True),
    ResourceType("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", status_subresource=True,
                 short_names=("pvc",), unconditional_update=True),
    ResourceType("events.k8s.io", "v1", "events", "Event", short_names=("ev",), unconditional_update=True),
    ResourceType("apps", "v1", "deployments", "Deployment", status_subresource=True, short_names=("deploy",),
                 categories=("all",), unconditional_update=True),
    ResourceType("apps", "v1", "replicasets", "ReplicaSet", status_subresource=True, short_names=("rs",),
                 categories=("all",), unconditional_update=True),
    ResourceType("rbac.authorization.k8s.io", "v1", "roles", "Role", unconditional_update=True),
    ResourceType("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", unconditional_update=True),
    ResourceType("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", namespaced=False,
                 unconditional_update=True),
    ResourceType("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding",
                 namespaced=False, unconditional_update=True),
    ResourceType("coordination.k8s.io", "v1", "leases", "Lease", unconditional_update=True),
    ResourceType("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget", status_subresource=True,
                 short_names=("pdb",), unconditional_update=True),
    ResourceType("apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition",
                 namespaced=False, status_subresource=True, short_names=("crd", "crds"),
                 unconditional_update=False),
]


def from_crd(crd: dict[str, Any]) -> list[ResourceType]:
    """One ResourceType per served version of a CustomResourceDefinition object."""
    spec = crd["spec"]
    names = spec["names"]
    types = []
    for version in spec.get("versions", []):
        if not version.get("served", True):
            continue
        types.append(ResourceType(
            group=spec["group"],
            version=version["name"],
            plural=names["plural"],
            kind=names["kind"],
            namespaced=spec.get("scope", "Namespaced") == "Namespaced",
            status_subresource="status" in (version.get("subresources") or {}),
            singular=names.get("singular", names["kind"].lower()),
            short_names=tuple(names.get("shortNames", [])),
            categories=tuple(names.get("categories", [])),
            printer_columns=tuple(version.get("additionalPrinterColumns", [])),
            schema=(version.get("schema") or {}).get("openAPIV3Schema"),
        ))
    return types
