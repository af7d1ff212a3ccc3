"""Adapters in other producers' on-disk layouts, built from a Hugging Face PEFT adapter the way each producer's
own converter or trainer writes them (docs/formats/ says where in their sources). Tests convert them back and
compare ΔW = B·A·scale per module and layer with the original."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

PEFT_KEY = re.compile(r".*layers\.(?P<layer>\d+)\.(?:self_attn|mlp)\.(?P<module>\w+)\.lora_(?P<side>[AB])\.weight$")
# hf_lora_convert.py's map, gate and up as its code has them (not as its docs table does).
TRTLLM_IDS = {"q_proj": 1, "k_proj": 2, "v_proj": 3, "o_proj": 4, "gate_proj": 5, "down_proj": 6, "up_proj": 7}


def peft_delta_weights(adapter: Path) -> dict[tuple[int, str], torch.Tensor]:
    """(layer, module) -> scale·B·A in float64, from an adapter_config.json + adapter_model.safetensors."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    deltas: dict[tuple[int, str], torch.Tensor] = {}
    with safe_open(adapter / "adapter_model.safetensors", "pt") as file:
        tensors = {key: file.get_tensor(key) for key in file.keys()}
    for key, a in tensors.items():
        match = PEFT_KEY.match(key)
        if match is None or match["side"] != "A":
            continue
        b = tensors[key.replace("lora_A", "lora_B")]
        name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        rank = _pattern(config.get("rank_pattern") or {}, name, config["r"])
        alpha = _pattern(config.get("alpha_pattern") or {}, name, config["lora_alpha"])
        scale = alpha / rank ** 0.5 if config.get("use_rslora") else alpha / rank
        deltas[(int(match["layer"]), match["module"])] = b.double() @ a.double() * scale
    return deltas


def _pattern(patterns: dict[str, float], name: str, default: float) -> float:
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def make_trtllm_from_peft(adapter: Path, out: Path, storage: str = "float32", dora_column: bool = False) -> Path:
    """model.lora_config.npy and model.lora_weights.npy as hf_lora_convert.py writes them: rows grouped by
    layer then module in the order the keys come, A as saved, B multiplied by alpha/r in the source dtype and
    then cast, zero-padded to the widest row, a leading batch dimension of 1; bfloat16 as raw V2 patterns."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    rank, alpha = config["r"], config["lora_alpha"]
    scale = alpha / rank ** 0.5 if config.get("use_rslora") else alpha / rank
    grouped: dict[int, dict[str, dict[str, torch.Tensor]]] = defaultdict(lambda: defaultdict(dict))
    with safe_open(adapter / "adapter_model.safetensors", "pt") as file:
        for key in file.keys():
            match = PEFT_KEY.match(key)
            if match is not None:
                grouped[int(match["layer"])][match["module"]][match["side"]] = file.get_tensor(key)
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[storage]
    rows, config_rows = [], []
    for layer, modules in grouped.items():
        for module, pair in modules.items():
            a, b = pair["A"], pair["B"] * scale
            flat = torch.cat([a.to(dtype).flatten(), b.to(dtype).flatten()])
            rows.append(flat)
            config_rows.append([TRTLLM_IDS[module], layer, a.shape[0]] + ([0] if dora_column else []))
    width = max(len(row) for row in rows)
    weights = torch.stack([torch.nn.functional.pad(row, (0, width - len(row))) for row in rows])
    array = weights.view(torch.int16).numpy().view(np.dtype("V2")) if storage == "bfloat16" else weights.numpy()
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "model.lora_config.npy", np.expand_dims(np.array(config_rows, dtype=np.int32), 0))
    np.save(out / "model.lora_weights.npy", np.expand_dims(array, 0))
    return out
