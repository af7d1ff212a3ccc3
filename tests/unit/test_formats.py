"""Adapter validation on real adapters built locally, hostile files included."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from loraplex.api.types import AdapterFormat, Runtime
from loraplex.formats import AdapterPolicy, Rejection, inspect, validate
from loraplex.formats.nemo import inspect as inspect_nemo
from loraplex.formats.report import read_json_object
from tests.adapters import TINY_LLAMA, make_hf_adapter, make_nemo_adapter, make_trtllm_adapter, nemo_state_dict
from tests.producers import make_trtllm_from_peft


@pytest.fixture(scope="session")
def adapters(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    make_hf_adapter(root / "hf", rank=8, target_modules=("q_proj", "v_proj"))
    make_hf_adapter(root / "hf-bin", rank=4, target_modules=("q_proj",), safetensors=False)
    make_hf_adapter(root / "hf-r16-mlp", rank=16, target_modules=("gate_proj", "down_proj"))
    make_hf_adapter(root / "hf-dora", rank=4, target_modules=("q_proj",), use_dora=True)
    make_hf_adapter(root / "hf-wide", rank=4, target_modules=("q_proj",),
                    base_config={**TINY_LLAMA, "hidden_size": 64, "intermediate_size": 128})
    make_nemo_adapter(root / "nemo", rank=8)
    make_trtllm_adapter(root / "trtllm", rank=8)
    return root


def copy(adapters: Path, name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(adapters / name, tmp_path / name))


def rejection(directory: Path, policy: AdapterPolicy | None = None) -> str:
    with pytest.raises(Rejection) as excinfo:
        validate(directory, policy or AdapterPolicy())
    return str(excinfo.value)


# ---- accepted adapters, every format --------------------------------------------------------------------

@pytest.mark.parametrize(("name", "fmt", "rank", "modules"), [
    ("hf", AdapterFormat.HF, 8, ("q_proj", "v_proj")),
    ("hf-bin", AdapterFormat.HF, 4, ("q_proj",)),
    ("hf-r16-mlp", AdapterFormat.HF, 16, ("down_proj", "gate_proj")),
    ("nemo", AdapterFormat.NEMO, 8, ("attention_qkv",)),
    ("trtllm", AdapterFormat.TRTLLM, 8, ("attn_qkv",)),
])
def test_real_adapters_are_read_from_headers(adapters, name, fmt, rank, modules):
    report = validate(adapters / name, AdapterPolicy(max_rank=64, base_config=TINY_LLAMA))
    assert (report.format, report.rank, report.target_modules) == (fmt, rank, modules)
    assert report.size_bytes > 0
    if fmt != AdapterFormat.TRTLLM:
        assert {w.layer for w in report.weights} == {0, 1}


def test_shapes_match_the_tiny_llama(adapters):
    report = inspect(adapters / "hf")
    shapes = {(w.module, w.in_features, w.out_features) for w in report.weights}
    assert shapes == {("q_proj", 32, 32), ("v_proj", 32, 16)}  # 4 heads x 8, 2 kv heads x 8


# ---- the rules -------------------------------------------------------------------------------------------------

def test_rank_above_the_limit_names_the_file_and_the_limit(adapters):
    assert rejection(adapters / "hf-r16-mlp", AdapterPolicy(max_rank=8)) == \
        "adapter_config.json: r=16 exceeds this base model's maxLoraRank 8"
    assert rejection(adapters / "nemo", AdapterPolicy(max_rank=4)) == \
        "adapter.nemo: peft.lora_tuning.adapter_dim=8 exceeds this base model's maxLoraRank 4"
    assert rejection(adapters / "trtllm", AdapterPolicy(max_rank=4)) == \
        "model.lora_config.npy: adapter size 8 exceeds this base model's maxLoraRank 4"


def test_expected_rank_and_format_must_match(adapters):
    assert "differs from the expected rank 16" in rejection(adapters / "hf", AdapterPolicy(expected_rank=16))
    assert "holds a hf adapter, not nemo" in rejection(adapters / "hf",
                                                       AdapterPolicy(expected_format=AdapterFormat.NEMO))


@pytest.mark.parametrize(("name", "runtime", "complaint"), [
    ("nemo", Runtime.VLLM, "nemo adapters cannot be loaded by vllm"),
    ("trtllm", Runtime.VLLM, "trtllm adapters cannot be loaded by vllm"),
    ("hf-dora", Runtime.VLLM, "adapter_config.json: use_dora=true: vLLM refuses DoRA adapters"),
])
def test_runtime_rules(adapters, name, runtime, complaint):
    assert complaint in rejection(adapters / name, AdapterPolicy(runtime=runtime))


def test_nim_accepts_every_format(adapters):
    for name in ("hf", "nemo", "trtllm"):
        validate(adapters / name, AdapterPolicy(runtime=Runtime.NIM))


def test_allowed_target_modules(adapters):
    message = rejection(adapters / "hf", AdapterPolicy(allowed_target_modules=frozenset({"q_proj"})))
    assert message.startswith("adapter_config.json: targets v_proj, outside this base model's allowedTargetModules")


def test_adapter_for_another_base_model_is_caught_by_shape(adapters):
    message = rejection(adapters / "hf-wide", AdapterPolicy(base_config=TINY_LLAMA))
    assert message == ("adapter_model.safetensors: q_proj of layer 0 maps 64→64 but the base model's config.json "
                       "gives 32→32; the adapter was trained for another base model")
    fewer_layers = rejection(adapters / "nemo", AdapterPolicy(base_config={**TINY_LLAMA, "num_hidden_layers": 1}))
    assert "adapts layer 1 but the base model has 1 layers" in fewer_layers


# ---- malformed HF adapters ----------------------------------------------------------------------------------

def edit_config(directory: Path, **changes) -> None:
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(("changes", "complaint"), [
    ({"peft_type": "PREFIX_TUNING"}, "adapter_config.json: peft_type 'PREFIX_TUNING' is not LORA"),
    ({"r": 0}, "adapter_config.json: r=0 must be an integer of at least 1"),
    ({"r": "8"}, "adapter_config.json: r='8' must be an integer of at least 1"),
    ({"r": 4}, "adapter_model.safetensors: base_model.model.model.layers.0.self_attn.q_proj has rank 8 but "
               "adapter_config.json says r=4"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save ['lm_head'] are full weight copies"),
])
def test_config_errors(adapters, tmp_path, changes, complaint):
    directory = copy(adapters, "hf", tmp_path)
    edit_config(directory, **changes)
    assert complaint in rejection(directory)


def test_config_that_is_not_json(adapters, tmp_path):
    directory = copy(adapters, "hf", tmp_path)
    (directory / "adapter_config.json").write_text("{not json")
    assert rejection(directory).startswith("adapter_config.json: is not valid JSON")


@pytest.mark.parametrize(("content", "complaint"), [
    (b"{not json", "lora/config.json: is not valid JSON (Expecting property name enclosed in double quotes"),
    (b"\xff{}", "lora/config.json: is not valid JSON ('utf-8' codec can't decode byte 0xff"),
    (b'["r", 8]', "lora/config.json: must hold a JSON object"),
    (b'{"r": 8}' + b" " * 64, "lora/config.json: is 72 bytes, far above any real adapter config"),
], ids=["not-json", "not-utf8", "array", "too-large"])
def test_a_json_config_that_is_not_one_small_object_is_refused(tmp_path, content, complaint):
    path = tmp_path / "config.json"
    path.write_bytes(content)
    with pytest.raises(Rejection) as refused:
        read_json_object(path, "lora/config.json", max_bytes=64)
    assert str(refused.value).startswith(complaint)


def test_a_json_config_object_is_read_as_written(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"r": 8, "target_modules": ["q_proj"]}')
    assert read_json_object(path, "config.json", max_bytes=64) == {"r": 8, "target_modules": ["q_proj"]}


def test_missing_weights(adapters, tmp_path):
    directory = copy(adapters, "hf", tmp_path)
    (directory / "adapter_model.safetensors").unlink()
    assert "has no weights beside it" in rejection(directory)


def rewrite_header(path: Path, mutate) -> None:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    mutate(header)
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + length:])


def test_safetensors_with_out_of_bounds_offsets(adapters, tmp_path):
    directory = copy(adapters, "hf", tmp_path)

    def stretch(header):
        key = next(k for k in header if k != "__metadata__")
        header[key]["data_offsets"][1] += 10**9

    rewrite_header(directory / "adapter_model.safetensors", stretch)
    assert "inconsistent with its shape" in rejection(directory)


def test_safetensors_with_an_absurd_header_length(adapters, tmp_path):
    directory = copy(adapters, "hf", tmp_path)
    path = directory / "adapter_model.safetensors"
    path.write_bytes(struct.pack("<Q", 2**60) + path.read_bytes()[8:])
    assert "declares a 1152921504606846976-byte header" in rejection(directory)


def test_unpaired_lora_matrix(adapters, tmp_path):
    directory = copy(adapters, "hf", tmp_path)
    rewrite_header(directory / "adapter_model.safetensors",
                   lambda header: header.pop("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"))
    assert "has lora_A without its pair" in rejection(directory)


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_bin_with_code_is_refused_and_nothing_runs(adapters, tmp_path):
    directory = copy(adapters, "hf-bin", tmp_path)
    marker = tmp_path / "code-ran"
    torch.save({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32),
                "evil": _Payload(marker)}, directory / "adapter_model.bin")
    message = rejection(directory)
    assert message.startswith("adapter_model.bin: refused: refers to posix.system")
    assert not marker.exists()


def test_legacy_raw_pickle_bin_is_refused_and_nothing_runs(adapters, tmp_path):
    directory = copy(adapters, "hf-bin", tmp_path)
    marker = tmp_path / "code-ran"
    (directory / "adapter_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    assert "legacy pickles are refused" in rejection(directory)
    assert not marker.exists()


# ---- hostile .nemo archives -------------------------------------------------------------------------------

def member(name: str, kind: bytes = tarfile.REGTYPE, payload: bytes | None = b"x", link: str = "") -> tuple:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    if payload is not None and kind == tarfile.REGTYPE:
        info.size = len(payload)
    return info, payload if kind == tarfile.REGTYPE else None


@pytest.mark.parametrize(("extra", "complaint"), [
    (member("/etc/cron.d/evil"), "member '/etc/cron.d/evil' has an absolute path"),
    (member("../../escape.txt"), "member '../../escape.txt' climbs out of the archive"),
    (member("model_link", tarfile.SYMTYPE, link="/etc/passwd"), "member 'model_link' is a link"),
    (member("hard", tarfile.LNKTYPE, link="model_weights.ckpt"), "member 'hard' is a link"),
    (member("dev", tarfile.CHRTYPE), "member 'dev' is a device, fifo or other special file"),
    (member("fifo", tarfile.FIFOTYPE), "member 'fifo' is a device, fifo or other special file"),
])
def test_hostile_nemo_members_are_refused(tmp_path, extra, complaint):
    directory = make_nemo_adapter(tmp_path / "nemo", extra_members=[extra])
    assert complaint in rejection(directory)


def test_nemo_size_bomb_is_refused(tmp_path):
    directory = make_nemo_adapter(tmp_path / "nemo", extra_members=[member("big.bin", payload=b"\0" * 200_000)])
    with pytest.raises(Rejection, match="unpacks to more than 100000 bytes"):
        inspect_nemo(directory, max_bytes=100_000)


def test_nemo_checkpoint_with_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "code-ran"
    state = {**nemo_state_dict(8), "evil": _Payload(marker)}
    directory = make_nemo_adapter(tmp_path / "nemo", state_dict=state)
    assert "adapter.nemo/model_weights.ckpt: refused: refers to posix.system" in rejection(directory)
    assert not marker.exists()


def test_nemo_without_lora_tuning(tmp_path):
    directory = make_nemo_adapter(tmp_path / "nemo", config={"peft": {"peft_scheme": "ptuning"}})
    assert "has no peft.lora_tuning section" in rejection(directory)


def test_nemo_rank_must_match_the_weights(tmp_path):
    directory = make_nemo_adapter(tmp_path / "nemo", rank=8, state_dict=nemo_state_dict(4))
    assert "has rank 4/4 but model_config.yaml says adapter_dim=8" in rejection(directory)


def test_not_a_tar(tmp_path):
    (tmp_path / "nemo").mkdir()
    (tmp_path / "nemo" / "adapter.nemo").write_bytes(b"garbage" * 100)
    assert "adapter.nemo: is not a readable tar archive" in rejection(tmp_path / "nemo")


# ---- TensorRT-LLM ------------------------------------------------------------------------------------------------

def test_trtllm_object_arrays_are_refused_without_unpickling(adapters, tmp_path):
    directory = copy(adapters, "trtllm", tmp_path)
    marker = tmp_path / "code-ran"
    np.save(directory / "model.lora_weights.npy", np.array([_Payload(marker)], dtype=object), allow_pickle=True)
    assert "model.lora_weights.npy: is not a plain numeric .npy array" in rejection(directory)
    assert not marker.exists()


def test_trtllm_rows_must_match(adapters, tmp_path):
    directory = copy(adapters, "trtllm", tmp_path)
    np.save(directory / "model.lora_weights.npy", np.zeros((1, 5, 10), dtype=np.float16))
    assert "expected one row per model.lora_config.npy row (2)" in rejection(directory)


def write_trtllm_rows(directory: Path, rows: list[tuple[int, int, int, int]]) -> Path:
    """(module id, layer, adapter size, packed values) rows, padded to the widest as the converters do."""
    directory.mkdir(parents=True, exist_ok=True)
    width = max(values for *_, values in rows)
    np.save(directory / "model.lora_config.npy", np.array([[[m, layer, size] for m, layer, size, _ in rows]],
                                                          dtype=np.int32))
    np.save(directory / "model.lora_weights.npy", np.zeros((1, len(rows), width), dtype=np.float16))
    return directory


def test_trtllm_rows_are_checked_against_the_base_model_shapes(tmp_path):
    policy = AdapterPolicy(base_config=TINY_LLAMA)  # hidden 32, q 32, kv 16, intermediate 64
    mixed = write_trtllm_rows(tmp_path / "mixed", [(1, 0, 8, 8 * (32 + 32)), (6, 1, 8, 8 * (64 + 32))])
    assert validate(mixed, policy).target_modules == ("attn_q", "mlp_4h_to_h")
    fused = write_trtllm_rows(tmp_path / "fused", [(5, 0, 4, 4 * (32 + 128))])  # gate+up in one projection
    assert validate(fused, policy).rank == 4

    narrower = make_trtllm_adapter(tmp_path / "narrow", rank=8, hidden=16, qkv_out=32)
    assert ("row 0 (attn_qkv of layer 0, adapter size 8) needs 768 values for the base model's 32→64 attn_qkv, "
            "but rows hold 384") in rejection(narrower, policy)
    wider = make_trtllm_adapter(tmp_path / "wide", rank=8, hidden=64, qkv_out=128)
    assert "rows hold 1536 values, but no adapted module of this base model packs to that many (the widest " \
           "packs to 768); the adapter was converted for another base model" in rejection(wider, policy)


def test_empty_folder(tmp_path):
    assert "holds no adapter" in rejection(tmp_path)


# ---- loraplex validate ---------------------------------------------------------------------------------------------

def run_validate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "loraplex.cli", "validate", *args], capture_output=True, text=True,
                          timeout=60)


def test_validate_command_exit_codes_and_json(adapters, tmp_path):
    accepted = run_validate(str(adapters / "hf"), "--runtime", "vllm", "--max-rank", "16", "--json")
    assert accepted.returncode == 0, accepted.stderr
    assert json.loads(accepted.stdout) == {"accepted": True, "format": "hf", "rank": 8,
                                           "targetModules": ["q_proj", "v_proj"], "reason": None,
                                           "convertedFrom": None}
    rejected = run_validate(str(adapters / "hf-r16-mlp"), "--max-rank", "8", "--json")
    assert rejected.returncode == 1
    verdict = json.loads(rejected.stdout)
    assert verdict["accepted"] is False
    assert verdict["reason"] == "adapter_config.json: r=16 exceeds this base model's maxLoraRank 8"
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**TINY_LLAMA, "hidden_size": 64, "intermediate_size": 128}))
    mismatch = run_validate(str(adapters / "hf"), "--base-config", str(config))
    assert mismatch.returncode == 1 and mismatch.stdout.startswith("rejected: adapter_model.safetensors: q_proj")
    nemo_file = run_validate(str(adapters / "nemo" / "adapter.nemo"), "--runtime", "nim")
    assert nemo_file.returncode == 0 and nemo_file.stdout.startswith("accepted: nemo adapter, rank 8")
    assert run_validate(str(tmp_path / "missing")).returncode == 2
    trtllm = make_trtllm_from_peft(adapters / "hf", tmp_path / "trtllm")
    base = tmp_path / "tiny.json"
    base.write_text(json.dumps(TINY_LLAMA))
    converted = run_validate(str(trtllm), "--runtime", "vllm", "--base-config", str(base))
    assert converted.returncode == 0 and converted.stdout.startswith("accepted: hf adapter (converted from trtllm)")
    assert sorted(p.name for p in trtllm.iterdir()) == ["model.lora_config.npy", "model.lora_weights.npy"]
    unconvertible = run_validate(str(trtllm), "--runtime", "vllm")
    assert unconvertible.returncode == 1 and "lora.baseModelConfigMap" in unconvertible.stdout
    assert run_validate(str(adapters / "hf"), "--max-rank", "0").returncode == 2
    assert run_validate(str(adapters / "hf"), "--runtime", "tgi").returncode == 2
