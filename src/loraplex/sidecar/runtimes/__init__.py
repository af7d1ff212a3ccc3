"""Runtime clients: one module per inference runtime behind the RuntimeClient protocol."""

from loraplex.api.types import Runtime
from loraplex.sidecar.runtimes.base import LoadFailed, RuntimeClient, RuntimeUnavailable
from loraplex.sidecar.runtimes.nim import NimClient
from loraplex.sidecar.runtimes.vllm import VllmClient

__all__ = ["LoadFailed", "NimClient", "RuntimeClient", "RuntimeUnavailable", "VllmClient", "client_for"]


def client_for(runtime: Runtime, base_url: str, served_model: str, refresh_interval: float = 10.0) -> RuntimeClient:
    if runtime == Runtime.NIM:
        return NimClient(base_url, served_model, refresh_interval)
    return VllmClient(base_url, served_model)
