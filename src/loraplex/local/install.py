"""Put loraplex onto a cluster the way a user's `helm install` does, minus the operator's Deployment (which the
local stack runs as a process): the CRDs, and the operator's ServiceAccount and RBAC from the chart's own
templates, so the operator runs with exactly the rights the chart grants it."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import kubernetes
import yaml

from loraplex.local.controlplane import ControlPlane

OPERATOR_NAMESPACE = "loraplex-system"
FIELD_MANAGER = "loraplex-local"
RBAC_KINDS = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}


def server_side_apply(client: kubernetes.client.ApiClient, manifest: dict[str, Any]) -> dict[str, Any]:
    dynamic = kubernetes.dynamic.DynamicClient(client)
    resource = dynamic.resources.get(api_version=manifest["apiVersion"], kind=manifest["kind"])
    namespace = manifest["metadata"].get("namespace") if resource.namespaced else None
    return resource.server_side_apply(body=manifest, name=manifest["metadata"]["name"], namespace=namespace,
                                      field_manager=FIELD_MANAGER, force_conflicts=True).to_dict()


def install_crds(client: kubernetes.client.ApiClient, project_root: Path, timeout: float = 60) -> None:
    """The CRDs in crds/ and kopf's peering CRDs from the chart, applied and waited for until served."""
    manifests = [doc for path in sorted((project_root / "crds").glob("*.yaml"))
                 for doc in yaml.safe_load_all(path.read_text()) if doc]
    manifests += [doc for doc in yaml.safe_load_all(
        (project_root / "charts" / "loraplex" / "crds" / "kopfpeerings.yaml").read_text()) if doc]
    for manifest in manifests:
        server_side_apply(client, manifest)
    extensions = kubernetes.client.ApiextensionsV1Api(client)
    deadline = time.monotonic() + timeout
    for manifest in manifests:
        while True:
            conditions = extensions.read_custom_resource_definition(manifest["metadata"]["name"]).status.conditions
            if any(c.type == "Established" and c.status == "True" for c in conditions or []):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"CRD {manifest['metadata']['name']} was not Established in {timeout}s")
            time.sleep(0.1)


def chart_rbac(helm: str, chart: Path, *values: str) -> list[dict[str, Any]]:
    """The ServiceAccount and RBAC objects `helm template` renders for the operator."""
    result = subprocess.run([helm, "template", "loraplex", str(chart), "--namespace", OPERATOR_NAMESPACE,
                             *values], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"helm template failed: {result.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc and doc["kind"] in RBAC_KINDS]


def service_account_token(client: kubernetes.client.ApiClient, namespace: str, name: str,
                          seconds: int = 24 * 3600) -> str:
    """A bound token from the TokenRequest API, as a kubelet gets one for a pod."""
    request = {"spec": {"expirationSeconds": seconds}}
    response = kubernetes.client.CoreV1Api(client).create_namespaced_service_account_token(name, namespace, request)
    return str(response.status.token)


def install_operator_identity(control_plane: ControlPlane, client: kubernetes.client.ApiClient, helm: str,
                              chart: Path, kubeconfig: Path, rbac: list[dict[str, Any]] | None = None) -> Path:
    """Apply the chart's RBAC (or `rbac`, an edited copy of it) and write a kubeconfig with the operator's
    ServiceAccount token."""
    core = kubernetes.client.CoreV1Api(client)
    try:
        core.create_namespace({"metadata": {"name": OPERATOR_NAMESPACE}})
    except kubernetes.client.ApiException as exc:
        if exc.status != 409:
            raise
    manifests = rbac if rbac is not None else chart_rbac(helm, chart)
    for manifest in manifests:
        server_side_apply(client, manifest)
    account = next(m for m in manifests if m["kind"] == "ServiceAccount")["metadata"]
    token = service_account_token(client, account.get("namespace", OPERATOR_NAMESPACE), account["name"])
    return control_plane.write_kubeconfig(kubeconfig, token, f"system:serviceaccount:{account['name']}")
