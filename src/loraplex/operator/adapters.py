"""Pure decisions about LoraAdapters: is one acceptable, which ones form a base model's desired set,
and what each one's status should say given what the replicas reported in their LoraReplicas.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import pydantic

from loraplex.api.adapter_set import AdapterLimits, DesiredAdapter
from loraplex.api.conditions import condition
from loraplex.api.runtime_capabilities import capabilities, deployed_version
from loraplex.api.sources import InvalidSource, parse_source
from loraplex.api.types import (
    MAX_SERVED_NAME,
    AdapterFormat,
    AdapterPhase,
    BaseModelDeploymentSpec,
    FailureReason,
    LoraAdapterSpec,
    LoraAdapterStatus,
    ReplicaAdapterStatus,
    ReplicaState,
)
from loraplex.operator.placing import AdapterPlacement

FINALIZER = "loraplex.io/adapter-cleanup"
INSUFFICIENT_CAPACITY = "InsufficientCapacity"
WAITING_FOR_REPLICA = "WaitingForReplica"


@dataclasses.dataclass(frozen=True)
class AdapterView:
    """The parts of a LoraAdapter object the operator decides on."""

    namespace: str
    name: str
    uid: str
    generation: int
    created: str
    deleting: bool
    finalizers: tuple[str, ...]
    spec: LoraAdapterSpec | None
    spec_error: str | None
    status: dict[str, Any]
    resource_version: str = ""
    # Read on every decision about every sibling, so computed once here rather than from the spec each time.
    base_model: str | None = dataclasses.field(init=False)
    served_name: str = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "base_model", self.spec.base_model if self.spec else None)
        object.__setattr__(self, "served_name", (self.spec.served_name if self.spec else None) or self.name)

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> AdapterView:
        meta = body.get("metadata") or {}
        spec, error = None, None
        try:
            spec = LoraAdapterSpec.model_validate(body.get("spec") or {})
        except pydantic.ValidationError as exc:
            error = "; ".join(f"spec.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return cls(
            namespace=meta.get("namespace", ""), name=meta["name"], uid=meta.get("uid", ""),
            generation=int(meta.get("generation") or 1), created=meta.get("creationTimestamp") or "",
            deleting=bool(meta.get("deletionTimestamp")), finalizers=tuple(meta.get("finalizers") or ()),
            spec=spec, spec_error=error, status=dict(body.get("status") or {}),
            resource_version=meta.get("resourceVersion") or "",
        )


@dataclasses.dataclass(frozen=True)
class Verdict:
    accepted: bool
    reason: str
    message: str


ACCEPTED = Verdict(True, "SpecAccepted", "The adapter spec fits its base model's limits.")
WAITING_REASONS = frozenset({"BaseModelNotFound", "AdapterSetFull"})  # Pending, not Failed: they resolve by themselves


def adapter_set_full(base_model: str, max_bytes: int) -> Verdict:
    return Verdict(False, "AdapterSetFull",
                   f"the adapter set of base model {base_model!r} is full (its ConfigMap holds at most {max_bytes} "
                   "bytes); this adapter waits until older ones are deleted or moved to another base model.")


def served_name_owners(adapters: list[AdapterView]) -> dict[str, AdapterView]:
    """Who holds each served name: among live adapters claiming it, the oldest, then the first by name."""
    owners: dict[str, AdapterView] = {}
    for adapter in adapters:
        if adapter.deleting or adapter.spec is None:
            continue
        current = owners.get(adapter.served_name)
        if current is None or (adapter.created, adapter.name) < (current.created, current.name):
            owners[adapter.served_name] = adapter
    return owners


def check_adapter(adapter: AdapterView, base_model: BaseModelDeploymentSpec | None,
                  siblings: list[AdapterView], owners: dict[str, AdapterView] | None = None,
                  limits: AdapterLimits | None = None) -> Verdict:
    """Whether the operator hands this adapter to its base model's sidecars, and if not, why.

    `siblings` are the other live adapters naming the same base model; among adapters claiming the
    same served name, the oldest (then the first by name) keeps it. Pass `owners` (served_name_owners
    of the siblings) when checking many adapters, to decide each in constant time.
    """
    if adapter.spec is None:
        return Verdict(False, "InvalidSpec", adapter.spec_error or "The spec could not be read.")
    spec = adapter.spec
    base_name = spec.base_model
    if len(adapter.served_name) > MAX_SERVED_NAME:  # the schema caps spec.servedName, not its default
        return Verdict(False, "InvalidName",
                       f"metadata.name {adapter.name[:40] + '…'!r} is {len(adapter.name)} characters and, with "
                       f"spec.servedName unset, would be the served name, which allows at most {MAX_SERVED_NAME}; "
                       "set spec.servedName.")
    if base_model is None:
        return Verdict(False, "BaseModelNotFound",
                       f"BaseModelDeployment {base_name!r} does not exist in namespace {adapter.namespace!r}; "
                       "the adapter waits for it.")
    try:
        source = parse_source(spec.source)
    except InvalidSource as exc:
        return Verdict(False, "InvalidSource", str(exc))
    limits = limits or AdapterLimits.of(base_model)
    if spec.format != AdapterFormat.AUTO and spec.format not in limits.allowed_formats:
        allowed = ", ".join(f.value for f in limits.allowed_formats) or "none"
        return Verdict(False, "FormatNotAllowed",
                       f"format {spec.format.value} is not accepted by base model {base_name!r} "
                       f"(runtime {base_model.runtime.value}; allowed: {allowed}).")
    if spec.expected_rank is not None and spec.expected_rank > limits.max_rank:
        return Verdict(False, "RankTooHigh",
                       f"expectedRank {spec.expected_rank} exceeds base model {base_name!r} "
                       f"lora.maxRank {limits.max_rank}.")
    if spec.max_replicas is not None:
        runtime = capabilities(base_model.runtime, deployed_version(base_model.runtime, base_model.image,
                                                                    base_model.runtime_version))
        if not runtime.publishes_demand:
            return Verdict(False, "DemandUnknown",
                           f"spec.maxReplicas grows the adapter with the demand its replicas see, which loraplex "
                           f"reads from vLLM's vllm:lora_requests_info metric; base model {base_name!r} runs "
                           f"{runtime.name}, which publishes none. Set spec.replicas alone.")
    if source.scheme == "file":
        store = base_model.storage.adapter_store if base_model.storage else None
        if store is None:
            return Verdict(False, "InvalidSource",
                           f"file:// sources need spec.storage.adapterStore on base model {base_name!r}.")
        if not (source.path + "/").startswith(store.mount_path.rstrip("/") + "/"):
            return Verdict(False, "InvalidSource",
                           f"source path {source.path!r} is outside the adapter store mounted at "
                           f"{store.mount_path!r}.")
    if adapter.served_name == base_model.model:
        return Verdict(False, "DuplicateServedName",
                       f"served name {adapter.served_name!r} is the base model's own name.")
    owner = (owners if owners is not None else served_name_owners(siblings)).get(adapter.served_name)
    if owner is not None and owner.uid != adapter.uid and (owner.created, owner.name) < (adapter.created,
                                                                                        adapter.name):
        return Verdict(False, "DuplicateServedName",
                       f"served name {adapter.served_name!r} is already used by LoraAdapter {owner.name!r} "
                       f"on base model {base_name!r}.")
    return ACCEPTED


def desired_adapters(base_model: BaseModelDeploymentSpec, adapters: list[AdapterView],
                     owners: dict[str, AdapterView] | None = None) -> list[DesiredAdapter]:
    """The adapters a base model's sidecars should hold: every live, accepted one, oldest first (the order
    in which they keep their place when not all of them fit)."""
    desired = []
    owners = served_name_owners(adapters) if owners is None else owners
    limits = AdapterLimits.of(base_model)
    for adapter in sorted(adapters, key=lambda a: (a.created, a.name)):
        if adapter.deleting or adapter.spec is None:
            continue
        if not check_adapter(adapter, base_model, adapters, owners, limits).accepted:
            continue
        spec = adapter.spec
        desired.append(DesiredAdapter(
            name=adapter.name, uid=adapter.uid, generation=adapter.generation, served_name=adapter.served_name,
            source=spec.source, format=spec.format, expected_rank=spec.expected_rank, sha256=spec.sha256,
            follows_demand=True if spec.max_replicas is not None else None,
        ))
    return desired


def loaded_content(adapter: DesiredAdapter) -> tuple[object, ...]:
    """What a replica loads for an adapter: a change to any of it is a new version to sync and load."""
    return (adapter.served_name, adapter.source, adapter.format, adapter.expected_rank, adapter.sha256)


def keep_generations(desired: list[DesiredAdapter], decided: Mapping[str, DesiredAdapter]) -> list[DesiredAdapter]:
    """Each adapter at the generation already decided for what its replicas load (`decided`, by uid), unless that
    changed: an edit of its replicas or traffic must not make every replica load it again."""
    kept = []
    for adapter in desired:
        before = decided.get(adapter.uid)
        same = before is not None and before.generation <= adapter.generation \
            and loaded_content(before) == loaded_content(adapter)
        kept.append(adapter.model_copy(update={"generation": before.generation}) if same and before else adapter)
    return kept


_VALIDATION_FAILURES = {FailureReason.VALIDATION_FAILED.value, FailureReason.CHECKSUM_MISMATCH.value}
_SYNC_FAILURES = {FailureReason.DOWNLOAD_FAILED.value, FailureReason.SOURCE_NOT_FOUND.value,
                  FailureReason.ACCESS_DENIED.value, FailureReason.DISK_FULL.value}


@dataclasses.dataclass(frozen=True)
class AdapterStatusUpdate:
    status: dict[str, Any]  # every operator-owned status field, conditions without transition times

    @property
    def phase(self) -> str:
        return self.status["phase"]

    @property
    def serving(self) -> bool:
        return int(self.status.get("readyReplicas") or 0) > 0


def replica_reports(entries: Mapping[str, Any]) -> dict[str, ReplicaAdapterStatus]:
    """One adapter's entries in the replicas' LoraReplicas, parsed, by pod name. An entry that does not parse
    (a sidecar of another loraplex version wrote it) is left out rather than failing the whole adapter."""
    reports = {}
    for pod, entry in entries.items():
        try:
            reports[pod] = ReplicaAdapterStatus.model_validate(entry)
        except pydantic.ValidationError:
            continue
    return reports


def adapter_status(adapter: AdapterView, verdict: Verdict, live_replicas: list[str],
                   entries: Mapping[str, Any], placement: AdapterPlacement | None = None,
                   loaded_generation: int | None = None) -> AdapterStatusUpdate:
    """The status of `adapter` given its entries in the replicas' LoraReplicas (`entries`, by pod name) and the
    pods it is placed on (`placement`; None: every live replica). Only live replicas count, and only theirs are
    shown in status.replicaStatus; only the pods it is placed on make it Ready or Failed. Entries count when
    they are of `loaded_generation`, the generation the adapter set gives it (keep_generations), by default its
    own."""
    generation = adapter.generation
    loaded_generation = generation if loaded_generation is None else loaded_generation
    reported = {pod: entry for pod, entry in replica_reports(entries).items() if pod in live_replicas}
    if not verdict.accepted or adapter.deleting:
        placed: list[str] = []
    else:
        # An adapter on every replica with room everywhere is on whichever pods live now, whatever pods the
        # last plan saw: a plan is made again only after the pods' events, and status must not run ahead of it.
        everywhere = placement is None or (placement.replicas is None and not placement.shortfall)
        placed = list(live_replicas) if everywhere else [p for p in placement.pods if p in live_replicas]
    current = {pod: entry for pod, entry in reported.items()
               if pod in placed and entry.observed_generation == loaded_generation}
    loaded = sorted(pod for pod, entry in current.items() if entry.state == ReplicaState.LOADED)
    failed = sorted(pod for pod, entry in current.items() if entry.state == ReplicaState.FAILED)
    replicas = len(live_replicas)
    asked = placement.replicas if placement is not None else adapter.spec.replicas if adapter.spec else None
    wanted = replicas if asked is None else min(asked, replicas)
    shortfall = placement.shortfall if placement is not None and len(placed) < wanted else None
    awaiting = placement.awaiting if placement is not None and set(placed) != set(live_replicas) else 0

    def conditions(validated: tuple[bool | None, str, str], synced: tuple[bool | None, str, str],
                   ready: tuple[bool | None, str, str]) -> list[dict[str, Any]]:
        return [condition("Validated", *validated, generation), condition("Synced", *synced, generation),
                condition("Ready", *ready, generation)]

    if adapter.deleting:
        holding = sorted(reported)
        message = (f"Unloading from {len(holding)} replica(s): {', '.join(holding)}." if holding
                   else "Removed from every replica.")
        phase = AdapterPhase.TERMINATING
        decided = conditions((None, "Terminating", message), (False, "Terminating", message),
                             (False, "Terminating", message))
    elif not verdict.accepted:
        waiting = verdict.reason in WAITING_REASONS
        phase = AdapterPhase.PENDING if waiting else AdapterPhase.FAILED
        validated = (None, "Pending", verdict.message) if waiting else (False, verdict.reason, verdict.message)
        decided = conditions(validated, (False, verdict.reason, verdict.message),
                             (False, verdict.reason, verdict.message))
    elif replicas == 0:
        message = f"Base model {adapter.base_model!r} has no running replicas."
        phase = AdapterPhase.PENDING
        decided = conditions((None, "Pending", message), (None, "NoReplicas", message),
                             (False, "NoReplicas", message))
    elif failed:
        pod = failed[0]
        entry = current[pod]
        reason = entry.reason or FailureReason.LOAD_FAILED.value
        message = f"Replica {pod}: {entry.message or reason}"
        phase = AdapterPhase.FAILED
        validated: tuple[bool | None, str, str] = (
            (False, reason, message) if reason in _VALIDATION_FAILURES
            else (True if loaded else None, "ValidationPassed" if loaded else "Pending", message))
        synced = (False, reason, message) if reason in _SYNC_FAILURES else (None, "Syncing", message)
        decided = conditions(validated, synced, (False, reason, message))
    elif not placed:
        if awaiting and not shortfall:
            reason, message = WAITING_FOR_REPLICA, f"Placed on {awaiting} replica(s) the Deployment has yet to " \
                "create (a pod was deleted or is being added); it loads there once the pod starts."
        else:
            reason = INSUFFICIENT_CAPACITY if shortfall else "Pending"
            message = f"Placed on no replica: {shortfall or 'waiting for the operator to place it'}."
        phase = AdapterPhase.PENDING
        decided = conditions((None, "Pending", message), (None, reason, message), (False, reason, message))
    elif len(loaded) == len(placed):
        if shortfall:
            reason, message = INSUFFICIENT_CAPACITY, f"Loaded on {len(loaded)} of {wanted} wanted replica(s); " \
                f"{shortfall}."
        elif len(placed) == replicas:
            reason, message = "Loaded", f"Loaded on all {replicas} replica(s)."
        elif awaiting:
            reason, message = WAITING_FOR_REPLICA, f"Loaded on {', '.join(placed)}; placed on {awaiting} more " \
                "replica(s) the Deployment has yet to create."
        else:
            reason, message = "Loaded", f"Loaded on the {len(placed)} replica(s) it is placed on: {', '.join(placed)}."
        phase = AdapterPhase.READY
        decided = conditions((True, "ValidationPassed", "The adapter passed validation."),
                             (True, "Synced", f"Present on all {replicas} replica(s)." if len(placed) == replicas
                                     else f"Present on the {len(placed)} replica(s) it is placed on."),
                             (True, reason, message))
    else:
        message = f"Loaded on {len(loaded)} of {len(placed)} replica(s)."
        phase = AdapterPhase.LOADING
        decided = conditions(
            (True, "ValidationPassed", "The adapter passed validation.") if loaded
            else (None, "Pending", "Waiting for the replicas to validate the adapter."),
            (None, "Syncing", message), (False, "Loading", message))
    detected = reported[loaded[0]] if loaded else None
    # Every field is given, None included: the reconciler removes from the object what became unknown.
    status = LoraAdapterStatus(
        observed_generation=generation, served_name=adapter.served_name, replicas=replicas,
        ready_replicas=len(loaded), phase=phase, conditions=decided,
        wanted_replicas=None if adapter.deleting else wanted,
        ready=None if adapter.deleting else f"{len(loaded)}/{wanted}", placed_on=placed or None,
        format=detected.format if detected else None, converted_from=detected.converted_from if detected else None,
        rank=detected.rank if detected else None,
        target_modules=detected.target_modules if detected else None,
        size_bytes=detected.size_bytes if detected else None, replica_status=reported or None)
    return AdapterStatusUpdate(status=status.to_patch())


def cleanup_done(live_replicas: list[str], entries: Mapping[str, Any]) -> bool:
    """True once no live replica still reports holding the adapter (sidecars drop their entry)."""
    reported = replica_reports(entries)
    return not any(pod in reported for pod in live_replicas)
