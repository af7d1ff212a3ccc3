"""vLLM's OpenAI server with multi-LoRA: adapters are loaded at runtime through its HTTP API."""

from __future__ import annotations

from typing import Any

from loraplex.api.types import RUNTIME_FORMATS, BaseModelDeploymentSpec, Runtime
from loraplex.operator.runtimes.base import env_var, http_probes

# --max-lora-rank accepts only these values; a limit in between is rounded up for the runtime
# while loraplex still enforces the exact limit on every adapter.
SUPPORTED_MAX_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def runtime_max_rank(max_rank: int) -> int | None:
    return next((rank for rank in SUPPORTED_MAX_RANKS if rank >= max_rank), None)


class VllmProfile:
    runtime = Runtime.VLLM
    formats = RUNTIME_FORMATS[Runtime.VLLM]
    cache_mount_path = "/root/.cache/huggingface"

    def problems(self, spec: BaseModelDeploymentSpec) -> list[str]:
        found = []
        if runtime_max_rank(spec.lora.max_rank) is None:
            found.append(f"lora.maxRank {spec.lora.max_rank} exceeds vLLM's largest --max-lora-rank "
                         f"{SUPPORTED_MAX_RANKS[-1]}")
        if spec.lora.max_cpu_loras < spec.lora.max_gpu_loras:
            found.append(f"lora.maxCpuLoras {spec.lora.max_cpu_loras} is below lora.maxGpuLoras "
                         f"{spec.lora.max_gpu_loras}; vLLM requires --max-cpu-loras >= --max-loras")
        return found

    def container(self, spec: BaseModelDeploymentSpec) -> dict[str, Any]:
        args = [
            spec.model_source or spec.model,
            "--served-model-name", spec.model,
            "--host", "0.0.0.0",
            "--port", str(spec.port),
            "--enable-lora",
            "--max-loras", str(spec.lora.max_gpu_loras),
            "--max-cpu-loras", str(spec.lora.max_cpu_loras),
            "--max-lora-rank", str(runtime_max_rank(spec.lora.max_rank)),
        ]
        if spec.gpus.count > 1:
            args += ["--tensor-parallel-size", str(spec.gpus.count)]
        args += spec.runtime_args or []
        return {
            "name": "inference",
            "image": spec.image,
            "command": ["vllm", "serve"],
            "args": args,
            "env": [
                # Without it vLLM refuses /v1/load_lora_adapter and /v1/unload_lora_adapter.
                env_var("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True"),
                env_var("HF_HOME", self.cache_mount_path),
            ],
            "ports": [{"name": "http", "containerPort": spec.port, "protocol": "TCP"}],
            **http_probes("/health", "/health"),
        }
