"""How the sidecar reads vLLM's answers to a load: its refusal of the adapter, or its inability to answer."""

from __future__ import annotations

import json

import pytest

from loraplex.sidecar.runtimes.base import LoadFailed, RuntimeUnavailable
from loraplex.sidecar.runtimes.vllm import load_failure

# Bodies as vLLM 0.32 sends them (see /work/shared/runtimes/vllm-cpu.md and docs/vllm-lora-contract.md).
RANK_REFUSED = json.dumps({"error": {"message": "Call to add_lora method failed: LoRA rank 16 is greater than "
                                                "max_lora_rank 8.", "type": "InternalServerError", "param": None,
                                     "code": 500}})
OLD_VLLM_REFUSAL = json.dumps({"error": {"message": "vLLM does not yet support DoRA.", "type": "BadRequestError",
                                         "code": 400}})


@pytest.mark.parametrize(("status", "text", "healthy", "expected", "phrase"), [
    (500, RANK_REFUSED, True, LoadFailed, "LoRA rank 16 is greater than max_lora_rank 8"),
    (400, OLD_VLLM_REFUSAL, True, LoadFailed, "does not yet support DoRA"),
    (500, RANK_REFUSED, False, RuntimeUnavailable, "answered 500"),  # the engine died on it
    (502, "<html>Bad Gateway</html>", True, RuntimeUnavailable, "answered 502"),  # not vLLM's own answer
    (503, "", True, RuntimeUnavailable, "answered 503"),
])
def test_load_failures_are_classified_by_what_vllm_said(status, text, healthy, expected, phrase):
    failure = load_failure("math", status, text, engine_healthy=healthy)
    assert type(failure) is expected
    assert phrase in str(failure) and "math" in str(failure)
