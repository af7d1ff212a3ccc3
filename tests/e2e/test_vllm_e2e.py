"""`runtime: vllm` end to end on real vLLM (its CPU build, `make vllm`): the operator renders the vLLM pod, the
scheduler binds it to the GPU node for its nvidia.com/gpu request, the kubelet runs `vllm serve` beside the
sidecar, and adapters from S3 are loaded by vLLM itself and answer as transformers + peft compute them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from demo.stack import LocalStack
from loraplex.local.controlplane import free_port
from tests.adapters import VLLM_TINY_LLAMA, make_hf_adapter_for, make_tiny_model
from tests.integration.harness import wait_for
from tests.integration.test_vllm_agreement import VLLM_PYTHON

# vLLM takes a minute or more to start on 2 cores, inside the first test's fixtures.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]
PROMPT = "What is 7 times 6?"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("vllm-artifacts")
    make_tiny_model(directory / "model", config=VLLM_TINY_LLAMA)
    for name, seed in (("math", 1), ("squad", 2)):
        make_hf_adapter_for(directory / "model", directory / "adapters" / name, rank=8, seed=seed)
    make_hf_adapter_for(directory / "model", directory / "adapters" / "too-big", rank=32, seed=3)
    return directory


@pytest.fixture(scope="module")
def stack(tmp_path_factory, artifacts, control_plane) -> Iterator[LocalStack]:
    if not VLLM_PYTHON.exists():
        raise AssertionError("real vLLM is not installed: run `make vllm` (make test does it for you)")
    local = LocalStack(tmp_path_factory.mktemp("vllm-cluster"), artifacts, s3_port=free_port(), resync_seconds=600,
                       control_plane=control_plane, namespace="e2e-vllm")
    local.start()
    yield local
    local.stop()


def manifest(stack: LocalStack, adapters: dict[str, str]) -> str:
    docs = [
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3"},
         "stringData": {"AWS_ACCESS_KEY_ID": "demo", "AWS_SECRET_ACCESS_KEY": "demo-secret"}},
        {"apiVersion": "loraplex.io/v1alpha1", "kind": "BaseModelDeployment", "metadata": {"name": "tiny-vllm"},
         "spec": {"model": "tiny-vllm", "modelSource": "/root/.cache/huggingface/tiny-llama", "runtime": "vllm",
                  "image": "vllm/vllm-openai:v0.32.0", "replicas": 1, "gpus": {"count": 1},
                  "cache": {"persistentVolumeClaim": {"claimName": "demo-models"}},
                  "env": [{"name": "VLLM_CPU_KVCACHE_SPACE", "value": "1"}],
                  "runtimeArgs": ["--dtype", "float32", "--max-model-len", "128"],
                  "lora": {"maxRank": 16, "maxCpuLoras": 4, "maxGpuLoras": 2},
                  "storage": {"credentialsSecret": "s3", "s3": {"endpoint": f"http://127.0.0.1:{stack.s3_port}",
                                                                 "region": "us-east-1", "forcePathStyle": True}}}},
    ]
    for name, folder in adapters.items():
        docs.append({"apiVersion": "loraplex.io/v1alpha1", "kind": "LoraAdapter", "metadata": {"name": name},
                     "spec": {"baseModel": "tiny-vllm", "source": f"s3://demo-adapters/tiny-llama/{folder}/"}})
    return yaml.safe_dump_all(docs)


def direct(artifacts: Path, adapter: str | None, max_tokens: int = 8) -> list[int]:
    """Greedy token ids from transformers (+ peft), the reference vLLM must reproduce."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(artifacts / "model")
    model = AutoModelForCausalLM.from_pretrained(artifacts / "model")
    if adapter:
        model = PeftModel.from_pretrained(model, artifacts / "adapters" / adapter)
    ids = tokenizer(PROMPT, return_tensors="pt")
    output = model.generate(**ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id)  # as ignore_eos does on the vLLM side
    return [int(token) for token in output[0, ids["input_ids"].shape[1]:]]


def vllm_tokens(stack: LocalStack, pod: str, model: str, max_tokens: int = 8) -> list[int]:
    import json
    import urllib.request

    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "return_token_ids": True,
            "ignore_eos": True}
    request = urllib.request.Request(stack.url(pod) + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=120) as response:
        return [int(token) for token in json.loads(response.read())["choices"][0]["token_ids"]]


def test_vllm_pod_serves_adapters_loaded_by_the_sidecar(stack, artifacts):
    path = stack.workdir / "vllm.yaml"
    path.write_text(manifest(stack, {"math": "math", "squad": "squad", "too-big": "too-big"}))
    stack.kubectl("apply", "-f", str(path))
    wait_for(lambda: all(stack.phase(name) == "Ready" for name in ("math", "squad")), 420,
             "math and squad Ready on real vLLM", stack.log_tail)
    wait_for(lambda: stack.phase("too-big") == "Failed", 60, "the rank-32 adapter Failed", stack.log_tail)
    reason = next(c for c in stack.adapter("too-big")["status"]["conditions"] if c["type"] == "Ready")
    assert "r=32 exceeds this base model's maxLoraRank 16" in reason["message"]

    [pod] = stack.pods("tiny-vllm")
    assert pod["spec"]["nodeName"] == f"gpu-node-{stack.namespace}"
    inference = pod["spec"]["containers"][0]
    assert inference["resources"]["limits"]["nvidia.com/gpu"] == "1"
    name = pod["metadata"]["name"]
    assert sorted(stack.served(name)) == ["math", "squad", "tiny-vllm"]
    outputs = {model: vllm_tokens(stack, name, model) for model in ("tiny-vllm", "math", "squad")}
    assert outputs["tiny-vllm"] == direct(artifacts, None)
    assert outputs["math"] == direct(artifacts, "math")
    assert outputs["squad"] == direct(artifacts, "squad")
    assert len({tuple(tokens) for tokens in outputs.values()}) == 3
