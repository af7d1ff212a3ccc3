"""Write a Hugging Face PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) from low-rank pairs
read out of another format, which is what `loraplex convert` produces and what vLLM loads.

Every pair is written with its scale already multiplied into B, and the config says lora_alpha = r for every
module, so PEFT's scale is exactly 1 and ΔW = B·A bit for bit. Tensors keep their dtype: bfloat16 is written as
the same 16-bit patterns it was read as (numpy has no bfloat16, so such tensors arrive as uint16 bits).
"""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from loraplex.formats.hf import CONFIG, SAFETENSORS

_SAFETENSORS_DTYPES = {np.dtype("<f4"): "F32", np.dtype("<f2"): "F16"}


@dataclasses.dataclass(frozen=True)
class LoraPair:
    """One adapted module of one layer: ΔW = b @ a, scale included."""

    layer: int
    module: str  # its path inside a decoder layer, as Hugging Face Llama names it: self_attn.q_proj, mlp.up_proj
    a: np.ndarray  # [rank, in_features]
    b: np.ndarray  # [out_features, rank]
    bfloat16: bool = False  # a and b hold bfloat16 bit patterns as uint16

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    @property
    def key(self) -> str:
        return f"base_model.model.model.layers.{self.layer}.{self.module}"


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """Exact: every bfloat16 value is a float32 whose low 16 bits are zero."""
    return (bits.astype("<u4") << 16).view("<f4")


def write_peft_adapter(pairs: Sequence[LoraPair], out: Path, base_model: str | None = None,
                       converted_from: str | None = None) -> None:
    if not pairs:
        raise ValueError("no LoRA pairs to write")
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, tuple[str, tuple[int, ...], bytes]] = {}
    for pair in sorted(pairs, key=lambda p: (p.layer, p.module)):
        for side, matrix in (("lora_A", pair.a), ("lora_B", pair.b)):
            tensors[f"{pair.key}.{side}.weight"] = _tensor(matrix, pair.bfloat16)
    # Provenance goes in the safetensors metadata: runtimes ignore it there, unlike an unknown config key.
    metadata = {"format": "pt", **({"loraplex.converted_from": converted_from} if converted_from else {})}
    _write_safetensors(out / SAFETENSORS, tensors, metadata)
    (out / CONFIG).write_text(json.dumps(peft_config(pairs, base_model), indent=2, sort_keys=True) + "\n")


def peft_config(pairs: Sequence[LoraPair], base_model: str | None) -> dict[str, Any]:
    ranks = {pair.key: pair.rank for pair in pairs}
    rank = max(set(ranks.values()), key=list(ranks.values()).count)  # the most common rank is `r`
    # Full module paths anchor PEFT's pattern match ("(.*\.)?key$") to exactly one module.
    pattern = {key.removeprefix("base_model.model."): r for key, r in ranks.items() if r != rank}
    config: dict[str, Any] = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank,
        "rank_pattern": pattern, "alpha_pattern": dict(pattern), "use_rslora": False, "use_dora": False,
        "bias": "none", "lora_dropout": 0.0, "fan_in_fan_out": False, "modules_to_save": None,
        "target_modules": sorted({pair.module.rsplit(".", 1)[-1] for pair in pairs}),
        "base_model_name_or_path": base_model, "inference_mode": True, "init_lora_weights": True,
    }
    return config


def _tensor(matrix: np.ndarray, bfloat16: bool) -> tuple[str, tuple[int, ...], bytes]:
    if bfloat16:
        return "BF16", tuple(matrix.shape), np.ascontiguousarray(matrix, dtype="<u2").tobytes()
    dtype = np.dtype(matrix.dtype).newbyteorder("<")
    if dtype not in _SAFETENSORS_DTYPES:
        raise ValueError(f"cannot write {matrix.dtype} LoRA weights")
    return _SAFETENSORS_DTYPES[dtype], tuple(matrix.shape), np.ascontiguousarray(matrix, dtype=dtype).tobytes()


def _write_safetensors(path: Path, tensors: dict[str, tuple[str, tuple[int, ...], bytes]],
                       metadata: dict[str, str]) -> None:
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format aligns tensor data to 8 bytes
    with path.open("wb") as file:
        file.write(struct.pack("<Q", len(encoded)))
        file.write(encoded)
        for _, _, data in tensors.values():
            file.write(data)
