"""`loraplex convert`: adapters in TensorRT-LLM's layout, built from a PEFT adapter as its converter does,
come back as PEFT adapters with the same ΔW per module and layer, and pass the vLLM rules."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from loraplex.api.types import AdapterFormat, Runtime
from loraplex.cli import main
from loraplex.formats import AdapterPolicy, Rejection, validate
from loraplex.formats.convert import ConversionError, convert
from tests.adapters import LLAMA_LINEAR_MODULES, TINY_LLAMA, make_hf_adapter
from tests.producers import assert_same_delta_weights, make_trtllm_from_peft, peft_delta_weights

# The tolerance of ΔW after storing B·scale and A in each dtype, relative to the largest entry.
TOLERANCE = {"float32": 1e-6, "float16": 2e-3, "bfloat16": 1.6e-2}


@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # alpha/r = 2: multiplying by it is exact in every dtype, so float32 storage must round-trip exactly.
    return make_hf_adapter(tmp_path_factory.mktemp("peft") / "adapter", rank=8,
                           target_modules=LLAMA_LINEAR_MODULES, seed=3)


@pytest.mark.parametrize("storage", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("dora_column", [False, True], ids=["3-columns", "4-columns"])
def test_trtllm_adapters_convert_back_to_the_same_delta_weights(tmp_path, peft_adapter, storage, dora_column):
    source = make_trtllm_from_peft(peft_adapter, tmp_path / "trtllm", storage, dora_column)
    done = convert(source, tmp_path / "out", TINY_LLAMA)
    assert done.source_format == AdapterFormat.TRTLLM
    assert_same_delta_weights(tmp_path / "out", peft_adapter, 0.0 if storage == "float32" else TOLERANCE[storage])
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (8, 8, False)
    assert sorted(config["target_modules"]) == sorted(LLAMA_LINEAR_MODULES)
    report = validate(tmp_path / "out", AdapterPolicy(runtime=Runtime.VLLM, max_rank=16, base_config=TINY_LLAMA))
    assert report.format == AdapterFormat.HF and report.rank == 8


def test_bfloat16_is_kept_bit_for_bit(tmp_path, peft_adapter):
    from safetensors import safe_open

    source = make_trtllm_from_peft(peft_adapter, tmp_path / "trtllm", "bfloat16")
    convert(source, tmp_path / "out", TINY_LLAMA)
    stored = np.load(source / "model.lora_weights.npy")[0].view("<u2")
    with safe_open(tmp_path / "out" / "adapter_model.safetensors", "pt") as file:
        a = file.get_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
    assert a.dtype == torch.bfloat16
    bits = a.view(torch.int16).numpy().view("<u2").ravel()
    rows = [row for row in stored if np.array_equal(row[: bits.size], bits)]
    assert len(rows) == 1  # the very patterns of one stored row's A


def test_fused_rows_are_split_into_the_modules_vllm_loads(tmp_path):
    hidden, heads, kv_heads, inter, rank = 32, 4, 2, 64, 4
    head = hidden // heads
    q, kv = heads * head, kv_heads * head
    rng = np.random.default_rng(0)
    a_qkv, b_qkv = rng.standard_normal((rank, hidden)), rng.standard_normal((q + 2 * kv, rank))
    a_mlp, b_mlp = rng.standard_normal((rank, hidden)), rng.standard_normal((2 * inter, rank))
    rows = [np.concatenate([a_qkv.ravel(), b_qkv.ravel()]), np.concatenate([a_mlp.ravel(), b_mlp.ravel()])]
    width = max(len(row) for row in rows)
    weights = np.stack([np.pad(row, (0, width - len(row))) for row in rows]).astype("<f4")
    source = tmp_path / "trtllm"
    source.mkdir()
    np.save(source / "model.lora_config.npy", np.array([[[0, 0, rank], [18, 0, rank]]], dtype=np.int32))
    np.save(source / "model.lora_weights.npy", weights[None])
    base = {**TINY_LLAMA, "num_hidden_layers": 1}
    convert(source, tmp_path / "out", base)
    deltas = peft_delta_weights(tmp_path / "out")
    expected_qkv = (b_qkv @ a_qkv).astype("<f4").astype(np.float64)
    np.testing.assert_allclose(deltas[(0, "q_proj")].numpy(), expected_qkv[:q], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(deltas[(0, "k_proj")].numpy(), expected_qkv[q:q + kv], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(deltas[(0, "v_proj")].numpy(), expected_qkv[q + kv:], rtol=1e-5, atol=1e-5)
    expected_mlp = b_mlp @ a_mlp  # stored up first, then gate
    np.testing.assert_allclose(deltas[(0, "up_proj")].numpy(), expected_mlp[:inter], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(deltas[(0, "gate_proj")].numpy(), expected_mlp[inter:], rtol=1e-5, atol=1e-5)


def test_refusals_name_the_problem(tmp_path, peft_adapter):
    source = make_trtllm_from_peft(peft_adapter, tmp_path / "trtllm")
    with pytest.raises(ConversionError, match="needs --base-config"):
        convert(source, tmp_path / "a", None)
    with pytest.raises(Rejection, match="converted for another base model"):
        convert(source, tmp_path / "b", {**TINY_LLAMA, "hidden_size": 256, "intermediate_size": 512})
    with pytest.raises(ConversionError, match="already holds a Hugging Face PEFT adapter"):
        convert(peft_adapter, tmp_path / "c", TINY_LLAMA)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(ConversionError, match="is not empty"):
        convert(source, tmp_path / "full", TINY_LLAMA)
    weights = np.load(source / "model.lora_weights.npy")
    config = np.load(source / "model.lora_config.npy")
    query = int(np.flatnonzero(config[0, :, 0] == 1)[0])
    weights[0, query, -1] = 1.0  # a q_proj row longer than this base model's q_proj packs to, in the padding
    np.save(source / "model.lora_weights.npy", weights)
    with pytest.raises(Rejection, match="holds more than the"):
        convert(source, tmp_path / "f", TINY_LLAMA)
    np.save(source / "model.lora_config.npy", np.concatenate([config, np.ones((*config.shape[:2], 1), np.int32)], 2))
    with pytest.raises(Rejection, match="is a DoRA module"):
        convert(source, tmp_path / "d", TINY_LLAMA)
    config[0, 0, 0] = 13
    np.save(source / "model.lora_config.npy", config)
    with pytest.raises(Rejection, match="module id 13 is not a TensorRT-LLM LoRA module"):
        convert(source, tmp_path / "e", TINY_LLAMA)


def test_the_cli_converts_and_documents_each_layout(tmp_path, peft_adapter, capsys):
    source = make_trtllm_from_peft(peft_adapter, tmp_path / "trtllm", "float16")
    base = tmp_path / "config.json"
    base.write_text(json.dumps(TINY_LLAMA))
    assert main(["convert", str(source), str(tmp_path / "out"), "--base-config", str(base)]) == 0
    assert "converted trtllm to a Hugging Face PEFT adapter" in capsys.readouterr().out
    assert main(["convert", str(source), str(tmp_path / "again")]) == 2
    assert "needs --base-config" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    help_text = capsys.readouterr().out
    assert "TensorRT-LLM" in help_text and "model.lora_weights.npy" in help_text and "V2" in help_text
