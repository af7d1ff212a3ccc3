"""NeMo 1 `.nemo` LoRA adapters: a tar of model_config.yaml (peft.lora_tuning) and one model_weights.ckpt per
tensor- and pipeline-parallel rank, laid out as docs/formats/nemo.md describes (§1-§3).

Every member is checked (loraplex.archives) before anything is read, and every checkpoint is read with the
restricted unpickler, never executed. Validation reads shapes only and reports each adapter whole: TP shards
put back together, pipeline stages' local layer numbers made global. Conversion (`read_pairs`) reads the
values too and yields Hugging Face Llama pairs.
"""

from __future__ import annotations

import dataclasses
import re
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import yaml

from loraplex.api.types import AdapterFormat
from loraplex.archives import UnsafeArchive, safe_members
from loraplex.formats.peft_writer import LoraPair, bfloat16_to_float32
from loraplex.formats.report import AdapterReport, LoraWeights, Rejection
from loraplex.formats.safe_pickle.restricted import TensorData, UnsafeCheckpoint
from loraplex.formats.safe_pickle.torch_zip import read_state_dict, read_state_dict_shapes

CONFIG = "model_config.yaml"
WEIGHTS = "model_weights.ckpt"
MAX_CONFIG_BYTES = 4 * 1024 * 1024
# NeMo's adapter modules and the target_modules names that select them.
ADAPTER_MODULES = {
    "lora_kqv_adapter": "attention_qkv",
    "lora_dense_attention_adapter": "attention_dense",
    "lora_hto4h_adapter": "mlp_fc1",
    "lora_4htoh_adapter": "mlp_fc2",
}
# The canonical variant's separate adapters, named as the Llama projection each one adapts.
UNFUSED_MODULES = {
    ("lora_unfused_kqv_adapter", "q"): "q_proj", ("lora_unfused_kqv_adapter", "k"): "k_proj",
    ("lora_unfused_kqv_adapter", "v"): "v_proj",
    ("lora_unfused_hto4h_adapter", "gate"): "gate_proj", ("lora_unfused_hto4h_adapter", "up"): "up_proj",
}
# Row-parallel adapters take a TP slice of their input, so their linear_in is split along its columns; every
# other linear_in is split along the rank, and every linear_out along its rows.
_INPUT_SPLIT = frozenset({"attention_dense", "mlp_fc2"})
HF_MODULES = {
    "attention_dense": "self_attn.o_proj", "mlp_fc2": "mlp.down_proj", "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj", "gate_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
}
_KEY = re.compile(r"layers\.(?P<layer>\d+)\.(?P<block>self_attention|mlp)\.adapter_layer\."
                  r"(?P<adapter>lora_[a-z0-9_]+?_adapter)(?:\.(?P<part>[a-z]+)_adapter)?"
                  r"\.linear_(?P<side>in|out)\.weight$")
_SHARD = re.compile(r"^(?:mp_rank_(?P<mp>\d{2})|tp_rank_(?P<tp>\d{2})_pp_rank_(?P<pp>\d{3}))/"
                    + re.escape(WEIGHTS) + "$")


@dataclasses.dataclass(frozen=True)
class NemoConfig:
    """What model_config.yaml says about the adapter and the model it was trained on."""

    rank: int
    alpha: float | None
    targets: tuple[str, ...]
    tensor_parallel: int
    pipeline_parallel: int
    model: dict[str, Any]  # the whole config, for the model sizes


@dataclasses.dataclass(frozen=True)
class _Adapter:
    """One adapter module of one global layer, and where its tensors sit in each rank's checkpoint."""

    module: str  # attention_qkv ... for fused adapters, q_proj ... for the canonical variant's
    layer: int
    stage: int  # its pipeline stage
    in_key: str
    out_key: str
    legacy: bool  # the pre-mcore language_model.encoder keys
    weights: LoraWeights  # whole, TP shards put back together


def find_archive(directory: Path) -> Path | None:
    archives = sorted(directory.glob("*.nemo"))
    return archives[0] if len(archives) == 1 else None


def _normalized(name: str) -> str:
    return str(PurePosixPath(name.lstrip("./"))) if name not in (".", "./") else "."


def inspect(directory: Path, max_bytes: int = 50 * 1024**3) -> AdapterReport:
    with _opened(directory, max_bytes, read_shapes) as (label, path, config, shards):
        adapters = _plan(label, config, shards)
    weights = [adapter.weights for adapter in adapters]
    found = tuple(sorted({w.module for w in weights}))
    return AdapterReport(
        format=AdapterFormat.NEMO, rank=config.rank,
        rank_source=f"{label}: peft.lora_tuning.adapter_dim={config.rank}",
        target_modules=found if found else config.targets, weights=tuple(weights),
        size_bytes=path.stat().st_size, files=(label,),
    )


def read_pairs(directory: Path, base_config: dict[str, Any], max_bytes: int = 50 * 1024**3) -> list[LoraPair]:
    """The adapter as Hugging Face Llama pairs with NeMo's alpha/adapter_dim multiplied into B: TP shards put
    back together, fused QKV split per query group into q/k/v and fused fc1 into gate/up (sharing A)."""
    with _opened(directory, max_bytes, read_values) as (label, _, config, shards):
        adapters = _plan(label, config, shards)
        sizes = model_sizes(f"{label}/{CONFIG}", config.model, base_config)
        dtypes = {value.dtype for shard in shards.values() for value in shard.values()}
        if len(dtypes) != 1 or not dtypes <= {"float32", "float16", "bfloat16"}:
            raise Rejection(f"{label}/{WEIGHTS}", f"holds {', '.join(sorted(dtypes))} weights; loraplex converts "
                                                  "adapters stored in one of float32, float16 or bfloat16")
        bfloat16 = dtypes == {"bfloat16"}
        scale = 1.0 if config.alpha is None else config.alpha / config.rank
        pairs = []
        for adapter in adapters:
            if adapter.legacy:
                raise Rejection(f"{label}/{WEIGHTS}", "holds pre-mcore keys (model.language_model.encoder.layers), "
                                                      "whose fused QKV layout loraplex does not convert")
            check_module_shape(f"{label}/{WEIGHTS}", adapter.weights, sizes)
            ranks = _ranks(config.tensor_parallel, adapter.stage)
            a = _join([shards[r][adapter.in_key].array for r in ranks], 1 if adapter.module in _INPUT_SPLIT else 0)
            outs = [shards[r][adapter.out_key].array for r in ranks]
            for module, b in split_out(adapter.module, outs, sizes):
                pairs.append(LoraPair(adapter.layer, HF_MODULES[module], a, scaled(b, scale, bfloat16),
                                      bfloat16=bfloat16))
    return pairs


# ---- the archive -------------------------------------------------------------------------------------------

def read_shapes(path: Path) -> dict[str, Any]:
    return read_state_dict_shapes(path)


def read_values(path: Path) -> dict[str, Any]:
    loaded = read_state_dict(path)
    if not all(isinstance(value, TensorData) for value in loaded.values()):
        raise UnsafeCheckpoint("is not a flat mapping of names to tensors")
    return loaded


@contextmanager
def _opened(directory: Path, max_bytes: int, reader: Any) -> Iterator[tuple[str, Path, NemoConfig,
                                                                             dict[tuple[int, int], dict[str, Any]]]]:
    """The archive's label, path, config, and each (tp, pp) rank's checkpoint as `reader` reads it."""
    path = find_archive(directory)
    if path is None:
        raise Rejection(directory.name or str(directory), "must hold exactly one .nemo file")
    label = path.name
    try:
        archive = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError) as exc:
        raise Rejection(label, f"is not a readable tar archive ({exc})") from None
    with archive:
        try:
            members = {_normalized(m.name): m for m in safe_members(archive, max_bytes)}
        except UnsafeArchive as exc:
            raise Rejection(label, str(exc)) from None
        except tarfile.TarError as exc:
            raise Rejection(label, f"is a corrupt tar archive ({exc})") from None
        config_member = members.get(CONFIG)
        if config_member is None or not config_member.isfile():
            raise Rejection(label, f"must contain {CONFIG}")
        if config_member.size > MAX_CONFIG_BYTES:
            raise Rejection(label, f"{CONFIG} is {config_member.size} bytes, far above any real config")
        config = _read_config(archive.extractfile(config_member).read(), label)  # type: ignore[union-attr]
        wanted = _weights_members(label, config, members)
        shards = {}
        with tempfile.TemporaryDirectory(prefix="loraplex-nemo-") as scratch:
            for rank, name in wanted.items():
                checkpoint = Path(scratch) / "shard.ckpt"
                with archive.extractfile(members[name]) as source, checkpoint.open("wb") as target:  # type: ignore[union-attr]
                    while chunk := source.read(1024 * 1024):
                        target.write(chunk)
                try:
                    shards[rank] = reader(checkpoint)
                except UnsafeCheckpoint as exc:
                    raise Rejection(f"{label}/{name}", f"refused: {exc}") from None
        yield label, path, config, shards


def _weights_members(label: str, config: NemoConfig,
                     members: dict[str, tarfile.TarInfo]) -> dict[tuple[int, int], str]:
    """The checkpoint member of each (tp, pp) rank, as NeMo's save_to names them for this TP and PP size."""
    sharded = {}
    for name in members:
        match = _SHARD.match(name)
        if match:
            rank = (int(match["mp"]), 0) if match["mp"] is not None else (int(match["tp"]), int(match["pp"]))
            sharded[rank] = name
    found = ([WEIGHTS] if WEIGHTS in members else []) + sorted(sharded.values())
    tp, pp = config.tensor_parallel, config.pipeline_parallel
    if tp == 1 and pp == 1:
        expected = {(0, 0): WEIGHTS}
    elif pp == 1:
        expected = {(t, 0): f"mp_rank_{t:02d}/{WEIGHTS}" for t in range(tp)}
    else:
        expected = {(t, p): f"tp_rank_{t:02d}_pp_rank_{p:03d}/{WEIGHTS}" for t in range(tp) for p in range(pp)}
    missing = [name for name in expected.values() if name not in members]
    parallel = f"tensor_model_parallel_size={tp}, pipeline_model_parallel_size={pp}"
    if missing:
        has = f"; it holds {', '.join(found)}" if found else ""
        raise Rejection(label, f"lacks {missing[0]}, which NeMo writes for {parallel} in {CONFIG}{has}")
    extra = [name for name in found if name not in expected.values()]
    if extra:
        raise Rejection(label, f"holds {extra[0]}, which NeMo does not write for {parallel} in {CONFIG}")
    return expected


def _read_config(raw: bytes, label: str) -> NemoConfig:
    where = f"{label}/{CONFIG}"
    try:
        config: Any = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise Rejection(where, f"is not valid YAML ({exc})") from None
    peft = config.get("peft") if isinstance(config, dict) else None
    lora = peft.get("lora_tuning") if isinstance(peft, dict) else None
    if not isinstance(lora, dict):
        raise Rejection(where, "has no peft.lora_tuning section: not a LoRA adapter")
    scheme = peft.get("peft_scheme", "lora")
    if scheme != "lora":
        raise Rejection(where, f"peft.peft_scheme {scheme!r} is not lora")
    rank = lora.get("adapter_dim")
    if not _positive_int(rank):
        raise Rejection(where, f"peft.lora_tuning.adapter_dim={rank!r} must be an integer of at least 1")
    targets = lora.get("target_modules") or ["attention_qkv"]
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise Rejection(where, "peft.lora_tuning.target_modules must be a list of names")
    variant = lora.get("variant") or "nemo"
    if variant not in ("nemo", "canonical"):
        raise Rejection(where, f"peft.lora_tuning.variant {variant!r} is neither nemo nor canonical")
    alpha = lora.get("alpha")  # absent: NeMo before 2.0 did not scale, and later ones default it to adapter_dim
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, int | float) or alpha <= 0):
        raise Rejection(where, f"peft.lora_tuning.alpha={alpha!r} must be a positive number")
    if lora.get("weight_tying"):
        raise Rejection(where, "peft.lora_tuning.weight_tying shares one adapter across layers, which loraplex "
                               "does not read")
    sizes = {}
    for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
        value = config.get(key) or 1
        if not _positive_int(value):
            raise Rejection(where, f"{key}={value!r} must be an integer of at least 1")
        sizes[key] = value
    if (config.get("virtual_pipeline_model_parallel_size") or 1) != 1:
        raise Rejection(where, "virtual_pipeline_model_parallel_size is set: interleaved pipeline checkpoints "
                               "nest their weights per model chunk, which loraplex does not read")
    return NemoConfig(rank=rank, alpha=alpha, targets=tuple(targets),
                      tensor_parallel=sizes["tensor_model_parallel_size"],
                      pipeline_parallel=sizes["pipeline_model_parallel_size"], model=config)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


# ---- putting the shards back together ------------------------------------------------------------------------

def _ranks(tensor_parallel: int, stage: int) -> list[tuple[int, int]]:
    return [(t, stage) for t in range(tensor_parallel)]


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(value.array.shape if isinstance(value, TensorData) else value.shape)


def _plan(label: str, config: NemoConfig, shards: dict[tuple[int, int], dict[str, Any]]) -> list[_Adapter]:
    """Every adapter of every layer, checked whole: each TP rank holds the same keys, the shards' shapes fit
    together, and the rank is adapter_dim."""
    tp, pp = config.tensor_parallel, config.pipeline_parallel
    per_stage = None
    if pp > 1:
        layers = config.model.get("num_layers")
        if not _positive_int(layers):
            raise Rejection(f"{label}/{CONFIG}", f"lacks num_layers, needed to number the layers of "
                                                 f"pipeline_model_parallel_size={pp} stages")
        if layers % pp:
            raise Rejection(f"{label}/{CONFIG}", f"num_layers={layers} does not split evenly into "
                                                 f"pipeline_model_parallel_size={pp} stages, which NeMo never writes")
        per_stage = layers // pp
    adapters: dict[tuple[str, int], _Adapter] = {}
    for stage in range(pp):
        ranks = _ranks(tp, stage)
        first = shards[ranks[0]]
        where = _member(ranks[0], tp, pp)
        pairs: dict[tuple[str, int], dict[str, str]] = {}
        legacy: dict[tuple[str, int], bool] = {}
        for key in first:
            match = _KEY.search(key)
            if match is None:
                if "adapter" in key:
                    raise Rejection(f"{label}/{where}", f"holds {key}, which is not a NeMo LoRA adapter loraplex "
                                                        "reads (mixture-of-experts, q/kv or other adapters)")
                continue
            module = _module_of(match)
            if module is None:
                raise Rejection(f"{label}/{where}", f"holds {key}, which is not a NeMo LoRA adapter loraplex reads "
                                                    "(mixture-of-experts, q/kv or other adapters)")
            local = int(match["layer"])
            if per_stage is not None and local >= per_stage:
                raise Rejection(f"{label}/{where}", f"holds layer {local}, but a stage of {per_stage} layers numbers "
                                                    f"them 0 to {per_stage - 1}")
            layer = local + (per_stage or 0) * stage
            pairs.setdefault((module, layer), {})[match["side"]] = key
            legacy[(module, layer)] = "language_model.encoder" in key
        for (module, layer), sides in sorted(pairs.items(), key=lambda item: (item[0][1], item[0][0])):
            if set(sides) != {"in", "out"}:
                raise Rejection(f"{label}/{where}", f"layer {layer} {module} lacks a linear_in/linear_out pair")
            pieces = {}
            for side, key in sides.items():
                for rank in ranks:
                    if key not in shards[rank]:
                        raise Rejection(f"{label}/{_member(rank, tp, pp)}", f"lacks {key}, which "
                                                                             f"{_member(ranks[0], tp, pp)} holds")
                shapes = [_shape(shards[rank][key]) for rank in ranks]
                if any(len(shape) != 2 for shape in shapes):
                    raise Rejection(f"{label}/{where}", f"layer {layer} {module} has a linear_{side} that is not 2-D")
                split = 1 if side == "in" and module in _INPUT_SPLIT else 0
                kept = {shape[1 - split] for shape in shapes}
                if len(kept) != 1:
                    raise Rejection(f"{label}/{where}", f"layer {layer} {module} linear_{side} shards have shapes "
                                                        f"{', '.join(str(list(s)) for s in shapes)}, which do not "
                                                        "fit together")
                whole = [0, 0]
                whole[split], whole[1 - split] = sum(shape[split] for shape in shapes), kept.pop()
                pieces[side] = tuple(whole)
            (in_rank, in_features), (out_features, out_rank) = pieces["in"], pieces["out"]
            if in_rank != config.rank or out_rank != config.rank:
                raise Rejection(f"{label}/{where}", f"layer {layer} {module} has rank {in_rank}/{out_rank} but "
                                                    f"{CONFIG} says adapter_dim={config.rank}")
            adapters[(module, layer)] = _Adapter(
                module, layer, stage, sides["in"], sides["out"], legacy[(module, layer)],
                LoraWeights(module, layer, config.rank, in_features, out_features))
        for rank in ranks[1:]:
            extra = sorted(set(shards[rank]) - set(first))
            if extra:
                raise Rejection(f"{label}/{_member(rank, tp, pp)}", f"holds {extra[0]}, which "
                                                                     f"{_member(ranks[0], tp, pp)} lacks")
    if not adapters:
        raise Rejection(f"{label}/{WEIGHTS}", "holds no LoRA adapter weights (…adapter.linear_in/out.weight)")
    return [adapters[key] for key in sorted(adapters, key=lambda key: (key[1], key[0]))]


def _module_of(match: re.Match[str]) -> str | None:
    adapter, part, block = match["adapter"], match["part"], match["block"]
    module = ADAPTER_MODULES.get(adapter) if part is None else UNFUSED_MODULES.get((adapter, part))
    attention = module in ("attention_qkv", "attention_dense", "q_proj", "k_proj", "v_proj")
    if module is None or attention != (block == "self_attention"):
        return None
    return module


def _member(rank: tuple[int, int], tp: int, pp: int) -> str:
    if tp == 1 and pp == 1:
        return WEIGHTS
    if pp == 1:
        return f"mp_rank_{rank[0]:02d}/{WEIGHTS}"
    return f"tp_rank_{rank[0]:02d}_pp_rank_{rank[1]:03d}/{WEIGHTS}"


# ---- conversion ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Sizes:
    hidden: int
    heads: int
    groups: int  # the KV heads
    head_dim: int
    ffn: int


def model_sizes(where: str, model: dict[str, Any], base_config: dict[str, Any]) -> _Sizes:
    """The base model's sizes, which split fused QKV per query group; where the adapter's model config (`where`,
    NeMo's names) states the same size it must agree."""
    try:
        hidden, heads = int(base_config["hidden_size"]), int(base_config["num_attention_heads"])
        groups = int(base_config.get("num_key_value_heads") or heads)
        head_dim = int(base_config.get("head_dim") or hidden // heads)
        sizes = _Sizes(hidden, heads, groups, head_dim, int(base_config["intermediate_size"]))
        layers = int(base_config["num_hidden_layers"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise Rejection("config.json", f"of the base model lacks the sizes needed to split NeMo's fused "
                                       f"adapters ({exc})") from None
    stated_heads = model.get("num_attention_heads")
    pairs = [
        ("hidden_size", "hidden_size", hidden), ("num_attention_heads", "num_attention_heads", heads),
        ("num_query_groups", "num_key_value_heads", groups), ("kv_channels", "head_dim", head_dim),
        ("ffn_hidden_size", "intermediate_size", sizes.ffn), ("num_layers", "num_hidden_layers", layers),
    ]
    for nemo_key, hf_key, value in pairs:
        stated = model.get(nemo_key)
        if stated is None and nemo_key == "num_query_groups":
            stated = stated_heads
        if stated is None and nemo_key == "kv_channels" and model.get("hidden_size") and stated_heads:
            stated = model["hidden_size"] // stated_heads
        if stated is not None and stated != value:
            raise Rejection(where, f"says {nemo_key}={stated} but the base model's config.json has {hf_key}="
                                   f"{value}; the adapter was trained for another base model")
    if heads % groups:
        raise Rejection("config.json", f"of the base model has {heads} attention heads, not a multiple of its "
                                       f"{groups} key/value heads")
    return sizes


def check_module_shape(where: str, weights: LoraWeights, sizes: _Sizes) -> None:
    q, kv = sizes.heads * sizes.head_dim, sizes.groups * sizes.head_dim
    expected = {
        "attention_qkv": (sizes.hidden, q + 2 * kv), "attention_dense": (q, sizes.hidden),
        "mlp_fc1": (sizes.hidden, 2 * sizes.ffn), "mlp_fc2": (sizes.ffn, sizes.hidden),
        "q_proj": (sizes.hidden, q), "k_proj": (sizes.hidden, kv), "v_proj": (sizes.hidden, kv),
        "gate_proj": (sizes.hidden, sizes.ffn), "up_proj": (sizes.hidden, sizes.ffn),
    }[weights.module]
    if (weights.in_features, weights.out_features) != expected:
        raise Rejection(where, f"layer {weights.layer} {weights.module} maps {weights.in_features}→"
                               f"{weights.out_features} but the base model's config.json gives "
                               f"{expected[0]}→{expected[1]}; the adapter was trained for another base model")


def _join(shards: list[np.ndarray], axis: int) -> np.ndarray:
    return np.ascontiguousarray(np.concatenate(shards, axis=axis))


def split_out(module: str, outs: list[np.ndarray], sizes: _Sizes) -> list[tuple[str, np.ndarray]]:
    """linear_out, whole, as the B of each Hugging Face module it adapts."""
    if module == "mlp_fc1":
        # Each TP rank holds [gate_t; up_t] of its slice of the FFN, so the halves are taken per rank.
        gate = _join([out[: out.shape[0] // 2] for out in outs], 0)
        up = _join([out[out.shape[0] // 2:] for out in outs], 0)
        return [("gate_proj", gate), ("up_proj", up)]
    b = _join(outs, 0)
    if module != "attention_qkv":
        return [(module, b)]
    # Megatron's fused QKV runs per query group: that group's query heads, then its key head, then its value head.
    per_group, d, rank = sizes.heads // sizes.groups, sizes.head_dim, b.shape[1]
    grouped = b.reshape(sizes.groups, per_group + 2, d, rank)
    return [
        ("q_proj", np.ascontiguousarray(grouped[:, :per_group].reshape(-1, rank))),
        ("k_proj", np.ascontiguousarray(grouped[:, per_group].reshape(-1, rank))),
        ("v_proj", np.ascontiguousarray(grouped[:, per_group + 1].reshape(-1, rank))),
    ]


def scaled(b: np.ndarray, scale: float, bfloat16: bool) -> np.ndarray:
    if scale == 1.0:
        return b
    if not bfloat16:
        return (b.astype(np.float32) * np.float32(scale)).astype(b.dtype)
    return _float32_to_bfloat16(bfloat16_to_float32(b) * np.float32(scale))


def _float32_to_bfloat16(values: np.ndarray) -> np.ndarray:
    """Round to nearest even, as torch does; exact whenever the scale is a power of two."""
    bits = values.astype("<f4").view("<u4").astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")
    return np.where(np.isnan(values), np.uint16(0x7FC0), rounded).astype("<u2")
