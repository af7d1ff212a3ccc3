"""Each adapter's demand on this replica (Idle, Serving, Queued), sampled from vLLM's metrics.

Up to vLLM 0.32 at least, both labels of `vllm:lora_requests_info` list every adapter with a request in flight
(docs/vllm-lora-contract.md §8), so it says only which adapters are active; whether requests queue comes from
`vllm:num_requests_waiting`, which is engine-wide: vLLM does not say whose requests wait.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable

from prometheus_client.parser import text_string_to_metric_families

from loraplex.api.types import DemandLevel

LORA_REQUESTS_INFO = "vllm:lora_requests_info"
REQUESTS_WAITING = "vllm:num_requests_waiting"
QUEUED_SHARE = 0.5  # of the samples in the queue window, to become Queued
STILL_QUEUED_SHARE = 0.25  # and to stay Queued, so a share near the first does not flip the level every sample


@dataclasses.dataclass(frozen=True)
class LoraRequests:
    """One sample: the adapters with requests in flight, and how many requests the engine has waiting."""

    active: frozenset[str]
    waiting_requests: float = 0.0

    def queued(self, adapter: str) -> bool:
        return adapter in self.active and self.waiting_requests > 0


def parse_lora_requests(metrics_text: str) -> LoraRequests | None:
    """The current sample in a Prometheus exposition of vLLM's metrics; None when it has neither metric.

    vLLM keeps every label set of `vllm:lora_requests_info` it ever set, valued with the time it set it, so the
    current one is the largest value; before its first engine step there is none, which names no adapter."""
    prefixes = tuple(f"{lead}{name}{end}" for lead in ("", "# TYPE ") for name in (LORA_REQUESTS_INFO, REQUESTS_WAITING)
                     for end in ("{", " "))
    wanted = [line for line in metrics_text.splitlines() if line.startswith(prefixes)]  # the rest is large
    newest: tuple[float, dict[str, str]] | None = None
    waiting: float | None = None
    for family in text_string_to_metric_families("\n".join(wanted) + "\n"):
        for sample in family.samples:
            if sample.name == LORA_REQUESTS_INFO and (newest is None or sample.value > newest[0]):
                newest = (sample.value, sample.labels)
            elif sample.name == REQUESTS_WAITING:
                waiting = (waiting or 0.0) + sample.value  # one series per engine
    if newest is None and waiting is None:
        return None
    labels = newest[1] if newest else {}
    return LoraRequests(active=_names(labels.get("running_lora_adapters", ""))
                        | _names(labels.get("waiting_lora_adapters", "")), waiting_requests=waiting or 0.0)


def _names(joined: str) -> frozenset[str]:
    return frozenset(name for name in joined.split(",") if name)


class DemandTracker:
    """Samples over time, and each adapter's level from them.

    Queued: the adapter was queued (LoraRequests.queued) in at least half the samples of the last `queue_window`
    seconds (a quarter, once Queued). Idle: no request of it was in flight in the last `idle_window` seconds,
    all of them spent here. Serving otherwise. An adapter has no level until it has been here a queue window, so
    neither a restarted sidecar nor a newly placed adapter claims what it has not seen.
    """

    def __init__(self, queue_window: float = 30.0, idle_window: float = 300.0):
        if queue_window <= 0 or idle_window < queue_window:
            raise ValueError("the idle window must be at least the queue window, and both positive")
        self.queue_window, self.idle_window = queue_window, idle_window
        self._samples: collections.deque[tuple[float, LoraRequests]] = collections.deque()
        self._last_busy: dict[str, float] = {}
        self._since: dict[str, float] = {}  # adapter -> when levels were first asked of it
        self._queued: set[str] = set()  # adapters whose last level was Queued

    def record(self, now: float, sample: LoraRequests) -> None:
        self._samples.append((now, sample))
        while self._samples and self._samples[0][0] < now - self.queue_window:
            self._samples.popleft()
        for name in sample.active:
            self._last_busy[name] = now

    def levels(self, now: float, adapters: Iterable[str]) -> dict[str, DemandLevel]:
        """The level of each of `adapters` (served names, those here now) that has been here a queue window."""
        recent = [sample for when, sample in self._samples if when >= now - self.queue_window]
        levels = {}
        for name in adapters:
            here = now - self._since.setdefault(name, now)
            if here < self.queue_window or not recent:
                continue
            waited = sum(sample.queued(name) for sample in recent)
            quiet = now - max(self._last_busy.get(name, float("-inf")), self._since[name])
            share = STILL_QUEUED_SHARE if name in self._queued else QUEUED_SHARE
            if waited >= share * len(recent):
                levels[name] = DemandLevel.QUEUED
            elif quiet >= self.idle_window:
                levels[name] = DemandLevel.IDLE
            else:
                levels[name] = DemandLevel.SERVING
        self._queued = {name for name, level in levels.items() if level == DemandLevel.QUEUED}
        return levels

    def forget(self, keep: Iterable[str]) -> None:
        """Drop what is known of adapters no longer here, so one that comes back starts afresh."""
        kept = set(keep)
        self._last_busy = {name: when for name, when in self._last_busy.items() if name in kept}
        self._since = {name: when for name, when in self._since.items() if name in kept}
        self._queued &= kept
