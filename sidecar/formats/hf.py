"""Hugging Face PEFT adapters: adapter_config.json plus adapter_model.safetensors or adapter_model.bin.

The safetensors header is parsed and bounds-checked without reading tensor data; a .bin is read with
the restricted unpickler, which never executes code from the file.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

from loraplex.api.types import AdapterFormat
from loraplex.sidecar.formats.report import AdapterReport, LoraWeights, Rejection
from loraplex.sidecar.formats.safe_pickle import UnsafeCheckpoint, read_state_dict_shapes

CONFIG = "adapter_config.json"
SAFETENSORS = "adapter_model.safetensors"
PICKLE = "adapter_model.bin"
MAX_CONFIG_BYTES = 1024 * 1024
MAX_HEADER_BYTES = 100 * 1024 * 1024
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
# base_model.model.model.layers.3.self_attn.q_proj.lora_A[.default].weight
_LORA_KEY = re.compile(r"^(?P<stem>.+)\.lora_(?P<side>A|B)(?:\.[A-Za-z0-9_]+)?\.weight$")
_LAYER = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")


def is_hf(directory: Path) -> bool:
    return (directory / CONFIG).is_file()


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise Rejection(CONFIG, f"is {path.stat().st_size} bytes, far above any real adapter config")
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Rejection(CONFIG, f"is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise Rejection(CONFIG, "must hold a JSON object")
    return config


def read_safetensors_header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensor name → (shape, dtype) from a safetensors header, checking every length and offset."""
    name = path.name
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise Rejection(name, "is too short to be a safetensors file")
        (header_length,) = struct.unpack("<Q", prefix)
        if header_length > min(MAX_HEADER_BYTES, size - 8):
            raise Rejection(name, f"declares a {header_length}-byte header in a {size}-byte file")
        raw = handle.read(header_length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise Rejection(name, "has a header that is not valid JSON") from None
    if not isinstance(header, dict):
        raise Rejection(name, "has a header that is not a JSON object")
    data_size = size - 8 - header_length
    tensors: dict[str, tuple[tuple[int, ...], str]] = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(entry, dict) or entry.get("dtype") not in _DTYPE_BYTES:
            raise Rejection(name, f"tensor {key!r} has an unknown dtype")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)
                or not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) for o in offsets)):
            raise Rejection(name, f"tensor {key!r} has a malformed shape or data_offsets")
        begin, end = offsets
        count = 1
        for dim in shape:
            count *= dim
        if not 0 <= begin <= end <= data_size or end - begin != count * _DTYPE_BYTES[entry["dtype"]]:
            raise Rejection(name, f"tensor {key!r} has data_offsets {offsets} inconsistent with its shape "
                                  f"{shape} or the file size")
        tensors[key] = (tuple(shape), entry["dtype"])
    return tensors


def _tensor_shapes(directory: Path) -> tuple[str, dict[str, tuple[int, ...]]]:
    if (directory / SAFETENSORS).is_file():
        return SAFETENSORS, {k: shape for k, (shape, _) in read_safetensors_header(directory / SAFETENSORS).items()}
    if (directory / PICKLE).is_file():
        try:
            shapes = read_state_dict_shapes(directory / PICKLE)
        except UnsafeCheckpoint as exc:
            raise Rejection(PICKLE, f"refused: {exc}") from None
        return PICKLE, {k: info.shape for k, info in shapes.items()}
    raise Rejection(CONFIG, f"has no weights beside it: expected {SAFETENSORS} or {PICKLE}")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def inspect(directory: Path) -> AdapterReport:
    config = _read_config(directory)
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise Rejection(CONFIG, f"peft_type {peft_type!r} is not LORA")
    rank = config.get("r")
    if not _positive_int(rank):
        raise Rejection(CONFIG, f"r={rank!r} must be an integer of at least 1")
    rank_pattern = config.get("rank_pattern") or {}
    if not isinstance(rank_pattern, dict) or not all(_positive_int(v) for v in rank_pattern.values()):
        raise Rejection(CONFIG, "rank_pattern must map module patterns to integer ranks")
    alpha = config.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise Rejection(CONFIG, f"lora_alpha={alpha!r} must be a positive number")
    for flag in ("use_dora", "use_rslora"):
        if not isinstance(config.get(flag, False), bool):
            raise Rejection(CONFIG, f"{flag} must be true or false")
    modules_to_save = config.get("modules_to_save") or []
    if not isinstance(modules_to_save, list):
        raise Rejection(CONFIG, "modules_to_save must be a list")

    weights_file, shapes = _tensor_shapes(directory)
    pairs: dict[tuple[str, int | None, str], dict[str, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        match = _LORA_KEY.match(key)
        if not match:
            continue
        if len(shape) != 2:
            raise Rejection(weights_file, f"{key} has shape {list(shape)}; LoRA matrices are 2-D")
        stem = match.group("stem")
        layer_match = _LAYER.search(stem + ".")
        layer = int(layer_match.group(1)) if layer_match else None
        pairs.setdefault((stem.rsplit(".", 1)[-1], layer, stem), {})[match.group("side")] = shape
    if not pairs:
        raise Rejection(weights_file, "holds no lora_A/lora_B weights")

    declared_max = max([rank, *rank_pattern.values()])
    weights = []
    for (module, layer, stem), sides in sorted(pairs.items(), key=lambda item: (item[0][1] or -1, item[0][0])):
        if set(sides) != {"A", "B"}:
            (present,) = sides
            raise Rejection(weights_file, f"{stem} has lora_{present} without its pair")
        (a_rank, in_features), (out_features, b_rank) = sides["A"], sides["B"]
        if a_rank != b_rank:
            raise Rejection(weights_file, f"{stem} has lora_A rank {a_rank} but lora_B rank {b_rank}")
        expected = next((v for pattern, v in rank_pattern.items() if re.search(pattern, stem)), rank)
        if a_rank != expected:
            raise Rejection(weights_file, f"{stem} has rank {a_rank} but {CONFIG} says r={expected}")
        weights.append(LoraWeights(module, layer, a_rank, in_features, out_features))

    files = [CONFIG, weights_file]
    return AdapterReport(
        format=AdapterFormat.HF, rank=declared_max, rank_source=f"{CONFIG}: r={declared_max}",
        target_modules=tuple(sorted({w.module for w in weights})), weights=tuple(weights),
        size_bytes=sum((directory / f).stat().st_size for f in files), files=tuple(files),
        use_dora=config.get("use_dora", False), use_rslora=config.get("use_rslora", False),
        bias=str(config.get("bias", "none")), modules_to_save=tuple(str(m) for m in modules_to_save),
    )
