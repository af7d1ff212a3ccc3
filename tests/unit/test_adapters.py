"""Adapter acceptance, desired sets and status aggregation: the operator's decisions, without an API."""

import pytest

from loraplex.api.types import BaseModelDeploymentSpec
from loraplex.operator.adapters import (
    AdapterView,
    adapter_status,
    check_adapter,
    cleanup_done,
    desired_adapters,
)
from loraplex.operator.base_models import base_model_status, replica_problem
from loraplex.operator.placing import AdapterPlacement


def base(**overrides):
    spec = {"model": "meta/llama3", "runtime": "vllm", "image": "img", "lora": {"maxRank": 64}}
    return BaseModelDeploymentSpec.model_validate({**spec, **overrides})


def adapter(name="math", created="2026-01-01T00:00:00Z", deleting=False, status=None, generation=1, **spec):
    body = {
        "metadata": {"name": name, "namespace": "ns", "uid": f"uid-{name}", "generation": generation,
                     "creationTimestamp": created, "finalizers": ["loraplex.io/adapter-cleanup"]},
        "spec": {"baseModel": "llama3", "source": f"s3://bucket/{name}", **spec},
        "status": status or {},
    }
    if deleting:
        body["metadata"]["deletionTimestamp"] = "2026-01-02T00:00:00Z"
    return AdapterView.from_body(body)


@pytest.mark.parametrize(("the_adapter", "the_base", "reason", "phrase"), [
    (adapter(), base(), "SpecAccepted", "fits"),
    (adapter(), None, "BaseModelNotFound", "'llama3' does not exist in namespace 'ns'"),
    (adapter(format="nemo"), base(), "SpecAccepted", "fits"),  # converted to hf for vLLM
    (adapter(format="nemo"), base(lora={"allowedFormats": ["hf"]}), "FormatNotAllowed",
     "format nemo is not accepted by base model 'llama3'"),
    (adapter(format="nemo"), base(runtime="nim"), "SpecAccepted", "fits"),
    (adapter(format="hf"), base(runtime="nim", lora={"allowedFormats": ["nemo"]}), "FormatNotAllowed",
     "allowed: nemo"),
    (adapter(expectedRank=128), base(), "RankTooHigh", "expectedRank 128 exceeds base model 'llama3' lora.maxRank 64"),
    (adapter(expectedRank=64), base(), "SpecAccepted", "fits"),
    (adapter(source="s3://Bad_Bucket/x"), base(), "InvalidSource", "not a valid bucket name"),
    (adapter(source="file:///store/math"), base(), "InvalidSource", "need spec.storage.adapterStore"),
    (adapter(source="file:///etc/math"), base(storage={"adapterStore": {"claimName": "s", "mountPath": "/store"}}),
     "InvalidSource", "outside the adapter store"),
    (adapter(source="file:///store/math"),
     base(storage={"adapterStore": {"claimName": "s", "mountPath": "/store"}}), "SpecAccepted", "fits"),
    (adapter(servedName="llama3-8b"), base(model="llama3-8b"), "DuplicateServedName", "base model's own name"),
])
def test_check_adapter(the_adapter, the_base, reason, phrase):
    verdict = check_adapter(the_adapter, the_base, [the_adapter])
    assert verdict.reason == reason
    assert phrase in verdict.message
    assert verdict.accepted == (reason == "SpecAccepted")


def test_malformed_spec_is_refused_with_the_field_named():
    view = AdapterView.from_body({"metadata": {"name": "x", "namespace": "ns", "uid": "u"},
                                  "spec": {"baseModel": "llama3", "source": "s3://bucket/x", "expectedRank": 0}})
    verdict = check_adapter(view, base(), [view])
    assert verdict.reason == "InvalidSpec"
    assert "spec.expected_rank" in verdict.message or "spec.expectedRank" in verdict.message


def test_oldest_adapter_keeps_a_contested_served_name():
    older = adapter("math-v1", created="2026-01-01T00:00:00Z", servedName="math")
    newer = adapter("math-v2", created="2026-01-02T00:00:00Z", servedName="math")
    siblings = [older, newer]
    assert check_adapter(older, base(), siblings).accepted
    loser = check_adapter(newer, base(), siblings)
    assert loser.reason == "DuplicateServedName"
    assert "already used by LoraAdapter 'math-v1'" in loser.message
    # Once the winner is being deleted, the name is free again.
    assert check_adapter(newer, base(), [adapter("math-v1", deleting=True, servedName="math"), newer]).accepted


def test_desired_set_holds_live_accepted_adapters_only():
    adapters = [adapter("math"), adapter("squad", expectedRank=16), adapter("big", expectedRank=256),
                adapter("gone", deleting=True), adapter("nemo", format="nemo")]
    desired = desired_adapters(base(), adapters)
    assert [(d.name, d.served_name, d.expected_rank) for d in desired] == [("math", "math", None),
                                                                            ("nemo", "nemo", None),
                                                                            ("squad", "squad", 16)]
    assert desired[0].uid == "uid-math" and desired[0].generation == 1


def replica(state, generation=1, **extra):
    return {"state": state, "observedGeneration": generation, **extra}


def conditions(update):
    return {c["type"]: (c["status"], c["reason"]) for c in update.status["conditions"]}


def test_status_ready_when_every_live_replica_loaded_the_current_generation():
    entries = {
        "pod-a": replica("Loaded", format="hf", rank=16, targetModules=["q_proj"], sizeBytes=100),
        "pod-b": replica("Loaded", format="hf", rank=16, targetModules=["q_proj"], sizeBytes=100)}
    view = adapter()
    update = adapter_status(view, check_adapter(view, base(), [view]), ["pod-a", "pod-b"], entries)
    assert update.phase == "Ready"
    assert update.status["readyReplicas"] == 2 and update.status["replicas"] == 2
    assert (update.status["format"], update.status["rank"], update.status["sizeBytes"]) == ("hf", 16, 100)
    assert conditions(update) == {"Validated": ("True", "ValidationPassed"), "Synced": ("True", "Synced"),
                                  "Ready": ("True", "Loaded")}
    assert all(c["observedGeneration"] == 1 for c in update.status["conditions"])
    assert update.status["convertedFrom"] is None  # given as null: a converted earlier generation's value goes


def test_status_says_an_adapter_was_converted_and_from_what():
    loaded = replica("Loaded", format="hf", convertedFrom="trtllm", rank=8, targetModules=["q_proj"], sizeBytes=9)
    entries = {"pod-a": loaded}
    view = adapter()
    update = adapter_status(view, check_adapter(view, base(), [view]), ["pod-a"], entries)
    assert (update.status["format"], update.status["convertedFrom"]) == ("hf", "trtllm")


def test_old_generation_reports_do_not_count():
    entries = {"pod-a": replica("Loaded", generation=1)}
    view = adapter(generation=2)
    update = adapter_status(view, check_adapter(view, base(), [view]), ["pod-a"], entries)
    assert update.phase == "Loading"
    assert update.status["readyReplicas"] == 0


def test_partial_rollout_is_loading():
    entries = {"pod-a": replica("Loaded"), "pod-b": replica("Downloading")}
    view = adapter()
    update = adapter_status(view, check_adapter(view, base(), [view]), ["pod-a", "pod-b"], entries)
    assert update.phase == "Loading"
    assert conditions(update)["Ready"] == ("False", "Loading")
    assert "1 of 2" in update.status["conditions"][2]["message"]


@pytest.mark.parametrize(("reason", "validated", "synced"), [
    ("ValidationFailed", "False", "Unknown"),
    ("ChecksumMismatch", "False", "Unknown"),
    ("DownloadFailed", "Unknown", "False"),
    ("DiskFull", "Unknown", "False"),
    ("LoadFailed", "Unknown", "Unknown"),
])
def test_a_replica_failure_fails_the_adapter_with_its_reason(reason, validated, synced):
    message = "adapter_config.json: r=128 exceeds this base model's maxLoraRank 64"
    entries = {"pod-a": replica("Failed", reason=reason, message=message)}
    view = adapter()
    update = adapter_status(view, check_adapter(view, base(), [view]), ["pod-a"], entries)
    assert update.phase == "Failed"
    ready = update.status["conditions"][2]
    assert (ready["status"], ready["reason"]) == ("False", reason)
    assert ready["message"] == f"Replica pod-a: {message}"
    assert conditions(update)["Validated"][0] == validated
    assert conditions(update)["Synced"][0] == synced


def test_reports_from_gone_pods_are_neither_shown_nor_counted():
    entries = {"pod-a": replica("Loaded"), "pod-old": replica("Failed")}
    view = adapter()
    update = adapter_status(view, check_adapter(view, base(), [view]), ["pod-a"], entries)
    assert list(update.status["replicaStatus"]) == ["pod-a"]
    assert update.phase == "Ready"


def test_missing_base_model_leaves_the_adapter_pending_with_the_reason():
    view = adapter()
    update = adapter_status(view, check_adapter(view, None, [view]), [], {})
    assert update.phase == "Pending"
    assert conditions(update)["Ready"] == ("False", "BaseModelNotFound")


def test_no_replicas_is_pending():
    view = adapter()
    update = adapter_status(view, check_adapter(view, base(replicas=0), [view]), [], {})
    assert update.phase == "Pending"
    assert conditions(update)["Ready"] == ("False", "NoReplicas")


def test_rejected_spec_is_failed_without_touching_replicas():
    view = adapter(expectedRank=128)
    update = adapter_status(view, check_adapter(view, base(), [view]), ["pod-a"], {})
    assert update.phase == "Failed"
    assert conditions(update)["Validated"] == ("False", "RankTooHigh")


def test_deletion_waits_for_live_replicas_to_drop_the_adapter():
    entries = {"pod-a": replica("Unloading"), "pod-dead": replica("Loaded")}
    holding = adapter(deleting=True)
    update = adapter_status(holding, check_adapter(holding, base(), [holding]), ["pod-a"], entries)
    assert update.phase == "Terminating"
    assert "pod-a" in update.status["conditions"][2]["message"]
    assert not cleanup_done(["pod-a"], entries)
    assert cleanup_done(["pod-b"], entries)  # the pod that held it is gone
    assert cleanup_done(["pod-a"], {})


def test_base_model_status_counts_replicas_and_adapters():
    body = {"metadata": {"name": "llama3", "namespace": "ns", "generation": 3}}
    deployment = {"status": {"replicas": 2, "readyReplicas": 1}}
    adapters = [adapter("a", status={"phase": "Ready"}), adapter("b", status={"phase": "Loading"}),
                adapter("c", deleting=True, status={"phase": "Terminating"})]
    status = base_model_status(body, base(replicas=2), None, deployment, adapters)
    assert (status["replicas"], status["readyReplicas"], status["adapters"], status["adaptersReady"]) == (2, 1, 2, 1)
    assert status["endpoint"] == "http://llama3.ns.svc.cluster.local:8000/v1"
    by_type = {c["type"]: c for c in status["conditions"]}
    assert by_type["Reconciled"]["status"] == "True"
    assert by_type["Ready"]["reason"] == "ReplicasNotReady"
    assert by_type["AdaptersReady"]["message"].endswith("not ready: b.")
    assert all(c["observedGeneration"] == 3 for c in status["conditions"])


def test_base_model_status_quotes_why_a_replica_cannot_run():
    body = {"metadata": {"name": "llama3", "namespace": "ns", "generation": 1}}
    deployment = {"status": {"replicas": 2, "readyReplicas": 0}}
    crashing = {"containerStatuses": [
        {"name": "loraplex-sidecar", "state": {"running": {}}, "lastState": {}},
        {"name": "inference", "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 20s"}},
         "lastState": {"terminated": {"exitCode": 1, "message": "Traceback ...\nValueError: max_model_len too big\n"}}},
    ]}
    pulling = {"containerStatuses": [{"name": "inference", "state": {"waiting": {
        "reason": "ImagePullBackOff", "message": "Back-off pulling image vllm/vllm-openai:v9"}}}]}
    starting = {"containerStatuses": [{"name": "inference", "state": {"waiting": {"reason": "ContainerCreating"}}}]}
    assert replica_problem(crashing) == ("container inference is in CrashLoopBackOff, last exit code 1: "
                                         "ValueError: max_model_len too big")
    assert replica_problem(pulling) == ("container inference is in ImagePullBackOff: Back-off pulling image "
                                        "vllm/vllm-openai:v9")
    assert replica_problem(starting) is None
    assert replica_problem({}) is None

    problems = {"llama3-b": replica_problem(pulling) or "", "llama3-a": replica_problem(crashing) or ""}
    ready = {c["type"]: c for c in base_model_status(body, base(replicas=2), None, deployment, [],
                                                     replica_problems=problems)["conditions"]}["Ready"]
    assert (ready["status"], ready["reason"]) == ("False", "ReplicasFailing")
    assert ready["message"] == ("0 of 2 replica(s) are ready; pod llama3-a: container inference is in "
                                "CrashLoopBackOff, last exit code 1: ValueError: max_model_len too big "
                                "(1 more pod(s) failing).")
    healthy = base_model_status(body, base(replicas=2), None, {"status": {"replicas": 2, "readyReplicas": 2}}, [],
                                replica_problems={})
    assert {c["type"]: c for c in healthy["conditions"]}["Ready"]["reason"] == "ReplicasReady"


def test_base_model_status_counts_the_phases_the_operator_decided_before_its_watch_shows_them():
    body = {"metadata": {"name": "llama3", "namespace": "ns", "generation": 1}}
    adapters = [adapter("a", status={"phase": "Loading"}), adapter("b", status={"phase": "Loading"})]
    status = base_model_status(body, base(), None, None, adapters, phases={"a": "Ready"})
    assert status["adaptersReady"] == 1
    assert status["conditions"][2]["message"].endswith("not ready: b.")


def test_base_model_status_reports_an_invalid_spec():
    body = {"metadata": {"name": "llama3", "namespace": "ns", "generation": 2}}
    status = base_model_status(body, base(), ("InvalidSpec", "lora.maxRank 1024 exceeds ..."), None, [])
    by_type = {c["type"]: c for c in status["conditions"]}
    assert (by_type["Reconciled"]["status"], by_type["Reconciled"]["reason"]) == ("False", "InvalidSpec")
    assert by_type["Ready"]["reason"] == "InvalidSpec"
    assert by_type["AdaptersReady"]["reason"] == "NoAdapters"


# ---- placement: only the pods an adapter is placed on count -----------------------------------------

def test_an_adapter_on_one_replica_is_ready_once_that_pod_loaded_it_and_says_where():
    view = adapter(replicas=1)
    entries = {"pod-b": replica("Loaded"), "pod-a": replica("Failed", reason="LoadFailed")}  # pod-a: not its place
    update = adapter_status(view, check_adapter(view, base(), [view]), ["pod-a", "pod-b", "pod-c"], entries,
                            AdapterPlacement(pods=("pod-b",), replicas=1))
    assert update.phase == "Ready"
    assert (update.status["ready"], update.status["wantedReplicas"], update.status["placedOn"]) == (
        "1/1", 1, ["pod-b"])
    assert update.status["replicas"] == 3
    assert "placed on: pod-b" in next(c for c in update.status["conditions"] if c["type"] == "Ready")["message"]


def test_an_adapter_placed_on_a_pod_that_has_not_loaded_it_is_loading():
    view = adapter(replicas=2)
    update = adapter_status(view, check_adapter(view, base(), [view]), ["pod-a", "pod-b", "pod-c"],
                            {"pod-a": replica("Loaded"), "pod-c": replica("Loaded")},
                            AdapterPlacement(pods=("pod-a", "pod-b"), replicas=2))
    assert (update.phase, update.status["ready"]) == ("Loading", "1/2")


def test_an_adapter_with_no_room_anywhere_is_pending_with_the_shortfall():
    view = adapter(replicas=2)
    shortfall = "wants 2 replica(s) but only 0 of 3 have room (each holds at most 4 adapters): add replicas"
    update = adapter_status(view, check_adapter(view, base(), [view]), ["pod-a", "pod-b", "pod-c"], {},
                            AdapterPlacement(pods=(), shortfall=shortfall, replicas=2))
    assert update.phase == "Pending"
    assert conditions(update)["Ready"] == ("False", "InsufficientCapacity")
    assert shortfall in next(c for c in update.status["conditions"] if c["type"] == "Ready")["message"]
    assert (update.status["ready"], update.status["placedOn"]) == ("0/2", None)


def test_an_adapter_whose_pod_is_being_replaced_waits_for_the_replacement_and_says_so():
    view = adapter(replicas=2)
    waiting = adapter_status(view, check_adapter(view, base(), [view]), ["pod-a", "pod-c"], {},
                             AdapterPlacement(pods=(), awaiting=2, replicas=2))
    assert (waiting.phase, waiting.status["ready"]) == ("Pending", "0/2")
    assert conditions(waiting)["Ready"] == ("False", "WaitingForReplica")
    half = adapter_status(view, check_adapter(view, base(), [view]), ["pod-a", "pod-c"],
                          {"pod-a": replica("Loaded")}, AdapterPlacement(pods=("pod-a",), awaiting=1, replicas=2))
    assert (half.phase, half.status["ready"], conditions(half)["Ready"]) == (
        "Ready", "1/2", ("True", "WaitingForReplica"))
    assert "1 more replica(s) the Deployment has yet to create" in next(
        c for c in half.status["conditions"] if c["type"] == "Ready")["message"]


def test_an_adapter_on_fewer_replicas_than_it_wants_is_ready_there_and_says_why_not_more():
    view = adapter()  # every replica
    update = adapter_status(view, check_adapter(view, base(), [view]), ["pod-a", "pod-b"],
                            {"pod-a": replica("Loaded")}, AdapterPlacement(pods=("pod-a",), shortfall="wants 2"))
    assert update.phase == "Ready"
    assert conditions(update)["Ready"] == ("True", "InsufficientCapacity")
    assert update.status["ready"] == "1/2"


def test_without_a_placement_yet_every_live_replica_counts():
    view = adapter()
    update = adapter_status(view, check_adapter(view, base(), [view]), ["pod-a", "pod-b"],
                            {"pod-a": replica("Loaded"), "pod-b": replica("Loaded")})
    assert (update.phase, update.status["ready"], update.status["placedOn"]) == ("Ready", "2/2", ["pod-a", "pod-b"])


def test_growing_with_demand_is_refused_on_a_runtime_that_publishes_no_demand():
    view = adapter(replicas=1, maxReplicas=3)
    assert check_adapter(view, base(), [view]).accepted
    verdict = check_adapter(view, base(runtime="nim", image="nvcr.io/nim/meta/llama3:1.3.0"), [view])
    assert (verdict.accepted, verdict.reason) == (False, "DemandUnknown")
    assert "NIM 1.x, which publishes none" in verdict.message


def test_an_every_replica_adapter_counts_every_live_pod_even_before_the_plan_has_seen_a_new_one():
    view = adapter()
    stale = AdapterPlacement(pods=("pod-a",))  # planned before pod-b started
    update = adapter_status(view, check_adapter(view, base(), [view]), ["pod-a", "pod-b"],
                            {"pod-a": replica("Loaded")}, stale)
    assert (update.phase, update.status["ready"], update.status["placedOn"]) == ("Loading", "1/2", ["pod-a", "pod-b"])
