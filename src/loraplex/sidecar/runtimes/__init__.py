"""Runtime clients: one module per inference runtime behind the RuntimeClient protocol."""

from collections.abc import Callable

from loraplex.api.types import Runtime
from loraplex.sidecar.runtimes.base import LoadFailed, RuntimeClient, RuntimeUnavailable
from loraplex.sidecar.runtimes.nim import NimClient
from loraplex.sidecar.runtimes.vllm import VllmClient

__all__ = ["CLIENTS", "LoadFailed", "NimClient", "RuntimeClient", "RuntimeUnavailable", "VllmClient", "client_for"]

# (base_url, served_model, refresh_interval) → the client; only NIM picks adapters up on an interval.
CLIENTS: dict[Runtime, Callable[[str, str, float], RuntimeClient]] = {
    Runtime.VLLM: lambda base_url, served_model, _refresh_interval: VllmClient(base_url, served_model),
    Runtime.NIM: NimClient,
}


def client_for(runtime: Runtime, base_url: str, served_model: str, refresh_interval: float = 10.0) -> RuntimeClient:
    return CLIENTS[runtime](base_url, served_model, refresh_interval)
