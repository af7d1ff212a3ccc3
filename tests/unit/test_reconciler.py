"""The Reconciler in process: a fake API server holding objects in memory, kopf's indices as plain dicts,
and the test playing kopf's part by delivering each object's events, echoes of our own writes included."""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
from typing import Any

import pytest

from loraplex.api.adapter_set import DATA_KEY
from loraplex.api.types import API_VERSION
from loraplex.kube import ApiError, Conflict, NotFound, resource_path
from loraplex.operator.adapters import FINALIZER
from loraplex.operator.coalescer import Coalescer
from loraplex.operator.reconciler import Reconciler
from loraplex.operator.settings import OperatorSettings
from tests.fakes.virtual_time import run_in_virtual_time

NS = "ns"
BASE = "llama3"
SETTINGS = OperatorSettings(sidecar_image="loraplex/loraplex:test", batch_seconds=0)
WRITES = ("POST", "PUT", "PATCH")


def merge(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """RFC 7386 JSON merge patch."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)
    return target


class FakeApiServer:
    """The few KubeClient calls the reconciler makes, on objects kept by path; every request is recorded."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str, Any]] = []
        self._versions = itertools.count(1)

    def writes(self, kind: str | None = None) -> list[tuple[str, str, Any]]:
        return [r for r in self.requests if r[0] in WRITES and (kind is None or f"/{kind}" in r[1])]

    def events(self) -> list[dict[str, Any]]:
        return [body for method, path, body in self.requests if method == "POST" and path.endswith("/events")]

    def store(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        body = copy.deepcopy(body)
        meta = body.setdefault("metadata", {})
        meta.setdefault("uid", f"uid-{meta['name']}")
        meta.setdefault("generation", 1)
        meta["resourceVersion"] = str(next(self._versions))
        self.objects[path] = body
        return copy.deepcopy(body)

    async def _request(self, method: str, path: str, body: Any = None) -> None:
        self.requests.append((method, path, copy.deepcopy(body)))
        await asyncio.sleep(0)  # a real request lets other tasks run meanwhile

    async def get(self, path: str) -> dict[str, Any]:
        await self._request("GET", path)
        if path not in self.objects:
            raise NotFound(404, "NotFound", path)
        return copy.deepcopy(self.objects[path])

    async def get_or_none(self, path: str) -> dict[str, Any] | None:
        try:
            return await self.get(path)
        except NotFound:
            return None

    async def list(self, path: str, **_: Any) -> dict[str, Any]:
        await self._request("GET", path)
        plural = path.rsplit("/", 1)[1]
        return {"items": [copy.deepcopy(o) for p, o in self.objects.items()
                          if p.startswith(path.rsplit("/", 1)[0]) and p.rsplit("/", 2)[1] == plural]}

    async def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        await self._request("POST", path, body)
        if path.endswith("/events"):
            return body
        return self.store(f"{path}/{body['metadata']['name']}", body)

    async def replace(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        await self._request("PUT", path, body)
        return self.store(path, body)

    async def merge_patch(self, path: str, patch: dict[str, Any]) -> dict[str, Any]:
        await self._request("PATCH", path, patch)
        target = path.removesuffix("/status")
        if target not in self.objects:
            raise NotFound(404, "NotFound", target)
        current = self.objects[target]
        expected = (patch.get("metadata") or {}).get("resourceVersion")
        if expected is not None and expected != current["metadata"]["resourceVersion"]:
            raise Conflict(409, "Conflict", target)
        patch = copy.deepcopy(patch)
        (patch.get("metadata") or {}).pop("resourceVersion", None)
        return self.store(target, merge(copy.deepcopy(current), patch))


def adapter_path(name: str) -> str:
    return resource_path(API_VERSION, "loraadapters", NS, name)


def replica_path(pod: str) -> str:
    return resource_path(API_VERSION, "lorareplicas", NS, pod)


def base_model_path(name: str = BASE) -> str:
    return resource_path(API_VERSION, "basemodeldeployments", NS, name)


class Cluster:
    """The fake API server plus kopf's part: its indices, and the events it would deliver."""

    def __init__(self, settings: OperatorSettings = SETTINGS) -> None:
        self.api = FakeApiServer()
        self.indices: dict[str, dict[Any, list[Any]]] = {
            "base_model_index": {}, "replica_index": {}, "replica_report_index": {}, "deployment_index": {},
            "picker_index": {}}
        self.reconciler = Reconciler(self.api, settings, self.indices)  # type: ignore[arg-type]
        self._clock = itertools.count(1)

    async def create_base_model(self, name: str = BASE, **spec: Any) -> None:
        body = {"apiVersion": API_VERSION, "kind": "BaseModelDeployment", "metadata": {"name": name, "namespace": NS},
                "spec": {"model": "meta/llama3", "runtime": "vllm", "image": "vllm/vllm-openai:v0.11.0", **spec}}
        self.api.store(base_model_path(name), body)
        await self.base_model_event(name)

    async def base_model_event(self, name: str = BASE) -> None:
        body = self.api.objects.get(base_model_path(name))
        if body is None:
            self.indices["base_model_index"].pop((NS, name), None)
        else:
            self.indices["base_model_index"][(NS, name)] = [copy.deepcopy(body)]
        await self.reconciler.base_model_changed((NS, name), copy.deepcopy(body))

    async def create_adapter(self, name: str, **spec: Any) -> None:
        second = next(self._clock)  # creation order decides who keeps a served name
        body = {"apiVersion": API_VERSION, "kind": "LoraAdapter",
                "metadata": {"name": name, "namespace": NS,
                             "creationTimestamp": f"2026-01-01T00:{second // 60:02}:{second % 60:02}Z"},
                "spec": {"baseModel": BASE, "source": f"s3://bucket/{name}", **spec}}
        self.api.store(adapter_path(name), body)
        await self.adapter_event(name)

    async def adapter_event(self, name: str) -> None:
        """What kopf delivers for the adapter as it is now (None once it is gone)."""
        body = self.api.objects.get(adapter_path(name))
        await self.reconciler.adapter_changed((NS, name), copy.deepcopy(body))

    async def settle(self, *adapters: str) -> None:
        """Deliver the echoes of our own writes until nothing more is written."""
        for _ in range(5):
            before = len(self.api.writes())
            for name in adapters:
                await self.adapter_event(name)
            await self.base_model_event()
            if len(self.api.writes()) == before:
                return
        raise AssertionError("the reconciler keeps writing")

    def add_replica(self, pod: str) -> None:
        self.indices["replica_index"].setdefault((NS, BASE), []).append((pod, None))

    def remove_replica(self, pod: str) -> None:
        self.indices["replica_index"][(NS, BASE)].remove((pod, None))

    async def report(self, pod: str, states: dict[str, str | dict[str, Any] | None]) -> None:
        """A sidecar patches its pod's LoraReplica (a state, or an entry's fields; None removes the adapter's
        entry), and kopf delivers the event after updating its index. The sidecar's write is not the operator's
        request."""
        path = replica_path(pod)
        current = self.api.objects.get(path) or {
            "apiVersion": API_VERSION, "kind": "LoraReplica", "metadata": {"name": pod, "namespace": NS},
            "spec": {"baseModel": BASE}}
        entries = {adapter: None if state is None else {
            **({"state": state} if isinstance(state, str) else state),
            "observedGeneration": self.api.objects[adapter_path(adapter)]["metadata"]["generation"]}
            for adapter, state in states.items()}
        self.api.store(path, merge(copy.deepcopy(current), {"status": {"adapters": entries}}))
        await self.report_event(pod)

    async def report_event(self, pod: str) -> None:
        body = self.api.objects.get(replica_path(pod))
        adapters = None if body is None else copy.deepcopy((body.get("status") or {}).get("adapters") or {})
        reports = [r for r in self.indices["replica_report_index"].get((NS, BASE), []) if r[0] != pod]
        self.indices["replica_report_index"][(NS, BASE)] = reports + ([(pod, adapters)] if body else [])
        await self.reconciler.report_changed((NS, BASE), pod, adapters)

    def adapter_set(self) -> list[dict[str, Any]]:
        [configmap] = [o for o in self.api.objects.values() if o.get("kind") == "ConfigMap"]
        return json.loads(configmap["data"][DATA_KEY])["adapters"]

    def status(self, adapter: str) -> dict[str, Any]:
        return self.api.objects[adapter_path(adapter)].get("status") or {}

    def condition(self, adapter: str, type_: str) -> dict[str, Any]:
        return next(c for c in self.status(adapter)["conditions"] if c["type"] == type_)


async def test_an_adapter_of_an_existing_base_model_goes_into_its_adapter_set():
    cluster = Cluster()
    await cluster.create_base_model()
    await cluster.create_adapter("math", servedName="math-v1")

    [entry] = cluster.adapter_set()
    assert (entry["name"], entry["servedName"], entry["source"]) == ("math", "math-v1", "s3://bucket/math")
    assert FINALIZER in cluster.api.objects[adapter_path("math")]["metadata"]["finalizers"]
    assert cluster.status("math")["phase"] == "Pending"  # accepted, but no replica runs yet
    assert cluster.condition("math", "Ready")["reason"] == "NoReplicas"


async def test_an_adapter_waits_for_its_base_model_and_joins_its_set_when_it_appears():
    cluster = Cluster()
    await cluster.create_adapter("math")
    assert cluster.condition("math", "Ready")["reason"] == "BaseModelNotFound"
    await cluster.create_base_model()
    assert [a["name"] for a in cluster.adapter_set()] == ["math"]
    assert cluster.condition("math", "Ready")["reason"] == "NoReplicas"


async def test_the_later_of_two_adapters_claiming_one_served_name_is_refused():
    cluster = Cluster()
    await cluster.create_base_model()
    await cluster.create_adapter("first", servedName="shared")
    await cluster.create_adapter("second", servedName="shared")

    assert [a["name"] for a in cluster.adapter_set()] == ["first"]
    assert cluster.status("second")["phase"] == "Failed"
    ready = cluster.condition("second", "Ready")
    assert ready["reason"] == "DuplicateServedName"
    assert "served name 'shared' is already used by LoraAdapter 'first'" in ready["message"]
    assert cluster.status("first")["phase"] == "Pending"

    # The holder leaves: the name passes to the other adapter.
    cluster.api.objects.pop(adapter_path("first"))
    await cluster.adapter_event("first")
    assert [a["name"] for a in cluster.adapter_set()] == ["second"]
    assert cluster.condition("second", "Ready")["reason"] == "NoReplicas"


async def test_reconciling_again_without_a_change_writes_nothing():
    cluster = Cluster()
    cluster.add_replica("pod-a")
    await cluster.create_base_model()
    await cluster.create_adapter("math")
    await cluster.create_adapter("code")
    await cluster.settle("math", "code")
    writes = len(cluster.api.writes())

    await cluster.reconciler.reconcile_base_model((NS, BASE))
    await cluster.reconciler.refresh_adapters((NS, BASE))
    await cluster.settle("math", "code")
    # The periodic resync forgets every shortcut; with the cluster as desired, its pass still writes nothing.
    cluster.reconciler.forget_shortcuts()
    await cluster.reconciler.load_adapters()
    await cluster.reconciler.reconcile_base_model((NS, BASE))
    await cluster.settle("math", "code")
    assert cluster.api.writes()[writes:] == []


async def test_the_echo_of_our_own_adapter_set_write_costs_no_request():
    cluster = Cluster()
    await cluster.create_base_model()
    await cluster.create_adapter("math")
    [configmap] = [o for o in cluster.api.objects.values() if o.get("kind") == "ConfigMap"]
    requests = len(cluster.api.requests)
    await cluster.reconciler.sync_adapter_set((NS, BASE), copy.deepcopy(configmap))
    assert cluster.api.requests[requests:] == []

    edited = merge(copy.deepcopy(configmap), {"data": {DATA_KEY: '{"adapters": []}'}})  # someone edits it
    cluster.api.store(resource_path("v1", "configmaps", NS, configmap["metadata"]["name"]), edited)
    await cluster.reconciler.sync_adapter_set((NS, BASE), edited)
    assert [a["name"] for a in cluster.adapter_set()] == ["math"]


async def test_an_adapter_is_ready_once_every_live_replica_reports_it_loaded():
    cluster = Cluster()
    cluster.add_replica("pod-a")
    cluster.add_replica("pod-b")
    await cluster.create_base_model()
    await cluster.create_adapter("math")
    assert cluster.status("math")["phase"] == "Loading"

    await cluster.report("pod-a", {"math": "Loaded"})
    assert (cluster.status("math")["phase"], cluster.status("math")["readyReplicas"]) == ("Loading", 1)
    assert cluster.condition("math", "Ready")["message"] == "Loaded on 1 of 2 replica(s)."
    assert cluster.status("math")["replicaStatus"] == {"pod-a": {"state": "Loaded", "observedGeneration": 1}}

    await cluster.report("pod-b", {"math": "Loaded"})
    await cluster.adapter_event("math")  # the echo of our status write brings the phase to the base model
    assert cluster.status("math")["phase"] == "Ready"
    assert set(cluster.status("math")["replicaStatus"]) == {"pod-a", "pod-b"}
    assert cluster.condition("math", "Ready")["status"] == "True"
    assert any(e["reason"] == "Loaded" and e["message"].startswith("Ready:") for e in cluster.api.events())
    base_status = cluster.api.objects[base_model_path()]["status"]
    assert (base_status["adapters"], base_status["adaptersReady"]) == (1, 1)


async def test_a_report_costs_one_status_write_per_changed_adapter_and_nothing_at_rest():
    cluster = Cluster()
    cluster.add_replica("pod-a")
    cluster.add_replica("pod-b")
    await cluster.create_base_model()
    names = [f"a{i:02}" for i in range(20)]
    for name in names:
        await cluster.create_adapter(name)
    await cluster.settle(*names)
    before = len(cluster.api.writes())

    await cluster.report("pod-a", dict.fromkeys(names, "Loaded"))  # one sidecar write, 20 adapters changed
    assert sorted(path for _, path, _ in cluster.api.writes()[before:]) == [
        adapter_path(name) + "/status" for name in names]
    await cluster.settle(*names)
    before = len(cluster.api.writes())
    await cluster.report("pod-b", {"a07": "Downloading"})  # one adapter changed: one write
    assert [path for _, path, _ in cluster.api.writes()[before:]] == [adapter_path("a07") + "/status"]
    await cluster.settle(*names)

    # At rest: the same reports again (a re-list, a resync) and a full resync write nothing.
    before = len(cluster.api.writes())
    for pod in ("pod-a", "pod-b"):
        await cluster.report_event(pod)
    cluster.reconciler.forget_shortcuts()
    await cluster.reconciler.load_adapters()
    await cluster.reconciler.reconcile_base_model((NS, BASE))
    await cluster.settle(*names)
    assert cluster.api.writes()[before:] == []


async def test_a_report_of_a_pod_that_is_not_live_is_ignored_and_a_gone_pod_leaves_the_status():
    cluster = Cluster()
    cluster.add_replica("pod-a")
    cluster.add_replica("pod-b")
    await cluster.create_base_model()
    await cluster.create_adapter("math")
    await cluster.report("pod-a", {"math": "Loaded"})
    await cluster.report("pod-b", {"math": "Loaded"})
    await cluster.settle("math")
    before = len(cluster.api.writes())

    await cluster.report("pod-old", {"math": "Failed"})  # its pod is gone: its report is not counted
    assert cluster.api.writes()[before:] == []
    assert cluster.status("math")["phase"] == "Ready"

    cluster.remove_replica("pod-b")  # kopf's pod event
    await cluster.reconciler.refresh_adapters((NS, BASE))
    assert list(cluster.status("math")["replicaStatus"]) == ["pod-a"]
    assert cluster.status("math")["replicas"] == 1


async def test_a_report_whose_status_write_failed_is_decided_again_when_retried():
    cluster = Cluster()
    cluster.add_replica("pod-a")
    await cluster.create_base_model()
    await cluster.create_adapter("math")
    patch = cluster.api.merge_patch

    async def refused(path: str, body: dict[str, Any]) -> dict[str, Any]:
        raise ApiError(503, "ServiceUnavailable", "the API server is restarting")

    cluster.api.merge_patch = refused  # type: ignore[method-assign]
    with pytest.raises(ApiError):
        await cluster.report("pod-a", {"math": "Loaded"})
    cluster.api.merge_patch = patch  # type: ignore[method-assign]
    await cluster.report_event("pod-a")  # what handlers.py's retry runs: the same report again
    assert cluster.status("math")["phase"] == "Ready"


async def test_a_deleted_adapter_is_released_then_forgotten():
    cluster = Cluster()
    cluster.add_replica("pod-a")
    await cluster.create_base_model()
    await cluster.create_adapter("math")
    await cluster.report("pod-a", {"math": "Loaded"})
    await cluster.adapter_event("math")
    assert (NS, "math") in cluster.reconciler.adapter_records

    # kubectl delete: the finalizer holds the object until no replica reports it any more.
    path = adapter_path("math")
    cluster.api.store(path, merge(copy.deepcopy(cluster.api.objects[path]),
                                  {"metadata": {"deletionTimestamp": "2026-01-01T00:01:00Z"}}))
    await cluster.adapter_event("math")
    assert cluster.adapter_set() == []
    assert cluster.status("math")["phase"] == "Terminating"
    assert FINALIZER in cluster.api.objects[path]["metadata"]["finalizers"]

    await cluster.report("pod-a", {"math": "Unloading"})
    assert FINALIZER in cluster.api.objects[path]["metadata"]["finalizers"]
    await cluster.report("pod-a", {"math": None})  # the sidecar unloaded it
    assert not cluster.api.objects[path]["metadata"].get("finalizers")

    cluster.api.objects.pop(path)  # the API server removes it once no finalizer is left
    await cluster.adapter_event("math")
    assert (NS, "math") not in cluster.reconciler.adapter_records
    assert cluster.api.objects[base_model_path()]["status"]["adapters"] == 0


async def test_a_deleted_base_model_is_forgotten_and_its_adapters_wait():
    cluster = Cluster()
    await cluster.create_base_model()
    await cluster.create_adapter("math")
    assert (NS, BASE) in cluster.reconciler.base_model_records

    cluster.api.objects.pop(base_model_path())
    await cluster.base_model_event()
    assert (NS, BASE) not in cluster.reconciler.base_model_records
    assert cluster.condition("math", "Ready")["reason"] == "BaseModelNotFound"


async def test_an_invalid_base_model_spec_is_reported_and_nothing_is_applied():
    cluster = Cluster()
    await cluster.create_base_model(replicas=-1)
    assert [method for method, path, _ in cluster.api.writes() if "/status" not in path
            and not path.endswith("/events")] == []
    reconciled = next(c for c in cluster.api.objects[base_model_path()]["status"]["conditions"]
                      if c["type"] == "Reconciled")
    assert (reconciled["status"], reconciled["reason"]) == ("False", "InvalidSpec")
    assert "spec.replicas" in reconciled["message"]


def test_a_burst_of_adapters_is_published_in_a_few_adapter_set_writes():
    async def burst() -> tuple[Cluster, float]:
        cluster = Cluster(OperatorSettings(sidecar_image="loraplex/loraplex:test", batch_seconds=0.2))
        await cluster.create_base_model()
        loop = asyncio.get_running_loop()
        begin = loop.time()
        await asyncio.gather(*(cluster.create_adapter(f"a{i:02}") for i in range(40)))
        return cluster, loop.time() - begin

    cluster, elapsed = run_in_virtual_time(burst())
    assert len(cluster.adapter_set()) == 40
    assert 1 <= len(cluster.api.writes("configmaps")) <= 3  # not one per adapter
    assert elapsed >= 0.2  # the burst waited out the pacing interval, in virtual time


def test_a_coalescer_folds_a_burst_for_one_key_into_one_run_per_interval():
    async def burst() -> list[float]:
        loop = asyncio.get_running_loop()
        starts: list[float] = []

        async def work(_: str) -> None:
            starts.append(loop.time())
            await asyncio.sleep(0.05)

        coalescer = Coalescer(work, min_interval=1.0)
        for _ in range(3):  # three bursts of 100 requests, 0.3 s apart
            await asyncio.gather(*(coalescer.run("key") for _ in range(100)), asyncio.sleep(0.3))
        return starts

    starts = run_in_virtual_time(burst())
    assert len(starts) <= 4
    assert all(later - earlier >= 1.0 for earlier, later in itertools.pairwise(starts))


@pytest.mark.parametrize("batch_seconds", [0, 0.2])
def test_the_pace_does_not_change_what_is_published(batch_seconds):
    async def scenario() -> Cluster:
        cluster = Cluster(OperatorSettings(sidecar_image="loraplex/loraplex:test", batch_seconds=batch_seconds))
        await cluster.create_base_model()
        for name in ("a", "b", "c"):
            await cluster.create_adapter(name)
        return cluster

    cluster = run_in_virtual_time(scenario())
    assert [a["name"] for a in cluster.adapter_set()] == ["a", "b", "c"]


async def test_a_base_model_whose_runtime_version_is_assumed_gets_one_warning_until_the_spec_says_it():
    cluster = Cluster()
    await cluster.create_base_model(runtime="nim", image="nvcr.io/nim/meta/llama3-8b-instruct:latest")
    await cluster.reconciler.reconcile_base_model((NS, BASE))  # again: no second warning for the same spec
    [warning] = [e for e in cluster.api.events() if e["reason"] == "RuntimeVersionAssumed"]
    assert warning["type"] == "Warning"
    assert warning["message"].startswith("The NIM version is unknown") and "spec.runtimeVersion" in warning["message"]

    body = cluster.api.objects[base_model_path()]
    cluster.api.store(base_model_path(), merge(copy.deepcopy(body), {"spec": {"runtimeVersion": "2.0.5"}}))
    await cluster.base_model_event()
    assert len([e for e in cluster.api.events() if e["reason"] == "RuntimeVersionAssumed"]) == 1


async def test_a_base_model_with_a_known_runtime_version_gets_no_version_warning():
    cluster = Cluster()
    await cluster.create_base_model()  # vllm/vllm-openai:v0.11.0
    assert [e for e in cluster.api.events() if e["reason"] == "RuntimeVersionAssumed"] == []
