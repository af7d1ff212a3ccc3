"""The Argo CD health checks, run in a real Lua interpreter against the statuses loraplex writes."""

from __future__ import annotations

import pytest
import yaml
from lupa import LuaRuntime

from tests.conftest import ROOT

ARGOCD = ROOT / "gitops" / "argocd"


def health(script: str, obj: dict) -> tuple[str, str]:
    lua = LuaRuntime(unpack_returned_tuples=True)

    def to_lua(value):  # type: ignore[no-untyped-def]
        if isinstance(value, dict):
            return lua.table_from({k: to_lua(v) for k, v in value.items()})
        if isinstance(value, list):
            return lua.table_from([to_lua(v) for v in value])
        return value

    lua.globals().obj = to_lua(obj)
    result = lua.execute((ARGOCD / script).read_text())
    return result["status"], result["message"]


def adapter(phase: str | None, ready: tuple[str, str, str] | None, validated: str = "True", generation: int = 1,
            observed: int = 1) -> dict:
    status: dict = {"observedGeneration": observed}
    if phase:
        status["phase"] = phase
    if ready:
        status["conditions"] = [{"type": "Validated", "status": validated, "reason": "x", "message": "v"},
                                {"type": "Ready", "status": ready[0], "reason": ready[1], "message": ready[2]}]
    return {"metadata": {"generation": generation}, "status": status}


@pytest.mark.parametrize(("obj", "expected"), [
    ({"metadata": {"generation": 1}}, "Progressing"),
    (adapter("Ready", ("True", "Loaded", "Loaded on all 2 replica(s).")), "Healthy"),
    (adapter("Loading", ("False", "Loading", "Loaded on 1 of 2 replica(s).")), "Progressing"),
    (adapter("Ready", ("True", "Loaded", "ok"), generation=2, observed=1), "Progressing"),
    (adapter("Failed", ("False", "ValidationFailed", "Replica a: adapter_config.json: r=128 exceeds ..."), "False"),
     "Degraded"),
    (adapter("Pending", ("False", "BaseModelNotFound", "BaseModelDeployment 'x' does not exist"), "Unknown"),
     "Degraded"),
    (adapter("Pending", ("False", "NoReplicas", "Base model 'x' has no running replicas."), "Unknown"), "Progressing"),
])
def test_lora_adapter_health(obj, expected):
    status, message = health("health-loraadapter.lua", obj)
    assert status == expected
    assert message


def model(reconciled: str, ready: str, generation: int = 1, observed: int = 1) -> dict:
    return {"metadata": {"generation": generation}, "status": {"observedGeneration": observed, "conditions": [
        {"type": "Reconciled", "status": reconciled, "reason": "r", "message": "reconciled message"},
        {"type": "Ready", "status": ready, "reason": "r", "message": "ready message"},
        {"type": "AdaptersReady", "status": "False", "reason": "r", "message": "1 of 2 adapter(s) are Ready"}]}}


@pytest.mark.parametrize(("obj", "expected", "message"), [
    (model("True", "True"), "Healthy", "ready message"),
    (model("True", "False"), "Progressing", "ready message"),
    (model("False", "True"), "Degraded", "reconciled message"),
    (model("True", "True", generation=3, observed=2), "Progressing", "loraplex has not yet acted on the latest spec"),
])
def test_base_model_health(obj, expected, message):
    assert health("health-basemodeldeployment.lua", obj) == (expected, message)


def test_argocd_configmap_embeds_the_scripts():
    data = yaml.safe_load((ARGOCD / "argocd-cm.yaml").read_text())["data"]
    assert data["resource.customizations.health.loraplex.io_LoraAdapter"] == \
        (ARGOCD / "health-loraadapter.lua").read_text()
    assert data["resource.customizations.health.loraplex.io_BaseModelDeployment"] == \
        (ARGOCD / "health-basemodeldeployment.lua").read_text()
