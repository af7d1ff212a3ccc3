"""What the sidecar knows about one served name on this replica, in one record: the entry it is told to serve,
the files on the volume, what the runtime serves, the state it last reported, the work under way and the
last failure with its retry time."""

from __future__ import annotations

import asyncio
import dataclasses

from loraplex.api.adapter_set import DesiredAdapter
from loraplex.api.types import FailureReason, ReplicaState
from loraplex.sidecar.store import InstalledAdapter

RETRY_DELAYS = (5.0, 15.0, 30.0, 60.0, 120.0, 300.0)
FINAL_FAILURES = frozenset({FailureReason.VALIDATION_FAILED, FailureReason.CHECKSUM_MISMATCH})


@dataclasses.dataclass(frozen=True)
class Sync:
    """Bring the name to one desired entry; a different entry is different work."""
    uid: str
    generation: int
    source: str
    sha256: str | None

    @classmethod
    def of(cls, adapter: DesiredAdapter) -> Sync:
        return cls(adapter.uid, adapter.generation, adapter.source, adapter.sha256)


@dataclasses.dataclass(frozen=True)
class Remove:
    """Unload the name and delete its files."""


@dataclasses.dataclass
class Worker:
    target: Sync | Remove
    task: asyncio.Task[None]


@dataclasses.dataclass(frozen=True)
class Failure:
    uid: str
    generation: int
    reason: FailureReason
    attempts: int  # failures of this generation in a row, less one

    def of(self, adapter: DesiredAdapter) -> bool:
        return (self.uid, self.generation) == (adapter.uid, adapter.generation)

    @property
    def final(self) -> bool:
        """Retrying cannot help: the same files would be refused again."""
        return self.reason in FINAL_FAILURES

    @property
    def retry_delay(self) -> float:
        return RETRY_DELAYS[min(self.attempts, len(RETRY_DELAYS) - 1)]


@dataclasses.dataclass
class AdapterSlot:
    name: str  # the served name
    desired: DesiredAdapter | None = None
    installed: InstalledAdapter | None = None
    loaded: bool = False
    served_path: str | None = None  # where the runtime reads it from, when it says
    state: ReplicaState | None = None  # the state last reported
    reported_as: str | None = None  # the LoraAdapter whose status holds this replica's entry
    worker: Worker | None = None
    failure: Failure | None = None
    retry_at: float = 0.0  # loop time before which a failed sync is not started again

    def mark_loaded(self, path: str | None) -> None:
        self.loaded, self.served_path = True, path

    def mark_unloaded(self) -> None:
        self.loaded, self.served_path = False, None

    def record_failure(self, adapter: DesiredAdapter, reason: FailureReason) -> Failure:
        attempts = self.failure.attempts + 1 if self.failure is not None and self.failure.of(adapter) else 0
        self.failure = Failure(adapter.uid, adapter.generation, reason, attempts)
        return self.failure

    def clear_failure(self) -> None:
        self.failure, self.retry_at = None, 0.0

    @property
    def vacant(self) -> bool:
        """Nothing wanted, held or under way: the record can go."""
        return self.desired is None and self.installed is None and not self.loaded and self.worker is None \
            and self.reported_as is None
