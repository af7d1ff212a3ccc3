"""loraplex's CPU runtime (`loraplex cpu-runtime`): vLLM's LoRA API on transformers + peft, no GPU."""

from __future__ import annotations

from typing import Any

from loraplex.api.types import RUNTIME_FORMATS, BaseModelDeploymentSpec, Runtime
from loraplex.operator.runtimes.base import env_var, http_probes


class CpuProfile:
    runtime = Runtime.CPU
    formats = RUNTIME_FORMATS[Runtime.CPU]
    cache_mount_path = "/var/cache/loraplex-cpu"

    def problems(self, spec: BaseModelDeploymentSpec) -> list[str]:
        if spec.gpus.count:
            return [f"gpus.count is {spec.gpus.count}; the cpu runtime uses no GPU, set it to 0"]
        return []

    def container(self, spec: BaseModelDeploymentSpec) -> dict[str, Any]:
        return {
            "name": "inference",
            "image": spec.image,
            "command": ["loraplex", "cpu-runtime"],
            "args": [
                spec.model_source or spec.model,
                "--served-model-name", spec.model,
                "--host", "0.0.0.0",
                "--port", str(spec.port),
                "--max-cpu-loras", str(spec.lora.max_cpu_loras),
                *(spec.runtime_args or []),
            ],
            "env": [env_var("HF_HUB_OFFLINE", "1"), env_var("HF_HOME", self.cache_mount_path)],
            "ports": [{"name": "http", "containerPort": spec.port, "protocol": "TCP"}],
            **http_probes("/health", "/health"),
        }
