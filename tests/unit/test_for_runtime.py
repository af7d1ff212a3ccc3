"""What the sidecar does with a downloaded adapter: validated as it is when the runtime loads its format, else
checked as it came, converted in place, and checked again as what the runtime will read."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraplex.api.types import AdapterFormat, Runtime
from loraplex.formats import AdapterPolicy, Rejection
from loraplex.formats.for_runtime import validate_or_convert
from tests.adapters import LLAMA_LINEAR_MODULES, TINY_LLAMA, make_hf_adapter
from tests.producers import (
    assert_same_delta_weights,
    make_nemo_from_peft,
    make_nxd_from_peft,
    make_trtllm_from_peft,
    share_fused_lora_a,
)

BASE = {**TINY_LLAMA, "num_hidden_layers": 4}
PEFT_FILES = ["adapter_config.json", "adapter_model.safetensors"]


@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    adapter = make_hf_adapter(tmp_path_factory.mktemp("peft") / "adapter", rank=8, target_modules=LLAMA_LINEAR_MODULES,
                              base_config=BASE, seed=7)
    return share_fused_lora_a(adapter)


def policy(runtime: Runtime, base_config: dict | None = BASE, **fields: object) -> AdapterPolicy:
    return AdapterPolicy(runtime=runtime, max_rank=16, base_config=base_config, **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("producer", ["trtllm", "nemo", "nxd"])
def test_vllm_gets_a_peft_adapter_converted_in_place(tmp_path, peft_adapter, producer):
    staging = tmp_path / "staging"
    if producer == "trtllm":
        make_trtllm_from_peft(peft_adapter, staging)
    elif producer == "nemo":
        make_nemo_from_peft(peft_adapter, staging, BASE, tp=2)
    else:
        make_nxd_from_peft(peft_adapter, staging, BASE, tp=2)
    report, converted_from = validate_or_convert(staging, policy(Runtime.VLLM))
    assert (report.format, converted_from) == (AdapterFormat.HF, AdapterFormat(producer))
    assert sorted(p.name for p in staging.iterdir()) == PEFT_FILES  # only what vLLM reads is left
    assert_same_delta_weights(staging, peft_adapter, 1e-6)
    assert [p.name for p in tmp_path.iterdir()] == ["staging"]  # no scratch left beside it


def test_a_runtime_that_loads_the_format_gets_it_as_it_came(tmp_path, peft_adapter):
    staging = make_nemo_from_peft(peft_adapter, tmp_path / "staging", BASE)
    report, converted_from = validate_or_convert(staging, policy(Runtime.NIM))
    assert (report.format, converted_from) == (AdapterFormat.NEMO, None)
    assert [p.suffix for p in staging.iterdir()] == [".nemo"]


def test_what_the_source_breaks_is_refused_before_converting(tmp_path, peft_adapter):
    staging = make_trtllm_from_peft(peft_adapter, tmp_path / "staging")
    untouched = sorted(p.name for p in staging.iterdir())
    with pytest.raises(Rejection, match=r"lora\.baseModelConfigMap"):
        validate_or_convert(staging, policy(Runtime.VLLM, base_config=None))
    with pytest.raises(Rejection, match="exceeds this base model's maxLoraRank 4"):
        validate_or_convert(staging, AdapterPolicy(runtime=Runtime.VLLM, max_rank=4, base_config=BASE))
    with pytest.raises(Rejection, match="not accepted by this base model"):
        validate_or_convert(staging, policy(Runtime.VLLM, allowed_formats=frozenset({AdapterFormat.HF})))
    with pytest.raises(Rejection, match="another base model"):
        validate_or_convert(staging, policy(Runtime.VLLM, base_config={**BASE, "hidden_size": 128}))
    assert sorted(p.name for p in staging.iterdir()) == untouched


def test_the_converted_adapter_meets_the_runtime_rules_too(tmp_path, peft_adapter):
    staging = make_trtllm_from_peft(peft_adapter, tmp_path / "staging")
    with pytest.raises(Rejection, match="allowedTargetModules"):
        validate_or_convert(staging, policy(Runtime.VLLM, allowed_target_modules=frozenset({"q_proj", "v_proj"})))
