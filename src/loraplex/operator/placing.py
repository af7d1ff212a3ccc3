"""Placement of one base model's adapters on its pods, as the adapter set carries it and statuses report it.

placement.py decides on slots and sizes; this module turns the cluster's terms into those (pods into stable
slots, LoraAdapter specs into claims, the base model's limits into a capacity) and the answer back into the
adapter set's entries and each adapter's placed pods. Pure: the reconciler reads and writes around it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence

from loraplex.api.adapter_set import DesiredAdapter
from loraplex.api.contract import parse_quantity
from loraplex.api.types import BaseModelDeploymentSpec
from loraplex.operator.placement import Capacity, Claim, place
from loraplex.operator.render import peft_volume_limit


@dataclasses.dataclass(frozen=True)
class AdapterPlacement:
    """Where one adapter is placed: `pods`, best-ranked first; `awaiting`, the slots it holds whose pod has not
    been created yet; `shortfall` says why fewer than it wants; `replicas`, how many it wants: its spec.replicas
    and the extra replicas demand got room for (None: every replica)."""

    pods: tuple[str, ...]
    shortfall: str | None = None
    awaiting: int = 0
    replicas: int | None = None


@dataclasses.dataclass(frozen=True)
class PlacementPlan:
    replica_slots: dict[str, int]  # live pod -> its slot
    adapters: list[DesiredAdapter]  # the desired adapters, each with the slots that hold it
    placements: dict[str, AdapterPlacement]  # LoraAdapter name -> where it is placed
    sizes: dict[str, int]  # the sizes placement went by, so a newly reported size can be told apart
    by_size: bool  # whether sizes matter at all (a byte limit per replica)
    expected_pods: int = 0  # the pods the Deployment was expected to run
    awaited: tuple[int, ...] = ()  # the slots kept for pods still to be created

    def short(self) -> frozenset[str]:
        """The adapters placed on fewer replicas than they want."""
        return frozenset(name for name, placed in self.placements.items() if placed.shortfall)


def replica_capacity(spec: BaseModelDeploymentSpec) -> Capacity:
    """What one replica holds: lora.adaptersPerReplica, and lora.bytesPerReplica or else the PEFT volume's limit."""
    budget = spec.lora.bytes_per_replica or peft_volume_limit(spec)
    return Capacity(adapters=spec.lora.adapters_per_replica,
                    bytes=parse_quantity(budget) if budget is not None else None)


def slots_for_pods(previous: Mapping[str, int], live_pods: Sequence[str], reporting: Collection[str],
                   expected_pods: int = 0, vacated: Collection[int] = ()) -> dict[str, int]:
    """Each live pod's slot: the one it had, and for a new pod a free one: first those pods just left (`vacated`,
    with the adapters that wait there), then the lowest.

    The operator sees pods' events in no set order across pods, so a replacement pod may come before its
    predecessor is seen gone, and take a new slot rather than the predecessor's. Such a pod, one that reports
    nothing yet, gives up a slot beyond the number of pods (live, or the Deployment's count when more), and takes
    a free one instead.
    """
    live = sorted(set(live_pods))
    count = max(len(live), expected_pods)
    kept = {pod: slot for pod, slot in previous.items() if pod in live and (slot < count or pod in reporting)}
    if len(set(kept.values())) != len(kept):
        raise ValueError("two pods hold the same slot")
    gone = [slot for pod, slot in previous.items() if pod not in live]
    free = _free_slots(set(kept.values()), [*vacated, *gone])
    return {**kept, **{pod: next(free) for pod in live if pod not in kept}}


def _free_slots(taken: Collection[int], first: Iterable[int]) -> Iterator[int]:
    used = set(taken)
    for slot in sorted(set(first)):
        if slot not in used:
            used.add(slot)
            yield slot
    slot = 0
    while True:
        if slot not in used:
            yield slot
        slot += 1


def awaited_slots(replica_slots: Mapping[str, int], expected_pods: int, vacated: Collection[int] = ()) -> list[int]:
    """The slots kept for pods the Deployment is still to create, up to its count: first those pods left
    (`vacated`), then the lowest free ones.

    Keeping a deleted pod's slot until its replacement takes it is what lets the adapters wait for the replacement
    instead of moving to another pod and back, and it spares the first rollout the reshuffles of a placement
    over one, then two, then three pods."""
    free = _free_slots(set(replica_slots.values()), vacated)
    return [next(free) for _ in range(max(expected_pods - len(replica_slots), 0))]


def plan_placement(spec: BaseModelDeploymentSpec, adapters: Sequence[DesiredAdapter],
                   wanted_replicas: Mapping[str, int | None], sizes: Mapping[str, int],
                   live_pods: Sequence[str], previous_slots: Mapping[str, int],
                   reporting: Collection[str] = (), extra_replicas: Mapping[str, int] | None = None,
                   expected_pods: int | None = None, previous_awaited: Collection[int] = ()) -> PlacementPlan:
    """Place `adapters` (in priority order) on the live pods.

    `wanted_replicas` is each adapter's spec.replicas (None: every replica), `extra_replicas` what demand adds to
    it (placed only in room no adapter's own replicas need), `sizes` its largest reported size (absent: not
    known yet, counted as 0), `previous_slots` the slots the last plan gave, `reporting` the pods whose
    LoraReplica holds any entry, `expected_pods` how many pods the Deployment will run (default spec.replicas).
    An adapter on every replica keeps `slots` None, so the adapter set stays small and a pod without a slot yet
    still serves it.
    """
    expected = spec.replicas if expected_pods is None else expected_pods
    vacated = [*previous_awaited, *(slot for pod, slot in previous_slots.items() if pod not in set(live_pods))]
    replica_slots = slots_for_pods(previous_slots, live_pods, reporting, expected, previous_awaited)
    awaited = awaited_slots(replica_slots, expected, vacated)
    all_slots = sorted([*replica_slots.values(), *awaited])
    pod_of = {slot: pod for pod, slot in replica_slots.items()}
    extra = extra_replicas or {}
    claims = [Claim(a.name, wanted_replicas.get(a.name), sizes.get(a.name, 0), extra.get(a.name, 0))
              for a in adapters]
    capacity = replica_capacity(spec)
    placement = place(all_slots, claims, capacity)
    placed: list[DesiredAdapter] = []
    placements: dict[str, AdapterPlacement] = {}
    for adapter, claim in zip(adapters, claims, strict=True):
        slots = placement.slots[adapter.name]
        everywhere = claim.replicas is None and len(slots) == len(all_slots)
        placed.append(adapter.model_copy(update={"slots": None if everywhere else sorted(slots)}))
        placements[adapter.name] = AdapterPlacement(
            pods=tuple(pod_of[slot] for slot in slots if slot in pod_of),
            shortfall=placement.shortfalls.get(adapter.name) if all_slots else None,
            awaiting=0 if everywhere else sum(slot not in pod_of for slot in slots),
            replicas=None if claim.replicas is None else max(claim.replicas, len(slots)))
    return PlacementPlan(replica_slots=replica_slots, adapters=placed, placements=placements,
                         sizes={name: size for name, size in sizes.items() if name in placements},
                         by_size=capacity.bytes is not None, expected_pods=expected, awaited=tuple(awaited))


def largest_size(entries: Mapping[str, object]) -> int | None:
    """The largest size any replica reported for one adapter (its entries by pod), None when none did."""
    sizes = [entry.get("sizeBytes") for entry in entries.values() if isinstance(entry, dict)]
    known = [size for size in sizes if isinstance(size, int)]
    return max(known) if known else None
