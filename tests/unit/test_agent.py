"""The sidecar's agent in process: the real volume store, validators and file:// downloader, a runtime client
that keeps what it serves in a dict, and a reporter that keeps the latest entry per adapter. What a user sees
is the replica entry and what the runtime serves; the tests assert on those."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from loraplex.api.adapter_set import AdapterLimits, AdapterSet, DesiredAdapter
from loraplex.api.contract import SidecarSettings
from loraplex.api.types import AdapterFormat, ReplicaAdapterStatus, Runtime
from loraplex.sidecar import slots
from loraplex.sidecar.agent import Agent
from loraplex.sidecar.reporter import ReplicaReporter
from loraplex.sidecar.runtimes import LoadFailed, RuntimeUnavailable
from loraplex.sources import Downloader
from tests.adapters import make_hf_adapter
from tests.unit.test_reporter import FakeReplicaApi

PEFT_DIR = "/peft/adapters"


class ServingRuntime:
    """The RuntimeClient protocol over a dict, with vLLM's rules: one path per name, a load of the same name
    and path again is a no-op, and adapters are gone after a restart."""

    def __init__(self) -> None:
        self.served: dict[str, str] = {}
        self.up = True
        self.refuse: dict[str, str] = {}  # name -> the runtime's refusal
        self.loads: list[tuple[str, str]] = []

    async def healthy(self) -> bool:
        return self.up

    async def served_adapters(self) -> dict[str, str | None]:
        if not self.up:
            raise RuntimeUnavailable("connection refused")
        return dict(self.served)

    async def load(self, name: str, path: str) -> None:
        if not self.up:
            raise RuntimeUnavailable("connection refused")
        if name in self.refuse:
            raise LoadFailed(self.refuse[name])
        self.loads.append((name, path))
        self.served[name] = path

    async def unload(self, name: str) -> None:
        if not self.up:
            raise RuntimeUnavailable("connection refused")
        self.served.pop(name, None)

    async def retired(self, name: str) -> None:
        pass

    async def close(self) -> None:
        pass

    def restart(self) -> None:
        self.served.clear()


class LatestEntries:
    """What the ReplicaReporter would have written last, per adapter."""

    def __init__(self) -> None:
        self.entries: dict[str, dict[str, Any] | None] = {}

    def set(self, adapter: str, entry: ReplicaAdapterStatus | None) -> None:
        self.entries[adapter] = entry.to_wire() if entry is not None else None

    def drop_unclaimed(self, keep: set[str]) -> None:
        pass

    def state(self, adapter: str) -> str | None:
        return (self.entries.get(adapter) or {}).get("state")


def make_adapter_store(store: Path) -> Path:
    """The adapters the agent tests sync: math and its second version (rank 8), and wide (rank 32)."""
    make_hf_adapter(store / "math", rank=8, seed=1)
    make_hf_adapter(store / "math-v2", rank=8, seed=2)
    make_hf_adapter(store / "wide", rank=32, seed=3)
    return store


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter_store(tmp_path_factory.mktemp("store"))


class Replica:
    def __init__(self, tmp_path: Path, store: Path, runtime: ServingRuntime | None = None, reporter: Any = None):
        self.store, self.volume = store, tmp_path / "volume"
        self.runtime = runtime or ServingRuntime()
        self.reporter = reporter or LatestEntries()
        self.settings = SidecarSettings(
            pod_name="pod-0", namespace="default", adapter_set="base-adapters", runtime=Runtime.VLLM,
            runtime_url="http://127.0.0.1:1", served_model="base", volume_dir=self.volume, peft_dir=PEFT_DIR,
            store_root=store, runtime_poll_seconds=0.02, local_rescan_seconds=3600)
        self.generations: dict[str, int] = {}
        self.fetches = 0

    async def __aenter__(self) -> Replica:
        self.session = aiohttp.ClientSession()
        downloader = Downloader(self.session, store_root=self.store)
        fetch = downloader.fetch

        async def counted_fetch(*args: Any, **kwargs: Any) -> Any:
            self.fetches += 1
            return await fetch(*args, **kwargs)

        downloader.fetch = counted_fetch  # type: ignore[method-assign]
        self.agent = Agent(self.settings, self.reporter, self.runtime, downloader)  # type: ignore[arg-type]
        self.tasks = [asyncio.create_task(self.agent.run()), asyncio.create_task(self.agent.watch_runtime())]
        if isinstance(self.reporter, ReplicaReporter):
            self.tasks += [asyncio.create_task(self.reporter.run()), asyncio.create_task(self.reporter.watch())]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self.tasks:
            task.cancel()
        for slot in self.agent.slots.values():
            if slot.worker is not None:
                slot.worker.task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.session.close()

    def want(self, **adapters: str) -> None:
        """Desired: served name -> folder in the store; a changed folder is a new generation."""
        entries = []
        for name, folder in adapters.items():
            entries.append(DesiredAdapter(name=name, uid=f"uid-{name}", generation=self.generation(name, folder),
                                          served_name=name, source=f"file://{self.store / folder}"))
        self.agent.on_adapter_set(AdapterSet(
            base_model="base", runtime=Runtime.VLLM, adapters=entries,
            limits=AdapterLimits(max_rank=16, allowed_formats=[AdapterFormat.HF])))

    def generation(self, name: str, folder: str) -> int:
        key = f"{name}:{folder}"
        if key not in self.generations:
            self.generations[key] = len([k for k in self.generations if k.startswith(f"{name}:")]) + 1
        return self.generations[key]

    def entry(self, adapter: str) -> dict[str, Any]:
        return self.reporter.entries.get(adapter) or {}

    def folders(self) -> list[str]:
        adapters = self.volume / "adapters"
        return sorted(str(p.relative_to(adapters)) for p in adapters.glob("*/*")) if adapters.is_dir() else []


async def until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(2000):  # 20 s
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def test_a_new_adapter_is_fetched_validated_and_served(tmp_path, adapters):
    async with Replica(tmp_path, adapters) as replica:
        replica.want(math="math")
        await until(lambda: replica.reporter.state("math") == "Loaded", "math Loaded")
        entry = replica.entry("math")
        assert (entry["observedGeneration"], entry["format"], entry["rank"]) == (1, "hf", 8)
        assert replica.runtime.served["math"] == f"{PEFT_DIR}/{replica.folders()[0]}"
        assert replica.agent.initial_sync_done


async def test_an_update_serves_the_new_generation_from_its_own_folder_and_deletes_the_old(tmp_path, adapters):
    async with Replica(tmp_path, adapters) as replica:
        replica.want(math="math")
        await until(lambda: replica.reporter.state("math") == "Loaded", "generation 1 Loaded")
        first = replica.runtime.served["math"]
        replica.want(math="math-v2")
        await until(lambda: replica.entry("math").get("observedGeneration") == 2
                    and replica.reporter.state("math") == "Loaded", "generation 2 Loaded")
        assert replica.runtime.served["math"] != first
        assert [f"{PEFT_DIR}/{folder}" for folder in replica.folders()] == [replica.runtime.served["math"]]


async def test_a_refused_adapter_is_not_retried_and_its_entry_goes_when_it_is_deleted(tmp_path, adapters):
    async with Replica(tmp_path, adapters) as replica:
        replica.want(math="math", wide="wide")
        await until(lambda: replica.reporter.state("wide") == "Failed", "wide Failed")
        assert replica.entry("wide")["reason"] == "ValidationFailed"
        assert "32" in replica.entry("wide")["message"] and "16" in replica.entry("wide")["message"]
        await until(lambda: replica.reporter.state("math") == "Loaded", "math Loaded")
        assert "wide" not in replica.runtime.served
        assert replica.agent.slots["wide"].worker is None and replica.agent.slots["wide"].retry_at == 0
        replica.want(math="math")  # the LoraAdapter was deleted: the operator waits for this entry to go
        await until(lambda: "wide" in replica.reporter.entries and replica.reporter.entries["wide"] is None,
                    "the entry withdrawn")
        assert "wide" not in replica.agent.slots


async def test_a_load_the_runtime_refuses_is_retried_after_its_delay(tmp_path, adapters, monkeypatch):
    monkeypatch.setattr(slots, "RETRY_DELAYS", (0.2,))
    async with Replica(tmp_path, adapters) as replica:
        replica.runtime.refuse["math"] = "the adapter targets modules this engine cannot adapt"
        replica.want(math="math")
        await until(lambda: replica.reporter.state("math") == "Failed", "math Failed")
        assert replica.entry("math")["reason"] == "LoadFailed"
        assert replica.entry("math")["message"].startswith("the adapter targets modules this engine cannot adapt.")
        del replica.runtime.refuse["math"]
        await until(lambda: replica.reporter.state("math") == "Loaded", "math Loaded on the retry")


async def test_an_adapter_no_longer_wanted_is_unloaded_deleted_and_forgotten(tmp_path, adapters):
    async with Replica(tmp_path, adapters) as replica:
        replica.want(math="math", squad="math-v2")
        await until(lambda: replica.reporter.state("squad") == "Loaded", "squad Loaded")
        replica.want(math="math")
        await until(lambda: replica.reporter.entries.get("squad", {}) is None, "squad's entry removed")
        assert "squad" not in replica.runtime.served and "squad" not in replica.agent.slots
        assert all(folder.startswith("math/") for folder in replica.folders())
        assert replica.reporter.state("math") == "Loaded"


async def test_adapters_are_not_loaded_while_the_runtime_is_down_and_return_after_its_restart(tmp_path, adapters):
    async with Replica(tmp_path, adapters) as replica:
        replica.want(math="math")
        await until(lambda: replica.reporter.state("math") == "Loaded", "math Loaded")
        replica.runtime.up = False
        replica.runtime.restart()
        await until(lambda: replica.reporter.state("math") == "Pending", "math Pending while the runtime is down")
        assert replica.entry("math")["message"] == "Waiting for the runtime to become healthy."
        replica.runtime.up = True
        await until(lambda: replica.reporter.state("math") == "Loaded" and "math" in replica.runtime.served,
                    "math loaded again")


async def test_a_restarted_sidecar_adopts_what_is_on_the_volume_without_fetching(tmp_path, adapters):
    runtime = ServingRuntime()
    async with Replica(tmp_path, adapters, runtime) as replica:
        replica.want(math="math")
        await until(lambda: replica.reporter.state("math") == "Loaded", "math Loaded")
    async with Replica(tmp_path, adapters, runtime) as again:
        loads = len(runtime.loads)
        again.want(math="math")
        await until(lambda: again.reporter.state("math") == "Loaded", "math adopted")
        assert again.fetches == 0 and len(runtime.loads) == loads  # served already, from the recorded generation


async def test_loading_many_adapters_takes_far_fewer_report_writes_and_a_restart_none(tmp_path, adapters):
    """The real reporter on an in-memory API server (20 ms a request): the writes a sidecar makes into its
    LoraReplica while it loads 30 adapters, and after a restart that finds them all on the volume."""
    names = [f"m{index:02}" for index in range(30)]
    api = FakeReplicaApi()

    def reporter() -> ReplicaReporter:
        return ReplicaReporter(api, "default", "llama3-0", "pod-uid", "llama3")  # type: ignore[arg-type]

    def all_loaded() -> bool:
        return len(api.adapters()) == len(names) and all(e["state"] == "Loaded" for e in api.adapters().values())

    runtime = ServingRuntime()
    async with Replica(tmp_path, adapters, runtime, reporter()) as replica:
        replica.want(**dict.fromkeys(names, "math"))
        await until(all_loaded, "every adapter Loaded in the LoraReplica")
        await asyncio.sleep(0.5)
        loading = len(api.writes())
        # One write per adapter and state (Pending, Validating, Loaded at least) would be 90 or more.
        assert loading < len(names), f"{loading} writes for {len(names)} adapters"
        await asyncio.sleep(1)
        assert len(api.writes()) == loading  # at rest
    async with Replica(tmp_path, adapters, runtime, reporter()) as again:
        again.want(**dict.fromkeys(names, "math"))
        await until(lambda: again.agent.initial_sync_done, "the restarted sidecar's initial sync")
        await asyncio.sleep(0.5)
        assert api.writes()[loading:] == []  # every entry it would write is already there
        assert all_loaded()


async def test_a_pod_serves_only_the_adapters_placed_on_its_slot_and_drops_one_moved_away(tmp_path, adapters):
    def placed(math_slots: list[int] | None, code_slots: list[int] | None) -> AdapterSet:
        entries = [DesiredAdapter(name=name, uid=f"uid-{name}", generation=1, served_name=name,
                                  source=f"file://{adapters / folder}", slots=slots)
                   for name, folder, slots in (("math", "math", math_slots), ("code", "math-v2", code_slots))]
        return AdapterSet(base_model="base", runtime=Runtime.VLLM, adapters=entries,
                          limits=AdapterLimits(max_rank=16, allowed_formats=[AdapterFormat.HF]),
                          replica_slots={"pod-0": 0, "pod-1": 1})

    async with Replica(tmp_path, adapters) as replica:
        replica.agent.on_adapter_set(placed(math_slots=[1], code_slots=[0]))  # math lives on pod-1
        await until(lambda: replica.reporter.state("code") == "Loaded", "code Loaded")
        assert "math" not in replica.runtime.served and replica.reporter.state("math") is None
        assert replica.fetches == 1

        replica.agent.on_adapter_set(placed(math_slots=[0], code_slots=[1]))  # they swap places
        await until(lambda: replica.reporter.state("math") == "Loaded" and "code" not in replica.runtime.served,
                    "math Loaded and code removed")
        await until(lambda: "code" in replica.reporter.entries and replica.reporter.entries["code"] is None,
                    "code's entry withdrawn")
        assert len(replica.folders()) == 1
