"""Routing on the real control plane, with the operator signed in as the chart's ServiceAccount: before the
Inference Extension's CRDs exist, once they are installed, when someone edits what routing owns, and when
routing is turned off."""

from __future__ import annotations

import json

import pytest
from kubernetes.client import ApiException

from tests.integration.harness import Cluster, OperatorProcess
from tests.integration.test_operator import adapter_set, replicas, until
from tests.integration.test_routing_crds import POOL_CRD, UPSTREAM_CRDS, kubectl_with

pytestmark = pytest.mark.integration
POOLS = ("inference.networking.k8s.io", "v1", "inferencepools")


def routing(cluster: Cluster) -> dict | None:
    return cluster.condition(cluster.base_model("llama3"), "Routing")


def routing_reason(cluster: Cluster) -> str | None:
    return (routing(cluster) or {}).get("reason")


def pool(cluster: Cluster) -> dict | None:
    try:
        return cluster.custom.get_namespaced_custom_object(*POOLS[:2], cluster.namespace, POOLS[2], "llama3")
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def picker_objects(cluster: Cluster) -> dict[str, object | None]:
    """The endpoint picker's objects by kind, None for each that does not exist."""
    ns, name = cluster.namespace, "llama3-epp"
    readers = {"Deployment": cluster.apps.read_namespaced_deployment,
               "Service": cluster.core.read_namespaced_service,
               "ConfigMap": cluster.core.read_namespaced_config_map,
               "ServiceAccount": cluster.core.read_namespaced_service_account,
               "Role": cluster.rbac.read_namespaced_role,
               "RoleBinding": cluster.rbac.read_namespaced_role_binding}
    found: dict[str, object | None] = {}
    for kind, read in readers.items():
        try:
            found[kind] = read(name, ns)
        except ApiException as exc:
            if exc.status != 404:
                raise
            found[kind] = None
    return found


@pytest.fixture
def admin(control_plane, tmp_path):
    return kubectl_with(control_plane.kubeconfig, tmp_path / "admin-cache")


@pytest.fixture
def without_pool_crd(admin):
    """The cluster without the InferencePool CRD, whatever ran before; the vendored CRDs are back afterwards."""
    admin("delete", "crd", POOL_CRD, "--ignore-not-found", "--wait=true")
    yield
    admin("apply", "-f", str(UPSTREAM_CRDS))
    admin("wait", "--for=condition=Established", "--timeout=60s", f"crd/{POOL_CRD}")


def test_routing_waits_for_its_crds_then_follows_the_spec_and_repairs_edits(
        cluster, start_operator, admin, without_pool_crd):
    ns = cluster.namespace
    operator: OperatorProcess = start_operator(resync_seconds=3)
    cluster.apply_base_model("llama3", replicas=2, routing={"endpointPicker": {"failureMode": "FailClose"}})

    # Without the CRD: the model is deployed as usual, and its status and an Event say what routing lacks.
    until(operator, lambda: routing_reason(cluster) == "InferencePoolUnavailable", "Routing: no InferencePool API")
    assert routing(cluster)["status"] == "False"
    assert "install the Gateway API Inference Extension's CRDs" in routing(cluster)["message"]
    assert cluster.condition(cluster.base_model("llama3"), "Reconciled")["status"] == "True"
    assert cluster.apps.read_namespaced_deployment("llama3", ns)
    assert set(picker_objects(cluster).values()) == {None}
    until(operator, lambda: any(e.reason == "InferencePoolUnavailable" for e in cluster.events_for("llama3")),
          "an InferencePoolUnavailable Event")

    # The CRDs installed: the next resync finds them, and routing is applied with the chart's RBAC (which must
    # hold every right the picker's Role grants).
    admin("apply", "-f", str(UPSTREAM_CRDS))
    admin("wait", "--for=condition=Established", "--timeout=60s", f"crd/{POOL_CRD}")
    created = until(operator, lambda: pool(cluster), "the InferencePool", timeout=60)
    assert created["spec"]["endpointPickerRef"] == {"group": "", "kind": "Service", "name": "llama3-epp",
                                                    "port": {"number": 9002}, "failureMode": "FailClose"}
    assert created["metadata"]["ownerReferences"][0]["kind"] == "BaseModelDeployment"
    objects = until(operator, lambda: (found := picker_objects(cluster)) and None not in found.values() and found,
                    "the endpoint picker's objects")
    assert objects["Deployment"].spec.template.spec.service_account_name == "llama3-epp"
    # No kubelet runs the picker here: the status says so rather than claiming routing works.
    until(operator, lambda: routing_reason(cluster) == "EndpointPickerUnavailable", "Routing: picker unavailable")
    assert "refuses requests (failureMode FailClose)" in routing(cluster)["message"]

    # The picker's Deployment and ConfigMap are not the model's: its replica count and adapter set stay its own.
    replicas(operator, cluster, 2)
    until(operator, lambda: cluster.base_model("llama3")["status"]["replicas"] == 2, "replicas=2, the model's pods")
    assert adapter_set(cluster).adapters == []

    # Edits are undone: a deleted picker config at once (its watch), a changed pool at the next resync.
    cluster.core.delete_namespaced_config_map("llama3-epp", ns)
    until(operator, lambda: picker_objects(cluster)["ConfigMap"], "the picker's config recreated")
    cluster.custom.patch_namespaced_custom_object(*POOLS[:2], ns, POOLS[2], "llama3",
                                                  {"spec": {"targetPorts": [{"number": 1234}]}})
    until(operator, lambda: pool(cluster)["spec"]["targetPorts"] == [{"number": 8000}], "the pool's port restored")

    # Routing off: everything it added is deleted, its condition removed, the model left as it was.
    cluster.custom.patch_namespaced_custom_object("loraplex.io", "v1alpha1", ns, "basemodeldeployments", "llama3",
                                                  {"spec": {"routing": None}})
    until(operator, lambda: pool(cluster) is None and set(picker_objects(cluster).values()) == {None},
          "routing's objects deleted")
    until(operator, lambda: routing(cluster) is None, "the Routing condition removed")
    assert cluster.apps.read_namespaced_deployment("llama3", ns).spec.replicas == 2
    assert json.loads(admin("get", "svc", "llama3", "-n", ns, "-o", "json").stdout)["spec"]["ports"][0]["port"] \
        == 8000


def test_a_name_too_long_for_the_pickers_service_is_refused_for_routing_only(cluster, start_operator):
    operator = start_operator()
    name = "m" * 60  # fits the model's own Service (63), not "<name>-epp"
    cluster.apply_base_model(name, routing={})
    until(operator, lambda: (cluster.condition(cluster.base_model(name), "Routing") or {}).get("reason")
          == "InvalidName", "Routing: InvalidName")
    message = cluster.condition(cluster.base_model(name), "Routing")["message"]
    assert "at most 59 characters" in message and f"{name}-epp" in message
    assert cluster.condition(cluster.base_model(name), "Reconciled")["status"] == "True"
    assert cluster.apps.read_namespaced_deployment(name, cluster.namespace)


REWRITES = ("inference.networking.x-k8s.io", "v1alpha2", "inferencemodelrewrites")  # the vendored CRDs' group


def rewrites(cluster: Cluster) -> dict[str, list[tuple[str, int]]]:
    """The model rewrites in the namespace: model name -> [(served name, weight)]."""
    items = cluster.custom.list_namespaced_custom_object(*REWRITES[:2], cluster.namespace, REWRITES[2])["items"]
    return {rule["matches"][0]["model"]["value"]: [(t["modelRewrite"], t["weight"]) for t in rule["targets"]]
            for item in items for rule in item["spec"]["rules"]}


def traffic(cluster: Cluster) -> dict[str, dict]:
    return {m["model"]: m for m in cluster.base_model("llama3").get("status", {}).get("traffic") or []}


def test_versions_share_a_model_name_and_a_failed_version_is_rolled_back(cluster, start_operator, admin):
    admin("apply", "-f", str(UPSTREAM_CRDS))
    admin("wait", "--for=condition=Established", "--timeout=60s", f"crd/{POOL_CRD}",
          "crd/inferencemodelrewrites.inference.networking.x-k8s.io")
    operator = start_operator()
    cluster.apply_base_model("llama3", replicas=2, routing={})
    cluster.apply_adapter("math-v1", traffic={"model": "math", "weight": 90})
    cluster.apply_adapter("math-v2", traffic={"model": "math", "weight": 10})
    pods = replicas(operator, cluster, 2)

    # Nothing is loaded yet: no request for math can be answered, so none is rewritten.
    until(operator, lambda: traffic(cluster).get("math", {}).get("problem")
          == "No adapter naming it is loaded on any replica", "math: nothing loaded yet")
    assert rewrites(cluster) == {}

    for pod in pods:
        cluster.report("math-v1", pod, "Loaded")
    until(operator, lambda: rewrites(cluster) == {"math": [("math-v1", 90)]}, "math -> v1 only")
    for pod in pods:
        cluster.report("math-v2", pod, "Loaded")
    until(operator, lambda: rewrites(cluster) == {"math": [("math-v1", 90), ("math-v2", 10)]}, "math -> v1, v2")
    until(operator, lambda: [t["adapter"] for t in traffic(cluster)["math"]["targets"]] == ["math-v1", "math-v2"],
          "status.traffic: math shared by v1 and v2")

    # The new version fails to load on one replica: it is withdrawn from math's requests, and the status and an
    # Event say so; the old version gets them all.
    cluster.report("math-v2", pods[1], "Failed", reason="LoadFailed", message="the runtime refused it")
    until(operator, lambda: rewrites(cluster) == {"math": [("math-v1", 90)]}, "v2 rolled back")
    until(operator, lambda: traffic(cluster)["math"].get("withheld") == [
        {"adapter": "math-v2", "reason": "it is Failed; the requests go to math-v1"}], "status.traffic: v2 withheld")
    until(operator, lambda: any(e.reason == "TrafficWithdrawn" and "math-v2" in e.message
                                for e in cluster.events_for("llama3")), "a TrafficWithdrawn Event")

    # A model name another adapter serves is not taken from it.
    cluster.apply_adapter("chat", source="s3://adapters/chat")
    cluster.apply_adapter("chat-v2", traffic={"model": "chat"})
    until(operator, lambda: "served name of LoraAdapter chat" in (traffic(cluster).get("chat", {}).get("problem")
                                                                  or ""), "chat: the name is taken")
    assert "chat" not in rewrites(cluster)

    # No adapter shares math any more: its rewrite is deleted.
    for name in ("math-v1", "math-v2"):
        cluster.custom.patch_namespaced_custom_object("loraplex.io", "v1alpha1", cluster.namespace, "loraadapters",
                                                      name, {"spec": {"traffic": None}})
    until(operator, lambda: rewrites(cluster) == {} and "math" not in traffic(cluster), "math's rewrite deleted")
