"""AWS Neuron NeuronX Distributed (NxD) LoRA checkpoints, as `nxd.save_checkpoint` and `LoraModel.save_lora` write
them (docs/formats/nxd.md): one torch.save or xser file per tensor-parallel rank, or one adapter_model.pt, holding
the adapter's tensors under NxD's module names, with the LoRA config inside (`lora_config`) or in an
adapter_config.json that is not a PEFT config. Files are found and loaded by nxd_files; here they are checked,
reassembled across ranks and split into Hugging Face Llama modules for `loraplex convert`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from loraplex.api.types import AdapterFormat
from loraplex.formats.nxd_files import (
    CONFIG,
    CONFIG_KEY,
    MAX_CONFIG_BYTES,
    checkpoint_bytes,
    config_file,
    is_nxd_config,
    lightning_files,
    load_rank,
    locate,
    rank_files,
    single_files,
)
from loraplex.formats.peft_writer import LoraPair, bfloat16_to_float32
from loraplex.formats.report import AdapterReport, LoraWeights, Rejection, read_json_object
from loraplex.formats.safe_pickle.restricted import TensorData

FORMAT = AdapterFormat.NXD
_KEY = re.compile(r"^(?:.*\.)?layers\.(?P<layer>\d+)\.(?P<block>self_attn|mlp)\.(?P<module>\w+)\."
                  r"lora_(?P<side>A|B)\.(?P<part>weight(?:_q|_k|_v|_qkv)?)$")
# NxD modules that split their output rows across tp ranks (lora_A whole on each rank), and those that split
# their input columns (lora_B whole on each rank).
COLUMN = {"q_proj", "k_proj", "v_proj", "qkv_proj", "gate_proj", "up_proj", "gate_up_proj"}
ROW = {"o_proj", "down_proj"}
_BLOCK = {"self_attn": {"q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj"},
          "mlp": {"gate_proj", "up_proj", "gate_up_proj", "down_proj"}}
_FLOAT_DTYPES = {"float32", "float16", "bfloat16"}
# The lora_B tensors a qkv_proj may have: GQAQKVColumnParallelLinear's three or fused one, or a stride-3 column.
_QKV_SIDES = ({"A", "weight_q", "weight_k", "weight_v"}, {"A", "weight_qkv"}, {"A", "weight"})


def is_nxd(directory: Path) -> bool:
    """Rank files (nxd.save_checkpoint's or Lightning's) or adapter_model.pt anywhere NxD puts them, or NxD's own
    adapter_config.json (which has lora_rank and no peft_type, so it must not be taken for a PEFT adapter)."""
    if rank_files(directory) or lightning_files(directory) or single_files(directory):
        return True
    return any(is_nxd_config(path) for path in (directory / CONFIG, directory / "lora_adapter" / CONFIG))


@dataclasses.dataclass(frozen=True)
class _Checkpoint:
    ranks: tuple[dict[str, TensorData], ...]  # the tensors of each tp rank, in rank order
    labels: tuple[str, ...]  # each rank's file, relative to the folder given
    config: dict[str, Any]
    config_source: str  # the file the config was read from, for messages
    size_bytes: int

    @property
    def gathered(self) -> bool:
        """merge_sharded_lora=True: every rank wrote the same all-gathered tensors (docs §4.2)."""
        first = self.ranks[0]
        return len(self.ranks) > 1 and all(
            rank.keys() == first.keys() and all(_same(rank[key], first[key]) for key in first)
            for rank in self.ranks[1:])


def _same(x: TensorData, y: TensorData) -> bool:
    return x.dtype == y.dtype and np.array_equal(x.array, y.array)


def _check_config(config: dict[str, Any], source: str) -> None:
    rank = config.get("lora_rank", config.get("r"))
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise Rejection(source, f"lora_rank must be a positive integer; got {rank!r}")
    if "r" in config and config["r"] != rank:
        raise Rejection(source, f"r={config['r']!r} differs from lora_rank={rank}")
    alpha = config.get("lora_alpha")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise Rejection(source, f"lora_alpha must be a number; got {alpha!r}")
    if not isinstance(config.get("use_rslora", False), bool):
        raise Rejection(source, f"use_rslora must be true or false; got {config['use_rslora']!r}")
    if config.get("modules_to_save"):
        raise Rejection(source, f"modules_to_save {config['modules_to_save']!r} saves full weight copies, which "
                                "multi-LoRA runtimes do not load per adapter")


def _read(directory: Path) -> _Checkpoint:
    files, labels = locate(directory)
    ranks = [load_rank(path, label) for path, label in zip(files, labels, strict=True)]
    configs = [rank.pop(CONFIG_KEY, None) for rank in ranks]
    if ranks[0] and not any("lora_" in key for key in ranks[0]):
        raise Rejection(labels[0], f"holds no LoRA tensor: none of its {len(ranks[0])} keys (such as "
                                   f"{next(iter(ranks[0]))}) has lora_ in its name, so the model was saved without "
                                   "its LoRA layers")
    if configs[0] is not None:
        config, source = configs[0], f"{labels[0]}[{CONFIG_KEY}]"
        if not isinstance(config, dict):
            raise Rejection(source, "must be a dict of LoRA settings")
        config = {key: sorted(value) if isinstance(value, (set, frozenset)) else value for key, value in config.items()}
    else:
        path = config_file(directory, files[0])
        if path is None:
            raise Rejection(labels[0], f"has no {CONFIG_KEY} entry and no {CONFIG} was found beside it or in a "
                                       f"lora_adapter/ folder above it (NxD writes it to lora_adapter/{CONFIG} in the "
                                       "training's working directory: copy it next to the checkpoint)")
        source = str(path.relative_to(directory))
        config = read_json_object(path, source, MAX_CONFIG_BYTES)
    _check_config(config, source)
    for rank, label in zip(ranks, labels, strict=True):
        for key, value in rank.items():
            if not isinstance(value, TensorData):
                raise Rejection(label, f"holds {key!r}, which is neither a tensor nor NxD's {CONFIG_KEY}")
            match = _KEY.match(key)
            if match is None or match["module"] not in _BLOCK[match["block"]]:
                base = "base_layer" in key or "lora_" not in key
                what = ("a full copy of a base weight (save_lora_base=True)" if base
                        else "not a LoRA matrix of a Llama attention or MLP projection")
                raise Rejection(label, f"holds {key}, {what}; only adapter-only checkpoints convert")
            if match["part"] != "weight" and (match["side"] == "A" or match["module"] != "qkv_proj"):
                raise Rejection(label, f"holds {key}, a tensor name NxD's LoRA layers never write")
            if value.dtype not in _FLOAT_DTYPES or value.array.ndim != 2:
                raise Rejection(label, f"{key} is a {value.array.ndim}-d {value.dtype} tensor, not a float matrix")
    dtypes = {value.dtype for rank in ranks for value in rank.values()}
    if len(dtypes) > 1:
        raise Rejection(labels[0], f"mixes tensor dtypes ({', '.join(sorted(dtypes))})")
    if not ranks[0]:
        raise Rejection(labels[0], "holds no LoRA tensors")
    for rank, label in zip(ranks[1:], labels[1:], strict=True):
        if rank.keys() != ranks[0].keys():
            differing = sorted(rank.keys() ^ ranks[0].keys())
            raise Rejection(label, f"holds other tensors than {labels[0]} (for example {differing[0]}); the rank "
                                   "files come from different saves")
    return _Checkpoint(ranks=tuple(ranks), labels=tuple(labels), config=config, config_source=source,
                       size_bytes=sum(checkpoint_bytes(path) for path in files))


def _grouped(checkpoint: _Checkpoint) -> dict[tuple[int, str, str], dict[str, str]]:
    """(layer, block, NxD module) → {"A" or the B part name: state-dict key}."""
    groups: dict[tuple[int, str, str], dict[str, str]] = {}
    for key in checkpoint.ranks[0]:
        match = _KEY.match(key)
        assert match is not None
        side = "A" if match["side"] == "A" else match["part"]
        groups.setdefault((int(match["layer"]), match["block"], match["module"]), {})[side] = key
    for (layer, block, module), sides in groups.items():
        if "A" not in sides or len(sides) == 1:
            raise Rejection(checkpoint.labels[0], f"layers.{layer}.{block}.{module} lacks its lora_A or lora_B")
        if module == "qkv_proj" and set(sides) not in _QKV_SIDES:
            raise Rejection(checkpoint.labels[0], f"layers.{layer}.{block}.qkv_proj has lora_B parts "
                                                  f"{sorted(set(sides) - {'A'})}; NxD writes weight_q, weight_k and "
                                                  "weight_v, or one weight_qkv")
    return groups


def inspect(directory: Path) -> AdapterReport:
    """What the checkpoint holds, under NxD's module names; sizes are the assembled ones where they do not
    depend on the base model (fused attention B rows do, through K/V replication, so they read -1)."""
    checkpoint = _read(directory)
    rank = checkpoint.config.get("lora_rank", checkpoint.config.get("r"))
    entries = []
    for (layer, _, module), sides in sorted(_grouped(checkpoint).items()):
        a = [ranks[sides["A"]].array for ranks in checkpoint.ranks]
        b_key = sides.get("weight", "")
        if module in ROW:
            n_in = a[0].shape[1] if checkpoint.gathered else sum(x.shape[1] for x in a)
            n_out = checkpoint.ranks[0][b_key].array.shape[0]
        elif b_key and module != "qkv_proj":
            b = [ranks[b_key].array for ranks in checkpoint.ranks]
            n_in, n_out = a[0].shape[1], b[0].shape[0] if checkpoint.gathered else sum(x.shape[0] for x in b)
        else:
            n_in, n_out = -1, -1
        entries.append(LoraWeights(module, layer, int(a[0].shape[0]), int(n_in), int(n_out)))
    return AdapterReport(
        format=FORMAT, rank=int(rank), rank_source=f"{checkpoint.config_source}: lora_rank={rank}",
        target_modules=tuple(sorted({entry.module for entry in entries})), weights=tuple(entries),
        size_bytes=checkpoint.size_bytes, files=checkpoint.labels,
    )


def scale(config: dict[str, Any]) -> float:
    rank = config.get("lora_rank", config.get("r"))
    return config["lora_alpha"] / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _scaled(b: np.ndarray, factor: float, dtype: str) -> np.ndarray:
    """B·factor in B's own dtype; bfloat16 bits are rounded to nearest even, as torch rounds."""
    if factor == 1:
        return b
    if dtype != "bfloat16":
        return (b.astype(np.float32) * np.float32(factor)).astype(b.dtype)
    bits = (bfloat16_to_float32(b) * np.float32(factor)).view("<u4")
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")


class _Assembler:
    """Whole matrices from per-rank slices (docs §4.1), for one checkpoint and one base model."""

    def __init__(self, checkpoint: _Checkpoint, base_config: dict[str, Any]):
        from loraplex.formats.rules import module_shapes

        self.checkpoint, self.tp = checkpoint, len(checkpoint.ranks)
        self.gathered = checkpoint.gathered
        self.shapes = module_shapes(base_config)
        heads = int(base_config["num_attention_heads"])
        self.kv_heads = int(base_config.get("num_key_value_heads") or heads)
        self.head_dim = int(base_config.get("head_dim") or int(base_config["hidden_size"]) // heads)

    def slices(self, key: str, dim: int) -> list[np.ndarray]:
        """Each rank's slice; a gathered file's full tensor is cut back into the rank slices it was joined from."""
        if not self.gathered:
            return [rank[key].array for rank in self.checkpoint.ranks]
        whole = self.checkpoint.ranks[0][key].array
        if whole.shape[dim] % self.tp:
            raise Rejection(self.checkpoint.labels[0], f"{key} has {whole.shape[dim]} {('rows', 'columns')[dim]}, "
                                                       f"which do not split over its {self.tp} tp ranks")
        return np.split(whole, self.tp, axis=dim)

    def replicated(self, key: str) -> np.ndarray:
        first = self.checkpoint.ranks[0][key]
        for rank, label in zip(self.checkpoint.ranks[1:], self.checkpoint.labels[1:], strict=True):
            if not _same(rank[key], first):
                raise Rejection(label, f"{key} differs from {self.checkpoint.labels[0]}'s, though every tp rank "
                                       "holds the whole of it; the rank files come from different saves")
        return first.array

    def split_rows(self, key: str, parts: list[tuple[str, int]]) -> dict[str, np.ndarray]:
        """Rows of a column-parallel B: each rank's slice is its share of every part, in order."""
        slices = self.slices(key, 0)
        total = sum(size for _, size in parts)
        stored = sum(s.shape[0] for s in slices)
        if stored != total or any(size % self.tp for _, size in parts) or len({s.shape[0] for s in slices}) > 1:
            names = " + ".join(f"{name} {size}" for name, size in parts)
            raise Rejection(self.checkpoint.labels[0],
                            f"{key}: its {self.tp} tp rank file(s) hold {stored} rows, but the base model's "
                            f"{names} need {total}; a tp rank file is missing or the adapter was trained for "
                            "another base model")
        out: dict[str, list[np.ndarray]] = {name: [] for name, _ in parts}
        for piece in slices:
            start = 0
            for name, size in parts:
                out[name].append(piece[start:start + size // self.tp])
                start += size // self.tp
        return {name: np.concatenate(pieces) for name, pieces in out.items()}

    def kv_rows(self, key: str, pieces: list[np.ndarray]) -> np.ndarray:
        """K or V rows with the GQA layer's replicas (kv_size_multiplier m) removed."""
        kv = self.kv_heads * self.head_dim
        whole = np.concatenate(pieces)
        if whole.shape[0] % kv:
            raise Rejection(self.checkpoint.labels[0],
                            f"{key}: its tp rank files hold {whole.shape[0]} K/V rows, not a multiple of the base "
                            f"model's {kv}; a tp rank file is missing or the adapter was trained for another base "
                            "model")
        m = whole.shape[0] // kv
        if m > 1 and self.kv_heads > 1:
            raise Rejection(self.checkpoint.labels[0],
                            f"{key}: K/V heads were replicated {m} times over {self.tp} tp ranks with "
                            f"{self.kv_heads} K/V heads; NxD then reorders the Q heads in a hardware-dependent "
                            "way (trn1 or trn2) that the checkpoint does not record, so it cannot be converted")
        replicas = np.split(whole, m)
        if any(not np.array_equal(replica, replicas[0]) for replica in replicas[1:]):
            raise Rejection(self.checkpoint.labels[0], f"{key}: the {m} replicas of the K/V rows differ; the rank "
                                                       "files come from different saves")
        return replicas[0]

    def gqa(self, sides: dict[str, str]) -> dict[str, np.ndarray]:
        q, kv = self.shapes["q_proj"][1], self.shapes["k_proj"][1]
        if "weight_qkv" in sides:
            key = sides["weight_qkv"]
            slices = self.slices(key, 0)
            local = slices[0].shape[0]
            kv_local = (local - q // self.tp) / 2
            if q % self.tp or kv_local < 1 or kv_local != int(kv_local) or len({s.shape[0] for s in slices}) > 1:
                raise self._q_rows(key, local * self.tp, q + 2 * kv)
            kv_local = int(kv_local)
            cut = [(s[:q // self.tp], s[q // self.tp:q // self.tp + kv_local], s[q // self.tp + kv_local:])
                   for s in slices]
            b_q = np.concatenate([c[0] for c in cut])
            return {"q_proj": b_q, "k_proj": self.kv_rows(key, [c[1] for c in cut]),
                    "v_proj": self.kv_rows(key, [c[2] for c in cut])}
        b_q = np.concatenate(self.slices(sides["weight_q"], 0))
        if b_q.shape[0] != q:
            raise self._q_rows(sides["weight_q"], b_q.shape[0], q)
        return {"q_proj": b_q, "k_proj": self.kv_rows(sides["weight_k"], self.slices(sides["weight_k"], 0)),
                "v_proj": self.kv_rows(sides["weight_v"], self.slices(sides["weight_v"], 0))}

    def _q_rows(self, key: str, stored: int, needed: int) -> Rejection:
        if self.gathered and stored < needed:
            return Rejection(self.checkpoint.labels[0],
                             f"{key} holds {stored} of the base model's {needed} rows: NxD's merge_sharded_lora "
                             "gather keeps only the first 1/m of them when K/V heads are replicated "
                             "(kv_size_multiplier m > 1), so the adapter is lost; save again with "
                             "merge_sharded_lora=False")
        return Rejection(self.checkpoint.labels[0],
                         f"{key}: its {self.tp} tp rank file(s) hold {stored} rows, but the base model needs {needed}; "
                         "a tp rank file is missing or the adapter was trained for another base model")


def read_pairs(directory: Path, base_config: dict[str, Any]) -> list[LoraPair]:
    """Hugging Face Llama LoRA pairs, scale multiplied into B, dtype kept. The base model's config gives the
    sizes that split fused q/k/v and gate/up rows and undo K/V replication."""
    checkpoint = _read(directory)
    assembler = _Assembler(checkpoint, base_config)
    rank = checkpoint.config.get("lora_rank", checkpoint.config.get("r"))
    factor = scale(checkpoint.config)
    dtype = next(iter(checkpoint.ranks[0].values())).dtype
    intermediate = assembler.shapes["gate_proj"][1]
    q, kv = assembler.shapes["q_proj"][1], assembler.shapes["k_proj"][1]
    pairs: list[LoraPair] = []
    for (layer, block, module), sides in sorted(_grouped(checkpoint).items()):
        if module in ROW:
            a = np.concatenate(assembler.slices(sides["A"], 1), axis=1)
            split = {module: assembler.replicated(sides["weight"])}
        else:
            a = assembler.replicated(sides["A"])
            if module == "qkv_proj" and "weight" not in sides:
                split = assembler.gqa(sides)
            else:
                parts = {"qkv_proj": [("q_proj", q), ("k_proj", kv), ("v_proj", kv)],
                         "gate_up_proj": [("gate_proj", intermediate), ("up_proj", intermediate)]}.get(
                    module, [(module, assembler.shapes[module][1])])
                split = assembler.split_rows(sides["weight"], parts)
        if a.shape[0] != rank:
            raise Rejection(checkpoint.labels[0], f"{sides['A']} has rank {a.shape[0]}, but {checkpoint.config_source} "
                                                  f"gives lora_rank={rank}")
        for name, b in split.items():
            expected = assembler.shapes[name]
            if (a.shape[1], b.shape[0]) != expected:
                raise Rejection(checkpoint.labels[0],
                                f"{name} of layer {layer} assembles to {a.shape[1]}→{b.shape[0]}, but the base "
                                f"model's config.json gives {expected[0]}→{expected[1]}; a tp rank file is missing or "
                                "the adapter was trained for another base model")
            pairs.append(LoraPair(layer, f"{block}.{name}", np.ascontiguousarray(a),
                                  np.ascontiguousarray(_scaled(b, factor, dtype)), bfloat16=dtype == "bfloat16"))
    seen: set[tuple[int, str]] = set()
    for pair in pairs:
        if (pair.layer, pair.module) in seen:
            raise Rejection(checkpoint.labels[0], f"adapts {pair.module} of layer {pair.layer} twice")
        seen.add((pair.layer, pair.module))
    return pairs
