"""Names the custom resources admit but the objects loraplex derives from them would not."""

from __future__ import annotations

import re
from typing import Any

import pytest

from loraplex.api.types import BaseModelDeploymentSpec
from loraplex.operator import naming, render
from loraplex.operator.adapters import AdapterView, check_adapter
from loraplex.operator.base_models import base_model_status
from loraplex.operator.reconciler import Reconciler
from loraplex.operator.settings import OperatorSettings

SETTINGS = OperatorSettings(sidecar_image="loraplex/loraplex:test", batch_seconds=0)
DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
DNS_1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")


def owner(name: str) -> dict[str, Any]:
    return {"apiVersion": "loraplex.io/v1alpha1", "kind": "BaseModelDeployment",
            "metadata": {"name": name, "namespace": "ns", "uid": "uid-1", "generation": 1},
            "spec": {"model": "meta/llama3", "runtime": "vllm", "image": "img"}}


def spec() -> BaseModelDeploymentSpec:
    return BaseModelDeploymentSpec.model_validate(owner("x")["spec"])


@pytest.mark.parametrize(("name", "phrases"), [
    ("llama3", []),
    ("a" * 63, []),
    ("a" * 64, ["is 64 characters", "the Service name and the label loraplex.io/base-model",
                "at most 63"]),
    ("a" * 253, ["is 253 characters"]),
    ("llama3.8b", ["cannot name a Service", "no '.'"]),
    ("3llama", ["cannot name a Service", "start with a lowercase letter"]),
    ("l" + "." * 70, ["is 71 characters", "cannot name a Service"]),
])
def test_name_problems(name, phrases):
    problems = naming.name_problems(name)
    assert all(any(phrase in problem for problem in problems) for phrase in phrases)
    assert bool(problems) == bool(phrases)


def test_a_long_name_is_shortened_in_the_sentence():
    [problem] = naming.name_problems("a" * 200)
    assert f"'{'a' * 40}…' is 200 characters" in problem


def test_every_name_and_label_derived_from_the_longest_accepted_name_is_valid():
    body = owner("a" * 63)
    objects = [*render.render_children(body, spec(), SETTINGS), render.render_adapter_set(body, spec(), [])]
    for obj in objects:
        meta = obj["metadata"]
        assert len(meta["name"]) <= 253 and DNS_SUBDOMAIN.fullmatch(meta["name"]), meta["name"]
        if obj["kind"] == "Service":
            assert len(meta["name"]) <= 63 and DNS_1035_LABEL.fullmatch(meta["name"])
        labels = {**meta["labels"], **obj.get("spec", {}).get("template", {}).get("metadata", {}).get("labels", {})}
        assert all(len(value) <= 63 and LABEL_VALUE.fullmatch(value) for value in labels.values()), labels


def test_base_model_status_reports_an_invalid_name_and_no_endpoint():
    body = owner("a" * 64)
    problem = ("InvalidName", "; ".join(naming.name_problems("a" * 64)))
    status = base_model_status(body, spec(), problem, None, [])
    by_type = {c["type"]: c for c in status["conditions"]}
    assert (by_type["Reconciled"]["status"], by_type["Reconciled"]["reason"]) == ("False", "InvalidName")
    assert "is 64 characters" in by_type["Reconciled"]["message"]
    assert (by_type["Ready"]["status"], by_type["Ready"]["reason"]) == ("False", "InvalidName")
    assert status["endpoint"] is None


def adapter(name: str, served_name: str | None = None) -> AdapterView:
    spec = {"baseModel": "llama3", "source": "s3://bucket/math", **({"servedName": served_name} if served_name else {})}
    return AdapterView.from_body({"metadata": {"name": name, "namespace": "ns", "uid": f"uid-{name}",
                                               "generation": 1, "creationTimestamp": "2026-01-01T00:00:00Z"},
                                  "spec": spec, "status": {}})


@pytest.mark.parametrize(("name", "served_name", "reason"), [
    ("m" * 128, None, "SpecAccepted"),
    ("m" * 129, None, "InvalidName"),
    ("m" * 253, "math", "SpecAccepted"),  # an explicit served name, which the schema caps, is used instead
])
def test_an_adapter_name_too_long_to_serve_under_is_refused(name, served_name, reason):
    verdict = check_adapter(adapter(name, served_name), spec(), [])
    assert verdict.reason == reason
    if reason == "InvalidName":
        assert "is 129 characters" in verdict.message and "set spec.servedName" in verdict.message


class RecordingClient:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []

    async def get_or_none(self, path: str) -> None:
        self.calls.append(("GET", path, None))
        return None

    async def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("POST", path, body))
        return body

    async def replace(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("PUT", path, body))
        return body

    async def merge_patch(self, path: str, patch: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("PATCH", path, patch))
        return patch


async def test_the_reconciler_writes_nothing_under_a_name_too_long_and_says_why():
    name = "a" * 64
    client = RecordingClient()
    indices = {"base_model_index": {("ns", name): [owner(name)]}, "replica_index": {}, "replica_report_index": {},
               "deployment_index": {}, "picker_index": {}}
    reconciler = Reconciler(client, SETTINGS, indices)  # type: ignore[arg-type]
    await reconciler.reconcile_base_model(("ns", name))

    created = [body for method, path, body in client.calls if method in ("POST", "PUT")]
    assert [body["kind"] for body in created] == ["Event"]  # no Service, Deployment, ConfigMap, RBAC...
    [event] = created
    assert (event["type"], event["reason"]) == ("Warning", "InvalidName")
    assert "is 64 characters" in event["message"]
    [status_patch] = [patch for method, path, patch in client.calls if method == "PATCH"]
    reconciled = next(c for c in status_patch["status"]["conditions"] if c["type"] == "Reconciled")
    assert (reconciled["status"], reconciled["reason"]) == ("False", "InvalidName")
