"""Validation time of a large HF adapter (header-only) against loading its tensors.

    .venv/bin/python bench/validation.py [--rank 64] [--layers 32]

Builds a Llama-3-8B-shaped LoRA (all seven projections, every layer) as adapter_model.safetensors
with random bf16 weights, then times `loraplex.formats.validate` against
`safetensors.torch.load_file` (what a runtime does). Writes bench/results/validation.{md,png}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import add_results_argument, machine, table, write  # noqa: E402
from loraplex.formats import AdapterPolicy, validate  # noqa: E402
from loraplex.formats.rules import module_shapes  # noqa: E402

LLAMA3_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
             "num_hidden_layers": 32}
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build(directory: Path, rank: int, layers: int) -> int:
    shapes = module_shapes(LLAMA3_8B)
    tensors = {}
    for layer in range(layers):
        for module in MODULES:
            in_features, out_features = shapes[module]
            group = "self_attn" if module.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            stem = f"base_model.model.model.layers.{layer}.{group}.{module}"
            tensors[f"{stem}.lora_A.weight"] = torch.randn(rank, in_features, dtype=torch.bfloat16)
            tensors[f"{stem}.lora_B.weight"] = torch.randn(out_features, rank, dtype=torch.bfloat16)
    save_file(tensors, directory / "adapter_model.safetensors")
    (directory / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(MODULES), "bias": "none"}))
    return (directory / "adapter_model.safetensors").stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--runs", type=int, default=5)
    add_results_argument(parser)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="loraplex-bench-") as scratch:
        directory = Path(scratch)
        size = build(directory, args.rank, args.layers)
        policy = AdapterPolicy(max_rank=args.rank, base_config={**LLAMA3_8B, "num_hidden_layers": args.layers})
        validate(directory, policy)  # warm the page cache for both contenders
        load_file(directory / "adapter_model.safetensors")
        validation, loading = [], []
        for _ in range(args.runs):
            start = time.perf_counter()
            validate(directory, policy)
            validation.append(time.perf_counter() - start)
            start = time.perf_counter()
            tensors = load_file(directory / "adapter_model.safetensors")
            for tensor in tensors.values():  # load_file maps lazily; a runtime reads every byte
                tensor.clone()
            loading.append(time.perf_counter() - start)
    v, load = statistics.median(validation), statistics.median(loading)
    lines = [
        "# Validation time",
        "",
        f"`python bench/validation.py --rank {args.rank} --layers {args.layers} --runs {args.runs}` on {machine()}; "
        f"median of {args.runs} runs with the file in the page cache.",
        f"Adapter: Llama-3-8B shapes, r={args.rank}, all seven projections in {args.layers} layers, bf16, "
        f"{size / 2**20:.0f} MiB of adapter_model.safetensors.",
        "",
        *table(["what", "seconds", ""], [
            ["loraplex validate (header, shapes vs config.json, rules)", f"{v:.4f}", "1x"],
            ["safetensors.torch.load_file + reading every tensor (what a runtime does)", f"{load:.4f}",
             f"{load / v:.0f}x slower"],
        ]),
    ]

    def draw(figure) -> None:  # type: ignore[no-untyped-def]
        axes = figure.subplots()
        axes.barh(["loraplex validate\n(header only)", "load every tensor\n(what a runtime does)"],
                  [v * 1000, load * 1000], color=["tab:green", "tab:grey"])
        axes.set(xlabel="milliseconds (median)", title=f"{size / 2**20:.0f} MiB adapter, r={args.rank}")

    write(args.results, "validation", lines, draw, size=(7, 3))

if __name__ == "__main__":
    main()
