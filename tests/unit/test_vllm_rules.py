"""What vLLM loads, per version, against real PEFT adapters: every option and tensor vLLM refuses or serves
wrong is refused, with the reason a user reads; what it serves correctly is accepted."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from loraplex.api.types import Runtime
from loraplex.formats import AdapterPolicy, Rejection, validate
from tests.adapters import TINY_LLAMA, make_hf_adapter

V0110, V0120, V0310, V0320 = (0, 11, 0), (0, 12, 0), (0, 31, 0), (0, 32, 0)
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
BUILT = {  # name → make_hf_adapter options (rank 8 on q_proj and v_proj unless said)
    "plain": {},
    "dora": {"use_dora": True},
    "bias": {"bias": "all"},
    "lora-bias": {"lora_bias": True},
    "modules-to-save": {"modules_to_save": ["lm_head"]},
    "tokens": {"trainable_token_indices": [1, 2]},
    "layer-replication": {"layer_replication": [[0, 2], [1, 2]]},
    "qalora": {"use_qalora": True},
    "alora": {"alora_invocation_tokens": [1, 2]},
    "embeddings": {"target_modules": ("q_proj", "embed_tokens", "lm_head")},
    "rank-pattern": {"rank_pattern": {"v_proj": 4}},
    "rank-and-alpha-pattern": {"rank_pattern": {"v_proj": 4}, "alpha_pattern": {"v_proj": 8}},
    "pattern-on-no-module": {"rank_pattern": {"proj": 4, "self_attn": 2}},
    "pattern-one-layer": {"rank_pattern": {"layers.0.self_attn.v_proj": 4}},
}


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vllm-adapters")
    for name, options in BUILT.items():
        make_hf_adapter(root / name, rank=8, **options)
    return root


@pytest.fixture
def adapter(built, tmp_path):
    """A copy of a built adapter, with adapter_config.json changes PEFT cannot produce."""
    def make(name: str, **config_changes) -> Path:
        directory = Path(shutil.copytree(built / name, tmp_path / f"{name}-{len(list(tmp_path.iterdir()))}"))
        path = directory / CONFIG
        config = json.loads(path.read_text())
        config.update(config_changes)
        for key in [key for key, value in config_changes.items() if value is ...]:
            del config[key]
        path.write_text(json.dumps(config))
        return directory
    return make


def edit_tensors(directory: Path, edit) -> Path:
    tensors = load_file(directory / WEIGHTS)
    edit(tensors)
    save_file(tensors, directory / WEIGHTS)
    return directory


def vllm(version=None, **limits) -> AdapterPolicy:
    return AdapterPolicy(runtime=Runtime.VLLM, runtime_version=version, base_config=TINY_LLAMA, **limits)


def rejection(directory: Path, policy: AdapterPolicy) -> str:
    with pytest.raises(Rejection) as excinfo:
        validate(directory, policy)
    return str(excinfo.value)


PISSA_HINT = "; convert it to a plain LoRA with PEFT's path_initial_model_for_weight_conversion"
INITS = "inits that change the base model's weights (PiSSA, OLoRA, CorDA, LoftQ)"
INITS_WRONG = "because PEFT changes the base model's weights when it loads such an adapter, and vLLM does not"


# ---- PEFT options: the verdict and the sentence, per version ----------------------------------------------

@pytest.mark.parametrize(("name", "config", "version", "reason"), [
    # refused by every vLLM: the reason holds whatever the version
    ("dora", {}, V0110, 'use_dora=true: vLLM refuses DoRA adapters'),
    ("dora", {}, V0320, 'use_dora=true: vLLM refuses DoRA adapters'),
    ("bias", {}, V0120, 'bias="all": vLLM refuses trained bias terms'),
    ("bias", {}, V0320, 'bias="all": vLLM refuses trained bias terms'),
    ("lora-bias", {}, V0120, "lora_bias=true: vLLM refuses LoRA bias terms"),
    ("lora-bias", {}, V0320, "lora_bias=true: vLLM refuses LoRA bias terms"),
    ("modules-to-save", {}, V0120, 'modules_to_save=["lm_head"]: vLLM refuses full module copies in a causal LM'),
    ("plain", {"modules_to_save": ["score"]}, V0320,
     'modules_to_save=["score"]: vLLM refuses full module copies in a causal LM'),
    ("tokens", {}, V0320, "trainable_token_indices=[1, 2]: vLLM refuses trainable token embeddings"),
    # refused by 0.32, which reads them; served silently wrong before it
    ("plain", {"init_lora_weights": "pissa"}, V0320, f'init_lora_weights="pissa": vLLM 0.32.0 refuses {INITS}'
                                                     f"{PISSA_HINT}"),
    ("plain", {"init_lora_weights": "olora"}, V0310,
     f'init_lora_weights="olora": vLLM 0.31.0 does not read it and would serve silently wrong output, '
     f"{INITS_WRONG}{PISSA_HINT}"),
    ("plain", {"init_lora_weights": "corda"}, V0120,
     f'init_lora_weights="corda": vLLM 0.12.0 does not read it and would serve silently wrong output, '
     f"{INITS_WRONG}{PISSA_HINT}"),
    ("plain", {"init_lora_weights": "loftq"}, V0110,
     f'init_lora_weights="loftq": vLLM 0.11.0 does not read it and would serve silently wrong output, '
     f"{INITS_WRONG}{PISSA_HINT}"),
    ("plain", {"init_lora_weights": "pissa_niter_4"}, None,
     f'init_lora_weights="pissa_niter_4": vLLM 0.32.0 and later refuse {INITS}, and older versions serve it '
     f"silently wrong, {INITS_WRONG}{PISSA_HINT}"),
    ("layer-replication", {}, V0320, "layer_replication=[[0, 2], [1, 2]]: vLLM 0.32.0 refuses layer replication"),
    ("layer-replication", {}, V0120,
     "layer_replication=[[0, 2], [1, 2]]: vLLM 0.12.0 does not read it and would serve silently wrong output, "
     "because the adapter was trained on replicated layers that vLLM does not build"),
    ("alora", {}, V0320, "alora_invocation_tokens=[1, 2]: vLLM 0.32.0 refuses Activated LoRA (aLoRA)"),
    ("alora", {}, V0120,
     "alora_invocation_tokens=[1, 2]: vLLM 0.12.0 does not read it and would serve silently wrong output, "
     "because vLLM applies it to every token, not only after its invocation tokens"),
    ("alora", {}, None,
     "alora_invocation_tokens=[1, 2]: vLLM 0.32.0 and later refuse Activated LoRA (aLoRA), and older versions "
     "serve it silently wrong, because vLLM applies it to every token, not only after its invocation tokens"),
    ("plain", {"use_bdlora": {"nblocks": 2}}, V0320,
     'use_bdlora={"nblocks": 2}: vLLM 0.32.0 refuses block-diagonal LoRA (BD-LoRA)'),
    ("plain", {"use_bdlora": {"nblocks": 2}}, V0120,
     'use_bdlora={"nblocks": 2}: vLLM 0.12.0 does not read it and would serve silently wrong output, because '
     "vLLM reads its matrices as a plain LoRA"),
    ("qalora", {}, V0320, "use_qalora=true: vLLM 0.32.0 refuses QALoRA"),
    ("qalora", {}, V0310,
     "use_qalora=true: vLLM 0.31.0 does not read it and would serve silently wrong output, because vLLM "
     "applies it without QALoRA's pooling of input groups"),
    # vLLM's required keys
    ("plain", {"lora_alpha": ...}, V0320, "lacks lora_alpha, which vLLM requires"),
    ("plain", {"target_modules": ..., "lora_alpha": ...}, V0120, "lacks lora_alpha, target_modules, which vLLM "
                                                                 "requires"),
])
def test_peft_options_vllm_cannot_serve_are_refused(adapter, name, config, version, reason):
    assert rejection(adapter(name, **config), vllm(version)) == f"{CONFIG}: {reason}"


@pytest.mark.parametrize("init", [True, False, "gaussian", "Gaussian", "eva", "orthogonal", "mica", "lora_ga"])
@pytest.mark.parametrize("version", [V0110, V0120, V0320, None])
def test_plain_inits_are_served_by_every_version(adapter, init, version):
    validate(adapter("plain", init_lora_weights=init), vllm(version))


@pytest.mark.parametrize("name", ["lora-bias", "layer-replication", "qalora", "alora", "tokens"])
def test_options_are_vllm_rules_not_format_rules(built, name):
    validate(built / name, AdapterPolicy(runtime=Runtime.NIM))


# ---- tensors vLLM cannot parse -----------------------------------------------------------------------------

LOADS_ONLY = "which vLLM cannot load (it reads only lora_A, lora_B, lora_embedding_A and lora_embedding_B)"


@pytest.mark.parametrize(("name", "config", "reason"), [
    ("lora-bias", {"lora_bias": False},
     f"base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias is a LoRA bias (lora_bias), {LOADS_ONLY}"),
    ("dora", {"use_dora": False},
     f"base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector is DoRA's magnitude vector, "
     f"{LOADS_ONLY}"),
    ("tokens", {"trainable_token_indices": None},
     "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta is a trainable-tokens delta "
     f"(trainable_token_indices), {LOADS_ONLY}"),
    ("modules-to-save", {"modules_to_save": None},
     f"base_model.model.lm_head.weight is not a LoRA matrix in PEFT's saved form, {LOADS_ONLY}"),
])
def test_tensors_vllm_cannot_parse_are_refused(adapter, name, config, reason):
    directory = adapter(name, **config)
    for version in (V0110, V0120, V0320, None):
        assert rejection(directory, vllm(version)) == f"{WEIGHTS}: {reason}"


def test_every_module_needs_both_matrices_of_one_rank(adapter):
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    narrow_b = edit_tensors(adapter("plain"), lambda t: t.update({f"{key}.lora_B.weight":
                                                                   t[f"{key}.lora_B.weight"][:, :4].contiguous()}))
    assert rejection(narrow_b, vllm()) == f"{WEIGHTS}: {key} has lora_A rank 8 but lora_B rank 4"
    lone_a = edit_tensors(adapter("plain"), lambda t: t.pop(f"{key}.lora_B.weight"))
    assert rejection(lone_a, vllm()) == f"{WEIGHTS}: {key} has lora_A without its pair"


# ---- modules ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", [V0120, V0320, None])
def test_lm_head_and_embed_tokens_are_served(built, version):
    report = validate(built / "embeddings", vllm(version))
    assert report.target_modules == ("embed_tokens", "lm_head", "q_proj")
    shapes = {(w.module, w.in_features, w.out_features) for w in report.weights if w.layer is None}
    assert shapes == {("embed_tokens", 128, 32), ("lm_head", 32, 128)}  # vocab 128, hidden 32


def test_embedding_copies_are_refused_where_vllm_cannot_parse_them(built):
    assert rejection(built / "embeddings", vllm(V0110)) == (
        f"{WEIGHTS}: base_model.model.lm_head.base_layer.weight is a full copy of the embedding, which vLLM "
        "0.11.0 cannot parse (0.12 and later skip it); save the adapter with save_embedding_layers=False")


def test_embedding_adapters_for_another_vocabulary_are_caught_by_shape(built):
    other = {**TINY_LLAMA, "vocab_size": 256}
    assert rejection(built / "embeddings", AdapterPolicy(runtime=Runtime.VLLM, base_config=other)) == (
        f"{WEIGHTS}: embed_tokens maps 128→32 but the base model's config.json gives 256→32; the adapter was "
        "trained for another base model")


def rename(old: str, new: str):
    def edit(tensors):
        for key in [key for key in tensors if old in key]:
            tensors[key.replace(old, new)] = tensors.pop(key)
    return edit


@pytest.mark.parametrize(("old", "fused", "parts"), [
    (".q_proj.", "qkv_proj", "q_proj, k_proj, v_proj"),
    (".v_proj.", "gate_up_proj", "gate_proj, up_proj"),
])
def test_fused_module_names_are_refused(adapter, old, fused, parts):
    directory = edit_tensors(adapter("plain"), rename(old, f".{fused}."))
    for version in (V0110, V0320, None):
        assert rejection(directory, AdapterPolicy(runtime=Runtime.VLLM, runtime_version=version)) == (
            f"{WEIGHTS}: targets {fused}, which vLLM runs as fused layers of a Llama-family model and refuses "
            f"adapters for; train on {parts} instead")


def test_foreign_module_names_are_refused(adapter):
    directory = edit_tensors(adapter("plain"), rename(".q_proj.", ".query_key_value."))
    assert rejection(directory, vllm()).startswith(f"{CONFIG}: targets query_key_value, which vllm cannot adapt")


# ---- rank_pattern and alpha_pattern -------------------------------------------------------------------------

def test_rank_pattern_is_matched_as_peft_matches_it(built):
    report = validate(built / "rank-pattern", vllm(V0320))
    assert {(w.module, w.rank) for w in report.weights} == {("q_proj", 8), ("v_proj", 4)}
    # "proj" and "self_attn" match no module for PEFT (a key must match whole dotted parts at the end)
    assert {w.rank for w in validate(built / "pattern-on-no-module", vllm(V0320)).weights} == {8}
    one_layer = validate(built / "pattern-one-layer", vllm(V0320))
    assert {(w.layer, w.module, w.rank) for w in one_layer.weights} == {
        (0, "q_proj", 8), (0, "v_proj", 4), (1, "q_proj", 8), (1, "v_proj", 8)}


def test_tensor_ranks_must_be_the_ones_the_config_gives(adapter):
    directory = adapter("plain", rank_pattern={"v_proj": 4})
    assert rejection(directory, vllm()) == (
        f"{WEIGHTS}: base_model.model.model.layers.0.self_attn.v_proj has rank 8 but {CONFIG} gives it rank 4 "
        "(rank_pattern 'v_proj')")
    bad = adapter("plain", rank_pattern={"(": 4})
    assert rejection(bad, vllm()).startswith(f"{CONFIG}: rank_pattern key '(' is not a regular expression PEFT "
                                             "can match")


def test_every_rank_pattern_value_is_held_against_the_limit_even_one_no_module_matches(adapter):
    directory = adapter("plain", rank_pattern={"proj": 16})  # matches nothing, yet vLLM 0.32 counts it
    assert validate(directory, vllm(V0320, max_rank=16)).rank == 16
    assert rejection(directory, vllm(V0320, max_rank=8)) == (
        f"{CONFIG}: rank_pattern's rank 16 exceeds this base model's maxLoraRank 8")


def test_a_rank_pattern_above_r_is_held_against_the_limit(adapter):
    directory = edit_tensors(adapter("plain", r=4, lora_alpha=8, rank_pattern={"q_proj": 8}),
                             lambda t: t.update({k: (v[:4] if ".v_proj.lora_A" in k else v[:, :4]).contiguous()
                                                 for k, v in t.items() if ".v_proj." in k}))
    assert validate(directory, vllm(V0320, max_rank=8)).rank == 8
    assert rejection(directory, vllm(V0320, max_rank=4)) == (
        f"{CONFIG}: rank_pattern's rank 8 exceeds this base model's maxLoraRank 4")


@pytest.mark.parametrize("version", [V0110, V0120, V0310])
def test_rank_patterns_are_refused_where_vllm_ignores_them(built, version):
    assert rejection(built / "rank-pattern", vllm(version)) == (
        f"{CONFIG}: model.layers.0.self_attn.v_proj was trained with rank 4 and lora_alpha 16 (scale 4) under "
        f"rank_pattern, but vLLM {'.'.join(map(str, version))} does not read them and scales every module by r=8 "
        "and lora_alpha=16 (2), so it would serve silently wrong output")


@pytest.mark.parametrize("name", ["rank-and-alpha-pattern", "pattern-on-no-module"])
def test_patterns_that_leave_every_scale_alone_are_served_by_every_version(built, name):
    for version in (V0110, V0120, V0320, None):
        validate(built / name, vllm(version))


def test_alpha_pattern_alone_is_refused_where_vllm_ignores_it(adapter):
    directory = adapter("plain", alpha_pattern={"q_proj": 32})
    validate(directory, vllm(V0320))
    assert rejection(directory, vllm(V0120)) == (
        f"{CONFIG}: model.layers.0.self_attn.q_proj was trained with rank 8 and lora_alpha 32 (scale 4) under "
        "alpha_pattern, but vLLM 0.12.0 does not read them and scales every module by r=8 and lora_alpha=16 (2), "
        "so it would serve silently wrong output")


# ---- loraplex validate --runtime vllm --runtime-version ------------------------------------------------------

def run_validate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "loraplex.cli", "validate", *args], capture_output=True, text=True,
                          timeout=60)


def test_validate_checks_for_the_vllm_version_named(built):
    newest = run_validate(str(built / "embeddings"), "--runtime", "vllm", "--json")
    assert newest.returncode == 0, newest.stdout + newest.stderr
    assert newest.stderr == ""
    old = run_validate(str(built / "embeddings"), "--runtime", "vllm", "--runtime-version", "0.11.0")
    assert old.returncode == 1
    assert old.stdout.startswith("rejected: adapter_model.safetensors: base_model.model.lm_head.base_layer.weight "
                                 "is a full copy of the embedding, which vLLM 0.11.0 cannot parse")
    patterns = run_validate(str(built / "rank-pattern"), "--runtime", "vllm", "--runtime-version", "v0.12")
    assert patterns.returncode == 1 and "vLLM 0.12.0 does not read them" in patterns.stdout


def test_validate_says_when_the_version_is_beyond_what_it_knows(built):
    newer = run_validate(str(built / "plain"), "--runtime", "vllm", "--runtime-version", "0.40.0")
    assert newer.returncode == 0
    assert "vLLM 0.40.0 is newer than loraplex knows; adapters are checked as for 0.32.0" in newer.stderr
    assert run_validate(str(built / "plain"), "--runtime", "vllm", "--runtime-version", "latest").returncode == 2
    assert run_validate(str(built / "plain"), "--runtime-version", "0.11.0").returncode == 2  # whose version?
    nim_2 = run_validate(str(built / "plain"), "--runtime", "nim", "--runtime-version", "2.0.5")
    assert nim_2.returncode == 0 and nim_2.stderr == ""
    unknown_nim = run_validate(str(built / "plain"), "--runtime", "nim")
    assert unknown_nim.returncode == 0 and "checked as for NIM 1.x" in unknown_nim.stderr
