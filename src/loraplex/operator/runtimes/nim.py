"""NVIDIA NIM for LLMs: adapters are folders under NIM_PEFT_SOURCE. How NIM comes to serve folders added while it
runs, and how the LoRA limits reach it, depend on its generation (NIM_GENERATIONS in
loraplex.api.runtime_capabilities)."""

from __future__ import annotations

import shlex
from typing import Any

from loraplex.api.runtime_capabilities import (
    NimGeneration,
    NimLimits,
    NimPickup,
    capabilities,
    deployed_version,
    nim_generation,
    nim_label,
    vllm_release,
)
from loraplex.api.types import BaseModelDeploymentSpec, Runtime
from loraplex.operator.runtimes.base import env_var, http_probes
from loraplex.operator.runtimes.vllm import runtime_max_rank

PASSTHROUGH = "NIM_PASSTHROUGH_ARGS"
NIM_1_LIMITS = ("NIM_MAX_GPU_LORAS", "NIM_MAX_CPU_LORAS", "NIM_MAX_LORA_RANK")
# NIM 2.x serves folders added after its start only in its dynamic LoRA mode, which is "a watcher or the API"; how
# that mode is switched on is not established (docs/formats/trtllm-and-nim.md §B2). loraplex sets what either
# reading needs, each harmless if the other is the switch: NIM_PEFT_REFRESH_INTERVAL, a 2.x variable, for a watcher
# that rescans NIM_PEFT_SOURCE as 1.x did, and this one for vLLM's runtime LoRA endpoints, which vLLM serves only
# with it set.
RUNTIME_LORA_UPDATES = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"
DYNAMIC_MODE_ENV = ("NIM_PEFT_REFRESH_INTERVAL", RUNTIME_LORA_UPDATES)


def generation(spec: BaseModelDeploymentSpec) -> NimGeneration:
    return nim_generation(deployed_version(spec.runtime, spec.image, spec.runtime_version))


def _vllm_args_problems(spec: BaseModelDeploymentSpec, row: NimGeneration, label: str) -> list[str]:
    found = []
    if runtime_max_rank(spec.lora.max_rank, row.vllm) is None:
        largest = vllm_release(row.vllm).max_lora_ranks[-1]
        found.append(f"lora.maxRank {spec.lora.max_rank} exceeds {largest}, the largest --max-lora-rank the vLLM "
                     f"inside {label} accepts")
    if spec.lora.max_cpu_loras < spec.lora.max_gpu_loras:
        found.append(f"lora.maxCpuLoras {spec.lora.max_cpu_loras} is below lora.maxGpuLoras "
                     f"{spec.lora.max_gpu_loras}; the vLLM inside {label} requires --max-cpu-loras >= --max-loras")
    for variable in spec.env or []:
        if variable.name == PASSTHROUGH:
            found.append(f"env {PASSTHROUGH} would replace the one loraplex sets on {label} to pass the LoRA "
                         "limits to its vLLM; put extra vLLM arguments in runtimeArgs")
        elif variable.name in NIM_1_LIMITS:
            found.append(f"env {variable.name} is a NIM 1.x variable that {label} does not read; loraplex passes "
                         "lora.maxGpuLoras, lora.maxCpuLoras and lora.maxRank to it as vLLM arguments")
        elif variable.name in DYNAMIC_MODE_ENV and row.pickup == NimPickup.DYNAMIC:
            found.append(f"env {variable.name} would replace the one loraplex sets on {label} for its dynamic LoRA "
                         "mode, without which it serves no adapter added after it started (lora.refreshIntervalSeconds "
                         "sets the interval)")
    return found


class NimProfile:
    runtime = Runtime.NIM
    formats = capabilities(Runtime.NIM).formats
    cache_mount_path = "/opt/nim/.cache"

    def problems(self, spec: BaseModelDeploymentSpec) -> list[str]:
        version = deployed_version(spec.runtime, spec.image, spec.runtime_version)
        row = nim_generation(version)
        if row.limits == NimLimits.VLLM_ARGS:
            return _vllm_args_problems(spec, row, nim_label(version))
        if spec.lora.max_cpu_loras < spec.lora.max_gpu_loras:
            return [f"lora.maxCpuLoras {spec.lora.max_cpu_loras} is below lora.maxGpuLoras "
                    f"{spec.lora.max_gpu_loras}; NIM keeps every GPU adapter in its CPU cache too"]
        return []

    def container(self, spec: BaseModelDeploymentSpec) -> dict[str, Any]:
        env = [
            env_var("NIM_SERVER_PORT", spec.port),
            env_var("NIM_CACHE_PATH", self.cache_mount_path),
            env_var("NIM_PEFT_SOURCE", spec.peft_source.mount_path),
            env_var("NIM_PEFT_REFRESH_INTERVAL", spec.lora.refresh_interval_seconds),
        ]
        row = generation(spec)
        if row.limits == NimLimits.NIM_ENV:
            env += [
                env_var("NIM_MAX_GPU_LORAS", spec.lora.max_gpu_loras),
                env_var("NIM_MAX_CPU_LORAS", spec.lora.max_cpu_loras),
                env_var("NIM_MAX_LORA_RANK", spec.lora.max_rank),
            ]
        else:
            # NIM 2.x dropped the NIM_MAX_* variables for vLLM's own flags (2.0.0 reference/1.x-migration-guide,
            # advanced-use-cases/finetune-lora). reference/advanced-configuration ranks NIM_PASSTHROUGH_ARGS
            # above NIM_* variables and NIM's defaults, so these win without replacing the image's command.
            # NIM passes --enable-lora itself; saying it again costs nothing and keeps LoRA on if it only does so
            # for some profiles.
            args = [
                "--enable-lora",
                "--max-loras", str(spec.lora.max_gpu_loras),
                "--max-cpu-loras", str(spec.lora.max_cpu_loras),
                "--max-lora-rank", str(runtime_max_rank(spec.lora.max_rank, row.vllm)),
                *(spec.runtime_args or []),
            ]
            env.append(env_var(PASSTHROUGH, shlex.join(args)))
        if row.pickup == NimPickup.DYNAMIC:
            env.append(env_var(RUNTIME_LORA_UPDATES, "True"))
        return {
            "name": "inference",
            "image": spec.image,
            "env": env,
            "ports": [{"name": "http", "containerPort": spec.port, "protocol": "TCP"}],
            **http_probes("/v1/health/ready", "/v1/health/live"),
        }
