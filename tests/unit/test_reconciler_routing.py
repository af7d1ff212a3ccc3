"""Routing and shared model names through the reconciler: restarts, weight edits, served-name changes, routing
turned off mid-run or after a failed apply, names held by another model, a new picker config.

Uses the reconciler's in-process fakes (tests/unit/test_reconciler.py) with what routing needs in addition: the
Inference Extension's discovery documents, DELETE, and the picker index kept like kopf's.
"""

from __future__ import annotations

import asyncio
import copy
import json
from typing import Any

from loraplex.api.adapter_set import DATA_KEY
from loraplex.api.types import BaseModelDeploymentSpec
from loraplex.kube import ApiError, NotFound, resource_path
from loraplex.operator.reconciler import Reconciler
from loraplex.operator.routing import render_routing
from tests.unit.test_reconciler import BASE, NS, SETTINGS, Cluster, FakeApiServer, adapter_path, base_model_path

REWRITES = resource_path("inference.networking.x-k8s.io/v1alpha2", "inferencemodelrewrites", NS)
POOL = resource_path("inference.networking.k8s.io/v1", "inferencepools", NS, BASE)
PICKER = f"{BASE}-epp"


class RoutingApi(FakeApiServer):
    def __init__(self) -> None:
        super().__init__()
        self.objects["/apis/inference.networking.k8s.io/v1"] = {"resources": [{"name": "inferencepools"}]}
        self.objects["/apis/inference.networking.x-k8s.io/v1alpha2"] = {
            "resources": [{"name": "inferencemodelrewrites"}, {"name": "inferenceobjectives"}]}
        self.refuse: set[str] = set()  # paths whose create the API server refuses (an admission policy)
        self.hold: dict[str, asyncio.Event] = {}  # GETs of these paths answer only once the event is set

    async def get(self, path: str) -> dict[str, Any]:
        if path in self.hold:
            await self.hold[path].wait()
        return await super().get(path)

    async def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        if f"{path}/{body['metadata'].get('name')}" in self.refuse:
            await self._request("POST", path, body)
            raise ApiError(422, "Invalid", "denied by an admission policy")
        return await super().create(path, body)

    async def delete(self, path: str) -> None:
        await self._request("DELETE", path)
        if self.objects.pop(path, None) is None:
            raise NotFound(404, "NotFound", path)


class RoutingCluster(Cluster):
    def __init__(self) -> None:
        super().__init__()
        self.api = RoutingApi()
        self.reconciler = Reconciler(self.api, SETTINGS, self.indices)  # type: ignore[arg-type]

    def sync_picker_index(self) -> None:
        """kopf's picker_index, from the picker Deployment the API server holds."""
        picker = self.api.objects.get(resource_path("apps/v1", "deployments", NS, PICKER))
        self.indices["picker_index"].clear()  # in place: the Reconciler holds this dict
        if picker is not None:
            self.indices["picker_index"][(NS, BASE)] = [copy.deepcopy(picker)]

    async def base_model_event(self, name: str = BASE) -> None:
        self.sync_picker_index()
        await super().base_model_event(name)

    async def edit_base_model(self, **spec: Any) -> None:
        body = self.api.objects[base_model_path()]
        body["spec"].update(spec)
        body["spec"] = {k: v for k, v in body["spec"].items() if v is not None}
        body["metadata"]["generation"] += 1
        await self.base_model_event()

    async def edit_adapter(self, name: str, **spec: Any) -> None:
        body = self.api.objects[adapter_path(name)]
        body["spec"].update(spec)
        body["metadata"]["generation"] += 1  # the API server bumps it on any spec change
        await self.adapter_event(name)

    def rewrites(self) -> dict[str, list[tuple[str, int]]]:
        return {o["spec"]["rules"][0]["matches"][0]["model"]["value"]:
                [(t["modelRewrite"], t["weight"]) for t in o["spec"]["rules"][0]["targets"]]
                for p, o in self.api.objects.items() if p.startswith(REWRITES + "/")}

    def traffic(self) -> dict[str, dict[str, Any]]:
        status = self.api.objects[base_model_path()].get("status") or {}
        return {m["model"]: m for m in status.get("traffic") or []}


async def two_versions_serving(**base_spec: Any) -> RoutingCluster:
    """llama3 with routing on one replica, math-v1 (9) and math-v2 (1) sharing model 'math', both Loaded."""
    cluster = RoutingCluster()
    cluster.add_replica("pod-a")
    await cluster.create_base_model(routing={}, **base_spec)
    await cluster.create_adapter("math-v1", traffic={"model": "math", "weight": 9})
    await cluster.create_adapter("math-v2", traffic={"model": "math", "weight": 1})
    await cluster.report("pod-a", {"math-v1": "Loaded", "math-v2": "Loaded"})
    await cluster.settle("math-v1", "math-v2")
    assert cluster.rewrites() == {"math": [("math-v1", 9), ("math-v2", 1)]}
    return cluster


async def test_an_operator_restart_keeps_the_rewrite_of_versions_that_serve():
    cluster = await two_versions_serving()
    # The operator restarts: a new Reconciler over the same cluster and indices; the adapter LIST is loaded
    # before any handler, then kopf delivers the base model's event (its watch may come before the adapters').
    cluster.reconciler = Reconciler(cluster.api, SETTINGS, cluster.indices)  # type: ignore[arg-type]
    await cluster.reconciler.load_adapters()
    before = len(cluster.api.requests)
    await cluster.base_model_event()
    deleted = [p for m, p, _ in cluster.api.requests[before:] if m == "DELETE"]
    assert deleted == [], f"the restart deleted {deleted}"
    assert cluster.rewrites() == {"math": [("math-v1", 9), ("math-v2", 1)]}


async def test_an_operator_restart_does_not_give_the_first_version_seen_every_request():
    cluster = await two_versions_serving()
    cluster.reconciler = Reconciler(cluster.api, SETTINGS, cluster.indices)  # type: ignore[arg-type]
    await cluster.reconciler.load_adapters()
    await cluster.adapter_event("math-v2")  # kopf's initial listing of the adapters reaches the canary first
    assert cluster.rewrites() == {"math": [("math-v1", 9), ("math-v2", 1)]}, \
        f"after the restart, before math-v1's event: {cluster.rewrites()}"


async def test_an_adapter_that_takes_the_shared_name_as_its_served_name_stops_the_rewrite():
    cluster = RoutingCluster()
    cluster.add_replica("pod-a")
    await cluster.create_base_model(routing={})
    await cluster.create_adapter("chat-v2", traffic={"model": "chat"})
    await cluster.report("pod-a", {"chat-v2": "Loaded"})
    await cluster.settle("chat-v2")
    assert cluster.rewrites() == {"chat": [("chat-v2", 1)]}

    # An adapter served as 'chat' (no spec.traffic) arrives and loads: its requests must not be rewritten away.
    await cluster.create_adapter("chat")
    await cluster.report("pod-a", {"chat": "Loaded"})
    await cluster.settle("chat", "chat-v2")
    assert cluster.status("chat")["phase"] == "Ready"
    assert cluster.rewrites() == {}, "requests for 'chat' still go to chat-v2"
    assert "served name of LoraAdapter chat" in (cluster.traffic()["chat"].get("problem") or "")


async def test_changing_a_versions_weight_neither_withdraws_it_nor_reloads_it():
    cluster = await two_versions_serving()
    events = len(cluster.api.events())
    await cluster.edit_adapter("math-v2", traffic={"model": "math", "weight": 5})  # the canary's next step
    await cluster.settle("math-v1", "math-v2")
    withdrawn = [e["message"] for e in cluster.api.events()[events:] if e["reason"] == "TrafficWithdrawn"]
    adapter_set = cluster.api.objects[resource_path("v1", "configmaps", NS, f"{BASE}-adapters")]
    entry = next(a for a in json.loads(adapter_set["data"][DATA_KEY])["adapters"] if a["name"] == "math-v2")
    seen = (cluster.rewrites(), withdrawn, cluster.status("math-v2")["phase"], entry["generation"])
    assert seen == ({"math": [("math-v1", 9), ("math-v2", 5)]}, [], "Ready", 1), \
        f"(rewrites, TrafficWithdrawn Events, math-v2 phase, its adapter-set generation) = {seen!r}"


async def test_lowering_the_old_versions_weight_does_not_send_everything_to_the_canary():
    cluster = await two_versions_serving()
    await cluster.edit_adapter("math-v1", traffic={"model": "math", "weight": 5})  # 9:1 -> 5:1
    await cluster.settle("math-v1", "math-v2")
    assert cluster.rewrites() == {"math": [("math-v1", 5), ("math-v2", 1)]}, \
        f"while math-v1 reloads, the rewrite is {cluster.rewrites()}"


async def test_a_traffic_run_under_way_when_routing_is_turned_off_leaves_no_rewrite():
    cluster = await two_versions_serving()
    await cluster.create_adapter("chat-v1", traffic={"model": "chat"})
    await cluster.report("pod-a", {"chat-v1": "Loaded"})
    await cluster.settle("math-v1", "math-v2", "chat-v1")
    assert set(cluster.rewrites()) == {"chat", "math"}
    chat = next(p for p, o in cluster.api.objects.items()
                if p.startswith(REWRITES + "/") and o["metadata"]["annotations"]["loraplex.io/model"] == "chat")

    # A traffic run (an adapter's event) reads the spec with routing on and is waiting on its GET of chat's rewrite ...
    gate = cluster.api.hold[chat] = asyncio.Event()
    traffic_run = asyncio.create_task(cluster.reconciler.apply_traffic((NS, BASE)))
    for _ in range(20):
        await asyncio.sleep(0)
    # ... when the user turns routing off: the prune runs under another lock and deletes both rewrites.
    body = cluster.api.objects[base_model_path()]
    body["spec"].pop("routing")
    body["metadata"]["generation"] += 1
    cluster.sync_picker_index()
    cluster.indices["base_model_index"][(NS, BASE)] = [copy.deepcopy(body)]
    routing_off = asyncio.create_task(cluster.reconciler.base_model_changed((NS, BASE), copy.deepcopy(body)))
    for _ in range(5000):
        if any(m == "DELETE" for m, _, _ in cluster.api.requests):
            break
        await asyncio.sleep(0)
    gate.set()
    await traffic_run
    await routing_off
    await cluster.settle("math-v1", "math-v2", "chat-v1")
    assert cluster.rewrites() == {}, f"rewrites left with routing off: {cluster.rewrites()}"


async def test_turning_routing_off_deletes_what_a_failed_apply_left():
    cluster = RoutingCluster()
    cluster.add_replica("pod-a")
    # An admission policy refuses the picker's Deployment: the pool, config and RBAC made before it stay.
    cluster.api.refuse.add(resource_path("apps/v1", "deployments", NS, PICKER))
    await cluster.create_base_model(routing={})
    await cluster.create_adapter("math-v1", traffic={"model": "math"})
    await cluster.report("pod-a", {"math-v1": "Loaded"})
    await cluster.settle("math-v1")
    assert POOL in cluster.api.objects

    # The user gives up on routing.
    await cluster.edit_base_model(routing=None)
    await cluster.settle("math-v1")
    left = sorted(p for p, o in cluster.api.objects.items()
                  if o.get("metadata", {}).get("name", "").startswith((PICKER, f"{BASE}-math")) or p == POOL)
    assert left == [], f"left behind with routing off: {left}"


async def test_a_shared_name_that_is_the_base_models_own_is_refused_like_a_served_name():
    cluster = RoutingCluster()
    cluster.add_replica("pod-a")
    await cluster.create_base_model(routing={}, model="llama3-8b")
    # An adapter may not be served as 'llama3-8b', the base model's name (check_adapter refuses it), but may take
    # every request for the base model through spec.traffic.
    await cluster.create_adapter("hijack", traffic={"model": "llama3-8b"})
    await cluster.report("pod-a", {"hijack": "Loaded"})
    await cluster.settle("hijack")
    assert "llama3-8b" not in cluster.rewrites(), "every request for the base model goes to adapter hijack"


def test_a_new_picker_config_reaches_the_running_picker():
    """The picker reads --config-file once at start (llm-d-router cmd/epp/runner/runner.go, os.ReadFile): a
    changed config must change the pod template, or the running picker keeps the old one."""
    owner = {"metadata": {"name": BASE, "namespace": NS, "uid": "u"}}

    def rendered(runtime: str) -> dict[str, Any]:
        spec = BaseModelDeploymentSpec.model_validate({"model": "m", "runtime": runtime, "image": "i", "routing": {}})
        return {o["kind"]: o for o in render_routing(owner, spec)}

    vllm, nim = rendered("vllm"), rendered("nim")
    assert vllm["ConfigMap"]["data"] != nim["ConfigMap"]["data"]
    assert vllm["Deployment"]["spec"]["template"] != nim["Deployment"]["spec"]["template"], \
        "the picker Deployment's template does not change with its config"


async def test_an_owned_object_event_at_rest_writes_nothing():
    """Every owned-object event (a Deployment status change, for one) also converges routing and the rewrites."""
    cluster = await two_versions_serving()
    before = len(cluster.api.requests)
    await cluster.reconciler.converge_owned_objects((NS, BASE))
    assert [m for m, _, _ in cluster.api.requests[before:] if m != "GET"] == []


async def test_routing_never_takes_over_another_base_models_deployment_or_service():
    """'<name>-epp' is also a valid BaseModelDeployment name: its Deployment and Service bear the picker's names.
    (This fake does not refuse a change of a Deployment's spec.selector as a real API server does; the Service,
    whose selector may change, flips on a real one too.)"""
    cluster = RoutingCluster()
    await cluster.create_base_model(name=PICKER)  # a model called llama3-epp, no routing
    paths = {kind: resource_path(api, plural, NS, PICKER)
             for kind, api, plural in (("Deployment", "apps/v1", "deployments"), ("Service", "v1", "services"))}

    def owners() -> dict[str, str]:
        return {kind: cluster.api.objects[p]["metadata"]["ownerReferences"][0]["name"] for kind, p in paths.items()}

    seen = [owners()]
    await cluster.create_base_model(routing={})  # llama3, with routing
    seen.append(owners())
    await cluster.reconciler.converge_owned_objects((NS, PICKER))  # e.g. its Deployment's status moved
    seen.append(owners())
    await cluster.reconciler.converge_owned_objects((NS, BASE))
    seen.append(owners())
    assert all(o == {"Deployment": PICKER, "Service": PICKER} for o in seen), f"owners after each pass: {seen}"
