"""How many replicas an adapter with spec.maxReplicas holds: one more while its requests queue on every replica
holding it, one fewer while all of them see it idle, within [spec.replicas, spec.maxReplicas]. Pure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from loraplex.api.types import DemandLevel, LoraAdapterSpec, ReplicaState


def scaled_replicas(current: int, holders: int, least: int, most: int, levels: Sequence[DemandLevel | None]) -> int:
    """The next count from `current`, given how many replicas it is placed on (`holders`) and the level reported
    for each of them (None: not loaded there, no level yet, or not started). It grows only once it holds every
    replica it has, so a replica added for demand must load the adapter and sample a window before the next
    step, and a retried or concurrent decision on an older placement cannot step twice."""
    current = min(max(current, least), most)
    if holders >= current and levels and all(level == DemandLevel.QUEUED for level in levels):
        return min(holders + 1, most)
    if levels and all(level == DemandLevel.IDLE for level in levels):
        return max(min(current, holders) - 1, least)
    return current


def holder_levels(pods: Sequence[str], awaiting: int, entries: Mapping[str, Any]) -> list[DemandLevel | None]:
    """The level of each replica the adapter is placed on: `pods`, and `awaiting` more not started yet
    (`entries`: the adapter's entries by pod). Only a Loaded entry's level counts."""
    levels: list[DemandLevel | None] = []
    for pod in pods:
        entry = entries.get(pod)
        if isinstance(entry, dict) and entry.get("state") == ReplicaState.LOADED.value:
            levels.append(_level(entry.get("demand")))
        else:
            levels.append(None)
    return levels + [None] * awaiting


def _level(value: Any) -> DemandLevel | None:
    try:
        return DemandLevel(value)
    except ValueError:
        return None


def replicas_wanted(spec: LoraAdapterSpec, scaled: int | None) -> int | None:
    """What placement asks for: every replica (None), spec.replicas, or the scaled count within the range."""
    if spec.max_replicas is None or spec.replicas is None:
        return spec.replicas
    return min(max(scaled if scaled is not None else spec.replicas, spec.replicas), spec.max_replicas)
