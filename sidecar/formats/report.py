"""What inspecting an adapter yields, whatever its format, and how a rejection reads."""

from __future__ import annotations

import dataclasses

from loraplex.api.types import AdapterFormat


class Rejection(ValueError):
    """An adapter the runtime must never see. Reads as one sentence naming the file and the rule."""

    def __init__(self, file: str, rule: str):
        super().__init__(f"{file}: {rule}")
        self.file, self.rule = file, rule


@dataclasses.dataclass(frozen=True)
class LoraWeights:
    """One adapted linear layer: its low-rank pair, as the format names the module."""

    module: str
    layer: int | None
    rank: int
    in_features: int
    out_features: int


@dataclasses.dataclass(frozen=True)
class AdapterReport:
    format: AdapterFormat
    rank: int
    rank_source: str  # "adapter_config.json: r" - where the rank was read, for messages
    target_modules: tuple[str, ...]
    weights: tuple[LoraWeights, ...]
    size_bytes: int
    files: tuple[str, ...]
    use_dora: bool = False
    use_rslora: bool = False
    bias: str = "none"
    modules_to_save: tuple[str, ...] = ()
    # TensorRT-LLM only: values per row of model.lora_weights.npy (every row is padded to the widest).
    row_values: int | None = None
