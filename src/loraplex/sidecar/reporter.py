"""Per-replica status: each pod writes only its own key of status.replicaStatus, by JSON merge patch,
so replicas never conflict with each other or with the operator.

Progress (Downloading, Validating...) is paced: one write per adapter every `min_interval` at most, the
latest state winning. An outcome someone waits for (Loaded, Failed, or the entry's removal) goes out at
once, so pacing never adds to the time until an adapter is Ready.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from loraplex.api.conditions import utc_now
from loraplex.api.types import API_VERSION, LORA_ADAPTER, ReplicaAdapterStatus, ReplicaState
from loraplex.kube import ApiError, KubeClient, NotFound, resource_path

logger = logging.getLogger(__name__)
OUTCOMES = frozenset({ReplicaState.LOADED, ReplicaState.FAILED})


class StatusReporter:
    def __init__(self, client: KubeClient, namespace: str, pod_name: str, min_interval: float = 0.25):
        self.client, self.namespace, self.pod_name = client, namespace, pod_name
        self.min_interval = min_interval
        self._latest: dict[str, ReplicaAdapterStatus | None] = {}  # adapter -> entry we want (None: remove ours)
        self._dirty: set[str] = set()
        self._last_write: dict[str, float] = {}  # adapter -> loop time of its last write
        self._wake = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None  # wakes the loop when paced progress is due

    def set(self, adapter: str, entry: ReplicaAdapterStatus | None) -> None:
        if entry is not None:
            previous = self._latest.get(adapter)
            if previous is not None and _unstamped(previous) == _unstamped(entry):
                return
            entry = entry.model_copy(update={"updated": utc_now()})
        self._latest[adapter] = entry
        self._dirty.add(adapter)
        self._wake.set()

    def entries(self) -> dict[str, ReplicaAdapterStatus | None]:
        return dict(self._latest)

    def reassert(self) -> None:
        """Write every entry again (no-op writes cost nothing); repairs an entry pruned by mistake."""
        self._dirty.update(name for name, entry in self._latest.items() if entry is not None)
        self._wake.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            now = loop.time()
            due = {name for name in self._dirty if self._urgent(name)
                   or now - self._last_write.get(name, float("-inf")) >= self.min_interval}
            self._dirty -= due
            for name in due:
                self._last_write[name] = now
            await asyncio.gather(*(self._write(name) for name in sorted(due)))
            if self._dirty:  # paced progress: come back when the first of them is due
                first_due = min(self._last_write.get(name, now) for name in self._dirty) + self.min_interval
                if self._timer is None or self._timer.when() > first_due:
                    if self._timer is not None:
                        self._timer.cancel()
                    self._timer = loop.call_at(first_due, self._paced_progress_due)

    def _paced_progress_due(self) -> None:
        self._timer = None
        self._wake.set()

    def _urgent(self, adapter: str) -> bool:
        entry = self._latest.get(adapter)
        return entry is None or entry.state in OUTCOMES

    async def flush(self) -> None:
        batch, self._dirty = self._dirty, set()
        await asyncio.gather(*(self._write(name) for name in sorted(batch)))

    async def _write(self, adapter: str) -> None:
        entry = self._latest.get(adapter)
        path = resource_path(API_VERSION, LORA_ADAPTER.plural, self.namespace, adapter, "status")
        try:
            wire = None if entry is None else entry.to_wire()
            await self.client.merge_patch(path, {"status": {"replicaStatus": {self.pod_name: wire}}})
        except NotFound:
            if entry is None:
                self._latest.pop(adapter, None)
                self._last_write.pop(adapter, None)
        except (ApiError, OSError, TimeoutError) as exc:
            logger.warning("could not report %s on LoraAdapter %s (%s); will retry", entry and entry.state.value,
                           adapter, exc)
            self._dirty.add(adapter)
            self._wake.set()
            await asyncio.sleep(1.0)
        else:
            if entry is None:
                self._latest.pop(adapter, None)
                self._last_write.pop(adapter, None)


def _unstamped(entry: ReplicaAdapterStatus) -> dict[str, Any]:
    """What an entry says, without when it was written."""
    wire = entry.to_wire()
    wire.pop("updated", None)
    return wire
