"""NeuronX Distributed LoRA checkpoints, written per tensor-parallel rank as nxd.save_checkpoint does from a
known PEFT adapter, come back as PEFT adapters with the same ΔW per module and layer that pass the vLLM rules;
what cannot be converted is refused in a sentence."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from loraplex.api.types import Runtime
from loraplex.formats import AdapterPolicy, Rejection, nxd, validate
from loraplex.formats.peft_writer import write_peft_adapter
from tests.adapters import LLAMA_LINEAR_MODULES, TINY_LLAMA, make_hf_adapter
from tests.producers import (
    TensorReference,
    make_nxd_from_peft,
    peft_delta_weights,
    share_fused_lora_a,
    torch_xla_stand_in,
)

# One K/V head: at tp=2 the GQA layer replicates it (kv_size_multiplier 2), so each rank holds all of K and V.
ONE_KV_HEAD = {**TINY_LLAMA, "num_key_value_heads": 1}
MODEL = "lora_adapter/lora/model"


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """PEFT adapters an NxD Llama could have trained (lora_A shared by q/k/v and by gate/up). r=4, alpha=8: the
    scale 2 (and rslora's 4) multiplies exactly, so float32 must round-trip bit for bit."""
    root = tmp_path_factory.mktemp("peft")
    made = {}
    for name, config, options in (("gqa", TINY_LLAMA, {}), ("one-kv-head", ONE_KV_HEAD, {}),
                                  ("rslora", TINY_LLAMA, {"use_rslora": True})):
        adapter = make_hf_adapter(root / name, rank=4, target_modules=LLAMA_LINEAR_MODULES, base_config=config,
                                  seed=5, **options)
        made[name] = share_fused_lora_a(adapter)
    return made


def convert(source: Path, out: Path, base_config: dict) -> Path:
    write_peft_adapter(nxd.read_pairs(source, base_config), out, converted_from="nxd")
    return out


CASES = [  # reference, tp, options
    ("gqa", 1, {"config_in_checkpoint": True}),
    ("gqa", 1, {"config_in_checkpoint": False, "storage": "bfloat16"}),
    ("gqa", 2, {"config_in_checkpoint": True, "storage": "bfloat16"}),
    ("gqa", 2, {"config_in_checkpoint": False}),
    ("gqa", 2, {"fuse_qkv": True}),
    ("gqa", 2, {"gathered": True, "fuse_qkv": True}),
    ("one-kv-head", 2, {}),
    ("one-kv-head", 2, {"fuse_qkv": True, "config_in_checkpoint": False}),
    ("rslora", 2, {}),
    ("gqa", 1, {"xser": True}),
    ("gqa", 1, {"xser": True, "storage": "bfloat16", "config_in_checkpoint": False}),
    ("gqa", 2, {"xser": True, "storage": "bfloat16"}),
    ("gqa", 2, {"xser": True, "fuse_qkv": True, "config_in_checkpoint": False}),
    ("gqa", 2, {"xser": True, "gathered": True}),
    ("one-kv-head", 2, {"xser": True}),
]


@pytest.mark.parametrize(("reference", "tp", "options"), CASES,
                         ids=[f"{r}-tp{tp}-" + "-".join(f"{k}={v}" for k, v in o.items()) for r, tp, o in CASES])
def test_nxd_checkpoints_convert_back_to_the_same_delta_weights(tmp_path, references, reference, tp, options):
    base = ONE_KV_HEAD if reference == "one-kv-head" else TINY_LLAMA
    source = make_nxd_from_peft(references[reference], tmp_path / "work", base, tp=tp, **options)
    assert nxd.is_nxd(source)
    out = convert(source, tmp_path / "out", base)
    got, want = peft_delta_weights(out), peft_delta_weights(references[reference])
    assert got.keys() == want.keys() and {module for _, module in got} == set(LLAMA_LINEAR_MODULES)
    for key, delta in want.items():
        if options.get("storage") == "bfloat16":
            error = (got[key] - delta).abs().max() / delta.abs().max()
            assert error <= 1.6e-2, f"{key}: relative error {error:.2e}"
        else:
            assert torch.equal(got[key], delta), key
    report = validate(out, AdapterPolicy(runtime=Runtime.VLLM, max_rank=16, base_config=base))
    assert report.rank == 4 and set(report.target_modules) == set(LLAMA_LINEAR_MODULES)


def test_bfloat16_stays_bfloat16_and_a_keeps_its_bits(tmp_path, references):
    from safetensors import safe_open

    source = make_nxd_from_peft(references["gqa"], tmp_path / "work", TINY_LLAMA, tp=2, storage="bfloat16")
    out = convert(source, tmp_path / "out", TINY_LLAMA)
    stored = torch.load(source / MODEL / "dp_rank_00_tp_rank_01_pp_rank_00.pt", weights_only=True)
    with safe_open(out / "adapter_model.safetensors", "pt") as file:
        a_k = file.get_tensor("base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight")
        b_q = file.get_tensor("base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight")
    assert a_k.dtype == b_q.dtype == torch.bfloat16
    assert torch.equal(a_k, stored["model.layers.1.self_attn.qkv_proj.lora_A.weight"])  # the shared A
    assert torch.equal(b_q[16:], stored["model.layers.1.self_attn.qkv_proj.lora_B.weight_q"] * 2)  # rank 1's half


def test_inspect_reports_the_checkpoint_under_nxd_names(tmp_path, references):
    source = make_nxd_from_peft(references["gqa"], tmp_path / "work", TINY_LLAMA, tp=2, config_in_checkpoint=False)
    report = nxd.inspect(source)
    assert report.rank == 4 and report.rank_source == "lora_adapter/adapter_config.json: lora_rank=4"
    assert report.target_modules == ("down_proj", "gate_up_proj", "o_proj", "qkv_proj")
    assert report.files == tuple(f"{MODEL}/dp_rank_00_tp_rank_{tp:02d}_pp_rank_00.pt" for tp in (0, 1))
    down = next(w for w in report.weights if w.module == "down_proj" and w.layer == 0)
    assert (down.in_features, down.out_features) == (64, 32)  # lora_A's columns joined over both ranks
    assert nxd.is_nxd(source / "lora_adapter" / "lora") and nxd.is_nxd(source / "lora_adapter")
    assert not nxd.is_nxd(references["gqa"])  # a PEFT adapter's adapter_config.json has peft_type


def test_a_single_device_adapter_model_pt_converts(tmp_path, references):
    source = make_nxd_from_peft(references["gqa"], tmp_path / "work", TINY_LLAMA, tp=1)
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(source / MODEL / "dp_rank_00_tp_rank_00_pp_rank_00.pt", single / "adapter_model.pt")
    out = convert(single, tmp_path / "out", TINY_LLAMA)
    want = peft_delta_weights(references["gqa"])
    assert all(torch.equal(delta, want[key]) for key, delta in peft_delta_weights(out).items())


class _RunsAShell:
    def __reduce__(self):
        return os.system, ("touch pwned",)


def _rewrite(path: Path, change) -> None:
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)


def test_refusals_name_the_file_and_the_reason(tmp_path, references, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def fresh(name: str, **options) -> Path:
        config = options.pop("base", TINY_LLAMA)
        return make_nxd_from_peft(references[options.pop("reference", "gqa")], tmp_path / name, config, **options)

    def refused(source: Path, match: str, base: dict = TINY_LLAMA) -> None:
        with pytest.raises(Rejection, match=match):
            nxd.read_pairs(source, base)

    source = fresh("last-rank-missing", tp=2)
    (source / MODEL / "dp_rank_00_tp_rank_01_pp_rank_00.pt").unlink()
    refused(source, "down_proj of layer 0 assembles to 32→32, but the base model's config.json gives 64→32; a tp "
                    "rank file is missing")
    source = fresh("first-rank-missing", tp=2)
    (source / MODEL / "dp_rank_00_tp_rank_00_pp_rank_00.pt").unlink()
    refused(source, "lacks the tensor-parallel rank file dp_rank_00_tp_rank_00_pp_rank_00.pt")

    source = fresh("forbidden-global", tp=1)
    _rewrite(source / MODEL / "dp_rank_00_tp_rank_00_pp_rank_00.pt",
             lambda state: state["lora_config"].update(target_modules=_RunsAShell()))
    refused(source, r"dp_rank_00_tp_rank_00_pp_rank_00.pt: refused: refers to (posix|nt)\.system")
    assert not (tmp_path / "pwned").exists()

    for name, options in (("pipeline", {}), ("pipeline-xser", {"xser": True})):
        source = fresh(name, tp=2, pp=2, **options)
        refused(source, f"{MODEL}: holds pipeline-parallel ranks 00, 01, but NxD cannot save a LoRA adapter with "
                        r"pp>1: .* \(docs/formats/nxd.md §4.3\); loraplex converts checkpoints saved with pp=1")
        (source / MODEL / "dp_rank_00_tp_rank_01_pp_rank_01.pt").unlink()  # a stage lacking a tp rank: pp first
        refused(source, "holds pipeline-parallel ranks 00, 01, but NxD cannot save a LoRA adapter with pp>1")

    source = fresh("gathered-replicated-kv", tp=2, reference="one-kv-head", base=ONE_KV_HEAD, gathered=True)
    refused(source, "weight_q holds 16 of the base model's 32 rows: NxD's merge_sharded_lora gather", ONE_KV_HEAD)

    source = fresh("no-config", tp=1, config_in_checkpoint=False)
    (source / "lora_adapter" / "adapter_config.json").unlink()
    refused(source, "has no lora_config entry and no adapter_config.json was found")

    source = fresh("ranks-disagree", tp=2)
    _rewrite(source / MODEL / "dp_rank_00_tp_rank_01_pp_rank_00.pt",
             lambda state: state["model.layers.0.mlp.gate_up_proj.lora_A.weight"].mul_(3))
    refused(source, "tp_rank_01_pp_rank_00.pt: model.layers.0.mlp.gate_up_proj.lora_A.weight differs from")

    source = fresh("with-base", tp=1)
    _rewrite(source / MODEL / "dp_rank_00_tp_rank_00_pp_rank_00.pt",
             lambda state: state.update({"model.layers.0.mlp.down_proj.base_layer.weight": torch.zeros(32, 64)}))
    refused(source, r"holds model.layers.0.mlp.down_proj.base_layer.weight, a full copy of a base weight")

    source = fresh("unfinished", tp=1)
    (source / "lora_adapter" / "lora" / "done").unlink()
    refused(source, "lora_adapter/lora: has a checkpoint marker but no done marker")

    source = fresh("stray-tensor-folder", tp=1)
    (source / MODEL / "dp_rank_00_tp_rank_00_pp_rank_00.pt.tensors").mkdir()
    refused(source, "dp_rank_00_tp_rank_00_pp_rank_00.pt.tensors: sits beside dp_rank_00_tp_rank_00_pp_rank_00.pt, "
                    "which refers to no xser tensor")

    source = fresh("other-base", tp=1)
    refused(source, "o_proj of layer 0 assembles to 32→32, but the base model's config.json gives 16→32",
            {**TINY_LLAMA, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 2})

    source = fresh("bad-rank", tp=1, config_in_checkpoint=False)
    config_path = source / "lora_adapter" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "r": 8}))
    refused(source, "lora_adapter/adapter_config.json: r=8 differs from lora_rank=4")


XSER_RANK = f"{MODEL}/dp_rank_00_tp_rank_01_pp_rank_00.pt"


def _restructure(path: Path, change) -> None:
    """Rewrite an xser rank file's structure (its dict of TensorReferences and lora_config)."""
    with torch_xla_stand_in():
        structure = torch.load(path, weights_only=False)
        torch.save(change(structure), path)


def test_xser_tensors_are_found_by_their_id_not_by_the_order_of_keys(tmp_path, references):
    source = make_nxd_from_peft(references["gqa"], tmp_path / "work", TINY_LLAMA, tp=2, xser=True)
    with torch_xla_stand_in():
        structure = torch.load(source / XSER_RANK, weights_only=False)
    assert isinstance(structure["model.layers.0.self_attn.qkv_proj.lora_A.weight"], TensorReference)
    assert [ref.tid for ref in structure.values() if isinstance(ref, TensorReference)] == list(range(20))
    _restructure(source / XSER_RANK, lambda structure: dict(reversed(structure.items())))
    out = convert(source, tmp_path / "out", TINY_LLAMA)
    want = peft_delta_weights(references["gqa"])
    assert all(torch.equal(delta, want[key]) for key, delta in peft_delta_weights(out).items())
    report = nxd.inspect(source)
    tensor_files = sorted((source / MODEL).glob("*.pt.tensors/tensor_*.pt"))
    assert len(tensor_files) == 40 and report.files[1] == XSER_RANK
    assert report.size_bytes == sum(path.stat().st_size for path in (source / MODEL).rglob("*.pt"))


def test_xser_refusals_name_the_file_and_the_reason(tmp_path, references, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def fresh(name: str, **options) -> Path:
        return make_nxd_from_peft(references["gqa"], tmp_path / name, TINY_LLAMA, tp=2, xser=True, **options)

    def refused(source: Path, match: str) -> None:
        with pytest.raises(Rejection, match=match):
            nxd.read_pairs(source, TINY_LLAMA)

    tensors = f"{XSER_RANK}.tensors"
    source = fresh("missing-tensor-file")
    (source / tensors / "tensor_3.pt").unlink()
    refused(source, f"{tensors}: lacks tensor_3.pt, which holds model.layers.0.self_attn.qkv_proj.lora_B.weight_v: the "
                    "save did not finish or the folder was copied in part")

    source = fresh("extra-tensor-file")
    shutil.copy(source / tensors / "tensor_3.pt", source / tensors / "tensor_20.pt")
    refused(source, f"{tensors}/tensor_20.pt: is named by no key of dp_rank_00_tp_rank_01_pp_rank_00.pt: the folder "
                    "mixes tensors of another save")

    source = fresh("not-a-tensor-file")
    (source / tensors / "notes.txt").write_text("hello")
    refused(source, rf"{tensors}/notes.txt: is not an xser tensor file \(tensor_<id>.pt\)")

    source = fresh("no-tensor-folder")
    shutil.rmtree(source / tensors)
    refused(source, f"{XSER_RANK}: is an xser file .* its tensor folder dp_rank_00_tp_rank_01_pp_rank_00.pt.tensors/ "
                    "is missing")

    source = fresh("first-rank-missing")
    (source / MODEL / "dp_rank_00_tp_rank_00_pp_rank_00.pt").unlink()
    refused(source, "lacks the tensor-parallel rank file dp_rank_00_tp_rank_00_pp_rank_00.pt")

    source = fresh("forbidden-global")
    _restructure(source / XSER_RANK, lambda structure: {**structure, "lora_config": _RunsAShell()})
    refused(source, rf"{XSER_RANK}: refused: refers to (posix|nt)\.system")
    assert not (tmp_path / "pwned").exists()

    source = fresh("reference-with-more-than-an-id")

    def widen(structure: dict) -> dict:
        structure["model.layers.0.mlp.down_proj.lora_A.weight"].path = "/etc/passwd"
        return structure

    _restructure(source / XSER_RANK, widen)
    refused(source, f"{XSER_RANK}: refused: has a TensorReference that holds more or other than one tensor id")

    source = fresh("tensor-file-holds-code")
    with (source / tensors / "tensor_0.pt").open("wb") as file:
        torch.save(_RunsAShell(), file)
    refused(source, rf"{tensors}/tensor_0.pt: refused: refers to (posix|nt)\.system")

    source = fresh("tensor-file-holds-a-dict")
    torch.save({"weight": torch.zeros(4, 32)}, source / tensors / "tensor_0.pt")
    refused(source, f"{tensors}/tensor_0.pt: refused: holds something other than one tensor")

    source = fresh("info-disagrees")
    info_path = source / f"{XSER_RANK}.info.pt"
    info = torch.load(info_path, weights_only=True)
    info[0]["shape"] = torch.Size([8, 32])
    torch.save(info, info_path)
    refused(source, rf"{tensors}/tensor_0.pt: holds a \[4, 32\] float32 tensor, but "
                    r"dp_rank_00_tp_rank_01_pp_rank_00.pt.info.pt gives \[8, 32\] float32 for "
                    "model.layers.0.self_attn.qkv_proj.lora_A.weight")
    info[99] = info.pop(0)
    torch.save(info, info_path)
    refused(source, f"{XSER_RANK}.info.pt: describes other tensors than dp_rank_00_tp_rank_01_pp_rank_00.pt refers "
                    "to")

