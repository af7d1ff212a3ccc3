"""NeMo 2.0 LoRA checkpoints built from a Hugging Face PEFT adapter as NeMo and Megatron write them
(docs/formats/nemo.md §4): weights/ is a real torch distributed checkpoint written by torch's own planner and
FileSystemWriter, one simulated rank per tensor-parallel rank, each chunk at its global offset as Megatron's
CheckpointableShardedTensor hands it to DCP; context/ holds model.yaml and an io.json that must never be loaded."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open
from torch.distributed.checkpoint import DefaultSavePlanner, FileSystemWriter
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

from tests.producers import PEFT_KEY

MEGATRON_TORCH = "megatron.core.dist_checkpointing.strategies.torch"
# Proof that context/io.json is never built: fiddle would import and call this.
DANGEROUS_IO = {"root": {"type": {"type": "pyref", "module": "os", "name": "system"},
                         "arguments": {"command": "touch /tmp/loraplex-io-json-was-executed"}}}
# A shard: its global offset and its data, a leading axis of 1 for the stacked layer.
Shard = tuple[tuple[int, ...], torch.Tensor]


def make_nemo2_from_peft(adapter: Path, out: Path, base_config: dict, tp: int = 1, canonical: bool = False,
                         dtype: torch.dtype = torch.float32, megatron_metadata: bool = False) -> Path:
    """A NeMo 2 LoRA (or CanonicalLoRA) checkpoint of `adapter`, trained with tensor parallelism `tp`:

    - keys module.decoder.layers.<...>.adapter[.adapter_q...].linear_in/linear_out.weight, stacked over layers;
    - per TP rank the adapter's shards as ParallelLinearAdapter holds them (linear_in of linear_qkv and
      linear_fc1 split by rank rows, of linear_proj and linear_fc2 by input columns; linear_out by rows), and
      every linear_out under linear_fc1 saved through the swiglu factory: rank t's halves at fragments t and
      T+t of 2T;
    - fused linear_qkv B interleaved per query group, fused linear_fc1 B as [gate; up]; B unscaled, alpha/dim in
      model.yaml.

    `megatron_metadata` pickles .metadata as Megatron core 0.15 does: its MCoreMetadata, with mcore_data and
    the gathered all_local_plans. The adapter must share lora_A across q/k/v and gate/up unless `canonical`."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    layers = base_config["num_hidden_layers"]
    stacked = _stacked(_global_adapters(_factors(adapter), base_config, canonical), layers)
    ranks = [_rank_shards(stacked, t, tp, dtype) for t in range(tp)]
    _save_dcp(ranks, {key: (tuple(value.shape), dtype) for key, value in stacked.items()}, out / "weights",
              megatron_metadata)
    weights = out / "weights"
    (weights / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                                                       "common_backend": "torch", "common_backend_version": 1}))
    torch.save({}, weights / "common.pt")
    (weights / "adapter_metadata.json").write_text(json.dumps({"model_ckpt_path": "/checkpoints/base/llama"}))
    context = out / "context"
    context.mkdir(parents=True, exist_ok=True)
    (context / "io.json").write_text(json.dumps(DANGEROUS_IO))
    (context / "model.yaml").write_text(yaml.safe_dump(_model_yaml(config, base_config, canonical, dtype)))
    return out


def _factors(adapter: Path) -> dict[int, dict[str, dict[str, torch.Tensor]]]:
    factors: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
    with safe_open(adapter / "adapter_model.safetensors", "pt") as file:
        for key in file.keys():
            match = PEFT_KEY.match(key)
            if match is not None:
                factors.setdefault(int(match["layer"]), {}).setdefault(match["module"], {})[match["side"]] = \
                    file.get_tensor(key)
    return factors


def _global_adapters(factors: dict[int, dict[str, dict[str, torch.Tensor]]], base: dict,
                     canonical: bool) -> dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """layer -> adapter path under module.decoder.layers -> (linear_in, linear_out), whole."""
    heads, groups = base["num_attention_heads"], base.get("num_key_value_heads") or base["num_attention_heads"]
    d, per_group = base.get("head_dim") or base["hidden_size"] // heads, heads // groups
    found: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for layer, modules in factors.items():
        pairs = found.setdefault(layer, {})
        pairs["self_attention.linear_proj.adapter"] = (modules["o_proj"]["A"], modules["o_proj"]["B"])
        pairs["mlp.linear_fc2.adapter"] = (modules["down_proj"]["A"], modules["down_proj"]["B"])
        if canonical:
            for part in ("q", "k", "v"):
                pairs[f"self_attention.linear_qkv.adapter.adapter_{part}"] = (
                    modules[f"{part}_proj"]["A"], modules[f"{part}_proj"]["B"])
            for part in ("gate", "up"):
                pairs[f"mlp.linear_fc1.adapter.adapter_{part}"] = (
                    modules[f"{part}_proj"]["A"], modules[f"{part}_proj"]["B"])
            continue
        q, k, v = (modules[m] for m in ("q_proj", "k_proj", "v_proj"))
        assert torch.equal(q["A"], k["A"]) and torch.equal(q["A"], v["A"]), "fused QKV needs one shared lora_A"
        blocks = []
        for g in range(groups):
            blocks += [q["B"][g * per_group * d:(g + 1) * per_group * d], k["B"][g * d:(g + 1) * d],
                       v["B"][g * d:(g + 1) * d]]
        pairs["self_attention.linear_qkv.adapter"] = (q["A"], torch.cat(blocks))
        gate, up = modules["gate_proj"], modules["up_proj"]
        assert torch.equal(gate["A"], up["A"]), "fused fc1 needs one shared lora_A"
        pairs["mlp.linear_fc1.adapter"] = (gate["A"], torch.cat([gate["B"], up["B"]]))
    return found


def _stacked(adapters: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]], layers: int) -> dict[str, torch.Tensor]:
    """Global key -> [L, ...] tensor, as TransformerBlock.sharded_state_dict stacks homogeneous layers."""
    paths = adapters[0].keys()
    stacked = {}
    for path in paths:
        for side, index in (("in", 0), ("out", 1)):
            stacked[f"module.decoder.layers.{path}.linear_{side}.weight"] = torch.stack(
                [adapters[layer][path][index] for layer in range(layers)])
    return stacked


def _rank_shards(stacked: dict[str, torch.Tensor], t: int, tp: int, dtype: torch.dtype) -> dict[str, list[Shard]]:
    """What TP rank t saves: per key its shards of every layer, with their global offsets."""
    shards: dict[str, list[Shard]] = {}
    for key, whole in stacked.items():
        whole = whole.to(dtype)
        rows, cols = whole.shape[1:]
        for layer in range(whole.shape[0]):
            matrix = whole[layer]
            if key.endswith("linear_in.weight") and (".linear_proj." in key or ".linear_fc2." in key):
                width = cols // tp  # RowParallelLinear: the rank's slice of the input
                pieces = [((layer, 0, t * width), matrix[:, t * width:(t + 1) * width])]
            elif key.endswith("linear_out.weight") and ".linear_fc1." in key:
                local = matrix.chunk(tp)[t] if ".adapter_" in key else torch.cat(
                    [half.chunk(tp)[t] for half in matrix.chunk(2)])  # the rank-local output is [gate_t; up_t]
                half = local.shape[0] // 2
                pieces = [((layer, t * half, 0), local[:half]), ((layer, (tp + t) * half, 0), local[half:])]
            else:
                height = rows // tp
                pieces = [((layer, t * height, 0), matrix[t * height:(t + 1) * height])]
            shards.setdefault(key, []).extend((offset, piece.clone().unsqueeze(0)) for offset, piece in pieces)
    return shards


class _RankPlanner(DefaultSavePlanner):
    """One rank's shards as SHARD write items with their global offsets and the tensor's global size."""

    def __init__(self, shards: dict[str, list[Shard]], shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.shards, self.shapes = shards, shapes

    def create_local_plan(self) -> SavePlan:
        items = []
        for key, pieces in self.shards.items():
            for index, (offset, data) in enumerate(pieces):
                items.append(WriteItem(
                    index=MetadataIndex(key, offset, index), type=WriteItemType.SHARD,
                    tensor_data=TensorWriteData(
                        chunk=ChunkStorageMetadata(offsets=torch.Size(offset), sizes=data.size()),
                        properties=TensorProperties.create_from_tensor(data), size=torch.Size(self.shapes[key][0]))))
        self.plan = SavePlan(items)
        return self.plan

    def lookup_object(self, index: MetadataIndex) -> Any:
        return next(data for offset, data in self.shards[index.fqn] if torch.Size(offset) == index.offset)


def _save_dcp(ranks: list[dict[str, list[Shard]]], shapes: dict[str, tuple[tuple[int, ...], torch.dtype]],
              path: Path, megatron_metadata: bool) -> None:
    """torch.distributed.checkpoint's save protocol, run for every rank in this one process: local plans, the
    coordinator's global plan and metadata, each rank's writes (its own __<rank>_<n>.distcp), then .metadata."""
    writer = FileSystemWriter(path, thread_count=1)
    writer.set_up_storage_writer(is_coordinator=True)
    planners = [_RankPlanner(shards, shapes) for shards in ranks]
    local_plans = []
    for rank, planner in enumerate(planners):
        planner.set_up_planner({key: None for key in ranks[rank]}, is_coordinator=rank == 0)
        local_plans.append(writer.prepare_local_plan(planner.create_local_plan()))
    global_plans, metadata = planners[0].create_global_plan(local_plans)
    global_plans = writer.prepare_global_plan(global_plans)
    results = []
    for planner, plan in zip(planners, global_plans, strict=True):
        future = writer.write_data(planner.finish_plan(plan), planner)
        results.append(future.wait())
    if megatron_metadata:
        with _megatron_classes() as (mcore_metadata, mcore_plan):
            metadata = mcore_metadata(mcore_data={key: {"nd_reformulated_orig_global_shape": None} for key in shapes},
                                      **vars(metadata))
            metadata.all_local_plans = [mcore_plan(items=plan.items, mcore_data={}) for plan in local_plans]
            writer.finish(metadata, results)
        return
    writer.finish(metadata, results)


@contextlib.contextmanager
def _megatron_classes() -> Iterator[tuple[type, type]]:
    """Megatron core 0.15's MCoreMetadata and MCoreSavePlan, importable under their real names while pickle writes
    them (Megatron itself is not installed here)."""
    @dataclasses.dataclass
    class MCoreMetadata(Metadata):
        mcore_data: dict | None = None

    @dataclasses.dataclass(frozen=True)
    class MCoreSavePlan(SavePlan):
        mcore_data: dict | None = None

    names = MEGATRON_TORCH.split(".")
    added = []
    for depth in range(1, len(names) + 1):
        name = ".".join(names[:depth])
        if name not in sys.modules:
            sys.modules[name] = types.ModuleType(name)
            added.append(name)
    module = sys.modules[MEGATRON_TORCH]
    for cls in (MCoreMetadata, MCoreSavePlan):
        cls.__module__, cls.__qualname__ = MEGATRON_TORCH, cls.__name__
        setattr(module, cls.__name__, cls)
    try:
        yield MCoreMetadata, MCoreSavePlan
    finally:
        for name in added:
            del sys.modules[name]


def _model_yaml(peft_config: dict, base: dict, canonical: bool, dtype: torch.dtype) -> dict:
    """context/model.yaml as IOMixin.io_dump writes it for a fine-tuned LlamaModel: config with its sizes,
    model_transform with the PEFT's fields (and their defaults), fiddle targets as _target_."""
    heads = base["num_attention_heads"]
    bf16 = dtype == torch.bfloat16
    targets = (["linear_q", "linear_k", "linear_v", "linear_proj", "linear_fc1_up", "linear_fc1_gate", "linear_fc2"]
               if canonical else ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"])
    return {
        "_target_": "nemo.collections.llm.gpt.model.llama.LlamaModel",
        "config": {
            "_target_": "nemo.collections.llm.gpt.model.llama.LlamaConfig", "num_layers": base["num_hidden_layers"],
            "hidden_size": base["hidden_size"], "ffn_hidden_size": base["intermediate_size"],
            "num_attention_heads": heads, "num_query_groups": base.get("num_key_value_heads") or heads,
            "kv_channels": None, "gated_linear_unit": True, "normalization": "RMSNorm",
            "activation_func": {"_target_": "torch.nn.functional.silu", "_call_": False},
            "position_embedding_type": "rope", "share_embeddings_and_output_weights": False, "bf16": bf16,
            "params_dtype": {"_target_": f"torch.{'bfloat16' if bf16 else 'float32'}", "_call_": False},
        },
        "model_transform": {
            "_target_": ("nemo.collections.llm.peft.canonical_lora.CanonicalLoRA" if canonical
                         else "nemo.collections.llm.peft.lora.LoRA"),
            "target_modules": targets, "exclude_modules": [], "dim": peft_config["r"],
            "alpha": peft_config["lora_alpha"], "dropout": 0.0, "dropout_position": "pre",
            "lora_A_init_method": "xavier", "lora_B_init_method": "zero",
        },
        "tokenizer": {"_target_": "nemo.collections.common.tokenizers.huggingface.auto_tokenizer.AutoTokenizer",
                      "pretrained_model_name": "/checkpoints/base/llama"},
    }
