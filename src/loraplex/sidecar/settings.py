"""Sidecar settings: all from the environment the operator renders into the pod (render.py)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from loraplex.api.runtime_capabilities import Version, parse_version
from loraplex.api.types import Runtime

_QUANTITY_FACTORS = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4, "Pi": 1024**5, "Ei": 1024**6,
                     "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18, "": 1}


def parse_quantity(value: str) -> int:
    """Bytes in a Kubernetes quantity such as 20Gi or 500M."""
    for suffix in sorted(_QUANTITY_FACTORS, key=len, reverse=True):
        if suffix and value.endswith(suffix):
            return int(float(value[: -len(suffix)]) * _QUANTITY_FACTORS[suffix])
    return int(float(value))


class SettingsError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class SidecarSettings:
    pod_name: str
    namespace: str
    adapter_set: str  # ConfigMap name
    runtime: Runtime
    runtime_url: str
    served_model: str
    volume_dir: Path  # the PEFT volume as the sidecar mounts it
    peft_dir: str  # the same volume's adapters/ folder as the runtime sees it
    runtime_version: Version | None = None  # None: unknown, judged as the newest loraplex knows
    store_root: Path | None = None
    max_concurrent_downloads: int = 4
    http_port: int = 9090
    volume_limit_bytes: int | None = None
    base_config: Path | None = None
    nim_refresh_seconds: float = 10.0
    reassert_seconds: float = 60.0
    runtime_poll_seconds: float = 2.0
    local_rescan_seconds: float = 30.0

    @classmethod
    def from_environment(cls, env: dict[str, str] | None = None) -> SidecarSettings:
        env = dict(os.environ if env is None else env)
        required = ["POD_NAME", "POD_NAMESPACE", "LORAPLEX_ADAPTER_SET", "LORAPLEX_RUNTIME", "LORAPLEX_RUNTIME_URL",
                    "LORAPLEX_SERVED_MODEL", "LORAPLEX_VOLUME_DIR", "LORAPLEX_PEFT_DIR"]
        missing = [name for name in required if not env.get(name)]
        if missing:
            raise SettingsError(f"missing environment: {', '.join(missing)} (the operator sets them in the pod)")
        try:
            runtime = Runtime(env["LORAPLEX_RUNTIME"])
        except ValueError:
            raise SettingsError(f"LORAPLEX_RUNTIME={env['LORAPLEX_RUNTIME']!r} is not vllm, nim or cpu") from None
        version = env.get("LORAPLEX_RUNTIME_VERSION")
        if version and parse_version(version) is None:
            raise SettingsError(f"LORAPLEX_RUNTIME_VERSION={version!r} is not a version such as 0.11.0")
        limit = env.get("LORAPLEX_VOLUME_LIMIT")
        return cls(
            pod_name=env["POD_NAME"], namespace=env["POD_NAMESPACE"], adapter_set=env["LORAPLEX_ADAPTER_SET"],
            runtime=runtime, runtime_url=env["LORAPLEX_RUNTIME_URL"], served_model=env["LORAPLEX_SERVED_MODEL"],
            runtime_version=parse_version(version) if version else None,
            volume_dir=Path(env["LORAPLEX_VOLUME_DIR"]), peft_dir=env["LORAPLEX_PEFT_DIR"],
            store_root=Path(env["LORAPLEX_ADAPTER_STORE"]) if env.get("LORAPLEX_ADAPTER_STORE") else None,
            max_concurrent_downloads=int(env.get("LORAPLEX_MAX_CONCURRENT_DOWNLOADS", "4")),
            http_port=int(env.get("LORAPLEX_HTTP_PORT", "9090")),
            volume_limit_bytes=parse_quantity(limit) if limit else None,
            base_config=Path(env["LORAPLEX_BASE_CONFIG"]) if env.get("LORAPLEX_BASE_CONFIG") else None,
            nim_refresh_seconds=float(env.get("LORAPLEX_NIM_REFRESH_SECONDS", "10")),
            reassert_seconds=float(env.get("LORAPLEX_REASSERT_SECONDS", "60")),
            runtime_poll_seconds=float(env.get("LORAPLEX_RUNTIME_POLL_SECONDS", "2")),
            local_rescan_seconds=float(env.get("LORAPLEX_LOCAL_RESCAN_SECONDS", "30")),
        )
