"""The real sidecar process: S3 (moto_server), an https file server, real vLLM (the CPU build, one server for
the session) or a NIM double, and the real control plane, where the sidecar acts as its own ServiceAccount
with the Role the operator renders."""

from __future__ import annotations

import collections
import json
import shutil
import tarfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import kubernetes
import pytest

from loraplex.api.contract import RESIDENCY_METRIC
from loraplex.api.types import AdapterFormat, BaseModelDeploymentSpec, Runtime
from loraplex.local.apiproxy import ApiProxy
from loraplex.operator.runtimes.nim import NimProfile
from tests.adapters import make_hf_adapter_for, make_nemo_adapter
from tests.epp_scorer import LoraMetrics, latest_series, lora_affinity_score, lora_metrics
from tests.fakes.files import FileServer, self_signed_certificate
from tests.fakes.runtime import FakeNim, Switch
from tests.integration.harness import wait_for
from tests.integration.sidecar_harness import (
    GROUP,
    VERSION,
    AdapterSetWriter,
    MotoServer,
    SidecarIdentity,
    SidecarProcess,
    install_sidecar_identity,
    replica_entry,
    upload_folder,
    watch_report,
)
from tests.producers import make_trtllm_from_peft
from tests.vllm_server import BLOCK_SIZE, MAX_LORA_RANK, VllmServer, prompt_tokens, reference_tokens

# Real vLLM starts in a minute or more on 2 cores, inside the fixtures of the first test that needs it.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]
MANY = [f"many-{index}" for index in range(5)]  # more than the server's --max-cpu-loras


@pytest.fixture(scope="module")
def built(tmp_path_factory, vllm_model_dir) -> Path:
    """Adapters of the session vLLM's model, each with weights of its own."""
    root = tmp_path_factory.mktemp("built")
    make_hf_adapter_for(vllm_model_dir, root / "math", seed=1)
    make_hf_adapter_for(vllm_model_dir, root / "squad", target_modules=("q_proj", "k_proj", "v_proj"), seed=2)
    make_hf_adapter_for(vllm_model_dir, root / "math-v2", seed=3)
    make_hf_adapter_for(vllm_model_dir, root / "too-big-rank", rank=2 * MAX_LORA_RANK, seed=4)
    for seed, name in enumerate(MANY, start=10):
        make_hf_adapter_for(vllm_model_dir, root / name, seed=seed)
    make_nemo_adapter(root / "nemo-math", rank=8)
    with tarfile.open(root / "squad.tar.gz", "w:gz") as archive:
        archive.add(root / "squad", arcname="squad")
    make_trtllm_from_peft(root / "math", root / "trtllm-math")
    big = root / "big"
    shutil.copytree(root / "math", big)
    (big / "padding.bin").write_bytes(b"\0" * (3 * 1024 * 1024))
    return root


@pytest.fixture(scope="module")
def moto(tmp_path_factory, built) -> Iterator[MotoServer]:
    server = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log")
    s3 = server.client()
    s3.create_bucket(Bucket="adapters")
    for name in ("math", "squad", "math-v2", "too-big-rank", "big", "trtllm-math", *MANY):
        upload_folder(s3, built / name, "adapters", f"llama3/{name}")
    yield server
    server.stop()


@pytest.fixture
def vllm(real_vllm) -> VllmServer:
    return real_vllm


@pytest.fixture
def volume(tmp_path: Path) -> Path:
    return tmp_path / "volume"


@pytest.fixture
def identity(api_client, control_plane, namespace, tmp_path) -> SidecarIdentity:
    return install_sidecar_identity(api_client, control_plane, namespace, tmp_path / "sidecar.kubeconfig")


@pytest.fixture
def writer(api_client, namespace, identity) -> AdapterSetWriter:
    return AdapterSetWriter(api_client, namespace)


@pytest.fixture
def sidecar_factory(identity, volume, tmp_path, moto) -> Iterator:
    """Starts sidecars as the base model's ServiceAccount; afterwards, any refusal from the API server in
    their logs fails the test: the Role the operator renders lacks a right the sidecar uses."""
    started: list[SidecarProcess] = []

    def start(runtime: VllmServer | FakeNim, mode: Runtime = Runtime.VLLM, kubeconfig: Path | None = None,
              **env: str) -> SidecarProcess:
        process = SidecarProcess(kubeconfig or identity.kubeconfig, identity.namespace, volume, mode, runtime.url,
                                 tmp_path / f"sidecar-{len(started)}.log",
                                 {"AWS_ENDPOINT_URL_S3": moto.url, **env}, pod_uid=identity.pod_uid).start()
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()
    refusals = [line for process in started for line in process.refusals()]
    assert not refusals, "the API server refused the sidecar:\n" + "\n".join(refusals)


def served_tar(folder: Path, root: Path) -> Path:
    """`root`/big.tar holding the files of `folder`, for the https file server."""
    root.mkdir()
    with tarfile.open(root / "big.tar", "w") as tar:
        tar.add(folder, arcname=".")
    return root


def until(sidecar: SidecarProcess, predicate, what: str, timeout: float = 60.0):
    return wait_for(predicate, timeout=timeout, what=what, log=sidecar.log)


def served_folder(vllm: VllmServer, name: str) -> Path:
    """The folder vLLM reads `name` from: where the sidecar told it the adapter is."""
    return Path(vllm.adapters()[name])


def test_syncs_validates_and_loads_adapters_from_s3(writer, vllm, volume, sidecar_factory):
    sidecar = sidecar_factory(vllm)
    writer.add("math", "s3://adapters/llama3/math/")
    writer.add("squad", "s3://adapters/llama3/squad")
    until(sidecar, lambda: writer.state("math") == "Loaded" and writer.state("squad") == "Loaded", "both Loaded")
    entry = writer.replica_status("squad")
    assert (entry["format"], entry["rank"], entry["targetModules"]) == ("hf", 8, ["k_proj", "q_proj", "v_proj"])
    assert entry["observedGeneration"] == 1 and entry["sizeBytes"] > 0
    assert set(vllm.adapters()) == {"math", "squad"}
    for name in ("math", "squad"):  # each generation in a folder of its own under the served name's
        assert served_folder(vllm, name).parent == volume / "adapters" / name
    assert sorted(p.name for p in served_folder(vllm, "math").iterdir()) == \
        ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert list((volume / "staging").iterdir()) == []
    assert sidecar.get("/readyz")[0] == 200
    metrics = sidecar.get("/metrics")[1]
    assert 'loraplex_sidecar_adapters{state="Loaded"} 2.0' in metrics
    assert "loraplex_sidecar_downloaded_bytes_total" in metrics


def test_a_tensorrt_llm_adapter_is_converted_for_vllm_and_answers_as_the_original(writer, vllm, sidecar_factory,
                                                                                  built, vllm_model_dir):
    without_config = sidecar_factory(vllm)
    writer.add("trt", "s3://adapters/llama3/trtllm-math")
    until(without_config, lambda: writer.state("trt") == "Failed", "refused without the base model's config")
    assert "lora.baseModelConfigMap" in writer.replica_status("trt")["message"]
    without_config.stop()

    sidecar = sidecar_factory(vllm, LORAPLEX_BASE_CONFIG=str(vllm_model_dir / "config.json"))
    writer.publish()  # the same adapter set, to a sidecar that now has the base model's config.json
    until(sidecar, lambda: writer.state("trt") == "Loaded", "trt Loaded")
    entry = writer.replica_status("trt")
    assert (entry["format"], entry["convertedFrom"], entry["rank"]) == ("hf", "trtllm", 8)
    assert sorted(p.name for p in served_folder(vllm, "trt").iterdir()) == \
        ["adapter_config.json", "adapter_model.safetensors"]  # what vLLM reads is the converted adapter
    assert vllm.greedy_tokens("trt") == reference_tokens(vllm_model_dir, built / "math")


def test_rejected_adapter_fails_with_the_rule_and_disturbs_nothing(writer, vllm, volume, sidecar_factory):
    sidecar = sidecar_factory(vllm)
    writer.max_rank = 16
    writer.add("math", "s3://adapters/llama3/math")
    writer.add("wide", "s3://adapters/llama3/too-big-rank")
    until(sidecar, lambda: writer.state("wide") == "Failed", "the rank-32 adapter Failed")
    entry = writer.replica_status("wide")
    assert entry["reason"] == "ValidationFailed"
    assert entry["message"] == "adapter_config.json: r=32 exceeds this base model's maxLoraRank 16."
    until(sidecar, lambda: writer.state("math") == "Loaded", "the other adapter Loaded")
    assert set(vllm.adapters()) == {"math"}
    assert not (volume / "adapters" / "wide").exists()


def test_update_in_place_serves_the_new_weights_not_cached_old_ones(writer, vllm, volume, sidecar_factory, built,
                                                                    vllm_model_dir):
    # The prompt fills whole KV blocks, so vLLM's prefix cache holds blocks computed with the old weights when
    # the update arrives: a request after it reuses them unless the new generation has a cache key of its own.
    assert prompt_tokens(vllm_model_dir) >= 2 * BLOCK_SIZE
    old_answer, new_answer = (reference_tokens(vllm_model_dir, built / name) for name in ("math", "math-v2"))
    assert old_answer != new_answer, "the two generations' weights must answer differently"
    sidecar = sidecar_factory(vllm)
    writer.add("math", "s3://adapters/llama3/math")
    until(sidecar, lambda: writer.state("math") == "Loaded", "Loaded")
    first = served_folder(vllm, "math")
    assert vllm.greedy_tokens("math") == old_answer
    assert vllm.greedy_tokens("math") == old_answer  # answered again, from the prefix cache

    writer.add("math", "s3://adapters/llama3/math-v2")  # generation 2, same served name
    until(sidecar, lambda: (writer.replica_status("math") or {}).get("observedGeneration") == 2
          and writer.state("math") == "Loaded", "generation 2 Loaded")
    assert vllm.greedy_tokens("math") == new_answer
    second = served_folder(vllm, "math")
    assert second != first and second.parent == first.parent
    assert not first.exists(), "the old generation's files are deleted once vLLM no longer serves them"
    assert [p.name for p in (volume / "adapters" / "math").iterdir()] == [second.name]

    writer.remove("math")
    until(sidecar, lambda: writer.replica_status("math") is None, "the report's entry removed")
    assert "math" not in vllm.adapters()
    assert not (volume / "adapters" / "math").exists()
    assert not (volume / "state" / "math.json").exists()


def test_an_adapter_vllm_refuses_is_load_failed_with_its_words(writer, vllm, volume, sidecar_factory):
    """loraplex lets a rank-32 adapter through (this base model's maxRank is 64), but the server was started
    with --max-lora-rank 16: vLLM refuses it with a 500, and its engine keeps serving."""
    sidecar = sidecar_factory(vllm)
    writer.add("math", "s3://adapters/llama3/math")
    writer.add("wide", "s3://adapters/llama3/too-big-rank")
    until(sidecar, lambda: writer.state("wide") == "Failed", "the adapter vLLM refuses Failed")
    entry = writer.replica_status("wide")
    assert entry["reason"] == "LoadFailed", entry
    assert f"LoRA rank {2 * MAX_LORA_RANK} is greater than max_lora_rank {MAX_LORA_RANK}" in entry["message"]
    assert "Retrying in" in entry["message"]
    until(sidecar, lambda: writer.state("math") == "Loaded", "the other adapter Loaded")
    assert set(vllm.adapters()) == {"math"} and vllm.healthy()


def test_an_update_vllm_refuses_leaves_the_old_generation_served(writer, vllm, sidecar_factory, built,
                                                                 vllm_model_dir):
    old_answer = reference_tokens(vllm_model_dir, built / "math")
    sidecar = sidecar_factory(vllm)
    writer.add("math", "s3://adapters/llama3/math")
    until(sidecar, lambda: writer.state("math") == "Loaded", "Loaded")
    served = served_folder(vllm, "math")
    writer.add("math", "s3://adapters/llama3/too-big-rank")  # generation 2, which vLLM refuses
    until(sidecar, lambda: (writer.replica_status("math") or {}).get("observedGeneration") == 2
          and writer.state("math") == "Failed", "generation 2 Failed")
    entry = writer.replica_status("math")
    assert entry["reason"] == "LoadFailed" and "Still serving generation 1." in entry["message"], entry
    assert served_folder(vllm, "math") == served and served.exists()
    assert vllm.greedy_tokens("math") == old_answer


def test_more_adapters_than_max_cpu_loras_all_load_and_answer_with_their_own_weights(writer, vllm,
                                                                                    sidecar_factory, built,
                                                                                    vllm_model_dir):
    expected = {name: reference_tokens(vllm_model_dir, built / name) for name in MANY}
    assert len(set(map(tuple, expected.values()))) == len(MANY)
    sidecar = sidecar_factory(vllm)
    for name in MANY:
        writer.add(name, f"s3://adapters/llama3/{name}")
    until(sidecar, lambda: all(writer.state(name) == "Loaded" for name in MANY), "every adapter Loaded")
    assert set(vllm.adapters()) == set(MANY)
    # Twice round: with two CPU slots, each request finds its adapter evicted and vLLM reads it from disk again.
    for _ in range(2):
        assert {name: vllm.greedy_tokens(name) for name in MANY} == expected


def test_runtime_restart_restores_every_adapter(writer, vllm, sidecar_factory, built, vllm_model_dir):
    sidecar = sidecar_factory(vllm)
    writer.add("math", "s3://adapters/llama3/math")
    writer.add("squad", "s3://adapters/llama3/squad")
    until(sidecar, lambda: writer.state("math") == "Loaded" and writer.state("squad") == "Loaded", "both Loaded")
    paths = vllm.adapters()
    vllm.kill()
    until(sidecar, lambda: "runtime is not healthy" in sidecar.log(), "the sidecar to see the runtime down")
    writer.add("late", "s3://adapters/llama3/math-v2")
    until(sidecar, lambda: (writer.replica_status("late") or {}).get("message")
          == "Waiting for the runtime to become healthy.", "the new adapter waiting for the runtime")
    assert writer.state("late") == "Pending"
    # What the dead runtime served is not claimed as Loaded while it is down.
    until(sidecar, lambda: writer.state("math") == writer.state("squad") == "Pending", "math and squad Pending")
    assert writer.replica_status("math")["message"] == "Waiting for the runtime to become healthy."

    vllm.start()  # the same port, no adapters
    until(sidecar, lambda: set(vllm.adapters()) == {"math", "squad", "late"}, "restored after the restart")
    until(sidecar, lambda: all(writer.state(name) == "Loaded" for name in ("math", "squad", "late")), "Loaded")
    restored = vllm.adapters()
    assert {name: restored[name] for name in paths} == paths  # each at the path of its installed generation
    assert vllm.greedy_tokens("math") == reference_tokens(vllm_model_dir, built / "math")
    assert vllm.greedy_tokens("late") == reference_tokens(vllm_model_dir, built / "math-v2")


def test_sidecar_restart_reverifies_without_downloading(writer, vllm, volume, sidecar_factory, tmp_path, built):
    cert, key = self_signed_certificate(tmp_path)
    files = FileServer(built, cert, key).start()
    try:
        sidecar = sidecar_factory(vllm, SSL_CERT_FILE=str(cert))
        writer.add("squad", f"{files.url}/squad.tar.gz")
        until(sidecar, lambda: writer.state("squad") == "Loaded", "Loaded from https")
        installed = served_folder(vllm, "squad")
        assert sorted(p.name for p in installed.iterdir()) == \
            ["README.md", "adapter_config.json", "adapter_model.safetensors"]  # unpacked, top folder flattened
        downloads = files.requests["squad.tar.gz"]
        sidecar.kill()
        vllm.unload_all()  # and the runtime lost it too: the restarted sidecar must reload from disk
        # What a crash can leave behind: a generation never recorded, a served name with no record at all.
        (installed.parent / "g9-0123abcd").mkdir()
        (volume / "adapters" / "ghost" / "g1-0123abcd").mkdir(parents=True)
        restarted = sidecar_factory(vllm, SSL_CERT_FILE=str(cert))
        until(restarted, lambda: "squad" in vllm.adapters(), "reloaded from the volume")
        until(restarted, lambda: restarted.get("/readyz")[0] == 200, "ready")
        assert files.requests["squad.tar.gz"] == downloads
        assert served_folder(vllm, "squad") == installed  # the installed generation, adopted
        assert sorted(p.name for p in (volume / "adapters").iterdir()) == ["squad"]
        assert [p.name for p in installed.parent.iterdir()] == [installed.name]
    finally:
        files.stop()


def test_source_outage_mid_download_is_retried_and_never_visible(writer, vllm, volume, sidecar_factory, tmp_path,
                                                                 built):
    cert, key = self_signed_certificate(tmp_path)
    archive = served_tar(built / "big", tmp_path / "served")
    files = FileServer(archive, cert, key).start()
    files.drop_after["big.tar"] = 512 * 1024
    try:
        sidecar = sidecar_factory(vllm, SSL_CERT_FILE=str(cert))
        writer.add("big", f"{files.url}/big.tar")
        until(sidecar, lambda: writer.state("big") == "Loaded", "Loaded after the outage")
        # The 2 MiB first range was cut and retried alone; the rest came as one more range.
        assert files.requests["big.tar"] == 3
        assert (served_folder(vllm, "big") / "padding.bin").stat().st_size == 3 * 1024 * 1024
        assert "retry" in sidecar.log().lower() or "attempt" in sidecar.log().lower()
        assert list((volume / "staging").iterdir()) == []
    finally:
        files.stop()


def test_progress_is_reported_while_downloading(writer, vllm, sidecar_factory, tmp_path, built, api_client,
                                                namespace):
    cert, key = self_signed_certificate(tmp_path)
    served = served_tar(built / "big", tmp_path / "served")
    files = FileServer(served, cert, key).start()
    files.bytes_per_second = 1.5 * 1024 * 1024  # about two seconds for the 3 MB adapter
    custom = kubernetes.client.CustomObjectsApi(api_client)
    since = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "lorareplicas")["metadata"][
        "resourceVersion"]
    seen: list[dict] = []
    watcher = threading.Thread(target=watch_report, args=(api_client, namespace, "big", since, seen), daemon=True)
    watcher.start()
    try:
        sidecar = sidecar_factory(vllm, SSL_CERT_FILE=str(cert))
        writer.add("big", f"{files.url}/big.tar")
        until(sidecar, lambda: writer.state("big") == "Loaded", "Loaded")
        watcher.join(timeout=30)
    finally:
        files.stop()
    reports = [replica_entry(obj, "big") or {} for obj in seen]
    assert reports and reports[-1]["state"] == "Loaded", [r.get("state") for r in reports]
    partial = [r for r in reports
               if r.get("state") == "Downloading" and 0 < r.get("bytesDone", 0) < r.get("bytesTotal", 0)]
    assert partial, f"bytes done / total were reported while the download ran; saw {reports}"
    assert partial[-1]["bytesTotal"] == (served / "big.tar").stat().st_size
    done = [r["bytesDone"] for r in partial]
    assert done == sorted(done), "progress only goes forward"


def test_volume_limit_fails_the_adapter_that_does_not_fit(writer, vllm, volume, sidecar_factory):
    sidecar = sidecar_factory(vllm, LORAPLEX_VOLUME_LIMIT="2Mi")
    writer.add("math", "s3://adapters/llama3/math")
    until(sidecar, lambda: writer.state("math") == "Loaded", "small adapter Loaded")
    writer.add("big", "s3://adapters/llama3/big")
    until(sidecar, lambda: writer.state("big") == "Failed", "big adapter Failed")
    entry = writer.replica_status("big")
    assert entry["reason"] == "DiskFull" and "size limit" in entry["message"]
    assert writer.state("math") == "Loaded" and "math" in vllm.adapters()
    assert not (volume / "adapters" / "big").exists()


def test_nim_serves_nemo_adapters_from_the_peft_folder(writer, volume, sidecar_factory, tmp_path, built, moto):
    nim = FakeNim("meta/llama3", volume / "adapters").start()
    try:
        writer.runtime = Runtime.NIM
        moto.client().upload_file(str(built / "nemo-math" / "adapter.nemo"), "adapters", "llama3/nemo-math.nemo")
        sidecar = sidecar_factory(nim, Runtime.NIM)
        writer.add("nemo-math", "s3://adapters/llama3/nemo-math.nemo", AdapterFormat.NEMO)
        until(sidecar, lambda: writer.state("nemo-math") == "Loaded", "NeMo adapter Loaded on NIM")
        assert (volume / "adapters" / "nemo-math" / "nemo-math.nemo").is_file()
        assert "nemo-math" in nim.listed
        writer.remove("nemo-math")
        until(sidecar, lambda: writer.replica_status("nemo-math") is None, "removed")
        until(sidecar, lambda: "nemo-math" not in nim.listed, "NIM forgot it")
    finally:
        nim.stop()


def nim_2x_container_env() -> dict[str, str]:
    """The environment the operator renders for a NIM 2.x container whose vLLM takes ranks up to 16."""
    spec = BaseModelDeploymentSpec.model_validate({
        "model": "meta/llama3", "runtime": "nim", "image": "nvcr.io/nim/meta/llama3:2.0.5",
        "lora": {"maxGpuLoras": 2, "maxCpuLoras": 4, "maxRank": MAX_LORA_RANK, "refreshIntervalSeconds": 1}})
    return {e["name"]: e["value"] for e in NimProfile().container(spec)["env"]}


@pytest.mark.parametrize("switch", list(Switch))
def test_nim_2x_serves_adapters_added_after_it_started(writer, volume, sidecar_factory, switch):
    """NIM 2.x in dynamic LoRA mode, whichever rendered variable switches it on: the sidecar loads through the API
    where NIM has one, and waits for the watcher where it has not."""
    (volume / "adapters").mkdir(parents=True)
    nim = FakeNim.two("meta/llama3", volume / "adapters", nim_2x_container_env(), switch).start()
    try:
        writer.runtime = Runtime.NIM
        sidecar = sidecar_factory(nim, Runtime.NIM, LORAPLEX_RUNTIME_VERSION="2.0.5",
                                  LORAPLEX_NIM_REFRESH_SECONDS="1")
        writer.add("math", "s3://adapters/llama3/math")
        writer.add("too-big-rank", "s3://adapters/llama3/too-big-rank")  # rank 32: passes the sidecar, not NIM
        until(sidecar, lambda: writer.state("math") == "Loaded" and writer.state("too-big-rank") == "Failed",
              "one Loaded, one refused by NIM")
        assert nim.listed == {"math"}
        refused = writer.replica_status("too-big-rank")
        assert refused["reason"] == "LoadFailed"
        if switch == Switch.API:
            assert refused["message"].startswith("NIM refused to load too-big-rank: LoRA rank 32 is greater than "
                                                 "max_lora_rank 16.")
        else:
            assert "did not list too-big-rank in /v1/models within 8s and serves no load API" in refused["message"]
        writer.remove("math")
        until(sidecar, lambda: writer.replica_status("math") is None, "removed")
        until(sidecar, lambda: "math" not in nim.listed, "NIM forgot it")
    finally:
        nim.stop()


def test_files_dropped_into_or_fixed_in_the_adapter_store_are_noticed(writer, vllm, sidecar_factory, tmp_path, built):
    store = tmp_path / "store"
    store.mkdir()
    # The periodic rescan is the fallback for filesystems without change events; off here, so only the
    # filesystem watcher can notice the files below.
    sidecar = sidecar_factory(vllm, LORAPLEX_ADAPTER_STORE=str(store), LORAPLEX_LOCAL_RESCAN_SECONDS="3600")
    writer.add("local-math", f"file://{store}/math")
    until(sidecar, lambda: writer.state("local-math") == "Failed", "waiting for the folder")
    assert writer.replica_status("local-math")["reason"] == "SourceNotFound"
    staged = tmp_path / "incoming"
    shutil.copytree(built / "math", staged)
    staged.rename(store / "math")  # appears in one step, as a finished upload does
    until(sidecar, lambda: writer.state("local-math") == "Loaded", "Loaded after the drop")
    assert "local-math" in vllm.adapters()

    config = store / "math" / "adapter_config.json"
    good = config.read_text()
    config.write_text(json.dumps({**json.loads(good), "r": 4096}))  # rewritten in place, and now too big
    until(sidecar, lambda: writer.state("local-math") == "Failed", "the rewritten files rejected")
    rejected = writer.replica_status("local-math")
    assert rejected["reason"] == "ValidationFailed" and "Retrying" not in rejected["message"]
    # A rejection is final for those files: only noticing the fix in place can bring the adapter back.
    config.write_text(good)
    until(sidecar, lambda: writer.state("local-math") == "Loaded", "Loaded again after the fix")


def test_checksum_mismatch_is_refused(writer, vllm, volume, sidecar_factory):
    sidecar = sidecar_factory(vllm)
    writer.add("math", "s3://adapters/llama3/math", sha256="0" * 64)
    until(sidecar, lambda: writer.state("math") == "Failed", "Failed")
    entry = writer.replica_status("math")
    assert entry["reason"] == "ChecksumMismatch"
    assert "adapter_model.safetensors has sha256" in entry["message"]
    assert not (volume / "adapters" / "math").exists()


def test_hugging_face_and_cloud_storage_sources(writer, vllm, volume, sidecar_factory, tmp_path, built):
    from tests.fakes.hubs import FakeHubs

    root = tmp_path / "hubs"
    shutil.copytree(built / "math", root / "hf" / "org" / "adapters" / "math")
    (root / "hf" / "org" / "adapters" / "README.md").write_text("not part of the adapter")
    shutil.copytree(built / "squad", root / "gcs" / "bucket" / "llama3" / "squad")
    hubs = FakeHubs(root).start()
    try:
        sidecar = sidecar_factory(vllm, HF_ENDPOINT=hubs.url, HF_TOKEN="secret-token", STORAGE_EMULATOR_HOST=hubs.url,
                                  GCS_OAUTH_TOKEN="secret-token")
        writer.add("hf-math", "hf://org/adapters@main/math")
        writer.add("gcs-squad", "gs://bucket/llama3/squad")
        until(sidecar, lambda: writer.state("hf-math") == "Loaded" and writer.state("gcs-squad") == "Loaded",
              "both Loaded")
        assert sorted(p.name for p in served_folder(vllm, "hf-math").iterdir()) == \
            ["adapter_config.json", "adapter_model.safetensors"]  # only the adapter's files from the Hub
        assert hubs.requests["hf:README.md"] == 0 and hubs.requests["hf:math/adapter_config.json"] == 1
        assert (served_folder(vllm, "gcs-squad") / "adapter_model.safetensors").is_file()
    finally:
        hubs.stop()


def adapter_set_watches(proxy: ApiProxy) -> int:
    """Watches of ConfigMaps opened through the proxy; the sidecar opens no other."""
    return sum(count for (_, verb, resource), count in proxy.counts.items()
               if verb == "watch" and resource == "configmaps")


def test_watch_survives_disconnects_and_credentials_stay_secret(writer, vllm, sidecar_factory, control_plane,
                                                                identity, tmp_path, api_client, namespace):
    secret = "sEcReT-vAlUe-4242"
    proxy = ApiProxy(control_plane.url, control_plane.ca_file).start()
    try:
        through_proxy = proxy.write_kubeconfig(tmp_path / "proxied.kubeconfig", identity.token, namespace)
        sidecar = sidecar_factory(vllm, kubeconfig=through_proxy, AWS_SECRET_ACCESS_KEY=secret,
                                  LORAPLEX_LOG_LEVEL="debug")
        writer.add("math", "s3://adapters/llama3/math")
        until(sidecar, lambda: writer.state("math") == "Loaded", "Loaded")
        until(sidecar, lambda: adapter_set_watches(proxy) >= 1, "the adapter set watched")
        proxy.close_watches()  # the API server drops every watch
        writer.add("squad", "s3://adapters/llama3/squad")
        until(sidecar, lambda: writer.state("squad") == "Loaded", "a change after the disconnect still arrives")
        assert adapter_set_watches(proxy) >= 2, "the sidecar watched again"
    finally:
        proxy.stop()

    stored = kubernetes.client.CustomObjectsApi(api_client).list_namespaced_custom_object(
        GROUP, VERSION, namespace, "loraadapters")
    everything = sidecar.log() + json.dumps(stored)
    assert secret not in everything and "Signature=" not in everything and "Credential=" not in everything


def test_sidecar_token_is_refused_what_its_role_does_not_grant(identity, api_client, namespace, writer):
    """The Role is least privilege: its adapter set and its LoraReplica, nothing else."""
    writer.add("math", "s3://adapters/llama3/math")
    core = kubernetes.client.CoreV1Api(api_client)
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "mistral-adapters"}, "data": {"a": "b"}})
    core.create_namespaced_secret(namespace, {"metadata": {"name": "s3-credentials"},
                                              "stringData": {"AWS_SECRET_ACCESS_KEY": "x"}})

    with identity.api_client() as client:
        as_sidecar_core = kubernetes.client.CoreV1Api(client)
        as_sidecar_custom = kubernetes.client.CustomObjectsApi(client)
        # What it may do, for contrast: read its adapter set, create its report and report in it.
        assert as_sidecar_core.read_namespaced_config_map("llama3-adapters", namespace).data
        as_sidecar_custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "lorareplicas", {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "LoraReplica",
            "metadata": {"name": "llama3-0", "ownerReferences": [
                {"apiVersion": "v1", "kind": "Pod", "name": "llama3-0", "uid": identity.pod_uid}]},
            "spec": {"baseModel": "llama3"}})
        as_sidecar_custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, "lorareplicas", "llama3-0", {"status": {"adapters": {"math": {
                "state": "Pending"}}}})

        refused = {
            "list secrets": lambda: as_sidecar_core.list_namespaced_secret(namespace),
            "read a secret": lambda: as_sidecar_core.read_namespaced_secret("s3-credentials", namespace),
            "read another base model's adapter set":
                lambda: as_sidecar_core.read_namespaced_config_map("mistral-adapters", namespace),
            "patch another base model's adapter set": lambda: as_sidecar_core.patch_namespaced_config_map(
                "mistral-adapters", namespace, {"data": {"a": "c"}}),
            "patch its own adapter set": lambda: as_sidecar_core.patch_namespaced_config_map(
                "llama3-adapters", namespace, {"data": {"a": "c"}}),
            "list every configmap": lambda: as_sidecar_core.list_namespaced_config_map(namespace),
            "change an adapter's spec": lambda: as_sidecar_custom.patch_namespaced_custom_object(
                GROUP, VERSION, namespace, "loraadapters", "math", {"spec": {"source": "s3://elsewhere/x"}}),
            "delete an adapter": lambda: as_sidecar_custom.delete_namespaced_custom_object(
                GROUP, VERSION, namespace, "loraadapters", "math"),
            "change its base model": lambda: as_sidecar_custom.patch_namespaced_custom_object(
                GROUP, VERSION, namespace, "basemodeldeployments", "llama3", {"spec": {"replicas": 9}}),
            "patch an adapter's status": lambda: as_sidecar_custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, "loraadapters", "math", {"status": {"replicaStatus": {"llama3-0": {
                    "state": "Pending"}}}}),
            "delete its report": lambda: as_sidecar_custom.delete_namespaced_custom_object(
                GROUP, VERSION, namespace, "lorareplicas", "llama3-0"),
            "change its report's spec": lambda: as_sidecar_custom.patch_namespaced_custom_object(
                GROUP, VERSION, namespace, "lorareplicas", "llama3-0", {"spec": {"baseModel": "mistral"}}),
            "report in another namespace": lambda: as_sidecar_custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, "default", "lorareplicas", "llama3-0", {"status": {}}),
            "read pods": lambda: as_sidecar_core.list_namespaced_pod(namespace),
        }
        statuses = {}
        for what, attempt in refused.items():
            try:
                attempt()
                statuses[what] = "allowed"
            except kubernetes.client.ApiException as exc:
                statuses[what] = exc.status
    assert statuses == dict.fromkeys(refused, 403)
    assert writer.adapter("math")["spec"]["source"] == "s3://adapters/llama3/math"


def sidecar_requests(proxy: ApiProxy) -> collections.Counter[tuple[str, str, str]]:
    """Every request through the proxy, which only the sidecar talks through."""
    return collections.Counter(proxy.counts)


def test_at_rest_the_sidecar_sends_nothing_and_repairs_its_report_only_when_it_is_lost(
        writer, vllm, sidecar_factory, control_plane, identity, tmp_path, api_client, namespace):
    proxy = ApiProxy(control_plane.url, control_plane.ca_file).start()
    custom = kubernetes.client.CustomObjectsApi(api_client)
    try:
        through_proxy = proxy.write_kubeconfig(tmp_path / "proxied.kubeconfig", identity.token, namespace)
        sidecar = sidecar_factory(vllm, kubeconfig=through_proxy)
        for name in MANY:
            writer.add(name, f"s3://adapters/llama3/{name}")
        until(sidecar, lambda: all(writer.state(name) == "Loaded" for name in MANY), "every adapter Loaded")
        report = writer.report()
        assert report["metadata"]["ownerReferences"] == [
            {"apiVersion": "v1", "kind": "Pod", "name": "llama3-0", "uid": identity.pod_uid}]
        assert report["metadata"]["labels"] == {"loraplex.io/base-model": "llama3"}
        assert (report["spec"], report["status"]["loaded"], report["status"]["failed"]) == (
            {"baseModel": "llama3"}, len(MANY), 0)
        time.sleep(1)  # the echo of its last write reaches its watch
        loading = sidecar_requests(proxy)
        time.sleep(20)  # at rest: nothing changes, so nothing is sent (its watches stay open for minutes)
        assert sidecar_requests(proxy) - loading == collections.Counter()
        writes = sum(n for (_, verb, resource), n in loading.items()
                     if verb in ("create", "patch") and resource.startswith("lorareplicas"))
        assert writes <= 4 * len(MANY), loading  # about Pending, Downloading, Validating, Loaded for each

        # Someone deletes the report: the sidecar creates it again with every entry.
        custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, "lorareplicas", "llama3-0")
        until(sidecar, lambda: all(writer.state(name) == "Loaded" for name in MANY), "the report recreated")
        # Someone edits it: the sidecar writes back what it holds.
        custom.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, "lorareplicas", "llama3-0", {
            "status": {"adapters": {MANY[0]: None, "ghost": {"state": "Loaded"}}}})
        until(sidecar, lambda: writer.state(MANY[0]) == "Loaded" and writer.replica_status("ghost") is None,
              "the report repaired")
        assert set(vllm.adapters()) >= set(MANY)  # a report repair does not touch the runtime

        # Its pod goes: the garbage collector deletes the report with it.
        sidecar.stop()
        kubernetes.client.CoreV1Api(api_client).delete_namespaced_pod("llama3-0", namespace, grace_period_seconds=0)
        wait_for(lambda: writer.report() is None, timeout=60, what="the report deleted with its pod")
    finally:
        proxy.stop()


def test_demand_levels_follow_real_vllms_queue_and_go_idle_when_requests_stop(writer, vllm, sidecar_factory):
    """Four adapters under load on a vLLM that batches two at a time (--max-loras 2): requests queue, and the
    sidecar reads it from vLLM's own metrics. Only the adapters whose count follows demand get a level. Then
    nothing: each of those goes Idle."""
    hot, fixed = MANY[:3], MANY[3]
    sidecar = sidecar_factory(vllm, LORAPLEX_DEMAND_SAMPLE_SECONDS="0.2", LORAPLEX_DEMAND_QUEUE_SECONDS="2",
                              LORAPLEX_DEMAND_IDLE_SECONDS="6")
    for name in hot:
        writer.add(name, f"s3://adapters/llama3/{name}", follows_demand=True)
    writer.add(fixed, f"s3://adapters/llama3/{fixed}")
    until(sidecar, lambda: all(writer.state(name) == "Loaded" for name in [*hot, fixed]), "every adapter Loaded")

    def demand() -> dict[str, str | None]:
        return {name: (writer.replica_status(name) or {}).get("demand") for name in [*hot, fixed]}

    stop = threading.Event()

    def keep_asking(name: str) -> None:
        while not stop.is_set():
            vllm.greedy_tokens(name, max_tokens=64)

    with ThreadPoolExecutor(4 * 4) as pool:
        for name in [*hot, fixed] * 4:
            pool.submit(keep_asking, name)
        try:
            until(sidecar, lambda: "Queued" in demand().values(), "an adapter reported Queued", timeout=120)
        finally:
            stop.set()
    until(sidecar, lambda: [demand()[name] for name in hot] == ["Idle"] * 3, "each adapter Idle once requests "
          "stopped", 60)
    assert demand()[fixed] is None  # its count does not follow demand: no level, no writes for it


def test_the_picker_sees_an_idle_adapter_on_the_sidecars_residency_and_not_on_vllms_own_metric(
        writer, vllm, sidecar_factory):
    """Both /metrics scraped as the endpoint picker would (tests/epp_scorer.py): once math's request is over,
    vLLM's newest series no longer names it, while the sidecar's still does and scores it 1.0 here; squad,
    placed on another replica, scores 0."""
    sidecar = sidecar_factory(vllm)
    writer.add("math", "s3://adapters/llama3/math")
    writer.add("squad", "s3://adapters/llama3/squad", slots=[1])  # this pod has no slot: not placed here
    until(sidecar, lambda: writer.state("math") == "Loaded", "math Loaded")
    vllm.greedy_tokens("math")

    def scraped() -> tuple[LoraMetrics, LoraMetrics]:
        return (lora_metrics(sidecar.get("/metrics")[1], RESIDENCY_METRIC),
                lora_metrics(vllm.request("GET", "/metrics")[1], "vllm:lora_requests_info"))

    # vLLM sets its gauge once more just after it answers, the sidecar once math's worker is done.
    until(sidecar, lambda: "math" in scraped()[0].active and "math" not in scraped()[1].active,
          "the sidecar naming math and vLLM's newest series not")
    residency, vllms = scraped()
    # vLLM did see math, while its request ran: that series is still there, older than the newest.
    vllm_metrics = vllm.request("GET", "/metrics")[1]
    assert 'running_lora_adapters="math"' in vllm_metrics
    assert latest_series(vllm_metrics, "vllm:lora_requests_info") == {
        "max_lora": "2", "running_lora_adapters": "", "waiting_lora_adapters": ""}
    assert residency == LoraMetrics(active=frozenset({"math"}), waiting=frozenset(), max_active=1)
    assert (lora_affinity_score(residency, "math"), lora_affinity_score(residency, "squad")) == (1.0, 0.0)
    assert "math" not in vllms.active | vllms.waiting and lora_affinity_score(vllms, "math") < 1.0
    assert writer.state("squad") is None and "squad" not in vllm.adapters()
