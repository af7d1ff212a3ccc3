"""What adapter-aware routing renders: the InferencePool of the base model's pods, and its endpoint picker."""

from __future__ import annotations

import yaml

from loraplex.api.types import BaseModelDeploymentSpec
from loraplex.operator import render
from loraplex.operator.routing import SCORERS, endpoint_picker_config, render_routing
from loraplex.operator.settings import OperatorSettings

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
    assert yaml.safe_load(config_map["data"]["config.yaml"]) == endpoint_picker_config()
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == objects["ServiceAccount"]["metadata"]["name"]
    assert container["image"] == "ghcr.io/llm-d/llm-d-router-endpoint-picker:v0.10.0"


def test_the_picker_scores_by_the_adapters_pods_hold_and_every_plugin_it_refers_to_is_declared():
    config = endpoint_picker_config()
    declared = {plugin.get("name", plugin["type"]) for plugin in config["plugins"]}
    [profile] = config["schedulingProfiles"]
    assert {ref["pluginRef"] for ref in profile["plugins"]} <= declared
    weights = {ref["pluginRef"]: ref.get("weight") for ref in profile["plugins"]}
    assert weights["lora-affinity-scorer"] == 4 and dict(SCORERS) == {k: v for k, v in weights.items() if v}
    assert {"max-score-picker", "single-profile-handler"} <= declared


def test_the_picker_may_only_read():
    role = by_kind(render_routing(OWNER, spec(routing={})))["Role"]
    assert {verb for rule in role["rules"] for verb in rule["verbs"]} == {"get", "list", "watch"}
    assert {group for rule in role["rules"] for group in rule["apiGroups"]} == {
        "", "inference.networking.k8s.io", "llm-d.ai", "inference.networking.x-k8s.io"}
