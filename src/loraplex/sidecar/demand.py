"""How much demand each adapter meets on this replica, from the runtime's own metrics.

vLLM publishes `vllm:lora_requests_info`, a gauge whose labels name adapters with requests in flight and whose
value is the time it was last set (vllm/v1/metrics/loggers.py at 0.32). Every label set ever seen stays
exported, so the current one is the sample with the largest value. Its two labels, `running_lora_adapters`
and `waiting_lora_adapters`, are meant to tell running from waiting, but up to 0.32 at least both list every
adapter with any request in flight (stats.py's LoRARequestStates puts each adapter in both, with a count that
may be 0). So loraplex reads from it only which adapters are active, and from `vllm:num_requests_waiting`
whether the engine has requests queued: an adapter is queued in a sample when it is active while requests
wait. Neither counts requests per adapter, so demand is read by sampling: an adapter queued in most samples
needs more replicas, one with no request for a long while needs fewer.

The levels change only when a window's verdict does, so the reports they cause follow changes in demand.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable

from prometheus_client.parser import text_string_to_metric_families

from loraplex.api.types import DemandLevel

LORA_REQUESTS_INFO = "vllm:lora_requests_info"
REQUESTS_WAITING = "vllm:num_requests_waiting"
QUEUED_SHARE = 0.5  # of the samples in the queue window, for Queued


@dataclasses.dataclass(frozen=True)
class LoraRequests:
    """One sample: the adapters with requests in flight, and how many requests the engine has waiting."""

    active: frozenset[str]
    waiting_requests: float = 0.0

    def queued(self, adapter: str) -> bool:
        return adapter in self.active and self.waiting_requests > 0


def parse_lora_requests(metrics_text: str) -> LoraRequests | None:
    """The current sample in a Prometheus exposition of vLLM's metrics, None when it has no LoRA metric."""
    newest: tuple[float, dict[str, str]] | None = None
    waiting = 0.0
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == LORA_REQUESTS_INFO and (newest is None or sample.value > newest[0]):
                newest = (sample.value, sample.labels)
            elif sample.name == REQUESTS_WAITING:
                waiting += sample.value  # one series per engine
    if newest is None:
        return None
    labels = newest[1]
    return LoraRequests(active=_names(labels.get("running_lora_adapters", ""))
                        | _names(labels.get("waiting_lora_adapters", "")), waiting_requests=waiting)


def _names(joined: str) -> frozenset[str]:
    return frozenset(name for name in joined.split(",") if name)


class DemandTracker:
    """Samples over time, and each adapter's level from them.

    Queued: the adapter was queued (LoraRequests.queued) in at least half the samples of the last `queue_window`
    seconds. Idle: no request of it was in flight in the last `idle_window` seconds, all of them spent here. Serving
    otherwise. An adapter has no level until it has been here a queue window, so neither a restarted sidecar
    nor a newly placed adapter claims what it has not seen.
    """

    def __init__(self, queue_window: float = 30.0, idle_window: float = 300.0):
        if queue_window <= 0 or idle_window < queue_window:
            raise ValueError("the idle window must be at least the queue window, and both positive")
        self.queue_window, self.idle_window = queue_window, idle_window
        self._samples: collections.deque[tuple[float, LoraRequests]] = collections.deque()
        self._last_busy: dict[str, float] = {}
        self._since: dict[str, float] = {}  # adapter -> when levels were first asked of it

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
            if waited >= QUEUED_SHARE * len(recent):
                levels[name] = DemandLevel.QUEUED
            elif quiet >= self.idle_window:
                levels[name] = DemandLevel.IDLE
            else:
                levels[name] = DemandLevel.SERVING
        return levels

    def forget(self, keep: Iterable[str]) -> None:
        """Drop what is known of adapters no longer here, so one that comes back starts afresh."""
        kept = set(keep)
        self._last_busy = {name: when for name, when in self._last_busy.items() if name in kept}
        self._since = {name: when for name, when in self._since.items() if name in kept}
