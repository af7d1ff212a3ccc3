"""What adapter-aware routing adds to a BaseModelDeployment: an InferencePool of its pods (Gateway API Inference
Extension, inference.networking.k8s.io/v1) and the endpoint picker the pool calls, with the picker's config,
Service and least-privilege RBAC. Pure; names and flags as docs/routing/upstream.md records them upstream.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from typing import Any

import yaml

from loraplex.api.conditions import condition
from loraplex.api.contract import RESIDENCY_METRIC, SIDECAR_PORT
from loraplex.api.types import BaseModelDeploymentSpec, RoutingSpec, Runtime, TrafficTarget
from loraplex.operator.naming import MANAGED_BY, MAX_NAME_LENGTH, ChildNames, object_metadata, selector_labels

POOL_GROUP = "inference.networking.k8s.io"
POOL_API_VERSION = f"{POOL_GROUP}/v1"
# InferenceObjective and InferenceModelRewrite: the picker reads llm-d.ai, and the older group when that is absent.
OBJECTIVE_GROUPS = ("llm-d.ai", "inference.networking.x-k8s.io")
OBJECTIVE_VERSION = "v1alpha2"
MODEL_ANNOTATION = "loraplex.io/model"
CONFIG_HASH_ANNOTATION = "loraplex.io/config-hash"
PICKER_CONFIG_API_VERSION = "llm-d.ai/v1alpha1"
EXT_PROC_PORT, HEALTH_PORT, METRICS_PORT = 9002, 9003, 9090
CONFIG_FILE = "config.yaml"
# The scorers and weights. Queue, KV cache and prefix cache as in the picker's own default; the adapter scorer
# outweighs them all: under loraplex a pod answers only for the adapters placed on it, so their load must only
# choose among the pods that hold the adapter. Each scorer gives 0..1, and the adapter scorer gives 1 to a pod
# holding it, 0.6 to one still loading it and 0 to the rest, so a weight above 2.5 times the others' sum makes a
# holder outrank a loading pod, and a loading pod any other, whatever their load (tests/unit/test_routing.py).
LOAD_SCORERS = (("queue-scorer", 2), ("kv-cache-utilization-scorer", 2), ("prefix-cache-scorer", 3))
LORA_AFFINITY_WEIGHT = sum(weight for _, weight in LOAD_SCORERS) * 5 // 2 + 1
SCORERS = (*LOAD_SCORERS, ("lora-affinity-scorer", LORA_AFFINITY_WEIGHT))
COMPONENT = "endpoint-picker"
PICKER_STARTING = frozenset({"EndpointPickerMissing", "EndpointPickerUnavailable"})


def picker_labels(base_model: str) -> dict[str, str]:
    """The picker's pods: without the base-model label, which would make them inference pods of the pool, the
    Service and the operator's replica count."""
    return {"app.kubernetes.io/name": "loraplex-endpoint-picker", "app.kubernetes.io/instance": base_model,
            "app.kubernetes.io/managed-by": MANAGED_BY}


def render_inference_pool(owner: dict[str, Any], spec: BaseModelDeploymentSpec, routing: RoutingSpec
                          ) -> dict[str, Any]:
    names = ChildNames(owner["metadata"]["name"])
    return {
        "apiVersion": POOL_API_VERSION,
        "kind": "InferencePool",
        "metadata": object_metadata(owner, names.inference_pool, "inference-pool"),
        "spec": {
            "selector": {"matchLabels": selector_labels(names.base_model)},
            "targetPorts": [{"number": spec.port}],
            "endpointPickerRef": {"name": names.endpoint_picker, "port": {"number": EXT_PROC_PORT},
                                  "failureMode": routing.endpoint_picker.failure_mode},
        },
    }


@dataclasses.dataclass(frozen=True)
class EngineMetrics:
    """Where the picker reads a runtime's load (its core-metrics-extractor engine, docs/routing/upstream.md g)."""

    engine: str
    path: str
    specs: dict[str, str]


ENGINE_METRICS = {
    Runtime.VLLM: EngineMetrics("vllm", "/metrics", {
        "queuedRequestsSpec": "vllm:num_requests_waiting", "runningRequestsSpec": "vllm:num_requests_running",
        "kvUsageSpec": "vllm:kv_cache_usage_perc", "cacheInfoSpec": "vllm:cache_config_info"}),
    Runtime.NIM: EngineMetrics("nim", "/v1/metrics", {
        "queuedRequestsSpec": "num_requests_waiting", "runningRequestsSpec": "num_requests_running",
        "kvUsageSpec": "gpu_cache_usage_perc"}),
}
# The picker's built-in engines, each selected by a pod label; the residency extractor redefines them all, so
# that whatever engine a pod is labelled with, it reads nothing but residency from the sidecar.
BUILT_IN_ENGINES = ("vllm", "sglang", "trtllm-serve", "triton-tensorrt-llm", "triton")
RESIDENCY_ENGINE = "loraplex"


def endpoint_picker_config(runtime: Runtime) -> dict[str, Any]:
    """The picker's EndpointPickerConfig: one profile scoring pods by queue, KV cache, prefix cache and the
    adapters they hold, the best score winning. Load comes from the runtime's metrics; which adapters a pod
    holds comes only from its sidecar's residency gauge, never from the runtime's own LoRA metric, which
    forgets idle adapters (docs/routing/residency.md)."""
    engine = ENGINE_METRICS[runtime]
    runtime_extractor = {"defaultEngine": engine.engine,
                         "engineConfigs": [{"name": engine.engine, **engine.specs, "loraSpec": ""}]}
    residency_extractor = {"defaultEngine": RESIDENCY_ENGINE, "engineConfigs": [
        {"name": name, "loraSpec": RESIDENCY_METRIC}
        for name in dict.fromkeys((RESIDENCY_ENGINE, engine.engine, *BUILT_IN_ENGINES))]}
    plugins: list[dict[str, Any]] = [
        *({"name": scorer, "type": scorer} for scorer, _ in SCORERS),
        {"name": "max-score-picker", "type": "max-score-picker"},
        {"name": "single-profile-handler", "type": "single-profile-handler"},
        {"name": "runtime-metrics", "type": "metrics-data-source",
         "parameters": {"scheme": "http", "path": engine.path}},
        {"name": "runtime-metrics-extractor", "type": "core-metrics-extractor", "parameters": runtime_extractor},
        {"name": "lora-residency", "type": "metrics-data-source",
         "parameters": {"scheme": "http", "path": "/metrics", "port": SIDECAR_PORT}},
        {"name": "lora-residency-extractor", "type": "core-metrics-extractor", "parameters": residency_extractor},
    ]
    return {
        "apiVersion": PICKER_CONFIG_API_VERSION,
        "kind": "EndpointPickerConfig",
        "plugins": plugins,
        "schedulingProfiles": [{"name": "default", "plugins": [
            *({"pluginRef": scorer, "weight": weight} for scorer, weight in SCORERS),
            {"pluginRef": "max-score-picker"}]}],
        # Without this the picker adds a source of its own that reads the runtime's LoRA metric, and it would
        # overwrite the residency the sidecar publishes.
        "dataLayer": {"injectDefaults": False, "sources": [
            {"pluginRef": "runtime-metrics", "extractors": [{"pluginRef": "runtime-metrics-extractor"}]},
            {"pluginRef": "lora-residency", "extractors": [{"pluginRef": "lora-residency-extractor"}]},
        ]},
    }


def render_picker_config_map(owner: dict[str, Any], runtime: Runtime) -> dict[str, Any]:
    names = ChildNames(owner["metadata"]["name"])
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": object_metadata(owner, names.endpoint_picker, COMPONENT),
        "data": {CONFIG_FILE: yaml.safe_dump(endpoint_picker_config(runtime), sort_keys=False)},
    }


def render_picker_deployment(owner: dict[str, Any], routing: RoutingSpec, config: dict[str, Any]
                             ) -> dict[str, Any]:
    """One replica, replaced rather than rolled (two pickers would each keep their own view of the pods). The
    picker reads its config file once, at start: the template carries the config's hash, so a new config
    replaces the pod."""
    names = ChildNames(owner["metadata"]["name"])
    config_hash = hashlib.sha256(json.dumps(config["data"], sort_keys=True).encode()).hexdigest()[:16]
    picker = routing.endpoint_picker
    labels = picker_labels(names.base_model)
    probe = {"grpc": {"port": HEALTH_PORT, "service": "inference-extension"}, "periodSeconds": 10}
    container: dict[str, Any] = {
        "name": "endpoint-picker",
        "image": picker.image,
        "args": ["--pool-name", names.inference_pool, "--pool-namespace", owner["metadata"]["namespace"],
                 "--pool-group", POOL_GROUP, "--config-file", f"/config/{CONFIG_FILE}",
                 "--grpc-port", str(EXT_PROC_PORT), "--grpc-health-port", str(HEALTH_PORT),
                 "--metrics-port", str(METRICS_PORT),
                 # Authenticating its /metrics needs a ClusterRole, which a namespaced operator cannot grant.
                 "--metrics-endpoint-auth=false", "--zap-encoder", "json"],
        "env": [{"name": "NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
        "ports": [{"name": "grpc", "containerPort": EXT_PROC_PORT},
                  {"name": "grpc-health", "containerPort": HEALTH_PORT},
                  {"name": "metrics", "containerPort": METRICS_PORT}],
        "livenessProbe": {**probe, "initialDelaySeconds": 5},
        "readinessProbe": probe,
        "volumeMounts": [{"name": "config", "mountPath": "/config", "readOnly": True}],
        "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}},
    }
    if picker.resources is not None:
        container["resources"] = picker.resources.model_dump(by_alias=True, exclude_none=True)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": object_metadata(owner, names.endpoint_picker, COMPONENT),
        "spec": {
            "replicas": 1,
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels, "annotations": {CONFIG_HASH_ANNOTATION: config_hash}},
                "spec": {"serviceAccountName": names.endpoint_picker, "terminationGracePeriodSeconds": 130,
                         "containers": [container],
                         "volumes": [{"name": "config", "configMap": {"name": names.endpoint_picker}}]},
            },
        },
    }


def render_picker_service(owner: dict[str, Any]) -> dict[str, Any]:
    names = ChildNames(owner["metadata"]["name"])
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": object_metadata(owner, names.endpoint_picker, COMPONENT),
        "spec": {
            "type": "ClusterIP",
            "selector": picker_labels(names.base_model),
            "ports": [
                {"name": "grpc-ext-proc", "port": EXT_PROC_PORT, "targetPort": "grpc", "protocol": "TCP",
                 "appProtocol": "kubernetes.io/h2c"},
                {"name": "grpc-health", "port": HEALTH_PORT, "targetPort": "grpc-health", "protocol": "TCP"},
                {"name": "http-metrics", "port": METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"},
            ],
        },
    }


def render_picker_rbac(owner: dict[str, Any]) -> list[dict[str, Any]]:
    """Its ServiceAccount, and a Role to read the pods, its pool, and the objectives and rewrites of either group."""
    names = ChildNames(owner["metadata"]["name"])
    read = ["get", "list", "watch"]

    def metadata() -> dict[str, Any]:
        return object_metadata(owner, names.endpoint_picker, COMPONENT)

    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": metadata()},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": metadata(), "rules": [
            {"apiGroups": [""], "resources": ["pods"], "verbs": read},
            {"apiGroups": [POOL_GROUP], "resources": ["inferencepools"], "verbs": read},
            {"apiGroups": list(OBJECTIVE_GROUPS), "resources": ["inferenceobjectives", "inferencemodelrewrites"],
             "verbs": read},
        ]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": metadata(),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": names.endpoint_picker},
         "subjects": [{"kind": "ServiceAccount", "name": names.endpoint_picker,
                       "namespace": owner["metadata"]["namespace"]}]},
    ]


def render_routing(owner: dict[str, Any], spec: BaseModelDeploymentSpec) -> list[dict[str, Any]]:
    """Every object routing adds, or none when it is off."""
    routing = spec.routing
    if routing is None:
        return []
    config = render_picker_config_map(owner, spec.runtime)
    return [render_inference_pool(owner, spec, routing), config, *render_picker_rbac(owner),
            render_picker_deployment(owner, routing, config), render_picker_service(owner)]


def routing_object_refs(owner: dict[str, Any], spec: BaseModelDeploymentSpec) -> list[tuple[str, str, str]]:
    """(apiVersion, kind, name) of every object render_routing makes with routing on, to prune them once it is
    off."""
    with_routing = spec.model_copy(update={"routing": spec.routing or RoutingSpec()})
    return [(o["apiVersion"], o["kind"], o["metadata"]["name"]) for o in render_routing(owner, with_routing)]


def routing_name_problem(base_model: str) -> str | None:
    picker = ChildNames(base_model).endpoint_picker
    if len(picker) <= MAX_NAME_LENGTH:
        return None
    return (f"the endpoint picker's Service would be named {picker!r}, {len(picker)} characters, and a Service name "
            f"allows at most {MAX_NAME_LENGTH}: routing needs a metadata.name of at most "
            f"{MAX_NAME_LENGTH - len(picker) + len(base_model)} characters")


def routing_condition(spec: BaseModelDeploymentSpec | None, problem: tuple[str, str] | None,
                      picker: dict[str, Any] | None, base_model: str, generation: int) -> dict[str, Any] | None:
    """The Routing condition: whether requests reach the replicas that hold their adapter. None when routing is
    off (or the spec unreadable, which the Ready condition says)."""
    if spec is None or spec.routing is None:
        return None
    if problem is not None:
        return condition("Routing", False, *problem, generation)
    names = ChildNames(base_model)
    if picker is None:
        return condition("Routing", False, "EndpointPickerMissing",
                         f"The endpoint picker's Deployment {names.endpoint_picker} does not exist yet.", generation)
    if int(((picker.get("status") or {}).get("availableReplicas")) or 0) < 1:
        fallback = ("sends requests to any replica" if spec.routing.endpoint_picker.failure_mode == "FailOpen"
                    else "refuses requests")
        return condition("Routing", False, "EndpointPickerUnavailable",
                         f"The endpoint picker {names.endpoint_picker} has no available replica; until it has, the "
                         f"gateway {fallback} (failureMode {spec.routing.endpoint_picker.failure_mode}).", generation)
    return condition("Routing", True, "EndpointPickerAvailable",
                     f"InferencePool {names.inference_pool} sends each request to a replica holding its adapter, "
                     f"chosen by the endpoint picker {names.endpoint_picker}.", generation)


def model_rewrite_name(base_model: str, model: str) -> str:
    """A name per (base model, model name): the model name made DNS-safe, with a hash so that names differing
    only in case or punctuation stay apart."""
    slug = re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-")[:40].strip("-")
    return f"{base_model}-{slug}-{hashlib.sha256(model.encode()).hexdigest()[:8]}"


def render_model_rewrite(owner: dict[str, Any], model: str, targets: list[TrafficTarget], api_version: str
                         ) -> dict[str, Any]:
    """An InferenceModelRewrite of the base model's pool: requests for `model` are rewritten to one target's
    served name, drawn by weight, before the picker scores the pods by it."""
    names = ChildNames(owner["metadata"]["name"])
    metadata = object_metadata(owner, model_rewrite_name(names.base_model, model), "model-rewrite")
    metadata["annotations"] = {MODEL_ANNOTATION: model}
    return {
        "apiVersion": api_version,
        "kind": "InferenceModelRewrite",
        "metadata": metadata,
        "spec": {
            "poolRef": {"group": POOL_GROUP, "kind": "InferencePool", "name": names.inference_pool},
            "rules": [{"matches": [{"model": {"type": "Exact", "value": model}}],
                       "targets": [{"modelRewrite": t.served_name, "weight": t.weight} for t in targets]}],
        },
    }
