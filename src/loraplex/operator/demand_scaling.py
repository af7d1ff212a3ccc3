"""How many replicas an adapter with spec.maxReplicas holds: it grows while its requests queue on every replica
holding it, and shrinks while every one of them sees it idle, one replica at a time within
[spec.replicas, spec.maxReplicas]. Pure; the reconciler keeps the count and places by it.

One step at a time, and only once every holder reports a level: a replica added for demand must load the
adapter and sample a whole window before the next step, which keeps the count from running ahead of what the
replicas have seen.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from loraplex.api.types import DemandLevel, LoraAdapterSpec, ReplicaState


def scaled_replicas(current: int, least: int, most: int, levels: Sequence[DemandLevel | None]) -> int:
    """The next count from `current`, given the level reported for each replica the adapter is placed on (None:
    that replica has not loaded it, says no level yet, or has not started)."""
    current = min(max(current, least), most)
    if levels and all(level == DemandLevel.QUEUED for level in levels):
        return min(current + 1, most)
    if levels and all(level == DemandLevel.IDLE for level in levels):
        return max(current - 1, least)
    return current


def holder_levels(pods: Sequence[str], awaiting: int, entries: Mapping[str, Any]) -> list[DemandLevel | None]:
    """The level of each replica the adapter is placed on: `pods`, and `awaiting` more not started yet
    (`entries`: the adapter's entries by pod). Only a Loaded entry's level counts."""
    levels: list[DemandLevel | None] = []
    for pod in pods:
        entry = entries.get(pod)
        loaded = isinstance(entry, dict) and entry.get("state") == ReplicaState.LOADED.value
        levels.append(_level(entry.get("demand")) if loaded else None)  # type: ignore[union-attr]
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
