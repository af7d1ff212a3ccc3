"""The sidecar's loop: make this replica hold and serve exactly the adapters of its adapter set.

Each served name has one record (slots.py) and at most one worker at a time (lifecycle.py): a newer desired
entry cancels the worker of an older one. The loop also notices a runtime restart and files changed under a
file:// adapter store.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

import aiohttp

from loraplex.api.adapter_set import AdapterSet, DesiredAdapter
from loraplex.api.contract import SidecarSettings
from loraplex.api.runtime_capabilities import adapter_layout, version_note
from loraplex.api.types import ReplicaState
from loraplex.sidecar.demand import DemandTracker
from loraplex.sidecar.lifecycle import AdapterLifecycle
from loraplex.sidecar.metrics import SidecarMetrics
from loraplex.sidecar.reporter import ReplicaReporter
from loraplex.sidecar.residency import residency_of
from loraplex.sidecar.runtimes import RuntimeClient, RuntimeUnavailable
from loraplex.sidecar.slots import AdapterSlot, Remove, Sync, Worker
from loraplex.sidecar.store import VolumeStore
from loraplex.sources import Downloader

logger = logging.getLogger(__name__)


class Agent:
    def __init__(self, settings: SidecarSettings, reporter: ReplicaReporter, runtime: RuntimeClient,
                 downloader: Downloader, metrics: SidecarMetrics | None = None):
        self.settings = settings
        self.reporter = reporter
        self.runtime = runtime
        self.downloader = downloader
        self.metrics = metrics or SidecarMetrics()
        self.store = VolumeStore(settings.volume_dir, adapter_layout(settings.runtime))
        self.wake = asyncio.Event()
        self.lifecycle = AdapterLifecycle(settings, self.store, reporter, runtime, downloader, self.metrics,
                                          self.wake.set)
        self.adapter_set: AdapterSet | None = None
        self.slots: dict[str, AdapterSlot] = {}
        self._local_store_moved = asyncio.Event()
        self.initial_sync_done = False
        self._reported_since_start = False

    def slot(self, name: str) -> AdapterSlot:
        if name not in self.slots:
            self.slots[name] = AdapterSlot(name)
        return self.slots[name]

    # ---- startup -----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Adopt what a previous life of this pod left on the volume: re-verify, never re-download."""
        await asyncio.to_thread(self.store.prepare)
        if note := version_note(self.settings.runtime, self.settings.runtime_version):
            logger.warning("%s", note)
        if self.settings.base_config is not None:
            with contextlib.suppress(OSError, ValueError):
                self.lifecycle.base_config = json.loads(
                    await asyncio.to_thread(self.settings.base_config.read_text))
        for name, record in (await asyncio.to_thread(self.store.installed)).items():
            if await asyncio.to_thread(self.store.intact, record):
                self.slot(name).installed = record
            else:
                logger.warning("adapter %s on the volume is incomplete; it will be fetched again", name)
                await asyncio.to_thread(self.store.remove, name)
        installed = [slot.installed for slot in self.slots.values() if slot.installed is not None]
        self.lifecycle.local_fingerprints = await asyncio.to_thread(
            self._fingerprints, {record.source for record in installed if record.fingerprint is not None})
        try:
            served = await self.runtime.served_adapters()
        except RuntimeUnavailable:
            return  # what the runtime reads is unknown: leftovers go once each name is loaded again
        for name, path in served.items():
            if name in self.slots:
                self.slots[name].mark_loaded(path)
        # Leftovers of a crash: generations never recorded, or replaced and not yet deleted, and served names
        # no record names. A folder the runtime still reads stays until the name is loaded from its record's.
        keep: dict[str, set[str]] = {record.served_name: {record.folder} for record in installed}
        for name, path in served.items():
            if (folder := self.lifecycle.folder_of(path)) is not None:
                keep.setdefault(name, set()).add(folder)
        await asyncio.to_thread(self.store.prune_all, keep)

    def on_adapter_set(self, adapter_set: AdapterSet) -> None:
        self.adapter_set = adapter_set
        # Only what the operator placed on this pod; the rest is removed like an adapter deleted.
        assigned = adapter_set.assigned_to(self.settings.pod_name)
        desired = {a.served_name: a for a in assigned}
        for name, adapter in desired.items():
            self.slot(name).desired = adapter
        for slot in self.slots.values():
            if slot.name not in desired:
                slot.desired = None
        if any(a.source.startswith("file://") and a.source not in self.lifecycle.local_fingerprints
               for a in assigned):
            self._local_store_moved.set()
        self.wake.set()

    # ---- the loop ------------------------------------------------------------------------------------

    async def run(self) -> None:
        await self.start()
        while True:
            await self.wake.wait()
            self.wake.clear()
            self.converge()
            self._update_gauges()

    def converge(self) -> None:
        if self.adapter_set is None:
            return  # never act on "nothing" before the first adapter set arrives
        if not self._reported_since_start:
            # What a previous life of this pod reported of adapters no longer in the set is removed now;
            # the rest is overwritten as each one is checked again.
            self._reported_since_start = True
            self.reporter.drop_unclaimed({a.name for a in self.adapter_set.assigned_to(self.settings.pod_name)}
                                         | {slot.reported_as for slot in self.slots.values() if slot.reported_as})
        now = time.monotonic()
        for slot in list(self.slots.values()):
            if slot.desired is not None:
                self._converge_desired(slot, slot.desired, now)
                continue
            if slot.worker is not None and isinstance(slot.worker.target, Sync):
                slot.worker.task.cancel()
            if slot.installed is not None:
                if slot.worker is None or isinstance(slot.worker.target, Sync):
                    self._spawn(slot, Remove(), self.lifecycle.remove(slot))
            elif slot.worker is None:
                self.lifecycle.withdraw_report(slot)  # e.g. refused here, then deleted: nothing to unload
                if slot.vacant:
                    del self.slots[slot.name]
        if not self.initial_sync_done and all(slot.worker is None for slot in self.slots.values()
                                              if slot.desired is not None):
            self.initial_sync_done = True

    def _converge_desired(self, slot: AdapterSlot, adapter: DesiredAdapter, now: float) -> None:
        target = Sync.of(adapter)
        if slot.worker is not None:
            if slot.worker.target == target:
                return
            slot.worker.task.cancel()
        if self.lifecycle.satisfied(slot, adapter):
            if slot.state is None and slot.installed is not None:  # adopted from a previous life: say so once
                self.lifecycle.report(slot, adapter, ReplicaState.LOADED, **self.lifecycle.detected(slot.installed))
            return
        if slot.retry_at > now:
            return
        assert self.adapter_set is not None
        self._spawn(slot, target, self.lifecycle.sync(slot, adapter, self.adapter_set))

    def _spawn(self, slot: AdapterSlot, target: Sync | Remove, work: object) -> None:
        task: asyncio.Task[None] = asyncio.create_task(work, name=f"adapter-{slot.name}")  # type: ignore[arg-type]
        slot.worker = Worker(target, task)

        def finished(done: asyncio.Task[None]) -> None:
            if slot.worker is not None and slot.worker.task is done:
                slot.worker = None
            if not done.cancelled() and done.exception() is not None:
                logger.error("worker for %s crashed", slot.name, exc_info=done.exception())
            self.wake.set()

        task.add_done_callback(finished)

    # ---- watching the runtime and the adapter store -----------------------------------------------

    async def watch_runtime(self) -> None:
        """Notice a runtime restart (its adapters are gone) and load every adapter again."""
        was_healthy = True
        while True:
            await asyncio.sleep(self.settings.runtime_poll_seconds)
            try:
                healthy = await self.runtime.healthy()
                served = await self.runtime.served_adapters() if healthy else {}
            except RuntimeUnavailable:
                healthy, served = False, {}
            loaded = [slot for slot in self.slots.values() if slot.loaded]
            if not healthy and was_healthy:
                # Whatever it served may be gone when it answers again: nothing is reported Loaded until then
                # (loading a name it still serves from the same path is a no-op).
                logger.warning("runtime is not healthy; adapters will be restored when it is back")
                for slot in loaded:
                    slot.mark_unloaded()
                self.wake.set()
            lost = [slot for slot in loaded if slot.name not in served] if healthy else []
            if lost:
                logger.warning("runtime no longer serves %s; loading again",
                               ", ".join(sorted(slot.name for slot in lost)))
                for slot in lost:
                    slot.mark_unloaded()
            if lost or (healthy and not was_healthy):
                self.wake.set()
            was_healthy = healthy

    async def watch_demand(self) -> None:
        """Sample which adapters have requests in flight and whether requests queue, and report the level of
        each Loaded adapter whose count follows demand. Without samples (the runtime does not answer, or does
        not say), no level is reported and what was seen is forgotten."""
        tracker = DemandTracker(self.settings.demand_queue_seconds, self.settings.demand_idle_seconds)
        while True:
            await asyncio.sleep(self.settings.demand_sample_seconds)
            try:
                sample = await self.runtime.lora_requests()
            except RuntimeUnavailable:
                sample = None
            if sample is None:
                tracker = DemandTracker(self.settings.demand_queue_seconds, self.settings.demand_idle_seconds)
                self.reporter.set_demands({})
                continue
            now = time.monotonic()
            tracker.record(now, sample)
            followed = {slot.name: slot.reported_as for slot in self.slots.values()
                        if slot.loaded and slot.reported_as and slot.desired and slot.desired.follows_demand}
            tracker.forget(followed)
            self.reporter.set_demands({followed[name]: level for name, level in tracker.levels(now, followed).items()})

    def local_store_changed(self) -> None:
        """A file under the adapter store changed (from the filesystem watcher): rescan soon."""
        self._local_store_moved.set()

    async def watch_local_store(self) -> None:
        """Keep the fingerprints of file:// sources current, in a thread: at once when the filesystem watcher
        reports a change (a burst of them makes one rescan), and every local_rescan_seconds in case it
        cannot see one (inotify misses writes made on other hosts of a network filesystem)."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._local_store_moved.wait(), self.settings.local_rescan_seconds)
            self._local_store_moved.clear()
            local = [slot for slot in self.slots.values()
                     if slot.desired is not None and slot.desired.source.startswith("file://")]
            fresh = await asyncio.to_thread(self._fingerprints, {slot.desired.source for slot in local
                                                                 if slot.desired is not None})
            known = self.lifecycle.local_fingerprints
            moved = {source for source, value in fresh.items() if known.get(source) != value}
            self.lifecycle.local_fingerprints = fresh
            if moved:
                for slot in local:
                    if slot.desired is not None and slot.desired.source in moved:
                        slot.clear_failure()  # new files: re-check now, even if the old ones were refused
                self.wake.set()

    def _fingerprints(self, sources: set[str]) -> dict[str, str | None]:
        return {source: self.downloader.local_fingerprint(source) for source in sources}

    def _update_gauges(self) -> None:
        counts = dict.fromkeys(ReplicaState, 0)
        for slot in self.slots.values():
            if slot.state is not None:
                counts[slot.state] += 1
        for state, count in counts.items():
            self.metrics.adapters.labels(state=state.value).set(count)
        self.metrics.residency.publish(residency_of(self.slots.values()), time.time())


def default_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60),
                                 connector=aiohttp.TCPConnector(limit=64))
