"""Placement through the Reconciler in process (the fake API server and kopf's part from test_reconciler): slots
that survive a pod's replacement and an operator restart, little movement on scale-up, and capacity shortfalls."""

from __future__ import annotations

import asyncio
import copy
import json

from loraplex.api.adapter_set import DATA_KEY
from loraplex.api.types import API_VERSION
from loraplex.operator.adapters import AdapterView
from loraplex.operator.reconciler import Reconciler
from tests.unit.test_reconciler import BASE, NS, SETTINGS, Cluster, adapter_path, merge, replica_path


def adapter_set(cluster: Cluster) -> dict:
    [configmap] = [o for o in cluster.api.objects.values() if o.get("kind") == "ConfigMap"]
    return json.loads(configmap["data"][DATA_KEY])


def placed_on(cluster: Cluster, adapter: str) -> list[str]:
    return cluster.status(adapter).get("placedOn") or []


async def pods_changed(cluster: Cluster, add: tuple[str, ...] = (), remove: tuple[str, ...] = ()) -> None:
    for pod in remove:
        cluster.remove_replica(pod)
    for pod in add:
        cluster.add_replica(pod)
    await cluster.reconciler.replicas_changed((NS, BASE))


async def cluster_with(pods: list[str], adapters: list[str], **spec) -> Cluster:
    cluster = Cluster()
    for pod in pods:
        cluster.add_replica(pod)
    await cluster.create_base_model(**spec)
    for name in adapters:
        await cluster.create_adapter(name, replicas=1)
    await cluster.settle(*adapters)
    return cluster


def capacity_warnings(cluster: Cluster) -> list[dict]:
    return [e for e in cluster.api.events() if e["reason"] == "InsufficientCapacity"
            and e["type"] == "Warning" and e["involvedObject"]["kind"] == "BaseModelDeployment"]


NAMES = [f"a{i:02}" for i in range(40)]


async def test_an_adapter_on_one_replica_is_placed_on_one_pod_and_ready_once_that_pod_loaded_it():
    cluster = await cluster_with(["pod-a", "pod-b", "pod-c"], ["math"])
    [pod] = placed_on(cluster, "math")
    [entry] = adapter_set(cluster)["adapters"]
    assert entry["slots"] == [adapter_set(cluster)["replicaSlots"][pod]]
    assert (cluster.status("math")["phase"], cluster.status("math")["ready"]) == ("Loading", "0/1")
    # Never written as if it were on every replica first.
    assert all(len(body["status"]["placedOn"]) == 1 for _, path, body in cluster.api.writes("loraadapters")
               if path.endswith("/status") and "placedOn" in body["status"])

    await cluster.report(pod, {"math": "Loaded"})
    assert (cluster.status("math")["phase"], cluster.status("math")["ready"]) == ("Ready", "1/1")


async def test_a_replacement_pod_takes_the_slot_and_adapters_of_the_pod_it_replaces():
    cluster = await cluster_with(["pod-a", "pod-b", "pod-c"], NAMES)
    before = adapter_set(cluster)
    on_b = {name for name in NAMES if placed_on(cluster, name) == ["pod-b"]}
    assert on_b
    writes = len(cluster.api.writes("configmaps"))

    await pods_changed(cluster, add=("pod-d",), remove=("pod-b",))  # pod-b terminates, pod-d replaces it
    after = adapter_set(cluster)
    assert after["replicaSlots"] == {"pod-a": 0, "pod-c": 2, "pod-d": before["replicaSlots"]["pod-b"]}
    assert [a["slots"] for a in after["adapters"]] == [a["slots"] for a in before["adapters"]]
    assert {name for name in NAMES if placed_on(cluster, name) == ["pod-d"]} == on_b
    assert len(cluster.api.writes("configmaps")) == writes + 1  # only the slot map changed


async def test_scaling_from_three_to_four_pods_moves_adapters_only_onto_the_new_pod():
    cluster = await cluster_with(["pod-a", "pod-b", "pod-c"], NAMES)
    before = {name: placed_on(cluster, name) for name in NAMES}
    await pods_changed(cluster, add=("pod-d",))
    after = {name: placed_on(cluster, name) for name in NAMES}
    moved = [name for name in NAMES if after[name] != before[name]]
    assert all(after[name] == ["pod-d"] for name in moved)
    assert 0 < len(moved) < len(NAMES) / 2  # about a quarter, never a reshuffle


async def test_an_operator_restart_keeps_every_pods_slot():
    cluster = await cluster_with(["pod-b", "pod-c"], NAMES)
    await pods_changed(cluster, add=("pod-a",))  # the newest pod sorts first by name, and takes slot 2
    assert adapter_set(cluster)["replicaSlots"] == {"pod-a": 2, "pod-b": 0, "pod-c": 1}
    writes = len(cluster.api.writes())

    cluster.reconciler = Reconciler(cluster.api, SETTINGS, cluster.indices)  # type: ignore[arg-type]
    await cluster.reconciler.load_adapters()
    await cluster.settle(*NAMES)
    assert adapter_set(cluster)["replicaSlots"] == {"pod-a": 2, "pod-b": 0, "pod-c": 1}
    assert cluster.api.writes()[writes:] == []


async def test_adapters_beyond_capacity_wait_with_the_reason_and_one_warning():
    cluster = await cluster_with(["pod-a", "pod-b"], ["a00", "a01", "a02"], lora={"adaptersPerReplica": 1})
    assert [len(placed_on(cluster, name)) for name in ("a00", "a01", "a02")] == [1, 1, 0]
    assert cluster.status("a02")["phase"] == "Pending"
    ready = cluster.condition("a02", "Ready")
    assert ready["reason"] == "InsufficientCapacity"
    assert "only 0 of 2 have room (each holds at most 1 adapters" in ready["message"]
    assert len(capacity_warnings(cluster)) == 1 and "a02" in capacity_warnings(cluster)[0]["message"]

    await cluster.reconciler.replicas_changed((NS, BASE))  # nothing changed: no second warning
    assert len(capacity_warnings(cluster)) == 1
    await pods_changed(cluster, add=("pod-c",))  # room again
    assert len(placed_on(cluster, "a02")) == 1
    assert cluster.condition("a02", "Ready")["reason"] == "Loading"


def loaded(demand: str | None = None) -> dict:
    return {"state": "Loaded", **({"demand": demand} if demand else {})}


async def test_an_adapter_grows_while_its_requests_queue_on_every_holder_and_shrinks_back_when_they_idle():
    cluster = await cluster_with(["pod-a", "pod-b", "pod-c"], [], replicas=3)
    await cluster.create_adapter("hot", replicas=1, maxReplicas=3)
    await cluster.settle("hot")
    [first] = placed_on(cluster, "hot")
    await cluster.report(first, {"hot": loaded("Serving")})
    assert (cluster.status("hot")["phase"], cluster.status("hot")["ready"]) == ("Ready", "1/1")

    await cluster.report(first, {"hot": loaded("Queued")})
    await cluster.settle("hot")
    assert cluster.status("hot")["wantedReplicas"] == 2 and placed_on(cluster, "hot")[0] == first
    [second] = [pod for pod in placed_on(cluster, "hot") if pod != first]
    [entry] = adapter_set(cluster)["adapters"]
    assert len(entry["slots"]) == 2
    scaled = [e for e in cluster.api.events() if e["reason"] == "Scaled"]
    assert len(scaled) == 1 and "Placed on 2 replica(s), was 1: its requests queue" in scaled[0]["message"]

    await cluster.report(second, {"hot": loaded()})  # loaded, but no window sampled yet: no step
    assert cluster.status("hot")["wantedReplicas"] == 2
    await cluster.report(second, {"hot": loaded("Queued")})
    await cluster.settle("hot")
    assert cluster.status("hot")["wantedReplicas"] == 3 and len(placed_on(cluster, "hot")) == 3
    await cluster.report(second, {"hot": loaded("Serving")})
    assert cluster.status("hot")["wantedReplicas"] == 3  # at maxReplicas it stays, and one holder keeps up

    # An operator restart keeps the count demand reached: it is read back from the adapter set.
    writes = len(cluster.api.writes())
    cluster.reconciler = Reconciler(cluster.api, SETTINGS, cluster.indices)  # type: ignore[arg-type]
    await cluster.reconciler.load_adapters()
    await cluster.settle("hot")
    assert cluster.api.writes()[writes:] == [] and len(adapter_set(cluster)["adapters"][0]["slots"]) == 3

    # Idle on every holder: one step down at a time, to spec.replicas and no further.
    holders = placed_on(cluster, "hot")
    for pod in holders:
        await cluster.report(pod, {"hot": loaded("Idle")})
    await cluster.settle("hot")
    assert cluster.status("hot")["wantedReplicas"] == 2
    [left] = [pod for pod in holders if pod not in placed_on(cluster, "hot")]
    await cluster.report(left, {"hot": None})  # its sidecar unloaded it
    await cluster.settle("hot")
    assert cluster.status("hot")["wantedReplicas"] == 1 and len(placed_on(cluster, "hot")) == 1
    [last] = placed_on(cluster, "hot")
    for pod in set(holders) - {left, last}:
        await cluster.report(pod, {"hot": None})
    await cluster.report(last, {"hot": loaded("Idle")})
    assert cluster.status("hot")["wantedReplicas"] == 1  # spec.replicas: no further

    # Growing again: the new holder has no level yet, so idle on the old one alone does not shrink it.
    await cluster.report(last, {"hot": loaded("Queued")})
    await cluster.settle("hot")
    assert cluster.status("hot")["wantedReplicas"] == 2
    await cluster.report(last, {"hot": loaded("Idle")})
    assert cluster.status("hot")["wantedReplicas"] == 2


async def test_a_slot_the_deployment_cannot_fill_is_not_awaited_and_its_adapters_go_to_running_pods():
    cluster = await cluster_with(["pod-a", "pod-b", "pod-c"], NAMES, replicas=3)
    on_c = {name for name in NAMES if placed_on(cluster, name) == ["pod-c"]}
    cluster.remove_replica("pod-c")
    await cluster.reconciler.replicas_changed((NS, BASE))
    assert all(cluster.condition(name, "Ready")["reason"] == "WaitingForReplica" for name in on_c)

    # The ReplicaSet cannot create the replacement (a quota): the Deployment says so, and nothing waits for it.
    cluster.indices["deployment_index"][(NS, BASE)] = [{"status": {"replicas": 2, "conditions": [
        {"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate"}]}}]
    await cluster.reconciler.converge_owned_objects((NS, BASE))
    assert all(placed_on(cluster, name) in (["pod-a"], ["pod-b"]) for name in on_c)


async def test_demand_takes_only_room_no_adapters_own_replicas_need():
    cluster = await cluster_with(["pod-a", "pod-b"], [], replicas=2, lora={"adaptersPerReplica": 1})
    await cluster.create_adapter("hot", replicas=1, maxReplicas=2)
    await cluster.create_adapter("cold", replicas=1)
    await cluster.settle("hot", "cold")
    [hot], [cold] = placed_on(cluster, "hot"), placed_on(cluster, "cold")
    await cluster.report(cold, {"cold": loaded()})
    await cluster.report(hot, {"hot": loaded("Queued")})
    await cluster.settle("hot", "cold")
    assert (placed_on(cluster, "hot"), placed_on(cluster, "cold")) == ([hot], [cold])
    assert cluster.status("cold")["phase"] == "Ready" and cluster.status("hot")["wantedReplicas"] == 1
    assert not [e for e in cluster.api.events() if e["reason"] in ("Scaled", "InsufficientCapacity")]


async def test_reports_decided_at_once_on_the_same_placement_step_the_count_once():
    cluster = await cluster_with(["pod-a", "pod-b", "pod-c", "pod-d"], [], replicas=4)
    await cluster.create_adapter("hot", replicas=2, maxReplicas=4)
    await cluster.settle("hot")
    first, second = placed_on(cluster, "hot")
    await cluster.report(first, {"hot": loaded("Serving")})
    await cluster.report(second, {"hot": loaded("Serving")})
    # Both turn Queued, and kopf hands both events over before either decision is placed.
    for pod in (first, second):
        path = replica_path(pod)
        cluster.api.store(path, merge(copy.deepcopy(cluster.api.objects[path]), {"status": {"adapters": {
            "hot": {**loaded("Queued"), "observedGeneration": 1}}}}))
    cluster.indices["replica_report_index"][(NS, BASE)] = [
        (pod, copy.deepcopy(cluster.api.objects[replica_path(pod)]["status"]["adapters"])) for pod in (first, second)]
    await asyncio.gather(*(cluster.reconciler.report_changed(
        (NS, BASE), pod, copy.deepcopy(cluster.api.objects[replica_path(pod)]["status"]["adapters"]))
        for pod in (first, second)))
    await cluster.settle("hot")
    assert len(placed_on(cluster, "hot")) == 3 and cluster.status("hot")["wantedReplicas"] == 3


async def test_a_step_decided_before_the_adapter_was_first_published_still_gets_its_scaled_event():
    """A replica can report demand before any adapter-set run has carried the adapter (its status placed it, from
    a plan of its own): the step's Event waits for the first published plan that places it."""
    cluster = await cluster_with(["pod-a", "pod-b", "pod-c"], [], replicas=3)
    cluster.api.store(adapter_path("hot"), {
        "apiVersion": API_VERSION, "kind": "LoraAdapter",
        "metadata": {"name": "hot", "namespace": NS, "creationTimestamp": "2026-01-01T00:00:01Z"},
        "spec": {"baseModel": BASE, "source": "s3://bucket/hot", "replicas": 1, "maxReplicas": 3}})
    cluster.reconciler.adapters.put(AdapterView.from_body(cluster.api.objects[adapter_path("hot")]))
    [holder] = (await cluster.reconciler.placement_of((NS, BASE), "hot")).pods
    assert adapter_set(cluster)["adapters"] == []  # not published yet

    await cluster.report(holder, {"hot": loaded("Queued")})
    await cluster.settle("hot")
    [entry] = adapter_set(cluster)["adapters"]
    assert len(entry["slots"]) == 2
    scaled = [e for e in cluster.api.events() if e["reason"] == "Scaled"]
    assert len(scaled) == 1 and "Placed on 2 replica(s), was 1" in scaled[0]["message"]
