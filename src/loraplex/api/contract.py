"""What the operator and the sidecar in every inference pod agree on, so both import it from one place.

The operator renders the sidecar's environment, volumes and port from a BaseModelDeployment (render.py); the
sidecar reads that environment back (SidecarSettings.from_env). Each sidecar reports into the LoraReplica named
after its pod, one ReplicaAdapterStatus (types.py) per adapter, which the operator parses back. The adapter
set ConfigMap, the remaining part of the contract, is adapter_set.py.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import field
from pathlib import Path
from typing import Any

from loraplex.api.runtime_capabilities import Version, format_version, parse_version
from loraplex.api.types import Runtime

SIDECAR_PORT = 9090  # the sidecar's HTTP endpoints: /healthz, /readyz, /metrics
# The gauge on the sidecar's /metrics that tells the endpoint picker which adapters this replica holds, in the
# model-server protocol's LoRA format (docs/routing/upstream.md, d); the operator points the picker at it.
RESIDENCY_METRIC = "loraplex_sidecar_lora_residency"
# The sidecar mounts the whole PEFT volume here; the runtime mounts only its adapters/ folder, so
# staging and bookkeeping are never visible to the runtime.
SIDECAR_VOLUME_DIR = "/var/lib/loraplex"
ADAPTERS_SUBPATH = "adapters"
BASE_CONFIG_DIR = "/etc/loraplex/base-model"  # where the sidecar mounts lora.baseModelConfigMap
BASE_CONFIG_FILE = "config.json"  # that ConfigMap's key, and the file's name under BASE_CONFIG_DIR

# The pod's own identity comes from the Downward API: variable name -> pod field.
# The uid makes the pod the owner of its LoraReplica, so the garbage collector deletes the report with the pod.
_DOWNWARD_API = {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace", "POD_UID": "metadata.uid"}


class SettingsError(ValueError):
    """The sidecar's environment is missing or malformed; the message names the variable."""


_QUANTITY_FACTORS = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4, "Pi": 1024**5, "Ei": 1024**6,
                     "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18, "": 1}


def parse_quantity(value: str) -> int:
    """Bytes in a Kubernetes quantity such as 20Gi or 500M."""
    for suffix in sorted(_QUANTITY_FACTORS, key=len, reverse=True):
        if suffix and value.endswith(suffix):
            return int(float(value[: -len(suffix)]) * _QUANTITY_FACTORS[suffix])
    return int(float(value))


def downward_api_env() -> list[dict[str, Any]]:
    """The environment entries the pod fills in itself; render.py puts them before SidecarSettings.to_env()."""
    return [{"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}} for name, path in _DOWNWARD_API.items()]


@dataclasses.dataclass(frozen=True)
class _Codec:
    parse: Callable[[str], Any]  # raises ValueError on a malformed value
    format: Callable[[Any], str]
    expected: str  # completes "<NAME>=<value> is not ..."


def _version(text: str) -> Version:
    version = parse_version(text)
    if version is None:
        raise ValueError(text)
    return version


def _quantity(text: str) -> str:
    parse_quantity(text)
    return text


def _boolean(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise ValueError(text)
    return text.lower() == "true"


def _seconds(value: float) -> str:
    # "10", not "10.0": the rendered pod template must not change with the type that holds the number.
    return str(int(value)) if float(value).is_integer() else repr(float(value))


_TEXT = _Codec(str, str, "")
_PATH = _Codec(Path, str, "")
_RUNTIME = _Codec(Runtime, lambda r: r.value, " or ".join(r.value for r in Runtime))
_VERSION = _Codec(_version, format_version, "a version such as 0.11.0")
_INTEGER = _Codec(int, str, "a whole number")
_SECONDS = _Codec(float, _seconds, "a number of seconds")
_QUANTITY = _Codec(_quantity, str, "a quantity such as 20Gi")
_BOOLEAN = _Codec(_boolean, lambda b: str(b).lower(), "true or false")


def _env(name: str, codec: _Codec = _TEXT, *, required: bool = False, tuning: bool = False) -> dict[str, Any]:
    """A field's metadata: the environment variable that carries it. A `tuning` knob is rendered only when it
    differs from its default, so adding one never changes the pods of existing deployments."""
    return {"env": name, "codec": codec, "required": required, "tuning": tuning}


@dataclasses.dataclass(frozen=True, kw_only=True)
class SidecarSettings:
    """Everything the sidecar is told, in the order render.py lays the variables out in the pod."""

    # Filled in by the pod (downward_api_env), so to_env() never renders them.
    pod_name: str = field(default="", metadata=_env("POD_NAME", required=True))
    namespace: str = field(default="", metadata=_env("POD_NAMESPACE", required=True))
    pod_uid: str = field(default="", metadata=_env("POD_UID", required=True))
    base_model: str = field(default="", metadata=_env("LORAPLEX_BASE_MODEL", required=True))
    adapter_set: str = field(metadata=_env("LORAPLEX_ADAPTER_SET", required=True))  # ConfigMap name
    runtime: Runtime = field(metadata=_env("LORAPLEX_RUNTIME", _RUNTIME, required=True))
    # None: unknown, judged as the newest version loraplex knows
    runtime_version: Version | None = field(default=None, metadata=_env("LORAPLEX_RUNTIME_VERSION", _VERSION))
    runtime_url: str = field(metadata=_env("LORAPLEX_RUNTIME_URL", required=True))
    served_model: str = field(metadata=_env("LORAPLEX_SERVED_MODEL", required=True))
    # The volume's adapters/ folder as the runtime sees it, and the whole volume as the sidecar mounts it.
    peft_dir: str = field(metadata=_env("LORAPLEX_PEFT_DIR", required=True))
    volume_dir: Path = field(metadata=_env("LORAPLEX_VOLUME_DIR", _PATH, required=True))
    nim_refresh_seconds: float = field(default=10.0, metadata=_env("LORAPLEX_NIM_REFRESH_SECONDS", _SECONDS))
    max_concurrent_downloads: int = field(default=4, metadata=_env("LORAPLEX_MAX_CONCURRENT_DOWNLOADS", _INTEGER))
    log_level: str = field(default="info", metadata=_env("LORAPLEX_LOG_LEVEL"))
    http_port: int = field(default=SIDECAR_PORT, metadata=_env("LORAPLEX_HTTP_PORT", _INTEGER))
    # The PEFT emptyDir's sizeLimit, which the sidecar stays under: exceeding it gets the pod evicted.
    volume_limit: str | None = field(default=None, metadata=_env("LORAPLEX_VOLUME_LIMIT", _QUANTITY))
    s3_endpoint: str | None = field(default=None, metadata=_env("AWS_ENDPOINT_URL_S3"))
    s3_region: str | None = field(default=None, metadata=_env("AWS_REGION"))
    # None when the base model has no S3 settings, which reads as false.
    s3_force_path_style: bool | None = field(default=None, metadata=_env("LORAPLEX_S3_FORCE_PATH_STYLE", _BOOLEAN))
    store_root: Path | None = field(default=None, metadata=_env("LORAPLEX_ADAPTER_STORE", _PATH))
    base_config: Path | None = field(default=None, metadata=_env("LORAPLEX_BASE_CONFIG", _PATH))
    log_format: str = field(default="text", metadata=_env("LORAPLEX_LOG_FORMAT"))
    runtime_poll_seconds: float = field(
        default=2.0, metadata=_env("LORAPLEX_RUNTIME_POLL_SECONDS", _SECONDS, tuning=True))
    local_rescan_seconds: float = field(
        default=30.0, metadata=_env("LORAPLEX_LOCAL_RESCAN_SECONDS", _SECONDS, tuning=True))
    # Demand (sidecar/demand.py): how often the runtime's metrics are sampled, and the windows of its levels.
    demand_sample_seconds: float = field(
        default=5.0, metadata=_env("LORAPLEX_DEMAND_SAMPLE_SECONDS", _SECONDS, tuning=True))
    demand_queue_seconds: float = field(
        default=30.0, metadata=_env("LORAPLEX_DEMAND_QUEUE_SECONDS", _SECONDS, tuning=True))
    demand_idle_seconds: float = field(
        default=300.0, metadata=_env("LORAPLEX_DEMAND_IDLE_SECONDS", _SECONDS, tuning=True))

    @property
    def volume_limit_bytes(self) -> int | None:
        return None if self.volume_limit is None else parse_quantity(self.volume_limit)

    def to_env(self) -> list[dict[str, str]]:
        """The sidecar container's literal environment entries; the pod adds downward_api_env() and any
        credentials Secret itself."""
        env = []
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if item.metadata["env"] in _DOWNWARD_API or value is None:
                continue
            if item.metadata["tuning"] and value == item.default:
                continue
            env.append({"name": item.metadata["env"], "value": item.metadata["codec"].format(value)})
        return env

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> SidecarSettings:
        """The settings in `env`; an empty variable counts as unset."""
        fields = dataclasses.fields(cls)
        missing = [f.metadata["env"] for f in fields if f.metadata["required"] and not env.get(f.metadata["env"])]
        if missing:
            raise SettingsError(f"missing environment: {', '.join(missing)} (the operator sets them in the pod)")
        values = {}
        for item in fields:
            name, codec = item.metadata["env"], item.metadata["codec"]
            if text := env.get(name):
                try:
                    values[item.name] = codec.parse(text)
                except ValueError:
                    raise SettingsError(f"{name}={text!r} is not {codec.expected}") from None
        return cls(**values)

    @classmethod
    def from_environment(cls) -> SidecarSettings:
        return cls.from_env(os.environ)
