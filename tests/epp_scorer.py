"""What the endpoint picker (EPP) makes of a pod's LoRA metric, reimplemented in Python so that tests can score
a real /metrics scrape the way the picker would. The picker is Go and cannot be built here
(docs/routing/upstream.md, e).

Source: llm-d/llm-d-router@ebab687927f5331c1b39defcb579a07951bce56c, the HEAD of the mirror read for this file:
- which series is used: pkg/epp/framework/plugins/datalayer/extractor/metrics/loraspec.go:57-77 (of the
  family's series whose labels match the spec's filter, the first with the largest value, a timestamp; none
  found leaves the pod's LoRA fields as they were), with `labelsMatch` in spec.go:132-146;
- the spec's syntax: spec.go:31-83 (`name` or `name{label=value,...}`, quotes around values optional);
- the labels: extractor.go:46-49 (fixed names), 247-268 and 297-304 (each list split on commas, names trimmed,
  empty names dropped; `max_lora` read as an int, an empty one leaves the previous value);
- the scorer: pkg/epp/framework/plugins/scheduling/scorer/loraaffinity/lora_affinity.go:83-109.

That HEAD is the snapshot docs/routing/upstream.md cites, and it matches that page's section c. It does not yet
have LDR #2625 (merged after it), which makes the room test count the distinct names of active and waiting
together; `distinct_room=True` scores that way. The two agree whenever no name is in both lists, as in the
sidecar's metric; they differ on vLLM's own, which puts every name in both.
"""

from __future__ import annotations

import dataclasses
import re

from prometheus_client.parser import text_string_to_metric_families

_SPEC = re.compile(r"^\s*(\S+?)\s*(?:\{([^}]*)\})?\s*$")
_PAIR = re.compile(r'^\s*(\w+)\s*=\s*"?([^"]*?)"?\s*$')


@dataclasses.dataclass(frozen=True)
class LoraMetrics:
    """A pod's ActiveModels, WaitingModels and MaxActiveModels, as the extractor fills them in."""

    active: frozenset[str] = frozenset()
    waiting: frozenset[str] = frozenset()
    max_active: int = 0


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """The metric name and label filter of a spec such as `vllm:lora_requests_info{engine=a}`."""
    match = _SPEC.match(spec)
    if match is None or not spec.strip():
        raise ValueError(f"not a valid metric specification: {spec!r}")
    labels: dict[str, str] = {}
    for pair in filter(str.strip, (match.group(2) or "").split(",")):
        found = _PAIR.match(pair)
        if found is None:
            raise ValueError(f"invalid label pair {pair!r} in specification: {spec!r}")
        labels[found.group(1)] = found.group(2)
    return match.group(1), labels


def latest_series(exposition: str, spec: str) -> dict[str, str] | None:
    """The labels of the series the picker uses: of those matching the spec, the first with the largest value;
    None when the family is missing or no series matches."""
    name, wanted = parse_spec(spec)
    latest: dict[str, str] | None = None
    recent = -1.0
    for family in text_string_to_metric_families(exposition):
        if family.name != name:
            continue
        for sample in family.samples:
            if all(sample.labels.get(label) == value for label, value in wanted.items()) and sample.value > recent:
                recent, latest = sample.value, sample.labels
    return latest


def adapters(joined: str) -> frozenset[str]:
    return frozenset(name.strip() for name in joined.split(",") if name.strip())


def lora_metrics(exposition: str, spec: str, previous: LoraMetrics = LoraMetrics()) -> LoraMetrics:
    """The pod's LoRA fields after the picker reads one scrape of its metrics."""
    labels = latest_series(exposition, spec)
    if labels is None:
        return previous
    max_lora = labels.get("max_lora", "")
    return LoraMetrics(active=adapters(labels.get("running_lora_adapters", "")),
                       waiting=adapters(labels.get("waiting_lora_adapters", "")),
                       max_active=int(max_lora) if max_lora else previous.max_active)


def lora_affinity_score(pod: LoraMetrics, model: str, distinct_room: bool = False) -> float:
    """1.0 when the requested (rewritten) model is active on the pod; else 0.8 when the pod has room for one more;
    else 0.6 when the model is waiting there; else 0."""
    if model in pod.active:
        return 1.0
    resident = len(pod.active | pod.waiting) if distinct_room else len(pod.active) + len(pod.waiting)
    if resident < pod.max_active:
        return 0.8
    if model in pod.waiting:
        return 0.6
    return 0.0
