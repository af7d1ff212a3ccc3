"""One real vLLM server for the whole session: it takes a minute or more to start on 2 cores, so every
integration test that needs vLLM shares it, and each test leaves it with no adapter loaded."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from loraplex.local.apiproxy import ApiProxy
from tests.adapters import VLLM_TINY_LLAMA, make_tiny_model
from tests.integration.harness import Cluster, OperatorProcess, kubeconfig_token
from tests.vllm_server import VllmServer


@pytest.fixture(scope="session")
def vllm_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("vllm-model"), config=VLLM_TINY_LLAMA)


@pytest.fixture(scope="session")
def vllm_server(vllm_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    server = VllmServer(vllm_model_dir, tmp_path_factory.mktemp("vllm-log") / "vllm.log").start()
    yield server
    server.stop()


@pytest.fixture
def real_vllm(vllm_server: VllmServer) -> Iterator[VllmServer]:
    """The session's vLLM, healthy and without adapters before and after the test."""
    if not vllm_server.healthy():  # an earlier test killed it and failed before starting it again
        vllm_server.restart()
    vllm_server.unload_all()
    yield vllm_server
    if vllm_server.healthy():
        vllm_server.unload_all()


@pytest.fixture
def cluster(api_client, namespace) -> Cluster:
    return Cluster(api_client, namespace)


@pytest.fixture
def operator_proxy_kubeconfig(proxy: ApiProxy, operator_kubeconfig: Path, namespace: str, tmp_path: Path) -> Path:
    """The operator's own ServiceAccount token (the chart's RBAC), pointed at the proxy."""
    return proxy.write_kubeconfig(tmp_path / "operator.kubeconfig", kubeconfig_token(operator_kubeconfig),
                                  namespace)


@pytest.fixture
def start_operator(operator_proxy_kubeconfig: Path, namespace: str, tmp_path: Path
                   ) -> Iterator[Callable[..., OperatorProcess]]:
    """Start operators watching the test's namespace; each is stopped when the test ends."""
    started: list[OperatorProcess] = []

    def start(log_name: str = "operator", kubeconfig: Path | None = None, **options: Any) -> OperatorProcess:
        process = OperatorProcess(kubeconfig or operator_proxy_kubeconfig, namespace, tmp_path / f"{log_name}.log",
                                  **options)
        started.append(process.start())
        return process

    yield start
    for process in started:
        process.stop()
