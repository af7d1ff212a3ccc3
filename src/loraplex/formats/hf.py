"""Hugging Face PEFT adapters: adapter_config.json plus adapter_model.safetensors or adapter_model.bin.

The safetensors header is parsed and bounds-checked without reading tensor data; a .bin is read with
the restricted unpickler, which never executes code from the file.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from loraplex.api.types import AdapterFormat
from loraplex.formats.report import AdapterReport, LoraWeights, Rejection, read_json_object
from loraplex.formats.safe_pickle.restricted import UnsafeCheckpoint
from loraplex.formats.safe_pickle.torch_zip import read_state_dict_shapes

CONFIG = "adapter_config.json"
SAFETENSORS = "adapter_model.safetensors"
PICKLE = "adapter_model.bin"
MAX_CONFIG_BYTES = 1024 * 1024
MAX_HEADER_BYTES = 100 * 1024 * 1024
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
# The forms PEFT saves LoRA matrices in: base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight, and
# base_model.model.model.embed_tokens.lora_embedding_A for an embedding.
_LORA_KEY = re.compile(r"^(?P<stem>.+)\.(?:lora_(?P<side>A|B)\.weight|lora_embedding_(?P<embedding_side>A|B))$")
_LAYER = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")
PEFT_PREFIX = "base_model.model."


def is_hf(directory: Path) -> bool:
    return (directory / CONFIG).is_file()


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


def _positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def pattern_key(patterns: Iterable[str], module_name: str) -> str | None:
    """The rank_pattern or alpha_pattern key that applies to a module, as PEFT picks it
    (peft.utils.other.get_pattern_key, which vLLM 0.32 follows): the first key that, read as a regular
    expression, matches a dot-bounded suffix of the module name ('model.layers.0.self_attn.q_proj')."""
    return next((key for key in patterns if re.match(rf"(.*\.)?({key})$", module_name)), None)


def _read_pattern(config: dict[str, Any], field: str, valid: Callable[[Any], bool], kind: str) -> dict[str, Any]:
    pattern = config.get(field) or {}
    if not isinstance(pattern, dict) or not all(valid(v) for v in pattern.values()):
        raise Rejection(CONFIG, f"{field} must map module patterns to {kind}")
    for key in pattern:
        try:
            re.compile(rf"(.*\.)?({key})$")
        except re.error as exc:
            raise Rejection(CONFIG, f"{field} key {key!r} is not a regular expression PEFT can match ({exc})") \
                from None
    return pattern


def inspect(directory: Path) -> AdapterReport:
    config = read_json_object(directory / CONFIG, CONFIG, MAX_CONFIG_BYTES)
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise Rejection(CONFIG, f"peft_type {peft_type!r} is not LORA")
    rank = config.get("r")
    if not _positive_int(rank):
        raise Rejection(CONFIG, f"r={rank!r} must be an integer of at least 1")
    rank_pattern = _read_pattern(config, "rank_pattern", _positive_int, "integer ranks")
    _read_pattern(config, "alpha_pattern", _positive_number, "positive numbers")
    alpha = config.get("lora_alpha", 8)
    if not _positive_number(alpha):
        raise Rejection(CONFIG, f"lora_alpha={alpha!r} must be a positive number")
    for flag in ("use_dora", "use_rslora"):
        if not isinstance(config.get(flag, False), bool):
            raise Rejection(CONFIG, f"{flag} must be true or false")
    modules_to_save = config.get("modules_to_save") or []
    if not isinstance(modules_to_save, list):
        raise Rejection(CONFIG, "modules_to_save must be a list")

    weights_file, shapes = _tensor_shapes(directory)
    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    unparsed = []
    for key, shape in shapes.items():
        match = _LORA_KEY.match(key)
        if not match:
            unparsed.append(key)
            continue
        if len(shape) != 2:
            raise Rejection(weights_file, f"{key} has shape {list(shape)}; LoRA matrices are 2-D")
        pairs.setdefault(match["stem"], {})[match["side"] or match["embedding_side"]] = shape
    if not pairs:
        raise Rejection(weights_file, "holds no lora_A/lora_B weights")

    weights = []
    for stem, sides in pairs.items():
        if set(sides) != {"A", "B"}:
            (present,) = sides
            raise Rejection(weights_file, f"{stem} has lora_{present} without its pair")
        # Embeddings keep the same layout: lora_embedding_A is [r, vocab], lora_embedding_B [hidden, r].
        (a_rank, in_features), (out_features, b_rank) = sides["A"], sides["B"]
        if a_rank != b_rank:
            raise Rejection(weights_file, f"{stem} has lora_A rank {a_rank} but lora_B rank {b_rank}")
        name = stem.removeprefix(PEFT_PREFIX)
        key = pattern_key(rank_pattern, name)
        expected = rank if key is None else rank_pattern[key]
        if a_rank != expected:
            said = f"says r={expected}" if key is None else f"gives it rank {expected} (rank_pattern {key!r})"
            raise Rejection(weights_file, f"{stem} has rank {a_rank} but {CONFIG} {said}")
        layer_match = _LAYER.search(stem + ".")
        layer = int(layer_match.group(1)) if layer_match else None
        weights.append(LoraWeights(name.rsplit(".", 1)[-1], layer, a_rank, in_features, out_features, name))
    weights.sort(key=lambda w: (w.layer if w.layer is not None else -1, w.module))

    # vLLM 0.32 holds the largest rank the config names, matched by a module or not, against --max-lora-rank.
    declared_max = max([rank, *rank_pattern.values()])
    field = f"r={rank}" if declared_max == rank else f"rank_pattern's rank {declared_max}"
    files = [CONFIG, weights_file]
    return AdapterReport(
        format=AdapterFormat.HF, rank=declared_max, rank_source=f"{CONFIG}: {field}",
        target_modules=tuple(sorted({w.module for w in weights})), weights=tuple(weights),
        size_bytes=sum((directory / f).stat().st_size for f in files), files=tuple(files),
        modules_to_save=tuple(str(m) for m in modules_to_save), peft_config=config,
        unparsed_tensors=tuple(sorted(unparsed)),
    )
