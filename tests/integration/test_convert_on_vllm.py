"""Every producer layout loraplex converts, served on real vLLM: each case builds a known PEFT adapter in one
producer's on-disk layout, the sidecar's validate_or_convert checks it and converts it for vLLM, and the session's
vLLM serving the result answers as transformers + peft do. A new layout is one more row in CASES."""

from __future__ import annotations

import dataclasses
import json
import shutil
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from loraplex.api.runtime_capabilities import capabilities
from loraplex.api.types import AdapterFormat, Runtime
from loraplex.formats import AdapterPolicy
from loraplex.formats.for_runtime import validate_or_convert
from tests.adapters import LLAMA_LINEAR_MODULES, make_hf_adapter_for
from tests.producers import (
    assert_same_delta_weights,
    make_nemo_from_peft,
    make_nxd_from_peft,
    make_trtllm_from_peft,
    share_fused_lora_a,
)
from tests.producers_nemo2 import make_nemo2_from_peft
from tests.vllm_server import MAX_LORA_RANK, VLLM_VERSION, VllmServer, reference_tokens

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]  # may be the first to start the session's vLLM

RANK = 8  # make_hf_adapter_for's
# ΔW from bfloat16 factors (8 significant bits) is within this share of the original's largest entry (test_nxd's).
ROUNDED_DELTA_TOLERANCE = 1.6e-2
Builder = Callable[[Path, Path, dict[str, Any]], Path]  # (original PEFT adapter, out, base config) -> its folder


@dataclasses.dataclass(frozen=True)
class ProducerCase:
    id: str
    format: AdapterFormat
    build: Builder
    # Applied to the original first: fused layouts (NeMo's fused QKV and fc1, NxD's qkv_proj and gate_up_proj)
    # hold one lora_A for several projections, so only an original that ties them has an exact twin there.
    prepare: tuple[Callable[[Path], Path], ...] = ()
    # The producer stores rounded weights (float16, bfloat16): the original's answer is not what it holds, so
    # the reference is the converted adapter itself through transformers + peft (vLLM must still read it
    # rightly), and the conversion is held to the original's ΔW within the rounding.
    rounded: bool = False


def lora_alpha_equal_to_r(adapter: Path) -> Path:
    """Scale 1, which is what a NeMo config without alpha means."""
    return _rewrite_config(adapter, lora_alpha=RANK)


def rank_stabilized(adapter: Path) -> Path:
    """Scale alpha/√r (use_rslora), which NxD's config and TensorRT-LLM's converter both carry."""
    return _rewrite_config(adapter, use_rslora=True)


def _rewrite_config(adapter: Path, **changes: Any) -> Path:
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return adapter


def trtllm(**options: Any) -> Builder:
    return lambda peft, out, base: make_trtllm_from_peft(peft, out, **options)  # hf_lora_convert.py needs no base


def nemo(**options: Any) -> Builder:
    return lambda peft, out, base: make_nemo_from_peft(peft, out, base, **options)


def nemo2(**options: Any) -> Builder:
    return lambda peft, out, base: make_nemo2_from_peft(peft, out, base, **options)


def nxd(**options: Any) -> Builder:
    return lambda peft, out, base: make_nxd_from_peft(peft, out, base, **options)


def nxd_single_adapter_model_pt(original: Path, out: Path, base_config: dict[str, Any]) -> Path:
    """NxD's LoraModel.save_lora on one device: the tp-1 rank file's dict as adapter_model.pt, alone."""
    ranks = make_nxd_from_peft(original, out.with_name(out.name + "-ranks"), base_config)
    out.mkdir(parents=True)
    shutil.move(ranks / "lora_adapter" / "lora" / "model" / "dp_rank_00_tp_rank_00_pp_rank_00.pt",
                out / "adapter_model.pt")
    return out


TIED = (share_fused_lora_a,)
TRTLLM, NEMO, NXD = AdapterFormat.TRTLLM, AdapterFormat.NEMO, AdapterFormat.NXD
CASES = (
    ProducerCase("trtllm-float32", TRTLLM, trtllm(storage="float32")),
    ProducerCase("trtllm-float16", TRTLLM, trtllm(storage="float16"), rounded=True),
    ProducerCase("trtllm-bfloat16", TRTLLM, trtllm(storage="bfloat16"), rounded=True),
    ProducerCase("trtllm-is-dora-column", TRTLLM, trtllm(dora_column=True)),
    ProducerCase("trtllm-rslora", TRTLLM, trtllm(), (rank_stabilized,)),
    ProducerCase("nemo-root", NEMO, nemo(), TIED),
    ProducerCase("nemo-pp2", NEMO, nemo(pp=2), TIED),
    ProducerCase("nemo-tp2", NEMO, nemo(tp=2), TIED),
    ProducerCase("nemo-tp2-pp2", NEMO, nemo(tp=2, pp=2), TIED),
    ProducerCase("nemo-canonical", NEMO, nemo(variant="canonical")),
    ProducerCase("nemo-canonical-tp2-pp2", NEMO, nemo(tp=2, pp=2, variant="canonical")),
    ProducerCase("nemo-without-alpha", NEMO, nemo(alpha=False), (share_fused_lora_a, lora_alpha_equal_to_r)),
    ProducerCase("nemo-float16", NEMO, nemo(dtype="float16"), TIED, rounded=True),
    ProducerCase("nemo-bfloat16-tp2", NEMO, nemo(tp=2, dtype="bfloat16"), TIED, rounded=True),
    ProducerCase("nemo2-tp1", NEMO, nemo2(), TIED),
    ProducerCase("nemo2-tp2", NEMO, nemo2(tp=2), TIED),
    ProducerCase("nemo2-canonical-tp2", NEMO, nemo2(tp=2, canonical=True)),
    ProducerCase("nemo2-megatron-metadata", NEMO, nemo2(tp=2, megatron_metadata=True), TIED),
    ProducerCase("nemo2-bfloat16-tp2", NEMO, nemo2(tp=2, dtype=torch.bfloat16), TIED, rounded=True),
    ProducerCase("nxd-tp1", NXD, nxd(), TIED),
    ProducerCase("nxd-tp2-adapter-config-json", NXD, nxd(tp=2, config_in_checkpoint=False), TIED),
    ProducerCase("nxd-tp2-fused-qkv", NXD, nxd(tp=2, fuse_qkv=True), TIED),
    ProducerCase("nxd-tp2-bfloat16", NXD, nxd(tp=2, storage="bfloat16"), TIED, rounded=True),
    ProducerCase("nxd-tp2-gathered", NXD, nxd(tp=2, gathered=True), TIED),
    ProducerCase("nxd-tp2-own-checkpoint-dir", NXD, nxd(tp=2, checkpoint_dir="checkpoints", tag="step_50"), TIED),
    ProducerCase("nxd-tp2-rslora", NXD, nxd(tp=2), (share_fused_lora_a, rank_stabilized)),
    ProducerCase("nxd-xser-tp1", NXD, nxd(xser=True), TIED),
    ProducerCase("nxd-xser-tp2-bfloat16", NXD, nxd(tp=2, xser=True, storage="bfloat16"), TIED, rounded=True),
    ProducerCase("nxd-single-adapter-model-pt", NXD, nxd_single_adapter_model_pt, TIED),
    ProducerCase("nxd-lightning-tp2", NXD, nxd(tp=2, lightning=True), TIED),
    ProducerCase("nxd-lightning-xser-tp2-zero1-bfloat16", NXD,
                 nxd(tp=2, lightning=True, xser=True, zero1=True, storage="bfloat16"), TIED, rounded=True),
)
# Not here, as loraplex refuses them: NxD with pp>1 (NxD cannot save it: docs/formats/nxd.md §4.3), and NxD at
# tp 4 over this model's 2 K/V heads (NxD then reorders Q heads per chip generation, which is not recorded).
# K/V replicated from a single head converts; tests/unit/test_nxd.py covers it on a model with one.


def vllm_policy(base_config: dict[str, Any]) -> AdapterPolicy:
    """What the sidecar next to the session's vLLM checks adapters against (sidecar/lifecycle.py), for a
    LoraAdapter of format auto and a BaseModelDeployment that leaves allowedFormats to the runtime."""
    return AdapterPolicy(runtime=Runtime.VLLM, runtime_version=VLLM_VERSION, max_rank=MAX_LORA_RANK,
                         expected_format=AdapterFormat.AUTO,
                         allowed_formats=capabilities(Runtime.VLLM, VLLM_VERSION).accepted_formats,
                         base_config=base_config)


@pytest.fixture(scope="module")
def base_tokens(vllm_model_dir: Path) -> list[int]:
    return reference_tokens(vllm_model_dir, None)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_a_producer_layout_converted_for_vllm_answers_as_the_reference(real_vllm: VllmServer, vllm_model_dir: Path,
                                                                         base_tokens: list[int], tmp_path: Path,
                                                                         case: ProducerCase):
    base_config = json.loads((vllm_model_dir / "config.json").read_text())
    original = make_hf_adapter_for(vllm_model_dir, tmp_path / "original", rank=RANK,
                                   target_modules=LLAMA_LINEAR_MODULES, seed=zlib.crc32(case.id.encode()))
    for prepare in case.prepare:
        prepare(original)
    staging = case.build(original, tmp_path / "staging", base_config)

    report, converted_from = validate_or_convert(staging, vllm_policy(base_config))
    assert (report.format, converted_from, report.rank) == (AdapterFormat.HF, case.format, RANK)
    assert set(report.target_modules) == set(LLAMA_LINEAR_MODULES)
    if case.rounded:
        assert_same_delta_weights(staging, original, ROUNDED_DELTA_TOLERANCE)

    status, text = real_vllm.post("/v1/load_lora_adapter", {"lora_name": case.id, "lora_path": str(staging)})
    assert status == 200, text
    served = real_vllm.greedy_tokens(case.id)
    assert served == reference_tokens(vllm_model_dir, staging if case.rounded else original)
    assert served != base_tokens
