"""Adapters in other producers' on-disk layouts, built from a Hugging Face PEFT adapter the way each producer's
own converter or trainer writes them (docs/formats/ says where in their sources). Tests convert them back and
compare ΔW = B·A·scale per module and layer with the original."""

from __future__ import annotations

import contextlib
import json
import re
import sys
import types
from collections import defaultdict
from collections.abc import Iterator
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


def assert_same_delta_weights(converted: Path, original: Path, tolerance: float) -> None:
    """Both adapters adapt the same modules of the same layers, and each ΔW of `converted` is within `tolerance`
    of the original's, relative to its largest entry (0: equal to the bit)."""
    got, want = peft_delta_weights(converted), peft_delta_weights(original)
    assert got.keys() == want.keys()
    for (layer, module), delta in want.items():
        error = float((got[(layer, module)] - delta).abs().max() / delta.abs().max())
        assert error <= tolerance, f"layer {layer} {module}: ΔW off by {error:.1e} of its largest entry"


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
    grouped = _peft_factors(adapter)
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


# ---- NeMo 1 .nemo (docs/formats/nemo.md §1-§3, §5) ----------------------------------------------------------


def _peft_factors(adapter: Path) -> dict[int, dict[str, dict[str, torch.Tensor]]]:
    """layer -> module -> {"A", "B"} as the PEFT adapter saved them (B without its scale)."""
    grouped: dict[int, dict[str, dict[str, torch.Tensor]]] = defaultdict(lambda: defaultdict(dict))
    with safe_open(adapter / "adapter_model.safetensors", "pt") as file:
        for key in file.keys():
            match = PEFT_KEY.match(key)
            if match is not None:
                grouped[int(match["layer"])][match["module"]][match["side"]] = file.get_tensor(key)
    return grouped


def share_fused_lora_a(adapter: Path) -> Path:
    """Give k_proj and v_proj the lora_A of q_proj, and up_proj that of gate_proj, in place: a fused NeMo adapter
    has one linear_in for QKV and one for fc1, and NxD one lora_A for qkv_proj and one for gate_up_proj, so only
    such a PEFT adapter has an exact twin in those layouts."""
    from safetensors.torch import save_file

    path = adapter / "adapter_model.safetensors"
    with safe_open(path, "pt") as file:
        tensors = {key: file.get_tensor(key) for key in file.keys()}
        metadata = file.metadata()
    for key in list(tensors):
        for source, copies in (("q_proj", ("k_proj", "v_proj")), ("gate_proj", ("up_proj",))):
            if f".{source}.lora_A." in key:
                for copy in copies:
                    target = key.replace(f".{source}.", f".{copy}.")
                    if target in tensors:
                        tensors[target] = tensors[key].clone()
    save_file(tensors, path, metadata=metadata)
    return adapter


def make_nemo_from_peft(adapter: Path, out: Path, base_config: dict, tp: int = 1, pp: int = 1,
                        variant: str = "nemo", alpha: bool = True, dtype: str = "float32",
                        name: str = "adapter.nemo") -> Path:
    """A .nemo archive as NeMo 1's NLPSaveRestoreConnector writes a LoRA adapter trained with TP=`tp`, PP=`pp`:
    per-rank model_weights.ckpt (root, mp_rank_XX/ or tp_rank_XX_pp_rank_XXX/), local layer numbers per pipeline
    stage, linear_in/linear_out sharded as each ParallelLinearAdapter is, fused QKV interleaved per query group,
    fused fc1 as [gate; up] per TP rank. B is stored unscaled; alpha goes in the config (or is left out, which
    means scale 1 and needs an adapter with lora_alpha = r)."""
    import tarfile
    import tempfile

    import yaml

    config = json.loads((adapter / "adapter_config.json").read_text())
    rank, lora_alpha = config["r"], config["lora_alpha"]
    if not alpha and lora_alpha != rank:
        raise ValueError("a NeMo config without alpha means scale 1: build the PEFT adapter with lora_alpha = r")
    hidden, heads = base_config["hidden_size"], base_config["num_attention_heads"]
    groups = base_config.get("num_key_value_heads") or heads
    d = base_config.get("head_dim") or hidden // heads
    per_group, layers = heads // groups, base_config["num_hidden_layers"]
    factors = _peft_factors(adapter)
    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]

    def whole_adapters(modules: dict[str, dict[str, torch.Tensor]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """NeMo adapter path (under the layer) -> (linear_in, linear_out), unsharded."""
        attn, mlp = "self_attention.adapter_layer", "mlp.adapter_layer"
        found: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if "o_proj" in modules:
            found[f"{attn}.lora_dense_attention_adapter"] = (modules["o_proj"]["A"], modules["o_proj"]["B"])
        if "down_proj" in modules:
            found[f"{mlp}.lora_4htoh_adapter"] = (modules["down_proj"]["A"], modules["down_proj"]["B"])
        if variant == "canonical":
            for module in ("q", "k", "v"):
                found[f"{attn}.lora_unfused_kqv_adapter.{module}_adapter"] = (
                    modules[f"{module}_proj"]["A"], modules[f"{module}_proj"]["B"])
            for module in ("gate", "up"):
                found[f"{mlp}.lora_unfused_hto4h_adapter.{module}_adapter"] = (
                    modules[f"{module}_proj"]["A"], modules[f"{module}_proj"]["B"])
            return found
        q, k, v = (modules[m] for m in ("q_proj", "k_proj", "v_proj"))
        assert torch.equal(q["A"], k["A"]) and torch.equal(q["A"], v["A"]), "fused QKV needs one shared lora_A"
        blocks = []
        for g in range(groups):
            blocks += [q["B"][g * per_group * d:(g + 1) * per_group * d], k["B"][g * d:(g + 1) * d],
                       v["B"][g * d:(g + 1) * d]]
        found[f"{attn}.lora_kqv_adapter"] = (q["A"], torch.cat(blocks))
        gate, up = modules["gate_proj"], modules["up_proj"]
        assert torch.equal(gate["A"], up["A"]), "fused fc1 needs one shared lora_A"
        found[f"{mlp}.lora_hto4h_adapter"] = (gate["A"], torch.cat([gate["B"], up["B"]]))
        return found

    def shard(path: str, a: torch.Tensor, b: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        if "lora_dense_attention_adapter" in path or "lora_4htoh_adapter" in path:  # RowParallel linear_in
            a_t = a.chunk(tp, dim=1)[t]
        else:
            a_t = a.chunk(tp, dim=0)[t]
        if "lora_hto4h_adapter" in path:  # the rank-local fc1 output is [gate_t; up_t]
            gate, up = b.chunk(2)
            return a_t, torch.cat([gate.chunk(tp)[t], up.chunk(tp)[t]])
        return a_t, b.chunk(tp, dim=0)[t]

    per_stage = layers // pp
    with tempfile.TemporaryDirectory() as staging:
        root = Path(staging)
        for t in range(tp):
            for p in range(pp):
                state = {}
                for layer in range(p * per_stage, (p + 1) * per_stage):
                    if layer not in factors:
                        continue
                    for path, (a, b) in whole_adapters(factors[layer]).items():
                        a_t, b_t = shard(path, a, b, t)
                        prefix = f"model.decoder.layers.{layer - p * per_stage}.{path}"
                        state[f"{prefix}.linear_in.weight"] = a_t.to(torch_dtype).contiguous()
                        state[f"{prefix}.linear_out.weight"] = b_t.to(torch_dtype).contiguous()
                if tp == 1 and pp == 1:
                    folder = root
                elif pp == 1:
                    folder = root / f"mp_rank_{t:02d}"
                else:
                    folder = root / f"tp_rank_{t:02d}_pp_rank_{p:03d}"
                folder.mkdir(exist_ok=True)
                torch.save(state, folder / "model_weights.ckpt")
        lora_tuning = {"variant": variant, "adapter_dim": rank, "adapter_dropout": 0.0,
                       "target_modules": ["attention_qkv", "attention_dense", "mlp_fc1", "mlp_fc2"],
                       "column_init_method": "xavier", "row_init_method": "zero", "layer_selection": None,
                       "weight_tying": False, "position_embedding_strategy": None,
                       **({"alpha": lora_alpha} if alpha else {})}
        model_config = {
            "mcore_gpt": True, "num_layers": layers, "hidden_size": hidden,
            "ffn_hidden_size": base_config["intermediate_size"], "num_attention_heads": heads,
            "num_query_groups": groups, "kv_channels": None, "activation": "fast-swiglu",
            "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
            "virtual_pipeline_model_parallel_size": None, "precision": "bf16" if dtype == "bfloat16" else 32,
            "peft": {"peft_scheme": "lora", "lora_tuning": lora_tuning},
        }
        (root / "model_config.yaml").write_text(yaml.safe_dump(model_config))
        out.mkdir(parents=True, exist_ok=True)
        with tarfile.open(out / name, "w:") as archive:
            archive.add(staging, arcname=".")
    return out


# NeuronX Distributed (docs/formats/nxd.md): NxD's fused qkv_proj and gate_up_proj have one lora_A each, so the
# reference PEFT adapter shares it first; the checkpoint is then written as nxd.save_checkpoint does.
NXD_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
NXD_LAYER = re.compile(r".*layers\.(?P<layer>\d+)\.")


def nxd_lora_config(peft_config: dict, in_checkpoint: bool) -> dict:
    """LoraConfig.selected_fields_to_save(): its 12 keys, `r` among them as a copy of lora_rank."""
    return {"bias": "none", "init_lora_weights": "default", "lora_alpha": peft_config["lora_alpha"],
            "lora_dropout": 0.0, "lora_rank": peft_config["r"], "use_rslora": bool(peft_config.get("use_rslora")),
            "target_modules": NXD_TARGETS, "modules_to_save": None, "save_lora_base": False, "merge_lora": False,
            "save_lora_config_adapter": in_checkpoint, "r": peft_config["r"]}


def make_nxd_from_peft(adapter: Path, out: Path, base_config: dict, tp: int = 1, config_in_checkpoint: bool = True,
                       storage: str = "float32", fuse_qkv: bool = False, gathered: bool = False,
                       checkpoint_dir: str = "lora_adapter", tag: str | None = None, xser: bool = False,
                       pp: int = 1, lightning: bool = False, zero1: bool = False,
                       hyper_parameters: dict | None = None) -> Path:
    """An NxD Llama's LoRA checkpoint, trained at tensor parallelism `tp` and saved with
    nxd.save_checkpoint(checkpoint_dir_str=checkpoint_dir, tag=tag) from the working directory `out`:

    - <checkpoint_dir>/<tag>/model/dp_rank_00_tp_rank_XX_pp_rank_00.pt, one torch.save dict per tp rank, with
      the `checkpoint` and `done` markers beside model/;
    - the config as `lora_config` in every rank file, or as lora_adapter/adapter_config.json (json, indent 2,
      sorted keys);
    - per rank (merge_sharded_lora=False): column targets' lora_B and GQA lora_B_q/_k/_v cut by rows, K/V
      first repeated kv_size_multiplier m times; row targets' lora_A cut by columns; gate_up's B the rank's
      gate rows then its up rows; fused weight_qkv the rank's q, k, v rows;
    - `gathered` (merge_sharded_lora=True): every rank writes the rank-order join of those slices, with the GQA
      tensors' chunk(m)[0] kept, as NxD's all-gather does;
    - `xser` (use_xser=True): each rank file as NxD's xser save writes it (write_nxd_xser);
    - `pp` > 1: one file per tp rank and pipeline stage (pp_rank_YY), each holding its stage's layers under their
      global names. NxD itself cannot save a LoRA adapter with pp>1 (docs/formats/nxd.md §4.3); this is the most
      convertible form such a checkpoint could take, for the test that it is refused all the same;
    - `lightning`: instead, Lightning's ModelCheckpoint through NxD's NeuronCheckpointIO
      (write_nxd_lightning_rank) into <checkpoint_dir>/<tag, by default epoch=0-step=20.ckpt>/, the rank's dict
      under "state_dict" of a whole Lightning checkpoint dict; `zero1` (optimizer_config zero_one_enabled) adds
      _dp_rank_ZZ to each name and has two data-parallel ranks save; `hyper_parameters` goes into the dict as
      save_hyperparameters() puts it.

    The adapter must share lora_A across q/k/v and gate/up (share_fused_lora_a)."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    kv_heads = base_config.get("num_key_value_heads") or base_config["num_attention_heads"]
    multiplier = max(1, tp // kv_heads)  # the smallest m with kv_heads·m divisible by tp
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[storage]
    layers: dict[int, dict[str, dict[str, torch.Tensor]]] = defaultdict(lambda: defaultdict(dict))
    with safe_open(adapter / "adapter_model.safetensors", "pt") as file:
        for key in file.keys():
            match = PEFT_KEY.match(key)
            if match is not None:
                layers[int(match["layer"])][match["module"]][match["side"]] = file.get_tensor(key).to(dtype)

    def rows(tensor: torch.Tensor, rank: int) -> torch.Tensor:
        return tensor.chunk(tp, 0)[rank]

    ranks: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
    gqa_keys = set()
    for layer, modules in sorted(layers.items()):
        attn, mlp = f"model.layers.{layer}.self_attn", f"model.layers.{layer}.mlp"
        q, k, v = modules["q_proj"], modules["k_proj"], modules["v_proj"]
        gate, up = modules["gate_proj"], modules["up_proj"]
        if not (torch.equal(q["A"], k["A"]) and torch.equal(q["A"], v["A"]) and torch.equal(gate["A"], up["A"])):
            raise ValueError(f"{adapter}: layer {layer}'s q/k/v or gate/up lora_A differ; tie them first")
        b_k, b_v = k["B"].repeat(multiplier, 1), v["B"].repeat(multiplier, 1)
        for rank, tensors in enumerate(ranks):
            tensors[f"{attn}.qkv_proj.lora_A.weight"] = q["A"]
            if fuse_qkv:
                tensors[f"{attn}.qkv_proj.lora_B.weight_qkv"] = torch.cat(
                    [rows(q["B"], rank), rows(b_k, rank), rows(b_v, rank)])
            else:
                tensors[f"{attn}.qkv_proj.lora_B.weight_q"] = rows(q["B"], rank)
                tensors[f"{attn}.qkv_proj.lora_B.weight_k"] = rows(b_k, rank)
                tensors[f"{attn}.qkv_proj.lora_B.weight_v"] = rows(b_v, rank)
            tensors[f"{attn}.o_proj.lora_A.weight"] = modules["o_proj"]["A"].chunk(tp, 1)[rank]
            tensors[f"{attn}.o_proj.lora_B.weight"] = modules["o_proj"]["B"]
            tensors[f"{mlp}.gate_up_proj.lora_A.weight"] = gate["A"]
            tensors[f"{mlp}.gate_up_proj.lora_B.weight"] = torch.cat([rows(gate["B"], rank), rows(up["B"], rank)])
            tensors[f"{mlp}.down_proj.lora_A.weight"] = modules["down_proj"]["A"].chunk(tp, 1)[rank]
            tensors[f"{mlp}.down_proj.lora_B.weight"] = modules["down_proj"]["B"]
        gqa_keys.update(key for key in ranks[0] if ".qkv_proj.lora_B." in key)
    if gathered:
        joined = {}
        for key in ranks[0]:
            row_target = ".o_proj." in key or ".down_proj." in key
            if row_target == (".lora_A." in key):  # the slices: row targets' A by columns, column targets' B by rows
                joined[key] = torch.cat([tensors[key] for tensors in ranks], 1 if row_target else 0)
            else:
                joined[key] = ranks[0][key]
            if key in gqa_keys:
                joined[key] = joined[key].chunk(multiplier, 0)[0]
        ranks = [dict(joined) for _ in range(tp)]
    lora_config = nxd_lora_config(config, config_in_checkpoint)
    per_stage = -(-base_config["num_hidden_layers"] // pp)
    if lightning:
        save_dir = out / checkpoint_dir / (tag or "epoch=0-step=20.ckpt")
        save_dir.mkdir(parents=True)
    else:
        model_dir = out / checkpoint_dir / (tag or "lora") / "model"
        model_dir.mkdir(parents=True, exist_ok=True)
        (model_dir.parent / "checkpoint").write_text("1")
    for rank, tensors in enumerate(ranks):
        for stage in range(pp):
            state = {key: tensor.contiguous().clone() for key, tensor in tensors.items()  # each its own storage
                     if int(NXD_LAYER.match(key)["layer"]) // per_stage == stage}
            if config_in_checkpoint:
                state["lora_config"] = dict(lora_config)
            if lightning:
                for dp_rank in (0, 1) if zero1 else (None,):
                    name = f"tp_rank_{rank:02d}_pp_rank_{stage:02d}" + (f"_dp_rank_{dp_rank:02d}" if zero1 else "")
                    write_nxd_lightning_rank(lightning_checkpoint(state, zero1, hyper_parameters), save_dir / name,
                                             xser)
                continue
            path = model_dir / f"dp_rank_00_tp_rank_{rank:02d}_pp_rank_{stage:02d}.pt"
            if xser:
                write_nxd_xser(state, path)
            else:
                torch.save(state, path)
    if not config_in_checkpoint:
        (out / "lora_adapter").mkdir(parents=True, exist_ok=True)
        (out / "lora_adapter" / "adapter_config.json").write_text(json.dumps(lora_config, indent=2, sort_keys=True))
    if not lightning:
        (model_dir.parent / "done").write_text("1")
    return out


def lightning_checkpoint(state: dict, zero1: bool, hyper_parameters: dict | None) -> dict:
    """What Lightning's dump_checkpoint hands NeuronCheckpointIO when the module is NxD's NeuronLTModule: its
    state_dict() is NxDModel's, so `state` (LoraModel's adapter dict) sits under "state_dict" unprefixed, beside
    the loops' counters, ModelCheckpoint's state (tensors), the optimizer's (AdamW moments by parameter index;
    ZeRO-1 adds shape_info, torch.Size values) and LambdaLR's."""
    trained = [tensor for tensor in state.values() if isinstance(tensor, torch.Tensor)]
    progress = {"ready": 20, "started": 20, "processed": 20, "completed": 20}
    score = torch.tensor(20.0)
    moments = {index: {"step": torch.tensor(20.0), "exp_avg": torch.full_like(tensor, 1e-3),
                       "exp_avg_sq": torch.full_like(tensor, 1e-6)} for index, tensor in enumerate(trained)}
    optimizer = {"state": moments,
                 "param_groups": [{"lr": 5e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01,
                                   "amsgrad": False, "foreach": None, "maximize": False, "capturable": False,
                                   "differentiable": False, "fused": None, "params": list(range(len(trained)))}]}
    if zero1:
        optimizer["shape_info"] = {index: tensor.shape for index, tensor in enumerate(trained)}
    checkpoint = {
        "epoch": 0, "global_step": 20, "pytorch-lightning_version": "2.5.1", "state_dict": state,
        "loops": {"fit_loop": {"state_dict": {}, "epoch_loop.state_dict": {"_batches_that_stepped": 20},
                               "epoch_loop.batch_progress": {"total": dict(progress), "current": dict(progress),
                                                             "is_last_batch": False}},
                  "validate_loop": {"state_dict": {}}, "test_loop": {"state_dict": {}},
                  "predict_loop": {"state_dict": {}}},
        "callbacks": {"ModelCheckpoint{'monitor': 'global_step', 'mode': 'max', 'every_n_train_steps': 20, "
                      "'every_n_epochs': 0, 'train_time_interval': None}": {
                          "monitor": "global_step", "best_model_score": score.clone(), "current_score": score.clone(),
                          "best_model_path": "ckpt/epoch=0-step=20.ckpt", "dirpath": "ckpt",
                          "best_k_models": {"ckpt/epoch=0-step=20.ckpt": score.clone()},
                          "kth_best_model_path": "ckpt/epoch=0-step=20.ckpt", "kth_value": score.clone(),
                          "last_model_path": ""}},
        "optimizer_states": [optimizer],
        "lr_schedulers": [{"base_lrs": [5e-4], "last_epoch": 20, "_step_count": 21, "_get_lr_called_within_step": False,
                           "_last_lr": [4.8e-4], "lr_lambdas": [None]}],
    }
    if hyper_parameters is not None:
        checkpoint.update(hparams_name="kwargs", hyper_parameters=hyper_parameters)
    return checkpoint


def write_nxd_lightning_rank(checkpoint: dict, path: Path, xser: bool) -> None:
    """NxD parallel_layers/checkpointing.py save(): without xser, torch.save of the whole dict (tensors on the CPU)
    to <path>/checkpoint.pt; with xser, torch_xla's xser.save to <path>: every (XLA) tensor, wherever it sits, is
    numbered in the order the walk meets it and saved alone to <path>.tensors/tensor_<id>.pt, and <path> holds the
    dict with a TensorReference in its place. No .info.pt: that is nxd.save_checkpoint's addition."""
    if not xser:
        path.mkdir()
        torch.save(checkpoint, path / "checkpoint.pt")
        return
    folder = path.with_name(f"{path.name}.tensors")
    folder.mkdir()
    count = iter(range(1 << 30))

    def rewrite(value):
        if isinstance(value, torch.Tensor):
            tid = next(count)
            torch.save(value.clone(), folder / f"tensor_{tid}.pt")
            return TensorReference(tid)
        if isinstance(value, dict):
            return {key: rewrite(item) for key, item in value.items()}
        if isinstance(value, list):
            return [rewrite(item) for item in value]
        return value

    structure = rewrite(checkpoint)
    with torch_xla_stand_in():
        torch.save(structure, path)


class TensorReference:
    """torch_xla.utils.serialization.TensorReference (pytorch/xla): one attribute, the tensor's id. Pickled under
    that module path (write_nxd_xser), so the file reads as one torch_xla wrote; torch_xla is not installed."""

    def __init__(self, tid: int):
        self.tid = tid


XSER_MODULE = "torch_xla.utils.serialization"
TensorReference.__module__ = XSER_MODULE


def write_nxd_xser(state: dict, path: Path) -> None:
    """`state` as NxD's _save with use_xser=True writes it (trainer/checkpoint.py _xser_save_data and
    _extract_tensor_info_and_update_state_dict): tensors numbered 0, 1, ... in the order the dict yields them,
    each torch.save'd alone to <path>.tensors/tensor_<tid>.pt; the dict with a TensorReference(tid) in each
    tensor's place to <path>; {tid: {dtype, shape, expert_model_parallel}} to <path>.info.pt."""
    folder = path.with_name(f"{path.name}.tensors")
    folder.mkdir()
    structure, info = {}, {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            tid = len(info)
            torch.save(value, folder / f"tensor_{tid}.pt")
            info[tid] = {"dtype": value.dtype, "shape": value.shape, "expert_model_parallel": False}
            structure[key] = TensorReference(tid)
        else:
            structure[key] = value
    with torch_xla_stand_in():
        torch.save(structure, path)
    torch.save(info, path.with_name(f"{path.name}.info.pt"))


@contextlib.contextmanager
def torch_xla_stand_in() -> Iterator[None]:
    """torch_xla.utils.serialization importable, holding TensorReference, while pickling or unpickling."""
    names = ("torch_xla", "torch_xla.utils", XSER_MODULE)
    if any(name in sys.modules for name in names):
        raise RuntimeError("torch_xla is loaded; the stand-in is only for where it is absent")
    stand_ins = {name: types.ModuleType(name) for name in names}
    stand_ins[XSER_MODULE].TensorReference = TensorReference
    sys.modules.update(stand_ins)
    try:
        yield
    finally:
        for name in names:
            sys.modules.pop(name, None)
