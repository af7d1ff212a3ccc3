"""The PEFT volume's layout: a folder per generation for vLLM, a folder per served name for NIM, records a
restarted sidecar adopts, and what a crash leaves behind cleaned up without touching what is served."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraplex.api.runtime_capabilities import AdapterLayout, adapter_layout
from loraplex.api.types import Runtime
from loraplex.sidecar.store import GENERATION_FOLDER, InstalledAdapter, VolumeStore, files_of

PER_GENERATION, PER_NAME = AdapterLayout.FOLDER_PER_GENERATION, AdapterLayout.FOLDER_PER_NAME


def staged(store: VolumeStore, name: str, weights: bytes) -> Path:
    folder = store.new_staging(name)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 8}))
    (folder / "adapter_model.safetensors").write_bytes(weights)
    return folder


def record_for(folder: Path, name: str = "math", generation: int = 1) -> InstalledAdapter:
    return InstalledAdapter(served_name=name, adapter=name, uid="uid-1", generation=generation,
                            source=f"s3://adapters/{name}", sha256=None, format="hf", rank=8,
                            target_modules=["q_proj"], size_bytes=0, files=files_of(folder))


def install(store: VolumeStore, weights: bytes, name: str = "math", generation: int = 1) -> InstalledAdapter:
    folder = staged(store, name, weights)
    return store.install(folder, record_for(folder, name, generation))


@pytest.fixture
def store(tmp_path: Path) -> VolumeStore:
    volume = VolumeStore(tmp_path / "volume", PER_GENERATION)
    volume.prepare()
    return volume


def test_the_layout_is_the_runtimes():
    assert adapter_layout(Runtime.VLLM) == PER_GENERATION
    assert adapter_layout(Runtime.NIM) == PER_NAME  # NIM reads NIM_PEFT_SOURCE/<served name>/ as the adapter


def test_each_generation_gets_a_folder_of_its_own_and_the_old_one_stays_until_pruned(store):
    first = install(store, b"old weights")
    second = install(store, b"new weights", generation=2)
    assert first.folder != second.folder
    for record in (first, second):
        served_name, generation_id = record.folder.split("/")
        assert served_name == "math" and GENERATION_FOLDER.fullmatch(generation_id)
    assert (store.path(first) / "adapter_model.safetensors").read_bytes() == b"old weights"  # never rewritten
    assert (store.path(second) / "adapter_model.safetensors").read_bytes() == b"new weights"
    assert store.installed() == {"math": second}  # the record names the new generation

    store.prune("math", {second.folder})
    assert [p.name for p in (store.adapters / "math").iterdir()] == [second.folder.split("/")[1]]
    assert list(store.trash.iterdir()) == [] and list(store.staging.iterdir()) == []


def test_the_same_generation_installed_again_gets_a_new_path(store):
    """A retried or re-fetched generation may hold other bytes (file:// sources change in place): vLLM's cache
    key is the path, so a path is never reused."""
    assert install(store, b"a").folder != install(store, b"b").folder


def test_a_restarted_sidecar_adopts_the_recorded_generation(store, tmp_path):
    record = install(store, b"weights")
    reopened = VolumeStore(tmp_path / "volume", PER_GENERATION)
    reopened.prepare()
    adopted = reopened.installed()["math"]
    assert adopted == record and reopened.intact(adopted)
    (reopened.path(adopted) / "adapter_model.safetensors").write_bytes(b"trunc")
    assert not reopened.intact(adopted)


def test_crash_leftovers_go_and_what_is_recorded_or_served_stays(store):
    kept = install(store, b"current")
    replaced_but_still_served = install(store, b"older", name="squad")
    current_squad = install(store, b"newer", name="squad", generation=2)
    (store.adapters / "math" / "g7-0123abcd").mkdir()  # installed, never recorded
    (store.adapters / "ghost" / "g1-0123abcd").mkdir(parents=True)  # a served name without any record
    (store.staging / "math.deadbeef").mkdir()
    store.prepare()
    store.prune_all({"math": {kept.folder}, "squad": {current_squad.folder, replaced_but_still_served.folder}})
    assert sorted(p.name for p in store.adapters.iterdir()) == ["math", "squad"]
    assert [p.name for p in (store.adapters / "math").iterdir()] == [kept.folder.split("/")[1]]
    assert sorted(p.name for p in (store.adapters / "squad").iterdir()) == sorted(
        r.folder.split("/")[1] for r in (replaced_but_still_served, current_squad))
    assert list(store.staging.iterdir()) == []


def test_a_record_from_before_generation_folders_is_adopted_where_it_is(store):
    """Files directly in adapters/<served name>/, a record without `folder`: served from there until the next
    update, whose generation folder sits beside those files until they are pruned."""
    legacy = store.adapters / "math"
    legacy.mkdir()
    (legacy / "adapter_config.json").write_text("{}")
    fields = {key: value for key, value in record_for(legacy).__dict__.items() if key != "folder"}
    (store.state / "math.json").write_text(json.dumps(fields))
    adopted = store.installed()["math"]
    assert adopted.folder == "math" and store.intact(adopted)

    update = install(store, b"new", generation=2)
    store.prune("math", {adopted.folder, update.folder})
    assert (legacy / "adapter_config.json").exists() and store.path(update).exists()
    store.prune("math", {update.folder})  # once the runtime reads the new generation
    assert [p.name for p in legacy.iterdir()] == [update.folder.split("/")[1]]


def test_a_rolled_back_generation_is_discarded(store):
    old = install(store, b"old")
    refused = install(store, b"refused", generation=2)
    store.record(old)
    store.discard_generation(refused)
    assert store.installed() == {"math": old}
    assert [p.name for p in (store.adapters / "math").iterdir()] == [old.folder.split("/")[1]]


def test_removal_deletes_every_generation_and_the_record(store):
    install(store, b"one")
    install(store, b"two", generation=2)
    store.remove("math")
    assert list(store.adapters.iterdir()) == [] and store.installed() == {}


def test_per_name_layout_replaces_the_folder_the_runtime_finds_by_name(tmp_path):
    store = VolumeStore(tmp_path / "volume", PER_NAME)
    store.prepare()
    first = install(store, b"old")
    second = install(store, b"new", generation=2)
    assert first.folder == second.folder == "math"
    assert (store.adapters / "math" / "adapter_model.safetensors").read_bytes() == b"new"
    store.prune("math", set())  # nothing to prune: one folder per name
    store.prune_all({"math": {"math"}})
    assert (store.adapters / "math" / "adapter_model.safetensors").exists()
    assert list(store.trash.iterdir()) == []
