"""The rules every adapter must pass before a runtime sees it, given what its base model allows and what the
runtime's version loads (the table in loraplex.api.runtime_capabilities)."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from loraplex.api.runtime_capabilities import (
    EMBEDDING_COPY_SUFFIXES,
    FIRST_READING_PEFT_OPTIONS,
    PeftOption,
    RuntimeCapabilities,
    Verdict,
    Version,
    capabilities,
    format_version,
    vllm_label,
    vllm_release,
)
from loraplex.api.types import AdapterFormat, Runtime
from loraplex.formats.hf import pattern_key
from loraplex.formats.report import AdapterReport, Rejection

# What PEFT saved a tensor for, by the end of its name, when it is not a LoRA matrix.
_TENSOR_KINDS = (
    (".lora_A.bias", "a LoRA bias (lora_bias)"),
    (".lora_B.bias", "a LoRA bias (lora_bias)"),
    (".lora_magnitude_vector", "DoRA's magnitude vector"),
    (".trainable_tokens_delta", "a trainable-tokens delta (trainable_token_indices)"),
    (".base_layer.weight", "a full copy of the layer the adapter wraps"),
)


@dataclasses.dataclass(frozen=True)
class AdapterPolicy:
    """What the base model accepts. Every field is optional so `loraplex validate` can check less."""

    runtime: Runtime | None = None
    runtime_version: Version | None = None  # None: the newest version loraplex knows
    max_rank: int | None = None
    expected_rank: int | None = None
    expected_format: AdapterFormat | None = None
    allowed_formats: frozenset[AdapterFormat] | None = None
    allowed_target_modules: frozenset[str] | None = None
    base_config: dict[str, Any] | None = None


def module_shapes(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every adaptable module of a Llama-style base model config; an
    embedding's LoRA maps vocabulary to hidden size like a layer would."""
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    intermediate = int(config["intermediate_size"])
    q, kv = heads * head_dim, kv_heads * head_dim
    shapes = {
        "q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
        "qkv_proj": (hidden, q + 2 * kv), "gate_proj": (hidden, intermediate), "up_proj": (hidden, intermediate),
        "gate_up_proj": (hidden, 2 * intermediate), "down_proj": (intermediate, hidden),
        "attention_qkv": (hidden, q + 2 * kv), "attention_dense": (q, hidden),
        "mlp_fc1": (hidden, 2 * intermediate), "mlp_fc2": (intermediate, hidden),
    }
    if config.get("vocab_size"):
        vocab = int(config["vocab_size"])
        shapes.update({"embed_tokens": (vocab, hidden), "lm_head": (hidden, vocab)})
    return shapes


def trtllm_module_shapes(config: dict[str, Any]) -> dict[str, tuple[tuple[int, int], ...]]:
    """The (in, out) each TensorRT-LLM LoRA module may have in this base model. mlp_h_to_4h is the gate
    projection, or the fused gate+up projection of models that fuse them."""
    hf = module_shapes(config)
    return {
        "attn_qkv": (hf["qkv_proj"],), "attn_q": (hf["q_proj"],), "attn_k": (hf["k_proj"],),
        "attn_v": (hf["v_proj"],), "attn_dense": (hf["o_proj"],), "mlp_gate": (hf["up_proj"],),
        "mlp_h_to_4h": (hf["gate_proj"], hf["gate_up_proj"]), "mlp_4h_to_h": (hf["down_proj"],),
        "mlp_gate_up": (hf["gate_up_proj"],),
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
    if policy.runtime is not None:
        _check_runtime(report, policy.runtime, policy.runtime_version)
    if report.modules_to_save:
        raise Rejection(where, f"modules_to_save {list(report.modules_to_save)} are full weight copies that "
                               "multi-LoRA runtimes do not load per adapter")
    if policy.allowed_target_modules is not None:
        extra = sorted(set(report.target_modules) - policy.allowed_target_modules)
        if extra:
            raise Rejection(where, f"targets {', '.join(extra)}, outside this base model's allowedTargetModules "
                                   f"({', '.join(sorted(policy.allowed_target_modules))})")
    if policy.base_config is not None:
        _check_shapes(report, policy.base_config)


def _check_runtime(report: AdapterReport, runtime: Runtime, version: Version | None) -> None:
    where = report.files[0]
    caps = capabilities(runtime, version)
    supported = caps.modules.get(report.format)
    if supported is None:
        raise Rejection(where, f"{report.format.value} adapters cannot be loaded by {runtime.value}")
    _check_config(report, caps, version)
    if runtime == Runtime.VLLM:
        _check_vllm(report, caps, version)
    unsupported = sorted(set(report.target_modules) - supported)
    if unsupported:
        raise Rejection(where, f"targets {', '.join(unsupported)}, which {runtime.value} cannot adapt "
                               f"(supported: {', '.join(sorted(supported))})")


def _check_config(report: AdapterReport, caps: RuntimeCapabilities, version: Version | None) -> None:
    """The adapter_config.json keys the runtime insists on, and the PEFT options it cannot serve."""
    config_file, config = report.files[0], report.peft_config
    missing = [key for key in caps.required_config if key not in config]
    if missing:
        raise Rejection(config_file, f"lacks {', '.join(missing)}, which {caps.name} requires")
    for option in caps.refused_options:
        if option.is_used(config.get(option.key)):
            raise Rejection(config_file, _option_reason(option, config[option.key], version))


def _check_vllm(report: AdapterReport, vllm: RuntimeCapabilities, version: Version | None) -> None:
    """What vLLM's loader does with the tensors. Reasons name the vLLM version only where versions differ; the
    rest holds for every one."""
    release, label = vllm_release(version), vllm_label(version)
    weights_file = report.files[-1]
    for name in report.unparsed_tensors:
        if name.endswith(EMBEDDING_COPY_SUFFIXES):
            if release.skips_embedding_copies:
                continue
            raise Rejection(weights_file, f"{name} is a full copy of the embedding, which {label} cannot parse "
                                          "(0.12 and later skip it); save the adapter with "
                                          "save_embedding_layers=False")
        kind = next((kind for suffix, kind in _TENSOR_KINDS if name.endswith(suffix)),
                    "not a LoRA matrix in PEFT's saved form")
        raise Rejection(weights_file, f"{name} is {kind}, which vLLM cannot load (it reads only lora_A, lora_B, "
                                      "lora_embedding_A and lora_embedding_B)")
    fused = [module for module in vllm.fused_modules if module in report.target_modules]
    if fused:
        parts = ", ".join(part for module in fused for part in vllm.fused_modules[module])
        raise Rejection(weights_file, f"targets {', '.join(fused)}, which vLLM runs as fused layers of a "
                                      f"Llama-family model and refuses adapters for; train on {parts} instead")
    if not release.reads_peft_options:
        _check_patterns_ignored(report, label)


def _option_reason(option: PeftOption, value: Any, version: Version | None) -> str:
    """Only vLLM refuses PEFT options, so the reasons name vLLM and its releases."""
    shown = f"{option.key}={json.dumps(value)}"
    if option.always_refused:
        reason = f"{shown}: vLLM refuses {option.feature}"
    elif version is None:  # whichever version runs, the sentence must hold
        reason = f"{shown}: vLLM {format_version(FIRST_READING_PEFT_OPTIONS)} and later refuse " \
                 f"{option.feature}, and older versions serve it silently wrong, because {option.wrong_because}"
    elif option.verdict(vllm_release(version)) == Verdict.REFUSED:
        reason = f"{shown}: {vllm_label(version)} refuses {option.feature}"
    else:
        reason = f"{shown}: {vllm_label(version)} does not read it and would serve silently wrong output, " \
                 f"because {option.wrong_because}"
    return f"{reason}; {option.hint}" if option.hint else reason


def _check_patterns_ignored(report: AdapterReport, label: str) -> None:
    """A vLLM that does not read rank_pattern / alpha_pattern scales every module by r and lora_alpha: refuse
    the adapter when that changes any module's scale from the one PEFT trained it with."""
    config = report.peft_config
    patterns = [field for field in ("rank_pattern", "alpha_pattern") if config.get(field)]
    if not patterns:
        return
    alpha_pattern = config.get("alpha_pattern") or {}
    rank, alpha = config["r"], config["lora_alpha"]

    def scale(module_rank: int, module_alpha: float) -> float:
        return module_alpha / (math.sqrt(module_rank) if config.get("use_rslora") else module_rank)

    served = scale(rank, alpha)
    for weights in report.weights:
        key = pattern_key(alpha_pattern, weights.name)
        module_alpha = alpha if key is None else alpha_pattern[key]
        trained = scale(weights.rank, module_alpha)
        if not math.isclose(trained, served):
            raise Rejection(report.files[0], f"{weights.name} was trained with rank {weights.rank} and lora_alpha "
                                             f"{module_alpha:g} (scale {trained:g}) under {' and '.join(patterns)}, "
                                             f"but {label} does not read them and scales every module by r={rank} "
                                             f"and lora_alpha={alpha:g} ({served:g}), so it would serve silently "
                                             "wrong output")


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
            of_layer = "" if weights.layer is None else f" of layer {weights.layer}"
            raise Rejection(where, f"{weights.module}{of_layer} maps {weights.in_features}→"
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
