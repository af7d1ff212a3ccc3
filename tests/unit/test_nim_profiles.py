"""NIM per generation: which one a BaseModelDeployment runs, what its pod is told, and what adapters the operator
and the sidecar let through for it (docs/formats/trtllm-and-nim.md, part B)."""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

import pytest

from loraplex.api.adapter_set import AdapterLimits
from loraplex.api.runtime_capabilities import (
    RUNTIMES,
    NimPickup,
    capabilities,
    deployed_version,
    nim_generation,
    nim_version_note,
)
from loraplex.api.types import AdapterFormat, BaseModelDeploymentSpec, Runtime
from loraplex.formats import AdapterPolicy, Rejection
from loraplex.formats.for_runtime import validate_or_convert
from loraplex.operator import render
from loraplex.operator.adapters import AdapterView, check_adapter
from loraplex.operator.settings import OperatorSettings
from loraplex.sidecar.runtimes import LoadFailed, client_for
from tests.adapters import LLAMA_LINEAR_MODULES, TINY_LLAMA, make_hf_adapter, make_nemo_adapter, make_trtllm_adapter
from tests.fakes.runtime import FakeNim, Switch
from tests.producers import make_nemo_from_peft, share_fused_lora_a

SETTINGS = OperatorSettings(sidecar_image="loraplex/loraplex:test")
NIM_1 = "nvcr.io/nim/meta/llama-3.1-8b-instruct:1.3.3"
NIM_2 = "nvcr.io/nim/meta/llama-3.1-8b-instruct:2.0.5"
LATEST = "nvcr.io/nim/meta/llama-3.1-8b-instruct:latest"


def nim(image: str, **overrides) -> BaseModelDeploymentSpec:
    spec = {"model": "meta/llama-3.1-8b-instruct", "runtime": "nim", "image": image,
            "lora": {"maxGpuLoras": 8, "maxCpuLoras": 16, "maxRank": 32}, **overrides}
    return BaseModelDeploymentSpec.model_validate(spec)


def inference_env(spec: BaseModelDeploymentSpec) -> dict[str, str]:
    owner = {"apiVersion": "loraplex.io/v1alpha1", "kind": "BaseModelDeployment",
             "metadata": {"name": "llama", "namespace": "team-a", "uid": "uid-1", "generation": 1}}
    pod = render.render_deployment(owner, spec, SETTINGS)["spec"]["template"]["spec"]
    inference = next(c for c in pod["containers"] if c["name"] == "inference")
    assert "command" not in inference and "args" not in inference  # the image's own entrypoint runs
    return {e["name"]: e["value"] for e in inference["env"]}


# ---- which generation ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("image", "declared", "version", "generation"), [
    (NIM_1, None, (1, 3, 3), "NIM 1.x"),
    ("nvcr.io/nim/meta/llama3-8b-instruct:1.10.1", None, (1, 10, 1), "NIM 1.x"),
    (NIM_2, None, (2, 0, 5), "NIM 2.x"),
    ("nvcr.io/nim/meta/llama3-8b-instruct:24.05", None, (24, 5, 0), "NIM 1.x"),  # date-named, before 1.0
    ("nvcr.io/nim/meta/llama3-8b-instruct:24.05.rc15", None, (24, 5, 0), "NIM 1.x"),
    ("nvcr.io/nim/meta/llama3-8b-instruct:3.0.0", None, (3, 0, 0), "NIM 2.x"),  # newer: as the newest known
    (LATEST, None, None, "NIM 1.x"),
    ("nvcr.io/nim/meta/llama-3.1-8b-instruct", None, None, "NIM 1.x"),
    ("nvcr.io/nim/meta/llama-3.1-8b-instruct@sha256:" + "0" * 64, None, None, "NIM 1.x"),
    ("registry.local:5000/nim/llama", None, None, "NIM 1.x"),  # a registry port is not a tag
    ("nvcr.io/nim/meta/llama-3.1-8b-instruct-turbo:1.0.0", None, None, "NIM 1.x"),  # Turbo restarted at 1.0.0
    ("nvcr.io/nim/deepseek-ai/deepseek-v3.2:1.15.0-variant", None, None, "NIM 1.x"),
    (LATEST, "2.0.5", (2, 0, 5), "NIM 2.x"),  # spec.runtimeVersion wins
    (NIM_2, "1.3.3", (1, 3, 3), "NIM 1.x"),
])
def test_the_generation_comes_from_runtime_version_else_the_tag(image, declared, version, generation):
    found = deployed_version(Runtime.NIM, image, declared)
    assert found == version
    assert nim_generation(found).capabilities.name == generation
    assert capabilities(Runtime.NIM, found) is nim_generation(found).capabilities


def test_an_unknown_version_says_it_is_taken_as_1x():
    assert "taken" not in (nim_version_note((1, 3, 3)) or "") and nim_version_note((2, 0, 5)) is None
    assert nim_version_note((24, 5, 0)) is None
    assert "checked as for NIM 1.x" in nim_version_note(None)
    assert "set spec.runtimeVersion" in nim_version_note(None)
    assert nim_version_note((3, 0, 0)) == ("NIM 3.0.0 is newer than loraplex knows; it is rendered and its adapters "
                                           "are checked as for NIM 2.x")


@pytest.mark.parametrize(("version", "loads", "accepted", "converts"), [
    ((1, 3, 3), {"hf", "nemo", "trtllm"}, {"hf", "nemo", "trtllm", "nxd"}, {"nxd": "hf"}),
    (None, {"hf", "nemo", "trtllm"}, {"hf", "nemo", "trtllm", "nxd"}, {"nxd": "hf"}),
    ((2, 0, 5), {"hf"}, {"hf", "nemo", "trtllm", "nxd"}, {"trtllm": "hf", "nemo": "hf", "nxd": "hf"}),
])
def test_formats_per_generation(version, loads, accepted, converts):
    row = capabilities(Runtime.NIM, version)
    assert {f.value for f in row.formats} == loads
    assert {f.value for f in row.accepted_formats} == accepted
    assert {f.value: t.value for f, t in row.converts.items()} == converts


def test_the_unknown_version_row_is_the_table_row_and_vllm_ignores_nim_versions():
    assert capabilities(Runtime.NIM) is RUNTIMES[Runtime.NIM]
    assert capabilities(Runtime.VLLM, (2, 0, 5)) is RUNTIMES[Runtime.VLLM]


# ---- what the pod is told ----------------------------------------------------------------------------------

def test_nim_1x_gets_the_nim_max_variables_and_no_passthrough():
    env = inference_env(nim(NIM_1))
    assert (env["NIM_MAX_GPU_LORAS"], env["NIM_MAX_CPU_LORAS"], env["NIM_MAX_LORA_RANK"]) == ("8", "16", "32")
    assert "NIM_PASSTHROUGH_ARGS" not in env and "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in env
    assert env["NIM_PEFT_REFRESH_INTERVAL"] == "10"
    assert inference_env(nim(LATEST)) == env  # unknown: as 1.x, the pod every earlier loraplex rendered


def test_nim_2x_gets_the_limits_as_vllm_arguments():
    env = inference_env(nim(NIM_2, lora={"maxGpuLoras": 8, "maxCpuLoras": 16, "maxRank": 20,
                                         "refreshIntervalSeconds": 5},
                            runtimeArgs=["--max-model-len", "8192", "--chat-template", "a b.jinja"]))
    assert not {"NIM_MAX_GPU_LORAS", "NIM_MAX_CPU_LORAS", "NIM_MAX_LORA_RANK"} & set(env)
    # 20 is not a value vLLM's --max-lora-rank takes: the next one up is, and loraplex still enforces 20.
    assert shlex.split(env["NIM_PASSTHROUGH_ARGS"]) == [
        "--enable-lora", "--max-loras", "8", "--max-cpu-loras", "16", "--max-lora-rank", "32",
        "--max-model-len", "8192", "--chat-template", "a b.jinja"]
    assert (env["NIM_PEFT_SOURCE"], env["NIM_PEFT_REFRESH_INTERVAL"]) == ("/loras", "5")
    assert inference_env(nim(LATEST, runtimeVersion="2.0.5"))["NIM_PASSTHROUGH_ARGS"] == \
        "--enable-lora --max-loras 8 --max-cpu-loras 16 --max-lora-rank 32"


@pytest.mark.parametrize("image", [NIM_2, "nvcr.io/nim/meta/llama-3.1-8b-instruct:2.1.4",
                                   "nvcr.io/nim/meta/llama-3.1-8b-instruct:3.0.0"])
def test_nim_2x_is_told_both_switches_its_dynamic_lora_mode_may_hang_on(image):
    # Static mode would never serve an adapter added after the pod started. Which variable turns dynamic mode on
    # is not established: the watcher's interval and vLLM's runtime LoRA endpoints are both set.
    env = inference_env(nim(image, lora={"refreshIntervalSeconds": 7}))
    assert nim_generation(deployed_version(Runtime.NIM, image, None)).pickup == NimPickup.DYNAMIC
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert env["NIM_PEFT_REFRESH_INTERVAL"] == "7"


@pytest.mark.parametrize(("image", "overrides", "complaint"), [
    (NIM_2, {"lora": {"maxRank": 600, "maxGpuLoras": 1, "maxCpuLoras": 1}},
     "lora.maxRank 600 exceeds 512, the largest --max-lora-rank the vLLM inside NIM 2.0.5 (NIM 2.x) accepts"),
    (NIM_2, {"lora": {"maxGpuLoras": 8, "maxCpuLoras": 4}},
     "lora.maxCpuLoras 4 is below lora.maxGpuLoras 8; the vLLM inside NIM 2.0.5 (NIM 2.x) requires "
     "--max-cpu-loras >= --max-loras"),
    (NIM_1, {"lora": {"maxGpuLoras": 8, "maxCpuLoras": 4}}, "NIM keeps every GPU adapter in its CPU cache too"),
    (NIM_2, {"env": [{"name": "NIM_PASSTHROUGH_ARGS", "value": "--max-loras 2"}]},
     "env NIM_PASSTHROUGH_ARGS would replace the one loraplex sets on NIM 2.0.5 (NIM 2.x)"),
    (NIM_2, {"env": [{"name": "NIM_MAX_LORA_RANK", "value": "64"}]},
     "env NIM_MAX_LORA_RANK is a NIM 1.x variable that NIM 2.0.5 (NIM 2.x) does not read"),
    (NIM_2, {"env": [{"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "False"}]},
     "env VLLM_ALLOW_RUNTIME_LORA_UPDATING would replace the one loraplex sets on NIM 2.0.5 (NIM 2.x) for its "
     "dynamic LoRA mode, without which it serves no adapter added after it started"),
    (NIM_2, {"env": [{"name": "NIM_PEFT_REFRESH_INTERVAL", "value": "0"}]},
     "env NIM_PEFT_REFRESH_INTERVAL would replace the one loraplex sets on NIM 2.0.5 (NIM 2.x)"),
])
def test_what_a_generation_cannot_do_is_refused(image, overrides, complaint):
    spec = nim(image, **overrides)
    assert complaint in "; ".join(render.spec_problems(spec))
    with pytest.raises(render.RenderError, match=complaint.replace("(", r"\(").replace(")", r"\)")[:40]):
        inference_env(spec)


def test_what_1x_loads_is_not_refused_there():
    assert render.spec_problems(nim(NIM_1, lora={"allowedFormats": ["nemo", "trtllm"], "maxRank": 600})) == []
    assert render.spec_problems(nim(NIM_2, lora={"allowedFormats": ["hf", "trtllm", "nemo", "nxd"]})) == []


# ---- what the operator and the sidecar let through -----------------------------------------------------

def adapter(fmt: str) -> AdapterView:
    return AdapterView.from_body({
        "metadata": {"name": "math", "namespace": "ns", "uid": "uid-math", "generation": 1,
                     "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"baseModel": "llama", "source": "s3://bucket/math", "format": fmt}})


@pytest.mark.parametrize(("image", "fmt", "reason"), [
    (NIM_2, "nemo", "SpecAccepted"),  # converted to hf for it
    (NIM_2, "trtllm", "SpecAccepted"),  # converted to hf for it
    (NIM_1, "nxd", "SpecAccepted"),  # converted to hf for it
    (NIM_2, "hf", "SpecAccepted"),
    (NIM_1, "nemo", "SpecAccepted"),
    (LATEST, "nemo", "SpecAccepted"),
])
def test_the_operator_accepts_formats_per_generation(image, fmt, reason):
    verdict = check_adapter(adapter(fmt), nim(image), [])
    assert verdict.reason == reason, verdict.message


def test_what_a_base_model_does_not_allow_is_refused_by_format():
    verdict = check_adapter(adapter("nemo"), nim(NIM_2, lora={"allowedFormats": ["hf", "trtllm"]}), [])
    assert verdict.reason == "FormatNotAllowed"
    assert "format nemo is not accepted by base model 'llama' (runtime nim; allowed: hf, trtllm)" in verdict.message


def test_the_sidecar_is_told_the_generation():
    settings = render.sidecar_settings("llama", nim(NIM_2))
    assert settings.runtime_version == (2, 0, 5)
    assert {"name": "LORAPLEX_RUNTIME_VERSION", "value": "2.0.5"} in settings.to_env()
    assert AdapterLimits.of(nim(NIM_2)).allowed_formats == \
        [AdapterFormat.HF, AdapterFormat.NEMO, AdapterFormat.NXD, AdapterFormat.TRTLLM]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nim-adapters")
    make_hf_adapter(root / "hf", rank=8, target_modules=("q_proj", "v_proj"))
    make_nemo_adapter(root / "nemo", rank=8)
    make_trtllm_adapter(root / "trtllm", rank=8)
    return root


def sidecar_policy(version, base_config=TINY_LLAMA) -> AdapterPolicy:
    """What the sidecar's lifecycle builds from LORAPLEX_RUNTIME_VERSION and the adapter set's limits."""
    return AdapterPolicy(runtime=Runtime.NIM, runtime_version=version, max_rank=64, base_config=base_config)


def test_the_sidecar_converts_nemo_for_nim_2x_and_serves_it_as_it_is_on_1x(tmp_path):
    base = {**TINY_LLAMA, "num_hidden_layers": 4}
    peft = share_fused_lora_a(make_hf_adapter(tmp_path / "peft", rank=8, target_modules=LLAMA_LINEAR_MODULES,
                                              base_config=base))
    nemo = make_nemo_from_peft(peft, tmp_path / "nemo", base)
    report, converted_from = validate_or_convert(nemo, sidecar_policy((1, 3, 3), base))
    assert (report.format, converted_from) == (AdapterFormat.NEMO, None)
    report, converted_from = validate_or_convert(nemo, sidecar_policy((2, 0, 5), base))
    assert (report.format, converted_from) == (AdapterFormat.HF, AdapterFormat.NEMO)


def test_the_sidecar_converts_trtllm_for_nim_2x_only(built, tmp_path):
    as_is, converted_from = validate_or_convert(built / "trtllm", sidecar_policy((1, 3, 3)))
    assert (as_is.format, converted_from) == (AdapterFormat.TRTLLM, None)

    staging = Path(shutil.copytree(built / "trtllm", tmp_path / "trtllm"))
    report, converted_from = validate_or_convert(staging, sidecar_policy((2, 0, 5)))
    assert (report.format, converted_from) == (AdapterFormat.HF, AdapterFormat.TRTLLM)
    assert (staging / "adapter_config.json").is_file() and not list(staging.glob("*.npy"))

    again = Path(shutil.copytree(built / "trtllm", tmp_path / "again"))
    with pytest.raises(Rejection, match=r"NIM 2\.x loads trtllm adapters only once loraplex converts them to hf"):
        validate_or_convert(again, sidecar_policy((2, 0, 5), None))


# ---- the rendered pod against the NIM double, as the sidecar's client drives it -----------------------------

def static_env(env: dict[str, str]) -> dict[str, str]:
    """What the 2.x pod was told before loraplex knew of dynamic LoRA mode."""
    args = [a for a in shlex.split(env["NIM_PASSTHROUGH_ARGS"]) if a != "--enable-lora"]
    return {**{k: v for k, v in env.items() if k != "VLLM_ALLOW_RUNTIME_LORA_UPDATING"},
            "NIM_PASSTHROUGH_ARGS": shlex.join(args)}


def bare_env(env: dict[str, str]) -> dict[str, str]:
    """Neither switch: static LoRA mode in either reading."""
    return {k: v for k, v in static_env(env).items() if k != "NIM_PEFT_REFRESH_INTERVAL"}


async def place_after_start(peft: Path, env: dict[str, str], switch: Switch, ranks: dict[str, int],
                            retire: str | None = None) -> tuple[set[str], str, set[str]]:
    """What NIM lists once the sidecar's client placed adapters of these ranks after NIM started with one adapter
    ("early"), the failures it met, and what NIM lists once `retire` is removed again."""
    make_hf_adapter(peft / "early", rank=8, target_modules=("q_proj", "v_proj"))
    nim_server = FakeNim.two("meta/llama3", peft, env, switch).start()
    client = client_for(Runtime.NIM, nim_server.url, "meta/llama3", refresh_interval=0.3, version=(2, 0, 5))
    try:
        failures = []
        for name, rank in ranks.items():
            make_hf_adapter(peft / name, rank=rank, target_modules=("q_proj", "v_proj"))
            try:
                await client.load(name, str(peft / name))
            except LoadFailed as exc:
                failures.append(str(exc))
        served = set(await client.served_adapters())
        if retire is not None:
            await client.unload(retire)
            shutil.rmtree(peft / retire)
            await client.retired(retire)
        return served, "; ".join(failures), set(await client.served_adapters())
    finally:
        await client.close()
        nim_server.stop()


@pytest.mark.parametrize("switch", list(Switch))
async def test_nim_2x_serves_and_retires_adapters_added_after_it_started(tmp_path, switch):
    env = inference_env(nim(NIM_2, lora={"maxGpuLoras": 2, "maxCpuLoras": 4, "maxRank": 16,
                                         "refreshIntervalSeconds": 1}))
    served, failure, after = await place_after_start(tmp_path / "loras", env, switch, {"late": 8, "too-big": 64},
                                                     retire="late")
    assert served == {"early", "late"}
    if switch == Switch.API:  # NIM's own sentence
        assert failure == "NIM refused to load too-big: LoRA rank 64 is greater than max_lora_rank 16."
    else:  # the watcher skips it in silence
        assert failure.startswith("NIM did not list too-big in /v1/models within 6s and serves no load API")
    assert after == {"early"}


@pytest.mark.parametrize(("switch", "pod"), [(Switch.API, static_env), (Switch.WATCHER, bare_env)])
async def test_without_its_switch_nim_2x_never_serves_a_late_adapter_and_the_sidecar_says_so(tmp_path, switch, pod):
    env = pod(inference_env(nim(NIM_2, lora={"maxRank": 16, "refreshIntervalSeconds": 1})))
    served, failure, _ = await place_after_start(tmp_path / "loras", env, switch, {"late": 8})
    assert served == {"early"}  # read once, at start
    assert failure.startswith("NIM did not list late in /v1/models within 6s and serves no load API: it runs in "
                              "static LoRA mode")
