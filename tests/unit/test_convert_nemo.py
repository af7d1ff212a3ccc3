"""`loraplex convert` and validation of NeMo 1 `.nemo` LoRA adapters in every layout NeMo writes (root, TP
shards, TP and PP shards; fused and canonical), built from a known PEFT adapter as NeMo would save it."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from loraplex.api.types import AdapterFormat, Runtime
from loraplex.cli import main
from loraplex.formats import AdapterPolicy, Rejection, inspect, validate
from loraplex.formats.convert import ConversionError, convert
from tests.adapters import LLAMA_LINEAR_MODULES, TINY_LLAMA, make_hf_adapter, make_nemo_adapter, nemo_state_dict
from tests.producers import assert_same_delta_weights, make_nemo_from_peft, share_fused_lora_a

# Four layers, so two pipeline stages hold two layers each; 4 query heads in 2 groups, so QKV interleaves.
BASE = {**TINY_LLAMA, "num_hidden_layers": 4}
FUSED = ("attention_dense", "attention_qkv", "mlp_fc1", "mlp_fc2")
CANONICAL = ("attention_dense", "gate_proj", "k_proj", "mlp_fc2", "q_proj", "up_proj", "v_proj")
VARIANTS = {
    "tp1": ({}, ["model_weights.ckpt"]),
    "tp2": ({"tp": 2}, ["mp_rank_00/model_weights.ckpt", "mp_rank_01/model_weights.ckpt"]),
    "tp1-pp2": ({"pp": 2}, ["tp_rank_00_pp_rank_000/model_weights.ckpt", "tp_rank_00_pp_rank_001/model_weights.ckpt"]),
    "tp2-pp2": ({"tp": 2, "pp": 2}, [f"tp_rank_0{t}_pp_rank_00{p}/model_weights.ckpt" for t in (0, 1) for p in (0, 1)]),
    "canonical": ({"variant": "canonical"}, ["model_weights.ckpt"]),
    "canonical-tp2-pp2": ({"variant": "canonical", "tp": 2, "pp": 2},
                          [f"tp_rank_0{t}_pp_rank_00{p}/model_weights.ckpt" for t in (0, 1) for p in (0, 1)]),
}


@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # lora_alpha/r = 2, exact in every dtype; q/k/v and gate/up share lora_A, as a fused NeMo adapter does.
    adapter = make_hf_adapter(tmp_path_factory.mktemp("peft") / "adapter", rank=8, target_modules=LLAMA_LINEAR_MODULES,
                              base_config=BASE, seed=5)
    return share_fused_lora_a(adapter)


def members(directory: Path) -> dict[str, bytes]:
    with tarfile.open(directory / "adapter.nemo") as archive:
        return {m.name.removeprefix("./"): archive.extractfile(m).read() for m in archive if m.isfile()}  # type: ignore[union-attr]


def rewrite(directory: Path, edit: Callable[[dict[str, bytes]], None]) -> Path:
    """Rebuild the .nemo after `edit` changes its files (name -> bytes) in place."""
    files = members(directory)
    edit(files)
    with tarfile.open(directory / "adapter.nemo", "w:") as archive:
        for name, payload in files.items():
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    return directory


def edit_weights(files: dict[str, bytes], name: str, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    state = torch.load(io.BytesIO(files[name]), weights_only=True)
    change(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    files[name] = buffer.getvalue()


def edit_config(files: dict[str, bytes], change: Callable[[dict], None]) -> None:
    config = yaml.safe_load(files["model_config.yaml"])
    change(config)
    files["model_config.yaml"] = yaml.safe_dump(config).encode()


def rejection(directory: Path, base: dict | None = BASE) -> str:
    with pytest.raises(Rejection) as excinfo:
        convert(directory, directory.parent / f"{directory.name}-out", base)
    return str(excinfo.value)


# ---- every layout converts back to the same ΔW ------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_every_nemo_layout_converts_back_to_the_same_delta_weights(tmp_path, peft_adapter, variant):
    options, files = VARIANTS[variant]
    source = make_nemo_from_peft(peft_adapter, tmp_path / "nemo", BASE, **options)
    assert sorted(name for name in members(source) if name.endswith(".ckpt")) == sorted(files)
    done = convert(source, tmp_path / "out", BASE)
    assert done.source_format == AdapterFormat.NEMO
    assert_same_delta_weights(tmp_path / "out", peft_adapter, 1e-12)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (8, 8)  # NeMo's alpha/adapter_dim = 2 is now in B
    assert sorted(config["target_modules"]) == sorted(LLAMA_LINEAR_MODULES)
    report = validate(tmp_path / "out", AdapterPolicy(runtime=Runtime.VLLM, max_rank=16, base_config=BASE))
    assert report.format == AdapterFormat.HF and report.rank == 8


@pytest.mark.parametrize("variant", VARIANTS)
def test_validation_reports_whole_adapters_with_global_layers(tmp_path, peft_adapter, variant):
    options, _ = VARIANTS[variant]
    source = make_nemo_from_peft(peft_adapter, tmp_path / "nemo", BASE, **options)
    report = validate(source, AdapterPolicy(runtime=None, max_rank=8, base_config=BASE))
    canonical = options.get("variant") == "canonical"
    assert (report.format, report.rank) == (AdapterFormat.NEMO, 8)
    assert report.target_modules == (CANONICAL if canonical else FUSED)
    assert sorted({w.layer for w in report.weights}) == [0, 1, 2, 3]
    assert all(w.rank == 8 for w in report.weights)
    shapes = {(w.module, w.in_features, w.out_features) for w in report.weights}
    fused = {("attention_qkv", 32, 64), ("mlp_fc1", 32, 128)}
    unfused = {("q_proj", 32, 32), ("k_proj", 32, 16), ("v_proj", 32, 16), ("gate_proj", 32, 64), ("up_proj", 32, 64)}
    assert shapes == {("attention_dense", 32, 32), ("mlp_fc2", 64, 32)} | (unfused if canonical else fused)
    if not canonical:
        validate(source, AdapterPolicy(runtime=Runtime.NIM, base_config=BASE))


def test_a_config_without_alpha_means_scale_one(tmp_path, peft_adapter):
    original = Path(shutil.copytree(peft_adapter, tmp_path / "alpha-is-r"))
    config = json.loads((original / "adapter_config.json").read_text())
    (original / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": config["r"]}))
    source = make_nemo_from_peft(original, tmp_path / "nemo", BASE, tp=2, alpha=False)
    assert "alpha" not in yaml.safe_load(members(source)["model_config.yaml"])["peft"]["lora_tuning"]
    convert(source, tmp_path / "out", BASE)
    assert_same_delta_weights(tmp_path / "out", original, 1e-12)
    # The same factors under alpha=16 would be twice as large: the scale really comes from the config.
    assert_same_delta_weights(convert_with(tmp_path, source, lambda c: c["peft"]["lora_tuning"].update(alpha=16)),
                      peft_adapter, 1e-12)


def convert_with(tmp_path: Path, source: Path, change: Callable[[dict], None]) -> Path:
    edited = Path(shutil.copytree(source, tmp_path / "edited"))
    rewrite(edited, lambda files: edit_config(files, change))
    convert(edited, tmp_path / "edited-out", BASE)
    return tmp_path / "edited-out"


def test_bfloat16_shards_stay_bfloat16(tmp_path, peft_adapter):
    from safetensors import safe_open

    source = make_nemo_from_peft(peft_adapter, tmp_path / "nemo", BASE, tp=2, pp=2, dtype="bfloat16")
    convert(source, tmp_path / "out", BASE)
    assert_same_delta_weights(tmp_path / "out", peft_adapter, 1.6e-2)
    with safe_open(tmp_path / "out" / "adapter_model.safetensors", "pt") as file:
        key = "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"
        converted = file.get_tensor(key)
    with safe_open(peft_adapter / "adapter_model.safetensors", "pt") as file:
        original = file.get_tensor(key)
    assert converted.dtype == torch.bfloat16
    assert torch.equal(converted, original.to(torch.bfloat16))  # A is the stored bf16 values, put back together


def test_the_fused_qkv_rows_split_per_query_group(tmp_path):
    # One layer, rank 1, B rows numbered: per group g the rows are q heads 2g and 2g+1, then k_g, then v_g.
    hidden, d = 32, 8
    rows = torch.arange(64, dtype=torch.float32)[:, None]
    state = {"model.decoder.layers.0.self_attention.adapter_layer.lora_kqv_adapter.linear_in.weight":
             torch.ones(1, hidden),
             "model.decoder.layers.0.self_attention.adapter_layer.lora_kqv_adapter.linear_out.weight": rows}
    config = {"peft": {"peft_scheme": "lora", "lora_tuning": {"adapter_dim": 1, "target_modules": ["attention_qkv"]}}}
    source = make_nemo_adapter(tmp_path / "nemo", state_dict=state, config=config)
    convert(source, tmp_path / "out", {**BASE, "num_hidden_layers": 1})
    from safetensors import safe_open

    with safe_open(tmp_path / "out" / "adapter_model.safetensors", "pt") as file:
        b = {m: file.get_tensor(f"base_model.model.model.layers.0.self_attn.{m}.lora_B.weight").ravel().tolist()
             for m in ("q_proj", "k_proj", "v_proj")}
    blocks = [list(range(start, start + d)) for start in range(0, 64, d)]  # 8 head-sized blocks
    assert b["q_proj"] == blocks[0] + blocks[1] + blocks[4] + blocks[5]
    assert b["k_proj"] == blocks[2] + blocks[6]
    assert b["v_proj"] == blocks[3] + blocks[7]


# ---- refusals -----------------------------------------------------------------------------------------------

def test_a_missing_shard_is_named(tmp_path, peft_adapter):
    source = make_nemo_from_peft(peft_adapter, tmp_path / "nemo", BASE, tp=2, pp=2)
    rewrite(source, lambda files: files.pop("tp_rank_01_pp_rank_001/model_weights.ckpt"))
    expected = ("adapter.nemo: lacks tp_rank_01_pp_rank_001/model_weights.ckpt, which NeMo writes for "
                "tensor_model_parallel_size=2, pipeline_model_parallel_size=2 in model_config.yaml")
    assert rejection(source).startswith(expected)
    with pytest.raises(Rejection, match="lacks tp_rank_01_pp_rank_001"):
        inspect(source)


def test_shards_whose_shapes_do_not_fit_together(tmp_path, peft_adapter):
    source = make_nemo_from_peft(peft_adapter, tmp_path / "nemo", BASE, tp=2)
    key = "model.decoder.layers.1.mlp.adapter_layer.lora_4htoh_adapter.linear_in.weight"
    rewrite(source, lambda files: edit_weights(files, "mp_rank_01/model_weights.ckpt",
                                               lambda state: state.update({key: torch.zeros(4, 32)})))
    assert "layer 1 mlp_fc2 linear_in shards have shapes [8, 32], [4, 32], which do not fit together" \
        in rejection(source)


def test_a_key_only_one_rank_holds(tmp_path, peft_adapter):
    source = make_nemo_from_peft(peft_adapter, tmp_path / "nemo", BASE, tp=2)
    key = "model.decoder.layers.0.self_attention.adapter_layer.lora_kqv_adapter.linear_out.weight"
    rewrite(source, lambda files: edit_weights(files, "mp_rank_01/model_weights.ckpt", lambda s: s.pop(key)))
    assert rejection(source) == f"adapter.nemo/mp_rank_01/model_weights.ckpt: lacks {key}, which " \
                                "mp_rank_00/model_weights.ckpt holds"


def test_another_base_model_is_refused(tmp_path, peft_adapter):
    source = make_nemo_from_peft(peft_adapter, tmp_path / "nemo", BASE)
    assert rejection(source, {**BASE, "num_key_value_heads": 4}) == (
        "adapter.nemo/model_config.yaml: says num_query_groups=2 but the base model's config.json has "
        "num_key_value_heads=4; the adapter was trained for another base model")
    # Without the model's sizes in model_config.yaml, the tensors' shapes still tell.
    rewrite(source, lambda files: edit_config(files, lambda c: [c.pop(k) for k in
                                                                ("num_query_groups", "num_attention_heads")]))
    assert rejection(source, {**BASE, "num_key_value_heads": 4}) == (
        "adapter.nemo/model_weights.ckpt: layer 0 attention_qkv maps 32→64 but the base model's config.json "
        "gives 32→96; the adapter was trained for another base model")
    with pytest.raises(ConversionError, match="needs --base-config"):
        convert(source, tmp_path / "no-base", None)
    with pytest.raises(Rejection, match="lacks the sizes needed to split"):
        convert(source, tmp_path / "bad-base", {"hidden_size": 32})


@pytest.mark.parametrize(("change", "complaint"), [
    (lambda c: c["peft"]["lora_tuning"].update(variant="dora"),
     "model_config.yaml: peft.lora_tuning.variant 'dora' is neither nemo nor canonical"),
    (lambda c: c.update(virtual_pipeline_model_parallel_size=2),
     "model_config.yaml: virtual_pipeline_model_parallel_size is set"),
    (lambda c: c.update(num_layers=3),
     "model_config.yaml: num_layers=3 does not split evenly into pipeline_model_parallel_size=2 stages"),
    (lambda c: c.update(pipeline_model_parallel_size=1),
     "adapter.nemo: lacks mp_rank_00/model_weights.ckpt, which NeMo writes for tensor_model_parallel_size=2, "
     "pipeline_model_parallel_size=1"),
])
def test_configs_loraplex_cannot_read(tmp_path, peft_adapter, change, complaint):
    source = make_nemo_from_peft(peft_adapter, tmp_path / "nemo", BASE, tp=2, pp=2)
    rewrite(source, lambda files: edit_config(files, change))
    with pytest.raises(Rejection) as excinfo:
        inspect(source)
    assert complaint in str(excinfo.value)


def test_adapters_loraplex_cannot_convert(tmp_path, peft_adapter):
    moe = tmp_path / "moe"
    shutil.copytree(make_nemo_from_peft(peft_adapter, tmp_path / "nemo", BASE), moe)
    key = "model.decoder.layers.0.mlp.experts.adapter_layer.lora_moe_hto4h_adapter.linear_in.weight"
    rewrite(moe, lambda files: edit_weights(files, "model_weights.ckpt", lambda s: s.update({key: torch.zeros(8, 32)})))
    assert f"holds {key}, which is not a NeMo LoRA adapter loraplex reads" in rejection(moe)
    stage = tmp_path / "stage"
    shutil.copytree(make_nemo_from_peft(peft_adapter, tmp_path / "pp", BASE, pp=2), stage)
    moved = "model.decoder.layers.{}.mlp.adapter_layer.lora_4htoh_adapter.linear_{}.weight"
    rewrite(stage, lambda files: edit_weights(files, "tp_rank_00_pp_rank_001/model_weights.ckpt", lambda s: s.update(
        {moved.format(2, side): s.pop(moved.format(1, side)) for side in ("in", "out")})))
    assert "holds layer 2, but a stage of 2 layers numbers them 0 to 1" in rejection(stage)
    # Pre-mcore keys validate (TensorRT-LLM reads them) but use another QKV layout.
    legacy = make_nemo_adapter(tmp_path / "legacy", rank=8, state_dict=nemo_state_dict(8))
    assert inspect(legacy).target_modules == ("attention_qkv",)
    assert "holds pre-mcore keys (model.language_model.encoder.layers)" in rejection(legacy, TINY_LLAMA)


def test_the_cli_converts_nemo_and_documents_its_layouts(tmp_path, peft_adapter, capsys):
    source = make_nemo_from_peft(peft_adapter, tmp_path / "nemo", BASE, tp=2)
    base = tmp_path / "config.json"
    base.write_text(json.dumps(BASE))
    assert main(["convert", str(source), str(tmp_path / "out"), "--base-config", str(base)]) == 0
    assert "converted nemo to a Hugging Face PEFT adapter" in capsys.readouterr().out
    assert main(["convert", str(source), str(tmp_path / "again")]) == 2
    assert "needs --base-config" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "NeMo 1" in help_text and "mp_rank_XX/model_weights.ckpt" in help_text
    assert "tp_rank_XX_pp_rank_XXX" in help_text
