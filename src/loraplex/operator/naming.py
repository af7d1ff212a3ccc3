"""What a BaseModelDeployment's children are called and how they are labelled: one place for the names the
operator, the sidecar's RBAC and users' selectors rely on."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from loraplex.api.types import API_VERSION, BASE_MODEL_DEPLOYMENT, BASE_MODEL_LABEL

MANAGED_BY = "loraplex"


@dataclasses.dataclass(frozen=True)
class ChildNames:
    base_model: str

    @property
    def deployment(self) -> str:
        return self.base_model

    @property
    def service(self) -> str:
        return self.base_model

    @property
    def service_account(self) -> str:
        return f"{self.base_model}-loraplex"

    @property
    def sidecar_role(self) -> str:
        return f"{self.base_model}-loraplex-sidecar"

    @property
    def adapter_set(self) -> str:
        return f"{self.base_model}-adapters"

    @property
    def inference_pool(self) -> str:
        return self.base_model

    @property
    def endpoint_picker(self) -> str:
        """The picker's Deployment, Service, ServiceAccount, Role and config."""
        return f"{self.base_model}-epp"


def selector_labels(base_model: str) -> dict[str, str]:
    return {BASE_MODEL_LABEL: base_model}


def common_labels(base_model: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "loraplex-inference",
        "app.kubernetes.io/instance": base_model,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        **selector_labels(base_model),
    }


def owner_reference(owner: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": BASE_MODEL_DEPLOYMENT.kind,
        "name": owner["metadata"]["name"],
        "uid": owner["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def controller_ref(meta: Mapping[str, Any]) -> dict[str, Any] | None:
    """The owner reference of an object's metadata that marks its controller (the API server allows one)."""
    return next((ref for ref in meta.get("ownerReferences") or [] if ref.get("controller")), None)


def object_metadata(owner: dict[str, Any], name: str, component: str) -> dict[str, Any]:
    base_model = owner["metadata"]["name"]
    return {
        "name": name,
        "namespace": owner["metadata"]["namespace"],
        "labels": {**common_labels(base_model), "app.kubernetes.io/component": component},
        "ownerReferences": [owner_reference(owner)],
    }


def endpoint(base_model: str, namespace: str, port: int) -> str:
    return f"http://{ChildNames(base_model).service}.{namespace}.svc.cluster.local:{port}/v1"


# A label value and a Service name (a DNS-1035 label) allow 63 characters. Both carry the bare name;
# the longest derived object name (the sidecar Role) adds 17, far inside the 253 of the other kinds,
# and Deployments' pods get names that the API server shortens itself.
MAX_NAME_LENGTH = 63
DNS_1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


def name_problems(name: str) -> list[str]:
    """What keeps a BaseModelDeployment's metadata.name from naming what loraplex derives from it, one
    sentence each. The CRD admits any DNS subdomain name (253 characters, dots), which is looser."""
    shown = name if len(name) <= MAX_NAME_LENGTH else f"{name[:40]}…"
    problems = []
    if len(name) > MAX_NAME_LENGTH:
        problems.append(f"metadata.name {shown!r} is {len(name)} characters; loraplex derives the Service name "
                        f"and the label {BASE_MODEL_LABEL} from it, which allow at most {MAX_NAME_LENGTH}")
    if not DNS_1035_LABEL.fullmatch(name):
        problems.append(f"metadata.name {shown!r} cannot name a Service, which must start with a lowercase letter "
                        "and hold only lowercase letters, digits and '-' (no '.')")
    return problems
