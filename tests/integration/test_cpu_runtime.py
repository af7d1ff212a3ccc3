"""`loraplex cpu-runtime`: vLLM's LoRA API and OpenAI routes on a tiny local model, as a real process."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.adapters import make_hf_adapter_for, make_tiny_model
from tests.integration.sidecar_harness import free_port

pytestmark = pytest.mark.integration
PROMPT = "What is 7 times 6?"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cpu-model")
    make_tiny_model(root / "model")
    make_hf_adapter_for(root / "model", root / "math", seed=1)
    make_hf_adapter_for(root / "model", root / "squad", seed=2)
    return root


@pytest.fixture(scope="module")
def runtime(model_dir, tmp_path_factory) -> Iterator[str]:
    port = free_port()
    log = (tmp_path_factory.mktemp("cpu-log") / "runtime.log").open("wb")
    process = subprocess.Popen([sys.executable, "-m", "loraplex.cli", "cpu-runtime", str(model_dir / "model"),
                                "--served-model-name", "tiny", "--port", str(port), "--host", "127.0.0.1",
                                "--max-cpu-loras", "2"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if call(url, "GET", "/health")[0] == 200:
                break
        except OSError:
            time.sleep(0.2)
    yield url
    process.terminate()
    process.wait(timeout=10)


def call(url: str, method: str, path: str, body: dict | None = None) -> tuple[int, object]:
    request = urllib.request.Request(url + path, method=method, data=json.dumps(body).encode() if body else None,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            text = response.read().decode()
            status = response.status
    except urllib.error.HTTPError as error:
        text, status = error.read().decode(), error.code
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def complete(url: str, model: str, max_tokens: int = 8) -> str:
    status, body = call(url, "POST", "/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": max_tokens})
    assert status == 200, body
    return body["choices"][0]["text"]  # type: ignore[index]


def direct(model_dir: Path, adapter: str | None, max_tokens: int = 8) -> str:
    """The same completion computed with transformers + peft directly, no server."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir / "model")
    model = AutoModelForCausalLM.from_pretrained(model_dir / "model")
    if adapter:
        model = PeftModel.from_pretrained(model, model_dir / adapter)
    ids = tokenizer(PROMPT, return_tensors="pt")
    output = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_lora_lifecycle_with_vllm_status_codes(runtime, model_dir):
    math = str(model_dir / "math")
    assert call(runtime, "POST", "/v1/load_lora_adapter", {"lora_name": "math", "lora_path": math})[0] == 200
    status, body = call(runtime, "POST", "/v1/load_lora_adapter", {"lora_name": "math", "lora_path": math})
    assert status == 400 and body["message"] == "The lora adapter 'math' has already been loaded."  # type: ignore[index]
    status, body = call(runtime, "POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/nowhere"})
    assert status == 404 and body["type"] == "NotFoundError"  # type: ignore[index]
    models = [card["id"] for card in call(runtime, "GET", "/v1/models")[1]["data"]]  # type: ignore[index]
    assert models == ["tiny", "math"]
    assert call(runtime, "POST", "/v1/unload_lora_adapter", {"lora_name": "math"})[0] == 200
    status, body = call(runtime, "POST", "/v1/unload_lora_adapter", {"lora_name": "math"})
    assert status == 404 and body["message"] == "The lora adapter 'math' cannot be found."  # type: ignore[index]
    status, body = call(runtime, "POST", "/v1/completions", {"model": "math", "prompt": "x"})
    assert status == 404 and "does not exist" in body["message"]  # type: ignore[index]


def test_completions_per_adapter_match_peft_and_differ_from_base(runtime, model_dir):
    for name in ("math", "squad"):
        call(runtime, "POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(model_dir / name)})
    # Sent together, so they share mixed-adapter batches.
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda model: complete(runtime, model), ["tiny", "math", "squad"] * 2))
    base, math, squad = answers[:3]
    assert answers[3:] == answers[:3]
    assert base == direct(model_dir, None)
    assert math == direct(model_dir, "math")
    assert squad == direct(model_dir, "squad")
    assert len({base, math, squad}) == 3
    status, body = call(runtime, "POST", "/v1/chat/completions",
                        {"model": "math", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4})
    assert status == 200 and body["choices"][0]["message"]["role"] == "assistant"  # type: ignore[index]
    status, body = call(runtime, "POST", "/v1/load_lora_adapter", {"lora_name": "third",
                                                                  "lora_path": str(model_dir / "math")})
    assert status == 400 and "--max-cpu-loras" in body["message"]  # type: ignore[index]
