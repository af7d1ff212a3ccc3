"""What inspecting an adapter yields, whatever its format, how a rejection reads, and the reading of a JSON config
that every format refuses in the same words."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from loraplex.api.types import AdapterFormat


class Rejection(ValueError):
    """An adapter the runtime must never see. Reads as one sentence naming the file and the rule."""

    def __init__(self, file: str, rule: str):
        super().__init__(f"{file}: {rule}")
        self.file, self.rule = file, rule


def read_json_object(path: Path, label: str, max_bytes: int) -> dict[str, Any]:
    """The JSON object an adapter's config file holds; a Rejection naming `label` when the file is larger than
    `max_bytes`, is not JSON, or holds something other than an object."""
    if path.stat().st_size > max_bytes:
        raise Rejection(label, f"is {path.stat().st_size} bytes, far above any real adapter config")
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Rejection(label, f"is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise Rejection(label, "must hold a JSON object")
    return config


@dataclasses.dataclass(frozen=True)
class LoraWeights:
    """One adapted layer: its low-rank pair, as the format names the module."""

    module: str  # the last part of its name: q_proj, lm_head, attention_qkv...
    layer: int | None
    rank: int  # read from the tensors
    in_features: int
    out_features: int
    name: str = ""  # HF only: the module's full name in the base model, model.layers.0.self_attn.q_proj


@dataclasses.dataclass(frozen=True)
class AdapterReport:
    format: AdapterFormat
    rank: int
    rank_source: str  # "adapter_config.json: r" - where the rank was read, for messages
    target_modules: tuple[str, ...]
    weights: tuple[LoraWeights, ...]
    size_bytes: int
    files: tuple[str, ...]
    modules_to_save: tuple[str, ...] = ()
    # HF only: adapter_config.json as written, for the runtime's rules on PEFT options.
    peft_config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # HF only: tensors that are not LoRA matrices in PEFT's saved form (biases, DoRA magnitudes, full copies...).
    unparsed_tensors: tuple[str, ...] = ()
    # TensorRT-LLM only: values per row of model.lora_weights.npy (every row is padded to the widest).
    row_values: int | None = None
