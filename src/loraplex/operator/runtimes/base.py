"""What a runtime profile provides: the inference container and the runtime's own spec rules."""

from __future__ import annotations

from typing import Any, Protocol

from loraplex.api.types import AdapterFormat, BaseModelDeploymentSpec, Runtime


class RuntimeProfile(Protocol):
    runtime: Runtime
    # What it loads when its version is unknown; per version, loraplex.api.runtime_capabilities.capabilities.
    formats: frozenset[AdapterFormat]
    cache_mount_path: str

    def problems(self, spec: BaseModelDeploymentSpec) -> list[str]:
        """Sentences naming what in the spec this runtime cannot run; empty when it can."""
        ...

    def container(self, spec: BaseModelDeploymentSpec) -> dict[str, Any]:
        """The inference container: image, command, args, env, port and probes (no volumes)."""
        ...


def env_var(name: str, value: object) -> dict[str, Any]:
    return {"name": name, "value": str(value)}


def http_probes(path_ready: str, path_live: str, port: str = "http") -> dict[str, Any]:
    """Startup allows for multi-minute model loads; liveness only kicks in once started."""
    return {
        "startupProbe": {"httpGet": {"path": path_live, "port": port}, "periodSeconds": 10,
                         "failureThreshold": 180, "timeoutSeconds": 5},
        "readinessProbe": {"httpGet": {"path": path_ready, "port": port}, "periodSeconds": 5,
                           "failureThreshold": 3, "timeoutSeconds": 5},
        "livenessProbe": {"httpGet": {"path": path_live, "port": port}, "periodSeconds": 15,
                          "failureThreshold": 4, "timeoutSeconds": 5},
    }
