"""examples/routing beyond what test_examples.py checks of every folder: the Gateway API objects a user applies
(gateway/, istio/) point at exactly what the operator renders for the example's base model, and that rendering
passes a server-side dry run against the Inference Extension's own CRDs (vendored, v1.5.0).

The Gateway API CRDs (Gateway, HTTPRoute) and Istio's are not vendored here: no upstream commit or registry
package at hand holds them. Those objects are checked by structure, against the shapes the Inference Extension's
v1.5.0 guides and chart use (cited in examples/routing/README.md), not by an API server."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from loraplex.api.types import BaseModelDeploymentSpec
from loraplex.operator import render
from loraplex.operator.naming import ChildNames
from loraplex.operator.routing import EXT_PROC_PORT, POOL_GROUP, render_routing
from loraplex.operator.settings import OperatorSettings
from tests.integration.test_examples import EXAMPLES, changed_fields, manifests, with_metadata
from tests.integration.test_routing_crds import POOL_CRD, UPSTREAM_CRDS, kubectl_with

pytestmark = pytest.mark.integration
EXAMPLE = EXAMPLES / "routing"
GATEWAY_GROUP = "gateway.networking.k8s.io"
# The classes of the Inference Extension's v1.5.0 Gateway manifests (config/manifests/gateway/*/gateway.yaml).
CITED_GATEWAY_CLASSES = {"istio", "gke-l7-regional-external-managed", "nginx", "agentgateway"}


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [doc for doc in docs if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def example_base_model() -> tuple[dict[str, Any], BaseModelDeploymentSpec]:
    body = with_metadata(one(manifests(EXAMPLE), "BaseModelDeployment"))
    return body, BaseModelDeploymentSpec.model_validate(body["spec"])


def rendered_pool() -> dict[str, Any]:
    return one(render_routing(*example_base_model()), "InferencePool")


def route_problems(route: dict[str, Any], gateway: dict[str, Any], pool: dict[str, Any]) -> list[str]:
    """What would keep `route` from sending requests through `gateway` to `pool`; one sentence each."""
    problems = []
    if (route["apiVersion"], route["kind"]) != (f"{GATEWAY_GROUP}/v1", "HTTPRoute"):
        problems.append(f"not a {GATEWAY_GROUP}/v1 HTTPRoute")
    listeners = {listener["name"] for listener in gateway["spec"]["listeners"]}
    for parent in route["spec"].get("parentRefs") or [{}]:
        if (parent.get("group", GATEWAY_GROUP), parent.get("kind", "Gateway")) != (GATEWAY_GROUP, "Gateway"):
            problems.append(f"parentRef {parent} is not a Gateway")
        if parent.get("name") != gateway["metadata"]["name"] or "namespace" in parent:
            problems.append(f"parentRef {parent} is not Gateway {gateway['metadata']['name']} of this namespace")
        if parent.get("sectionName", next(iter(listeners))) not in listeners:
            problems.append(f"parentRef {parent} names no listener of the Gateway ({sorted(listeners)})")
    refs = [ref for rule in route["spec"].get("rules") or [] for ref in rule.get("backendRefs") or []]
    if not refs:
        problems.append("no backendRef")
    target_ports = {port["number"] for port in pool["spec"]["targetPorts"]}
    for ref in refs:
        if (ref.get("group"), ref.get("kind")) != (POOL_GROUP, "InferencePool"):
            problems.append(f"backendRef {ref} is not a {POOL_GROUP} InferencePool")
        if ref.get("name") != pool["metadata"]["name"] or "namespace" in ref:
            problems.append(f"backendRef {ref} is not InferencePool {pool['metadata']['name']} of this namespace")
        if "port" in ref and ref["port"] not in target_ports:
            problems.append(f"backendRef port {ref['port']} is none of the pool's targetPorts {sorted(target_ports)}")
    return problems


def gateway_docs() -> tuple[dict[str, Any], dict[str, Any]]:
    docs = manifests(EXAMPLE / "gateway")
    return one(docs, "Gateway"), one(docs, "HTTPRoute")


def test_the_httproute_sends_every_request_to_the_pool_the_operator_renders():
    gateway, route = gateway_docs()
    assert route_problems(route, gateway, rendered_pool()) == []
    matches = [match for rule in route["spec"]["rules"] for match in rule.get("matches") or []]
    assert {"path": {"type": "PathPrefix", "value": "/"}} in matches


def test_the_route_check_catches_a_wrong_pool_a_wrong_port_and_a_missing_listener():
    gateway, route = gateway_docs()
    pool = rendered_pool()

    def problems_with(edit) -> str:
        broken = copy.deepcopy(route)
        edit(broken["spec"])
        return " ".join(route_problems(broken, gateway, pool))

    def first_ref(spec: dict[str, Any]) -> dict[str, Any]:
        return spec["rules"][0]["backendRefs"][0]

    assert "is not InferencePool llama3-8b" in problems_with(lambda spec: first_ref(spec).update(name="llama3"))
    assert "is not a inference.networking.k8s.io InferencePool" in problems_with(
        lambda spec: first_ref(spec).update(kind="Service"))
    assert "port 9002 is none of the pool's targetPorts [8000]" in problems_with(
        lambda spec: first_ref(spec).update(port=9002))
    assert problems_with(lambda spec: first_ref(spec).update(port=8000)) == ""
    assert "names no listener" in problems_with(lambda spec: spec["parentRefs"][0].update(sectionName="https"))
    assert "no backendRef" in problems_with(lambda spec: spec["rules"][0].pop("backendRefs"))


def test_the_gateway_has_the_shape_of_the_inference_extension_manifests():
    gateway, _ = gateway_docs()
    assert (gateway["apiVersion"], gateway["kind"]) == (f"{GATEWAY_GROUP}/v1", "Gateway")
    assert gateway["spec"]["gatewayClassName"] in CITED_GATEWAY_CLASSES
    assert gateway["spec"]["listeners"] == [{"name": "http", "port": 80, "protocol": "HTTP"}]


def test_the_pool_selects_the_example_pods_on_their_port_and_calls_its_picker():
    body, spec = example_base_model()
    routing = {doc["kind"]: doc for doc in render_routing(body, spec)}
    pool = routing["InferencePool"]
    pods = render.render_deployment(body, spec, OperatorSettings())["spec"]["template"]
    selector = pool["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pods["metadata"]["labels"].items()
    runtime = next(c for c in pods["spec"]["containers"] if c["name"] != "loraplex-sidecar")
    assert pool["spec"]["targetPorts"] == [{"number": spec.port}]
    assert spec.port in [port["containerPort"] for port in runtime.get("ports") or []]
    picker = routing["Service"]
    assert pool["spec"]["endpointPickerRef"]["name"] == picker["metadata"]["name"] == "llama3-8b-epp"
    assert EXT_PROC_PORT in [port["port"] for port in picker["spec"]["ports"]]
    # The picker's own pods must not be endpoints of the pool.
    picker_pods = routing["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert not selector.items() <= picker_pods.items()


def test_placement_puts_some_adapters_on_a_subset_of_the_replicas():
    _, spec = example_base_model()
    wanted = [doc["spec"].get("replicas") for doc in manifests(EXAMPLE) if doc["kind"] == "LoraAdapter"]
    assert any(replicas is not None and replicas < spec.replicas for replicas in wanted), wanted


def test_the_istio_rule_is_for_the_picker_service():
    rule = one(manifests(EXAMPLE / "istio"), "DestinationRule")
    picker = ChildNames("llama3-8b").endpoint_picker
    assert rule["spec"]["host"] == f"{picker}.inference.svc.cluster.local"
    assert rule["spec"]["trafficPolicy"]["tls"] == {"mode": "SIMPLE", "insecureSkipVerify": True}


@pytest.fixture(scope="module")
def inference_pool_crd(control_plane, tmp_path_factory) -> None:
    admin = kubectl_with(control_plane.kubeconfig, tmp_path_factory.mktemp("kube-cache"))
    admin("apply", "-f", str(UPSTREAM_CRDS))
    admin("wait", "--for=condition=Established", "--timeout=60s", f"crd/{POOL_CRD}")


def test_what_the_operator_renders_for_the_example_passes_a_server_side_dry_run(inference_pool_crd, kubeconfig: Path,
                                                                               namespace, tmp_path):
    body, spec = example_base_model()
    body = {**body, "metadata": {**body["metadata"], "namespace": namespace}}
    objects = render_routing(body, spec)
    for obj in objects:
        obj["metadata"].pop("ownerReferences")  # the owner does not exist in a dry run
    kubectl = kubectl_with(kubeconfig, tmp_path / "kube-cache")
    result = kubectl("apply", "--dry-run=server", "--validate=strict", "-o", "json", "-f", "-",
                     stdin=yaml.safe_dump_all(objects), check=False)
    assert result.returncode == 0, result.stderr
    stored = json.loads(result.stdout)["items"]
    assert [(doc["kind"], doc["metadata"]["name"]) for doc in stored] == \
           [(doc["kind"], doc["metadata"]["name"]) for doc in objects]
    for sent, kept in zip(objects, stored, strict=True):
        assert changed_fields(sent, kept) == [], f"{sent['kind']} {sent['metadata']['name']}"
    pool = next(doc for doc in stored if doc["kind"] == "InferencePool")
    assert pool["metadata"]["name"] == one(manifests(EXAMPLE / "gateway"), "HTTPRoute")["spec"]["rules"][0][
        "backendRefs"][0]["name"]


def test_the_canary_shares_a_served_name_and_its_rewrite_passes_a_server_side_dry_run(inference_pool_crd,
                                                                                     kubeconfig: Path, namespace,
                                                                                     tmp_path):
    """canary/: the versions parse and the API server takes them as they are; the rewrite the operator makes of
    them once both serve passes the vendored InferenceModelRewrite CRD (inference.networking.x-k8s.io)."""
    from loraplex.api.types import LoraAdapterSpec
    from loraplex.operator.routing import render_model_rewrite
    from loraplex.operator.traffic import Candidate, plan_traffic

    versions = [doc for doc in manifests(EXAMPLE / "canary") if doc["kind"] == "LoraAdapter"]
    specs = {doc["metadata"]["name"]: LoraAdapterSpec.model_validate(doc["spec"]) for doc in versions}
    served = {name: spec.served_name or name for name, spec in specs.items()}
    [model] = {spec.traffic.model for spec in specs.values()}
    assert model in served.values()  # the version serving under that name shares it, so it is not taken from it
    kubectl = kubectl_with(kubeconfig, tmp_path / "kube-cache")
    adapters = [{**doc, "metadata": {**doc["metadata"], "namespace": namespace}} for doc in versions]
    result = kubectl("apply", "--dry-run=server", "--validate=strict", "-o", "json", "-f", "-",
                     stdin=yaml.safe_dump_all(adapters), check=False)
    assert result.returncode == 0, result.stderr

    [plan] = plan_traffic([Candidate(name, served[name], spec.traffic.model, spec.traffic.weight, "Ready", True)
                           for name, spec in specs.items()], {served[n]: n for n in specs}, None)
    body, _ = example_base_model()
    body = {**body, "metadata": {**body["metadata"], "namespace": namespace}}
    rewrite = render_model_rewrite(body, plan.model, plan.targets, "inference.networking.x-k8s.io/v1alpha2")
    rewrite["metadata"].pop("ownerReferences")
    result = kubectl("apply", "--dry-run=server", "--validate=strict", "-o", "json", "-f", "-",
                     stdin=yaml.safe_dump(rewrite), check=False)
    assert result.returncode == 0, result.stderr
    targets = json.loads(result.stdout)["spec"]["rules"][0]["targets"]
    assert targets == [{"modelRewrite": "llama3-8b-math", "weight": 9}, {"modelRewrite": "llama3-8b-math-v2",
                                                                         "weight": 1}]
