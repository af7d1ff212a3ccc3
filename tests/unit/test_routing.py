"""What adapter-aware routing renders: the InferencePool of the base model's pods, and its endpoint picker."""

from __future__ import annotations

import asyncio

import pytest
import yaml

from loraplex.api.conditions import condition
from loraplex.api.contract import RESIDENCY_METRIC, SIDECAR_PORT
from loraplex.api.types import BaseModelDeploymentSpec, Runtime
from loraplex.kube import NotFound
from loraplex.operator import render
from loraplex.operator.routing import (
    SCORERS,
    endpoint_picker_config,
    render_routing,
    routing_condition,
    routing_name_problem,
    routing_object_refs,
)
from loraplex.operator.routing_runs import discover_routing_apis
from loraplex.operator.settings import OperatorSettings
from tests.epp_scorer import LoraMetrics, lora_affinity_score

OWNER = {"apiVersion": "loraplex.io/v1alpha1", "kind": "BaseModelDeployment",
         "metadata": {"name": "llama3", "namespace": "inference", "uid": "uid-1"}}


def spec(**fields):
    return BaseModelDeploymentSpec.model_validate(
        {"model": "meta/llama3", "runtime": "vllm", "image": "vllm/vllm-openai:v0.11.0", "port": 8080, **fields})


def by_kind(objects):
    return {o["kind"]: o for o in objects}


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def test_without_routing_nothing_is_rendered():
    assert render_routing(OWNER, spec()) == []


def test_the_pool_selects_the_inference_pods_on_their_port_and_calls_the_picker_service():
    objects = by_kind(render_routing(OWNER, spec(routing={"endpointPicker": {"failureMode": "FailClose"}})))
    pool = objects["InferencePool"]
    inference_pods = render.render_deployment(OWNER, spec(), OperatorSettings())["spec"]["template"]["metadata"]
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1" and pool["metadata"]["name"] == "llama3"
    assert selects(pool["spec"]["selector"]["matchLabels"], inference_pods["labels"])
    assert pool["spec"]["targetPorts"] == [{"number": 8080}]
    service = objects["Service"]
    assert pool["spec"]["endpointPickerRef"] == {"name": service["metadata"]["name"], "port": {"number": 9002},
                                                 "failureMode": "FailClose"}
    assert {"name": "grpc-ext-proc", "port": 9002, "targetPort": "grpc", "protocol": "TCP",
            "appProtocol": "kubernetes.io/h2c"} in service["spec"]["ports"]


def test_the_pickers_pods_are_neither_in_the_pool_nor_behind_the_models_service_nor_counted_as_replicas():
    objects = by_kind(render_routing(OWNER, spec(routing={})))
    picker_pods = objects["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert not selects(objects["InferencePool"]["spec"]["selector"]["matchLabels"], picker_pods)
    assert not selects(render.render_service(OWNER, spec())["spec"]["selector"], picker_pods)
    assert "loraplex.io/base-model" not in picker_pods
    assert selects(objects["Service"]["spec"]["selector"], picker_pods)
    assert selects(objects["Deployment"]["spec"]["selector"]["matchLabels"], picker_pods)


def test_the_picker_runs_on_its_pool_with_its_config_mounted():
    objects = by_kind(render_routing(OWNER, spec(routing={})))
    deployment = objects["Deployment"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    flags = dict(zip(args[::2], args[1::2], strict=False))
    assert (flags["--pool-name"], flags["--pool-namespace"], flags["--pool-group"]) == (
        "llama3", "inference", "inference.networking.k8s.io")
    assert flags["--config-file"] == "/config/config.yaml"
    config_map = objects["ConfigMap"]
    assert deployment["spec"]["template"]["spec"]["volumes"] == [
        {"name": "config", "configMap": {"name": config_map["metadata"]["name"]}}]
    assert yaml.safe_load(config_map["data"]["config.yaml"]) == endpoint_picker_config(Runtime.VLLM)
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == objects["ServiceAccount"]["metadata"]["name"]
    assert container["image"] == "ghcr.io/llm-d/llm-d-router-endpoint-picker:v0.10.0"


@pytest.mark.parametrize("runtime", list(Runtime))
def test_the_picker_scores_by_the_adapters_pods_hold_and_every_plugin_it_refers_to_is_declared(runtime):
    config = endpoint_picker_config(runtime)
    names = [plugin["name"] for plugin in config["plugins"]]
    declared = set(names)
    assert len(names) == len(declared)  # the picker refuses duplicate names
    [profile] = config["schedulingProfiles"]
    assert {ref["pluginRef"] for ref in profile["plugins"]} <= declared
    sources = config["dataLayer"]["sources"]
    assert {s["pluginRef"] for s in sources} | {e["pluginRef"] for s in sources for e in s["extractors"]} <= declared
    weights = {ref["pluginRef"]: ref.get("weight") for ref in profile["plugins"]}
    assert weights["lora-affinity-scorer"] > 0 and dict(SCORERS) == {k: v for k, v in weights.items() if v}
    assert {"max-score-picker", "single-profile-handler"} <= declared


def test_the_picker_may_only_read():
    role = by_kind(render_routing(OWNER, spec(routing={})))["Role"]
    assert {verb for rule in role["rules"] for verb in rule["verbs"]} == {"get", "list", "watch"}
    assert {group for rule in role["rules"] for group in rule["apiGroups"]} == {
        "", "inference.networking.k8s.io", "llm-d.ai", "inference.networking.x-k8s.io"}


def test_routing_condition_is_absent_without_routing_and_says_what_is_missing_with_it():
    assert routing_condition(spec(), None, None, "llama3", 3) is None
    assert routing_condition(None, None, None, "llama3", 3) is None
    on = spec(routing={})
    problem = ("InferencePoolUnavailable", "The cluster does not serve inferencepools.")
    assert routing_condition(on, problem, {"status": {"availableReplicas": 1}}, "llama3", 3) \
        == condition("Routing", False, *problem, 3)
    missing = routing_condition(on, None, None, "llama3", 3)
    assert (missing["status"], missing["reason"]) == ("False", "EndpointPickerMissing")
    starting = routing_condition(on, None, {"status": {"replicas": 1}}, "llama3", 3)
    assert (starting["status"], starting["reason"]) == ("False", "EndpointPickerUnavailable")
    assert "sends requests to any replica (failureMode FailOpen)" in starting["message"]
    routed = routing_condition(on, None, {"status": {"availableReplicas": 1}}, "llama3", 3)
    assert (routed["status"], routed["reason"]) == ("True", "EndpointPickerAvailable")
    assert "llama3-epp" in routed["message"]


@pytest.mark.parametrize(("length", "problem"), [(59, False), (60, True)])
def test_routing_needs_room_in_the_name_for_the_pickers_service(length, problem):
    name = "m" * length
    found = routing_name_problem(name)
    assert (found is not None) == problem
    if problem:
        assert "at most 59 characters" in found and len(f"{name}-epp") == 63 + 1


def test_every_object_routing_renders_is_pruned_by_kind_and_name():
    rendered = {(o["apiVersion"], o["kind"], o["metadata"]["name"]) for o in render_routing(OWNER, spec(routing={}))}
    assert set(routing_object_refs(OWNER, spec())) == rendered  # from a spec whose routing was removed


class FakeDiscovery:
    def __init__(self, answers):
        self.answers = answers  # group/version -> its resources' names

    async def get(self, path):
        resources = self.answers.get(path.removeprefix("/apis/"))
        if resources is None:
            raise NotFound(404, "NotFound", "the server could not find the requested resource")
        return {"resources": [{"name": name} for name in resources]}


POOL_API = "inference.networking.k8s.io/v1"
LLMD, XK8S = "llm-d.ai/v1alpha2", "inference.networking.x-k8s.io/v1alpha2"


@pytest.mark.parametrize(("answers", "pool", "rewrite"), [
    ({}, False, None),
    ({POOL_API: ["inferencepools", "inferencepools/status"]}, True, None),
    ({POOL_API: ["somethingelse"]}, False, None),
    ({POOL_API: ["inferencepools"], XK8S: ["inferenceobjectives", "inferencemodelrewrites"]}, True, XK8S),
    ({POOL_API: ["inferencepools"], XK8S: ["inferencemodelrewrites"], LLMD: ["inferencemodelrewrites"]}, True, LLMD),
    ({LLMD: ["inferenceobjectives"], XK8S: ["inferencemodelrewrites"]}, False, XK8S),
])
def test_the_routing_apis_are_discovered_and_llm_d_preferred_as_the_picker_does(answers, pool, rewrite):
    apis = asyncio.run(discover_routing_apis(FakeDiscovery(answers)))
    assert (apis.inference_pool, apis.model_rewrite) == (pool, rewrite)


def plugin(config, name):
    return next(p for p in config["plugins"] if p["name"] == name)


@pytest.mark.parametrize(("runtime", "path", "queue"), [
    (Runtime.VLLM, "/metrics", "vllm:num_requests_waiting"), (Runtime.NIM, "/v1/metrics", "num_requests_waiting")])
def test_the_picker_reads_load_from_the_runtime_and_residency_only_from_the_sidecar(runtime, path, queue):
    config = endpoint_picker_config(runtime)
    # No source of the picker's own, which would read the runtime's LoRA metric over the sidecar's residency.
    assert config["dataLayer"]["injectDefaults"] is False
    runtime_source, residency_source = (plugin(config, s["pluginRef"]) for s in config["dataLayer"]["sources"])
    assert runtime_source["parameters"] == {"scheme": "http", "path": path}  # the pool's target port
    assert residency_source["parameters"] == {"scheme": "http", "path": "/metrics", "port": SIDECAR_PORT}
    [engine] = plugin(config, "runtime-metrics-extractor")["parameters"]["engineConfigs"]
    # An engine given here replaces the built-in one of that name whole: every load metric is restated.
    assert engine["loraSpec"] == "" and engine["queuedRequestsSpec"] == queue and engine["kvUsageSpec"]
    residency = plugin(config, "lora-residency-extractor")["parameters"]
    names = [e["name"] for e in residency["engineConfigs"]]
    assert len(names) == len(set(names))  # the picker refuses an engine defined twice
    assert set(names) >= {"vllm", "sglang", "trtllm-serve", "triton", "triton-tensorrt-llm", engine["name"],
                          residency["defaultEngine"]}
    assert all(e == {"name": e["name"], "loraSpec": RESIDENCY_METRIC} for e in residency["engineConfigs"])


def test_a_pod_holding_the_adapter_wins_over_any_other_whatever_the_load():
    """The profile's total, as the picker sums it (each scorer clamped to 0..1 times its weight), on residency as the
    sidecar publishes it: the holder at its busiest against the best other pods, by the picker's own rule."""
    weights = dict(SCORERS)
    load = sum(weight for name, weight in weights.items() if name != "lora-affinity-scorer")

    def total(residency: LoraMetrics, load_scores: float) -> float:
        return weights["lora-affinity-scorer"] * lora_affinity_score(residency, "math") + load_scores * load

    holder = LoraMetrics(active=frozenset({"math", "chat"}), waiting=frozenset(), max_active=2)
    loading = LoraMetrics(active=frozenset({"chat"}), waiting=frozenset({"math"}), max_active=2)
    other = LoraMetrics(active=frozenset({"chat"}), waiting=frozenset(), max_active=1)
    empty = LoraMetrics(active=frozenset(), waiting=frozenset(), max_active=0)
    assert total(holder, 0.0) > total(loading, 1.0) > total(other, 1.0) == total(empty, 1.0)
