"""TensorRT-LLM LoRA adapters, as its hf_lora_convert.py and LoraManager write them (docs/formats/trtllm-and-nim.md):

- model.lora_config.npy: int32 rows of (module id, layer, adapter size), or with a fourth column is_dora;
- model.lora_weights.npy: one row per config row, the flattened in matrix [size, in] then the out matrix
  [out, size] with the scale already multiplied in, zero-padded to the widest row. float32, float16, or
  bfloat16 saved as raw 2-byte patterns (numpy dtype V2).

Both are read without pickle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from loraplex.api.types import AdapterFormat
from loraplex.formats.peft_writer import LoraPair
from loraplex.formats.report import AdapterReport, LoraWeights, Rejection

CONFIG = "model.lora_config.npy"
WEIGHTS = "model.lora_weights.npy"
# TensorRT-LLM's LoraModule ids for the modules of a decoder-only model, and the Hugging Face Llama modules
# each one is. Its converter maps gate_proj to mlp_h_to_4h and up_proj to mlp_gate (its docs table says the
# reverse; the code is what wrote the file). A fused gate+up has its halves stored up first.
MODULE_IDS = {
    0: "attn_qkv", 1: "attn_q", 2: "attn_k", 3: "attn_v", 4: "attn_dense",
    5: "mlp_h_to_4h", 6: "mlp_4h_to_h", 7: "mlp_gate", 18: "mlp_gate_up",
}
HF_MODULES = {
    "attn_qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "attn_q": ("self_attn.q_proj",),
    "attn_k": ("self_attn.k_proj",), "attn_v": ("self_attn.v_proj",), "attn_dense": ("self_attn.o_proj",),
    "mlp_h_to_4h": ("mlp.gate_proj",), "mlp_4h_to_h": ("mlp.down_proj",), "mlp_gate": ("mlp.up_proj",),
    "mlp_gate_up": ("mlp.up_proj", "mlp.gate_proj"),
}


def is_trtllm(directory: Path) -> bool:
    return (directory / CONFIG).is_file()


def _load(path: Path) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise Rejection(path.name, f"is not a plain numeric .npy array ({exc})") from None
    except OSError as exc:
        raise Rejection(path.name, f"could not be read ({exc})") from None
    # The TensorRT-LLM converters save with a leading batch dimension of 1.
    return array[0] if array.ndim == 3 and array.shape[0] == 1 else array


def _is_bfloat16(weights: np.ndarray) -> bool:
    return weights.dtype.kind == "V" and weights.dtype.itemsize == 2 and weights.dtype.fields is None


def _read(directory: Path) -> tuple[list[tuple[str, int, int]], np.ndarray]:
    """The config rows as (module, layer, size), and the weight rows (bfloat16 as uint16 bit patterns)."""
    if not (directory / WEIGHTS).is_file():
        raise Rejection(CONFIG, f"has no {WEIGHTS} beside it")
    config, weights = _load(directory / CONFIG), _load(directory / WEIGHTS)
    if config.ndim != 2 or config.shape[1] not in (3, 4) or not np.issubdtype(config.dtype, np.integer):
        raise Rejection(CONFIG, f"must be integer rows of (module id, layer, adapter size[, is_dora]); got shape "
                                f"{list(config.shape)} of {config.dtype}")
    if config.shape[0] == 0:
        raise Rejection(CONFIG, "lists no adapted modules")
    if weights.ndim != 2 or weights.shape[0] != config.shape[0]:
        raise Rejection(WEIGHTS, f"has shape {list(weights.shape)}; expected one row per {CONFIG} row "
                                 f"({config.shape[0]})")
    if _is_bfloat16(weights):
        weights = weights.view("<u2")
    elif not np.issubdtype(weights.dtype, np.floating):
        raise Rejection(WEIGHTS, f"holds {weights.dtype}, not floating-point weights")
    rows = []
    for row in np.asarray(config).tolist():
        module_id, layer, size = row[:3]
        if len(row) == 4 and row[3]:
            raise Rejection(CONFIG, f"row ({', '.join(map(str, row))}) is a DoRA module; its magnitude was "
                                    "normalised against the base weights, which no runtime loraplex serves can use")
        if module_id not in MODULE_IDS:
            raise Rejection(CONFIG, f"module id {module_id} is not a TensorRT-LLM LoRA module of a decoder-only "
                                    f"model ({', '.join(f'{i} {n}' for i, n in MODULE_IDS.items())})")
        if layer < 0 or size < 1:
            raise Rejection(CONFIG, f"row ({module_id}, {layer}, {size}) has a negative layer or empty adapter")
        if 2 * size > weights.shape[1]:
            raise Rejection(WEIGHTS, f"rows of {weights.shape[1]} values cannot hold an adapter of size {size}")
        rows.append((MODULE_IDS[module_id], layer, size))
    return rows, weights


def inspect(directory: Path) -> AdapterReport:
    rows, weights = _read(directory)
    # A row is the flattened in (size x in) then out (out x size) matrix; the rules check its length against
    # the base model's shapes.
    entries = [LoraWeights(module, layer, size, -1, -1) for module, layer, size in rows]
    rank = max(entry.rank for entry in entries)
    files = (CONFIG, WEIGHTS)
    return AdapterReport(
        format=AdapterFormat.TRTLLM, rank=rank, rank_source=f"{CONFIG}: adapter size {rank}",
        target_modules=tuple(sorted({e.module for e in entries})), weights=tuple(entries),
        size_bytes=sum((directory / f).stat().st_size for f in files), files=files, row_values=int(weights.shape[1]),
    )


def read_pairs(directory: Path, base_config: dict[str, Any]) -> list[LoraPair]:
    """Each row as Hugging Face Llama LoRA pairs: the sizes of each module come from the base model's config,
    since a row holds only the flattened values. Fused rows are split; their A is shared."""
    from loraplex.formats.rules import module_shapes, trtllm_module_shapes

    rows, weights = _read(directory)
    shapes, hf_shapes = trtllm_module_shapes(base_config), module_shapes(base_config)
    bfloat16 = weights.dtype == np.dtype("<u2")
    pairs = []
    for index, (module, layer, size) in enumerate(rows):
        n_in, n_out = shapes[module][0]
        needed = size * (n_in + n_out)
        if needed > weights.shape[1]:
            raise Rejection(WEIGHTS, f"row {index} ({module} of layer {layer}, adapter size {size}) needs {needed} "
                                     f"values for the base model's {n_in}→{n_out} {module}, but rows hold "
                                     f"{weights.shape[1]}; the adapter was converted for another base model")
        if np.any(weights[index, needed:]):  # converters pad with zeros: more values mean a bigger module
            raise Rejection(WEIGHTS, f"row {index} ({module} of layer {layer}, adapter size {size}) holds more than "
                                     f"the {needed} values of the base model's {n_in}→{n_out} {module}; the adapter "
                                     "was converted for another base model (or fuses gate and up projections)")
        values = np.asarray(weights[index, :needed])
        a = values[: size * n_in].reshape(size, n_in).copy()
        b = values[size * n_in:].reshape(n_out, size)
        targets = HF_MODULES[module]
        parts = [hf_shapes[target.rsplit(".", 1)[-1]][1] for target in targets]
        start = 0
        for target, rows_of_target in zip(targets, parts, strict=True):
            pairs.append(LoraPair(layer, target, a, b[start:start + rows_of_target].copy(), bfloat16=bfloat16))
            start += rows_of_target
    seen: set[tuple[int, str]] = set()
    for pair in pairs:
        if (pair.layer, pair.module) in seen:
            raise Rejection(CONFIG, f"adapts {pair.module} of layer {pair.layer} twice")
        seen.add((pair.layer, pair.module))
    return pairs
