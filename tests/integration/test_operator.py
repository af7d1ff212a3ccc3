"""The real operator process against a real control plane, with the chart's RBAC and through an ApiProxy:
what a user of the CRDs sees."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from kubernetes.client import ApiException

from loraplex.api.adapter_set import AdapterSet
from loraplex.local.apiproxy import ApiProxy
from loraplex.local.install import chart_rbac, install_operator_identity
from tests.conftest import ROOT, tool
from tests.integration.harness import Cluster, OperatorProcess, kubeconfig_token, wait_for

pytestmark = pytest.mark.integration
WRITES = ("create", "update", "patch", "delete", "deletecollection")
OPERATOR_CLIENTS = ("kopf", "aiohttp")  # kopf's watches, and loraplex.kube.KubeClient (aiohttp's own agent)


@pytest.fixture
def operator(start_operator) -> OperatorProcess:
    return start_operator()


def until(operator: OperatorProcess, predicate, what: str, timeout: float = 30.0):
    return wait_for(predicate, timeout=timeout, what=what, log=operator.log)


def adapter_set(cluster: Cluster, base_model: str = "llama3") -> AdapterSet:
    config_map = cluster.core.read_namespaced_config_map(f"{base_model}-adapters", cluster.namespace)
    return AdapterSet.from_configmap_data(config_map.data)


def served(cluster: Cluster, base_model: str = "llama3") -> dict[str, str]:
    return {a.served_name: a.source for a in adapter_set(cluster, base_model).adapters}


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def phase(cluster: Cluster, name: str) -> str | None:
    return (cluster.adapter(name).get("status") or {}).get("phase")


def replicas(operator: OperatorProcess, cluster: Cluster, count: int, base_model: str = "llama3") -> list[str]:
    """The names of the `count` pods the Deployment controller made for the base model, once they exist."""
    def made() -> list[str]:
        pods = cluster.replicas(base_model)
        return pods if len(pods) == count else []
    return until(operator, made, f"{count} pod(s) of {base_model}")


def operator_writes(proxy: ApiProxy) -> dict[tuple[str, str, str], int]:
    return {key: n for key, n in proxy.counts.items() if key[0] in OPERATOR_CLIENTS and key[1] in WRITES}


def test_vllm_base_model_gets_deployment_service_rbac_and_status(cluster, operator):
    ns = cluster.namespace
    cluster.apply_base_model("llama3", replicas=2, lora={"maxGpuLoras": 4, "maxCpuLoras": 8, "maxRank": 16})
    deployment = until(operator, lambda: cluster.apps.read_namespaced_deployment("llama3", ns), "the Deployment")
    inference = deployment.spec.template.spec.containers[0]
    assert inference.args[:1] == ["meta/llama3-8b-instruct"]
    assert [flag(inference.args, f) for f in ("--max-loras", "--max-cpu-loras", "--max-lora-rank")] \
        == ["4", "8", "16"]
    assert "--enable-lora" in inference.args
    assert {e.name: e.value for e in inference.env}["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert deployment.spec.replicas == 2
    assert [c.name for c in deployment.spec.template.spec.containers] == ["inference", "loraplex-sidecar"]
    assert deployment.metadata.owner_references[0].kind == "BaseModelDeployment"

    assert cluster.core.read_namespaced_service("llama3", ns).spec.ports[0].port == 8000
    assert cluster.core.read_namespaced_service_account("llama3-loraplex", ns)
    role = cluster.rbac.read_namespaced_role("llama3-loraplex-sidecar", ns)
    assert role.rules[0].resource_names == ["llama3-adapters"]
    assert cluster.rbac.read_namespaced_role_binding("llama3-loraplex-sidecar", ns).subjects[0].name \
        == "llama3-loraplex"
    assert until(operator, lambda: adapter_set(cluster), "the adapter set").adapters == []

    status = until(operator, lambda: cluster.base_model("llama3").get("status"), "base model status")
    assert status["observedGeneration"] == 1
    assert status["endpoint"] == f"http://llama3.{ns}.svc.cluster.local:8000/v1"
    assert cluster.condition(cluster.base_model("llama3"), "Reconciled")["status"] == "True"

    # The base model follows the status the Deployment controller writes: two pods, none of them ready, as
    # there is no kubelet here to run them (the e2e tests, with one, see the model turn Ready).
    replicas(operator, cluster, 2)
    until(operator, lambda: cluster.base_model("llama3")["status"]["replicas"] == 2, "replicas=2 from the Deployment")
    status = cluster.base_model("llama3")["status"]
    assert status["readyReplicas"] == 0
    ready = cluster.condition(cluster.base_model("llama3"), "Ready")
    assert (ready["status"], ready["reason"], ready["message"]) \
        == ("False", "ReplicasNotReady", "0 of 2 replica(s) are ready.")


def test_nim_base_model_gets_the_documented_environment(cluster, operator):
    cluster.apply_base_model("nim-llama", runtime="nim", image="nvcr.io/nim/meta/llama3-8b-instruct:1.0.0",
                             envFromSecrets=["ngc-api"], lora={"maxRank": 32, "refreshIntervalSeconds": 5})
    deployment = until(operator, lambda: cluster.apps.read_namespaced_deployment("nim-llama", cluster.namespace),
                       "the NIM Deployment")
    inference = deployment.spec.template.spec.containers[0]
    env = {e.name: e.value for e in inference.env}
    assert env["NIM_PEFT_SOURCE"] == "/loras"
    assert env["NIM_PEFT_REFRESH_INTERVAL"] == "5"
    assert env["NIM_MAX_LORA_RANK"] == "32"
    assert (env["NIM_MAX_GPU_LORAS"], env["NIM_MAX_CPU_LORAS"]) == ("8", "16")
    assert inference.env_from[0].secret_ref.name == "ngc-api"
    mounts = {m.name: m.mount_path for m in inference.volume_mounts}
    assert mounts["model-cache"] == "/opt/nim/.cache"


def test_desired_set_follows_adapters_without_restarting_pods(cluster, operator):
    cluster.apply_base_model("llama3")
    until(operator, lambda: adapter_set(cluster) is not None, "the adapter set")
    pods = replicas(operator, cluster, 1)
    generation = cluster.apps.read_namespaced_deployment("llama3", cluster.namespace).metadata.generation

    cluster.apply_adapter("math")
    cluster.apply_adapter("squad", servedName="squad-v1")
    until(operator, lambda: served(cluster) == {"math": "s3://adapters/math", "squad-v1": "s3://adapters/squad"},
          "both adapters in the desired set")

    cluster.apply_adapter("math", source="s3://adapters/math-v2")
    until(operator, lambda: served(cluster)["math"] == "s3://adapters/math-v2", "the new source")
    entry = next(a for a in adapter_set(cluster).adapters if a.name == "math")
    assert entry.generation == 2

    cluster.delete("loraadapters", "squad")
    until(operator, lambda: set(served(cluster)) == {"math"}, "squad removed from the desired set")
    until(operator, lambda: not cluster.exists("loraadapters", "squad"), "squad gone (no replicas held it)")
    # The Deployment's spec was never touched (its generation counts spec changes), so no pod was replaced.
    assert cluster.apps.read_namespaced_deployment("llama3", cluster.namespace).metadata.generation == generation
    assert cluster.replicas() == pods


def test_edited_or_deleted_adapter_set_is_put_back(cluster, operator):
    ns = cluster.namespace
    cluster.apply_base_model("llama3")
    cluster.apply_adapter("math")
    until(operator, lambda: served(cluster) == {"math": "s3://adapters/math"}, "math in the desired set")
    label = "app.kubernetes.io/managed-by"

    cluster.core.patch_namespaced_config_map("llama3-adapters", ns, {"data": {"adapters.json": "{}"}})
    until(operator, lambda: served(cluster) == {"math": "s3://adapters/math"}, "edited data put back")
    cluster.core.patch_namespaced_config_map("llama3-adapters", ns, {"metadata": {"labels": {label: "me"}}})
    until(operator, lambda: cluster.core.read_namespaced_config_map(
        "llama3-adapters", ns).metadata.labels[label] == "loraplex", "edited label put back")
    cluster.core.delete_namespaced_config_map("llama3-adapters", ns)
    until(operator, lambda: served(cluster) == {"math": "s3://adapters/math"}, "deleted adapter set recreated")

    cluster.apply_adapter("squad")  # and the operator still follows adapters afterwards
    until(operator, lambda: set(served(cluster)) == {"math", "squad"}, "squad added")


def test_adapters_that_do_not_fit_the_adapter_set_wait_for_room(cluster, start_operator):
    operator = start_operator(env={"LORAPLEX_ADAPTER_SET_MAX_BYTES": "500"})
    cluster.apply_base_model("llama3")
    names = [f"a{index}" for index in range(1, 6)]
    for name in names:  # one after another: the oldest keep their place
        cluster.apply_adapter(name)
        time.sleep(0.05)
    until(operator, lambda: all(phase(cluster, name) is not None for name in names)
          and len(served(cluster)) + sum(
              cluster.condition(cluster.adapter(n), "Ready")["reason"] == "AdapterSetFull" for n in names) == 5,
          "every adapter either in the set or waiting for room")
    fitted = sorted(served(cluster))
    assert 1 <= len(fitted) < 5 and fitted == names[:len(fitted)]
    data = cluster.core.read_namespaced_config_map("llama3-adapters", cluster.namespace).data["adapters.json"]
    assert len(data) <= 500
    waiting = names[len(fitted)]
    assert phase(cluster, waiting) == "Pending"
    assert "adapter set of base model 'llama3' is full" in cluster.condition(
        cluster.adapter(waiting), "Ready")["message"]
    until(operator, lambda: any(e.reason == "AdapterSetFull" for e in cluster.events_for("llama3")),
          "a Warning event on the base model")

    replicas(operator, cluster, 1)
    cluster.delete("loraadapters", "a1")
    until(operator, lambda: waiting in served(cluster) and "a1" not in served(cluster), "room made for the next")
    until(operator, lambda: cluster.condition(cluster.adapter(waiting), "Ready")["reason"] == "Loading",
          "no longer waiting for room, but for the replica to load it")


def test_readiness_aggregates_per_replica_reports(cluster, operator):
    cluster.apply_base_model("llama3", replicas=2)
    first, second = replicas(operator, cluster, 2)
    cluster.apply_adapter("math")
    until(operator, lambda: cluster.adapter("math")["status"]["replicas"] == 2, "two replicas counted")
    assert phase(cluster, "math") == "Loading"

    loaded = {"format": "hf", "rank": 16, "targetModules": ["q_proj", "v_proj"], "sizeBytes": 1234}
    cluster.report("math", first, "Loaded", **loaded)
    until(operator, lambda: cluster.adapter("math")["status"]["readyReplicas"] == 1, "one replica ready")
    assert phase(cluster, "math") == "Loading"
    cluster.report("math", second, "Loaded", **loaded)
    until(operator, lambda: phase(cluster, "math") == "Ready", "adapter Ready")
    status = cluster.adapter("math")["status"]
    assert (status["format"], status["rank"], status["sizeBytes"]) == ("hf", 16, 1234)
    assert cluster.condition(cluster.adapter("math"), "Ready")["status"] == "True"
    until(operator, lambda: cluster.base_model("llama3")["status"]["adaptersReady"] == 1, "base model counts it")
    until(operator, lambda: any(e.reason == "Loaded" for e in cluster.events_for("math")), "a Ready event")
    metrics = operator.metrics()
    assert 'loraplex_operator_adapters{phase="Ready"} 1.0' in metrics
    assert 'loraplex_operator_reconciles_total{kind="adapter",result="ok"}' in metrics

    # A replica goes away and the ReplicaSet replaces it: the gone pod's report is pruned, and the adapter
    # waits for the replacement, which has not loaded it yet.
    cluster.delete_pod(second)
    replacement = next(pod for pod in replicas(operator, cluster, 2) if pod != first)
    assert replacement != second
    def judged_on_the_replacement() -> bool:
        status = cluster.adapter("math")["status"]
        return (second not in (status.get("replicaStatus") or {})
                and (status["replicas"], status["readyReplicas"]) == (2, 1))
    until(operator, judged_on_the_replacement, "the gone replica's report pruned and the replacement counted")
    assert phase(cluster, "math") == "Loading"
    cluster.report("math", replacement, "Loaded", **loaded)
    until(operator, lambda: phase(cluster, "math") == "Ready", "Ready again once the replacement loaded it")

    # One replica failing fails the adapter with that replica's reason.
    cluster.report("math", first, "Failed", reason="ValidationFailed",
                   message="adapter_config.json: r=128 exceeds this base model's maxLoraRank 64")
    until(operator, lambda: phase(cluster, "math") == "Failed", "adapter Failed")
    ready = cluster.condition(cluster.adapter("math"), "Ready")
    assert ready["reason"] == "ValidationFailed" and "r=128" in ready["message"]
    assert cluster.condition(cluster.adapter("math"), "Validated")["status"] == "False"
    until(operator, lambda: any(e.type == "Warning" and "r=128" in e.message for e in cluster.events_for("math")),
          "a Warning event naming the problem")


def test_an_adapter_on_one_replica_is_placed_on_one_pod_and_moves_when_that_pod_goes(cluster, operator):
    cluster.apply_base_model("llama3", replicas=3)
    pods = replicas(operator, cluster, 3)
    cluster.apply_adapter("math", replicas=1)
    cluster.apply_adapter("everywhere")

    def placed_on(name: str) -> list[str]:
        return (cluster.adapter(name).get("status") or {}).get("placedOn") or []

    [holder] = until(operator, lambda: placed_on("math"), "math placed")
    assert holder in pods
    until(operator, lambda: sorted(placed_on("everywhere")) == pods, "everywhere on every pod")
    published = until(operator, lambda: (lambda s: s if len(s.adapters) == 2 else None)(adapter_set(cluster)),
                      "both adapters in the adapter set")
    adapters, slots = {a.name: a for a in published.adapters}, published.replica_slots or {}
    assert sorted(slots) == pods and adapters["math"].slots == [slots[holder]] and adapters["everywhere"].slots is None
    assert cluster.adapter("math")["status"]["ready"] == "0/1"
    cluster.report("math", holder, "Loaded", sizeBytes=1000)
    until(operator, lambda: phase(cluster, "math") == "Ready", "math Ready on its one pod")
    assert cluster.adapter("math")["status"]["ready"] == "1/1"

    # The pod goes; its replacement takes its slot, and so math.
    cluster.delete_pod(holder)
    replacement = until(operator, lambda: next((p for p in cluster.replicas() if p not in pods), None),
                        "a replacement pod")
    until(operator, lambda: placed_on("math") == [replacement], "math placed on the replacement")
    assert (adapter_set(cluster).replica_slots or {})[replacement] == slots[holder]
    assert phase(cluster, "math") == "Loading"
    cluster.report("math", replacement, "Loaded", sizeBytes=1000)
    until(operator, lambda: phase(cluster, "math") == "Ready", "math Ready again")


def test_an_adapter_grows_onto_another_pod_while_its_requests_queue_and_back_when_idle(cluster, operator):
    cluster.apply_base_model("llama3", replicas=3)
    replicas(operator, cluster, 3)
    cluster.apply_adapter("hot", replicas=1, maxReplicas=2)

    def placed_on() -> list[str]:
        return (cluster.adapter("hot").get("status") or {}).get("placedOn") or []

    [first] = until(operator, placed_on, "hot placed")
    cluster.report("hot", first, "Loaded", demand="Queued")
    [_, second] = until(operator, lambda: (lambda p: p if len(p) == 2 else None)(placed_on()), "hot on 2 pods")
    assert cluster.adapter("hot")["status"]["wantedReplicas"] == 2
    until(operator, lambda: any(e.reason == "Scaled" for e in cluster.events_for("hot")), "a Scaled event")
    cluster.report("hot", second, "Loaded", demand="Idle")
    cluster.report("hot", first, "Loaded", demand="Idle")
    until(operator, lambda: placed_on() and len(placed_on()) == 1, "hot back on one pod")
    assert cluster.adapter("hot")["status"]["wantedReplicas"] == 1


def test_growing_past_the_least_replicas_needs_them_set_and_is_refused_otherwise(cluster):
    with pytest.raises(ApiException) as refused:
        cluster.apply_adapter("hot", maxReplicas=2)
    assert refused.value.status == 422 and "spec.maxReplicas needs spec.replicas" in refused.value.body


def test_adapters_beyond_the_capacity_per_replica_wait_with_the_reason(cluster, operator):
    cluster.apply_base_model("llama3", replicas=1, lora={"adaptersPerReplica": 1})
    replicas(operator, cluster, 1)
    cluster.apply_adapter("first", replicas=1)
    until(operator, lambda: (cluster.adapter("first").get("status") or {}).get("placedOn"), "first placed")
    cluster.apply_adapter("second", replicas=1)
    until(operator, lambda: (cluster.condition(cluster.adapter("second"), "Ready") or {}).get("reason")
          == "InsufficientCapacity", "second waiting for room")
    assert phase(cluster, "second") == "Pending"
    assert "each holds at most 1 adapters" in cluster.condition(cluster.adapter("second"), "Ready")["message"]
    until(operator, lambda: any(e.reason == "InsufficientCapacity" and e.type == "Warning"
                                for e in cluster.events_for("llama3")), "a Warning on the base model")
    cluster.apply_base_model("llama3", replicas=2)  # room on a second replica
    until(operator, lambda: len((cluster.adapter("second").get("status") or {}).get("placedOn") or []) == 1,
          "second placed once a replica more runs")


def test_deletion_waits_for_every_replica_to_unload(cluster, operator):
    cluster.apply_base_model("llama3", replicas=2)
    first, second = replicas(operator, cluster, 2)
    cluster.apply_adapter("math")
    until(operator, lambda: "loraplex.io/adapter-cleanup" in cluster.adapter("math")["metadata"]["finalizers"],
          "the cleanup finalizer")
    cluster.report("math", first, "Loaded")
    cluster.report("math", second, "Loaded")
    until(operator, lambda: phase(cluster, "math") == "Ready", "Ready before deletion")

    cluster.delete("loraadapters", "math")
    until(operator, lambda: "math" not in served(cluster), "removed from the desired set")
    until(operator, lambda: phase(cluster, "math") == "Terminating", "Terminating")
    cluster.report("math", first, None)  # the first replica unloaded it and deleted its files
    until(operator, lambda: cluster.condition(cluster.adapter("math"), "Ready")["message"]
          == f"Unloading from 1 replica(s): {second}.", "the operator saw the first replica unload it")
    assert cluster.exists("loraadapters", "math"), "released before the second replica unloaded"
    cluster.report("math", second, None)
    until(operator, lambda: not cluster.exists("loraadapters", "math"), "the finalizer released")


@pytest.mark.parametrize(("spec", "reason", "phrase"), [
    ({"expectedRank": 128}, "RankTooHigh", "expectedRank 128 exceeds base model 'llama3' lora.maxRank 64"),
    ({"source": "s3://Invalid_Bucket/x"}, "InvalidSource", "not a valid bucket name"),
    ({"servedName": "math"}, "DuplicateServedName", "already used by LoraAdapter 'math'"),
])
def test_bad_adapters_fail_clearly_and_disturb_nothing(cluster, operator, spec, reason, phrase):
    cluster.apply_base_model("llama3")
    cluster.apply_adapter("math")
    until(operator, lambda: "math" in served(cluster), "the good adapter served")
    time.sleep(1.1)  # the bad one is strictly younger, so the contested served name stays with 'math'
    cluster.apply_adapter("bad", **spec)
    until(operator, lambda: phase(cluster, "bad") == "Failed", "the bad adapter Failed")
    validated = cluster.condition(cluster.adapter("bad"), "Validated")
    assert (validated["status"], validated["reason"]) == ("False", reason)
    assert phrase in validated["message"]
    until(operator, lambda: any(e.reason == reason and e.type == "Warning" for e in cluster.events_for("bad")),
          "a Warning event")
    assert set(served(cluster)) == {"math"}
    assert (cluster.adapter("math").get("status") or {}).get("phase") != "Failed"


def test_missing_base_model_leaves_adapters_pending_until_it_exists(cluster, operator):
    cluster.apply_adapter("math")
    until(operator, lambda: phase(cluster, "math") == "Pending", "Pending")
    ready = cluster.condition(cluster.adapter("math"), "Ready")
    assert ready["reason"] == "BaseModelNotFound" and "'llama3' does not exist" in ready["message"]
    cluster.apply_base_model("llama3")
    until(operator, lambda: "math" in served(cluster), "served once the base model exists")
    until(operator, lambda: cluster.condition(cluster.adapter("math"), "Ready")["reason"] == "Loading",
          "waiting for the base model's replica to load it instead")

    cluster.delete("basemodeldeployments", "llama3")
    until(operator, lambda: cluster.condition(cluster.adapter("math"), "Ready")["reason"] == "BaseModelNotFound",
          "back to waiting for the base model")
    until(operator, lambda: not cluster.apps.list_namespaced_deployment(cluster.namespace).items,
          "owned objects garbage-collected")
    cluster.delete("loraadapters", "math")
    until(operator, lambda: not cluster.exists("loraadapters", "math"), "deletable without a base model")


def test_invalid_base_model_spec_is_reported_and_leaves_the_running_deployment_alone(cluster, operator):
    cluster.apply_base_model("llama3", lora={"maxRank": 64})
    before = until(operator, lambda: cluster.apps.read_namespaced_deployment("llama3", cluster.namespace),
                   "Deployment")
    cluster.apply_base_model("llama3", lora={"maxRank": 1024})
    until(operator, lambda: cluster.condition(cluster.base_model("llama3"), "Reconciled")["status"] == "False",
          "Reconciled=False")
    reconciled = cluster.condition(cluster.base_model("llama3"), "Reconciled")
    assert reconciled["reason"] == "InvalidSpec"
    assert "exceeds vLLM's largest --max-lora-rank 512" in reconciled["message"]
    assert reconciled["observedGeneration"] == 2
    until(operator, lambda: any(e.reason == "InvalidSpec" for e in cluster.events_for("llama3")), "a Warning")
    after = cluster.apps.read_namespaced_deployment("llama3", cluster.namespace)
    assert after.metadata.generation == before.metadata.generation
    assert flag(after.spec.template.spec.containers[0].args, "--max-lora-rank") == "64"


def test_spec_change_rolls_the_deployment_and_drift_is_repaired(cluster, operator):
    ns = cluster.namespace
    cluster.apply_base_model("llama3")
    until(operator, lambda: cluster.apps.read_namespaced_deployment("llama3", ns), "Deployment")
    cluster.apply_base_model("llama3", lora={"maxGpuLoras": 2, "maxCpuLoras": 4})
    until(operator, lambda: flag(cluster.apps.read_namespaced_deployment(
        "llama3", ns).spec.template.spec.containers[0].args, "--max-loras") == "2", "new flags rolled out")

    cluster.core.delete_namespaced_service("llama3", ns)
    until(operator, lambda: cluster.core.read_namespaced_service("llama3", ns), "Service recreated")
    cluster.apps.patch_namespaced_deployment("llama3", ns, {"spec": {"replicas": 7},
                                                            "metadata": {"labels": {"team": "a"}}})
    until(operator, lambda: cluster.apps.read_namespaced_deployment("llama3", ns).spec.replicas == 1,
          "replicas reverted to the spec")
    assert cluster.apps.read_namespaced_deployment("llama3", ns).metadata.labels["team"] == "a"


def test_conflicts_are_retried(cluster, operator, proxy):
    cluster.apply_base_model("llama3")
    until(operator, lambda: cluster.base_model("llama3").get("status"), "base model reconciled")
    until(operator, lambda: adapter_set(cluster), "the adapter set")
    proxy.inject("patch", "loraadapters.loraplex.io", 409, count=3)
    proxy.inject("update", "configmaps", 409, count=2)
    cluster.apply_adapter("math")
    until(operator, lambda: "loraplex.io/adapter-cleanup" in cluster.adapter("math")["metadata"]["finalizers"],
          "finalizer added despite conflicts")
    until(operator, lambda: "math" in served(cluster), "adapter set written despite conflicts")
    assert proxy.injected_remaining("patch", "loraadapters.loraplex.io") == 0
    assert proxy.injected_remaining("update", "configmaps") == 0


def test_throttled_startup_list_is_retried_after_the_servers_delay(cluster, start_operator, proxy):
    cluster.apply_base_model("llama3")
    cluster.apply_adapter("math")
    # The operator's first request for adapters: the LIST that primes its index before any handler runs.
    proxy.inject("list", "loraadapters.loraplex.io", 429, count=2, retry_after=1)
    operator = start_operator()
    until(operator, lambda: "math" in served(cluster), "converged despite the throttled LIST")
    assert proxy.injected_remaining("list", "loraadapters.loraplex.io") == 0
    assert proxy.counts[("aiohttp", "list", "loraadapters.loraplex.io")] >= 3
    log = operator.log()
    # The apiserver may throttle a LIST of a freshly served CRD itself ("storage is (re)initializing").
    assert log.count("answered 429 TooManyRequests") >= 2, log
    assert "Activity 'start' failed" not in log, "the client gave up and left it to kopf's slower retry"


def test_unavailable_api_server_on_writes_is_retried(cluster, operator, proxy):
    proxy.inject("create", "deployments.apps", 503, count=2)
    proxy.inject("create", "configmaps", 503, count=2)
    proxy.inject("patch", "loraadapters.loraplex.io/status", 503, count=2)
    cluster.apply_base_model("llama3")
    cluster.apply_adapter("math")
    until(operator, lambda: cluster.apps.read_namespaced_deployment("llama3", cluster.namespace), "the Deployment")
    until(operator, lambda: "math" in served(cluster), "the adapter set")
    until(operator, lambda: phase(cluster, "math") == "Loading", "the adapter's status")
    for verb, resource in (("create", "deployments.apps"), ("create", "configmaps"),
                           ("patch", "loraadapters.loraplex.io/status")):
        assert proxy.injected_remaining(verb, resource) == 0
    assert "answered 503 ServiceUnavailable" in operator.log()


def test_apiserver_restart_and_closed_watches_are_ridden_out(cluster, operator, proxy):
    cluster.apply_base_model("llama3")
    cluster.apply_adapter("math")
    until(operator, lambda: "math" in served(cluster), "first convergence")

    proxy.close_watches()  # as an apiserver does when it shuts down gracefully
    cluster.apply_adapter("squad")
    until(operator, lambda: set(served(cluster)) == {"math", "squad"}, "events seen on the new watches")

    proxy.outage(3)  # connections refused, open streams cut
    cluster.apply_adapter("pubmedqa")
    cluster.delete("loraadapters", "math")
    until(operator, lambda: set(served(cluster)) == {"squad", "pubmedqa"}, "what changed meanwhile, once it is back")
    until(operator, lambda: not cluster.exists("loraadapters", "math"), "the deletion finished")
    assert operator.process is not None and operator.process.poll() is None, "the operator gave up"


def test_operator_restart_converges_without_duplicates(cluster, operator, start_operator):
    ns = cluster.namespace
    cluster.apply_base_model("llama3")
    (pod,) = replicas(operator, cluster, 1)
    cluster.apply_adapter("math")
    cluster.apply_adapter("squad")
    until(operator, lambda: set(served(cluster)) == {"math", "squad"}, "first convergence")
    cluster.report("squad", pod, "Loaded")
    operator.kill()

    # While it is down: one adapter added, one deleted (held by its finalizer), the model changed.
    cluster.apply_adapter("pubmedqa")
    cluster.delete("loraadapters", "squad")
    cluster.apply_base_model("llama3", lora={"maxRank": 32})
    assert cluster.exists("loraadapters", "squad")

    restarted = start_operator("operator-2")
    until(restarted, lambda: set(served(cluster)) == {"math", "pubmedqa"}, "desired set after restart")
    until(restarted, lambda: adapter_set(cluster).limits.max_rank == 32, "new limits published")
    cluster.report("squad", pod, None)
    until(restarted, lambda: not cluster.exists("loraadapters", "squad"), "deletion finished after restart")
    assert [d.metadata.name for d in cluster.apps.list_namespaced_deployment(ns).items] == ["llama3"]
    config_maps = cluster.core.list_namespaced_config_map(ns, label_selector="app.kubernetes.io/managed-by")
    assert [c.metadata.name for c in config_maps.items] == ["llama3-adapters"]
    assert cluster.adapter("math")["metadata"]["finalizers"] == ["loraplex.io/adapter-cleanup"]


def test_nothing_changes_once_converged(cluster, start_operator, proxy):
    """GitOps tools must see no drift: no status churn and no writes while nothing changes, resyncs included."""
    operator = start_operator(resync_seconds=3)
    cluster.apply_base_model("llama3", replicas=1)
    replicas(operator, cluster, 1)
    cluster.apply_adapter("math")
    cluster.apply_adapter("bad", expectedRank=999)
    until(operator, lambda: phase(cluster, "math") == "Loading" and phase(cluster, "bad") == "Failed", "converged")
    time.sleep(2)
    versions = {name: cluster.adapter(name)["metadata"]["resourceVersion"] for name in ("math", "bad")}
    versions["llama3"] = cluster.base_model("llama3")["metadata"]["resourceVersion"]
    spec_before = json.dumps(cluster.adapter("math")["spec"], sort_keys=True)
    proxy.reset_counts()
    time.sleep(7)  # more than two full resync passes (3 s each in tests)
    assert operator_writes(proxy) == {}
    assert any(key[0] == "aiohttp" and key[1] == "list" for key in proxy.counts), "no resync ran"
    assert {name: cluster.adapter(name)["metadata"]["resourceVersion"] for name in ("math", "bad")} \
        == {k: v for k, v in versions.items() if k != "llama3"}
    assert cluster.base_model("llama3")["metadata"]["resourceVersion"] == versions["llama3"]
    assert json.dumps(cluster.adapter("math")["spec"], sort_keys=True) == spec_before


def test_two_replicas_with_peering_never_both_act(cluster, api_client, start_operator):
    """Leader election as the chart runs it: only the highest-priority live replica reconciles."""
    kubernetes.client.CustomObjectsApi(api_client).create_namespaced_custom_object(
        "kopf.dev", "v1", cluster.namespace, "kopfpeerings",
        {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "loraplex"}})
    leader = start_operator("leader", peering=("loraplex", 200))
    standby = start_operator("standby", peering=("loraplex", 100))
    # Replicas start paused; the highest-priority one resumes once it has seen its peers.
    until(leader, lambda: "Resuming operations" in leader.log(), "the leader becomes active")
    cluster.apply_base_model("llama3")
    until(leader, lambda: "created Deployment" in leader.log(), "the leader reconciles")
    time.sleep(2)
    # A replica may resume for one watch round-trip at start before it sees a higher peer; from then
    # on it stays paused and acts on nothing.
    peering_lines = [line for line in standby.log().splitlines() if "operations" in line]
    assert not peering_lines or "Pausing operations in favour of" in peering_lines[-1]
    assert "created" not in standby.log() and "updated" not in standby.log()

    leader.stop()  # a graceful exit withdraws from the peering at once
    cluster.apply_adapter("math")
    until(standby, lambda: "math" in served(cluster), "the standby takes over")


def test_freeing_a_served_name_accepts_the_adapter_that_waited_for_it(cluster, operator):
    cluster.apply_base_model("llama3")
    cluster.apply_adapter("math-v1", servedName="math")
    until(operator, lambda: "math" in served(cluster), "math-v1 serves 'math'")
    time.sleep(1.1)  # strictly younger
    cluster.apply_adapter("math-v2", servedName="math", source="s3://adapters/math-v2")
    until(operator, lambda: phase(cluster, "math-v2") == "Failed", "math-v2 refused: name taken")
    cluster.delete("loraadapters", "math-v1")
    until(operator, lambda: served(cluster).get("math") == "s3://adapters/math-v2", "math-v2 now serves 'math'")
    until(operator, lambda: phase(cluster, "math-v2") == "Loading", "math-v2 no longer Failed: its replica loads it")


# ---- an operator whose RBAC lacks one verb it needs ----------------------------------------------------

def rbac_without(rbac: list[dict[str, Any]], resource: str, verb: str, suffix: str, namespace: str
                 ) -> list[dict[str, Any]]:
    """The chart's RBAC minus `verb` on `resource`, for a ServiceAccount of its own in `namespace`, leaving
    the session's operator identity alone: cluster-wide objects get `suffix`, namespaced ones move."""
    account = "loraplex-limited"
    edited = []
    for manifest in rbac:
        manifest = json.loads(json.dumps(manifest))
        meta = manifest["metadata"]
        if manifest["kind"] == "ServiceAccount":
            meta.update(name=account, namespace=namespace)
        elif manifest["kind"] in ("ClusterRole", "ClusterRoleBinding"):
            meta["name"] = f"{meta['name']}-{suffix}"
        else:  # a Role or RoleBinding of the chart's namespace
            meta["namespace"] = namespace
        if manifest["kind"] in ("ClusterRoleBinding", "RoleBinding"):
            if manifest["roleRef"]["kind"] == "ClusterRole":
                manifest["roleRef"]["name"] = f"{manifest['roleRef']['name']}-{suffix}"
            manifest["subjects"] = [{"kind": "ServiceAccount", "name": account, "namespace": namespace}]
        for rule in manifest.get("rules") or []:
            if resource in rule["resources"]:
                rule["verbs"] = [v for v in rule["verbs"] if v != verb]
        edited.append(manifest)
    return edited


@pytest.fixture
def limited_operator_kubeconfig(request, control_plane, api_client, namespace, proxy, tmp_path) -> Iterator[Path]:
    resource, verb = request.param
    suffix = secrets.token_hex(3)
    helm, chart = tool("helm"), ROOT / "charts" / "loraplex"
    rbac = rbac_without(chart_rbac(helm, chart), resource, verb, suffix, namespace)
    direct = install_operator_identity(control_plane, api_client, helm, chart, tmp_path / "limited.kubeconfig",
                                       rbac=rbac)
    yield proxy.write_kubeconfig(tmp_path / "limited-proxy.kubeconfig", kubeconfig_token(direct), namespace)
    authorization = kubernetes.client.RbacAuthorizationV1Api(api_client)
    for manifest in rbac:
        if manifest["kind"] == "ClusterRoleBinding":
            authorization.delete_cluster_role_binding(manifest["metadata"]["name"])
        elif manifest["kind"] == "ClusterRole":
            authorization.delete_cluster_role(manifest["metadata"]["name"])


@pytest.mark.parametrize("limited_operator_kubeconfig", [("deployments", "create")], indirect=True)
def test_missing_permission_to_create_deployments_is_reported_on_the_base_model(
        cluster, start_operator, limited_operator_kubeconfig):
    operator = start_operator(kubeconfig=limited_operator_kubeconfig)
    cluster.apply_base_model("llama3")
    until(operator, lambda: cluster.condition(cluster.base_model("llama3"), "Reconciled")["status"] == "False",
          "Reconciled=False")
    reconciled = cluster.condition(cluster.base_model("llama3"), "Reconciled")
    assert reconciled["reason"] == "ApplyFailed"
    forbidden = (f'User "system:serviceaccount:{cluster.namespace}:loraplex-limited" cannot create resource '
                 f'"deployments" in API group "apps"')
    assert forbidden in reconciled["message"]
    until(operator, lambda: any(e.type == "Warning" and forbidden in e.message for e in cluster.events_for("llama3")),
          "a Warning event naming the missing permission")
    # Everything before the Deployment was applied, and the adapter set does not depend on it.
    assert cluster.core.read_namespaced_service("llama3", cluster.namespace)
    cluster.apply_adapter("math")
    until(operator, lambda: "math" in served(cluster), "adapters still published")


@pytest.mark.parametrize("limited_operator_kubeconfig", [("loraadapters", "patch")], indirect=True)
def test_missing_permission_to_patch_adapters_is_reported(cluster, start_operator, limited_operator_kubeconfig):
    operator = start_operator(kubeconfig=limited_operator_kubeconfig)
    cluster.apply_base_model("llama3")
    cluster.apply_adapter("math")
    forbidden = (f'User "system:serviceaccount:{cluster.namespace}:loraplex-limited" cannot patch resource '
                 f'"loraadapters" in API group "loraplex.io"')
    until(operator, lambda: forbidden in operator.log(), "the operator's log naming the missing permission")
    # What the operator may do, it still does.
    until(operator, lambda: cluster.apps.read_namespaced_deployment("llama3", cluster.namespace), "the Deployment")
