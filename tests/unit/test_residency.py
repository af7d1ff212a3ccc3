"""The residency gauge the sidecar publishes for the endpoint picker: which adapter states land in which label,
one series valued with the time of its last change, and what the picker's lora-affinity scorer makes of it
(tests/epp_scorer.py reimplements the picker's side)."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from loraplex.api.adapter_set import AdapterLimits, AdapterSet, DesiredAdapter
from loraplex.api.contract import RESIDENCY_METRIC
from loraplex.api.types import AdapterFormat, ReplicaState, Runtime
from loraplex.sidecar.residency import Residency, ResidencyGauge, residency_of
from loraplex.sidecar.slots import AdapterSlot, Remove, Sync, Worker
from tests.epp_scorer import LoraMetrics, latest_series, lora_affinity_score, lora_metrics, parse_spec
from tests.unit.test_agent import Replica, make_adapter_store, until

SPEC = RESIDENCY_METRIC


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter_store(tmp_path_factory.mktemp("store"))


def desired(name: str) -> DesiredAdapter:
    return DesiredAdapter(name=name, uid=f"uid-{name}", generation=1, served_name=name, source=f"s3://b/{name}")


def slot(name: str, placed: bool = True, loaded: bool = False, state: ReplicaState | None = None,
         worker: str | None = None) -> AdapterSlot:
    record = AdapterSlot(name, desired=desired(name) if placed else None, loaded=loaded, state=state)
    if worker is not None:  # what the worker does is all residency_of looks at; no task runs
        record.worker = Worker(Sync.of(desired(name)) if worker == "sync" else Remove(), task=None)  # type: ignore[arg-type]
    return record


@pytest.mark.parametrize(("record", "label"), [
    (slot("a", loaded=True, state=ReplicaState.LOADED), "running"),  # idle or not: the sidecar cannot tell
    (slot("a", loaded=True, state=ReplicaState.DOWNLOADING, worker="sync"), "running"),  # update: old one served
    (slot("a", loaded=True, state=ReplicaState.FAILED), "running"),  # new generation refused, old one served
    (slot("a", state=ReplicaState.PENDING, worker="sync"), "waiting"),
    (slot("a", state=ReplicaState.DOWNLOADING, worker="sync"), "waiting"),
    (slot("a", state=ReplicaState.VALIDATING, worker="sync"), "waiting"),
    (slot("a", state=None, worker="sync"), "waiting"),  # spawned, not yet reported
    (slot("a", state=ReplicaState.LOADED), "waiting"),  # the runtime lost it; a reload is about to start
    (slot("a", state=ReplicaState.FAILED, worker="sync"), "waiting"),  # a retry under way
    (slot("a", state=ReplicaState.FAILED), None),  # refused, or waiting out its retry delay
    (slot("a", placed=False, loaded=True, state=ReplicaState.UNLOADING, worker="remove"), None),
    (slot("a", placed=False, loaded=True, state=ReplicaState.LOADED), None),  # moved away, removal next
])
def test_each_adapter_state_lands_in_one_label_or_none(record, label):
    residency = residency_of([record])
    assert residency == Residency(running=("a",) if label == "running" else (),
                                  waiting=("a",) if label == "waiting" else ())


def test_the_labels_are_sorted_and_max_lora_counts_both_lists():
    residency = residency_of([slot("zeta", loaded=True), slot("alpha", loaded=True),
                              slot("mid", worker="sync"), slot("gone", state=ReplicaState.FAILED)])
    assert residency.labels() == {"max_lora": "3", "running_lora_adapters": "alpha,zeta",
                                  "waiting_lora_adapters": "mid"}
    assert Residency().labels() == {"max_lora": "0", "running_lora_adapters": "", "waiting_lora_adapters": ""}


def series(registry: CollectorRegistry) -> list[tuple[dict[str, str], float]]:
    """Every series of the residency gauge on a scrape of `registry`."""
    families = text_string_to_metric_families(generate_latest(registry).decode())
    return [(sample.labels, sample.value) for family in families if family.name == RESIDENCY_METRIC
            for sample in family.samples]


def test_one_series_at_a_time_valued_with_the_time_of_the_last_change():
    registry = CollectorRegistry()
    gauge = ResidencyGauge(registry)
    assert series(registry) == []  # nothing published yet: the picker leaves the pod's fields alone
    first = Residency(running=("a",), waiting=("b",))
    gauge.publish(first, now=1000.0)
    assert series(registry) == [(first.labels(), 1000.0)]
    gauge.publish(Residency(running=("a",), waiting=("b",)), now=2000.0)  # the same state again
    assert series(registry) == [(first.labels(), 1000.0)]
    second = Residency(running=("a", "b"))
    gauge.publish(second, now=3000.0)
    assert series(registry) == [(second.labels(), 3000.0)]
    gauge.publish(first, now=4000.0)  # back to an earlier state: a change all the same
    assert series(registry) == [(first.labels(), 4000.0)]


def scraped(residency: Residency) -> LoraMetrics:
    registry = CollectorRegistry()
    ResidencyGauge(registry).publish(residency, now=1.0)
    return lora_metrics(generate_latest(registry).decode(), SPEC)


def test_the_scorer_prefers_holders_then_replicas_loading_it_and_never_a_replica_it_is_not_placed_on():
    holder = scraped(Residency(running=("math", "code")))
    loading = scraped(Residency(running=("code",), waiting=("math",)))
    elsewhere = scraped(Residency(running=("code", "chat")))
    empty = scraped(Residency())
    assert [lora_affinity_score(pod, "math") for pod in (holder, loading, elsewhere, empty)] == [1.0, 0.6, 0.0, 0.0]
    for pod in (holder, loading, elsewhere, empty):  # each name once: the fix in LDR #2625 changes nothing
        assert lora_affinity_score(pod, "math", distinct_room=True) == lora_affinity_score(pod, "math")


def test_the_worked_example_of_docs_routing_residency():
    """Three replicas; math placed on r0 and, still downloading, on r1; vLLM with --max-loras 4 and code busy
    on r1."""
    sidecar = [scraped(Residency(running=("code", "math"))), scraped(Residency(running=("code",), waiting=("math",))),
               scraped(Residency(running=("chat",)))]
    vllm = [LoraMetrics(max_active=4), LoraMetrics(frozenset({"code"}), frozenset({"code"}), 4),
            LoraMetrics(max_active=4)]
    table = {model: ([lora_affinity_score(pod, model) for pod in sidecar],
                     [lora_affinity_score(pod, model) for pod in vllm])
             for model in ("math", "chat", "code", "meta/llama3")}
    assert table == {"math": ([1.0, 0.6, 0.0], [0.8, 0.8, 0.8]), "chat": ([0.0, 0.0, 1.0], [0.8, 0.8, 0.8]),
                     "code": ([1.0, 1.0, 0.0], [0.8, 1.0, 0.8]), "meta/llama3": ([0.0, 0.0, 0.0], [0.8, 0.8, 0.8])}


# ---- the picker's side, tests/epp_scorer.py ------------------------------------------------------------------

VLLM_LIKE = """\
# HELP vllm:lora_requests_info Running stats on lora requests.
# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{max_lora="4",running_lora_adapters="a,b",waiting_lora_adapters="a,b"} 1.7e+09
vllm:lora_requests_info{max_lora="4",running_lora_adapters=" c , ,d",waiting_lora_adapters=""} 1.9e+09
vllm:lora_requests_info{max_lora="4",running_lora_adapters="",waiting_lora_adapters=""} 1.8e+09
"""


def test_the_series_with_the_largest_value_wins_and_names_are_trimmed_and_empties_dropped():
    assert lora_metrics(VLLM_LIKE, "vllm:lora_requests_info") == LoraMetrics(frozenset({"c", "d"}), frozenset(), 4)


def test_the_label_filter_narrows_the_series_and_nothing_matching_leaves_the_pod_as_it_was():
    assert latest_series(VLLM_LIKE, 'vllm:lora_requests_info{running_lora_adapters=""}')["max_lora"] == "4"
    assert lora_metrics(VLLM_LIKE, "vllm:lora_requests_info{running_lora_adapters=a}") == LoraMetrics()
    before = LoraMetrics(frozenset({"x"}), frozenset(), 2)
    assert lora_metrics(VLLM_LIKE, "other_metric", previous=before) == before
    assert parse_spec('m{a=1, b="two"}') == ("m", {"a": "1", "b": "two"})
    with pytest.raises(ValueError, match="invalid label pair"):
        parse_spec('m{running_lora_adapters="a,b"}')  # the picker splits the filter on every comma too


def test_vllm_puts_each_busy_adapter_in_both_labels_so_its_pod_looks_full_and_waiting_never_scores():
    busy = lora_metrics("\n".join(VLLM_LIKE.splitlines()[:3]) + "\n", "vllm:lora_requests_info")
    assert busy == LoraMetrics(frozenset({"a", "b"}), frozenset({"a", "b"}), 4)
    assert lora_affinity_score(busy, "c") == 0.0  # 2 + 2 names counted against 4 slots
    assert lora_affinity_score(busy, "c", distinct_room=True) == 0.8  # LDR #2625 counts 2
    assert lora_affinity_score(LoraMetrics(frozenset(), frozenset({"w"}), 1), "w") == 0.6


# ---- the agent publishes it ------------------------------------------------------------------------------


def published(replica: Replica) -> LoraMetrics:
    return lora_metrics(generate_latest(replica.agent.metrics.registry).decode(), SPEC)


async def test_the_agent_publishes_loaded_adapters_and_those_waiting_for_the_runtime(tmp_path, adapters):
    async with Replica(tmp_path, adapters) as replica:
        replica.want(math="math", wide="wide")  # wide's rank is over the limit: refused
        await until(lambda: replica.reporter.state("math") == "Loaded" and replica.reporter.state("wide") == "Failed",
                    "math Loaded, wide Failed")
        await until(lambda: published(replica) == LoraMetrics(frozenset({"math"}), frozenset(), 1), "math running")
        replica.runtime.up = False  # it restarts: math is reloaded once it answers again
        replica.runtime.restart()
        await until(lambda: published(replica) == LoraMetrics(frozenset(), frozenset({"math"}), 1), "math waiting")
        assert lora_affinity_score(published(replica), "math") == 0.6
        replica.runtime.up = True
        await until(lambda: published(replica) == LoraMetrics(frozenset({"math"}), frozenset(), 1),
                    "math running again")
        assert len(series(replica.agent.metrics.registry)) == 1


async def test_an_adapter_placed_on_another_pod_is_in_neither_label(tmp_path, adapters):
    def placed(math_slots: list[int]) -> AdapterSet:
        entries = [DesiredAdapter(name=name, uid=f"uid-{name}", generation=1, served_name=name,
                                  source=f"file://{adapters / folder}", slots=slots)
                   for name, folder, slots in (("math", "math", math_slots), ("code", "math-v2", [0]))]
        return AdapterSet(base_model="base", runtime=Runtime.VLLM, adapters=entries,
                          limits=AdapterLimits(max_rank=16, allowed_formats=[AdapterFormat.HF]),
                          replica_slots={"pod-0": 0, "pod-1": 1})

    async with Replica(tmp_path, adapters) as replica:
        replica.agent.on_adapter_set(placed(math_slots=[0]))
        await until(lambda: published(replica).active == {"math", "code"}, "both running")
        replica.agent.on_adapter_set(placed(math_slots=[1]))  # math moves to pod-1
        await until(lambda: published(replica) == LoraMetrics(frozenset({"code"}), frozenset(), 1), "code only")
        assert lora_affinity_score(published(replica), "math") == 0.0
