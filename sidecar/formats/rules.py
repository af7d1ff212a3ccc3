"""The rules every adapter must pass before a runtime sees it, given what its base model allows."""

from __future__ import annotations

import dataclasses
from typing import Any

from loraplex.api.types import AdapterFormat, Runtime
from loraplex.sidecar.formats.report import AdapterReport, Rejection

# Modules each runtime can adapt, per adapter format (Llama-family names; `allowedTargetModules` on the
# BaseModelDeployment narrows this further).
RUNTIME_MODULES: dict[Runtime, dict[AdapterFormat, frozenset[str]]] = {
    Runtime.VLLM: {
        AdapterFormat.HF: frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                     "qkv_proj", "gate_up_proj"}),
    },
    Runtime.CPU: {  # peft adapts any linear layer; these are the Llama-family ones
        AdapterFormat.HF: frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    },
    Runtime.NIM: {
        AdapterFormat.HF: frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
        AdapterFormat.NEMO: frozenset({"attention_qkv", "attention_dense", "mlp_fc1", "mlp_fc2"}),
        AdapterFormat.TRTLLM: frozenset({"attn_qkv", "attn_q", "attn_k", "attn_v", "attn_dense", "mlp_h_to_4h",
                                         "mlp_4h_to_h", "mlp_gate"}),
    },
}


@dataclasses.dataclass(frozen=True)
class AdapterPolicy:
    """What the base model accepts. Every field is optional so `loraplex validate` can check less."""

    runtime: Runtime | None = None
    max_rank: int | None = None
    expected_rank: int | None = None
    expected_format: AdapterFormat | None = None
    allowed_formats: frozenset[AdapterFormat] | None = None
    allowed_target_modules: frozenset[str] | None = None
    base_config: dict[str, Any] | None = None


def module_shapes(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every adaptable module of a Llama-style base model config."""
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    intermediate = int(config["intermediate_size"])
    q, kv = heads * head_dim, kv_heads * head_dim
    return {
        "q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
        "qkv_proj": (hidden, q + 2 * kv), "gate_proj": (hidden, intermediate), "up_proj": (hidden, intermediate),
        "gate_up_proj": (hidden, 2 * intermediate), "down_proj": (intermediate, hidden),
        "attention_qkv": (hidden, q + 2 * kv), "attention_dense": (q, hidden),
        "mlp_fc1": (hidden, 2 * intermediate), "mlp_fc2": (intermediate, hidden),
    }


def trtllm_module_shapes(config: dict[str, Any]) -> dict[str, tuple[tuple[int, int], ...]]:
    """The (in, out) each TensorRT-LLM LoRA module may have in this base model. mlp_h_to_4h is the gate
    projection, or the fused gate+up projection of models that fuse them."""
    hf = module_shapes(config)
    return {
        "attn_qkv": (hf["qkv_proj"],), "attn_q": (hf["q_proj"],), "attn_k": (hf["k_proj"],),
        "attn_v": (hf["v_proj"],), "attn_dense": (hf["o_proj"],), "mlp_gate": (hf["up_proj"],),
        "mlp_h_to_4h": (hf["gate_proj"], hf["gate_up_proj"]), "mlp_4h_to_h": (hf["down_proj"],),
    }


def check(report: AdapterReport, policy: AdapterPolicy) -> None:
    """Raise a Rejection naming the file and the first rule the adapter breaks."""
    where = report.files[0]
    fmt = report.format.value
    if policy.expected_format not in (None, AdapterFormat.AUTO) and report.format != policy.expected_format:
        raise Rejection(where, f"is a {fmt} adapter but the LoraAdapter declares format "
                               f"{policy.expected_format.value}")
    if policy.allowed_formats is not None and report.format not in policy.allowed_formats:
        allowed = ", ".join(sorted(f.value for f in policy.allowed_formats)) or "none"
        raise Rejection(where, f"{fmt} adapters are not accepted by this base model (allowed: {allowed})")
    rank_file, _, rank_field = report.rank_source.partition(": ")
    if policy.max_rank is not None and report.rank > policy.max_rank:
        raise Rejection(rank_file, f"{rank_field} exceeds this base model's maxLoraRank {policy.max_rank}")
    if policy.expected_rank is not None and report.rank != policy.expected_rank:
        raise Rejection(rank_file, f"{rank_field} differs from the expected rank {policy.expected_rank}")
    if report.modules_to_save:
        raise Rejection(where, f"modules_to_save {list(report.modules_to_save)} are full weight copies that "
                               "multi-LoRA runtimes do not load per adapter")
    if policy.runtime is not None:
        _check_runtime(report, policy.runtime)
    if policy.allowed_target_modules is not None:
        extra = sorted(set(report.target_modules) - policy.allowed_target_modules)
        if extra:
            raise Rejection(where, f"targets {', '.join(extra)}, outside this base model's allowedTargetModules "
                                   f"({', '.join(sorted(policy.allowed_target_modules))})")
    if policy.base_config is not None:
        _check_shapes(report, policy.base_config)


def _check_runtime(report: AdapterReport, runtime: Runtime) -> None:
    where = report.files[0]
    supported = RUNTIME_MODULES[runtime].get(report.format)
    if supported is None:
        raise Rejection(where, f"{report.format.value} adapters cannot be loaded by {runtime.value}")
    unsupported = sorted(set(report.target_modules) - supported)
    if unsupported:
        raise Rejection(where, f"targets {', '.join(unsupported)}, which {runtime.value} cannot adapt "
                               f"(supported: {', '.join(sorted(supported))})")
    if runtime == Runtime.VLLM:
        if report.use_dora:
            raise Rejection(where, "use_dora=true: vLLM does not serve DoRA adapters")
        if report.bias != "none":
            raise Rejection(where, f"bias={report.bias!r}: vLLM only serves LoRA adapters without bias terms")


def _check_shapes(report: AdapterReport, base_config: dict[str, Any]) -> None:
    where = report.files[-1]
    try:
        layers = int(base_config["num_hidden_layers"])
        shapes = module_shapes(base_config)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise Rejection("config.json", f"of the base model lacks the sizes needed to check shapes ({exc})") from None
    if report.row_values is not None:
        _check_trtllm_rows(report, trtllm_module_shapes(base_config))
    for weights in report.weights:
        if weights.layer is not None and weights.layer >= layers:
            raise Rejection(where, f"adapts layer {weights.layer} but the base model has {layers} layers; the "
                                   "adapter was trained for another base model")
        expected = shapes.get(weights.module)
        if expected is None or weights.in_features <= 0:
            continue
        if (weights.in_features, weights.out_features) != expected:
            raise Rejection(where, f"{weights.module} of layer {weights.layer} maps {weights.in_features}→"
                                   f"{weights.out_features} but the base model's config.json gives {expected[0]}→"
                                   f"{expected[1]}; the adapter was trained for another base model")


def _check_trtllm_rows(report: AdapterReport, shapes: dict[str, tuple[tuple[int, int], ...]]) -> None:
    """Every row must hold its module's flattened pair for this base model, and the rows' common width
    must be what the widest of them packs to (converters pad every row to exactly that)."""
    width = report.row_values
    where = report.files[-1]
    packed_sizes: set[int] = set()
    for index, weights in enumerate(report.weights):
        candidates = [weights.rank * (n_in + n_out) for n_in, n_out in shapes.get(weights.module, ())]
        fitting = [size for size in candidates if size <= width]
        if candidates and not fitting:
            n_in, n_out = shapes[weights.module][0]
            raise Rejection(where, f"row {index} ({weights.module} of layer {weights.layer}, adapter size "
                                   f"{weights.rank}) needs {min(candidates)} values for the base model's "
                                   f"{n_in}→{n_out} {weights.module}, but rows hold {width}; the adapter was "
                                   "converted for another base model")
        packed_sizes.update(fitting)
    if packed_sizes and width not in packed_sizes:
        raise Rejection(where, f"rows hold {width} values, but no adapted module of this base model packs to that "
                               f"many (the widest packs to {max(packed_sizes)}); the adapter was converted for "
                               "another base model")
