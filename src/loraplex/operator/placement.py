"""Which replicas hold which adapter: rendezvous hashing over stable replica slots, with bounded load.

Replicas are named by slots, small integers the operator hands to pods and hands on to a pod's replacement, so
an adapter's place survives pod restarts. Each adapter ranks every slot by a hash of (adapter, slot) and takes
the best-ranked slots that still have room. With room everywhere the ranking alone decides, which is what keeps
movement minimal: adding a slot takes an adapter's replica only where the new slot now ranks among its best
(about wanted/slots of them), and removing one moves only the replicas it held.

Room is the base model's capacity per replica (adapters and bytes) and a balance bound: no slot holds more than
`BALANCE` times the average number of replicas per slot, rounded up, so skewed hashes cannot pile adapters onto
one replica ("consistent hashing with bounded loads", Mirrokni, Thorup and Zadimoghaddam, 2018). Adapters are
placed in the order given, the caller's priority: the earlier keep their places when room runs out.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence

BALANCE = 1.25


@dataclasses.dataclass(frozen=True)
class Demand:
    """One adapter's claim: how many replicas should hold it (None: every one) and its size (0: not known yet)."""

    key: str
    replicas: int | None = None
    size_bytes: int = 0


@dataclasses.dataclass(frozen=True)
class Capacity:
    """What one replica can hold; None means no limit of that kind."""

    adapters: int | None = None
    bytes: int | None = None


@dataclasses.dataclass(frozen=True)
class Placement:
    slots: dict[str, tuple[int, ...]]  # adapter key -> the slots that hold it, best-ranked first
    shortfalls: dict[str, str]  # adapter key -> why it holds fewer slots than it asked for

    def held_by(self, slot: int) -> list[str]:
        return [key for key, slots in self.slots.items() if slot in slots]


def score(key: str, slot: int) -> int:
    digest = hashlib.blake2b(f"{key}\0{slot}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def ranking(key: str, slots: Iterable[int]) -> list[int]:
    """The slots in the order `key` prefers them."""
    return sorted(slots, key=lambda slot: (score(key, slot), slot), reverse=True)


def wanted(demand: Demand, slot_count: int) -> int:
    return slot_count if demand.replicas is None else min(demand.replicas, slot_count)


def place(slots: Sequence[int], demands: Sequence[Demand], capacity: Capacity) -> Placement:
    """Assign each demand its best-ranked slots with room, in the order given."""
    if len(set(slots)) != len(slots):
        raise ValueError(f"slots must be distinct, got {sorted(slots)}")
    if len({d.key for d in demands}) != len(demands):
        raise ValueError("each adapter may appear once")
    total = sum(wanted(d, len(slots)) for d in demands)
    balance_bound = math.ceil(BALANCE * total / len(slots)) if slots else 0
    count = dict.fromkeys(slots, 0)
    used = dict.fromkeys(slots, 0)

    def fits(slot: int, demand: Demand, bound: float) -> bool:
        if count[slot] >= bound or (capacity.adapters is not None and count[slot] >= capacity.adapters):
            return False
        return capacity.bytes is None or used[slot] + demand.size_bytes <= capacity.bytes

    placed: dict[str, tuple[int, ...]] = {}
    shortfalls: dict[str, str] = {}
    for demand in demands:
        want = wanted(demand, len(slots))
        preferred = ranking(demand.key, slots)
        chosen: list[int] = []
        # The balance bound is soft: where only it stands in the way, the capacity alone decides.
        for bound in (balance_bound, math.inf):
            for slot in preferred:
                if len(chosen) == want:
                    break
                if slot not in chosen and fits(slot, demand, bound):
                    chosen.append(slot)
                    count[slot] += 1
                    used[slot] += demand.size_bytes
        placed[demand.key] = tuple(sorted(chosen, key=preferred.index))
        if len(chosen) < want or not slots:
            full = [slot for slot in slots if slot not in chosen]
            limits = []
            if capacity.adapters is not None and any(count[slot] >= capacity.adapters for slot in full):
                limits.append(f"{capacity.adapters} adapters")
            if capacity.bytes is not None and any(used[slot] + demand.size_bytes > capacity.bytes for slot in full):
                limits.append(f"{capacity.bytes} bytes")
            shortfalls[demand.key] = _shortfall(demand, want, len(chosen), len(slots), capacity, limits)
    return Placement(slots=placed, shortfalls=shortfalls)


def _shortfall(demand: Demand, want: int, got: int, slot_count: int, capacity: Capacity, limits: list[str]) -> str:
    """Why `demand` got fewer slots than it wants, naming only the limits that stood in its way."""
    if slot_count == 0:
        return "no replica runs"
    if capacity.bytes is not None and demand.size_bytes > capacity.bytes:
        return (f"its {demand.size_bytes} bytes exceed what one replica holds ({capacity.bytes} bytes): "
                "raise the base model's bytes per replica")
    return (f"wants {want} replica(s) but only {got} of {slot_count} have room (each holds at most "
            f"{' and '.join(limits)}): add replicas or raise the capacity per replica")


def moved(before: Placement, after: Placement) -> int:
    """How many adapter replicas a change of placement adds somewhere (each is a download and a load)."""
    return sum(len(set(slots) - set(before.slots.get(key, ()))) for key, slots in after.slots.items())


def assign_slots(previous: Mapping[str, int], pods: Iterable[str]) -> dict[str, int]:
    """Slots for the live pods: each keeps its slot, and a new pod takes the lowest slot no live pod holds, so a
    replacement pod inherits the adapters of the pod it replaces."""
    live = sorted(set(pods))
    kept = {pod: previous[pod] for pod in live if pod in previous}
    taken = set(kept.values())
    if len(taken) != len(kept):
        raise ValueError("two pods hold the same slot")
    free = (slot for slot in range(len(live) + len(taken)) if slot not in taken)
    return {**kept, **{pod: next(free) for pod in live if pod not in kept}}
