"""NeMo 2.0 LoRA checkpoints: a folder with weights/ (a torch distributed checkpoint holding only the adapter
parameters, decoder layers stacked on a leading axis) and context/model.yaml (the model's config and its LoRA
model_transform), laid out as docs/formats/nemo.md §4 describes.

weights/.metadata is read with an allow-list unpickler and each chunk it points at with the restricted tensor
reader (safe_pickle); context/io.json and weights/common.pt are never opened, since loading either runs code. The
adapters are NeMo 1's under other names, so nemo.py's size checks and QKV and fc1 splits apply unchanged.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from loraplex.api.types import AdapterFormat
from loraplex.formats import nemo
from loraplex.formats.peft_writer import LoraPair
from loraplex.formats.report import AdapterReport, LoraWeights, Rejection
from loraplex.formats.safe_pickle.dcp import DcpChunk, DcpTensor, read_dcp_metadata, read_saved_tensor
from loraplex.formats.safe_pickle.restricted import UnsafeCheckpoint

WEIGHTS = "weights"
METADATA = f"{WEIGHTS}/.metadata"
MODEL_YAML = "context/model.yaml"
MAX_METADATA_BYTES = 256 * 1024 * 1024
MAX_CONFIG_BYTES = 4 * 1024 * 1024
# The adapter on each of Megatron's linear layers, named as nemo.py names NeMo 1's.
FUSED_MODULES = {"linear_qkv": "attention_qkv", "linear_proj": "attention_dense", "linear_fc1": "mlp_fc1",
                 "linear_fc2": "mlp_fc2"}
# CanonicalLoRA's separate adapters inside linear_qkv and linear_fc1, named as the Llama projection they adapt.
CANONICAL_MODULES = {("linear_qkv", "adapter_q"): "q_proj", ("linear_qkv", "adapter_k"): "k_proj",
                     ("linear_qkv", "adapter_v"): "v_proj", ("linear_fc1", "adapter_gate"): "gate_proj",
                     ("linear_fc1", "adapter_up"): "up_proj"}
_FC1 = frozenset({"mlp_fc1", "gate_proj", "up_proj"})
# Without a layer number the key is stacked: its leading axis is the global layer (Megatron's TransformerBlock).
_KEY = re.compile(r"^module\.decoder\.layers\.(?:(?P<layer>\d+)\.)?(?:self_attention|mlp)\.(?P<linear>linear_\w+?)"
                  r"\.adapter\.(?:(?P<part>adapter_[a-z]+)\.)?linear_(?P<side>in|out)\.weight$")
_NUMPY_DTYPES = {"float32": "<f4", "float16": "<f2", "bfloat16": "<u2"}


@dataclasses.dataclass(frozen=True)
class Nemo2Config:
    """What context/model.yaml says about the adapter and the model it was trained on."""

    transform: str  # LoRA or CanonicalLoRA
    rank: int
    alpha: float
    targets: tuple[str, ...]
    model: dict[str, Any]  # the model's config section, in NeMo's names


@dataclasses.dataclass(frozen=True)
class _Adapter:
    """One adapter module of one layer, and where its tensors sit: a stacked tensor's `index`, or a whole one."""

    in_key: str
    out_key: str
    index: int | None
    weights: LoraWeights


def is_nemo2(directory: Path) -> bool:
    return (directory / WEIGHTS).is_dir() and (directory / "context").is_dir()


def inspect(directory: Path) -> AdapterReport:
    config, tensors, adapters = _opened(directory)
    for key in sorted({key for adapter in adapters for key in (adapter.in_key, adapter.out_key)}):
        _covered(key, tensors[key])
        for chunk in tensors[key].chunks:
            _chunk_file(directory, key, chunk)
    weights = tuple(adapter.weights for adapter in adapters)
    return AdapterReport(
        format=AdapterFormat.NEMO, rank=config.rank, rank_source=f"{MODEL_YAML}: model_transform.dim={config.rank}",
        target_modules=tuple(sorted({w.module for w in weights})), weights=weights,
        size_bytes=sum(path.stat().st_size for path in (directory / WEIGHTS).iterdir() if path.is_file()),
        files=(MODEL_YAML, METADATA),
    )


def read_pairs(directory: Path, base_config: dict[str, Any]) -> list[LoraPair]:
    """The adapter as Hugging Face Llama pairs with alpha/dim multiplied into B: layers unstacked, fused QKV split
    per query group into q/k/v and fused fc1 into gate/up (sharing A)."""
    config, tensors, adapters = _opened(directory)
    sizes = nemo.model_sizes(MODEL_YAML, config.model, base_config)
    keys = sorted({key for adapter in adapters for key in (adapter.in_key, adapter.out_key)})
    dtypes = {tensors[key].dtype for key in keys}
    if len(dtypes) != 1 or not dtypes <= set(_NUMPY_DTYPES):
        raise Rejection(METADATA, f"holds {', '.join(sorted(dtypes))} adapter weights; loraplex converts adapters "
                                  "stored in one of float32, float16 or bfloat16")
    values = {key: _assembled(directory, key, tensors[key]) for key in keys}
    bfloat16 = dtypes == {"bfloat16"}
    pairs = []
    for adapter in adapters:
        nemo.check_module_shape(METADATA, adapter.weights, sizes)
        a, b = (values[key] if adapter.index is None else values[key][adapter.index]
                for key in (adapter.in_key, adapter.out_key))
        if adapter.weights.module in ("gate_proj", "up_proj"):
            b = _unsharded_fc1_part(b, _row_fragments(tensors[adapter.out_key], adapter.index))
        for module, part in nemo.split_out(adapter.weights.module, [b], sizes):
            pairs.append(LoraPair(adapter.weights.layer, nemo.HF_MODULES[module], np.ascontiguousarray(a),
                                  nemo.scaled(np.ascontiguousarray(part), config.alpha / config.rank, bfloat16),
                                  bfloat16=bfloat16))
    return pairs


# ---- context/model.yaml ----------------------------------------------------------------------------------------

def read_config(directory: Path) -> Nemo2Config:
    path = directory / MODEL_YAML
    if not path.is_file():
        raise Rejection(MODEL_YAML, "is missing; NeMo 2 writes the model's config and its LoRA model_transform there")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise Rejection(MODEL_YAML, f"is {path.stat().st_size} bytes, far above any real model config")
    try:
        config: Any = yaml.safe_load(path.read_bytes())
    except yaml.YAMLError as exc:
        raise Rejection(MODEL_YAML, f"is not valid YAML ({exc})") from None
    transform = config.get("model_transform") if isinstance(config, dict) else None
    if not isinstance(transform, dict):
        raise Rejection(MODEL_YAML, "has no model_transform: the checkpoint is not a PEFT adapter")
    target = str(transform.get("_target_"))
    kind = target.rsplit(".", 1)[-1]
    if kind == "DoRA":
        raise Rejection(MODEL_YAML, "model_transform is DoRA, whose weight magnitudes loraplex does not convert")
    if kind not in ("LoRA", "CanonicalLoRA"):
        raise Rejection(MODEL_YAML, f"model_transform {target} is neither NeMo's LoRA nor CanonicalLoRA")
    rank, alpha = transform.get("dim", 32), transform.get("alpha", 32)  # NeMo's defaults, as model.yaml omits none
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise Rejection(MODEL_YAML, f"model_transform.dim={rank!r} must be an integer of at least 1")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or alpha <= 0:
        raise Rejection(MODEL_YAML, f"model_transform.alpha={alpha!r} must be a positive number")
    targets = transform.get("target_modules") or []
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise Rejection(MODEL_YAML, "model_transform.target_modules must be a list of names")
    model = config.get("config")
    if not isinstance(model, dict):
        raise Rejection(MODEL_YAML, "has no config section with the model's sizes")
    return Nemo2Config(kind, rank, alpha, tuple(targets), model)


# ---- weights/: which tensors are adapters, and their chunks -----------------------------------------------------

def _opened(directory: Path) -> tuple[Nemo2Config, dict[str, DcpTensor], list[_Adapter]]:
    config = read_config(directory)
    tensors = _read_metadata(directory)
    return config, tensors, _plan(config, tensors)


def _read_metadata(directory: Path) -> dict[str, DcpTensor]:
    path = directory / METADATA
    if not path.is_file():
        raise Rejection(METADATA, "is missing; a NeMo 2 checkpoint's weights/ is a torch distributed checkpoint "
                                  "whose .metadata says where each tensor is stored")
    if path.stat().st_size > MAX_METADATA_BYTES:
        raise Rejection(METADATA, f"is {path.stat().st_size} bytes, far above any adapter's")
    try:
        return read_dcp_metadata(path.read_bytes())
    except UnsafeCheckpoint as exc:
        raise Rejection(METADATA, str(exc)) from None


def _plan(config: Nemo2Config, tensors: dict[str, DcpTensor]) -> list[_Adapter]:
    """Every adapter module of every layer, checked: a linear_in/linear_out pair of the variant model.yaml names,
    of rank `dim`, stacked over model.yaml's num_layers."""
    sides: dict[tuple[str, int | None], dict[str, str]] = {}
    for key in sorted(tensors):
        if not key.startswith("module.") or ".adapter." not in key or "_extra_state" in key:
            continue  # optimizer state, the frozen base model, TransformerEngine's extra state
        match = _KEY.match(key)
        part = match and match["part"]
        module = match and (CANONICAL_MODULES.get((match["linear"], part)) if part else
                            FUSED_MODULES.get(match["linear"]))
        if not module:
            raise Rejection(METADATA, f"holds {key}, which is not a NeMo 2 LoRA adapter loraplex reads "
                                      "(mixture-of-experts or other adapters)")
        if module in ("attention_qkv", "mlp_fc1", *CANONICAL_MODULES.values()) and bool(part) != (
                config.transform == "CanonicalLoRA"):
            raise Rejection(METADATA, f"holds {key}, which {config.transform} (the model_transform in "
                                      f"{MODEL_YAML}) does not write")
        layer = int(match["layer"]) if match["layer"] is not None else None
        sides.setdefault((module, layer), {})[match["side"]] = key
    if not sides:
        raise Rejection(METADATA, "holds no LoRA adapter weights (module.….adapter.linear_in/linear_out.weight): "
                                  "not a NeMo 2 LoRA checkpoint")
    layers = config.model.get("num_layers")
    adapters: dict[tuple[str, int], _Adapter] = {}
    for (module, layer), pair in sides.items():
        if set(pair) != {"in", "out"}:
            raise Rejection(METADATA, f"{module} {_where(layer)} lacks a linear_in/linear_out pair")
        in_shape, out_shape = tensors[pair["in"]].shape, tensors[pair["out"]].shape
        stacked = layer is None
        if len(in_shape) != 2 + stacked or len(out_shape) != 2 + stacked or (stacked and in_shape[0] != out_shape[0]):
            raise Rejection(METADATA, f"{module} {_where(layer)} has linear_in {list(in_shape)} and linear_out "
                                      f"{list(out_shape)}, not the {'stacked ' if stacked else ''}matrices of a LoRA")
        if in_shape[-2] != config.rank or out_shape[-1] != config.rank:
            raise Rejection(METADATA, f"{module} {_where(layer)} has rank {in_shape[-2]}/{out_shape[-1]} but "
                                      f"{MODEL_YAML} says model_transform.dim={config.rank}")
        if stacked and layers is not None and in_shape[0] != layers:
            raise Rejection(METADATA, f"{module} stacks {in_shape[0]} layers but {MODEL_YAML} says "
                                      f"num_layers={layers}")
        if module in _FC1 and config.model.get("gated_linear_unit") is False:
            raise Rejection(MODEL_YAML, "says gated_linear_unit: false, so linear_fc1 is not Llama's gate and up "
                                        "projections")
        for index in range(in_shape[0]) if stacked else [None]:
            number = index if index is not None else layer
            if (module, number) in adapters:
                raise Rejection(METADATA, f"holds {module} of layer {number} both stacked and on its own")
            adapters[(module, number)] = _Adapter(pair["in"], pair["out"], index, LoraWeights(
                module, number, config.rank, in_shape[-1], out_shape[-2]))
    return [adapters[key] for key in sorted(adapters, key=lambda key: (key[1], key[0]))]


def _where(layer: int | None) -> str:
    return "(stacked over layers)" if layer is None else f"of layer {layer}"


def _chunk_file(directory: Path, key: str, chunk: DcpChunk) -> Path:
    if "/" in chunk.file or "\\" in chunk.file or chunk.file.startswith("."):
        raise Rejection(METADATA, f"places a chunk of {key} in {chunk.file!r}, outside weights/")
    path = directory / WEIGHTS / chunk.file
    if not path.is_file():
        raise Rejection(METADATA, f"places a chunk of {key} in {chunk.file}, which weights/ lacks")
    if chunk.offset + chunk.length > path.stat().st_size:
        raise Rejection(f"{WEIGHTS}/{chunk.file}", f"is {path.stat().st_size} bytes, too short for the chunk of "
                                                   f"{key} that .metadata places at bytes {chunk.offset} to "
                                                   f"{chunk.offset + chunk.length}")
    return path


def _regions(key: str, tensor: DcpTensor) -> list[tuple[slice, ...]]:
    regions = []
    for chunk in tensor.chunks:
        if len(chunk.offsets) != len(tensor.shape) or len(chunk.sizes) != len(tensor.shape) or any(
                start + size > whole for start, size, whole in zip(chunk.offsets, chunk.sizes, tensor.shape,
                                                                    strict=True)):
            raise Rejection(METADATA, f"has a chunk of {key} at {list(chunk.offsets)} sized {list(chunk.sizes)}, "
                                      f"outside its shape {list(tensor.shape)}")
        regions.append(tuple(slice(start, start + size) for start, size in zip(chunk.offsets, chunk.sizes,
                                                                                strict=True)))
    return regions


def _covered(key: str, tensor: DcpTensor) -> list[tuple[slice, ...]]:
    """The chunks' regions, once each has been checked to lie inside the tensor and all of them to cover it
    exactly once."""
    regions = _regions(key, tensor)
    count = np.zeros(tensor.shape, dtype=np.uint16)
    for region in regions:
        count[region] += 1
    if (count > 1).any():
        raise Rejection(METADATA, f"has chunks of {key} that overlap")
    if not count.all():
        raise Rejection(METADATA, f"has chunks of {key} that cover only part of its shape {list(tensor.shape)}")
    return regions


def _assembled(directory: Path, key: str, tensor: DcpTensor) -> np.ndarray:
    """The global tensor put together from its chunks, as numpy (bfloat16 as its uint16 bit patterns)."""
    whole = np.zeros(tensor.shape, dtype=_NUMPY_DTYPES[tensor.dtype])
    for chunk, region in zip(tensor.chunks, _covered(key, tensor), strict=True):
        path = _chunk_file(directory, key, chunk)
        with path.open("rb") as file:
            file.seek(chunk.offset)
            payload = file.read(chunk.length)
        where = f"{WEIGHTS}/{chunk.file}"
        try:
            data = read_saved_tensor(payload)
        except UnsafeCheckpoint as exc:
            raise Rejection(where, f"the chunk of {key} at byte {chunk.offset} refused: {exc}") from None
        if data.dtype != tensor.dtype or tuple(data.array.shape) != chunk.sizes:
            raise Rejection(where, f"the chunk of {key} at byte {chunk.offset} is {data.dtype} "
                                   f"{list(data.array.shape)}, but .metadata says {tensor.dtype} {list(chunk.sizes)}")
        whole[region] = data.array
    return whole


# ---- CanonicalLoRA's gate and up under tensor parallelism -------------------------------------------------------

def _row_fragments(tensor: DcpTensor, index: int | None) -> list[int]:
    """Where the chunks of one layer's linear_out start along its rows."""
    row_axis = len(tensor.shape) - 2
    return sorted({chunk.offsets[row_axis] for chunk in tensor.chunks
                   if index is None or chunk.offsets[0] == index})


def _unsharded_fc1_part(b: np.ndarray, starts: list[int]) -> np.ndarray:
    """CanonicalLoRA's gate or up B in plain row order. NeMo saves every linear_out under linear_fc1 through
    Megatron's swiglu factory, which cuts each TP rank's slice in two halves and stores rank t's at fragments t
    and T+t of 2T; for gate and up alone those halves are not gate and up, so the rows must be put back per rank.
    With T=1 (two fragments) this is the identity."""
    if len(starts) < 4 or len(starts) % 2:
        return b
    bounds = [*starts, b.shape[0]]
    fragments = [b[bounds[i]:bounds[i + 1]] for i in range(len(starts))]
    ranks = len(fragments) // 2
    return np.concatenate([part for t in range(ranks) for part in (fragments[t], fragments[ranks + t])])
