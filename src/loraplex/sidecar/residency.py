"""Which adapters this replica serves now and which are on their way, published for the endpoint picker's
lora-affinity scorer as the model-server protocol's LoRA gauge (docs/routing/residency.md).

Unlike vLLM's own `vllm:lora_requests_info`, it lists adapters that are loaded but idle, and each name once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Gauge

from loraplex.api.contract import RESIDENCY_METRIC
from loraplex.api.types import ReplicaState
from loraplex.sidecar.slots import AdapterSlot

# Fixed by the protocol: the picker reads these label names and no others.
MAX_LORA, RUNNING, WAITING = "max_lora", "running_lora_adapters", "waiting_lora_adapters"


@dataclasses.dataclass(frozen=True)
class Residency:
    running: tuple[str, ...] = ()  # served names the runtime serves now, sorted
    waiting: tuple[str, ...] = ()  # served names placed here and on their way, sorted

    @property
    def max_lora(self) -> int:
        # A replica only ever loads the adapters placed on it, so it has room for no other: were max_lora larger,
        # the scorer's "room" tier (0.8) would send a request for any adapter here, ahead of replicas still
        # loading it (0.6). At this value holders score 1.0, replicas loading it 0.6 and every other one 0.
        return len(self.running) + len(self.waiting)

    def labels(self) -> dict[str, str]:
        return {MAX_LORA: str(self.max_lora), RUNNING: ",".join(self.running), WAITING: ",".join(self.waiting)}


def residency_of(slots: Iterable[AdapterSlot]) -> Residency:
    """Running: placed here and loaded, idle or not (an update on its way still serves the old generation).
    Waiting: placed here, not loaded, and neither refused nor waiting out a retry delay. An adapter no longer
    placed here is in neither, even while it unloads: no request for it should come here any more."""
    running, waiting = [], []
    for slot in slots:
        if slot.desired is None:
            continue
        if slot.loaded:
            running.append(slot.name)
        elif slot.worker is not None or slot.state != ReplicaState.FAILED:
            waiting.append(slot.name)
    return Residency(tuple(sorted(running)), tuple(sorted(waiting)))


class ResidencyGauge:
    """The gauge with exactly one series, the current label set, valued with the unix time it last changed:
    the picker takes the series with the largest value, so an old label set left behind would be harmless to
    it but misleading to a person reading /metrics."""

    def __init__(self, registry: CollectorRegistry):
        self.gauge = Gauge(RESIDENCY_METRIC, "Adapters this replica serves (running) and is loading (waiting), in "
                           "the model-server protocol's LoRA format; the value is the unix time of the last change",
                           [MAX_LORA, RUNNING, WAITING], registry=registry)
        self.published: Residency | None = None

    def publish(self, residency: Residency, now: float) -> None:
        if residency == self.published:
            return
        if self.published is not None:
            self.gauge.remove(*self.published.labels().values())
        self.gauge.labels(**residency.labels()).set(now)
        self.published = residency
