"""What the Reconciler remembers about each object between events, one record per object.

A record holds two kinds of things. Decisions (an adapter's facts, a base model's apply problem and
left-out adapters) are the reconciler's own outcomes that later runs build on. Shortcuts (status we
wrote, an applied adapter set, ...) only let a run skip a read or a write the cluster would make
redundant; forget_shortcuts() drops them so the next run compares against the indices alone.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from loraplex.api.adapter_set import DesiredAdapter
from loraplex.api.types import ModelTraffic
from loraplex.operator.adapters import AdapterView
from loraplex.operator.placing import PlacementPlan


@dataclasses.dataclass(frozen=True)
class AdapterClaim:
    """What an adapter's base model depends on: its adapter set and who holds each served name."""

    base: str | None
    served_name: str
    spec: tuple[Any, ...]

    @classmethod
    def of(cls, view: AdapterView) -> AdapterClaim:
        return cls(view.base_model, view.served_name, (view.uid, view.generation, view.deleting))


@dataclasses.dataclass(frozen=True)
class AdapterFacts:
    """The parts of an adapter that other objects depend on: its claim, its phase (for the counts), and whether it
    serves a shared model name's requests."""

    claim: AdapterClaim
    phase: str
    serving: bool = False  # loaded on at least one replica
    traffic: str | None = None  # the model name its spec.traffic shares, if any


@dataclasses.dataclass
class StatusRecord:
    # Status we wrote that the indices may not show yet (their watch event is still on its way).
    written_status: dict[str, Any] | None = None

    def known_status(self, observed: dict[str, Any]) -> dict[str, Any]:
        """The object's status as the cluster has it, counting our own write the index has not seen yet.

        We are the only writer of the fields we remember, so our last write is their truth until the
        index catches up, after which it is forgotten.
        """
        written = self.written_status
        if written is None:
            return observed
        if all(observed.get(field) == value for field, value in written.items()):
            self.written_status = None
            return observed
        return {**observed, **written}

    def forget_shortcuts(self) -> None:
        self.written_status = None


@dataclasses.dataclass
class AdapterRecord(StatusRecord):
    """One LoraAdapter, from its first event until it is deleted."""

    facts: AdapterFacts | None = None  # what others depend on, as last seen
    finalizer_given_to: str | None = None  # the uid we last added our finalizer to

    def forget_shortcuts(self) -> None:
        super().forget_shortcuts()
        self.finalizer_given_to = None


@dataclasses.dataclass
class BaseModelRecord(StatusRecord):
    """One BaseModelDeployment, from its first reconcile until it is deleted."""

    apply_problem: tuple[str, str] | None = None  # (reason, message) of the last apply of the owned objects
    left_out: frozenset[str] = frozenset()  # uids of accepted adapters that did not fit in the adapter set
    # The adapter set as we last applied it, so echoes of our own writes cost nothing.
    applied_adapter_set: dict[str, Any] | None = None
    version_note: str | None = None  # the runtime-version assumption we last warned of
    routing_problem: tuple[str, str] | None = None  # (reason, message) of why routing is not in place
    routing_applied: bool | None = None  # whether we applied routing objects (None: unknown, since start or resync)
    traffic: list[ModelTraffic] | None = None  # the last plan of shared model names (None: none made yet)
    applied_rewrites: set[str] | None = None  # names of the InferenceModelRewrites it owns (None: unknown)
    # What the last full reconcile saw of the object: (uid, generation, deletionTimestamp).
    reconciled: tuple[Any, ...] | None = None
    # Who holds each served name among its adapters; None whenever an adapter's claim changes.
    served_name_owners: dict[str, AdapterView] | None = None
    # Decisions on placement: each live pod's slot (None until read back from the adapter set), the plan statuses
    # go by, and the last plan whose changes were re-decided for every adapter.
    replica_slots: dict[str, int] | None = None
    placement: PlacementPlan | None = None
    propagated_placement: PlacementPlan | None = None
    warned_short: frozenset[str] = frozenset()  # adapters short of room when we last warned
    # Each adapter's entry by uid as last planned: the generation its replicas load (None until read back from the
    # adapter set), kept while what they load is unchanged.
    decided: dict[str, DesiredAdapter] | None = None
    # Adapters with spec.maxReplicas -> the replicas demand asks for (None until read back from the adapter set).
    scaled: dict[str, int] | None = None
    # Adapters whose count stepped and no propagated plan has placed yet -> (why, the count before the step).
    scaling_reasons: dict[str, tuple[str, int]] = dataclasses.field(default_factory=dict)

    def forget_shortcuts(self) -> None:
        super().forget_shortcuts()
        self.applied_adapter_set = None
        self.reconciled = None
        self.served_name_owners = None
        self.applied_rewrites = None
        if self.routing_applied is False:
            self.routing_applied = None
