"""Shared model names: which adapters get a share of a model name's requests, and the rewrite that says so."""

from __future__ import annotations

from loraplex.api.types import ModelTraffic, TrafficTarget, WithheldTarget
from loraplex.operator.routing import model_rewrite_name, render_model_rewrite
from loraplex.operator.traffic import Candidate, plan_traffic

OWNER = {"apiVersion": "loraplex.io/v1alpha1", "kind": "BaseModelDeployment",
         "metadata": {"name": "llama3", "namespace": "inference", "uid": "uid-1"}}


def candidate(adapter, phase="Ready", serving=True, weight=1, model="math"):
    return Candidate(adapter, f"{adapter}-served", model, weight, phase, serving)


def targets(plan):
    return {m.model: [(t.adapter, t.weight) for t in m.targets or []] for m in plan}


def test_serving_versions_share_by_weight():
    plan = plan_traffic([candidate("v1", weight=90), candidate("v2", weight=10)], {}, None)
    assert plan == [ModelTraffic(model="math", targets=[
        TrafficTarget(adapter="v1", served_name="v1-served", weight=90),
        TrafficTarget(adapter="v2", served_name="v2-served", weight=10)])]


def test_a_failed_version_is_rolled_back_and_says_where_its_requests_go():
    [math] = plan_traffic([candidate("v1", weight=90), candidate("v2", phase="Failed", weight=10)], {}, None)
    assert [t.adapter for t in math.targets] == ["v1"]
    assert math.withheld == [WithheldTarget(adapter="v2", reason="it is Failed; the requests go to v1")]


def test_a_version_loaded_nowhere_gets_nothing_until_it_can_answer():
    [math] = plan_traffic([candidate("v1"), candidate("v2", phase="Loading", serving=False)], {}, None)
    assert [t.adapter for t in math.targets] == ["v1"]
    assert math.withheld[0].reason == "it is Loading and loaded on no replica"
    # A version still loading on some replicas but serving on others keeps its share.
    [math] = plan_traffic([candidate("v1"), candidate("v2", phase="Loading")], {}, None)
    assert [t.adapter for t in math.targets] == ["v1", "v2"]


def test_with_no_healthy_version_the_failed_ones_that_still_serve_keep_the_requests():
    [math] = plan_traffic([candidate("v1", phase="Failed"), candidate("v2", phase="Failed", serving=False)], {}, None)
    assert [t.adapter for t in math.targets] == ["v1"] and [w.adapter for w in math.withheld] == ["v2"]
    [math] = plan_traffic([candidate("v1", phase="Pending", serving=False)], {}, None)
    assert math.targets is None and math.problem == "No adapter naming it is loaded on any replica"


def test_a_model_name_another_adapter_serves_is_not_taken_from_it():
    [math] = plan_traffic([candidate("v2")], {"math": "math"}, None)
    assert math.targets is None and "served name of LoraAdapter math" in math.problem
    # ...unless that adapter shares it too.
    plan = plan_traffic([candidate("math", weight=3), candidate("v2")], {"math": "math"}, None)
    assert targets(plan) == {"math": [("math", 3), ("v2", 1)]}


def test_without_routing_nothing_is_shared_and_each_model_says_why():
    plan = plan_traffic([candidate("v1"), candidate("x", model="chat")], {}, "spec.routing is off")
    assert [(m.model, m.targets, m.problem) for m in plan] == [("chat", None, "spec.routing is off"),
                                                              ("math", None, "spec.routing is off")]


def test_the_rewrite_matches_the_model_exactly_and_targets_the_served_names_on_the_models_pool():
    rewrite = render_model_rewrite(OWNER, "org/Math.v2", [TrafficTarget(adapter="a", served_name="a-1", weight=9),
                                                          TrafficTarget(adapter="b", served_name="b-1", weight=1)],
                                   "llm-d.ai/v1alpha2")
    assert rewrite["apiVersion"] == "llm-d.ai/v1alpha2" and rewrite["kind"] == "InferenceModelRewrite"
    assert rewrite["spec"] == {
        "poolRef": {"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": "llama3"},
        "rules": [{"matches": [{"model": {"type": "Exact", "value": "org/Math.v2"}}],
                   "targets": [{"modelRewrite": "a-1", "weight": 9}, {"modelRewrite": "b-1", "weight": 1}]}]}
    assert rewrite["metadata"]["labels"]["loraplex.io/base-model"] == "llama3"
    assert rewrite["metadata"]["annotations"] == {"loraplex.io/model": "org/Math.v2"}


def test_rewrite_names_are_valid_and_apart_for_names_that_differ_only_in_case():
    first, second = model_rewrite_name("llama3", "Math"), model_rewrite_name("llama3", "math")
    assert first != second and first.startswith("llama3-math-")
    long = model_rewrite_name("m" * 63, "x" * 128)
    assert len(long) <= 253 and long.replace("-", "").isalnum()
