"""The real operator process against the API emulator: what a user of the CRDs sees."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import kubernetes
import pytest
import yaml

from loraplex.api.adapter_set import AdapterSet
from tests.conftest import ROOT
from tests.integration.harness import Cluster, OperatorProcess, wait_for
from tests.kube_emulator import EmulatorThread

pytestmark = pytest.mark.integration


@pytest.fixture
def cluster(api_client, crds_installed) -> Cluster:
    return Cluster(api_client)


@pytest.fixture
def operator(kubeconfig: Path, tmp_path: Path, crds_installed) -> Iterator[OperatorProcess]:
    process = OperatorProcess(kubeconfig, tmp_path / "operator.log").start()
    yield process
    process.stop()


def until(operator: OperatorProcess, predicate, what: str, timeout: float = 20.0):
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


def test_vllm_base_model_gets_deployment_service_rbac_and_status(cluster, operator):
    cluster.apply_base_model("llama3", replicas=2, lora={"maxGpuLoras": 4, "maxCpuLoras": 8, "maxRank": 16})
    deployment = until(operator, lambda: cluster.apps.read_namespaced_deployment("llama3", "default"),
                       "the Deployment")
    inference = deployment.spec.template.spec.containers[0]
    assert inference.args[:1] == ["meta/llama3-8b-instruct"]
    assert [flag(inference.args, f) for f in ("--max-loras", "--max-cpu-loras", "--max-lora-rank")] \
        == ["4", "8", "16"]
    assert "--enable-lora" in inference.args
    assert {e.name: e.value for e in inference.env}["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert deployment.spec.replicas == 2
    assert [c.name for c in deployment.spec.template.spec.containers] == ["inference", "loraplex-sidecar"]
    assert deployment.metadata.owner_references[0].kind == "BaseModelDeployment"

    assert cluster.core.read_namespaced_service("llama3", "default").spec.ports[0].port == 8000
    assert cluster.core.read_namespaced_service_account("llama3-loraplex", "default")
    role = cluster.rbac.read_namespaced_role("llama3-loraplex-sidecar", "default")
    assert role.rules[0].resource_names == ["llama3-adapters"]
    assert cluster.rbac.read_namespaced_role_binding("llama3-loraplex-sidecar", "default").subjects[0].name \
        == "llama3-loraplex"
    assert adapter_set(cluster).adapters == []

    status = until(operator, lambda: cluster.base_model("llama3").get("status"), "base model status")
    assert status["observedGeneration"] == 1
    assert status["endpoint"] == "http://llama3.default.svc.cluster.local:8000/v1"
    assert cluster.condition(cluster.base_model("llama3"), "Reconciled")["status"] == "True"
    ready = cluster.condition(cluster.base_model("llama3"), "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "ReplicasNotReady")

    # The Deployment controller reports readiness; the base model follows.
    cluster.apps.patch_namespaced_deployment_status("llama3", "default",
                                                    {"status": {"replicas": 2, "readyReplicas": 2}})
    until(operator, lambda: cluster.base_model("llama3")["status"]["readyReplicas"] == 2, "readyReplicas=2")
    assert cluster.condition(cluster.base_model("llama3"), "Ready")["status"] == "True"


def test_nim_base_model_gets_the_documented_environment(cluster, operator):
    cluster.apply_base_model("nim-llama", runtime="nim", image="nvcr.io/nim/meta/llama3-8b-instruct:1.0.0",
                             envFromSecrets=["ngc-api"], lora={"maxRank": 32, "refreshIntervalSeconds": 5})
    deployment = until(operator, lambda: cluster.apps.read_namespaced_deployment("nim-llama", "default"),
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
    template_version = cluster.apps.read_namespaced_deployment("llama3", "default").metadata.resource_version

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
    assert cluster.apps.read_namespaced_deployment("llama3", "default").metadata.resource_version \
        == template_version


def test_edited_or_deleted_adapter_set_is_put_back(cluster, operator):
    cluster.apply_base_model("llama3")
    cluster.apply_adapter("math")
    until(operator, lambda: served(cluster) == {"math": "s3://adapters/math"}, "math in the desired set")
    label = "app.kubernetes.io/managed-by"

    cluster.core.patch_namespaced_config_map("llama3-adapters", "default", {"data": {"adapters.json": "{}"}})
    until(operator, lambda: served(cluster) == {"math": "s3://adapters/math"}, "edited data put back")
    cluster.core.patch_namespaced_config_map("llama3-adapters", "default", {"metadata": {"labels": {label: "me"}}})
    until(operator, lambda: cluster.core.read_namespaced_config_map(
        "llama3-adapters", "default").metadata.labels[label] == "loraplex", "edited label put back")
    cluster.core.delete_namespaced_config_map("llama3-adapters", "default")
    until(operator, lambda: served(cluster) == {"math": "s3://adapters/math"}, "deleted adapter set recreated")

    cluster.apply_adapter("squad")  # and the operator still follows adapters afterwards
    until(operator, lambda: set(served(cluster)) == {"math", "squad"}, "squad added")


def test_adapters_that_do_not_fit_the_adapter_set_wait_for_room(cluster, kubeconfig, tmp_path, crds_installed):
    operator = OperatorProcess(kubeconfig, tmp_path / "operator.log",
                               env={"LORAPLEX_ADAPTER_SET_MAX_BYTES": "500"}).start()
    try:
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
        data = cluster.core.read_namespaced_config_map("llama3-adapters", "default").data["adapters.json"]
        assert len(data) <= 500
        waiting = names[len(fitted)]
        assert phase(cluster, waiting) == "Pending"
        assert "adapter set of base model 'llama3' is full" in cluster.condition(
            cluster.adapter(waiting), "Ready")["message"]
        events = cluster.core.list_namespaced_event("default").items
        assert any(e.reason == "AdapterSetFull" and e.involved_object.name == "llama3" for e in events)

        cluster.delete("loraadapters", "a1")
        until(operator, lambda: waiting in served(cluster) and "a1" not in served(cluster), "room made for the next")
        until(operator, lambda: cluster.condition(cluster.adapter(waiting), "Ready")["reason"] == "NoReplicas",
              "no longer waiting for room")
    finally:
        operator.stop()


def test_readiness_aggregates_per_replica_reports(cluster, operator):
    cluster.apply_base_model("llama3", replicas=2)
    cluster.add_pod("llama3-a")
    cluster.add_pod("llama3-b")
    cluster.apply_adapter("math")
    until(operator, lambda: cluster.adapter("math")["status"]["replicas"] == 2, "two replicas counted")
    assert phase(cluster, "math") == "Loading"

    cluster.report("math", "llama3-a", "Loaded", format="hf", rank=16, targetModules=["q_proj", "v_proj"],
                   sizeBytes=1234)
    until(operator, lambda: cluster.adapter("math")["status"]["readyReplicas"] == 1, "one replica ready")
    assert phase(cluster, "math") == "Loading"
    cluster.report("math", "llama3-b", "Loaded", format="hf", rank=16, targetModules=["q_proj", "v_proj"],
                   sizeBytes=1234)
    until(operator, lambda: phase(cluster, "math") == "Ready", "adapter Ready")
    status = cluster.adapter("math")["status"]
    assert (status["format"], status["rank"], status["sizeBytes"]) == ("hf", 16, 1234)
    assert cluster.condition(cluster.adapter("math"), "Ready")["status"] == "True"
    until(operator, lambda: cluster.base_model("llama3")["status"]["adaptersReady"] == 1, "base model counts it")
    until(operator, lambda: any(e.reason == "Loaded" for e in cluster.events_for("math")), "a Ready event")
    metrics = operator.metrics()
    assert 'loraplex_operator_adapters{phase="Ready"} 1.0' in metrics
    assert 'loraplex_operator_reconciles_total{kind="adapter",result="ok"}' in metrics

    # A replica goes away: its report is pruned and the adapter is judged on the rest.
    cluster.delete_pod("llama3-b")
    until(operator, lambda: "llama3-b" not in cluster.adapter("math")["status"]["replicaStatus"],
          "stale replica pruned")
    assert cluster.adapter("math")["status"]["replicas"] == 1
    assert phase(cluster, "math") == "Ready"

    # One replica failing fails the adapter with that replica's reason.
    cluster.report("math", "llama3-a", "Failed", reason="ValidationFailed",
                   message="adapter_config.json: r=128 exceeds this base model's maxLoraRank 64")
    until(operator, lambda: phase(cluster, "math") == "Failed", "adapter Failed")
    ready = cluster.condition(cluster.adapter("math"), "Ready")
    assert ready["reason"] == "ValidationFailed" and "r=128" in ready["message"]
    assert cluster.condition(cluster.adapter("math"), "Validated")["status"] == "False"
    until(operator, lambda: any(e.type == "Warning" and "r=128" in e.message for e in cluster.events_for("math")),
          "a Warning event naming the problem")


def test_deletion_waits_for_every_replica_to_unload(cluster, operator):
    cluster.apply_base_model("llama3", replicas=2)
    cluster.add_pod("llama3-a")
    cluster.add_pod("llama3-b")
    cluster.apply_adapter("math")
    until(operator, lambda: "loraplex.io/adapter-cleanup" in cluster.adapter("math")["metadata"]["finalizers"],
          "the cleanup finalizer")
    cluster.report("math", "llama3-a", "Loaded")
    cluster.report("math", "llama3-b", "Loaded")
    until(operator, lambda: phase(cluster, "math") == "Ready", "Ready before deletion")

    cluster.delete("loraadapters", "math")
    until(operator, lambda: "math" not in served(cluster), "removed from the desired set")
    until(operator, lambda: phase(cluster, "math") == "Terminating", "Terminating")
    cluster.report("math", "llama3-a", None)  # replica a unloaded it and deleted its files
    time.sleep(1.0)
    assert cluster.exists("loraadapters", "math"), "released before replica b unloaded"
    assert "llama3-b" in cluster.condition(cluster.adapter("math"), "Ready")["message"]
    cluster.report("math", "llama3-b", None)
    until(operator, lambda: not cluster.exists("loraadapters", "math"), "the finalizer released")


@pytest.mark.parametrize(("spec", "reason", "phrase"), [
    ({"expectedRank": 128}, "RankTooHigh", "expectedRank 128 exceeds base model 'llama3' lora.maxRank 64"),
    ({"format": "nemo"}, "FormatNotAllowed", "format nemo is not accepted by base model 'llama3'"),
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
    until(operator, lambda: cluster.condition(cluster.adapter("math"), "Ready")["reason"] == "NoReplicas",
          "waiting for replicas instead")

    cluster.delete("basemodeldeployments", "llama3")
    until(operator, lambda: cluster.condition(cluster.adapter("math"), "Ready")["reason"] == "BaseModelNotFound",
          "back to waiting for the base model")
    until(operator, lambda: not cluster.apps.list_namespaced_deployment("default").items,
          "owned objects garbage-collected")
    cluster.delete("loraadapters", "math")
    until(operator, lambda: not cluster.exists("loraadapters", "math"), "deletable without a base model")


def test_invalid_base_model_spec_is_reported_and_leaves_the_running_deployment_alone(cluster, operator):
    cluster.apply_base_model("llama3", lora={"maxRank": 64})
    before = until(operator, lambda: cluster.apps.read_namespaced_deployment("llama3", "default"), "Deployment")
    cluster.apply_base_model("llama3", lora={"maxRank": 1024})
    until(operator, lambda: cluster.condition(cluster.base_model("llama3"), "Reconciled")["status"] == "False",
          "Reconciled=False")
    reconciled = cluster.condition(cluster.base_model("llama3"), "Reconciled")
    assert reconciled["reason"] == "InvalidSpec"
    assert "exceeds vLLM's largest --max-lora-rank 512" in reconciled["message"]
    assert reconciled["observedGeneration"] == 2
    until(operator, lambda: any(e.reason == "InvalidSpec" for e in cluster.events_for("llama3")), "a Warning")
    after = cluster.apps.read_namespaced_deployment("llama3", "default")
    assert after.metadata.resource_version == before.metadata.resource_version


def test_spec_change_rolls_the_deployment_and_drift_is_repaired(cluster, operator):
    cluster.apply_base_model("llama3")
    until(operator, lambda: cluster.apps.read_namespaced_deployment("llama3", "default"), "Deployment")
    cluster.apply_base_model("llama3", lora={"maxGpuLoras": 2, "maxCpuLoras": 4})
    until(operator, lambda: flag(cluster.apps.read_namespaced_deployment(
        "llama3", "default").spec.template.spec.containers[0].args, "--max-loras") == "2", "new flags rolled out")

    cluster.core.delete_namespaced_service("llama3", "default")
    until(operator, lambda: cluster.core.read_namespaced_service("llama3", "default"), "Service recreated")
    cluster.apps.patch_namespaced_deployment("llama3", "default", {"spec": {"replicas": 7},
                                                                   "metadata": {"labels": {"team": "a"}}})
    until(operator, lambda: cluster.apps.read_namespaced_deployment("llama3", "default").spec.replicas == 1,
          "replicas reverted to the spec")
    assert cluster.apps.read_namespaced_deployment("llama3", "default").metadata.labels["team"] == "a"


def test_conflicts_are_retried(cluster, operator, emulator: EmulatorThread):
    cluster.apply_base_model("llama3")
    until(operator, lambda: cluster.base_model("llama3").get("status"), "base model reconciled")
    emulator.call(emulator.store.inject_conflicts, "patch", "loraadapters.loraplex.io", 3)
    emulator.call(emulator.store.inject_conflicts, "update", "configmaps", 2)
    cluster.apply_adapter("math")
    until(operator, lambda: "loraplex.io/adapter-cleanup" in cluster.adapter("math")["metadata"]["finalizers"],
          "finalizer added despite conflicts")
    until(operator, lambda: "math" in served(cluster), "adapter set written despite conflicts")
    assert emulator.call(lambda: emulator.store.injected_conflicts[("patch", "loraadapters.loraplex.io")]) == 0


def test_operator_restart_converges_without_duplicates(cluster, operator, kubeconfig, tmp_path):
    cluster.apply_base_model("llama3")
    cluster.add_pod("llama3-a")
    cluster.apply_adapter("math")
    cluster.apply_adapter("squad")
    until(operator, lambda: set(served(cluster)) == {"math", "squad"}, "first convergence")
    cluster.report("squad", "llama3-a", "Loaded")
    operator.kill()

    # While it is down: one adapter added, one deleted (held by its finalizer), the model changed.
    cluster.apply_adapter("pubmedqa")
    cluster.delete("loraadapters", "squad")
    cluster.apply_base_model("llama3", lora={"maxRank": 32})
    assert cluster.exists("loraadapters", "squad")

    restarted = OperatorProcess(kubeconfig, tmp_path / "operator-2.log").start()
    try:
        until(restarted, lambda: set(served(cluster)) == {"math", "pubmedqa"}, "desired set after restart")
        until(restarted, lambda: adapter_set(cluster).limits.max_rank == 32, "new limits published")
        cluster.report("squad", "llama3-a", None)
        until(restarted, lambda: not cluster.exists("loraadapters", "squad"), "deletion finished after restart")
        assert len(cluster.apps.list_namespaced_deployment("default").items) == 1
        assert len(cluster.core.list_namespaced_config_map("default").items) == 1
        finalizers = cluster.adapter("math")["metadata"]["finalizers"]
        assert finalizers == ["loraplex.io/adapter-cleanup"]
    finally:
        restarted.stop()


def test_nothing_changes_once_converged(cluster, kubeconfig, tmp_path, emulator: EmulatorThread):
    """GitOps tools must see no drift: no status churn and no writes while nothing changes, resyncs included."""
    operator = OperatorProcess(kubeconfig, tmp_path / "operator.log", resync_seconds=3).start()
    try:
        _converge_then_stay_still(cluster, operator, emulator)
    finally:
        operator.stop()


def _converge_then_stay_still(cluster: Cluster, operator: OperatorProcess, emulator: EmulatorThread) -> None:
    cluster.apply_base_model("llama3", replicas=1)
    cluster.add_pod("llama3-a")
    cluster.apply_adapter("math")
    cluster.apply_adapter("bad", expectedRank=999)
    until(operator, lambda: phase(cluster, "math") == "Loading" and phase(cluster, "bad") == "Failed", "converged")
    time.sleep(2)
    versions = {name: cluster.adapter(name)["metadata"]["resourceVersion"] for name in ("math", "bad")}
    versions["llama3"] = cluster.base_model("llama3")["metadata"]["resourceVersion"]
    writes_before = _writes(emulator)
    time.sleep(7)  # more than two full resync passes (3 s each in tests)
    assert {name: cluster.adapter(name)["metadata"]["resourceVersion"] for name in ("math", "bad")} \
        == {k: v for k, v in versions.items() if k != "llama3"}
    assert cluster.base_model("llama3")["metadata"]["resourceVersion"] == versions["llama3"]
    assert _writes(emulator) == writes_before
    spec_before = json.dumps(cluster.adapter("math")["spec"], sort_keys=True)
    assert json.dumps(cluster.adapter("math")["spec"], sort_keys=True) == spec_before


def _writes(emulator: EmulatorThread) -> dict:
    counts = emulator.call(lambda: dict(emulator.store.request_counts))
    return {key: n for key, n in counts.items() if key[0] in ("create", "update", "patch", "delete")}


def test_two_replicas_with_peering_never_both_act(api_client, crds_installed, kubeconfig, tmp_path):
    """Leader election as the chart runs it: only the highest-priority live replica reconciles."""
    extensions = kubernetes.client.ApiextensionsV1Api(api_client)
    for crd in yaml.safe_load_all((ROOT / "charts" / "loraplex" / "crds" / "kopfpeerings.yaml").read_text()):
        extensions.create_custom_resource_definition(crd)
    kubernetes.client.CustomObjectsApi(api_client).create_namespaced_custom_object(
        "kopf.dev", "v1", "default", "kopfpeerings", {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering",
                                                      "metadata": {"name": "loraplex"}})
    cluster = Cluster(api_client)
    leader = OperatorProcess(kubeconfig, tmp_path / "leader.log", peering=("loraplex", 200)).start()
    standby = OperatorProcess(kubeconfig, tmp_path / "standby.log", peering=("loraplex", 100)).start()
    try:
        # Replicas start paused; the highest-priority one resumes once it has seen its peers.
        until(leader, lambda: "Resuming operations" in leader.log(), "the leader becomes active", timeout=30)
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
        until(standby, lambda: "math" in served(cluster), "the standby takes over", timeout=30)
    finally:
        leader.stop()
        standby.stop()


def test_freeing_a_served_name_accepts_the_adapter_that_waited_for_it(cluster, operator):
    cluster.apply_base_model("llama3")
    cluster.apply_adapter("math-v1", servedName="math")
    until(operator, lambda: "math" in served(cluster), "math-v1 serves 'math'")
    time.sleep(1.1)  # strictly younger
    cluster.apply_adapter("math-v2", servedName="math", source="s3://adapters/math-v2")
    until(operator, lambda: phase(cluster, "math-v2") == "Failed", "math-v2 refused: name taken")
    cluster.delete("loraadapters", "math-v1")
    until(operator, lambda: served(cluster).get("math") == "s3://adapters/math-v2", "math-v2 now serves 'math'")
    until(operator, lambda: phase(cluster, "math-v2") == "Pending", "math-v2 no longer Failed")
