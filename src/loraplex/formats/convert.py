"""`loraplex convert`: a Hugging Face PEFT adapter from another producer's layout, for runtimes that load only
PEFT (vLLM). The written adapter gives the same ΔW = B·A·scale for every module and layer as the source."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loraplex.api.types import AdapterFormat
from loraplex.formats import detect_format, inspect, nemo_module, nxd, trtllm
from loraplex.formats.peft_writer import LoraPair, write_peft_adapter
from loraplex.formats.report import AdapterReport, Rejection

SOURCE_LAYOUTS = """\
source layouts:
  TensorRT-LLM  model.lora_config.npy (int32 rows of module id, layer, adapter size[, is_dora]) and
                model.lora_weights.npy (each row: the in matrix [size, in], then the out matrix [out, size]
                with alpha/r already multiplied in; float32, float16, or bfloat16 stored as 2-byte V2),
                as TensorRT-LLM's hf_lora_convert.py and LoraManager write them. Needs --base-config: a row
                holds only flattened values, and the base model's sizes say where A ends and B begins.
                Fused attn_qkv rows become q_proj/k_proj/v_proj, fused gate+up rows gate_proj/up_proj,
                sharing their A. DoRA rows (is_dora=1) are refused.
  NeMo 1        one .nemo tar of model_config.yaml (peft.lora_tuning: adapter_dim, alpha, variant) and
                model_weights.ckpt: at the root for TP=1 and PP=1, mp_rank_XX/model_weights.ckpt per
                tensor-parallel rank when PP=1, tp_rank_XX_pp_rank_XXX/model_weights.ckpt per rank when
                PP>1 (layers numbered per pipeline stage). TP shards are put back together as each
                adapter was split; the fused lora_kqv_adapter becomes q_proj/k_proj/v_proj (per query
                group) and lora_hto4h_adapter gate_proj/up_proj (per TP rank), sharing their A; the
                canonical variant's q/k/v and gate/up adapters map one to one. alpha/adapter_dim goes into
                B (no alpha: scale 1, as NeMo before 2.0). Needs --base-config, whose heads, key/value
                heads and head size split QKV and must match model_config.yaml. Read with a restricted
                unpickler; pre-mcore keys (language_model.encoder), MoE and interleaved-pipeline
                checkpoints are refused.
  NeMo 2        a checkpoint folder of weights/ (a torch distributed checkpoint: .metadata and
                __<rank>_<n>.distcp files) and context/model.yaml (config: the model's sizes;
                model_transform: LoRA or CanonicalLoRA with dim, alpha). Only module.*.adapter.* tensors
                are read: each from its chunks, at the offsets .metadata gives (several per tensor when
                trained with tensor parallelism), decoder layers unstacked from the leading axis. LoRA's
                linear_qkv adapter becomes q_proj/k_proj/v_proj (per query group) and linear_fc1's
                gate_proj/up_proj ([gate; up]), sharing their A; linear_proj is o_proj, linear_fc2
                down_proj; CanonicalLoRA's adapter_q/k/v/gate/up map one to one. alpha/dim goes into B.
                Needs --base-config, which must match model.yaml's sizes. .metadata is read with a
                restricted unpickler and each chunk as a plain tensor; context/io.json and
                weights/common.pt are never opened. DoRA, MoE and other adapters are refused.
  NxD           AWS Neuron NeuronX Distributed adapter-only checkpoints: dp_rank_00_tp_rank_XX_pp_rank_00.pt
                per tensor-parallel rank (under <tag>/model/ or <tag>/, with the checkpoint and done
                markers) or a single-device adapter_model.pt, read with a restricted unpickler. A rank
                file is a torch.save'd state dict, or with use_xser=True (NXDT's save_xser) the dict with
                torch_xla TensorReference ids whose tensors sit in <rank file>.tensors/tensor_<id>.pt,
                checked against <rank file>.info.pt when present. Lightning's NeuronCheckpointIO writes
                <name>.ckpt/tp_rank_XX_pp_rank_00/checkpoint.pt, or with its default xser the file
                tp_rank_XX_pp_rank_00 beside its .tensors/ folder (_dp_rank_ZZ added with ZeRO-1; dp rank
                00's is read): the whole Lightning dict, of which only state_dict is used; globals in the
                other entries become inert stand-ins and never run. The LoRA config is inside the files
                (lora_config) or in NxD's adapter_config.json (lora_rank beside r). TP slices are joined,
                replicated K/V kept once, qkv_proj (weight_q/_k/_v or fused weight_qkv) split into
                q_proj/k_proj/v_proj and gate_up_proj into gate_proj/up_proj with their shared A; alpha/r
                (alpha/sqrt(r) with rsLoRA) goes into B. Needs --base-config. Pipeline-parallel (pp>1)
                checkpoints (NxD saves no adapter then) and the gather that drops query rows are refused.
  Hugging Face  adapter_config.json with adapter_model.safetensors/.bin: already what runtimes load;
                nothing to convert.

The output is adapter_config.json + adapter_model.safetensors with lora_alpha = r for every module (the
source's scale is already in B, so PEFT's scale is exactly 1) and the source's dtype kept. The
safetensors metadata records loraplex.converted_from.
"""


class ConversionError(ValueError):
    pass


# Each format loraplex converts: how messages name its producer, its reader, and why that needs the base model's
# config.json.
READERS: dict[AdapterFormat, tuple[str, Callable[[Path, dict[str, Any]], list[LoraPair]], str]] = {
    AdapterFormat.TRTLLM: ("TensorRT-LLM", trtllm.read_pairs, "its rows hold only flattened values"),
    AdapterFormat.NEMO: ("NeMo", lambda source, base: nemo_module(source).read_pairs(source, base),
                         "its heads, key/value heads and head size say how fused QKV splits"),
    AdapterFormat.NXD: ("NxD", nxd.read_pairs, "its heads and key/value heads say how qkv_proj splits"),
}


@dataclasses.dataclass(frozen=True)
class Conversion:
    source_format: AdapterFormat
    report: AdapterReport  # of the written adapter


def convert(source: Path, out: Path, base_config: dict[str, Any] | None = None) -> Conversion:
    """Write `source` as a PEFT adapter into `out` (which must be empty or absent)."""
    fmt = detect_format(source)
    if out.exists() and any(out.iterdir()):
        raise ConversionError(f"{out} is not empty; convert writes into a new folder")
    if fmt == AdapterFormat.HF:
        raise ConversionError(f"{source} already holds a Hugging Face PEFT adapter; nothing to convert")
    if fmt not in READERS:
        raise ConversionError(f"{source} holds a {fmt.value} adapter, which loraplex does not convert")
    producer, read, why = READERS[fmt]
    if base_config is None:
        raise ConversionError(f"converting a {producer} adapter needs --base-config (the base model's config.json): "
                              f"{why}")
    try:
        pairs = read(source, base_config)
    except Rejection:
        raise
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise ConversionError(f"the base model's config.json lacks the sizes needed ({exc})") from None
    write_peft_adapter(pairs, out, base_model=base_config.get("_name_or_path") or None,
                       converted_from=fmt.value)
    return Conversion(source_format=fmt, report=inspect(out, AdapterFormat.HF))
