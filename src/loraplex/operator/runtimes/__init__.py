"""Runtime profiles: one module per inference runtime, registered here by its API enum value."""

from loraplex.api.types import Runtime
from loraplex.operator.runtimes.base import RuntimeProfile
from loraplex.operator.runtimes.nim import NimProfile
from loraplex.operator.runtimes.vllm import VllmProfile

PROFILES: dict[Runtime, RuntimeProfile] = {
    Runtime.VLLM: VllmProfile(),
    Runtime.NIM: NimProfile(),
}


def profile_for(runtime: Runtime) -> RuntimeProfile:
    return PROFILES[runtime]
