"""The runtime capabilities table: one row per runtime that everything else reads, versions read from image
tags, and what each vLLM version does."""

from __future__ import annotations

import pytest
from peft.utils.other import get_pattern_key

from loraplex.api.runtime_capabilities import (
    PEFT_OPTIONS,
    RUNTIMES,
    PrefixCacheKey,
    Verdict,
    deployed_version,
    parse_version,
    parse_vllm_version,
    vllm_release,
    vllm_version_note,
)
from loraplex.api.types import AdapterFormat, Runtime
from loraplex.cli import build_parser
from loraplex.formats.hf import pattern_key
from loraplex.operator.runtimes import PROFILES
from loraplex.sidecar.runtimes import CLIENTS


def test_every_runtime_has_a_row_a_profile_and_a_client():
    assert set(RUNTIMES) == set(Runtime)
    assert set(PROFILES) == set(Runtime)
    assert set(CLIENTS) == set(Runtime)
    for runtime, row in RUNTIMES.items():
        assert row.formats and AdapterFormat.AUTO not in row.formats
        assert PROFILES[runtime].formats == row.formats  # the operator renders what the table says


def _validate_choices(flag: str) -> list[str]:
    validate = build_parser()._subparsers._group_actions[0].choices["validate"]  # type: ignore[union-attr]
    return next(action.choices for action in validate._actions if flag in action.option_strings)


def test_the_cli_offers_exactly_the_runtimes_and_formats_of_the_api():
    assert sorted(_validate_choices("--runtime")) == sorted(runtime.value for runtime in RUNTIMES)
    assert sorted(_validate_choices("--runtime")) == sorted(runtime.value for runtime in Runtime)
    assert sorted(_validate_choices("--format")) == sorted(fmt.value for fmt in AdapterFormat)


@pytest.mark.parametrize(("image", "version"), [
    ("vllm/vllm-openai:v0.11.0", (0, 11, 0)),
    ("vllm/vllm-openai:0.12.0", (0, 12, 0)),
    ("vllm/vllm-openai:v0.32.0-cpu", (0, 32, 0)),
    ("public.ecr.aws/q9t5s3a7/vllm-cpu-release-repo:v0.15.1", (0, 15, 1)),
    ("registry.local:5000/vllm/vllm-openai:v0.20.0", (0, 20, 0)),  # a registry port is not a tag
    ("vllm/vllm-openai:v0.11.0@sha256:" + "a" * 64, (0, 11, 0)),
    ("vllm/vllm-openai:v0.13", (0, 13, 0)),
    ("vllm/vllm-openai:latest", None),
    ("vllm/vllm-openai:nightly", None),
    ("vllm/vllm-openai", None),
    ("registry.local:5000/vllm/vllm-openai", None),
    ("vllm/vllm-openai@sha256:" + "a" * 64, None),
])
def test_vllm_version_is_read_from_the_image_tag(image, version):
    assert parse_vllm_version(image) == version


@pytest.mark.parametrize(("text", "version"), [
    ("0.11.0", (0, 11, 0)), ("v0.32.0", (0, 32, 0)), ("0.12", (0, 12, 0)),
    ("latest", None), ("0.11.0-cpu", None), ("", None), ("0", None),
])
def test_declared_versions(text, version):
    assert parse_version(text) == version


@pytest.mark.parametrize(("runtime", "image", "declared", "version"), [
    (Runtime.VLLM, "vllm/vllm-openai:v0.11.0", None, (0, 11, 0)),
    (Runtime.VLLM, "vllm/vllm-openai:v0.11.0", "0.12.0", (0, 12, 0)),  # the spec wins over the tag
    (Runtime.VLLM, "vllm/vllm-openai:latest", "0.12.0", (0, 12, 0)),
    (Runtime.VLLM, "vllm/vllm-openai:latest", None, None),
    (Runtime.NIM, "nvcr.io/nim/meta/llama3-8b-instruct:1.0.3", None, (1, 0, 3)),
    (Runtime.NIM, "nvcr.io/nim/meta/llama3-8b-instruct:latest", "2.0.5", (2, 0, 5)),
])
def test_deployed_version(runtime, image, declared, version):
    assert deployed_version(runtime, image, declared) == version


# version → (--max-lora-rank values start at, refused load status, load_inplace, prefix-cache key,
#            embedding copies skipped, PEFT options read)
@pytest.mark.parametrize(("version", "expected"), [
    ((0, 11, 0), (8, 400, False, PrefixCacheKey.LOAD, False, False)),
    ((0, 11, 2), (1, 400, False, PrefixCacheKey.NAME, False, False)),
    ((0, 12, 0), (1, 400, False, PrefixCacheKey.NAME, True, False)),
    ((0, 15, 0), (1, 400, True, PrefixCacheKey.NAME, True, False)),
    ((0, 17, 1), (1, 400, True, PrefixCacheKey.NAME, True, False)),
    ((0, 18, 0), (1, 500, True, PrefixCacheKey.NAME, True, False)),
    ((0, 22, 0), (1, 500, True, PrefixCacheKey.NAME, True, False)),
    ((0, 31, 0), (1, 500, True, PrefixCacheKey.NAME_AND_PATH, True, False)),
    ((0, 32, 0), (1, 500, True, PrefixCacheKey.NAME_AND_PATH, True, True)),
    ((0, 40, 0), (1, 500, True, PrefixCacheKey.NAME_AND_PATH, True, True)),  # newer: as the newest known
    (None, (1, 500, True, PrefixCacheKey.NAME_AND_PATH, True, True)),  # unknown: as the newest known
    ((0, 10, 2), (8, 400, False, PrefixCacheKey.LOAD, False, False)),  # older: as the oldest known
])
def test_vllm_releases(version, expected):
    release = vllm_release(version)
    assert (release.max_lora_ranks[0], release.refused_load_status, release.load_inplace,
            release.prefix_cache_key, release.skips_embedding_copies, release.reads_peft_options) == expected
    assert release.max_lora_ranks[-1] == 512


# option → verdict on versions that do not read PEFT options (0.11-0.31), and on 0.32
@pytest.mark.parametrize(("key", "before_032", "on_032"), [
    ("use_dora", Verdict.REFUSED, Verdict.REFUSED),
    ("bias", Verdict.REFUSED, Verdict.REFUSED),
    ("lora_bias", Verdict.REFUSED, Verdict.REFUSED),
    ("modules_to_save", Verdict.REFUSED, Verdict.REFUSED),
    ("trainable_token_indices", Verdict.REFUSED, Verdict.REFUSED),
    ("init_lora_weights", Verdict.SILENTLY_WRONG, Verdict.REFUSED),
    ("layer_replication", Verdict.SILENTLY_WRONG, Verdict.REFUSED),
    ("alora_invocation_tokens", Verdict.SILENTLY_WRONG, Verdict.REFUSED),
    ("use_bdlora", Verdict.SILENTLY_WRONG, Verdict.REFUSED),
    ("use_qalora", Verdict.SILENTLY_WRONG, Verdict.REFUSED),
])
def test_peft_option_verdicts(key, before_032, on_032):
    option = next(option for option in PEFT_OPTIONS if option.key == key)
    for version in ((0, 11, 0), (0, 12, 0), (0, 31, 0)):
        assert option.verdict(vllm_release(version)) == before_032
    assert option.verdict(vllm_release((0, 32, 0))) == on_032


@pytest.mark.parametrize(("value", "used"), [
    (True, False), (False, False), ("gaussian", False), ("Gaussian", False), ("eva", False), ("orthogonal", False),
    ("mica", False), ("lora_ga", False), ("pissa", True), ("pissa_niter_16", True), ("olora", True),
    ("corda", True), ("loftq", True), ("true", True),
])
def test_init_lora_weights_strings_outside_vllms_list_are_used(value, used):
    option = next(option for option in PEFT_OPTIONS if option.key == "init_lora_weights")
    assert option.is_used(value) is used


def test_vllm_adapts_unfused_llama_projections_and_the_embeddings():
    assert RUNTIMES[Runtime.VLLM].modules[AdapterFormat.HF] == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"}


@pytest.mark.parametrize(("version", "note"), [
    ((0, 12, 0), None),
    ((0, 32, 1), None),
    (None, "the vLLM version is unknown"),
    ((0, 33, 0), "vLLM 0.33.0 is newer than loraplex knows; adapters are checked as for 0.32.0"),
    ((0, 10, 0), "vLLM 0.10.0 is older than loraplex knows; adapters are checked as for 0.11.0"),
])
def test_version_notes(version, note):
    found = vllm_version_note(version)
    assert found == note if note is None else note in found


@pytest.mark.parametrize(("keys", "module"), [
    (["q_proj"], "model.layers.0.self_attn.q_proj"),
    (["proj"], "model.layers.0.self_attn.q_proj"),  # a key must match whole dotted parts
    (["_proj"], "model.layers.0.self_attn.q_proj"),
    (["self_attn"], "model.layers.0.self_attn.q_proj"),  # ... at the end of the name
    ([".*proj"], "model.layers.0.self_attn.q_proj"),
    (["layers.0.self_attn.q_proj"], "model.layers.0.self_attn.q_proj"),
    (["layers.0.self_attn.q_proj"], "model.layers.10.self_attn.q_proj"),
    (["layers.1.self_attn.q_proj"], "model.layers.11.self_attn.q_proj"),
    (["q_proj|v_proj"], "model.layers.3.self_attn.v_proj"),
    (["model.layers.0.self_attn.q_proj"], "model.layers.0.self_attn.q_proj"),
    (["^model.layers.0.self_attn.q_proj"], "model.layers.0.self_attn.q_proj"),
    (["k_proj", "q_proj", ".*proj"], "model.layers.0.self_attn.q_proj"),  # the first key that matches wins
    ([".*proj", "q_proj"], "model.layers.0.self_attn.q_proj"),
    (["lm_head"], "lm_head"),
    (["embed_tokens"], "model.embed_tokens"),
])
def test_pattern_keys_are_matched_exactly_as_peft_matches_them(keys, module):
    peft_key = get_pattern_key(keys, module)
    assert pattern_key(keys, module) == (peft_key if peft_key in keys else None)


def test_pattern_key_examples():
    assert pattern_key(["q_proj"], "model.layers.0.self_attn.q_proj") == "q_proj"
    assert pattern_key(["proj"], "model.layers.0.self_attn.q_proj") is None
    assert pattern_key(["layers.1.self_attn.q_proj"], "model.layers.11.self_attn.q_proj") is None
