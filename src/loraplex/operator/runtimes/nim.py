"""NVIDIA NIM for LLMs: adapters are folders under NIM_PEFT_SOURCE, picked up on its refresh interval."""

from __future__ import annotations

from typing import Any

from loraplex.api.runtime_capabilities import capabilities
from loraplex.api.types import BaseModelDeploymentSpec, Runtime
from loraplex.operator.runtimes.base import env_var, http_probes


class NimProfile:
    runtime = Runtime.NIM
    formats = capabilities(Runtime.NIM).formats
    cache_mount_path = "/opt/nim/.cache"

    def problems(self, spec: BaseModelDeploymentSpec) -> list[str]:
        if spec.lora.max_cpu_loras < spec.lora.max_gpu_loras:
            return [f"lora.maxCpuLoras {spec.lora.max_cpu_loras} is below lora.maxGpuLoras "
                    f"{spec.lora.max_gpu_loras}; NIM keeps every GPU adapter in its CPU cache too"]
        return []

    def container(self, spec: BaseModelDeploymentSpec) -> dict[str, Any]:
        return {
            "name": "inference",
            "image": spec.image,
            "env": [
                env_var("NIM_SERVER_PORT", spec.port),
                env_var("NIM_CACHE_PATH", self.cache_mount_path),
                env_var("NIM_PEFT_SOURCE", spec.peft_source.mount_path),
                env_var("NIM_PEFT_REFRESH_INTERVAL", spec.lora.refresh_interval_seconds),
                env_var("NIM_MAX_GPU_LORAS", spec.lora.max_gpu_loras),
                env_var("NIM_MAX_CPU_LORAS", spec.lora.max_cpu_loras),
                env_var("NIM_MAX_LORA_RANK", spec.lora.max_rank),
            ],
            "ports": [{"name": "http", "containerPort": spec.port, "protocol": "TCP"}],
            **http_probes("/v1/health/ready", "/v1/health/live"),
        }
