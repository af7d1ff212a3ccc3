"""NeuronX Distributed LoRA checkpoints, written per tensor-parallel rank as nxd.save_checkpoint does from a
known PEFT adapter, come back as PEFT adapters with the same ΔW per module and layer that pass the vLLM rules;
what cannot be converted is refused in a sentence."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

from loraplex.api.types import Runtime
from loraplex.formats import AdapterPolicy, Rejection, nxd, validate
from loraplex.formats.peft_writer import write_peft_adapter
from tests.adapters import LLAMA_LINEAR_MODULES, TINY_LLAMA, make_hf_adapter
from tests.producers import (
    TensorReference,
    assert_same_delta_weights,
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
    # Lightning's ModelCheckpoint through NxD's NeuronCheckpointIO: the whole Lightning dict per rank
    ("gqa", 1, {"lightning": True}),
    ("gqa", 2, {"lightning": True, "storage": "bfloat16"}),
    ("gqa", 2, {"lightning": True, "config_in_checkpoint": False, "zero1": True}),
    ("gqa", 1, {"lightning": True, "xser": True}),
    ("gqa", 2, {"lightning": True, "xser": True, "storage": "bfloat16", "zero1": True}),
    ("gqa", 2, {"lightning": True, "xser": True, "gathered": True, "fuse_qkv": True}),
    ("one-kv-head", 2, {"lightning": True, "xser": True}),
]


@pytest.mark.parametrize(("reference", "tp", "options"), CASES,
                         ids=[f"{r}-tp{tp}-" + "-".join(f"{k}={v}" for k, v in o.items()) for r, tp, o in CASES])
def test_nxd_checkpoints_convert_back_to_the_same_delta_weights(tmp_path, references, reference, tp, options):
    base = ONE_KV_HEAD if reference == "one-kv-head" else TINY_LLAMA
    source = make_nxd_from_peft(references[reference], tmp_path / "work", base, tp=tp, **options)
    assert nxd.is_nxd(source)
    out = convert(source, tmp_path / "out", base)
    assert {module for _, module in peft_delta_weights(out)} == set(LLAMA_LINEAR_MODULES)
    assert_same_delta_weights(out, references[reference], 1.6e-2 if options.get("storage") == "bfloat16" else 0)
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
    assert_same_delta_weights(out, references["gqa"], 0)


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
    assert_same_delta_weights(out, references["gqa"], 0)
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



LIGHTNING = "checkpoints/epoch=0-step=20.ckpt"


@contextlib.contextmanager
def omegaconf_stand_in():
    """A class pickled as omegaconf.dictconfig.DictConfig (Lightning's hparams_type), omegaconf not installed."""
    module = types.ModuleType("omegaconf.dictconfig")
    module.DictConfig = type("DictConfig", (dict,), {"__module__": "omegaconf.dictconfig"})
    sys.modules.update({"omegaconf": types.ModuleType("omegaconf"), "omegaconf.dictconfig": module})
    try:
        yield module.DictConfig
    finally:
        for name in ("omegaconf", "omegaconf.dictconfig"):
            sys.modules.pop(name, None)


@pytest.mark.parametrize("xser", [False, True], ids=["plain", "xser"])
def test_lightning_entries_around_the_state_dict_are_skipped_without_running_them(tmp_path, references, monkeypatch,
                                                                                   xser):
    """Hyper-parameters may hold any object of the user's: outside state_dict, what the allow-list lacks is neither
    imported nor called; the adapter still converts exactly. Data-parallel ranks other than 00 are not read."""
    monkeypatch.chdir(tmp_path)
    with omegaconf_stand_in() as dict_config:
        source = make_nxd_from_peft(references["gqa"], tmp_path / "work", TINY_LLAMA, tp=2, lightning=True, xser=xser,
                                    zero1=True, checkpoint_dir="checkpoints",
                                    hyper_parameters={"hparams_type": dict_config, "config": dict_config(lr=5e-4),
                                                      "callback": _RunsAShell()})
    assert "omegaconf" not in sys.modules
    for dp_01 in (source / LIGHTNING).glob("tp_rank_*_dp_rank_01*"):  # ZeRO-1's other replica: never opened
        shutil.rmtree(dp_01) if dp_01.is_dir() else dp_01.write_bytes(b"not read")
    out = convert(source / "checkpoints", tmp_path / "out", TINY_LLAMA)
    assert not (tmp_path / "pwned").exists() and "omegaconf" not in sys.modules
    assert_same_delta_weights(out, references["gqa"], 0)
    name = "tp_rank_01_pp_rank_00_dp_rank_00" + ("" if xser else "/checkpoint.pt")
    assert nxd.inspect(source).files[1] == f"{LIGHTNING}/{name}"


def _rewrite_lightning(path: Path, change) -> None:
    with torch_xla_stand_in():
        checkpoint = torch.load(path, weights_only=False)
        change(checkpoint)
        torch.save(checkpoint, path)


def test_lightning_refusals_name_the_file_and_the_reason(tmp_path, references, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def fresh(name: str, **options) -> Path:
        options = {"tp": 2, "lightning": True, "checkpoint_dir": "checkpoints", **options}
        return make_nxd_from_peft(references["gqa"], tmp_path / name, TINY_LLAMA, **options) / LIGHTNING

    def refused(source: Path, match: str) -> None:
        with pytest.raises(Rejection, match=match):
            nxd.read_pairs(source, TINY_LLAMA)

    rank_1 = "tp_rank_01_pp_rank_00/checkpoint.pt"
    source = fresh("first-rank-missing")
    shutil.rmtree(source / "tp_rank_00_pp_rank_00")
    refused(source, r"epoch=0-step=20.ckpt: lacks the tensor-parallel rank file tp_rank_00_pp_rank_00/checkpoint.pt: "
                    "every tp rank holds its own slice")
    source = fresh("first-rank-missing-zero1", xser=True, zero1=True)
    (source / "tp_rank_00_pp_rank_00_dp_rank_00").unlink()
    refused(source, "lacks the tensor-parallel rank file tp_rank_00_pp_rank_00_dp_rank_00: every tp rank")

    for name, options in (("pipeline", {}), ("pipeline-xser", {"xser": True})):
        refused(fresh(name, pp=2, **options), "epoch=0-step=20.ckpt: holds pipeline-parallel ranks 00, 01, but NxD "
                                              "cannot save a LoRA adapter with pp>1")

    source = fresh("foreign-global-in-state-dict")
    _rewrite_lightning(source / rank_1, lambda checkpoint: checkpoint["state_dict"]["lora_config"].update(
        target_modules=_RunsAShell()))
    refused(source, rf"{rank_1}: refused: has state_dict entry 'lora_config' built by (posix|nt)\.system, which a "
                    "state dict of tensors never needs; refused without running it")
    source = fresh("foreign-global-in-state-dict-xser", xser=True)
    _rewrite_lightning(source / "tp_rank_01_pp_rank_00", lambda checkpoint: checkpoint["state_dict"].update(
        {"model.layers.0.mlp.down_proj.lora_A.weight": _RunsAShell()}))
    refused(source, r"tp_rank_01_pp_rank_00: refused: has state_dict entry 'model.layers.0.mlp.down_proj.lora_A."
                    r"weight' built by (posix|nt)\.system")
    assert not (tmp_path / "pwned").exists()

    source = fresh("no-state-dict")
    _rewrite_lightning(source / rank_1, lambda checkpoint: checkpoint.pop("state_dict"))
    refused(source, f"{rank_1}: holds no state_dict entry, so it is not a Lightning checkpoint of a model")

    def base_model_only(checkpoint: dict) -> None:
        checkpoint["state_dict"] = {"model.embed_tokens.weight": torch.zeros(8, 32),
                                    "model.layers.0.mlp.down_proj.weight": torch.zeros(32, 64)}

    source = fresh("no-adapter")
    for rank in (0, 1):
        _rewrite_lightning(source / f"tp_rank_{rank:02d}_pp_rank_00/checkpoint.pt", base_model_only)
    refused(source, "tp_rank_00_pp_rank_00/checkpoint.pt: holds no LoRA tensor: none of its 2 keys "
                    r"\(such as model.embed_tokens.weight\) has lora_ in its name")

    source = fresh("with-base", xser=False)
    _rewrite_lightning(source / rank_1, lambda checkpoint: checkpoint["state_dict"].update(
        {"model.layers.0.mlp.down_proj.base_layer.weight": torch.zeros(32, 64)}))
    refused(source, f"{rank_1}: holds model.layers.0.mlp.down_proj.base_layer.weight, a full copy of a base weight "
                    r"\(save_lora_base=True\)")

    source = fresh("xser-missing-adapter-tensor", xser=True)
    first_adapter_tensor = "tensor_0.pt"  # state_dict comes before the optimizer's moments
    (source / "tp_rank_01_pp_rank_00.tensors" / first_adapter_tensor).unlink()
    refused(source, "tp_rank_01_pp_rank_00.tensors: lacks tensor_0.pt, which holds "
                    "model.layers.0.self_attn.qkv_proj.lora_A.weight")
    source = fresh("xser-foreign-tensor-file", xser=True)
    shutil.copy(source / "tp_rank_01_pp_rank_00.tensors" / "tensor_0.pt",
                source / "tp_rank_01_pp_rank_00.tensors" / "tensor_9999.pt")
    refused(source, "tp_rank_01_pp_rank_00.tensors/tensor_9999.pt: is named by no key of tp_rank_01_pp_rank_00: "
                    "the folder mixes tensors of another save")


def test_lightning_xser_needs_only_the_state_dicts_tensor_files(tmp_path, references):
    """Tensors outside state_dict (optimizer moments, ModelCheckpoint's scores) have files too; losing those does
    not matter, the ids the file names elsewhere only keep the folder check exact."""
    source = make_nxd_from_peft(references["gqa"], tmp_path / "work", TINY_LLAMA, tp=1, lightning=True, xser=True)
    folder = source / "lora_adapter/epoch=0-step=20.ckpt/tp_rank_00_pp_rank_00.tensors"
    with torch_xla_stand_in():
        checkpoint = torch.load(folder.with_suffix(""), weights_only=False)
    adapter_ids = {ref.tid for ref in checkpoint["state_dict"].values() if isinstance(ref, TensorReference)}
    assert len(adapter_ids) == 20 and len(list(folder.iterdir())) > 60
    for path in folder.iterdir():
        if int(path.stem.removeprefix("tensor_")) not in adapter_ids:
            path.unlink()
    out = convert(source, tmp_path / "out", TINY_LLAMA)
    assert_same_delta_weights(out, references["gqa"], 0)
