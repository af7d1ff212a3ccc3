"""The sidecar's loop: make this replica hold and serve exactly the adapters of its adapter set.

One worker task per served name moves an adapter through download → validate → install → load (or
unload → delete), reporting each step. A newer desired entry cancels the worker of an older one. On vLLM
an update installs the new generation beside the old one, switches the name to it, and deletes the old
files only then (store.py says why).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

import aiohttp

from loraplex.api.adapter_set import AdapterSet, DesiredAdapter
from loraplex.api.contract import SidecarSettings
from loraplex.api.runtime_capabilities import (
    AdapterLayout,
    PrefixCacheKey,
    adapter_layout,
    format_version,
    vllm_release,
    vllm_version_note,
)
from loraplex.api.types import FailureReason, ReplicaAdapterStatus, ReplicaState, Runtime
from loraplex.formats import AdapterPolicy, Rejection, validate
from loraplex.sidecar.metrics import SidecarMetrics
from loraplex.sidecar.reporter import StatusReporter
from loraplex.sidecar.runtimes import LoadFailed, RuntimeClient, RuntimeUnavailable
from loraplex.sidecar.store import InstalledAdapter, VolumeStore, files_of
from loraplex.sources import Downloader, Progress, SourceError

logger = logging.getLogger(__name__)
RETRY_DELAYS = (5.0, 15.0, 30.0, 60.0, 120.0, 300.0)
PROGRESS_INTERVAL = 1.0


class Agent:
    def __init__(self, settings: SidecarSettings, reporter: StatusReporter, runtime: RuntimeClient,
                 downloader: Downloader, metrics: SidecarMetrics | None = None):
        self.settings = settings
        self.reporter = reporter
        self.runtime = runtime
        self.downloader = downloader
        self.metrics = metrics or SidecarMetrics()
        self.layout = adapter_layout(settings.runtime)
        self.store = VolumeStore(settings.volume_dir, self.layout)
        self.adapter_set: AdapterSet | None = None
        self.installed: dict[str, InstalledAdapter] = {}
        self.loaded: dict[str, str | None] = {}  # served name -> the path the runtime serves it from
        self.states: dict[str, str] = {}  # served name -> ReplicaState, for metrics and readiness
        self.workers: dict[str, tuple[Any, asyncio.Task[None]]] = {}  # served name -> (target, task)
        self.retry_at: dict[str, float] = {}
        self.failed_generation: dict[str, tuple[str, int, str]] = {}  # served -> (uid, generation, reason)
        self._attempts: dict[str, int] = {}  # consecutive failures of the current generation
        self.base_config: dict[str, Any] | None = None
        self.wake = asyncio.Event()
        # file:// source -> fingerprint, refreshed in a thread (watch_local_store), never on the event loop.
        self.local_fingerprints: dict[str, str | None] = {}
        self._local_store_moved = asyncio.Event()
        self.initial_sync_done = False
        self._downloads = asyncio.Semaphore(settings.max_concurrent_downloads)

    # ---- startup -----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Adopt what a previous life of this pod left on the volume: re-verify, never re-download."""
        await asyncio.to_thread(self.store.prepare)
        if self.settings.runtime == Runtime.VLLM and (note := vllm_version_note(self.settings.runtime_version)):
            logger.warning("%s", note)
        if self.settings.base_config is not None:
            with contextlib.suppress(OSError, ValueError):
                self.base_config = json.loads(await asyncio.to_thread(self.settings.base_config.read_text))
        for name, record in (await asyncio.to_thread(self.store.installed)).items():
            if await asyncio.to_thread(self.store.intact, record):
                self.installed[name] = record
            else:
                logger.warning("adapter %s on the volume is incomplete; it will be fetched again", name)
                await asyncio.to_thread(self.store.remove, name)
        self.local_fingerprints = await asyncio.to_thread(self._fingerprints, {
            record.source for record in self.installed.values() if record.fingerprint is not None})
        try:
            served = await self.runtime.served_adapters()
        except RuntimeUnavailable:
            return  # what the runtime reads is unknown: leftovers go once each name is loaded again
        self.loaded = {name: path for name, path in served.items() if name in self.installed}
        # Leftovers of a crash: generations never recorded, or replaced and not yet deleted, and served names
        # no record names. A folder the runtime still reads stays until the name is loaded from its record's.
        keep: dict[str, set[str]] = {name: {record.folder} for name, record in self.installed.items()}
        for name, path in served.items():
            if (folder := self._folder_of(path)) is not None:
                keep.setdefault(name, set()).add(folder)
        await asyncio.to_thread(self.store.prune_all, keep)

    def on_adapter_set(self, adapter_set: AdapterSet) -> None:
        self.adapter_set = adapter_set
        if any(a.source.startswith("file://") and a.source not in self.local_fingerprints
               for a in adapter_set.adapters):
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
        desired = self._desired()
        now = time.monotonic()
        for name, adapter in desired.items():
            target = ("sync", adapter.uid, adapter.generation, adapter.source, adapter.sha256)
            running = self.workers.get(name)
            if running is not None and running[0] == target:
                continue
            if running is not None:
                running[1].cancel()
            if self._satisfied(adapter):
                if name not in self.states:  # adopted from a previous life of this pod: say so once
                    self._report(adapter, ReplicaState.LOADED, **self._detected(self.installed[name]))
                continue
            if self.retry_at.get(name, 0) > now:
                continue
            self._spawn(name, target, self._sync(adapter))
        for name, record in self.installed.items():
            if name not in desired and self.workers.get(name, (None,))[0] != ("remove",):
                if (running := self.workers.get(name)) is not None:
                    running[1].cancel()
                self._spawn(name, ("remove",), self._remove(record))
        for name, (target, task) in list(self.workers.items()):
            if target[0] == "sync" and name not in desired:
                task.cancel()
        if not self.initial_sync_done and all(name not in self.workers for name in desired):
            self.initial_sync_done = True

    def _satisfied(self, adapter: DesiredAdapter) -> bool:
        """Nothing to do: installed at this generation and served, or rejected at this generation."""
        failed = self.failed_generation.get(adapter.served_name)
        if failed is not None and failed[:2] == (adapter.uid, adapter.generation):
            return failed[2] in (FailureReason.VALIDATION_FAILED, FailureReason.CHECKSUM_MISMATCH)
        record = self._current_install(adapter)
        return record is not None and self._serves(record)

    def _runtime_path(self, record: InstalledAdapter) -> str:
        return f"{self.settings.peft_dir.rstrip('/')}/{record.folder}"

    def _folder_of(self, runtime_path: str | None) -> str | None:
        """The folder under adapters/ of a path the runtime reads, if it is on this volume."""
        prefix = self.settings.peft_dir.rstrip("/") + "/"
        return runtime_path[len(prefix):] if runtime_path and runtime_path.startswith(prefix) else None

    def _serves(self, record: InstalledAdapter) -> bool:
        """The runtime serves this record's files under its served name."""
        if record.served_name not in self.loaded:
            return False
        return self.layout == AdapterLayout.FOLDER_PER_NAME or \
            self.loaded[record.served_name] == self._runtime_path(record)

    def _current_install(self, adapter: DesiredAdapter) -> InstalledAdapter | None:
        """The adapter's files on the volume, if they are this generation from this source."""
        record = self.installed.get(adapter.served_name)
        if (record is not None and record.uid == adapter.uid and record.generation == adapter.generation
                and record.source == adapter.source and record.sha256 == adapter.sha256
                and (record.fingerprint is None
                     or record.fingerprint == self.local_fingerprints.get(adapter.source, record.fingerprint))):
            return record
        return None

    def _spawn(self, name: str, target: Any, work: Any) -> None:
        task = asyncio.create_task(work, name=f"adapter-{name}")
        self.workers[name] = (target, task)

        def finished(done: asyncio.Task[None]) -> None:
            if self.workers.get(name, (None, None))[1] is done:
                del self.workers[name]
            if not done.cancelled() and done.exception() is not None:
                logger.error("worker for %s crashed", name, exc_info=done.exception())
            self.wake.set()

        task.add_done_callback(finished)

    # ---- one adapter ---------------------------------------------------------------------------------

    def _report(self, adapter: DesiredAdapter, state: ReplicaState, **fields: Any) -> None:
        self.states[adapter.served_name] = state.value
        # `fields` carry their wire (camelCase) names; the model refuses a misspelt one rather than the API server
        # dropping it unseen.
        entry = ReplicaAdapterStatus.model_validate(
            {"state": state, "observedGeneration": adapter.generation, **fields})
        self.reporter.set(adapter.name, entry)

    def _policy(self, adapter: DesiredAdapter) -> AdapterPolicy:
        assert self.adapter_set is not None
        limits = self.adapter_set.limits
        return AdapterPolicy(
            runtime=self.adapter_set.runtime, runtime_version=self.settings.runtime_version,
            max_rank=limits.max_rank, expected_rank=adapter.expected_rank,
            expected_format=adapter.format, allowed_formats=frozenset(limits.allowed_formats),
            allowed_target_modules=frozenset(limits.allowed_target_modules) if limits.allowed_target_modules else None,
            base_config=self.base_config,
        )

    async def _sync(self, adapter: DesiredAdapter) -> None:
        name = adapter.served_name
        started = time.monotonic()
        record = self._current_install(adapter)
        try:
            if record is not None:
                await self._ensure_loaded(adapter, record)
            else:
                previous = self.installed.get(name)
                served_previous = previous if previous is not None and self._serves(previous) else None
                record = await self._fetch_and_install(adapter)
                if record is None:
                    return
                await self._ensure_loaded(adapter, record, replaced=True, previous=served_previous)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must fail this adapter, never the sidecar
            logger.exception("unexpected error syncing %s", name)
            self._fail(adapter, FailureReason.LOAD_FAILED, f"internal error: {type(exc).__name__}: {exc}")
        finally:
            self.metrics.sync_seconds.observe(time.monotonic() - started)

    async def _fetch_and_install(self, adapter: DesiredAdapter) -> InstalledAdapter | None:
        name = adapter.served_name
        self._report(adapter, ReplicaState.PENDING, message="Waiting for a download slot.")
        async with self._downloads:
            staging = await asyncio.to_thread(self.store.new_staging, name)
            try:
                last_report = 0.0

                def on_progress(done: int, total: int) -> None:
                    nonlocal last_report
                    if time.monotonic() - last_report >= PROGRESS_INTERVAL or done == total:
                        last_report = time.monotonic()
                        self._report(adapter, ReplicaState.DOWNLOADING, bytesDone=done, bytesTotal=total)

                self._report(adapter, ReplicaState.DOWNLOADING, bytesDone=0)
                progress = Progress(on_progress)
                budget = await self._budget()
                try:
                    fetched = await self.downloader.fetch(adapter.source, staging, progress, budget, adapter.sha256)
                except SourceError as exc:
                    self.metrics.bytes.inc(max(progress.done, 0))
                    self._fail(adapter, exc.reason, exc.message, retry=exc.reason not in (
                        FailureReason.VALIDATION_FAILED, FailureReason.CHECKSUM_MISMATCH))
                    return None
                self.metrics.bytes.inc(progress.done)
                self._report(adapter, ReplicaState.VALIDATING, bytesDone=progress.done, bytesTotal=progress.total)
                try:
                    report = await asyncio.to_thread(validate, staging, self._policy(adapter))
                except Rejection as exc:
                    self._fail(adapter, FailureReason.VALIDATION_FAILED, str(exc), retry=False)
                    return None
                record = InstalledAdapter(
                    served_name=name, adapter=adapter.name, uid=adapter.uid, generation=adapter.generation,
                    source=adapter.source, sha256=adapter.sha256, format=report.format.value, rank=report.rank,
                    target_modules=list(report.target_modules), size_bytes=fetched.size_bytes,
                    files=await asyncio.to_thread(files_of, staging), fingerprint=fetched.fingerprint,
                )
                if self.layout == AdapterLayout.FOLDER_PER_NAME and name in self.loaded:
                    # The folder is about to be replaced: the runtime must drop the old weights first.
                    await self.runtime.unload(name)
                    self.loaded.pop(name, None)
                record = await asyncio.to_thread(self.store.install, staging, record)
                self.installed[name] = record
                if fetched.fingerprint is not None:
                    self.local_fingerprints[adapter.source] = fetched.fingerprint
                return record
            finally:
                await asyncio.to_thread(self.store.discard, staging)

    async def _budget(self) -> int | None:
        if self.settings.volume_limit_bytes is None:
            return None
        return self.settings.volume_limit_bytes - await asyncio.to_thread(self.store.used_bytes)

    async def _ensure_loaded(self, adapter: DesiredAdapter, record: InstalledAdapter, replaced: bool = False,
                             previous: InstalledAdapter | None = None) -> None:
        """Have the runtime serve `record`; `previous` is the generation it served until this update."""
        name = adapter.served_name
        detected = self._detected(record)
        if not self._serves(record) or replaced:
            while not await self.runtime.healthy():
                self._report(adapter, ReplicaState.PENDING, message="Waiting for the runtime to become healthy.",
                             **detected)
                await asyncio.sleep(self.settings.runtime_poll_seconds)
            started = time.monotonic()
            path = self._runtime_path(record)
            try:
                await self.runtime.load(name, path)
            except LoadFailed as exc:
                if previous is not None and self.layout == AdapterLayout.FOLDER_PER_GENERATION:
                    await self._roll_back(record, previous)
                self._fail(adapter, FailureReason.LOAD_FAILED, str(exc), retry=True, **detected)
                return
            except RuntimeUnavailable as exc:
                self.loaded.pop(name, None)  # the runtime may have dropped it: load again once it answers
                self._fail(adapter, FailureReason.RUNTIME_UNAVAILABLE, str(exc), retry=True, **detected)
                return
            self.metrics.load_seconds.observe(time.monotonic() - started)
            self.loaded[name] = path
            if previous is not None and self._prefix_cache_keyed_by_name():
                logger.warning("vLLM %s keys its prefix cache by adapter name only: requests to %s may reuse "
                               "blocks computed with generation %d's weights until they are evicted", self._version(),
                               name, previous.generation)
        await asyncio.to_thread(self.store.prune, name, {record.folder})
        self.failed_generation.pop(name, None)
        self.retry_at.pop(name, None)
        self._report(adapter, ReplicaState.LOADED, **detected)

    async def _roll_back(self, refused: InstalledAdapter, previous: InstalledAdapter) -> None:
        """The runtime refused a new generation: serve the previous one again, whose files are still there."""
        name = previous.served_name
        self.loaded.pop(name, None)
        await asyncio.to_thread(self.store.record, previous)
        self.installed[name] = previous
        try:
            await self.runtime.load(name, self._runtime_path(previous))
            self.loaded[name] = self._runtime_path(previous)
        except (LoadFailed, RuntimeUnavailable) as exc:
            logger.warning("could not serve generation %d of %s again: %s", previous.generation, name, exc)
        await asyncio.to_thread(self.store.discard_generation, refused)

    def _prefix_cache_keyed_by_name(self) -> bool:
        return self.settings.runtime == Runtime.VLLM and \
            vllm_release(self.settings.runtime_version).prefix_cache_key == PrefixCacheKey.NAME

    def _version(self) -> str:
        version = self.settings.runtime_version
        return format_version(version) if version is not None else "(version unknown)"

    @staticmethod
    def _detected(record: InstalledAdapter) -> dict[str, Any]:
        return {"format": record.format, "rank": record.rank, "targetModules": record.target_modules,
                "sizeBytes": record.size_bytes}

    def _fail(self, adapter: DesiredAdapter, reason: FailureReason, message: str, retry: bool = True,
              **fields: Any) -> None:
        name = adapter.served_name
        previous = self.failed_generation.get(name)
        attempt = 0 if previous is None or previous[:2] != (adapter.uid, adapter.generation) else \
            self._attempts.get(name, 0) + 1
        self._attempts[name] = attempt
        self.failed_generation[name] = (adapter.uid, adapter.generation, reason.value)
        self.metrics.failures.labels(reason=reason.value).inc()
        sentences = [message.rstrip(".") + "."]
        old = self.installed.get(name)
        if old is not None and name in self.loaded and old.generation != adapter.generation:
            sentences.append(f"Still serving generation {old.generation}.")
        if retry:
            delay = RETRY_DELAYS[min(attempt, len(RETRY_DELAYS) - 1)]
            self.retry_at[name] = time.monotonic() + delay
            asyncio.get_running_loop().call_later(delay, self.wake.set)
            sentences.append(f"Retrying in {delay:.0f}s.")
        message = " ".join(sentences)
        logger.warning("adapter %s failed (%s): %s", name, reason.value, message)
        self._report(adapter, ReplicaState.FAILED, reason=reason.value, message=message, **fields)

    async def _remove(self, record: InstalledAdapter) -> None:
        name = record.served_name
        self.states[name] = ReplicaState.UNLOADING.value
        self.reporter.set(record.adapter, ReplicaAdapterStatus(state=ReplicaState.UNLOADING,
                                                               observed_generation=record.generation))
        while True:
            try:
                await self.runtime.unload(name)
                break
            except (RuntimeUnavailable, LoadFailed) as exc:
                logger.warning("unloading %s failed (%s); retrying", name, exc)
                await asyncio.sleep(self.settings.runtime_poll_seconds)
        self.loaded.pop(name, None)
        await asyncio.to_thread(self.store.remove, name)
        self.installed.pop(name, None)
        with contextlib.suppress(RuntimeUnavailable, LoadFailed):
            await self.runtime.retired(name)
        self.states.pop(name, None)
        self.failed_generation.pop(name, None)
        self.retry_at.pop(name, None)
        self.reporter.set(record.adapter, None)
        logger.info("removed adapter %s", name)

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
            lost = {name for name in self.loaded if name not in served} if healthy else set()
            if not healthy and was_healthy:
                # Whatever it served may be gone when it answers again: nothing is reported Loaded until then
                # (loading a name it still serves from the same path is a no-op).
                logger.warning("runtime is not healthy; adapters will be restored when it is back")
                self.loaded.clear()
                self.wake.set()
            if lost or (healthy and not was_healthy):
                if lost:
                    logger.warning("runtime no longer serves %s; loading again", ", ".join(sorted(lost)))
                for name in lost:
                    del self.loaded[name]
                self.wake.set()
            was_healthy = healthy

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
            desired = {name: a for name, a in self._desired().items() if a.source.startswith("file://")}
            fresh = await asyncio.to_thread(self._fingerprints, {a.source for a in desired.values()})
            moved = {source for source, value in fresh.items() if self.local_fingerprints.get(source) != value}
            self.local_fingerprints = fresh
            if moved:
                for name, adapter in desired.items():
                    if adapter.source in moved:  # new files: re-check now, even if the old ones were rejected
                        self.retry_at.pop(name, None)
                        self.failed_generation.pop(name, None)
                self.wake.set()

    def _fingerprints(self, sources: set[str]) -> dict[str, str | None]:
        return {source: self.downloader.local_fingerprint(source) for source in sources}

    def _desired(self) -> dict[str, DesiredAdapter]:
        return {a.served_name: a for a in self.adapter_set.adapters} if self.adapter_set else {}

    def _update_gauges(self) -> None:
        counts: dict[str, int] = dict.fromkeys((s.value for s in ReplicaState), 0)
        for state in self.states.values():
            counts[state] = counts.get(state, 0) + 1
        for state, count in counts.items():
            self.metrics.adapters.labels(state=state).set(count)

    async def reassert_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reassert_seconds)
            self.reporter.reassert()


def default_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60),
                                 connector=aiohttp.TCPConnector(limit=64))

