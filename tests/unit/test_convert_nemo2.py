"""`loraplex convert` and validation of NeMo 2.0 LoRA checkpoints (weights/ as a torch distributed checkpoint,
context/model.yaml), fused LoRA and CanonicalLoRA, tensor-parallel chunks, built from a known PEFT adapter as
NeMo and Megatron save it; and the refusals, each with its sentence."""

from __future__ import annotations

import json
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from loraplex.api.runtime_capabilities import capabilities
from loraplex.api.types import AdapterFormat, Runtime
from loraplex.cli import main
from loraplex.formats import AdapterPolicy, Rejection, detect_format, inspect, validate
from loraplex.formats.convert import convert
from loraplex.formats.for_runtime import validate_or_convert
from loraplex.formats.safe_pickle.dcp import read_dcp_metadata
from tests.adapters import LLAMA_LINEAR_MODULES, TINY_LLAMA, make_hf_adapter
from tests.producers import assert_same_delta_weights, share_fused_lora_a
from tests.producers_nemo2 import make_nemo2_from_peft

# Four layers stacked; 4 query heads in 2 groups, so QKV interleaves.
BASE = {**TINY_LLAMA, "num_hidden_layers": 4}
FUSED = ("attention_dense", "attention_qkv", "mlp_fc1", "mlp_fc2")
CANONICAL = ("attention_dense", "gate_proj", "k_proj", "mlp_fc2", "q_proj", "up_proj", "v_proj")
QKV_OUT = "module.decoder.layers.self_attention.linear_qkv.adapter.linear_out.weight"
# torch says so whenever the tests load or save a checkpoint in this one process, which is the intent.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # lora_alpha/r = 2, exact in every dtype; q/k/v and gate/up share lora_A, as a fused NeMo adapter does.
    adapter = make_hf_adapter(tmp_path_factory.mktemp("peft") / "adapter", rank=8, target_modules=LLAMA_LINEAR_MODULES,
                              base_config=BASE, seed=7)
    return share_fused_lora_a(adapter)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, peft_adapter: Path) -> Path:
    """A fused TP=2 float32 checkpoint, copied by each test that changes it."""
    return make_nemo2_from_peft(peft_adapter, tmp_path_factory.mktemp("nemo2") / "ckpt", BASE, tp=2)


def copy(checkpoint: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(checkpoint, tmp_path / "ckpt"))


def rejection(directory: Path, base: dict | None = BASE) -> str:
    with pytest.raises(Rejection) as excinfo:
        convert(directory, directory.parent / f"{directory.name}-out", base)
    return str(excinfo.value)


def resave(directory: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """Load weights/ whole with torch's own reader, let `change` edit the tensors, and save them again."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

    weights = directory / "weights"
    metadata = FileSystemReader(weights).read_metadata()
    state = {key: torch.empty(entry.size, dtype=entry.properties.dtype)
             for key, entry in metadata.state_dict_metadata.items()}
    dcp.load(state, storage_reader=FileSystemReader(weights), no_dist=True)
    change(state)
    for path in [weights / ".metadata", *weights.glob("*.distcp")]:
        path.unlink()
    dcp.save(state, storage_writer=FileSystemWriter(weights), no_dist=True)
    return directory


def edit_model_yaml(directory: Path, change: Callable[[dict], None]) -> Path:
    path = directory / "context" / "model.yaml"
    config = yaml.safe_load(path.read_text())
    change(config)
    path.write_text(yaml.safe_dump(config))
    return directory


# ---- every variant converts back to the same ΔW ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("canonical", [False, True], ids=["lora", "canonical"])
def test_every_variant_converts_back_to_the_same_delta_weights(tmp_path, peft_adapter, canonical, tp, dtype):
    source = make_nemo2_from_peft(peft_adapter, tmp_path / "nemo2", BASE, tp=tp, canonical=canonical, dtype=dtype)
    assert sorted(path.name for path in (source / "weights").glob("*.distcp")) == [f"__{t}_0.distcp" for t in range(tp)]
    assert detect_format(source) == AdapterFormat.NEMO
    done = convert(source, tmp_path / "out", BASE)
    assert done.source_format == AdapterFormat.NEMO
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (8, 8)  # NeMo's alpha/dim = 2 is now in B
    assert sorted(config["target_modules"]) == sorted(LLAMA_LINEAR_MODULES)
    if dtype == torch.float32:
        assert_same_delta_weights(tmp_path / "out", peft_adapter, 1e-12)
    else:  # the source holds bf16(A), bf16(B): A is kept bit for bit, B times 2, which is exact in bf16
        with safe_open(tmp_path / "out" / "adapter_model.safetensors", "pt") as got, \
                safe_open(peft_adapter / "adapter_model.safetensors", "pt") as want:
            assert sorted(got.keys()) == sorted(want.keys())
            for key in want.keys():
                expected = want.get_tensor(key).to(torch.bfloat16) * (2 if ".lora_B." in key else 1)
                assert got.get_tensor(key).dtype == torch.bfloat16
                assert torch.equal(got.get_tensor(key), expected), key
    report = validate(tmp_path / "out", AdapterPolicy(runtime=Runtime.VLLM, max_rank=16, base_config=BASE))
    assert report.format == AdapterFormat.HF and report.rank == 8


def test_tensor_parallel_checkpoints_store_several_chunks_per_tensor(checkpoint):
    tensors = read_dcp_metadata((checkpoint / "weights" / ".metadata").read_bytes())
    adapters = {key: tensor for key, tensor in tensors.items() if ".adapter." in key}
    assert len(adapters) == 8
    # Per layer: one chunk per TP rank, and linear_fc1's linear_out two (gate and up halves) per rank.
    assert {key: len(tensor.chunks) for key, tensor in adapters.items()}[QKV_OUT] == 4 * 2
    assert len(adapters["module.decoder.layers.mlp.linear_fc1.adapter.linear_out.weight"].chunks) == 4 * 4
    assert {chunk.file for chunk in adapters[QKV_OUT].chunks} == {"__0_0.distcp", "__1_0.distcp"}


@pytest.mark.parametrize("canonical", [False, True], ids=["lora", "canonical"])
def test_inspect_reports_rank_modules_and_every_layer(tmp_path, peft_adapter, canonical):
    source = make_nemo2_from_peft(peft_adapter, tmp_path / "nemo2", BASE, tp=2, canonical=canonical)
    report = inspect(source)
    assert (report.format, report.rank, report.files) == (AdapterFormat.NEMO, 8, ("context/model.yaml",
                                                                                  "weights/.metadata"))
    assert report.target_modules == (CANONICAL if canonical else FUSED)
    assert sorted({w.layer for w in report.weights}) == [0, 1, 2, 3]
    shapes = {(w.module, w.rank, w.in_features, w.out_features) for w in report.weights}
    fused = {("attention_qkv", 8, 32, 64), ("mlp_fc1", 8, 32, 128)}
    unfused = {("q_proj", 8, 32, 32), ("k_proj", 8, 32, 16), ("v_proj", 8, 32, 16), ("gate_proj", 8, 32, 64),
               ("up_proj", 8, 32, 64)}
    assert shapes == {("attention_dense", 8, 32, 32), ("mlp_fc2", 8, 64, 32)} | (unfused if canonical else fused)


def test_megatron_metadata_classes_are_read(tmp_path, peft_adapter):
    source = make_nemo2_from_peft(peft_adapter, tmp_path / "nemo2", BASE, tp=2, megatron_metadata=True)
    assert b"MCoreMetadata" in (source / "weights" / ".metadata").read_bytes()
    convert(source, tmp_path / "out", BASE)
    assert_same_delta_weights(tmp_path / "out", peft_adapter, 1e-12)


def test_per_layer_keys_and_extra_state_convert_like_stacked_ones(tmp_path, checkpoint, peft_adapter):
    def unstack(state: dict[str, torch.Tensor]) -> None:
        for key in [key for key in state if ".adapter." in key]:
            for layer, matrix in enumerate(state.pop(key)):
                state[key.replace("layers.", f"layers.{layer}.")] = matrix.clone()
        # TransformerEngine's extra state sits beside the adapter's weights and is no part of it.
        state["module.decoder.layers.0.self_attention.linear_qkv.adapter.linear_in._extra_state/shard_0_1"] = \
            torch.zeros(3)

    source = resave(copy(checkpoint, tmp_path), unstack)
    assert "module.decoder.layers.3.mlp.linear_fc2.adapter.linear_in.weight" in read_dcp_metadata(
        (source / "weights" / ".metadata").read_bytes())
    convert(source, tmp_path / "out", BASE)
    assert_same_delta_weights(tmp_path / "out", peft_adapter, 1e-12)


def test_neither_io_json_nor_common_pt_is_loaded(tmp_path, checkpoint, peft_adapter):
    source = copy(checkpoint, tmp_path)
    (source / "context" / "io.json").write_text("not even json")

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('common.pt was loaded')",))

    (source / "weights" / "common.pt").write_bytes(pickle.dumps(Boom()))
    convert(source, tmp_path / "out", BASE)
    assert_same_delta_weights(tmp_path / "out", peft_adapter, 1e-12)


def test_dropout_after_the_adapter_changes_nothing_at_inference(tmp_path, checkpoint, peft_adapter):
    source = edit_model_yaml(copy(checkpoint, tmp_path), lambda c: c["model_transform"].update(
        dropout=0.1, dropout_position="post"))
    convert(source, tmp_path / "out", BASE)
    assert_same_delta_weights(tmp_path / "out", peft_adapter, 1e-12)


# ---- refusals -----------------------------------------------------------------------------------------------

def test_a_malicious_metadata_is_refused_without_running(tmp_path, checkpoint):
    source = copy(checkpoint, tmp_path)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    (source / "weights" / ".metadata").write_bytes(pickle.dumps(Payload()))
    assert rejection(source) == ("weights/.metadata: refers to posix.system, which the metadata of a torch "
                                 "distributed checkpoint never needs; refused without running it")
    with pytest.raises(Rejection, match=r"refers to posix\.system"):
        inspect(source)
    assert not marker.exists()


def test_a_missing_metadata_or_chunk_file_is_named(tmp_path, checkpoint):
    source = copy(checkpoint, tmp_path)
    (source / "weights" / "__1_0.distcp").unlink()
    with pytest.raises(Rejection) as excinfo:
        inspect(source)
    assert str(excinfo.value).startswith("weights/.metadata: places a chunk of module.decoder.layers.")
    assert str(excinfo.value).endswith("in __1_0.distcp, which weights/ lacks")
    (source / "weights" / ".metadata").unlink()
    assert rejection(source).startswith("weights/.metadata: is missing; a NeMo 2 checkpoint's weights/ is a torch "
                                        "distributed checkpoint")


def test_a_truncated_chunk_file_is_named(tmp_path, checkpoint):
    source = copy(checkpoint, tmp_path)
    path = source / "weights" / "__0_0.distcp"
    path.write_bytes(path.read_bytes()[:1000])
    assert "weights/__0_0.distcp: is 1000 bytes, too short for the chunk of" in rejection(source)


def test_a_base_model_checkpoint_is_not_an_adapter(tmp_path, checkpoint):
    def base_weights_only(state: dict[str, torch.Tensor]) -> None:
        state.clear()
        state["module.decoder.layers.self_attention.linear_qkv.weight"] = torch.zeros(4, 64, 32)
        state["module.decoder.layers.self_attention.linear_qkv._extra_state"] = torch.zeros(1)

    source = resave(copy(checkpoint, tmp_path), base_weights_only)
    assert rejection(source) == ("weights/.metadata: holds no LoRA adapter weights "
                                 "(module.….adapter.linear_in/linear_out.weight): not a NeMo 2 LoRA checkpoint")


def test_another_base_model_is_refused(tmp_path, checkpoint):
    source = copy(checkpoint, tmp_path)
    assert rejection(source, {**BASE, "num_key_value_heads": 4}) == (
        "context/model.yaml: says num_query_groups=2 but the base model's config.json has num_key_value_heads=4; "
        "the adapter was trained for another base model")
    # Without the sizes in model.yaml, the tensors' shapes still tell.
    edit_model_yaml(source, lambda c: [c["config"].pop(k) for k in ("num_query_groups", "num_attention_heads")])
    assert rejection(source, {**BASE, "num_key_value_heads": 4}) == (
        "weights/.metadata: layer 0 attention_qkv maps 32→64 but the base model's config.json gives 32→96; the "
        "adapter was trained for another base model")


@pytest.mark.parametrize(("change", "complaint"), [
    (lambda c: c["model_transform"].update(dim=16),
     "weights/.metadata: mlp_fc1 (stacked over layers) has rank 8/8 but context/model.yaml says "
     "model_transform.dim=16"),
    (lambda c: c["config"].update(num_layers=3),
     "weights/.metadata: mlp_fc1 stacks 4 layers but context/model.yaml says num_layers=3"),
    (lambda c: c["model_transform"].update(_target_="nemo.collections.llm.peft.dora.DoRA"),
     "context/model.yaml: model_transform is DoRA, whose weight magnitudes loraplex does not convert"),
    (lambda c: c["model_transform"].update(_target_="nemo.collections.llm.peft.canonical_lora.CanonicalLoRA"),
     "weights/.metadata: holds module.decoder.layers.mlp.linear_fc1.adapter.linear_in.weight, which CanonicalLoRA "
     "(the model_transform in context/model.yaml) does not write"),
    (lambda c: c.pop("model_transform"),
     "context/model.yaml: has no model_transform: the checkpoint is not a PEFT adapter"),
    (lambda c: c["config"].update(gated_linear_unit=False),
     "context/model.yaml: says gated_linear_unit: false, so linear_fc1 is not Llama's gate and up projections"),
], ids=["dim", "num_layers", "dora", "canonical-keys", "no-transform", "not-gated"])
def test_configs_loraplex_cannot_read(tmp_path, checkpoint, change, complaint):
    source = edit_model_yaml(copy(checkpoint, tmp_path), change)
    with pytest.raises(Rejection) as excinfo:
        inspect(source)
    assert str(excinfo.value) == complaint


def test_adapters_loraplex_cannot_convert(tmp_path, checkpoint):
    moe = "module.decoder.layers.mlp.experts.linear_fc1.adapter.linear_in.weight"
    source = resave(copy(checkpoint, tmp_path), lambda state: state.update({moe: torch.zeros(4, 8, 32)}))
    assert rejection(source) == (f"weights/.metadata: holds {moe}, which is not a NeMo 2 LoRA adapter loraplex "
                                 "reads (mixture-of-experts or other adapters)")


# ---- where NeMo 2 checkpoints go -------------------------------------------------------------------------------

@pytest.mark.parametrize("version", [None, (1, 3, 3), (2, 0, 5)], ids=["nim-unknown", "nim-1.x", "nim-2.x"])
def test_every_runtime_gets_nemo2_converted_even_nim_1x(tmp_path, checkpoint, peft_adapter, version):
    assert capabilities(Runtime.NIM, version).conversion(AdapterFormat.NEMO, nemo2=True) == AdapterFormat.HF
    staging = copy(checkpoint, tmp_path)
    report, converted_from = validate_or_convert(staging, AdapterPolicy(runtime=Runtime.NIM, runtime_version=version,
                                                                        base_config=BASE))
    assert (report.format, converted_from) == (AdapterFormat.HF, AdapterFormat.NEMO)
    assert sorted(path.name for path in staging.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert_same_delta_weights(staging, peft_adapter, 1e-12)


def test_nim_1x_still_loads_a_nemo_archive_as_it_is():
    caps = capabilities(Runtime.NIM, (1, 3, 3))
    assert caps.conversion(AdapterFormat.NEMO) is None
    assert capabilities(Runtime.VLLM).conversion(AdapterFormat.NEMO) == AdapterFormat.HF


def test_the_cli_converts_and_validates_nemo2_without_touching_the_source(tmp_path, checkpoint, capsys):
    base = tmp_path / "config.json"
    base.write_text(json.dumps(BASE))
    before = sorted(path.relative_to(checkpoint) for path in checkpoint.rglob("*"))
    assert main(["validate", str(checkpoint), "--runtime", "nim", "--base-config", str(base), "--json"]) == 0
    verdict = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (verdict["accepted"], verdict["format"], verdict["convertedFrom"]) == (True, "hf", "nemo")
    assert sorted(path.relative_to(checkpoint) for path in checkpoint.rglob("*")) == before
    assert main(["convert", str(checkpoint), str(tmp_path / "out"), "--base-config", str(base)]) == 0
    assert "converted nemo to a Hugging Face PEFT adapter" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "NeMo 2 a checkpoint folder of weights/" in help_text and "context/model.yaml" in help_text
