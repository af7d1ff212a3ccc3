"""This replica's report: the LoraReplica named after its pod, owned by the pod (the garbage collector deletes it
with the pod), whose status only this sidecar writes. A write is one JSON merge patch on /status carrying only
the entries that changed since the last one (null removes one), so API traffic follows changes, not time.

Progress (Downloading, Validating...) is paced: an adapter's progress is due `min_interval` after its last
write, the latest state winning. An outcome someone waits for (Loaded, Failed, or the entry's removal) is due
at once. One write is in flight at a time, and when anything is due every pending change goes in it, so a
burst of changes costs a few requests, not one per adapter. Nothing is written again while nothing changes:
the reporter watches its LoraReplica and repairs it only when it was deleted or someone else changed it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Mapping
from typing import Any

from loraplex.api.conditions import utc_now
from loraplex.api.types import (
    API_VERSION,
    BASE_MODEL_LABEL,
    LORA_REPLICA,
    DemandLevel,
    ReplicaAdapterStatus,
    ReplicaState,
)
from loraplex.kube import ApiError, Conflict, KubeClient, NotFound, follow_object, resource_path
from loraplex.kube.merge_patch import merge_difference

logger = logging.getLogger(__name__)
OUTCOMES = frozenset({ReplicaState.LOADED, ReplicaState.FAILED})
RETRY_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0)
_OWN_VERSIONS_KEPT = 64  # resource versions of our own writes, to tell their watch echoes from others' edits
_NOTHING = object()

Wire = dict[str, Any]


class ReplicaReporter:
    def __init__(self, client: KubeClient, namespace: str, pod_name: str, pod_uid: str, base_model: str,
                 min_interval: float = 0.25, retry_delays: tuple[float, ...] = RETRY_DELAYS):
        self.client, self.namespace, self.pod_name = client, namespace, pod_name
        self.pod_uid, self.base_model = pod_uid, base_model
        self.min_interval, self.retry_delays = min_interval, retry_delays
        self._latest: dict[str, ReplicaAdapterStatus] = {}  # adapter -> the entry we want the object to hold
        self._demand: dict[str, DemandLevel] = {}  # adapter -> the demand seen here, carried while Loaded
        self._written: dict[str, Wire] | None = None  # what the object holds as far as we know; None: no object
        self._written_counts: tuple[int | None, int | None] = (None, None)  # its status.loaded, status.failed
        self._dirty: set[str] = set()
        self._set_since_start: set[str] = set()
        self._keep: set[str] | None = None  # the adapters drop_unclaimed keeps, until the first observation
        self._last_write: dict[str, float] = {}  # adapter -> loop time of its last write
        self._own_versions: collections.deque[str] = collections.deque(maxlen=_OWN_VERSIONS_KEPT)
        self._writing = False
        self._deferred: Any = _NOTHING  # an observation made while a write was on its way: judged after it
        self._observed = asyncio.Event()  # the object's state was read once: adopt it before writing
        self._wake = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None  # wakes the loop when paced progress is due

    @property
    def path(self) -> str:
        return resource_path(API_VERSION, LORA_REPLICA.plural, self.namespace, self.pod_name)

    # ---- what the agent says ----------------------------------------------------------------------------

    def set(self, adapter: str, entry: ReplicaAdapterStatus | None) -> None:
        self._set_since_start.add(adapter)
        previous = self._latest.get(adapter)
        if entry is not None:
            if entry.state != ReplicaState.LOADED:
                self._demand.pop(adapter, None)  # a level is of a Loaded adapter: sampled again once it is
            level = self._demand.get(adapter)
            entry = entry if entry.demand == level else entry.model_copy(update={"demand": level})
        if entry is None:
            if previous is None:
                return
            del self._latest[adapter]
        else:
            if previous is not None and _unstamped(previous) == _unstamped(entry):
                return
            self._latest[adapter] = entry.model_copy(update={"updated": utc_now()})
        self._dirty.add(adapter)
        self._wake.set()

    def set_demands(self, levels: Mapping[str, DemandLevel]) -> None:
        """The demand this replica sees of each adapter it has Loaded (sidecar/demand.py); a level rides on the
        adapter's entry, so only a change of level costs a write."""
        before, self._demand = self._demand, dict(levels)
        for adapter in before.keys() | self._demand.keys():
            if before.get(adapter) != self._demand.get(adapter) and (entry := self._latest.get(adapter)):
                self.set(adapter, entry)

    def drop_unclaimed(self, keep: set[str]) -> None:
        """After the first adapter set: remove what a previous life of this pod reported about adapters that
        are neither in `keep` nor reported since (once that report is read, if it is not yet)."""
        self._keep = keep
        if self._observed.is_set():
            for adapter in [a for a in self._latest if a not in keep and a not in self._set_since_start]:
                self.set(adapter, None)

    # ---- writing ------------------------------------------------------------------------------------------

    async def run(self) -> None:
        await self._observed.wait()
        loop = asyncio.get_running_loop()
        failures, retry_at = 0, float("-inf")
        while True:
            await self._wake.wait()
            self._wake.clear()
            now = loop.time()
            if now < retry_at:  # backing off after a failed write
                self._wake_at(retry_at)
                continue
            if not any(self._urgent(name) or now - self._last_write.get(name, float("-inf")) >= self.min_interval
                       for name in self._dirty):
                if self._dirty:  # paced progress only: come back when the first of it is due
                    self._wake_at(min(self._last_write[name] for name in self._dirty) + self.min_interval)
                continue
            # Something is due: everything pending rides along, so one request carries every change.
            batch, self._dirty = self._dirty, set()
            try:
                await self._write(batch)
            except (ApiError, OSError, TimeoutError) as exc:
                self._dirty |= batch  # joins whatever changes meanwhile: one write when the API answers
                delay = self.retry_delays[min(failures, len(self.retry_delays) - 1)]
                failures += 1
                logger.warning("could not write LoraReplica %s/%s (%s); retrying in %.0fs", self.namespace,
                               self.pod_name, exc, delay)
                retry_at = loop.time() + delay
                self._wake_at(retry_at)
                continue
            failures = 0
            for name in batch:
                self._last_write[name] = now
                if name not in self._latest:
                    self._last_write.pop(name)
            if self._dirty:
                self._wake.set()

    def _wake_at(self, when: float) -> None:
        if self._timer is not None:
            if self._timer.when() <= when:
                return
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_at(when, self._timer_due)

    def _timer_due(self) -> None:
        self._timer = None
        self._wake.set()

    def _urgent(self, adapter: str) -> bool:
        entry = self._latest.get(adapter)
        return entry is None or entry.state in OUTCOMES

    async def flush(self) -> None:
        batch, self._dirty = self._dirty, set()
        if batch and self._observed.is_set():
            await self._write(batch)

    async def _write(self, adapters: set[str]) -> None:
        self._writing = True
        try:
            await self._patch(adapters)
        finally:
            self._writing = False
            deferred, self._deferred = self._deferred, _NOTHING
            if deferred is not _NOTHING:
                self.observe(deferred)

    async def _patch(self, adapters: set[str]) -> None:
        if self._written is None:
            await self._create()
        assert self._written is not None
        changed: dict[str, Wire | None] = {}  # adapter -> its entry as it will be (None: removed)
        patch: dict[str, Wire | None] = {}
        for name in adapters:
            entry = self._latest.get(name)
            wire = entry.to_wire() if entry is not None else None
            held = self._written.get(name)
            if held == wire:
                continue
            changed[name] = wire
            # A merge patch merges an entry field by field: fields it no longer has go as null.
            patch[name] = merge_difference(held, wire) if held is not None and wire is not None else wire
        counts = self._counts()
        if not changed and counts == self._written_counts:
            return
        status: dict[str, Any] = {"adapters": patch}
        if counts != self._written_counts:
            status["loaded"], status["failed"] = counts
        try:
            written = await self.client.merge_patch(f"{self.path}/status", {"status": status})
        except NotFound:
            logger.warning("LoraReplica %s/%s is gone; creating it again", self.namespace, self.pod_name)
            self._lost()
            raise
        self._remember_version(written)
        for name, wire in changed.items():
            if wire is None:
                self._written.pop(name, None)
            else:
                self._written[name] = wire
        self._written_counts = counts

    async def _create(self) -> None:
        meta: dict[str, Any] = {"name": self.pod_name, "namespace": self.namespace,
                                "labels": {BASE_MODEL_LABEL: self.base_model}}
        if self.pod_uid:
            # Not blockOwnerDeletion: setting it needs the right to update the pod's finalizers.
            meta["ownerReferences"] = [{"apiVersion": "v1", "kind": "Pod", "name": self.pod_name,
                                        "uid": self.pod_uid}]
        body = {"apiVersion": API_VERSION, "kind": LORA_REPLICA.kind, "metadata": meta,
                "spec": {"baseModel": self.base_model}}
        try:
            created = await self.client.create(resource_path(API_VERSION, LORA_REPLICA.plural, self.namespace), body)
        except Conflict:
            created = await self.client.get(self.path)  # made meanwhile (a previous life): take what it holds
        else:
            self._remember_version(created)
        self._written, self._written_counts = _reported(created)

    def _remember_version(self, obj: Any) -> None:
        version = ((obj or {}).get("metadata") or {}).get("resourceVersion")
        if version:
            self._own_versions.append(version)

    def _counts(self) -> tuple[int, int]:
        states = [entry.state for entry in self._latest.values()]
        return states.count(ReplicaState.LOADED), states.count(ReplicaState.FAILED)

    # ---- repair -------------------------------------------------------------------------------------------

    def observe(self, obj: dict[str, Any] | None) -> None:
        """The LoraReplica as the API server has it now (None: there is none). The first observation adopts
        what a previous life of this pod reported; later ones repair whatever differs from our writes."""
        if not self._observed.is_set():
            self._observed.set()
            if obj is not None:
                self._written, self._written_counts = _reported(obj)
                self._remember_version(obj)
                for name, wire in self._written.items():
                    try:
                        held = ReplicaAdapterStatus.model_validate(wire)
                    except ValueError:
                        self._dirty.add(name)  # another loraplex version's entry: remove it
                        continue
                    mine = self._latest.get(name)
                    if mine is None and name in self._set_since_start:
                        self._dirty.add(name)  # removed before the first read
                    elif mine is None or _unstamped(mine) == _unstamped(held):
                        self._latest[name] = held  # what it says is still true: keep it, and when it was said
                        self._dirty.discard(name)
            if self._keep is not None:
                self.drop_unclaimed(self._keep)
            if self._dirty or self._latest:
                self._wake.set()
            return
        if self._writing:  # its echo may come before its answer: wait for our version to be known
            self._deferred = obj
            return
        if obj is None:
            if self._written is not None:
                logger.warning("LoraReplica %s/%s was deleted; creating it again", self.namespace, self.pod_name)
                self._lost()
            return
        if obj["metadata"].get("resourceVersion") in self._own_versions:
            return  # the echo of our own write
        held, counts = _reported(obj)
        if self._written is not None and held == self._written and counts == self._written_counts:
            return
        logger.warning("LoraReplica %s/%s was changed by someone else; writing back what this replica holds",
                       self.namespace, self.pod_name)
        self._written, self._written_counts = held, counts
        self._dirty |= set(held) | set(self._latest)
        self._wake.set()

    def _lost(self) -> None:
        self._written, self._written_counts = None, (None, None)
        self._dirty |= set(self._latest)
        self._wake.set()

    async def watch(self, backoff: float = 1.0) -> None:
        """Follow this pod's LoraReplica (list + watch, field selector on its name) and repair it."""
        await follow_object(self.client, resource_path(API_VERSION, LORA_REPLICA.plural, self.namespace),
                            self.pod_name, self.observe, "LoraReplica", logger, backoff)


def _reported(obj: dict[str, Any]) -> tuple[dict[str, Wire], tuple[int | None, int | None]]:
    status = obj.get("status") or {}
    adapters = {name: wire for name, wire in (status.get("adapters") or {}).items() if isinstance(wire, dict)}
    return adapters, (status.get("loaded"), status.get("failed"))


def _unstamped(entry: ReplicaAdapterStatus) -> dict[str, Any]:
    """What an entry says, without when it was written."""
    wire = entry.to_wire()
    wire.pop("updated", None)
    return wire
