"""The sidecar's replica report, against an in-memory API server in virtual time: one LoraReplica per pod,
patched with only what changed, in few requests, never while nothing changes, and repaired when lost."""

from __future__ import annotations

import asyncio
import copy
import itertools
from collections.abc import AsyncIterator
from typing import Any

from loraplex.api.types import DemandLevel, ReplicaAdapterStatus
from loraplex.kube import ApiError, Conflict, NotFound
from loraplex.sidecar.reporter import ReplicaReporter
from tests.fakes.virtual_time import run_in_virtual_time
from tests.unit.test_reconciler import merge

POD, NAMESPACE = "llama3-0", "default"
LATENCY = 0.02  # seconds each request takes, in virtual time


class FakeReplicaApi:
    """The calls the reporter makes on its one LoraReplica, each recorded; edits and deletions by others are
    delivered to its watch."""

    def __init__(self) -> None:
        self.object: dict[str, Any] | None = None
        self.requests: list[tuple[str, str, Any]] = []
        self.failures = 0  # the next writes answered with 503
        self._versions = itertools.count(1)
        self.version = 0  # the newest resource version
        self._events: asyncio.Queue[tuple[dict[str, Any], int]] = asyncio.Queue()

    def writes(self) -> list[tuple[str, str, Any]]:
        return [r for r in self.requests if r[0] in ("POST", "PATCH")]

    def adapters(self) -> dict[str, Any]:
        return ((self.object or {}).get("status") or {}).get("adapters") or {}

    async def _request(self, method: str, path: str, body: Any = None) -> None:
        self.requests.append((method, path, copy.deepcopy(body)))
        await asyncio.sleep(LATENCY)
        if method in ("POST", "PATCH") and self.failures:
            self.failures -= 1
            raise ApiError(503, "ServiceUnavailable", "the API server is restarting")

    def _store(self, body: dict[str, Any], event: str) -> dict[str, Any]:
        self.version = next(self._versions)
        body["metadata"]["resourceVersion"] = str(self.version)
        self.object = body
        self._events.put_nowait(({"type": event, "object": copy.deepcopy(body)}, self.version))
        return copy.deepcopy(body)

    async def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        await self._request("POST", path, body)
        if self.object is not None:
            raise Conflict(409, "AlreadyExists", path)
        body = copy.deepcopy(body)
        body["metadata"]["uid"] = f"uid-{next(self._versions)}"
        return self._store(body, "ADDED")

    async def get(self, path: str) -> dict[str, Any]:
        await self._request("GET", path)
        if self.object is None:
            raise NotFound(404, "NotFound", path)
        return copy.deepcopy(self.object)

    async def merge_patch(self, path: str, patch: dict[str, Any]) -> dict[str, Any]:
        await self._request("PATCH", path, patch)
        if self.object is None:
            raise NotFound(404, "NotFound", path)
        assert path.endswith(f"/lorareplicas/{POD}/status") and set(patch) == {"status"}
        return self._store(merge(copy.deepcopy(self.object), patch), "MODIFIED")

    async def list(self, path: str, field_selector: str | None = None, **_: Any) -> dict[str, Any]:
        await self._request("LIST", path)
        assert field_selector == f"metadata.name={POD}"
        items = [copy.deepcopy(self.object)] if self.object else []
        return {"items": items, "metadata": {"resourceVersion": str(self.version)}}

    async def watch(self, path: str, resource_version: str, **_: Any) -> AsyncIterator[dict[str, Any]]:
        """Events after `resource_version` (a deletion's own version is the one after the object's last)."""
        self.requests.append(("WATCH", path, None))
        while True:
            event, version = await self._events.get()
            if version > int(resource_version):
                yield event

    def delete(self) -> None:
        """Someone deletes the LoraReplica (the garbage collector would, were the pod gone)."""
        assert self.object is not None
        gone, self.object = self.object, None
        self.version = next(self._versions)
        self._events.put_nowait(({"type": "DELETED", "object": gone}, self.version))

    def edit(self, patch: dict[str, Any]) -> None:
        assert self.object is not None
        self._store(merge(copy.deepcopy(self.object), patch), "MODIFIED")


class Sidecar:
    def __init__(self, api: FakeReplicaApi, min_interval: float = 0.25) -> None:
        self.api = api
        self.reporter = ReplicaReporter(api, NAMESPACE, POD, "pod-uid", "llama3",  # type: ignore[arg-type]
                                        min_interval=min_interval)
        self.tasks = [asyncio.create_task(self.reporter.run()), asyncio.create_task(self.reporter.watch())]

    def stop(self) -> None:
        for task in self.tasks:
            task.cancel()


def entry(state: str, **fields: Any) -> ReplicaAdapterStatus:
    return ReplicaAdapterStatus(state=state, observed_generation=1, **fields)


def in_virtual_time(scenario: Any) -> Any:
    async def run() -> Any:
        api = FakeReplicaApi()
        sidecar = Sidecar(api)
        try:
            return await scenario(api, sidecar)
        finally:
            sidecar.stop()
    return run_in_virtual_time(run())


def test_the_first_report_creates_the_pods_lorareplica_owned_by_the_pod():
    async def scenario(api: FakeReplicaApi, sidecar: Sidecar) -> None:
        sidecar.reporter.set("math", entry("Loaded", rank=8))
        await asyncio.sleep(1)
        meta = api.object["metadata"]
        assert (meta["name"], meta["namespace"]) == (POD, NAMESPACE)
        assert meta["labels"] == {"loraplex.io/base-model": "llama3"}
        assert meta["ownerReferences"] == [{"apiVersion": "v1", "kind": "Pod", "name": POD, "uid": "pod-uid"}]
        assert api.object["spec"] == {"baseModel": "llama3"}
        assert api.adapters()["math"]["rank"] == 8
        assert (api.object["status"]["loaded"], api.object["status"]["failed"]) == (1, 0)

    in_virtual_time(scenario)


def test_a_burst_of_changes_to_many_adapters_takes_a_few_writes():
    adapters = [f"a{i:03}" for i in range(500)]

    async def scenario(api: FakeReplicaApi, sidecar: Sidecar) -> int:
        # Found on the volume at start-up, then the runtime restarts: all of them go back and are loaded again.
        for state in ("Loaded", "Pending", "Loaded"):
            for name in adapters:
                sidecar.reporter.set(name, entry(state))
                await asyncio.sleep(0.001)
        await asyncio.sleep(5)
        assert api.object["status"]["loaded"] == 500
        return len(api.writes())

    writes = in_virtual_time(scenario)
    assert writes <= 3 * 500 / 10, f"{writes} writes for 3 x 500 changes"  # each carries tens of them


def test_loading_adapters_one_after_another_takes_fewer_writes_than_adapters_and_none_at_rest():
    adapters = [f"a{i:03}" for i in range(200)]

    async def load(reporter: ReplicaReporter, name: str, index: int) -> None:
        # Downloads of 4 at a time with progress every 10 ms, then loads a few milliseconds apart.
        await asyncio.sleep(0.5 * (index // 4))
        for done in range(0, 100, 2):
            reporter.set(name, entry("Downloading", bytes_done=done, bytes_total=100))
            await asyncio.sleep(0.01)
        reporter.set(name, entry("Validating"))
        await asyncio.sleep(0.003 * (index % 4))
        reporter.set(name, entry("Loaded", rank=8))

    async def scenario(api: FakeReplicaApi, sidecar: Sidecar) -> tuple[int, int]:
        for name in adapters:
            sidecar.reporter.set(name, entry("Pending"))
        await asyncio.gather(*(load(sidecar.reporter, name, i) for i, name in enumerate(adapters)))
        await asyncio.sleep(5)
        loading = len(api.writes())
        assert {e["state"] for e in api.adapters().values()} == {"Loaded"} and len(api.adapters()) == 200
        assert api.object["status"]["loaded"] == 200
        requests = len(api.requests)
        await asyncio.sleep(24 * 3600)  # a day at rest
        return loading, len(api.requests) - requests

    loading, at_rest = in_virtual_time(scenario)
    # One write per adapter and state change (Pending, Downloading every 0.25 s, Validating, Loaded) would be
    # at least 200 x 5 = 1,000 here; progress is paced for the whole replica, outcomes share a write.
    assert loading < 200, f"{loading} writes for 200 adapters"
    assert at_rest == 0


def test_a_patch_carries_only_what_changed_and_null_removes_an_entry():
    async def scenario(api: FakeReplicaApi, sidecar: Sidecar) -> None:
        sidecar.reporter.set("math", entry("Loaded", rank=8))
        sidecar.reporter.set("code", entry("Loaded", rank=16))
        await asyncio.sleep(1)
        before = len(api.requests)
        sidecar.reporter.set("math", entry("Loaded", rank=8))  # unchanged: nothing to write
        await asyncio.sleep(1)
        assert api.requests[before:] == []
        sidecar.reporter.set("code", None)
        await asyncio.sleep(1)
        [(method, _, patch)] = api.requests[before:]
        assert (method, patch["status"]["adapters"]) == ("PATCH", {"code": None})
        assert list(api.adapters()) == ["math"] and api.object["status"]["loaded"] == 1

    in_virtual_time(scenario)


def test_an_entry_written_again_loses_the_fields_it_no_longer_has():
    async def scenario(api: FakeReplicaApi, sidecar: Sidecar) -> None:
        sidecar.reporter.set("math", entry("Pending", message="Waiting for a download slot.", bytes_done=0))
        await asyncio.sleep(1)
        sidecar.reporter.set("math", entry("Loaded", rank=8))
        await asyncio.sleep(1)
        assert {k: v for k, v in api.adapters()["math"].items() if k != "updated"} == {
            "state": "Loaded", "observedGeneration": 1, "rank": 8}  # a merge patch alone would keep the message
        patch = api.writes()[-1][2]["status"]["adapters"]["math"]
        assert (patch["message"], patch["bytesDone"], patch["state"]) == (None, None, "Loaded")
        assert "observedGeneration" not in patch  # unchanged: not sent

    in_virtual_time(scenario)


def test_progress_is_paced_and_outcomes_go_out_at_once():
    async def scenario(api: FakeReplicaApi, sidecar: Sidecar) -> None:
        sidecar.reporter.set("math", entry("Downloading", bytes_done=0))
        await asyncio.sleep(0.1)
        first = len(api.writes())
        for done in range(1, 20):  # 19 updates within 0.1 s: one write when the interval has passed
            sidecar.reporter.set("math", entry("Downloading", bytes_done=done))
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.5)
        [(_, _, patch)] = api.writes()[first:]
        assert patch["status"]["adapters"]["math"]["bytesDone"] == 19
        sidecar.reporter.set("math", entry("Loaded"))
        await asyncio.sleep(2 * LATENCY)  # no pacing delay for an outcome: the next request carries it
        assert api.adapters()["math"]["state"] == "Loaded"

    in_virtual_time(scenario)


def test_a_deleted_lorareplica_is_created_again_with_every_entry():
    async def scenario(api: FakeReplicaApi, sidecar: Sidecar) -> None:
        for name in ("math", "code", "chat"):
            sidecar.reporter.set(name, entry("Loaded"))
        sidecar.reporter.set("broken", entry("Failed", reason="ValidationFailed", message="r=128 is too high"))
        await asyncio.sleep(1)
        api.delete()
        await asyncio.sleep(3)
        assert set(api.adapters()) == {"math", "code", "chat", "broken"}
        assert (api.object["status"]["loaded"], api.object["status"]["failed"]) == (3, 1)
        assert api.adapters()["broken"]["message"] == "r=128 is too high"

    in_virtual_time(scenario)


def test_an_edit_by_someone_else_is_written_back_and_our_own_echoes_are_not():
    async def scenario(api: FakeReplicaApi, sidecar: Sidecar) -> None:
        sidecar.reporter.set("math", entry("Loaded", rank=8))
        sidecar.reporter.set("code", entry("Loaded", rank=16))
        await asyncio.sleep(1)
        writes = len(api.writes())
        api.edit({"status": {"adapters": {"math": {"state": "Failed"}, "code": None, "ghost": {"state": "Loaded"}}}})
        await asyncio.sleep(1)
        assert api.adapters()["math"]["state"] == "Loaded" and api.adapters()["code"]["rank"] == 16
        assert "ghost" not in api.adapters()
        assert len(api.writes()) == writes + 1  # one patch repairs it all, and its echo costs nothing
        await asyncio.sleep(3600)
        assert len(api.writes()) == writes + 1

    in_virtual_time(scenario)


def test_failed_writes_are_retried_with_backoff_and_coalesced():
    async def scenario(api: FakeReplicaApi, sidecar: Sidecar) -> None:
        sidecar.reporter.set("math", entry("Loaded"))
        await asyncio.sleep(1)
        writes = len(api.writes())
        api.failures = 3
        for name in ("a", "b", "c", "d"):
            sidecar.reporter.set(name, entry("Loaded"))
            await asyncio.sleep(0.1)
        await asyncio.sleep(30)
        assert set(api.adapters()) == {"math", "a", "b", "c", "d"}
        assert len(api.writes()) - writes == 4  # three refused, then one carrying every change

    in_virtual_time(scenario)


def test_a_restarted_sidecar_adopts_its_report_and_drops_only_what_it_no_longer_holds():
    async def scenario(api: FakeReplicaApi, sidecar: Sidecar) -> None:
        sidecar.reporter.set("math", entry("Loaded", rank=8))
        sidecar.reporter.set("gone", entry("Loaded", rank=8))
        await asyncio.sleep(1)
        sidecar.stop()
        writes = len(api.writes())

        again = Sidecar(api)  # the container restarts; the pod and its LoraReplica stay
        try:
            again.reporter.set("math", entry("Loaded", rank=8))  # found on the volume, as before
            again.reporter.drop_unclaimed({"math"})  # the first adapter set no longer has "gone"
            await asyncio.sleep(1)
            assert list(api.adapters()) == ["math"]
            [(_, _, patch)] = api.writes()[writes:]
            assert patch["status"]["adapters"] == {"gone": None}  # math was not written again
        finally:
            again.stop()

    in_virtual_time(scenario)


def test_demand_rides_on_loaded_entries_and_only_a_change_of_level_is_written():
    async def scenario(api: FakeReplicaApi, sidecar: Sidecar) -> None:
        sidecar.reporter.set("math", entry("Loaded"))
        sidecar.reporter.set("code", entry("Downloading"))
        await asyncio.sleep(1)
        before = len(api.requests)
        sidecar.reporter.set_demands({"math": DemandLevel.QUEUED, "code": DemandLevel.QUEUED})
        await asyncio.sleep(1)
        [(_, _, patch)] = api.requests[before:]
        assert patch["status"]["adapters"]["math"]["demand"] == "Queued"
        assert "demand" not in api.adapters()["code"]  # not Loaded: no level
        before = len(api.requests)
        sidecar.reporter.set_demands({"math": DemandLevel.QUEUED})  # the same level: nothing to write
        sidecar.reporter.set("math", entry("Loaded"))  # the lifecycle says Loaded again: the level stays
        await asyncio.sleep(1)
        assert api.requests[before:] == []
        sidecar.reporter.set("math", entry("Unloading"))
        await asyncio.sleep(1)
        assert "demand" not in api.adapters()["math"]
        sidecar.reporter.set("math", entry("Loaded"))  # loaded again: the level from before does not come back
        await asyncio.sleep(1)
        assert "demand" not in api.adapters()["math"]

    in_virtual_time(scenario)
