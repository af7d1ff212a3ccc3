"""Real vLLM serving a converted adapter answers as transformers + peft do with the original."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraplex.formats.convert import convert
from tests.adapters import LLAMA_LINEAR_MODULES, make_hf_adapter_for
from tests.producers import make_nemo_from_peft, make_trtllm_from_peft, share_fused_lora_a
from tests.vllm_server import VllmServer, reference_tokens

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]  # may be the first to start the session's vLLM


@pytest.mark.parametrize("storage", ["float32", "bfloat16"])
def test_a_converted_trtllm_adapter_serves_the_original_answers(real_vllm: VllmServer, vllm_model_dir: Path,
                                                                   tmp_path: Path, storage: str):
    original = make_hf_adapter_for(vllm_model_dir, tmp_path / "original", target_modules=LLAMA_LINEAR_MODULES,
                                   seed=11)
    source = make_trtllm_from_peft(original, tmp_path / "trtllm", storage)
    convert(source, tmp_path / "converted", json.loads((vllm_model_dir / "config.json").read_text()))
    status, text = real_vllm.post("/v1/load_lora_adapter", {"lora_name": "converted",
                                                            "lora_path": str(tmp_path / "converted")})
    assert status == 200, text
    served = real_vllm.greedy_tokens("converted")
    # float32 storage keeps ΔW exact, so the original's answer is the reference; bfloat16 rounds the weights, so
    # the reference is the converted adapter itself through transformers + peft (vLLM must read bf16 rightly).
    reference = original if storage == "float32" else tmp_path / "converted"
    assert served == reference_tokens(vllm_model_dir, reference)
    assert served != reference_tokens(vllm_model_dir, None)


def test_a_converted_nemo_adapter_serves_the_original_answers(real_vllm: VllmServer, vllm_model_dir: Path,
                                                                 tmp_path: Path):
    # vLLM's tiny Llama has 2 query heads over 1 key/value head, so the fused QKV split is exercised; one query
    # group cannot be split over two TP ranks, so this is the pipeline-parallel layout (per-stage layer numbers).
    original = share_fused_lora_a(make_hf_adapter_for(vllm_model_dir, tmp_path / "original",
                                                      target_modules=LLAMA_LINEAR_MODULES, seed=12))
    base_config = json.loads((vllm_model_dir / "config.json").read_text())
    source = make_nemo_from_peft(original, tmp_path / "nemo", base_config, pp=2)
    convert(source, tmp_path / "converted", base_config)
    status, text = real_vllm.post("/v1/load_lora_adapter", {"lora_name": "converted-nemo",
                                                            "lora_path": str(tmp_path / "converted")})
    assert status == 200, text
    served = real_vllm.greedy_tokens("converted-nemo")
    assert served == reference_tokens(vllm_model_dir, original)
    assert served != reference_tokens(vllm_model_dir, None)
