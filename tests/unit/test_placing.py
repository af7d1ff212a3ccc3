"""Placement in the cluster's terms: pods to stable slots, specs to demands, the plan to the adapter set."""

from __future__ import annotations

import pytest

from loraplex.api.adapter_set import AdapterLimits, AdapterSet, DesiredAdapter
from loraplex.api.types import BaseModelDeploymentSpec, Runtime
from loraplex.operator.placement import Capacity
from loraplex.operator.placing import largest_size, plan_placement, replica_capacity, slots_for_pods
from loraplex.operator.render import spec_problems


def base(**lora):
    return BaseModelDeploymentSpec.model_validate(
        {"model": "meta/llama3", "runtime": "vllm", "image": "vllm/vllm-openai:v0.11.0", "lora": lora})


def desired(name):
    return DesiredAdapter(name=name, uid=f"uid-{name}", generation=1, served_name=name, source=f"s3://b/{name}")


ADAPTERS = [desired(f"a{i:02}") for i in range(30)]


@pytest.mark.parametrize(("spec", "capacity"), [
    (base(), Capacity(bytes=20 * 1024**3)),  # the default PEFT emptyDir
    (base(adaptersPerReplica=4, bytesPerReplica="1Gi"), Capacity(adapters=4, bytes=1024**3)),
    (BaseModelDeploymentSpec.model_validate({
        "model": "m", "runtime": "vllm", "image": "i", "peftSource": {"emptyDir": {"sizeLimit": "5Gi"}}}),
     Capacity(bytes=5 * 1024**3)),
    (BaseModelDeploymentSpec.model_validate({
        "model": "m", "runtime": "vllm", "image": "i", "peftSource": {"persistentVolumeClaim": {"claimName": "c"}}}),
     Capacity()),
])
def test_the_capacity_of_a_replica(spec, capacity):
    assert replica_capacity(spec) == capacity


@pytest.mark.parametrize(("lora", "problem"), [
    ({"bytesPerReplica": "0"}, "lora.bytesPerReplica 0 leaves no room for any adapter"),
    ({"bytesPerReplica": "30Gi"}, "lora.bytesPerReplica 30Gi exceeds the PEFT volume's emptyDir sizeLimit 20Gi"),
])
def test_a_byte_budget_that_cannot_work_is_refused(lora, problem):
    assert any(problem in p for p in spec_problems(base(**lora)))


def test_fewer_adapters_per_replica_than_gpu_slots_is_allowed_but_zero_is_not():
    assert spec_problems(base(adaptersPerReplica=2, maxGpuLoras=8)) == []
    with pytest.raises(ValueError, match="adaptersPerReplica"):
        base(adaptersPerReplica=0)


def test_every_replica_adapters_carry_no_slots_and_counted_ones_carry_theirs():
    wanted = {"a00": 1, "a01": 2}
    plan = plan_placement(base(), ADAPTERS[:3], wanted, {}, ["pod-a", "pod-b", "pod-c"], {})
    slots = {a.name: a.slots for a in plan.adapters}
    assert slots["a02"] is None
    assert len(slots["a00"]) == 1 and len(slots["a01"]) == 2
    assert plan.replica_slots == {"pod-a": 0, "pod-b": 1, "pod-c": 2}
    assert len(plan.placements["a00"].pods) == 1 and plan.placements["a02"].pods
    assert plan.short() == frozenset()


def test_a_replacement_pod_inherits_the_slot_and_so_the_adapters_of_the_pod_it_replaces():
    wanted = dict.fromkeys((a.name for a in ADAPTERS), 1)
    before = plan_placement(base(), ADAPTERS, wanted, {}, ["pod-a", "pod-b", "pod-c"], {})
    after = plan_placement(base(), ADAPTERS, wanted, {}, ["pod-a", "pod-c", "pod-d"], before.replica_slots)
    assert after.replica_slots == {"pod-a": 0, "pod-c": 2, "pod-d": 1}
    assert [a.slots for a in after.adapters] == [a.slots for a in before.adapters]
    renamed = {"pod-b": "pod-d"}
    assert {n: tuple(renamed.get(p, p) for p in placed.pods) for n, placed in before.placements.items()} == {
        n: placed.pods for n, placed in after.placements.items()}


def test_capacity_leaves_the_later_adapters_short_with_the_reason():
    plan = plan_placement(base(adaptersPerReplica=2), ADAPTERS[:5], {}, {}, ["pod-a", "pod-b"], {})
    assert [a.slots for a in plan.adapters[:2]] == [None, None]
    assert plan.short() == {"a02", "a03", "a04"}
    assert plan.placements["a02"].pods == ()
    assert "each holds at most 2 adapters" in plan.placements["a02"].shortfall


def test_sizes_count_against_the_byte_budget():
    plan = plan_placement(base(bytesPerReplica="1000"), ADAPTERS[:3], {}, {"a00": 600, "a01": 600, "a02": 300},
                          ["pod-a"], {})
    assert plan.short() == {"a01"} and plan.by_size
    assert "600 bytes" not in plan.placements["a01"].shortfall  # fits alone, not beside a00
    assert plan.sizes == {"a00": 600, "a01": 600, "a02": 300}


def test_scaled_to_zero_nothing_is_placed_and_no_shortfall_is_claimed():
    plan = plan_placement(base().model_copy(update={"replicas": 0}), ADAPTERS[:2], {"a00": 1}, {}, [], {"gone": 0})
    assert plan.replica_slots == {} and plan.short() == frozenset()
    assert [a.slots for a in plan.adapters] == [[], None]


def test_before_any_pod_starts_adapters_are_placed_on_the_slots_the_pods_will_take():
    three = base().model_copy(update={"replicas": 3})
    wanted = dict.fromkeys((a.name for a in ADAPTERS), 1)
    waiting = plan_placement(three, ADAPTERS, wanted, {}, [], {})
    assert waiting.replica_slots == {} and all(p.pods == () and p.awaiting == 1 for p in waiting.placements.values())
    one = plan_placement(three, ADAPTERS, wanted, {}, ["pod-a"], waiting.replica_slots)
    running = plan_placement(three, ADAPTERS, wanted, {}, ["pod-a", "pod-b", "pod-c"], one.replica_slots)
    # Pods starting one by one move nothing: the first rollout places once, not once per pod.
    assert [a.slots for a in waiting.adapters] == [a.slots for a in one.adapters] == [a.slots for a in running.adapters]
    assert {n for n, p in one.placements.items() if p.pods} == set(one.placements) - {
        n for n, p in one.placements.items() if p.awaiting}


def test_a_deleted_pods_adapters_wait_for_its_replacement_rather_than_move_to_another_pod_and_back():
    three = base().model_copy(update={"replicas": 3})
    wanted = dict.fromkeys((a.name for a in ADAPTERS), 1)
    before = plan_placement(three, ADAPTERS, wanted, {}, ["pod-a", "pod-b", "pod-c"], {})
    gone = plan_placement(three, ADAPTERS, wanted, {}, ["pod-a", "pod-c"], before.replica_slots, {"pod-a", "pod-c"})
    assert [a.slots for a in gone.adapters] == [a.slots for a in before.adapters]
    on_b = {n for n, p in before.placements.items() if p.pods == ("pod-b",)}
    assert on_b and {n for n, p in gone.placements.items() if p.awaiting} == on_b
    assert all(gone.placements[n].pods == () for n in on_b)
    replaced = plan_placement(three, ADAPTERS, wanted, {}, ["pod-a", "pod-c", "pod-d"], gone.replica_slots)
    assert {n for n, p in replaced.placements.items() if p.pods == ("pod-d",)} == on_b
    # Scaling down is different: the Deployment wants fewer pods, so the removed pod's adapters move.
    two = plan_placement(base().model_copy(update={"replicas": 2}), ADAPTERS, wanted, {}, ["pod-a", "pod-c"],
                         before.replica_slots, {"pod-a", "pod-c"})
    assert all(p.pods and not p.awaiting for p in two.placements.values())
    assert all(two.placements[n].pods == before.placements[n].pods for n in set(two.placements) - on_b)


def test_the_largest_reported_size_counts():
    assert largest_size({"pod-a": {"state": "Loaded", "sizeBytes": 10}, "pod-b": {"state": "Pending"},
                         "pod-c": {"sizeBytes": 30}}) == 30
    assert largest_size({"pod-a": {"state": "Pending"}}) is None


def test_a_pod_serves_every_replica_adapters_and_those_on_its_slot_and_without_a_slot_only_the_former():
    everywhere, placed = desired("everywhere"), desired("placed").model_copy(update={"slots": [1]})
    adapter_set = AdapterSet(base_model="llama3", runtime=Runtime.VLLM,
                             limits=AdapterLimits(max_rank=64, allowed_formats=[]),
                             adapters=[everywhere, placed], replica_slots={"pod-a": 0, "pod-b": 1})
    again = AdapterSet.from_configmap_data(adapter_set.to_configmap_data())
    assert [a.name for a in again.assigned_to("pod-b")] == ["everywhere", "placed"]
    assert [a.name for a in again.assigned_to("pod-a")] == ["everywhere"]
    assert [a.name for a in again.assigned_to("pod-new")] == ["everywhere"]


def test_a_replacement_seen_before_its_predecessor_is_gone_still_takes_its_slot_if_it_reports_nothing_yet():
    previous = {"pod-a": 0, "pod-b": 1, "pod-c": 2, "pod-d": 3}  # pod-d came while pod-c was still seen
    assert slots_for_pods(previous, ["pod-a", "pod-b", "pod-d"], reporting={"pod-a", "pod-b"}) == {
        "pod-a": 0, "pod-b": 1, "pod-d": 2}
    assert slots_for_pods(previous, ["pod-a", "pod-b", "pod-d"], {"pod-a", "pod-b"}, expected_pods=3) == {
        "pod-a": 0, "pod-b": 1, "pod-d": 2}
    # A pod already serving keeps its slot: scaling down moves only what the removed pod held.
    assert slots_for_pods(previous, ["pod-a", "pod-b", "pod-d"], reporting={"pod-a", "pod-b", "pod-d"}) == {
        "pod-a": 0, "pod-b": 1, "pod-d": 3}


def test_a_deleted_pods_slot_is_awaited_and_taken_by_its_replacement_even_with_a_lower_slot_free():
    three = base().model_copy(update={"replicas": 3})
    wanted = dict.fromkeys((a.name for a in ADAPTERS), 1)
    previous = {"pod-a": 0, "pod-b": 1, "pod-c": 3}  # slot 2 went free earlier
    before = plan_placement(three, ADAPTERS, wanted, {}, ["pod-a", "pod-b", "pod-c"], previous,
                            {"pod-a", "pod-b", "pod-c"})
    assert before.replica_slots == previous
    gone = plan_placement(three, ADAPTERS, wanted, {}, ["pod-a", "pod-b"], before.replica_slots, {"pod-a", "pod-b"})
    assert gone.awaited == (3,)
    again = plan_placement(three, ADAPTERS, wanted, {}, ["pod-a", "pod-b"], gone.replica_slots, {"pod-a", "pod-b"},
                           previous_awaited=gone.awaited)
    assert again.awaited == (3,) and [a.slots for a in again.adapters] == [a.slots for a in before.adapters]
    replaced = plan_placement(three, ADAPTERS, wanted, {}, ["pod-a", "pod-b", "pod-d"], again.replica_slots,
                              previous_awaited=again.awaited)
    assert replaced.replica_slots["pod-d"] == 3
