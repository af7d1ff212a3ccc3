"""One adapter's way through this replica: download → validate → install → load, or unload → delete, each step
reported. On vLLM an update installs the new generation beside the old one, switches the name to it, and
deletes the old files only then (store.py says why)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from loraplex.api.adapter_set import AdapterSet, DesiredAdapter
from loraplex.api.contract import SidecarSettings
from loraplex.api.runtime_capabilities import AdapterLayout, PrefixCacheKey, format_version, vllm_release
from loraplex.api.types import FailureReason, ReplicaAdapterStatus, ReplicaState, Runtime
from loraplex.formats import AdapterPolicy, Rejection
from loraplex.formats.for_runtime import validate_or_convert
from loraplex.sidecar.metrics import SidecarMetrics
from loraplex.sidecar.reporter import ReplicaReporter
from loraplex.sidecar.runtimes import LoadFailed, RuntimeClient, RuntimeUnavailable
from loraplex.sidecar.slots import AdapterSlot
from loraplex.sidecar.store import InstalledAdapter, VolumeStore, files_of
from loraplex.sources import Downloader, Progress, SourceError

logger = logging.getLogger(__name__)
PROGRESS_INTERVAL = 1.0


class AdapterLifecycle:
    def __init__(self, settings: SidecarSettings, store: VolumeStore, reporter: ReplicaReporter,
                 runtime: RuntimeClient, downloader: Downloader, metrics: SidecarMetrics,
                 wake: Callable[[], None]):
        self.settings, self.store, self.reporter = settings, store, reporter
        self.runtime, self.downloader, self.metrics = runtime, downloader, metrics
        self.layout = store.layout
        self.wake = wake
        self.base_config: dict[str, Any] | None = None
        # file:// source -> fingerprint, refreshed in a thread (Agent.watch_local_store), never on the event loop.
        self.local_fingerprints: dict[str, str | None] = {}
        self._downloads = asyncio.Semaphore(settings.max_concurrent_downloads)

    # ---- what is on the volume and what the runtime serves -------------------------------------------

    def runtime_path(self, record: InstalledAdapter) -> str:
        return f"{self.settings.peft_dir.rstrip('/')}/{record.folder}"

    def folder_of(self, runtime_path: str | None) -> str | None:
        """The folder under adapters/ of a path the runtime reads, if it is on this volume."""
        prefix = self.settings.peft_dir.rstrip("/") + "/"
        return runtime_path[len(prefix):] if runtime_path and runtime_path.startswith(prefix) else None

    def serves(self, slot: AdapterSlot, record: InstalledAdapter) -> bool:
        """The runtime serves this record's files under the slot's name."""
        if not slot.loaded:
            return False
        return self.layout == AdapterLayout.FOLDER_PER_NAME or slot.served_path == self.runtime_path(record)

    def current_install(self, slot: AdapterSlot, adapter: DesiredAdapter) -> InstalledAdapter | None:
        """The adapter's files on the volume, if they are this generation from this source."""
        record = slot.installed
        if (record is not None and record.uid == adapter.uid and record.generation == adapter.generation
                and record.source == adapter.source and record.sha256 == adapter.sha256
                and (record.fingerprint is None
                     or record.fingerprint == self.local_fingerprints.get(adapter.source, record.fingerprint))):
            return record
        return None

    def satisfied(self, slot: AdapterSlot, adapter: DesiredAdapter) -> bool:
        """Nothing to do: installed at this generation and served, or refused for good at this generation."""
        if slot.failure is not None and slot.failure.of(adapter):
            return slot.failure.final
        record = self.current_install(slot, adapter)
        return record is not None and self.serves(slot, record)

    # ---- reporting -----------------------------------------------------------------------------------

    def report(self, slot: AdapterSlot, adapter: DesiredAdapter, state: ReplicaState, **fields: Any) -> None:
        if slot.reported_as not in (None, adapter.name):
            self.withdraw_report(slot)  # the served name passed to another LoraAdapter
        slot.state, slot.reported_as = state, adapter.name
        self.reporter.set(adapter.name, ReplicaAdapterStatus(state=state, observed_generation=adapter.generation,
                                                             **fields))

    def withdraw_report(self, slot: AdapterSlot) -> None:
        """Take this replica's entry out of the adapter's status: it holds nothing of it any more."""
        if slot.reported_as is not None:
            self.reporter.set(slot.reported_as, None)
        slot.state, slot.reported_as = None, None

    @staticmethod
    def detected(record: InstalledAdapter) -> dict[str, Any]:
        return {"format": record.format, "converted_from": record.converted_from, "rank": record.rank,
                "target_modules": record.target_modules, "size_bytes": record.size_bytes}

    def fail(self, slot: AdapterSlot, adapter: DesiredAdapter, reason: FailureReason, message: str,
             retry: bool = True, **fields: Any) -> None:
        failure = slot.record_failure(adapter, reason)
        self.metrics.failures.labels(reason=reason.value).inc()
        sentences = [message.rstrip(".") + "."]
        old = slot.installed
        if old is not None and slot.loaded and old.generation != adapter.generation:
            sentences.append(f"Still serving generation {old.generation}.")
        if retry:
            slot.retry_at = time.monotonic() + failure.retry_delay
            asyncio.get_running_loop().call_later(failure.retry_delay, self.wake)
            sentences.append(f"Retrying in {failure.retry_delay:.0f}s.")
        message = " ".join(sentences)
        logger.warning("adapter %s failed (%s): %s", slot.name, reason.value, message)
        self.report(slot, adapter, ReplicaState.FAILED, reason=reason.value, message=message, **fields)

    # ---- sync ----------------------------------------------------------------------------------------

    async def sync(self, slot: AdapterSlot, adapter: DesiredAdapter, adapter_set: AdapterSet) -> None:
        started = time.monotonic()
        record = self.current_install(slot, adapter)
        try:
            if record is not None:
                await self._ensure_loaded(slot, adapter, record)
            else:
                previous = slot.installed if slot.installed is not None and self.serves(slot, slot.installed) \
                    else None
                record = await self._fetch_and_install(slot, adapter, adapter_set)
                if record is None:
                    return
                await self._ensure_loaded(slot, adapter, record, replaced=True, previous=previous)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must fail this adapter, never the sidecar
            logger.exception("unexpected error syncing %s", slot.name)
            self.fail(slot, adapter, FailureReason.LOAD_FAILED, f"internal error: {type(exc).__name__}: {exc}")
        finally:
            self.metrics.sync_seconds.observe(time.monotonic() - started)

    def _policy(self, adapter: DesiredAdapter, adapter_set: AdapterSet) -> AdapterPolicy:
        limits = adapter_set.limits
        return AdapterPolicy(
            runtime=adapter_set.runtime, runtime_version=self.settings.runtime_version,
            max_rank=limits.max_rank, expected_rank=adapter.expected_rank,
            expected_format=adapter.format, allowed_formats=frozenset(limits.allowed_formats),
            allowed_target_modules=frozenset(limits.allowed_target_modules) if limits.allowed_target_modules else None,
            base_config=self.base_config,
        )

    async def _fetch_and_install(self, slot: AdapterSlot, adapter: DesiredAdapter,
                                 adapter_set: AdapterSet) -> InstalledAdapter | None:
        self.report(slot, adapter, ReplicaState.PENDING, message="Waiting for a download slot.")
        async with self._downloads:
            staging = await asyncio.to_thread(self.store.new_staging, slot.name)
            try:
                last_report = 0.0

                def on_progress(done: int, total: int) -> None:
                    nonlocal last_report
                    if time.monotonic() - last_report >= PROGRESS_INTERVAL or done == total:
                        last_report = time.monotonic()
                        self.report(slot, adapter, ReplicaState.DOWNLOADING, bytes_done=done, bytes_total=total)

                self.report(slot, adapter, ReplicaState.DOWNLOADING, bytes_done=0)
                progress = Progress(on_progress)
                budget = await self._budget()
                try:
                    fetched = await self.downloader.fetch(adapter.source, staging, progress, budget, adapter.sha256)
                except SourceError as exc:
                    self.metrics.bytes.inc(max(progress.done, 0))
                    self.fail(slot, adapter, exc.reason, exc.message, retry=exc.reason not in (
                        FailureReason.VALIDATION_FAILED, FailureReason.CHECKSUM_MISMATCH))
                    return None
                self.metrics.bytes.inc(progress.done)
                self.report(slot, adapter, ReplicaState.VALIDATING, bytes_done=progress.done,
                            bytes_total=progress.total)
                try:
                    report, converted_from = await asyncio.to_thread(
                        validate_or_convert, staging, self._policy(adapter, adapter_set))
                except Rejection as exc:
                    self.fail(slot, adapter, FailureReason.VALIDATION_FAILED, str(exc), retry=False)
                    return None
                record = InstalledAdapter(
                    served_name=slot.name, adapter=adapter.name, uid=adapter.uid, generation=adapter.generation,
                    source=adapter.source, sha256=adapter.sha256, format=report.format.value, rank=report.rank,
                    target_modules=list(report.target_modules), size_bytes=fetched.size_bytes,
                    files=await asyncio.to_thread(files_of, staging), fingerprint=fetched.fingerprint,
                    converted_from=converted_from.value if converted_from else None,
                )
                if self.layout == AdapterLayout.FOLDER_PER_NAME and slot.loaded:
                    # The folder is about to be replaced: the runtime must drop the old weights first.
                    await self.runtime.unload(slot.name)
                    slot.mark_unloaded()
                    self.wake()  # the published residency must stop naming it as served at once
                slot.installed = await asyncio.to_thread(self.store.install, staging, record)
                if fetched.fingerprint is not None:
                    self.local_fingerprints[adapter.source] = fetched.fingerprint
                return slot.installed
            finally:
                await asyncio.to_thread(self.store.discard, staging)

    async def _budget(self) -> int | None:
        if self.settings.volume_limit_bytes is None:
            return None
        return self.settings.volume_limit_bytes - await asyncio.to_thread(self.store.used_bytes)

    async def _ensure_loaded(self, slot: AdapterSlot, adapter: DesiredAdapter, record: InstalledAdapter,
                             replaced: bool = False, previous: InstalledAdapter | None = None) -> None:
        """Have the runtime serve `record`; `previous` is the generation it served until this update."""
        detected = self.detected(record)
        if not self.serves(slot, record) or replaced:
            while not await self.runtime.healthy():
                self.report(slot, adapter, ReplicaState.PENDING,
                            message="Waiting for the runtime to become healthy.", **detected)
                await asyncio.sleep(self.settings.runtime_poll_seconds)
            started = time.monotonic()
            path = self.runtime_path(record)
            try:
                await self.runtime.load(slot.name, path)
            except LoadFailed as exc:
                if previous is not None and self.layout == AdapterLayout.FOLDER_PER_GENERATION:
                    await self._roll_back(slot, record, previous)
                self.fail(slot, adapter, FailureReason.LOAD_FAILED, str(exc), retry=True, **detected)
                return
            except RuntimeUnavailable as exc:
                slot.mark_unloaded()  # the runtime may have dropped it: load again once it answers
                self.fail(slot, adapter, FailureReason.RUNTIME_UNAVAILABLE, str(exc), retry=True, **detected)
                return
            self.metrics.load_seconds.observe(time.monotonic() - started)
            slot.mark_loaded(path)
            if previous is not None and self._prefix_cache_keyed_by_name():
                logger.warning("vLLM %s keys its prefix cache by adapter name only: requests to %s may reuse "
                               "blocks computed with generation %d's weights until they are evicted",
                               self._version(), slot.name, previous.generation)
        await asyncio.to_thread(self.store.prune, slot.name, {record.folder})
        slot.clear_failure()
        self.report(slot, adapter, ReplicaState.LOADED, **detected)

    async def _roll_back(self, slot: AdapterSlot, refused: InstalledAdapter, previous: InstalledAdapter) -> None:
        """The runtime refused a new generation: serve the previous one again, whose files are still there."""
        slot.mark_unloaded()
        await asyncio.to_thread(self.store.record, previous)
        slot.installed = previous
        try:
            await self.runtime.load(slot.name, self.runtime_path(previous))
            slot.mark_loaded(self.runtime_path(previous))
        except (LoadFailed, RuntimeUnavailable) as exc:
            logger.warning("could not serve generation %d of %s again: %s", previous.generation, slot.name, exc)
        await asyncio.to_thread(self.store.discard_generation, refused)

    def _prefix_cache_keyed_by_name(self) -> bool:
        return self.settings.runtime == Runtime.VLLM and \
            vllm_release(self.settings.runtime_version).prefix_cache_key == PrefixCacheKey.NAME

    def _version(self) -> str:
        version = self.settings.runtime_version
        return format_version(version) if version is not None else "(version unknown)"

    # ---- removal -------------------------------------------------------------------------------------

    async def remove(self, slot: AdapterSlot) -> None:
        record = slot.installed
        assert record is not None
        if slot.reported_as not in (None, record.adapter):
            self.withdraw_report(slot)
        slot.state, slot.reported_as = ReplicaState.UNLOADING, record.adapter
        self.reporter.set(record.adapter, ReplicaAdapterStatus(state=ReplicaState.UNLOADING,
                                                               observed_generation=record.generation))
        while True:
            try:
                await self.runtime.unload(slot.name)
                break
            except (RuntimeUnavailable, LoadFailed) as exc:
                logger.warning("unloading %s failed (%s); retrying", slot.name, exc)
                await asyncio.sleep(self.settings.runtime_poll_seconds)
        slot.mark_unloaded()
        await asyncio.to_thread(self.store.remove, slot.name)
        slot.installed = None
        with contextlib.suppress(RuntimeUnavailable, LoadFailed):
            await self.runtime.retired(slot.name)
        slot.clear_failure()
        self.withdraw_report(slot)
        logger.info("removed adapter %s", slot.name)
