"""Runtime clients: one module per inference runtime behind the RuntimeClient protocol."""

from collections.abc import Callable

from loraplex.api.runtime_capabilities import Version, nim_generation
from loraplex.api.types import Runtime
from loraplex.sidecar.runtimes.base import LoadFailed, RuntimeClient, RuntimeUnavailable
from loraplex.sidecar.runtimes.nim import NimClient
from loraplex.sidecar.runtimes.vllm import VllmClient

__all__ = ["CLIENTS", "LoadFailed", "NimClient", "RuntimeClient", "RuntimeUnavailable", "VllmClient", "client_for"]

# (base_url, served_model, refresh_interval, version) → the client; only NIM picks adapters up on an interval, in
# the way its generation does.
CLIENTS: dict[Runtime, Callable[[str, str, float, Version | None], RuntimeClient]] = {
    Runtime.VLLM: lambda base_url, served_model, _refresh_interval, _version: VllmClient(base_url, served_model),
    Runtime.NIM: lambda base_url, served_model, refresh_interval, version: NimClient(
        base_url, served_model, refresh_interval, pickup=nim_generation(version).pickup),
}


def client_for(runtime: Runtime, base_url: str, served_model: str, refresh_interval: float = 10.0,
               version: Version | None = None) -> RuntimeClient:
    return CLIENTS[runtime](base_url, served_model, refresh_interval, version)
