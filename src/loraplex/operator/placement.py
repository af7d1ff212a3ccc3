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
class Claim:
    """One adapter's claim: how many replicas should hold it (None: every one), its size (0: not known yet), and
    how many more it may take where room is left once every claim's `replicas` are placed (`extra`)."""

    key: str
    replicas: int | None = None
    size_bytes: int = 0
    extra: int = 0


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


def wanted(claim: Claim, slot_count: int, extra: bool = False) -> int:
    if claim.replicas is None:
        return slot_count
    return min(claim.replicas + (claim.extra if extra else 0), slot_count)


def place(slots: Sequence[int], claims: Sequence[Claim], capacity: Capacity) -> Placement:
    """Assign each claim its best-ranked slots with room, in the order given."""
    if len(set(slots)) != len(slots):
        raise ValueError(f"slots must be distinct, got {sorted(slots)}")
    if len({d.key for d in claims}) != len(claims):
        raise ValueError("each adapter may appear once")
    total = sum(wanted(claim, len(slots), extra=True) for claim in claims)
    balance_bound = math.ceil(BALANCE * total / len(slots)) if slots else 0
    count = dict.fromkeys(slots, 0)
    used = dict.fromkeys(slots, 0)
    chosen: dict[str, list[int]] = {claim.key: [] for claim in claims}

    def fits(slot: int, claim: Claim, bound: float) -> bool:
        if count[slot] >= bound or (capacity.adapters is not None and count[slot] >= capacity.adapters):
            return False
        return capacity.bytes is None or used[slot] + claim.size_bytes <= capacity.bytes

    def take(claim: Claim, want: int) -> None:
        held = chosen[claim.key]
        # The balance bound is soft: where only it stands in the way, the capacity alone decides.
        for bound in (balance_bound, math.inf):
            for slot in ranking(claim.key, slots):
                if len(held) >= want:
                    return
                if slot not in held and fits(slot, claim, bound):
                    held.append(slot)
                    count[slot] += 1
                    used[slot] += claim.size_bytes

    shortfalls: dict[str, str] = {}
    for claim in claims:
        want = wanted(claim, len(slots))
        take(claim, want)
        if len(chosen[claim.key]) < want or not slots:
            full = [slot for slot in slots if slot not in chosen[claim.key]]
            limits = []
            if capacity.adapters is not None and any(count[slot] >= capacity.adapters for slot in full):
                limits.append(f"{capacity.adapters} adapters")
            if capacity.bytes is not None and any(used[slot] + claim.size_bytes > capacity.bytes for slot in full):
                limits.append(f"{capacity.bytes} bytes")
            shortfalls[claim.key] = _shortfall(claim, want, len(chosen[claim.key]), len(slots), capacity, limits)
    for claim in claims:  # extras only in the room every claim's own replicas left
        if claim.extra and claim.key not in shortfalls:
            take(claim, wanted(claim, len(slots), extra=True))
    placed = {key: tuple(sorted(held, key=ranking(key, slots).index)) for key, held in chosen.items()}
    return Placement(slots=placed, shortfalls=shortfalls)


def _shortfall(claim: Claim, want: int, got: int, slot_count: int, capacity: Capacity, limits: list[str]) -> str:
    """Why `claim` got fewer slots than it wants, naming only the limits that stood in its way."""
    if slot_count == 0:
        return "no replica runs"
    if capacity.bytes is not None and claim.size_bytes > capacity.bytes:
        return (f"its {claim.size_bytes} bytes exceed what one replica holds ({capacity.bytes} bytes): "
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
