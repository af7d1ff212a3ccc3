"""TensorRT-LLM LoRA adapters: model.lora_config.npy (rows of module id, layer, adapter size) and
model.lora_weights.npy (one row of flattened in/out weights per config row), read without pickle.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from loraplex.api.types import AdapterFormat
from loraplex.formats.report import AdapterReport, LoraWeights, Rejection

CONFIG = "model.lora_config.npy"
WEIGHTS = "model.lora_weights.npy"
# TensorRT-LLM's LoraModuleType ids for the modules a decoder-only model adapts.
MODULE_IDS = {
    0: "attn_qkv", 1: "attn_q", 2: "attn_k", 3: "attn_v", 4: "attn_dense",
    5: "mlp_h_to_4h", 6: "mlp_4h_to_h", 7: "mlp_gate",
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


def inspect(directory: Path) -> AdapterReport:
    if not (directory / WEIGHTS).is_file():
        raise Rejection(CONFIG, f"has no {WEIGHTS} beside it")
    config, weights = _load(directory / CONFIG), _load(directory / WEIGHTS)
    if config.ndim != 2 or config.shape[1] != 3 or not np.issubdtype(config.dtype, np.integer):
        raise Rejection(CONFIG, f"must be integer rows of (module id, layer, adapter size); got shape "
                                f"{list(config.shape)} of {config.dtype}")
    if config.shape[0] == 0:
        raise Rejection(CONFIG, "lists no adapted modules")
    if weights.ndim != 2 or weights.shape[0] != config.shape[0]:
        raise Rejection(WEIGHTS, f"has shape {list(weights.shape)}; expected one row per {CONFIG} row "
                                 f"({config.shape[0]})")
    if not np.issubdtype(weights.dtype, np.floating):
        raise Rejection(WEIGHTS, f"holds {weights.dtype}, not floating-point weights")
    rows = np.asarray(config)
    entries = []
    for module_id, layer, size in rows.tolist():
        if module_id not in MODULE_IDS:
            raise Rejection(CONFIG, f"module id {module_id} is not a TensorRT-LLM LoRA module this runtime serves")
        if layer < 0 or size < 1:
            raise Rejection(CONFIG, f"row ({module_id}, {layer}, {size}) has a negative layer or empty adapter")
        if 2 * size > weights.shape[1]:
            raise Rejection(WEIGHTS, f"rows of {weights.shape[1]} values cannot hold an adapter of size {size}")
        # A row is the flattened in (size x in) then out (out x size) matrix; the rules check its
        # length against the base model's shapes.
        entries.append(LoraWeights(MODULE_IDS[module_id], layer, size, -1, -1))
    rank = max(entry.rank for entry in entries)
    files = (CONFIG, WEIGHTS)
    return AdapterReport(
        format=AdapterFormat.TRTLLM, rank=rank, rank_source=f"{CONFIG}: adapter size {rank}",
        target_modules=tuple(sorted({e.module for e in entries})), weights=tuple(entries),
        size_bytes=sum((directory / f).stat().st_size for f in files), files=files, row_values=int(weights.shape[1]),
    )
