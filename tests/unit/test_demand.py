"""Demand: what vLLM's metrics say of each adapter's requests, the levels a replica reports, and the count an
adapter with spec.maxReplicas is grown or shrunk to."""

from __future__ import annotations

import pytest

from loraplex.api.types import DemandLevel, LoraAdapterSpec
from loraplex.operator.demand_scaling import holder_levels, replicas_wanted, scaled_replicas
from loraplex.sidecar.demand import DemandTracker, LoraRequests, parse_lora_requests

IDLE, SERVING, QUEUED = DemandLevel.IDLE, DemandLevel.SERVING, DemandLevel.QUEUED

# As vLLM 0.32 exposes it: every label set it ever set stays, each valued with the time it was last set, and both
# labels list every adapter with a request in flight.
METRICS = """\
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="tiny-llama"} 3.0
# HELP vllm:lora_requests_info Running stats on lora requests.
# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{max_lora="2",running_lora_adapters="",waiting_lora_adapters=""} 1.7634e+09
vllm:lora_requests_info{max_lora="2",running_lora_adapters="math,code",waiting_lora_adapters="math,code"} 1.7635e+09
vllm:lora_requests_info{max_lora="2",running_lora_adapters="math",waiting_lora_adapters="math"} 1.76345e+09
"""


def test_the_newest_lora_requests_sample_names_the_active_adapters_and_the_engine_queue_says_if_they_wait():
    current = parse_lora_requests(METRICS)
    assert current == LoraRequests(active=frozenset({"math", "code"}), waiting_requests=3.0)
    assert current.queued("math") and not current.queued("solo")
    idle_engine = parse_lora_requests(METRICS.replace("} 3.0", "} 0.0"))
    assert idle_engine is not None and not idle_engine.queued("math")


def test_before_its_first_step_vllm_names_no_adapter_and_a_runtime_without_the_metrics_says_nothing():
    assert parse_lora_requests(METRICS.split("# HELP vllm:lora")[0]) == LoraRequests(frozenset(), 3.0)
    assert parse_lora_requests(METRICS.replace("1.7634e+09", "1.8e+09")).active == frozenset()
    assert parse_lora_requests('# TYPE vllm:num_requests_waiting_by_reason gauge\n'
                               'vllm:num_requests_waiting_by_reason{reason="deferred"} 2.0\n') is None


def test_once_queued_an_adapter_stays_queued_until_it_waits_in_fewer_than_a_quarter_of_the_samples():
    tracker = DemandTracker(queue_window=10, idle_window=30)
    tracker.levels(0, ["math"])
    for second in range(0, 11):
        tracker.record(second, sample("math", waiting=1))
    assert tracker.levels(10, ["math"]) == {"math": QUEUED}
    for second in range(11, 14):  # from here on no request waits
        tracker.record(second, sample("math", waiting=0))
    assert tracker.levels(13, ["math"]) == {"math": QUEUED}  # 8 of the last 11 samples
    for second in range(14, 17):
        tracker.record(second, sample("math", waiting=0))
    assert tracker.levels(16, ["math"]) == {"math": QUEUED}  # 5 of 11: below a half, not below a quarter
    for second in range(17, 20):
        tracker.record(second, sample("math", waiting=0))
    assert tracker.levels(19, ["math"]) == {"math": SERVING}  # 2 of 11


def sample(active: str = "", waiting: float = 0) -> LoraRequests:
    return LoraRequests(frozenset(filter(None, active.split(","))), waiting)


def test_levels_come_from_a_window_of_samples_and_a_new_adapter_has_none_until_it_has_been_seen_a_window():
    tracker = DemandTracker(queue_window=10, idle_window=30)
    names = ["math", "code", "quiet"]
    assert tracker.levels(0, names) == {}
    for second in range(0, 11):
        tracker.record(second, sample("math,code" if second % 2 else "math", waiting=1))
    assert tracker.levels(10, names) == {"math": QUEUED, "code": SERVING, "quiet": SERVING}
    tracker.record(11, sample("math"))  # from here on no request waits
    for second in range(12, 31):
        tracker.record(second, sample("code"))
    # math waited in none of the last 10 s; quiet had no request for the 30 s it has been here.
    assert tracker.levels(30, names) == {"math": SERVING, "code": SERVING, "quiet": IDLE}
    assert tracker.levels(30, ["late"]) == {}  # just placed here: no level yet
    for second in range(31, 62):
        tracker.record(second, sample())
    assert tracker.levels(61, [*names, "late"]) == {"math": IDLE, "code": IDLE, "quiet": IDLE, "late": IDLE}


def test_an_adapter_that_leaves_and_comes_back_starts_afresh():
    tracker = DemandTracker(queue_window=10, idle_window=30)
    tracker.levels(0, ["math"])
    for second in range(0, 40):
        tracker.record(second, sample())
    assert tracker.levels(40, ["math"]) == {"math": IDLE}
    tracker.forget([])
    assert tracker.levels(41, ["math"]) == {}


def test_the_windows_must_make_sense():
    with pytest.raises(ValueError, match="idle window"):
        DemandTracker(queue_window=30, idle_window=10)


@pytest.mark.parametrize(("current", "holders", "levels", "expected"), [
    (1, 1, [QUEUED], 2),
    (2, 2, [QUEUED, QUEUED], 3),
    (3, 3, [QUEUED, QUEUED, QUEUED], 3),  # at maxReplicas
    (2, 2, [QUEUED, SERVING], 2),  # one replica keeps up: no growth
    (2, 2, [QUEUED, None], 2),  # a holder has not loaded it or has no level yet: wait for it
    (2, 1, [QUEUED], 2),  # the last step is not placed yet: no second step on an older placement
    (3, 2, [QUEUED, QUEUED], 3),  # placement found room for 2 of 3: no growth past what it holds
    (2, 2, [IDLE, IDLE], 1),
    (3, 2, [IDLE, IDLE], 1),  # shrinks from what it holds, not from a count placement never reached
    (1, 1, [IDLE], 1),  # at spec.replicas
    (2, 2, [IDLE, SERVING], 2),
    (2, 2, [], 2),
    (5, 1, [QUEUED], 3),  # a count from before the range changed is brought back into it
])
def test_the_count_steps_by_one_only_when_every_holder_agrees(current, holders, levels, expected):
    assert scaled_replicas(current, holders, least=1, most=3, levels=levels) == expected


def test_only_loaded_entries_levels_count_and_pods_still_to_start_say_nothing():
    entries = {"pod-a": {"state": "Loaded", "demand": "Queued"}, "pod-b": {"state": "Loading", "demand": "Queued"},
               "pod-c": {"state": "Loaded"}, "pod-d": {"state": "Loaded", "demand": "Overwhelmed"}}
    assert holder_levels(["pod-a", "pod-b", "pod-c", "pod-d", "pod-e"], 1, entries) == [
        QUEUED, None, None, None, None, None]


def test_the_replicas_placement_asks_for():
    def spec(**fields):
        return LoraAdapterSpec.model_validate({"baseModel": "m", "source": "s3://b/a", **fields})

    assert replicas_wanted(spec(), 3) is None
    assert replicas_wanted(spec(replicas=2), 3) == 2
    assert replicas_wanted(spec(replicas=1, maxReplicas=4), None) == 1
    assert replicas_wanted(spec(replicas=1, maxReplicas=4), 3) == 3
    assert replicas_wanted(spec(replicas=2, maxReplicas=4), 9) == 4
    with pytest.raises(ValueError, match=r"spec\.maxReplicas needs spec\.replicas"):
        spec(maxReplicas=4)
    with pytest.raises(ValueError, match="must be at least it"):
        spec(replicas=3, maxReplicas=2)
