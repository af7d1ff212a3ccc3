"""vLLM's OpenAI server with multi-LoRA: adapters are loaded at runtime through its HTTP API."""

from __future__ import annotations

from typing import Any

from loraplex.api.runtime_capabilities import Version, capabilities, deployed_version, vllm_label, vllm_release
from loraplex.api.types import BaseModelDeploymentSpec, Runtime
from loraplex.operator.runtimes.base import env_var, http_probes


def runtime_max_rank(max_rank: int, version: Version | None = None) -> int | None:
    """The --max-lora-rank to render: the smallest value this vLLM version accepts that holds `max_rank`
    (loraplex still enforces the exact limit on every adapter)."""
    return next((rank for rank in vllm_release(version).max_lora_ranks if rank >= max_rank), None)


def _version(spec: BaseModelDeploymentSpec) -> Version | None:
    return deployed_version(spec.runtime, spec.image, spec.runtime_version)


class VllmProfile:
    runtime = Runtime.VLLM
    formats = capabilities(Runtime.VLLM).formats
    cache_mount_path = "/root/.cache/huggingface"

    def problems(self, spec: BaseModelDeploymentSpec) -> list[str]:
        found = []
        version = _version(spec)
        ranks = vllm_release(version).max_lora_ranks
        if spec.lora.max_rank == 1 and 1 not in ranks:
            found.append(f"lora.maxRank 1 needs --max-lora-rank 1, which {vllm_label(version)} does not accept "
                         f"(0.11.1 and later do); raise lora.maxRank to {ranks[0]} or run a newer vLLM")
        elif runtime_max_rank(spec.lora.max_rank, version) is None:
            found.append(f"lora.maxRank {spec.lora.max_rank} exceeds vLLM's largest --max-lora-rank {ranks[-1]}")
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
            "--max-lora-rank", str(runtime_max_rank(spec.lora.max_rank, _version(spec))),
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
